"""The Redis transport's connections (Pipe, Subscriber) against real servers: faults, Redis
Cluster redirects, reconnections, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.asyncio.cluster as redis_py_cluster
import uvloop
from redis.asyncio.connection import Connection

from resumable_stream import ConfigurationError, TransportClosed, TransportError
from resumable_stream.transports import _redis_pipe
from resumable_stream.transports._redis_pipe import Pipe, Subscriber, pack
from resumable_stream.transports.redis import RedisTransport
from tests._helpers import eventually, holds
from tests._services import RedisClusterService, RedisServer

# Connections as the transport makes them for a cluster node: before redis-py 5.1, with
# redis-py's ClusterParser (which alone knows MOVED and ASK there).
_PARSER = getattr(redis_py_cluster, "ClusterParser", None)
_CLUSTER_KW: dict[str, Any] = {"parser_class": _PARSER} if _PARSER is not None else {}


def _subscriber(
    port: int,
    *,
    moved: list[bytes] | None = None,
    faults: list[int] | None = None,
    timeout: float = 5.0,
    **kw: Any,
) -> Subscriber:
    """A Subscriber on ``port`` recording the channels reported moved and the faults."""
    return Subscriber(
        lambda: Connection(port=port, **kw),
        name="t",
        timeout=timeout,
        on_message=lambda c, d: None,
        on_subscribed=lambda c: None,
        on_moved=(moved if moved is not None else []).append,
        on_fault=lambda: (faults if faults is not None else []).append(1),
    )


class _LosesACancel(Connection):
    """A connection whose set-up loses the first cancellation thrown into it, as redis-py's
    connect does on Python 3.11 when a cancellation meets its connect timeout (taken for a
    timeout, and retried)."""

    entered: asyncio.Event

    async def connect(self) -> None:
        self.entered.set()
        with contextlib.suppress(asyncio.CancelledError):  # lost: no uncancel(), no raise
            await asyncio.Event().wait()
        await super().connect()


@pytest.mark.parametrize("kind", ["pipe", "subscriber"])
async def test_a_cancel_lost_in_the_connection_set_up_still_ends_the_task(
    redis_server: RedisServer, kind: str
) -> None:
    # Regression (an intermittent hang in CI): asyncio.run() cancels every task once as the
    # loop ends; a cancellation lost inside redis-py's connect let the connection's task
    # connect and wait on its socket, and the process never exited.
    entered = asyncio.Event()

    def make() -> Connection:
        connection = _LosesACancel(port=redis_server.port)
        connection.entered = entered
        return connection

    if kind == "pipe":
        pipe = Pipe(make, timeout=5.0, name="t")
        command = asyncio.create_task(pipe.call(pack("PING")))
        await entered.wait()
        assert pipe._session is not None and pipe._session.task is not None
        task = pipe._session.task
    else:
        subscriber = Subscriber(
            make,
            name="t",
            timeout=5.0,
            on_message=lambda c, d: None,
            on_subscribed=lambda c: None,
            on_moved=lambda c: None,
            on_fault=lambda: None,
        )
        subscriber.add(b"t:{s}:n")
        await entered.wait()
        assert subscriber._task is not None
        task = subscriber._task
    task.cancel()  # once, as asyncio.run() does
    await asyncio.wait({task}, timeout=10)
    assert task.cancelled()
    if kind == "pipe":
        with pytest.raises((TransportError, asyncio.CancelledError)):
            await command
        await pipe.aclose()
    else:
        await subscriber.aclose()


async def test_loading_is_transient_and_drops_the_connection(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory(extra_args=("--enable-debug-command", "yes"))
    # DEBUG RELOAD answers once the load is done: about 10 s here, slower on a busy
    # machine, past redis-py's default 5 s socket timeout.
    admin = aioredis.Redis(port=server.port, socket_timeout=120)
    watcher = aioredis.Redis(port=server.port)
    try:
        await admin.execute_command("DEBUG", "POPULATE", "200000")
        await admin.config_set("key-load-delay", 50)  # microseconds per key while loading
        await admin.config_set("loading-process-events-interval-bytes", 1024)
        async with RedisTransport.from_url(server.url) as transport:
            assert await transport.info("s") is None
            assert transport._node_for_slot(0).pipe.connects == 1
            reload = asyncio.create_task(admin.execute_command("DEBUG", "RELOAD"))

            async def loading() -> bool:
                return bool((await watcher.info("persistence"))["loading"])

            await eventually(loading, within=30)
            with pytest.raises(TransportError, match="LOADING"):
                await transport.info("s")
            await reload
            assert await transport.info("s") is None
            # The LOADING reply dropped the connection: a new one answered.
            assert transport._node_for_slot(0).pipe.connects == 2
    finally:
        await admin.aclose()
        await watcher.aclose()


async def _flood(port: int, kill: Any) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    pipe = Pipe(lambda: Connection(port=port), timeout=5.0, name="t")
    futures: list[asyncio.Future[Any]] = []
    try:
        assert await pipe.call(pack("PING")) == b"PONG"
        for i in range(20000):
            futures += pipe.submit(pack("PING"))
            if i == 2000:
                kill()
            if pipe.connects > 1 or (i > 2000 and futures[-1].done()):
                break
            await asyncio.sleep(0)
        await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await pipe.aclose()
    return errors


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_connection_dropped_under_load_logs_no_loop_error(
    redis_server_factory: Callable[..., RedisServer], loop: str
) -> None:
    server = redis_server_factory()
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        errors = runner.run(_flood(server.port, server.kill))
    assert [f"{e.get('message')}: {e.get('exception')!r}" for e in errors] == []


async def test_ssubscribe_on_a_node_without_the_slot_reports_moved(
    redis_cluster: RedisClusterService,
) -> None:
    channel = b"t:{moved}:n"
    slot = redis_cluster.slot_of("{moved}")
    port = next(p for p in redis_cluster.master_ports() if p != redis_cluster.owner(slot))
    moved: list[bytes] = []
    faults: list[int] = []
    # As the transport makes cluster connections: redis-py's ClusterParser (before 5.1).
    sub = _subscriber(port, moved=moved, faults=faults, **_CLUSTER_KW)
    try:
        sub.add(channel)

        async def reported() -> bool:
            return bool(moved) or len(faults) >= 3

        await eventually(reported, within=10)
        assert moved == [channel], (moved, len(faults), sub.connects)
        assert faults == []
    finally:
        await sub.aclose()


async def test_unsubscribe_answered_moved_leaves_no_phantom_count(
    redis_cluster: RedisClusterService,
) -> None:
    """SSUBSCRIBE then SUNSUBSCRIBE of a channel whose slot is elsewhere: both answered
    MOVED. Later the slot comes to this node, the channel is followed here, and the slot
    leaves again: Redis drops the channel, which must be reported (on_moved)."""
    channel = b"t:{leak}:n"
    slot = redis_cluster.slot_of("{leak}")
    home = redis_cluster.owner(slot)
    port = next(p for p in redis_cluster.master_ports() if p != home)
    # The first two channels this node serves (a generator: each owner() asks the cluster).
    anchor, barrier = itertools.islice(
        (
            f"t:{{a{i}}}:n".encode()
            for i in itertools.count()
            if redis_cluster.owner(redis_cluster.slot_of(f"{{a{i}}}")) == port
        ),
        2,
    )
    moved: list[bytes] = []
    sub = _subscriber(port, moved=moved, **_CLUSTER_KW)
    try:
        sub.add(anchor)

        async def up() -> bool:
            return anchor in sub.confirmed

        await eventually(up)
        sub.add(channel)
        await asyncio.sleep(0)  # the writer sends SSUBSCRIBE...
        assert channel in sub._sent and not moved
        sub.remove(channel)  # ...and the reader leaves before the MOVED reply
        # Replies come in order: once a later subscription is confirmed, both MOVED
        # replies (to SSUBSCRIBE and SUNSUBSCRIBE) have been read.
        sub.add(barrier)

        async def read() -> bool:
            return barrier in sub.confirmed

        await eventually(read)
        await asyncio.to_thread(redis_cluster.migrating_slot(slot, port).finish)
        sub.add(channel)

        async def here() -> bool:
            return channel in sub.confirmed

        await eventually(here)
        await asyncio.to_thread(redis_cluster.migrating_slot(slot, home).finish)

        async def reported() -> bool:
            return channel in moved

        await eventually(reported, within=10)
    finally:
        await sub.aclose()


async def test_confirmed_only_while_subscribed(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """Between a lost connection and the next one, a channel left and followed again must
    not count as confirmed (there is no connection)."""
    server = redis_server_factory()
    faults: list[int] = []
    sub = _subscriber(server.port, faults=faults)
    try:
        sub.add(b"c")

        async def up() -> bool:
            return b"c" in sub.confirmed

        await eventually(up)
        server.kill()

        async def faulted() -> bool:
            return bool(faults)

        await eventually(faulted)
        assert b"c" not in sub.confirmed
        sub.remove(b"c")
        sub.add(b"c")
        assert b"c" not in sub.confirmed, "confirmed with no connection"
    finally:
        await sub.aclose()


async def test_a_subscriber_leaves_a_hung_server_and_subscribes_again_once_it_answers(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """Regression: a server that hangs keeps the socket open and sends nothing; with no
    reply owed, the subscriber waited on it for good (and a cluster never moved its
    channels to the replica taking over). Silent past the timeout, it is pinged, then left."""
    server = redis_server_factory()
    faults: list[int] = []
    sub = _subscriber(server.port, faults=faults, timeout=0.2)
    try:
        sub.add(b"c")
        await eventually(holds(lambda: b"c" in sub.confirmed))
        server.pause()
        try:
            await eventually(holds(lambda: bool(faults)))
            assert b"c" not in sub.confirmed
        finally:
            server.resume()
        await eventually(holds(lambda: b"c" in sub.confirmed))  # subscribed again
    finally:
        await sub.aclose()


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_quiet_subscriber_is_pinged_and_keeps_its_connection(
    redis_server: RedisServer, protocol: int
) -> None:
    """The keep-alive PING's answer (``["pong", ""]`` while subscribed on RESP2, ``PONG`` on
    RESP3) is not taken for a fault."""
    faults: list[int] = []
    # Long enough that a busy machine's scheduling delay does not pass for a silent server.
    sub = _subscriber(redis_server.port, faults=faults, timeout=0.5, protocol=protocol)
    admin = aioredis.Redis(port=redis_server.port)

    async def pings() -> int:
        stats = await admin.info("commandstats")
        return int(stats.get("cmdstat_ping", {}).get("calls", 0))

    try:
        sub.add(b"c")
        await eventually(holds(lambda: b"c" in sub.confirmed))
        before = await pings()

        async def pinged_a_few_times() -> bool:
            return await pings() >= before + 3

        await eventually(pinged_a_few_times)
        assert (faults, sub.connects, b"c" in sub.confirmed) == ([], 1, True)
    finally:
        await sub.aclose()
        await admin.aclose()


class _CountedWrites:
    """A connection's transport that counts its writes (each writelines() call); uvloop's
    transports take no patched method, hence a stand-in rather than a patch."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.writes = [0]

    def writelines(self, data: Any) -> None:
        self.writes[0] += 1
        self._stream.writelines(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _count_writes(pipe: Pipe) -> list[int]:
    """Count the writes on ``pipe``'s current connection from now on."""
    session = pipe._session
    assert session is not None and session.stream is not None
    counted = _CountedWrites(session.stream)
    session.stream = counted
    return counted.writes


@contextlib.asynccontextmanager
async def _counted_pipe(
    redis_server: RedisServer, write_interval: float = 0.0
) -> AsyncIterator[tuple[Pipe, list[int]]]:
    """A pipe connected (a PING answered), and the count of its writes from then on."""
    pipe = Pipe(
        lambda: Connection(port=redis_server.port),
        timeout=5.0,
        name="t",
        write_interval=write_interval,
    )
    try:
        assert await pipe.call(pack("PING")) == b"PONG"  # after a quiet spell: at once
        yield pipe, _count_writes(pipe)
    finally:
        await pipe.aclose()


async def test_commands_queued_within_the_write_interval_go_out_in_one_write(
    redis_server: RedisServer,
) -> None:
    # Issue 11: a write per event-loop turn woke Redis (and, with its replies, this
    # process) once per token; under load that cost more CPU than the commands.
    async with _counted_pipe(redis_server, write_interval=0.2) as (pipe, writes):
        # A reply owed for a while (Redis answers a BLPOP on an empty list after its
        # time-out), so that the next commands find the last write unanswered.
        (blocked,) = pipe.submit(pack("BLPOP", "rstream-test:empty", "1"))
        await asyncio.sleep(0)
        assert writes[0] == 1
        futures = []
        for i in range(5):  # five commands in five turns of the event loop
            futures += pipe.submit(pack("ECHO", str(i)))
            await asyncio.sleep(0)
        assert await asyncio.gather(*futures) == [b"0", b"1", b"2", b"3", b"4"]
        assert await blocked is None
        assert writes[0] == 2


async def test_a_command_sent_when_every_reply_has_come_goes_out_at_the_next_turn(
    redis_server: RedisServer,
) -> None:
    # On asyncio's loop a timer less than 1 ms away waits about 1 ms when nothing else
    # wakes the loop (epoll rounds its wait up), so each of a chain of awaited commands
    # waited that long at the default interval (1.1 ms each against 0.02 ms): a connection
    # that owes no reply writes at the next turn, however recent its last write.
    async with _counted_pipe(redis_server, write_interval=60.0) as (pipe, writes):
        for i in range(3):
            echo = pipe.send(pack("ECHO", str(i)))
            await asyncio.sleep(0)  # one turn: written in it, not a minute after the last
            assert writes[0] == i + 1
            assert await echo == str(i).encode()


async def test_a_posted_command_waits_for_the_interval_until_an_awaited_one_comes(
    redis_server: RedisServer,
) -> None:
    # Posted appends (the paced token path) keep the interval, which shares their writes
    # under load; an awaited command behind one does not wait for it.
    async with _counted_pipe(redis_server, write_interval=60.0) as (pipe, writes):
        replies: list[Any] = []
        pipe.post(pack("ECHO", "posted"), replies.append)
        for _ in range(3):
            await asyncio.sleep(0)
        assert writes[0] == 0  # put off: a minute after the PING's write
        assert await pipe.call(pack("ECHO", "awaited")) == b"awaited"
        assert replies == [b"posted"]
        assert writes[0] == 1  # both in one write


async def test_a_task_woken_with_the_write_timer_gets_its_command_into_that_write(
    redis_server: RedisServer,
) -> None:
    # Issue 11: the loop wakes for the write timer together with other work (on asyncio's
    # loop, the timers due in the same millisecond: paced sources), and the tasks that
    # work wakes run a turn later. Written as the timer fired, their commands waited for
    # the next write, a whole millisecond for more than one paced token in ten.
    async with _counted_pipe(redis_server, write_interval=0.2) as (pipe, writes):
        loop = asyncio.get_running_loop()
        session = pipe._session
        assert session is not None
        session.flushed_at = loop.time()  # as if just written: the next post is timed
        replies: list[Any] = []
        both = asyncio.Event()

        def answered(reply: Any) -> None:
            replies.append(reply)
            if len(replies) == 2:
                both.set()

        pipe.post(pack("ECHO", "timed"), answered)
        assert session.timer is not None
        woken = loop.create_future()
        loop.call_at(session.timer.when(), woken.set_result, None)  # due with the write

        async def paced() -> None:
            await woken  # (a paced source's sleep)
            pipe.post(pack("ECHO", "woken"), answered)

        task = asyncio.create_task(paced())
        await asyncio.wait_for(both.wait(), 5)
        await task
        assert replies == [b"timed", b"woken"]
        assert writes[0] == 1  # one write for both, not the second an interval later


async def test_without_a_write_interval_each_loop_turn_writes(
    redis_server: RedisServer,
) -> None:
    async with _counted_pipe(redis_server) as (pipe, writes):
        for i in range(3):
            assert await pipe.call(pack("ECHO", str(i))) == str(i).encode()
        assert writes[0] == 3


async def test_a_reply_hook_runs_as_the_reply_is_parsed_and_cannot_break_the_connection(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The Redis transport hands an entry to the readers of a run written in the process
    # from the append's reply, before the writer's task resumes (issue 11).
    pipe = Pipe(lambda: Connection(port=redis_server.port), timeout=5.0, name="t")
    seen: list[tuple[Any, bool]] = []
    try:
        echo = pipe.send(pack("ECHO", "a"), lambda reply: seen.append((reply, echo.done())))
        plain = pipe.send(pack("ECHO", "b"))

        def broken(reply: Any) -> None:
            raise RuntimeError("a bug in a hook")

        failing = pipe.send(pack("ECHO", "c"), broken)
        assert await asyncio.gather(echo, plain, failing) == [b"a", b"b", b"c"]
        assert seen == [(b"a", True)]  # once, for its own command, with the future set
        assert "a reply hook failed" in caplog.text
        assert await pipe.call(pack("PING")) == b"PONG"
        assert pipe.connects == 1  # the same connection: the hook's bug was not its fault
    finally:
        await pipe.aclose()


async def test_a_posted_command_answers_its_callback_once_in_order_or_with_the_fault(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The producer's fast path: no future, no task waiting; the callback must hear of a
    # dropped connection too, or the run would wait for its entry forever.
    pipe = Pipe(lambda: Connection(port=redis_server.port), timeout=5.0, name="t")
    answers: list[Any] = []
    try:
        pipe.post(pack("ECHO", "a"), answers.append)
        sent = pipe.send(pack("ECHO", "b"))

        def broken(reply: Any) -> None:
            raise RuntimeError("a bug in a hook")

        pipe.post(pack("ECHO", "c"), broken)
        pipe.post(pack("ECHO", "d"), answers.append)
        assert await sent == b"b"
        await eventually(holds(lambda: len(answers) == 2))
        assert answers == [b"a", b"d"]
        assert "a reply hook failed" in caplog.text
        assert pipe.connects == 1

        # The server holds the next reply; the connection drops while it is owed.
        pipe.post(pack("BLPOP", "nothing", "0"), answers.append)
        pipe.post(pack("ECHO", "e"), answers.append)
        async with aioredis.Redis(port=redis_server.port) as admin:
            await eventually(holds(lambda: len(pipe._session.pending) == 2))  # type: ignore[union-attr]
            await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await eventually(holds(lambda: len(answers) == 4))
        assert all(isinstance(a, TransportError) for a in answers[2:]), answers
        assert await pipe.call(pack("PING")) == b"PONG"  # a new connection
        assert len(answers) == 4  # each callback was called once
    finally:
        await pipe.aclose()


def test_a_write_interval_out_of_range_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="write_interval"):
        RedisTransport.from_url("redis://localhost:1", write_interval=0.5)
    with pytest.raises(ConfigurationError, match="write_interval"):
        RedisTransport.from_url("redis://localhost:1", write_interval=-1)


async def _shard_subscribers(port: int, channel: bytes) -> int:
    async with aioredis.Redis(port=port) as admin:
        reply = await admin.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1])


async def test_a_left_channel_is_unsubscribed_with_the_next_subscription(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 8: a SUNSUBSCRIBE written as each stream ended cost a write (and a wake-up of
    # Redis) per run; it now goes out with the next SSUBSCRIBE, or after a short delay.
    monkeypatch.setattr(_redis_pipe, "UNSUBSCRIBE_DELAY", 3600.0)  # never, in this test
    sub = _subscriber(redis_server.port)
    try:
        sub.add(b"first")

        async def confirmed(channel: bytes) -> bool:
            return channel in sub.confirmed

        await eventually(lambda: confirmed(b"first"))
        sub.remove(b"first")
        assert await _shard_subscribers(redis_server.port, b"first") == 1  # not yet sent
        sub.add(b"second")
        await eventually(lambda: confirmed(b"second"))

        async def left() -> bool:
            return await _shard_subscribers(redis_server.port, b"first") == 0

        await eventually(left)
        assert await _shard_subscribers(redis_server.port, b"second") == 1
    finally:
        await sub.aclose()


async def test_a_left_channel_is_unsubscribed_after_a_short_delay(
    redis_server: RedisServer,
) -> None:
    sub = _subscriber(redis_server.port)
    try:
        sub.add(b"alone")

        async def confirmed() -> bool:
            return b"alone" in sub.confirmed

        await eventually(confirmed)
        sub.remove(b"alone")

        async def left() -> bool:
            return await _shard_subscribers(redis_server.port, b"alone") == 0

        await eventually(left)  # with no other subscription to carry it
    finally:
        await sub.aclose()


async def test_a_refused_subscriber_logs_once_across_reading_sessions(
    redis_server_factory: Callable[..., RedisServer],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The refusals were counted by each run of the subscriber's task, which ends when no
    # channel is left after a fault: every new reading session (every answer, on a quiet
    # server) logged the error again and retried at once, as if the refusal were news.
    server = redis_server_factory()
    admin = aioredis.Redis(port=server.port)
    await admin.execute_command(
        "ACL", "SETUSER", "nosub", "on", ">pw", "~*", "&*", "+@all", "-ssubscribe"
    )
    sub = _subscriber(server.port, username="nosub", password="pw")
    delays: list[int] = []

    def delay(refusals: int) -> float:
        # The session's readers leave while the subscriber waits to retry: its task ends.
        delays.append(refusals)
        for channel in tuple(sub.channels):
            sub.remove(channel)
        return 0.0

    monkeypatch.setattr(_redis_pipe, "refused_delay", delay)
    caplog.set_level("DEBUG", logger="resumable_stream.redis")

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]

    async def ended() -> bool:
        return sub._task is None

    try:
        for channel in (b"c1", b"c2"):
            sub.add(channel)
            await eventually(ended)  # refused, and no channel left
        assert len(errors()) == 1, errors()
        assert delays == [1, 2]  # the second session's retry waits longer
        # Allowed again: a confirmed subscription ends the refusals, and the next one is
        # news again.
        await admin.execute_command("ACL", "SETUSER", "nosub", "+ssubscribe")
        sub.add(b"c3")

        async def confirmed() -> bool:
            return b"c3" in sub.confirmed

        await eventually(confirmed)
        await admin.execute_command("ACL", "SETUSER", "nosub", "-ssubscribe")
        sub.add(b"c4")

        async def refused_again() -> bool:
            return len(errors()) == 2

        await eventually(refused_again)
    finally:
        await sub.aclose()
        await admin.aclose()


async def test_a_pipe_whose_task_the_loop_cancelled_leaves_no_task_behind(
    redis_server: RedisServer,
) -> None:
    # Regression: asyncio.run() cancels every task as it ends, the pipe's with the runs';
    # a run then writing its terminal event opened a connection in a task made after that,
    # still pending as the loop closed. Now such a connection closes once it owes nothing,
    # and its callers hear back once its task has ended.
    pipe = Pipe(lambda: Connection(port=redis_server.port), timeout=5.0, name="t")
    try:
        assert await pipe.call(pack("PING")) == b"PONG"
        (task,) = pipe._tasks
        task.cancel()  # as asyncio.run() does
        await asyncio.wait([task])
        assert await pipe.call(pack("ECHO", "a")) == b"a"
        assert all(task.done() for task in pipe._tasks)
        answers: list[Any] = []
        pipe.post(pack("ECHO", "b"), answers.append)
        await eventually(holds(lambda: answers == [b"b"]))
        assert all(task.done() for task in pipe._tasks)
        assert pipe.connects == 3  # a connection each
    finally:
        await pipe.aclose()


async def test_a_pipe_that_timed_out_keeps_its_next_connection(redis_server: RedisServer) -> None:
    # The watchdog cancels the task of a silent connection itself: the next connection is
    # an ordinary one, kept for the commands that follow.
    pipe = Pipe(lambda: Connection(port=redis_server.port), timeout=0.3, name="t")
    try:
        assert await pipe.call(pack("PING")) == b"PONG"
        async with aioredis.Redis(port=redis_server.port) as admin:
            await admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")
            with pytest.raises(TransportError, match="did not answer"):
                await pipe.call(pack("PING"))
            await admin.ping()  # answered once the pause is over
        assert await pipe.call(pack("ECHO", "a")) == b"a"
        assert await pipe.call(pack("ECHO", "b")) == b"b"
        assert pipe.connects == 2 and len(pipe._tasks) == 1
    finally:
        await pipe.aclose()


async def test_a_command_on_a_last_connection_closed_before_it_opened_is_answered(
    redis_server: RedisServer,
) -> None:
    # Regression: once the loop had cancelled the pipe's task, a command's reply waited for
    # its connection's task to end; closed in the same event-loop turn, that task was
    # cancelled before it ran (its code, which hands the replies over, never ran), and the
    # caller waited for ever.
    pipe = Pipe(lambda: Connection(port=redis_server.port), timeout=5.0, name="t")
    assert await pipe.call(pack("PING")) == b"PONG"
    (task,) = pipe._tasks
    task.cancel()  # as asyncio.run() does
    await asyncio.wait([task])
    answers: list[Any] = []
    reply = pipe.send(pack("ECHO", "a"))  # its connection's task has not started yet
    pipe.post(pack("ECHO", "b"), answers.append)
    await pipe.aclose()
    with pytest.raises(TransportClosed):
        await asyncio.wait_for(reply, 10)
    assert [type(answer) for answer in answers] == [TransportClosed]


def test_a_pipe_used_on_another_event_loop_keeps_its_timeout(redis_server: RedisServer) -> None:
    # Regression: the watchdog armed on the first loop, still pending as that loop closed
    # (a test's loop, with the transport kept for the next test), stayed set for good: on
    # every later loop a silent server was waited for without end.
    pipe = Pipe(lambda: Connection(port=redis_server.port), timeout=0.5, name="t")

    async def first() -> None:
        assert await pipe.call(pack("PING")) == b"PONG"

    async def second() -> None:
        try:
            assert await pipe.call(pack("PING")) == b"PONG"
            async with aioredis.Redis(port=redis_server.port) as admin:
                await admin.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
                try:
                    with pytest.raises(TransportError, match="did not answer"):
                        await asyncio.wait_for(pipe.call(pack("SET", "k", "v")), 4)
                finally:
                    await admin.execute_command("CLIENT", "UNPAUSE")
        finally:
            await pipe.aclose()

    # first() ends within the timeout: its watchdog had not fired. A loop_factory: unlike
    # asyncio.run(), the Runner then leaves alone the loop pytest-asyncio set (before 0.25,
    # replacing it left it unclosed, a ResourceWarning in whichever test came next).
    for run in (first, second):
        with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
            runner.run(run())
