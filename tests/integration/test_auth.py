"""API keys: checked as SHA-256 digests; the client's credentials never travel upstream;
a backend's own key comes from the environment variable the config names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from tests.support import ServerThread, Sim, backend, gateway_config, openai_client, start_gateway

KEY = "gw-test-key-0123456789"
ADMIN = "gw-admin-key-9876543210"
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def guarded(ollama_sim: Sim, mlx_sim: Sim, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[ServerThread]:
    monkeypatch.setenv("TEST_MLX_KEY", "backend-secret-key")
    config = gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        backend("mlx", "openai", mlx_sim.api_url, api_key_env="TEST_MLX_KEY"),
        auth={"key_hashes": [hashlib.sha256(KEY.encode()).hexdigest()],
              "admin_key_hashes": [hashlib.sha256(ADMIN.encode()).hexdigest()]},
    )
    server = start_gateway(config)
    yield server
    server.stop()


def client(server: ServerThread, key: str) -> openai.OpenAI:
    return openai_client(server.url, key)


def test_a_valid_key_is_served(guarded: ServerThread) -> None:
    with client(guarded, KEY) as c:
        assert c.chat.completions.create(model="qwq:32b", messages=USER).choices


def test_a_wrong_key_is_a_401(guarded: ServerThread) -> None:
    with client(guarded, "wrong-key") as c, pytest.raises(openai.AuthenticationError) as caught:
        c.models.list()
    assert caught.value.status_code == 401
    assert caught.value.body["type"] == "authentication_error"  # type: ignore[index]


def test_a_missing_key_is_a_401_that_says_how_to_send_one(guarded: ServerThread) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(guarded.url + "/v1/models", timeout=5)
    assert caught.value.code == 401
    error = json.loads(caught.value.read())["error"]
    assert error["code"] == "missing_api_key" and "Bearer" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_backend_echoing_the_gateways_key_in_an_error_does_not_pass_it_on(
        guarded: ServerThread, mlx_sim: Sim, stream: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """A server whose error repeats the request's headers: neither the client nor the log
    gets the key the gateway sent it.
    """
    caplog.set_level(logging.INFO)
    mlx_sim.fault("command-r-plus:104b", status=500,
                  message="internal: Authorization: Bearer backend-secret-key")
    with client(guarded, KEY) as c, pytest.raises(openai.APIError) as caught:
        answer = c.chat.completions.create(model="command-r-plus:104b", messages=USER,
                                           stream=stream)
        if stream:
            list(answer)  # type: ignore[arg-type]
    assert "Bearer [REDACTED]" in str(caught.value.body)
    assert "backend-secret-key" not in str(caught.value.body)
    assert "backend-secret-key" not in caplog.text and "[REDACTED]" in caplog.text


def health(server: ServerThread, key: str | None = None) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(server.url + "/health", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_health_needs_no_key_and_tells_only_liveness_without_the_admin_key(
        guarded: ServerThread) -> None:
    for key in (None, KEY):  # no key, or a key for models
        assert set(health(guarded, key)) == {"status", "time"}
        assert health(guarded, key)["status"] == "ok"
    full = health(guarded, ADMIN)
    assert {"backends", "deployments", "tunnels", "plugins"} <= set(full)


def test_client_credentials_never_reach_a_backend(
    guarded: ServerThread, ollama_sim: Sim, mlx_sim: Sim
) -> None:
    with client(guarded, KEY) as c:
        c.chat.completions.create(model="qwq:32b", messages=USER)
        c.chat.completions.create(model="command-r-plus:104b", messages=USER, stream=True)
    [to_ollama] = ollama_sim.requests("/api/chat")
    [to_mlx] = mlx_sim.requests("/v1/chat/completions")
    assert to_ollama["authorization"] is None
    # The MLX backend gets the gateway's own key for it, never the client's.
    assert to_mlx["authorization"] == "Bearer backend-secret-key"
    assert KEY not in str(to_ollama) + str(to_mlx)
