"""FastAPI dependencies shared by the routers: the runtime, the caller's thread."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..auth import current_user
from ..models import available_models
from ..runtime import Runtime
from ..settings import Settings
from ..threads import Thread, is_thread_id
from .errors import ApiError


def get_runtime(request: Request) -> Runtime:
    """What the process opened at start (runtime.py)."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def find_thread(request: Request, runtime: Runtime, thread_id: str) -> Thread:
    """The caller's thread, or 404: another user's thread is not found, not forbidden."""
    thread = None
    if is_thread_id(thread_id):
        thread = await runtime.store.get_thread(thread_id)
    if thread is None or thread.owner != current_user(request):
        raise ApiError(404, "thread_not_found", f"no thread {thread_id!r}")
    return thread


async def owned_thread(request: Request, runtime: RuntimeDep, thread_id: str) -> Thread:
    """The ``thread_id`` of the query or the path, if it is the caller's."""
    return await find_thread(request, runtime, thread_id)


OwnedThread = Annotated[Thread, Depends(owned_thread)]


def writable(thread: Thread) -> Thread:
    if thread.archived:
        raise ApiError(409, "thread_archived", "this thread is archived: it is read-only")
    return thread


def check_model(settings: Settings, spec: str | None) -> str:
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
