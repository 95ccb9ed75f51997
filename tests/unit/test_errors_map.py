"""Upstream failures map onto the status a client should see."""

from __future__ import annotations

import pytest

from gateway.backends.http import error_details, parse_retry_after
from gateway.errors import from_upstream_status, stream_error
from gateway.routing.dispositions import counts_against, disposition


@pytest.mark.parametrize(("upstream", "client", "kind"), [
    (400, 400, "invalid_request_error"), (401, 502, "api_error"), (403, 502, "api_error"),
    (404, 404, "invalid_request_error"), (408, 504, "api_error"),
    (413, 413, "invalid_request_error"), (501, 400, "invalid_request_error"),
    (429, 429, "rate_limit_error"), (500, 502, "api_error"), (502, 502, "api_error"),
    (503, 503, "service_unavailable"), (504, 504, "api_error"),
])
def test_status_mapping(upstream: int, client: int, kind: str) -> None:
    message = "model 'm' not found" if upstream == 404 else "msg"
    error = from_upstream_status("b", upstream, message, None)
    assert (error.status, error.type) == (client, kind)


@pytest.mark.parametrize(("message", "code", "expected"), [
    ("model 'm' not found", None, "model_not_found"),  # Ollama's
    ("The model `m` does not exist", "model_not_found", "model_not_found"),  # OpenAI's
    ("", None, "model_not_found"),  # (nothing said: the model, as before)
    ("Not Found", None, "unsupported_by_backend"),  # mlx_lm.server, no such endpoint
    ("404 page not found", None, "unsupported_by_backend"),  # a Go server's
    ("File Not Found", None, "unsupported_by_backend"),  # llama.cpp's
    ("Unknown request URL: POST /openai/v1/embeddings.", "unknown_url",  # OpenAI's, Groq's
     "unsupported_by_backend"),
    ("Invalid URL (POST /v1/completions)", None, "unsupported_by_backend"),
    # not a missing endpoint: Azure's deployment, mlx_lm.server's failed generation
    ("The API deployment for this resource does not exist.", "DeploymentNotFound",
     "model_not_found"),
    ("generation thread died", None, "model_not_found"),
])
def test_a_404_not_about_the_model_is_an_endpoint_the_backend_lacks(
        message: str, code: str | None, expected: str) -> None:
    error = from_upstream_status("b", 404, message, None, code)
    assert error.code == expected
    # (an endpoint it lacks does not take the deployment out of service for the rest)
    assert counts_against(error) == (expected == "model_not_found")


def test_a_context_too_small_is_the_clients_whatever_the_status() -> None:
    # llama.cpp answers an input to embed that is longer than its batch with a 500.
    body = (b'{"error": {"code": 500, "message": "input (2501 tokens) is too large to process.'
            b' increase the physical batch size (current batch size: 512)", "type": '
            b'"server_error"}}')
    message, code = error_details(body)
    error = from_upstream_status("light", 500, message, None, code)
    assert (error.status, error.code) == (400, "context_length_exceeded")
    assert error.message.startswith("input (2501 tokens) is too large to process")


def test_the_gateways_own_credentials_being_refused_is_not_the_clients_401() -> None:
    error = from_upstream_status("cloud", 401, "Incorrect API key provided: sk-...", None)
    assert "sk-" not in error.message and error.status == 502


def test_retry_after_defaults_when_throttled_without_one() -> None:
    assert from_upstream_status("b", 429, "", None).headers() == {"Retry-After": "1"}
    assert from_upstream_status("b", 503, "", 7.2).headers() == {"Retry-After": "8"}


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"error": "model \\"x\\" not found"}', ('model "x" not found', None)),
    (b'{"error": {"message": "too long", "code": "context_length_exceeded"}}',
     ("too long", "context_length_exceeded")),
    (b'{"error": {"code": 400, "message": "exceeds", "type": "exceed_context_size_error"}}',
     ("exceeds", "context_length_exceeded")),
    (b"Not Found", ("Not Found", None)),
])
def test_error_bodies_in_every_dialect(body: bytes, expected: tuple[str, str | None]) -> None:
    assert error_details(body) == expected


@pytest.mark.parametrize(("value", "seconds"), [
    ("3", 3.0), ("0.5", 0.5), ("-4", 0.0), ("inf", None), ("nan", None), ("soon", None),
    ("99999999", 3600.0), (None, None),
])
def test_retry_after_parsing(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value) == seconds


def test_ollamas_full_queue_is_a_busy_server_not_a_failing_one() -> None:
    # Ollama answers 503 when OLLAMA_MAX_QUEUE requests wait: the breaker must not open
    # on a host that is merely busy.
    busy = from_upstream_status(
        "studio", 503, "server busy, please try again.  maximum pending requests exceeded", None)
    assert (busy.status, busy.code) == (503, "backend_busy")
    assert disposition(busy) == "wait" and not counts_against(busy)
    down = from_upstream_status("studio", 503, "Loading model", None)
    assert down.status == 503 and counts_against(down)


@pytest.mark.parametrize(("event", "status", "code", "retried"), [
    ("out of memory", 502, "upstream_stream_error", True),  # Ollama's line
    ({"message": "boom", "type": "server_error", "code": None}, 502, "upstream_stream_error",
     True),
    ({"code": 500, "message": "decode failed", "type": "server_error"}, 502,
     "upstream_stream_error", True),
    ({"code": 400, "message": "too long", "type": "exceed_context_size_error"}, 400,
     "context_length_exceeded", False),  # llama.cpp's
    ({"message": "max 4096 tokens", "code": "context_length_exceeded"}, 400,
     "context_length_exceeded", False),  # OpenAI's
    ("the input length exceeds the context length", 400, "context_length_exceeded", False),
    ({"object": "error", "message": "bad top_k", "type": "BadRequestError", "code": 400}, 400,
     None, False),  # vLLM's
    ({"code": 429, "message": "slow down", "type": "rate_limit_error"}, 429,
     "rate_limit_exceeded", False),
    ({"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}, 429,
     "rate_limit_exceeded", False),  # OpenAI's words, no status
    (["not", "an", "object"], 502, "upstream_stream_error", True),
])
def test_an_error_event_is_what_its_status_or_code_says(
        event: object, status: int, code: str | None, retried: bool) -> None:
    error = stream_error("b", event)
    assert (error.status, error.code) == (status, code)
    assert (disposition(error) == "retry") is retried


@pytest.mark.parametrize(("message", "code"), [
    ('"llava:7b" does not support tools', "unsupported_by_model"),
    ("registry.ollama.ai/library/qwq:32b does not support images", "unsupported_by_model"),
    # (a context too small is that, whatever else it says: a bigger model may take it)
    ("This model's context length does not support a prompt of 9000 tokens",
     "context_length_exceeded"),
])
def test_a_model_that_cannot_do_what_was_asked_says_so(message: str, code: str) -> None:
    error = from_upstream_status("ollama", 400, message, None)
    assert error.status == 400 and error.code == code
