"""Everything an API process or a worker holds open, opened once at start, closed at exit."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from langgraph.checkpoint.base import BaseCheckpointSaver

from resumable_stream import StreamProducer, Transport, from_url
from resumable_stream.starlette import ConnectionLimit

from .agent import Agent, build_agent
from .cache import AnswerCache, MemoryCache, RedisCache
from .checkpoint import open_checkpointer
from .models import UnknownModelError, available_models, make_chat_model
from .quota import LangGraphProducer
from .runs import RunService
from .settings import Settings
from .threads import SqliteThreadStore, ThreadStore, thread_store_for


@dataclass
class Runtime:
    settings: Settings
    transport: Transport
    producer: StreamProducer
    store: ThreadStore
    checkpointer: BaseCheckpointSaver[Any]
    agent: Agent
    cache: AnswerCache | None
    runs: RunService
    redis: Any | None  # the transport's redis-py client (Redis or RedisCluster), for the cache
    #: The producer of LangGraph runs: each takes one of its user's answers (quota.py).
    langgraph_producer: StreamProducer
    #: The cap on the answer streams this process serves at once (MAX_STREAMS).
    streams: ConnectionLimit


@contextlib.asynccontextmanager
async def open_runtime(
    settings: Settings, *, role: Literal["api", "worker"] = "api"
) -> AsyncIterator[Runtime]:
    """Open the transport, databases and agent; on exit, stop the answers in flight first.

    In worker mode, an API process queues Celery tasks rather than answering; a worker
    answers them (worker.py).
    """

    async with contextlib.AsyncExitStack() as stack:
        options: dict[str, Any] = {"retention": settings.stream_retention}
        if settings.redis_url:
            options["prefix"] = settings.redis_prefix
        transport = from_url(settings.transport_url, **options)
        stack.push_async_callback(transport.aclose)
        producer = StreamProducer(transport, lease=settings.stream_lease)

        store = thread_store_for(settings.database_url, settings.sqlite_path)
        stack.push_async_callback(store.aclose)
        await store.setup()
        checkpointer: BaseCheckpointSaver[Any]
        if isinstance(store, SqliteThreadStore) and settings.checkpoint_url.startswith("sqlite:"):
            from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

            # One connection per process for the SQLite file (see threads.py).
            checkpointer = AsyncSqliteSaver(store.connection)
        else:
            # Postgres tables are set up here, once per process, not per request.
            checkpointer = await stack.enter_async_context(
                open_checkpointer(settings.checkpoint_url)
            )

        redis = None
        if settings.redis_url:
            from resumable_stream.transports.redis import RedisTransport

            # The transport's own client (it closes it): one server, a Cluster or behind
            # Sentinel, as REDIS_URL says. redis-py's Redis.from_url takes only the first.
            if isinstance(transport, RedisTransport):
                redis = transport.client

        cache: AnswerCache | None = None
        if settings.cache_ttl > 0:
            if redis is not None:
                cache = RedisCache(redis, settings.redis_prefix, settings.cache_ttl)
            else:
                cache = MemoryCache(settings.cache_ttl)

        enqueue = None
        if settings.worker_mode and role == "api":
            from .worker import CeleryQueue

            queue = CeleryQueue(settings)
            stack.callback(queue.close)
            enqueue = queue.enqueue

        def model_factory(spec: str) -> Any:
            # Only the models the service offers, as the chat API checks them (check_model):
            # a LangGraph run names its model in its config, and an OpenAI-compatible spec
            # of the caller's would send the conversation, and the key, to its own URL.
            offered = {settings.chat_model, *(option["spec"] for option in available_models())}
            if spec not in offered:
                raise UnknownModelError(f"unknown model {spec!r}; GET /info lists the models")
            return make_chat_model(spec, tokens_per_second=settings.offline_tokens_per_second)

        agent = build_agent(
            model_factory,
            # A LangGraph client's run names no model: the service's, as the chat API's.
            default_model=settings.chat_model,
            checkpointer=checkpointer,
            summarize_after_tokens=settings.summarize_after_tokens or None,
        )
        runs = RunService(
            settings,
            transport=transport,
            producer=producer,
            store=store,
            agent=agent,
            checkpointer=checkpointer,
            cache=cache,
            enqueue=enqueue,
            workers=settings.worker_mode or role == "worker",
        )
        langgraph_producer = LangGraphProducer(
            transport, lease=settings.stream_lease, quota=runs.quota, store=store
        )
        stack.push_async_callback(langgraph_producer.aclose)
        stack.push_async_callback(runs.aclose)  # first out: answers end before storage closes
        await runs.recover()
        yield Runtime(
            settings,
            transport,
            producer,
            store,
            checkpointer,
            agent,
            cache,
            runs,
            redis,
            langgraph_producer,
            ConnectionLimit(settings.max_streams),
        )
