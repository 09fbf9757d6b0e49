"""Public value types can grow: frozen, slotted dataclasses read by name, never by position."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path

import pytest

from resumable_stream import (
    ConfigurationError,
    Event,
    Position,
    StreamInfo,
    StreamProducer,
    from_url,
    parse_offset,
)
from resumable_stream.transports import Entry
from resumable_stream.transports.memory import MemoryTransport
from tests._helpers import collect, tokens

INFO = StreamInfo(
    stream_id="s",
    epoch=7,
    status="running",
    created_at=1.0,
    updated_at=2.0,
    last_seq=3,
    last_count=2,
    lease_ms=5000,
)
VALUES = [Event("token", {"text": "a"}, "7-1-0"), INFO, Entry(7, 1, b"[]"), parse_offset("7-1-0")]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_value_types_are_frozen_slotted_and_not_tuples(value: object) -> None:
    assert dataclasses.is_dataclass(value)
    assert not isinstance(value, tuple)
    assert not hasattr(value, "__dict__")  # slotted
    first = dataclasses.fields(value)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, first, None)
    with pytest.raises(TypeError):
        iter(value)  # type: ignore[call-overload]  # positional unpacking is not API
    assert dataclasses.replace(value) == value  # type: ignore[type-var]


def test_fields_are_read_by_name() -> None:
    assert parse_offset("7-2-3") == Position(epoch=7, seq=2, event=3)
    assert INFO.last_offset is not None and parse_offset(INFO.last_offset).event == 1


async def test_run_status_is_running_until_it_ends() -> None:
    transport = MemoryTransport()
    gate = asyncio.Event()
    run = await StreamProducer(transport).start(tokens(10, pause=gate))
    assert run.status == "running"
    assert "status=running" in repr(run)
    gate.set()
    assert await run.wait() == "completed"
    assert run.status == "completed"
    events = await collect(transport, run.stream_id)
    assert events[-1] == Event("end", {}, events[-1].offset)


def test_from_url_options_are_typed(tmp_path: Path) -> None:
    from mypy import api

    checked = tmp_path / "uses.py"
    checked.write_text(
        "from resumable_stream import from_url\n"
        'from_url("memory://", retention=60.0, max_entries=100)\n'
        'from_url("redis://localhost", prefix="chat", tombstone=10)\n'
        'from_url("memory://", retention="1h")\n'
        'from_url("redis://localhost", prefx="chat")\n'
    )
    out, _, status = api.run(["--strict", "--no-incremental", str(checked)])
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1
    assert [line.split(":")[1] for line in errors] == ["4", "5"], out
    assert '"retention"' in errors[0] and '"prefx"' in errors[1]


def test_a_redis_option_given_to_memory_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="prefix"):
        from_url("memory://", prefix="chat")


NOT_FINITE = [math.nan, math.inf]


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize("option", ["lease", "coalesce_delay", "write_retry_budget"])
def test_a_producer_setting_that_is_not_finite_is_refused(option: str, value: float) -> None:
    # Regression: nan passed every `< least` check (a write_retry_budget of nan retried for
    # ever), and a lease of nan or inf raised ValueError / OverflowError.
    with pytest.raises(ConfigurationError, match=option):
        StreamProducer(MemoryTransport(), **{option: value})


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize("option", ["retention", "tombstone", "running_ttl"])
def test_a_transport_setting_that_is_not_finite_is_refused(option: str, value: float) -> None:
    # Regression: retention=nan was taken, and the finished stream never expired.
    with pytest.raises(ConfigurationError, match=option):
        from_url("memory://", **{option: value})
    with pytest.raises(ConfigurationError, match=option):
        from_url("redis://127.0.0.1:1/0", **{option: value})  # (no connection is made)
