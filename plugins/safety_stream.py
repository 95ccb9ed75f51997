"""Secrets redacted from a stream of text as it passes, holding back as little as it can.

Text leaves as soon as it cannot be part of a secret. What is held back: a run of text
(no white space) from where a secret may begin (a key's prefix such as ``sk-`` at the start
of a word, ``eyJ``, ``://``, or the start of one of those at the very end), a ``Bearer``
word and what follows it, a credential's name (``password``, ``API_KEY``) until its value
is whole (if that rule is on), and an open private-key block. Released text is read by the
same rules as a request, with the character released before it as context, so the stream
says what redacting the whole answer at once would say; text is never released that ends
inside a credential's value.

Bounds: a run is held up to ``MAX_RUN`` characters, a credential's value up to
``VALUE_HOLD`` and a private key up to ``max_block``. A longer value the rule takes for a
credential is redacted from its start and the rest of it dropped as it arrives, up to where
the whole text's value would end.
Past that, a run shaped like a secret (a key's prefix or a bearer token, then only token
characters) or one a rule finds still going on is redacted there and the rest of it is
dropped as it arrives; any other run is let go, but for its last few characters. Each
piece costs time in proportion to itself and to what is held, never to the whole answer.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable

from plugins.safety_credentials import (
    VALUE_HOLD,
    held_value,
    may_hold,
    open_at_end,
    quote_of,
    value_rest,
)
from plugins.safety_keys import (
    BEGIN,
    HEADER_MAX,
    NOT_ONE_LINE,
    ONE_LINE_END,
    OPEN_HEADER,
    block,
    body,
)
from plugins.safety_rules import Rule, Text, anchors_in

MAX_RUN = 4096  # the most of a run without white space held back as a possible secret
TAIL = 64  # what is kept of a run let go: enough for the start of any secret

# How secrets begin. A key's prefix must start a word, as its rule says.
_KEY_MARKERS = ("sk-", "sk_live_", "rk_live_", "akia", "asia", "ghp_", "gho_", "ghu_", "ghs_",
                "ghr_", "github_pat_", "xox", "aiza", "hf_", "glpat-", "npm_", "sg.", "ya29.",
                "hooks.slack.com")
_OTHER_MARKERS = ("bearer", "eyj", "://", "-----begin")
_MARKER = re.compile(
    r"(?<![A-Za-z0-9_-])(?:" + "|".join(map(re.escape, _KEY_MARKERS)) + ")|"
    + "|".join(map(re.escape, _OTHER_MARKERS)), re.IGNORECASE)
# The beginnings of markers (lower case), and whether they must start a word.
_PARTIAL = {marker[:k]: marker in _KEY_MARKERS
            for marker in _OTHER_MARKERS + _KEY_MARKERS for k in range(len(marker) - 1, 0, -1)}
_LONGEST = max(map(len, _PARTIAL))
# Where one of those may start: a character whose lower case begins a marker.
_FIRST = re.compile("[" + "".join(sorted({re.escape(c) for m in _KEY_MARKERS + _OTHER_MARKERS
                                          for c in (m[0], m[0].upper())})) + "]")
_SHAPED = re.compile(r"(?:bearer\s+)?[A-Za-z0-9._~+/=-]*", re.IGNORECASE)  # a secret's shape
_NOT_TOKEN = re.compile(r"[^A-Za-z0-9._~+/=-]")
_URL_DONE = re.compile(r"[/@]")  # past the part of a URL a password may be in
_SPACE = re.compile(r"[ \n\t\r\f\v]")

# What reads the rest of a secret too long to hold as it arrives: how much of the text is
# still part of it, and whether it has ended there.
Reader = Callable[[str], tuple[int, bool]]
# A secret found where the text is cut: its rule, how much of the text from the cut it
# takes, and what reads the rest of it.
Secret = tuple[str, int, Reader | None]


class StreamRedactor:
    """Text in, text out with secrets replaced; holds back only what may yet become one."""

    def __init__(self, rules: list[Rule], max_block: int,
                 hint: frozenset[str] | None = None) -> None:
        self.rules = rules
        self.hint = hint_of(rules) if hint is None else hint  # (the rules': see hint_of)
        # Credentials given by name are held, if their rule is on
        self.credentials = any(rule.name == "credential" for rule in rules)
        self.max_block = max_block
        self.pending = ""  # held back
        self.offset = 0  # where in the answer what is held starts
        self.live_from = 0  # where in the answer a credential may start (those before, found
        # too long to be one, are not read again at each piece)
        self.context = ""  # the last character released
        self.reading: Reader | None = None  # inside a secret too long to hold: dropping it
        self.resume: int | None = None  # where the open key at the start of pending goes on
        self.found = collections.Counter[str]()

    def feed(self, text: str) -> str:
        self.pending += text
        out = []
        while True:
            if self.reading is not None:
                end, ended = self.reading(self.pending)
                self.pending = self.pending[end:]
                self.offset += end
                if not ended:
                    break
                self.reading = None
            cut, secret = self._cut(self.pending)
            released, self.pending = self.pending[:cut], self.pending[cut:]
            self.offset += cut
            out.append(self._redact(released))
            if secret is None:
                break
            rule, taken, self.reading = secret
            out.append(f"[REDACTED:{rule}]")
            self.found[rule] += 1
            self.pending, self.context, self.resume = self.pending[taken:], "]", None
            self.offset += taken
        return "".join(out)

    def flush(self) -> str:
        held, self.pending, self.resume = self.pending, "", None
        self.offset += len(held)
        if self.reading is not None:  # the stream ended inside a secret too long to hold
            self.reading = None
            return ""
        return self._redact(held)

    def _cut(self, text: str) -> tuple[int, Secret | None]:
        """Where the text may be cut: before anything that may still grow into a secret;
        and a secret too long to hold that starts there, if that is what was found.
        """
        whole_key = (0, 0)  # the last private key, whole: never cut inside
        resume, self.resume = self.resume, None
        begin = text.rfind("-----BEGIN")
        if begin >= 0:
            header = BEGIN.match(text, begin)
            if header is None:
                if len(text) - begin <= HEADER_MAX and OPEN_HEADER.fullmatch(text, begin):
                    return _hold_before(text, begin), None  # a header not yet whole
            else:
                found = block(text, header, resume if begin == 0 else None)
                if found.how == "open":
                    if len(text) - begin <= self.max_block:
                        if found.resume is not None:
                            self.resume = found.resume - begin
                        return _hold_before(text, begin), None
                    if found.one_line:
                        taken = max(header.end(), len(text) - TAIL) - begin
                        return begin, ("private_key", taken, _one_line_rest)
                    taken = (len(text) if found.resume is None else found.resume) - begin
                    return begin, ("private_key", taken, _key_rest)
                whole_key = (begin, found.end)
        run = _run_start(text, len(text))
        hold = _bearer_before(text, run)
        if hold is None:
            hold = _secret_start(text, run)
        if hold is None:
            cut = len(text)
        elif len(text) - hold > MAX_RUN:
            return self._too_long(text, hold)
        else:
            cut = hold
        cut = whole_key[1] if whole_key[0] <= cut < whole_key[1] else cut
        return self._outside_credentials(text, cut) if self.credentials else (cut, None)

    def _outside_credentials(self, text: str, cut: int) -> tuple[int, Secret | None]:
        """``cut``, or before it where a credential that may yet be given its value (or
        have it grow) starts: what is released never ends inside one (a value cut where
        a key's marker inside it is held, "q8W3eyJf...", was read as a value of its own);
        and one whose value runs past ``VALUE_HOLD``, redacted from its value's start.
        """
        for _ in range(3):
            named = self._credential(text[:cut])
            if named is None or named >= cut:
                return cut, None
            if cut == len(text) and len(text) - named > VALUE_HOLD:
                held = held_value(text, named)
                if held is None:  # (not one, however it goes on: read no more)
                    self.live_from = self.offset + named + 1
                    continue
                value, quote = held
                if len(text) - value > VALUE_HOLD:
                    reader = value_rest(quote)
                    end, ended = reader(text[value:])  # (it may have ended already)
                    return value, ("credential", end, None if ended else reader)
            cut = _hold_before(text, named)  # (and again: its name may be inside the value
            # of one open before it, "requirepass 9Xy_pass")
        return cut, None

    def _credential(self, text: str) -> int | None:
        """Where a credential that may yet be given its value starts in ``text``, what is
        held, read after the character released before it (the end of its name, perhaps).
        """
        if not may_hold(text):  # (most pieces: no word of one, nor the start of one)
            return None
        first = max(0, self.live_from - self.offset + len(self.context))
        named = open_at_end(self.context + text, first)
        return None if named is None else max(0, named - len(self.context))

    def _too_long(self, text: str, hold: int) -> tuple[int, Secret | None]:
        """A run held past ``MAX_RUN``: a secret still arriving is redacted where it starts
        and the rest of it dropped; anything else is let go but for its last characters.
        """
        start = max(0, hold - 1)  # with a character of context
        scan = Text(text[start:])
        spans = [(start + s, start + e, rule.name) for rule in self.rules
                 for s, e in rule.find(scan) if start + s >= hold]
        for s, e, rule in spans:
            if e == len(text):
                return s, (rule, e - s, _token_rest)
        if not text.startswith(("://", "-"), hold) and _SHAPED.fullmatch(text, hold):
            rule = "bearer_token" if text[hold] in "bBeE" else "api_key"
            return hold, (rule, len(text) - hold, _token_rest)
        # Let it go, but for its last few characters and a later secret that may have begun
        # and not yet grown enough for its rule to see it: a key or token whose characters
        # run to the end, or a URL whose password may yet come.
        cut = len(text) - TAIL
        for later in _MARKER.finditer(text, max(hold + 1, _token_run(text)), cut):
            if not text.startswith(("://", "-"), later.start()):
                cut = later.start()
                break
        url = text.rfind("://", hold + 1, cut)
        if url >= 0 and _URL_DONE.search(text, url + 3) is None:
            cut = url
        for s, e, _ in spans:
            if s < cut < e:
                cut = e
        # (nor between a credential's name and its value: held from its name, not from the
        # run's start, which is let go)
        named = self._credential(text[:cut]) if self.credentials else None
        return (named if named is not None and hold < named < cut else cut), None

    def _redact(self, text: str) -> str:
        """The released text with secrets replaced; the last character released before is
        read with it (not redacted, not returned): the context the rules' patterns look at.
        """
        if not text:
            return text
        context, self.context = self.context, text[-1]
        if self.hint and anchors_in(text).isdisjoint(self.hint):
            return text  # nothing any rule needs is there (most pieces of most answers)
        text = context + text
        scan = Text(text)
        for rule in self.rules:
            # (a match that would start at the context was ruled out when it was released)
            spans = [span for span in rule.find(scan) if span[0] >= len(context)]
            if spans:
                self.found[rule.name] += len(spans)
                if rule.name == "credential" and spans[-1][1] == len(text):
                    # A value that runs to the end of what is released (come in one piece
                    # longer than is held): the rest of it is dropped as it comes
                    quote = quote_of(text, spans[-1][0])
                    self.reading = value_rest(quote)
                text = redact(text, spans, rule.name)
                scan = Text(text)
        self.context = text[-1]  # as the client has it: a tag's "]" if it ends in one
        return text[len(context):]


def redact(text: str, spans: list[tuple[int, int]], rule: str) -> str:
    """The text with each span (in order; overlaps skipped) replaced by the rule's tag."""
    out: list[str] = []
    last = 0
    for start, end in spans:
        if start < last:
            continue
        out += (text[last:start], f"[REDACTED:{rule}]")
        last = end
    out.append(text[last:])
    return "".join(out)


def _token_run(text: str) -> int:
    """Where the run of token characters that ends the text starts."""
    other = _NOT_TOKEN.search(text[::-1])
    return 0 if other is None else len(text) - other.start()


def _run_start(text: str, end: int) -> int:
    """Where the run of text without white space that ends at ``end`` starts."""
    if not end:
        return 0
    space = _SPACE.search(text[end - 1::-1])  # (the text read backwards from the end)
    return 0 if space is None else end - space.start()


def _bearer_before(text: str, run: int) -> int | None:
    """Where a ``Bearer`` word starts, if only white space (and not too much of it) stands
    between it and the run from ``run``: what follows it is its token.
    """
    lo = max(0, run - MAX_RUN)
    word = lo + len(text[lo:run].rstrip())  # where the last word before the white space ends
    start = word - 6
    if word == run or start < lo or text[start:word].lower() != "bearer":
        return None
    before = text[start - 1] if start > 0 else " "
    return None if before.isascii() and (before.isalnum() or before == "_") else start


def _hold_before(text: str, at: int) -> int:
    """Where to cut to hold ``at`` and any secret that may have begun earlier in its run."""
    run = _run_start(text, at)
    bearer = _bearer_before(text, run)
    if bearer is not None:
        return bearer
    marker = _MARKER.search(text, run, at)
    return at if marker is None else marker.start()


def _secret_start(text: str, run: int) -> int | None:
    """Where, in the run of text from ``run`` to the end, a secret may begin: its first
    marker, or a last few characters that may become one.
    """
    marker = _MARKER.search(text, run)
    if marker is not None:
        return marker.start()
    at = max(run, len(text) - _LONGEST)
    while (candidate := _FIRST.search(text, at)) is not None:
        at = candidate.start()
        word = _PARTIAL.get(text[at:].lower())
        if word is not None and not (word and at > 0 and (
                text[at - 1].isascii() and (text[at - 1].isalnum() or text[at - 1] in "_-"))):
            return at
        at += 1
    return None


def _key_rest(text: str) -> tuple[int, bool]:
    """The rest of a private key's body, from the start of a line."""
    found = body(text, 0)
    if found.how != "open":
        return found.end, True
    return found.resume or 0, False  # the line not yet whole is kept


def _one_line_rest(text: str) -> tuple[int, bool]:
    """The rest of a private key on one line."""
    end = ONE_LINE_END.search(text)
    if end is not None:
        return end.end(), True
    other = NOT_ONE_LINE.search(text)
    if other is not None:
        return other.start(), True
    return max(0, len(text) - TAIL), False  # what may be the start of its END is kept


def _token_rest(text: str) -> tuple[int, bool]:
    """The rest of a token: up to the first character no token has."""
    other = _NOT_TOKEN.search(text)
    return (len(text), False) if other is None else (other.start(), True)


def hint_of(rules: list[Rule]) -> frozenset[str]:
    """Everything the rules need, one of which a text must hold for any of them to match
    (empty: some rule needs nothing, so every text is read).
    """
    needs = [rule.needs for rule in rules]
    if any(one is None for one in needs):
        return frozenset()
    return frozenset().union(*needs)  # type: ignore[arg-type]
