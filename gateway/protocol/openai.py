"""OpenAI request views: the body is parsed once and checked here, then read by attribute.

Only the fields the gateway acts on are checked; anything else stays in ``body`` and is
passed through to OpenAI-compatible backends untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from gateway.errors import MODEL_NAME_MAX, InvalidRequest

Kind = Literal["chat", "text"]  # a chat completion, or a text completion
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw.removeprefix(b"\xef\xbb\xbf"))  # (a BOM, as Windows
        # PowerShell's UTF-8 writes one, is no part of the JSON)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and _deeper_than(body, MAX_DEPTH):
        raise InvalidRequest(f"The request body is nested more than {MAX_DEPTH} levels deep.")
    return body


EMBEDDING_INPUTS_MAX = 2048  # inputs of one embeddings request (OpenAI's most)
MAX_DEPTH = 128  # levels of nesting in a body (what is sent on must be written again)


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        if depth > limit:
            return True
        stack.extend((item, depth + 1) for item in value)
    return False


@dataclass(slots=True)
class Sampling:
    """Generation settings shared by chat and text completions."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    stop: list[str] | None
    seed: int | None


@dataclass(slots=True)
class ChatRequest:
    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    sampling: Sampling
    tools: list[dict[str, Any]] | None
    tool_choice: Any
    response_format: dict[str, Any] | None
    reasoning_effort: str | None
    # What an Ollama client asked for that no OpenAI field says (options such as num_ctx,
    # keep_alive, think): only Ollama backends send it on.
    ollama: dict[str, Any] | None = None


@dataclass(slots=True)
class CompletionRequest:
    body: dict[str, Any]
    model: str
    prompt: str
    suffix: str | None
    stream: bool
    include_usage: bool
    sampling: Sampling
    ollama: dict[str, Any] | None = None  # as ChatRequest.ollama


@dataclass(slots=True)
class EmbeddingRequest:
    body: dict[str, Any]
    model: str
    inputs: list[str] | list[list[int]]  # texts, or token ids (one list per input)
    encoding_format: str
    dimensions: int | None
    # What an Ollama client asked for beyond OpenAI's fields (options, keep_alive,
    # truncate), passed on to Ollama as it asked.
    ollama: dict[str, Any] | None = None
    # What the plugins said of it, for the answer's headers (the safety checker's).
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def token_ids(self) -> bool:
        return bool(self.inputs) and isinstance(self.inputs[0], list)


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty array of message objects.")
    for i, message in enumerate(messages):
        _check_message(message, i)
    tools = _optional(body, "tools", list, "an array of tool definitions")
    if tools is not None:
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
                    not isinstance(function.get("parameters", {}), dict):
                raise invalid(f"tools[{i}]", "Each tool must be {'type': 'function', 'function': "
                           "{'name': ..., 'parameters': {...}}}.")
    response_format = _response_format(body)
    effort = _optional(body, "reasoning_effort", str, "a string")
    _single_choice(body)
    return ChatRequest(
        body=body,
        model=_model(body),
        messages=messages,
        stream=_stream(body),
        include_usage=_include_usage(body),
        sampling=_sampling(body),
        tools=tools or None,
        tool_choice=_tool_choice(body.get("tool_choice"), tools or []),
        response_format=response_format,
        reasoning_effort=effort,
    )


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt", "'prompt' must be a string (one prompt per request).")
    suffix = _optional(body, "suffix", str, "a string")
    if body.get("echo"):
        raise invalid("echo", "'echo' is not supported.")
    _single_choice(body)
    return CompletionRequest(
        body=body,
        model=_model(body),
        prompt=prompt,
        suffix=suffix,
        stream=_stream(body),
        include_usage=_include_usage(body),
        sampling=_sampling(body),
    )


def parse_embedding(body: dict[str, Any], most: int | None = EMBEDDING_INPUTS_MAX
                    ) -> EmbeddingRequest:
    """An embeddings request, of at most ``most`` inputs (None: Ollama's API has no limit,
    and its clients send every document at once).
    """
    inputs = _embedding_inputs(body.get("input"))
    if most is not None and len(inputs) > most:
        raise invalid("input", f"'input' is an array of at most {most} items: send more in "
                               "several requests.")
    encoding = body.get("encoding_format") or "float"  # (null: unset, as some wrappers send)
    if encoding not in ("float", "base64"):
        raise invalid("encoding_format", "'encoding_format' must be 'float' or 'base64'.")
    dimensions = _integer(body, "dimensions", 1, 65_536)
    return EmbeddingRequest(
        body=body, model=_model(body), inputs=inputs, encoding_format=encoding,
        dimensions=dimensions,
    )


def _embedding_inputs(raw: Any) -> list[str] | list[list[int]]:
    """OpenAI's four forms of ``input``: a string, strings, an array of token ids, or arrays
    of token ids.
    """
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(t, str) for t in raw):
            return raw
        if all(_token(t) for t in raw):
            return [raw]
        if all(isinstance(t, list) and t and all(_token(i) for i in t) for t in raw):
            return raw
    raise invalid("input", "'input' must be a string, a non-empty array of strings, an array of "
                        "token ids (integers >= 0), or an array of such arrays.")


def _token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --- field checks ---------------------------------------------------------------------------


@contextlib.contextmanager
def named_as(names: Mapping[str, str]) -> Iterator[None]:
    """Errors in a door's request, read as a chat request, naming the door's own fields
    (``names``: the chat request's field → the door's), not fields the client never sent.
    """
    try:
        yield
    except InvalidRequest as exc:
        theirs = names.get(exc.param or "")
        if theirs is not None:
            exc.message = exc.message.replace(f"'{exc.param}'", f"'{theirs}'")
            exc.param = theirs
        raise


def invalid(param: str, message: str) -> InvalidRequest:
    """A 400 naming the field at fault."""
    return InvalidRequest(message, param=param, code="invalid_value")


def _optional(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        got = "a number too large" if int in kinds and isinstance(value, float) and \
            abs(value) >= 2**63 else type(value).__name__  # (JSON's integers past 64 bits
        raise invalid(key, f"'{key}' must be {what}, got {got}.")  # are read as floats)
    return value


def _response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = _optional(body, "response_format", dict, "an object")
    if fmt is None:
        return None
    if fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid("response_format.type", "must be 'text', 'json_object' or 'json_schema'.")
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise invalid("response_format.json_schema",
                       "json_schema must be an object whose 'schema' is a JSON schema object.")
    return fmt  # type: ignore[no-any-return]


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("model", "'model' is required and must be a non-empty string.")
    if len(model) > MODEL_NAME_MAX:
        raise invalid("model", f"'model' is a name of at most {MODEL_NAME_MAX} characters.")
    return model


def _stream(body: dict[str, Any]) -> bool:
    return bool(_optional(body, "stream", bool, "true or false"))


def _include_usage(body: dict[str, Any]) -> bool:
    options = _optional(body, "stream_options", dict, "an object")
    return bool(options and options.get("include_usage"))


def _tool_choice(choice: Any, tools: list[dict[str, Any]]) -> Any:
    """The tool choice, checked as OpenAI checks it: a function named is one of the tools
    (a backend would offer them all, or fail), and a choice that needs a tool has tools.
    """
    if choice is None or choice in ("none", "auto"):
        return choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if choice != "required" and kind not in ("function", "allowed_tools", "custom"):
        raise invalid("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or "
                                     "{'type': 'function', 'function': {'name': ...}}.")
    if not tools:
        raise invalid("tool_choice", "'tool_choice' is only allowed when 'tools' are "
                                     "specified.")
    if kind == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise invalid("tool_choice", "'tool_choice' names its function as "
                                         "{'type': 'function', 'function': {'name': ...}}.")
        if name not in {tool["function"]["name"] for tool in tools}:
            raise invalid("tool_choice", f"'tool_choice' names the function {name!r}, which "
                                         "is not one of 'tools'.")
    return choice


def _single_choice(body: dict[str, Any]) -> None:
    n = _optional(body, "n", int, "an integer")
    if n is not None and n != 1:
        raise invalid("n", "Only n=1 is supported; send several requests for several answers.")


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = _optional(body, key, (int, float), "a number")
    if value is not None and not low <= value <= high:
        raise invalid(key, f"'{key}' must be between {low:g} and {high:g}.")
    return None if value is None else float(value)


MAX_TOKENS = 10_000_000  # past any model's window: a number this large is a mistake
INT64 = 2**63


def _integer(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = _optional(body, key, int, "an integer")
    if value is not None and not low <= value <= high:
        raise invalid(key, f"'{key}' must be between {low} and {high}.")
    return value  # type: ignore[no-any-return]


def _sampling(body: dict[str, Any]) -> Sampling:
    max_tokens = _integer(body, "max_completion_tokens", 1, MAX_TOKENS)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, MAX_TOKENS)
    for key in ("frequency_penalty", "presence_penalty"):
        _number(body, key, -2.0, 2.0)
    _integer(body, "top_logprobs", 0, 20)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise invalid("stop", "'stop' must be a string or an array of strings.")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        stop=stop or None,
        seed=_integer(body, "seed", -INT64, INT64 - 1),
    )


def _check_message(message: Any, i: int) -> None:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise invalid(where, f"{where} must be an object with 'role' and 'content'.")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise invalid(f"{where}.role", f"{where}.role must be one of {sorted(ROLES)}.")
    content = message.get("content")
    if content is None:
        if role != "assistant":
            raise invalid(f"{where}.content", f"{where}.content is required for role {role!r}.")
    elif isinstance(content, list):
        for j, part in enumerate(content):
            _check_part(part, f"{where}.content[{j}]")
    elif not isinstance(content, str):
        raise invalid(f"{where}.content", f"{where}.content must be a string or an array of parts.")
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None and not isinstance(message[key], str):
            raise invalid(f"{where}.{key}", f"{where}.{key} must be a string.")
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise invalid(f"{where}.tool_calls", "tool_calls must be an array.")
        for j, call in enumerate(calls):
            _check_tool_call(call, f"{where}.tool_calls[{j}]")


def _check_tool_call(call: Any, where: str) -> None:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise invalid(where, f"{where} needs function.name.")
    if call.get("id") is not None and not isinstance(call["id"], str):
        raise invalid(f"{where}.id", f"{where}.id must be a string.")
    if not isinstance(function.get("arguments", ""), str | dict):
        raise invalid(f"{where}.function.arguments", "arguments must be a JSON string.")


def _check_part(part: Any, where: str) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise invalid(f"{where}.text", f"{where}.text must be a string.")
    elif kind == "image_url":
        if image_url(part) is None:
            raise invalid(f"{where}.image_url", f"{where}.image_url.url must be a string.")
    elif not isinstance(kind, str):
        raise invalid(where, f"{where} must be a content part object with a 'type'.")


def image_url(part: dict[str, Any]) -> str | None:
    """The URL of an ``image_url`` content part (object or bare-string form)."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    return url if isinstance(url, str) else None


def arguments_object(text: str) -> dict[str, Any]:
    """A tool call's JSON arguments as the object APIs other than OpenAI's want; text that
    is not a JSON object (a model's mistake) is kept under ``"arguments"``, not lost.
    """
    try:
        value = orjson.loads(text or "{}")
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"arguments": text}


def not_passed_on(kind: str) -> str:
    """What stands in a tool's output for a part of it the gateway cannot pass on (a tool
    message carries text alone): an image, a file.
    """
    return f"[{kind}: not passed on by the gateway]"


def text_of(content: Any) -> str:
    """The text of a message's content, whichever form it takes (text parts one to a line,
    as they are separate pieces: a file's name and the next one's, say).
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")
