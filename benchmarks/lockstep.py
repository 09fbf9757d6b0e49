"""Lock-step: the work per token of the library's hot path, counted rather than timed.

Every stream gets one token per tick, and the next tick starts once every reader has its
token: no timers and no pacing, yet each token takes the paced path (an entry of its own,
the producer's post, the reader's live wait). Run as::

    python -m benchmarks.lockstep                      # CPU per token, each backend
    python -m benchmarks.lockstep --instructions       # instructions per token (valgrind)
    python -m benchmarks.lockstep --metrics            # with metrics recorded (OpenTelemetry SDK)

Backends: ``pass`` (the in-process pass-through of scenario 2b), ``memory`` and ``redis``
(the library on ``memory://`` and on a redis-server started here), ``floor`` (the minimal
Redis client of :mod:`benchmarks.floor`). CPU per token moves with the machine's load;
``--instructions`` runs each backend under ``valgrind --tool=callgrind`` at two lengths
and subtracts (start-up cancels out), which gives the same count from run to run within
about 1% on Redis and 0.1% on memory: how changes to the hot path are compared. Lock-step
batches what paced runs do not (every stream's token in one loop turn, one socket write),
so its figures are below scenario 2b's; compare backends and versions, not scenarios.
``--metrics`` records the library's metrics on an OpenTelemetry SDK ``MeterProvider``
with an in-memory reader, as a service exporting them does (the reference chat service
serves them to Prometheus); without it they go to OpenTelemetry's no-op global provider.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import time
from collections.abc import AsyncIterator

from resumable_stream import _producer as producer_module

from ._support import RedisServer, callgrind_instructions
from .library import _Backend, backend_for

BACKENDS = ("pass", "memory", "redis", "floor")
_WARM_UP = 10  # ticks before the measured ones (connections, caches, first entries)
_TICK_TIMEOUT = 60.0  # seconds (under valgrind a tick takes about 50 times longer)


async def _lockstep(backend: _Backend, streams: int, ticks: int) -> float:
    """CPU seconds of this thread per token over the ticks after the warm-up."""
    loop = asyncio.get_running_loop()
    ticked = [loop.create_future() for _ in range(ticks)]
    everyone = [loop.create_future() for _ in range(ticks)]
    received = [0] * ticks

    async def source() -> AsyncIterator[str]:
        for tick in range(ticks):
            await ticked[tick]
            yield f"{tick}"

    async def read(key: str) -> None:
        async with contextlib.aclosing(backend.read(key, None)) as tokens:
            async for _, text in tokens:
                tick = int(text)
                received[tick] += 1
                if received[tick] == streams:
                    everyone[tick].set_result(None)

    keys = [f"lockstep-{time.time_ns()}-{i}" for i in range(streams)]
    for key in keys:
        await backend.start(key, source())
    readers = [asyncio.create_task(read(key)) for key in keys]
    began = 0.0
    for tick in range(ticks):
        if tick == _WARM_UP:
            began = time.thread_time()
        ticked[tick].set_result(None)
        try:
            await asyncio.wait_for(everyone[tick], _TICK_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(
                f"tick {tick}: {received[tick]} of {streams} readers got their token "
                f"within {_TICK_TIMEOUT:g} s"
            ) from None
    cpu = time.thread_time() - began
    await asyncio.gather(*readers)
    for key in keys:
        await backend.wait(key)
    return cpu / (streams * (ticks - _WARM_UP))


def record_metrics() -> None:
    """Record the library's metrics on an SDK provider, as a service exporting them does."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from resumable_stream import telemetry

    telemetry.configure(meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]))


def run(backend: str, streams: int, ticks: int, redis_url: str) -> float:
    """One lock-step run: CPU seconds per token."""
    url = {"pass": None, "memory": "memory://"}.get(backend, redis_url)

    async def main() -> float:
        async with backend_for(url, floor=backend == "floor") as through:
            return await _lockstep(through, streams, ticks)

    gc.collect()
    # The next tick's token comes right after the last one's write: the producer would take
    # it for the start of a burst (a token within COALESCE_GAP of the last write) and hold
    # its entry open for a pause. An LLM's tokens come further apart: with no gap, each
    # takes the paced path, as the tests' paced runs do.
    gap, producer_module.COALESCE_GAP = producer_module.COALESCE_GAP, 0.0
    try:
        with asyncio.Runner() as runner:
            return runner.run(main())
    finally:
        producer_module.COALESCE_GAP = gap


def instructions(
    backend: str, streams: int, ticks: int, redis_url: str, metrics: bool = False
) -> float:
    """Instructions per token under callgrind: a run of ``ticks`` ticks minus one of
    ``_WARM_UP + 20`` (what both share, start-up and warm-up, cancels out)."""
    counts = []
    short = _WARM_UP + 20
    if ticks <= short:
        raise ValueError(f"counting instructions needs more than {short} ticks")
    for length in (short, ticks):
        arguments = [
            "benchmarks.lockstep", "--backend", backend,
            "--streams", str(streams), "--ticks", str(length), "--rounds", "1",
        ]  # fmt: skip
        if redis_url:
            arguments += ["--redis-url", redis_url]
        if metrics:
            arguments.append("--metrics")
        counts.append(callgrind_instructions(arguments))
    return (counts[1] - counts[0]) / (streams * (ticks - short))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lockstep", description=__doc__)
    parser.add_argument("--backend", action="append", choices=BACKENDS)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--ticks", type=int, default=130)
    parser.add_argument("--rounds", type=int, default=3, help="runs per backend (CPU)")
    parser.add_argument("--instructions", action="store_true", help="count under valgrind")
    parser.add_argument("--redis-url", help="a redis-server to use (default: start one)")
    parser.add_argument("--metrics", action="store_true", help="record metrics (OpenTelemetry SDK)")
    args = parser.parse_args(argv)
    if args.metrics and not args.instructions:
        record_metrics()
    if args.ticks <= _WARM_UP + (20 if args.instructions else 0):
        parser.error(f"--ticks must be above {_WARM_UP + (20 if args.instructions else 0)}")
    backends = args.backend or list(BACKENDS)
    with contextlib.ExitStack() as stack:
        url = args.redis_url
        if url is None and {"redis", "floor"} & set(backends):
            server = RedisServer().start()
            stack.callback(server.stop)
            url = server.url
        for backend in backends:
            if args.instructions:
                count = instructions(backend, args.streams, args.ticks, url or "", args.metrics)
                print(f"{backend:7s} {count:10,.0f} instructions per token", flush=True)
                continue
            cpu = [run(backend, args.streams, args.ticks, url or "") for _ in range(args.rounds)]
            runs = ", ".join(f"{c * 1e6:.1f}" for c in cpu)
            print(
                f"{backend:7s} {statistics.median(cpu) * 1e6:7.1f} us CPU per token"
                f" (median of {len(cpu)}: {runs})",
                flush=True,
            )


if __name__ == "__main__":
    main()
