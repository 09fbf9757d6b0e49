"""A minimal pipelined RESP2 connection for the Redis transport's hot paths.

redis-py spends tens of microseconds per command on packing, pooling, retries and one
``await`` per reply. Here commands are packed once, written together once per event-loop
turn, and resolved in order from ``data_received`` by hiredis: any number in flight, no
task per command. Connection settings (host, port or unix path, TLS, auth, db) come from a
redis-py connection pool, so users configure Redis one way.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Iterable
from typing import Any

import hiredis

from .._exceptions import TransportClosed, TransportError

Arg = bytes | str | int


def bulk(arg: Arg) -> bytes:
    """Encode one argument as a RESP bulk string."""
    if isinstance(arg, bytes):
        data = arg
    elif isinstance(arg, str):
        data = arg.encode()
    else:
        data = b"%d" % arg
    return b"$%d\r\n%b\r\n" % (len(data), data)


def pack(args: Iterable[Arg]) -> bytes:
    """Encode one command as a RESP array of bulk strings."""
    parts = [bulk(arg) for arg in args]
    return b"*%d\r\n%b" % (len(parts), b"".join(parts))


class RespError(TransportError):
    """Redis answered a command with an error reply."""


class _Protocol(asyncio.Protocol):
    def __init__(self, connection: RespConnection) -> None:
        self._connection = connection

    def data_received(self, data: bytes) -> None:
        self._connection._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection._lost(exc)


class RespConnection:
    """One connection, opened on first use; many tasks may send on it at once (pipelined)."""

    def __init__(self, settings: dict[str, Any], ssl_context: ssl.SSLContext | None) -> None:
        self._settings = settings
        self._ssl = ssl_context
        self._transport: asyncio.Transport | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._outgoing: list[bytes] = []
        self._reader = hiredis.Reader()
        self._closed = False

    def submit(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue a packed command; the future gets its reply (a ``hiredis.ReplyError``
        for an error reply). Commands queued in one event-loop turn go out in one write."""
        if self._closed:
            raise TransportClosed("the Redis transport is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._outgoing and self._transport is not None:
            loop.call_soon(self._flush)
        self._outgoing.append(packed)
        self._pending.append(future)
        if self._transport is None and self._connecting is None:
            self._connecting = loop.create_task(self._open(), name="rstream redis connect")
        return future

    async def send(self, packed: bytes) -> Any:
        """Send a packed command and return its reply; error replies raise RespError."""
        reply = await self.submit(packed)
        if isinstance(reply, hiredis.ReplyError):
            raise RespError(str(reply))
        return reply

    def _flush(self) -> None:
        if self._transport is not None and self._outgoing:
            data, self._outgoing = b"".join(self._outgoing), []
            self._transport.write(data)

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self._settings
        try:
            async with asyncio.timeout(settings.get("socket_connect_timeout") or 10.0):
                if settings.get("path"):
                    transport, _ = await loop.create_unix_connection(
                        lambda: _Protocol(self), settings["path"]
                    )
                else:
                    transport, _ = await loop.create_connection(
                        lambda: _Protocol(self),
                        settings.get("host", "localhost"),
                        settings.get("port", 6379),
                        ssl=self._ssl,
                    )
        except (OSError, TimeoutError) as exc:
            self._connecting = None
            self._fail(TransportError(f"cannot connect to Redis: {exc}"))
            return
        self._connecting = None
        self._reader = hiredis.Reader()
        self._transport = transport
        # The set-up goes ahead of the commands that waited for the connection.
        setup = []
        if settings.get("password"):
            credentials = [settings.get("username"), settings["password"]]
            setup.append(pack(("AUTH", *[c for c in credentials if c])))
        if settings.get("db"):
            setup.append(pack(("SELECT", settings["db"])))
        setup.append(pack(("CLIENT", "SETNAME", settings.get("client_name") or "resumable_stream")))
        checks = [loop.create_future() for _ in setup]
        self._pending.extendleft(reversed(checks))
        self._outgoing[:0] = setup
        self._flush()
        for check in checks:
            reply = await check
            if isinstance(reply, hiredis.ReplyError):
                transport.close()
                self._fail(TransportError(f"Redis refused the connection set-up: {reply}"))
                return

    def _received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while (reply := reader.gets()) is not False:
            future = pending.popleft()
            if not future.done():
                future.set_result(reply)

    def _lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(TransportError(f"Redis connection lost: {exc or 'closed by the server'}"))

    def _fail(self, error: TransportError) -> None:
        self._outgoing.clear()
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        """Drop the connection; calls still waiting fail with :class:`TransportError`."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._transport is not None:
            self._transport.abort()
        self._fail(TransportClosed("the Redis transport is closed"))


def settings_of(pool: Any) -> tuple[dict[str, Any], ssl.SSLContext | None]:
    """Connection settings (and TLS context) of a redis-py connection pool."""
    kwargs = dict(pool.connection_kwargs)
    context = None
    if "ssl" in pool.connection_class.__name__.lower():
        context = pool.connection_class(**kwargs).ssl_context.get()
    return kwargs, context
