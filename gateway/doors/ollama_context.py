"""The ``context`` of Ollama's ``/api/generate``: what an answer carries for the client to
send back with its next prompt, so that the turn has the ones before it. Ollama's own is the
model's tokens; the gateway asks no backend for those, so its context is the conversation
itself, its JSON packed three bytes a number after a mark, which a later request unpacks
into the turns before its own (one from Ollama itself reads as none).
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import InvalidRequest
from gateway.protocol.openai import text_of

CONTEXT_MARK = 0x6777  # a context's first number, when the gateway made it
# The most numbers a context may hold (768 KiB of conversation, more than a 128k-token
# window's): unpacking one is work on the event loop.
CONTEXT_MAX = 1 << 18
CONTEXT_BYTES = (CONTEXT_MAX - 2) * 3  # the conversation a context made here holds at most
CONTEXT_ROLES = frozenset({"system", "user", "assistant"})


def context_of(turns: list[dict[str, str]]) -> list[int]:
    """A conversation as a generate answer's ``context``: its JSON, three bytes a number,
    after the mark and the JSON's length."""
    data = orjson.dumps(turns)
    while len(data) > CONTEXT_BYTES and len(turns) > 2:  # (the oldest turns go first, as
        turns = turns[1:]  # a window that fills forgets them)
        data = orjson.dumps(turns)
    size = len(data)
    data += b"\0" * (-size % 3)
    return [CONTEXT_MARK, size, *(int.from_bytes(data[i:i + 3], "big")
                                  for i in range(0, len(data), 3))]


def history_of(context: Any) -> list[dict[str, str]]:
    """The turns a ``context`` the gateway made holds; none for any other (one from Ollama
    itself, its tokens, cannot be read without its model).
    """
    if not isinstance(context, list) or len(context) < 2 or context[0] != CONTEXT_MARK:
        return []
    if len(context) > CONTEXT_MAX:
        raise InvalidRequest("context is longer than this gateway keeps a conversation in one; "
                             "send the conversation as /api/chat messages", code="invalid_value")
    if not all(isinstance(n, int) and 0 <= n < 1 << 24 for n in context[1:]):
        return []
    raw = b"".join(n.to_bytes(3, "big") for n in context[2:])[:context[1]]
    try:
        turns = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(turns, list) or not all(
            isinstance(t, dict) and t.get("role") in CONTEXT_ROLES and
            isinstance(t.get("content"), str) for t in turns):
        return []
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def turns_of(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """A chat turn's messages as a context keeps them: their roles and texts."""
    return [{"role": m["role"], "content": text_of(m.get("content"))} for m in messages
            if m["role"] in CONTEXT_ROLES]
