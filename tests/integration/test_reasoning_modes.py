"""How reasoning reaches clients is the operator's choice: a separate field (default),
inline in <think> tags for clients that only show content, or not at all.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest

from gateway.sim.fleet import DEFAULT_REPLY, THOUGHT
from tests.support import ServerThread, Sim, backend, gateway_config, start_gateway

USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture(params=["inline", "drop"])
def mode_gateway(request: pytest.FixtureRequest, ollama_sim: Sim, mlx_sim: Sim
                 ) -> Iterator[tuple[str, ServerThread]]:
    config = gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        backend("mlx", "openai", mlx_sim.api_url),
        server={"reasoning": request.param},
    )
    server = start_gateway(config)
    yield request.param, server
    server.stop()


@pytest.mark.parametrize("model", ["qwq:32b", "deepseek-r1-distill-llama:70b"])
def test_reasoning_modes(mode_gateway: tuple[str, ServerThread], model: str) -> None:
    mode, server = mode_gateway
    expected = f"<think>{THOUGHT}</think>{DEFAULT_REPLY}" if mode == "inline" else DEFAULT_REPLY
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        whole = client.chat.completions.create(model=model, messages=USER)
        stream = list(client.chat.completions.create(model=model, messages=USER, stream=True))
    assert whole.choices[0].message.content == expected
    assert getattr(whole.choices[0].message, "reasoning_content", None) is None
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    assert not any(getattr(c.choices[0].delta, "reasoning_content", None)
                   for c in stream if c.choices)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_client_that_turns_thinking_on_gets_thinking_blocks_whatever_the_mode(
        mode_gateway: tuple[str, ServerThread], stream: bool) -> None:
    """The mode is for clients that read only text: an Anthropic client that asked for
    thinking got the model's in <think> tags as its text (inline), or none (drop)."""
    _, server = mode_gateway
    ask = {"model": "qwq:32b", "max_tokens": 512, "messages": USER,
           "thinking": {"type": "enabled", "budget_tokens": 1024}}
    with anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0) as client:
        if stream:
            with client.messages.stream(**ask) as events:  # type: ignore[arg-type]
                message = events.get_final_message()
        else:
            message = client.messages.create(**ask)  # type: ignore[arg-type]
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None))
            for b in message.content] == [("thinking", THOUGHT), ("text", DEFAULT_REPLY)]
