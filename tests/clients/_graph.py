"""A small LangGraph graph for the LangGraph API tests, and the app serving it.

The graph writes a custom event, then a chat model streams ANSWER_TOKENS tokens; the model
holds after HOLD_AT of them until `POST /test/release/{thread_id}` reaches the process that
runs it, so that a test can cut and join a run mid-answer without timing anything.
`create_app()` reads RSTREAM_TEST_URL (the transport), RSTREAM_TEST_SQLITE (a SQLite
checkpoint file shared by processes; an in-memory saver without it) and RSTREAM_TEST_LEASE
(the producer's lease in seconds, so that a test can kill a process and see its runs lost
soon; the default lease without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, MessagesState, StateGraph
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from resumable_stream import StreamProducer, Transport, from_url
from resumable_stream.langgraph_api import LangGraphRouter
from resumable_stream.starlette import allow_all

ANSWER_TOKENS = 40
HOLD_AT = 20


def answer_text(prompt: str) -> str:
    return "".join(f"{prompt}{i} " for i in range(ANSWER_TOKENS))


class HeldModel(BaseChatModel):
    """Streams answer_text(<last message>) and holds halfway until `hold` is set."""

    hold: Any = None

    @property
    def _llm_type(self) -> str:
        return "held-test-model"

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        raise NotImplementedError("async only")

    async def _agenerate(
        self, messages: list[BaseMessage], *args: Any, **kwargs: Any
    ) -> ChatResult:
        text = "".join([chunk.text async for chunk in self._astream(messages)])
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        prompt = str(messages[-1].content)
        for i in range(ANSWER_TOKENS):
            if i == HOLD_AT and self.hold is not None:
                await self.hold.wait()
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=f"{prompt}{i} "))
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def build_graph(holds: dict[str, asyncio.Event], checkpointer: Any) -> Any:
    async def prepare(state: MessagesState) -> dict[str, Any]:
        get_stream_writer()({"step": "prepare"})
        return {}

    async def agent(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        thread_id = config["configurable"]["thread_id"]
        model = HeldModel(hold=holds.setdefault(thread_id, asyncio.Event()))
        return {"messages": [await model.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("prepare", prepare)
    builder.add_node("agent", agent)
    builder.add_edge(START, "prepare")
    builder.add_edge("prepare", "agent")
    builder.add_edge("agent", END)
    return builder.compile(checkpointer=checkpointer)


def create_app(transport: Transport | None = None) -> Starlette:
    transport = transport or from_url(os.environ.get("RSTREAM_TEST_URL", "memory://"))
    holds: dict[str, asyncio.Event] = {}
    sqlite_path = os.environ.get("RSTREAM_TEST_SQLITE")
    lease = os.environ.get("RSTREAM_TEST_LEASE")
    api: LangGraphRouter | None = None

    async def release(request: Request) -> JSONResponse:
        holds.setdefault(request.path_params["thread_id"], asyncio.Event()).set()
        return JSONResponse({"released": True})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal api
        async with contextlib.AsyncExitStack() as stack:
            if sqlite_path:
                from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

                saver: Any = await stack.enter_async_context(
                    AsyncSqliteSaver.from_conn_string(sqlite_path)
                )
            else:
                saver = InMemorySaver()
            producer = None if lease is None else StreamProducer(transport, lease=float(lease))
            api = LangGraphRouter(
                transport,
                {"agent": build_graph(holds, saver)},
                producer=producer,
                authorize=allow_all,
            )
            try:
                yield
            finally:
                await api.producer.aclose()
                await transport.aclose()

    async def langgraph(scope: Any, receive: Any, send: Any) -> None:
        if api is None:
            raise RuntimeError("the app has not started")
        await api(scope, receive, send)

    routes = [
        Route("/test/release/{thread_id}", release, methods=["POST"]),
        Mount("/langgraph", app=langgraph),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
