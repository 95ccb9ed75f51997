"""A batch's input file read line by line: its lines, and no second copy of the file."""

from __future__ import annotations

import tracemalloc

import orjson

from gateway.tasks.records import check_input

URL = "/v1/chat/completions"


def line(n: int, text: str) -> bytes:
    return orjson.dumps({"custom_id": f"r{n}", "method": "POST", "url": URL,
                         "body": {"model": "m", "messages": [{"role": "user",
                                                              "content": text}]}})


def test_lines_end_as_splitlines_ends_them() -> None:
    """Windows, old Mac and Unix line ends, a BOM, blank lines and no end at the last."""
    content = (b"\xef\xbb\xbf" + line(1, "a") + b"\r\n" + line(2, "b") + b"\r\r\n" +
               line(3, "c") + b"\n\n" + line(4, "d"))
    lines, errors = check_input(content, "batch_1", URL, 10)
    assert errors == []
    assert [(x.n, x.custom_id) for x in lines] == [(1, "r1"), (2, "r2"), (4, "r3"),
                                                   (6, "r4")]


def test_a_big_input_is_checked_without_a_second_copy_of_it() -> None:
    """A 100 MB file took some 240 MB more while its lines were checked, half of it a list
    of every line; now the lines kept and little else.
    """
    content = b"\n".join(line(n, "x" * 2000) for n in range(2000))  # 4 MB
    tracemalloc.start()
    try:
        lines, errors = check_input(content, "batch_1", URL, 10_000)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(lines) == 2000 and errors == []
    assert peak - kept < len(content) / 4, (peak - kept, len(content))
