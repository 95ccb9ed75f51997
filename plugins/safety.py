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

import asyncio
import collections
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.backends.base import Chunk
from gateway.protocol.openai import ChatRequest, CompletionRequest
from plugins.base import BasePlugin, Denied, RequestContext
from plugins.safety_rules import (
    BY_NAME,
    KEY_BEGIN,
    OUTPUT_RULES,
    RULES,
    Rule,
    Text,
    key_block,
    key_body,
)

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
        req = ctx.req
        size = len(req.prompt) if isinstance(req, CompletionRequest) else sum(
            len(m.get("content") or "") if isinstance(m.get("content"), str) else 1024
            for m in req.messages)
        if size > INLINE_CHARS:  # a long text is read off the event loop
            checked = await asyncio.to_thread(self._check, req)
        else:
            checked = self._check(req)
        ctx.req, verdicts = checked
        if verdicts:
            ctx.headers[HEADER] = verdicts
        return None

    def _check(self, req: ChatRequest | CompletionRequest
               ) -> tuple[ChatRequest | CompletionRequest, str]:
        """The request as models may see it, and what was redacted and flagged in it
        (raises ``Denied`` for what a rule blocks).
        """
        flagged: dict[str, None] = {}
        redacted: dict[str, None] = {}

        def check(text: str, untrusted: bool) -> str:
            scan = Text(text)
            for rule, action in self.rules:
                if rule.category == "injection" and not untrusted:
                    continue
                spans = rule.find(scan)
                if not spans:
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
                    text = _redact(text, spans, rule.name)
                    scan = Text(text)
            return text

        if isinstance(req, ChatRequest):
            messages = [_map_text(m, check) for m in req.messages]
            if redacted:
                body = {**req.body, "messages": messages}
                req = dataclasses.replace(req, body=body, messages=messages)
        else:
            prompt = check(req.prompt, True)
            suffix = check(req.suffix, True) if req.suffix else req.suffix
            if redacted:
                body = {**req.body, "prompt": prompt}
                if suffix is not None:
                    body["suffix"] = suffix
                req = dataclasses.replace(req, body=body, prompt=prompt, suffix=suffix)
        verdicts = [f"{what}={','.join(rules)}" for what, rules in
                    (("redacted", redacted), ("flagged", flagged)) if rules]
        return req, "; ".join(verdicts)

    def on_stream(self, ctx: RequestContext,
                  chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        if not self.options.output or not self.output_rules:
            return chunks
        return self._redacting(chunks)

    async def _redacting(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        def redactor() -> StreamRedactor:
            return StreamRedactor(self.output_rules, self.options.max_block)

        content, reasoning = redactor(), redactor()
        arguments: dict[int, StreamRedactor] = {}  # tool calls', by index
        try:
            async for chunk in chunks:
                text = content.feed(chunk.content) if chunk.content else ""
                thought = reasoning.feed(chunk.reasoning) if chunk.reasoning else ""
                calls = [_feed_call(delta, arguments, redactor) for delta in chunk.tool_calls] \
                    if chunk.tool_calls else chunk.tool_calls
                if chunk.finish_reason is not None:
                    text += content.flush()
                    thought += reasoning.flush()
                    calls = (calls or []) + _flush_calls(arguments) or chunk.tool_calls
                if text == chunk.content and thought == chunk.reasoning and \
                        calls == chunk.tool_calls:
                    yield chunk
                elif text or thought or calls or chunk.finish_reason or chunk.usage:
                    yield dataclasses.replace(chunk, content=text, reasoning=thought,
                                              tool_calls=calls or None)
            text, thought, calls = content.flush(), reasoning.flush(), _flush_calls(arguments)
            if text or thought or calls:
                yield Chunk(content=text, reasoning=thought, tool_calls=calls or None)
        finally:
            found = content.found + reasoning.found
            for each in arguments.values():
                found += each.found
            for rule, n in found.items():
                self.stats[f"output.{rule}"] += n


def _feed_call(delta: dict[str, Any], redactors: dict[int, StreamRedactor],
               make: Callable[[], StreamRedactor]) -> dict[str, Any]:
    """A tool-call delta with its piece of the arguments passed through that call's
    redactor.
    """
    function = delta.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str) or \
            not function["arguments"]:
        return delta
    piece = function["arguments"]
    index = delta.get("index", 0)
    redactor = redactors.get(index) or redactors.setdefault(index, make())
    released = redactor.feed(piece)
    return delta if released == piece else {**delta, "function": {**function,
                                                                  "arguments": released}}


def _flush_calls(redactors: dict[int, StreamRedactor]) -> list[dict[str, Any]]:
    """What the tool calls' redactors still hold, as deltas."""
    out = []
    for index, redactor in redactors.items():
        rest = redactor.flush()
        if rest:
            out.append({"index": index, "function": {"arguments": rest}})
    return out


def _map_text(message: dict[str, Any], check: Callable[[str, bool], str]) -> dict[str, Any]:
    """The message with ``check`` applied to each piece of its text, and to the arguments of
    the tool calls it made (a new dict only when something changed).
    """
    untrusted = message.get("role") in UNTRUSTED_ROLES
    changed: dict[str, Any] = {}
    content = message.get("content")
    if isinstance(content, str):
        new = check(content, untrusted)
        if new != content:
            changed["content"] = new
    elif isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and \
                    isinstance(part.get("text"), str):
                text = check(part["text"], untrusted)
                part = part if text == part["text"] else {**part, "text": text}
            parts.append(part)
        if any(a is not b for a, b in zip(parts, content, strict=True)):
            changed["content"] = parts
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        new_calls = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                checked = check(function["arguments"], False)
                if checked != function["arguments"]:
                    call = {**call, "function": {**function, "arguments": checked}}
            new_calls.append(call)
        if any(a is not b for a, b in zip(new_calls, calls, strict=True)):
            changed["tool_calls"] = new_calls
    return {**message, **changed} if changed else message


def _redact(text: str, spans: list[tuple[int, int]], rule: str) -> str:
    out: list[str] = []
    last = 0
    for start, end in spans:
        if start < last:
            continue
        out += (text[last:start], f"[REDACTED:{rule}]")
        last = end
    out.append(text[last:])
    return "".join(out)


# How secrets begin (lower-case). A run of text that holds one of these, or ends in the start
# of one, is held back until it is whole. The API keys' must start a word, as their rule says.
_KEY_MARKERS = ("sk-", "sk_live_", "rk_live_", "akia", "asia", "ghp_", "gho_", "ghu_", "ghs_",
                "ghr_", "github_pat_", "xox", "aiza", "hf_", "glpat-")
_OTHER_MARKERS = ("bearer", "eyj", "://", "-----begin")
_MARKERS = _KEY_MARKERS + _OTHER_MARKERS
_BEARER_BEFORE = re.compile(r"(?<![a-z0-9_])bearer\s+$", re.IGNORECASE)
_OPEN_HEADER = re.compile(r"-----BEGIN(?: (?:[A-Z0-9]+ )*[A-Z0-9]*)?-{0,4}")
MAX_RUN = 4096  # the longest run of text held back as a possible token (long JWTs)
INLINE_CHARS = 65_536  # requests with more text than this are checked in a worker thread


class StreamRedactor:
    """Text in, text out with secrets replaced; holds back only what may yet become one."""

    def __init__(self, rules: list[Rule], max_block: int) -> None:
        self.rules = rules
        self.hint = _hint(rules)
        self.max_block = max_block
        self.pending = ""
        self.context = ""  # the last character released
        self.swallowing = False  # inside a private key too long to hold: dropped to its end
        self.found = collections.Counter[str]()

    def feed(self, text: str) -> str:
        self.pending += text
        if self.swallowing:
            return self._swallow()
        cut = self._safe_cut(self.pending)
        if cut is None:  # an open private key past the bound: dropped to its end
            begin = self.pending.rfind("-----BEGIN")
            released = self._redact(self.pending[:begin]) + "[REDACTED:private_key]"
            self.found["private_key"] += 1
            self.pending = self.pending[self.pending.find("\n", begin) + 1:]
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
        end, how = key_body(self.pending, 0)
        if how == "open":
            line = self.pending.rfind("\n") + 1  # the line not yet whole
            self.pending = self.pending[max(line, len(self.pending) - MAX_RUN):]
            return ""
        self.swallowing = False
        rest, self.pending = self.pending[end:], ""
        return self.feed(rest)

    def _safe_cut(self, text: str) -> int | None:
        """Where the text may be cut: before anything that may still grow into a secret
        (None: an open private key has grown past the bound).
        """
        block = (0, 0)  # the last private key, whole: never cut inside
        begin = text.rfind("-----BEGIN")
        if begin >= 0:
            header = KEY_BEGIN.match(text, begin)
            if header is not None:
                end, how, _ = key_block(text, header)
                if how == "open":
                    return None if len(text) - begin > self.max_block else begin
                block = (begin, end)
            elif _OPEN_HEADER.fullmatch(text, begin):
                return begin  # a header not yet whole
        cut = len(text)
        while cut > 0 and not text[cut - 1].isspace():
            cut -= 1
        bearer = _BEARER_BEFORE.search(text, max(0, cut - 64), cut)
        if bearer is not None:
            cut = bearer.start()  # what follows "Bearer " is the token
        else:
            hold = _secret_start(text, cut)
            cut = len(text) if hold is None else hold
        return block[1] if block[0] <= cut < block[1] else cut

    def _redact(self, text: str) -> str:
        """The released text with secrets replaced; the last character released before is
        read with it (not redacted, not returned): the context the rules' patterns look at.
        """
        if not text:
            return text
        context, self.context = self.context, text[-1]
        if self.hint:
            low = text.lower()
            if not any(anchor in low for anchor in self.hint):
                return text  # nothing any rule needs is there (most pieces of most answers)
        text = context + text
        scan = Text(text)
        for rule in self.rules:
            # (a match that would start at the context was ruled out when it was released)
            spans = [span for span in rule.find(scan) if span[0] >= len(context)]
            if spans:
                self.found[rule.name] += len(spans)
                text = _redact(text, spans, rule.name)
                scan = Text(text)
        return text[len(context):]


def _hint(rules: list[Rule]) -> tuple[str, ...]:
    """Everything the rules need, one of which a text must hold for any of them to match
    (empty: some rule needs nothing, so every text is read).
    """
    anchors: set[str] = set()
    for rule in rules:
        if any(not phrase.anchors for phrase in rule.phrases):
            return ()
        anchors.update(a for phrase in rule.phrases for a in phrase.anchors)
        if rule.finder is not None:
            anchors.update(rule.finder[0])
    return tuple(sorted(anchors))


def _secret_start(text: str, run: int) -> int | None:
    """Where, in the run of text without white space from ``run`` to the end, a secret may
    begin: its first marker, or a last few characters that may become one (searched only
    in the last ``MAX_RUN`` characters: a run longer than any secret is not held whole).
    The character before is kept with it, as the context a rule's pattern looks at.
    """
    start = max(run, len(text) - MAX_RUN)
    low = text[start:].lower()
    found = [i for i in (low.find(marker) for marker in _MARKERS) if i >= 0]
    for marker in _MARKERS:
        for k in range(min(len(marker) - 1, len(low)), 0, -1):
            at = len(low) - k
            if low.endswith(marker[:k]) and (marker in _OTHER_MARKERS or at == 0 or not (
                    low[at - 1].isalnum() or low[at - 1] in "_-")):
                found.append(at)
                break
    if not found:
        return None
    return max(run, start + min(found) - 1)
