"""Producer edge cases, pinned by regression tests."""

from __future__ import annotations

import asyncio
import gc

import pytest

from resumable_stream import LeaseLost, StreamConsumer, StreamProducer, Transport
from resumable_stream.transports import Entry, Status
from resumable_stream.transports.memory import MemoryTransport
from tests._helpers import collect, joined, text_of, tokens


class LateHeartbeat(MemoryTransport):
    """Holds the final write until a heartbeat has bounced off the finished stream."""

    def __init__(self) -> None:
        super().__init__()
        self.bounced = asyncio.Event()

    async def renew(self, stream_id: str, owner: str, lease_ms: int) -> bool:
        try:
            return await super().renew(stream_id, owner, lease_ms)
        except LeaseLost:
            self.bounced.set()
            raise

    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        await super().append(stream_id, owner, entry, count, final)
        if final is not None:
            await self.bounced.wait()


async def test_heartbeat_racing_the_final_write_does_not_fail_the_run() -> None:
    transport = LateHeartbeat()
    run = await StreamProducer(transport, lease=0.3).start(tokens(10))
    assert await run.wait() == "completed"


async def test_backpressure_bounds_the_buffer() -> None:
    transport = MemoryTransport()
    run = await StreamProducer(transport, max_buffer=4).start(tokens(1000, every=1000))
    assert joined(await collect(transport, run.stream_id)) == text_of(1000)
    info = await transport.info(run.stream_id)
    assert info is not None and info.last_seq >= 1000 // 4


async def test_source_terminal_event_ends_the_run(transport: Transport) -> None:
    async def relay():  # e.g. a worker relaying another stream's events
        yield "partial "
        yield {"type": "error", "data": {"error": "upstream", "message": "gone"}}
        yield "never written"

    run = await StreamProducer(transport).start(relay())
    events = await collect(transport, run.stream_id)
    assert [e.type for e in events] == ["token", "error"]
    assert await run.wait() == "error"


async def test_start_refuses_a_non_async_source() -> None:
    with pytest.raises(TypeError, match="async iterable"):
        await StreamProducer(MemoryTransport()).start(["a", "b"])  # type: ignore[arg-type]


async def test_consumers_dropped_or_broken_release_their_subscription() -> None:
    transport = MemoryTransport()
    gate = asyncio.Event()
    run = await StreamProducer(transport).start(tokens(10, pause=gate))
    consumer = StreamConsumer(transport, run.stream_id)
    await anext(consumer)
    await anext(consumer)  # now subscribed live
    stream = transport._streams[run.stream_id]
    assert len(stream.subscribers) == 1
    del consumer
    gc.collect()
    assert stream.subscribers == set()
    reader = StreamConsumer(transport, run.stream_id)
    gate.set()
    async for event in reader:
        if event.terminal:
            break
    assert stream.subscribers == set()


async def test_malformed_chat_model_events_are_skipped_not_fatal() -> None:
    async def events():  # shapes a hand-written source might produce
        yield {"event": "on_chat_model_stream", "data": {}}
        yield {"event": "on_chat_model_stream"}
        yield {"event": "on_chat_model_stream", "data": {"chunk": None}}
        yield "ok"

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(events())
    assert [e.type for e in await collect(transport, run.stream_id)] == ["token", "end"]


async def test_an_event_json_cannot_hold_ends_the_run_with_an_error(transport: Transport) -> None:
    # Regression: the writer died on the encoding error and the run hung, never ending.
    async def tool_output():
        yield "before "
        yield {"type": "tool_end", "data": {"output": {"id": 2**70}}}
        yield "never stored"

    run = await StreamProducer(transport).start(tool_output())
    events = await asyncio.wait_for(collect(transport, run.stream_id), timeout=5)
    assert events[-1].type == "error"
    assert events[-1].data["error"] == "TypeError"
    assert "never stored" not in joined(events)
    assert await run.wait() == "error"
