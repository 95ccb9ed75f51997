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
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.protocol.openai import ChatRequest, CompletionRequest
from gateway.protocol.units import Chunk
from plugins.base import BasePlugin, Denied, RequestContext
from plugins.safety_rules import BY_NAME, OUTPUT_RULES, RULES, Text
from plugins.safety_stream import StreamRedactor, redact

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
INLINE_CHARS = 65_536  # requests with more text than this are checked in a worker thread


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
        size = 0

        def count(text: str, untrusted: bool) -> str:
            nonlocal size
            size += len(text)
            return text

        _map_request(ctx.req, count)
        if size > INLINE_CHARS:  # a long text is read in a worker thread
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
                    text = redact(text, spans, rule.name)
                    scan = Text(text)
            return text

        req = _map_request(req, check)
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


Check = Callable[[str, bool], str]  # a text, and whether it is untrusted → the text to send


def _map_request(req: ChatRequest | CompletionRequest, check: Check
                 ) -> ChatRequest | CompletionRequest:
    """The request with ``check`` applied to every text in it that a model reads (a new
    request only when something changed).
    """
    if isinstance(req, CompletionRequest):
        prompt = check(req.prompt, True)
        suffix = check(req.suffix, True) if req.suffix else req.suffix
        if prompt == req.prompt and suffix == req.suffix:
            return req
        body = {**req.body, "prompt": prompt}
        if suffix is not None:
            body["suffix"] = suffix
        return dataclasses.replace(req, body=body, prompt=prompt, suffix=suffix)
    changed: dict[str, Any] = {}
    messages = [_map_message(m, check) for m in req.messages]
    if any(a is not b for a, b in zip(messages, req.messages, strict=True)):
        changed["messages"] = messages
    # Predicted output (sent on to OpenAI-compatible backends as it is).
    prediction = req.body.get("prediction")
    if isinstance(prediction, dict):
        content = _map_content(prediction.get("content"), check, False)
        if content is not prediction.get("content"):
            changed["prediction"] = {**prediction, "content": content}
    if not changed:
        return req
    return dataclasses.replace(req, body={**req.body, **changed}, messages=messages)


def _map_message(message: dict[str, Any], check: Check) -> dict[str, Any]:
    """The message with ``check`` applied to each piece of its text, its refusal and the
    arguments of the calls it made (a new dict only when something changed).
    """
    untrusted = message.get("role") in UNTRUSTED_ROLES
    changed: dict[str, Any] = {}
    content = _map_content(message.get("content"), check, untrusted)
    if content is not message.get("content"):
        changed["content"] = content
    refusal = message.get("refusal")
    if isinstance(refusal, str) and (checked := check(refusal, False)) != refusal:
        changed["refusal"] = checked
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        new_calls = [_map_call(call, "function", check) for call in calls]
        if any(a is not b for a, b in zip(new_calls, calls, strict=True)):
            changed["tool_calls"] = new_calls
    call = _map_call(message, "function_call", check)  # the older form of a tool call
    if call is not message:
        changed["function_call"] = call["function_call"]
    return {**message, **changed} if changed else message


def _map_content(content: Any, check: Check, untrusted: bool) -> Any:
    """Text content, or content parts with their text and refusals checked (the same object
    when nothing changed).
    """
    if isinstance(content, str):
        checked = check(content, untrusted)
        return content if checked == content else checked
    if not isinstance(content, list):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict):
            kind = part.get("type")  # a text part's text is under "text", a refusal's under
            text = part.get(kind) if kind in ("text", "refusal") else None  # "refusal"
            if isinstance(text, str) and (checked := check(text, untrusted)) != text:
                part = {**part, kind: checked}
        parts.append(part)
    return content if all(a is b for a, b in zip(parts, content, strict=True)) else parts


def _map_call(holder: Any, key: str, check: Check) -> Any:
    """``holder`` with the ``arguments`` of its ``key`` (a function call) checked."""
    function = holder.get(key) if isinstance(holder, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return holder
    checked = check(function["arguments"], False)
    if checked == function["arguments"]:
        return holder
    return {**holder, key: {**function, "arguments": checked}}
