"""Transports: where streams are stored. Pick one with :func:`from_url`."""

from __future__ import annotations

from typing import TypedDict, Unpack, cast
from urllib.parse import urlsplit

from .._exceptions import ConfigurationError
from ._base import Entry, QueueSubscription, Status, StreamInfo, Subscription, Transport

__all__ = [
    "Entry",
    "QueueSubscription",
    "RedisOptions",
    "Status",
    "StreamInfo",
    "Subscription",
    "Transport",
    "TransportOptions",
    "from_url",
]

_SCHEMES = (
    "memory://",
    "redis://",
    "rediss://",
    "unix://",
    "redis+cluster://",
    "rediss+cluster://",
    "redis+sentinel://",
    "rediss+sentinel://",
)
_REDIS_SCHEMES = {scheme.removesuffix("://") for scheme in _SCHEMES} - {"memory"}


class TransportOptions(TypedDict, total=False):
    """Settings every transport takes (see :class:`Transport`)."""

    retention: float
    tombstone: float
    running_ttl: float
    max_entries: int


class RedisOptions(TransportOptions, total=False):
    """Settings of the Redis transports: those of every transport, ``prefix`` (of keys),
    ``write_retry_budget`` and the durability settings ``replicas`` / ``replica_timeout``."""

    prefix: str
    write_retry_budget: float
    replicas: int
    replica_timeout: float


def from_url(url: str, **options: Unpack[RedisOptions]) -> Transport:
    """Create a transport from a URL; ``options`` go to the transport's constructor.

    ``options`` are typed (:class:`RedisOptions`, :class:`TransportOptions` for
    ``memory://``), so a type checker catches a misspelt or mistyped one.

    ``memory://`` keeps streams in this process; ``redis://``, ``rediss://`` and
    ``unix://`` use Redis Streams on one server, ``redis+cluster://HOST:PORT[,...]`` on a
    Redis Cluster and ``redis+sentinel://HOST:PORT[,...]/SERVICE[/DB]`` on the master
    Sentinel names (``rediss+...`` for TLS; install the ``redis`` extra). Each call
    creates a new transport: create one per process and share it.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        from .memory import MemoryTransport

        redis_only = sorted(options.keys() - TransportOptions.__annotations__.keys())
        if redis_only:
            raise ConfigurationError(
                f"{', '.join(redis_only)}: option(s) of the Redis transports, not memory://"
            )
        return MemoryTransport(**cast(TransportOptions, options))
    if scheme in _REDIS_SCHEMES:
        try:
            from .redis import RedisTransport
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigurationError(
                "the Redis transport needs redis-py and hiredis: "
                "pip install 'resumable-llm-stream[redis]'"
            ) from exc
        return RedisTransport.from_url(url, **options)
    raise ConfigurationError(f"unknown transport URL {url!r}: use one of {', '.join(_SCHEMES)}")
