"""StreamConsumer: bounded memory, fairness, and never ending silently (issue 9)."""

from __future__ import annotations

import asyncio
import tracemalloc

import orjson
import pytest

from resumable_stream import (
    ConfigurationError,
    Event,
    LeaseLost,
    OffsetExpired,
    StreamConsumer,
    StreamProducer,
)
from resumable_stream._codec import encode_entry, format_offset
from resumable_stream._constants import CONSUMER_CHECKPOINT
from resumable_stream._consumer import _Check, _checks_of
from resumable_stream.transports import Entry
from resumable_stream.transports._base import QueueSubscription, Subscription
from resumable_stream.transports.memory import MemoryTransport
from tests._helpers import collect, eventually, holds, joined, text_of, tokens


def token_entry(epoch: int, seq: int, *texts: str) -> Entry:
    items = [("token", {"text": t, "message_id": None, "node": None}) for t in texts]
    return Entry(epoch, seq, encode_entry(items))


async def written(transport: MemoryTransport, stream_id: str, n: int, lease_ms: int) -> int:
    """A run with ``n`` entries of two tokens each and no producer renewing it."""
    info = await transport.create(stream_id, "gone", lease_ms)
    for seq in range(1, n + 1):
        await transport.append(stream_id, "gone", token_entry(info.epoch, seq, "a", "b"), 2)
    return info.epoch


def lose_tail(transport: MemoryTransport, stream_id: str, keep: int) -> None:
    """What a failover to a replica that had not caught up does: entries past ``keep`` go."""
    stream = transport._streams[stream_id]
    del stream.payloads[keep - stream.first_seq + 1 :]


async def test_reading_one_event_decodes_one_entry_not_a_page() -> None:
    # Regression (issue 9): one event read of a finished 100k-token stream held 39 MB.
    transport = MemoryTransport()
    run = await StreamProducer(transport).start(tokens(100_000, every=100_000))
    assert await run.wait() == "completed"
    consumer = StreamConsumer(transport, run.stream_id)
    tracemalloc.start()
    try:
        first = await anext(consumer)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first.data["text"] == "t0 "
    assert held < 4_000_000  # one entry (<= 1,024 events) decoded, not 100,000
    await consumer.aclose()


async def test_a_long_replay_lets_other_tasks_run() -> None:
    # Regression (issue 9): events buffered and a transport that never waits (memory)
    # replayed 300k events without yielding once, starving every other task.
    transport = MemoryTransport()
    run = await StreamProducer(transport).start(tokens(20_000, every=20_000))
    await run.wait()
    progress = 0

    async def other_task() -> None:
        nonlocal progress
        while True:
            progress += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_task())
    await asyncio.sleep(0)  # let it start
    longest, run_length, seen = 0, 0, progress
    count = 0
    async for _ in StreamConsumer(transport, run.stream_id):
        count += 1
        if progress == seen:
            run_length += 1
            longest = max(longest, run_length)
        else:
            seen, run_length = progress, 0
    other.cancel()
    assert count == 20_001
    assert longest <= CONSUMER_CHECKPOINT


async def test_storage_behind_what_was_delivered_raises_instead_of_ending_silently() -> None:
    # Regression (issues 8, 9): entries already delivered were lost, the run was then
    # reaped at an offset the reader had passed, and the reader stopped with no error.
    transport = MemoryTransport()
    await written(transport, "behind", 5, lease_ms=200)
    consumer = StreamConsumer(transport, "behind")
    delivered = [await anext(consumer) for _ in range(10)]
    assert joined(delivered) == "ab" * 5
    lose_tail(transport, "behind", keep=3)
    with pytest.raises(OffsetExpired, match="rolled back"):
        async for _ in consumer:
            pass
    info = await transport.info("behind")
    assert info is not None and info.status == "error"  # reaped at entry 4


async def test_a_final_stream_whose_terminal_this_reader_never_got_raises() -> None:
    transport = MemoryTransport()
    await written(transport, "rewritten", 4, lease_ms=200)
    consumer = StreamConsumer(transport, "rewritten")
    assert len([await anext(consumer) for _ in range(8)]) == 8  # entries 1-4, no terminal
    lose_tail(transport, "rewritten", keep=3)  # the reaper now writes entry 4 again
    with pytest.raises(OffsetExpired, match="never received its terminal event"):
        async for _ in consumer:
            pass


async def test_resuming_after_an_offset_that_now_holds_other_data_expires() -> None:
    transport = MemoryTransport()
    epoch = await written(transport, "reused", 4, lease_ms=200)
    lose_tail(transport, "reused", keep=3)
    fresh = await collect(transport, "reused")  # reaps: entry 4 is now producer_lost
    assert [e.type for e in fresh][-1] == "error"
    assert fresh[-1].offset == format_offset(epoch, 4, 0)
    # Readers that had received the lost entry 4 ("a" at index 0, "b" at index 1):
    with pytest.raises(OffsetExpired, match="rolled back"):
        await collect(transport, "reused", after=format_offset(epoch, 4, 0))
    with pytest.raises(OffsetExpired, match="fewer than this offset names"):
        await collect(transport, "reused", after=format_offset(epoch, 4, 1))
    # Resuming before the rewritten entry gets the error; after the end, nothing.
    rest = await collect(transport, "reused", after=format_offset(epoch, 3, 1))
    assert [(e.type, e.data["error"]) for e in rest] == [("error", "producer_lost")]


class HoleInStorage(MemoryTransport):
    """Storage that lost entry ``missing`` (a hole inside what a page returns: a first page
    is 4 entries)."""

    missing = 3

    async def read(self, stream_id: str, epoch: int, after: int, limit: int) -> list[Entry]:
        entries = await super().read(stream_id, epoch, after, limit)
        return [e for e in entries if e.seq != self.missing]


async def test_a_hole_inside_a_page_delivers_the_entries_before_it_first() -> None:
    # Regression (issue 8): the whole page raised, a fresh reader got 0 events.
    transport = HoleInStorage()
    await written(transport, "holey", 6, lease_ms=60_000)
    consumer = StreamConsumer(transport, "holey")
    events = [await anext(consumer) for _ in range(4)]  # entries 1-2 first
    assert joined(events) == "ab" * 2
    with pytest.raises(OffsetExpired, match="entries 3-3 are no longer stored"):
        await anext(consumer)


class LateOldEpoch(MemoryTransport):
    """A live feed that delivers an entry of the replaced run late (Redis can)."""

    def subscribe(self, stream_id: str, epoch: int, after: int) -> Subscription:
        subscription = super().subscribe(stream_id, epoch, after)
        assert isinstance(subscription, QueueSubscription)
        subscription.push([token_entry(epoch - 1, after + 1, "old")])
        return subscription


async def test_a_late_entry_of_a_replaced_run_is_ignored() -> None:
    # Regression (issue 9): it raised a false OffsetExpired.
    transport = LateOldEpoch()
    gate = asyncio.Event()
    run = await StreamProducer(transport).start(tokens(4, pause=gate))
    consumer = StreamConsumer(transport, run.stream_id)
    first = [await anext(consumer) for _ in range(2)]  # read from storage
    reading = asyncio.create_task(collect_from(consumer))  # now live
    gate.set()
    events = first + await reading
    assert joined(events) == text_of(4) and events[-1].type == "end"


async def collect_from(consumer: StreamConsumer) -> list[Event]:
    return [event async for event in consumer]


class CountingChecks(MemoryTransport):
    def __init__(self) -> None:
        super().__init__()
        self.reaps = 0

    async def reap(self, stream_id: str, epoch: int, payload: bytes) -> bool:
        self.reaps += 1
        return await super().reap(stream_id, epoch, payload)


async def test_a_quiet_stream_is_checked_once_per_process_not_once_per_reader() -> None:
    # Regression (issue 9): every reader ran the reaper (1,000 readers ≈ 800 commands/s).
    transport = CountingChecks()
    await transport.create("quiet", owner="gone", lease_ms=300)
    readers = 200
    results = await asyncio.gather(*(collect(transport, "quiet") for _ in range(readers)))
    assert all([e.data["error"] for e in events] == ["producer_lost"] for events in results)
    # One check per half lease for the whole process (about 3 before the lease lapsed),
    # where each reader used to run its own.
    assert transport.reaps < readers // 4


class HeldChecks(MemoryTransport):
    """Each quiet-stream check (reap) waits at ``gate``; ``checking`` is set by the first."""

    def __init__(self) -> None:
        super().__init__()
        self.checking = asyncio.Event()
        self.gate = asyncio.Event()

    async def reap(self, stream_id: str, epoch: int, payload: bytes) -> bool:
        self.checking.set()
        await self.gate.wait()
        return await super().reap(stream_id, epoch, payload)


@pytest.mark.parametrize("both", [True, False])
async def test_a_reader_cancelled_with_the_reader_checking_for_it_stops(both: bool) -> None:
    # Found in review: a reader waiting for the quiet-stream check another reader makes
    # took that check's cancellation (its reader was cancelled) for its own cue to check
    # itself, also when it was cancelled too, at the same moment (a task group stopping
    # both, a server shutting down): its cancellation was lost, and it read on. Alone,
    # the first reader's cancellation still leaves the second to check for itself.
    transport = HeldChecks()
    epoch = (await transport.create("quiet", owner="gone", lease_ms=100)).epoch
    checking, waiting = StreamConsumer(transport, "quiet"), StreamConsumer(transport, "quiet")
    first = asyncio.create_task(anext(checking))
    await transport.checking.wait()  # the first reader checks the quiet stream
    second = asyncio.create_task(anext(waiting))
    waiter = _checks_of(transport)[("quiet", epoch)].waiter
    assert waiter is not None
    # The second reader waits for the first one's check.
    await eventually(holds(lambda: bool(waiter._callbacks)))  # type: ignore[attr-defined]
    first.cancel()
    if both:
        second.cancel()
    transport.gate.set()
    await asyncio.wait([first, second])
    assert first.cancelled()
    if both:
        assert second.cancelled()
    else:
        assert (await second).data["error"] == "producer_lost"
    await checking.aclose()
    await waiting.aclose()


class Unhashable(MemoryTransport):
    __hash__ = None  # type: ignore[assignment]  # e.g. a dataclass transport with eq=True


async def test_checks_of_a_quiet_stream_work_with_an_unhashable_transport() -> None:
    transport = Unhashable()
    await transport.create("quiet", owner="gone", lease_ms=200)
    events = await collect(transport, "quiet")
    assert [e.data["error"] for e in events] == ["producer_lost"]


class CountingReads(MemoryTransport):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def read(self, stream_id: str, epoch: int, after: int, limit: int) -> list[Entry]:
        self.reads += 1
        return await super().read(stream_id, epoch, after, limit)


async def test_a_reader_attaching_as_its_run_starts_follows_it_without_reading_storage() -> None:
    # Issue 8: a reader attaching to a run with nothing written yet read storage once
    # before it subscribed: a round trip that only found what the subscription gets.
    transport = CountingReads()
    gate = asyncio.Event()

    async def source():  # nothing written until the reader is attached
        await gate.wait()
        for i in range(3):
            yield f"t{i} "

    run = await StreamProducer(transport).start(source())
    consumer = StreamConsumer(transport, run.stream_id)
    first = asyncio.ensure_future(consumer.__anext__())

    async def attached() -> bool:  # following the live feed
        return consumer._subscription is not None

    await eventually(attached)
    gate.set()
    events = [await first] + [event async for event in consumer]
    assert joined(events) == "t0 t1 t2 "
    assert transport.reads == 0
    # A reader coming after the run ended replays it from storage as before.
    assert joined(await collect(transport, run.stream_id)) == "t0 t1 t2 "
    assert transport.reads > 0


async def test_a_woken_reader_looks_afresh_not_at_another_readers_recent_check() -> None:
    # Found in review: a reader woken by its transport (the stream deleted, restarted, or
    # stored past the live feed) looked through the quiet-stream check other readers of
    # the stream share, which answers from a check made up to half a lease ago. With that
    # check made just before the delete, the reader waited out half the lease.
    transport = MemoryTransport()
    gate = asyncio.Event()  # never set: a slow model
    run = await StreamProducer(transport, lease=7200).start(tokens(4, pause=gate))
    consumer = StreamConsumer(transport, run.stream_id)
    await anext(consumer)
    rest = asyncio.create_task(collect_from(consumer))

    async def following() -> bool:
        return bool(transport._streams[run.stream_id].subscribers)

    await eventually(following)
    info = await transport.info(run.stream_id)
    checks = _checks_of(transport)  # another reader's check, a moment ago: running
    checks[(run.stream_id, run.epoch)] = _Check(at=asyncio.get_running_loop().time(), info=info)
    assert await transport.delete(run.stream_id)
    # (30 s bounds a hang against the hour it used to wait; no readiness is timed.)
    with pytest.raises(OffsetExpired):
        await asyncio.wait_for(rest, timeout=30)
    gate.set()
    with pytest.raises(LeaseLost):  # deleted: fenced
        await run.wait()


async def test_a_reader_past_the_end_subscribes_at_what_is_stored_then_where_it_is() -> None:
    # A reader resuming past the end of a running stream subscribes at what is stored (a
    # feed shared by the process's readers must not start past it); one that subscribes
    # again later (its wait was cancelled) does so where it is, not at the end it saw first.
    class Recording(MemoryTransport):
        def __init__(self) -> None:
            super().__init__()
            self.afters: list[int] = []

        def subscribe(self, stream_id: str, epoch: int, after: int) -> Subscription:
            self.afters.append(after)
            return super().subscribe(stream_id, epoch, after)

    transport = Recording()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def source():
        while (item := await queue.get()) is not None:
            yield item

    async def put(text: str, seq: int) -> None:  # one entry per token
        await queue.put(text)

        async def stored() -> bool:
            info = await transport.info("s")
            return info is not None and info.last_seq == seq

        await eventually(stored)

    run = await StreamProducer(transport).start(source(), stream_id="s")
    await put("a ", 1)
    reader = StreamConsumer(transport, "s", after=format_offset(run.epoch, 3, 0))
    first = asyncio.ensure_future(anext(reader))
    for seq, text in enumerate(("b ", "c ", "d "), start=2):
        await put(text, seq)
    assert (await asyncio.wait_for(first, 10)).data["text"] == "d "
    waiting = asyncio.ensure_future(anext(reader))

    async def waits_live() -> bool:
        subscription = reader._subscription
        return isinstance(subscription, QueueSubscription) and subscription._waiter is not None

    await eventually(waits_live)
    waiting.cancel()  # e.g. asyncio.wait_for() timing out: the subscription is closed
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await put("e ", 5)
    assert (await asyncio.wait_for(anext(reader), 10)).data["text"] == "e "
    assert transport.afters == [1, 4]
    await reader.aclose()
    await queue.put(None)
    await run.wait()


@pytest.mark.parametrize("epoch", [0, -1, True, 1.0, "1"])
def test_an_epoch_that_no_run_has_is_refused(epoch: object) -> None:
    with pytest.raises(ConfigurationError, match="epoch must be"):
        StreamConsumer(MemoryTransport(), "s", epoch=epoch)  # type: ignore[arg-type]


async def test_a_consumer_read_from_two_tasks_refuses_the_second_not_hangs_the_first() -> None:
    # Regression: the second task's wait replaced the first's, which then waited for ever
    # (the stream had ended).
    gate = asyncio.Event()
    transport = MemoryTransport()
    run = await StreamProducer(transport).start(tokens(4, pause=gate), stream_id="two")
    consumer = StreamConsumer(transport, "two")

    async def read() -> list[str]:
        return [event.type async for event in consumer]

    first = asyncio.ensure_future(read())

    async def waits_live() -> bool:
        subscription = consumer._subscription
        return isinstance(subscription, QueueSubscription) and subscription._waiter is not None

    await eventually(waits_live)
    with pytest.raises(RuntimeError, match="one task at a time"):
        await asyncio.wait_for(read(), timeout=10)
    gate.set()
    assert await asyncio.wait_for(first, timeout=10) == ["token"] * 4 + ["end"]
    assert await run.wait() == "completed"


def test_offsets_and_page_sizes_of_the_wrong_type_are_typed_errors() -> None:
    # Regression: an int offset was an AttributeError, a float or None page size a
    # TypeError (the float only once reading began).
    from resumable_stream import InvalidOffset

    with pytest.raises(InvalidOffset, match="a string"):
        StreamConsumer(MemoryTransport(), "s", after=5)  # type: ignore[arg-type]
    for size in (1.5, None, 0, True):
        with pytest.raises(ConfigurationError, match="page_size"):
            StreamConsumer(MemoryTransport(), "s", page_size=size)  # type: ignore[arg-type]


async def test_a_finished_stream_kept_by_the_memory_transport_holds_its_bytes_only() -> None:
    # Regression: each stored entry held orjson's whole output buffer (4 KiB with orjson
    # 3.12+): a 2,000-token answer written token by token kept 8 MB for the retention
    # (an hour by default) instead of 80 KB.
    transport = MemoryTransport()
    producer = StreamProducer(transport, max_entry_events=1)  # an entry per event
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        run = await producer.start(tokens(2000))
        assert await run.wait() == "completed"
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    stored = transport._streams[run.stream_id].payloads
    assert len(stored) == 2001
    assert held < 2001 * 200  # about 80 bytes an entry, not 4 KiB


async def test_an_entry_that_fails_to_open_while_following_live_releases_the_subscription() -> None:
    # Regression: opening a live entry ran outside the read's error handling, so a reader
    # that raised there (an entry it cannot decode) kept its subscription until collected.
    transport = MemoryTransport()
    info = await transport.create("s", "w", 60_000)
    await transport.append(
        "s", "w", Entry(info.epoch, 1, encode_entry([("token", {"text": "a"})])), 1
    )
    consumer = StreamConsumer(transport, "s")
    assert (await anext(consumer)).data["text"] == "a"
    waiting = asyncio.ensure_future(anext(consumer))  # follows live
    stream = transport._streams["s"]

    async def subscribed() -> bool:
        return len(stream.subscribers) == 1

    await eventually(subscribed)
    await transport.append("s", "w", Entry(info.epoch, 2, b"not json"), 1)
    with pytest.raises(orjson.JSONDecodeError):
        await waiting
    assert stream.subscribers == set()
