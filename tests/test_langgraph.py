"""Real LangGraph graphs, driven by langchain-core's fake streaming chat models."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.callbacks import adispatch_custom_event
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, AnyMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import interrupt

from resumable_stream import Event, StreamProducer, Transport
from tests._helpers import collect

ANSWER = "Redis Streams keep every token, so a reader can resume from any offset."


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    steps: Annotated[list[str], operator.add]


@tool
def lookup(term: str) -> str:
    """Look a term up."""
    return f"{term}: an append-only log"


def chat_graph(model: Any) -> Any:
    async def agent(state: State) -> dict[str, Any]:
        writer = get_stream_writer()
        writer({"progress": "thinking"})
        await adispatch_custom_event("phase", {"name": "agent"})
        found = await lookup.ainvoke({"term": "stream"})
        reply = await model.ainvoke(state["messages"])
        return {"messages": [reply], "steps": [found]}

    builder = StateGraph(State)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    builder.add_edge("agent", END)
    return builder.compile()


def fake_model() -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(content=ANSWER, id="msg-1")]))


class BlockContentModel(GenericFakeChatModel):
    """Streams Anthropic-style content blocks instead of strings."""

    def _stream(
        self, messages: list[BaseMessage], *args: Any, **kwargs: Any
    ) -> Iterator[ChatGenerationChunk]:
        for word in ANSWER.split(" "):
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content=[{"type": "text", "text": word + " ", "index": 0}], id="msg-b"
                )
            )
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content=[{"type": "tool_use", "id": "t1", "name": "x", "input": {}}], id="msg-b"
            )
        )

    def _generate(self, *args: Any, **kwargs: Any) -> ChatResult:  # pragma: no cover
        raise NotImplementedError("streaming only")


INPUTS = {"messages": [("user", "What keeps tokens?")], "steps": []}


async def produce(transport: Transport, source: AsyncIterator[Any]) -> list[Event]:
    run = await StreamProducer(transport).start(source)
    events = await collect(transport, run.stream_id)
    assert await run.wait() == "completed"
    assert events[-1].type == "end"
    return events


def text(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.type == "token")


async def test_astream_events_v2(transport: Transport) -> None:
    events = await produce(transport, chat_graph(fake_model()).astream_events(INPUTS, version="v2"))
    assert text(events) == ANSWER
    tokens = [e for e in events if e.type == "token"]
    assert {(e.data["message_id"], e.data["node"]) for e in tokens} == {("msg-1", "agent")}
    (message,) = [e for e in events if e.type == "message"]
    assert message.data["message"]["role"] == "ai"
    assert message.data["message"]["text"] == ANSWER
    (start,) = [e for e in events if e.type == "tool_start"]
    (end,) = [e for e in events if e.type == "tool_end"]
    assert start.data["name"] == end.data["name"] == "lookup"
    assert start.data["input"] == {"term": "stream"}
    assert end.data["output"] == "stream: an append-only log"
    customs = [e.data for e in events if e.type == "custom"]
    assert {"name": "phase", "data": {"name": "agent"}, "node": "agent"} in customs


async def test_astream_messages_mode(transport: Transport) -> None:
    events = await produce(
        transport, chat_graph(fake_model()).astream(INPUTS, stream_mode="messages")
    )
    assert text(events) == ANSWER
    assert {e.data["node"] for e in events if e.type == "token"} == {"agent"}


async def test_astream_single_dict_mode(transport: Transport) -> None:
    # One mode alone streams bare dicts: "updates" and "values" look alike, so the mode is
    # unknown (None). Several modes, or version="v2", name it (see the next tests).
    source = chat_graph(fake_model()).astream(INPUTS, stream_mode="updates")
    (update,) = [e for e in await produce(transport, source) if e.type == "update"]
    assert (update.data["mode"], update.data["node"]) == (None, None)
    assert update.data["data"]["agent"]["messages"][0]["text"] == ANSWER


async def test_astream_values_and_custom_modes_together(transport: Transport) -> None:
    source = chat_graph(fake_model()).astream(INPUTS, stream_mode=["values", "custom", "messages"])
    events = await produce(transport, source)
    assert text(events) == ANSWER
    values = [e.data for e in events if e.type == "update"]
    assert [v["mode"] for v in values] == ["values", "values"]
    assert values[-1]["data"]["messages"][-1]["text"] == ANSWER
    assert {"data": {"progress": "thinking"}} in [e.data for e in events if e.type == "custom"]


async def test_astream_subgraphs(transport: Transport) -> None:
    inner = chat_graph(fake_model())
    outer = StateGraph(State)
    outer.add_node("inner", inner)
    outer.add_edge(START, "inner")
    outer.add_edge("inner", END)
    source = outer.compile().astream(INPUTS, stream_mode=["messages", "updates"], subgraphs=True)
    events = await produce(transport, source)
    assert text(events) == ANSWER
    tokens = [e for e in events if e.type == "token"]
    assert all(e.data["ns"][0].startswith("inner:") for e in tokens)
    assert {e.data["node"] for e in events if e.type == "update"} >= {"agent", "inner"}


async def test_astream_v2_stream_parts(transport: Transport) -> None:
    source = chat_graph(fake_model()).astream(
        INPUTS, stream_mode=["messages", "updates", "custom"], version="v2"
    )
    events = await produce(transport, source)
    assert text(events) == ANSWER
    assert [e.data["node"] for e in events if e.type == "update"] == ["agent"]
    assert {"data": {"progress": "thinking"}} in [e.data for e in events if e.type == "custom"]


class Approval(TypedDict):
    question: str
    answer: str


@dataclasses.dataclass
class TypedApproval:
    question: str = ""
    answer: str = ""


def approval_graph(state: type = Approval) -> Any:
    """A graph that stops at an interrupt() for a person's answer."""

    def ask(state: Any) -> dict[str, str]:
        question = state["question"] if isinstance(state, dict) else state.question
        return {"answer": interrupt({"question": question})}

    builder = StateGraph(state)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    return builder.compile(checkpointer=InMemorySaver())


@pytest.mark.parametrize("state", [Approval, TypedApproval])
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_an_interrupt_is_kept_in_values_mode(
    transport: Transport, version: str, state: type
) -> None:
    # With version="v2", LangGraph moves a "values" part's interrupts out of its data (for
    # a dataclass state, a dataclass): the stream showed the run ending with no sign that
    # it waits for input.
    config = {"configurable": {"thread_id": f"approval-{version}"}}
    source = approval_graph(state).astream(
        {"question": "approve?"}, config, stream_mode="values", version=version
    )
    events = await produce(transport, source)
    (paused,) = [e.data["data"] for e in events if "__interrupt__" in e.data.get("data", {})]
    assert [i["value"] for i in paused["__interrupt__"]] == [{"question": "approve?"}]
    assert events[-1].type == "end"


async def test_an_interrupt_is_kept_in_astream_events(transport: Transport) -> None:
    # It came only in the graph's own output (the root run's on_chain_stream), which is
    # dropped: the stream ended with no sign that the graph waits for input.
    config = {"configurable": {"thread_id": "approval-events"}}
    source = approval_graph().astream_events({"question": "approve?"}, config, version="v2")
    events = await produce(transport, source)
    updates = [e.data for e in events if e.type == "update"]
    assert [(u["mode"], u["node"]) for u in updates] == [("updates", "__interrupt__")]
    assert [i["value"] for i in updates[0]["data"]] == [{"question": "approve?"}]
    assert events[-1].type == "end"


@pytest.mark.parametrize("mode", ["events", "messages"])
async def test_content_blocks_stream_as_text(transport: Transport, mode: str) -> None:
    graph = chat_graph(BlockContentModel(messages=iter([])))
    if mode == "events":
        source = graph.astream_events(INPUTS, version="v2")
    else:
        source = graph.astream(INPUTS, stream_mode="messages")
    events = await produce(transport, source)
    assert text(events) == ANSWER + " "
