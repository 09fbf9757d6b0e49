"""StreamProducer.reserve(): a run readers can wait on before a worker starts it.

For task queues: the process that queues the work reserves the run and sends the
`Reservation` with the task; the worker that runs the task continues it with
`start(source, reservation=...)`. Run against every transport; with Redis the reserving and
the starting producers use separate transports, like two processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from resumable_stream import (
    ConfigurationError,
    InvalidStreamId,
    LeaseLost,
    Reservation,
    ReservationExpired,
    StreamAlreadyRunning,
    StreamProducer,
    Transport,
)
from resumable_stream.transports.memory import MemoryTransport
from tests._helpers import collect, joined, text_of, tokens


async def test_readers_wait_from_the_reservation_and_get_the_whole_run(
    transport: Transport, peer_transport: Transport
) -> None:
    api = StreamProducer(transport)
    worker = StreamProducer(peer_transport)
    reservation = await api.reserve("job-1", start_timeout=30)
    reader = asyncio.create_task(collect(transport, "job-1"))
    info = await transport.info("job-1")
    assert info is not None and info.status == "running"

    # The task travels as text; the worker continues the very run readers wait on.
    received = Reservation.parse(str(reservation))
    run = await worker.start(tokens(20), reservation=received)
    assert await run.wait() == "completed"
    events = await reader

    assert received == reservation
    assert run.stream_id == "job-1" and run.epoch == reservation.epoch
    assert [e.type for e in events[:2]] == ["custom", "custom"]
    assert [e.data["name"] for e in events[:2]] == [
        "resumable_stream.reserved",
        "resumable_stream.started",
    ]
    assert joined(events) == text_of(20)
    assert events[-1].type == "end"
    # A reader joining later, or resuming from the reservation's event, reads the same.
    assert await collect(transport, "job-1") == events
    assert await collect(transport, "job-1", after=events[0].offset) == events[1:]


async def test_a_run_nobody_starts_ends_with_not_started(
    transport: Transport, peer_transport: Transport
) -> None:
    reservation = await StreamProducer(transport).reserve(start_timeout=0.3)

    events = await collect(transport, reservation.stream_id)  # waits, then reaps
    with pytest.raises(ReservationExpired) as raised:
        await StreamProducer(peer_transport).start(tokens(3), reservation=reservation)

    assert events[-1].type == "error"
    assert events[-1].data["error"] == "not_started"
    assert isinstance(raised.value, LeaseLost)
    assert raised.value.stream_id == reservation.stream_id


async def test_a_run_cancelled_before_a_worker_starts_it_ends_without_reading_its_source(
    transport: Transport, peer_transport: Transport
) -> None:
    # Regression: a cancel of a queued run (POST /cancel answered 202) was seen only once
    # the run had started: the worker's source ran, and its first token was written.
    api = StreamProducer(transport)
    reservation = await api.reserve("job-stopped", start_timeout=30)
    assert await api.cancel("job-stopped")
    pulled: list[str] = []

    async def answer() -> AsyncIterator[str]:
        pulled.append("called")  # a model call: it must not be made
        yield "first token"

    run = await StreamProducer(peer_transport).start(answer(), reservation=reservation)

    assert await run.wait() == "cancelled"
    events = await collect(transport, "job-stopped")
    assert pulled == []
    assert [e.type for e in events] == ["custom", "custom", "cancelled"]
    assert events[-1].data["reason"] == "requested"
    with pytest.raises(ReservationExpired):  # a redelivered task: nothing left to do
        await StreamProducer(peer_transport).start(answer(), reservation=reservation)


async def test_a_reservation_starts_once(transport: Transport, peer_transport: Transport) -> None:
    # A task delivered twice (a visibility timeout that lapsed, a redelivery).
    reservation = await StreamProducer(transport).reserve(start_timeout=30)
    first, second = StreamProducer(transport), StreamProducer(peer_transport)
    pause = asyncio.Event()
    outcomes = await asyncio.gather(
        first.start(tokens(10, pause=pause), reservation=reservation),
        second.start(tokens(10, pause=pause), reservation=reservation),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, StreamAlreadyRunning)]
    started = [o for o in outcomes if not isinstance(o, BaseException)]
    pause.set()
    assert len(started) == 1 and len(refused) == 1, outcomes
    assert await started[0].wait() == "completed"
    with pytest.raises((StreamAlreadyRunning, ReservationExpired)):
        await second.start(tokens(1), reservation=reservation)  # and not after either
    events = await collect(transport, reservation.stream_id)
    assert joined(events) == text_of(10)


async def test_reservations_are_checked(transport: Transport) -> None:
    producer = StreamProducer(transport)
    reservation = await producer.reserve("job-2", start_timeout=30)

    with pytest.raises(StreamAlreadyRunning):
        await producer.reserve("job-2", start_timeout=30)
    with pytest.raises(StreamAlreadyRunning):
        await producer.start(tokens(1), stream_id="job-2")
    with pytest.raises(ConfigurationError):
        await producer.reserve(start_timeout=0)
    # Regression: infinity made the stream, then failed (OverflowError), leaving it behind;
    # other types were TypeErrors.
    for bad in (float("inf"), float("nan"), "5", None, True):
        with pytest.raises(ConfigurationError, match="start_timeout"):
            await producer.reserve("job-bad", start_timeout=bad)  # type: ignore[arg-type]
    assert await transport.info("job-bad") is None
    with pytest.raises(ValueError, match="different streams"):
        await producer.start(tokens(1), stream_id="other", reservation=reservation)
    for text in ("", "x:y", ":token:job", "12::job"):
        with pytest.raises(ValueError, match="not a reservation"):
            Reservation.parse(text)
    with pytest.raises(InvalidStreamId):
        Reservation.from_dict({"stream_id": "bad id!", "epoch": 1, "token": "t"})
    assert Reservation.from_dict(reservation.to_dict()) == reservation
    assert reservation.token not in repr(reservation)


async def test_a_memory_reservation_outlasting_running_ttl_keeps_its_entries() -> None:
    # As on Redis (test_redis.py): the memory transport renewed the lease, not the data,
    # so a start_timeout longer than running_ttl saw the reservation's entry expire, and
    # every reader of the run got OffsetExpired.
    transport = MemoryTransport(running_ttl=1, tombstone=60)
    await StreamProducer(transport).reserve("queued", start_timeout=30)
    stream = transport._streams["queued"]
    assert stream.data_until - time.monotonic() > 25
    assert stream.meta_until - stream.data_until == 60  # the tombstone margin on top


def test_a_malformed_reservation_is_refused_naming_its_field() -> None:
    # Regression: int() read an epoch str(reservation) never writes ("1.7" from a dict was
    # epoch 1, "1_0" was 10, " 12 ", True and -3 passed), so a corrupted task became another
    # reservation, refused later as expired (ReservationExpired: "too late").
    good = Reservation("job", 1700000000000000, "0123abcd")
    assert Reservation.parse(str(good)) == good
    assert Reservation.from_dict(good.to_dict()) == good
    assert Reservation.from_dict({**good.to_dict(), "epoch": "1700000000000000"}) == good
    for epoch in (1.7, 2.0, "1_0", " 12 ", "+12", "١٢", True, 0, -3, "-3", "", None, [1]):
        with pytest.raises(ConfigurationError, match="epoch") as raised:
            Reservation.from_dict({**good.to_dict(), "epoch": epoch})
        assert isinstance(raised.value, ValueError)
    for text in ("1_0:0123abcd:job", " 12:0123abcd:job", "1.7:0123abcd:job", "-1:0123abcd:job"):
        with pytest.raises(ConfigurationError, match="epoch"):
            Reservation.parse(text)
    for token in ("", None, 5):
        with pytest.raises(ConfigurationError, match="token"):
            Reservation.from_dict({**good.to_dict(), "token": token})
    with pytest.raises(ConfigurationError, match="stream_id"):
        Reservation.from_dict({"epoch": 1, "token": "t"})
    with pytest.raises(ConfigurationError, match="not a reservation"):
        Reservation.from_dict("1:t:job")  # type: ignore[arg-type]
    assert good.token not in repr(good)
