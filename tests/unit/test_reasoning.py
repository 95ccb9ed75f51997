"""<think>…</think> in a model's text becomes reasoning, however the chunks fall."""

from __future__ import annotations

import pytest

from gateway.protocol.reasoning import ThinkTagSplitter
from gateway.protocol.units import Chunk


def feed(pieces: list[str]) -> list[Chunk]:
    splitter = ThinkTagSplitter()
    return [
        splitter.feed(Chunk(content=p, finish_reason="stop" if i == len(pieces) - 1 else None))
        for i, p in enumerate(pieces)
    ]


def split(pieces: list[str]) -> tuple[str, str]:
    chunks = feed(pieces)
    return "".join(c.reasoning for c in chunks), "".join(c.content for c in chunks)


TEXT = "<think>Let me see. 2+2=4.</think>\n\nThe answer is 4."


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 100])
def test_tags_split_at_any_chunk_size(size: int) -> None:
    pieces = [TEXT[i:i + size] for i in range(0, len(TEXT), size)]
    assert split(pieces) == ("Let me see. 2+2=4.", "The answer is 4.")


def test_text_without_a_leading_tag_is_untouched() -> None:
    assert split(["The answer ", "is <think> 4."]) == ("", "The answer is <think> 4.")


def test_a_short_answer_that_looks_like_a_tag_start_is_not_lost() -> None:
    assert split(["<th"]) == ("", "<th")


def test_an_unclosed_think_block_keeps_everything_as_reasoning() -> None:
    assert split(["<think>still thinking", " when cut</"]) == (
        "still thinking when cut</", "")


def test_text_flows_while_thinking() -> None:
    chunks = feed(["<think>abc", "def", "</think>x"])
    assert [c.reasoning for c in chunks] == ["abc", "def", ""]
    assert chunks[-1].content == "x"
