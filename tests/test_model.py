"""A model-based test of the core: producers, consumers, the codec and the transports.

Hypothesis generates scenarios over a few streams: sources yielding random mixes of events
(plain, unicode, empty and long tokens, tokens with metadata, custom events, dicts) in
bursts or one at a time, sources that end, raise or relay a terminal event, events too
large to store, cancels from the run, its producer or another producer, deletes, a new run
of a stream id once the last one ended, and readers attaching at offsets they saw before,
reading a few events and leaving, or following a run to its end, from this transport or a
second handle on the same storage. Producer tunables (buffer, coalescing, entry limits,
event size limit) and readers' page sizes vary too.

The pace is set by the test, never by sleeps: each source waits on a queue, and a step that
feeds it waits until the source asks for its next item (the items before it are then in the
run's buffer, bound to be written).

The model is the list of events each run accepted. Properties:

* every reader gets exactly the events after its offset, in order, with no gap and no
  duplicate, and one that reads on ends with the run's one terminal event;
* offsets strictly increase (as strings and as positions), entry by entry and event by
  event without holes, and a new run's offsets are above its predecessor's;
* resuming from any offset of a run gives exactly the rest of it;
* each run's terminal event and status match what happened (end, raise, relay, too large,
  cancel, delete);
* readers fail only as allowed (``OffsetExpired`` for a run replaced or deleted,
  ``StreamNotFound`` for a deleted stream);
* no task is left running, and no Redis key is left without a TTL.

Each example runs in its own event loop (``asyncio.run``). ``RSTREAM_MODEL_EXAMPLES``
raises the number of examples for a longer hunt (the default keeps the test to seconds).
"""

from __future__ import annotations

import asyncio
import os
import string
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from resumable_stream import (
    Event,
    LeaseLost,
    OffsetExpired,
    StreamAlreadyRunning,
    StreamConsumer,
    StreamNotFound,
    StreamProducer,
    Transport,
    from_url,
    parse_offset,
)
from resumable_stream._producer import _LEFT_BEHIND, Run
from resumable_stream.transports.memory import MemoryTransport

EXAMPLES = int(os.environ.get("RSTREAM_MODEL_EXAMPLES", "0")) or None
#: Seconds an example may take before it counts as hung (a safety net, not a pace).
HANG = 20.0
STATUS_OF = {"end": "completed", "error": "error", "cancelled": "cancelled"}

# -- what sources yield ----------------------------------------------------------------------

_TEXT = st.characters(exclude_categories=("Cs",))  # (a lone surrogate cannot be stored)
texts = st.one_of(
    st.just(""),
    st.text(string.ascii_letters + string.digits + ' .,\n"\\', max_size=6),
    st.text(_TEXT, max_size=6),
    st.text(_TEXT, min_size=40, max_size=160),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_TEXT, max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(_TEXT, max_size=3), inner, max_size=3)
    ),
    max_leaves=5,
)
metas = st.sampled_from([None, "m1", "m2", 7])


@dataclass(frozen=True)
class Finish:
    """The source returns."""


@dataclass(frozen=True)
class Boom:
    """The source raises ValueError(message)."""

    message: str


items = st.one_of(
    texts.map(lambda t: ("tok", t)),
    st.tuples(st.just("meta"), texts, metas, metas),
    st.tuples(st.just("odd"), json_values, metas),  # a token the codec cannot shorten
    st.tuples(st.just("custom"), st.text(_TEXT, max_size=4), json_values),
    st.tuples(
        st.just("dict"),
        st.dictionaries(
            st.sampled_from(["a", "b", "text", "ns", "data", "node"]), json_values, max_size=3
        ),
    ),
)
last_items = st.one_of(
    st.just(("finish",)),
    st.text(string.ascii_letters, min_size=1, max_size=30).map(lambda m: ("boom", m)),
    st.sampled_from([("relay", "end"), ("relay", "error"), ("relay", "cancelled")]),
)
bursts = st.tuples(
    st.lists(items, min_size=1, max_size=5),
    st.one_of(st.none(), st.none(), last_items),  # mostly nothing: the run goes on
).map(lambda b: b[0] + ([b[1]] if b[1] else []))


def to_source(item: tuple[Any, ...]) -> Any:
    """What the source yields for a generated item."""
    kind = item[0]
    if kind == "tok":
        return item[1]
    if kind == "meta":
        return {"type": "token", "data": {"text": item[1], "message_id": item[2], "node": item[3]}}
    if kind == "odd":
        return {"type": "token", "data": {"text": item[1], "message_id": item[2], "node": None}}
    if kind == "custom":
        return {"type": "custom", "data": {"name": item[1], "data": item[2]}}
    if kind == "dict":
        return dict(item[1])
    if kind == "finish":
        return Finish()
    if kind == "boom":
        return Boom(item[1])
    if kind == "relay":
        return {"type": item[1], "data": relayed(item[1])}
    raise AssertionError(item)


def relayed(kind: str) -> dict[str, Any]:
    return {"end": {}, "error": {"error": "relayed", "message": "x"}, "cancelled": {"reason": "r"}}[
        kind
    ]


def expected(item: tuple[Any, ...]) -> tuple[str, dict[str, Any]] | None:
    """The event the model expects for a (non-terminal) item, None for none."""
    kind = item[0]
    if kind == "tok":
        return ("token", {"text": item[1], "message_id": None, "node": None}) if item[1] else None
    if kind in ("meta", "odd"):
        data = {"text": item[1], "message_id": item[2], "node": item[3] if kind == "meta" else None}
        return ("token", data)
    if kind == "custom":
        return ("custom", {"name": item[1], "data": item[2]})
    if kind == "dict":
        return ("update", {"mode": None, "node": None, "data": dict(item[1])})
    raise AssertionError(item)


def too_large(kind: str, data: dict[str, Any], limit: int) -> bool:
    return len(orjson.dumps([kind, data])) > limit


# -- scenarios -------------------------------------------------------------------------------

producer_options = st.fixed_dictionaries(
    {
        "max_buffer": st.integers(1, 6),
        "coalesce_events": st.integers(1, 8),
        "coalesce_delay": st.sampled_from([0.0, 0.0005, 0.002]),
        "max_entry_events": st.integers(1, 6),
        "max_entry_bytes": st.sampled_from([1, 40, 400, 256 * 1024]),
        "max_event_bytes": st.sampled_from([64, 120, 400, 1024 * 1024]),
    }
)
picks = st.one_of(st.none(), st.integers(0, 1000), st.just(-1))  # -1: the last offset seen
streams = st.integers(0, 2)
reads = st.tuples(
    st.just("read"),
    streams,
    picks,
    st.integers(1, 6),
    st.integers(1, 4),
    st.booleans(),
    st.booleans(),
)
ops = st.one_of(
    st.tuples(st.just("push"), streams, bursts),
    st.tuples(st.just("push"), streams, bursts),
    st.tuples(st.just("push"), streams, bursts),
    st.tuples(st.just("finish_nowait"), streams),
    st.tuples(st.just("cancel"), streams, st.sampled_from(["run", "producer", "other"])),
    st.tuples(st.just("restart"), streams),
    st.tuples(st.just("delete"), streams),
    st.tuples(st.just("conflict"), streams),
    reads,
    reads,  # twice: weighted, as pushes are
    st.tuples(st.just("follow"), streams, picks, st.integers(1, 4), st.booleans()),
)
scenarios = st.fixed_dictionaries(
    {
        "options": st.lists(producer_options, min_size=3, max_size=3),
        "ops": st.lists(ops, max_size=24),
    }
)


# -- the model -------------------------------------------------------------------------------


class Gate:
    """A source fed by the test: yields what is put, one item per request."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.idle = asyncio.Event()  # waiting for an item, with none queued
        self.closed = asyncio.Event()

    async def source(self) -> AsyncIterator[Any]:
        try:
            while True:
                if self.queue.empty():
                    self.idle.set()
                item = await self.queue.get()
                if isinstance(item, Finish):
                    return
                if isinstance(item, Boom):
                    raise ValueError(item.message)
                yield item
        finally:
            self.closed.set()

    async def feed(self, values: list[Any]) -> None:
        """Put ``values`` and wait until the source asks for more (or ended)."""
        self.idle.clear()
        for value in values:
            self.queue.put_nowait(value)
        await first_of(self.idle.wait(), self.closed.wait())


async def first_of(*waits: Any) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


#: A terminal event the model accepts: (type, data, exact), data compared as a subset
#: unless exact.
Terminal = tuple[str, dict[str, Any], bool]


@dataclass
class RunModel:
    run: Run
    gate: Gate
    limit: int  # max_event_bytes
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    terminals: list[Terminal] | None = None  # None: not decided yet
    open: bool = True  # the source takes items
    deleted: bool = False  # deleted while it was the stream's run
    settled: bool = False  # run.wait() returned (or raised) already
    finishing: bool = False  # its end was queued, maybe not taken yet (finish_nowait)
    full: list[Event] | None = None  # the whole run, read once it ended
    seen: dict[str, tuple[int, str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        return self.run.epoch

    def decide(self, terminals: list[Terminal]) -> None:
        if self.terminals is None:
            self.terminals = terminals
        self.open = False

    def length(self) -> int:
        """Events sure to be written: those accepted, and the terminal once decided."""
        return len(self.events) + (self.terminals is not None)

    def matches(self, index: int, event: Event) -> bool:
        if index < len(self.events):
            return (event.type, event.data) == self.events[index]
        if index == len(self.events) and self.terminals is not None:
            return any(
                event.type == kind
                and (event.data == data if exact else data.items() <= event.data.items())
                for kind, data, exact in self.terminals
            )
        return False


@dataclass
class StreamModel:
    stream_id: str
    producer: StreamProducer
    runs: list[RunModel] = field(default_factory=list)
    gone: bool = False  # deleted, and no run since
    ever_deleted: bool = False
    pool: list[str] = field(default_factory=list)  # offsets seen by readers, in order

    @property
    def current(self) -> RunModel:
        return self.runs[-1]

    def run_of(self, epoch: int) -> RunModel | None:
        return next((r for r in self.runs if r.epoch == epoch), None)


@dataclass
class Follower:
    stream: StreamModel
    after: str | None
    task: asyncio.Task[tuple[list[Event], Exception | None]]


class Scenario:
    def __init__(self, transport: Transport, peer: Transport, options: list[dict[str, Any]]):
        self.transport = transport
        self.peer = peer
        self.options = options
        self.other = StreamProducer(peer)
        self.streams: list[StreamModel] = []
        self.followers: list[Follower] = []

    async def setup(self) -> None:
        for number, options in enumerate(self.options):
            producer = StreamProducer(self.transport, **options)
            stream = StreamModel(f"s{number}-{uuid.uuid4().hex[:8]}", producer)
            self.streams.append(stream)
            await self.start(stream)

    async def start(self, stream: StreamModel) -> None:
        gate = Gate()
        previous = stream.runs[-1].epoch if stream.runs else 0
        run = await stream.producer.start(gate.source(), stream_id=stream.stream_id)
        assert run.epoch > previous, "a new run's epoch is above the last one's"
        stream.runs.append(RunModel(run, gate, stream.producer.max_event_bytes))
        stream.gone = False

    # -- steps -------------------------------------------------------------------------

    async def step(self, op: tuple[Any, ...]) -> None:
        stream = self.streams[op[1]]
        await getattr(self, f"do_{op[0]}")(stream, *op[2:])

    async def do_push(self, stream: StreamModel, burst: list[tuple[Any, ...]]) -> None:
        model = stream.current
        if not model.open or stream.gone:
            return
        values = []
        for item in burst:
            values.append(to_source(item))
            kind = item[0]
            if kind == "finish":
                model.decide([("end", {}, True)])
            elif kind in ("boom", "relay"):
                if kind == "boom":
                    terminal = ("error", {"error": "ValueError", "message": item[1]})
                else:
                    terminal = (item[1], relayed(item[1]))
                if not too_large(*terminal, model.limit):
                    model.decide([(*terminal, True)])
                elif terminal[0] == "error" and not too_large(
                    "error", {**terminal[1], "message": ""}, model.limit
                ):
                    # A source's error too long to store keeps its class, its message cut.
                    model.decide([("error", {"error": terminal[1]["error"]}, False)])
                else:
                    model.decide([("error", {"error": "EventTooLarge"}, False)])
            else:
                event = expected(item)
                if event is not None and too_large(*event, model.limit):
                    model.decide([("error", {"error": "EventTooLarge"}, False)])
                elif event is not None:
                    model.events.append(event)
            if not model.open:
                break
        await model.gate.feed(values)

    async def do_finish_nowait(self, stream: StreamModel) -> None:
        model = stream.current
        if not model.open or stream.gone:
            return
        model.gate.queue.put_nowait(Finish())
        model.decide([("end", {}, True)])
        model.finishing = True

    async def do_cancel(self, stream: StreamModel, how: str) -> None:
        model = stream.current
        if stream.gone:
            return
        if model.terminals is None:
            model.decide([("cancelled", {"reason": "requested"}, True)])
        elif model.finishing and not model.gate.closed.is_set():
            # The source may not have taken its end yet: either may win.
            model.terminals = [*model.terminals, ("cancelled", {"reason": "requested"}, True)]
        if how == "run":
            status = await model.run.cancel()
            await self.settle(stream, model, status)
            return
        producer = stream.producer if how == "producer" else self.other
        accepted = await producer.cancel(stream.stream_id)
        if model.settled:
            assert not accepted, "a cancel of a stream that ended is refused"

    async def settle(self, stream: StreamModel, model: RunModel, status: str | None) -> None:
        """Check what run.wait() gave, once."""
        if status is None:
            try:
                status = await model.run.wait()
            except LeaseLost:
                assert model.deleted, "a run not deleted is not fenced"
                model.settled = True
                return
        assert model.terminals is not None
        assert status in {STATUS_OF[kind] for kind, _, _ in model.terminals}, (
            status,
            model.terminals,
        )
        model.settled = True

    async def do_restart(self, stream: StreamModel) -> None:
        model = stream.current
        if model.terminals is None and not model.deleted:
            return  # still running: its end is not decided
        if not model.settled:
            await self.settle(stream, model, None)
        if not stream.gone:
            model.full = await self.replay(stream, model)
        await self.start(stream)

    async def do_delete(self, stream: StreamModel) -> None:
        model = stream.current
        existed = not stream.gone
        assert await self.transport.delete(stream.stream_id) == existed
        if not existed:
            return
        stream.gone = stream.ever_deleted = True
        if model.settled:
            return
        model.deleted = True
        undecided = model.terminals is None
        model.open = False
        try:
            status = await model.run.wait()
        except LeaseLost:
            model.settled = True
            return
        assert not undecided, f"a run deleted before its end still ended {status}"
        await self.settle(stream, model, status)

    async def do_conflict(self, stream: StreamModel) -> None:
        model = stream.current
        if model.terminals is not None or stream.gone:
            return  # it may have ended: a new run could take the id
        gate = Gate()
        with pytest.raises(StreamAlreadyRunning):
            await self.other.start(gate.source(), stream_id=stream.stream_id)

    def pick(self, stream: StreamModel, choice: int | None) -> str | None:
        if choice is None or not stream.pool:
            return None
        return stream.pool[-1] if choice < 0 else stream.pool[choice % len(stream.pool)]

    def reader(
        self, stream: StreamModel, after: str | None, pin: bool, page: int, peer: bool
    ) -> StreamConsumer:
        epoch = None
        if pin:
            epoch = parse_offset(after).epoch if after else stream.current.epoch
        transport = self.peer if peer else self.transport
        return StreamConsumer(transport, stream.stream_id, after=after, epoch=epoch, page_size=page)

    async def do_read(
        self, stream: StreamModel, choice: int | None, count: int, page: int, pin: bool, peer: bool
    ) -> None:
        """Read a few events now: the outcome is known in advance."""
        after = self.pick(stream, choice)
        model = stream.current
        if stream.gone:
            with pytest.raises(StreamNotFound):
                await collect(self.reader(stream, after, pin, page, peer), 1)
            return
        if after is not None and parse_offset(after).epoch != model.epoch:
            with pytest.raises(OffsetExpired):
                await collect(self.reader(stream, after, pin, page, peer), 1)
            return
        start = 0 if after is None else model.seen[after][0] + 1
        available = model.length() - start
        if available <= 0:
            if after is not None and start == model.length() and model.terminals is not None:
                # After the terminal event: nothing, at once.
                assert await collect(self.reader(stream, after, pin, page, peer), None) == []
            return
        got = await collect(self.reader(stream, after, pin, page, peer), min(count, available))
        self.check_slice(stream, model, after, start, got)

    async def do_follow(
        self, stream: StreamModel, choice: int | None, page: int, peer: bool
    ) -> None:
        """A reader that follows the stream to its end, in the background."""
        after = self.pick(stream, choice)
        consumer = self.reader(stream, after, False, page, peer)

        async def follow() -> tuple[list[Event], Exception | None]:
            got: list[Event] = []
            try:
                async with consumer:
                    async for event in consumer:
                        got.append(event)
            except (OffsetExpired, StreamNotFound) as exc:
                return got, exc
            return got, None

        self.followers.append(Follower(stream, after, asyncio.create_task(follow())))

    # -- checks ------------------------------------------------------------------------

    def check_slice(
        self, stream: StreamModel, model: RunModel, after: str | None, start: int, got: list[Event]
    ) -> None:
        """``got`` are the events of ``model`` from index ``start`` on, read after ``after``."""
        previous = after
        for index, event in enumerate(got, start):
            position = parse_offset(event.offset)
            assert position.epoch == model.epoch, (event, model.epoch)
            if previous is None:
                assert (position.seq, position.event) == (1, 0), f"first event at {event.offset}"
            else:
                last = parse_offset(previous)
                assert previous < event.offset, f"offsets go back: {previous} then {event.offset}"
                assert (position.seq, position.event) in (
                    (last.seq, last.event + 1),
                    (last.seq + 1, 0),
                ), f"a gap between {previous} and {event.offset}"
            assert model.matches(index, event), (
                f"event {index} of run {model.epoch} is {event}, expected "
                f"{model.events[index] if index < len(model.events) else model.terminals}"
            )
            known = model.seen.get(event.offset)
            if known is None:
                model.seen[event.offset] = (index, event.type, event.data)
                stream.pool.append(event.offset)
            else:
                assert known == (index, event.type, event.data), (
                    f"offset {event.offset}: seen as {known}, now as {(index, event)}"
                )
            previous = event.offset

    async def replay(self, stream: StreamModel, model: RunModel) -> list[Event]:
        """The whole run (ended), checked against the model."""
        full = await collect(
            StreamConsumer(self.transport, stream.stream_id, epoch=model.epoch), None
        )
        assert len(full) == model.length(), (full, model.events, model.terminals)
        self.check_slice(stream, model, None, 0, full)
        return full

    async def finish(self) -> None:
        # End every run still going (a cancel, unless its end is decided), then check.
        for stream in self.streams:
            model = stream.current
            if not stream.gone and model.terminals is None:
                await self.do_cancel(stream, "run")
        for stream in self.streams:
            model = stream.current
            if not model.settled:
                await self.settle(stream, model, None)
            if not stream.gone:
                model.full = await self.replay(stream, model)
                info = await self.transport.info(stream.stream_id)
                assert info is not None
                assert info.status == STATUS_OF[model.full[-1].type]
                assert info.last_offset == model.full[-1].offset
        for follower in self.followers:
            got, error = await follower.task
            self.check_follower(follower, got, error)
        for stream in self.streams:
            # Offsets of later runs sort after those of earlier ones.
            offsets = [e.offset for run in stream.runs for e in run.full or ()]
            assert offsets == sorted(offsets)
            model = stream.current
            if stream.gone:
                continue
            # A resume from every offset of the run gives exactly the rest of it.
            full = model.full
            assert full is not None
            for index, event in enumerate(full):
                rest = await collect(
                    StreamConsumer(
                        self.peer, stream.stream_id, after=event.offset, page_size=1 + index % 3
                    ),
                    None,
                )
                assert rest == full[index + 1 :], f"resumed after {event.offset}"

    def check_follower(self, follower: Follower, got: list[Event], error: Exception | None) -> None:
        stream, after = follower.stream, follower.after
        epoch = parse_offset(after).epoch if after else None
        if got:
            epoch = parse_offset(got[0].offset).epoch
        model = stream.run_of(epoch) if epoch is not None else None
        note(f"follower of {stream.stream_id} after {after}: {len(got)} events, {error!r}")
        if model is not None:
            start = 0 if after is None else model.seen[after][0] + 1
            self.check_slice(stream, model, after, start, got)
        if error is None:
            # Read to the end: the rest of the run, its terminal event last (nothing for a
            # reader after it).
            assert model is not None, "a reader that ends read some run"
            assert len(got) == model.length() - start
            assert not got or got[-1].terminal
        elif isinstance(error, StreamNotFound):
            assert stream.ever_deleted, error
        else:
            assert isinstance(error, OffsetExpired), error
            replaced = model is None or model is not stream.current or model.deleted
            assert replaced or stream.ever_deleted, (
                f"a reader of a run neither replaced nor deleted expired: {error}"
            )


async def collect(consumer: StreamConsumer, limit: int | None) -> list[Event]:
    got: list[Event] = []
    async with consumer:
        async for event in consumer:
            got.append(event)
            if limit is not None and len(got) >= limit:
                break
    return got


async def check_ttls(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        async for key in client.scan_iter(match=f"{prefix}:*"):
            assert await client.pttl(key) != -1, f"key {key!r} has no TTL"
    finally:
        await client.aclose()


async def play(url: str | None, scenario: dict[str, Any]) -> None:
    prefix = f"m{uuid.uuid4().hex[:10]}"
    transport: Transport
    if url is None:
        transport = peer = MemoryTransport()
    else:
        transport, peer = from_url(url, prefix=prefix), from_url(url, prefix=prefix)
    world = Scenario(transport, peer, scenario["options"])
    try:
        async with asyncio.timeout(HANG):
            await world.setup()
            for op in scenario["ops"]:
                note(f"step {op!r}")
                await world.step(op)
            await world.finish()
            if url is not None:
                await check_ttls(url, prefix)
    finally:
        for follower in world.followers:
            follower.task.cancel()
        for stream in world.streams:
            await stream.producer.aclose()
        await world.other.aclose()
        await transport.aclose()
        await peer.aclose()
    # No task left behind: allow the loop a few turns for tasks just cancelled.
    current = asyncio.current_task()
    for _ in range(50):
        left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not left:
            break
        await asyncio.sleep(0)
    assert not left, f"tasks left running: {left}"
    assert not _LEFT_BEHIND


@pytest.mark.parametrize(
    ("kind", "examples"), [("memory", 120), pytest.param("redis", 40, marks=pytest.mark.redis)]
)
@pytest.mark.timeout(180)
def test_model(kind: str, examples: int, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_url") if kind == "redis" else None

    @settings(
        max_examples=EXAMPLES or examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
    @given(scenario=scenarios)
    def check(scenario: dict[str, Any]) -> None:
        asyncio.run(play(url, scenario))

    check()
