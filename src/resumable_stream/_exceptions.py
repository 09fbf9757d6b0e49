"""Every exception the library raises.

Hierarchy::

    ResumableStreamError
    ├── InvalidStreamId      (also a ValueError)
    ├── InvalidOffset        (also a ValueError)
    ├── StreamNotFound
    ├── OffsetExpired
    ├── StreamAlreadyRunning
    ├── LeaseLost
    │   └── ReservationExpired
    ├── StorageRollback
    ├── EventTooLarge        (also a ValueError)
    ├── TransportError       (transient: retried)
    │   ├── TransportClosed
    │   └── BackendRefused   (not transient: never retried)
    └── ConfigurationError   (also a ValueError)

Errors from backends (redis-py and others) never cross the public API: transports map
them to :class:`TransportError` and chain the original as ``__cause__``.
"""

from __future__ import annotations


class ResumableStreamError(Exception):
    """Base class of every error raised by resumable_stream."""


class InvalidStreamId(ResumableStreamError, ValueError):
    """A stream id is malformed (bad characters or length)."""


class InvalidOffset(ResumableStreamError, ValueError):
    """An offset string is malformed or points past the end of the stream."""


class StreamNotFound(ResumableStreamError):
    """No stream with this id exists, or it expired together with its metadata."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} does not exist (never created, or long expired)")
        self.stream_id = stream_id


class OffsetExpired(ResumableStreamError):
    """The offset is older than the retained data, or from an earlier run of the same id.

    Resuming is impossible without a gap; the client must start over (reload).
    """

    def __init__(self, stream_id: str, offset: str | None, reason: str) -> None:
        where = "from its start" if offset is None else f"after {offset!r}"
        super().__init__(f"cannot read stream {stream_id!r} {where}: {reason}")
        self.stream_id = stream_id
        self.offset = offset
        self.reason = reason


class StreamAlreadyRunning(ResumableStreamError):
    """A live producer already holds this stream id."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} is already being produced by a live producer")
        self.stream_id = stream_id


class LeaseLost(ResumableStreamError):
    """This producer lost its lease on the stream and may no longer write to it."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(
            f"lost the lease on stream {stream_id!r}: another producer took over or the run "
            "was declared lost; this producer is fenced"
        )
        self.stream_id = stream_id


class ReservationExpired(LeaseLost):
    """A reserved run lapsed (or was ended or taken over) before a producer started it."""

    def __init__(self, stream_id: str) -> None:
        ResumableStreamError.__init__(
            self,
            f"the reservation of stream {stream_id!r} expired before it was started (its "
            "start_timeout lapsed and readers were told), or it was ended or taken over",
        )
        self.stream_id = stream_id


class StorageRollback(ResumableStreamError):
    """The storage lost entries it had acknowledged (e.g. a failover to a lagging replica).

    Raised by :meth:`Transport.append` when ``entry.seq`` is beyond the stored last seq + 1;
    ``last_seq`` is what the storage holds now. A transport that can tell a run lost whole
    (all its keys gone in a failover) from a deleted one may also raise it, with
    ``last_seq`` 0, from :meth:`Transport.renew`: the producer writes the run again.
    """

    def __init__(self, stream_id: str, last_seq: int) -> None:
        super().__init__(
            f"stream {stream_id!r}: the storage lost acknowledged entries and now ends at "
            f"entry {last_seq} (a failover to a replica that had not caught up?)"
        )
        self.stream_id = stream_id
        self.last_seq = last_seq


class EventTooLarge(ResumableStreamError, ValueError):
    """One event is larger than the configured limit, or cannot be encoded as JSON."""


class TransportError(ResumableStreamError):
    """The storage backend failed in a way a retry may fix (connection lost, timeout,
    failover in progress)."""


class TransportClosed(TransportError):
    """The transport was closed while the operation was in progress."""


class BackendRefused(TransportError):
    """The backend refused a command for a reason a retry will not fix (out of memory,
    wrong key type, missing permission); never retried."""


class ConfigurationError(ResumableStreamError, ValueError):
    """An argument or URL cannot be used (unknown scheme, missing extra, bad value)."""
