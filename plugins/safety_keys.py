"""Private keys (PEM blocks) in text: where one begins and ends, whole or still arriving.

A key is a BEGIN line, lines of base64 (and PEM's header lines: ``Proc-Type``, ``DEK-Info``,
``Comment``) and an END line; or all of that on one line, with spaces or JSON's escaped
newlines between (as in a tool call's arguments). A body is read line by line, never by a
pattern that could backtrack, so reading is linear in the text; and a stream's reader can go
on from the last whole line instead of reading the key again from its start.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal, NamedTuple

BEGIN = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----")
# A header not yet whole, at the end of what has arrived (none is longer than this).
OPEN_HEADER = re.compile(r"-----BEGIN(?: (?:[A-Z0-9]+ )*[A-Z0-9]*)?-{0,4}")
HEADER_MAX = 64
_END = re.compile(r"[ \t]*-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_LINE = re.compile(  # a line of a body: base64, or one of PEM's header lines (bounded, and
    # possessive: a line of spaces that goes wrong at its end is not tried again and again)
    r"[ \t]{0,64}+(?:[A-Za-z0-9+/]{1,200}+=*|(?:Proc-Type|DEK-Info|Comment): [^\n]{0,200})?"
    r"[ \t\r]{0,64}+")
_DATA = re.compile(r"[A-Za-z0-9+/]{16}")  # a line of key material, not a stray word
_END_LINE = re.compile(r"-----END [A-Z0-9 ]*-{0,5}")
_LINE_STARTS = ("-----END", "Proc-Type: ", "DEK-Info: ", "Comment: ")

# All on one line, whole; and (for what is still arriving) the rest of a line that may yet
# become that.
_ONE_LINE = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----"
                       r"(?:[ \t]|\\[nrt])(?:[A-Za-z0-9+/= \t]|\\[nrt]){16,}?-----END \1-----")
_ONE_LINE_OPEN = re.compile(r"(?:[A-Za-z0-9+/= \t]|\\[nrt]|\\\Z)*+(?:-[-A-Z0-9 ]*)?")
ONE_LINE_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
NOT_ONE_LINE = re.compile(r"[^A-Za-z0-9+/= \t\\-]")  # a character no key on one line has

How = Literal["closed", "broken", "open"]


class Block(NamedTuple):
    """A key found from its BEGIN line."""

    end: int  # after its END line (closed), before what cannot be part of it (broken), or
    #           the end of the text (open: the text ran out inside it and more may come)
    how: How
    resume: int | None = None  # open, on several lines: where reading may go on from
    one_line: bool = False


def body(text: str, pos: int) -> Block:
    """A key's body read from ``pos``, the start of one of its lines."""
    while True:
        newline = text.find("\n", pos)
        end = len(text) if newline < 0 else newline
        closing = _END.match(text, pos, end)
        if closing:
            return Block(closing.end(), "closed")
        if newline < 0:  # the last line, perhaps not whole yet
            whole = _LINE.fullmatch(text, pos) or _may_go_on(text[pos:])
            return Block(len(text), "open", pos) if whole else Block(pos, "broken")
        if not _LINE.fullmatch(text, pos, end):
            return Block(pos, "broken")
        pos = newline + 1


def _may_go_on(line: str) -> bool:
    """Whether a line not yet whole may become one of a key's: its END line or a header."""
    stripped = line.strip()
    if not stripped:
        return len(line) <= 128  # (white space, but not without end)
    return any(start.startswith(stripped) for start in _LINE_STARTS) or \
        _END_LINE.fullmatch(stripped) is not None


def block(text: str, begin: re.Match[str], resume: int | None = None) -> Block:
    """The key that ``begin`` (a match of ``BEGIN``) starts; ``resume`` goes on reading an
    open one from where an earlier read of the same text, shorter then, stopped.
    """
    if resume is not None:
        return body(text, resume)
    newline = text.find("\n", begin.end())
    stop = len(text) if newline < 0 else newline
    if text[begin.end():stop].strip():  # the header line goes on: a key on one line, or prose
        whole = _ONE_LINE.match(text, begin.start())
        if whole:
            return Block(whole.end(), "closed", one_line=True)
        if newline < 0 and _ONE_LINE_OPEN.fullmatch(text, begin.end()):
            return Block(len(text), "open", one_line=True)
        return Block(begin.end(), "broken")
    if newline < 0:
        return Block(len(text), "open")
    return body(text, newline + 1)


def keys(text: str) -> Iterator[tuple[int, int]]:
    """The private keys in a text, as spans. A BEGIN line alone (as in a text about PEM
    files) is not one: a key is closed by its END line or holds key material.
    """
    pos = 0
    while (begin := BEGIN.search(text, pos)) is not None:
        found = block(text, begin)
        if found.how == "closed" or _DATA.search(text, begin.end(), found.end):
            yield begin.start(), found.end
        pos = max(found.end, begin.end())
