"""The Redis transport's own behaviour on a real redis-server: the APPEND script's
contiguity, error classification, the connection layer and live notices."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from resumable_stream import StorageRollback
from resumable_stream.transports import Entry
from resumable_stream.transports.redis import RedisTransport


@pytest.fixture
async def transport(redis_url: str) -> AsyncIterator[RedisTransport]:
    async with RedisTransport.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}") as made:
        yield made


async def test_append_past_last_plus_one_writes_nothing_and_reports_the_last_seq(
    transport: RedisTransport,
) -> None:
    info = await transport.create("s", owner="o", lease_ms=5000)
    await transport.append("s", "o", Entry(info.epoch, 1, b"[1]"), 1)
    await transport.append("s", "o", Entry(info.epoch, 2, b"[2]"), 1)
    await transport.append("s", "o", Entry(info.epoch, 2, b"[2]"), 1)  # a retry: no-op
    with pytest.raises(StorageRollback) as caught:
        await transport.append("s", "o", Entry(info.epoch, 4, b"[4]"), 1)
    assert (caught.value.stream_id, caught.value.last_seq) == ("s", 2)
    assert [e.seq for e in await transport.read("s", info.epoch, 0, 10)] == [1, 2]
    stored = await transport.info("s")
    assert stored is not None and stored.last_seq == 2
    await transport.append("s", "o", Entry(info.epoch, 3, b"[3]"), 1)  # re-append the hole
    assert [e.seq for e in await transport.read("s", info.epoch, 0, 10)] == [1, 2, 3]
