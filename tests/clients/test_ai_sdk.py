"""The AI SDK protocol against the real `ai` and `@ai-sdk/react` clients and a real uvicorn.

Memory transport in one server, and Redis shared by two server processes (the answer runs
in one, the client resumes from the other).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resumable_stream import Event
from resumable_stream.ai_sdk import UIMessageChunks
from tests._services import run_app_subprocess, uvicorn_command, uvicorn_server
from tests.clients._app import METADATA_MODEL, USAGES, answer_text, create_app
from tests.clients.conftest import run_node
from tests.test_ai_sdk import (
    FINISHES,
    REASONING_CHUNKS,
    agent_graph,
    asking_graph,
    failing_search,
    finishing_graph,
    handoff_source,
    parallel_subagent_events,
    reasoning_graph,
    stored_events,
    streaming_tool_graph,
    subagent_events,
    tools_running_when_the_answer_ends,
)

APP = "tests.clients._app:create_app"


@pytest.fixture
def memory_server() -> Iterator[str]:
    with uvicorn_server(create_app()) as url:
        yield url


def _check_transport_run(seen: dict[str, object], prompt: str) -> None:
    expected = answer_text(prompt)
    assert seen["cutText"] == expected[: len(seen["cutText"])]  # type: ignore[arg-type]
    assert seen["text"] == expected  # the whole answer: no gap, no duplicate
    assert seen["id"] == seen["cutId"]  # the replay is the same message
    assert seen["afterEnd"] is None  # 204 once the answer is over
    parts = seen["parts"]
    assert isinstance(parts, list)
    tools = [p for p in parts if p["type"] == "tool-search"]
    assert len(tools) == 1
    assert tools[0]["state"] == "output-available"
    assert tools[0]["input"] == {"q": prompt}
    assert tools[0]["output"] == f"found {prompt}"
    assert [p["data"] for p in parts if p["type"] == "data-progress"] == [{"step": 1}]
    assert [p["type"] for p in parts].count("text") == 1
    assert seen["stopStatus"] == 202
    assert seen["stopText"] == expected[: len(seen["stopText"])]  # type: ignore[arg-type]
    assert seen["stopLast"] == ["text-end", "abort"]


def test_transport_cut_and_resume_memory(node_modules: Path, memory_server: str) -> None:
    seen = run_node(node_modules, "ai_sdk_transport.mjs", memory_server, memory_server, "w")
    _check_transport_run(seen, "w")


@pytest.fixture
def redis_servers(redis_flush: str) -> Iterator[tuple[str, str]]:
    env = {"RSTREAM_TEST_URL": redis_flush}
    with (
        run_app_subprocess(uvicorn_command(APP, "--factory"), env) as first,
        run_app_subprocess(uvicorn_command(APP, "--factory"), env) as second,
    ):
        yield first.url, second.url


def test_transport_resume_on_another_process_redis(
    node_modules: Path, redis_servers: tuple[str, str]
) -> None:
    first, second = redis_servers
    seen = run_node(node_modules, "ai_sdk_transport.mjs", first, second, "r")
    _check_transport_run(seen, "r")


def _check_use_chat_run(seen: dict[str, object], prompt: str) -> None:
    expected = answer_text(prompt)
    assert seen["error"] is None
    assert seen["roles"] == ["user", "assistant"]  # the resumed answer replaced, not added
    assert seen["id"] == seen["cutId"]
    assert seen["text"] == expected
    assert seen["resumeStatuses"] == [200, 204]
    assert seen["afterRoles"] == ["user", "assistant"]
    assert seen["afterText"] == expected
    parts = seen["parts"]
    assert isinstance(parts, list)
    assert [p["state"] for p in parts if p["type"] == "tool-search"] == ["output-available"]


def test_use_chat_resume_memory(node_modules: Path, memory_server: str) -> None:
    seen = run_node(node_modules, "ai_sdk_use_chat.mjs", memory_server, memory_server, "u")
    _check_use_chat_run(seen, "u")


def test_use_chat_resume_on_another_process_redis(
    node_modules: Path, redis_servers: tuple[str, str]
) -> None:
    first, second = redis_servers
    seen = run_node(node_modules, "ai_sdk_use_chat.mjs", first, second, "v")
    _check_use_chat_run(seen, "v")


def _check_client_tool_run(seen: dict[str, Any], prompt: str) -> None:
    expected = answer_text(prompt)
    assert seen["error"] is None
    # The tool's output sent the assistant message back once (a continuation), not again
    # after the answer (its text is a new step), and the answer went on in that message.
    assert seen["postedRoles"] == [["user"], ["user", "assistant"]]
    continued = seen["continuedId"]
    for name in ("liveHalf", "live", "reloadedHalf", "reloaded", "after"):
        messages = seen[name]
        assert [m["role"] for m in messages] == ["user", "assistant"], name
        assert messages[1]["id"] == continued, name
    live = seen["live"][1]
    assert live["tools"] == ["output-available"]  # the call and its output, once
    assert live["text"] == expected
    # The reloaded page's replay is the continuation (the client rebuilds a replayed
    # message from its `start`): the same message, the answer whole, nothing twice.
    assert seen["reloaded"][1]["text"] == expected
    assert seen["resumeStatuses"] == [200, 204]


def test_client_tool_continuation_memory(node_modules: Path, memory_server: str) -> None:
    seen = run_node(node_modules, "ai_sdk_client_tool.mjs", memory_server, memory_server, "t")
    _check_client_tool_run(seen, "t")


def test_client_tool_continuation_resumed_on_another_process_redis(
    node_modules: Path, redis_servers: tuple[str, str]
) -> None:
    first, second = redis_servers
    seen = run_node(node_modules, "ai_sdk_client_tool.mjs", first, second, "k")
    _check_client_tool_run(seen, "k")


def _check_metadata_run(seen: dict[str, Any], prompt: str) -> None:
    assert seen["error"] is None
    assert seen["wholeStatus"] == "ready"
    usage = {
        "inputTokens": sum(u["input_tokens"] for u in USAGES),
        "outputTokens": sum(u["output_tokens"] for u in USAGES),
        "totalTokens": sum(u["total_tokens"] for u in USAGES),
    }
    for name in ("whole", "resumed"):
        message = seen[name]
        assert message["text"] == answer_text(prompt), name
        # `start`'s metadata and `finish`'s, merged by the client
        assert message["metadata"] == {
            "model": METADATA_MODEL,
            "messageId": message["id"],
            "finishReason": "stop",
            "usage": usage,
        }, name
    # Halfway, the answer has its `start`'s metadata; the replay (another process's, from
    # storage) gives the same message the same metadata, and the whole usage at its end.
    assert seen["cut"]["metadata"] == {"model": METADATA_MODEL, "messageId": seen["cut"]["id"]}
    assert seen["resumed"]["id"] == seen["cut"]["id"]
    assert seen["resumedRoles"] == ["user", "assistant"]


def test_message_metadata_of_a_whole_and_a_resumed_answer_memory(
    node_modules: Path, memory_server: str
) -> None:
    seen = run_node(node_modules, "ai_sdk_metadata.mjs", memory_server, memory_server, "m")
    _check_metadata_run(seen, "m")


def test_message_metadata_of_an_answer_resumed_on_another_process_redis(
    node_modules: Path, redis_servers: tuple[str, str]
) -> None:
    first, second = redis_servers
    seen = run_node(node_modules, "ai_sdk_metadata.mjs", first, second, "n")
    _check_metadata_run(seen, "n")


def test_an_answer_ending_with_a_server_tool_is_not_posted_back(
    node_modules: Path, memory_server: str
) -> None:
    # Regression: the outputs of the server's tools were those of client-side tools for
    # lastAssistantMessageIsCompleteWithToolCalls, so an answer that ended with one (a tool
    # with return_direct, a graph interrupted after its tools, a stop after a tool) was
    # posted back at once, and forever by a source that answers it the same way.
    seen = run_node(node_modules, "ai_sdk_server_tool_end.mjs", memory_server, "d")
    assert seen["error"] is None
    assert seen["postedRoles"] == [["user"]]
    assert [(p["type"], p["state"]) for p in seen["parts"]] == [
        ("step-start", None),
        ("tool-search", "output-available"),
    ]


def read_body(node_modules: Path, tmp_path: Path, events: list[Event]) -> Any:
    """What the real `ai` Chat shows of an answer whose response is these events, encoded."""
    chunker = UIMessageChunks("answer-1")
    body = tmp_path / "body.txt"
    body.write_bytes(b"".join(chunker.encode(event) for event in events))
    return run_node(node_modules, "ai_sdk_read_body.mjs", str(body))


def _cut(reason: str) -> list[Event]:
    token = Event("token", {"text": "half an ans", "message_id": "m1", "node": None}, "1-1-0")
    return [token, Event("cancelled", {"reason": reason}, "1-2-0")]


def test_an_answer_cut_by_a_shutdown_is_an_error_not_a_whole_answer(
    node_modules: Path, tmp_path: Path
) -> None:
    # Regression: a shutdown's `cancelled` was an `abort` part, which `ai` 7 takes as the
    # end of a whole answer ("ready", no error): the user saw half an answer as the answer.
    # Nothing goes on with it (the run was this process's), so the client must say so.
    shutdown = read_body(node_modules, tmp_path, _cut("shutdown"))
    assert shutdown["status"] == "error"
    assert "server shut down" in shutdown["error"]
    assert shutdown["parts"][-1]["text"] == "half an ans"
    # A stop the user asked for is still an abort: the answer ends where it was stopped.
    stopped = read_body(node_modules, tmp_path, _cut("requested"))
    assert (stopped["status"], stopped["error"]) == ("ready", None)


async def test_a_tool_call_streamed_in_messages_mode_shows_its_input(
    node_modules: Path, tmp_path: Path
) -> None:
    # Regression: in `messages` mode the UI showed the input of every tool call as {}.
    inputs = {"messages": [("user", "look x up")]}
    source = streaming_tool_graph().astream(inputs, stream_mode="messages")
    seen = read_body(node_modules, tmp_path, await stored_events(source))
    assert seen["error"] is None
    tools = [p for p in seen["parts"] if p["type"] == "tool-search"]
    assert [(p["state"], p["input"], p["output"]) for p in tools] == [
        ("output-available", {"q": "x"}, "found x")
    ]
    browser = streaming_tool_graph(tools=False).astream(inputs, stream_mode="messages")
    seen = read_body(node_modules, tmp_path, await stored_events(browser))
    tools = [p for p in seen["parts"] if p["type"] == "tool-search"]
    assert [(p["state"], p["input"]) for p in tools] == [("input-available", {"q": "x"})]


@pytest.mark.parametrize(
    "terminal",
    [
        Event("error", {"message": "boom"}, "1-2-0"),
        Event("cancelled", {"reason": "requested"}, "1-2-0"),
    ],
)
def test_a_call_still_streaming_when_the_answer_ends_is_not_left_streaming(
    node_modules: Path, tmp_path: Path, terminal: Event
) -> None:
    # Regression: the part stayed in input-streaming (the UI showed the call as still
    # being made). Stopped, `ai` decides whether to post the answer back: not for it.
    piece = {"id": "call_1", "name": "search", "args": '{"q": "x', "index": 0}
    data = {"text": "", "message_id": "m1", "node": "agent", "tool_call_chunks": [piece]}
    seen = read_body(node_modules, tmp_path, [Event("token", data, "1-1-0"), terminal])
    tools = [p for p in seen["parts"] if p["type"] == "tool-search"]
    assert [p["state"] for p in tools] == ["output-error"]
    assert seen["posts"] == 1


@pytest.mark.parametrize("outcome", ["stop", "error"])
async def test_a_tool_still_running_when_the_answer_ends_shows_as_failed(
    node_modules: Path, tmp_path: Path, outcome: str
) -> None:
    # Regression: a server tool the stop (or the failure) cut stayed input-available: the
    # UI showed it running for good. It shows failed, and the answer is not posted back.
    seen = read_body(node_modules, tmp_path, await tools_running_when_the_answer_ends(outcome))
    tools = {p["input"]["q"]: p for p in seen["parts"] if p["type"] == "tool-search"}
    unfinished = ("output-error", "the answer ended before this tool finished")
    assert (tools["x"]["state"], tools["x"]["errorText"]) == unfinished
    if outcome == "stop":
        assert (tools["y"]["state"], tools["y"]["errorText"]) == unfinished
        assert (seen["status"], seen["error"]) == ("ready", None)
    else:
        # Its own error, whose message stays on the server by default (error_text).
        assert (tools["y"]["state"], tools["y"]["errorText"]) == (
            "output-error",
            "An error occurred.",
        )
        assert seen["status"] == "error"
    assert seen["posts"] == 1


def test_a_streamed_call_whose_arguments_are_not_json_is_not_run_by_the_browser(
    node_modules: Path, tmp_path: Path
) -> None:
    # Regression: it was input-available with the arguments' raw text as input, and the
    # browser's tool ran (onToolCall) with a string for its arguments.
    piece = {"id": "call_1", "name": "search", "args": '{"q": "x', "index": 0}
    data = {"text": "", "message_id": "m1", "node": "agent", "tool_call_chunks": [piece]}
    events = [Event("token", data, "1-1-0"), Event("end", {}, "1-2-0")]
    seen = read_body(node_modules, tmp_path, events)
    tools = [p for p in seen["parts"] if p["type"] == "tool-search"]
    assert [p["state"] for p in tools] == ["output-error"]
    assert (seen["status"], seen["posts"]) == ("ready", 1)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("mode", ["messages", "events"])
@pytest.mark.parametrize("shape", sorted(REASONING_CHUNKS))
async def test_a_models_reasoning_shows_as_reasoning_before_its_answer(
    node_modules: Path, tmp_path: Path, shape: str, mode: str, stream: bool
) -> None:
    # Regression: reasoning (thinking blocks, reasoning blocks and summaries,
    # reasoning_content) was dropped: useChat showed the answer only.
    graph = reasoning_graph(shape, stream)
    inputs = {"messages": [("user", "hi")]}
    if mode == "messages":
        source = graph.astream(inputs, stream_mode="messages")
    else:
        source = graph.astream_events(inputs, version="v2")
    seen = read_body(node_modules, tmp_path, await stored_events(source))
    assert seen["error"] is None
    assert [(p["type"], p["state"], p["text"]) for p in seen["parts"]] == [
        ("step-start", None, None),
        ("reasoning", "done", "Let me think."),
        ("text", "done", "Hello there"),
    ]


@pytest.mark.parametrize("mode", ["messages", "events"])
async def test_a_tool_that_handles_its_own_error_shows_as_failed(
    node_modules: Path, tmp_path: Path, mode: str
) -> None:
    # Regression: a tool with handle_tool_error (a ToolException, or bad arguments with
    # handle_validation_error) ends with a ToolMessage of status "error", not a tool error:
    # with astream_events the UI showed the error as the tool's output (output-available).
    graph = agent_graph(tools=[failing_search])
    inputs = {"messages": [("user", "look up x and y")]}
    if mode == "messages":
        source = graph.astream(inputs, stream_mode="messages")
    else:
        source = graph.astream_events(inputs, version="v2")
    seen = read_body(node_modules, tmp_path, await stored_events(source))
    assert seen["error"] is None
    tools = [p for p in seen["parts"] if p["type"] == "tool-search"]
    assert sorted((p["state"], p["errorText"], p["output"]) for p in tools) == [
        ("output-error", "nothing found for x", None),
        ("output-error", "nothing found for y", None),
    ]


@pytest.mark.parametrize("mode", ["messages", "events"])
@pytest.mark.parametrize("shape", sorted(FINISHES))
async def test_the_finish_reason_is_the_models(
    node_modules: Path, tmp_path: Path, shape: str, mode: str
) -> None:
    # Regression: every answer finished with "stop": useChat's onFinish could not tell an
    # answer cut by the model's max_tokens (or a content filter) from a whole one.
    graph = finishing_graph(shape)
    inputs = {"messages": [("user", "hi")]}
    if mode == "messages":
        source = graph.astream(inputs, stream_mode="messages")
    else:
        source = graph.astream_events(inputs, version="v2")
    seen = read_body(node_modules, tmp_path, await stored_events(source))
    assert seen["error"] is None
    assert seen["finished"] == {
        "isAbort": False,
        "isError": False,
        "finishReason": FINISHES[shape][1],
    }


def test_a_streamed_call_answered_after_a_subagent_s_text_shows_once(
    node_modules: Path, tmp_path: Path
) -> None:
    # Regression: its input came in the step after the sub-agent's text began, and `ai`
    # added a second part for the call, leaving the first one streaming.
    seen = read_body(node_modules, tmp_path, subagent_events())
    assert seen["error"] is None
    tools = [
        (p["type"], p["state"], p["output"]) for p in seen["parts"] if p["type"].startswith("tool-")
    ]
    assert tools == [
        ("tool-search", "output-available", "found x"),
        ("tool-research", "output-available", "deep dive"),
    ]


def test_a_call_a_parallel_agent_still_streams_at_a_new_step_keeps_its_input(
    node_modules: Path, tmp_path: Path
) -> None:
    # Regression: another agent's new step cut the call half way through its arguments:
    # useChat showed its input as the text '{"q": ' (and, before, a second part for it).
    seen = read_body(node_modules, tmp_path, parallel_subagent_events())
    assert seen["error"] is None
    tools = [
        (p["type"], p["state"], p["input"], p["output"])
        for p in seen["parts"]
        if p["type"].startswith("tool-")
    ]
    assert tools == [
        ("tool-research_a", "output-available", {"q": "x"}, "A done"),
        ("tool-research_b", "output-available", {"q": "y"}, "B done"),
        ("tool-lookup", "output-available", {"q": "x1"}, "got x1"),
        ("tool-lookup", "output-available", {"q": "y1"}, "got y1"),
    ]


@pytest.mark.parametrize("mode", ["messages", "events"])
async def test_a_handoff_to_another_agent_shows_as_done(
    node_modules: Path, tmp_path: Path, mode: str
) -> None:
    # Regression: in `messages` mode (with `updates`), a supervisor's handoff (a tool's
    # Command to the parent graph) stayed input-available: useChat showed the call as
    # still waiting, as a browser tool's call, and the answer after it in the same step.
    seen = read_body(node_modules, tmp_path, await stored_events(handoff_source(mode)))
    assert seen["error"] is None
    assert [(p["type"], p["state"], p["output"], p["text"]) for p in seen["parts"]] == [
        ("step-start", None, None, None),
        ("tool-transfer_to_math", "output-available", "Transferred to math", None),
        ("step-start", None, None, None),
        ("text", "done", None, "42"),
    ]
    assert seen["posts"] == 1


async def test_a_graph_s_interrupt_shows_its_question(node_modules: Path, tmp_path: Path) -> None:
    # Regression: a graph that stopped at interrupt() to ask its user gave useChat an empty
    # answer (`update` events were not sent): the question never reached the page.
    graph = asking_graph()
    config = {"configurable": {"thread_id": "t"}}
    inputs = {"messages": [("user", "book it")]}
    events = await stored_events(graph.astream_events(inputs, config, version="v2"))
    (asked,) = (await graph.aget_state(config)).interrupts
    seen = read_body(node_modules, tmp_path, events)
    assert (seen["status"], seen["error"], seen["posts"]) == ("ready", None, 1)
    questions = [p["data"] for p in seen["parts"] if p["type"] == "data-interrupt"]
    assert [(q["id"], q["value"]) for q in questions] == [(asked.id, {"question": "Book it?"})]


def test_a_tool_s_interrupt_is_answered_by_a_tool_output(
    node_modules: Path, memory_server: str
) -> None:
    # docs/ai-sdk.md's recipe: the question shows; addToolOutput posts a continuation, whose
    # answer (the graph resumed with that output) goes on in the same message.
    # Regression: the resumed tool's output came as a second part of that tool (its run
    # does not name its call), so the message showed the tool twice.
    seen = run_node(node_modules, "ai_sdk_interrupt.mjs", memory_server, "tool")
    assert seen["error"] is None
    assert seen["asked"][-1]["parts"] == [
        ["tool-book", "input-available", None],
        ["data-interrupt", None, {"question": "Book it?"}],
    ]
    assert seen["postedRoles"] == [["user"], ["user", "assistant"]]
    assert (seen["finishes"], seen["status"]) == (["tool-calls", "stop"], "ready")
    # The paused call's own part holds the resumed tool's output: the tool shows once.
    assert seen["answered"][-1]["parts"] == [
        ["tool-book", "output-available", "booked x: yes"],
        ["data-interrupt", None, {"question": "Book it?"}],
        ["text", "done", "done: booked x: yes"],
    ]
    # A reloaded page's replay rebuilds the message from the continuation: the tool once
    # there too, then the answer.
    assert seen["reloadError"] is None
    assert seen["reloaded"][-1]["parts"] == [
        ["tool-book", "output-available", "booked x: yes"],
        ["text", "done", "done: booked x: yes"],
    ]


def test_a_tool_s_interrupt_is_answered_by_a_message(
    node_modules: Path, memory_server: str
) -> None:
    seen = run_node(node_modules, "ai_sdk_interrupt.mjs", memory_server, "message")
    assert seen["error"] is None
    assert seen["postedRoles"] == [["user"], ["user", "assistant", "user"]]
    # A new message: the resumed tool's call is not in it, so the stream announces it.
    expected = [
        ["tool-book", "output-available", "booked x: yes"],
        ["text", "done", "done: booked x: yes"],
    ]
    assert seen["answered"][-1]["parts"] == expected
    assert (seen["reloadError"], seen["reloaded"][-1]["parts"]) == (None, expected)
