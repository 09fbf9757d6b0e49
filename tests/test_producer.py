"""Producer edge cases, pinned by regression tests."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import math
import subprocess
import sys
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk

from resumable_stream import (
    BackendRefused,
    ConfigurationError,
    Event,
    LeaseLost,
    StorageRollback,
    StreamConsumer,
    StreamProducer,
    Transport,
    TransportClosed,
    TransportError,
    parse_offset,
)
from resumable_stream._codec import decode_entry, encode_entry
from resumable_stream._events import normalize
from resumable_stream.transports import Entry, Status
from resumable_stream.transports.memory import MemoryTransport
from tests._helpers import collect, eventually, holds, joined, stored_from, text_of, tokens


class LateHeartbeat(MemoryTransport):
    """Holds the final write until a heartbeat has bounced off the finished stream."""

    def __init__(self) -> None:
        super().__init__()
        self.bounced = asyncio.Event()

    async def renew(self, stream_id: str, owner: str, lease_ms: int) -> bool:
        try:
            return await super().renew(stream_id, owner, lease_ms)
        except LeaseLost:
            self.bounced.set()
            raise

    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        await super().append(stream_id, owner, entry, count, final)
        if final is not None:
            await self.bounced.wait()


async def test_heartbeat_racing_the_final_write_does_not_fail_the_run() -> None:
    transport = LateHeartbeat()
    run = await StreamProducer(transport, lease=0.3).start(tokens(10))
    assert await run.wait() == "completed"


async def test_backpressure_bounds_the_buffer() -> None:
    transport = MemoryTransport()
    run = await StreamProducer(transport, max_buffer=4).start(tokens(1000, every=1000))
    assert joined(await collect(transport, run.stream_id)) == text_of(1000)
    info = await transport.info(run.stream_id)
    assert info is not None and info.last_seq >= 1000 // 4


async def test_source_terminal_event_ends_the_run(transport: Transport) -> None:
    async def relay():  # e.g. a worker relaying another stream's events
        yield "partial "
        yield {"type": "error", "data": {"error": "upstream", "message": "gone"}}
        yield "never written"

    run = await StreamProducer(transport).start(relay())
    events = await collect(transport, run.stream_id)
    assert [e.type for e in events] == ["token", "error"]
    assert await run.wait() == "error"


async def test_start_refuses_a_non_async_source() -> None:
    with pytest.raises(TypeError, match="async iterable"):
        await StreamProducer(MemoryTransport()).start(["a", "b"])  # type: ignore[arg-type]


async def test_consumers_dropped_or_broken_release_their_subscription() -> None:
    transport = MemoryTransport()
    gate = asyncio.Event()
    run = await StreamProducer(transport).start(tokens(10, pause=gate))
    consumer = StreamConsumer(transport, run.stream_id)
    await anext(consumer)
    await anext(consumer)  # now subscribed live
    stream = transport._streams[run.stream_id]
    assert len(stream.subscribers) == 1
    # Regression (issue 9): dropped without aclose(), it is reported, not silently cleaned up
    # from the garbage collector; its subscription is closed on the event loop.
    with pytest.warns(ResourceWarning, match="dropped while following"):  # noqa: PT031
        del consumer
        gc.collect()

    async def released() -> bool:
        return stream.subscribers == set()

    await eventually(released)
    reader = StreamConsumer(transport, run.stream_id)
    gate.set()
    async for event in reader:
        if event.terminal:
            break
    assert stream.subscribers == set()


async def test_a_consumer_dropped_under_warnings_as_errors_still_releases_its_subscription(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression: __del__ warned first; under -W error the warning raised (into the
    # unraisable hook) before the subscription was closed and the live reader counted off.
    from resumable_stream import telemetry

    transport = MemoryTransport()
    gate = asyncio.Event()
    run = await StreamProducer(transport).start(tokens(10, pause=gate))
    live_before = telemetry.counts.live
    consumer = StreamConsumer(transport, run.stream_id)
    await anext(consumer)
    await anext(consumer)  # now subscribed live
    stream = transport._streams[run.stream_id]
    raised: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: raised.append(info.exc_value))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        del consumer
        gc.collect()

    async def released() -> bool:
        return stream.subscribers == set()

    await eventually(released)
    assert [type(e) for e in raised] == [ResourceWarning]
    assert telemetry.counts.live == live_before
    gate.set()
    await run.wait()


async def test_malformed_chat_model_events_are_skipped_not_fatal() -> None:
    async def events():  # shapes a hand-written source might produce
        yield {"event": "on_chat_model_stream", "data": {}}
        yield {"event": "on_chat_model_stream"}
        yield {"event": "on_chat_model_stream", "data": {"chunk": None}}
        yield "ok"

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(events())
    assert [e.type for e in await collect(transport, run.stream_id)] == ["token", "end"]


async def test_an_event_json_cannot_hold_ends_the_run_with_an_error(transport: Transport) -> None:
    # Regression: the writer died on the encoding error and the run hung, never ending.
    async def tool_output():
        yield "before "
        yield {"type": "tool_end", "data": {"output": {"id": 2**70}}}
        yield "never stored"

    run = await StreamProducer(transport).start(tool_output())
    events = await asyncio.wait_for(collect(transport, run.stream_id), timeout=5)
    assert events[-1].type == "error"
    assert events[-1].data["error"] == "TypeError"
    assert "never stored" not in joined(events)
    assert await run.wait() == "error"


async def test_a_value_json_cannot_hold_is_refused_with_a_message_naming_the_event() -> None:
    # Regression: the error said only "Integer exceeds 64-bit range", "Recursion limit
    # reached" or, for a value holding itself, "maximum recursion depth exceeded in
    # comparison" (a RecursionError): nothing told which event, or what was wrong with it.
    loop: list[Any] = []
    loop.append(loop)
    deep: Any = 1
    for _ in range(2000):
        deep = [deep]
    bad = [
        ({"type": "tool_end", "data": {"output": {"id": 2**70}}}, "'tool_end' event", "64-bit"),
        (Event("custom", {"data": loop}, ""), "'custom' event", "Recursion limit"),
        ({"type": "custom", "data": {"data": loop}}, "item of the source", "holds itself"),
        (("updates", {"agent": deep}), "item of the source", "nests deeper"),
    ]
    for item, names, says in bad:

        async def source(item: Any = item) -> Any:
            yield "kept "
            yield item

        transport = MemoryTransport()
        run = await StreamProducer(transport).start(source())
        assert await asyncio.wait_for(run.wait(), timeout=5) == "error"
        events = await collect(transport, run.stream_id)
        assert [e.type for e in events] == ["token", "error"]
        assert events[-1].data["error"] == "TypeError"
        assert names in events[-1].data["message"] and says in events[-1].data["message"]


class Faulty(MemoryTransport):
    """Raises ``error`` from ``method`` the first ``times`` calls (a custom transport's bug)."""

    def __init__(self, method: str, error: BaseException, times: int = 1) -> None:
        super().__init__()
        self.method, self.error, self.times = method, error, times
        self.calls: dict[str, int] = {}

    def _fault(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if method == self.method and self.calls[method] <= self.times:
            raise self.error

    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        self._fault("append")
        await super().append(stream_id, owner, entry, count, final)

    async def renew(self, stream_id: str, owner: str, lease_ms: int) -> bool:
        self._fault("renew")
        return await super().renew(stream_id, owner, lease_ms)

    async def wait_cancel(self, stream_id: str, epoch: int) -> None:
        self._fault("wait_cancel")
        await super().wait_cancel(stream_id, epoch)


async def endless(first: list[str]):  # a slow model that never finishes by itself
    for token in first:
        yield token
    await asyncio.Event().wait()


@pytest.mark.parametrize("method", ["append", "renew", "wait_cancel"])
async def test_an_unexpected_error_in_any_task_of_a_run_ends_it_with_one_error(
    method: str,
) -> None:
    # Regression (issue 9): the run awaited only its source; a writer, heartbeat or cancel
    # watcher dying on an unexpected exception left it hanging, readers waiting for ever.
    transport = Faulty(method, RuntimeError("driver bug"))
    run = await StreamProducer(transport, lease=0.3).start(endless(["a", "b"]))
    assert await asyncio.wait_for(run.wait(), timeout=10) == "error"
    events = await collect(transport, run.stream_id)
    assert joined(events) == "ab"  # the good events before the failure are kept
    assert [e.type for e in events][-1:] == ["error"] and sum(e.terminal for e in events) == 1
    assert events[-1].data["error"] == "producer_failed"
    assert "RuntimeError: driver bug" in events[-1].data["message"]


class WatchRaises(MemoryTransport):
    """Its ``watch_cancel`` raises at once (a custom transport's bug, or a closed one)."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def watch_cancel(
        self, stream_id: str, epoch: int, on_cancel: Callable[[Exception | None], None]
    ) -> Callable[[], None]:
        raise self.error


async def test_a_cancel_watch_failing_at_once_ends_the_run() -> None:
    # Regression (fbc5d55, the run's own task writing): _fail() found the run before it
    # wrote, stopped only the pump (before it read, so with no terminal event), and the
    # run's task then waited for events for ever; readers too. It ends with one error.
    transport = WatchRaises(RuntimeError("driver bug"))
    run = await StreamProducer(transport, lease=60).start(endless(["a"]))
    assert await asyncio.wait_for(run.wait(), timeout=10) == "error"
    events = await collect(transport, run.stream_id)
    assert [e.type for e in events] == ["error"]
    assert events[0].data["error"] == "producer_failed"
    assert "RuntimeError: driver bug" in events[0].data["message"]
    assert run._task.cancelling() == 0
    # Closed under the run: it is lost (readers report producer_lost once its lease
    # lapses), and wait() says why at once, not at the heartbeat (20 s here).
    transport = WatchRaises(TransportClosed("closed"))
    run = await StreamProducer(transport, lease=60).start(endless(["a"]))
    with pytest.raises(TransportClosed):
        await asyncio.wait_for(run.wait(), timeout=10)


async def test_one_bad_event_ends_the_run_after_every_good_event_before_it() -> None:
    # Regression (issue 9): the bad value replaced its whole batch: 50 tokens + 1 bad = error.
    async def source():
        for i in range(50):
            yield f"t{i} "
        yield {"type": "tool_end", "data": {"output": {"id": 2**70}}}
        yield "never stored"

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(source())
    events = await collect(transport, run.stream_id)
    assert joined(events) == text_of(50)
    assert [e.type for e in events[50:]] == ["error"]
    assert events[-1].data["error"] == "TypeError"
    assert await run.wait() == "error"


async def test_an_oversized_event_ends_the_run_with_event_too_large() -> None:
    async def source():
        yield "kept "
        yield {"type": "custom", "data": {"blob": "x" * 5000}}
        yield "never stored"

    transport = MemoryTransport()
    run = await StreamProducer(transport, max_event_bytes=4096).start(source())
    events = await collect(transport, run.stream_id)
    assert [(e.type, e.data.get("text")) for e in events] == [("token", "kept "), ("error", None)]
    assert events[-1].data["error"] == "EventTooLarge"
    assert "max_event_bytes" in events[-1].data["message"]


async def test_entries_are_capped_in_events_and_bytes() -> None:
    transport = MemoryTransport()
    gate = asyncio.Event()
    producer = StreamProducer(transport, max_entry_events=10, max_entry_bytes=200)
    run = await producer.start(tokens(500, every=500, pause=gate))
    gate.set()
    assert await run.wait() == "completed"
    stream = transport._streams[run.stream_id]
    assert all(len(decode_entry(p, 1, 1)) <= 10 for p in stream.payloads)
    assert all(len(p) <= 200 + 20 for p in stream.payloads)
    assert joined(await collect(transport, run.stream_id)) == text_of(500)


async def test_exceptions_from_a_sources_aclose_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Regression (issue 9): they were swallowed silently.
    class Source:
        def __aiter__(self) -> Source:
            return self

        async def __anext__(self) -> str:
            raise StopAsyncIteration

        async def aclose(self) -> None:
            raise RuntimeError("cleanup failed")

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(Source())
    assert await run.wait() == "completed"
    assert "aclose() raised" in caplog.text and "cleanup failed" in caplog.text


@pytest.mark.parametrize(
    "error",
    [BackendRefused("OOM command not allowed"), TransportClosed("the transport is closed")],
    ids=["refused", "closed"],
)
async def test_a_refused_write_fails_at_once_without_retries(error: TransportError) -> None:
    # Regressions: every error reply (OOM, NOAUTH...) was retried for a whole lease (issue
    # 9), and so was every write to a transport closed under the run (30 s on Redis).
    transport = Faulty("append", error, times=1000)
    run = await StreamProducer(transport, write_retry_budget=60).start(endless(["a"]))
    with pytest.raises(type(error)):
        await asyncio.wait_for(run.wait(), timeout=10)
    assert transport.calls["append"] == 1


async def test_transient_write_errors_are_retried_within_the_budget() -> None:
    transport = Faulty("append", TransportError("connection reset"), times=3)
    run = await StreamProducer(transport).start(tokens(5))
    assert await run.wait() == "completed"
    assert joined(await collect(transport, run.stream_id)) == text_of(5)

    exhausted = Faulty("append", TransportError("connection reset"), times=1000)
    run = await StreamProducer(exhausted, write_retry_budget=0.1).start(tokens(5))
    with pytest.raises(TransportError):
        await asyncio.wait_for(run.wait(), timeout=10)


def test_the_write_retry_budget_comes_from_the_transport_unless_given() -> None:
    transport = MemoryTransport()
    assert StreamProducer(transport).write_retry_budget == 5.0
    transport.write_retry_budget = 30.0  # e.g. a Redis transport behind Sentinel
    assert StreamProducer(transport).write_retry_budget == 30.0
    assert StreamProducer(transport, write_retry_budget=2).write_retry_budget == 2


async def test_a_cancelled_run_task_still_writes_its_terminal_event() -> None:
    transport = MemoryTransport()
    run = await StreamProducer(transport).start(endless(["a"]))
    reader = StreamConsumer(transport, run.stream_id)
    assert (await anext(reader)).type == "token"
    run._task.cancel()  # e.g. the event loop shutting down
    with pytest.raises(asyncio.CancelledError):
        await run.wait()
    rest = [event async for event in reader]
    assert [(e.type, e.data) for e in rest] == [("cancelled", {"reason": "shutdown"})]


class GatedCleanUp:
    """A source that ends with an `end` item, then cleans up (as an HTTP response or a
    graph's stream does in aclose()) until released; the clean-up then notes the stream's
    stored status."""

    def __init__(self, transport: Transport, stream_id: str = "closing") -> None:
        self.transport, self.stream_id = transport, stream_id
        self.closing, self.release = asyncio.Event(), asyncio.Event()
        self.seen: list[str | None] = []

    async def source(self):  # type: ignore[no-untyped-def]
        try:
            yield "a "
            yield {"type": "end", "data": {}}
        finally:
            self.closing.set()
            await self.release.wait()
            info = await self.transport.info(self.stream_id)
            self.seen.append(info and info.status)


@pytest.mark.parametrize("stop", ["cancel", "shutdown"])
async def test_a_stop_that_comes_while_the_source_closes_still_ends_the_run(stop: str) -> None:
    # Regression: the terminal event was set only after the source's aclose() returned, so
    # a cancel arriving during that await cancelled the pump mid-close, no terminal event
    # was ever written, and the run, its readers and producer.aclose() waited for ever.
    transport = MemoryTransport()
    gated = GatedCleanUp(transport)
    producer = StreamProducer(transport)
    run = await producer.start(gated.source(), stream_id=gated.stream_id)
    await gated.closing.wait()
    if stop == "cancel":
        await producer.cancel(run.stream_id)
        stopped = asyncio.ensure_future(run.wait())
    else:
        stopped = asyncio.ensure_future(producer.aclose())
    gated.release.set()
    await asyncio.wait_for(stopped, timeout=10)
    assert run.status == "completed"  # the source had ended before the stop came
    assert len(gated.seen) == 1  # its clean-up ran to its end
    events = await asyncio.wait_for(collect(transport, run.stream_id), timeout=10)
    assert [e.type for e in events] == ["token", "end"]


async def _ended_with_error(producer: StreamProducer, source: Any) -> list[Event]:
    """Run ``source``; check that it ends as ``error``; return what its readers read."""
    run = await producer.start(source)
    assert await asyncio.wait_for(run.wait(), timeout=10) == "error"
    return await asyncio.wait_for(collect(producer.transport, run.stream_id), timeout=10)


async def test_a_cancelled_error_raised_by_the_source_ends_the_run_with_an_error() -> None:
    # Regression: taken for the run being stopped, it ended the pump with no terminal
    # event, and the heartbeat kept the lease (and the readers) waiting for ever.
    async def source():
        yield "a "
        upstream = asyncio.get_running_loop().create_future()
        upstream.cancel()  # e.g. an upstream call that timed out
        yield await upstream

    events = await _ended_with_error(StreamProducer(MemoryTransport()), source())
    assert [(e.type, e.data.get("error")) for e in events] == [
        ("token", None),
        ("error", "CancelledError"),
    ]


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message")


class _TestFailure(BaseException):
    """What test frameworks raise (pytest's ``Failed``): not an ``Exception``."""


@pytest.mark.parametrize("raised", [_Unprintable(), _TestFailure("assertion failed")])
async def test_a_source_raising_any_error_ends_the_run_with_an_error(
    raised: BaseException,
) -> None:
    # A BaseException that is not an Exception ended the stream with `end` (a failed run
    # read as a success); an error whose message could not be read left no terminal event
    # (readers waited for the lease to lapse, then got producer_lost).
    async def source():
        yield "kept "
        raise raised

    events = await _ended_with_error(StreamProducer(MemoryTransport()), source())
    assert [(e.type, e.data.get("error")) for e in events] == [
        ("token", None),
        ("error", type(raised).__name__),
    ]
    assert events[-1].data["message"]


async def _logged_failure(
    caplog: pytest.LogCaptureFixture, raised: Exception, stream_id: str
) -> logging.LogRecord:
    """The warning the producer logs for a source that raises ``raised`` after a token."""

    async def source():
        yield "kept "
        raise raised

    with caplog.at_level(logging.WARNING, logger="resumable_stream"):
        run = await StreamProducer(MemoryTransport()).start(source(), stream_id=stream_id)
        assert await run.wait() == "error"
    [record] = [r for r in caplog.records if "source raised" in r.getMessage()]
    assert record.levelno == logging.WARNING and stream_id in record.getMessage()
    return record


async def test_a_source_s_exception_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It was logged at INFO as its repr: with the HTTP edge showing clients no more than
    # "An error occurred." (ai_sdk), the server's log is where its traceback is read.
    record = await _logged_failure(caplog, LookupError("the index is down"), "logged")
    assert record.exc_info is not None and record.exc_info[0] is LookupError


async def test_a_source_s_exception_holding_a_lone_surrogate_is_logged_escaped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its traceback holds the message as it is: a handler writing UTF-8 failed on the
    # record (pytest-xdist could not send the test's report: its worker crashed).
    record = await _logged_failure(caplog, RuntimeError("the provider said \ud83d"), "escaped")
    logged = caplog.text
    logged.encode()  # (it raised UnicodeEncodeError)
    assert "RuntimeError: the provider said \\ud83d" in logged
    assert "Traceback (most recent call last)" in logged and record.exc_info is None


async def test_the_error_about_an_oversized_event_fits_the_smallest_limit() -> None:
    # At max_event_bytes=100 the error event describing the EventTooLarge was itself too
    # large: the run failed without a terminal event and its readers waited for the lease.
    async def source():
        yield "kept "
        yield "x" * 200

    events = await _ended_with_error(
        StreamProducer(MemoryTransport(), max_event_bytes=100), source()
    )
    assert [(e.type, e.data.get("error")) for e in events] == [
        ("token", None),
        ("error", "EventTooLarge"),
    ]
    assert events[-1].data["message"]  # cut to fit, not dropped


async def test_a_source_error_with_a_message_over_the_limit_keeps_its_name() -> None:
    # Regression: a source error whose message made its event larger than max_event_bytes
    # ended the stream with `EventTooLarge` ("a 'error' event of ... bytes"): readers lost
    # the exception's class (docs/events.md: `error` names it). Its message is cut instead.
    async def source():
        yield "kept "
        raise RuntimeError("upstream said: " + "x" * 5000)

    events = await _ended_with_error(
        StreamProducer(MemoryTransport(), max_event_bytes=4096), source()
    )
    assert [(e.type, e.data.get("error")) for e in events] == [
        ("token", None),
        ("error", "RuntimeError"),
    ]
    assert events[-1].data["message"].startswith("upstream said: xxx")


@pytest.mark.parametrize(
    "terminal",
    [
        {"type": "end", "data": {"usage": 2**70}},  # not JSON: an integer beyond 64 bits
        {"type": "cancelled", "data": {"reason": "x" * 5000}},  # larger than max_event_bytes
    ],
)
async def test_a_relayed_terminal_event_that_cannot_be_stored_ends_the_run_as_error(
    terminal: dict[str, Any],
) -> None:
    # Regression: the stream ended with the `error` written in its place, but the run and
    # the stream's status said `completed` / `cancelled` (run.wait(), GET .../status).
    async def source():
        yield "kept "
        yield terminal

    transport = MemoryTransport()
    run = await StreamProducer(transport, max_event_bytes=4096).start(source())
    assert await asyncio.wait_for(run.wait(), timeout=10) == "error"
    events = await collect(transport, run.stream_id)
    assert [e.type for e in events] == ["token", "error"]
    info = await transport.info(run.stream_id)
    assert info is not None and info.status == "error"


@pytest.mark.parametrize(
    "bad",
    [
        "x" * 5000,  # larger than max_event_bytes
        {"event": "on_chat_model_stream", "data": {"chunk": AIMessageChunk("y" * 5000, id="m")}},
    ],
)
async def test_a_token_that_cannot_be_stored_ends_the_run_after_the_good_ones(bad: object) -> None:
    async def source():
        yield "kept "
        yield {"event": "on_chat_model_stream", "data": {"chunk": AIMessageChunk("too", id="m")}}
        yield bad
        yield "never stored"

    transport = MemoryTransport()
    run = await StreamProducer(transport, max_event_bytes=4096).start(source())
    assert await run.wait() == "error"
    events = await collect(transport, run.stream_id)
    assert joined(events) == "kept too"
    assert [e.type for e in events] == ["token", "token", "error"]


def model_token(text: str, message_id: str = "m") -> dict[str, Any]:
    chunk = AIMessageChunk(text, id=message_id)
    return {"event": "on_chat_model_stream", "data": {"chunk": chunk}, "metadata": {}}


async def test_chat_model_tokens_are_stored_as_normalize_reads_each_one() -> None:
    # The producer reads the usual astream_events token (plain text of the last token's
    # message and node) without normalize(): every other shape, and every change of
    # message or node, must still come out as normalize() reads it.
    class Odd:
        content = "odd chunk"  # not a message chunk, no id

    def item(chunk: Any, node: Any = "agent", **extra: Any) -> dict[str, Any]:
        return {
            "event": "on_chat_model_stream",
            "data": {"chunk": chunk},
            "metadata": {"langgraph_node": node},
            **extra,
        }

    items = [
        item(AIMessageChunk("Hello", id="m1")),
        item(AIMessageChunk(", world", id="m1")),  # the usual case
        item(AIMessageChunk(" again", id="m2")),  # another message
        item(AIMessageChunk(" and", id="m2"), node="tools"),  # another node
        item(AIMessageChunk(" no node", id="m2"), node=None),
        {"event": "on_chat_model_stream", "data": {"chunk": AIMessageChunk(" bare", id="m2")}},
        item(AIMessageChunk(" café", id="m2"), node=None),  # not ASCII
        item(AIMessageChunk([{"type": "text", "text": " blocks"}], id="m2"), node=None),
        item(AIMessageChunk("", id="m2"), node=None),  # no text: nothing stored
        item(AIMessageChunk(" no id")),
        item(Odd()),
        item(AIMessageChunk(" long" * 400, id="m1")),
        item(AIMessageChunk(" last", id="m1")),
        item(AIMessageChunk(" half \udc00 more", id="m1")),  # a lone surrogate: U+FFFD
        {"event": "on_chat_model_stream", "data": None, "metadata": None},
    ]

    stored = await stored_from(items)
    expected = [pair for one in items for pair in normalize(one)] + [("end", {})]
    expected[12][1]["text"] = " half \ufffd more"
    assert stored == expected
    assert len(stored) == 14


async def test_messages_mode_tokens_are_stored_as_normalize_reads_each_one() -> None:
    # The same for astream(stream_mode="messages") items, alone, among other modes, with
    # subgraphs and as version="v2" parts: the usual one skips normalize(), no other may.
    agent = {"langgraph_node": "agent"}

    def chunk(text: Any, message_id: str | None = "m1", **fields: Any) -> AIMessageChunk:
        return AIMessageChunk(content=text, id=message_id, **fields)

    items: list[Any] = [
        (chunk("Hello"), agent),
        (chunk(", world"), agent),  # the usual case
        ("messages", (chunk(" among"), agent)),
        ((), "messages", (chunk(" root"), agent)),
        (("sub:1",), "messages", (chunk(" sub"), agent)),  # a subgraph's: its namespace
        (chunk(" named", response_metadata={"model_provider": "openai"}), agent),
        (chunk(" stop", response_metadata={"finish_reason": "stop"}), agent),
        (
            chunk(
                " used", usage_metadata={"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}
            ),
            agent,
        ),
        (
            chunk(
                " calling", tool_call_chunks=[{"name": "f", "args": "{", "id": "c1", "index": 0}]
            ),
            agent,
        ),
        (chunk(" tools"), {"langgraph_node": "tools"}),
        (chunk(" other", message_id="m2"), {"langgraph_node": "tools"}),
        (chunk(" café", message_id="m2"), {"langgraph_node": "tools"}),
        (chunk(" proxy", message_id="m2"), types.MappingProxyType({"langgraph_node": "tools"})),
        (
            chunk([{"type": "text", "text": " blocks"}], message_id="m2"),
            {"langgraph_node": "tools"},
        ),
        (chunk("", message_id="m2"), {"langgraph_node": "tools"}),  # nothing stored
        (AIMessage(" whole", id="m3"), agent),  # a message, not a chunk
        ("updates", {"agent": {"steps": ["one"]}}),
        ("custom", {"progress": 1}),
        ("custom", (chunk(" custom", message_id="m2"), {"langgraph_node": "tools"})),
        ((), "messages", (chunk(" last", message_id="m2"), {"langgraph_node": "tools"})),
        {
            "type": "messages",
            "ns": (),
            "data": (chunk(" v2", message_id="m2"), {"langgraph_node": "tools"}),
        },
        {
            "type": "messages",
            "ns": ("sub:1",),
            "data": (chunk(" v2 sub", message_id="m2"), {"langgraph_node": "tools"}),
        },
        {
            "type": "updates",
            "ns": (),
            "data": (chunk(" v2 updates", message_id="m2"), {"langgraph_node": "tools"}),
        },
        {
            "type": "messages",
            "ns": (),
            "data": (chunk(" v2 end", message_id="m2"), {"langgraph_node": "tools"}),
        },
    ]

    stored = await stored_from(items)
    assert stored == [pair for one in items for pair in normalize(one)] + [("end", {})]
    assert [kind for kind, _ in stored].count("token") == 18


async def test_messages_mode_chunks_of_other_classes_are_stored_as_normalize_reads_them() -> None:
    # Regression: a class named AIMessageChunk that is not LangChain's (a test's double, an
    # older release's) without tool_call_chunks, usage_metadata or response_metadata ended
    # the run with an AttributeError at its message's second token; one without `type`
    # was stored as a token, where normalize() reads a bare (chunk, metadata) pair of it
    # as a `custom` event.
    class AIMessageChunk:
        type = "AIMessageChunk"

        def __init__(self, content: str, id: str) -> None:
            self.content, self.id = content, id

    class Untyped:
        def __init__(self, content: str, id: str) -> None:
            self.content, self.id = content, id
            self.tool_call_chunks, self.usage_metadata, self.response_metadata = [], None, {}

        def __repr__(self) -> str:
            return "Untyped()"

    Untyped.__name__ = "AIMessageChunk"
    agent = {"langgraph_node": "agent"}
    items: list[Any] = [
        (AIMessageChunk("Hello", "m1"), agent),
        (AIMessageChunk(", world", "m1"), agent),
        ("messages", (AIMessageChunk(" among", "m1"), agent)),
        ((), "messages", (AIMessageChunk(" root", "m1"), agent)),
        {"type": "messages", "ns": (), "data": (AIMessageChunk(" v2", "m1"), agent)},
        (Untyped(" untyped", "m1"), agent),
    ]

    stored = await stored_from(items)
    assert stored == [pair for one in items for pair in normalize(one)] + [("end", {})]
    assert [kind for kind, _ in stored] == ["token"] * 5 + ["custom", "end"]


async def test_a_token_of_the_last_tokens_very_message_id_is_not_compared_to_it() -> None:
    # Regression: the fast paths compared a chunk's id (and node) to the last token's with
    # ==, where the encoder's tuple comparison takes the same object as equal first: an id
    # whose == raises (or says False, as NaN) for itself ended the run at its message's
    # second token.
    class Id:
        def __eq__(self, other: object) -> bool:
            if other is None:
                return False
            raise TypeError("not comparable")

        __hash__ = object.__hash__

        def __repr__(self) -> str:
            return "Id()"

    class Chunk:
        def __init__(self, content: str, id: Id) -> None:
            self.content, self.id = content, id

    same = Id()
    event = {"event": "on_chat_model_stream", "metadata": {"langgraph_node": "agent"}}
    node = {"langgraph_node": same}
    for items in (
        [{**event, "data": {"chunk": Chunk(text, same)}} for text in ("a", "b", "c")],
        [("messages", (AIMessageChunk(text, id="m"), node)) for text in ("a", "b", "c")],
    ):
        stored = await stored_from(items)
        assert [kind for kind, _ in stored] == ["token", "token", "token", "end"]
        assert "".join(data["text"] for _, data in stored[:-1]) == "abc"


async def test_lone_surrogates_are_written_as_u_fffd_and_the_answer_goes_on() -> None:
    # Regression: a token holding a lone UTF-16 surrogate (a provider's "\ud83d" escape
    # cut across two stream chunks) ended the whole answer with a TypeError `error`.
    async def source():
        yield "plain \ud800 text"
        yield model_token("model \udc00 text")
        yield {"type": "custom", "data": {"name": "n", "data": {"k\ud800": "v\udfff"}}}
        yield "after"
        raise RuntimeError("the provider said \ud83d")

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(source())
    assert await asyncio.wait_for(run.wait(), timeout=10) == "error"
    events = await collect(transport, run.stream_id)
    assert [(e.type, e.data.get("text")) for e in events if e.type == "token"] == [
        ("token", "plain \ufffd text"),
        ("token", "model \ufffd text"),
        ("token", "after"),
    ]
    assert events[2].data == {"name": "n", "data": {"k\ufffd": "v\ufffd"}}
    assert (events[-1].type, events[-1].data["message"]) == (
        "error",
        "the provider said \ufffd",
    )


def _raised(half: str) -> Any:
    async def source() -> Any:
        yield "before"
        raise RuntimeError(f"the tool said {half}")

    return source()


#: A source's item of each kind, holding the lone half given (or U+FFFD) in its strings.
_ITEMS_WITH: dict[str, Callable[[str], Any]] = {
    "token-message-id": lambda h: model_token("x", message_id=f"m{h}"),
    "token-node": lambda h: {
        "event": "on_chat_model_stream",
        "data": {"chunk": AIMessageChunk("x", id="m")},
        "metadata": {"langgraph_node": f"agent {h}"},
    },
    "token-ns": lambda h: (
        (f"sub{h}:1",),
        "messages",
        (AIMessageChunk(f"x{h}y", id=f"m{h}"), {"langgraph_node": "agent"}),
    ),
    "reasoning": lambda h: {
        "event": "on_chat_model_stream",
        "data": {
            "chunk": AIMessageChunk(
                [
                    {"type": "reasoning", "reasoning": f"{h} think"},
                    {"type": "text", "text": f"{h}!"},
                ],
                id=f"m{h}",
            )
        },
        "metadata": {"langgraph_node": "agent"},
    },
    "message": lambda h: (AIMessage(f"x{h}", id=f"m{h}"), {"langgraph_node": f"agent{h}"}),
    "tool-start": lambda h: {
        "event": "on_tool_start",
        "name": f"search{h}",
        "run_id": "r",
        "data": {"input": {f"q{h}": f"x{h}"}},
        "metadata": {"langgraph_node": "tools"},
    },
    "tool-end": lambda h: {
        "event": "on_tool_end",
        "name": "search",
        "run_id": "r",
        "data": {"output": f"found {h}"},
        "metadata": {},
    },
    "custom": lambda h: ("custom", {f"k{h}": [f"v{h}", {h: h}]}),
    "update": lambda h: ("updates", {f"node{h}": {"k": f"v{h}"}}),
    "interrupt": lambda h: ("updates", {"__interrupt__": [{"value": f"ask {h}", "id": h}]}),
    "error-relayed": lambda h: {"type": "error", "data": {"error": f"E{h}", "message": h}},
}


@pytest.mark.parametrize("kind", [*_ITEMS_WITH, "error-raised"])
async def test_a_lone_surrogate_in_any_event_is_written_as_u_fffd(kind: str) -> None:
    # Regression: a token whose message_id or node held a lone surrogate (orjson refuses
    # one) ended the whole answer with a TypeError `error`. Any event holding one, in any
    # string or key, is written as the same event with U+FFFD in its place would be.
    async def source(half: str) -> Any:
        if kind == "error-raised":
            async for item in _raised(half):
                yield item
        yield _ITEMS_WITH[kind](half)
        yield model_token("after")

    written = []
    for half in ("\ud83d", "\ufffd"):
        transport = MemoryTransport()
        run = await StreamProducer(transport).start(source(half))
        status = await asyncio.wait_for(run.wait(), timeout=10)
        events = await collect(transport, run.stream_id)
        written.append((status, [(e.type, e.data) for e in events]))
    assert written[0] == written[1]
    assert written[0][0] == ("error" if kind.startswith("error") else "completed")
    assert "\ufffd" in repr(written[0][1])


async def test_a_subgraphs_pair_split_across_tokens_reaches_readers_whole() -> None:
    # Regression: a subgraph's token (with `ns`) ending with the first half of a pair was
    # written with U+FFFD, and so was the second half in the next token: the character
    # was lost where the parent graph's arrives whole. Reasoning the same.
    def chunk(content: Any) -> Any:
        return (("sub:1",), "messages", (AIMessageChunk(content, id="m"), {"langgraph_node": "a"}))

    def think(text: str) -> Any:
        return chunk([{"type": "reasoning", "reasoning": text}])

    async def source() -> Any:
        for item in (chunk("a\ud83d"), chunk("\ude00b"), think("c\ud83d"), think("\ude00d")):
            yield item
        yield chunk("e\ud83d")

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(source())
    assert await asyncio.wait_for(run.wait(), timeout=10) == "completed"
    events = await collect(transport, run.stream_id)
    assert joined(events) == "a\U0001f600be\ufffd"
    assert "".join(e.data.get("reasoning", "") for e in events) == "c\U0001f600d"
    assert all(e.data["ns"] == ["sub:1"] for e in events[:-1])


@pytest.mark.parametrize("transport_kind", ["redis"])
async def test_lone_surrogates_in_metadata_and_subgraph_tokens_reach_redis_readers(
    transport: Transport,
) -> None:
    async def source() -> Any:
        yield model_token("a\ud83d", message_id="m\ud800")
        yield model_token("\ude00b", message_id="m\ud800")
        yield (("sub:1",), "messages", (AIMessageChunk("c\ud83d", id="m"), {}))
        yield (("sub:1",), "messages", (AIMessageChunk("\ude00d", id="m"), {}))
        yield ("custom", {"k\udfff": "v\ud800"})

    run = await StreamProducer(transport).start(source())
    assert await asyncio.wait_for(run.wait(), timeout=10) == "completed"
    events = await asyncio.wait_for(collect(transport, run.stream_id), timeout=10)
    assert joined(events) == "a\U0001f600bc\U0001f600d"
    assert [e.data["message_id"] for e in events if e.type == "token"][:2] == ["m\ufffd"] * 2
    assert [(e.type, e.data) for e in events[-2:]] == [
        ("custom", {"data": {"k\ufffd": "v\ufffd"}}),
        ("end", {}),
    ]


@pytest.mark.parametrize("shape", ["plain", "model"])
async def test_a_pair_split_across_tokens_reaches_readers_whole(shape: str) -> None:
    # The first half of a pair ending a token waits for the next token of its message; a
    # half nothing continues is U+FFFD, the last one too (written before the `end`). The
    # events' offsets run on without a gap, however the writes batched them.
    def token(text: str, message_id: str = "m") -> object:
        return text if shape == "plain" else model_token(text, message_id)

    pieces = ["a\ud83d", "\ude00b", "\ud83d", "\ude00", "c\ud83d", "d", "e\ud83d"]
    pieces += ["f\ud83d", "\ude00" * 2]  # (the first continues the pair, the second alone)

    async def source():
        for piece in pieces:
            yield token(piece)
            await asyncio.sleep(0)  # some entries of one token, some of several
        if shape == "model":
            yield token("g\ud83d")
            yield token("\ude00h", "other")  # another message's half: not joined
        yield token("end\ud83d")

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(source())
    assert await asyncio.wait_for(run.wait(), timeout=10) == "completed"
    events = await collect(transport, run.stream_id)
    text = "a\U0001f600b\U0001f600c\ufffdde\ufffdf\U0001f600\ufffd"
    if shape == "model":
        text += "g\ufffd\ufffdh"
    assert joined(events) == text + "end\ufffd"
    assert events[-1].type == "end"
    assert all(e.data["text"] for e in events[:-1])  # no empty token for a held half
    positions = [parse_offset(e.offset) for e in events]
    for before, after in itertools.pairwise(positions):
        assert (after.seq, after.event) in {
            (before.seq, before.event + 1),
            (before.seq + 1, 0),
        }


async def test_a_transport_misreporting_a_rollback_fails_the_run_instead_of_looping() -> None:
    # StorageRollback claiming the storage already holds the entry: a contract breach.
    transport = Faulty("append", StorageRollback("s", last_seq=7), times=1000)
    run = await StreamProducer(transport).start(endless(["a"]))
    with pytest.raises(StorageRollback):
        await asyncio.wait_for(run.wait(), timeout=10)


class HeldAppend(MemoryTransport):
    """Holds the append of entry ``seq`` until ``release`` is set."""

    def __init__(self, seq: int) -> None:
        super().__init__()
        self.seq = seq
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        if entry.seq == self.seq and not self.release.is_set():
            self.held.set()
            await self.release.wait()
        await super().append(stream_id, owner, entry, count, final)


async def test_a_rollback_window_that_is_not_an_int_is_refused_when_configured() -> None:
    # Regression: the window's deques take it as their maxlen: a float (256.0, inf) made
    # every start() fail with a TypeError, an int past sys.maxsize with an OverflowError.
    for window in (256.0, math.inf, None, "8"):
        with pytest.raises(ConfigurationError, match="rollback_window"):
            StreamProducer(MemoryTransport(), rollback_window=window)  # type: ignore[arg-type]
    run = await StreamProducer(MemoryTransport(), rollback_window=10**20).start(tokens(5))
    assert await run.wait() == "completed"


async def test_a_rollback_met_while_ending_an_interrupted_run_is_written() -> None:
    """The run's task is cancelled mid-write (a process shutting down), and sending that
    entry again finds the storage rolled back beyond the window: the stream still ends
    with `storage_rollback` after what the storage kept (it was left running, for readers
    to wait on until the lease lapsed)."""
    transport = HeldAppend(seq=11)
    producer = StreamProducer(transport, max_buffer=1, rollback_window=2)
    run = await producer.start(tokens(20, every=1), stream_id="s")
    await transport.held.wait()
    # A failover to a replica that had not caught up: entries 8-10 are gone.
    stream = transport._streams["s"]
    del stream.payloads[8 - stream.first_seq :]
    stream.last_count = 1
    run._task.cancel()  # what asyncio.run() does to every task at shutdown...
    transport.release.set()  # ...while entry 11 is being written: it is sent again
    with pytest.raises(asyncio.CancelledError):
        await run._task
    events = await collect(transport, "s")
    assert joined(events) == text_of(7)
    assert events[-1].type == "error" and events[-1].data["error"] == "storage_rollback"


# -- the fast path: Transport.append_soon ------------------------------------------------


class Posting(MemoryTransport):
    """Counts the entries posted; can answer a post "not stored", or hold its answer."""

    def __init__(self) -> None:
        super().__init__()
        self.posted: list[int] = []
        self.refuse: set[int] = set()  # seqs answered done(False), not stored
        self.hold: asyncio.Event | None = None  # stores, answers once set

    def append_soon(self, stream_id, owner, entry, count, done) -> bool:  # type: ignore[no-untyped-def]
        self.posted.append(entry.seq)
        if entry.seq in self.refuse:
            asyncio.get_running_loop().call_soon(done, False)
            return True
        if self.hold is None:
            return super().append_soon(stream_id, owner, entry, count, done)
        self._append(stream_id, owner, entry, count, None)
        held = self.hold

        async def answer() -> None:
            await held.wait()
            done(True)

        task = asyncio.get_running_loop().create_task(answer())
        self._held = task  # (kept alive)
        return True


async def _paced(
    transport: Transport,
    n: int,
    seen: asyncio.Queue[str],
    *,
    stream_id: str = "paced",
    **options: Any,
) -> tuple[list[str], object]:
    """A run whose source yields its next token once a reader has received the last one
    (``options``: the producer's)."""

    async def source():
        for i in range(n):
            yield f"t{i} "
            assert await seen.get() == f"t{i} "

    run = await StreamProducer(transport, **options).start(source(), stream_id=stream_id)
    got: list[str] = []
    async for event in StreamConsumer(transport, stream_id):
        if event.type == "token":
            got.append(event.data["text"])
            seen.put_nowait(event.data["text"])
    return got, await run.wait()


@pytest.fixture
def no_coalescing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tokens paced by a reader come within COALESCE_GAP of each other here; an LLM's do
    # not. With no gap every token is written at once, as an LLM's would be.
    monkeypatch.setattr("resumable_stream._producer.COALESCE_GAP", 0.0)


async def test_a_paced_run_posts_each_entry_with_no_task_waiting_on_it(no_coalescing: None) -> None:
    # Issue 11: awaiting each append woke the writer task twice per token.
    transport = Posting()
    got, status = await _paced(transport, 20, asyncio.Queue())
    assert got == [f"t{i} " for i in range(20)]
    assert status == "completed"
    # Each token's entry but the first (the writer's first turn takes what the source
    # yields at once) is posted; the final entry, the end alone, is awaited.
    assert transport.posted == list(range(2, 21))


async def test_a_paced_token_is_not_held_for_the_coalescing_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A token that came while the last entry was being written, or just after, was taken
    # for a burst: its entry was held open for coalesce_delay (50 ms by default) although
    # nothing else came. A paced source caught behind a slow write (a loaded server) lost
    # that much per token. An entry now stays open only while events keep coming.
    monkeypatch.setattr("resumable_stream._producer.COALESCE_GAP", math.inf)  # all "bursts"
    transport = MemoryTransport()
    async with asyncio.timeout(60):  # (before the fix: the second token waited an hour)
        got, status = await _paced(transport, 5, asyncio.Queue(), coalesce_delay=3600.0)
    assert got == [f"t{i} " for i in range(5)]
    assert status == "completed"
    info = await transport.info("paced")
    assert info is not None and info.last_seq == 6  # an entry per token, then the end


async def test_a_source_that_keeps_yielding_fills_its_entries() -> None:
    # The other side of the test above: a burst whose source yields to the event loop
    # after every token (as a real one does) still goes in few, full entries.
    transport = MemoryTransport()

    async def source():
        for i in range(2000):
            yield f"{i} "
            await asyncio.sleep(0)

    run = await StreamProducer(transport, coalesce_delay=3600.0).start(source())
    assert joined(await collect(transport, run.stream_id)) == "".join(f"{i} " for i in range(2000))
    assert await run.wait() == "completed"
    # 256 events per entry (coalesce_events) but the first and the last few.
    info = await transport.info(run.stream_id)
    assert info is not None and info.last_seq <= 20


async def test_an_item_that_adds_no_event_writes_no_entry(no_coalescing: None) -> None:
    # An empty token (or any item that comes to no event) woke the writer as if an event
    # had come: with nothing else being written, it posted an entry holding no event.
    transport = MemoryTransport()
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def source():
        yield "a "
        await seen.get()  # "a " is stored and read: the writer waits for events
        yield ""
        yield "b "

    run = await StreamProducer(transport).start(source(), stream_id="empty")
    got = []
    async with StreamConsumer(transport, "empty") as reader:
        async for event in reader:
            if event.type == "token":
                got.append(event.data["text"])
                seen.put_nowait(event.data["text"])
    assert got == ["a ", "b "]
    assert await run.wait() == "completed"
    entries = [decode_entry(p, 1, 1) for p in transport._streams["empty"].payloads]
    assert all(entries), entries  # every entry holds an event


async def test_a_post_not_stored_is_written_again_by_append(no_coalescing: None) -> None:
    transport = Posting()
    transport.refuse = {3, 7}
    got, status = await _paced(transport, 10, asyncio.Queue())
    assert got == [f"t{i} " for i in range(10)]  # each once, in order
    assert status == "completed"
    assert transport.posted == list(range(2, 11))  # 3 and 7 then went through append()


async def test_a_post_refused_because_the_run_was_fenced_fails_the_run(
    no_coalescing: None,
) -> None:
    transport = MemoryTransport()
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def source():
        yield "a "
        await seen.get()
        transport._streams["fenced"].owner = "another producer"  # taken over meanwhile
        yield "b "
        await asyncio.Event().wait()

    run = await StreamProducer(transport).start(source(), stream_id="fenced")
    reader = StreamConsumer(transport, "fenced")
    assert (await anext(reader)).data["text"] == "a "
    seen.put_nowait("a ")
    with pytest.raises(LeaseLost):
        await run.wait()
    await reader.aclose()


async def test_a_run_stopped_while_a_post_is_unanswered_writes_each_entry_once(
    no_coalescing: None, caplog: pytest.LogCaptureFixture
) -> None:
    transport = Posting()
    transport.hold = asyncio.Event()
    go = asyncio.Event()

    async def source():
        yield "a"  # written in the writer's first turn
        await go.wait()
        yield "b"  # posted
        await asyncio.Event().wait()

    run = await StreamProducer(transport).start(source(), stream_id="held")
    reader = StreamConsumer(transport, "held")
    assert (await anext(reader)).data["text"] == "a"
    await reader.aclose()
    go.set()
    await eventually(holds(lambda: bool(transport.posted)))
    run._task.cancel()  # e.g. the event loop shutting down, the post still unanswered
    with pytest.raises(asyncio.CancelledError):
        await run.wait()
    transport.hold.set()  # the late answer changes nothing
    await transport._held
    events = [
        event
        for entry in await transport.read("held", run.epoch, 0, 100)
        for event in decode_entry(entry.payload, entry.epoch, entry.seq)
    ]
    assert [(e.type, e.data.get("text", e.data.get("reason"))) for e in events] == [
        ("token", "a"),
        ("token", "b"),
        ("cancelled", "shutdown"),
    ]
    assert run._seq == 3 and run.status == "cancelled"
    assert "Traceback" not in caplog.text


async def test_a_cancelled_error_from_the_source_after_its_own_task_group_failed() -> None:
    # On Python 3.11, a TaskGroup whose child fails while it exits leaves the enclosing
    # task's cancelling() above 0: the pump task's count cannot tell a stop of the run from
    # a CancelledError the source raised itself.
    async def fails() -> None:
        await asyncio.sleep(0)  # fails once the group waits for it, exiting
        raise ValueError("a helper of the source failed")

    async def source():
        yield "a "
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(fails())
        except* ValueError:
            pass  # handled: the source goes on
        upstream = asyncio.get_running_loop().create_future()
        upstream.cancel()
        yield await upstream

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(source())
    assert await asyncio.wait_for(run.wait(), timeout=10) == "error"
    events = await asyncio.wait_for(collect(transport, run.stream_id), timeout=10)
    assert [e.type for e in events] == ["token", "error"]


async def test_a_clean_up_that_raises_cancelled_error_itself_still_ends_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Regression: a CancelledError out of the source's aclose() (its clean-up awaited
    # something that was cancelled), with nobody stopping the run, left the pump before it
    # set the terminal event: the run, its readers and producer.aclose() waited for ever.
    async def source():
        try:
            yield "a "
            yield {"type": "end", "data": {}}
        finally:
            helper = asyncio.ensure_future(asyncio.Event().wait())
            helper.cancel()
            await helper  # raises CancelledError

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(source())
    assert await asyncio.wait_for(run.wait(), timeout=10) == "completed"
    events = await asyncio.wait_for(collect(transport, run.stream_id), timeout=10)
    assert [e.type for e in events] == ["token", "end"]
    assert "aclose() raised" in caplog.text


def _grouped_source(ending: str, waiting: asyncio.Event) -> Any:
    """A source suspended at a `yield` inside its own TaskGroup when it is closed: its
    aclose() raises BaseExceptionGroup([GeneratorExit])."""

    async def source() -> Any:
        async with asyncio.TaskGroup() as group:
            group.create_task(asyncio.Event().wait())  # a helper running alongside
            yield "a "
            if ending == "end":
                yield {"type": "end", "data": {}}
            elif ending == "bad event":
                yield {"type": "tool_end", "data": {"output": {"id": 2**70}}}
            else:  # it swallows the stop, then yields
                waiting.set()
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    yield "after the stop "

    return source()


@pytest.mark.parametrize(
    ("ending", "status", "last"),
    [
        ("end", "completed", "end"),
        ("bad event", "error", "error"),
        ("stop", "cancelled", "cancelled"),
    ],
)
async def test_a_source_closed_inside_its_own_task_group_still_ends_the_run(
    ending: str, status: str, last: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: the group its aclose() raised ended the task reading it before it set the
    # terminal event: the run and its readers waited for ever ("Task exception was never
    # retrieved").
    transport = MemoryTransport()
    waiting = asyncio.Event()
    run = await StreamProducer(transport).start(_grouped_source(ending, waiting))
    if ending == "stop":
        await waiting.wait()
        run._request_cancel("requested")
    assert await asyncio.wait_for(run.wait(), timeout=10) == status
    events = await asyncio.wait_for(collect(transport, run.stream_id), timeout=10)
    assert [e.type for e in events] == ["token", last]
    assert "aclose() raised" in caplog.text and "GeneratorExit" in caplog.text


@pytest.mark.parametrize("transport_kind", ["redis"])
async def test_a_source_closed_inside_its_own_task_group_ends_the_stored_run(
    transport: Transport,
) -> None:
    run = await StreamProducer(transport).start(_grouped_source("end", asyncio.Event()))
    assert await asyncio.wait_for(run.wait(), timeout=10) == "completed"
    events = await asyncio.wait_for(collect(transport, run.stream_id), timeout=10)
    assert [e.type for e in events] == ["token", "end"]
    info = await transport.info(run.stream_id)
    assert info is not None and info.status == "completed"


_GROUPED_INTERRUPT = """
import asyncio, sys
from resumable_stream import StreamProducer
from resumable_stream.transports.memory import MemoryTransport

class Source:  # raises a KeyboardInterrupt in a group when read, or when closed
    def __aiter__(self):
        return self

    async def __anext__(self):
        if sys.argv[1] == "read":
            raise BaseExceptionGroup("the source's tasks", [KeyboardInterrupt()])
        raise StopAsyncIteration

    async def aclose(self):
        if sys.argv[1] == "close":
            raise BaseExceptionGroup("the source's tasks", [KeyboardInterrupt()])

async def main():
    run = await StreamProducer(MemoryTransport()).start(Source())
    print(await asyncio.wait_for(run.wait(), timeout=10))

try:
    asyncio.run(main())
except KeyboardInterrupt:
    print("interrupted")
"""


@pytest.mark.parametrize("when", ["read", "close"])
def test_a_keyboard_interrupt_in_a_group_from_the_source_still_stops_the_loop(when: str) -> None:
    # Regression: in a group, it was taken for the source's error (when read) or ended the
    # task reading the source with no terminal event (when closed): never the loop's. (In
    # a process of its own: the interrupt stops its event loop.)
    done = subprocess.run(
        [sys.executable, "-c", _GROUPED_INTERRUPT, when],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.strip() == "interrupted", done.stdout + done.stderr


async def test_a_stop_during_a_long_clean_up_ends_the_stream_at_once() -> None:
    # The stop does not cut the source's clean-up short, but its readers need not wait for
    # it: the stream ends with the terminal event the run was ending with; the run itself
    # (run.wait()) ends once the clean-up returns.
    transport = MemoryTransport()
    gated = GatedCleanUp(transport)
    producer = StreamProducer(transport)
    run = await producer.start(gated.source(), stream_id=gated.stream_id)
    await gated.closing.wait()
    assert await producer.cancel(run.stream_id)
    events = await asyncio.wait_for(collect(transport, run.stream_id), timeout=10)
    assert [e.type for e in events] == ["token", "end"]
    assert not run.done()  # still closing its source
    gated.release.set()
    assert await asyncio.wait_for(run.wait(), timeout=10) == "completed"


async def test_the_terminal_event_is_written_once_the_source_has_closed() -> None:
    # A graph's clean-up and checkpoint writes end before its thread shows idle (a review
    # of the fix above found the terminal event written while the source still closed).
    transport = MemoryTransport()
    gated = GatedCleanUp(transport)
    run = await StreamProducer(transport).start(gated.source(), stream_id=gated.stream_id)
    await gated.closing.wait()
    gated.release.set()
    assert await asyncio.wait_for(run.wait(), timeout=10) == "completed"
    assert gated.seen == ["running"]


async def test_a_run_cancelled_before_its_pump_starts_ends_cancelled() -> None:
    # Regression: a cancel after start() returned, once the run's task had made the task
    # reading the source but before that task's first step, cancelled a coroutine that
    # never ran: no terminal event, and run.cancel(), its readers and producer.aclose()
    # waited for ever (the heartbeat kept the lease alive).
    transport = MemoryTransport()
    producer = StreamProducer(transport)
    run = await producer.start(tokens(5), stream_id="early")
    # In a task: it runs after the run's own first step, before the pump's.
    status = await asyncio.wait_for(asyncio.ensure_future(run.cancel()), timeout=10)
    events = await asyncio.wait_for(collect(transport, "early"), timeout=10)
    assert status == "cancelled"
    assert [e.type for e in events] == ["cancelled"]
    await asyncio.wait_for(producer.aclose(), timeout=10)


class ClosableSource:
    """An async iterator with its own clean-up (an HTTP response, an SDK's stream)."""

    def __init__(self) -> None:
        self.closed = 0

    def __aiter__(self) -> ClosableSource:
        return self

    async def __anext__(self) -> str:
        await asyncio.sleep(0)
        return "x"

    async def aclose(self) -> None:
        self.closed += 1


@pytest.mark.parametrize("mapped", [False, True], ids=["items", "events"])
async def test_a_run_cancelled_before_its_pump_starts_closes_its_source(mapped: bool) -> None:
    # Regression: with events=, the source was closed by the generator that maps its items,
    # which never ran: a run stopped before reading (cancelled at once, or a reserved run
    # cancelled while queued) left the source open.
    source = ClosableSource()
    producer = StreamProducer(MemoryTransport())
    events = (lambda item: [("token", {"text": item})]) if mapped else None
    run = await producer.start(source, events=events)
    status = await asyncio.wait_for(asyncio.ensure_future(run.cancel()), timeout=10)
    assert status == "cancelled"
    assert source.closed == 1

    reservation = await producer.reserve(start_timeout=10)
    await producer.cancel(reservation.stream_id)  # cancelled while queued
    source = ClosableSource()
    run = await producer.start(source, events=events, reservation=reservation)
    assert await asyncio.wait_for(run.wait(), timeout=10) == "cancelled"
    assert source.closed == 1
    await producer.aclose()


async def test_a_source_that_yields_after_the_stop_ends_cancelled_without_that_event() -> None:
    # Regression: a source that caught the CancelledError, yielded once more and returned
    # had that event written and the stream ended with `end`: the stop was lost.
    transport = MemoryTransport()
    first = asyncio.Event()

    async def polite() -> Any:
        yield "before "
        first.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            yield "after the stop "

    run = await StreamProducer(transport).start(polite(), stream_id="polite")
    await first.wait()
    assert await asyncio.wait_for(run.cancel(), timeout=10) == "cancelled"
    events = await asyncio.wait_for(collect(transport, "polite"), timeout=10)
    assert [(e.type, e.data.get("text")) for e in events] == [
        ("token", "before "),
        ("cancelled", None),
    ]
    assert events[-1].data == {"reason": "requested"}


async def test_a_source_that_keeps_yielding_after_the_stop_is_not_written_on() -> None:
    # Regression: a retry loop that catches CancelledError kept yielding, and its events
    # kept being written after run.cancel() (which never returned), then after aclose().
    transport = MemoryTransport()
    producer = StreamProducer(transport)
    started = asyncio.Event()

    async def stubborn() -> Any:
        while True:
            try:
                yield "again "
                started.set()
                await asyncio.sleep(0)
            except asyncio.CancelledError:  # the mistake under test
                continue

    run = await producer.start(stubborn(), stream_id="stubborn")
    await started.wait()
    assert await asyncio.wait_for(run.cancel(), timeout=10) == "cancelled"
    events = await asyncio.wait_for(collect(transport, "stubborn"), timeout=10)
    assert events[-1].type == "cancelled"
    info = await transport.info("stubborn")
    assert info is not None and info.status == "cancelled"
    await asyncio.wait_for(producer.aclose(), timeout=10)


async def test_a_source_that_never_stops_ends_cancelled_after_a_lease() -> None:
    # Regression: a source whose clean-up hung after the stop (a `finally` awaiting for
    # ever) kept run.cancel(), its readers and producer.aclose() waiting for ever, and
    # the heartbeat kept its lease alive, so readers never saw it lost either.
    transport = MemoryTransport()
    producer = StreamProducer(transport, lease=0.2)
    started, cleaning = asyncio.Event(), asyncio.Event()
    never = asyncio.get_running_loop().create_future()

    async def stuck() -> Any:
        try:
            yield "one "
            started.set()
            await asyncio.Event().wait()
        finally:
            cleaning.set()
            await asyncio.shield(never)  # its clean-up hangs

    run = await producer.start(stuck(), stream_id="stuck")
    await started.wait()
    reader = asyncio.ensure_future(collect(transport, "stuck"))
    assert await asyncio.wait_for(run.cancel(), timeout=10) == "cancelled"
    assert cleaning.is_set()  # it was asked, and is still cleaning up
    events = await asyncio.wait_for(reader, timeout=10)
    assert [e.type for e in events] == ["token", "cancelled"]
    assert events[-1].data == {"reason": "requested"}
    await asyncio.wait_for(producer.aclose(), timeout=10)
    assert run.done()
    never.set_result(None)  # the source's clean-up ends: its task too
    await eventually(
        holds(
            lambda: not any(task.get_name() == "rstream pump stuck" for task in asyncio.all_tasks())
        )
    )


class HangingClose:
    """A source object whose aclose() hangs until ``release`` is set."""

    def __init__(self) -> None:
        self.closing, self.release = asyncio.Event(), asyncio.Event()
        self.yielded = asyncio.Event()

    def __aiter__(self) -> HangingClose:
        return self

    async def __anext__(self) -> str:
        if self.yielded.is_set():
            await asyncio.Event().wait()  # until cancelled
        self.yielded.set()
        return "one "

    async def aclose(self) -> None:
        self.closing.set()
        await asyncio.shield(self._released())

    async def _released(self) -> None:
        await self.release.wait()


async def test_a_source_whose_close_hangs_after_the_stop_ends_cancelled_after_a_lease() -> None:
    # Regression (a review of the fix above): the give-up skipped a source that was
    # closing, so a clean-up hanging in aclose() after the stop still held the run, its
    # readers and producer.aclose() for ever.
    transport = MemoryTransport()
    producer = StreamProducer(transport, lease=0.2)
    source = HangingClose()
    run = await producer.start(source, stream_id="closing")
    await source.yielded.wait()
    assert await asyncio.wait_for(run.cancel(), timeout=10) == "cancelled"
    assert source.closing.is_set() and not source.release.is_set()
    events = await asyncio.wait_for(collect(transport, "closing"), timeout=10)
    assert [e.type for e in events] == ["token", "cancelled"]
    await asyncio.wait_for(producer.aclose(), timeout=10)
    source.release.set()


async def test_a_source_left_behind_is_not_collected_while_it_runs() -> None:
    # Regression (the same review): once its run gave up on it, the task reading the
    # source was referenced only weakly by asyncio; collected mid-run ("Task was destroyed
    # but it is pending!"), it closed its running generator again.
    transport = MemoryTransport()
    producer = StreamProducer(transport, lease=0.2)
    started = asyncio.Event()
    releases: list[weakref.ref[asyncio.Event]] = []  # (weak: only the source holds it)
    finished: list[bool] = []

    async def stuck() -> Any:
        release = asyncio.Event()
        releases.append(weakref.ref(release))
        try:
            yield "one "
            started.set()
            await asyncio.Event().wait()
        finally:
            await release.wait()  # a clean-up that waits on what only it can reach
            finished.append(True)

    run = await producer.start(stuck(), stream_id="left")
    await started.wait()
    assert await asyncio.wait_for(run.cancel(), timeout=10) == "cancelled"
    await asyncio.wait_for(producer.aclose(), timeout=10)
    del run, producer
    gc.collect()
    release = releases[0]()
    assert release is not None  # the task reading the source, and the source, are kept
    release.set()
    await eventually(
        holds(lambda: not [t for t in asyncio.all_tasks() if t.get_name() == "rstream pump left"])
    )
    assert finished == [True]


async def test_a_run_whose_own_task_is_cancelled_ends_even_if_its_source_never_stops() -> None:
    # The event loop shutting down without producer.aclose(): the run's task is
    # cancelled; a source that ignores it no longer holds the run (and the loop) for ever.
    transport = MemoryTransport()
    producer = StreamProducer(transport, lease=0.2)
    started, release = asyncio.Event(), asyncio.Event()

    async def deaf() -> Any:
        yield "one "
        started.set()
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # the mistake under test
                await release.wait()

    run = await producer.start(deaf(), stream_id="deaf")
    await started.wait()
    run._task.cancel()  # e.g. the event loop shutting down
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run.wait(), timeout=10)
    events = await asyncio.wait_for(collect(transport, "deaf"), timeout=10)
    assert [e.type for e in events] == ["token", "cancelled"]
    assert events[-1].data == {"reason": "shutdown"}
    release.set()


async def test_a_run_whose_own_task_is_cancelled_writes_nothing_its_source_yields_after() -> None:
    # Regression (a second review): with the run's own task cancelled, a source that
    # swallowed the cancellation and kept yielding had those events written before
    # `cancelled`, then filled the buffer and waited for ever, keeping the run alive.
    transport = MemoryTransport()
    producer = StreamProducer(transport, lease=0.2, max_buffer=8)
    started = asyncio.Event()

    async def chatty() -> Any:
        text = "before "
        while True:
            yield text
            started.set()
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:  # the mistake under test: swallowed
                text = "after "

    run = await producer.start(chatty(), stream_id="chatty")
    await started.wait()
    run._task.cancel()  # e.g. the event loop shutting down
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run.wait(), timeout=10)
    events = await asyncio.wait_for(collect(transport, "chatty"), timeout=10)
    assert events[-1].type == "cancelled" and events[-1].data == {"reason": "shutdown"}
    assert {e.data["text"] for e in events[:-1]} == {"before "}
    await eventually(
        holds(lambda: not [t for t in asyncio.all_tasks() if t.get_name() == "rstream pump chatty"])
    )


async def test_a_failed_run_ends_even_if_its_source_never_stops() -> None:
    # Regression (the same review): a write failing past its retry budget stopped the
    # run's tasks, but a source whose clean-up hung kept run.wait() from ever raising.
    class Failing(MemoryTransport):
        down = False

        async def append(
            self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
        ) -> None:
            if self.down:
                raise TransportError("the storage is down")
            await super().append(stream_id, owner, entry, count, final)

    transport = Failing()
    producer = StreamProducer(transport, lease=0.2, write_retry_budget=0.1)
    started, release = asyncio.Event(), asyncio.Event()

    async def stuck() -> Any:
        try:
            yield "one "
            started.set()
            while True:
                await asyncio.sleep(0.001)
                transport.down = True
                yield "more "
        finally:
            await asyncio.shield(release.wait())  # its clean-up hangs

    run = await producer.start(stuck(), stream_id="failing")
    await started.wait()
    with pytest.raises(TransportError, match="down"):
        await asyncio.wait_for(run.wait(), timeout=10)
    release.set()


async def test_a_run_whose_stream_is_deleted_as_it_starts_stops_at_once() -> None:
    # Found by tests/test_model.py: deleted before the run's cancel watch first ran, the
    # memory transport's watch waited for ever, and the run kept reading its source until
    # its heartbeat found the lease gone (a third of the lease later).
    transport = MemoryTransport()
    closed = asyncio.Event()

    async def source() -> Any:
        try:
            await asyncio.Event().wait()  # an upstream call that takes its time
            yield "never"
        finally:
            closed.set()

    run = await StreamProducer(transport, lease=60).start(source(), stream_id="gone")
    assert await transport.delete("gone")
    async with asyncio.timeout(5):  # the heartbeat would take 20 s
        with pytest.raises(LeaseLost):
            await run.wait()
    assert closed.is_set()


async def test_runs_on_memory_watch_cancels_without_a_task() -> None:
    # Issue 11: the memory transport watched each run's cancel from a task of its own (the
    # default Transport.watch_cancel): a fourth task per run, and about a seventh of what a
    # live run and its reader keep for the garbage collector.
    transport = MemoryTransport()
    producer = StreamProducer(transport)
    gate = asyncio.Event()
    runs = [await producer.start(tokens(3, pause=gate)) for _ in range(5)]
    await asyncio.sleep(0)  # (the runs' tasks have started)
    names = [task.get_name() for task in asyncio.all_tasks()]
    assert not [name for name in names if name.startswith("rstream cancel")], names
    assert await runs[0].cancel() == "cancelled"  # a cancel reaches the run
    assert await producer.cancel(runs[1].stream_id)  # and one asked of the producer
    assert await StreamProducer(transport).cancel(runs[2].stream_id)  # or of another
    assert [await run.wait() for run in runs[1:3]] == ["cancelled", "cancelled"]
    await transport.delete(runs[3].stream_id)  # a delete stops a run too
    gate.set()
    assert await runs[4].wait() == "completed"
    with pytest.raises(LeaseLost):
        await runs[3].wait()


class SwallowsCancel(MemoryTransport):
    """Its append(), once held, loses the cancellation it gets (as a driver that catches
    CancelledError in a connect might) and completes the write; its renew() can break."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.held = asyncio.Event()
        self.broken = False

    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        if self.hold and final is None:
            self.hold = False
            self.held.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        await super().append(stream_id, owner, entry, count, final)

    async def renew(self, stream_id: str, owner: str, lease_ms: int) -> bool:
        if self.broken:
            raise RuntimeError("driver bug")
        return await super().renew(stream_id, owner, lease_ms)


async def test_a_run_whose_write_loses_the_cancel_of_a_failure_still_ends() -> None:
    # The failure's stop of the writes (the heartbeat failing on a bug) was lost in a
    # write that went on: the writes went on too, and the run then waited for events its
    # stopped source would never give, for ever, its task still marked as cancelling.
    transport = SwallowsCancel()
    more = asyncio.Event()

    async def source() -> Any:
        yield "a"
        await more.wait()
        yield "b"
        await asyncio.Event().wait()

    run = await StreamProducer(transport, lease=0.3).start(source())
    async with StreamConsumer(transport, run.stream_id) as reader:
        await anext(reader)
    transport.hold = True
    more.set()
    await asyncio.wait_for(transport.held.wait(), 10)
    transport.broken = True  # the heartbeat fails: the run ends with one error
    assert await asyncio.wait_for(run.wait(), 10) == "error"
    assert run._task.cancelling() == 0
    events = await collect(transport, run.stream_id)
    assert [(e.type, e.data.get("error")) for e in events] == [
        ("token", None),
        ("token", None),
        ("error", "producer_failed"),
    ]


def test_memory_answers_given_after_a_loop_closed_with_one_pending() -> None:
    # The memory transport gives the answers of one loop turn in one callback. A loop that
    # closed before that callback ran must not leave its answers pending for the next loop:
    # they would never be given there (a run would wait for its first write forever).
    transport = MemoryTransport()
    answered: list[bool] = []

    async def post(stream_id: str) -> None:
        info = await transport.create(stream_id, "me", 10_000)
        entry = Entry(info.epoch, 1, encode_entry([("token", {"text": "x"})]))
        assert transport.append_soon(stream_id, "me", entry, 1, answered.append)

    async def post_and_stop() -> None:
        await post("a")
        asyncio.get_running_loop().stop()  # before the turn that would answer

    first = asyncio.new_event_loop()
    first.run_until_complete(post_and_stop())
    first.close()
    assert answered == []  # (the callback was left unrun)
    answered.clear()

    async def given() -> bool:
        return answered == [True]

    async def post_and_wait() -> None:
        await post("b")
        await eventually(given)

    # (A loop_factory: asyncio.run() would leave the thread's current loop unset, and
    # older pytest-asyncio then makes one it never closes.)
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        runner.run(post_and_wait())


async def test_memory_answers_go_on_past_one_that_raises() -> None:
    transport = MemoryTransport()
    answered: list[str] = []
    reported: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))

    def raising(stored: bool) -> None:
        raise RuntimeError("a done callback's bug")

    for stream_id, done in (("a", raising), ("b", lambda stored: answered.append("b"))):
        info = await transport.create(stream_id, "me", 10_000)
        entry = Entry(info.epoch, 1, encode_entry([("token", {"text": "x"})]))
        assert transport.append_soon(stream_id, "me", entry, 1, done)

    async def given() -> bool:
        return answered == ["b"]

    await eventually(given)
    assert [type(c["exception"]) for c in reported] == [RuntimeError]
