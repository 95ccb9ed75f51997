"""``gateway demo``: simulated Ollama and MLX servers and the gateway, in one process."""

from __future__ import annotations

import contextlib
from urllib.parse import urlsplit

from aiohttp import web

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.http.server import GatewayRunner
from gateway.keys import ROUTER
from gateway.runtime import new_event_loop, paced_collector, until_signalled
from gateway.sim import create_ollama_app, create_openai_app, seed_fleet, start_site

PACE = {"ttft": 0.25, "tokens_per_s": 30.0}  # a workstation-like feel when streaming


def run_demo(config: GatewayConfig) -> None:
    loop = new_event_loop()
    try:
        loop.run_until_complete(_demo(config))
    finally:
        loop.close()


async def _demo(config: GatewayConfig) -> None:
    fleet = seed_fleet()
    for model in fleet["ollama"] + fleet["mlx"]:
        model.ttft, model.tokens_per_s = PACE["ttft"], PACE["tokens_per_s"]
    runners: list[web.AppRunner] = []
    served = create_app(config)
    gateway = GatewayRunner(served, handler_cancellation=True, access_log=None,
                            shutdown_timeout=config.server.shutdown_grace)
    try:  # (an address in use ends it at any step: what was started is stopped)
        for backend in config.backends:
            address = urlsplit(backend.url)
            host, port = address.hostname or "127.0.0.1", address.port or 80
            app = create_ollama_app(fleet["ollama"]) if backend.kind == "ollama" else \
                create_openai_app(fleet["mlx"], flavor="mlx")
            runners.append(await start_site(app, host, port))
            print(f"simulated {backend.kind:<6} ({backend.name}) on {backend.url}")
        await gateway.setup()
        await web.TCPSite(gateway, config.server.host, config.server.port).start()
        base = f"http://{config.server.host}:{config.server.port}"
        print(_EXAMPLES.format(base=base), flush=True)
        async with paced_collector(served[ROUTER].balancer.at_work):
            await until_signalled()
    finally:
        await gateway.cleanup()
        for runner in runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()


_EXAMPLES = """
gateway on {base}  (Ctrl-C to stop)

  curl {base}/v1/models

  curl -N {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "qwen2.5-coder:32b", "stream": true,
         "messages": [{{"role": "user", "content": "Hello"}}]}}'

python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="unused")
reply = client.chat.completions.create(
    model="qwq:32b", messages=[{{"role": "user", "content": "Hello"}}])
print(reply.choices[0].message.content)
PY
"""
