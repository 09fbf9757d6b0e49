"""Session-wide real services: redis-server, PostgreSQL and Chromium.

A service that cannot be started skips the tests that need it, except under `CI=true`, where
it fails them: CI must never pass by skipping. Tests that request a service fixture get the
matching marker (`redis`, `postgres`, `browser`), so `pytest -m "not browser"` works.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest

from resumable_stream import Transport
from resumable_stream.transports.memory import MemoryTransport
from resumable_stream.transports.redis import RedisTransport
from tests._services import (
    RedisServer,
    ServiceUnavailable,
    chromium_executable,
    postgres_cluster,
    start_redis_server,
    unavailable,
)

_MARKERS_BY_FIXTURE = {
    "redis_url": "redis",
    "redis_flush": "redis",
    "redis_server_factory": "redis",
    "postgres_dsn": "postgres",
    "chromium_path": "browser",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixturenames = getattr(item, "fixturenames", ())
        markers = {_MARKERS_BY_FIXTURE.get(name) for name in fixturenames} - {None}
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("transport_kind") == "redis":
            markers.add("redis")  # the contract suite asks for redis_url at run time
        for marker in sorted(markers):
            item.add_marker(marker)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a redis-server started for this test session, e.g. redis://127.0.0.1:PORT/0."""
    try:
        server = start_redis_server(tmp_path_factory.mktemp("redis"))
    except ServiceUnavailable as exc:
        unavailable(f"cannot start redis-server: {exc}")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_flush(redis_url: str) -> str:
    """The session's Redis URL, emptied with FLUSHALL before the test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_url


@pytest.fixture
def redis_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RedisServer]]:
    """Start extra, independent redis-servers that a test may kill or restart.

    `redis_server_factory(extra_args=("--appendonly", "yes"))` returns a started
    `RedisServer`; every server it made is stopped when the test ends.
    """
    with contextlib.ExitStack() as stack:

        def start(extra_args: Sequence[str] = ()) -> RedisServer:
            directory = tmp_path_factory.mktemp("redis-extra")
            try:
                server = start_redis_server(directory, extra_args=extra_args)
            except ServiceUnavailable as exc:
                unavailable(f"cannot start redis-server: {exc}")
            stack.callback(server.stop)
            return server

        yield start


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """DSN of an empty database in a throwaway PostgreSQL cluster made for this session."""
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(postgres_cluster())
        except ServiceUnavailable as exc:
            unavailable(f"cannot start PostgreSQL: {exc}")
        yield cluster.dsn


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Path of Debian's Chromium, checked to run; use with `tests._services.launch_chromium`."""
    try:
        return chromium_executable()
    except ServiceUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture(params=["memory", "redis"])
def transport_kind(request: pytest.FixtureRequest) -> str:
    """Every contract test runs against each transport (Redis: the real server)."""
    return str(request.param)


@pytest.fixture
async def transport_factory(
    transport_kind: str, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Transport]]:
    """Make transports of the kind under test. Redis ones share this test's key prefix,
    so they see the same streams, like two worker processes would."""
    url = request.getfixturevalue("redis_url") if transport_kind == "redis" else None
    prefix = f"t{uuid.uuid4().hex[:12]}"
    made: list[Transport] = []

    def make(**options: Any) -> Transport:
        created: Transport
        if url is None:
            created = MemoryTransport(**options)
        else:
            created = RedisTransport.from_url(url, prefix=prefix, **options)
        made.append(created)
        return created

    yield make
    for created in made:
        await created.aclose()


@pytest.fixture
def transport(transport_factory: Callable[..., Transport]) -> Transport:
    return transport_factory()


@pytest.fixture
def peer_transport(
    transport_kind: str, transport: Transport, transport_factory: Callable[..., Transport]
) -> Transport:
    """A second handle on the same storage: another process's transport for Redis, the
    same object for memory (which cannot be shared across processes)."""
    return transport if transport_kind == "memory" else transport_factory()
