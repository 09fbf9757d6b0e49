"""Scenario 2b's floor: what one Redis write per token costs a minimal client.

A paced run through :class:`MinimalRedis` does what any Redis-backed design must do per
token and nothing else: one ``XADD`` per token on one pipelined connection (hiredis packs
and parses; an ``asyncio.Protocol`` reads), the readers fed as each reply is parsed, and
the library's write policy (at most one socket write per ``write_interval``: the next
event-loop turn, or ``write_interval`` after the last write). No entries, offsets, leases,
fencing, retries, expiries but one per stream, or consumer API: its CPU per token, minus
the pass-through's, is the lowest library CPU per token any design with a Redis write per
token reaches on this machine, on this event loop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

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

    @classmethod
    async def open(cls, port: int) -> tuple[Connection, asyncio.Transport]:
        loop = asyncio.get_running_loop()
        transport, connection = await loop.create_connection(
            functools.partial(cls, DEFAULT_WRITE_INTERVAL), "127.0.0.1", port
        )
        return connection, transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, packed: bytes, on_reply: Callable[[Any], None]) -> None:
        self.outgoing.append(packed)
        self.callbacks.append(on_reply)
        if not self.flushing:
            self.flushing = True
            due = self.flushed_at + self.write_interval
            if due > self.loop.time():
                self.loop.call_at(due, self.flush)
            else:
                self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flushing = False
        self.flushed_at = self.loop.time()
        assert self.transport is not None
        self.transport.writelines(self.outgoing)
        self.outgoing = []

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        gets, pop = self.reader.gets, self.callbacks.popleft
        while (reply := gets()) is not False:
            pop()(reply)


class MinimalRedis(_PassThrough):
    """The pass-through, with each token stored by an ``XADD`` before readers get it."""

    def __init__(self, connection: Connection) -> None:
        super().__init__()
        self.connection = connection
        self.errors: list[hiredis.ReplyError] = []

    @classmethod
    async def connect(cls, port: int) -> tuple[MinimalRedis, asyncio.Transport]:
        connection, transport = await Connection.open(port)
        return cls(connection), transport

    async def start(self, key: str, source: AsyncIterator[str]) -> None:
        log = self.logs[key] = _Log()

        def stored(item: str, reply: Any) -> None:
            if isinstance(reply, hiredis.ReplyError):
                self.errors.append(reply)  # the token is lost: its readers end short
                return
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
        ended.set_result(None)

    send(_pack(b"EXPIRE", name, b"60"), last)
    await ended
