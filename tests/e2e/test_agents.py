"""The coding agents users point at the gateway, run for real (from npm, pinned in
tests/node): Codex CLI through the Responses door, Claude Code through the Anthropic door,
each configured as the README says, doing one task in front of the simulated Ollama.

The simulated model calls the first tool it is offered (arguments from the tool's schema),
then answers with what the tool said: so a task is a whole agent turn, a tool call the
agent runs and a tool result it sends back, and the agent prints the answer.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import NODE_DIR, ServerThread, Sim, backend, gateway_config, start_gateway

AGENTS = NODE_DIR / "node_modules" / ".bin"
TASK = "Reply with the single word: ok"


@pytest.fixture
def gateway(ollama_sim: Sim) -> Iterator[ServerThread]:
    server = start_gateway(gateway_config(backend("ollama", "ollama", ollama_sim.api_url)))
    yield server
    server.stop()


def run_agent(command: list[str], home: Path, env: dict[str, str]) -> str:
    work = home / "work"
    work.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL, check=False,
                            env={"PATH": os.environ["PATH"], "HOME": str(home), **env})
    assert result.returncode == 0, f"{command[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_codex_cli_does_a_task_through_the_responses_door(
        gateway: ServerThread, ollama_sim: Sim, tmp_path: Path) -> None:
    (tmp_path / ".codex").mkdir()
    (tmp_path / ".codex" / "config.toml").write_text(f"""\
model = "qwen2.5-coder:32b"
model_provider = "gateway"

[model_providers.gateway]
name = "gateway"
base_url = "{gateway.url}/v1"
env_key = "GATEWAY_KEY"
wire_api = "responses"
""")
    asked = len(ollama_sim.requests("/api/chat"))
    printed = run_agent([str(AGENTS / "codex"), "exec", "--skip-git-repo-check", TASK],
                        tmp_path, {"GATEWAY_KEY": "unused"})
    turns = ollama_sim.requests("/api/chat")[asked:]
    assert len(turns) == 2  # the call, then the answer to what the tool said
    first, second = (turn["payload"] for turn in turns)
    # Its tools reached the model: the functions, its namespace's too; web_search left out.
    offered = {tool["function"]["name"] for tool in first["tools"]}
    assert "exec_command" in offered and not any("web_search" in n for n in offered)
    assert any(name.startswith("multi_agent_v1__") for name in offered)
    # Codex ran the command the model asked for, and sent back what it printed.
    assert second["messages"][-1]["role"] == "tool"
    assert "command not found" in second["messages"][-1]["content"]
    assert "The tool said:" in printed


def test_claude_code_does_a_task_through_the_anthropic_door(
        gateway: ServerThread, ollama_sim: Sim, tmp_path: Path) -> None:
    asked = len(ollama_sim.requests("/api/chat"))
    printed = run_agent(
        [str(AGENTS / "claude"), "-p", TASK, "--tools", "Bash"], tmp_path,
        {"ANTHROPIC_BASE_URL": gateway.url, "ANTHROPIC_AUTH_TOKEN": "unused",
         # An alias, as the README suggests: Claude Code asks for max_tokens 32,000, past
         # qwen2.5-coder's window, which must not rule the model out.
         "ANTHROPIC_MODEL": "auto:code", "ANTHROPIC_DEFAULT_HAIKU_MODEL": "auto:fast",
         "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"})
    turns = [t["payload"] for t in ollama_sim.requests("/api/chat")[asked:]
             if t["payload"].get("tools")]
    assert [t["model"] for t in turns] == ["qwen2.5-coder:32b"] * 2
    assert turns[0]["options"]["num_predict"] == 32000
    # Claude Code refused to run the command unasked (-p), and said so as the tool result.
    assert turns[1]["messages"][-1]["role"] == "tool"
    assert printed.startswith("The tool said:")
