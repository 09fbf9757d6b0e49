"""Session-wide real services: redis-server (one node, Cluster, Sentinel, TLS), PostgreSQL and
Chromium.

A service that cannot be started skips the tests that need it, except under `CI=true`, where
it fails them: CI must never pass by skipping. Tests that request a service fixture get the
matching marker (`redis`, `redis_cluster`, `redis_sentinel`, `postgres`, `browser`), so
`pytest -m "not browser"` works.

The Redis Cluster and the Sentinel set-up start once per session; each test gets them healed
(paused nodes resumed, killed ones restarted, the topology agreed) and flushed.
"""

from __future__ import annotations

import contextlib
import gc
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

from resumable_stream import Transport, from_url
from resumable_stream.transports.memory import MemoryTransport
from tests._services import (
    RedisClusterService,
    RedisSentinelService,
    RedisServer,
    ServiceUnavailable,
    TlsFiles,
    chromium_executable,
    make_tls_files,
    postgres_cluster,
    start_redis_cluster,
    start_redis_sentinel,
    start_redis_server,
    unavailable,
)

_MARKERS_BY_FIXTURE = {
    "redis_server": ("redis",),
    "redis_url": ("redis",),
    "redis_unix_url": ("redis",),
    "redis_flush": ("redis",),
    "redis_server_factory": ("redis",),
    "redis_acl_user": ("redis",),
    "redis_tls": ("redis",),
    "redis_cluster": ("redis", "redis_cluster"),
    "valkey_url": ("valkey",),
    "redis_sentinel": ("redis", "redis_sentinel"),
    "postgres_dsn": ("postgres",),
    "chromium_path": ("browser",),
}

#: The transports the contract suite (tests/test_contract.py) runs on.
CONTRACT_TRANSPORTS = ("memory", "redis", "redis_cluster", "redis_sentinel", "valkey")

#: The fixture giving each Redis transport kind its URL, and the markers its tests get.
_REDIS_KINDS = {
    "redis": "redis_url",
    "redis_cluster": "redis_cluster",
    "redis_sentinel": "redis_sentinel",
    "valkey": "valkey_url",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the loop async tests run on: asyncio's own (default), or uvloop, the loop of "
        "uvicorn[standard], which the docs deploy on (scripts/test runs the core on both)",
    )


class _OnUvloop:
    """Runs every async test on uvloop (pytest-asyncio's loop factory hook)."""

    def pytest_asyncio_loop_factories(self, config: pytest.Config, item: pytest.Item) -> Any:
        import uvloop

        return {"uvloop": uvloop.new_event_loop}


def pytest_configure(config: pytest.Config) -> None:
    # (Registered only then: a hook implementation must name a loop, and the default one
    # is left to pytest-asyncio.)
    if config.getoption("--event-loop") == "uvloop":
        config.pluginmanager.register(_OnUvloop(), "resumable-stream-uvloop")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixturenames = list(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        kind = callspec.params.get("transport_kind") if callspec is not None else None
        if kind in _REDIS_KINDS:
            # The contract suite asks for the service at run time.
            fixturenames.append(_REDIS_KINDS[kind])
        markers = {m for name in fixturenames for m in _MARKERS_BY_FIXTURE.get(name, ())}
        for marker in sorted(markers):
            item.add_marker(marker)


# --- one redis-server -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's redis-server: TCP on a free port, plus a unix socket."""
    try:
        server = start_redis_server(tmp_path_factory.mktemp("redis"), unix_socket=True)
    except ServiceUnavailable as exc:
        unavailable(f"cannot start redis-server: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's redis-server, e.g. redis://127.0.0.1:PORT/0."""
    return redis_server.url


@pytest.fixture(scope="session")
def redis_unix_url(redis_server: RedisServer) -> str:
    """The same server through its unix socket: unix:///PATH/redis.sock?db=0."""
    return redis_server.unix_url


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's valkey-server (Redis' fork, same protocol), for the contract suite."""
    try:
        server = start_redis_server(tmp_path_factory.mktemp("valkey"), program="valkey-server")
    except ServiceUnavailable as exc:
        unavailable(f"cannot start valkey-server: {exc}")
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


@dataclass(frozen=True)
class AclUser:
    """A Redis ACL user made for one test; `url` logs in as it (redis://USER:PASSWORD@...)."""

    username: str
    password: str
    url: str
    rules: tuple[str, ...]


@pytest.fixture
def redis_acl_user(redis_server: RedisServer) -> Iterator[Callable[..., AclUser]]:
    """Make ACL users on the session's server: `redis_acl_user("~app:*", "+@all")` returns an
    `AclUser` with those rules (default: every key and channel, every command but the
    dangerous ones). The users are deleted when the test ends."""
    made: list[str] = []

    def make(*rules: str) -> AclUser:
        username = f"user-{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(16)
        rules = rules or ("~*", "&*", "+@all", "-@dangerous")
        with contextlib.closing(redis_server.client()) as client:
            client.execute_command(
                "ACL", "SETUSER", username, "reset", "on", f">{password}", *rules
            )
        made.append(username)
        url = f"redis://{username}:{password}@127.0.0.1:{redis_server.port}/0"
        return AclUser(username=username, password=password, url=url, rules=tuple(rules))

    yield make
    if made:
        with contextlib.closing(redis_server.client()) as client:
            client.execute_command("ACL", "DELUSER", *made)


@dataclass(frozen=True)
class TlsRedis:
    """A redis-server speaking TLS only, with a certificate from a CA made by the session."""

    server: RedisServer
    files: TlsFiles

    @property
    def url(self) -> str:
        """rediss://127.0.0.1:PORT/0?ssl_ca_certs=CA (the server certificate is checked)."""
        return self.server.url

    def open_connections(self) -> list[Any]:
        """This process's TCP connections to the server that are still open."""
        return [
            c
            for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == self.server.port
        ]


@pytest.fixture(scope="session")
def redis_tls_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """A TLS-only redis-server; clients may also present `files.client_cert` (mutual TLS)."""
    directory = tmp_path_factory.mktemp("redis-tls")
    try:
        files = make_tls_files(directory)
        server = start_redis_server(directory, tls=files)
    except ServiceUnavailable as exc:
        unavailable(f"cannot start redis-server with TLS: {exc}")
    try:
        yield TlsRedis(server=server, files=files)
    finally:
        server.stop()


@pytest.fixture
def redis_tls(redis_tls_service: TlsRedis) -> Iterator[TlsRedis]:
    """The TLS server, for one test, which must leave no connection to it open.

    Regression (issue 8): a TLS connection the Redis transport discarded was only starting
    its close_notify when the test's event loop closed, leaving its socket open (an
    occasional "unclosed" ResourceWarning, raised by the garbage collector in whichever
    test came next). Tests check ``open_connections()`` right after closing; here a
    collection makes anything dropped unclosed warn in this test (an error under the
    suite's filterwarnings).
    """
    yield redis_tls_service
    gc.collect()
    assert redis_tls_service.open_connections() == []


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


# --- Redis Cluster and Sentinel -----------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_cluster_service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisClusterService]:
    try:
        cluster = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    except ServiceUnavailable as exc:
        unavailable(f"cannot start a Redis Cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_service: RedisClusterService) -> RedisClusterService:
    """The session's Redis Cluster (3 masters, 3 replicas), healthy and flushed.

    `.url` is `redis+cluster://127.0.0.1:P1,127.0.0.1:P2`; `.migrating_slot()`,
    `.migrate_slot()`, `.failover()`, `.kill()`, `.restart()` change it mid-test (the next
    test gets it healed).
    """
    redis_cluster_service.heal()
    redis_cluster_service.flush()
    return redis_cluster_service


@pytest.fixture(scope="session")
def redis_sentinel_service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisSentinelService]:
    try:
        sentinel = start_redis_sentinel(tmp_path_factory.mktemp("redis-sentinel"))
    except ServiceUnavailable as exc:
        unavailable(f"cannot start Redis Sentinel: {exc}")
    try:
        yield sentinel
    finally:
        sentinel.stop()


@pytest.fixture
def redis_sentinel(redis_sentinel_service: RedisSentinelService) -> RedisSentinelService:
    """The session's Sentinel set-up (master, replica, 3 Sentinels), healthy and flushed.

    `.url` is `redis+sentinel://S1,S2,S3/SERVICE/0`; `.failover()`, `.kill_master()`,
    `.pause_replication()` + `.fail_over_to_lagging_replica()` change it mid-test (the next
    test gets it healed).
    """
    redis_sentinel_service.heal()
    redis_sentinel_service.flush()
    return redis_sentinel_service


# --- PostgreSQL, Chromium ------------------------------------------------------------------------


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


@pytest.fixture(params=CONTRACT_TRANSPORTS)
def transport_kind(request: pytest.FixtureRequest) -> str:
    """Every contract test runs against each transport (Redis ones: real servers)."""
    return str(request.param)


def _redis_url_of(kind: str, request: pytest.FixtureRequest) -> str:
    service = request.getfixturevalue(_REDIS_KINDS[kind])
    return service if isinstance(service, str) else str(service.url)


@pytest.fixture
async def transport_factory(
    transport_kind: str, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Transport]]:
    """Make transports of the kind under test. Redis ones share this test's key prefix,
    so they see the same streams, like two worker processes would."""
    url = _redis_url_of(transport_kind, request) if transport_kind in _REDIS_KINDS else None
    prefix = f"t{uuid.uuid4().hex[:12]}"
    made: list[Transport] = []

    def make(**options: Any) -> Transport:
        created: Transport
        if url is None:
            created = MemoryTransport(**options)
        else:
            created = from_url(url, prefix=prefix, **options)
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
