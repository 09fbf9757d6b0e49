"""The Starlette router and stream response, against a real uvicorn server and real clients.

httpx's ASGITransport buffers whole bodies, so every test here talks HTTP to uvicorn over a
loopback socket: live reads with httpx-sse, dropped and resumed readers, raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from httpx_sse import EventSource, ServerSentEvent, aconnect_sse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from resumable_stream import (
    ConfigurationError,
    Event,
    ResumableStreamError,
    StreamConsumer,
    StreamNotFound,
    StreamProducer,
    Transport,
    from_url,
)
from resumable_stream._http import WireFormat
from resumable_stream.starlette import (
    StreamResponse,
    StreamRouter,
    allow_all,
    error_response,
    resume_after,
    start_stream,
)
from resumable_stream.transports.memory import MemoryTransport
from tests._helpers import dead_run, tokens
from tests._services import uvicorn_server

SSE_ACCEPT = {"accept": "text/event-stream"}
NDJSON_ACCEPT = {"accept": "application/x-ndjson"}
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer"}


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float = 10.0) -> None:
    """Poll a condition of another thread or of a clock until it holds, or fail at the deadline."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{check.__name__} did not hold within {within}s")
        await asyncio.sleep(0.01)  # polling the server's thread or a TTL, not our own tasks


def word(i: int) -> str:
    return f"w{i} "


def full_text(n: int) -> str:
    return "".join(word(i) for i in range(n))


async def paced_tokens(
    n: int, delay: float, size: int = 0, hold: bool = False
) -> AsyncIterator[str]:
    """``n`` tokens, ``delay`` seconds apart, like a model; with ``hold``, then wait until
    cancelled (a run that is still thinking)."""
    for i in range(n):
        yield word(i).ljust(size, "x")
        if delay:
            await asyncio.sleep(delay)  # the pace of the fake model, not a wait for state
    if hold:
        await asyncio.get_running_loop().create_future()


def build_app(
    transport: Transport, router: StreamRouter, *, wrap: Any = None, routes: Sequence[Any] = ()
) -> Starlette:
    """A test app: ``POST /runs`` starts a paced run; the router is mounted on /streams.

    ``wrap`` is an ASGI middleware put around the router (to observe or cut its responses).
    """
    producer = StreamProducer(transport)

    async def runs(request: Request) -> Response:
        query = request.query_params
        source = paced_tokens(
            int(query.get("tokens", "20")),
            float(query.get("delay", "0")),
            int(query.get("size", "0")),
            query.get("hold") == "1",
        )
        return await start_stream(
            producer, source, stream_url="/streams/{stream_id}", stream_id=query.get("stream_id")
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await producer.aclose()
        await transport.aclose()

    return Starlette(
        routes=[
            Route("/runs", runs, methods=["POST"]),
            *routes,
            Mount("/streams", router if wrap is None else wrap(router), name="streams"),
        ],
        exception_handlers={ResumableStreamError: error_response},
        lifespan=lifespan,
    )


class Recorder:
    """Pass as ``wrap=``: keeps every message the router sends (from the server's thread)."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def __call__(self, app: ASGIApp) -> ASGIApp:
        async def recording_app(scope: Scope, receive: Receive, send: Send) -> None:
            async def recording_send(message: Message) -> None:
                self.sent.append(message)
                await send(message)

            await app(scope, receive, recording_send)

        return recording_app


@dataclass
class Server:
    url: str
    router: StreamRouter

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10, **kwargs)


@contextlib.contextmanager
def serve(
    transport: Transport | None = None,
    *,
    wrap: Any = None,
    routes: Sequence[Any] = (),
    **router_options: Any,
) -> Iterator[Server]:
    """Serve a test app with real uvicorn; ``router_options`` configure its StreamRouter."""
    transport = from_url("memory://") if transport is None else transport
    router_options.setdefault("authorize", allow_all)
    router = StreamRouter(transport, **router_options)
    app = build_app(transport, router, wrap=wrap, routes=routes)
    with uvicorn_server(app, graceful_timeout=2) as url:
        yield Server(url, router)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serve() as served:
        yield served


async def start(client: httpx.AsyncClient, **params: Any) -> str:
    response = await client.post("/runs", params=params)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == body["stream_url"] == f"/streams/{body['stream_id']}"
    return str(body["stream_url"])


async def read_sse(
    client: httpx.AsyncClient, url: str, *, limit: int | None = None, **kwargs: Any
) -> list[ServerSentEvent]:
    """Read SSE events until the stream ends, or drop the connection after ``limit``."""
    events: list[ServerSentEvent] = []
    async with aconnect_sse(client, "GET", url, **kwargs) as source:
        assert source.response.status_code == 200, await source.response.aread()
        async for sse in source.aiter_sse():
            events.append(sse)
            if len(events) == limit:
                break
    return events


def text(events: list[ServerSentEvent]) -> str:
    return "".join(orjson.loads(e.data)["text"] for e in events if e.event == "token")


def assert_unique_and_ordered(offsets: list[str]) -> None:
    assert len(set(offsets)) == len(offsets)
    positions = [tuple(int(p) for p in offset.split("-")) for offset in offsets]
    assert positions == sorted(positions)


# --- reading and resuming --------------------------------------------------------------------


async def test_sse_client_reads_a_running_stream_live(server: Server) -> None:
    async with server.client() as client:
        url = await start(client, tokens=200, delay=0.002)
        events: list[ServerSentEvent] = []
        async with aconnect_sse(client, "GET", url) as source:
            headers = source.response.headers
            async for sse in source.aiter_sse():
                if not events:
                    # Live: the first event is here long before the run ends.
                    assert (await client.get(f"{url}/status")).json()["status"] == "running"
                events.append(sse)

    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-store, no-transform"
    assert headers["x-accel-buffering"] == "no"
    assert text(events) == full_text(200)
    assert [e.event for e in events[-1:]] == ["end"]
    assert events[0].retry == 1000
    assert_unique_and_ordered([e.id for e in events])


@pytest.mark.parametrize("resume", ["last-event-id", "after"])
async def test_reader_dropped_mid_stream_resumes_without_gap_or_duplicate(
    server: Server, resume: str
) -> None:
    async with server.client() as client:
        url = await start(client, tokens=150, delay=0.002)
        events = await read_sse(client, url, limit=40)
        last = events[-1].id
        if resume == "last-event-id":
            events += await read_sse(client, url, headers={"last-event-id": last})
        else:
            events += await read_sse(client, url, params={"after": last})

    assert text(events) == full_text(150)
    assert_unique_and_ordered([e.id for e in events])


async def test_last_event_id_header_wins_over_after(server: Server) -> None:
    async with server.client() as client:
        url = await start(client, tokens=30)
        events = await read_sse(client, url)
        resumed = await read_sse(
            client, url, params={"after": events[2].id}, headers={"last-event-id": events[9].id}
        )

    assert [e.id for e in resumed] == [e.id for e in events[10:]]


async def test_two_readers_on_one_stream_each_get_everything(server: Server) -> None:
    async with server.client() as client:
        url = await start(client, tokens=120, delay=0.002)
        first, second = await asyncio.gather(read_sse(client, url), read_sse(client, url))

    assert text(first) == text(second) == full_text(120)
    assert [e.id for e in first] == [e.id for e in second]


async def test_ndjson_for_clients_that_ask_for_it(server: Server) -> None:
    async with server.client() as client:
        url = await start(client, tokens=50, delay=0.001)
        async with client.stream("GET", url, headers=NDJSON_ACCEPT) as response:
            assert response.headers["content-type"] == "application/x-ndjson"
            records = [orjson.loads(line) async for line in response.aiter_lines() if line]
        resumed = await client.get(
            url, params={"after": records[19]["offset"]}, headers=NDJSON_ACCEPT
        )

    assert [set(r) for r in records[:1]] == [{"offset", "type", "data"}]
    assert "".join(r["data"]["text"] for r in records if r["type"] == "token") == full_text(50)
    assert records[-1]["type"] == "end"
    assert [orjson.loads(line) for line in resumed.text.splitlines()] == records[20:]


async def test_a_client_refusing_sse_gets_ndjson(server: Server) -> None:
    async with server.client() as client:
        url = await start(client, tokens=5)
        response = await client.get(url, headers={"accept": "text/event-stream;q=0, */*"})

    assert response.headers["content-type"] == "application/x-ndjson"
    records = [orjson.loads(line) for line in response.text.splitlines()]
    assert "".join(r["data"]["text"] for r in records if r["type"] == "token") == full_text(5)
    assert records[-1]["type"] == "end"


async def test_resuming_after_the_terminal_event_is_204_for_sse_and_ndjson(server: Server) -> None:
    async with server.client() as client:
        url = await start(client, tokens=5)
        last = (await read_sse(client, url))[-1].id
        sse = await client.get(url, headers={**SSE_ACCEPT, "last-event-id": last})
        ndjson = await client.get(url, params={"after": last}, headers=NDJSON_ACCEPT)
        plain = await client.get(url, params={"after": last})

    # A 200 with an empty body would make EventSource reconnect for ever. Regression
    # (issue 9): NDJSON answered 200 with an empty body where SSE answered 204.
    for response in (sse, ndjson):
        assert (response.status_code, response.content) == (204, b"")
        assert response.headers["cache-control"] == "no-store"
    # An SSE client that is not an EventSource gets an empty stream, with its headers.
    assert (plain.status_code, plain.content) == (200, b"")
    assert plain.headers["content-type"] == "text/event-stream"
    assert plain.headers["x-accel-buffering"] == "no"


async def test_a_subclass_may_change_the_wire_format_and_headers() -> None:
    """Protocol adapters (AI SDK, LangGraph) subclass StreamResponse this way."""

    class Shouting(StreamResponse):
        def __init__(self, consumer: StreamConsumer, request: Request) -> None:
            super().__init__(consumer, request, format="sse", retry=None)
            self.wire = WireFormat("sse", "text/event-stream", self.encode, b": ping\n")
            self.raw_headers = [*self.raw_headers, (b"x-protocol", b"shouting")]

        def encode(self, event: Any) -> bytes:
            return f"data: {event.type.upper()}\n\n".encode()

    transport = from_url("memory://")

    async def shouting(request: Request) -> Response:
        return Shouting(StreamConsumer(transport, request.path_params["stream_id"]), request)

    with serve(transport, routes=[Route("/shout/{stream_id}", shouting)]) as server:
        async with server.client() as client:
            url = await start(client, tokens=2)
            response = await client.get(url.replace("/streams/", "/shout/"))

    assert response.headers["x-protocol"] == "shouting"
    assert response.text == "data: TOKEN\n\ndata: TOKEN\n\ndata: END\n\n"


async def test_short_ping_interval_still_lets_errors_have_their_status() -> None:
    class LateNotFound(StreamConsumer):
        async def __anext__(self) -> Any:
            await asyncio.sleep(0.3)  # a slow first read; pings fall due meanwhile
            raise StreamNotFound(self.stream_id)

    transport = from_url("memory://")

    async def slow(request: Request) -> Response:
        return StreamResponse(LateNotFound(transport, "slow"), request, ping_interval=0.05)

    with serve(transport, routes=[Route("/slow", slow)]) as server:
        async with server.client() as client:
            response = await client.get("/slow", headers=SSE_ACCEPT)
    assert (response.status_code, response.content) == (204, b"")


async def test_a_bug_in_a_consumer_reaches_the_app_as_itself() -> None:
    class Broken(StreamConsumer):
        async def __anext__(self) -> Any:
            raise KeyError("mapper bug")

    transport = from_url("memory://")

    async def broken(request: Request) -> Response:
        return StreamResponse(Broken(transport, "broken"), request)

    async def on_key_error(request: Request, exc: Exception) -> Response:
        return Response(f"handled {type(exc).__name__}", status_code=500)

    app = build_app(
        transport, StreamRouter(transport, authorize=allow_all), routes=[Route("/broken", broken)]
    )
    app.add_exception_handler(KeyError, on_key_error)
    with uvicorn_server(app, graceful_timeout=2) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.get("/broken", headers=SSE_ACCEPT)
    assert (response.status_code, response.text) == (500, "handled KeyError")


async def test_headers_are_sent_before_the_first_event(server: Server) -> None:
    async with server.client() as client:
        url = await start(client, tokens=0, hold=1)
        async with aconnect_sse(client, "GET", url) as source:
            assert source.response.status_code == 200
            assert (await client.post(f"{url}/cancel")).status_code == 202
            events = [sse async for sse in source.aiter_sse()]

    assert [(e.event, orjson.loads(e.data)) for e in events] == [
        ("cancelled", {"reason": "requested"})
    ]
    assert events[0].retry == 1000  # the retry hint rides on the first event


async def test_ready_events_are_batched_into_few_writes() -> None:
    recorder = Recorder()
    with serve(wrap=recorder) as server:
        async with server.client() as client:
            url = await start(client, tokens=2000)
            live = await read_sse(client, url)  # returns at the end: all of it is stored now
            recorder.sent.clear()
            replayed = await read_sse(client, url)

    bodies = [m for m in recorder.sent if m["type"] == "http.response.body"]
    assert len(live) == len(replayed) == 2001
    assert len(bodies) < 20


async def test_stream_headers_suit_browsers_proxies_and_http2() -> None:
    recorder = Recorder()
    with serve(wrap=recorder) as server:
        async with server.client() as client:
            url = await start(client, tokens=3)
            await read_sse(client, url)
            head = await client.head(url, headers=SSE_ACCEPT)

    start_message = next(m for m in recorder.sent if m["type"] == "http.response.start")
    headers = dict(start_message["headers"])
    assert headers[b"content-type"] == b"text/event-stream"  # exactly: no charset
    assert headers[b"cache-control"] == b"no-store, no-transform"
    assert headers[b"x-accel-buffering"] == b"no"
    assert not HOP_BY_HOP & set(headers)  # hop-by-hop headers are illegal in HTTP/2
    assert (head.status_code, head.headers["content-type"], head.content) == (
        200,
        "text/event-stream",
        b"",
    )


async def test_stream_responses_tell_compressing_proxies_not_to_buffer_them(
    server: Server,
) -> None:
    # Regression: a Node proxy in front of the API (Next.js rewrites, a dev server's
    # proxy, Express's `compression`) gzips text/event-stream and NDJSON and holds the
    # events in its compressor until the window fills, so nothing arrives live; it
    # leaves alone a response whose Cache-Control says `no-transform` (RFC 9111 5.2.2.6).
    async with server.client() as client:
        for accept in (SSE_ACCEPT, NDJSON_ACCEPT):
            url = await start(client, tokens=3)
            response = await client.get(url, headers=accept)
            assert response.status_code == 200
            directives = {d.strip() for d in response.headers["cache-control"].split(",")}
            assert directives == {"no-store", "no-transform"}, accept


async def test_head_of_a_stream_still_thinking_answers_after_the_first_event_wait(
    server: Server,
) -> None:
    async with server.client() as client:
        url = await start(client, tokens=0, hold=1)
        head = await client.head(url, headers=SSE_ACCEPT)
        still = (await client.get(f"{url}/status")).json()["status"]
        await client.post(f"{url}/cancel")

    assert (head.status_code, head.headers["content-type"], head.content) == (
        200,
        "text/event-stream",
        b"",
    )
    assert still == "running"


def odd_values() -> list[Any]:
    """What producers may put into events: sizes and values JSON holds unlike Python."""
    import enum

    class Color(enum.Enum):
        RED = 1

    nested: Any = "bottom"
    for _ in range(250):
        nested = [nested]
    return [
        Event("token", {"text": "", "message_id": None, "node": None}, ""),  # stored, empty
        "line\nbreak \u2028 \u2029 \x85 \x00 \x1b é 😀",
        "y" * (1 << 20),  # a 1 MB token
        {"type": "custom", "data": {"nan": float("nan"), "inf": float("-inf"), Color.RED: None}},
        {"type": "tool_end", "data": {"name": "dump", "output": "é\u2028" * (5 << 20)}},  # 15 MB
        {"type": "custom", "data": {"deep": nested}},
        *("" for _ in range(1000)),  # empty strings: no event
        "end of it",
    ]


@pytest.mark.parametrize("storage", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_odd_and_large_events_reach_live_readers_as_a_replay_reads_them(
    storage: str, request: pytest.FixtureRequest
) -> None:
    """Live SSE and NDJSON readers get, byte for byte, what readers replaying from the start
    after the end get: escapes, a 1 MB token and a 15 MB tool output (under a raised
    max_event_bytes), NaN, an enum key, JSON nested 250 deep."""
    if storage == "redis":
        url = request.getfixturevalue("redis_url")
        transport = from_url(url, prefix=f"http{uuid.uuid4().hex[:8]}")
    else:
        transport = from_url("memory://")
    gate = threading.Event()  # set once both readers have the first event: they read live

    async def odd(request: Request) -> Response:
        async def source() -> AsyncIterator[Any]:
            yield "first "
            await asyncio.to_thread(gate.wait, 30)  # set by the test's thread
            for value in odd_values():
                yield value

        producer = StreamProducer(transport, max_event_bytes=32 << 20)
        return await start_stream(producer, source(), stream_url="/streams/{stream_id}")

    async def read(client: httpx.AsyncClient, url: str, accept: dict[str, str]) -> bytes:
        async with client.stream("GET", url, headers=accept) as response:
            assert response.status_code == 200
            body: list[bytes] = []
            async for chunk in response.aiter_bytes():
                if not body:
                    first.append(accept)
                    if len(first) == 2:
                        gate.set()
                body.append(chunk)
            return b"".join(body)

    first: list[Any] = []
    with serve(transport, routes=[Route("/odd", odd, methods=["POST"])]) as server:
        async with server.client() as client:
            stream_url = (await client.post("/odd")).json()["stream_url"]
            live = await asyncio.gather(
                read(client, stream_url, SSE_ACCEPT), read(client, stream_url, NDJSON_ACCEPT)
            )
            replayed = [
                (await client.get(stream_url, headers=accept)).content
                for accept in (SSE_ACCEPT, NDJSON_ACCEPT)
            ]

    assert live == replayed
    lines = [orjson.loads(line) for line in live[1].splitlines()]
    assert [line["type"] for line in lines] == [
        *(["token"] * 4),
        *("custom", "tool_end", "custom", "token", "end"),
    ]
    assert lines[4]["data"] == {"nan": None, "inf": None, "1": None}
    assert lines[5]["data"]["output"] == "é\u2028" * (5 << 20)
    assert lines[-2]["data"]["text"] == "end of it"


# --- errors ----------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"code", "message"}
    assert body["code"] == code
    assert body["message"]
    return body


async def test_unknown_stream_is_204_for_sse_clients_and_404_json_for_others(
    server: Server,
) -> None:
    async with server.client() as client:
        sse = await client.get("/streams/unknown", headers=SSE_ACCEPT)
        plain = await client.get("/streams/unknown")
        ndjson = await client.get("/streams/unknown", headers=NDJSON_ACCEPT)

    assert (sse.status_code, sse.content) == (204, b"")  # EventSource stops reconnecting
    assert_error(plain, 404, "stream_not_found")
    assert_error(ndjson, 404, "stream_not_found")


@pytest.mark.parametrize(
    ("path", "headers", "code"),
    [
        ("/streams/" + "x" * 201, {}, "invalid_stream_id"),
        ("/streams/bad%20id", SSE_ACCEPT, "invalid_stream_id"),
        ("/streams/abc?after=garbage", SSE_ACCEPT, "invalid_offset"),
        ("/streams/abc?after=1-0-0", {}, "invalid_offset"),
        ("/streams/abc", {"last-event-id": "1-2"}, "invalid_offset"),
    ],
)
async def test_malformed_id_or_offset_is_400(
    server: Server, path: str, headers: dict[str, str], code: str
) -> None:
    async with server.client() as client:
        assert_error(await client.get(path, headers=headers), 400, code)


async def test_offset_past_the_end_is_400(server: Server) -> None:
    async with server.client() as client:
        url = await start(client, tokens=3)
        last = (await read_sse(client, url))[-1].id
        epoch, seq, _ = last.split("-")
        response = await client.get(url, params={"after": f"{epoch}-{int(seq) + 5}-0"})

    assert_error(response, 400, "invalid_offset")


@pytest.mark.redis
async def test_an_entry_number_redis_cannot_hold_is_400_not_503(redis_url: str) -> None:
    """Regression: past 2**64 - 1 (the largest number of a Redis entry id) an offset of a
    running stream reached Redis as it was, which refused it: 503 "unavailable" with
    Retry-After, a retry for ever of an offset no run can issue."""
    with serve(from_url(redis_url, prefix=f"http{uuid.uuid4().hex[:8]}")) as server:
        async with server.client() as client:
            url = await start(client, tokens=1, hold=1)
            epoch = (await read_sse(client, url, limit=1))[0].id.split("-")[0]
            reads = [
                asyncio.create_task(
                    client.get(url, headers={**NDJSON_ACCEPT, "last-event-id": offset})
                )
                for offset in (f"{epoch}-{2**64}-0", f"{epoch}-{10**20 - 1}-0")
            ]
            # The run ends while they wait for it to reach their offset: they read storage.
            await client.post(f"{url}/cancel")
            responses = await asyncio.gather(*reads)

    for response in responses:
        assert_error(response, 400, "invalid_offset")


async def test_offset_from_a_future_run_is_400_not_410(server: Server) -> None:
    """Regression (issue 9): an epoch newer than the stream's answered 410 "reload"."""
    async with server.client() as client:
        url = await start(client, tokens=3)
        first = (await read_sse(client, url))[0].id
        epoch, seq, index = first.split("-")
        future = f"{int(epoch) + 1}-{seq}-{index}"
        responses = [
            await client.get(url, headers={**accept, "last-event-id": future})
            for accept in (SSE_ACCEPT, NDJSON_ACCEPT, {})
        ]
        after = await client.get(url, params={"after": future})

    for response in [*responses, after]:
        assert_error(response, 400, "invalid_offset")


async def test_offset_past_the_end_of_its_entry_is_refused() -> None:
    """Regression (issue 9): an event index past its entry was accepted (as the entry's end).

    The core answers it as expired rather than malformed: after a storage rollback the
    producer may write an entry again with fewer events, so a real offset can point past
    it, and a reload is the answer that never leaves a client stuck.
    """
    transport = MemoryTransport()
    run = await StreamProducer(transport).start(paced_tokens(3, 0))
    assert await run.wait() == "completed"
    with serve(transport) as server:
        async with server.client() as client:
            url = f"/streams/{run.stream_id}"
            events = await read_sse(client, url)
            # Every event's entry, with one index past the entry's last event.
            entries: dict[tuple[str, str], int] = {}
            for event in events:
                epoch, seq, index = event.id.split("-")
                entries[epoch, seq] = max(entries.get((epoch, seq), 0), int(index) + 1)
            past = [f"{epoch}-{seq}-{count}" for (epoch, seq), count in entries.items()]
            responses = [
                await client.get(url, headers={**accept, "last-event-id": offset})
                for offset in past
                for accept in (SSE_ACCEPT, NDJSON_ACCEPT)
            ]

    for response in responses:
        message = assert_error(response, 410, "offset_expired")["message"]
        assert "fewer than this offset names" in message
        assert "reload" in message


@pytest.mark.parametrize("accept", [SSE_ACCEPT, NDJSON_ACCEPT])
async def test_an_offset_lost_in_a_rollback_is_410_while_the_run_is_still_going(
    accept: dict[str, str],
) -> None:
    """Regression: a client resuming after an offset the storage lost (a failover to a
    lagging replica) while the run went on got a 200 that was cut, unless the run's
    storage_rollback came within the half second before the headers go out; it came
    sooner, but the reader noticed only half a lease later (here 30 s).

    In-process (httpx's ASGITransport), to hold the run's source and drop its entries.
    """
    transport = MemoryTransport()
    gate = asyncio.Event()
    run = await StreamProducer(transport, max_buffer=1, rollback_window=2, lease=60).start(
        tokens(20, every=1, pause=gate), stream_id="rolled"
    )
    async with StreamConsumer(transport, run.stream_id) as reader:
        seen = [await anext(reader) for _ in range(10)]  # entries 1-10; the run is held
    stored = transport._streams[run.stream_id]
    del stored.payloads[7:]  # the storage lost entries 8-10, beyond the rollback window
    stored.last_count = 1
    router = StreamRouter(transport, authorize=allow_all)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(router), base_url="http://test"
    ) as client:
        request = asyncio.ensure_future(
            client.get(f"/{run.stream_id}", params={"after": seen[-1].offset}, headers=accept)
        )
        await eventually(lambda: bool(stored.subscribers))  # the resume waits, live
        gate.set()  # the run writes on, finds the rollback, ends with storage_rollback
        async with asyncio.timeout(5):
            response = await request

    assert "rolled back" in assert_error(response, 410, "offset_expired")["message"]
    await run.wait()


async def test_offset_from_an_earlier_run_is_410_reload(server: Server) -> None:
    async with server.client() as client:
        url = await start(client, tokens=5, stream_id="run-twice")
        old = await read_sse(client, url)
        await start(client, tokens=5, stream_id="run-twice")  # a new run: a new epoch
        responses = [
            await client.get(url, headers={**accept, "last-event-id": old[2].id})
            for accept in (SSE_ACCEPT, NDJSON_ACCEPT, {})
        ]

    for response in responses:
        assert "reload" in assert_error(response, 410, "offset_expired")["message"]


async def test_offset_older_than_the_retained_events_is_410() -> None:
    transport = MemoryTransport(max_entries=5)
    # max_buffer=1: one entry per token, so the first ones are trimmed whatever the load.
    run = await StreamProducer(transport, max_buffer=1).start(paced_tokens(40, 0, 0, False))
    assert await run.wait() == "completed"
    with serve(transport) as server:
        async with server.client() as client:
            response = await client.get(
                f"/streams/{run.stream_id}",
                headers={**SSE_ACCEPT, "last-event-id": f"{run.epoch}-1-0"},
            )

    assert_error(response, 410, "offset_expired")


async def test_expired_stream_is_204_for_sse_clients_and_404_for_others() -> None:
    with serve(MemoryTransport(retention=0.2)) as server:
        async with server.client() as client:
            url = await start(client, tokens=3)

            async def expired() -> bool:
                return (await client.get(url)).status_code == 404

            await eventually(expired)  # retention is a clock: poll it
            sse = await client.get(url, headers=SSE_ACCEPT)
            plain = await client.get(url)

    assert (sse.status_code, sse.content) == (204, b"")
    assert_error(plain, 404, "stream_expired")


async def test_authorize_guards_every_endpoint_and_deny_is_403() -> None:
    calls: list[tuple[str, str]] = []

    async def authorize(request: Request, stream_id: str, action: str) -> bool:
        calls.append((stream_id, action))
        return request.headers.get("x-user") == "alice"

    with serve(authorize=authorize) as server:
        async with server.client() as client:
            url = await start(client, tokens=3, hold=1)
            stream_id = url.rsplit("/", 1)[1]
            for method, path in [("GET", url), ("GET", f"{url}/status"), ("POST", f"{url}/cancel")]:
                assert_error(
                    await client.request(method, path, headers=SSE_ACCEPT), 403, "forbidden"
                )

            alice = {"x-user": "alice"}
            assert (await client.get(f"{url}/status", headers=alice)).status_code == 200
            assert (await client.post(f"{url}/cancel", headers=alice)).status_code == 202
            events = await read_sse(client, url, headers=alice)

    assert events[-1].event == "cancelled"
    assert sorted(set(calls)) == [(stream_id, "cancel"), (stream_id, "read"), (stream_id, "status")]


async def test_authorize_may_be_sync_and_raise_its_own_http_error() -> None:
    def authorize(request: Request, stream_id: str, action: str) -> bool:
        if "authorization" not in request.headers:
            raise HTTPException(401, "log in first", headers={"www-authenticate": "Bearer"})
        return True

    with serve(authorize=authorize) as server:
        async with server.client() as client:
            response = await client.get("/streams/abc/status")

    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


async def test_connection_cap_answers_503_with_retry_after() -> None:
    with serve(max_connections=2) as server:
        async with server.client() as client:
            url = await start(client, tokens=1, hold=1)
            async with contextlib.AsyncExitStack() as readers:
                for _ in range(2):
                    source = await readers.enter_async_context(aconnect_sse(client, "GET", url))
                    events = source.aiter_sse()
                    readers.push_async_callback(events.aclose)
                    await anext(events)
                assert server.router.connections == 2
                refused = await client.get(url, headers=SSE_ACCEPT)

            def released() -> bool:
                return server.router.connections == 0

            await eventually(released)
            async with aconnect_sse(client, "GET", url) as source:
                assert source.response.status_code == 200
            await client.post(f"{url}/cancel")

    assert_error(refused, 503, "too_many_streams")
    assert refused.headers["retry-after"] == "1"


async def test_custom_routes_share_the_router_connection_cap() -> None:
    transport = from_url("memory://")
    router = StreamRouter(transport, authorize=allow_all, max_connections=1)

    async def custom(request: Request) -> Response:
        consumer = StreamConsumer(transport, request.path_params["stream_id"])
        return StreamResponse(consumer, request, limit=router.limit)

    app = build_app(transport, router, routes=[Route("/custom/{stream_id}", custom)])
    with uvicorn_server(app, graceful_timeout=2) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            stream_url = await start(client, tokens=1, hold=1)
            stream_id = stream_url.rsplit("/", 1)[1]
            async with aconnect_sse(client, "GET", f"/custom/{stream_id}") as source:
                events = source.aiter_sse()
                await anext(events)
                assert router.connections == 1
                refused = await client.get(stream_url, headers=SSE_ACCEPT)
                await events.aclose()
            await client.post(f"{stream_url}/cancel")

    assert_error(refused, 503, "too_many_streams")


def test_the_streaming_engine_imports_no_web_framework() -> None:
    code = (
        "import sys, resumable_stream._asgi; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'starlette', 'fastapi'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, "[]\n"), result.stderr


async def test_storage_failure_is_503_unavailable() -> None:
    transport = MemoryTransport()
    await transport.aclose()
    with serve(transport) as server:
        async with server.client() as client:
            responses = [
                await client.get("/streams/abc", headers=SSE_ACCEPT),
                await client.get("/streams/abc/status"),
                await client.post("/streams/abc/cancel"),
                await client.post("/runs"),
            ]

    for response in responses:
        assert_error(response, 503, "unavailable")
        assert response.headers["retry-after"] == "1"


def test_router_requires_an_explicit_authorize() -> None:
    """Regression (issue 9): without authorize, every stream was world-readable and
    world-cancellable."""
    transport = from_url("memory://")
    with pytest.raises(ConfigurationError, match="authorize=allow_all"):
        StreamRouter(transport)
    with pytest.raises(ConfigurationError, match="needs authorize="):
        StreamRouter(transport, authorize=None)
    assert StreamRouter(transport, authorize=allow_all).authorize is allow_all


async def test_server_errors_name_no_internal_address(caplog: pytest.LogCaptureFixture) -> None:
    """Regression (issue 9): 503 bodies carried the backend's host and port."""
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transport = from_url(f"redis://127.0.0.1:{port}/0")
    with serve(transport) as server:
        async with server.client() as client:
            responses = [
                await client.get("/streams/abc", headers=SSE_ACCEPT),
                await client.get("/streams/abc/status"),
                await client.post("/streams/abc/cancel"),
                await client.post("/runs"),
            ]

    for response in responses:
        body = assert_error(response, 503, "unavailable")
        assert str(port) not in response.text
        assert "127.0.0.1" not in response.text
        assert body["message"] == "stream storage is unavailable; retry later"
    # The detail is in the server's log instead.
    assert f"127.0.0.1', {port}" in caplog.text or f"127.0.0.1:{port}" in caplog.text


async def test_unknown_paths_and_methods_get_json_errors(server: Server) -> None:
    async with server.client() as client:
        assert_error(await client.get("/streams/a/b/c"), 404, "not_found")
        response = await client.delete("/streams/abc")

    assert_error(response, 405, "method_not_allowed")
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD"}


# --- status and cancel -----------------------------------------------------------------------


async def test_status_reports_the_run(server: Server) -> None:
    async with server.client() as client:
        url = await start(client, tokens=3, hold=1)
        stream_id = url.rsplit("/", 1)[1]
        events = await read_sse(client, url, limit=3)
        running = (await client.get(f"{url}/status")).json()
        await client.post(f"{url}/cancel")
        cancelled = (await read_sse(client, url, headers={"last-event-id": events[-1].id}))[-1]
        final = (await client.get(f"{url}/status")).json()
        unknown = await client.get("/streams/unknown/status")

    assert running == {
        "stream_id": stream_id,
        "status": "running",
        "next_offset": events[-1].id,
        "created_at": running["created_at"],
        "updated_at": running["updated_at"],
    }
    assert running["created_at"] <= running["updated_at"] <= final["updated_at"]
    assert (final["status"], final["next_offset"]) == ("cancelled", cancelled.id)
    assert_error(unknown, 404, "stream_not_found")


async def test_cancel_stops_the_run_and_readers_see_cancelled(server: Server) -> None:
    async with server.client() as client:
        url = await start(client, tokens=2, hold=1)
        stream_id = url.rsplit("/", 1)[1]
        async with aconnect_sse(client, "GET", url) as source:
            events = []
            async for sse in source.aiter_sse():
                events.append(sse)
                if len(events) == 1:
                    cancel = await client.post(f"{url}/cancel")
        again = await client.post(f"{url}/cancel")
        unknown = await client.post("/streams/unknown/cancel")

    assert (cancel.status_code, cancel.json()) == (
        202,
        {"stream_id": stream_id, "cancel_requested": True},
    )
    assert [e.event for e in events] == ["token", "token", "cancelled"]
    assert_error(again, 409, "stream_not_running")
    assert_error(unknown, 404, "stream_not_found")


async def test_status_and_cancel_of_a_run_whose_producer_died_say_it_is_lost() -> None:
    # What a process killed mid-run leaves: a running stream whose lease lapsed, and no
    # reader yet to end it. Status said "running" (for the whole running TTL and tombstone)
    # and cancel answered 202, for a run that would never write anything again.
    transport = MemoryTransport()
    for stream_id in ("dead-status", "dead-cancel"):
        await dead_run(transport, stream_id)

    with serve(transport) as server:
        async with server.client() as client:
            status = await client.get("/streams/dead-status/status")
            cancel = await client.post("/streams/dead-cancel/cancel")
            events = await read_sse(client, "/streams/dead-cancel")

    assert status.status_code == 200
    assert status.json()["status"] == "error"
    assert status.json()["next_offset"].endswith("-0000000002-00000")  # the error event's
    assert_error(cancel, 409, "stream_not_running")
    assert [e.event for e in events] == ["token", "error"]
    assert orjson.loads(events[-1].data)["error"] == "producer_lost"


# --- disconnects, keep-alives, slow clients ----------------------------------------------------


async def test_client_gone_releases_the_consumer_and_the_run_goes_on(server: Server) -> None:
    async with server.client() as client:
        url = await start(client, tokens=30, delay=0.005, hold=1)
        await read_sse(client, url, limit=2)

        def released() -> bool:
            return server.router.connections == 0

        await eventually(released, within=2)
        # The run did not stop: it wrote every token after the reader left, and still runs.
        events = await read_sse(client, url, limit=30)
        status = (await client.get(f"{url}/status")).json()["status"]
        await client.post(f"{url}/cancel")

    assert text(events) == full_text(30)
    assert status == "running"


async def test_cancel_on_disconnect_stops_the_run() -> None:
    with serve(cancel_on_disconnect=True) as server:
        async with server.client() as client:
            url = await start(client, tokens=2, hold=1)
            await read_sse(client, url, limit=1)
            events = await read_sse(client, url)  # ends when the first reader's leaving cancels

    assert [e.event for e in events] == ["token", "token", "cancelled"]


async def test_disconnect_cancels_only_for_readers_allowed_to_cancel() -> None:
    """Regression (issue 9): a reader allowed only to read stopped the run by leaving."""
    asked: list[tuple[str, str]] = []

    def authorize(request: Request, stream_id: str, action: str) -> bool:
        asked.append((request.headers.get("x-user", ""), action))
        return action != "cancel" or request.headers.get("x-user") == "owner"

    with serve(cancel_on_disconnect=True, authorize=authorize) as server:
        async with server.client() as client:
            url = await start(client, tokens=30, delay=0.005, hold=1)
            await read_sse(client, url, limit=2, headers={"x-user": "reader"})

            def released() -> bool:
                return server.router.connections == 0  # after on_disconnect returned

            await eventually(released)
            # The run went on: the owner reads every token (then leaves, which cancels).
            events = await read_sse(client, url, limit=30, headers={"x-user": "owner"})
            ended = await read_sse(client, url, headers={"x-user": "reader"})

    assert text(events) == full_text(30)
    assert ("reader", "cancel") in asked
    assert text(ended) == full_text(30)
    assert ended[-1].event == "cancelled"


@pytest.mark.parametrize(
    ("accept", "keepalive", "count"),
    [(SSE_ACCEPT, b": ping\n", 2), (NDJSON_ACCEPT, b"\n", 3)],
    ids=["sse", "ndjson"],
)
async def test_idle_streams_get_keepalives(
    accept: dict[str, str], keepalive: bytes, count: int
) -> None:
    with serve(ping_interval=0.05) as server:
        async with server.client() as client:
            url = await start(client, tokens=1, hold=1)
            received = b""
            async with client.stream("GET", url, headers=accept) as response:
                async for chunk in response.aiter_bytes():
                    received += chunk
                    if received.count(keepalive) >= count:
                        break
            await client.post(f"{url}/cancel")

    first, _, rest = received.partition(b"\n\n" if accept is SSE_ACCEPT else b"\n")
    assert rest.replace(keepalive, b"") == b""
    if accept is SSE_ACCEPT:
        assert first.startswith(b"retry: 1000\nid: ")
        assert len(await _sse_events(received)) == 1  # pings are comments, never events


async def _sse_events(raw: bytes) -> list[ServerSentEvent]:
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=raw)
    return [sse async for sse in EventSource(response).aiter_sse()]


async def test_stuck_client_is_cut_after_the_send_timeout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="resumable_stream.http")
    with serve(send_timeout=0.3) as server:
        async with server.client() as client:
            # 8 MB of events: more than the kernel buffers between server and client hold.
            url = await start(client, tokens=2000, size=4096)
            port = int(server.url.rsplit(":", 1)[1])
            stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                stuck.connect(("127.0.0.1", port))
                stuck.sendall(f"GET {url} HTTP/1.1\r\nHost: test\r\n\r\n".encode())

                def serving() -> bool:
                    return server.router.connections == 1

                def released() -> bool:
                    return server.router.connections == 0

                await eventually(serving, within=5)
                await eventually(released, within=5)  # it never read a byte
            finally:
                stuck.close()

    assert "the client read nothing for 0.3s" in caplog.text


async def test_a_stalled_reader_replaying_a_long_stream_holds_a_page_not_the_stream(
    redis_url: str,
) -> None:
    """Regression: a replay read 512 entries at once, which for a stream written in bursts
    (256 events of 1 KB an entry) is the whole stream: each reader that stopped reading held
    20 MB of it until the send timeout cut it. Pages now hold about 1 MB."""

    class InFlight:
        """Pass as ``wrap=``: whether a write of the response is waiting for the client."""

        def __init__(self) -> None:
            self.waiting = False

        def __call__(self, app: ASGIApp) -> ASGIApp:
            async def watched(scope: Scope, receive: Receive, send: Send) -> None:
                async def watched_send(message: Message) -> None:
                    self.waiting = True
                    await send(message)
                    self.waiting = False

                await app(scope, receive, watched_send)

            return watched

    in_flight = InFlight()
    transport = from_url(redis_url, prefix=f"http{uuid.uuid4().hex[:8]}")
    with serve(transport, wrap=in_flight) as server:
        async with server.client() as client:
            url = await start(client, tokens=20_000, size=1000)  # 20 MB, written in bursts

            async def completed() -> bool:
                return (await client.get(f"{url}/status")).json()["status"] == "completed"

            await eventually(completed)
            port = int(server.url.rsplit(":", 1)[1])
            stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                stalled.connect(("127.0.0.1", port))
                stalled.sendall(f"GET {url} HTTP/1.1\r\nHost: test\r\n\r\n".encode())

                def stuck() -> bool:  # a write waits for the client, which reads nothing
                    return server.router.connections == 1 and in_flight.waiting

                await eventually(stuck)
                held = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
                stalled.close()

    assert held < 4_000_000  # a page of about 1 MB and the buffers, not the 20 MB stream


async def test_a_stuck_write_is_cut_without_busy_waiting() -> None:
    """ASGI-level: the send never returns; the send timeout cuts it, at no CPU cost."""
    transport = from_url("memory://")
    client_reads = asyncio.Event()  # never set: the client stopped reading
    sent: list[Message] = []
    left = asyncio.Event()

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            await client_reads.wait()

    async def receive() -> Message:
        await client_reads.wait()
        return {"type": "http.disconnect"}

    async def on_disconnect() -> None:
        left.set()

    async with transport, StreamProducer(transport) as producer:
        run = await producer.start(paced_tokens(3, 0, hold=True))
        consumer = StreamConsumer(transport, run.stream_id)
        response = StreamResponse(
            consumer, ping_interval=0.005, send_timeout=0.3, on_disconnect=on_disconnect
        )
        cpu = time.process_time()
        await response({"type": "http", "method": "GET"}, receive, send)
        cpu = time.process_time() - cpu

    assert left.is_set()
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert cpu < 0.15  # pings fall due during the stuck write: no timer may spin


async def test_a_reader_ahead_of_a_slow_client_waits_for_room_and_then_goes_on() -> None:
    """ASGI-level: the reader stops at the buffer limit (64 KiB) until the writer takes
    the buffer, and goes on once it has: a slow client gets the whole stream, in order."""
    transport = from_url("memory://")
    bodies: list[bytes] = []
    turns = asyncio.Semaphore(0)  # one write let through per release

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            await turns.acquire()
            bodies.append(message["body"])

    async def let_through() -> None:
        while True:
            turns.release()
            await asyncio.sleep(0)  # one write per loop turn: the reader gets ahead

    async with transport, StreamProducer(transport) as producer:
        run = await producer.start(paced_tokens(400, 0, size=1000))  # 400 KB
        await run.wait()
        response = StreamResponse(StreamConsumer(transport, run.stream_id), ping_interval=None)
        client = asyncio.create_task(let_through())
        try:
            await asyncio.wait_for(
                response({"type": "http", "method": "GET"}, client_stays, send), timeout=30
            )
        finally:
            client.cancel()

    blocks = [
        dict(line.split(b": ", 1) for line in block.split(b"\n"))
        for block in b"".join(bodies).split(b"\n\n")
        if block
    ]
    texts = [
        orjson.loads(block[b"data"])["text"] for block in blocks if block[b"event"] == b"token"
    ]
    assert texts == [word(i).ljust(1000, "x") for i in range(400)]
    assert blocks[-1][b"event"] == b"end"
    assert len(bodies) > 6  # the reader filled the buffer and waited, again and again


async def fed(batches: asyncio.Queue[list[Any] | None]) -> AsyncIterator[Any]:
    """A source the test feeds: the items of each list put in ``batches``, until None (a
    list's items reach the producer in one go, as one entry)."""
    while (batch := await batches.get()) is not None:
        for item in batch:
            yield item


async def client_stays() -> Message:
    """An ASGI ``receive`` whose client never leaves."""
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")


async def test_an_event_written_while_the_writer_waits_is_cut_when_stuck(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A live event reaching a response whose writer waits is written by the task reading
    the stream (one task wake-up less per event). When that write never returns, the send
    timeout still cuts the response, and the client counts as gone."""
    caplog.set_level(logging.INFO, logger="resumable_stream.http")
    transport = from_url("memory://")
    tokens: asyncio.Queue[list[Any] | None] = asyncio.Queue()
    first_sent = asyncio.Event()
    never = asyncio.Event()  # the client stopped reading after the first event
    bodies: list[tuple[bytes, asyncio.Task[Any] | None]] = []
    left = asyncio.Event()

    async def send(message: Message) -> None:
        if message["type"] != "http.response.body":
            return
        bodies.append((message["body"], asyncio.current_task()))
        if len(bodies) == 1:
            first_sent.set()
        else:
            await never.wait()

    async def receive() -> Message:
        await never.wait()
        return {"type": "http.disconnect"}

    async def on_disconnect() -> None:
        left.set()

    async with transport, StreamProducer(transport) as producer:
        run = await producer.start(fed(tokens))
        tokens.put_nowait(["Hello"])
        response = StreamResponse(
            StreamConsumer(transport, run.stream_id), send_timeout=0.3, on_disconnect=on_disconnect
        )
        serving = asyncio.create_task(response({"type": "http", "method": "GET"}, receive, send))
        await first_sent.wait()  # the writer wrote it and waits for more, in the same step
        tokens.put_nowait([" world"])
        await asyncio.wait_for(serving, timeout=10)
        await run.cancel()

    assert left.is_set()
    assert [b"Hello" in body for body, _ in bodies] == [True, False]
    assert b" world" in bodies[1][0]
    assert bodies[1][1] is not bodies[0][1]  # written by the reading task, not the writer
    assert "the client read nothing for 0.3s" in caplog.text


@pytest.mark.parametrize(
    ("format", "method", "accept"),
    [
        ("sse", "GET", b"*/*"),
        ("sse", "GET", b"text/event-stream"),
        ("ndjson", "GET", b"*/*"),
        ("ndjson", "POST", b"*/*"),
    ],
)
async def test_a_read_its_server_cancels_before_its_headers_answers_503(
    format: str, method: str, accept: bytes
) -> None:
    """Regression: a server's shutdown (the end of uvicorn's graceful wait) cancelling a
    read still waiting for its first events answered 200 with an empty body (NDJSON
    clients read it as a stream with nothing in it); nothing was sent, so the answer is a
    503 the client retries on, elsewhere. A POST (it started a run, which a retry would
    start again) ends its response as before, and so does an EventSource's (it reconnects
    after a 200 that ends, and stops for good on a 503)."""
    transport = from_url("memory://")
    sent: list[Message] = []
    listening = asyncio.Event()

    async def receive() -> Message:
        listening.set()  # the response is up, waiting for its first events
        return await client_stays()

    async def send(message: Message) -> None:
        sent.append(message)

    async with transport, StreamProducer(transport) as producer:
        live = await producer.start(fed(asyncio.Queue()))  # no event yet
        scope = {"type": "http", "method": method, "headers": [(b"accept", accept)]}
        consumer = StreamConsumer(transport, live.stream_id)
        response = StreamResponse(consumer, Request(scope), format=format)
        serving = asyncio.create_task(response(scope, receive, send))
        await listening.wait()
        serving.cancel()  # the server's shutdown
        await serving
        await live.cancel()

    start, body = sent
    headers = dict(start["headers"])
    assert body["more_body"] is False
    if method == "POST" or accept == b"text/event-stream":
        assert start["status"] == 200 and body["body"] == b""
        return
    assert start["status"] == 503 and headers[b"retry-after"] == b"1"
    assert headers[b"content-type"] == b"application/json"
    assert orjson.loads(body["body"])["code"] == "server_closing"


async def test_a_write_the_server_cancels_at_its_shutdown_is_not_lost() -> None:
    """Regression: a shutdown (the end of uvicorn's graceful wait) cancelling a write that
    waited for a slow client lost that write's events, and the response's last write sent
    the events read after them: the client's last offset was past a gap, and its resume
    never read the lost events. uvicorn waits for the client before it writes, so a
    cancelled send wrote nothing."""
    transport = from_url("memory://")
    tokens: asyncio.Queue[list[Any] | None] = asyncio.Queue()
    delivered: list[bytes] = []
    client_reads = asyncio.Event()

    async def send(message: Message) -> None:
        if len(delivered) == 2:  # the headers and the first events went out
            await client_reads.wait()  # as uvicorn's flow control, before it writes
        delivered.append(message.get("body", b""))

    async with transport, StreamProducer(transport) as producer:
        run = await producer.start(fed(tokens))
        tokens.put_nowait([word(i) for i in range(300)])
        async with StreamConsumer(transport, run.stream_id) as stored:  # all 300 stored
            async for event in stored:
                if event.data["text"] == word(299):
                    break
        response = StreamResponse(StreamConsumer(transport, run.stream_id), format="ndjson")
        encode, read = response.wire.encode, []
        response.wire = response.wire._replace(encode=lambda e: read.append(e) or encode(e))
        serving = asyncio.create_task(
            response({"type": "http", "method": "GET"}, client_stays, send)
        )
        # A catch-up: the first events leave in one write, the next one waits for the
        # client, and a live event is read meanwhile.
        await eventually(lambda: len(read) == 300)
        tokens.put_nowait(["late"])
        await eventually(lambda: len(read) == 301)
        serving.cancel()  # the server's shutdown
        client_reads.set()  # the client reads again, in time for the last write
        await serving
        await run.cancel()

    lines = [orjson.loads(line) for line in b"".join(delivered).splitlines() if line]
    # Every event up to the last offset the client got: its resume (after it) loses none.
    assert "".join(line["data"]["text"] for line in lines) == full_text(300) + "late"


async def test_events_read_together_leave_in_one_write() -> None:
    """Events the response reads together go out in one body message, not one per event:
    a replay, and live events that arrive together while the writer waits."""
    transport = from_url("memory://")
    bodies: list[bytes] = []
    tokens: asyncio.Queue[list[Any] | None] = asyncio.Queue()
    first_sent = asyncio.Event()
    last_sent = asyncio.Event()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            bodies.append(message["body"])
            first_sent.set()
            if b"last" in message["body"]:
                last_sent.set()

    async def serve(stream_id: str, after: str | None = None) -> list[ServerSentEvent]:
        bodies.clear()
        consumer = StreamConsumer(transport, stream_id, after=after)
        await StreamResponse(consumer)({"type": "http", "method": "GET"}, client_stays, send)
        return await _sse_events(b"".join(bodies))

    async with transport, StreamProducer(transport) as producer:
        run = await producer.start(paced_tokens(300, 0))
        await run.wait()
        events = await serve(run.stream_id)
        # Two: the consumer lets the loop run once per CONSUMER_CHECKPOINT (256) events.
        assert len(events) == 301 and len(bodies) <= 2
        rest = await serve(run.stream_id, after=events[150].id)
        assert [e.id for e in rest] == [e.id for e in events[151:]]
        assert len(bodies) == 1

        live = await producer.start(fed(tokens))
        tokens.put_nowait(["first"])
        serving = asyncio.create_task(serve(live.stream_id))
        await first_sent.wait()  # the writer wrote it and waits for more
        for i in range(50):
            tokens.put_nowait([f"t{i} "])
        tokens.put_nowait(["last"])
        await last_sent.wait()
        await live.cancel()
        streamed = await serving
    assert "".join(e.data for e in streamed[:-1]).count('"text"') == 52
    assert len(bodies) <= 5  # "first", then a few writes (as the producer's entries came)


async def test_an_event_followed_by_one_the_consumer_skips_is_written_at_once() -> None:
    """A consumer subclass that leaves events out (the example chat app's does) may wait
    for the network after an event, with the one it skipped read in the same entry: the
    event read before it must not wait for the next event."""

    class Skipping(StreamConsumer):
        async def __anext__(self) -> Event:
            while True:
                event = await super().__anext__()
                if event.type != "custom":
                    return event

    transport = from_url("memory://")
    batches: asyncio.Queue[list[Any] | None] = asyncio.Queue()
    first_sent = asyncio.Event()
    hello_sent = asyncio.Event()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            first_sent.set()
            if b"Hello" in message["body"]:
                hello_sent.set()

    async with transport, StreamProducer(transport) as producer:
        run = await producer.start(fed(batches))
        batches.put_nowait(["start"])
        response = StreamResponse(
            Skipping(transport, run.stream_id), format="ndjson", ping_interval=None
        )
        serving = asyncio.create_task(
            response({"type": "http", "method": "GET"}, client_stays, send)
        )
        await first_sent.wait()  # the writer wrote it and waits for more
        # One entry: a token, then an event the consumer skips; then the model thinks.
        batches.put_nowait(["Hello", Event("custom", {"name": "skipped", "data": {}}, "")])
        await asyncio.wait_for(hello_sent.wait(), timeout=10)  # held: never, no pings
        await run.cancel()
        await serving


class _RenamingEnd(StreamConsumer):
    """Hands out the end as an event of another type (the chat example's consumer does)."""

    async def __anext__(self) -> Event:
        event = await super().__anext__()
        if event.type == "end":
            return Event("finished", {}, event.offset)
        return event


@pytest.mark.parametrize("consumer_class", [StreamConsumer, _RenamingEnd])
@pytest.mark.parametrize("cut_by", ["disconnect", "send_timeout"])
async def test_a_client_leaving_while_the_end_is_written_is_not_a_disconnect(
    cut_by: str, consumer_class: type[StreamConsumer]
) -> None:
    """The end read, the response is done: a client that leaves (or stops reading) while
    the end is written does not get ``on_disconnect`` (a cancel of the run, with
    ``cancel_on_disconnect``), also when the end arrives alone while the writer waits, and
    when the consumer hands it out under another type."""
    transport = from_url("memory://")
    tokens: asyncio.Queue[list[Any] | None] = asyncio.Queue()
    first_sent = asyncio.Event()
    end_sent = asyncio.Event()
    never = asyncio.Event()
    disconnects: list[str] = []

    async def send(message: Message) -> None:
        if message["type"] != "http.response.body" or not message["body"]:
            return
        first_sent.set()
        if b'"type":"end"' in message["body"] or b'"type":"finished"' in message["body"]:
            end_sent.set()
            await never.wait()  # this write never returns

    async def receive() -> Message:
        await (end_sent if cut_by == "disconnect" else never).wait()
        return {"type": "http.disconnect"}

    async def on_disconnect() -> None:
        disconnects.append(cut_by)

    async with transport, StreamProducer(transport) as producer:
        run = await producer.start(fed(tokens))
        tokens.put_nowait(["Hello"])
        response = StreamResponse(
            consumer_class(transport, run.stream_id),
            format="ndjson",
            ping_interval=None,
            send_timeout=0.3 if cut_by == "send_timeout" else None,
            on_disconnect=on_disconnect,
        )
        serving = asyncio.create_task(response({"type": "http", "method": "GET"}, receive, send))
        await first_sent.wait()  # the writer wrote "Hello" and waits for more
        tokens.put_nowait(None)  # the run ends: its end arrives alone
        await asyncio.wait_for(serving, timeout=10)
    assert end_sent.is_set()
    assert disconnects == []


async def test_a_consumer_timing_out_its_own_waits_is_served_as_if_awaited() -> None:
    """The response runs the consumer in its own task: the consumer's asyncio.timeout
    (which cancels the current task) must reach the consumer, not end the response."""

    class Patient(StreamConsumer):
        def __init__(self) -> None:
            super().__init__(from_url("memory://"), "patient")
            self.sent = 0

        async def __anext__(self) -> Event:
            if self.sent == 3:
                raise StopAsyncIteration
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.01):
                    await asyncio.get_running_loop().create_future()  # never done
            self.sent += 1
            kind = "end" if self.sent == 3 else "token"
            return Event(kind, {"text": f"t{self.sent}"}, f"1-{self.sent}-0")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        await asyncio.get_running_loop().create_future()  # the client stays
        raise AssertionError("unreachable")

    response = StreamResponse(Patient(), format="ndjson", ping_interval=None)
    await response({"type": "http", "method": "GET"}, receive, send)

    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert [orjson.loads(line)["offset"] for line in body.splitlines()] == [
        "1-1-0",
        "1-2-0",
        "1-3-0",
    ]
    assert sent[-1] == {"type": "http.response.body", "body": sent[-1]["body"], "more_body": False}


# --- building blocks for custom routes ----------------------------------------------------------


async def test_stream_response_and_error_response_serve_custom_routes() -> None:
    transport = from_url("memory://")

    async def custom(request: Request) -> Response:
        stream_id = request.path_params["stream_id"]
        consumer = StreamConsumer(transport, stream_id, after=resume_after(request))
        return StreamResponse(consumer, request, ping_interval=None)

    route = Route("/custom/{stream_id}", custom)
    with serve(transport, routes=[route]) as server:
        async with server.client() as client:
            url = await start(client, tokens=20)
            stream_id = url.rsplit("/", 1)[1]
            events = await read_sse(client, f"/custom/{stream_id}")
            resumed = await read_sse(client, f"/custom/{stream_id}", params={"after": events[4].id})
            malformed = await client.get(f"/custom/{stream_id}", params={"after": "x"})
            unknown = await client.get("/custom/unknown", headers=SSE_ACCEPT)

    assert text(events) == full_text(20)
    assert [(e.id, e.data) for e in resumed] == [(e.id, e.data) for e in events[5:]]
    assert_error(malformed, 400, "invalid_offset")  # via the app's exception handler
    assert unknown.status_code == 204


# --- two app instances sharing Redis -------------------------------------------------------------


@pytest.fixture
def two_instances(redis_url: str) -> Iterator[tuple[Server, Server]]:
    prefix = f"http{uuid.uuid4().hex[:8]}"
    with (
        serve(from_url(redis_url, prefix=prefix)) as first,
        serve(from_url(redis_url, prefix=prefix)) as second,
    ):
        yield first, second


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.redis
async def test_a_graceful_shutdown_ends_open_streams_without_an_error_and_readers_resume(
    redis_url: str,
) -> None:
    # Regression: at the end of uvicorn's --timeout-graceful-shutdown the cancellation of
    # an open stream response escaped to uvicorn, which logged "Exception in ASGI
    # application" with a CancelledError traceback on every deploy, and cut the response
    # mid-body. It now ends the response, and the reader resumes on another instance.
    prefix = f"http{uuid.uuid4().hex[:8]}"
    logged = _Records()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(logged)
    try:
        async with from_url(redis_url, prefix=prefix) as worker_side:
            # The run's writer is a worker of its own, which goes on as the server stops.
            producer = StreamProducer(worker_side)
            run = await producer.start(paced_tokens(40, 0.1))
            url = f"/streams/{run.stream_id}"
            leaving = contextlib.ExitStack()
            first = leaving.enter_context(serve(from_url(redis_url, prefix=prefix)))
            with serve(from_url(redis_url, prefix=prefix)) as second:
                head: list[ServerSentEvent] = []
                stopping: asyncio.Task[None] | None = None
                async with first.client() as client, aconnect_sse(client, "GET", url) as source:
                    async for sse in source.aiter_sse():
                        head.append(sse)
                        if len(head) == 3:
                            stopping = asyncio.create_task(asyncio.to_thread(leaving.close))
                assert stopping is not None
                await stopping
                async with second.client() as client:
                    tail = await read_sse(client, url, headers={"last-event-id": head[-1].id})
            await producer.aclose()
    finally:
        uvicorn_log.removeHandler(logged)

    errors = [
        r.getMessage()
        for r in logged.records
        if r.levelno >= logging.ERROR
        # uvicorn's own notice that it cancels what is still open: not the app's error.
        and "timeout graceful shutdown exceeded" not in r.getMessage()
    ]
    assert errors == []
    assert head[-1].event == "token"  # cut mid-run, not at its end
    events = head + tail
    assert [e.event for e in events].count("end") == 1 and events[-1].event == "end"
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids))
    assert [orjson.loads(e.data)["text"] for e in events if e.event == "token"] == [
        word(i) for i in range(40)
    ]


@pytest.mark.redis
async def test_cancel_from_a_second_app_instance_sharing_redis(
    two_instances: tuple[Server, Server],
) -> None:
    producing, other = two_instances
    async with producing.client() as client_a, other.client() as client_b:
        url = await start(client_a, tokens=3, hold=1)  # the run lives in the first instance
        events: list[ServerSentEvent] = []
        async with aconnect_sse(client_b, "GET", url) as source:
            async for sse in source.aiter_sse():
                events.append(sse)
                if len(events) == 3:
                    cancel = await client_b.post(f"{url}/cancel")
        status = (await client_a.get(f"{url}/status")).json()["status"]

    assert cancel.status_code == 202
    assert text(events) == full_text(3)
    assert events[-1].event == "cancelled"
    assert status == "cancelled"


@pytest.mark.redis
async def test_cancel_of_a_queued_run_ends_it_when_a_worker_takes_it_without_its_source(
    redis_url: str,
) -> None:
    """Regression: POST /cancel of a reserved run no worker had started answered 202, yet
    the worker's start ran the source (a model call) and wrote its first token."""
    prefix = f"http{uuid.uuid4().hex[:8]}"
    pulled: list[str] = []

    async def answer() -> AsyncIterator[str]:
        pulled.append("called")
        yield "first token"

    async with from_url(redis_url, prefix=prefix) as queue_side:
        reservation = await StreamProducer(queue_side).reserve(start_timeout=30)
        url = f"/streams/{reservation.stream_id}"
        with serve(from_url(redis_url, prefix=prefix)) as server:
            async with server.client() as client:
                cancel = await client.post(f"{url}/cancel")
                reader = asyncio.create_task(read_sse(client, url))
                async with from_url(redis_url, prefix=prefix) as worker_side:
                    worker = StreamProducer(worker_side)
                    run = await worker.start(answer(), reservation=reservation)
                    assert await run.wait() == "cancelled"
                events = await reader

    assert cancel.status_code == 202 and cancel.json()["cancel_requested"] is True
    assert pulled == []
    assert [e.event for e in events] == ["custom", "custom", "cancelled"]
    assert orjson.loads(events[-1].data)["reason"] == "requested"


@pytest.mark.redis
async def test_reader_resumes_on_another_app_instance(two_instances: tuple[Server, Server]) -> None:
    first, second = two_instances
    async with first.client() as client_a, second.client() as client_b:
        url = await start(client_a, tokens=100, delay=0.002)
        events = await read_sse(client_a, url, limit=30)
        events += await read_sse(client_b, url, headers={"last-event-id": events[-1].id})

    assert text(events) == full_text(100)
    assert_unique_and_ordered([e.id for e in events])


# --- the examples of docs/http.md run as written ------------------------------------------------


def docs_example(marker: str) -> str:
    """The Python block of docs/http.md that contains ``marker``."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "http.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", page, re.S) if marker in b]
    return block


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_docs_examples_serve_and_resume_streams(framework: str) -> None:
    namespace: dict[str, Any] = {"__name__": "docs_http_example"}
    exec(docs_example("app = Starlette("), namespace)
    if framework == "fastapi":
        exec(docs_example("StreamAPIRouter(streams)"), namespace)  # replaces `app`
        assert "/streams/{stream_id}" in namespace["app"].openapi()["paths"]
    exec(docs_example("def chat_events("), namespace)  # "Your own routes"
    namespace["app"].router.routes.insert(
        0, Route("/chats/{chat_id}/events", namespace["chat_events"])
    )

    with uvicorn_server(namespace["app"], graceful_timeout=2) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            started = await client.post("/chat", json={"question": "why resume?"})
            location = started.headers["location"]
            events = await read_sse(client, location, limit=2)
            events += await read_sse(client, location, headers={"last-event-id": events[-1].id})
            own_route = f"/chats/{started.json()['stream_id']}/events"
            replayed = await read_sse(client, own_route)
            malformed = await client.get(own_route, params={"after": "x"})

    assert started.status_code == 202
    assert location == f"/streams/{started.json()['stream_id']}"
    assert text(events) == text(replayed) == "You asked: why resume? "
    assert events[-1].event == "end"
    assert_error(malformed, 400, "invalid_offset")


async def test_docs_example_chat_answers_a_client_gone_mid_body_in_json() -> None:
    # Regression: the page's chat read the body unguarded, and a client that left before
    # sending all of it got Starlette's ClientDisconnect out of the app (a 500, and a
    # traceback in the server's log).
    namespace: dict[str, Any] = {"__name__": "docs_http_example"}
    exec(docs_example("app = Starlette("), namespace)
    parts: list[Message] = [
        {"type": "http.request", "body": b'{"quest', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return parts.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", b"100")]
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/chat",
        "raw_path": b"/chat",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "http_version": "1.1",
        "scheme": "http",
        "server": ("t", 80),
        "client": ("c", 1),
    }
    await namespace["app"](scope, receive, send)  # raised ClientDisconnect
    assert sent[0]["status"] == 400
    assert orjson.loads(sent[1]["body"])["code"] == "invalid_request"


async def test_the_router_served_as_the_app_answers_routing_errors_in_json() -> None:
    # Regression: with no Starlette app around it, its unknown paths and wrong methods were
    # Starlette's plain text ("Not Found"), not {code, message}.
    router = StreamRouter(MemoryTransport(), authorize=allow_all)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(router), base_url="http://t") as c:
        missing = await c.get("/a-stream/nope")
        wrong = await c.put("/a-stream")
    assert_error(missing, 404, "not_found")
    assert_error(wrong, 405, "method_not_allowed")
