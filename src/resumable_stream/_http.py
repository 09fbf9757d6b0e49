"""HTTP values that do not depend on a web framework: defaults, wire formats, errors.

The adapters (``resumable_stream.starlette``, ``resumable_stream.fastapi``) map requests to
producer/consumer calls and render these values; nothing here does I/O.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

import orjson

from ._constants import (
    RETRY_AFTER,
)
from ._events import Event
from ._exceptions import (
    InvalidOffset,
    InvalidStreamId,
    OffsetExpired,
    StreamAlreadyRunning,
    StreamNotFound,
    TransportError,
)
from ._sse import PING, encode_event, escape_line_breaks

# --- wire formats --------------------------------------------------------------------------

EVENT_STREAM_TYPE: Final = "text/event-stream"
NDJSON_TYPE: Final = "application/x-ndjson"
JSON_TYPE: Final = "application/json"
_NDJSON_TYPES = (NDJSON_TYPE, "application/ndjson", "application/jsonl")
# The escapes of a JSON text: a surrogate pair, a lone surrogate, any other (an escaped
# backslash is matched whole, so the "\\u" after it is not read as an escape).
_ESCAPES = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|(?P<lone>\\u[dD][89a-fA-F][0-9a-fA-F]{2})"
    rb"|\\.",
    re.DOTALL,
)


def _lone_replaced(match: re.Match[bytes]) -> bytes:
    return b"\\ufffd" if match["lone"] else match[0]


def loads_json(raw: bytes) -> Any:
    """A request body's JSON, read as orjson reads it but for the escape of a lone UTF-16
    surrogate (``"\\ud83d"``), which is read as U+FFFD: JavaScript's ``JSON.stringify``
    writes one for a string holding half a pair (an emoji a ``maxlength`` cut), and a
    client that resends its history (the AI SDK's ``useChat``) would be refused on every
    later request. Raises ``orjson.JSONDecodeError`` for what is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        if b"\\u" not in raw:
            raise
        repaired = _ESCAPES.sub(_lone_replaced, raw)  # (only here: bodies orjson refused)
        if repaired == raw:
            raise
    return orjson.loads(repaired)


def encode_ndjson(event: Event) -> bytes:
    """One JSON object and a newline: ``{"offset": ..., "type": ..., "data": ...}``.

    U+0085, U+2028 and U+2029 are escaped: readers that split lines as Unicode does (httpx's
    ``iter_lines()``, ``str.splitlines()``) would otherwise cut an event in two.
    """
    line = orjson.dumps(
        {"offset": event.offset, "type": event.type, "data": event.data},
        option=orjson.OPT_APPEND_NEWLINE,
    )
    return line if line.isascii() else escape_line_breaks(line)


class WireFormat(NamedTuple):
    """How a stream response writes events and keep-alives."""

    name: Literal["sse", "ndjson"]
    media_type: str
    encode: Callable[[Event], bytes]
    keepalive: bytes
    #: What ends a response cut short by a read error once its headers are out; None
    #: for clients that resume from their last offset (the error answers that).
    cut: Callable[[BaseException], bytes] | None = None


SSE: Final = WireFormat("sse", EVENT_STREAM_TYPE, encode_event, PING)
# A blank line: NDJSON readers skip empty lines (ndjson spec, "parsing").
NDJSON: Final = WireFormat("ndjson", NDJSON_TYPE, encode_ndjson, b"\n")


def stream_headers(wire: WireFormat) -> list[tuple[bytes, bytes]]:
    """Headers of a stream response.

    The content type carries no charset (SSE is always UTF-8, and some clients compare it
    exactly). ``X-Accel-Buffering: no`` stops nginx from buffering the stream; ``no-transform``
    stops the compressing proxies that honour it (Express's ``compression``, so Next.js
    rewrites and Node dev servers' proxies) from gzipping it, which holds the events back
    until a compression window fills. There is no ``Connection`` or ``Transfer-Encoding``:
    hop-by-hop headers are invalid in HTTP/2.
    """
    return [
        (b"content-type", wire.media_type.encode()),
        (b"cache-control", b"no-store, no-transform"),
        (b"x-accel-buffering", b"no"),
        (b"vary", b"accept"),
    ]


def _media_ranges(accept: str) -> dict[str, float]:
    """The media ranges of an ``Accept`` header and their qualities (a range whose ``q`` is
    not a number from 0 to 1 is left out, as if not sent)."""
    ranges: dict[str, float] = {}
    for part in accept.lower().split(","):
        media, *params = part.split(";")
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = -1.0
        media = media.strip()
        if media and 0.0 <= quality <= 1.0:  # (also False for nan)
            ranges[media] = max(quality, ranges.get(media, 0.0))
    return ranges


def _quality(ranges: dict[str, float], media: str) -> float | None:
    """The quality ``ranges`` give ``media``: that of its own range, else of its type's
    (``text/*``), else of ``*/*`` (the most specific wins); None if none names it."""
    for candidate in (media, media.partition("/")[0] + "/*", "*/*"):
        quality = ranges.get(candidate)
        if quality is not None:
            return quality
    return None


class Negotiated(NamedTuple):
    wire: WireFormat
    #: The client asked for ``text/event-stream`` (it may be a browser's ``EventSource``).
    event_stream_client: bool


def negotiate(accept: str) -> Negotiated:
    """Choose SSE or NDJSON from an ``Accept`` header: SSE unless the client prefers NDJSON,
    or refuses SSE (``q=0``) and not NDJSON. A header that accepts neither is disregarded
    (SSE), as HTTP allows, rather than refused with a 406."""
    ranges = _media_ranges(accept)
    sse = _quality(ranges, EVENT_STREAM_TYPE)
    named = [q for media in _NDJSON_TYPES if (q := _quality(ranges, media)) is not None]
    ndjson = max(named, default=None)
    preferred = (ndjson or 0.0) > (sse or 0.0) or (sse == 0.0 and ndjson is None)
    return Negotiated(NDJSON if preferred else SSE, ranges.get(EVENT_STREAM_TYPE, 0.0) > 0)


# --- errors --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HTTPError:
    """An error response: ``status`` and a JSON body ``{"code": ..., "message": ...}``.

    ``code`` is stable (clients branch on it); ``message`` is for people, and names no
    internal address.
    """

    status: int
    code: str
    message: str
    retry_after: int | None = None

    def body(self) -> bytes:
        return orjson.dumps({"code": self.code, "message": self.message})

    def headers(self) -> dict[str, str]:
        headers = {"cache-control": "no-store"}
        if self.retry_after is not None:
            headers["retry-after"] = str(self.retry_after)
        return headers


def error_for(exc: BaseException, *, event_stream_client: bool = False) -> HTTPError:
    """The response for an error raised by a producer, consumer or transport.

    An unknown or fully expired stream is ``204 No Content`` for SSE clients (``EventSource``
    stops on any non-200 status, and 204 means "nothing to read" rather than an error), and
    404 for others.
    """
    if isinstance(exc, InvalidStreamId):
        return HTTPError(400, "invalid_stream_id", str(exc))
    if isinstance(exc, InvalidOffset):
        return HTTPError(400, "invalid_offset", str(exc))
    if isinstance(exc, StreamNotFound):
        return HTTPError(204 if event_stream_client else 404, "stream_not_found", str(exc))
    if isinstance(exc, OffsetExpired):
        if exc.offset is None:
            # Read from the start, yet the events are gone: the stream expired; nothing to
            # reload, so this is "not found", not "start over".
            return HTTPError(
                204 if event_stream_client else 404,
                "stream_expired",
                f"the events of stream {exc.stream_id!r} expired",
            )
        return HTTPError(
            410,
            "offset_expired",
            f"{exc}; the client must reload: read the stream again from the start "
            "(without after / Last-Event-ID)",
        )
    if isinstance(exc, StreamAlreadyRunning):
        return HTTPError(409, "stream_already_running", str(exc))
    # A 5xx says what to do, never why: the detail names hosts, ports and keys of the
    # backend (issue 9). The adapters log it with :func:`log_server_error`.
    if isinstance(exc, TransportError):
        return HTTPError(
            503,
            "unavailable",
            "stream storage is unavailable; retry later",
            retry_after=RETRY_AFTER,
        )
    return HTTPError(500, "internal_error", "internal server error")


def log_server_error(logger: logging.Logger, error: HTTPError, exc: BaseException) -> None:
    """Log the detail that a 5xx response leaves out of its body."""
    if error.status < 500:
        return
    if isinstance(exc, TransportError):
        # Expected in operation (a failover, a restart): the message is the whole story.
        logger.warning("answering %d %s: %s", error.status, error.code, exc)
    else:
        logger.error("answering %d %s", error.status, error.code, exc_info=exc)


FORBIDDEN: Final = HTTPError(403, "forbidden", "not allowed to access this stream")


def too_many_streams(limit: int) -> HTTPError:
    return HTTPError(
        503,
        "too_many_streams",
        f"this server is at its limit of {limit} open streams; retry later",
        retry_after=RETRY_AFTER,
    )


#: A stream response its server cancelled (a shutdown) before it sent anything.
SERVER_CLOSING = HTTPError(
    503,
    "server_closing",
    "this server is shutting down; retry (another server answers)",
    retry_after=RETRY_AFTER,
)


#: A client that closed its connection before its request's body arrived (nobody reads the
#: answer, but it ends the request without an error in the server's log).
CLIENT_GONE = HTTPError(400, "client_disconnected", "the client left before its request's body")


def body_too_large(limit: int) -> HTTPError:
    return HTTPError(
        413,
        "body_too_large",
        f"the request body is larger than this server's limit of {limit} bytes (max_body_bytes)",
    )


def is_json_type(content_type: str) -> bool:
    """Whether a Content-Type value is JSON: ``application/json`` or ``application/*+json``,
    with any parameters (``charset=utf-8``), in any case."""
    media = content_type.partition(";")[0].strip().lower()
    return media == JSON_TYPE or (media.startswith("application/") and media.endswith("+json"))


def unsupported_media_type(content_type: str | None) -> HTTPError:
    """A body read as JSON sent with another Content-Type, or none: what a page of another
    origin can send without a CORS preflight (``text/plain``, a form, a ``Blob``)."""
    sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
    return HTTPError(
        415,
        "unsupported_media_type",
        f"the request body is read as JSON: send it with Content-Type: application/json "
        f"(this request has {sent})",
    )


def not_running(stream_id: str, status: str) -> HTTPError:
    return HTTPError(409, "stream_not_running", f"stream {stream_id!r} is {status}, not running")


def http_status_error(status: int, detail: object) -> HTTPError:
    """Routing errors (unknown path, wrong method) and an app's ``HTTPException`` in the
    same JSON shape. ``message`` stays a string: a detail that is not one (FastAPI's may be
    any JSON value) is sent as its JSON text."""
    codes = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}
    if not isinstance(detail, str):
        detail = orjson.dumps(detail, default=str).decode()
    return HTTPError(status, codes.get(status, "http_error"), detail)
