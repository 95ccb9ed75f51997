"""OpenAI's Files and Batch APIs through the official ``openai`` SDK, as its documentation
uses them: upload a JSONL file, create a batch, poll it until it is done, read the output
file; on the local queue (SQLite in the data directory) and the simulated fleet.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.keys import CATALOG, ROUTER
from gateway.sim import SimModel, create_ollama_app
from gateway.tasks import worker
from gateway.tasks.api import TASKS
from gateway.tasks.worker import CLAIM_WAIT, TIMEOUT_TRIES
from tests.integration.conftest import FAST, Fleet, fleet_config, host_models
from tests.redis_peer import RedisServer
from tests.support import (
    ServerThread,
    Sim,
    backend,
    gateway_config,
    openai_client,
    start_gateway,
    wait_until,
)

ADMIN = "gw-admin-key-of-the-batch-tests"
KEYS = {"alice": "gw-alice-key-of-the-batch-tests", "bob": "gw-bob-key-of-the-batch-tests"}


EMBEDDER = SimModel("nomic-embed-text:latest", capabilities=("embedding",),
                    embedding_length=768)


@pytest.fixture
def gateway(fleet: Fleet) -> Iterator[ServerThread]:
    embedder = ServerThread(lambda: create_ollama_app([EMBEDDER])).start()
    server = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST),
        backend("embedder", "ollama", embedder.url, timeouts=FAST),
        backend("cloud", "openai", fleet.cloud.api_url, tier="cloud", timeouts=FAST),
        keys=[{"id": name, "hash": hashlib.sha256(key.encode()).hexdigest()}
              for name, key in KEYS.items()],
        auth={"admin_key_hashes": [hashlib.sha256(ADMIN.encode()).hexdigest()]}))
    yield server
    server.stop()
    embedder.stop()


def client(server: ServerThread, who: str = "alice") -> openai.OpenAI:
    return openai_client(server.url, KEYS[who])


def jsonl(lines: list[dict[str, Any]]) -> io.BytesIO:
    return io.BytesIO(b"".join(json.dumps(line).encode() + b"\n" for line in lines))


def chat_line(n: int, model: str = "qwq:32b") -> dict[str, Any]:
    return {"custom_id": f"request-{n}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"Say {n}"}],
                     "max_tokens": 32}}


def finished(api: openai.OpenAI, batch_id: str, limit: float = 30) -> Any:
    deadline = time.monotonic() + limit
    while True:
        batch = api.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, f"the batch is still {batch.status}"
        time.sleep(0.1)


def run(api: openai.OpenAI, name: str, lines: io.BytesIO) -> Any:
    """A batch of chat completions made of ``lines`` (a file of that name), once finished."""
    source = api.files.create(file=(name, lines), purpose="batch")
    return finished(api, api.batches.create(input_file_id=source.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="24h").id)


def output(api: openai.OpenAI, file_id: str) -> dict[str, dict[str, Any]]:
    lines = api.files.content(file_id).text.splitlines()
    by_id = {json.loads(line)["custom_id"]: json.loads(line) for line in lines}
    assert len(by_id) == len(lines), "every custom_id once"
    return by_id


def test_a_chat_batch_end_to_end_with_the_sdk(gateway: ServerThread) -> None:
    api = client(gateway)
    source = api.files.create(file=("requests.jsonl", jsonl([chat_line(n) for n in range(20)])),
                              purpose="batch")
    assert source.purpose == "batch" and source.bytes > 0
    batch = api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                               completion_window="24h", metadata={"job": "nightly"})
    assert batch.status in ("validating", "in_progress")
    done = finished(api, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (20, 20, 0)
    assert done.metadata == {"job": "nightly"} and done.output_file_id
    assert done.error_file_id is None
    answers = output(api, done.output_file_id)
    assert set(answers) == {f"request-{n}" for n in range(20)}
    for line in answers.values():
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "qwq:32b"
        assert body["choices"][0]["message"]["content"]
    assert [b.id for b in api.batches.list()] == [batch.id]

    def shown() -> dict[str, Any]:  # the operator's view of it, in /admin/status
        request = urllib.request.Request(gateway.url + "/admin/status",
                                         headers={"Authorization": f"Bearer {ADMIN}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            found = json.loads(response.read())["tasks"]["batches"]
        return next((b for b in found if b["id"] == batch.id), {})

    wait_until(lambda: shown().get("status") == "completed", 10, "the batch in the status")
    assert shown()["completed"] == shown()["total"] == 20


def test_an_embeddings_batch(gateway: ServerThread) -> None:
    api = client(gateway)
    lines = [{"custom_id": f"doc-{n}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "nomic-embed-text", "input": f"document {n}"}} for n in range(5)]
    source = api.files.create(file=("docs.jsonl", jsonl(lines)), purpose="batch")
    done = finished(api, api.batches.create(input_file_id=source.id, endpoint="/v1/embeddings",
                                            completion_window="24h").id)
    assert done.status == "completed", done
    answers = output(api, done.output_file_id)  # type: ignore[arg-type]
    assert sorted(answers) == [f"doc-{n}" for n in range(5)]
    for line in answers.values():
        assert line["response"]["body"]["object"] == "list"
        assert len(line["response"]["body"]["data"][0]["embedding"]) == 768


def test_a_responses_batch(gateway: ServerThread) -> None:
    api = client(gateway)
    lines = [{"custom_id": f"ask-{n}", "method": "POST", "url": "/v1/responses",
              "body": {"model": "qwq:32b", "instructions": "Answer briefly.",
                       "input": f"What is {n} + {n}?", "max_output_tokens": 32}}
             for n in range(3)]
    bad = {**lines[0], "custom_id": "bad", "body": {**lines[0]["body"], "max_output_tokens": 0}}
    source = api.files.create(file=("asks.jsonl", jsonl([*lines, bad])), purpose="batch")
    done = finished(api, api.batches.create(input_file_id=source.id, endpoint="/v1/responses",
                                            completion_window="24h").id)
    assert done.status == "completed", done
    answers = output(api, done.output_file_id)  # type: ignore[arg-type]
    assert sorted(answers) == [f"ask-{n}" for n in range(3)]
    # A line's error names its own field, as the door does.
    [refused] = output(api, done.error_file_id).values()  # type: ignore[arg-type]
    assert refused["response"]["body"]["error"]["param"] == "max_output_tokens"
    for line in answers.values():
        body = line["response"]["body"]
        assert body["object"] == "response" and body["status"] == "completed"
        assert body["model"] == "qwq:32b" and body["instructions"] == "Answer briefly."
        message = next(o for o in body["output"] if o["type"] == "message")
        assert message["content"][0]["type"] == "output_text"
        assert message["content"][0]["text"]
        assert body["usage"]["output_tokens"] > 0


def test_a_line_that_fails_goes_to_the_error_file(gateway: ServerThread) -> None:
    api = client(gateway)
    lines = [chat_line(1), chat_line(2, model="no-such-model")]
    done = run(api, "mixed.jsonl", jsonl(lines))
    assert done.status == "completed"
    assert done.request_counts is not None and done.request_counts.failed == 1
    errors = output(api, done.error_file_id)  # type: ignore[arg-type]
    assert errors["request-2"]["response"]["status_code"] == 404
    assert errors["request-2"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert list(output(api, done.output_file_id)) == ["request-1"]  # type: ignore[arg-type]


def test_batch_lines_spend_their_keys_token_budget(fleet: Fleet) -> None:
    """A key's budget is not a batch's to bypass: its lines spend it as its live requests
    do, and once it is spent the rest fail with the key's refusal (rates do not apply).
    """
    fleet.primary.fault("qwq:32b", reply=" ".join(["word"] * 30))  # ~40 tokens a line
    server = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST),
        keys=[{"id": "alice", "hash": hashlib.sha256(KEYS["alice"].encode()).hexdigest(),
               "budget": 100, "rpm": 1}],
        tasks={"concurrency": 1}))  # a line at a time: the budget is looked at for each
    try:
        api = client(server)
        done = run(api, "spend.jsonl", jsonl([chat_line(n) for n in range(6)]))
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (3, 3)
        answered = output(api, done.output_file_id)  # type: ignore[arg-type]
        assert sum(a["response"]["body"]["usage"]["total_tokens"]
                   for a in answered.values()) >= 100
        refused = output(api, done.error_file_id)  # type: ignore[arg-type]
        assert {r["response"]["status_code"] for r in refused.values()} == {429}
        assert {r["response"]["body"]["error"]["code"] for r in refused.values()} == \
            {"budget_limit_exceeded"}
        with pytest.raises(openai.RateLimitError) as caught:  # and live, the same budget
            api.chat.completions.create(model="qwq:32b", messages=[
                {"role": "user", "content": "hi"}])
        assert caught.value.code == "budget_limit_exceeded"
    finally:
        server.stop()


def admin_call(server: ServerThread, path: str, body: Any, method: str) -> Any:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     method=method, headers={
                                         "Authorization": f"Bearer {ADMIN}",
                                         "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_key_allowed_fewer_models_mid_batch_has_its_lines_refused_them(fleet: Fleet) -> None:
    """The models a key may use are looked up for each line, as its standing and budget
    are: an admin narrowing them stops the batch's lines for the others at once, as it
    stops its live requests (they went on with the models of the key when it was made).
    """
    fleet.primary.fault("qwq:32b", latency=0.2)
    with RedisServer() as redis:
        server = start_gateway(gateway_config(
            backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST),
            tenants={"store": "redis", "redis_url": redis.url},
            auth={"admin_key_hashes": [hashlib.sha256(ADMIN.encode()).hexdigest()]},
            tasks={"concurrency": 1}))
        try:
            issued = admin_call(server, "/admin/keys", {
                "id": "team", "models": ["qwq:32b", "qwen2.5-coder:32b"]}, "POST")
            api = openai_client(server.url, issued["key"])
            source = api.files.create(file=("lines.jsonl", jsonl(
                [chat_line(n) for n in range(8)])), purpose="batch")
            batch = api.batches.create(input_file_id=source.id, completion_window="24h",
                                       endpoint="/v1/chat/completions")

            def answered() -> int:
                counts = api.batches.retrieve(batch.id).request_counts
                return counts.completed if counts is not None else 0

            wait_until(lambda: answered() >= 1, 10, "a line answered")
            admin_call(server, "/admin/keys/team", {"models": ["qwen2.5-coder:32b"]}, "PATCH")
            done = finished(api, batch.id)
            assert done.request_counts is not None
            assert done.request_counts.completed <= 3  # (those answered as it changed)
            refused = output(api, done.error_file_id)  # type: ignore[arg-type]
            assert len(refused) >= 5
            assert {r["response"]["body"]["error"]["code"] for r in refused.values()} == {
                "model_not_allowed"}
        finally:
            server.stop()


def test_batch_lines_from_a_backend_that_does_not_count_spend_an_estimate(
        fleet: Fleet) -> None:
    """An answer without token counts costs what was estimated (its text, about four
    characters a token, and its max_tokens), for a batch's line as for a live request: a
    backend that does not count is no way around a budget.
    """
    fleet.cloud.fault("gpt-4o-mini", no_usage=True)
    server = start_gateway(gateway_config(
        backend("cloud", "openai", fleet.cloud.api_url, tier="cloud", timeouts=FAST),
        keys=[{"id": "alice", "hash": hashlib.sha256(KEYS["alice"].encode()).hexdigest(),
               "budget": 1000}],
        tasks={"concurrency": 1}))
    try:
        api = client(server)
        lines = [chat_line(n, "gpt-4o-mini") for n in range(6)]
        for line in lines:
            line["body"]["max_tokens"] = 400  # about 440 tokens a line, estimated
        done = run(api, "uncounted.jsonl", jsonl(lines))
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (3, 3)
        answered = output(api, done.output_file_id)  # type: ignore[arg-type]
        assert {a["response"]["body"]["usage"]["total_tokens"] for a in answered.values()} \
            == {0}  # (nothing said, and the budget spent all the same)
    finally:
        server.stop()


def test_cached_answers_to_batch_lines_spend_nothing_of_the_budget(fleet: Fleet) -> None:
    fleet.primary.fault("qwq:32b", reply=" ".join(["word"] * 30))  # ~40 tokens a line
    server = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST),
        plugins=[{"name": "cache", "options": {"backend": "memory"}}],
        keys=[{"id": "alice", "hash": hashlib.sha256(KEYS["alice"].encode()).hexdigest(),
               "budget": 100}],
        tasks={"concurrency": 1}))
    try:
        api = client(server)
        line = chat_line(0)
        line["body"]["temperature"] = 0  # (only deterministic answers are cached)
        same = [{**line, "custom_id": f"request-{n}"} for n in range(6)]
        done = run(api, "same.jsonl", jsonl(same))
        assert done.request_counts is not None
        # One answer from the model, five from the cache: as live, a hit costs nothing.
        assert (done.request_counts.completed, done.request_counts.failed) == (6, 0)
        assert len([r for r in fleet.primary.requests("/api/chat")
                    if r["model"] == "qwq:32b"]) == 1
    finally:
        server.stop()


def test_a_bad_input_file_fails_validation_before_any_work(
    gateway: ServerThread, fleet: Fleet
) -> None:
    api = client(gateway)
    content = (json.dumps(chat_line(1)) + "\nnot json\n" + json.dumps(chat_line(1)) + "\n" +
               json.dumps({**chat_line(3), "url": "/v1/embeddings"}) + "\n").encode()
    source = api.files.create(file=("bad.jsonl", io.BytesIO(content)), purpose="batch")
    batch = api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    assert batch.status == "failed" and batch.errors is not None
    found = [(e.line, e.code) for e in batch.errors.data or []]
    assert found == [(2, "invalid_json_line"), (3, "duplicate_custom_id"),
                     (4, "mismatched_endpoint")]
    assert fleet.primary.requests("/api/chat") == []  # nothing was asked


def test_a_batch_without_an_input_file_or_with_too_much_metadata_is_a_400(
        gateway: ServerThread) -> None:
    api = client(gateway)
    for missing in ({}, {"input_file_id": None}, {"input_file_id": ""}):
        with pytest.raises(openai.BadRequestError) as caught:
            api.post("/batches", cast_to=object, body={
                "endpoint": "/v1/chat/completions", "completion_window": "24h", **missing})
        assert caught.value.param == "input_file_id"
    source = api.files.create(file=("one.jsonl", jsonl([chat_line(1)])), purpose="batch")
    for metadata in ({"k" * 65: "v"}, {"k": "v" * 513}, {f"k{n}": "v" for n in range(17)}):
        with pytest.raises(openai.BadRequestError) as caught:
            api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                               completion_window="24h", metadata=metadata)
        assert caught.value.param == "metadata"
    with pytest.raises(openai.BadRequestError) as caught:  # (a 500 it was)
        api.post("/batches", cast_to=object, body={
            "input_file_id": source.id, "endpoint": "/v1/chat/completions",
            "completion_window": ["24h"]})
    assert caught.value.param == "completion_window"


def test_a_file_written_with_a_byte_order_mark_runs(gateway: ServerThread) -> None:
    api = client(gateway)
    done = run(api, "windows.jsonl", io.BytesIO(b"\xef\xbb\xbf" + jsonl(
        [chat_line(1), chat_line(2)]).getvalue()))
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 0)


def test_blank_lines_do_not_count_against_the_request_limit(ollama_sim: Sim) -> None:
    server = start_gateway(gateway_config(backend("primary", "ollama", ollama_sim.api_url),
                                          tasks={"max_lines": 3}))
    try:
        api = openai_client(server.url, "unused")
        content = b"\n\n".join(json.dumps(chat_line(n, "phi3.5:3.8b")).encode()
                                for n in range(3)) + b"\n\n"
        batch = run(api, "spaced.jsonl", io.BytesIO(content))
        assert batch.status == "completed" and batch.request_counts.completed == 3
        four = content + json.dumps(chat_line(3, "phi3.5:3.8b")).encode()
        source = api.files.create(file=("four.jsonl", io.BytesIO(four)), purpose="batch")
        batch = api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
        assert batch.status == "failed" and batch.errors is not None
        [error] = batch.errors.data or []
        assert error.code == "too_many_requests" and "4 requests" in (error.message or "")
    finally:
        server.stop()


def on_queue(stack: contextlib.ExitStack, queue: str, sim: Sim, **tasks: Any
             ) -> tuple[ServerThread, openai.OpenAI]:
    """A gateway on ``sim`` whose batches wait on the ``queue`` ("local", or a Redis of the
    test's own), with these ``[tasks]`` settings; stopped as ``stack`` closes.
    """
    if queue == "redis":
        redis = stack.enter_context(RedisServer())
        tasks.update(queue="redis", redis_url=redis.url)
    server = start_gateway(gateway_config(backend("primary", "ollama", sim.api_url,
                                                  parallel=4),  # (lines at once)
                                          tasks=tasks))
    stack.callback(server.stop)
    return server, openai_client(server.url, "unused")


@pytest.mark.parametrize("queue", ["local", "redis"])
def test_a_line_longer_than_the_visibility_timeout_is_answered_once(ollama_sim: Sim,
                                                                    queue: str) -> None:
    """A worker renews its claim on a line while it is at work: one that takes longer than
    the visibility timeout is not taken for a dead worker's and asked (and charged) twice.
    """
    # (longer than a claim's blocking read on Redis, after which dead workers' lines are
    # looked for)
    ollama_sim.fault("phi3.5:3.8b", latency=2.5 if queue == "local" else CLAIM_WAIT + 1)
    with contextlib.ExitStack() as stack:
        _, api = on_queue(stack, queue, ollama_sim, visibility_timeout=1.0,
                          concurrency=4)  # (room to claim)
        batch = run(api, "slow.jsonl", jsonl([chat_line(n, "phi3.5:3.8b") for n in range(2)]))
        assert batch.status == "completed" and batch.request_counts.completed == 2
        assert len(ollama_sim.requests("/api/chat")) == 2  # once each, not again


@pytest.mark.parametrize("queue", ["local", "redis"])
def test_lines_at_work_when_a_batch_expires_are_in_its_output(ollama_sim: Sim,
                                                              queue: str) -> None:
    """Work done is kept, as OpenAI keeps it: the lines being answered when the window ran
    out are in the output file (they were asked, and charged); the rest are batch_expired.
    """
    ollama_sim.fault("phi3.5:3.8b", latency=2.0)
    with contextlib.ExitStack() as stack:
        server, api = on_queue(stack, queue, ollama_sim, concurrency=2)
        source = api.files.create(file=("four.jsonl", jsonl([chat_line(n, "phi3.5:3.8b")
                                                             for n in range(4)])),
                                  purpose="batch")
        batch = api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
        wait_until(lambda: len(ollama_sim.requests("/api/chat")) == 2, 10, "two lines asked")
        server.wait(lambda: server.app[TASKS].store.change_batch(
            batch.id, {"expires_at": int(time.time()) - 1}))
        done = finished(api, batch.id)
        asked = ollama_sim.requests("/api/chat")
        at_work = sorted("request-" + r["payload"]["messages"][-1]["content"].split()[-1]
                         for r in asked)
        assert done.status == "expired" and done.request_counts.completed == 2
        assert sorted(output(api, done.output_file_id)) == at_work
        expired = output(api, done.error_file_id)
        assert sorted([*expired, *at_work]) == [f"request-{n}" for n in range(4)]
        assert {e["error"]["code"] for e in expired.values()} == {"batch_expired"}
        assert len(asked) == 2


def test_a_tenant_sees_only_its_own_files_and_batches(gateway: ServerThread) -> None:
    alice, bob = client(gateway, "alice"), client(gateway, "bob")
    source = alice.files.create(file=("a.jsonl", jsonl([chat_line(1)])), purpose="batch")
    batch = alice.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(source.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(source.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):  # nor start one from alice's file
        bob.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                           completion_window="24h")
    assert [f.id for f in bob.files.list()] == [] and list(bob.batches.list()) == []


def test_cancel_stops_the_lines_not_yet_answered(gateway: ServerThread, fleet: Fleet) -> None:
    fleet.primary.fault("qwq:32b", latency=0.5)
    api = client(gateway)
    source = api.files.create(file=("slow.jsonl", jsonl([chat_line(n) for n in range(60)])),
                              purpose="batch")
    batch = api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    time.sleep(0.3)
    cancelled = api.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    done = finished(api, batch.id)
    assert done.status == "cancelled" and done.request_counts is not None
    assert 0 < done.request_counts.completed < 60  # those in flight finished; no more
    asked = len(fleet.primary.requests("/api/chat"))
    time.sleep(1.0)
    assert len(fleet.primary.requests("/api/chat")) == asked
    with pytest.raises(openai.ConflictError):
        api.batches.cancel(batch.id)


def test_files_are_listed_shown_and_deleted(gateway: ServerThread) -> None:
    api = client(gateway)
    source = api.files.create(file=("notes.txt", io.BytesIO(b"hello")), purpose="user_data")
    assert api.files.retrieve(source.id).filename == "notes.txt"
    assert api.files.content(source.id).content == b"hello"
    assert [f.id for f in api.files.list()] == [source.id]
    assert api.files.delete(source.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(source.id)
    with pytest.raises(openai.BadRequestError):
        api.files.create(file=("x.jsonl", io.BytesIO(b"{}")), purpose="fine-tune")


def test_files_are_listed_newest_first_a_page_at_a_time(gateway: ServerThread,
                                                         fleet: Fleet) -> None:
    api = client(gateway)
    made = []
    for n in range(5):  # (within a second: created_at is in seconds, the order is not)
        made.append(api.files.create(file=(f"{n}.txt", io.BytesIO(b"x")),
                                     purpose="user_data").id)
    first = api.files.list(limit=2)
    assert [f.id for f in first.data] == made[:-3:-1] and first.has_more
    assert [f.id for f in api.files.list(limit=2)] == made[::-1]  # every page, in turn
    assert [f.id for f in api.files.list(order="asc", limit=3)] == made
    with pytest.raises(openai.BadRequestError) as caught:
        api.files.list(order="sideways")  # type: ignore[arg-type]
    assert caught.value.param == "order"
    # The clean-up loop: each page's last id is deleted before the next page is asked for
    # (a batch's output and error files among them: one was left behind, listed in the
    # order it was written but placed by its id)
    for n in range(5):
        api.files.create(file=(f"more-{n}.txt", io.BytesIO(b"x")), purpose="user_data")
    fleet.primary.fault("qwq:32b", latency=1.2)  # (its files are written a second later)
    source = api.files.create(file=("in.jsonl", jsonl([chat_line(1),
                                                       chat_line(2, model="no-such-model")])),
                              purpose="batch")
    made = api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    api.files.create(file=("meanwhile.txt", io.BytesIO(b"x")), purpose="user_data")
    batch = finished(api, made.id)
    assert batch.output_file_id and batch.error_file_id
    for size in (1, 3):
        for file in api.files.list(limit=size):
            api.files.delete(file.id)
        assert list(api.files.list()) == []
        if size == 1:
            for n in range(3):
                api.files.create(file=(f"again-{n}.txt", io.BytesIO(b"x")), purpose="user_data")


def test_batch_lines_take_only_their_share_of_a_deployment(fleet: Fleet) -> None:
    """Batch lines wait for their share of the slots, behind interactive requests, and
    take each as it frees up: 12 lines of 0.3 s on 2 slots take about 1.8 s (put back to be
    tried again later, with the default backoff, they took a minute).
    """
    fleet.primary.fault("qwq:32b", latency=0.3)
    server = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST,
                max_concurrency=4),
        tasks={"share": 0.5}))
    try:
        api = openai_client(server.url)
        source = api.files.create(file=("slow.jsonl", jsonl([chat_line(n) for n in range(12)])),
                                  purpose="batch")
        began = time.monotonic()
        batch = api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
        state = server.app[ROUTER].balancer.state
        deployment = server.app[CATALOG].deployments("qwq:32b")[0]
        most = 0
        while api.batches.retrieve(batch.id).status == "in_progress":
            most = max(most, server.call(lambda: state(deployment).batch_in_flight))
            started = time.monotonic()  # an IDE's request meanwhile finds a free slot
            assert api.chat.completions.create(model="qwq:32b", messages=[
                {"role": "user", "content": "hi"}]).model == "qwq:32b"
            assert time.monotonic() - started < 0.6  # its 0.3 s, no wait in line
        took = time.monotonic() - began
        assert most == 2  # half of the 4 slots, never more
        assert finished(api, batch.id).request_counts.completed == 12  # type: ignore[union-attr]
        assert took < 6.0, f"the batch took {took:.1f} s"
    finally:
        server.stop()


def batch_gauge(server: ServerThread) -> dict[str, float]:
    """``gateway_batch_requests`` by state, as a Prometheus scraper reads it."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.labels["state"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "gateway_batch_requests"}


def test_a_fleet_down_leaves_lines_queued_until_the_window_runs_out(fleet: Fleet) -> None:
    fleet.primary.fault("qwen2.5-coder:32b", status=503)  # its only deployment: down
    server = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST),
        tasks={"retry_initial": 0.05, "retry_max": 0.2}))
    try:
        api = openai_client(server.url)
        lines = [chat_line(n) for n in range(4)] + \
            [chat_line(n, model="qwen2.5-coder:32b") for n in range(4, 8)]
        source = api.files.create(file=("mixed.jsonl", jsonl(lines)), purpose="batch")
        waiting = api.batches.create(input_file_id=source.id,
                                     endpoint="/v1/chat/completions", completion_window="24h")
        later = api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
        def tried() -> int:
            return sum(r["model"] == "qwen2.5-coder:32b"
                       for r in fleet.primary.requests("/api/chat"))

        wait_until(lambda: tried() >= 4, 20, "the lines of the model that is down tried")
        time.sleep(1.5)  # (its breaker opens: they wait in the queue, not at the backend)
        for batch_id in (waiting.id, later.id):
            now = api.batches.retrieve(batch_id)  # queued, not failed
            assert now.status == "in_progress" and now.request_counts is not None
            assert (now.request_counts.completed, now.request_counts.failed) == (4, 0)
        wait_until(lambda: batch_gauge(server) == {"total": 16, "completed": 8, "failed": 0},
                   10, "both batches' progress in /metrics")

        # 24 hours pass for the first batch (its window moved to the past in the store)
        server.wait(lambda: server.app[TASKS].store.change_batch(
            waiting.id, {"expires_at": int(time.time()) - 1}))
        expired = finished(api, waiting.id, limit=10)
        assert expired.status == "expired" and expired.expired_at
        assert sorted(output(api, expired.output_file_id)) == [  # type: ignore[arg-type]
            f"request-{n}" for n in range(4)]  # what was done is kept
        errors = output(api, expired.error_file_id)  # type: ignore[arg-type]
        assert sorted(errors) == [f"request-{n}" for n in range(4, 8)]
        assert {e["error"]["code"] for e in errors.values()} == {"batch_expired"}
        assert {e["response"] for e in errors.values()} == {None}

        fleet.primary.clear()  # the model is back: the other batch's lines are answered
        done = finished(api, later.id, limit=20)
        assert done.status == "completed" and done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (8, 0)
    finally:
        server.stop()


def test_a_gateway_started_while_a_backend_is_down_keeps_its_models_lines_for_it(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model not found while a backend could not be listed may be that backend's (the
    gateway restarted while the workstation reboots): its lines wait for it, where they
    failed with 404 for good. A model no backend has is still a 404, after a while.
    """
    monkeypatch.setattr(worker, "MISSING_SECONDS", 3.0)
    fleet.threads["primary"].stop()  # the workstation, away as the gateway starts
    server = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST),
        backend("cloud", "openai", fleet.cloud.api_url, tier="cloud", timeouts=FAST),
        server={"discovery_interval": 0.5}, routing={"health_interval": 0.5},
        tasks={"retry_initial": 0.05, "retry_max": 0.2}))
    try:
        api = openai_client(server.url)

        def batch_of(*lines: dict[str, Any]) -> str:
            source = api.files.create(file=("lines.jsonl", jsonl(list(lines))), purpose="batch")
            return api.batches.create(input_file_id=source.id, completion_window="24h",
                                      endpoint="/v1/chat/completions").id

        waiting = batch_of(chat_line(0), chat_line(1))
        time.sleep(1.5)
        now = api.batches.retrieve(waiting)
        assert now.status == "in_progress" and now.request_counts is not None
        assert now.request_counts.failed == 0  # waiting, not failed
        fleet.restart("primary", lambda: create_ollama_app(host_models()))
        done = finished(api, waiting, limit=20)
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (2, 0)

        fleet.threads["primary"].stop()  # away again: a model no backend has waits a while
        wait_until(lambda: server.app[CATALOG].unreachable() == ["primary"], 10,
                   "the workstation found away")
        started = time.monotonic()
        unknown = finished(api, batch_of(chat_line(2, model="no-such-model:7b")), limit=10)
        assert time.monotonic() - started >= 2.5  # (MISSING_SECONDS)
        assert unknown.request_counts is not None and unknown.request_counts.failed == 1
        errors = output(api, unknown.error_file_id)  # type: ignore[arg-type]
        assert errors["request-2"]["response"]["status_code"] == 404
    finally:
        server.stop()


def test_a_line_that_times_out_again_and_again_is_answered_with_its_timeout(
        fleet: Fleet) -> None:
    """A timeout may be the line's own doing (here the model stalls on every answer): the
    line is tried a few times, then its timeout is its answer, where it kept taking a slot
    at each try until its batch expired a day later. Lines the fleet cannot take now (503)
    still wait (``test_a_fleet_down_leaves_lines_queued_until_the_window_runs_out``).
    """
    fleet.primary.fault("qwen2.5-coder:32b", stall_after=2)
    server = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts={**FAST, "idle": 0.3}),
        routing={"max_attempts": 1, "tier_fallback": False},
        tasks={"retry_initial": 0.05, "retry_max": 0.2}))
    try:
        api = openai_client(server.url)
        done = run(api, "stalls.jsonl", jsonl(
            [chat_line(0), chat_line(1, model="qwen2.5-coder:32b"),
             chat_line(2, model="qwen2.5-coder:32b")]))
        assert done.status == "completed" and done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)
        errors = output(api, done.error_file_id)
        assert sorted(errors) == ["request-1", "request-2"]
        assert {e["response"]["status_code"] for e in errors.values()} == {504}
        assert {e["response"]["body"]["error"]["code"] for e in errors.values()} == {
            "upstream_timeout"}
        asked = [r["payload"]["messages"][-1]["content"]
                 for r in fleet.primary.requests("/api/chat")
                 if r["model"] == "qwen2.5-coder:32b"]
        assert sorted(asked) == ["Say 1"] * TIMEOUT_TRIES + ["Say 2"] * TIMEOUT_TRIES
    finally:
        server.stop()


def test_workers_sharing_a_queue_count_a_lines_timeouts_together(fleet: Fleet) -> None:
    """Each worker counted a line's tries itself: with two gateways on one Redis queue, a
    line that times out was tried up to twice as often (each try holding a slot for the
    whole timeout), its backoff starting over at each worker.
    """
    fleet.primary.fault("qwen2.5-coder:32b", stall_after=2)
    with RedisServer() as redis:
        servers = [start_gateway(gateway_config(
            backend("primary", "ollama", fleet.primary.api_url, parallel=4,
                    timeouts={**FAST, "idle": 0.3}),
            routing={"max_attempts": 1, "tier_fallback": False},
            tasks={"retry_initial": 0.05, "retry_max": 0.2, "queue": "redis",
                   "redis_url": redis.url})) for _ in range(2)]
        try:
            done = run(openai_client(servers[0].url), "stalls.jsonl", jsonl(
                [chat_line(n, model="qwen2.5-coder:32b") for n in range(1, 5)]))
            assert done.request_counts is not None and done.request_counts.failed == 4
        finally:
            for server in servers:
                server.stop()
    asked = collections.Counter(r["payload"]["messages"][-1]["content"]
                                for r in fleet.primary.requests("/api/chat")
                                if r["payload"]["messages"][-1]["content"].startswith("Say"))
    assert asked == {f"Say {n}": TIMEOUT_TRIES for n in range(1, 5)}, asked


def test_a_backend_failing_mid_batch_sends_its_lines_to_the_fallbacks(fleet: Fleet) -> None:
    server = start_gateway(fleet_config(fleet))  # qwq:32b falls back to qwen2.5-coder:32b
    try:
        api = openai_client(server.url)
        fleet.primary.fault("qwq:32b", latency=0.05)
        source = api.files.create(file=("work.jsonl", jsonl([chat_line(n) for n in range(40)])),
                                  purpose="batch")
        batch = api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
        wait_until(lambda: (api.batches.retrieve(batch.id).request_counts
                            or openai.types.BatchRequestCounts(completed=0, failed=0, total=0)
                            ).completed >= 5, 10, "some lines answered by qwq:32b")
        fleet.primary.fault("qwq:32b", status=500)  # it fails from here on
        done = finished(api, batch.id)
        assert done.status == "completed" and done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (40, 0)
        models = [line["response"]["body"]["model"]
                  for line in output(api, done.output_file_id).values()]  # type: ignore[arg-type]
        assert 5 <= models.count("qwq:32b") < 40
        assert models.count("qwen2.5-coder:32b") == 40 - models.count("qwq:32b")
    finally:
        server.stop()


def test_a_gateway_starts_while_its_redis_takes_connections_and_answers_nothing(
        ollama_sim: Sim) -> None:
    """A Redis that is stuck (stopped, its host swapping) takes connections and answers
    nothing: the task store's start waited for it 30 s a command, three times, and the
    gateway answered no request, chats included, for a minute and a half.
    """
    with RedisServer() as redis:
        assert redis.process is not None
        redis.process.send_signal(signal.SIGSTOP)
        try:
            began = time.monotonic()
            server = start_gateway(gateway_config(
                backend("primary", "ollama", ollama_sim.api_url),
                tasks={"queue": "redis", "redis_url": redis.url}))
            took = time.monotonic() - began
            try:
                api = openai_client(server.url, timeout=60)
                assert api.chat.completions.create(
                    model="phi3.5:3.8b", messages=[{"role": "user", "content": "hi"}],
                ).choices[0].message.content
                # (and a Batches request is told so within its read timeout, once: it
                # waited 30 s three times)
                began = time.monotonic()
                with pytest.raises(openai.APIStatusError) as caught:
                    api.batches.list()
                refused = time.monotonic() - began
                assert caught.value.status_code == 503
            finally:
                server.stop()
        finally:
            redis.process.send_signal(signal.SIGCONT)
    assert took < 20, f"started in {took:.1f} s"
    assert refused < 15, f"a 503 after {refused:.1f} s"
