"""A finished run and a finished stream response leave no reference cycles.

Cyclic garbage waits for the garbage collector, and what it holds (a run's rollback window,
its tasks, a response's buffers) is walked by every full collection until then: with many
streams starting and ending, those collections took tens of milliseconds each and set the
p99 latency (issue 11).
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from resumable_stream import StreamConsumer, StreamProducer
from resumable_stream._asgi import StreamEngine
from resumable_stream._http import SSE
from resumable_stream.transports import Entry, Transport, from_url
from resumable_stream.transports.memory import MemoryTransport


@pytest.fixture(params=["memory", "redis"])
async def any_transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    transport: Transport
    if request.param == "memory":
        transport = MemoryTransport()
    else:
        url = request.getfixturevalue("redis_url")
        transport = from_url(url, prefix=f"t{uuid.uuid4().hex[:12]}")
    async with transport:
        yield transport


@pytest.fixture
def collector() -> Iterator[list[Any]]:
    """The objects that only a garbage collection would free, found after the test body."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    found: list[Any] = []
    try:
        yield found
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _ours(garbage: list[Any]) -> list[str]:
    """The garbage made by the library: its objects, and frames of its code."""
    names = []
    for obj in garbage:
        module = type(obj).__module__ or ""
        if module.startswith("resumable_stream"):
            names.append(type(obj).__qualname__)
        elif type(obj).__name__ == "frame" and "resumable_stream" in obj.f_code.co_filename:
            names.append(f"frame {obj.f_code.co_name}")
    return names


async def _tokens(count: int) -> AsyncIterator[str]:
    for i in range(count):
        yield f"t{i} "
        await asyncio.sleep(0)


def _collect(found: list[Any]) -> list[str]:
    gc.collect()
    found.extend(gc.garbage)
    return _ours(found)


async def test_a_finished_run_and_its_reader_leave_no_cycles(
    any_transport: Transport, collector: list[Any]
) -> None:
    producer = StreamProducer(any_transport)
    run = await producer.start(_tokens(300), stream_id="s")
    async with StreamConsumer(any_transport, "s") as consumer:
        events = [event async for event in consumer]
    assert await run.wait() == "completed"
    assert len(events) == 301
    del run
    assert _collect(collector) == []


async def test_a_finished_stream_response_leaves_no_cycles(
    any_transport: Transport, collector: list[Any]
) -> None:
    producer = StreamProducer(any_transport)
    run = await producer.start(_tokens(300), stream_id="s")
    sent: list[dict[str, Any]] = []
    idle = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await idle.wait()  # the client never leaves
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    engine = StreamEngine(
        StreamConsumer(any_transport, "s"),
        SSE,
        event_stream_client=True,
        retry=None,
        ping_interval=15.0,
        send_timeout=30.0,
    )
    await engine({"type": "http", "method": "GET"}, receive, send)
    await run.wait()
    body = b"".join(m.get("body", b"") for m in sent)
    assert body.count(b"event: token") == 300 and b"event: end" in body
    del engine, run
    assert _collect(collector) == []


async def test_the_memory_transport_stores_entries_as_objects_the_collector_skips() -> None:
    # Regression (issue 11): an Entry object per stored entry grew the young generation
    # by one tracked object per token, three times as many young collections as Redis
    # (and its in-process readers' p99 doubled). A stored entry is bytes now.
    transport = MemoryTransport()
    info = await transport.create("s", "owner", 30_000)
    gc.collect()
    tracked = len(gc.get_objects())
    for seq in range(1, 2001):
        await transport.append("s", "owner", Entry(info.epoch, seq, b'["t"]'), 1)
    gc.collect()
    assert len(gc.get_objects()) - tracked < 50
    # Read back whole, in order, from any offset.
    stored = await transport.read("s", info.epoch, 1990, 100)
    assert [(e.epoch, e.seq, e.payload) for e in stored] == [
        (info.epoch, seq, b'["t"]') for seq in range(1991, 2001)
    ]
    subscription = transport.subscribe("s", info.epoch, 1998)
    assert [e.seq for e in await subscription.get(max_wait=1.0)] == [1999, 2000]
    subscription.close()
