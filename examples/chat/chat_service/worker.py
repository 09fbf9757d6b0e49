"""Worker mode on Celery: API processes queue answers, Celery workers write them.

    python -m chat_service worker        # scripts/chat worker: a Celery worker, Redis broker

When a message is accepted in worker mode, the API process records it (``chat_runs``),
reserves its answer's stream with ``StreamProducer.reserve()`` (readers can wait on it from
that moment) and sends the Celery task ``chat_service.answer`` with the run and the
reservation. A worker runs the task: it takes the thread's lock, continues the reserved run
with ``StreamProducer.start(..., reservation=...)`` and records the outcome (runs.py).

Delivery is Celery's: ``acks_late`` acknowledges a task when it returns, and
``task_reject_on_worker_lost`` puts a task back when its worker process is lost, so the
task of a dead worker is delivered again (with the Redis broker: once the
``visibility_timeout`` lapses, WORKER_VISIBILITY_TIMEOUT). A task delivered again does not
answer twice: the reserved run is started once (``StreamAlreadyRunning`` for the second),
and an answer cut by its worker's death has already ended with ``producer_lost`` (the
library's crash detection). If no worker starts an answer within ``WORKER_START_TIMEOUT``,
its readers get ``not_started``: on the defaults (visibility 3600 s, start 60 s) that is
what becomes of a task its dead worker had received but not started (README, worker mode).

``python -m chat_service worker`` supervises: the Celery worker runs in a child process,
replaced when it fails (``run_worker``).

Celery tasks are synchronous; the worker runs one asyncio event loop in a thread of its own
(the chat service's runtime lives there) and each task, on Celery's thread pool, waits for
its coroutine on that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from resumable_stream import Reservation

from .runtime import Runtime, open_runtime
from .settings import Settings
from .threads import RunRecord

logger = logging.getLogger("chat_service.worker")

ANSWER_TASK = "chat_service.answer"
T = TypeVar("T")


def celery_app(settings: Settings) -> Any:
    """The Celery app of the service: Redis broker, late acknowledgement, JSON only."""
    from celery import Celery

    app = Celery("chat_service", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One task at a time per worker thread: a task waiting in a prefetch buffer would
        # wait for a busy worker rather than go to an idle one.
        worker_prefetch_multiplier=1,
        task_default_queue=f"{settings.redis_prefix}.answers",
        broker_transport_options={
            "visibility_timeout": settings.worker_visibility_timeout,
            # How often workers look for tasks whose visibility timeout lapsed (kombu's
            # default scans about every 100 s).
            "unacked_restore_interval": max(1.0, min(10.0, settings.worker_visibility_timeout / 3)),
            "unacked_restore_throttle": 1,
            "global_keyprefix": f"{settings.redis_prefix}:celery:",
        },
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0.1},
    )
    return app


class CeleryQueue:
    """(API processes) Send the task of a run whose stream is reserved (runs.py)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = celery_app(settings)

    async def enqueue(self, run: RunRecord, reservation: Reservation) -> None:
        # kombu's publish is blocking I/O.
        await asyncio.to_thread(
            self.app.send_task, ANSWER_TASK, args=[run.thread_id, run.seq, str(reservation)]
        )

    def close(self) -> None:
        self.app.close()


class _Portal:
    """An event loop in a thread of its own, and the runtime opened on it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="chat-loop")
        self._stack = contextlib.AsyncExitStack()
        self.runtime: Runtime | None = None

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop; wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def open(self) -> Runtime:
        self._thread.start()
        self.runtime = self.call(self._open())
        return self.runtime

    async def _open(self) -> Runtime:
        return await self._stack.enter_async_context(open_runtime(self.settings, role="worker"))

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self.call(self._stack.aclose())
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join()
        self.loop.close()


#: Seconds before a failed Celery worker process is replaced; doubled after each failure in a
#: row (a process that ran ``HEALTHY_RUN`` seconds starts a new row), up to the maximum.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
HEALTHY_RUN = 60.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_worker(settings: Settings) -> None:
    """Run the Celery worker in a child process; replace it whenever it fails, until stopped.

    Why a child: Celery 5 / kombu 5 treat some broker errors as unrecoverable and stop the
    worker for good. A Redis restart while an answer is in flight is one: the consumer drops
    the lost connection, then kombu's Redis channel restores its unacknowledged tasks on a
    connection already released (``restore_unacked`` -> ``_connparams``: ``AttributeError:
    'NoneType' object has no attribute 'hostname'``). No setting avoids that path but
    ``ack_emulation=False``, which gives up the late acknowledgement tasks rely on. So this
    process only supervises: it starts the worker, and when the worker exits with an error
    (or dies of a signal) it logs why and starts a new one after a short backoff. SIGTERM or
    SIGINT stops it: the signal goes on to the worker (Celery's warm shutdown), and the worker
    is not replaced.
    """
    # fork: the child inherits the logging configuration, and this process starts no thread.
    context = multiprocessing.get_context("fork")
    stopping = False
    worker_pid: int | None = None

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if worker_pid is not None:
            # A second SIGTERM, if the worker had one from its process group, changes nothing.
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker_pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    delay = RESTART_DELAY
    try:
        while not stopping:
            worker = context.Process(target=_celery_worker, args=(settings,), name="worker")
            started = time.monotonic()
            # The signals wait until the worker's pid is known here, and the worker's own
            # handlers are in place there (it inherits the mask, not `stop`'s use of it).
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                worker.start()
                worker_pid = worker.pid
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            worker.join()
            worker_pid = None
            code = worker.exitcode
            if stopping or code == 0:
                return
            if time.monotonic() - started >= HEALTHY_RUN:
                delay = RESTART_DELAY
            why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            logger.error(
                "the Celery worker stopped (%s, its log is above); a new one starts in %.1f s",
                why,
                delay,
            )
            deadline = time.monotonic() + delay
            while not stopping and (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 0.1))
            delay = min(delay * 2, RESTART_DELAY_MAX)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _celery_worker(settings: Settings) -> None:
    """(The worker process) A Celery worker (threads pool, ``WORKER_CONCURRENCY`` threads)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    portal = _Portal(settings)
    runtime = portal.open()
    app = celery_app(settings)
    from celery import signals

    @app.task(name=ANSWER_TASK)  # type: ignore[untyped-decorator]
    def answer(thread_id: str, seq: int, reservation: str) -> str:
        """Answer run ``seq`` of a thread, continuing its reserved stream."""
        return portal.call(
            runtime.runs.answer_reserved(thread_id, seq, Reservation.parse(reservation))
        )

    # worker_main returns nothing, whatever the outcome: the exit code (0 after a warm
    # shutdown, 1 after an "Unrecoverable error") is the worker's, read as it stops.
    exitcode = 0

    @signals.worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def record_exitcode(sender: Any, **kwargs: Any) -> None:
        nonlocal exitcode
        exitcode = sender.exitcode or 0

    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={settings.worker_concurrency}",
                "--loglevel=INFO",
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
            ]
        )
    finally:
        # After a warm shutdown (SIGTERM) Celery has let the tasks in flight finish.
        portal.close()
    sys.exit(exitcode)
