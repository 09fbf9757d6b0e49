"""What every scenario shares: a throwaway redis-server, Redis counters, figures."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psutil
import redis

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


class RedisServer:
    """A redis-server child process on a free loopback port, without persistence."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="rstream-bench-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        for _attempt in range(5):
            port = free_port()
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
                os.path.join(self._dir, "redis.log"),
            ]
            process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
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


def _pings(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
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
        try:
            ports = {
                c.laddr.port
                for c in psutil.Process(pid).net_connections(kind="tcp")
                if c.raddr and c.raddr.port == self.server.port
            }
        except psutil.Error:
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


class ConnectionSampler:
    """Samples a process's Redis connections from a thread; keeps the peak."""

    def __init__(self, server: RedisServer, pid: int, interval: float = 0.1) -> None:
        self._admin = Admin(server)
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0
        self.samples = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def sample(self) -> None:
        self.peak = max(self.peak, self._admin.connections_of(self._pid))
        self.samples += 1

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self._admin.close()


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
