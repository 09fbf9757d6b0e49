"""numpy values in what a source yields: written as their values, never the end of a run.

(numpy is a test-only dependency of the dev extra; the library does not import it.)
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np
import orjson
from langchain_core.messages import AIMessageChunk

from resumable_stream import StreamProducer, Transport
from resumable_stream._events import normalize
from resumable_stream.langgraph_api import to_wire
from tests._helpers import collect, stored_from

#: What a retriever or a reranker puts in a tool's output or a graph's state.
VALUES: dict[str, Any] = {
    "score": np.float64(0.25),  # a float subclass: orjson refused it, and the run ended
    "scores": np.array([0.5, 1.0], dtype=np.float32),
    "best": np.float32(0.5),
    "rank": np.int64(3),
    "kept": np.bool_(True),
    "grid": np.arange(4).reshape(2, 2),
    "strided": np.arange(6)[::2],  # not contiguous: orjson does not write it itself
    "objects": np.array([{"k": 1}, None], dtype=object),
}
#: As JSON: the values, as lists of numbers.
WRITTEN = {
    "score": 0.25,
    "scores": [0.5, 1.0],
    "best": 0.5,
    "rank": 3,
    "kept": True,
    "grid": [[0, 1], [2, 3]],
    "strided": [0, 2, 4],
    "objects": [{"k": 1}, None],
}


async def test_numpy_values_in_events_are_written_as_their_values(transport: Transport) -> None:
    # Regression: a tool output holding a reranker's np.float64 score ended the whole answer
    # with a TypeError `error` (orjson refuses the float subclass); arrays were their repr.
    async def source():
        yield "found "
        yield {"type": "tool_end", "data": {"name": "search", "run_id": "r1", "output": VALUES}}
        yield {"type": "custom", "data": {"name": "hits", "data": VALUES}}
        yield "it"

    async with StreamProducer(transport) as producer:
        run = await producer.start(source())
        assert await run.wait() == "completed"
    events = await collect(transport, run.stream_id)
    assert [e.type for e in events] == ["token", "tool_end", "custom", "token", "end"]
    assert events[1].data["output"] == WRITTEN
    assert events[2].data["data"] == WRITTEN


def test_numpy_values_reach_the_langgraph_sdks_as_their_values() -> None:
    # The Agent Server writes them with orjson's OPT_SERIALIZE_NUMPY; to_wire wrote repr()s
    # (and an np.float64 as is, which the API's JSON answers then refused: a 500).
    assert orjson.loads(orjson.dumps(to_wire({"state": VALUES}))) == {"state": WRITTEN}


async def test_a_graph_state_holding_numpy_values_is_served_by_the_langgraph_router() -> None:
    import httpx
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, StateGraph

    from resumable_stream.langgraph_api import LangGraphRouter
    from resumable_stream.starlette import allow_all
    from resumable_stream.transports.memory import MemoryTransport

    class State(TypedDict, total=False):
        question: str
        hits: Any

    # (Arrays: LangGraph's checkpointer refuses numpy scalars and loses object arrays.)
    kept = ("scores", "grid", "strided")

    def rank(state: State) -> dict[str, Any]:
        return {"hits": {key: VALUES[key] for key in kept}}

    builder = StateGraph(State)
    builder.add_node("rank", rank)
    builder.add_edge(START, "rank")
    graph = builder.compile(checkpointer=InMemorySaver())
    api = LangGraphRouter(MemoryTransport(), {"agent": graph}, authorize=allow_all)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as http:
        body = {"assistant_id": "agent", "input": {"question": "q"}}
        waited = await http.post("/threads/t1/runs/wait", json=body)
        state = await http.get("/threads/t1/state")
    await api.producer.aclose()
    assert (waited.status_code, state.status_code) == (200, 200)
    assert waited.json()["hits"] == {key: WRITTEN[key] for key in kept}
    assert state.json()["values"]["hits"] == {key: WRITTEN[key] for key in kept}


async def test_messages_mode_shapes_holding_arrays_are_stored_as_normalize_reads_them() -> None:
    # Regression: messages_text() compared a namespace or a mode with == (`ns != ()`): a
    # numpy array there (a source's own shapes) raised "the truth value of an array is
    # ambiguous" and ended the run, where normalize() reads the item.
    agent = {"langgraph_node": "agent"}

    def chunk(text: str) -> AIMessageChunk:
        return AIMessageChunk(content=text, id="m1")

    items: list[Any] = [
        (chunk("Hello"), agent),
        {"type": "messages", "ns": np.array([]), "data": (chunk(" ns"), agent)},
        (np.array([]), "messages", (chunk(" namespace"), agent)),
        {"type": np.array(["messages", "x"]), "ns": (), "data": (chunk(" type"), agent)},
        ((), np.array(["messages", "x"]), (chunk(" mode"), agent)),
        (chunk(" last"), agent),
    ]

    stored = await stored_from(items)
    assert stored == [pair for one in items for pair in normalize(one)] + [("end", {})]
    kinds = ["token", "token", "custom", "update", "custom", "token", "end"]
    assert [kind for kind, _ in stored] == kinds
