"""One question, asked through each front door with the client library its users run
(``openai`` for chat completions and the Responses API, ``anthropic``, ``ollama``), and the
answer as the same ``Reply``: so one test states a behaviour for every door.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anthropic
import ollama
import openai


@dataclass
class Reply:
    text: str  # the answer's text, streamed or whole
    model: str  # the model that answered, as the door reports it


class Refused(Exception):
    """The door answered with an error: its status and message, whatever its shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Door:
    name = ""

    def ask(self, url: str, model: str, text: str, *, stream: bool = False,
            temperature: float | None = None) -> Reply:
        try:
            return self._ask(url, model, text, stream, temperature)
        except (openai.APIStatusError, anthropic.APIStatusError) as exc:
            raise Refused(exc.status_code, exc.message) from None
        except ollama.ResponseError as exc:
            raise Refused(exc.status_code, exc.error) from None

    def _ask(self, url: str, model: str, text: str, stream: bool,
             temperature: float | None) -> Reply:
        raise NotImplementedError


class OpenAIChat(Door):
    name = "openai"

    def _ask(self, url: str, model: str, text: str, stream: bool,
             temperature: float | None) -> Reply:
        extra = {} if temperature is None else {"temperature": temperature}
        messages = [{"role": "user", "content": text}]
        with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
            if not stream:
                reply = client.chat.completions.create(model=model, messages=messages,
                                                       **extra)
                return Reply(reply.choices[0].message.content or "", reply.model)
            chunks = list(client.chat.completions.create(model=model, messages=messages,
                                                         stream=True, **extra))
            return Reply("".join(c.choices[0].delta.content or "" for c in chunks),
                         chunks[-1].model)


class Responses(Door):
    name = "responses"

    def _ask(self, url: str, model: str, text: str, stream: bool,
             temperature: float | None) -> Reply:
        with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
            if not stream:
                reply = client.responses.create(model=model, input=text,
                                                temperature=temperature)
                return Reply(reply.output_text, reply.model)
            events = list(client.responses.create(model=model, input=text, stream=True,
                                                  temperature=temperature))
            last = events[-1]
            if last.type != "response.completed":
                error = next(e for e in events if e.type == "error")
                raise Refused(200, error.message)
            return Reply("".join(e.delta for e in events
                                 if e.type == "response.output_text.delta"),
                         last.response.model)


class Anthropic(Door):
    name = "anthropic"

    def _ask(self, url: str, model: str, text: str, stream: bool,
             temperature: float | None) -> Reply:
        extra: dict[str, Any] = {} if temperature is None else \
            {"extra_body": {"temperature": temperature}}
        messages = [{"role": "user", "content": text}]
        with anthropic.Anthropic(base_url=url, api_key="x", max_retries=0) as client:
            if not stream:
                message = client.messages.create(model=model, max_tokens=512,
                                                 messages=messages, **extra)
            else:
                with client.messages.stream(model=model, max_tokens=512, messages=messages,
                                            **extra) as events:
                    message = events.get_final_message()
            return Reply("".join(b.text for b in message.content if b.type == "text"),
                         message.model)


class Ollama(Door):
    name = "ollama"

    def _ask(self, url: str, model: str, text: str, stream: bool,
             temperature: float | None) -> Reply:
        options = {} if temperature is None else {"temperature": temperature}
        messages = [{"role": "user", "content": text}]
        client = ollama.Client(host=url)
        try:
            if not stream:
                reply = client.chat(model=model, messages=messages, options=options)
                return Reply(reply.message.content or "", reply.model or "")
            parts = list(client.chat(model=model, messages=messages, options=options,
                                     stream=True))
            return Reply("".join(p.message.content or "" for p in parts), parts[-1].model or "")
        finally:
            client.close()


DOORS = [OpenAIChat(), Responses(), Anthropic(), Ollama()]
