"""``gateway keys new|list|set|revoke``: named API keys and their limits, kept in Redis
(``[tenants] store = "redis"``: every gateway process sees a change within a second) or
printed as a ``[[keys]]`` block for the config file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.config import DEFAULT_CONFIG, ConfigError, GatewayConfig, KeyConfig, load_config
from gateway.store import redis_problem, shown
from gateway.tenants import Away, KeyBook, Link, RedisKeys, amend, described, issue


def add_keys_command(commands: Any) -> None:
    """The ``keys`` command and its own commands, on the CLI's parser."""
    keys = commands.add_parser("keys", help="named API keys and their limits")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_commands.add_parser(
        "new", help="issue a key: kept in Redis ([tenants] store = \"redis\"), or printed "
        "as a [[keys]] block for the config")
    new.add_argument("--id", help="the key's id (default: made up)")
    _key_settings(new)
    new.set_defaults(run=_keys_new)
    listing = keys_commands.add_parser("list", help="the keys, with their settings")
    listing.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG})")
    listing.set_defaults(run=_keys_list)
    revoke = keys_commands.add_parser("revoke", help="stop a key in Redis working, on every "
                                      "gateway process, within a second")
    revoke.add_argument("id")
    revoke.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG})")
    revoke.set_defaults(run=_keys_revoke)
    change = keys_commands.add_parser("set", help="change a key's settings in Redis")
    change.add_argument("id")
    _key_settings(change)
    change.set_defaults(run=_keys_set)


def _key_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--name", help="who or what the key is for")
    parser.add_argument("--models", help="the models and aliases it may use, comma-separated "
                        "(\"\": all)")
    parser.add_argument("--rpm", type=int, help="requests per minute (0: no limit)")
    parser.add_argument("--tpm", type=int, help="tokens per minute, prompt and answer (0: no "
                        "limit)")
    parser.add_argument("--concurrency", type=int, help="requests at once (0: no limit)")
    parser.add_argument("--budget", type=int, help="tokens per --budget-period (0: no limit)")
    parser.add_argument("--budget-period", choices=["day", "month"])
    parser.add_argument("--cache", choices=["key", "shared", "off"],
                        help="whose cached answers it may get")
    parser.add_argument("--expires", help="when it stops working: a date (2027-03-31), a "
                        "time (2027-03-31T18:00:00Z), a span from now (90d, 12h), or never")


def _keys_new(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    settings = _settings(args)
    if args.id is not None:
        settings["id"] = args.id
    secret, record = issue(settings, "options")
    if config.tenants.store == "redis":
        async def put() -> None:
            async with _redis_keys(config) as keys:
                configured = KeyBook(config.keys, config.auth.key_hashes)
                if configured.local(record.id) is not None or not await keys.create(record):
                    raise ConfigError(f"options: id: a key {record.id!r} exists already")
        asyncio.run(put())
        print(f"key:  {secret}")
        print(f"id:   {record.id} (kept in Redis: every gateway process knows it now)")
        return 0
    print(f"key:  {secret}")
    print(f"hash: {record.hash}")
    print("\nGive the key to the client; put this in the config (only the hash is kept):\n")
    print(key_block(record))
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    rows = [described(k, "config") for k in KeyBook(config.keys,
                                                     config.auth.key_hashes).configured()]
    if config.tenants.store == "redis":
        async def stored() -> list[KeyConfig]:
            async with _redis_keys(config) as keys:
                return await keys.all()
        rows += [described(k, "redis") for k in asyncio.run(stored())]
    print(f"{'id':<20} {'name':<20} {'source':<7} {'limits':<40} state")
    for row in rows:
        limits = ", ".join(f"{name} {row[name]}" for name in ("rpm", "tpm", "concurrency")
                           if row[name])
        if row["budget"]:
            limits += f"{', ' if limits else ''}budget {row['budget']}/{row['budget_period']}"
        if row["models"]:
            limits += f"{', ' if limits else ''}models {'|'.join(row['models'])}"
        state = "revoked" if row["revoked"] else "expired" if 0 < row["expires"] < time.time() \
            else "active"
        print(f"{row['id']:<20} {row['name'] or '-':<20} {row['source']:<7} "
              f"{limits or '-':<40} {state}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    return _keys_change(args, {"revoked": True})


def _keys_set(args: argparse.Namespace) -> int:
    return _keys_change(args, _settings(args))


def _keys_change(args: argparse.Namespace, changes: dict[str, Any]) -> int:
    config = load_config(args.config)
    if any(k.id == args.id for k in config.keys):
        raise ConfigError(f"{config.source}: keys: {args.id!r} is in the config file: change "
                          "it there")
    if config.tenants.store != "redis":
        raise ConfigError(f"{config.source}: tenants.store: keys are kept in the config "
                          "file; edit their [[keys]] blocks (or keep them in Redis)")

    async def change() -> KeyConfig:
        async with _redis_keys(config) as keys:
            changed = await keys.change(args.id, lambda record: amend(record, changes,
                                                                      "options"))
            if changed is None:
                raise ConfigError(f"options: id: no key {args.id!r} in Redis")
            return changed

    record = asyncio.run(change())
    print(f"{record.id}: {'revoked' if record.revoked else 'changed'} (every gateway process "
          "knows within a second)")
    return 0


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The key settings given as options."""
    settings: dict[str, Any] = {}
    for name in ("name", "rpm", "tpm", "concurrency", "budget", "budget_period", "cache"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.models is not None:
        settings["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.expires is not None:
        settings["expires"] = _moment(args.expires)
    return settings


def _moment(text: str) -> int:
    """Unix seconds of "never" (0), "90d", "12h", "30m", a date or an ISO 8601 time."""
    text = text.strip()
    if text == "never":
        return 0
    span = re.fullmatch(r"(\d+)([dhm])", text)
    if span:
        return int(time.time()) + int(span[1]) * {"d": 86400, "h": 3600, "m": 60}[span[2]]
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"options: expires: expected a date, a time, a span (90d) or never, "
                          f"got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp())


@contextlib.asynccontextmanager
async def _redis_keys(config: GatewayConfig) -> AsyncIterator[RedisKeys]:
    link = Link(config.tenants.redis_url, timeout=5.0, max_connections=2)
    try:
        keys = RedisKeys(link)
        await keys.start()
        yield keys
    except Away:
        problem = await redis_problem(config.tenants.redis_url) or \
            f"Redis at {shown(config.tenants.redis_url)} does not answer"
        raise ConfigError(f"{config.source}: tenants.redis_url: {problem}") from None
    finally:
        await link.close()


def key_block(record: KeyConfig) -> str:
    """A key as a ``[[keys]]`` block of the config (its settings that are not defaults)."""
    defaults = {f.name: f.default for f in dataclasses.fields(KeyConfig)}
    lines = ["[[keys]]"]
    for name, value in dataclasses.asdict(record).items():
        if value != defaults[name]:
            lines.append(f"{name} = {_toml(value)}")
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return orjson.dumps(value).decode()  # a TOML basic string is a JSON string
