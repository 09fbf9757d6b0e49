"""The chat agent graph: ReAct tool loop, streaming, summarization, persistence."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from chat_service import OfflineChatModel, build_agent, open_checkpointer
from chat_service.agent import SUMMARY_PREFIX, SUMMARY_TAG, Agent
from chat_service.models import ModelFactory
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, SystemMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver


def thread() -> dict[str, Any]:
    return {"configurable": {"thread_id": str(uuid.uuid4())}}


async def ask(agent: Agent, config: dict[str, Any], text: str) -> list[AnyMessage]:
    """Send one user message; return the messages this turn added."""
    before = await agent.aget_state(config)
    seen = {m.id for m in before.values.get("messages", [])}
    state = await agent.ainvoke({"messages": [("user", text)]}, config)
    return [m for m in state["messages"] if m.id not in seen]


@pytest.fixture
def agent(model_factory: ModelFactory) -> Agent:
    return build_agent(model_factory, checkpointer=InMemorySaver())


async def test_answers_a_plain_question_without_tools(agent: Agent) -> None:
    turn = await ask(agent, thread(), "How should I structure a small side project?")

    assert [m.type for m in turn] == ["human", "ai"]
    assert not turn[1].tool_calls
    assert "structure a small side project" in turn[1].text


async def test_search_question_runs_web_search_and_answers_from_the_result(agent: Agent) -> None:
    _, call, result, answer = await ask(agent, thread(), "search for Redis Streams")

    assert [(c["name"], c["args"]) for c in call.tool_calls] == [
        ("web_search", {"query": "Redis Streams"})
    ]
    assert isinstance(result, ToolMessage)
    assert result.tool_call_id == call.tool_calls[0]["id"]
    assert result.text.startswith("[1] Redis Streams (https://redis.io/")
    assert isinstance(answer, AIMessage)
    assert not answer.tool_calls
    assert "Redis Streams are an append-only log data type." in answer.text
    assert "https://redis.io/" in answer.text


async def test_arithmetic_runs_the_calculator(agent: Agent) -> None:
    _, call, result, answer = await ask(agent, thread(), "what is 12*7")

    assert call.tool_calls[0]["name"] == "calculator"
    assert result.text == "12*7 = 84"
    assert "84" in answer.text


async def test_stream_mode_messages_streams_tokens_and_the_tool_call(agent: Agent) -> None:
    chunks = [
        (chunk, metadata["langgraph_node"])
        async for chunk, metadata in agent.astream(
            {"messages": [("user", "search for Redis Streams")]}, thread(), stream_mode="messages"
        )
    ]
    tokens = [c.content for c, node in chunks if node == "agent" and c.content]
    call_fragments = [tc for c, _ in chunks for tc in getattr(c, "tool_call_chunks", [])]
    final = [c for c, node in chunks if node == "tools"]

    assert call_fragments[0]["name"] == "web_search"
    assert len(final) == 1  # the ToolMessage
    assert len(tokens) > 50
    assert "".join(tokens).startswith("Here's what I found about Redis Streams.")


async def test_astream_events_emits_chat_model_stream_events(agent: Agent) -> None:
    config = thread()
    tokens = [
        event["data"]["chunk"].content
        async for event in agent.astream_events(
            {"messages": [("user", "what is 12*7")]}, config, version="v2"
        )
        if event["event"] == "on_chat_model_stream"
    ]
    state = await agent.aget_state(config)

    assert "".join(tokens) == state.values["messages"][-1].text


async def test_model_is_chosen_per_request_and_built_once() -> None:
    built: list[str] = []

    def factory(spec: str) -> BaseChatModel:
        built.append(spec)
        return OfflineChatModel(tokens_per_second=0, model_name=spec)

    agent = build_agent(factory, checkpointer=InMemorySaver())
    config = thread()
    await ask(agent, config, "Hello")
    config["configurable"]["model"] = "custom:model"
    await ask(agent, config, "Hello again")
    turn = await ask(agent, config, "what is 2+2")

    assert built == ["offline", "custom:model"]
    assert turn[-1].response_metadata["model_name"] == "custom:model"


async def test_a_run_naming_no_model_uses_the_default_model_given() -> None:
    built: list[str] = []

    def factory(spec: str) -> BaseChatModel:
        built.append(spec)
        return OfflineChatModel(tokens_per_second=0, model_name=spec)

    agent = build_agent(factory, checkpointer=InMemorySaver(), default_model="service:model")
    turn = await ask(agent, thread(), "Hello")
    assert built == ["service:model"]
    assert turn[-1].response_metadata["model_name"] == "service:model"


async def test_old_turns_are_replaced_by_a_summary(model_factory: ModelFactory) -> None:
    agent = build_agent(model_factory, checkpointer=InMemorySaver(), summarize_after_tokens=30)
    config = thread()
    await ask(agent, config, "Hi, my name is Ada")
    await ask(agent, config, "what is 12*7")
    streamed_nodes = {
        metadata["langgraph_node"]
        async for _, metadata in agent.astream(
            {"messages": [("user", "How should I structure a small side project?")]},
            config,
            stream_mode="messages",
        )
    }
    messages = (await agent.aget_state(config)).values["messages"]
    summary = messages[0]

    assert [m.type for m in messages] == ["system", "human", "ai"]
    assert isinstance(summary, SystemMessage)
    assert summary.name == "summary"
    assert summary.text == (
        f"{SUMMARY_PREFIX}The user's name is Ada. Then the user asked about 12*7. "
        "The calculator gave 12*7 = 84."
    )
    assert streamed_nodes == {"agent"}  # the summarizer's tokens are not part of the answer

    # The summary is folded into the system prompt, so the facts in it survive.
    assert (await ask(agent, config, "What is my name?"))[-1].text.startswith("Your name is Ada")


async def test_summarizer_model_call_is_tagged(model_factory: ModelFactory) -> None:
    agent = build_agent(model_factory, checkpointer=InMemorySaver(), summarize_after_tokens=30)
    config = thread()
    await ask(agent, config, "Hi, my name is Ada")
    tags = [
        event["tags"]
        async for event in agent.astream_events(
            {"messages": [("user", "Thanks!")]}, config, version="v2"
        )
        if event["event"] == "on_chat_model_end"
    ]
    assert [SUMMARY_TAG in t for t in tags] == [True, False]


async def test_no_summary_below_the_budget_or_when_disabled(model_factory: ModelFactory) -> None:
    for budget in (100_000, None):
        agent = build_agent(
            model_factory, checkpointer=InMemorySaver(), summarize_after_tokens=budget
        )
        config = thread()
        for text in ("Hi, my name is Ada", "what is 12*7", "Thanks!"):
            await ask(agent, config, text)
        messages = (await agent.aget_state(config)).values["messages"]
        assert [m.type for m in messages] == [
            "human",
            "ai",
            "human",
            "ai",
            "tool",
            "ai",
            "human",
            "ai",
        ]


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'checkpoints.sqlite'}"
    return str(request.getfixturevalue("postgres_dsn"))


async def test_checkpointer_persists_a_thread_across_invocations(
    model_factory: ModelFactory, database_url: str
) -> None:
    config = thread()
    async with open_checkpointer(database_url) as checkpointer:
        agent = build_agent(model_factory, checkpointer=checkpointer)
        await ask(agent, config, "Hi, my name is Ada")

    async with open_checkpointer(database_url) as checkpointer:
        agent = build_agent(model_factory, checkpointer=checkpointer)
        turn = await ask(agent, config, "What is my name?")
        other_thread = await ask(agent, thread(), "What is my name?")
        messages = (await agent.aget_state(config)).values["messages"]

    assert turn[-1].text.startswith("Your name is Ada")
    assert "haven't told me" in other_thread[-1].text
    assert [m.type for m in messages] == ["human", "ai", "human", "ai"]
