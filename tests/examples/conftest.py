"""Make `examples/chat` importable and share fast (unpaced) models with its tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

CHAT_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "chat"
if str(CHAT_EXAMPLE) not in sys.path:
    sys.path.insert(0, str(CHAT_EXAMPLE))

from chat_service import OfflineChatModel, make_chat_model  # noqa: E402
from chat_service.models import ModelFactory  # noqa: E402


@pytest.fixture
def model() -> OfflineChatModel:
    """The offline model streaming as fast as possible."""
    return OfflineChatModel(tokens_per_second=0)


@pytest.fixture
def model_factory() -> ModelFactory:
    """`make_chat_model` with the offline model unpaced."""
    return lambda spec: make_chat_model(spec, tokens_per_second=0)
