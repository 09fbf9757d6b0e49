"""StreamProducer: runs a source in the background and appends its events to a stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterable, Mapping
from types import TracebackType
from typing import Any, Literal, Self

from ._codec import encode_entry
from ._constants import (
    COALESCE_DELAY,
    COALESCE_EVENTS,
    COALESCE_GAP,
    DEFAULT_LEASE,
    DEFAULT_MAX_BUFFER,
)
from ._events import (
    CANCELLED,
    CUSTOM,
    END,
    ERROR,
    TERMINAL_TYPES,
    TOKEN,
    Item,
    chat_model_token,
    error_data,
    normalize,
)
from ._exceptions import (
    ConfigurationError,
    LeaseLost,
    ReservationExpired,
    StreamAlreadyRunning,
    TransportError,
)
from ._ids import check_stream_id, new_stream_id
from .transports._base import Entry, Status, Transport

logger = logging.getLogger("resumable_stream")

_STATUS_OF: dict[str, Status] = {END: "completed", ERROR: "error", CANCELLED: "cancelled"}
CancelReason = Literal["requested", "shutdown"]


#: ``custom`` events that open a reserved run: written by reserve(), then by start().
RESERVED_EVENT = "resumable_stream.reserved"
STARTED_EVENT = "resumable_stream.started"
RESERVED_PAYLOAD = encode_entry([(CUSTOM, {"name": RESERVED_EVENT, "data": {}})])
# Not naming the value: it holds the token that owns the run.
_NOT_A_RESERVATION = "not a reservation: expected stream_id, epoch and token"


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
        """The reservation ``str(reservation)`` made; ValueError if ``text`` is not one."""
        epoch, _, rest = text.partition(":")
        token, _, stream_id = rest.partition(":")
        return cls.from_dict({"stream_id": stream_id, "epoch": epoch, "token": token})

    def to_dict(self) -> dict[str, Any]:
        return {"stream_id": self.stream_id, "epoch": self.epoch, "token": self.token}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reservation:
        """The reservation :meth:`to_dict` made; ValueError if ``data`` is not one."""
        try:
            epoch = int(data["epoch"])
            token, stream_id = data["token"], data["stream_id"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(_NOT_A_RESERVATION) from None
        if not isinstance(token, str) or not token or not isinstance(stream_id, str):
            raise ValueError(_NOT_A_RESERVATION)
        return cls(check_stream_id(stream_id), epoch, token)


class Run:
    """A run started by :meth:`StreamProducer.start`, writing stream ``stream_id``."""

    def __init__(
        self,
        producer: StreamProducer,
        stream_id: str,
        epoch: int,
        owner: str,
        source: AsyncIterable[Any],
        *,
        seq: int = 0,
    ) -> None:
        self.stream_id = stream_id
        self.epoch = epoch
        #: Final status once the run ended: "completed", "error" or "cancelled".
        self.status: Status | None = None
        self._producer = producer
        self._transport = producer.transport
        self._owner = owner
        self._source = source
        self._seq = seq  # entries already written (a reserved run starts after two)
        self._buffer: list[Item] = []
        self._terminal: Item | None = None
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._cancel_reason: CancelReason | None = None
        self._failure: BaseException | None = None
        self._coalesce_events = min(COALESCE_EVENTS, producer.max_buffer)
        self._pump = asyncio.create_task(self._read_source(), name=f"rstream pump {stream_id}")
        self._task = asyncio.create_task(self._main(), name=f"rstream run {stream_id}")

    def __repr__(self) -> str:
        return f"<Run stream_id={self.stream_id!r} status={self.status or 'running'}>"

    def done(self) -> bool:
        """True once the terminal event is written (or the run failed to write it)."""
        return self._task.done()

    async def wait(self) -> Status:
        """Wait for the run to end and return its final status.

        Raises :class:`LeaseLost` or :class:`TransportError` if the run could not write
        its terminal event. Cancelling ``wait()`` does not cancel the run.
        """
        await asyncio.shield(self._task)
        if self.status is not None:
            return self.status
        raise self._failure or TransportError(f"run {self.stream_id!r} ended without a status")

    async def cancel(self) -> Status:
        """Stop the run; return its final status once the terminal event is written."""
        self._request_cancel("requested")
        return await self.wait()

    def _request_cancel(self, reason: CancelReason) -> None:
        if self._cancel_reason is None and not self._pump.done():
            self._cancel_reason = reason
            self._pump.cancel()

    async def _read_source(self) -> Item:
        buffer_limit = self._producer.max_buffer
        full = self._coalesce_events
        source = self._source
        try:
            async for item in source:
                buffered = len(self._buffer)
                if type(item) is str:  # hot path: plain token text
                    if item:
                        self._buffer.append(
                            (TOKEN, {"text": item, "message_id": None, "node": None})
                        )
                elif type(item) is dict and item.get("event") == "on_chat_model_stream":
                    # Hot path: most astream_events items; skips normalize()'s shape checks.
                    token = chat_model_token(item)
                    if token is not None:
                        self._buffer.append(token)
                else:
                    for kind, data in normalize(item):
                        if kind in TERMINAL_TYPES:
                            return (kind, data)
                        self._buffer.append((kind, data))
                # The flusher needs waking for the first event of a batch and for a full one.
                if buffered == 0 or len(self._buffer) >= full:
                    self._wake.set()
                while len(self._buffer) >= buffer_limit:
                    self._space.clear()
                    await self._space.wait()
            return (END, {})
        except Exception as exc:
            logger.info("run %s: source raised %r", self.stream_id, exc)
            return (ERROR, error_data(exc))
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _main(self) -> None:
        flusher = asyncio.create_task(self._flush_loop(), name=f"rstream flush {self.stream_id}")
        helpers = [
            asyncio.create_task(self._heartbeat(), name=f"rstream lease {self.stream_id}"),
            asyncio.create_task(self._watch_cancel(), name=f"rstream cancel {self.stream_id}"),
        ]
        shutting_down = False
        try:
            try:
                terminal = await self._pump
            except asyncio.CancelledError:
                task = asyncio.current_task()
                shutting_down = task is not None and task.cancelling() > 0
                reason = self._cancel_reason or "shutdown"
                terminal = (CANCELLED, {"reason": reason})
            self._terminal = terminal
            self._wake.set()
            self.status = await flusher
        except (LeaseLost, TransportError) as exc:
            self._failure = exc
            logger.warning("run %s could not write its terminal event: %s", self.stream_id, exc)
        finally:
            for task in (*helpers, self._pump, flusher):
                task.cancel()
            await asyncio.gather(*helpers, self._pump, flusher, return_exceptions=True)
        if shutting_down:
            raise asyncio.CancelledError

    async def _flush_loop(self) -> Status:
        """Write the buffer, an entry per write; return the status of the final entry."""
        clock = asyncio.get_running_loop().time
        bursting = False
        written_at = -COALESCE_GAP
        try:
            while True:
                if not self._buffer and self._terminal is None:
                    self._wake.clear()
                    await self._wake.wait()
                    bursting = clock() - written_at < COALESCE_GAP
                    continue
                if (
                    bursting
                    and self._terminal is None
                    and len(self._buffer) < self._coalesce_events
                ):
                    # Events arrive faster than writes complete: let this entry fill a
                    # little (see docs/performance.md).
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(COALESCE_DELAY):
                            await self._wake.wait()
                batch, self._buffer = self._buffer, []
                terminal = self._terminal
                if terminal is not None:
                    batch.append(terminal)
                try:
                    payload = encode_entry(batch)
                except Exception as exc:  # e.g. an integer beyond 64 bits in a tool's output
                    # End the run with an error rather than hang with a dead writer.
                    logger.warning("run %s: an event cannot be stored: %r", self.stream_id, exc)
                    terminal = (ERROR, {"error": type(exc).__name__, "message": str(exc)})
                    batch = [terminal]
                    payload = encode_entry(batch)
                    self._pump.cancel()
                final = None if terminal is None else _STATUS_OF[terminal[0]]
                await self._write(payload, len(batch), final)
                self._space.set()
                if final is not None:
                    return final
                written_at = clock()
                bursting = bool(self._buffer)
        except (LeaseLost, TransportError):
            self._pump.cancel()
            raise

    async def _write(self, payload: bytes, count: int, final: Status | None) -> None:
        entry = Entry(self.epoch, self._seq + 1, payload)
        give_up = time.monotonic() + self._producer.lease
        delay = 0.02
        while True:
            try:
                await self._transport.append(self.stream_id, self._owner, entry, count, final)
                break
            except TransportError:
                # A write whose reply was lost is retried with the same seq; the transport
                # makes that idempotent. Past the lease, consumers will report the run lost.
                if time.monotonic() + delay > give_up:
                    raise
                await asyncio.sleep(delay)  # backoff between retries
                delay = min(delay * 2, 1.0)
        self._seq += 1

    async def _heartbeat(self) -> None:
        producer = self._producer
        interval = producer.lease / 3
        while True:
            await asyncio.sleep(interval)  # the heartbeat period
            try:
                cancel = await self._transport.renew(self.stream_id, self._owner, producer.lease_ms)
            except LeaseLost as exc:
                if self._terminal is None:  # not a renewal racing the final write
                    self._failure = exc
                    self._pump.cancel()
                return
            except TransportError as exc:
                logger.warning("run %s: heartbeat failed: %s", self.stream_id, exc)
                continue
            if cancel:
                self._request_cancel("requested")

    async def _watch_cancel(self) -> None:
        try:
            await self._transport.wait_cancel(self.stream_id, self.epoch)
        except TransportError as exc:
            logger.warning(
                "run %s: cancel watch failed (heartbeat still checks): %s", self.stream_id, exc
            )
            return
        self._request_cancel("requested")


class StreamProducer:
    """Starts runs: each reads a source in the background and writes it to a stream.

    The producer owns its runs; :meth:`aclose` (or leaving ``async with``) cancels the ones
    still running, each of which still writes its ``cancelled`` terminal event.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        lease: float = DEFAULT_LEASE,
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        if lease < 0.1:
            raise ConfigurationError("lease must be at least 0.1 seconds")
        if max_buffer < 1:
            raise ConfigurationError("max_buffer must be at least 1")
        self.transport = transport
        self.lease = lease
        self.lease_ms = int(lease * 1000)
        self.max_buffer = max_buffer
        self._runs: dict[str, Run] = {}

    @property
    def runs(self) -> dict[str, Run]:
        """The runs of this producer that have not ended, by stream id."""
        return dict(self._runs)

    async def start(
        self,
        source: AsyncIterable[Any],
        *,
        stream_id: str | None = None,
        reservation: Reservation | None = None,
    ) -> Run:
        """Start reading ``source`` into a stream in the background; return its :class:`Run`.

        ``source`` is a LangGraph ``astream_events(..., version="v2")`` or ``astream(...)``
        iterator, or any async iterable of ``str`` tokens, events or dicts. Without
        ``stream_id`` an unguessable id is generated. Raises :class:`StreamAlreadyRunning`
        if a live producer holds ``stream_id``.

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
        if reservation is not None:
            if stream_id is not None and stream_id != reservation.stream_id:
                raise ValueError("stream_id and reservation name different streams")
            await self._claim(reservation)
            stream_id, epoch, owner = reservation.stream_id, reservation.epoch, reservation.token
            run = Run(self, stream_id, epoch, owner, source, seq=2)
        else:
            stream_id = new_stream_id() if stream_id is None else check_stream_id(stream_id)
            owner = secrets.token_hex(16)
            info = await self.transport.create(stream_id, owner, self.lease_ms)
            run = Run(self, stream_id, info.epoch, owner, source)
        self._runs[stream_id] = run
        run._task.add_done_callback(lambda _: self._forget(run))
        return run

    async def reserve(self, stream_id: str | None = None, *, start_timeout: float) -> Reservation:
        """Create a run for another producer (a task queue's worker) to :meth:`start` later.

        The stream exists at once, so readers can wait on it from the moment the work is
        queued. If no producer starts it within ``start_timeout`` seconds, the first reader
        to notice ends it with an ``error`` event whose code is ``not_started``. Send the
        returned :class:`Reservation` with the task (``str(reservation)`` or
        ``reservation.to_dict()``). Raises :class:`StreamAlreadyRunning` like :meth:`start`.
        """
        if not start_timeout >= 0.1:
            raise ConfigurationError("start_timeout must be at least 0.1 seconds")
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

    async def _claim(self, reservation: Reservation) -> None:
        """Take a reserved run over, exactly once: entry 2 names the claimant, and appends
        of a seq already stored are no-ops, so of two claims the one stored wins."""
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
            await self.transport.renew(stream_id, token, self.lease_ms)
            await self.transport.append(stream_id, token, Entry(epoch, 2, claim), 1)
        except LeaseLost:
            raise ReservationExpired(stream_id) from None
        stored = await self.transport.read(stream_id, epoch, 1, 1)
        if not stored or stored[0].payload != claim:
            raise StreamAlreadyRunning(stream_id)

    def _forget(self, run: Run) -> None:
        if self._runs.get(run.stream_id) is run:
            del self._runs[run.stream_id]

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
