"""Live notices over sharded pub/sub: readers that leave and come back keep getting them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from resumable_stream import StreamConsumer, StreamProducer, from_url
from resumable_stream.transports import Entry, QueueSubscription, Subscription
from resumable_stream.transports.redis import RedisTransport
from tests._helpers import eventually, holds


@pytest.fixture
async def redis_transport(redis_url: str) -> AsyncIterator[RedisTransport]:
    transport = from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}")
    assert isinstance(transport, RedisTransport)
    async with transport:
        yield transport


async def test_a_reader_that_comes_back_at_once_still_gets_live_events(
    redis_transport: RedisTransport, redis_url: str
) -> None:
    """The last reader of a stream leaves (its channel is unsubscribed) and a new one
    follows the stream before Redis confirmed the unsubscription. That confirmation must
    not be taken for Redis dropping the channel (a slot moved): the transport then forgot
    the channel while Redis kept it subscribed, and went on receiving the stream's notices
    after its last reader left (issue 11's churn plan, where a quarter of the readers
    resume)."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def source() -> AsyncIterator[str]:
        while (item := await queue.get()) is not None:
            yield item

    # A long lease: a quiet check cannot rescue a reader within the test's deadline.
    producer = StreamProducer(redis_transport, lease=120.0)
    run = await producer.start(source(), stream_id="s")
    seq = 0
    for round_ in range(10):
        subscription = redis_transport.subscribe("s", run.epoch, seq)
        await queue.put(f"t{round_} ")
        seq = (await _next_entries(subscription))[-1].seq
        subscription.close()  # the stream's channel is left...
        for _ in range(round_ % 3):
            await asyncio.sleep(0)  # ...and its SUNSUBSCRIBE sent (or not yet)
    await queue.put(None)
    assert await run.wait() == "completed"
    # Nobody follows the stream any more: Redis has no subscriber left for its notices.
    channel = f"{redis_transport.prefix}:{{s}}:n"
    client = aioredis.Redis.from_url(redis_url)
    try:

        async def unsubscribed() -> bool:
            reply = await client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
            return int(reply[1]) == 0

        await eventually(unsubscribed)
    finally:
        await client.aclose()


async def _next_entries(subscription: Subscription) -> list[Entry]:
    async with asyncio.timeout(10):
        while not (entries := await subscription.get(max_wait=1.0)):
            pass
    return entries


@pytest.mark.parametrize("where", ["the writing process", "another process"])
async def test_a_reader_resuming_past_the_end_does_not_hold_back_the_others(
    redis_transport: RedisTransport, redis_url: str, where: str
) -> None:
    """Regression: a reader resuming after an offset past the end of a running stream (a
    bogus or future Last-Event-ID) started the process's shared feed of the stream at its
    offset, and every other reader of the stream in that process then got live entries
    only from its quiet-stream check (every lease / 2)."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def source() -> AsyncIterator[str]:
        while (item := await queue.get()) is not None:
            yield item

    readers = redis_transport
    if where == "another process":
        readers = from_url(redis_url, prefix=redis_transport.prefix)
    # A long lease: a quiet check cannot rescue a reader within the test's deadline.
    producer = StreamProducer(redis_transport, lease=120.0)
    run = await producer.start(source(), stream_id="s")
    try:
        await queue.put("a ")
        first = StreamConsumer(readers, "s")
        assert (await asyncio.wait_for(anext(first), 10)).data["text"] == "a "
        await first.aclose()
        ahead = f"{run.epoch}-{1000:010d}-00000"  # the stream holds one entry
        bogus = StreamConsumer(readers, "s", after=ahead)
        waiting = asyncio.ensure_future(anext(bogus))
        channel = readers._stream("s")[2]
        await eventually(holds(lambda: channel in readers._feeds))  # its feed is made
        reader = StreamConsumer(readers, "s", after=first.last_offset)
        next_event = asyncio.ensure_future(anext(reader))

        def waiting_live() -> bool:
            subscription = reader._subscription
            return isinstance(subscription, QueueSubscription) and subscription._waiter is not None

        await eventually(holds(waiting_live))  # caught up, and waiting on the live feed
        await queue.put("b ")
        assert (await asyncio.wait_for(next_event, 10)).data["text"] == "b "
        waiting.cancel()
        await bogus.aclose()
        await reader.aclose()
    finally:
        await queue.put(None)
        await run.wait()
        if readers is not redis_transport:
            await readers.aclose()
