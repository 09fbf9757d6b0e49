"""The chat service's small pure parts, in process: settings, cache keys, the mapping of
stream events to the chat API's names, session signing, and CORS."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from chat_service.__main__ import main
from chat_service.app import create_app
from chat_service.auth import session_value, user_from_session, user_from_token
from chat_service.cache import MemoryCache, RedisCache, cache_key
from chat_service.events import FAILED_MESSAGE as FAILED
from chat_service.events import LOST, RUN_STARTED, SHUTDOWN, to_ndjson, to_sse
from chat_service.settings import Settings, SettingsError

from resumable_stream import Event


def test_settings_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://r:6379/0",
            "DATABASE_URL": "postgresql://u@h/db",
            "BUSY_POLICY": "Queue",
            "CORS_ORIGINS": "https://a.example/, https://b.example",
            "WORKER_MODE": "true",
            "SUMMARIZE_AFTER_TOKENS": "0",
        }
    )
    assert settings.busy_policy == "queue"
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.worker_mode is True
    assert settings.uses_postgres
    assert settings.summarize_after_tokens == 0
    assert Settings.from_env({}).transport_url == "memory://"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BUSY_POLICY": "wait"}, "BUSY_POLICY"),
        ({"WORKER_MODE": "1"}, "WORKER_MODE needs REDIS_URL"),
        ({"CACHE_TTL": "soon"}, "CACHE_TTL must be a number"),
        ({"CORS_ORIGINS": "*,https://a.example"}, r"either \* or a list"),
        # Regressions: OverflowError or ValueError, or accepted and failing later (uvicorn
        # on 99999 mod 65536, the producer's lease at start-up, the model on every answer).
        ({"PORT": "inf"}, "PORT must be a whole number"),
        ({"PORT": "nan"}, "PORT must be a whole number"),
        ({"MAX_MESSAGE_CHARS": "1e400"}, "MAX_MESSAGE_CHARS must be a whole number"),
        ({"PORT": "99999"}, "PORT must be between 1 and 65535"),
        ({"STREAM_LEASE": "-1"}, r"STREAM_LEASE must be a finite number >= 0.1"),
        ({"OFFLINE_TOKENS_PER_SECOND": "-1"}, "OFFLINE_TOKENS_PER_SECOND must be a finite"),
        ({"CACHE_TTL": "inf"}, "CACHE_TTL must be a finite number"),
        ({"STREAM_RETENTION": "0"}, "STREAM_RETENTION must be a finite number >= 1"),
        ({"SUMMARIZE_AFTER_TOKENS": "-1"}, "SUMMARIZE_AFTER_TOKENS must be a finite"),
        ({"WORKER_CONCURRENCY": "0"}, "WORKER_CONCURRENCY must be a finite number >= 1"),
        # Regressions: the service started, then every answer ended with UnknownModelError
        # (CHAT_MODEL), or GET /info and every message naming a model were a 500 (CHAT_MODELS).
        ({"CHAT_MODEL": "gpt-4o"}, "CHAT_MODEL: unknown model spec 'gpt-4o'"),
        ({"CHAT_MODELS": "offline, llama3"}, "CHAT_MODELS: unknown model spec 'llama3'"),
        # Regressions: a URL of another scheme failed the start with a traceback.
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL must be a redis://"),
        ({"REDIS_URL": "http://u:secret@h"}, r"not http://$"),
        # Regression: accepted, then every message was a 503 (Celery's broker takes neither).
        (
            {"WORKER_MODE": "1", "REDIS_URL": "redis+sentinel://h:26379/master"},
            "WORKER_MODE needs a redis://, rediss://, unix:// REDIS_URL",
        ),
        (
            {"WORKER_MODE": "1", "REDIS_URL": "redis+cluster://h:7000"},
            "Celery's broker",
        ),
        ({"DATABASE_URL": "mysql://u:secret@h/db"}, r"DATABASE_URL must be .* not mysql://$"),
        ({"DATABASE_URL": "sqlite://relative.db"}, "DATABASE_URL must be"),
    ],
)
def test_bad_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_bad_settings_stop_the_service_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Regression: a SettingsError reached the user as a traceback.
    monkeypatch.setenv("BUSY_POLICY", "wait")
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "error: BUSY_POLICY must be one of reject, interrupt, queue" in capsys.readouterr().err


def test_cache_key_ignores_case_spacing_and_trailing_punctuation() -> None:
    key = cache_key("ada", "offline", "What is Redis?")
    assert cache_key("ada", "offline", "  what   is redis ") == key
    assert cache_key("ada", "offline", "WHAT IS REDIS!?") == key
    assert cache_key("ada", "openai:gpt-4o-mini", "What is Redis?") != key
    assert cache_key("ada", "offline", "What is Postgres?") != key
    assert cache_key("bob", "offline", "What is Redis?") != key  # per user (issue 12)


async def test_memory_cache_expires_and_stays_bounded() -> None:
    cache = MemoryCache(ttl=60, max_entries=2)
    for name in ("a", "b", "c"):
        await cache.put(name, {"value": name})
    assert await cache.get("a") is None  # the oldest made room
    assert await cache.get("c") == {"value": "c"}
    expired = MemoryCache(ttl=-1)
    await expired.put("a", {"value": "a"})
    assert await expired.get("a") is None


async def test_redis_cache_keeps_a_ttl_under_a_millisecond(redis_url: str) -> None:
    # CACHE_TTL=0.0005 passes the settings' check (> 0: a cache), and was sent as px=0,
    # which Redis refuses ("invalid expire time"): every answer's caching failed.
    client = aioredis.Redis.from_url(redis_url)
    try:
        cache = RedisCache(client, f"t{uuid.uuid4().hex[:12]}", ttl=0.0005)
        await cache.put("a", {"value": "a"})  # (raised ResponseError before)
        # 1 ms, what is left of it (0: under a millisecond), or gone by now
        assert await client.pttl(f"{cache.prefix}:cache:a") in (1, 0, -2)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("event", "sse", "ndjson"),
    [
        (
            Event("token", {"text": "Hi", "message_id": None, "node": None}, "1-1-0"),
            Event("chunk", {"text": "Hi"}, "1-1-0"),
            Event("token", {"content": "Hi"}, "1-1-0"),
        ),
        (
            Event("tool_start", {"id": "c1", "name": "calculator", "args": {"x": 1}}, "1-2-0"),
            Event("tool_call", {"id": "c1", "name": "calculator", "args": {"x": 1}}, "1-2-0"),
            Event("tool_event", {"id": "c1", "name": "calculator", "args": {"x": 1}}, "1-2-0"),
        ),
        (
            Event("end", {}, "1-3-0"),
            Event("system", {"type": "end"}, "1-3-0"),
            Event("metadata", {"status": "completed"}, "1-3-0"),
        ),
        (
            Event("cancelled", {"reason": "requested"}, "1-3-0"),
            Event("system", {"type": "end", "reason": "stopped"}, "1-3-0"),
            Event("metadata", {"status": "stopped"}, "1-3-0"),
        ),
        (
            # A model's or a tool's exception: its message stays on the server (the log).
            Event("error", {"error": "ValueError", "message": "key sk-1 bad"}, "1-3-0"),
            Event("system", {"type": "error", "code": "ValueError", "message": FAILED}, "1-3-0"),
            Event("error", {"code": "ValueError", "message": FAILED}, "1-3-0"),
        ),
        (
            # The service's own error, written for the user.
            Event("error", {"error": "UnknownModelError", "message": "unknown x"}, "1-3-0"),
            Event(
                "system",
                {"type": "error", "code": "UnknownModelError", "message": "unknown x"},
                "1-3-0",
            ),
            Event("error", {"code": "UnknownModelError", "message": "unknown x"}, "1-3-0"),
        ),
        (
            Event("update", {"mode": None, "node": None, "data": {}}, "1-4-0"),
            None,
            None,
        ),
        # A model's last chunk says why it stopped and holds no text (reasoning and tool
        # call fragments neither have text): not an empty chunk.
        (
            Event("token", {"text": "", "message_id": "m", "finish_reason": "stop"}, "1-5-0"),
            None,
            None,
        ),
    ],
)
def test_stream_events_get_the_chat_api_names_and_keep_their_offsets(
    event: Event, sse: Event | None, ndjson: Event | None
) -> None:
    assert to_sse(event) == sse
    assert to_ndjson(event) == ndjson


def test_a_run_lost_or_shut_down_reads_as_an_error_to_retry() -> None:
    lost = to_sse(Event("error", {"error": "producer_lost", "message": "x"}, "1-9-0"))
    shutdown = to_sse(Event("cancelled", {"reason": "shutdown"}, "1-9-0"))
    started = to_sse(Event("custom", {"name": RUN_STARTED, "data": {"run": 3}}, "1-1-0"))
    assert lost is not None and lost.data["code"] == "producer_lost"
    assert shutdown is not None and shutdown.data["type"] == "error"
    assert started == Event("system", {"type": "start", "run": 3}, "1-1-0")


def test_sessions_are_signed_and_tokens_hashed() -> None:
    value = session_value(b"secret", "u123")
    assert user_from_session(b"secret", value) == "u123"
    assert user_from_session(b"other secret", value) is None
    assert user_from_session(b"secret", "u999." + value.split(".", 1)[1]) is None
    assert user_from_token("x" * 16) == user_from_token("x" * 16) != user_from_token("y" * 16)
    assert user_from_token("short") is None


async def test_cors_wildcard_never_allows_credentials(tmp_path: Path) -> None:
    app = create_app(Settings(cors_origins=("*",), secret_key="s", data_dir=tmp_path))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.options(
            "/v1/threads",
            headers={"origin": "http://any.example", "access-control-request-method": "GET"},
        )
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_a_run_added_as_its_thread_is_deleted_is_not_left_behind(
    database: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Regression: add_run's UPDATE and INSERT are two statements; a delete between them
    # left a run of a deleted thread, which the service then answered (writing checkpoints
    # of a thread the user had deleted), and the request got 202.
    from chat_service.threads import ThreadStore, thread_store_for

    url = str(request.getfixturevalue("postgres_dsn")) if database == "postgres" else None
    store: ThreadStore = thread_store_for(url, tmp_path / "chat.db")
    await store.setup()
    thread = await store.create_thread("u", "t")
    fetch = store._fetch

    async def deleted_after_the_update(sql: str, params: Any = ()) -> list[Any]:
        rows = await fetch(sql, params)
        if sql.startswith("UPDATE chat_threads SET run_seq"):
            await store.delete_thread(thread.id)
        return rows

    store._fetch = deleted_after_the_update  # type: ignore[method-assign]
    try:
        with pytest.raises(LookupError):
            await store.add_run(thread.id, message="m", model="x", use_cache=False, human_id="h")
        left = await fetch("SELECT seq FROM chat_runs WHERE thread_id = ?", (thread.id,))
    finally:
        await store.aclose()
    assert left == []


async def test_a_run_whose_recording_fails_after_its_insert_is_taken_back(tmp_path: Path) -> None:
    # Regression: an error after the INSERT (the database failing, a shutdown) left the run
    # queued with nobody to answer it: the thread stayed busy (409) until a restart.
    from chat_service.threads import SqliteThreadStore

    store = SqliteThreadStore(tmp_path / "chat.db")
    await store.setup()
    thread = await store.create_thread("u", "t")
    get_thread = store.get_thread

    async def failing(thread_id: str) -> Any:
        raise OSError("disk I/O error")

    store.get_thread = failing  # type: ignore[method-assign]
    try:
        with pytest.raises(OSError, match="disk I/O error"):
            await store.add_run(thread.id, message="m", model="x", use_cache=False, human_id="h")
        store.get_thread = get_thread  # type: ignore[method-assign]
        assert await store.runs(thread.id, "queued") == []
    finally:
        await store.aclose()


async def test_a_run_cancelled_as_it_is_inserted_is_taken_back(tmp_path: Path) -> None:
    # Regression: cancelled in its INSERT (a shutdown), the statement still ran on the
    # database's thread and the run stayed queued, the thread busy.
    from chat_service.threads import SqliteThreadStore

    store = SqliteThreadStore(tmp_path / "chat.db")
    await store.setup()
    thread = await store.create_thread("u", "t")
    fetch = store._fetch
    inserting = asyncio.Event()

    async def noting(sql: str, params: Any = ()) -> list[Any]:
        if sql.startswith("INSERT INTO chat_runs"):
            inserting.set()
        return await fetch(sql, params)

    store._fetch = noting  # type: ignore[method-assign]
    try:
        adding = asyncio.ensure_future(
            store.add_run(thread.id, message="m", model="x", use_cache=False, human_id="h")
        )
        await inserting.wait()
        adding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await adding
        # Statements run one at a time, in order, on the connection's thread.
        assert await store.runs(thread.id, "queued") == []
    finally:
        await store.aclose()


TOKEN = "t" * 16
USER = user_from_token(TOKEN)


@contextlib.asynccontextmanager
async def in_process(
    tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The service on embedded defaults (but ``settings``), started, and a client of one
    user (:data:`USER`): its runtime and the client."""
    app = create_app(
        Settings(secret_key="s", data_dir=tmp_path, offline_tokens_per_second=0, **settings)
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        headers = {"authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=headers
        ) as client:
            yield app.state.runtime, client


async def test_a_copy_that_fails_leaves_no_thread_behind(tmp_path: Path) -> None:
    # Regression: threads.copy records the new thread first, then copies the checkpoints;
    # when the copy failed (the database erring part-way), the request was a 500 and the
    # user's list kept an empty chat under the thread's title.
    async with in_process(tmp_path) as (runtime, client):
        sent = await client.post("/v1/chat/message", json={"message": "hello"})
        thread_id = sent.json()["thread_id"]
        await asyncio.gather(*runtime.runs._tasks)  # the answer, written and recorded
        aput = runtime.checkpointer.aput
        written: list[str] = []

        async def failing(config: Any, *args: Any) -> Any:
            if written:
                raise OSError("disk I/O error")
            written.append(config["configurable"]["thread_id"])
            return await aput(config, *args)

        runtime.checkpointer.aput = failing
        copied = await client.post(f"/langgraph/threads/{thread_id}/copy")
        runtime.checkpointer.aput = aput
        listed = (await client.get("/v1/threads")).json()["threads"]
        config = {"configurable": {"thread_id": written[0]}}
        left = [c async for c in runtime.checkpointer.alist(config)]
    assert copied.status_code == 500
    assert written and written[0] != thread_id  # failed part-way, after one checkpoint
    assert [t["thread_id"] for t in listed] == [thread_id]
    assert left == []


async def test_a_reserved_answer_whose_task_was_not_queued_ends_at_once(tmp_path: Path) -> None:
    # Regression (worker mode): when handing the task to the queue failed after its stream
    # was reserved, the request was a 503 and the run recorded queue_unavailable, but its
    # stream stayed reserved: a reader of it waited WORKER_START_TIMEOUT for not_started.
    from resumable_stream import StreamConsumer

    handed: list[str] = []

    async def broker_down(run: Any, reservation: Any) -> None:
        handed.append(run.stream_id)
        raise ConnectionError("the broker is down")

    async with in_process(tmp_path) as (runtime, client):
        runtime.runs.workers, runtime.runs.enqueue = True, broker_down
        sent = await client.post("/v1/chat/message", json={"message": "hello"})
        [stream_id] = handed
        assert (sent.status_code, sent.json()["code"]) == (503, "queue_unavailable")
        info = await runtime.transport.info(stream_id)
        assert info is not None and info.status == "error"  # ended, not waiting for a worker
        events = [e async for e in StreamConsumer(runtime.transport, stream_id)]
    assert (events[-1].type, events[-1].data["error"]) == ("error", "queue_unavailable")


async def _source_ending(end: str) -> AsyncIterator[Any]:
    """An answer's source: a word, then ``end`` (a model error, or the end as the source
    ends; a shutdown is the writer's producer closing under it)."""
    yield "a word"
    if end == "model error":
        raise RuntimeError("the model failed")
    if end == "shutdown":
        await asyncio.Event().wait()


async def _ended_unrecorded(runtime: Any, end: str) -> Any:
    """A started run of a new thread of :data:`USER` whose writer wrote its end (``end``)
    and died before recording it: its record says started, its thread's lock is free."""
    from resumable_stream import StreamProducer

    thread = await runtime.store.create_thread(USER, "t")
    run = await runtime.store.add_run(
        thread.id, message="hello", model="offline", use_cache=False, human_id="h"
    )
    assert await runtime.store.settle_run(thread.id, run.seq, "started", only_from=("queued",))
    writer = StreamProducer(runtime.transport, lease=runtime.settings.stream_lease)
    started = await writer.start(_source_ending(end), stream_id=run.stream_id)
    if end == "shutdown":
        await writer.aclose()  # writes `cancelled`, reason shutdown, as a SIGTERM does
    else:
        await started.wait()
    return await runtime.store.get_run(thread.id, run.seq)


ENDS = [
    # (the answer's end, its record: what _finish records for it)
    ("end", ("done", None)),
    ("model error", ("done", None)),  # the stream says so, as for a live writer
    ("shutdown", ("failed", "shutdown")),  # readers got an error with Retry
]


@pytest.mark.parametrize(("end", "record"), ENDS)
@pytest.mark.parametrize(
    "noticed_by", ["a reader", "the quota", "the quota, worker mode", "the next message"]
)
async def test_an_end_its_writer_died_before_recording_is_recorded_as_the_writer_would(
    tmp_path: Path, end: str, record: tuple[str, str | None], noticed_by: str
) -> None:
    # Regression: a run whose writer died after writing its end, before recording it, was
    # recorded by whoever noticed it under a rule of their own. A reader (settle_from_reader)
    # recorded only producer_lost and not_started: after a model error, or a shutdown, the
    # run stayed started for good, counted against the user's cap. The quota's reclaim
    # recorded a shutdown `done` (no error, no Retry), and in worker mode (where nothing
    # then drains the thread) kept a model error at the cap (429) for good. Only the next
    # message on the thread (_end_orphan) recorded it as the writer (_finish) would have.
    async def queued(run: Any, reservation: Any) -> None:
        pass  # (worker mode) the task is with the broker: no worker here

    async with in_process(tmp_path, max_answers_per_user=1) as (runtime, client):
        if noticed_by == "the quota, worker mode":
            runtime.runs.workers, runtime.runs.enqueue = True, queued
        run = await _ended_unrecorded(runtime, end)
        if noticed_by == "a reader":
            read = await client.get(f"/v1/chat/stream?thread_id={run.thread_id}&run={run.seq}")
            assert read.status_code == 200
        else:
            sent = await client.post(
                "/v1/chat/message",
                json={"message": "what is 6*7"}
                | ({"thread_id": run.thread_id} if noticed_by == "the next message" else {}),
            )
            assert sent.status_code == 202, sent.json()  # not held at the cap
            await asyncio.gather(*runtime.runs._tasks)
        recorded = await runtime.store.get_run(run.thread_id, run.seq)
        thread = (await client.get(f"/v1/thread?thread_id={run.thread_id}")).json()
    assert (recorded.state, recorded.error) == record
    if noticed_by != "the next message":  # (else the new answer is the thread's latest)
        error = {"run": run.seq, "code": record[1]} if record[1] else None
        assert thread["last_error"] == error


async def test_a_live_reader_recording_an_end_first_leaves_its_writer_the_rest(
    tmp_path: Path,
) -> None:
    # A reader records the end it reads (its writer may have died): a live writer, about to
    # record the same end, still does, and answers the message queued behind it, once (the
    # reader's kick finds the thread's lock held by that writer).
    async with in_process(tmp_path, busy_policy="queue") as (runtime, client):
        set_run_state = runtime.store.set_run_state
        read = asyncio.Event()

        async def after_the_reader(thread_id: str, seq: int, state: Any) -> None:
            if seq == 1:
                await read.wait()
            await set_run_state(thread_id, seq, state)

        runtime.store.set_run_state = after_the_reader
        first = (await client.post("/v1/chat/message", json={"message": "what is 6*7"})).json()
        thread_id = first["thread_id"]
        second = await client.post(
            "/v1/chat/message", json={"message": "what is 12*7", "thread_id": thread_id}
        )
        assert second.status_code == 202
        body = (await client.get(first["stream_url"])).text
        by_the_reader = await runtime.store.get_run(thread_id, 1)
        read.set()
        while runtime.runs._tasks:
            await asyncio.gather(*runtime.runs._tasks)
        runs = [await runtime.store.get_run(thread_id, seq) for seq in (1, 2)]
        thread = (await client.get(f"/v1/thread?thread_id={thread_id}")).json()
    assert "42" in body
    assert by_the_reader.state == "done"  # recorded by the reader, its writer still saving
    assert [(r.state, r.error) for r in runs] == [("done", None), ("done", None)]
    assert runtime.runs.stats["model_runs"] == 2
    assert thread["active_run"] is None and thread["last_error"] is None
    assert "84" in thread["messages"][-1]["text"]


def test_the_page_says_what_each_lost_answer_lost() -> None:
    # Regression: an answer no worker started (not_started) or that could not be handed to
    # the workers (queue_unavailable) showed only "The answer failed (code)" on the page,
    # where every other failure recorded with Retry says what happened.
    app_js = (Path(__file__).parents[2] / "examples/chat/chat_service/static/app.js").read_text()
    table = app_js[
        app_js.index("const ERRORS = {") : app_js.index("};", app_js.index("const ERRORS"))
    ]
    said = set(re.findall(r"^\s+(\w+): \"", table, re.MULTILINE))
    assert set(LOST) | {SHUTDOWN} <= said, sorted(set(LOST) | {SHUTDOWN} - said)
