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
