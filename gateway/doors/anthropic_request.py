"""Anthropic's Messages API requests: a ``/v1/messages`` request as the gateway's chat
request (its answers: ``anthropic_answer``).

Tool results (in user turns) become tool messages, tool uses (in assistant turns) tool
calls; thinking blocks sent back are the client's copy of the model's reasoning and are not
sent to it again.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.config import ReasoningMode
from gateway.errors import InvalidRequest
from gateway.protocol.openai import invalid, not_passed_on

FIELDS = {"stop": "stop_sequences"}  # chat fields this door names otherwise


def chat_body(body: dict[str, Any], *, counting: bool = False
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The chat request for a Messages request, and what only Ollama backends take (top_k,
    think). ``counting``: a count_tokens request (it has no max_tokens).
    """
    max_tokens = body.get("max_tokens")
    if not counting and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                         or max_tokens < 1):
        raise invalid("max_tokens", "'max_tokens' is required: the most tokens to generate, an "
                                "integer of at least 1.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty array of messages.")
    system = _system(body.get("system"))
    # stream as sent: parse_chat refuses one that is not a boolean, as Anthropic does
    chat: dict[str, Any] = {"model": body.get("model"),
                            "stream": False if counting else body.get("stream"),
                            "messages": [*system, *_messages(messages)]}
    if not counting:
        chat["max_tokens"] = max_tokens
    stop = body.get("stop_sequences")
    if stop is not None:
        # Anthropic takes a list alone; a chat request would read a string as one sequence.
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise invalid("stop_sequences", "'stop_sequences' must be an array of strings.")
        chat["stop"] = stop
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, int | float) or isinstance(value, bool) or \
                    not 0 <= value <= 1:
                raise invalid(key, f"'{key}' must be a number between 0 and 1.")
            chat[key] = value
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"]) or None
        if chat["tools"] is None:
            del chat["tools"]
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    fmt = (body.get("output_config") or {}).get("format") \
        if isinstance(body.get("output_config"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": fmt.get("schema") or {}}}
    ollama: dict[str, Any] = {}
    top_k = body.get("top_k")
    if top_k is not None:
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise invalid("top_k", "'top_k' must be an integer of 0 or more.")
        ollama["options"] = {"top_k": top_k}
    thinking = thinking_of(body)
    if thinking is not None:
        ollama["think"] = thinking
    return chat, ollama


def thinking_of(body: dict[str, Any]) -> bool | None:
    """Whether the client turned thinking on (``enabled``, ``adaptive``) or off; None: it
    did not say.
    """
    thinking = body.get("thinking")
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if not isinstance(kind, str):  # (the kinds that think are more than a few, and growing)
        raise invalid("thinking", "'thinking' must be an object with a type ('enabled', "
                                  "'adaptive', 'disabled').")
    return kind != "disabled"


def reasoning_mode(body: dict[str, Any], mode: ReasoningMode) -> ReasoningMode:
    """How reasoning reaches this client: not at all unless it turned thinking on, as
    Anthropic's API gives thinking blocks only then (a client that did not ask reads the
    first block as the text; a model that thinks anyway still does, unseen); in thinking
    blocks when it did, whatever the gateway's ``[server] reasoning`` does for clients that
    read only text (its ``inline`` sent ``<think>`` tags as text, its ``drop`` nothing).
    """
    return "separate" if thinking_of(body) else "drop"


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None or system == "":
        return []
    if isinstance(system, list):
        system = "\n\n".join(_texts(system, "system"))
    if not isinstance(system, str):
        raise invalid("system", "'system' must be a string or an array of text blocks.")
    return [{"role": "system", "content": system}]


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(where, f"{where} must be an object with role and content.")
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant", "system"):
            raise invalid(f"{where}.role", f"{where}.role must be 'user', 'assistant' or 'system'.")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif not isinstance(content, list):
            raise invalid(f"{where}.content", f"{where}.content must be a string or an array of "
                                          "content blocks.")
        elif role == "assistant":
            out.append(_assistant(content, where))
        else:
            out += _user(role, content, where)
    return out


def _assistant(blocks: list[Any], where: str) -> dict[str, Any]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind = _kind(block, f"{where}.content[{j}]")
        if kind == "text":
            text.append(_text(block, f"{where}.content[{j}]"))
        elif kind == "tool_use":
            at = f"{where}.content[{j}]"  # (named as the client sent it, not as the chat's)
            calls.append({"id": _string(block, "id", at), "type": "function", "function": {
                "name": _string(block, "name", at),
                "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind not in ("thinking", "redacted_thinking"):  # the model's own, not resent
            raise _unsupported(kind, f"{where}.content[{j}]")
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(text) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _user(role: str, blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """Tool results first (as tool messages answering the calls before them), then the
    rest of the turn. Text blocks are read one to a line.
    """
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = _kind(block, at)
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, at)})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, at)}})
        elif kind == "tool_result":
            content = block.get("content")
            text = content if isinstance(content, str) else \
                "\n".join(_result_texts(content or [], f"{at}.content"))
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": _string(block, "tool_use_id", at),
                            "content": text})
        else:
            raise _unsupported(kind, at)
    if not parts:
        return results
    if all(p["type"] == "text" for p in parts):
        return [*results, {"role": role, "content": "\n".join(p["text"] for p in parts)}]
    return [*results, {"role": role, "content": parts}]


def _result_texts(blocks: Any, where: str) -> list[str]:
    """A tool result's blocks as lines of text: a tool message carries text alone. What is
    not text (an image, a PDF) is named in its place, so that the model knows it was there:
    passed on as the turn's image, it would make every later turn of the session need a
    model that sees images.
    """
    if not isinstance(blocks, list):
        raise invalid(where, f"{where} must be a string or an array of content blocks.")
    texts = []
    for i, block in enumerate(blocks):
        kind = _kind(block, f"{where}[{i}]")
        source = block.get("source")
        if kind == "text":
            texts.append(_text(block, f"{where}[{i}]"))
        elif kind == "document" and isinstance(source, dict) and source.get("type") == "text" \
                and isinstance(source.get("data"), str):
            texts.append(source["data"])
        else:
            texts.append(not_passed_on(kind))
    return texts


def _image_url(block: dict[str, Any], where: str) -> str:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        data, media = source.get("data"), source.get("media_type", "image/png")
        if not isinstance(data, str) or not data or not isinstance(media, str):
            raise invalid(f"{where}.source.data", "An image's source.data must be its bytes "
                                                  "in base64, a string.")
        return f"data:{media};base64,{data}"
    if isinstance(source, dict) and source.get("type") == "url" and \
            isinstance(source.get("url"), str):
        return str(source["url"])
    raise invalid(f"{where}.source", "Images must be sent as base64 (or a URL); file ids are "
                                 "not supported by the gateway.")


def _texts(blocks: Any, where: str) -> list[str]:
    if not isinstance(blocks, list):
        raise invalid(where, f"{where} must be an array of text blocks.")
    return [_text(b, f"{where}[{i}]") for i, b in enumerate(blocks)
            if _kind(b, f"{where}[{i}]") == "text"]


def _kind(block: Any, where: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str):
        raise invalid(where, f"{where} must be a content block with a 'type'.")
    return kind


def _string(block: dict[str, Any], key: str, where: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise invalid(f"{where}.{key}", f"{where}.{key} must be a string.")
    return value


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise invalid(f"{where}.text", f"{where}.text must be a string.")
    return text


def _unsupported(kind: str, where: str) -> InvalidRequest:
    return invalid(where, f"{where}: content blocks of type {kind!r} are not supported by the "
                      "gateway.")


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise invalid("tools", "'tools' must be an array.")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise invalid(f"tools[{i}]", f"tools[{i}] needs a name.")
        if tool.get("type") not in (None, "custom"):
            raise invalid(f"tools[{i}]", f"The gateway cannot run Anthropic's server tool "
                                     f"{tool['type']!r}: only tools the client runs work.")
        function = {"name": tool["name"], "parameters": tool.get("input_schema") or
                    {"type": "object", "properties": {}}}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, chat: dict[str, Any]) -> None:
    """The chat request's tool choice (its tools already read). A tool named that is not
    among the tools is refused, as Anthropic refuses it, rather than left to each backend.
    """
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("auto", "any", "none"):
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    elif kind == "tool" and isinstance(choice.get("name"), str):
        if choice["name"] not in {t["function"]["name"] for t in chat.get("tools", ())}:
            raise invalid("tool_choice", f"'tool_choice' names the tool {choice['name']!r}, "
                                         "which is not one of 'tools'.")
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise invalid("tool_choice", "'tool_choice' must be {'type': 'auto'}, {'type': 'any'}, "
                                 "{'type': 'none'} or {'type': 'tool', 'name': ...}.")
    if isinstance(choice, dict) and choice.get("disable_parallel_tool_use"):
        chat["parallel_tool_calls"] = False
