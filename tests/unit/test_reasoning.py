"""<think>…</think> in a model's text becomes reasoning, however the chunks fall."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.backends.base import Chunk
from gateway.protocol.reasoning import split_think_tags


async def feed(pieces: list[str]) -> AsyncIterator[Chunk]:
    for i, piece in enumerate(pieces):
        yield Chunk(content=piece, finish_reason="stop" if i == len(pieces) - 1 else None)


async def split(pieces: list[str]) -> tuple[str, str]:
    reasoning = content = ""
    async for chunk in split_think_tags(feed(pieces)):
        reasoning += chunk.reasoning
        content += chunk.content
    return reasoning, content


TEXT = "<think>Let me see. 2+2=4.</think>\n\nThe answer is 4."


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 100])
async def test_tags_split_at_any_chunk_size(size: int) -> None:
    pieces = [TEXT[i:i + size] for i in range(0, len(TEXT), size)]
    assert await split(pieces) == ("Let me see. 2+2=4.", "The answer is 4.")


async def test_text_without_a_leading_tag_is_untouched() -> None:
    assert await split(["The answer ", "is <think> 4."]) == ("", "The answer is <think> 4.")


async def test_a_short_answer_that_looks_like_a_tag_start_is_not_lost() -> None:
    assert await split(["<th"]) == ("", "<th")


async def test_an_unclosed_think_block_keeps_everything_as_reasoning() -> None:
    assert await split(["<think>still thinking", " when cut</"]) == (
        "still thinking when cut</", "")


async def test_text_flows_while_thinking() -> None:
    chunks = [c async for c in split_think_tags(feed(["<think>abc", "def", "</think>x"]))]
    assert [c.reasoning for c in chunks] == ["abc", "def", ""]
    assert chunks[-1].content == "x"
