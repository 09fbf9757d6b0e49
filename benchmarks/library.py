"""Scenarios 2, 2b and 2c: many streams through Redis with the library API, in one process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from resumable_stream import Run, StreamConsumer, StreamProducer, Transport, from_url

from . import _shape, vercel
from ._shape import PlannedStream
from ._sources import Pacer, burst, tokens
from ._support import (
    ClusterUnavailable,
    ConnectionSampler,
    Figure,
    LocalCluster,
    RedisServer,
    Result,
    percentile,
)


async def _one_burst(
    producer: StreamProducer, items: list[str], yield_every: int
) -> tuple[bool, int]:
    run = await producer.start(burst(items, yield_every=yield_every))
    received: list[str] = []
    async for event in StreamConsumer(producer.transport, run.stream_id):
        if event.type == "token":
            received.append(event.data["text"])
    await run.wait()
    return "".join(received) == "".join(items), len(received)


async def _burst(url: str, streams: int, count: int, yield_every: int) -> tuple[float, int, bool]:
    sources = [tokens(s, count) for s in range(streams)]
    async with from_url(url) as transport:
        producer = StreamProducer(transport)
        started = time.perf_counter()
        results = await asyncio.gather(
            *(_one_burst(producer, items, yield_every) for items in sources)
        )
        elapsed = time.perf_counter() - started
    return elapsed, sum(n for _, n in results), all(ok for ok, _ in results)


def burst_throughput(server: RedisServer, quick: bool) -> Result:
    """Scenario 2: 100 streams x 2,000 tokens as fast as the source gives them."""
    streams, count = (20, 500) if quick else (100, 2000)
    admin = server.admin()
    result = Result(details={"streams": streams, "tokens_per_stream": count})
    figures = result.figures
    try:
        for yield_every, label in ((1, "source yields per token"), (0, "source never yields")):
            admin.flush()
            admin.reset_stats()
            with ConnectionSampler(server, os.getpid(), interval=0.02) as sampler:
                elapsed, delivered, correct = asyncio.run(
                    _burst(server.url, streams, count, yield_every)
                )
            commands, calls = admin.library_commands()
            rate = delivered / elapsed
            per_token = commands / delivered
            result.details[label] = {
                "seconds": elapsed,
                "delivered": delivered,
                "commands": commands,
                "commandstats": calls,
                "peak_connections": sampler.peak,
            }
            if yield_every:
                figures += [
                    Figure("2", "delivered tokens/s", round(rate), "tok/s", ">=", 150_000),
                    Figure("2", "Redis commands per token", round(per_token, 4), "", "<=", 0.1),
                    Figure("2", "every consumer's text == source", correct, "", "==", True),
                    Figure("2", "Redis connections (peak)", sampler.peak, "", note="info"),
                ]
            else:
                figures += [
                    Figure("2", f"tokens/s ({label})", round(rate), "tok/s", note="info"),
                    Figure("2", f"commands/token ({label})", round(per_token, 4), note="info"),
                ]
    finally:
        admin.close()
    return result


class _Backend(Protocol):
    """What a paced run needs from the thing measured: start a stream, read it from an offset."""

    async def start(self, key: str, source: AsyncIterator[str]) -> None: ...

    def read(self, key: str, after: str | None) -> AsyncGenerator[tuple[str, str]]: ...

    async def wait(self, key: str) -> None: ...


class _Library:
    """The library: a producer appends each stream to Redis, consumers read it back."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.producer = StreamProducer(transport)
        self.runs: dict[str, Run] = {}

    async def start(self, key: str, source: AsyncIterator[str]) -> None:
        self.runs[key] = await self.producer.start(source, stream_id=key)

    async def read(self, key: str, after: str | None) -> AsyncGenerator[tuple[str, str]]:
        async with StreamConsumer(self.transport, key, after=after) as consumer:
            async for event in consumer:
                if event.type == "token":
                    yield event.offset, event.data["text"]

    async def wait(self, key: str) -> None:
        await self.runs.pop(key).wait()


class _Log:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.done = False
        self.changed = asyncio.Event()

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class _PassThrough:
    """The same run without the library: a list per stream in memory, readers woken by an
    event. What the paced run costs besides the library (pacing, timers, bookkeeping)."""

    def __init__(self) -> None:
        self.logs: dict[str, _Log] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self, key: str, source: AsyncIterator[str]) -> None:
        log = self.logs[key] = _Log()

        async def pump() -> None:
            async for item in source:
                log.items.append(item)
                log.notify()
            log.done = True
            log.notify()

        self.tasks[key] = asyncio.create_task(pump())

    async def read(self, key: str, after: str | None) -> AsyncGenerator[tuple[str, str]]:
        log = self.logs[key]
        position = 0 if after is None else int(after) + 1
        while True:
            changed = log.changed
            while position < len(log.items):
                yield str(position), log.items[position]
                position += 1
            if log.done:
                return
            await changed.wait()

    async def wait(self, key: str) -> None:
        await self.tasks.pop(key)
        del self.logs[key]


@dataclass
class _PacedRun:
    latencies: list[float] = field(default_factory=list)
    max_lag: float = 0.0
    short: int = 0
    delivered: int = 0
    cpu: float = 0.0


async def _read_planned(
    backend: _Backend, plan: PlannedStream, first_due: float, latencies: list[float]
) -> int:
    """Read one planned stream as its reader would; return the tokens read (once each)."""
    loop = asyncio.get_running_loop()
    if plan.reader == "late":
        await asyncio.sleep(max(0.0, first_due + plan.attach - loop.time()))
    received, after = 0, None
    for leg in range(2):
        attached = time.perf_counter_ns()
        async with contextlib.aclosing(backend.read(plan.key, after)) as events:
            async for offset, text in events:
                now = time.perf_counter_ns()
                latencies.append((now - max(int(text), attached)) / 1e6)
                received, after = received + 1, offset
                if leg == 0 and plan.reader == "resume" and received == plan.detach_after:
                    break
        if plan.reader != "resume" or received != plan.detach_after:
            break
        await asyncio.sleep(plan.gap)  # the client's reconnection delay
    return received


async def _run_plan(backend: _Backend, plan: list[PlannedStream], rate: float) -> _PacedRun:
    pacer = Pacer(rate, 0.0)
    run = _PacedRun()
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.5 + len(plan) * 0.0005

    async def one(stream: PlannedStream) -> int:
        first_due = t0 + stream.start
        # Start each producer 20 ms before its first token, as a request would.
        await asyncio.sleep(max(0.0, first_due - 0.02 - loop.time()))
        await backend.start(stream.key, pacer.source(first_due, count=stream.count))
        received = await _read_planned(backend, stream, first_due, run.latencies)
        await backend.wait(stream.key)
        return received

    counts = await asyncio.gather(*(one(stream) for stream in plan))
    run.max_lag = pacer.max_lag
    run.short = sum(1 for n, stream in zip(counts, plan, strict=True) if n != stream.count)
    run.delivered = sum(counts)
    return run


@contextlib.asynccontextmanager
async def backend_for(url: str | None, *, floor: bool = False) -> AsyncIterator[_Backend]:
    """What a paced run goes through: the in-process pass-through (``url=None``), the
    minimal Redis client of :mod:`benchmarks.floor` on ``url`` (``floor=True``), or the
    library on ``url``'s transport (``memory://`` included)."""
    if floor:
        from .floor import MinimalRedis  # it builds on the pass-through above

        assert url is not None
        minimal, connection = await MinimalRedis.connect(url)
        try:
            yield minimal
        finally:
            connection.close()
    elif url is None:
        yield _PassThrough()
    else:
        async with from_url(url) as transport:
            yield _Library(transport)


def _paced(
    url: str | None,
    plan: list[PlannedStream],
    rate: float,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    *,
    floor: bool = False,
) -> _PacedRun:
    """One paced run in this process; ``url=None`` runs the in-process pass-through, and
    ``floor=True`` the minimal Redis client of :mod:`benchmarks.floor` on ``url``.

    CPU is this thread's (the event loop's), so the connection sampler's thread is not
    counted. ``loop_factory``: the event loop to run on (default: asyncio's).
    """

    async def main() -> _PacedRun:
        async with backend_for(url, floor=floor) as backend:
            return await _run_plan(backend, plan, rate)

    # Every run starts with the garbage collector in the same phase: a full collection
    # due within the first 100 ms (where 200 streams start) or only later depends on what
    # was allocated before, such as how many modules the code under test imports.
    gc.collect()
    started = time.thread_time()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        run = runner.run(main())
    run.cpu = time.thread_time() - started
    return run


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _library_us(library: _PacedRun, passthrough: _PacedRun) -> float:
    """Library CPU per delivered token: the difference of the two runs' CPU per token."""
    per_token = library.cpu / max(library.delivered, 1)
    return (per_token - passthrough.cpu / max(passthrough.delivered, 1)) * 1e6


#: Runs of the steady plan in a full benchmark. Its p99 hangs on how the start burst (200
#: streams started within one period) and the garbage collector's full collections fall:
#: 3-20 ms for the same code from one run to the next. The figures are the median run's,
#: and the p99 row lists every run's.
STEADY_RUNS = 3


def _paced_sizes(quick: bool) -> tuple[int, float, float]:
    """Streams (or churn slots), tokens per second, seconds: 2b's and 2c's sizes."""
    return (50, 50.0, 2.0) if quick else (200, 50.0, 6.0)


def _run_details(run: _PacedRun) -> dict[str, Any]:
    return {
        "tokens": run.delivered,
        "cpu_s": run.cpu,
        "p50_ms": percentile(run.latencies, 50),
        "p99_ms": percentile(run.latencies, 99),
        "max_ms": max(run.latencies, default=None),
        "max_lag_ms": run.max_lag * 1000,
        "short": run.short,
    }


def paced_latency(server: RedisServer, quick: bool) -> Result:
    """Scenario 2b: 200 streams x 50 tokens/s, latency from append to receipt.

    Two plans: every stream started at once and read live (``steady``, run
    :data:`STEADY_RUNS` times), then streams starting and ending all through the run and
    readers attaching late or resuming (``churn``). Each run of either plan is paired with
    one through an in-process pass-through (library CPU is the difference); each steady
    pair also runs the plan through the minimal Redis client of :mod:`benchmarks.floor`
    (the floor), and the churn plan also runs through vercel's ``resumable-stream`` in
    Node.
    """
    streams, rate, duration = _paced_sizes(quick)
    steady_plan = _shape.steady(streams, rate, duration)
    churn_plan = _shape.churn(streams, rate, duration)
    admin = server.admin()
    details: dict[str, Any] = {"streams": streams, "rate": rate, "seconds": duration}
    steadies: list[_PacedRun] = []
    steady_passes: list[_PacedRun] = []
    floors: list[_PacedRun] = []
    commands = 0
    try:
        with ConnectionSampler(server, os.getpid()) as sampler:
            for _ in range(1 if quick else STEADY_RUNS):
                admin.flush()
                admin.reset_stats()
                steadies.append(_paced(server.url, steady_plan, rate))
                commands += admin.library_commands()[0]
                steady_passes.append(_paced(None, steady_plan, rate))
                # The floor next to the same pass-through (one connection: the peak stays).
                admin.flush()
                floors.append(_paced(server.url, steady_plan, rate, floor=True))
        admin.flush()
        with ConnectionSampler(server, os.getpid()) as churn_sampler:
            churn = _paced(server.url, churn_plan, rate)
        passthrough = _paced(None, churn_plan, rate)
        admin.flush()
        node = vercel.paced(server, churn_plan, rate)
        # The same churn plan with the library's metrics on an OpenTelemetry SDK provider:
        # a service that exports them (the reference chat service serves them to Prometheus).
        with_metrics: _PacedRun | str
        with _metrics_recorded() as recording:
            if recording is None:
                admin.flush()
                with_metrics = _paced(server.url, churn_plan, rate)
            else:
                with_metrics = recording  # why the row is skipped
        # The same churn plan on uvloop (the loop uvicorn[standard] runs), both sides.
        uvloop_factory = _uvloop_factory()
        on_uvloop: tuple[_PacedRun, _PacedRun] | None = None
        if uvloop_factory is not None:
            admin.flush()
            on_uvloop = (
                _paced(server.url, churn_plan, rate, uvloop_factory),
                _paced(None, churn_plan, rate, uvloop_factory),
            )
    finally:
        admin.close()
    # The steady figures are the run with the median p99; CPU is the median of the pairs.
    p99s = [percentile(run.latencies, 99) for run in steadies]
    middle = sorted(range(len(steadies)), key=p99s.__getitem__)[len(steadies) // 2]
    steady, steady_passthrough = steadies[middle], steady_passes[middle]
    steady_library_us = statistics.median(
        _library_us(run, passthrough)
        for run, passthrough in zip(steadies, steady_passes, strict=True)
    )
    runs_note = f"median of {len(steadies)} runs: " + ", ".join(f"{p:.1f}" for p in p99s)
    details["steady_runs"] = [_run_details(run) for run in steadies]
    runs = {
        "steady": steady,
        "steady_pass_through": steady_passthrough,
        "churn": churn,
        "pass_through": passthrough,
    }
    for name, run in runs.items():
        details[name] = _run_details(run)
    floor_us = statistics.median(
        _library_us(run, paired) for run, paired in zip(floors, steady_passes, strict=True)
    )
    details["floor_minimal_client"] = {
        "runs": [_run_details(run) for run in floors],
        "minus_pass_through_us": floor_us,
    }
    floor_short = sum(run.short for run in floors)
    details["churn"]["streams_in_plan"] = len(churn_plan)
    details["churn"]["readers"] = {
        kind: sum(1 for p in churn_plan if p.reader == kind) for kind in ("live", "late", "resume")
    }
    details["vercel_resumable_stream"] = node
    p50, p99 = percentile(steady.latencies, 50), percentile(steady.latencies, 99)
    churn_p99 = percentile(churn.latencies, 99)
    library_us = _library_us(churn, passthrough)
    figures = [
        Figure("2b", "p50 latency", round(p50, 2), "ms", note="info"),
        Figure("2b", "p99 latency", round(p99, 2), "ms", "<=", 5, note=runs_note),
        Figure("2b", "max latency", round(max(steady.latencies), 2), "ms", note="info"),
        Figure("2b", "Redis connections (peak)", sampler.peak, "", "<=", 4),
        Figure(
            "2b",
            "producer max lag behind schedule",
            round(max(run.max_lag for run in steadies) * 1000, 2),
            "ms",
            "<=",
            20,
            note="one period",
        ),
        Figure("2b", "consumers missing tokens", sum(run.short for run in steadies), "", "==", 0),
        Figure(
            "2b",
            "Redis commands per token",
            round(commands / sum(run.delivered for run in steadies), 4),
            note="info",
        ),
        Figure(
            "2b",
            "library CPU per token (minus pass-through)",
            round(steady_library_us, 1),
            "us",
            "<=",
            15,
        ),
        Figure(
            "2b",
            "floor: minimal client, one XADD per token, no library (CPU minus pass-through)",
            round(floor_us, 1),
            "us",
            note=f"steady plan, median of {len(floors)} pairs; see docs/performance.md",
        ),
        Figure("2b", "floor: readers missing tokens", floor_short, "", "==", 0),
        Figure(
            "2b",
            "library CPU per token / floor's",
            round(steady_library_us / floor_us, 2) if floor_us > 0 else "n/a",
            "x",
            note="info",
        ),
        Figure(
            "2b",
            f"churn ({len(churn_plan)} streams start/end, late/resuming readers): p99",
            round(churn_p99, 2),
            "ms",
            "<=",
            5,
        ),
        Figure("2b", "churn: producer max lag", round(churn.max_lag * 1000, 2), "ms", "<=", 20),
        Figure("2b", "churn: readers missing tokens", churn.short, "", "==", 0),
        Figure("2b", "churn: Redis connections (peak)", churn_sampler.peak, "", "<=", 4),
        Figure(
            "2b",
            "churn: pass-through process CPU per token",
            round(passthrough.cpu / max(passthrough.delivered, 1) * 1e6, 1),
            "us",
            note="info",
        ),
        Figure(
            "2b",
            "churn: library CPU per token (minus pass-through)",
            round(library_us, 1),
            "us",
            "<=",
            15,
        ),
        Figure("2b", "churn: pass-through readers missing tokens", passthrough.short, "", "==", 0),
    ]
    figures += vercel.figures(node, churn_p99)
    figures += _metrics_figures(with_metrics, passthrough, details)
    figures += _uvloop_figures(on_uvloop, node, details)
    return Result(figures=figures, details=details)


@contextlib.contextmanager
def _metrics_recorded() -> Iterator[str | None]:
    """Record the library's metrics on an SDK provider meanwhile; else yield why not."""
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from resumable_stream import telemetry
    except ImportError as exc:
        yield f"skipped: the OpenTelemetry SDK is not installed ({exc})"
        return
    telemetry.configure(meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]))
    try:
        yield None
    finally:
        telemetry.configure()


def _metrics_figures(
    run: _PacedRun | str, passthrough: _PacedRun, details: dict[str, Any]
) -> list[Figure]:
    if isinstance(run, str):
        return [Figure("2b", "churn with metrics on (OpenTelemetry SDK)", run, note="skipped")]
    details["churn_metrics"] = {**_run_details(run), "pass_through_cpu_s": passthrough.cpu}
    return [
        Figure(
            "2b",
            "churn with metrics on (OpenTelemetry SDK): library CPU per token",
            round(_library_us(run, passthrough), 1),
            "us",
            note="info",
        ),
        Figure(
            "2b",
            "churn with metrics on: p99",
            round(percentile(run.latencies, 99), 2),
            "ms",
            note="info",
        ),
        Figure("2b", "churn with metrics on: readers missing tokens", run.short, "", "==", 0),
    ]


def _uvloop_figures(
    runs: tuple[_PacedRun, _PacedRun] | None, node: dict[str, Any], details: dict[str, Any]
) -> list[Figure]:
    if runs is None:
        return [Figure("2b", "churn on uvloop", "skipped: uvloop is not installed", note="skipped")]
    library, passthrough = runs
    p99 = percentile(library.latencies, 99)
    details["churn_uvloop"] = {
        "tokens": library.delivered,
        "cpu_s": library.cpu,
        "p99_ms": p99,
        "max_lag_ms": library.max_lag * 1000,
        "short": library.short,
        "pass_through_cpu_s": passthrough.cpu,
    }
    figures = [
        Figure("2b", "churn on uvloop: p99", round(p99, 2), "ms", note="info"),
        Figure(
            "2b",
            "churn on uvloop: library CPU per token (minus pass-through)",
            round(_library_us(library, passthrough), 1),
            "us",
            note="info",
        ),
        Figure("2b", "churn on uvloop: readers missing tokens", library.short, "", "==", 0),
    ]
    node_p99 = node.get("p99_ms") if isinstance(node, dict) else None
    if node_p99:
        figures.append(
            Figure(
                "2b",
                "churn on uvloop p99 / resumable-stream (Node) p99",
                round(p99 / node_p99, 2),
                "x",
                note="info",
            )
        )
    return figures


CLUSTER_MASTERS = 3
CLUSTER_ROW = f"Redis Cluster ({CLUSTER_MASTERS} masters)"


def cluster_latency(quick: bool) -> Result:
    """Scenario 2c: 2b's churn plan through ``redis+cluster://`` on a local Redis Cluster.

    The cluster (3 masters, no replicas) is started here and stopped at the end. Besides
    latency, it counts this process's connections to each master (issue 8: at most 2 per
    master, whatever the number of streams). Without cluster support on this machine the
    scenario is one row saying why.
    """
    streams, rate, duration = _paced_sizes(quick)
    plan = _shape.churn(streams, rate, duration)
    try:
        cluster = LocalCluster(CLUSTER_MASTERS).start()
    except ClusterUnavailable as exc:
        print(f"scenario 2c: skipping the Redis Cluster rows: {exc}", file=sys.stderr, flush=True)
        return Result(
            figures=[Figure("2c", CLUSTER_ROW, f"skipped: {exc}", note="skipped")],
            details={"skipped": str(exc)},
        )
    admins = [node.admin() for node in cluster.nodes]
    try:
        sampler = ConnectionSampler(cluster.nodes, os.getpid())
        sampler.connect()
        for admin in admins:
            admin.reset_stats()
        with sampler:
            run = _paced(cluster.url, plan, rate)
        commands: dict[int, dict[str, int]] = {}
        total = 0
        for admin in admins:
            count, calls = admin.library_commands()
            total += count - sampler.own_commands(admin.server)
            commands[admin.server.port] = calls
    finally:
        for admin in admins:
            admin.close()
        cluster.stop()
    passthrough = _paced(None, plan, rate)
    per_master = max(sampler.peaks.values())
    details: dict[str, Any] = {
        "streams": streams,
        "rate": rate,
        "seconds": duration,
        "masters": CLUSTER_MASTERS,
        "churn": {
            **_run_details(run),
            "streams_in_plan": len(plan),
            "commands": total,
            "commandstats_by_port": commands,
            "peak_connections_by_port": sampler.peaks,
            "peak_connections": sampler.peak,
            "connection_samples": sampler.samples,
        },
        "pass_through": _run_details(passthrough),
    }
    return Result(
        figures=[
            Figure(
                "2c",
                f"cluster churn ({len(plan)} streams start/end, late/resuming readers): p99",
                round(percentile(run.latencies, 99), 2),
                "ms",
                note="info (2b's churn row has the target)",
            ),
            Figure(
                "2c",
                "cluster churn: p50",
                round(percentile(run.latencies, 50), 2),
                "ms",
                note="info",
            ),
            Figure(
                "2c",
                "cluster churn: producer max lag",
                round(run.max_lag * 1000, 2),
                "ms",
                note="info",
            ),
            Figure("2c", "cluster churn: readers missing tokens", run.short, "", "==", 0),
            Figure(
                "2c",
                "cluster: Redis connections per master (peak)",
                per_master,
                "",
                "<=",
                2,
                note="issue 8: constant in the number of streams",
            ),
            Figure(
                "2c",
                f"cluster: Redis connections, all {CLUSTER_MASTERS} masters (peak)",
                sampler.peak,
                note="info",
            ),
            Figure(
                "2c",
                "cluster: Redis commands per token",
                round(total / max(run.delivered, 1), 4),
                note="info",
            ),
            Figure(
                "2c",
                "cluster: library CPU per token (minus pass-through)",
                round(_library_us(run, passthrough), 1),
                "us",
                note="info (2b's churn row has the target)",
            ),
        ],
        details=details,
    )
