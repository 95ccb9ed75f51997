"""Opening an SSH connection the way both tunnel directions need it (asyncssh, no ``ssh``
binary): key, agent or password auth, strict or accept-new host-key checking, keepalives;
and failures explained in words that say what to do. Secrets never appear in messages.

Only what the config says is used: not ``~/.ssh/config`` (its ProxyCommand, IdentityFile or
UserKnownHostsFile would change what the gateway does behind the operator's back), not the
default ``~/.ssh/id_*`` keys, not the default known_hosts file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import asyncssh

from gateway.backoff import backoff
from gateway.config import TunnelConfig

log = logging.getLogger(__name__)

KEEPALIVE_MISSES = 3  # unanswered keepalives before the link counts as dead


class TunnelError(Exception):
    """Why an SSH connection could not be made, and what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


async def connect(config: TunnelConfig) -> asyncssh.SSHClientConnection:
    """An authenticated SSH connection, or a ``TunnelError`` saying why not."""
    known_hosts = known_hosts_path(config)
    policy = _HostKeyPolicy(config, known_hosts)
    try:
        options = _options(config, known_hosts, policy)
        async with _agent_keys(config) as agent_keys:
            if agent_keys:
                options["client_keys"] = [*(options.get("client_keys") or ()), *agent_keys]
            if not options.get("client_keys"):
                options["client_keys"] = None  # no key auth (never the default key files)
            return await asyncssh.connect(config.host, **options)
    except Exception as exc:
        raise explain(exc, config, known_hosts, policy.offered, policy.addr) from None


def known_hosts_path(config: TunnelConfig) -> Path:
    """The known_hosts file the config names, with ``~`` expanded."""
    return Path(config.known_hosts).expanduser()


def _options(config: TunnelConfig, known_hosts: Path,
             policy: _HostKeyPolicy) -> dict[str, Any]:
    trusted: Any = str(known_hosts) if known_hosts.is_file() else \
        asyncssh.import_known_hosts("")  # a missing file trusts nothing (never the defaults)
    options: dict[str, Any] = {
        "username": config.user,
        "port": config.port,
        "config": None,
        "known_hosts": trusted,
        "agent_path": None,  # agent keys are fetched explicitly (see _agent_keys)
        "keepalive_interval": config.keepalive,
        "keepalive_count_max": KEEPALIVE_MISSES,
        "connect_timeout": config.connect_timeout,
        "client_factory": lambda: policy,
    }
    if config.key_file:
        key_file = Path(config.key_file).expanduser()
        if not key_file.is_file():
            raise TunnelError(f"the key file {key_file} does not exist",
                              "check key_file (ssh-keygen -t ed25519 makes one)")
        options["client_keys"] = [str(key_file)]
        if config.key_passphrase_env:
            options["passphrase"] = _secret(config.key_passphrase_env, "key_passphrase_env")
    if config.password_env:
        options["password"] = _secret(config.password_env, "password_env")
    return options


@contextlib.asynccontextmanager
async def _agent_keys(config: TunnelConfig) -> AsyncIterator[list[asyncssh.SSHKeyPair]]:
    """The keys of a running ssh-agent, when the config allows it (kept usable for as long
    as the connection is being authenticated).
    """
    if not config.agent or not os.environ.get("SSH_AUTH_SOCK"):
        yield []
        return
    try:
        agent = await asyncssh.connect_agent()
    except (OSError, asyncssh.Error):
        yield []
        return
    try:
        yield list(await agent.get_keys())
    finally:
        agent.close()


async def make_interactive(connection: asyncssh.SSHClientConnection,
                           config: TunnelConfig) -> None:
    """Open the pty session that makes sshd send without delay (see ``interactive``)."""
    if not config.interactive:
        return
    try:
        async with asyncio.timeout(config.connect_timeout):
            await connection.create_process("cat", term_type="dumb")
    except (asyncssh.Error, OSError, TimeoutError) as exc:
        log.info("tunnel %s: no pty session (%s); small answers may wait ~40 ms in sshd",
                 config.name, getattr(exc, "reason", None) or type(exc).__name__)


def explain(exc: Exception, config: TunnelConfig, known_hosts: Path,
            offered: asyncssh.SSHKey | None = None, addr: str = "") -> TunnelError:
    """An SSH failure as a sentence and a hint."""
    where = f"{config.user}@{config.host}:{config.port}"
    if isinstance(exc, TunnelError):
        return exc
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return _host_key_error(exc, config, known_hosts, offered, addr)
    if isinstance(exc, asyncssh.PermissionDenied):
        ways = [w for w, on in (("key " + config.key_file, bool(config.key_file)),
                                ("ssh-agent", config.agent),
                                (f"password from ${config.password_env}",
                                 bool(config.password_env))) if on]
        return TunnelError(f"{where} refused to authenticate {config.user!r}",
                           f"tried: {', '.join(ways) or 'nothing'}; check the user, that the "
                           "public key is in authorized_keys, or the password")
    if isinstance(exc, asyncssh.DisconnectError) and "too many" in exc.reason.lower():
        return TunnelError(f"{where} hung up after too many authentication attempts",
                           "the agent offers many keys: set key_file, or agent = false")
    if isinstance(exc, ConnectionRefusedError):
        return TunnelError(f"connection to {config.host}:{config.port} refused",
                           "is sshd running there, on that port?")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return TunnelError(f"no answer from {config.host}:{config.port} within "
                           f"{config.connect_timeout:g}s", "is the host up and reachable?")
    if isinstance(exc, PermissionError | FileNotFoundError | IsADirectoryError):
        return TunnelError(f"cannot read {exc.filename or 'a file'}: {exc.strerror}",
                           "check key_file and known_hosts")
    if isinstance(exc, OSError):
        return TunnelError(f"cannot reach {config.host}:{config.port}: {exc.strerror or exc}",
                           "check the host name and the network")
    if isinstance(exc, asyncssh.KeyImportError | asyncssh.KeyEncryptionError):
        return TunnelError(f"cannot use the key {config.key_file}: {exc}",
                           "check key_file and key_passphrase_env")
    if isinstance(exc, asyncssh.Error):
        return TunnelError(f"SSH to {where} failed: {exc.reason}")
    return TunnelError(f"SSH to {where} failed: {type(exc).__name__}")


def _host_key_error(exc: asyncssh.DisconnectError, config: TunnelConfig, known_hosts: Path,
                    offered: asyncssh.SSHKey | None, addr: str) -> TunnelError:
    where = f"{config.host}:{config.port}"
    fingerprint = f" (it offered {offered.get_fingerprint()})" if offered else ""
    if "revoked" in exc.reason.lower():
        return TunnelError(f"the host key of {where} is revoked in {known_hosts}",
                           "do not connect: that key was withdrawn on purpose")
    if _known_keys(known_hosts, config.host, addr, config.port):
        return TunnelError(
            f"the host key of {where} does not match the one in {known_hosts}{fingerprint}",
            "if the server was really reinstalled, remove its old line from known_hosts; "
            "otherwise someone may be in the middle: do not connect")
    return TunnelError(
        f"the host key of {where} is not known ({known_hosts}){fingerprint}",
        f"check the fingerprint on the server (ssh-keygen -lf on its host key), then add it: "
        f"ssh-keyscan -p {config.port} {config.host} >> {known_hosts}; "
        'or set host_key = "accept-new" to trust it on first use')


async def keep_connected(config: TunnelConfig, session: Callable[[], Awaitable[float]],
                         on_failure: Callable[[Exception], None], label: str) -> NoReturn:
    """Run ``session`` (connect, then serve until the link drops; how long the link was up)
    again and again for ever, with jittered backoff in between: the reconnect loop of both
    tunnel directions.

    A failure of any kind is told to ``on_failure`` and the loop goes on (it must outlive
    any surprise); the log says one as it happens, not again at each redial while it lasts
    (a workstation asleep for the night). A link that keeps dropping right after it is made
    is not redialled in a tight loop: the backoff starts over only after a link that was up
    for ``backoff_max``.
    """
    attempt = 0
    said = ""  # the failure last logged, while it lasts
    while True:
        up = 0.0
        try:
            up = await session()
            said = ""
        except TunnelError as exc:
            log.log(logging.DEBUG if str(exc) == said else logging.WARNING, "%s: %s", label,
                    exc)
            said = str(exc)
            on_failure(exc)
        except Exception as exc:
            log.exception("%s: unexpected failure", label)
            said = ""
            on_failure(exc)
        if up >= config.backoff_max:
            attempt = 0
        await asyncio.sleep(backoff(attempt, config.backoff_initial, config.backoff_max))
        attempt += 1


def _secret(variable: str, key: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise TunnelError(f"environment variable {variable} (named by {key}) is not set",
                          f"export {variable}=... before starting the gateway")
    return value


def _known_keys(known_hosts: Path, host: str, addr: str, port: int) -> bool:
    """Whether known_hosts has any key for this host, by its name or by its address (as
    asyncssh matches it), a CA's or a revoked one included: an unknown key is then a
    change, never a first meeting.
    """
    if not known_hosts.is_file():
        return False
    try:
        matched = asyncssh.read_known_hosts(str(known_hosts)).match(host, addr, port)
    except (OSError, ValueError):
        return False
    return any(matched[:3])  # (trusted host keys, CA keys, revoked keys)


class _HostKeyPolicy(asyncssh.SSHClient):
    """accept-new: a host seen for the first time is trusted and written to known_hosts;
    a host known under another key never is (asyncssh asks here only for keys it does not
    already trust). Remembers the key offered, for the error message.
    """

    def __init__(self, config: TunnelConfig, known_hosts: Path) -> None:
        self._config = config
        self._known_hosts = known_hosts
        self.offered: asyncssh.SSHKey | None = None
        self.addr = ""  # the address it was reached at

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        self.offered, self.addr = key, addr
        if self._config.host_key != "accept-new" or _known_keys(self._known_hosts, host,
                                                                  addr, port):
            return False
        name = host if port == 22 else f"[{host}]:{port}"
        _append_line(self._known_hosts, f"{name} {key.export_public_key().decode().strip()}")
        log.warning("tunnel %s: trusted the new host key of %s (%s) and recorded it in %s",
                    self._config.name, name, key.get_fingerprint(), self._known_hosts)
        return True


def _append_line(path: Path, line: str) -> None:
    """Append a line to a file others may append to too, without gluing it to theirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0, os.SEEK_END)
        if file.tell():
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":
                file.write(b"\n")
        file.write(line.encode() + b"\n")
