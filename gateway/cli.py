"""``gateway``: serve | demo | models | keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import getpass
import logging
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from gateway.app import create_app
from gateway.config import (
    DEFAULT_CONFIG,
    ConfigError,
    GatewayConfig,
    KeyConfig,
    TunnelConfig,
    is_loopback,
    load_config,
)
from gateway.http.server import GatewayRunner
from gateway.report import print_catalog
from gateway.runtime import new_event_loop, until_signalled
from gateway.tenants import Away, KeyBook, Link, RedisKeys, amend, described, issue

log = logging.getLogger("gateway")

DEMO_CONFIG = DEFAULT_CONFIG.parent / "demo.toml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)  # chatty at INFO
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return 2
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible LLM gateway",
                                     allow_abbrev=False)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG})")
    serve.add_argument("--host", help="address to listen on (overrides the config)")
    serve.add_argument("--port", type=int, help="port to listen on (overrides the config)")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="allow a non-loopback address without API keys")
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="simulated Ollama and MLX servers plus the gateway")
    demo.add_argument("--port", type=int, help="gateway port (default: the demo config's)")
    demo.set_defaults(run=_demo)

    models = commands.add_parser("models", help="list the models each backend has")
    models.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG})")
    models.set_defaults(run=_models)

    check = commands.add_parser("check", help="open the tunnels, ask the backends, say what "
                                "to fix; non-zero exit when the primary tier is unreachable")
    check.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG})")
    check.set_defaults(run=_check)

    agent = commands.add_parser(
        "tunnel-agent", help="on the workstation: keep reverse tunnels to the gateway server",
        allow_abbrev=False)
    agent.add_argument("--server", required=True, metavar="[USER@]HOST[:PORT]",
                       help="the gateway server's sshd")
    agent.add_argument("--key", default="", help="private key file")
    agent.add_argument("--key-passphrase-env", default="", metavar="VAR",
                       help="environment variable holding the key's passphrase")
    agent.add_argument("--password-env", default="", metavar="VAR",
                       help="environment variable holding the password")
    agent.add_argument("--no-agent", action="store_true", help="do not use ssh-agent")
    agent.add_argument("--known-hosts", default="~/.ssh/known_hosts")
    agent.add_argument("--accept-new", action="store_true",
                       help="trust a server never seen before (and record its key)")
    agent.add_argument("--forward", action="append", metavar="SERVER_PORT[:HOST]:LOCAL_PORT",
                       help="repeatable; default: 11434 and 11435 (Ollama, MLX)")
    agent.add_argument("--keepalive", type=float, default=5.0)
    agent.add_argument("--no-interactive", action="store_true",
                       help="no pty session beside the forwards (sshd then delays small "
                       "answers by ~40 ms)")
    agent.add_argument("--print-systemd", action="store_true",
                       help="print a systemd unit running this command at boot, and exit")
    agent.add_argument("--print-launchd", action="store_true",
                       help="print a launchd plist running this command at boot, and exit")
    agent.set_defaults(run=_tunnel_agent)

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
    return parser


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


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    config = config.with_server(**overrides)
    for host, _ in config.server.addresses():
        if not is_loopback(host) and not config.keyed and not args.insecure_no_auth:
            print(f"gateway: refusing to listen on {host} without API keys: anyone who can "
                  "reach it could use your models.\n  Add keys (gateway keys new → [[keys]]) "
                  "or pass --insecure-no-auth.", file=sys.stderr)
            return 2
    try:
        more = [_listening(host, port) for host, port in config.server.addresses()[1:]]
    except OSError as exc:
        print(f"gateway: cannot listen on {exc.filename}: {exc.strerror} (is another server, "
              "Ollama itself say, using that port?)", file=sys.stderr)
        return 2
    run(config, more)
    return 0


def _listening(host: str, port: int) -> socket.socket:
    """A socket listening on one of ``[server] also_listen``'s addresses."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, exc.strerror, f"{host}:{port}") from None
    sock.listen(128)
    return sock


def run(config: GatewayConfig, more: list[socket.socket] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get ``shutdown_grace`` to finish.
    ``more``: listening sockets serving the gateway too (``[server] also_listen``).
    """
    loop = new_event_loop()
    try:
        loop.run_until_complete(_serving(config, more or []))
    finally:
        loop.close()


async def _serving(config: GatewayConfig, more: list[socket.socket]) -> None:
    server = config.server
    runner = GatewayRunner(create_app(config), access_log=None,
                           handler_cancellation=True,  # a client that hangs up cancels
                           shutdown_timeout=server.shutdown_grace)  # its upstream request
    await runner.setup()
    try:
        await web.TCPSite(runner, server.host, server.port).start()
        for sock in more:
            await web.SockSite(runner, sock).start()
        log.info("gateway listening on %s (config %s)", ", ".join(
            f"http://{host}:{port}" for host, port in server.addresses()), config.source)
        await until_signalled()
    finally:
        await runner.cleanup()  # stops accepting, then lets requests in flight finish


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    config = load_config(DEMO_CONFIG)
    if args.port is not None:
        config = config.with_server(port=args.port)
    run_demo(config)
    return 0


def _models(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    asyncio.run(print_catalog(config))
    return 0


def _check(args: argparse.Namespace) -> int:
    from gateway.doctor import check

    report, ok = asyncio.run(check(load_config(args.config)))
    print(report)
    return 0 if ok else 1


def _tunnel_agent(args: argparse.Namespace) -> int:
    from gateway.tunnel.agent import DEFAULT_FORWARDS, RemoteForward, ReverseAgent, unit

    try:
        forwards = [RemoteForward.parse(f) for f in args.forward or DEFAULT_FORWARDS]
        user, host, port = _server(args.server)
    except ValueError as exc:
        print(f"gateway tunnel-agent: {exc}", file=sys.stderr)
        return 2
    ssh = TunnelConfig(
        name="agent", host=host, port=port, user=user, key_file=_absolute(args.key),
        key_passphrase_env=args.key_passphrase_env, password_env=args.password_env,
        agent=not args.no_agent, known_hosts=_absolute(args.known_hosts),
        host_key="accept-new" if args.accept_new else "strict", keepalive=args.keepalive,
        interactive=not args.no_interactive)
    if args.print_systemd or args.print_launchd:
        print(unit(ssh, forwards, args.log_level, "systemd" if args.print_systemd
                   else "launchd"))
        return 0
    loop = new_event_loop()
    with contextlib.suppress(KeyboardInterrupt):
        loop.run_until_complete(ReverseAgent(ssh, forwards).run())
    return 0


def _server(text: str) -> tuple[str, str, int]:
    """``[user@]host[:port]``, the host possibly an IPv6 address in brackets."""
    user, _, rest = text.rpartition("@")
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail.removeprefix(":")
    else:
        host, _, port = rest.partition(":")
    if not host or (port and not port.isdigit()) or not 0 < int(port or 22) < 65536:
        raise ValueError(f"--server {text!r}: expected [USER@]HOST[:PORT]")
    return user or getpass.getuser(), host, int(port or 22)


def _absolute(path: str) -> str:
    """A path that still means the same file when a service runs the command elsewhere."""
    return str(Path(path).expanduser().absolute()) if path else ""


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
            record = await keys.get(args.id)
            if record is None:
                raise ConfigError(f"options: id: no key {args.id!r} in Redis")
            changed = amend(record, changes, "options")
            await keys.put(changed)
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
        yield RedisKeys(link)
    except Away:
        raise ConfigError(f"{config.source}: tenants.redis_url: Redis does not answer at "
                          f"{config.tenants.redis_url}") from None
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
