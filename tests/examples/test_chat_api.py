"""The chat service's HTTP API, end to end against the real server process.

Every test here runs twice: on embedded defaults (memory streams, SQLite) and on Redis +
PostgreSQL. `fast` streams as fast as the offline model goes; `paced` at 40 tokens per
second, for tests that act in the middle of an answer.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.examples._chat import (
    ChatServer,
    Sse,
    answer_text,
    ask,
    eventually,
    final_answer,
    history,
    idle,
    post_message,
    read_sse,
    servers,
    settled,
    terminal,
)

ALLOWED_ORIGIN = "http://allowed.example"
GENERAL = "How should I structure a small side project?"


@pytest.fixture(scope="module")
def fast(
    chat_backend: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChatServer]:
    directory = tmp_path_factory.mktemp("chat-fast")
    with servers(directory) as make:
        yield make(
            DATA_DIR=str(directory / "data"),
            SUMMARIZE_AFTER_TOKENS="400",
            CORS_ORIGINS=ALLOWED_ORIGIN,
            **chat_backend,
        )


@pytest.fixture(scope="module")
def paced(
    chat_backend: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChatServer]:
    directory = tmp_path_factory.mktemp("chat-paced")
    with servers(directory) as make:
        yield make(DATA_DIR=str(directory / "data"), OFFLINE_TOKENS_PER_SECOND="40", **chat_backend)


def chunks_at_least(n: int) -> Callable[[list[Sse]], bool]:
    return lambda events: sum(e.event == "chunk" for e in events) >= n


# --------------------------------------------------------------------------- answering


def test_answer_streams_tool_call_and_text_and_is_saved(fast: ChatServer) -> None:
    with fast.client() as client:
        started, events = ask(client, "search for Redis Streams")
        thread = history(client, started["thread_id"])
        threads = client.get("/v1/threads").json()["threads"]

    kinds = [e.event for e in events]
    assert started["status"] == "started"  # its stream exists when POST answers
    assert events[0].data == {
        "type": "start",
        "thread_id": started["thread_id"],
        "run": 1,
        "model": "offline",
        "cached": False,
    }
    calls = [e.data for e in events if e.event == "tool_call"]
    assert [(c["name"], c["args"]) for c in calls] == [("web_search", {"query": "Redis Streams"})]
    assert kinds.index("tool_call") < kinds.index("chunk")
    ended = [e for e in events if e.event == "system" and e.data["type"] == "message_ended"]
    assert len(ended) == 2  # the tool-calling message, then the answer
    assert len({e.id for e in events}) == len(events)  # every event has its own offset

    text = answer_text(events)
    assert text.startswith("Here's what I found about Redis Streams.")
    assert [m["role"] for m in thread["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert thread["messages"][1]["tool_calls"][0]["name"] == "web_search"
    assert final_answer(thread) == text
    assert thread["active_run"] is None
    assert threads[0]["thread_id"] == started["thread_id"]
    assert threads[0]["title"] == "search for Redis Streams"


def test_last_event_id_resumes_after_a_dropped_connection(fast: ChatServer) -> None:
    with fast.client() as client:
        started = post_message(client, "How should I design a reliable queue?")
        url = started["stream_url"]
        _, first = read_sse(client, url, stop_after=chunks_at_least(5))
        _, rest = read_sse(client, url, last_event_id=first[-1].id)
        after_end, _ = read_sse(client, url, last_event_id=rest[-1].id)
        thread = history(client, started["thread_id"])

    ids = [e.id for e in first + rest]
    assert len(set(ids)) == len(ids)  # nothing twice
    assert terminal(rest) == {"type": "end"}
    assert answer_text(first) + answer_text(rest) == final_answer(thread)
    assert after_end == 204  # resumed after the last event: EventSource stops reconnecting


def test_a_second_message_continues_the_thread(fast: ChatServer) -> None:
    with fast.client() as client:
        started, _ = ask(client, "Hi, my name is Ada")
        again, events = ask(client, "What is my name?", thread_id=started["thread_id"])

    assert again["thread_id"] == started["thread_id"]
    assert again["run"] == 2
    assert answer_text(events).startswith("Your name is Ada")


def test_long_threads_are_summarized_before_the_model_call(fast: ChatServer) -> None:
    with fast.client() as client:
        thread_id = ask(client, "Hi, my name is Ada")[0]["thread_id"]
        for question in ("search for Redis Streams", "what is 12*7", "search for PostgreSQL"):
            ask(client, question, thread_id=thread_id)
        _, events = ask(client, "What is my name?", thread_id=thread_id)
        thread = history(client, thread_id)

    roles = [m["role"] for m in thread["messages"]]
    assert roles[0] == "summary"
    assert "Ada" in thread["messages"][0]["text"]
    assert roles.count("user") < 5  # older turns were folded into the summary
    # Only the agent's tokens are streamed, not the summarizer's.
    assert answer_text(events) == final_answer(thread)
    assert final_answer(thread).startswith("Your name is Ada")


def test_no_answer_to_read_is_204(fast: ChatServer) -> None:
    with fast.client() as client:
        thread_id = ask(client, "hello")[0]["thread_id"]
        assert client.put(f"/threads/{thread_id}/clear").status_code == 200
        current, _ = read_sse(client, f"/v1/chat/stream?thread_id={thread_id}")
        unknown_run, _ = read_sse(client, f"/v1/chat/stream?thread_id={thread_id}&run=99")

    assert current == 204
    assert unknown_run == 204


def test_response_cache_replays_the_same_first_question(fast: ChatServer) -> None:
    question = f"Tell me about cache warming {uuid.uuid4().hex[:6]}"
    with fast.client() as client:
        before = client.get("/info").json()["stats"]
        first, first_events = ask(client, question, use_cache=True)
        first_thread = history(client, first["thread_id"])
        # Normalized: case, spacing and trailing punctuation do not matter.
        second, second_events = ask(client, "  " + question.upper() + " ?", use_cache=True)
        _, uncached_events = ask(client, question)
        replayed_thread = history(client, second["thread_id"])
        after = client.get("/info").json()["stats"]
        # Regression: a replayed turn left no checkpoint to rewind to, and a regenerate of
        # it streamed nothing and changed nothing.
        regenerated = client.post("/v1/chat/regenerate", json={"thread_id": second["thread_id"]})
        _, again = read_sse(client, regenerated.json()["stream_url"])
        regenerated_thread = eventually(lambda: settled(client, second["thread_id"]))

    assert first_events[0].data["cached"] is False
    assert second_events[0].data["cached"] is True
    assert uncached_events[0].data["cached"] is False
    assert answer_text(second_events) == answer_text(first_events)
    assert after.get("cache_hits", 0) - before.get("cache_hits", 0) == 1
    assert after["model_runs"] - before.get("model_runs", 0) == 2  # first and uncached
    # The replayed answer is part of the new thread, like a generated one.
    roles = [m["role"] for m in replayed_thread["messages"]]
    assert roles == [m["role"] for m in first_thread["messages"]]
    assert roles[0] == "user"
    assert final_answer(replayed_thread) == answer_text(first_events)
    # The offline model answers the same question the same way (this one in capitals).
    assert answer_text(again).lower() == answer_text(first_events).lower()
    assert [m["role"] for m in regenerated_thread["messages"]] == roles


def test_a_stopped_replay_keeps_its_question_and_what_was_said(paced: ChatServer) -> None:
    # Regression: a cached answer replayed and stopped saved nothing, neither the question
    # nor the text the user saw (the replay adds its messages to the thread at its end).
    question = f"Tell me about cache warming {uuid.uuid4().hex[:6]}"
    with paced.client() as client:
        ask(client, question, use_cache=True)
        started = post_message(client, question, use_cache=True)
        url, thread_id = started["stream_url"], started["thread_id"]
        _, first = read_sse(client, url, stop_after=chunks_at_least(3))
        client.post("/v1/chat/stop", params={"thread_id": thread_id})
        _, rest = read_sse(client, url, last_event_id=first[-1].id)
        saved = eventually(lambda: settled(client, thread_id), what="the save")
        # And its turn can be answered again, replacing it.
        regenerated = client.post("/v1/chat/regenerate", json={"thread_id": thread_id})
        _, again = read_sse(client, regenerated.json()["stream_url"])
        answered = eventually(lambda: settled(client, thread_id), what="the answer")

    said = answer_text(first) + answer_text(rest)
    assert terminal(again) == {"type": "end"} and len(answer_text(again)) > len(said)
    assert [m["role"] for m in answered["messages"]][:1] == ["user"]
    assert sum(m["role"] == "user" for m in answered["messages"]) == 1
    assert not answered["messages"][-1].get("stopped")
    assert first[0].data["cached"] is True
    assert terminal(rest) == {"type": "end", "reason": "stopped"}
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][0]["text"] == question
    assert saved["messages"][1] == {**saved["messages"][1], "text": said, "stopped": True}


# --------------------------------------------------------------------------- threads


def test_an_unchanged_thread_list_is_not_modified(paced: ChatServer) -> None:
    # The browser UI looks at the list every few seconds: an unchanged one costs no body.
    with paced.client() as client:
        thread_id = ask(client, "what is 12*7")[0]["thread_id"]
        eventually(lambda: idle(client, thread_id), what="idle")
        first = client.get("/v1/threads")
        tag = first.headers["etag"]
        again = client.get("/v1/threads", headers={"if-none-match": tag})
        other_tags = client.get("/v1/threads", headers={"if-none-match": 'W/"x", ' + tag})
        post_message(client, "How should I structure a small side project?", thread_id=thread_id)
        answering = client.get("/v1/threads", headers={"if-none-match": tag})
        client.post("/v1/chat/stop", params={"thread_id": thread_id})
        eventually(lambda: idle(client, thread_id), what="stopped")
        ended = client.get("/v1/threads", headers={"if-none-match": answering.headers["etag"]})

    assert first.status_code == 200 and first.headers["cache-control"] == "private, no-cache"
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", tag)
    assert other_tags.status_code == 304
    assert answering.status_code == 200 and answering.headers["etag"] != tag
    listed = {t["thread_id"]: t for t in answering.json()["threads"]}
    assert listed[thread_id]["streaming"] is True
    assert ended.status_code == 200
    assert {t["thread_id"]: t for t in ended.json()["threads"]}[thread_id]["streaming"] is False


def test_threads_are_listed_newest_first_and_renamed(fast: ChatServer) -> None:
    with fast.client() as client:
        older = ask(client, "first thread")[0]["thread_id"]
        newer = ask(client, "second thread")[0]["thread_id"]
        order_before = [t["thread_id"] for t in client.get("/v1/threads").json()["threads"]]
        ask(client, "back to the first", thread_id=older)
        order_after = [t["thread_id"] for t in client.get("/v1/threads").json()["threads"]]
        renamed = client.patch(
            "/v1/thread", params={"thread_id": older}, json={"chat_name": "  My   thread "}
        )
        blank = client.patch(
            "/v1/thread", params={"thread_id": older}, json={"chat_name": " \t\n "}
        )
        titles = {t["thread_id"]: t["title"] for t in client.get("/v1/threads").json()["threads"]}

    assert order_before == [newer, older]
    assert order_after == [older, newer]
    assert renamed.json() == {"thread_id": older, "title": "My thread"}
    assert (blank.status_code, blank.json()["code"]) == (422, "invalid_request")
    assert titles[older] == "My thread"  # not blanked


def test_each_user_sees_only_their_own_threads(fast: ChatServer) -> None:
    with fast.client() as alice, fast.client() as bob:
        thread_id = ask(alice, "hello")[0]["thread_id"]
        attempts = {
            "history": bob.get("/v1/thread", params={"thread_id": thread_id}),
            "stream": bob.get("/v1/chat/stream", params={"thread_id": thread_id}),
            "stop": bob.post("/v1/chat/stop", params={"thread_id": thread_id}),
            "rename": bob.patch(
                "/v1/thread", params={"thread_id": thread_id}, json={"chat_name": "mine"}
            ),
            "message": bob.post("/v1/chat/message", json={"message": "hi", "thread_id": thread_id}),
            "compat history": bob.get(f"/threads/{thread_id}/history"),
            "clear": bob.put(f"/threads/{thread_id}/clear"),
            "archive": bob.put(f"/threads/{thread_id}/archive"),
            "delete": bob.delete("/v1/thread", params={"thread_id": thread_id}),
            "compat delete": bob.delete(f"/threads/{thread_id}"),
        }
        bobs_threads = bob.get("/v1/threads").json()["threads"]
        alices_thread = history(alice, thread_id)

    assert {name: r.status_code for name, r in attempts.items()} == dict.fromkeys(attempts, 404)
    assert attempts["history"].json()["code"] == "thread_not_found"
    assert bobs_threads == []
    assert [m["role"] for m in alices_thread["messages"]] == ["user", "assistant"]


def test_bearer_tokens_are_identities(fast: ChatServer) -> None:
    token_a, token_b = "a" * 24, "b" * 24
    with (
        fast.client(headers={"authorization": f"Bearer {token_a}"}) as a,
        fast.client(headers={"authorization": f"Bearer {token_b}"}) as b,
        fast.client(headers={"authorization": "Bearer short"}) as bad,
    ):
        thread_id = ask(a, "hello")[0]["thread_id"]
        with fast.client(headers={"authorization": f"Bearer {token_a}"}) as a_again:
            listed_again = [t["thread_id"] for t in a_again.get("/v1/threads").json()["threads"]]
        listed_b = b.get("/v1/threads").json()["threads"]
        rejected = bad.get("/v1/threads")

    assert thread_id in listed_again
    assert "set-cookie" not in rejected.headers
    assert listed_b == []
    assert rejected.status_code == 401
    assert rejected.json()["code"] == "invalid_token"


def test_compat_endpoints(fast: ChatServer) -> None:
    with fast.client() as client:
        with client.stream(
            "POST", "/chat/stream", json={"message": "search for PostgreSQL"}
        ) as response:
            assert response.headers["content-type"] == "application/x-ndjson"
            lines = [orjson.loads(line) for line in response.iter_lines() if line]
        thread_id = lines[0]["data"]["thread_id"]
        compat_history = client.get(f"/threads/{thread_id}/history").json()

        cleared = client.put(f"/threads/{thread_id}/clear")
        after_clear = client.get(f"/threads/{thread_id}/history").json()
        listed_after_clear = [t["thread_id"] for t in client.get("/v1/threads").json()["threads"]]

        ask(client, "hello again", thread_id=thread_id)
        archived = client.put(f"/threads/{thread_id}/archive")
        listed = [t["thread_id"] for t in client.get("/v1/threads").json()["threads"]]
        archived_list = client.get("/v1/threads", params={"archived": "true"}).json()["threads"]
        write_archived = client.post(
            "/v1/chat/message", json={"message": "more", "thread_id": thread_id}
        )
        read_archived = client.get(f"/threads/{thread_id}/history")

        deleted = client.delete(f"/threads/{thread_id}")
        after_delete = client.get(f"/threads/{thread_id}/history")

    types = [line["type"] for line in lines]
    assert types[0] == "metadata"
    assert lines[1]["data"]["status"] == "started"
    assert "tool_event" in types
    assert lines[types.index("tool_event")]["data"]["name"] == "web_search"
    assert lines[-1] == {
        "offset": lines[-1]["offset"],
        "type": "metadata",
        "data": {"status": "completed"},
    }
    tokens = "".join(line["data"]["content"] for line in lines if line["type"] == "token")
    assert tokens == final_answer(compat_history)

    assert cleared.json() == {"thread_id": thread_id, "cleared": True}
    assert after_clear["messages"] == []  # really emptied
    assert thread_id in listed_after_clear  # the thread itself stays

    assert archived.json() == {"thread_id": thread_id, "archived": True}
    assert thread_id not in listed
    assert [t["thread_id"] for t in archived_list] == [thread_id]
    assert write_archived.status_code == 409
    assert write_archived.json()["code"] == "thread_archived"
    assert read_archived.status_code == 200

    assert deleted.json() == {"thread_id": thread_id, "deleted": True}
    assert after_delete.status_code == 404


# --------------------------------------------------------------------------- limits


def test_messages_are_validated_with_clear_errors(fast: ChatServer) -> None:
    with fast.client() as client:
        too_long = client.post("/v1/chat/message", json={"message": "x" * 8001})
        too_large = client.post("/v1/chat/message", json={"message": "x" * 100_000})
        empty = client.post("/v1/chat/message", json={"message": "   "})
        unknown = client.post("/v1/chat/message", json={"message": "hi", "model": "nope:x"})
        unavailable = client.post(
            "/v1/chat/message", json={"message": "hi", "model": "anthropic:claude-3-5-haiku-latest"}
        )
        malformed = client.post(
            "/v1/chat/message", content=b"{", headers={"content-type": "application/json"}
        )
        retry_nothing = client.post("/v1/chat/message", json={"retry": True})

    assert (too_long.status_code, too_long.json()["code"]) == (422, "message_too_long")
    assert "limit is 8000" in too_long.json()["message"]
    assert (too_large.status_code, too_large.json()["code"]) == (413, "payload_too_large")
    assert (empty.status_code, empty.json()["code"]) == (422, "empty_message")
    assert (unknown.status_code, unknown.json()["code"]) == (422, "unknown_model")
    assert (unavailable.status_code, unavailable.json()["code"]) == (422, "model_unavailable")
    assert (malformed.status_code, malformed.json()["code"]) == (422, "invalid_request")
    assert (retry_nothing.status_code, retry_nothing.json()["code"]) == (422, "nothing_to_retry")


def test_cors_allows_the_configured_origin_only(fast: ChatServer) -> None:
    preflight = {"access-control-request-method": "POST"}
    with fast.client() as client:
        allowed = client.options(
            "/v1/chat/message", headers={"origin": ALLOWED_ORIGIN, **preflight}
        )
        other = client.options(
            "/v1/chat/message", headers={"origin": "http://evil.example", **preflight}
        )
        simple = client.get("/v1/threads", headers={"origin": "http://evil.example"})

    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in simple.headers


def test_info_and_health(fast: ChatServer, chat_backend: dict[str, str]) -> None:
    with fast.client() as client:
        info = client.get("/info").json()
        health = client.get("/health")

    assert info["transport"] == ("redis" if chat_backend else "memory")
    assert info["database"] == ("postgresql" if chat_backend else "sqlite")
    assert info["default_model"] == "offline"
    specs = {m["spec"]: m for m in info["models"]}
    assert specs["offline"]["available"] is True
    assert {"openai:gpt-4o-mini", "anthropic:claude-3-5-haiku-latest", "ollama:llama3.1"} <= set(
        specs
    )
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "checks": {"streams": "ok", "database": "ok"}}


# --------------------------------------------------------------------------- mid-answer


def test_stop_ends_the_answer_and_keeps_what_was_said(paced: ChatServer) -> None:
    with paced.client() as client:
        started = post_message(client, "How should I structure a small side project?")
        url, thread_id = started["stream_url"], started["thread_id"]
        _, first = read_sse(client, url, stop_after=chunks_at_least(3))
        stopped = client.post("/v1/chat/stop", params={"thread_id": thread_id}).json()
        _, rest = read_sse(client, url, last_event_id=first[-1].id)
        said = answer_text(first) + answer_text(rest)
        saved = eventually(lambda: settled(client, thread_id), what="the save")
        again = client.post("/v1/chat/stop", params={"thread_id": thread_id}).json()

    assert stopped == {"thread_id": thread_id, "stopped": True}
    assert terminal(rest) == {"type": "end", "reason": "stopped"}
    assert 0 < len(said) < 300  # the whole answer takes ~100 tokens
    assert saved["messages"][-1] == {**saved["messages"][-1], "text": said, "stopped": True}
    assert again["stopped"] is False


def test_a_stop_naming_an_answer_that_ended_leaves_the_next_one(paced: ChatServer) -> None:
    # Regression: a stop names only the thread. Clicked in one window as its answer ended,
    # it stopped the answer another window (the same user) had started just after.
    with paced.client() as client:
        first, _ = ask(client, "Hi, my name is Ada")
        thread_id = first["thread_id"]
        second = post_message(client, GENERAL, thread_id=thread_id)
        _, head = read_sse(client, second["stream_url"], stop_after=chunks_at_least(1))
        late = client.post("/v1/chat/stop", params={"thread_id": thread_id, "run": first["run"]})
        _, rest = read_sse(client, second["stream_url"], last_event_id=head[-1].id)
        meant = client.post("/v1/chat/stop", params={"thread_id": thread_id, "run": 99})
        bad = client.post("/v1/chat/stop", params={"thread_id": thread_id, "run": 0})

    assert late.status_code == 200
    assert late.json() == {"thread_id": thread_id, "run": first["run"], "stopped": False}
    assert terminal(rest) == {"type": "end"}
    assert meant.json() == {"thread_id": thread_id, "run": 99, "stopped": False}
    assert (bad.status_code, bad.json()["code"]) == (422, "invalid_request")


def test_reject_policy_answers_409_while_busy(paced: ChatServer) -> None:
    with paced.client() as client:
        started = post_message(client, "How should I structure a small side project?")
        thread_id = started["thread_id"]
        busy = client.post("/v1/chat/message", json={"message": "and?", "thread_id": thread_id})
        _, events = read_sse(client, started["stream_url"])  # to its end
        after = client.post("/v1/chat/message", json={"message": "hello", "thread_id": thread_id})

    assert busy.status_code == 409
    assert busy.json()["code"] == "thread_busy"
    assert terminal(events) == {"type": "end"}
    assert after.status_code == 202  # at once after `end`: no window where it is still busy


def test_delete_stops_a_live_answer_and_removes_the_thread(paced: ChatServer) -> None:
    with paced.client() as client:
        started = post_message(client, "How should I structure a small side project?")
        thread_id = started["thread_id"]
        _, first = read_sse(client, started["stream_url"], stop_after=chunks_at_least(2))
        deleted = client.delete("/v1/thread", params={"thread_id": thread_id})
        gone = client.get("/v1/thread", params={"thread_id": thread_id})
        stream = client.get(started["stream_url"], headers={"last-event-id": first[-1].id})
        listed = [t["thread_id"] for t in client.get("/v1/threads").json()["threads"]]
        # The same id, asked for again, is not resurrected by the stopped run's bookkeeping.
        again = eventually(
            lambda: (
                client.get("/v1/thread", params={"thread_id": thread_id}).status_code == 404
                and client.get("/v1/threads").json()["threads"] == []
            ),
            what="thread stays deleted",
        )

    assert deleted.json() == {"thread_id": thread_id, "deleted": True}
    assert gone.status_code == 404
    assert stream.status_code == 404
    assert thread_id not in listed
    assert again


def test_retry_answers_the_last_question_again(paced: ChatServer) -> None:
    with paced.client() as client:
        started = post_message(client, "what is 12*7")
        thread_id = started["thread_id"]
        read_sse(
            client,
            started["stream_url"],
            stop_after=lambda events: any(e.event == "tool_call" for e in events),
        )
        client.post("/v1/chat/stop", params={"thread_id": thread_id})
        eventually(lambda: idle(client, thread_id), what="stopped")
        retried = client.post("/v1/chat/message", json={"thread_id": thread_id, "retry": True})
        assert retried.status_code == 202, retried.text
        _, events = read_sse(client, retried.json()["stream_url"])
        thread = history(client, thread_id)

    assert terminal(events) == {"type": "end"}
    assert "84" in answer_text(events)
    # The stopped turn was replaced by the new answer, not appended to.
    assert [m["role"] for m in thread["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert final_answer(thread) == answer_text(events)


# --------------------------------------------------------------------------- regenerate / edit


def test_regenerate_replaces_the_last_answer(fast: ChatServer) -> None:
    with fast.client() as client:
        first, _ = ask(client, "Hi, my name is Ada")
        thread_id = first["thread_id"]
        ask(client, "what is 12*7", thread_id=thread_id)
        before = history(client, thread_id)
        response = client.post("/v1/chat/regenerate", json={"thread_id": thread_id})
        assert response.status_code == 202, response.text
        again = response.json()
        _, events = read_sse(client, again["stream_url"])
        after = history(client, thread_id)
        nothing = client.post("/v1/chat/regenerate", json={"thread_id": uuid.uuid4().hex})

    assert set(again) == {"thread_id", "run", "stream_url", "model", "status"}
    assert again["run"] == first["run"] + 2
    assert terminal(events) == {"type": "end"}
    assert "84" in answer_text(events)
    # The same conversation, the last answer replaced rather than appended to.
    assert [m["role"] for m in after["messages"]] == [m["role"] for m in before["messages"]]
    assert [m["id"] for m in after["messages"]][:3] == [m["id"] for m in before["messages"]][:3]
    assert after["messages"][-1]["id"] != before["messages"][-1]["id"]
    assert final_answer(after) == answer_text(events)
    assert nothing.status_code == 404


def test_edit_last_replaces_the_last_message_and_its_answer(fast: ChatServer) -> None:
    with fast.client() as client:
        first, _ = ask(client, "Hi, my name is Ada")
        thread_id = first["thread_id"]
        ask(client, "what is 12*7", thread_id=thread_id)
        edited, events = ask(client, "What is my name?", thread_id=thread_id, edit_last=True)
        thread = history(client, thread_id)
        fresh = client.post("/v1/chat/message", json={"message": "x", "edit_last": True})
        empty = client.post("/v1/chat/message", json={"message": "hi"}).json()["thread_id"]

    assert edited["run"] == first["run"] + 2
    assert "Ada" in answer_text(events)
    assert [m["text"] for m in thread["messages"] if m["role"] == "user"] == [
        "Hi, my name is Ada",
        "What is my name?",
    ]
    assert [m["role"] for m in thread["messages"]] == ["user", "assistant"] * 2
    assert final_answer(thread) == answer_text(events)
    assert (fresh.status_code, fresh.json()["code"]) == (422, "nothing_to_retry")
    assert empty


def test_threads_list_which_ones_are_streaming(paced: ChatServer) -> None:
    with paced.client() as client:
        idle_thread, _ = ask(client, "hello")
        started = post_message(client, "How should I structure a small side project?")
        during = client.get("/v1/threads").json()["threads"]
        client.post("/v1/chat/stop", params={"thread_id": started["thread_id"]})
        eventually(lambda: idle(client, started["thread_id"]), what="stopped")
        after = client.get("/v1/threads").json()["threads"]

    def streaming(threads: list[dict[str, object]]) -> dict[object, object]:
        return {t["thread_id"]: t["streaming"] for t in threads}

    assert streaming(during) == {started["thread_id"]: True, idle_thread["thread_id"]: False}
    assert streaming(after) == {started["thread_id"]: False, idle_thread["thread_id"]: False}


def test_ai_sdk_regenerate_on_a_thread_without_a_question_is_409(fast: ChatServer) -> None:
    # The AI SDK endpoint let NothingToRetry through as a 500.
    with fast.client() as client:
        thread_id = post_message(client, "hello")["thread_id"]
        eventually(lambda: idle(client, thread_id), what="answered")
        client.put(f"/threads/{thread_id}/clear")
        response = client.post(
            "/api/chat", json={"id": thread_id, "messages": [], "trigger": "regenerate-message"}
        )
        # Regression: the refused request kept the thread's lock (embedded mode, policy
        # reject), and the thread's next message waited for it for ever.
        after = client.post("/v1/chat/message", json={"message": "again", "thread_id": thread_id})
    assert (response.status_code, response.json()["code"]) == (409, "nothing_to_retry")
    assert after.status_code == 202, after.text


# --------------------------------------------------------------------------- AI SDK endpoint


def ui_chunks(
    client: httpx.Client, method: str, url: str, **kwargs: Any
) -> tuple[int, list[dict[str, Any]]]:
    """(status, chunks) of a UI message stream (`data: <chunk>` lines, `[DONE]` left out)."""
    chunks: list[dict[str, Any]] = []
    with client.stream(method, url, **kwargs) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(orjson.loads(line.removeprefix("data: ")))
    return response.status_code, chunks


def ui_user_message(text: str) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex[:16], "role": "user", "parts": [{"type": "text", "text": text}]}


def tool_chunks(chunks: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The tool chunks in order: (type, the input, output or error they carry)."""
    return [
        (c["type"], c.get("input", c.get("output", c.get("errorText"))))
        for c in chunks
        if c["type"].startswith("tool-")
    ]


def test_ai_sdk_streams_each_tool_result_after_its_call(fast: ChatServer) -> None:
    # Issue 10: the chat service stored no tool results, so /api/chat showed the calculator's
    # call (tool-input-*) but never its output.
    with fast.client() as client:
        answers = []
        for _ in range(2):  # the second question is the cache's replay of the first
            thread_id = client.post("/langgraph/threads", json={}).json()["thread_id"]
            body = {"id": thread_id, "messages": [ui_user_message("what is 12*7")]}
            status, chunks = ui_chunks(client, "POST", "/api/chat", json=body)
            assert status == 200
            answers.append(chunks)
        stored = history(client, thread_id)
        after_end = client.get(f"/api/chat/{thread_id}/stream")

    for chunks in answers:
        assert tool_chunks(chunks) == [
            ("tool-input-start", None),
            ("tool-input-available", {"expression": "12*7"}),
            ("tool-output-available", "12*7 = 84"),
        ]
        calls = {c["toolCallId"] for c in chunks if c["type"].startswith("tool-")}
        assert len(calls) == 1
        text = "".join(c["delta"] for c in chunks if c["type"] == "text-delta")
        assert text == final_answer(stored)
        assert chunks[-1] == {"type": "finish", "finishReason": "stop"}
    assert after_end.status_code == 204


@pytest.mark.parametrize(
    "bad_id",
    ["short1234", "x" * 65, "abcdefgh.ijklmnop", "abcdefgh ijklmnop", "abcdefghijklmnöp"],
)
def test_ai_sdk_refuses_invalid_chat_ids(fast: ChatServer, bad_id: str) -> None:
    with fast.client() as client:
        body = {"id": bad_id, "messages": [ui_user_message("hello")]}
        response = client.post("/api/chat", json=body)
        threads = client.get("/v1/threads").json()["threads"]
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_thread_id"
    assert "16 to 64 characters" in response.json()["message"]
    assert threads == []


def test_ai_sdk_chat_ids_start_threads_of_their_own(fast: ChatServer) -> None:
    # Issue 10: useChat without `id` sends its own 16-character chat id; the first message
    # starts the thread under that id, the next ones continue it, and it stays its owner's.
    chat_id = "AbCdEfGh12345678"
    with fast.client() as owner, fast.client() as stranger:
        before = owner.get(f"/api/chat/{chat_id}/stream")  # useChat(resume) on mount
        answers = []
        for question in ("hello there", "what is 2+3"):
            body = {"id": chat_id, "messages": [ui_user_message(question)]}
            status, chunks = ui_chunks(owner, "POST", "/api/chat", json=body)
            assert status == 200
            answers.append("".join(c["delta"] for c in chunks if c["type"] == "text-delta"))
        thread = history(owner, chat_id)
        listed = owner.get("/v1/threads").json()["threads"]
        peek = stranger.get(f"/api/chat/{chat_id}/stream")
        taken = stranger.post("/api/chat", json={"id": chat_id, "messages": [ui_user_message("x")]})
        regenerate = stranger.post(
            "/api/chat",
            json={"id": "ZyXwVuTs98765432", "messages": [], "trigger": "regenerate-message"},
        )
        unseen = stranger.get("/v1/threads").json()["threads"]

    assert before.status_code == 204
    # Another user's chat answers as one nobody has started: its existence is not told.
    assert peek.status_code == 204
    assert [t["thread_id"] for t in listed] == [chat_id]
    assert listed[0]["title"] == "hello there"
    messages = thread["messages"]
    assert [(m["role"], m["text"]) for m in messages if m["role"] != "tool" and m["text"]] == [
        ("user", "hello there"),
        ("assistant", answers[0]),
        ("user", "what is 2+3"),
        ("assistant", answers[1]),
    ]
    assert (taken.status_code, taken.json()["code"]) == (404, "thread_not_found")
    assert (regenerate.status_code, regenerate.json()["code"]) == (404, "thread_not_found")
    assert unseen == []


def test_ai_sdk_messages_are_validated_like_the_chat_apis(fast: ChatServer) -> None:
    # /api/chat skipped the checks of POST /v1/chat/message: a lone surrogate was a 500 (a
    # NUL too, on PostgreSQL), and a message over MAX_MESSAGE_CHARS had no clear error.
    with fast.client() as client:
        responses = [
            # json.dumps escapes a lone surrogate ("\\ud800"), as a browser's JSON may.
            client.post(
                "/api/chat",
                content=json.dumps(
                    {"id": uuid.uuid4().hex[:16], "messages": [ui_user_message(text)]}
                ),
                headers={"content-type": "application/json"},
            )
            for text in ("nul \x00 here", "lone \ud800 surrogate", "x" * 8001)
        ]
        # Regression: a number or a boolean for the messages was a plain-text 500.
        responses += [
            client.post("/api/chat", json={"id": uuid.uuid4().hex[:16], "messages": value})
            for value in (5, True, "hi")
        ]
        threads = client.get("/v1/threads").json()["threads"]
    assert [(r.status_code, r.json()["code"]) for r in responses] == [
        (422, "invalid_text"),
        (422, "invalid_text"),
        (422, "message_too_long"),
        *[(400, "invalid_request")] * 3,
    ]
    assert threads == []  # no thread was started for a message that was refused


def test_langgraph_copy_is_a_chat_of_the_caller(fast: ChatServer) -> None:
    # threads.copy through /langgraph: the copy is one of the caller's chats (listed, with
    # the thread's title and messages, answering on its own); another user's chat is not
    # found and copies nothing.
    with fast.client() as owner, fast.client() as stranger:
        started, _ = ask(owner, "hello there")
        thread_id = started["thread_id"]
        assert (
            owner.patch(
                "/v1/thread", params={"thread_id": thread_id}, json={"chat_name": "Sums"}
            ).status_code
            == 200
        )
        refused = stranger.post(f"/langgraph/threads/{thread_id}/copy")
        copied = owner.post(f"/langgraph/threads/{thread_id}/copy")
        assert copied.status_code == 200, copied.text
        copy_id = copied.json()["thread_id"]
        listed = {t["thread_id"]: t["title"] for t in owner.get("/v1/threads").json()["threads"]}
        original, copy = history(owner, thread_id), history(owner, copy_id)
        counts = [c.post("/langgraph/threads/count", json={}).json() for c in (owner, stranger)]
        ask(owner, "and goodbye", thread_id=copy_id)
        after, copy_after = history(owner, thread_id), history(owner, copy_id)
        unseen = stranger.get("/v1/threads").json()["threads"]
        delete = owner.delete(f"/langgraph/threads/{copy_id}")

    assert (refused.status_code, refused.json()["code"]) == (404, "thread_not_found")
    assert copied.json()["metadata"]["title"] == "Sums"
    assert copy_id != thread_id
    assert listed == {thread_id: "Sums", copy_id: "Sums"}
    assert copy["messages"] == original["messages"]
    assert [m["role"] for m in copy["messages"]] == ["user", "assistant"]
    assert counts == [2, 0]
    assert copy_after["messages"][:2] == original["messages"]
    assert [m["role"] for m in copy_after["messages"][2:]] == ["user", "assistant"]
    assert after["messages"] == original["messages"]
    assert unseen == []
    assert delete.status_code == 405  # the service's record would outlive the thread's state


def test_langgraph_thread_titles_are_checked_as_renames_are(fast: ChatServer) -> None:
    # A title in POST /langgraph/threads' metadata was stored as given: with a NUL, PostgreSQL
    # refused it (500), and any length went in (a rename takes 200 characters at most).
    with fast.client() as client:
        nul = client.post("/langgraph/threads", json={"metadata": {"title": "a\x00b"}})
        long = client.post("/langgraph/threads", json={"metadata": {"title": "x" * 201}})
        spaced = client.post("/langgraph/threads", json={"metadata": {"title": " My  chat "}})
        titles = [t["title"] for t in client.get("/v1/threads").json()["threads"]]
    assert (nul.status_code, nul.json()["code"]) == (422, "invalid_text")
    assert long.status_code == 422
    assert spaced.status_code == 200
    assert spaced.json()["metadata"]["title"] == "My chat"
    assert titles == ["My chat"]


def test_langgraph_threads_update_renames_the_chat(fast: ChatServer) -> None:
    # threads.update through /langgraph was 501: a title is the thread's name, as a rename.
    with fast.client() as owner, fast.client() as stranger:
        thread_id = owner.post("/langgraph/threads", json={}).json()["thread_id"]
        url = f"/langgraph/threads/{thread_id}"
        renamed = owner.patch(url, json={"metadata": {"title": "  Trip   plans "}})
        listed = [t["title"] for t in owner.get("/v1/threads").json()["threads"]]
        echoed = owner.patch(
            url,
            json={"metadata": {"title": "Trips", "graph_id": "agent", "archived": False}},
            headers={"Prefer": "return=minimal"},
        )
        got = owner.get(url).json()["metadata"]
        refused = [
            owner.patch(url, json={"metadata": metadata})
            for metadata in ({"topic": "x"}, {"archived": True}, {"title": " "}, {"title": 3})
        ]
        nul = owner.patch(url, json={"metadata": {"title": "a\x00b"}})
        theirs = stranger.patch(url, json={"metadata": {"title": "mine"}})
        owner.put(f"/threads/{thread_id}/archive")
        archived = owner.patch(url, json={"metadata": {"title": "again"}})
        final = owner.get(url).json()["metadata"]["title"]

    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["thread_id"] == thread_id
    assert renamed.json()["metadata"]["title"] == "Trip plans"
    assert listed == ["Trip plans"]
    assert echoed.status_code == 204
    assert got == {
        "title": "Trips",
        "archived": False,
        "graph_id": "agent",
        "assistant_id": "agent",
    }
    assert [(r.status_code, r.json()["code"]) for r in refused] == [(422, "invalid_request")] * 4
    assert (nul.status_code, nul.json()["code"]) == (422, "invalid_text")
    assert theirs.status_code == 404
    assert archived.status_code == 409
    assert final == "Trips"


def test_langgraph_copy_of_an_archived_chat_is_a_writable_chat(fast: ChatServer) -> None:
    # An archived chat is read-only; its copy is a fresh chat the user can go on with.
    with fast.client() as client:
        started, _ = ask(client, "hello there")
        thread_id = started["thread_id"]
        assert client.put(f"/threads/{thread_id}/archive").status_code == 200
        copied = client.post(f"/langgraph/threads/{thread_id}/copy")
        assert copied.status_code == 200, copied.text
        copy_id = copied.json()["thread_id"]
        listed = [t["thread_id"] for t in client.get("/v1/threads").json()["threads"]]
        archived = client.get("/v1/threads", params={"archived": "true"}).json()["threads"]
        answered, _ = ask(client, "and goodbye", thread_id=copy_id)
        fetched = client.get(f"/langgraph/threads/{copy_id}").json()
    assert copied.json()["metadata"]["archived"] is False
    assert fetched["metadata"]["archived"] is False
    assert listed == [copy_id]
    assert [t["thread_id"] for t in archived] == [thread_id]
    assert answered["thread_id"] == copy_id
