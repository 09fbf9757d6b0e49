"""SSE clients for scenarios 3, 4 and 6, on raw asyncio streams (cheap enough for 1,000).

Run as ``python -m benchmarks._clients PORT STREAMS EXPECTED LATE_MS [PREFIX]``: connects to
``/<PREFIX>/fan-<i>`` for every i (``PREFIX`` is ``streams``, the router, or ``bare``, the
baseline endpoint), prints ``ready`` once all answered, reads every stream to its end event
and prints one JSON line of results. Latency is receipt time minus the send time each token carries
(``time.time_ns()`` in the server process).
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
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
        if b"transfer-encoding: chunked" not in head.lower():
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
    port: int, stream_id: str, prefix: str = "streams"
) -> tuple[SSEReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(
        f"GET /{prefix}/{stream_id} HTTP/1.1\r\nHost: bench\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    return SSEReader(reader), writer


def token_stamp(block: bytes) -> int | None:
    """The send time carried by a token event, or None for other events."""
    if b"\nevent: token\n" not in block:
        return None
    data = block[block.index(b"\ndata: ") + 7 :]
    return int(orjson.loads(data)["text"])


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


def main() -> None:
    from ._support import raise_fd_limit

    raise_fd_limit()
    port, streams, expected = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    late_ms = float(sys.argv[4]) if len(sys.argv) > 4 else 1000.0
    prefix = sys.argv[5] if len(sys.argv) > 5 else "streams"
    result = asyncio.run(follow_all(port, streams, expected, late_ms, prefix))
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()
