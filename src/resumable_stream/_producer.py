"""StreamProducer: runs a source in the background and appends its events to a stream."""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import itertools
import logging
import math
import operator
import secrets
import sys
import time
import traceback
from collections.abc import AsyncIterable, Callable, Mapping
from types import TracebackType
from typing import Any, Literal, Self

from . import telemetry
from ._codec import Encoded, EventEncoder, encode_entry, join_entry, size_of
from ._constants import (
    COALESCE_DELAY,
    COALESCE_EVENTS,
    COALESCE_GAP,
    COALESCE_PAUSE,
    DEFAULT_LEASE,
    DEFAULT_MAX_BUFFER,
    DEFAULT_MAX_ENTRY_BYTES,
    DEFAULT_MAX_ENTRY_EVENTS,
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_ROLLBACK_WINDOW,
    DEFAULT_WRITE_RETRY_BUDGET,
    MAX_DURATION,
    MAX_ENTRY_EVENTS_LIMIT,
    ROLLBACK_WINDOW_BYTES,
    TIMER_SLACK,
)
from ._events import (
    CANCELLED,
    CUSTOM,
    END,
    ERROR,
    TERMINAL_TYPES,
    Item,
    chat_model_text,
    chat_model_token,
    error_data,
    messages_text,
    normalize,
)
from ._exceptions import (
    BackendRefused,
    ConfigurationError,
    EventTooLarge,
    LeaseLost,
    ReservationExpired,
    StorageRollback,
    StreamAlreadyRunning,
    TransportClosed,
    TransportError,
)
from ._ids import check_stream_id, new_stream_id
from ._sources import EventsFunction, mapped
from .transports._base import Entry, Status, Transport

logger = logging.getLogger("resumable_stream")

_STATUS_OF: dict[str, Status] = {END: "completed", ERROR: "error", CANCELLED: "cancelled"}
_NO_DATA: Mapping[str, Any] = {}  # an astream_events item's missing `data` or `metadata`
# A paced token's entry is built with its fields' slot setters: Entry is frozen, and its
# __init__ sets each field through object.__setattr__ (issue 11: 2% of the instructions
# per token through Redis, python -m benchmarks.lockstep --instructions).
_new_entry = object.__new__
_set_epoch = vars(Entry)["epoch"].__set__
_set_seq = vars(Entry)["seq"].__set__
_set_payload = vars(Entry)["payload"].__set__
CancelReason = Literal["requested", "shutdown"]


#: ``custom`` events that open a reserved run: written by reserve(), then by start().
RESERVED_EVENT = "resumable_stream.reserved"
STARTED_EVENT = "resumable_stream.started"
RESERVED_PAYLOAD = encode_entry([(CUSTOM, {"name": RESERVED_EVENT, "data": {}})])
# Not naming the value: it holds the token that owns the run.
_NOT_A_RESERVATION = "not a reservation (stream_id, epoch and token)"


@dataclasses.dataclass(frozen=True, slots=True)
class Reservation:
    """A run created by :meth:`StreamProducer.reserve`, for :meth:`StreamProducer.start`.

    Send it with the task that will start it: ``str(reservation)`` and
    :meth:`Reservation.parse`, or :meth:`to_dict` and :meth:`from_dict`. Whoever holds it
    can start the run, so treat it like the task itself.
    """

    stream_id: str
    epoch: int
    token: str = dataclasses.field(repr=False)

    def __str__(self) -> str:
        return f"{self.epoch}:{self.token}:{self.stream_id}"

    @classmethod
    def parse(cls, text: str) -> Reservation:
        """The reservation ``str(reservation)`` made; :class:`ConfigurationError` (a
        ValueError) naming the part that is wrong if ``text`` is not one."""
        if not isinstance(text, str):
            raise ConfigurationError(_NOT_A_RESERVATION)
        epoch, _, rest = text.partition(":")
        token, _, stream_id = rest.partition(":")
        return cls.from_dict({"stream_id": stream_id, "epoch": epoch, "token": token})

    def to_dict(self) -> dict[str, Any]:
        """The reservation as a JSON-ready dict, for :meth:`from_dict`."""
        return {"stream_id": self.stream_id, "epoch": self.epoch, "token": self.token}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reservation:
        """The reservation :meth:`to_dict` made; :class:`ConfigurationError` (a
        ValueError) naming the field that is wrong if ``data`` is not one (and
        :class:`InvalidStreamId` for a malformed stream id)."""
        if not isinstance(data, Mapping):
            raise ConfigurationError(_NOT_A_RESERVATION)
        epoch, token, stream_id = data.get("epoch"), data.get("token"), data.get("stream_id")
        # Only what to_dict() or str() writes: int() also read "1_0", " 12 " and 1.7 (as
        # another epoch, refused later as an expired reservation), True and negatives.
        if isinstance(epoch, str) and epoch.isascii() and epoch.isdigit():
            epoch = int(epoch)
        if type(epoch) is not int or epoch < 1:
            raise ConfigurationError(f"{_NOT_A_RESERVATION}: its epoch is not a positive integer")
        if not isinstance(token, str) or not token:
            raise ConfigurationError(f"{_NOT_A_RESERVATION}: its token is missing")
        if not isinstance(stream_id, str):
            raise ConfigurationError(f"{_NOT_A_RESERVATION}: its stream_id is missing")
        return cls(check_stream_id(stream_id), epoch, token)


def _nothing() -> None:  # the default of a run's hooks (cancel watch, telemetry)
    pass


#: The tasks reading sources that did not stop when their run ended (_give_up_on_source),
#: kept until they end: asyncio holds tasks weakly, and one collected mid-run would close
#: its source again from the garbage collector (its run and producer may be gone).
_LEFT_BEHIND: set[asyncio.Task[None]] = set()


def _forget_left_behind(pump: asyncio.Task[None]) -> None:
    _LEFT_BEHIND.discard(pump)
    if not pump.cancelled() and pump.exception() is not None:
        logger.warning("a source left behind raised", exc_info=pump.exception())


def _held(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """``exc`` if it is one of ``kinds``, else the first of them in the group ``exc`` is (a
    TaskGroup's, say), else None."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _held(inner, kinds)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, kinds) else None


def _log_source_failure(stream_id: str, exc: Exception) -> None:
    """Log what the source raised, with its traceback: the stream's error event says what
    it was, but HTTP clients may be shown no more than that an error occurred (ai_sdk)."""
    message = "run %s: the source raised or yielded a bad event; the stream ends with an error"
    text = "".join(traceback.format_exception(exc))
    try:
        text.encode()
    except UnicodeEncodeError:
        # A lone surrogate in a message (half an emoji from a provider): a handler writing
        # UTF-8 would fail on the record; escaped, it is written.
        escaped = text.encode("utf-8", "backslashreplace").decode()
        logger.warning(message + "\n%s", stream_id, escaped.rstrip("\n"))
        return
    logger.warning(message, stream_id, exc_info=exc)


class _RolledBack(Exception):
    """The storage lost entries beyond the rollback window: the run ends in error."""


class Run:
    """A run started by :meth:`StreamProducer.start`, writing stream ``stream_id``.

    The run is one supervised unit: its own task writes the entries, a second one reads
    the source; the transport calls the run back when a cancel is requested
    (:meth:`Transport.watch_cancel`), and its producer's heartbeat renews the lease.
    Whichever of them fails, the run ends with exactly one terminal event (or, when its
    lease is lost, is fenced and reported lost to readers), and :meth:`wait` returns.
    """

    def __init__(
        self,
        producer: StreamProducer,
        stream_id: str,
        epoch: int,
        owner: str,
        source: AsyncIterable[Any],
        *,
        seq: int = 0,
        cancelled: bool = False,
    ) -> None:
        self.stream_id = stream_id
        self.epoch = epoch
        #: "running", then the final status once the terminal event is written:
        #: "completed", "error" or "cancelled" (still "running" if the run failed to write it).
        self.status: Status = "running"
        self._producer = producer
        self._transport = producer.transport
        self._owner = owner
        self._source = source
        self._encoder = EventEncoder(producer.max_event_bytes)
        self._seq = seq  # entries already written (a reserved run starts after two)
        self._buffer: list[Encoded] = []
        self._sizes: list[int] = []  # size_of() each event of _buffer
        self._terminal: Item | None = None
        self._wake = asyncio.Event()
        # Set while the source waits for the buffer to drain (a future, not an Event: a
        # write checks an attribute rather than calling set() when nobody waits).
        self._space: asyncio.Future[None] | None = None
        # (A reserved run cancelled before it started: the pump ends it at its first step,
        # without reading the source.)
        self._cancel_reason: CancelReason | Literal["stopped"] | None = (
            "requested" if cancelled else None
        )
        # The source is closing (_read_source), and the terminal event the run ends with.
        self._closing = False
        self._closing_with: Item | None = None
        self._failure: BaseException | None = None
        self._coalesce_events = min(
            producer.coalesce_events, producer.max_buffer, producer.max_entry_events
        )
        # The entry being written (re-sent unchanged if its write is interrupted) and the
        # recent entries written, to write again if the storage loses them (issue 8).
        self._inflight: tuple[Entry, int, Status | None] | None = None
        # The payloads and event counts of the entries up to _seq, oldest first, in two
        # deques of bytes and ints: objects the garbage collector does not track (issue 11:
        # an object per entry written made collections more frequent and full ones
        # slower, tens of ms with many runs). Each holds rollback_window at most: once
        # full, the append of one more drops the oldest.
        window = min(producer.rollback_window, sys.maxsize)  # (a deque holds no more)
        self._window: collections.deque[bytes] = collections.deque(maxlen=window)
        self._window_counts: collections.deque[int] = collections.deque(maxlen=window)
        self._window_bytes = 0
        # The fast path (Transport.append_soon): the entry posted and not yet answered,
        # when it was posted, and whether the flusher must write it again with append().
        self._posted: Entry | None = None
        self._posted_at = 0.0
        self._redo = False
        self._can_post = True  # False once the transport declined
        self._parked = False  # the flusher waits for events, with nothing to write
        # A gap measured, not a time scheduled on: the clock itself (one C call; the loop's
        # time() is a Python method around it), telemetry's, so that a reading serves both.
        self._clock = telemetry.clock
        self._written_at = -COALESCE_GAP  # when the last entry was written, on _clock
        self._pump: asyncio.Task[None] | None = None
        # Whether the run stopped waiting for a source that did not stop
        # (_give_up_on_source), the future that tells a task waiting for the source
        # (_pumped: made when one waits), and the timer that gives up on it.
        self._gave_up = False
        self._abandoned: asyncio.Future[None] | None = None
        self._grace: asyncio.TimerHandle | None = None
        self._halted = False  # the source is no longer read (_halt)
        # The pump has taken its first step (_read_source): a task cancelled before that
        # never runs its coroutine, so it would set no terminal event.
        self._pumping = False
        # The run's task writes (_flush_loop) while this is True: _fail() stops it then.
        self._flushing = False
        self._flush_stopped = False  # _fail() cancelled the run's task, in _flush_loop
        self._renewing = False  # a renewal of the lease is under way (StreamProducer)
        # The heartbeat found the run lost whole by the storage (StorageRollback from
        # renew): the flusher writes it again, also while the source is idle.
        self._lost = False
        self._unwatch: Callable[[], None] = _nothing  # ends the cancel watch
        self._unwrite: Callable[[], None] = _nothing  # ends Transport.writing()
        self._report_end: Callable[[], None] = _nothing  # set by telemetry
        try:  # before start() returns: readers that come next find the run written here
            self._unwrite = self._transport.writing(stream_id, epoch)
        except Exception:  # a hint: a transport failing at it still stores the run
            logger.warning("run %s: Transport.writing() failed", stream_id, exc_info=True)
        self._task = asyncio.create_task(self._main(), name=f"rstream run {stream_id}")
        # (Also if the task is cancelled before it runs, when _main's `finally` does not.)
        self._task.add_done_callback(self._stopped_writing)

    def __repr__(self) -> str:
        return f"<Run stream_id={self.stream_id!r} status={self.status}>"

    def _stopped_writing(self, _task: object = None) -> None:
        unwrite, self._unwrite = self._unwrite, _nothing
        unwrite()

    def done(self) -> bool:
        """True once the terminal event is written (or the run failed to write it)."""
        return self._task.done()

    async def wait(self) -> Status:
        """Wait for the run to end and return its final status.

        Raises what kept the run from writing its terminal event: :class:`LeaseLost` (it
        was fenced), :class:`BackendRefused`, :class:`TransportClosed` (the transport was
        closed under the run), or a :class:`TransportError` that outlasted the write-retry
        budget; readers then report ``producer_lost``. Cancelling
        ``wait()`` does not cancel the run.
        """
        await asyncio.shield(self._task)
        if self.status != "running":
            return self.status
        raise self._failure or TransportError(f"run {self.stream_id!r} ended without a status")

    async def cancel(self) -> Status:
        """Stop the run; return its final status once the terminal event is written."""
        self._request_cancel("requested")
        return await self.wait()

    def _request_cancel(self, reason: CancelReason | Literal["stopped"]) -> None:
        if self._cancel_reason is None and self._terminal is None:
            self._cancel_reason = reason
            self._halt()
            if self._closing:
                # The source has ended and is closing: not cancelled mid-close (that task
                # sets the terminal event once it is closed), but the stream ends now, with
                # the terminal event it was ending with, should the clean-up take long.
                if self._closing_with is not None:
                    self._end(self._closing_with)
            elif self._pumping and self._pump is not None and not self._pump.done():
                self._pump.cancel()
            # Else the pump has not started: it sees _cancel_reason at its first step.

    def _halt(self) -> None:
        """Stop reading the source (a stop, a failure, the run's own cancellation): what it
        yields from now on is not written (_read_source), and it has a lease to stop (it may
        swallow the cancellation, or its clean-up may hang); then the stream ends without it
        (_give_up_on_source)."""
        self._halted = True
        if self._grace is None:
            self._grace = self._task.get_loop().call_later(
                self._producer.lease, self._give_up_on_source
            )

    def _give_up_on_source(self) -> None:
        """End the stream and stop waiting for the source (_pumped): it did not stop within
        a lease of the stop, or of the run's own cancellation."""
        pump = self._pump
        if pump is None or pump.done():
            return  # it stopped
        logger.warning(
            "run %s: the source did not stop within %g s of the stop; the stream ends "
            "without waiting for it",
            self.stream_id,
            self._producer.lease,
        )
        if self._closing and self._closing_with is not None:
            self._end(self._closing_with)  # it had ended, and hangs in its clean-up
        else:
            self._end((CANCELLED, {"reason": self._cancel_reason or "shutdown"}))
        _LEFT_BEHIND.add(pump)
        pump.add_done_callback(_forget_left_behind)
        self._gave_up = True
        if self._abandoned is not None and not self._abandoned.done():
            self._abandoned.set_result(None)

    def _stopping(self) -> bool:
        """The run is stopping its tasks: it failed (_fail), or the run's own task was
        cancelled. (Not the pump's cancelling(): on 3.11 a TaskGroup of the source's own
        can leave it above 0.)"""
        return self._failure is not None or self._task.cancelling() > 0

    def _end(self, terminal: Item) -> None:
        """Set the terminal event (the first one set wins) and wake the writer."""
        if self._terminal is None:
            self._terminal = terminal
        self._wake.set()

    # -- the two tasks of a run --------------------------------------------------------

    async def _main(self) -> None:
        """The run's own task: it writes the stream (_flush_loop) while the pump reads the
        source, then ends the run."""
        shutting_down = False
        task = self._task
        # The pump is not awaited while it reads: a source that ignores a stop must not
        # keep the run from ending (_give_up_on_source).
        pump = self._pump = task.get_loop().create_task(
            self._read_source(), name=f"rstream pump {self.stream_id}"
        )
        try:
            self._watch_cancel()
            self._flushing = True
            try:
                # (It ends at once if the watch failed already: _fail() found nothing to
                # stop, and the pump, stopped before its first step, sets no terminal event.)
                await self._flush_loop()
            except Exception as exc:
                self._fail(exc)  # (the pump stops; _salvage() writes what it can)
            except asyncio.CancelledError:
                # Stopped by _fail() (the heartbeat found the run fenced, say), or the run's
                # task itself is cancelled (a shutdown): not swallowed.
                if not (self._flush_stopped and task.uncancel() == 0):
                    raise
            finally:
                self._flushing = False
            if self._flush_stopped and task.cancelling():
                # _fail()'s cancellation was lost in a write (a driver swallowed it): the
                # writes ended on the failure anyway. Not left counted as a cancellation.
                task.uncancel()
            await self._pumped(pump)
        except asyncio.CancelledError:
            shutting_down = True  # the run's task itself was cancelled (shutdown)
            if not pump.done():
                pump.cancel()
                self._halt()
                with contextlib.suppress(asyncio.CancelledError):  # (cancelled again)
                    await self._pumped(pump)
        try:
            if self.status == "running":
                await self._salvage(shutting_down)
        finally:
            # A cancelled helper's exception holds its frames, which hold this run, which
            # held the helper: drop the tasks and the window now rather than leave them to
            # a full garbage collection (tens of ms with many runs; issue 11).
            self._unwatch()
            self._unwatch = _nothing
            if self._grace is not None:
                self._grace.cancel()
                self._grace = None
            self._stopped_writing()
            self._producer._forget(self)
            self._report_end()
            self._report_end = _nothing  # (a closure holding this run: no cycle left)
            self._pump = None
            self._window.clear()
            self._window_counts.clear()
        if shutting_down:
            raise asyncio.CancelledError

    async def _pumped(self, pump: asyncio.Task[None]) -> None:
        """Wait for the pump to end, unless the run gives up on its source; raise what it
        raised that is not the run's (KeyboardInterrupt, SystemExit)."""
        if not pump.done() and not self._gave_up:
            # (Usually done already: the pump ends as it sets the terminal event.)
            if self._abandoned is None:
                self._abandoned = asyncio.get_running_loop().create_future()
            await asyncio.wait((pump, self._abandoned), return_when=asyncio.FIRST_COMPLETED)
        if pump.done() and not pump.cancelled():
            # (A pump cancelled by _fail is not: raised here, it would read as this task's
            # own cancellation.)
            pump.result()

    def _fail(self, exc: Exception) -> None:
        """End the run on ``exc``: stop the pump, and the writes if they are under way;
        _salvage() writes what it can."""
        if self._failure is None:
            self._failure = exc
        self._halt()
        current = asyncio.current_task()
        pump = self._pump
        if pump is not None and pump is not current:
            pump.cancel()
        if self._flushing and not self._flush_stopped and self._task is not current:
            self._flush_stopped = True
            self._task.cancel()

    async def _salvage(self, shutting_down: bool) -> None:
        """End a run whose tasks stopped before the terminal event was written."""
        failure = self._failure
        if isinstance(failure, LeaseLost | TransportError):
            # Fenced, refused, or the write-retry budget is spent: readers will report the
            # run lost once its lease lapses.
            logger.warning("run %s could not write its terminal event: %s", self.stream_id, failure)
            return
        if failure is not None:
            # A bug in a transport or a helper: still end the stream for its readers.
            logger.error("run %s failed", self.stream_id, exc_info=failure)
            message = f"the producer failed: {type(failure).__name__}: {failure}"
            self._terminal = (ERROR, {"error": "producer_failed", "message": message})
        elif self._terminal is None:
            self._terminal = (CANCELLED, {"reason": "shutdown" if shutting_down else "stopped"})
        self._posted = None  # an answer still to come is for this: ignored (_on_posted)
        self._redo = False
        try:
            if self._inflight is not None:  # interrupted mid-write: send it again unchanged
                entry, count, final = self._inflight
                try:
                    await self._append(entry, count, final)
                except _RolledBack:
                    pass  # the terminal event is `storage_rollback` now: written below
                else:
                    self._written(entry, count, final)
            while self.status == "running":
                await self._flush_once()
        except Exception as exc:
            self._failure = exc
            logger.warning("run %s could not write its terminal event: %r", self.stream_id, exc)

    async def _read_source(self) -> None:
        buffer_limit = self._producer.max_buffer
        full = self._coalesce_events
        source = self._source
        buffer = self._buffer
        sizes = self._sizes
        encoder = self._encoder
        # `end` once the source is exhausted; until then, what a failure here leaves.
        terminal: Item | None = (ERROR, {"error": "producer_failed", "message": "the run failed"})
        self._pumping = True
        try:
            if self._cancel_reason is not None:  # cancelled before the pump started
                raise asyncio.CancelledError
            async for item in source:
                if self._halted:
                    raise asyncio.CancelledError  # it yielded after the stop: not written
                buffered = len(buffer)
                # Each event is encoded as it arrives: one that cannot be stored ends the
                # run after the good events before it (issue 9).
                if type(item) is str:  # hot path: plain token text (encoder.token() inlined)
                    if item:
                        # (Else the full checks: valid text comes back as it is.)
                        if (len(item) <= encoder.plain_text_limit and item.isascii()) or (
                            (encoded := encoder.token(item, None, None)) is item
                            and encoder.released is None
                        ):
                            buffer.append(item)
                            sizes.append(len(item) + 3)
                        else:
                            self._add(encoded)  # a lone surrogate's repair: rare
                elif type(item) is dict and item.get("event") == "on_chat_model_stream":
                    # Hot path: most astream_events items; skips normalize()'s shape checks.
                    # Its usual case, chat_model_text() inlined: a chunk of plain text of
                    # the same message and node as the last token (nothing to check).
                    chunk = (item.get("data") or _NO_DATA).get("chunk")
                    text = getattr(chunk, "content", None)
                    meta = encoder.meta
                    # (The same object is equal first, as in the encoder's tuple comparison.)
                    if (
                        type(text) is str
                        and 0 < len(text) <= encoder.text_limit
                        and (
                            (message_id := getattr(chunk, "id", None)) is meta[0]
                            or message_id == meta[0]
                        )
                        and (
                            (node := (item.get("metadata") or _NO_DATA).get("langgraph_node"))
                            is meta[1]
                            or node == meta[1]
                        )
                        and text.isascii()
                    ):
                        buffer.append((text, meta))
                        sizes.append(len(text) + 3)
                    elif (parts := chat_model_text(item)) is None:
                        # No text, or not text alone: reasoning, several blocks.
                        found = chat_model_token(item)
                        if found is not None:
                            self._add(encoder.encode(*found))
                    else:
                        text = parts[0]
                        if (
                            parts[1:] == encoder.meta
                            and len(text) <= encoder.text_limit
                            and text.isascii()
                        ):  # text blocks (a list), same message and node as the last token
                            buffer.append((text, encoder.meta))
                            sizes.append(len(text) + 3)
                        else:
                            encoded = encoder.token(*parts)
                            if encoded is None or encoder.released is not None:
                                self._add(encoded)  # a lone surrogate's repair: rare
                            else:
                                buffer.append(encoded)
                                sizes.append(len(text) + 3)
                elif (
                    (type(item) is tuple or type(item) is dict)
                    and (text := messages_text(item, encoder.meta)) is not None
                    and len(text) <= encoder.text_limit
                    and text.isascii()
                ):  # astream(stream_mode="messages"): the same, of the last token's message
                    buffer.append((text, encoder.meta))
                    sizes.append(len(text) + 3)
                else:
                    try:
                        for kind, data in normalize(item):
                            if kind in TERMINAL_TYPES:
                                terminal = (kind, data)
                                return
                            self._add(encoder.encode(kind, data))
                    except RecursionError as exc:  # converting the item's values to JSON
                        raise TypeError(
                            f"an item of the source ({type(item).__name__}) cannot be "
                            "converted to JSON: it nests deeper than Python's recursion "
                            "limit, or holds itself"
                        ) from exc
                # The writer needs waking for the first event of a batch and for a full one
                # (not while an entry posted is unanswered: its answer wakes the flusher),
                # not for an item that added no event (an empty token): it would post an
                # entry holding none.
                if (
                    len(buffer) > buffered
                    and (buffered == 0 or len(buffer) >= full)
                    and self._posted is None
                ):
                    self._kick()
                while len(buffer) >= buffer_limit:
                    space = self._space = asyncio.get_running_loop().create_future()
                    await space
            if self._halted:
                raise asyncio.CancelledError  # it swallowed the stop, then ended
            terminal = (END, {})
        except asyncio.CancelledError as exc:
            reason = self._cancel_reason
            task = asyncio.current_task()
            if reason is not None:
                if task is not None:
                    task.uncancel()  # our own request: end the stream with `cancelled`
                terminal = (CANCELLED, {"reason": reason})
            elif self._stopping():
                terminal = None
                raise  # the run is stopping: _salvage() ends the stream
            else:
                # Nobody stopped the run: the source raised it (it awaited something that
                # was cancelled, such as a timed-out upstream call). An error like any
                # other; re-raised, it would end the pump with no terminal event.
                logger.info("run %s: source raised %r", self.stream_id, exc)
                terminal = (ERROR, error_data(exc))
        except BaseException as exc:  # an Exception, or a BaseException (a test's failure)
            if isinstance(exc, Exception):
                _log_source_failure(self.stream_id, exc)
            else:
                logger.info("run %s: source raised %r", self.stream_id, exc)
            terminal = (ERROR, error_data(exc))
            if isinstance(exc, GeneratorExit):
                raise  # this coroutine is being closed: never swallowed
            stop = _held(exc, (KeyboardInterrupt, SystemExit))
            if stop is not None:
                # The process is stopping (asyncio hands these to the loop, bare): never
                # swallowed, also from a group (the source's own TaskGroup).
                raise stop from None
        finally:
            # The source closes before the terminal event is written (a graph's clean-up
            # and checkpoint writes end before its thread shows idle). A stop requested
            # meanwhile does not cancel the close (_request_cancel): cancelled mid-close,
            # this task would never set the terminal event.
            self._closing, self._closing_with = True, terminal
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except (Exception, asyncio.CancelledError, BaseExceptionGroup) as exc:
                    # A group: a TaskGroup of the source's own, open at the `yield` it is
                    # closed at, raises the GeneratorExit of the close in one. A
                    # CancelledError with nobody stopping the run: the clean-up awaited
                    # something that was cancelled.
                    stop = _held(exc, (KeyboardInterrupt, SystemExit))
                    if stop is not None:
                        raise stop from None  # the process is stopping (see above)
                    cancelled = _held(exc, (asyncio.CancelledError,))
                    if cancelled is not None and self._stopping():
                        raise cancelled from None  # the run is stopping: _salvage() ends it
                    logger.warning(
                        "run %s: the source's aclose() raised", self.stream_id, exc_info=True
                    )
            if terminal is not None:
                self._end(terminal)

    def _add(self, encoded: Encoded | None) -> None:
        """Buffer an event the encoder returned (None: nothing yet), after the half pair it
        released, if it did (see EventEncoder)."""
        released = self._encoder.released
        if released is not None:
            self._encoder.released = None
            self._buffer.append(released)
            self._sizes.append(size_of(released))
        if encoded is not None:
            self._buffer.append(encoded)
            self._sizes.append(size_of(encoded))

    def _kick(self) -> None:
        """Events are waiting: post them now if nothing else is being written and the
        source is not outrunning the writes (the fast path); else wake the flusher."""
        if (
            self._parked
            and self._can_post
            and self._inflight is None
            and self._terminal is None
            and (now := self._clock()) - self._written_at >= COALESCE_GAP
        ):
            buffer = self._buffer
            if len(buffer) == 1:  # a paced token (no terminal event: checked above)
                # Entry(...) with its fields' slot setters (see _new_entry)
                entry = _new_entry(Entry)
                _set_epoch(entry, self.epoch)
                _set_seq(entry, self._seq + 1)
                _set_payload(entry, join_entry(buffer))
                count = 1
                self._inflight = (entry, 1, None)
                buffer.clear()
                self._sizes.clear()
            else:
                entry, count, _ = self._inflight = self._next_entry()
            self._posted, self._posted_at = entry, now
            try:
                posted = self._transport.append_soon(
                    self.stream_id, self._owner, entry, count, self._on_posted
                )
            except Exception:
                logger.warning("run %s: append_soon() failed", self.stream_id, exc_info=True)
                posted = False
            if posted:
                return
            self._can_post = False  # declined: this run awaits append() from now on
            self._posted = None
            self._redo = True  # the flusher writes the entry taken
        self._wake.set()

    def _on_posted(self, stored: bool) -> None:
        """The transport's answer to the entry posted by :meth:`_kick`."""
        entry = self._posted
        if entry is None or self._inflight is None or self._inflight[0] is not entry:
            return  # _salvage() took the entry over
        self._posted = None
        if stored:
            count = self._inflight[1]
            self._written(entry, count, None)
            now = self._written_at = self._clock()
            telemetry.appended(count, self._posted_at, now)
            if self._space is not None:
                self._free_space()
            if self._buffer or self._terminal is not None:
                self._wake.set()
        else:
            self._redo = True  # append() writes it again and reports what went wrong
            self._wake.set()

    async def _flush_loop(self) -> None:
        """Write the buffer, an entry per write, until the terminal event is written."""
        clock = self._clock
        coalesce_delay = self._producer.coalesce_delay
        bursting = False
        # One turn of the loop for the source: what it yields at once goes in the first entry.
        await asyncio.sleep(0)
        # (Until the terminal event is written, or the run failed: _salvage() ends it.)
        while self.status == "running" and self._failure is None:
            if self._redo and self._inflight is not None:  # a post that was not stored
                self._redo = False
                entry, count, final = self._inflight
                try:
                    await self._append(entry, count, final)
                except _RolledBack:
                    self._inflight = None
                    continue  # the terminal event is `storage_rollback` now: written next
                self._written(entry, count, final)
                self._written_at = clock()
                if self._space is not None:
                    self._free_space()
                bursting = bool(self._buffer)
                continue
            if self._lost:
                self._lost = False
                # (An entry posted meanwhile finds the loss itself: its answer says so.)
                if self._posted is None and self._seq:
                    with contextlib.suppress(_RolledBack):  # `storage_rollback` written next
                        await self._rewrite_lost(0, self._seq + 1)
                    continue
            if self._posted is not None or (not self._buffer and self._terminal is None):
                self._wake.clear()
                self._parked = True
                try:
                    await self._wake.wait()
                finally:
                    self._parked = False
                bursting = clock() - self._written_at < COALESCE_GAP
                continue
            if bursting:
                await self._hold(coalesce_delay)
            await self._flush_once()
            self._written_at = clock()
            bursting = bool(self._buffer)

    async def _hold(self, limit: float) -> None:
        """Events arrive faster than writes complete: let the next entry fill while the
        source keeps adding to it, until it holds ``coalesce_events`` events, ``limit``
        seconds have passed or the terminal event comes (see docs/performance.md).

        A pause in which nothing came ends it: the first lasts COALESCE_PAUSE, each next
        one twice the last. A source that paused (an LLM at its own pace, caught behind a
        slow write) is written after that first pause, not after ``limit``; one that slows
        down right after a burst, whose pauses have grown, may still bring an event in
        each and keep the entry open up to ``limit``.
        """
        buffer, wake = self._buffer, self._wake
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        pause = COALESCE_PAUSE
        held = len(buffer)
        while self._terminal is None and held < self._coalesce_events:
            left = deadline - loop.time()
            if left <= TIMER_SLACK:
                return
            wake.clear()
            # (A timer setting the event, not asyncio.timeout(): no exception per pause.)
            timer = loop.call_later(min(pause, left), wake.set)
            try:
                await wake.wait()  # (or the source's full buffer, or its end, sets it)
            finally:
                timer.cancel()
            if len(buffer) == held:
                return  # nothing came: the source paused
            held = len(buffer)
            pause *= 2

    async def _renew(self) -> None:
        """Renew the lease once (the producer's heartbeat calls it)."""
        try:
            cancel = await self._transport.renew(
                self.stream_id, self._owner, self._producer.lease_ms
            )
        except LeaseLost as exc:
            # Unless it raced the final write (if the lease is really gone, the writes
            # find out themselves), the run is fenced.
            if self._terminal is None and not self._task.done():
                self._fail(exc)
            return
        except StorageRollback:
            # The storage lost the whole run (a failover), not deleted: written again now,
            # not at the next entry (readers would find no stream meanwhile).
            self._lost = True
            self._wake.set()
            return
        except TransportClosed as exc:
            # Closed under the run: nothing of it will be written again. It ends now, as
            # its writes do, not when an idle source next yields (maybe never).
            if not self._task.done():
                self._fail(exc)
            return
        except TransportError as exc:
            telemetry.failed(exc, "renew")
            logger.warning("run %s: heartbeat failed: %s", self.stream_id, exc)
            return
        except Exception as exc:  # a bug in the transport
            if not self._task.done():
                self._fail(exc)
            return
        finally:
            self._renewing = False
        if cancel:
            self._request_cancel("requested")

    def _watch_cancel(self) -> None:
        # A callback, not a task: the transport calls it when a cancel is requested.
        try:
            self._unwatch = self._transport.watch_cancel(
                self.stream_id, self.epoch, self._on_cancel
            )
        except Exception as exc:
            self._on_cancel(exc)

    def _on_cancel(self, error: Exception | None) -> None:
        if error is None:
            self._request_cancel("requested")
        elif isinstance(error, TransportClosed):
            self._fail(error)  # closed under the run, as in _renew()
        elif isinstance(error, TransportError):
            telemetry.failed(error, "wait_cancel")
            logger.warning(
                "run %s: cancel watch failed (heartbeat still checks): %s", self.stream_id, error
            )
        else:  # a bug in the transport: end the run like a failing task
            self._fail(error)

    # -- writing -----------------------------------------------------------------------

    async def _flush_once(self) -> None:
        """Write one entry: the next events of the buffer, and the terminal event after
        the last of them."""
        entry, count, final = self._inflight = self._next_entry()
        try:
            await self._append(entry, count, final)
        except _RolledBack:
            self._inflight = None
            return  # the terminal event changed to `storage_rollback`: written next
        self._written(entry, count, final)
        if self._space is not None:
            self._free_space()

    def _free_space(self) -> None:
        """Entries were written: wake the source waiting for room in the buffer."""
        space, self._space = self._space, None
        if space is not None and not space.done():
            space.set_result(None)

    def _next_entry(self) -> tuple[Entry, int, Status | None]:
        """Take the next entry's events from the buffer (with the terminal event after
        the last of them): the entry, its event count and the status it ends the run in."""
        producer = self._producer
        buffer, sizes = self._buffer, self._sizes
        if self._terminal is not None:
            # The source is done: a half pair still held (or released by an event that
            # failed) is written as U+FFFD before the terminal event.
            self._add(self._encoder.flush())
        # The most events that fit: at most max_entry_events, and past the first, no more
        # than max_entry_bytes in all (prefix sums and bisect: no Python loop per event).
        if len(buffer) == 1:  # a paced token: one event, nothing to weigh
            events = buffer.copy()
            buffer.clear()
            sizes.clear()
        else:
            totals = list(itertools.accumulate(sizes[: producer.max_entry_events]))
            taken = max(bisect.bisect_right(totals, producer.max_entry_bytes), min(len(buffer), 1))
            events = buffer[:taken]
            del buffer[:taken]
            del sizes[:taken]
        final: Status | None = None
        terminal = self._terminal
        if not buffer and terminal is not None and len(events) < producer.max_entry_events:
            kind, encoded = self._encode_terminal(terminal)
            events.append(encoded)
            final = _STATUS_OF[kind]
        return Entry(self.epoch, self._seq + 1, join_entry(events)), len(events), final

    def _encode_terminal(self, terminal: Item) -> tuple[str, Encoded]:
        """The terminal event's type and encoding: an ``error`` if it cannot be stored."""
        kind, data = terminal
        try:
            return kind, self._encoder.event(kind, data)
        except EventTooLarge as exc:
            # An error too long to store (a source's exception with a long message) keeps
            # its name, cut; the EventTooLarge is told only if cutting cannot make it fit.
            fallback = error_data(exc)
            if kind != ERROR or not isinstance(data.get("message"), str):
                data = fallback
        except Exception as exc:  # a relayed terminal event that cannot be stored
            data = fallback = error_data(exc)
        # An error event always fits: its message is cut to what max_event_bytes leaves.
        message = data["message"]
        while True:
            self._terminal = (ERROR, {**data, "message": message})
            try:
                return ERROR, self._encoder.event(*self._terminal)
            except EventTooLarge:
                if message:
                    message = message[: len(message) // 2]
                elif data is not fallback:  # its other fields are too large
                    data = fallback
                    message = data["message"]
                else:
                    raise

    def _written(self, entry: Entry, count: int, final: Status | None) -> None:
        self._inflight = None
        self._seq = entry.seq
        if final is not None:
            self.status = final
            return
        window = self._window
        payload = entry.payload
        size = self._window_bytes + len(payload)
        if len(window) == window.maxlen:  # full: the append drops the oldest entry
            if not window:
                return  # rollback_window=0: none kept
            size -= len(window[0])
        window.append(payload)
        self._window_counts.append(count)
        self._window_bytes = size
        while size > ROLLBACK_WINDOW_BYTES and window:
            size = self._window_bytes = size - len(window.popleft())
            self._window_counts.popleft()

    async def _append(
        self, entry: Entry, count: int, final: Status | None, again: bool = False
    ) -> None:
        """Append ``entry``, retrying transient faults within the write-retry budget.

        ``again``: the entry was written before and lost by the storage (a rollback): it is
        not counted in the appended events and entries a second time.
        """
        give_up = time.monotonic() + self._producer.write_retry_budget
        delay = 0.02
        began = telemetry.clock()
        while True:
            try:
                await self._transport.append(self.stream_id, self._owner, entry, count, final)
                if not again:
                    telemetry.appended(count, began)
                return
            except StorageRollback as exc:
                if exc.last_seq + 1 >= entry.seq:
                    raise  # not a rollback: a transport breaking the contract
                await self._rewrite_lost(exc.last_seq, entry.seq)
            except (BackendRefused, TransportClosed) as exc:
                telemetry.failed(exc, "append")
                # A retry will not fix it (out of memory, no permission..., or the
                # transport was closed under the run: shut the producer down first).
                raise
            except TransportError:
                telemetry.transport_error("append")
                # A write whose reply was lost is retried with the same seq; the transport
                # makes that idempotent.
                if time.monotonic() + delay > give_up:
                    raise
                await asyncio.sleep(delay)  # backoff between retries
                delay = min(delay * 2, 1.0)

    async def _rewrite_lost(self, last_seq: int, seq: int) -> None:
        """The storage ends at ``last_seq`` although entries up to ``seq - 1`` were written:
        write the lost ones again from the window, or end the run with `storage_rollback`."""
        if last_seq == 0:
            self._lost = False  # (what the heartbeat found too, if it did: done here)
        first = self._seq - len(self._window) + 1  # the window ends at entry _seq
        kept = {
            first + i: (Entry(self.epoch, first + i, payload), count)
            for i, (payload, count) in enumerate(
                zip(self._window, self._window_counts, strict=True)
            )
        }
        lost = range(last_seq + 1, seq)
        if all(s in kept for s in lost):
            logger.warning(
                "run %s: the storage lost entries %d-%d; writing them again",
                self.stream_id,
                last_seq + 1,
                seq - 1,
            )
            for s in lost:
                await self._append(*kept[s], None, again=True)
            return
        # The lost entries are gone for good. The run ends at once with an error written
        # right after what the storage holds; readers that had received lost entries get
        # OffsetExpired (the consumer recognizes this error at an offset they passed).
        logger.error(
            "run %s: the storage lost entries %d-%d, beyond the rollback window",
            self.stream_id,
            last_seq + 1,
            seq - 1,
        )
        self._seq = last_seq
        self._window.clear()
        self._window_counts.clear()
        self._window_bytes = 0
        self._inflight = None
        self._buffer.clear()
        self._sizes.clear()
        self._encoder.flush()  # (a half pair held: lost with the events after it)
        self._encoder.released = None
        self._request_cancel("stopped")  # stop reading the source
        self._terminal = (ERROR, rollback_error(last_seq))
        raise _RolledBack


def rollback_error(last_seq: int) -> dict[str, Any]:
    """The ``data`` of the ``error`` event ending a run whose storage lost entries."""
    return {
        "error": "storage_rollback",
        "message": (
            f"the storage lost entries after entry {last_seq} that it had acknowledged (a "
            "failover to a replica that had not caught up); the events after them are lost"
        ),
        "last_seq": last_seq,
    }


class StreamProducer:
    """Starts runs: each reads a source in the background and writes it to a stream.

    The producer owns its runs; :meth:`aclose` (or leaving ``async with``) cancels the ones
    still running, each of which still writes its ``cancelled`` terminal event.

    Tunables (defaults in ``resumable_stream._constants``):

    * ``lease``: seconds a run's lease lasts without a heartbeat (renewed every third);
      readers report a run whose lease lapsed as ``error`` / ``producer_lost``.
    * ``max_buffer``: events read ahead of the writes before the source waits
      (backpressure).
    * ``coalesce_events``, ``coalesce_delay``: when events arrive faster than writes
      complete, an entry may wait, while more keep coming, up to ``coalesce_delay``
      seconds to hold up to ``coalesce_events`` events (see docs/performance.md).
    * ``max_event_bytes``: largest encoded event; a larger one ends the run with an
      ``error`` event whose ``error`` is ``EventTooLarge``, after the events before it.
    * ``max_entry_events``, ``max_entry_bytes``: most events per entry, and the size past
      which an entry takes no further event; they bound what a reader decodes at once.
    * ``write_retry_budget``: seconds a write failing with a transient
      :class:`TransportError` is retried; None takes the transport's
      ``write_retry_budget`` (every Redis transport suggests 30 s, which covers a Sentinel
      or Cluster failover), else 5 s. :class:`BackendRefused` and :class:`TransportClosed`
      are never retried.
    * ``rollback_window``: recent entries kept to write again if the storage loses them
      (a failover to a lagging replica); past it the run ends with ``storage_rollback``.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        lease: float = DEFAULT_LEASE,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        coalesce_events: int = COALESCE_EVENTS,
        coalesce_delay: float = COALESCE_DELAY,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        max_entry_events: int = DEFAULT_MAX_ENTRY_EVENTS,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        write_retry_budget: float | None = None,
        rollback_window: int = DEFAULT_ROLLBACK_WINDOW,
    ) -> None:
        if not 0.1 <= lease <= MAX_DURATION:  # (nan compares false to anything)
            raise ConfigurationError(
                f"lease must be at least 0.1 and at most {MAX_DURATION:g} seconds, not {lease!r}"
            )
        if max_buffer < 1:
            raise ConfigurationError("max_buffer must be at least 1")
        if coalesce_events < 1 or not 0 <= coalesce_delay < math.inf:
            raise ConfigurationError(
                "coalesce_events must be >= 1 and coalesce_delay >= 0 seconds, and finite"
            )
        if not 1 <= max_entry_events <= MAX_ENTRY_EVENTS_LIMIT:
            raise ConfigurationError(
                f"max_entry_events must be between 1 and {MAX_ENTRY_EVENTS_LIMIT}"
            )
        if max_event_bytes < 64 or max_entry_bytes < 1:
            raise ConfigurationError("max_event_bytes must be >= 64 and max_entry_bytes >= 1")
        # (An integer: the window's deques take it as their maxlen, once per run.)
        if not hasattr(rollback_window, "__index__") or rollback_window < 0:
            raise ConfigurationError(
                f"rollback_window must be an int >= 0, not {rollback_window!r}"
            )
        if write_retry_budget is None:
            suggested = getattr(transport, "write_retry_budget", None)
            write_retry_budget = DEFAULT_WRITE_RETRY_BUDGET if suggested is None else suggested
        if not 0 <= write_retry_budget < math.inf:
            raise ConfigurationError("write_retry_budget must be >= 0 seconds, and finite")
        self.transport = transport
        self.lease = lease
        self.lease_ms = int(lease * 1000)
        self.max_buffer = max_buffer
        self.coalesce_events = coalesce_events
        self.coalesce_delay = coalesce_delay
        self.max_event_bytes = max_event_bytes
        self.max_entry_events = max_entry_events
        self.max_entry_bytes = max_entry_bytes
        self.write_retry_budget: float = write_retry_budget
        self.rollback_window: int = operator.index(rollback_window)
        self._runs: dict[str, Run] = {}
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._renewals: set[asyncio.Task[None]] = set()

    @property
    def runs(self) -> dict[str, Run]:
        """The runs of this producer that have not ended, by stream id."""
        return dict(self._runs)

    async def start(
        self,
        source: AsyncIterable[Any],
        *,
        stream_id: str | None = None,
        events: EventsFunction | None = None,
        reservation: Reservation | None = None,
    ) -> Run:
        """Start reading ``source`` into a stream in the background; return its :class:`Run`.

        ``source`` is a LangGraph ``astream_events(..., version="v2")`` or ``astream(...)``
        iterator, or any async iterable of ``str`` tokens, events or dicts. Without
        ``stream_id`` an unguessable id is generated. Raises :class:`StreamAlreadyRunning`
        if a live producer holds ``stream_id``.

        ``events(item)`` replaces the normalization into the event vocabulary: it returns
        the ``(type, data)`` pairs to store for each item (``data`` a JSON-safe dict), so
        that a protocol can keep what the vocabulary drops (as
        ``resumable_stream.langgraph_api`` keeps LangGraph's stream parts whole).

        With ``reservation`` (from :meth:`reserve`, maybe in another process), the reserved
        run continues: its readers are already waiting. Raises :class:`ReservationExpired`
        if it lapsed before this call (its readers got ``not_started``) and
        :class:`StreamAlreadyRunning` if another producer started it (a task delivered
        twice).
        """
        if not isinstance(source, AsyncIterable):
            raise TypeError(
                f"source must be an async iterable (e.g. graph.astream_events(...)), "
                f"not {type(source).__name__}"
            )
        if events is not None:
            source = mapped(source, events)
        if reservation is not None:
            if stream_id is not None and stream_id != reservation.stream_id:
                raise ValueError("stream_id and reservation name different streams")
            # A cancel requested while the run waited for a worker: it starts and ends
            # `cancelled` at once, without reading the source.
            cancelled = await self._claim(reservation)
            stream_id, epoch, owner = reservation.stream_id, reservation.epoch, reservation.token
            seq = 2
        else:
            cancelled = False
            stream_id = new_stream_id() if stream_id is None else check_stream_id(stream_id)
            owner = secrets.token_hex(16)
            info = await self.transport.create(stream_id, owner, self.lease_ms)
            epoch, seq = info.epoch, 0
        with telemetry.run_span(stream_id, epoch) as span:  # the run's tasks inherit it
            run = Run(self, stream_id, epoch, owner, source, seq=seq, cancelled=cancelled)
        telemetry.run_started(run, span)
        self._runs[stream_id] = run  # until the run's task ends (_forget)
        if self._heartbeat_task is None:
            self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="rstream heartbeat")
        return run

    async def _heartbeat(self) -> None:
        """Renew the lease of each running run every third of the lease: one task for all
        of them (issue 8: a task per run made each start and end dearer). Cancelled by
        _forget() when the last run ends; it holds no reference to itself (a cycle)."""
        while True:
            await asyncio.sleep(self.lease / 3)  # the heartbeat period
            for run in tuple(self._runs.values()):
                # A renewal still waiting (a slow server) is not doubled; one run's renewal
                # never holds up another's.
                if not run._renewing and not run.done():
                    run._renewing = True
                    task = asyncio.create_task(run._renew())
                    self._renewals.add(task)
                    task.add_done_callback(self._renewals.discard)

    async def reserve(self, stream_id: str | None = None, *, start_timeout: float) -> Reservation:
        """Create a run for another producer (a task queue's worker) to :meth:`start` later.

        The stream exists at once, so readers can wait on it from the moment the work is
        queued. If no producer starts it within ``start_timeout`` seconds, the first reader
        to notice ends it with an ``error`` event whose code is ``not_started``. Send the
        returned :class:`Reservation` with the task (``str(reservation)`` or
        ``reservation.to_dict()``). Raises :class:`StreamAlreadyRunning` like :meth:`start`.
        """
        # Checked before the stream is made: a bad value must not leave one behind.
        if type(start_timeout) not in (int, float) or not 0.1 <= start_timeout <= MAX_DURATION:
            raise ConfigurationError(
                f"start_timeout must be a number of seconds >= 0.1 and at most "
                f"{MAX_DURATION:g}, not {start_timeout!r}"
            )
        stream_id = new_stream_id() if stream_id is None else check_stream_id(stream_id)
        token = secrets.token_hex(16)
        # Created with this producer's lease, which sets the pace at which readers check
        # for a lost producer; then held for start_timeout.
        info = await self.transport.create(stream_id, token, self.lease_ms)
        # The reservation's own first entry, which tells readers (and the reaper, see
        # _consumer.py) that this run is waiting for a producer.
        await self.transport.append(stream_id, token, Entry(info.epoch, 1, RESERVED_PAYLOAD), 1)
        await self.transport.renew(stream_id, token, int(start_timeout * 1000))
        return Reservation(stream_id, info.epoch, token)

    async def _claim(self, reservation: Reservation) -> bool:
        """Take a reserved run over, exactly once: entry 2 names the claimant, and appends
        of a seq already stored are no-ops, so of two claims the one stored wins. True if
        a cancel of the run was requested meanwhile."""
        stream_id, epoch, token = reservation.stream_id, reservation.epoch, reservation.token
        info = await self.transport.info(stream_id)
        if info is None or info.epoch != epoch or info.status != "running":
            raise ReservationExpired(stream_id)
        if info.last_seq >= 2:
            raise StreamAlreadyRunning(stream_id)
        claim = encode_entry(
            [(CUSTOM, {"name": STARTED_EVENT, "data": {"claim": secrets.token_hex(8)}})]
        )
        try:
            cancelled = await self.transport.renew(stream_id, token, self.lease_ms)
            await self.transport.append(stream_id, token, Entry(epoch, 2, claim), 1)
        except (LeaseLost, StorageRollback):  # fenced, or lost by the storage
            raise ReservationExpired(stream_id) from None
        stored = await self.transport.read(stream_id, epoch, 1, 1)
        if not stored or stored[0].payload != claim:
            raise StreamAlreadyRunning(stream_id)
        return cancelled

    def _forget(self, run: Run) -> None:
        if self._runs.get(run.stream_id) is run:
            del self._runs[run.stream_id]
        if not self._runs and self._heartbeat_task is not None:
            self._heartbeat_task.cancel()  # nothing to renew: no task left behind
            self._heartbeat_task = None

    async def cancel(self, stream_id: str) -> bool:
        """Ask the run writing ``stream_id`` to stop, wherever it runs.

        Returns False if the stream is not running. The run writes ``cancelled`` within
        about a second (at once when it runs in this process).
        """
        check_stream_id(stream_id)
        run = self._runs.get(stream_id)
        if run is not None:
            run._request_cancel("requested")
        return await self.transport.request_cancel(stream_id) or run is not None

    async def aclose(self) -> None:
        """Cancel the runs still going and wait until each wrote its terminal event."""
        runs = list(self._runs.values())
        for run in runs:
            run._request_cancel("shutdown")
        await asyncio.gather(*(run._task for run in runs), return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
