"""Answers: start them in the background, one at a time per thread, stop them, recover them.

Each answer is a run of ``StreamProducer`` writing stream ``thread-<id>-<n>``, where ``n`` is
the answer's number in ``chat_runs`` (the durable job record, see threads.py). Readers find
the current answer through that table, and resume it with the stream's offsets.

One thread, one writer: whoever answers a thread takes its lock (lock.py). The lock holder
*drains* the thread: it answers the queued messages one after the other, oldest first, then
releases the lock and looks once more, so that a message queued while it was releasing is
not left behind. In worker mode each run is a Celery task instead (worker.py), which takes
the lock to answer it. What a run streams, and how it is recorded, is answers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver

from resumable_stream import (
    Event,
    Reservation,
    ReservationExpired,
    ResumableStreamError,
    Run,
    StreamAlreadyRunning,
    StreamConsumer,
    StreamProducer,
    Transport,
)

from .agent import Agent
from .answers import Answers, Recorder
from .cache import AnswerCache
from .events import (
    LOST,
    NOT_STARTED,
    PRODUCER_LOST,
    QUEUE_DOWN,
    SERVER_RESTARTED,
    SHUTDOWN,
    START_FAILED,
)
from .lock import HeldLock, Hold, ThreadLock, lock_id_for
from .quota import AnswerQuota
from .settings import BusyPolicy, Settings
from .threads import RunKind, RunRecord, RunState, Thread, ThreadStore

logger = logging.getLogger("chat_service.runs")


class ThreadBusy(Exception):
    """The thread is answering another message and the policy is ``reject``."""


class QueueUnavailable(Exception):
    """Worker mode: the task of a run could not be sent (the broker is down)."""


# --------------------------------------------------------------------------- runs


@dataclass
class Submitted:
    run: RunRecord
    #: True once the answer's stream exists; False while it waits for the thread (or a worker).
    started: bool


@dataclass
class _Active:
    """An answer this process is writing."""

    job: RunRecord
    run: Run
    recorder: Recorder


class RunService:
    """Starts, drains, stops and cleans up the answers of threads.

    With ``workers`` (worker mode), answers are written by Celery workers, one task per
    run (worker.py): ``enqueue`` (in API processes) reserves the run's stream and sends its
    task (the reservation is kept with the run, so that a stop in any API process ends
    the stream of a run no worker took yet), and :meth:`answer_reserved` (in workers)
    answers it. Every background task
    belongs to the service; :meth:`aclose` ends them.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        transport: Transport,
        producer: StreamProducer,
        store: ThreadStore,
        agent: Agent,
        checkpointer: BaseCheckpointSaver[Any],
        cache: AnswerCache | None,
        enqueue: Callable[[RunRecord, Reservation], Awaitable[None]] | None = None,
        workers: bool = False,
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.producer = producer
        self.store = store
        self.agent = agent
        self.checkpointer = checkpointer
        self.cache = cache
        self.enqueue = enqueue
        self.workers = workers
        self.lock = ThreadLock(producer)
        self.quota = AnswerQuota(settings, producer, store, reclaim=self.settle_abandoned)
        self.answers = Answers(settings, store=store, agent=agent, cache=cache)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    @property
    def stats(self) -> Counter[str]:
        """Counters for ``GET /info``: model runs, cache hits."""
        return self.answers.stats

    @property
    def closing(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._closing

    # -- public operations ---------------------------------------------------------------

    async def submit(
        self,
        thread: Thread,
        *,
        message: str | None,
        model: str,
        use_cache: bool = False,
        policy: BusyPolicy | None = None,
        kind: RunKind = "message",
    ) -> Submitted:
        """Queue a message on ``thread`` and get it answered as the busy policy says.

        ``kind="regenerate"`` (``message=None``) answers the thread's last question again,
        replacing its answer; ``kind="edit"`` replaces the last question (and its answer)
        with ``message``. Both rewind the thread's checkpoints when the run starts. Raises
        :class:`ThreadBusy` (policy ``reject``; or a regenerate or an edit while messages
        are queued), :class:`NothingToRetry`, :class:`ThreadGone` (the thread was deleted),
        or :class:`~chat_service.quota.TooManyAnswers` (the owner has MAX_ANSWERS_PER_USER
        answers in flight: nothing is queued).
        """
        policy = policy or self.settings.busy_policy
        held: HeldLock | None = None
        if self.workers:
            await self._settle_unanswered(thread.id)
        if policy == "reject":
            held = await self._lock_if_idle(thread.id)
            if held is None:
                raise ThreadBusy(thread.id)
        elif policy == "interrupt":
            await self.stop(thread.id)
        try:
            if (kind != "message" or message is None) and await self.store.runs(
                thread.id, "queued"
            ):
                # A regenerate or an edit acts on the last answer, and messages queued
                # before it have not been answered yet (policy `queue`): refused rather
                # than rewind the thread past answers still to come.
                raise ThreadBusy(thread.id)
            message, human_id, kind = await self.answers.question(thread.id, message, kind)
            # Checked and recorded holding the user's lock: a burst gets exactly the cap.
            replacing = thread.id if policy == "interrupt" else ""
            async with self.quota.admit(thread.owner, replacing=replacing):
                run = await self.store.add_run(
                    thread.id,
                    message=message,
                    model=model,
                    use_cache=use_cache,
                    human_id=human_id,
                    kind=kind,
                )
        except BaseException:
            if held is not None:
                await held.release()  # refused (nothing to retry, thread deleted...)
            raise
        if held is not None and self.workers:
            # Worker mode: a worker takes the lock to answer. Released only now that the
            # run is queued, so a second message sees it and is rejected.
            await held.release()
            held = None
        if self.workers:
            await self._enqueue(run)
            return Submitted(run, False)
        try:
            if held is None:
                return Submitted(run, await self.kick(thread.id))
            await self._begin(held)
        except ResumableStreamError as exc:
            # Recorded, but Redis failed as it was handed to a writer (the master of the
            # thread's lock died, say): nobody would answer it, and the thread would show
            # it answering for ever. Its readers are told start_failed, with Retry.
            logger.warning("answer %s could not be started: %s", run.stream_id, exc)
            await self._start_failed(run)
            return Submitted(run, False)
        return Submitted(run, True)

    async def _lock_if_idle(self, thread_id: str) -> HeldLock | None:
        """(Policy ``reject``) the thread's lock if nothing is answering it, else None.

        Exact within a process and across processes sharing the transport (issue 12): the
        lock is taken atomically, and held until the new run is recorded. A holder that has
        not marked the lock with the answer it started is a request still submitting its
        message, or a holder about to mark it: wait until it marks the lock or lets it go,
        then look. One whose answer's stream has ended is saving it (a client may see
        ``end`` first): wait for it rather than reject. Every wait ends on what the holder
        does (or on its lease lapsing, if it died), never on a timer that load can outrun.
        Without workers, the holder answers what the thread's queue holds first (a holder
        that died left it): the thread is busy only if that starts an answer.
        """
        seen = await self._run_count(thread_id)
        held = await self.lock.try_acquire(thread_id)
        if held is None:
            lock = await self.transport.info(lock_id_for(thread_id))
            if lock is not None and lock.status == "running" and lock.last_seq == 0:
                await self.lock.marked_or_released(thread_id)
                held = await self.lock.try_acquire(thread_id)  # let go, or its holder died
        if held is None:
            if await self._answering(thread_id):
                return None
            try:
                held = await self.lock.acquire(thread_id, within=self.settings.stream_lease * 2)
            except TimeoutError:
                return None
        if self.workers:
            for run in await self.store.runs(thread_id, "queued"):
                if await self._claimed(run):
                    # Holding the lock: the worker that started it died before marking it
                    # started (it held the lock meanwhile). Not a run to wait for.
                    await self._end_lost(run)
        else:
            # Holding the lock, the queue is ours to answer: a queued run was left by a
            # holder that died (recorded as lost if it had started it), or by one that let
            # the lock go as it was queued. The thread is busy only if an answer starts.
            try:
                active = await self._start_next(held)
            except BaseException:
                await held.release()
                raise
            if active is not None:
                self._spawn(self._drain(held, active))
                return None
        # Holding the lock: a queued run waits for a worker (worker mode), or was queued
        # since we answered the queue; either way the thread is not idle. A run added since
        # we looked is another request's that got the lock first (both waited for a holder
        # to finish).
        if await self._run_count(thread_id) != seen or await self.store.runs(thread_id, "queued"):
            await held.release()
            return None
        return held

    async def _run_count(self, thread_id: str) -> int:
        thread = await self.store.get_thread(thread_id)
        return -1 if thread is None else thread.run_seq

    async def _answering(self, thread_id: str) -> bool:
        """True while an answer of the thread is queued or its stream still running."""
        if await self.store.runs(thread_id, "queued"):
            return True
        for run in await self.store.runs(thread_id, "started"):
            info = await self.transport.info(run.stream_id)
            if info is not None and info.status == "running":
                return True
        return False

    async def _enqueue(self, run: RunRecord) -> None:
        if self.enqueue is None:
            raise RuntimeError("worker mode needs enqueue (API processes)")
        reservation: Reservation | None = None
        try:
            reservation = await self.producer.reserve(
                run.stream_id, start_timeout=self.settings.worker_start_timeout
            )
            await self.store.set_reservation(run.thread_id, run.seq, str(reservation))
            await self.enqueue(run, reservation)
        except Exception as exc:
            await self.store.settle_run(run.thread_id, run.seq, "failed", error=QUEUE_DOWN)
            if reservation is not None:
                # Its readers would wait WORKER_START_TIMEOUT for not_started: end it now,
                # as the run is recorded (a worker that got the task anyway finds it ended).
                # Within a lease: with Redis down, the end is written once it is back.
                with contextlib.suppress(ResumableStreamError, TimeoutError):
                    ended = await self.producer.start(_queue_down(), reservation=reservation)
                    async with asyncio.timeout(self.settings.stream_lease):
                        await ended.wait()
            raise QueueUnavailable(str(exc)) from exc

    async def kick(self, thread_id: str) -> bool:
        """Make sure somebody answers the thread's queued messages (not in worker mode:
        each run has its task).

        Returns True if this call started an answer in this process.
        """
        if self.workers:
            return False
        held = await self.lock.try_acquire(thread_id)
        if held is None:
            return False  # the holder drains the queue, and looks again after releasing
        return await self._begin(held) is not None

    async def try_drain(self, thread_id: str) -> asyncio.Task[None] | None:
        """(Workers) answer the thread's queue if nobody does; returns the task doing it."""
        held = await self.lock.try_acquire(thread_id)
        if held is None:
            return None
        return await self._begin(held)

    async def stop(self, thread_id: str, seq: int | None = None) -> bool:
        """Stop the answer in flight and drop the queued ones; True if there was any.

        With ``seq``, only answer ``seq``: stopped if in flight, dropped if queued (the
        answers queued behind it are answered in turn); nothing if it has ended, so a stop
        meant for an answer that just ended does not stop the next one.
        """
        dropped = await self.store.drop_queued(thread_id, seq)
        for run in dropped:
            # Worker mode: a run no worker took yet has a reserved stream its readers wait
            # on. End it as stopped now, not when a worker gets to the task (or never).
            reservation = await self.store.reservation(thread_id, run.seq)
            if reservation is not None:
                await self._end_reserved(Reservation.parse(reservation))
        stopped = False
        for run in await self.store.runs(thread_id, "started"):
            if seq is None or run.seq == seq:
                stopped |= await self.producer.cancel(run.stream_id)
        return stopped or bool(dropped)

    async def forget(self, thread_id: str, *, delete_thread: bool) -> None:
        """Stop the thread, then delete its checkpoints, its answers' streams and its runs
        (and the thread itself with ``delete_thread``), holding its lock meanwhile."""
        await self.stop(thread_id)
        held = await self.lock.acquire(thread_id, within=self.settings.stream_lease * 3)
        try:
            await self.checkpointer.adelete_thread(thread_id)
            runs = await self.store.runs(thread_id, "queued", "started", "done", "dropped")
            for run in runs:
                if run.state != "dropped":  # queued ones may have a reserved stream
                    await self._wipe_stream(run.stream_id)
            if delete_thread:
                await self.store.delete_thread(thread_id)
            else:
                for run in runs:
                    await self.store.set_run_state(thread_id, run.seq, "dropped")
        finally:
            await held.release()

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop answering: running answers end with ``cancelled`` (reason ``shutdown``);
        their drain tasks get ``grace`` seconds to record that, then are cancelled."""
        self._closing = True
        await self.producer.aclose()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- after a crash -------------------------------------------------------------------

    async def recover(self) -> None:
        """Settle the runs a dead process left unfinished; called once at start (issue 12).

        On embedded defaults the streams lived in the memory of the process that died:
        its queued and started runs fail at once with ``server_restarted``, which their
        readers get as the answer's error. With a shared transport (Redis), a run whose
        writer died ends with ``producer_lost`` once its lease lapses (the library's crash
        detection, which reading the stream to its end triggers): each unfinished run is
        watched in the background until its stream ends, then recorded, and a queue a dead
        holder left is answered.
        """
        if not self.settings.redis_url:
            failed = await self.store.fail_all(SERVER_RESTARTED, "queued", "started")
            if failed:
                logger.warning("%d answer(s) were lost when the server last stopped", failed)
            return
        queues: set[str] = set()
        for run in await self.store.unfinished_runs():
            if run.state == "started":
                self._spawn(self._settle(run))
            elif not self.workers and run.thread_id not in queues:
                queues.add(run.thread_id)
                self._spawn(self._resume_queue(run.thread_id))

    async def _settle(self, run: RunRecord) -> None:
        """Wait for the end of a started run's stream, wherever it is written; record it."""
        info = await self.transport.info(run.stream_id)
        if info is None:
            return  # another deployment's, or long expired: nothing to read
        last = None
        with contextlib.suppress(ResumableStreamError):
            async for event in StreamConsumer(self.transport, run.stream_id):
                last = event
        await self.settle_from_reader(run, last)

    async def settle_abandoned(self, owner: str, besides: str = "") -> None:
        """(The quota, holding the user's lock at the cap) Record the user's answers in
        flight (but thread ``besides``'s) whose writer is gone as their readers would: a
        process that died (killed, its node lost) left them started, counted until a reader,
        a submit on their thread or its restart settled them. A writer holds its thread's
        lock until the run is recorded: a run is abandoned once that lock is free (its
        holder's lease lapsed), never while a live writer holds it. A queued run waiting for
        its turn (or for a worker) is not, unless a writer started its stream, or (worker
        mode) no worker took it within WORKER_START_TIMEOUT. Each read to the end is bounded
        (:meth:`_end_lost`), and the threads are looked at all at once."""
        threads: dict[str, list[RunRecord]] = {}
        for run in await self.store.runs_in_flight(owner, besides=besides):
            threads.setdefault(run.thread_id, []).append(run)
        await asyncio.gather(*(self._settle_abandoned_of(runs) for runs in threads.values()))

    async def _settle_abandoned_of(self, runs: list[RunRecord]) -> None:
        """(settle_abandoned) One thread's runs in flight, oldest first."""
        for run in runs:
            if run.state == "queued" and not (
                await self._claimed(run)
                if self.workers
                else await self.transport.info(run.stream_id) is not None
            ):
                continue  # not started by a writer: waiting for its turn, or for a worker
            if not await self.settle_if_abandoned(run):
                break  # a live writer holds the thread's lock
        if self.workers and any(run.state == "queued" for run in runs):
            await self._settle_unanswered(runs[0].thread_id)

    async def settle_if_abandoned(self, run: RunRecord) -> bool:
        """Record run ``run``, which its writer started, as its readers are told if that
        writer is gone (:meth:`settle_abandoned`); True if it was. A writer holds its
        thread's lock until the run is recorded: while it lives this costs one attempt at
        that lock. Once the lock is free (its holder died, and its lease lapsed), the run is
        read to its end (within a lease or so: the library ends it with ``producer_lost``)
        and recorded."""
        held = await self.lock.try_acquire(run.thread_id)
        if held is None:
            return False
        await held.release()  # (before settling: a lost run's thread is kicked)
        await self._end_lost(run)
        if not self.workers and not self._closing:
            # A writer that ended just as we held its lock found it taken and left the
            # queue to us: look at it, as a lock holder does once it releases.
            await self.kick(run.thread_id)
        return True

    async def settle_from_reader(self, run: RunRecord, terminal: Event | None) -> None:
        """A reader saw the run's terminal event (``Event`` or None if it could not read
        one): record the run as its writer would (:func:`run_end`), in case the writer died
        before it could, so the thread shows no answer in progress. A live writer records
        the same end (after the reader, or before: then this records nothing)."""
        state, error = run_end(terminal)
        lost = False  # its writer died: kick the thread even if another reader recorded it
        if terminal is None or not terminal.terminal:
            only_from: tuple[RunState, ...] = ("started",)  # its stream could not be read
        elif error in (NOT_STARTED, QUEUE_DOWN):
            only_from = ("queued",)  # no worker started it
        elif error == PRODUCER_LOST:
            # Also a run still queued: its writer died after it started (claimed) the
            # stream, before it marked the run started. Nobody else will record it.
            only_from, lost = ("queued", "started"), True
        else:
            # Written by its writer, which records it, unless it died. Not from queued: a
            # writer marks the run started once its stream starts, and would take a run no
            # longer queued for one stopped meanwhile.
            only_from = ("started",)
        recorded = await self.store.settle_run(
            run.thread_id, run.seq, state, error=error, only_from=only_from
        )
        if (recorded or lost) and not self.workers and not self._closing:
            # Messages queued behind it. (A live writer holds the thread's lock, and answers
            # them itself: this finds the lock taken.)
            await self.kick(run.thread_id)

    # -- worker mode ---------------------------------------------------------------------

    async def answer_reserved(self, thread_id: str, seq: int, reservation: Reservation) -> str:
        """(Celery task) Answer run ``seq`` of a thread, continuing its reserved stream.

        Returns what happened, for the worker's log. A task delivered again after its
        worker died finds the run started (or ended) and does nothing: the library has
        ended that answer with ``producer_lost``. If that worker died as it started the
        run, before recording it, the run is still queued: this records it as lost.
        """
        job = await self.store.get_run(thread_id, seq)
        if job is None or job.state != "queued":
            return await self._not_answering(job, reservation)
        try:
            held = await self._lock_in_turn(thread_id, seq)
        except TimeoutError:
            return "the thread stayed busy: the answer's readers get not_started"
        # Marked at once: this holder is not a request still submitting (see submit).
        await held.answering(seq, self.transport)
        try:
            for lost in await self.store.runs(thread_id, "started"):
                # We hold the lock: a run still started lost its worker, and nobody read it
                # to its end (which records it). Recorded here, or the thread would show
                # it in flight (hiding the answers after it) until somebody reads it.
                await self._end_lost(lost)
            job = await self.store.get_run(thread_id, seq)  # stopped while waiting?
            if job is None or job.state != "queued":
                return await self._not_answering(job, reservation)
            active = await self._start(job, reservation=reservation)
            if active is None:
                return "not started"
            await self._finish(active)
            return "answered"
        finally:
            await held.release()

    async def reservation_lost(self, run: RunRecord) -> bool:
        """(Worker mode) True if queued run ``run`` lost its reserved stream, and its task
        with it (Redis restarted without its data, say): no worker will start it, and no
        ``not_started`` will come (its start timeout lived in that stream). Recorded as
        failed (``queue_unavailable``), as its readers are told, so that the thread does not
        wait for it."""
        if not self.workers or await self.store.reservation(run.thread_id, run.seq) is None:
            return False  # not reserved yet: its stream exists once its reservation is kept
        if await self.transport.info(run.stream_id) is not None:
            return False
        return await self.store.settle_run(
            run.thread_id, run.seq, "failed", error=QUEUE_DOWN, only_from=("queued",)
        )

    async def _settle_unanswered(self, thread_id: str) -> None:
        """(Worker mode) Record the thread's queued runs that no worker will answer, as
        their readers are told: Redis lost their task (:meth:`reservation_lost`), or no
        worker started them within WORKER_START_TIMEOUT (``not_started``). (A run a worker
        started and died in is the lock's: its lease lapses, see :meth:`_lock_if_idle`.)
        A reader of the answer records that as it reads the end; with none (its tab
        closed), the thread showed the run in flight for good, and refused a new message
        or a retry."""
        for run in await self.store.runs(thread_id, "queued"):
            if await self.reservation_lost(run):
                continue
            if await self.store.reservation(run.thread_id, run.seq) is None:
                continue  # not reserved yet: its request is still sending its task
            info = await self.transport.info(run.stream_id)
            if info is None or (
                info.status == "running"
                # Started by a worker (entry 2 is its claim), or still within its start
                # timeout: a worker may yet answer it.
                and (
                    info.last_seq > 1
                    or time.time() - info.created_at < self.settings.worker_start_timeout
                )
            ):
                continue
            # Reading it to its end ends a lapsed reservation with not_started (the
            # library's crash detection, within half a lease), and records it.
            await self._end_lost(run)

    async def _lock_in_turn(self, thread_id: str, seq: int) -> HeldLock:
        """The thread's lock, once the thread's older queued runs were answered: the tasks
        of one thread may run on several worker threads at once, and wait for the lock in
        no particular order. Raises TimeoutError after WORKER_START_TIMEOUT."""
        async with asyncio.timeout(self.settings.worker_start_timeout):
            while True:
                held = await self.lock.acquire(thread_id, within=self.settings.worker_start_timeout)
                older = [r for r in await self.store.runs(thread_id, "queued") if r.seq < seq]
                if not older:
                    return held
                await held.release()
                if await self.reservation_lost(older[0]):
                    continue  # Redis lost its task: no worker answers it (as readers are told)
                # Wait for the oldest to be answered: its reserved stream ends.
                last: Event | None = None
                with contextlib.suppress(ResumableStreamError):
                    async for event in StreamConsumer(self.transport, older[0].stream_id):
                        last = event
                info = await self.transport.info(older[0].stream_id)
                if info is None or info.status != "running":
                    # Ended while still queued: its worker died after starting it, before
                    # marking it started (producer_lost); or no worker took it (not_started),
                    # or it was deleted. Recorded, so that it is not waited for again.
                    await self.settle_from_reader(older[0], last)
                    await self.store.settle_run(
                        thread_id, older[0].seq, "failed", error=NOT_STARTED, only_from=("queued",)
                    )

    async def _claimed(self, run: RunRecord) -> bool:
        """True if queued run ``run``'s reserved stream was started by a worker and is
        still running (the worker records the run started right after)."""
        if await self.store.reservation(run.thread_id, run.seq) is None:
            return False
        info = await self.transport.info(run.stream_id)
        # Entry 1 is the reservation's, entry 2 the claim: an unclaimed run ends (not_started)
        # rather than gain a second entry while running.
        return info is not None and info.status == "running" and info.last_seq >= 2

    async def _end_lost(self, run: RunRecord) -> None:
        """Read the run a dead writer left to its end, so that the library ends it with
        ``producer_lost`` for its readers, and record how it ended (:func:`run_end`: its
        writer may have died after writing its end, before recording it)."""
        await self.settle_from_reader(run, await self._read_to_end(run))

    async def _start_failed(self, run: RunRecord) -> None:
        """Record queued run ``run``, whose stream could not be started, as failed with
        ``start_failed``: its readers are told so (there is no stream to read), and the
        thread shows it with Retry."""
        if await self.store.settle_run(
            run.thread_id, run.seq, "failed", error=START_FAILED, only_from=("queued",)
        ):
            await self.store.update_thread(run.thread_id)

    async def _not_answering(self, job: RunRecord | None, reservation: Reservation) -> str:
        if job is not None and job.state == "dropped":
            # Stopped before a worker got to it (the stop ended its stream, unless it came
            # before the reservation was recorded): end its reserved stream as stopped.
            await self._end_reserved(reservation)
        return f"nothing to do: the run is {job.state if job else 'deleted'}"

    async def _end_reserved(self, reservation: Reservation) -> None:
        """End a reserved run no worker started as stopped (readers get ``cancelled``);
        nothing if it was started, or has ended."""
        with contextlib.suppress(ResumableStreamError):
            run = await self.producer.start(Hold(), reservation=reservation)
            await run.cancel()

    async def _resume_queue(self, thread_id: str) -> None:
        if await self.transport.info(lock_id_for(thread_id)) is None:
            # Not a thread this deployment answered (its lock stream is not ours): a
            # database may be shared by deployments with other Redis prefixes.
            return
        try:
            held = await self.lock.acquire(thread_id, within=self.settings.stream_lease * 3)
        except TimeoutError:
            return  # a live holder has it, and answers the queue
        await self._begin(held)

    # -- draining ------------------------------------------------------------------------

    async def _begin(self, held: HeldLock) -> asyncio.Task[None] | None:
        """With the lock held: start the next queued answer (its stream exists on return),
        and leave the rest of the queue to a background task."""
        try:
            active = await self._start_next(held)
        except BaseException:
            await held.release()
            raise
        if active is None:
            await held.release()
            return None
        return self._spawn(self._drain(held, active))

    async def _drain(self, held: HeldLock, active: _Active) -> None:
        thread_id = held.thread_id
        try:
            next_active: _Active | None = active
            while next_active is not None:
                await self._finish(next_active)
                if self._closing:
                    return
                next_active = await self._start_next(held)
        finally:
            await held.release()
        if not self._closing and await self.store.runs(thread_id, "queued"):
            await self.kick(thread_id)

    async def _start_next(self, held: HeldLock) -> _Active | None:
        """Start the oldest queued message. A run still marked started belongs to a holder
        that died (we hold the lock now): end its stream and record it first."""
        thread_id = held.thread_id
        for stale in await self.store.runs(thread_id, "started"):
            await self._end_orphan(stale)
        for job in await self.store.runs(thread_id, "queued"):
            if await self.transport.info(job.stream_id) is not None:
                await self._end_orphan(job)  # started by a holder that died before marking it
                continue
            active = await self._start(job)
            if active is not None:
                await held.answering(job.seq, self.transport)
                return active
        return None

    async def _end_orphan(self, job: RunRecord) -> None:
        """(Holding the thread's lock) Record a run a holder that died left started, or
        queued with its stream started, as its readers are told: reading its stream to the
        end makes the library end it with ``producer_lost`` once the dead writer's lease
        has lapsed; or with the end the writer wrote before it could record it
        (:func:`run_end`). The thread is not kicked: the drain holding its lock goes on."""
        state, error = run_end(await self._read_to_end(job))
        # Not over what a reader recorded meanwhile, nor over a stop (dropped).
        await self.store.settle_run(
            job.thread_id, job.seq, state, error=error, only_from=("queued", "started")
        )

    async def _read_to_end(self, run: RunRecord) -> Event | None:
        """The last event of a run's stream (one a dead writer left, or one that ended in
        error), read to its end (at most three leases); None if it could not be read."""
        last = None
        with contextlib.suppress(ResumableStreamError, TimeoutError):
            async with asyncio.timeout(self.settings.stream_lease * 3):
                async for event in StreamConsumer(self.transport, run.stream_id):
                    last = event
        return last

    async def _start(
        self, job: RunRecord, *, reservation: Reservation | None = None
    ) -> _Active | None:
        recorder = Recorder(stopped=lambda: self._stopped(job.stream_id))
        source = self.answers.source(job, recorder)
        try:
            if reservation is None:
                run = await self.producer.start(source, stream_id=job.stream_id)
            else:
                run = await self.producer.start(source, reservation=reservation)
        except StreamAlreadyRunning:
            if reservation is None:
                raise
            # Started by another delivery of its task, which held the thread's lock until
            # it marked the run started, and we hold it now with the run still queued: that
            # worker died in between. Its stream ends with producer_lost: record that.
            await self._end_lost(job)
            return None
        except ReservationExpired:
            # Its readers were told not_started, or producer_lost if a worker that died
            # had started it (or the stream is gone): record that.
            await self._end_lost(job)
            await self.store.settle_run(
                job.thread_id, job.seq, "failed", error=NOT_STARTED, only_from=("queued",)
            )
            return None
        except ResumableStreamError:
            logger.exception("could not start answer %s", job.stream_id)
            if reservation is not None:
                # Redis failed the claim: the run stays queued, and is recorded as its
                # readers are told once its reservation lapses (not_started; producer_lost
                # if the claim landed), by a reader, the thread's next message or answer.
                return None
            # Recorded done, it showed the question answered with no answer, and Retry
            # was refused (409 nothing_to_retry).
            await self._start_failed(job)
            return None
        if not await self.store.settle_run(
            job.thread_id, job.seq, "started", only_from=("queued",)
        ):
            # Stopped (dropped) or deleted since we looked: that stop found nothing started
            # to cancel, so the answer is stopped here (its readers get `cancelled`).
            await run.cancel()
            return None
        return _Active(job, run, recorder)

    async def _finish(self, active: _Active) -> None:
        job, run, recorder = active.job, active.run, active.recorder
        try:
            status = await run.wait()
        except ResumableStreamError as exc:
            # Fenced (its stream was deleted, or the run declared lost while it stalled), or
            # Redis refused or stayed away: its readers get (or got) producer_lost, and so
            # does the thread, as after a crash. (A stream Redis lost, restarted without its
            # data, is written again by the run from its window.)
            logger.warning("answer %s lost its stream: %s", job.stream_id, exc)
            await self.store.settle_run(job.thread_id, job.seq, "failed", error=PRODUCER_LOST)
            await self.store.update_thread(job.thread_id)
            return
        if status == "cancelled" and self._closing:
            # Cut by this server's shutdown: its readers get an error (`shutdown`, with
            # Retry), and so does the thread, rather than a stopped answer.
            await self.store.settle_run(job.thread_id, job.seq, "failed", error=SHUTDOWN)
            await self.store.update_thread(job.thread_id)
            return
        if status == "error":
            # The model's error (done: its stream holds it), or the storage's: Redis lost
            # part of the stream past what the run could write again (storage_rollback).
            # Recorded as its readers are told, from its end (read only on an error).
            state, error = run_end(await self._read_to_end(job))
            if state == "failed":
                await self.store.settle_run(job.thread_id, job.seq, state, error=error)
                await self.store.update_thread(job.thread_id)
                return
        if status == "completed" and job.use_cache and not recorder.cached:
            try:
                await self.answers.cache_put(job, recorder)
            except Exception:
                logger.exception("answer %s: could not cache it", job.stream_id)
        await self.store.set_run_state(job.thread_id, job.seq, "done")
        await self.store.update_thread(job.thread_id)

    async def _stopped(self, stream_id: str) -> bool:
        """(A run being cancelled) True if it was stopped: not cut by this server's shutdown
        (_finish records that as an error), nor by the loss of its stream (then it is no
        longer there and running: its terminal event is not written yet)."""
        if self._closing:
            return False
        try:
            info = await self.transport.info(stream_id)
        except ResumableStreamError:
            return False
        return info is not None and info.status == "running"

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception())

    async def _wipe_stream(self, stream_id: str) -> None:
        """Delete an answer's stream (a run still writing it is stopped and fenced)."""
        await self.transport.delete(stream_id)


def run_end(last: Event | None) -> tuple[RunState, str | None]:
    """How a run that ended with ``last`` (its stream's last event, None if it could not be
    read) is recorded, (state, error), wherever its end is noticed: as its writer records it
    (``RunService._finish``), and as its readers are told. A run that lost its writer or its
    stream (``producer_lost``, or no end) fails, as does one cut by its server's shutdown
    (``shutdown``), one whose stream could not be started (``start_failed``), one whose
    stream Redis lost beyond what its writer could write again (``storage_rollback``), one
    lost with its server's memory (``server_restarted``) and, in worker mode, one no worker
    started (``not_started``, ``queue_unavailable``): each with Retry. Any other end is
    ``done``: complete, stopped, or an error of its own (the model's), which its stream
    holds."""
    if last is None or not last.terminal:
        return "failed", PRODUCER_LOST
    if last.type == "cancelled":
        return ("failed", SHUTDOWN) if last.data.get("reason") == "shutdown" else ("done", None)
    code = last.data.get("error") if last.type == "error" else None
    if code in LOST:
        return "failed", code
    return "done", None


async def _queue_down() -> AsyncIterator[dict[str, Any]]:
    """The source of a reserved run whose task could not be queued: its end."""
    yield {"type": "error", "data": {"error": QUEUE_DOWN, "message": "the task was not queued"}}
