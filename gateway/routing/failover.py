"""One request's answer, from whichever deployment can give it.

Before the first token, every failure is a failover (or a clean HTTP error when nothing is
left). After it — the client already has part of the answer — a stream that dies or stalls
is rescued: the partial answer goes to a fallback as an assistant prefill to continue; a
fallback that refuses prefill is restarted and only what extends the text already sent is
forwarded; if neither works the stream ends with one clean in-band error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from gateway.errors import (
    OVERTIME,
    GatewayError,
    InvalidRequest,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.protocol.times import ms
from gateway.protocol.units import Chunk, Usage
from gateway.routing.attempts import Attempts, Lease
from gateway.routing.candidates import Decision
from gateway.routing.catalog import Deployment
from gateway.telemetry import ANSWER_BEGAN, NO_SPAN, NOTES, AnySpan, Instruments, current_span

log = logging.getLogger(__name__)

# Opens the upstream stream for a deployment, continuing ``prefill`` when given.
Opener = Callable[[Deployment, str | None, int], AsyncGenerator[Chunk]]


class RoutedAnswer:
    """``await start()`` for the first chunk (headers can then be sent), then iterate
    ``chunks()`` for the whole answer, that chunk first; ``deployment``/``attempts``/``route``
    say who answered.
    """

    def __init__(self, attempts: Attempts, opener: Opener, instruments: Instruments, *,
                 streamed: bool, rescue: bool, alias: str = "",
                 decision: Decision | None = None) -> None:
        self._attempts = attempts
        self.decision = decision  # the learned pick that ordered the route, if one did
        self._open = opener
        self._instruments = instruments
        self._alias = alias  # the alias asked for ("": a model by name)
        self._streamed = streamed
        self._rescue_enabled = rescue
        self._lease: Lease | None = None
        self._stream: AsyncGenerator[Chunk] | None = None
        self._head: Chunk | None = None  # the first chunk, until chunks() gives it
        self._sent: list[str] = []  # the answer text the client has (for a rescue)
        self._thought: list[str] = []  # the reasoning it has, while no text has come
        self._unspliceable = False  # tool calls or a refusal sent: no rescue goes on from them
        self._finished = False  # the client has had the answer's finish
        self._usage: Usage | None = None
        self._first_at = 0.0
        self._span: AnySpan = NO_SPAN
        self.on_switch: Callable[[str, str], None] | None = None  # (the model, its backend)

    @property
    def deployment(self) -> Deployment:
        assert self._lease is not None, "start() first"
        return self._lease.deployment

    @property
    def model(self) -> str:
        """The name the answering model was picked by (the catalog's, not the backend's)."""
        assert self._lease is not None, "start() first"
        return self._lease.candidate.name

    @property
    def first_token_at(self) -> float:
        """When the answering deployment's first token came (``time.monotonic()``)."""
        return self._first_at

    @property
    def attempts(self) -> int:
        return self._attempts.count

    @property
    def route(self) -> str:
        assert self._lease is not None, "start() first"
        return self._lease.candidate.reason

    def failed_by_fault(self, model: str) -> bool:
        """Whether an attempt on ``model`` (a candidate's name) failed by its deployment's
        fault (not a rate limit, a full queue, a request it could not do)."""
        return model in self._attempts.at_fault

    async def start(self) -> Chunk:
        """Attempts until one deployment sends its first token."""
        error: GatewayError | None = None
        self._span = self._attempts.span = current_span().child("route")
        try:
            while True:
                lease = await self._attempts.next(error)
                first, error = await self._try(lease, None)
                if first is not None:
                    self._track(first)
                    self._answering(lease)
                    self._head = first
                    return first
        except BaseException as exc:
            if isinstance(exc, GatewayError):
                self._span.fail(exc.message, exc.label)
            await self.close()
            raise

    def _answering(self, lease: Lease, picked: bool = True) -> None:
        """The model now answering (``picked``: the first; or one that took over a stream),
        as its metrics and its span say.
        """
        model = lease.deployment.model.name
        if self._alias and picked:
            self._instruments.picks.add((self._alias, model))
        span = self._span
        if span.recording:
            span.set("gen_ai.response.model", model)
            span.set("gateway.backend", lease.deployment.backend.name)
            span.set("gateway.route.reason", lease.candidate.reason)

    async def chunks(self) -> AsyncGenerator[Chunk]:
        """The answer from its first chunk (the one ``start()`` gave) on, rescued if the
        stream breaks. (One generator for both: each more costs every chunk a step.)
        """
        try:
            head, self._head = self._head, None
            assert head is not None, "start() first"
            yield head
            while True:
                assert self._stream is not None and self._lease is not None
                try:
                    async for chunk in self._stream:
                        self._track(chunk)
                        yield chunk
                    self._lease.whole()
                    self._count_tokens()
                    return
                except GatewayError as broken:
                    if self._finished:  # what broke came after the answer: it is whole
                        log.info("%s/%s: %s, after the answer's end",
                                 self._lease.deployment.backend.name,
                                 self._lease.deployment.model.name, broken.message)
                        self._lease.whole()
                        self._count_tokens()
                        return
                    if broken.code == OVERTIME:  # long, not broken: it ends here
                        log.warning("%s/%s: %s; the answer ends there (finish: length)",
                                    self._lease.deployment.backend.name,
                                    self._lease.deployment.model.name, broken.message)
                        self._lease.whole()
                        yield Chunk(finish_reason="length", overtime=True)
                        return
                    # Held to account as it says (a rate limit rests the deployment, a
                    # refusal is no fault of it)...
                    self._lease.failed(broken, broke=True)
                    self._lease.release()
                    await self._drop_stream()
                    # ... and otherwise, whatever an error event says once the answer has
                    # begun (a provider's 429, a 400), the stream broke: it is rescued as any
                    # break is. A content-policy refusal ends the answer.
                    error = (broken if isinstance(broken, UpstreamError) or
                             broken.code == "content_policy_violation" else UpstreamError(
                                 broken.message, code="upstream_stream_error",
                                 backend=self._lease.deployment.backend.name)).kept()
                    if not self._rescuable(error):
                        raise
                    log.warning("stream from %s/%s broke (%s); rescuing",
                                self._lease.deployment.backend.name,
                                self._lease.deployment.model.name, error.message)
                    try:
                        await self._rescue(error)
                    except GatewayError:
                        self._instruments.rescues.add(("failed",))
                        raise
        finally:
            await self.close()

    def _track(self, chunk: Chunk) -> None:
        """Remember what the client has been given, to continue from it if need be."""
        if chunk.content:
            self._sent.append(chunk.content)
        elif chunk.reasoning and not self._sent:
            self._thought.append(chunk.reasoning)
        if chunk.tool_calls or chunk.refusal:
            self._unspliceable = True
        if chunk.usage is not None:
            self._usage = chunk.usage
        if chunk.finish_reason is not None:
            self._finished = True

    def _count_tokens(self) -> None:
        """The answer is whole: its tokens, and how fast they came."""
        usage, lease = self._usage, self._lease
        if usage is None or lease is None:
            return
        model = lease.deployment.model.name
        counted = self._instruments
        if counted.enabled:
            counted.tokens.record(("input", model), usage.prompt_tokens)
            counted.tokens.record(("output", model), usage.completion_tokens)
            took = time.monotonic() - self._first_at
            if usage.completion_tokens > 1 and took > 0:
                counted.speed.record((model,), (usage.completion_tokens - 1) / took)
        if self._span.recording:
            self._span.set("gen_ai.usage.input_tokens", usage.prompt_tokens)
            self._span.set("gen_ai.usage.output_tokens", usage.completion_tokens)
        notes = NOTES.get()
        if notes is not None:
            notes["input_tokens"] = usage.prompt_tokens
            notes["output_tokens"] = usage.completion_tokens

    async def close(self) -> None:
        await self._drop_stream()
        if self._lease is not None:
            self._lease.release()
        self._span.end()

    async def _try(self, lease: Lease, prefill: str | None
                   ) -> tuple[Chunk | None, GatewayError | None]:
        """One attempt up to its first token: the chunk, or the error that ended it (its
        slot then freed at once, so a retry never waits on it).
        """
        self._lease = lease  # close() releases it if the client leaves meanwhile
        limit = lease.first_token_limit
        stream: AsyncGenerator[Chunk] | None = None
        try:
            stream = self._open(lease.deployment, prefill, len(self._sent))
            if self._streamed:
                async with asyncio.timeout(limit):
                    first = await _first(stream, lease.deployment)
            else:  # a whole answer comes at its end: the header and idle limits bound it
                ANSWER_BEGAN.set(0.0)
                first = await _first(stream, lease.deployment)
        except TimeoutError:
            error: GatewayError = UpstreamTimeout(
                f"{lease.deployment.backend.name} sent no token within {limit:g}s",
                backend=lease.deployment.backend.name).kept()
        except GatewayError as exc:
            error = exc.kept()
        else:
            lease.answered()
            # (A whole answer's first token came as the backend collected it.)
            self._first_at = (not self._streamed and ANSWER_BEGAN.get()) or time.monotonic()
            notes = NOTES.get()
            if self._instruments.enabled or notes is not None:
                ttft = self._first_at - lease.started
                self._instruments.ttft.record(
                    (lease.deployment.model.name, lease.deployment.backend.name), ttft)
                if notes is not None:
                    notes["ttft_ms"] = ms(ttft)
            self._stream = stream
            return first, None
        if stream is not None:
            await stream.aclose()
        lease.failed(error)
        lease.release()
        return None, error

    def _rescuable(self, error: GatewayError) -> bool:
        return (self._rescue_enabled and not self._unspliceable
                and isinstance(error, UpstreamError) and error.code != "rescue_diverged")

    async def _rescue(self, error: GatewayError) -> None:
        """Continue the answer elsewhere; raises the error that ends it when nothing can."""
        text = "".join(self._sent)
        move_on = True
        while True:
            lease = await self._attempts.next(error, move_on=move_on)
            move_on = False
            prefill = text if text and lease.deployment.continues_prefill else None
            first, error_ = await self._try(lease, prefill)
            if first is None and prefill is not None and isinstance(error_, InvalidRequest):
                # This fallback refuses to continue a prefill: restart it instead, and
                # forward only what goes beyond the text already sent.
                lease = await self._attempts.again(lease, error_)
                prefill = None
                first, error_ = await self._try(lease, None)
            if first is not None:
                break
            assert error_ is not None
            error = error_
        assert self._stream is not None
        self._instruments.rescues.add(("continued" if prefill is not None else "restarted",))
        # A restart also repeats the text already sent; and the reasoning, but for what
        # the client has had of it (the break came before the text: its reasoning is cut).
        self._stream = _continuation(_chain(first, self._stream),
                                     text if prefill is None else "", lease.deployment,
                                     len(self._sent) if prefill is not None else 0,
                                     "".join(self._thought) if not text else None)
        self._answering(lease, picked=False)
        if self.on_switch is not None:
            self.on_switch(lease.deployment.model.name, lease.deployment.backend.name)

    async def _drop_stream(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()


async def _first(stream: AsyncIterator[Chunk], deployment: Deployment) -> Chunk:
    """The first chunk that says something."""
    async for chunk in stream:
        if chunk.says_something():
            return chunk
    name = deployment.backend.name
    raise UpstreamError(f"{name} sent an empty answer", backend=name)


async def _chain(first: Chunk, rest: AsyncGenerator[Chunk]) -> AsyncGenerator[Chunk]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()


async def _continuation(stream: AsyncGenerator[Chunk], sent: str, deployment: Deployment,
                        carried: int, thought: str | None = None) -> AsyncGenerator[Chunk]:
    """A rescuing answer as the client should get it: no reasoning once the text had begun
    (it had all of that), and, for a restart, without the text it already has. A restart
    that takes another turn than what was sent cannot be spliced on: that ends the stream
    with an error. A continuation's usage counts the ``carried`` tokens of the text it was
    given (a chunk a token, as they came) as the answer's, not the question's.

    The break came while the model reasoned (``thought``: what the client has of that): the
    new reasoning goes on from there when it begins the same, and is given whole, after a
    blank line, when it does not. (A fallback that does not reason leaves the client's
    reasoning as the break cut it, its answer whole.)
    """
    seen = ""
    mind = "" if thought else None  # the new reasoning, while it is compared with ``thought``
    try:
        async for chunk in stream:
            if thought is None:
                chunk.reasoning = ""
            elif mind is not None and chunk.reasoning:
                mind += chunk.reasoning
                if thought.startswith(mind):
                    chunk.reasoning = ""  # (the client has this much)
                else:
                    chunk.reasoning = mind[len(thought):] if mind.startswith(thought) \
                        else "\n\n" + mind
                    mind = None
            if carried and chunk.usage is not None:
                moved = min(carried, chunk.usage.prompt_tokens)
                chunk.usage = dataclasses.replace(
                    chunk.usage, prompt_tokens=chunk.usage.prompt_tokens - moved,
                    completion_tokens=chunk.usage.completion_tokens + moved)
            if len(seen) < len(sent):
                seen += chunk.content
                if not (seen.startswith(sent) or sent.startswith(seen)):
                    name = deployment.backend.name
                    raise UpstreamError(f"the answer broke off, and {name}'s new answer "
                                        "differs from what was already sent", backend=name,
                                        code="rescue_diverged")
                chunk.content = seen[len(sent):]
            if chunk.content or chunk.reasoning or chunk.finish_reason or chunk.usage or \
                    chunk.tool_calls or chunk.refusal:
                yield chunk
    finally:
        await stream.aclose()
