"""Scenarios 3, 6 and the SSE half of 4: the router on one uvicorn worker, clients apart."""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import psutil

from . import _shape
from ._clients import read_whole
from ._support import ConnectionSampler, Figure, RedisServer, Result, free_port

ROOT = Path(__file__).resolve().parent.parent
#: Streams of the below-saturation fan-out rows (6,000 events/s at 20 tokens/s each).
LIGHT_STREAMS = 300
LATE_MS = 1000.0  # a client whose worst token came later than this has fallen behind


class HTTPServer:
    """``python -m benchmarks._server`` in a child process."""

    def __init__(self, redis: RedisServer, env: dict[str, str] | None = None) -> None:
        self.redis = redis
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._server", redis.url, str(self.port)],
            cwd=ROOT,
            env=None if env is None else {**os.environ, **env},
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.call("GET", "/bench/status")
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("the benchmark HTTP server did not start") from None
                time.sleep(0.1)  # an external process coming up: poll with a deadline

    @property
    def pid(self) -> int:
        return self.process.pid

    def call(self, method: str, path: str, body: Any = None) -> Any:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            payload = None if body is None else json.dumps(body)
            connection.request(method, path, body=payload)
            response = connection.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"{method} {path}: {response.status} {data!r}")
            return json.loads(data)
        finally:
            connection.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def fanout_row(
    server: HTTPServer,
    streams: int,
    rate: float,
    seconds: float,
    producers: HTTPServer | None = None,
    *,
    bare: bool | str = False,
) -> dict[str, Any]:
    """``streams`` paced streams, each read by one SSE client in a separate process.

    The producers run in ``server`` itself, or in the ``producers`` process (as with
    generation workers), in which case ``server`` only fans the streams out. ``bare``
    serves the same paced tokens from in-process queues through a plain Starlette SSE
    endpoint instead of the library (the baseline); ``bare="stored"`` stores each token
    with an ``XADD`` first (the floor, ``benchmarks/floor.py``).
    """
    producers = producers or server
    created = producers.call(
        "POST",
        "/bench/create",
        {"streams": streams, "rate": rate, "seconds": seconds, "bare": bare},
    )
    expected = created["tokens_per_stream"]
    clients = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks._clients",
            str(server.port),
            str(streams),
            str(expected),
            str(LATE_MS),
            "bare" if bare else "streams",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert clients.stdout is not None
    try:
        if clients.stdout.readline().strip() != "ready":
            raise RuntimeError("the SSE clients did not connect")
        process = psutil.Process(server.pid)
        before = process.cpu_times()
        with ConnectionSampler(server.redis, server.pid, interval=0.25) as sampler:
            producers.call("POST", "/bench/go")
            line = clients.stdout.readline()
        after = process.cpu_times()
        clients.wait(30)
    finally:
        if clients.poll() is None:
            clients.kill()
            clients.wait()
    result: dict[str, Any] = orjson.loads(line)
    status = producers.call("GET", "/bench/status")
    cpu = (after.user - before.user) + (after.system - before.system)
    tokens = result["tokens"] or 1
    result.update(
        streams=streams,
        expected_tokens=streams * expected,
        tokens_per_s=result["tokens"] / result["seconds"],
        server_cpu_s=cpu,
        cpu_s_per_1000_tokens=cpu / tokens * 1000,
        cpu_us_per_event=cpu / tokens * 1e6,
        peak_redis_connections=sampler.peak,
        producer_max_lag_ms=status["max_lag_ms"],
    )
    return result


def churn_row(server: HTTPServer, streams: int, rate: float, seconds: float) -> dict[str, Any]:
    """Scenario 3's load with streams starting and ending all through the run, readers
    connecting late and resuming with ``Last-Event-ID`` (``_shape.churn``)."""
    plan = _shape.churn(streams, rate, seconds, prefix=f"n{streams}-")
    server.call("POST", "/bench/plan", {"rate": rate, "plan": [p.as_dict() for p in plan]})
    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as file:
        file.write(orjson.dumps([p.as_dict() for p in plan]))
    t0 = time.time() + 1.0 + len(plan) * 0.0005
    clients = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks._clients",
            "plan",
            str(server.port),
            file.name,
            repr(t0),
            str(LATE_MS),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert clients.stdout is not None
    try:
        if clients.stdout.readline().strip() != "ready":
            raise RuntimeError("the SSE clients did not start")
        process = psutil.Process(server.pid)
        before = process.cpu_times()
        with ConnectionSampler(server.redis, server.pid, interval=0.25) as sampler:
            server.call("POST", "/bench/go", {"t0_wall": t0})
            line = clients.stdout.readline()
        after = process.cpu_times()
        clients.wait(30)
    finally:
        if clients.poll() is None:
            clients.kill()
            clients.wait()
        Path(file.name).unlink(missing_ok=True)
    if not line:
        raise RuntimeError("the SSE clients failed (see their stderr)")
    result: dict[str, Any] = orjson.loads(line)
    cpu = (after.user - before.user) + (after.system - before.system)
    result.update(
        streams=streams,
        streams_in_plan=len(plan),
        expected_tokens=sum(p.count for p in plan),
        server_cpu_s=cpu,
        cpu_us_per_event=cpu / max(result["tokens"], 1) * 1e6,
        peak_redis_connections=sampler.peak,
        producer_max_lag_ms=server.call("GET", "/bench/status")["max_lag_ms"],
    )
    return result


def live_fanout(server: HTTPServer, quick: bool) -> Result:
    """Scenario 3: 1,000 streams at 20 tokens/s for 30 s, one SSE client each.

    The target applies to producers and router in one process. The same load with the
    producers in another process (generation workers) shows what fan-out alone costs, and
    the same load served by a bare Starlette SSE endpoint from in-process queues (no
    storage, no resume) is the baseline the CPU per event is a ratio against (issue 11).
    """
    streams, seconds = (100, 5.0) if quick else (1000, 30.0)
    row = fanout_row(server, streams, 20.0, seconds)
    baseline = fanout_row(server, streams, 20.0, seconds, bare=True)
    workers = HTTPServer(server.redis)
    try:
        split = fanout_row(server, streams, 20.0, seconds, producers=workers)
    finally:
        workers.stop()
    # The same ratio below saturation: at 1,000 streams a worker on a slow machine spends a
    # full core on either side, and the ratio then compares two saturated cores.
    light, light_seconds = (30, 3.0) if quick else (LIGHT_STREAMS, 15.0)
    light_row = fanout_row(server, light, 20.0, light_seconds)
    light_bare = fanout_row(server, light, 20.0, light_seconds, bare=True)
    light_floor = fanout_row(server, light, 20.0, light_seconds, bare="stored")
    churn_sizes, churn_seconds = ((20, 50), 3.0) if quick else ((100, 500, 1000), 15.0)
    churn = [churn_row(server, n, 20.0, churn_seconds) for n in churn_sizes]
    standard = _on_standard(server.redis, streams, seconds, light, light_seconds)
    figures = [
        Figure("3", "p50 added latency", round(row["p50_ms"], 2), "ms", note="info"),
        Figure("3", "p99 added latency", round(row["p99_ms"], 2), "ms", "<=", 25),
        Figure("3", "max added latency", round(row["max_ms"], 2), "ms", note="info"),
        Figure("3", "tokens/s delivered", round(row["tokens_per_s"]), "tok/s", note="info"),
        Figure(
            "3",
            "server CPU s per 1,000 tokens",
            round(row["cpu_s_per_1000_tokens"], 4),
            "s",
            note="info",
        ),
        Figure("3", "Redis connections (server, peak)", row["peak_redis_connections"], "", "<=", 4),
        Figure("3", "clients behind or incomplete", row["behind"], "", "==", 0),
        Figure(
            "3",
            "server CPU per SSE event",
            round(row["cpu_us_per_event"], 1),
            "us",
            note="info",
        ),
        Figure(
            "3",
            "bare Starlette SSE: server CPU per SSE event",
            round(baseline["cpu_us_per_event"], 1),
            "us",
            note="info",
        ),
        Figure(
            "3",
            "bare Starlette SSE: p99 added latency",
            round(baseline["p99_ms"], 2),
            "ms",
            note="info",
        ),
        Figure("3", "bare Starlette SSE: clients behind", baseline["behind"], note="info"),
        _cpu_ratio("CPU per SSE event, router / bare Starlette SSE", row, baseline),
        Figure(
            "3",
            "tokens delivered == sent",
            row["tokens"] == row["expected_tokens"],
            "",
            "==",
            True,
        ),
        Figure(
            "3",
            "producers apart: p50 added latency",
            round(split["p50_ms"], 2),
            "ms",
            note="info",
        ),
        Figure(
            "3",
            "producers apart: p99 added latency",
            round(split["p99_ms"], 2),
            "ms",
            note="info",
        ),
        Figure(
            "3",
            "producers apart: server CPU s per 1,000 tokens",
            round(split["cpu_s_per_1000_tokens"], 4),
            "s",
            note="info",
        ),
        Figure("3", "producers apart: clients behind or incomplete", split["behind"], note="info"),
        *(
            Figure("3", f"{light:,} streams{side}: {what}", round(value, 2), unit, note="info")
            for side, measured in (("", light_row), (", bare Starlette SSE", light_bare))
            for what, value, unit in (
                ("server CPU per SSE event", measured["cpu_us_per_event"], "us"),
                ("p99 added latency", measured["p99_ms"], "ms"),
            )
        ),
        _cpu_ratio(
            f"{light:,} streams (below saturation): CPU per SSE event, router / bare",
            light_row,
            light_bare,
        ),
        Figure(
            "3",
            f"{light:,} streams: clients behind or incomplete, router + bare",
            light_row["behind"] + light_bare["behind"],
            "",
            "==",
            0,
        ),
        *(
            Figure("3", f"{light:,} streams, floor: {what}", round(value, 2), unit, note=note)
            for what, value, unit, note in (
                (
                    "bare endpoint + one XADD per token, CPU per SSE event",
                    light_floor["cpu_us_per_event"],
                    "us",
                    "see docs/performance.md",
                ),
                ("p99 added latency", light_floor["p99_ms"], "ms", "info"),
                (
                    "CPU per SSE event / bare",
                    light_floor["cpu_us_per_event"] / light_bare["cpu_us_per_event"],
                    "x",
                    "info",
                ),
                (
                    "router's CPU per SSE event / floor's",
                    light_row["cpu_us_per_event"] / light_floor["cpu_us_per_event"],
                    "x",
                    "info",
                ),
            )
        ),
        Figure(
            "3",
            f"{light:,} streams, floor: clients behind or incomplete",
            light_floor["behind"],
            "",
            "==",
            0,
        ),
    ]
    return Result(
        figures=figures
        + _standard_figures(standard, streams, light)
        + [
            figure
            for c in churn
            for figure in (
                Figure(
                    "3",
                    f"churn, {c['streams']:,} streams ({c['streams_in_plan']:,} in the run):"
                    " p99 added latency",
                    round(c["p99_ms"], 2),
                    "ms",
                    "<=",
                    25,
                ),
                Figure(
                    "3",
                    f"churn, {c['streams']:,} streams: clients behind or incomplete",
                    c["behind"],
                    "",
                    "==",
                    0,
                ),
                Figure(
                    "3",
                    f"churn, {c['streams']:,} streams: producer max lag",
                    round(c["producer_max_lag_ms"], 1),
                    "ms",
                    note="info",
                ),
                Figure(
                    "3",
                    f"churn, {c['streams']:,} streams: server CPU per SSE event",
                    round(c["cpu_us_per_event"], 1),
                    "us",
                    note="info",
                ),
            )
        ],
        details={
            **row,
            "producers_apart": split,
            "bare_starlette_sse": baseline,
            "below_saturation": {
                "router": light_row,
                "bare_starlette_sse": light_bare,
                "floor_bare_with_xadd": light_floor,
            },
            "churn": churn,
            "uvicorn_standard": standard,
        },
    )


# The server as the docs and the chat example run it: uvicorn[standard] picks uvloop and
# httptools. The rows with targets keep the stock loop and h11, so that runs compare.
_STANDARD = {"RS_BENCH_LOOP": "uvloop", "RS_BENCH_HTTP": "httptools"}
_STANDARD_ROW = "on uvicorn[standard] (uvloop, httptools)"


def _on_standard(
    redis: RedisServer, streams: int, seconds: float, light: int, light_seconds: float
) -> dict[str, Any]:
    """The router at ``streams`` and ``light`` streams and the bare endpoint at ``light``,
    on uvicorn[standard]; ``{"skipped": why}`` without uvloop or httptools."""
    missing = [name for name in ("uvloop", "httptools") if importlib.util.find_spec(name) is None]
    if missing:
        why = f"{' and '.join(missing)} not installed (pip install 'uvicorn[standard]')"
        return {"skipped": why}
    server = HTTPServer(redis, env=_STANDARD)
    try:
        return {
            "router": fanout_row(server, streams, 20.0, seconds),
            "light_router": fanout_row(server, light, 20.0, light_seconds),
            "light_bare": fanout_row(server, light, 20.0, light_seconds, bare=True),
        }
    finally:
        server.stop()


def _standard_figures(standard: dict[str, Any], streams: int, light: int) -> list[Figure]:
    if "skipped" in standard:
        return [Figure("3", _STANDARD_ROW, f"skipped: {standard['skipped']}", note="skipped")]
    router, light_router, light_bare = (
        standard[k] for k in ("router", "light_router", "light_bare")
    )
    rows: list[tuple[str, float, str]] = [
        (f"{streams:,} streams: p99 added latency", router["p99_ms"], "ms"),
        (f"{streams:,} streams: server CPU per SSE event", router["cpu_us_per_event"], "us"),
        (f"{light:,} streams: server CPU per SSE event", light_router["cpu_us_per_event"], "us"),
        (
            f"{light:,} streams, bare Starlette SSE: server CPU per SSE event",
            light_bare["cpu_us_per_event"],
            "us",
        ),
        (
            f"{light:,} streams: CPU per SSE event, router / bare",
            light_router["cpu_us_per_event"] / light_bare["cpu_us_per_event"],
            "x",
        ),
    ]
    return [
        Figure("3", f"{_STANDARD_ROW}, {name}", round(value, 2), unit, note="info")
        for name, value, unit in rows
    ] + [
        Figure(
            "3",
            f"{_STANDARD_ROW}: clients behind or incomplete",
            router["behind"] + light_router["behind"] + light_bare["behind"],
            "",
            "==",
            0,
        )
    ]


def _cpu_ratio(name: str, router: dict[str, Any], bare: dict[str, Any]) -> Figure:
    """Server CPU per SSE event of the router over the bare endpoint's (target <= 1.5x)."""
    ratio = router["cpu_us_per_event"] / bare["cpu_us_per_event"]
    return Figure("3", name, round(ratio, 2), "x", "<=", 1.5, note="same run, same clients")


def scaling(server: HTTPServer, quick: bool, largest: dict[str, Any] | None) -> Result:
    """Scenario 6: scenario 3 at 10, 100 and 1,000 streams."""
    sizes, seconds = ((10, 50, 100), 3.0) if quick else ((10, 100, 1000), 10.0)
    rows = []
    for streams in sizes:
        if largest is not None and largest["streams"] == streams:
            rows.append(largest)  # scenario 3's own run, just measured
        else:
            rows.append(fanout_row(server, streams, 20.0, seconds))
    figures = [
        Figure(
            "6",
            f"{row['streams']:>4} streams: CPU s/1k tok | p99 ms | Redis conns",
            f"{row['cpu_s_per_1000_tokens']:.4f} | {row['p99_ms']:.1f} | "
            f"{row['peak_redis_connections']}",
            note="info",
        )
        for row in rows
    ]
    costs = [row["cpu_s_per_1000_tokens"] for row in rows]
    connections = {row["peak_redis_connections"] for row in rows}
    figures += [
        Figure(
            "6",
            f"cost per token, {sizes[-1]} vs {sizes[0]} streams",
            round(costs[-1] / costs[0], 3),
            "x",
            "<=",
            1.25,
            note="flat: within noise",
        ),
        Figure("6", "Redis connections constant", len(connections) == 1, "", "==", True),
    ]
    return Result(figures=figures, details={"rows": rows})


def sse_replay(server: HTTPServer, stream_id: str, tokens: int) -> Result:
    """Scenario 4 (HTTP part): the whole finished stream over SSE."""
    seconds, events = min(
        (asyncio.run(read_whole(server.port, stream_id)) for _ in range(3)),
        key=lambda r: r[0],
    )
    return Result(
        figures=[
            Figure("4", "whole stream over SSE", round(seconds, 3), "s", "<=", 2),
            Figure("4", "SSE events == tokens + end", events == tokens + 1, "", "==", True),
        ],
        details={"sse_seconds": seconds, "sse_events": events},
    )
