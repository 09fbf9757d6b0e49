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
        self._connection._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection._lost(self, exc)


class RespConnection:
    """One connection, opened on first use; many tasks may send on it at once (pipelined).

    ``timeout``: seconds the server may stay silent while replies are owed before the
    connection is dropped (its calls then fail with :class:`TransportError`).
    """

    def __init__(
        self, settings: dict[str, Any], ssl_context: ssl.SSLContext | None, timeout: float
    ) -> None:
        self._settings = settings
        self._ssl = ssl_context
        self._timeout = timeout
        self._protocol: _Protocol | None = None
        self._transport: asyncio.Transport | None = None  # set once the set-up succeeded
        self._connecting: asyncio.Task[None] | None = None
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._outgoing: list[bytes] = []
        self._reader = hiredis.Reader()
        self._progress = 0.0  # when a reply last came, or the first owed one was sent
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    def submit(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue a packed command; the future gets its reply (a ``hiredis.ReplyError``
        for an error reply). Commands queued in one event-loop turn go out in one write."""
        if self._closed:
            raise TransportClosed("the Redis transport is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            self._progress = loop.time()
            if self._watchdog is None:
                self._watchdog = loop.call_at(self._progress + self._timeout, self._check)
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

    def _check(self) -> None:
        # One timer per connection, re-armed from the last progress (not one per command).
        self._watchdog = None
        if not self._pending:
            return
        loop = asyncio.get_running_loop()
        due = self._progress + self._timeout
        if loop.time() < due:
            self._watchdog = loop.call_at(due, self._check)
            return
        error = TransportError(f"Redis did not answer within {self._timeout:g} s")
        self._fail(error)
        if self._protocol is not None:
            self._protocol = None
            transport, self._transport = self._transport, None
            if transport is not None:
                transport.abort()

    async def _open(self) -> None:
        try:
            await self._connect_and_set_up()
        finally:
            self._connecting = None

    async def _connect_and_set_up(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self._settings
        protocol = _Protocol(self)
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(settings.get("socket_connect_timeout") or 10.0):
                if settings.get("path"):
                    transport, _ = await loop.create_unix_connection(
                        lambda: protocol, settings["path"]
                    )
                else:
                    transport, _ = await loop.create_connection(
                        lambda: protocol,
                        settings.get("host", "localhost"),
                        settings.get("port", 6379),
                        ssl=self._ssl,
                    )
                self._protocol = protocol
                self._reader = hiredis.Reader()
                # Set up first, and wait for the answers before sending anything else: a
                # refused AUTH or SELECT must fail the waiting commands, not run them
                # elsewhere.
                required = []
                if settings.get("password"):
                    credentials = [settings.get("username"), settings["password"]]
                    required.append(pack(("AUTH", *[c for c in credentials if c])))
                if settings.get("db"):
                    required.append(pack(("SELECT", settings["db"])))
                name = settings.get("client_name") or "resumable_stream"
                setup = [
                    *required,
                    pack(("CLIENT", "SETNAME", name)),
                ]  # a courtesy; ACLs may refuse
                checks = [loop.create_future() for _ in setup]
                self._pending.extendleft(reversed(checks))
                transport.write(b"".join(setup))
                replies = [await check for check in checks]
        except (OSError, TimeoutError, TransportError) as exc:
            self._protocol = None
            if transport is not None:
                transport.abort()  # type: ignore[attr-defined]
            self._fail(TransportError(f"cannot connect to Redis: {exc}"))
            return
        refused = [r for r in replies[: len(required)] if isinstance(r, hiredis.ReplyError)]
        if refused:
            self._protocol = None
            transport.abort()
            self._fail(TransportError(f"Redis refused the connection set-up: {refused[0]}"))
            return
        self._transport = transport
        self._flush()

    def _received(self, protocol: _Protocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return  # a dropped connection's late bytes
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while (reply := reader.gets()) is not False:
            self._progress = asyncio.get_running_loop().time()
            future = pending.popleft()
            if not future.done():
                future.set_result(reply)

    def _lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
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
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._connecting is not None:
            self._connecting.cancel()
        transport, self._transport = self._transport, None
        self._protocol = None
        if transport is not None:
            transport.abort()
        self._fail(TransportClosed("the Redis transport is closed"))


def settings_of(pool: Any) -> tuple[dict[str, Any], ssl.SSLContext | None]:
    """Connection settings (and TLS context) of a redis-py connection pool."""
    kwargs = dict(pool.connection_kwargs)
    context = None
    if "ssl" in pool.connection_class.__name__.lower():
        context = pool.connection_class(**kwargs).ssl_context.get()
    return kwargs, context
