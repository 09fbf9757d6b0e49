"""A thread's lock: per-thread mutual exclusion across processes, on stream leases.

Whoever answers a thread first takes the thread's *lock*, a second stream
``thread-<id>-lock`` whose run stays open while the lock is held. The library gives it the
properties a lock needs, in every process that shares the transport: ``start()`` raises
``StreamAlreadyRunning`` while a live holder renews its lease, takes over the id once a dead
holder's lease lapsed, and a reader of the lock stream wakes up when the holder releases it
(its ``end`` event) or dies (``error``/``producer_lost``).

The holder writes a *mark* (the number of the answer it started) into the lock stream; a
lock without a mark is held by a request still submitting its message (runs.py uses it to
make ``BUSY_POLICY=reject`` exact).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from resumable_stream import (
    ResumableStreamError,
    Run,
    StreamAlreadyRunning,
    StreamConsumer,
    StreamProducer,
    Transport,
)

#: Seconds a lock holder waits for its mark to be stored (it is, within a write).
MARK_TIMEOUT = 2.0


def lock_id_for(thread_id: str) -> str:
    return f"thread-{thread_id}-lock"


class Hold:
    """The lock run's source: yields the marks it is given, and ends once released."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self._marks: list[str] = []
        self._changed = asyncio.Event()

    def mark(self, text: str) -> None:
        self._marks.append(text)
        self._changed.set()

    def release(self) -> None:
        self.released.set()
        self._changed.set()

    def __aiter__(self) -> Hold:
        return self

    async def __anext__(self) -> str:
        while not self._marks:
            if self.released.is_set():
                raise StopAsyncIteration
            self._changed.clear()
            await self._changed.wait()
        return self._marks.pop(0)


@dataclass
class HeldLock:
    thread_id: str
    run: Run
    _hold: Hold = field(repr=False)

    async def answering(self, seq: int, transport: Transport) -> None:
        """Note in the lock stream that the holder started answer ``seq``, and wait until
        it is stored: a lock without a mark is held by a request that is still submitting
        its message (see RunService._lock_if_idle)."""
        self._hold.mark(str(seq))
        with contextlib.suppress(ResumableStreamError, TimeoutError):
            async with (
                asyncio.timeout(MARK_TIMEOUT),
                StreamConsumer(transport, self.run.stream_id, epoch=self.run.epoch) as consumer,
            ):
                async for event in consumer:
                    if event.type == "token" and event.data.get("text") == str(seq):
                        break

    async def release(self) -> None:
        self._hold.release()
        with contextlib.suppress(ResumableStreamError):
            await self.run.wait()


class ThreadLock:
    """Per-thread mutual exclusion across processes, on the library's stream leases.

    ``lock_id`` names the lock stream of a key (a thread id by default; quota.py locks
    users with it too)."""

    def __init__(
        self, producer: StreamProducer, lock_id: Callable[[str], str] = lock_id_for
    ) -> None:
        self.producer = producer
        self.lock_id = lock_id

    async def try_acquire(self, thread_id: str) -> HeldLock | None:
        hold = Hold()
        try:
            run = await self.producer.start(hold, stream_id=self.lock_id(thread_id))
        except StreamAlreadyRunning:
            return None
        return HeldLock(thread_id, run, hold)

    async def acquire(self, thread_id: str, within: float) -> HeldLock:
        """Wait up to ``within`` seconds for the lock; raises TimeoutError."""
        async with asyncio.timeout(within):
            while True:
                held = await self.try_acquire(thread_id)
                if held is not None:
                    return held
                # Reading the lock stream to its end waits for the holder to release it, or
                # (through the library's crash detection) for its lease to lapse.
                with contextlib.suppress(ResumableStreamError):
                    async for _ in StreamConsumer(self.producer.transport, self.lock_id(thread_id)):
                        pass

    async def marked_or_released(self, thread_id: str) -> None:
        """Wait until the holder of the thread's lock marks it or lets it go (released, or
        its lease lapsed after it died), whichever comes first."""
        with contextlib.suppress(ResumableStreamError):
            async with StreamConsumer(self.producer.transport, self.lock_id(thread_id)) as lock:
                async for event in lock:
                    if event.type == "token":
                        return
