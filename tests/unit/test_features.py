"""The clues a prompt's kind is read from are found as they were when each was looked for on
its own (the reference below): every word where it stands alone, every phrase anywhere, a
line that starts as code does.
"""

from __future__ import annotations

import random
import re
import string

import pytest

from gateway.routing import features
from gateway.routing.features import kind_of

CODE_LINE = re.compile(r"^[ \t]*(?:def |class |import |from \S+ import|function |const |"
                       r"let |#include|public |select |fn |package |func )", re.MULTILINE)


def has_word(text: str, words: frozenset[str] | tuple[str, ...]) -> bool:
    for word in words:
        start = text.find(word)
        while start >= 0:
            end = start + len(word)
            if (start == 0 or text[start - 1] in string.punctuation or
                    text[start - 1].isspace()) and \
                    (end == len(text) or text[end] in string.punctuation or text[end].isspace()):
                return True
            start = text.find(word, start + 1)
    return False


def reference(text: str, json: bool) -> tuple[str, bool, bool]:
    head, tail = features.HEAD, features.TAIL
    clues = (text if len(text) <= head + tail else f"{text[:head]}\n{text[-tail:]}").lower()
    phrases = {kind for phrase, kind in features._PHRASES.items() if phrase in clues}
    json = json or has_word(clues, ("json",))
    code = "```" in clues or "code" in phrases or has_word(clues, features._CODE_WORDS) or \
        CODE_LINE.search(clues) is not None
    reason = "reason" in phrases or has_word(clues, features._REASON_WORDS) or \
        features._ARITHMETIC.search(clues[-tail:]) is not None
    return features._kind(len(text), code=code, json=json, reason=reason), json, code


PIECES = [*features._CODE_WORDS, *features._REASON_WORDS, *features._PHRASES, "json", "JSON",
          "decode", "bugs", "rusty", "why?", "(sql)", "code.py", "re-solve", "jsonl",
          "def f():", "  class A:", "\tfrom x import y", "from  x import y", "import os",
          "#include <x>", "select *", "let x = 1", "2 + 2", "3*4", "x = 5", "```",
          "stack\ntrace", "step by", "ﬁle", "İ", "word", "the", "a", ",", ".", ":", "-", "\n",
          "\n\n", " ", "  ", "\t", "ünïcödé", "日本語"]


@pytest.mark.parametrize("seed", range(300))
def test_clues_are_read_as_when_each_was_looked_for_alone(seed: int) -> None:
    rng = random.Random(seed)
    glue = rng.choice(["", " ", "\n", ", ", "-"])
    text = glue.join(rng.choice(PIECES) for _ in range(rng.randrange(1, 40)))
    if seed % 10 == 0:  # longer than what is read of it: its head and tail
        text = text + " filler" * rng.randrange(300, 600) + text
    json = seed % 7 == 0
    assert features._read(text, json) == reference(text, json)


def test_the_workload_kinds_still_read_as_before() -> None:
    assert kind_of("Write a Python function that parses a date") == "code"
    assert kind_of("Why is the sky blue? Explain step by step.") == "reason"
    assert kind_of("Return the names as JSON") == "extract"
    assert kind_of("Tell me about your day") == "chat"
    assert kind_of("  from os import path\nprint(path)") == "code"
    assert kind_of("what is 12 * 7") == "reason"
