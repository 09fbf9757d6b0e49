"""How the Redis transport connects: TLS with a CA made by the test, a unix socket, an ACL
user, a redis-py credential provider. Each is checked from the server's side (who may
connect, and how), not only by a run that happens to work."""

from __future__ import annotations

import contextlib
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from redis.credentials import CredentialProvider

from resumable_stream import StreamProducer, Transport, TransportError, from_url
from resumable_stream.transports.redis import RedisTransport
from tests._helpers import collect, joined, text_of, tokens
from tests._services import RedisServer
from tests.conftest import TlsRedis


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


async def _round_trip(transport: Transport, n: int = 50) -> None:
    run = await StreamProducer(transport).start(tokens(n))
    assert joined(await collect(transport, run.stream_id)) == text_of(n)
    assert await run.wait() == "completed"


async def _clients_of(server: RedisServer, **match: str) -> list[dict[str, str]]:
    """CLIENT LIST entries whose fields equal `match` (e.g. user="alice")."""
    with contextlib.closing(server.client()) as client:
        entries = client.client_list()
    return [e for e in entries if all(e.get(k) == v for k, v in match.items())]


async def test_unix_socket(redis_unix_url: str, redis_server: RedisServer, prefix: str) -> None:
    async with from_url(redis_unix_url, prefix=prefix) as transport:
        await _round_trip(transport)
        # The stream is in the same server, reached through the socket file.
        with contextlib.closing(redis_server.client()) as client:
            assert list(client.scan_iter(match=f"{prefix}:*"))
        unix = [c for c in await _clients_of(redis_server) if c["addr"].startswith("/")]
        assert unix  # the transport's connections, not TCP ones


@dataclass(frozen=True)
class LockedServer:
    """A redis-server whose default user is off: every connection must log in as `user`."""

    server: RedisServer
    username: str
    password: str

    @property
    def url(self) -> str:
        return f"redis://{self.username}:{self.password}@127.0.0.1:{self.server.port}/0"


@pytest.fixture
def locked_server(redis_server_factory: Callable[..., RedisServer], prefix: str) -> LockedServer:
    server = redis_server_factory()
    username, password = "app", secrets.token_urlsafe(16)
    rules = [f"~{prefix}:*", "&*", "+@all", "-@dangerous"]  # its own keys only
    with contextlib.closing(server.client()) as client:
        client.execute_command("ACL", "SETUSER", username, "on", f">{password}", *rules)
        client.execute_command("ACL", "SETUSER", "default", "off")
    return LockedServer(server, username, password)


async def test_acl_user_limited_to_the_prefix(locked_server: LockedServer, prefix: str) -> None:
    async with from_url(locked_server.url, prefix=prefix) as transport:
        await _round_trip(transport)


async def test_acl_user_with_a_wrong_password_fails_with_a_transport_error(
    locked_server: LockedServer, prefix: str
) -> None:
    wrong = locked_server.url.replace(locked_server.password, "wrong")
    async with from_url(wrong, prefix=prefix) as transport:
        with pytest.raises(TransportError):
            await StreamProducer(transport).start(tokens(1))


class CountingProvider(CredentialProvider):
    """Hands out credentials (as a vault or an IAM token source would) and counts asks."""

    def __init__(self, username: str, password: str) -> None:
        self.username, self.password = username, password
        self.calls = 0

    def get_credentials(self) -> tuple[str, str]:
        self.calls += 1
        return self.username, self.password

    async def get_credentials_async(self) -> tuple[str, str]:
        return self.get_credentials()


async def test_credential_provider_on_the_users_client(
    locked_server: LockedServer, prefix: str
) -> None:
    provider = CountingProvider(locked_server.username, locked_server.password)
    client = aioredis.Redis(
        host="127.0.0.1", port=locked_server.server.port, credential_provider=provider
    )
    try:
        # Every connection of the transport (commands, live reads, cancels) must log in
        # through the provider: the default user is off.
        async with RedisTransport(client, prefix=prefix) as transport:
            await _round_trip(transport)
        assert provider.calls >= 1
    finally:
        await client.aclose()


async def test_a_credential_provider_handing_out_a_wrong_password_fails_calls(
    locked_server: LockedServer, prefix: str
) -> None:
    provider = CountingProvider(locked_server.username, "wrong")
    client = aioredis.Redis(
        host="127.0.0.1", port=locked_server.server.port, credential_provider=provider
    )
    try:
        async with RedisTransport(client, prefix=prefix) as transport:
            with pytest.raises(TransportError):
                await StreamProducer(transport).start(tokens(1))
        assert provider.calls >= 1
    finally:
        await client.aclose()


async def test_tls_with_an_unknown_ca_fails_with_a_transport_error(
    redis_tls: TlsRedis, prefix: str
) -> None:
    url = f"rediss://127.0.0.1:{redis_tls.server.port}/0"  # the system CAs: test CA unknown
    async with from_url(url, prefix=prefix) as transport:
        with pytest.raises(TransportError):
            await StreamProducer(transport).start(tokens(1))
