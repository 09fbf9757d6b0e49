"""Defaults, limits and key names, kept in one place."""

from __future__ import annotations

import re

#: Version of the event vocabulary written into streams (see docs/events.md).
EVENT_SCHEMA_VERSION = 1

#: Seconds a producer's lease lasts without a heartbeat; consumers report a run whose
#: lease lapsed as ``error`` / ``producer_lost``.
DEFAULT_LEASE = 5.0
#: Longest duration option (retention, tombstone, running_ttl, lease, start_timeout,
#: replica_timeout) in seconds, about 31,700 years: Redis takes expiries in milliseconds
#: as integers, which its scripts hold as doubles (exact up to 2**53), and adds several.
MAX_DURATION = 1e12
#: Seconds finished streams stay readable.
DEFAULT_RETENTION = 3600.0
#: Seconds the stream's metadata outlives its data, so "expired" differs from "never existed".
DEFAULT_TOMBSTONE = 86400.0
#: Seconds a running stream's keys live without a heartbeat (the heartbeat extends them).
DEFAULT_RUNNING_TTL = 600.0
#: Approximate cap on entries (not events: one entry holds a batch of events) per stream.
DEFAULT_MAX_ENTRIES = 100_000
#: Events a producer buffers before it waits for the transport (backpressure).
DEFAULT_MAX_BUFFER = 8192
#: When events arrive while the previous write is in flight, or within COALESCE_GAP seconds
#: after it (the source may outrun the writes), the producer lets the next entry fill while
#: events keep coming: up to COALESCE_EVENTS events or COALESCE_DELAY seconds, ended by a
#: first pause of COALESCE_PAUSE seconds (then twice as long each time) in which none came.
#: Bursts then cost a few Redis commands per hundred events, and a source that pauses
#: between events (an LLM at its own pace) waits that first pause (up to COALESCE_DELAY
#: right after a burst of its own, whose pauses have grown).
COALESCE_EVENTS = 256
COALESCE_DELAY = 0.05
COALESCE_GAP = 0.001
COALESCE_PAUSE = 0.001
#: Entries a consumer fetches per page when replaying (kept raw: decoded one at a time).
DEFAULT_PAGE_SIZE = 512
#: Stored bytes a replaying consumer aims to hold in one page: its first page is a few
#: entries, and each next one as many as fit, judged by the size of the entries just read
#: (entries written in bursts are up to DEFAULT_MAX_ENTRY_BYTES each: 512 of them is 128 MB).
PAGE_BYTES = 1024 * 1024
#: Events a consumer hands out without awaiting before it yields to the event loop once, so
#: a replay of a long stream cannot starve the other tasks of the process.
CONSUMER_CHECKPOINT = 256
#: Largest encoded event (bytes of JSON) a producer writes; a larger one ends the run with
#: an ``error`` event whose ``error`` is ``EventTooLarge`` (after every event before it).
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
#: Most events in one entry, and the byte size past which an entry takes no further event
#: (one event up to DEFAULT_MAX_EVENT_BYTES still fits alone): a consumer decodes an entry
#: at once, so this bounds its memory.
DEFAULT_MAX_ENTRY_EVENTS = 1024
DEFAULT_MAX_ENTRY_BYTES = 256 * 1024
#: Upper bound of max_entry_events: an event's index is written in 5 digits of its offset.
MAX_ENTRY_EVENTS_LIMIT = 99_999
#: Seconds a producer retries a write that fails with a transient TransportError (a lost
#: connection, a failover) before it gives up; transports may suggest their own
#: (``Transport.write_retry_budget``). Separate from the lease.
DEFAULT_WRITE_RETRY_BUDGET = 5.0
#: Recent entries a producer keeps to write again if the storage loses them (a failover to
#: a replica that had not caught up), bounded in count and in bytes.
DEFAULT_ROLLBACK_WINDOW = 256
ROLLBACK_WINDOW_BYTES = 4 * 1024 * 1024
#: Entries a live subscription buffers before it drops old ones (the consumer refills the gap).
DEFAULT_SUBSCRIPTION_BUFFER = 4096

DEFAULT_REDIS_PREFIX = "rstream"
#: Seconds Redis may stay silent while replies are owed before the connection is dropped
#: (``socket_timeout`` in the URL overrides it).
DEFAULT_REDIS_TIMEOUT = 30.0
#: Least seconds between two writes on one Redis connection: commands queued meanwhile go
#: out together in the next write. Each write wakes the Redis server, and its replies wake
#: this process; under load, batching them cuts the client CPU per token (issue 11,
#: docs/performance.md has the trade-off measured: 0.1 ms saves about 15% at a median
#: latency of 0.4 ms, 0.5 ms about 35% at 1.0 ms) for at most this much added latency. A
#: write after a quiet spell goes out at once, and so does a command whose reply someone
#: awaits when Redis owes no reply.
DEFAULT_WRITE_INTERVAL = 0.0001

STREAM_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@~-]{1,200}")
STREAM_ID_RULES = "1-200 characters from A-Z a-z 0-9 and _ . : @ ~ -"

# HTTP adapters (resumable_stream.starlette / .fastapi)
#: Seconds without an event after which an idle stream gets a keep-alive line.
DEFAULT_PING_INTERVAL = 15.0
#: Seconds an SSE client waits before it reconnects (sent as ``retry:``).
DEFAULT_RETRY = 1.0
#: Seconds one write to the client may take before the client counts as stuck.
DEFAULT_SEND_TIMEOUT = 30.0
#: Stream connections one router serves at once (the library targets 1,000 per worker).
DEFAULT_MAX_CONNECTIONS = 1000
#: Largest request body (bytes) the chat and LangGraph routers read: a chat's request holds
#: its whole history, attachments included, so this is generous; larger bodies get a 413.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
#: Seconds a stream response waits for its first events before it sends the headers: long
#: enough for the consumer's first reads, so that their errors still get a status code.
FIRST_EVENT_WAIT = 0.5
#: Seconds a stream response cancelled by its server (the end of a graceful shutdown) gives
#: the client to take its last write, which ends the response so that the client resumes.
SHUTDOWN_WRITE_WAIT = 1.0
#: Seconds a timer may fire before its deadline by the loop's time(): uvloop keeps that
#: time in whole milliseconds as of its last turn and rounds delays to them. A timer that
#: checks its deadline takes one this close as reached, rather than re-arming itself for
#: what is left until the millisecond passes (hundreds of times, on uvloop).
TIMER_SLACK = 0.001
#: Encoded bytes a response buffers ahead of a slow client before it stops reading.
BUFFER_LIMIT = 64 * 1024
#: ``Retry-After`` seconds when the router is full or the transport is down.
RETRY_AFTER = 1
