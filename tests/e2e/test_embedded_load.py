"""Fifty IDE users at once on the embedded model, as a new user's config has it: the real
llama.cpp server runs two at a time (its slots), the rest wait their turn in the gateway's
line, and every stream completes (none cut by a first-token limit that their wait inside
the backend used to eat).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai

from tests.support import GatewayProcess

STREAMS = 50


async def one(client: openai.AsyncOpenAI, n: int) -> tuple[str | None, str]:
    stream = await client.chat.completions.create(
        model="smollm2:135m", stream=True, max_tokens=48,  # (bounded: the test's own time)
        messages=[{"role": "user", "content": f"Write one sentence about the number {n}."}])
    text, finish = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return finish, text


def test_fifty_concurrent_streams_to_the_embedded_model_all_complete(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"  # the embedded block of configs/gateway.toml
    config.write_text('[[backends]]\nname = "light"\nkind = "embedded"\ntier = "server"\n'
                      'context_size = 4096\nparallel = 2\n\n'
                      f'[tasks]\ndata_dir = "{tmp_path / "data"}"\n')
    gateway = GatewayProcess(config)
    try:
        async def everyone() -> list[tuple[str | None, str] | BaseException]:
            async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x",
                                          max_retries=0, timeout=300) as client:
                return await asyncio.gather(*(one(client, n) for n in range(STREAMS)),
                                            return_exceptions=True)

        results = asyncio.run(everyone())
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} of {STREAMS} failed, first: {failed[0]!r}"
        done = [r for r in results if not isinstance(r, BaseException)]
        assert all(finish in ("stop", "length") and text for finish, text in done), done
    finally:
        gateway.stop()
