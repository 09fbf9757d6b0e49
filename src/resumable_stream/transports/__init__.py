"""Transports: where streams are stored. Pick one with :func:`from_url`."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from .._exceptions import ConfigurationError
from ._base import Entry, QueueSubscription, Status, StreamInfo, Subscription, Transport

__all__ = [
    "Entry",
    "QueueSubscription",
    "Status",
    "StreamInfo",
    "Subscription",
    "Transport",
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


def from_url(url: str, **options: Any) -> Transport:
    """Create a transport from a URL; ``options`` go to the transport's constructor.

    ``memory://`` keeps streams in this process; ``redis://``, ``rediss://`` and
    ``unix://`` use Redis Streams on one server, ``redis+cluster://HOST:PORT[,...]`` on a
    Redis Cluster and ``redis+sentinel://HOST:PORT[,...]/SERVICE[/DB]`` on the master
    Sentinel names (``rediss+...`` for TLS; install the ``redis`` extra). Each call
    creates a new transport: create one per process and share it.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        from .memory import MemoryTransport

        return MemoryTransport(**options)
    if scheme in _REDIS_SCHEMES:
        try:
            from .redis import RedisTransport
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigurationError(
                "the Redis transport needs redis-py: pip install 'resumable-llm-stream[redis]'"
            ) from exc
        return RedisTransport.from_url(url, **options)
    raise ConfigurationError(f"unknown transport URL {url!r}: use one of {', '.join(_SCHEMES)}")
