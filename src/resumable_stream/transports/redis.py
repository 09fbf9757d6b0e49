"""Redis Streams transport (``redis://``, ``rediss://``, ``unix://``).

Keys of a stream share one hash tag, ``<prefix>:{<stream id>}:meta|events|lease``, so each
stream lives in one cluster slot. Every key has an expiry.

Connections per process stay constant however many streams are live: commands from all
producers and consumers are coalesced into one pipeline per round trip (at most
``pool_size`` in flight), all live readers share one blocking ``XREAD``, and cancel
requests arrive on one pub/sub connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Self

import redis.asyncio as aioredis
from redis import exceptions as rex

from .._constants import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_REDIS_POOL_SIZE,
    DEFAULT_REDIS_PREFIX,
    DEFAULT_RETENTION,
    DEFAULT_RUNNING_TTL,
    DEFAULT_TOMBSTONE,
)
from .._exceptions import LeaseLost, StreamAlreadyRunning, TransportClosed, TransportError
from . import _redis_scripts as scripts
from ._base import Entry, QueueSubscription, Status, StreamInfo, Subscription, Transport

logger = logging.getLogger("resumable_stream.redis")

_READ_BLOCK_MS = 10_000
_READ_COUNT = 1024
_RECONNECT_DELAY = 0.5
_READ_SPACING_PER_STREAM = 2e-6
_READ_SPACING_MAX = 0.002


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    """Map redis-py errors to the library's (never leak a dependency's exceptions)."""
    try:
        yield
    except rex.RedisError as exc:
        raise TransportError(f"Redis error: {exc}") from exc
    except OSError as exc:
        raise TransportError(f"Redis connection error: {exc}") from exc


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_CREATE, _APPEND, _RENEW, _CANCEL, _REAP = (
    _Script(s)
    for s in (scripts.CREATE, scripts.APPEND, scripts.RENEW, scripts.CANCEL, scripts.REAP)
)


class _Pipeliner:
    """Coalesces commands from every task into one pipeline per round trip."""

    def __init__(self, client: aioredis.Redis, workers: int) -> None:
        self._client = client
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._ready = asyncio.Event()
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        if self.closed:
            raise TransportClosed("the Redis transport is closed")
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._work(), name="rstream redis pipeline")
                for _ in range(self._workers)
            ]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, future))
        self._ready.set()
        return future

    async def call(self, *args: Any) -> Any:
        return await self.submit(*args)

    async def _work(self) -> None:
        while not self.closed:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            batch, self._queue = self._queue, []
            try:
                results = await self._execute([args for args, _ in batch])
            except Exception as exc:  # the connection failed: every command in it fails
                error = TransportError(f"Redis error: {exc}")
                error.__cause__ = exc
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    error = TransportError(f"Redis error: {result}")
                    error.__cause__ = result
                    future.set_exception(error)
                else:
                    future.set_result(result)

    async def _execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        results = await self._run(commands)
        missing = [i for i, r in enumerate(results) if isinstance(r, rex.NoScriptError)]
        if missing:  # first use, or the server restarted: load the scripts and retry those
            pipe = self._client.pipeline(transaction=False)
            for script in (_CREATE, _APPEND, _RENEW, _CANCEL, _REAP):
                pipe.execute_command("SCRIPT", "LOAD", script.source)
            await pipe.execute()
            retried = await self._run([commands[i] for i in missing])
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        return results

    async def _run(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        return list(await pipe.execute(raise_on_error=False))

    async def aclose(self) -> None:
        self.closed = True
        self._ready.set()
        await asyncio.gather(*(_stop(task) for task in self._tasks))
        for _, future in self._queue:
            if not future.done():
                future.set_exception(TransportClosed("the Redis transport is closed"))
        self._queue.clear()


class _Feed:
    """Live entries of one stream, read by the shared XREAD and fanned out."""

    __slots__ = ("cursor", "epoch", "subscribers")

    def __init__(self, epoch: int, after: int) -> None:
        self.epoch = epoch
        self.cursor = f"{epoch}-{after}"
        self.subscribers: set[QueueSubscription] = set()


class _Reader:
    """One blocking XREAD over every subscribed stream of this process."""

    def __init__(self, transport: RedisTransport) -> None:
        self._transport = transport
        self._client = transport._dedicated_client()
        self._feeds: dict[bytes, _Feed] = {}
        # XADDing to this key wakes the blocked XREAD when the set of streams changes;
        # cursor-based, so a wake sent before the XREAD starts is not lost.
        self._wake_key = f"{transport.prefix}:reader:{uuid.uuid4().hex}".encode()
        self._wake_cursor = "0-0"
        self._wake_sent = False
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, key: bytes, epoch: int, after: int) -> Subscription:
        feed = self._feeds.get(key)
        if feed is None or feed.epoch != epoch:
            if feed is not None:
                for sub in feed.subscribers:
                    sub.push([])
            feed = self._feeds[key] = _Feed(epoch, after)
            self._changed()
        subscription = QueueSubscription(lambda sub: self._unsubscribe(key, feed, sub))
        feed.subscribers.add(subscription)
        return subscription

    def _unsubscribe(self, key: bytes, feed: _Feed, subscription: QueueSubscription) -> None:
        feed.subscribers.discard(subscription)
        if not feed.subscribers and self._feeds.get(key) is feed:
            del self._feeds[key]  # dropped from the next XREAD; no need to wake it

    def _changed(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="rstream redis reader")
        elif not self._wake_sent:
            self._wake_sent = True
            ttl = str(int(self._transport.running_ttl * 1000))
            for args in (
                ("XADD", self._wake_key, "MAXLEN", "1", "*", "w", "1"),
                ("PEXPIRE", self._wake_key, ttl),
            ):
                self._transport._pipeline.submit(*args).add_done_callback(_ignore_result)

    async def _run(self) -> None:
        clock = asyncio.get_running_loop().time
        sent_at = -_READ_SPACING_MAX
        while self._feeds:
            # An XREAD costs in proportion to the streams it names; while entries keep coming,
            # space the reads a little so that each carries many entries (docs/performance.md).
            spacing = min(len(self._feeds) * _READ_SPACING_PER_STREAM, _READ_SPACING_MAX)
            delay = sent_at + spacing - clock()
            if delay > 0:
                await asyncio.sleep(delay)  # the read spacing, not a wait for state
            keys = list(self._feeds)
            cursors = [self._feeds[k].cursor for k in keys]
            self._wake_sent = False
            sent_at = clock()
            try:
                reply = await self._client.execute_command(  # type: ignore[no-untyped-call]
                    "XREAD",
                    "COUNT",
                    _READ_COUNT,
                    "BLOCK",
                    _READ_BLOCK_MS,
                    "STREAMS",
                    self._wake_key,
                    *keys,
                    self._wake_cursor,
                    *cursors,
                )
            except (rex.RedisError, OSError) as exc:
                logger.warning("stream reader: %s; reconnecting", exc)
                await asyncio.sleep(_RECONNECT_DELAY)  # backoff before reconnecting
                continue
            for key, entries in _xread_items(reply):
                if key == self._wake_key:
                    self._wake_cursor = entries[-1][0].decode()
                    continue
                feed = self._feeds.get(key)
                if feed is None or not entries:
                    continue
                feed.cursor = entries[-1][0].decode()
                batch = [_entry(entry_id, fields) for entry_id, fields in entries]
                for subscription in feed.subscribers:
                    subscription.push(batch)

    async def aclose(self) -> None:
        for feed in self._feeds.values():
            for sub in feed.subscribers:
                sub.push([])
        self._feeds.clear()
        if self._task is not None:
            await _stop(self._task)
        # The XREAD was interrupted mid-command: drop the connection, never reuse it.
        await self._client.aclose(close_connection_pool=True)


class _CancelListener:
    """One pub/sub connection delivering cancel requests to the runs of this process."""

    def __init__(self, transport: RedisTransport) -> None:
        self._transport = transport
        self._client = transport._dedicated_client()
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def wait(self, stream_id: str, epoch: int) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="rstream redis cancel listener")
        event = asyncio.Event()
        self._waiters.setdefault(stream_id, set()).add(event)
        try:
            await self._subscribed.wait()
            # A cancel requested before the subscription existed is in the metadata.
            transport = self._transport
            cancel, current = await transport._pipeline.call(
                "HMGET", transport._key(stream_id, "meta"), "cancel", "epoch"
            )
            if cancel and current == str(epoch).encode():
                return
            await event.wait()
        finally:
            waiters = self._waiters.get(stream_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[stream_id]

    async def _run(self) -> None:
        channel = self._transport._cancel_channel
        while not self._closed:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                self._subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None:
                        continue
                    stream_id = message["data"].decode()
                    for event in self._waiters.get(stream_id, ()):
                        event.set()
            except (rex.RedisError, OSError) as exc:
                logger.warning("cancel listener: %s; reconnecting", exc)
                await asyncio.sleep(_RECONNECT_DELAY)  # backoff before reconnecting
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            await _stop(self._task)
        await self._client.aclose(close_connection_pool=True)


class RedisTransport(Transport):
    """Streams stored in Redis Streams.

    Pass a URL (``RedisTransport.from_url("redis://localhost:6379/0")``) or your own
    ``redis.asyncio.Redis`` client (its pool is used for commands; the transport opens
    two more connections from the same settings, for live reads and cancel signals).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_REDIS_PREFIX,
        retention: float = DEFAULT_RETENTION,
        tombstone: float = DEFAULT_TOMBSTONE,
        running_ttl: float = DEFAULT_RUNNING_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        pool_size: int = DEFAULT_REDIS_POOL_SIZE,
        owns_client: bool = False,
    ) -> None:
        super().__init__(
            retention=retention,
            tombstone=tombstone,
            running_ttl=running_ttl,
            max_entries=max_entries,
        )
        self.client = client
        self.prefix = prefix
        self._owns_client = owns_client
        self._cancel_channel = f"{prefix}:cancel"
        self._pipeline = _Pipeliner(client, pool_size)
        self._reader: _Reader | None = None
        self._listener: _CancelListener | None = None
        self._retention_ms = str(int(retention * 1000))
        self._meta_ttl_ms = str(int((retention + tombstone) * 1000))
        self._running_ttl_ms = str(int(running_ttl * 1000))
        self._max_entries = str(max_entries)

    @classmethod
    def from_url(
        cls, url: str, *, pool_size: int = DEFAULT_REDIS_POOL_SIZE, **options: Any
    ) -> Self:
        """Connect to the Redis server at ``url``; ``options`` as for the constructor."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=None
        )
        client = aioredis.Redis(connection_pool=pool)
        return cls(client, pool_size=pool_size, owns_client=True, **options)

    def _dedicated_client(self) -> aioredis.Redis:
        pool = self.client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["socket_timeout"] = None  # blocking reads wait longer than any timeout
        kwargs.pop("protocol", None)
        dedicated = aioredis.ConnectionPool(
            connection_class=pool.connection_class, max_connections=1, **kwargs
        )
        return aioredis.Redis(connection_pool=dedicated)

    def _key(self, stream_id: str, kind: str) -> str:
        return f"{self.prefix}:{{{stream_id}}}:{kind}"

    def _keys(self, stream_id: str) -> tuple[str, str, str]:
        tag = f"{self.prefix}:{{{stream_id}}}:"
        return (tag + "meta", tag + "events", tag + "lease")

    async def _eval(self, script: _Script, stream_id: str, *args: Any) -> Any:
        return await self._pipeline.call("EVALSHA", script.sha, 3, *self._keys(stream_id), *args)

    async def create(self, stream_id: str, owner: str, lease_ms: int) -> StreamInfo:
        now_ms = int(time.time() * 1000)
        result = await self._eval(_CREATE, stream_id, owner, lease_ms, now_ms, self._running_ttl_ms)
        if result == -1:
            raise StreamAlreadyRunning(stream_id)
        epoch = int(result)
        created = now_ms / 1000
        return StreamInfo(stream_id, epoch, "running", created, created, 0, 0, lease_ms)

    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        result = await self._eval(
            _APPEND,
            stream_id,
            owner,
            entry.epoch,
            entry.seq,
            entry.payload,
            count,
            int(time.time() * 1000),
            self._max_entries,
            final or "",
            self._running_ttl_ms,
            self._retention_ms,
            self._meta_ttl_ms,
        )
        if result == -1:
            raise LeaseLost(stream_id)

    async def renew(self, stream_id: str, owner: str, lease_ms: int) -> bool:
        result = await self._eval(_RENEW, stream_id, owner, lease_ms, self._running_ttl_ms)
        if result == -1:
            raise LeaseLost(stream_id)
        return bool(result)

    async def request_cancel(self, stream_id: str) -> bool:
        return bool(await self._eval(_CANCEL, stream_id, self._cancel_channel, stream_id))

    async def wait_cancel(self, stream_id: str, epoch: int) -> None:
        if self._listener is None:
            self._listener = _CancelListener(self)
        await self._listener.wait(stream_id, epoch)

    async def info(self, stream_id: str) -> StreamInfo | None:
        fields = await self._pipeline.call("HGETALL", self._key(stream_id, "meta"))
        if not fields:
            return None
        if isinstance(next(iter(fields)), bytes):
            fields = {k.decode(): v.decode() for k, v in fields.items()}
        status: Status = fields["status"]  # written by our scripts only
        return StreamInfo(
            stream_id=stream_id,
            epoch=int(fields["epoch"]),
            status=status,
            created_at=int(fields["created"]) / 1000,
            updated_at=int(fields["updated"]) / 1000,
            last_seq=int(fields["last"]),
            last_count=int(fields["count"]),
            lease_ms=int(fields["lease_ms"]),
        )

    async def read(self, stream_id: str, epoch: int, after: int, limit: int) -> list[Entry]:
        reply = await self._pipeline.call(
            "XRANGE",
            self._key(stream_id, "events"),
            f"{epoch}-{after + 1}",
            f"{epoch}-18446744073709551615",
            "COUNT",
            limit,
        )
        return [_entry(entry_id, fields) for entry_id, fields in reply]

    def subscribe(self, stream_id: str, epoch: int, after: int) -> Subscription:
        if self._pipeline.closed:
            raise TransportClosed("the Redis transport is closed")
        if self._reader is None:
            self._reader = _Reader(self)
        return self._reader.subscribe(self._key(stream_id, "events").encode(), epoch, after)

    async def reap(self, stream_id: str, epoch: int, payload: bytes) -> bool:
        result = await self._eval(
            _REAP,
            stream_id,
            epoch,
            payload,
            int(time.time() * 1000),
            self._max_entries,
            self._retention_ms,
            self._meta_ttl_ms,
        )
        return bool(result)

    async def aclose(self) -> None:
        if self._pipeline.closed:
            return
        await self._pipeline.aclose()
        for part in (self._reader, self._listener):
            if part is not None:
                with _mapped():
                    await part.aclose()
        if self._owns_client:
            with _mapped():
                await self.client.aclose(close_connection_pool=True)


def _entry(entry_id: bytes, fields: dict[bytes, bytes] | list[bytes]) -> Entry:
    epoch, _, seq = entry_id.partition(b"-")
    payload = fields[b"e"] if isinstance(fields, dict) else fields[1]
    return Entry(int(epoch), int(seq), payload)


def _xread_items(reply: Any) -> list[tuple[bytes, list[Any]]]:
    # The reader's own connection speaks RESP2: [[key, [(id, fields), ...]], ...]
    return [(key, entries) for key, entries in reply or ()]


async def _stop(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end.

    redis-py may turn the CancelledError thrown into a command into another exception,
    which a retry loop then survives; so cancel again until the task has really ended.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()  # retrieved: a failure at shutdown is not worth a warning


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
