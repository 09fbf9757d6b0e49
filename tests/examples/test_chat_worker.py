"""Worker mode: the API enqueues, `python -m chat_service worker` processes answer.

A worker that dies mid-answer (SIGKILL: no cleanup at all) must not leave readers waiting:
the library's crash detection ends the answer's stream with `producer_lost` once the
worker's lease lapses, and another worker takes the thread over.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.examples._chat import (
    ChatServer,
    Sse,
    answer_text,
    final_answer,
    history,
    post_message,
    read_sse,
    terminal,
)
from tests.examples.conftest import redis_postgres_env

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
        "WORKER_RECLAIM_IDLE": "2",
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
        killed_at = time.monotonic()
        _, rest = read_sse(client, second["stream_url"], last_event_id=head[-1].id)
        detected_after = time.monotonic() - killed_at

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
    assert detected_after < 4 * LEASE + 2  # about 1.5 leases, plus a reader's poll

    assert terminal(answered_again) == {"type": "end"}
    assert "84" in answer_text(answered_again)
    assert stats["worker_mode"] is True
    assert stats["stats"].get("model_runs", 0) == 0  # the API process generated nothing
