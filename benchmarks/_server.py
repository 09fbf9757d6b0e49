"""The HTTP side of scenarios 3, 4 and 6: one uvicorn worker serving the router.

Run as ``python -m benchmarks._server REDIS_URL PORT``. Besides ``/streams`` (the
:class:`StreamRouter`), ``POST /bench/create`` starts paced producers that wait for
``POST /bench/go``, as an app that runs its graphs in the same process would.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from resumable_stream import Run, StreamProducer, from_url
from resumable_stream.starlette import StreamRouter, allow_all

from ._sources import Pacer


def build_app(redis_url: str) -> Starlette:
    transport = from_url(redis_url)
    producer = StreamProducer(transport)
    state: dict[str, Any] = {"runs": [], "pacer": None, "go": asyncio.Event(), "start": 0.0}

    async def gated(pacer: Pacer, offset: float) -> AsyncIterator[str]:
        await state["go"].wait()
        async for item in pacer.source(state["start"], offset):
            yield item

    async def create(request: Request) -> JSONResponse:
        body = await request.json()
        streams, rate = int(body["streams"]), float(body["rate"])
        pacer = Pacer(rate, float(body["seconds"]), clock="wall")
        state.update(pacer=pacer, go=asyncio.Event())
        state["runs"] = [
            await producer.start(gated(pacer, (i / streams) / rate), stream_id=f"fan-{i}")
            for i in range(streams)
        ]
        return JSONResponse({"streams": streams, "tokens_per_stream": pacer.count})

    async def go(request: Request) -> JSONResponse:
        state["start"] = asyncio.get_running_loop().time() + 0.05
        state["go"].set()
        return JSONResponse({})

    async def status(request: Request) -> JSONResponse:
        runs: list[Run] = state["runs"]
        pacer: Pacer | None = state["pacer"]
        return JSONResponse(
            {
                "done": all(run.done() for run in runs),
                "max_lag_ms": None if pacer is None else pacer.max_lag * 1000,
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with transport, producer:
            yield

    return Starlette(
        routes=[
            Route("/bench/create", create, methods=["POST"]),
            Route("/bench/go", go, methods=["POST"]),
            Route("/bench/status", status),
            # 1,000 clients is the scenario, not a limit to enforce here.
            Mount(
                "/streams",
                StreamRouter(transport, authorize=allow_all, max_connections=None),
            ),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    from ._support import raise_fd_limit

    raise_fd_limit()
    redis_url, port = sys.argv[1], int(sys.argv[2])
    uvicorn.run(
        build_app(redis_url),
        host="127.0.0.1",
        port=port,
        loop="asyncio",
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
