"""The chat API: send a message, regenerate, edit; read an answer as SSE; stop it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from resumable_stream import (
    Event,
    InvalidOffset,
    ResumableStreamError,
    StreamNotFound,
    parse_offset,
)
from resumable_stream.starlette import StreamResponse, error_response, resume_after

from ..answers import NothingToRetry
from ..auth import current_user
from ..events import PRODUCER_LOST, QUEUE_DOWN, ChatEvents, Mapper, run_dropped, run_error, to_sse
from ..quota import TooManyAnswers
from ..runs import QueueUnavailable, Submitted, ThreadBusy
from ..runtime import Runtime
from ..settings import Settings
from ..threads import MAX_RUN_SEQ, RunKind, RunRecord, ThreadGone
from .deps import OwnedThread, RuntimeDep, check_model, find_thread, writable
from .errors import ApiError, storable, too_many_answers
from .views import ChatMessage, Regenerate, stream_url, title_for

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/message", status_code=202)
async def post_message(request: Request, runtime: RuntimeDep, body: ChatMessage) -> JSONResponse:
    """Start answering in the background; read the answer at ``stream_url``.
    ``edit_last`` replaces the thread's last message (and its answer) instead."""
    return accepted(await submit(request, runtime, body))


@router.post("/v1/chat/regenerate", status_code=202)
async def regenerate(request: Request, runtime: RuntimeDep, body: Regenerate) -> JSONResponse:
    """Answer the thread's last message again, replacing its last answer."""
    retry = ChatMessage(thread_id=body.thread_id, model=body.model, retry=True)
    return accepted(await submit(request, runtime, retry))


@router.get("/v1/chat/stream", response_class=Response)
async def get_stream(
    request: Request,
    runtime: RuntimeDep,
    thread: OwnedThread,
    run: Annotated[
        int | None,
        Query(ge=1, le=MAX_RUN_SEQ, description="Answer number (default: current)"),
    ] = None,
) -> Response:
    """The answer as SSE (``chunk``, ``tool_call``, ``system``); resumes after
    ``Last-Event-ID``; 204 when the thread has no active or recent answer."""
    if run is None:
        record = await runtime.store.current_run(thread.id)
    else:
        record = await runtime.store.get_run(thread.id, run)
    if record is None or record.state == "dropped":
        return Response(status_code=204, headers={"cache-control": "no-store"})
    after = resume_after(request)
    if after is not None and run is None:
        # An offset of an earlier answer: the thread has moved on; send the current one.
        info = await runtime.transport.info(record.stream_id)
        with contextlib.suppress(InvalidOffset):
            if info is not None and parse_offset(after).epoch != info.epoch:
                after = None
    return await stream_response(request, runtime, record, to_sse, format="sse", after=after)


@router.post("/v1/chat/stop")
async def stop(
    runtime: RuntimeDep,
    thread: OwnedThread,
    run: Annotated[
        int | None,
        Query(ge=1, le=MAX_RUN_SEQ, description="Answer number (default: whatever is in flight)"),
    ] = None,
) -> dict[str, Any]:
    """Stop answer ``run`` if it is in flight or queued (``stopped: false`` once it has
    ended: the answers after it go on). Without ``run``: the answer in flight, and the
    queued messages are dropped."""
    if run is None:
        return {"thread_id": thread.id, "stopped": await runtime.runs.stop(thread.id)}
    return {"thread_id": thread.id, "run": run, "stopped": await runtime.runs.stop(thread.id, run)}


def accepted(submitted: Submitted) -> JSONResponse:
    """The 202 of an accepted message."""
    run = submitted.run
    return JSONResponse(
        {
            "thread_id": run.thread_id,
            "run": run.seq,
            "stream_url": stream_url(run),
            "model": run.model,
            # queued: waiting for the thread (or, in worker mode, for a worker).
            "status": "started" if submitted.started else "queued",
        },
        status_code=202,
        headers={"location": stream_url(run)},
    )


def checked_message(text: str, settings: Settings) -> str:
    """A user's message, stripped: ApiError if empty, too long, or not storable."""
    message = storable(text, "message").strip()
    if not message:
        raise ApiError(422, "empty_message", "message must not be empty")
    if len(message) > settings.max_message_chars:
        raise ApiError(
            422,
            "message_too_long",
            f"message has {len(message)} characters; the limit is {settings.max_message_chars}",
        )
    return message


async def submit(request: Request, runtime: Runtime, body: ChatMessage) -> Submitted:
    """Validate a message and hand it to the run service; ApiError for what it refuses."""
    settings = runtime.settings
    message = None
    if not body.retry:
        message = checked_message(body.message or "", settings)
    model = check_model(settings, body.model)
    kind: RunKind = "regenerate" if body.retry else "edit" if body.edit_last else "message"
    if body.thread_id:
        thread = writable(await find_thread(request, runtime, body.thread_id))
    elif kind != "message" or message is None:
        what = "retry" if body.retry else "edit_last"
        raise ApiError(422, "nothing_to_retry", f"{what} needs the thread_id of a thread")
    else:
        thread = await runtime.store.create_thread(current_user(request), title_for(message))
    try:
        submitted = await runtime.runs.submit(
            thread, message=message, model=model, use_cache=body.use_cache, kind=kind
        )
    except ThreadBusy:
        raise ApiError(
            409,
            "thread_busy",
            "this thread is still answering; stop it first (POST /v1/chat/stop)",
        ) from None
    except QueueUnavailable:
        raise ApiError(
            503, "queue_unavailable", "the answer could not be handed to the workers; retry"
        ) from None
    except NothingToRetry:
        raise ApiError(
            409, "nothing_to_retry", "this thread has no message to answer again"
        ) from None
    except ThreadGone:  # deleted as the message came in
        raise ApiError(404, "thread_not_found", f"no thread {thread.id!r}") from None
    except TooManyAnswers as exc:
        if not body.thread_id:  # the thread this request made for it: nothing is kept
            await runtime.store.delete_thread(thread.id)
        raise too_many_answers(exc) from None
    return submitted


def waiter(runtime: Runtime, run: RunRecord) -> Callable[[], Awaitable[Event | None]]:
    """``ready`` for ChatEvents: wait until a queued answer's stream exists; or the last
    event of an answer that will never have one: ``error`` if it failed (its server
    restarted; in worker mode, Redis lost its task), ``cancelled`` (stopped) if it was
    dropped before its turn."""

    async def ready() -> Event | None:
        delay = 0.05
        while await runtime.transport.info(run.stream_id) is None:
            # The answer waits for its thread or for a worker, maybe in another process:
            # there is nothing to subscribe to before its stream exists.
            current = await runtime.store.get_run(run.thread_id, run.seq)
            if current is None or current.state == "dropped":
                # Dropped before its turn, or with its thread: the response may have gone
                # out already (keep-alives while it waited), so it ends as stopped.
                return run_dropped()
            if current.state == "done":
                raise StreamNotFound(run.stream_id)
            if current.state == "failed":
                return run_error(current.error or PRODUCER_LOST)
            if await runtime.runs.reservation_lost(current):
                return run_error(QUEUE_DOWN)  # worker mode: Redis lost its task
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        return None

    return ready


def settler(runtime: Runtime, run: RunRecord) -> Callable[[Event], Awaitable[None]]:
    """``on_terminal`` for ChatEvents: a reader that sees the end of a run no process
    recorded (its writer died, or no worker started it) records it, so the thread is not
    left answering."""

    async def on_terminal(event: Event) -> None:
        if run.state in ("queued", "started"):
            await runtime.runs.settle_from_reader(run, event)

    return on_terminal


async def stream_response(
    request: Request,
    runtime: Runtime,
    run: RunRecord,
    mapper: Mapper,
    *,
    format: str,
    after: str | None = None,
    prelude: list[Event] | None = None,
) -> Response:
    """The answer of ``run`` as SSE or NDJSON, its events renamed by ``mapper``."""
    try:
        events = ChatEvents(
            runtime.transport,
            run.stream_id,
            mapper,
            after=after,
            prelude=prelude,
            ready=waiter(runtime, run),
            on_terminal=settler(runtime, run),
        )
    except ResumableStreamError as exc:
        return await error_response(request, exc)
    return StreamResponse(
        events, request, format="sse" if format == "sse" else "ndjson", limit=runtime.streams
    )
