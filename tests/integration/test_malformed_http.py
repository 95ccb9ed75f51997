"""Requests that are not well-formed HTTP, or whose body cannot be read, sent over a raw
socket as a probe would: each gets an error in OpenAI's shape, the connection is closed
cleanly (never left broken for the next request), and no header value reaches the log.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import socket
import time
from collections.abc import Iterator

import pytest

from tests.support import ServerThread, Sim, backend, gateway_config, start_gateway

SECRET = "sk-live-0123456789abcdef"
CHAT = {"model": "phi3.5:3.8b", "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
def keyed(ollama_sim: Sim) -> Iterator[ServerThread]:
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        auth={"key_hashes": [hashlib.sha256(SECRET.encode()).hexdigest()]}))
    yield server
    server.stop()


def exchange(server: ServerThread, raw: bytes, *, then_closed: bool = False
             ) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw``; the status, headers and body of the one answer to it (and, when
    ``then_closed``, check that the server then closed the connection).
    """
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, "the connection closed without an answer"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += sock.recv(65536)
        if then_closed:
            sock.settimeout(3)
            assert sock.recv(1) == b"", "the connection was left open"
    return int(lines[0].split()[1]), headers, body


def post(body: bytes, *extra: str) -> bytes:
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            f"Authorization: Bearer {SECRET}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def openai_error(body: bytes) -> dict[str, object]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_does_not_decompress_is_a_400_on_a_closed_connection(
        keyed: ServerThread, encoding: str, caplog: pytest.LogCaptureFixture) -> None:
    status, headers, body = exchange(keyed, post(b"this is not compressed",
                                                 f"Content-Encoding: {encoding}"),
                                     then_closed=True)
    assert status == 400 and headers.get("connection") == "close"
    assert openai_error(body)["code"] == "bad_body"
    assert not [r for r in caplog.records if r.exc_info]  # no traceback


def test_a_compressed_body_that_decompresses_is_answered(keyed: ServerThread) -> None:
    status, _, body = exchange(keyed, post(gzip.compress(json.dumps(CHAT).encode()),
                                           "Content-Encoding: gzip", "Connection: close"))
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]


@pytest.mark.parametrize("encoding", ["zstd", "br", "compress"])
def test_an_encoding_the_gateway_cannot_decode_is_a_415(keyed: ServerThread,
                                                        encoding: str) -> None:
    status, _, body = exchange(keyed, post(b"\x28\xb5\x2f\xfd", f"Content-Encoding: {encoding}"))
    assert status == 415
    assert openai_error(body)["code"] == "unsupported_encoding"


def test_a_key_that_is_not_utf8_is_refused_not_crashed_on(keyed: ServerThread) -> None:
    raw = post(json.dumps(CHAT).encode()).replace(SECRET.encode(), b"sk-\xff\xfe")
    status, _, body = exchange(keyed, raw)
    assert status == 401 and openai_error(body)["type"] == "authentication_error"


def test_a_body_sent_with_a_get_or_delete_is_not_read_as_a_request(
        keyed: ServerThread) -> None:
    """Only a POST's body says what is asked (with a key, any other method's body that was
    not JSON was a 400)."""
    for method, path in (("GET", "/v1/models"), ("DELETE", "/v1/responses/resp_none")):
        raw = post(b"not json").replace(b"POST /v1/chat/completions",
                                        f"{method} {path}".encode())
        status, _, body = exchange(keyed, raw)
        assert status == (200 if method == "GET" else 404), body


@pytest.mark.parametrize("raw", [
    b"GE\x01T / HTTP/1.1\r\nHost: x\r\n\r\n",  # a method HTTP does not have
    f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\x01x"
    "\r\n\r\n".encode(),  # a bad character in a header carrying a key
    b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a URL too long
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
], ids=["method", "header-character", "url-length", "header-count"])
def test_what_aiohttp_refuses_comes_in_openais_shape_and_no_header_is_logged(
        keyed: ServerThread, raw: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    status, _, body = exchange(keyed, raw, then_closed=True)
    assert status == 400
    error = openai_error(body)
    assert error["type"] == "invalid_request_error"
    assert SECRET not in body.decode("latin-1")
    logged = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    assert SECRET not in logged


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(
        ollama_sim: Sim) -> None:
    server = start_gateway(gateway_config(backend("ollama", "ollama", ollama_sim.api_url),
                                          server={"max_body_bytes": 4096}))
    try:
        head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n")
        status, headers, body = exchange(server, head.encode())  # and not one byte of it
        assert status == 413 and headers.get("connection") == "close"
        assert openai_error(body)["code"] == "request_too_large"
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["chunked", "gzip"])
def test_a_body_over_the_limit_as_read_is_refused(ollama_sim: Sim, how: str) -> None:
    """No length declared (chunked), or a small gzip body that decodes large: the limit
    held only for a declared length, and such a body was read, and sent on, up to the
    upload limit (100 MB).
    """
    server = start_gateway(gateway_config(backend("ollama", "ollama", ollama_sim.api_url),
                                          server={"max_body_bytes": 4096}))
    try:
        big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 8000}]})
        if how == "gzip":
            data = gzip.compress(big.encode())
            raw = post(data, "Content-Encoding: gzip")
        else:
            raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big.encode()))
        status, _, body = exchange(server, raw)
        assert status == 413 and openai_error(body)["code"] == "request_too_large", body
        assert ollama_sim.requests() == []  # (nothing was sent on)
    finally:
        server.stop()

def test_a_body_said_twice_to_be_encoded_is_refused(ollama_sim: Sim) -> None:
    """``identity`` then ``gzip``: aiohttp decodes by the last, the gateway's checks read
    the first, and a small gzip body was held at its compressed size while it decoded.
    """
    server = start_gateway(gateway_config(backend("ollama", "ollama", ollama_sim.api_url)))
    try:
        data = gzip.compress(json.dumps(CHAT).encode())
        status, _, body = exchange(server, post(data, "Content-Encoding: identity",
                                                "Content-Encoding: gzip"))
        assert status == 400 and openai_error(body)["code"] == "bad_body", body
    finally:
        server.stop()

@pytest.fixture
def impatient(ollama_sim: Sim) -> Iterator[ServerThread]:
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        server={"body_timeout": 1.0, "max_body_bytes": 8192,
                "bodies_in_flight_bytes": 12288}))
    yield server
    server.stop()


def test_a_body_that_never_ends_is_a_408_within_the_body_timeout(
        impatient: ServerThread) -> None:
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            "5\r\n{\"mod\r\n")  # ... and then nothing more, ever
    status, _, body = exchange(impatient, head.encode(), then_closed=True)
    assert status == 408 and openai_error(body)["code"] == "body_timeout"


def test_bodies_in_flight_past_the_budget_are_turned_away(impatient: ServerThread) -> None:
    # One body of 8 KB is under way (slowly: 7 KB of it came); a second would pass the
    # 12 KB budget.
    slow = socket.create_connection(("127.0.0.1", impatient.port), timeout=10)
    try:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 8000\r\n\r\n{"
                     + b" " * 7000)
        time.sleep(0.2)  # the gateway is holding it
        status, headers, body = exchange(impatient, post(b"x" * 8000))
        assert status == 503 and headers["retry-after"] == "1"
        assert openai_error(body)["code"] == "bodies_in_flight"
    finally:
        slow.close()
    status, _, _ = exchange(impatient, post(json.dumps(CHAT).encode(), "Connection: close"))
    assert status == 200  # the budget is given back when a request ends


def test_bodies_that_do_not_come_hold_none_of_the_budget(impatient: ServerThread) -> None:
    """A body holds what has arrived of it: a dozen requests that say a large body is
    coming (or send it chunked) and send nothing held the whole budget until their body
    timeout, and every other client's request was a 503 meanwhile.
    """
    lengths = [b"Transfer-Encoding: chunked", b"Content-Length: 4050", b"Content-Length: 8000"]
    stalled = [socket.create_connection(("127.0.0.1", impatient.port), timeout=10)
               for _ in lengths]
    try:
        for sock, length in zip(stalled, lengths, strict=True):
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\n" + length + b"\r\n\r\n")
        time.sleep(0.2)  # the gateway is waiting for all three
        status, _, body = exchange(impatient, post(json.dumps(CHAT).encode()))
        assert status == 200, body
    finally:
        for sock in stalled:
            sock.close()


def test_an_upload_larger_than_the_whole_budget_is_a_413_not_a_wait(ollama_sim: Sim) -> None:
    """(A 503 "retry shortly" once the budget's worth had come: it never could.)"""
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        server={"max_body_bytes": 8192, "bodies_in_flight_bytes": 16384},
        tasks={"max_file_bytes": 100_000}))
    try:
        body = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
                b"\r\n" + b"x" * 30_000 + b"\r\n--b--\r\n")
        head = ("POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        status, _, answer = exchange(server, head + body)
        assert status == 413 and openai_error(answer)["code"] == "request_too_large", answer
    finally:
        server.stop()


def test_a_small_chunked_body_holds_its_size_of_the_budget_not_the_limit(
        impatient: ServerThread, ollama_sim: Sim) -> None:
    """Clients that send their JSON chunked (no length declared) were each charged the
    whole body limit while their answers streamed: two at once used up the budget, and the
    next requests were 503s.
    """
    ollama_sim.fault("phi3.5:3.8b", tokens_per_s=10)  # answers that take a while
    body = json.dumps({**CHAT, "stream": True}).encode()
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    streams = [socket.create_connection(("127.0.0.1", impatient.port), timeout=10)
               for _ in range(3)]
    try:
        heads = []
        for sock in streams:  # three at once, each answer under way
            sock.sendall(chunked)
            heads.append(sock.recv(65536).split(b"\r\n", 1)[0])
        assert heads == [b"HTTP/1.1 200 OK"] * 3, heads
    finally:
        for sock in streams:
            sock.close()

@pytest.mark.parametrize("chunked", [False, True])
def test_an_upload_is_given_the_time_its_size_takes_on_a_slow_link(ollama_sim: Sim,
                                                                   chunked: bool) -> None:
    """A batch file of some size takes longer than ``body_timeout`` to arrive over a slow
    link: it is given more time as it arrives (an upload comes with a key), where it was a
    408; its length declared or not (httpx sends a file it cannot size chunked).
    """
    server = start_gateway(gateway_config(backend("ollama", "ollama", ollama_sim.api_url),
                                          server={"body_timeout": 1.0}))
    try:
        lines = b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions"}\n'
        content = lines * (384 * 1024 // len(lines))
        body = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
                b"Content-Type: application/jsonl\r\n\r\n" + content + b"\r\n--b--\r\n")
        length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
        head = ("POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n"
                f"{length}\r\nConnection: close\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head)
            piece = len(body) // 6 + 1
            for start in range(0, len(body), piece):  # 2.4 s in all, at about 160 KB/s
                time.sleep(0.4)
                data = body[start:start + piece]
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        status = int(answer.split(b" ", 2)[1])
        assert status == 200, answer[-300:]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["bytes"] == len(content)
    finally:
        server.stop()
