"""Reasoning models that write their thoughts into the text (``<think>…</think>``, as
DeepSeek-R1 distills and QwQ do on MLX or llama.cpp) get them moved to ``Chunk.reasoning``,
so every backend's reasoning reaches clients the same way. The backends' stream translators
run every chunk through a ``ThinkTagSplitter``; each door shows reasoning to its client
through a ``ReasoningView``.
"""

from __future__ import annotations

from gateway.config import ReasoningMode
from gateway.protocol.units import Chunk, Completion

OPEN, CLOSE = "<think>", "</think>"


class ThinkTagSplitter:
    """Moves a leading ``<think>…</think>`` block from content to reasoning, chunk by chunk.

    Holds back only what could still be the start of a tag, so text keeps flowing.
    States: start → thinking → after (blank lines after the tag) → answer, or start → answer.
    """

    __slots__ = ("_pending", "_state")

    def __init__(self) -> None:
        self._state = "start"
        self._pending = ""

    def feed(self, chunk: Chunk) -> Chunk:
        if self._state == "answer" or not (chunk.content or self._pending):
            return chunk
        text = self._pending + chunk.content
        self._pending = ""
        chunk.content = ""
        if self._state == "start":
            head = text.lstrip()
            if head.startswith(OPEN):
                self._state, text = "thinking", head[len(OPEN):]
            elif OPEN.startswith(head) and chunk.finish_reason is None:
                self._pending = text  # could still become "<think>"
                return chunk
            else:
                self._state = "answer"
                chunk.content = text
                return chunk
        if self._state == "thinking":
            end = text.find(CLOSE)
            if end < 0:
                keep = 0 if chunk.finish_reason is not None else _partial_suffix(text, CLOSE)
                chunk.reasoning += text[: len(text) - keep]
                self._pending = text[len(text) - keep:]
                return chunk
            chunk.reasoning += text[:end]
            text = text[end + len(CLOSE):]
            self._state = "after"
        # "after": the blank lines a model puts after </think> are not part of its answer.
        chunk.content = text.lstrip()
        if chunk.content:
            self._state = "answer"
        return chunk


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ReasoningView:
    """How one client sees a model's reasoning (``[server] reasoning``): in its door's own
    reasoning field ("separate"), inline in the text between ``<think>`` tags for clients
    that read only text ("inline"), or not at all ("drop").
    """

    __slots__ = ("_mode", "_thinking")

    def __init__(self, mode: ReasoningMode) -> None:
        self._mode = mode
        self._thinking = False  # inline: inside an open <think> tag

    def split(self, chunk: Chunk) -> tuple[str, str]:
        """The reasoning for the door's own field, and the text, of one streamed chunk."""
        if self._mode != "inline":
            return (chunk.reasoning if self._mode == "separate" else ""), chunk.content
        text = ""
        if chunk.reasoning:
            text = chunk.reasoning if self._thinking else OPEN + chunk.reasoning
            self._thinking = True
        if self._thinking and (chunk.content or chunk.finish_reason or chunk.tool_calls):
            text += CLOSE
            self._thinking = False
        return "", text + chunk.content

    def whole(self, completion: Completion) -> tuple[str, str]:
        """The reasoning for the door's own field, and the text, of a whole answer."""
        if self._mode == "inline" and completion.reasoning:
            return "", f"{OPEN}{completion.reasoning}{CLOSE}{completion.content}"
        return (completion.reasoning if self._mode == "separate" else ""), completion.content
