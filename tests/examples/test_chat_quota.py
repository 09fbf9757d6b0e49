"""One user's answers in flight are capped (MAX_ANSWERS_PER_USER), and so are the answer
streams a process serves (MAX_STREAMS): a burst of parallel requests gets exactly the cap."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import connect_sse

from ._chat import ChatServer, eventually, history, post_message, read_sse, terminal
from .test_chat_worker import run_states

CAP = 3
BURST = 24


#: A LangGraph run of the service's agent.
_LANGGRAPH_RUN = {
    "assistant_id": "agent",
    "input": {"messages": [{"role": "user", "content": "x"}]},
}


def _bearer(server: ChatServer, name: str) -> httpx.Client:
    """A user of this test's own (the databases of other tests may be shared)."""
    return server.client(headers={"authorization": f"Bearer {name}-{uuid.uuid4().hex}"})


def _burst(client: httpx.Client, count: int) -> list[httpx.Response]:
    """``count`` messages at once, each on a new thread."""
    with ThreadPoolExecutor(count) as pool:
        return list(
            pool.map(
                lambda n: client.post("/v1/chat/message", json={"message": f"question {n}"}),
                range(count),
            )
        )


def _none_streaming(client: httpx.Client) -> bool:
    threads: list[dict[str, Any]] = client.get("/v1/threads").json()["threads"]
    return not any(thread["streaming"] for thread in threads)


def test_a_burst_of_one_users_messages_gets_exactly_the_cap(
    chat_servers: Callable[..., ChatServer], chat_backend: dict[str, str]
) -> None:
    # Slow answers: the cap's answers stay in flight until they are stopped.
    server = chat_servers(
        MAX_ANSWERS_PER_USER=str(CAP), OFFLINE_TOKENS_PER_SECOND="1", **chat_backend
    )
    with _bearer(server, "a") as alice, _bearer(server, "b") as bob:
        responses = _burst(alice, BURST)
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [202] * CAP + [429] * (BURST - CAP), statuses
        refused = [r for r in responses if r.status_code == 429]
        assert {r.json()["code"] for r in refused} == {"too_many_answers"}
        assert all(int(r.headers["retry-after"]) > 0 for r in refused)
        # Nothing was kept of a refused message: only the accepted ones' threads exist.
        threads = alice.get("/v1/threads").json()["threads"]
        accepted = [r.json() for r in responses if r.status_code == 202]
        assert {t["thread_id"] for t in threads} == {a["thread_id"] for a in accepted}

        # Every way to start an answer is refused at the cap.
        first = accepted[0]["thread_id"]
        assert alice.post("/v1/chat/stop", params={"thread_id": first}).status_code == 200
        eventually(
            lambda: not alice.get("/v1/thread", params={"thread_id": first}).json()["streaming"],
            what="the stopped answer is recorded",
        )
        # One place free: taken again, by a message on a new thread.
        again = alice.post("/v1/chat/message", json={"message": "more"})
        assert again.status_code == 202, again.text
        accepted.append(again.json())
        regenerate = alice.post("/v1/chat/regenerate", json={"thread_id": first})
        ai_sdk = alice.post(
            "/api/chat",
            json={
                "id": uuid.uuid4().hex,
                "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}],
            },
        )
        lg_thread = alice.post("/langgraph/threads", json={}).json()["thread_id"]
        langgraph = alice.post(
            f"/langgraph/threads/{lg_thread}/runs",
            json=_LANGGRAPH_RUN,
        )
        for name, response in {
            "regenerate": regenerate,
            "ai sdk": ai_sdk,
            "langgraph": langgraph,
        }.items():
            assert response.status_code == 429, (name, response.text)
            assert response.json()["code"] == "too_many_answers", name
            assert "retry-after" in response.headers, name

        # Another user is not affected.
        other = bob.post("/v1/chat/message", json={"message": "hello"})
        assert other.status_code == 202, other.text

        # Once the answers end, the user can send again.
        for started in accepted:
            alice.post("/v1/chat/stop", params={"thread_id": started["thread_id"]})
        eventually(lambda: _none_streaming(alice), what="every answer of alice recorded as ended")
        after = alice.post("/v1/chat/message", json={"message": "again", "thread_id": first})
        assert after.status_code == 202, after.text


def test_a_langgraph_run_takes_one_of_the_users_answers(
    chat_servers: Callable[..., ChatServer],
) -> None:
    server = chat_servers(MAX_ANSWERS_PER_USER="1", OFFLINE_TOKENS_PER_SECOND="1")
    with _bearer(server, "c") as carol:
        thread_id = carol.post("/langgraph/threads", json={}).json()["thread_id"]
        # Streamed as messages, the model's answer is paced (1 token a second): the run
        # lasts until it is cancelled below. (Without a messages mode the offline model
        # answers at once, and the run could end before the message is sent.)
        run = carol.post(
            f"/langgraph/threads/{thread_id}/runs",
            json={**_LANGGRAPH_RUN, "stream_mode": ["messages-tuple"]},
        )
        assert run.status_code == 200, run.text
        refused = carol.post("/v1/chat/message", json={"message": "hello"})
        assert refused.status_code == 429, refused.text
        assert refused.json()["code"] == "too_many_answers"
        run_id = run.json()["run_id"]
        status = carol.get(f"/langgraph/threads/{thread_id}/runs/{run_id}").json()["status"]
        assert status == "running"  # (the refusal was the cap's, not a late start's)
        # The run ends (cancelled): its place is free again.
        cancel = carol.post(f"/langgraph/threads/{thread_id}/runs/{run_id}/cancel")
        assert cancel.status_code in (200, 202, 204), cancel.text
        eventually(
            lambda: carol.post("/v1/chat/message", json={"message": "hello"}).status_code == 202,
            what="a message is accepted once the LangGraph run ended",
        )


@pytest.mark.redis
@pytest.mark.postgres
def test_answers_a_dead_process_left_do_not_hold_their_user_at_the_cap(
    chat_servers: Callable[..., ChatServer], redis_url: str, postgres_dsn: str
) -> None:
    # Regression: an answer whose process died (kill -9, a node lost) stayed `started`
    # until a reader of it, a submit on its thread or that process's restart settled it.
    # Meanwhile the other processes counted it: the user got 429 on every other thread.
    prefix = f"chat{uuid.uuid4().hex[:8]}"
    env = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": postgres_dsn,
        "REDIS_PREFIX": prefix,
        "MAX_ANSWERS_PER_USER": "1",
        "STREAM_LEASE": "1",
        "OFFLINE_TOKENS_PER_SECOND": "20",
    }
    a, b = chat_servers(**env), chat_servers(**env)
    headers = {"authorization": f"Bearer erin-{uuid.uuid4().hex}"}
    with a.client(headers=headers) as on_a, b.client(headers=headers) as on_b:
        started = post_message(on_a, "How should I structure a small side project?")
        thread_id = started["thread_id"]
        read_sse(on_a, started["stream_url"], stop_after=lambda events: len(events) >= 3)
        # Nothing of the user's runs any more once the leases of the answer and of its
        # thread's lock lapsed (looked at without reading the answer: no reader settles it).
        leases = [
            f"{prefix}:{{{stream_id}}}:lease"
            for stream_id in (f"thread-{thread_id}-{started['run']}", f"thread-{thread_id}-lock")
        ]
        with redis.Redis.from_url(redis_url) as admin:
            assert admin.exists(*leases) == 2
            a.kill()
            eventually(lambda: admin.exists(*leases) == 0, what="the dead process's leases lapse")
        assert run_states(postgres_dsn, thread_id) == [("started", None)]  # in flight

        other = on_b.post("/v1/chat/message", json={"message": "what is 12*7"})
        assert other.status_code == 202, other.text
        # The cut answer is recorded as its readers are told.
        cut = history(on_b, thread_id)
        assert cut["active_run"] is None
        assert cut["last_error"] == {"run": started["run"], "code": "producer_lost"}
        status, answer = read_sse(on_b, other.json()["stream_url"])
        assert status == 200 and terminal(answer) == {"type": "end"}, answer[-3:]


@pytest.mark.parametrize("route", ["/v1/chat/stream", "/api/chat/{thread_id}/stream"])
def test_streams_past_max_streams_get_503(
    chat_servers: Callable[..., ChatServer], route: str
) -> None:
    server = chat_servers(MAX_STREAMS="1", OFFLINE_TOKENS_PER_SECOND="1")
    with _bearer(server, "d") as dave:
        thread_id = dave.post("/v1/chat/message", json={"message": "hello"}).json()["thread_id"]
        url = route.format(thread_id=thread_id)
        params = {"thread_id": thread_id} if "{" not in route else {}
        with connect_sse(dave, "GET", url, params=params) as open_stream:
            assert open_stream.response.status_code == 200
            events = open_stream.iter_sse()  # kept: the response closes with it
            next(events)  # served, and open
            second = dave.get(url, params=params)
            assert second.status_code == 503, second.text
            assert second.json()["code"] == "too_many_streams"
            assert "retry-after" in second.headers
        # Its place is given back once the stream is closed.
        dave.post("/v1/chat/stop", params={"thread_id": thread_id})
        eventually(
            lambda: terminal(read_sse(dave, f"/v1/chat/stream?thread_id={thread_id}")[1]),
            what="the stream is served again once the first one is closed",
        )


async def test_a_langgraph_run_queued_at_the_cap_is_refused(
    chat_servers: Callable[..., ChatServer],
) -> None:
    # Regression: at the cap, a run asked for with multitask_strategy "enqueue" on a thread
    # that already had a run queued (in that process) was queued, not refused: the cap was
    # only counted once its turn came. The first queued run is counted as it is asked for.
    from langgraph_sdk import get_client
    from langgraph_sdk.errors import APIStatusError

    server = chat_servers(MAX_ANSWERS_PER_USER="2", OFFLINE_TOKENS_PER_SECOND="1")
    headers = {"authorization": f"Bearer d-{uuid.uuid4().hex}"}
    async with get_client(url=f"{server.url}/langgraph", headers=headers) as client:
        first, other = [(await client.threads.create())["thread_id"] for _ in range(2)]
        slow = {**_LANGGRAPH_RUN, "stream_mode": ["messages-tuple"]}  # lasts until cancelled
        running = await client.runs.create(first, **slow)
        queued = await client.runs.create(first, **slow, multitask_strategy="enqueue")
        assert (running["status"], queued["status"]) == ("running", "pending")
        held = await client.runs.create(other, **slow)  # the user's second answer: the cap
        with pytest.raises(APIStatusError) as refused:
            await client.runs.create(first, **slow, multitask_strategy="enqueue")
        assert refused.value.status_code == 429
        assert refused.value.response.json()["code"] == "too_many_answers"
        assert int(refused.value.response.headers["retry-after"]) > 0
        listed = await client.runs.list(first)
        assert {run["run_id"] for run in listed} == {running["run_id"], queued["run_id"]}

        # The run queued before the cap takes the place of the one it waited for.
        await client.runs.cancel(first, running["run_id"], wait=True)
        parts = client.runs.join_stream(first, queued["run_id"], last_event_id="-1")
        start = await anext(aiter(parts))  # (from its first part, once it started)
        assert (start.event, start.data["run_id"]) == ("metadata", queued["run_id"])
        await parts.aclose()
        for thread_id, run in ((first, queued), (other, held)):
            await client.runs.cancel(thread_id, run["run_id"], wait=True)
