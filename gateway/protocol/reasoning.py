"""Reasoning models that write their thoughts into the text (``<think>…</think>``, as
DeepSeek-R1 distills and QwQ do on MLX or llama.cpp) get them moved to ``Chunk.reasoning``,
so every backend's reasoning reaches clients the same way.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

from gateway.backends.base import Chunk

OPEN, CLOSE = "<think>", "</think>"


async def split_think_tags(chunks: AsyncIterator[Chunk]) -> AsyncGenerator[Chunk]:
    """Move a leading ``<think>…</think>`` block from content to reasoning.

    Holds back only what could still be the start of a tag, so text keeps flowing.
    """
    state = "start"  # start → thinking → after → answer; or start → answer
    pending = ""
    async for chunk in chunks:
        if state == "after" and chunk.content:
            # The blank lines a model puts after </think> are not part of its answer.
            chunk.content = chunk.content.lstrip()
            if chunk.content:
                state = "answer"
        if state in ("answer", "after") or not chunk.content:
            if chunk.finish_reason is not None and pending:
                chunk = _flush(chunk, pending, state)
                pending = ""
            yield chunk
            continue
        text = pending + chunk.content
        pending = ""
        if state == "start":
            head = text.lstrip()
            if head.startswith(OPEN):
                state, text = "thinking", head[len(OPEN):]
            elif OPEN.startswith(head):
                pending = text  # could still become "<think>"
                chunk.content = ""
                if chunk.finish_reason is not None:
                    chunk, pending = _flush(chunk, pending, state), ""
                yield chunk
                continue
            else:
                state = "answer"
                chunk.content = text
                yield chunk
                continue
        # state == "thinking"
        end = text.find(CLOSE)
        if end >= 0:
            chunk.reasoning += text[:end]
            chunk.content = text[end + len(CLOSE):].lstrip()
            state = "answer" if chunk.content else "after"
        else:
            keep = _partial_suffix(text, CLOSE)
            chunk.reasoning += text[: len(text) - keep]
            pending = text[len(text) - keep:]
            chunk.content = ""
            if chunk.finish_reason is not None and pending:
                chunk, pending = _flush(chunk, pending, state), ""
        yield chunk


def _flush(chunk: Chunk, pending: str, state: str) -> Chunk:
    if state == "thinking":
        chunk.reasoning += pending
    else:
        chunk.content = pending + chunk.content
    return chunk


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
