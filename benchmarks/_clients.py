"""SSE clients for scenarios 3, 4 and 6, on raw asyncio streams (cheap enough for 1,000).

Run as ``python -m benchmarks._clients PORT STREAMS EXPECTED LATE_MS [PREFIX]``: connects to
``/<PREFIX>/fan-<i>`` for every i (``PREFIX`` is ``streams``, the router, or ``bare``, the
baseline endpoint), prints ``ready`` once all answered, reads every stream to its end event
and prints one JSON line of results. Latency is receipt time minus the send time each token carries
(``time.time_ns()`` in the server process).

``python -m benchmarks._clients plan PORT PLAN.json T0 LATE_MS`` follows a plan instead
(``benchmarks/_shape.py``, ``T0`` its start in ``time.time()`` seconds): each reader
connects when its stream's first token is due (or later), a resuming one drops its
connection part-way and comes back with ``Last-Event-ID``. Latency is then receipt time
minus the later of the send time and the reader's (re)connection.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from pathlib import Path
from typing import Any

import orjson


class SSEReader:
    """Reads one chunked SSE response; ``next_events()`` returns complete event blocks."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buffer = b""
        self.status = 0

    async def read_head(self) -> None:
        head = await self._reader.readuntil(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        if self.status == 200 and b"transfer-encoding: chunked" not in head.lower():
            raise RuntimeError(f"expected a chunked response, got {head!r}")

    async def next_events(self) -> list[bytes] | None:
        """The next complete events (possibly none yet); None at the end of the body."""
        size = int((await self._reader.readline()).strip(), 16)
        if size == 0:
            return None
        self._buffer += (await self._reader.readexactly(size + 2))[:-2]
        *blocks, self._buffer = self._buffer.split(b"\n\n")
        return blocks


async def open_stream(
    port: int, stream_id: str, prefix: str = "streams", last_event_id: str | None = None
) -> tuple[SSEReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    resume = "" if last_event_id is None else f"Last-Event-ID: {last_event_id}\r\n"
    writer.write(
        f"GET /{prefix}/{stream_id} HTTP/1.1\r\nHost: bench\r\n"
        f"Accept: text/event-stream\r\n{resume}\r\n".encode()
    )
    return SSEReader(reader), writer


def token_stamp(block: bytes) -> int | None:
    """The send time carried by a token event, or None for other events."""
    if b"\nevent: token\n" not in block:
        return None
    data = block[block.index(b"\ndata: ") + 7 :]
    return int(orjson.loads(data)["text"])


def event_id(block: bytes) -> str | None:
    """The ``id:`` of an event block (it may follow a comment line)."""
    for line in block.split(b"\n"):
        if line.startswith(b"id: "):
            return line[4:].decode()
    return None


async def read_whole(port: int, stream_id: str) -> tuple[float, int]:
    """Seconds to read a stream over SSE from its start to its end, and events read."""
    started = time.perf_counter()
    sse, writer = await open_stream(port, stream_id)
    await sse.read_head()
    events = 0
    while (blocks := await sse.next_events()) is not None:
        events += sum(1 for b in blocks if b.startswith(b"id: ") or b"\nid: " in b)
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed, events


async def _follow(
    sse: SSEReader, latencies: list[float], late_ms: float
) -> tuple[int, float, bool]:
    received = 0
    worst = 0.0
    ended = False
    while (blocks := await sse.next_events()) is not None:
        now = time.time_ns()
        for block in blocks:
            stamp = token_stamp(block)
            if stamp is not None:
                latency = (now - stamp) / 1e6
                latencies.append(latency)
                worst = max(worst, latency)
                received += 1
            elif b"event: end" in block:
                ended = True
    return received, worst, ended


async def follow_all(
    port: int, streams: int, expected: int, late_ms: float, prefix: str = "streams"
) -> dict[str, Any]:
    opened = await asyncio.gather(*(open_stream(port, f"fan-{i}", prefix) for i in range(streams)))
    await asyncio.gather(*(sse.read_head() for sse, _ in opened))
    statuses = {sse.status for sse, _ in opened}
    print("ready", flush=True)
    latencies: list[float] = []
    started = time.perf_counter()
    results = await asyncio.gather(*(_follow(sse, latencies, late_ms) for sse, _ in opened))
    elapsed = time.perf_counter() - started
    for _, writer in opened:
        writer.close()
    behind = sum(
        1
        for received, worst, ended in results
        if received != expected or not ended or worst > late_ms
    )
    latencies.sort()
    n = len(latencies)

    def pct(q: float) -> float | None:
        return latencies[max(0, math.ceil(n * q / 100) - 1)] if n else None

    return {
        "statuses": sorted(statuses),
        "tokens": n,
        "seconds": elapsed,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": latencies[-1] if n else None,
        "behind": behind,
    }


async def _connect(
    port: int, key: str, last_event_id: str | None
) -> tuple[SSEReader, asyncio.StreamWriter, int]:
    """Open ``key``; a reader that comes before its stream exists tries again, as a client
    would (the server starts each producer 20 ms before its first token)."""
    for retries in range(200):
        sse, writer = await open_stream(port, key, last_event_id=last_event_id)
        await sse.read_head()
        if sse.status == 200:
            return sse, writer, retries
        writer.close()
        await asyncio.sleep(0.01)  # a client's retry delay
    raise RuntimeError(f"{key}: status {sse.status} after 200 attempts")


async def _follow_planned(
    port: int, planned: dict[str, Any], t0: float, latencies: list[float]
) -> tuple[int, float, bool, int]:
    reader, count, detach_after = planned["reader"], planned["count"], planned["detach_after"]
    at = t0 + planned["start"] + (planned["attach"] if reader == "late" else 0.0)
    await asyncio.sleep(max(0.0, at - time.time()))  # the plan's schedule
    received, worst, ended, retries = 0, 0.0, False, 0
    last_id: str | None = None
    for leg in range(2):
        attached = time.time_ns()
        sse, writer, tries = await _connect(port, planned["key"], last_id)
        retries += tries
        try:
            while not ended and (blocks := await sse.next_events()) is not None:
                now = time.time_ns()
                for block in blocks:
                    stamp = token_stamp(block)
                    if stamp is None:
                        ended = ended or b"event: end" in block
                        continue
                    latency = (now - max(stamp, attached)) / 1e6
                    latencies.append(latency)
                    worst = max(worst, latency)
                    received += 1
                    last_id = event_id(block)
                    if leg == 0 and reader == "resume" and received == detach_after:
                        break
                else:
                    continue
                break  # drop the connection part-way
        finally:
            writer.close()
        if ended or reader != "resume" or received != detach_after:
            break
        await asyncio.sleep(planned["gap"])  # the client's reconnection delay
    return received, worst, ended and received == count, retries


async def follow_plan(port: int, plan: list[dict[str, Any]], t0: float, late_ms: float) -> Any:
    latencies: list[float] = []
    print("ready", flush=True)
    started = time.perf_counter()
    results = await asyncio.gather(*(_follow_planned(port, p, t0, latencies) for p in plan))
    elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)

    def pct(q: float) -> float | None:
        return latencies[max(0, math.ceil(n * q / 100) - 1)] if n else None

    return {
        "tokens": n,
        "seconds": elapsed,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": latencies[-1] if n else None,
        "behind": sum(1 for _, worst, complete, _ in results if not complete or worst > late_ms),
        "retries": sum(r for *_, r in results),
    }


def main() -> None:
    from ._support import raise_fd_limit

    raise_fd_limit()
    if sys.argv[1] == "plan":
        port, plan = int(sys.argv[2]), orjson.loads(Path(sys.argv[3]).read_bytes())
        t0, late_ms = float(sys.argv[4]), float(sys.argv[5])
        print(orjson.dumps(asyncio.run(follow_plan(port, plan, t0, late_ms))).decode(), flush=True)
        return
    port, streams, expected = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    late_ms = float(sys.argv[4]) if len(sys.argv) > 4 else 1000.0
    prefix = sys.argv[5] if len(sys.argv) > 5 else "streams"
    result = asyncio.run(follow_all(port, streams, expected, late_ms, prefix))
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()
