"""How the Redis transport connects: a unix socket, an ACL user. Each is checked from the
server's side (who is connected, and how), not only by a run that happens to work."""

from __future__ import annotations

import contextlib
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from resumable_stream import StreamProducer, Transport, TransportError, from_url
from tests._helpers import collect, joined, text_of, tokens
from tests._services import RedisServer


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
