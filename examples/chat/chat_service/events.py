"""What a run writes to its stream, and how readers see it.

A run writes the library's event vocabulary (docs/events.md): ``token`` for the agent's text,
``tool_start`` when the model calls a tool, ``tool_end`` with the tool's result (or error),
``message`` when an AI message is complete, ``custom`` once at the start (which answer this
is, from which model, cached or not), then ``end``, ``error`` or ``cancelled``.

Readers get it in the chat API's own names, with each event's offset kept as its SSE ``id``
so that ``Last-Event-ID`` resumes: :class:`ChatEvents` is a ``StreamConsumer`` that renames
events on the way out, so the library's ``StreamResponse`` serves it unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from resumable_stream import Event, StreamConsumer, Transport

#: ``custom`` event name of the first event of every run.
RUN_STARTED = "run_started"

#: Error code of an answer whose server restarted while it was being written, on a set-up
#: whose streams live in the server's memory (embedded defaults): they died with it.
SERVER_RESTARTED = "server_restarted"
#: Error code of an answer whose producer stopped sending heartbeats (the library's).
PRODUCER_LOST = "producer_lost"
#: Worker mode: no worker started the answer within WORKER_START_TIMEOUT (the library's).
NOT_STARTED = "not_started"
#: Worker mode: the answer's task could not be sent to the workers.
QUEUE_DOWN = "queue_unavailable"
#: The server shut down (SIGTERM) while it wrote the answer.
SHUTDOWN = "shutdown"
#: The answer's stream could not be started (Redis refused the write, or was unreachable).
START_FAILED = "start_failed"
#: Redis lost part of the answer's stream (restarted without its data, or a failover to a
#: replica behind it) beyond what its writer could write again (the library's).
STORAGE_ROLLBACK = "storage_rollback"

#: The error codes of a stream's end that record its run failed, with Retry (run_end):
#: the answer was lost or never started, not an error of its own (the model's).
LOST = (PRODUCER_LOST, NOT_STARTED, QUEUE_DOWN, START_FAILED, SERVER_RESTARTED, STORAGE_ROLLBACK)

_MESSAGES = {
    PRODUCER_LOST: "the server generating this answer stopped (crashed or was restarted); retry",
    SERVER_RESTARTED: "the server restarted while writing this answer, and it was lost "
    "(on this set-up, answers in progress live in the server's memory); retry",
    NOT_STARTED: "no worker started this answer in time (are workers running?); retry",
    QUEUE_DOWN: "the answer could not be handed to the workers; retry",
    SHUTDOWN: "the server shut down before the answer was complete; retry",
    START_FAILED: "the answer could not be started (its stream could not be written); retry",
    STORAGE_ROLLBACK: "its storage lost part of this answer as it was written (Redis restarted "
    "without its data, or failed over), and it could not be written again; retry",
}


def run_error(code: str) -> Event:
    """The terminal ``error`` event of a run that ended without writing one (not stored:
    its offset is empty)."""
    return Event("error", {"error": code, "message": _MESSAGES.get(code, code)}, "")


def run_dropped() -> Event:
    """The terminal event of a queued run dropped before its turn (a stop, an interrupting
    message, a clear or a delete): stopped, like an answer stopped as it streams."""
    return Event("cancelled", {"reason": "stopped"}, "")


Mapper = Callable[[Event], Event | None]


def to_sse(event: Event) -> Event | None:
    """The ``GET /v1/chat/stream`` view: ``chunk``, ``tool_call`` and ``system``."""
    kind, data, offset = event.type, event.data, event.offset
    if kind == "token":
        # (A token without text: the model's last chunk, reasoning, a tool call's fragment.)
        text = data.get("text")
        return Event("chunk", {"text": text}, offset) if text else None
    if kind == "tool_start":
        return Event(
            "tool_call", {"id": data.get("id"), "name": data["name"], "args": data["args"]}, offset
        )
    if kind == "message":
        return Event("system", {"type": "message_ended", "message_id": data.get("id")}, offset)
    if kind == "custom" and data.get("name") == RUN_STARTED:
        return Event("system", {"type": "start", **data.get("data", {})}, offset)
    if kind == "end":
        return Event("system", {"type": "end"}, offset)
    if kind == "cancelled":
        if data.get("reason") == "shutdown":
            return Event("system", _shutdown_error(), offset)
        return Event("system", {"type": "end", "reason": "stopped"}, offset)
    if kind == "error":
        return Event("system", {"type": "error", **_error(data)}, offset)
    return None


def to_ndjson(event: Event) -> Event | None:
    """The ``POST /chat/stream`` view: ``token``, ``tool_event``, ``error`` and ``metadata``."""
    kind, data, offset = event.type, event.data, event.offset
    if kind == "token":
        text = data.get("text")
        return Event("token", {"content": text}, offset) if text else None
    if kind == "tool_start":
        return Event(
            "tool_event", {"id": data.get("id"), "name": data["name"], "args": data["args"]}, offset
        )
    if kind == "custom" and data.get("name") == RUN_STARTED:
        return Event("metadata", {"status": "started", **data.get("data", {})}, offset)
    if kind == "end":
        return Event("metadata", {"status": "completed"}, offset)
    if kind == "cancelled":
        if data.get("reason") == "shutdown":
            return Event("error", _shutdown_error(), offset)
        return Event("metadata", {"status": "stopped"}, offset)
    if kind == "error":
        return Event("error", _error(data), offset)
    return None


#: Errors of the service's own whose messages are written for the user (a model the run's
#: config names that this service does not serve, or cannot reach: what to change).
_OWN_ERRORS = frozenset({"UnknownModelError", "ModelUnavailableError"})
#: What a reader is told of any other error of the answer (a model provider's, a tool's):
#: its code (the exception's class) and this, not the exception's message, which may hold
#: what only the server should see (a key's prefix, a host); the server's log has it.
FAILED_MESSAGE = "the answer failed; retry"


def _error(data: dict[str, Any]) -> dict[str, Any]:
    code = str(data.get("error") or "error")
    message = _MESSAGES.get(code)
    if message is None:
        message = str(data.get("message") or code) if code in _OWN_ERRORS else FAILED_MESSAGE
    return {"code": code, "message": message}


def _shutdown_error() -> dict[str, Any]:
    return {"type": "error", "code": SHUTDOWN, "message": _MESSAGES[SHUTDOWN]}


class ChatEvents(StreamConsumer):
    """A ``StreamConsumer`` whose events are renamed by ``mapper`` (events it maps to None
    are skipped), for the library's ``StreamResponse`` to serve.

    ``prelude`` events come first (they are not stored: give them an empty offset). ``ready``
    is awaited before the first read: it waits for a queued answer's stream to exist, so
    the response goes out (with keep-alives) while the answer waits for its turn; if it
    returns an event instead (the answer will never have a stream), that event is the last.
    ``on_terminal`` is awaited with the stream's terminal event before it is passed on.
    """

    def __init__(
        self,
        transport: Transport,
        stream_id: str,
        mapper: Mapper,
        *,
        after: str | None = None,
        prelude: list[Event] | None = None,
        ready: Callable[[], Awaitable[Event | None]] | None = None,
        on_terminal: Callable[[Event], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(transport, stream_id, after=after)
        self._mapper = mapper
        self._prelude = list(prelude or [])
        self._ready = ready
        self._on_terminal = on_terminal
        self._ended = False

    async def __anext__(self) -> Event:
        if self._prelude:
            return self._prelude.pop(0)
        if self._ended:
            raise StopAsyncIteration
        if self._ready is not None:
            ready, self._ready = self._ready, None
            instead = await ready()
            if instead is not None:
                self._ended = True
                return self._mapper(instead) or instead
        while True:
            event = await super().__anext__()
            if event.terminal and self._on_terminal is not None:
                await self._on_terminal(event)
            mapped = self._mapper(event)
            if mapped is not None:
                return mapped
