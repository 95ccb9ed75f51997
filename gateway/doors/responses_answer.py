"""The Responses API's answers: a Response object, or its stream of semantic events
(``response.created`` … ``response.completed``), as the ``openai`` SDK's types define them.

A model's reasoning becomes a ``reasoning`` item whose summary is the reasoning text; its
text a ``message`` item (its refusal, one with a ``refusal`` part); each tool call a
``function_call`` item.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.config import ReasoningMode
from gateway.doors.responses_request import namespaced, namespaces
from gateway.errors import GatewayError
from gateway.http.stream import SSE, sse_comments, sse_event
from gateway.protocol.ids import unique_id
from gateway.protocol.reasoning import ReasoningView
from gateway.protocol.units import Chunk, Completion, Usage


def new_response(body: dict[str, Any], store: bool) -> dict[str, Any]:
    """The Response object before its output: what the request said, echoed."""
    return {
        "id": "resp_" + unique_id(), "object": "response", "created_at": int(time.time()),
        "status": "in_progress", "model": body.get("model"), "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
        "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
        "metadata": body.get("metadata") or {}, "temperature": body.get("temperature"),
        "top_p": body.get("top_p"), "max_output_tokens": body.get("max_output_tokens"),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": body.get("reasoning"),
        "text": body.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
        "store": store, "user": body.get("user"), "usage": None,
    }


class ResponseStream:
    """One answer as a Response: its stream events as they happen, and the whole object.

    Items open when their first piece arrives and close when another kind of piece comes
    or the answer ends; the last event carries the whole response with every item.
    """

    media_type = SSE

    def __init__(self, response: dict[str, Any], reasoning: ReasoningMode) -> None:
        self.response = response
        self.dumped = b""  # the response as JSON, as last sent (written once, used again)
        self._view = ReasoningView(reasoning)
        self._sequence = 0
        self._indexes: dict[str, int] = {}  # output index by item id
        self._open: dict[str, Any] | None = None  # the reasoning or message item being written
        self._writing = ""  # ... what of the answer it holds: reasoning, message or refusal
        # ... its text so far, in pieces (a string grown in place is copied whole each time)
        self._text: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}  # function_call items by tool-call index
        self._namespaced = namespaces(response["tools"])  # a function's name → its namespace
        self._arguments: dict[int, list[str]] = {}  # their arguments' pieces, not yet joined
        self._usage: Usage | None = None
        self._finish = "stop"

    def switch_model(self, model: str) -> None:
        self.response["model"] = model

    def begin(self) -> bytes:
        return self._lifecycle("response.created", "response.in_progress")

    def chunk(self, chunk: Chunk) -> bytes:
        if chunk.usage is not None:
            self._usage = chunk.usage
        if chunk.finish_reason is not None:
            self._finish = chunk.finish_reason
        thought, text = self._view.split(chunk)
        out = b""
        if thought:
            out += self._write("reasoning", thought)
        if text:
            out += self._write("message", text)
        if chunk.refusal:
            out += self._write("refusal", chunk.refusal)
        for delta in chunk.tool_calls or ():
            out += self._call(delta)
        return out

    def end(self, trailers: dict[str, str]) -> bytes:
        out = self._close() + self._close_calls()
        return out + sse_comments(trailers) + self._lifecycle(self._conclude())

    def _conclude(self) -> str:
        """The response's final status and usage; the event that says so."""
        self.response["usage"] = _usage(self._usage or Usage())
        if self._finish == "length":
            self.response["status"] = "incomplete"
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
            return "response.incomplete"
        self.response["status"] = "completed"
        self.response["completed_at"] = int(time.time())
        return "response.completed"

    def error(self, error: GatewayError) -> bytes:
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        self.response["status"] = "failed"
        if self._open is not None:  # the failed response holds what had come of it
            self._fill(self._open)
        self._join_arguments()
        self.response["error"] = {"code": code, "message": error.message}
        return self._event("error", code=error.code or code, message=error.message,
                           param=error.param) + self._lifecycle("response.failed")

    def whole(self, completion: Completion) -> dict[str, Any]:
        """The Response object of a whole answer: the same items a stream would have."""
        self._usage, self._finish = completion.usage, completion.finish_reason
        thought, text = self._view.whole(completion)
        output = self.response["output"]
        if thought:
            output.append({"id": "rs_" + unique_id(), "type": "reasoning",
                           "summary": [_summary(thought)], "status": "completed"})
        refusal = completion.refusal
        status = "incomplete" if self._finish == "length" else "completed"
        if text or not (refusal or completion.tool_calls):
            output.append({"id": "msg_" + unique_id(), "type": "message", "role": "assistant",
                           "status": status, "content": [_output_text(text)]})
        if refusal:  # (a message of its own, as a stream has it)
            output.append({"id": "msg_" + unique_id(), "type": "message", "role": "assistant",
                           "status": status, "content": [_refusal(refusal)]})
        output += [self._named({"id": "fc_" + unique_id(), "type": "function_call",
                                "call_id": call["id"], "name": call["function"]["name"],
                                "arguments": call["function"]["arguments"],
                                "status": "incomplete" if self._finish == "length"
                                else "completed"})
                   for call in completion.tool_calls]
        self._conclude()
        self.dumped = orjson.dumps(self.response)
        return self.response

    def assistant_turn(self) -> dict[str, Any]:
        """The answer as a chat message, to continue the conversation from."""
        text = "".join(part.get("text") or part.get("refusal", "")
                       for item in self.response["output"]
                       if item["type"] == "message" for part in item["content"])
        calls = [{"id": item["call_id"], "type": "function", "function": {
                     "name": namespaced(item["namespace"], item["name"]) if item.get("namespace")
                     else item["name"], "arguments": item["arguments"]}}
                 for item in self.response["output"] if item["type"] == "function_call"]
        turn: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            turn["tool_calls"] = calls
        return turn

    # --- items ------------------------------------------------------------------------------

    def _write(self, kind: str, text: str) -> bytes:
        out = b""
        if self._open is None or self._writing != kind:
            out = self._close() + self._start(kind)
        assert self._open is not None
        self._text.append(text)
        where = self._where()
        if kind == "reasoning":
            return out + self._event("response.reasoning_summary_text.delta", **where,
                                     summary_index=0, delta=text)
        if kind == "refusal":
            return out + self._event("response.refusal.delta", **where, content_index=0,
                                     delta=text)
        return out + self._event("response.output_text.delta", **where, content_index=0,
                                 delta=text, logprobs=[])

    def _start(self, kind: str) -> bytes:
        if kind == "reasoning":
            item: dict[str, Any] = {"id": "rs_" + unique_id(), "type": "reasoning",
                                    "summary": [], "status": "in_progress"}
        else:
            item = {"id": "msg_" + unique_id(), "type": "message", "role": "assistant",
                    "status": "in_progress", "content": []}
        self._open, self._text, self._writing = item, [], kind
        out = self._added(item)
        if kind == "reasoning":
            return out + self._event("response.reasoning_summary_part.added", **self._where(),
                                     summary_index=0, part=_summary(""))
        return out + self._event("response.content_part.added", **self._where(),
                                 content_index=0, part=_part(kind, ""))

    def _fill(self, item: dict[str, Any]) -> str:
        """The open item given its text; the text."""
        text = "".join(self._text)
        if item["type"] == "reasoning":
            item["summary"] = [_summary(text)]
        else:
            item["content"] = [_part(self._writing, text)]
        return text

    def _close(self) -> bytes:
        item = self._open
        if item is None:
            return b""
        self._open = None
        where = self._where(item)
        text = self._fill(item)
        if item["type"] == "reasoning":
            out = self._event("response.reasoning_summary_text.done", **where,
                              summary_index=0, text=text) + \
                self._event("response.reasoning_summary_part.done", **where,
                            summary_index=0, part=_summary(text))
        elif self._writing == "refusal":
            out = self._event("response.refusal.done", **where, content_index=0,
                              refusal=text) + \
                self._event("response.content_part.done", **where, content_index=0,
                            part=_refusal(text))
        else:
            out = self._event("response.output_text.done", **where, content_index=0,
                              text=text, logprobs=[]) + \
                self._event("response.content_part.done", **where, content_index=0,
                            part=_output_text(text))
        return out + self._done(item)

    def _call(self, delta: dict[str, Any]) -> bytes:
        index = delta.get("index", len(self._calls))
        function = delta.get("function") or {}
        out = b""
        item = self._calls.get(index)
        if item is None:
            out = self._close()
            call_id = delta.get("id") or "call_" + unique_id()
            item = self._calls[index] = self._named({
                "id": "fc_" + unique_id(), "type": "function_call", "call_id": call_id,
                "name": function.get("name") or "", "arguments": "", "status": "in_progress"})
            out += self._added(item)
        if function.get("name") and not item["name"]:  # a server that names it late
            item["name"] = function["name"]
            self._named(item)
        piece = function.get("arguments") or ""
        if piece:
            self._arguments.setdefault(index, []).append(piece)
            out += self._event("response.function_call_arguments.delta", **self._where(item),
                               delta=piece)
        return out

    def _named(self, item: dict[str, Any]) -> dict[str, Any]:
        """The call item, its name split into namespace and name where it is one of a
        namespace's functions.
        """
        found = self._namespaced.get(item["name"])
        if found is not None:
            item["namespace"], item["name"] = found
        return item

    def _join_arguments(self) -> None:
        for index, pieces in self._arguments.items():
            self._calls[index]["arguments"] += "".join(pieces)
        self._arguments.clear()

    def _close_calls(self) -> bytes:
        self._join_arguments()
        out = b""
        for item in self._calls.values():
            out += self._event("response.function_call_arguments.done", **self._where(item),
                               arguments=item["arguments"]) + self._done(item)
        self._calls = {}
        return out

    def _added(self, item: dict[str, Any]) -> bytes:
        self._indexes[item["id"]] = len(self.response["output"])
        self.response["output"].append(item)
        return self._event("response.output_item.added", output_index=self._index(item),
                           item=item)

    def _done(self, item: dict[str, Any]) -> bytes:
        item["status"] = "incomplete" if self._finish == "length" and \
            item["type"] != "reasoning" else "completed"
        return self._event("response.output_item.done", output_index=self._index(item),
                           item=item)

    def _where(self, item: dict[str, Any] | None = None) -> dict[str, Any]:
        item = item if item is not None else self._open
        assert item is not None
        return {"item_id": item["id"], "output_index": self._index(item)}

    def _index(self, item: dict[str, Any]) -> int:
        return self._indexes[item["id"]]

    def _lifecycle(self, *kinds: str) -> bytes:
        """Events that carry the whole response (serialized once for all of them)."""
        self.dumped = orjson.dumps(self.response)
        out = b""
        for kind in kinds:
            data = b'{"type":"%s","sequence_number":%d,"response":%s}' % (
                kind.encode(), self._sequence, self.dumped)
            self._sequence += 1
            out += sse_event(data, event=kind)
        return out

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return sse_event(orjson.dumps(event), event=kind)


def _summary(text: str) -> dict[str, Any]:
    return {"type": "summary_text", "text": text}


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _refusal(text: str) -> dict[str, Any]:
    return {"type": "refusal", "refusal": text}


def _part(kind: str, text: str) -> dict[str, Any]:
    return _refusal(text) if kind == "refusal" else _output_text(text)


def _usage(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens or 0,
                                     "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens or 0},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}
