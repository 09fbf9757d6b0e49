"""The reference chat service speaks both client protocols on its own threads and auth:
`/api/chat` (AI SDK, chat id = thread id) and `/langgraph` (LangGraph SDK, graph `agent`)."""

from __future__ import annotations

import contextlib
import re
import secrets
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from langgraph_sdk import get_client

from tests._services import REPO_ROOT, AppProcess, run_app_subprocess
from tests.clients.conftest import run_node

CHAT_DIR = REPO_ROOT / "examples" / "chat"
ORIGIN = "http://ui.example"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    data = tmp_path_factory.mktemp("chat-protocols")
    env = {
        "DATA_DIR": str(data),
        "CHAT_MODEL": "offline",
        "SECRET_KEY": "test-secret-key",
        "OFFLINE_TOKENS_PER_SECOND": "10",  # slow enough to stop an answer halfway
        "REDIS_URL": "",
        "DATABASE_URL": "",
        "WORKER_MODE": "",
        "CORS_ORIGINS": ORIGIN,
    }
    with run_app_subprocess([sys.executable, "-m", "chat_service"], env, cwd=CHAT_DIR) as app:
        yield app


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {secrets.token_hex(16)}"}


def history(service: AppProcess, headers: dict[str, str], thread_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{service.url}/v1/thread", params={"thread_id": thread_id}, headers=headers
    )
    response.raise_for_status()
    return dict(response.json())


async def langgraph_run(
    service: AppProcess, headers: dict[str, str], prompt: str, modes: list[str]
) -> tuple[str, list[Any], dict[str, Any]]:
    """A new thread's id, the parts of one run of `prompt` on it, and its state after."""
    async with get_client(url=f"{service.url}/langgraph", headers=headers) as client:
        thread_id = (await client.threads.create())["thread_id"]
        parts = [
            p
            async for p in client.runs.stream(
                thread_id,
                "agent",
                input={"messages": [{"type": "human", "content": prompt}]},
                stream_mode=modes,
            )
        ]
        return thread_id, parts, dict(await client.threads.get_state(thread_id))


async def test_langgraph_threads_are_the_service_threads(service: AppProcess) -> None:
    headers = bearer()
    thread_id, parts, state = await langgraph_run(
        service, headers, "hello there", ["values", "messages-tuple"]
    )
    assert parts[0].event == "metadata"
    assert parts[-1].event == "end"
    streamed = "".join(
        p.data[0]["content"]
        for p in parts
        if p.event == "messages" and p.data[0]["type"] == "AIMessageChunk"
    )
    answer = state["values"]["messages"][-1]["content"]
    assert streamed == answer
    # The same thread, owner and history in the service's own API.
    async with httpx.AsyncClient(base_url=service.url, headers=headers) as http:
        listed = (await http.get("/v1/threads")).json()["threads"]
        found = await http.get("/v1/thread", params={"thread_id": thread_id})
    assert thread_id in [t["thread_id"] for t in listed]
    messages = found.json()["messages"]
    assert [(m["role"], m["text"]) for m in messages] == [
        ("user", "hello there"),
        ("assistant", answer),
    ]
    # Another user does not see it.
    async with get_client(url=f"{service.url}/langgraph", headers=bearer()) as stranger:
        with pytest.raises(httpx.HTTPStatusError) as missing:
            await stranger.threads.get_state(thread_id)
    assert missing.value.response.status_code == 404


async def test_langgraph_tools_mode_follows_the_agents_tool_calls(service: AppProcess) -> None:
    # Regression: stream_mode "tools" (useStream's toolProgress and onToolEvent) was 422.
    _, parts, state = await langgraph_run(
        service, bearer(), "what is 12*7", ["tools", "messages-tuple"]
    )
    assert parts[-1].event == "end"
    [call] = [m for m in state["values"]["messages"] if m["type"] == "ai" and m["tool_calls"]]
    tools = [p.data for p in parts if p.event == "tools"]
    assert [t["event"] for t in tools] == ["on_tool_start", "on_tool_end"]
    assert {t["toolCallId"] for t in tools} == {call["tool_calls"][0]["id"]}
    assert {t["name"] for t in tools} == {"calculator"}
    assert tools[0]["input"] == {"expression": "12*7"}
    assert tools[1]["output"]["content"] == "12*7 = 84"
    assert {p.event for p in parts} == {"metadata", "tools", "messages", "end"}


async def test_langgraph_runs_while_the_thread_answers_follow_their_strategy(
    service: AppProcess,
) -> None:
    headers = bearer()
    async with get_client(url=f"{service.url}/langgraph", headers=headers) as client:
        thread_id = (await client.threads.create())["thread_id"]
        stream = client.runs.stream(
            thread_id,
            "agent",
            input={"messages": [{"type": "human", "content": "hello"}]},
            stream_mode="messages-tuple",  # the model streams, at 10 tokens/s in this service
        )
        first = [await anext(stream)]
        with pytest.raises(httpx.HTTPStatusError) as busy:  # no strategy: reject
            await client.runs.create(thread_id, "agent", input={"messages": []})
        queued = await client.runs.create(
            thread_id,
            "agent",
            input={"messages": [{"type": "human", "content": "and then"}]},
            multitask_strategy="enqueue",
        )
        first += [part async for part in stream]
        values = await client.runs.join(thread_id, queued["run_id"])
    assert busy.value.response.status_code == 409
    assert queued["status"] == "pending"
    assert first[-1].event == "end"
    assert [m["type"] for m in values["messages"]] == ["human", "ai", "human", "ai"]
    assert values["messages"][2]["content"] == "and then"


def test_use_stream_shows_tool_progress(service: AppProcess, node_modules: Path) -> None:
    # Regression: a UI reading useStream's toolProgress asks for stream_mode "tools", which
    # was 422: the submit failed (onError) and no answer came.
    token = bearer()["Authorization"].removeprefix("Bearer ")
    seen = run_node(node_modules, "langgraph_tool_progress.mjs", service.url, token, "what is 2*21")
    assert seen["error"] is None
    assert seen["types"] == ["human", "ai", "tool", "ai"]
    [call_id] = seen["toolCallIds"]
    assert seen["states"][-1] == {"name": "calculator", "state": "completed", "toolCallId": call_id}
    assert seen["events"] == [["on_tool_start", "calculator"], ["on_tool_end", "calculator"]]


async def test_use_stream_gives_a_tool_messages_artifact(
    service: AppProcess, node_modules: Path
) -> None:
    # web_search returns its hits as the ToolMessage's artifact: useStream's messages
    # carry it as the thread's state holds it, as from the Agent Server.
    headers = bearer()
    token = headers["Authorization"].removeprefix("Bearer ")
    seen = run_node(
        node_modules, "langgraph_tool_progress.mjs", service.url, token, "search redis streams"
    )
    assert seen["error"] is None
    assert seen["types"] == ["human", "ai", "tool", "ai"]
    [artifact] = seen["artifacts"]
    assert artifact and set(artifact[0]) == {"title", "snippet", "source"}
    _, _, state = await langgraph_run(service, headers, "search redis streams", ["values"])
    [stored] = [m["artifact"] for m in state["values"]["messages"] if m["type"] == "tool"]
    assert artifact == stored


def test_ai_sdk_on_service_threads(service: AppProcess, node_modules: Path) -> None:
    headers = bearer()
    token = headers["Authorization"].removeprefix("Bearer ")
    threads = [
        httpx.post(f"{service.url}/langgraph/threads", json={}, headers=headers).json()["thread_id"]
        for _ in range(2)
    ]
    seen = run_node(node_modules, "ai_sdk_service.mjs", service.url, token, *threads)
    messages = history(service, headers, threads[0])["messages"]
    assert messages[0] == {**messages[0], "role": "user", "text": "hello there"}
    assert seen["text"] == messages[-1]["text"]  # the stored answer, nothing more or less
    assert seen["resumedAfterEnd"] is None
    assert seen["stopStatus"] == 200
    assert seen["lastTypes"] == ["text-end", "abort"]


def test_cors_exposes_the_rejoin_headers(service: AppProcess) -> None:
    response = httpx.options(
        f"{service.url}/langgraph/threads",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
    )
    assert response.status_code == 200
    thread = httpx.post(
        f"{service.url}/langgraph/threads", json={}, headers={"Origin": ORIGIN, **bearer()}
    )
    exposed = thread.headers["access-control-expose-headers"].lower()
    assert "content-location" in exposed
    assert "location" in exposed.split(", ")


def calculator_part(output: str, expression: str) -> dict[str, Any]:
    return {
        "type": "tool-calculator",
        "state": "output-available",
        "input": {"expression": expression},
        "output": output,
    }


def test_use_chat_shows_tool_results_live_and_on_resume(
    service: AppProcess, node_modules: Path
) -> None:
    # Issue 10: the chat service stored no tool results, so useChat showed the calculator's
    # call but never its output.
    headers = bearer()
    token = headers["Authorization"].removeprefix("Bearer ")
    thread_id = httpx.post(f"{service.url}/langgraph/threads", json={}, headers=headers).json()[
        "thread_id"
    ]
    seen = run_node(
        node_modules,
        "ai_sdk_service_tools.mjs",
        service.url,
        token,
        "what is 12*7",
        "and what is 2+3?",
        thread_id,
    )
    messages = history(service, headers, thread_id)["messages"]

    assert seen["error"] is None
    assert seen["chatId"] == thread_id
    assert seen["resumeStatuses"] == [204, 200]  # nothing yet; then the answer in progress
    for tools, expression, output in [
        (seen["cutTools"], "12*7", "12*7 = 84"),
        (seen["resumedTools"], "12*7", "12*7 = 84"),
        (seen["secondTools"], "2+3", "2+3 = 5"),
    ]:
        assert len(tools) == 1
        assert tools[0] == {**tools[0], **calculator_part(output, expression)}
    assert seen["resumedTools"][0]["toolCallId"] == seen["cutTools"][0]["toolCallId"]
    assert seen["resumedId"] == seen["cutId"]  # the resume replaced the cut message
    assert seen["roles"] == ["user", "assistant", "user", "assistant"]
    assistant = [m["text"] for m in messages if m["role"] == "assistant" and m["text"]]
    assert [seen["resumedText"], seen["secondText"]] == assistant


async def test_use_chat_without_an_id_starts_a_thread_with_its_own_id(
    service: AppProcess, node_modules: Path
) -> None:
    # Issue 10: useChat without `id` sends the SDK's 16-character chat id, which was a 404.
    headers = bearer()
    token = headers["Authorization"].removeprefix("Bearer ")
    seen = run_node(
        node_modules,
        "ai_sdk_service_tools.mjs",
        service.url,
        token,
        "what is 12*7",
        "and what is 2+3?",
    )
    chat_id = seen["chatId"]
    assert re.fullmatch(r"[A-Za-z0-9]{16}", chat_id), chat_id
    assert seen["error"] is None
    assert seen["resumeStatuses"] == [204, 200]
    assert seen["roles"] == ["user", "assistant", "user", "assistant"]
    assert seen["secondTools"][0]["output"] == "2+3 = 5"

    # The same thread, owned by the caller, in the service's API and the LangGraph API.
    messages = history(service, headers, chat_id)["messages"]
    async with httpx.AsyncClient(base_url=service.url, headers=headers) as http:
        listed = (await http.get("/v1/threads")).json()["threads"]
    async with get_client(url=f"{service.url}/langgraph", headers=headers) as client:
        state = await client.threads.get_state(chat_id)
    assert chat_id in [t["thread_id"] for t in listed]
    assert [m["text"] for m in messages if m["role"] == "user"] == [
        "what is 12*7",
        "and what is 2+3?",
    ]
    assert messages[-1]["text"] == seen["secondText"]
    assert state["values"]["messages"][-1]["content"] == seen["secondText"]

    # Another user cannot adopt it, resume it or read it.
    stranger = bearer()
    body = {"id": chat_id, "messages": [ui_user_message("mine now")]}
    async with httpx.AsyncClient(base_url=service.url, headers=stranger) as http:
        taken = await http.post("/api/chat", json=body)
        resume = await http.get(f"/api/chat/{chat_id}/stream")
        read = await http.get("/v1/thread", params={"thread_id": chat_id})
    assert (taken.status_code, taken.json()["code"]) == (404, "thread_not_found")
    # (Its resume answers as for a chat nobody has started: 204, with nothing to read.)
    assert (resume.status_code, resume.content, read.status_code) == (204, b"", 404)
    assert len(history(service, headers, chat_id)["messages"]) == len(messages)


async def test_langgraph_clients_may_name_their_threads(service: AppProcess) -> None:
    headers = bearer()
    thread_id = str(uuid.uuid4())
    async with get_client(url=f"{service.url}/langgraph", headers=headers) as client:
        created = await client.threads.create(thread_id=thread_id, metadata={"title": "Named"})
        again = await client.threads.create(thread_id=thread_id)
    async with get_client(url=f"{service.url}/langgraph", headers=bearer()) as stranger:
        with pytest.raises(httpx.HTTPStatusError) as taken:
            await stranger.threads.create(thread_id=thread_id)
        with pytest.raises(httpx.HTTPStatusError) as invalid:
            await stranger.threads.create(thread_id="too-short")
    async with httpx.AsyncClient(base_url=service.url, headers=headers) as http:
        listed = (await http.get("/v1/threads")).json()["threads"]
    assert created["thread_id"] == again["thread_id"] == thread_id
    assert [(t["thread_id"], t["title"]) for t in listed] == [(thread_id, "Named")]
    assert taken.value.response.status_code == 409
    assert taken.value.response.json()["code"] == "thread_id_taken"
    assert invalid.value.response.status_code == 422
    assert invalid.value.response.json()["code"] == "invalid_request"


async def test_a_langgraph_run_with_if_not_exists_create_makes_the_thread(
    service: AppProcess,
) -> None:
    # Regression: `if_not_exists="create"` was ignored: a run on a thread id the service
    # had not made was 404, where the Agent Server creates the thread.
    headers = bearer()
    thread_id = str(uuid.uuid4())
    body = {"input": {"messages": [{"type": "human", "content": "hello"}]}}
    async with get_client(url=f"{service.url}/langgraph", headers=headers) as client:
        with pytest.raises(httpx.HTTPStatusError) as missing:
            await client.runs.wait(thread_id, "agent", **body)  # "reject", the default
        values = await client.runs.wait(thread_id, "agent", **body, if_not_exists="create")
        thread = await client.threads.get(thread_id)
    async with get_client(url=f"{service.url}/langgraph", headers=bearer()) as stranger:
        with pytest.raises(httpx.HTTPStatusError) as taken:
            await stranger.runs.wait(thread_id, "agent", **body, if_not_exists="create")
    assert missing.value.response.status_code == 404
    assert [m["type"] for m in values["messages"]] == ["human", "ai"]
    assert thread["metadata"]["graph_id"] == "agent"
    assert len(history(service, headers, thread_id)["messages"]) == 2
    assert taken.value.response.status_code == 409  # another user's id, as threads.create
    assert taken.value.response.json()["code"] == "thread_id_taken"


async def test_langgraph_threads_get_returns_the_thread_record(service: AppProcess) -> None:
    # Issue 10: GET /langgraph/threads/{id} answered the time of the request as created_at,
    # and no metadata.
    headers = bearer()
    async with get_client(url=f"{service.url}/langgraph", headers=headers) as client:
        created = await client.threads.create(metadata={"title": "Trip plans"})
        thread_id = created["thread_id"]
        before = await client.threads.get(thread_id)
        async for _ in client.runs.stream(
            thread_id, "agent", input={"messages": [{"role": "user", "content": "hello"}]}
        ):
            pass
        after = await client.threads.get(thread_id)
    async with httpx.AsyncClient(base_url=service.url, headers=headers) as http:
        [listed] = (await http.get("/v1/threads")).json()["threads"]

    def stamp(value: str) -> float:
        return datetime.fromisoformat(value).timestamp()

    assert before["thread_id"] == after["thread_id"] == listed["thread_id"] == thread_id
    assert created["created_at"] == before["created_at"] == after["created_at"]
    assert stamp(after["created_at"]) == pytest.approx(listed["created_at"], abs=1e-5)
    assert stamp(after["updated_at"]) == pytest.approx(listed["updated_at"], abs=1e-5)
    assert stamp(after["updated_at"]) > stamp(before["updated_at"])  # the run changed it
    assert after["metadata"] == {
        "title": "Trip plans",
        "archived": False,
        "graph_id": "agent",
        "assistant_id": "agent",
    }
    assert after["status"] == "idle"


async def test_langgraph_threads_search_lists_the_callers_threads(service: AppProcess) -> None:
    # Regression: threads.search (Agent Chat UI's thread list) and GET /info were 404.
    mine, theirs = bearer(), bearer()
    async with (
        get_client(url=f"{service.url}/langgraph", headers=mine) as client,
        get_client(url=f"{service.url}/langgraph", headers=theirs) as other,
    ):
        first = (await client.threads.create(metadata={"title": "First"}))["thread_id"]
        second = (await client.threads.create(metadata={"title": "Second"}))["thread_id"]
        await other.threads.create(metadata={"title": "Not mine"})
        async for _ in client.runs.stream(
            first, "agent", input={"messages": [{"role": "user", "content": "hello"}]}
        ):
            pass
        found = await client.threads.search(metadata={"graph_id": "agent"}, limit=100)
        titled = await client.threads.search(metadata={"title": "Second"})
        oldest = await client.threads.search(sort_by="created_at", sort_order="asc", limit=1)
    async with httpx.AsyncClient(base_url=service.url) as http:
        assert (await http.get("/langgraph/info")).status_code == 200
    # Most recently active first: the run made the first thread the latest.
    assert [t["thread_id"] for t in found] == [first, second]
    assert found[0]["values"]["messages"][0]["content"] == "hello"
    assert [t["thread_id"] for t in titled] == [second]
    assert [t["thread_id"] for t in oldest] == [first]


@contextlib.contextmanager
def recording_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on a loopback port that records the path of every request (and
    answers 500): its base URL, and the paths it got."""
    seen: list[str] = []

    class Recorder(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.path)
            self.send_response(500)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


async def test_a_langgraph_run_uses_only_the_models_the_service_offers(
    service: AppProcess,
) -> None:
    # Regression: a run's config.configurable.model reached the agent unchecked, so any
    # caller ran a model the service does not offer, such as an OpenAI-compatible server
    # at a URL of its choosing: the service sent the conversation there, with its
    # OPENAI_COMPATIBLE_API_KEY. The chat API refuses such a model (422 unknown_model).
    with recording_server() as (url, seen):
        async with get_client(url=f"{service.url}/langgraph", headers=bearer()) as client:
            thread_id = (await client.threads.create())["thread_id"]
            parts = [
                part
                async for part in client.runs.stream(
                    thread_id,
                    "agent",
                    input={"messages": [{"role": "user", "content": "hello"}]},
                    config={"configurable": {"model": f"openai-compatible:any@{url}/v1"}},
                )
            ]
    assert parts[-1].event == "error"
    assert parts[-1].data["error"] == "UnknownModelError"
    assert "GET /info lists the models" in parts[-1].data["message"]
    assert seen == []


async def test_a_langgraph_run_on_an_archived_thread_is_refused(service: AppProcess) -> None:
    # Regression: an archived thread is read-only (the chat API answers 409
    # thread_archived), but a LangGraph run wrote to it.
    headers = bearer()
    async with get_client(url=f"{service.url}/langgraph", headers=headers) as client:
        thread_id = (await client.threads.create())["thread_id"]
        async with httpx.AsyncClient(base_url=service.url, headers=headers) as http:
            assert (await http.put(f"/threads/{thread_id}/archive")).status_code == 200
        with pytest.raises(httpx.HTTPStatusError) as refused:
            await client.runs.wait(
                thread_id,
                "agent",
                input={"messages": [{"role": "user", "content": "hello"}]},
            )
        with pytest.raises(httpx.HTTPStatusError) as edit:  # a write too
            await client.threads.update_state(
                thread_id, {"messages": [{"role": "user", "content": "hello"}]}
            )
        # Not served: the service keeps its own threads (DELETE /v1/thread deletes them).
        with pytest.raises(httpx.HTTPStatusError) as delete:
            await client.threads.delete(thread_id)
        state = await client.threads.get_state(thread_id)
    assert refused.value.response.status_code == 409
    assert refused.value.response.json()["code"] == "thread_archived"
    assert "archived" in refused.value.response.json()["message"]
    assert edit.value.response.status_code == 409
    assert delete.value.response.status_code == 405
    assert state["values"] in ({}, None, {"messages": []})


def ui_user_message(text: str) -> dict[str, Any]:
    return {"id": secrets.token_hex(8), "role": "user", "parts": [{"type": "text", "text": text}]}
