"""``gateway``: serve | demo | models | keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import getpass
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from gateway.app import create_app
from gateway.batch_commands import add_batches_command
from gateway.config import (
    DEFAULT_CONFIG,
    ConfigError,
    GatewayConfig,
    TunnelConfig,
    is_loopback,
    load_config,
)
from gateway.http.server import GatewayRunner
from gateway.key_commands import add_keys_command
from gateway.keys import ROUTER, TELEMETRY
from gateway.report import print_catalog
from gateway.router_commands import add_router_command
from gateway.runtime import (
    STOP_MARGIN,
    new_event_loop,
    paced_collector,
    signalled,
    stopped_within,
    unless_stopped,
)

log = logging.getLogger("gateway")

DEMO_CONFIG = DEFAULT_CONFIG.parent / "demo.toml"
# Connections waiting to be accepted: a burst of a thousand clients at once must not find
# the queue full (the kernel drops their handshakes, and they try again a second or more
# later); the system's somaxconn caps it.
BACKLOG = 2048


LEVELS = ("debug", "info", "warning", "error")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # A report's own lines say what went wrong; its log says only what they do not.
    level = args.log_level or getattr(args, "quiet_log", "info")
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)  # chatty at INFO
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # what reads the output left (| head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:  # Ctrl-C on a command that does not serve: no traceback
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible LLM gateway",
                                     allow_abbrev=False)
    parser.add_argument("--log-level", choices=LEVELS,
                        help="default: info (warning for the models and check reports)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG})")
    serve.add_argument("--host", help="address to listen on (overrides the config)")
    serve.add_argument("--port", type=int, help="port to listen on (overrides the config)")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="allow a non-loopback address without API keys")
    serve.add_argument("--workers", type=int, default=1,
                       help="gateway processes serving the port (default 1); they share "
                            "state through the Redis the config names")
    serve.add_argument("--reuse-port", action="store_true",
                       help=argparse.SUPPRESS)  # (a worker: its port is shared)
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="simulated Ollama and MLX servers plus the gateway")
    demo.add_argument("--port", type=int, help="gateway port (default: the demo config's)")
    demo.set_defaults(run=_demo)

    models = commands.add_parser("models", help="list the models each backend has")
    models.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG})")
    models.set_defaults(run=_models, quiet_log="warning")

    check = commands.add_parser("check", help="open the tunnels, ask the backends, say what "
                                "to fix; non-zero exit when the primary tier is unreachable")
    check.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG})")
    check.set_defaults(run=_check, quiet_log="warning")

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

    add_keys_command(commands)
    add_batches_command(commands)
    add_router_command(commands)
    for command in commands.choices.values():  # (after the command too: serve --log-level)
        command.add_argument("--log-level", choices=LEVELS, default=argparse.SUPPRESS,
                             help="default: info (warning for the models and check reports)")
    return parser


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    config = config.with_server(**overrides)
    for host, _ in config.server.addresses():
        if not is_loopback(host) and not config.keyed:
            if not args.insecure_no_auth:
                print(f"gateway: refusing to listen on {host} without API keys: anyone who "
                      "can reach it could use your models.\n  Add keys (gateway keys new → "
                      "[[keys]]) or pass --insecure-no-auth.", file=sys.stderr)
                return 2
            log.warning("gateway: listening on %s without API keys (--insecure-no-auth): "
                        "anyone who can reach it can use your models", host)
    if args.workers < 1:
        print("gateway: --workers expects at least 1", file=sys.stderr)
        return 2
    if args.workers > 1:
        return _supervise(args, config)
    try:
        # The main address is only tried here (its site binds it once the app is up),
        # so that one in use is said at once, before any backend has been started.
        _bindable(config.server.host, config.server.port, args.reuse_port)
        more = [_listening(host, port, args.reuse_port)
                for host, port in config.server.addresses()[1:]]
    except OSError as exc:
        return _cannot_listen(exc)
    run(config, more, worker=args.reuse_port)
    return 0


def _cannot_listen(exc: OSError) -> int:
    hint = " (is another server, Ollama itself say, using that port?)" \
        if exc.errno == errno.EADDRINUSE else ""
    print(f"gateway: cannot listen on {exc.filename}: {exc.strerror}{hint}", file=sys.stderr)
    return 2


def _supervise(args: argparse.Namespace, config: GatewayConfig) -> int:
    from gateway.workers import supervise

    if config.server.port == 0:
        print("gateway: --workers needs a port of its own (port 0 would give each worker a "
              "different one)", file=sys.stderr)
        return 2
    if config.tasks.queue == "local":
        print('gateway: --workers needs [tasks] queue = "redis": the local queue is one '
              "process's (several would run a batch's lines twice)", file=sys.stderr)
        return 2
    pinned = [f"{t.name}/{f.name} ({f.local_port})" for t in config.tunnels
              for f in t.forwards if f.local_port]
    if pinned:
        print("gateway: --workers needs every tunnel forward's local_port = 0: each worker "
              "keeps a tunnel of its own, and one port cannot be held by two; pinned: "
              + ", ".join(pinned), file=sys.stderr)
        return 2
    try:  # each address as one process takes it: workers already there are not joined
        for host, port in config.server.addresses():
            _bindable(host, port, reuse_port=False)
    except OSError as exc:
        return _cannot_listen(exc)
    learns = config.routing.policy == "learned" or any(
        a.policy == "learned" for a in config.aliases.values())
    alone = [what for what, unshared in (
        ("breakers and backends found down ([routing] redis_url)", not config.routing.redis_url),
        ("keys' limits ([tenants] store)", config.tenants.store != "redis" and config.keyed),
        ("stored responses ([responses] backend)", config.responses.backend != "redis"),
        ("response cache (the cache plugin's backend)", any(
            p.name == "cache" and p.options.get("backend", "memory") != "redis"
            for p in config.plugins)),
        ("learned routing ([routing.learned] redis_url)",
         learns and not config.routing.learned.redis_url),
    ) if unshared]
    if alone:
        log.warning("gateway: each of the %d workers keeps its own %s", args.workers,
                    "; ".join(alone))
    # (each worker keeps its own line to each backend)
    log.info("gateway: each backend's max_connections, max_concurrency and parallel hold "
             "per worker: %d workers may send %d times as many requests at once",
             args.workers, args.workers)
    command = [sys.executable, "-m", "gateway", "--log-level", args.log_level or "info", "serve",
               "--reuse-port"]
    for flag, value in (("--config", args.config), ("--host", args.host),
                        ("--port", args.port)):
        if value is not None:
            command += [flag, str(value)]
    if args.insecure_no_auth:
        command.append("--insecure-no-auth")
    return supervise(command, args.workers, config.server.shutdown_grace,
                     hangups=reopens(config))


def reopens(config: GatewayConfig) -> bool:
    """Whether SIGHUP reopens a request log file (there is one), rather than ending it."""
    return config.telemetry.request_log not in ("", "-")


def _listening(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A socket listening on one of ``[server] also_listen``'s addresses."""
    sock = _bound(host, port, reuse_port)
    sock.listen(BACKLOG)
    return sock


def _bindable(host: str, port: int, reuse_port: bool) -> None:
    """Raises if the address cannot be had. Bound, never listening: a socket that listened
    would join the workers' SO_REUSEPORT group, and connections the kernel gave it would be
    reset as it closed.
    """
    try:
        _bound(host, port, reuse_port).close()
    except OSError as exc:
        if isinstance(exc.__cause__, socket.gaierror):
            raise ConfigError(f"cannot listen on {host}: no such address here "
                              f"({exc.strerror})") from None
        raise


def _bound(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, exc.strerror, f"{host}:{port}") from exc
    return sock


def run(config: GatewayConfig, more: list[socket.socket] | None = None,
        worker: bool = False) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get ``shutdown_grace`` to finish.
    ``more``: listening sockets serving the gateway too (``[server] also_listen``);
    ``worker``: one of several processes serving the same port (``--workers``).
    """
    loop = new_event_loop()
    try:
        loop.run_until_complete(_serving(config, more or [], worker))
    finally:
        loop.close()


async def _serving(config: GatewayConfig, more: list[socket.socket], worker: bool) -> None:
    server = config.server
    stop = signalled()
    app = create_app(config)
    if reopens(config):  # logrotate's postrotate (else SIGHUP ends it, as a hang-up does)
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, app[TELEMETRY].requests_log.reopen)
    if worker:
        from gateway.workers import as_worker

        as_worker(app)
    runner = GatewayRunner(app, access_log=None,
                           handler_cancellation=True,  # a client that hangs up cancels
                           shutdown_timeout=server.shutdown_grace)  # its upstream request
    try:
        if not await unless_stopped(runner.setup(), stop):  # (the services it started end)
            log.info("gateway stopped before it was up")
            return
        await web.TCPSite(runner, server.host, server.port, backlog=BACKLOG,
                          reuse_port=worker or None).start()
        for sock in more:
            await web.SockSite(runner, sock, backlog=BACKLOG).start()
        log.info("gateway listening on %s (config %s)", ", ".join(  # (port 0: the one had)
            f"http://[{where[0]}]:{where[1]}" if ":" in where[0] else
            f"http://{where[0]}:{where[1]}" for where in runner.addresses), config.source)
        async with paced_collector(app[ROUTER].balancer.at_work):
            await stop.wait()
        log.info("gateway stopping: no new connections; requests in flight have %g s to "
                 "finish", server.shutdown_grace)
    finally:
        with stopped_within(server.shutdown_grace + STOP_MARGIN):
            await runner.cleanup()  # stops accepting, then lets requests in flight finish
    log.info("gateway stopped")


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    config = load_config(DEMO_CONFIG)
    if args.port is not None:
        config = config.with_server(port=args.port)
    try:
        run_demo(config)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        print(f"gateway demo: {exc.strerror} (is another gateway demo running? Its simulated "
              "servers use ports 21434 and 21435; --port moves the gateway's own)",
              file=sys.stderr)
        return 2
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
    from gateway.tunnel.agent import DEFAULT_FORWARDS, ReverseAgent, parse_forwards, unit

    try:
        forwards = parse_forwards(args.forward or DEFAULT_FORWARDS)
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
    for key, message in ssh.problems():  # (as the config's [[tunnels]] are checked)
        flag = "server" if key == "port" else key.replace("_", "-")
        print(f"gateway tunnel-agent: --{flag}: {message}", file=sys.stderr)
        return 2
    if args.print_systemd or args.print_launchd:
        print(unit(ssh, forwards, args.log_level or "info", "systemd" if args.print_systemd
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
