"""Redis Streams transport: one node, Redis Cluster or Sentinel.

Keys of a stream share one hash tag, ``<prefix>:{<stream id>}:meta|events|lease``, so each
stream lives in one cluster slot, and so do its shard channels ``...:n`` (a notice per
write) and ``...:c`` (cancel requests). Every key has an expiry.

Connections per process stay constant however many streams are live: two per Redis
master. Commands of every producer and consumer are pipelined on one connection
(:class:`~._redis_pipe.Pipe`); live readers and cancel watchers share one sharded pub/sub
connection (:class:`~._redis_pipe.Subscriber`). Live delivery is by notice: the append
script ``SPUBLISH``es the entry's id on the stream's channel, with the entry itself when it
is small (``NOTICE_PAYLOAD_MAX``), and each process hands it to all its readers of the
stream. A notice without the entry, or one that shows a gap (notices missed while
reconnecting), makes the process fetch with one non-blocking ``XRANGE`` for all the
stream's readers here (one in flight per stream; notices arriving meanwhile are coalesced
into one more).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any, Self
from urllib.parse import unquote, urlsplit

try:
    import redis.asyncio as aioredis
    from redis import exceptions as rex
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.connection import AbstractConnection, parse_url
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.cluster import PRIMARY
    from redis.crc import key_slot
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Redis transport needs redis-py and hiredis: pip install 'resumable-llm-stream[redis]'"
    ) from exc

from .._constants import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_REDIS_PREFIX,
    DEFAULT_REDIS_TIMEOUT,
    DEFAULT_RETENTION,
    DEFAULT_RUNNING_TTL,
    DEFAULT_TOMBSTONE,
    DEFAULT_WRITE_INTERVAL,
    MAX_DURATION,
)
from .._exceptions import (
    BackendRefused,
    ConfigurationError,
    LeaseLost,
    StorageRollback,
    StreamAlreadyRunning,
    TransportClosed,
    TransportError,
)
from .._recent import Recent
from . import _redis_scripts as scripts
from ._base import (
    Entry,
    QueueSubscription,
    Status,
    StreamInfo,
    Subscription,
    Transport,
    resolver,
)
from ._redis_pipe import (
    ConnectionFactory,
    NoAnswer,
    Pipe,
    Subscriber,
    describe,
    error_code,
    fault,
    pack,
    stop,
    to_the_end,
)

logger = logging.getLogger("resumable_stream.redis")

#: Seconds a producer keeps retrying a write that fails for a transient reason (a
#: failover in progress). A Sentinel failover takes ``down-after-milliseconds`` plus a
#: few seconds of election; 30 s covers the usual 5-10 s settings with room to spare.
DEFAULT_WRITE_RETRY_BUDGET = 30.0
#: Entries one live fetch asks for; a full page is followed by another fetch at once.
_FETCH_COUNT = 1024
#: Seconds between attempts to read a cluster's slot map that failed.
_ROUTE_RETRY = 0.5
# How long the slot map is read again while it names a master that failed (a failover
# takes the cluster's node timeout, 15 s by default, and an election).
_DOWN_RECHECK_FOR = 60.0
#: Seconds between two checks of which server the Sentinels name the master (while
#: connected to one). After a planned failover (SENTINEL FAILOVER) the old master takes
#: writes until the Sentinels turn it into a replica, up to 10 s later, which loses them.
_SENTINEL_CHECK = 1.0
#: Redirections (MOVED, ASK, NOSCRIPT) one command may follow before failing.
_MAX_REDIRECTS = 5
#: Seconds before a command Redis Cluster answered TRYAGAIN is sent again (doubling up to
#: _TRYAGAIN_DELAY_MAX); it is, for as long as a reply would be waited for.
_TRYAGAIN_DELAY = 0.02
_TRYAGAIN_DELAY_MAX = 0.5
#: The streams whose key names (and run command heads) are cached: those used in the last
#: minute, at most 16,384 a generation (see Recent). A cache holds about 0.5 KB a stream:
#: one kept for every stream a long-running server ever touched held 34 MB per process.
_CACHED_STREAMS = 16_384
_CACHE_PERIOD = 60.0
_META_FIELDS = ("epoch", "status", "created", "updated", "last", "count", "lease_ms")
#: What a script published, (channel, message) pairs, for :meth:`RedisTransport._relay`.
_Published = tuple[tuple[bytes, bytes], ...]


async def _master_of(sentinel: Any, service: str) -> Any:
    """One Sentinel's state of ``service``'s master, within ``_SENTINEL_CHECK`` seconds.

    Its command is made here, once this runs: made for ``wait_for`` up front, it was never
    awaited when the watch was stopped before ``gather`` started it (a RuntimeWarning).
    """
    async with asyncio.timeout(_SENTINEL_CHECK):
        return await sentinel.sentinel_master(service)


async def _newest_master(manager: Any, service: str) -> tuple[str, int] | None:
    """The master of ``service`` in the Sentinels' newest configuration (the highest
    config-epoch): for a moment after a failover, some of them still name the old one."""
    sentinels = list(manager.sentinels)
    answers = await asyncio.gather(
        *(_master_of(s, service) for s in sentinels), return_exceptions=True
    )
    newest: tuple[int, dict[str, Any]] | None = None
    for state in answers:
        if not isinstance(state, dict):
            continue  # the Sentinel did not answer (in time), or does not know the service
        try:
            epoch = int(state["config-epoch"]) if manager.check_master_state(state, service) else -1
        except Exception:  # an answer of an unexpected shape
            epoch = -1
        if epoch >= 0 and (newest is None or epoch > newest[0]):
            newest = (epoch, state)
    if newest is None:
        return None
    # (redis-py's own look-up, as a connection opens, takes the first Sentinel's answer,
    # and may still find the old master for a moment: the next check leaves it again. Its
    # list of Sentinels is not reordered here: a look-up under way swaps in it too.)
    state = newest[1]
    return (getattr(manager, "_force_master_ip", None) or state["ip"], state["port"])


class _Script:
    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.load = pack("SCRIPT", "LOAD", source)

    def what(self, error: BaseException) -> str:
        """What an error reply of this script refused, for its message: Redis names only
        the script's SHA1 and the line ("... script: <sha>, on @user_script:12."), not
        the command it refused (a permission the ACL user lacks, a write out of memory)."""
        line = _SCRIPT_LINE.search(str(error))
        lines = self.source.splitlines()
        if line is None or not 0 < int(line[1]) <= len(lines):
            return f"the {self.name} script"
        commands = "/".join(dict.fromkeys(_CALLED.findall(lines[int(line[1]) - 1])))
        return f"the {self.name} script's {commands or 'command'} (line {line[1]})"


_SCRIPT_LINE = re.compile(r"@user_script:(\d+)")
_CALLED = re.compile(r"redis\.p?call\(\s*'([A-Za-z]+)'")
_CREATE = _Script("create", scripts.CREATE)
_APPEND = _Script("append", scripts.APPEND)
_RENEW = _Script("renew", scripts.RENEW)
_CANCEL = _Script("cancel", scripts.CANCEL)
_REAP = _Script("reap", scripts.REAP)
_DELETE = _Script("delete", scripts.DELETE)
_HOLD = _Script("hold", scripts.HOLD)
_RELEASE = _Script("release", scripts.RELEASE)
_READ = _Script("read", scripts.READ)


class _Node:
    """One Redis master: a pipelined command connection and a sharded subscriber."""

    def __init__(self, transport: RedisTransport, name: str, make: ConnectionFactory) -> None:
        self.name = name
        self.pipe = Pipe(
            make,
            timeout=transport._timeout,
            name=f"commands {name}",
            write_interval=transport.write_interval,
            on_connect=transport._connected,
            setup_timeout=transport._setup_timeout,
        )
        self.subscriber = Subscriber(
            make,
            name=f"notices {name}",
            timeout=transport._timeout,
            on_message=transport._on_message,
            on_subscribed=transport._on_subscribed,
            on_moved=transport._on_moved,
            on_fault=transport._refresh_topology,
            on_connect=transport._connected,
        )

    async def aclose(self) -> None:
        await to_the_end(self.subscriber.aclose, self.pipe.aclose)


class _Feed:
    """The live entries of one stream followed in this process, fanned out to readers."""

    __slots__ = (
        "channel", "checking", "cursor", "epoch", "fetching", "gone", "key", "loading",
        "local", "refetch", "subscribers", "transport",
    )  # fmt: skip

    def __init__(
        self, transport: RedisTransport, key: bytes, channel: bytes, epoch: int, after: int
    ) -> None:
        self.transport = transport
        self.key = key
        self.channel = channel
        self.epoch = epoch
        self.cursor = after  # seq of the last entry delivered
        self.fetching = False
        self.refetch = False
        self.loading = False  # a SCRIPT LOAD for the fetch is under way
        # Fed by this process's own appends (the run is written here), not subscribed.
        self.local = False
        # The next fetch also reads the run's epoch: the run may have been deleted or
        # replaced before the feed followed its notices (no notice will come of it).
        self.checking = True
        # The run was deleted or replaced: readers joining the feed look at the stream.
        self.gone = False
        self.subscribers: set[QueueSubscription] = set()

    def wake(self, *, gone: bool = False) -> None:
        """Make the readers look at the stream's metadata (and storage) again; ``gone``:
        the run was deleted or replaced, so the readers who join later look too."""
        self.gone = self.gone or gone
        for subscription in tuple(self.subscribers):
            subscription.push([])

    def release(self, subscription: QueueSubscription) -> None:
        """A reader's subscription closed (a bound method: no closure per reader)."""
        self.transport._unsubscribe(self, subscription)


class _Post:
    """A run's entry posted by :meth:`RedisTransport.append_soon`, answered by the pipe's
    reply parser through :meth:`answer`: one object per run, its bound method made once
    (kept with the run's command head), not a ``functools.partial`` and a hop per entry
    (issue 11). One entry at a time: the producer posts the next once the last is
    answered (another one posted meanwhile gets a ``_Post`` of its own).
    """

    __slots__ = ("channel", "done", "entry", "transport")

    def __init__(self, transport: RedisTransport, channel: bytes) -> None:
        self.transport = transport
        self.channel = channel
        self.entry: Entry | None = None  # posted, unanswered
        self.done: Callable[[bool], None] | None = None

    def answer(self, reply: Any) -> None:
        # Anything but "stored" (an error reply such as NOSCRIPT, fenced, a rollback, a
        # fault) goes to append(), which handles it.
        entry, done = self.entry, self.done
        self.entry = self.done = None
        if entry is None or done is None:  # pragma: no cover - answered once (Pipe.post)
            return
        stored = reply == 1 or reply == 0  # stored now, or already
        if stored and self.transport._writing:
            self.transport._appended_here(self.channel, entry, None)
        done(stored)


class _CancelWaiter:
    """One run's cancel watch: ``on_cancel(None)`` is called once, on a notice or a
    metadata check showing its epoch cancelled, or ``on_cancel(error)`` if a check
    fails."""

    __slots__ = ("channel", "epoch", "fired", "on_cancel", "on_close", "stream_id", "transport")

    def __init__(
        self,
        transport: RedisTransport,
        stream_id: str,
        epoch: int,
        on_cancel: Callable[[Exception | None], None],
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.transport = transport
        self.channel = transport._key(stream_id, "c").encode()
        self.stream_id = stream_id
        self.epoch = epoch
        self.on_cancel = on_cancel
        self.on_close = on_close  # the transport closed: no cancel will come
        self.fired = False

    def fire(self, error: Exception | None = None) -> None:
        if not self.fired:
            self.fired = True
            self.on_cancel(error)

    def unwatch(self) -> None:
        self.fired = True
        self.transport._unwatch(self)

    def check(self, cancel: bytes | None, epoch: bytes | None) -> None:
        """The metadata's ``cancel`` and ``epoch`` fields: fire if they cancel this run,
        or show it deleted or replaced (a notice of that published before the watch was
        subscribed is lost; the run could not write anyway)."""
        if epoch != b"%d" % self.epoch or cancel:
            self.fire()


class RedisTransport(Transport):
    """Streams stored in Redis Streams, on one node, a Redis Cluster or behind Sentinel.

    Pass a URL (:meth:`from_url`) or a redis-py asyncio client: ``redis.asyncio.Redis``
    (also one from ``Sentinel(...).master_for(...)``) or ``redis.asyncio.RedisCluster``.
    The transport opens its own connections with the client's settings (address, TLS,
    credentials or credential provider, RESP version, db, client name, Sentinel master
    look-up) and leaves the client to you.

    ``write_retry_budget``: seconds a producer keeps retrying a write that fails for a transient
    reason (a failover in progress), separate from the lease; see
    :data:`DEFAULT_WRITE_RETRY_BUDGET`. Producers read it as :attr:`write_retry_budget`.

    ``replicas``: with N > 0, each append waits until N replicas hold the entry (``WAIT N
    replica_timeout``) before readers may see it, so a failover to a replica never takes
    back an event a reader received. An entry not acknowledged in time raises
    :class:`TransportError` (the producer retries it). Costs a round trip to the replicas
    per write and a read per live entry; see docs/transports.md.

    ``write_interval``: least seconds between two writes on a connection; the commands
    queued meanwhile (every run's appends, every reader's reads) go out together, two
    event-loop turns after the interval has passed (with those of the tasks woken at the
    same time). A command whose reply someone awaits (a read, a run's start) goes out at the
    next event-loop turn when Redis owes no reply. Each write wakes Redis and each batch of
    replies wakes this process, which costs more CPU than the commands themselves: see
    :data:`DEFAULT_WRITE_INTERVAL` and docs/performance.md. ``0`` writes once per event-loop
    turn (lowest latency). On asyncio's own loop, whose ``epoll`` sleeps whole milliseconds,
    a write put off by less waits about 1 ms when nothing else wakes the loop (at 10,000
    tokens/s, a p99 of 2 ms at the default against 1.1-1.4 ms at ``0``, for 4-5 µs more CPU
    per token). On uvloop, whose clock and timers count whole milliseconds, the timer of an
    interval below 1 ms fires at the next turn (the write goes two turns later), and
    longer intervals are kept only roughly.
    """

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        prefix: str = DEFAULT_REDIS_PREFIX,
        retention: float = DEFAULT_RETENTION,
        tombstone: float = DEFAULT_TOMBSTONE,
        running_ttl: float = DEFAULT_RUNNING_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        write_retry_budget: float = DEFAULT_WRITE_RETRY_BUDGET,
        replicas: int = 0,
        replica_timeout: float = 1.0,
        write_interval: float = DEFAULT_WRITE_INTERVAL,
        owns_client: bool = False,
    ) -> None:
        super().__init__(
            retention=retention,
            tombstone=tombstone,
            running_ttl=running_ttl,
            max_entries=max_entries,
        )
        if write_retry_budget < 0:
            raise ConfigurationError("write_retry_budget must be >= 0 seconds")
        if not 0 <= write_interval <= 0.1:
            raise ConfigurationError("write_interval must be 0-0.1 seconds")
        if replicas < 0 or not 0 < replica_timeout <= MAX_DURATION:
            raise ConfigurationError(
                f"replicas must be >= 0, and replica_timeout must be > 0 and at most "
                f"{MAX_DURATION:g} seconds (not {replica_timeout!r})"
            )
        if not prefix or "{" in prefix or "}" in prefix:
            # Keys are hash-tagged by the stream id: a brace in the prefix would move the tag.
            raise ConfigurationError(f"invalid key prefix {prefix!r}: non-empty, no braces")
        self.client = client
        self.prefix = prefix
        self.write_retry_budget = write_retry_budget
        self.replicas = replicas
        self.write_interval = write_interval
        self._wait = pack("WAIT", replicas, max(1, int(replica_timeout * 1000)))
        self._owns_client = owns_client
        self._cluster: RedisCluster | None = None
        self._single: _Node | None = None
        # Behind Sentinel: its client and the master's name, and the task that checks
        # which server they name the master while connected (_watch_sentinels).
        self._sentinels: tuple[Any, str] | None = None
        self._sentinel_watch: asyncio.Task[None] | None = None
        self._nodes: dict[str, _Node] = {}
        self._setup_timeout: float | None = None  # (the default: _timeout)
        # A durable append's WAIT holds its reply up to replica_timeout: not silence.
        waits = replica_timeout if replicas else 0.0
        if isinstance(client, RedisCluster):
            self._cluster = client
            self._timeout = _timeout_of(client.get_connection_kwargs()) + waits
        elif isinstance(client, aioredis.Redis):
            pool = client.connection_pool
            make = getattr(pool, "make_connection", None)
            if make is None or not hasattr(pool, "connection_kwargs"):
                raise ConfigurationError(
                    f"RedisTransport cannot open connections from a {type(pool).__name__}: "
                    "use a redis.asyncio ConnectionPool (the default), a Sentinel client "
                    "(Sentinel.master_for) or a RedisCluster"
                )
            if getattr(pool, "is_master", True) is False:
                raise ConfigurationError(
                    "RedisTransport writes: give it Sentinel.master_for(...), not slave_for(...)"
                )
            try:
                probe = make()  # checks the options now, not at the first command
            except (rex.RedisError, TypeError, ValueError) as exc:
                raise ConfigurationError(f"invalid Redis connection settings: {exc}") from exc
            self._timeout = (probe.socket_timeout or DEFAULT_REDIS_TIMEOUT) + waits
            manager = getattr(pool, "sentinel_manager", None)
            service = getattr(pool, "service_name", None)
            if manager is not None and isinstance(service, str):
                self._sentinels = (manager, service)
                # Each (re)connection asks the Sentinels for the master, in turn: a silent
                # one is given up on after its own time-outs, then the next is asked.
                self._setup_timeout = self._timeout + sum(
                    _lookup_timeout(sentinel) for sentinel in getattr(manager, "sentinels", ())
                )
            self._single = _Node(self, "redis", make)
        else:
            raise ConfigurationError(
                f"RedisTransport needs a redis.asyncio.Redis or RedisCluster client, not "
                f"{type(client).__module__}.{type(client).__name__}"
            )
        self._ready = self._cluster is None
        self._init_lock = asyncio.Lock()
        self._closed = False
        # A subclass's own append() is what it expects to be called: no fast path then.
        self._own_append = type(self).append is RedisTransport.append
        self._retention_ms = int(retention * 1000)
        self._meta_ttl_ms = int((retention + tombstone) * 1000)
        self._running_ttl_ms = int(running_ttl * 1000)
        # Metadata outlives data while running too, by the tombstone: an abandoned run,
        # never reaped, still reads as expired (OffsetExpired), not as never created
        # (StreamNotFound), also when its lease (a reservation's) outlasts running_ttl.
        self._tombstone_ms = int(tombstone * 1000)
        # The metadata expiry of a run its producer makes again (the storage lost it whole).
        self._restored_ttl_ms = self._running_ttl_ms + self._tombstone_ms
        # The append command's last arguments, packed once (see _append_command): the
        # final status (none, or one of the three a run ends in), then the settings.
        self._append_settings = _with_length(
            pack(
                max_entries,
                self._running_ttl_ms,
                self._retention_ms,
                self._meta_ttl_ms,
                self._restored_ttl_ms,
            ),
            None,
        )
        self._append_ends = {
            status: self._append_end_of(status)
            for status in (None, "completed", "error", "cancelled")
        }
        # stream id -> owner, epoch and the append command's head for that run, the
        # stream's notice channel, and the run's _Post (with its bound answer method)
        self._now_ms, self._now = 0, b"0"  # the time in ms, and in digits (_append_command)
        self._heads: Recent[str, tuple[str, int, bytes, bytes, _Post, Callable[[Any], None]]]
        self._heads = Recent(_CACHED_STREAMS, _CACHE_PERIOD)
        # stream id -> its hash slot, its keys (meta, events, lease) and notice channel
        self._streams: Recent[str, tuple[int, tuple[str, str, str], bytes]]
        self._streams = Recent(_CACHED_STREAMS, _CACHE_PERIOD)
        #: Error replies met, by code (MOVED, ASK, NOSCRIPT, READONLY...): for tests, metrics.
        self.redirects: collections.Counter[str] = collections.Counter()
        # Live delivery and cancels: channel -> feed / waiters; channel -> its node.
        self._feeds: dict[bytes, _Feed] = {}
        # Notice channel -> epoch of the run written in this process (Transport.writing).
        self._writing: dict[bytes, int] = {}
        self._cancel_waiters: dict[bytes, set[_CancelWaiter]] = {}
        self._checks: set[asyncio.Task[None]] = set()  # cancel checks that were redirected
        self._channel_node: dict[bytes, _Node] = {}
        self._unrouted: set[bytes] = set()
        self._router: asyncio.Task[None] | None = None
        self._router_wake = asyncio.Event()
        self._refresh_wanted = False
        # Nodes a command could not reach -> when: while the slot map still names one as a
        # master (its replica not yet promoted), the router reads the map again.
        self._down: dict[str, float] = {}
        self._recheck: asyncio.TimerHandle | None = None
        # The event loop the transport is used on (see _on_running_loop).
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Connect to Redis at ``url``; ``options`` as for the constructor.

        ``redis://``, ``rediss://`` (TLS), ``unix://``: one server, redis-py URL syntax.
        ``redis+cluster://HOST:PORT[,HOST:PORT...]`` (``rediss+cluster://`` for TLS): a
        Redis Cluster, found from any of the nodes listed.
        ``redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`` (``rediss+sentinel``):
        the master of ``SERVICE`` as the Sentinels name it, looked up on every
        (re)connection. Query options (``?socket_timeout=5&...``) and credentials in
        the URL apply to the Redis servers; ``sentinel_username`` / ``sentinel_password``
        to the Sentinels.
        """
        try:
            client = _client_from_url(url)
        except ConfigurationError:
            raise
        except (rex.RedisError, TypeError, ValueError, IndexError) as exc:
            raise ConfigurationError(f"invalid Redis URL {_redact(url)!r}: {exc}") from exc
        return cls(client, owns_client=True, **options)

    # -- routing ----------------------------------------------------------------------

    async def _ensure_ready(self) -> None:
        if self._ready:
            return
        if self._closed:
            raise TransportClosed("the Redis transport is closed")
        async with self._init_lock:
            if self._ready:
                return
            cluster = self._cluster
            if cluster is None:  # pragma: no cover - _ready is True without a cluster
                return
            try:
                await cluster.initialize()
            except (rex.RedisError, rex.RedisClusterException, OSError) as exc:
                raise fault(exc, "the cluster discovery") from exc
            await self._release_client_connections()
            self._ready = True

    async def _release_client_connections(self) -> None:
        """Our own cluster client's connections were only for discovering the topology."""
        if self._owns_client and self._cluster is not None:
            manager = self._cluster.nodes_manager
            for cluster_node in (*manager.nodes_cache.values(), *manager.startup_nodes.values()):
                with contextlib.suppress(Exception):
                    await cluster_node.disconnect_free_connections()

    def _stream(self, stream_id: str) -> tuple[int, tuple[str, str, str], bytes]:
        """The stream's hash slot, its meta, events and lease keys, and its notice channel
        (cached)."""
        known = self._streams.recent.get(stream_id) or self._streams.get(stream_id)
        if known is None:
            key = self._key
            keys = (key(stream_id, "meta"), key(stream_id, "events"), key(stream_id, "lease"))
            channel = key(stream_id, "n").encode()
            known = (key_slot(stream_id.encode()), keys, channel)
            self._streams.put(stream_id, known)
        return known

    def _slot(self, stream_id: str) -> int:
        return self._stream(stream_id)[0]

    def _node_for_slot(self, slot: int) -> _Node:
        if self._single is not None:
            return self._single
        cluster = self._cluster
        if cluster is None:  # pragma: no cover - one of the two is set
            raise TransportClosed("the Redis transport is closed")
        try:
            cluster_node = cluster.nodes_manager.get_node_from_slot(slot)
        except (rex.RedisError, rex.RedisClusterException) as exc:
            raise TransportError(f"no Redis Cluster node serves slot {slot}: {exc}") from exc
        return self._node(cluster_node)

    def _node(self, cluster_node: ClusterNode) -> _Node:
        node = self._nodes.get(cluster_node.name)
        if node is None:
            if self._closed:
                raise TransportClosed("the Redis transport is closed")
            kwargs = dict(cluster_node.connection_kwargs)
            connection_class = cluster_node.connection_class

            def make() -> AbstractConnection:
                return connection_class(**kwargs)

            node = self._nodes[cluster_node.name] = _Node(self, cluster_node.name, make)
        return node

    def _redirected_node(self, error: rex.AskError) -> _Node:
        cluster = self._cluster
        if cluster is None:
            raise TransportError(f"a single Redis server answered a cluster redirect: {error}")
        manager = cluster.nodes_manager
        target = manager.get_node(host=error.host, port=error.port)
        if target is None:
            target = ClusterNode(error.host, error.port, **manager.connection_kwargs)
        return self._node(target)

    async def _execute(
        self,
        slot: int,
        packed: bytes,
        script: _Script | None = None,
        *,
        then: tuple[bytes, ...] = (),
        notice: Callable[[Any], _Published] | None = None,
    ) -> Any:
        """Send a command for ``slot``; follow MOVED / ASK / NOSCRIPT; map errors.

        ``then``: commands sent right after it on the same connection, each time it is
        sent (``WAIT`` counts that connection's writes); the result is then the list of
        the command's reply and theirs.
        ``notice(reply)``: the (channel, message) pairs a script answering ``reply``
        published; published again where the readers listen when the script ran on the
        node importing the slot (see :meth:`_relay`).
        """
        if self._closed:
            raise TransportClosed("the Redis transport is closed")
        if asyncio.get_running_loop() is not self._loop:
            self._on_running_loop()
        if not self._ready:
            await self._ensure_ready()
        node = self._node_for_slot(slot)
        asking = False
        replies: list[Any] = []
        redirects = 0
        delay, deadline = _TRYAGAIN_DELAY, math.inf
        while redirects < _MAX_REDIRECTS:
            redirects += 1
            try:
                if asking or then:
                    commands = (pack("ASKING"), packed, *then) if asking else (packed, *then)
                    replies = await asyncio.gather(*node.pipe.submit(*commands))
                    replies = replies[1:] if asking else replies
                    reply = replies[0]
                else:
                    reply = await node.pipe.send(packed)  # the hot path: no gather()
            except TransportError as exc:
                if not isinstance(exc, BackendRefused) and self._cluster is not None:
                    # A node down: its replica may be taking over (the producer retries).
                    if not isinstance(exc, NoAnswer):  # (slow is not gone: no rechecks)
                        self._down[node.name] = time.monotonic()
                    self._refresh_topology()
                raise
            if self._down:
                self._down.pop(node.name, None)  # it answers
            if not isinstance(reply, rex.RedisError):
                if asking and notice is not None:
                    await self._relay(slot, notice(reply))
                return replies if then else reply
            code = error_code(reply)
            self.redirects[code] += 1
            if code == "NOSCRIPT" and script is not None:
                # First use on this node, or the server restarted or flushed its scripts.
                loaded = await node.pipe.call(script.load)
                if isinstance(loaded, rex.RedisError):
                    raise fault(loaded, "SCRIPT LOAD") from loaded
                continue
            if code in ("MOVED", "ASK") and self._cluster is None:
                raise BackendRefused(
                    f"this Redis server is part of a Redis Cluster ({describe(reply)}): "
                    "connect with redis+cluster://HOST:PORT or a RedisCluster client"
                ) from reply
            if code == "MOVED" and isinstance(reply, rex.AskError) and self._cluster:
                # The slot has a new owner (a migration finished, or a failover).
                try:
                    await self._cluster.nodes_manager.move_slot(reply)
                except Exception as exc:
                    self._refresh_topology()
                    raise TransportError(f"the Redis Cluster is changing: {exc}") from exc
                node, asking = self._node_for_slot(slot), False
                continue
            if code == "ASK" and isinstance(reply, rex.AskError):
                # The slot is migrating and this key already moved: ask the target once.
                node, asking = self._redirected_node(reply), True
                continue
            if code == "TRYAGAIN" and self._cluster is not None:
                # A script on a slot being migrated whose keys are not all on one master
                # (split by MIGRATE, or not there yet: a stream created, a finished one
                # with no lease key): Redis runs it once they are, or once the slot has
                # moved. It was not run: send it again to the slot's owner, while a slow
                # reply would still be waited for.
                now = time.monotonic()
                if deadline == math.inf:
                    deadline = now + self._timeout
                if now < deadline:
                    await asyncio.sleep(min(delay, deadline - now))
                    delay = min(delay * 2, _TRYAGAIN_DELAY_MAX)
                    node, asking, redirects = self._node_for_slot(slot), False, 0
                    continue
            if code == "CLUSTERDOWN" and self._cluster is not None:
                # The node serves no slot now ("Hash slot not served": it was removed from
                # the cluster, `del-node` resets it) or the cluster is failing over: the
                # slot map may name the wrong node. Read it again (the caller retries).
                self._refresh_topology()
            raise fault(reply, "the command" if script is None else script.what(reply)) from reply
        raise TransportError(f"too many redirections for slot {slot}; the cluster is changing")

    def _eval(
        self,
        script: _Script,
        stream_id: str,
        *args: Any,
        notice: Callable[[Any], _Published] | None = None,
    ) -> Coroutine[Any, Any, Any]:
        """Run ``script`` on the stream's three keys (``_execute``'s coroutine, returned
        rather than awaited: one coroutine less in flight)."""
        packed = self._evalsha(script, stream_id, args)
        return self._execute(self._slot(stream_id), packed, script, notice=notice)

    async def _relay(self, slot: int, published: _Published) -> None:
        """A script that publishes ran on the node a slot is migrating to (after ASK), and
        so did its ``SPUBLISH``: readers of other processes are subscribed on the node the
        slot map names until the slot has moved (Redis serves a shard channel there during
        a migration), and would wait for their check of a quiet stream. Publish it there
        too. Awaited, so that a process that exits next has sent it; a failure is not the
        command's (a duplicate notice is harmless, a lost one is what those checks are for).
        """
        if not published or self._closed:
            return
        with contextlib.suppress(TransportError):
            pipe = self._node_for_slot(slot).pipe
            await asyncio.gather(*pipe.submit(*(pack("SPUBLISH", *pair) for pair in published)))

    def _notice_of(self, stream_id: str, entry: Entry) -> Callable[[Any], _Published] | None:
        """For ``_execute(notice=...)`` of an append (or a release) of ``entry``: None on
        one server (no ASK there, no object per append)."""
        if self._cluster is None:
            return None
        return functools.partial(self._entry_notice, stream_id, entry)

    def _entry_notice(self, stream_id: str, entry: Entry, reply: Any) -> _Published:
        """The notice of ``entry`` if the append (or release) answering ``reply`` stored it
        now (not a retry: 0; nor a refusal)."""
        if reply != 1:
            return ()
        payload = entry.payload
        carried = b" " + payload if len(payload) <= scripts.NOTICE_PAYLOAD_MAX else b""
        return ((self._stream(stream_id)[2], b"%d-%d%b" % (entry.epoch, entry.seq, carried)),)

    def _evalsha(self, script: _Script, stream_id: str, args: tuple[Any, ...]) -> bytes:
        return pack("EVALSHA", script.sha, 3, *self._stream(stream_id)[1], *args)

    def _key(self, stream_id: str, kind: str) -> str:
        return f"{self.prefix}:{{{stream_id}}}:{kind}"

    # -- the transport contract -------------------------------------------------------

    async def create(self, stream_id: str, owner: str, lease_ms: int) -> StreamInfo:
        now_ms = int(time.time() * 1000)
        result = await self._eval(
            _CREATE, stream_id, owner, lease_ms, now_ms, self._running_ttl_ms, self._tombstone_ms
        )
        if result == -1:
            raise StreamAlreadyRunning(stream_id)
        epoch = int(result)
        created = now_ms / 1000
        return StreamInfo(stream_id, epoch, "running", created, created, 0, 0, lease_ms)

    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        if self.replicas:
            await self._append_durably(stream_id, owner, entry, count, final)
            if self._writing:
                self._appended_here(self._stream(stream_id)[2], entry, final)
            return
        # (No event-loop check here or in append_soon(), the token path: a run starts with
        # create() and writing(), which move the transport to the running loop.)
        packed = self._append_command(stream_id, owner, entry, count, final)
        node = None if self._closed else self._single
        # One server: the reply is awaited here, with no _execute() coroutine per append in
        # flight (fewer objects for the garbage collector while writes wait their turn). An
        # error reply (NOSCRIPT, a refusal) goes through _execute(), which handles it; the
        # script was not run, or running it again is harmless (an append is idempotent).
        # Closed: _execute() raises TransportClosed.
        result = None
        if node is not None:
            # A run written here: its readers here get the entry as the reply is parsed.
            hook = None
            if self._writing:
                hook = functools.partial(self._replied, stream_id, entry, final)
            result = await node.pipe.send(packed, hook)
        if node is None or isinstance(result, rex.RedisError):
            notice = self._notice_of(stream_id, entry)
            result = await self._execute(self._slot(stream_id), packed, _APPEND, notice=notice)
            if self._writing:
                self._replied(stream_id, entry, final, result)
        if result == -1:
            raise LeaseLost(stream_id)
        if isinstance(result, list):
            raise StorageRollback(stream_id, int(result[0]))

    def append_soon(
        self, stream_id: str, owner: str, entry: Entry, count: int, done: Callable[[bool], None]
    ) -> bool:
        # One server and no WAIT: the reply is handled as it is parsed (see Transport). A
        # Redis Cluster (redirections) and durable writes (WAIT) take append()'s way.
        node = self._single
        if node is None or self.replicas or self._closed or not self._own_append:
            return False
        packed = self._append_command(stream_id, owner, entry, count, None)
        head = self._heads.recent[stream_id]  # (cached by _append_command just now)
        post, answer = head[4], head[5]
        if post.entry is not None:  # another entry of the run unanswered: not the producer's way
            post = _Post(self, head[3])
            answer = post.answer
        post.entry, post.done = entry, done
        try:
            node.pipe.post(packed, answer)
        except TransportClosed:
            post.entry = post.done = None
            return False
        return True

    def _append_command(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None
    ) -> bytes:
        # The command changes little from one entry of a run to the next: its head (the
        # script, the keys, the owner and the epoch) is packed by hiredis once per run and
        # its tail once; the rest (seq, payload, count, time, final status) is formatted
        # here, in a third of the time pack() takes for all 18 arguments (measured).
        head = self._heads.recent.get(stream_id) or self._heads.get(stream_id)
        if head is None or head[0] != owner or head[1] != entry.epoch:
            packed = self._evalsha(_APPEND, stream_id, (owner, entry.epoch))
            channel = self._stream(stream_id)[2]
            # (Without its last CRLF: _BULK_HEADS puts it in front of the next argument.)
            command = _with_length(packed, 18)[:-2]
            post = _Post(self, channel)
            head = (owner, entry.epoch, command, channel, post, post.answer)
            self._heads.put(stream_id, head)
        # Joined, not %-formatted: the bulk headers of short lengths and the count are
        # made once (_BULK_HEADS, _BULK_COUNTS), so only seq, time and, for a long
        # payload, its length are turned into digits per entry.
        seq = b"%d" % entry.seq
        # The time in ms, in digits made once per millisecond (appends come several a
        # millisecond under load).
        now_ms = time.time_ns() // 1_000_000
        if now_ms != self._now_ms:
            self._now_ms, self._now = now_ms, b"%d" % now_ms
        now = self._now
        payload = entry.payload
        size = len(payload)
        return b"".join(
            (
                head[2],
                _BULK_HEADS[len(seq)],
                seq,
                _BULK_HEADS[size] if size < _BULK_LENGTHS else b"\r\n$%d\r\n" % size,
                payload,
                _BULK_COUNTS[count] if count < _BULK_LENGTHS else _bulk_count(count),
                _BULK_HEADS[len(now)],
                now,
                b"\r\n",
                self._append_ends.get(final) or self._append_end_of(final),
            )
        )

    def _append_end_of(self, final: str | None) -> bytes:
        """The append command's end: the final status (empty: none), then the settings."""
        status = (final or "").encode()
        return b"$%d\r\n%b\r\n%b" % (len(status), status, self._append_settings)

    def _replied(self, stream_id: str, entry: Entry, final: Status | None, reply: Any) -> None:
        if reply == 1 or reply == 0:  # stored now, or already (a retried write)
            self._appended_here(self._stream(stream_id)[2], entry, final)

    def _appended_here(self, channel: bytes, entry: Entry, final: Status | None) -> None:
        """An entry of the run with notice channel ``channel``, written in this process, is
        stored: hand it to this process's readers of the run (the notice Redis also
        publishes goes to other processes)."""
        if self._writing.get(channel) != entry.epoch:
            return
        if final is not None:
            del self._writing[channel]  # nothing more is written under this epoch
        feed = self._feeds.get(channel)
        if feed is None or not feed.local or feed.epoch != entry.epoch:
            return
        seq = entry.seq
        if seq == feed.cursor + 1 and not feed.fetching:  # the next one (_offer, inlined)
            feed.cursor = seq
            entries = [entry]
            # (The set itself, not a copy: push() changes no feed's subscribers.)
            for subscription in feed.subscribers:
                subscription.push(entries)
        elif seq <= feed.cursor and final is not None:
            feed.wake()  # the run ended below the readers (storage_rollback): they look
        else:
            self._offer(feed, seq, entry)

    async def _append_durably(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None
    ) -> None:
        hold = pack(
            "EVALSHA",
            _HOLD.sha,
            3,
            *self._stream(stream_id)[1],
            owner,
            entry.epoch,
            entry.seq,
            entry.payload,
            self.max_entries,
            self._running_ttl_ms,
            self._restored_ttl_ms,
        )
        # HOLD and WAIT adjacent on one connection, to whichever node a redirect names
        # (issue 8: after an ASK the pair went back to the old owner until the redirect
        # budget ran out).
        held, acked = await self._execute(self._slot(stream_id), hold, _HOLD, then=(self._wait,))
        if held == -1:
            raise LeaseLost(stream_id)
        if isinstance(held, list):
            raise StorageRollback(stream_id, int(held[0]))
        if isinstance(acked, rex.RedisError):
            raise fault(acked, "WAIT") from acked
        if acked < self.replicas:
            raise TransportError(
                f"stream {stream_id!r}: entry {entry.seq} reached {acked} of {self.replicas} "
                "replicas in time; not readable yet (retried)"
            )
        released = await self._eval(
            _RELEASE,
            stream_id,
            owner,
            entry.epoch,
            entry.seq,
            count,
            int(time.time() * 1000),
            final or "",
            self._retention_ms,
            self._meta_ttl_ms,
            notice=self._notice_of(stream_id, entry),
        )
        if released == -1:
            raise LeaseLost(stream_id)
        if isinstance(released, list):  # the storage lost the run under the entry held
            raise StorageRollback(stream_id, int(released[0]))

    async def renew(self, stream_id: str, owner: str, lease_ms: int) -> bool:
        result = await self._eval(
            _RENEW, stream_id, owner, lease_ms, self._running_ttl_ms, self._tombstone_ms
        )
        if result == -1:
            raise LeaseLost(stream_id)
        if result == 2:  # the storage lost the whole run (a failover): written again
            raise StorageRollback(stream_id, 0)
        return bool(result)

    async def request_cancel(self, stream_id: str) -> bool:
        channel = self._key(stream_id, "c").encode()

        def notice(reply: Any) -> _Published:
            return ((channel, reply),) if isinstance(reply, bytes) else ()  # the run's epoch

        return bool(await self._eval(_CANCEL, stream_id, notice=notice))

    async def wait_cancel(self, stream_id: str, epoch: int) -> None:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        wake = resolver(woken)
        unwatch = self._watch(
            _CancelWaiter(self, stream_id, epoch, wake, functools.partial(wake, None))
        )
        try:
            await woken
        finally:
            unwatch()
        if self._closed:
            raise TransportClosed("the Redis transport is closed")

    def writing(self, stream_id: str, epoch: int) -> Callable[[], None]:
        # Readers in this process of a run written here are fed by its appends: no
        # subscription, no notice to receive and parse per entry (issue 11).
        self._on_running_loop()
        channel = self._stream(stream_id)[2]
        feed = self._feeds.get(channel)
        if feed is not None and feed.local and feed.epoch != epoch:
            # Readers of an earlier run of the id, written here: that run is over (or
            # fenced) and nothing of it will come from here; they look at the stream.
            self._to_notices(feed)
        self._writing[channel] = epoch
        return functools.partial(self._stopped_writing, channel, epoch)

    def _stopped_writing(self, channel: bytes, epoch: int) -> None:
        if self._writing.get(channel) != epoch:
            return  # ended with its final entry (or another run of the id took over)
        # Stopped without its final entry (fenced, or failed): another process may write
        # the run's end now (a reaper's producer_lost) or delete it. Its readers here
        # follow the notices from now on, and look at the stream at once.
        del self._writing[channel]
        feed = self._feeds.get(channel)
        if feed is not None and feed.local and feed.epoch == epoch:
            self._to_notices(feed)

    def _to_notices(self, feed: _Feed) -> None:
        """A local feed's readers follow the notices from now on, and look at once."""
        feed.local = False
        if not self._closed:
            self._follow(feed.channel)
        feed.wake()

    def watch_cancel(
        self, stream_id: str, epoch: int, on_cancel: Callable[[Exception | None], None]
    ) -> Callable[[], None]:
        # A callback on the stream's cancel channel, no task (issue 8: a task per run, woken
        # on each subscription, made starting a run cost more than the old broadcast did).
        return self._watch(_CancelWaiter(self, stream_id, epoch, on_cancel))

    def _watch(self, waiter: _CancelWaiter) -> Callable[[], None]:
        if self._closed:
            raise TransportClosed("the Redis transport is closed")
        self._on_running_loop()
        channel = waiter.channel
        self._cancel_waiters.setdefault(channel, set()).add(waiter)
        self._follow(channel)
        node = self._channel_node.get(channel)
        if node is not None and channel in node.subscriber.confirmed:
            self._check_cancel(waiter, node)  # already subscribed: look at the metadata once
        return waiter.unwatch

    def _unwatch(self, waiter: _CancelWaiter) -> None:
        channel = waiter.channel
        waiters = self._cancel_waiters.get(channel)
        if waiters is not None and waiter in waiters:
            waiters.discard(waiter)
            if not waiters:
                del self._cancel_waiters[channel]
                self._unfollow(channel)

    def _check_cancel(self, waiter: _CancelWaiter, node: _Node) -> None:
        """(Re)subscribed: a cancel published before that is in the metadata. One HMGET,
        answered in a callback; a redirect or fault takes the slow path in a task."""
        if self._closed or waiter.fired:
            return
        packed = pack("HMGET", self._key(waiter.stream_id, "meta"), "cancel", "epoch")
        try:
            future = node.pipe.send(packed)
        except TransportError:
            return  # closing

        def answered(done: asyncio.Future[Any]) -> None:
            reply = None if done.cancelled() or done.exception() else done.result()
            if isinstance(reply, list) and reply[1] is not None:
                waiter.check(*reply)
                return
            task = asyncio.create_task(self._check_cancel_slowly(waiter, packed))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

        future.add_done_callback(answered)

    async def _check_cancel_slowly(self, waiter: _CancelWaiter, packed: bytes) -> None:
        slot = self._slot(waiter.stream_id)
        try:
            reply = await self._execute(slot, packed)
            if reply[1] is None:
                # No run: deleted (its marker says so), or lost whole by the storage (a
                # failover), which its producer writes again: not a reason to stop it.
                marker = pack("EXISTS", self._key(waiter.stream_id, "gone"))
                if not await self._execute(slot, marker):
                    return
        except TransportError as exc:
            waiter.fire(exc)
            return
        waiter.check(*reply)

    async def info(self, stream_id: str) -> StreamInfo | None:
        values = await self._execute(
            self._slot(stream_id), pack("HMGET", self._key(stream_id, "meta"), *_META_FIELDS)
        )
        if values[0] is None:
            return None
        epoch, status, created, updated, last, count, lease_ms = values
        return StreamInfo(
            stream_id=stream_id,
            epoch=int(epoch),
            status=status.decode(),  # written by our scripts only
            created_at=int(created) / 1000,
            updated_at=int(updated) / 1000,
            last_seq=int(last),
            last_count=int(count),
            lease_ms=int(lease_ms),
        )

    async def read(self, stream_id: str, epoch: int, after: int, limit: int) -> list[Entry]:
        if self.replicas:  # only what the replicas acknowledged
            reply = await self._eval(_READ, stream_id, epoch, after, limit)
        else:
            reply = await self._execute(
                self._slot(stream_id), _xrange(self._key(stream_id, "events"), epoch, after, limit)
            )
        return [_entry(entry_id, fields) for entry_id, fields in reply]

    def subscribe(self, stream_id: str, epoch: int, after: int) -> Subscription:
        if self._closed:
            raise TransportClosed("the Redis transport is closed")
        self._on_running_loop()
        channel = self._stream(stream_id)[2]
        feed = self._feeds.get(channel)
        if feed is not None and feed.epoch > epoch:
            # A reader of an earlier run: it must not take the feed from the current one.
            # Woken at once, it finds the stream restarted (OffsetExpired).
            stale = QueueSubscription(lambda sub: None)
            stale.push([])
            return stale
        if feed is None or feed.epoch != epoch:
            if feed is not None:
                feed.wake()
            key = self._key(stream_id, "events").encode()
            feed = self._feeds[channel] = _Feed(self, key, channel, epoch, after)
            if self._writing.get(channel) == epoch:
                # The run is written in this process: its appends feed the readers. What
                # it wrote before this reader came is fetched.
                feed.local = True
                self._fetch(feed)
            else:
                self._follow(channel)
                node = self._channel_node.get(channel)
                if node is not None and channel in node.subscriber.confirmed:
                    self._fetch(feed)  # subscribed already (another run's readers)
        subscription = QueueSubscription(feed.release)
        feed.subscribers.add(subscription)
        if feed.cursor > after or feed.gone:
            # The feed is past this reader, or its run is gone: wake it to read the gap, or
            # to find the run deleted or replaced (its notice came before this reader).
            subscription.push([])
        return subscription

    def _unsubscribe(self, feed: _Feed, subscription: QueueSubscription) -> None:
        feed.subscribers.discard(subscription)
        if not feed.subscribers and self._feeds.get(feed.channel) is feed:
            del self._feeds[feed.channel]
            self._unfollow(feed.channel)

    async def delete(self, stream_id: str) -> bool:
        # Deleting the metadata fences the producer: its owner token is gone. The script
        # notifies the stream's readers and its producer, in every process (but readers fed
        # by a run written here are not subscribed: they are woken here).
        notices = self._stream(stream_id)[2]
        cancels = self._key(stream_id, "c").encode()

        def notice(reply: Any) -> _Published:
            # (the run's epoch, if it was running: its producer is asked to stop)
            stop = ((cancels, reply[1]),) if reply[1] else ()
            return (*stop, (notices, b""))

        deleted, _ = await self._eval(_DELETE, stream_id, self._meta_ttl_ms, notice=notice)
        self._wake_local(notices, gone=True)
        return bool(deleted)

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
        if result:
            self._wake_local(self._stream(stream_id)[2])
        return bool(result)

    def _wake_local(self, channel: bytes, *, gone: bool = False) -> None:
        """Wake the readers fed by a run written here (not subscribed to its notices)."""
        feed = self._feeds.get(channel)
        if feed is not None and feed.local:
            feed.wake(gone=gone)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._on_running_loop()
        self._closed = True
        for feed in self._feeds.values():
            feed.wake()
        self._feeds.clear()
        self._writing.clear()
        for waiters in tuple(self._cancel_waiters.values()):
            for waiter in tuple(waiters):
                if waiter.on_close is not None:
                    waiter.on_close()  # wait_cancel() raises TransportClosed
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        tasks = [*self._checks, self._sentinel_watch, self._router]
        nodes = [self._single] if self._single is not None else list(self._nodes.values())
        # Closed to the end even if cancelled meanwhile: aclose() only runs once.
        await to_the_end(
            functools.partial(stop, *(task for task in tasks if task is not None)),
            *(node.aclose for node in nodes if node is not None),
            self._close_client,
        )

    async def _close_client(self) -> None:
        if self._owns_client:
            # Made by from_url: close it, and the Sentinel clients behind its pool.
            pool = getattr(self.client, "connection_pool", None)
            manager = getattr(pool, "sentinel_manager", None)
            for sentinel in getattr(manager, "sentinels", ()):
                with contextlib.suppress(Exception):
                    await sentinel.aclose()
            with contextlib.suppress(Exception):
                await self.client.aclose()

    # -- event loops ------------------------------------------------------------------

    def _on_running_loop(self) -> None:
        """Follow the transport to the running event loop once the one it was used on is
        closed (``asyncio.run()`` called again, a loop per test or per task): the tasks,
        timers and connections of that loop ended with it, so they are made again here,
        and nothing of the closed loop is touched. Used from two open loops at once (two
        threads), the transport would share connections between them: refused."""
        loop = asyncio.get_running_loop()
        old = self._loop
        if loop is old:
            return
        if old is not None and not old.is_closed():
            raise ConfigurationError(
                "this RedisTransport is in use on another event loop, which is still open: "
                "make a transport per event loop (thread), or close that loop first "
                "(asyncio.run() does)"
            )
        self._loop = loop
        if old is None:
            return
        # The readers and runs of the closed loop are gone with it.
        self._feeds.clear()
        self._writing.clear()
        self._cancel_waiters.clear()
        self._channel_node.clear()
        self._unrouted.clear()
        self._checks = set()
        self._router = self._recheck = self._sentinel_watch = None
        self._router_wake = asyncio.Event()
        self._init_lock = asyncio.Lock()
        for node in (self._single, *self._nodes.values()):
            if node is not None:
                node.pipe.restart()
                node.subscriber.restart()
        if self._sentinels is not None:
            # redis-py's Sentinel clients keep the closed loop's connections for the
            # master look-up ("Event loop is closed"): they open new ones.
            for sentinel in getattr(self._sentinels[0], "sentinels", ()):
                with contextlib.suppress(Exception):
                    sentinel.connection_pool.reset()

    # -- Sentinel ---------------------------------------------------------------------

    def _connected(self) -> None:
        """A connection was opened: behind Sentinel, watch which server is the master."""
        if self._sentinels is not None and self._sentinel_watch is None and not self._closed:
            self._sentinel_watch = asyncio.get_running_loop().create_task(
                self._watch_sentinels(self._sentinels), name="rstream redis sentinel watch"
            )

    async def _watch_sentinels(self, sentinels: tuple[Any, str]) -> None:
        """Leave a master the Sentinels replaced. A connection asks them for the master as
        it opens; after a planned failover the old master stays writable, and takes this
        process's writes, until they turn it into a replica, which drops those writes."""
        node = self._single
        try:
            while node is not None and not self._closed:
                await asyncio.sleep(_SENTINEL_CHECK)
                if not node.pipe.connected and not node.subscriber.connected:
                    return  # nothing to move: the next connection starts this again
                master = await _newest_master(*sentinels)
                if master is not None and node.pipe.leave(master) | node.subscriber.leave(master):
                    logger.warning(
                        "Redis Sentinel names %s:%s the master of %r now: reconnecting",
                        *master,
                        sentinels[1],
                    )
        finally:
            self._sentinel_watch = None
            # redis-py's Sentinel clients keep their look-up connections: closed with the
            # watch, also as the event loop ends (asyncio.run() cancels it), or they would
            # be left open to the garbage collector once it is closed. (In use: a
            # connection opening looks the master up now, and gives it back after.)
            for sentinel in getattr(sentinels[0], "sentinels", ()):
                with contextlib.suppress(Exception):
                    await sentinel.connection_pool.disconnect(inuse_connections=False)

    # -- live notices -----------------------------------------------------------------

    def _follow(self, channel: bytes) -> None:
        """Subscribe to a stream's channel on the node serving its slot."""
        if channel in self._channel_node or channel in self._unrouted:
            return
        if self._ready:
            try:
                node = self._node_for_slot(key_slot(channel))
            except TransportError:
                pass
            else:
                self._channel_node[channel] = node
                node.subscriber.add(channel)
                return
        self._unrouted.add(channel)  # routed by the router task once the topology is known
        self._start_router()

    def _unfollow(self, channel: bytes) -> None:
        if channel in self._feeds or channel in self._cancel_waiters:
            return  # still wanted (the notice channel by readers, the cancel one by runs)
        self._unrouted.discard(channel)
        node = self._channel_node.pop(channel, None)
        if node is not None:
            node.subscriber.remove(channel)

    def _start_router(self) -> None:
        self._router_wake.set()
        if self._router is None and not self._closed:
            loop = asyncio.get_running_loop()
            if any(node.pipe.stopping(loop) for node in self._nodes.values()):
                # The event loop is shutting down (a run writing its terminal event met a
                # connection it cancelled): a router task would be left pending as it closes.
                return
            self._router = loop.create_task(self._route(), name="rstream redis router")

    def _refresh_topology(self) -> None:
        """A cluster node failed or gave up a slot: ask the cluster for its slot map again,
        and move the subscriptions whose slot has a new master (in the router task)."""
        if self._cluster is not None and not self._closed:
            self._refresh_wanted = True
            self._start_router()

    async def _route(self) -> None:
        """Subscribe the channels not yet placed once the cluster topology is known, and
        re-place subscriptions after the topology changed."""
        while True:
            await self._router_wake.wait()
            self._router_wake.clear()
            try:
                await self._ensure_ready()
                if self._refresh_wanted and self._cluster is not None:
                    self._refresh_wanted = False
                    await self._cluster.nodes_manager.initialize()
                    await self._release_client_connections()
                    self._replace_subscriptions()
                    self._recheck_while_down()
            except Exception as exc:
                logger.warning("cannot read the cluster's slot map: %s; retrying", exc)
                self._refresh_wanted = self._cluster is not None
                await asyncio.sleep(_ROUTE_RETRY)  # backoff before asking the cluster again
                self._router_wake.set()
                continue
            for channel in tuple(self._unrouted):
                self._unrouted.discard(channel)
                if channel in self._feeds or channel in self._cancel_waiters:
                    self._follow(channel)

    def _recheck_while_down(self) -> None:
        """Read the slot map again soon while it names a master that failed: a process that
        only reads would otherwise keep the map until its next command to that node fails,
        long after the replica took over."""
        cluster = self._cluster
        if not self._down or cluster is None or self._closed:
            return
        masters = {node.name for node in cluster.nodes_manager.get_nodes_by_server_type(PRIMARY)}
        now = time.monotonic()
        self._down = {
            name: since
            for name, since in self._down.items()
            if name in masters and now - since < _DOWN_RECHECK_FOR
        }
        if self._down and self._recheck is None:

            def recheck() -> None:
                self._recheck = None
                self._refresh_topology()

            self._recheck = asyncio.get_running_loop().call_later(_ROUTE_RETRY, recheck)

    def _replace_subscriptions(self) -> None:
        for channel, node in tuple(self._channel_node.items()):
            try:
                owner = self._node_for_slot(key_slot(channel))
            except TransportError:
                owner = None
            if owner is not node:
                del self._channel_node[channel]
                node.subscriber.remove(channel)
                self._unrouted.add(channel)

    def _on_moved(self, channel: bytes) -> None:
        # Redis Cluster moved the channel's slot away: place it again.
        self._channel_node.pop(channel, None)
        if channel in self._feeds or channel in self._cancel_waiters:
            self._unrouted.add(channel)
            self._refresh_topology()

    def _on_subscribed(self, channel: bytes) -> None:
        # Notices sent before this (re)subscription were missed: look again (at the run's
        # epoch too: a delete's notice has no entry to fetch).
        feed = self._feeds.get(channel)
        if feed is not None:
            feed.refetch = feed.checking = True
            self._fetch(feed)
        node = self._channel_node.get(channel)
        if node is not None:
            for waiter in tuple(self._cancel_waiters.get(channel, ())):
                self._check_cancel(waiter, node)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if channel.endswith(b":c"):
            cancelled = int(data) if data.isdigit() else -1
            for waiter in tuple(self._cancel_waiters.get(channel, ())):
                if waiter.epoch == cancelled:
                    waiter.fire()
            # A cancel, or a delete: readers fed by the run's appends are not subscribed
            # to its notices (a delete's among them). They look at the stream now.
            self._wake_local(channel[:-1] + b"n")
            return
        feed = self._feeds.get(channel)
        if feed is None:
            return
        entry_id, carried, payload = data.partition(b" ")
        epoch, _, seq = entry_id.partition(b"-")
        if not seq or int(epoch) != feed.epoch:
            # Deleted, or another run: the readers find out from the metadata.
            feed.wake(gone=not seq or int(epoch) > feed.epoch)
        else:
            # The usual case: the next entry, carried by its notice (no fetch). Too large
            # to carry: fetched.
            number = int(seq)
            self._offer(feed, number, Entry(feed.epoch, number, payload) if carried else None)

    def _offer(self, feed: _Feed, seq: int, entry: Entry | None) -> None:
        """Entry ``seq`` of the feed's run is stored (``entry``, if known): hand it to the
        readers if it is the next one, else fetch what they miss (a gap, a fetch under
        way, or an entry not carried)."""
        if entry is not None and seq == feed.cursor + 1 and not feed.fetching:
            feed.cursor = seq
            entries = [entry]
            for subscription in tuple(feed.subscribers):
                subscription.push(entries)
        elif seq > feed.cursor:
            self._fetch(feed)

    def _fetch(self, feed: _Feed) -> None:
        """Read the feed's new entries (one XRANGE in flight per stream; notices that
        arrive meanwhile are coalesced into one more)."""
        if feed.fetching:
            feed.refetch = True
            return
        node = self._channel_node.get(feed.channel)
        if node is None and feed.local and not self._closed:
            try:
                node = self._node_for_slot(key_slot(feed.channel))
            except TransportError:
                feed.wake()  # the readers read through the safe path
                return
        if node is None or self._closed:
            return
        feed.fetching = True
        feed.refetch = False
        tag = feed.key.removesuffix(b"events")
        if feed.checking:
            # Sent once the feed follows the notices (or is fed here): on the same
            # connection as the fetch, one round trip for both.
            feed.checking = False
            checked = node.pipe.send(pack("HGET", tag + b"meta", "epoch"))
            checked.add_done_callback(lambda done: self._checked(feed, done))
        if self.replicas:
            packed = pack(
                "EVALSHA", _READ.sha, 3, tag + b"meta", feed.key, tag + b"lease",
                feed.epoch, feed.cursor, _FETCH_COUNT,
            )  # fmt: skip
        else:
            packed = _xrange(feed.key, feed.epoch, feed.cursor, _FETCH_COUNT)
        future = node.pipe.send(packed)
        future.add_done_callback(lambda done: self._fetched(feed, node, done))

    def _checked(self, feed: _Feed, done: asyncio.Future[Any]) -> None:
        """The run's epoch, read as the feed started following it: wake its readers if the
        run is no longer there (deleted or replaced before its notices were followed)."""
        if done.cancelled() or done.exception():
            feed.wake()  # a fault: the readers look at the stream (the safe path)
            return
        reply = done.result()
        if reply != b"%d" % feed.epoch:
            # Deleted or replaced (bytes or None), or a redirect or refusal (an error).
            feed.wake(gone=reply is None or isinstance(reply, bytes))

    def _fetched(self, feed: _Feed, node: _Node, done: asyncio.Future[Any]) -> None:
        feed.fetching = False
        reply = None if done.cancelled() or done.exception() else done.result()
        noscript = isinstance(reply, rex.RedisError) and error_code(reply) == "NOSCRIPT"
        if noscript and not feed.loading:
            # The read script is new to this node: load it, ahead of the fetch sent again
            # on the same connection (a failure of either wakes the readers below).
            feed.loading = True
            node.pipe.send(_READ.load).add_done_callback(_retrieve)
            feed.refetch = True
        elif not isinstance(reply, list):
            # A fault, a redirect or a refusal: the readers read through the safe path
            # (metadata and storage, which follow redirects and report errors).
            feed.wake()
            return
        else:
            feed.loading = False
            self._deliver(feed, reply)
        if feed.refetch and self._feeds.get(feed.channel) is feed:
            self._fetch(feed)

    def _deliver(self, feed: _Feed, reply: list[Any]) -> None:
        if reply:
            entries = [_entry(entry_id, fields) for entry_id, fields in reply]
            feed.cursor = max(feed.cursor, entries[-1].seq)
            for subscription in tuple(feed.subscribers):
                subscription.push(entries)
        if len(reply) == _FETCH_COUNT:
            feed.refetch = True  # a full page: more may be there


#: Lengths whose bulk headers are made once (a paced token's entry is a few dozen bytes).
_BULK_LENGTHS = 256
#: ``\r\n$<n>\r\n``: the end of the argument before, then the header of one of n bytes.
_BULK_HEADS = tuple(b"\r\n$%d\r\n" % n for n in range(_BULK_LENGTHS))
#: An entry's event count as a whole argument, with the end of the argument before.
_BULK_COUNTS = tuple(b"\r\n$%d\r\n%d" % (len(b"%d" % n), n) for n in range(_BULK_LENGTHS))


def _bulk_count(count: int) -> bytes:
    number = b"%d" % count
    return b"\r\n$%d\r\n%b" % (len(number), number)


def _with_length(packed: bytes, length: int | None) -> bytes:
    """A packed command with its argument count changed to ``length`` (None: removed), to
    be joined with more arguments."""
    rest = packed[packed.index(b"\r\n") + 2 :]
    return rest if length is None else b"*%d\r\n%b" % (length, rest)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a lost connection is handled by whoever waits on it


def _xrange(key: str | bytes, epoch: int, after: int, limit: int) -> bytes:
    return pack(
        "XRANGE",
        key,
        b"%d-%d" % (epoch, after + 1),
        b"%d-18446744073709551615" % epoch,
        "COUNT",
        limit,
    )


def _entry(entry_id: bytes, fields: list[bytes]) -> Entry:
    epoch, _, seq = entry_id.partition(b"-")
    return Entry(int(epoch), int(seq), fields[1])


def _timeout_of(kwargs: dict[str, Any]) -> float:
    return float(kwargs.get("socket_timeout") or DEFAULT_REDIS_TIMEOUT)


def _lookup_timeout(sentinel: Any) -> float:
    """The longest one Sentinel can keep a master look-up waiting: connecting to it and
    its reply, on each attempt its redis-py client makes (its ``retry``), with the
    back-off between them."""
    kwargs = getattr(getattr(sentinel, "connection_pool", None), "connection_kwargs", {})
    connect = kwargs.get("socket_connect_timeout") or kwargs.get("socket_timeout")
    attempt = float(connect or DEFAULT_REDIS_TIMEOUT) + _timeout_of(kwargs)
    retry = kwargs.get("retry") or getattr(sentinel, "retry", None)
    retries, backoff = 3, 10.0  # (a Retry of another redis-py: generous)
    with contextlib.suppress(Exception):
        retries = max(0, int(retry.get_retries())) if retry is not None else 0
        backoff = float(retry._backoff._cap)  # type: ignore[union-attr]
    return (retries + 1) * attempt + retries * backoff


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _hosts(netloc: str, url: str) -> tuple[str, list[tuple[str, int]]]:
    """Credentials and the HOST:PORT list of a multi-host URL."""
    userinfo, _, hostlist = netloc.rpartition("@")
    hosts = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigurationError(
                f"invalid Redis URL {_redact(url)!r}: list the nodes as HOST:PORT,HOST:PORT"
            )
        hosts.append((host.strip("[]"), int(port)))
    return userinfo, hosts


def _client_from_url(url: str) -> aioredis.Redis | RedisCluster:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return aioredis.Redis.from_url(url)
    base, _, kind = scheme.partition("+")
    if base not in ("redis", "rediss") or kind not in ("cluster", "sentinel"):
        raise ConfigurationError(
            f"unknown Redis URL scheme {scheme!r}: use redis://, rediss://, unix://, "
            "redis+cluster:// or redis+sentinel://"
        )
    userinfo, hosts = _hosts(parts.netloc, url)
    query = parts.query
    sentinel_kwargs: dict[str, Any] = {}
    if kind == "sentinel":
        kept = []
        for pair in query.split("&") if query else ():
            name, _, value = pair.partition("=")
            if name in ("sentinel_username", "sentinel_password"):
                sentinel_kwargs[name.removeprefix("sentinel_")] = unquote(value)
            else:
                kept.append(pair)
        query = "&".join(kept)
    # redis-py parses the credentials and options of one-host URLs: reuse it.
    single = f"{base}://{userinfo + '@' if userinfo else ''}{hosts[0][0]}:{hosts[0][1]}/"
    kwargs: dict[str, Any] = dict(parse_url(single + ("?" + query if query else "")))
    for name in ("host", "port", "path", "db"):
        kwargs.pop(name, None)
    if kwargs.pop("connection_class", None) is not None or base == "rediss":
        kwargs["ssl"] = True
    if kind == "cluster":
        if parts.path.strip("/") not in ("", "0"):
            raise ConfigurationError("a Redis Cluster has only database 0")
        nodes = [ClusterNode(host, port) for host, port in hosts]
        return RedisCluster(startup_nodes=nodes, **kwargs)
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigurationError(
            f"invalid Sentinel URL {_redact(url)!r}: "
            "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"
        )
    service = unquote(path[0])
    db = int(path[1]) if len(path) == 2 else 0
    # The Sentinels get the URL's socket options (redis-py drops them once sentinel_kwargs
    # holds credentials) and no retries: a master look-up that finds one silent moves on to
    # the next (redis-py's default retries kept it on that one about ten times as long).
    sentinel_kwargs.update((k, v) for k, v in kwargs.items() if k.startswith("socket_"))
    sentinel_kwargs["retry"] = Retry(NoBackoff(), 0)
    sentinel = aioredis.Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
        hosts, sentinel_kwargs=sentinel_kwargs, **kwargs
    )
    master: aioredis.Redis = sentinel.master_for(service, db=db)
    return master
