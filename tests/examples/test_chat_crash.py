"""`kill -9` of the server mid-answer, then a restart: nobody waits for ever (issue 12).

Every reader of the interrupted answer, including one resuming with its last event id, gets
a terminal `error` event (an SSE event a page can show, not an HTTP error that makes
EventSource give up); the run leaves `started`; the thread takes new messages. On embedded
defaults the answer died with the process and says so at once; with Redis the library's
crash detection ends it with `producer_lost` once the dead server's lease lapses.
"""

from __future__ import annotations

from collections.abc import Callable

from tests.examples._chat import (
    ChatServer,
    Sse,
    answer_text,
    ask,
    eventually,
    post_message,
    read_sse,
    settled,
    terminal,
)

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
