"""What a request looks like to the learned router: a few features read off it cheaply (its
length, turns, code, script, tools, images, whether JSON is asked for) and a guess at its
kind of task, as a small vector of numbers.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable
from typing import Any, NamedTuple

from gateway.protocol.openai import ChatRequest, CompletionRequest, text_of

# Kinds of task, guessed from the request ("chat" when nothing else fits).
KINDS = ("chat", "code", "extract", "reason", "long")
LONG_CHARS = 6000  # a prompt this long is mostly context to read (summaries, documents)
SCRIPT_SAMPLE = 2000  # characters looked at for the script
HEAD, TAIL = 1500, 500  # of a longer prompt, only its start and end are read for clues

# Clues: words (looked up in a set of the prompt's words: one pass over its text), phrases,
# lines that start as code does, and arithmetic.
_CODE_WORDS = frozenset(("code", "function", "compile", "compiler", "compiled", "bug",
                         "stacktrace", "regex", "refactor", "python", "javascript",
                         "typescript", "rust", "golang", "java", "sql", "bash"))
_REASON_WORDS = frozenset(("prove", "proof", "why", "solve", "calculate", "compute",
                           "derive", "reason", "puzzle", "equation", "probability"))
_PHRASES = {"stack trace": "code", "step by step": "reason", "how many": "reason"}
_CODE_LINE = re.compile(r"^[ \t]*(?:def |class |import |from \S+ import|function |const |"
                        r"let |#include|public |select |fn |package |func )", re.MULTILINE)
_ARITHMETIC = re.compile(r"\d\s*[-+*/^=]\s*\d")
_EDGE = frozenset(string.punctuation)  # (with spaces) where a word starts and ends

# The vector: a bias, then each feature scaled to about 0..1.
NAMES = ("bias", "length", "turns", "code", "script", "tools", "images", "json",
         "kind:chat", "kind:code", "kind:extract", "kind:reason", "kind:long")
DIMENSIONS = len(NAMES)
LENGTH, TURNS = NAMES.index("length"), NAMES.index("turns")  # the two graded features;
FLAGS = NAMES.index("code")  # from here on, each feature is 0 or 1
_ONE_HOT = {kind: tuple(1.0 if other == kind else 0.0 for other in KINDS) for kind in KINDS}


class Features(NamedTuple):
    chars: int
    turns: int
    code: bool
    script: str  # "latin", or "other" when most letters are of another script
    tools: bool
    images: bool
    json: bool
    kind: str

    def vector(self) -> tuple[float, ...]:
        """The features as the policy's vector (a tuple: kept with the outcome, it is no
        work for the garbage collector's passes).
        """
        chars, turns, code, script, tools, images, json, kind = self
        length = min(100, int(math.log1p(chars) * (100 / 12) + 0.5)) / 100  # 0.01 steps
        return (1.0, length, min(turns, 16) / 16, 1.0 if code else 0.0,
                0.0 if script == "latin" else 1.0, 1.0 if tools else 0.0,
                1.0 if images else 0.0, 1.0 if json else 0.0, *_ONE_HOT[kind])

    def as_dict(self) -> dict[str, Any]:
        return {"chars": self.chars, "turns": self.turns, "code": self.code,
                "script": self.script, "tools": self.tools, "images": self.images,
                "json": self.json, "kind": self.kind}


def features_of(req: ChatRequest | CompletionRequest) -> Features:
    """A request's features (one pass over its messages)."""
    if isinstance(req, CompletionRequest):
        text, turns, tools, images, json = req.prompt, 1, False, False, False
    else:
        texts = []
        turns = 0
        images = False
        for message in req.messages:
            content = message.get("content")
            texts.append(text_of(content))
            if message.get("role") in ("user", "assistant"):
                turns += 1
            if isinstance(content, list) and not images:
                images = any(part.get("type") == "image_url" for part in content)
        text = texts[0] if len(texts) == 1 else "\n".join(texts)
        tools = bool(req.tools and req.tool_choice != "none")
        json = (req.response_format or {}).get("type") in ("json_object", "json_schema")
    kind, json, code = _read(text, json)
    return Features(len(text), turns, code, _script(text), tools, images, json, kind)


def kind_of(text: str, json: bool = False) -> str:
    """The kind of task a prompt's text looks like (``json``: JSON output was asked for)."""
    return _read(text, json)[0]


def _read(text: str, json: bool) -> tuple[str, bool, bool]:
    """The kind, whether JSON is asked for, whether code is involved."""
    clues = (text if len(text) <= HEAD + TAIL else f"{text[:HEAD]}\n{text[-TAIL:]}").lower()
    phrases = {kind for phrase, kind in _PHRASES.items() if phrase in clues}
    json = json or _has_word(clues, ("json",))
    code = "```" in clues or "code" in phrases or _has_word(clues, _CODE_WORDS) or \
        _CODE_LINE.search(clues) is not None
    reason = "reason" in phrases or _has_word(clues, _REASON_WORDS) or \
        _ARITHMETIC.search(clues[-TAIL:]) is not None
    return _kind(len(text), code=code, json=json, reason=reason), json, code


def _has_word(text: str, words: Iterable[str]) -> bool:
    """Whether one of ``words`` is a word of ``text`` (between its start or end, spaces and
    ASCII punctuation): each found by the string's own search, then its edges looked at,
    which for a prompt's few thousand characters is much cheaper than listing its words.
    """
    for word in words:
        start = text.find(word)
        while start >= 0:
            end = start + len(word)
            if (start == 0 or text[start - 1] in _EDGE or text[start - 1].isspace()) and \
                    (end == len(text) or text[end] in _EDGE or text[end].isspace()):
                return True
            start = text.find(word, start + 1)
    return False


def _kind(chars: int, *, code: bool, json: bool, reason: bool) -> str:
    if json:
        return "extract"
    if code:
        return "code"
    if chars >= LONG_CHARS:
        return "long"
    return "reason" if reason else "chat"


def _script(text: str) -> str:
    sample = text[:SCRIPT_SAMPLE]
    if sample.isascii():
        return "latin"
    letters = [c for c in sample if c.isalpha()]
    other = sum(1 for c in letters if ord(c) > 0x24F)  # beyond Latin Extended-B
    return "other" if letters and other * 2 > len(letters) else "latin"
