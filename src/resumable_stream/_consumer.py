"""StreamConsumer: an async iterator over a stream's events, live or replayed."""

from __future__ import annotations

import collections
from types import TracebackType
from typing import NoReturn, Self

from ._codec import decode_entry, encode_entry, parse_offset
from ._constants import DEFAULT_PAGE_SIZE
from ._events import ERROR, Event
from ._exceptions import InvalidOffset, OffsetExpired, StreamNotFound
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


class StreamConsumer:
    """Read the events of stream ``stream_id`` that come after offset ``after``.

    ``after=None`` starts at the first event. Iteration follows the stream live and stops
    after its terminal event (``end``, ``error`` or ``cancelled``). Raises
    :class:`StreamNotFound` for an unknown stream and :class:`OffsetExpired` when the events
    after ``after`` are no longer all retained; nothing is skipped silently.

    Breaking out of the loop or cancelling the task releases everything at once; call
    :meth:`aclose` (or use ``async with``) to release without finishing the loop.
    """

    def __init__(
        self,
        transport: Transport,
        stream_id: str,
        *,
        after: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        self.stream_id = check_stream_id(stream_id)
        self.transport = transport
        self.after = after
        position = None if after is None else parse_offset(after)
        self._epoch = 0 if position is None else position.epoch
        # Entries up to _seq are consumed; events up to _skip_to of entry _seq + 1 too.
        self._seq = 0 if position is None else position.seq - 1
        self._skip_to = -1 if position is None else position.event
        self._page_size = page_size
        self._events: collections.deque[Event] = collections.deque()
        self._info: StreamInfo | None = None
        self._subscription: Subscription | None = None
        self._finished = False
        self._gap = False
        self._caught_up = False

    @property
    def last_offset(self) -> str | None:
        """Offset of the last event returned (or the ``after`` given, before any)."""
        return self.after

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        events = self._events
        while not events:
            if self._finished:
                self._close_subscription()
                raise StopAsyncIteration
            try:
                await self._fill()
            except BaseException:
                self._close_subscription()
                raise
        event = events.popleft()
        self.after = event.offset
        if event.terminal:  # nothing follows: release now, even if the caller breaks here
            self._finished = True
            self._close_subscription()
        return event

    async def aclose(self) -> None:
        """Stop reading and release the live subscription."""
        self._finished = True
        self._events.clear()
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
        # A consumer dropped mid-stream without aclose() must not keep a live subscription.
        if getattr(self, "_subscription", None) is not None:
            self._close_subscription()

    def _close_subscription(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    async def _start(self) -> StreamInfo:
        info = await self.transport.info(self.stream_id)
        if info is None:
            raise StreamNotFound(self.stream_id)
        if self.after is None:
            self._epoch = info.epoch
        elif self._epoch != info.epoch:
            raise OffsetExpired(
                self.stream_id, self.after, "the stream was restarted since (another run)"
            )
        elif self._seq + 1 > info.last_seq:
            raise InvalidOffset(
                f"offset {self.after!r} is past the end of stream {self.stream_id!r}"
            )
        self._info = info
        return info

    async def _fill(self) -> None:
        """Put at least one event in the queue, or mark the stream finished."""
        info = self._info or await self._start()
        if (self._subscription is None and not self._caught_up) or self._gap:
            # Replay (or refill a gap in live delivery) from storage, a page at a time.
            entries = await self.transport.read(
                self.stream_id, self._epoch, self._seq, self._page_size
            )
            if not entries:
                info = await self._refresh()
                if self._seq < info.last_seq:
                    # Written since the read, or gone: read again, after the info.
                    entries = await self.transport.read(
                        self.stream_id, self._epoch, self._seq, self._page_size
                    )
                    if not entries:
                        self._expired("the events were trimmed or expired")
            if entries:
                self._take(entries, stored=True)
                # A short page reached the end of what is stored: follow the live feed from
                # here rather than poll storage once per entry while the producer writes.
                self._caught_up = len(entries) < self._page_size
                if not self._caught_up and self._subscription is not None:
                    self._gap = True  # a long gap: read on from storage, not the live feed
                return
            if info.status in FINAL_STATUSES:
                self._finished = True
                return
        if self._subscription is None:
            self._subscription = self.transport.subscribe(self.stream_id, self._epoch, self._seq)
        entries = await self._subscription.get(max_wait=max(info.lease_ms / 2000, 0.05))
        if self._finished:  # closed by aclose() from another task meanwhile
            return
        if entries:
            self._take(entries, stored=False)
            return
        # Quiet stream: is its producer still alive? A lapsed lease ends it with an error
        # event (written once, by whichever reader gets there first).
        if await self.transport.reap(self.stream_id, self._epoch, await self._lost_payload()):
            return
        info = await self._refresh()
        if info.last_seq > self._seq:
            # Stored entries this subscription never delivered (it joined a feed that had
            # already passed them): read them from storage.
            self._gap = True
        elif info.status in FINAL_STATUSES:
            self._finished = True

    async def _lost_payload(self) -> bytes:
        """The error a reaper writes: ``not_started`` for a reserved run whose only entry
        is still the reservation's (StreamProducer.reserve), else ``producer_lost``."""
        if self._seq > 1:
            return _LOST_PAYLOAD
        entries = await self.transport.read(self.stream_id, self._epoch, 0, 2)
        if len(entries) == 1 and entries[0].payload == RESERVED_PAYLOAD:
            return _NOT_STARTED_PAYLOAD
        return _LOST_PAYLOAD

    async def _refresh(self) -> StreamInfo:
        info = await self.transport.info(self.stream_id)
        if info is None or info.epoch != self._epoch:
            self._expired("the stream expired or was restarted")
        self._info = info
        return info

    def _take(self, entries: list[Entry], *, stored: bool) -> None:
        self._gap = False
        for entry in entries:
            if entry.epoch != self._epoch:
                self._expired("the stream was restarted since (another run)")
            if entry.seq <= self._seq:
                continue  # a repeat (subscriptions may overlap reads)
            if entry.seq != self._seq + 1:
                if stored:
                    self._expired("the events were trimmed or expired")
                self._gap = True  # live delivery skipped entries: the next _fill reads them
                return
            self._seq = entry.seq
            events = decode_entry(entry.payload, entry.epoch, entry.seq)
            if self._skip_to >= 0:
                if any(e.terminal for e in events[: self._skip_to + 1]):
                    self._finished = True
                events = events[self._skip_to + 1 :]
                self._skip_to = -1
            self._events.extend(events)

    def _expired(self, reason: str) -> NoReturn:
        raise OffsetExpired(self.stream_id, self.after, reason)
