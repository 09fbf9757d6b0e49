"""The clients people already use, on the service's own threads and auth.

* ``/api/chat``: the Vercel AI SDK's ``useChat`` (``resume: true`` included), chat id =
  thread id. ``POST /api/chat`` submits the last user message like ``POST /v1/chat/message``
  (same busy policy, same runs) and answers it as a UI message stream;
  ``GET /api/chat/{thread_id}/stream`` replays the answer in progress (204 when none);
  ``POST /api/chat/{thread_id}/stop`` stops it.
* ``/langgraph``: the LangGraph Agent Server API (``useStream``, ``joinStream``, PyPI
  ``langgraph-sdk``) over the service's agent, graph id ``agent``. Its threads are the
  service's threads (same ids, owner and history at ``/v1/thread``), and a run holds the
  thread's lock (runs.py), so it never overlaps an answer of the chat API.

The caller is the service's user (session cookie, or ``Authorization: Bearer`` from the SDKs'
``headers`` / ``defaultHeaders``); another user's thread is not found.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from resumable_stream import ResumableStreamError, StreamConsumer, StreamNotFound
from resumable_stream.ai_sdk import UIMessageStreamResponse, ui_message_text
from resumable_stream.langgraph_api import LangGraphAction, LangGraphRouter
from resumable_stream.starlette import error_response

from .auth import current_user
from .events import ChatEvents
from .runs import ThreadBusy, lock_id_for
from .runtime import Runtime
from .threads import RunRecord, Thread

_THREAD_ID = re.compile(r"[0-9a-f]{32}")
NEW_THREAD_TITLE = "New chat"


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _owned(request: Request, thread_id: str) -> Thread | None:
    if not _THREAD_ID.fullmatch(thread_id):
        return None
    thread = await _runtime(request).store.get_thread(thread_id)
    if thread is None or thread.owner != current_user(request):
        return None
    return thread


def _not_found(thread_id: str) -> JSONResponse:
    return _error(404, "thread_not_found", f"no thread {thread_id!r}")


# --------------------------------------------------------------------------- AI SDK


async def _stream_exists(runtime: Runtime, run: RunRecord) -> None:
    """Wait until a queued answer's stream exists (as app.py's stream endpoint does)."""
    delay = 0.05
    while await runtime.transport.info(run.stream_id) is None:
        current = await runtime.store.get_run(run.thread_id, run.seq)
        if current is None or current.state in ("done", "dropped"):
            raise StreamNotFound(run.stream_id)
        await asyncio.sleep(delay)  # the answer waits for its thread, maybe in another process
        delay = min(delay * 2, 0.5)


def _answer(request: Request, run: RunRecord) -> Response:
    runtime = _runtime(request)
    events = ChatEvents(
        runtime.transport,
        run.stream_id,
        lambda event: event,
        ready=lambda: _stream_exists(runtime, run),
    )
    return UIMessageStreamResponse(events, request)


async def ai_chat_send(request: Request) -> Response:
    """``POST /api/chat``: ``{id, messages, trigger}`` from ``useChat``."""
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "invalid_request", "the body must be JSON: {id, messages, trigger}")
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        return _error(400, "invalid_request", "'id' must be the thread id")
    thread = await _owned(request, body["id"])
    if thread is None:
        return _not_found(body["id"])
    if thread.archived:
        return _error(409, "thread_archived", "this thread is archived: it is read-only")
    messages = body.get("messages")
    message: str | None = None
    if body.get("trigger") != "regenerate-message":
        users = [m for m in messages or () if isinstance(m, dict) and m.get("role") == "user"]
        message = ui_message_text(users[-1]).strip() if users else ""
        if not message:
            return _error(422, "empty_message", "the last user message has no text")
    runtime = _runtime(request)
    try:
        # message=None answers the thread's last question again (the chat API's retry).
        submitted = await runtime.runs.submit(
            thread, message=message, model=runtime.settings.chat_model
        )
    except ThreadBusy:
        return _error(409, "thread_busy", "this thread is still answering; stop it first")
    return _answer(request, submitted.run)


async def ai_chat_resume(request: Request) -> Response:
    """``GET /api/chat/{thread_id}/stream``: the answer in progress from its start, or 204."""
    thread_id = request.path_params["thread_id"]
    if await _owned(request, thread_id) is None:
        return _not_found(thread_id)
    runtime = _runtime(request)
    run = await runtime.store.current_run(thread_id)
    info = None if run is None else await runtime.transport.info(run.stream_id)
    if run is None or info is None or info.status != "running":
        return Response(status_code=204, headers={"cache-control": "no-store"})
    try:
        return UIMessageStreamResponse(StreamConsumer(runtime.transport, run.stream_id), request)
    except ResumableStreamError as exc:
        return await error_response(request, exc)


async def ai_chat_stop(request: Request) -> Response:
    """``POST /api/chat/{thread_id}/stop``: stop the answer (``useChat.stop()`` only aborts
    the fetch)."""
    thread_id = request.path_params["thread_id"]
    if await _owned(request, thread_id) is None:
        return _not_found(thread_id)
    stopped = await _runtime(request).runs.stop(thread_id)
    return JSONResponse({"thread_id": thread_id, "stopped": stopped})


# --------------------------------------------------------------------------- LangGraph


async def _authorize(request: Request, thread_id: str | None, action: LangGraphAction) -> bool:
    if thread_id is not None and await _owned(request, thread_id) is None:
        raise HTTPException(404, f"no thread {thread_id!r}")
    return True


async def _create_thread(request: Request, thread_id: str | None, metadata: dict[str, Any]) -> str:
    if thread_id is not None:
        # The service names its threads; a client may only "create" one it already has.
        if await _owned(request, thread_id) is None:
            raise HTTPException(422, "thread ids are chosen by the service: omit thread_id")
        return thread_id
    title = metadata.get("title")
    runtime = _runtime(request)
    thread = await runtime.store.create_thread(
        current_user(request), title if isinstance(title, str) and title else NEW_THREAD_TITLE
    )
    return thread.id


class LangGraphAPI:
    """``/langgraph``: a :class:`LangGraphRouter` over the runtime, made on first use (the
    runtime exists once the app started)."""

    def __init__(self) -> None:
        self._router: LangGraphRouter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._router is None:
            runtime: Runtime = scope["app"].state.runtime
            self._router = LangGraphRouter(
                runtime.transport,
                {"agent": runtime.agent},
                producer=runtime.producer,
                authorize=_authorize,
                create_thread=_create_thread,
                # A run holds the thread's lock: the chat API waits for it, and a LangGraph
                # run waits for no one (409 while the thread answers).
                stream_id=lock_id_for,
                # An answer whose client went away is finished, not stopped (useStream asks
                # for on_disconnect "cancel" unless reconnectOnMount is set).
                cancel_on_disconnect=False,
            )
        await self._router(scope, receive, send)


def add_client_protocols(app: FastAPI) -> None:
    """Serve the AI SDK at ``/api/chat`` and the LangGraph API at ``/langgraph``."""
    app.router.routes.extend(
        [
            Route("/api/chat", ai_chat_send, methods=["POST"]),
            Route("/api/chat/{thread_id}/stream", ai_chat_resume, methods=["GET"]),
            Route("/api/chat/{thread_id}/stop", ai_chat_stop, methods=["POST"]),
        ]
    )
    app.mount("/langgraph", LangGraphAPI())
