"""Unit layer of resumable_stream.langgraph_api and the producer's `events=` hook."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, TypedDict

import httpx
import orjson
import pytest
from langchain_core.messages import AIMessageChunk

from resumable_stream import StreamConsumer, StreamProducer, TransportError, langgraph_api
from resumable_stream._codec import decode_entry, encode_entry
from resumable_stream.langgraph_api import stream_parts, to_wire
from resumable_stream.starlette import allow_all
from resumable_stream.transports.memory import MemoryTransport
from tests._helpers import dead_run, eventually, holds
from tests.clients._graph import answer_text, build_graph


def test_message_parts_keep_tool_call_chunks_and_metadata() -> None:
    chunk = AIMessageChunk(
        content="",
        id="m1",
        tool_call_chunks=[{"name": "search", "args": '{"q": ', "id": "call_1", "index": 0}],
    )
    metadata = {"langgraph_node": "agent", "ls_model_name": "x"}
    [(name, data)] = stream_parts((("sub:1",), "messages", (chunk, metadata)))
    assert name == "messages|sub:1"
    message, meta = data["data"]
    assert message["type"] == "AIMessageChunk"
    assert message["tool_call_chunks"][0]["args"] == '{"q": '
    assert meta == metadata


def test_to_wire_serializes_like_the_api() -> None:
    wire = to_wire({"messages": [AIMessageChunk(content="hi", id="x")], "n": (1, 2)})
    assert wire["messages"][0]["content"] == "hi"
    assert wire["messages"][0]["response_metadata"] == {}
    assert wire["n"] == [1, 2]


def test_a_runs_parts_are_stored_as_to_wire_writes_their_payloads() -> None:
    # A run's parts are written as JSON by orjson where it writes them as to_wire() would
    # (a message chunk and its metadata: a tenth of the CPU); any payload holding a value
    # it would write otherwise, or refuses, goes through to_wire() as before.
    import dataclasses
    import datetime as dt
    import decimal
    import enum
    from collections import OrderedDict, deque
    from typing import NamedTuple

    import pydantic

    class Color(enum.Enum):
        RED = 1
        BLUE = (2, dt.date(2026, 1, 3))

    class Mode(enum.StrEnum):
        FAST = "fast"

    class Point(NamedTuple):
        x: int
        y: int

    @dataclasses.dataclass
    class Box:
        size: int

    class Share(float):
        pass

    class Note(pydantic.BaseModel):
        name: str
        seen: list[int] = []

    class Item(pydantic.BaseModel):
        name: str
        when: dt.datetime | None = None
        tags: set[str] = set()

    chunk = AIMessageChunk(content="hi", id="m", response_metadata={"model_provider": "x"})
    plain = [
        (chunk, {"langgraph_node": "agent", "langgraph_triggers": ("branch:to:agent",)}),
        {"messages": [chunk], "n": (1, 2), "color": Color.RED, "mode": Mode.FAST},
        {"id": uuid.UUID(int=7), "nan": float("nan"), "note": Note(name="tea"), "none": None},
    ]
    other = [  # one value each: any of them sends the whole payload through to_wire()
        {"k": value}
        for value in (
            dt.date(2026, 1, 2),
            dt.time(3, 4),
            dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
            Color.BLUE,
            Point(1, 2),
            Box(3),
            Share(0.5),
            decimal.Decimal("1.50"),
            deque(["a"]),
            b"hi",
            {"a"},
            OrderedDict(a=1),
            {1: "int key", None: "null key"},
            Item(name="tea", when=dt.datetime(2026, 1, 2, tzinfo=dt.UTC)),
            Item(name="tea", tags={"x"}),
            "lone \ud800 half",
        )
    ]
    for payload in plain + other:
        ((kind, data),) = langgraph_api._parts(("values", payload))
        assert kind == "values"
        assert isinstance(data["data"], orjson.Fragment) == (payload in plain)
        (stored,) = decode_entry(encode_entry([(kind, data)]), 1, 1)
        (expected,) = decode_entry(encode_entry([(kind, {"data": to_wire(payload)})]), 1, 1)
        assert stored.data == expected.data, payload
    # stream_parts() itself still gives the payload as to_wire() makes it.
    ((_, data),) = stream_parts(("messages", plain[0]))
    assert data == {"data": to_wire(plain[0])}


def test_to_wire_writes_dates_times_and_enums_as_json_does() -> None:
    # Regression: a date, a time or an enum in a graph's state reached the SDKs as its
    # Python repr ("datetime.date(2026, 1, 2)", "<Color.RED: 1>"), where the API writes
    # what orjson makes of it.
    import datetime as dt
    import enum

    class Color(enum.Enum):
        RED = 1
        BLUE = (2, dt.date(2026, 1, 3))

    value = {
        "day": dt.date(2026, 1, 2),
        "at": dt.time(3, 4, 5),
        "when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "color": Color.RED,
    }
    assert to_wire(value) == {
        "day": "2026-01-02",
        "at": "03:04:05",
        "when": "2026-01-02T03:04:05+00:00",
        "color": 1,
    }
    assert orjson.loads(orjson.dumps(to_wire(value))) == orjson.loads(orjson.dumps(value))
    assert to_wire([Color.BLUE]) == [[2, "2026-01-03"]]


def test_to_wire_writes_the_values_the_api_encoder_knows_as_it_does() -> None:
    # Regression: a Decimal, a timedelta, bytes, a path, a regex, a deque and a pydantic.v1
    # model reached the SDKs as their repr; the Agent Server's encoder writes a number, the
    # seconds, base64, the text, the pattern, a list and the model's fields. A named tuple
    # was a list: the Agent Server's is a dict of its fields (its _asdict()).
    import datetime as dt
    import decimal
    import pathlib
    import re
    from collections import deque
    from typing import NamedTuple

    import pydantic.v1

    class Old(pydantic.v1.BaseModel):
        name: str

    class Point(NamedTuple):
        x: int
        y: int

    value = {
        "point": Point(1, 2),
        "price": decimal.Decimal("1.50"),
        "count": decimal.Decimal("3"),
        "took": dt.timedelta(seconds=2),
        "raw": b"hi",
        "path": pathlib.PurePosixPath("/a/b"),
        "pattern": re.compile("x+"),
        "recent": deque(["a"]),
        "old": Old(name="tea"),
    }
    assert to_wire(value) == {
        "price": 1.5,
        "count": 3,
        "took": 2.0,
        "raw": "aGk=",
        "path": "/a/b",
        "pattern": "x+",
        "recent": ["a"],
        "old": {"name": "tea"},
        "point": {"x": 1, "y": 2},
    }


def test_to_wire_writes_dict_keys_as_the_api_does_and_survives_a_repr_that_raises() -> None:
    # Regression: every key became its str() ("None", "Color.RED", a datetime with a space)
    # where the API's orjson writes "null", the enum's value, ISO 8601; and an object whose
    # repr raised (a half-built client in the state) raised out of to_wire, ending the run.
    import datetime as dt
    import enum
    import uuid

    import pydantic

    class Color(enum.Enum):
        RED = 1

    class Broken:
        def __repr__(self) -> str:
            raise ValueError("not built yet")

    keys = {
        None: 0,
        False: 1,
        Color.RED: 2,
        dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC): 3,
        uuid.UUID(int=5): 4,
        2.5: 5,
    }
    wire = to_wire(keys)
    assert wire == orjson.loads(orjson.dumps(keys, option=orjson.OPT_NON_STR_KEYS))
    assert to_wire({"client": Broken()}) == {
        "client": "<Broken object (its repr raised ValueError)>"
    }
    # A pydantic model's class has an unbound model_dump: called, it raised.
    assert to_wire({"schema": pydantic.BaseModel}) == {"schema": repr(pydantic.BaseModel)}


async def test_producer_events_hook_stores_parts_whole_and_closes_the_source() -> None:
    closed: list[bool] = []

    async def source() -> AsyncIterator[Any]:
        try:
            yield ("custom", {"a": 1})
            yield ("values", {"b": 2})
        finally:
            closed.append(True)

    transport = MemoryTransport()
    async with StreamProducer(transport) as producer:
        run = await producer.start(source(), events=stream_parts)
        assert await run.wait() == "completed"
    events = [(e.type, e.data) async for e in StreamConsumer(transport, run.stream_id)]
    assert events == [
        ("custom", {"data": {"a": 1}}),
        ("values", {"data": {"b": 2}}),
        ("end", {}),
    ]
    assert closed == [True]


async def test_a_real_graph_streamed_through_the_hook() -> None:
    from langgraph.checkpoint.memory import InMemorySaver

    released = asyncio.Event()
    released.set()
    graph = build_graph({"t": released}, InMemorySaver())
    source = graph.astream(
        {"messages": [{"role": "user", "content": "g"}]},
        {"configurable": {"thread_id": "t"}},
        stream_mode=["messages", "custom", "values"],
    )
    transport = MemoryTransport()
    async with StreamProducer(transport) as producer:
        run = await producer.start(source, events=stream_parts)
        await run.wait()
    events = [e async for e in StreamConsumer(transport, run.stream_id)]
    tuples = [e.data["data"] for e in events if e.type == "messages"]
    assert "".join(m["content"] for m, _ in tuples) == answer_text("g")
    assert {meta["langgraph_node"] for _, meta in tuples} == {"agent"}
    assert [e.data["data"] for e in events if e.type == "custom"] == [{"step": "prepare"}]
    assert events[-1].type == "end"


async def test_http_errors_are_json_with_codes() -> None:
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from resumable_stream.langgraph_api import LangGraphRouter

    api = LangGraphRouter(
        MemoryTransport(), {"agent": build_graph({}, InMemorySaver())}, authorize=allow_all
    )
    app = Starlette(routes=[Mount("/lg", api)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://t/lg"
    ) as http:
        thread_id = (await http.post("/threads", json={})).json()["thread_id"]
        runs = f"/threads/{thread_id}/runs"
        cases = [
            (
                await http.post(f"{runs}/stream", json={"assistant_id": "nope"}),
                404,
                "assistant_not_found",
            ),
            (
                await http.post(
                    f"{runs}/stream", json={"assistant_id": "agent", "stream_mode": "events"}
                ),
                422,
                "invalid_request",
            ),
            (
                await http.post(
                    f"{runs}/stream", content=b"{", headers={"content-type": "application/json"}
                ),
                422,
                "invalid_request",
            ),
            (await http.post(f"{runs}/stream", content=b"{}"), 415, "unsupported_media_type"),
            (
                await http.post(
                    f"{runs}/stream", json={"assistant_id": "agent", "command": {"x": 1}}
                ),
                422,
                "invalid_request",
            ),
            (await http.get(f"{runs}/not-a-uuid"), 404, "run_not_found"),
            (await http.get(f"{runs}/{uuid.uuid4()}/stream"), 404, "run_not_found"),
            (await http.post("/threads", json={"thread_id": "bad id!"}), 400, "invalid_stream_id"),
            # Regression: an empty id made a thread no URL could reach (200).
            (await http.post("/threads", json={"thread_id": ""}), 422, "invalid_request"),
            # Regressions: a checkpoint id that is not a string reached the checkpointer (500);
            # the router's own routing errors were plain text.
            (
                await http.post(
                    f"/threads/{thread_id}/history", json={"before": {"checkpoint_id": 5}}
                ),
                422,
                "invalid_request",
            ),
            # Regression: a history limit of true was taken as 1.
            (
                await http.post(f"/threads/{thread_id}/history", json={"limit": True}),
                422,
                "invalid_request",
            ),
            (await http.get("/nope"), 404, "not_found"),
            (await http.put(f"/threads/{thread_id}"), 405, "method_not_allowed"),
        ]
        for response, status, code in cases:
            assert (response.status_code, response.json()["code"]) == (status, code)
        state = (await http.get(f"/threads/{thread_id}/state")).json()
        assert state["values"] == {} and state["next"] == []
    await api.producer.aclose()


@contextlib.asynccontextmanager
async def lg_client(
    authorize: Any = allow_all,
) -> AsyncIterator[tuple[Any, Any, dict[str, asyncio.Event]]]:
    """An HTTP client of a LangGraphRouter mounted at /lg (memory transport), the router,
    and the holds of its graph (a thread's model answers once its hold is set)."""
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from resumable_stream.langgraph_api import LangGraphRouter

    holds: dict[str, asyncio.Event] = {}
    api = LangGraphRouter(
        MemoryTransport(), {"agent": build_graph(holds, InMemorySaver())}, authorize=authorize
    )
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(Starlette(routes=[Mount("/lg", api)])),
            base_url="http://t/lg",
        ) as http:
            yield http, api, holds
    finally:
        await api.producer.aclose()


@contextlib.asynccontextmanager
async def both_routers(authorize: Any) -> AsyncIterator[Any]:
    """An app with a LangGraphRouter at /lg and a ChatRouter at /ai (one memory transport)."""
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from resumable_stream.ai_sdk import ChatRouter
    from resumable_stream.langgraph_api import LangGraphRouter

    async def answer(request: Any) -> AsyncIterator[str]:
        yield "never"

    transport = MemoryTransport()
    api = LangGraphRouter(
        transport, {"agent": build_graph({}, InMemorySaver())}, authorize=authorize
    )
    chat = ChatRouter(transport, answer, authorize=authorize)
    try:
        yield Starlette(routes=[Mount("/lg", api), Mount("/ai", chat)])
    finally:
        await api.producer.aclose()
        await chat.producer.aclose()


@pytest.mark.parametrize(
    "extra",
    [
        {"config": {"recursion_limit": "x"}},
        {"config": {"recursion_limit": True}},
        {"config": "fast"},
        {"config": {"configurable": 5}},
        {"config": {"tags": "a"}},
        {"interrupt_before": 5},
        {"interrupt_after": ["agent", 1]},
        {"command": {"goto": 5}},
        {"command": {"update": 5}},
        {"command": {"update": [["messages"]]}},
        {"command": {"resume": None}},
        {"checkpoint": "c1"},
        {"checkpoint": {"checkpoint_id": 5}},
        {"checkpoint_id": 5},
        {"context": "fast"},
        {"context": ["a"]},
        {"metadata": "tag"},  # (recorded as {}: the run lost what was sent)
        {"metadata": [["k", "v"]]},
    ],
)
async def test_a_run_body_langgraph_would_fail_on_is_refused_before_the_run(
    extra: dict[str, Any],
) -> None:
    # Regression: these started a run (replacing the thread's last one) that then failed
    # inside LangGraph with a TypeError or an IndexError, where the docs promise a 422.
    async with lg_client() as (http, api, _):
        thread_id = (await http.post("/threads", json={})).json()["thread_id"]
        response = await http.post(
            f"/threads/{thread_id}/runs/stream",
            json={"assistant_id": "agent", "input": {"messages": []}, **extra},
        )
        assert (response.status_code, response.json()["code"]) == (422, "invalid_request")
        assert await api.transport.info(api.stream_id(thread_id)) is None  # no run started


@pytest.mark.parametrize("endpoint", ["runs/stream", "runs", "runs/wait"])
@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"webhook": "https://app.example/done"}, "webhook_not_served"),
        ({"after_seconds": 60}, "after_seconds_not_served"),
    ],
)
async def test_a_run_option_not_served_is_refused_before_the_run(
    endpoint: str, extra: dict[str, Any], code: str
) -> None:
    # Regression: a webhook was never called, and a run asked to start in a minute
    # started at once, both without a word to the client (the SDKs send them as given).
    async with lg_client() as (http, api, _):
        thread_id = (await http.post("/threads", json={})).json()["thread_id"]
        response = await http.post(
            f"/threads/{thread_id}/{endpoint}",
            json={"assistant_id": "agent", "input": {"messages": []}, **extra},
        )
        assert (response.status_code, response.json()["code"]) == (422, code)
        assert await api.transport.info(api.stream_id(thread_id)) is None  # no run started


@pytest.mark.parametrize(
    "extra",
    [
        {"config": {"tags": None, "metadata": None, "configurable": None, "run_name": "x"}},
        {"command": {"goto": {"node": "agent", "input": {"messages": [("user", "sent")]}}}},
        {"command": {"goto": [{"node": "agent", "input": {"messages": [("user", "sent")]}}]}},
    ],
)
async def test_run_bodies_the_sdk_sends_run(extra: dict[str, Any]) -> None:
    # Regressions from the checks above: nulls LangChain leaves out, and the SDK's Send.
    async with lg_client() as (http, _, holds):
        thread_id = (await http.post("/threads", json={})).json()["thread_id"]
        holds.setdefault(thread_id, asyncio.Event()).set()
        body = {"assistant_id": "agent", "input": {"messages": [("user", "hi")]}, **extra}
        response = await http.post(f"/threads/{thread_id}/runs/stream", json=body)
        assert response.status_code == 200
        assert "event: error" not in response.text
        messages = (await http.get(f"/threads/{thread_id}/state")).json()["values"]["messages"]
        assert messages[-1]["type"] == "ai"


async def test_a_body_with_a_lone_surrogate_escape_runs_with_u_fffd_in_its_place() -> None:
    # Regression: JSON.stringify writes "\ud83d" for a string holding half an emoji, which
    # orjson refuses: the run (and a thread created with such metadata) was a 400.
    async with lg_client() as (http, _, holds):
        json_type = {"content-type": "application/json"}
        created = await http.post(
            "/threads", content=b'{"metadata": {"title": "half \\ud83d"}}', headers=json_type
        )
        assert created.status_code == 200, created.text
        assert created.json()["metadata"]["title"] == "half \ufffd"
        thread_id = created.json()["thread_id"]
        holds.setdefault(thread_id, asyncio.Event()).set()
        body = (
            b'{"assistant_id": "agent", "input": {"messages": [{"role": "user", '
            b'"content": "cut \\ud83d, whole \\ud83d\\ude00, kept \\\\ud83d"}]}}'
        )
        response = await http.post(
            f"/threads/{thread_id}/runs/stream", content=body, headers=json_type
        )
        assert response.status_code == 200, response.text
        assert "event: error" not in response.text
        messages = (await http.get(f"/threads/{thread_id}/state")).json()["values"]["messages"]
        assert messages[0]["content"] == "cut \ufffd, whole \U0001f600, kept \\ud83d"
        refused = await http.post(
            f"/threads/{thread_id}/runs/stream", content=b'{"a": "\\ud83d" nope}', headers=json_type
        )
        assert (refused.status_code, refused.json()["code"]) == (422, "invalid_request")


async def test_a_command_update_given_as_pairs_reaches_the_graph() -> None:
    async with lg_client() as (http, _, holds):
        thread_id = (await http.post("/threads", json={})).json()["thread_id"]
        holds.setdefault(thread_id, asyncio.Event()).set()
        update = [["messages", [{"role": "user", "content": "from a command"}]]]
        response = await http.post(
            f"/threads/{thread_id}/runs/stream",
            json={"assistant_id": "agent", "command": {"update": update, "goto": "agent"}},
        )
        assert response.status_code == 200
        state = (await http.get(f"/threads/{thread_id}/state")).json()
        assert state["values"]["messages"][0]["content"] == "from a command"


@pytest.mark.parametrize("mode", ["messages", ["messages-tuple", "messages"]])
async def test_the_apis_messages_mode_is_refused(mode: Any) -> None:
    # Regression: the API's "messages" mode (messages/partial, messages/complete and
    # messages/metadata parts, which the SDKs' callers wait for) was served as
    # "messages-tuple" parts under its name, where the docs say it is not served.
    async with lg_client() as (http, api, holds):
        thread_id = (await http.post("/threads", json={})).json()["thread_id"]
        holds.setdefault(thread_id, asyncio.Event()).set()
        response = await http.post(
            f"/threads/{thread_id}/runs/stream",
            json={"assistant_id": "agent", "input": {"messages": []}, "stream_mode": mode},
        )
        assert (response.status_code, response.json()["code"]) == (422, "invalid_request")
        assert "messages-tuple" in response.json()["message"]
        assert await api.transport.info(api.stream_id(thread_id)) is None  # no run started


@pytest.mark.parametrize("given", ["checkpoint", "checkpoint_id"])
async def test_a_run_from_a_checkpoint_forks_the_thread_there(given: str) -> None:
    # Regression: `checkpoint` and `checkpoint_id` (useStream's branches, edits and
    # regenerations; the Python SDK's fork) were ignored: the run went on from the latest
    # checkpoint, adding to the thread where the client meant to replace.
    async with lg_client() as (http, _, holds):
        thread_id = (await http.post("/threads", json={})).json()["thread_id"]
        holds.setdefault(thread_id, asyncio.Event()).set()
        runs = f"/threads/{thread_id}/runs/stream"
        body = {"assistant_id": "agent", "input": {"messages": [("user", "one")]}}
        assert (await http.post(runs, json=body)).status_code == 200
        history = (await http.post(f"/threads/{thread_id}/history", json={})).json()
        start = history[-1]["checkpoint"]  # before the first message
        assert not history[-1]["values"].get("messages")
        fork = (
            {"checkpoint": start}
            if given == "checkpoint"
            else {"checkpoint_id": start["checkpoint_id"]}
        )
        body = {"assistant_id": "agent", "input": {"messages": [("user", "two")]}, **fork}
        assert (await http.post(runs, json=body)).status_code == 200
        state = (await http.get(f"/threads/{thread_id}/state")).json()
        assert [m["content"] for m in state["values"]["messages"]] == ["two", answer_text("two")]

        missing = {**body, "checkpoint_id": str(uuid.uuid4())}
        response = await http.post(runs, json=missing)
        assert (response.status_code, response.json()["code"]) == (404, "checkpoint_not_found")


async def _post_and_leave(app: Any, path: str) -> list[dict[str, Any]]:
    """POST part of a body, then disconnect; what the app sent back."""
    sent: list[dict[str, Any]] = []
    parts = [
        {"type": "http.request", "body": b'{"id"', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return parts.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("t", 80),
        "client": ("c", 1),
    }
    await app(scope, receive, send)
    return sent


async def test_a_client_leaving_before_its_body_arrives_ends_the_request_quietly() -> None:
    # Regression: Starlette's ClientDisconnect escaped both protocol routers, and the server
    # logged an error with a traceback for every such request.
    async with both_routers(allow_all) as app:
        for path in ("/lg/threads", "/lg/threads/t1/runs/stream", "/ai/api/chat"):
            sent = await _post_and_leave(app, path)  # raised ClientDisconnect
            assert sent[0]["status"] == 400, path
            assert orjson.loads(sent[1]["body"])["code"] == "client_disconnected"


def test_a_body_over_max_body_bytes_is_413_and_starts_nothing() -> None:
    # Regression: both protocol routers read any request body whole into memory, however
    # large (a declared or a chunked one), then parsed it.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from resumable_stream.ai_sdk import ChatRouter
    from resumable_stream.langgraph_api import LangGraphRouter
    from tests._services import uvicorn_server

    async def answer(request: Any) -> AsyncIterator[str]:
        yield "small enough"

    transport = MemoryTransport()
    graph = build_graph({}, InMemorySaver())
    api = LangGraphRouter(transport, {"agent": graph}, authorize=allow_all, max_body_bytes=1000)
    chat = ChatRouter(transport, answer, authorize=allow_all, max_body_bytes=1000)
    app = Starlette(routes=[Mount("/lg", api), Mount("/ai", chat)])
    text = {"role": "user", "parts": [{"type": "text", "text": "x" * 1500}]}
    big = orjson.dumps({"id": "c1", "messages": [text], "assistant_id": "agent"})
    json_type = {"content-type": "application/json"}
    with uvicorn_server(app) as url, httpx.Client(base_url=url) as client:
        for path in ("/lg/threads", "/lg/threads/t1/runs/stream", "/ai/api/chat"):
            declared = client.post(path, content=big, headers=json_type)
            chunked = client.post(path, content=iter([big[:600], big[600:]]), headers=json_type)
            for response in (declared, chunked):
                assert response.status_code == 413, (path, response.text)
                assert response.json()["code"] == "body_too_large"
                assert "1000 bytes" in response.json()["message"]
        assert client.get("/ai/api/chat/c1/stream").status_code == 204  # no answer started
        small = client.post("/ai/api/chat", json={"id": "c1", "messages": []})
        assert small.status_code == 200
        assert "small enough" in small.text
        thread = client.post("/lg/threads", content=iter([b"{}"]), headers=json_type)
        assert thread.status_code == 200, thread.text


def test_a_body_not_sent_as_json_is_415_and_starts_nothing() -> None:
    # Regression (CSRF): both protocol routers parsed a body as JSON whatever its
    # Content-Type. A page of another origin can POST one without a CORS preflight, with
    # the user's cookies: a text/plain string, a form, or a Blob (sent with no type).
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Mount

    from resumable_stream.ai_sdk import ChatRequest, ChatRouter
    from resumable_stream.langgraph_api import LangGraphRouter, ThreadInfo
    from tests._services import uvicorn_server

    threads: dict[str, ThreadInfo] = {}
    asked: list[str] = []

    async def create_thread(request: Request, thread_id: str | None, metadata: Any) -> str:
        thread_id = thread_id or str(uuid.uuid4())
        threads[thread_id] = ThreadInfo(datetime.now(UTC), datetime.now(UTC))
        return thread_id

    async def thread_info(request: Request, thread_id: str) -> ThreadInfo | None:
        return threads.get(thread_id)

    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        asked.append(chat.chat_id)
        yield "answered"

    transport = MemoryTransport()
    api = LangGraphRouter(
        transport,
        {"agent": build_graph({}, InMemorySaver())},
        authorize=allow_all,
        create_thread=create_thread,
        thread_info=thread_info,
    )
    chat = ChatRouter(transport, answer, authorize=allow_all)
    app = Starlette(routes=[Mount("/lg", api), Mount("/ai", chat)])
    run = {"assistant_id": "agent", "input": {"messages": []}, "if_not_exists": "create"}
    bodies = {
        "/lg/threads": orjson.dumps({"thread_id": "t1"}),
        "/lg/threads/t1/runs": orjson.dumps(run),
        "/lg/threads/t1/runs/stream": orjson.dumps(run),
        "/lg/threads/t0/copy": b"{}",
        "/ai/api/chat": orjson.dumps({"id": "c1", "messages": [], "trigger": "submit-message"}),
    }
    refused_types = [
        "text/plain;charset=UTF-8",  # fetch(url, {body: "..."})
        "application/x-www-form-urlencoded",  # a form; curl --data without -H
        "multipart/form-data; boundary=x",
        "application/jsonp",
        None,  # fetch(url, {body: new Blob([...])}): no Content-Type at all
    ]
    threads["t0"] = ThreadInfo(datetime.now(UTC), datetime.now(UTC))  # to copy
    with uvicorn_server(app) as url, httpx.Client(base_url=url) as client:
        for path, body in bodies.items():
            for content_type in refused_types:
                headers = {} if content_type is None else {"content-type": content_type}
                response = client.post(path, content=body, headers=headers)
                assert response.status_code == 415, (path, content_type, response.text)
                assert response.headers["content-type"] == "application/json"
                error = response.json()
                assert error["code"] == "unsupported_media_type"
                assert "Content-Type: application/json" in error["message"]
        assert list(threads) == ["t0"]  # no thread created (nor copied)
        assert asked == []  # no answer started
        assert client.get("/lg/threads/t1/runs").json() == []  # no run started
        assert client.get("/ai/api/chat/c1/stream").status_code == 204
        # A JSON type, with parameters, in any case, is read; so is an empty body of any type.
        sent = client.post(
            "/ai/api/chat",
            content=bodies["/ai/api/chat"],
            headers={"content-type": "Application/JSON; charset=utf-8"},
        )
        assert (sent.status_code, asked) == (200, ["c1"])
        assert "answered" in sent.text
        thread = client.post(
            "/lg/threads",
            content=bodies["/lg/threads"],
            headers={"content-type": "application/vnd.example+json"},
        )
        assert thread.status_code == 200, thread.text
        assert list(threads) == ["t0", "t1"]
        empty = client.post("/lg/threads", headers={"content-type": "text/plain"})
        assert empty.status_code == 200, empty.text
        assert len(threads) == 3


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_max_body_bytes_must_be_a_positive_int(limit: Any) -> None:
    from resumable_stream import ConfigurationError
    from resumable_stream.ai_sdk import ChatRouter
    from resumable_stream.langgraph_api import LangGraphRouter

    with pytest.raises(ConfigurationError, match="max_body_bytes"):
        ChatRouter(MemoryTransport(), lambda chat: None, authorize=allow_all, max_body_bytes=limit)
    with pytest.raises(ConfigurationError, match="max_body_bytes"):
        LangGraphRouter(MemoryTransport(), {"g": None}, authorize=allow_all, max_body_bytes=limit)


async def test_a_run_id_is_found_only_in_the_thread_that_ran_it() -> None:
    # Regression: only the epoch in a run id's high bits was checked, so another thread's
    # run id, or any UUID with a small enough high half (the nil UUID), was "success".
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from resumable_stream.langgraph_api import LangGraphRouter, run_id_for

    released = {thread: asyncio.Event() for thread in ("a", "b")}
    for hold in released.values():
        hold.set()  # the model answers at once
    api = LangGraphRouter(
        MemoryTransport(), {"agent": build_graph(released, InMemorySaver())}, authorize=allow_all
    )
    app = Starlette(routes=[Mount("/lg", api)])
    body = {"assistant_id": "agent", "input": {"messages": [("user", "x")]}}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://t/lg"
    ) as http:
        ran = {}
        for thread in ("a", "b"):
            response = await http.post(f"/threads/{thread}/runs/stream", json=body)
            ran[thread] = response.headers["content-location"].rsplit("/", 1)[1]
        assert (await http.get(f"/threads/a/runs/{ran['a']}")).json()["status"] == "success"
        nil = str(uuid.UUID(int=0))
        # An epoch 0 with its bits is no run either (it was a 500 from the join).
        zero = run_id_for("langgraph:b", 0)
        for run_id in (ran["a"], nil, zero):  # thread b's run is later than a's
            for response in (
                await http.get(f"/threads/b/runs/{run_id}"),
                await http.get(f"/threads/b/runs/{run_id}/stream"),
                await http.post(f"/threads/b/runs/{run_id}/cancel"),
            ):
                assert (response.status_code, response.json()["code"]) == (404, "run_not_found")
    await api.producer.aclose()


async def test_an_idle_run_sends_comment_heartbeats() -> None:
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from resumable_stream.langgraph_api import LangGraphRouter
    from tests._helpers import eventually
    from tests._services import uvicorn_server

    hold = asyncio.Event()  # never set: the model holds halfway until the run is cancelled
    transport = MemoryTransport()
    api = LangGraphRouter(
        transport,
        {"agent": build_graph({"t1": hold}, InMemorySaver())},
        authorize=allow_all,
        ping_interval=0.1,
    )
    app = Starlette(routes=[Mount("/lg", api)])
    with uvicorn_server(app) as url:
        async with httpx.AsyncClient(base_url=f"{url}/lg") as http:
            body = {"assistant_id": "agent", "input": {"messages": [("user", "x")]}}
            request = http.stream("POST", "/threads/t1/runs/stream", json=body)
            async with request as response:
                run_url = response.headers["content-location"]
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith(":"):
                        break  # a comment: the SDKs' idle watchdog counts it as a heartbeat
            cancelled = await http.post(f"{run_url}/cancel", params={"wait": 1})
            assert cancelled.status_code == 202
            assert (await http.get(run_url)).json()["status"] == "interrupted"

        # The run lives on the server's event loop (another thread): wait for it to end
        # there rather than close the producer from this loop.
        async def ended() -> bool:
            return not api.producer.runs

        await eventually(ended)


async def test_an_interrupt_then_a_resume_command() -> None:
    import httpx
    from langchain_core.messages import AIMessage
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.types import interrupt
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from resumable_stream.langgraph_api import LangGraphRouter

    def ask(state: MessagesState) -> dict[str, Any]:
        name = interrupt("your name?")
        return {"messages": [AIMessage(f"hi {name}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    api = LangGraphRouter(
        MemoryTransport(), {"agent": builder.compile(InMemorySaver())}, authorize=allow_all
    )
    app = Starlette(routes=[Mount("/lg", api)])

    def parts(text: str) -> list[tuple[str, Any]]:
        blocks = [b for b in text.split("\n\n") if b.startswith("id: ")]
        return [
            (lines[1].removeprefix("event: "), orjson.loads(lines[2].removeprefix("data: ")))
            for lines in (b.split("\n") for b in blocks)
        ]

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://t/lg"
    ) as http:
        first = await http.post(
            "/threads/t/runs/stream",
            json={
                "assistant_id": "agent",
                "input": {"messages": [{"role": "user", "content": "hey"}]},
            },
        )
        seen = parts(first.text)
        assert seen[-2][1]["__interrupt__"][0]["value"] == "your name?"
        assert seen[-1] == ("end", {"status": "success"})
        run = first.headers["content-location"]
        assert (await http.get(run)).json()["status"] == "interrupted"
        assert (await http.get("/threads/t")).json()["status"] == "interrupted"
        second = await http.post(
            "/threads/t/runs/stream",
            json={"assistant_id": "agent", "command": {"resume": "Bob"}},
        )
        values = [data for event, data in parts(second.text) if event == "values"]
        assert values[-1]["messages"][-1]["content"] == "hi Bob"
        assert (await http.get(second.headers["content-location"])).json()["status"] == "success"
        # Replaced by a later run: read from the last checkpoint it wrote, at its interrupt.
        assert (await http.get(run)).json()["status"] == "interrupted"
    await api.producer.aclose()


@pytest.mark.parametrize("honoured", [True, False])
async def test_on_disconnect_cancel(honoured: bool) -> None:
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from resumable_stream.langgraph_api import LangGraphRouter
    from tests._helpers import eventually
    from tests._services import uvicorn_server

    hold = asyncio.Event()
    graph = build_graph({"t1": hold}, InMemorySaver())
    api = LangGraphRouter(
        MemoryTransport(), {"agent": graph}, authorize=allow_all, cancel_on_disconnect=honoured
    )
    app = Starlette(routes=[Mount("/lg", api)])
    with uvicorn_server(app) as url:
        async with httpx.AsyncClient(base_url=f"{url}/lg") as http:
            body = {
                "assistant_id": "agent",
                "input": {"messages": [("user", "x")]},
                "stream_mode": ["messages-tuple"],
                "on_disconnect": "cancel",
            }
            async with http.stream("POST", "/threads/t1/runs/stream", json=body) as response:
                run_url = response.headers["content-location"]
                async for line in response.aiter_lines():
                    if "x19 " in line:
                        break  # held halfway: walk away
            status = (await http.get(run_url)).json()["status"]
            if honoured:

                async def stopped() -> bool:
                    return bool((await http.get(run_url)).json()["status"] == "interrupted")

                await eventually(stopped)
            else:
                # (Weaker: nothing tells when the server noticed the disconnect; a run that
                # was wrongly cancelled by then ends "interrupted" and fails this.)
                assert status == "running"
                hold.set()

                async def done() -> bool:
                    return bool((await http.get(run_url)).json()["status"] == "success")

                await eventually(done)
    await api.producer.aclose()


async def test_leaving_a_join_cancels_only_for_a_caller_allowed_to_cancel() -> None:
    # Regression: a join with ?cancel_on_disconnect=1 was authorized to "read" only, and
    # leaving it cancelled the run anyway: a reader not allowed to cancel (403 at POST
    # .../cancel) stopped someone else's run by closing its connection (as StreamRouter
    # did before issue 9).
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from resumable_stream.langgraph_api import LangGraphRouter
    from tests._helpers import eventually
    from tests._services import uvicorn_server

    asked: list[str] = []

    def authorize(request: Any, thread_id: str | None, action: str) -> bool:
        asked.append(action)
        return action != "cancel" or request.headers.get("x-user") == "owner"

    graph = build_graph({"t1": asyncio.Event()}, InMemorySaver())  # held halfway
    api = LangGraphRouter(MemoryTransport(), {"agent": graph}, authorize=authorize)
    app = Starlette(routes=[Mount("/lg", api)])
    with uvicorn_server(app) as url:
        async with httpx.AsyncClient(base_url=f"{url}/lg") as http:
            body = {
                "assistant_id": "agent",
                "input": {"messages": [("user", "x")]},
                "stream_mode": ["messages-tuple"],
            }
            async with http.stream("POST", "/threads/t1/runs/stream", json=body) as response:
                run_url = response.headers["content-location"]
                async for line in response.aiter_lines():
                    if "x19 " in line:
                        break
            assert (await http.post(f"{run_url}/cancel")).status_code == 403

            async def status() -> str:
                return str((await http.get(run_url)).json()["status"])

            async def join_and_leave(headers: dict[str, str]) -> None:
                join = http.stream(
                    "GET",
                    f"{run_url}/stream",
                    params={"cancel_on_disconnect": "1"},
                    headers={"last-event-id": "-1", **headers},
                )
                async with join as joined:
                    async for line in joined.aiter_lines():
                        if "x19 " in line:
                            break  # held halfway: walk away

            await join_and_leave({})

            async def noticed() -> bool:  # asked to cancel (refused), or wrongly cancelled
                return asked.count("cancel") == 2 or await status() != "running"

            await eventually(noticed)
            assert await status() == "running"

            await join_and_leave({"x-user": "owner"})

            async def cancelled() -> bool:
                return await status() == "interrupted"

            await eventually(cancelled)

        async def ended() -> bool:
            return not api.producer.runs

        await eventually(ended)


async def test_threads_have_the_times_of_their_checkpoints() -> None:
    # Issue 10: GET /threads/{id} answered the time of the request as created_at.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from resumable_stream.langgraph_api import LangGraphRouter

    released = asyncio.Event()
    released.set()
    graph = build_graph({"t": released}, InMemorySaver())
    api = LangGraphRouter(MemoryTransport(), {"agent": graph}, authorize=allow_all)
    app = Starlette(routes=[Mount("/lg", api)])
    config = {"configurable": {"thread_id": "t"}}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://t/lg"
    ) as http:
        created = (
            await http.post("/threads", json={"thread_id": "t", "metadata": {"a": 1}})
        ).json()
        for text in ("one", "two"):
            body = {"assistant_id": "agent", "input": {"messages": [("user", text)]}}
            assert (await http.post("/threads/t/runs/stream", json=body)).status_code == 200
        thread = (await http.get("/threads/t")).json()
    checkpoints = [state.created_at async for state in graph.aget_state_history(config)]
    assert len(checkpoints) > 2
    assert created["metadata"] == {"a": 1}  # echoed: the router keeps no metadata itself
    assert created["created_at"] <= checkpoints[-1]
    assert (thread["created_at"], thread["updated_at"]) == (checkpoints[-1], checkpoints[0])
    assert thread["metadata"] == {}
    await api.producer.aclose()


async def test_a_threads_times_read_two_of_its_checkpoints() -> None:
    # Regression: without thread_info, GET /threads/{id} read every checkpoint of the
    # thread (every namespace's) to find its first and latest: a cost that grew with its
    # history. It reads the latest, and the first (LangGraph's step -1) with a filter.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from resumable_stream.langgraph_api import LangGraphRouter

    class CountingSaver(InMemorySaver):
        read = 0

        async def alist(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            async for item in super().alist(*args, **kwargs):
                self.read += 1
                yield item

    released = asyncio.Event()
    released.set()
    saver = CountingSaver()
    graph = build_graph({"t": released, "u": released}, saver)
    config = {"configurable": {"thread_id": "t"}}
    for n in range(50):
        await graph.ainvoke({"messages": [("user", f"question {n}")]}, config)
    checkpoints = [state.created_at async for state in graph.aget_state_history(config)]
    assert len(checkpoints) >= 200
    api = LangGraphRouter(MemoryTransport(), {"agent": graph}, authorize=allow_all)
    app = Starlette(routes=[Mount("/lg", api)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://t/lg"
    ) as http:
        saver.read = 0
        thread = (await http.get("/threads/t")).json()
        assert saver.read <= 2, saver.read
        assert (thread["created_at"], thread["updated_at"]) == (checkpoints[-1], checkpoints[0])
        # A thread whose first checkpoint is a state update's (step 0, not -1).
        other = {"configurable": {"thread_id": "u"}}
        await graph.aupdate_state(other, {"messages": [("user", "set")]}, as_node="agent")
        for n in range(50):
            await graph.ainvoke({"messages": [("user", f"question {n}")]}, other)
        updated = [state.created_at async for state in graph.aget_state_history(other)]
        saver.read = 0
        thread = (await http.get("/threads/u")).json()
        assert saver.read <= 2, saver.read
        assert (thread["created_at"], thread["updated_at"]) == (updated[-1], updated[0])
    await api.producer.aclose()


async def test_thread_info_gives_the_apps_thread_record() -> None:
    from datetime import UTC, datetime

    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Mount

    from resumable_stream.langgraph_api import LangGraphRouter, ThreadInfo

    records = {
        "kept": ThreadInfo(
            datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            datetime(2026, 1, 3),  # naive: UTC
            {"title": "Kept", "tags": ("a", "b")},
        )
    }

    async def thread_info(request: Request, thread_id: str) -> ThreadInfo | None:
        return records.get(thread_id)

    async def create_thread(request: Request, thread_id: str | None, metadata: Any) -> str:
        return "kept"

    api = LangGraphRouter(
        MemoryTransport(),
        {"agent": build_graph({}, InMemorySaver())},
        authorize=allow_all,
        create_thread=create_thread,
        thread_info=thread_info,
    )
    app = Starlette(routes=[Mount("/lg", api)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://t/lg"
    ) as http:
        created = (await http.post("/threads", json={})).json()
        thread = await http.get("/threads/kept")
        missing = await http.get("/threads/gone")
    expected = {
        "thread_id": "kept",
        "created_at": "2026-01-02T03:04:05+00:00",
        "updated_at": "2026-01-03T00:00:00+00:00",
        "metadata": {"title": "Kept", "tags": ["a", "b"]},
        "status": "idle",
    }
    assert created == {**created, **expected}
    assert thread.json() == {**thread.json(), **expected}
    assert (missing.status_code, missing.json()["code"]) == (404, "thread_not_found")
    await api.producer.aclose()


@pytest.mark.parametrize("with_thread_info", [True, False])
async def test_creating_a_thread_of_another_users_id_tells_nothing_of_it(
    with_thread_info: bool,
) -> None:
    # Regression: POST /threads with a thread_id of the client's asked authorize for
    # "create" only, and answered that thread's record: another user's thread's metadata
    # (thread_info's, as docs/langgraph-sdk.md writes it) or its checkpoints' times.
    from datetime import UTC, datetime

    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.requests import Request

    from resumable_stream.langgraph_api import LangGraphRouter, ThreadInfo

    owners = {"alices": "alice"}

    def authorize(request: Request, thread_id: str | None, action: str) -> bool:
        user = request.headers["user"]
        return thread_id is None or owners.get(thread_id) == user

    async def thread_info(request: Request, thread_id: str) -> ThreadInfo | None:
        if thread_id not in owners:
            return None
        stamp = datetime(2026, 1, 2, tzinfo=UTC)
        return ThreadInfo(stamp, stamp, {"title": "Alice's secret plans"})

    released = asyncio.Event()
    released.set()
    api = LangGraphRouter(
        MemoryTransport(),
        {"agent": build_graph({"alices": released}, InMemorySaver())},
        authorize=authorize,
        thread_info=thread_info if with_thread_info else None,
    )
    alice, bob = {"user": "alice"}, {"user": "bob"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"messages": [("user", "hi")]}}
        assert (await http.post("/threads/alices/runs/wait", json=body, headers=alice)).is_success
        own = await http.post("/threads", json={"thread_id": "alices"}, headers=alice)
        taken = await http.post("/threads", json={"thread_id": "alices"}, headers=bob)
        unknown = await http.post("/threads", json={"thread_id": "nobodys"}, headers=bob)
    assert own.status_code == 200
    assert (taken.status_code, taken.json()["code"]) == (403, "forbidden")
    # The same answer as for a thread that does not exist: nothing tells them apart.
    assert (unknown.status_code, unknown.json()) == (taken.status_code, taken.json())
    await api.producer.aclose()


async def later_run() -> AsyncIterator[Any]:
    """The source of a run that replaces another on its thread's stream."""
    yield ("custom", {"later": True})


def answering_router(thread_id: str) -> tuple[MemoryTransport, Any]:
    """A LangGraphRouter whose agent answers on thread ``thread_id`` at once."""
    from langgraph.checkpoint.memory import InMemorySaver

    from resumable_stream.langgraph_api import LangGraphRouter

    released = asyncio.Event()
    released.set()
    transport = MemoryTransport()
    graphs = {"agent": build_graph({thread_id: released}, InMemorySaver())}
    return transport, LangGraphRouter(transport, graphs, authorize=allow_all)


async def test_a_run_streamed_is_never_a_later_run_of_its_thread() -> None:
    # Regression: the response read the thread's stream from whatever run it held at its
    # first read, so a run that ended and was replaced in between served the later run.
    from tests._helpers import Later, ended, eventually

    transport, api = answering_router("t9")
    body = {"assistant_id": "agent", "input": {"messages": [("user", "x")]}}
    later = Later("/threads/t9/runs/stream", orjson.dumps(body), {"thread_id": "t9"})
    response = await api.stream_run(later.request())
    await eventually(lambda: ended(transport, "langgraph:t9"))
    await (await api.producer.start(later_run(), stream_id="langgraph:t9")).wait()
    status, sent = await later.serve(response)
    assert b"later" not in sent
    assert (status, orjson.loads(sent)["code"]) == (404, "stream_expired")
    await api.producer.aclose()


@pytest.mark.parametrize("last_event_id", [None, "-1", "first"])
async def test_a_run_joined_then_replaced_is_over_not_an_error(last_event_id: str | None) -> None:
    # A join answered while its run was current, and first read once a later run of the
    # thread replaced it: an empty stream (the run is over), as when the join comes after
    # the replacement; not a 404/410, and never the later run's parts.
    import httpx
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from tests._helpers import Later, ended, eventually

    transport, api = answering_router("t8")
    app = Starlette(routes=[Mount("/lg", api)])
    body = {"assistant_id": "agent", "input": {"messages": [("user", "x")]}}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://t/lg"
    ) as http:
        streamed = await http.post("/threads/t8/runs/stream", json=body)
    run_id = streamed.headers["content-location"].rsplit("/", 1)[1]
    first = streamed.text.split("\n", 1)[0].removeprefix("id: ")
    await eventually(lambda: ended(transport, "langgraph:t8"))
    headers = {} if last_event_id is None else {"last-event-id": last_event_id}
    if last_event_id == "first":
        headers["last-event-id"] = first
    later = Later(
        f"/threads/t8/runs/{run_id}/stream",
        path_params={"thread_id": "t8", "run_id": run_id},
        method="GET",
        headers=headers,
    )
    response = await api.join_run(later.request())
    await (await api.producer.start(later_run(), stream_id="langgraph:t8")).wait()
    assert await later.serve(response) == (200, b"")
    await api.producer.aclose()


async def test_an_http_error_from_authorize_has_the_code_the_stream_router_gives() -> None:
    # Regression: the protocol routers answered authorize's HTTPException(401) with code
    # "http_error", where StreamRouter says "unauthorized".
    import httpx
    from starlette.exceptions import HTTPException

    def authorize(*_: Any) -> bool:
        raise HTTPException(401, "log in first", headers={"www-authenticate": "Bearer"})

    async with (
        both_routers(authorize) as app,
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http,
    ):
        for response in (
            await http.get("/lg/threads/t1"),
            await http.post("/ai/api/chat", json={"id": "c1", "messages": []}),
            await http.get("/ai/api/chat/c1/stream"),
        ):
            assert (response.status_code, response.json()["code"]) == (401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"


class _Counted(TypedDict):
    n: Annotated[list[Any], operator.add]


class _ProviderError(Exception):
    """An exception type outside the API's list of those whose message it sends."""


def gated_router(**kw: Any) -> tuple[Any, Any, asyncio.Event, asyncio.Event]:
    """A router over a graph appending to `n`: an input ending with "wait" holds the run
    (`reached` set) until `hold` is set; one ending with "ask" interrupts, one ending with
    "fail" raises; else "done"."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, StateGraph
    from langgraph.types import interrupt

    from resumable_stream.langgraph_api import LangGraphRouter

    reached, hold = asyncio.Event(), asyncio.Event()

    async def step(state: _Counted) -> dict[str, Any]:
        last = state["n"][-1]
        if last == "wait":
            reached.set()
            await hold.wait()
        if last == "ask":
            return {"n": [interrupt("q")]}
        if last == "fail":
            raise ValueError("failed on purpose")
        if last == "leak":  # (a type whose message the API does not send)
            raise _ProviderError("key sk-123 refused by 10.0.0.5")
        return {"n": ["done"]}

    builder = StateGraph(_Counted)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    saver = kw.pop("saver", None) or InMemorySaver()
    graph = builder.compile(checkpointer=saver)
    api = LangGraphRouter(MemoryTransport(), {"agent": graph}, authorize=allow_all, **kw)
    return api, graph, reached, hold


async def _held_run(http: Any, reached: asyncio.Event) -> asyncio.Task[Any]:
    """A run of thread t1 started through ``http``, once the gated graph holds it."""
    body = {"assistant_id": "agent", "input": {"n": ["wait"]}}
    first = asyncio.create_task(http.post("/threads/t1/runs/stream", json=body))
    await reached.wait()
    return first


async def _values(graph: Any, thread_id: str) -> Any:
    return (await graph.aget_state({"configurable": {"thread_id": thread_id}})).values.get("n")


@pytest.mark.parametrize(
    ("strategy", "default"), [(None, "reject"), ("reject", "enqueue"), ("bogus", "enqueue")]
)
async def test_a_run_while_one_is_in_progress_is_refused_with_reject(
    strategy: str | None, default: str
) -> None:
    import httpx

    api, graph, reached, hold = gated_router(multitask_strategy=default)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        body: dict[str, Any] = {"assistant_id": "agent", "input": {"n": ["go"]}}
        if strategy is not None:
            body["multitask_strategy"] = strategy
        response = await http.post("/threads/t1/runs/stream", json=body)
        if strategy == "bogus":
            assert (response.status_code, response.json()["code"]) == (422, "invalid_request")
        else:
            assert (response.status_code, response.json()["code"]) == (409, "thread_busy")
            assert "'enqueue'" in response.json()["message"]  # says what would wait
        hold.set()
        assert '"status":"success"' in (await first).text
    assert await _values(graph, "t1") == ["wait", "done"]
    await api.producer.aclose()


async def test_a_run_that_names_no_strategy_is_queued_as_the_api_does() -> None:
    # The API's default strategy is "enqueue": a second message while a run streams waits
    # for its turn (it was 409).
    import httpx

    api, graph, reached, hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        body = {"assistant_id": "agent", "input": {"n": ["go"]}}
        second = asyncio.create_task(http.post("/threads/t1/runs/stream", json=body))
        await eventually(holds(lambda: any("~queued~" in s for s in api.producer.runs)))
        hold.set()
        assert (await first).text.rstrip().endswith('data: {"status":"success"}')
        assert (await second).text.rstrip().endswith('data: {"status":"success"}')
    assert await _values(graph, "t1") == ["wait", "done", "go", "done"]
    await api.producer.aclose()


@pytest.mark.parametrize("strategy", ["bogus", None, "rollback"])
def test_the_default_strategy_is_checked(strategy: Any) -> None:
    from langgraph.graph import START, StateGraph

    from resumable_stream import ConfigurationError
    from resumable_stream.langgraph_api import LangGraphRouter

    builder = StateGraph(_Counted)
    builder.add_node("step", lambda state: {"n": ["done"]})
    builder.add_edge(START, "step")
    graph = builder.compile()  # no checkpointer: no rollback
    with pytest.raises(ConfigurationError, match="multitask_strategy"):
        LangGraphRouter(
            MemoryTransport(), {"agent": graph}, authorize=allow_all, multitask_strategy=strategy
        )


async def test_interrupt_strategy_cancels_the_runs_queued_here_too() -> None:
    # An interrupt replaces what is pending, as the API's does: a run queued in this
    # process raced the interrupt's run for the thread, and often won it (then 409).
    import httpx

    api, graph, reached, _hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        body = {"assistant_id": "agent", "input": {"n": ["q"]}, "multitask_strategy": "enqueue"}
        queued = (await http.post("/threads/t1/runs", json=body)).json()["run_id"]
        body = {"assistant_id": "agent", "input": {"n": ["go"]}, "multitask_strategy": "interrupt"}
        second = await http.post("/threads/t1/runs/stream", json=body)
        assert second.status_code == 200
        assert second.text.rstrip().endswith('data: {"status":"success"}')
        assert (await first).text.rstrip().endswith('data: {"status":"interrupted"}')
        assert (await http.get(f"/threads/t1/runs/{queued}")).json()["status"] == "interrupted"
    assert await _values(graph, "t1") == ["wait", "go", "done"]
    await api.producer.aclose()


async def test_interrupt_strategy_cancels_the_run_in_progress_then_runs() -> None:
    # Regression: multitask_strategy "interrupt" (useStream's, for a headless tool's
    # resume and for a submit while loading) was answered 409 thread_busy.
    import httpx

    api, graph, reached, _hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        body = {"assistant_id": "agent", "input": {"n": ["go"]}, "multitask_strategy": "interrupt"}
        second = await http.post("/threads/t1/runs/stream", json=body)
        assert second.status_code == 200
        assert second.text.rstrip().endswith('data: {"status":"success"}')
        assert (await first).text.rstrip().endswith('data: {"status":"interrupted"}')
        run = second.headers["content-location"]
        assert (await http.get(run)).json()["status"] == "success"
    assert await _values(graph, "t1") == ["wait", "go", "done"]  # its partial state kept
    await api.producer.aclose()


@pytest.mark.parametrize("earlier", [False, True])
async def test_rollback_strategy_starts_from_where_the_cancelled_run_started(
    earlier: bool,
) -> None:
    import httpx

    api, graph, reached, _hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        if earlier:
            done = await http.post(
                "/threads/t1/runs/stream", json={"assistant_id": "agent", "input": {"n": ["a"]}}
            )
            assert done.status_code == 200
        first = await _held_run(http, reached)
        body = {"assistant_id": "agent", "input": {"n": ["go"]}, "multitask_strategy": "rollback"}
        second = await http.post("/threads/t1/runs/stream", json=body)
        assert second.text.rstrip().endswith('data: {"status":"success"}')
        assert (await first).text.rstrip().endswith('data: {"status":"interrupted"}')
    expected = ["a", "done"] if earlier else []
    assert await _values(graph, "t1") == [*expected, "go", "done"]
    await api.producer.aclose()


async def test_interrupt_strategy_while_the_graph_still_writes_its_interrupt() -> None:
    # The race useStream runs into: a headless tool's resume is sent with "interrupt" as
    # soon as the interrupt shows in `values`, while the graph still writes it (here held
    # in the checkpointer) and the run has not ended. It was 409; now the run is cancelled
    # and the resume runs.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver

    writing = asyncio.Event()
    never = asyncio.Event()

    class Held(InMemorySaver):
        async def aput_writes(self, config: Any, writes: Any, *args: Any, **kw: Any) -> None:
            if any(channel == "__interrupt__" for channel, _ in writes):
                writing.set()
                await never.wait()  # until cancelled
            await super().aput_writes(config, writes, *args, **kw)

    api, graph, _reached, _hold = gated_router(saver=Held())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body: dict[str, Any] = {"assistant_id": "agent", "input": {"n": ["ask"]}}
        first = asyncio.create_task(http.post("/threads/t1/runs/stream", json=body))
        await writing.wait()  # the interrupt was streamed; the run goes on
        resume = {
            "assistant_id": "agent",
            "command": {"resume": "answer"},
            "multitask_strategy": "interrupt",
        }
        second = await http.post("/threads/t1/runs/stream", json=resume)
        assert second.status_code == 200
        assert second.text.rstrip().endswith('data: {"status":"success"}')
        # The first run was cancelled while it wrote its interrupt (which langgraph 1.1.5
        # streams only once written, later releases as soon as it is raised).
        assert (await first).text.rstrip().endswith('data: {"status":"interrupted"}')
    assert await _values(graph, "t1") == ["ask", "answer"]
    never.set()  # a write langgraph did not cancel with its run (1.1.5) ends, not left pending
    await api.producer.aclose()


async def test_interrupt_strategy_gives_up_on_a_run_that_does_not_end() -> None:
    # A run that does not end within interrupt_timeout of its cancellation: 409, no hang.
    import httpx

    api, _graph, _reached, _hold = gated_router(interrupt_timeout=0.2)
    stuck, release = asyncio.Event(), asyncio.Event()

    async def stubborn() -> AsyncIterator[Any]:
        yield ("custom", {"x": 1})
        stuck.set()
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    run = await api.producer.start(stubborn(), stream_id="langgraph:t1")
    await stuck.wait()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"n": ["go"]}, "multitask_strategy": "interrupt"}
        response = await http.post("/threads/t1/runs/stream", json=body)
        assert (response.status_code, response.json()["code"]) == (409, "thread_busy")
        assert "did not end within 0.2 s" in response.json()["message"]
    release.set()
    assert await run.wait() == "cancelled"
    await api.producer.aclose()


async def test_interrupt_strategy_needs_leave_to_cancel() -> None:
    import httpx

    api, _graph, reached, hold = gated_router()
    api.authorize = lambda request, thread_id, action: action != "cancel"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        body = {"assistant_id": "agent", "input": {"n": ["go"]}, "multitask_strategy": "interrupt"}
        response = await http.post("/threads/t1/runs/stream", json=body)
        assert (response.status_code, response.json()["code"]) == (403, "forbidden")
        hold.set()
        assert '"status":"success"' in (await first).text
    await api.producer.aclose()


async def test_enqueue_strategy_runs_queued_runs_in_order_once_the_run_in_progress_ends() -> None:
    # Regression: multitask_strategy "enqueue" (useStream's submit while a run streams:
    # runs.create, then joinStream once the run in progress ends) was refused (409, and
    # POST /threads/{id}/runs was 404).
    import httpx

    api, graph, reached, hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        body = {"assistant_id": "agent", "input": {"n": ["go"]}, "multitask_strategy": "enqueue"}
        created = await http.post("/threads/t1/runs", json=body)
        assert created.status_code == 200
        queued = created.json()
        assert (queued["status"], queued["multitask_strategy"]) == ("pending", "enqueue")
        run = f"/threads/t1/runs/{queued['run_id']}"
        assert (await http.get(run)).json()["status"] == "pending"
        joined = asyncio.create_task(http.get(f"{run}/stream", headers={"Last-Event-ID": "-1"}))
        # A second queued run, streamed as it asks: it runs after the first queued one.
        body = {**body, "input": {"n": ["go2"]}}
        second = asyncio.create_task(http.post("/threads/t1/runs/stream", json=body))
        # Both queued before the run in progress ends.
        await eventually(holds(lambda: sum("~queued~" in s for s in api.producer.runs) == 2))
        hold.set()
        assert (await first).text.rstrip().endswith('data: {"status":"success"}')
        text = (await joined).text
        assert text.startswith("id: ")
        assert f'"run_id":"{queued["run_id"]}"' in text  # the metadata part names it
        assert text.rstrip().endswith('data: {"status":"success"}')
        streamed = await second
        assert streamed.status_code == 200
        assert streamed.text.rstrip().endswith('data: {"status":"success"}')
        other = streamed.headers["content-location"]
        assert (await http.get(other)).json()["status"] == "success"
    assert await _values(graph, "t1") == ["wait", "done", "go", "done", "go2", "done"]
    assert not api._queues
    await api.producer.aclose()


async def test_a_queued_run_cancelled_before_it_starts_never_runs() -> None:
    import httpx

    api, graph, reached, hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        body = {"assistant_id": "agent", "input": {"n": ["go"]}, "multitask_strategy": "enqueue"}
        run = (
            f"/threads/t1/runs/{(await http.post('/threads/t1/runs', json=body)).json()['run_id']}"
        )
        joined = asyncio.create_task(http.get(f"{run}/stream"))
        assert (await http.post(f"{run}/cancel?wait=1")).status_code == 202
        assert (await http.get(run)).json()["status"] == "interrupted"
        assert (await joined).text.rstrip().endswith('data: {"status":"interrupted"}')
        # The run in progress goes on, alone.
        hold.set()
        assert (await first).text.rstrip().endswith('data: {"status":"success"}')
        assert (
            (await http.get(f"{run}/stream"))
            .text.rstrip()
            .endswith('data: {"status":"interrupted"}')
        )
    assert await _values(graph, "t1") == ["wait", "done"]
    await api.producer.aclose()


async def test_a_queued_run_that_started_is_joined_and_cancelled_as_the_run_it_became() -> None:
    import httpx

    api, _graph, reached, hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        reached.clear()
        body = {"assistant_id": "agent", "input": {"n": ["wait"]}, "multitask_strategy": "enqueue"}
        run_id = (await http.post("/threads/t1/runs", json=body)).json()["run_id"]
        run = f"/threads/t1/runs/{run_id}"
        hold.set()
        await first
        hold.clear()
        await reached.wait()  # the queued run holds in its turn
        assert (await http.get(run)).json()["status"] == "running"
        joined = asyncio.create_task(http.get(f"{run}/stream", headers={"Last-Event-ID": "-1"}))
        assert (await http.post(f"{run}/cancel?wait=1")).status_code == 202
        text = (await joined).text
        assert f'"run_id":"{run_id}"' in text
        assert text.rstrip().endswith('data: {"status":"interrupted"}')
        assert (await http.get(run)).json()["status"] == "interrupted"
    await api.producer.aclose()


@pytest.mark.parametrize(
    "run_id",
    [
        "00000000-0000-0000-0000-000000000000",
        str(uuid.uuid4()),
        "not-a-uuid",
    ],
    # A fixed id per case: the uuid4 differs in each process (pytest-xdist's workers).
    ids=["nil", "random", "not-a-uuid"],
)
async def test_a_made_up_run_id_is_not_found(run_id: str) -> None:
    import httpx

    api, _graph, _reached, _hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        for response in (
            await http.get(f"/threads/t1/runs/{run_id}"),
            await http.get(f"/threads/t1/runs/{run_id}/stream"),
            await http.post(f"/threads/t1/runs/{run_id}/cancel"),
        ):
            assert (response.status_code, response.json()["code"]) == (404, "run_not_found")
    await api.producer.aclose()


async def test_a_queued_run_id_names_its_own_thread_only() -> None:
    import httpx

    api, _graph, reached, hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        body = {"assistant_id": "agent", "input": {"n": ["go"]}, "multitask_strategy": "enqueue"}
        run_id = (await http.post("/threads/t1/runs", json=body)).json()["run_id"]
        response = await http.get(f"/threads/t2/runs/{run_id}")
        assert (response.status_code, response.json()["code"]) == (404, "run_not_found")
        # Regression: in another spelling of the UUID, it was not found either.
        for spelling in (run_id.upper(), f"urn:uuid:{run_id}", run_id.replace("-", "")):
            found = await http.get(f"/threads/t1/runs/{spelling}")
            assert (found.status_code, found.json()["run_id"]) == (200, run_id)
        hold.set()
        await first
    await api.producer.aclose()


def _tool_router() -> Any:
    """A router over a graph whose agent calls two tools: `search` (which reports progress
    and writes a custom part) and `boom` (which raises); tool errors become messages."""
    from langchain_core.callbacks import adispatch_custom_event
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.config import get_stream_writer
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode

    from resumable_stream.langgraph_api import LangGraphRouter

    @tool
    async def search(q: str) -> str:
        """Search."""
        await adispatch_custom_event("progress", {"done": 0.5})
        get_stream_writer()({"note": "searching"})
        return f"found {q}"

    @tool
    async def boom(q: str) -> str:
        """Fail."""
        raise ValueError(f"bad {q}")

    def agent(state: MessagesState) -> dict[str, Any]:
        calls = [
            {"name": "search", "args": {"q": "x"}, "id": "call_1"},
            {"name": "boom", "args": {"q": "y"}, "id": "call_2"},
        ]
        return {"messages": [AIMessage(content="", tool_calls=calls)]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([search, boom], handle_tool_errors=True))
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "tools")
    graph = builder.compile(checkpointer=InMemorySaver())
    return LangGraphRouter(MemoryTransport(), {"agent": graph}, authorize=allow_all)


async def test_a_tool_error_s_message_is_sent_only_for_the_api_s_own_list_of_types() -> None:
    # Regression: a tool's exception went out whole in the `tools` part (a driver's error
    # naming a host); the Agent Server sends the message of ValueError and the like (and
    # of their subclasses), "An internal error occurred" for other types.
    import json

    import httpx
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode

    from resumable_stream.langgraph_api import LangGraphRouter

    @tool
    async def fetch(q: str) -> str:
        """Fetch."""
        if q == "db":
            raise ConnectionError("db at 10.0.0.5 refused")
        raise json.JSONDecodeError("bad JSON", q, 0)  # a ValueError

    def agent(state: MessagesState) -> dict[str, Any]:
        calls = [{"name": "fetch", "args": {"q": q}, "id": f"call_{q}"} for q in ("db", "doc")]
        return {"messages": [AIMessage(content="", tool_calls=calls)]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([fetch], handle_tool_errors=True))
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "tools")
    graph = builder.compile(checkpointer=InMemorySaver())
    api = LangGraphRouter(MemoryTransport(), {"agent": graph}, authorize=allow_all)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"messages": []}, "stream_mode": ["tools"]}
        response = await http.post("/threads/t1/runs/stream", json=body)
    errors = {
        data["toolCallId"]: data["error"]
        for kind, data in _sse_parts(response.text)
        if kind == "tools" and data["event"] == "on_tool_error"
    }
    assert errors == {
        "call_db": {"error": "ConnectionError", "message": "An internal error occurred"},
        "call_doc": {"error": "JSONDecodeError", "message": "bad JSON: line 1 column 1 (char 0)"},
    }
    await api.producer.aclose()


def _sse_parts(text: str) -> list[tuple[str, Any]]:
    parts = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            parts.append((fields["event"], orjson.loads(fields["data"])))
    return parts


async def test_a_tool_messages_artifact_reaches_the_sdks_wherever_the_message_goes() -> None:
    # The Agent Server writes a message as its model_dump(), every field: a ToolMessage's
    # artifact (response_format="content_and_artifact") too, which UIs read for the data
    # beside the model's text. Kept in every stream mode, in the state and the history.
    import datetime as dt

    import pydantic
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode

    from resumable_stream.langgraph_api import LangGraphRouter

    class Hit(pydantic.BaseModel):
        title: str
        day: dt.date

    @tool(response_format="content_and_artifact")
    async def search(q: str) -> tuple[str, dict[str, Any]]:
        """Search."""
        return f"found {q}", {"hits": [Hit(title="Redis", day=dt.date(2026, 1, 2))], "n": 1}

    def agent(state: MessagesState) -> dict[str, Any]:
        call = {"name": "search", "args": {"q": "x"}, "id": "call_1"}
        return {"messages": [AIMessage(content="", id="ai", tool_calls=[call])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([search]))
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "tools")
    graph = builder.compile(checkpointer=InMemorySaver())
    api = LangGraphRouter(MemoryTransport(), {"agent": graph}, authorize=allow_all)
    artifact = {"hits": [{"title": "Redis", "day": "2026-01-02"}], "n": 1}
    modes = ["values", "messages-tuple", "updates", "tools"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"messages": []}, "stream_mode": modes}
        parts = _sse_parts((await http.post("/threads/t1/runs/stream", json=body)).text)
        state = (await http.get("/threads/t1/state")).json()
        history = (await http.post("/threads/t1/history", json={})).json()
    found = {
        "values": parts[-2][1]["messages"][1],
        "messages": next(d[0] for k, d in parts if k == "messages" and d[0]["type"] == "tool"),
        "updates": next(d["tools"] for k, d in parts if k == "updates" and "tools" in d),
        "tools": next(d["output"] for k, d in parts if k == "tools" and "output" in d),
        "state": state["values"]["messages"][1],
        "history": history[0]["values"]["messages"][1],
    }
    found["updates"] = found["updates"]["messages"][0]
    for where, message in found.items():
        assert (where, message["type"], message["tool_call_id"]) == (where, "tool", "call_1")
        assert (where, message["artifact"], message["status"]) == (where, artifact, "success")
    await api.producer.aclose()


@pytest.mark.parametrize("modes", [["tools"], ["tools", "custom", "updates"]])
async def test_tools_stream_mode_gives_each_tool_calls_lifecycle(modes: list[str]) -> None:
    # Regression: stream_mode "tools" (useStream asks for it once a UI reads toolProgress
    # or sets onToolEvent) was 422, and so every later submit of that UI failed.
    import httpx

    api = _tool_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"messages": []}, "stream_mode": modes}
        response = await http.post("/threads/t1/runs/stream", json=body)
    assert response.status_code == 200
    parts = _sse_parts(response.text)
    assert parts[0][0] == "metadata"
    assert parts[-1] == ("end", {"status": "success"})
    tools = [data for kind, data in parts if kind == "tools"]
    search = [t for t in tools if t["toolCallId"] == "call_1"]
    boom = [t for t in tools if t["toolCallId"] == "call_2"]
    assert [t["event"] for t in search] == ["on_tool_start", "on_tool_event", "on_tool_end"]
    assert search[0] == {
        "event": "on_tool_start",
        "toolCallId": "call_1",
        "name": "search",
        "input": {"q": "x"},
    }
    assert search[1]["data"] == {"done": 0.5}
    assert search[2]["output"]["content"] == "found x"
    assert search[2]["output"]["tool_call_id"] == "call_1"
    assert boom == [
        {"event": "on_tool_start", "toolCallId": "call_2", "name": "boom", "input": {"q": "y"}},
        {
            "event": "on_tool_error",
            "toolCallId": "call_2",
            "name": "boom",
            "error": {"error": "ValueError", "message": "bad y"},
        },
    ]
    # The custom part the tool wrote is there when asked for, and only then.
    custom = [data for kind, data in parts if kind == "custom"]
    assert custom == ([{"note": "searching"}] if "custom" in modes else [])
    kinds = {kind for kind, _ in parts} - {"metadata", "end"}
    assert kinds == {"tools", *(m for m in modes if m != "tools")}
    if "updates" in modes:  # in their place: after the agent's update, before the tools'
        nodes = [next(iter(data)) if kind == "updates" else kind for kind, data in parts]
        at = [i for i, (kind, _) in enumerate(parts) if kind == "tools"]
        assert nodes.index("agent") < at[0] and at[-1] < len(nodes) - 1 - nodes[::-1].index("tools")


@pytest.mark.parametrize(
    ("last", "answer"),
    [
        ("go", {"n": ["go", "done"]}),
        ("ask", {"n": ["ask"], "__interrupt__": ["q"]}),
        ("fail", {"__error__": {"error": "ValueError", "message": "failed on purpose"}}),
    ],
)
async def test_runs_wait_answers_with_the_values_the_run_ended_with(
    last: str, answer: dict[str, Any]
) -> None:
    # Regression: runs.wait (POST /threads/{id}/runs/wait) was 404.
    import httpx

    api, _graph, _reached, _hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"n": [last]}}
        response = await http.post("/threads/t1/runs/wait", json=body)
    assert response.status_code == 200
    got = response.json()
    if "__interrupt__" in got:
        got["__interrupt__"] = [interrupt["value"] for interrupt in got["__interrupt__"]]
    assert got == answer
    run = response.headers["content-location"]
    assert response.headers["location"] == f"{run}/join"
    await api.producer.aclose()


async def test_an_exception_s_message_is_sent_only_for_the_api_s_own_list_of_types(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Regression: the message of any exception a graph raised went to the SDKs as it was
    # (a provider's error quoting part of a key, a driver's naming a host). The Agent
    # Server sends it for ValueError, RuntimeError and the like, "An internal error
    # occurred" for other types: in the stream's error part, runs.wait and runs.join.
    import httpx
    from langgraph_sdk import get_client

    from tests._services import uvicorn_server

    hidden = {"error": "_ProviderError", "message": "An internal error occurred"}
    shown = {"error": "ValueError", "message": "failed on purpose"}
    api, _graph, _reached, _hold = gated_router()
    with caplog.at_level(logging.WARNING, "resumable_stream"), uvicorn_server(api) as url:
        async with get_client(url=url) as sdk:
            for last, error in (("leak", hidden), ("fail", shown)):
                thread_id = (await sdk.threads.create())["thread_id"]
                parts = [
                    part async for part in sdk.runs.stream(thread_id, "agent", input={"n": [last]})
                ]
                assert (parts[-1].event, parts[-1].data) == ("error", error)
                async with httpx.AsyncClient(base_url=url) as http:
                    body = {"assistant_id": "agent", "input": {"n": [last]}}
                    waited = await http.post(f"/threads/{thread_id}/runs/wait", json=body)
                assert waited.json() == {"__error__": error}
                # An earlier run, its outcome read from its checkpoint once another ran.
                failed = await sdk.runs.create(thread_id, "agent", input={"n": [last]})
                await sdk.runs.join(thread_id, failed["run_id"])
                await sdk.runs.wait(thread_id, "agent", input={"n": ["go"]})
                assert await sdk.runs.join(thread_id, failed["run_id"]) == {"__error__": error}
                assert "sk-123" not in str(parts)
    # The server's log has what the clients are not told.
    assert "_ProviderError: key sk-123 refused by 10.0.0.5" in caplog.text


async def test_runs_join_of_an_earlier_run_gives_its_own_outcome() -> None:
    # Regression: runs.join of a run that a later run (or a state update) had replaced
    # answered with the thread's latest values: the later run's, its interrupt, or the
    # update's; a failed run read as the later run's success, and a queued run cancelled
    # before it started as the values of the run before it.
    from langgraph_sdk import get_client

    from tests._services import uvicorn_server

    api, _graph, _reached, _hold = gated_router()  # (never released: "wait" holds a run)
    with uvicorn_server(api) as url:
        async with get_client(url=url) as sdk:
            thread_id = (await sdk.threads.create())["thread_id"]
            first = await sdk.runs.create(thread_id, "agent", input={"n": ["go"]})
            assert await sdk.runs.join(thread_id, first["run_id"]) == {"n": ["go", "done"]}
            asked = await sdk.runs.create(thread_id, "agent", input={"n": ["ask"]})
            await sdk.runs.join(thread_id, asked["run_id"])
            assert await sdk.runs.join(thread_id, first["run_id"]) == {"n": ["go", "done"]}
            await sdk.threads.update_state(thread_id, {"n": ["edited"]}, as_node="step")
            answer = await sdk.runs.join(thread_id, asked["run_id"])
            assert answer["n"] == ["go", "done", "ask"]
            assert [i["value"] for i in answer["__interrupt__"]] == ["q"]

            thread_id = (await sdk.threads.create())["thread_id"]
            failed = await sdk.runs.create(thread_id, "agent", input={"n": ["fail"]})
            await sdk.runs.join(thread_id, failed["run_id"])
            await sdk.runs.wait(thread_id, "agent", input={"n": ["go"]})
            error = {"error": "ValueError", "message": "failed on purpose"}
            assert await sdk.runs.join(thread_id, failed["run_id"]) == {"__error__": error}

            thread_id = (await sdk.threads.create())["thread_id"]
            held = await sdk.runs.create(thread_id, "agent", input={"n": ["wait"]})
            queued = await sdk.runs.create(
                thread_id, "agent", input={"n": ["go"]}, multitask_strategy="enqueue"
            )
            assert queued["status"] == "pending"
            await sdk.runs.cancel(thread_id, queued["run_id"], wait=True)
            await sdk.runs.cancel(thread_id, held["run_id"], wait=True)
            assert await sdk.runs.join(thread_id, held["run_id"]) == {"n": ["wait"]}
            answer = await sdk.runs.join(thread_id, queued["run_id"])
            assert answer["__error__"]["error"] == "run_values_gone"
    await api.producer.aclose()


async def test_runs_get_and_list_of_an_earlier_run_give_its_own_status() -> None:
    # Regression: runs.get and runs.list read a run that a later run (or a state update)
    # had replaced as "success", whatever its end: a failed run, or one stopped at an
    # interrupt, too.
    from langgraph_sdk import get_client

    from tests._services import uvicorn_server

    api, _graph, _reached, _hold = gated_router()
    with uvicorn_server(api) as url:
        async with get_client(url=url) as sdk:
            thread_id = (await sdk.threads.create())["thread_id"]
            failed = await sdk.runs.create(thread_id, "agent", input={"n": ["fail"]})
            await sdk.runs.join(thread_id, failed["run_id"])
            done = await sdk.runs.create(thread_id, "agent", input={"n": ["go"]})
            await sdk.runs.join(thread_id, done["run_id"])
            asked = await sdk.runs.create(thread_id, "agent", input={"n": ["ask"]})
            await sdk.runs.join(thread_id, asked["run_id"])
            await sdk.threads.update_state(thread_id, {"n": ["edited"]}, as_node="step")
            expected = {
                failed["run_id"]: "error",
                done["run_id"]: "success",
                asked["run_id"]: "interrupted",
            }
            for run_id, status in expected.items():
                assert (await sdk.runs.get(thread_id, run_id))["status"] == status
            listed = await sdk.runs.list(thread_id)
            assert {run["run_id"]: run["status"] for run in listed} == expected
            errors = await sdk.runs.list(thread_id, status="error")
            assert [run["run_id"] for run in errors] == [failed["run_id"]]
    await api.producer.aclose()


async def test_runs_join_waits_for_the_end_with_heartbeats() -> None:
    import httpx

    api, _graph, reached, hold = gated_router(ping_interval=0.01)
    chunks: list[bytes] = []
    sent = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def recorded(message: Any) -> None:
            body = message.get("body") if scope["path"].endswith("/join") else None
            if body:
                chunks.append(body)
                sent.set()
            await send(message)

        await api(scope, receive, recorded)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        first = await _held_run(http, reached)
        body = {"assistant_id": "agent", "input": {"n": ["go"]}, "multitask_strategy": "enqueue"}
        queued = (await http.post("/threads/t1/runs", json=body)).json()["run_id"]
        joined = asyncio.create_task(http.get(f"/threads/t1/runs/{queued}/join"))
        await sent.wait()
        assert chunks == [b"\n"]  # the run in progress holds the queued one
        hold.set()
        assert (await joined).json() == {"n": ["wait", "done", "go", "done"]}
        await first
        # A run that ended answers at once.
        assert (await http.get(f"/threads/t1/runs/{queued}/join")).json() == {
            "n": ["wait", "done", "go", "done"]
        }
    await api.producer.aclose()


async def test_a_queued_run_cancelled_at_once_lets_the_runs_behind_it_start() -> None:
    # Regression: a queued run cancelled before its waiter took its first step (a cancel
    # right after runs.create: useStream's cancelQueueItem) closed the waiter unstarted, so
    # its turn was never over, and every run queued behind it waited for ever.
    import httpx

    api, graph, reached, hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        ids = []
        for x in ("a", "b"):
            body = {"assistant_id": "agent", "input": {"n": [x]}, "multitask_strategy": "enqueue"}
            ids.append((await http.post("/threads/t1/runs", json=body)).json()["run_id"])
        assert (await http.post(f"/threads/t1/runs/{ids[0]}/cancel?wait=1")).status_code == 202
        hold.set()
        await first
        async with asyncio.timeout(10):  # it hung
            joined = await http.get(
                f"/threads/t1/runs/{ids[1]}/stream", headers={"Last-Event-ID": "-1"}
            )
        assert joined.text.rstrip().endswith('data: {"status":"success"}')
    assert await _values(graph, "t1") == ["wait", "done", "b", "done"]
    assert not api._queues
    await api.producer.aclose()


async def test_a_queued_run_cancelled_in_the_middle_keeps_the_order_of_the_others() -> None:
    # Regression: cancelling a queued run let the run queued behind it go at once, before
    # the runs queued ahead of it had started: it could overtake them.
    import httpx

    api, graph, reached, hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        ids = []
        for x in ("a", "b", "c", "d"):
            body = {"assistant_id": "agent", "input": {"n": [x]}, "multitask_strategy": "enqueue"}
            ids.append((await http.post("/threads/t1/runs", json=body)).json()["run_id"])
        # Each waiter waits in its turn (its first step taken) before one is cancelled.
        await eventually(holds(lambda: all(r._pumping for r in api.producer.runs.values())))
        assert (await http.post(f"/threads/t1/runs/{ids[2]}/cancel?wait=1")).status_code == 202
        hold.set()
        await first
        async with asyncio.timeout(10):
            for run_id in (ids[0], ids[1], ids[3]):
                await http.get(f"/threads/t1/runs/{run_id}/stream", headers={"Last-Event-ID": "-1"})
    assert await _values(graph, "t1") == ["wait", "done", "a", "done", "b", "done", "d", "done"]
    assert not api._queues
    await api.producer.aclose()


async def test_tools_stream_mode_shows_an_interrupted_tool_paused_not_failed() -> None:
    # Regression: a tool that called interrupt() got an `on_tool_error` part (GraphInterrupt,
    # the interrupt's repr as its message), so useStream's toolProgress showed it failed
    # while it waited for the answer; on resume it runs again from its start.
    import httpx
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode
    from langgraph.types import interrupt

    from resumable_stream.langgraph_api import LangGraphRouter

    @tool
    async def ask(q: str) -> str:
        """Ask the user."""
        return f"answer {interrupt(q)}"

    def agent(state: MessagesState) -> dict[str, Any]:
        call = {"name": "ask", "args": {"q": "sure?"}, "id": "call_1"}
        return {"messages": [AIMessage(content="", tool_calls=[call])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([ask]))
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "tools")
    api = LangGraphRouter(
        MemoryTransport(),
        {"agent": builder.compile(checkpointer=InMemorySaver())},
        authorize=allow_all,
    )
    runs = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        for given in ({"input": {"messages": []}}, {"command": {"resume": "yes"}}):
            body = {"assistant_id": "agent", "stream_mode": ["tools", "updates"], **given}
            response = await http.post("/threads/t1/runs/stream", json=body)
            assert response.status_code == 200
            runs.append(_sse_parts(response.text))
    await api.producer.aclose()
    first, resumed = ([data for kind, data in parts if kind == "tools"] for parts in runs)
    assert [t["event"] for t in first] == ["on_tool_start"]
    assert any(kind == "updates" and "__interrupt__" in data for kind, data in runs[0])
    assert [t["event"] for t in resumed] == ["on_tool_start", "on_tool_end"]
    assert resumed[1]["output"]["content"] == "answer yes"


async def test_a_queued_run_that_starts_while_its_id_is_resolved_is_not_run_not_found() -> None:
    # Regression: the router read the thread stream's info before the waiter's, so a
    # queued run that started between the two reads (a round trip each on Redis) was
    # 404 run_not_found: to GET, join, runs.wait and cancel (which then left it running).
    import httpx

    api, _graph, reached, hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        body = {"assistant_id": "agent", "input": {"n": ["go"]}, "multitask_strategy": "enqueue"}
        run_id = (await http.post("/threads/t1/runs", json=body)).json()["run_id"]
        original = api.transport.info
        raced = False

        async def info(stream_id: str) -> Any:
            nonlocal raced
            if "~queued~" in stream_id and not raced:
                raced = True  # the queued run starts (and ends) between the reads
                hold.set()
                await first
                await eventually(holds(lambda: not any("~queued~" in s for s in api.producer.runs)))
            return await original(stream_id)

        api.transport.info = info  # type: ignore[method-assign]
        response = await http.get(f"/threads/t1/runs/{run_id}")
        assert raced
        assert response.status_code == 200, response.text
        assert response.json()["status"] in ("running", "success")  # the run it became
    await api.producer.aclose()


async def test_runs_wait_cancels_the_run_when_its_client_leaves_if_asked() -> None:
    # Regression: runs.wait ignored on_disconnect "cancel" (both SDKs send it): the run went
    # on after the client left, although the client asked for it to stop.
    import httpx

    from tests._services import uvicorn_server

    api, _graph, _reached, _hold = gated_router(ping_interval=0.05)
    with uvicorn_server(api) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            runs = []
            for thread, leaving in (("t1", "cancel"), ("t2", "continue")):
                body = {"assistant_id": "agent", "input": {"n": ["wait"]}, "on_disconnect": leaving}
                async with http.stream("POST", f"/threads/{thread}/runs/wait", json=body) as r:
                    assert r.headers["content-type"] == "application/json"
                    assert await anext(r.aiter_bytes()) == b"\n"  # the run holds: a heartbeat
                    runs.append(r.headers["content-location"])
            # The client is gone from both.

            async def status(run: str) -> str:
                return str((await http.get(run)).json()["status"])

            async def cancelled() -> bool:
                return await status(runs[0]) == "interrupted"

            await eventually(cancelled)
            assert await status(runs[1]) == "running"
            assert (await http.post(f"{runs[1]}/cancel?wait=1")).status_code == 202


async def test_runs_wait_names_no_internal_address_when_the_state_cannot_be_read() -> None:
    # Regression: a failing checkpointer read was answered with str(exc), which may name a
    # database address, where every other error answer names none.
    import httpx

    api, graph, _reached, _hold = gated_router()

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("connection to postgres://app:secret@10.0.0.5 failed")

    graph.aget_state = broken
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"n": ["go"]}}
        response = await http.post("/threads/t1/runs/wait", json=body)
    assert response.status_code == 200
    assert response.json() == {
        "__error__": {"error": "RuntimeError", "message": "the answer failed; see the server's log"}
    }
    assert "10.0.0.5" not in response.text
    await api.producer.aclose()


async def test_runs_list_gives_the_threads_runs_newest_first() -> None:
    # Regression: GET /threads/{id}/runs (the SDKs' runs.list) was 405.
    import httpx

    api, _graph, reached, hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        assert (await http.get("/threads/t1/runs")).json() == []
        done = await http.post(
            "/threads/t1/runs/wait", json={"assistant_id": "agent", "input": {"n": ["a"]}}
        )
        failed = await http.post(
            "/threads/t1/runs/wait", json={"assistant_id": "agent", "input": {"n": ["fail"]}}
        )
        assert "__error__" in failed.json()
        first = await _held_run(http, reached)
        body = {"assistant_id": "agent", "input": {"n": ["go"]}, "multitask_strategy": "enqueue"}
        queued = (await http.post("/threads/t1/runs", json=body)).json()["run_id"]
        runs = (await http.get("/threads/t1/runs")).json()
        done_id = done.headers["content-location"].rsplit("/", 1)[1]
        failed_id = failed.headers["content-location"].rsplit("/", 1)[1]
        running_id = runs[1]["run_id"]
        assert [(r["run_id"], r["status"]) for r in runs] == [
            (queued, "pending"),
            (running_id, "running"),
            # An earlier run's status is read from the last checkpoint it wrote.
            (failed_id, "error"),
            (done_id, "success"),
        ]
        assert {r["thread_id"] for r in runs} == {"t1"}
        for run in runs:  # each as runs.get gives it
            assert (await http.get(f"/threads/t1/runs/{run['run_id']}")).json() == run
        pending = await http.get("/threads/t1/runs", params={"status": "pending"})
        assert [r["run_id"] for r in pending.json()] == [queued]
        page = await http.get(
            "/threads/t1/runs", params={"limit": 2, "offset": 1, "select": ["run_id", "status"]}
        )
        assert page.json() == [
            {"run_id": running_id, "status": "running"},
            {"run_id": failed_id, "status": "error"},
        ]
        hold.set()
        await first
        await http.get(f"/threads/t1/runs/{queued}/join")
        runs = (await http.get("/threads/t1/runs")).json()
        # The queued run is the latest now, under the id it was queued with.
        assert [(r["run_id"], r["status"]) for r in runs[:2]] == [
            (queued, "success"),
            (running_id, "success"),
        ]
        assert [r["run_id"] for r in runs[2:]] == [failed_id, done_id]
        # Another thread's runs are its own.
        assert (await http.get("/threads/t2/runs")).json() == []
    await api.producer.aclose()


async def test_runs_list_reads_only_the_checkpoints_of_the_runs_it_lists() -> None:
    # Regression: runs.list read every checkpoint of the thread, each with the thread's
    # values at that point, whatever its limit: seconds on a long conversation.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver

    class Counted(InMemorySaver):
        read = 0

        async def alist(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            async for item in super().alist(*args, **kwargs):
                self.read += 1
                yield item

    saver = Counted()
    api, _graph, _reached, _hold = gated_router(saver=saver)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        ids = []
        for word in ["a", "fail", "b", "ask", "c", "d", "e", "f"]:
            body = {"assistant_id": "agent", "input": {"n": [word]}}
            answer = await http.post("/threads/t1/runs/wait", json=body)
            ids.append(answer.headers["content-location"].rsplit("/", 1)[1])
        saver.read = 0
        everything = (await http.get("/threads/t1/runs")).json()
        all_read = saver.read
        assert [run["run_id"] for run in everything] == ids[::-1]
        page = (await http.get("/threads/t1/runs", params={"limit": 2, "offset": 3})).json()
        assert page == everything[3:5]
        saver.read = 0
        newest = (await http.get("/threads/t1/runs", params={"limit": 2})).json()
        assert newest == everything[:2]
        assert saver.read < all_read / 2  # the two runs' checkpoints, and the next one's
        # A status to match reads them all (any run may have it).
        errors = (await http.get("/threads/t1/runs", params={"status": "error"})).json()
        assert [run["run_id"] for run in errors] == [ids[1]]
    await api.producer.aclose()


async def test_runs_list_and_get_hold_while_a_run_starts() -> None:
    # Regression: runs.list read the thread's latest run, then its checkpoints: a run that
    # started in between was listed as "success" from its checkpoints while it ran, and
    # the run before it as "interrupted", the state then being the new run's, at its next
    # step. runs.get, reading the state after the run, said "interrupted" too.
    import httpx

    api, _graph, reached, hold = gated_router()
    started: list[asyncio.Task[Any]] = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"n": ["a"]}}
        done = await http.post("/threads/t1/runs/wait", json=body)
        done_id = done.headers["content-location"].rsplit("/", 1)[1]
        resolve, checkpointed_runs = api._resolve, api._checkpointed_runs

        async def resolve_then_start(*args: Any) -> Any:
            run = await resolve(*args)
            started.append(await _held_run(http, reached))
            return run

        api._resolve = resolve_then_start
        assert (await http.get(f"/threads/t1/runs/{done_id}")).json()["status"] == "success"
        api._resolve = resolve
        hold.set()
        await started.pop()
        hold.clear()
        reached.clear()
        earlier = {r["run_id"] for r in (await http.get("/threads/t1/runs")).json()}

        async def start_then_read(thread_id: str, **kwargs: Any) -> Any:
            started.append(await _held_run(http, reached))
            return await checkpointed_runs(thread_id, **kwargs)

        api._checkpointed_runs = start_then_read
        runs = (await http.get("/threads/t1/runs")).json()
        assert len(earlier) == 2
        assert {r["status"] for r in runs if r["run_id"] in earlier} == {"success"}
        # The run that started meanwhile: listed as running, if at all.
        assert {r["status"] for r in runs if r["run_id"] not in earlier} <= {"running"}
        hold.set()
        await started.pop()
    await api.producer.aclose()


async def test_runs_list_names_no_made_up_run_while_a_queued_run_starts() -> None:
    # Regression: between a queued run taking the thread's stream and writing its first
    # part (which names its run id), runs.list listed a run of a made-up id (the one the
    # epoch would give a run not queued) as running, beside the queued run.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver

    from resumable_stream.langgraph_api import LangGraphRouter

    class Gated(MemoryTransport):
        """Holds the thread's appends of runs after ``after`` until ``gate`` is set."""

        after: int | None = None
        gate, blocked = asyncio.Event(), asyncio.Event()

        async def append(self, stream_id: str, owner: str, entry: Any, *args: Any) -> None:
            if stream_id == "langgraph:t1" and self.after is not None and entry.epoch > self.after:
                self.blocked.set()
                await self.gate.wait()
            await super().append(stream_id, owner, entry, *args)

    _api, graph, reached, hold = gated_router(saver=InMemorySaver())
    transport = Gated()
    api = LangGraphRouter(transport, {"agent": graph}, authorize=allow_all)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        info = await transport.info("langgraph:t1")
        assert info is not None
        transport.after = info.epoch
        held = (await http.get("/threads/t1/runs")).json()[0]["run_id"]
        body = {"assistant_id": "agent", "input": {"n": ["go"]}, "multitask_strategy": "enqueue"}
        queued = (await http.post("/threads/t1/runs", json=body)).json()["run_id"]
        hold.set()
        await transport.blocked.wait()  # the queued run took the thread, unwritten
        try:
            runs = (await http.get("/threads/t1/runs")).json()
        finally:
            transport.gate.set()
        assert {r["run_id"] for r in runs} <= {held, queued}, runs
        # Pending, or running once its waiter named the run it started; listed once.
        assert [r["status"] for r in runs if r["run_id"] == queued] in (["pending"], ["running"])
        await http.get(f"/threads/t1/runs/{queued}/join")
        runs = (await http.get("/threads/t1/runs")).json()
        assert [(r["run_id"], r["status"]) for r in runs] == [
            (queued, "success"),
            (held, "success"),
        ]
        await first
    await api.producer.aclose()


async def test_runs_list_names_no_run_for_a_thread_deletes_hold() -> None:
    # Regression: a thread delete holds the thread's stream, writing nothing, while it
    # deletes the checkpoints; runs.list listed that hold as a run of a made-up id, running.
    import httpx

    api, graph, _reached, _hold = gated_router()
    gate, inside = asyncio.Event(), asyncio.Event()
    delete = graph.checkpointer.adelete_thread

    async def held_delete(thread_id: str) -> None:
        inside.set()
        await gate.wait()
        await delete(thread_id)

    graph.checkpointer.adelete_thread = held_delete
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        done = await http.post(
            "/threads/t1/runs", json={"assistant_id": "agent", "input": {"n": ["go"]}}
        )
        await http.get(f"/threads/t1/runs/{done.json()['run_id']}/join")
        deleted = asyncio.create_task(http.delete("/threads/t1"))
        await inside.wait()
        try:
            runs = (await http.get("/threads/t1/runs")).json()
        finally:
            gate.set()
        assert [(r["run_id"], r["status"]) for r in runs] == [(done.json()["run_id"], "success")]
        assert (await deleted).status_code == 204
    await api.producer.aclose()


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "ten"},
        {"offset": "-1"},
        {"status": "done"},
        {"select": "values"},
    ],
)
async def test_runs_list_refuses_a_bad_query(query: dict[str, str]) -> None:
    import httpx

    api, _graph, _reached, _hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        response = await http.get("/threads/t1/runs", params=query)
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_request"
    assert next(iter(query)) in response.json()["message"]


async def test_threads_search_finds_a_graphs_threads_newest_first() -> None:
    # Regression: POST /threads/search (threads.search, Agent Chat UI's thread list) and
    # GET /info (its connection check) were 404.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver

    from resumable_stream.langgraph_api import LangGraphRouter

    _api, graph, _reached, _hold = gated_router(saver=InMemorySaver())

    def authorize(request: Any, thread_id: str | None, action: str) -> bool:
        return not (thread_id == "hidden" and action == "read")

    api = LangGraphRouter(MemoryTransport(), {"agent": graph, "other": graph}, authorize=authorize)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        assert (await http.get("/info")).status_code == 200
        for thread_id, assistant in [
            ("a1", "agent"),
            ("o1", "other"),
            ("hidden", "agent"),
            ("a2", "agent"),
            ("ask", "agent"),
        ]:
            word = "ask" if thread_id == "ask" else thread_id
            body = {"assistant_id": assistant, "input": {"n": [word]}}
            assert (await http.post(f"/threads/{thread_id}/runs/wait", json=body)).is_success
        # As Agent Chat UI asks: its graph's threads.
        found = await http.post(
            "/threads/search", json={"metadata": {"graph_id": "agent"}, "limit": 100}
        )
        records = found.json()
        assert [r["thread_id"] for r in records] == ["ask", "a2", "a1"]  # not "hidden"
        assert [r["status"] for r in records] == ["interrupted", "idle", "idle"]
        assert records[1]["values"] == {"n": ["a2", "done"]}
        assert records[1] == (await http.get("/threads/a2")).json()
        other = await http.post("/threads/search", json={"metadata": {"assistant_id": "other"}})
        assert [r["thread_id"] for r in other.json()] == ["o1"]
        every = await http.post("/threads/search", json={})
        assert [r["thread_id"] for r in every.json()] == ["ask", "a2", "o1", "a1"]
        oldest = await http.post(
            "/threads/search", json={"sort_by": "created_at", "sort_order": "asc"}
        )
        by_creation = sorted(every.json(), key=lambda r: (r["created_at"], r["thread_id"]))
        assert [r["thread_id"] for r in oldest.json()] == [r["thread_id"] for r in by_creation]
        page = await http.post(
            "/threads/search",
            json={
                "limit": 2,
                "offset": 1,
                "sort_by": "thread_id",
                "sort_order": "asc",
                "select": ["thread_id", "status"],
            },
        )
        assert page.json() == [
            {"thread_id": "a2", "status": "idle"},
            {"thread_id": "ask", "status": "interrupted"},
        ]
        some = await http.post("/threads/search", json={"ids": ["a1", "o1", "nope"]})
        assert [r["thread_id"] for r in some.json()] == ["o1", "a1"]
        none = await http.post("/threads/search", json={"metadata": {"graph_id": "nope"}})
        assert none.json() == []
        # Regression: an empty filter, as the JS SDK sends `values: {}`, was 422.
        empty = await http.post("/threads/search", json={"values": {}, "status": None})
        assert [r["thread_id"] for r in empty.json()] == ["ask", "a2", "o1", "a1"]


async def test_threads_search_asks_search_threads_when_given() -> None:
    from datetime import UTC, datetime

    import httpx

    from resumable_stream.langgraph_api import LangGraphRouter, ThreadInfo, ThreadSearch

    _api, graph, _reached, _hold = gated_router()
    asked: list[ThreadSearch] = []

    async def search_threads(request: Any, search: ThreadSearch) -> list[str]:
        asked.append(search)
        return ["t2", "gone", "t1"]

    async def thread_info(request: Any, thread_id: str) -> ThreadInfo | None:
        if thread_id == "gone":
            return None
        day = datetime(2026, 1, int(thread_id[1:]), tzinfo=UTC)
        return ThreadInfo(day, day, {"title": thread_id})

    api = LangGraphRouter(
        MemoryTransport(),
        {"agent": graph},
        authorize=allow_all,
        thread_info=thread_info,
        search_threads=search_threads,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"metadata": {"graph_id": "agent"}, "limit": 5, "sort_by": "updated_at"}
        records = (await http.post("/threads/search", json=body)).json()
    assert asked == [ThreadSearch({"graph_id": "agent"}, None, 5, 0, "updated_at", None)]
    # In the app's order; a thread it no longer has is left out.
    assert [(r["thread_id"], r["metadata"]) for r in records] == [
        ("t2", {"title": "t2"}),
        ("t1", {"title": "t1"}),
    ]
    assert records[0]["created_at"] == "2026-01-02T00:00:00+00:00"


async def _users_threads() -> Any:
    """A router whose threads alice1, bob1, alice2, bob2, bob3 (in that order, each with
    one run, metadata ``team``: alice or bob) are readable by the ``user`` header's user."""
    import httpx

    from resumable_stream.langgraph_api import LangGraphRouter

    _api, graph, _reached, _hold = gated_router()

    def authorize(request: Any, thread_id: str | None, action: str) -> bool:
        user = request.headers.get("user", "")
        return thread_id is None or action != "read" or thread_id.startswith(user)

    api = LangGraphRouter(MemoryTransport(), {"agent": graph}, authorize=authorize)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        for thread_id in ["alice1", "bob1", "alice2", "bob2", "bob3"]:
            body = {
                "assistant_id": "agent",
                "input": {"n": [thread_id]},
                "config": {"metadata": {"team": thread_id[:-1]}},
            }
            assert (await http.post(f"/threads/{thread_id}/runs/wait", json=body)).is_success
    return api


async def test_threads_search_pages_the_threads_the_caller_may_read() -> None:
    # Regression: the search paged the checkpointer's threads before leaving out those
    # authorize refuses, so that a page of other users' threads came out empty (Agent
    # Chat UI showed no threads) while the caller's own were further on.
    import httpx

    api = await _users_threads()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        alice = {"user": "alice"}
        found = await http.post("/threads/search", json={"limit": 2}, headers=alice)
        assert [r["thread_id"] for r in found.json()] == ["alice2", "alice1"]
        page = await http.post("/threads/search", json={"limit": 1, "offset": 1}, headers=alice)
        assert [r["thread_id"] for r in page.json()] == ["alice1"]
        bob = await http.post("/threads/search", json={"limit": 2}, headers={"user": "bob"})
        assert [r["thread_id"] for r in bob.json()] == ["bob3", "bob2"]


async def test_threads_search_answers_thread_info_s_record_when_given() -> None:
    # Regression: without search_threads, the search answered each thread with its
    # checkpoints' times and no metadata, where threads.get gives thread_info's record.
    from datetime import UTC, datetime

    import httpx

    from resumable_stream.langgraph_api import LangGraphRouter, ThreadInfo

    _api, graph, _reached, _hold = gated_router()

    dropped: set[str] = set()

    async def thread_info(request: Any, thread_id: str) -> ThreadInfo | None:
        if thread_id in dropped:
            return None
        day = datetime(2026, 1, 2, tzinfo=UTC)
        return ThreadInfo(day, day, {"title": thread_id})

    api = LangGraphRouter(
        MemoryTransport(), {"agent": graph}, authorize=allow_all, thread_info=thread_info
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        for thread_id in ["t1", "gone"]:
            body = {"assistant_id": "agent", "input": {"n": [thread_id]}}
            assert (await http.post(f"/threads/{thread_id}/runs/wait", json=body)).is_success
        dropped.add("gone")  # the app dropped its record; its checkpoints stay
        found = (await http.post("/threads/search", json={})).json()
        assert found == [(await http.get("/threads/t1")).json()]
        assert found[0]["metadata"] == {"title": "t1"}


async def test_threads_search_by_a_key_the_checkpointer_refuses_is_422(tmp_path: Any) -> None:
    # Regression: AsyncSqliteSaver takes metadata keys of letters, digits, "_", "." and "-"
    # only, and raises ValueError for others: a search by {"user id": ...} was a 500.
    import httpx
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "checkpoints.db")) as saver:
        api, _graph, _reached, _hold = gated_router(saver=saver)
        transport = httpx.ASGITransport(api, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            body = {"assistant_id": "agent", "input": {"n": ["a"]}}
            assert (await http.post("/threads/t1/runs/wait", json=body)).is_success
            found = await http.post("/threads/search", json={"metadata": {"graph_id": "agent"}})
            assert [r["thread_id"] for r in found.json()] == ["t1"]
            refused = await http.post("/threads/search", json={"metadata": {"user id": "u"}})
    assert refused.status_code == 422
    assert refused.json()["code"] == "search_not_served"
    assert "'user id'" in refused.json()["message"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"metadata": ["graph_id"]}, "metadata"),
        ({"ids": "t1"}, "ids"),
        ({"limit": 0}, "limit"),
        ({"limit": "10"}, "limit"),
        ({"offset": -1}, "offset"),
        ({"sort_by": "title"}, "sort_by"),
        ({"sort_order": "up"}, "sort_order"),
        ({"select": ["title"]}, "select"),
        ({"status": "idle"}, "status"),
        ({"values": {"n": []}}, "values"),
    ],
)
async def test_threads_search_refuses_a_bad_body(body: dict[str, Any], named: str) -> None:
    import httpx

    api, _graph, _reached, _hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        response = await http.post("/threads/search", json=body)
    assert response.status_code == 422
    assert response.json()["code"] in ("invalid_request", "search_not_served")
    assert named in response.json()["message"]


@pytest.mark.parametrize(
    ("last", "status"), [("go", "idle"), ("ask", "interrupted"), ("fail", "error")]
)
async def test_a_threads_status_tells_a_failed_run_from_an_interrupt(
    last: str, status: str
) -> None:
    # Regression: a thread whose last run failed read as "interrupted" (its failed task is
    # still next), as if it waited for the user's answer; the API says "error".
    import httpx

    api, _graph, _reached, _hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"n": [last]}}
        await http.post("/threads/t1/runs/wait", json=body)
        assert (await http.get("/threads/t1")).json()["status"] == status
    await api.producer.aclose()


async def test_a_cancel_with_an_action_not_served_is_refused_before_it_cancels() -> None:
    # Regression: runs.cancel(..., action="rollback") was 202 and only interrupted the run:
    # the thread kept the run's partial state, where the API deletes the run's checkpoints.
    # Any action but "interrupt" (the SDKs' default) was taken as it.
    import httpx

    from resumable_stream.langgraph_api import run_id_for

    api, _graph, reached, _hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        info = await api.transport.info("langgraph:t1")
        assert info is not None
        run = f"/threads/t1/runs/{run_id_for('langgraph:t1', info.epoch)}"
        for action, code in (("rollback", "rollback_not_served"), ("bogus", "invalid_request")):
            response = await http.post(f"{run}/cancel", params={"wait": 1, "action": action})
            assert (response.status_code, response.json()["code"]) == (422, code)
        assert (await http.get(run)).json()["status"] == "running"
        response = await http.post(f"{run}/cancel", params={"wait": 1, "action": "interrupt"})
        assert response.status_code == 202
        assert (await http.get(run)).json()["status"] == "interrupted"
        await first
    await api.producer.aclose()


async def test_a_checkpoint_named_in_the_config_is_checked_as_checkpoint_id_is() -> None:
    # Regression: `config.configurable.checkpoint_id` (LangGraph's own way to name one) went
    # to the graph unchecked: another thread's checkpoint, or a made-up one, started the run
    # from an empty state, dropping the thread's messages from its latest state.
    async with lg_client() as (http, _, holds):
        threads = [(await http.post("/threads", json={})).json()["thread_id"] for _ in "ab"]
        for thread_id in threads:
            holds.setdefault(thread_id, asyncio.Event()).set()
            body = {"assistant_id": "agent", "input": {"messages": [("user", thread_id)]}}
            assert (await http.post(f"/threads/{thread_id}/runs/wait", json=body)).is_success
        mine, other = threads
        history = (await http.post(f"/threads/{other}/history", json={})).json()
        foreign = history[0]["checkpoint"]["checkpoint_id"]
        for checkpoint_id in (foreign, str(uuid.uuid4())):
            body = {
                "assistant_id": "agent",
                "input": {"messages": [("user", "two")]},
                "config": {"configurable": {"checkpoint_id": checkpoint_id}},
            }
            response = await http.post(f"/threads/{mine}/runs/wait", json=body)
            assert (response.status_code, response.json()["code"]) == (404, "checkpoint_not_found")
        response = await http.post(
            f"/threads/{mine}/runs/wait",
            json={**body, "config": {"configurable": {"checkpoint_id": 5}}},
        )
        assert (response.status_code, response.json()["code"]) == (422, "invalid_request")
        state = (await http.get(f"/threads/{mine}/state")).json()
        assert [m["content"] for m in state["values"]["messages"]] == [mine, answer_text(mine)]

        # One of its own forks there, as checkpoint_id does.
        start = (await http.post(f"/threads/{mine}/history", json={})).json()[-1]["checkpoint"]
        body["config"] = {"configurable": {"checkpoint_id": start["checkpoint_id"]}}
        values = (await http.post(f"/threads/{mine}/runs/wait", json=body)).json()
        assert [m["content"] for m in values["messages"]] == ["two", answer_text("two")]


async def test_a_run_whose_producer_died_reads_as_error_not_running() -> None:
    # Regression: a run whose process was killed (its lease lapsed) with no one reading it
    # read as "running" (runs.get, runs.list) and its thread as "busy" until the stream's
    # metadata expired, a day by default.
    import httpx

    from resumable_stream.langgraph_api import LangGraphRouter, run_id_for

    _api, graph, _reached, _hold = gated_router()
    transport = MemoryTransport()
    api = LangGraphRouter(transport, {"agent": graph}, authorize=allow_all)
    epoch = await dead_run(transport, "langgraph:t1")
    await dead_run(transport, "langgraph:t2")
    run = f"/threads/t1/runs/{run_id_for('langgraph:t1', epoch)}"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        assert (await http.get(run)).json()["status"] == "error"
        assert [r["status"] for r in (await http.get("/threads/t1/runs")).json()] == ["error"]
        assert (await http.get("/threads/t2")).json()["status"] == "idle"
    await api.producer.aclose()


async def test_a_threads_values_are_answered_as_to_wire_writes_them() -> None:
    # The state, history, thread and run answers write a thread's values with orjson where it
    # writes them as to_wire() would (a long thread's values: a fifth of the CPU), and
    # through to_wire() where it would not (a date, a Decimal, a dataclass...).
    import dataclasses
    import datetime as dt
    import decimal

    import httpx
    from langchain_core.messages import AIMessage, HumanMessage
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, StateGraph
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from resumable_stream.langgraph_api import LangGraphRouter

    @dataclasses.dataclass
    class Box:
        size: int

    class State(TypedDict):
        messages: list[Any]
        extra: Any

    builder = StateGraph(State)
    builder.add_node("agent", lambda state: {})
    builder.add_edge(START, "agent")
    graph = builder.compile(InMemorySaver())
    api = LangGraphRouter(MemoryTransport(), {"chat": graph}, authorize=allow_all)
    app = Starlette(routes=[Mount("/lg", api)])
    config: Any = {"configurable": {"thread_id": "t"}}
    messages = [
        HumanMessage("hi", id="h"),
        AIMessage(
            "hello",
            id="a",
            response_metadata={"finish_reason": "stop", "model_provider": "openai"},
            usage_metadata={"input_tokens": 1, "output_tokens": 2, "total_tokens": 3},
        ),
    ]
    extras = [
        {"n": (1, 2), "f": 0.5, "none": None},
        {"day": dt.date(2026, 1, 2), "price": decimal.Decimal("1.50"), "box": Box(3)},
    ]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://t/lg"
    ) as http:
        for extra in extras:
            await graph.aupdate_state(
                config, {"messages": messages, "extra": extra}, as_node="agent"
            )
            state = await graph.aget_state(config)
            expected = orjson.loads(orjson.dumps(to_wire(state.values)))
            assert expected["extra"] != extra or extra is extras[0]
            assert (await http.get("/threads/t/state")).json()["values"] == expected
            [head] = (await http.post("/threads/t/history", json={"limit": 1})).json()
            assert head["values"] == expected
            assert head["metadata"] == orjson.loads(orjson.dumps(to_wire(state.metadata)))
            assert (await http.get("/threads/t")).json()["values"] == expected
            body = {"assistant_id": "chat", "input": {}}
            assert (await http.post("/threads/t/runs/wait", json=body)).json() == expected


async def test_a_threads_state_is_read_with_the_graph_its_runs_ran() -> None:
    # Regression: with several graphs, a thread's state, history, status, run status and
    # runs.join were read with the first graph: a thread stopped at an interrupt of another
    # graph had no next node, no tasks and no interrupts, read as idle and its run as
    # success, and useStream never showed the interrupt (live or after a reload).
    import httpx
    from langchain_core.messages import AIMessage
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.types import interrupt
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from resumable_stream.langgraph_api import LangGraphRouter

    def ask(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage(f"hi {interrupt('your name?')}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    saver = InMemorySaver()
    released = asyncio.Event()
    released.set()
    graphs = {"chat": build_graph({"t": released}, saver), "asker": builder.compile(saver)}
    api = LangGraphRouter(MemoryTransport(), graphs, authorize=allow_all)
    app = Starlette(routes=[Mount("/lg", api)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://t/lg"
    ) as http:
        first = await http.post(
            "/threads/t/runs/wait",
            json={
                "assistant_id": "asker",
                "input": {"messages": [{"role": "user", "content": "x"}]},
            },
        )
        assert first.json()["__interrupt__"][0]["value"] == "your name?"
        run = first.headers["content-location"]
        state = (await http.get("/threads/t/state")).json()
        assert state["next"] == ["ask"]
        assert state["tasks"][0]["interrupts"][0]["value"] == "your name?"
        assert state["interrupts"][0]["value"] == "your name?"
        [head] = (await http.post("/threads/t/history", json={"limit": 1})).json()
        assert head["tasks"][0]["interrupts"][0]["value"] == "your name?"
        assert (await http.get("/threads/t")).json()["status"] == "interrupted"
        assert (await http.get(run)).json()["status"] == "interrupted"
        joined = (await http.get(f"{run}/join")).json()
        assert joined["__interrupt__"][0]["value"] == "your name?"
        # The thread's latest run says which graph it is: the first graph's next.
        await http.post(
            "/threads/t/runs/wait",
            json={
                "assistant_id": "chat",
                "input": {"messages": [{"role": "user", "content": "y"}]},
            },
        )
        assert (await http.get("/threads/t/state")).json()["next"] == []
        assert (await http.get("/threads/t")).json()["status"] == "idle"
    await api.producer.aclose()


async def test_a_thread_reads_error_after_a_failed_run_not_after_a_cancelled_one() -> None:
    # A cancelled run leaves its thread idle (as the API does), not `error`: LangGraph
    # records the cancelled task's CancelledError, which is no failure of the run.
    import httpx
    from langchain_core.messages import AIMessage
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, MessagesState, StateGraph

    from resumable_stream.langgraph_api import LangGraphRouter

    def fail(state: MessagesState) -> dict[str, Any]:
        if state["messages"][-1].content == "fail":
            raise ValueError("boom")
        return {"messages": [AIMessage("ok")]}

    builder = StateGraph(MessagesState)
    builder.add_node("fail", fail)
    builder.add_edge(START, "fail")
    graph = builder.compile(InMemorySaver())
    api = LangGraphRouter(MemoryTransport(), {"agent": graph}, authorize=allow_all)
    body = {"assistant_id": "agent", "input": {"messages": [{"role": "user", "content": "fail"}]}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        answer = (await http.post("/threads/t/runs/wait", json=body)).json()
        assert answer["__error__"]["error"] == "ValueError"
        assert (await http.get("/threads/t")).json()["status"] == "error"
        found = (await http.post("/threads/search", json={"ids": ["t"]})).json()
        assert [t["status"] for t in found] == ["error"]
    await api.producer.aclose()


async def test_join_with_stream_mode_filters_the_runs_parts() -> None:
    # Regression: GET .../runs/{run_id}/stream ignored `stream_mode` (the SDKs' joinStream
    # / join_stream streamMode): every part of the run came. Repeated (as both SDKs send
    # a list) or a JSON list (as langgraph-api reads it too); metadata and the end stay.
    async with lg_client() as (http, _api, holds):
        holds.setdefault("t", asyncio.Event()).set()
        body = {
            "assistant_id": "agent",
            "input": {"messages": [{"role": "user", "content": "a"}]},
            "stream_mode": ["values", "updates", "messages-tuple", "custom"],
        }
        run = (await http.post("/threads/t/runs/stream", json=body)).headers["content-location"]

        async def events(query: str) -> list[str]:
            response = await http.get(f"{run}/stream{query}", headers={"last-event-id": "-1"})
            assert response.status_code == 200, response.text
            return [
                line.removeprefix("event: ")
                for line in response.text.splitlines()
                if line.startswith("event: ")
            ]

        assert set(await events("")) == {
            "metadata",
            "values",
            "updates",
            "messages",
            "custom",
            "end",
        }
        assert await events("?stream_mode=custom") == ["metadata", "custom", "end"]
        tuples = await events("?stream_mode=messages-tuple&stream_mode=custom")
        assert set(tuples) == {"metadata", "messages", "custom", "end"}
        assert set(await events('?stream_mode=["updates","custom"]')) == {
            "metadata",
            "updates",
            "custom",
            "end",
        }
        assert await events("?stream_mode=debug") == ["metadata", "end"]  # not streamed
        assert await events("?stream_mode=") == await events("")  # langgraph-sdk's "none"
        refused = await http.get(f"{run}/stream?stream_mode=events")
        assert (refused.status_code, refused.json()["code"]) == (422, "invalid_request")


async def test_the_documented_drain_lets_a_run_queued_behind_finish() -> None:
    # Regression: the drain of docs/howto/shutdown.md waited for the runs there were when
    # it began. A run queued behind one of them (multitask_strategy "enqueue", the
    # default) starts as that one ends, under a new run; the drain returned then, and
    # the shutdown cancelled the queued run (cancelled, reason "shutdown") as it began,
    # with most of the deadline left.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, StateGraph

    from resumable_stream.langgraph_api import LangGraphRouter
    from tests.test_docs import code_block

    namespace: dict[str, Any] = {}
    exec(code_block("docs/howto/shutdown.md", "drain"), namespace)
    gates = {"a": asyncio.Event(), "b": asyncio.Event()}
    reached = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def step(state: _Counted) -> dict[str, Any]:
        last = state["n"][-1]
        reached[last].set()
        await gates[last].wait()
        return {"n": ["done"]}

    builder = StateGraph(_Counted)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    graph = builder.compile(checkpointer=InMemorySaver())
    api = LangGraphRouter(MemoryTransport(), {"agent": graph}, authorize=allow_all)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = asyncio.create_task(
            http.post(
                "/threads/t1/runs/wait", json={"assistant_id": "agent", "input": {"n": ["a"]}}
            )
        )
        await reached["a"].wait()
        body = {"assistant_id": "agent", "input": {"n": ["b"]}, "multitask_strategy": "enqueue"}
        queued = (await http.post("/threads/t1/runs", json=body)).json()
        [waiter] = [run for stream_id, run in api.producer.runs.items() if "~queued~" in stream_id]
        draining = asyncio.create_task(namespace["drain"](api.producer, within=30))
        await asyncio.sleep(0)  # the drain looks at the runs: the one held, and the queued
        gates["a"].set()
        await waiter.wait()  # the queued run started as a run of its own: its waiter ended
        await reached["b"].wait()
        run = f"/threads/t1/runs/{queued['run_id']}"
        assert (await http.get(run)).json()["status"] == "running"
        for _ in range(10):  # turns of the loop: what a drain that is over needs to return
            await asyncio.sleep(0)
        assert not draining.done()  # it waits for that run too
        gates["b"].set()
        await draining
        assert not api.producer.runs  # nothing left for the shutdown to cancel
        await first
        assert (await http.get(run)).json()["status"] == "success"
    await api.producer.aclose()


@pytest.mark.parametrize(
    ("extra", "saved"),
    [
        ({}, "every step"),
        ({"durability": "sync"}, "every step"),
        ({"durability": "exit"}, "the end"),
        ({"checkpoint_during": False}, "the end"),  # the SDKs' older name for "exit"
        ({"checkpoint_during": True}, "every step"),
    ],
)
async def test_a_runs_durability_reaches_the_graph(extra: dict[str, Any], saved: str) -> None:
    # Regression: `durability` (useStream's submit option, both SDKs' runs.*) and the
    # older `checkpoint_during` were ignored: a run asked to save only at its end wrote a
    # checkpoint at every step.
    async with lg_client() as (http, _, holds):
        holds.setdefault("t", asyncio.Event()).set()
        body = {"assistant_id": "agent", "input": {"messages": [("user", "hi")]}, **extra}
        answer = (await http.post("/threads/t/runs/wait", json=body)).json()
        assert answer["messages"][-1]["content"] == answer_text("hi")
        history = (await http.post("/threads/t/history", json={"limit": 100})).json()
        assert len(history) == (1 if saved == "the end" else 4), history


@pytest.mark.parametrize(
    "extra",
    [{"durability": "never"}, {"durability": 1}, {"checkpoint_during": "no"}],
)
async def test_a_durability_langgraph_does_not_have_is_refused(extra: dict[str, Any]) -> None:
    async with lg_client() as (http, api, _):
        body = {"assistant_id": "agent", "input": {"messages": []}, **extra}
        response = await http.post("/threads/t/runs/stream", json=body)
        assert (response.status_code, response.json()["code"]) == (422, "invalid_request")
        assert await api.transport.info(api.stream_id("t")) is None  # no run started


def subgraph_api() -> Any:
    """A LangGraphRouter whose graph runs node `first`, then subgraph `sub`, whose node `ask`
    interrupts with "your name?"; `log` gathers what each node adds."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, StateGraph
    from langgraph.types import interrupt

    from resumable_stream.langgraph_api import LangGraphRouter

    class State(TypedDict, total=False):
        log: Annotated[list[str], operator.add]

    def ask(state: State) -> dict[str, Any]:
        return {"log": [f"name: {interrupt('your name?')}"]}

    inner = StateGraph(State)
    inner.add_node("ask", ask)
    inner.add_edge(START, "ask")
    outer = StateGraph(State)
    outer.add_node("first", lambda state: {"log": ["first"]})
    outer.add_node("sub", inner.compile())
    outer.add_edge(START, "first")
    outer.add_edge("first", "sub")
    return LangGraphRouter(
        MemoryTransport(), {"agent": outer.compile(InMemorySaver())}, authorize=allow_all
    )


async def test_a_threads_state_at_a_checkpoint_and_with_its_subgraphs() -> None:
    # Regression: `threads.get_state` at a checkpoint (GET /threads/{id}/state/{checkpoint_id},
    # POST /threads/{id}/state/checkpoint) was `404 not_found` as an unknown path, and
    # `subgraphs=true` was ignored: an interrupt inside a subgraph showed no subgraph state.
    import httpx

    api = subgraph_api()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"log": ["in"]}}
        assert "__interrupt__" in (await http.post("/threads/t/runs/wait", json=body)).json()

        plain = (await http.get("/threads/t/state")).json()
        assert plain["next"] == ["sub"] and plain["tasks"][0]["state"] is None
        nested = (await http.get("/threads/t/state", params={"subgraphs": "true"})).json()
        [task] = nested["tasks"]
        assert task["name"] == "sub"
        assert task["state"]["next"] == ["ask"]
        assert task["state"]["tasks"][0]["interrupts"][0]["value"] == "your name?"
        assert task["checkpoint"]["checkpoint_ns"].startswith("sub:")
        # A task's checkpoint as the plain state gives it (its subgraph's namespace, no id)
        # names the subgraph's latest state, as in the Agent Server: it gave the thread's.
        inside = plain["tasks"][0]["checkpoint"]
        assert inside["checkpoint_ns"].startswith("sub:") and inside["checkpoint_id"] is None
        sub = await http.post("/threads/t/state/checkpoint", json={"checkpoint": inside})
        assert sub.status_code == 200, sub.text
        assert sub.json()["next"] == ["ask"] and sub.json() == task["state"]
        elsewhere = {"checkpoint": {"checkpoint_ns": "nope:1"}}
        nowhere = await http.post("/threads/t/state/checkpoint", json=elsewhere)
        assert (nowhere.status_code, nowhere.json()["code"]) == (404, "checkpoint_not_found")

        history = (await http.post("/threads/t/history", json={"limit": 100})).json()
        first = history[-1]["checkpoint"]  # the input's checkpoint
        by_id = await http.get(f"/threads/t/state/{first['checkpoint_id']}")
        assert by_id.status_code == 200, by_id.text
        assert by_id.json()["checkpoint"] == first and by_id.json()["next"] == ["__start__"]
        by_checkpoint = await http.post("/threads/t/state/checkpoint", json={"checkpoint": first})
        assert by_checkpoint.json() == by_id.json()

        missing = await http.get(f"/threads/t/state/{uuid.uuid4()}")
        assert (missing.status_code, missing.json()["code"]) == (404, "checkpoint_not_found")
        bad = await http.post("/threads/t/state/checkpoint", json={"checkpoint": "x"})
        assert (bad.status_code, bad.json()["code"]) == (422, "invalid_request")
    await api.producer.aclose()


@pytest.mark.parametrize("endpoint", ["runs/stream", "runs", "runs/wait"])
async def test_if_not_exists_creates_the_thread_in_the_app_or_refuses_a_run(endpoint: str) -> None:
    # Regression: `if_not_exists` was ignored. A run on a thread the app has no record of
    # (thread_info None: GET /threads/{id} is 404) ran, leaving state under a thread no one
    # recorded; with "create" (as the Agent Server creates the thread), create_thread was
    # never asked, so the thread stayed unknown to the app.
    from datetime import UTC, datetime

    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.requests import Request

    from resumable_stream.langgraph_api import LangGraphRouter, ThreadInfo

    records: dict[str, ThreadInfo] = {}
    created: list[tuple[str | None, dict[str, Any]]] = []

    async def thread_info(request: Request, thread_id: str) -> ThreadInfo | None:
        return records.get(thread_id)

    async def create_thread(request: Request, thread_id: str | None, metadata: Any) -> str:
        created.append((thread_id, metadata))
        thread_id = thread_id or str(uuid.uuid4())
        records[thread_id] = ThreadInfo(datetime.now(UTC), datetime.now(UTC))
        return thread_id

    holds = {"new": asyncio.Event(), "kept": asyncio.Event()}
    for hold in holds.values():
        hold.set()
    api = LangGraphRouter(
        MemoryTransport(),
        {"agent": build_graph(holds, InMemorySaver())},
        authorize=allow_all,
        create_thread=create_thread,
        thread_info=thread_info,
    )
    body = {"assistant_id": "agent", "input": {"messages": [("user", "hi")]}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        for given in ({}, {"if_not_exists": "reject"}):
            refused = await http.post(f"/threads/new/{endpoint}", json={**body, **given})
            assert (refused.status_code, refused.json()["code"]) == (404, "thread_not_found")
        assert await api.transport.info(api.stream_id("new")) is None  # no run started
        bad = await http.post(f"/threads/new/{endpoint}", json={**body, "if_not_exists": "yes"})
        assert (bad.status_code, bad.json()["code"]) == (422, "invalid_request")
        unknown = {"assistant_id": "nope", "if_not_exists": "create"}
        assert (await http.post(f"/threads/new/{endpoint}", json=unknown)).status_code == 404
        assert created == []

        response = await http.post(
            f"/threads/new/{endpoint}", json={**body, "if_not_exists": "create"}
        )
        assert response.status_code == 200, response.text
        assert created == [("new", {"graph_id": "agent", "assistant_id": "agent"})]
        assert (await http.get("/threads/new")).status_code == 200
        await eventually(lambda: _run_over(api, "new"))

        # A thread the app has: run as it is, not created again.
        await http.post("/threads", json={"thread_id": "kept"})
        created.clear()
        response = await http.post(
            f"/threads/kept/{endpoint}", json={**body, "if_not_exists": "create"}
        )
        assert response.status_code == 200, response.text
        assert created == []
        await eventually(lambda: _run_over(api, "kept"))
    await api.producer.aclose()


@pytest.mark.parametrize("metadata", ["tag", 5, ["k", "v"]])
async def test_metadata_that_is_no_object_is_422_not_dropped(metadata: Any) -> None:
    # Regression: POST /threads and a history filter took it as {} (a thread recorded
    # without the metadata sent, a history unfiltered).
    async with lg_client() as (http, _api, _):
        created = await http.post("/threads", json={"metadata": metadata})
        thread_id = (await http.post("/threads", json={"metadata": None})).json()["thread_id"]
        history = await http.post(f"/threads/{thread_id}/history", json={"metadata": metadata})
        for response in (created, history):
            assert (response.status_code, response.json()["code"]) == (422, "invalid_request")
            assert "'metadata' must be an object" in response.json()["message"]


async def test_a_thread_id_no_url_can_serve_is_refused_before_the_app_records_it() -> None:
    # Regression: POST /threads with such a thread_id, and a run with if_not_exists
    # "create" on one, called create_thread (the app recorded the thread), then answered
    # 400 invalid_stream_id: the app kept a thread the router can never serve.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver

    from resumable_stream.langgraph_api import LangGraphRouter, ThreadInfo

    made: list[str | None] = []

    async def create_thread(request: Any, thread_id: str | None, metadata: Any) -> str:
        made.append(thread_id)
        return thread_id or "new"

    async def thread_info(request: Any, thread_id: str) -> ThreadInfo | None:
        stamp = datetime.now(UTC)
        return ThreadInfo(stamp, stamp) if thread_id in made else None

    api = LangGraphRouter(
        MemoryTransport(),
        {"agent": build_graph({}, InMemorySaver())},
        authorize=allow_all,
        create_thread=create_thread,
        thread_info=thread_info,
    )
    run = {"assistant_id": "agent", "if_not_exists": "create", "input": {}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        for bad in ("a b", "x" * 500):
            response = await http.post("/threads", json={"thread_id": bad})
            assert (response.status_code, response.json()["code"]) == (400, "invalid_stream_id")
        response = await http.post("/threads/a%20b/runs", json=run)
        assert (response.status_code, response.json()["code"]) == (400, "invalid_stream_id")
        assert made == []
    await api.producer.aclose()


async def test_if_not_exists_create_on_a_thread_the_app_has_needs_no_create_right() -> None:
    # A caller who may run a thread but not create threads (authorize refuses "create")
    # runs an existing thread with if_not_exists "create": nothing is created, so nothing
    # asks for that right (it was asked first, and the run was 403).
    from datetime import UTC, datetime

    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.requests import Request

    from resumable_stream.langgraph_api import LangGraphAction, LangGraphRouter, ThreadInfo

    records = {"kept": ThreadInfo(datetime.now(UTC), datetime.now(UTC))}
    created: list[str | None] = []

    async def thread_info(request: Request, thread_id: str) -> ThreadInfo | None:
        return records.get(thread_id)

    async def create_thread(request: Request, thread_id: str | None, metadata: Any) -> str:
        created.append(thread_id)
        return thread_id or str(uuid.uuid4())

    def authorize(request: Request, thread_id: str | None, action: LangGraphAction) -> bool:
        return action != "create"

    hold = asyncio.Event()
    hold.set()
    api = LangGraphRouter(
        MemoryTransport(),
        {"agent": build_graph({"kept": hold, "new": hold}, InMemorySaver())},
        authorize=authorize,
        create_thread=create_thread,
        thread_info=thread_info,
    )
    body = {"assistant_id": "agent", "input": {"messages": [("user", "hi")]}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        response = await http.post("/threads/kept/runs", json={**body, "if_not_exists": "create"})
        assert response.status_code == 200, response.text
        await eventually(lambda: _run_over(api, "kept"))
        # A thread to make is still refused to the caller without the right.
        refused = await http.post("/threads/new/runs", json={**body, "if_not_exists": "create"})
        assert refused.status_code == 403, refused.text
        assert created == []
    await api.producer.aclose()


async def test_if_not_exists_create_without_thread_info_creates_nothing() -> None:
    # Without thread_info every thread id is a thread (docs/langgraph-sdk.md): a run with
    # if_not_exists "create" runs it, as one without does. create_thread was asked to make
    # the thread again at each such run.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.requests import Request

    from resumable_stream.langgraph_api import LangGraphRouter

    created: list[str | None] = []

    async def create_thread(request: Request, thread_id: str | None, metadata: Any) -> str:
        created.append(thread_id)
        return thread_id or str(uuid.uuid4())

    hold = asyncio.Event()
    hold.set()
    api = LangGraphRouter(
        MemoryTransport(),
        {"agent": build_graph({"t": hold}, InMemorySaver())},
        authorize=allow_all,
        create_thread=create_thread,
    )
    body = {"assistant_id": "agent", "input": {"messages": [("user", "hi")]}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        for _ in range(2):
            response = await http.post("/threads/t/runs", json={**body, "if_not_exists": "create"})
            assert response.status_code == 200, response.text
            await eventually(lambda: _run_over(api, "t"))
        assert created == []
    await api.producer.aclose()


async def _run_over(api: Any, thread_id: str) -> bool:
    info = await api.transport.info(api.stream_id(thread_id))
    return info is not None and info.status == "completed"


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("POST", "/assistants/search", 404, "not_found"),
        ("GET", "/assistants/agent", 404, "not_found"),
        ("GET", "/assistants/agent/graph", 404, "not_found"),
        ("GET", "/assistants/agent/schemas", 404, "not_found"),
        ("PATCH", "/threads/t/state", 405, "method_not_allowed"),  # threads.patch_state
        ("PATCH", "/threads/t", 501, "not_served"),  # threads.update, without update_thread
        ("POST", "/threads/prune", 405, "method_not_allowed"),
        # runs.delete: 405 not_served for a run of the thread (see test_runs_delete_is_405_...)
        ("DELETE", "/threads/t/runs/00000000-0000-0000-0000-000000000000", 404, "run_not_found"),
    ],
)
async def test_the_sdk_calls_not_served_are_json_errors(
    method: str, path: str, status: int, code: str
) -> None:
    # What docs/langgraph-sdk.md lists as not served answers as it says, and changes nothing.
    async with lg_client() as (http, _, _holds):
        response = await http.request(method, path, json={})
        assert (response.status_code, response.json()["code"]) == (status, code)


async def _answered(http: Any, holds: dict[str, asyncio.Event], thread_id: str, text: str) -> Any:
    """Run the agent on ``thread_id`` to its end (its model answers at once)."""
    holds.setdefault(thread_id, asyncio.Event()).set()
    body = {"assistant_id": "agent", "input": {"messages": [{"role": "user", "content": text}]}}
    response = await http.post(f"/threads/{thread_id}/runs/wait", json=body)
    assert response.status_code == 200, response.text
    return response


async def test_update_state_writes_a_checkpoint_with_the_threads_graph() -> None:
    # threads.update_state (POST /threads/{id}/state) was 405.
    async with lg_client() as (http, _api, holds):
        await _answered(http, holds, "u", "a")
        before = (await http.get("/threads/u/state")).json()
        edit = {"values": {"messages": [{"type": "human", "content": "edited"}]}}
        response = await http.post("/threads/u/state", json={**edit, "as_node": "agent"})
        assert response.status_code == 200, response.text
        checkpoint = response.json()["checkpoint"]
        state = (await http.get("/threads/u/state")).json()
        assert state["checkpoint"] == checkpoint
        assert state["parent_checkpoint"] == before["checkpoint"]
        assert [m["content"] for m in state["values"]["messages"]] == [
            "a",
            answer_text("a"),
            "edited",
        ]
        assert state["next"] == []  # as the agent: its edge to the end follows
        assert state["metadata"]["source"] == "update"
        assert state["metadata"]["graph_id"] == "agent"  # read with its graph after
        # At an earlier checkpoint (checkpoint_id, or checkpoint): a fork from there.
        for point in (
            {"checkpoint_id": before["checkpoint"]["checkpoint_id"]},
            {"checkpoint": before["checkpoint"]},
        ):
            response = await http.post("/threads/u/state", json={**edit, **point})
            assert response.status_code == 200, response.text
            forked = (await http.get("/threads/u/state")).json()
            assert forked["parent_checkpoint"] == before["checkpoint"]
            assert forked["checkpoint"] == response.json()["checkpoint"]
        missing = {"checkpoint_id": str(uuid.uuid4())}
        response = await http.post("/threads/u/state", json={**edit, **missing})
        assert (response.status_code, response.json()["code"]) == (404, "checkpoint_not_found")


@pytest.mark.parametrize(
    "body",
    [
        {"values": 5},
        {"values": "x"},
        {"values": {}, "as_node": 5},
        {"values": {}, "as_node": "nope"},  # LangGraph: no such node
        {"values": {}, "checkpoint_id": 5},
        {"values": {}, "checkpoint": "c1"},
        [],
        # Values the messages channel's reducer refuses (they were 500s).
        {"values": {"messages": [1]}},
        {"values": {"messages": [{"type": "human"}]}},
        {"values": {"messages": {"content": "x"}}},
    ],
)
async def test_update_state_refuses_a_body_langgraph_cannot_take(body: Any) -> None:
    async with lg_client() as (http, _api, holds):
        await _answered(http, holds, "u", "a")
        head = (await http.get("/threads/u/state")).json()["checkpoint"]
        response = await http.post("/threads/u/state", json=body)
        assert (response.status_code, response.json()["code"]) == (422, "invalid_request")
        assert (await http.get("/threads/u/state")).json()["checkpoint"] == head


async def test_update_state_refuses_values_a_reducer_refuses() -> None:
    # Regression: a value the channel's reducer raised on (operator.add of a list and a
    # number: TypeError) was a 500; it is the client's bad input, and writes nothing.
    import httpx

    api = subgraph_api()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        await http.post("/threads/t/runs/wait", json={"assistant_id": "agent", "input": {}})
        before = (await http.get("/threads/t/state")).json()
        for values in ({"log": 5}, {"log": {"a": 1}}):
            response = await http.post("/threads/t/state", json={"values": values})
            assert (response.status_code, response.json()["code"]) == (422, "invalid_request")
            assert "log" in response.json()["message"]
        after = (await http.get("/threads/t/state")).json()
        assert (after["checkpoint"], after["values"]) == (before["checkpoint"], before["values"])
    await api.producer.aclose()


async def test_update_state_is_refused_while_a_run_is_in_progress_or_queued() -> None:
    # The Agent Server refuses a state update while the thread has a run pending or
    # running (409): the run would write over it, or start from it unawares.
    async with lg_client() as (http, _api, holds):
        holds["u"] = asyncio.Event()
        body = {"assistant_id": "agent", "input": {"messages": [{"role": "user", "content": "b"}]}}
        await http.post("/threads/u/runs", json=body)
        queued = (await http.post("/threads/u/runs", json=body)).json()
        assert queued["status"] == "pending"
        edit = {"values": {"messages": [{"type": "human", "content": "edited"}]}}
        response = await http.post("/threads/u/state", json=edit)
        assert (response.status_code, response.json()["code"]) == (409, "thread_busy")
        holds["u"].set()
        await http.get(f"/threads/u/runs/{queued['run_id']}/join")
        assert (await http.post("/threads/u/state", json=edit)).status_code == 200
        messages = (await http.get("/threads/u/state")).json()["values"]["messages"]
        assert [m["content"] for m in messages][-1] == "edited"


async def test_a_run_asked_for_during_a_state_update_comes_after_it() -> None:
    # Regression: update_state checked that the thread was idle, then wrote; a run started
    # meanwhile (here, or in another process) ran alongside the write, from the state
    # before it, and its checkpoints went over the update.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver

    from resumable_stream.langgraph_api import LangGraphRouter

    writing, gate = asyncio.Event(), asyncio.Event()

    class SlowSaver(InMemorySaver):
        async def aput(self, config: Any, *args: Any, **kwargs: Any) -> Any:
            if not gate.is_set():
                writing.set()
                await gate.wait()  # the update's write, in a database's time
            return await super().aput(config, *args, **kwargs)

    released = asyncio.Event()
    released.set()
    gate.set()
    api = LangGraphRouter(
        MemoryTransport(), {"agent": build_graph({"u": released}, SlowSaver())}, authorize=allow_all
    )
    body = {"assistant_id": "agent", "input": {"messages": [{"role": "user", "content": "b"}]}}
    edit = {"values": {"messages": [{"type": "human", "content": "edited"}]}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        await http.post("/threads/u/runs/wait", json={**body, "input": {"messages": "a"}})
        gate.clear()
        updated = asyncio.ensure_future(http.post("/threads/u/state", json=edit))
        await writing.wait()
        refused = await http.post("/threads/u/runs", json={**body, "multitask_strategy": "reject"})
        assert (refused.status_code, refused.json()["code"]) == (409, "thread_busy")
        assert (await http.get("/threads/u")).json()["status"] == "busy"
        queued = (await http.post("/threads/u/runs", json=body)).json()
        assert queued["status"] == "pending"
        gate.set()
        assert (await updated).status_code == 200
        await http.get(f"/threads/u/runs/{queued['run_id']}/join")
        messages = (await http.get("/threads/u/state")).json()["values"]["messages"]
        assert [m["content"] for m in messages] == [
            "a",
            answer_text("a"),
            "edited",
            "b",
            answer_text("b"),
        ]
        # The update is no run: the thread lists its two runs only.
        runs = (await http.get("/threads/u/runs")).json()
        assert len(runs) == 2 and runs[0]["run_id"] == queued["run_id"]
    await api.producer.aclose()


class _UpdateFaults(MemoryTransport):
    """Memory storage that fails a state update's append of a ``seq`` in ``blips`` once (a
    connection reset), and acknowledges one in ``lost`` once without keeping it (a failover
    to a lagging replica)."""

    blips: list[int]
    lost: list[int]

    async def append(self, stream_id: str, owner: str, entry: Any, *args: Any) -> None:
        if owner.startswith("update-") and entry.seq in self.blips:
            self.blips.remove(entry.seq)
            raise TransportError("connection reset")
        if owner.startswith("update-") and entry.seq in self.lost:
            self.lost.remove(entry.seq)
            return
        await super().append(stream_id, owner, entry, *args)


@contextlib.asynccontextmanager
async def _updated_thread() -> AsyncIterator[tuple[_UpdateFaults, Any, httpx.AsyncClient]]:
    """A router on `_UpdateFaults` storage whose thread ``t1`` holds one finished run."""
    from resumable_stream.langgraph_api import LangGraphRouter

    storage = _UpdateFaults()
    storage.blips, storage.lost = [], []
    _api, graph, _reached, _hold = gated_router()
    api = LangGraphRouter(storage, {"agent": graph}, authorize=allow_all)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"n": ["a"]}}
        assert (await http.post("/threads/t1/runs/wait", json=body)).is_success
        yield storage, graph, http
    await api.producer.aclose()


@pytest.mark.parametrize("fails", ["its first entry", "its end"])
async def test_a_state_updates_hold_rides_out_a_storage_blip(fails: str) -> None:
    # Regression: the hold's own writes were not retried as a run's are. A blip on its end
    # answered 503 "retry later" for an update that was written (a retry wrote it twice)
    # and left the thread busy until the hold's lease lapsed; one on its first entry
    # answered 500 (the end, written after an entry that was not, was a StorageRollback)
    # and listed the hold as a run in progress.
    async with _updated_thread() as (storage, graph, http):
        storage.blips.append(1 if fails == "its first entry" else 2)
        response = await http.post("/threads/t1/state", json={"values": {"n": ["edited"]}})
        assert (response.status_code, storage.blips) == (200, []), response.text
        assert await _values(graph, "t1") == ["a", "done", "edited"]
        assert (await http.get("/threads/t1")).json()["status"] == "idle"
        assert [run["status"] for run in (await http.get("/threads/t1/runs")).json()] == ["success"]


async def test_a_state_updates_hold_ends_after_the_storage_lost_its_first_entry() -> None:
    # Regression: when the storage lost the hold's first entry after acknowledging it (a
    # failover to a lagging replica), its end was refused as a StorageRollback that was
    # only logged: the thread read busy, refusing runs, until the hold's lease lapsed.
    async with _updated_thread() as (storage, graph, http):
        storage.lost.append(1)
        response = await http.post("/threads/t1/state", json={"values": {"n": ["edited"]}})
        assert (response.status_code, storage.lost) == (200, []), response.text
        assert (await http.get("/threads/t1")).json()["status"] == "idle"
        body = {"assistant_id": "agent", "input": {"n": ["a"]}, "multitask_strategy": "reject"}
        assert (await http.post("/threads/t1/runs/wait", json=body)).is_success
        assert await _values(graph, "t1") == ["a", "done", "edited", "a", "done"]


async def test_update_state_is_a_write_authorized_as_run_and_needs_the_apps_thread() -> None:
    from langgraph.checkpoint.memory import InMemorySaver

    from resumable_stream.langgraph_api import LangGraphRouter, ThreadInfo

    asked: list[str] = []

    def authorize(request: Any, thread_id: str | None, action: str) -> bool:
        asked.append(action)
        return action != "run"

    async def thread_info(request: Any, thread_id: str) -> ThreadInfo | None:
        stamp = datetime.now(UTC)
        return ThreadInfo(stamp, stamp) if thread_id == "known" else None

    import httpx

    api = LangGraphRouter(
        MemoryTransport(),
        {"agent": build_graph({}, InMemorySaver())},
        authorize=authorize,
        thread_info=thread_info,
    )
    edit = {"values": {"messages": [{"type": "human", "content": "x"}]}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        refused = await http.post("/threads/known/state", json=edit)
        assert (refused.status_code, asked) == (403, ["run"])
        api.authorize = allow_all
        unknown = await http.post("/threads/unknown/state", json=edit)
        assert (unknown.status_code, unknown.json()["code"]) == (404, "thread_not_found")
        assert (await http.post("/threads/known/state", json=edit)).status_code == 200
        assert (await http.get("/threads/unknown/state")).json()["values"] == {}
    await api.producer.aclose()


async def test_update_state_at_a_tasks_checkpoint_writes_its_subgraphs_state() -> None:
    # Regression: a task's `checkpoint` as the plain state gives it (its subgraph's
    # checkpoint_ns, no id) was dropped, so the update went to the thread's own graph; the
    # Agent Server passes it to LangGraph, which writes on the subgraph's latest state.
    import httpx

    api = subgraph_api()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"log": ["in"]}}
        assert "__interrupt__" in (await http.post("/threads/t/runs/wait", json=body)).json()
        root = (await http.get("/threads/t/state")).json()
        inside = root["tasks"][0]["checkpoint"]
        assert inside["checkpoint_ns"].startswith("sub:") and inside["checkpoint_id"] is None
        edit = {"values": {"log": ["edited"]}, "checkpoint": inside}
        response = await http.post("/threads/t/state", json=edit)
        assert response.status_code == 200, response.text
        written = response.json()["checkpoint"]
        assert written["checkpoint_ns"] == inside["checkpoint_ns"]
        sub = (await http.post("/threads/t/state/checkpoint", json={"checkpoint": inside})).json()
        assert sub["values"]["log"][-1] == "edited" and sub["checkpoint"] == written
        after = (await http.get("/threads/t/state")).json()
        assert (after["values"], after["checkpoint"]) == (root["values"], root["checkpoint"])
        elsewhere = {"values": {"log": ["x"]}, "checkpoint": {"checkpoint_ns": "nope:1"}}
        nowhere = await http.post("/threads/t/state", json=elsewhere)
        assert (nowhere.status_code, nowhere.json()["code"]) == (404, "checkpoint_not_found")
    await api.producer.aclose()


async def test_update_state_keeps_the_thread_on_its_graph() -> None:
    # A thread run by the second graph is still read with it after a state update: the
    # update's checkpoint names the graph, as a run's do.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.types import interrupt

    from resumable_stream.langgraph_api import LangGraphRouter

    def ask(state: MessagesState) -> dict[str, Any]:
        return {"messages": [("ai", f"hi {interrupt('your name?')}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    saver = InMemorySaver()
    graphs = {"chat": build_graph({}, saver), "asker": builder.compile(saver)}
    api = LangGraphRouter(MemoryTransport(), graphs, authorize=allow_all)
    body = {"assistant_id": "asker", "input": {"messages": [{"role": "user", "content": "x"}]}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        await http.post("/threads/t/runs/wait", json=body)
        edit = {"values": {"messages": [{"type": "human", "content": "y"}]}, "as_node": "__start__"}
        assert (await http.post("/threads/t/state", json=edit)).status_code == 200
        state = (await http.get("/threads/t/state")).json()
        assert state["next"] == ["ask"]  # the asker's node: read with the asker
        assert state["metadata"]["graph_id"] == "asker"
        assert (await http.get("/threads/t")).json()["status"] == "interrupted"
    await api.producer.aclose()


async def test_delete_thread_removes_its_checkpoints_and_runs() -> None:
    # threads.delete (DELETE /threads/{id}) was 405.
    async with lg_client() as (http, api, holds):
        answered = await _answered(http, holds, "d", "a")
        run = answered.headers["content-location"]
        await _answered(http, holds, "kept", "k")
        response = await http.delete("/threads/d")
        assert (response.status_code, response.content) == (204, b"")
        state = (await http.get("/threads/d/state")).json()
        assert (state["values"], state["checkpoint"]["checkpoint_id"]) == ({}, None)
        assert (await http.post("/threads/d/history", json={})).json() == []
        assert (await http.get("/threads/d/runs")).json() == []
        assert (await http.get(run)).status_code == 404
        assert await api.transport.info(api.stream_id("d")) is None
        kept = (await http.get("/threads/kept/state")).json()["values"]["messages"]
        assert len(kept) == 2  # another thread keeps its own
        # The id is free again: a new run starts from nothing.
        await _answered(http, holds, "d", "b")
        messages = (await http.get("/threads/d/state")).json()["values"]["messages"]
        assert [m["content"] for m in messages] == ["b", answer_text("b")]


async def test_delete_thread_stops_its_run_in_progress_and_its_queued_runs() -> None:
    async with lg_client() as (http, api, holds):
        holds["d"] = asyncio.Event()
        body = {"assistant_id": "agent", "input": {"messages": [{"role": "user", "content": "b"}]}}
        await http.post("/threads/d/runs", json=body)
        queued = (await http.post("/threads/d/runs", json=body)).json()
        assert queued["status"] == "pending"
        await eventually(lambda: _has_messages(http, "d"))
        response = await http.delete("/threads/d")
        assert response.status_code == 204, response.text
        # The run and the queued one stopped.
        assert all(run.status != "running" for run in api.producer.runs.values())
        assert await api.transport.info(api.stream_id("d")) is None
        assert (await http.get("/threads/d/state")).json()["values"] == {}
        holds["d"].set()
        assert (await http.get(f"/threads/d/runs/{queued['run_id']}")).status_code == 404
        assert (await http.get("/threads/d/state")).json()["values"] == {}  # nothing started


async def test_a_run_queued_in_another_process_starts_after_the_delete() -> None:
    # Regression: a delete stopped the thread's run, then deleted its checkpoints and its
    # streams with the thread free meanwhile. A run queued in another process started as
    # the run stopped, from the checkpoints being deleted, and the delete of the thread's
    # stream then cut it (its client got no answer; a checkpoint it wrote could stay).
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver

    from resumable_stream.langgraph_api import LangGraphRouter

    deleting, gate = asyncio.Event(), asyncio.Event()

    class SlowSaver(InMemorySaver):
        async def adelete_thread(self, thread_id: str) -> None:
            deleting.set()
            await gate.wait()  # a database's delete takes its time
            await super().adelete_thread(thread_id)

    transport = MemoryTransport()
    holds = {"d": asyncio.Event()}
    graph = build_graph(holds, SlowSaver())
    here = LangGraphRouter(transport, {"agent": graph}, authorize=allow_all)
    there = LangGraphRouter(transport, {"agent": graph}, authorize=allow_all)

    def client(api: Any) -> Any:
        return httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t")

    body = {"assistant_id": "agent", "input": {"messages": [{"role": "user", "content": "a"}]}}
    queue = {"assistant_id": "agent", "input": {"messages": [{"role": "user", "content": "b"}]}}
    async with client(here) as http, client(there) as other:
        await http.post("/threads/d/runs", json=body)
        queued = (await other.post("/threads/d/runs", json=queue)).json()
        assert queued["status"] == "pending"
        await eventually(lambda: _has_messages(http, "d"))
        deleted = asyncio.ensure_future(http.delete("/threads/d"))
        await deleting.wait()

        async def held() -> bool:  # by the delete, or by the queued run (the bug)
            info = await transport.info(here.stream_id("d"))
            return info is not None and info.status == "running"

        await eventually(held)
        gate.set()
        assert (await deleted).status_code == 204
        holds["d"].set()
        joined = await other.get(f"/threads/d/runs/{queued['run_id']}/join")
        assert joined.status_code == 200, joined.text
        messages = (await http.get("/threads/d/state")).json()["values"]["messages"]
        assert [m["content"] for m in messages] == ["b", answer_text("b")]
    await here.producer.aclose()
    await there.producer.aclose()


async def test_the_delete_holds_the_thread_longer_than_a_lease() -> None:
    # Regression: the delete held the thread with a placeholder whose lease was never
    # renewed: a checkpoint delete longer than the lease (5 s by default) let a run start
    # on the thread mid-delete, from checkpoints being deleted.
    import time

    import httpx
    from langgraph.checkpoint.memory import InMemorySaver

    from resumable_stream.langgraph_api import LangGraphRouter

    deleting, gate = asyncio.Event(), asyncio.Event()

    class SlowSaver(InMemorySaver):
        async def adelete_thread(self, thread_id: str) -> None:
            deleting.set()
            await gate.wait()
            await super().adelete_thread(thread_id)

    transport = MemoryTransport()
    released = asyncio.Event()
    released.set()
    producer = StreamProducer(transport, lease=0.3)
    api = LangGraphRouter(
        transport,
        {"agent": build_graph({"d": released}, SlowSaver())},
        producer=producer,
        authorize=allow_all,
    )
    body = {"assistant_id": "agent", "input": {"messages": [{"role": "user", "content": "a"}]}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        await http.post("/threads/d/runs/wait", json=body)
        deleted = asyncio.ensure_future(http.delete("/threads/d"))
        await deleting.wait()
        lapsed_at = time.monotonic() + producer.lease
        await eventually(holds(lambda: time.monotonic() > lapsed_at))  # the lease is a clock
        refused = await http.post("/threads/d/runs", json={**body, "multitask_strategy": "reject"})
        assert (refused.status_code, refused.json()["code"]) == (409, "thread_busy")
        gate.set()
        assert (await deleted).status_code == 204
        assert (await http.get("/threads/d/state")).json()["values"] == {}
    await producer.aclose()


async def _has_messages(http: Any, thread_id: str) -> bool:
    state = (await http.get(f"/threads/{thread_id}/state")).json()
    return bool(state["values"].get("messages"))


async def test_delete_thread_is_authorized_as_delete_run_and_cancel() -> None:
    # "delete" is asked, and "run" and "cancel" too: an authorize written before "delete"
    # existed, letting anyone do what it does not know of, still lets only those who may
    # run and stop a thread delete it.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver

    from resumable_stream.langgraph_api import LangGraphRouter

    def authorize(request: Any, thread_id: str | None, action: str) -> bool:
        return action != "cancel" or request.headers.get("user") == "owner"

    released = asyncio.Event()
    released.set()
    api = LangGraphRouter(
        MemoryTransport(),
        {"agent": build_graph({"d": released}, InMemorySaver())},
        authorize=authorize,
    )
    body = {"assistant_id": "agent", "input": {"messages": [{"role": "user", "content": "a"}]}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        await http.post("/threads/d/runs/wait", json=body)
        refused = await http.delete("/threads/d", headers={"user": "someone"})
        assert (refused.status_code, refused.json()["code"]) == (403, "forbidden")
        assert (await http.get("/threads/d/state")).json()["values"]["messages"]
        api.authorize = lambda request, thread_id, action: action != "delete"
        assert (await http.delete("/threads/d")).status_code == 403
        assert (await http.get("/threads/d/state")).json()["values"]["messages"]
        assert (await http.delete("/threads/d", headers={"user": "owner"})).status_code == 403
        api.authorize = authorize
        assert (await http.delete("/threads/d", headers={"user": "owner"})).status_code == 204
    await api.producer.aclose()


async def test_delete_thread_tells_the_app_and_needs_its_record() -> None:
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from resumable_stream.langgraph_api import LangGraphRouter, ThreadInfo

    records = {"d": datetime.now(UTC)}
    deleted: list[str] = []

    async def thread_info(request: Any, thread_id: str) -> ThreadInfo | None:
        stamp = records.get(thread_id)
        return None if stamp is None else ThreadInfo(stamp, stamp)

    async def delete_thread(request: Any, thread_id: str) -> None:
        deleted.append(thread_id)
        del records[thread_id]

    released = asyncio.Event()
    released.set()
    graph = build_graph({"d": released}, InMemorySaver())
    api = LangGraphRouter(
        MemoryTransport(),
        {"agent": graph},
        authorize=allow_all,
        thread_info=thread_info,
        delete_thread=delete_thread,
    )
    body = {"assistant_id": "agent", "input": {"messages": [{"role": "user", "content": "a"}]}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        await http.post("/threads/d/runs/wait", json=body)
        assert (await http.delete("/threads/d")).status_code == 204
        assert deleted == ["d"]
        assert (await http.get("/threads/d")).status_code == 404
        gone = await http.delete("/threads/d")
        assert (gone.status_code, gone.json()["code"]) == (404, "thread_not_found")
        assert deleted == ["d"]
    await api.producer.aclose()
    # With the app's records and no delete_thread, the router cannot delete a thread: the
    # app would keep a record of a thread without its state.
    records["d"] = datetime.now(UTC)
    api = LangGraphRouter(
        MemoryTransport(), {"agent": graph}, authorize=allow_all, thread_info=thread_info
    )
    app = Starlette(routes=[Mount("/", api)])  # (its 405 is JSON in an app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        await http.post("/threads/d/runs/wait", json=body)
        response = await http.delete("/threads/d")
        assert (response.status_code, response.json()["code"]) == (405, "method_not_allowed")
        assert (await http.get("/threads/d/state")).json()["values"]["messages"]
    await api.producer.aclose()


async def test_the_router_served_as_the_app_answers_routing_errors_in_json() -> None:
    # Regression: with no Starlette app around it, its unknown paths and wrong methods were
    # Starlette's plain text ("Not Found"), not {code, message}.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver

    from resumable_stream.langgraph_api import LangGraphRouter

    graph = build_graph({}, InMemorySaver())
    router = LangGraphRouter(MemoryTransport(), {"agent": graph}, authorize=allow_all)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(router), base_url="http://t") as c:
        missing = await c.get("/nope")
        wrong = await c.put("/threads/t1")
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    assert (wrong.status_code, wrong.json()["code"]) == (405, "method_not_allowed")


def _records_router(**kw: Any) -> tuple[Any, Any, dict[str, Any]]:
    """A gated router (see gated_router) whose threads are the app's records: a dict of
    ThreadInfo that create_thread, thread_info and update_thread keep."""
    from tests._thread_records import ThreadRecords

    records = ThreadRecords()
    api, graph, _reached, _hold = gated_router(**records.hooks(), **kw)
    return api, graph, records


async def test_threads_update_merges_metadata_into_the_apps_record() -> None:
    # threads.update (PATCH /threads/{id}) was 405.
    import httpx

    api, _graph, records = _records_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        thread_id = (await http.post("/threads", json={"metadata": {"a": 1, "b": 2}})).json()[
            "thread_id"
        ]
        patched = await http.patch(f"/threads/{thread_id}", json={"metadata": {"b": 3, "c": 4}})
        assert patched.status_code == 200
        thread = patched.json()
        assert (thread["thread_id"], thread["metadata"]) == (thread_id, {"a": 1, "b": 3, "c": 4})
        assert thread["status"] == "idle"
        assert (await http.get(f"/threads/{thread_id}")).json()["metadata"] == thread["metadata"]
        # Prefer: return=minimal (the SDKs' return_minimal / returnMinimal): 204, no body.
        minimal = await http.patch(
            f"/threads/{thread_id}",
            json={"metadata": {"d": 5}},
            headers={"prefer": "return=minimal"},
        )
        assert (minimal.status_code, minimal.content) == (204, b"")
        assert records[thread_id].metadata == {"a": 1, "b": 3, "c": 4, "d": 5}
        refused = [
            (await http.patch(f"/threads/{thread_id}", json=body), code)
            for body, code in [
                ({"metadata": "x"}, "invalid_request"),
                ({"metadata": {"e": 1}, "ttl": {"ttl": 5, "strategy": "delete"}}, "ttl_not_served"),
            ]
        ]
        for response, code in refused:
            assert (response.status_code, response.json()["code"]) == (422, code)
        missing = await http.patch("/threads/nope", json={"metadata": {"e": 1}})
        assert (missing.status_code, missing.json()["code"]) == (404, "thread_not_found")
        assert records[thread_id].metadata == {"a": 1, "b": 3, "c": 4, "d": 5}
        # A write, as update_state: authorize is asked for "run".
        api.authorize = lambda request, thread_id, action: action != "run"
        forbidden = await http.patch(f"/threads/{thread_id}", json={"metadata": {"e": 1}})
        assert (forbidden.status_code, forbidden.json()["code"]) == (403, "forbidden")
    await api.producer.aclose()


async def test_threads_update_without_update_thread_is_501() -> None:
    import httpx

    from resumable_stream import ConfigurationError
    from resumable_stream.langgraph_api import LangGraphRouter

    api, graph, _reached, _hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        response = await http.patch("/threads/t1", json={"metadata": {"a": 1}})
        assert (response.status_code, response.json()["code"]) == (501, "not_served")
        assert "threads.update" in response.json()["message"]
    await api.producer.aclose()

    async def update_thread(request: Any, thread_id: str, metadata: Any) -> None:
        pass

    # Without thread_info nothing would read the metadata it keeps.
    with pytest.raises(ConfigurationError, match="thread_info"):
        LangGraphRouter(
            MemoryTransport(), {"agent": graph}, authorize=allow_all, update_thread=update_thread
        )


async def test_threads_count_counts_what_the_search_finds() -> None:
    # threads.count (POST /threads/count) was 405.
    import httpx

    api = await _users_threads()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        counted = await http.post("/threads/count", json={}, headers={"user": "alice"})
        assert (counted.status_code, counted.json()) == (200, 2)
        assert (await http.post("/threads/count", json={})).json() == 5
        bobs = await http.post("/threads/count", json={"metadata": {"team": "bob"}})
        assert bobs.json() == 3
        none = await http.post("/threads/count", json={"metadata": {"team": "carol"}})
        assert none.json() == 0
        for body, code in [
            ({"status": "idle"}, "search_not_served"),
            ({"values": {"n": ["x"]}}, "search_not_served"),
            ({"metadata": "x"}, "invalid_request"),
        ]:
            response = await http.post("/threads/count", json=body)
            assert (response.status_code, response.json()["code"]) == (422, code)
    await api.producer.aclose()


async def test_threads_count_pages_through_search_threads() -> None:
    import httpx

    from resumable_stream.langgraph_api import LangGraphRouter, ThreadSearch

    _api, graph, _reached, _hold = gated_router()
    ids = [f"t{i}" for i in range(2345)]
    asked: list[ThreadSearch] = []

    async def search_threads(request: Any, search: ThreadSearch) -> list[str]:
        asked.append(search)
        if request.headers.get("app") == "stuck":
            return ids[:1000]  # an app that ignores the offset
        if request.headers.get("app") == "twice":
            return ["t1", "t2", "t1"]  # an id twice in a page: one thread
        return ids[search.offset : search.offset + search.limit]

    def authorize(request: Any, thread_id: str | None, action: str) -> bool:
        return thread_id != "t7"

    api = LangGraphRouter(
        MemoryTransport(), {"agent": graph}, authorize=authorize, search_threads=search_threads
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        counted = await http.post("/threads/count", json={"metadata": {"k": "v"}})
        assert counted.json() == 2344  # t7 is not the caller's to read
        assert [(s.metadata, s.offset, s.limit) for s in asked] == [
            ({"k": "v"}, 0, 1000),
            ({"k": "v"}, 1000, 1000),
            ({"k": "v"}, 2000, 1000),
        ]
        stuck = await http.post("/threads/count", json={}, headers={"app": "stuck"})
        assert stuck.json() == 999
        twice = await http.post("/threads/count", json={}, headers={"app": "twice"})
        assert twice.json() == 2
    await api.producer.aclose()


async def test_threads_copy_makes_a_thread_with_the_same_checkpoints() -> None:
    # threads.copy (POST /threads/{id}/copy) was 404.
    import httpx

    api, graph, records = _records_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        source = (await http.post("/threads", json={"metadata": {"title": "T"}})).json()
        thread_id = source["thread_id"]
        for value in ["x", "ask"]:
            body = {"assistant_id": "agent", "input": {"n": [value]}}
            assert (await http.post(f"/threads/{thread_id}/runs/wait", json=body)).is_success
        copied = await http.post(f"/threads/{thread_id}/copy")
        assert copied.status_code == 200
        copy = copied.json()
        copy_id = copy["thread_id"]
        assert copy_id != thread_id
        assert copy_id in records  # made with create_thread, with the thread's metadata
        assert (copy["metadata"], copy["status"]) == ({"title": "T"}, "interrupted")
        assert copy["values"] == {"n": ["x", "done", "ask"]}

        async def history(thread: str) -> list[Any]:
            states = (await http.post(f"/threads/{thread}/history", json={"limit": 50})).json()
            return [(s["checkpoint"]["checkpoint_id"], s["values"], s["next"]) for s in states]

        assert await history(copy_id) == await history(thread_id)
        # The copy goes on by itself: resuming it leaves the thread as it was.
        resume = {"assistant_id": "agent", "command": {"resume": "r"}}
        assert (await http.post(f"/threads/{copy_id}/runs/wait", json=resume)).json() == {
            "n": ["x", "done", "ask", "r"]
        }
        assert await _values(graph, thread_id) == ["x", "done", "ask"]
        # The thread's runs are its own: the copy lists only its own.
        assert len((await http.get(f"/threads/{copy_id}/runs")).json()) == 1
        missing = await http.post("/threads/nope/copy")
        assert (missing.status_code, missing.json()["code"]) == (404, "thread_not_found")
        # "read" on the thread, and "create" for the new one.
        for refused in ("read", "create"):
            api.authorize = lambda request, thread, action, no=refused: action != no
            forbidden = await http.post(f"/threads/{thread_id}/copy")
            assert (forbidden.status_code, forbidden.json()["code"]) == (403, "forbidden")
        assert len(records) == 2
    await api.producer.aclose()


async def test_threads_copy_holds_one_checkpoint_at_a_time(tmp_path: Any) -> None:
    # Regression: threads.copy read every checkpoint of the thread, each with the thread's
    # values at that point, into a list before writing any: its memory grew with the square
    # of a conversation's length (13 MB here, for a thread whose state is 0.6 MB).
    import tracemalloc

    import httpx
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    posts, size = 12, 50_000
    api, graph, _reached, _hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        for post in range(posts):
            body = {"assistant_id": "agent", "input": {"n": [f"{post}" + "x" * size]}}
            assert (await http.post("/threads/t1/runs/wait", json=body)).is_success
        tracing = tracemalloc.is_tracing()
        if not tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        copied = await http.post("/threads/t1/copy")
        kept, peak = tracemalloc.get_traced_memory()
        if not tracing:
            tracemalloc.stop()
        assert copied.status_code == 200
        copy_id = copied.json()["thread_id"]
        assert await _values(graph, copy_id) == await _values(graph, "t1")
    # What the copy held at once, beyond what it kept: about one state of the thread.
    assert peak - kept < 2 * posts * size
    await api.producer.aclose()
    # A saver that holds its connection while it lists (AsyncSqliteSaver) copies too.
    async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "checkpoints.db")) as saver:
        api, graph, _reached, _hold = gated_router(saver=saver)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(api), base_url="http://t"
        ) as http:
            for word in ["a", "ask"]:
                body = {"assistant_id": "agent", "input": {"n": [word]}}
                assert (await http.post("/threads/t1/runs/wait", json=body)).is_success
            copy = (await http.post("/threads/t1/copy")).json()
            assert (copy["values"], copy["status"]) == ({"n": ["a", "done", "ask"]}, "interrupted")

            async def history(thread: str) -> list[Any]:
                states = await http.post(f"/threads/{thread}/history", json={"limit": 50})
                return [(s["checkpoint"]["checkpoint_id"], s["values"]) for s in states.json()]

            assert await history(copy["thread_id"]) == await history("t1")
        await api.producer.aclose()


async def test_threads_copy_without_create_thread_is_not_served_and_writes_nothing() -> None:
    # Regression: with thread_info and no create_thread (the docs' own example), the copy
    # went to a new UUID the app has no record of: every checkpoint of the thread was
    # written there, then the answer was `404 thread_not_found` (for a thread that exists)
    # and the copy stayed in the checkpointer, where no request could reach or delete it.
    import httpx

    from resumable_stream.langgraph_api import LangGraphRouter, ThreadInfo

    _api, graph, _reached, _hold = gated_router()
    now = datetime.now(UTC)

    async def thread_info(request: Any, thread_id: str) -> ThreadInfo | None:
        return ThreadInfo(now, now) if thread_id == "t1" else None

    api = LangGraphRouter(
        MemoryTransport(), {"agent": graph}, authorize=allow_all, thread_info=thread_info
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"n": ["x"]}}
        assert (await http.post("/threads/t1/runs/wait", json=body)).is_success
        response = await http.post("/threads/t1/copy")
        assert (response.status_code, response.json()["code"]) == (501, "not_served")
        assert "create_thread" in response.json()["message"]
        threads = {
            item.config["configurable"]["thread_id"]
            async for item in graph.checkpointer.alist(None)
        }
        assert threads == {"t1"}
    await api.producer.aclose()


async def test_threads_copy_of_a_thread_with_a_run_in_progress_is_409() -> None:
    import httpx

    api, graph, reached, hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        first = await _held_run(http, reached)
        busy = await http.post("/threads/t1/copy")
        assert (busy.status_code, busy.json()["code"]) == (409, "thread_busy")
        hold.set()
        await first
        copied = await http.post("/threads/t1/copy")
        assert copied.status_code == 200
        assert await _values(graph, copied.json()["thread_id"]) == ["wait", "done"]
    await api.producer.aclose()


@pytest.mark.parametrize("paused_in", ["alist", "aget_tuple"])
async def test_threads_copy_while_a_run_starts_is_409_and_copies_nothing(paused_in: str) -> None:
    # Regression: the copy looked for a run in progress only before it read the thread's
    # checkpoints. A run that started meanwhile was copied half-done: 200, and the copy
    # read "interrupted" at the run's next step, an interrupt no one made. The copy lists
    # the checkpoints (alist), then reads each as it writes it (aget_tuple).
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver

    reading, go_on = asyncio.Event(), asyncio.Event()

    class PausedSaver(InMemorySaver):
        paused = False

        async def pause(self, config: Any, method: str) -> None:
            thread_id = (config or {}).get("configurable", {}).get("thread_id")
            if self.paused and method == paused_in and thread_id == "t1":
                self.paused = False
                reading.set()
                await go_on.wait()

        async def alist(self, config: Any, **kwargs: Any) -> AsyncIterator[Any]:
            await self.pause(config, "alist")
            async for item in super().alist(config, **kwargs):
                yield item

        async def aget_tuple(self, config: Any) -> Any:
            await self.pause(config, "aget_tuple")
            return await super().aget_tuple(config)

    saver = PausedSaver()
    api, graph, reached, hold = gated_router(saver=saver)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"n": ["x"]}}
        assert (await http.post("/threads/t1/runs/wait", json=body)).is_success
        saver.paused = True
        copying = asyncio.create_task(http.post("/threads/t1/copy"))
        await reading.wait()  # the copy found the thread idle, and reads it now
        first = await _held_run(http, reached)
        go_on.set()
        busy = await copying
        assert (busy.status_code, busy.json()["code"]) == (409, "thread_busy")
        threads = {item.config["configurable"]["thread_id"] async for item in saver.alist(None)}
        assert threads == {"t1"}
        hold.set()
        await first
        copied = await http.post("/threads/t1/copy")
        assert copied.status_code == 200
        assert await _values(graph, copied.json()["thread_id"]) == ["x", "done", "wait", "done"]
    await api.producer.aclose()


async def test_threads_copy_that_fails_part_way_deletes_the_apps_record_of_it() -> None:
    # Regression: a copy whose checkpoint writes failed deleted the checkpoints it wrote but
    # not the record create_thread made: the app listed an empty thread it could not copy.
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver

    class FailingSaver(InMemorySaver):
        failing = False

        async def aput(self, config: Any, *args: Any, **kwargs: Any) -> Any:
            if self.failing and config["configurable"]["thread_id"] != "t1":
                raise OSError("disk full")
            return await super().aput(config, *args, **kwargs)

    deleted: list[str] = []
    saver = FailingSaver()
    api, _graph, records = _records_router(saver=saver)

    async def delete_thread(request: Any, thread_id: str) -> None:
        deleted.append(thread_id)
        del records[thread_id]

    api.delete_thread = delete_thread
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(api, raise_app_exceptions=False), base_url="http://t"
    ) as http:
        thread_id = (await http.post("/threads", json={"thread_id": "t1"})).json()["thread_id"]
        body = {"assistant_id": "agent", "input": {"n": ["x"]}}
        assert (await http.post(f"/threads/{thread_id}/runs/wait", json=body)).is_success
        saver.failing = True
        failed = await http.post(f"/threads/{thread_id}/copy")
        assert failed.status_code == 500
        assert len(deleted) == 1 and deleted[0] != thread_id
        assert list(records) == [thread_id]
        threads = {item.config["configurable"]["thread_id"] async for item in saver.alist(None)}
        assert threads == {thread_id}
    await api.producer.aclose()


async def test_runs_delete_is_405_not_served_not_a_routing_error() -> None:
    # runs.delete (DELETE /threads/{id}/runs/{run_id}) was a 405 routing error; the API
    # deletes the run's checkpoints with it, which no checkpointer here can do. 405, not
    # 501: the JS SDK retries a DELETE that is 501 (tests/clients/test_langgraph_sdk.py).
    import httpx

    api, _graph, _reached, _hold = gated_router()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"n": ["x"]}}
        ran = await http.post("/threads/t1/runs/wait", json=body)
        run = ran.headers["content-location"]
        response = await http.delete(run)
        assert (response.status_code, response.json()["code"]) == (405, "not_served")
        assert "runs.delete" in response.json()["message"]
        assert response.headers["allow"] == "GET"  # (a 405 names what is allowed)
        assert (await http.get(run)).status_code == 200
        missing = await http.delete(f"/threads/t1/runs/{uuid.uuid4()}")
        assert (missing.status_code, missing.json()["code"]) == (404, "run_not_found")
        api.authorize = lambda request, thread_id, action: action != "delete"
        forbidden = await http.delete(run)
        assert (forbidden.status_code, forbidden.json()["code"]) == (403, "forbidden")
    await api.producer.aclose()
