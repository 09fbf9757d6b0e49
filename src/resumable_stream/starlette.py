"""Serve streams over HTTP from a Starlette or FastAPI app: SSE or NDJSON, resumable.

```python
from resumable_stream import from_url
from resumable_stream.starlette import StreamRouter

transport = from_url("redis://localhost:6379/0")
app.mount("/streams", StreamRouter(transport, authorize=my_check), name="streams")
```

A browser's ``EventSource`` on ``/streams/{stream_id}`` resumes by itself after a dropped
connection: it sends back the last event's id (its offset) as ``Last-Event-ID``. Needs the
``web`` extra (Starlette); see docs/http.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, Literal
from urllib.parse import quote

import orjson

try:
    from starlette.exceptions import HTTPException
    from starlette.middleware.exceptions import ExceptionMiddleware
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute, Route, Router
    from starlette.types import Message, Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "resumable_stream.starlette needs Starlette: pip install 'resumable-llm-stream[web]'"
    ) from exc

from ._constants import (
    BUFFER_LIMIT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PING_INTERVAL,
    DEFAULT_RETRY,
    DEFAULT_SEND_TIMEOUT,
    FIRST_EVENT_WAIT,
)
from ._consumer import StreamConsumer
from ._exceptions import ConfigurationError, ResumableStreamError, StreamNotFound
from ._http import (
    FORBIDDEN,
    JSON_TYPE,
    NDJSON,
    SSE,
    HTTPError,
    error_for,
    http_status_error,
    negotiate,
    not_running,
    stream_headers,
    too_many_streams,
)
from ._ids import check_stream_id
from ._producer import StreamProducer
from ._sse import retry_field
from .transports import Transport

__all__ = [
    "Action",
    "Authorize",
    "StreamResponse",
    "StreamRouter",
    "error_response",
    "resume_after",
    "start_stream",
]

logger = logging.getLogger("resumable_stream.http")

#: What a request wants to do with a stream, as passed to ``authorize``.
Action = Literal["read", "status", "cancel"]
#: ``authorize(request, stream_id, action)``: true to allow; may be async; may raise
#: Starlette's ``HTTPException`` (for example 401) to answer with that status instead of 403.
Authorize = Callable[[Request, str, Action], bool | Awaitable[bool]]


def resume_after(request: Request) -> str | None:
    """The offset to resume after: ``Last-Event-ID``, else the ``after`` query parameter.

    Browsers cannot set headers on an ``EventSource``'s first connection, hence ``after``;
    on reconnection they send ``Last-Event-ID`` to the same URL, so the header wins.
    """
    return request.headers.get("last-event-id") or request.query_params.get("after") or None


def _render(error: HTTPError) -> Response:
    if error.status == 204:
        return Response(status_code=204, headers=error.headers())
    return Response(error.body(), error.status, error.headers(), JSON_TYPE)


def _json(status: int, content: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content), status, {"cache-control": "no-store", **(headers or {})}, JSON_TYPE
    )


async def error_response(request: Request, exc: Exception) -> Response:
    """The JSON error response for ``exc``, as the router answers it.

    Also an exception handler for custom routes:
    ``app.add_exception_handler(ResumableStreamError, error_response)``.
    """
    return _refusal(request, exc, stream=True)


async def start_stream(
    producer: StreamProducer,
    source: AsyncIterable[Any],
    *,
    stream_url: str | Callable[[str], str],
    stream_id: str | None = None,
) -> Response:
    """Start a run and answer ``202 Accepted`` with ``Location`` set to its stream URL.

    ``stream_url`` is a template such as ``"/streams/{stream_id}"``, or a function of the
    stream id. The body is ``{"stream_id": ..., "stream_url": ...}``. Errors (a stream id that
    is invalid or already running, storage down) get the router's JSON error responses.
    """
    try:
        run = await producer.start(source, stream_id=stream_id)
    except ResumableStreamError as exc:
        return _render(error_for(exc))
    if callable(stream_url):
        url = stream_url(run.stream_id)
    else:
        url = stream_url.format(stream_id=quote(run.stream_id, safe=":@"))
    return _json(202, {"stream_id": run.stream_id, "stream_url": url}, {"location": url})


class _ClientGone(Exception):
    """The client closed the connection."""


class _ClientStuck(Exception):
    """The client stopped reading: one write took longer than the send timeout."""


class _Forbidden(Exception):
    """``authorize`` said no."""


class _Connection:
    """One stream response in flight: the events read ahead of the client, and its clock.

    The reader task puts encoded events in; the writer takes all that is there in one write
    (so events that are ready together leave together). One timer per connection makes a
    keep-alive due after ``ping_interval`` idle seconds and declares the client stuck when
    one write takes ``send_timeout`` seconds. It is re-armed lazily: a timeout around every
    write or wait would put a timer in the loop's heap per event of every connection.
    """

    __slots__ = (
        "_handle",
        "_loop",
        "_send",
        "chunks",
        "done",
        "error",
        "last_write",
        "ping_due",
        "ready",
        "sending_since",
        "size",
        "space",
        "stuck",
    )

    def __init__(self, send: Send) -> None:
        self._send = send
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False
        self.error: ResumableStreamError | None = None
        self.ready = asyncio.Event()
        self.space = asyncio.Event()
        self.stuck = asyncio.Event()
        self.ping_due = False
        self.last_write = self._loop.time()
        self.sending_since: float | None = None

    def put(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        self.ready.set()

    def take(self) -> bytes:
        body = b"".join(self.chunks)
        self.chunks.clear()
        self.size = 0
        self.space.set()
        return body

    def finish(self, error: ResumableStreamError | None = None) -> None:
        self.error = error
        self.done = True
        self.ready.set()

    async def write(self, message: Message) -> None:
        self.sending_since = self._loop.time()
        try:
            await self._send(message)
        except OSError:
            # ASGI 2.4 servers may raise it for a client that is gone (uvicorn drops the
            # message instead, and the disconnect watcher notices).
            raise _ClientGone from None
        self.sending_since = None
        self.last_write = self._loop.time()

    def start_clock(self, ping_interval: float | None, send_timeout: float | None) -> None:
        loop = self._loop

        def check() -> None:
            now = loop.time()
            wait = math.inf
            if send_timeout is not None:
                if self.sending_since is None:
                    wait = send_timeout
                elif now - self.sending_since >= send_timeout:
                    self.stuck.set()
                    return
                else:
                    wait = self.sending_since + send_timeout - now
            if ping_interval is not None:
                idle = 0.0 if self.sending_since is not None else now - self.last_write
                if idle >= ping_interval:
                    self.ping_due = True
                    self.ready.set()
                    idle = 0.0
                wait = min(wait, ping_interval - idle)
            self._handle = loop.call_later(wait, check)

        if ping_interval is not None or send_timeout is not None:
            self._handle = loop.call_later(
                min(ping_interval or math.inf, send_timeout or math.inf), check
            )

    def stop_clock(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


def _check_options(
    retry: float | None, ping_interval: float | None, send_timeout: float | None
) -> None:
    if retry is not None and retry < 0:
        raise ConfigurationError("retry must be >= 0 seconds (or None)")
    if ping_interval is not None and ping_interval <= 0:
        raise ConfigurationError("ping_interval must be > 0 seconds (or None for no pings)")
    if send_timeout is not None and send_timeout <= 0:
        raise ConfigurationError("send_timeout must be > 0 seconds (or None for no timeout)")


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    raise _ClientGone


async def _until_stuck(connection: _Connection) -> None:
    await connection.stuck.wait()
    raise _ClientStuck


class StreamResponse(Response):
    """Send a :class:`StreamConsumer`'s events as SSE or NDJSON, live, until the end.

    ``format=None`` follows the request's ``Accept`` header: NDJSON if the client prefers
    ``application/x-ndjson``, else SSE. Before the headers go out the response waits briefly
    for the first events, so that an unknown stream, an expired or bad offset or a storage
    failure get a status code (204/404, 410, 400, 503) instead of an empty stream.

    Then it sends events as they come, several per write when several are ready, a
    keep-alive after ``ping_interval`` seconds of silence, and stops after the terminal
    event. If the client goes away (or does not read for ``send_timeout`` seconds) the
    consumer is released at once and ``on_disconnect`` is awaited; the run goes on.
    Times are in seconds; ``None`` turns pings, the send timeout or ``retry:`` off.
    """

    def __init__(
        self,
        consumer: StreamConsumer,
        request: Request | None = None,
        *,
        format: Literal["sse", "ndjson"] | None = None,
        retry: float | None = DEFAULT_RETRY,
        ping_interval: float | None = DEFAULT_PING_INTERVAL,
        send_timeout: float | None = DEFAULT_SEND_TIMEOUT,
        on_disconnect: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        _check_options(retry, ping_interval, send_timeout)
        negotiated = negotiate("" if request is None else request.headers.get("accept", ""))
        if format is None:
            self.wire = negotiated.wire
        else:
            self.wire = SSE if format == "sse" else NDJSON
        # Without a request to tell, an SSE response is for an SSE client.
        self.event_stream_client = self.wire is SSE and (
            request is None or negotiated.event_stream_client
        )
        self.consumer = consumer
        self.ping_interval = ping_interval
        self.send_timeout = send_timeout
        self.on_disconnect = on_disconnect
        self._retry_line = b""
        if retry is not None and self.wire is SSE:
            self._retry_line = retry_field(round(retry * 1000))
        self.status_code = 200
        self.media_type = self.wire.media_type
        self.background = None
        self.raw_headers = stream_headers(self.wire)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._serve(scope, receive, send)
        finally:
            await self.consumer.aclose()
        if self.background is not None:
            await self.background()

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        connection = _Connection(send)
        connection.start_clock(self.ping_interval, self.send_timeout)
        gone = False
        try:
            try:
                async with asyncio.TaskGroup() as tasks:
                    helpers = [
                        tasks.create_task(_until_disconnect(receive)),
                        tasks.create_task(_until_stuck(connection)),
                        tasks.create_task(self._read(connection)),
                    ]
                    await self._write(scope, connection)
                    for task in helpers:
                        task.cancel()
            except* _ClientGone:
                gone = True
            except* _ClientStuck:
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
        finally:
            connection.stop_clock()
        if gone and not connection.done and self.on_disconnect is not None:
            try:
                await self.on_disconnect()
            except Exception:
                logger.warning(
                    "stream %s: on_disconnect failed", self.consumer.stream_id, exc_info=True
                )

    async def _read(self, connection: _Connection) -> None:
        encode = self.wire.encode
        try:
            async for event in self.consumer:
                connection.put(encode(event))
                if connection.size >= BUFFER_LIMIT:
                    connection.space.clear()
                    await connection.space.wait()
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
        await connection.write(_start(self.raw_headers))
        if scope.get("method") == "HEAD":
            await connection.write(_body(b"", more=False))
            return
        retry_line = self._retry_line
        while True:
            if not connection.chunks and not connection.done and not connection.ping_due:
                connection.ready.clear()
                await connection.ready.wait()
            if connection.ping_due and not connection.chunks and not connection.done:
                connection.ping_due = False
                await connection.write(_body(self.wire.keepalive, more=True))
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
                await connection.write(_body(body, more=False))
                return
            await connection.write(_body(body, more=True))

    async def _write_empty(self, connection: _Connection) -> None:
        """Answer a stream that has nothing to send: an error, or a resume after the end."""
        if connection.error is not None:
            error = error_for(connection.error, event_stream_client=self.event_stream_client)
            response = _render(error)
        elif self.event_stream_client:
            # Resumed after the terminal event: a 200 would make EventSource reconnect for
            # ever; 204 makes it stop.
            response = Response(status_code=204, headers={"cache-control": "no-store"})
        else:  # an empty stream, with the stream's own headers
            await connection.write(_start(self.raw_headers))
            await connection.write(_body(b"", more=False))
            return
        await connection.write(_start(response.raw_headers, response.status_code))
        await connection.write(_body(bytes(response.body), more=False))


def _start(headers: list[tuple[bytes, bytes]], status: int = 200) -> Message:
    return {"type": "http.response.start", "status": status, "headers": headers}


def _body(body: bytes, *, more: bool) -> Message:
    return {"type": "http.response.body", "body": body, "more_body": more}


class _RouterStreamResponse(StreamResponse):
    """A stream response that counts against its router's connection cap."""

    def __init__(self, router: StreamRouter, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        router = self._router
        limit = router.max_connections
        if limit is not None and router._connections >= limit:
            await self.consumer.aclose()
            await _render(too_many_streams(limit))(scope, receive, send)
            return
        router._connections += 1
        try:
            await super().__call__(scope, receive, send)
        finally:
            router._connections -= 1


def _refusal(request: Request, exc: Exception, *, stream: bool = False) -> Response:
    """The response of an endpoint that refuses: denied, an HTTPException, a library error.

    The endpoints render these themselves, rather than leave them to the app's exception
    handlers, so that their errors are the same JSON mounted or in a FastAPI router.
    """
    if isinstance(exc, _Forbidden):
        return _render(FORBIDDEN)
    if isinstance(exc, HTTPException):
        response = _render(http_status_error(exc.status_code, exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response
    event_stream_client = (
        stream and negotiate(request.headers.get("accept", "")).event_stream_client
    )
    return _render(error_for(exc, event_stream_client=event_stream_client))


async def _http_exception(request: Request, exc: Exception) -> Response:
    # Routing errors of the mounted router (unknown path, wrong method).
    return _refusal(request, exc)


class StreamRouter:
    """An ASGI app with the stream endpoints; mount it into a Starlette or FastAPI app.

    * ``GET /{stream_id}``: the events as SSE, or NDJSON for ``Accept:
      application/x-ndjson``; resumes after ``Last-Event-ID`` or ``?after=``;
    * ``GET /{stream_id}/status``: status, last offset, created and updated times;
    * ``POST /{stream_id}/cancel``: stop the run, in whichever process it runs.

    ``authorize(request, stream_id, action)`` is called by every endpoint (action
    ``"read"``, ``"status"`` or ``"cancel"``); false answers 403. ``producer`` serves cancel
    requests (a new one on ``transport`` by default; pass the app's own to stop its runs
    without a round trip). With ``cancel_on_disconnect`` a reader that goes away before the
    end stops the run. At most ``max_connections`` streams are served at once; more get
    503 with ``Retry-After``. The other options are those of :class:`StreamResponse`.
    Every error is JSON: ``{"code": ..., "message": ...}``.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        authorize: Authorize | None = None,
        producer: StreamProducer | None = None,
        cancel_on_disconnect: bool = False,
        retry: float | None = DEFAULT_RETRY,
        ping_interval: float | None = DEFAULT_PING_INTERVAL,
        send_timeout: float | None = DEFAULT_SEND_TIMEOUT,
        max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        _check_options(retry, ping_interval, send_timeout)
        if max_connections is not None and max_connections < 1:
            raise ConfigurationError("max_connections must be at least 1 (or None for no cap)")
        self.transport = transport
        self.authorize = authorize
        self.producer = StreamProducer(transport) if producer is None else producer
        self.cancel_on_disconnect = cancel_on_disconnect
        self.retry = retry
        self.ping_interval = ping_interval
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self._connections = 0
        self.routes: list[BaseRoute] = [
            Route("/{stream_id}", self.read_stream, methods=["GET"], name="read_stream"),
            Route("/{stream_id}/status", self.stream_status, methods=["GET"], name="stream_status"),
            Route(
                "/{stream_id}/cancel", self.cancel_stream, methods=["POST"], name="cancel_stream"
            ),
        ]
        self._app = ExceptionMiddleware(
            Router(self.routes), handlers={HTTPException: _http_exception}
        )

    @property
    def connections(self) -> int:
        """Stream responses open right now."""
        return self._connections

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    async def _check(self, request: Request, action: Action) -> str:
        stream_id = check_stream_id(request.path_params["stream_id"])
        if self.authorize is not None:
            allowed = self.authorize(request, stream_id, action)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if not allowed:
                raise _Forbidden
        return stream_id

    async def read_stream(self, request: Request) -> Response:
        """``GET /{stream_id}``: the stream's events, from ``Last-Event-ID`` / ``after``."""
        try:
            stream_id = await self._check(request, "read")
            consumer = StreamConsumer(self.transport, stream_id, after=resume_after(request))
        except (_Forbidden, HTTPException, ResumableStreamError) as exc:
            return _refusal(request, exc, stream=True)
        on_disconnect = None
        if self.cancel_on_disconnect:

            async def on_disconnect() -> None:
                await self.producer.cancel(stream_id)

        return _RouterStreamResponse(
            self,
            consumer,
            request,
            retry=self.retry,
            ping_interval=self.ping_interval,
            send_timeout=self.send_timeout,
            on_disconnect=on_disconnect,
        )

    async def stream_status(self, request: Request) -> Response:
        """``GET /{stream_id}/status``: status, last offset, created and updated times."""
        try:
            stream_id = await self._check(request, "status")
            info = await self.transport.info(stream_id)
        except (_Forbidden, HTTPException, ResumableStreamError) as exc:
            return _refusal(request, exc)
        if info is None:
            return _render(error_for(StreamNotFound(stream_id)))
        return _json(
            200,
            {
                "stream_id": stream_id,
                "status": info.status,
                "next_offset": info.last_offset,
                "created_at": info.created_at,
                "updated_at": info.updated_at,
            },
        )

    async def cancel_stream(self, request: Request) -> Response:
        """``POST /{stream_id}/cancel``: ask the run to stop; 202 once asked."""
        try:
            stream_id = await self._check(request, "cancel")
            if await self.producer.cancel(stream_id):
                return _json(202, {"stream_id": stream_id, "cancel_requested": True})
            info = await self.transport.info(stream_id)
        except (_Forbidden, HTTPException, ResumableStreamError) as exc:
            return _refusal(request, exc)
        if info is None:
            return _render(error_for(StreamNotFound(stream_id)))
        return _render(not_running(stream_id, info.status))
