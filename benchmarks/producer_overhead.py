"""Scenario 1: what StreamProducer adds to draining a LangGraph graph's events."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk
from langgraph.graph import END, START, MessagesState, StateGraph

from resumable_stream import StreamConsumer, StreamProducer, Transport, from_url

from ._sources import tokens
from ._support import Figure, RedisServer, Result


class StreamingFakeChat(GenericFakeChatModel):
    """``GenericFakeChatModel`` that streams natively on the event loop.

    The stock model streams its sync ``_stream`` through a thread per chunk, which would
    make the baseline measure thread hops; real async providers stream on the loop.
    """

    chunks: list[str]

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for text in self.chunks:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=text, id="fake"))
            if run_manager is not None:
                await run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk


def build_graph(count: int) -> Any:
    chunks = tokens(0, count)
    model = StreamingFakeChat(messages=iter([AIMessage(content="".join(chunks))]), chunks=chunks)

    async def agent(state: MessagesState) -> dict[str, list[BaseMessage]]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", agent)
    graph.add_edge(START, "agent")
    graph.add_edge("agent", END)
    return graph.compile()


def _inputs() -> dict[str, Any]:
    return {"messages": [("user", "stream")]}


def _source(graph: Any, mode: str) -> AsyncIterator[Any]:
    """The graph's stream: ``astream_events`` (the target rows) or ``astream`` in
    ``messages`` mode (information rows), the two ways docs/events.md streams tokens."""
    if mode == "messages":
        return cast(AsyncIterator[Any], graph.astream(_inputs(), stream_mode="messages"))
    return cast(AsyncIterator[Any], graph.astream_events(_inputs(), version="v2"))


async def _drain(graph: Any, mode: str) -> float:
    started = time.perf_counter()
    async for _ in _source(graph, mode):
        pass
    return time.perf_counter() - started


async def _through(graph: Any, transport: Transport, mode: str) -> tuple[float, str]:
    producer = StreamProducer(transport)
    started = time.perf_counter()
    run = await producer.start(_source(graph, mode))
    await run.wait()
    return time.perf_counter() - started, run.stream_id


async def _count_tokens(transport: Transport, stream_id: str) -> int:
    return sum([1 async for e in StreamConsumer(transport, stream_id) if e.type == "token"])


async def _measure(url: str, count: int, pairs: int, mode: str = "events") -> dict[str, Any]:
    graph = build_graph(count)
    await _drain(graph, mode)  # warm up imports and caches
    ratios: list[float] = []
    base_times: list[float] = []
    times: list[float] = []
    delivered = 0
    async with from_url(url) as transport:
        for _ in range(pairs):
            # Interleaved pairs: each ratio compares runs taken seconds apart. Each run
            # starts from a full collection: the graph's own objects (LangGraph keeps each
            # chunk) bring a full collection of tens of ms every few thousand tokens, and
            # without it one run of a pair may fit one more than the other, whoever runs.
            gc.collect()
            base = await _drain(graph, mode)
            gc.collect()
            took, stream_id = await _through(graph, transport, mode)
            base_times.append(base)
            times.append(took)
            ratios.append(took / base)
            delivered = await _count_tokens(transport, stream_id)
    # Noise only ever adds time: compare the best of each (the ratios of pairs are kept).
    return {
        "ratio": min(times) / min(base_times),
        "pair_ratios": ratios,
        "baseline_s": base_times,
        "producer_s": times,
        "tokens_delivered": delivered,
    }


def producer_overhead(server: RedisServer, quick: bool) -> Result:
    count, pairs = (2_000, 3) if quick else (20_000, 5)
    redis_run = asyncio.run(_measure(server.url, count, pairs))
    memory_run = asyncio.run(_measure("memory://", count, pairs))
    messages_run = asyncio.run(_measure("memory://", count, pairs, "messages"))
    base = min(redis_run["baseline_s"])
    return Result(
        figures=[
            Figure(
                "1", "drain astream_events (baseline)", round(count / base), "tok/s", note="info"
            ),
            Figure("1", "ratio via producer, Redis", round(redis_run["ratio"], 3), "x", "<=", 1.05),
            Figure(
                "1", "ratio via producer, memory", round(memory_run["ratio"], 3), "x", "<=", 1.03
            ),
            Figure(
                "1",
                'drain astream(stream_mode="messages")',
                round(count / min(messages_run["baseline_s"])),
                "tok/s",
                note="info",
            ),
            Figure(
                "1",
                'ratio via producer, memory, astream(stream_mode="messages")',
                round(messages_run["ratio"], 3),
                "x",
                note="info (the target rows stream astream_events)",
            ),
            Figure(
                "1",
                "tokens in the stream == source",
                redis_run["tokens_delivered"] == count == messages_run["tokens_delivered"],
                "",
                "==",
                True,
            ),
        ],
        details={
            "tokens": count,
            "pairs": pairs,
            "redis": redis_run,
            "memory": memory_run,
            "memory_messages_mode": messages_run,
        },
    )
