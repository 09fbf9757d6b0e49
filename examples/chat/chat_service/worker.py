"""Worker mode: API processes hand generation to worker processes through Redis.

    python -m chat_service worker        # as many as you like, next to WORKER_MODE=1 APIs

The message to answer is already durable in ``chat_runs`` (threads.py) when the API
enqueues; what travels through Redis is the *job* "answer the queue of thread T", as an entry
of a Redis Stream read by a consumer group (``XREADGROUP``). Consumer groups are Redis's own
at-least-once delivery: an entry stays pending until a worker acknowledges it (``XACK``),
and a worker reclaims (``XAUTOCLAIM``) entries left pending by a worker that died.

A worker acknowledges a job once it has answered the thread's queue to the end, holding the
thread's lock. While it answers, it keeps its entry fresh (``XCLAIM`` to itself), so only the
entries of dead workers go idle long enough to be reclaimed. A job that finds the thread busy
stays pending: the lock's holder answers that queue, and should it die, the job comes back.

An answer whose worker died is not restarted: the library's crash detection ends its stream
with ``error``/``producer_lost`` when the worker's lease lapses, and the next queued message
of the thread is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from typing import Any

from .runtime import Runtime, open_runtime
from .settings import Settings

logger = logging.getLogger("chat_service.worker")

GROUP = "workers"
#: Approximate cap on the jobs stream (entries, not pending ones, are trimmed).
MAX_JOBS = 100_000


class JobQueue:
    """The jobs stream ``<prefix>:jobs`` and its consumer group."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.key = f"{prefix}:jobs"

    async def setup(self) -> None:
        import redis.exceptions

        try:
            # From "0": jobs enqueued before the first worker ever started are delivered too.
            await self.client.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(self, thread_id: str) -> None:
        await self.client.xadd(
            self.key, {"thread_id": thread_id}, maxlen=MAX_JOBS, approximate=True
        )


class Worker:
    """Reads jobs and answers threads, ``settings.worker_concurrency`` at a time."""

    def __init__(self, runtime: Runtime, client: Any, *, name: str | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.client = client  # its own connection: XREADGROUP blocks it
        self.key = f"{self.settings.redis_prefix}:jobs"
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._slots = asyncio.Semaphore(self.settings.worker_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; then stop answering (the answers in flight end with
        an error telling their readers to retry) and leave unfinished jobs to other workers."""
        logger.info("worker %s reading %s", self.name, self.key)
        reclaim_ms = int(self.settings.worker_reclaim_idle * 1000)
        try:
            while not stop.is_set():
                await self._slots.acquire()
                self._slots.release()
                free = self._free_slots()
                _, claimed, _ = await self.client.xautoclaim(
                    self.key, GROUP, self.name, reclaim_ms, "0-0", count=free
                )
                entries = list(claimed)
                if len(entries) < free:
                    reply = await self.client.xreadgroup(
                        GROUP, self.name, {self.key: ">"}, count=free - len(entries), block=1000
                    )
                    for _, stream_entries in reply or []:
                        entries.extend(stream_entries)
                for entry_id, fields in entries:
                    if fields is None:
                        continue  # trimmed while pending
                    thread_id = _text(fields.get(b"thread_id") or fields.get("thread_id"))
                    await self._slots.acquire()
                    task = asyncio.create_task(self._handle(entry_id, thread_id))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            await self.runtime.runs.aclose()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _free_slots(self) -> int:
        return max(self.settings.worker_concurrency - len(self._tasks), 1)

    async def _handle(self, entry_id: Any, thread_id: str) -> None:
        runs = self.runtime.runs
        keeper = asyncio.create_task(self._keep_claimed(entry_id))
        try:
            drain = await runs.try_drain(thread_id)
            if drain is None:
                # Busy: its holder answers the queue. Left pending, the job comes back after
                # WORKER_RECLAIM_IDLE, in case that holder died before it could.
                return
            await asyncio.shield(drain)
            if runs.closing:
                return  # interrupted: leave the entry pending for another worker
            await self.client.xack(self.key, GROUP, entry_id)
        except Exception:
            logger.exception("job for thread %s failed; it will be retried", thread_id)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            self._slots.release()

    async def _keep_claimed(self, entry_id: Any) -> None:
        period = self.settings.worker_reclaim_idle / 3
        while True:
            await asyncio.sleep(period)  # the refresh period, well inside the reclaim idle time
            with contextlib.suppress(Exception):
                await self.client.xclaim(self.key, GROUP, self.name, 0, [entry_id], justid=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def serve_worker(settings: Settings) -> None:
    """Run one worker process until SIGINT or SIGTERM."""
    import redis.asyncio as aioredis

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with open_runtime(settings, role="worker") as runtime:
        client = aioredis.Redis.from_url(settings.redis_url or "")
        try:
            worker = Worker(runtime, client)
            print(f"chat worker {worker.name} ready (jobs: {worker.key})", flush=True)
            await worker.run(stop)
        finally:
            await client.aclose()
