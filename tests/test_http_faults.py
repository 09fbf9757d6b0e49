"""Faults users meet at the HTTP edge, against a real uvicorn server.

A client dropped again and again in one stream, at any byte, still reads it byte for byte;
fuzzed requests (from the router's OpenAPI schema with schemathesis, and hypothesis-driven
requests to the mounted router) never get a 5xx, and every 4xx carries ``{code, message}``.
The fuzzing is bounded in examples and derandomized: it runs in CI on two cores.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette
from starlette.routing import Mount

from resumable_stream import StreamConsumer, StreamProducer
from resumable_stream.fastapi import StreamAPIRouter
from resumable_stream.starlette import StreamRouter, allow_all
from resumable_stream.transports.memory import MemoryTransport
from tests._services import uvicorn_server
from tests.test_http_starlette import eventually, paced_tokens, serve, start

# --- a client dropped many times in one stream ---------------------------------------------


def complete_events(raw: bytes) -> list[bytes]:
    """The complete SSE blocks of one response, as a client keeps them: a block cut
    short by the drop is discarded; the ``retry:`` line and comments are not events."""
    *blocks, _partial = raw.split(b"\n\n")
    events = []
    for block in blocks:
        lines = [
            line
            for line in block.split(b"\n")
            if not line.startswith(b":") and not line.startswith(b"retry:")
        ]
        assert lines[0].startswith(b"id: "), block
        events.append(b"\n".join(lines) + b"\n\n")
    return events


async def read_with_drops(
    client: httpx.AsyncClient, url: str, cuts: random.Random
) -> tuple[list[bytes], int]:
    """Read ``url`` to its terminal event, dropping the connection after a random number
    of bytes each time (mid-event as often as not) and resuming with ``Last-Event-ID``."""
    events: list[bytes] = []
    drops = 0
    while not (events and events[-1].split(b"\n")[1] in {b"event: end", b"event: error"}):
        headers = {"accept": "text/event-stream"}
        if events:
            headers["last-event-id"] = events[-1].split(b"\n")[0][4:].decode()
        cut = cuts.randint(1, 1200)
        raw = b""
        async with client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            async for chunk in response.aiter_raw():
                raw += chunk
                if len(raw) >= cut:
                    raw = raw[:cut]
                    drops += 1
                    break  # leaving the block closes the connection: the client is gone
        events += complete_events(raw)
    return events, drops


async def test_a_client_dropped_a_hundred_times_reads_the_stream_byte_identical() -> None:
    with serve() as server:
        async with server.client() as client:
            url = await start(client, tokens=3000, delay=0.0005)
            dropped, drops = await read_with_drops(client, url, random.Random(9))
            async with client.stream("GET", url) as response:  # now stored: all of it
                whole = complete_events(await response.aread())

            def released() -> bool:
                return server.router.connections == 0

            await eventually(released)

    assert drops >= 100
    assert len(whole) == 3001
    assert b"".join(dropped) == b"".join(whole)


# --- fuzzing the FastAPI router from its OpenAPI schema ---------------------------------------


@dataclass
class Streams:
    """The streams the fuzzed app holds, and offsets of theirs (valid, trimmed, old)."""

    ids: list[str] = field(default_factory=list)
    offsets: list[str] = field(default_factory=list)


async def _offsets(transport: MemoryTransport, stream_id: str, after: str | None) -> list[str]:
    async with StreamConsumer(transport, stream_id, after=after) as consumer:
        return [event.offset async for event in consumer]


@contextlib.asynccontextmanager
async def populated(transport: MemoryTransport, streams: Streams) -> AsyncIterator[None]:
    """Finished streams of every kind: whole, trimmed, restarted, cancelled."""
    async with transport, StreamProducer(transport) as producer:
        whole = await producer.start(paced_tokens(20, 0), stream_id="whole")
        # One entry per token: 120 entries, of which the transport keeps the last 50.
        trimmed = await StreamProducer(transport, max_buffer=1).start(
            paced_tokens(120, 0), stream_id="trimmed"
        )
        first = await producer.start(paced_tokens(5, 0), stream_id="restarted")
        await first.wait()
        old = await _offsets(transport, "restarted", None)
        restarted = await producer.start(paced_tokens(5, 0), stream_id="restarted")
        cancelled = await producer.start(paced_tokens(3, 0, hold=True), stream_id="cancelled")
        async with StreamConsumer(transport, "cancelled") as consumer:
            await anext(consumer)  # running, with a first event
        await cancelled.cancel()
        for run in (whole, trimmed, restarted, cancelled):
            await run.wait()
        streams.ids += ["whole", "trimmed", "restarted", "cancelled"]
        streams.offsets += old
        for stream_id in ("whole", "restarted", "cancelled"):
            streams.offsets += await _offsets(transport, stream_id, None)
        # Offsets of entries that were trimmed away: 410.
        last = (await _offsets(transport, "trimmed", f"{trimmed.epoch}-119-0"))[-1]
        streams.offsets += [f"{trimmed.epoch}-{seq}-0" for seq in (1, 2, 60)] + [last]
        yield


def fuzzed_app(streams: Streams) -> FastAPI:
    transport = MemoryTransport(max_entries=50)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with populated(transport, streams):
            yield

    app = FastAPI(lifespan=lifespan)
    router = StreamRouter(transport, authorize=allow_all, ping_interval=None)
    app.include_router(StreamAPIRouter(router), prefix="/streams")
    return app


def assert_no_5xx_and_json_4xx(response: Any, method: str = "GET") -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    if 400 <= response.status_code < 500:
        content_type = response.headers["content-type"]  # schemathesis: a list of values
        assert content_type in ("application/json", ["application/json"]), response.headers
        if method == "HEAD":
            return  # the headers of the JSON error, without its body
        body = response.json()
        assert set(body) == {"code", "message"}, body
        assert isinstance(body["code"], str) and body["code"]
        assert isinstance(body["message"], str) and body["message"]


def mutated(offset: str) -> st.SearchStrategy[str]:
    """An offset as a client could garble it: a field bumped, cut or padded."""
    parts = offset.split("-")
    return st.one_of(
        st.just(offset),
        st.tuples(st.integers(0, 2), st.integers(-2, 3)).map(
            lambda change: "-".join(
                str(max(0, int(p) + change[1])) if i == change[0] else p
                for i, p in enumerate(parts)
            )
        ),
        st.just(offset[:-1]),
        st.just(offset + "0"),
        st.just("0" + offset),
    )


# Schema-valid is not always acceptable: a well-formed offset may be past the end (400) or
# expired (410), which the schema cannot express; so no positive_data_acceptance check.
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def fuzz_operation(operation: Any, url: str, streams: Streams) -> None:
    """Schemathesis' cases for one operation; half of them aimed at a stream that exists,
    with one of its offsets (as is or mutated), or sent with another method."""
    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    is_read = operation.method.upper() == "GET" and operation.path == "/streams/{stream_id}"

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        case=cases,
        stream_id=st.none() | st.sampled_from(streams.ids),
        offset=st.none() | st.sampled_from(streams.offsets).flatmap(mutated),
        where=st.sampled_from(["query", "header", "both"]),
        method=st.none() | st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]),
    )
    def fuzz(
        case: Any, stream_id: str | None, offset: str | None, where: str, method: str | None
    ) -> None:
        if method is not None:  # maybe one the path does not allow: 405
            case.method = method
        if stream_id is not None and case.path_parameters is not None:
            case.path_parameters["stream_id"] = stream_id
        if offset is not None and is_read:
            if where in ("query", "both"):
                case.query = {**(case.query or {}), "after": offset}
            if where in ("header", "both"):
                case.headers = {**(case.headers or {}), "Last-Event-ID": offset}
        response = case.call(base_url=url, timeout=10)
        assert_no_5xx_and_json_4xx(response)
        if stream_id is None and offset is None and method is None:  # as schemathesis made it
            case.validate_response(response, checks=CHECKS)

    fuzz()


def test_fuzzed_fastapi_router_never_answers_5xx_and_every_4xx_is_code_and_message() -> None:
    streams = Streams()
    app = fuzzed_app(streams)
    schema = schemathesis.openapi.from_dict(app.openapi())
    with uvicorn_server(app, graceful_timeout=2) as url:
        assert streams.ids  # the lifespan populated them
        for result in schema.get_all_operations():
            fuzz_operation(result.ok(), url, streams)


# --- fuzzing the mounted router with raw requests ---------------------------------------------

SEGMENT = st.one_of(
    st.sampled_from(["whole", "trimmed", "restarted", "cancelled", "status", "cancel", ""]),
    st.text(min_size=1, max_size=30).map(lambda text: quote(text, safe="")),
    st.binary(min_size=1, max_size=10).map(lambda raw: quote(raw, safe="")),
).filter(
    # httpx resolves dot segments, and Starlette's Mount never matches a path holding a
    # line feed (its pattern's "." stops there): the app answers those, not the router.
    lambda segment: segment not in {".", ".."} and "%0A" not in segment
)


def test_fuzzed_mounted_router_never_answers_5xx_and_every_4xx_is_code_and_message() -> None:
    streams = Streams()
    transport = MemoryTransport(max_entries=50)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with populated(transport, streams):
            yield

    router = StreamRouter(transport, authorize=allow_all, ping_interval=None)
    app = Starlette(routes=[Mount("/streams", router)], lifespan=lifespan)
    with uvicorn_server(app, graceful_timeout=2) as url, httpx.Client(base_url=url) as client:
        offsets = st.sampled_from(streams.offsets).flatmap(mutated)
        headers = st.fixed_dictionaries(
            {},
            optional={
                "accept": st.sampled_from(
                    ["text/event-stream", "application/x-ndjson", "*/*", "text/html", "a;q=x"]
                ),
                # What a client can send in a header: visible ASCII.
                "last-event-id": offsets
                | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30),
            },
        )

        @settings(
            max_examples=150,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
            segments=st.lists(SEGMENT, min_size=0, max_size=3),
            after=st.none() | offsets | st.text(max_size=30),
            headers=headers,
        )
        def fuzz(method: str, segments: list[str], after: str | None, headers: Any) -> None:
            params = {} if after is None else {"after": after}
            path = "/streams/" + "/".join(segments)
            response = client.request(method, path, params=params, headers=headers, timeout=10)
            note(f"{method} {response.request.url} {headers} -> {response.status_code}")
            assert_no_5xx_and_json_4xx(response, method)

        fuzz()
