"""`kill -9` of the server mid-answer, then a restart: nobody waits for ever (issue 12).

Every reader of the interrupted answer, including one resuming with its last event id, gets
a terminal `error` event (an SSE event a page can show, not an HTTP error that makes
EventSource give up); the run leaves `started`; the thread takes new messages. On embedded
defaults the answer died with the process and says so at once; with Redis the library's
crash detection ends it with `producer_lost` once the dead server's lease lapses.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.examples._chat import (
    CHAT_DIR,
    ChatServer,
    Sse,
    answer_text,
    ask,
    eventually,
    final_answer,
    post_message,
    read_sse,
    settled,
    terminal,
)
from tests.examples.conftest import redis_postgres_env
from tests.examples.test_chat_worker import run_states

LEASE = "1"


def chunks_at_least(n: int) -> Callable[[list[Sse]], bool]:
    return lambda events: sum(e.event == "chunk" for e in events) >= n


def test_a_crash_mid_answer_ends_every_reader_with_an_error_and_frees_the_thread(
    chat_servers: Callable[..., ChatServer], chat_backend: dict[str, str]
) -> None:
    server = chat_servers(OFFLINE_TOKENS_PER_SECOND="40", STREAM_LEASE=LEASE, **chat_backend)
    with server.client() as client:
        started = post_message(client, "How should I structure a small side project?")
        thread_id, url = started["thread_id"], started["stream_url"]
        _, head = read_sse(client, url, stop_after=chunks_at_least(3))
        server.kill()
        server.start()

        resumed_status, resumed = read_sse(client, url, last_event_id=head[-1].id)
        fresh_status, fresh = read_sse(client, url)
        current_status, current = read_sse(client, f"/v1/chat/stream?thread_id={thread_id}")
        thread = eventually(lambda: settled(client, thread_id), what="the run left `started`")
        listed = client.get("/v1/threads").json()["threads"]
        again, answer = ask(client, "what is 12*7", thread_id=thread_id)

    expected = "server_restarted" if not chat_backend else "producer_lost"
    for status, events in ((resumed_status, resumed), (fresh_status, fresh)):
        assert status == 200
        error = terminal(events)
        assert error is not None, events
        assert (error["type"], error["code"]) == ("error", expected)
        assert "retry" in error["message"]
    assert current_status == 200
    assert terminal(current) == terminal(resumed)
    if not chat_backend:
        # Nothing could be saved: the restarted server says so without waiting for a lease.
        assert answer_text(resumed) == ""
    assert thread["active_run"] is None
    assert thread["last_error"] == {"run": started["run"], "code": expected}
    assert [t["streaming"] for t in listed if t["thread_id"] == thread_id] == [False]
    assert again["run"] == started["run"] + 1
    assert "84" in answer_text(answer)


def test_a_shutdown_mid_answer_is_saved_as_the_error_its_readers_get(
    chat_servers: Callable[..., ChatServer], chat_backend: dict[str, str]
) -> None:
    # Regression: readers of an answer cut by a clean shutdown (SIGTERM) got an error with
    # Retry, but the thread saved the text as a stopped answer with no error: after a
    # reload the page showed Regenerate, as for an answer the user had stopped.
    # (Slow: the answer must outlast the server's graceful wait for open responses.)
    server = chat_servers(OFFLINE_TOKENS_PER_SECOND="10", **chat_backend)
    with server.client() as client:
        started = post_message(client, "How should I structure a small side project?")
        thread_id, url = started["thread_id"], started["stream_url"]
        _, head = read_sse(client, url, stop_after=chunks_at_least(3))
        server.stop()
        server.start()
        status, resumed = read_sse(client, url, last_event_id=head[-1].id)
        thread = eventually(lambda: settled(client, thread_id), what="the run left `started`")

    assert status == 200
    told = terminal(resumed)
    assert told is not None and (told["type"], told.get("code")) == ("error", "shutdown"), told
    assert "retry" in told["message"]
    assert thread["last_error"] == {"run": started["run"], "code": "shutdown"}
    assert not any(m.get("stopped") for m in thread["messages"])


#: A folder whose sitecustomize makes a process SIGKILL itself right after it starts the
#: stream of an answer (StreamProducer.start), before it marks the run started.
DIES_AFTER_START = Path(__file__).parent / "dies_after_start"


@pytest.mark.redis
@pytest.mark.postgres
def test_an_answer_a_dead_process_left_queued_is_recorded_as_lost_at_restart(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Regression: the server killed right after it started an answer's stream, before it
    # marked the run started, left the run queued. At restart the queue's drain read the
    # stream to its end (its readers got producer_lost and Retry) but recorded the run
    # `done`: the thread showed the previous answer as the last one, no error, and the
    # question was gone; Retry answered the previous question again.
    marker = tmp_path / "died"
    server = chat_servers(
        **redis_postgres_env(request),
        STREAM_LEASE=LEASE,
        PYTHONPATH=os.pathsep.join([str(DIES_AFTER_START), str(CHAT_DIR)]),
        CHAT_TEST_DIE_AFTER_START=str(marker),
        CHAT_TEST_DIE_AFTER_START_RUN="2",
    )
    dsn = str(request.getfixturevalue("postgres_dsn"))
    with server.client() as client:
        first, _ = ask(client, "what is 12*7")
        thread_id = first["thread_id"]
        with pytest.raises(httpx.TransportError):  # the server died answering it
            client.post("/v1/chat/message", json={"message": "what is 6*7", "thread_id": thread_id})
        assert marker.exists()
        assert run_states(dsn, thread_id) == [("done", None), ("queued", None)]
        server.restart()  # nobody reads the cut answer: the restart's drain records it
        thread = eventually(lambda: settled(client, thread_id), what="the run left `queued`")
        retried, answer = ask(client, "", thread_id=thread_id, retry=True)

    assert thread["last_error"] == {"run": 2, "code": "producer_lost"}
    assert run_states(dsn, thread_id)[:2] == [("done", None), ("failed", "producer_lost")]
    assert retried["run"] == 3
    assert "42" in answer_text(answer)  # the lost question, asked again


def _left_started_by_a_dead_server(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest, redis_url: str
) -> tuple[ChatServer, str, dict[str, str], dict[str, Any]]:
    """An answer started on a server killed mid-answer, once its thread lock's lease has
    lapsed: another server (on the same Redis and PostgreSQL), the database, the user's
    headers and what the message's POST answered."""
    env = {**redis_postgres_env(request), "STREAM_LEASE": LEASE, "OFFLINE_TOKENS_PER_SECOND": "20"}
    a, b = chat_servers(**env), chat_servers(**env)
    dsn = str(request.getfixturevalue("postgres_dsn"))
    headers = {"authorization": f"Bearer erin-{uuid.uuid4().hex}"}
    with a.client(headers=headers) as on_a:
        started = post_message(on_a, "How should I structure a small side project?")
        read_sse(on_a, started["stream_url"], stop_after=chunks_at_least(3))
        lease = f"{env['REDIS_PREFIX']}:{{thread-{started['thread_id']}-lock}}:lease"
        with redis.Redis.from_url(redis_url) as admin:
            a.kill()
            eventually(lambda: not admin.exists(lease), what="the dead holder's lease lapses")
    return b, dsn, headers, started


@pytest.mark.redis
@pytest.mark.postgres
def test_an_answer_a_dead_process_left_started_is_recorded_as_lost_by_the_next_message(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest, redis_url: str
) -> None:
    # Regression: nobody read the answer cut by its server's death (its tab was closed);
    # the next message on the thread, in another process, recorded it `done`. (No longer
    # the thread's last answer, it shows only in its run's record.)
    b, dsn, headers, started = _left_started_by_a_dead_server(chat_servers, request, redis_url)
    thread_id = started["thread_id"]
    assert run_states(dsn, thread_id) == [("started", None)]  # recorded in flight
    with b.client(headers=headers) as on_b:
        ask(on_b, "what is 6*7", thread_id=thread_id)

    assert run_states(dsn, thread_id) == [("failed", "producer_lost"), ("done", None)]


@pytest.mark.redis
@pytest.mark.postgres
def test_reading_a_thread_records_an_answer_whose_server_died_for_good_as_lost(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest, redis_url: str
) -> None:
    # Regression: an answer whose server was killed, and never came back, showed as running
    # in GET /v1/thread for as long as nobody read its stream (which ends it producer_lost)
    # or sent a message on its thread: a client that only reads the thread waited for good.
    b, dsn, headers, started = _left_started_by_a_dead_server(chat_servers, request, redis_url)
    thread_id = started["thread_id"]
    with b.client(headers=headers) as on_b:
        # Ten leases: its stream's readers are told within two.
        thread = eventually(lambda: settled(on_b, thread_id), what="the answer recorded")

    assert thread["last_error"] == {"run": started["run"], "code": "producer_lost"}
    assert run_states(dsn, thread_id) == [("failed", "producer_lost")]


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.parametrize("sent", ["once its lease lapsed", "at once"])
def test_a_message_a_dead_process_left_queued_does_not_keep_the_thread_busy(
    chat_servers: Callable[..., ChatServer],
    request: pytest.FixtureRequest,
    redis_url: str,
    tmp_path: Path,
    sent: str,
) -> None:
    # Regression: with BUSY_POLICY=reject, a server killed right after it started an
    # answer's stream, before it marked the run started, left the run queued; every later
    # message on the thread, in any process, was `409 thread_busy` (the lock was free, but
    # nobody answered the queue) until that server restarted: for good if it never did.
    env = {**redis_postgres_env(request), "STREAM_LEASE": LEASE, "BUSY_POLICY": "reject"}
    marker = tmp_path / "died"
    dying = chat_servers(
        **env,
        PYTHONPATH=os.pathsep.join([str(DIES_AFTER_START), str(CHAT_DIR)]),
        CHAT_TEST_DIE_AFTER_START=str(marker),
        CHAT_TEST_DIE_AFTER_START_RUN="2",
    )
    other = chat_servers(**env)
    dsn = str(request.getfixturevalue("postgres_dsn"))
    headers = {"authorization": f"Bearer erin-{uuid.uuid4().hex}"}
    with dying.client(headers=headers) as on_a:
        first, _ = ask(on_a, "what is 12*7")
        thread_id = first["thread_id"]
        with pytest.raises(httpx.TransportError):  # the server died answering it
            on_a.post("/v1/chat/message", json={"message": "what is 6*7", "thread_id": thread_id})
    assert marker.exists()
    assert run_states(dsn, thread_id) == [("done", None), ("queued", None)]
    with other.client(headers=headers) as on_b:
        if sent == "once its lease lapsed":
            lease = f"{env['REDIS_PREFIX']}:{{thread-{thread_id}-lock}}:lease"
            with redis.Redis.from_url(redis_url) as admin:
                eventually(lambda: not admin.exists(lease), what="the dead holder's lease lapses")
        again, answer = ask(on_b, "what is 5*5", thread_id=thread_id)
        thread = eventually(lambda: settled(on_b, thread_id), what="the thread is idle")

    assert again["run"] == 3
    assert "25" in answer_text(answer)
    # The lost question is recorded as its readers are told (Retry), not left queued.
    assert run_states(dsn, thread_id) == [
        ("done", None),
        ("failed", "producer_lost"),
        ("done", None),
    ]
    assert "25" in final_answer(thread)
