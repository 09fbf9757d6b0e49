"""Normalization of sources into the event vocabulary (shapes without a graph)."""

from __future__ import annotations

from dataclasses import dataclass

from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessageChunk, ToolMessage

from resumable_stream import Event
from resumable_stream._events import message_to_dict, normalize, text_of


def test_text_of_content_blocks() -> None:
    assert text_of("plain") == "plain"
    blocks = [
        {"type": "text", "text": "a"},
        {"type": "tool_use", "input": {}},
        "b",
        {"type": "image"},
    ]
    assert text_of(blocks) == "ab"
    assert text_of(None) == ""


def test_strings_events_and_vocabulary_dicts_pass_through() -> None:
    assert list(normalize("hi")) == [("token", {"text": "hi", "message_id": None, "node": None})]
    assert list(normalize("")) == []
    assert list(normalize(Event("custom", {"a": 1}, "1-1-0"))) == [("custom", {"a": 1})]
    assert list(normalize({"type": "tool_end", "data": {"name": "x"}})) == [
        ("tool_end", {"name": "x"})
    ]


def test_message_tuples() -> None:
    chunk = AIMessageChunk(content="tok", id="m")
    assert list(normalize((chunk, {"langgraph_node": "agent"}))) == [
        ("token", {"text": "tok", "message_id": "m", "node": "agent"})
    ]
    ((kind, data),) = normalize(
        (ToolMessage(content="42", tool_call_id="c1", id="t"), {"langgraph_node": "tools"})
    )
    assert kind == "message"
    assert data["message"]["role"] == "tool" and data["message"]["tool_call_id"] == "c1"
    empty = AIMessageChunk(
        content="", id="m", tool_call_chunks=[{"name": "f", "args": "{", "id": "c", "index": 0}]
    )
    # No text, but a tool call's fragment: a `token` carrying it (no whole message follows).
    assert list(normalize((empty, {}))) == [
        (
            "token",
            {
                "text": "",
                "message_id": "m",
                "node": None,
                "tool_call_chunks": [{"id": "c", "name": "f", "args": "{", "index": 0}],
            },
        )
    ]
    assert list(normalize((AIMessageChunk(content="", id="m"), {}))) == []


def test_complete_messages_keep_tool_calls() -> None:
    message = AIMessage(
        content="", id="m", tool_calls=[{"name": "search", "args": {"q": "x"}, "id": "c1"}]
    )
    ((kind, data),) = normalize(message)
    assert kind == "message"
    assert data["message"]["tool_calls"] == [{"id": "c1", "name": "search", "args": {"q": "x"}}]


def test_a_tool_messages_artifact_is_kept_in_message_and_tool_end_events() -> None:
    # Regression: a tool's artifact (response_format="content_and_artifact": the data for
    # the app beside the text for the model) was dropped from the `message` event of its
    # ToolMessage and from its `tool_end` output; the LangGraph API sends it.
    import datetime as dt

    import pydantic

    class Hit(pydantic.BaseModel):
        title: str
        day: dt.date

    artifact = {"hits": [Hit(title="Redis", day=dt.date(2026, 1, 2))], "raw": b"hi"}
    message = ToolMessage(content="found", tool_call_id="c1", id="t", artifact=artifact)
    wire = {"hits": [{"title": "Redis", "day": "2026-01-02"}], "raw": "aGk="}
    ((kind, data),) = normalize((message, {"langgraph_node": "tools"}))
    assert kind == "message"
    assert data["message"]["artifact"] == wire
    event = {"event": "on_tool_end", "name": "search", "run_id": "r", "data": {"output": message}}
    ((kind, data),) = normalize(event)
    assert kind == "tool_end"
    assert data["output"]["artifact"] == wire
    assert data["output"]["tool_call_id"] == "c1"
    # No artifact, no key: the compact form stays as it was.
    assert "artifact" not in message_to_dict(ToolMessage(content="x", tool_call_id="c1"))


def test_unknown_objects_become_custom_events() -> None:
    @dataclass
    class Point:
        x: int

    assert list(normalize(Point(3))) == [("custom", {"data": {"x": 3}})]
    assert list(normalize(7)) == [("custom", {"data": 7})]


def test_langchain_events_that_carry_nothing_are_dropped() -> None:
    assert (
        list(normalize({"event": "on_chain_start", "data": {}, "name": "x", "run_id": "r"})) == []
    )


def test_a_message_chunk_has_the_role_of_its_message() -> None:
    # A chunk's type is its class name: "AIMessageChunk" became the role "AIMessage" (a
    # node returning the sum of a model's streamed chunks, in `updates` and `values`).
    summed = AIMessageChunk(content="Hel", id="m") + AIMessageChunk(content="lo", id="m")
    ((kind, data),) = normalize(("updates", {"agent": {"messages": [summed]}}))
    assert kind == "update"
    assert data["data"]["messages"][0]["role"] == "ai"
    assert message_to_dict(HumanMessageChunk(content="hi"))["role"] == "human"


async def test_dates_enums_and_uuids_are_written_as_json_does_not_as_their_repr() -> None:
    # Regression: a datetime in a graph's state or a custom event (also inside a pydantic
    # model) reached readers as "datetime.datetime(2026, 1, 2, 3, 4, 5, ...)", an enum as
    # "<Color.RED: 1>", a UUID as "UUID('...')": Python reprs no client can parse, where
    # JSON encoders (orjson, pydantic, the LangGraph API) write ISO 8601, the value, the hex.
    import datetime as dt
    import enum
    import uuid

    import pydantic

    from resumable_stream import StreamConsumer, StreamProducer
    from resumable_stream.transports.memory import MemoryTransport

    class Color(enum.Enum):
        RED = 1

    class Booking(pydantic.BaseModel):
        at: dt.datetime

    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    value = {
        "when": when,
        "day": dt.date(2026, 1, 2),
        "time": dt.time(3, 4, 5),
        "color": Color.RED,
        "id": uuid.UUID(int=5),
        "booking": Booking(at=when),
    }

    async def source():  # type: ignore[no-untyped-def]
        yield {"type": "custom", "data": value}
        yield ("updates", {"agent": {"state": value}})

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(source())
    assert await run.wait() == "completed"
    events = [event async for event in StreamConsumer(transport, run.stream_id)]
    expected = {
        "when": "2026-01-02T03:04:05+00:00",
        "day": "2026-01-02",
        "time": "03:04:05",
        "color": 1,
        "id": "00000000-0000-0000-0000-000000000005",
        "booking": {"at": "2026-01-02T03:04:05+00:00"},
    }
    assert events[0].data == expected
    assert events[1].data["data"] == {"state": expected}


async def test_a_dataclass_holding_what_cannot_be_copied_is_written_not_the_end_of_the_run() -> (
    None
):
    # Regression: a dataclass (a graph's typed state, a custom event's payload) was converted
    # with dataclasses.asdict(), which deep-copies every field: one holding a lock, a client
    # or a generator raised "cannot pickle" and ended the run with an error, where the same
    # value yielded as an Event was written (its field as its repr), as the docs promise.
    import threading

    from resumable_stream import StreamConsumer, StreamProducer
    from resumable_stream.transports.memory import MemoryTransport

    @dataclass
    class State:
        lock: object
        step: int

    state = State(threading.Lock(), 3)

    async def source():  # type: ignore[no-untyped-def]
        yield ("values", state)
        yield {"type": "custom", "data": {"state": state}}
        yield Event("custom", {"state": state}, "")

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(source())
    assert await run.wait() == "completed"
    events = [event async for event in StreamConsumer(transport, run.stream_id)]
    written = {"lock": repr(state.lock), "step": 3}
    assert [e.type for e in events] == ["update", "custom", "custom", "end"]
    assert events[0].data["data"] == written
    assert events[1].data == events[2].data == {"state": written}


async def test_an_object_whose_repr_raises_is_written_as_its_type_not_the_end_of_the_run() -> None:
    # Regression: to_jsonable() wrote an unknown object as its repr, and a repr that raised
    # (a half-built client object) ended the run with that object's ValueError.
    from resumable_stream import StreamConsumer, StreamProducer
    from resumable_stream.transports.memory import MemoryTransport

    class Broken:
        def __repr__(self) -> str:
            raise ValueError("not built yet")

    async def source():  # type: ignore[no-untyped-def]
        yield {"type": "custom", "data": {"client": Broken()}}
        yield Event("custom", {"client": Broken()}, "")
        yield ("updates", {"agent": {"client": Broken()}})

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(source())
    assert await run.wait() == "completed"
    events = [event async for event in StreamConsumer(transport, run.stream_id)]
    shown = "<Broken object (its repr raised ValueError)>"
    assert [e.data for e in events[:2]] == [{"client": shown}] * 2
    assert events[2].data["data"] == {"client": shown}


async def test_dict_keys_are_written_as_json_encoders_write_them() -> None:
    # Regression: to_jsonable() wrote every key as its str(): None as "None" (orjson,
    # json and pydantic write "null"), an enum key as "Color.RED" where its value is
    # written as 1, a datetime key with a space instead of ISO 8601's "T"; and an Event
    # whose data had a tuple key (or an integer key beyond 64 bits) ended its run with a
    # TypeError where the same dict yielded as a dict was written.
    import datetime as dt
    import enum
    import uuid

    from resumable_stream import StreamConsumer, StreamProducer
    from resumable_stream.transports.memory import MemoryTransport

    class Color(enum.Enum):
        RED = 1

    class Role(str, enum.Enum):  # noqa: UP042 (not StrEnum: its str() is "Role.USER")
        USER = "user"

    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    value = {
        None: 0,
        True: 1,
        Color.RED: 2,
        Role.USER: 3,
        when: 4,
        dt.date(2026, 1, 3): 5,
        uuid.UUID(int=5): 6,
        7: 7,
        1.5: 8,
        (1, 2): 9,
        2**70: 10,
    }
    expected = {
        "null": 0,
        "true": 1,
        "1": 2,
        "user": 3,
        "2026-01-02T03:04:05+00:00": 4,
        "2026-01-03": 5,
        "00000000-0000-0000-0000-000000000005": 6,
        "7": 7,
        "1.5": 8,
        "(1, 2)": 9,
        str(2**70): 10,
    }

    async def source():  # type: ignore[no-untyped-def]
        yield {"type": "custom", "data": {"data": value}}
        yield Event("custom", {"data": value}, "")
        yield ("updates", {"agent": value})

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(source())
    assert await run.wait() == "completed"
    events = [event async for event in StreamConsumer(transport, run.stream_id)]
    assert [e.data["data"] for e in events[:3]] == [expected] * 3


async def test_a_pydantic_model_class_among_values_is_written_as_its_repr() -> None:
    # Regression: a pydantic model's class (a schema kept in a graph's state, a custom
    # event naming the model an answer must follow) has a model_dump too, unbound: calling
    # it raised "missing 1 required positional argument: 'self'" and ended the run.
    import pydantic

    from resumable_stream import StreamConsumer, StreamProducer
    from resumable_stream.transports.memory import MemoryTransport

    class Decision(pydantic.BaseModel):
        approved: bool

    async def source():  # type: ignore[no-untyped-def]
        yield {"type": "custom", "data": {"schema": Decision}}
        yield ("values", {"schema": Decision, "decision": Decision(approved=True)})

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(source())
    assert await run.wait() == "completed"
    events = [event async for event in StreamConsumer(transport, run.stream_id)]
    assert events[0].data == {"schema": repr(Decision)}
    assert events[1].data["data"] == {"schema": repr(Decision), "decision": {"approved": True}}


async def test_values_json_encoders_know_are_written_as_they_write_them() -> None:
    # Regression: a Decimal was written as "Decimal('1.50')", a timedelta, bytes, a path, an
    # IP address, a regex, a deque, an exception and a pydantic.v1 model as their repr; JSON
    # encoders (pydantic's, FastAPI's, the LangGraph API's) write a number, the seconds,
    # base64, the text, the pattern, a list, {error, message} and the model's fields.
    import datetime as dt
    import decimal
    import ipaddress
    import pathlib
    import re
    import zoneinfo
    from collections import deque

    import pydantic.v1

    from resumable_stream import StreamConsumer, StreamProducer
    from resumable_stream.transports.memory import MemoryTransport

    class Old(pydantic.v1.BaseModel):
        name: str
        size: int

    class Score(float):  # (orjson refuses a float subclass: the run ended, a TypeError)
        pass

    value = {
        "zone": zoneinfo.ZoneInfo("Europe/Paris"),
        "utc": dt.UTC,
        "offset": dt.timezone(dt.timedelta(hours=2)),
        "score": Score(0.75),
        "price": decimal.Decimal("1.50"),
        "count": decimal.Decimal("3"),
        "nan": decimal.Decimal("NaN"),
        "took": dt.timedelta(minutes=1, milliseconds=500),
        "raw": b"\x00\xffhi",
        "path": pathlib.Path("/tmp/report.pdf"),
        "ip": ipaddress.ip_address("10.0.0.1"),
        "net": ipaddress.ip_network("10.0.0.0/8"),
        "pattern": re.compile(r"\d+"),
        "recent": deque([1, 2]),
        "failure": ValueError("no such city"),
        "old": Old(name="tea", size=2),
    }
    written = {
        "zone": "Europe/Paris",
        "utc": "UTC",
        "offset": "UTC+02:00",
        "score": 0.75,
        "price": 1.5,
        "count": 3,
        "nan": None,
        "took": 60.5,
        "raw": "AP9oaQ==",
        "path": "/tmp/report.pdf",
        "ip": "10.0.0.1",
        "net": "10.0.0.0/8",
        "pattern": r"\d+",
        "recent": [1, 2],
        "failure": {"error": "ValueError", "message": "no such city"},
        "old": {"name": "tea", "size": 2},
    }

    async def source():  # type: ignore[no-untyped-def]
        yield {"type": "custom", "data": value}
        yield Event("custom", value, "")
        yield ("updates", {"agent": value})

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(source())
    assert await run.wait() == "completed"
    events = [event async for event in StreamConsumer(transport, run.stream_id)]
    assert [e.type for e in events] == ["custom", "custom", "update", "end"]
    assert events[0].data == events[1].data == written
    assert events[2].data["data"] == written
