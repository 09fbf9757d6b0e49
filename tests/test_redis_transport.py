"""The Redis transport's own behaviour on a real redis-server: the APPEND script's
contiguity, error classification, the connection layer and live notices."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.credentials import UsernamePasswordCredentialProvider

from resumable_stream import (
    BackendRefused,
    ConfigurationError,
    Event,
    StorageRollback,
    StreamConsumer,
    StreamProducer,
    TransportClosed,
    TransportError,
    _recent,
    from_url,
)
from resumable_stream._constants import MAX_DURATION
from resumable_stream.transports import Entry
from resumable_stream.transports import redis as redis_transport_module
from resumable_stream.transports._redis_pipe import (
    RECONNECT_DELAY,
    REFUSED_DELAY_MAX,
    fault,
    refused_delay,
    to_the_end,
)
from resumable_stream.transports._redis_scripts import NOTICE_PAYLOAD_MAX
from resumable_stream.transports.redis import DEFAULT_WRITE_RETRY_BUDGET, RedisTransport
from tests._helpers import collect, eventually, holds, joined, text_of, tokens
from tests._services import RedisClusterService, RedisSentinelService, RedisServer
from tests.conftest import TlsRedis


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


async def test_an_append_while_the_transport_closes_is_refused_and_not_sent(
    redis_url: str,
) -> None:
    """An append's fast path (one server, no _execute()) refuses once aclose() began, before
    the connections are down, and writes nothing."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    transport = RedisTransport.from_url(redis_url, prefix=prefix)
    info = await transport.create("s", owner="o", lease_ms=5000)
    await transport.append("s", "o", Entry(info.epoch, 1, b"[1]"), 1)
    closing = asyncio.create_task(transport.aclose())
    await asyncio.sleep(0)  # aclose() has begun and waits on its connections
    assert transport._closed and not closing.done()
    with pytest.raises(TransportClosed):
        await transport.append("s", "o", Entry(info.epoch, 2, b"[2]"), 1)
    await closing
    async with RedisTransport.from_url(redis_url, prefix=prefix) as other:
        stored = await other.info("s")
        assert stored is not None and stored.last_seq == 1


async def test_a_run_whose_transport_is_closed_under_it_ends_at_once(redis_url: str) -> None:
    # Regression: its writes were retried as transient faults for the whole write-retry
    # budget (30 s on Redis) before the run ended.
    transport = RedisTransport.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}")
    gate = asyncio.Event()
    run = await StreamProducer(transport).start(tokens(100, every=10, pause=gate))
    await eventually(lambda: _stored(transport, run.stream_id))
    await transport.aclose()
    gate.set()
    with pytest.raises(TransportClosed):
        await asyncio.wait_for(run.wait(), timeout=DEFAULT_WRITE_RETRY_BUDGET / 3)


async def test_a_run_whose_source_is_idle_ends_when_its_transport_is_closed(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: with the source waiting (a model thinking), nothing of the run was
    # written after aclose(): its heartbeat took TransportClosed for a transient fault and
    # logged it every third of a lease, and run.wait() waited until the source yielded again,
    # maybe for ever.
    transport = RedisTransport.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}")
    gate = asyncio.Event()  # never set: the source stays idle
    run = await StreamProducer(transport, lease=0.3).start(tokens(10, pause=gate))
    await eventually(lambda: _stored(transport, run.stream_id))
    await transport.aclose()
    with pytest.raises(TransportClosed):
        await asyncio.wait_for(run.wait(), timeout=10)  # a heartbeat is every 0.1 s
    assert "heartbeat failed" not in caplog.text


async def test_a_close_cut_short_still_closes_every_connection(redis_url: str) -> None:
    # Regression: aclose() cancelled while it stopped the notices connection (a shutdown
    # under a timeout) left the command connection open for good; a second aclose() did
    # nothing, the transport being closed already.
    transport = RedisTransport.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}")
    node = transport._node_for_slot(0)
    subscription = transport.subscribe("s", 1, 0)
    assert await transport.info("s") is None
    await eventually(holds(lambda: node.subscriber.connected and node.pipe.connected))
    closing = asyncio.create_task(transport.aclose())
    await asyncio.sleep(0)  # aclose() waits for the notices connection to stop
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert not node.pipe.connected and all(task.done() for task in node.pipe._tasks)
    subscription.close()


async def _stored(transport: RedisTransport, stream_id: str) -> bool:
    info = await transport.info(stream_id)
    return info is not None and info.last_seq > 0


# -- configuration --------------------------------------------------------------------


def test_a_client_it_cannot_use_is_refused_when_the_transport_is_built() -> None:
    import redis

    sync_client = redis.Redis()
    with pytest.raises(ConfigurationError, match=r"redis\.asyncio\.Redis or RedisCluster"):
        RedisTransport(sync_client)  # type: ignore[arg-type]
    sync_client.close()
    replica = aioredis.Sentinel([("127.0.0.1", 1)]).slave_for("m")  # type: ignore[no-untyped-call]
    with pytest.raises(ConfigurationError, match="master_for"):
        RedisTransport(replica)


@pytest.mark.parametrize(
    "url",
    [
        "rediss://127.0.0.1:1/0?ssl_cert_reqs=sometimes",  # redis-py's own option check
        "redis://127.0.0.1:1/0?protocol=4",
        "redis+cluster://127.0.0.1",  # no port
        "redis+cluster://127.0.0.1:7000/3",  # a cluster has only db 0
        "redis+sentinel://127.0.0.1:26379",  # no service name
        "redis+sentinel://127.0.0.1:26379/m/x",  # db not a number
        "redis+queue://127.0.0.1:6379",
    ],
)
def test_a_bad_url_raises_configuration_error_not_a_redis_py_error(url: str) -> None:
    with pytest.raises(ConfigurationError):
        from_url(url)


@pytest.mark.parametrize("option", ["retention", "tombstone", "running_ttl", "replica_timeout"])
def test_a_duration_past_what_redis_takes_raises_configuration_error(option: str) -> None:
    # Regression: 1e17 seconds passed the checks, and Redis then refused the stream's
    # PEXPIRE (or WAIT) in milliseconds: runs failed to start, or to write their end.
    with pytest.raises(ConfigurationError, match=rf"{option} must be .* at most 1e\+12"):
        from_url("redis://127.0.0.1:1/0", **{option: 1e17})
    if option != "replica_timeout":  # the memory transport takes the same bounds
        with pytest.raises(ConfigurationError, match=rf"{option} must be .* at most 1e\+12"):
            from_url("memory://", **{option: 1e17})


async def test_the_longest_durations_accepted_work_on_redis(redis_url: str) -> None:
    longest = MAX_DURATION
    async with from_url(
        redis_url,
        prefix=f"t{uuid.uuid4().hex[:12]}",
        retention=longest,
        tombstone=longest,
        running_ttl=longest,
    ) as transport:
        with pytest.raises(ConfigurationError, match=r"lease must be .* at most 1e\+12"):
            StreamProducer(transport, lease=longest * 10)
        async with StreamProducer(transport, lease=longest) as producer:
            with pytest.raises(ConfigurationError, match=r"start_timeout .* at most 1e\+12"):
                await producer.reserve("late", start_timeout=longest * 10)
            reservation = await producer.reserve("queued", start_timeout=longest)
            run = await producer.start(tokens(3), reservation=reservation)
            assert await run.wait() == "completed"
            events = await collect(transport, "queued")
        assert await transport.info("late") is None  # checked before it was made
    assert joined(events) == text_of(3)


def test_schemes_build_the_matching_redis_py_client() -> None:
    cluster = from_url("redis+cluster://127.0.0.1:7000,127.0.0.1:7001?socket_timeout=3")
    assert isinstance(cluster, RedisTransport) and isinstance(cluster.client, RedisCluster)
    assert {n.port for n in cluster.client.nodes_manager.startup_nodes.values()} == {7000, 7001}
    sentinel = from_url("redis+sentinel://u:pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/2")
    assert isinstance(sentinel, RedisTransport) and isinstance(sentinel.client, aioredis.Redis)
    pool = sentinel.client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "pw"
    assert sentinel.write_retry_budget == DEFAULT_WRITE_RETRY_BUDGET
    # The Sentinels: the URL's socket options, also beside their own credentials, and no
    # retries (a look-up that finds one silent asks the next at once; redis-py's default
    # retry kept it on the silent one about eleven times its socket_timeout).
    url = "redis+sentinel://h1:26379,h2:26380/m?socket_timeout=2&sentinel_password=sp"
    for sentinels in (
        pool.sentinel_manager.sentinels,
        from_url(url).client.connection_pool.sentinel_manager.sentinels,
    ):
        for client in sentinels:
            assert client.connection_pool.connection_kwargs["retry"].get_retries() == 0
    for client in from_url(url).client.connection_pool.sentinel_manager.sentinels:
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["password"]) == (2.0, "sp")


# -- connections go through redis-py -------------------------------------------------


async def _client_names(admin: aioredis.Redis) -> list[str]:
    return [c["name"] for c in await admin.client_list()]


async def test_what_the_users_client_configures_is_honoured(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """ACL user through a credential provider, RESP3, db and client name, as configured."""
    server = redis_server_factory()
    admin = aioredis.Redis(port=server.port)
    await admin.execute_command("ACL", "SETUSER", "streams", "on", ">s3cret", "~*", "&*", "+@all")
    await admin.execute_command("ACL", "SETUSER", "default", "off")
    admin_auth = aioredis.Redis(port=server.port, username="streams", password="s3cret")
    client = aioredis.Redis(
        port=server.port,
        db=3,
        protocol=3,
        client_name="my-app",
        credential_provider=UsernamePasswordCredentialProvider("streams", "s3cret"),
    )
    async with RedisTransport(client, prefix="p") as transport:
        run = await StreamProducer(transport).start(tokens(30))
        assert joined(await collect(transport, run.stream_id)) == text_of(30)
        clients = await admin_auth.client_list()
        ours = [c for c in clients if c["name"] == "my-app"]
        assert len(ours) == 2  # commands and notices
        assert all(c["user"] == "streams" and c["db"] == "3" and c["resp"] == "3" for c in ours)
    assert await admin_auth.execute_command("DBSIZE") == 0  # db 0 untouched
    await admin_auth.select(3)  # type: ignore[attr-defined]
    for closing in (client, admin, admin_auth):
        await closing.aclose()


async def test_tls_with_the_test_ca(redis_tls: TlsRedis) -> None:
    for _ in range(10):
        prefix = f"t{uuid.uuid4().hex[:12]}"
        async with from_url(redis_tls.url, prefix=prefix) as transport:
            run = await StreamProducer(transport).start(tokens(30))
            assert joined(await collect(transport, run.stream_id)) == text_of(30)  # live
        # Regression (issue 8): a TLS connection could still be closing (close_notify
        # sent, the answer not read) when aclose() returned; a loop closed then leaked
        # its socket ("unclosed" ResourceWarning).
        assert redis_tls.open_connections() == []


async def test_tls_with_a_refused_certificate(redis_tls: TlsRedis) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    untrusted = f"rediss://127.0.0.1:{redis_tls.server.port}/0"  # no CA: unknown certificate
    async with from_url(untrusted, prefix=prefix) as transport:
        with pytest.raises(TransportError, match="certificate verify failed"):
            await transport.info("any")


def test_a_prefix_that_would_move_the_hash_tag_is_refused() -> None:
    for prefix in ("", "app{1}", "a}b"):
        with pytest.raises(ConfigurationError, match="prefix"):
            RedisTransport(aioredis.Redis(), prefix=prefix)


async def test_a_cluster_node_behind_a_single_server_url_says_what_to_use(
    redis_cluster: RedisClusterService,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    ports = redis_cluster.master_ports()
    elsewhere = next(
        f"s{i}"  # a stream whose slot this node does not serve
        for i in range(100)
        if redis_cluster.owner(redis_cluster.slot_of(f"{prefix}:{{s{i}}}:meta")) != ports[0]
    )
    async with from_url(f"redis://127.0.0.1:{ports[0]}/0", prefix=prefix) as transport:
        with pytest.raises(BackendRefused, match=r"redis\+cluster://"):
            await transport.info(elsewhere)


async def test_a_wrong_password_is_a_refusal_not_a_transient_fault(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    admin = aioredis.Redis(port=server.port)
    await admin.config_set("requirepass", "right")
    await admin.aclose()
    async with from_url(f"redis://:wrong@127.0.0.1:{server.port}/0") as transport:
        with pytest.raises(BackendRefused, match="connection set-up"):
            await transport.info("any")


async def test_cancelled_callers_leave_the_connection_in_step(transport: RedisTransport) -> None:
    for i in range(40):
        info = await transport.create(f"s{i}", owner="o", lease_ms=60_000)
        await transport.append(f"s{i}", "o", Entry(info.epoch, 1, b"[%d]" % i), 1)

    async def read(i: int) -> tuple[int, bytes]:
        info = await transport.info(f"s{i}")
        assert info is not None
        entries = await transport.read(f"s{i}", info.epoch, 0, 10)
        return i, entries[0].payload

    for _ in range(5):
        tasks = [asyncio.create_task(read(i)) for i in range(40)]
        await asyncio.sleep(0)  # one turn: every task has queued its first command
        for task in tasks[::2]:
            task.cancel()  # their replies are still owed and must be skipped
        results = await asyncio.gather(*tasks[1::2])
        assert results == [(i, b"[%d]" % i) for i in range(1, 40, 2)]
    assert transport._node_for_slot(0).pipe.connects == 1  # never resynchronised


# -- error classification (issue 9) ---------------------------------------------------


async def test_a_refusal_is_not_retried_and_is_typed(
    transport: RedisTransport, redis_url: str
) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    await admin.set(transport._key("typed", "meta"), "a string, not a hash")
    with pytest.raises(BackendRefused, match="WRONGTYPE"):
        await transport.info("typed")
    with pytest.raises(BackendRefused, match="WRONGTYPE"):
        await transport.create("typed", owner="o", lease_ms=1000)
    await admin.aclose()


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        (rex.OutOfMemoryError("command not allowed", status_code="OOM"), True),
        (rex.ResponseError("WRONGTYPE Operation against a key"), True),
        (rex.NoPermissionError("no permissions", status_code="NOPERM"), True),
        (rex.AuthenticationError("Authentication required.", status_code="NOAUTH"), True),
        (rex.ResponseError("ERR unknown command"), True),
        (rex.ReadOnlyError("You can't write against a replica", status_code="READONLY"), False),
        (rex.BusyLoadingError("Redis is loading", status_code="LOADING"), False),
        (rex.ResponseError("MASTERDOWN Link with MASTER is down"), False),
        (
            rex.TryAgainError("Multiple keys request during rehashing", status_code="TRYAGAIN"),
            False,
        ),
        (rex.ClusterDownError("The cluster is down", status_code="CLUSTERDOWN"), False),
        (rex.ConnectionError("Connection reset by peer"), False),
        (rex.ConnectionError("max number of clients reached", status_code="ERR"), False),
        (rex.TimeoutError("Timeout reading"), False),
        (ConnectionResetError(104, "reset"), False),
    ],
)
def test_errors_are_classified_as_refused_or_transient(error: Exception, refused: bool) -> None:
    mapped = fault(error, "the command")
    assert isinstance(mapped, TransportError)
    assert isinstance(mapped, BackendRefused) is refused
    code = getattr(error, "status_code", None)
    if code:
        assert str(mapped).startswith(f"Redis {'refused' if refused else 'is not ready for'}")
        assert code in str(mapped)


async def test_a_missing_permission_is_a_refusal(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    admin = aioredis.Redis(port=server.port)
    await admin.execute_command(
        "ACL", "SETUSER", "reader", "on", ">pw", "~*", "&*", "+@read", "+@connection"
    )
    async with from_url(f"redis://reader:pw@127.0.0.1:{server.port}/0") as transport:
        assert await transport.info("nothing") is None  # reading is allowed
        with pytest.raises(BackendRefused, match="NOPERM"):
            await transport.create("s", owner="o", lease_ms=1000)
    await admin.aclose()


async def test_a_user_that_may_not_publish_is_refused_before_anything_is_written(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """A user without the channels (Redis 7 gives none by default: acl-pubsub-default
    resetchannels) failed at the scripts' SPUBLISH, after their writes: the append was
    stored, its retry answered "already stored", and the run completed, every error
    swallowed and no notice ever published. Refused before writing now: a run when it
    starts, a cancel or a delete when asked."""
    server = redis_server_factory()
    admin = aioredis.Redis(port=server.port)
    await admin.execute_command("ACL", "SETUSER", "nochan", "on", ">pw", "~*", "+@all")
    url = f"redis://nochan:pw@127.0.0.1:{server.port}/0"
    async with from_url(url, prefix="p") as transport:
        with pytest.raises(BackendRefused, match=r"NOPERM.*p:\{s\}:n"):
            await StreamProducer(transport).start(tokens(3), stream_id="s")
        assert await transport.info("s") is None  # the run's start wrote nothing
        await admin.hset("p:{s}:meta", mapping={"status": "running", "epoch": "1"})
        await admin.expire("p:{s}:meta", 60)
        with pytest.raises(BackendRefused, match=r"NOPERM.*p:\{s\}:c"):
            await transport.request_cancel("s")
        with pytest.raises(BackendRefused, match=r"NOPERM.*p:\{s\}:n"):
            await transport.delete("s")
        assert await admin.hget("p:{s}:meta", "cancel") is None  # nothing written
        assert await admin.exists("p:{s}:meta") == 1
    await admin.aclose()


@pytest.mark.parametrize("refusal", ["noperm", "oom"])
async def test_a_script_refused_names_the_script_and_its_command(
    redis_server_factory: Callable[..., RedisServer], refusal: str
) -> None:
    """A command a script calls refused (the user may not run it, or Redis is out of
    memory): Redis names only the script's SHA1 and line ("The user executing the script
    can't run this command or subcommand script: 526f..., on @user_script:12"), so the
    error named neither the script nor what to grant. It names both now."""
    server = redis_server_factory()
    admin = aioredis.Redis(port=server.port)
    await admin.execute_command("ACL", "SETUSER", "w", "on", ">pw", "~*", "&*", "+@all")
    async with from_url(f"redis://w:pw@127.0.0.1:{server.port}/0", prefix="p") as transport:
        info = await transport.create("s", owner="o", lease_ms=60_000)
        if refusal == "noperm":
            await admin.execute_command("ACL", "SETUSER", "w", "-xadd")
        else:
            await admin.config_set("maxmemory", 1)
        with pytest.raises(BackendRefused, match=r"the append script's XADD \(line \d+\)"):
            await transport.append("s", "o", Entry(info.epoch, 1, b'["a"]'), 1)
    await admin.config_set("maxmemory", 0)
    await admin.aclose()


async def test_no_run_starts_while_redis_is_out_of_memory(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """Redis out of memory (maxmemory with noeviction, its default) refuses a script's first
    write when it may use memory, and lets the rest through once it has written. The
    create script's first write was a DEL: the run was made, its producer started, and
    every write of the run was refused, its readers waiting on a run that could never end.
    The start is refused now, with nothing written."""
    server = redis_server_factory()
    admin = aioredis.Redis(port=server.port)
    async with from_url(f"redis://127.0.0.1:{server.port}/0", prefix="p") as transport:
        await admin.config_set("maxmemory", 1)
        try:
            with pytest.raises(BackendRefused, match=r"the create script's SET .*OOM"):
                await StreamProducer(transport).start(tokens(3), stream_id="s")
            assert await transport.info("s") is None
            assert await admin.keys("p:*") == []
        finally:
            await admin.config_set("maxmemory", 0)
        run = await StreamProducer(transport).start(tokens(3), stream_id="s")
        await run.wait()
        assert joined(await collect(transport, "s")) == text_of(3)
    await admin.aclose()


async def _a_then_b(gate: asyncio.Event) -> AsyncIterator[str]:
    """Tokens "a", then "b" once ``gate`` is set."""
    yield "a"
    await gate.wait()
    yield "b"


async def test_a_notices_connection_refused_at_set_up_says_so(
    redis_server_factory: Callable[..., RedisServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The password changed under a live reader and its notices connection was dropped:
    reconnecting is refused (NOAUTH), and the error told the operator to grant SSUBSCRIBE
    and the channels, which the user has. It names the connection set-up now."""
    server = redis_server_factory()
    admin = aioredis.Redis(port=server.port)
    gate = asyncio.Event()
    caplog.set_level("DEBUG", logger="resumable_stream.redis")
    async with from_url(server.url) as writer, from_url(server.url) as reader:
        run = await StreamProducer(writer, lease=1.0).start(_a_then_b(gate), stream_id="s")
        async with StreamConsumer(reader, "s") as consumer:
            assert (await anext(consumer)).data["text"] == "a"  # live: subscribed
            await admin.config_set("requirepass", "new")
            await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")

            async def refused() -> bool:
                return any(r.levelname == "ERROR" for r in caplog.records)

            await eventually(refused)
            await admin.execute_command("AUTH", "new")
            await admin.config_set("requirepass", "")
            gate.set()
            assert [e.type async for e in consumer] == ["token", "end"]
        assert await run.wait() == "completed"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors  # (the writer's notices connection, which watches for cancels, too)
    for error in errors:
        assert "NOAUTH" in error and "set-up" in error and "SSUBSCRIBE" not in error, error
    await admin.aclose()


async def test_a_reader_that_may_not_subscribe_is_told_once_and_still_reads(
    redis_server_factory: Callable[..., RedisServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A user without SSUBSCRIBE: the notices connection was refused, logged a warning and
    reconnected (a new connection and AUTH) every half second for as long as anyone read.
    Now one error says what to grant, the retries back off, and readers still get every
    event (they read the stream again every half lease instead of being woken)."""
    server = redis_server_factory()
    admin = aioredis.Redis(port=server.port)
    await admin.execute_command(
        "ACL", "SETUSER", "nosub", "on", ">pw", "~*", "&*", "+@all", "-ssubscribe"
    )
    gate = asyncio.Event()
    caplog.set_level("DEBUG", logger="resumable_stream.redis")
    async with (
        from_url(server.url, prefix="p") as writer,
        from_url(f"redis://nosub:pw@127.0.0.1:{server.port}/0", prefix="p") as reader,
    ):
        run = await StreamProducer(writer, lease=1.0).start(_a_then_b(gate), stream_id="s")
        texts: list[str] = []
        async with StreamConsumer(reader, "s") as consumer:
            async for event in consumer:
                if event.type == "token":
                    texts.append(event.data["text"])
                    gate.set()  # "b" comes while the reader waits live
        assert texts == ["a", "b"] and await run.wait() == "completed"
        refused = [r for r in caplog.records if "SSUBSCRIBE" in r.getMessage()]
        assert len(refused) == 1 and refused[0].levelname == "ERROR", refused
        assert not [r for r in caplog.records if "reconnecting" in r.getMessage()]
    assert refused_delay(1) > RECONNECT_DELAY and refused_delay(40) == REFUSED_DELAY_MAX
    await admin.aclose()


async def test_readonly_is_transient_and_drops_the_connection(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """A demoted master answers READONLY: a fault a retry fixes, on a new connection."""
    primary, demoted = redis_server_factory(), redis_server_factory()
    admin = aioredis.Redis(port=demoted.port)
    async with RedisTransport.from_url(demoted.url) as transport:
        assert await transport.info("s") is None
        await admin.execute_command("REPLICAOF", "127.0.0.1", primary.port)
        with pytest.raises(TransportError) as caught:
            await transport.create("s", owner="o", lease_ms=1000)
        assert not isinstance(caught.value, BackendRefused)
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        await transport.create("s", owner="o", lease_ms=1000)  # the retry works
        assert transport._node_for_slot(0).pipe.connects == 2  # reconnected after READONLY
    await admin.aclose()


# -- live delivery: notify, then fetch -------------------------------------------------


@pytest.mark.parametrize(
    ("size", "most_xranges"),
    [(100, 0), (NOTICE_PAYLOAD_MAX + 1, 50)],
    ids=["carried-by-the-notice", "too-large-fetched"],
)
async def test_live_entries_come_with_their_notice_or_a_coalesced_fetch(
    transport: RedisTransport, redis_url: str, size: int, most_xranges: int
) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    info = await transport.create("burst", owner="o", lease_ms=60_000)
    subscription = transport.subscribe("burst", info.epoch, 0)
    channel = transport._key("burst", "n").encode()

    async def subscribed() -> bool:
        return channel in transport._node_for_slot(0).subscriber.confirmed

    await eventually(subscribed)
    await admin.config_resetstat()
    payloads = [b"%d:" % seq + b"x" * (size - len(b"%d:" % seq)) for seq in range(1, 201)]
    await asyncio.gather(
        *(
            transport.append("burst", "o", Entry(info.epoch, seq, payload), 1)
            for seq, payload in enumerate(payloads, start=1)
        )
    )
    received: list[Entry] = []
    while len(received) < 200:
        received += await subscription.get(5.0)
    assert [(e.seq, e.payload) for e in received] == list(enumerate(payloads, start=1))
    stats = await admin.info("commandstats")
    # Entries within NOTICE_PAYLOAD_MAX need no read; larger ones are fetched, one
    # XRANGE per burst of notices rather than one per entry.
    assert stats.get("cmdstat_xrange", {"calls": 0})["calls"] <= most_xranges, stats
    subscription.close()
    await admin.aclose()


async def test_a_deleted_stream_wakes_its_readers_in_another_process(
    transport: RedisTransport, redis_url: str
) -> None:
    async with RedisTransport.from_url(redis_url, prefix=transport.prefix) as other:
        info = await transport.create("gone", owner="o", lease_ms=60_000)
        subscription = transport.subscribe("gone", info.epoch, 0)
        channel = transport._key("gone", "n").encode()

        async def subscribed() -> bool:
            return channel in transport._node_for_slot(0).subscriber.confirmed

        await eventually(subscribed)
        waiting = asyncio.create_task(subscription.get(30.0))
        assert await other.delete("gone")
        assert await asyncio.wait_for(waiting, timeout=5) == []  # woken, not timed out
        assert await transport.info("gone") is None


# -- Redis Cluster: routing by slot, redirects, connections per master -----------------


def _phased(phases: list[asyncio.Event], per_phase: int) -> AsyncIterator[str]:
    async def source() -> AsyncIterator[str]:
        n = 0
        for phase in phases:
            await phase.wait()
            for _ in range(per_phase):
                yield f"t{n} "
                n += 1

    return source()


# replicas=1: durable appends (HOLD + WAIT, then RELEASE). Regression (issue 8): while the
# slot was migrating, the HOLD + WAIT pair went back to the old owner after each ASK until
# the redirect budget ran out, and the run failed.
@pytest.mark.parametrize("replicas", [0, 1])
async def test_a_slot_migrated_mid_stream_loses_nothing(
    redis_cluster: RedisClusterService, replicas: int
) -> None:
    """Keys moved while the slot is MIGRATING (writes and reads follow ASK), then the slot
    given to the target (MOVED; the live subscription moves too): no gap, no duplicate."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    phases = [asyncio.Event() for _ in range(3)]
    # A timeout generous for a loaded machine (a missed WAIT is retried, not lost).
    durability: dict[str, Any] = {"replicas": replicas, "replica_timeout": 5.0}
    async with (
        from_url(redis_cluster.url, prefix=prefix, **durability) as producing,
        from_url(redis_cluster.url, prefix=prefix, **durability) as reading,
    ):
        run = await StreamProducer(producing).start(_phased(phases, 20), stream_id="mig")
        received: list[Event] = []

        async def read() -> None:
            async for event in StreamConsumer(reading, "mig"):
                received.append(event)

        reader = asyncio.create_task(read())

        def has(n: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return joined(received) == text_of(n)

            return check

        slot = redis_cluster.slot_of(f"{prefix}:{{mig}}:meta")
        source = redis_cluster.owner(slot)
        target = next(port for port in redis_cluster.master_ports() if port != source)
        phases[0].set()
        await eventually(has(20))
        migration = redis_cluster.migrating_slot(slot, target)
        assert migration.move_keys() >= 2  # meta and events now on the target: ASK
        phases[1].set()
        await eventually(has(40))
        migration.finish()  # the target owns the slot: MOVED
        channel = reading._key("mig", "n").encode()  # type: ignore[attr-defined]

        async def followed_on_the_target() -> bool:
            node = reading._channel_node.get(channel)  # type: ignore[attr-defined]
            return (
                node is not None
                and node.name.endswith(f":{target}")
                and channel in node.subscriber.confirmed
            )

        await eventually(followed_on_the_target)  # Redis dropped it from the old owner
        phases[2].set()
        assert await run.wait() == "completed"
        await asyncio.wait_for(reader, timeout=30)
        assert joined(received) == text_of(60)
        assert received[-1].type == "end"
        assert await collect(reading, "mig") == received  # storage agrees, once each
        assert redis_cluster.owner(slot) == target
        # Followed ASK while migrating; afterwards the slot map came either from a MOVED or
        # from the refresh that re-placed the run's cancel subscription.
        assert producing.redirects["ASK"] > 0  # type: ignore[attr-defined]


async def test_moved_updates_the_slot_map_and_resends(
    redis_cluster: RedisClusterService,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    async with RedisTransport.from_url(redis_cluster.url, prefix=prefix) as transport:
        info = await transport.create("mv", owner="o", lease_ms=60_000)
        await transport.append("mv", "o", Entry(info.epoch, 1, b"[1]"), 1)
        slot = redis_cluster.slot_of(f"{prefix}:{{mv}}:meta")
        target = next(p for p in redis_cluster.master_ports() if p != redis_cluster.owner(slot))
        await asyncio.to_thread(redis_cluster.migrate_slot, slot, target)
        await transport.append("mv", "o", Entry(info.epoch, 2, b"[2]"), 1)
        assert transport.redirects["MOVED"] == 1  # then the slot map knew the new owner
        entries = await transport.read("mv", info.epoch, 0, 10)
        assert [(e.seq, e.payload) for e in entries] == [(1, b"[1]"), (2, b"[2]")]
        assert transport.redirects["MOVED"] == 1


async def test_a_cluster_failover_mid_stream_loses_nothing(
    redis_cluster: RedisClusterService,
) -> None:
    """The stream's master hands over to its replica (CLUSTER FAILOVER) while a reader
    follows it live from another transport: writes follow MOVED (the old master, now a
    replica, still relays the shard channel) and the reader gets every token once."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    phases = [asyncio.Event() for _ in range(2)]
    async with (
        from_url(redis_cluster.url, prefix=prefix) as producing,
        from_url(redis_cluster.url, prefix=prefix) as reading,
    ):
        run = await StreamProducer(producing).start(_phased(phases, 30), stream_id="fo")
        received: list[Event] = []

        async def read() -> None:
            async for event in StreamConsumer(reading, "fo"):
                received.append(event)

        reader = asyncio.create_task(read())
        phases[0].set()

        async def first_half() -> bool:
            return joined(received) == text_of(30)

        await eventually(first_half)
        slot = redis_cluster.slot_of(f"{prefix}:{{fo}}:meta")
        old = redis_cluster.owner(slot)
        new = await asyncio.to_thread(redis_cluster.failover, old)
        assert redis_cluster.owner(slot) == new != old
        phases[1].set()
        assert await asyncio.wait_for(run.wait(), timeout=60) == "completed"
        await asyncio.wait_for(reader, timeout=60)
        assert joined(received) == text_of(60) and received[-1].type == "end"
        assert await collect(reading, "fo") == received


async def test_a_killed_master_is_replaced_and_its_streams_followed_on_the_new_one(
    redis_cluster: RedisClusterService,
) -> None:
    """The master of a followed stream dies: writes fail as transient faults until its
    replica takes over, then go to it; the live subscription moves there by itself."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    async with RedisTransport.from_url(redis_cluster.url, prefix=prefix) as transport:
        info = await transport.create("dead", owner="o", lease_ms=600_000)
        await transport.append("dead", "o", Entry(info.epoch, 1, b"[1]"), 1)
        subscription = transport.subscribe("dead", info.epoch, 1)
        channel = transport._key("dead", "n").encode()
        slot = redis_cluster.slot_of(f"{prefix}:{{dead}}:meta")
        old = redis_cluster.owner(slot)
        replica = redis_cluster.replica_of(old)

        async def followed_on(port: int) -> bool:
            node = transport._channel_node.get(channel)
            return (
                node is not None
                and node.name.endswith(f":{port}")
                and channel in node.subscriber.confirmed
            )

        await eventually(lambda: followed_on(old))
        with contextlib.closing(redis_cluster.node(old).client()) as client:
            assert client.execute_command("WAIT", 1, 5000) == 1  # the replica has entry 1
        redis_cluster.kill(old)

        async def appended() -> bool:
            try:
                await transport.append("dead", "o", Entry(info.epoch, 2, b"[2]"), 1)
            except BackendRefused:
                raise  # a dead node is never a refusal
            except TransportError:
                return False  # what the producer retries within its write-retry budget
            return True

        await eventually(appended, within=60)
        assert redis_cluster.owner(slot) == replica
        await eventually(lambda: followed_on(replica))
        await transport.append("dead", "o", Entry(info.epoch, 3, b"[3]"), 1)
        received: list[int] = []
        while 3 not in received:
            received += [entry.seq for entry in await subscription.get(10.0)]
        assert received[-1] == 3 and sorted(set(received)) == [s for s in (2, 3) if s in received]
        subscription.close()


async def test_a_process_that_only_reads_follows_a_killed_master_to_its_replica(
    redis_cluster: RedisClusterService,
) -> None:
    """A transport whose command to a killed master failed read the slot map once, before
    the replica took over, and kept it until another command failed: a reader attached
    after the failover failed at once. It reads the map again until the failover shows."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    async with (
        RedisTransport.from_url(redis_cluster.url, prefix=prefix) as writer,
        RedisTransport.from_url(redis_cluster.url, prefix=prefix) as reader,
    ):
        info = await writer.create("dead", owner="o", lease_ms=600_000)
        await writer.append("dead", "o", Entry(info.epoch, 1, b"[1]"), 1)
        assert await reader.info("dead") is not None
        slot = redis_cluster.slot_of(f"{prefix}:{{dead}}:meta")
        old = redis_cluster.owner(slot)
        replica = redis_cluster.replica_of(old)
        with contextlib.closing(redis_cluster.node(old).client()) as client:
            assert client.execute_command("WAIT", 1, 5000) == 1  # the replica has it all
        redis_cluster.kill(old)
        with pytest.raises(TransportError):
            await reader.info("dead")  # before the failover: the node is down
        await asyncio.to_thread(redis_cluster.wait_healthy, replicas=False)
        assert redis_cluster.owner(slot) == replica

        async def routed_to_replica() -> bool:  # with no command of its own failing again
            return reader._node_for_slot(slot).name.endswith(f":{replica}")

        await eventually(routed_to_replica, within=30)
        assert await reader.info("dead") is not None


async def test_a_slow_master_is_not_taken_for_a_failed_one(
    redis_cluster: RedisClusterService,
) -> None:
    """A command that timed out (the node slow, not gone) does not start the slot-map
    rechecks a failed master does: every process would poll the cluster for a minute after
    a latency spike."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    url = f"{redis_cluster.url}?socket_timeout=0.3"
    async with RedisTransport.from_url(url, prefix=prefix) as transport:
        assert await transport.info("slow") is None
        master = redis_cluster.owner(redis_cluster.slot_of(f"{prefix}:{{slow}}:meta"))
        with contextlib.closing(redis_cluster.node(master).client()) as client:
            client.execute_command("CLIENT", "PAUSE", 2000, "ALL")
        with pytest.raises(TransportError, match="did not answer"):
            await transport.info("slow")
        assert transport._down == {} and transport._recheck is None


async def test_connections_per_master_stay_at_two_whatever_the_streams(
    redis_cluster: RedisClusterService,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    name = f"conns-{prefix}"
    gate = asyncio.Event()
    url = f"{redis_cluster.url}?client_name={name}"
    async with from_url(url, prefix=prefix) as transport:
        assert isinstance(transport, RedisTransport)
        producer = StreamProducer(transport)
        runs = [await producer.start(tokens(20, pause=gate)) for _ in range(60)]
        readers = [asyncio.create_task(collect(transport, r.stream_id)) for r in runs]
        slots = {redis_cluster.slot_of(f"{prefix}:{{{r.stream_id}}}:meta") for r in runs}
        assert len({redis_cluster.owner(slot) for slot in slots}) == 3  # every master used

        async def all_reading() -> bool:
            # The readers are fed by the runs' appends (written here); each run's cancel
            # channel is subscribed on its master.
            cancels = transport._cancel_waiters
            return (
                len(transport._feeds) == 60
                and len(cancels) == 60
                and all(
                    channel in transport._channel_node
                    and channel in transport._channel_node[channel].subscriber.confirmed
                    for channel in cancels
                )
            )

        await eventually(all_reading)
        for port in redis_cluster.master_ports():
            with contextlib.closing(redis_cluster.node(port).client()) as client:
                ours = [c for c in client.client_list() if c["name"] == name]
            # One pipelined command connection, one sharded pub/sub connection.
            assert len(ours) == 2, (port, ours)
        gate.set()
        results = await asyncio.gather(*readers)
        assert all(joined(events) == text_of(20) for events in results)


async def test_a_cancel_reaches_a_run_on_another_master_through_any_node(
    redis_cluster: RedisClusterService,
) -> None:
    """The issue's probe: a cancel sent through a transport seeded with another master."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    ports = redis_cluster.master_ports()
    gate = asyncio.Event()  # never set: a slow model
    async with (
        from_url(f"redis+cluster://127.0.0.1:{ports[0]}", prefix=prefix) as here,
        from_url(f"redis+cluster://127.0.0.1:{ports[1]}", prefix=prefix) as there,
    ):
        runs = [
            await StreamProducer(here, lease=3600).start(tokens(10, pause=gate)) for _ in range(6)
        ]
        for run in runs:
            await anext(StreamConsumer(here, run.stream_id).__aiter__())  # live
            assert await StreamProducer(there).cancel(run.stream_id)
        for run in runs:
            assert await asyncio.wait_for(run.wait(), timeout=10) == "cancelled"


# -- Sentinel ----------------------------------------------------------------------------


async def test_after_a_sentinel_failover_the_same_transport_runs_and_reads(
    redis_sentinel: RedisSentinelService,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    async with from_url(redis_sentinel.url, prefix=prefix) as transport:
        before = await StreamProducer(transport).start(tokens(30))
        assert joined(await collect(transport, before.stream_id)) == text_of(30)
        old_master = redis_sentinel.master_port()
        await asyncio.to_thread(redis_sentinel.failover)
        assert redis_sentinel.master_port() != old_master

        async def works() -> bool:
            # The old master's connections answer READONLY or are killed by Sentinel; the
            # transport reconnects to the master Sentinel names now, unconfigured.
            try:
                run = await StreamProducer(transport).start(tokens(30))
                return joined(await collect(transport, run.stream_id)) == text_of(30)
            except BackendRefused:
                raise  # never a refusal: a failover is transient
            except TransportError:
                return False

        await eventually(works, within=30)
        assert joined(await collect(transport, before.stream_id)) == text_of(30)  # replicated


def test_a_sentinel_client_is_accepted_as_is(redis_sentinel: RedisSentinelService) -> None:
    sentinel = aioredis.Sentinel(redis_sentinel.sentinel_addresses)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(redis_sentinel.service)
    transport = RedisTransport(client)
    assert transport._single is not None


# -- durable appends: readable once the replicas hold them -----------------------------


async def test_durable_appends_are_readable_only_once_a_replica_holds_them(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    primary, replica = redis_server_factory(), redis_server_factory()
    with contextlib.closing(replica.client()) as client:
        client.execute_command("REPLICAOF", "127.0.0.1", primary.port)

    async def linked() -> bool:
        # Connected is not enough: during its first full sync the replica acknowledges
        # nothing, so WAIT would time out. Wait for the link to be up and online.
        with contextlib.closing(replica.client()) as client:
            if client.info("replication").get("master_link_status") != "up":
                return False
        with contextlib.closing(primary.client()) as client:
            slave = client.info("replication").get("slave0")
            return isinstance(slave, dict) and slave.get("state") == "online"

    await eventually(linked)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    async with RedisTransport.from_url(
        # A timeout generous for a loaded machine: only the paused replica must miss it.
        primary.url,
        prefix=prefix,
        replicas=1,
        replica_timeout=2.0,
    ) as transport:
        info = await transport.create("d", owner="o", lease_ms=600_000)
        await transport.append("d", "o", Entry(info.epoch, 1, b"[1]"), 1)
        subscription = transport.subscribe("d", info.epoch, 1)
        await transport.append("d", "o", Entry(info.epoch, 2, b"[2]"), 1)
        live: list[Entry] = []
        while not live:
            live += await subscription.get(10.0)  # the notice is fetched (an empty wake first)
        assert [(e.seq, e.payload) for e in live] == [(2, b"[2]")]

        replica.pause()  # the replica stops acknowledging
        try:
            with pytest.raises(TransportError) as caught:
                await transport.append("d", "o", Entry(info.epoch, 3, b"[3]"), 1)
            assert not isinstance(caught.value, BackendRefused)
            assert "0 of 1 replicas" in str(caught.value)
            # Stored on the master, but no reader sees it: a failover could take it back.
            assert [e.seq for e in await transport.read("d", info.epoch, 0, 10)] == [1, 2]
            stored = await transport.info("d")
            assert stored is not None and stored.last_seq == 2
        finally:
            replica.resume()
        await transport.append("d", "o", Entry(info.epoch, 3, b"[3]"), 1)  # the retry
        assert [e.seq for e in await transport.read("d", info.epoch, 0, 10)] == [1, 2, 3]
        with pytest.raises(StorageRollback) as rolled:
            await transport.append("d", "o", Entry(info.epoch, 9, b"[9]"), 1)
        assert rolled.value.last_seq == 3
        await transport.append("d", "o", Entry(info.epoch, 4, b"[4]"), 1, final="completed")
        done = await transport.info("d")
        assert done is not None and (done.status, done.last_seq) == ("completed", 4)
        subscription.close()


async def test_the_newest_master_is_the_highest_config_epoch_and_the_sentinel_list_is_kept() -> (
    None
):
    # The watcher behind Sentinel takes the newest configuration (some Sentinels name the
    # old master for a moment after a failover). Regression (review): it reordered
    # redis-py's list of Sentinels in place, which a look-up under way swaps in too: a
    # Sentinel could be lost from the list for good and another listed twice.
    from redis.asyncio.sentinel import Sentinel

    from resumable_stream.transports.redis import _newest_master

    class Answering:
        def __init__(self, epoch: int, port: int) -> None:
            self.state = {
                "ip": "10.0.0.1", "port": port, "config-epoch": epoch, "num-other-sentinels": 3,
                "is_master": True, "is_sdown": False, "is_odown": False,
            }  # fmt: skip

        async def sentinel_master(self, service: str) -> dict[str, Any]:
            return self.state

    class Down:
        async def sentinel_master(self, service: str) -> dict[str, Any]:
            raise ConnectionError("down")

    manager = Sentinel([])
    listed = [Down(), Answering(3, 6379), Answering(4, 6380), Answering(4, 6381)]
    manager.sentinels = list(listed)  # type: ignore[assignment]
    assert await _newest_master(manager, "mymaster") == ("10.0.0.1", 6380)
    assert manager.sentinels == listed


async def test_a_sentinel_watch_stopped_as_it_asks_leaves_no_command_unawaited() -> None:
    # Regression (seen in CI): the watch made each Sentinel's command up front for
    # wait_for(); stopped (transport closed) before gather() started them, those commands
    # were never awaited and Python warned as they were collected.
    import inspect

    from redis.asyncio.sentinel import Sentinel

    from resumable_stream.transports.redis import _newest_master

    made: list[Any] = []

    async def answer(service: str) -> dict[str, Any]:
        return {}

    class Asked:
        def sentinel_master(self, service: str) -> Any:  # as redis-py's: a coroutine made now
            made.append(answer(service))
            return made[-1]

    manager = Sentinel([])
    manager.sentinels = [Asked(), Asked()]  # type: ignore[list-item]
    watch = asyncio.ensure_future(_newest_master(manager, "mymaster"))
    await asyncio.sleep(0)  # the watch is in gather(); its children have not run yet
    watch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watch
    unawaited = [c for c in made if inspect.getcoroutinestate(c) == inspect.CORO_CREATED]
    for coroutine in unawaited:
        coroutine.close()  # (no warning from this test's own clean-up)
    assert unawaited == []


# -- the event loop ending under the transport ---------------------------------------

_LOOP_ENDS_MID_RUN = """
import asyncio, sys
from resumable_stream import StreamConsumer, StreamProducer, from_url

async def tokens():
    while True:
        yield "token "
        await asyncio.sleep(0.01)

async def main():
    asyncio.get_running_loop().slow_callback_duration = 3600  # no -X dev timing notes
    transport = from_url(sys.argv[1], prefix=sys.argv[2])
    run = await StreamProducer(transport).start(tokens())
    async with StreamConsumer(transport, run.stream_id) as events:
        seen = 0
        async for _ in events:
            seen += 1
            if seen == 3:
                break
    print(run.stream_id)
    # Returns with the run going and the producer and transport never closed.

asyncio.run(main())
"""


@pytest.mark.parametrize("transport_kind", ["redis", "redis_cluster", "redis_sentinel"])
async def test_an_event_loop_ending_mid_run_leaves_no_task_pending(
    transport_kind: str, request: pytest.FixtureRequest
) -> None:
    # Regression: asyncio.run() cancelled the connection's task with the run's; the run,
    # writing its terminal event, opened a connection in a new task, which was still
    # pending as the loop closed ("Task was destroyed but it is pending!", "coroutine
    # 'AbstractConnection.disconnect' was never awaited", an unclosed socket).
    from tests.conftest import _redis_url_of

    url = _redis_url_of(transport_kind, request)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    script = (sys.executable, "-X", "dev", "-W", "error", "-c", _LOOP_ENDS_MID_RUN, url, prefix)
    process = await asyncio.create_subprocess_exec(
        *script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    if transport_kind == "redis":
        assert err.decode() == ""
    else:
        # The Cluster and Sentinel clients the transport holds until aclose() warn as
        # redis-py's clients do when never closed; nothing of ours is left behind.
        for left in ("Task was destroyed", "never awaited", "<coroutine", "Event loop is closed"):
            assert left not in err.decode()
    async with from_url(url, prefix=prefix) as transport:
        events = await collect(transport, out.decode().strip())
    assert (events[-1].type, events[-1].data) == ("cancelled", {"reason": "shutdown"})


async def test_the_key_name_caches_stay_bounded_as_streams_come_and_go(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: a server's transport kept the key names of every stream it had written
    # or been asked about, up to 65,536 of them (34 MB), long after those streams ended.
    # Those left unused go within two minutes now (see Recent).
    now = [0.0]
    monkeypatch.setattr(_recent, "clock", lambda: now[0])
    async with RedisTransport.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}") as transport:
        producer = StreamProducer(transport)
        for run in [await producer.start(tokens(2)) for _ in range(20)]:
            await run.wait()
        for first in range(0, 6000, 500):  # status reads of streams long gone
            infos = await asyncio.gather(
                *(transport.info(f"gone-{i}") for i in range(first, first + 500))
            )
            assert infos == [None] * 500
        for other in ("a", "b"):  # another stream read a minute later, and again
            now[0] += 60.0
            assert await transport.info(other) is None
        assert list(transport._streams.recent) == ["b"]
        assert list(transport._streams.older) == ["a"]
        assert len(transport._heads.recent) + len(transport._heads.older) <= 20


async def test_streams_in_use_keep_their_cached_keys_when_more_than_4096_take_turns(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression (issue 11): the caches were emptied when they held 4,096 streams, so with
    # more streams taking turns nearly every append made its keys and command head again:
    # 5,000 streams in lock-step cost 44 us of CPU per token against 27 us at 4,000.
    async with RedisTransport.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}") as transport:
        ids = [f"s{i}" for i in range(5_000)]
        infos = await asyncio.gather(*(transport.create(i, "o", lease_ms=60_000) for i in ids))

        async def append_to_each(seq: int) -> None:
            await asyncio.gather(
                *(
                    transport.append(i, "o", Entry(info.epoch, seq, b'["a"]'), 1)
                    for i, info in zip(ids, infos, strict=True)
                )
            )

        await append_to_each(1)
        made = collections.Counter[str]()  # what is made again once every stream had a turn
        heads, slot = transport._evalsha, redis_transport_module.key_slot

        def head(*args: Any) -> bytes:
            made["head"] += 1
            return heads(*args)

        def key_slot(key: bytes) -> int:
            made["keys"] += 1
            return slot(key)

        monkeypatch.setattr(transport, "_evalsha", head)
        monkeypatch.setattr(redis_transport_module, "key_slot", key_slot)
        await append_to_each(2)
        assert made == {}
        assert (await transport.info("s4999")).last_seq == 2  # type: ignore[union-attr]


async def _one_loop_of_work(writer: RedisTransport, other: RedisTransport) -> None:
    """A live reader on ``other`` woken by the notices of a run written on ``writer``, and
    a cancel asked on ``other`` reaching a run on ``writer``. The lease is a minute: the
    slow paths (a reader's check every half lease, the heartbeat every third) take 20 s
    and more, past the waits here."""
    producer = StreamProducer(writer, lease=60)
    go_on = asyncio.Event()

    async def source() -> AsyncIterator[str]:
        yield "first "
        await go_on.wait()
        yield "second"

    run = await producer.start(source())
    async with StreamConsumer(other, run.stream_id) as events:
        first = await asyncio.wait_for(anext(events), 10)
        go_on.set()  # the reader is caught up, waiting live
        rest = await asyncio.wait_for(_rest(events), 10)
    assert [e.data["text"] for e in (first, *rest) if e.type == "token"] == ["first ", "second"]
    assert rest[-1].type == "end"
    assert (await other.info(run.stream_id)).status == "completed"  # type: ignore[union-attr]
    assert await other.delete(run.stream_id)

    forever = await producer.start(tokens(2, pause=asyncio.Event()))  # waits for good
    assert await StreamProducer(other).cancel(forever.stream_id)
    assert await asyncio.wait_for(forever.wait(), 10) == "cancelled"
    await producer.aclose()


async def _rest(events: StreamConsumer) -> list[Event]:
    return [event async for event in events]


@pytest.mark.parametrize(
    "transport_kind",
    [
        "redis",
        "redis_cluster",
        # redis-py's Sentinel clients keep their connections (the master look-ups') open
        # until closed: the transport, not closed at the end of a loop, leaves them to the
        # garbage collector, which reports each as unclosed.
        pytest.param(
            "redis_sentinel",
            marks=pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
        ),
    ],
)
def test_a_transport_kept_from_one_event_loop_to_the_next_works_on_each(
    transport_kind: str, request: pytest.FixtureRequest
) -> None:
    # Regression: transports made once (module level) and used by asyncio.run() after
    # asyncio.run() (a script, a task queue's task, a loop per test): on the second loop a
    # live reader was not woken by notices (its pub/sub connection's task had ended with
    # the first loop and was never made again) and a cancel waited for the heartbeat;
    # behind Sentinel every command failed ("Event loop is closed": redis-py's Sentinel
    # clients kept the first loop's connections). The transports are not closed between
    # the loops; a Runner each, as asyncio.run() (it closes its loop at the end).
    from tests.conftest import _redis_url_of

    _kept_from_one_event_loop_to_the_next(_redis_url_of(transport_kind, request))
    gc.collect()  # (what the first loops left to the garbage collector is reported here)


def _kept_from_one_event_loop_to_the_next(url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    writer, other = (RedisTransport.from_url(url, prefix=prefix) for _ in range(2))
    for _ in range(3):
        with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
            runner.run(_one_loop_of_work(writer, other))
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        runner.run(to_the_end(writer.aclose, other.aclose))
        with pytest.raises(TransportClosed):  # closed is closed, on any loop
            runner.run(writer.info("s"))
    # Regression: behind Sentinel, the master look-up connections of each closed loop were
    # left to the garbage collector, whose ResourceWarnings surfaced in later tests.
    unclosed: list[str] = []
    hook, sys.unraisablehook = sys.unraisablehook, lambda u: unclosed.append(f"{u.exc_value}")
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert unclosed == []


def test_a_transport_in_use_on_another_open_event_loop_is_refused(redis_url: str) -> None:
    # Two open loops (two threads) would share one connection and its state: the first
    # call on the second loop says so, rather than failing deep inside asyncio.
    transport = RedisTransport.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:12]}")
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as first:
        assert first.run(transport.info("s")) is None
        with asyncio.Runner(loop_factory=asyncio.new_event_loop) as second:
            with pytest.raises(ConfigurationError, match="another event loop"):
                second.run(transport.info("s"))
            with pytest.raises(ConfigurationError, match="another event loop"):
                second.run(_subscribe(transport))
        first.run(transport.aclose())


async def _subscribe(transport: RedisTransport) -> None:
    transport.subscribe("s", 1, 0).close()
