"""The plugins around every chat and text completion, in the configured order, around the
one call to routing. The one place that knows the order of plugins.

    on_request  (safety in, QA decides buffering, cache lookup — a hit answers at once)
    routing     (the answer, streamed or whole)
    on_stream   (safety out, QA observing, cache tee: innermost first)
    on_complete (QA's verdict, then the cache stores what passed) — a failing verdict on a
                whole (or buffered) answer asks routing for a stronger model, a bounded
                number of times
    on_finish   (however it ended: the cache releases requests waiting on this one)

The pipeline takes a protocol-neutral ``RequestContext`` and returns an ``Answer``; the doors
parse and encode the wire formats on either side of it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from gateway.errors import GatewayError
from gateway.pipeline.answer import Answer, Embeddings, Streamed, Whole, route_headers
from gateway.pipeline.listing import Models
from gateway.pipeline.outcome import StreamEnded, record_outcome
from gateway.protocol.openai import EmbeddingRequest
from gateway.protocol.units import Chunk, Completion, Usage, collect
from gateway.routing.catalog import Deployment
from gateway.routing.failover import RoutedAnswer
from gateway.routing.router import Router
from gateway.routing.selector import needs_of
from gateway.telemetry import NO_SPAN, NOTES, current_span
from plugins.base import Plugin, RequestContext, Verdict

log = logging.getLogger(__name__)

ESCALATED = "x-gateway-escalated"  # the models whose answers were found wanting, and why
Outcome = tuple[RoutedAnswer, float]  # a routed answer, and when it was asked for


class Pipeline:
    def __init__(self, plugins: list[Plugin], router: Router, max_escalations: int = 1) -> None:
        self.plugins = plugins
        self.router = router
        self.max_escalations = max_escalations
        self.models = Models(router)

    async def run(self, ctx: RequestContext) -> Answer:
        """The answer to a chat or text completion, in the shape the request asked for: a
        ``Streamed`` answer when it asked for a stream, else a ``Whole`` one.
        """
        answer: Answer | None = None
        try:
            answered = await self._ask_plugins(ctx)
            if answered is not None:
                _used(ctx, Completion(usage=Usage()))  # no model was asked: no tokens used
                answer = self._deliver(ctx, *answered)
                return answer
            if ctx.req.stream and not ctx.buffered:
                answer = await self._stream(ctx)
                return answer
            completion, route = await self._whole(ctx)
            _used(ctx, completion)
            answer = self._deliver(ctx, completion, route)
            return answer
        finally:
            if not isinstance(answer, Streamed):  # a stream is over when the door closes it
                self._finish(ctx)

    async def _ask_plugins(self, ctx: RequestContext
                           ) -> tuple[Completion, dict[str, str]] | None:
        """Every plugin's on_request, in order; the answer one of them gave without asking a
        model (a cache hit) and its route headers, if any did.
        """
        request_span = current_span()
        for plugin in self.plugins:
            span = request_span.child(f"{plugin.name} on_request") if request_span.recording \
                else NO_SPAN
            try:
                hit = await plugin.on_request(ctx)
            except GatewayError as exc:
                span.fail(exc.message, exc.label)
                raise
            finally:
                span.end()
            if hit is not None:
                ctx.model = hit.model
                return hit, route_headers(plugin.name, hit.model, 0,
                                          f"answered by {plugin.name}")
        return None

    def _deliver(self, ctx: RequestContext, completion: Completion, route: dict[str, str]
                 ) -> Answer:
        """A finished answer, whole or replayed as a stream (a cache hit, a checked answer)."""
        headers = {**route, **ctx.headers}
        if not ctx.req.stream:
            return Whole(completion, headers)
        first, *rest = completion.chunks()

        async def finish() -> dict[str, str]:
            return {}  # every verdict is in the headers already

        async def close(ok: bool) -> None:
            self._finish(ctx)

        return Streamed(first, _replay(rest), headers, completion.model, finish, close)

    async def _stream(self, ctx: RequestContext) -> Streamed:
        started = time.monotonic()
        routed = self.router.answer(ctx.req, ctx.models, ctx.batch)
        try:
            await routed.start()
        except GatewayError as exc:
            record_outcome(self.router, ctx, routed, started, error=exc)
            raise
        taken = Completion()
        try:
            ctx.model = routed.deployment.model.name
            chunks = _taking(taken, self._wrap(ctx, routed.chunks()))
            first_out = await anext(chunks)
        except BaseException:
            await routed.close()
            raise
        headers = {**_route_of(routed), **ctx.headers}

        judged = False

        async def finish() -> dict[str, str]:
            nonlocal judged
            taken.model = ctx.model = routed.deployment.model.name
            _used(ctx, taken)
            judged = True
            await self._judge(ctx, taken, routed.deployment, (routed, started))
            return {k: v for k, v in ctx.headers.items() if headers.get(k) != v}

        async def close(ok: bool) -> None:
            ctx.failed = ctx.failed or not ok
            if not judged:  # it ended before it was whole: kept, not learned from (the
                # client leaving and the stream breaking look alike from here); what came
                # of it is paid for
                _used(ctx, taken)
                record_outcome(
                    self.router, ctx, routed, started,
                    error=StreamEnded("The stream ended before its answer was whole."))
            try:
                await chunks.aclose()  # the plugins' stream wrappers, then the upstream
                await routed.close()
            finally:
                routed.on_switch = None  # (it holds the answer, which holds this closure)
                self._finish(ctx)

        answer = Streamed(first_out, chunks, headers, ctx.model, finish, close)
        routed.on_switch = answer.switched
        return answer

    def _finish(self, ctx: RequestContext) -> None:
        for plugin in reversed(self.plugins):
            try:
                plugin.on_finish(ctx)
            except Exception:  # one plugin's bug must not keep the others from cleaning up
                log.exception("plugin %s: on_finish failed", plugin.name)

    async def count_tokens(self, ctx: RequestContext) -> tuple[int, dict[str, str]]:
        """How many tokens the prompt is, as the model answering it counts them: it is asked
        for a one-token answer, whose usage says. The plugins read the request as ever (the
        safety checker redacts and blocks; a cached answer's usage counts too), but nothing
        judges or keeps that answer.
        """
        sampling = dataclasses.replace(ctx.req.sampling, max_tokens=1)
        ctx.req = dataclasses.replace(ctx.req, stream=False, sampling=sampling,
                                      body={**ctx.req.body, "max_tokens": 1, "stream": False})
        try:
            answered = await self._ask_plugins(ctx)
            if answered is not None:
                hit, route = answered
                return (hit.usage or Usage()).prompt_tokens, route
            routed = self.router.answer(ctx.req, ctx.models, ctx.batch)
            try:
                await routed.start()
            except GatewayError as refused:
                if refused.code != "context_length_exceeded":
                    raise
                # No model's window holds it (asking "does it fit?" is what counting is
                # for): what the refusal said it came to, or the gateway's estimate.
                return _tokens_said(refused.message) or needs_of(ctx.req).tokens, {}
            try:
                answer = await collect(routed.chunks())
            finally:
                await routed.close()
            _used(ctx, answer)
            return (answer.usage or Usage()).prompt_tokens, _route_of(routed)
        finally:
            self._finish(ctx)

    async def embed(self, req: EmbeddingRequest,
                    on_usage: Callable[[int], None] | None = None,
                    batch: bool = False) -> Embeddings:
        """Embeddings of the model asked for, of the inputs as the plugins leave them (the
        safety checker's redactions; nothing is generated, so nothing else applies).
        ``on_usage`` is told the tokens embedded; ``batch``: a batch line's.
        """
        for plugin in self.plugins:
            req = await plugin.on_embed(req)
        result, deployment, attempts = await self.router.embed(req, batch)
        result.shortened(req.dimensions, req.model)
        if on_usage is not None and result.prompt_tokens:  # (0: the backend did not say,
            on_usage(result.prompt_tokens)  # and the caller's estimate stands)
        model = deployment.model.name
        return Embeddings(result, model, {**route_headers(
            deployment.backend.name, model, attempts, "requested"), **req.headers})

    async def _whole(self, ctx: RequestContext) -> tuple[Completion, dict[str, str]]:
        """The answer, checked, escalated to stronger models while it fails (bounded)."""
        started = time.monotonic()
        routed = self.router.answer(ctx.req, ctx.models, ctx.batch)
        completion, headers, deployment = await self._collect(ctx, routed, started)
        escalated: list[str] = []
        outcome: Outcome | None = (routed, started)  # the first answer's is learned from
        for _ in range(self.max_escalations):
            verdict = await self._judge(ctx, completion, deployment, outcome)
            outcome = None
            if verdict is None or not verdict.escalate:
                return completion, headers
            stronger_routed = self.router.escalate(ctx.req, deployment, verdict.describe(),
                                                   ctx.models, ctx.batch)
            if stronger_routed is None:
                break
            for reason in verdict.reasons:
                self.router.instruments.escalations.add((reason.split(" (")[0],))
            try:
                stronger, stronger_headers, stronger_deployment = await self._collect(
                    ctx, stronger_routed)
            except GatewayError as exc:
                # The stronger model failed: the answer stands, verdict and all, and the
                # header says that a stronger one was asked.
                escalated.append(f"{deployment.model.name} ({', '.join(verdict.reasons)}); "
                                 f"the stronger model failed ({exc.code or exc.status})")
                ctx.headers[ESCALATED] = "; ".join(escalated)
                break
            escalated.append(f"{deployment.model.name} ({', '.join(verdict.reasons)})")
            ctx.headers[ESCALATED] = "; ".join(escalated)
            _used(ctx, completion)  # (the answer found wanting was paid for too)
            completion, headers, deployment = stronger, stronger_headers, stronger_deployment
        else:
            await self._judge(ctx, completion, deployment, outcome)
        return completion, headers

    async def _collect(self, ctx: RequestContext, routed: RoutedAnswer,
                       started: float | None = None
                       ) -> tuple[Completion, dict[str, str], Deployment]:
        """The whole answer; a failure is recorded as the request's outcome when
        ``started`` (the first answer's, not an escalation's).
        """
        try:
            await routed.start()
        except GatewayError as exc:
            if started is not None:
                record_outcome(self.router, ctx, routed, started, error=exc)
            raise
        completion = Completion()
        chunks = self._wrap(ctx, routed.chunks())
        try:
            async for chunk in chunks:
                completion.add(chunk)
            completion.model = ctx.model = routed.deployment.model.name
        finally:
            await _closed(chunks)  # at once, however it ended (never by the loop, later)
            await routed.close()
        return completion, _route_of(routed), routed.deployment

    async def _judge(self, ctx: RequestContext, completion: Completion,
                     deployment: Deployment, outcome: Outcome | None = None
                     ) -> Verdict | None:
        """Every plugin's on_complete, in order; the first failing verdict that asks for a
        stronger model (QA's), if any. Verdicts are counted for the deployment that answered;
        with ``outcome``, the request's outcome is recorded (and learned from).
        """
        escalate: Verdict | None = None
        judged = False
        ctx.rejected = None
        request_span = current_span()
        notes = NOTES.get()
        for plugin in self.plugins:
            span = request_span.child(f"{plugin.name} on_complete") \
                if request_span.recording else NO_SPAN
            try:
                verdict = await plugin.on_complete(ctx, completion)
            except GatewayError:
                span.end()
                raise
            except Exception:  # a judge's bug must not throw away an answer already made
                log.exception("plugin %s: on_complete failed; the answer goes on unjudged",
                              plugin.name)
                verdict = None
            if verdict is not None:
                span.set("gateway.verdict", verdict.checks())
            span.end()
            if verdict is None:
                continue
            if notes is not None:  # the request log's line: each plugin's verdict
                notes[plugin.name] = verdict.checks()
            judged = True
            if not verdict.ok:
                ctx.rejected = ctx.rejected or verdict  # later plugins (the cache) see it
                if verdict.escalate and escalate is None:
                    escalate = verdict
        if judged:
            reasons = ctx.rejected.reasons if ctx.rejected else ()
            self.router.balancer.state(deployment).judged(ctx.rejected is None, reasons)
        if outcome is not None:
            record_outcome(self.router, ctx, outcome[0], outcome[1], completion=completion,
                           escalating=escalate is not None)
        return escalate

    def _wrap(self, ctx: RequestContext, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        for plugin in self.plugins:
            chunks = plugin.on_stream(ctx, chunks)
        return chunks

    async def start(self) -> None:
        for plugin in self.plugins:
            await plugin.start()

    async def close(self) -> None:
        for plugin in reversed(self.plugins):
            await plugin.close()

    def report(self) -> dict[str, Any]:
        return {plugin.name: plugin.report() for plugin in self.plugins}


async def _taking(completion: Completion, chunks: AsyncIterator[Chunk]
                  ) -> AsyncGenerator[Chunk]:
    """The chunks, added to ``completion`` as they go out: the answer as the client has it,
    which is what the plugins judge and the cache keeps. Closing it closes ``chunks``.
    """
    try:
        async for chunk in chunks:
            completion.add(chunk)
            yield chunk
    finally:
        await _closed(chunks)


async def _closed(chunks: AsyncIterator[Chunk]) -> None:
    """Close a chain of chunks (its plugins' wrappers, then the upstream's) now: one left
    unfinished would be closed by the event loop later, in a task of its own.
    """
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()


def _tokens_said(message: str) -> int:
    """The prompt's tokens as a context-length refusal counts them ("... maximum context
    length is 4096 tokens. However, your messages resulted in 6012 tokens."), 0 if it does
    not say."""
    return max((int(n.replace(",", "")) for n in TOKENS_SAID.findall(message)), default=0)


TOKENS_SAID = re.compile(r"(\d[\d,]*) tokens")


def _used(ctx: RequestContext, answer: Completion) -> None:
    """Tell the caller the tokens a model's answer used, as it said; or, when it did not
    (cut off, or a backend that does not count), the tokens of it that came, estimated.
    """
    usage = answer.usage
    if usage is not None:
        if ctx.on_usage is not None:
            ctx.on_usage(usage.prompt_tokens + usage.completion_tokens)
    elif ctx.on_output is not None:
        ctx.on_output(answer.rough_tokens())


def _route_of(routed: RoutedAnswer) -> dict[str, str]:
    deployment = routed.deployment
    return route_headers(deployment.backend.name, deployment.model.name, routed.attempts,
                         routed.route)


async def _replay(chunks: list[Chunk]) -> AsyncIterator[Chunk]:
    for chunk in chunks:
        yield chunk
