"""A real Redis server of the tests' own, on a free loopback port (never the machine's shared
one): started, killed and brought back by PID.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import free_port


def redis_binary() -> str:
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(path).exists():
        raise RuntimeError("redis-server is not installed: ./run-tests installs it "
                           "(apt-get install redis-server)")
    return path


class RedisServer:
    """``redis-server`` owned by the test that started it: with no persistence, or with
    ``appendonly`` its append-only file on, as a Redis that keeps batches should run
    (``appendfsync everysec``, Redis's default: a crash of the Redis process loses no write
    it answered; a crash of the machine, up to the last second).
    """

    def __init__(self, port: int | None = None, appendonly: bool = False) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self.folder = tempfile.mkdtemp(prefix="gw-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self.cluster = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, cluster: bool = False) -> RedisServer:
        """Started (``cluster``: as a node of a Redis Cluster, not yet joined to one)."""
        self.cluster = cluster
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
             "--dir", self.folder, "--protected-mode", "yes",
             "--enable-debug-command", "local",  # DEBUG SLEEP: a Redis that stalls
             *(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
               if cluster else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """Gone at once, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        """Killed (kill -9) and started again on the same port and folder (a cluster's node
        rejoins its cluster).
        """
        self.kill()
        self.start(self.cluster)

    def command(self, *args: str) -> bytes:
        """One command in the inline protocol; the first line of the reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall((" ".join(args) + "\r\n").encode())
            return sock.makefile("rb").readline().rstrip(b"\r\n")

    def bulk(self, *args: str) -> bytes:
        """A command whose reply is one bulk string (``INFO``, ``CLUSTER INFO``): that."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall((" ".join(args) + "\r\n").encode())
            reader = sock.makefile("rb")
            size = int(reader.readline()[1:])
            return reader.read(size + 2)

    def ping(self) -> bool:
        try:
            return self.command("PING") == b"+PONG"
        except OSError:
            return False

    def keys(self, pattern: str = "*") -> int:
        """How many keys match (DBSIZE-like, for one pattern)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(f"KEYS {pattern}\r\n".encode())
            reader = sock.makefile("rb")
            header = reader.readline()
            return int(header[1:]) if header.startswith(b"*") else 0

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


class RedisCluster:
    """A real Redis Cluster of three masters (``redis-server --cluster-enabled yes``, joined
    by ``redis-cli --cluster create``), each on a free loopback port, owned by the test.
    """

    def __init__(self) -> None:
        taken: set[int] = set()
        self.nodes = [RedisServer(_cluster_port(taken)) for _ in range(3)]

    @property
    def url(self) -> str:
        return self.nodes[0].url  # (any node: a client finds the others)

    def start(self) -> RedisCluster:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        for node in self.nodes:
            node.start(cluster=True)
        subprocess.run([shutil.which("redis-cli") or "/usr/bin/redis-cli", "--cluster",
                        "create", *(f"127.0.0.1:{node.port}" for node in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        self.wait_ok()

    def wait_ok(self, limit: float = 20) -> None:
        """Until every node says the cluster is whole (after a node came back, the others
        may hold it down for twice the node timeout, 15 s by default).
        """
        deadline = time.monotonic() + limit
        while not all(b"cluster_state:ok" in node.bulk("CLUSTER", "INFO") for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis cluster did not come up")
            time.sleep(0.1)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            node.__exit__()


def _cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (10000 above it) is free too, neither of them
    ``taken`` by another node (whose ports are added there).
    """
    while True:
        port = free_port()
        if port + 10000 > 65535 or {port, port + 10000} & taken:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        taken.update((port, port + 10000))
        return port
