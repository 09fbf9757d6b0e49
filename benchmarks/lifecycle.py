"""Lifecycle: what a stream costs besides its tokens, counted rather than timed.

A stream is started, its reader attaches and waits live, it gets one token and ends: the
work of starting a run, attaching a reader and ending both, which the paced plans pay for
every stream they start (about 600 in scenario 2b's churn plan). Run as::

    python -m benchmarks.lifecycle                  # objects each live stream keeps
    python -m benchmarks.lifecycle --instructions   # instructions per stream (valgrind)

``objects``: the objects the garbage collector tracks for each live stream and its reader
(``len(gc.get_objects())`` with many streams waiting, over the count before them): a full
collection walks them all, and a run and its reader keep them for the whole stream.
``--instructions`` runs each backend under ``valgrind --tool=callgrind`` with two numbers
of streams and subtracts (start-up cancels out). Backends as in
:mod:`benchmarks.lockstep`: ``pass``, ``memory``, ``redis``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import time

from resumable_stream import telemetry

from ._support import RedisServer, callgrind_instructions
from .library import _Backend, backend_for

BACKENDS = ("pass", "memory", "redis")


async def _live(backend: _Backend, readers: int) -> None:
    """Until ``readers`` readers follow their stream live (a few loop turns without the
    library: the pass-through's readers wait at once)."""
    if not hasattr(backend, "transport"):
        for _ in range(20):
            await asyncio.sleep(0)
        return
    if telemetry._instruments is None:
        raise RuntimeError("the lifecycle count needs OpenTelemetry (pip install -e '.[dev]')")
    # (The library's own tally of live consumers: polled, it has no event to wait on.)
    while telemetry.counts.live < readers:  # noqa: ASYNC110
        await asyncio.sleep(0.001)


async def _settled() -> int:
    """The objects the garbage collector tracks, once what is on its way has come: the
    streams before ended and cleaned up, each reader's subscription confirmed (a reply
    from Redis under a loaded machine can take a while). The count, after a full
    collection, holds still for 10 ms; at most one second is spent waiting for that."""
    last = -1
    for _ in range(100):
        gc.collect()
        count = len(gc.get_objects())
        if count == last:
            break
        last = count
        await asyncio.sleep(0.01)
    return last


async def _streams(backend: _Backend, prefix: str, count: int, measure: bool) -> float:
    """Start ``count`` streams, attach a reader to each, then give each one token and an
    end; return the tracked objects per live stream (``measure``) or 0."""
    loop = asyncio.get_running_loop()
    gate = loop.create_future()

    async def source():  # type: ignore[no-untyped-def]
        await gate
        yield "0"

    async def one(key: str) -> None:
        await backend.start(key, source())
        async with contextlib.aclosing(backend.read(key, None)) as tokens:
            async for _ in tokens:
                pass
        await backend.wait(key)

    before = await _settled() if measure else 0
    already = telemetry.counts.live
    tasks = [asyncio.create_task(one(f"{prefix}-{i}")) for i in range(count)]
    await _live(backend, already + count)
    objects = 0.0
    if measure:
        objects = (await _settled() - before) / count
    gate.set_result(None)
    await asyncio.gather(*tasks)
    return objects


def run(backend: str, streams: int, redis_url: str, measure: bool = True) -> float:
    url = {"pass": None, "memory": "memory://"}.get(backend, redis_url)

    async def main() -> float:
        async with backend_for(url) as through:
            await _streams(through, f"warm-{time.time_ns()}", 50, False)
            return await _streams(through, f"s-{time.time_ns()}", streams, measure)

    with asyncio.Runner() as runner:
        return runner.run(main())


def instructions(backend: str, streams: int, redis_url: str) -> float:
    """Instructions per stream under callgrind: ``streams`` streams minus 100."""
    counts = []
    for count in (100, streams):
        arguments = [
            "benchmarks.lifecycle",
            "--backend",
            backend,
            "--streams",
            str(count),
            "--count-only",
        ]
        if redis_url:
            arguments += ["--redis-url", redis_url]
        counts.append(callgrind_instructions(arguments))
    return (counts[1] - counts[0]) / (streams - 100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lifecycle", description=__doc__)
    parser.add_argument("--backend", action="append", choices=BACKENDS)
    parser.add_argument("--streams", type=int, default=600)
    parser.add_argument("--instructions", action="store_true", help="count under valgrind")
    parser.add_argument("--redis-url", help="a redis-server to use (default: start one)")
    parser.add_argument("--count-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.instructions and args.streams <= 100:
        parser.error("--streams must be above 100 with --instructions")
    backends = args.backend or list(BACKENDS)
    with contextlib.ExitStack() as stack:
        url = args.redis_url
        if url is None and "redis" in backends:
            server = RedisServer().start()
            stack.callback(server.stop)
            url = server.url
        for backend in backends:
            if args.count_only:  # (one run under callgrind, for instructions())
                run(backend, args.streams, url or "", measure=False)
            elif args.instructions:
                count = instructions(backend, args.streams, url or "")
                print(f"{backend:7s} {count:10,.0f} instructions per stream", flush=True)
            else:
                objects = run(backend, args.streams, url or "")
                print(f"{backend:7s} {objects:6.1f} tracked objects per live stream", flush=True)


if __name__ == "__main__":
    main()
