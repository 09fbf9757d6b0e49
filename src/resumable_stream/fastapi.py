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
    from pydantic import BaseModel, Field
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"resumable_stream.fastapi needs FastAPI ({exc.name} is missing): "
        "pip install 'resumable-llm-stream[fastapi]'"
    ) from exc

from ._constants import STREAM_ID_RULES
from ._http import EVENT_STREAM_TYPE, NDJSON_TYPE
from .starlette import StreamRouter, start_stream

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
        400: "Malformed stream id (`invalid_stream_id`) or offset (`invalid_offset`).",
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


_STREAM_ID = Annotated[str, Path(description=f"Stream id: {STREAM_ID_RULES}.")]

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
        "description": "For SSE clients: the stream is unknown or expired, or was resumed "
        "after its terminal event; EventSource stops reconnecting."
    },
    **_errors(400, 403, 404, 410, 503),
}


class StreamAPIRouter(APIRouter):
    """The endpoints of ``streams`` (a :class:`StreamRouter`) as FastAPI path operations.

    They run the same code as the mounted router, with parameters and responses in the
    app's OpenAPI schema. Include it with ``app.include_router(..., prefix="/streams")``.
    """

    def __init__(self, streams: StreamRouter, *, tags: Sequence[str] = ("streams",)) -> None:
        super().__init__(tags=list(tags))
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
