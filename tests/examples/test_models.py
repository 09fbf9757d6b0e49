"""Model specs: parsing, lazy provider imports, the model picker."""

from __future__ import annotations

import pytest
from chat_service import models
from chat_service.models import (
    ModelUnavailableError,
    UnknownModelError,
    available_models,
    make_chat_model,
)
from chat_service.offline_model import OfflineChatModel


def test_offline_spec_builds_the_offline_model_with_options() -> None:
    model = make_chat_model("offline", tokens_per_second=0)
    assert isinstance(model, OfflineChatModel)
    assert model.tokens_per_second == 0


@pytest.mark.parametrize("spec", ["gpt-4o", "mistral:large", "openai:", "offline:big"])
def test_unknown_spec_names_the_providers_that_exist(spec: str) -> None:
    with pytest.raises(UnknownModelError, match=r"offline, openai:<model>, anthropic:<model>"):
        make_chat_model(spec)


def test_missing_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "find_spec", lambda name: None)
    with pytest.raises(ModelUnavailableError, match="pip install langchain-anthropic"):
        make_chat_model("anthropic:claude-3-5-haiku-latest")


def test_missing_api_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "find_spec", lambda name: object())
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    with pytest.raises(ModelUnavailableError, match="set GOOGLE_API_KEY or GEMINI_API_KEY"):
        make_chat_model("google:gemini-2.0-flash")


def test_openai_compatible_spec_needs_a_base_url() -> None:
    with pytest.raises(UnknownModelError, match="<model>@<base_url>"):
        make_chat_model("openai-compatible:llama3")


def test_openai_compatible_spec_passes_model_and_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    built: dict[str, object] = {}

    class FakeChatOpenAI:
        def __init__(self, **kwargs: object) -> None:
            built.update(kwargs)

    module = type("langchain_openai", (), {"ChatOpenAI": FakeChatOpenAI})
    monkeypatch.setattr(models, "find_spec", lambda name: object())
    monkeypatch.setattr(models.importlib, "import_module", lambda name: module)
    monkeypatch.delenv("OPENAI_COMPATIBLE_API_KEY", raising=False)
    make_chat_model("openai-compatible:qwen2.5@http://localhost:8000/v1")

    assert built["model"] == "qwen2.5"
    assert built["base_url"] == "http://localhost:8000/v1"


def test_model_picker_lists_offline_first_and_says_why_others_are_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHAT_MODELS", "openai:gpt-4o-mini, ollama:llama3.1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setattr(models, "find_spec", lambda name: object())

    assert available_models() == [
        {
            "spec": "offline",
            "provider": "offline",
            "model": "offline",
            "available": True,
            "reason": None,
        },
        {
            "spec": "openai:gpt-4o-mini",
            "provider": "openai",
            "model": "gpt-4o-mini",
            "available": True,
            "reason": None,
        },
        {
            "spec": "ollama:llama3.1",
            "provider": "ollama",
            "model": "llama3.1",
            "available": True,
            "reason": None,
        },
    ]
    monkeypatch.delenv("OPENAI_API_KEY")
    assert available_models()[1]["reason"] == "set OPENAI_API_KEY"
