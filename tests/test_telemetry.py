"""Metrics and traces (resumable_stream.telemetry) read back after real runs.

Each test records on its own OpenTelemetry SDK providers: an in-memory metric reader and
an in-memory span exporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from resumable_stream import (
    LeaseLost,
    StreamConsumer,
    StreamProducer,
    Transport,
    TransportClosed,
    TransportError,
    telemetry,
)
from resumable_stream._codec import encode_entry
from resumable_stream.transports import Entry, Status
from resumable_stream.transports.memory import MemoryTransport
from resumable_stream.transports.redis import RedisTransport
from tests._helpers import collect, eventually, holds, tokens
from tests._services import RedisServer

Points = dict[tuple[tuple[str, Any], ...], Any]


def read_points(reader: InMemoryMetricReader, name: str) -> Points:
    """The data points of metric ``name`` (values, or histogram counts), by attributes."""
    found: Points = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        key = tuple(sorted(point.attributes.items()))
                        found[key] = getattr(point, "value", getattr(point, "count", None))
    return found


@dataclass
class Recorded:
    """What the library recorded since the fixture began.

    The counters of entries and events are the process's totals (observable counters), so
    their values when the fixture began are subtracted.
    """

    provider: MeterProvider
    reader: InMemoryMetricReader
    spans: InMemorySpanExporter
    tracer: trace.Tracer
    before: dict[str, Points] = field(default_factory=dict)

    def points(self, name: str) -> Points:
        """The data points of metric ``name`` (values, or histogram counts), by attributes."""
        found = self._read(name)
        for key, value in self.before.get(name, {}).items():
            found[key] = found.get(key, 0) - value
        return found

    def _read(self, name: str) -> Points:
        return read_points(self.reader, name)

    def value(self, name: str, **attributes: Any) -> Any:
        return self.points(name).get(tuple(sorted(attributes.items())), 0)


PROCESS_TOTALS = (
    "resumable_stream.events.appended",
    "resumable_stream.entries.appended",
    "resumable_stream.events.delivered",
)


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    # A reader an earlier test dropped (failing mid-read) still counts as live until it is
    # collected: collected now, its ResourceWarning names it rather than a wrong count here.
    gc.collect()
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    provider = MeterProvider(metric_readers=[reader])
    telemetry.configure(meter_provider=provider, tracer_provider=tracer_provider)
    recorded = Recorded(provider, reader, spans, tracer_provider.get_tracer("tests"))
    recorded.before = {name: recorded._read(name) for name in PROCESS_TOTALS}
    yield recorded
    telemetry.configure()  # back to the global (no-op) providers


async def test_a_run_and_its_readers_are_counted(transport: Transport, recorded: Recorded) -> None:
    gate = asyncio.Event()
    run = await StreamProducer(transport).start(tokens(300, pause=gate))
    reading = asyncio.create_task(collect(transport, run.stream_id))

    async def following_live() -> bool:  # the reader caught up and waits for the rest
        return recorded.value("resumable_stream.consumers.live") == 1

    await eventually(following_live)
    gate.set()
    events = await reading
    assert await run.wait() == "completed"
    info = await transport.info(run.stream_id)
    assert info is not None

    assert recorded.value("resumable_stream.runs.started") == 1
    assert recorded.points("resumable_stream.runs.ended") == {(("status", "completed"),): 1}
    assert recorded.value("resumable_stream.events.appended") == len(events) == 301
    assert recorded.value("resumable_stream.entries.appended") == info.last_seq
    # Sampled: every entry's append, but for those that ended within 10 ms of another's.
    assert 1 <= recorded.value("resumable_stream.append.duration") <= info.last_seq
    assert recorded.value("resumable_stream.consumers.live") == 0
    assert recorded.value("resumable_stream.events.delivered") == 301
    assert recorded.value("resumable_stream.resumes") == 0

    rest = await collect(transport, run.stream_id, after=events[99].offset)
    assert len(rest) == 201
    assert recorded.value("resumable_stream.resumes") == 1
    assert recorded.value("resumable_stream.events.delivered") == 301 + 201


async def test_the_live_consumers_stay_right_on_a_provider_configured_meanwhile(
    transport: Transport, recorded: Recorded
) -> None:
    # Regression: consumers.live was an up-down counter of the provider configured when a
    # consumer started: one that stopped after configure() took the new provider's below 0.
    gate = asyncio.Event()
    run = await StreamProducer(transport).start(tokens(20, pause=gate))
    reading = asyncio.create_task(collect(transport, run.stream_id))

    async def following_live() -> bool:
        return recorded.value("resumable_stream.consumers.live") == 1

    await eventually(following_live)
    reader = InMemoryMetricReader()
    telemetry.configure(meter_provider=MeterProvider(metric_readers=[reader]))
    assert read_points(reader, "resumable_stream.consumers.live") == {(): 1}
    gate.set()
    await reading
    assert await run.wait() == "completed"
    assert read_points(reader, "resumable_stream.consumers.live") == {(): 0}


async def test_a_reader_leaving_inside_an_entry_counts_the_events_it_got(
    transport: Transport, recorded: Recorded
) -> None:
    info = await transport.create("five", owner="me", lease_ms=5000)
    items = [("token", {"text": t, "message_id": None, "node": None}) for t in "abcde"]
    entry = Entry(info.epoch, 1, encode_entry([*items, ("end", {})]))
    await transport.append("five", "me", entry, 6, final="completed")

    async with StreamConsumer(transport, "five") as consumer:
        assert [(await anext(consumer)).data["text"] for _ in range(2)] == ["a", "b"]
    assert recorded.value("resumable_stream.events.delivered") == 2
    assert len(await collect(transport, "five")) == 6
    assert recorded.value("resumable_stream.events.delivered") == 8


async def test_a_reader_dropped_inside_an_entry_counts_the_events_it_got(
    transport: Transport, recorded: Recorded
) -> None:
    # Regression: a reader left by `break` without aclose() (the garbage collector ends it)
    # counted none of the events it had been handed of its last entry.
    info = await transport.create("five", owner="me", lease_ms=5000)
    items = [("token", {"text": t, "message_id": None, "node": None}) for t in "abcde"]
    await transport.append("five", "me", Entry(info.epoch, 1, encode_entry(items)), 5)

    async def first_two() -> list[str]:
        got = []
        async for event in StreamConsumer(transport, "five"):
            got.append(event.data["text"])
            if len(got) == 2:
                break
        return got

    assert await first_two() == ["a", "b"]
    gc.collect()
    assert recorded.value("resumable_stream.events.delivered") == 2


async def test_a_reaped_run_is_counted(transport: Transport, recorded: Recorded) -> None:
    await transport.create("orphan", owner="gone", lease_ms=200)  # what a kill -9 leaves
    events = await collect(transport, "orphan")
    assert [e.data.get("error") for e in events] == ["producer_lost"]
    assert recorded.points("resumable_stream.reaps") == {(("error", "producer_lost"),): 1}


async def test_a_reservation_no_worker_started_is_told_from_a_lost_producer(
    transport: Transport, recorded: Recorded
) -> None:
    # Regression: a run reserved for a task queue that no worker started in time (a backlog)
    # was counted as a reap like a producer that died mid-answer, the alert's meaning.
    await StreamProducer(transport).reserve("queued", start_timeout=0.1)
    events = await collect(transport, "queued")
    assert events[-1].data.get("error") == "not_started"
    assert recorded.points("resumable_stream.reaps") == {(("error", "not_started"),): 1}


class FlakyTransport(MemoryTransport):
    """Loses the reply of the first append, as a dropped connection would."""

    failed = False

    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        await super().append(stream_id, owner, entry, count, final)
        if not self.failed:
            self.failed = True
            raise TransportError("connection lost before the reply")


async def test_transport_errors_and_failed_runs_are_counted(recorded: Recorded) -> None:
    transport = FlakyTransport()
    run = await StreamProducer(transport).start(tokens(5))
    assert await run.wait() == "completed"  # the append was retried
    assert recorded.points("resumable_stream.transport.errors") == {(("operation", "append"),): 1}

    # A run fenced by a delete cannot write its terminal event: it ends as "failed".
    gate = asyncio.Event()
    fenced = await StreamProducer(transport).start(tokens(10, pause=gate))
    async with StreamConsumer(transport, fenced.stream_id) as reader:
        await anext(reader)
    await transport.delete(fenced.stream_id)
    with pytest.raises(Exception):  # noqa: B017, PT011 - LeaseLost, as the contract says
        await fenced.wait()
    assert recorded.value("resumable_stream.runs.ended", status="failed") == 1


async def test_a_run_has_a_span_linked_to_the_request(recorded: Recorded) -> None:
    transport = MemoryTransport()
    tracer = recorded.tracer

    async def source() -> Any:
        with tracer.start_as_current_span("model call"):  # e.g. LangGraph's own spans
            yield "hello "
        yield "world"

    with tracer.start_as_current_span("POST /chat") as request:
        run = await StreamProducer(transport).start(source())
    assert await run.wait() == "completed"
    spans = {span.name: span for span in recorded.spans.get_finished_spans()}
    run_span, model_call = spans["resumable_stream.run"], spans["model call"]
    assert run_span.attributes is not None
    assert run_span.attributes["resumable_stream.stream_id"] == run.stream_id
    assert run_span.attributes["resumable_stream.status"] == "completed"
    assert [link.context for link in run_span.links] == [request.get_span_context()]
    assert run_span.parent is None  # its own trace: the run outlives the request
    assert model_call.parent is not None
    assert model_call.parent.span_id == run_span.context.span_id


async def test_no_span_is_made_while_no_tracer_provider_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression (issue 11): every run made a span on the global provider's no-op tracer
    # and made it current in its tasks, about a tenth of the CPU of starting and reading a
    # run, for spans nobody records.
    telemetry.configure()  # the global providers, none set by this process
    instruments = telemetry._instruments
    assert instruments is not None

    class Refusing:
        def start_span(self, *args: object, **kwargs: object) -> Any:
            raise AssertionError("a span was made with no tracer provider set")

    monkeypatch.setattr(instruments, "tracer", Refusing())
    transport = MemoryTransport()
    run = await StreamProducer(transport).start(tokens(3))
    assert await run.wait() == "completed"
    assert [e.type for e in await collect(transport, run.stream_id)][-1] == "end"


def test_runs_get_spans_once_the_application_sets_a_global_tracer_provider() -> None:
    # The other side: a provider set after the import (as applications do at start-up)
    # gets a span per run, from the next run on.
    code = (
        "import asyncio\n"
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import (\n"
        "    InMemorySpanExporter)\n"
        "from resumable_stream import StreamProducer\n"
        "from resumable_stream.transports.memory import MemoryTransport\n"
        "async def source():\n"
        "    yield 'hello'\n"
        "async def run():\n"
        "    await (await StreamProducer(MemoryTransport()).start(source())).wait()\n"
        "asyncio.run(run())\n"
        "spans = InMemorySpanExporter()\n"
        "provider = TracerProvider()\n"
        "provider.add_span_processor(SimpleSpanProcessor(spans))\n"
        "trace.set_tracer_provider(provider)\n"
        "asyncio.run(run())\n"
        "print([span.name for span in spans.get_finished_spans()])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['resumable_stream.run']"]


async def test_a_redis_reconnect_is_counted(
    redis_server_factory: Callable[..., RedisServer], recorded: Recorded
) -> None:
    server = redis_server_factory()
    transport = RedisTransport.from_url(server.url)
    client = aioredis.Redis.from_url(server.url)
    try:
        gate = asyncio.Event()
        run = await StreamProducer(transport).start(tokens(10, pause=gate))
        # The run's cancel watch is what keeps the notices connection (its readers in this
        # process are fed by its appends): wait until Redis has it subscribed. (Restarted
        # before its first connection was made, there is nothing to re-establish: the
        # connection made then is the first, not a reconnect.)
        channel = f"{transport.prefix}:{{{run.stream_id}}}:c"

        async def watched() -> bool:
            reply = await client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
            return int(reply[1]) == 1

        await eventually(watched)
        server.restart()  # the notices connection drops

        async def reconnected() -> bool:
            return recorded.value("resumable_stream.transport.reconnects", connection="notices") > 0

        await eventually(reconnected)
        with contextlib.suppress(LeaseLost):  # the restarted server lost the stream
            await run.cancel()
    finally:
        await client.aclose()
        await transport.aclose()


async def test_a_redis_outage_counts_the_connection_re_established_not_each_attempt(
    redis_server_factory: Callable[..., RedisServer],
    recorded: Recorded,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Regression: the notices connection counted every failed attempt (one per half second
    # while Redis was down) as a reconnect; the commands connection counted the one made.
    server = redis_server_factory()
    transport = RedisTransport.from_url(server.url)
    try:
        gate = asyncio.Event()
        run = await StreamProducer(transport, lease=60).start(tokens(10, pause=gate))
        reader = StreamConsumer(transport, run.stream_id)
        await anext(reader)
        waiting = asyncio.ensure_future(anext(reader))
        node = transport._single
        assert node is not None
        await eventually(holds(lambda: node.subscriber.connects == 1))
        server.stop()

        def attempts() -> int:  # each failed attempt logs "...; reconnecting"
            return sum(r.getMessage().endswith("reconnecting") for r in caplog.records)

        await eventually(holds(lambda: attempts() >= 3))
        server.start()  # on the same port
        await eventually(holds(lambda: node.subscriber.connects == 2))
        assert recorded.value("resumable_stream.transport.reconnects", connection="notices") == 1
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await reader.aclose()
        with contextlib.suppress(LeaseLost):  # the restarted server lost the stream
            await run.cancel()
    finally:
        await transport.aclose()


def test_without_opentelemetry_everything_is_a_no_op() -> None:
    code = (
        "import sys, asyncio\n"
        "sys.modules['opentelemetry'] = None  # as if the otel extra were not installed\n"
        "from resumable_stream import StreamConsumer, StreamProducer, from_url, telemetry\n"
        "async def main():\n"
        "    transport = from_url('memory://')\n"
        "    async def source():\n"
        "        yield 'a'\n"
        "    run = await StreamProducer(transport).start(source())\n"
        "    print([e.type async for e in StreamConsumer(transport, run.stream_id)])\n"
        "    try:\n"
        "        telemetry.configure(meter_provider=object())\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__, exc)\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "['token', 'end']",
        "ConfigurationError metrics and traces need OpenTelemetry: "
        "pip install 'resumable-llm-stream[otel]'",
    ]


def test_append_durations_are_sampled_not_recorded_per_token(
    recorded: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An SDK instrument costs several microseconds a call: a token must not pay for one.
    now = telemetry.clock() + 1.0
    monkeypatch.setattr(telemetry, "clock", lambda: now)
    for _ in range(1000):  # paced tokens of many streams, appended within one instant
        telemetry.appended(1, now - 0.002)
        telemetry.delivered(1)
    assert recorded.value("resumable_stream.append.duration") == 1
    assert recorded.value("resumable_stream.entries.appended") == 1000
    assert recorded.value("resumable_stream.events.appended") == 1000
    assert recorded.value("resumable_stream.events.delivered") == 1000

    # At a low rate, every append is recorded; configuring the same provider again
    # changes nothing.
    telemetry.configure(meter_provider=recorded.provider)
    for _ in range(5):
        now += 0.01
        telemetry.appended(3, now - 0.001)
    assert recorded.value("resumable_stream.append.duration") == 6
    assert recorded.value("resumable_stream.entries.appended") == 1005
    assert recorded.value("resumable_stream.events.appended") == 1015


def test_the_counters_are_read_by_the_provider_configured_only() -> None:
    # Observable counters stay on every meter they were made on: a replaced provider, or the
    # global one, kept reporting appends made after another provider was configured.
    def appended(reader: InMemoryMetricReader) -> int | None:
        points = read_points(reader, "resumable_stream.events.appended")
        return sum(points.values()) if points else None

    first, second = InMemoryMetricReader(), InMemoryMetricReader()
    try:
        telemetry.configure(meter_provider=MeterProvider(metric_readers=[first]))
        telemetry.appended(2, telemetry.clock())
        total = appended(first)
        assert total is not None
        telemetry.configure(meter_provider=MeterProvider(metric_readers=[second]))
        telemetry.appended(3, telemetry.clock())
        assert appended(second) == total + 3
        assert appended(first) is None  # no longer configured: reports nothing
    finally:
        telemetry.configure()


@pytest.mark.parametrize("order", ["global first", "configured first"])
def test_the_global_provider_configured_by_name_reads_the_counters(order: str) -> None:
    # The provider set as the global one and also given to configure() got the counters
    # made twice; its meter kept the first callbacks, which then reported nothing.
    code = (
        "from opentelemetry import metrics\n"
        "from opentelemetry.sdk.metrics import MeterProvider\n"
        "from opentelemetry.sdk.metrics.export import InMemoryMetricReader\n"
        "reader = InMemoryMetricReader()\n"
        "provider = MeterProvider(metric_readers=[reader])\n"
        + (
            "metrics.set_meter_provider(provider)\n"
            "from resumable_stream import telemetry\n"
            "telemetry.configure(meter_provider=provider)\n"
            if order == "global first"
            else "from resumable_stream import telemetry\n"
            "telemetry.configure(meter_provider=provider)\n"
            "metrics.set_meter_provider(provider)\n"
            "telemetry.configure()\n"
        )
        + "telemetry.appended(5, telemetry.clock())\n"
        "for resource in reader.get_metrics_data().resource_metrics:\n"
        "    for scope in resource.scope_metrics:\n"
        "        for metric in scope.metrics:\n"
        "            if metric.name == 'resumable_stream.events.appended':\n"
        "                print([point.value for point in metric.data.data_points])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[5]"]


async def test_a_transport_closed_on_shutdown_is_not_a_transport_error(
    recorded: Recorded,
) -> None:
    # Regression: closing the transport at shutdown under a running producer and a live
    # reader counted both in transport.errors, the counter alerts watch, at every deploy.
    transport = MemoryTransport()
    gate = asyncio.Event()
    run = await StreamProducer(transport).start(tokens(10, pause=gate))
    reader = StreamConsumer(transport, run.stream_id)
    for _ in range(5):  # the tokens before the pause
        await anext(reader)
    waiting = asyncio.ensure_future(anext(reader))

    async def following_live() -> bool:
        return recorded.value("resumable_stream.consumers.live") == 1

    await eventually(following_live)
    await transport.aclose()
    gate.set()
    with pytest.raises(TransportClosed):
        await waiting
    await reader.aclose()
    with pytest.raises(TransportClosed):
        await run.wait()
    assert recorded.points("resumable_stream.transport.errors") == {}


async def test_entries_written_again_after_a_storage_rollback_are_counted_once(
    recorded: Recorded, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: the entries a failover lost, written again from the rollback window,
    # were counted in events.appended and entries.appended a second time.
    transport = MemoryTransport()
    gate = asyncio.Event()
    run = await StreamProducer(transport, max_buffer=1).start(
        tokens(20, every=1, pause=gate), stream_id="rolled"
    )

    async def ten_written() -> bool:
        info = await transport.info("rolled")
        return info is not None and info.last_seq == 10

    await eventually(ten_written)
    stream = transport._streams["rolled"]  # a failover to a replica that lacks entries 8-10
    del stream.payloads[7 - stream.first_seq + 1 :]
    stream.last_count = 1
    gate.set()
    assert await run.wait() == "completed"
    events = await collect(transport, "rolled")
    info = await transport.info("rolled")
    assert info is not None
    assert len(events) == info.last_seq == 21  # an entry per token (max_buffer=1)
    assert "writing them again" in caplog.text
    assert recorded.value("resumable_stream.events.appended") == len(events)
    assert recorded.value("resumable_stream.entries.appended") == info.last_seq
