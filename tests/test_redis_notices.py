"""Live notices over sharded pub/sub: readers that leave and come back keep getting them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from resumable_stream import StreamProducer, from_url
from resumable_stream.transports import Entry, Subscription
from resumable_stream.transports.redis import RedisTransport
from tests._helpers import eventually


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
