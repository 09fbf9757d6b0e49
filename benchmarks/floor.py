"""The floors of scenarios 2b and 3: what one Redis command per token costs a minimal client.

A paced run through :class:`MinimalRedis` does what a design that stores each token in
Redis before handing it on must do per token, and nothing else: one ``XADD`` per token on
one pipelined connection (hiredis packs and parses; an ``asyncio.Protocol`` reads), the
readers fed as each reply is parsed, and the library's write policy at its default
interval (at most one socket write per ``write_interval``: the next event-loop turn, or
two turns after ``write_interval`` has passed since the last write). No entries,
offsets, leases, fencing, retries, expiries but one per stream, or consumer API. Its CPU
per token, minus the pass-through's, is the least such a design spends at that write
interval, on the machine and event loop of the run; a longer interval shares writes
among more commands and lowers it (and the library's figure), at the cost of latency.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import hiredis

from resumable_stream._constants import DEFAULT_WRITE_INTERVAL

from .library import _Log, _PassThrough


def _pack(*args: bytes | str) -> bytes:
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # any length
    return packed


class Connection(asyncio.Protocol):
    """One pipelined connection: commands queued in one turn leave in one write, at most
    one write per ``write_interval``; each reply goes to its command's callback."""

    def __init__(self, write_interval: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader()
        self.callbacks: collections.deque[Callable[[Any], None]] = collections.deque()
        self.outgoing: list[bytes] = []
        self.flushing = False
        self.flushed_at = 0.0
        self.write_interval = write_interval
        self.transport: asyncio.Transport | None = None
        self.lost: hiredis.ReplyError | None = None

    @classmethod
    async def open(cls, redis_url: str) -> tuple[Connection, asyncio.Transport]:
        """Connect to the benchmark's own redis-server (``redis://host:port/0``: no
        password, no TLS, database 0)."""
        url = urllib.parse.urlsplit(redis_url)
        if url.scheme != "redis" or url.password or url.path not in ("", "/", "/0"):
            raise ValueError(f"the floor needs a plain redis://host:port/0 URL: {redis_url}")
        loop = asyncio.get_running_loop()
        host, port = url.hostname or "127.0.0.1", url.port or 6379
        transport, connection = await loop.create_connection(
            functools.partial(cls, DEFAULT_WRITE_INTERVAL), host, port
        )
        return connection, transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not derive from asyncio.Transport: no isinstance check.)
        self.transport = cast(asyncio.Transport, transport)

    def send(self, packed: bytes, on_reply: Callable[[Any], None]) -> None:
        if self.lost is not None:  # gone: answered at once, as the commands it owed were
            self.loop.call_soon(on_reply, self.lost)
            return
        self.outgoing.append(packed)
        self.callbacks.append(on_reply)
        if not self.flushing:
            self.flushing = True
            due = self.flushed_at + self.write_interval
            if due > self.loop.time():
                # Written two turns after the timer, as the library's pipe does: with the
                # commands of the tasks the same wake-up woke.
                self.loop.call_at(due, self.loop.call_soon, self.loop.call_soon, self.flush)
            else:
                self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flushing = False
        self.flushed_at = self.loop.time()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(self.outgoing)  # closing: connection_lost answers
        self.outgoing = []

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        gets, pop = self.reader.gets, self.callbacks.popleft
        while (reply := gets()) is not False:
            pop()(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        # Every command owed, and every one sent from now on, gets an error for its reply:
        # its token is counted lost (its reader ends short) and its stream still ends,
        # rather than waiting forever.
        error = self.lost = hiredis.ReplyError(f"connection lost: {exc!r}")
        while self.callbacks:
            self.callbacks.popleft()(error)


class MinimalRedis(_PassThrough):
    """The pass-through, with each token stored by an ``XADD`` before readers get it."""

    def __init__(self, connection: Connection) -> None:
        super().__init__()
        self.connection = connection

    @classmethod
    async def connect(cls, redis_url: str) -> tuple[MinimalRedis, asyncio.Transport]:
        connection, transport = await Connection.open(redis_url)
        return cls(connection), transport

    async def start(self, key: str, source: AsyncIterator[str]) -> None:
        log = self.logs[key] = _Log()

        def stored(item: str, reply: Any) -> None:
            if isinstance(reply, hiredis.ReplyError):
                return  # the token is lost: its readers end short (the row counts them)
            log.items.append(item)
            log.notify()

        def end(reply: Any) -> None:
            log.done = True
            log.notify()

        self.tasks[key] = asyncio.create_task(store(self.connection, key, source, stored, end))


async def store(
    connection: Connection,
    key: str,
    source: AsyncIterator[str],
    stored: Callable[[str, Any], None],
    end: Callable[[Any], None],
) -> None:
    """``XADD`` each item of ``source`` to ``key``, then ``EXPIRE`` it; ``stored(item,
    reply)`` as each reply is parsed, ``end(reply)`` after the last; return after that."""
    send = connection.send
    name = key.encode()
    async for item in source:
        send(_pack(b"XADD", name, b"*", b"t", item), functools.partial(stored, item))
    ended = asyncio.get_running_loop().create_future()

    def last(reply: Any) -> None:
        end(reply)
        if not ended.done():  # cancelled: the row was stopped
            ended.set_result(None)

    send(_pack(b"EXPIRE", name, b"60"), last)
    await ended
