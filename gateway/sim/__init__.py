"""Simulated Ollama and OpenAI-compatible servers with fault injection, for tests, the demo
and the benchmarks (``python -m gateway.sim --help``).
"""

from __future__ import annotations

from aiohttp import web

from gateway.sim.engine import SIM_STATE
from gateway.sim.fleet import Faults, SimModel, seed_fleet
from gateway.sim.ollama import create_ollama_app
from gateway.sim.openai import create_openai_app

__all__ = [
    "SIM_STATE",
    "Faults",
    "SimModel",
    "create_ollama_app",
    "create_openai_app",
    "seed_fleet",
    "start_site",
]


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` in the running loop; a client that hangs up cancels
    its handler, so the simulator notices disconnects as a real server would.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner
