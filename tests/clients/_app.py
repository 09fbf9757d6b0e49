"""The app the client protocol tests serve: the AI SDK chat router over a scripted answer.

`create_app()` reads RSTREAM_TEST_URL (default "memory://"), so two processes can share one
Redis. Each answer announces a tool call, runs it, sends a custom event, then streams
ANSWER_TOKENS tokens; it holds after the first HOLD_AT of them until
`POST /test/release/{chat_id}` is called on the process that runs it, so that a test can
cut and resume a connection mid-answer without timing anything.

`/api/tools` answers with a call of the client-side tool `confirm` and ends; the client runs
the tool and posts again with that assistant message last (a continuation), which is
answered with ANSWER_TOKENS tokens that hold at HOLD_AT the same way.

`/api/meta` answers as `/api/chat` does, its model's two messages reporting their usage,
with a `message_metadata` hook (METADATA_MODEL on `start`, the usage summed on `finish`).

`/api/direct` answers with a tool the server runs, and ends with its output (a LangGraph
tool with `return_direct`, or a graph interrupted after its tools); a continuation, which
the client should not post, is answered with "continued".

`/api/ask` runs a LangGraph agent whose tool `book` asks the user (`interrupt()`) and
resumes it with the answer as docs/ai-sdk.md shows: a message's text, or a continuation's
tool output. `GET /test/replay/{chat_id}` replays the chat's last run from its start, ended
or not, as a reloaded page's resume reads a run in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command, interrupt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from resumable_stream import StreamConsumer, Transport, from_url
from resumable_stream.ai_sdk import (
    ChatRequest,
    ChatRouter,
    MessageMetadataPart,
    UIMessageStreamResponse,
)
from resumable_stream.starlette import allow_all
from tests._graphs import BookingModel, tool_loop

ANSWER_TOKENS = 40
HOLD_AT = 20


def answer_text(prompt: str) -> str:
    return "".join(f"{prompt}{i} " for i in range(ANSWER_TOKENS))


async def scripted_answer(prompt: str, hold: asyncio.Event) -> AsyncIterator[Any]:
    call = {"id": "call_1", "name": "search", "args": {"q": prompt}}
    yield {
        "type": "message",
        "data": {"message": {"id": "m0", "role": "ai", "text": "", "tool_calls": [call]}},
    }
    yield {"type": "tool_start", "data": {"name": "search", "run_id": "r1", "input": {"q": prompt}}}
    tool_message = {"role": "tool", "tool_call_id": "call_1", "content": f"found {prompt}"}
    yield {"type": "tool_end", "data": {"name": "search", "run_id": "r1", "output": tool_message}}
    yield {"type": "custom", "data": {"name": "progress", "data": {"step": 1}}}
    for i in range(ANSWER_TOKENS):
        if i == HOLD_AT:
            await hold.wait()
        yield {
            "type": "token",
            "data": {"text": f"{prompt}{i} ", "message_id": "m1", "node": "agent"},
        }


METADATA_MODEL = "test-model"
#: The usage each of the metered answer's two model messages reports.
USAGES = (
    {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
    {"input_tokens": 30, "output_tokens": 40, "total_tokens": 70},
)


async def metered_answer(prompt: str, hold: asyncio.Event) -> AsyncIterator[Any]:
    """The scripted answer, its model's messages (the call, then the text) with usage."""
    async for item in scripted_answer(prompt, hold):
        if item["type"] == "message":
            item["data"]["message"]["usage"] = USAGES[0]
        yield item
    text = answer_text(prompt)
    message = {"id": "m1", "role": "ai", "text": text, "content": text, "usage": USAGES[1]}
    yield {"type": "message", "data": {"message": message}}


def answer_metadata(part: MessageMetadataPart) -> dict[str, Any]:
    """The metadata an app sends as the AI SDK's docs show: the model, then the usage."""
    if part.type == "start":
        return {"model": METADATA_MODEL, "messageId": part.message_id}
    usage = part.usage
    tokens = None
    if usage is not None:
        tokens = {
            "inputTokens": usage.input_tokens,
            "outputTokens": usage.output_tokens,
            "totalTokens": usage.total_tokens,
        }
    return {"finishReason": part.finish_reason, "usage": tokens}


async def client_tool_answer(chat: ChatRequest, hold: asyncio.Event) -> AsyncIterator[Any]:
    last = chat.messages[-1] if chat.messages else {}
    if last.get("role") != "assistant":
        call = {"id": "call_confirm", "name": "confirm", "args": {"q": chat.text}}
        message = {"id": "m0", "role": "ai", "text": "", "tool_calls": [call]}
        yield {"type": "message", "data": {"message": message}}
        return
    for i in range(ANSWER_TOKENS):  # the continuation, once the client ran the tool
        if i == HOLD_AT:
            await hold.wait()
        yield {"type": "token", "data": {"text": f"{chat.text}{i} ", "message_id": "m1"}}


async def direct_answer(chat: ChatRequest) -> AsyncIterator[Any]:
    last = chat.messages[-1] if chat.messages else {}
    if last.get("role") == "assistant":
        yield "continued"
        return
    call = {"id": "call_direct", "name": "search", "args": {"q": chat.text}}
    message = {"id": "m0", "role": "ai", "text": "", "tool_calls": [call]}
    yield {"type": "message", "data": {"message": message}}
    yield {"type": "tool_start", "data": {"name": "search", "run_id": "r1", "input": call["args"]}}
    yield {"type": "tool_end", "data": {"name": "search", "run_id": "r1", "output": "found"}}


@tool
def book(q: str) -> str:
    """Book q once the user agrees."""
    return f"booked {q}: {interrupt({'question': 'Book it?'})}"


def booking_graph() -> Any:
    return tool_loop(BookingModel(), [book], InMemorySaver())


def create_app(transport: Transport | None = None) -> Starlette:
    transport = transport or from_url(os.environ.get("RSTREAM_TEST_URL", "memory://"))
    holds: dict[str, asyncio.Event] = {}

    def hold_for(chat_id: str) -> asyncio.Event:
        return holds.setdefault(chat_id, asyncio.Event())

    async def answer(chat: ChatRequest) -> AsyncIterator[Any]:
        return scripted_answer(chat.text, hold_for(chat.chat_id))

    async def release(request: Request) -> JSONResponse:
        hold_for(request.path_params["chat_id"]).set()
        return JSONResponse({"released": True})

    async def replay(request: Request) -> UIMessageStreamResponse:
        return UIMessageStreamResponse(
            StreamConsumer(transport, request.path_params["chat_id"]), request
        )

    async def tool_answer(chat: ChatRequest) -> AsyncIterator[Any]:
        return client_tool_answer(chat, hold_for(chat.chat_id))

    async def meta_answer(chat: ChatRequest) -> AsyncIterator[Any]:
        return metered_answer(chat.text, hold_for(chat.chat_id))

    graph = booking_graph()

    async def ask_answer(chat: ChatRequest) -> Any:  # docs/ai-sdk.md's, as written there
        config = {"configurable": {"thread_id": chat.chat_id}}
        if (await graph.aget_state(config)).interrupts:  # it waits: this message answers it
            resume = chat.text
            if chat.messages[-1]["role"] == "assistant":  # a continuation: addToolOutput's
                parts = chat.messages[-1]["parts"]
                resume = [p["output"] for p in parts if p.get("state") == "output-available"][-1]
            return graph.astream_events(Command(resume=resume), config, version="v2")
        return graph.astream_events({"messages": [("user", chat.text)]}, config, version="v2")

    chat = ChatRouter(transport, answer, path="/api/chat", authorize=allow_all)
    meta = ChatRouter(
        transport,
        meta_answer,
        path="/api/meta",
        producer=chat.producer,
        authorize=allow_all,
        message_metadata=answer_metadata,
    )
    tools = ChatRouter(
        transport, tool_answer, path="/api/tools", producer=chat.producer, authorize=allow_all
    )
    direct = ChatRouter(
        transport, direct_answer, path="/api/direct", producer=chat.producer, authorize=allow_all
    )
    ask = ChatRouter(
        transport, ask_answer, path="/api/ask", producer=chat.producer, authorize=allow_all
    )
    routes = [
        *chat.routes,
        *ask.routes,
        *meta.routes,
        *tools.routes,
        *direct.routes,
        Route("/test/release/{chat_id}", release, methods=["POST"]),
        Route("/test/replay/{chat_id}", replay),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await chat.producer.aclose()
        await transport.aclose()

    return Starlette(routes=routes, lifespan=lifespan)
