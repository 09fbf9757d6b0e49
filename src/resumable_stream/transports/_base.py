"""The transport contract: what a storage backend must provide.

A transport stores streams of *entries*. An entry is an opaque ``payload`` (bytes) with a
sequence number ``seq``; the first entry of a run is 1 and each next one is exactly one more.
Each run of a stream id has an ``epoch``: an integer chosen by the transport when the run is
created, larger than any earlier epoch of that id and below 10**16 (offsets write it in 16
digits so that they compare as strings), so offsets from an earlier run are told apart.
Producers *own* a running stream through an ``owner`` token (a lease); every write checks
it, which fences a producer that lost its lease.

Implementations must be safe to use from many tasks of one event loop at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Literal, Self

from .._codec import format_offset
from .._constants import DEFAULT_SUBSCRIPTION_BUFFER, MAX_DURATION, TIMER_SLACK

Status = Literal["running", "completed", "error", "cancelled"]
FINAL_STATUSES: frozenset[str] = frozenset({"completed", "error", "cancelled"})


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One stored entry: a batch of encoded events. Fields are read by name."""

    epoch: int
    seq: int
    payload: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class StreamInfo:
    """What a transport knows about a stream, without reading its entries.

    A value type that may gain fields: read them by name, never by position.
    """

    stream_id: str
    epoch: int
    status: Status
    #: Unix time (seconds) the run was created and last written.
    created_at: float
    updated_at: float
    #: Sequence number of the last entry (0 before the first write) and its number of events.
    last_seq: int
    last_count: int
    #: Lease duration of the producer in milliseconds (consumers check for a lost producer
    #: at half this interval when the stream is quiet).
    lease_ms: int

    @property
    def last_offset(self) -> str | None:
        """Offset of the last event written, or None before the first event."""
        if self.last_seq == 0:
            return None
        return format_offset(self.epoch, self.last_seq, self.last_count - 1)


class Subscription(ABC):
    """Live entries of one stream, as returned by :meth:`Transport.subscribe`."""

    #: After an empty :meth:`get`: True if it answered a wake-up, False if it timed out;
    #: None if the subscription does not tell (the consumer then goes by the time taken).
    woke: bool | None = None

    @abstractmethod
    async def get(self, max_wait: float) -> list[Entry]:
        """Wait up to ``max_wait`` seconds for entries; return them (empty on timeout, or
        when the transport asks the reader to look at the stream again).

        Entries arrive in order. A subscription may repeat entries or skip some (for
        example when its buffer overflows); consumers check ``seq`` and fill gaps with
        :meth:`Transport.read`. Cancelling ``get`` must leave the subscription usable.
        """

    @abstractmethod
    def close(self) -> None:
        """Stop receiving entries. Idempotent; never blocks."""


def _nothing() -> None:
    """What :meth:`Transport.writing` returns by default."""


def resolver(future: asyncio.Future[None]) -> collections.abc.Callable[[Exception | None], None]:
    """A callback that ends ``future``: with None, or failing with the error given (the
    first call wins)."""

    def resolve(error: Exception | None = None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    return resolve


class QueueSubscription(Subscription):
    """A ready-made :class:`Subscription` fed by :meth:`push` (for transport authors)."""

    def __init__(self, on_close: collections.abc.Callable[[QueueSubscription], None]) -> None:
        self._entries: list[Entry] = []  # handed over whole by get(), a new one put in
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0  # when _timer fires (its when(), without the method call)
        self._on_close = on_close
        self._woken = False  # an empty push() not yet answered by an empty get()
        self.woke = False  # (it tells: set by each empty get())
        self.closed = False

    def push(self, entries: list[Entry]) -> None:
        """Deliver entries; drops the oldest beyond the buffer limit (readers refill gaps).

        ``push([])`` wakes the reader to look at the stream (its metadata and storage):
        its next :meth:`get` returns an empty list once the entries buffered are taken.
        """
        if not entries:
            self._woken = True
        buffered = self._entries
        buffered += entries
        if len(buffered) > DEFAULT_SUBSCRIPTION_BUFFER:
            del buffered[: len(buffered) - DEFAULT_SUBSCRIPTION_BUFFER]
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, max_wait: float) -> list[Entry]:
        if not self._entries:
            if self._waiter is not None:
                # A second waiter would replace the first, which then waits for ever.
                raise RuntimeError(
                    "this live subscription is already awaited: read a StreamConsumer from "
                    "one task at a time"
                )
            if self._woken:
                self._woken = False
                self.woke = True
                return []
            loop = asyncio.get_running_loop()
            deadline = self._deadline = loop.time() + max_wait
            waiter = self._waiter = loop.create_future()
            timer = self._timer
            if timer is None or self._timer_due > deadline:
                if timer is not None:
                    timer.cancel()  # a shorter wait than the one armed for
                self._timer = loop.call_at(deadline, self._on_timer)
                self._timer_due = deadline
            try:
                await waiter
            finally:
                self._waiter = None
            if not self._entries:
                self.woke = self._woken  # a wake-up answered, or the wait timed out
                self._woken = False
        entries = self._entries
        self._entries = []
        return entries

    def _on_timer(self) -> None:
        # One timer per subscription, re-armed lazily: a timer armed and cancelled on every
        # live event leaves thousands of dead handles in the loop's heap, which age into
        # the old GC generation and make full collections (tens of ms) frequent.
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        loop = asyncio.get_running_loop()
        if self._deadline - loop.time() > TIMER_SLACK:  # a later wait armed since
            self._timer = loop.call_at(self._deadline, self._on_timer)
            self._timer_due = self._deadline
        else:
            waiter.set_result(None)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)  # a get() waiting elsewhere returns at once
            self._on_close(self)


class Transport(ABC):
    """Storage for streams. Subclass it to add a backend (see docs/custom-transport.md).

    Settings shared by every transport:

    * ``retention``: seconds a finished stream stays readable;
    * ``tombstone``: seconds its metadata stays after that, so late readers get
      "expired" (``OffsetExpired``) rather than "not found";
    * ``running_ttl``: seconds a running stream lives without a heartbeat (a safety net
      against a key left behind; heartbeats extend it), never less than the run's lease:
      :meth:`create` and :meth:`renew` keep its data for ``max(running_ttl, lease)``;
    * ``max_entries``: approximate cap on entries kept per stream.

    A transport may set ``write_retry_budget`` (seconds) to the time its backend may need to
    recover from a fault, e.g. a Sentinel failover: producers retry a write failing with a
    transient :class:`TransportError` that long unless given their own budget. None (the
    default) leaves the producer's default.
    """

    #: Seconds producers should retry transient write failures; None: their default.
    write_retry_budget: float | None = None

    def __init__(
        self,
        *,
        retention: float,
        tombstone: float,
        running_ttl: float,
        max_entries: int,
    ) -> None:
        from .._exceptions import ConfigurationError

        # Written so that nan fails too. Bounded: Redis refused the milliseconds of a
        # duration of 1e17 seconds, so every run failed to start or to write its end.
        for name, value, least in (
            ("retention", retention, "> 0"),
            ("tombstone", tombstone, ">= 0"),
            ("running_ttl", running_ttl, "> 0"),
        ):
            if not ((value > 0 if least == "> 0" else value >= 0) and value <= MAX_DURATION):
                raise ConfigurationError(
                    f"{name} must be {least} and at most {MAX_DURATION:g} seconds, not {value!r}"
                )
        if not max_entries >= 1:
            raise ConfigurationError(f"max_entries must be >= 1, not {max_entries!r}")
        self.retention = retention
        self.tombstone = tombstone
        self.running_ttl = running_ttl
        self.max_entries = max_entries

    @abstractmethod
    async def create(self, stream_id: str, owner: str, lease_ms: int) -> StreamInfo:
        """Start a new run of ``stream_id`` owned by ``owner``; return its info.

        Discards whatever the id held before and picks a new epoch larger than the last
        one. Raises :class:`StreamAlreadyRunning` when the id is running under a lease that
        has not lapsed. A running id whose lease lapsed (a dead producer) is taken over.
        """

    @abstractmethod
    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        """Append ``entry`` (holding ``count`` events) to the run ``entry.epoch``.

        ``entry.seq`` must be the last seq + 1. Appending a seq that is already stored
        is a no-op, so a write whose reply was lost can be retried. A seq beyond the last
        seq + 1 means the storage lost entries it had acknowledged (a failover to a lagging
        replica): nothing is written and :class:`StorageRollback` is raised with the seq
        the storage now ends at, so the producer can write the lost entries again. A
        transport that can tell a run the storage lost whole from a deleted one (all its
        data gone) raises it with 0 for a seq past 1, and makes the run again (with this
        epoch and owner) for seq 1; a deleted run stays fenced (:class:`LeaseLost`). With
        ``final`` set, the run ends with that status: the owner can no longer write and the
        stream expires after ``retention``. Raises :class:`LeaseLost` if ``owner`` no longer
        owns the run, :class:`TransportError` for a fault a retry may fix (the producer
        retries within its write-retry budget) and :class:`BackendRefused` for one it will
        not (the run fails at once).
        """

    def append_soon(
        self,
        stream_id: str,
        owner: str,
        entry: Entry,
        count: int,
        done: collections.abc.Callable[[bool], None],
    ) -> bool:
        """Start appending a non-final ``entry`` without awaiting it; an optional fast path.

        Return False to decline (the default): the producer then awaits :meth:`append`.
        Having returned True, the transport calls ``done(True)`` once the entry is stored,
        or ``done(False)`` once, on any other outcome (refused, fenced, a fault, closed).
        It never calls ``done`` before returning. After ``done(False)`` the producer
        writes the same entry again with :meth:`append`, which reports the error; appends
        being idempotent per seq, that is safe whether or not the first one was stored.

        The producer uses it for the common case, one paced entry while nothing else of
        the run is being written: no task waits on the write (Redis answers it from its
        reply parser, with no event-loop turn per entry).
        """
        return False

    @abstractmethod
    async def renew(self, stream_id: str, owner: str, lease_ms: int) -> bool:
        """Extend the owner's lease by ``lease_ms`` (and the running stream's expiry).

        Returns True if a cancel was requested. Raises :class:`LeaseLost`, or
        :class:`StorageRollback` (``last_seq`` 0) if the storage lost the whole run but
        did not delete it (a failover): the producer then writes the run again, from
        entry 1, and the first entry makes it again (see :meth:`append`).
        """

    @abstractmethod
    async def request_cancel(self, stream_id: str) -> bool:
        """Ask the producer of a running stream, in any process, to stop.

        Returns False when the stream is not running. Wakes :meth:`wait_cancel`.
        """

    @abstractmethod
    async def wait_cancel(self, stream_id: str, epoch: int) -> None:
        """Return once a cancel of run ``epoch`` has been requested (in any process).

        Called once per run by its producer and cancelled when the run ends; must not
        cost a backend round trip per call beyond setup.
        """

    def writing(self, stream_id: str, epoch: int) -> collections.abc.Callable[[], None]:
        """Note that this process writes run ``epoch`` of ``stream_id`` from now on; return
        a function to call when it stops (whatever the ending).

        A hint, not a lock: the producer calls it for each run it writes. A transport may
        hand the entries it appends for that run to this process's readers directly,
        rather than through its backend's notifications (Redis does: no notice to receive
        and parse per entry). The default does nothing.
        """
        return _nothing

    def watch_cancel(
        self,
        stream_id: str,
        epoch: int,
        on_cancel: collections.abc.Callable[[Exception | None], None],
    ) -> collections.abc.Callable[[], None]:
        """Call ``on_cancel(None)`` once a cancel of run ``epoch`` is requested, or
        ``on_cancel(error)`` if the watch fails; return a function that stops watching.

        The producer watches each run through this and stops when the run ends; on a
        :class:`TransportError` it relies on its heartbeat (:meth:`renew`), any other
        error ends the run (``producer_failed``). The default runs :meth:`wait_cancel` in
        a task; a transport that can call back without one overrides this (Redis does).
        """

        def finished(task: asyncio.Task[None]) -> None:
            if task.cancelled():
                return
            error = task.exception()
            if error is None or isinstance(error, Exception):
                on_cancel(error)

        task = asyncio.create_task(
            self.wait_cancel(stream_id, epoch), name=f"rstream cancel {stream_id}"
        )
        task.add_done_callback(finished)

        def unwatch() -> None:
            task.cancel()

        return unwatch

    @abstractmethod
    async def info(self, stream_id: str) -> StreamInfo | None:
        """The stream's metadata, or None if it does not exist (or fully expired)."""

    @abstractmethod
    async def read(self, stream_id: str, epoch: int, after: int, limit: int) -> list[Entry]:
        """Up to ``limit`` stored entries of run ``epoch`` with ``seq > after``, in order.

        Never blocks for new entries. Returns fewer (or none) at the end, and also when the
        data expired or was trimmed: callers detect gaps by ``seq``.
        """

    @abstractmethod
    def subscribe(self, stream_id: str, epoch: int, after: int) -> Subscription:
        """Start delivering live entries of run ``epoch`` with ``seq > after``.

        Entries stored before the subscription took effect are delivered too, and a run
        deleted or replaced by then wakes the subscription (its first :meth:`~Subscription.get`
        returns empty): the reader read storage some time before subscribing, and no
        notice of a change made meanwhile will come.

        Readers in one process should share backend resources (one blocking read for
        all subscriptions); subscribing must not block.
        """

    @abstractmethod
    async def delete(self, stream_id: str) -> bool:
        """Remove the stream: entries and metadata. Returns False if it did not exist.

        A producer still writing it is asked to stop (as by :meth:`request_cancel`) and
        is fenced: its next write raises :class:`LeaseLost`. Readers of it end with
        ``OffsetExpired``; new readers get ``StreamNotFound``.
        """

    @abstractmethod
    async def reap(self, stream_id: str, epoch: int, payload: bytes) -> bool:
        """End run ``epoch`` with ``payload`` as its last entry if its producer is gone.

        Atomically: only if the run is still running and its lease has lapsed, append
        ``payload`` (one event) as the next entry, set status ``error`` and fence the old
        owner. Returns True if it did.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections and background tasks. Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def now() -> float:
    """Wall-clock time in seconds (what ``created_at`` / ``updated_at`` use)."""
    return time.time()
