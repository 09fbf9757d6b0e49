"""Redis-only behaviour, against a real redis-server and real processes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import subprocess
import sys
import time
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from resumable_stream import (
    LeaseLost,
    OffsetExpired,
    ResumableStreamError,
    StreamAlreadyRunning,
    StreamConsumer,
    StreamProducer,
    TransportClosed,
    TransportError,
    from_url,
)
from resumable_stream._codec import encode_entry
from resumable_stream._events import TOKEN
from resumable_stream.transports import Entry, Status
from resumable_stream.transports._redis_pipe import pack
from resumable_stream.transports.redis import _APPEND, RedisTransport, _CancelWaiter
from tests._helpers import collect, eventually, joined, text_of, tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def transport(redis_url: str, prefix: str) -> AsyncIterator[RedisTransport]:
    async with RedisTransport.from_url(redis_url, prefix=prefix) as created:
        yield created


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


class ProducerProcess:
    def __init__(self, redis_url: str, prefix: str, stream_id: str, lease: float) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests._producer_process",
                redis_url,
                prefix,
                stream_id,
                str(lease),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if line != "started":
            self.process.kill()
            raise AssertionError(f"producer process did not start: {line!r}")

    def finish(self) -> str:
        try:
            out, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGUSR2)
            self.process.send_signal(signal.SIGUSR1)
            try:
                out, err = self.process.communicate(timeout=2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                out, err = self.process.communicate()
            raise AssertionError(f"producer process hung; output {out!r}, stacks:\n{err}") from None
        return out.strip()


@pytest.fixture
def producer_process(redis_url: str, prefix: str) -> Iterator[type[ProducerProcess]]:
    started: list[ProducerProcess] = []

    def start(stream_id: str, lease: float) -> ProducerProcess:
        proc = ProducerProcess(redis_url, prefix, stream_id, lease)
        started.append(proc)
        return proc

    yield start  # type: ignore[misc]
    for proc in started:
        if proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait()
        for pipe in (proc.process.stdout, proc.process.stderr):
            if pipe is not None:
                pipe.close()


async def test_sigkilled_producer_ends_readers_with_producer_lost(
    transport: RedisTransport, producer_process: type[ProducerProcess]
) -> None:
    proc = producer_process("killed", 5.0)  # the default lease
    consumer = StreamConsumer(transport, "killed")
    seen = [await anext(consumer) for _ in range(5)]
    proc.process.send_signal(signal.SIGKILL)
    rest = [event async for event in consumer]  # ends once the lease expired: no hang
    assert rest[-1].type == "error" and rest[-1].data["error"] == "producer_lost"
    # Everything written before the crash is still there, once, in order.
    replay = await collect(transport, "killed")
    assert replay == seen + rest


async def test_paused_producer_is_fenced_after_takeover(
    transport: RedisTransport, producer_process: type[ProducerProcess]
) -> None:
    proc = producer_process("paused", 0.5)
    proc.process.send_signal(signal.SIGSTOP)

    async def taken_over() -> bool:
        try:
            await StreamProducer(transport).start(tokens(20), stream_id="paused")
        except StreamAlreadyRunning:
            return False
        return True

    await eventually(taken_over)
    proc.process.send_signal(signal.SIGCONT)
    assert proc.finish().splitlines()[-1] == "failed LeaseLost"
    events = await collect(transport, "paused")
    assert joined(events) == text_of(20)  # nothing of the fenced producer got in


async def _ttls(admin: aioredis.Redis, prefix: str) -> dict[bytes, int]:
    return {key: await admin.pttl(key) async for key in admin.scan_iter(match=f"{prefix}:*")}


async def test_every_key_has_an_expiry(
    transport: RedisTransport, admin: aioredis.Redis, prefix: str
) -> None:
    gate = asyncio.Event()
    producer = StreamProducer(transport)
    runs = [await producer.start(tokens(100, pause=gate)) for _ in range(5)]
    consumers = [StreamConsumer(transport, r.stream_id) for r in runs]
    for consumer in consumers:
        await anext(consumer)
    await StreamProducer(transport).cancel(runs[0].stream_id)
    running = await _ttls(admin, prefix)
    assert running and all(ttl > 0 for ttl in running.values()), running
    gate.set()
    for run in runs:
        await run.wait()
    await transport.create("orphan", owner="x", lease_ms=100)
    await collect(transport, "orphan")  # reaped by the reader
    done = await _ttls(admin, prefix)
    assert len(done) >= 2 * len(runs) + 1  # meta + events of each run, plus the orphan
    assert all(ttl > 0 for ttl in done.values()), done
    retention_ms = transport.retention * 1000
    assert all(ttl <= retention_ms for key, ttl in done.items() if key.endswith(b":events"))


async def test_a_reservation_outlasting_running_ttl_keeps_its_entries(
    redis_url: str, admin: aioredis.Redis, prefix: str
) -> None:
    # A start_timeout longer than running_ttl renewed the lease, not the data: the first
    # entry expired under the reservation, and the worker's first append made the key
    # again with no expiry.
    async with RedisTransport.from_url(redis_url, prefix=prefix, running_ttl=1) as transport:
        await StreamProducer(transport).reserve("queued", start_timeout=30)
        ttls = await _ttls(admin, prefix)
        assert len(ttls) == 3 and all(ttl > 25_000 for ttl in ttls.values()), ttls


@pytest.mark.parametrize("replicas", [0, 1])
async def test_a_lease_longer_than_running_ttl_keeps_the_first_entries(
    redis_url: str, admin: aioredis.Redis, prefix: str, replicas: int
) -> None:
    # The first append gave the entries key running_ttl, not the lease: with a lease of 3 s
    # and running_ttl=0.5 the first entry expired before the first heartbeat (a second
    # later) renewed it, and every reader of the run got OffsetExpired.
    async with RedisTransport.from_url(
        redis_url, prefix=prefix, running_ttl=0.5, replicas=replicas, replica_timeout=0.01
    ) as transport:
        info = await transport.create("s", "me", 3000)
        entry = Entry(info.epoch, 1, b'[["token",{"text":"a"}]]')
        # Durable: HOLD stores the entry, then WAIT finds no replica (not readable yet).
        with contextlib.suppress(TransportError) if replicas else contextlib.nullcontext():
            await transport.append("s", "me", entry, 1)
        assert await admin.xlen(transport._key("s", "events")) == 1
        assert await admin.pttl(transport._key("s", "events")) > 2500


async def test_an_entries_key_gone_under_a_live_run_is_made_again_with_an_expiry(
    transport: RedisTransport, admin: aioredis.Redis, prefix: str
) -> None:
    first, second = asyncio.Event(), asyncio.Event()

    async def source() -> AsyncIterator[str]:
        yield "a"
        await first.wait()
        yield "b"
        await second.wait()
        yield "c"

    # A long lease: no heartbeat renews the keys' expiries during the test.
    run = await StreamProducer(transport, lease=60).start(source(), stream_id="evicted")
    meta, events = f"{prefix}:{{evicted}}:meta", f"{prefix}:{{evicted}}:events"

    def written(seq: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return int(await admin.hget(meta, "last") or 0) >= seq

        return check

    await eventually(written(1))
    assert await admin.delete(events) == 1  # as maxmemory eviction would
    first.set()
    await eventually(written(2))
    assert await admin.pttl(events) > 0
    second.set()
    assert await run.wait() == "completed"
    with pytest.raises(OffsetExpired):  # entry 1 is lost, and readers are told so
        await collect(transport, "evicted")


class Staged:
    """Tokens t0.. of a source that stops before token ``stop`` until released."""

    def __init__(self, n: int, stop: int) -> None:
        self.n, self.stop, self.gate = n, stop, asyncio.Event()

    async def source(self) -> AsyncIterator[str]:
        for i in range(self.n):
            if i == self.stop:
                await self.gate.wait()
            yield f"t{i} "


def _assert_whole(events: list[Any], first: int, n: int) -> None:
    """Tokens t<first>..t<n-1>, each once and in order, then `end`."""
    assert "".join(e.data["text"] for e in events if e.type == "token") == "".join(
        f"t{i} " for i in range(first, n)
    )
    assert [e.type for e in events if e.terminal] == ["end"] and events[-1].type == "end"


@pytest.mark.parametrize("idle", [False, True], ids=["writing", "idle"])
async def test_a_run_the_storage_lost_whole_is_written_again_by_its_producer(
    transport: RedisTransport, admin: aioredis.Redis, prefix: str, idle: bool
) -> None:
    # Regression: a run created on a Sentinel master just before a planned failover
    # demoted it lost all its keys; its next append found no metadata, took the run for
    # deleted (LeaseLost), and readers got producer_lost although every entry was in the
    # producer's window. Idle, its heartbeat found the loss first and fenced it as well.
    n, stop = 40, 20
    staged = Staged(n, stop)
    producer = StreamProducer(transport, lease=0.3 if idle else 60)
    run = await producer.start(staged.source(), stream_id="lost")
    reader = StreamConsumer(transport, "lost")
    read = [await anext(reader) for _ in range(stop)]  # read live, then it goes
    await reader.aclose()
    live = None if idle else StreamConsumer(transport, "lost")  # follows through the loss
    seen = [] if live is None else [await anext(live) for _ in range(stop)]
    info = await transport.info("lost")
    assert info is not None and info.last_seq >= 1
    keys = [f"{prefix}:{{lost}}:{kind}" for kind in ("meta", "events", "lease")]
    assert await admin.delete(*keys) == 3  # as the demotion of the master drops them
    if idle:  # the heartbeat finds the loss, and the producer writes the run again
        meta = keys[0]

        async def restored() -> bool:
            return await admin.hget(meta, "lease_ms") == b"300"  # and the next one renewed

        await eventually(restored)
        again = await transport.info("lost")
        assert again is not None and (again.epoch, again.last_seq) == (info.epoch, info.last_seq)
        ttls = await _ttls(admin, prefix)
        assert len(ttls) == 3 and all(ttl > 0 for ttl in ttls.values()), ttls
    staged.gate.set()
    assert await run.wait() == "completed"
    _assert_whole(await collect(transport, "lost"), 0, n)
    _assert_whole(await collect(transport, "lost", after=read[-1].offset), stop, n)
    if live is not None:
        _assert_whole(seen + [event async for event in live], 0, n)
    ttls = await _ttls(admin, prefix)
    assert len(ttls) == 2 and all(ttl > 0 for ttl in ttls.values()), ttls


async def test_a_run_lost_whole_beyond_the_window_ends_with_storage_rollback(
    transport: RedisTransport, admin: aioredis.Redis, prefix: str
) -> None:
    staged = Staged(40, 20)
    producer = StreamProducer(transport, lease=60, rollback_window=0)
    run = await producer.start(staged.source(), stream_id="gone-far")
    reader = StreamConsumer(transport, "gone-far")
    read = [await anext(reader) for _ in range(20)]
    await reader.aclose()
    keys = [f"{prefix}:{{gone-far}}:{kind}" for kind in ("meta", "events", "lease")]
    assert await admin.delete(*keys) == 3
    staged.gate.set()
    assert await run.wait() == "error"
    events = await collect(transport, "gone-far")  # the error alone, at entry 1
    assert [(e.type, e.data.get("error")) for e in events] == [("error", "storage_rollback")]
    with pytest.raises(OffsetExpired):  # its events are lost, and it is told so
        await collect(transport, "gone-far", after=read[-1].offset)
    ttls = await _ttls(admin, prefix)
    assert len(ttls) == 2 and all(ttl > 0 for ttl in ttls.values()), ttls


@pytest.mark.parametrize("lost_first", [False, True], ids=["live", "lost-then-deleted"])
async def test_a_deleted_run_stays_fenced_and_its_id_can_be_used_again(
    transport: RedisTransport, admin: aioredis.Redis, prefix: str, lost_first: bool
) -> None:
    staged = Staged(40, 20)
    run = await StreamProducer(transport, lease=60).start(staged.source(), stream_id="del")
    reader = StreamConsumer(transport, "del")
    for _ in range(20):
        await anext(reader)
    await reader.aclose()
    keys = [f"{prefix}:{{del}}:{kind}" for kind in ("meta", "events", "lease")]
    if lost_first:  # lost by the storage, then deleted before its producer wrote again
        assert await admin.delete(*keys) == 3
    assert await transport.delete("del") is not lost_first
    gone = f"{prefix}:{{del}}:gone"
    assert 0 < await admin.pttl(gone) <= transport._meta_ttl_ms
    staged.gate.set()
    with pytest.raises(LeaseLost):
        await run.wait()
    assert await transport.info("del") is None
    again = await StreamProducer(transport).start(tokens(10), stream_id="del")
    assert await again.wait() == "completed"
    assert await admin.exists(gone) == 0
    assert joined(await collect(transport, "del")) == text_of(10)


async def _notice_channels(admin: aioredis.Redis, prefix: str) -> list[bytes]:
    """The streams' notice channels Redis has a subscriber on (followed live somewhere)."""
    return list(await admin.execute_command("PUBSUB", "SHARDCHANNELS", f"{prefix}:*:n"))


async def test_many_live_readers_share_a_constant_number_of_connections(
    redis_url: str, admin: aioredis.Redis, prefix: str
) -> None:
    # Named connections: the count ignores any other client of the shared server.
    name = f"conns-{prefix}"

    async def connections() -> int:
        return sum(1 for c in await admin.client_list() if c["name"] == name)

    gate = asyncio.Event()
    client = aioredis.Redis.from_url(redis_url, client_name=name)
    async with (
        RedisTransport.from_url(redis_url, prefix=prefix) as writer,  # another process
        RedisTransport(client, prefix=prefix) as transport,
    ):
        producer = StreamProducer(writer)
        runs = [await producer.start(tokens(40, pause=gate)) for _ in range(200)]
        readers = [asyncio.create_task(collect(transport, r.stream_id)) for r in runs]

        async def all_reading() -> bool:
            # Every stream followed live: Redis has a subscriber on each notice channel.
            return len(await _notice_channels(admin, prefix)) == 200

        await eventually(all_reading)
        # One pipelined command connection and one sharded pub/sub connection, whatever
        # the number of streams.
        assert await connections() == 2
        gate.set()
        results = await asyncio.gather(*readers)
        assert all(joined(events) == text_of(40) for events in results)
        assert await connections() == 2

    async def all_closed() -> bool:
        # CLIENT LIST may still show a connection whose close Redis has not processed.
        return await connections() == 0

    await eventually(all_closed)
    await client.aclose()


async def test_readers_of_a_run_written_here_are_fed_by_its_appends_not_by_notices(
    transport: RedisTransport, admin: aioredis.Redis, prefix: str
) -> None:
    # Issue 11: a run's readers in the process writing it got each entry from its notice
    # (a subscription per stream, a message to receive and parse per entry) although the
    # process had just written it.
    gate = asyncio.Event()
    producer = StreamProducer(transport)
    runs = [await producer.start(tokens(300, every=1, pause=gate)) for _ in range(20)]
    readers = [asyncio.create_task(collect(transport, r.stream_id)) for r in runs]
    consumers = [StreamConsumer(transport, r.stream_id) for r in runs]
    firsts = [await anext(consumer) for consumer in consumers]  # live, before the pause

    async def all_reading() -> bool:
        return len(transport._feeds) == len(runs)

    await eventually(all_reading)
    assert not [c for c in transport._channel_node if c.endswith(b":n")]
    assert await _notice_channels(admin, prefix) == []
    gate.set()
    for run, reader, consumer, first in zip(runs, readers, consumers, firsts, strict=True):
        assert joined(await reader) == text_of(300)  # no gap, no duplicate
        assert joined([first, *[event async for event in consumer]]) == text_of(300)
        assert await run.wait() == "completed"


async def _closing_slowly(closed: asyncio.Event) -> AsyncIterator[str]:
    """A slow model whose stream takes until ``closed`` to close once the run stops."""
    try:
        yield "hello "
        await asyncio.Event().wait()
    finally:
        await closed.wait()


async def _live_reader(transport: RedisTransport, stream_id: str) -> StreamConsumer:
    consumer = StreamConsumer(transport, stream_id)
    await anext(consumer)

    async def following() -> bool:
        return any(feed.subscribers for feed in transport._feeds.values())

    await eventually(following)  # the reader is live (waits for what comes next)
    return consumer


async def _ended_in_error(consumer: StreamConsumer) -> None:
    async def drain() -> None:
        async with asyncio.timeout(30):  # a bound on a hang, not a wait for readiness
            async for _ in consumer:
                pass

    with pytest.raises(ResumableStreamError):
        await drain()


async def test_a_reader_here_learns_at_once_that_another_process_deleted_the_run(
    transport: RedisTransport, redis_url: str, prefix: str
) -> None:
    # Its readers here are not subscribed to the run's notices, the delete's among them.
    # They learnt of it only once the run's task had ended, after its source closed (or at
    # their next check, half the lease later: an hour here).
    closed = asyncio.Event()
    run = await StreamProducer(transport, lease=7200).start(_closing_slowly(closed))
    consumer = await _live_reader(transport, run.stream_id)
    async with RedisTransport.from_url(redis_url, prefix=prefix) as there:
        assert await there.delete(run.stream_id)
    await _ended_in_error(consumer)
    closed.set()
    with pytest.raises(LeaseLost):
        await run.wait()


async def test_readers_here_of_a_run_restarted_here_learn_it_at_once(
    transport: RedisTransport, redis_url: str, prefix: str
) -> None:
    # Found in review: the id started again here while the old run was still stopping
    # (its source closing) left the old run's readers waiting for their next check.
    closed = asyncio.Event()
    old = await StreamProducer(transport, lease=7200).start(_closing_slowly(closed), stream_id="s")
    consumer = await _live_reader(transport, "s")
    async with RedisTransport.from_url(redis_url, prefix=prefix) as there:
        assert await there.delete("s")
    new = await StreamProducer(transport, lease=7200).start(tokens(3), stream_id="s")
    await _ended_in_error(consumer)  # OffsetExpired: restarted
    assert joined(await collect(transport, "s")) == text_of(3)
    assert await new.wait() == "completed"
    closed.set()
    with pytest.raises(LeaseLost):
        await old.wait()


async def test_readers_here_of_a_run_taken_over_here_learn_it_at_once(
    transport: RedisTransport, admin: aioredis.Redis
) -> None:
    # Found in review: a run whose lease lapsed (its process stalled, say) and whose id is
    # started again here: no notice or cancel tells the old run's readers here, who are
    # fed by its appends; the new run's writing() must wake them.
    gate = asyncio.Event()
    old = await StreamProducer(transport, lease=7200).start(tokens(10, pause=gate), stream_id="s")
    consumer = await _live_reader(transport, "s")
    assert await admin.delete(transport._key("s", "lease")) == 1  # the lease lapsed
    new = await StreamProducer(transport, lease=7200).start(tokens(3), stream_id="s")
    await _ended_in_error(consumer)  # OffsetExpired: taken over by another run
    assert joined(await collect(transport, "s")) == text_of(3)
    assert await new.wait() == "completed"
    gate.set()
    with pytest.raises(LeaseLost):  # fenced at its next write
        await old.wait()


async def test_writes_are_batched_not_one_round_trip_per_token(
    transport: RedisTransport, admin: aioredis.Redis
) -> None:
    await admin.config_resetstat()
    producer = StreamProducer(transport)
    runs = [await producer.start(tokens(2000, every=1)) for _ in range(20)]
    results = await asyncio.gather(*(collect(transport, r.stream_id) for r in runs))
    assert all(joined(events) == text_of(2000) for events in results)
    stats = await admin.info("commandstats")
    commands = sum(
        v["calls"] for k, v in stats.items() if k not in ("cmdstat_config", "cmdstat_info")
    )
    assert commands < 0.1 * 20 * 2000, stats


async def test_tokens_that_came_during_a_slow_write_are_not_held_for_the_coalescing_delay(
    transport: RedisTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tokens that come while an entry is being written (a loaded server) start a hold of
    # the next entry: it ended only after coalesce_delay, however long, although nothing
    # more came. A first pause with nothing in it ends it now.
    release, held, seen = asyncio.Event(), asyncio.Event(), asyncio.Event()
    append = transport.append

    async def slow_append(stream_id: str, owner: str, entry: Entry, *args: Any) -> None:
        if entry.seq == 1:
            held.set()
            await release.wait()
        await append(stream_id, owner, entry, *args)

    monkeypatch.setattr(transport, "append", slow_append)

    async def source() -> AsyncIterator[str]:
        yield "a "
        await held.wait()  # the first entry is being written
        yield "b "
        yield "c "
        release.set()
        await seen.wait()  # until a reader received them

    run = await StreamProducer(transport, coalesce_delay=3600.0).start(source())
    got: list[str] = []
    async with asyncio.timeout(60):  # (before: held an hour)
        async for event in StreamConsumer(transport, run.stream_id):
            if event.type == "token":
                got.append(event.data["text"])
                if len(got) == 3:
                    seen.set()
        assert await run.wait() == "completed"
    assert got == ["a ", "b ", "c "]
    info = await transport.info(run.stream_id)
    assert info is not None and info.last_seq == 3  # a, then b and c together, then the end


async def test_scripts_survive_a_script_flush(
    transport: RedisTransport, admin: aioredis.Redis
) -> None:
    assert joined(
        await collect(transport, (await StreamProducer(transport).start(tokens(5))).stream_id)
    ) == text_of(5)
    await admin.script_flush()
    run = await StreamProducer(transport).start(tokens(5))
    assert joined(await collect(transport, run.stream_id)) == text_of(5)


@pytest.mark.parametrize("fault", ["script flush", "connections dropped"])
async def test_a_paced_run_outlives_a_fault_met_by_an_entry_posted(
    transport: RedisTransport,
    admin: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    # Paced entries are posted (Transport.append_soon): an answer that is not "stored"
    # (NOSCRIPT, or the connection dropped while the reply was owed) sends the entry
    # again through append(), which recovers; readers get each token once.
    monkeypatch.setattr("resumable_stream._producer.COALESCE_GAP", 0.0)  # (see test_producer)
    received: asyncio.Queue[str] = asyncio.Queue()

    async def source() -> AsyncIterator[str]:
        for i in range(12):
            yield f"t{i} "
            assert await received.get() == f"t{i} "
            if i == 5 and fault == "script flush":
                await admin.script_flush()
            elif i == 5:
                await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")

    posts: list[int] = []
    post = transport.append_soon

    def counted(*args: Any) -> bool:
        posts.append(args[2].seq)
        return post(*args)

    monkeypatch.setattr(transport, "append_soon", counted)
    run = await StreamProducer(transport).start(source())
    got: list[str] = []
    async with StreamConsumer(transport, run.stream_id) as reader:
        async for event in reader:
            if event.type == "token":
                got.append(event.data["text"])
                received.put_nowait(event.data["text"])
    assert got == [f"t{i} " for i in range(12)]
    assert await run.wait() == "completed"
    assert posts == list(range(2, 13))  # every token's entry but the first was posted
    if fault == "script flush":
        assert transport.redirects["NOSCRIPT"] >= 1  # met by the post, then by append()


async def test_entries_of_one_run_posted_back_to_back_are_answered_each(
    transport: RedisTransport,
) -> None:
    # A run's post is answered through an object kept with its command head (one per run,
    # not one per entry): a second entry posted before the first is answered (not the
    # producer's way, which posts one at a time) gets its own, and neither is lost.
    stream_id = "posted-twice"
    info = await transport.create(stream_id, "me", 10_000)
    stop_writing = transport.writing(stream_id, info.epoch)
    subscription = transport.subscribe(stream_id, info.epoch, 0)
    entries = [
        Entry(info.epoch, seq, encode_entry([(TOKEN, {"text": f"t{seq}"})])) for seq in (1, 2, 3, 4)
    ]
    await transport.append(stream_id, "me", entries[0], 1)  # (loads the script)
    answered: list[tuple[int, bool]] = []
    for entry in entries[1:3]:
        done = functools.partial(lambda seq, stored: answered.append((seq, stored)), entry.seq)
        assert transport.append_soon(stream_id, "me", entry, 1, done)
    got: list[Entry] = []

    def delivered(count: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            got.extend(await subscription.get(max_wait=0.05))
            return len(got) >= count

        return check

    await eventually(delivered(3))
    assert answered == [(2, True), (3, True)]
    # The run's own object is free again: the next entry goes through it.
    assert transport.append_soon(stream_id, "me", entries[3], 1, lambda stored: None)
    await eventually(delivered(4))
    assert [entry.seq for entry in got] == [1, 2, 3, 4]
    subscription.close()
    stop_writing()


async def test_each_append_writes_its_own_time(
    transport: RedisTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An append's time (the run's updated_at) is turned into digits once per millisecond:
    # appends within one get the same, the next millisecond's get theirs.
    now = [0]
    clock = types.SimpleNamespace(time_ns=lambda: now[0], time=time.time, monotonic=time.monotonic)
    monkeypatch.setattr("resumable_stream.transports.redis.time", clock)
    info = await transport.create("timed", "me", 10_000)
    payload = encode_entry([(TOKEN, {"text": "x"})])
    times = [
        1_900_000_000_123_400_000,
        1_900_000_000_123_999_999,  # the same millisecond
        1_900_000_000_124_000_000,
        1_900_000_001_000_000_001,
        1_900_000_000_900_000_000,  # the wall clock stepped back
    ]
    for seq, ns in enumerate(times, start=1):
        now[0] = ns
        await transport.append("timed", "me", Entry(info.epoch, seq, payload), 1)
        stored = await transport.info("timed")
        assert stored is not None
        assert stored.updated_at == ns // 1_000_000 / 1000


async def test_unreachable_redis_raises_transport_error() -> None:
    async with from_url("redis://127.0.0.1:1/0") as transport:
        with pytest.raises(TransportError):
            await StreamProducer(transport).start(tokens(1))
        with pytest.raises(TransportError):
            await collect(transport, "anything")


async def test_a_run_whose_transport_closes_before_it_first_runs_ends_at_once(
    transport: RedisTransport,
) -> None:
    # Regression (fbc5d55): closed before the run's task first ran, the transport refused
    # its cancel watch; the run then waited for events to write until its heartbeat found
    # the transport closed (a third of the lease: 20 s here), rather than at once.
    gate = asyncio.Event()
    run = await StreamProducer(transport, lease=60).start(tokens(3, pause=gate))
    await transport.aclose()  # (closed before its first await: the run has not run yet)
    with pytest.raises(TransportClosed):
        await asyncio.wait_for(run.wait(), timeout=10)
    assert run._task.cancelling() == 0


async def test_user_supplied_client(redis_url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    transport = RedisTransport(client, prefix=prefix)
    run = await StreamProducer(transport).start(tokens(30))
    assert joined(await collect(transport, run.stream_id)) == text_of(30)
    await transport.aclose()
    assert await client.ping()  # the caller's client stays open
    await client.aclose()


@pytest.mark.parametrize("final", [None, "completed", "error", "cancelled", "running"])
async def test_the_append_command_is_the_one_hiredis_packs(
    final: Status | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The append command is formatted from parts packed once per run (_append_command):
    # byte for byte what packing all of its arguments gives, for any run, entry and end.
    monkeypatch.setattr(time, "time_ns", lambda: 1764590000123456789)
    transport = from_url("redis://127.0.0.1:1/0", max_entries=777)
    assert isinstance(transport, RedisTransport)
    ends = (
        777,
        transport._running_ttl_ms,
        transport._retention_ms,
        transport._meta_ttl_ms,
        transport._restored_ttl_ms,
    )
    for owner, epoch, stream_id in [("me", 5, "a"), ("été", 6, "a"), ("me", 10**15, "b:ü")]:
        for seq, payload, count in [
            (1, b'["x"]', 1),
            (12345, b"\r\n" * 300, 99),
            (10**12, b"y" * 5000, 1500),  # lengths past those whose headers are made once
        ]:
            entry = Entry(epoch, seq, payload)
            arguments = (owner, epoch, seq, payload, count, 1764590000123, final or "", *ends)
            assert transport._append_command(
                stream_id, owner, entry, count, final
            ) == transport._evalsha(_APPEND, stream_id, arguments)
    await transport.aclose()


async def test_keys_use_one_hash_tag_per_stream(
    transport: RedisTransport, admin: aioredis.Redis, prefix: str
) -> None:
    run = await StreamProducer(transport).start(tokens(3), stream_id="tagged:1")
    await run.wait()
    keys = sorted([k.decode() async for k in admin.scan_iter(match=f"{prefix}:*")])
    assert keys == [f"{prefix}:{{tagged:1}}:events", f"{prefix}:{{tagged:1}}:meta"]
    assert len({key_slot(k.encode()) for k in keys}) == 1  # one Redis Cluster slot


async def test_a_cancel_watch_stops_a_run_deleted_or_replaced_before_it_was_subscribed(
    transport: RedisTransport,
) -> None:
    # The delete's notice on the cancel channel is lost if it came before the watch was
    # subscribed; the check made then found no `cancel` field and let the run go on
    # (its readers in this process, fed by its appends, waited for their next check).
    fired: list[Exception | None] = []
    waiter = _CancelWaiter(transport, "s", 1234, fired.append)
    waiter.check(None, b"1234")
    assert fired == []  # running, not cancelled
    waiter.check(None, None)  # deleted
    assert fired == [None]
    replaced = _CancelWaiter(transport, "s", 1234, fired.append)
    replaced.check(None, b"1300")  # another run of the id since
    assert fired == [None, None]


async def test_a_cancel_watch_lets_a_run_the_storage_lost_whole_go_on(
    transport: RedisTransport,
) -> None:
    # A watch (re)subscribed looks at the metadata: none at all is a deleted run only if
    # the delete's marker is there; else the storage lost the run (a failover), which its
    # producer writes again. (It stopped such a run, which wrote `cancelled`.)
    fired: list[Exception | None] = []
    waiter = _CancelWaiter(transport, "s", 1234, fired.append)
    look = pack("HMGET", transport._key("s", "meta"), "cancel", "epoch")
    await transport._check_cancel_slowly(waiter, look)
    assert fired == []
    assert await transport.delete("s") is False
    await transport._check_cancel_slowly(waiter, look)
    assert fired == [None]


async def test_streams_survive_redis_dropping_every_connection(
    transport: RedisTransport, admin: aioredis.Redis, redis_url: str
) -> None:
    gate = asyncio.Event()
    producer = StreamProducer(transport)
    runs = [await producer.start(tokens(300, every=1, pause=gate)) for _ in range(5)]
    # Readers here (fed by the runs' appends) and in another process (by notices).
    async with RedisTransport.from_url(redis_url, prefix=transport.prefix) as there:
        readers = [
            asyncio.create_task(collect(reading, r.stream_id))
            for reading in (transport, there)
            for r in runs
        ]

        async def all_live() -> bool:
            notices = await _notice_channels(admin, transport.prefix)
            return len(notices) == len(runs) and len(transport._feeds) == len(runs)

        await eventually(all_live)
        killed = await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert killed == 2  # the pipelined command connection of each transport
        killed = await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert killed == 2  # the sharded pub/sub connection of each: notices, cancels
        gate.set()
        for reader in readers:
            assert joined(await reader) == text_of(300)  # no gap, no duplicate
        for run in runs:
            assert await run.wait() == "completed"


async def test_a_notices_connection_dropped_while_channels_are_added_is_a_transport_error(
    transport: RedisTransport, admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression (issue 8): the subscriber wrote its SSUBSCRIBEs from a task of its own
    # through redis-py's send_packed_command, which on a connection redis-py has just
    # dropped reconnects it behind our back or fails inside redis-py (an AttributeError,
    # "Task exception was never retrieved" under -X dev); the faults were logged as
    # redis-py's exceptions, not as TransportError.
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    caplog.set_level(logging.WARNING, logger="resumable_stream.redis")
    subscriptions = [transport.subscribe("first", 1, 0)]

    async def subscribed() -> bool:
        channels = await _notice_channels(admin, transport.prefix)
        return len(channels) == len(subscriptions)

    try:
        for round_ in range(5):
            await eventually(subscribed)
            kill = asyncio.create_task(admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
            for i in range(20):  # channels added while the connection goes down
                subscriptions.append(transport.subscribe(f"s{round_}-{i}", 1, 0))
                await asyncio.sleep(0)
            assert await kill == 1
        # Reconnected, with every channel: a live reader gets a new run whole.
        await eventually(subscribed)
        run = await StreamProducer(transport).start(tokens(100, every=1))
        assert joined(await collect(transport, run.stream_id)) == text_of(100)
        for subscription in subscriptions:
            subscription.close()
        gc.collect()  # an unretrieved task exception is reported when the task is freed
    finally:
        loop.set_exception_handler(previous)
    assert unhandled == []
    faults = [r for r in caplog.records if r.name == "resumable_stream.redis"]
    assert len(faults) >= 5  # each drop seen and reported, as our exception type
    assert all(isinstance(record.args[1], TransportError) for record in faults), [  # type: ignore[index]
        record.getMessage() for record in faults
    ]


async def test_a_refused_connection_set_up_fails_calls_with_the_real_error(
    redis_url: str, admin: aioredis.Redis, prefix: str
) -> None:
    # Regression: a refused SELECT was ignored and commands ran on db 0 instead.
    async with RedisTransport.from_url(redis_url.rsplit("/", 1)[0] + "/999", prefix=prefix) as bad:
        for _ in range(3):
            with pytest.raises(TransportError, match="refused the connection set-up"):
                await StreamProducer(bad).start(tokens(1))
    assert [key async for key in admin.scan_iter(match=f"{prefix}:*")] == []


async def test_a_server_that_stops_answering_fails_calls_after_socket_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def black_hole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # accept and read, never answer, never close

    server = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            from_url(f"redis://127.0.0.1:{port}/0?socket_timeout=0.3") as short,
            from_url(f"redis://127.0.0.1:{port}/0") as default,
        ):
            # Started together: only a timeout ends a call here, and the short one must end
            # first (the option is honoured) while a call with the default still waits.
            waiting = asyncio.create_task(default.info("any"))
            with pytest.raises(TransportError):
                await short.info("any")
            assert not waiting.done()
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError, TransportError):
                await waiting
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_cancel_sent_while_the_listener_reconnects_still_lands_before_a_heartbeat(
    transport: RedisTransport, admin: aioredis.Redis
) -> None:
    gate = asyncio.Event()  # never set: a slow model
    # A lease so long that its heartbeat (lease / 3) comes after the test's timeout: only the
    # listener re-checking after it reconnected can deliver the cancel.
    run = await StreamProducer(transport, lease=3600).start(tokens(10, pause=gate))
    async with StreamConsumer(transport, run.stream_id) as consumer:
        await anext(consumer)  # the run is live and its cancel listener subscribed

        async def listening() -> bool:
            return any(c.get("flags") == "P" for c in await admin.client_list())

        await eventually(listening)
        await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert await StreamProducer(transport).cancel(run.stream_id)  # published to nobody
        assert await run.wait() == "cancelled"


async def test_runs_share_one_heartbeat_and_watch_cancels_without_a_task(
    transport: RedisTransport,
) -> None:
    # Issue 8: each run had a heartbeat task and a cancel-watching task besides its own
    # two, which made starting and ending a run dearer than before the per-stream cancel
    # channels. Now a producer renews all its runs from one task, and the transport calls
    # a run back on a cancel.
    producer = StreamProducer(transport, lease=0.3)
    gate = asyncio.Event()
    before = len(asyncio.all_tasks())
    runs = [await producer.start(tokens(3, pause=gate)) for _ in range(20)]
    names = [task.get_name() for task in asyncio.all_tasks()]
    assert names.count("rstream heartbeat") == 1
    # Per run: its own task, which writes, and the source's reader (issue 11: a third, the
    # writer, and a task group made starting a run dearer); then the heartbeat and the
    # connections' tasks (commands, notices and its writer).
    assert len(names) - before <= 2 * len(runs) + 4, sorted(names)

    renewals: dict[str, int] = {}
    renew = transport.renew

    async def counted(stream_id: str, owner: str, lease_ms: int) -> bool:
        renewals[stream_id] = renewals.get(stream_id, 0) + 1
        return await renew(stream_id, owner, lease_ms)

    transport.renew = counted  # type: ignore[method-assign]

    async def past_a_lease() -> bool:  # four heartbeats (lease / 3 apart) for every run
        return all(renewals.get(run.stream_id, 0) >= 4 for run in runs)

    await eventually(past_a_lease)
    assert await runs[0].cancel() == "cancelled"  # a cancel reaches the run
    assert await StreamProducer(transport).cancel(runs[1].stream_id)  # and from elsewhere
    assert await runs[1].wait() == "cancelled"
    gate.set()
    assert [await run.wait() for run in runs[2:]] == ["completed"] * 18
    for run in runs[2:]:
        events = await collect(transport, run.stream_id)
        assert [e.type for e in events][-1] == "end"

    async def no_heartbeat() -> bool:
        return all(t.get_name() != "rstream heartbeat" for t in asyncio.all_tasks())

    await eventually(no_heartbeat)
