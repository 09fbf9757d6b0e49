"""Worker mode: the API queues Celery tasks, `python -m chat_service worker` (a real Celery
worker on the Redis broker) answers them.

A worker that dies mid-answer (SIGKILL: no cleanup at all) must not leave readers waiting:
the library's crash detection ends the answer's stream with `producer_lost` once the
worker's lease lapses, and another worker takes the thread over. A task the dead worker had
received but not started is delivered again (late acknowledgement, visibility timeout) and
answered, with a WORKER_VISIBILITY_TIMEOUT below WORKER_START_TIMEOUT as here; an answer no
worker starts in time ends with `not_started`.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

from tests.examples._chat import (
    CHAT_DIR,
    FAILS_AT_START,
    ChatServer,
    Sse,
    answer_text,
    eventually,
    failed_then_retried,
    final_answer,
    history,
    post_message,
    read_sse,
    settled,
    terminal,
)
from tests.examples.conftest import redis_postgres_env
from tests.examples.test_chat_policies import CONVERSATION, assert_answered_in_order

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

LEASE = 1.0


def chunks_at_least(n: int) -> Callable[[list[Sse]], bool]:
    return lambda events: sum(e.event == "chunk" for e in events) >= n


def test_workers_answer_and_a_killed_worker_ends_its_answer_with_an_error(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    env = {
        **redis_postgres_env(request),
        "WORKER_MODE": "1",
        "STREAM_LEASE": str(LEASE),
        "WORKER_VISIBILITY_TIMEOUT": "3",
        "OFFLINE_TOKENS_PER_SECOND": "40",
    }
    api = chat_servers(**env)
    with api.client() as client:
        # Enqueued before any worker exists: the job waits in Redis, the reader waits for it.
        first = post_message(client, "search for Redis Streams")
        assert first["status"] == "queued"
        thread_id = first["thread_id"]
        worker = chat_servers("worker", **env)
        _, answered = read_sse(client, first["stream_url"])
        after_first = history(client, thread_id)

        second = post_message(client, "How should I design a cache?", thread_id=thread_id)
        _, head = read_sse(client, second["stream_url"], stop_after=chunks_at_least(3))
        worker.kill()
        _, rest = read_sse(client, second["stream_url"], last_event_id=head[-1].id)

        # Another worker takes over: the thread answers again.
        chat_servers("worker", **env)
        third = post_message(client, "what is 12*7", thread_id=thread_id)
        _, answered_again = read_sse(client, third["stream_url"])
        stats = client.get("/info").json()

    assert terminal(answered) == {"type": "end"}
    assert answer_text(answered) == final_answer(after_first)

    error = terminal(rest)
    assert error is not None
    assert (error["type"], error["code"]) == ("error", "producer_lost")
    assert "stopped" in error["message"]

    assert terminal(answered_again) == {"type": "end"}
    assert "84" in answer_text(answered_again)
    assert stats["worker_mode"] is True
    assert stats["stats"].get("model_runs", 0) == 0  # the API process generated nothing


def received(worker: ChatServer) -> int:
    return worker.output().count("Task chat_service.answer[")


def test_a_task_its_dead_worker_had_received_is_delivered_again_and_answered(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    env = {
        **redis_postgres_env(request),
        "WORKER_MODE": "1",
        "BUSY_POLICY": "queue",
        "STREAM_LEASE": str(LEASE),
        "WORKER_VISIBILITY_TIMEOUT": "3",
        "WORKER_CONCURRENCY": "2",
        "OFFLINE_TOKENS_PER_SECOND": "40",
    }
    api = chat_servers(**env)
    worker = chat_servers("worker", **env)
    with api.client() as client:
        first = post_message(client, "How should I structure a small side project?")
        thread_id = first["thread_id"]
        second = post_message(client, "what is 12*7", thread_id=thread_id)
        _, head = read_sse(client, first["stream_url"], stop_after=chunks_at_least(3))
        # The second task is in the worker's hands, waiting for the thread's lock.
        eventually(lambda: received(worker) >= 2, what="the worker received both tasks")
        worker.kill()
        _, rest = read_sse(client, first["stream_url"], last_event_id=head[-1].id)

        # Unacknowledged, the second task goes back to the queue once its visibility
        # timeout lapses, and the next worker answers it on the stream readers wait on.
        chat_servers("worker", **env)
        _, answer = read_sse(client, second["stream_url"])
        thread = eventually(lambda: settled(client, thread_id), what="the thread settles")

    lost = terminal(rest)
    assert lost is not None and lost["code"] == "producer_lost"
    assert second["status"] == "queued"
    assert terminal(answer) == {"type": "end"}
    assert "84" in answer_text(answer)
    assert final_answer(thread) == answer_text(answer)
    assert thread["last_error"] is None


def test_an_answer_no_worker_starts_in_time_ends_with_not_started(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    env = {
        **redis_postgres_env(request),
        "WORKER_MODE": "1",
        "STREAM_LEASE": str(LEASE),
        "WORKER_START_TIMEOUT": "1",
    }
    api = chat_servers(**env)
    with api.client() as client:
        queued = post_message(client, "what is 12*7")
        thread_id = queued["thread_id"]
        status, events = read_sse(client, queued["stream_url"])
        failed = eventually(lambda: settled(client, thread_id), what="the run failed")
        listed = client.get("/v1/threads").json()["threads"]
        # The same through the AI SDK endpoint: its reader records the run as failed too
        # (it was left queued, and the thread busy, before).
        chat_id = uuid.uuid4().hex[:16]
        message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
        ui = client.post("/api/chat", json={"id": chat_id, "messages": [message]})
        ui_failed = eventually(lambda: settled(client, chat_id), what="the AI SDK run failed")

        # A worker that comes later skips the stale task, and answers the next message.
        worker = chat_servers("worker", **env)
        retried = client.post("/v1/chat/regenerate", json={"thread_id": thread_id})
        assert retried.status_code == 202, retried.text
        _, answer = read_sse(client, retried.json()["stream_url"])
        skipped = eventually(
            lambda: "nothing to do: the run is failed" in worker.output(),
            what="the stale task was skipped",
        )

    error = terminal(events)
    assert status == 200
    assert error is not None
    assert (error["type"], error["code"]) == ("error", "not_started")
    assert "no worker started" in error["message"]
    assert failed["last_error"] == {"run": queued["run"], "code": "not_started"}
    assert [t["streaming"] for t in listed] == [False]
    assert '"type":"error"' in ui.text and "start timeout" in ui.text
    assert ui_failed["last_error"] == {"run": 1, "code": "not_started"}
    assert terminal(answer) == {"type": "end"}
    assert "84" in answer_text(answer)
    assert skipped


def test_retrying_an_edit_no_worker_started_replaces_the_question(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    # Regression: the retry of an edit that failed before it reached the conversation
    # (not_started, or its server died) asked the edited question after the old turn: the
    # thread kept the question the user had replaced, and its answer.
    env = {
        **redis_postgres_env(request),
        "WORKER_MODE": "1",
        "STREAM_LEASE": str(LEASE),
        "WORKER_START_TIMEOUT": "1",
    }
    api = chat_servers(**env)
    worker = chat_servers("worker", **env)
    with api.client() as client:
        first = post_message(client, "what is 12*7")
        thread_id = first["thread_id"]
        assert terminal(read_sse(client, first["stream_url"])[1]) == {"type": "end"}
        eventually(lambda: settled(client, thread_id), what="the answer saved")
        worker.stop()
        edit = post_message(client, "what is 6*7", thread_id=thread_id, edit_last=True)
        _, events = read_sse(client, edit["stream_url"])
        assert (terminal(events) or {}).get("code") == "not_started"
        eventually(lambda: settled(client, thread_id), what="the edit failed")

        chat_servers("worker", **env)
        retried = client.post("/v1/chat/regenerate", json={"thread_id": thread_id})
        assert retried.status_code == 202, retried.text
        _, answer = read_sse(client, retried.json()["stream_url"])
        thread = eventually(lambda: settled(client, thread_id), what="the retry saved")

    assert terminal(answer) == {"type": "end"}
    assert "42" in answer_text(answer)
    questions = [m["text"] for m in thread["messages"] if m["role"] == "user"]
    assert questions == ["what is 6*7"]
    assert "42" in final_answer(thread)
    assert thread["last_error"] is None


def test_queued_messages_of_a_thread_are_answered_in_order_by_concurrent_workers(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    env = {
        **redis_postgres_env(request),
        "WORKER_MODE": "1",
        "BUSY_POLICY": "queue",
        "WORKER_CONCURRENCY": "4",
        "OFFLINE_TOKENS_PER_SECOND": "100",
    }
    api = chat_servers(**env)
    chat_servers("worker", **env)
    chat_servers("worker", **env)
    with api.client() as client:
        first = post_message(client, CONVERSATION[0])
        thread_id = first["thread_id"]
        runs = [first] + [
            post_message(client, text, thread_id=thread_id) for text in CONVERSATION[1:]
        ]
        endings = [terminal(read_sse(client, run["stream_url"])[1]) for run in runs]
        thread = history(client, thread_id)

    assert endings == [{"type": "end"}] * 4
    assert_answered_in_order(thread, runs)


def test_stopping_an_answer_no_worker_took_yet_ends_it_as_stopped_at_once(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    # The workers are busy (here: none runs): Stop must end the queued answer for its
    # readers now, as stopped, not after WORKER_START_TIMEOUT with not_started.
    env = {
        **redis_postgres_env(request),
        "WORKER_MODE": "1",
        "STREAM_LEASE": str(LEASE),
        "WORKER_START_TIMEOUT": "120",
    }
    api = chat_servers(**env)
    # A short read timeout: an answer left waiting for a worker fails the test at once.
    opened = threading.Event()
    hooks = {"response": [lambda response: opened.set()]}
    with httpx.Client(base_url=api.url, timeout=10.0, event_hooks=hooks) as client:
        queued = post_message(client, "what is 12*7")
        thread_id = queued["thread_id"]
        opened.clear()
        with ThreadPoolExecutor(1) as pool:
            # A reader waiting on the answer (the page opens it at once), then Stop.
            reading = pool.submit(read_sse, client, queued["stream_url"])
            assert opened.wait(10), "the answer's stream did not open"
            # A stop meant for another answer (one that ended) leaves it queued.
            other = {"thread_id": thread_id, "run": queued["run"] + 1}
            assert client.post("/v1/chat/stop", params=other).json()["stopped"] is False
            params = {"thread_id": thread_id, "run": queued["run"]}
            stopped = client.post("/v1/chat/stop", params=params)
            assert stopped.status_code == 200, stopped.text
            assert stopped.json()["stopped"] is True
            status, events = reading.result()
        thread = eventually(lambda: settled(client, thread_id), what="the thread settles")
        again = post_message(client, "what is 12*7", thread_id=thread_id)

    assert status == 200
    assert terminal(events) == {"type": "end", "reason": "stopped"}
    assert thread["last_error"] is None
    assert again["status"] == "queued"


def test_the_next_answer_of_a_thread_records_the_one_a_dead_worker_left_unread(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    # Regression: a worker killed mid-answer while nobody read that answer (the tab was
    # closed), and no worker restarted to recover it. Another worker answered the thread's
    # next message, but the dead answer stayed `started`: GET /v1/thread showed it as the
    # answer in flight, its history cut after its question (the new answer hidden), and
    # GET /v1/threads said `streaming` until somebody read the dead answer's stream.
    env = {
        **redis_postgres_env(request),
        "WORKER_MODE": "1",
        "BUSY_POLICY": "queue",
        "STREAM_LEASE": str(LEASE),
        "OFFLINE_TOKENS_PER_SECOND": "40",
    }
    api = chat_servers(**env)
    workers = [chat_servers("worker", **env), chat_servers("worker", **env)]
    with api.client() as client:
        first = post_message(client, "How should I design a cache?")
        thread_id = first["thread_id"]
        read_sse(client, first["stream_url"], stop_after=chunks_at_least(3))
        busy = next(w for w in workers if received(w))
        busy.kill()  # and nobody reads the answer it was writing

        second = post_message(client, "what is 12*7", thread_id=thread_id)
        _, answer = read_sse(client, second["stream_url"])
        thread = eventually(lambda: settled(client, thread_id), what="the thread settles")
        listed = client.get("/v1/threads").json()["threads"]

    assert terminal(answer) == {"type": "end"}
    assert final_answer(thread) == answer_text(answer)
    assert [m["text"] for m in thread["messages"] if m["role"] == "user"] == [
        "How should I design a cache?",
        "what is 12*7",
    ]
    assert [t["streaming"] for t in listed] == [False]


#: A folder whose sitecustomize makes a worker SIGKILL itself right after it claims a reserved
#: answer (StreamProducer.start(..., reservation=...)), before it marks the run started.
DIES_AFTER_CLAIM = Path(__file__).parent / "dies_after_claim"


def run_states(dsn: str, thread_id: str) -> list[tuple[str, str | None]]:
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            "SELECT state, error FROM chat_runs WHERE thread_id = %s ORDER BY seq", (thread_id,)
        ).fetchall()
    return [(state, error) for state, error in rows]


@pytest.mark.parametrize("noticed_by", ["reader", "next message", "next worker", "task again"])
def test_an_answer_whose_worker_died_as_it_claimed_it_is_recorded_as_lost(
    chat_servers: Callable[..., ChatServer],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    noticed_by: str,
) -> None:
    # Regression: a worker killed after it claimed the reserved stream, before it marked
    # the run started, left the run queued for good. Its stream ended with producer_lost,
    # but readers record that only for started runs, and the task delivered again found the
    # stream claimed (StreamAlreadyRunning) and left it: the thread showed the answer
    # queued, GET /v1/threads said streaming, and BUSY_POLICY=reject answered 409 to every
    # message. The queued policy's next answer recorded it as not_started.
    env = {
        **redis_postgres_env(request),
        "WORKER_MODE": "1",
        "BUSY_POLICY": "queue" if noticed_by in ("next worker", "task again") else "reject",
        "STREAM_LEASE": str(LEASE),
        "WORKER_VISIBILITY_TIMEOUT": "3" if noticed_by == "task again" else "3600",
    }
    dsn = env["DATABASE_URL"]
    marker = tmp_path / "claimed"
    api = chat_servers(**env)
    worker = chat_servers(
        "worker",
        **env,
        PYTHONPATH=os.pathsep.join([str(DIES_AFTER_CLAIM), str(CHAT_DIR)]),
        CHAT_TEST_DIE_AFTER_CLAIM=str(marker),
    )
    with api.client() as client:
        first = post_message(client, "what is 12*7")
        thread_id = first["thread_id"]
        eventually(
            lambda: "the Celery worker stopped (signal 9" in worker.output(),
            what="the worker died after its claim",
        )
        assert marker.exists()
        assert run_states(dsn, thread_id) == [("queued", None)]

        if noticed_by == "reader":
            _, lost = read_sse(client, first["stream_url"])
            assert (terminal(lost) or {}).get("code") == "producer_lost"
            thread = eventually(lambda: settled(client, thread_id), what="the thread settles")
            assert thread["last_error"] == {"run": first["run"], "code": "producer_lost"}
        elif noticed_by == "task again":
            # Nobody reads it, and no message follows: the task, delivered again to the
            # worker that replaced the dead one, records it.
            thread = eventually(
                lambda: settled(client, thread_id), timeout=20, what="the thread settles"
            )
            assert thread["last_error"] == {"run": first["run"], "code": "producer_lost"}

        def sent() -> httpx.Response | None:
            # (Reject: 409 while the dead worker's lease on the thread has not lapsed, as
            # for a live worker; it was 409 for good.)
            response = client.post(
                "/v1/chat/message", json={"message": "what is 6*7", "thread_id": thread_id}
            )
            return response if response.status_code != 409 else None

        # The thread takes the next message, and answers it.
        response = eventually(sent, what="the thread takes a message")
        assert response.status_code == 202, response.text
        second = response.json()
        _, answer = read_sse(client, second["stream_url"])
        thread = eventually(lambda: settled(client, thread_id), what="the thread settles")
        _, first_events = read_sse(client, first["stream_url"])

    assert terminal(answer) == {"type": "end"}
    assert "42" in answer_text(answer)
    assert final_answer(thread) == answer_text(answer)
    assert (terminal(first_events) or {}).get("code") == "producer_lost"
    assert run_states(dsn, thread_id) == [("failed", "producer_lost"), ("done", None)]


def test_an_answer_whose_start_failed_on_redis_is_recorded_as_its_readers_are_told(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Regression (chaos soak, a Redis restart): a worker that could not reach Redis as it
    # started a reserved answer recorded the run as done. Its readers got not_started once
    # the start timeout lapsed, while the thread showed the question answered, with no
    # error and no Retry.
    env = {
        **redis_postgres_env(request),
        "WORKER_MODE": "1",
        "STREAM_LEASE": str(LEASE),
        "WORKER_START_TIMEOUT": "1",
    }
    marker = tmp_path / "refused"
    api = chat_servers(**env)
    worker = chat_servers(
        "worker",
        **env,
        PYTHONPATH=os.pathsep.join([str(FAILS_AT_START), str(CHAT_DIR)]),
        CHAT_TEST_FAIL_AT_START=str(marker),
    )
    with api.client() as client:
        first, events, thread, answer = failed_then_retried(client)

    assert marker.exists() and "'not started'" in worker.output()
    error = terminal(events)
    assert error is not None and (error["type"], error["code"]) == ("error", "not_started")
    assert thread["last_error"] == {"run": first["run"], "code": "not_started"}
    assert terminal(answer) == {"type": "end"}
    assert "84" in answer_text(answer)
    assert run_states(env["DATABASE_URL"], first["thread_id"]) == [
        ("failed", "not_started"),
        ("done", None),
    ]


def test_an_answer_nobody_read_that_no_worker_started_does_not_keep_its_thread_busy(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    env = {
        **redis_postgres_env(request),
        "WORKER_MODE": "1",
        "STREAM_LEASE": str(LEASE),
        "WORKER_START_TIMEOUT": "1",
    }
    api = chat_servers(**env)
    with api.client() as client:
        # Sent, and its answer never read (its tab closed): no worker starts it in time.
        # Retry, then a new message, are taken once its start timeout lapsed (they were
        # refused as busy until somebody read the answer, for ever if nobody did).
        queued = post_message(client, "what is 12*7")
        thread_id = queued["thread_id"]
        retried = eventually(
            lambda: accepted(client.post("/v1/chat/regenerate", json={"thread_id": thread_id})),
            what="a retry is accepted",
        )
        after_retry = history(client, thread_id)
        # Nor is the retry's answer read: a new message is taken once it lapsed too.
        second = eventually(
            lambda: accepted(
                client.post(
                    "/v1/chat/message", json={"message": "what is 12*7", "thread_id": thread_id}
                )
            ),
            what="a new message is accepted",
        )
        thread = history(client, thread_id)

    assert retried["run"] == queued["run"] + 1
    assert after_retry["active_run"]["run"] == retried["run"]
    assert second["run"] == retried["run"] + 1
    assert thread["active_run"]["run"] == second["run"]
    assert run_states(env["DATABASE_URL"], thread_id) == [
        ("failed", "not_started"),
        ("failed", "not_started"),
        ("queued", None),
    ]


def accepted(response: httpx.Response) -> dict[str, Any] | None:
    """The body of a 202 response, else None (a 409 while the thread is busy)."""
    assert response.status_code in (202, 409), response.text
    if response.status_code == 409:
        return None
    body: dict[str, Any] = response.json()
    return body


def test_an_answer_a_dead_worker_left_does_not_hold_its_user_at_the_cap(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    # Regression: an answer whose worker was killed stayed `started` while nobody read it,
    # and counted toward MAX_ANSWERS_PER_USER: its user got 429 on every other thread. An
    # answer still waiting for a worker counts, though: it is not lost.
    backend = redis_postgres_env(request)
    env = {
        **backend,
        "WORKER_MODE": "1",
        "STREAM_LEASE": str(LEASE),
        "MAX_ANSWERS_PER_USER": "1",
        "OFFLINE_TOKENS_PER_SECOND": "40",
    }
    api = chat_servers(**env)
    worker = chat_servers("worker", **env)
    with api.client() as client, redis.Redis.from_url(backend["REDIS_URL"]) as admin:
        first = post_message(client, "How should I design a cache?")
        thread_id = first["thread_id"]
        read_sse(client, first["stream_url"], stop_after=chunks_at_least(3))
        worker.kill()  # and nobody reads the answer it was writing
        leases = [
            f"{backend['REDIS_PREFIX']}:{{{stream_id}}}:lease"
            for stream_id in (f"thread-{thread_id}-{first['run']}", f"thread-{thread_id}-lock")
        ]
        eventually(lambda: admin.exists(*leases) == 0, what="the dead worker's leases lapse")

        waiting = client.post("/v1/chat/message", json={"message": "what is 12*7"})
        assert waiting.status_code == 202, waiting.text
        assert history(client, thread_id)["last_error"] == {
            "run": first["run"],
            "code": "producer_lost",
        }
        # No worker is left to take it: queued, and counted.
        refused = client.post("/v1/chat/message", json={"message": "and 6*7?"})
        assert refused.status_code == 429, refused.text
        chat_servers("worker", **env)
        _, answer = read_sse(client, waiting.json()["stream_url"])
    assert terminal(answer) == {"type": "end"}
    assert "84" in answer_text(answer)
