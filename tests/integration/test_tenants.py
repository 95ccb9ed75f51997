"""Named keys and their limits in one gateway process (counted in memory): the models a key
may use, requests and tokens per minute, requests at once, a token budget, expiry and
revocation; OpenAI's ``x-ratelimit-*`` headers on every answer, a 429 with ``Retry-After``
past a limit, as each door's client library sees it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import ollama
import openai
import pytest

from gateway.http.access import METERED
from gateway.sim import SimModel, create_openai_app
from tests.support import (
    ServerThread,
    Sim,
    backend,
    gateway_config,
    openai_client,
    start_gateway,
    wait_until,
)

MODEL = "qwq:32b"
USER = [{"role": "user", "content": "Hello"}]
ADMIN = "gw-admin-key-for-tenants-0000"


def secret(name: str) -> str:
    return f"gw-test-{name}-key-0123456789"


def key(name: str, **settings: Any) -> dict[str, Any]:
    return {"id": name, "name": f"the {name} key",
            "hash": hashlib.sha256(secret(name).encode()).hexdigest(), **settings}


KEYS = [
    key("rpm3", rpm=3),
    key("tpm", tpm=600),
    key("one", concurrency=1),
    key("budget", budget=60, budget_period="month"),
    key("small", models=["phi3.5:3.8b", "auto:fast"]),
    key("expired", expires=int(time.time()) - 60),
    key("revoked", revoked=True),
    key("free"),
]


@pytest.fixture
def keyed(ollama_sim: Sim) -> Iterator[ServerThread]:
    config = gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url), keys=KEYS,
        auth={"admin_key_hashes": [hashlib.sha256(ADMIN.encode()).hexdigest()]})
    server = start_gateway(config)
    yield server
    server.stop()


def client(server: ServerThread, name: str) -> openai.OpenAI:
    return openai_client(server.url, secret(name))


@contextlib.contextmanager
def ollama_as(server: ServerThread, name: str) -> Iterator[ollama.Client]:
    ollama_client = ollama.Client(host=server.url,
                                  headers={"Authorization": f"Bearer {secret(name)}"})
    try:
        yield ollama_client
    finally:
        ollama_client.close()


def test_requests_per_minute_answer_429_past_the_limit_with_openais_headers(
        keyed: ServerThread) -> None:
    with client(keyed, "rpm3") as c:
        left = []
        for _ in range(3):
            raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=USER)
            assert raw.headers["x-ratelimit-limit-requests"] == "3"
            left.append(raw.headers["x-ratelimit-remaining-requests"])
            assert raw.headers["x-ratelimit-reset-requests"].endswith(("ms", "s"))
        assert left == ["2", "1", "0"]
        with pytest.raises(openai.RateLimitError) as caught:
            c.chat.completions.create(model=MODEL, messages=USER)
    refused = caught.value
    assert refused.status_code == 429
    assert refused.body["code"] == "requests_limit_exceeded"  # type: ignore[index]
    assert "requests per minute" in refused.message
    # One request comes back every 20 s at 3 a minute: the client is told to wait that long.
    assert 1 <= int(refused.response.headers["Retry-After"]) <= 20
    assert refused.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-limit-tokens" not in refused.response.headers  # no such limit


def test_listing_models_reading_files_and_batches_costs_no_requests(
        keyed: ServerThread) -> None:
    # What IDEs and batch clients poll sets no model to work: it is not what rpm counts.
    with client(keyed, "rpm3") as c, ollama_as(keyed, "rpm3") as o:
        for _ in range(4):
            assert MODEL in [m.id for m in c.models.list()]
            assert c.models.retrieve(MODEL).id == MODEL
            assert c.files.list().data == [] and c.batches.list().data == []
            assert o.list().models and o.show(MODEL).details
        left = [c.chat.completions.with_raw_response.create(model=MODEL, messages=USER)
                .headers["x-ratelimit-remaining-requests"] for _ in range(3)]
        assert left == ["2", "1", "0"]


def test_an_upload_is_answered_with_the_keys_rate_headers(keyed: ServerThread) -> None:
    """An upload is read under a limit of its own (a copy of the request made for it): the
    rate headers the key's check noted on the copy never reached the answer.
    """
    with client(keyed, "rpm3") as c:
        raw = c.files.with_raw_response.create(file=("in.jsonl", b'{"a": 1}\n'),
                                               purpose="batch")
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-remaining-requests"] == "3"  # (it costs none)

def test_counting_a_prompts_tokens_is_a_request_like_any(keyed: ServerThread) -> None:
    # It asks the model for a one-token answer: a key's limits count it (Claude Code calls it).
    with anthropic.Anthropic(base_url=keyed.url, api_key=secret("rpm3"), max_retries=0) as a:
        for _ in range(3):
            assert a.messages.count_tokens(model=MODEL, messages=USER).input_tokens > 0
        with pytest.raises(anthropic.RateLimitError):
            a.messages.count_tokens(model=MODEL, messages=USER)


# The POST routes that set no model to work, and so spend nothing of a key's limits; a new
# route must be added here or to access.METERED.
FREE = {"/api/show", "/v1/files", "/v1/batches", "/v1/batches/{id}/cancel",
        "/v1/feedback", "/admin/keys", "/api/pull", "/api/push", "/api/create", "/api/copy",
        "/v1/responses/input_tokens", "/v1/responses/compact"}  # (the last two: a 404)


def test_every_route_that_sets_a_model_to_work_is_metered(keyed: ServerThread) -> None:
    posts = {r.resource.canonical for r in keyed.app.router.routes()
             if r.method == "POST" and r.resource is not None}
    assert posts - METERED - FREE == set()
    assert posts >= METERED


def test_rate_headers_come_with_streams_and_errors_too(keyed: ServerThread) -> None:
    with client(keyed, "rpm3") as c:
        with c.chat.completions.with_streaming_response.create(
                model=MODEL, messages=USER, stream=True) as streamed:
            assert streamed.headers["x-ratelimit-remaining-requests"] == "2"
            assert "".join(streamed.iter_lines())
        with pytest.raises(openai.NotFoundError) as caught:
            c.chat.completions.create(model="no-such-model", messages=USER)
        assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "1"


def test_tokens_per_minute_charge_an_estimate_then_what_was_used(
        keyed: ServerThread, ollama_sim: Sim) -> None:
    ollama_sim.fault(MODEL, reply=" ".join(["word"] * 120))  # about 120 tokens an answer
    with client(keyed, "tpm") as c:
        first = c.chat.completions.with_raw_response.create(model=MODEL, messages=USER,
                                                             max_tokens=500)
        # Admitted against the estimate: the prompt's length and the answer's limit.
        estimated = 600 - int(first.headers["x-ratelimit-remaining-tokens"])
        assert 500 <= estimated <= 520
        used = first.parse().usage
        assert used is not None and used.total_tokens < estimated
        second = c.chat.completions.with_raw_response.create(model=MODEL, messages=USER,
                                                              max_tokens=10)
        # The first request's estimate was corrected to what it used: the bucket holds
        # 600 - used - the second estimate (plus what refilled meanwhile: 10 a second).
        left = int(second.headers["x-ratelimit-remaining-tokens"])
        expected = 600 - used.total_tokens - (estimated - 500 + 10)
        assert expected <= left <= expected + 30
        # A request that may take more than is left waits.
        with pytest.raises(openai.RateLimitError) as caught:
            c.chat.completions.create(model=MODEL, messages=USER, max_tokens=500)
    assert caught.value.body["code"] == "tokens_limit_exceeded"  # type: ignore[index]
    assert caught.value.response.headers["x-ratelimit-limit-tokens"] == "600"


def test_concurrent_requests_beyond_the_limit_are_refused_until_one_ends(
        keyed: ServerThread, ollama_sim: Sim) -> None:
    ollama_sim.fault(MODEL, ttft=1.0)
    outcome: list[str] = []

    def slow() -> None:
        with client(keyed, "one") as c:
            outcome.append(c.chat.completions.create(model=MODEL, messages=USER).id)

    first = threading.Thread(target=slow)
    first.start()
    time.sleep(0.4)
    with client(keyed, "one") as c:
        with pytest.raises(openai.RateLimitError) as caught:
            c.chat.completions.create(model=MODEL, messages=USER)
        assert caught.value.body["code"] == "concurrency_limit_exceeded"  # type: ignore[index]
        first.join(timeout=10)
        assert outcome, "the request in flight was not answered"
        ollama_sim.clear()
        assert c.chat.completions.create(model=MODEL, messages=USER).choices


def test_a_spent_budget_refuses_until_the_period_ends(keyed: ServerThread,
                                                      ollama_sim: Sim) -> None:
    ollama_sim.fault(MODEL, reply=" ".join(["word"] * 80))
    with client(keyed, "budget") as c:
        c.chat.completions.create(model=MODEL, messages=USER)  # 80-odd tokens of 60
        with pytest.raises(openai.RateLimitError) as caught:
            c.chat.completions.create(model=MODEL, messages=USER)
    assert caught.value.body["code"] == "budget_limit_exceeded"  # type: ignore[index]
    # The budget is a month's: the wait is until the month ends (UTC), at most 31 days.
    retry = int(caught.value.response.headers["Retry-After"])
    assert 0 < retry <= 31 * 86400


def test_a_key_may_use_only_its_models_and_lists_only_those(keyed: ServerThread) -> None:
    with client(keyed, "small") as c:
        assert c.chat.completions.create(model="phi3.5:3.8b", messages=USER).choices
        assert c.chat.completions.create(model="auto:fast", messages=USER).choices
        with pytest.raises(openai.PermissionDeniedError) as caught:
            c.chat.completions.create(model=MODEL, messages=USER)
        assert caught.value.body["code"] == "model_not_allowed"  # type: ignore[index]
        assert {m.id for m in c.models.list()} == {"phi3.5:3.8b", "auto:fast"}
        assert c.models.retrieve("phi3.5:3.8b").id == "phi3.5:3.8b"
        with pytest.raises(openai.NotFoundError):  # as the list: not there for this key
            c.models.retrieve(MODEL)
        with pytest.raises(openai.PermissionDeniedError):
            c.embeddings.create(model="nomic-embed-text", input="hi")
    with ollama_as(keyed, "small") as ollama_client:
        assert {m.model for m in ollama_client.list().models} == {"phi3.5:3.8b", "auto:fast"}
    with client(keyed, "free") as c:
        assert MODEL in {m.id for m in c.models.list()}


@pytest.mark.parametrize(("name", "code"), [("expired", "expired_api_key"),
                                            ("revoked", "revoked_api_key")])
def test_expired_and_revoked_keys_are_refused(keyed: ServerThread, name: str,
                                              code: str) -> None:
    with client(keyed, name) as c, pytest.raises(openai.AuthenticationError) as caught:
        c.models.list()
    assert caught.value.body["code"] == code  # type: ignore[index]


def test_other_doors_say_429_as_their_clients_expect(keyed: ServerThread) -> None:
    with client(keyed, "rpm3") as c:
        for _ in range(3):
            c.chat.completions.create(model=MODEL, messages=USER)
    with anthropic.Anthropic(base_url=keyed.url, api_key=secret("rpm3"),
                             max_retries=0) as claude, \
            pytest.raises(anthropic.RateLimitError) as refused:
        claude.messages.create(model=MODEL, max_tokens=20, messages=USER)  # type: ignore[arg-type]
    assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert refused.value.response.headers["Retry-After"]
    with ollama_as(keyed, "rpm3") as ollama_client, \
            pytest.raises(ollama.ResponseError) as caught:
        ollama_client.chat(model=MODEL, messages=USER)
    assert caught.value.status_code == 429 and "requests per minute" in caught.value.error


def test_limits_are_per_key(keyed: ServerThread) -> None:
    with client(keyed, "rpm3") as c:
        for _ in range(3):
            c.chat.completions.create(model=MODEL, messages=USER)
    with client(keyed, "free") as c:
        raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=USER)
        assert "x-ratelimit-limit-requests" not in raw.headers  # no limits: no headers
        for _ in range(10):
            c.chat.completions.create(model=MODEL, messages=USER)


def admin_call(server: ServerThread, method: str, path: str, body: Any = None,
               token: str = ADMIN) -> tuple[int, Any]:
    request = urllib.request.Request(
        server.url + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_admin_api_shows_config_keys_and_says_where_to_change_them(
        keyed: ServerThread) -> None:
    status, listing = admin_call(keyed, "GET", "/admin/keys")
    assert status == 200
    shown = {k["id"]: k for k in listing["data"]}
    assert shown["rpm3"]["rpm"] == 3 and shown["rpm3"]["source"] == "config"
    assert all("hash" not in k for k in listing["data"])  # never the digest
    assert admin_call(keyed, "GET", "/admin/keys/small")[1]["models"] == \
        ["phi3.5:3.8b", "auto:fast"]
    status, error = admin_call(keyed, "POST", "/admin/keys", {"name": "new"})
    assert status == 409 and error["error"]["code"] == "keys_in_config"
    status, error = admin_call(keyed, "DELETE", "/admin/keys/rpm3")
    assert status == 409 and "config file" in error["error"]["message"]
    assert admin_call(keyed, "GET", "/admin/keys/nobody")[0] == 404
    # A tenant's key is not an admin key.
    status, error = admin_call(keyed, "GET", "/admin/keys", token=secret("free"))
    assert status == 401 and error["error"]["code"] == "admin_key_required"


def test_a_body_labelled_as_an_upload_is_charged_as_what_it_is(keyed: ServerThread) -> None:
    """A chat request whose Content-Type says multipart is still read, and its tokens
    estimated: it was admitted as costing nothing, so a burst of them passed the limit."""
    request = urllib.request.Request(
        keyed.url + "/v1/chat/completions",
        data=json.dumps({"model": MODEL, "messages": USER, "max_tokens": 500}).encode(),
        headers={"Authorization": f"Bearer {secret('tpm')}",
                 "Content-Type": "multipart/form-data; boundary=x"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert int(response.headers["x-ratelimit-remaining-tokens"]) < 100  # 600 - 500 - ...


def test_an_answer_that_does_not_say_its_usage_costs_at_least_what_came_of_it(
        ollama_sim: Sim, mlx_sim: Sim) -> None:
    """A stream read almost to its end and then cut off, or a whole answer from a backend
    that does not count: each cost the estimate (the prompt and 256 tokens for an answer
    without a limit), however long the answer was; a client that hung up near the end of
    each answer got answers for next to nothing.
    """
    def left(c: openai.OpenAI) -> int:
        raw = c.models.with_raw_response.list()
        return int(raw.headers["x-ratelimit-remaining-tokens"])

    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        backend("mlx", "openai", mlx_sim.api_url),
        keys=[key("cut", tpm=600), key("uncounted", tpm=600)]))
    try:
        ollama_sim.fault(MODEL, reply=" ".join(["word"] * 400), tokens_per_s=100)
        with client(server, "cut") as c:
            came = 0
            with c.chat.completions.create(model=MODEL, messages=USER, stream=True) as stream:
                for chunk in stream:
                    came += len(chunk.choices[0].delta.content or "") if chunk.choices else 0
                    if came >= 1600:  # (about 400 tokens), and then the client hangs up
                        break
            wait_until(lambda: left(c) < 250, 5, "the cut stream to be settled")
            assert left(c) < 250  # 600 - 400 and more, and a few seconds of refill
        reasoner = "deepseek-r1-distill-llama:70b"
        mlx_sim.fault(reasoner, reply=" ".join(["word"] * 400), no_usage=True)
        with client(server, "uncounted") as c:
            answer = c.chat.completions.create(model=reasoner, messages=USER)
            assert answer.usage is not None and answer.usage.total_tokens == 0  # (none said)
            assert left(c) < 150  # 600 - 500 and more (the estimate: 256 and the prompt)
    finally:
        server.stop()


def test_embeddings_from_a_backend_that_does_not_count_cost_their_estimate() -> None:
    """An embeddings answer without usage (prompt_tokens 0) was charged 0 tokens."""
    embedder = SimModel("text-embedding-small", capabilities=("embedding",), embedding_length=8)
    with ServerThread(lambda: create_openai_app([embedder], flavor="openai")) as upstream:
        server = start_gateway(gateway_config(
            backend("cloudish", "openai", upstream.url + "/v1"), keys=[key("e", tpm=600)]))
        try:
            Sim(upstream, "openai").fault(embedder.name, no_usage=True)
            with client(server, "e") as c:
                raw = c.embeddings.with_raw_response.create(model=embedder.name,
                                                             input="word " * 400)
                assert raw.parse().usage.prompt_tokens == 0  # (the backend did not say)
                left = c.models.with_raw_response.list().headers
                assert int(left["x-ratelimit-remaining-tokens"]) < 600 - 400  # its ~500
        finally:
            server.stop()


def test_what_costs_tokens_an_error_nothing_a_cut_stream_its_estimate(
        keyed: ServerThread, ollama_sim: Sim) -> None:
    def left(c: openai.OpenAI) -> int:
        raw = c.models.with_raw_response.list()  # (asks for no tokens itself)
        return int(raw.headers["x-ratelimit-remaining-tokens"])

    with client(keyed, "tpm") as c:
        assert left(c) == 600
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="no-such-model", messages=USER, max_tokens=300)
        assert left(c) == 600  # charged 300-odd while it was asked, then given back
        ollama_sim.fault(MODEL, tokens_per_s=5)  # a slow stream, cut off after one chunk
        with c.chat.completions.create(model=MODEL, messages=USER, max_tokens=200,
                                       stream=True) as stream:
            next(iter(stream))
        # The answer never said what it used: what was estimated for it stays charged.
        wait_until(lambda: left(c) < 420, 5, "the cut stream to be settled")
        assert 340 <= left(c) < 420  # 600 - (200 + the prompt), and a few seconds of refill


def test_a_stream_an_error_broke_off_costs_what_came_of_it(keyed: ServerThread,
                                                          ollama_sim: Sim) -> None:
    """Its status long since 200, it cost the whole estimate (here all of a minute's
    tokens): the key's next requests were refused while nothing was wrong.
    """
    def left(c: openai.OpenAI) -> int:
        raw = c.models.with_raw_response.list()
        return int(raw.headers["x-ratelimit-remaining-tokens"])

    ollama_sim.fault(MODEL, error_after=2, message="model crashed")
    with client(keyed, "tpm") as c:
        with pytest.raises(openai.APIError, match="model crashed"):
            for _ in c.chat.completions.create(model=MODEL, messages=USER, max_tokens=500,
                                               stream=True):
                pass
        assert left(c) > 550  # (the prompt, a few tokens: not 500 and more)
        ollama_sim.clear()
        c.chat.completions.create(model=MODEL, messages=USER, max_tokens=300)


def test_an_error_before_admission_says_what_is_left(keyed: ServerThread) -> None:
    """A body that is not JSON is refused before the key's limits are asked: its answer
    lacked what every answer to a key with limits says."""
    request = urllib.request.Request(keyed.url + "/v1/chat/completions", data=b"{not json",
                                     headers={"Authorization": f"Bearer {secret('tpm')}",
                                              "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    with caught.value as refused:  # (its connection closed)
        assert refused.code == 400
        assert refused.headers["x-ratelimit-remaining-tokens"] == "600"


def test_a_keys_cache_scope_and_cached_answers_cost_no_tokens(ollama_sim: Sim) -> None:
    config = gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        plugins=[{"name": "cache", "options": {"backend": "memory"}}],
        keys=[key("tpm", tpm=6000), key("off", cache="off"), key("pool-a", cache="shared"),
              key("pool-b", cache="shared"), key("own")])
    server = start_gateway(config)

    def ask(name: str, question: str = "Cached?") -> tuple[str | None, dict[str, str]]:
        with client(server, name) as c:
            raw = c.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": question}], temperature=0)
            return raw.headers.get("x-gateway-cache"), dict(raw.headers)

    try:
        assert ask("tpm")[0] == "miss"
        with client(server, "tpm") as c:
            before = int(c.models.with_raw_response.list().headers[
                "x-ratelimit-remaining-tokens"])
        assert ask("tpm")[0] == "hit"
        # Admitted against its estimate, then given it all back: no model was asked.
        with client(server, "tpm") as c:
            after = int(c.models.with_raw_response.list().headers[
                "x-ratelimit-remaining-tokens"])
        assert before <= after <= before + 100 * 2  # (100 a second refill, at most)
        assert [ask("off")[0], ask("off")[0]] == ["bypass", "bypass"]
        assert ask("pool-a", "Pooled?")[0] == "miss"
        assert ask("pool-b", "Pooled?")[0] == "hit"  # the shared pool answers
        assert ask("own", "Pooled?")[0] == "miss"  # a key of its own does not see the pool's
        assert ask("own", "Pooled?")[0] == "hit"
    finally:
        server.stop()


def test_a_huge_max_tokens_waits_for_a_full_bucket_and_cannot_refill_it(
        keyed: ServerThread) -> None:
    with client(keyed, "tpm") as c:
        first = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=USER, max_tokens=5_000_000)
        assert first.headers["x-ratelimit-remaining-tokens"] == "0"  # a whole minute's
        used = first.parse().usage
        assert used is not None
        with pytest.raises(openai.RateLimitError) as caught:
            c.chat.completions.create(model=MODEL, messages=USER, max_tokens=5_000_000)
        # What the first answer did not use came back, no more: it waits for the rest.
        assert caught.value.body["code"] == "tokens_limit_exceeded"  # type: ignore[index]
        left = 600 - used.total_tokens
        assert left <= int(caught.value.response.headers["x-ratelimit-remaining-tokens"]) \
            <= left + 20


def test_an_answer_longer_than_a_minutes_tokens_is_paid_off_before_the_next(
        keyed: ServerThread, ollama_sim: Sim) -> None:
    ollama_sim.fault(MODEL, reply=" ".join(["word"] * 1500))  # 1,500 tokens of 600 a minute
    with client(keyed, "tpm") as c:
        assert c.chat.completions.create(model=MODEL, messages=USER).usage.total_tokens > 1500  # type: ignore[union-attr]
        with pytest.raises(openai.RateLimitError) as caught:
            c.chat.completions.create(model=MODEL, messages=USER, max_tokens=10)
    # The bucket owes 900-odd tokens: a minute and a half before 20-odd are there again.
    assert 90 <= int(caught.value.response.headers["Retry-After"]) <= 100


@pytest.mark.parametrize(("path", "body"), [
    ("/api/chat", {"name": MODEL, "messages": USER}),
    ("/api/generate", {"model": None, "name": MODEL, "prompt": "Hi"}),
    ("/api/show", {"name": MODEL}),
    ("/api/embed", {"model": "", "name": "nomic-embed-text", "input": "Hi"}),
    ("/v1/responses", {"model": MODEL, "input": "Hi"}),
    ("/v1/messages", {"model": MODEL, "max_tokens": 10, "messages": USER}),
    ("/v1/embeddings", {"model": "nomic-embed-text", "input": "Hi"}),
    ("/api/embeddings", {"model": "nomic-embed-text", "prompt": "Hi"}),
])
@pytest.mark.parametrize("labelled", ["application/json", "multipart/form-data; boundary=x"])
def test_no_door_or_field_lets_a_key_past_its_models(keyed: ServerThread, path: str,
                                                     body: dict[str, Any], labelled: str
                                                     ) -> None:
    """(A JSON body labelled as a file upload is read as the JSON it is: it passed the
    middleware's check unread, and the embedding doors answered it.)"""
    request = urllib.request.Request(
        keyed.url + path, data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {secret('small')}", "Content-Type": labelled})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 403
    assert "may not use the model" in caught.value.read().decode()


def test_fallbacks_and_lower_tiers_answer_only_with_a_keys_models(ollama_sim: Sim,
                                                                 mlx_sim: Sim) -> None:
    """A key's model failing does not let another model answer it, as it would a key
    without a list (the model's fallback, then the server tier)."""
    config = gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        backend("mlx", "openai", mlx_sim.api_url, tier="server"),
        models=[{"name": MODEL, "fallbacks": ["qwen2.5-coder:32b"]}],
        keys=[key("only", models=[MODEL]), key("also", models=[MODEL, "qwen2.5-coder:32b"]),
              key("free")])
    server = start_gateway(config)
    ollama_sim.fault(MODEL, status=500)
    try:
        with client(server, "free") as c:
            assert c.chat.completions.create(model=MODEL, messages=USER).model != MODEL
        with client(server, "also") as c:
            assert c.chat.completions.create(model=MODEL, messages=USER).model == \
                "qwen2.5-coder:32b"
        with client(server, "only") as c, pytest.raises(openai.APIStatusError) as caught:
            c.chat.completions.create(model=MODEL, messages=USER)
        assert caught.value.status_code >= 500
    finally:
        server.stop()


def test_a_large_request_in_flight_does_not_spend_the_budget_of_others(
        keyed: ServerThread, ollama_sim: Sim) -> None:
    """(Estimates are not reserved from a budget: one request asking for ten million
    tokens would otherwise turn every other away until the month ends.)"""
    ollama_sim.fault(MODEL, ttft=1.0)
    outcome: list[int] = []

    def large() -> None:
        with client(keyed, "budget") as c:
            reply = c.chat.completions.create(model=MODEL, messages=USER,
                                              max_tokens=10_000_000)
            outcome.append(reply.usage.total_tokens if reply.usage else 0)

    running = threading.Thread(target=large)
    running.start()
    time.sleep(0.3)
    ollama_sim.clear()
    with client(keyed, "budget") as c:
        assert c.chat.completions.create(model=MODEL, messages=USER, max_tokens=10).choices
    running.join(timeout=10)
    assert outcome and outcome[0] < 60  # (the budget, 60 a month, was never spent)
