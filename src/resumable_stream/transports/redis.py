"""Redis Streams transport (``redis://``, ``rediss://``, ``unix://``).

Keys of a stream share one hash tag, ``<prefix>:{<stream id>}:meta|events|lease``, so each
stream lives in one cluster slot. Every key has an expiry.

Connections per process stay constant however many streams are live (three at most):
commands from every producer and consumer are pipelined on one connection (packed once,
written together each event-loop turn), all live readers share one blocking ``XREAD``,
and cancel requests arrive on one pub/sub connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from typing import Any, Self

import redis.asyncio as aioredis
from redis import exceptions as rex

from .. import telemetry
from .._constants import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_REDIS_PREFIX,
    DEFAULT_REDIS_TIMEOUT,
    DEFAULT_RETENTION,
    DEFAULT_RUNNING_TTL,
    DEFAULT_TOMBSTONE,
)
from .._exceptions import (
    ConfigurationError,
    LeaseLost,
    StorageRollback,
    StreamAlreadyRunning,
    TransportClosed,
    TransportError,
)
from . import _redis_scripts as scripts
from ._base import Entry, QueueSubscription, Status, StreamInfo, Subscription, Transport
from ._resp import RespConnection, RespError, bulk, pack, settings_of

logger = logging.getLogger("resumable_stream.redis")

_READ_BLOCK_MS = 10_000
_READ_COUNT = 1024
_RECONNECT_DELAY = 0.5
# While entries keep coming, back-to-back XREADs start at least this far apart per followed
# stream (capped), so that each read carries many entries (docs/performance.md).
_READ_SPACING_PER_STREAM = 2e-6
_READ_SPACING_MAX = 0.002
_XREAD_HEAD = b"".join(
    bulk(arg) for arg in ("XREAD", "COUNT", _READ_COUNT, "BLOCK", _READ_BLOCK_MS, "STREAMS")
)


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        #: "EVALSHA <sha> 3", packed once: every call names three keys.
        self.head = b"".join(bulk(arg) for arg in ("EVALSHA", self.sha, 3))


_CREATE = _Script(scripts.CREATE)
_APPEND = _Script(scripts.APPEND)
_RENEW = _Script(scripts.RENEW)
_CANCEL = _Script(scripts.CANCEL)
_REAP = _Script(scripts.REAP)
_DELETE = _Script(scripts.DELETE)


class _Feed:
    """Live entries of one stream, read by the shared XREAD and fanned out."""

    __slots__ = ("cursor", "epoch", "packed_key", "subscribers")

    def __init__(self, key: bytes, epoch: int, after: int) -> None:
        self.epoch = epoch
        self.cursor = b"%d-%d" % (epoch, after)
        self.packed_key = bulk(key)
        self.subscribers: set[QueueSubscription] = set()


class _Reader:
    """One blocking XREAD over every subscribed stream of this process."""

    def __init__(self, transport: RedisTransport) -> None:
        self._transport = transport
        self._connection = transport._connection(blocking_ms=_READ_BLOCK_MS)
        self._feeds: dict[bytes, _Feed] = {}
        # XADDing to this key wakes the blocked XREAD when the set of streams changes;
        # cursor-based, so a wake sent before the XREAD starts is not lost.
        self._wake_key = f"{transport.prefix}:reader:{uuid.uuid4().hex}".encode()
        self._wake_cursor = b"0-0"
        self._wake_sent = False
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, key: bytes, epoch: int, after: int) -> Subscription:
        feed = self._feeds.get(key)
        if feed is not None and feed.epoch > epoch:
            # A reader of an earlier run: it must not take the feed from the current one.
            # Woken at once, it finds the stream restarted (OffsetExpired).
            stale = QueueSubscription(lambda sub: None)
            stale.push([])
            return stale
        if feed is None or feed.epoch != epoch:
            if feed is not None:
                for sub in tuple(feed.subscribers):
                    sub.push([])
            feed = self._feeds[key] = _Feed(key, epoch, after)
            self._changed()
        subscription = QueueSubscription(lambda sub: self._unsubscribe(key, feed, sub))
        feed.subscribers.add(subscription)
        if int(feed.cursor.partition(b"-")[2]) > after:
            subscription.push([])  # the feed is past this reader: wake it to read the gap
        return subscription

    def wake(self, key: bytes) -> None:
        """Make the readers of ``key`` look at the stream's metadata again."""
        feed = self._feeds.get(key)
        for sub in tuple(feed.subscribers) if feed is not None else ():
            sub.push([])

    def _unsubscribe(self, key: bytes, feed: _Feed, subscription: QueueSubscription) -> None:
        feed.subscribers.discard(subscription)
        if not feed.subscribers and self._feeds.get(key) is feed:
            del self._feeds[key]  # dropped from the next XREAD; no need to wake it

    def _changed(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="rstream redis reader")
        elif not self._wake_sent:
            self._wake_sent = True
            ttl = int(self._transport.running_ttl * 1000)
            commands = self._transport._commands
            for args in (
                ("XADD", self._wake_key, "MAXLEN", "1", "*", "w", "1"),
                ("PEXPIRE", self._wake_key, ttl),
            ):
                commands.submit(pack(args)).add_done_callback(_ignore_result)

    def _command(self) -> bytes:
        """XREAD over the wake key and every feed (stream keys are packed once per feed)."""
        feeds = list(self._feeds.values())
        return b"*%d\r\n%b%b%b%b%b" % (
            6 + 2 * (len(feeds) + 1),
            _XREAD_HEAD,
            bulk(self._wake_key),
            b"".join(f.packed_key for f in feeds),
            bulk(self._wake_cursor),
            b"".join(bulk(f.cursor) for f in feeds),
        )

    async def _run(self) -> None:
        clock = asyncio.get_running_loop().time
        sent_at = -_READ_SPACING_MAX
        while self._feeds:
            spacing = min(len(self._feeds) * _READ_SPACING_PER_STREAM, _READ_SPACING_MAX)
            delay = sent_at + spacing - clock()
            if delay > 0:
                await asyncio.sleep(delay)  # the read spacing, not a wait for state
            self._wake_sent = False
            sent_at = clock()
            try:
                reply = await self._connection.send(self._command())
            except TransportError as exc:
                logger.warning("stream reader: %s; reconnecting", exc)
                telemetry.reconnecting("reader")
                await asyncio.sleep(_RECONNECT_DELAY)  # backoff before reconnecting
                continue
            for key, entries in reply or ():
                if key == self._wake_key:
                    self._wake_cursor = entries[-1][0]
                    continue
                feed = self._feeds.get(key)
                if feed is None or not entries:
                    continue
                feed.cursor = entries[-1][0]
                batch = [_entry(entry_id, fields) for entry_id, fields in entries]
                for subscription in tuple(feed.subscribers):
                    subscription.push(batch)

    async def aclose(self) -> None:
        for feed in self._feeds.values():
            for sub in tuple(feed.subscribers):
                sub.push([])
        self._feeds.clear()
        if self._task is not None:
            await _stop(self._task)
        self._connection.close()  # a blocked XREAD's connection is never reused


class _CancelListener:
    """One pub/sub connection delivering cancel requests to the runs of this process."""

    def __init__(self, transport: RedisTransport) -> None:
        self._transport = transport
        self._client = transport._pubsub_client()
        # Runs of this process waiting for a cancel: stream id -> {event: epoch}.
        self._waiters: dict[str, dict[asyncio.Event, int]] = {}
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def wait(self, stream_id: str, epoch: int) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="rstream redis cancel listener")
        event = asyncio.Event()
        self._waiters.setdefault(stream_id, {})[event] = epoch
        try:
            await self._subscribed.wait()
            # A cancel requested before the subscription existed is in the metadata.
            if await self._requested(stream_id, epoch):
                return
            await event.wait()
        finally:
            waiters = self._waiters.get(stream_id)
            if waiters is not None:
                waiters.pop(event, None)
                if not waiters:
                    del self._waiters[stream_id]

    async def _requested(self, stream_id: str, epoch: int) -> bool:
        transport = self._transport
        cancel, current = await transport._call(
            "HMGET", transport._key(stream_id, "meta"), "cancel", "epoch"
        )
        return bool(cancel) and current == b"%d" % epoch

    async def _recheck(self) -> None:
        """After a reconnection: the cancels published meanwhile are in the metadata."""
        for stream_id, waiters in list(self._waiters.items()):
            for event, epoch in list(waiters.items()):
                with contextlib.suppress(TransportError):
                    if await self._requested(stream_id, epoch):
                        event.set()

    async def _run(self) -> None:
        channel = self._transport._cancel_channel
        while not self._closed:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(channel)
                # Subscribed only once Redis confirms: a cancel published before that
                # would be missed, and found only by the next heartbeat.
                message = None
                while message is None or message["type"] != "subscribe":
                    message = await pubsub.get_message(timeout=None)
                if self._subscribed.is_set():
                    await self._recheck()
                self._subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None or message["type"] != "message":
                        continue
                    stream_id = message["data"].decode()
                    for event in self._waiters.get(stream_id, ()):
                        event.set()
            except (rex.RedisError, OSError) as exc:
                logger.warning("cancel listener: %s; reconnecting", exc)
                telemetry.reconnecting("cancel_listener")
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

    Pass a URL (``RedisTransport.from_url("redis://localhost:6379/0")``) or a
    ``redis.asyncio.Redis`` client: the transport opens its own connections with that
    client's settings (address, TLS, credentials, db) and leaves the client to you.
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
        owns_client: bool = False,
    ) -> None:
        super().__init__(
            retention=retention,
            tombstone=tombstone,
            running_ttl=running_ttl,
            max_entries=max_entries,
        )
        if not hasattr(client, "connection_pool"):
            raise ConfigurationError(
                f"RedisTransport needs a single-endpoint redis.asyncio.Redis client, not "
                f"{type(client).__name__}: its shared XREAD reads many streams in one command. "
                "Keys are hash-tagged per stream ({id}), ready for a cluster-aware transport."
            )
        self.client = client
        self.prefix = prefix
        self._owns_client = owns_client
        self._cancel_channel = f"{prefix}:cancel"
        self._settings = settings_of(client.connection_pool)
        self._commands = self._connection()
        self._reader: _Reader | None = None
        self._listener: _CancelListener | None = None
        self._closed = False
        self._retention_ms = int(retention * 1000)
        self._meta_ttl_ms = int((retention + tombstone) * 1000)
        self._running_ttl_ms = int(running_ttl * 1000)
        # Metadata outlives data while running too: an abandoned run, never reaped, still
        # reads as expired (OffsetExpired), not as never created (StreamNotFound).
        self._meta_running_ms = int((running_ttl + tombstone) * 1000)
        # The trailing arguments of the append and reap scripts never change: pack them once.
        constants = (max_entries, self._running_ttl_ms, self._retention_ms, self._meta_ttl_ms)
        self._append_tail = b"".join(bulk(arg) for arg in constants)
        self._keys_packed: dict[str, bytes] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Connect to the Redis server at ``url``; ``options`` as for the constructor."""
        try:
            client = aioredis.Redis.from_url(url)
        except ValueError as exc:
            raise ConfigurationError(f"invalid Redis URL {url!r}: {exc}") from exc
        return cls(client, owns_client=True, **options)

    def _connection(self, *, blocking_ms: int = 0) -> RespConnection:
        settings, ssl_context = self._settings
        timeout = settings.get("socket_timeout") or DEFAULT_REDIS_TIMEOUT
        return RespConnection(settings, ssl_context, timeout + blocking_ms / 1000)

    def _pubsub_client(self) -> aioredis.Redis:
        pool = self.client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["socket_timeout"] = None  # a subscriber waits longer than any timeout
        kwargs.pop("protocol", None)
        dedicated = aioredis.ConnectionPool(
            connection_class=pool.connection_class, max_connections=1, **kwargs
        )
        return aioredis.Redis(connection_pool=dedicated)

    def _key(self, stream_id: str, kind: str) -> str:
        return f"{self.prefix}:{{{stream_id}}}:{kind}"

    async def _call(self, *args: Any) -> Any:
        if self._closed:
            raise TransportClosed("the Redis transport is closed")
        return await self._commands.send(pack(args))

    def _packed_keys(self, stream_id: str) -> bytes:
        packed = self._keys_packed.get(stream_id)
        if packed is None:
            if len(self._keys_packed) >= 4096:
                self._keys_packed.clear()
            tag = f"{self.prefix}:{{{stream_id}}}:"
            packed = b"".join(bulk(tag + kind) for kind in ("meta", "events", "lease"))
            self._keys_packed[stream_id] = packed
        return packed

    async def _eval(
        self, script: _Script, stream_id: str, *args: Any, tail: bytes = b"", tail_count: int = 0
    ) -> Any:
        if self._closed:
            raise TransportClosed("the Redis transport is closed")
        packed = b"*%d\r\n%b%b%b%b" % (
            3 + 3 + len(args) + tail_count,
            script.head,
            self._packed_keys(stream_id),
            b"".join(bulk(arg) for arg in args),
            tail,
        )
        try:
            return await self._commands.send(packed)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # First use, or the server restarted or flushed its scripts.
            await self._commands.send(pack(("SCRIPT", "LOAD", script.source)))
            return await self._commands.send(packed)

    async def create(self, stream_id: str, owner: str, lease_ms: int) -> StreamInfo:
        now_ms = int(time.time() * 1000)
        result = await self._eval(
            _CREATE, stream_id, owner, lease_ms, now_ms, self._meta_running_ms
        )
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
            final or "",
            tail=self._append_tail,
            tail_count=4,
        )
        if result == -1:
            raise LeaseLost(stream_id)
        if isinstance(result, list):  # {-2, last}: entries acknowledged earlier are gone
            raise StorageRollback(stream_id, int(result[1]))

    async def renew(self, stream_id: str, owner: str, lease_ms: int) -> bool:
        result = await self._eval(
            _RENEW, stream_id, owner, lease_ms, self._running_ttl_ms, self._meta_running_ms
        )
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
        flat = await self._call("HGETALL", self._key(stream_id, "meta"))
        if not flat:
            return None
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        status: Status = fields[b"status"].decode()  # written by our scripts only
        return StreamInfo(
            stream_id=stream_id,
            epoch=int(fields[b"epoch"]),
            status=status,
            created_at=int(fields[b"created"]) / 1000,
            updated_at=int(fields[b"updated"]) / 1000,
            last_seq=int(fields[b"last"]),
            last_count=int(fields[b"count"]),
            lease_ms=int(fields[b"lease_ms"]),
        )

    async def read(self, stream_id: str, epoch: int, after: int, limit: int) -> list[Entry]:
        reply = await self._call(
            "XRANGE",
            self._key(stream_id, "events"),
            f"{epoch}-{after + 1}",
            f"{epoch}-18446744073709551615",
            "COUNT",
            limit,
        )
        return [_entry(entry_id, fields) for entry_id, fields in reply]

    def subscribe(self, stream_id: str, epoch: int, after: int) -> Subscription:
        if self._closed:
            raise TransportClosed("the Redis transport is closed")
        if self._reader is None:
            self._reader = _Reader(self)
        return self._reader.subscribe(self._key(stream_id, "events").encode(), epoch, after)

    async def delete(self, stream_id: str) -> bool:
        # Deleting the metadata fences the producer: its owner token is gone.
        deleted = bool(await self._eval(_DELETE, stream_id, self._cancel_channel, stream_id))
        if self._reader is not None:  # readers here notice at once, others when quiet
            self._reader.wake(self._key(stream_id, "events").encode())
        return deleted

    async def reap(self, stream_id: str, epoch: int, payload: bytes) -> bool:
        result = await self._eval(
            _REAP,
            stream_id,
            epoch,
            payload,
            int(time.time() * 1000),
            self.max_entries,
            self._retention_ms,
            self._meta_ttl_ms,
        )
        return bool(result)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for part in (self._reader, self._listener):
            if part is not None:
                with contextlib.suppress(rex.RedisError, OSError):
                    await part.aclose()
        self._commands.close()
        if self._owns_client:
            with contextlib.suppress(rex.RedisError, OSError):
                await self.client.aclose(close_connection_pool=True)


def _entry(entry_id: bytes, fields: list[bytes]) -> Entry:
    epoch, _, seq = entry_id.partition(b"-")
    return Entry(int(epoch), int(seq), fields[1])


async def _stop(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end.

    A library may turn the CancelledError thrown into it into another exception, which a
    retry loop then survives; so cancel again until the task has really ended.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()  # retrieved: a failure at shutdown is not worth a warning


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
