"""Safety checker: personal data, secrets and prompt attacks in what goes in; secrets in what
comes out.

Every rule (``plugins.safety_rules``) has an action: ``block`` answers 400
``content_policy_violation`` naming the rule, ``redact`` replaces what was found with
``[REDACTED:<rule>]`` before any model sees it, ``flag`` lets the request through and says so
in the header ``x-gateway-safety``; ``off`` turns the rule off. What was found is never
logged, only which rule found it.

Answers (their text, reasoning and tool-call arguments) are scanned as they stream: a secret
is redacted in flight (``plugins.safety_stream``), and text is held back only while it could
still turn out to be one, so ordinary prose leaves at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from gateway.protocol.openai import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    parse_chat,
    parse_completion,
)
from gateway.protocol.units import Chunk, merge_logprobs
from plugins.base import BasePlugin, Count, Denied, RequestContext
from plugins.safety_rules import BY_NAME, OUTPUT_RULES, RULES, Text
from plugins.safety_stream import StreamRedactor, hint_of, redact

log = logging.getLogger(__name__)

HEADER = "x-gateway-safety"
ACTIONS = ("block", "redact", "flag", "off")
DEFAULT_ACTIONS = {
    "email": "flag", "phone": "flag", "card": "redact", "iban": "redact",
    "api_key": "redact", "private_key": "redact", "bearer_token": "redact",
    "url_password": "redact", "credential": "redact", "prompt_injection": "flag",
    "jailbreak": "block",
}
INLINE_CHARS = 65_536  # requests larger than this (as JSON) are checked in a worker thread


@dataclass(frozen=True, slots=True)
class SafetyOptions:
    actions: dict[str, str] = field(default_factory=dict)  # rule → block|redact|flag|off
    output: bool = True  # redact secrets from answers as they stream
    embeddings: bool = True  # read what is to be embedded too (personal data, secrets)
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
        # Those that may find something in a text that holds none of the rules' anchors
        # (most texts): the ones whose phrases need none (numbers, behind their gate).
        self.unanchored = [(rule, action) for rule, action in self.rules if rule.needs is None]
        self.output_rules = [rule for rule in OUTPUT_RULES if actions[rule.name] != "off"]
        self.output_hint = hint_of(self.output_rules)  # (made once, not per redactor)
        self.stats = collections.Counter[str]()

    def report(self) -> dict[str, Any]:
        return dict(self.stats)

    def counts(self) -> list[Count]:
        """``rule.action`` (what was found in requests) and ``output.rule`` (redacted from
        answers) as one metric.
        """
        actions: dict[tuple[str, ...], float] = {}
        for name, n in list(self.stats.items()):
            first, _, second = name.partition(".")
            actions[(second, "redact_output") if first == "output" else (first, second)] = n
        return [Count("gateway.safety.actions", "What the safety checker did, by rule and "
                      "action (block, redact, flag; redact_output: in an answer)",
                      ("rule", "action"), actions)]

    async def on_request(self, ctx: RequestContext) -> None:
        # A long request is read in a worker thread. Its body's size as JSON bounds the
        # text in it (and takes a call, not a walk of the body).
        if len(orjson.dumps(ctx.req.body)) > INLINE_CHARS:
            ctx.req, verdicts = await asyncio.to_thread(self._check, ctx.req)
        else:
            ctx.req, verdicts = self._check(ctx.req)
        if verdicts:
            ctx.headers[HEADER] = verdicts
        return None

    def _check(self, req: ChatRequest | CompletionRequest
               ) -> tuple[ChatRequest | CompletionRequest, str]:
        """The request as models may see it, and what was redacted and flagged in it
        (raises ``Denied`` for what a rule blocks).
        """
        check, verdicts = self._checker()
        try:
            return _map_request(req, check), verdicts()
        except Denied as refused:  # (named as the client sent it)
            refused.param = "prompt" if isinstance(req, CompletionRequest) else "messages"
            raise

    def _checker(self) -> tuple[Check, Callable[[], str]]:
        """A check of texts, one request's, and what it has redacted and flagged so far."""
        flagged: dict[str, None] = {}
        redacted: dict[str, None] = {}

        def check(text: str, trust: Trust) -> str:
            scan = Text(text)
            for rule, found in self.rules if scan.present else self.unanchored:
                if not rule.may_find(scan):  # (most rules, for most texts)
                    continue
                attack = rule.category == "injection"
                if attack and trust == "trusted":
                    continue
                spans = rule.find(scan)
                if not spans:
                    continue
                action = found
                if attack and action == "block" and (trust == "quoted" or _quoted(text, spans)):
                    action = "flag"  # quoted (a tool result, code): reported, not refused
                self.stats[f"{rule.name}.{action}"] += 1
                if action == "block":
                    log.info("safety: blocked a request (rule %s)", rule.name)
                    raise Denied(rule.name, f"The request was refused: it contains "
                                            f"{rule.description}")
                if action == "flag":
                    flagged[rule.name] = None
                else:
                    redacted[rule.name] = None
                    text = redact(text, spans, rule.name)
                    scan = Text(text)
            return text

        def verdicts() -> str:
            return "; ".join(f"{what}={','.join(rules)}" for what, rules in
                             (("redacted", redacted), ("flagged", flagged)) if rules)

        return check, verdicts

    async def on_embed(self, req: EmbeddingRequest) -> EmbeddingRequest:
        """Texts to embed, read for personal data and secrets (not prompt attacks: nothing
        follows them); what was redacted or flagged is said in the header, as for a chat.
        """
        if not self.options.embeddings or req.token_ids:
            return req
        check, verdicts = self._checker()
        try:
            checked = [check(text, "trusted") for text in req.inputs if isinstance(text, str)]
        except Denied as refused:
            refused.param = "input"
            raise
        said = verdicts()
        if said:
            req.headers[HEADER] = said
        if checked == req.inputs:
            return req
        return dataclasses.replace(req, inputs=checked, body={**req.body, "input": checked})

    def on_stream(self, ctx: RequestContext,
                  chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        if not self.options.output or not self.output_rules:
            return chunks
        return self._redacting(chunks)

    async def _redacting(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """The answer with secrets redacted as it streams: each channel (the reasoning, the
        text, each tool call's arguments) holds back what may still grow into a secret. A
        channel's held text goes out when the next one begins (the answer after the
        reasoning, a tool call after the text: no secret runs across), so the client gets
        them in their order.

        Log probabilities name the tokens they are of (of the text, and with some servers
        of the reasoning and the arguments too): those of anything held back go out once it
        has gone out as it came (with the chunk after which no channel holds anything), and
        never when a secret was redacted meanwhile, in any channel (they would spell it).
        """
        def redactor() -> StreamRedactor:
            return StreamRedactor(self.output_rules, self.options.max_block, self.output_hint)

        content = redactor()
        reasoning: StreamRedactor | None = None  # made for the first reasoning, if any comes
        arguments: dict[int, StreamRedactor] = {}  # tool calls', by index
        held: dict[str, Any] | None = None  # log probabilities of text not yet out as it came
        spoiled = False  # ... and whether a secret was redacted since they were held
        def state() -> tuple[int, bool]:
            """Secrets redacted in every channel so far, and whether one holds text back."""
            redactors = [content, *arguments.values(), *([reasoning] if reasoning else [])]
            return (sum(sum(r.found.values()) for r in redactors),
                    any(r.pending or r.reading is not None for r in redactors))

        try:
            async for chunk in chunks:
                counting = chunk.logprobs is not None or held is not None
                redacted = state()[0] if counting else 0
                thought = ""
                if chunk.reasoning:
                    reasoning = reasoning or redactor()
                    thought = reasoning.feed(chunk.reasoning)
                if reasoning is not None and (chunk.content or chunk.tool_calls):
                    thought += reasoning.flush()
                text = content.feed(chunk.content) if chunk.content else ""
                calls = chunk.tool_calls
                if calls:
                    text += content.flush()
                    calls = [_feed_call(delta, arguments, redactor) for delta in calls]
                if chunk.finish_reason is not None:
                    text += content.flush()
                    thought += reasoning.flush() if reasoning else ""
                    calls = (calls or []) + _flush_calls(arguments) or chunk.tool_calls
                logprobs = chunk.logprobs
                if counting:
                    now_redacted, holding = state()
                    spoiled = spoiled or now_redacted != redacted
                    if logprobs:
                        held = merge_logprobs(held, logprobs)
                    if holding:
                        logprobs = None  # (what they are of is not all out yet)
                    else:
                        logprobs = None if spoiled else held
                        held, spoiled = None, False
                if text == chunk.content and thought == chunk.reasoning and \
                        calls == chunk.tool_calls and logprobs is chunk.logprobs:
                    yield chunk
                elif text or thought or calls or chunk.finish_reason or chunk.usage or logprobs \
                        or chunk.refusal:
                    yield dataclasses.replace(chunk, content=text, reasoning=thought,
                                              tool_calls=calls or None, logprobs=logprobs)
            text, calls = content.flush(), _flush_calls(arguments)
            thought = reasoning.flush() if reasoning else ""
            if text or thought or calls:
                yield Chunk(content=text, reasoning=thought, tool_calls=calls or None)
        finally:
            found = content.found
            for each in (reasoning, *arguments.values()):
                if each is not None:
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


# Where a text sits, for the prompt-attack rules: the operator's own instructions
# ("trusted": not read for attacks), what a user or a tool definition says ("untrusted"),
# and what is quoted rather than said (tool results, the model's own earlier turns, code,
# predicted output: attacks there are flagged, never refused).
Trust = Literal["trusted", "untrusted", "quoted"]
Check = Callable[[str, Trust], str]  # a text and where it sits → the text to send
TRUST_OF_ROLE: dict[str, Trust] = {"system": "trusted", "developer": "trusted",
                                   "user": "untrusted", "assistant": "quoted",
                                   "tool": "quoted", "function": "quoted"}
FENCE = "```"


def _map_request(req: ChatRequest | CompletionRequest, check: Check
                 ) -> ChatRequest | CompletionRequest:
    """The request with ``check`` applied to every text in it that a backend will receive
    (a new request only when something changed): the body as it will be sent, walked
    whole, so nothing is missed for the name of its field.
    """
    body: dict[str, Any] = {}
    for key, value in req.body.items():
        if key == "model":  # what routing reads: never rewritten
            body[key] = value
        elif key == "messages" and isinstance(value, list):
            messages = [_walk(m, check, _trust_of(m)) for m in value]
            body[key] = value if all(a is b for a, b in zip(messages, value, strict=True)) \
                else messages
        elif key in ("prompt", "suffix") and isinstance(req, CompletionRequest):
            # A prompt with a suffix is code to be filled in: quoted.
            body[key] = _walk(value, check, "quoted" if req.suffix is not None
                              else "untrusted")
        else:
            body[key] = _walk(value, check, "quoted" if key == "prediction" else "untrusted")
    if all(body[k] is v for k, v in req.body.items()):
        return req
    changed = parse_chat(body) if isinstance(req, ChatRequest) else parse_completion(body)
    changed.ollama = req.ollama
    return changed


def _trust_of(message: Any) -> Trust:
    role = message.get("role") if isinstance(message, dict) else None
    return TRUST_OF_ROLE.get(role, "untrusted") if isinstance(role, str) else "untrusted"


def _walk(value: Any, check: Check, trust: Trust) -> Any:
    """``value`` with ``check`` applied to every string in it (the same object when nothing
    changed). Base64 payloads (images as data: URLs) are not text a model reads.
    """
    if isinstance(value, str):
        if value.startswith("data:") and ";base64," in value[:100]:
            return value
        checked = check(value, trust)
        return value if checked == value else checked
    if isinstance(value, list):
        items = [_walk(item, check, trust) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if isinstance(value, dict):
        tool = value.get("role") in ("tool", "function")
        mapped = {k: _walk_json(v, check, trust) if k == "arguments" or (tool and k == "content")
                  else _walk(v, check, trust) for k, v in value.items()}
        return value if all(mapped[k] is v for k, v in value.items()) else mapped
    return value


def _walk_json(value: Any, check: Check, trust: Trust) -> Any:
    """A tool call's arguments, or a tool's result: read as text, as every string is (keys,
    numbers, every copy of a key); should a redaction leave JSON that is JSON no longer (a
    number redacted), the redaction is made a string in it, so the JSON stays JSON.
    """
    walked = _walk(value, check, trust)
    if walked is value or not isinstance(value, str) or value.lstrip()[:1] not in ("{", "[") \
            or _is_json(walked) or not _is_json(value):
        return walked
    mended = BARE_REDACTION.sub(r'\1"\2"', walked)
    return mended if _is_json(mended) else walked


def _is_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


# A redaction where a value goes (after a colon, a comma or a bracket, before one), not in a
# string: a number that was redacted.
BARE_REDACTION = re.compile(r'([:\[,]\s*)(\[REDACTED:\w+\])(?=\s*[,\]}])')


def _quoted(text: str, spans: list[tuple[int, int]]) -> bool:
    """Whether every span lies inside a fenced code block of ``text``."""
    if FENCE not in text:
        return False
    fences, at = [], text.find(FENCE)
    while at >= 0:
        fences.append(at)
        at = text.find(FENCE, at + len(FENCE))
    blocks = list(zip(fences[::2], fences[1::2], strict=False))
    if len(fences) % 2:
        blocks.append((fences[-1], len(text)))  # an open block runs to the end
    return all(any(start < a and b <= end for start, end in blocks) for a, b in spans)
