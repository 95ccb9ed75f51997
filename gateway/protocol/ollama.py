"""Ollama's native wire format: OpenAI requests → ``/api/chat`` and ``/api/generate``
payloads, NDJSON lines → normalized chunks, and model listings → ``ModelInfo``; with the
pieces the Ollama door shares (option names, times, sizes).
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from gateway.errors import InvalidRequest, stream_error
from gateway.protocol.openai import (
    ChatRequest,
    CompletionRequest,
    Sampling,
    image_url,
    not_passed_on,
    text_of,
)
from gateway.protocol.reasoning import ThinkTagSplitter
from gateway.protocol.sse import MalformedEvent, text_field
from gateway.protocol.times import epoch_seconds
from gateway.protocol.units import Chunk, ModelInfo, Usage, parse_parameter_size, presumed

# Extra sampling fields some clients send, which Ollama understands under the same name.
_PASSTHROUGH_OPTIONS = ("top_k", "min_p", "repeat_penalty", "frequency_penalty",
                        "presence_penalty")
# Ollama options that are OpenAI request fields too (``options`` maps them back); the rest
# of Ollama's options have no OpenAI field and travel in a request's ``ollama`` fields.
OPENAI_FIELDS = {"temperature": "temperature", "top_p": "top_p", "num_predict": "max_tokens",
                 "stop": "stop", "seed": "seed", "frequency_penalty": "frequency_penalty",
                 "presence_penalty": "presence_penalty"}


def options(sampling: Sampling, body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if sampling.temperature is not None:
        out["temperature"] = sampling.temperature
    if sampling.top_p is not None:
        out["top_p"] = sampling.top_p
    if sampling.max_tokens is not None:
        out["num_predict"] = sampling.max_tokens
    if sampling.stop:
        out["stop"] = sampling.stop
    if sampling.seed is not None:
        out["seed"] = sampling.seed
    for key in _PASSTHROUGH_OPTIONS:
        if isinstance(body.get(key), int | float):
            out[key] = body[key]
    return out


def chat_payload(req: ChatRequest, model: str, keep_alive: str, *, thinks: bool) -> dict[str, Any]:
    """``thinks``: the model has the thinking capability (only such models accept ``think``)."""
    payload: dict[str, Any] = {
        "model": model,
        "messages": messages(req.messages),
        "stream": True,  # a whole answer is the collected stream
    }
    opts = options(req.sampling, req.body)
    if opts:
        payload["options"] = opts
    if req.tools and req.tool_choice != "none":
        payload["tools"] = _chosen(req.tools, req.tool_choice)
    fmt = req.response_format or {}
    if fmt.get("type") == "json_object":
        payload["format"] = "json"
    elif fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        payload["format"] = schema if isinstance(schema, dict) else "json"
    if req.reasoning_effort is not None and thinks:
        payload["think"] = req.reasoning_effort not in ("none", "minimal")
    if keep_alive:
        payload["keep_alive"] = keep_alive_value(keep_alive)
    return _with_client_fields(payload, req.ollama, thinks)


def _chosen(tools: list[Any], choice: Any) -> list[Any]:
    """The tools the model is offered. Ollama has no ``tool_choice``: a choice that names a
    function is kept by offering that function alone ("required" cannot be kept).
    """
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    named = [t for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)
             and t["function"].get("name") == name] if isinstance(name, str) else []
    return named or tools


def generate_payload(req: CompletionRequest, model: str, keep_alive: str, *,
                     thinks: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": model, "prompt": req.prompt, "stream": True}
    if req.suffix is not None:
        payload["suffix"] = req.suffix
    opts = options(req.sampling, req.body)
    if opts:
        payload["options"] = opts
    if keep_alive:
        payload["keep_alive"] = keep_alive_value(keep_alive)
    return _with_client_fields(payload, req.ollama, thinks)


def _with_client_fields(payload: dict[str, Any], fields: dict[str, Any] | None,
                        thinks: bool) -> dict[str, Any]:
    """What an Ollama client asked for beyond OpenAI's fields, passed on as it asked."""
    if not fields:
        return payload
    if fields.get("options"):
        payload["options"] = {**payload.get("options", {}), **fields["options"]}
    for key in ("keep_alive", "format", "raw"):
        if key in fields:
            payload[key] = fields[key]
    if "think" in fields and thinks:  # only thinking models accept it
        payload["think"] = fields["think"]
    return payload


def keep_alive_value(text: str) -> str | int:
    """Ollama takes a number of seconds or a Go duration ("5m"); "-1" must go as a number."""
    return int(text) if text.lstrip("-").isdigit() else text


def messages(source: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages in Ollama's shape: text content, base64 ``images``, object arguments;
    a part Ollama has no place for (audio, a file) named in the text, so that the model
    knows it was there (it answered as if it had never been sent).
    """
    out: list[dict[str, Any]] = []
    tool_names: dict[str, str] = {}
    for message in source:
        role = message["role"]
        role = {"developer": "system", "function": "tool"}.get(role, role)
        content = message.get("content")
        converted: dict[str, Any] = {"role": role, "content": text_of(content)}
        if isinstance(content, list):
            images = [_image_data(p) for p in content if p.get("type") == "image_url"]
            if images:
                converted["images"] = images
            left = [p["refusal"] if p.get("type") == "refusal" and isinstance(
                        p.get("refusal"), str) else not_passed_on(str(p.get("type")))
                    for p in content if p.get("type") not in ("text", "image_url")]
            if left:
                converted["content"] = "\n".join(filter(None, (converted["content"], *left)))
        calls = message.get("tool_calls")
        if calls:
            converted["tool_calls"] = [_tool_call_out(call, tool_names) for call in calls]
        if role == "tool":
            name = message.get("name") or tool_names.get(message.get("tool_call_id") or "")
            if name:
                converted["tool_name"] = name
        out.append(converted)
    return out


def _image_data(part: dict[str, Any]) -> str:
    url = image_url(part) or ""
    header, _, data = url.partition(",")
    if not (header.startswith("data:") and header.endswith(";base64") and data):
        raise InvalidRequest(
            "Images must be sent inline as base64 data: URLs (data:image/png;base64,...); "
            "the gateway does not fetch remote URLs.", param="messages", code="invalid_image_url",
        )
    return data


def _tool_call_out(call: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    function = call["function"]
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            raise InvalidRequest(
                f"tool call {function['name']!r} has arguments that are not valid JSON.",
                param="messages",
            ) from None
    if call.get("id"):
        names[call["id"]] = function["name"]
    return {"function": {"name": function["name"], "arguments": arguments}}


class OllamaTranslator:
    """``/api/chat`` or ``/api/generate`` objects (stream lines or a whole answer) → chunks."""

    __slots__ = ("_backend", "_calls", "_think", "complete", "finished")

    def __init__(self, backend: str) -> None:
        self._backend = backend
        self._calls = 0
        self._think = ThinkTagSplitter()
        self.finished = self.complete = False

    def chunk(self, obj: Any) -> Chunk:
        if not isinstance(obj, dict):
            raise MalformedEvent("not an object")
        if "error" in obj:
            raise stream_error(self._backend, obj["error"])
        try:
            chunk = self._delta(obj)
        except (AttributeError, LookupError, TypeError, ValueError) as exc:
            raise MalformedEvent(str(exc)) from None
        if obj.get("done"):
            reason = obj.get("done_reason")
            chunk.finish_reason = (
                "tool_calls" if self._calls else "length" if reason == "length" else "stop"
            )
            chunk.usage = Usage(_count(obj, "prompt_eval_count"), _count(obj, "eval_count"))
            self.finished = self.complete = True
        return self._think.feed(chunk)

    def _delta(self, obj: dict[str, Any]) -> Chunk:
        message = obj.get("message")
        if message is None:  # /api/generate
            return Chunk(text_field(obj.get("response")), text_field(obj.get("thinking")))
        # (Content, reasoning: positional, which is quicker, for every line.)
        chunk = Chunk(text_field(message.get("content")), text_field(message.get("thinking")))
        calls = message.get("tool_calls")
        if calls:
            chunk.tool_calls = [self._tool_call(call) for call in calls]
        return chunk

    def _tool_call(self, call: dict[str, Any]) -> dict[str, Any]:
        function = call.get("function") or {}
        arguments = function.get("arguments", {})
        out = {
            "index": self._calls,
            "id": text_field(call.get("id")) or "call_" + secrets.token_hex(12),
            "type": "function",
            "function": {
                "name": text_field(function.get("name")),
                "arguments": arguments if isinstance(arguments, str)
                else orjson.dumps(arguments).decode(),
            },
        }
        self._calls += 1  # (a call that is not one is not counted)
        return out


def _count(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    return value if isinstance(value, int) else 0


def model_info(
    backend: str, entry: dict[str, Any], show: dict[str, Any] | None,
    loaded: dict[str, int | None]
) -> ModelInfo:
    """One ``/api/tags`` entry, completed by ``/api/show`` when available. ``loaded``: the
    models ``/api/ps`` says are loaded, each with the window it runs with now.
    """
    details = entry.get("details") or {}
    name = entry.get("name") or entry.get("model") or ""
    capabilities = set((show or {}).get("capabilities") or entry.get("capabilities") or [])
    known = reported = bool(capabilities)
    if not capabilities:  # /api/show failed (it is asked again at the next scan), or an
        # Ollama older than capabilities said nothing: a model that generates, unless its
        # name says it embeds (after a failure, only presumed)
        guess, sure = presumed(name, details.get("family") or "")
        capabilities, known = set(guess), sure or show is not None
    if "completion" in capabilities:
        capabilities.add("chat")
    return ModelInfo(
        name=name,
        backend=backend,
        family=details.get("family", ""),
        parameters=parse_parameter_size(details.get("parameter_size")),
        quantization=details.get("quantization_level", ""),
        context_length=_context_length(details, show),
        running_context=loaded.get(name),
        capabilities=frozenset(capabilities),
        known=known,
        reported=reported,
        loaded=name in loaded,
        created=epoch_seconds(entry.get("modified_at")),
    )


def parameter_size(count: float | None) -> str:
    """A parameter count as Ollama writes it: "8.0B", "135M"; "" when unknown."""
    if not count:
        return ""
    if count >= 1e9:
        return f"{count / 1e9:.1f}B"
    if count >= 1e6:
        return f"{count / 1e6:.0f}M"
    return f"{count / 1e3:.0f}K"


def _context_length(details: dict[str, Any], show: dict[str, Any] | None) -> int | None:
    if isinstance(details.get("context_length"), int):
        return int(details["context_length"])
    for key, value in ((show or {}).get("model_info") or {}).items():
        if key.endswith(".context_length") and isinstance(value, int):
            return value
    return None
