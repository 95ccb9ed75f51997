"""What a request looks like to the learned router: a few features read off it cheaply (its
length, turns, code, script, tools, images, whether JSON is asked for) and a guess at its
kind of task, as a small vector of numbers.
"""

from __future__ import annotations

import math
import re
import string
from typing import Any, NamedTuple

import ahocorasick

from gateway.protocol.openai import ChatRequest, CompletionRequest, text_of

# Kinds of task, guessed from the request ("chat" when nothing else fits).
KINDS = ("chat", "code", "extract", "reason", "long")
LONG_CHARS = 6000  # a prompt this long is mostly context to read (summaries, documents)
SCRIPT_SAMPLE = 2000  # characters looked at for the script
HEAD, TAIL = 1500, 500  # of a longer prompt, only its start and end are read for clues

# Clues: words and phrases (found together, in one pass over the prompt), lines that start as
# code does, and arithmetic.
_CODE_WORDS = frozenset(("code", "function", "compile", "compiler", "compiled", "bug",
                         "stacktrace", "regex", "refactor", "python", "javascript",
                         "typescript", "rust", "golang", "java", "sql", "bash"))
_REASON_WORDS = frozenset(("prove", "proof", "why", "solve", "calculate", "compute",
                           "derive", "reason", "puzzle", "equation", "probability"))
_PHRASES = {"stack trace": "code", "step by step": "reason", "how many": "reason"}
# Lines that start as code does (after spaces and tabs).
_CODE_STARTS = ("def ", "class ", "import ", "function ", "const ", "let ", "#include",
                "public ", "select ", "fn ", "package ", "func ")
_FROM_IMPORT = re.compile(r"from \S+ import")
_ARITHMETIC = re.compile(r"\d\s*[-+*/^=]\s*\d")
_EDGE = frozenset(string.punctuation)  # (with spaces) where a word starts and ends


def _clue_automaton() -> ahocorasick.Automaton:
    """Every clue word and phrase, found in one pass over a prompt: each with what it is a
    clue of, and whether it counts only as a word of its own (a phrase counts anywhere).
    """
    automaton = ahocorasick.Automaton()
    for words, kind in ((_CODE_WORDS, "code"), (_REASON_WORDS, "reason"), (("json",), "json")):
        for word in words:
            automaton.add_word(word, (len(word), kind, True))
    for phrase, kind in _PHRASES.items():
        automaton.add_word(phrase, (len(phrase), kind, False))
    automaton.make_automaton()
    return automaton


_CLUES = _clue_automaton()

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
    found = _clues_in(clues)
    json = json or "json" in found
    code = "code" in found or "```" in clues or _code_line(clues)
    reason = "reason" in found or _ARITHMETIC.search(clues[-TAIL:]) is not None
    return _kind(len(text), code=code, json=json, reason=reason), json, code


def _clues_in(text: str) -> set[str]:
    """What the clue words and phrases in ``text`` are clues of. A word counts where it
    stands between the text's start or end, spaces and ASCII punctuation (every place it
    occurs is looked at: the automaton finds them all, in one pass).
    """
    found = set()
    for last, (size, kind, whole_word) in _CLUES.iter(text):
        if kind in found:
            continue
        start, end = last + 1 - size, last + 1
        if not whole_word or (
                (start == 0 or text[start - 1] in _EDGE or text[start - 1].isspace()) and
                (end == len(text) or text[end] in _EDGE or text[end].isspace())):
            found.add(kind)
    return found


def _code_line(text: str) -> bool:
    """Whether a line of ``text`` starts as code does (after spaces and tabs)."""
    for line in text.split("\n"):
        line = line.lstrip(" \t")
        if line.startswith(_CODE_STARTS) or (line.startswith("from ") and
                                              _FROM_IMPORT.match(line) is not None):
            return True
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
