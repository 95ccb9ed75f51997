"""Run a simulated server: ``python -m gateway.sim ollama --port 11434``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from gateway.runtime import new_event_loop, paced_collector
from gateway.sim import SimModel, create_ollama_app, create_openai_app, seed_fleet, start_site


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.sim", description=__doc__)
    parser.add_argument("kind", choices=["ollama", "mlx", "llamacpp", "openai"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reply", help="replace every model's reply text")
    parser.add_argument("--tokens-per-s", type=float, help="pace of every model (0 = no pause)")
    parser.add_argument("--ttft", type=float, help="time to first token of every model")
    args = parser.parse_args()
    fleet = seed_fleet()
    models: list[SimModel] = fleet["ollama"] if args.kind == "ollama" else fleet["mlx"]
    for model in models:
        if args.reply is not None:
            model.reply = args.reply
        if args.tokens_per_s is not None:
            model.tokens_per_s = args.tokens_per_s
        if args.ttft is not None:
            model.ttft = args.ttft
    if args.kind == "ollama":
        app = create_ollama_app(models)
    else:
        app = create_openai_app(models, flavor=args.kind)

    async def serve() -> None:
        runner = await start_site(app, args.host, args.port)
        print(f"simulated {args.kind} on http://{args.host}:{args.port}", flush=True)
        try:  # (its handlers are its tasks: few of them, and its own stalls are short)
            async with paced_collector(lambda: len(asyncio.all_tasks())):
                await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    loop = new_event_loop()
    with contextlib.suppress(KeyboardInterrupt):
        loop.run_until_complete(serve())


if __name__ == "__main__":
    main()
