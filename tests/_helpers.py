"""Small helpers shared by the core tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from resumable_stream import Event, StreamConsumer, Transport


async def tokens(
    n: int, *, every: int = 50, pause: asyncio.Event | None = None
) -> AsyncIterator[str]:
    """``n`` distinct tokens; yields to the loop every ``every`` tokens, waits on ``pause``."""
    for i in range(n):
        if pause is not None and i == n // 2:
            await pause.wait()
        yield f"t{i} "
        if i % every == 0:
            await asyncio.sleep(0)


def text_of(n: int) -> str:
    return "".join(f"t{i} " for i in range(n))


async def collect(transport: Transport, stream_id: str, after: str | None = None) -> list[Event]:
    return [event async for event in StreamConsumer(transport, stream_id, after=after)]


def joined(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.type == "token")


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Poll an external condition (a TTL, another process) until it holds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)  # polling an external clock/process, not task state
