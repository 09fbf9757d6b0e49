"""A message on a busy thread, and two API processes sharing Redis + PostgreSQL.

`reject` is covered in test_chat_api.py; here `interrupt` and `queue`, and the cross-process
guarantees: any process reads, stops and serializes the answers of any other.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from chat_service.runtime import open_runtime
from chat_service.settings import Settings
from chat_service.threads import stream_id_for
from httpx_sse import connect_sse

from resumable_stream import Run, StreamConsumer
from tests.examples._chat import (
    ChatServer,
    Sse,
    answer_text,
    history,
    post_message,
    read_sse,
    terminal,
)
from tests.examples.conftest import redis_postgres_env

GENERAL = "How should I structure a small side project?"
#: Each answer depends on the ones before it, so an answer that ran too early shows.
CONVERSATION = ("Hi, my name is Ada", "what is 12*7", "What is my name?", "Thanks!")
ROLES = (
    ["user", "assistant"] + ["user", "assistant", "tool", "assistant"] + ["user", "assistant"] * 2
)


def chunks_at_least(n: int) -> Callable[[list[Sse]], bool]:
    return lambda events: sum(e.event == "chunk" for e in events) >= n


def assert_answered_in_order(thread: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    messages = thread["messages"]
    assert [m["role"] for m in messages] == ROLES
    assert [m["text"] for m in messages if m["role"] == "user"] == list(CONVERSATION)
    assert [r["run"] for r in runs] == sorted(r["run"] for r in runs)
    assert messages[-3]["text"].startswith("Your name is Ada")  # it saw the first answer
    assert "84" in messages[5]["text"]


def test_interrupt_policy_stops_the_answer_in_flight(
    chat_servers: Callable[..., ChatServer],
) -> None:
    server = chat_servers(BUSY_POLICY="interrupt", OFFLINE_TOKENS_PER_SECOND="40")
    with server.client() as client:
        first = post_message(client, GENERAL)
        thread_id = first["thread_id"]
        _, head = read_sse(client, first["stream_url"], stop_after=chunks_at_least(3))
        second = post_message(client, "what is 12*7", thread_id=thread_id)
        _, rest = read_sse(client, first["stream_url"], last_event_id=head[-1].id)
        _, answer = read_sse(client, second["stream_url"])
        thread = history(client, thread_id)

    assert terminal(rest) == {"type": "end", "reason": "stopped"}
    assert terminal(answer) == {"type": "end"}
    assert "84" in answer_text(answer)
    roles = [m["role"] for m in thread["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "tool", "assistant"]
    assert thread["messages"][1]["stopped"] is True
    assert thread["messages"][1]["text"] == answer_text(head) + answer_text(rest)


def test_queue_policy_answers_one_after_the_other(chat_servers: Callable[..., ChatServer]) -> None:
    server = chat_servers(BUSY_POLICY="queue", OFFLINE_TOKENS_PER_SECOND="100")
    with server.client() as client:
        first = post_message(client, CONVERSATION[0])
        thread_id = first["thread_id"]
        runs = [first] + [
            post_message(client, text, thread_id=thread_id) for text in CONVERSATION[1:]
        ]
        # All four are accepted at once; each stream waits for its turn.
        assert [run["status"] for run in runs] == ["started"] + ["queued"] * 3
        endings = [terminal(read_sse(client, run["stream_url"])[1]) for run in runs]
        thread = history(client, thread_id)

    assert endings == [{"type": "end"}] * 4
    assert_answered_in_order(thread, runs)


def test_queue_policy_refuses_a_retry_behind_a_queued_message_and_ends_dropped_readers(
    chat_servers: Callable[..., ChatServer],
) -> None:
    # Regressions: a regenerate queued behind a message picked the question answered
    # before it, then rewound the thread past that message's answer (deleting a whole
    # turn); and a reader of a queued answer that a stop dropped got an empty body.
    server = chat_servers(BUSY_POLICY="queue", OFFLINE_TOKENS_PER_SECOND="40")
    with server.client() as client:
        first = post_message(client, GENERAL)
        thread_id = first["thread_id"]
        _, head = read_sse(client, first["stream_url"], stop_after=chunks_at_least(1))
        queued = post_message(client, "what is 12*7", thread_id=thread_id)
        retries = [
            client.post("/v1/chat/regenerate", json={"thread_id": thread_id}),
            client.post(
                "/v1/chat/message",
                json={"message": "edited", "thread_id": thread_id, "edit_last": True},
            ),
        ]
        headers = {"accept": "text/event-stream"}
        with connect_sse(client, "GET", queued["stream_url"], headers=headers) as waiting:
            # The headers are out (the response waits for the answer's turn): stop now.
            assert waiting.response.status_code == 200
            client.post("/v1/chat/stop", params={"thread_id": thread_id})
            events = [Sse(e.id, e.event, json.loads(e.data)) for e in waiting.iter_sse()]
        _, rest = read_sse(client, first["stream_url"], last_event_id=head[-1].id)

    assert queued["status"] == "queued"
    assert [(r.status_code, r.json()["code"]) for r in retries] == [(409, "thread_busy")] * 2
    assert terminal(events) == {"type": "end", "reason": "stopped"}
    assert terminal(rest) == {"type": "end", "reason": "stopped"}


def test_a_stop_naming_an_answer_stops_that_one_only(
    chat_servers: Callable[..., ChatServer], chat_backend: dict[str, str]
) -> None:
    # Regression: a stop names only the thread, and stopped whatever it ran then, and
    # dropped its whole queue: a Stop clicked as answer 1 ended stopped answer 2 instead.
    server = chat_servers(BUSY_POLICY="queue", OFFLINE_TOKENS_PER_SECOND="40", **chat_backend)
    with server.client() as client:
        first = post_message(client, CONVERSATION[0])
        thread_id = first["thread_id"]
        runs = [first] + [
            post_message(client, text, thread_id=thread_id)
            for text in (GENERAL, "what is 12*7", "Thanks!")
        ]
        _, answered = read_sse(client, first["stream_url"])
        _, head = read_sse(client, runs[1]["stream_url"], stop_after=chunks_at_least(1))

        def stop(run: dict[str, Any]) -> Any:
            params = {"thread_id": thread_id, "run": run["run"]}
            response = client.post("/v1/chat/stop", params=params)
            assert response.status_code == 200, response.text
            return response.json()["stopped"]

        # Answer 1 has ended, 2 is in flight, 3 and 4 wait: a stop meant for 1 does nothing.
        late = stop(first)
        dropped = stop(runs[2])  # a queued answer: only that one
        stopped = stop(runs[1])  # the one in flight: 4 is answered next
        _, rest = read_sse(client, runs[1]["stream_url"], last_event_id=head[-1].id)
        gone, _ = read_sse(client, runs[2]["stream_url"])
        _, last = read_sse(client, runs[3]["stream_url"])
        thread = history(client, thread_id)

    assert terminal(answered) == {"type": "end"}
    assert (late, dropped, stopped) == (False, True, True)
    assert terminal(rest) == {"type": "end", "reason": "stopped"}
    assert gone == 204  # dropped before its turn: never answered
    assert terminal(last) == {"type": "end"}
    user = [m["text"] for m in thread["messages"] if m["role"] == "user"]
    assert user == [CONVERSATION[0], GENERAL, "Thanks!"]


@pytest.mark.redis
@pytest.mark.postgres
def test_any_api_process_reads_and_stops_an_answer_of_another(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    env = {**redis_postgres_env(request), "OFFLINE_TOKENS_PER_SECOND": "40"}
    a, b = chat_servers(**env), chat_servers(**env)
    with a.client() as on_a:
        started = post_message(on_a, GENERAL)
        thread_id = started["thread_id"]
        # The same session cookie works on B: the processes share SECRET_KEY.
        with httpx.Client(base_url=b.url, cookies=on_a.cookies, timeout=20) as on_b:
            _, head = read_sse(on_b, started["stream_url"], stop_after=chunks_at_least(3))
            busy = on_b.post("/v1/chat/message", json={"message": "hi", "thread_id": thread_id})
            stopped = on_b.post("/v1/chat/stop", params={"thread_id": thread_id}).json()
            _, rest = read_sse(on_b, started["stream_url"], last_event_id=head[-1].id)

    assert busy.status_code == 409  # the thread's lock lives in Redis, held by A
    assert stopped == {"thread_id": thread_id, "stopped": True}
    assert terminal(rest) == {"type": "end", "reason": "stopped"}


@pytest.mark.redis
@pytest.mark.postgres
def test_two_api_processes_never_answer_one_thread_at_once(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    env = {**redis_postgres_env(request), "BUSY_POLICY": "queue"}
    env["OFFLINE_TOKENS_PER_SECOND"] = "100"
    a, b = chat_servers(**env), chat_servers(**env)
    with a.client() as on_a:
        first = post_message(on_a, CONVERSATION[0])
        thread_id = first["thread_id"]
        with httpx.Client(base_url=b.url, cookies=on_a.cookies, timeout=20) as on_b:
            runs = [first]
            for i, text in enumerate(CONVERSATION[1:]):
                runs.append(post_message(on_b if i % 2 == 0 else on_a, text, thread_id=thread_id))
            endings = [terminal(read_sse(on_b, run["stream_url"])[1]) for run in runs]
            thread = history(on_b, thread_id)

    assert endings == [{"type": "end"}] * 4
    assert_answered_in_order(thread, runs)


async def test_a_stop_landing_as_the_answer_starts_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: a stop between the holder's last look at the queue and the start of the
    # answer marked the run dropped and found nothing started to cancel; the holder then
    # marked the run started and the answer ran to its end, the thread busy all along
    # (seen as both messages of a trial rejected in test_reject_policy_is_exact_*).
    settings = Settings(data_dir=tmp_path, busy_policy="queue", offline_tokens_per_second=400)
    async with open_runtime(settings) as runtime:
        runs = runtime.runs
        thread = await runtime.store.create_thread("ada", "a stopped answer")
        answer = stream_id_for(thread.id, 1)
        start = runs.producer.start

        async def stop_lands_first(*args: Any, **kwargs: Any) -> Run:
            if kwargs.get("stream_id") == answer:
                assert await runs.stop(thread.id)  # the stop drops the queued run
            return await start(*args, **kwargs)

        monkeypatch.setattr(runs.producer, "start", stop_lands_first)
        await runs.submit(thread, message=GENERAL, model="offline")
        events = [event async for event in StreamConsumer(runtime.transport, answer)]
        assert events[-1].type == "cancelled"
        run = await runtime.store.get_run(thread.id, 1)
        assert run is not None and run.state == "dropped"


async def test_a_stop_landing_as_a_replay_saves_it_keeps_one_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: a replayed answer stopped while its messages were being added to the
    # thread was saved again as a stopped answer: the thread showed it twice.
    from tests._helpers import eventually

    question = "Tell me about cache warming"
    settings = Settings(data_dir=tmp_path, busy_policy="queue", offline_tokens_per_second=400)
    async with open_runtime(settings) as runtime:
        runs, agent, store = runtime.runs, runtime.agent, runtime.store
        first = await store.create_thread("ada", "cached")
        await runs.submit(first, message=question, model="offline", use_cache=True)

        async def cached() -> bool:
            run = await store.get_run(first.id, 1)
            return run is not None and run.state == "done"

        await eventually(cached)
        update = agent.aupdate_state
        written, never = asyncio.Event(), asyncio.Event()

        async def stopped_once_written(*args: Any, **kwargs: Any) -> Any:
            config = await update(*args, **kwargs)
            if kwargs.get("as_node") == "agent":
                written.set()
                await never.wait()  # the stop lands here, after the write
            return config

        monkeypatch.setattr(agent, "aupdate_state", stopped_once_written)
        second = await store.create_thread("ada", "replayed")
        await runs.submit(second, message=question, model="offline", use_cache=True)
        await written.wait()
        monkeypatch.setattr(agent, "aupdate_state", update)
        assert await runs.stop(second.id)
        events = [e async for e in StreamConsumer(runtime.transport, stream_id_for(second.id, 1))]
        assert events[-1].type == "cancelled"
        state = await agent.aget_state({"configurable": {"thread_id": second.id}})
        answers = [m for m in state.values["messages"] if m.type == "ai" and m.text]
        assert len(answers) == 1
        assert not answers[0].response_metadata.get("stopped")
