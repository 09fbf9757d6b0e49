"""Unit layer of resumable_stream.ai_sdk: chunks from real LangGraph streams, router errors.

The client tests (tests/clients/test_ai_sdk.py) run the real `ai` / `@ai-sdk/react`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    AnyMessage,
    BaseMessage,
    ToolMessage,
    UsageMetadata,
)
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.tools import InjectedToolCallId, ToolException, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import InjectedState, ToolNode
from langgraph.types import Command, interrupt
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from resumable_stream import Event, StreamConsumer, StreamProducer, from_url
from resumable_stream._exceptions import TransportError
from resumable_stream.ai_sdk import (
    ChatRequest,
    ChatRouter,
    ErrorPart,
    MessageMetadataPart,
    TokenUsage,
    UIMessageChunks,
    UIMessageStreamResponse,
    default_error_text,
)
from resumable_stream.starlette import allow_all
from resumable_stream.transports.memory import MemoryTransport
from tests._graphs import BookingModel, tool_loop
from tests._helpers import Later, dead_run, ended, eventually, holds
from tests._services import RedisServer, uvicorn_server

#: On every tool output the stream carries: the server ran that tool, not the browser.
SERVER_RAN = {"providerExecuted": True}


def check_order(chunks: list[dict[str, Any]]) -> None:
    """The ordering rules of ai's process-ui-message-stream.ts, as the client enforces them."""
    assert chunks[0]["type"] == "start"
    open_text: set[str] = set()
    calls: set[str] = set()
    outputs: list[str] = []
    for chunk in chunks[1:]:
        kind = chunk["type"]
        if kind in ("text-start", "reasoning-start"):
            open_text.add(chunk["id"])
        elif kind in ("text-delta", "reasoning-delta"):
            assert chunk["id"] in open_text, chunk
        elif kind in ("text-end", "reasoning-end"):
            open_text.remove(chunk["id"])
        elif kind in ("tool-input-start", "tool-input-available"):
            calls.add(chunk["toolCallId"])
        elif kind in ("tool-output-available", "tool-output-error", "tool-input-error"):
            assert chunk["toolCallId"] in calls, chunk
            outputs.append(chunk["toolCallId"])
    assert not open_text
    assert sorted(outputs) == sorted(calls)  # every call gets exactly one output
    assert len(outputs) == len(set(outputs))


@tool
def search(q: str) -> str:
    """Look q up."""
    return f"found {q}"


@tool
def failing_search(q: str) -> str:
    """Look q up, and fail as a tool that handles its errors does."""
    raise ToolException(f"nothing found for {q}")


failing_search.name = "search"
failing_search.handle_tool_error = True


class ToolCallingModel(BaseChatModel):
    """Calls `search` twice in parallel, then answers (without streaming)."""

    @property
    def _llm_type(self) -> str:
        return "tool-calling-test-model"

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        if isinstance(messages[-1], ToolMessage):
            message = AIMessage(content="both found", id="answer")
        else:
            calls = [
                {"id": "c1", "name": "search", "args": {"q": "x"}},
                {"id": "c2", "name": "search", "args": {"q": "y"}},
            ]
            message = AIMessage(content="", id="calls", tool_calls=calls)
        return ChatResult(generations=[ChatGeneration(message=message)])


def agent_graph(tools: list[Any] | None = None, checkpointer: Any = None) -> Any:
    return tool_loop(ToolCallingModel(), tools or [search], checkpointer)


class StreamingToolModel(BaseChatModel):
    """Streams as chat models do: text, then a call of `search` in tool_call_chunks (its
    arguments in fragments), then, given the tool's output, an answer."""

    @property
    def _llm_type(self) -> str:
        return "streaming-tool-test-model"

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        raise NotImplementedError("streams only")

    async def _astream(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        if isinstance(messages[-1], ToolMessage):
            for text in ("found ", "it"):
                yield ChatGenerationChunk(message=AIMessageChunk(content=text))
            return
        yield ChatGenerationChunk(message=AIMessageChunk(content="Let me look. "))
        pieces = [("call_1", "search", ""), (None, None, '{"q": '), (None, None, '"x"}')]
        for call_id, name, args in pieces:
            chunk = {"id": call_id, "name": name, "args": args, "index": 0}
            yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[chunk]))


def streaming_tool_graph(tools: bool = True) -> Any:
    """An agent on StreamingToolModel; without tools, the call is the browser's to run."""
    model = StreamingToolModel()

    async def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    def route(state: MessagesState) -> str:
        last = state["messages"][-1]
        return "tools" if tools and isinstance(last, AIMessage) and last.tool_calls else END

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([search]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route, ["tools", END])
    builder.add_edge("tools", "agent")
    return builder.compile()


#: How providers' LangChain integrations stream a model's reasoning, then its answer: the
#: chunks' (content, additional_kwargs).
REASONING_CHUNKS: dict[str, list[tuple[Any, dict[str, Any]]]] = {
    # langchain-core 1.x standard blocks (output_version="v1")
    "standard": [
        ([{"type": "reasoning", "reasoning": "Let me ", "index": 0}], {}),
        ([{"type": "reasoning", "reasoning": "think.", "index": 0}], {}),
        ([{"type": "text", "text": "Hello ", "index": 1}], {}),
        ([{"type": "text", "text": "there", "index": 1}], {}),
    ],
    # ChatAnthropic with thinking: its signature comes in a block of its own
    "anthropic": [
        ([{"type": "thinking", "thinking": "Let me ", "index": 0}], {}),
        ([{"type": "thinking", "thinking": "think.", "index": 0}], {}),
        ([{"type": "thinking", "signature": "c2ln", "index": 0}], {}),
        ([{"type": "text", "text": "Hello ", "index": 1}], {}),
        ([{"type": "text", "text": "there", "index": 1}], {}),
    ],
    # ChatOpenAI's Responses API: reasoning summaries, text blocks with annotations
    "responses": [
        ([{"type": "reasoning", "id": "rs_1", "summary": [], "index": 0}], {}),
        ([{"type": "reasoning", "summary": [{"index": 0, "text": "Let me "}], "index": 0}], {}),
        ([{"type": "reasoning", "summary": [{"index": 0, "text": "think."}], "index": 0}], {}),
        ([{"type": "text", "text": "Hello ", "annotations": [], "index": 1}], {}),
        ([{"type": "text", "text": "there", "annotations": [], "index": 1}], {}),
    ],
    # DeepSeek, Ollama, xAI, Groq, vLLM: reasoning_content beside an empty content
    "reasoning_content": [
        ("", {"reasoning_content": "Let me "}),
        ("", {"reasoning_content": "think."}),
        ("Hello ", {}),
        ("there", {}),
    ],
}


class ReasoningModel(BaseChatModel):
    """Reasons, then answers "Hello there", in one provider's shape (REASONING_CHUNKS);
    ``disable_streaming``: the whole message at once, as a model that does not stream."""

    shape: str

    @property
    def _llm_type(self) -> str:
        return "reasoning-test-model"

    def _chunks(self) -> list[AIMessageChunk]:
        return [
            AIMessageChunk(content=content, additional_kwargs=kwargs)
            for content, kwargs in REASONING_CHUNKS[self.shape]
        ]

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        whole = self._chunks()
        message = whole[0]
        for chunk in whole[1:]:
            message += chunk
        assert isinstance(message, AIMessageChunk)
        answer = AIMessage(content=message.content, additional_kwargs=message.additional_kwargs)
        return ChatResult(generations=[ChatGeneration(message=answer)])

    async def _astream(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        for chunk in self._chunks():
            yield ChatGenerationChunk(message=chunk)


def reasoning_graph(shape: str, stream: bool = True) -> Any:
    """A one-node graph whose model reasons, then answers."""
    model = ReasoningModel(shape=shape, disable_streaming=not stream)

    async def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    return builder.compile()


#: How providers' LangChain integrations end a streamed answer: the last chunks' (content,
#: response_metadata, tool_call_chunks), and the `finishReason` the client should get.
_CALL = {"id": "call_1", "name": "search", "args": '{"q": "x"}', "index": 0}
FINISHES: dict[str, tuple[list[tuple[Any, dict[str, Any], list[Any]]], str]] = {
    "openai-stop": ([("there", {}, []), ("", {"finish_reason": "stop"}, [])], "stop"),
    "openai-length": ([("there", {}, []), ("", {"finish_reason": "length"}, [])], "length"),
    "openai-tools": ([("", {}, [_CALL]), ("", {"finish_reason": "tool_calls"}, [])], "tool-calls"),
    "anthropic": ([("there", {}, []), ([], {"stop_reason": "max_tokens"}, [])], "length"),
    # Gemini: the last chunk holds text too; STOP with a tool call is a call
    "gemini-length": ([("there", {"finish_reason": "MAX_TOKENS"}, [])], "length"),
    "gemini-tools": ([("", {"finish_reason": "STOP"}, [_CALL])], "tool-calls"),
    "bedrock": (
        [("there", {}, []), ("", {"stopReason": "guardrail_intervened"}, [])],
        "content-filter",
    ),
    "responses": (
        [("there", {}, []), ("", {"incomplete_details": {"reason": "max_output_tokens"}}, [])],
        "length",
    ),
    "unknown": ([("there", {}, []), ("", {"finish_reason": "weird"}, [])], "other"),
}


class FinishingModel(BaseChatModel):
    """Says "Hello ", then ends as one provider does (FINISHES)."""

    shape: str

    @property
    def _llm_type(self) -> str:
        return "finishing-test-model"

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        raise NotImplementedError("streams only")

    async def _astream(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        yield ChatGenerationChunk(message=AIMessageChunk(content="Hello "))
        for content, metadata, calls in FINISHES[self.shape][0]:
            chunk = AIMessageChunk(
                content=content, response_metadata=metadata, tool_call_chunks=calls
            )
            yield ChatGenerationChunk(message=chunk)


def finishing_graph(shape: str) -> Any:
    """A one-node graph whose model answers and ends as FINISHES[shape] says (its tool calls
    are the browser's: nothing runs them)."""
    model = FinishingModel(shape=shape)

    async def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    return builder.compile()


async def stored_events(source: Any) -> list[Event]:
    transport = MemoryTransport()
    async with StreamProducer(transport) as producer:
        run = await producer.start(source)
        await run.wait()
    return [e async for e in StreamConsumer(transport, run.stream_id)]


@pytest.mark.parametrize("mode", ["messages", "events"])
async def test_a_chunk_of_reasoning_and_text_gives_the_reasoning_first(mode: str) -> None:
    both = [
        {"type": "thinking", "thinking": "Hmm.", "index": 0},
        {"type": "text", "text": "Hi", "index": 1},
    ]
    REASONING_CHUNKS["both"] = [(both, {})]
    try:
        graph = reasoning_graph("both")
        inputs = {"messages": [("user", "hi")]}
        if mode == "messages":
            source = graph.astream(inputs, stream_mode="messages")
        else:
            source = graph.astream_events(inputs, version="v2")
        events = await stored_events(source)
    finally:
        del REASONING_CHUNKS["both"]
    tokens = [e.data for e in events if e.type == "token"]
    assert [(t["reasoning"], t["text"]) for t in tokens] == [("Hmm.", "Hi")]
    chunker = UIMessageChunks("m")
    chunks = [c for e in events for c in chunker.chunks(e)]
    check_order(chunks)
    assert [c["type"] for c in chunks[2:-2]] == [
        "reasoning-start",
        "reasoning-delta",
        "reasoning-end",
        "text-start",
        "text-delta",
        "text-end",
    ]


async def test_a_tool_calling_graph_gives_every_call_its_output() -> None:
    inputs = {"messages": [("user", "look up x and y")]}
    events = await stored_events(agent_graph().astream_events(inputs, version="v2"))
    chunker = UIMessageChunks("msg-1")
    chunks = [c for e in events for c in chunker.chunks(e)]
    check_order(chunks)
    assert chunks[0] == {"type": "start", "messageId": "msg-1"}
    outputs = {c["toolCallId"]: c["output"] for c in chunks if c["type"] == "tool-output-available"}
    assert outputs == {"c1": "found x", "c2": "found y"}  # each output on its own call
    inputs_of = {c["toolCallId"]: c["input"] for c in chunks if c["type"] == "tool-input-available"}
    assert inputs_of == {"c1": {"q": "x"}, "c2": {"q": "y"}}
    text = "".join(c["delta"] for c in chunks if c["type"] == "text-delta")
    assert text == "both found"  # a model that does not stream: its text sent whole
    assert chunks[-1] == {"type": "finish", "finishReason": "stop"}


@tool("search")
def command_search(q: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> Command[Any]:
    """Look q up, and answer as a tool that updates the graph's state does: a Command."""
    status = "error" if q == "y" else "success"
    message = ToolMessage(f"found {q}", tool_call_id=tool_call_id, status=status)
    return Command(update={"messages": [message]})


@pytest.mark.parametrize("mode", ["messages", "events"])
async def test_a_tool_that_returns_a_command_shows_its_tool_message(mode: str) -> None:
    # Regression: with astream_events a tool's output is what it returned, and a tool that
    # updates the graph's state (handoffs, InjectedState tools) returns a Command: the UI
    # showed {graph, update, resume, goto} as the tool's output, and its ToolMessage of
    # status "error" as a success. In `messages` mode the ToolMessage itself came.
    graph = agent_graph([command_search])
    inputs = {"messages": [("user", "look up x and y")]}
    if mode == "messages":
        source = graph.astream(inputs, stream_mode="messages")
    else:
        source = graph.astream_events(inputs, version="v2")
    chunker = UIMessageChunks("m")
    chunks = [c for e in await stored_events(source) for c in chunker.chunks(e)]
    check_order(chunks)
    outputs = {c["toolCallId"]: c for c in chunks if c["type"].startswith("tool-output-")}
    assert outputs == {
        "c1": {
            "type": "tool-output-available",
            "toolCallId": "c1",
            "output": "found x",
            **SERVER_RAN,
        },
        "c2": {
            "type": "tool-output-error",
            "toolCallId": "c2",
            "errorText": "found y",
            **SERVER_RAN,
        },
    }


@tool("search")
def list_command_search(q: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> Command[Any]:
    """Look q up, answering with a Command whose update is a list of messages (a graph
    whose state is the list of messages: ToolNode takes no dict from its tools then)."""
    status = "error" if q == "y" else "success"
    return Command(update=[ToolMessage(f"found {q}", tool_call_id=tool_call_id, status=status)])


def list_state_graph() -> Any:
    """agent_graph on a state that is the list of messages itself."""
    model = ToolCallingModel()

    async def agent(state: list[AnyMessage]) -> list[AnyMessage]:
        return [await model.ainvoke(state)]

    def route(state: list[AnyMessage]) -> str:
        last = state[-1]
        return "tools" if isinstance(last, AIMessage) and last.tool_calls else END

    builder = StateGraph(Annotated[list[AnyMessage], add_messages])  # type: ignore[arg-type]
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([list_command_search]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route, ["tools", END])
    builder.add_edge("tools", "agent")
    return builder.compile()


@pytest.mark.parametrize("mode", ["messages", "events"])
async def test_a_command_whose_update_is_a_list_of_messages_shows_its_tool_message(
    mode: str,
) -> None:
    # Regression: with astream_events, a Command whose update is the messages themselves
    # (a ToolNode over a list-of-messages state) was taken for [(key, value), ...] pairs:
    # the UI showed {graph, update, resume, goto} as the output, and "error" as a success.
    inputs = [("user", "look up x and y")]
    if mode == "messages":
        source = list_state_graph().astream(inputs, stream_mode="messages")
    else:
        source = list_state_graph().astream_events(inputs, version="v2")
    chunker = UIMessageChunks("m")
    chunks = [c for e in await stored_events(source) for c in chunker.chunks(e)]
    check_order(chunks)
    outputs = {
        c["toolCallId"]: (c["type"], c.get("output", c.get("errorText")))
        for c in chunks
        if c["type"].startswith("tool-output-")
    }
    assert outputs == {
        "c1": ("tool-output-available", "found x"),
        "c2": ("tool-output-error", "found y"),
    }


class HandingOffModel(BaseChatModel):
    """A supervisor's model: hands over to the `math` agent; the agent's: ``answer``."""

    answer: str | None = None

    @property
    def _llm_type(self) -> str:
        return "handing-off-test-model"

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        if self.answer is not None:
            message = AIMessage(content=self.answer, id="math-answer")
        else:
            calls = [{"id": "h1", "name": "transfer_to_math", "args": {}}]
            message = AIMessage(content="", id="supervisor-calls", tool_calls=calls)
        return ChatResult(generations=[ChatGeneration(message=message)])


def handoff_graph(with_message: bool = True) -> Any:
    """A supervisor agent (a subgraph) whose tool hands over to the parent graph's `math`
    node with ``Command(graph=Command.PARENT, goto=...)``, as langgraph-supervisor's and
    langgraph-swarm's handoff tools do: with its ToolMessage in the update, or without."""

    @tool("transfer_to_math")
    def transfer(
        state: Annotated[dict[str, Any], InjectedState],
        tool_call_id: Annotated[str, InjectedToolCallId],
    ) -> Command[Any]:
        """Hand the conversation over to the math agent."""
        if not with_message:
            return Command(graph=Command.PARENT, goto="math")
        done = ToolMessage(
            "Transferred to math", name="transfer_to_math", tool_call_id=tool_call_id
        )
        update = {"messages": [*state["messages"], done]}
        return Command(graph=Command.PARENT, goto="math", update=update)

    math_model = HandingOffModel(answer="42")

    async def math(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await math_model.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    supervisor = tool_loop(HandingOffModel(), [transfer])
    builder.add_node("supervisor", supervisor, destinations=("math",))
    builder.add_node("math", math)
    builder.add_edge(START, "supervisor")
    builder.add_edge("math", END)
    return builder.compile()


def handoff_source(mode: str, with_message: bool = True) -> Any:
    inputs = {"messages": [("user", "what is 6 x 7?")]}
    graph = handoff_graph(with_message)
    if mode == "events":
        return graph.astream_events(inputs, version="v2")
    return graph.astream(inputs, stream_mode=["messages", "updates"], subgraphs=True)


@pytest.mark.parametrize("mode", ["messages", "events"])
async def test_a_handoff_to_the_parent_graph_shows_its_tool_message(mode: str) -> None:
    # Regression: a handoff (a tool's Command to the parent graph, as langgraph-supervisor's
    # and langgraph-swarm's) ends its node with an error, so `messages` mode never streams
    # its ToolMessage: the call stayed input-available, a browser's tool call (onToolCall)
    # for good. Its update (the `updates` mode) holds the ToolMessage.
    chunker = UIMessageChunks("m")
    events = await stored_events(handoff_source(mode))
    chunks = [c for e in events for c in chunker.chunks(e)]
    check_order(chunks)
    outputs = [c for c in chunks if c["type"].startswith("tool-output-")]
    assert outputs == [
        {
            "type": "tool-output-available",
            "toolCallId": "h1",
            "output": "Transferred to math",
            **SERVER_RAN,
        }
    ]
    kinds = [c["type"] for c in chunks]
    assert kinds.index("tool-output-available") < kinds.index("finish-step")  # a new step
    assert "".join(c["delta"] for c in chunks if c["type"] == "text-delta") == "42"


async def test_a_command_without_a_tool_message_shows_what_it_does() -> None:
    # Regression: with astream_events, a handoff whose Command holds no ToolMessage showed
    # {graph: "__parent__", update: null, resume: null, goto: "math"} as the tool's output.
    chunker = UIMessageChunks("m")
    events = await stored_events(handoff_source("events", with_message=False))
    chunks = [c for e in events for c in chunker.chunks(e)]
    check_order(chunks)
    outputs = [c.get("output") for c in chunks if c["type"].startswith("tool-output-")]
    assert outputs == [{"goto": "math"}]


def test_tool_messages_of_a_state_update_answer_only_this_answer_s_calls() -> None:
    # A values-mode update holds the whole history: its earlier answers' tool messages are
    # not this answer's calls, and a call answered already is not answered twice.
    old = {"role": "tool", "tool_call_id": "old", "content": "before", "text": "before"}
    new = {"role": "tool", "tool_call_id": "c1", "content": "now", "text": "now"}
    call = {"role": "ai", "id": "m1", "text": "", "tool_calls": [{"id": "c1", "name": "s"}]}
    values = {"mode": "values", "node": None, "data": {"messages": [old, call, new]}}
    events = [
        Event("message", {"message": call}, "1-1-0"),
        Event("update", values, "1-2-0"),
        Event("message", {"message": new}, "1-3-0"),
        Event("update", values, "1-4-0"),
        Event("end", {}, "1-5-0"),
    ]
    chunker = UIMessageChunks("m")
    chunks = [c for e in events for c in chunker.chunks(e)]
    check_order(chunks)
    outputs = [(c["toolCallId"], c["output"]) for c in chunks if c["type"].startswith("tool-out")]
    assert outputs == [("c1", "now")]


@pytest.mark.parametrize("modes", ["messages", ["messages", "updates"]])
async def test_a_streamed_tool_call_keeps_its_arguments_in_messages_mode(modes: Any) -> None:
    # Regression: in `messages` mode a model's tool call comes only as tool_call_chunks,
    # which gave no event: the call was announced by the tool's output alone, and the UI
    # showed its input as {} (with "updates" too: the encoder does not send updates).
    inputs = {"messages": [("user", "look x up")]}
    events = await stored_events(streaming_tool_graph().astream(inputs, stream_mode=modes))
    chunker = UIMessageChunks("m")
    chunks = [c for e in events for c in chunker.chunks(e)]
    check_order(chunks)
    tool_chunks = [c for c in chunks if c["type"].startswith("tool-")]
    assert [c["type"] for c in tool_chunks] == [
        "tool-input-start",
        *["tool-input-delta"] * 2,
        "tool-input-available",
        "tool-output-available",
    ]
    assert "".join(c["inputTextDelta"] for c in tool_chunks[1:3]) == '{"q": "x"}'
    assert tool_chunks[3]["input"] == {"q": "x"}
    assert tool_chunks[4]["output"] == "found x"
    text = [c["delta"] for c in chunks if c["type"] == "text-delta"]
    assert text == ["Let me look. ", "found ", "it"]


def subagent_events() -> list[Event]:
    """A prebuilt ReAct agent (a task per tool call) in `messages` mode: the model streams two
    calls; `search` answers at once, then `research`'s own model streams, then it answers."""

    def token(data: dict[str, Any]) -> Event:
        return Event("token", {"text": "", "message_id": "run-1", "node": "agent", **data}, "")

    def tool_message(call_id: str, name: str, text: str) -> Event:
        message = {"role": "tool", "tool_call_id": call_id, "name": name, "content": text}
        return Event("message", {"message": {**message, "text": text, "status": "success"}}, "")

    return [
        token(
            {"tool_call_chunks": [{"id": "a", "name": "search", "args": '{"q": "x"}', "index": 0}]}
        ),
        token({"tool_call_chunks": [{"id": "b", "name": "research", "args": "{", "index": 1}]}),
        token({"tool_call_chunks": [{"id": None, "name": None, "args": '"q": "y"}', "index": 1}]}),
        tool_message("a", "search", "found x"),
        Event("token", {"text": "deep dive", "message_id": "run-2", "node": "tools"}, ""),
        tool_message("b", "research", "deep dive"),
        Event("token", {"text": "Done", "message_id": "run-3", "node": "agent"}, ""),
        Event("end", {}, ""),
    ]


def parallel_subagent_events() -> list[Event]:
    """Two sub-agents run at once (`messages` mode): A's tool answers while B's model is
    half way through its call's arguments, then A's model speaks, then B's call ends."""

    def token(message_id: str, data: dict[str, Any]) -> Event:
        return Event("token", {"text": "", "message_id": message_id, "node": "agent", **data}, "")

    def piece(call_id: str | None, name: str | None, args: str, index: int = 0) -> Any:
        return {"tool_call_chunks": [{"id": call_id, "name": name, "args": args, "index": index}]}

    def tool_message(call_id: str, name: str, text: str) -> Event:
        message = {"role": "tool", "tool_call_id": call_id, "name": name, "content": text}
        return Event("message", {"message": {**message, "text": text, "status": "success"}}, "")

    return [
        token("run-1", piece("a", "research_a", '{"q": "x"}')),
        token("run-1", piece("b", "research_b", '{"q": "y"}', 1)),
        token("a-1", piece("s1", "lookup", '{"q": "x1"}')),
        token("b-1", piece("t1", "lookup", '{"q": ')),
        tool_message("s1", "lookup", "got x1"),
        token("a-2", {"text": "A done"}),
        token("b-1", piece(None, None, '"y1"}')),
        tool_message("t1", "lookup", "got y1"),
        token("b-2", {"text": "B done"}),
        tool_message("a", "research_a", "A done"),
        tool_message("b", "research_b", "B done"),
        token("run-2", {"text": "Done"}),
        Event("end", {}, ""),
    ]


def test_a_call_still_streaming_when_a_parallel_agent_begins_a_step_is_not_cut() -> None:
    # Regression: a new step settled every call still streaming, also one a parallel
    # agent was half way through: it ended as tool-input-error ("not valid JSON") with
    # its arguments cut, and the rest of them was dropped. It ends whole, in its step.
    chunker = UIMessageChunks("m")
    chunks = [c for e in parallel_subagent_events() for c in chunker.chunks(e)]
    check_order(chunks)
    assert not [c for c in chunks if c["type"] == "tool-input-error"]
    deltas = [
        c["inputTextDelta"] for c in chunks if c.get("toolCallId") == "t1" and "inputTextDelta" in c
    ]
    assert "".join(deltas) == '{"q": "y1"}'
    inputs = {c["toolCallId"]: c["input"] for c in chunks if c["type"] == "tool-input-available"}
    assert inputs["t1"] == {"q": "y1"}
    steps: list[set[str]] = []
    for chunk in chunks:
        if chunk["type"] == "start-step":
            steps.append(set())
        elif chunk["type"].startswith("tool-input-"):
            steps[-1].add(chunk["toolCallId"])
    assert sum("t1" in step for step in steps) == 1  # `ai` adds a part per step it is in


def test_a_call_its_model_cut_does_not_hold_the_step() -> None:
    # Its arguments are not JSON, but its model said why it stopped (max_tokens): nothing
    # more comes, so the model's next turn is a new step, the cut call ended in its own.
    def token(data: dict[str, Any]) -> Event:
        return Event("token", {"text": "", "message_id": "run-1", "node": "agent", **data}, "")

    whole = {"id": "a", "name": "search", "args": '{"q": "x"}', "index": 0}
    cut = {"id": "b", "name": "search", "args": '{"q": ', "index": 1}
    message = {"role": "tool", "tool_call_id": "a", "name": "search", "content": "found x"}
    events = [
        token({"tool_call_chunks": [whole, cut], "finish_reason": "length"}),
        Event("message", {"message": {**message, "text": "found x", "status": "success"}}, ""),
        Event("token", {"text": "Sorry", "message_id": "run-2", "node": "agent"}, ""),
        Event("end", {}, ""),
    ]
    chunker = UIMessageChunks("m")
    chunks = [c for e in events for c in chunker.chunks(e)]
    check_order(chunks)
    kinds = [c["type"] for c in chunks]
    assert (
        kinds.index("tool-input-error") < kinds.index("start-step", 2) < kinds.index("text-start")
    )


def test_a_streamed_call_ends_in_its_own_step_when_the_next_one_begins() -> None:
    # Regression: in `messages` mode a call the model streamed became available with its
    # output only. When another tool's output came first and a sub-agent's tokens began a
    # new step, its tool-input-available came in that step, where `ai` looks a call up:
    # useChat added a second part for it and left the first one streaming for ever.
    chunker = UIMessageChunks("m")
    chunks = [c for e in subagent_events() for c in chunker.chunks(e)]
    check_order(chunks)
    steps: list[list[str]] = []
    for chunk in chunks:
        if chunk["type"] == "start-step":
            steps.append([])
        elif "toolCallId" in chunk:
            steps[-1].append(f"{chunk['type']} {chunk['toolCallId']}")
    assert steps[0] == [
        "tool-input-start a",
        "tool-input-delta a",
        "tool-input-start b",
        "tool-input-delta b",
        "tool-input-delta b",
        "tool-input-available a",
        "tool-output-available a",
        "tool-input-available b",  # whole: the model's message ended before a tool ran
    ]
    assert steps[1] == ["tool-output-available b"]


async def test_a_streamed_call_of_a_browser_tool_is_available_at_the_end() -> None:
    # The browser runs it: nothing but the answer's end says the call is whole, and the
    # client calls onToolCall on tool-input-available only.
    inputs = {"messages": [("user", "look x up")]}
    source = streaming_tool_graph(tools=False).astream(inputs, stream_mode="messages")
    chunker = UIMessageChunks("m")
    chunks = [c for e in await stored_events(source) for c in chunker.chunks(e)]
    assert [c["type"] for c in chunks] == [
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-end",
        "tool-input-start",
        *["tool-input-delta"] * 2,
        "tool-input-available",  # no output: the browser's to give
        "finish-step",
        "finish",
    ]
    assert chunks[-3]["input"] == {"q": "x"}


def _half_a_call() -> Event:
    piece = {"id": "call_1", "name": "search", "args": '{"q": "x', "index": 0}
    data = {"text": "", "message_id": "m1", "node": "agent", "tool_call_chunks": [piece]}
    return Event("token", data, "1-1-0")


@pytest.mark.parametrize(
    "terminal",
    [
        Event("error", {"message": "boom"}, "1-2-0"),
        Event("cancelled", {"reason": "requested"}, "1-2-0"),
        Event("cancelled", {"reason": "shutdown"}, "1-2-0"),
    ],
)
def test_a_call_still_streaming_when_the_answer_fails_or_stops_is_closed(
    terminal: Event,
) -> None:
    # Regression: its part stayed in input-streaming (the UI showed the call as still
    # being made, forever). It ends as an error the server gives (providerExecuted): the
    # client must not run it, nor post the answer back for it.
    chunker = UIMessageChunks("m")
    chunks = [c for e in (_half_a_call(), terminal) for c in chunker.chunks(e)]
    check_order(chunks)
    closed = [c for c in chunks if c["type"] == "tool-input-error"]
    assert closed == [
        {
            "type": "tool-input-error",
            "toolCallId": "call_1",
            "toolName": "search",
            "input": '{"q": "x',
            "errorText": "the answer ended before this call was complete",
            "providerExecuted": True,
        }
    ]
    assert chunks[-1]["type"] in ("error", "abort")


async def tools_running_when_the_answer_ends(outcome: str) -> list[Event]:
    """The stored events of agent_graph's answer (astream_events) that ``outcome`` ends
    while its two searches run: ``stop`` (the run is cancelled) or ``error`` (the search for
    y fails, and LangGraph cancels the other)."""
    both_started = asyncio.Event()

    @tool("search")
    async def slow_search(q: str) -> str:
        """Look q up, until the answer ends."""
        if q == "y" and outcome == "error":
            await both_started.wait()
            raise RuntimeError("the index is down")
        await asyncio.Event().wait()  # cancelled with the answer
        raise AssertionError("not reached")

    transport = MemoryTransport()
    async with StreamProducer(transport) as producer:
        inputs = {"messages": [("user", "look up x and y")]}
        run = await producer.start(agent_graph([slow_search]).astream_events(inputs, version="v2"))
        events: list[Event] = []
        async for event in StreamConsumer(transport, run.stream_id):
            events.append(event)
            if event.type == "tool_start" and [e.type for e in events].count("tool_start") == 2:
                if outcome == "stop":
                    assert await producer.cancel(run.stream_id)
                else:
                    both_started.set()
    assert events[-1].type == ("cancelled" if outcome == "stop" else "error")
    return events


@pytest.mark.parametrize("outcome", ["stop", "error"])
async def test_a_tool_still_running_when_the_answer_stops_or_fails_ends_failed(
    outcome: str,
) -> None:
    # Regression: its call stayed input-available (the UI showed the tool running, for good,
    # and took it for a browser's call it waits on). The stream ends its run: an error the
    # server gives (providerExecuted), which the client neither runs nor posts back.
    events = await tools_running_when_the_answer_ends(outcome)
    chunker = UIMessageChunks("m")
    chunks = [c for e in events for c in chunker.chunks(e)]
    check_order(chunks)
    ended = {c["toolCallId"]: c for c in chunks if c["type"].startswith("tool-output-")}
    unfinished = {
        "type": "tool-output-error",
        "toolCallId": "c1",
        "errorText": "the answer ended before this tool finished",
        **SERVER_RAN,
    }
    if outcome == "stop":
        assert ended == {"c1": unfinished, "c2": {**unfinished, "toolCallId": "c2"}}
        assert chunks[-1] == {"type": "abort", "reason": "requested"}
    else:
        assert ended["c1"] == unfinished
        # Its own error, whose message stays on the server by default (error_text).
        assert ended["c2"]["errorText"] == "An error occurred."
        assert chunks[-1]["type"] == "error"
    # A replay (a new encoder over the stored events) ends them the same.
    again = UIMessageChunks("m")
    assert [c for e in events for c in again.chunks(e)] == chunks


def test_a_streamed_call_whose_arguments_are_not_json_is_an_error_at_the_end() -> None:
    # Regression: a call cut short (the model's max_tokens) or malformed came as input
    # its raw text, and a browser's tool ran with a string for its arguments. LangChain
    # takes it for an invalid call (ToolNode does not run it): the client gets it as one.
    chunker = UIMessageChunks("m")
    events = [_half_a_call(), Event("end", {}, "1-2-0")]
    chunks = [c for e in events for c in chunker.chunks(e)]
    check_order(chunks)
    assert [c for c in chunks if c["type"].startswith("tool-input-") and "input" in c] == [
        {
            "type": "tool-input-error",
            "toolCallId": "call_1",
            "toolName": "search",
            "input": '{"q": "x',
            "errorText": "the model's arguments for this call are not valid JSON",
            "providerExecuted": True,
        }
    ]
    assert chunks[-1] == {"type": "finish", "finishReason": "stop"}


async def test_tool_runs_without_a_model_message_keep_their_own_call() -> None:
    async def source() -> AsyncIterator[Any]:
        output = {"role": "tool", "tool_call_id": "c9", "content": "ok"}
        yield {"type": "tool_start", "data": {"name": "t", "run_id": "r1", "input": {"a": 1}}}
        yield {"type": "tool_end", "data": {"name": "t", "run_id": "r1", "output": output}}
        yield {"type": "tool_start", "data": {"name": "t", "run_id": "r2", "input": {}}}
        yield {"type": "tool_end", "data": {"name": "t", "run_id": "r2", "error": "boom"}}

    chunker = UIMessageChunks()
    chunks = [c for e in await stored_events(source()) for c in chunker.chunks(e)]
    check_order(chunks)
    ends = [c for c in chunks if c["type"].startswith("tool-output")]
    assert ends == [
        {"type": "tool-output-available", "toolCallId": "r1", "output": "ok", **SERVER_RAN},
        {
            "type": "tool-output-error",
            "toolCallId": "r2",
            "errorText": "An error occurred.",  # the tool's message stays on the server
            **SERVER_RAN,
        },
    ]


@pytest.mark.parametrize(
    ("terminal", "chunk"),
    [
        (Event("end", {}, "1-2-0"), {"type": "finish", "finishReason": "stop"}),
        (
            # A source's exception: its message stays on the server (as the AI SDK's).
            Event("error", {"error": "X", "message": "bad"}, "1-2-0"),
            {"type": "error", "errorText": "An error occurred."},
        ),
        (
            # The library's own error: its own words.
            Event("error", {"error": "producer_lost", "message": "no heartbeats"}, "1-2-0"),
            {"type": "error", "errorText": "no heartbeats"},
        ),
        (
            Event("cancelled", {"reason": "requested"}, "1-2-0"),
            {"type": "abort", "reason": "requested"},
        ),
        (
            # Cut by the server, not stopped: an error, or the client shows it as whole.
            Event("cancelled", {"reason": "shutdown"}, "1-2-0"),
            {
                "type": "error",
                "errorText": "the answer was cut short: the server shut down before it "
                "finished; send the message again",
            },
        ),
        (
            # Regression: a run whose task was cancelled in its process (no cancel asked
            # for, no shutdown) ended with an abort, which `ai` shows as a whole answer.
            Event("cancelled", {"reason": "stopped"}, "1-2-0"),
            {
                "type": "error",
                "errorText": "the answer was cut short: its run was stopped before it "
                "finished; send the message again",
            },
        ),
    ],
)
def test_terminal_events_close_the_text_and_end_with_done(
    terminal: Event, chunk: dict[str, Any]
) -> None:
    chunker = UIMessageChunks("m")
    token = Event("token", {"text": "hi", "message_id": "a", "node": None}, "1-1-0")
    first = [c["type"] for c in chunker.chunks(token)]
    assert first == ["start", "start-step", "text-start", "text-delta"]
    body = chunker.encode(terminal)
    blocks = body.split(b"\n\n")
    assert orjson.loads(blocks[0].removeprefix(b"data: ")) == {"type": "text-end", "id": "text-1"}
    if terminal.type == "end":  # an answer that ends finishes its step
        assert orjson.loads(blocks.pop(1).removeprefix(b"data: ")) == {"type": "finish-step"}
    assert orjson.loads(blocks[1].removeprefix(b"data: ")) == chunk
    assert blocks[2] == b"data: [DONE]"
    assert chunker.chunks(token) == []  # nothing after the end


@pytest.mark.parametrize(
    "data",
    [
        {"text": "hi", "message_id": ["m", 1], "node": None},
        {"message": {"role": "ai", "id": {"a": 1}, "text": "hi"}},
        {"message": {"role": "ai", "id": "m1", "text": ["not", "text"]}},
        {"message": {"role": "ai", "id": "m1", "text": "", "tool_calls": ["x", 3]}},
        {"message": {"role": "ai", "id": "m1", "text": "", "tool_calls": "calc"}},
    ],
)
def test_odd_values_in_an_apps_own_events_do_not_cut_the_stream(data: dict[str, Any]) -> None:
    # Regression: an app may write any JSON in its own `token` and `message` events (the
    # producer stores them as they are); an unhashable message id or tool calls that are
    # not objects raised in the encoder, and every read of the chat ended mid-stream.
    kind = "token" if "text" in data else "message"
    chunker = UIMessageChunks("m")
    chunks = chunker.chunks(Event(kind, data, "1-1-0"))
    chunks += chunker.chunks(Event("token", {"text": "bye", "message_id": "z"}, "1-2-0"))
    chunks += chunker.chunks(Event("end", {}, "1-3-0"))
    assert all(isinstance(c.get("delta", ""), str) for c in chunks)
    assert not any(c["type"].startswith("tool-") for c in chunks)
    assert chunks[-1] == {"type": "finish", "finishReason": "stop"}
    assert [c for c in chunks if c["type"] == "text-delta"][-1]["delta"] == "bye"


def test_custom_events_become_data_parts() -> None:
    chunker = UIMessageChunks(start=False)
    event = Event("custom", {"name": "progress bar!", "data": {"p": 1}}, "1-1-0")
    assert chunker.chunks(event) == [{"type": "data-progress-bar-", "data": {"p": 1}}]
    assert chunker.chunks(Event("custom", {"data": 3}, "1-1-1")) == [
        {"type": "data-custom", "data": 3}
    ]
    # A reserved run's own markers are not the app's data: no data part for them.
    reserved = Event("custom", {"name": "resumable_stream.reserved", "data": {}}, "1-1-2")
    assert chunker.chunks(reserved) == []


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        async def tokens() -> AsyncIterator[str]:
            yield chat.text.upper()

        return tokens()

    router = ChatRouter(MemoryTransport(), answer, authorize=allow_all)
    app = Starlette(routes=router.routes)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        yield c
    await router.producer.aclose()


async def test_router_refuses_bad_bodies_with_json_errors(http: httpx.AsyncClient) -> None:
    bodies = (b"nope", b"[]", b'{"messages": []}', b'{"id": "c", "messages": 1}')
    for body in (*bodies, b'{"id": "c", "messages": ["\\ud83d" x]}'):  # (not JSON either)
        response = await http.post(
            "/api/chat", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        assert response.json()["code"] == "invalid_request"
    response = await http.post("/api/chat", json={"id": "bad id!", "messages": []})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_stream_id"


@pytest.mark.parametrize("served", ["mounted", "as the app"])
async def test_the_router_answers_routing_errors_in_json(served: str) -> None:
    # Regressions: mounted in an app, its unknown paths and wrong methods were plain text;
    # served as the app itself (no Starlette app around it), they still were.
    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        async def tokens() -> AsyncIterator[str]:
            yield "x"

        return tokens()

    router = ChatRouter(MemoryTransport(), answer, authorize=allow_all)
    app: ASGIApp = Starlette(routes=[Mount("/ai", router)]) if served == "mounted" else router
    prefix = "/ai" if served == "mounted" else ""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        missing = await c.get(f"{prefix}/api/nope")
        wrong = await c.get(f"{prefix}/api/chat")
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    assert (wrong.status_code, wrong.json()["code"]) == (405, "method_not_allowed")
    await router.producer.aclose()


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_its_routes_in_an_app_answer_a_wrong_method_in_json(framework: str) -> None:
    # Regression: with its routes added to the app (as docs/ai-sdk.md shows), a wrong method
    # (an OPTIONS preflight, a GET of the send path) got the app's 405: plain text in
    # Starlette, {"detail"} in FastAPI.
    from fastapi import FastAPI

    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        async def tokens() -> AsyncIterator[str]:
            yield "x"

        return tokens()

    router = ChatRouter(MemoryTransport(), answer, authorize=allow_all)
    app: Starlette = Starlette(routes=router.routes) if framework == "starlette" else FastAPI()
    if framework == "fastapi":
        app.router.routes.extend(router.routes)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        for method, path, allowed in [
            ("GET", "/api/chat", "POST"),
            ("OPTIONS", "/api/chat", "POST"),
            ("POST", "/api/chat/abc/stream", "GET, HEAD"),
            ("GET", "/api/chat/abc/stop", "POST"),
        ]:
            wrong = await c.request(method, path)
            assert wrong.status_code == 405
            assert wrong.json() == {"code": "method_not_allowed", "message": "Method Not Allowed"}
            assert sorted(wrong.headers["allow"].split(", ")) == sorted(allowed.split(", "))
        assert (await c.get("/api/chat/abc/stream")).status_code == 204  # the right method
    await router.producer.aclose()


async def test_router_resume_is_204_without_an_answer_and_stop_is_409(
    http: httpx.AsyncClient,
) -> None:
    assert (await http.get("/api/chat/abcdefghijklmnop/stream")).status_code == 204
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hey"}]}
    response = await http.post("/api/chat", json={"id": "abcdefghijklmnop", "messages": [message]})
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    lines = [line for line in response.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    deltas = [orjson.loads(line[6:]) for line in lines[:-1]]
    assert [d["delta"] for d in deltas if d["type"] == "text-delta"] == ["HEY"]
    assert (await http.get("/api/chat/abcdefghijklmnop/stream")).status_code == 204  # over
    stop = await http.post("/api/chat/abcdefghijklmnop/stop")
    assert stop.status_code == 409
    assert stop.json()["code"] == "stream_not_running"


async def test_router_stop_of_an_answer_whose_producer_died_is_409() -> None:
    # Regression: stop answered 202 for an answer whose process was killed (its lease
    # lapsed), which would never write its end: it is ended as producer_lost instead.
    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        raise AssertionError("no answer is asked for")

    transport = MemoryTransport()
    router = ChatRouter(transport, answer, authorize=allow_all)
    await dead_run(transport, "chat-dead")
    app = Starlette(routes=router.routes)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        stop = await c.post("/api/chat/chat-dead/stop")
    assert (stop.status_code, stop.json()["code"]) == (409, "stream_not_running")
    assert (await transport.info("chat-dead")).status == "error"  # type: ignore[union-attr]
    await router.producer.aclose()


def test_app_events_naming_the_call_and_its_args() -> None:
    # The reference chat service writes tool_start {id, name, args} (and may add tool_end).
    chunker = UIMessageChunks(start=False)
    start = Event("tool_start", {"id": "c1", "name": "calc", "args": {"x": 2}}, "1-1-0")
    end = Event("tool_end", {"id": "c1", "name": "calc", "output": 4}, "1-1-1")
    assert chunker.chunks(start) + chunker.chunks(end) == [
        {"type": "tool-input-start", "toolCallId": "c1", "toolName": "calc"},
        {"type": "tool-input-available", "toolCallId": "c1", "toolName": "calc", "input": {"x": 2}},
        {"type": "tool-output-available", "toolCallId": "c1", "output": 4, **SERVER_RAN},
    ]


async def test_each_message_is_a_new_run_with_its_own_message_id(http: httpx.AsyncClient) -> None:
    def body(text: str) -> dict[str, Any]:
        message = {"id": text, "role": "user", "parts": [{"type": "text", "text": text}]}
        return {"id": "chat-1", "messages": [message], "trigger": "submit-message"}

    starts, texts = [], []
    for text in ("one", "two"):
        response = await http.post("/api/chat", json=body(text))
        chunks = [orjson.loads(b[6:]) for b in response.text.split("\n\n") if b[6:7] == "{"]
        starts.append(chunks[0])
        texts.append("".join(c["delta"] for c in chunks if c["type"] == "text-delta"))
    assert texts == ["ONE", "TWO"]  # the second answer replays nothing of the first
    assert starts[0]["messageId"] != starts[1]["messageId"]
    assert all(s["messageId"].startswith("chat-1-") for s in starts)


def test_text_after_a_tool_call_is_a_new_text_part() -> None:
    # Tokens without a message id (the reference chat service's) went on adding to the text
    # before a tool call, so the client showed the answer above the tool that produced it.
    chunker = UIMessageChunks("m")
    events = [
        Event("token", {"text": "Let me see. ", "message_id": None, "node": None}, "1-1-0"),
        Event("tool_start", {"id": "c1", "name": "calc", "args": {"x": 2}}, "1-1-1"),
        Event("tool_end", {"id": "c1", "name": "calc", "output": 4}, "1-1-2"),
        Event("token", {"text": "It is 4.", "message_id": None, "node": None}, "1-1-3"),
        Event("end", {}, "1-1-4"),
    ]
    chunks = [c for e in events for c in chunker.chunks(e)]
    check_order(chunks)
    assert [(c["type"], c.get("id")) for c in chunks] == [
        ("start", None),
        ("start-step", None),
        ("text-start", "text-1"),
        ("text-delta", "text-1"),
        ("text-end", "text-1"),
        ("tool-input-start", None),
        ("tool-input-available", None),
        ("tool-output-available", None),
        ("finish-step", None),  # the model speaks again after the tool: a new step
        ("start-step", None),
        ("text-start", "text-2"),
        ("text-delta", "text-2"),
        ("text-end", "text-2"),
        ("finish-step", None),
        ("finish", None),
    ]


def last_step_is_complete_with_tool_calls(chunks: list[dict[str, Any]]) -> bool:
    """ai's lastAssistantMessageIsCompleteWithToolCalls on the message these chunks make:
    the tool calls after its last step start, all with their output."""
    last_step = max(i for i, c in enumerate(chunks) if c["type"] == "start-step")
    step = chunks[last_step:]
    calls = {c["toolCallId"] for c in step if c["type"] == "tool-input-available"}
    outputs = {c["toolCallId"] for c in step if c["type"] == "tool-output-available"}
    return bool(calls) and calls <= outputs


def test_an_answer_after_tool_outputs_is_a_new_step() -> None:
    # Regression: without steps the whole answer was one step, so the client's
    # `sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls` found completed
    # tool calls in the last step of every answer that ran a tool, and sent it back at once,
    # again and again (a client-side tool's continuation looped forever).
    chunker = UIMessageChunks("m")
    call = {"id": "c1", "name": "calc", "args": {"x": 2}}
    events = [
        Event(
            "message",
            {"message": {"id": "a", "role": "ai", "text": "", "tool_calls": [call]}},
            "1-1-0",
        ),
        Event(
            "message", {"message": {"role": "tool", "tool_call_id": "c1", "content": 4}}, "1-1-1"
        ),
        Event("token", {"text": "It is 4.", "message_id": "b", "node": None}, "1-1-2"),
        Event("end", {}, "1-1-3"),
    ]
    chunks = [c for e in events for c in chunker.chunks(e)]
    check_order(chunks)
    assert [c["type"] for c in chunks].count("start-step") == 2
    assert not last_step_is_complete_with_tool_calls(chunks)
    # A call the client runs itself (no output in the stream) is the last step's, complete
    # once the client adds its output: the client sends the message back, as it should.
    client_tool = UIMessageChunks("m")
    chunks = [c for e in (events[0], events[3]) for c in client_tool.chunks(e)]
    chunks.append({"type": "tool-output-available", "toolCallId": "c1", "output": 4})
    assert last_step_is_complete_with_tool_calls(chunks)


def sse_chunks(body: str) -> list[dict[str, Any]]:
    return [orjson.loads(b[6:]) for b in body.split("\n\n") if b[6:7] == "{"]


async def test_a_continuation_is_answered_in_the_message_it_continues() -> None:
    # Regression: a client that posts with an assistant message last (after a client-side
    # tool's output or an approval, `sendAutomaticallyWhen`) goes on with that message, and
    # a `start` naming another (the run's own "<chat>-<epoch>") made it add a second
    # message with that one's parts again. Every replay of the run must name it too: a
    # resume (GET, no body) finds it in the run's first event.
    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        async def tokens() -> AsyncIterator[str]:
            yield f"after {chat.messages[-1]['parts'][0].get('output')}"

        return tokens()

    transport = MemoryTransport()
    router = ChatRouter(transport, answer, authorize=allow_all)

    async def replay(request: Any) -> Any:
        return UIMessageStreamResponse(StreamConsumer(transport, "chat-c"), request)

    app = Starlette(routes=[*router.routes, Route("/replay", replay)])
    user = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "go"}]}
    tool = {"type": "tool-confirm", "toolCallId": "c1", "state": "output-available"}
    assistant = {"id": "a1", "role": "assistant", "parts": [{**tool, "input": {}, "output": "yes"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        body = {"id": "chat-c", "messages": [user, assistant], "trigger": "submit-message"}
        continued = sse_chunks((await http.post("/api/chat", json=body)).text)
        replayed = sse_chunks((await http.get("/replay")).text)
        body["messages"] = [user, assistant, {**user, "id": "u2"}]
        answered = sse_chunks((await http.post("/api/chat", json=body)).text)
    await router.producer.aclose()
    for chunks in (continued, replayed):
        check_order(chunks)
        assert chunks[0] == {"type": "start", "messageId": "a1"}
        assert [c["delta"] for c in chunks if c["type"] == "text-delta"] == ["after yes"]
        assert not [c for c in chunks if c["type"].startswith("data-")]  # the marker's not sent
    assert answered[0]["messageId"].startswith("chat-c-")  # a new message: a new id
    # An encoder given its own message id keeps it.
    marker = {"name": "resumable_stream.ui_message_id", "data": {"message_id": "a1"}}
    mine = UIMessageChunks("mine")
    first = mine.chunks(Event("custom", marker, "1-1-0"))
    assert first == [{"type": "start", "messageId": "mine"}]
    # A continuation goes on in the continued message's last step (where a resumed tool's
    # call is) until it sends something else: an answer that says nothing still ends with
    # its own step (a last step that holds a browser's tool output would be posted again).
    assert [c["type"] for c in mine.chunks(Event("end", {}, "1-1-1"))] == [
        "start-step",
        "finish-step",
        "finish",
    ]


async def test_an_answer_is_never_a_later_message_s_answer() -> None:
    # Regression: the response read the chat's stream from whatever run it held at its
    # first read, so a message answered and replaced in between served the later answer.
    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        return tokens(chat.text.upper())

    async def tokens(text: str) -> AsyncIterator[str]:
        yield text

    transport = MemoryTransport()
    router = ChatRouter(transport, answer, authorize=allow_all)
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "first"}]}
    later = Later("/api/chat", orjson.dumps({"id": "chat-9", "messages": [message]}))
    response = await router.send(later.request())
    await eventually(lambda: ended(transport, "chat-9"))
    await (await router.producer.start(tokens("SECOND"), stream_id="chat-9")).wait()
    status, body = await later.serve(response)
    # Its own answer is gone with its run: the UI stream's "nothing to read" (the SDK
    # reports an empty body), never the other message's answer.
    assert (status, body) == (204, b"")
    await router.producer.aclose()


class _ProviderIdModel(BaseChatModel):
    """Streams as ChatOpenAI's Responses API does: the provider's id on the first chunk
    only, so the text chunks get LangChain's run id and the whole message the provider's."""

    @property
    def _llm_type(self) -> str:
        return "provider-ids"

    def _generate(self, messages: list[BaseMessage], **kwargs: Any) -> ChatResult:
        raise NotImplementedError

    async def _astream(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        yield ChatGenerationChunk(message=AIMessageChunk(content="", id="resp_1"))
        for text in ("Hel", "lo"):
            yield ChatGenerationChunk(message=AIMessageChunk(content=text))


async def test_a_message_streamed_under_another_id_is_not_sent_twice() -> None:
    # Regression: tokens keyed by LangChain's run id ("lc_run--...") and the model's whole
    # message keyed by the provider's id ("resp_..."): the message's text went out again
    # as a second text part, and the client showed "HelloHello".
    model = _ProviderIdModel()

    async def call(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", call)
    graph.add_edge(START, "model")
    graph.add_edge("model", END)
    transport = MemoryTransport()
    producer = StreamProducer(transport)
    source = graph.compile().astream_events({"messages": [("user", "hi")]}, version="v2")
    await (await producer.start(source, stream_id="s")).wait()
    chunker = UIMessageChunks("m")
    chunks = [c async for e in StreamConsumer(transport, "s") for c in chunker.chunks(e)]
    await producer.aclose()
    check_order(chunks)
    assert "".join(c["delta"] for c in chunks if c["type"] == "text-delta") == "Hello"
    assert [c["type"] for c in chunks].count("text-start") == 1


def test_a_message_of_another_id_with_other_text_is_still_sent() -> None:
    chunker = UIMessageChunks("m")
    token = Event("token", {"text": "Hel", "message_id": "lc_run--1"}, "1-1-0")
    other = Event("message", {"message": {"role": "ai", "id": "x", "text": "Bye"}}, "1-2-0")
    chunks = (
        chunker.chunks(token) + chunker.chunks(other) + chunker.chunks(Event("end", {}, "1-3-0"))
    )
    check_order(chunks)
    assert [c["delta"] for c in chunks if c["type"] == "text-delta"] == ["Hel", "Bye"]


class _BreakingTransport(MemoryTransport):
    """Its live reads fail (storage down) once ``broken`` is set."""

    broken = False

    def subscribe(self, stream_id: str, epoch: int, after: int) -> Any:
        inner = super().subscribe(stream_id, epoch, after)
        transport = self

        class Failing:
            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

            async def get(self, max_wait: float) -> Any:
                if transport.broken:
                    raise TransportError("storage down")
                return await inner.get(max_wait)

        return Failing()


@pytest.mark.parametrize(
    ("cut", "told"),
    [
        ("storage", "interrupted (its stream could not be read)"),
        # The end of uvicorn's graceful shutdown cancels the response (a deploy): the run
        # goes on, and the error part says so (it said the stream "could not be read").
        ("server", "server closed this connection before the answer ended"),
    ],
)
async def test_an_answer_cut_short_ends_with_an_error_part_saying_to_resume(
    cut: str, told: str
) -> None:
    # Regression: a read failing after the headers ended the response as if the answer
    # were whole: no finish, error or abort part, and useChat showed the cut answer as
    # done ("ready", no error, its text part still "streaming").
    release = asyncio.Event()

    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        async def tokens() -> AsyncIterator[str]:
            yield "hello "
            await release.wait()
            yield "world"

        return tokens()

    transport = _BreakingTransport()
    router = ChatRouter(transport, answer, authorize=allow_all, ping_interval=None)
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "x"}]}
    later = Later("/api/chat", orjson.dumps({"id": "chat-1", "messages": [message]}))
    response = await router.send(later.request())
    serving = asyncio.create_task(later.serve(response))
    await eventually(holds(lambda: b"hello" in b"".join(m.get("body", b"") for m in later.sent)))
    if cut == "storage":
        transport.broken = True
    else:
        serving.cancel()  # as the server does
    status, body = await asyncio.wait_for(serving, 10)
    release.set()
    await router.producer.aclose()
    blocks = [b for b in body.split(b"\n\n") if b]
    assert (status, blocks[-1]) == (200, b"data: [DONE]")
    chunks = [orjson.loads(b.removeprefix(b"data: ")) for b in blocks[:-1]]
    assert chunks[-2] == {"type": "text-end", "id": "text-1"}
    assert chunks[-1]["type"] == "error"
    assert told in chunks[-1]["errorText"] and "resume" in chunks[-1]["errorText"]


async def test_a_busy_chat_refuses_before_calling_the_apps_source() -> None:
    # Regression: send() called the app's source before the busy check (the transport's
    # create), so a request answered 409 still ran what source() does before its generator
    # (the app saving the user's message, charging a quota): twice for one answer.
    calls: list[str] = []
    release = asyncio.Event()

    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        calls.append(chat.text)  # the app's side effect, before its generator starts

        async def tokens() -> AsyncIterator[str]:
            yield chat.text.upper()

        return tokens()

    async def held() -> AsyncIterator[str]:
        yield "thinking"
        await release.wait()

    router = ChatRouter(MemoryTransport(), answer, authorize=allow_all)
    app = Starlette(routes=router.routes)
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        run = await router.producer.start(held(), stream_id="chat-b")
        busy = await http.post("/api/chat", json={"id": "chat-b", "messages": [message]})
        assert (busy.status_code, busy.json()["code"]) == (409, "answer_in_progress")
        assert calls == []
        release.set()
        assert await run.wait() == "completed"
        answered = await http.post("/api/chat", json={"id": "chat-b", "messages": [message]})
    await router.producer.aclose()
    assert answered.status_code == 200
    assert [c["delta"] for c in sse_chunks(answered.text) if c["type"] == "text-delta"] == ["HI"]
    assert calls == ["hi"]


async def test_a_chat_busy_in_another_process_refuses_before_calling_the_source(
    redis_url: str,
) -> None:
    # The same over Redis, with two routers (two workers) on one store: the busy check is
    # the store's, so the second worker never calls its source.
    calls: list[str] = []

    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        calls.append(chat.text)

        async def tokens() -> AsyncIterator[str]:
            yield "x"

        return tokens()

    release = asyncio.Event()

    async def held() -> AsyncIterator[str]:
        yield "thinking"
        await release.wait()

    prefix = f"t{uuid.uuid4().hex[:8]}"
    first, second = from_url(redis_url, prefix=prefix), from_url(redis_url, prefix=prefix)
    async with first, second:
        busy_worker = ChatRouter(first, answer, authorize=allow_all)
        other_worker = ChatRouter(second, answer, authorize=allow_all)
        run = await busy_worker.producer.start(held(), stream_id="chat-r")
        message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
        app = Starlette(routes=other_worker.routes)
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            busy = await http.post("/api/chat", json={"id": "chat-r", "messages": [message]})
        release.set()
        assert await run.wait() == "completed"
        await busy_worker.producer.aclose()
        await other_worker.producer.aclose()
    assert (busy.status_code, busy.json()["code"]) == (409, "answer_in_progress")
    assert calls == []


async def test_a_source_that_refuses_or_fails_leaves_no_answer_running() -> None:
    # The source is called once the run holds the chat: its HTTPException is still the
    # request's answer, and the run it refused ends (the chat can answer the next message).
    outcomes: list[BaseException | None] = [HTTPException(402, "out of credit"), None]

    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

        async def tokens() -> AsyncIterator[str]:
            yield "fine"

        return tokens()

    transport = MemoryTransport()
    router = ChatRouter(transport, answer, authorize=allow_all)
    app = Starlette(routes=router.routes)
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    body = {"id": "chat-q", "messages": [message]}
    client = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=client, base_url="http://t") as http:
        refused = await http.post("/api/chat", json=body)
        assert (refused.status_code, refused.json()["message"]) == (402, "out of credit")
        info = await transport.info("chat-q")
        assert info is not None and info.status == "error"
        assert (await http.get("/api/chat/chat-q/stream")).status_code == 204
        answered = await http.post("/api/chat", json=body)
        outcomes.append(RuntimeError("the database is down"))
        failed = await http.post("/api/chat", json=body)
        info = await transport.info("chat-q")
    await router.producer.aclose()
    assert [c["delta"] for c in sse_chunks(answered.text) if c["type"] == "text-delta"] == ["fine"]
    assert failed.status_code == 500  # as an app's own exception always was
    assert info is not None and info.status == "error"


async def test_an_answer_stopped_while_its_source_is_called_ends_aborted() -> None:
    # The request waits for the source to be called; a stop meanwhile must not leave it
    # waiting: it answers with the run, which ends `abort`.
    calling, never = asyncio.Event(), asyncio.Event()

    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        calling.set()
        await never.wait()  # a slow database
        raise AssertionError("not reached")

    router = ChatRouter(MemoryTransport(), answer, authorize=allow_all)
    app = Starlette(routes=router.routes)
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        sent = asyncio.create_task(
            http.post("/api/chat", json={"id": "chat-s", "messages": [message]})
        )
        await calling.wait()
        assert (await http.post("/api/chat/chat-s/stop")).status_code == 202
        response = await asyncio.wait_for(sent, 10)
    await router.producer.aclose()
    assert response.status_code == 200
    chunks = sse_chunks(response.text)
    check_order(chunks)
    assert chunks[-1] == {"type": "abort", "reason": "requested"}


async def test_an_http_exception_of_the_app_keeps_its_headers_and_is_json_everywhere() -> None:
    # Regression: the source's HTTPException lost its headers (a 429's Retry-After), and one
    # raised by stream_id() on resume or stop, with the routes in the app, was plain text.
    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        raise HTTPException(429, "slow down", headers={"Retry-After": "30"})

    def stream_id(chat_id: str) -> str:
        if chat_id == "gone":
            raise HTTPException(404, "no such chat", headers={"X-Chat": "gone"})
        return chat_id

    router = ChatRouter(MemoryTransport(), answer, authorize=allow_all, stream_id=stream_id)
    app = Starlette(routes=router.routes)
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        limited = await http.post("/api/chat", json={"id": "chat-l", "messages": [message]})
        gone = [
            await http.post("/api/chat", json={"id": "gone", "messages": [message]}),
            await http.get("/api/chat/gone/stream"),
            await http.post("/api/chat/gone/stop"),
        ]
    await router.producer.aclose()
    assert (limited.status_code, limited.headers.get("retry-after")) == (429, "30")
    assert limited.json() == {"code": "http_error", "message": "slow down"}
    for response in gone:
        assert response.status_code == 404, response.request.url
        assert response.json() == {"code": "not_found", "message": "no such chat"}
        assert response.headers.get("x-chat") == "gone"


async def test_a_tool_that_interrupts_is_pending_not_failed() -> None:
    # Regression: a tool that called interrupt() (human in the loop) was sent as
    # tool-output-error with the Interrupt's repr, and sendAutomaticallyWhen's
    # lastAssistantMessageIsCompleteWithToolCalls took that failed call as complete and
    # posted the message back. Paused, it has no output until the graph resumes.
    @tool("search")
    def ask_first(q: str) -> str:
        """Look q up once the human agrees."""
        return f"found {q} ({interrupt(q)})"

    graph = agent_graph([ask_first], InMemorySaver())
    config = {"configurable": {"thread_id": "t"}}
    events = await stored_events(
        graph.astream_events({"messages": [("user", "go")]}, config, version="v2")
    )
    assert "tool_start" in [e.type for e in events]
    assert "tool_end" not in [e.type for e in events]  # it did not return, nor fail
    chunker = UIMessageChunks("m")
    chunks = [c for e in events for c in chunker.chunks(e)]
    assert [c["type"] for c in chunks] == [
        "start",
        "start-step",
        *(["tool-input-start", "tool-input-available"] * 2),
        *(["data-interrupt"] * len((await graph.aget_state(config)).interrupts)),
        "finish-step",
        "finish",
    ]


def asking_graph() -> Any:
    """A node that asks the human (``interrupt()``), then says what they answered."""

    async def ask(state: MessagesState) -> dict[str, Any]:
        answer = interrupt({"question": "Book it?"})
        return {"messages": [AIMessage(content=f"you said {answer}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    return builder.compile(checkpointer=InMemorySaver())


ASKING_MODES: dict[str, Any] = {
    "events": lambda graph, inputs, config: graph.astream_events(inputs, config, version="v2"),
    "updates": lambda graph, inputs, config: graph.astream(
        inputs, config, stream_mode=["messages", "updates"]
    ),
    "values": lambda graph, inputs, config: graph.astream(
        inputs, config, stream_mode="values", version="v2"
    ),
    "both": lambda graph, inputs, config: graph.astream(
        inputs, config, stream_mode=["updates", "values"], subgraphs=True
    ),
}


@pytest.mark.parametrize("mode", sorted(ASKING_MODES))
async def test_a_graph_s_interrupt_is_sent_as_a_data_part(mode: str) -> None:
    # Regression: `update` events were not sent, so a graph that stopped at interrupt()
    # to ask its user gave useChat an empty answer: the question never reached the client.
    graph = asking_graph()
    config = {"configurable": {"thread_id": "t"}}
    inputs = {"messages": [("user", "book it")]}
    events = await stored_events(ASKING_MODES[mode](graph, inputs, config))
    (asked,) = (await graph.aget_state(config)).interrupts
    chunker = UIMessageChunks("m")
    chunks = [c for e in events for c in chunker.chunks(e)]
    check_order(chunks)
    parts = [c for c in chunks if c["type"].startswith("data-")]
    # Once, also when the stream shows it twice (two modes, a subgraph and its parent).
    assert [(p["type"], p["id"]) for p in parts] == [("data-interrupt", asked.id)]
    # The Interrupt as LangGraph gives it (as in the LangGraph API's `__interrupt__`).
    assert parts[0]["data"]["id"] == asked.id
    assert parts[0]["data"]["value"] == {"question": "Book it?"}
    assert chunks[-1] == {"type": "finish", "finishReason": "stop"}


async def test_an_http_exception_from_a_generator_s_body_ends_the_answer_with_an_error() -> None:
    # As docs/ai-sdk.md says: the source's body runs once the answer streams (the response
    # is sent without waiting for its first item), so what it raises there is an error part.
    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        raise HTTPException(402, "out of credit")
        yield "never"

    router = ChatRouter(MemoryTransport(), answer, authorize=allow_all)
    app = Starlette(routes=router.routes)
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        response = await http.post("/api/chat", json={"id": "chat-g", "messages": [message]})
    await router.producer.aclose()
    assert response.status_code == 200
    assert sse_chunks(response.text)[-1] == {"type": "error", "errorText": "402: out of credit"}


async def _failing_chat(
    error_text: Any = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Event]]:
    """A ChatRouter answer whose tool raises, then whose source raises: its chunks as sent,
    as a resume replays them, and the events stored."""

    async def answer(chat: ChatRequest) -> AsyncIterator[Any]:
        yield {"type": "tool_start", "data": {"name": "lookup", "run_id": "r1", "input": {}}}
        yield {
            "type": "tool_end",
            "data": {"name": "lookup", "run_id": "r1", "error": "db at 10.0.0.5 refused"},
        }
        raise RuntimeError("Incorrect API key provided: sk-secret")

    transport = MemoryTransport()
    router = ChatRouter(transport, answer, authorize=allow_all, error_text=error_text)
    app = Starlette(routes=router.routes)
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        sent = await http.post("/api/chat", json={"id": "chat-e", "messages": [message]})
        stored = [e async for e in StreamConsumer(transport, "chat-e")]
        replay = UIMessageStreamResponse(StreamConsumer(transport, "chat-e"), error_text=error_text)
        replayed = [c for e in stored for c in replay.chunker.chunks(e)]
    await router.producer.aclose()
    return sse_chunks(sent.text), replayed, stored


def _errors(chunks: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(c["type"], c["errorText"]) for c in chunks if "errorText" in c]


async def test_an_exception_s_message_stays_on_the_server_by_default() -> None:
    # Regression: a source's exception message (an API key in a provider's error, a host in
    # a driver's) went to the browser as the answer's errorText, and a tool's as its
    # output's: the AI SDK's servers answer "An error occurred." unless told otherwise.
    sent, replayed, stored = await _failing_chat()
    masked = [("tool-output-error", "An error occurred."), ("error", "An error occurred.")]
    assert _errors(sent) == _errors(replayed) == masked
    assert "sk-secret" not in str(sent) and "10.0.0.5" not in str(sent)
    # The stored events keep them, for the server's own readers and logs.
    assert stored[-1].data == {
        "error": "RuntimeError",
        "message": "Incorrect API key provided: sk-secret",
    }


async def test_error_text_gives_the_text_of_each_error_on_a_resume_too() -> None:
    seen: list[ErrorPart] = []

    def error_text(part: ErrorPart) -> str:
        seen.append(part)
        return f"{part.type} {part.error} {part.tool_name}: {part.message[:9]}"

    sent, replayed, _ = await _failing_chat(error_text)
    told = [
        ("tool-output-error", "tool-output-error None lookup: db at 10."),
        ("error", "error RuntimeError None: Incorrect"),
    ]
    assert _errors(sent) == _errors(replayed) == told
    assert seen[:2] == [
        ErrorPart("tool-output-error", None, "db at 10.0.0.5 refused", "lookup"),
        ErrorPart("error", "RuntimeError", "Incorrect API key provided: sk-secret"),
    ]


async def test_an_error_text_hook_that_fails_costs_the_error_its_text_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def error_text(part: ErrorPart) -> Any:
        if part.type == "error":
            return None  # not a str
        raise KeyError("bug")

    with caplog.at_level(logging.ERROR, "resumable_stream.http"):
        sent, _, _ = await _failing_chat(error_text)
    masked = [("tool-output-error", "An error occurred."), ("error", "An error occurred.")]
    assert _errors(sent) == masked
    assert sent[-1] == {"type": "error", "errorText": "An error occurred."}  # still ended
    failures = [r.getMessage() for r in caplog.records if "error_text failed" in r.getMessage()]
    # (Twice each: the answer sent, then its replay.)
    assert sorted(failures) == [
        "error_text failed (error part): the default text is shown",
        "error_text failed (error part): the default text is shown",
        "error_text failed (tool-output-error part): the default text is shown",
        "error_text failed (tool-output-error part): the default text is shown",
    ]


def test_the_default_error_text_shows_the_library_s_own_errors_and_http_exceptions() -> None:
    shown = {
        "producer_lost": "the producer stopped sending heartbeats",
        "storage_rollback": "the storage lost entries",
        "not_started": "no producer started this reserved run",
        "HTTPException": "402: out of credit",
    }
    for name, message in shown.items():
        assert default_error_text(ErrorPart("error", name, message)) == message
    for part in (
        ErrorPart("error", "ValueError", "SELECT * FROM users"),
        ErrorPart("error", "producer_failed", "the producer failed: OSError: 10.0.0.5"),
        ErrorPart("error", None, "x"),
        ErrorPart("tool-output-error", None, "HTTPException", "t"),
    ):
        assert default_error_text(part) == "An error occurred."


#: The usage a MeteredModel reports for each of its two calls (its tool call, its answer).
CALL_USAGES = (
    UsageMetadata(input_tokens=12, output_tokens=3, total_tokens=15),
    UsageMetadata(input_tokens=20, output_tokens=7, total_tokens=27),
)


class MeteredModel(BaseChatModel):
    """Calls `search`, then answers; each call reports its usage (CALL_USAGES), on its
    whole message or, streamed, split over its chunks (input on the first, output on
    the last: Anthropic's shape) unless ``disable_streaming``."""

    @property
    def _llm_type(self) -> str:
        return "metered-test-model"

    def _reply(self, messages: list[BaseMessage]) -> tuple[AIMessage, UsageMetadata]:
        if isinstance(messages[-1], ToolMessage):
            return AIMessage(content="found it"), CALL_USAGES[1]
        call = {"id": "c1", "name": "search", "args": {"q": "x"}}
        return AIMessage(content="", tool_calls=[call]), CALL_USAGES[0]

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        message, usage = self._reply(messages)
        message.usage_metadata = usage
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _astream(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        message, usage = self._reply(messages)
        sent, made = usage["input_tokens"], usage["output_tokens"]
        calls = [
            tool_call_chunk(
                id=c["id"], name=c["name"], args=orjson.dumps(c["args"]).decode(), index=0
            )
            for c in message.tool_calls
        ]
        chunks = [
            AIMessageChunk(
                content="",
                usage_metadata=UsageMetadata(input_tokens=sent, output_tokens=0, total_tokens=sent),
            ),
            AIMessageChunk(content=message.content, tool_call_chunks=calls),
            AIMessageChunk(
                content="",
                usage_metadata=UsageMetadata(input_tokens=0, output_tokens=made, total_tokens=made),
            ),
        ]
        for chunk in chunks:
            yield ChatGenerationChunk(message=chunk)


def metered_graph(stream: bool) -> Any:
    return tool_loop(MeteredModel(disable_streaming=not stream), [search])


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("mode", ["messages", "events"])
async def test_message_metadata_has_the_answer_s_summed_usage(
    mode: str, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    graph = metered_graph(stream)
    inputs = {"messages": [("user", "look x up")]}
    if mode == "messages":
        source = graph.astream(inputs, stream_mode="messages")
    else:
        source = graph.astream_events(inputs, version="v2")
    events = await stored_events(source)
    parts: list[MessageMetadataPart] = []

    def metadata(part: MessageMetadataPart) -> dict[str, Any]:
        parts.append(part)
        return {"part": part.type, "usage": part.usage and part.usage.total_tokens}

    chunker = UIMessageChunks("answer-1", message_metadata=metadata)
    chunks = [c for e in events for c in chunker.chunks(e)]
    check_order(chunks)
    usage = TokenUsage(32, 10, 42)  # both calls' (CALL_USAGES), each counted once
    assert parts == [
        MessageMetadataPart("start", "answer-1"),
        MessageMetadataPart("finish", "answer-1", "stop", usage),
    ]
    assert chunks[0] == {
        "type": "start",
        "messageId": "answer-1",
        "messageMetadata": {"part": "start", "usage": None},
    }
    assert chunks[-1] == {
        "type": "finish",
        "finishReason": "stop",
        "messageMetadata": {"part": "finish", "usage": 42},
    }
    # Nothing by default (an app's strict messageMetadataSchema would refuse it), nor
    # for a hook that returns None.
    for chunker in (
        UIMessageChunks("answer-1"),
        UIMessageChunks("a", message_metadata=lambda p: None),
    ):
        chunks = [c for e in events for c in chunker.chunks(e)]
        assert not [c for c in chunks if "messageMetadata" in c]
    # A hook that raises, or gives what is not a JSON object, costs the answer its metadata
    # (logged), not the answer.

    def raising(part: MessageMetadataPart) -> dict[str, Any]:
        raise KeyError("model")

    for hook in (raising, lambda p: ["not", "a", "dict"], lambda p: {"at": object()}):
        chunker = UIMessageChunks("a", message_metadata=hook)  # type: ignore[arg-type]
        with caplog.at_level(logging.ERROR, "resumable_stream.http"):
            chunks = [c for e in events for c in chunker.chunks(e)]
        check_order(chunks)
        assert chunks[-1] == {"type": "finish", "finishReason": "stop"}
        assert "message_metadata failed for the finish part" in caplog.text
        caplog.clear()


async def test_a_resumed_tool_still_running_when_the_answer_stops_ends_failed() -> None:
    # Regression: a tool paused by interrupt(), answered with addToolOutput and stopped
    # while it ran again kept the browser's answer as its output: its run, held until it
    # ended to learn its call, never did, so the stop did not end it as it ends the others.
    running = asyncio.Event()

    @tool
    async def book(q: str) -> str:
        """Book q once the user agrees."""
        interrupt({"question": "Book it?"})
        running.set()
        await asyncio.Event().wait()  # until the answer is stopped
        return "booked"

    router, app = _booking_chat(book, "chat-r")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        body = {"id": "chat-r", "messages": [_BOOK_X], "trigger": "submit-message"}
        await http.post("/api/chat", json=body)
        body["messages"] = [_BOOK_X, _BOOKED_YES]
        posted = asyncio.create_task(http.post("/api/chat", json=body))
        await running.wait()
        assert (await http.post("/api/chat/chat-r/stop")).status_code == 202
        continued = sse_chunks((await posted).text)
        replayed = sse_chunks((await http.get("/replay")).text)
    await router.producer.aclose()
    for chunks in (continued, replayed):
        _failed_on_the_paused_call(chunks, "the answer ended before this tool finished")
        assert chunks[-1]["type"] == "abort"


_BOOK_X = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "book x"}]}
# The answer after the browser answered the paused call with addToolOutput("yes").
_BOOKED_YES = {
    "id": "a1",
    "role": "assistant",
    "parts": [
        {"type": "step-start"},
        {
            "type": "tool-book",
            "toolCallId": "call_book",
            "state": "output-available",
            "input": {"q": "x"},
            "output": "yes",
        },
    ],
}


def _booking_chat(book: Any, chat_id: str) -> tuple[ChatRouter, Starlette]:
    """A ChatRouter over the booking agent of ``book``, which a continuation resumes with
    the browser's output, and ``GET /replay`` of chat ``chat_id`` from its start."""
    graph = _booking_graph(book)

    async def answer(chat: ChatRequest) -> Any:
        config = {"configurable": {"thread_id": chat.chat_id}}
        if chat.messages[-1]["role"] == "assistant":
            resume = chat.messages[-1]["parts"][-1]["output"]
            return graph.astream_events(Command(resume=resume), config, version="v2")
        return graph.astream_events({"messages": [("user", chat.text)]}, config, version="v2")

    def shown(part: ErrorPart) -> str:
        return part.message  # (not the default: the tests check which call shows the error)

    transport = MemoryTransport()
    router = ChatRouter(transport, answer, authorize=allow_all, error_text=shown)

    async def replay(request: Any) -> Any:
        return UIMessageStreamResponse(
            StreamConsumer(transport, chat_id), request, error_text=shown
        )

    return router, Starlette(routes=[*router.routes, Route("/replay", replay)])


def _failed_on_the_paused_call(chunks: list[dict[str, Any]], error: str) -> None:
    """``chunks`` (a continuation's, or its replay's) name no call but the paused one, on
    which the resumed tool failed with ``error``."""
    check_order(chunks)
    assert {c["toolCallId"] for c in chunks if "toolCallId" in c} == {"call_book"}
    failed = [c for c in chunks if c["type"] == "tool-output-error"]
    assert [(c["toolCallId"], c["errorText"]) for c in failed] == [("call_book", error)]


def _booking_graph(book: Any) -> Any:
    """The booking model's agent over the tool ``book``, with checkpoints."""
    return tool_loop(BookingModel(), [book], InMemorySaver(), handle_tool_errors=True)


async def test_a_resumed_tool_that_fails_shows_its_error_on_its_own_call() -> None:
    # Regression: a tool paused by interrupt() and answered with addToolOutput, that failed
    # once resumed, had its error sent on a new part named by its run id (its error, unlike
    # its ToolMessage, does not name its call): the message showed the tool twice, the
    # paused call with the browser's answer as if it had run.
    @tool
    def book(q: str) -> str:
        """Book q once the user agrees."""
        interrupt({"question": "Book it?"})
        raise ValueError(f"no seats for {q}")

    router, app = _booking_chat(book, "chat-b")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        body = {"id": "chat-b", "messages": [_BOOK_X], "trigger": "submit-message"}
        asked = sse_chunks((await http.post("/api/chat", json=body)).text)
        assert [c["toolCallId"] for c in asked if "toolCallId" in c] == ["call_book"] * 2
        body["messages"] = [_BOOK_X, _BOOKED_YES]
        continued = sse_chunks((await http.post("/api/chat", json=body)).text)
        replayed = sse_chunks((await http.get("/replay")).text)
    await router.producer.aclose()
    for chunks in (continued, replayed):
        _failed_on_the_paused_call(chunks, "no seats for x")


@contextlib.contextmanager
def served_chat(redis_url: str, answer: Any) -> Iterator[str]:
    """A ChatRouter answering with ``answer``, on Redis, served by uvicorn: its base URL."""
    transport = from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    router = ChatRouter(transport, answer, authorize=allow_all)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await router.producer.aclose()
        await transport.aclose()

    with uvicorn_server(Starlette(routes=router.routes, lifespan=lifespan)) as url:
        yield url


async def post_chat(http: httpx.AsyncClient, messages: bytes) -> list[dict[str, Any]]:
    """POST the UI messages ``messages`` (JSON, comma-separated) to chat "chat-lone"."""
    body = b'{"id":"chat-lone","trigger":"submit-message","messages":[' + messages + b"]}"
    response = await http.post(
        "/api/chat", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    return sse_chunks(response.text)


async def test_a_chat_holding_a_lone_surrogate_is_still_answered(redis_url: str) -> None:
    # Regression: JSON.stringify writes "\ud83d" for a string holding half an emoji (a
    # textarea's maxlength cut one), which the router refused with a 400; and useChat
    # resends the history with every message: each later message of the chat was refused.
    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        async def tokens() -> AsyncIterator[str]:
            yield f"to {chat.text}"

        return tokens()

    # The bytes a browser sends: the lone half as its JSON escape.
    first = b'{"id":"u1","role":"user","parts":[{"type":"text","text":"hi \\ud83d"}]}'
    reply = b'{"id":"a1","role":"assistant","parts":[{"type":"text","text":"to hi \xef\xbf\xbd"}]}'
    second = b'{"id":"u2","role":"user","parts":[{"type":"text","text":"more"}]}'
    with served_chat(redis_url, answer) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for messages, text in (
                (first, "to hi \ufffd"),
                (first + b"," + reply + b"," + second, "to more"),
            ):
                chunks = await post_chat(http, messages)
                assert [c["delta"] for c in chunks if c["type"] == "text-delta"] == [text]
                assert chunks[-1]["type"] == "finish"


async def test_a_chat_sent_while_redis_is_out_of_memory_is_503_with_nothing_stored(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    # Regression: Redis out of memory let the run's creation through (its first write was
    # a DEL) and refused every write after it: the message was taken (200) and its answer
    # never came, nor ended. Now the start is refused: 503 `unavailable`, nothing stored.
    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        async def tokens() -> AsyncIterator[str]:
            yield f"to {chat.text}"

        return tokens()

    server = redis_server_factory()
    admin = aioredis.Redis(port=server.port)
    message = b'{"id":"u1","role":"user","parts":[{"type":"text","text":"hi"}]}'
    body = b'{"id":"chat-oom","trigger":"submit-message","messages":[' + message + b"]}"
    headers = {"content-type": "application/json"}
    with served_chat(f"redis://127.0.0.1:{server.port}/0", answer) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            await admin.config_set("maxmemory", 1)
            try:
                response = await http.post("/api/chat", content=body, headers=headers)
                assert response.status_code == 503, response.text
                assert response.json()["code"] == "unavailable"
                assert await admin.keys("*") == []
            finally:
                await admin.config_set("maxmemory", 0)
            response = await http.post("/api/chat", content=body, headers=headers)
            chunks = sse_chunks(response.text)
            assert [c["delta"] for c in chunks if c["type"] == "text-delta"] == ["to hi"]
    await admin.aclose()


async def test_a_pair_split_across_tokens_reaches_the_browser_whole(redis_url: str) -> None:
    # Regression: a token holding a lone surrogate (a provider's "\ud83d" escape cut across
    # two chunks) ended the answer with an error. The pair split across two tokens reaches
    # the reader as one character; a lone half as U+FFFD; the answer completes.
    async def answer(chat: ChatRequest) -> AsyncIterator[str]:
        async def tokens() -> AsyncIterator[str]:
            yield "a \ud83d"
            yield "\ude00, half \ud83d"
            yield " done"

        return tokens()

    message = b'{"id":"u1","role":"user","parts":[{"type":"text","text":"hi"}]}'
    with served_chat(redis_url, answer) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            chunks = await post_chat(http, message)
    text = "".join(c["delta"] for c in chunks if c["type"] == "text-delta")
    assert text == "a \U0001f600, half \ufffd done"
    assert chunks[-1]["type"] == "finish"
