"""The streaming engine: a consumer's events as one ASGI response, with no web framework.

``resumable_stream.starlette`` is the glue (requests, routing, ``authorize``); this module
speaks plain ASGI 3: it holds the headers until the first events (so that errors still get
their status code), writes the events that are ready together in one message, sends
keep-alives on idle streams, cuts a client that stops reading, and notices a client that
leaves at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

from ._constants import BUFFER_LIMIT, FIRST_EVENT_WAIT, SHUTDOWN_WRITE_WAIT, TIMER_SLACK
from ._consumer import StreamConsumer
from ._events import TERMINAL_TYPES
from ._exceptions import ConfigurationError, ResumableStreamError
from ._http import (
    JSON_TYPE,
    SERVER_CLOSING,
    HTTPError,
    WireFormat,
    error_for,
    log_server_error,
    stream_headers,
)
from ._http import too_many_streams as _too_many_streams
from ._sse import retry_field
from ._types import Message, Receive, Scope, Send

logger = logging.getLogger("resumable_stream.http")


class ConnectionLimit:
    """A cap on the stream responses served at once, shared by every response given it.

    ``limit=None`` counts without a cap. A response that finds the cap reached answers 503
    ``too_many_streams`` with ``Retry-After``. One per router by default, so per process;
    pass the router's own (``router.limit``) to your routes' responses to share its cap.
    """

    __slots__ = ("_count", "limit")

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ConfigurationError("max_connections must be at least 1 (or None for no cap)")
        self.limit = limit
        self._count = 0

    @property
    def count(self) -> int:
        """Responses holding a place now."""
        return self._count

    def acquire(self) -> bool:
        """Take a place; false if the cap is reached."""
        if self.limit is not None and self._count >= self.limit:
            return False
        self._count += 1
        return True

    def release(self) -> None:
        """Give a place back."""
        self._count -= 1


class ServerClosed(ConnectionAbortedError):
    """What cut a stream response its server cancelled (a shutdown): the run goes on."""


#: The longest ``retry`` accepted, in seconds: a client told to wait longer never comes back.
MAX_RETRY = 86_400


def check_options(
    retry: float | None, ping_interval: float | None, send_timeout: float | None
) -> None:
    # Written so that nan fails too (it compares false to anything): it passed these checks,
    # and then failed every response (retry is sent in milliseconds, and the clock's timer
    # cannot be set to nan); a retry past a day overflowed its milliseconds (1e306).
    if retry is not None and not 0 <= retry <= MAX_RETRY:
        raise ConfigurationError(
            f"retry must be between 0 and {MAX_RETRY:,} seconds (a day), or None"
        )
    if ping_interval is not None and not ping_interval > 0:
        raise ConfigurationError("ping_interval must be > 0 seconds (or None for no pings)")
    if send_timeout is not None and not send_timeout > 0:
        raise ConfigurationError("send_timeout must be > 0 seconds (or None for no timeout)")


def http_error(exc: BaseException, *, event_stream_client: bool = False) -> HTTPError:
    """:func:`error_for`, with the detail of a 5xx logged (its body leaves it out)."""
    error = error_for(exc, event_stream_client=event_stream_client)
    log_server_error(logger, error, exc)
    return error


async def send_error(send: Send, error: HTTPError) -> None:
    """Answer ``error`` as a whole response: JSON ``{code, message}``, or empty for 204."""
    for message in _error_messages(error):
        await send(message)


def _error_messages(error: HTTPError) -> list[Message]:
    headers = [(name.encode(), value.encode()) for name, value in error.headers().items()]
    body = b""
    if error.status != 204:
        body = error.body()
        headers += [
            (b"content-type", JSON_TYPE.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
    return [_start(headers, error.status), _body(body, more=False)]


def _start(headers: list[tuple[bytes, bytes]], status: int = 200) -> Message:
    return {"type": "http.response.start", "status": status, "headers": headers}


def _body(body: bytes, *, more: bool) -> Message:
    return {"type": "http.response.body", "body": body, "more_body": more}


class _ClientGone(Exception):
    """The client closed the connection."""


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    raise _ClientGone


class _Connection:
    """One stream response in flight: the events read ahead of the client, and its clock.

    The reader task puts encoded events in; the writer takes all that is there in one write
    (so events that are ready together leave together). While the writer waits with nothing
    to write (``idle``), the reader writes a live event itself (not the end). One timer per
    connection makes a keep-alive due after ``ping_interval`` idle seconds, and cancels the
    writer when one write takes ``send_timeout`` seconds (the client stopped reading). It
    is re-armed lazily: a timeout around every write or wait would put a timer in the
    loop's heap per event of every connection.
    """

    __slots__ = (
        "_handle",
        "_loop",
        "_ping_interval",
        "_send",
        "_send_timeout",
        "_writer",
        "chunks",
        "complete",
        "done",
        "error",
        "idle",
        "last_write",
        "ping_due",
        "ready",
        "sending_since",
        "size",
        "space",
        "started",
        "stuck",
        "unsent",
    )

    def __init__(self, send: Send) -> None:
        self._send = send
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._ping_interval: float | None = None
        self._send_timeout: float | None = None
        self._writer: asyncio.Task[None] | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False
        self.error: ResumableStreamError | None = None
        self.ready = asyncio.Event()
        self.space = asyncio.Event()
        self.stuck = False
        self.started = False  # the headers went out
        self.complete = False  # the last body went out
        self.idle = False  # the writer waits, with nothing to write and no one waking it
        self.ping_due = False
        # On time.monotonic(), a C call (the stock loop's time() is a Python method around
        # it): read once per write, when it starts.
        self.last_write = time.monotonic()  # when the last write that completed started
        self.sending_since: float | None = None
        self.unsent: Message | None = None  # the write in progress (cut short: never sent)

    def put(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)

    def wake(self) -> None:
        """Wake the writer (events to write, the end, or a keep-alive due)."""
        self.idle = False
        self.ready.set()

    def take(self) -> bytes:
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self.size >= BUFFER_LIMIT:  # the reader waits for space (only then)
            self.space.set()
        self.size = 0
        return body

    def finish(self, error: ResumableStreamError | None = None) -> None:
        self.error = error
        self.done = True
        self.wake()

    async def write(self, message: Message) -> None:
        began = self.sending_since = time.monotonic()
        self.unsent = message
        try:
            await self._send(message)
        except OSError:
            # ASGI 2.4 servers may raise it for a client that is gone (uvicorn drops the
            # message instead, and the disconnect watcher notices).
            raise _ClientGone from None
        self.unsent = None
        self.sending_since = None
        # (When it began: a keep-alive is due an interval after that, so a write that
        # took long brings the next one that much earlier.)
        self.last_write = began
        if message["type"] == "http.response.start":
            self.started = True
        elif not message.get("more_body", False):
            self.complete = True

    def start_clock(
        self, ping_interval: float | None, send_timeout: float | None, writer: asyncio.Task[None]
    ) -> None:
        # A method, not a closure: a closure re-arming itself is a reference cycle, and
        # every finished connection would wait for the garbage collector (issue 11).
        self._ping_interval = ping_interval
        self._send_timeout = send_timeout
        self._writer = writer
        if ping_interval is not None or send_timeout is not None:
            self._handle = self._loop.call_later(
                min(ping_interval or math.inf, send_timeout or math.inf), self._check
            )

    def _check(self) -> None:
        # A deadline less than TIMER_SLACK away counts as reached: uvloop rounds a timer's
        # delay to whole milliseconds (it may fire early), and runs one of under half a
        # millisecond at its next turn: re-armed for what was left, the clock spun until
        # time.monotonic() got there (hundreds of checks).
        now = time.monotonic()
        wait = math.inf
        send_timeout, ping_interval = self._send_timeout, self._ping_interval
        if send_timeout is not None:
            if self.sending_since is None:
                wait = send_timeout
            elif now - self.sending_since >= send_timeout - TIMER_SLACK:
                # As asyncio.timeout() does, without a timer per write: the writer tells
                # this cancellation from others by `stuck`.
                self.stuck = True
                if self._writer is not None:
                    self._writer.cancel()
                return
            else:
                wait = self.sending_since + send_timeout - now
        if ping_interval is not None:
            idle = 0.0 if self.sending_since is not None else now - self.last_write
            if idle >= ping_interval - TIMER_SLACK:
                self.ping_due = True
                self.wake()
                idle = 0.0
            wait = min(wait, ping_interval - idle)
        self._handle = self._loop.call_later(wait, self._check)

    def stop_clock(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._writer = None


class StreamEngine:
    """Serve ``consumer``'s events as one ASGI HTTP response, in ``wire`` format.

    Three tasks per connection: the one that calls it writes, one reads the consumer ahead
    of the client (and writes what it read itself when the writer waits idle), one waits
    for ``http.disconnect``. The consumer is closed when it returns. ``limit``, if given,
    is held for as long as the response is served. ``headers`` default to the wire
    format's stream headers.
    """

    __slots__ = (
        "_headers",
        "_retry_line",
        "consumer",
        "event_stream_client",
        "limit",
        "on_disconnect",
        "ping_interval",
        "send_timeout",
        "wire",
    )

    def __init__(
        self,
        consumer: StreamConsumer,
        wire: WireFormat,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        event_stream_client: bool,
        retry: float | None,
        ping_interval: float | None,
        send_timeout: float | None,
        on_disconnect: Callable[[], Awaitable[object]] | None = None,
        limit: ConnectionLimit | None = None,
    ) -> None:
        check_options(retry, ping_interval, send_timeout)
        self.consumer = consumer
        self.wire = wire
        self.event_stream_client = event_stream_client
        self.ping_interval = ping_interval
        self.send_timeout = send_timeout
        self.on_disconnect = on_disconnect
        self.limit = limit
        self._retry_line = b""
        if retry is not None and wire.name == "sse":
            self._retry_line = retry_field(round(retry * 1000))
        self._headers = stream_headers(wire) if headers is None else headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit
        if limit is not None and not limit.acquire():
            await self.consumer.aclose()
            await send_error(send, _too_many_streams(limit.count))
            return
        try:
            await self._serve(scope, receive, send)
        finally:
            await self.consumer.aclose()
            if limit is not None:
                limit.release()

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer = asyncio.current_task()
        if writer is None:  # pragma: no cover - ASGI servers run each request in a task
            raise RuntimeError("a stream response must run in an asyncio task")
        cancelling = writer.cancelling()
        connection = _Connection(send)
        connection.start_clock(self.ping_interval, self.send_timeout, writer)
        gone = False
        try:
            try:
                async with asyncio.TaskGroup() as tasks:
                    helpers = [
                        tasks.create_task(_until_disconnect(receive)),
                        tasks.create_task(self._read(connection)),
                    ]
                    await self._write(scope, connection)
                    for task in helpers:
                        task.cancel()
            except* _ClientGone:
                gone = True
        except asyncio.CancelledError:
            if not connection.stuck or writer.uncancel() > cancelling:
                # Not (only) the clock's: the server's, at the end of its graceful shutdown
                # (uvicorn's --timeout-graceful-shutdown). Raised on, uvicorn logs it as an
                # error and cuts the body mid-chunk; the response ends instead, as one cut
                # by a read error (the client resumes elsewhere), and the request is over.
                if not await self._end_early(connection, scope):
                    raise
                writer.uncancel()  # taken: the task goes on, and ends with the request
                return
            gone = True
            logger.info(
                "stream %s: the client read nothing for %ss; dropping the connection",
                self.consumer.stream_id,
                self.send_timeout,
            )
        except BaseExceptionGroup as group:
            # Anything else (say, a bug in a consumer subclass) reaches the app as itself,
            # so that its exception handlers match.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        else:
            if connection.stuck:  # the clock cancelled, and a disconnect won the race
                writer.uncancel()
        finally:
            connection.stop_clock()
        if gone and not connection.done and self.on_disconnect is not None:
            try:
                await self.on_disconnect()
            except Exception:
                logger.warning(
                    "stream %s: on_disconnect failed", self.consumer.stream_id, exc_info=True
                )

    async def _end_early(self, connection: _Connection, scope: Scope) -> bool:
        """(Cancelled by the server) End the response with what was read, without its end:
        the client resumes from its last offset; or, for a read (GET) with nothing read nor
        sent, answer 503 ``server_closing`` (not to an EventSource: it reconnects after a
        200 that ends, and stops for good on a 503). False if the client does not take the last
        write within SHUTDOWN_WRITE_WAIT."""
        if connection.complete:
            return True
        if (
            scope.get("method") in ("GET", "HEAD")
            and not self.event_stream_client
            and not (
                connection.started or connection.done or connection.chunks or connection.unsent
            )
        ):
            # A status the client retries on (elsewhere), not a 200 with nothing in it. Not
            # for a POST's response: that request started a run, which a retry would repeat;
            # nor for an EventSource, which stops for good on a 503 but reconnects after a
            # 200 that ends (and the AI SDK's, whose cut says to resume).
            messages = _error_messages(SERVER_CLOSING)
        else:
            # A write the cancellation cut short goes out first: uvicorn waits for a slow
            # client before it writes, so that write sent nothing, and the events read
            # after it alone would leave a gap before the client's last offset (its resume
            # would never read them).
            unsent = connection.unsent
            if unsent is None or unsent["type"] != "http.response.body":
                unsent = _body(b"", more=True)
            if unsent.get("more_body", False):
                body = unsent["body"] + connection.take()
                if not (connection.done and connection.error is None) and self.wire.cut:
                    body += self.wire.cut(connection.error or ServerClosed("the server closed it"))
            else:  # the last write, its end (or cut) in it
                body = unsent["body"]
            messages = [_body(body, more=False)]
            if not connection.started:
                messages.insert(0, _start(self._headers))
        try:
            async with asyncio.timeout(SHUTDOWN_WRITE_WAIT):
                for message in messages:
                    await connection.write(message)
        except _ClientGone:
            return True
        except TimeoutError:
            return False
        return True

    async def _read(self, connection: _Connection) -> None:
        encode = self.wire.encode
        consumer = self.consumer
        try:
            async for event in consumer:
                connection.put(encode(event))
                if connection.size >= BUFFER_LIMIT:
                    connection.space.clear()
                    connection.wake()
                    await connection.space.wait()
                elif (
                    connection.idle
                    and event.type not in TERMINAL_TYPES  # (event.terminal, without a call)
                    and not consumer._at_hand()
                ):
                    # The writer waits and no more events are at hand: write from here,
                    # without waking it (one task wake-up less per live event). A client
                    # that stops reading is cut as before: the clock cancels the writer,
                    # and the task group this task with it. The end stays the writer's,
                    # also renamed by a consumer subclass (the stream has ended, so the
                    # consumer has its StopAsyncIteration at hand): the response is done
                    # before the end is written.
                    await connection.write(_body(connection.take(), more=True))
                else:
                    # More at hand (the writer takes them all in one write), a writer
                    # already awake, or the end. Woken now, not once the rest is read: a
                    # consumer that skips events may wait for the network before it
                    # returns the next one.
                    connection.wake()
        except ResumableStreamError as exc:
            connection.finish(exc)
        else:
            connection.finish()

    async def _write(self, scope: Scope, connection: _Connection) -> None:
        # Hold the headers until the first events or an error (so errors get their status
        # code), for at most FIRST_EVENT_WAIT: a ping due meanwhile does not count.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_EVENT_WAIT):
                while not connection.chunks and not connection.done:
                    connection.ready.clear()
                    await connection.ready.wait()
        connection.ping_due = False
        if connection.done and not connection.chunks:
            await self._write_empty(connection)
            return
        await connection.write(_start(self._headers))
        if scope.get("method") == "HEAD":
            await connection.write(_body(b"", more=False))
            return
        retry_line = self._retry_line
        keepalive = self.wire.keepalive
        while True:
            if not connection.chunks and not connection.done and not connection.ping_due:
                connection.ready.clear()
                # Parked: the reader may write events itself meanwhile (once the retry
                # field has gone out in front of the first).
                connection.idle = not retry_line
                await connection.ready.wait()
            if connection.ping_due and not connection.chunks and not connection.done:
                connection.ping_due = False
                await connection.write(_body(keepalive, more=True))
                continue
            connection.ping_due = False
            body = connection.take()
            if body and retry_line:
                # In front of the first event, so that it joins that event's block.
                body, retry_line = retry_line + body, b""
            if connection.done:
                if connection.error is not None:
                    # Headers are gone: end the response; the client resumes from its last
                    # offset and then gets the error's status code.
                    logger.warning(
                        "stream %s: ending the response early: %s",
                        self.consumer.stream_id,
                        connection.error,
                    )
                    if self.wire.cut is not None:
                        body += self.wire.cut(connection.error)
                await connection.write(_body(body, more=False))
                return
            await connection.write(_body(body, more=True))

    async def _write_empty(self, connection: _Connection) -> None:
        """Answer a stream that has nothing to send: an error, or a resume after the end."""
        if connection.error is not None:
            error = http_error(connection.error, event_stream_client=self.event_stream_client)
        elif self.event_stream_client or self.wire.name == "ndjson":
            # Resumed after the terminal event: a 200 would make EventSource reconnect for
            # ever; 204 makes it stop. NDJSON answers the same (issue 9: an empty 200).
            error = HTTPError(204, "", "")
        else:  # an SSE client that is not an EventSource: an empty stream
            await connection.write(_start(self._headers))
            await connection.write(_body(b"", more=False))
            return
        await send_error(connection.write, error)
