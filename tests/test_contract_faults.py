"""Transport contract under storage faults: contiguity, rollback, restarts (issues 8, 9).

Runs against every transport, like tests/test_contract.py. A *rollback* is what a failover
to a replica that had not caught up does: the storage ends before entries it acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from resumable_stream import (
    Event,
    OffsetExpired,
    StorageRollback,
    StreamConsumer,
    StreamNotFound,
    StreamProducer,
    Transport,
    _producer,
)
from resumable_stream._codec import decode_entry, encode_entry, format_offset
from resumable_stream.transports import Entry
from resumable_stream.transports.memory import MemoryTransport
from resumable_stream.transports.redis import RedisTransport
from tests._helpers import collect, eventually, holds, joined, text_of, tokens

LoseTail = Callable[[Transport, str, int], Awaitable[None]]


@pytest.fixture
def lose_tail(transport_kind: str, request: pytest.FixtureRequest) -> LoseTail:
    """``lose_tail(transport, stream_id, keep)``: the storage forgets entries past ``keep``."""
    if transport_kind == "memory":

        async def lose_in_memory(transport: Transport, stream_id: str, keep: int) -> None:
            assert isinstance(transport, MemoryTransport)
            stream = transport._streams[stream_id]
            del stream.payloads[keep - stream.first_seq + 1 :]
            stream.last_count = len(decode_entry(stream.payloads[-1], 1, 1))

        return lose_in_memory

    async def lose_in_redis(transport: Transport, stream_id: str, keep: int) -> None:
        assert isinstance(transport, RedisTransport)
        # The transport's key layout (docs/retention.md): metadata hash + Redis Stream, on
        # whatever topology the transport uses (its own client: one node, the Sentinel
        # master or the cluster). The producer is held meanwhile, so plain commands will do.
        events = transport._key(stream_id, "events")
        meta = transport._key(stream_id, "meta")
        client = transport.client
        kept = [
            (entry_id, fields)
            for entry_id, fields in await client.xrange(events)
            if int(entry_id.split(b"-")[1]) <= keep
        ]
        ttl = await client.pttl(events)
        # Rebuilt rather than XDEL'd: a replica that never got the entries has a lower
        # last id too, so the producer can add them again.
        await client.delete(events)
        for entry_id, fields in kept:
            await client.xadd(events, fields, id=entry_id)
        await client.pexpire(events, ttl)
        count = len(decode_entry(kept[-1][1][b"e"], 1, 1))
        await client.hset(meta, mapping={"last": keep, "count": count})

    return lose_in_redis


def token_entry(epoch: int, seq: int, text: str) -> Entry:
    return Entry(
        epoch, seq, encode_entry([("token", {"text": text, "message_id": None, "node": None})])
    )


async def test_an_append_past_the_end_raises_storage_rollback_and_writes_nothing(
    transport: Transport,
) -> None:
    info = await transport.create("contiguous", owner="me", lease_ms=5000)
    await transport.append("contiguous", "me", token_entry(info.epoch, 1, "a"), 1)
    with pytest.raises(StorageRollback) as caught:
        await transport.append("contiguous", "me", token_entry(info.epoch, 3, "c"), 1)
    assert caught.value.last_seq == 1
    after = await transport.info("contiguous")
    assert after is not None and after.last_seq == 1
    assert [e.seq for e in await transport.read("contiguous", info.epoch, 0, 10)] == [1]
    await transport.append("contiguous", "me", token_entry(info.epoch, 2, "b"), 1)
    assert [e.seq for e in await transport.read("contiguous", info.epoch, 0, 10)] == [1, 2]


async def half_written(transport: Transport, **options: int) -> tuple[asyncio.Event, int]:
    """A run of 20 one-token entries, paused after 10 of them: (gate, epoch)."""
    gate = asyncio.Event()
    run = await StreamProducer(transport, max_buffer=1, **options).start(
        tokens(20, every=1, pause=gate), stream_id="rolled"
    )

    async def ten_written() -> bool:
        info = await transport.info("rolled")
        return info is not None and info.last_seq == 10

    await eventually(ten_written)
    return gate, run.epoch


async def test_entries_lost_by_the_storage_are_written_again(
    transport: Transport, lose_tail: LoseTail
) -> None:
    gate, _ = await half_written(transport)
    live = StreamConsumer(transport, "rolled")
    seen = [await anext(live) for _ in range(10)]  # entries 1-10, read before the loss
    await lose_tail(transport, "rolled", 7)
    gate.set()
    seen += [event async for event in live]
    assert joined(seen) == text_of(20) and seen[-1].type == "end"
    assert len({e.offset for e in seen}) == len(seen)  # no duplicate
    assert await collect(transport, "rolled") == seen  # and the storage holds the same


async def test_a_reader_resuming_in_a_lost_tail_waits_for_it_to_be_written_again(
    transport: Transport, lose_tail: LoseTail
) -> None:
    # Regression (issue 8): a client that received entries 1-10 reconnects after the
    # storage lost 8-10 but before the producer wrote them again; it used to get
    # InvalidOffset ("past the end", HTTP 400) for an offset the stream had issued.
    gate, _ = await half_written(transport)
    seen = await collect_first(transport, 10)
    await lose_tail(transport, "rolled", 7)
    resumed = StreamConsumer(transport, "rolled", after=seen[-1].offset)
    first = asyncio.ensure_future(anext(resumed))
    gate.set()
    rest = [await first] + [event async for event in resumed]
    assert joined(seen + rest) == text_of(20) and rest[-1].type == "end"
    assert await collect(transport, "rolled") == seen + rest  # no duplicate, no gap


async def collect_first(transport: Transport, count: int) -> list[Event]:
    async with StreamConsumer(transport, "rolled") as reader:
        return [await anext(reader) for _ in range(count)]


async def test_a_rollback_beyond_the_window_ends_with_storage_rollback(
    transport: Transport, lose_tail: LoseTail
) -> None:
    gate, epoch = await half_written(transport, rollback_window=2)
    live = StreamConsumer(transport, "rolled")
    seen = [await anext(live) for _ in range(10)]
    await lose_tail(transport, "rolled", 7)  # entries 8-10 lost, the window holds 9-10
    gate.set()

    async def ended() -> bool:
        info = await transport.info("rolled")
        return info is not None and info.status == "error"

    await eventually(ended)
    fresh = await collect(transport, "rolled")
    assert joined(fresh) == text_of(7)
    assert fresh[-1].type == "error" and fresh[-1].data["error"] == "storage_rollback"
    assert fresh[-1].offset == format_offset(epoch, 8, 0)
    # Readers that had received lost events can tell: OffsetExpired, never a silent end,
    # a duplicate or an error at an offset they already hold.
    with pytest.raises(OffsetExpired, match="rolled back"):
        await anext(live)
    for received in seen[7:]:
        with pytest.raises(OffsetExpired, match="rolled back"):
            await collect(transport, "rolled", after=received.offset)
    rest = await collect(transport, "rolled", after=seen[6].offset)
    assert rest == fresh[7:]


@pytest.mark.parametrize(("window_bytes", "rewritten"), [(24, True), (16, False)])
async def test_the_window_keeps_no_more_bytes_than_its_bound(
    transport: Transport,
    lose_tail: LoseTail,
    monkeypatch: pytest.MonkeyPatch,
    window_bytes: int,
    rewritten: bool,
) -> None:
    # Entries 8-10 hold 8 bytes each (`["t7 "]`): 24 bytes keep all three, 16 only 9-10,
    # whatever number of entries the window may keep.
    monkeypatch.setattr(_producer, "ROLLBACK_WINDOW_BYTES", window_bytes)
    gate, epoch = await half_written(transport, rollback_window=100)
    await lose_tail(transport, "rolled", 7)
    gate.set()

    async def ended() -> bool:
        info = await transport.info("rolled")
        return info is not None and info.status != "running"

    await eventually(ended)
    events = await collect(transport, "rolled")
    if rewritten:
        assert joined(events) == text_of(20) and events[-1].type == "end"
    else:
        assert joined(events) == text_of(7)
        assert events[-1].data["error"] == "storage_rollback"
        assert events[-1].offset == format_offset(epoch, 8, 0)


async def test_a_reader_waiting_past_the_end_learns_at_once_that_the_run_ended_below_it(
    transport: Transport, lose_tail: LoseTail
) -> None:
    # Regression: a reader resuming after a lost offset waits for the run to get there; the
    # run's storage_rollback, written below its position, came to it as a repeat it
    # skipped, and it waited half a lease (30 s here) before it looked. The HTTP response
    # had sent its 200 by then, and was cut instead of answering 410.
    gate, _ = await half_written(transport, rollback_window=2, lease=60)
    seen = await collect_first(transport, 10)
    await lose_tail(transport, "rolled", 7)
    resumed = StreamConsumer(transport, "rolled", after=seen[-1].offset)
    first = asyncio.ensure_future(anext(resumed))
    await eventually(holds(lambda: resumed._subscription is not None))  # waiting, live
    gate.set()
    async with asyncio.timeout(5):
        with pytest.raises(OffsetExpired, match="rolled back"):
            await first


async def test_a_redis_restart_mid_stream_loses_and_repeats_nothing(
    redis_server_factory: Callable[..., object],
) -> None:
    server = redis_server_factory(extra_args=("--appendonly", "yes", "--appendfsync", "always"))
    async with RedisTransport.from_url(server.url) as transport:  # type: ignore[attr-defined]
        gate = asyncio.Event()
        run = await StreamProducer(transport).start(tokens(2000, every=10, pause=gate))
        reader = StreamConsumer(transport, run.stream_id)
        seen: list[Event] = [await anext(reader) for _ in range(500)]
        await asyncio.to_thread(server.restart)  # type: ignore[attr-defined]
        gate.set()
        seen += [event async for event in reader]
        assert await run.wait() == "completed"
        assert joined(seen) == text_of(2000) and seen[-1].type == "end"
        assert len({e.offset for e in seen}) == len(seen)
        assert await collect(transport, run.stream_id) == seen


async def test_a_redis_restart_without_persistence_is_written_again_or_told(
    redis_server_factory: Callable[..., object],
) -> None:
    """A restart with no persistence loses every key. A live run is written again from
    its producer's recent window (same epoch: offsets readers hold stay valid), and the
    readers get every event once; a finished run is gone (`StreamNotFound`), and an offset
    of it never reads a later run of the same id as if it went on (`OffsetExpired`)."""
    server = redis_server_factory(extra_args=("--save", "", "--appendonly", "no"))
    async with (
        RedisTransport.from_url(server.url) as writer,  # type: ignore[attr-defined]
        RedisTransport.from_url(server.url) as other,  # type: ignore[attr-defined]
    ):
        gate = asyncio.Event()
        run = await StreamProducer(writer).start(tokens(200, every=10, pause=gate), stream_id="s")
        here, there = StreamConsumer(writer, "s"), StreamConsumer(other, "s")
        seen_here = [await anext(here) for _ in range(50)]
        seen_there = [await anext(there) for _ in range(50)]
        await asyncio.to_thread(server.restart)  # type: ignore[attr-defined]
        gate.set()
        seen_here += [event async for event in here]
        seen_there += [event async for event in there]
        assert await run.wait() == "completed"
        for seen in (seen_here, seen_there):
            assert joined(seen) == text_of(200) and seen[-1].type == "end"
        assert await collect(other, "s", after=seen_there[9].offset) == seen_there[10:]
        await asyncio.to_thread(server.restart)  # type: ignore[attr-defined]
        with pytest.raises(StreamNotFound):
            await collect(other, "s", after=seen_there[9].offset)
        again = await StreamProducer(writer).start(tokens(3), stream_id="s")
        assert await again.wait() == "completed"
        with pytest.raises(OffsetExpired, match="another run"):
            await collect(other, "s", after=seen_there[9].offset)
