"""The fuzz test's long run: many more random bodies through every front door than the
test suite sends (the same checks: no 5xx, errors in each door's shape, streams ended, no
hang), each run with new random cases.

    .venv/bin/python -m loadtest.fuzz --examples 5000    # per door
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.sim import create_ollama_app, create_openai_app, seed_fleet  # noqa: E402
from tests.fuzz import JSON, Prober, check, door_bodies  # noqa: E402
from tests.support import ServerThread, backend, gateway_config, start_gateway  # noqa: E402


def run(examples: int) -> int:
    fleet = seed_fleet()
    with ServerThread(lambda: create_ollama_app(fleet["ollama"])) as ollama, \
            ServerThread(lambda: create_openai_app(fleet["mlx"], flavor="mlx")) as mlx:
        gateway = start_gateway(gateway_config(
            backend("ollama", "ollama", ollama.url), backend("mlx", "openai", mlx.url + "/v1"),
            plugins=[{"name": "safety"}, {"name": "qa"}, {"name": "cache"}]))
        prober = Prober(gateway.port)
        cases = settings(max_examples=examples, database=None, deadline=None,
                         suppress_health_check=list(HealthCheck))
        started, total = time.monotonic(), 0
        try:
            for path, bodies in door_bodies().items():
                _fuzz(prober, path, bodies, cases)
                total += examples
                print(f"{path}: {examples} cases, all answered properly", flush=True)
        finally:
            prober.close()
            gateway.stop()
    print(f"{total} cases in {time.monotonic() - started:.0f} s: no 5xx, every error in its "
          "door's shape, every stream ended, no hang")
    return 0


def _fuzz(prober: Prober, path: str, bodies: st.SearchStrategy[object],
          cases: settings) -> None:
    @cases
    @given(body=st.one_of(bodies, bodies, bodies, JSON, st.binary(max_size=64)))
    def one(body: object) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        check(path, prober.send(path, raw))

    one()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fuzz", description=__doc__)
    parser.add_argument("--examples", type=int, default=5000, help="cases per door")
    raise SystemExit(run(parser.parse_args().examples))


if __name__ == "__main__":
    main()
