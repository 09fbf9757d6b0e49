"""Token sources shared by the scenarios."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def tokens(seed: int, count: int) -> list[str]:
    """``count`` distinct-looking 4-character tokens."""
    return [f"{_ALPHABET[(seed + i) % 26]}{i % 1000:03d}" for i in range(count)]


async def burst(items: list[str], *, yield_every: int = 1) -> AsyncIterator[str]:
    """Hand out tokens as fast as the loop allows.

    ``yield_every=1`` lets the event loop run between tokens, as every real source does (an
    LLM client reading its socket, LangGraph's ``astream_events``); 0 never yields, so the
    whole list reaches the producer in one go.
    """
    for i, item in enumerate(items):
        if yield_every and i % yield_every == 0:
            await asyncio.sleep(0)
        yield item


class Pacer:
    """Paced tokens stamped with their send time; records how late each one was sent."""

    def __init__(self, rate: float, duration: float, clock: str = "perf") -> None:
        self.period = 1.0 / rate
        self.count = round(rate * duration)
        self.max_lag = 0.0
        self._clock_ns = time.perf_counter_ns if clock == "perf" else time.time_ns

    async def source(
        self, start: float, offset: float = 0.0, count: int | None = None
    ) -> AsyncIterator[str]:
        """``count`` tokens ``"<send time ns> "`` at ``start + offset + i * period`` (loop
        time); ``count`` defaults to the pacer's rate x duration."""
        loop = asyncio.get_running_loop()
        clock_ns = self._clock_ns
        for i in range(self.count if count is None else count):
            due = start + offset + i * self.period
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the pace of a model
            else:
                self.max_lag = max(self.max_lag, -delay)
            yield f"{clock_ns()} "
