"""The Ollama door's requests: ``/api/chat`` and ``/api/generate`` as the gateway's one
internal request.

A request's Ollama options that OpenAI also has (temperature, num_predict...) become its
fields; the rest (num_ctx, top_k, keep_alive, think...) ride along in ``req.ollama`` and only
Ollama backends send them on. ``/api/generate`` is a text completion when it is ``raw`` or
fills in the middle (``suffix``), and otherwise one chat turn, as Ollama applies the model's
template to it (its ``context`` read back: ``gateway.doors.ollama_context``).
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson

from gateway.config import ReasoningMode
from gateway.doors.ollama_context import history_of
from gateway.errors import MODEL_NAME_MAX, InvalidRequest
from gateway.protocol.ollama import OPENAI_FIELDS
from gateway.protocol.openai import (
    ChatRequest,
    CompletionRequest,
    named_as,
    parse_chat,
    parse_completion,
)

# The chat request's fields that come from the options: errors name the options.
FIELDS = {chat: f"options.{option}" for option, chat in OPENAI_FIELDS.items()}

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
