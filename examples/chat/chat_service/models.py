"""Chat models chosen by a spec string: "offline", "openai:gpt-4o-mini", "ollama:llama3.1", ...

Provider integrations are imported only when a spec needs them, so the example runs with none
of them installed (`pip install 'resumable-chat-example[providers]'` adds them all).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any, TypedDict

from langchain_core.language_models import BaseChatModel

from .offline_model import OfflineChatModel

ModelFactory = Callable[[str], BaseChatModel]
"""Turns a model spec into a chat model; `make_chat_model` is the default one."""

DEFAULT_MODEL = "offline"
DEFAULT_MODELS = (
    "offline",
    "openai:gpt-4o-mini",
    "anthropic:claude-3-5-haiku-latest",
    "google:gemini-2.0-flash",
    "ollama:llama3.1",
)
"""What `available_models()` lists unless `CHAT_MODELS` (comma-separated specs) says otherwise."""


class UnknownModelError(ValueError):
    """The spec is malformed or names a provider that does not exist."""


class ModelUnavailableError(RuntimeError):
    """The provider exists but its package or API key is missing."""


class ModelOption(TypedDict):
    """One entry of the model picker."""

    spec: str
    provider: str
    model: str
    available: bool
    reason: str | None


@dataclass(frozen=True)
class _Provider:
    module: str  # import path of the LangChain integration
    class_name: str
    package: str  # pip name, for error messages
    api_key_env: tuple[str, ...]  # any one of these must be set; empty: no key needed
    build: Callable[[Callable[..., BaseChatModel], str], BaseChatModel]


def _split_compatible(model: str) -> tuple[str, str]:
    """ "qwen2.5@http://host/v1" -> ("qwen2.5", "http://host/v1")."""
    match = re.fullmatch(r"(?P<model>.+?)@(?P<url>https?://.+)", model)
    if match is None:
        raise UnknownModelError(f"expected 'openai-compatible:<model>@<base_url>', got {model!r}")
    return match["model"], match["url"]


def _openai_compatible(cls: Callable[..., BaseChatModel], model: str) -> BaseChatModel:
    name, base_url = _split_compatible(model)
    api_key = os.environ.get("OPENAI_COMPATIBLE_API_KEY", "not-needed")
    return cls(model=name, base_url=base_url, api_key=api_key, stream_usage=True)


def _google(cls: Callable[..., BaseChatModel], model: str) -> BaseChatModel:
    api_key = os.environ.get("GOOGLE_API_KEY") or os.environ.get("GEMINI_API_KEY")
    return cls(model=model, google_api_key=api_key)


def _ollama(cls: Callable[..., BaseChatModel], model: str) -> BaseChatModel:
    base_url = os.environ.get("OLLAMA_BASE_URL", "http://localhost:11434")
    return cls(model=model, base_url=base_url)


PROVIDERS: dict[str, _Provider] = {
    "openai": _Provider(
        "langchain_openai",
        "ChatOpenAI",
        "langchain-openai",
        ("OPENAI_API_KEY",),
        lambda cls, model: cls(model=model, stream_usage=True),
    ),
    "anthropic": _Provider(
        "langchain_anthropic",
        "ChatAnthropic",
        "langchain-anthropic",
        ("ANTHROPIC_API_KEY",),
        lambda cls, model: cls(model=model),
    ),
    "google": _Provider(
        "langchain_google_genai",
        "ChatGoogleGenerativeAI",
        "langchain-google-genai",
        ("GOOGLE_API_KEY", "GEMINI_API_KEY"),
        _google,
    ),
    "ollama": _Provider("langchain_ollama", "ChatOllama", "langchain-ollama", (), _ollama),
    "openai-compatible": _Provider(
        "langchain_openai", "ChatOpenAI", "langchain-openai", (), _openai_compatible
    ),
}


def _parse(spec: str) -> tuple[str, str]:
    provider, sep, model = spec.strip().partition(":")
    if provider == "offline" and (not sep or model == ""):
        return "offline", "offline"
    if provider not in PROVIDERS or not model:
        known = ", ".join(["offline", *(f"{p}:<model>" for p in PROVIDERS)])
        raise UnknownModelError(f"unknown model spec {spec!r}; expected one of: {known}")
    if provider == "openai-compatible":
        _split_compatible(model)  # fail on a malformed spec even without the package installed
    return provider, model


def check_spec(spec: str) -> None:
    """Raise UnknownModelError if `spec` is malformed or names an unknown provider (whether
    its package and key are there is checked per request: they may come later)."""
    _parse(spec)


def _missing(provider: _Provider) -> str | None:
    """Why the provider cannot be used right now, or None if it can."""
    if find_spec(provider.module) is None:
        return f"needs the {provider.package!r} package (pip install {provider.package})"
    if provider.api_key_env and not any(os.environ.get(k) for k in provider.api_key_env):
        return f"set {' or '.join(provider.api_key_env)}"
    return None


def make_chat_model(spec: str = DEFAULT_MODEL, **offline_options: Any) -> BaseChatModel:
    """Build the chat model named by `spec`; `offline_options` go to `OfflineChatModel`.

    Raises:
        UnknownModelError: the spec is malformed or names an unknown provider.
        ModelUnavailableError: the provider's package or API key is missing.
    """
    provider_name, model = _parse(spec)
    if provider_name == "offline":
        return OfflineChatModel(**offline_options)
    provider = PROVIDERS[provider_name]
    if reason := _missing(provider):
        raise ModelUnavailableError(f"model {spec!r} is unavailable: {reason}")
    cls: Callable[..., BaseChatModel] = getattr(
        importlib.import_module(provider.module), provider.class_name
    )
    return provider.build(cls, model)


def available_models() -> list[ModelOption]:
    """The model picker's entries: offline first, then the others with their availability."""
    configured = os.environ.get("CHAT_MODELS")
    specs = [s.strip() for s in configured.split(",")] if configured else list(DEFAULT_MODELS)
    options: list[ModelOption] = [
        {
            "spec": "offline",
            "provider": "offline",
            "model": "offline",
            "available": True,
            "reason": None,
        }
    ]
    for spec in specs:
        provider_name, model = _parse(spec)
        if provider_name == "offline":
            continue
        reason = _missing(PROVIDERS[provider_name])
        options.append(
            {
                "spec": spec,
                "provider": provider_name,
                "model": model,
                "available": reason is None,
                "reason": reason,
            }
        )
    return options
