"""The Responses API's requests: ``instructions`` and ``input`` items (messages, function
calls and their outputs) as the gateway's chat request.

Function tools grouped in a ``namespace`` reach the model as functions named
``namespace__name`` (a name every backend accepts), and its calls of them go back to the
client split again. Tools OpenAI's own servers run (web search, file search, code
interpreter...) are not offered to the model, and the answer's ``x-gateway-dropped-tools``
header names them (Codex CLI sends ``web_search`` with every request); other kinds of tool
the client runs itself (``custom``, ``local_shell``) are refused.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.protocol.ids import unique_id
from gateway.protocol.openai import invalid, not_passed_on

FIELDS = {"max_tokens": "max_output_tokens"}  # chat fields this door names otherwise


def chat_body(body: dict[str, Any], history: list[dict[str, Any]]
              ) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """The chat request for a Responses request continuing ``history`` (the messages of the
    responses before it), the conversation to keep with this response (the history and
    this input; the instructions are not carried over, as OpenAI does not), and the types
    of the built-in tools left out.
    """
    if "input" not in body:
        raise invalid("input", "'input' is required: a string or an array of input items.")
    if body.get("background"):
        raise invalid("background", "Background responses are not supported by the gateway.")
    if body.get("conversation") is not None:
        raise invalid("conversation", "Conversations are not supported by the gateway; "
                                      "continue a response with 'previous_response_id'.")
    conversation = [*history, *input_messages(body["input"])]
    if not conversation:
        raise invalid("input", "'input' must have at least one item (or continue a response "
                               "with previous_response_id).")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("instructions", "'instructions' must be a string.")
    chat: dict[str, Any] = {
        "model": body.get("model"), "stream": body.get("stream", False),
        "messages": [{"role": "system", "content": instructions}, *conversation]
        if instructions else conversation}
    dropped: list[str] = []
    if body.get("tools") is not None:
        chat["tools"], dropped = _tools(body["tools"])
        if not chat["tools"]:
            del chat["tools"]
    choice = _tool_choice(body["tool_choice"], chat) if body.get("tool_choice") is not None \
        else None
    if choice is not None:
        chat["tool_choice"] = choice
    if dropped and not chat.get("tools"):  # only hosted tools: the model is asked without any
        chat.pop("tools", None)
        if chat.pop("tool_choice", None) == "required":
            raise invalid("tool_choice", "'tool_choice' is 'required' but the only tools are "
                                         f"ones OpenAI's servers run ({', '.join(dropped)}).")
    fmt = _format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls"),
                         ("user", "user")):
        if body.get(ours) is not None:
            chat[theirs] = body[ours]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        chat["reasoning_effort"] = reasoning["effort"]
    return chat, conversation, dropped


def input_messages(items: Any) -> list[dict[str, Any]]:
    """``input`` as chat messages: a string is one user message; items are messages,
    function calls (joined to the assistant turn before them) and their outputs.
    """
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise invalid("input", "'input' must be a string or an array of input items.")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(where, f"{where} must be an object.")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            if item.get("role") not in ROLES:  # (named as sent, not as the chat's messages)
                raise invalid(f"{where}.role", f"{where}.role must be one of "
                                               f"{', '.join(ROLES)}.")
            out.append({"role": item["role"], "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            name = _string(item, "name", where)
            if isinstance(item.get("namespace"), str) and item["namespace"]:
                name = namespaced(item["namespace"], name)
            call = {"id": _string(item, "call_id", where), "type": "function", "function": {
                "name": name, "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                        "content": _tool_output(item.get("output"), where)})
        elif kind == "reasoning":
            continue  # a model's reasoning is not sent back to it
        else:
            raise invalid(f"{where}.type", f"{where}: input items of type {kind!r} are not "
                                       "supported by the gateway.")
    return out


def input_items(items: Any) -> list[dict[str, Any]]:
    """``input`` (already found valid by ``input_messages``) as the API lists it back: each
    item with an id and a status, text given as a string as a part; reasoning left out.
    """
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type") or "message"
        if kind == "message":
            assistant = item.get("role") == "assistant"
            parts = item["content"] if isinstance(item["content"], list) else [
                {"type": "output_text" if assistant else "input_text", "text": item["content"]}]
            out.append({"id": _id_of(item, "msg_"), "type": "message",
                        "role": item.get("role"), "status": "completed",
                        "content": [_listed_part(part) for part in parts]})
        elif kind in ("function_call", "function_call_output"):
            out.append({**item, "id": _id_of(item, "fc_" if kind == "function_call" else "fco_"),
                        "status": "completed"})
    return out


def _id_of(item: dict[str, Any], prefix: str) -> str:
    """The item's own id, or a new one."""
    given = item.get("id")
    return given if isinstance(given, str) and given else prefix + unique_id()


def _listed_part(part: dict[str, Any]) -> dict[str, Any]:
    if part["type"] == "output_text":
        return {"annotations": [], **part}
    if part["type"] == "input_image":
        return {"detail": "auto", **part}
    return part


def _content(content: Any, where: str) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content", f"{where}.content must be a string or an array of parts.")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif kind == "input_image":
            raise invalid(f"{where}.content[{j}]", "Images must be sent as image_url (a data: "
                                               "URL); file ids are not supported.")
        else:
            raise invalid(f"{where}.content[{j}]", f"{where}.content[{j}]: parts of type {kind!r} "
                                               "are not supported by the gateway.")
    return parts


def _tool_output(output: Any, where: str) -> str:
    """A function call's output as a tool message's text: its text parts one to a line,
    and what is not text named in its place (a tool message carries text alone).
    """
    if isinstance(output, str):
        return output
    if not isinstance(output, list):
        raise invalid(f"{where}.output", f"{where}.output must be a string or an array of parts.")
    texts = []
    for j, part in enumerate(output):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            if not isinstance(part.get("text"), str):
                raise invalid(f"{where}.output[{j}].text", f"{where}.output[{j}].text must "
                                                       "be a string.")
            texts.append(part["text"])
        elif isinstance(kind, str):
            texts.append(not_passed_on(kind))
        else:
            raise invalid(f"{where}.output[{j}]", f"{where}.output[{j}] must be a part with a "
                                              "'type'.")
    return "\n".join(texts)


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise invalid(f"{where}.{key}", f"{where}.{key} is required (a string).")
    return value


def namespaced(namespace: str, name: str) -> str:
    """The name the model knows a namespace's function by."""
    return f"{namespace}__{name}"


def namespaces(tools: Any) -> dict[str, tuple[str, str]]:
    """The namespaced functions of a request's tools: model's name → (namespace, name)."""
    out: dict[str, tuple[str, str]] = {}
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict) and tool.get("type") == "namespace" and \
                isinstance(tool.get("name"), str) and isinstance(tool.get("tools"), list):
            for inner in tool["tools"]:
                if isinstance(inner, dict) and isinstance(inner.get("name"), str):
                    out[namespaced(tool["name"], inner["name"])] = (tool["name"], inner["name"])
    return out


# Tools OpenAI's servers run (dated variants such as web_search_preview_2025_03_11 too; each
# named back in a header, so not of any length).
HOSTED = re.compile(r"(web_search|file_search|code_interpreter|computer_use|image_generation"
                    r"|mcp)[a-z0-9_]{0,32}")


def _tools(tools: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The function tools as chat tools, and the types of the hosted ones left out."""
    if not isinstance(tools, list):
        raise invalid("tools", "'tools' must be an array.")
    out: list[dict[str, Any]] = []
    dropped: list[str] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            functions = [_function(tool, where)]
        elif kind == "namespace":
            functions = _namespace(tool, where)
        elif isinstance(kind, str) and HOSTED.fullmatch(kind):
            if kind not in dropped:
                dropped.append(kind)
            continue
        else:
            raise invalid(f"{where}.type", f"{where}: tools of type {str(kind)[:40]!r} are not "
                                           "supported by the gateway (function and namespace "
                                           "tools are).")
        for function in functions:
            name = function["function"]["name"]
            if name in seen:  # (namespace a's b__c and namespace a__b's c: both a__b__c)
                raise invalid(where, f"{where}: a second tool named {name!r}, as the model "
                                     "would see it.")
            seen.add(name)
        out += functions
    return out, dropped


def _namespace(tool: dict[str, Any], where: str) -> list[dict[str, Any]]:
    namespace = _string(tool, "name", where)
    inner = tool.get("tools")
    if not isinstance(inner, list):
        raise invalid(f"{where}.tools", f"{where}.tools must be an array of tools.")
    functions = []
    for j, function in enumerate(inner):
        if not isinstance(function, dict) or function.get("type") != "function":
            raise invalid(f"{where}.tools[{j}]", f"{where}.tools[{j}]: only function tools are "
                                              "supported in a namespace.")
        functions.append(_function(function, f"{where}.tools[{j}]", namespace))
    return functions


def _function(tool: dict[str, Any], where: str, namespace: str = "") -> dict[str, Any]:
    name = _string(tool, "name", where)
    function: dict[str, Any] = {"name": namespaced(namespace, name) if namespace else name,
                                "parameters": tool.get("parameters") or
                                {"type": "object", "properties": {}}}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    if isinstance(tool.get("strict"), bool):
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any, chat: dict[str, Any]) -> Any:
    """The chat request's tool choice; ``allowed_tools`` narrows its tools to those named
    (None: none of them is left, and the model is asked without tools).
    """
    if choice in ("none", "auto", "required"):
        return choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": _name_of(choice)}}
    if kind == "allowed_tools" and choice.get("mode") in ("auto", "required") and \
            isinstance(choice.get("tools"), list):
        allowed = {_name_of(t) for t in choice["tools"] if isinstance(t, dict)
                   and t.get("type") == "function" and isinstance(t.get("name"), str)}
        chat["tools"] = [t for t in chat.get("tools", ()) if t["function"]["name"] in allowed]
        if chat["tools"]:
            return choice["mode"]
        del chat["tools"]
        if choice["mode"] == "required":
            raise invalid("tool_choice", "'tool_choice' requires a tool, but allows none of "
                                         "the request's function tools.")
        return None
    raise invalid("tool_choice", "'tool_choice' must be 'none', 'auto', 'required', "
                                 "{'type': 'function', 'name': ...} or {'type': "
                                 "'allowed_tools', 'mode': 'auto' or 'required', 'tools': "
                                 "[...]}.")


def _name_of(function: dict[str, Any]) -> str:
    """A function's name as the model knows it (with its namespace, if any)."""
    name: str = function["name"]
    if isinstance(function.get("namespace"), str) and function["namespace"]:
        name = namespaced(function["namespace"], name)
    return name


ROLES = ("user", "assistant", "system", "developer")  # an input message's


def _format(text: Any) -> dict[str, Any] | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if fmt["type"] == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise invalid("text.format.schema", "'text.format.schema' must be a JSON schema "
                                                "object.")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise invalid("text.format.type", "'text.format.type' must be 'text', 'json_object' or "
                                  "'json_schema'.")
