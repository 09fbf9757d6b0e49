"""The threads API: read, rename, delete one thread; list the caller's threads."""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..auth import current_user
from .deps import OwnedThread, RuntimeDep, writable
from .errors import ApiError, storable
from .views import Rename, history, thread_view

router = APIRouter(tags=["threads"])


@router.get("/v1/thread")
async def get_thread(runtime: RuntimeDep, thread: OwnedThread) -> dict[str, Any]:
    """The thread's messages; ``active_run`` is the answer in flight, if any."""
    return await history(runtime, thread)


@router.delete("/v1/thread")
async def delete_thread(runtime: RuntimeDep, thread: OwnedThread) -> dict[str, Any]:
    """Delete the thread, its checkpoints and its answers (stopping a live one first)."""
    await runtime.runs.forget(thread.id, delete_thread=True)
    return {"thread_id": thread.id, "deleted": True}


@router.patch("/v1/thread")
async def rename_thread(runtime: RuntimeDep, thread: OwnedThread, body: Rename) -> dict[str, Any]:
    writable(thread)
    title = " ".join(storable(body.chat_name, "chat_name").split())
    if not title:
        raise ApiError(422, "invalid_request", "chat_name: must not be blank")
    await runtime.store.update_thread(thread.id, title=title)
    return {"thread_id": thread.id, "title": title}


@router.get("/v1/threads", response_class=JSONResponse)
async def list_threads(request: Request, runtime: RuntimeDep, archived: bool = False) -> Response:
    """The caller's threads, most recently active first; ``streaming`` while an answer is
    queued or being written.

    The answer has an ``ETag``: asked again with it in ``If-None-Match``, an unchanged list
    is ``304 Not Modified`` with no body (the browser UI looks every few seconds)."""
    user = current_user(request)
    threads = await runtime.store.list_threads(user, archived=archived)
    streaming = await runtime.store.streaming_threads(user)
    headers = {"cache-control": "private, no-cache"}
    views = [thread_view(t, streaming=t.id in streaming) for t in threads]
    response = JSONResponse({"threads": views}, headers=headers)
    etag = f'W/"{hashlib.sha256(response.body).hexdigest()[:32]}"'
    asked = request.headers.get("if-none-match", "")
    if etag in (tag.strip() for tag in asked.split(",")):
        return Response(status_code=304, headers={**headers, "etag": etag})
    response.headers["etag"] = etag
    return response
