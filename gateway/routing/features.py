"""What a request looks like to the learned router: a few features read off it cheaply (its
length, turns, code, script, tools, images, whether JSON is asked for) and a guess at its
kind of task, as a small vector of numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.protocol.openai import ChatRequest, CompletionRequest, text_of

# Kinds of task, guessed from the request ("chat" when nothing else fits).
KINDS = ("chat", "code", "extract", "reason", "long")
LONG_CHARS = 6000  # a prompt this long is mostly context to read (summaries, documents)
SCRIPT_SAMPLE = 2000  # characters looked at for the script

_CODE = re.compile(
    r"```|^\s*(def |class |import |from \S+ import|function |const |let |#include|public |"
    r"SELECT |fn |package |func )|\b(code|function|compile[rd]?|bug|stack ?trace|regex|"
    r"refactor|python|javascript|typescript|rust|golang|java|sql|bash)\b",
    re.IGNORECASE | re.MULTILINE)
_JSON = re.compile(r"\bjson\b", re.IGNORECASE)
_REASON = re.compile(
    r"\b(prove|proof|why|step by step|solve|calculate|compute|how many|derive|reason|"
    r"puzzle|equation|probability)\b|\d\s*[-+*/^=]\s*\d", re.IGNORECASE)

# The vector: a bias, then each feature scaled to about 0..1.
NAMES = ("bias", "length", "turns", "code", "script", "tools", "images", "json",
         "kind:code", "kind:extract", "kind:reason", "kind:long")
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

    def vector(self) -> np.ndarray:
        return np.array((
            1.0, min(1.0, math.log1p(self.chars) / 12), min(self.turns, 16) / 16,
            float(self.code), float(self.script != "latin"), float(self.tools),
            float(self.images), float(self.json), float(self.kind == "code"),
            float(self.kind == "extract"), float(self.kind == "reason"),
            float(self.kind == "long")))

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
    json = json or _JSON.search(text) is not None
    code = _CODE.search(text) is not None
    return Features(chars=len(text), turns=turns, code=code, script=_script(text),
                    tools=tools, images=images, json=json,
                    kind=_kind(text, code=code, json=json))


def _kind(text: str, *, code: bool, json: bool) -> str:
    if json:
        return "extract"
    if code:
        return "code"
    if len(text) >= LONG_CHARS:
        return "long"
    if _REASON.search(text):
        return "reason"
    return "chat"


def _script(text: str) -> str:
    sample = text[:SCRIPT_SAMPLE]
    if sample.isascii():
        return "latin"
    letters = [c for c in sample if c.isalpha()]
    other = sum(1 for c in letters if ord(c) > 0x24F)  # beyond Latin Extended-B
    return "other" if letters and other * 2 > len(letters) else "latin"
