"""Agent layer of the resumable_stream reference chat service.

The HTTP app, UI and CLI import from here; nothing in this package knows about HTTP.
"""

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
