"""Endpoints of earlier chat services, kept for their clients: NDJSON send-and-read, and
thread operations under ``/threads/{thread_id}``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from resumable_stream import Event

from ..events import to_ndjson
from .chat import stream_response, submit
from .deps import OwnedThread, RuntimeDep, writable
from .threads import delete_thread
from .views import ChatMessage, history, stream_url

router = APIRouter(tags=["compat"])


@router.post("/chat/stream", response_class=Response)
async def chat_stream(request: Request, runtime: RuntimeDep, body: ChatMessage) -> Response:
    """Send a message and read its answer in the same response, as NDJSON."""
    run = (await submit(request, runtime, body)).run
    metadata = Event(
        "metadata",
        {"thread_id": run.thread_id, "run": run.seq, "stream_url": stream_url(run)},
        "",
    )
    return await stream_response(
        request, runtime, run, to_ndjson, format="ndjson", prelude=[metadata]
    )


@router.get("/threads/{thread_id}/history")
async def thread_history(runtime: RuntimeDep, thread: OwnedThread) -> dict[str, Any]:
    return await history(runtime, thread)


@router.delete("/threads/{thread_id}")
async def delete_thread_compat(runtime: RuntimeDep, thread: OwnedThread) -> dict[str, Any]:
    return await delete_thread(runtime, thread)


@router.put("/threads/{thread_id}/clear")
async def clear_thread(runtime: RuntimeDep, thread: OwnedThread) -> dict[str, Any]:
    """Empty the thread: its messages, checkpoints and answers go; the thread stays."""
    writable(thread)
    await runtime.runs.forget(thread.id, delete_thread=False)
    return {"thread_id": thread.id, "cleared": True}


@router.put("/threads/{thread_id}/archive")
async def archive_thread(runtime: RuntimeDep, thread: OwnedThread) -> dict[str, Any]:
    """Archive: the thread leaves the list (``GET /v1/threads?archived=true`` shows it)
    and becomes read-only; an answer in flight is stopped."""
    await runtime.runs.stop(thread.id)
    await runtime.store.update_thread(thread.id, archived=True)
    return {"thread_id": thread.id, "archived": True}
