"""What a request looks like to the learned router: a few features read off it cheaply (its
length, turns, code, script, tools, images, whether JSON is asked for) and a guess at its
kind of task, as a small vector of numbers.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Any

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
_SPACES = str.maketrans({c: " " for c in string.punctuation})

# The vector: a bias, then each feature scaled to about 0..1.
NAMES = ("bias", "length", "turns", "code", "script", "tools", "images", "json",
         "kind:chat", "kind:code", "kind:extract", "kind:reason", "kind:long")
DIMENSIONS = len(NAMES)


@dataclass(frozen=True, slots=True)
class Features:
    chars: int
    turns: int
    code: bool
    script: str  # "latin", or "other" when most letters are of another script
    tools: bool
    images: bool
    json: bool
    kind: str

    def vector(self) -> list[float]:
        return [1.0, round(min(1.0, math.log1p(self.chars) / 12), 2), min(self.turns, 16) / 16,
                float(self.code), float(self.script != "latin"), float(self.tools),
                float(self.images), float(self.json), float(self.kind == "chat"),
                float(self.kind == "code"), float(self.kind == "extract"),
                float(self.kind == "reason"), float(self.kind == "long")]

    def as_dict(self) -> dict[str, Any]:
        return {"chars": self.chars, "turns": self.turns, "code": self.code,
                "script": self.script, "tools": self.tools, "images": self.images,
                "json": self.json, "kind": self.kind}


def features_of(req: ChatRequest | CompletionRequest) -> Features:
    if isinstance(req, CompletionRequest):
        text, turns, tools, images = req.prompt, 1, False, False
        json = False
    else:
        text = "\n".join(text_of(m.get("content")) for m in req.messages)
        turns = sum(1 for m in req.messages if m.get("role") in ("user", "assistant"))
        tools = bool(req.tools and req.tool_choice != "none")
        images = any(isinstance(m.get("content"), list) and
                     any(p.get("type") == "image_url" for p in m["content"])
                     for m in req.messages)
        kind = (req.response_format or {}).get("type")
        json = kind in ("json_object", "json_schema")
    kind, json, code = _read(text, json)
    return Features(chars=len(text), turns=turns, code=code, script=_script(text),
                    tools=tools, images=images, json=json, kind=kind)


def kind_of(text: str, json: bool = False) -> str:
    """The kind of task a prompt's text looks like (``json``: JSON output was asked for)."""
    return _read(text, json)[0]


def _read(text: str, json: bool) -> tuple[str, bool, bool]:
    """The kind, whether JSON is asked for, whether code is involved."""
    clues = (text if len(text) <= HEAD + TAIL else f"{text[:HEAD]}\n{text[-TAIL:]}").lower()
    words = set(clues.translate(_SPACES).split())
    phrases = {kind for phrase, kind in _PHRASES.items() if phrase in clues}
    json = json or "json" in words
    code = "```" in clues or not words.isdisjoint(_CODE_WORDS) or "code" in phrases or \
        _CODE_LINE.search(clues) is not None
    reason = not words.isdisjoint(_REASON_WORDS) or "reason" in phrases or \
        _ARITHMETIC.search(clues[-TAIL:]) is not None
    return _kind(len(text), code=code, json=json, reason=reason), json, code


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
