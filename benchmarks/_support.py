"""What every scenario shares: a throwaway redis-server, Redis counters, figures."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

ADMIN_NAME = "rstream-bench-admin"


@dataclass
class Figure:
    """One measured figure, with the target the issue sets for it (if any)."""

    scenario: str
    name: str
    value: float | int | str | None
    unit: str = ""
    op: Literal["<=", ">=", "=="] | None = None
    target: float | int | str | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.op is None or self.value is None:
            return "" if self.op is None else "FAIL"
        if self.op == "==":
            return "PASS" if self.value == self.target else "FAIL"
        assert isinstance(self.value, int | float) and isinstance(self.target, int | float)
        ok = self.value <= self.target if self.op == "<=" else self.value >= self.target
        return "PASS" if ok else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "target": None if self.op is None else f"{self.op} {self.target}",
            "verdict": self.verdict or None,
            "note": self.note or None,
        }


@dataclass
class Result:
    """What a scenario returns: its figures and free-form details for the JSON file."""

    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cluster_node_port() -> int:
    """A free port whose cluster bus port (the port + 10,000) is free too."""
    for _attempt in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("found no free port pair for a cluster node and its bus")


class RedisServer:
    """A redis-server child process on a free loopback port, without persistence.

    With ``cluster=True`` it is a Redis Cluster node with no slots yet (its bus on another
    free port, its ``nodes.conf`` in its own temporary folder); :class:`LocalCluster` joins
    such nodes into a cluster.
    """

    def __init__(self, cluster: bool = False) -> None:
        self.port = 0
        self.cluster = cluster
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="rstream-bench-redis-")

    @property
    def log(self) -> str:
        return os.path.join(self._dir, "redis.log")

    @property
    def output(self) -> str:
        """A cluster node's stdout and stderr (where a refused option is reported)."""
        return os.path.join(self._dir, "output.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        for _attempt in range(5):
            port = _cluster_node_port() if self.cluster else free_port()
            args = [
                executable,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                "--daemonize",
                "no",
                "--maxclients",
                "10000",
                "--logfile",
                self.log,
            ]
            if not self.cluster:
                process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
            else:
                # The bus listens on port + 10,000: no --cluster-port, which Redis 6 lacks.
                args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                with open(self.output, "ab") as output:
                    process = subprocess.Popen(
                        args, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
                    )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and process.poll() is None:
                if _pings(port):
                    self.port, self.process = port, process
                    return self
                time.sleep(0.05)  # an external process coming up: poll with a deadline
            process.kill()
            process.wait()
        raise RuntimeError(f"redis-server did not start (log in {self._dir})")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def admin(self) -> Admin:
        return Admin(self)


class ClusterUnavailable(RuntimeError):
    """This machine cannot run a local Redis Cluster; the message says why."""


class LocalCluster:
    """A Redis Cluster of ``masters`` redis-server nodes on loopback ports, no replicas.

    :meth:`start` joins them with ``redis-cli --cluster create`` and waits until every node
    reports ``cluster_state:ok``; it raises :class:`ClusterUnavailable` with the reason when
    ``redis-cli`` or ``redis-server`` lack cluster support or the cluster does not form.
    """

    def __init__(self, masters: int = 3, timeout: float = 30.0) -> None:
        self.nodes = [RedisServer(cluster=True) for _ in range(masters)]
        self.timeout = timeout

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> LocalCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        redis_cli = shutil.which("redis-cli")
        if redis_cli is None:
            raise ClusterUnavailable("redis-cli is not installed (apt-get install redis-tools)")
        usage = subprocess.run(
            [redis_cli, "--cluster", "help"], capture_output=True, text=True, timeout=10
        )
        if "create" not in usage.stdout + usage.stderr:  # redis-cli before Redis 5
            raise ClusterUnavailable(f"{redis_cli} has no --cluster (Redis 5 or later needed)")
        for node in self.nodes:
            try:
                node.start()
            except RuntimeError as exc:
                why = _last_line(node.output) or _last_line(node.log) or str(exc)
                raise ClusterUnavailable(
                    f"redis-server does not start in cluster mode: {why}"
                ) from exc
        created = subprocess.run(
            [
                redis_cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            output = (created.stdout + created.stderr).strip()
            raise ClusterUnavailable(f"redis-cli --cluster create failed: {output[-300:]}")
        waiting = list(self.nodes)
        deadline = time.monotonic() + self.timeout
        while waiting:
            waiting = [node for node in waiting if not _cluster_ok(node.port, len(self.nodes))]
            if waiting and time.monotonic() > deadline:
                ports = ", ".join(str(node.port) for node in waiting)
                raise ClusterUnavailable(
                    f"cluster_state is not ok on port(s) {ports} after {self.timeout:.0f} s"
                )
            if waiting:
                time.sleep(0.05)  # the nodes agreeing over their bus: poll with a deadline

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _cluster_ok(port: int, nodes: int) -> bool:
    """The node on ``port`` serves every slot and knows all ``nodes`` cluster nodes."""
    client = redis.Redis(host="127.0.0.1", port=port, client_name=ADMIN_NAME, decode_responses=True)
    try:
        info = str(client.execute_command("CLUSTER", "INFO"))  # type: ignore[no-untyped-call]
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()
    fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
    return fields.get("cluster_state") == "ok" and fields.get("cluster_known_nodes") == str(nodes)


def _last_line(path: str) -> str:
    """The last non-blank line of a file, or "" when it is missing or empty."""
    try:
        with open(path, errors="replace") as log:
            lines = [line.strip() for line in log if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _pings(port: int) -> bool:
    # One attempt: the caller polls, and redis-py's default retries back off for seconds.
    client = redis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


class Admin:
    """The benchmark's own (synchronous) view of Redis; its commands are not counted."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.client = redis.Redis(host="127.0.0.1", port=server.port, client_name=ADMIN_NAME)
        self._own = 0

    def close(self) -> None:
        self.client.close()

    def _call(self, *args: Any) -> Any:
        self._own += 1
        return self.client.execute_command(*args)  # type: ignore[no-untyped-call]

    def flush(self) -> None:
        self._call("FLUSHALL")

    def reset_stats(self) -> None:
        self.client.config_resetstat()
        self._own = 1  # RESETSTAT itself is counted after the reset

    def command_calls(self) -> dict[str, int]:
        """Calls per command since :meth:`reset_stats`, Lua-internal ones included."""
        self._own += 1
        info = self.client.info("commandstats")
        calls = {
            name.removeprefix("cmdstat_"): int(stats["calls"])
            for name, stats in info.items()
            if name.startswith("cmdstat_")
        }
        return calls

    def library_commands(self) -> tuple[int, dict[str, int]]:
        """Total commands sent by everything but this admin client, and the breakdown."""
        calls = self.command_calls()
        return sum(calls.values()) - self._own, calls

    def clients(self) -> list[dict[str, Any]]:
        self._own += 1
        return list(self.client.client_list())

    def connections_of(self, pid: int) -> int:
        """Redis connections held by process ``pid`` (matched by local port), admin excluded."""
        return self.connections_from(_local_ports(pid).get(self.server.port, set()))

    def connections_from(self, ports: set[int]) -> int:
        """Clients of this server connected from the loopback ``ports``, admin excluded."""
        if not ports:
            return 0
        count = 0
        for client in self.clients():
            if client.get("name") == ADMIN_NAME:
                continue
            addr = str(client.get("addr", ""))
            if addr.startswith("127.0.0.1:") and int(addr.rsplit(":", 1)[1]) in ports:
                count += 1
        return count

    def memory_usage(self, pattern: str) -> tuple[int, int]:
        """Sum of exact ``MEMORY USAGE`` over keys matching ``pattern``, and the key count."""
        total = keys = 0
        for key in self.client.scan_iter(match=pattern, count=1000):
            self._own += 1
            total += int(self._call("MEMORY", "USAGE", key, "SAMPLES", "0") or 0)
            keys += 1
        return total, keys


def _local_ports(pid: int) -> dict[int, set[int]]:
    """Process ``pid``'s TCP sockets: its local ports, by the remote port they connect to."""
    ports: dict[int, set[int]] = {}
    try:
        for c in psutil.Process(pid).net_connections(kind="tcp"):
            if c.raddr:
                ports.setdefault(c.raddr.port, set()).add(c.laddr.port)
    except psutil.Error:
        pass
    return ports


class ConnectionSampler:
    """Samples a process's Redis connections from a thread; keeps the peak.

    Given several servers (the nodes of a cluster), ``peak`` is the peak of the sum over
    them and ``peaks`` each one's own peak, by port.
    """

    def __init__(
        self, servers: RedisServer | Sequence[RedisServer], pid: int, interval: float = 0.1
    ) -> None:
        servers = [servers] if isinstance(servers, RedisServer) else list(servers)
        self._admins = [Admin(server) for server in servers]
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0
        self.peaks = {server.port: 0 for server in servers}
        self.samples = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def sample(self) -> None:
        ports = _local_ports(self._pid)
        total = 0
        for admin in self._admins:
            port = admin.server.port
            count = admin.connections_from(ports.get(port, set()))
            self.peaks[port] = max(self.peaks[port], count)
            total += count
        self.peak = max(self.peak, total)
        self.samples += 1

    def connect(self) -> None:
        """Open the sampler's connections now, so that their handshake is not counted by a
        ``CONFIG RESETSTAT`` sent afterwards."""
        for admin in self._admins:
            admin.client.ping()

    def own_commands(self, server: RedisServer) -> int:
        """Commands this sampler sent to ``server`` (``CLIENT LIST``), to leave out of counts."""
        return sum(admin._own for admin in self._admins if admin.server is server)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        for admin in self._admins:
            admin.close()


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest-rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise the soft open-files limit towards ``wanted`` (1,000+ sockets); return it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def callgrind_instructions(arguments: list[str]) -> int:
    """Instructions ``python -m <arguments>`` runs under ``valgrind --tool=callgrind``."""
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, "-m", *arguments,
    ]  # fmt: skip
    # (A fixed hash seed: set and dict orders, and so the counts, repeat.)
    environment = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    found = re.search(r"Collected : ([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))
