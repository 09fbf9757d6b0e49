"""Streams through Redis Cluster and Sentinel topology changes, on real servers.

Each scenario runs a stream whose source the test drives stage by stage, with a live
reader, and changes the topology mid-stream: a slot migrated between masters (ASK, then
MOVED; or keys split between masters, TRYAGAIN), a Cluster failover, a Sentinel failover.
Readers must get every event exactly once, in order, ending with the one terminal event.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.cluster import ClusterNode

from resumable_stream import (
    BackendRefused,
    Event,
    LeaseLost,
    OffsetExpired,
    StreamConsumer,
    StreamProducer,
    Transport,
    TransportError,
)
from resumable_stream.transports import Entry, from_url
from resumable_stream.transports import _redis_scripts as scripts
from resumable_stream.transports import redis as redis_module
from resumable_stream.transports.redis import RedisTransport
from tests._helpers import collect, eventually, joined, text_of
from tests._services import RedisClusterService, RedisSentinelService, RedisServer

N = 300


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


class Stages:
    """A source of N tokens that stops before each of `stops` until the test lets it go."""

    def __init__(self, n: int, *stops: int) -> None:
        self.n = n
        self.gates = {stop: asyncio.Event() for stop in stops}

    def release(self, stop: int) -> None:
        self.gates[stop].set()

    async def source(self) -> AsyncIterator[str]:
        for i in range(self.n):
            gate = self.gates.get(i)
            if gate is not None:
                await gate.wait()
            yield f"t{i} "
            if i % 25 == 0:
                await asyncio.sleep(0)  # let the flusher write entries of a few events


class Reader:
    """A live reader recording what it got; `await reached(k)` until it holds k tokens."""

    def __init__(
        self,
        transport: Transport,
        stream_id: str,
        *,
        resume_when: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.events: list[Event] = []
        self.error: Exception | None = None
        self.resumed = 0
        self._changed = asyncio.Condition()
        self.task = asyncio.create_task(self._read(transport, stream_id, resume_when))

    async def _read(
        self,
        transport: Transport,
        stream_id: str,
        resume_when: Callable[[], Awaitable[None]] | None,
    ) -> None:
        try:
            while True:
                after = self.events[-1].offset if self.events else None
                try:
                    async for event in StreamConsumer(transport, stream_id, after=after):
                        self.events.append(event)
                        async with self._changed:
                            self._changed.notify_all()
                    return
                except TransportError:
                    # Like an SSE client: reconnect with the last offset it got, once
                    # `resume_when` says the storage is back.
                    if resume_when is None:
                        raise
                    await resume_when()
                    self.resumed += 1
        except OffsetExpired as exc:
            self.error = exc
        finally:
            async with self._changed:
                self._changed.notify_all()

    @property
    def tokens(self) -> int:
        return sum(e.type == "token" for e in self.events)

    async def reached(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.tokens >= count or self.task.done())
        assert self.tokens >= count, (self.tokens, self.error, self.events[-1:])

    async def result(self) -> list[Event]:
        await self.task
        return self.events


def assert_whole(events: list[Event], n: int = N) -> None:
    """Every token once, in order, then `end`."""
    assert joined(events) == text_of(n)
    assert [e.type for e in events if e.terminal] == ["end"]
    assert events[-1].type == "end"
    assert len({e.offset for e in events}) == len(events)


# --- Redis Cluster -----------------------------------------------------------------------------


@pytest.fixture
async def cluster_transport(
    redis_cluster: RedisClusterService, prefix: str
) -> AsyncIterator[Transport]:
    async with from_url(redis_cluster.url, prefix=prefix) as transport:
        yield transport


def _errorstat(cluster: RedisClusterService, port: int, code: str) -> int:
    with contextlib.closing(cluster.node(port).client()) as client:
        stats = client.info("errorstats")
    entry = stats.get(f"errorstat_{code}")
    return int(entry["count"]) if isinstance(entry, dict) else 0


@pytest.mark.parametrize("split", [False, True], ids=["ask-then-moved", "keys-split-tryagain"])
async def test_a_slot_migrated_mid_stream_loses_nothing(
    redis_cluster: RedisClusterService,
    cluster_transport: Transport,
    prefix: str,
    split: bool,
) -> None:
    stages = Stages(N, N // 3, 2 * N // 3)
    run = await StreamProducer(cluster_transport).start(stages.source())
    reader = Reader(cluster_transport, run.stream_id)
    await reader.reached(N // 3)
    slot = redis_cluster.slot_of("{" + run.stream_id + "}")
    source = redis_cluster.owner(slot)
    target = next(port for port in redis_cluster.master_ports() if port != source)
    migration = redis_cluster.migrating_slot(slot, target)
    if split:
        # The events key moves first: the stream's scripts touch keys on both masters now,
        # and Redis answers TRYAGAIN until the rest follows.
        events_key = f"{prefix}:{{{run.stream_id}}}:events"
        with contextlib.closing(redis_cluster.node(source).client()) as client:
            client.execute_command(
                "MIGRATE", "127.0.0.1", target, "", 0, 10_000, "KEYS", events_key
            )
        refused = _errorstat(redis_cluster, source, "TRYAGAIN")
        stages.release(N // 3)

        async def refused_again() -> bool:
            return await asyncio.to_thread(_errorstat, redis_cluster, source, "TRYAGAIN") > (
                refused
            )

        await eventually(refused_again, within=30)
        await asyncio.to_thread(migration.move_keys)
    else:
        # Every key moves, the slot is still MIGRATING: the source answers ASK.
        await asyncio.to_thread(migration.move_keys)
        stages.release(N // 3)
        await reader.reached(2 * N // 3)
    await asyncio.to_thread(migration.finish)  # MOVED from now on
    assert redis_cluster.owner(slot) == target
    stages.release(2 * N // 3)
    assert_whole(await reader.result())
    assert await run.wait() == "completed"
    assert_whole(await collect(cluster_transport, run.stream_id))  # a fresh reader too


async def test_readers_elsewhere_get_entries_written_through_ask_live(
    redis_cluster: RedisClusterService, cluster_transport: Transport, prefix: str
) -> None:
    # An append answered after ASK runs on the importing node, and so did its notice
    # (SPUBLISH inside the script); readers in other processes stay subscribed on the
    # migrating node until the slot has moved. They got the entries only from the check
    # of a quiet stream, half a lease later (here 15 s), for as long as the migration
    # lasted.
    stages = Stages(N, N // 3, 2 * N // 3)
    producer = StreamProducer(cluster_transport, lease=30)
    run = await producer.start(stages.source())
    async with from_url(redis_cluster.url, prefix=prefix) as elsewhere:
        reader = Reader(elsewhere, run.stream_id)
        await reader.reached(N // 3)
        slot = redis_cluster.slot_of("{" + run.stream_id + "}")
        source = redis_cluster.owner(slot)
        target = next(port for port in redis_cluster.master_ports() if port != source)
        migration = redis_cluster.migrating_slot(slot, target)
        await asyncio.to_thread(migration.move_keys)  # the slot stays MIGRATING: ASK
        asked = await asyncio.to_thread(_errorstat, redis_cluster, source, "ASK")
        stages.release(N // 3)
        await asyncio.wait_for(reader.reached(2 * N // 3), timeout=5)
        assert await asyncio.to_thread(_errorstat, redis_cluster, source, "ASK") > asked
        # Moved: Redis drops the subscription from the old owner (sunsubscribe), and the
        # reader follows the stream on the new one.
        await asyncio.to_thread(migration.finish)
        stages.release(2 * N // 3)
        assert_whole(await asyncio.wait_for(reader.result(), timeout=5))
    assert await run.wait() == "completed"


async def test_a_cancel_written_through_ask_reaches_the_producer_live(
    redis_cluster: RedisClusterService, cluster_transport: Transport, prefix: str
) -> None:
    # As for entries: the cancel's notice went out on the importing node, and the producer
    # found it only at its next heartbeat.
    stages = Stages(N, 1)
    run = await StreamProducer(cluster_transport, lease=30).start(stages.source())
    await Reader(cluster_transport, run.stream_id).reached(1)
    slot = redis_cluster.slot_of("{" + run.stream_id + "}")
    source = redis_cluster.owner(slot)
    target = next(port for port in redis_cluster.master_ports() if port != source)
    migration = redis_cluster.migrating_slot(slot, target)
    await asyncio.to_thread(migration.move_keys)
    async with from_url(redis_cluster.url, prefix=prefix) as elsewhere:
        assert await StreamProducer(elsewhere).cancel(run.stream_id)
    assert await asyncio.wait_for(run.wait(), timeout=5) == "cancelled"
    await asyncio.to_thread(migration.finish)


async def test_a_delete_written_through_ask_reaches_readers_and_producer_live(
    redis_cluster: RedisClusterService, cluster_transport: Transport, prefix: str
) -> None:
    # As for entries and cancels: the delete script's notices (the stream gone, to its
    # readers; stop, to its producer) went out on the importing node only. Readers elsewhere
    # found the stream gone at their check of a quiet stream, the producer at its heartbeat.
    closed = asyncio.Event()

    async def source() -> AsyncIterator[str]:
        try:
            yield "t0 "
            await asyncio.Event().wait()  # an upstream call that takes its time
        finally:
            closed.set()

    run = await StreamProducer(cluster_transport, lease=30).start(source())
    async with from_url(redis_cluster.url, prefix=prefix) as elsewhere:
        reader = Reader(elsewhere, run.stream_id)
        await reader.reached(1)
        slot = redis_cluster.slot_of("{" + run.stream_id + "}")
        source_port = redis_cluster.owner(slot)
        target = next(port for port in redis_cluster.master_ports() if port != source_port)
        migration = redis_cluster.migrating_slot(slot, target)
        await asyncio.to_thread(migration.move_keys)  # the slot stays MIGRATING: ASK
        try:
            assert await cluster_transport.delete(run.stream_id)
            await asyncio.wait_for(reader.result(), timeout=5)
            assert isinstance(reader.error, OffsetExpired)
            await asyncio.wait_for(closed.wait(), timeout=5)  # (its heartbeat: 10 s)
        finally:
            await asyncio.to_thread(migration.finish)
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(run.wait(), timeout=10)


async def test_a_stream_started_in_a_slot_being_migrated_starts_once_the_slot_moved(
    redis_cluster: RedisClusterService, cluster_transport: Transport
) -> None:
    stream_id = uuid.uuid4().hex
    slot = redis_cluster.slot_of("{" + stream_id + "}")
    source = redis_cluster.owner(slot)
    target = next(port for port in redis_cluster.master_ports() if port != source)
    migration = redis_cluster.migrating_slot(slot, target)
    # A new stream's keys are on neither master: the source sends its create script to the
    # target (ASK), which answers TRYAGAIN (keys missing) until the slot has moved.
    refused = await asyncio.to_thread(_errorstat, redis_cluster, target, "TRYAGAIN")
    start = asyncio.create_task(
        StreamProducer(cluster_transport).start(Stages(N).source(), stream_id=stream_id)
    )

    async def refused_again() -> bool:
        count = await asyncio.to_thread(_errorstat, redis_cluster, target, "TRYAGAIN")
        return start.done() or count > refused

    await eventually(refused_again, within=30)
    await asyncio.to_thread(migration.finish)
    run = await start
    assert await run.wait() == "completed"
    assert_whole(await collect(cluster_transport, stream_id))


async def test_a_finished_stream_in_a_slot_being_migrated_is_deleted_once_the_slot_moved(
    redis_cluster: RedisClusterService, cluster_transport: Transport
) -> None:
    run = await StreamProducer(cluster_transport).start(Stages(3).source())
    assert await run.wait() == "completed"
    slot = redis_cluster.slot_of("{" + run.stream_id + "}")
    source = redis_cluster.owner(slot)
    target = next(port for port in redis_cluster.master_ports() if port != source)
    migration = redis_cluster.migrating_slot(slot, target)
    # A finished stream has no lease key: the source holds some of the delete script's keys,
    # not all, and answers TRYAGAIN until the slot has moved.
    refused = await asyncio.to_thread(_errorstat, redis_cluster, source, "TRYAGAIN")
    delete = asyncio.create_task(cluster_transport.delete(run.stream_id))

    async def refused_again() -> bool:
        count = await asyncio.to_thread(_errorstat, redis_cluster, source, "TRYAGAIN")
        return delete.done() or count > refused

    await eventually(refused_again, within=30)
    await asyncio.to_thread(migration.finish)
    assert await delete is True
    assert await cluster_transport.info(run.stream_id) is None


async def test_a_node_removed_from_the_cluster_is_left_for_the_slot_map_of_today(
    redis_cluster: RedisClusterService,
    cluster_transport: Transport,
    tmp_path: Path,
) -> None:
    # `redis-cli --cluster del-node` resets the node it removes (CLUSTER RESET SOFT): it
    # serves no slot and answers CLUSTERDOWN to a process whose slot map still names it for
    # a slot that moved away from it since that process last used the slot. A lone cluster
    # node answers the same.
    run = await StreamProducer(cluster_transport).start(Stages(3).source())
    assert await run.wait() == "completed"
    removed = RedisServer(directory=tmp_path, cluster=True).start()
    try:
        await cluster_transport.info(run.stream_id)  # the slot map is known
        slot = redis_cluster.slot_of("{" + run.stream_id + "}")
        assert isinstance(cluster_transport, RedisTransport) and cluster_transport._cluster
        manager = cluster_transport._cluster.nodes_manager
        stale = ClusterNode("127.0.0.1", removed.port, **manager.connection_kwargs)
        manager.slots_cache[slot] = [stale]

        async def answered() -> bool:
            with contextlib.suppress(TransportError):
                return (await cluster_transport.info(run.stream_id)) is not None
            return False

        await eventually(answered, within=10)
    finally:
        removed.kill()


async def test_a_cluster_failover_mid_stream_loses_nothing(
    redis_cluster: RedisClusterService, cluster_transport: Transport
) -> None:
    stages = Stages(N, N // 2)
    run = await StreamProducer(cluster_transport).start(stages.source())
    reader = Reader(cluster_transport, run.stream_id)
    await reader.reached(N // 2)
    master = redis_cluster.owner(redis_cluster.slot_of("{" + run.stream_id + "}"))
    await asyncio.to_thread(redis_cluster.failover, master)
    stages.release(N // 2)
    assert_whole(await reader.result())
    assert await run.wait() == "completed"
    assert_whole(await collect(cluster_transport, run.stream_id))


async def test_a_reader_elsewhere_follows_the_replica_of_a_hung_master(
    redis_cluster: RedisClusterService, prefix: str
) -> None:
    # Regression: the notices connection had no watchdog. A master that hangs (SIGSTOP, a
    # frozen host: the socket stays open, nothing comes) and is replaced by its replica
    # left a process that only reads subscribed to it: its readers got nothing more until
    # their quiet check, half a lease later, and then an error.
    url = f"{redis_cluster.url}?socket_timeout=1"
    async with from_url(url, prefix=prefix) as here, from_url(url, prefix=prefix) as elsewhere:
        stages = Stages(N, N // 2)
        # A long lease: the reader's quiet check (every half lease) cannot rescue it here.
        run = await StreamProducer(here, lease=120).start(stages.source())
        reader = Reader(elsewhere, run.stream_id)
        await reader.reached(N // 2)
        master = redis_cluster.owner(redis_cluster.slot_of("{" + run.stream_id + "}"))
        channel = f"{prefix}:{{{run.stream_id}}}:n"

        async def subscribed() -> bool:
            def count() -> int:
                with contextlib.closing(redis_cluster.node(master).client()) as client:
                    return int(client.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1])

            return await asyncio.to_thread(count) == 1

        await eventually(subscribed)  # the reader waits on the master's notices
        redis_cluster.node(master).pause()
        try:
            stages.release(N // 2)  # written to the replica once it took over
            async with asyncio.timeout(30):
                assert_whole(await reader.result())
            assert await run.wait() == "completed"
        finally:
            redis_cluster.node(master).resume()


async def _connections_per_node(cluster: RedisClusterService, name: str) -> dict[int, int]:
    """Connections named `name` on each node (other tests' clients do not count)."""

    def count() -> dict[int, int]:
        counts = {}
        for port in cluster.ports:
            with contextlib.closing(cluster.node(port).client()) as client:
                entries = client.client_list()
            counts[port] = sum(1 for e in entries if e.get("name") == name)
        return counts

    return await asyncio.to_thread(count)


@pytest.mark.parametrize("streams", [6, 120])
async def test_connections_per_master_stay_constant_in_the_number_of_streams(
    redis_cluster: RedisClusterService, prefix: str, streams: int
) -> None:
    masters = redis_cluster.master_ports()
    # The same number of streams on every master.
    ids: dict[int, list[str]] = {port: [] for port in masters}
    while any(len(found) < streams // len(masters) for found in ids.values()):
        stream_id = uuid.uuid4().hex
        found = ids[redis_cluster.owner(redis_cluster.slot_of("{" + stream_id + "}"))]
        if len(found) < streams // len(masters):
            found.append(stream_id)
    name = f"conns-{prefix}"
    async with from_url(f"{redis_cluster.url}?client_name={name}", prefix=prefix) as transport:
        stages = [Stages(40, 20) for _ in range(streams)]
        producer = StreamProducer(transport)
        chosen = [stream_id for found in ids.values() for stream_id in found]
        runs = [
            await producer.start(stage.source(), stream_id=stream_id)
            for stage, stream_id in zip(stages, chosen, strict=True)
        ]
        readers = [Reader(transport, run.stream_id) for run in runs]
        for reader in readers:
            await reader.reached(20)

        async def two_per_master() -> bool:
            # One pipelined command connection and one sharded pub/sub connection per
            # master, whatever the number of streams; none to replicas. (Polled: the
            # transport opens its connections to each master as it needs them.)
            counts = await _connections_per_node(redis_cluster, name)
            return all(
                counts[port] == (2 if port in masters else 0) for port in redis_cluster.ports
            )

        await eventually(two_per_master)
        for stage in stages:
            stage.release(20)
        for reader in readers:
            assert joined(await reader.result()) == text_of(40)


def replicated(sentinel: RedisSentinelService) -> None:
    """Wait until the replica holds everything the master has now (WAIT counts the writes
    of the client that sends it: write a marker first)."""
    with contextlib.closing(sentinel.master().client()) as client:
        client.set("replicated-marker", "1")
        assert client.execute_command("WAIT", 1, 10_000) == 1


# --- Sentinel ----------------------------------------------------------------------------------


@pytest.fixture
async def sentinel_transport(
    redis_sentinel: RedisSentinelService, prefix: str
) -> AsyncIterator[Transport]:
    async with from_url(redis_sentinel.url, prefix=prefix) as transport:
        yield transport


async def test_a_sentinel_url_reaches_the_master(
    redis_sentinel: RedisSentinelService, sentinel_transport: Transport, prefix: str
) -> None:
    run = await StreamProducer(sentinel_transport).start(Stages(20).source())
    assert joined(await collect(sentinel_transport, run.stream_id)) == text_of(20)
    with contextlib.closing(redis_sentinel.master().client()) as client:
        assert list(client.scan_iter(match=f"{prefix}:*"))


async def test_a_sentinel_managed_client_follows_the_master(
    redis_sentinel: RedisSentinelService, prefix: str
) -> None:
    from redis.asyncio.sentinel import Sentinel

    from resumable_stream.transports.redis import RedisTransport

    sentinel = Sentinel(redis_sentinel.sentinel_addresses)
    client = sentinel.master_for(redis_sentinel.service)
    try:
        async with RedisTransport(client, prefix=prefix) as transport:
            stages = Stages(N, N // 2)
            run = await StreamProducer(transport).start(stages.source())
            reader = Reader(transport, run.stream_id)
            await reader.reached(N // 2)
            await asyncio.to_thread(redis_sentinel.failover)
            stages.release(N // 2)
            assert_whole(await reader.result())
            assert await run.wait() == "completed"
    finally:
        await client.aclose()
        for node in sentinel.sentinels:
            await node.aclose()


async def test_a_hung_sentinel_listed_first_does_not_keep_the_transport_from_the_master(
    redis_sentinel: RedisSentinelService, prefix: str
) -> None:
    # Regression: a Sentinel that accepts connections but answers nothing (a frozen host)
    # takes socket_timeout to give up on as the master is looked up, and the connection's
    # watchdog, counting that time as the master's silence, dropped the connection first:
    # redis-py never got to ask the next Sentinel, and every command failed with "Redis did
    # not answer" for as long as that Sentinel hung, two healthy ones notwithstanding.
    hung = redis_sentinel.sentinels[0]  # the first one the URL lists
    hung.pause()
    try:
        url = f"{redis_sentinel.url}?socket_timeout=0.5"
        async with from_url(url, prefix=prefix) as transport:
            # (from_url gives the Sentinels no retries: the silent one costs one time-out.)
            async with asyncio.timeout(60):
                run = await StreamProducer(transport).start(Stages(20).source())
                assert joined(await collect(transport, run.stream_id)) == text_of(20)
    finally:
        hung.resume()


async def test_a_sentinel_failover_mid_stream_loses_nothing(
    redis_sentinel: RedisSentinelService, sentinel_transport: Transport
) -> None:
    stages = Stages(N, N // 2)
    run = await StreamProducer(sentinel_transport).start(stages.source())
    reader = Reader(sentinel_transport, run.stream_id)
    await reader.reached(N // 2)
    old = redis_sentinel.master_port()
    assert await asyncio.to_thread(redis_sentinel.failover) != old
    stages.release(N // 2)  # the producer writes to the new master, found through Sentinel
    assert_whole(await reader.result())
    assert await run.wait() == "completed"
    assert_whole(await collect(sentinel_transport, run.stream_id))
    # New runs need no reconfiguration either.
    again = await StreamProducer(sentinel_transport).start(Stages(20).source())
    assert joined(await collect(sentinel_transport, again.stream_id)) == text_of(20)


@contextlib.contextmanager
def demotion_held(sentinel: RedisSentinelService, port: int) -> Iterator[None]:
    """Keep the Sentinels from turning the server on ``port`` into a replica (they would at
    their next look, 0-10 s after a failover): REPLICAOF denied until the block ends."""
    with contextlib.closing(sentinel.server(port).client()) as client:
        client.execute_command("ACL", "SETUSER", "default", "-replicaof", "-slaveof")
        try:
            yield
        finally:
            client.execute_command("ACL", "SETUSER", "default", "+@all")


async def left_the_server(sentinel: RedisSentinelService, port: int, name: str) -> bool:
    """True once no connection named ``name`` is open on the server on ``port``."""

    def names() -> list[str]:
        with contextlib.closing(sentinel.server(port).client()) as client:
            return [entry.get("name", "") for entry in client.client_list()]

    return name not in await asyncio.to_thread(names)


@pytest.mark.parametrize("replicas", [0, 1])
async def test_writes_leave_the_old_master_of_a_planned_sentinel_failover(
    redis_sentinel: RedisSentinelService, prefix: str, replicas: int
) -> None:
    # Regression: after SENTINEL FAILOVER the old master takes writes until the Sentinels
    # demote it, up to 10 s later; the transport kept writing there, the demotion dropped
    # those writes, and a run that "completed" meanwhile had lost them. With replicas=1
    # its appends waited on the old master (no replica left) while its lease was renewed
    # there only, and the run was fenced as lost.
    name = f"planned-{prefix}"
    url = f"{redis_sentinel.url}?client_name={name}"
    old = redis_sentinel.master_port()
    async with (
        from_url(url, prefix=prefix, replicas=replicas) as transport,
        from_url(url, prefix=prefix) as elsewhere,  # a reader in another process
    ):
        stages = Stages(N, N // 2, 3 * N // 4)
        run = await StreamProducer(transport).start(stages.source())
        reader = Reader(elsewhere, run.stream_id)
        await reader.reached(N // 2)
        with demotion_held(redis_sentinel, old):
            new = await asyncio.to_thread(redis_sentinel.failover, demote=False)
            stages.release(N // 2)  # the old master takes writes
            await eventually(lambda: left_the_server(redis_sentinel, old, name))
        await asyncio.to_thread(redis_sentinel.demote, old, new)  # drops what only it took
        stages.release(3 * N // 4)
        assert await run.wait() == "completed"
        assert_whole(await reader.result())
        assert_whole(await collect(elsewhere, run.stream_id))


@pytest.mark.parametrize("replicas", [0, 1])
async def test_a_run_created_on_the_old_master_of_a_planned_failover_is_written_again(
    redis_sentinel: RedisSentinelService,
    prefix: str,
    replicas: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression: a run created in the second or so that the old master of a planned
    # failover still takes writes existed there only; the demotion dropped it whole, and its
    # next write on the new master found none of its keys: taken for deleted, the producer
    # was fenced (LeaseLost) and readers got producer_lost, although every entry was in its
    # window. (With replicas=1 the old master, left with no replica, holds the entries
    # unreadable: the run is written again from its first one all the same.)
    moving = asyncio.Event()  # the transport stays on the old master until set
    newest = redis_module._newest_master

    async def held(*args: Any) -> Any:
        await moving.wait()
        return await newest(*args)

    monkeypatch.setattr(redis_module, "_newest_master", held)
    name = f"lost-{prefix}"
    url = f"{redis_sentinel.url}?client_name={name}"
    old = redis_sentinel.master_port()
    async with from_url(url, prefix=prefix, replicas=replicas) as transport:
        await transport.info("warm-up")  # connected to the master: the watch runs
        stages = Stages(N, N // 2)
        with demotion_held(redis_sentinel, old):
            new = await asyncio.to_thread(redis_sentinel.failover, demote=False)
            run = await StreamProducer(transport).start(stages.source())  # on the old master
            field = "written" if replicas else "last"
            meta = f"{prefix}:{{{run.stream_id}}}:meta"

            async def written_there() -> bool:
                def last() -> int:
                    with contextlib.closing(redis_sentinel.server(old).client()) as client:
                        return int(client.hget(meta, field) or 0)

                return await asyncio.to_thread(last) >= 1

            await eventually(written_there)
            offset = None
            if not replicas:  # read there
                reader = StreamConsumer(transport, run.stream_id)
                offset = [await anext(reader) for _ in range(N // 2)][-1].offset
                await reader.aclose()
            moving.set()
            await eventually(lambda: left_the_server(redis_sentinel, old, name))
        await asyncio.to_thread(redis_sentinel.demote, old, new)  # drops the run whole
        stages.release(N // 2)
        assert await run.wait() == "completed"
        assert_whole(await collect(transport, run.stream_id))
        if offset is not None:
            rest = await collect(transport, run.stream_id, after=offset)
            assert joined(rest) == "".join(f"t{i} " for i in range(N // 2, N))
            assert [e.type for e in rest if e.terminal] == ["end"]


async def test_a_durable_append_cut_short_by_the_demotion_of_its_master_is_retried(
    redis_server_factory: Callable[..., RedisServer], prefix: str
) -> None:
    # Regression: a WAIT still waiting for replicas when its master is turned into a replica
    # (as Sentinel and Redis Cluster demote an old master) is answered UNBLOCKED; the
    # transport raised BackendRefused, which the producer never retries, and a durable run
    # failed in the middle of a failover.
    master, other = redis_server_factory(), redis_server_factory()
    # No replica yet: the WAIT waits out replica_timeout, unless cut short.
    url = f"{master.url}?socket_timeout=60"
    async with from_url(url, prefix=prefix, replicas=1, replica_timeout=30) as transport:
        info = await transport.create("s", "owner", 60_000)
        with contextlib.closing(master.client()) as client:
            client.script_load(scripts.HOLD)  # a NOSCRIPT reply would come before the WAIT's
        entry = Entry(info.epoch, 1, b'["t0 "]')
        append = asyncio.create_task(transport.append("s", "owner", entry, 1))

        async def waiting_for_replicas() -> bool:
            def blocked() -> int:
                with contextlib.closing(master.client()) as client:
                    return int(client.info("clients")["blocked_clients"])

            return await asyncio.to_thread(blocked) > 0

        await eventually(waiting_for_replicas)
        with contextlib.closing(master.client()) as client:
            client.execute_command("REPLICAOF", "127.0.0.1", other.port)
        with pytest.raises(TransportError) as caught:
            await append
        assert not isinstance(caught.value, BackendRefused), caught.value
        assert "UNBLOCKED" in str(caught.value)


async def test_a_durable_appends_wait_for_replicas_is_not_taken_for_a_silent_server(
    redis_server: RedisServer, prefix: str
) -> None:
    # Regression: the connection watchdog gave the server socket_timeout to answer, while a
    # WAIT holds its reply up to replica_timeout: with replica_timeout >= socket_timeout (5 s
    # by default in redis-py 8), every durable append that waited for a slow replica dropped
    # the connection all the process's streams share, as if Redis were gone.
    url = f"{redis_server.url}?socket_timeout=0.2"
    async with from_url(url, prefix=prefix, replicas=1, replica_timeout=0.6) as transport:
        info = await transport.create("s", "owner", 60_000)
        entry = Entry(info.epoch, 1, b'["t0 "]')
        with pytest.raises(TransportError) as caught:  # no replica: it waits, then says so
            await transport.append("s", "owner", entry, 1)
        assert "replicas in time" in str(caught.value), caught.value


async def test_a_failover_to_a_lagging_replica_has_no_silent_gap_duplicate_or_end(
    redis_sentinel: RedisSentinelService, sentinel_transport: Transport
) -> None:
    """Issue 8: asynchronous replication loses the last writes; without durable appends the
    producer writes them again from its window (or ends with storage_rollback), and a
    reader that had them resumes after them, never reading a gap, a repeat or a silent end."""
    stages = Stages(N, N // 3, 2 * N // 3)
    run = await StreamProducer(sentinel_transport).start(stages.source())
    old = redis_sentinel.master_port()

    async def failed_over() -> None:
        await asyncio.to_thread(redis_sentinel.wait_for_failover, old)

    caught_up = Reader(sentinel_transport, run.stream_id, resume_when=failed_over)
    await caught_up.reached(N // 3)
    await asyncio.to_thread(replicated, redis_sentinel)
    await asyncio.to_thread(redis_sentinel.pause_replication)
    stages.release(N // 3)
    # The reader sees the middle third: entries only the master has.
    await caught_up.reached(2 * N // 3)
    await asyncio.to_thread(redis_sentinel.fail_over_to_lagging_replica)
    stages.release(2 * N // 3)
    assert await run.wait() in ("completed", "error")
    assert_no_silent_loss(await caught_up.result(), caught_up.error)
    late = Reader(sentinel_transport, run.stream_id)
    assert_no_silent_loss(await late.result(), late.error)


def assert_no_silent_loss(events: list[Event], error: Exception | None, n: int = N) -> None:
    """No gap, no duplicate, no silent end: all of it, or a prefix then a typed error."""
    texts = [e.data["text"] for e in events if e.type == "token"]
    assert joined(events) == text_of(len(texts))  # a contiguous prefix, no repeat
    assert len({e.offset for e in events}) == len(events)
    terminals = [e for e in events if e.terminal]
    if error is not None:
        assert not terminals
        assert isinstance(error, OffsetExpired)
        assert str(error)  # says why
        return
    assert len(terminals) == 1 and events[-1] is terminals[0], events[-3:]
    if terminals[0].type == "end":
        assert len(texts) == n
    else:
        assert terminals[0].type == "error", terminals[0]
        assert terminals[0].data.get("error") == "storage_rollback", terminals[0].data


async def test_with_durable_appends_a_failover_to_a_lagging_replica_loses_nothing_read(
    redis_sentinel: RedisSentinelService, prefix: str
) -> None:
    async with from_url(redis_sentinel.url, prefix=prefix, replicas=1) as transport:
        stages = Stages(N, N // 3, 2 * N // 3)
        # The producer's write-retry budget (its lease, on today's producer) must outlast
        # the failover: a few seconds with down-after-milliseconds 2000.
        run = await StreamProducer(transport, lease=30).start(stages.source())
        reader = Reader(transport, run.stream_id)
        await reader.reached(N // 3)
        events_key = f"{prefix}:{{{run.stream_id}}}:events"
        master = redis_sentinel.master()

        def stored() -> int:
            with contextlib.closing(master.client()) as client:
                return int(client.xlen(events_key))

        before = await asyncio.to_thread(stored)
        await asyncio.to_thread(redis_sentinel.pause_replication)
        stages.release(N // 3)

        async def stored_on_the_master_only() -> bool:
            return await asyncio.to_thread(stored) > before

        await eventually(stored_on_the_master_only)
        # Stored, but no replica has it: no reader may see it.
        assert reader.tokens == N // 3
        await asyncio.to_thread(redis_sentinel.fail_over_to_lagging_replica)
        # The new master needs a replica to acknowledge writes: the old one comes back as it.
        await asyncio.to_thread(redis_sentinel.heal)
        stages.release(2 * N // 3)
        assert_whole(await reader.result())
        assert await run.wait() == "completed"
        assert_whole(await collect(transport, run.stream_id))


async def test_a_killed_master_mid_stream_the_producer_survives(
    redis_sentinel: RedisSentinelService, sentinel_transport: Transport
) -> None:
    stages = Stages(N, N // 2, N // 2 + 10)
    run = await StreamProducer(sentinel_transport).start(stages.source())
    old = redis_sentinel.master_port()

    async def failed_over() -> None:
        await asyncio.to_thread(redis_sentinel.wait_for_failover, old)

    reader = Reader(sentinel_transport, run.stream_id, resume_when=failed_over)
    await reader.reached(N // 2)
    await asyncio.to_thread(replicated, redis_sentinel)
    redis_sentinel.kill_master()
    stages.release(N // 2)  # these writes are retried until the failover is over
    await failed_over()
    stages.release(N // 2 + 10)
    assert_whole(await reader.result())
    assert await run.wait() == "completed"
    assert_whole(await collect(sentinel_transport, run.stream_id))
