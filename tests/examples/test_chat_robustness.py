"""No input makes the chat service answer 5xx, and concurrent requests are served correctly.

Regression tests of issue 12: `database is locked` under concurrent requests on SQLite, 500s
for text the databases cannot store and for numbers out of range, `BUSY_POLICY=reject`
accepting two messages at once, and the answer cache showing one user's answer to another.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from chat_service.runtime import open_runtime
from chat_service.settings import Settings

from tests.examples._chat import (
    ChatServer,
    ask,
    post_message,
    read_sse,
    servers,
)
from tests.examples.conftest import redis_postgres_env


@pytest.fixture(scope="module")
def server(
    chat_backend: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChatServer]:
    directory = tmp_path_factory.mktemp("chat-robust")
    with servers(directory) as make:
        yield make(
            DATA_DIR=str(directory / "data"),
            BUSY_POLICY="queue",
            OFFLINE_TOKENS_PER_SECOND="400",  # answers write checkpoints while requests come
            # One user's many concurrent messages are the point here, not the cap on them.
            MAX_ANSWERS_PER_USER="1000",
            **chat_backend,
        )


def token_client(server: ChatServer, token: str) -> httpx.Client:
    return server.client(headers={"authorization": f"Bearer {token}"})


def test_concurrent_mixed_requests_of_one_user_all_succeed(server: ChatServer) -> None:
    # Issue 12: 16 concurrent mixed requests of one user gave `database is locked` (500).
    token = f"user-{uuid.uuid4().hex}"
    with token_client(server, token) as client:
        seed = post_message(client, "Hi, my name is Ada")["thread_id"]
    statuses: list[tuple[str, int, str]] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        with token_client(server, token) as client:
            mine = post_message(client, f"what is {n}*7")["thread_id"]
            for i in range(5):
                kind = (n + i) % 6
                if kind == 0:
                    response = client.post("/v1/chat/message", json={"message": f"hello {n} {i}"})
                elif kind == 5:
                    response = client.delete("/v1/thread", params={"thread_id": mine})
                elif kind == 1:
                    response = client.post(
                        "/v1/chat/message", json={"message": f"and {n} {i}?", "thread_id": seed}
                    )
                elif kind == 2:
                    response = client.get("/v1/threads")
                elif kind == 3:
                    response = client.get("/v1/thread", params={"thread_id": seed})
                else:
                    response = client.patch(
                        "/v1/thread", params={"thread_id": seed}, json={"chat_name": f"n{n}"}
                    )
                with lock:
                    statuses.append((f"{kind}", response.status_code, response.text[:200]))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(worker, range(16)))

    failed = [s for s in statuses if s[1] >= 500]
    assert len(statuses) == 80 + 0
    assert failed == []
    assert {status for _, status, _ in statuses} <= {200, 202}


@pytest.mark.parametrize(
    "body",
    [
        b'{"message": "lone \\ud800 surrogate"}',
        b'{"message": "a \\u0000 NUL"}',
    ],
    ids=["lone-surrogate", "nul"],
)
def test_text_the_databases_cannot_store_is_422(server: ChatServer, body: bytes) -> None:
    with server.client() as client:
        response = client.post(
            "/v1/chat/message", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_text"


@pytest.mark.parametrize("name", ["lone \\ud800", "a \\u0000 NUL"], ids=["lone-surrogate", "nul"])
def test_thread_names_the_databases_cannot_store_are_422(server: ChatServer, name: str) -> None:
    with server.client() as client:
        thread_id = post_message(client, "hello")["thread_id"]
        response = client.patch(
            "/v1/thread",
            params={"thread_id": thread_id},
            content=b'{"chat_name": "' + name.encode() + b'"}',
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_text"


@pytest.mark.parametrize("run", ["99999999999999999999999", "2147483648", "0", "-1"])
def test_run_numbers_out_of_range_are_4xx(server: ChatServer, run: str) -> None:
    with server.client() as client:
        thread_id = post_message(client, "hello")["thread_id"]
        response = client.get("/v1/chat/stream", params={"thread_id": thread_id, "run": run})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_request"


def test_the_answer_cache_is_per_user(server: ChatServer) -> None:
    # Issue 12: user B's start response said "cached": true for user A's first question.
    question = f"What is the capital of France? {uuid.uuid4().hex}"
    with server.client() as alice, server.client() as bob:
        ask(alice, question, use_cache=True)
        _, again = ask(alice, question, use_cache=True)
        _, other = ask(bob, question, use_cache=True)

    def cached(events: list[Any]) -> Any:
        return next(e.data["cached"] for e in events if e.data.get("type") == "start")

    assert cached(again) is True  # the cache works...
    assert cached(other) is False  # ...for its user only


def both(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Run the calls at the same moment, each in its own thread."""
    barrier = threading.Barrier(len(calls))

    def go(call: Callable[[], httpx.Response]) -> httpx.Response:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(go, calls))


def reject_trials(first: ChatServer, second: ChatServer, trials: int = 6) -> list[list[int]]:
    """Post two messages at the same moment to an idle thread, through `first` and `second`;
    the sorted statuses of each trial. Answers are paced: the accepted one is still being
    written when the other arrives."""
    token = f"user-{uuid.uuid4().hex}"
    outcomes, bodies = [], []
    with token_client(first, token) as a, token_client(second, token) as b:
        for trial in range(trials):
            started = post_message(a, f"hello {trial}")
            thread_id = started["thread_id"]
            a.post("/v1/chat/stop", params={"thread_id": thread_id})
            # At once after the answer's stream has ended (or, in worker mode, when the stop
            # dropped the run before it started and the read gets 204 at once), while its
            # holder may still be saving it: both requests then wait for the lock, and only
            # one may get through.
            read_sse(a, started["stream_url"])
            responses = both(
                [
                    lambda c=c, t=thread_id: c.post(  # type: ignore[misc]
                        "/v1/chat/message",
                        json={
                            "message": "How should I structure a small side project?",
                            "thread_id": t,
                        },
                    )
                    for c in (a, b)
                ]
            )
            outcomes.append(sorted(r.status_code for r in responses))
            bodies.append([r.text for r in responses])
            a.post("/v1/chat/stop", params={"thread_id": thread_id})
    print("responses:", bodies)  # shown when an assertion on the outcomes fails
    return outcomes


def test_reject_policy_is_exact_within_a_process(
    chat_servers: Callable[..., ChatServer], chat_backend: dict[str, str]
) -> None:
    # Issue 12: two concurrent POSTs to an idle thread both got 202 in 5 of 6 trials.
    server = chat_servers(BUSY_POLICY="reject", OFFLINE_TOKENS_PER_SECOND="40", **chat_backend)
    assert reject_trials(server, server) == [[202, 409]] * 6


async def test_reject_waits_for_an_unmarked_lock_as_long_as_it_is_held(tmp_path: Path) -> None:
    # A request that finds the lock held by another still submitting its message (no mark)
    # waited 0.5 s at most, then answered 409; under load both requests of one trial could
    # run out of that wait, and a message on an idle thread was rejected.
    settings = Settings(busy_policy="reject", secret_key="s", data_dir=tmp_path)
    async with open_runtime(settings) as runtime:
        runs = runtime.runs
        thread = await runtime.store.create_thread("ada", "t")
        submitting = await runs.lock.try_acquire(thread.id)
        assert submitting is not None
        waiting = asyncio.create_task(runs._lock_if_idle(thread.id))
        # A bound, not a wait for readiness: twice the time the old wait gave up after.
        done, _ = await asyncio.wait({waiting}, timeout=1.0)
        assert not done, "gave up on a lock whose holder is still there"
        await submitting.release()  # it queued nothing: the thread is idle
        held = await waiting
        assert held is not None and held.thread_id == thread.id
        await held.release()


async def test_reject_answers_at_once_when_the_unmarked_holder_starts_answering(
    tmp_path: Path,
) -> None:
    settings = Settings(busy_policy="reject", secret_key="s", data_dir=tmp_path)
    async with open_runtime(settings) as runtime:
        runs, store = runtime.runs, runtime.store
        thread = await store.create_thread("ada", "t")
        holder = await runs.lock.try_acquire(thread.id)
        assert holder is not None
        waiting = asyncio.create_task(runs._lock_if_idle(thread.id))
        job = await store.add_run(
            thread.id, message="hi", model="offline", use_cache=False, human_id=None
        )
        await holder.answering(job.seq, runtime.transport)  # a run queued, the lock marked
        assert await waiting is None  # busy, without waiting for the holder to finish
        await holder.release()


@pytest.mark.redis
@pytest.mark.postgres
def test_reject_policy_is_exact_across_processes(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    env = {
        **redis_postgres_env(request),
        "BUSY_POLICY": "reject",
        "OFFLINE_TOKENS_PER_SECOND": "40",
    }
    assert reject_trials(chat_servers(**env), chat_servers(**env)) == [[202, 409]] * 6


@pytest.mark.redis
@pytest.mark.postgres
def test_reject_policy_is_exact_in_worker_mode(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    env = {
        **redis_postgres_env(request),
        "BUSY_POLICY": "reject",
        "OFFLINE_TOKENS_PER_SECOND": "40",
        "WORKER_MODE": "1",
    }
    api, other = chat_servers(**env), chat_servers(**env)
    chat_servers("worker", **env)
    assert reject_trials(api, other) == [[202, 409]] * 6


@pytest.mark.redis
@pytest.mark.parametrize(
    "redis_kind",
    [
        pytest.param("redis_sentinel", marks=pytest.mark.redis_sentinel),
        pytest.param("redis_cluster", marks=pytest.mark.redis_cluster),
    ],
)
def test_sentinel_and_cluster_redis_urls_serve_and_cache_answers(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest, redis_kind: str
) -> None:
    # Regression: the answer cache opened its own client with redis-py's Redis.from_url,
    # which takes neither redis+sentinel:// nor redis+cluster://: a REDIS_URL the README
    # lists stopped the service at start-up with a traceback.
    url = request.getfixturevalue(redis_kind).url
    server = chat_servers(REDIS_URL=url, REDIS_PREFIX=f"chat{uuid.uuid4().hex[:8]}")
    question = f"Tell me about cache warming {uuid.uuid4().hex[:6]}"
    with server.client() as client:
        _, first = ask(client, question, use_cache=True)
        _, second = ask(client, question, use_cache=True)
    assert first[0].data["cached"] is False
    assert second[0].data["cached"] is True


async def test_a_run_naming_no_model_uses_the_services_chat_model(tmp_path: Path) -> None:
    # Regression: a LangGraph client's run (/langgraph, useStream, Agent Chat UI) names no
    # model in its config, and the agent answered it with "offline" whatever CHAT_MODEL
    # said; the chat API used CHAT_MODEL. (No provider package is installed here, so the
    # service's model fails to build: that it was asked for is the point.)
    from chat_service.models import ModelUnavailableError

    settings = Settings(chat_model="openai:gpt-4o-mini", secret_key="s", data_dir=tmp_path)
    async with open_runtime(settings) as runtime:
        config = {"configurable": {"thread_id": str(uuid.uuid4())}}
        with pytest.raises(ModelUnavailableError, match="langchain-openai"):
            await runtime.agent.ainvoke({"messages": [("user", "hello")]}, config)
