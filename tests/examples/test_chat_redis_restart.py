"""Redis restarted without persistence in the middle of an answer: its stream is gone, and
the run writing it writes it again from its recent window. A worker (worker mode) keeps
answering, although Celery gives up on that error.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests._services import RedisClusterService, RedisServer
from tests.examples._chat import (
    CHAT_DIR,
    FAILS_AT_START,
    ChatServer,
    Sse,
    answer_text,
    eventually,
    failed_then_retried,
    history,
    post_message,
    read_sse,
    settled,
    terminal,
)

pytestmark = pytest.mark.redis


def chunks_at_least(n: int) -> Callable[[list[Sse]], bool]:
    return lambda events: sum(e.event == "chunk" for e in events) >= n


def test_an_answer_cut_by_a_redis_restart_is_written_again_by_its_writer(
    chat_servers: Callable[..., ChatServer], redis_server_factory: Callable[..., RedisServer]
) -> None:
    # Redis restarted without its data mid-answer: the stream is gone, but not deleted (no
    # marker), so its producer writes it again from its recent window and goes on. (It was
    # fenced: the answer was lost, recorded producer_lost.)
    redis = redis_server_factory()
    api = chat_servers(REDIS_URL=redis.url, STREAM_LEASE="1", OFFLINE_TOKENS_PER_SECOND="40")
    with api.client() as client:
        started = post_message(client, "search for Redis Streams and explain in detail")
        thread_id = started["thread_id"]
        _, before = read_sse(client, started["stream_url"], stop_after=chunks_at_least(3))
        redis.restart()
        # Read again from the start once the restart is over: the reader waits for the
        # stream if the producer has not made it again yet.
        _, events = read_sse(client, started["stream_url"])
        thread = eventually(lambda: settled(client, thread_id), timeout=20, what="recorded")
        again = post_message(client, "what is 12*7", thread_id=thread_id)
        _, answer = read_sse(client, again["stream_url"])

    assert terminal(events) == {"type": "end"}
    assert answer_text(events).startswith(answer_text(before))
    assert thread["last_error"] is None
    assert not any(m.get("stopped") for m in thread["messages"])
    last = thread["messages"][-1]
    assert last["role"] == "assistant" and last["text"]  # saved, as after any answer
    assert terminal(answer) == {"type": "end"}
    assert "84" in answer_text(answer)


def test_an_answer_cut_by_a_redis_restart_past_its_writers_window_fails_with_retry(
    chat_servers: Callable[..., ChatServer], redis_server_factory: Callable[..., RedisServer]
) -> None:
    # Regression: an answer longer than its writer's rollback window (256 entries) when
    # Redis restarted without its data could not be written again: its stream ended with
    # storage_rollback, but the run was recorded done. The thread showed the question with
    # "No answer was saved", no error, and GET /v1/thread no last_error.
    redis = redis_server_factory()
    api = chat_servers(REDIS_URL=redis.url, OFFLINE_TOKENS_PER_SECOND="100")
    # About 600 tokens. Redis restarts once the stream holds 300 entries (an event's offset
    # is epoch-entry-index), past the window.
    question = "How should I plan " + " ".join(["the garden"] * 250) + "?"
    with api.client() as client:
        started = post_message(client, question)
        thread_id = started["thread_id"]
        _, before = read_sse(
            client,
            started["stream_url"],
            stop_after=lambda events: int(events[-1].id.split("-")[1]) >= 300,
        )
        assert terminal(before) is None  # still being written
        redis.restart()
        _, events = read_sse(client, started["stream_url"])
        thread = eventually(lambda: settled(client, thread_id), timeout=20, what="recorded")
        retried = client.post("/v1/chat/regenerate", json={"thread_id": thread_id})
        assert retried.status_code == 202, retried.text
        _, answer = read_sse(client, retried.json()["stream_url"])

    error = terminal(events)
    assert error is not None and (error["type"], error.get("code")) == ("error", "storage_rollback")
    assert thread["last_error"] == {"run": started["run"], "code": "storage_rollback"}
    assert not any(m.get("stopped") for m in thread["messages"])
    assert terminal(answer) == {"type": "end"}
    assert "the garden" in answer_text(answer)


def test_an_answer_whose_stream_could_not_be_started_fails_with_retry(
    chat_servers: Callable[..., ChatServer], redis_url: str, tmp_path: Path
) -> None:
    # Regression: a server that could not reach Redis as it started an answer's stream
    # recorded the run as done. Its readers got 404 (no stream, and a done run), and the
    # thread showed the question answered, with no answer, no error and no Retry
    # (regenerate: 409 nothing_to_retry).
    marker = tmp_path / "refused"
    api = chat_servers(
        REDIS_URL=redis_url,
        REDIS_PREFIX=f"chat{uuid.uuid4().hex[:8]}",
        PYTHONPATH=os.pathsep.join([str(FAILS_AT_START), str(CHAT_DIR)]),
        CHAT_TEST_FAIL_AT_START=str(marker),
    )
    with api.client() as client:
        first, events, thread, answer = failed_then_retried(client)

    assert marker.exists() and "could not start answer" in api.output()
    error = terminal(events)
    assert error is not None and (error["type"], error["code"]) == ("error", "start_failed")
    assert thread["last_error"] == {"run": first["run"], "code": "start_failed"}
    assert terminal(answer) == {"type": "end"}
    assert "84" in answer_text(answer)


@pytest.mark.redis_cluster
def test_a_message_whose_thread_lock_master_is_down_fails_with_retry_not_queued_for_ever(
    chat_servers: Callable[..., ChatServer], redis_cluster: RedisClusterService
) -> None:
    # Regression (Redis Cluster, BUSY_POLICY=queue): a message that came as the master of
    # its thread's lock died was recorded queued, then handing it to a writer failed (503).
    # Nobody answered it: the thread showed it answering for ever, and it counted against
    # the user's MAX_ANSWERS_PER_USER for good (429 to every message; found by a soak).
    api = chat_servers(
        REDIS_URL=redis_cluster.url,
        STREAM_LEASE="1",
        BUSY_POLICY="queue",
        MAX_ANSWERS_PER_USER="2",
        OFFLINE_TOKENS_PER_SECOND="0",
    )

    def master_of(name: str) -> int:
        return redis_cluster.owner(redis_cluster.slot_of(f"chat:{{{name}}}:meta"))

    def user_locks() -> set[str]:
        found: set[str] = set()
        for port in redis_cluster.master_ports():
            with redis_cluster.node(port).client(decode_responses=True) as redis:
                found.update(redis.scan_iter("chat:{user-*-lock}:meta"))
        return found

    # A user whose own keys (its quota's lock and LangGraph slots) are on masters other than
    # its thread's lock, which is then killed: the message is recorded, not handed over.
    for _ in range(40):
        before = user_locks()
        client = api.client()
        first = post_message(client, "what is 12*7")
        thread_id = first["thread_id"]
        read_sse(client, first["stream_url"])
        (user_lock,) = user_locks() - before
        digest = user_lock.split("user-")[1].split("-lock")[0]
        user = [f"user-{digest}-lock", *(f"user-{digest}-langgraph-{n}" for n in range(2))]
        thread_lock = master_of(f"thread-{thread_id}-lock")
        if thread_lock not in {master_of(name) for name in user}:
            break
        client.close()
    try:
        eventually(lambda: settled(client, thread_id), what="the first answer recorded")
        redis_cluster.kill(thread_lock)
        response = client.post(
            "/v1/chat/message", json={"message": "what is 6*7", "thread_id": thread_id}
        )
        redis_cluster.wait_healthy(replicas=False)
        thread = eventually(lambda: settled(client, thread_id), timeout=20, what="settled")
        assert response.status_code == 202, response.text

        def read_answer() -> list[Sse] | None:
            # 503 while the service still routes the run's slot to the dead master.
            status, events = read_sse(client, response.json()["stream_url"])
            return events if status == 200 else None

        events = eventually(read_answer, timeout=20, what="the answer read")

        def retry() -> list[Sse] | None:
            # Retry, as the page offers; again while the service still routes the lock's
            # slot to the dead master (it reads the slot map every 0.5 s until it moves).
            retried = client.post("/v1/chat/regenerate", json={"thread_id": thread_id})
            assert retried.status_code == 202, retried.text
            _, answer = read_sse(client, retried.json()["stream_url"])
            return answer if terminal(answer) == {"type": "end"} else None

        answer = eventually(retry, timeout=20, what="a retry answered")
    finally:
        client.close()

    error = terminal(events)
    assert error is not None and (error["type"], error["code"]) == ("error", "start_failed")
    assert thread["last_error"] == {"run": response.json()["run"], "code": "start_failed"}
    assert "42" in answer_text(answer)


def _worker_mode(redis: RedisServer, postgres_dsn: str, **settings: str) -> dict[str, str]:
    """The service's settings in worker mode on ``redis``: a lease of 1 s, and workers
    given 600 s to start an answer unless ``settings`` say otherwise."""
    return {
        "REDIS_URL": redis.url,
        "DATABASE_URL": postgres_dsn,
        "REDIS_PREFIX": f"chat{uuid.uuid4().hex[:8]}",
        "WORKER_MODE": "1",
        "STREAM_LEASE": "1",
        "WORKER_START_TIMEOUT": "600",
        **settings,
    }


@pytest.mark.postgres
def test_a_worker_survives_a_redis_restart_in_the_middle_of_an_answer(
    chat_servers: Callable[..., ChatServer],
    redis_server_factory: Callable[..., RedisServer],
    postgres_dsn: str,
) -> None:
    redis = redis_server_factory()
    env = _worker_mode(
        redis, postgres_dsn, WORKER_START_TIMEOUT="10", OFFLINE_TOKENS_PER_SECOND="40"
    )
    api = chat_servers(**env)
    worker = chat_servers("worker", **env)
    with api.client() as client:
        first = post_message(client, "search for Redis Streams and explain in detail")
        thread_id = first["thread_id"]
        read_sse(client, first["stream_url"], stop_after=chunks_at_least(3))
        redis.restart()
        eventually(lambda: settled(client, thread_id), timeout=20, what="the cut run ended")
        # Celery stopped on that error ("Unrecoverable error": kombu restores the task in
        # flight on a connection it already let go); a new worker process answers this.
        second = post_message(client, "what is 12*7", thread_id=thread_id)
        _, answer = read_sse(client, second["stream_url"])
        thread = history(client, thread_id)

    assert terminal(answer) == {"type": "end"}
    assert "84" in answer_text(answer)
    assert thread["last_error"] is None
    assert "a new one starts" in worker.output()
    assert worker.process is not None and worker.process.poll() is None


@pytest.mark.postgres
def test_an_answer_waiting_for_a_worker_when_redis_lost_its_task_fails_and_frees_the_thread(
    chat_servers: Callable[..., ChatServer],
    redis_server_factory: Callable[..., RedisServer],
    postgres_dsn: str,
) -> None:
    # Regression: Redis restarted without persistence takes the queued task and the
    # answer's reserved stream with it. The run stayed queued for good: its readers waited
    # for a stream that would never come back (WORKER_START_TIMEOUT lived in that stream),
    # and the thread refused every new message (409 thread_busy) until stopped.
    redis = redis_server_factory()
    env = _worker_mode(redis, postgres_dsn)
    api = chat_servers(**env)
    with api.client() as client:
        queued = post_message(client, "what is 12*7")  # no worker runs yet
        thread_id = queued["thread_id"]
        other = post_message(client, "what is 6*7")
        redis.restart()
        # A new message on a thread whose answer was lost, before anyone read that answer.
        again = client.post(
            "/v1/chat/message", json={"message": "hi", "thread_id": other["thread_id"]}
        )
        # A reader of the other lost answer.
        pool = ThreadPoolExecutor(1)
        try:
            # Keep-alives keep a waiting response open: bound the wait here.
            status, events = pool.submit(read_sse, client, queued["stream_url"]).result(10)
        finally:
            pool.shutdown(wait=False)  # a reader left waiting ends with the client
        failed = eventually(lambda: settled(client, thread_id), what="the lost run recorded")

    error = terminal(events)
    assert again.status_code == 202, again.text
    assert status == 200
    assert error is not None and (error["type"], error["code"]) == ("error", "queue_unavailable")
    assert failed["last_error"] == {"run": queued["run"], "code": "queue_unavailable"}


@pytest.mark.postgres
def test_a_queued_answer_whose_task_redis_lost_reads_as_lost_after_the_next_is_answered(
    chat_servers: Callable[..., ChatServer],
    redis_server_factory: Callable[..., RedisServer],
    postgres_dsn: str,
) -> None:
    # Regression (BUSY_POLICY=queue): the worker answering the next message of the thread
    # recorded the lost answer as not_started ("are workers running?"), while a reader that
    # came first was told queue_unavailable. Both now say queue_unavailable.
    redis = redis_server_factory()
    env = _worker_mode(redis, postgres_dsn, BUSY_POLICY="queue")
    api = chat_servers(**env)
    with api.client() as client:
        lost = post_message(client, "what is 12*7")  # no worker runs yet
        thread_id = lost["thread_id"]
        redis.restart()
        following = post_message(client, "what is 6*7", thread_id=thread_id)
        chat_servers("worker", **env)
        _, answer = read_sse(client, following["stream_url"])
        status, events = read_sse(client, lost["stream_url"])

    assert terminal(answer) == {"type": "end"}
    assert status == 200
    error = terminal(events)
    assert error is not None and (error["type"], error["code"]) == ("error", "queue_unavailable")
