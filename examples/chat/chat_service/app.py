"""The chat service's HTTP API and UI: ``create_app(settings)``, and ``app`` for uvicorn.

    uvicorn chat_service.app:app --timeout-keep-alive 75    # or: python -m chat_service

Answers run in the background (runs.py) and are read from their streams with the library's
``StreamResponse``: ``GET /v1/chat/stream`` as SSE that resumes with ``Last-Event-ID``,
``POST /chat/stream`` as NDJSON. Every error is JSON ``{"code": ..., "message": ...}``.
The routes live in ``api/``, one router per API family.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from resumable_stream import __version__

from .api import chat, compat, service, threads
from .api.errors import BodyLimit, install_error_handlers
from .api.service import STATIC_DIR, UiFiles
from .auth import SessionMiddleware
from .metrics import metrics_router
from .protocols import add_client_protocols
from .runtime import open_runtime
from .settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """The chat service; storage and model come from ``settings`` (default: environment)."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_runtime(settings, role="api") as runtime:
            app.state.runtime = runtime
            yield

    app = FastAPI(title="resumable_stream reference chat", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    _add_middleware(app, settings)
    for router in (chat.router, threads.router, compat.router, service.router):
        app.include_router(router)
    add_client_protocols(app)  # /api/chat (AI SDK) and /langgraph (LangGraph SDK)
    app.include_router(metrics_router())  # GET /metrics (Prometheus)
    app.mount("/static", UiFiles(directory=STATIC_DIR), name="static")
    return app


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    trusted = () if settings.cors_origins == ("*",) else settings.cors_origins
    app.add_middleware(SessionMiddleware, secret=settings.session_secret(), trusted_origins=trusted)
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


def __getattr__(name: str) -> Any:
    # `uvicorn chat_service.app:app`: the app is made on first access, from the environment,
    # so that importing this module has no side effects.
    if name == "app":
        created = create_app()
        globals()["app"] = created
        return created
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
