"""Agent layer of the resumable_stream reference chat service.

The HTTP app and the workers import from here; nothing in this package knows about HTTP.
The names below load on first use, so that the terminal client (``chat_service.cli``),
which only speaks HTTP, starts without importing LangChain and LangGraph.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent import build_agent
    from .checkpoint import open_checkpointer
    from .models import (
        ModelOption,
        ModelUnavailableError,
        UnknownModelError,
        available_models,
        make_chat_model,
    )
    from .offline_model import OfflineChatModel
    from .tools import TOOLS, calculator, current_time, web_search

_HOMES = {
    "build_agent": "agent",
    "open_checkpointer": "checkpoint",
    "ModelOption": "models",
    "ModelUnavailableError": "models",
    "UnknownModelError": "models",
    "available_models": "models",
    "make_chat_model": "models",
    "OfflineChatModel": "offline_model",
    "TOOLS": "tools",
    "calculator": "tools",
    "current_time": "tools",
    "web_search": "tools",
}

__all__ = [
    "ModelOption",
    "ModelUnavailableError",
    "OfflineChatModel",
    "TOOLS",
    "UnknownModelError",
    "available_models",
    "build_agent",
    "calculator",
    "current_time",
    "make_chat_model",
    "open_checkpointer",
    "web_search",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # (looked up once)
    return value
