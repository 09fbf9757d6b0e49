"""Serve streams over HTTP from a Starlette or FastAPI app: SSE or NDJSON, resumable.

```python
from resumable_stream import from_url
from resumable_stream.starlette import StreamRouter

transport = from_url("redis://localhost:6379/0")
app.mount("/streams", StreamRouter(transport, authorize=my_check), name="streams")
```

``authorize`` is required: ``my_check(request, stream_id, action)`` returns true to allow
``action`` (``"read"``, ``"status"`` or ``"cancel"``); :func:`allow_all` opens every stream
to anyone who knows its id.

A browser's ``EventSource`` on ``/streams/{stream_id}`` resumes by itself after a dropped
connection: it sends back the last event's id (its offset) as ``Last-Event-ID``. Needs the
``web`` extra (Starlette); see docs/http.md.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, Literal
from urllib.parse import quote

import orjson

try:
    from starlette.exceptions import HTTPException
    from starlette.middleware.exceptions import ExceptionMiddleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute, Route, Router
    from starlette.types import Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "resumable_stream.starlette needs Starlette: pip install 'resumable-llm-stream[web]'"
    ) from exc

from ._asgi import ConnectionLimit, StreamEngine, check_options, http_error
from ._constants import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PING_INTERVAL,
    DEFAULT_RETRY,
    DEFAULT_SEND_TIMEOUT,
)
from ._consumer import StreamConsumer, settled_info
from ._exceptions import ConfigurationError, ResumableStreamError, StreamNotFound
from ._http import (
    CLIENT_GONE,
    FORBIDDEN,
    JSON_TYPE,
    NDJSON,
    SSE,
    HTTPError,
    body_too_large,
    http_status_error,
    is_json_type,
    negotiate,
    not_running,
    stream_headers,
    unsupported_media_type,
)
from ._ids import check_stream_id
from ._producer import StreamProducer
from .transports import Transport

__all__ = [
    "Action",
    "Authorize",
    "ConnectionLimit",
    "StreamResponse",
    "StreamRouter",
    "allow_all",
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


def allow_all(request: Request, stream_id: str | None, action: str) -> bool:
    """An ``authorize`` that allows every action on every stream to anyone.

    Anyone who knows a stream id may then read, inspect and cancel it. Generated ids are
    unguessable (128 random bits), so they work as capability URLs; pass it on purpose,
    when that is what you want: ``StreamRouter(transport, authorize=allow_all)``.
    """
    return True


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


def _check_body_limit(max_body_bytes: int) -> None:
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int):
        raise ConfigurationError(f"max_body_bytes must be an int, not {max_body_bytes!r}")
    if max_body_bytes <= 0:
        raise ConfigurationError("max_body_bytes must be > 0 (bytes)")


async def _read_body(request: Request, limit: int) -> bytes | HTTPError:
    """The request's body, or the error to answer: larger than ``limit`` bytes (413, told by
    its Content-Length before any of it is read), or a client gone before its end (400)."""
    try:
        if int(request.headers.get("content-length", 0)) > limit:
            return body_too_large(limit)
    except ValueError:
        return HTTPError(400, "invalid_request", "the Content-Length header must be a number")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # a chunked body, or one longer than its Content-Length said
                return body_too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        return CLIENT_GONE
    # Kept where Request.body() looks, for a source that reads the request again.
    request._body = body = b"".join(chunks)
    return body


async def _read_json_body(request: Request, limit: int) -> bytes | HTTPError:
    """:func:`_read_body` for a body read as JSON: one sent with a Content-Type other than
    JSON, or with none, is ``415 unsupported_media_type``. A page of another origin can send
    those without a CORS preflight (a ``text/plain`` string, a form, a ``Blob`` with no
    type), with the user's cookies; ``application/json`` needs the preflight. An empty body
    passes whatever its type: it carries nothing, and no type would keep it out."""
    body = await _read_body(request, limit)
    if isinstance(body, bytes) and body:
        content_type = request.headers.get("content-type")
        if content_type is None or not is_json_type(content_type):
            return unsupported_media_type(content_type)
    return body


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
        return _render(http_error(exc))
    if callable(stream_url):
        url = stream_url(run.stream_id)
    else:
        url = stream_url.format(stream_id=quote(run.stream_id, safe=":@"))
    return _json(202, {"stream_id": run.stream_id, "stream_url": url}, {"location": url})


class _Forbidden(Exception):
    """``authorize`` said no."""


class StreamResponse(Response):
    """Send a :class:`StreamConsumer`'s events as SSE or NDJSON, live, until the end.

    ``format=None`` follows the request's ``Accept`` header: NDJSON if the client prefers
    ``application/x-ndjson`` or refuses ``text/event-stream`` (``q=0``), else SSE. Before
    the headers go out the response waits briefly for the first events, so that an unknown
    stream, an expired or bad offset or a storage failure get a status code (204/404, 410,
    400, 503) instead of an empty stream.

    Then it sends events as they come, several per write when several are ready, a
    keep-alive after ``ping_interval`` seconds of silence, and stops after the terminal
    event. If the client goes away (or does not read for ``send_timeout`` seconds) the
    consumer is released at once and ``on_disconnect`` is awaited; the run goes on.
    Times are in seconds; ``None`` turns pings, the send timeout or ``retry:`` off.
    ``limit`` (a :class:`ConnectionLimit`, such as a router's ``limit``) counts the
    response against that cap: past it, the answer is 503 ``too_many_streams``.
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
        limit: ConnectionLimit | None = None,
    ) -> None:
        check_options(retry, ping_interval, send_timeout)
        negotiated = negotiate("" if request is None else request.headers.get("accept", ""))
        wires = {None: negotiated.wire, "sse": SSE, "ndjson": NDJSON}
        if format not in wires:
            raise ConfigurationError(f"format must be 'sse', 'ndjson' or None, not {format!r}")
        self.consumer = consumer
        self.wire = wires[format]
        # Without a request to tell, an SSE response is for an SSE client.
        self.event_stream_client = self.wire is SSE and (
            request is None or negotiated.event_stream_client
        )
        self.retry = retry
        self.ping_interval = ping_interval
        self.send_timeout = send_timeout
        self.on_disconnect = on_disconnect
        self.limit = limit
        self.status_code = 200
        self.media_type = self.wire.media_type
        self.background = None
        self.raw_headers = stream_headers(self.wire)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The ASGI engine does the work, with this response's settings as they are now
        # (a subclass may have replaced the wire format or added headers).
        engine = StreamEngine(
            self.consumer,
            self.wire,
            headers=self.raw_headers,
            event_stream_client=self.event_stream_client,
            retry=self.retry,
            ping_interval=self.ping_interval,
            send_timeout=self.send_timeout,
            on_disconnect=self.on_disconnect,
            limit=self.limit,
        )
        await engine(scope, receive, send)
        if self.background is not None:
            await self.background()


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
    return _render(http_error(exc, event_stream_client=event_stream_client))


async def _http_exception(request: Request, exc: Exception) -> Response:
    # Routing errors of the mounted router (unknown path, wrong method).
    return _refusal(request, exc)


class _JsonRoute(Route):
    """A route that answers a method it does not serve with the JSON 405 (and ``Allow``)
    itself: its router's handler would, but once its routes are added to an app's own, the
    app's answers, in plain text (Starlette) or as ``{"detail"}`` (FastAPI)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.methods and scope["method"] not in self.methods:
            response = _render(http_status_error(405, "Method Not Allowed"))
            response.headers["allow"] = ", ".join(self.methods)
            await response(scope, receive, send)
        else:
            await super().handle(scope, receive, send)


class _JsonRouting:
    """A router for ``routes`` whose own errors (an unknown path, a wrong method) are JSON
    ``{code, message}`` bodies like the endpoints' (Starlette's are plain text), mounted
    in an app or served as the app itself."""

    __slots__ = ("_app",)

    def __init__(self, routes: list[BaseRoute]) -> None:
        self._app = ExceptionMiddleware(Router(routes), handlers={HTTPException: _http_exception})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if "app" not in scope:
            # Served as the app (no Starlette app around it): Starlette's routing raises
            # its errors to the handlers above only when the scope names an app; else it
            # answers them itself, in plain text.
            scope = {**scope, "app": self}
        await self._app(scope, receive, send)


class StreamRouter:
    """An ASGI app with the stream endpoints; mount it into a Starlette or FastAPI app.

    * ``GET /{stream_id}``: the events as SSE, or NDJSON for ``Accept:
      application/x-ndjson``; resumes after ``Last-Event-ID`` or ``?after=``;
    * ``GET /{stream_id}/status``: status, last offset, created and updated times;
    * ``POST /{stream_id}/cancel``: stop the run, in whichever process it runs.

    ``authorize(request, stream_id, action)`` is required and asked before every action
    (``"read"``, ``"status"`` or ``"cancel"``); false answers 403. Pass :func:`allow_all`
    to open every stream to anyone who knows its id. ``producer`` serves cancel requests (a
    new one on ``transport`` by default; pass the app's own to stop its runs without a
    round trip). With ``cancel_on_disconnect`` a reader that goes away before the end stops
    the run, if ``authorize`` allows that reader to ``"cancel"``. At most
    ``max_connections`` streams are served at once; more get 503 with ``Retry-After``. The
    other options are those of :class:`StreamResponse`.
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
        check_options(retry, ping_interval, send_timeout)
        if authorize is None:
            raise ConfigurationError(
                "StreamRouter needs authorize=: a function (request, stream_id, action) that "
                "returns true when the caller may 'read', 'status' or 'cancel' the stream. "
                "Without one, anyone who knows a stream id could read and cancel it; if that is "
                "what you want, pass authorize=allow_all (from resumable_stream.starlette)."
            )
        self.transport = transport
        self.authorize = authorize
        self.producer = StreamProducer(transport) if producer is None else producer
        self.cancel_on_disconnect = cancel_on_disconnect
        self.retry = retry
        self.ping_interval = ping_interval
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        #: The cap on this router's stream responses; give it to your own routes'
        #: ``StreamResponse(..., limit=router.limit)`` to count them against it too.
        self.limit = ConnectionLimit(max_connections)
        self.routes: list[BaseRoute] = [
            Route("/{stream_id}", self.read_stream, methods=["GET"], name="read_stream"),
            Route("/{stream_id}/status", self.stream_status, methods=["GET"], name="stream_status"),
            Route(
                "/{stream_id}/cancel", self.cancel_stream, methods=["POST"], name="cancel_stream"
            ),
        ]
        self._app = _JsonRouting(self.routes)

    @property
    def connections(self) -> int:
        """Stream responses open right now."""
        return self.limit.count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    async def _allowed(self, request: Request, stream_id: str, action: Action) -> bool:
        allowed = self.authorize(request, stream_id, action)
        if inspect.isawaitable(allowed):
            allowed = await allowed
        return bool(allowed)

    async def _check(self, request: Request, action: Action) -> str:
        stream_id = check_stream_id(request.path_params["stream_id"])
        if not await self._allowed(request, stream_id, action):
            raise _Forbidden
        return stream_id

    async def _cancel_on_disconnect(self, request: Request, stream_id: str) -> None:
        # Leaving is a cancel like POST /cancel: a reader allowed to read, and not to
        # cancel, must not stop someone else's answer by closing its tab (issue 9).
        try:
            allowed = await self._allowed(request, stream_id, "cancel")
        except HTTPException:
            allowed = False
        if not allowed:
            logger.debug("stream %s: the reader left; not allowed to cancel", stream_id)
            return
        await self.producer.cancel(stream_id)

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
                await self._cancel_on_disconnect(request, stream_id)

        return StreamResponse(
            consumer,
            request,
            retry=self.retry,
            ping_interval=self.ping_interval,
            send_timeout=self.send_timeout,
            on_disconnect=on_disconnect,
            limit=self.limit,
        )

    async def stream_status(self, request: Request) -> Response:
        """``GET /{stream_id}/status``: status, last offset, created and updated times."""
        try:
            stream_id = await self._check(request, "status")
            info = await settled_info(self.transport, stream_id)
        except (_Forbidden, HTTPException, ResumableStreamError) as exc:
            return _refusal(request, exc)
        if info is None:
            return _render(http_error(StreamNotFound(stream_id)))
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
            info = await settled_info(self.transport, stream_id)
            if info is not None and info.status == "running":
                if await self.producer.cancel(stream_id):
                    return _json(202, {"stream_id": stream_id, "cancel_requested": True})
                info = await self.transport.info(stream_id)  # it ended meanwhile
        except (_Forbidden, HTTPException, ResumableStreamError) as exc:
            return _refusal(request, exc)
        if info is None:
            return _render(http_error(StreamNotFound(stream_id)))
        return _render(not_running(stream_id, info.status))
