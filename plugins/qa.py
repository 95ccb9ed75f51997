"""Quality assurance: a finished answer is checked, and a poor one from a cheap model is taken
to a stronger one.

Checks: an empty answer; one cut by the length limit when the client set none; a repetition
loop; invalid JSON when the response format asks for JSON (and, for ``json_schema``, a check
against the schema); a refusal the request gave no reason for. The verdict goes in the header
``x-gateway-qa`` (and the last chunk of a stream). A failing verdict on a whole answer — or a
streamed one the client gets only once it is whole, which JSON formats are by default — asks
the pipeline for a stronger model. The pipeline counts verdicts per deployment, for routing.
"""

from __future__ import annotations

import collections
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.protocol.openai import ChatRequest
from gateway.protocol.units import Completion
from plugins.base import BasePlugin, Count, RequestContext, Verdict

log = logging.getLogger(__name__)

HEADER = "x-gateway-qa"
CHECKS = ("empty", "length", "repetition", "json", "refusal")

# A refusal opens the answer: "I can't help with that.", "I'm sorry, but I cannot provide
# ...", "As an AI, I cannot ...", "I must decline", "I won't be able to help", or a bare "I
# can't." (a typographic apostrophe too) — what the model will not do, not what it could not
# find ("Sorry, I can't find a bug in it: ..."), an idiom ("I can't help but point out..."),
# or one that goes on to answer ("I cannot give medical advice, but the usual dose is ...");
# one that goes on only to offer something else ("but I'd be happy to help with ...") is a
# refusal all the same.
_OFFER = (r"(?:I(?:['\u2019]d|\s+would)\s+be\s+(?:happy|glad)|I\s+can\s+(?:help|offer|suggest|"
          r"assist|point)|here\s+(?:are|is)\s+(?:some\s+)?(?:general|other|alternative))")
_BUT = r"(?![^.!?\n]{0,80}\bbut\b(?!\s+" + _OFFER + r"))"  # (going on to answer)
_CANT = r"(?:can(?:no|['\u2019])t|cannot)"
_REFUSAL = re.compile(
    # As an AI, it cannot (anything: "browse the internet" is a refusal to)
    r"^\W*As\s+an\s+AI(?:\s+language\s+model)?,?\s+I\s+(?:" + _CANT + r"|don['\u2019]t\s+have"
    r"\s+the\s+(?:ability|capability))\b" + _BUT +
    # or it will not do what was asked
    r"|^\W*(?:No,?\s+)?(?:(?:I(?:['\u2019]m|\s+am)\s+(?:really\s+|so\s+|very\s+)?(?:sorry|"
    r"afraid)|I\s+apologi[sz]e|Sorry|Unfortunately)[,.]?\s+(?:but\s+)?)?(?:that['\u2019]s\s+not\s+"
    r"something\s+I\s+can\s+(?:help|assist)\b|I(?:['\u2019]m|\s+am)?\s+(?:must\s+(?:respectfully"
    r"\s+)?decline\b|(?:" + _CANT + r"|won['\u2019]t(?:\s+be\s+able\s+to)?|"
    r"will\s+not(?:\s+be\s+able\s+to)?|not\s+(?:able|going)\s+to|unable\s+to)"
    r"(?:\s+and\s+(?:will|can)\s*not)?"
    r"(?:\s+(?:help(?!\s+(?:but|thinking|feeling|wondering|noticing)\b)|assist|provide|comply|"
    r"do\s+(?:that|this|it)|fulfill?|answer(?!\s+(?:that|this|it)\s+(?:(?:with\s+(?:any\s+|"
    r"\d+%\s+)?(?:certainty|confidence)|for\s+(?:sure|certain)|definitively|precisely|exactly|"
    r"accurately)\b|(?:accurately\s+)?without\b))|create|write(?!\s+to\b)|generate|share|"
    r"engage|give|support(?!\s+(?:that|this|the)\s+claim\b))\b" + _BUT +
    r"|\s*[,.!]?\s*(?:sorry[.!]?)?\s*$)))",
    re.IGNORECASE)
# What, after the refusal's words, makes it an answer that opened with a hedge ("I can't run
# code. Here is the function:\n...", "... run `pip install x`", "... it was 2.1 million"):
# a block of code, a colon that introduces lines of their own, code inline (more than a word),
# a figure with decimals. (Not any number or word in backticks: a refusal may give a hotline's
# number, a section of a policy, the `safety` guidelines.)
_ANSWERED = re.compile(r"```|:[ \t]*\n|`[^`\n]*[\s(=/.][^`\n]*`|\d\.\d")


@dataclass(frozen=True, slots=True)
class QualityOptions:
    checks: tuple[str, ...] = CHECKS
    escalate: bool = True  # a failing answer is taken to a stronger model (when it can be)
    buffer_json: bool = True  # streams asking for JSON reach the client only once checked
    loop_min_chars: int = 120  # the least text a repetition loop must span
    refusal_max_chars: int = 400  # longer answers that open with an apology are answers

    def problems(self) -> Iterator[tuple[str, str]]:
        for check in self.checks:
            if check not in CHECKS:
                yield "checks", f"no such check {check!r} (checks: {', '.join(CHECKS)})"
        if self.loop_min_chars < 20:
            yield "loop_min_chars", "expected at least 20"


class QualityPlugin(BasePlugin):
    Options = QualityOptions
    name = "qa"

    def __init__(self, options: QualityOptions) -> None:
        self.options = options
        self.checks = frozenset(options.checks)
        self.stats = collections.Counter[str]()  # per model: in the routing report

    def report(self) -> dict[str, Any]:
        return dict(self.stats)

    def counts(self) -> list[Count]:
        stats = self.stats
        return [Count("gateway.qa.verdicts", "Answers judged, by verdict", ("verdict",),
                      {("pass",): stats["pass"], ("fail",): stats["fail"]}),
                Count("gateway.qa.failures", "Checks answers failed, by check", ("check",),
                      {(check,): stats[check] for check in self.checks})]

    async def on_request(self, ctx: RequestContext) -> None:
        if ctx.req.stream and self.options.buffer_json and "json" in self.checks and \
                _json_format(ctx) is not None:
            ctx.buffered = True
        return None

    async def on_complete(self, ctx: RequestContext, result: Completion) -> Verdict | None:
        try:
            reasons = tuple(self.judge(ctx, result))
        except Exception:  # a check's bug must not fail an answer it was only to judge
            log.exception("qa: judging the answer failed; it is passed on unjudged")
            return None
        self.stats["pass" if not reasons else "fail"] += 1
        self.stats.update(reason.split(" (")[0] for reason in reasons)
        verdict = Verdict(ok=not reasons, reasons=reasons,
                          escalate=bool(reasons) and self.options.escalate)
        ctx.headers[HEADER] = verdict.describe()
        return verdict

    def judge(self, ctx: RequestContext, result: Completion) -> Iterator[str]:
        """The names of the checks the answer fails."""
        text = result.content
        if result.tool_calls:  # an answer by tool call: its text may well be empty
            return
        if result.refusal:  # the model's refusal, said in its own field
            if "refusal" in self.checks and not ctx.headers.get("x-gateway-safety"):
                yield "refusal"
            return
        if "empty" in self.checks and not text.strip():
            if result.finish_reason == "length" and ctx.req.sampling.max_tokens is not None:
                return  # (the client's own limit, spent before the text: on reasoning, say)
            yield "empty"
            return
        if "length" in self.checks and result.finish_reason == "length" and \
                ctx.req.sampling.max_tokens is None and not result.overtime:
            yield "length"  # (cut by its time, it is as long as the gateway lets answers be)
        if "repetition" in self.checks and looping(text, self.options.loop_min_chars):
            yield "repetition"
        fmt = _json_format(ctx)
        if "json" in self.checks and fmt is not None:
            problem = json_problem(text, fmt)
            if problem is not None:
                yield f"json ({problem})"
        if "refusal" in self.checks and len(text) <= self.options.refusal_max_chars and \
                (said := _REFUSAL.match(text)) and not _ANSWERED.search(text, said.end()) \
                and not ctx.headers.get("x-gateway-safety"):
            yield "refusal"


def _json_format(ctx: RequestContext) -> dict[str, Any] | None:
    if not isinstance(ctx.req, ChatRequest) or not ctx.req.response_format:
        return None
    fmt = ctx.req.response_format
    return fmt if fmt.get("type") in ("json_object", "json_schema") else None


def looping(text: str, min_chars: int) -> bool:
    """Whether the text ends in one piece repeated over and over.

    A loop is a stretch of at least ``min_chars`` characters and at least four periods long
    that repeats itself — what a model stuck in a cycle writes ("I will help. I will help.
    …", or one line again and again). Only the periods at which the last few characters
    recur are tried, so an answer without a loop costs a few searches.
    """
    text = text.rstrip()
    n = len(text)
    if n < min_chars:
        return False
    probe = text[-16:]
    end = n - len(probe)  # where the probe starts
    at = text.rfind(probe, 0, n - 1)
    while at >= 0:
        period = end - at
        needed = max(min_chars, 4 * period)
        if needed > n:
            return False  # longer periods need even more text
        if text[n - needed + period:] == text[n - needed:n - period]:
            return True
        at = text.rfind(probe, 0, at + len(probe) - 1)
    return False


def json_problem(text: str, fmt: dict[str, Any]) -> str | None:
    """What is wrong with ``text`` as the JSON the response format asks for, or None."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return "not valid JSON"
    if fmt.get("type") == "json_object":
        return None if isinstance(value, dict) else "not a JSON object"
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        return None
    return schema_problem(value, schema, "$")


_TYPES: dict[str, Any] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}


def schema_problem(value: Any, schema: dict[str, Any], at: str) -> str | None:
    """The first way ``value`` breaks ``schema`` (types, required and allowed properties,
    items, enum, const), or None. A check of structure, not a full JSON Schema validator.
    """
    if "const" in schema and value != schema["const"]:
        return f"{at} is not {schema['const']!r}"
    if isinstance(schema.get("enum"), list) and value not in schema["enum"]:
        return f"{at} is not one of the allowed values"
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key] and all(
                schema_problem(value, s, at) for s in schema[key] if isinstance(s, dict)):
            return f"{at} matches none of {key}"
    wanted = schema.get("type")
    types = wanted if isinstance(wanted, list) else [wanted] if wanted else []
    if types and not any(_is(value, t) for t in types):
        return f"{at} is not of type {'/'.join(map(str, types))}"
    if isinstance(value, dict):
        required = schema.get("required")  # (draft 3's "required": true is not a list)
        for name in required if isinstance(required, list) else ():
            if isinstance(name, str) and name not in value:
                return f"{at}.{name} is missing"
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            properties = {}
        for name, item in value.items():
            if name in properties and isinstance(properties[name], dict):
                problem = schema_problem(item, properties[name], f"{at}.{name}")
                if problem:
                    return problem
            elif schema.get("additionalProperties") is False:
                return f"{at}.{name} is not allowed"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problem = schema_problem(item, schema["items"], f"{at}[{i}]")
            if problem:
                return problem
    return None


def _is(value: Any, type_name: Any) -> bool:
    expected = _TYPES.get(type_name)
    if expected is None:
        return True  # a type this check does not know is not held against the answer
    if isinstance(value, bool) and type_name in ("integer", "number"):
        return False
    if type_name == "integer" and isinstance(value, float):
        return value.is_integer()  # (JSON Schema's integer: any number without a fraction)
    return isinstance(value, expected)
