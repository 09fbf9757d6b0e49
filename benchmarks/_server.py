"""The HTTP side of scenarios 3, 4 and 6: one uvicorn worker serving the router.

Run as ``python -m benchmarks._server REDIS_URL PORT``. Besides ``/streams`` (the
:class:`StreamRouter`), ``POST /bench/create`` starts paced producers that wait for
``POST /bench/go``, as an app that runs its graphs in the same process would.

``POST /bench/create`` with ``"bare": true`` instead starts the same paced sources
feeding in-process queues, served by ``/bare/<stream id>``: a plain Starlette SSE
endpoint with no storage and no resume, the baseline scenario 3's CPU is compared with.
``"bare": "stored"`` is the floor: the same, but each token is stored first by an
``XADD`` on one minimal pipelined connection (``benchmarks/floor.py``) and queued when
Redis replies.

``POST /bench/plan`` takes a plan (``benchmarks/_shape.py``): after ``POST /bench/go``
(with the plan's start as ``t0_wall``), each planned stream's producer starts just before
its first token is due, so streams start and end all through the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from resumable_stream import Run, StreamProducer, from_url
from resumable_stream.starlette import StreamRouter, allow_all

from . import floor
from ._sources import Pacer


def build_app(redis_url: str) -> Starlette:
    transport = from_url(redis_url)
    producer = StreamProducer(transport)
    state: dict[str, Any] = {"runs": [], "pacer": None, "go": asyncio.Event(), "start": 0.0}
    # The bare baseline: one paced pump task and one queue per stream (None ends it).
    pumps: list[asyncio.Task[None]] = []
    queues: dict[str, asyncio.Queue[str | None]] = {}

    async def gated(pacer: Pacer, offset: float) -> AsyncIterator[str]:
        await state["go"].wait()
        async for item in pacer.source(state["start"], offset):
            yield item

    async def pump(source: AsyncIterator[str], queue: asyncio.Queue[str | None]) -> None:
        async for item in source:
            queue.put_nowait(item)
        queue.put_nowait(None)

    async def stored_pump(
        connection: floor.Connection,
        key: str,
        source: AsyncIterator[str],
        queue: asyncio.Queue[str | None],
    ) -> None:
        def stored(item: str, reply: Any) -> None:
            if not isinstance(reply, hiredis.ReplyError):  # else lost: its client ends short
                queue.put_nowait(item)

        await floor.store(connection, key, source, stored, lambda _: queue.put_nowait(None))

    async def reset() -> None:
        """Stop what the previous row started; close the floor's connection (the rows
        after it count the server's Redis connections)."""
        await _stop(pumps)
        queues.clear()
        if "floor" in state:
            state.pop("floor").close()

    async def create(request: Request) -> JSONResponse:
        body = await request.json()
        streams, rate = int(body["streams"]), float(body["rate"])
        pacer = Pacer(rate, float(body["seconds"]), clock="wall")
        state.update(pacer=pacer, go=asyncio.Event())
        await reset()
        if body.get("bare"):
            state["runs"] = []
            connection = None
            if body["bare"] == "stored":
                connection, state["floor"] = await floor.Connection.open(redis_url)
            for i in range(streams):
                key = f"fan-{i}"
                queue = queues[key] = asyncio.Queue()
                source = gated(pacer, (i / streams) / rate)
                if connection is None:
                    pumps.append(asyncio.create_task(pump(source, queue)))
                else:
                    pumps.append(asyncio.create_task(stored_pump(connection, key, source, queue)))
            return JSONResponse({"streams": streams, "tokens_per_stream": pacer.count})
        state["runs"] = [
            await producer.start(gated(pacer, (i / streams) / rate), stream_id=f"fan-{i}")
            for i in range(streams)
        ]
        return JSONResponse({"streams": streams, "tokens_per_stream": pacer.count})

    async def planned(pacer: Pacer, key: str, start: float, count: int) -> None:
        await state["go"].wait()
        loop = asyncio.get_running_loop()
        first_due = state["start"] + start
        # Start the producer 20 ms before its first token, as a request would.
        await asyncio.sleep(max(0.0, first_due - 0.02 - loop.time()))
        run = await producer.start(pacer.source(first_due, count=count), stream_id=key)
        state["runs"].append(run)

    async def plan(request: Request) -> JSONResponse:
        body = await request.json()
        pacer = Pacer(float(body["rate"]), 0.0, clock="wall")
        state.update(pacer=pacer, go=asyncio.Event(), runs=[])
        await reset()
        for item in body["plan"]:
            task = planned(pacer, item["key"], float(item["start"]), int(item["count"]))
            pumps.append(asyncio.create_task(task))
        return JSONResponse({"streams": len(body["plan"])})

    async def go(request: Request) -> JSONResponse:
        body = await request.body()
        t0_wall = orjson.loads(body).get("t0_wall") if body else None
        loop = asyncio.get_running_loop()
        delay = 0.05 if t0_wall is None else float(t0_wall) - time.time()
        state["start"] = loop.time() + delay
        state["go"].set()
        return JSONResponse({})

    async def bare(request: Request) -> Response:
        queue = queues.get(request.path_params["stream_id"])
        if queue is None:
            return JSONResponse({"code": "not_found", "message": "no such stream"}, 404)

        async def body() -> AsyncIterator[bytes]:
            # The same event the router sends for a token, with an id of the same shape.
            sent = 0
            while (item := await queue.get()) is not None:
                sent += 1
                data = orjson.dumps({"text": item, "message_id": None, "node": None}).decode()
                yield f"id: 1-{sent}-0\nevent: token\ndata: {data}\n\n".encode()
            yield f"id: 1-{sent + 1}-0\nevent: end\ndata: {{}}\n\n".encode()

        return StreamingResponse(body(), media_type="text/event-stream")

    async def status(request: Request) -> JSONResponse:
        runs: list[Run] = state["runs"]
        pacer: Pacer | None = state["pacer"]
        return JSONResponse(
            {
                "done": all(run.done() for run in runs) and all(t.done() for t in pumps),
                "max_lag_ms": None if pacer is None else pacer.max_lag * 1000,
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with transport, producer:
            try:
                yield
            finally:
                await reset()

    return Starlette(
        routes=[
            Route("/bench/create", create, methods=["POST"]),
            Route("/bench/plan", plan, methods=["POST"]),
            Route("/bench/go", go, methods=["POST"]),
            Route("/bench/status", status),
            Route("/bare/{stream_id}", bare),
            # 1,000 clients is the scenario, not a limit to enforce here.
            Mount(
                "/streams",
                StreamRouter(transport, authorize=allow_all, max_connections=None),
            ),
        ],
        lifespan=lifespan,
    )


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel and await the bare baseline's pumps or the plan's starters (they end by
    themselves when done)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tasks.clear()


def main() -> None:
    from ._support import raise_fd_limit

    raise_fd_limit()
    redis_url, port = sys.argv[1], int(sys.argv[2])
    uvicorn.run(
        build_app(redis_url),
        host="127.0.0.1",
        port=port,
        loop=os.environ.get("RS_BENCH_LOOP", "asyncio"),
        http=os.environ.get("RS_BENCH_HTTP", "h11"),
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
