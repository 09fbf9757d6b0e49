"""The LangGraph API subset against the real PyPI `langgraph-sdk` and a real uvicorn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from langgraph_sdk import get_client
from langgraph_sdk.client import LangGraphClient

from tests._services import AppProcess, run_app_subprocess, uvicorn_command, uvicorn_server
from tests.clients._graph import HOLD_AT, answer_text, create_app
from tests.clients.conftest import run_node

MODES = ["values", "messages-tuple", "custom"]


APP = "tests.clients._graph:create_app"


@pytest.fixture(params=["memory", "redis"])
def servers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two base URLs: one server twice (memory), or two processes sharing Redis + SQLite."""
    if request.param == "memory":
        with uvicorn_server(create_app()) as url:
            yield url, url
        return
    redis_url = request.getfixturevalue("redis_flush")
    env = {"RSTREAM_TEST_URL": redis_url, "RSTREAM_TEST_SQLITE": str(tmp_path / "cp.sqlite")}
    with (
        run_app_subprocess(uvicorn_command(APP, "--factory"), env) as first,
        run_app_subprocess(uvicorn_command(APP, "--factory"), env) as second,
    ):
        yield first.url, second.url


@pytest.fixture
def server(servers: tuple[str, str]) -> str:
    """The server that runs the runs (and gets the releases)."""
    return servers[0]


@pytest.fixture
async def client(servers: tuple[str, str]) -> AsyncIterator[LangGraphClient]:
    async with get_client(url=f"{servers[0]}/langgraph") as sdk:
        yield sdk


@pytest.fixture
async def other(servers: tuple[str, str]) -> AsyncIterator[LangGraphClient]:
    """A client of the other process (the same server on memory)."""
    async with get_client(url=f"{servers[1]}/langgraph") as sdk:
        yield sdk


def _text(parts: list[Any]) -> str:
    """The answer's text from `messages` tuples (AI message chunks only)."""
    return "".join(
        p.data[0]["content"]
        for p in parts
        if p.event == "messages" and p.data[0]["type"] == "AIMessageChunk"
    )


async def _release(server: str, thread_id: str) -> None:
    async with httpx.AsyncClient() as http:
        (await http.post(f"{server}/test/release/{thread_id}")).raise_for_status()


async def test_stream_cut_then_join_with_last_id_and_replay(
    server: str, client: LangGraphClient, other: LangGraphClient
) -> None:
    thread = await client.threads.create()
    thread_id = thread["thread_id"]
    created: list[Any] = []
    first: list[Any] = []
    stream = client.runs.stream(
        thread_id,
        "agent",
        input={"messages": [{"role": "user", "content": "p"}]},
        stream_mode=MODES,
        on_run_created=created.append,
    )
    async for part in stream:
        first.append(part)
        if _text(first).endswith(f"p{HOLD_AT - 1} "):
            break  # the client walks away mid-answer
    await stream.aclose()
    run_id = created[0]["run_id"]
    assert first[0].event == "metadata"
    assert first[0].data == {"run_id": run_id, "attempt": 1}
    assert any(p.event == "custom" and p.data == {"step": "prepare"} for p in first)
    assert (await client.runs.get(thread_id, run_id))["status"] == "running"

    await _release(server, thread_id)
    rest = [p async for p in other.runs.join_stream(thread_id, run_id, last_event_id=first[-1].id)]
    assert _text(first) + _text(rest) == answer_text("p")  # no gap, no duplicate
    assert rest[-1].event == "end"

    replay = [p async for p in other.runs.join_stream(thread_id, run_id, last_event_id="-1")]
    assert [p.id for p in replay[: len(first)]] == [p.id for p in first]
    assert _text(replay) == answer_text("p")
    values = [p.data for p in replay if p.event == "values"]
    assert values[-1]["messages"][-1]["content"] == answer_text("p")
    assert values[-1]["messages"][-1]["type"] == "ai"

    assert (await other.runs.get(thread_id, run_id))["status"] == "success"
    state = await other.threads.get_state(thread_id)
    assert [m["type"] for m in state["values"]["messages"]] == ["human", "ai"]
    assert state["values"]["messages"][-1]["content"] == answer_text("p")
    history = await other.threads.get_history(thread_id, limit=20)
    assert history[0]["checkpoint"]["checkpoint_id"] == state["checkpoint"]["checkpoint_id"]
    assert len(history) > 2
    # `before` as the SDK sends it: a checkpoint, or a checkpoint id (that one was ignored).
    ids = [s["checkpoint"]["checkpoint_id"] for s in history]
    for before in (history[0]["checkpoint"], ids[0]):
        older = await other.threads.get_history(thread_id, limit=20, before=before)
        assert [s["checkpoint"]["checkpoint_id"] for s in older] == ids[1:]


async def test_cancel_then_a_new_run_with_type_human_messages(
    server: str, client: LangGraphClient, other: LangGraphClient
) -> None:
    thread_id = (await client.threads.create())["thread_id"]
    run_id = await _hold_a_run(client, thread_id, "c")
    with pytest.raises(httpx.HTTPStatusError) as busy:  # one run at a time per thread
        async for _ in client.runs.stream(
            thread_id, "agent", input={"messages": []}, multitask_strategy="reject"
        ):
            pass
    assert busy.value.response.status_code == 409
    await other.runs.cancel(thread_id, run_id, wait=True)  # from the other process
    assert (await other.runs.get(thread_id, run_id))["status"] == "interrupted"

    # The thread takes a new run; {"type": "human"} messages are accepted like {"role": ...}.
    await _release(server, thread_id)
    parts = [
        p
        async for p in client.runs.stream(
            thread_id,
            "agent",
            input={"messages": [{"type": "human", "content": "h"}]},
            stream_mode="values",
        )
    ]
    assert parts[-1].event == "end"
    assert parts[-2].data["messages"][-1]["content"] == answer_text("h")


async def test_enqueued_runs_wait_their_turn_across_processes(
    servers: tuple[str, str], client: LangGraphClient, other: LangGraphClient
) -> None:
    # Regression: runs.create with multitask_strategy "enqueue" (useStream's submit while a
    # run streams) was 404: POST /threads/{id}/runs was not served, nor "enqueue".
    thread_id = (await client.threads.create())["thread_id"]
    await _hold_a_run(client, thread_id, "a")  # held mid-answer on the first server

    # Queued on the other server; a second one is queued there too, then cancelled here.
    queued = await other.runs.create(
        thread_id,
        "agent",
        input={"messages": [{"role": "user", "content": "b"}]},
        stream_mode=MODES,
        multitask_strategy="enqueue",
    )
    dropped = await other.runs.create(
        thread_id,
        "agent",
        input={"messages": [{"role": "user", "content": "x"}]},
        multitask_strategy="enqueue",
    )
    assert (queued["status"], dropped["status"]) == ("pending", "pending")
    assert (await client.runs.get(thread_id, queued["run_id"]))["status"] == "pending"
    await client.runs.cancel(thread_id, dropped["run_id"], wait=True)
    assert (await client.runs.get(thread_id, dropped["run_id"]))["status"] == "interrupted"

    for server in servers:  # the queued run holds halfway too, on the server that runs it
        await _release(server, thread_id)
    parts = [
        p async for p in client.runs.join_stream(thread_id, queued["run_id"], last_event_id="-1")
    ]
    assert parts[0].event == "metadata"
    assert parts[0].data["run_id"] == queued["run_id"]
    assert _text(parts) == answer_text("b")
    assert parts[-1].event == "end"
    assert (await client.runs.get(thread_id, queued["run_id"]))["status"] == "success"
    state = await other.threads.get_state(thread_id)
    assert [m["content"] for m in state["values"]["messages"]] == [
        "a",
        answer_text("a"),
        "b",
        answer_text("b"),
    ]


async def test_runs_join_and_wait_answer_with_the_threads_values(
    servers: tuple[str, str], client: LangGraphClient, other: LangGraphClient
) -> None:
    # Regression: runs.join and runs.wait were 404.
    thread_id = (await client.threads.create())["thread_id"]
    run_id = await _hold_a_run(client, thread_id, "w")  # held mid-answer on the first server
    joined = asyncio.create_task(other.runs.join(thread_id, run_id))
    await _release(servers[0], thread_id)
    values = await joined
    assert [m["content"] for m in values["messages"]] == ["w", answer_text("w")]

    # runs.wait on the other server: the thread's values once its run ended.
    await _release(servers[1], thread_id)
    values = await other.runs.wait(
        thread_id, "agent", input={"messages": [{"role": "user", "content": "v"}]}
    )
    assert [m["content"] for m in values["messages"]][2:] == ["v", answer_text("v")]
    # runs.list (was 405) from either process: both runs, newest first.
    for sdk in (client, other):
        runs = await sdk.runs.list(thread_id)
        assert [r["status"] for r in runs] == ["success", "success"]
        assert runs[1]["run_id"] == run_id
        assert runs[0]["created_at"] > runs[1]["created_at"]


#: The producers' lease (seconds) where a test kills a process: its runs are lost that soon.
KILL_LEASE = 3.0


@pytest.fixture
def killable(redis_flush: str, tmp_path: Path) -> Iterator[tuple[AppProcess, AppProcess]]:
    """Two processes sharing Redis + SQLite, with a short lease, for a test to kill one."""
    env = {
        "RSTREAM_TEST_URL": redis_flush,
        "RSTREAM_TEST_SQLITE": str(tmp_path / "cp.sqlite"),
        "RSTREAM_TEST_LEASE": str(KILL_LEASE),
    }
    with (
        run_app_subprocess(uvicorn_command(APP, "--factory"), env) as first,
        run_app_subprocess(uvicorn_command(APP, "--factory"), env) as second,
    ):
        yield first, second


async def _hold_a_run(sdk: LangGraphClient, thread_id: str, prompt: str) -> str:
    """Start a run and read it until it holds mid-answer; its run id."""
    created: list[Any] = []
    seen: list[Any] = []
    stream = sdk.runs.stream(
        thread_id,
        "agent",
        input={"messages": [{"role": "user", "content": prompt}]},
        stream_mode=MODES,
        on_run_created=created.append,
    )
    async for part in stream:
        seen.append(part)
        if _text(seen).endswith(f"{prompt}{HOLD_AT - 1} "):
            break
    await stream.aclose()
    return str(created[0]["run_id"])


async def test_a_run_queued_in_a_killed_process_ends_with_an_error(
    killable: tuple[AppProcess, AppProcess],
) -> None:
    # docs/langgraph-sdk.md: "if that process goes away, the queued run ends with an
    # `error` once its lease lapses, as any run does".
    first, second = killable
    async with (
        get_client(url=f"{first.url}/langgraph") as client,
        get_client(url=f"{second.url}/langgraph") as doomed,
    ):
        thread_id = (await client.threads.create())["thread_id"]
        await _hold_a_run(client, thread_id, "a")
        queued = {"input": {"messages": [{"role": "user", "content": "b"}]}}
        lost = await doomed.runs.create(thread_id, "agent", **queued, stream_mode=MODES)
        dropped = await doomed.runs.create(thread_id, "agent", input={"messages": []})
        behind = await client.runs.create(
            thread_id, "agent", input={"messages": [{"role": "user", "content": "c"}]}
        )
        assert {lost["status"], dropped["status"], behind["status"]} == {"pending"}

        joined = asyncio.create_task(
            _all(client.runs.join_stream(thread_id, lost["run_id"], last_event_id="-1"))
        )
        waited = asyncio.create_task(client.runs.join(thread_id, lost["run_id"]))
        second.kill()

        # Cancelling a queued run whose process is gone only asks for it: it does not
        # wait for the lease to lapse (the run is still pending when the answer comes).
        await client.runs.cancel(thread_id, dropped["run_id"])
        assert (await client.runs.get(thread_id, dropped["run_id"]))["status"] == "pending"

        await _release(first.url, thread_id)
        async with asyncio.timeout(10 * KILL_LEASE):  # about a lease; never a hang
            parts = await joined
            outcome = await waited
        assert [p.event for p in parts] == ["error"]
        assert parts[0].data["error"] == "producer_lost"
        assert outcome["__error__"]["error"] == "producer_lost"
        assert (await client.runs.get(thread_id, lost["run_id"]))["status"] == "error"

        # The run queued in the live process started once the held one ended.
        rest = await _all(client.runs.join_stream(thread_id, behind["run_id"], last_event_id="-1"))
        assert rest[-1].event == "end"
        assert (await client.runs.get(thread_id, behind["run_id"]))["status"] == "success"
        # And the thread takes new runs.
        values = await client.runs.wait(
            thread_id, "agent", input={"messages": [{"role": "user", "content": "d"}]}
        )
        assert [m["content"] for m in values["messages"]] == [
            "a",
            answer_text("a"),
            "c",
            answer_text("c"),
            "d",
            answer_text("d"),
        ]


async def _all(parts: AsyncIterator[Any]) -> list[Any]:
    return [part async for part in parts]


def test_js_client_stream_cut_join_replay_cancel(
    node_modules: Path, servers: tuple[str, str]
) -> None:
    first, second = servers
    seen = run_node(node_modules, "langgraph_sdk.mjs", first, second, "j")
    expected = answer_text("j")
    assert seen["firstEvent"] == "metadata"
    assert seen["firstData"] == {"run_id": seen["runId"], "attempt": 1}
    assert seen["statusMid"] == "running"
    assert seen["cutText"] + seen["restText"] == expected  # no gap, no duplicate
    assert seen["lastEvent"] == "end"
    assert seen["replayText"] == expected
    assert seen["replayIds"] == seen["cutIds"]
    assert seen["custom"] == [{"step": "prepare"}]
    assert seen["stateTypes"] == ["human", "ai"]
    assert seen["stateText"] == expected
    assert seen["statusEnd"] == "success"
    assert len(seen["historyIds"]) > 2
    assert seen["olderIds"] == seen["historyIds"][1:]  # `before` as a Config pages
    assert seen["statusCancelled"] == "interrupted"


def test_js_use_stream_reconnects_on_mount(node_modules: Path, servers: tuple[str, str]) -> None:
    first, second = servers
    seen = run_node(node_modules, "langgraph_use_stream.mjs", first, second, "s")
    assert seen["error"] is None
    assert seen["storedRun"]  # useStream kept the run id from Content-Location
    assert seen["types"] == ["human", "ai"]  # the replay did not add a second answer
    assert seen["text"] == answer_text("s")
    assert seen["storedAfter"] is None  # the run finished: nothing left to rejoin


def test_js_client_interrupt_strategy_replaces_the_run_in_progress(
    node_modules: Path, servers: tuple[str, str]
) -> None:
    # Regression: runs.stream with multitaskStrategy "interrupt" (useStream sends it) while
    # a run of the thread was in progress got 409 thread_busy.
    first, second = servers
    seen = run_node(node_modules, "langgraph_multitask.mjs", first, second, "m")
    assert seen["firstEnd"]["event"] == "end"
    assert seen["firstEnd"]["data"] == {"status": "interrupted"}
    assert seen["secondEnd"]["event"] == "end"
    assert seen["secondEnd"]["data"] == {"status": "success"}
    assert seen["secondText"] == answer_text("m2")
    assert seen["secondStatus"] == "success"
    assert seen["distinct"]
    # The cancelled run's input stays (its partial state), then the second run's turn.
    assert seen["stateTypes"] == ["human", "human", "ai"]
    assert seen["stateText"] == answer_text("m2")


def test_js_client_enqueue_strategy_queues_then_joins_the_run(
    node_modules: Path, servers: tuple[str, str]
) -> None:
    # Regression: runs.create with multitaskStrategy "enqueue" (useStream's submit queue)
    # was 404: POST /threads/{id}/runs was not served.
    first, second = servers
    seen = run_node(node_modules, "langgraph_enqueue.mjs", first, second, "q")
    assert seen["created"] == {"status": "pending", "strategy": "enqueue"}
    assert seen["createdAt"]
    assert seen["statusQueued"] == "pending"
    assert (seen["firstEnd"]["event"], seen["firstEnd"]["data"]) == ("end", {"status": "success"})
    assert seen["joinedFirst"]["event"] == "metadata"
    assert (seen["joinedEnd"]["event"], seen["joinedEnd"]["data"]) == ("end", {"status": "success"})
    assert seen["joinedLast"] == answer_text("q2")
    assert seen["statusAfter"] == "success"
    assert seen["stateTypes"] == ["human", "ai", "human", "ai"]
    assert seen["stateText"] == answer_text("q2")
    # runs.list (was 405): the queued run, then the run in progress; both done after.
    queued, listed = seen["queuedId"], seen["listedQueued"]
    assert listed[0] == {"run_id": queued, "status": "pending"}
    assert [run["status"] for run in listed] == ["pending", "running"]
    assert seen["listedAfter"] == [[queued, "success"], [listed[1]["run_id"], "success"]]


async def test_threads_search_and_info_as_agent_chat_ui_asks(
    servers: tuple[str, str], client: LangGraphClient, other: LangGraphClient
) -> None:
    # Regression: threads.search (POST /threads/search, Agent Chat UI's thread list) and
    # GET /info (its connection check) were 404.
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{servers[1]}/langgraph/info")).status_code == 200
    ids = []
    for prompt in ("s1", "s2"):
        thread_id = (await client.threads.create())["thread_id"]
        await _release(servers[0], thread_id)
        await client.runs.wait(
            thread_id, "agent", input={"messages": [{"role": "user", "content": prompt}]}
        )
        ids.append(thread_id)
    found = await other.threads.search(metadata={"graph_id": "agent"}, limit=100)
    assert [t["thread_id"] for t in found] == ids[::-1]  # newest first
    assert [t["values"]["messages"][0]["content"] for t in found] == ["s2", "s1"]
    assert {t["status"] for t in found} == {"idle"}
    assert await other.threads.search(metadata={"graph_id": "nope"}) == []


def test_js_client_threads_search_as_agent_chat_ui_asks(
    node_modules: Path, servers: tuple[str, str]
) -> None:
    seen = run_node(node_modules, "langgraph_threads_search.mjs", *servers, "u")
    assert seen["infoOk"] is True
    assert seen["found"] == [{"id": seen["threadId"], "status": "idle", "first": "u"}]
    assert seen["none"] == 0


async def test_a_cancelled_run_leaves_the_thread_idle_not_error(
    server: str, client: LangGraphClient, other: LangGraphClient
) -> None:
    # Regression: after runs.cancel of a running run, threads.get and threads.search read
    # `error` (LangGraph records the CancelledError on the task); the Agent Server reads
    # `idle` (@langchain/langgraph-api queue.mjs: an interrupted run sets no exception).
    thread_id = (await client.threads.create())["thread_id"]
    run_id = await _hold_a_run(client, thread_id, "k")
    await other.runs.cancel(thread_id, run_id, wait=True)
    assert (await other.runs.get(thread_id, run_id))["status"] == "interrupted"
    assert (await other.threads.get(thread_id))["status"] == "idle"
    found = await other.threads.search(ids=[thread_id])
    assert [t["status"] for t in found] == ["idle"]
    # The next run goes on from the cancelled run's partial state, and ends idle too.
    await _release(server, thread_id)
    values = await client.runs.wait(
        thread_id, "agent", input={"messages": [{"role": "user", "content": "l"}]}
    )
    assert values["messages"][-1]["content"] == answer_text("l")
    assert (await other.threads.get(thread_id))["status"] == "idle"


async def test_join_stream_with_stream_mode_gives_those_modes_only(
    server: str, client: LangGraphClient, other: LangGraphClient
) -> None:
    # Regression: join_stream(stream_mode=...) was ignored: every mode of the run came.
    thread_id = (await client.threads.create())["thread_id"]
    run_id = await _hold_a_run(client, thread_id, "f")
    await _release(server, thread_id)
    parts = await _all(
        other.runs.join_stream(thread_id, run_id, stream_mode="custom", last_event_id="-1")
    )
    assert [p.event for p in parts] == ["metadata", "custom", "end"]
    both = await _all(
        other.runs.join_stream(
            thread_id, run_id, stream_mode=["custom", "values"], last_event_id="-1"
        )
    )
    assert {p.event for p in both} == {"metadata", "custom", "values", "end"}
    assert _text(both) == ""
    with pytest.raises(httpx.HTTPStatusError) as unknown:
        await _all(other.runs.join_stream(thread_id, run_id, stream_mode="nope"))  # type: ignore[arg-type]
    assert unknown.value.response.status_code == 422


async def test_runs_get_and_list_answer_the_runs_assistant_and_strategy(
    servers: tuple[str, str], client: LangGraphClient, other: LangGraphClient
) -> None:
    # Regression: runs.get and runs.list answered assistant_id None, empty metadata and the
    # router's default multitask_strategy, not what the run was created with.
    thread_id = (await client.threads.create())["thread_id"]
    await _release(servers[0], thread_id)
    first = await client.runs.create(
        thread_id,
        "agent",
        input={"messages": [{"role": "user", "content": "r"}]},
        metadata={"source": "test"},
        multitask_strategy="reject",
    )
    await client.runs.join(thread_id, first["run_id"])
    run = await other.runs.get(thread_id, first["run_id"])
    assert (run["assistant_id"], run["multitask_strategy"]) == ("agent", "reject")
    assert run["metadata"] == {"source": "test"}
    second = await client.runs.create(
        thread_id,
        "agent",
        input={"messages": [{"role": "user", "content": "s"}]},
        multitask_strategy="interrupt",
    )
    await client.runs.join(thread_id, second["run_id"])
    listed = await other.runs.list(thread_id)
    assert [(r["run_id"], r["assistant_id"]) for r in listed] == [
        (second["run_id"], "agent"),
        (first["run_id"], "agent"),
    ]
    assert listed[0]["multitask_strategy"] == "interrupt"
    # A queued run, read in the process that did not queue it, before and after it starts.
    busy = (await client.threads.create())["thread_id"]
    await _hold_a_run(client, busy, "u")
    queued = await other.runs.create(
        busy,
        "agent",
        input={"messages": [{"role": "user", "content": "v"}]},
        metadata={"queued": True},
        multitask_strategy="enqueue",
    )
    pending = await client.runs.get(busy, queued["run_id"])
    assert pending["status"] == "pending"
    assert (pending["assistant_id"], pending["metadata"]) == ("agent", {"queued": True})
    for url in servers:
        await _release(url, busy)
    await client.runs.join(busy, queued["run_id"])
    ran = await client.runs.get(busy, queued["run_id"])
    assert (ran["status"], ran["assistant_id"], ran["multitask_strategy"]) == (
        "success",
        "agent",
        "enqueue",
    )
    assert ran["metadata"] == {"queued": True}


async def test_a_runs_metadata_reaches_the_graph_and_its_checkpoints(
    servers: tuple[str, str], client: LangGraphClient, other: LangGraphClient
) -> None:
    # Regression: a run's `metadata` was kept for runs.get only. The Agent Server merges it
    # into the graph's config metadata: the graph's callbacks (the `messages` tuples'
    # metadata) did not have it, and get_history(metadata=...) found none of the run's
    # checkpoints.
    thread_id = (await client.threads.create())["thread_id"]
    await _release(servers[0], thread_id)
    tags = {"origin": "web", "turn": 2}
    parts = [
        p
        async for p in client.runs.stream(
            thread_id,
            "agent",
            input={"messages": [{"role": "user", "content": "m"}]},
            stream_mode="messages-tuple",
            metadata=tags,
            config={"metadata": {"origin": "config", "lang": "en"}},
        )
    ]
    messages = [p.data[1] for p in parts if p.event == "messages"]
    assert messages
    for metadata in messages:  # the run's over its config's, as the API merges them
        assert {key: metadata.get(key) for key in ("origin", "turn", "lang")} == {
            "origin": "web",
            "turn": 2,
            "lang": "en",
        }
    history = await other.threads.get_history(thread_id, limit=100)
    found = await other.threads.get_history(thread_id, limit=100, metadata=tags)
    assert len(history) == 4  # the input, then each step: all the run's
    assert [s["checkpoint"] for s in found] == [s["checkpoint"] for s in history]
    assert found[0]["metadata"]["lang"] == "en"
    assert found[0]["metadata"]["graph_id"] == "agent"


async def test_get_state_at_a_checkpoint_and_a_runs_durability(
    servers: tuple[str, str], client: LangGraphClient, other: LangGraphClient
) -> None:
    # Regression: get_state(checkpoint_id=...) and get_state(checkpoint=...) were 404 (an
    # unknown path), and a run's `durability` was ignored.
    thread_id = (await client.threads.create())["thread_id"]
    await _release(servers[0], thread_id)
    await client.runs.wait(
        thread_id, "agent", input={"messages": [{"role": "user", "content": "d"}]}
    )
    history = await other.threads.get_history(thread_id, limit=100)
    assert len(history) == 4  # the input, then each step
    first = history[-1]
    by_id = await other.threads.get_state(
        thread_id, checkpoint_id=first["checkpoint"]["checkpoint_id"]
    )
    by_checkpoint = await other.threads.get_state(thread_id, checkpoint=first["checkpoint"])
    for state in (by_id, by_checkpoint):
        assert state["checkpoint"] == first["checkpoint"]
        assert state["next"] == ["__start__"]

    await client.runs.wait(
        thread_id,
        "agent",
        input={"messages": [{"role": "user", "content": "e"}]},
        durability="exit",
    )
    history = await other.threads.get_history(thread_id, limit=100)
    assert len(history) == 5  # the run saved its end only
    assert [m["content"] for m in history[0]["values"]["messages"]][2:] == ["e", answer_text("e")]


async def test_update_state_and_delete_a_thread(
    servers: tuple[str, str], client: LangGraphClient, other: LangGraphClient
) -> None:
    # threads.update_state and threads.delete were 405.
    thread_id = (await client.threads.create())["thread_id"]
    await _release(servers[0], thread_id)
    await client.runs.wait(
        thread_id, "agent", input={"messages": [{"role": "user", "content": "w"}]}
    )
    before = await other.threads.get_state(thread_id)
    edit = {"messages": [{"role": "user", "content": "edited"}]}
    updated = await other.threads.update_state(thread_id, edit, as_node="agent")
    state = await client.threads.get_state(thread_id)
    assert state["checkpoint"] == updated["checkpoint"]
    assert state["parent_checkpoint"] == before["checkpoint"]
    assert [m["content"] for m in state["values"]["messages"]] == ["w", answer_text("w"), "edited"]
    assert state["next"] == []
    # At an earlier checkpoint: a fork from there.
    forked = await client.threads.update_state(
        thread_id,
        {"messages": [{"role": "user", "content": "again"}]},
        checkpoint=before["checkpoint"],
    )
    state = await other.threads.get_state(thread_id)
    assert state["checkpoint"] == forked["checkpoint"]
    assert state["parent_checkpoint"] == before["checkpoint"]
    assert [m["content"] for m in state["values"]["messages"]][-1] == "again"

    # A thread with a run in progress (held in the first process): no update; a delete
    # from the other process stops the run, then deletes the thread.
    busy = (await client.threads.create())["thread_id"]
    run_id = await _hold_a_run(client, busy, "b")
    with pytest.raises(httpx.HTTPStatusError) as refused:
        await other.threads.update_state(busy, edit)
    assert refused.value.response.status_code == 409
    await other.threads.delete(busy)
    assert (await client.threads.get_state(busy))["values"] == {}
    assert await client.threads.get_history(busy) == []
    with pytest.raises(httpx.HTTPStatusError) as gone:
        await client.runs.get(busy, run_id)
    assert gone.value.response.status_code == 404
    await client.threads.delete(thread_id)
    assert await other.threads.get_history(thread_id) == []


def test_js_client_update_state_and_delete_a_thread(
    node_modules: Path, servers: tuple[str, str]
) -> None:
    seen = run_node(node_modules, "langgraph_thread_write.mjs", *servers, "v")
    assert seen["updatedIsState"] is True
    assert seen["contents"] == ["v", answer_text("v"), "edited"]
    assert seen["forkedParent"] == seen["firstCheckpoint"]
    assert seen["deleted"] is None  # 204: the SDK resolves with nothing
    assert seen["valuesAfter"] == {}
    assert seen["historyAfter"] == 0


async def test_threads_copy_count_and_the_writes_not_served(
    servers: tuple[str, str], client: LangGraphClient, other: LangGraphClient
) -> None:
    # threads.copy and threads.count were 404 and 405; threads.update and runs.delete
    # were 405 routing errors, now 501 not_served with a message.
    thread_id = (await client.threads.create())["thread_id"]
    await _release(servers[0], thread_id)
    await client.runs.wait(
        thread_id, "agent", input={"messages": [{"role": "user", "content": "c"}]}
    )
    copy = await other.threads.copy(thread_id)
    assert copy["thread_id"] != thread_id
    assert copy["status"] == "idle"
    history = await client.threads.get_history(thread_id)
    copied = await client.threads.get_history(copy["thread_id"])
    assert [s["checkpoint"]["checkpoint_id"] for s in copied] == [
        s["checkpoint"]["checkpoint_id"] for s in history
    ]
    assert [m["content"] for m in copied[0]["values"]["messages"]] == ["c", answer_text("c")]
    # Its own thread from now on: a run on the copy leaves the thread as it was.
    await _release(servers[0], copy["thread_id"])
    await client.runs.wait(  # (the first process runs it: the release is its own)
        copy["thread_id"], "agent", input={"messages": [{"role": "user", "content": "d"}]}
    )
    assert len((await client.threads.get_state(copy["thread_id"]))["values"]["messages"]) == 4
    assert len((await client.threads.get_state(thread_id))["values"]["messages"]) == 2

    assert await client.threads.count(metadata={"graph_id": "agent"}) == 2
    assert await other.threads.count(metadata={"graph_id": "another"}) == 0
    with pytest.raises(httpx.HTTPStatusError) as by_status:
        await client.threads.count(status="idle")
    assert by_status.value.response.status_code == 422

    run_id = (await client.runs.list(thread_id))[0]["run_id"]
    for call, status in (
        (client.threads.update(thread_id, metadata={"title": "t"}), 501),
        (other.runs.delete(thread_id, run_id), 405),
    ):
        with pytest.raises(httpx.HTTPStatusError) as refused:
            await call
        assert refused.value.response.status_code == status
        assert refused.value.response.json()["code"] == "not_served"


def _mounted(api: Any) -> Any:
    """A Starlette app serving LangGraphRouter ``api`` at /langgraph (its producer open)."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.routing import Mount

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with api.producer:
            yield

    return Starlette(routes=[Mount("/langgraph", api)], lifespan=lifespan)


def _app_with_update_thread() -> Any:
    """An app whose threads are records kept by create_thread / thread_info /
    update_thread hooks (a dict), on one graph with an in-memory checkpointer."""
    from langgraph.checkpoint.memory import InMemorySaver

    from resumable_stream.langgraph_api import LangGraphRouter
    from resumable_stream.starlette import allow_all
    from resumable_stream.transports.memory import MemoryTransport
    from tests._thread_records import ThreadRecords
    from tests.clients._graph import build_graph

    records = ThreadRecords()
    api = LangGraphRouter(
        MemoryTransport(),
        {"agent": build_graph({}, InMemorySaver())},
        authorize=allow_all,
        **records.hooks(),
    )

    return _mounted(api)


async def test_threads_update_merges_metadata_through_update_thread() -> None:
    with uvicorn_server(_app_with_update_thread()) as url:
        async with get_client(url=f"{url}/langgraph") as sdk:
            thread = await sdk.threads.create(metadata={"a": 1, "b": 2})
            updated = await sdk.threads.update(thread["thread_id"], metadata={"b": 3, "c": 4})
            assert updated is not None
            assert updated["thread_id"] == thread["thread_id"]
            assert updated["metadata"] == {"a": 1, "b": 3, "c": 4}
            minimal = await sdk.threads.update(
                thread["thread_id"], metadata={"d": 5}, return_minimal=True
            )
            assert minimal is None
            got = await sdk.threads.get(thread["thread_id"])
            assert got["metadata"] == {"a": 1, "b": 3, "c": 4, "d": 5}
            with pytest.raises(httpx.HTTPStatusError) as ttl:
                await sdk.threads.update(thread["thread_id"], metadata={"e": 1}, ttl=5)
            assert ttl.value.response.json()["code"] == "ttl_not_served"
            copy = await sdk.threads.copy(thread["thread_id"])
            assert copy["metadata"] == {"a": 1, "b": 3, "c": 4, "d": 5}
            assert await sdk.threads.count() == 0  # no checkpoints yet: the search finds none


def test_js_client_threads_copy_count_and_the_writes_not_served(
    node_modules: Path, servers: tuple[str, str]
) -> None:
    seen = run_node(node_modules, "langgraph_thread_admin.mjs", *servers, "x")
    assert seen["copy"]["distinct"] is True
    assert seen["copy"]["status"] == "idle"
    assert seen["copy"]["contents"] == ["x", answer_text("x")]
    assert (seen["count"], seen["countAll"], seen["countNone"]) == (2, 2, 0)
    assert seen["update"]["status"] == 501
    assert seen["update"]["code"] == "not_served"
    # Regression: runs.delete was 501, which the JS client retries for a DELETE (an
    # idempotent method) four times with backoff: it gave up after some 20 s, not at once.
    assert seen["runDelete"]["status"] == 405
    assert seen["runDelete"]["code"] == "not_served"
    assert seen["runDelete"]["ms"] < 10_000  # its retries wait 15 s at least


def test_js_client_threads_update_through_update_thread(node_modules: Path) -> None:
    with uvicorn_server(_app_with_update_thread()) as url:
        seen = run_node(node_modules, "langgraph_thread_update.mjs", url)
    assert seen["updated"]["thread_id"] == seen["threadId"]
    assert seen["updated"]["metadata"] == {"a": 1, "b": 3, "c": 4}
    assert seen["updated"]["status"] == "idle"
    assert seen["minimal"] is None  # 204: the SDK resolves with nothing
    assert seen["empty"]["metadata"] == {"a": 1, "b": 3, "c": 4, "d": 5}
    assert seen["got"] == {"a": 1, "b": 3, "c": 4, "d": 5}
    assert seen["ttl"] == {"status": 422, "code": "ttl_not_served"}
    assert seen["copy"]["metadata"] == {"a": 1, "b": 3, "c": 4, "d": 5}
    assert seen["copy"]["thread_id"] != seen["threadId"]
    assert seen["count"] == 0  # no checkpoints yet: the search finds none


def _app_with_an_interrupt() -> Any:
    """An app whose graph `ask` stops at an interrupt, then says what it was answered."""
    from langchain_core.messages import AIMessage
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.types import interrupt

    from resumable_stream.langgraph_api import LangGraphRouter
    from resumable_stream.starlette import allow_all
    from resumable_stream.transports.memory import MemoryTransport

    async def ask(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage(f"got {interrupt({'question': 'Book it?'})}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    graph = builder.compile(checkpointer=InMemorySaver())
    api = LangGraphRouter(MemoryTransport(), {"ask": graph}, authorize=allow_all)

    return _mounted(api)


async def test_an_interrupted_thread_names_its_interrupts() -> None:
    # Regression: a thread's `interrupts` was always {}, also while it waited at one
    # (status "interrupted"); the Agent Server answers the interrupts of its next tasks,
    # by task id, which clients read to tell what a thread waits for.
    with uvicorn_server(_app_with_an_interrupt()) as url:
        async with get_client(url=f"{url}/langgraph") as sdk:
            thread_id = (await sdk.threads.create())["thread_id"]
            hi = {"messages": [{"role": "user", "content": "hi"}]}
            stopped = await sdk.runs.wait(thread_id, "ask", input=hi)
            state = await sdk.threads.get_state(thread_id)
            [task] = state["tasks"]
            expected = {task["id"]: stopped["__interrupt__"]}
            assert stopped["__interrupt__"][0]["value"] == {"question": "Book it?"}
            thread = await sdk.threads.get(thread_id)
            assert (thread["status"], thread["interrupts"]) == ("interrupted", expected)
            [found] = await sdk.threads.search(ids=[thread_id])
            assert found["interrupts"] == expected

            await sdk.runs.wait(thread_id, "ask", command={"resume": "yes"})
            thread = await sdk.threads.get(thread_id)
            assert (thread["status"], thread["interrupts"]) == ("idle", {})
            assert thread["values"]["messages"][-1]["content"] == "got yes"
