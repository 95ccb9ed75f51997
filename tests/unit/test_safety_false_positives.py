"""How often the safety checker gets in a coding agent's way: source files and docs of the
installed packages (a few hundred, real), sent as coding agents send them — a file read by a
tool, and a file pasted in a code block — must never be refused. What is flagged is printed
(``pytest -s``) and reported in the README.
"""

from __future__ import annotations

import collections
import sysconfig
from pathlib import Path

from gateway.protocol.openai import parse_chat
from plugins.base import Denied
from plugins.safety import SafetyOptions, SafetyPlugin

PACKAGES = ("aiohttp", "openai", "anthropic", "pydantic", "redis", "asyncssh", "hypothesis",
            "ollama", "yarl", "multidict", "importlinter", "mypy")
MAX_CHARS = 48_000  # per file (a long one is read the way an agent pages through it)


def corpus() -> list[Path]:
    """Every third .py, .md, .rst and .txt file of those packages, in a fixed order."""
    site = Path(sysconfig.get_paths()["purelib"])
    files = sorted(p for package in PACKAGES for p in (site / package).rglob("*")
                   if p.suffix in (".py", ".md", ".rst", ".txt") and p.is_file())
    return files[::3]


def transcripts(path: Path, text: str) -> list[list[dict[str, object]]]:
    """The file as an agent's tool result, and pasted by a user in a code block."""
    name = path.name
    return [
        [{"role": "system", "content": "You are a coding agent."},
         {"role": "user", "content": f"Look at {name} and tell me what it does."},
         {"role": "assistant", "content": None, "tool_calls": [{
             "id": "call_1", "type": "function",
             "function": {"name": "read_file", "arguments": f'{{"path": "{name}"}}'}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": text}],
        [{"role": "user", "content": f"What is wrong with this?\n```\n{text}\n```"}],
    ]


def test_real_code_and_docs_are_never_refused() -> None:
    plugin = SafetyPlugin(SafetyOptions())
    files = corpus()
    assert len(files) >= 300, f"only {len(files)} files: the corpus is too small"
    refused: list[str] = []
    flagged = collections.Counter[str]()
    flagged_files = 0
    for path in files:
        text = path.read_text(errors="replace")[:MAX_CHARS]
        flags: set[str] = set()
        for messages in transcripts(path, text):
            try:
                _, verdict = plugin._check(parse_chat({"model": "m", "messages": messages}))
            except Denied as exc:
                refused.append(f"{path.relative_to(path.parents[2])}: {exc.rule}")
                continue
            for part in verdict.split("; "):
                if part.startswith("flagged="):
                    flags.update(part.removeprefix("flagged=").split(","))
        flagged.update(flags)
        flagged_files += bool(flags)
    print(f"\nsafety on {len(files)} files of {len(PACKAGES)} packages, each sent twice "
          f"(a tool result, a pasted code block): {len(refused)} refused; "
          f"{flagged_files} flagged ({dict(flagged.most_common())})")
    assert refused == []
