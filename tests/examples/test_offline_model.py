"""The offline chat model: exact streaming, determinism, tool calls, pacing."""

from __future__ import annotations

import pytest
from chat_service.offline_model import OfflineChatModel, parse_transcript, split_tokens
from chat_service.tools import TOOLS
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    get_buffer_string,
)

QUESTION = [HumanMessage("How should I structure a small side project?")]


async def collect(model: object, messages: list[object]) -> list[AIMessageChunk]:
    return [chunk async for chunk in model.astream(messages)]  # type: ignore[attr-defined]


def merge(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    return merged


@pytest.mark.parametrize(
    "text", ["Hello, world!  12*7 = 84.\n\nDone ", "", "  leading", "`code` -> café"]
)
def test_split_tokens_joins_back_exactly(text: str) -> None:
    assert "".join(split_tokens(text)) == text


async def test_stream_is_word_tokens_that_join_into_the_invoke_reply(
    model: OfflineChatModel,
) -> None:
    chunks = await collect(model, QUESTION)
    text_chunks = [c.content for c in chunks if c.content]
    reply = await model.ainvoke(QUESTION)

    assert len(text_chunks) > 20
    assert all(isinstance(t, str) and len(t.split()) == 1 for t in text_chunks)
    assert "".join(text_chunks) == reply.content
    assert "structure a small side project" in reply.text
    assert reply.text.count(". ") >= 3  # several sentences, not a one-liner


async def test_reply_is_deterministic_and_depends_on_the_input(model: OfflineChatModel) -> None:
    first = await model.ainvoke(QUESTION)
    again = await OfflineChatModel(tokens_per_second=0).ainvoke(QUESTION)
    other = await model.ainvoke([HumanMessage("How do I learn to cook?")])

    assert first.content == again.content
    assert first.content != other.content


def test_sync_stream_matches_async_invoke(model: OfflineChatModel) -> None:
    assert "".join(str(c.content) for c in model.stream(QUESTION)) == model.invoke(QUESTION).content


async def test_reports_token_usage(model: OfflineChatModel) -> None:
    reply = await model.ainvoke(QUESTION)

    assert type(reply) is AIMessage
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_tokens"] > 0
    assert reply.usage_metadata["output_tokens"] == len(split_tokens(reply.text))
    assert reply.response_metadata["finish_reason"] == "stop"


async def test_streams_a_tool_call_when_tools_are_bound(model: OfflineChatModel) -> None:
    chunks = await collect(model.bind_tools(TOOLS), [HumanMessage("search for Redis Streams")])
    fragments = [tc for c in chunks for tc in c.tool_call_chunks]
    merged = merge(chunks)

    assert len(fragments) > 2  # name first, then the argument JSON in pieces
    assert fragments[0]["name"] == "web_search"
    assert merged.tool_calls == [
        {
            "name": "web_search",
            "args": {"query": "Redis Streams"},
            "id": fragments[0]["id"],
            "type": "tool_call",
        }
    ]
    assert merged.response_metadata["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("question", "tool", "args"),
    [
        ("what is 12*7", "calculator", {"expression": "12*7"}),
        ("What is 3 times (4 + 5)?", "calculator", {"expression": "3 * (4 + 5)"}),
        ("What time is it in Europe/Paris?", "current_time", {"timezone": "Europe/Paris"}),
        ("Can you look up how SSE reconnects?", "web_search", {"query": "how SSE reconnects"}),
        ("Who is Ada Lovelace?", "web_search", {"query": "Ada Lovelace"}),
    ],
)
async def test_picks_the_tool_that_answers_the_question(
    model: OfflineChatModel, question: str, tool: str, args: dict[str, str]
) -> None:
    reply = await model.bind_tools(TOOLS).ainvoke([HumanMessage(question)])
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [(tool, args)]


async def test_answers_directly_without_tools_or_without_a_tool_question(
    model: OfflineChatModel,
) -> None:
    unbound = await model.ainvoke([HumanMessage("what is 12*7")])
    date = await model.bind_tools(TOOLS).ainvoke([HumanMessage("What happened on 2024-01-05?")])

    assert not unbound.tool_calls
    assert unbound.text
    assert not date.tool_calls  # a date is not a subtraction


async def test_answer_uses_the_tool_result(model: OfflineChatModel) -> None:
    call = {"name": "calculator", "args": {"expression": "12*7"}, "id": "call_1"}
    messages = [
        HumanMessage("what is 12*7"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("12*7 = 84", tool_call_id="call_1", name="calculator"),
    ]
    reply = await model.bind_tools(TOOLS).ainvoke(messages)

    assert not reply.tool_calls
    assert reply.text.startswith("The answer is 84.")


async def test_reports_a_failed_tool(model: OfflineChatModel) -> None:
    call = {"name": "calculator", "args": {"expression": "1/0"}, "id": "call_1"}
    messages = [
        HumanMessage("what is 1/0"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("division by zero", tool_call_id="call_1", name="calculator", status="error"),
    ]
    reply = await model.ainvoke(messages)
    assert reply.text == "I tried the calculator tool, but it failed: division by zero."


async def test_remembers_the_users_name_from_the_history_or_a_summary(
    model: OfflineChatModel,
) -> None:
    history = [HumanMessage("Hi, my name is ada"), AIMessage("Nice to meet you, Ada!")]
    from_history = await model.ainvoke([*history, HumanMessage("What is my name?")])
    from_summary = await model.ainvoke(
        [SystemMessage("Summary: The user's name is Grace."), HumanMessage("what's my name?")]
    )
    unknown = await model.ainvoke([HumanMessage("What is my name?")])

    assert from_history.text.startswith("Your name is Ada")
    assert from_summary.text.startswith("Your name is Grace")
    assert "haven't told me" in unknown.text


async def test_summarizes_a_transcript(model: OfflineChatModel) -> None:
    call = {"name": "calculator", "args": {"expression": "12*7"}, "id": "call_1"}
    history = [
        HumanMessage("Hi, my name is Ada"),
        AIMessage("Nice to meet you, Ada!"),
        HumanMessage("what is 12*7"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("12*7 = 84", tool_call_id="call_1", name="calculator"),
        AIMessage("The answer is 84."),
    ]
    transcript = get_buffer_string(
        history, human_prefix="User", ai_prefix="Assistant", format="xml"
    )
    prompt = f"Summarize the conversation below.\n\n{transcript}"

    assert [type(m) for m in parse_transcript(transcript)] == [type(m) for m in history]
    summary = await model.ainvoke([HumanMessage(prompt)])
    assert summary.text == (
        "The user's name is Ada. Then the user asked about 12*7. The calculator gave 12*7 = 84."
    )


async def test_stop_sequence_cuts_the_reply(model: OfflineChatModel) -> None:
    reply = await model.ainvoke(QUESTION, stop=["."])
    assert "." not in reply.text
    assert reply.text


async def test_paces_tokens_without_blocking(
    monkeypatch: pytest.MonkeyPatch, model: OfflineChatModel
) -> None:
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)

    monkeypatch.setattr("chat_service.offline_model.asyncio.sleep", record)
    chunks = await collect(OfflineChatModel(tokens_per_second=50), QUESTION)
    unpaced = await collect(model, QUESTION)

    assert delays == [pytest.approx(0.02)] * (len(chunks) - 1)
    assert len(unpaced) == len(chunks)


def test_rejects_a_negative_pace() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        OfflineChatModel(tokens_per_second=-1)
