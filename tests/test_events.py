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
