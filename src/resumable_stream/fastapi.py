"""FastAPI integration: the stream endpoints as an ``APIRouter``, described in OpenAPI.

```python
from resumable_stream.fastapi import StreamAPIRouter
from resumable_stream.starlette import StreamRouter

streams = StreamRouter(transport, authorize=my_check)
app.include_router(StreamAPIRouter(streams), prefix="/streams")
```

``app.mount("/streams", streams)`` works in FastAPI too, but FastAPI leaves mounted apps out
of its OpenAPI schema. Importing this module needs FastAPI (and so pydantic).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

try:
    from fastapi import APIRouter, Header, Path, Query, Request, Response
    from fastapi.routing import APIRoute
    from pydantic import BaseModel, Field
    from starlette.routing import Match
    from starlette.types import Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"resumable_stream.fastapi needs FastAPI ({exc.name} is missing): "
        "pip install 'resumable-llm-stream[fastapi]'"
    ) from exc

from ._constants import STREAM_ID_PATTERN, STREAM_ID_RULES
from ._http import EVENT_STREAM_TYPE, NDJSON_TYPE, http_status_error
from .starlette import StreamRouter, _render, start_stream

__all__ = [
    "CancelRequested",
    "StreamAPIRouter",
    "StreamError",
    "StreamStarted",
    "StreamStatus",
    "start_stream",
]


class StreamError(BaseModel):
    """Body of every error response."""

    code: str = Field(description="Stable error code, e.g. offset_expired.")
    message: str = Field(description="What went wrong, for people.")


class StreamStatus(BaseModel):
    """Body of ``GET /{stream_id}/status``."""

    stream_id: str
    status: Literal["running", "completed", "error", "cancelled"]
    next_offset: str | None = Field(
        description="Where to resume for only what comes next: pass it as `after` (it is "
        "the offset of the last event written; null before the first)."
    )
    created_at: float = Field(description="Unix time the run started.")
    updated_at: float = Field(description="Unix time the run last wrote.")


class CancelRequested(BaseModel):
    """Body of ``POST /{stream_id}/cancel`` when the run was asked to stop."""

    stream_id: str
    cancel_requested: bool


class StreamStarted(BaseModel):
    """Body of the 202 answer of :func:`start_stream`; use as a route's ``response_model``."""

    stream_id: str
    stream_url: str = Field(description="Where to read the stream (also in Location).")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Malformed stream id (`invalid_stream_id`), or an offset no run issued "
        "(`invalid_offset`): malformed, past the end, or from a newer run.",
        403: "Denied by `authorize` (`forbidden`).",
        404: "Unknown or expired stream (`stream_not_found`, `stream_expired`).",
        409: "The stream is not running (`stream_not_running`).",
        410: "The offset is older than the retained events or from an earlier run "
        "(`offset_expired`): the client must reload the stream from the start.",
        503: "Too many open streams (`too_many_streams`) or storage down (`unavailable`); "
        "see `Retry-After`.",
    }
    return {
        status: {"model": StreamError, "description": descriptions[status]} for status in statuses
    }


# The pattern is documented, not enforced by FastAPI: a bad id gets the router's 400
# `invalid_stream_id`, not FastAPI's 422.
_STREAM_ID = Annotated[
    str,
    Path(
        description=f"Stream id: {STREAM_ID_RULES}.",
        json_schema_extra={"pattern": f"^{STREAM_ID_PATTERN.pattern}$"},
    ),
]

_READ_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The events, live, until the terminal event (end, error or "
        "cancelled). SSE: `id:` is the offset, `event:` the type, `data:` JSON. NDJSON: one "
        '`{"offset", "type", "data"}` object per line.',
        "content": {
            EVENT_STREAM_TYPE: {"schema": {"type": "string"}},
            NDJSON_TYPE: {"schema": {"type": "string"}},
        },
    },
    204: {
        "description": "Resumed after the terminal event (EventSource and NDJSON "
        "clients), or, for EventSource clients, the stream is unknown or expired; "
        "EventSource stops reconnecting."
    },
    **_errors(400, 403, 404, 410, 503),
}


class _StreamRoute(APIRoute):
    """A path operation whose 405 is the router's JSON error, not FastAPI's ``{detail}``."""

    #: Methods that another route of the same path answers (a class attribute: FastAPI
    #: may re-create routes from their class when a router is included).
    also_allowed: frozenset[str] = frozenset()

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.methods and scope["method"] not in self.methods:
            response = _render(http_status_error(405, "Method Not Allowed"))
            response.headers["allow"] = ", ".join(sorted(self.methods | self.also_allowed))
            await response(scope, receive, send)
            return
        await super().handle(scope, receive, send)


class _ReadRoute(_StreamRoute):
    also_allowed = frozenset({"HEAD"})  # the HEAD routes, kept out of the schema


class _NotFoundRoute(_StreamRoute):
    """Any other path under the router's prefix: 404 in the router's JSON.

    It never matches more than partially, so that whatever route of the app matches a
    path fully still wins, wherever it was added.
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        return (Match.PARTIAL if match is Match.FULL else match), child_scope


async def _not_found() -> Response:
    return _render(http_status_error(404, "Not Found"))


_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class StreamAPIRouter(APIRouter):
    """The endpoints of ``streams`` (a :class:`StreamRouter`) as FastAPI path operations.

    They run the same code as the mounted router, with parameters and responses in the
    app's OpenAPI schema. Include it with ``app.include_router(..., prefix="/streams")``.
    As in the mounted router, a wrong method (405) or a path under the prefix that no route
    of the app matches (404) gets a ``{"code", "message"}`` body; so give it a prefix of its
    own.
    """

    def __init__(self, streams: StreamRouter, *, tags: Sequence[str] = ("streams",)) -> None:
        super().__init__(tags=list(tags), route_class=_StreamRoute)
        self.streams = streams

        async def read_stream(
            request: Request,
            stream_id: _STREAM_ID,
            after: Annotated[
                str | None,
                Query(description="Resume after this offset (an event's `id`)."),
            ] = None,
            last_event_id: Annotated[
                str | None,
                Header(
                    alias="Last-Event-ID",
                    description="Resume after this offset; wins over `after`. Browsers send "
                    "it when an EventSource reconnects.",
                ),
            ] = None,
        ) -> Response:
            """Read a stream as Server-Sent Events, or NDJSON for `Accept: application/x-ndjson`."""
            return await streams.read_stream(request)

        async def stream_status(request: Request, stream_id: _STREAM_ID) -> Response:
            """Status of a stream's run, its last offset, when it started and last wrote."""
            return await streams.stream_status(request)

        async def cancel_stream(request: Request, stream_id: _STREAM_ID) -> Response:
            """Ask the run to stop, wherever it runs; it ends with a `cancelled` event."""
            return await streams.cancel_stream(request)

        self.add_api_route(
            "/{stream_id}",
            read_stream,
            methods=["GET"],
            name="read_stream",
            response_class=Response,
            responses=_READ_RESPONSES,
            route_class_override=_ReadRoute,
        )
        self.add_api_route(  # HEAD, as the mounted router answers it; not in the schema
            "/{stream_id}",
            read_stream,
            methods=["HEAD"],
            name="read_stream_head",
            include_in_schema=False,
        )
        self.add_api_route(
            "/{stream_id}/status",
            stream_status,
            methods=["GET"],
            name="stream_status",
            response_model=StreamStatus,
            responses=_errors(400, 403, 404, 503),
            route_class_override=_ReadRoute,
        )
        self.add_api_route(  # HEAD, as the mounted router answers it; not in the schema
            "/{stream_id}/status",
            stream_status,
            methods=["HEAD"],
            name="stream_status_head",
            include_in_schema=False,
        )
        self.add_api_route(
            "/{stream_id}/cancel",
            cancel_stream,
            methods=["POST"],
            name="cancel_stream",
            status_code=202,
            response_model=CancelRequested,
            responses=_errors(400, 403, 404, 409, 503),
        )
        self.add_api_route(
            "/{path:path}",
            _not_found,
            methods=_ALL_METHODS,
            name="stream_not_found_fallback",
            include_in_schema=False,
            route_class_override=_NotFoundRoute,
        )
