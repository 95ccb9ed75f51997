"""Safety checker: personal data, secrets and prompt attacks in what goes in; secrets in what
comes out.

Every rule (``plugins.safety_rules``) has an action: ``block`` answers 400
``content_policy_violation`` naming the rule, ``redact`` replaces what was found with
``[REDACTED:<rule>]`` before any model sees it, ``flag`` lets the request through and says so
in the header ``x-gateway-safety``; ``off`` turns the rule off. What was found is never
logged, only which rule found it.

Answers are scanned as they stream: a secret is redacted in flight. Text is held back only
while it could still turn out to be a secret (a run of text that begins like a key, a
``Bearer`` word, an open private-key block), so ordinary prose leaves at once.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.backends.base import Chunk
from gateway.protocol.openai import ChatRequest
from plugins.base import BasePlugin, Denied, RequestContext
from plugins.safety_rules import BY_NAME, OUTPUT_RULES, RULES, Rule, Text

log = logging.getLogger(__name__)

HEADER = "x-gateway-safety"
ACTIONS = ("block", "redact", "flag", "off")
DEFAULT_ACTIONS = {
    "email": "flag", "phone": "flag", "card": "redact", "iban": "redact",
    "api_key": "redact", "private_key": "redact", "bearer_token": "redact",
    "url_password": "redact", "prompt_injection": "flag", "jailbreak": "block",
}
# Prompt attacks come from users and from what tools bring back, not from the operator's
# own system prompt.
UNTRUSTED_ROLES = frozenset({"user", "tool", "function"})


@dataclass(frozen=True, slots=True)
class SafetyOptions:
    actions: dict[str, str] = field(default_factory=dict)  # rule → block|redact|flag|off
    output: bool = True  # redact secrets from answers as they stream
    max_block: int = 16_384  # the most of an open private-key block held back from a stream

    def problems(self) -> Iterator[tuple[str, str]]:
        for rule, action in self.actions.items():
            if rule not in BY_NAME:
                yield f"actions.{rule}", f"no such rule (rules: {', '.join(BY_NAME)})"
            elif action not in ACTIONS:
                yield f"actions.{rule}", f"expected one of {', '.join(ACTIONS)}"
        if self.max_block < 256:
            yield "max_block", "expected at least 256 characters"


class SafetyPlugin(BasePlugin):
    Options = SafetyOptions
    name = "safety"

    def __init__(self, options: SafetyOptions) -> None:
        self.options = options
        actions = {**DEFAULT_ACTIONS, **options.actions}
        self.rules = [(rule, actions[rule.name]) for rule in RULES
                      if actions[rule.name] != "off"]
        self.output_rules = [rule for rule in OUTPUT_RULES if actions[rule.name] != "off"]
        self.stats = collections.Counter[str]()

    def report(self) -> dict[str, Any]:
        return dict(self.stats)

    async def on_request(self, ctx: RequestContext) -> None:
        flagged: dict[str, None] = {}
        redacted: dict[str, None] = {}

        def check(text: str, untrusted: bool) -> str:
            scan = Text(text)
            for rule, action in self.rules:
                if rule.category == "injection" and not untrusted:
                    continue
                matches = list(rule.find(scan))
                if not matches:
                    continue
                self.stats[f"{rule.name}.{action}"] += 1
                if action == "block":
                    log.info("safety: blocked a request (rule %s)", rule.name)
                    raise Denied(rule.name, f"The request was refused: it contains "
                                            f"{rule.description}")
                if action == "flag":
                    flagged[rule.name] = None
                else:
                    redacted[rule.name] = None
                    text = _redact(text, matches, rule)
                    scan = Text(text)
            return text

        req = ctx.req
        if isinstance(req, ChatRequest):
            messages = [_map_text(m, check) for m in req.messages]
            if redacted:
                body = {**req.body, "messages": messages}
                ctx.req = dataclasses.replace(req, body=body, messages=messages)
        else:
            prompt = check(req.prompt, True)
            suffix = check(req.suffix, True) if req.suffix else req.suffix
            if redacted:
                body = {**req.body, "prompt": prompt}
                if suffix is not None:
                    body["suffix"] = suffix
                ctx.req = dataclasses.replace(req, body=body, prompt=prompt, suffix=suffix)
        verdicts = [f"{what}={','.join(rules)}" for what, rules in
                    (("blocked", {}), ("redacted", redacted), ("flagged", flagged)) if rules]
        if verdicts:
            ctx.headers[HEADER] = "; ".join(verdicts)
        return None

    def on_stream(self, ctx: RequestContext,
                  chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        if not self.options.output or not self.output_rules:
            return chunks
        return self._redacting(chunks)

    async def _redacting(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        content = StreamRedactor(self.output_rules, self.options.max_block)
        reasoning = StreamRedactor(self.output_rules, self.options.max_block)
        try:
            async for chunk in chunks:
                text = content.feed(chunk.content) if chunk.content else ""
                thought = reasoning.feed(chunk.reasoning) if chunk.reasoning else ""
                if chunk.finish_reason is not None:
                    text += content.flush()
                    thought += reasoning.flush()
                if text == chunk.content and thought == chunk.reasoning:
                    yield chunk
                elif text or thought or chunk.tool_calls or chunk.finish_reason or chunk.usage:
                    yield dataclasses.replace(chunk, content=text, reasoning=thought)
            text, thought = content.flush(), reasoning.flush()
            if text or thought:
                yield Chunk(content=text, reasoning=thought)
        finally:
            for rule, n in (content.found + reasoning.found).items():
                self.stats[f"output.{rule}"] += n


def _map_text(message: dict[str, Any], check: Any) -> dict[str, Any]:
    """The message with ``check`` applied to each piece of its text (a new dict only when
    something changed).
    """
    untrusted = message.get("role") in UNTRUSTED_ROLES
    content = message.get("content")
    if isinstance(content, str):
        new = check(content, untrusted)
        return message if new == content else {**message, "content": new}
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and \
                    isinstance(part.get("text"), str):
                text = check(part["text"], untrusted)
                part = part if text == part["text"] else {**part, "text": text}
            parts.append(part)
        if any(a is not b for a, b in zip(parts, content, strict=True)):
            return {**message, "content": parts}
    return message


def _redact(text: str, matches: list[re.Match[str]], rule: Rule) -> str:
    out: list[str] = []
    last = 0
    for match in matches:
        start, end = rule.span(match)
        if start < last:
            continue
        out += (text[last:start], f"[REDACTED:{rule.name}]")
        last = end
    out.append(text[last:])
    return "".join(out)


# How secrets begin; a run of text that holds (or ends in the start of) one of these is held
# back until it is whole.
_MARKERS = ("sk-", "sk_live_", "rk_live_", "AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_",
            "ghr_", "github_pat_", "xox", "AIza", "hf_", "glpat-", "eyJ", "://", "-----BEGIN")
_BEGIN = "-----BEGIN"
_BLOCK_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_BLOCK_HEADER = re.compile(r"-----BEGIN ([A-Z0-9 ]*)-----")
MAX_RUN = 4096  # the longest run of text held back as a possible token (long JWTs)


class StreamRedactor:
    """Text in, text out with secrets replaced; holds back only what may yet become one."""

    def __init__(self, rules: list[Rule], max_block: int) -> None:
        self.rules = rules
        self.max_block = max_block
        self.pending = ""
        self.swallowing = False  # inside a private key too long to hold: dropped to its end
        self.found = collections.Counter[str]()

    def feed(self, text: str) -> str:
        self.pending += text
        if self.swallowing:
            return self._swallow()
        cut = self._safe_cut(self.pending)
        if cut is None:  # an open private-key block past the bound: drop it to its end
            begin = self.pending.rfind(_BEGIN)
            released = self._redact(self.pending[:begin]) + "[REDACTED:private_key]"
            self.found["private_key"] += 1
            self.pending = self.pending[begin:]
            self.swallowing = True
            return released + self._swallow()
        released, self.pending = self.pending[:cut], self.pending[cut:]
        return self._redact(released)

    def flush(self) -> str:
        if self.swallowing:
            self.pending, self.swallowing = "", False
            return ""
        released, self.pending = self.pending, ""
        return self._redact(released)

    def _swallow(self) -> str:
        end = _BLOCK_END.search(self.pending)
        if end is None:
            self.pending = self.pending[-64:]  # enough to find the END line across chunks
            return ""
        self.swallowing = False
        rest, self.pending = self.pending[end.end():], ""
        return self.feed(rest)

    def _safe_cut(self, text: str) -> int | None:
        """Where the text may be cut: before anything that may still grow into a secret
        (None: an open private-key block has grown past the bound).
        """
        begin = text.rfind(_BEGIN)
        if begin >= 0 and not _BLOCK_END.search(text, begin):
            header = _BLOCK_HEADER.match(text, begin)
            incomplete = header is None and "\n" not in text[begin:begin + 80]
            if incomplete or (header is not None and "PRIVATE KEY" in header.group(1)):
                return None if len(text) - begin > self.max_block else begin
        cut = _last_run(text)
        if len(text) - cut > MAX_RUN:  # longer than any secret this looks for
            return len(text)
        word = _previous_word(text, cut)
        if word is not None and text[word:cut].strip().lower() == "bearer":
            return word
        return cut if _may_be_secret(text[cut:]) else len(text)

    def _redact(self, text: str) -> str:
        if not text:
            return text
        scan = Text(text)
        for rule in self.rules:
            matches = list(rule.find(scan))
            if matches:
                self.found[rule.name] += len(matches)
                text = _redact(text, matches, rule)
                scan = Text(text)
        return text


def _last_run(text: str) -> int:
    """Where the trailing run of text without white space begins (a trailing ``Bearer ``
    counts as part of the run to come).
    """
    i = len(text)
    while i > 0 and not text[i - 1].isspace():
        i -= 1
    if i == len(text):  # ends in white space: the run to come may follow a "Bearer"
        j = i
        while j > 0 and text[j - 1].isspace():
            j -= 1
        k = j
        while k > 0 and not text[k - 1].isspace():
            k -= 1
        if text[k:j].lower() == "bearer":
            return k
    return i


def _previous_word(text: str, cut: int) -> int | None:
    j = cut
    while j > 0 and text[j - 1].isspace():
        j -= 1
    if j == cut:
        return None
    k = j
    while k > 0 and not text[k - 1].isspace():
        k -= 1
    return k


def _may_be_secret(tail: str) -> bool:
    """Whether a run of text holds the start of a secret, or ends in what may become one."""
    if not tail:
        return False
    low = tail.lower()
    if low.startswith("bearer") or "bearer".startswith(low):
        return True
    for marker in _MARKERS:
        if marker in tail:
            return True
        for k in range(1, min(len(marker), len(tail) + 1)):
            start = len(tail) - k
            if tail.endswith(marker[:k]) and (marker == "://" or start == 0 or not (
                    tail[start - 1].isalnum() or tail[start - 1] in "_-")):
                return True
    return False
