"""The chat service's HTTP API and UI: ``create_app(settings)``, and ``app`` for uvicorn.

    uvicorn chat_service.app:app        # or: python -m chat_service

Answers run in the background (runs.py) and are read from their streams with the library's
``StreamResponse``: ``GET /v1/chat/stream`` as SSE that resumes with ``Last-Event-ID``,
``POST /chat/stream`` as NDJSON. Every error is JSON ``{"code": ..., "message": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from resumable_stream import (
    Event,
    InvalidOffset,
    ResumableStreamError,
    StreamNotFound,
    __version__,
    parse_offset,
)
from resumable_stream.starlette import StreamResponse, error_response, resume_after

from .auth import SessionMiddleware, current_user
from .events import ChatEvents, Mapper, to_ndjson, to_sse
from .metrics import metrics_router
from .models import available_models
from .protocols import add_client_protocols
from .runs import NothingToRetry, Submitted, ThreadBusy
from .runtime import Runtime, open_runtime
from .settings import Settings
from .threads import RunRecord, Thread

logger = logging.getLogger("chat_service")

STATIC_DIR = Path(__file__).parent / "static"
_THREAD_ID = re.compile(r"[0-9a-f]{32}")
TITLE_CHARS = 60


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error response: ``status`` and ``{"code": ..., "message": ...}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, **extra}, status_code=status)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)  # registered for ApiError only
    return _error(exc.status, exc.code, exc.message)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"][1:]) or "body"
    return _error(422, "invalid_request", f"{where}: {first['msg']}", errors=errors)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
    return _error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))


class BodyLimit:
    """413 for request bodies over ``limit`` bytes, before anything parses them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _error(
            413,
            "payload_too_large",
            f"request body over {self.limit} bytes; messages are limited to "
            f"{(self.limit - 4096) // 4} characters",
        )
        await response(scope, receive, send)


# --------------------------------------------------------------------------- request bodies


class ChatMessage(BaseModel):
    message: str | None = Field(default=None, description="The user's message.")
    thread_id: str | None = Field(default=None, description="Omit to start a new thread.")
    model: str | None = Field(default=None, description="A model spec from GET /info.")
    use_cache: bool = Field(default=False, description="Replay a cached answer if any.")
    retry: bool = Field(default=False, description="Answer the last question again.")


class Rename(BaseModel):
    chat_name: str = Field(min_length=1, max_length=200)


# --------------------------------------------------------------------------- views


def message_view(message: Any) -> dict[str, Any] | None:
    """A checkpointed message as the API shows it."""
    text = str(message.text)
    if isinstance(message, HumanMessage):
        return {"id": message.id, "role": "user", "text": text}
    if isinstance(message, AIMessage):
        return {
            "id": message.id,
            "role": "assistant",
            "text": text,
            "tool_calls": [
                {"id": c.get("id"), "name": c["name"], "args": c.get("args", {})}
                for c in message.tool_calls
            ],
            "stopped": bool(message.response_metadata.get("stopped")),
        }
    if isinstance(message, ToolMessage):
        return {
            "id": message.id,
            "role": "tool",
            "name": message.name,
            "tool_call_id": message.tool_call_id,
            "status": message.status,
            "text": text[:2000],
        }
    if isinstance(message, SystemMessage):
        return {"id": message.id, "role": "summary", "text": text}
    return None


def thread_view(thread: Thread) -> dict[str, Any]:
    return {
        "thread_id": thread.id,
        "title": thread.title,
        "archived": thread.archived,
        "created_at": thread.created_at,
        "updated_at": thread.updated_at,
    }


def stream_url(run: RunRecord) -> str:
    return f"/v1/chat/stream?thread_id={run.thread_id}&run={run.seq}"


def title_for(message: str) -> str:
    line = " ".join(message.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


# --------------------------------------------------------------------------- the app


def create_app(settings: Settings | None = None) -> FastAPI:
    """The chat service; storage and model come from ``settings`` (default: environment)."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_runtime(settings, role="api") as runtime:
            app.state.runtime = runtime
            yield

    app = FastAPI(
        title="resumable_stream reference chat",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
    )
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ResumableStreamError, error_response)

    app.add_middleware(SessionMiddleware, secret=settings.session_secret())
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.cors_origins:
        # Credentials (the session cookie) only ever go with an explicit list of origins:
        # with "*", browsers would send no cookie anyway, and echoing any origin with
        # credentials would let every site act as the user.
        wildcard = settings.cors_origins == ("*",)
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_credentials=not wildcard,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            # The LangGraph SDKs rejoin a run through these (protocols.py).
            expose_headers=["Content-Location", "Location"],
        )

    _routes(app, settings)
    add_client_protocols(app)  # /api/chat (AI SDK) and /langgraph (LangGraph SDK)
    app.include_router(metrics_router())  # GET /metrics (Prometheus)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _owned_thread(request: Request, thread_id: str) -> Thread:
    """The caller's thread, or 404: another user's thread is not found, not forbidden."""
    thread = None
    if _THREAD_ID.fullmatch(thread_id):
        thread = await _runtime(request).store.get_thread(thread_id)
    if thread is None or thread.owner != current_user(request):
        raise ApiError(404, "thread_not_found", f"no thread {thread_id!r}")
    return thread


def _writable(thread: Thread) -> None:
    if thread.archived:
        raise ApiError(409, "thread_archived", "this thread is archived: it is read-only")


def _check_model(settings: Settings, spec: str | None) -> str:
    spec = (spec or settings.chat_model).strip()
    if spec == settings.chat_model:
        return spec
    options = {option["spec"]: option for option in available_models()}
    option = options.get(spec)
    if option is None:
        raise ApiError(422, "unknown_model", f"unknown model {spec!r}; GET /info lists the models")
    if not option["available"]:
        reason = option["reason"]
        raise ApiError(422, "model_unavailable", f"model {spec!r} is unavailable: {reason}")
    return spec


async def _submit(request: Request, body: ChatMessage) -> Submitted:
    runtime = _runtime(request)
    settings = runtime.settings
    message = None
    if not body.retry:
        message = (body.message or "").strip()
        if not message:
            raise ApiError(422, "empty_message", "message must not be empty")
        if len(message) > settings.max_message_chars:
            raise ApiError(
                422,
                "message_too_long",
                f"message has {len(message)} characters; the limit is {settings.max_message_chars}",
            )
    model = _check_model(settings, body.model)
    if body.thread_id:
        thread = await _owned_thread(request, body.thread_id)
        _writable(thread)
    elif message is None:
        raise ApiError(422, "nothing_to_retry", "retry needs the thread_id of a thread")
    else:
        thread = await runtime.store.create_thread(current_user(request), title_for(message))
    try:
        submitted = await runtime.runs.submit(
            thread, message=message, model=model, use_cache=body.use_cache
        )
    except ThreadBusy:
        raise ApiError(
            409,
            "thread_busy",
            "this thread is still answering; stop it first (POST /v1/chat/stop)",
        ) from None
    except NothingToRetry:
        raise ApiError(409, "nothing_to_retry", "this thread has no question to retry") from None
    return submitted


def _waiter(runtime: Runtime, run: RunRecord) -> Callable[[], Awaitable[None]]:
    """``ready`` for ChatEvents: wait until a queued answer's stream exists."""

    async def ready() -> None:
        delay = 0.05
        while await runtime.transport.info(run.stream_id) is None:
            # The answer waits for its thread or for a worker, maybe in another process:
            # there is nothing to subscribe to before its stream exists.
            current = await runtime.store.get_run(run.thread_id, run.seq)
            if current is None or current.state in ("done", "dropped"):
                raise StreamNotFound(run.stream_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    return ready


async def _stream_response(
    request: Request,
    run: RunRecord,
    mapper: Mapper,
    *,
    format: str,
    after: str | None = None,
    prelude: list[Event] | None = None,
) -> Response:
    runtime = _runtime(request)
    try:
        events = ChatEvents(
            runtime.transport,
            run.stream_id,
            mapper,
            after=after,
            prelude=prelude,
            ready=_waiter(runtime, run),
        )
    except ResumableStreamError as exc:
        return await error_response(request, exc)
    return StreamResponse(events, request, format="sse" if format == "sse" else "ndjson")


def _routes(app: FastAPI, settings: Settings) -> None:
    # ----------------------------------------------------------------------- chat API (v1)

    @app.post("/v1/chat/message", status_code=202, tags=["chat"])
    async def post_message(request: Request, body: ChatMessage) -> JSONResponse:
        """Start answering in the background; read the answer at ``stream_url``."""
        submitted = await _submit(request, body)
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

    @app.get("/v1/chat/stream", tags=["chat"], response_class=Response)
    async def get_stream(
        request: Request,
        thread_id: str,
        run: Annotated[int | None, Query(description="Answer number (default: current)")] = None,
    ) -> Response:
        """The answer as SSE (``chunk``, ``tool_call``, ``system``); resumes after
        ``Last-Event-ID``; 204 when the thread has no active or recent answer."""
        runtime = _runtime(request)
        await _owned_thread(request, thread_id)
        if run is None:
            record = await runtime.store.current_run(thread_id)
        else:
            record = await runtime.store.get_run(thread_id, run)
        if record is None or record.state == "dropped":
            return Response(status_code=204, headers={"cache-control": "no-store"})
        after = resume_after(request)
        if after is not None and run is None:
            # An offset of an earlier answer: the thread has moved on; send the current one.
            info = await runtime.transport.info(record.stream_id)
            with contextlib.suppress(InvalidOffset):
                if info is not None and parse_offset(after).epoch != info.epoch:
                    after = None
        return await _stream_response(request, record, to_sse, format="sse", after=after)

    @app.post("/v1/chat/stop", tags=["chat"])
    async def stop(request: Request, thread_id: str) -> dict[str, Any]:
        """Stop the answer in flight (and drop queued messages)."""
        await _owned_thread(request, thread_id)
        stopped = await _runtime(request).runs.stop(thread_id)
        return {"thread_id": thread_id, "stopped": stopped}

    @app.get("/v1/thread", tags=["threads"])
    async def get_thread(request: Request, thread_id: str) -> dict[str, Any]:
        """The thread's messages; ``active_run`` is the answer in flight, if any."""
        thread = await _owned_thread(request, thread_id)
        return await _history(request, thread)

    @app.delete("/v1/thread", tags=["threads"])
    async def delete_thread(request: Request, thread_id: str) -> dict[str, Any]:
        """Delete the thread, its checkpoints and its answers (stopping a live one first)."""
        await _owned_thread(request, thread_id)
        await _runtime(request).runs.forget(thread_id, delete_thread=True)
        return {"thread_id": thread_id, "deleted": True}

    @app.patch("/v1/thread", tags=["threads"])
    async def rename_thread(request: Request, thread_id: str, body: Rename) -> dict[str, Any]:
        thread = await _owned_thread(request, thread_id)
        _writable(thread)
        title = " ".join(body.chat_name.split())
        await _runtime(request).store.update_thread(thread_id, title=title)
        return {"thread_id": thread_id, "title": title}

    @app.get("/v1/threads", tags=["threads"])
    async def list_threads(request: Request, archived: bool = False) -> dict[str, Any]:
        """The caller's threads, most recently active first."""
        threads = await _runtime(request).store.list_threads(
            current_user(request), archived=archived
        )
        return {"threads": [thread_view(t) for t in threads]}

    # ----------------------------------------------------------------------- compatibility

    @app.post("/chat/stream", tags=["compat"], response_class=Response)
    async def chat_stream(request: Request, body: ChatMessage) -> Response:
        """Send a message and read its answer in the same response, as NDJSON."""
        run = (await _submit(request, body)).run
        metadata = Event(
            "metadata",
            {"thread_id": run.thread_id, "run": run.seq, "stream_url": stream_url(run)},
            "",
        )
        return await _stream_response(request, run, to_ndjson, format="ndjson", prelude=[metadata])

    @app.get("/threads/{thread_id}/history", tags=["compat"])
    async def thread_history(request: Request, thread_id: str) -> dict[str, Any]:
        thread = await _owned_thread(request, thread_id)
        return await _history(request, thread)

    @app.delete("/threads/{thread_id}", tags=["compat"])
    async def delete_thread_compat(request: Request, thread_id: str) -> dict[str, Any]:
        return await delete_thread(request, thread_id)

    @app.put("/threads/{thread_id}/clear", tags=["compat"])
    async def clear_thread(request: Request, thread_id: str) -> dict[str, Any]:
        """Empty the thread: its messages, checkpoints and answers go; the thread stays."""
        thread = await _owned_thread(request, thread_id)
        _writable(thread)
        await _runtime(request).runs.forget(thread_id, delete_thread=False)
        return {"thread_id": thread_id, "cleared": True}

    @app.put("/threads/{thread_id}/archive", tags=["compat"])
    async def archive_thread(request: Request, thread_id: str) -> dict[str, Any]:
        """Archive: the thread leaves the list (``GET /v1/threads?archived=true`` shows it)
        and becomes read-only; an answer in flight is stopped."""
        await _owned_thread(request, thread_id)
        runtime = _runtime(request)
        await runtime.runs.stop(thread_id)
        await runtime.store.update_thread(thread_id, archived=True)
        return {"thread_id": thread_id, "archived": True}

    @app.get("/info", tags=["service"])
    async def info(request: Request) -> dict[str, Any]:
        runtime = _runtime(request)
        return {
            "service": "resumable_stream reference chat",
            "resumable_stream": __version__,
            "transport": "redis" if settings.redis_url else "memory",
            "database": "postgresql" if settings.uses_postgres else "sqlite",
            "worker_mode": settings.worker_mode,
            "busy_policy": settings.busy_policy,
            "default_model": settings.chat_model,
            "models": available_models(),
            "cache_ttl": settings.cache_ttl,
            "max_message_chars": settings.max_message_chars,
            "summarize_after_tokens": settings.summarize_after_tokens,
            "offline_tokens_per_second": settings.offline_tokens_per_second,
            "stats": dict(runtime.runs.stats),
        }

    @app.get("/health", tags=["service"])
    async def health(request: Request) -> Response:
        runtime = _runtime(request)
        checks: dict[str, str] = {}
        for name, check in (
            ("streams", runtime.transport.info("health-check")),
            ("database", runtime.store.ping()),
        ):
            try:
                async with asyncio.timeout(2.0):
                    await check
                checks[name] = "ok"
            except Exception as exc:
                checks[name] = f"failed: {exc!r}"
        healthy = all(value == "ok" for value in checks.values())
        return JSONResponse(
            {"status": "ok" if healthy else "unavailable", "checks": checks},
            status_code=200 if healthy else 503,
        )

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})


async def _history(request: Request, thread: Thread) -> dict[str, Any]:
    runtime = _runtime(request)
    state = await runtime.agent.aget_state({"configurable": {"thread_id": thread.id}})
    messages = list(state.values.get("messages", []))
    pending = []
    for run in await runtime.store.runs(thread.id, "started", "queued"):
        if run.state == "started":
            info = await runtime.transport.info(run.stream_id)
            if info is None or info.status != "running":
                continue  # its stream has ended: the answer is in the checkpoint
        pending.append(run)
    active = pending[0] if pending else None
    if active is not None and active.human_id is not None:
        # The answer in flight is read from its stream: cut the history after its question,
        # so that a client replaying the stream shows nothing twice.
        ids = [m.id for m in messages]
        if active.human_id in ids:
            messages = messages[: ids.index(active.human_id) + 1]
    views = [v for v in (message_view(m) for m in messages) if v is not None]
    return {
        **thread_view(thread),
        "messages": views,
        "active_run": None
        if active is None
        else {
            "run": active.seq,
            "status": "running" if active.state == "started" else "queued",
            "stream_url": stream_url(active),
            "message": active.message,
            "human_id": active.human_id,
        },
        "queued": [{"run": r.seq, "message": r.message} for r in pending[1:]],
    }


def __getattr__(name: str) -> Any:
    # `uvicorn chat_service.app:app`: the app is made on first access, from the environment,
    # so that importing this module has no side effects.
    if name == "app":
        created = create_app()
        globals()["app"] = created
        return created
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
