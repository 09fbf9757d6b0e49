"""In-process transport: the embedded default and a test double.

Streams live in this process only; share the transport object between producer and
consumers. Expiry follows the same rules as Redis (checked lazily on access).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .._constants import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_RETENTION,
    DEFAULT_RUNNING_TTL,
    DEFAULT_TOMBSTONE,
)
from .._exceptions import LeaseLost, StorageRollback, StreamAlreadyRunning, TransportClosed
from ._base import (
    Entry,
    QueueSubscription,
    Status,
    StreamInfo,
    Subscription,
    Transport,
    now,
    resolver,
)


@dataclass(eq=False)
class _Stream:
    epoch: int
    owner: str
    lease_ms: int
    lease_until: float
    created_at: float
    updated_at: float
    data_until: float
    meta_until: float
    status: Status = "running"
    # The payloads of entries first_seq, first_seq + 1, ...: bytes, which the garbage
    # collector does not track (an Entry object per stored entry made young collections
    # three times as frequent as with Redis; issue 11). Entries are built when read.
    payloads: list[bytes] = field(default_factory=list)
    first_seq: int = 1
    last_count: int = 0
    cancelled: bool = False
    # What watch_cancel() calls once a cancel is requested (a callback, not a task per run).
    watchers: list[Callable[[Exception | None], None]] = field(default_factory=list)
    subscribers: set[QueueSubscription] = field(default_factory=set)

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.payloads) - 1

    def entries(self, after: int, limit: int | None = None) -> list[Entry]:
        """The stored entries after seq ``after`` (at most ``limit``)."""
        start = max(after + 1 - self.first_seq, 0)
        stop = None if limit is None else start + limit
        seq, epoch = self.first_seq + start, self.epoch
        return [Entry(epoch, seq + i, p) for i, p in enumerate(self.payloads[start:stop])]


class MemoryTransport(Transport):
    """Streams kept in this process's memory (``memory://``)."""

    def __init__(
        self,
        *,
        retention: float = DEFAULT_RETENTION,
        tombstone: float = DEFAULT_TOMBSTONE,
        running_ttl: float = DEFAULT_RUNNING_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        super().__init__(
            retention=retention,
            tombstone=tombstone,
            running_ttl=running_ttl,
            max_entries=max_entries,
        )
        self._streams: dict[str, _Stream] = {}
        self._closed = False
        self._swept_at = 0.0
        self._last_epoch = 0
        self._own_append = type(self).append is MemoryTransport.append
        self._own_wait_cancel = type(self).wait_cancel is MemoryTransport.wait_cancel
        #: append_soon()'s answers not yet given, and the event loop that will give them.
        self._answers: list[tuple[Callable[[bool], None], bool]] = []
        self._answers_loop: asyncio.AbstractEventLoop | None = None

    def _get(self, stream_id: str) -> _Stream | None:
        if self._closed:
            raise TransportClosed("the memory transport is closed")
        stream = self._streams.get(stream_id)
        if stream is None:
            return None
        clock = time.monotonic()
        if clock >= stream.meta_until:
            del self._streams[stream_id]
            return None
        if clock >= stream.data_until and stream.payloads:
            stream.first_seq += len(stream.payloads)
            stream.payloads.clear()
        return stream

    def _owned(self, stream_id: str, owner: str) -> _Stream:
        stream = self._get(stream_id)
        if stream is None or stream.owner != owner:
            raise LeaseLost(stream_id)
        return stream

    def _sweep(self) -> None:
        clock = time.monotonic()
        if clock - self._swept_at < 1.0:  # amortized: a full scan per create is quadratic
            return
        self._swept_at = clock
        for stream_id in list(self._streams):
            self._get(stream_id)

    async def create(self, stream_id: str, owner: str, lease_ms: int) -> StreamInfo:
        self._sweep()
        old = self._get(stream_id)
        clock = time.monotonic()
        if old is not None and old.status == "running" and clock < old.lease_until:
            raise StreamAlreadyRunning(stream_id)
        created = now()
        # Microseconds, and above any epoch this transport gave before: a stream deleted
        # and re-created at once still gets a new epoch.
        epoch = self._last_epoch = max(time.time_ns() // 1000, self._last_epoch + 1)
        if old is not None:
            old.owner = ""
            for sub in tuple(old.subscribers):
                sub.push([])  # wake readers of the old run so they notice the new epoch
        stream = _Stream(
            epoch=epoch,
            owner=owner,
            lease_ms=lease_ms,
            lease_until=clock + lease_ms / 1000,
            created_at=created,
            updated_at=created,
            data_until=clock + self._running_for(lease_ms),
            meta_until=clock + self._running_for(lease_ms) + self.tombstone,
        )
        self._streams[stream_id] = stream
        return _info(stream_id, stream)

    def _store(self, stream: _Stream, entry: Entry, count: int) -> None:
        stream.payloads.append(entry.payload)
        stream.last_count = count
        stream.updated_at = now()
        overflow = len(stream.payloads) - self.max_entries
        if overflow > self.max_entries >> 4:
            # Trimmed a sixteenth at a time, as Redis trims (MAXLEN ~): deleting the first
            # payload of a full list at every append moved the whole list each time.
            del stream.payloads[:overflow]
            stream.first_seq += overflow
        if stream.subscribers:
            entries = [entry]  # (push() copies it: one list for all)
            for sub in tuple(stream.subscribers):
                sub.push(entries)

    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        self._append(stream_id, owner, entry, count, final)

    def append_soon(
        self, stream_id: str, owner: str, entry: Entry, count: int, done: Callable[[bool], None]
    ) -> bool:
        if not self._own_append:
            return False  # a subclass's own append() is what it expects to be called
        try:
            self._append(stream_id, owner, entry, count, None)
        except Exception:
            stored = False  # append() raises it again, for the producer to handle
        else:
            stored = True
        # The answers of one event-loop turn go in one callback, not one each (issue 11:
        # a handle per token was 6% of the instructions per token on this transport).
        answers = self._answers
        loop = asyncio.get_running_loop()
        if self._answers_loop is not loop:  # (a closed loop never gave its answers)
            answers.clear()
            self._answers_loop = loop
        answers.append((done, stored))
        if len(answers) == 1:
            loop.call_soon(self._answer)
        return True

    def _answer(self) -> None:
        answers, self._answers = self._answers, []
        for done, stored in answers:
            try:
                done(stored)
            except Exception as exc:  # as the loop would report a callback's (the rest go on)
                asyncio.get_running_loop().call_exception_handler(
                    {"message": f"exception in {done!r}", "exception": exc}
                )

    def _append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None
    ) -> None:
        stream = self._owned(stream_id, owner)
        if entry.epoch != stream.epoch:
            raise LeaseLost(stream_id)
        last_seq = stream.last_seq
        if entry.seq <= last_seq:
            return
        if stream.status != "running":
            raise LeaseLost(stream_id)
        if entry.seq != last_seq + 1:
            raise StorageRollback(stream_id, last_seq)
        self._store(stream, entry, count)
        if final is not None:
            self._finish(stream, final)

    def _finish(self, stream: _Stream, status: Status) -> None:
        clock = time.monotonic()
        stream.status = status
        stream.data_until = clock + self.retention
        stream.meta_until = clock + self.retention + self.tombstone

    async def renew(self, stream_id: str, owner: str, lease_ms: int) -> bool:
        stream = self._owned(stream_id, owner)
        if stream.status != "running":
            raise LeaseLost(stream_id)
        clock = time.monotonic()
        stream.lease_until = clock + lease_ms / 1000
        stream.data_until = clock + self._running_for(lease_ms)
        stream.meta_until = stream.data_until + self.tombstone
        return stream.cancelled

    def _running_for(self, lease_ms: int) -> float:
        """Seconds a running stream's data lives: running_ttl, and no less than its lease
        (a reservation waiting longer than running_ttl must not lose its first entry)."""
        return max(self.running_ttl, lease_ms / 1000)

    async def request_cancel(self, stream_id: str) -> bool:
        stream = self._get(stream_id)
        if stream is None or stream.status != "running":
            return False
        _cancel(stream, None)
        return True

    def watch_cancel(
        self, stream_id: str, epoch: int, on_cancel: Callable[[Exception | None], None]
    ) -> Callable[[], None]:
        if not self._own_wait_cancel:  # a subclass's own wait_cancel() is what it expects
            return super().watch_cancel(stream_id, epoch, on_cancel)
        return self._watch(stream_id, epoch, on_cancel)

    def _watch(
        self, stream_id: str, epoch: int, on_cancel: Callable[[Exception | None], None]
    ) -> Callable[[], None]:
        loop = asyncio.get_running_loop()
        try:
            stream = self._get(stream_id)
        except TransportClosed as exc:
            return loop.call_soon(on_cancel, exc).cancel
        if stream is None or stream.epoch != epoch or stream.cancelled:
            # That run was deleted (a stop, as a cancel is), replaced or expired before the
            # watch began: its writes fail, so it stops now rather than at its heartbeat.
            # (The Redis transport's watch fires on such metadata too.)
            return loop.call_soon(on_cancel, None).cancel
        stream.watchers.append(on_cancel)
        return functools.partial(_unwatch, stream, on_cancel)

    async def wait_cancel(self, stream_id: str, epoch: int) -> None:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        unwatch = self._watch(stream_id, epoch, resolver(woken))
        try:
            await woken
        finally:
            unwatch()

    async def info(self, stream_id: str) -> StreamInfo | None:
        stream = self._get(stream_id)
        return None if stream is None else _info(stream_id, stream)

    async def read(self, stream_id: str, epoch: int, after: int, limit: int) -> list[Entry]:
        stream = self._get(stream_id)
        if stream is None or stream.epoch != epoch:
            return []
        return stream.entries(after, limit)

    def subscribe(self, stream_id: str, epoch: int, after: int) -> Subscription:
        stream = self._get(stream_id)
        subs = stream.subscribers if stream is not None and stream.epoch == epoch else set()
        sub = QueueSubscription(subs.discard)
        subs.add(sub)
        if stream is None or stream.epoch != epoch:
            sub.push([])  # deleted or replaced since the reader looked: it looks again now
        elif stream.last_seq > after:
            sub.push(stream.entries(after))
        return sub

    async def delete(self, stream_id: str) -> bool:
        stream = self._get(stream_id)
        if stream is None:
            return False
        del self._streams[stream_id]
        stream.owner = ""
        _cancel(stream, None)
        for sub in tuple(stream.subscribers):
            sub.push([])  # wake readers so they notice
        return True

    async def reap(self, stream_id: str, epoch: int, payload: bytes) -> bool:
        stream = self._get(stream_id)
        if (
            stream is None
            or stream.epoch != epoch
            or stream.status != "running"
            or time.monotonic() < stream.lease_until
        ):
            return False
        stream.owner = ""
        self._store(stream, Entry(epoch, stream.last_seq + 1, payload), 1)
        self._finish(stream, "error")
        return True

    async def aclose(self) -> None:
        self._closed = True
        for stream in self._streams.values():
            # (No watch waits on a closed transport.)
            _cancel(stream, TransportClosed("the memory transport is closed"))
            for sub in tuple(stream.subscribers):
                sub.push([])
        self._streams.clear()


def _cancel(stream: _Stream, error: Exception | None) -> None:
    """A cancel of the stream's run is requested (``error``: its watches fail with it)."""
    stream.cancelled = True
    watchers, stream.watchers = stream.watchers, []
    if watchers:
        loop = asyncio.get_running_loop()
        for on_cancel in watchers:
            loop.call_soon(on_cancel, error)


def _unwatch(stream: _Stream, on_cancel: Callable[[Exception | None], None]) -> None:
    with contextlib.suppress(ValueError):
        stream.watchers.remove(on_cancel)


def _info(stream_id: str, stream: _Stream) -> StreamInfo:
    return StreamInfo(
        stream_id=stream_id,
        epoch=stream.epoch,
        status=stream.status,
        created_at=stream.created_at,
        updated_at=stream.updated_at,
        last_seq=stream.last_seq,
        last_count=stream.last_count,
        lease_ms=stream.lease_ms,
    )
