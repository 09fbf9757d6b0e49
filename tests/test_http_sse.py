"""Wire formats and HTTP values (``_sse.py``, ``_http.py``), without a server."""

from __future__ import annotations

import math
from typing import Any

import httpx
import orjson
import pytest
from httpx_sse import EventSource

import resumable_stream.fastapi
import resumable_stream.starlette
from resumable_stream import (
    ConfigurationError,
    Event,
    InvalidOffset,
    InvalidStreamId,
    OffsetExpired,
    StreamAlreadyRunning,
    StreamConsumer,
    StreamNotFound,
    TransportClosed,
    TransportError,
    from_url,
)
from resumable_stream._http import NDJSON, SSE, encode_ndjson, error_for, negotiate, stream_headers
from resumable_stream._sse import PING, ServerSentEvent, encode_event, retry_field
from resumable_stream.starlette import StreamResponse, StreamRouter, allow_all

EVENTS = [
    Event("custom", {"note": "made up by the app, not stored"}, ""),
    Event("token", {"text": "hi ", "message_id": "m1", "node": "agent"}, "17-1-0"),
    Event("token", {"text": "line\nbreak\r\nand\rcr \u2028 é 😀"}, "17-1-1"),
    Event("tool_end", {"name": "search", "output": {"hits": [1, 2.5, None, True]}}, "17-2-0"),
    Event("end", {}, "17-3-0"),
]


async def parse(raw: bytes) -> list[Any]:
    """What an SSE client (httpx-sse, which follows the WHATWG parser) makes of ``raw``."""
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=raw)
    return [sse async for sse in EventSource(response).aiter_sse()]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.offset)
def test_encode_event_is_server_sent_event_from_event(event: Event) -> None:
    assert encode_event(event) == ServerSentEvent.from_event(event).encode()


async def test_encoded_events_parse_back_to_offset_type_and_json() -> None:
    parsed = await parse(b"".join(encode_event(e) for e in EVENTS))

    assert [(s.id, s.event, orjson.loads(s.data)) for s in parsed] == [
        (e.offset, e.type, e.data) for e in EVENTS
    ]


def test_an_event_without_offset_leaves_last_event_id_alone() -> None:
    encoded = encode_event(EVENTS[0])
    assert encoded == b'event: custom\ndata: {"note":"made up by the app, not stored"}\n\n'


async def test_retry_joins_the_block_of_the_next_event() -> None:
    parsed = await parse(retry_field(1500) + encode_event(EVENTS[1]))

    assert [(s.retry, s.id) for s in parsed] == [(1500, "17-1-0")]


async def test_ping_is_a_comment_that_no_client_sees_as_an_event() -> None:
    # httpx-sse dispatches an empty event on a blank line once an id was seen; a comment
    # line without a blank line after it is invisible to every parser.
    assert PING == b": ping\n"
    assert len(await parse(encode_event(EVENTS[1]) + PING + PING)) == 1


async def test_server_sent_event_splits_data_on_every_sse_line_break() -> None:
    raw = ServerSentEvent(data="a\nb\r\nc\rd", event="note", id="7", retry=10).encode()

    assert raw == b"id: 7\nevent: note\nretry: 10\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    assert [(s.data, s.event, s.id, s.retry) for s in await parse(raw)] == [
        ("a\nb\nc\nd", "note", "7", 10)
    ]


def test_server_sent_event_comment_has_no_blank_line() -> None:
    assert ServerSentEvent(comment="two\nlines").encode() == b": two\n: lines\n"


@pytest.mark.parametrize(
    "fields",
    [{"id": "1\n2"}, {"id": "nul\0"}, {"event": "a\rb"}, {"retry": -1}],
)
def test_server_sent_event_rejects_what_would_break_the_framing(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        ServerSentEvent(data="x", **fields).encode()


async def test_event_types_outside_the_vocabulary_cannot_break_the_framing() -> None:
    event = Event("evil\n\ndata: injected", {"x": 1}, "1-1-0")

    parsed = await parse(encode_event(event))
    assert [(s.event, s.data) for s in parsed] == [("evildata: injected", '{"x":1}')]
    assert encode_event(event) == ServerSentEvent.from_event(event).encode()


def test_ndjson_is_one_json_object_per_line_with_the_offset() -> None:
    lines = b"".join(encode_ndjson(e) for e in EVENTS).split(b"\n")

    assert lines[-1] == b""
    assert [orjson.loads(line) for line in lines[:-1]] == [
        {"offset": e.offset, "type": e.type, "data": e.data} for e in EVENTS
    ]


def test_ndjson_lines_stay_whole_for_readers_that_split_on_unicode_line_breaks() -> None:
    """JSON may hold U+2028, U+2029 and NEL unescaped, but httpx's ``iter_lines()`` and
    Python's ``str.splitlines()`` end a line at each: escaped, an event stays one line."""
    events = [
        Event("token", {"text": "a\u2028b\u2029c\x85d"}, "1-1-0"),
        Event("odd\u2028type", {"x\u2029": "\x85"}, "1-1-1"),
    ]
    body = b"".join(encode_ndjson(e) for e in events)
    expected = [{"offset": e.offset, "type": e.type, "data": e.data} for e in events]

    lines = list(httpx.Response(200, content=body).iter_lines())
    assert [orjson.loads(line) for line in lines] == expected
    assert [orjson.loads(line) for line in body.decode().splitlines()] == expected


def test_sse_data_stays_one_line_for_readers_that_split_on_unicode_line_breaks() -> None:
    """The same for SSE: the spec ends lines at CR and LF only, but httpx-sse before 0.4.2
    read lines with httpx's ``iter_lines()`` and cut an event's data at U+2028."""
    event = Event("token", {"text": "a\u2028b\u2029c\x85d"}, "1-1-0")
    body = encode_event(event)
    assert body.decode().splitlines() == [
        "id: 1-1-0",
        "event: token",
        'data: {"text":"a\\u2028b\\u2029c\\u0085d"}',
        "",
    ]
    data = body.decode().splitlines()[2].removeprefix("data: ")
    assert orjson.loads(data) == event.data


@pytest.mark.parametrize(
    ("accept", "wire", "event_stream_client"),
    [
        ("", SSE, False),
        ("*/*", SSE, False),
        ("text/event-stream", SSE, True),
        ("text/event-stream, application/x-ndjson;q=0.5", SSE, True),
        ("application/x-ndjson", NDJSON, False),
        ("Application/X-NDJSON; charset=utf-8", NDJSON, False),
        ("application/x-ndjson;q=0.9, text/event-stream;q=0.1", NDJSON, True),
        ("application/x-ndjson;q=0, text/event-stream;q=0", SSE, False),
        ("application/jsonl", NDJSON, False),
        ("text/event-stream;q=bogus", SSE, False),
        ("text/event-stream;q=nan, application/x-ndjson;q=0.1", NDJSON, False),
        # SSE refused: NDJSON, if not refused too (a header refusing both is disregarded).
        ("text/event-stream;q=0", NDJSON, False),
        ("text/event-stream;q=0, */*", NDJSON, False),
        ("text/*;q=0, */*", NDJSON, False),
        ("text/event-stream;q=0, text/*", NDJSON, False),
        # The most specific range gives a type its quality.
        ("application/*", NDJSON, False),
        ("text/*", SSE, False),
        ("*/*;q=0.5, application/x-ndjson;q=0.1", SSE, False),
        ("*/*;q=0.1, text/event-stream", SSE, True),
        ("application/json", SSE, False),
        ("application/json, */*;q=0.5", SSE, False),
    ],
)
def test_negotiate(accept: str, wire: Any, event_stream_client: bool) -> None:
    assert negotiate(accept) == (wire, event_stream_client)


def test_stream_headers_are_exact_and_hop_by_hop_free() -> None:
    assert dict(stream_headers(SSE)) == {
        b"content-type": b"text/event-stream",
        b"cache-control": b"no-store, no-transform",
        b"x-accel-buffering": b"no",
        b"vary": b"accept",
    }
    assert dict(stream_headers(NDJSON))[b"content-type"] == b"application/x-ndjson"


@pytest.mark.parametrize(
    ("exc", "sse_status", "other_status", "code"),
    [
        (InvalidStreamId("bad"), 400, 400, "invalid_stream_id"),
        (InvalidOffset("bad"), 400, 400, "invalid_offset"),
        (StreamNotFound("s"), 204, 404, "stream_not_found"),
        (OffsetExpired("s", None, "trimmed"), 204, 404, "stream_expired"),
        (OffsetExpired("s", "1-2-3", "trimmed"), 410, 410, "offset_expired"),
        (StreamAlreadyRunning("s"), 409, 409, "stream_already_running"),
        (TransportError("cannot connect to secret-host:6379"), 503, 503, "unavailable"),
        (TransportClosed("closed"), 503, 503, "unavailable"),
        (ConfigurationError("odd secret://user:pw@host"), 500, 500, "internal_error"),
        (RuntimeError("secret detail"), 500, 500, "internal_error"),
    ],
)
def test_error_for(exc: Exception, sse_status: int, other_status: int, code: str) -> None:
    sse = error_for(exc, event_stream_client=True)
    other = error_for(exc)

    assert (sse.status, other.status, sse.code, other.code) == (
        sse_status,
        other_status,
        code,
        code,
    )
    assert orjson.loads(other.body()) == {"code": code, "message": other.message}
    assert "secret" not in other.message
    if code == "offset_expired":
        assert "reload" in other.message
    if other_status == 503:
        assert other.headers()["retry-after"] == "1"


@pytest.mark.parametrize(
    "options",
    [
        {"ping_interval": 0},
        {"send_timeout": -1},
        {"max_connections": 0},
        {"retry": -0.5},
        # Passed the range checks: every stream response was a 500 (retry nan or inf,
        # ping_interval nan); send_timeout nan broke the clock of a response at its check.
        {"retry": math.nan},
        {"retry": math.inf},
        {"retry": 1e306},  # finite, but its milliseconds overflowed: every response a 500
        {"ping_interval": math.nan},
        {"send_timeout": math.nan},
    ],
)
def test_router_and_response_reject_bad_options(options: dict[str, Any]) -> None:
    transport = from_url("memory://")
    with pytest.raises(ConfigurationError):
        StreamRouter(transport, authorize=allow_all, **options)
    if "max_connections" not in options:
        with pytest.raises(ConfigurationError):
            StreamResponse(StreamConsumer(transport, "abc"), **options)


@pytest.mark.parametrize("module", [resumable_stream.starlette, resumable_stream.fastapi])
def test_exported_members(module: Any) -> None:
    exported = module.__all__
    assert exported == sorted(exported)
    assert all(getattr(module, name, None) is not None for name in exported)
