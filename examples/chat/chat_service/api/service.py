"""Service endpoints: ``/info``, ``/health`` and the UI's page."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from resumable_stream import __version__

from ..models import available_models
from .deps import RuntimeDep

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
#: The UI's Content-Security-Policy: scripts, styles, requests and images from this origin
#: only, no inline script, no plugins, no framing. The page sanitizes what a model writes
#: (static/markdown.js); should markup ever get past that, it still runs nothing and loads
#: nothing from elsewhere (an image URL can carry the conversation to a third party).
UI_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)

router = APIRouter(tags=["service"])


@router.get("/info")
async def info(runtime: RuntimeDep) -> dict[str, Any]:
    settings = runtime.settings
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
        "max_answers_per_user": settings.max_answers_per_user,
        "summarize_after_tokens": settings.summarize_after_tokens,
        "offline_tokens_per_second": settings.offline_tokens_per_second,
        "stats": dict(runtime.runs.stats),
    }


@router.get("/health")
async def health(runtime: RuntimeDep) -> Response:
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


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    headers = {"cache-control": "no-cache", "content-security-policy": UI_POLICY}
    return FileResponse(STATIC_DIR / "index.html", headers=headers)


class UiFiles(StaticFiles):
    """The UI's files, with its policy: ``/static/index.html`` is the page too."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["content-security-policy"] = UI_POLICY
        return response
