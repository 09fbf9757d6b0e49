"""Scenarios 2 and 2b: many streams through Redis with the library API, in one process."""

from __future__ import annotations

import asyncio
import os
import time

from resumable_stream import StreamConsumer, StreamProducer, from_url

from ._sources import Pacer, burst, tokens
from ._support import ConnectionSampler, Figure, RedisServer, Result, percentile


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


async def _paced(
    url: str, streams: int, rate: float, duration: float
) -> tuple[list[float], float, int, int]:
    pacer = Pacer(rate, duration)
    latencies: list[float] = []
    async with from_url(url) as transport:
        producer = StreamProducer(transport)
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.5 + streams * 0.0005
        # Spread the streams' ticks over one period, as independent clients would be.
        runs = [
            await producer.start(pacer.source(start, (s / streams) * pacer.period))
            for s in range(streams)
        ]

        async def consume(stream_id: str) -> int:
            received = 0
            async for event in StreamConsumer(transport, stream_id):
                if event.type == "token":
                    latencies.append((time.perf_counter_ns() - int(event.data["text"])) / 1e6)
                    received += 1
            return received

        counts = await asyncio.gather(*(consume(run.stream_id) for run in runs))
        for run in runs:
            await run.wait()
    short = sum(1 for n in counts if n != pacer.count)
    return latencies, pacer.max_lag, short, sum(counts)


def paced_latency(server: RedisServer, quick: bool) -> Result:
    """Scenario 2b: 200 streams x 50 tokens/s for 6 s, latency from append to receipt."""
    streams, rate, duration = (50, 50.0, 2.0) if quick else (200, 50.0, 6.0)
    admin = server.admin()
    try:
        admin.flush()
        admin.reset_stats()
        with ConnectionSampler(server, os.getpid()) as sampler:
            latencies, max_lag, short, delivered = asyncio.run(
                _paced(server.url, streams, rate, duration)
            )
        commands, _calls = admin.library_commands()
    finally:
        admin.close()
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return Result(
        figures=[
            Figure("2b", "p50 latency", round(p50, 2), "ms", note="info"),
            Figure("2b", "p99 latency", round(p99, 2), "ms", "<=", 5),
            Figure("2b", "max latency", round(max(latencies), 2), "ms", note="info"),
            Figure("2b", "Redis connections (peak)", sampler.peak, "", "<=", 4),
            Figure(
                "2b",
                "producer max lag behind schedule",
                round(max_lag * 1000, 2),
                "ms",
                "<=",
                20,
                note="one period",
            ),
            Figure("2b", "consumers missing tokens", short, "", "==", 0),
            Figure("2b", "Redis commands per token", round(commands / delivered, 4), note="info"),
        ],
        details={"streams": streams, "rate": rate, "seconds": duration, "tokens": delivered},
    )
