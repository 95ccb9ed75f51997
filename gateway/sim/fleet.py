"""Simulated models: what they are (as a backend lists them), how they answer, and the
faults they can be told to show. Deterministic, so tests can assert exact text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from dataclasses import dataclass, field
from typing import Any

DEFAULT_REPLY = (
    "The quick brown fox jumps over the lazy dog. A gateway routes each request to the "
    "model best placed to answer it, and keeps the answer flowing when a machine fails."
)
THOUGHT = "The user wants an answer. I will give a short and clear one."


@dataclass(slots=True)
class Faults:
    """Misbehaviour on demand. ``remaining`` limits it to the next N requests."""

    latency: float = 0.0  # seconds before the response headers
    ttft: float | None = None  # replaces the model's time to first token
    tokens_per_s: float | None = None  # replaces the model's pace
    status: int = 0  # answer with this HTTP error status
    retry_after: float | None = None  # ... and this Retry-After
    message: str = ""
    reset: bool = False  # TCP reset before any response
    no_response: bool = False  # accept the request, never answer
    cut_after: int | None = None  # reset the connection after N tokens
    stall_after: int | None = None  # go silent after N tokens, connection left open
    malformed_at: int | None = None  # one event that is not JSON, before token N
    bad_shape_at: int | None = None  # one JSON event of the wrong shape, before token N
    error_after: int | None = None  # an in-band error event after N tokens, then the end
    error_code: str | int | None = None  # ... with this code (OpenAI's word, or llama.cpp's
    # and vLLM's status), where the server's event has one
    cut_body: bool = False  # with ``status``: send its head and part of its body, then reset
    missing_done: bool = False  # end the stream cleanly without [DONE] / done:true
    cut_at_end: bool = False  # reset the connection once the finish is sent (before OpenAI's
    # usage and [DONE]; for Ollama, whose finish is its last line, before the body's end)
    end_delay: float = 0.0  # pause between the last event and the end of the HTTP body
    content_policy: bool = False  # refuse as a content-policy violation
    reject_prefill: bool = False  # refuse a final assistant message (prefill)
    reply: str | None = None  # answer this text, as it is, whatever was asked ("" answers empty)
    refusal: str | None = None  # refuse in this text, in OpenAI's refusal field (Ollama: as text)
    thought: str | None = None  # a thinking model's reasoning, in place of its own
    finish: str | None = None  # end with this finish reason ("length": cut by its own limit)
    no_usage: bool = False  # say no token counts (a server that ignores include_usage)
    ignore_stream: bool = False  # answer whole even when asked for a stream
    remaining: int | None = None

    def at(self, i: int) -> bool:
        """Whether an in-stream fault happens before token ``i``."""
        return any(after is not None and i >= after for after in
                   (self.cut_after, self.stall_after, self.error_after)) or \
            i in (self.malformed_at, self.bad_shape_at)

    def in_stream(self) -> bool:
        """Whether any fault strikes in the middle of a stream."""
        return self.cut_at_end or any(
            at is not None for at in (self.cut_after, self.stall_after, self.error_after,
                                      self.malformed_at, self.bad_shape_at))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Faults:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown fault knobs: {sorted(unknown)}")
        return cls(**data)

    def active(self) -> bool:
        return self != Faults()


@dataclass(slots=True)
class SimModel:
    name: str
    family: str = "llama"
    parameter_size: str = "7B"
    quantization: str = "Q4_K_M"
    context_length: int = 8192
    capabilities: tuple[str, ...] = ("completion", "tools")
    embedding_length: int = 0  # > 0 for embedding models
    reply: str = DEFAULT_REPLY
    # How reasoning comes out: "field" (Ollama thinking / reasoning_content), "tags"
    # (<think>…</think> inside the text, as R1 distills do), or "" for none.
    thinking: str = ""
    ttft: float = 0.0
    tokens_per_s: float = 0.0  # 0 = as fast as possible
    loaded: bool = False
    load_s: float = 0.0  # how long the model takes to load, when it is not
    # Requests it answers at once (Ollama's OLLAMA_NUM_PARALLEL); the rest wait in the
    # server's queue, unanswered (no headers) until their turn. 0: no limit.
    parallel: int = 0
    # The window it runs with once loaded (Ollama loads a model with its own context
    # length, whatever the model was trained for; /api/ps says it). 0: its context_length.
    runs_with: int = 0
    faults: Faults = field(default_factory=Faults)
    # Skill by kind of task (chat, code, extract, reason, long, as the gateway's router
    # guesses them): the chance its answer is a good one; otherwise it is one QA rejects
    # (invalid JSON, a loop, or nothing). A kind not named: always good.
    skills: dict[str, float] = field(default_factory=dict)

    def pace(self) -> tuple[float, float]:
        """(time to first token, delay between tokens), faults applied."""
        ttft = self.faults.ttft if self.faults.ttft is not None else self.ttft
        rate = self.faults.tokens_per_s if self.faults.tokens_per_s is not None else \
            self.tokens_per_s
        return ttft, (1.0 / rate if rate > 0 else 0.0)

    def take_faults(self) -> Faults:
        """The faults for this request, counting down a limited fault."""
        faults = self.faults
        if faults.remaining is not None:
            if faults.remaining <= 0:
                self.faults = Faults()
                return self.faults
            faults.remaining -= 1
        return faults


def tokens(text: str) -> list[str]:
    """Words with their following space: the simulator's notion of a token."""
    out: list[str] = []
    start = 0
    for i, ch in enumerate(text):
        if ch == " ":
            out.append(text[start:i + 1])
            start = i + 1
    if start < len(text):
        out.append(text[start:])
    return out


def count_tokens(text: str) -> int:
    return max(1, len(text.split())) if text else 0


def continuation(reply: str, prefill: str) -> str:
    """What remains of ``reply`` after an assistant prefill (the whole reply if unrelated)."""
    return reply[len(prefill):] if prefill and reply.startswith(prefill) else reply


def tool_arguments(tool: dict[str, Any]) -> dict[str, Any]:
    """Arguments that satisfy a tool's required parameters (a parameter's ``default``, where
    it states one, as a model given that schema tends to do).
    """
    params = (tool.get("function") or {}).get("parameters")
    params = params if isinstance(params, dict) else {}
    props = params.get("properties")
    props = props if isinstance(props, dict) else {}
    sample = {"string": "Paris", "number": 1.5, "integer": 1, "boolean": True,
              "array": [], "object": {}}
    required = params.get("required")
    if not isinstance(required, list):
        return {}
    return {name: _default_of(props.get(name), sample.get(_type_of(props.get(name)), "Paris"))
            for name in required if isinstance(name, str)}


def _default_of(spec: Any, otherwise: Any) -> Any:
    return spec["default"] if isinstance(spec, dict) and "default" in spec else otherwise


def _type_of(spec: Any) -> str:
    kind = spec.get("type") if isinstance(spec, dict) else None
    return kind if isinstance(kind, str) else "string"


def json_reply(text: str, schema: dict[str, Any] | None) -> dict[str, Any]:
    if not schema or not schema.get("properties"):
        return {"answer": text}
    sample = {"string": text, "number": 1.5, "integer": 1, "boolean": True,
              "array": [], "object": {}}
    return {name: sample.get(spec.get("type", "string"), text)
            for name, spec in schema["properties"].items()}


def embedding(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    raw = b""
    counter = 0
    while len(raw) < dims * 4:
        raw += hashlib.blake2b(f"{counter}:{text}".encode(), digest_size=64).digest()
        counter += 1
    values = [v / 2**31 - 1.0 for v in struct.unpack(f"<{dims}I", raw[: dims * 4])]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def seed_fleet() -> dict[str, list[SimModel]]:
    """The seed system's workstation: Ollama and MLX model lists as it had them."""
    ollama = [
        SimModel("qwq:32b", family="qwen2", parameter_size="32.8B", context_length=32768,
                 capabilities=("completion", "tools", "thinking"), thinking="field"),
        SimModel("qwen2.5-coder:32b", family="qwen2", parameter_size="32.8B",
                 context_length=32768, capabilities=("completion", "tools", "insert")),
        SimModel("phi3.5:3.8b", family="phi3", parameter_size="3.8B", context_length=131072,
                 capabilities=("completion",)),
        SimModel("llava:7b", family="llama", parameter_size="7.2B", context_length=4096,
                 capabilities=("completion", "vision")),
        SimModel("nomic-embed-text:latest", family="nomic-bert", parameter_size="137M",
                 quantization="F16", context_length=2048, capabilities=("embedding",),
                 embedding_length=768),
    ]
    mlx = [
        SimModel("command-r-plus:104b", family="cohere", parameter_size="104B",
                 quantization="4bit", context_length=131072, capabilities=("completion", "tools")),
        SimModel("deepseek-r1-distill-llama:70b", family="llama", parameter_size="70.6B",
                 quantization="4bit", context_length=131072, capabilities=("completion",),
                 thinking="tags"),
    ]
    return {"ollama": ollama, "mlx": mlx}
