"""Scenarios 4 and 5: replaying a finished stream, and what a token costs in Redis."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from resumable_stream import StreamConsumer, StreamProducer, from_url

from ._sources import burst, tokens
from ._support import Figure, RedisServer, Result

REPLAY_STREAM = "bench-replay"
PACED_STREAM = "bench-storage-paced"


async def write_stream(url: str, stream_id: str, count: int) -> None:
    """Write ``count`` 4-character tokens as fast as the source gives them; wait for the end."""
    async with from_url(url) as transport:
        run = await StreamProducer(transport).start(burst(tokens(0, count)), stream_id=stream_id)
        await run.wait()


async def _replay(url: str, stream_id: str, rounds: int) -> tuple[float, int]:
    best = float("inf")
    events = 0
    async with from_url(url) as transport:
        for _ in range(rounds):
            started = time.perf_counter()
            events = 0
            async for _event in StreamConsumer(transport, stream_id):
                events += 1
            best = min(best, time.perf_counter() - started)
    return best, events


def replay(server: RedisServer, quick: bool) -> Result:
    """Scenario 4 (library part): resume from the start of a finished 100,000-token stream."""
    count = 10_000 if quick else 100_000
    asyncio.run(write_stream(server.url, REPLAY_STREAM, count))
    seconds, events = asyncio.run(_replay(server.url, REPLAY_STREAM, 3))
    entries = server.admin().client.xlen(f"rstream:{{{REPLAY_STREAM}}}:events")
    return Result(
        figures=[
            Figure(
                "4", "replay into a consumer", round(events / seconds), "events/s", ">=", 300_000
            ),
            Figure("4", "events replayed == tokens + end", events == count + 1, "", "==", True),
        ],
        details={"tokens": count, "events": events, "seconds": seconds, "entries": entries},
    )


async def _write_paced(url: str, stream_id: str, count: int) -> None:
    async def one_per_entry() -> Any:
        for item in tokens(7, count):
            yield item
            await asyncio.sleep(0.002)  # each token its own entry, as with a paced model

    async with from_url(url) as transport:
        run = await StreamProducer(transport).start(one_per_entry(), stream_id=stream_id)
        await run.wait()


def storage(server: RedisServer, quick: bool) -> Result:
    """Scenario 5: ``MEMORY USAGE`` of a stream's keys per 4-character token."""
    admin = server.admin()
    try:
        count = 10_000 if quick else 100_000
        if not admin.client.exists(f"rstream:{{{REPLAY_STREAM}}}:events"):
            asyncio.run(write_stream(server.url, REPLAY_STREAM, count))
        burst_bytes, burst_keys = admin.memory_usage(f"rstream:{{{REPLAY_STREAM}}}:*")
        paced_count = 200 if quick else 1000
        asyncio.run(_write_paced(server.url, PACED_STREAM, paced_count))
        paced_bytes, _ = admin.memory_usage(f"rstream:{{{PACED_STREAM}}}:*")
        paced_entries = admin.client.xlen(f"rstream:{{{PACED_STREAM}}}:events")
    finally:
        admin.close()
    return Result(
        figures=[
            Figure(
                "5",
                "Redis bytes per 4-char token (as fast as produced)",
                round(burst_bytes / count, 1),
                "B",
                "<=",
                40,
            ),
            Figure(
                "5",
                "Redis bytes per 4-char token (one token per entry)",
                round(paced_bytes / paced_count, 1),
                "B",
                note="info",
            ),
        ],
        details={
            "tokens": count,
            "bytes": burst_bytes,
            "keys": burst_keys,
            "paced_tokens": paced_count,
            "paced_bytes": paced_bytes,
            "paced_entries": paced_entries,
        },
    )
