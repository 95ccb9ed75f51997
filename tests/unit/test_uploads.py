"""Uploads (``/v1/files``) read as the SDKs send them: multipart/form-data, as httpx (the
``openai`` SDK's client) writes it."""

from __future__ import annotations

import time
import tracemalloc

import httpx
import pytest

from gateway.errors import InvalidRequest
from gateway.tasks.api import _parts


def form(filename: str, content: bytes) -> tuple[bytes, bytes]:
    request = httpx.Request("POST", "http://gateway/v1/files", data={"purpose": "batch"},
                            files={"file": (filename, content)})
    boundary = request.headers["content-type"].split("boundary=")[1]
    return request.read(), boundary.encode()


@pytest.mark.parametrize("filename", ["in.jsonl", "données ü.jsonl", "名前.jsonl"])
def test_a_file_and_its_fields_come_out_as_sent(filename: str) -> None:
    content = b'{"custom_id": "a"}\r\n--not-the-boundary\r\n\xff\x00'
    body, boundary = form(filename, content)
    assert _parts(body, boundary, 10**6) == {"purpose": "batch", "file": (filename, content)}


def test_a_body_cut_before_its_closing_boundary_is_refused() -> None:
    body, boundary = form("in.jsonl", b"x" * 1000)
    with pytest.raises(InvalidRequest) as caught:
        _parts(body[:600], boundary, 10**6)
    assert caught.value.code == "invalid_upload"


def test_a_large_file_is_sliced_out_once() -> None:
    size = 50 * 1024 * 1024
    body, boundary = form("big.jsonl", b"x" * size)
    tracemalloc.start()
    try:
        parts = _parts(body, boundary, 10**9)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(parts["file"][1]) == size
    assert peak < 1.5 * size, peak  # (a MIME parser held ten copies: 1 GB for 100 MB)


def test_a_flood_of_parts_is_refused_at_once() -> None:
    boundary = b"b"
    body = b"".join(b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % n
                    for n in range(100_000)) + b"--b--\r\n"
    with pytest.raises(InvalidRequest) as caught:
        _parts(body, boundary, 10**9)
    assert caught.value.code == "invalid_upload"


def test_a_part_with_headers_past_any_real_ones_is_refused_at_once() -> None:
    """(A Content-Disposition of many parameters: 1 MB of them took 50 s and a gigabyte.)"""
    params = "".join(f"; a{n}=b" for n in range(20_000))
    body = (f'--b\r\nContent-Disposition: form-data; name="file"{params}; filename="x.jsonl"'
            f"\r\n\r\nx\r\n--b--\r\n").encode()
    started = time.perf_counter()
    with pytest.raises(InvalidRequest) as caught:
        _parts(body, b"b", 10**9)
    assert caught.value.code == "invalid_upload" and "headers" in caught.value.message
    assert time.perf_counter() - started < 0.5
    # headers as long as a real client's are read
    body, boundary = form("x" * 2000 + ".jsonl", b"{}")
    assert _parts(body, boundary, 10**6)["file"] == ("x" * 2000 + ".jsonl", b"{}")
