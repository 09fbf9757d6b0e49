"""The library on uvloop, the loop `uvicorn[standard]` runs: the Redis transport takes
over its sockets' protocols (plain TCP, TLS, unix socket), which is loop-specific."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvloop

from resumable_stream import StreamConsumer, StreamProducer, _asgi, from_url
from resumable_stream._sse import PING
from resumable_stream._types import Message
from resumable_stream.starlette import StreamResponse
from resumable_stream.transports import QueueSubscription
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


async def _client_stays() -> Message:
    """An ASGI ``receive`` whose client never leaves."""
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")


async def _thinking() -> AsyncIterator[str]:
    """A run that yields one token, then thinks for ever."""
    yield "thinking"
    await asyncio.get_running_loop().create_future()


def _counted(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[None]:
    """A list that grows by one each time method ``name`` of ``cls`` is called."""
    calls: list[None] = []
    method = getattr(cls, name)

    def counted(self: Any) -> None:
        calls.append(None)
        method(self)

    monkeypatch.setattr(cls, name, counted)
    return calls


async def _idle_response(pings: int, interval: float = 0.02) -> int:
    """Serve an idle stream with a keep-alive every ``interval`` seconds until ``pings``
    went out; return the pings sent."""
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    sent: list[bytes] = []
    enough = asyncio.Event()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            sent.append(message["body"])
            if sent.count(PING) >= pings:
                enough.set()

    async with from_url("memory://") as transport, StreamProducer(transport) as producer:
        run = await producer.start(_thinking())
        consumer = StreamConsumer(transport, run.stream_id)
        response = StreamResponse(consumer, ping_interval=interval)
        scope = {"type": "http", "method": "GET"}
        serving = asyncio.ensure_future(response(scope, _client_stays, send))
        await asyncio.wait_for(enough.wait(), timeout=30)
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        await run.cancel()
    return sent.count(PING)


def test_an_idle_streams_keep_alive_clock_does_not_spin_on_uvloop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression: the clock compared the loop's time(), which uvloop keeps in whole
    # milliseconds as of the loop's last turn, and re-armed itself for what was left of
    # the interval: it ran about 700 times per keep-alive, re-armed for nothing until the
    # millisecond changed (36,939 checks for 49 pings in one second, measured).
    checks = _counted(monkeypatch, _asgi._Connection, "_check")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        pings = runner.run(_idle_response(10))
    assert pings >= 10
    assert len(checks) <= 2 * pings + 5  # one check per keep-alive, and a few more at most


def test_a_keep_alive_of_no_whole_milliseconds_does_not_spin_on_uvloop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression: the clock re-armed itself for what was left of the interval; uvloop
    # rounds a timer's delay to whole milliseconds (under half of one: the next turn), so
    # it fired early and re-armed itself for the last fraction of a millisecond, turn after
    # turn: 5,978 checks for 30 pings 20.3 ms apart, measured.
    checks = _counted(monkeypatch, _asgi._Connection, "_check")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        pings = runner.run(_idle_response(20, interval=0.0203))
    assert pings >= 20
    assert len(checks) <= 2 * pings + 5  # one check per keep-alive, and a few more at most


async def _stuck_writes(count: int, send_timeout: float) -> None:
    """Serve ``count`` responses whose client stops reading after the headers: each is cut
    by the send timeout."""
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            await asyncio.get_running_loop().create_future()  # never read

    async with from_url("memory://") as transport, StreamProducer(transport) as producer:
        run = await producer.start(_thinking())
        for _ in range(count):
            sent.clear()
            consumer = StreamConsumer(transport, run.stream_id)
            response = StreamResponse(consumer, ping_interval=None, send_timeout=send_timeout)
            scope = {"type": "http", "method": "GET"}
            await asyncio.wait_for(response(scope, _client_stays, send), 30)
            assert sent[0]["type"] == "http.response.start"
        await run.cancel()


def test_a_send_timeout_does_not_spin_on_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression: as the keep-alive above, the send timeout's clock re-armed itself for
    # the last fraction of a millisecond, turn after turn, in about half the writes cut:
    # up to 680 checks for one stuck write, measured.
    checks = _counted(monkeypatch, _asgi._Connection, "_check")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_stuck_writes(20, send_timeout=0.0203))
    assert len(checks) <= 3 * 20  # a check or two per write cut, and a third at most


def test_a_quiet_live_waits_timer_fires_once_per_timeout_on_uvloop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression: the live subscription's timer compared the loop's time() with its
    # deadline and re-armed itself for what was left; on uvloop (time in whole ms as of the
    # loop's last turn, delays rounded to ms) it fired early and re-armed about 700 times
    # per timeout: every quiet reader spun for up to a millisecond every half lease.
    fired = _counted(monkeypatch, QueueSubscription, "_on_timer")

    async def quiet_waits() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        subscription = QueueSubscription(lambda sub: None)
        for _ in range(20):
            assert await subscription.get(0.0234) == []  # timed out, not woken
            assert subscription.woke is False

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(quiet_waits())
    assert len(fired) <= 25  # once per timeout, and a few more at most
