"""The errors a client can see, each with its HTTP status and OpenAI shape
(``GatewayError.body``); the other doors write the same error in their own shapes, as an
HTTP answer or in-band once a stream has started.
"""

from __future__ import annotations

import math
from typing import Any, Self

import orjson

# The most characters of a model's name: a longer one is a mistake (refused), and is never
# echoed (in an error, a log line, the dashboard's records) past this.
MODEL_NAME_MAX = 256


def model_shown(name: str) -> str:
    """A model's name as the gateway repeats it: cut at ``MODEL_NAME_MAX``."""
    return name if len(name) <= MODEL_NAME_MAX else name[:MODEL_NAME_MAX] + "…"


class GatewayError(Exception):
    """An error with a status and an OpenAI body: ``{"error": {message, type, param, code}}``."""

    status: int = 500
    type: str = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after = retry_after

    def kept(self) -> Self:
        """This error, caught to be kept or said later, without the traceback of where it
        was raised and the error it was raised from: the frames those hold keep the error
        in their locals (``error = exc``), a reference cycle that only the garbage
        collector's full passes free, which with a thousand streams open take tens of
        milliseconds, every stream waiting. (A GatewayError is said by its message.)
        """
        self.__traceback__ = self.__context__ = self.__cause__ = None
        return self

    @property
    def label(self) -> str:
        """The error in a word, for metrics and traces: its code, else its type."""
        return self.code or self.type

    def payload(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            # Throttled without a hint: the OpenAI SDKs back off on their own, but a header
            # still tells every other client when to come back.
            return {"Retry-After": "1"} if self.status in (429, 503) else {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def body(self) -> bytes:
        return orjson.dumps(self.payload())



class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class Unsupported(GatewayError):
    """A backend that cannot do this kind of request at all (its 501: llama.cpp's server
    asked for embeddings without ``--embeddings``, say). Another deployment may; retrying
    this one would not, and it is not broken for it. (Not an ``InvalidRequest``: the
    request is fine, and a rescue does not take it for a refused prefill.)
    """

    status = 400
    type = "invalid_request_error"
    code = "unsupported_by_backend"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"  # as OpenAI types every 404, an unknown model's included


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str, unreachable: list[str] | None = None) -> None:
        message = f"The model {model_shown(model)!r} does not exist or is not served here."
        if unreachable:
            message += f" (Not reachable right now: {', '.join(unreachable)}.)"
        super().__init__(message, param="model")
        self.model = model


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


# What Ollama's 503 says when its queue is full (``OLLAMA_MAX_QUEUE``): a busy server, not
# a failing one.
BUSY = "maximum pending requests exceeded"


class UpstreamError(GatewayError):
    """A backend failed: unreachable, answered with an error, or broke off a stream."""

    status = 502
    type = "api_error"
    code = "upstream_error"

    def __init__(self, message: str, *, backend: str = "", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.backend = backend


class Unavailable(UpstreamError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "api_error"
    code = "upstream_timeout"


# An answer still coming, token after token, when its exchange's ``total`` limit ran out: long,
# not broken (it ends there, cut as by a length limit; no fault of the deployment's).
OVERTIME = "answer_overtime"


# A model that cannot do what a request asks (images, tools...): the client's error when it
# named that model, but a model the gateway picked for it is passed over for the next.
UNSUPPORTED_BY_MODEL = "unsupported_by_model"


def from_upstream_status(
    backend: str, status: int, message: str, retry_after: float | None, code: str | None = None
) -> GatewayError:
    """Map an upstream HTTP error onto what the client should see.

    Client mistakes (400, 404, 413, and a context too small for the request whatever its
    status) are passed on as such, and so is a backend's "not implemented" (501: another
    server could, but asking this one again would not help), or a 404 that is not about
    the model (the server has no such endpoint: mlx_lm.server asked for embeddings); the
    gateway's own credentials being refused is the gateway's problem (502), not the
    client's 401.
    """
    text = f"{backend}: {message}" if message else f"{backend} answered HTTP {status}"
    if code == "context_length_exceeded":  # whatever its status: a bigger model may take it
        return InvalidRequest(message or text, code=code)
    if status == 400 or status == 422:
        return InvalidRequest(message or text, code=code or _error_code(message))
    if status == 404:
        if _no_such_path(message, code):
            return Unsupported(f"{backend} cannot answer this kind of request (HTTP 404: "
                               f"{message})")
        return NotFound(text, code="model_not_found", param="model")
    if status == 413:
        return PayloadTooLarge(text)
    if status == 501:
        return Unsupported(text)
    if status == 429:
        return RateLimited(text, retry_after=retry_after)
    if status in (408, 504):
        return UpstreamTimeout(text, backend=backend)
    if status == 503 and BUSY in message:  # Ollama's queue is full: it is up, and busy
        return Unavailable(text, backend=backend, retry_after=retry_after, code="backend_busy")
    if status == 503:
        return Unavailable(text, backend=backend, retry_after=retry_after)
    if status in (401, 403):
        return UpstreamError(f"{backend} refused the gateway's credentials", backend=backend,
                             code="upstream_auth_failed")
    if status == 500 and _error_code(message) == UNSUPPORTED_BY_MODEL:
        # (llama.cpp's "image input is not supported": the model cannot, the server is fine)
        return InvalidRequest(message, code=UNSUPPORTED_BY_MODEL)
    return UpstreamError(text, backend=backend)


def _no_such_path(message: str, code: str | None) -> bool:
    """Whether a 404 says the server has no such endpoint ("Not Found": mlx_lm.server asked
    for embeddings; "404 page not found", "File Not Found"), not that a model (or an Azure
    deployment) is missing, or that something else went wrong (mlx_lm.server answers a
    failed generation 404 too).
    """
    lowered = message.lower()
    if code == "unknown_url" or "unknown request url" in lowered or "invalid url" in lowered:
        return True  # (OpenAI's and Groq's: no such endpoint)
    return "not found" in lowered and "model" not in lowered and \
        "deployment" not in lowered and code is None


def error_fields(error: Any) -> tuple[str, str | None, int | None] | None:
    """The message, (string) code and status of an upstream's error object, whichever
    dialect it is in: Ollama's string, OpenAI's ``{"message", "code"}``, llama.cpp's integer
    codes (its status); None when it is none of these.
    """
    if isinstance(error, str):
        return error[:500], None, None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    message = error["message"]
    code = error.get("code")
    if error.get("type") == "exceed_context_size_error" or "is too large to process" in message:
        # llama.cpp's: a prompt past its slot's context (400); an input to embed past its
        # batch (a 500, though the server is fine: "input (N tokens) is too large to
        # process. increase the physical batch size").
        code = "context_length_exceeded"
    status = code if isinstance(code, int) and 400 <= code < 600 else None
    return message[:500], code if isinstance(code, str) else None, status


def stream_error(backend: str, error: Any) -> GatewayError:
    """An error a backend sent as an event of its stream, its HTTP status long since 200:
    a refusal of the request (a context too small, a parameter it does not take, a rate
    limit) is what it would have been as a status, so a bigger model or the client hears
    it as such; anything else is the backend failing.
    """
    fields = error_fields(error)
    message, code, status = fields if fields is not None else (str(error)[:500], None, None)
    code = code or _error_code(message)
    if code == "rate_limit_exceeded" and status is None:  # (OpenAI's word, no status)
        status = 429
    if code in ("context_length_exceeded", "content_policy_violation") or \
            (status is not None and 400 <= status < 500):
        return from_upstream_status(backend, status or 400, message, None, code)
    return UpstreamError(f"{backend}: {message}", backend=backend, code="upstream_stream_error")


def _error_code(message: str) -> str | None:
    lowered = message.lower()
    if "context" in lowered and ("length" in lowered or "window" in lowered or "size" in lowered):
        return "context_length_exceeded"
    if ("content" in lowered and ("policy" in lowered or "filter" in lowered)) or \
            "safety system" in lowered:  # OpenAI's wording for a content-policy refusal
        return "content_policy_violation"
    if "does not support" in lowered or "not a multimodal model" in lowered or \
            "input is not supported" in lowered:
        # Ollama's '"x" does not support tools' (images, generate, chat, thinking...), vLLM's
        # and llama.cpp's alike: this model cannot do what was asked; another may
        return UNSUPPORTED_BY_MODEL
    return None
