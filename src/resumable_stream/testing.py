"""The transport contract suite, for authors of custom transports.

Subclass :class:`TransportContract` in a test module and say how to make your transport;
pytest then runs every test the built-in transports pass against yours:

```python
from resumable_stream.testing import TransportContract


class TestMyTransport(TransportContract):
    def make_transport(self, namespace: str, **options: Any) -> Transport:
        return MyTransport(database=f"/tmp/{namespace}.db", **options)
```

It needs pytest and pytest-asyncio (``pip install "resumable-llm-stream[testing]"``); the
library itself never imports this module.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, Protocol

try:
    import pytest
    import pytest_asyncio
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "resumable_stream.testing needs pytest and pytest-asyncio: "
        "pip install 'resumable-llm-stream[testing]'"
    ) from exc

from ._codec import encode_entry
from ._consumer import StreamConsumer
from ._events import Event
from ._exceptions import (
    InvalidOffset,
    InvalidStreamId,
    LeaseLost,
    OffsetExpired,
    StorageRollback,
    StreamAlreadyRunning,
    StreamNotFound,
    TransportClosed,
)
from ._producer import StreamProducer
from .transports import Entry, Status, StreamInfo, Subscription, Transport

__all__ = ["TransportContract", "TransportFactory"]


class TransportFactory(Protocol):
    """Makes transports on the storage of the test running: ``factory(retention=0.3)``."""

    def __call__(self, **options: Any) -> Transport: ...


class TransportContract:
    """The behaviour every transport must give producers and consumers, as pytest tests.

    Subclass it in a module whose name pytest collects (``test_*.py``), with a class name
    starting with ``Test``, and override :meth:`make_transport`. The tests use three
    fixtures, which a subclass (or a ``conftest.py``) may override instead:

    * ``transport_factory``: a :class:`TransportFactory` that makes transports on one
      fresh storage namespace per test, and closes them after the test;
    * ``transport``: one transport made by it;
    * ``peer_transport``: a second handle on the same storage, like another process's
      (``transport`` itself when :attr:`shared_storage` is False).

    Tests use stream ids such as ``"again"`` and expect each test to start from empty
    storage: honour ``namespace``. Expiry tests pass short ``retention``, ``tombstone``,
    ``running_ttl`` and ``max_entries`` options, which every :class:`Transport` accepts.
    """

    #: Whether two transports made for the same namespace see the same streams (as two
    #: processes on one Redis do). Set it to False for a transport that keeps its streams in
    #: the object, like ``memory://``: the cross-instance tests then use one instance.
    shared_storage: ClassVar[bool] = True

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.asyncio]

    def make_transport(self, namespace: str, **options: Any) -> Transport:
        """Return a new transport on the storage named ``namespace``.

        ``namespace`` is fresh for each test: storage (a key prefix, a database file, a
        table) named by it starts empty. ``options`` are :class:`Transport` settings
        (``retention``, ``tombstone``, ``running_ttl``, ``max_entries``).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must override make_transport(namespace, **options)"
        )

    @pytest_asyncio.fixture
    async def transport_factory(self) -> AsyncIterator[TransportFactory]:
        """A fixture: makes transports over one fresh namespace (:meth:`make_transport`),
        and closes them after the test."""
        namespace = f"rs{uuid.uuid4().hex[:12]}"
        made: list[Transport] = []

        def make(**options: Any) -> Transport:
            transport = self.make_transport(namespace, **options)
            made.append(transport)
            return transport

        yield make
        for transport in made:
            await transport.aclose()

    @pytest.fixture
    def transport(self, transport_factory: TransportFactory) -> Transport:
        """A fixture: the transport a test writes and reads through."""
        return transport_factory()

    @pytest.fixture
    def peer_transport(
        self, transport: Transport, transport_factory: TransportFactory
    ) -> Transport:
        """A fixture: another process's transport over the same storage (the same one when
        ``shared_storage`` is false)."""
        return transport_factory() if self.shared_storage else transport

    async def test_full_stream_rebuilds_the_text(self, transport: Transport) -> None:
        run = await StreamProducer(transport).start(tokens(2000))
        events = await collect(transport, run.stream_id)
        assert joined(events) == text_of(2000)
        assert [e.type for e in events[-1:]] == ["end"]
        assert sum(e.terminal for e in events) == 1
        assert len({e.offset for e in events}) == len(events)
        assert await run.wait() == "completed"

    async def test_generated_ids_are_unguessable(self, transport: Transport) -> None:
        producer = StreamProducer(transport)
        ids = {(await producer.start(tokens(1))).stream_id for _ in range(20)}
        assert len(ids) == 20
        assert all(len(i) >= 22 for i in ids)  # 16 random bytes, url-safe base64
        await producer.aclose()

    async def test_resume_from_any_offset_has_no_gap_and_no_duplicate(
        self, transport: Transport
    ) -> None:
        run = await StreamProducer(transport, max_buffer=7).start(tokens(300, every=3))
        events = await collect(transport, run.stream_id)
        for cut in range(0, len(events), 13):
            rest = await collect(transport, run.stream_id, after=events[cut].offset)
            assert rest == events[cut + 1 :]
        assert await collect(transport, run.stream_id, after=events[-1].offset) == []

    async def test_late_joiner_and_live_reader_see_the_same_events(
        self, transport: Transport
    ) -> None:
        gate = asyncio.Event()
        run = await StreamProducer(transport).start(tokens(400, pause=gate))
        early = asyncio.create_task(collect(transport, run.stream_id))
        consumer = StreamConsumer(transport, run.stream_id)
        first = await anext(consumer)  # the stream is live and half written
        gate.set()
        late = [first, *[event async for event in consumer]]
        assert late == await early
        assert joined(late) == text_of(400)

    async def test_replay_after_the_run_ended(self, transport: Transport) -> None:
        run = await StreamProducer(transport).start(tokens(50))
        await run.wait()
        assert joined(await collect(transport, run.stream_id)) == text_of(50)
        assert joined(await collect(transport, run.stream_id)) == text_of(50)

    async def test_unknown_stream_is_not_found(self, transport: Transport) -> None:
        with pytest.raises(StreamNotFound):
            await collect(transport, "no-such-stream")

    @pytest.mark.parametrize("bad", ["", "a b", "{tag}", "x" * 201, "é", "a/b"])
    async def test_bad_stream_ids_are_refused(self, transport: Transport, bad: str) -> None:
        with pytest.raises(InvalidStreamId):
            StreamConsumer(transport, bad)
        with pytest.raises(InvalidStreamId):
            await StreamProducer(transport).start(tokens(1), stream_id=bad)

    @pytest.mark.parametrize("bad", ["", "1-2", "a-b-c", "1-0-0", "1-2-3-4", "-1-2", "1--2"])
    async def test_malformed_offsets_are_refused(self, transport: Transport, bad: str) -> None:
        with pytest.raises(InvalidOffset):
            StreamConsumer(transport, "s", after=bad)

    async def test_offset_past_the_end_is_refused(self, transport: Transport) -> None:
        run = await StreamProducer(transport).start(tokens(5))
        events = await collect(transport, run.stream_id)
        epoch = events[0].offset.split("-")[0]
        with pytest.raises(InvalidOffset):
            await collect(transport, run.stream_id, after=f"{epoch}-999-0")

    async def test_offset_from_an_earlier_run_is_expired(self, transport: Transport) -> None:
        producer = StreamProducer(transport)
        first = await producer.start(tokens(20), stream_id="again")
        old = await collect(transport, "again")
        await first.wait()
        await (await producer.start(tokens(30), stream_id="again")).wait()
        with pytest.raises(OffsetExpired):
            await collect(transport, "again", after=old[5].offset)
        assert joined(await collect(transport, "again")) == text_of(30)

    async def test_a_reader_pinned_to_a_run_never_reads_a_later_one(
        self, transport: Transport
    ) -> None:
        producer = StreamProducer(transport)
        first = await producer.start(tokens(20), stream_id="pinned")
        # Made for the run just started, and first read once a later run replaced it.
        late = StreamConsumer(transport, "pinned", epoch=first.epoch)
        await first.wait()
        second = await producer.start(tokens(30), stream_id="pinned")
        await second.wait()
        with pytest.raises(OffsetExpired, match="from its start"):
            await collect_from(late)
        events = await collect_from(StreamConsumer(transport, "pinned", epoch=second.epoch))
        assert joined(events) == text_of(30)
        with pytest.raises(InvalidOffset):
            StreamConsumer(transport, "pinned", after=events[3].offset, epoch=first.epoch)
        rest = StreamConsumer(transport, "pinned", after=events[3].offset, epoch=second.epoch)
        assert await collect_from(rest) == events[4:]

    async def test_a_run_cancelled_as_it_starts_ends_cancelled(self, transport: Transport) -> None:
        producer = StreamProducer(transport)
        run = await producer.start(tokens(5), stream_id="early")
        # In a task: between the run's first step and that of the task reading the source.
        status = await asyncio.wait_for(asyncio.ensure_future(run.cancel()), timeout=10)
        events = await asyncio.wait_for(collect(transport, "early"), timeout=10)
        assert (status, [e.type for e in events]) == ("cancelled", ["cancelled"])
        await asyncio.wait_for(producer.aclose(), timeout=10)

    async def test_second_start_on_a_live_id_is_refused(
        self, transport: Transport, peer_transport: Transport
    ) -> None:
        gate = asyncio.Event()
        results = await asyncio.gather(
            StreamProducer(transport).start(tokens(10, pause=gate), stream_id="solo"),
            StreamProducer(peer_transport).start(tokens(10, pause=gate), stream_id="solo"),
            return_exceptions=True,
        )
        assert sum(isinstance(r, StreamAlreadyRunning) for r in results) == 1
        gate.set()
        (run,) = [r for r in results if not isinstance(r, BaseException)]
        assert await run.wait() == "completed"
        assert joined(await collect(transport, "solo")) == text_of(10)

    async def test_source_exception_ends_with_one_error_event(self, transport: Transport) -> None:
        async def failing() -> AsyncIterator[str]:
            yield "partial "
            raise RuntimeError("model exploded")

        run = await StreamProducer(transport).start(failing())
        events = await collect(transport, run.stream_id)
        assert [e.type for e in events] == ["token", "error"]
        assert events[-1].data == {"error": "RuntimeError", "message": "model exploded"}
        assert await run.wait() == "error"

    async def test_cancel_from_another_transport_instance(
        self, transport: Transport, peer_transport: Transport
    ) -> None:
        gate = asyncio.Event()  # never set: the source blocks like a slow model
        # A long lease: its heartbeat (every 20 s) would notice the cancel far later than
        # the bound below, so only wait_cancel()'s push delivers it in time.
        producer = StreamProducer(transport, lease=60)
        run = await producer.start(tokens(10, pause=gate), stream_id="stop-me")
        consumer = StreamConsumer(peer_transport, "stop-me")
        await anext(consumer)
        assert await StreamProducer(peer_transport).cancel("stop-me") is True
        rest = await asyncio.wait_for(collect_from(consumer), timeout=10)
        assert rest[-1].type == "cancelled"
        assert rest[-1].data == {"reason": "requested"}
        assert await run.wait() == "cancelled"
        assert await StreamProducer(peer_transport).cancel("stop-me") is False

    async def test_run_cancel_and_producer_close_write_terminal_events(
        self, transport: Transport
    ) -> None:
        gate = asyncio.Event()
        producer = StreamProducer(transport)
        first = await producer.start(tokens(10, pause=gate))
        second = await producer.start(tokens(10, pause=gate))
        assert await first.cancel() == "cancelled"
        await producer.aclose()
        assert second.status == "cancelled"
        last = (await collect(transport, second.stream_id))[-1]
        assert (last.type, last.data) == ("cancelled", {"reason": "shutdown"})
        assert producer.runs == {}

    async def test_dead_producer_is_reported_lost(self, transport: Transport) -> None:
        # A run created but never written nor renewed: what a kill -9 leaves behind.
        await transport.create("orphan", owner="gone", lease_ms=300)
        # Readers check a quiet stream every half lease: reaped long before the bound.
        events = await asyncio.wait_for(collect(transport, "orphan"), timeout=10)
        assert [e.type for e in events] == ["error"]
        assert events[0].data["error"] == "producer_lost"
        info = await transport.info("orphan")
        assert info is not None and info.status == "error"

    async def test_fenced_producer_cannot_append(
        self, transport: Transport, peer_transport: Transport
    ) -> None:
        old = await transport.create("fence", owner="old", lease_ms=200)

        async def lapsed() -> bool:
            try:
                await peer_transport.create("fence", owner="new", lease_ms=5000)
            except StreamAlreadyRunning:
                return False
            return True

        await eventually(lapsed)
        with pytest.raises(LeaseLost):
            await transport.append("fence", "old", Entry(old.epoch, 1, encode_entry([])), 0)
        with pytest.raises(LeaseLost):
            await transport.renew("fence", "old", 1000)

    async def test_appends_are_idempotent_per_seq(self, transport: Transport) -> None:
        info = await transport.create("idem", owner="me", lease_ms=5000)
        entry = Entry(
            info.epoch,
            1,
            encode_entry([("token", {"text": "a", "message_id": None, "node": None})]),
        )
        await transport.append("idem", "me", entry, 1)
        await transport.append("idem", "me", entry, 1)  # a retry after a lost reply
        final = Entry(info.epoch, 2, encode_entry([("end", {})]))
        await transport.append("idem", "me", final, 1, final="completed")
        assert [e.type for e in await collect(transport, "idem")] == ["token", "end"]

    async def test_an_append_past_the_end_is_a_rollback(self, transport: Transport) -> None:
        # What a failover to a lagging replica looks like to the producer: it must be told,
        # to write the lost entries again, never leave a gap in the offsets.
        info = await transport.create("behind", owner="me", lease_ms=5000)
        await transport.append("behind", "me", _token_entry(info.epoch, 1, "a"), 1)
        for final in (None, "completed"):
            with pytest.raises(StorageRollback) as caught:
                await transport.append(
                    "behind", "me", _token_entry(info.epoch, 3, "c"), 1, final=final
                )
            assert caught.value.last_seq == 1  # where the storage ends: the producer goes on
        assert [e.seq for e in await transport.read("behind", info.epoch, 0, 10)] == [1]
        stored = await transport.info("behind")
        assert stored is not None and (stored.status, stored.last_seq) == ("running", 1)
        end = Entry(info.epoch, 2, encode_entry([("end", {})]))
        await transport.append("behind", "me", end, 1, final="completed")
        assert [e.type for e in await collect(transport, "behind")] == ["token", "end"]

    async def test_a_run_whose_lease_holds_is_not_reaped(self, transport: Transport) -> None:
        # Readers of a quiet stream (a slow model) try reap() every half lease: it must
        # leave a run whose producer is alive alone.
        info = await transport.create("alive", owner="me", lease_ms=60_000)
        await transport.append("alive", "me", _token_entry(info.epoch, 1, "a"), 1)
        assert await transport.reap("alive", info.epoch, _LOST) is False
        stored = await transport.info("alive")
        assert stored is not None and (stored.status, stored.last_seq) == ("running", 1)
        assert await transport.renew("alive", "me", 60_000) is False
        end = Entry(info.epoch, 2, encode_entry([("end", {})]))
        await transport.append("alive", "me", end, 1, final="completed")
        assert [e.type for e in await collect(transport, "alive")] == ["token", "end"]

    async def test_an_ended_or_reaped_run_takes_no_more_writes(self, transport: Transport) -> None:
        info = await transport.create("ended", owner="me", lease_ms=5000)
        end = Entry(info.epoch, 1, encode_entry([("end", {})]))
        await transport.append("ended", "me", end, 1, final="completed")
        with pytest.raises(LeaseLost):
            await transport.append("ended", "me", _token_entry(info.epoch, 2, "late"), 1)
        with pytest.raises(LeaseLost):
            await transport.renew("ended", "me", 5000)
        # A producer presumed dead (a long pause) that wakes after readers reaped its run.
        info = await transport.create("reaped", owner="old", lease_ms=100)
        await transport.append("reaped", "old", _token_entry(info.epoch, 1, "a"), 1)

        async def reaped() -> bool:
            return await transport.reap("reaped", info.epoch, _LOST)

        await eventually(reaped)
        with pytest.raises(LeaseLost):
            await transport.append("reaped", "old", _token_entry(info.epoch, 3, "late"), 1)
        with pytest.raises(LeaseLost):
            await transport.renew("reaped", "old", 5000)
        events = await collect(transport, "reaped")
        assert [e.type for e in events] == ["token", "error"]
        assert events[-1].data["error"] == "producer_lost"

    async def test_expired_data_is_told_apart_from_unknown(
        self,
        transport_factory: TransportFactory,
    ) -> None:
        transport = transport_factory(retention=0.3, tombstone=0.5)
        run = await StreamProducer(transport).start(tokens(20))
        events = await collect(transport, run.stream_id)

        async def data_gone() -> bool:
            try:
                await collect(transport, run.stream_id, after=events[3].offset)
            except OffsetExpired:
                return True
            return False

        await eventually(data_gone)
        with pytest.raises(OffsetExpired):
            await collect(transport, run.stream_id)

        async def all_gone() -> bool:
            return await transport.info(run.stream_id) is None

        await eventually(all_gone)
        with pytest.raises(StreamNotFound):
            await collect(transport, run.stream_id)

    async def test_trimmed_offsets_are_expired_never_skipped(
        self,
        transport_factory: TransportFactory,
    ) -> None:
        transport = transport_factory(max_entries=10)
        run = await StreamProducer(transport, max_buffer=1).start(tokens(1500, every=1))
        await run.wait()
        info = await transport.info(run.stream_id)
        assert info is not None and info.last_seq > 1000  # one entry per token
        with pytest.raises(OffsetExpired):
            await collect(transport, run.stream_id)
        with pytest.raises(OffsetExpired):
            await collect(transport, run.stream_id, after=f"{info.epoch}-2-0")
        tail = await collect(transport, run.stream_id, after=f"{info.epoch}-{info.last_seq - 3}-0")
        assert joined(tail) == text_of(1500)[-len(joined(tail)) :] and tail[-1].type == "end"

    async def test_status_info(self, transport: Transport) -> None:
        gate = asyncio.Event()
        run = await StreamProducer(transport).start(tokens(10, pause=gate), stream_id="info")
        consumer = StreamConsumer(transport, "info")
        first = await anext(consumer)
        info = await transport.info("info")
        assert info is not None
        assert info.status == "running" and info.epoch == run.epoch
        assert info.created_at <= info.updated_at <= time.time() + 1
        assert info.last_offset is not None and info.last_offset >= first.offset
        gate.set()
        events = [first, *[e async for e in consumer]]
        info = await transport.info("info")
        assert info is not None and info.status == "completed"
        assert info.last_offset == events[-1].offset

    async def test_cancelled_consumers_release_everything(self, transport: Transport) -> None:
        gate = asyncio.Event()
        producer = StreamProducer(transport)
        runs = [await producer.start(tokens(10, pause=gate)) for _ in range(20)]
        watched = _WatchedTransport(transport)
        consumers = [StreamConsumer(watched, r.stream_id) for r in runs]
        readers = [asyncio.create_task(collect_from(c)) for c in consumers]

        async def all_waiting_live() -> bool:
            return watched.waiting == len(readers)

        await eventually(all_waiting_live)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        assert watched.open == 0  # every live subscription was closed
        gate.set()
        # The transport is still healthy: every stream reads back whole.
        for run in runs:
            await run.wait()
            assert joined(await collect(transport, run.stream_id)) == text_of(10)

    async def test_slow_reader_joining_a_shared_feed_after_the_end_gets_everything(
        self,
        transport: Transport,
    ) -> None:
        # Regression: a reader that caught up, paused, then subscribed to a live feed that
        # another reader in the process had already moved past it, waited forever once the
        # stream had ended (nothing new arrived to reveal the gap).
        gate = asyncio.Event()
        run = await StreamProducer(transport).start(tokens(200, pause=gate))
        slow = StreamConsumer(transport, run.stream_id)
        first = await anext(slow)  # caught up with what is stored, not yet subscribed
        held = transport.subscribe(run.stream_id, run.epoch, 0)  # another live reader's feed
        gate.set()
        expected = await collect(transport, run.stream_id)
        while not any(entry.payload.endswith(b'["end",{}]]') for entry in await held.get(1.0)):
            pass  # the shared feed has now moved past the slow reader, to the end
        rest = await asyncio.wait_for(collect_from(slow), timeout=5)
        held.close()
        assert [first, *rest] == expected

    async def test_delete_stops_the_writer_and_removes_the_stream(
        self, transport: Transport, peer_transport: Transport
    ) -> None:
        gate = asyncio.Event()  # never set: a slow model
        run = await StreamProducer(transport).start(tokens(10, pause=gate), stream_id="gone")
        reader = StreamConsumer(peer_transport, "gone")
        await anext(reader)
        assert await peer_transport.delete("gone") is True
        with pytest.raises(LeaseLost):
            await run.wait()  # stopped, and fenced: it could not write a terminal event
        with pytest.raises(OffsetExpired):
            async for _ in reader:
                pass
        with pytest.raises(StreamNotFound):
            await collect(peer_transport, "gone")
        assert await peer_transport.delete("gone") is False
        assert await transport.info("gone") is None

    @pytest.mark.parametrize("change", ["deleted", "replaced", "ended", "reaped"])
    async def test_a_run_that_changes_before_its_reader_subscribes_is_told_at_once(
        self, transport: Transport, peer_transport: Transport, change: str
    ) -> None:
        # A reader hands out what it read from storage before it follows the live feed; a
        # run deleted, replaced, ended or reaped meanwhile is told by the subscription (a
        # wake-up, or the entry), not by the reader's quiet-stream check half a lease later
        # (30 s here: the bound below fails a transport that leaves it to that check).
        info = await transport.create("moved", owner="me", lease_ms=60_000)
        for seq in (1, 2):
            await transport.append("moved", "me", _token_entry(info.epoch, seq, "a"), 1)
        watched = _WatchedTransport(transport)
        reader = StreamConsumer(watched, "moved")
        await anext(reader)  # both entries read, the second not handed out yet
        assert watched.open == 0  # not subscribed yet
        if change == "deleted":
            assert await peer_transport.delete("moved") is True
        elif change == "replaced":
            assert await peer_transport.delete("moved") is True
            await peer_transport.create("moved", owner="next", lease_ms=60_000)
        elif change == "ended":
            end = Entry(info.epoch, 3, encode_entry([("end", {})]))
            await peer_transport.append("moved", "me", end, 1, final="completed")
        else:
            await transport.renew("moved", "me", lease_ms=1)  # the producer is gone

            async def reaped() -> bool:
                return await peer_transport.reap("moved", info.epoch, _LOST)

            await eventually(reaped)
        rest = asyncio.wait_for(collect_from(reader), timeout=5)
        if change in ("deleted", "replaced"):
            with pytest.raises(OffsetExpired):
                await rest
        else:
            last = "end" if change == "ended" else "error"  # producer_lost
            assert [e.type for e in await rest] == ["token", last]
        assert watched.open == 0

    async def test_a_reader_joining_a_feed_after_its_run_was_deleted_is_told_at_once(
        self, transport: Transport, peer_transport: Transport
    ) -> None:
        # As above, while another reader of this process follows the run live: its feed
        # saw the run go before this reader joined it.
        info = await transport.create("moved", owner="me", lease_ms=60_000)
        for seq in (1, 2):
            await transport.append("moved", "me", _token_entry(info.epoch, seq, "a"), 1)
        reader = StreamConsumer(transport, "moved")
        await anext(reader)
        held = transport.subscribe("moved", info.epoch, 2)  # another reader, following live
        assert await peer_transport.delete("moved") is True
        assert await asyncio.wait_for(held.get(max_wait=30), timeout=5) == []
        assert held.woke is not False  # woken to look at the stream, not timed out
        with pytest.raises(OffsetExpired):
            await asyncio.wait_for(collect_from(reader), timeout=5)
        held.close()

    async def test_aclose_from_another_task_ends_a_waiting_iteration(
        self, transport: Transport
    ) -> None:
        gate = asyncio.Event()  # never set: the reader waits live
        # A long lease: a reader polls a quiet stream every half lease (30 s here), so only
        # aclose() waking it ends the wait within the bound below.
        run = await StreamProducer(transport, lease=60).start(tokens(10, pause=gate))
        watched = _WatchedTransport(transport)
        consumer = StreamConsumer(watched, run.stream_id)
        # Everything written before the pause; then nothing more comes.
        first = [await anext(consumer) for _ in range(5)]
        reading = asyncio.create_task(collect_from(consumer))

        async def waiting_live() -> bool:  # suspended in Subscription.get()
            return watched.waiting == 1

        await eventually(waiting_live)
        await consumer.aclose()
        rest = await asyncio.wait_for(reading, timeout=10)  # regression: blocked for ever
        assert [e.type for e in first] == ["token"] * 5 and rest == []
        assert (watched.waiting, watched.open) == (0, 0)
        await run.cancel()

    async def test_a_cancel_watch_ends_when_its_transport_closes(
        self, transport_factory: TransportFactory
    ) -> None:
        transport = transport_factory()
        info = await transport.create("watched", "a-producer", 60_000)
        watch = asyncio.ensure_future(transport.wait_cancel("watched", info.epoch))
        for _ in range(10):  # (its first steps: subscribed, or waiting, by then)
            await asyncio.sleep(0)
        await transport.aclose()
        with pytest.raises(TransportClosed):  # regression: memory's waited for ever
            await asyncio.wait_for(watch, timeout=10)

    async def test_a_stream_deleted_and_recreated_at_once_gets_a_new_epoch(
        self,
        transport: Transport,
    ) -> None:
        producer = StreamProducer(transport)
        await (await producer.start(tokens(5), stream_id="again")).wait()
        old = await collect(transport, "again")
        for _ in range(20):  # delete and re-create within the same millisecond, again and again
            await transport.delete("again")
            await (await producer.start(tokens(5), stream_id="again")).wait()
            with pytest.raises(OffsetExpired):
                await collect(transport, "again", after=old[1].offset)

    async def test_a_running_stream_lives_at_least_as_long_as_its_lease(
        self,
        transport_factory: TransportFactory,
    ) -> None:
        # running_ttl is a safety net for a stream nobody renews: a lease longer than it
        # (a reservation's start_timeout, a lease set for slow tools) keeps the data for the
        # lease, before the first heartbeat as after each one.
        transport = transport_factory(running_ttl=0.1, tombstone=0.1)
        info = await transport.create("long", owner="me", lease_ms=30_000)
        await transport.append("long", "me", _token_entry(info.epoch, 1, "a"), 1)
        for renewed in (False, True):
            if renewed:
                assert await transport.renew("long", "me", 30_000) is False
            # Time itself is what is tested: past running_ttl and tombstone together.
            await asyncio.sleep(0.5)
            stored = await transport.info("long")
            assert stored is not None and stored.status == "running", (
                f"the stream expired while its lease held ({renewed=})"
            )
            entries = await transport.read("long", info.epoch, 0, 10)
            assert [e.seq for e in entries] == [1], (
                f"the data expired while its lease held ({renewed=})"
            )
        end = Entry(info.epoch, 2, encode_entry([("end", {})]))
        await transport.append("long", "me", end, 1, final="completed")
        assert [e.type for e in await collect(transport, "long")] == ["token", "end"]

    async def test_an_abandoned_run_expires_into_a_tombstone(
        self,
        transport_factory: TransportFactory,
    ) -> None:
        # What a process killed mid-run leaves when no reader ever comes to reap it.
        transport = transport_factory(running_ttl=0.3, tombstone=30)
        info = await transport.create("abandoned", owner="gone", lease_ms=100)
        token = ("token", {"text": "a", "message_id": None, "node": None})
        await transport.append("abandoned", "gone", Entry(info.epoch, 1, encode_entry([token])), 1)
        offset = f"{info.epoch}-1-0"

        async def data_gone() -> bool:  # storage only: a reader would reap the run first
            return await transport.read("abandoned", info.epoch, 0, 10) == []

        await eventually(data_gone)
        with pytest.raises(OffsetExpired):  # expired, told apart from "never existed"
            await collect(transport, "abandoned", after=offset)
        assert await transport.info("abandoned") is not None

    async def test_a_lease_longer_than_running_ttl_keeps_the_tombstone_margin(
        self,
        transport_factory: TransportFactory,
    ) -> None:
        # A reservation held (start_timeout) longer than running_ttl + tombstone, abandoned:
        # its data lives as long as the lease, and its metadata the tombstone longer.
        transport = transport_factory(running_ttl=0.1, tombstone=1.5)
        info = await transport.create("held", owner="gone", lease_ms=100)
        await transport.append("held", "gone", _token_entry(info.epoch, 1, "a"), 1)
        await transport.renew("held", "gone", lease_ms=2000)  # as reserve() does

        async def data_gone() -> bool:
            return await transport.read("held", info.epoch, 0, 10) == []

        await eventually(data_gone)
        assert await transport.info("held") is not None
        with pytest.raises(OffsetExpired):
            await collect(transport, "held", after=f"{info.epoch}-1-0")


class _WatchedTransport(Transport):
    """Delegates to ``inner`` and counts the live subscriptions readers hold.

    The contract tests observe readers through the public :class:`Transport` and
    :class:`Subscription` API only: a transport under test is never looked into.
    """

    def __init__(self, inner: Transport) -> None:
        super().__init__(
            retention=inner.retention,
            tombstone=inner.tombstone,
            running_ttl=inner.running_ttl,
            max_entries=inner.max_entries,
        )
        self.inner = inner
        self.write_retry_budget = inner.write_retry_budget
        #: Subscriptions made and not yet closed.
        self.open = 0
        #: ``Subscription.get()`` calls in progress.
        self.waiting = 0

    async def create(self, stream_id: str, owner: str, lease_ms: int) -> StreamInfo:
        return await self.inner.create(stream_id, owner, lease_ms)

    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        await self.inner.append(stream_id, owner, entry, count, final)

    async def renew(self, stream_id: str, owner: str, lease_ms: int) -> bool:
        return await self.inner.renew(stream_id, owner, lease_ms)

    async def request_cancel(self, stream_id: str) -> bool:
        return await self.inner.request_cancel(stream_id)

    async def wait_cancel(self, stream_id: str, epoch: int) -> None:
        await self.inner.wait_cancel(stream_id, epoch)

    async def info(self, stream_id: str) -> StreamInfo | None:
        return await self.inner.info(stream_id)

    async def read(self, stream_id: str, epoch: int, after: int, limit: int) -> list[Entry]:
        return await self.inner.read(stream_id, epoch, after, limit)

    def subscribe(self, stream_id: str, epoch: int, after: int) -> Subscription:
        return _WatchedSubscription(self, self.inner.subscribe(stream_id, epoch, after))

    async def delete(self, stream_id: str) -> bool:
        return await self.inner.delete(stream_id)

    async def reap(self, stream_id: str, epoch: int, payload: bytes) -> bool:
        return await self.inner.reap(stream_id, epoch, payload)


class _WatchedSubscription(Subscription):
    def __init__(self, watch: _WatchedTransport, inner: Subscription) -> None:
        self._watch = watch
        self._inner = inner
        self._closed = False
        watch.open += 1

    async def get(self, max_wait: float) -> list[Entry]:
        self._watch.waiting += 1
        try:
            return await self._inner.get(max_wait)
        finally:
            self._watch.waiting -= 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._watch.open -= 1
        self._inner.close()


async def tokens(
    n: int, *, every: int = 50, pause: asyncio.Event | None = None
) -> AsyncIterator[str]:
    """``n`` distinct tokens; yields to the loop every ``every`` tokens, waits on ``pause``."""
    for i in range(n):
        if pause is not None and i == n // 2:
            await pause.wait()
        yield f"t{i} "
        if i % every == 0:
            await asyncio.sleep(0)


#: The entry a reaper writes: the one event that ends a run whose producer is gone.
_LOST = encode_entry([("error", {"error": "producer_lost", "message": "no heartbeat"})])


def _token_entry(epoch: int, seq: int, text: str) -> Entry:
    """An entry holding one token event."""
    return Entry(
        epoch, seq, encode_entry([("token", {"text": text, "message_id": None, "node": None})])
    )


def text_of(n: int) -> str:
    return "".join(f"t{i} " for i in range(n))


async def collect(transport: Transport, stream_id: str, after: str | None = None) -> list[Event]:
    return [event async for event in StreamConsumer(transport, stream_id, after=after)]


async def collect_from(consumer: StreamConsumer) -> list[Event]:
    return [event async for event in consumer]


def joined(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.type == "token")


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Poll an external condition (a TTL, another process) until it holds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)  # polling an external clock/process, not task state
