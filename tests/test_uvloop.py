"""The library on uvloop, the loop `uvicorn[standard]` runs: the Redis transport takes
over its sockets' protocols (plain TCP, TLS, unix socket), which is loop-specific."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import uvloop

from resumable_stream import StreamConsumer, StreamProducer, from_url
from tests.conftest import TlsRedis


async def _tokens(count: int) -> AsyncIterator[str]:
    for i in range(count):
        yield f"t{i} "
        await asyncio.sleep(0)


async def _round_trip(url: str) -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    async with from_url(url, prefix=f"t{uuid.uuid4().hex[:12]}") as transport:
        producer = StreamProducer(transport)
        run = await producer.start(_tokens(500), stream_id="s")
        async with StreamConsumer(transport, "s") as consumer:
            events = [event async for event in consumer]  # live
        assert await run.wait() == "completed"
        assert [e.data["text"] for e in events[:-1]] == [f"t{i} " for i in range(500)]
        assert events[-1].type == "end"
        # A reader that resumes half-way gets the rest, from storage.
        async with StreamConsumer(transport, "s", after=events[249].offset) as consumer:
            rest = [event async for event in consumer]
        assert rest == events[250:]


def _on_uvloop(url: str) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_round_trip(url))


def test_redis_round_trip_on_uvloop(redis_url: str) -> None:
    _on_uvloop(redis_url)


def test_tls_and_unix_socket_on_uvloop(redis_tls: TlsRedis, redis_unix_url: str) -> None:
    _on_uvloop(redis_tls.url)
    _on_uvloop(redis_unix_url)
