"""Make `examples/chat` importable; fast (unpaced) models; chat service processes."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CHAT_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "chat"
if str(CHAT_EXAMPLE) not in sys.path:
    sys.path.insert(0, str(CHAT_EXAMPLE))

from chat_service import OfflineChatModel, make_chat_model  # noqa: E402
from chat_service.models import ModelFactory  # noqa: E402

from tests.examples._chat import ChatServer, servers  # noqa: E402


@pytest.fixture
def model() -> OfflineChatModel:
    """The offline model streaming as fast as possible."""
    return OfflineChatModel(tokens_per_second=0)


@pytest.fixture
def model_factory() -> ModelFactory:
    """`make_chat_model` with the offline model unpaced."""
    return lambda spec: make_chat_model(spec, tokens_per_second=0)


# --- the chat service, as real processes ---------------------------------------------------


@pytest.fixture
def chat_servers(tmp_path: Path) -> Iterator[Callable[..., ChatServer]]:
    """Start `python -m chat_service` processes: `chat_servers(**env)` for an API server,
    `chat_servers("worker", **env)` for a worker. They share DATA_DIR (the SQLite file and
    secret) unless `env` says otherwise, and are all stopped when the test ends."""
    with servers(tmp_path) as make:

        def start(*command: str, **env: str) -> ChatServer:
            env.setdefault("DATA_DIR", str(tmp_path / "data"))
            return make(*command, **env)

        yield start


def redis_postgres_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """REDIS_URL and DATABASE_URL of the session's services, and a Redis key prefix of the
    caller's own."""
    return {
        "REDIS_URL": str(request.getfixturevalue("redis_url")),
        "DATABASE_URL": str(request.getfixturevalue("postgres_dsn")),
        "REDIS_PREFIX": f"chat{uuid.uuid4().hex[:8]}",
    }


@pytest.fixture(
    scope="module",
    params=[
        "embedded",
        pytest.param("redis+postgres", marks=[pytest.mark.redis, pytest.mark.postgres]),
    ],
)
def chat_backend(request: pytest.FixtureRequest) -> dict[str, str]:
    """The service's storage: embedded defaults (memory streams, SQLite), then Redis +
    PostgreSQL. Tests using it run once on each."""
    if request.param == "embedded":
        return {}
    return redis_postgres_env(request)
