"""StreamConsumer: an async iterator over a stream's events, live or replayed."""

from __future__ import annotations

import asyncio
import collections
import warnings
import weakref
from dataclasses import dataclass, field
from types import TracebackType
from typing import NoReturn, Self

from . import telemetry
from ._codec import decode_entry, encode_entry, parse_offset
from ._constants import (
    CONSUMER_CHECKPOINT,
    DEFAULT_MAX_ENTRY_BYTES,
    DEFAULT_PAGE_SIZE,
    PAGE_BYTES,
)
from ._events import ERROR, TERMINAL_TYPES, Event
from ._exceptions import ConfigurationError, InvalidOffset, OffsetExpired, StreamNotFound
from ._ids import check_stream_id
from ._producer import RESERVED_PAYLOAD
from .transports._base import FINAL_STATUSES, Entry, StreamInfo, Subscription, Transport

_NOT_STARTED_PAYLOAD = encode_entry(
    [
        (
            ERROR,
            {
                "error": "not_started",
                "message": "no producer started this reserved run within its start timeout",
            },
        )
    ]
)
_LOST_PAYLOAD = encode_entry(
    [
        (
            ERROR,
            {
                "error": "producer_lost",
                "message": "the producer stopped sending heartbeats (crashed or partitioned)",
            },
        )
    ]
)
# Errors written at the first offset past what the storage holds, which a reader may have
# already received holding other data (a reaped run after a failover, a producer whose
# storage rolled back): resuming after such an offset cannot tell them apart, so it expires.
_REWRITTEN_ERRORS = frozenset({"producer_lost", "storage_rollback"})
#: A live wait that returns empty this long before its end was woken, not timed out.
_WAKE_MARGIN = 0.001


def _ends(entry: Entry) -> bool:
    """Whether ``entry`` holds its run's terminal event (always an entry's last)."""
    events = decode_entry(entry.payload, entry.epoch, entry.seq)
    return bool(events) and events[-1].terminal


async def _lost_payload(transport: Transport, stream_id: str, epoch: int, seq: int) -> bytes:
    """The error a reaper writes: ``not_started`` for a reserved run whose only entry is
    still the reservation's (StreamProducer.reserve), else ``producer_lost``. ``seq``: an
    entry known to be stored (past 1, the run had started)."""
    if seq > 1:
        return _LOST_PAYLOAD
    entries = await transport.read(stream_id, epoch, 0, 2)
    if len(entries) == 1 and entries[0].payload == RESERVED_PAYLOAD:
        return _NOT_STARTED_PAYLOAD
    return _LOST_PAYLOAD


async def reap(transport: Transport, stream_id: str, epoch: int, seq: int) -> bool:
    """End run ``epoch`` of ``stream_id`` with its reaper's error if its producer's lease
    lapsed, as its readers do (see ``seq`` in :func:`_lost_payload`); true if it did."""
    payload = await _lost_payload(transport, stream_id, epoch, seq)
    if await transport.reap(stream_id, epoch, payload):
        telemetry.reaped("not_started" if payload is _NOT_STARTED_PAYLOAD else "producer_lost")
        return True
    return False


async def settled_info(transport: Transport, stream_id: str) -> StreamInfo | None:
    """The stream's info, once a running run whose producer is gone (its lease lapsed:
    killed, say) is ended as its readers end it (``producer_lost``): else it would read as
    running until its metadata expires, for a run nobody reads."""
    info = await transport.info(stream_id)
    if (
        info is not None
        and info.status == "running"
        and await reap(transport, stream_id, info.epoch, info.last_seq)
    ):
        info = await transport.info(stream_id)
    return info


@dataclass(eq=False)
class _Check:
    """The last check of a quiet stream, shared by its readers in this process."""

    at: float = float("-inf")
    info: StreamInfo | None = None
    waiter: asyncio.Future[StreamInfo | None] | None = field(default=None)


# Quiet-stream checks (reap, then info) by transport and (stream id, epoch): one per stream
# per process and interval, however many readers follow it (issue 9: 1,000 readers of a
# quiet stream cost ~800 Redis commands/s).
# Keyed by id(): a transport need not be hashable; the entry goes with the transport.
_CHECKS: dict[int, dict[tuple[str, int], _Check]] = {}


def _checks_of(transport: Transport) -> dict[tuple[str, int], _Check]:
    checks = _CHECKS.get(id(transport))
    if checks is None:
        checks = {}
        try:
            weakref.finalize(transport, _CHECKS.pop, id(transport), None)
        except TypeError:  # no weak references (__slots__): checks are not shared
            return checks
        _CHECKS[id(transport)] = checks
    return checks


class StreamConsumer:
    """Read the events of stream ``stream_id`` that come after offset ``after``.

    ``after=None`` starts at the first event of the stream's current run. ``epoch`` pins
    the run: ``StreamConsumer(transport, run.stream_id, epoch=run.epoch)`` reads the run
    just started by :meth:`StreamProducer.start` from its first event, and raises
    :class:`OffsetExpired` rather than serve a later run that replaced it meanwhile (a
    stream id used for run after run, such as a chat's).

    Iteration follows the stream live and stops after its terminal event (``end``,
    ``error`` or ``cancelled``). Raises :class:`StreamNotFound` for an unknown stream and
    :class:`OffsetExpired` when the events after ``after`` are no longer all retained, or
    when the storage lost events this reader had already received; nothing is skipped and
    nothing ends silently.

    ``page_size`` is the most entries read from storage at once when replaying; fewer
    when entries are large, so that a page holds about 1 MB of stored bytes. They are kept
    encoded and decoded one at a time, and the consumer yields to the event loop every few
    hundred events, so a long replay neither holds a whole stream in memory nor starves the
    other tasks.

    The terminal event, an error or cancelling the task releases everything at once. To
    stop earlier (``break``), use ``async with`` or call :meth:`aclose`: a consumer dropped
    while still following a stream is reported with a ``ResourceWarning``.
    """

    def __init__(
        self,
        transport: Transport,
        stream_id: str,
        *,
        after: str | None = None,
        epoch: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        if type(page_size) is not int or page_size < 1:
            raise ConfigurationError(f"page_size must be an int >= 1, not {page_size!r}")
        if epoch is not None and (type(epoch) is not int or epoch < 1):
            raise ConfigurationError(f"epoch must be a run's epoch (an int >= 1), not {epoch!r}")
        self.stream_id = check_stream_id(stream_id)
        self.transport = transport
        self.after = after
        position = None if after is None else parse_offset(after)
        if position is not None and epoch is not None and position.epoch != epoch:
            raise InvalidOffset(f"offset {after!r} is not an event of run {epoch}")
        # The run to read: the offset's, the one pinned, else the stream's current one.
        self._any_run = position is None and epoch is None
        self._epoch = position.epoch if position is not None else epoch or 0
        # Entries up to _seq are taken (queued or consumed); events up to _skip_to of entry
        # _seq + 1 were consumed before this consumer started.
        self._seq = 0 if position is None else position.seq - 1
        self._skip_to = -1 if position is None else position.event
        self._page_size = page_size
        # Entries of the next page: a few first (a page as large as page_size may be the
        # whole stream), then as many as PAGE_BYTES holds of entries the size of the last.
        self._page = min(page_size, max(1, PAGE_BYTES // DEFAULT_MAX_ENTRY_BYTES))
        self._entries: collections.deque[Entry] = collections.deque()
        # The events of the entry being handed out still to hand out, last first (pop()),
        # and how many it held (counted as delivered once all are handed out).
        self._events: list[Event] = []
        self._opened = 0
        self._budget = CONSUMER_CHECKPOINT
        self._info: StreamInfo | None = None
        # Seconds a live wait lasts before the stream is looked at (half the info's lease):
        # set with _info, not worked out per event.
        self._max_wait = 0.05
        self._subscription: Subscription | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished = False
        self._terminal_seen = False
        self._gap = False
        self._caught_up = False
        self._past_end = False  # the offset was past what the running stream had stored

    @property
    def last_offset(self) -> str | None:
        """Offset of the last event returned (or the ``after`` given, before any)."""
        return self.after

    def _at_hand(self) -> bool:
        """Whether ``__anext__`` would return at once: the next event is read already, or
        the stream has ended (it raises ``StopAsyncIteration``)."""
        return self._finished or bool(self._entries) or bool(self._events)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        self._budget -= 1
        if self._budget <= 0:
            # A checkpoint: buffered events and a transport that answers without waiting
            # (memory) would otherwise replay a long stream without ever yielding (issue 9).
            self._budget = CONSUMER_CHECKPOINT
            await asyncio.sleep(0)
        events = self._events
        while not events:
            if self._entries:
                try:
                    events = self._open(self._entries.popleft())
                except BaseException:  # (a rolled-back stream's OffsetExpired)
                    self._close_subscription()
                    raise
                continue
            if self._finished:
                self._close_subscription()
                raise StopAsyncIteration
            try:
                subscription, info = self._subscription, self._info
                if subscription is not None and info is not None and not self._gap:
                    # Following live, the usual wait: _fill()'s last step (_wait_live),
                    # inlined to save a coroutine per live event.
                    max_wait = self._max_wait
                    # (The time only for a subscription that does not say why it woke.)
                    began = (
                        (self._loop or asyncio.get_running_loop()).time()
                        if subscription.woke is None
                        else 0.0
                    )
                    entries = await subscription.get(max_wait=max_wait)
                    if self._finished:  # closed by aclose() from another task meanwhile
                        pass
                    elif (
                        len(entries) == 1
                        and (entry := entries[0]).seq == self._seq + 1
                        and entry.epoch == self._epoch
                    ):  # the next entry alone: _take()'s usual case
                        self._seq = entry.seq
                        self._gap = False
                        # Opened here, not queued for the loop to open: an entry that
                        # fails to open closes the subscription either way.
                        self._open(entry)
                    elif entries:
                        self._take(entries, stored=False)
                    else:
                        await self._quiet(subscription, info, began, max_wait)
                else:
                    await self._fill()
            except BaseException as exc:
                telemetry.failed(exc, "read")
                self._close_subscription()
                raise
            events = self._events
        event = events.pop()
        if not events:
            telemetry.counts.delivered += self._opened  # the entry is handed out
        self.after = event.offset
        if event.type in TERMINAL_TYPES:  # nothing follows: release now, even on a `break`
            self._terminal_seen = self._finished = True
            self._entries.clear()
            self._drop_events()
            self._close_subscription()
        return event

    async def aclose(self) -> None:
        """Stop reading and release the live subscription."""
        self._finished = True
        self._entries.clear()
        self._drop_events()
        self._close_subscription()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if getattr(self, "_events", None):  # left inside an entry (a `break`)
            self._drop_events()
        subscription = getattr(self, "_subscription", None)
        if subscription is None:
            return
        # Dropped mid-stream without aclose(): close on the loop's own thread (the garbage
        # collector may run anywhere, and transports are not thread-safe), then say so
        # (under -W error the warning raises: what it tells of is released first).
        self._subscription = None
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(subscription.close)
        telemetry.live(-1)
        warnings.warn(
            f"StreamConsumer of {self.stream_id!r} was dropped while following the stream: "
            "use 'async with' or call aclose() when leaving the loop early",
            ResourceWarning,
            stacklevel=2,
        )

    def _close_subscription(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
            telemetry.live(-1)

    def _drop_events(self) -> None:
        """Stop handing out the current entry's events (those handed count as delivered)."""
        if self._events:  # (an entry handed out in full is counted already)
            telemetry.delivered(self._opened - len(self._events))
            self._events = []

    def _open(self, entry: Entry) -> list[Event]:
        """Start handing out the events of ``entry``; return them, last first."""
        events = decode_entry(entry.payload, entry.epoch, entry.seq)
        skip = self._skip_to
        if skip >= 0:
            self._skip_to = -1
            skipped = events[: skip + 1]
            del events[: skip + 1]
            if len(skipped) <= skip:
                self._expired(
                    f"entry {entry.seq} holds {len(skipped)} events, fewer than this offset "
                    "names: the storage was rolled back (or the offset is not from this stream)"
                )
            first = skipped[0]
            if first.type == ERROR and first.data.get("error") in _REWRITTEN_ERRORS:
                self._expired(
                    f"the storage lost the events at this offset (rolled back) and entry "
                    f"{entry.seq} now ends the stream with {first.data.get('error')!r}"
                )
            if any(e.terminal for e in skipped):
                self._terminal_seen = self._finished = True
                self._entries.clear()
                return []
        opened = self._opened = len(events)
        if opened > 1:
            events.reverse()
        self._events = events
        return events

    async def _start(self) -> StreamInfo:
        info = await self.transport.info(self.stream_id)
        if info is None:
            raise StreamNotFound(self.stream_id)
        if self._any_run:
            self._epoch = info.epoch
        elif self.after is None:
            if self._epoch != info.epoch:
                raise OffsetExpired(
                    self.stream_id,
                    None,
                    f"it holds run {info.epoch} now, not run {self._epoch} (replaced, or expired)",
                )
        elif self._epoch > info.epoch:
            # Epochs only grow: no run of this stream issued this offset (issue 9: a
            # malformed offset, not one to reload from).
            raise InvalidOffset(
                f"offset {self.after!r} is from a run newer than stream {self.stream_id!r} has"
            )
        elif self._epoch != info.epoch:
            raise OffsetExpired(
                self.stream_id, self.after, "the stream was restarted since (another run)"
            )
        elif self._seq + 1 > info.last_seq and info.status != "running":
            if await self._ends_rewritten(info):
                self._expired(
                    f"the storage ends at entry {info.last_seq}, before this offset: it was "
                    "rolled back (lost events it had acknowledged)"
                )
            raise InvalidOffset(
                f"offset {self.after!r} is past the end of stream {self.stream_id!r}"
            )
        # An offset past the end of a running stream: the storage may have lost entries
        # this offset came from (a failover to a lagging replica) that the producer is
        # writing again (issue 8). Follow the stream until it reaches the offset; if it
        # ends short of it, _end_of_stream says the storage was rolled back.
        self._past_end = self._seq > info.last_seq
        self._info = info
        self._max_wait = max(info.lease_ms / 2000, 0.05)
        telemetry.consumer_started(resumed=self.after is not None)
        return info

    async def _ends_rewritten(self, info: StreamInfo) -> bool:
        """True if the stream ended with an error written past what the storage kept:
        offsets beyond its end were then real, and are lost rather than malformed."""
        if info.status != "error" or info.last_seq < 1:
            return False
        last = await self.transport.read(self.stream_id, info.epoch, info.last_seq - 1, 1)
        if not last:
            return False
        events = decode_entry(last[0].payload, last[0].epoch, last[0].seq)
        first = events[0] if events else None
        return (
            first is not None
            and first.type == ERROR
            and first.data.get("error") in _REWRITTEN_ERRORS
        )

    async def _fill(self) -> None:
        """Queue at least one entry, or mark the stream finished."""
        fresh = self._info is None
        info = self._info or await self._start()
        if fresh and info.status == "running" and info.last_seq <= self._seq:
            # The info, read just now, shows nothing after this reader (a reader attaching
            # as its run starts): a read would only find what the live subscription's first
            # fetch does. One round trip less per reader (issue 8).
            self._caught_up = True
        if (self._subscription is None and not self._caught_up) or self._gap:
            # Replay (or refill a gap in live delivery) from storage, a page at a time.
            count = self._page
            entries = await self.transport.read(self.stream_id, self._epoch, self._seq, count)
            if not entries and not (fresh and info.last_seq <= self._seq):
                # Unless the info, read just before, showed nothing after this reader.
                info = await self._refresh()
            if not entries and self._seq < info.last_seq:
                # Written since the read, or gone: read again, after the info.
                entries = await self.transport.read(self.stream_id, self._epoch, self._seq, count)
                if not entries:
                    self._expired("the events were trimmed or expired")
            if entries:
                self._take(entries, stored=True)
                # A short page reached the end of what is stored: follow the live feed from
                # here rather than poll storage once per entry while the producer writes.
                self._caught_up = len(entries) < count
                stored = sum(len(entry.payload) for entry in entries)
                fit = PAGE_BYTES * len(entries) // max(stored, 1)
                self._page = max(1, min(self._page_size, fit))
                if not self._caught_up and self._subscription is not None:
                    self._gap = True  # a long gap: read on from storage, not the live feed
                return
            self._gap = False
            if info.status in FINAL_STATUSES:
                self._end_of_stream(info)
                return
        if self._subscription is None:
            after = self._seq
            again = self._loop is not None  # subscribing again, after an error
            if after > info.last_seq and (self._past_end or again):
                # Subscribed at what is stored, not past it: a feed shared by the readers
                # in this process (Redis) starting past it would skip the entries up to
                # this offset for every one of them (they skip repeats; so does this one).
                # Past the end of a running stream (_start), or so says an info that may
                # be old by now (subscribing again): a fresh look first.
                if again:
                    info = await self._refresh()
                after = min(after, info.last_seq)
            self._past_end = False
            self._loop = asyncio.get_running_loop()
            self._subscription = self.transport.subscribe(self.stream_id, self._epoch, after)
            telemetry.live(+1)
        await self._wait_live(self._subscription, info)

    async def _wait_live(self, subscription: Subscription, info: StreamInfo) -> None:
        """Wait for the live subscription's next entries (inlined in __anext__)."""
        max_wait = self._max_wait
        # The loop's clock, as the subscription's timer: uvloop's counts whole milliseconds
        # and rounds its timers to them; time.monotonic() could take a timeout for a wake.
        began = (self._loop or asyncio.get_running_loop()).time()
        entries = await subscription.get(max_wait=max_wait)
        if self._finished:  # closed by aclose() from another task meanwhile
            return
        if entries:
            self._take(entries, stored=False)
            return
        await self._quiet(subscription, info, began, max_wait)

    async def _quiet(
        self, subscription: Subscription, info: StreamInfo, began: float, max_wait: float
    ) -> None:
        """The live subscription's wait returned nothing: woken to look at the stream, or
        the stream was quiet for ``max_wait`` seconds."""
        woke = subscription.woke
        if woke is None:  # a subscription that does not tell: returned before its time?
            loop = self._loop or asyncio.get_running_loop()
            woke = loop.time() - began < max_wait - _WAKE_MARGIN
        if woke:
            # Woken before its time: the transport asks this reader to look at the stream
            # (deleted, restarted, or stored past the live feed). A fresh look, not the
            # check another reader made up to half a lease ago.
            info = await self._refresh()
        else:
            # Quiet stream: is its producer still alive? A lapsed lease ends it with an
            # error event (written once, by whichever reader of the process gets there
            # first).
            info = await self._check_quiet(info)
        if info.last_seq > self._seq:
            # Stored entries this subscription never delivered (it joined a feed that had
            # already passed them, or the reaper just wrote one): read them from storage.
            self._gap = True
        elif info.status in FINAL_STATUSES:
            self._end_of_stream(info)

    def _end_of_stream(self, info: StreamInfo) -> None:
        """Nothing is stored after this reader's position and the stream ended."""
        if info.last_seq < self._seq:
            self._expired(
                f"the storage ends at entry {info.last_seq}, before entry {self._seq} this "
                "reader already received (the storage was rolled back, e.g. a failover to a "
                "replica that had not caught up)"
            )
        if not self._terminal_seen:
            # Final, yet the terminal event is not after this reader's position: it was
            # written at an offset the reader had received holding other data.
            self._expired(
                f"the stream ended ({info.status}) at entry {info.last_seq}, but this "
                "reader never received its terminal event: the storage lost events it had "
                "received (rolled back)"
            )
        self._finished = True

    async def _check_quiet(self, info: StreamInfo) -> StreamInfo:
        """Reap the run if its producer is gone, then refresh the info: shared by every
        reader of this stream in the process, at most once per half lease."""
        checks = _checks_of(self.transport)
        key = (self.stream_id, self._epoch)
        loop = asyncio.get_running_loop()
        interval = max(info.lease_ms / 2000, 0.05)
        check = checks.get(key)
        if check is not None:
            waiter = check.waiter
            if waiter is not None:
                task = asyncio.current_task()
                cancels = task.cancelling() if task is not None else 0
                try:
                    shared = await asyncio.shield(waiter)
                except asyncio.CancelledError:
                    # The reader checking was cancelled: this one checks itself, unless it
                    # was cancelled too (both at once: a task group or a server stopping).
                    if not waiter.cancelled() or (task is not None and task.cancelling() > cancels):
                        raise  # this reader was cancelled
                else:
                    return self._checked(shared)
            elif loop.time() - check.at < interval and check.info is not None:
                return self._checked(check.info)
        if len(checks) > 1000:  # forget the checks of streams nobody followed lately
            stale = loop.time() - 60
            for old in [k for k, c in checks.items() if c.waiter is None and c.at < stale]:
                del checks[old]
        waiter = loop.create_future()
        check = checks[key] = _Check(waiter=waiter)
        try:
            await reap(self.transport, self.stream_id, self._epoch, self._seq)
            fresh = await self.transport.info(self.stream_id)
        except BaseException as exc:
            if checks.get(key) is check:
                del checks[key]
            if isinstance(exc, Exception):
                waiter.set_exception(exc)
                waiter.exception()  # retrieved: the readers waiting on it raise it
            else:
                waiter.cancel()  # this reader was cancelled: the others check themselves
            raise
        check.waiter = None
        check.info, check.at = fresh, loop.time()
        waiter.set_result(fresh)
        return self._checked(fresh)

    def _checked(self, info: StreamInfo | None) -> StreamInfo:
        if info is None or info.epoch != self._epoch:
            self._expired("the stream expired or was restarted")
        self._info = info
        self._max_wait = max(info.lease_ms / 2000, 0.05)
        return info

    async def _refresh(self) -> StreamInfo:
        return self._checked(await self.transport.info(self.stream_id))

    def _take(self, entries: list[Entry], *, stored: bool) -> None:
        self._gap = False
        for entry in entries:
            if entry.epoch != self._epoch:
                if entry.epoch < self._epoch:
                    continue  # a late entry of a replaced run (issue 9): not ours
                self._expired("the stream was restarted since (another run)")
            if entry.seq <= self._seq:
                # A repeat (subscriptions may overlap reads), unless it ends the run: a
                # stream that ended below this reader (storage_rollback, producer_lost
                # after a rollback) is told now, not after a quiet wait of half a lease.
                if not stored and not self._entries and not self._events and _ends(entry):
                    self._gap = True  # read on from storage: _fill sees the end
                    return
                continue
            if entry.seq != self._seq + 1:
                if stored and not self._entries:
                    self._expired(
                        f"entries {self._seq + 1}-{entry.seq - 1} are no longer stored "
                        "(trimmed or expired)"
                    )
                # Deliver the contiguous prefix first; the next _fill reads on from storage
                # (and expires there if the entries are really missing).
                self._gap = True
                return
            self._seq = entry.seq
            self._entries.append(entry)

    def _expired(self, reason: str) -> NoReturn:
        raise OffsetExpired(self.stream_id, self.after, reason)
