"""A cap on the answers one user has in flight: ``MAX_ANSWERS_PER_USER``.

An answer is in flight from the moment it is accepted (queued) until its run is recorded
as ended. Chat answers (``/v1/chat/message``, regenerate, ``/api/chat``) are the user's
``chat_runs`` rows that are queued or started; a LangGraph run holds one of the user's
*LangGraph slots* (``user-<digest>-langgraph-<n>``, stream leases as the thread locks of
lock.py: a run of a process that died frees its slot once its lease lapsed).

The check and the start are one step: both happen holding the user's lock
(``user-<digest>-lock``, a :class:`~chat_service.lock.ThreadLock` on the transport), so a
burst of parallel requests gets exactly the cap, in every process sharing the transport
(Redis) and the database. At the cap, the user's chat answers whose writer died are
recorded as ended first (``reclaim``, RunService.settle_abandoned), then counted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from resumable_stream import (
    Reservation,
    ResumableStreamError,
    Run,
    StreamProducer,
    Transport,
)

from .lock import HeldLock, ThreadLock
from .settings import Settings
from .threads import ThreadStore

#: Seconds a client told ``too_many_answers`` waits before it tries again (Retry-After).
RETRY_AFTER = 5
#: The lock stream of a thread (lock.py's ``lock_id_for``): the stream of its LangGraph runs.
_THREAD_LOCK = re.compile(r"thread-(?P<thread_id>[A-Za-z0-9_-]{16,64})-lock")
#: The stream of a LangGraph run queued on a thread (``multitask_strategy`` ``enqueue``).
_QUEUED_RUN = re.compile(rf"{_THREAD_LOCK.pattern}~queued~[0-9a-f-]{{36}}")


class TooManyAnswers(Exception):
    """The user has ``limit`` answers in flight already."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"you have {limit} answers in progress, the most one user may have at once; "
            "retry once one of them has ended"
        )
        self.limit = limit


def _user_key(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:32]


def user_lock_id(owner: str) -> str:
    return f"user-{_user_key(owner)}-lock"


class AnswerQuota:
    """Admits a user's new answer while they have fewer than ``MAX_ANSWERS_PER_USER``.

    ``reclaim(owner, besides)``, called at the cap holding the user's lock, records the
    user's chat answers whose writer is gone as ended (else they count until a reader of
    each, or a restart of the process that died, does)."""

    def __init__(
        self,
        settings: Settings,
        producer: StreamProducer,
        store: ThreadStore,
        *,
        reclaim: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self.limit = settings.max_answers_per_user
        self.wait = settings.stream_lease * 3
        self.transport = producer.transport
        self.store = store
        self.reclaim = reclaim
        self.lock = ThreadLock(producer, lock_id=user_lock_id)
        self.slots = ThreadLock(producer, lock_id=lambda slot_id: slot_id)

    @contextlib.asynccontextmanager
    async def admit(self, owner: str, *, replacing: str = "") -> AsyncIterator[None]:
        """Holding the user's lock, raise :class:`TooManyAnswers` if the user is at the cap;
        else let the caller record its answer (a ``chat_runs`` row) before the next one looks.
        ``replacing``: a thread whose answers were just stopped (policy ``interrupt``),
        not counted."""
        async with self._locked(owner):
            await self._check(owner, besides=replacing)
            yield

    async def check(self, owner: str) -> None:
        """Raise :class:`TooManyAnswers` if the user is at the cap (taking nothing)."""
        async with self._locked(owner):
            await self._check(owner)

    async def take_langgraph_slot(self, owner: str) -> HeldLock:
        """A slot for a LangGraph run of ``owner``, held until the run ends (release it);
        raises :class:`TooManyAnswers` if the user is at the cap."""
        async with self._locked(owner):
            await self._check(owner)
            for slot_id in self._slot_ids(owner):
                held = await self.slots.try_acquire(slot_id)
                if held is not None:
                    return held
            raise TooManyAnswers(self.limit)  # (every slot taken: the cap, counted again)

    async def _check(self, owner: str, *, besides: str = "") -> None:
        """(Holding the user's lock) raise :class:`TooManyAnswers` if the user's answers in
        flight, chat answers (but thread ``besides``'s) and LangGraph runs, reach the cap,
        once those whose writer died are recorded as ended (``reclaim``)."""
        if await self._in_flight(owner, besides) < self.limit:
            return
        if self.reclaim is not None:
            await self.reclaim(owner, besides)
            if await self._in_flight(owner, besides) < self.limit:
                return
        raise TooManyAnswers(self.limit)

    async def _in_flight(self, owner: str, besides: str) -> int:
        chat = await self.store.answers_in_flight(owner, besides=besides)
        return chat + await self._langgraph(owner)

    @contextlib.asynccontextmanager
    async def _locked(self, owner: str) -> AsyncIterator[None]:
        try:
            held = await self.lock.acquire(owner, within=self.wait)
        except TimeoutError:
            # Only a long burst of one user's requests waits this long: more of the same.
            raise TooManyAnswers(self.limit) from None
        try:
            yield
        finally:
            await held.release()

    async def _langgraph(self, owner: str) -> int:
        """(Holding the user's lock) the user's LangGraph runs in flight."""
        live = 0
        for slot_id in self._slot_ids(owner):
            info = await self.transport.info(slot_id)
            if info is None or info.status != "running":
                continue
            held = await self.slots.try_acquire(slot_id)
            if held is None:
                live += 1
            else:
                await held.release()  # its holder died (its lease lapsed): free again
        return live

    def _slot_ids(self, owner: str) -> list[str]:
        key = _user_key(owner)
        return [f"user-{key}-langgraph-{n}" for n in range(self.limit)]


class LangGraphProducer(StreamProducer):
    """The producer of the ``/langgraph`` routes: a run on a thread's stream (its lock)
    takes one of the owner's LangGraph slots first (:class:`TooManyAnswers` at the cap),
    and gives it back when the run ends. A run queued on a thread is refused at the cap
    too, as it is asked for (it takes its slot once its turn comes)."""

    def __init__(
        self, transport: Transport, *, lease: float, quota: AnswerQuota, store: ThreadStore
    ) -> None:
        super().__init__(transport, lease=lease)
        self.quota = quota
        self.store = store
        self._releasing: set[asyncio.Task[None]] = set()

    async def start(
        self,
        source: AsyncIterable[Any],
        *,
        stream_id: str | None = None,
        events: Callable[[Any], Iterable[Any]] | None = None,
        reservation: Reservation | None = None,
    ) -> Run:
        queued = _QUEUED_RUN.fullmatch(stream_id or "")
        found = queued or _THREAD_LOCK.fullmatch(stream_id or "")
        thread = None if found is None else await self.store.get_thread(found["thread_id"])
        if thread is not None and queued is not None:
            await self.quota.check(thread.owner)  # nothing is queued at the cap
        if thread is None or queued is not None or reservation is not None:
            # Not a run (a queued run's waiter), or of no thread the service keeps.
            return await super().start(
                source, stream_id=stream_id, events=events, reservation=reservation
            )
        slot = await self.quota.take_langgraph_slot(thread.owner)
        try:
            run = await super().start(source, stream_id=stream_id, events=events)
        except BaseException:
            await slot.release()
            raise
        task = asyncio.create_task(_release_after(run, slot))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        return run


async def _release_after(run: Run, slot: HeldLock) -> None:
    """Give ``slot`` back once ``run`` has ended (completed, failed, stopped or fenced)."""
    try:
        with contextlib.suppress(ResumableStreamError):
            await run.wait()
    finally:
        await slot.release()
