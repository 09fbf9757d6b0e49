"""The clients people already use, on the service's own threads and auth.

* ``/api/chat``: the Vercel AI SDK's ``useChat`` (``resume: true`` included), chat id =
  thread id; the first message of a chat whose id the client made (``useChat`` without
  ``id`` sends its own) creates the thread. ``POST /api/chat`` submits the last user message
  like ``POST /v1/chat/message`` (same busy policy, same runs) and answers it as a UI
  message stream;
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

import contextlib
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from resumable_stream import ResumableStreamError, StreamConsumer
from resumable_stream.ai_sdk import UIMessageStreamResponse, ui_message_text
from resumable_stream.langgraph_api import (
    LangGraphAction,
    LangGraphRouter,
    ThreadInfo,
    ThreadSearch,
)
from resumable_stream.starlette import error_response

from .answers import NothingToRetry
from .api.chat import checked_message, settler, waiter
from .api.errors import ApiError, storable, too_many_answers
from .api.views import MAX_TITLE_CHARS, title_for
from .auth import current_user
from .events import ChatEvents
from .lock import lock_id_for
from .quota import TooManyAnswers
from .runs import QueueUnavailable, ThreadBusy
from .runtime import Runtime
from .threads import THREAD_ID_RULES, RunRecord, Thread, ThreadGone, is_thread_id

NEW_THREAD_TITLE = "New chat"


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _owned(request: Request, thread_id: str) -> Thread | None:
    if not is_thread_id(thread_id):
        return None
    thread = await _runtime(request).store.get_thread(thread_id)
    if thread is None or thread.owner != current_user(request):
        return None
    return thread


async def _own_or_create(request: Request, thread_id: str, title: str) -> Thread | None:
    """The caller's thread ``thread_id``, created for them if no one has it (a client that
    names its chats, like ``useChat``); None if it is another user's."""
    runtime = _runtime(request)
    try:
        thread = await runtime.store.get_or_create_thread(thread_id, current_user(request), title)
    except ThreadGone:  # deleted as it was being created
        return None
    return thread if thread.owner == current_user(request) else None


def _invalid_id(thread_id: str) -> JSONResponse:
    return _error(
        422, "invalid_thread_id", f"invalid thread id {thread_id!r}: use {THREAD_ID_RULES}"
    )


def _not_found(thread_id: str) -> JSONResponse:
    return _error(404, "thread_not_found", f"no thread {thread_id!r}")


# --------------------------------------------------------------------------- AI SDK


def _answer(request: Request, run: RunRecord) -> Response:
    runtime = _runtime(request)
    events = ChatEvents(
        runtime.transport,
        run.stream_id,
        lambda event: event,
        ready=waiter(runtime, run),  # as the chat API: failed runs end with their error
        on_terminal=settler(runtime, run),  # and a run nobody recorded is recorded
    )
    return UIMessageStreamResponse(events, request, limit=runtime.streams)


async def ai_chat_send(request: Request) -> Response:
    """``POST /api/chat``: ``{id, messages, trigger}`` from ``useChat``."""
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "invalid_request", "the body must be JSON: {id, messages, trigger}")
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        return _error(400, "invalid_request", "'id' must be the thread id")
    thread_id: str = body["id"]
    if not is_thread_id(thread_id):
        return _invalid_id(thread_id)
    messages = body.get("messages")
    if messages is None:
        messages = []
    elif not isinstance(messages, list):
        return _error(400, "invalid_request", "'messages' must be a list of UI messages")
    message: str | None = None
    if body.get("trigger") != "regenerate-message":
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        try:  # the checks of POST /v1/chat/message
            message = checked_message(
                ui_message_text(users[-1]) if users else "", _runtime(request).settings
            )
        except ApiError as exc:
            return _error(exc.status, exc.code, exc.message)
    if message is None:
        thread = await _owned(request, thread_id)
    else:
        # The first message of a chat whose id the client made (useChat without `id` sends
        # its own) starts the thread; another user's thread is not found, never adopted.
        thread = await _own_or_create(request, thread_id, title_for(message))
    if thread is None:
        return _not_found(thread_id)
    if thread.archived:
        return _error(409, "thread_archived", "this thread is archived: it is read-only")
    runtime = _runtime(request)
    try:
        # message=None answers the thread's last question again (the chat API's retry).
        submitted = await runtime.runs.submit(
            thread, message=message, model=runtime.settings.chat_model
        )
    except ThreadBusy:
        return _error(409, "thread_busy", "this thread is still answering; stop it first")
    except NothingToRetry:
        return _error(409, "nothing_to_retry", "this thread has no message to answer again")
    except QueueUnavailable:
        return _error(503, "queue_unavailable", "the answer could not be handed to the workers")
    except ThreadGone:  # deleted as the message came in
        return _not_found(thread_id)
    except TooManyAnswers as exc:
        refused = too_many_answers(exc)
        return _error(refused.status, refused.code, refused.message, refused.headers)
    return _answer(request, submitted.run)


async def ai_chat_resume(request: Request) -> Response:
    """``GET /api/chat/{thread_id}/stream``: the answer in progress from its start, or 204
    (also for a chat the client named but has not sent a message to yet, and for another
    user's: the answer does not tell whether a thread exists)."""
    thread_id = request.path_params["thread_id"]
    runtime = _runtime(request)
    if await _owned(request, thread_id) is None:
        if is_thread_id(thread_id):
            return Response(status_code=204, headers={"cache-control": "no-store"})
        return _not_found(thread_id)
    run = await runtime.store.current_run(thread_id)
    info = None if run is None else await runtime.transport.info(run.stream_id)
    if run is None or info is None or info.status != "running":
        return Response(status_code=204, headers={"cache-control": "no-store"})
    try:
        return UIMessageStreamResponse(
            StreamConsumer(runtime.transport, run.stream_id), request, limit=runtime.streams
        )
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

#: The assistant id (graph id) the LangGraph API serves the agent under.
GRAPH_ID = "agent"


async def _authorize(request: Request, thread_id: str | None, action: LangGraphAction) -> bool:
    if thread_id is None:
        return True
    thread = await _owned(request, thread_id)
    if thread is None:
        raise ApiError(404, "thread_not_found", f"no thread {thread_id!r}")
    if action == "run" and thread.archived:
        # Read-only, as in the chat API (a cancel is fine: archiving stopped its answer).
        raise ApiError(409, "thread_archived", "this thread is archived: it is read-only")
    if action == "run":
        # A run is activity, as a message of the chat API is: the thread's updated_at (the
        # order of /v1/threads, the LangGraph thread's updated_at) moves.
        await _runtime(request).store.update_thread(thread_id)
    return True


def _title(given: str) -> str:
    """A title a LangGraph client gives in ``metadata``, spaced and checked as a rename's
    ``chat_name`` (``""`` if blank): text no database stores (PostgreSQL refuses NUL) and
    one too long are 422."""
    title = " ".join(storable(given, "metadata.title").split())
    if len(title) > MAX_TITLE_CHARS:
        raise ApiError(
            422, "invalid_request", f"metadata.title: at most {MAX_TITLE_CHARS} characters"
        )
    return title


async def _create_thread(request: Request, thread_id: str | None, metadata: dict[str, Any]) -> str:
    given = metadata.get("title")
    title = (_title(given) if isinstance(given, str) else "") or NEW_THREAD_TITLE
    if thread_id is not None:
        # A client may name the thread (the SDKs' `threadId`); creating one it already has
        # returns it, and another user's id is refused.
        if not is_thread_id(thread_id):
            raise ApiError(
                422, "invalid_request", f"invalid thread id {thread_id!r}: use {THREAD_ID_RULES}"
            )
        if await _own_or_create(request, thread_id, title) is None:
            raise ApiError(
                409,
                "thread_id_taken",
                f"thread id {thread_id!r} is taken: choose another or omit it",
            )
        return thread_id
    thread = await _runtime(request).store.create_thread(current_user(request), title)
    request.state.created_thread = thread.id  # for _ChatLangGraphRouter.copy_thread
    return thread.id


async def _update_thread(request: Request, thread_id: str, metadata: dict[str, Any]) -> None:
    """``threads.update``: a ``title`` renames the thread, as ``PATCH /v1/thread`` does (an
    archived thread is read-only: ``authorize`` refused it). The rest of :func:`_metadata`
    is the service's own: given with the value it has, it changes nothing; any other key
    or value is 422, as the service keeps no metadata it could store it in."""
    thread = await _owned(request, thread_id)
    if thread is None:
        raise ApiError(404, "thread_not_found", f"no thread {thread_id!r}")
    current = _metadata(thread)
    fixed = sorted(
        key for key, value in metadata.items() if key != "title" and current.get(key, ...) != value
    )
    if fixed:
        raise ApiError(
            422,
            "invalid_request",
            f"metadata {fixed}: only 'title' can be updated (archive with PUT "
            "/threads/{id}/archive)",
        )
    if "title" in metadata:
        given = metadata["title"]
        title = _title(given) if isinstance(given, str) else ""
        if not title:
            raise ApiError(422, "invalid_request", "metadata.title: a non-blank string")
        await _runtime(request).store.update_thread(thread_id, title=title)


async def _thread_info(request: Request, thread_id: str) -> ThreadInfo | None:
    """The thread's record for ``GET /langgraph/threads/{id}``: the service's own times and
    metadata (see :func:`_metadata`)."""
    thread = await _owned(request, thread_id)
    if thread is None:
        return None
    return ThreadInfo(
        created_at=datetime.fromtimestamp(thread.created_at, UTC),
        updated_at=datetime.fromtimestamp(thread.updated_at, UTC),
        metadata=_metadata(thread),
    )


def _metadata(thread: Thread) -> dict[str, Any]:
    """A thread's metadata as the LangGraph API shows it: what the service keeps (title,
    archived), and the graph every thread runs (Agent Chat UI finds threads by it)."""
    return {
        "title": thread.title,
        "archived": thread.archived,
        "graph_id": GRAPH_ID,
        "assistant_id": GRAPH_ID,
    }


async def _search_threads(request: Request, search: ThreadSearch) -> list[str]:
    """``threads.search`` over the caller's threads (the archived ones if the metadata asks
    for them), by the metadata :func:`_metadata` gives; most recently active first."""
    archived = search.metadata.get("archived") is True
    threads = await _runtime(request).store.list_threads(current_user(request), archived=archived)
    found = [
        thread
        for thread in threads
        if (search.ids is None or thread.id in search.ids)
        and all(_metadata(thread).get(key) == value for key, value in search.metadata.items())
    ]
    descending = search.sort_order != "asc"
    if search.sort_by == "thread_id":
        found.sort(key=lambda thread: thread.id, reverse=descending)
    elif search.sort_by == "created_at":
        found.sort(key=lambda thread: thread.created_at, reverse=descending)
    elif not descending:
        found.reverse()
    return [thread.id for thread in found[search.offset : search.offset + search.limit]]


class _ChatLangGraphRouter(LangGraphRouter):
    async def copy_thread(self, request: Request) -> Response:
        """``threads.copy``, all or nothing: the router records the new thread (with
        ``_create_thread``) before it copies the checkpoints, and on a failure deletes the
        checkpoints it wrote, and the record only through ``delete_thread``, which this
        service does not give it (``threads.delete`` would be served). The record goes
        here, or the user's list would keep an empty chat the copy left."""
        try:
            return await super().copy_thread(request)
        except BaseException:
            created = getattr(request.state, "created_thread", None)
            if created is not None:
                with contextlib.suppress(Exception):  # the copy's error is the one to tell
                    await _runtime(request).store.delete_thread(created)
            raise


class LangGraphAPI:
    """``/langgraph``: a :class:`LangGraphRouter` over the runtime, made on first use (the
    runtime exists once the app started)."""

    def __init__(self) -> None:
        self._router: LangGraphRouter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._router is None:
            runtime: Runtime = scope["app"].state.runtime
            self._router = _ChatLangGraphRouter(
                runtime.transport,
                {GRAPH_ID: runtime.agent},
                # A run takes one of its user's answers (MAX_ANSWERS_PER_USER: 429 past it).
                producer=runtime.langgraph_producer,
                authorize=_authorize,
                create_thread=_create_thread,
                thread_info=_thread_info,
                update_thread=_update_thread,
                search_threads=_search_threads,
                # A run holds the thread's lock: the chat API waits for it, and a LangGraph
                # run that names no strategy waits for no one (409 while the thread answers).
                stream_id=lock_id_for,
                multitask_strategy="reject",
                # An answer whose client went away is finished, not stopped (useStream asks
                # for on_disconnect "cancel" unless reconnectOnMount is set).
                cancel_on_disconnect=False,
                limit=runtime.streams,  # MAX_STREAMS, shared with the chat API's streams
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
