"""``gateway router export``: every outcome the gateway kept (its features, the model that
answered, how it went), as JSON lines, for analysis or ``eval``. ``gateway router eval
FILE``: those outcomes replayed offline, comparing the learned policy with the static
priority on the requests where each would have picked what was logged (the replay method of
Li et al., 2011: unbiased only for a log of uniformly random picks; on a log of the learned
policy's own picks, a guide rather than a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.config import DEFAULT_CONFIG, LearnedConfig, load_config
from gateway.routing.learned import LearnedOrder
from gateway.routing.learning_link import OUTCOMES
from gateway.runtime import ADMIN_KEY_ENV, local_url


def add_router_command(commands: Any) -> None:
    router = commands.add_parser("router", help="learned routing: its outcomes, replayed")
    router_commands = router.add_subparsers(dest="router_command", required=True)
    export = router_commands.add_parser(
        "export", help="every outcome kept, as JSON lines (from the config's Redis, or the "
        f"running gateway's /admin/router/outcomes with the key in ${ADMIN_KEY_ENV})")
    export.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG})")
    export.add_argument("--url", help="the gateway (default: the config's address)")
    export.add_argument("--output", "-o", help="a file (default: standard output)")
    export.set_defaults(run=_export)
    evaluate = router_commands.add_parser(
        "eval", help="replay exported outcomes: the learned policy against the priority")
    evaluate.add_argument("file", help="JSON lines, as `gateway router export` writes")
    evaluate.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG})")
    evaluate.set_defaults(run=_eval)


def _export(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    redis_url = config.routing.learned.redis_url
    try:
        if redis_url and not args.url:
            body = asyncio.run(_from_redis(redis_url, config.routing.learned.outcomes))
        else:
            body = _from_gateway(args.url or local_url(config.server.host, config.server.port))
    except urllib.error.HTTPError as exc:
        hint = f" (set ${ADMIN_KEY_ENV} to an admin key)" if exc.code in (401, 403) else ""
        print(f"gateway router export: {exc}{hint}", file=sys.stderr)
        return 1
    except (OSError, urllib.error.URLError, RedisError, ValueError) as exc:
        print(f"gateway router export: {exc}", file=sys.stderr)
        return 1
    try:
        if args.output:
            with open(args.output, "wb") as out:
                out.write(body)
        else:
            sys.stdout.buffer.write(body)
    except OSError as exc:
        print(f"gateway router export: {args.output or 'standard output'}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _from_gateway(url: str) -> bytes:
    key = os.environ.get(ADMIN_KEY_ENV)
    request = urllib.request.Request(url.rstrip("/") + "/admin/router/outcomes",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        body: bytes = response.read()
    return body


async def _from_redis(url: str, count: int) -> bytes:
    client: Any = aioredis.from_url(url, socket_connect_timeout=5)
    try:
        entries = await client.xrevrange(OUTCOMES, count=count)
    finally:
        await client.aclose()
    return b"".join(fields[b"outcome"] + b"\n" for _, fields in reversed(entries))


def _eval(args: argparse.Namespace) -> int:
    learned_config = load_config(args.config).routing.learned if args.config else \
        LearnedConfig()
    try:
        with open(args.file, "rb") as source:
            outcomes = [orjson.loads(line) for line in source if line.strip()]
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"gateway router eval: {args.file}: {exc}", file=sys.stderr)
        return 1
    try:
        results = replay(outcomes, learned_config)
    except (AttributeError, KeyError, LookupError, TypeError, ValueError) as exc:
        print(f"gateway router eval: {args.file}: not outcomes as `gateway router export` "
              f"writes them ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    print(report(results))
    return 0


def replay(outcomes: list[dict[str, Any]], config: LearnedConfig
           ) -> dict[str, dict[str, tuple[int, float]]]:
    """By alias: for the log, the learned policy and the priority, how many outcomes count
    and their mean reward (the policies count only where they pick what was logged).
    """
    policy = LearnedOrder(config)
    sums: dict[str, dict[str, list[float]]] = collections.defaultdict(
        lambda: {"logged": [], "learned": [], "priority": []})
    for outcome in outcomes:
        models, chosen, alias = outcome.get("candidates"), outcome.get("chosen"), \
            outcome.get("alias")
        if not models or not chosen or not alias or "reward" not in outcome:
            continue  # not a learned pick: nothing to replay
        x, value = list(outcome["x"]), float(outcome["reward"])
        sums[alias]["logged"].append(value)
        if models[0] == chosen:
            sums[alias]["priority"].append(value)
        if policy.pick(alias, models, x) == chosen:
            sums[alias]["learned"].append(value)
            policy.learn(alias, chosen, x, value)
    return {alias: {name: (len(v), sum(v) / len(v) if v else 0.0) for name, v in got.items()}
            for alias, got in sums.items()}


def report(results: dict[str, dict[str, tuple[int, float]]]) -> str:
    if not results:
        return "no learned picks in these outcomes (route with policy = \"learned\" first)"
    lines = [f"{'alias':<16} {'policy':<9} {'outcomes':>8} {'mean reward':>12}"]
    for alias, rows in sorted(results.items()):
        for name in ("logged", "learned", "priority"):
            count, mean = rows[name]
            lines.append(f"{alias:<16} {name:<9} {count:>8} {mean:>12.3f}")
    return "\n".join(lines)
