"""The Ollama door's wire format: ``/api/chat`` and ``/api/generate`` requests as the
gateway's one internal request, and answers as Ollama's NDJSON lines or one JSON object.

A request's Ollama options that OpenAI also has (temperature, num_predict...) become its
fields; the rest (num_ctx, top_k, keep_alive, think...) ride along in ``req.ollama`` and only
Ollama backends send them on. ``/api/generate`` is a text completion when it is ``raw`` or
fills in the middle (``suffix``), and otherwise one chat turn, as Ollama applies the model's
template to it. Its answer carries a ``context`` to send back for the next turn, as
Ollama's does (``gateway.doors.ollama_context``).
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Literal

import orjson

from gateway.config import ReasoningMode
from gateway.doors.ollama_context import context_of, history_of
from gateway.errors import MODEL_NAME_MAX, GatewayError, InvalidRequest
from gateway.http.stream import NDJSON, ndjson_line
from gateway.protocol.ollama import OPENAI_FIELDS
from gateway.protocol.openai import (
    ChatRequest,
    CompletionRequest,
    arguments_object,
    named_as,
    parse_chat,
    parse_completion,
)
from gateway.protocol.reasoning import ReasoningView
from gateway.protocol.times import rfc3339
from gateway.protocol.units import Chunk, Completion, Usage
from gateway.telemetry import ANSWER_BEGAN

# The chat request's fields that come from the options: errors name the options.
FIELDS = {chat: f"options.{option}" for option, chat in OPENAI_FIELDS.items()}

Shape = Literal["chat", "generate"]  # which endpoint's lines: message or response


def bad(message: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_value")


def model_of(body: dict[str, Any]) -> str:
    """The model a request names (Ollama's clients say ``model``, some older ones ``name``)."""
    model = body.get("model") or body.get("name")
    if not isinstance(model, str) or not model.strip():
        raise bad("model is required")
    if len(model) > MODEL_NAME_MAX:
        raise bad(f"model is a name of at most {MODEL_NAME_MAX} characters")
    return model


def streams(body: dict[str, Any]) -> bool:
    stream = body.get("stream")  # Ollama streams unless told not to (null: not told)
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise bad("stream must be true or false")
    return stream


def chat_request(body: dict[str, Any]) -> ChatRequest | None:
    """The request, or None for one without messages (Ollama's way to load a model)."""
    model, stream = model_of(body), streams(body)
    messages = body.get("messages")
    if messages is not None and not isinstance(messages, list):
        raise bad("messages must be an array")  # (not a load: a request said wrong)
    if not messages:
        return None
    openai: dict[str, Any] = {"model": model, "stream": stream,
                              "messages": _messages(messages)}
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad("tools must be an array")
    if tools:  # the Python client sends [] for none
        openai["tools"] = tools
    return _chat(body, openai)


def generate_request(body: dict[str, Any]) -> ChatRequest | CompletionRequest | None:
    """A text completion (``raw``, or ``suffix``: fill in the middle) or a chat turn; None
    for a request without a prompt (Ollama's way to load a model).
    """
    model, stream = model_of(body), streams(body)
    prompt, suffix, system = (_text(body, key) for key in ("prompt", "suffix", "system"))
    suffix = suffix or None  # an empty suffix is none, as Ollama has it
    images = _images(body.get("images"), "images")
    raw = body.get("raw")
    if raw is not None and not isinstance(raw, bool):
        raise bad("raw must be true or false")
    if raw and (system or body.get("template") or body.get("context")):
        raise bad("raw mode does not support template, system, or context")
    if not prompt and not images and suffix is None:
        return None
    openai: dict[str, Any] = {"model": model, "stream": stream}
    if raw or suffix is not None:
        if images:
            raise bad("images need a chat turn: send them without raw or suffix")
        openai["prompt"] = prompt or ""
        if suffix is not None:
            openai["suffix"] = suffix
        fields = _sampling(body, openai)
        if raw:
            fields["raw"] = True
        if body.get("format"):
            fields["format"] = body["format"]
        with named_as(FIELDS):
            completion = parse_completion(openai)
        completion.ollama = fields
        return completion
    user: dict[str, Any] = {"role": "user", "content": prompt or ""}
    if images:
        user["images"] = images
    openai["messages"] = _messages([*history_of(body.get("context")),
                                    *([{"role": "system", "content": system}] if system
                                      else []), user])
    return _chat(body, openai)


def _chat(body: dict[str, Any], openai: dict[str, Any]) -> ChatRequest:
    """The chat request: ``openai`` (its model, stream and messages set) with the format
    and sampling of the Ollama ``body``.
    """
    fmt = _response_format(body.get("format"))
    if fmt is not None:
        openai["response_format"] = fmt
    fields = _sampling(body, openai)
    with named_as(FIELDS):
        req = parse_chat(openai)
    req.ollama = fields
    return req


def thinking_mode(body: dict[str, Any], mode: ReasoningMode) -> ReasoningMode:
    """How reasoning reaches this client: not at all when it said ``think: false``, in its
    own ``thinking`` field when it asked for it (``think: true``, ``"high"``), whatever the
    gateway's ``[server] reasoning`` does for clients that read only text.
    """
    think = body.get("think")
    return "drop" if think is False else "separate" if think else mode


# --- requests -------------------------------------------------------------------------------


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Ollama messages as OpenAI's: images as data-URL parts, tool-call arguments as JSON
    text, each tool result tied to the call it answers.
    """
    out: list[dict[str, Any]] = []
    ids = itertools.count()
    open_calls: list[tuple[str, str]] = []  # (id, name) of calls not answered yet
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}] must be an object with role and content")
        converted: dict[str, Any] = {"role": message.get("role"),
                                     "content": message.get("content") or ""}
        if message.keys() <= _PLAIN and converted["role"] != "tool":  # the common case
            out.append(converted)
            continue
        images = _images(message.get("images"), f"messages[{i}].images")
        if images:
            converted["content"] = [{"type": "text", "text": converted["content"]}, *(
                {"type": "image_url", "image_url": {"url": _data_url(image)}}
                for image in images)]
        calls = message.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise bad(f"messages[{i}].tool_calls must be an array")
        if calls:
            made = [_call(call, f"call_{next(ids)}", f"messages[{i}]") for call in calls]
            converted["tool_calls"] = made
            open_calls += [(c["id"], c["function"]["name"]) for c in made]
        if converted["role"] == "tool":
            name = message.get("tool_name")
            match = next((c for c in open_calls if c[1] == name), None) or \
                (open_calls[0] if open_calls else None)
            if match is not None:
                open_calls.remove(match)
                converted["tool_call_id"] = match[0]
        out.append(converted)
    return out


_PLAIN = frozenset({"role", "content"})  # a message with nothing else to convert


def _call(call: Any, default_id: str, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad(f"{where}.tool_calls: each needs function.name")
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = orjson.dumps(arguments).decode()
    call_id = call.get("id")
    return {"id": call_id if isinstance(call_id, str) and call_id else default_id,
            "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _images(images: Any, where: str) -> list[str]:
    if images is None:
        return []
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise bad(f"{where} must be an array of base64-encoded images")
    return images


# What an image's first base64 characters say it is.
_IMAGE_KINDS = (("iVBORw0KGgo", "image/png"), ("/9j/", "image/jpeg"), ("R0lGOD", "image/gif"),
                ("UklGR", "image/webp"))


def _data_url(image: str) -> str:
    kind = next((t for prefix, t in _IMAGE_KINDS if image.startswith(prefix)), "image/png")
    return f"data:{kind};base64,{image}"


def _response_format(fmt: Any) -> dict[str, Any] | None:
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    raise bad('format must be "json" or a JSON schema object')


# What OpenAI's API takes of the options both have (Ollama takes more).
OPENAI_BOUNDS = {"temperature": (0.0, 2.0), "frequency_penalty": (-2.0, 2.0),
                 "presence_penalty": (-2.0, 2.0)}


def _sampling(body: dict[str, Any], openai: dict[str, Any]) -> dict[str, Any]:
    """Sets the OpenAI fields of the request's options on ``openai``; the Ollama fields
    that have none (other options, keep_alive, think).
    """
    options = body.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise bad("options must be an object")
    rest: dict[str, Any] = {}
    for option, value in options.items():
        field = OPENAI_FIELDS.get(option)
        if field is None:
            rest[option] = value
        elif value is not None and not (option == "num_predict" and isinstance(value, int)
                                        and value <= 0):  # -1: no limit, -2: to the end
            bounds = OPENAI_BOUNDS.get(option)
            if bounds is not None and isinstance(value, (int, float)) and \
                    not isinstance(value, bool) and not bounds[0] <= value <= bounds[1]:
                # Ollama takes it (a temperature of 2.5): Ollama is sent it as it is, and
                # an OpenAI-compatible backend the nearest it takes
                rest[option] = value
                value = min(max(value, bounds[0]), bounds[1])
            openai[field] = value
    fields: dict[str, Any] = {"options": rest} if rest else {}
    think, keep_alive = body.get("think"), keep_alive_of(body)
    if think is not None:
        if not isinstance(think, bool | str):  # (a level's name is the model's to know:
            raise bad("think must be true, false or a level (\"high\")")  # "max" too)
        fields["think"] = think
    if keep_alive is not None:
        fields["keep_alive"] = keep_alive
    return fields


def keep_alive_of(body: dict[str, Any]) -> str | float | None:
    """How long the model is to stay loaded, as the client said it (None: it did not)."""
    keep_alive = body.get("keep_alive")
    if keep_alive is not None and (not isinstance(keep_alive, str | int | float)
                                   or isinstance(keep_alive, bool)):
        raise bad("keep_alive must be a duration (\"5m\") or a number of seconds")
    return keep_alive


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise bad(f"{key} must be a string")
    return value


# --- answers --------------------------------------------------------------------------------


class OllamaStream:
    """One answer as Ollama's NDJSON lines, and as its one object when not streamed.

    Tool calls go out whole, their arguments as objects (as Ollama sends them), on a line of
    their own before the last; the last line says ``done`` with Ollama's counts and
    durations as the gateway saw them (nanoseconds, from when the request arrived).
    """

    media_type = NDJSON
    __slots__ = ("_calls", "_first_at", "_model", "_reason", "_said", "_shape", "_started",
                 "_turns", "_usage", "_view")

    def __init__(self, shape: Shape, model: str, reasoning: ReasoningMode,
                 started: float, turns: list[dict[str, str]] | None = None) -> None:
        """``turns``: a generate answer's conversation up to its question, for the
        ``context`` of its last line."""
        self._shape = shape
        self._turns = turns
        self._said: list[str] = []  # (the answer's text, for that context)
        self._model = model
        self._view = ReasoningView(reasoning)
        self._started = started  # time.perf_counter() when the request arrived
        self._first_at: float | None = None
        self._calls: Completion | None = None  # tool-call deltas, merged (when there are)
        self._usage: Usage | None = None
        self._reason = "stop"

    def switch_model(self, model: str) -> None:
        self._model = model

    def begin(self) -> bytes:
        return b""

    def chunk(self, chunk: Chunk) -> bytes:
        if self._first_at is None:
            self._first_at = time.perf_counter()
        if chunk.usage is not None:
            self._usage = chunk.usage
        if chunk.finish_reason is not None:
            self._reason = "length" if chunk.finish_reason == "length" else "stop"
        if chunk.tool_calls:
            self._calls = self._calls or Completion()
            self._calls.add(Chunk(tool_calls=chunk.tool_calls))
        thought, text = self._view.split(chunk)
        text += chunk.refusal  # (Ollama has no field for a refusal: it is said as text)
        if not text and not thought:
            return b""
        if self._turns is not None and (chunk.content or chunk.refusal):
            self._said.append(chunk.content + chunk.refusal)
        return ndjson_line(self._line(text, thought, done=False))

    def end(self, trailers: dict[str, str]) -> bytes:
        """The tool calls, whole, then the last line (with the gateway's late verdicts as
        ``x_gateway_*`` fields, which clients ignore).
        """
        out = b""
        if self._calls is not None and self._shape == "chat":
            line = self._line("", "", done=False)
            line["message"]["tool_calls"] = tool_calls(self._calls)
            out = ndjson_line(line)
        last = {**self._line("", "", done=True), **self._counts()}
        if self._turns is not None:
            last["context"] = self._context("".join(self._said))
        last.update({name.replace("-", "_"): value for name, value in trailers.items()})
        return out + ndjson_line(last)

    def _context(self, answer: str) -> list[int]:
        assert self._turns is not None
        return context_of([*self._turns, {"role": "assistant", "content": answer}])

    def error(self, error: GatewayError) -> bytes:
        return ndjson_line({"error": error.message})

    def whole(self, completion: Completion) -> dict[str, Any]:
        """The answer as one object, as Ollama sends it with ``stream: false``."""
        self._usage = completion.usage
        began = ANSWER_BEGAN.get()  # (when its first piece came: the prompt's time before)
        if self._first_at is None and began:
            self._first_at = time.perf_counter() - max(0.0, time.monotonic() - began)
        self._reason = "length" if completion.finish_reason == "length" else "stop"
        thought, text = self._view.whole(completion)
        text += completion.refusal
        body = {**self._line(text, thought, done=True), **self._counts()}
        if self._turns is not None:
            body["context"] = self._context(completion.content + completion.refusal)
        if completion.tool_calls and self._shape == "chat":
            body["message"]["tool_calls"] = tool_calls(completion)
        return body

    def _line(self, text: str, thought: str, *, done: bool) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self._model, "created_at": rfc3339(time.time())}
        if self._shape == "chat":
            message = {"role": "assistant", "content": text}
            if thought:
                message["thinking"] = thought
            line["message"] = message
        else:
            line["response"] = text
            if thought:
                line["thinking"] = thought
        line["done"] = done
        return line

    def _counts(self) -> dict[str, Any]:
        """Ollama's counts and durations (nanoseconds; none 0 where tokens were counted:
        clients divide by them for tokens a second)."""
        now = time.perf_counter()
        first = self._first_at or self._started
        usage = self._usage or Usage()
        return {"done_reason": self._reason,
                "total_duration": max(1, int((now - self._started) * 1e9)),
                "load_duration": 0,
                "prompt_eval_count": usage.prompt_tokens,
                "prompt_eval_duration": max(1, int((first - self._started) * 1e9)),
                "eval_count": usage.completion_tokens,
                "eval_duration": max(1, int((now - first) * 1e9))}


def tool_calls(completion: Completion) -> list[dict[str, Any]]:
    """Whole tool calls as Ollama's: arguments as an object."""
    return [{"id": call["id"], "function": {
        "index": i, "name": call["function"]["name"],
        "arguments": arguments_object(call["function"]["arguments"])}}
        for i, call in enumerate(completion.tool_calls)]


def loaded(model: str, shape: Shape, reason: str = "load") -> dict[str, Any]:
    """What Ollama answers to a request without a prompt: the model is ready ("load"), or
    gone ("unload", asked with ``keep_alive`` 0)."""
    line: dict[str, Any] = {"model": model, "created_at": rfc3339(time.time())}
    if shape == "chat":
        line["message"] = {"role": "assistant", "content": ""}
    else:
        line["response"] = ""
    return {**line, "done": True, "done_reason": reason}
