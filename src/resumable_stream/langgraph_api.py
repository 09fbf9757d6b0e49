"""Serve the LangGraph SDKs (``runs.stream``, ``joinStream``, ``useStream``) over your graphs.

```python
from resumable_stream.langgraph_api import LangGraphRouter

# graph compiled with a checkpointer; authorize(request, thread_id, action) -> bool
api = LangGraphRouter(transport, {"agent": graph}, authorize=may_use_thread)
app.mount("/langgraph", api)  # the SDKs' apiUrl: http://host/langgraph
```

A subset of the LangGraph Agent Server API: ``POST /threads``, ``GET /threads/{id}``,
``POST /threads/{id}/runs[/stream|/wait]``, ``GET /threads/{id}/runs``, ``GET
/threads/{id}/runs/{run_id}[/stream|/join]``, ``POST /threads/{id}/runs/{run_id}/cancel``,
``GET /threads/{id}/state[/{checkpoint_id}]``, ``POST /threads/{id}/state[/checkpoint]``,
``POST /threads/{id}/history``, ``DELETE /threads/{id}``, ``PATCH /threads/{id}``, ``POST
/threads/count`` and ``POST /threads/{id}/copy`` (``DELETE .../runs/{run_id}`` is 405).
Runs are detached: they go on when the client goes away, and any process sharing the
transport can join them from any event. Needs the ``web`` and ``langgraph`` extras; see
docs/langgraph-sdk.md.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import hashlib
import inspect
import logging
import math
import secrets
import time
import uuid
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime
from enum import Enum
from functools import partial
from typing import Any, Literal

import orjson

try:
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute, Route
    from starlette.types import Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "resumable_stream.langgraph_api needs Starlette and LangGraph: "
        "pip install 'resumable-llm-stream[web,langgraph]'"
    ) from exc

from ._codec import decode_entry, encode_entry
from ._constants import DEFAULT_MAX_BODY_BYTES, DEFAULT_PING_INTERVAL, DEFAULT_SEND_TIMEOUT
from ._consumer import StreamConsumer, settled_info
from ._events import CANCELLED, END, ERROR, Event, Item, is_v1_model, key_text, leaf_json, safe_repr
from ._exceptions import (
    BackendRefused,
    ConfigurationError,
    OffsetExpired,
    ResumableStreamError,
    StorageRollback,
    StreamAlreadyRunning,
    TransportClosed,
    TransportError,
)
from ._http import (
    EVENT_STREAM_TYPE,
    JSON_TYPE,
    HTTPError,
    WireFormat,
    error_for,
    http_status_error,
    loads_json,
    stream_headers,
)
from ._ids import check_stream_id
from ._producer import StreamProducer
from ._sse import PING
from .starlette import (
    ConnectionLimit,
    StreamResponse,
    _check_body_limit,
    _JsonRouting,
    _read_json_body,
)
from .transports import Entry, Status, StreamInfo, Transport

__all__ = [
    "LangGraphAction",
    "MultitaskStrategy",
    "LangGraphRouter",
    "ThreadInfo",
    "ThreadSearch",
    "stream_parts",
    "to_wire",
]

logger = logging.getLogger("resumable_stream.http")

#: What a request wants to do, as passed to ``authorize`` (thread id None for ``create``).
#: ``"delete"`` is asked with ``"run"`` and ``"cancel"`` (see ``LangGraphRouter``).
LangGraphAction = Literal["create", "read", "run", "cancel", "delete"]
#: What a run asked for while its thread has one in progress does (the API's strategies).
MultitaskStrategy = Literal["reject", "enqueue", "interrupt", "rollback"]


@dataclasses.dataclass(frozen=True, slots=True)
class ThreadInfo:
    """What the app keeps about a thread: ``thread_info``'s answer, for ``GET /threads/{id}``.

    Naive datetimes are taken as UTC.
    """

    created_at: datetime
    updated_at: datetime
    #: The thread's ``metadata`` as the SDKs read it (``Thread.metadata``).
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class ThreadSearch:
    """What ``POST /threads/search`` (the SDKs' ``threads.search``) asks for, checked: for
    ``search_threads``."""

    #: Threads whose metadata has each of these keys with its value (``{}``: any thread).
    metadata: Mapping[str, Any]
    #: Only these threads, if given.
    ids: tuple[str, ...] | None
    #: At most this many threads (1-1,000), after the first ``offset`` ones.
    limit: int
    offset: int
    #: ``"thread_id"``, ``"created_at"`` or ``"updated_at"``; None: newest first.
    sort_by: str | None
    #: ``"asc"`` or ``"desc"``; None: ``"desc"``.
    sort_order: str | None


# The graph's own stream modes; "messages-tuple" is the API's name for the graph's
# "messages" (langgraph-sdk: schema.py StreamMode). The API's own "messages" is another
# format (messages/partial, messages/complete, messages/metadata) that is not served.
# "tools" (tool calls' lifecycle, useStream's onToolEvent and toolProgress) is made here
# from LangChain's tool callbacks (see _tool_events).
_GRAPH_MODES = frozenset(
    {"values", "updates", "messages", "custom", "debug", "tasks", "checkpoints"}
)
_API_MODES = (_GRAPH_MODES - {"messages"}) | {"messages-tuple", "tools"}


def to_wire(obj: Any) -> Any:
    """``obj`` as the JSON the LangGraph SDKs parse.

    Messages are their full LangChain serialization (``type``, ``content``, ``id``,
    ``tool_calls``, ``tool_call_chunks``, ``response_metadata``...), as the SDKs rebuild
    message objects from it; Pydantic models and dataclasses become dicts, enums their
    values, a named tuple a dict of its fields, other values what the API's JSON encoder
    makes of them (dates and times ISO 8601 strings, a ``Decimal`` a number, bytes base64:
    :func:`leaf_json`), also as dict keys.
    """
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    if isinstance(obj, float):  # (a subclass as a float: orjson refuses one, np.float64)
        return obj if type(obj) is float else float(obj)
    if isinstance(obj, Mapping):
        return {k if type(k) is str else key_text(k): to_wire(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and isinstance(fields := getattr(type(obj), "_fields", None), tuple):
        # A named tuple: a dict of its fields, as the API's encoder writes it (_asdict()).
        return {str(k): to_wire(v) for k, v in zip(fields, obj, strict=False)}
    if isinstance(obj, list | tuple | set | frozenset | deque):
        return [to_wire(v) for v in obj]
    if isinstance(obj, type):  # a class (a model's: its model_dump is unbound)
        return safe_repr(obj)
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return to_wire(dump())
    if dataclasses.is_dataclass(obj):
        return {f.name: to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return to_wire(obj.value)
    if is_v1_model(obj):
        return to_wire(obj.dict())
    return leaf_json(obj)


def stream_parts(item: Any) -> Iterable[Item]:
    """The events to store for one item of ``graph.astream(..., stream_mode=[...])``.

    For ``StreamProducer.start(source, events=stream_parts)``: each part is kept whole
    under its SSE event name (``values``, ``updates``, ``messages``, ``custom``... with
    ``|<namespace>`` for subgraphs), its payload in ``data["data"]``; a ``messages`` part is
    the ``[message chunk, metadata]`` tuple. Items are ``(mode, payload)``, or
    ``(namespace, mode, payload)`` with ``subgraphs=True``.
    """
    return _stream_parts(item, to_wire)


#: orjson hands these to _wire_default (which refuses them) instead of writing them in a
#: way to_wire() does not: datetimes, dataclasses, subclasses of str, int, dict and list.
_WIRE_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
_NOT_MODELS = (Mapping, list, tuple, set, frozenset, deque, type, str, int, float)


def _wire_default(obj: Any) -> Any:
    """What orjson does not write itself, as to_wire() has it: a Pydantic model's dump;
    anything else is refused (the whole payload then goes through to_wire())."""
    if not isinstance(obj, _NOT_MODELS):
        dump = getattr(obj, "model_dump", None)
        if callable(dump):
            return dump()
    raise TypeError


def _wire_json(payload: Any) -> Any:
    """``to_wire(payload)``, written as JSON already when orjson writes it the same way
    (most parts: a message chunk and its metadata, a state of plain values), which costs a
    tenth of walking it in Python (issue 11: 1.7 against 15 µs for a ``messages`` part).

    orjson writes two kinds of values without asking ``default``, otherwise than
    to_wire(): an enum as its value (to_wire() has a ``str``, ``int`` or ``float`` enum's
    own text or number, which differs from its value only for an enum that sets it apart
    in ``__new__``, and an enum's ``model_dump()`` before its value), and an
    ``orjson.Fragment`` as the JSON it holds (to_wire(): its repr), as orjson, the Agent
    Server's encoder, writes them."""
    try:
        return orjson.Fragment(orjson.dumps(payload, default=_wire_default, option=_WIRE_OPTIONS))
    except TypeError:  # a value orjson refuses, or writes otherwise: see _WIRE_OPTIONS
        return to_wire(payload)


def _stream_parts(item: Any, wire: Callable[[Any], Any]) -> Iterable[Item]:
    """stream_parts(), with each payload converted by ``wire``."""
    if isinstance(item, tuple) and len(item) == 3:
        namespace, mode, payload = item
    elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        namespace, (mode, payload) = (), item
    else:  # a single-mode stream
        namespace, mode, payload = (), "values", item
    name = str(mode)
    if namespace:
        name += "|" + "|".join(namespace)
    yield (name, {"data": wire(payload)})


def _json(status: int, content: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content), status, {"cache-control": "no-store", **(headers or {})}, JSON_TYPE
    )


def _error(error: HTTPError) -> Response:
    return Response(error.body(), error.status, error.headers(), JSON_TYPE)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _aware(value: datetime) -> datetime:
    """``value``, taken as UTC if it is naive."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _stamp(item: Any) -> datetime | None:
    """The time of a checkpoint tuple (None for a checkpoint without a readable one)."""
    try:
        return _aware(datetime.fromisoformat(item.checkpoint["ts"]))
    except (KeyError, TypeError, ValueError):
        return None


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _command(command: Any) -> dict[str, Any]:
    """The arguments of the ``Command`` a run's ``command`` names, checked (else 422): the
    graph would otherwise start and fail inside LangGraph, replacing the thread's run."""
    if not isinstance(command, dict) or not set(command) <= {"resume", "update", "goto"}:
        raise _bad("'command' must be an object with resume, update and/or goto")
    given = {key: value for key, value in command.items() if value is not None}
    if not given:
        raise _bad("'command' must give resume, update or goto")
    update = given.get("update")
    if update is not None and not (
        isinstance(update, dict)
        or (
            isinstance(update, list)
            and all(
                isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                for pair in update
            )
        )
    ):
        raise _bad("'command.update' must be an object, or a list of [key, value] pairs")
    if isinstance(update, list):
        given["update"] = [tuple(pair) for pair in update]  # LangGraph takes tuples only
    goto = given.get("goto")
    if goto is not None:
        given["goto"] = [_goto(item) for item in goto] if isinstance(goto, list) else _goto(goto)
    return given


def _goto(target: Any) -> Any:
    """A node name, or a ``Send`` from the SDK's ``{"node", "input"}``."""
    if isinstance(target, str):
        return target
    if (
        isinstance(target, dict)
        and set(target) == {"node", "input"}
        and isinstance(target["node"], str)
    ):
        from langgraph.types import Send

        return Send(target["node"], target["input"])
    raise _bad("'command.goto' must be a node name, a {node, input} Send, or a list of them")


def _run_config(config: Any) -> dict[str, Any] | None:
    """A run's ``config``, checked where LangGraph would fail on it inside the run."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise _bad("'config' must be an object")
    limit = config.get("recursion_limit")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise _bad("'config.recursion_limit' must be a positive integer")
    # A key given as null is left out, as LangChain's ensure_config does.
    given: dict[str, Any] = {key: value for key, value in config.items() if value is not None}
    for key in ("configurable", "metadata"):
        if not isinstance(given.get(key, {}), dict):
            raise _bad(f"'config.{key}' must be an object")
    if not _strings(given.get("tags", [])):
        raise _bad("'config.tags' must be a list of strings")
    return given


def _durability(durability: Any, checkpoint_during: Any) -> str | None:
    """When the run saves checkpoints (LangGraph's ``durability``), as ``durability`` or the
    SDKs' older ``checkpoint_during`` (false: at the end only) names it; None: the graph's
    default."""
    if durability is not None:
        if durability not in ("sync", "async", "exit"):
            raise _bad("'durability' must be 'sync', 'async' or 'exit'")
        return str(durability)
    if checkpoint_during is None:
        return None
    if not isinstance(checkpoint_during, bool):
        raise _bad("'checkpoint_during' must be a boolean")
    return "async" if checkpoint_during else "exit"


def _state_point(checkpoint: Any, checkpoint_id: Any) -> dict[str, str]:
    """The checkpoint a state read or update names (see :func:`_fork_point`); a task's
    ``checkpoint`` without an id, as the thread's state gives it, names its subgraph's
    latest state (its ``checkpoint_ns``), as LangGraph reads the API's whole checkpoint."""
    point = _fork_point(checkpoint, checkpoint_id)
    namespace = checkpoint.get("checkpoint_ns") if isinstance(checkpoint, dict) else None
    if not point and isinstance(namespace, str) and namespace:
        point = {"checkpoint_ns": namespace}
    return point


async def _require_checkpoint(graph: Any, config: dict[str, Any], thread_id: str) -> None:
    """``404 checkpoint_not_found`` unless the graph's checkpointer has the checkpoint
    ``config`` names: LangGraph would read, write or run one it cannot find as an empty
    state."""
    saver: Any = getattr(graph, "checkpointer", None)
    if hasattr(saver, "aget_tuple") and await saver.aget_tuple(config) is None:
        named = config["configurable"]
        name = named.get("checkpoint_id") or named.get("checkpoint_ns")
        raise _Refused(
            HTTPError(
                404, "checkpoint_not_found", f"no checkpoint {name!r} in thread {thread_id!r}"
            )
        )


def _fork_point(checkpoint: Any, checkpoint_id: Any) -> dict[str, str]:
    """The checkpoint a run starts from, as ``configurable`` keys: the SDKs send the one
    their thread view shows (``useStream``'s branches, edits and regenerations) as
    ``checkpoint`` (a ``Checkpoint``) and/or ``checkpoint_id``; none for the latest."""
    given: dict[str, str] = {}
    if checkpoint is not None:
        if not isinstance(checkpoint, dict):
            raise _bad("'checkpoint' must be an object")
        for key in ("checkpoint_id", "checkpoint_ns"):
            value = checkpoint.get(key)
            if value is not None and not isinstance(value, str):
                raise _bad(f"'checkpoint.{key}' must be a string")
            if value is not None:
                given[key] = value
    if checkpoint_id is not None:
        if not isinstance(checkpoint_id, str):
            raise _bad("'checkpoint_id' must be a string")
        given["checkpoint_id"] = checkpoint_id
    return given if given.get("checkpoint_id") else {}


class _Refused(Exception):
    def __init__(self, error: HTTPError) -> None:
        self.error = error


def _bad(message: str, code: str = "invalid_request") -> _Refused:
    return _Refused(HTTPError(422, code, message))


def _metadata_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body's ``metadata`` object (``{}`` if absent or null); 422 for any other value,
    which was taken as ``{}`` (a thread or run recorded without the metadata sent)."""
    metadata = body.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise _bad("'metadata' must be an object")
    return metadata


def run_id_for(stream_id: str, epoch: int) -> str:
    """A run id (a UUID) naming the run of a thread's stream that started at ``epoch``: the
    epoch in the high 64 bits, and in the low ones 64 bits bound to the stream and the epoch,
    so that an id is checked without being stored (another thread's, or a made-up one, is not
    found)."""
    return str(uuid.UUID(int=(epoch << 64) | _run_bits(stream_id, epoch)))


def _run_bits(stream_id: str, epoch: int) -> int:
    digest = hashlib.blake2b(f"{stream_id}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _ours(stream_id: str, run_id: str) -> bool:
    """Whether ``run_id`` names a run this router started on ``stream_id`` (not the graph
    run by other means, with a run id of its own)."""
    if _queued_at(stream_id, run_id) is not None:
        return True
    try:
        _epoch_of(stream_id, run_id)
    except _Refused:
        return False
    return True


def _epoch_of(stream_id: str, run_id: str) -> int:
    """The epoch of the run ``run_id`` names on ``stream_id``; 404 if no run of it could."""
    try:
        number = uuid.UUID(run_id).int
    except ValueError:
        number = -1
    epoch = number >> 64
    # Epochs start at 1: an id of "run 0" is made up, even with the bits of one.
    if epoch < 1 or number & (2**64 - 1) != _run_bits(stream_id, epoch):
        raise _Refused(HTTPError(404, "run_not_found", f"no run {run_id!r} in this thread"))
    return epoch


#: The part a queued run's waiter writes once it started the run: ``{"epoch": <its epoch>}``.
_RUN_STARTED = "resumable_stream.run_started"
#: The part a queued run's waiter writes first: ``{"run": <the run's fields>}`` (see
#: ``_Plan.fields``), so that any process answers ``runs.get`` of the queued run.
_RUN_QUEUED = "resumable_stream.run_queued"
#: The first part of a state update's hold on its thread's stream: no run.
_STATE_UPDATE = "resumable_stream.state_update"
#: A queued run's status while it has not started, by its waiter's status.
_QUEUED_STATUS = {
    "running": "pending",
    "cancelled": "interrupted",
    "error": "error",
    "completed": "error",  # a waiter ends only by starting the run, or cancelled or lost
}


def _queued_run_id(stream_id: str) -> str:
    """A new run id (a UUID) for a run queued on ``stream_id``: in the high 64 bits the time
    it was queued (microseconds) and 8 random bits, in the low ones 64 bits bound to the
    stream and the high ones (see :func:`run_id_for`; the two kinds never match)."""
    high = (time.time_ns() // 1000) << 8 | secrets.randbits(8)
    return str(uuid.UUID(int=(high << 64) | _queued_bits(stream_id, high)))


def _queued_bits(stream_id: str, high: int) -> int:
    digest = hashlib.blake2b(f"{stream_id}/queued/{high}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _queued_at(stream_id: str, run_id: str) -> float | None:
    """When the run ``run_id`` was queued on ``stream_id`` (Unix time); None if it is not
    the id of a queued run of that stream."""
    try:
        number = uuid.UUID(run_id).int
    except ValueError:
        return None
    high = number >> 64
    if number & (2**64 - 1) != _queued_bits(stream_id, high):
        return None
    return (high >> 8) / 1_000_000


def _waiter_id(stream_id: str, run_id: str) -> str:
    """The stream of the waiter of the run ``run_id`` queued on ``stream_id``."""
    return check_stream_id(f"{stream_id}~queued~{run_id}")


@dataclasses.dataclass(slots=True)
class _Plan:
    """A run as a ``runs`` request asks for it, checked."""

    graph: Any
    inputs: Any
    config: dict[str, Any]
    kwargs: dict[str, Any]
    strategy: str
    fork: bool
    #: Whether the client asked for the "tools" mode, and for "custom".
    tools: bool = False
    custom: bool = True
    #: The assistant (graph) it runs, as the SDKs name it.
    assistant_id: str = ""
    #: The run's ``metadata``, as the request gave it.
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """What ``runs.get`` answers of the run that no stream info has: kept with the
        run's ``metadata`` part (and a queued run's waiter), not sent to the SDKs."""
        return {
            "assistant_id": self.assistant_id,
            "multitask_strategy": self.strategy,
            "metadata": self.metadata,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class _RunRef:
    """A run a path names: its epoch (None for a queued run not started), the thread
    stream's info, and for a queued run its waiter's."""

    thread_id: str
    stream_id: str
    run_id: str
    epoch: int | None
    info: StreamInfo | None
    waiter: StreamInfo | None


def _parts(item: Any) -> Iterable[Item]:
    """The parts to store for one item of a run's source (see :func:`_run_source`): their
    payloads written as JSON already where orjson can (_wire_json)."""
    if type(item) is Event:
        return ((item.type, item.data),)
    return _stream_parts(item, _wire_json)


#: The errors whose message the API sends: the Agent Server's serializer keeps the message
#: of these exception types (and of their subclasses) and sends "An internal error
#: occurred" for any other, whose message may hold what only the server should see (a
#: provider's error quoting part of a key, a driver's naming a host). (The library's own
#: errors are not exceptions of a run: their stored messages go out as they are.)
_SHOWN_ERRORS = frozenset(
    {
        "ValueError",
        "TypeError",
        "KeyError",
        "AttributeError",
        "RuntimeError",
        "RecursionError",
        "TimeoutError",
        "InvalidUpdateError",
        "GraphRecursionError",
        "GraphBubbleUp",
        "GraphInterrupt",
        "NodeInterrupt",
        "ParentCommand",
        "EmptyInputError",
        "TaskNotFound",
        "HTTPException",
        "UserInterrupt",
    }
)
_INTERNAL_ERROR_TEXT = "An internal error occurred"


def _shown_error(error: BaseException) -> bool:
    """Whether the API sends ``error``'s message (see ``_SHOWN_ERRORS``)."""
    return any(kind.__name__ in _SHOWN_ERRORS for kind in type(error).__mro__)


def _error_data(error: BaseException) -> dict[str, str]:
    """The API's ``{error, message}`` for ``error``: its message if of a type the API sends
    it for, or of a subclass of one (the exception is at hand, unlike a stored error's)."""
    message = str(error) if _shown_error(error) else _INTERNAL_ERROR_TEXT
    return {"error": type(error).__name__, "message": message}


def _encode_part(event: Event) -> bytes:
    """One stored part as the SSE block the SDKs read: ``id``, ``event``, ``data``."""
    kind = event.type
    if kind == END:
        body = b'{"status":"success"}'
        kind = "end"
    elif kind == CANCELLED:
        body = b'{"status":"interrupted"}'
        kind = "end"
    elif kind == ERROR:
        body = orjson.dumps(
            {"error": event.data.get("error"), "message": event.data.get("message")}
        )
    else:
        body = orjson.dumps(event.data.get("data"))
    # Both SDKs end a stream on `end` or `error` without asking the run's status
    # (langgraph-sdk: _async/http.py; @langchain/langgraph-sdk: client/base.ts).
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (event.offset.encode(), kind.encode(), body)


class _RunParts(StreamConsumer):
    """The events of run ``epoch`` of a thread's stream (after ``after``); none once a
    later run of the thread replaced it: that run is over, not lost. With ``modes`` (the
    graph's stream modes), only the parts of those modes, and ``metadata`` and the end."""

    def __init__(
        self,
        transport: Transport,
        stream_id: str,
        epoch: int,
        after: str | None,
        modes: frozenset[str] | None = None,
    ) -> None:
        super().__init__(transport, stream_id, after=after, epoch=epoch)
        self._run_epoch = epoch
        self._first = True
        self._modes = modes

    async def __anext__(self) -> Event:
        while True:
            event = await self._next_part()
            if self._modes is None or event.terminal or event.type == "metadata":
                return event
            if event.type.partition("|")[0] in self._modes:  # a subgraph's: "mode|ns"
                return event

    async def _next_part(self) -> Event:
        if not self._first:
            return await super().__anext__()
        self._first = False
        try:
            return await super().__anext__()
        except OffsetExpired:
            info = await self.transport.info(self.stream_id)
            if info is None or info.epoch <= self._run_epoch:
                raise  # the run's own events are gone
            raise StopAsyncIteration from None


class _Closed:
    """``source``, calling ``on_close`` once it is closed. A run cancelled before its
    first step closes its source unstarted, and an async generator closed unstarted never
    runs its ``finally``: a queued run cancelled at once kept the runs behind it waiting."""

    __slots__ = ("_on_close", "_source")

    def __init__(self, source: AsyncGenerator[Event, None], on_close: Callable[[], None]) -> None:
        self._source = source
        self._on_close = on_close

    def __aiter__(self) -> _Closed:
        return self

    async def __anext__(self) -> Event:
        return await self._source.__anext__()

    async def aclose(self) -> None:
        try:
            await self._source.aclose()
        finally:
            self._on_close()


class _QueuedRunParts(StreamConsumer):
    """The parts of a queued run: none while it waits (its waiter's stream is read), then
    the run's from its first; the waiter's end (``cancelled``, or ``error`` for a waiter
    lost with its process) if it never starts."""

    def __init__(
        self,
        transport: Transport,
        stream_id: str,
        run_id: str,
        modes: frozenset[str] | None = None,
    ) -> None:
        super().__init__(transport, _waiter_id(stream_id, run_id))
        self._thread_stream = stream_id
        self._run: StreamConsumer | None = None
        self._modes = modes

    def _at_hand(self) -> bool:
        return super()._at_hand() if self._run is None else self._run._at_hand()

    async def __anext__(self) -> Event:
        if self._run is None:
            event = await super().__anext__()
            while event.type == _RUN_QUEUED:
                event = await super().__anext__()
            if event.type != _RUN_STARTED:
                return event  # the queued run ended before it started
            await super().aclose()
            epoch = int(event.data["epoch"])
            self._run = _RunParts(self.transport, self._thread_stream, epoch, None, self._modes)
        return await self._run.__anext__()

    async def aclose(self) -> None:
        await super().aclose()
        if self._run is not None:
            await self._run.aclose()


class _Outcome(StreamConsumer):
    """The answer of ``runs.wait`` and ``runs.join`` as one event: none until ``answer()``
    returns it (once the run ended), then its JSON body (see ``LangGraphRouter._outcome``)."""

    def __init__(
        self, transport: Transport, stream_id: str, answer: Callable[[], Awaitable[bytes]]
    ) -> None:
        super().__init__(transport, stream_id)
        self._answer = answer
        self._given = False

    def _at_hand(self) -> bool:
        return self._given

    async def __anext__(self) -> Event:
        if self._given:
            raise StopAsyncIteration
        body = await self._answer()
        self._given = True
        return Event(END, {"body": body}, "")


def _error_body(error: BaseException) -> bytes:
    """The API's ``__error__`` answer for ``error``: a library error's code and message as
    its HTTP answer has them (they name no internal address), else its type only (the
    details are in the server's log)."""
    if isinstance(error, ResumableStreamError):
        http = error_for(error)
        code, message = http.code, http.message
    else:
        code, message = type(error).__name__, "the answer failed; see the server's log"
    return orjson.dumps({"__error__": {"error": code, "message": message}})


# Keep-alive comments feed the SDKs' idle watchdog (3x the heartbeat interval, 6-30 s:
# @langchain/langgraph-sdk utils/stream.ts idleReconnectStream).
_PARTS_WIRE = WireFormat("sse", EVENT_STREAM_TYPE, _encode_part, PING)
# Newlines until the answer (JSON allows them in front of it); an error once the headers
# are out ends the body as the API's __error__ answer.
_OUTCOME_WIRE = WireFormat("ndjson", JSON_TYPE, lambda e: e.data["body"], b"\n", _error_body)


class _PartsResponse(StreamResponse):
    """A stream response writing stored LangGraph parts (see :func:`_encode_part`), or
    with ``wire=_OUTCOME_WIRE`` a run's outcome (:class:`_Outcome`)."""

    def __init__(
        self,
        consumer: StreamConsumer,
        request: Request,
        headers: Mapping[str, str],
        *,
        wire: WireFormat = _PARTS_WIRE,
        **kw: Any,
    ) -> None:
        super().__init__(consumer, request, format=wire.name, retry=None, **kw)
        self.wire = wire
        self.event_stream_client = False  # nothing to send is an empty 200, not a 204
        self.media_type = wire.media_type
        self.raw_headers = [
            *stream_headers(wire),
            *((k.lower().encode(), v.encode()) for k, v in headers.items()),
        ]


class LangGraphRouter:
    """An ASGI app with the LangGraph Agent Server endpoints the SDKs use, over your graphs.

    ``graphs`` maps assistant ids (the SDKs' ``assistantId``) to compiled graphs that share
    a checkpointer; a thread's state and history are read with the graph of its latest run
    (the first graph for a thread that names none). Each thread has one
    stream (``stream_id(thread_id)``, by default ``"langgraph:<thread_id>"``), and each run
    of the thread a new epoch of it, so one run of a thread is in progress at a time, in
    every process at once. A run asked for meanwhile does what its ``multitask_strategy``
    says, or ``multitask_strategy=`` for a request that names none (``"enqueue"``, the
    API's default): ``"enqueue"`` queues it, to start once the run in progress ended (see
    docs/langgraph-sdk.md); ``"reject"`` refuses it (409); ``"interrupt"`` cancels the run
    in progress (and the runs queued in this process) and starts the new one once that
    one ended, if it does within ``interrupt_timeout`` seconds (else 409); ``"rollback"``
    does the same, and the new run starts from the checkpoint the cancelled one started
    from. Runs are detached: they
    go on when the client goes away, unless it asked for ``on_disconnect: "cancel"`` (which
    ``useStream`` does unless ``reconnectOnMount`` is set); ``cancel_on_disconnect=False``
    ignores that request, so that only a cancel stops a run. ``limit`` (a
    :class:`~resumable_stream.starlette.ConnectionLimit`, say a ``StreamRouter``'s ``limit``)
    caps the run streams and joins served at once: past it, 503 ``too_many_streams``.

    ``authorize(request, thread_id, action)`` (``thread_id`` None for ``"create"``) may
    refuse with false (403) or raise Starlette's ``HTTPException`` (say 401). A thread
    created with an id of the client's is answered only if the caller may ``"read"`` it.
    ``create_thread(request, thread_id, metadata)``, if given, records a new thread in the
    app (the id is None when the client did not choose one) and returns its id.
    ``thread_info(request, thread_id)``, if given, returns the app's record of a thread
    (:class:`ThreadInfo`: its creation and update times and metadata; None for no such
    thread: 404), which ``GET /threads/{id}`` and ``POST /threads`` answer with; a run on a
    thread it has no record of is 404, unless the run asks for ``if_not_exists: "create"``
    and ``create_thread`` makes it. Without it,
    the times are those of the thread's first and latest checkpoints (two reads of the
    checkpointer, whatever the thread's history), and the metadata is empty.
    ``DELETE /threads/{id}`` (``threads.delete``) stops the thread's run in progress and
    the runs queued in this process, then deletes its checkpoints and its streams (holding
    the thread meanwhile: a run queued in another process starts after, on the emptied
    thread), and calls ``delete_thread(request, thread_id)``, if given, for the app to
    drop its record;
    with ``thread_info`` and without ``delete_thread`` it is not served (405): the app
    would keep a record of a thread without its state. It needs ``authorize`` to allow
    ``"delete"``, and ``"run"`` and ``"cancel"`` too, so that an ``authorize`` written
    before ``"delete"`` existed lets only those who may run and stop a thread delete it.
    ``update_thread(request, thread_id, metadata)``, if given (with ``thread_info``), merges
    the metadata ``PATCH /threads/{id}`` (``threads.update``) sends into the app's record;
    without it that is ``501 not_served``. ``POST /threads/{id}/copy`` (``threads.copy``)
    copies the thread's checkpoints into a new thread (``create_thread``'s, given the
    thread's metadata); ``POST /threads/count`` counts what the search below finds.
    ``search_threads(request, search)``, if given, answers ``POST /threads/search``: the ids
    of the threads the caller may see that match the :class:`ThreadSearch`, in its order and
    page. Without it, the search reads the first graph's checkpointer: every checkpoint of
    every thread (fine for an embedded app; give ``search_threads`` for many threads), a
    thread matching by the metadata its runs wrote into their checkpoints (``graph_id``,
    ``assistant_id``, the string, number and boolean values of the ``config``'s
    ``metadata``). Either way a thread ``authorize`` refuses to read is left out.
    """

    def __init__(
        self,
        transport: Transport,
        graphs: Mapping[str, Any],
        *,
        producer: StreamProducer | None = None,
        authorize: Callable[[Request, str | None, LangGraphAction], bool | Awaitable[bool]]
        | None = None,
        create_thread: Callable[[Request, str | None, dict[str, Any]], Awaitable[str]]
        | None = None,
        thread_info: Callable[[Request, str], Awaitable[ThreadInfo | None]] | None = None,
        delete_thread: Callable[[Request, str], Awaitable[None]] | None = None,
        update_thread: Callable[[Request, str, dict[str, Any]], Awaitable[None]] | None = None,
        search_threads: Callable[[Request, ThreadSearch], Awaitable[Sequence[str]]] | None = None,
        stream_id: Callable[[str], str] | None = None,
        cancel_on_disconnect: bool = True,
        multitask_strategy: MultitaskStrategy = "enqueue",
        interrupt_timeout: float = 15.0,
        ping_interval: float | None = DEFAULT_PING_INTERVAL,
        send_timeout: float | None = DEFAULT_SEND_TIMEOUT,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        limit: ConnectionLimit | None = None,
    ) -> None:
        _check_body_limit(max_body_bytes)
        if not graphs:
            raise ValueError("graphs must name at least one compiled graph")
        if authorize is None:
            raise ConfigurationError(
                "LangGraphRouter needs authorize=: a function (request, thread_id, action) that "
                "returns true when the caller may act on the thread (thread_id is None for "
                "'create'). Without one, anyone who knows a thread id could read, run and "
                "cancel it; if that is what you want, pass authorize=allow_all (from "
                "resumable_stream.starlette)."
            )
        self.transport = transport
        self.graphs = dict(graphs)
        self.producer = StreamProducer(transport) if producer is None else producer
        self.authorize = authorize
        self.create_thread = create_thread
        self.thread_info = thread_info
        self.delete_thread = delete_thread
        if update_thread is not None and thread_info is None:
            raise ConfigurationError(
                "update_thread needs thread_info: the metadata it keeps is read from there "
                "(without thread_info a thread's metadata is always empty)"
            )
        self.update_thread = update_thread
        self.search_threads = search_threads
        self.stream_id = stream_id or (lambda thread_id: f"langgraph:{thread_id}")
        self.cancel_on_disconnect = cancel_on_disconnect
        if multitask_strategy not in _STRATEGIES[1:]:
            raise ConfigurationError(
                f"multitask_strategy must be one of {list(_STRATEGIES[1:])}, "
                f"not {multitask_strategy!r}"
            )
        if multitask_strategy == "rollback" and not all(
            hasattr(getattr(graph, "checkpointer", None), "alist") for graph in graphs.values()
        ):
            raise ConfigurationError(
                "multitask_strategy='rollback' needs every graph compiled with a checkpointer"
            )
        self.multitask_strategy = multitask_strategy
        if not 0 < interrupt_timeout < math.inf:
            raise ConfigurationError("interrupt_timeout must be > 0 seconds, and finite")
        self.interrupt_timeout = interrupt_timeout
        self.ping_interval = ping_interval
        self.send_timeout = send_timeout
        self.max_body_bytes = max_body_bytes
        #: The cap on the stream responses of the router's routes (None: no cap).
        self.limit = limit
        self._state_graph = next(iter(self.graphs.values()))
        # Per thread stream, the turn of the last run queued in this process (see _enqueue).
        self._queues: dict[str, asyncio.Future[None]] = {}
        run = "/threads/{thread_id}/runs/{run_id}"
        self.routes: list[BaseRoute] = [
            Route("/info", self._endpoint(self.get_info), methods=["GET"]),
            Route("/threads", self._endpoint(self.post_thread), methods=["POST"]),
            Route("/threads/search", self._endpoint(self.search), methods=["POST"]),
            Route("/threads/{thread_id}", self._endpoint(self.get_thread), methods=["GET"]),
            Route(
                "/threads/{thread_id}/state", self._endpoint(self.update_state), methods=["POST"]
            ),
            Route("/threads/{thread_id}/runs", self._endpoint(self.create_run), methods=["POST"]),
            Route("/threads/{thread_id}/runs", self._endpoint(self.list_runs), methods=["GET"]),
            Route(
                "/threads/{thread_id}/runs/wait", self._endpoint(self.wait_run), methods=["POST"]
            ),
            Route(
                "/threads/{thread_id}/runs/stream",
                self._endpoint(self.stream_run),
                methods=["POST"],
            ),
            Route(run, self._endpoint(self.get_run), methods=["GET"]),
            Route(f"{run}/stream", self._endpoint(self.join_run), methods=["GET"]),
            Route(f"{run}/join", self._endpoint(self.wait_for_run), methods=["GET"]),
            Route(f"{run}/cancel", self._endpoint(self.cancel_run), methods=["POST"]),
            Route("/threads/{thread_id}/state", self._endpoint(self.get_state), methods=["GET"]),
            Route(
                "/threads/{thread_id}/state/checkpoint",
                self._endpoint(self.get_state),
                methods=["POST"],
            ),
            Route(
                "/threads/{thread_id}/state/{checkpoint_id}",
                self._endpoint(self.get_state),
                methods=["GET"],
            ),
            Route(
                "/threads/{thread_id}/history", self._endpoint(self.get_history), methods=["POST"]
            ),
        ]
        self.routes += [
            Route("/threads/count", self._endpoint(self.count_threads), methods=["POST"]),
            Route("/threads/{thread_id}", self._endpoint(self.patch_thread), methods=["PATCH"]),
            Route("/threads/{thread_id}/copy", self._endpoint(self.copy_thread), methods=["POST"]),
            Route(run, self._endpoint(self.delete_run), methods=["DELETE"]),
        ]
        if thread_info is None or delete_thread is not None:
            self.routes.append(
                Route(
                    "/threads/{thread_id}", self._endpoint(self.remove_thread), methods=["DELETE"]
                )
            )
        self._app = _JsonRouting(self.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    # --- plumbing -----------------------------------------------------------------------

    def _endpoint(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except _Refused as exc:
                return _error(exc.error)
            except HTTPException as exc:
                response = _error(http_status_error(exc.status_code, exc.detail))
                if exc.headers:
                    response.headers.update(exc.headers)
                return response
            except ResumableStreamError as exc:
                return _error(error_for(exc))

        return endpoint

    async def _check(
        self, request: Request, action: LangGraphAction, thread_id: str | None = None
    ) -> None:
        allowed = self.authorize(request, thread_id, action)
        if inspect.isawaitable(allowed):
            allowed = await allowed
        if not allowed:
            raise _Refused(HTTPError(403, "forbidden", "not allowed to access this thread"))

    async def _thread(self, request: Request, action: LangGraphAction) -> tuple[str, str]:
        """The thread id of the path, authorized for ``action``, and its stream id."""
        thread_id = request.path_params["thread_id"]
        await self._check(request, action, thread_id)
        return thread_id, check_stream_id(self.stream_id(thread_id))

    async def _body(self, request: Request) -> dict[str, Any]:
        raw = await _read_json_body(request, self.max_body_bytes)
        if isinstance(raw, HTTPError):
            raise _Refused(raw)
        if not raw:
            return {}
        try:
            body = loads_json(raw)
        except orjson.JSONDecodeError:
            raise _bad("the body must be JSON in UTF-8") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        return body

    def _config(self, thread_id: str, extra: Any = None) -> dict[str, Any]:
        config = dict(extra) if isinstance(extra, Mapping) else {}
        configurable = config.get("configurable")
        config["configurable"] = {
            **(configurable if isinstance(configurable, Mapping) else {}),
            "thread_id": thread_id,
        }
        return config

    # --- threads ------------------------------------------------------------------------

    async def _require_thread(self, request: Request, thread_id: str) -> None:
        """``404 thread_not_found`` for a thread the app has no record of (``thread_info``);
        without ``thread_info`` every id is a thread."""
        if self.thread_info is not None:
            await self._info(request, thread_id)

    async def _info(self, request: Request, thread_id: str) -> ThreadInfo:
        """The app's record of the thread (``thread_info``), else what its checkpoints say."""
        if self.thread_info is not None:
            info = await self.thread_info(request, thread_id)
            if info is None:
                raise _Refused(HTTPError(404, "thread_not_found", f"no thread {thread_id!r}"))
            return info
        now = datetime.now(UTC)
        saver: Any = getattr(self._state_graph, "checkpointer", None)
        if not hasattr(saver, "alist"):
            return ThreadInfo(now, now)
        # The thread's own checkpoints (not its subgraphs'): the latest, and the first,
        # found by the checkpointer rather than by reading them all: LangGraph numbers a
        # run's input on a new thread step -1, and a state update there step 0 (then -1,
        # 0... go on from the latest step). All of them only for a thread with neither.
        root = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        latest = [_stamp(item) async for item in saver.alist(root, limit=1)]
        first: list[datetime | None] = []
        for step in (-1, 0, None):
            found = saver.alist(root, filter=None if step is None else {"step": step})
            first = [_stamp(item) async for item in found]
            if any(first):
                break
        stamps = [stamp for stamp in (*latest, *first) if stamp is not None]
        if not stamps:
            return ThreadInfo(now, now)
        return ThreadInfo(min(stamps), max(stamps))

    async def _graph_of(self, thread_id: str) -> Any:
        """The graph that reads the thread's state (see :meth:`_thread_graph`)."""
        return (await self._thread_graph(thread_id))[1]

    async def _thread_graph(self, thread_id: str) -> tuple[str, Any]:
        """The graph that reads the thread's state, and its id: the one its latest
        checkpoint names (each run and state update writes its ``graph_id`` there), as the
        API reads a thread with its own graph (another graph knows none of its nodes: no
        next step, no interrupt); the first graph for a thread that names none."""
        first = next(iter(self.graphs))
        saver: Any = getattr(self._state_graph, "checkpointer", None)
        if len(self.graphs) == 1 or not hasattr(saver, "aget_tuple"):
            return first, self._state_graph
        latest = await saver.aget_tuple(self._config(thread_id))
        graph_id = ((latest.metadata if latest is not None else None) or {}).get("graph_id")
        if isinstance(graph_id, str) and graph_id in self.graphs:
            return graph_id, self.graphs[graph_id]
        return first, self._state_graph

    def _thread_record(
        self,
        thread_id: str,
        info: ThreadInfo,
        status: str,
        values: Any = None,
        interrupts: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "thread_id": thread_id,
            "created_at": _aware(info.created_at).isoformat(),
            "updated_at": _aware(info.updated_at).isoformat(),
            "metadata": to_wire(info.metadata),
            "status": status,
            "values": values,
            "interrupts": interrupts or {},
        }

    async def post_thread(self, request: Request) -> Response:
        """``POST /threads``: a new thread (its id chosen by the client or made here)."""
        body = await self._body(request)
        await self._check(request, "create")
        thread_id = body.get("thread_id")
        metadata = _metadata_of(body)
        if thread_id is not None and (not isinstance(thread_id, str) or not thread_id):
            # (An empty id makes a thread no /threads/{thread_id} URL can name.)
            raise _bad("'thread_id' must be a non-empty string")
        named = thread_id is not None
        if isinstance(thread_id, str):  # refused before the app records a thread no URL serves
            check_stream_id(self.stream_id(thread_id))
        if self.create_thread is not None:
            thread_id = await self.create_thread(request, thread_id, metadata)
        elif thread_id is None:
            thread_id = str(uuid.uuid4())
        check_stream_id(self.stream_id(thread_id))
        if named:
            # The answer is the thread's record, as GET /threads/{id} gives it: an id of
            # the client's may name a thread that exists, someone else's.
            await self._check(request, "read", thread_id)
        info = await self._info(request, thread_id)
        if self.thread_info is None:
            info = dataclasses.replace(info, metadata=metadata)  # kept by no one: echoed
        return _json(200, self._thread_record(thread_id, info, "idle"))

    async def get_thread(self, request: Request) -> Response:
        """``GET /threads/{thread_id}``: the thread, ``busy`` while a run is in progress."""
        thread_id, _ = await self._thread(request, "read")
        return _json(200, await self._thread_json(thread_id, await self._info(request, thread_id)))

    async def _thread_json(self, thread_id: str, record: ThreadInfo) -> dict[str, Any]:
        """The API's ``Thread``: ``busy`` while a run is in progress, ``error`` once a run
        failed (its failed task is still next), ``interrupted`` at an interrupt, else
        ``idle`` (also once a run was cancelled, as the API has it); its values, and the
        interrupts its next tasks wait at."""
        stream = await settled_info(self.transport, check_stream_id(self.stream_id(thread_id)))
        graph = await self._graph_of(thread_id)
        state = await graph.aget_state(self._config(thread_id))
        status = "busy" if stream is not None and stream.status == "running" else "idle"
        errors = [task.error for task in state.tasks if task.error is not None]
        if status != "idle" or any(map(_cancellation, errors)):
            # A cancelled run's thread is idle (@langchain/langgraph-api queue.mjs: an
            # interrupted run sets no exception, and no checkpoint: no next step either).
            pass
        elif errors:
            status = "error"
        elif state.next:
            status = "interrupted"
        # The interrupts its next tasks wait at, by task id, as the API's Thread has them.
        interrupts = {
            task.id: _wire_json(task.interrupts) for task in state.tasks if task.interrupts
        }
        return self._thread_record(thread_id, record, status, _wire_json(state.values), interrupts)

    async def get_info(self, request: Request) -> Response:
        """``GET /info``: what this server serves (Agent Chat UI checks that it answers)."""
        return _json(200, {"flags": {"assistants": False, "crons": False, "langsmith": False}})

    async def search(self, request: Request) -> Response:
        """``POST /threads/search`` (``threads.search``): the threads the caller may read
        that match (see ``search_threads`` in the class's docs), as ``GET /threads/{id}``
        answers each."""
        search, select = _thread_search(await self._body(request))
        found: list[tuple[str, ThreadInfo | None]]
        if self.search_threads is not None:
            ids = list(await self.search_threads(request, search))[: search.limit]
            found, skip = [(thread_id, None) for thread_id in ids], 0
        else:
            # Paged here, over the threads the caller may read: paged before, a page of
            # other users' threads came out empty while the caller's own were further on.
            found, skip = await self._search_checkpoints(search), search.offset
        records: list[dict[str, Any]] = []
        for thread_id, info in found:
            if len(records) == search.limit:
                break
            try:
                await self._check(request, "read", thread_id)
                # The app's record, as threads.get answers (None: one the app dropped).
                if info is None or self.thread_info is not None:
                    info = await self._info(request, thread_id)
            except (_Refused, HTTPException):
                continue  # not the caller's to read, or gone
            if skip:
                skip -= 1
                continue
            records.append(await self._thread_json(thread_id, info))
        if select:
            records = [{key: record[key] for key in select} for record in records]
        return _json(200, records)

    async def _search_checkpoints(
        self, search: ThreadSearch
    ) -> list[tuple[str, ThreadInfo | None]]:
        """The threads of the first graph's checkpointer that match ``search``, with the
        times of their first and latest matching checkpoints, sorted (not paged: see
        :meth:`search`)."""
        saver: Any = getattr(self._state_graph, "checkpointer", None)
        if not hasattr(saver, "alist"):
            return []
        times: dict[str, tuple[datetime, datetime]] = {}
        try:
            # Every thread's checkpoints; those of subgraphs (a checkpoint_ns) are left out.
            async for item in saver.alist(None, filter=dict(search.metadata) or None):
                configurable = item.config.get("configurable", {})
                thread_id = configurable.get("thread_id")
                if configurable.get("checkpoint_ns") or not isinstance(thread_id, str):
                    continue
                if search.ids is not None and thread_id not in search.ids:
                    continue
                try:
                    stamp = _aware(datetime.fromisoformat(item.checkpoint["ts"]))
                except (KeyError, TypeError, ValueError):
                    continue  # a checkpoint without a readable time says nothing
                first, last = times.get(thread_id, (stamp, stamp))
                times[thread_id] = (min(first, stamp), max(last, stamp))
        except ValueError:
            # AsyncSqliteSaver (sqlite/utils.py _validate_filter_key) takes keys of letters,
            # digits, "_", "." and "-" only.
            logger.info("threads.search: the checkpointer refused a filter", exc_info=True)
            raise _bad(
                f"this server's checkpointer cannot search by the metadata keys "
                f"{sorted(search.metadata)}",
                "search_not_served",
            ) from None
        found: list[tuple[str, ThreadInfo | None]] = [
            (thread_id, ThreadInfo(*span)) for thread_id, span in times.items()
        ]
        by = search.sort_by or "updated_at"
        found.sort(
            key=lambda pair: pair[0] if by == "thread_id" else getattr(pair[1], by),
            reverse=search.sort_order != "asc",
        )
        return found

    async def get_state(self, request: Request) -> Response:
        """``GET /threads/{thread_id}/state``: the thread's latest checkpoint; ``GET
        .../state/{checkpoint_id}`` and ``POST .../state/checkpoint`` (``{"checkpoint"}``):
        the one named. ``subgraphs`` (a query parameter, or in the body): with the state of
        each subgraph its tasks are in (their ``state``)."""
        thread_id, _ = await self._thread(request, "read")
        subgraphs = request.query_params.get("subgraphs", "").lower() in ("1", "true")
        point: dict[str, str] = {}
        if "checkpoint_id" in request.path_params:
            point = _fork_point(None, request.path_params["checkpoint_id"])
        elif request.method == "POST":
            body = await self._body(request)
            checkpoint = body.get("checkpoint")
            if not isinstance(checkpoint, dict):
                raise _bad("'checkpoint' must be a checkpoint: {checkpoint_id, ...}")
            point = _state_point(checkpoint, None)
            subgraphs = body.get("subgraphs") is True
        graph = await self._graph_of(thread_id)
        config = self._config(thread_id, {"configurable": point})
        if point:
            await _require_checkpoint(graph, config, thread_id)
        state = await graph.aget_state(config, subgraphs=subgraphs)
        return _json(200, _state_json(state, thread_id))

    async def get_history(self, request: Request) -> Response:
        """``POST /threads/{thread_id}/history``: checkpoints, newest first (``limit``)."""
        thread_id, _ = await self._thread(request, "read")
        body = await self._body(request)
        limit = body.get("limit", 10)
        if type(limit) is not int or limit < 1:
            raise _bad("'limit' must be a positive integer")
        before = body.get("before")
        if isinstance(before, str):  # langgraph-sdk (client.py get_history): an id, or...
            before = {"checkpoint_id": before}
        elif isinstance(before, Mapping) and isinstance(before.get("configurable"), Mapping):
            before = before["configurable"]  # @langchain/langgraph-sdk (getHistory): a Config
        kwargs: dict[str, Any] = {"limit": min(limit, 1000)}
        if isinstance(before, Mapping) and before.get("checkpoint_id"):  # ...a checkpoint
            if not isinstance(before["checkpoint_id"], str) or not isinstance(
                before.get("checkpoint_ns", ""), str
            ):
                raise _bad("'before' must be a checkpoint id or a checkpoint of string ids")
            kwargs["before"] = self._config(thread_id, {"configurable": dict(before)})
        if metadata := _metadata_of(body):
            kwargs["filter"] = metadata
        graph = await self._graph_of(thread_id)
        states = [
            _state_json(state, thread_id)
            async for state in graph.aget_state_history(self._config(thread_id), **kwargs)
        ]
        return _json(200, states)

    async def update_state(self, request: Request) -> Response:
        """``POST /threads/{thread_id}/state`` (``threads.update_state``): ``values`` written
        as if node ``as_node`` returned them (LangGraph's ``aupdate_state``, with the
        thread's own graph), on the latest checkpoint or the one ``checkpoint`` /
        ``checkpoint_id`` names (a fork there); answers the new ``{"checkpoint"}``. A
        write, as a run's: ``authorize`` is asked for ``"run"``, and a thread with a run in
        progress (or queued here) is ``409 thread_busy``, as in the API. The thread is held
        while the update writes: a run asked for meanwhile comes after it, or is refused."""
        thread_id, stream_id = await self._thread(request, "run")
        body = await self._body(request)
        values, as_node = body.get("values"), body.get("as_node")
        if values is not None and not isinstance(values, dict | list):
            raise _bad("'values' must be an object, a list of them, or null")
        if as_node is not None and not isinstance(as_node, str):
            raise _bad("'as_node' must be a node name")
        point = _state_point(body.get("checkpoint"), body.get("checkpoint_id"))
        await self._require_thread(request, thread_id)
        graph_id, graph = await self._thread_graph(thread_id)
        saver: Any = getattr(graph, "checkpointer", None)
        if not hasattr(saver, "aget_tuple"):
            raise _bad(
                "this server's graph keeps no state (no checkpointer) to update",
                "update_not_served",
            )
        config = self._config(thread_id, {"configurable": {"checkpoint_ns": "", **point}})
        if point:
            await _require_checkpoint(graph, config, thread_id)
        busy = _Refused(
            HTTPError(
                409,
                "thread_busy",
                f"thread {thread_id!r} has a run in progress or queued; update its state "
                "once it ended, or cancel it first",
            )
        )
        # langgraph-api (ops Threads.State.post) refuses while a run is pending or running:
        # the run would write over the update, or start from it unawares. The thread is
        # held meanwhile (see _held_for_update): a run asked for then comes after.
        if self._queued_here(stream_id):
            raise busy
        owner = f"update-{secrets.token_hex(8)}"
        try:
            hold = await self.transport.create(stream_id, owner, self.producer.lease_ms)
        except StreamAlreadyRunning:
            raise busy from None
        from langgraph.errors import InvalidUpdateError

        # The graph's id in the update's checkpoint, as in a run's: the thread is read
        # with its own graph after (see _thread_graph).
        config["metadata"] = {"graph_id": graph_id, "assistant_id": graph_id}
        try:
            async with self._held_for_update(stream_id, owner, hold.epoch):
                written = await graph.aupdate_state(config, values, as_node=as_node)
        except InvalidUpdateError as exc:  # no such node, an ambiguous update...
            raise _bad(str(exc).split("\n")[0]) from None
        except Exception as exc:
            # A channel's reducer that raised on the value given (add_messages on what is
            # no message, operator.add of a list and a number): nothing was written.
            channel = _refusing_channel(exc)
            if channel is None:
                raise
            first_line = str(exc).split("\n")[0]
            raise _bad(
                f"'values.{channel}' refused by the graph: {type(exc).__name__}: {first_line}"
            ) from None
        return _json(200, {"checkpoint": _checkpoint(written, thread_id)})

    @contextlib.asynccontextmanager
    async def _held_for_update(self, stream_id: str, owner: str, epoch: int) -> AsyncIterator[None]:
        """Hold the thread for a state update (``owner``'s run ``epoch`` of its stream,
        created by the caller) while the block writes: its first entry says it is no run
        (``runs.list`` leaves it out); it ends ``completed`` after the block, whatever the
        block did. A storage fault past the write-retry budget on its first entry is raised
        (nothing was written; the hold lapses with its lease), on its end only logged: the
        block's outcome stands, and the thread is busy until the lease lapses. A first entry
        the storage lost after acknowledging it is written again before the end."""
        marker = encode_entry([(_STATE_UPDATE, {})])
        await self._append_retrying(stream_id, owner, Entry(epoch, 1, marker), 1)
        try:
            async with self._renewed(stream_id, owner):
                yield
        finally:
            end = Entry(epoch, 2, encode_entry([(END, {})]))
            try:
                try:
                    await self._append_retrying(stream_id, owner, end, 1, "completed")
                except StorageRollback as exc:
                    if exc.last_seq != 0:
                        raise
                    # The storage lost the first entry it had acknowledged (a failover to
                    # a lagging replica): written again, then the end.
                    await self._append_retrying(stream_id, owner, Entry(epoch, 1, marker), 1)
                    await self._append_retrying(stream_id, owner, end, 1, "completed")
            except ResumableStreamError:
                logger.warning(
                    "stream %s: ending a state update's hold failed; the thread is busy "
                    "until its lease lapses",
                    stream_id,
                    exc_info=True,
                )

    async def _append_retrying(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        """Append an entry of a hold, retrying a transient fault within the producer's
        write-retry budget, as a run's writes are (appends are idempotent per seq)."""
        give_up = time.monotonic() + self.producer.write_retry_budget
        delay = 0.02
        while True:
            try:
                await self.transport.append(stream_id, owner, entry, count, final)
                return
            except (BackendRefused, TransportClosed):
                raise  # a retry will not fix it
            except TransportError:
                if time.monotonic() + delay > give_up:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    @contextlib.asynccontextmanager
    async def _renewed(self, stream_id: str, owner: str) -> AsyncIterator[None]:
        """Renew the lease of ``owner``'s hold on the thread's stream (every third of it,
        as a run's heartbeat does) while the block runs: a hold whose lease lapsed lets a
        run take the thread, however long the block has still to go."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.producer.lease / 3)
                try:
                    await self.transport.renew(stream_id, owner, self.producer.lease_ms)
                except ResumableStreamError:  # a fault a later renewal may get past
                    logger.warning("stream %s: renewing a hold failed", stream_id, exc_info=True)

        renewing = asyncio.create_task(renew())
        try:
            yield
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)

    def _queued_here(self, stream_id: str) -> list[str]:
        """The waiters of the runs queued on ``stream_id`` in this process."""
        queued = f"{stream_id}~queued~"
        return [sid for sid in self.producer.runs if sid.startswith(queued)]

    async def remove_thread(self, request: Request) -> Response:
        """``DELETE /threads/{thread_id}`` (``threads.delete``): stop the thread's run in
        progress (as ``multitask_strategy`` ``"interrupt"`` does, 409 if it does not end
        within ``interrupt_timeout``) and its runs queued here, delete its checkpoints and
        its streams, then call ``delete_thread``. 204."""
        thread_id, stream_id = await self._thread(request, "delete")
        await self._check(request, "run", thread_id)
        await self._check(request, "cancel", thread_id)
        await self._require_thread(request, thread_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.interrupt_timeout
        # The queued runs first, so that none takes the thread once its run stopped.
        waiters = self._queued_here(stream_id)
        for waiter_id in waiters:
            waiter = self.producer.runs.get(waiter_id)
            await self.producer.cancel(waiter_id)
            if waiter is not None:
                with contextlib.suppress(ResumableStreamError):  # it ended, unwritten
                    await waiter.wait()
        # The thread is held (a run of no producer on its stream) while its checkpoints go:
        # a run queued in another process would start from them, and be cut by the delete
        # of the stream. It starts once the thread is deleted.
        owner = f"delete-{secrets.token_hex(8)}"
        while True:
            if await self._stop_current_run(stream_id, deadline) is None:
                raise self._busy(thread_id, "interrupt")
            try:
                await self.transport.create(stream_id, owner, self.producer.lease_ms)
                break
            except StreamAlreadyRunning:  # another run took the thread once that one ended
                if loop.time() >= deadline:
                    raise self._busy(thread_id, "interrupt") from None
        try:
            async with self._renewed(stream_id, owner):
                # Graphs may share a checkpointer: each one once.
                graphs = self.graphs.values()
                savers: list[Any] = [getattr(graph, "checkpointer", None) for graph in graphs]
                for saver in {id(saver): saver for saver in savers}.values():
                    if hasattr(saver, "adelete_thread"):
                        await saver.adelete_thread(thread_id)
        finally:
            await self.transport.delete(stream_id)  # the hold, and the thread's runs with it
        for deleted in waiters:
            await self.transport.delete(deleted)
        if self.delete_thread is not None:
            await self.delete_thread(request, thread_id)
        return Response(status_code=204, headers={"cache-control": "no-store"})

    # --- runs ---------------------------------------------------------------------------

    async def _run_thread(self, request: Request) -> tuple[str, str, dict[str, Any]]:
        """The thread a ``runs`` request names, authorized to ``"run"``, its stream id and
        the request's body. ``if_not_exists``: with ``thread_info``, a thread the app has
        no record of is ``404 thread_not_found`` (``"reject"``, the default), or is created
        with ``create_thread`` first (``"create"``), as the API creates it; without
        ``thread_info`` every thread exists."""
        thread_id = request.path_params["thread_id"]
        check_stream_id(self.stream_id(thread_id))  # (before create_thread records it)
        body = await self._body(request)
        if_not_exists = body.get("if_not_exists")
        if if_not_exists not in (None, "reject", "create"):
            raise _bad("'if_not_exists' must be 'reject' or 'create'")
        create = self.create_thread if if_not_exists == "create" else None
        assistant_id = body.get("assistant_id")
        # (Not for a run refused below: an unknown assistant creates no thread. The right to
        # create is asked for a thread to make only: a caller may run one it may not make.)
        if (
            create is not None
            and self.thread_info is not None
            and isinstance(assistant_id, str)
            and assistant_id in self.graphs
            and await self.thread_info(request, thread_id) is None
        ):
            await self._check(request, "create")
            await create(
                request, thread_id, {"graph_id": assistant_id, "assistant_id": assistant_id}
            )
        thread_id, stream_id = await self._thread(request, "run")
        await self._require_thread(request, thread_id)
        return thread_id, stream_id, body

    async def _plan(self, thread_id: str, body: dict[str, Any]) -> _Plan:
        """The run a ``runs`` request asks for, checked (else 404 or 422)."""
        assistant_id = body.get("assistant_id")
        graph = self.graphs.get(assistant_id) if isinstance(assistant_id, str) else None
        if graph is None:
            raise _Refused(
                HTTPError(
                    404,
                    "assistant_not_found",
                    f"no assistant {assistant_id!r}; this server has {sorted(self.graphs)}",
                )
            )
        # The API's options this server does not act on: ignored, the client would wait
        # for a webhook that never comes, or see a run start before its time.
        if body.get("webhook"):
            raise _bad("'webhook' is not served: join or wait for the run", "webhook_not_served")
        if body.get("after_seconds") not in (None, 0):
            raise _bad(
                "'after_seconds' is not served: runs start at once (or in their turn)",
                "after_seconds_not_served",
            )
        modes = _stream_modes(body.get("stream_mode"))
        graph_modes = ["messages" if m == "messages-tuple" else m for m in modes if m != "tools"]
        tools = "tools" in modes
        if tools and "custom" not in graph_modes:
            graph_modes.append("custom")  # the tool events' way out (see _tool_events)
        inputs = body.get("input")
        command = body.get("command")
        if command:
            from langgraph.types import Command

            inputs = Command(**_command(command))
        config = self._config(thread_id, _run_config(body.get("config")))
        config["configurable"].update(
            _fork_point(body.get("checkpoint"), body.get("checkpoint_id"))
        )
        # Named by the fields above, or as LangGraph's own config does.
        checkpoint_id = config["configurable"].get("checkpoint_id")
        if checkpoint_id is not None and not isinstance(checkpoint_id, str):
            raise _bad("'config.configurable.checkpoint_id' must be a string")
        if checkpoint_id:
            await _require_checkpoint(graph, config, thread_id)
        kwargs: dict[str, Any] = {"stream_mode": graph_modes}
        if body.get("stream_subgraphs"):
            kwargs["subgraphs"] = True
        metadata = _metadata_of(body)
        context = body.get("context")
        if context is not None and not isinstance(context, dict):
            raise _bad("'context' must be an object")  # (it was dropped, as if not given)
        if context is not None:
            kwargs["context"] = context
        durability = _durability(body.get("durability"), body.get("checkpoint_during"))
        if durability is not None:
            kwargs["durability"] = durability
        for key in ("interrupt_before", "interrupt_after"):
            nodes = body.get(key)
            if nodes:
                if nodes != "*" and not _strings(nodes):
                    raise _bad(f'{key!r} must be "*" or a list of node names')
                kwargs[key] = nodes
        strategy = body.get("multitask_strategy")
        if strategy not in _STRATEGIES:
            raise _bad(f"'multitask_strategy' must be one of {list(_STRATEGIES[1:])}")
        if strategy is None:
            strategy = self.multitask_strategy
        if strategy == "rollback" and not hasattr(getattr(graph, "checkpointer", None), "alist"):
            raise _bad(
                "multitask_strategy 'rollback' is not served for a graph without a "
                "checkpointer; use 'interrupt'",
                "rollback_not_served",
            )
        return _Plan(
            graph,
            inputs,
            config,
            kwargs,
            strategy,
            bool(checkpoint_id),
            tools,
            "custom" in modes,
            str(assistant_id),
            metadata,
        )

    async def _start(self, plan: _Plan, stream_id: str, run_id: str | None = None) -> int:
        """Start the planned run on the thread's stream; return its epoch. Its run id is
        ``run_id`` (a queued run's), else the one its epoch makes. Raises
        ``StreamAlreadyRunning`` while another run of the thread is in progress."""
        started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        source = _run_source(plan, started)
        try:
            run = await self.producer.start(source, stream_id=stream_id, events=_parts)
        except BaseException:
            await source.aclose()
            raise
        started.set_result(run_id or run_id_for(stream_id, run.epoch))
        return run.epoch

    async def _launch(
        self, request: Request, plan: _Plan, thread_id: str, stream_id: str
    ) -> tuple[str, int | None]:
        """Start the run, or queue it (``enqueue`` while the thread is busy): its run id,
        and its epoch (None while it is queued)."""
        strategy = plan.strategy
        try:
            if strategy == "enqueue" and stream_id in self._queues:
                raise StreamAlreadyRunning(stream_id)  # runs queued here go first
            epoch = await self._start(plan, stream_id)
        except StreamAlreadyRunning:
            if strategy == "enqueue":
                return await self._enqueue(plan, stream_id), None
            if strategy not in ("interrupt", "rollback"):
                raise self._busy(thread_id, strategy) from None
            await self._check(request, "cancel", thread_id)  # it stops the run in progress
            epoch = await self._replace(plan, thread_id, stream_id)
        return run_id_for(stream_id, epoch), epoch

    async def _replace(self, plan: _Plan, thread_id: str, stream_id: str) -> int:
        """``interrupt`` / ``rollback``: cancel the thread's run in progress and the runs
        queued in this process (as the API's strategies replace what is pending), then
        start the run once the thread is free; a run queued in another process that takes
        the thread first is stopped too, until ``interrupt_timeout`` (then 409)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.interrupt_timeout
        for waiter_id in self._queued_here(stream_id):
            await self.producer.cancel(waiter_id)
        first = True
        while True:
            stopped = await self._stop_current_run(stream_id, deadline)
            if stopped is None:
                raise self._busy(thread_id, plan.strategy)
            if first and plan.strategy == "rollback" and not plan.fork and stopped:
                point = await self._rollback_point(plan.graph, thread_id, stopped)
                plan.config["configurable"].update(point)
            first = False
            try:
                return await self._start(plan, stream_id)
            except StreamAlreadyRunning:  # another run took the thread once that one ended
                if loop.time() >= deadline:
                    raise self._busy(thread_id, plan.strategy) from None

    async def create_run(self, request: Request) -> Response:
        """``POST /threads/{thread_id}/runs``: start a run in the background (or queue it,
        with ``multitask_strategy`` ``"enqueue"``); answer with the run."""
        thread_id, stream_id, body = await self._run_thread(request)
        plan = await self._plan(thread_id, body)
        run_id, epoch = await self._launch(request, plan, thread_id, stream_id)
        now = datetime.now(UTC).isoformat()
        return _json(
            200,
            {
                "run_id": run_id,
                "thread_id": thread_id,
                "assistant_id": body["assistant_id"],
                "created_at": now,
                "updated_at": now,
                "status": "pending" if epoch is None else "running",
                "metadata": plan.metadata,
                "kwargs": {},
                "multitask_strategy": plan.strategy,
            },
            {"Content-Location": f"/threads/{thread_id}/runs/{run_id}"},
        )

    async def stream_run(self, request: Request) -> Response:
        """``POST /threads/{thread_id}/runs/stream``: start a run (or queue it) and stream it."""
        thread_id, stream_id, body = await self._run_thread(request)
        plan = await self._plan(thread_id, body)
        run_id, epoch = await self._launch(request, plan, thread_id, stream_id)
        consumer: StreamConsumer
        if epoch is None:
            consumer = _QueuedRunParts(self.transport, stream_id, run_id)
        else:
            consumer = StreamConsumer(self.transport, stream_id, epoch=epoch)
        on_disconnect = None
        if self.cancel_on_disconnect and body.get("on_disconnect") == "cancel":

            async def on_disconnect() -> None:
                await self._cancel_on_disconnect(request, thread_id, stream_id, run_id)

        location = f"/threads/{thread_id}/runs/{run_id}"
        return _PartsResponse(
            consumer,
            request,
            # langgraph-sdk (client/base.ts getRunMetadataFromResponse) reads the run id
            # from Content-Location; both SDKs reconnect to Location, relative to apiUrl.
            {"Content-Location": location, "Location": f"{location}/stream"},
            ping_interval=self.ping_interval,
            send_timeout=self.send_timeout,
            limit=self.limit,
            on_disconnect=on_disconnect,
        )

    async def wait_run(self, request: Request) -> Response:
        """``POST /threads/{thread_id}/runs/wait`` (``runs.wait``): start a run (or queue
        it) and answer with the thread's values once it ended (see :meth:`_outcome`)."""
        thread_id, stream_id, body = await self._run_thread(request)
        plan = await self._plan(thread_id, body)
        run_id, _ = await self._launch(request, plan, thread_id, stream_id)
        run = await self._resolve(thread_id, stream_id, run_id)
        on_disconnect = None
        if self.cancel_on_disconnect and body.get("on_disconnect") == "cancel":

            async def on_disconnect() -> None:
                await self._cancel_on_disconnect(request, thread_id, stream_id, run_id)

        return self._outcome(request, run, plan.graph, on_disconnect)

    async def wait_for_run(self, request: Request) -> Response:
        """``GET .../runs/{run_id}/join`` (``runs.join``): the values the run ended with,
        once it ended (see :meth:`_outcome`)."""
        run = await self._run_info(request, "read")
        return self._outcome(request, run, await self._graph_of(run.thread_id), None)

    def _outcome(
        self,
        request: Request,
        run: _RunRef,
        graph: Any,
        on_disconnect: Callable[[], Awaitable[None]] | None,
    ) -> Response:
        """Once the run ended, the thread's values as the run left them (at the last
        checkpoint it wrote, whatever later runs and state updates wrote since; with
        ``__interrupt__`` when it stopped at an interrupt), or ``{"__error__": {error,
        message}}`` if it failed (``run_values_gone`` for a run that wrote no checkpoint
        and is no longer the thread's latest): the API's answer to ``runs.wait`` and
        ``runs.join``. Until then, a newline every
        ``ping_interval`` keeps the connection open (the JSON parses with them)."""

        async def answer() -> bytes:
            epoch, end = await self._end_of(run)
            if end is not None and end.type == ERROR:
                error = {"error": end.data.get("error"), "message": end.data.get("message")}
                return orjson.dumps({"__error__": error})
            try:
                state, own = await self._final_state(run, graph, epoch if end is not None else None)
            except Exception as exc:  # the checkpointer's: answered, not a cut response
                logger.warning("thread %s: reading its state failed", run.thread_id, exc_info=True)
                return _error_body(exc)
            if state is None:
                gone = {
                    "error": "run_values_gone",
                    "message": f"run {run.run_id!r} wrote no checkpoint (it never started, or "
                    "stopped before its first step) and is no longer the thread's latest run: "
                    "the values it ended with are not kept",
                }
                return orjson.dumps({"__error__": gone})
            failed = _failure(state) if own else None
            if failed is not None:  # an earlier run's failure, as its checkpoint keeps it
                return orjson.dumps({"__error__": failed})
            interrupts = to_wire(getattr(state, "interrupts", ()))
            if not interrupts:
                return orjson.dumps(_wire_json(state.values))
            values = to_wire(state.values)
            if isinstance(values, dict):
                values["__interrupt__"] = interrupts
            return orjson.dumps(values)

        location = f"/threads/{run.thread_id}/runs/{run.run_id}"
        return _PartsResponse(
            _Outcome(self.transport, run.stream_id, answer),
            request,
            # langgraph-sdk (http.py request_reconnect) rejoins Location if the answer is cut.
            {"Content-Location": location, "Location": f"{location}/join"},
            wire=_OUTCOME_WIRE,
            ping_interval=self.ping_interval,
            send_timeout=self.send_timeout,
            limit=self.limit,
            on_disconnect=on_disconnect,
        )

    async def _end_of(self, run: _RunRef) -> tuple[int | None, Event | None]:
        """The run's epoch (None for a queued run that never started) and its terminal
        event, once it is written (a queued run's: the run it became, or its waiter's if it
        ended before it started); no event if a later run of the thread replaced it."""
        epoch = run.epoch
        if epoch is None:
            epoch, end = await self._start_of(run)
            if end is not None:
                return epoch, end
        info = await self.transport.info(run.stream_id)
        if epoch is None or info is None or info.epoch != epoch:
            return epoch, None
        if info.status != "running":  # its last entry ends with it
            events = await self._stored(run.stream_id, epoch, info.last_seq - 1)
            return epoch, events[-1] if events else None
        return epoch, await self._read_to_end(run.stream_id, epoch, info.last_offset)

    async def _final_state(self, run: _RunRef, graph: Any, ended: int | None) -> tuple[Any, bool]:
        """The state run ``run`` ended with, and whether it is a checkpoint of the run's
        own: the newest one it wrote (read with the graph that checkpoint names), as later
        runs and state updates write their own. For a run that wrote none, the thread's
        latest state if the run is still the thread's latest (``ended``: the epoch of the
        run, which has ended); else None."""
        found = await self._last_checkpoint(run, graph)
        if found is not None:
            return await self._state_at(run.thread_id, graph, found), True
        if ended is None:
            return None, False
        state = await graph.aget_state(self._config(run.thread_id))
        # Read before the check: a later run or update takes the thread's stream first.
        info = await self.transport.info(run.stream_id)
        return (state if info is not None and info.epoch == ended else None), False

    async def _last_checkpoint(self, run: _RunRef, graph: Any) -> Any:
        """The newest checkpoint (of the root namespace) that run ``run`` wrote, or None."""
        saver: Any = getattr(graph, "checkpointer", None)
        if not hasattr(saver, "alist"):
            return None
        config = self._config(run.thread_id, {"configurable": {"checkpoint_ns": ""}})
        # Closed once left: AsyncSqliteSaver holds its lock while its listing is open.
        async with contextlib.aclosing(
            saver.alist(config, filter={"run_id": run.run_id})
        ) as listed:
            async for item in listed:
                # (Some checkpointers list every namespace's: a subgraph's is skipped.)
                if not item.config.get("configurable", {}).get("checkpoint_ns"):
                    return item
        return None

    async def _state_at(self, thread_id: str, graph: Any, found: Any) -> Any:
        """The thread's state at checkpoint ``found`` (a ``CheckpointTuple``), read with the
        graph that checkpoint names."""
        graph_id = (found.metadata or {}).get("graph_id")
        own = self.graphs.get(graph_id, graph) if isinstance(graph_id, str) else graph
        point = {
            "checkpoint_ns": "",
            "checkpoint_id": found.config["configurable"]["checkpoint_id"],
        }
        return await own.aget_state(self._config(thread_id, {"configurable": point}))

    async def _start_of(self, run: _RunRef) -> tuple[int | None, Event | None]:
        """Follow a queued run's waiter until it names the run it started (its epoch), or
        ends without (its terminal event: cancelled, or lost with its process)."""
        if run.waiter is None:
            return None, None
        waiter_id = _waiter_id(run.stream_id, run.run_id)
        async with StreamConsumer(self.transport, waiter_id, epoch=run.waiter.epoch) as waiter:
            async for event in waiter:
                if event.type == _RUN_STARTED:
                    return int(event.data["epoch"]), None
                if event.terminal:
                    return None, event
        return None, None

    async def _stored(self, stream_id: str, epoch: int, after: int, count: int = 1) -> list[Event]:
        """The events of the ``count`` entries of run ``epoch`` after entry ``after``, if
        stored."""
        entries = await self.transport.read(stream_id, epoch, after, count)
        return [e for entry in entries for e in decode_entry(entry.payload, epoch, entry.seq)]

    async def _read_to_end(self, stream_id: str, epoch: int, after: str | None) -> Event | None:
        """Follow run ``epoch`` of ``stream_id`` after ``after`` to its terminal event (a
        lost producer's is written too, by the reader that notices); return the last event
        read: None if there was none, or if a later run replaced that one."""
        last = None
        try:
            async with StreamConsumer(self.transport, stream_id, after=after, epoch=epoch) as rest:
                async for event in rest:
                    last = event
        except OffsetExpired:
            return None
        return last

    async def _enqueue(self, plan: _Plan, stream_id: str) -> str:
        """Queue the run behind the thread's run in progress: a waiter run on a stream of
        its own (so that any process can join, read or cancel it, and a waiter whose
        process is gone ends with an error once its lease lapses) starts it once the run
        in progress, and the runs queued before it in this process, ended. Returns the
        queued run's id."""
        run_id = _queued_run_id(stream_id)
        ahead = self._queues.get(stream_id)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues[stream_id] = turn
        waiter = _Closed(
            self._wait_turn(plan, stream_id, run_id, ahead, turn),
            lambda: self._turn_over(stream_id, turn, ahead),
        )
        try:
            await self.producer.start(waiter, stream_id=_waiter_id(stream_id, run_id))
        except BaseException:
            await waiter.aclose()
            raise
        return run_id

    def _turn_over(
        self,
        stream_id: str,
        turn: asyncio.Future[None],
        ahead: asyncio.Future[None] | None = None,
    ) -> None:
        """The run queued with ``turn`` started or ended: the next one queued here may go,
        once the runs ahead of it went (a run cancelled in the middle of the queue must not
        let the ones behind it overtake those before it)."""
        if ahead is not None and not ahead.done():
            ahead.add_done_callback(lambda _ahead: self._turn_over(stream_id, turn))
            return
        if not turn.done():
            turn.set_result(None)
        if self._queues.get(stream_id) is turn:
            del self._queues[stream_id]

    async def _wait_turn(
        self,
        plan: _Plan,
        stream_id: str,
        run_id: str,
        ahead: asyncio.Future[None] | None,
        turn: asyncio.Future[None],
    ) -> AsyncGenerator[Event, None]:
        """A queued run's waiter (see :meth:`_enqueue`): its one part names the epoch of
        the run it started. Cancelled (the queued run's cancel), it stops that run too
        should it have started it already."""
        epoch = None
        try:
            yield Event(_RUN_QUEUED, {"run": plan.fields()}, "")
            if ahead is not None:
                await asyncio.wait((ahead,))  # never cancels the turn ahead
            while epoch is None:
                await self._until_idle(stream_id)
                starting = asyncio.ensure_future(self._start(plan, stream_id, run_id))
                try:
                    epoch = await asyncio.shield(starting)
                except StreamAlreadyRunning:
                    continue  # another run started first: wait for that one too
                except asyncio.CancelledError:
                    await asyncio.wait((starting,))
                    if not starting.cancelled() and starting.exception() is None:
                        epoch = starting.result()
                    raise
            self._turn_over(stream_id, turn)
            yield Event(_RUN_STARTED, {"epoch": epoch}, "")
        except BaseException:
            if epoch is not None:
                await self._cancel_epoch(stream_id, epoch)
            raise

    async def _until_idle(self, stream_id: str) -> None:
        """Return once the thread's stream has no run in progress (in any process)."""
        info = await self.transport.info(stream_id)
        while info is not None and info.status == "running":
            await self._read_to_end(stream_id, info.epoch, info.last_offset)
            info = await self.transport.info(stream_id)

    async def _cancel_epoch(self, stream_id: str, epoch: int) -> StreamInfo | None:
        """Cancel run ``epoch`` of the thread if it is the one in progress; return the
        thread stream's info then (None if there was nothing to cancel)."""
        info = await self.transport.info(stream_id)
        if info is None or info.epoch != epoch or info.status != "running":
            return None
        await self.producer.cancel(stream_id)
        return info

    def _busy(self, thread_id: str, strategy: Any) -> _Refused:
        message = f"thread {thread_id!r} has a run in progress; join it or cancel it first"
        if strategy in ("interrupt", "rollback"):
            message = (
                f"thread {thread_id!r} has a run in progress that did not end within "
                f"{self.interrupt_timeout:g} s of its cancellation, or another run started "
                "first; join it or try again"
            )
        else:
            message += " (or send multitask_strategy 'enqueue' or 'interrupt')"
        return _Refused(HTTPError(409, "thread_busy", message))

    async def _stop_current_run(self, stream_id: str, deadline: float) -> str | None:
        """Cancel the thread's run in progress (as ``POST .../cancel`` does) and wait until
        its terminal event is written, until ``deadline`` (event loop time). Returns the run
        id of the run stopped ("" if none was in progress any more), None if it did not end
        in time; "" too if it ended otherwise than cancelled (it was closing)."""
        info = await self.transport.info(stream_id)
        if info is None or info.status != "running":
            return ""
        await self.producer.cancel(stream_id)
        try:
            async with asyncio.timeout_at(deadline):
                last = await self._read_to_end(stream_id, info.epoch, info.last_offset)
        except TimeoutError:
            return None
        if last is None or last.type != CANCELLED:
            return ""  # it ended otherwise, or a later run replaced it
        return await self._run_id_of(stream_id, info.epoch) or ""

    async def _rollback_point(self, graph: Any, thread_id: str, run_id: str) -> dict[str, str]:
        """Where a run replacing the cancelled run ``run_id`` starts: the checkpoint that
        run started from (the parent of its first checkpoint); none (the latest) if it wrote
        no checkpoint. A run that started on an empty thread has the thread's checkpoints
        deleted: all of them are its own."""
        saver = graph.checkpointer
        config = self._config(thread_id, {"configurable": {"checkpoint_ns": ""}})
        first = None
        async for item in saver.alist(config, filter={"run_id": run_id}):
            first = item  # newest first: the last one is the run's first checkpoint
        if first is None:
            return {}
        parent = (first.parent_config or {}).get("configurable", {})
        if parent.get("checkpoint_id"):
            return {"checkpoint_id": parent["checkpoint_id"], "checkpoint_ns": ""}
        await saver.adelete_thread(thread_id)
        return {}

    async def _run_info(self, request: Request, action: LangGraphAction) -> _RunRef:
        """The run the path names, in a thread the caller may ``action``; else 404."""
        thread_id, stream_id = await self._thread(request, action)
        return await self._resolve(thread_id, stream_id, request.path_params["run_id"])

    async def _resolve(self, thread_id: str, stream_id: str, run_id: str) -> _RunRef:
        with contextlib.suppress(ValueError):  # (a run id that is no UUID is not found)
            run_id = str(uuid.UUID(run_id))  # in any spelling: upper case, {...}, urn:uuid:
        waiter = None
        if _queued_at(stream_id, run_id) is None:
            epoch: int | None = _epoch_of(stream_id, run_id)
        else:
            waiter = await settled_info(self.transport, _waiter_id(stream_id, run_id))
            if waiter is None:  # never queued, or gone with its expiry
                raise _Refused(HTTPError(404, "run_not_found", f"no run {run_id!r} in this thread"))
            epoch = await self._started_epoch(stream_id, run_id, waiter)
        # After the waiter's: a queued run that started meanwhile is in the thread's info.
        info = await settled_info(self.transport, stream_id)
        if epoch is not None and (info is None or info.epoch < epoch):
            raise _Refused(HTTPError(404, "run_not_found", f"no run {run_id!r} in this thread"))
        return _RunRef(thread_id, stream_id, run_id, epoch, info, waiter)

    async def _started_epoch(self, stream_id: str, run_id: str, waiter: StreamInfo) -> int | None:
        """The epoch of the run the queued run ``run_id`` became; None while it waits (or if
        it was cancelled or lost before it started)."""
        for event in await self._stored(_waiter_id(stream_id, run_id), waiter.epoch, 0, 2):
            if event.type == _RUN_STARTED:
                return int(event.data["epoch"])
        return None

    async def _run_id_of(self, stream_id: str, epoch: int) -> str | None:
        """The run id run ``epoch`` of the thread was given: its ``metadata`` part's (a run
        started from the queue keeps the id it was queued with); None if it is a state
        update's hold, no run, or has nothing written yet: a run starting, whose first part
        names it (a queued run's id is not the one its epoch gives), or a delete's hold."""
        stored = await self._stored(stream_id, epoch, 0)
        if not stored:
            return None
        for event in stored:
            if event.type == _STATE_UPDATE:
                return None
            data = event.data.get("data")
            if event.type == "metadata" and isinstance(data, dict):
                return str(data.get("run_id"))
        return run_id_for(stream_id, epoch)

    async def _cancel(self, run: _RunRef, *, wait: bool) -> None:
        """Stop the run: a queued one before it starts, or the run it became; ``wait``:
        until its terminal event is written."""
        epoch = run.epoch
        if epoch is None and run.waiter is not None and run.waiter.status == "running":
            waiter_id = _waiter_id(run.stream_id, run.run_id)
            await self.producer.cancel(waiter_id)
            if wait:
                # Until the waiter names the run it started, or ends without (one whose
                # process is gone ends once its lease lapsed).
                epoch, _ = await self._start_of(run)
            else:
                # Asked only: a waiter cancelled stops the run it started itself (see
                # _wait_turn), and one whose process is gone never starts it; reading to
                # its end would wait for its lease to lapse. One look for a run it named
                # already (its cancel came too late for it).
                epoch = await self._started_epoch(run.stream_id, run.run_id, run.waiter)
        if epoch is None:
            return
        info = await self._cancel_epoch(run.stream_id, epoch)
        if info is not None and wait:
            await self._read_to_end(run.stream_id, epoch, info.last_offset)

    async def _cancel_on_disconnect(
        self, request: Request, thread_id: str, stream_id: str, run_id: str
    ) -> None:
        """A client that asked for it left before its run's end: cancel that run, as
        ``POST .../cancel`` would (a caller allowed to read or run, and not to cancel, must
        not stop the run by leaving), unless a later run of the thread replaced it."""
        try:
            await self._check(request, "cancel", thread_id)
        except (_Refused, HTTPException):
            logger.debug("thread %s: the client left; not allowed to cancel", thread_id)
            return
        try:
            run = await self._resolve(thread_id, stream_id, run_id)
        except _Refused:
            return  # gone with its expiry
        await self._cancel(run, wait=False)

    async def join_run(self, request: Request) -> Response:
        """``GET .../runs/{run_id}/stream``: the run's parts after ``Last-Event-ID``.

        ``-1`` replays the run from its first part; without the header the stream starts
        with the next part (what the SDKs' ``joinStream`` without an id expects). A queued
        run's stream waits for its start, then gives its parts from the first.
        """
        run = await self._run_info(request, "read")
        modes = _join_modes(request.query_params.getlist("stream_mode"))
        thread_id, stream_id, run_id, epoch = run.thread_id, run.stream_id, run.run_id, run.epoch
        location = f"/threads/{thread_id}/runs/{run_id}"
        consumer: StreamConsumer
        if epoch is None:
            # Not started: nothing of it can have been read yet.
            consumer = _QueuedRunParts(self.transport, stream_id, run_id, modes)
        else:
            last_id = request.headers.get("last-event-id")
            after: str | None
            # langgraph-sdk (ui/orchestrator.ts joinStream) sends "-1" to replay a run whole.
            if last_id == "-1":
                after = None
            elif last_id:
                after = last_id  # the consumer refuses an event of another run (400)
            else:
                info = run.info
                after = info.last_offset if info is not None and info.epoch == epoch else None
            # This run only: replaced by a later run (now, or before the response first
            # reads), it is an empty stream, never the later run's parts.
            consumer = _RunParts(self.transport, stream_id, epoch, after, modes)
        on_disconnect = None
        if self.cancel_on_disconnect and request.query_params.get("cancel_on_disconnect") in (
            "1",
            "true",
        ):

            async def on_disconnect() -> None:
                await self._cancel_on_disconnect(request, thread_id, stream_id, run_id)

        return _PartsResponse(
            consumer,
            request,
            {"Content-Location": location, "Location": f"{location}/stream"},
            ping_interval=self.ping_interval,
            send_timeout=self.send_timeout,
            limit=self.limit,
            on_disconnect=on_disconnect,
        )

    async def get_run(self, request: Request) -> Response:
        """``GET .../runs/{run_id}``: ``pending``, ``running``, ``success``, ``error`` or
        ``interrupted``. An earlier run, replaced by a later run (or a state update's hold),
        reads its outcome from the last checkpoint it wrote: ``error`` if a task failed
        there, ``interrupted`` if it stopped before a next step (at an interrupt, or
        cancelled), else ``success``."""
        run = await self._run_info(request, "read")
        return _json(200, await self._run_record(run))

    async def _run_record(
        self,
        run: _RunRef,
        checkpointed: Mapping[str, str | None] | None = None,
        last: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The API's ``Run`` for ``run`` (see :meth:`get_run` for its status; with
        ``checkpointed``, the assistant ids of the runs the thread's checkpoints name, and
        ``last``, the newest checkpoint each of them wrote)."""
        epoch, info, waiter = run.epoch, run.info, run.waiter
        if epoch is None:  # queued, not started: _resolve found its waiter (else 404)
            status = "pending" if waiter is None else _QUEUED_STATUS[waiter.status]
            created = updated = _queued_at(run.stream_id, run.run_id) or time.time()
            if waiter is not None:
                updated = waiter.updated_at
        else:
            status = "success"
            created = updated = _queued_at(run.stream_id, run.run_id) or epoch / 1_000_000
            if info is not None and info.epoch == epoch:
                updated = info.updated_at
                status = {
                    "running": "running",
                    "completed": "success",
                    "error": "error",
                    "cancelled": "interrupted",
                }[info.status]
                if status == "success":
                    graph = await self._graph_of(run.thread_id)
                    state = await graph.aget_state(self._config(run.thread_id))
                    # Stopped at an interrupt; unless that state is a later run's (one
                    # that started since the info was read, at its next step).
                    own = (state.metadata or {}).get("run_id") in (None, run.run_id)
                    if state.next and own:
                        status = "interrupted"
            else:
                status = await self._earlier_status(run, last)
        return {
            "run_id": run.run_id,
            "thread_id": run.thread_id,
            "created_at": _iso(created),
            "updated_at": _iso(updated),
            "status": status,
            "kwargs": {},
            **await self._run_fields(run, checkpointed),
        }

    async def _earlier_status(self, run: _RunRef, last: Mapping[str, Any] | None) -> str:
        """The status of a run the thread's stream no longer holds, from the last checkpoint
        it wrote (``last``: the newest checkpoint of each run, else looked up): ``error``
        for a failed task there, ``interrupted`` for a next step left (an interrupt, or a
        cancel), else ``success`` (also for a run that wrote none)."""
        if last is None:
            graph = await self._graph_of(run.thread_id)
            found = await self._last_checkpoint(run, graph)
        else:  # (no read of the thread's graph per listed run: the checkpoint names its own)
            graph, found = self._state_graph, last.get(run.run_id)
        if found is None:
            return "success"
        state = await self._state_at(run.thread_id, graph, found)
        if _failure(state) is not None:
            return "error"
        return "interrupted" if state.next else "success"

    async def _run_fields(
        self, run: _RunRef, checkpointed: Mapping[str, str | None] | None
    ) -> dict[str, Any]:
        """The run's ``assistant_id``, ``multitask_strategy`` and ``metadata`` as it was
        created with: kept with its ``metadata`` part (a queued run's: its waiter's first
        part) while the thread's stream holds it; for an earlier run, the assistant id its
        checkpoints name, the strategy only if it was queued, no metadata."""
        stored: list[Event] = []
        if run.epoch is None and run.waiter is not None:
            waiter_id = _waiter_id(run.stream_id, run.run_id)
            stored = await self._stored(waiter_id, run.waiter.epoch, 0)
        elif run.epoch and run.info is not None and run.info.epoch == run.epoch:
            stored = await self._stored(run.stream_id, run.epoch, 0)
        for event in stored:
            fields = event.data.get("run")
            if event.type in ("metadata", _RUN_QUEUED) and isinstance(fields, dict):
                return {
                    "assistant_id": fields.get("assistant_id"),
                    "multitask_strategy": fields.get("multitask_strategy"),
                    "metadata": fields.get("metadata") or {},
                }
        if checkpointed is None:
            checkpointed = await self._checkpointed_runs(run.thread_id, run.run_id)
        queued = _queued_at(run.stream_id, run.run_id) is not None
        return {
            "assistant_id": checkpointed.get(run.run_id),
            # Not kept for a run the stream no longer holds: the router's default.
            "multitask_strategy": "enqueue" if queued else self.multitask_strategy,
            "metadata": {},
        }

    async def list_runs(self, request: Request) -> Response:
        """``GET /threads/{thread_id}/runs`` (``runs.list``): the thread's runs, newest
        first, ``limit`` (default 10) after ``offset``, of one ``status`` if given, with the
        ``select``ed fields only if given.

        The runs are the thread's latest run, the runs queued in this process and not
        started yet, and the earlier runs its checkpoints name (their status read from the
        last checkpoint each wrote, as in :meth:`get_run`). A run queued in another process
        is listed once it started.
        """
        thread_id, stream_id = await self._thread(request, "read")
        query = request.query_params
        limit = _query_count(query.get("limit"), "limit", 10, 1)
        offset = _query_count(query.get("offset"), "offset", 0, 0)
        wanted = query.get("status")
        if wanted is not None and wanted not in _RUN_STATUSES:
            raise _bad(f"'status' must be one of {list(_RUN_STATUSES)}")
        select = query.getlist("select")
        if not set(select) <= _RUN_FIELDS:
            raise _bad(f"'select' fields must be among {sorted(_RUN_FIELDS)}")
        # The checkpoints first, then the runs queued, then the latest run: a run that
        # starts meanwhile is the latest one, or not listed, never an earlier one.
        last: dict[str, Any] = {}
        # Without a status to match, the newest `offset + limit` of the earlier runs are
        # all that can be listed (the runs queued and the latest one are newer).
        enough = None if wanted is not None else (offset + limit, partial(_ours, stream_id))
        checkpointed = await self._checkpointed_runs(thread_id, last=last, enough=enough)
        refs: dict[str, _RunRef] = {}
        started: dict[int, str] = {}  # the runs queued here that started, by epoch
        queued = f"{stream_id}~queued~"
        for waiter_id in [sid for sid in self.producer.runs if sid.startswith(queued)]:
            run_id = waiter_id[len(queued) :]
            with contextlib.suppress(_Refused):  # ended meanwhile, and gone
                run = await self._resolve(thread_id, stream_id, run_id)
                if run.epoch is None:
                    refs[run_id] = run
                else:  # the latest run, or an earlier one
                    started[run.epoch] = run_id
        info = await settled_info(self.transport, stream_id)
        latest = None
        if info is not None:
            # (One that has written nothing yet is named by its waiter here, if at all.)
            latest = await self._run_id_of(stream_id, info.epoch) or started.get(info.epoch)
        if info is not None and latest is not None:
            refs[latest] = _RunRef(thread_id, stream_id, latest, info.epoch, info, None)
        for run_id in checkpointed:
            if run_id in refs:
                continue
            if _queued_at(stream_id, run_id) is not None:
                epoch = 0  # queued, then started: an earlier run, its epoch not kept
            else:
                try:
                    epoch = _epoch_of(stream_id, run_id)
                except _Refused:
                    continue  # not a run of this server's (the graph run by other means)
            refs[run_id] = _RunRef(thread_id, stream_id, run_id, epoch, info, None)
        records = [await self._run_record(run, checkpointed, last) for run in refs.values()]
        if wanted is not None:
            records = [record for record in records if record["status"] == wanted]
        records.sort(key=lambda record: record["created_at"], reverse=True)
        records = records[offset : offset + limit]
        if select:
            records = [{key: record[key] for key in select if key in record} for record in records]
        return _json(200, records)

    async def _checkpointed_runs(
        self,
        thread_id: str,
        run_id: str | None = None,
        last: dict[str, Any] | None = None,
        enough: tuple[int, Callable[[str], bool]] | None = None,
    ) -> dict[str, str | None]:
        """The run ids the thread's checkpoints name (only ``run_id``, if given), newest
        first (each once), with the assistant id each run wrote there; ``last``, if given,
        gets the newest checkpoint of each run.

        ``enough`` ``(count, counted)``: stop reading once ``count`` runs that ``counted``
        accepts are found (runs end in the order they started, so these are the newest):
        each checkpoint read holds the thread's values, and a long thread has thousands."""
        saver: Any = getattr(self._state_graph, "checkpointer", None)
        if not hasattr(saver, "alist"):
            return {}
        runs: dict[str, str | None] = {}
        kwargs: dict[str, Any] = {} if run_id is None else {"filter": {"run_id": run_id}}
        # The root namespace's checkpoints, newest first: every run writes some there (its
        # input's first), and a subgraph's name the run of their parent's.
        config = self._config(thread_id, {"configurable": {"checkpoint_ns": ""}})
        counted = 0
        async for item in saver.alist(config, **kwargs):
            if item.config.get("configurable", {}).get("checkpoint_ns"):
                continue
            metadata = item.metadata or {}
            found, assistant_id = metadata.get("run_id"), metadata.get("assistant_id")
            if not isinstance(found, str):
                continue
            if found not in runs:
                if enough is not None and enough[1](found):
                    if counted == enough[0]:
                        break  # (the newest checkpoint of each run listed is read)
                    counted += 1
                if last is not None:
                    last[found] = item
            if runs.get(found) is None:
                runs[found] = assistant_id if isinstance(assistant_id, str) else None
        return runs

    async def cancel_run(self, request: Request) -> Response:
        """``POST .../runs/{run_id}/cancel``: stop the run, or a queued run before it starts
        (``?wait=1``: until it stopped). ``action`` ``"interrupt"`` only (the SDKs'
        default): the API's ``"rollback"`` (delete the run's checkpoints) is not served."""
        run = await self._run_info(request, "cancel")
        action = request.query_params.get("action", "interrupt")
        if action == "rollback":
            raise _bad(
                "cancel action 'rollback' is not served; cancel with 'interrupt', or start "
                "the next run with multitask_strategy 'rollback'",
                "rollback_not_served",
            )
        if action != "interrupt":
            raise _bad("'action' must be 'interrupt'")
        await self._cancel(run, wait=request.query_params.get("wait") in ("1", "true"))
        return Response(status_code=202, headers={"cache-control": "no-store"})

    # --- threads.update, threads.count, threads.copy, runs.delete -----------------------

    async def patch_thread(self, request: Request) -> Response:
        """``PATCH /threads/{thread_id}`` (``threads.update``): merge ``metadata`` into the
        app's record of the thread with ``update_thread``, and answer the thread as ``GET
        /threads/{id}`` does (``Prefer: return=minimal``: 204). A write, as a state
        update's: ``authorize`` is asked for ``"run"``. Without ``update_thread``, ``501
        not_served``: the router keeps no metadata of its own."""
        thread_id, _ = await self._thread(request, "run")
        if self.update_thread is None:
            raise _Refused(
                HTTPError(
                    501,
                    "not_served",
                    "threads.update is not served: this server keeps no thread metadata "
                    "it could update",
                )
            )
        body = await self._body(request)
        metadata = _metadata_of(body)
        if body.get("ttl") is not None:
            # Taken and not acted on, the thread the client asked to expire would stay.
            raise _bad("'ttl' is not served: threads are kept until deleted", "ttl_not_served")
        await self._require_thread(request, thread_id)
        await self.update_thread(request, thread_id, metadata)
        if request.headers.get("prefer") == "return=minimal":
            return Response(status_code=204, headers={"cache-control": "no-store"})
        return _json(200, await self._thread_json(thread_id, await self._info(request, thread_id)))

    async def count_threads(self, request: Request) -> Response:
        """``POST /threads/count`` (``threads.count``): how many threads ``threads.search``
        finds by ``metadata``, over all its pages: those the caller may read (and
        ``thread_info`` has, when given). With ``search_threads``, it is asked page after
        page (1,000 ids each) until a page is short or brings no new id."""
        body = await self._body(request)
        given: dict[str, Any] = {
            key: body[key] for key in ("metadata", "values", "status") if key in body
        }
        search, _ = _thread_search(given)
        search = dataclasses.replace(search, limit=1000, offset=0)
        ids: list[str]
        if self.search_threads is None:
            ids = [thread_id for thread_id, _ in await self._search_checkpoints(search)]
        else:
            ids, seen = [], set()
            while True:
                page = list(await self.search_threads(request, search))[: search.limit]
                new = [thread_id for thread_id in dict.fromkeys(page) if thread_id not in seen]
                seen.update(new)
                ids += new
                if len(page) < search.limit or not new:
                    break
                search = dataclasses.replace(search, offset=search.offset + len(page))
        count = 0
        for thread_id in ids:
            try:
                await self._check(request, "read", thread_id)
                await self._require_thread(request, thread_id)
            except (_Refused, HTTPException):
                continue  # not the caller's to read, or gone (as threads.search leaves out)
            count += 1
        return _json(200, count)

    async def copy_thread(self, request: Request) -> Response:
        """``POST /threads/{thread_id}/copy`` (``threads.copy``): a new thread (made with
        ``create_thread``, given the thread's metadata, or a new UUID) holding a copy of
        each of the thread's checkpoints, in every namespace, with their pending writes;
        answers it as ``GET /threads/{id}`` does. ``authorize`` is asked for ``"read"``
        on the thread and ``"create"``. A thread with a run in progress (or queued here),
        or one that starts while the copy reads it, is ``409 thread_busy``: its copy would
        hold half a step. A copy that fails part-way deletes what it wrote, and the new
        thread's record with ``delete_thread``, if given. With ``thread_info`` and
        without ``create_thread``, ``501 not_served``."""
        thread_id, stream_id = await self._thread(request, "read")
        await self._check(request, "create")
        await self._body(request)  # none is read, but one not sent as JSON is refused (415)
        metadata: dict[str, Any] = {}
        if self.thread_info is not None:
            metadata = dict((await self._info(request, thread_id)).metadata)
        savers: list[Any] = [getattr(graph, "checkpointer", None) for graph in self.graphs.values()]
        distinct = [
            saver
            for saver in {id(saver): saver for saver in savers}.values()
            if all(hasattr(saver, name) for name in ("alist", "aget_tuple", "aput", "aput_writes"))
        ]
        if not distinct:
            raise _Refused(
                HTTPError(
                    501,
                    "not_served",
                    "threads.copy is not served: this server's graphs keep no state "
                    "(no checkpointer) to copy",
                )
            )
        if self.thread_info is not None and self.create_thread is None:
            # A new UUID would be a thread the app has no record of: written, then 404,
            # and out of reach of any request (threads.delete included).
            raise _Refused(
                HTTPError(
                    501,
                    "not_served",
                    "threads.copy is not served: this server makes no threads "
                    "(thread_info without create_thread) to copy into",
                )
            )
        busy = _Refused(
            HTTPError(
                409,
                "thread_busy",
                f"thread {thread_id!r} has a run in progress or queued; copy it once "
                "the run ended, or cancel it first",
            )
        )
        info = await settled_info(self.transport, stream_id)
        if (info is not None and info.status == "running") or self._queued_here(stream_id):
            raise busy
        keys = [await _checkpoint_keys(saver, thread_id) for saver in distinct]

        # Read without holding the thread (a hold would replace its latest run on the
        # stream): a run or state update that took the thread meanwhile is a new epoch, and
        # what was read may hold half of its step.
        async def unchanged() -> None:
            now = await self.transport.info(stream_id)
            if now is not None and (info is None or now.epoch != info.epoch):
                raise busy

        await unchanged()
        if self.create_thread is not None:
            new_id = await self.create_thread(request, None, metadata)
        else:
            new_id = str(uuid.uuid4())
        check_stream_id(self.stream_id(new_id))
        try:
            for saver, listed in zip(distinct, keys, strict=True):
                if not await _copy_checkpoints(saver, thread_id, listed, new_id):
                    raise busy  # a checkpoint listed is gone: the thread changed
            await unchanged()  # each checkpoint was read again as it was copied
        except BaseException:
            for saver in distinct:
                if hasattr(saver, "adelete_thread"):
                    with contextlib.suppress(Exception):
                        await saver.adelete_thread(new_id)
            if self.create_thread is not None and self.delete_thread is not None:
                # The app's record of the copy goes too (the copy's error is the one told).
                with contextlib.suppress(Exception):
                    await self.delete_thread(request, new_id)
            raise
        return _json(200, await self._thread_json(new_id, await self._info(request, new_id)))

    async def delete_run(self, request: Request) -> Response:
        """``DELETE .../runs/{run_id}`` (``runs.delete``): ``405 not_served``, once the
        caller may ``"delete"`` in the thread and the run is found (else 403, 404). The
        API deletes the run's checkpoints with its record; the checkpointers here cannot
        delete one run's checkpoints, and the router keeps no run records apart from
        them and the thread's stream."""
        await self._run_info(request, "delete")
        # Not 501: the JS SDK retries a DELETE (idempotent) on any status but a few 4xx,
        # four times with backoff, and gave up some 20 s later. A 405 names what is allowed.
        error = HTTPError(
            405,
            "not_served",
            "runs.delete is not served: this server cannot delete one run's checkpoints; "
            "cancel the run (runs.cancel) or delete its thread (threads.delete)",
        )
        return Response(error.body(), 405, {**error.headers(), "allow": "GET"}, JSON_TYPE)


async def _checkpoint_keys(saver: Any, thread_id: str) -> list[tuple[str, str]]:
    """The namespace and id of each checkpoint of the thread in ``saver`` (every
    namespace's), newest first: only these are kept, as each checkpoint read holds the
    thread's values at that point (a long thread's would not fit in memory together)."""
    keys: list[tuple[str, str]] = []
    async for item in saver.alist({"configurable": {"thread_id": thread_id}}):
        configurable = item.config.get("configurable", {})
        keys.append((configurable.get("checkpoint_ns", ""), configurable["checkpoint_id"]))
    return keys


async def _copy_checkpoints(
    saver: Any, thread_id: str, keys: list[tuple[str, str]], target: str
) -> bool:
    """Write each checkpoint of thread ``thread_id`` that ``keys`` names (see
    :func:`_checkpoint_keys`), with its pending writes, into thread ``target`` of
    ``saver``, read and written one at a time: the same ids, parents, metadata and values
    (every channel's, so that the target has all it reads). False if one is gone."""
    for namespace, checkpoint_id in reversed(keys):  # oldest first, as they were written
        item = await saver.aget_tuple(
            {
                "configurable": {
                    "thread_id": thread_id,
                    "checkpoint_ns": namespace,
                    "checkpoint_id": checkpoint_id,
                }
            }
        )
        if item is None:
            return False
        parent = (item.parent_config or {}).get("configurable", {}).get("checkpoint_id")
        config: dict[str, Any] = {"configurable": {"thread_id": target, "checkpoint_ns": namespace}}
        if parent:
            config["configurable"]["checkpoint_id"] = parent  # aput's parent
        versions = dict(item.checkpoint.get("channel_versions", {}))
        written = await saver.aput(config, item.checkpoint, item.metadata, versions)
        tasks: dict[str, list[tuple[str, Any]]] = {}
        for task_id, channel, value in item.pending_writes or ():
            tasks.setdefault(task_id, []).append((channel, value))
        for task_id, writes in tasks.items():
            await saver.aput_writes(written, writes, task_id)
    return True


#: The API's multitask strategies (None: none given, "reject").
_STRATEGIES = (None, "reject", "interrupt", "rollback", "enqueue")
#: A run's statuses, as ``runs.list`` filters on them.
_RUN_STATUSES = ("pending", "running", "error", "success", "timeout", "interrupted")
#: The fields of a run ``runs.list`` may ``select``.
_RUN_FIELDS = frozenset(
    {
        "run_id",
        "thread_id",
        "assistant_id",
        "created_at",
        "updated_at",
        "status",
        "metadata",
        "kwargs",
        "multitask_strategy",
        "cancel_reason",
    }
)


#: The fields of a thread ``threads.search`` may ``select``.
_THREAD_FIELDS = frozenset(
    {"thread_id", "created_at", "updated_at", "metadata", "status", "values", "interrupts"}
)


def _thread_search(body: dict[str, Any]) -> tuple[ThreadSearch, list[str]]:
    """The search a ``POST /threads/search`` body asks for, and the fields it selects."""
    for unserved in ("status", "values", "extract"):
        # (An empty one filters nothing: the JS SDK sends `values: {}` when given it.)
        if body.get(unserved) not in (None, {}, [], ""):
            raise _bad(
                f"threads.search by {unserved!r} is not served: search by metadata or ids",
                "search_not_served",
            )
    metadata = _metadata_of(body)
    ids = body.get("ids")
    if ids is not None and not _strings(ids):
        raise _bad("'ids' must be a list of thread ids")
    limit, offset = body.get("limit", 10), body.get("offset", 0)
    if type(limit) is not int or limit < 1:
        raise _bad("'limit' must be a positive integer")
    if type(offset) is not int or offset < 0:
        raise _bad("'offset' must be a whole number >= 0")
    sort_by, sort_order = body.get("sort_by"), body.get("sort_order")
    if sort_by == "state_updated_at":
        sort_by = "updated_at"
    if sort_by not in (None, "thread_id", "created_at", "updated_at"):
        raise _bad("'sort_by' must be 'thread_id', 'created_at' or 'updated_at'")
    if sort_order not in (None, "asc", "desc"):
        raise _bad("'sort_order' must be 'asc' or 'desc'")
    select = body.get("select") or []
    if not _strings(select) or not set(select) <= _THREAD_FIELDS:
        raise _bad(f"'select' fields must be among {sorted(_THREAD_FIELDS)}")
    search = ThreadSearch(
        metadata,
        None if ids is None else tuple(ids),
        min(limit, 1000),
        offset,
        sort_by,
        sort_order,
    )
    return search, select


def _query_count(value: str | None, name: str, default: int, minimum: int) -> int:
    """A whole number from the query string (``limit``, ``offset``), at least ``minimum``."""
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise _bad(f"{name!r} must be a whole number >= {minimum}, not {value!r}")
    return number


def _stream_modes(value: Any) -> list[str]:
    if value is None:
        return ["values"]
    modes = [value] if isinstance(value, str) else value
    if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
        raise _bad("'stream_mode' must be a stream mode or a list of them")
    unknown = sorted(set(modes) - _API_MODES)
    if unknown:
        raise _bad(f"unsupported stream_mode {unknown}; supported: {sorted(_API_MODES)}")
    return list(dict.fromkeys(modes)) or ["values"]


def _join_modes(values: list[str]) -> frozenset[str] | None:
    """The stream modes a join asks for (``stream_mode``, repeated, or a JSON list as
    langgraph-api also reads it), as the stored parts name them; None for all of them."""
    modes: list[Any] = []
    for value in values:
        if value.startswith("["):
            with contextlib.suppress(orjson.JSONDecodeError):
                value = orjson.loads(value)
        modes.extend(value if isinstance(value, list) else [value])
    modes = [mode for mode in modes if mode != ""]  # langgraph-sdk sends "" for none
    if not modes:
        return None
    checked = _stream_modes(modes)
    return frozenset("messages" if mode == "messages-tuple" else mode for mode in checked)


async def _run_source(plan: _Plan, started: asyncio.Future[str]) -> AsyncGenerator[Any, None]:
    """The run: its ``metadata`` part (once the run id is known), then the graph's parts."""
    run_id = await started
    # langgraph-sdk (ui/manager.ts) expects `metadata` first: it carries the run id. The
    # run's fields ride along for runs.get, in every process (only "data" is sent).
    yield Event("metadata", {"data": {"run_id": run_id, "attempt": 1}, "run": plan.fields()}, "")
    # The run's metadata in the graph's config, over its config's, as the API merges them
    # (the graph's nodes and callbacks read it; LangGraph writes its strings, numbers and
    # booleans into each checkpoint's metadata, where threads.get_history finds them). The
    # run id too, as the API has it (multitask_strategy "rollback" finds the checkpoint a
    # run started from by it), and the graph's (threads.search finds a graph's threads by
    # them, as Agent Chat UI does).
    config = plan.config
    metadata = config.get("metadata")
    metadata = {
        **(metadata if isinstance(metadata, Mapping) else {}),
        **plan.metadata,
        "run_id": run_id,
        "graph_id": plan.assistant_id,
        "assistant_id": plan.assistant_id,
    }
    config = {**config, "run_id": uuid.UUID(run_id), "metadata": metadata}
    # An exception ends the run with an `error` part: {error, message}, the API's shape,
    # with the message of the types the API sends it for only (_shown_error).
    try:
        if not plan.tools:
            async for item in plan.graph.astream(plan.inputs, config, **plan.kwargs):
                yield item
            return
        config["callbacks"] = [_tool_events()]
        async for item in plan.graph.astream(plan.inputs, config, **plan.kwargs):
            *namespace, mode, payload = item
            if mode == "custom":
                if type(payload) is _ToolPart:
                    yield (*namespace, "tools", payload.data)
                elif plan.custom:
                    yield item
            else:
                yield item
    except Exception as exc:
        if _shown_error(exc):
            raise
        # Stored under its type's name, with the API's text; the producer logs the cause.
        raise type(type(exc).__name__, (Exception,), {})(_INTERNAL_ERROR_TEXT) from exc


@dataclasses.dataclass(frozen=True, slots=True)
class _ToolPart:
    """A ``tools`` part on its way out through the graph's ``custom`` stream."""

    data: dict[str, Any]


def _tool_events() -> Any:
    """A LangChain callback handler writing the ``tools`` stream mode's parts: the API's
    ``on_tool_start`` (``toolCallId``, ``name``, ``input``), ``on_tool_event`` (``data``:
    what the tool dispatched with ``adispatch_custom_event``), ``on_tool_end``
    (``output``) and ``on_tool_error`` (``error``: ``{error, message}``). They go out
    through the graph's stream writer, so that they keep their place among the other
    parts (and their subgraph's namespace)."""
    from langchain_core.callbacks import AsyncCallbackHandler
    from langgraph.config import get_stream_writer
    from langgraph.errors import GraphBubbleUp

    class ToolEvents(AsyncCallbackHandler):
        run_inline = True  # in the tool's context, where the stream writer is

        def __init__(self) -> None:
            self.tools: dict[uuid.UUID, tuple[str | None, str]] = {}

        def _write(self, run_id: uuid.UUID, event: str, key: str, value: Any) -> None:
            tool_call_id, name = self.tools[run_id]
            try:
                write = get_stream_writer()
            except RuntimeError:  # a tool called outside a graph's step
                return
            part = {"event": event, "toolCallId": tool_call_id, "name": name, key: value}
            write(_ToolPart(to_wire(part)))

        async def on_tool_start(
            self,
            serialized: dict[str, Any],
            input_str: str,
            *,
            run_id: uuid.UUID,
            tags: list[str] | None = None,
            inputs: dict[str, Any] | None = None,
            **kwargs: Any,
        ) -> None:
            if tags and "langsmith:hidden" in tags:
                return
            name = kwargs.get("name") or (serialized or {}).get("name") or "unknown"
            self.tools[run_id] = (kwargs.get("tool_call_id"), str(name))
            self._write(run_id, "on_tool_start", "input", input_str if inputs is None else inputs)

        async def on_custom_event(
            self, name: str, data: Any, *, run_id: uuid.UUID, **kwargs: Any
        ) -> None:
            if run_id in self.tools:
                self._write(run_id, "on_tool_event", "data", data)

        async def on_tool_end(self, output: Any, *, run_id: uuid.UUID, **kwargs: Any) -> None:
            if run_id in self.tools:
                self._write(run_id, "on_tool_end", "output", output)
                del self.tools[run_id]

        async def on_tool_error(
            self, error: BaseException, *, run_id: uuid.UUID, **kwargs: Any
        ) -> None:
            if run_id not in self.tools:
                return
            # An interrupt (or a Command to the parent graph) pauses the tool, it did not
            # fail: it runs again on resume and reports its start and end then.
            if not isinstance(error, GraphBubbleUp):
                self._write(run_id, "on_tool_error", "error", _error_data(error))
            del self.tools[run_id]

    return ToolEvents()


def _refusing_channel(error: BaseException) -> str | None:
    """The key of the LangGraph channel whose update (its reducer) raised ``error``; None
    if it came from elsewhere (a checkpointer's fault is the server's, not the client's)."""
    trace = error.__traceback__
    while trace is not None:
        frame = trace.tb_frame
        if str(frame.f_globals.get("__name__", "")).startswith("langgraph.channels."):
            return str(getattr(frame.f_locals.get("self"), "key", "") or "?")
        trace = trace.tb_next
    return None


def _checkpoint(config: Any, thread_id: str) -> dict[str, Any] | None:
    if not isinstance(config, Mapping):
        return None
    configurable = config.get("configurable") or {}
    return {
        "thread_id": thread_id,
        "checkpoint_ns": configurable.get("checkpoint_ns", ""),
        "checkpoint_id": configurable.get("checkpoint_id"),
        "checkpoint_map": configurable.get("checkpoint_map"),
    }


def _cancellation(error: Any) -> bool:
    """Whether a task's error is its run's cancellation: LangGraph records the
    ``CancelledError`` of a task it cancelled (pregel/_runner.py ``commit``), which the
    state gives back as ``"CancelledError()"``."""
    return isinstance(error, asyncio.CancelledError) or error == "CancelledError()"


def _failure(state: Any) -> dict[str, Any] | None:
    """The API's ``{error, message}`` for the failed task of ``state`` (None if none
    failed; a cancelled task did not): the error's type name, and its message as the
    checkpointer kept it (``"ValueError('boom')"`` gives ``"boom"``)."""
    for task in state.tasks:
        error = task.error
        if error is None or _cancellation(error):
            continue
        if isinstance(error, BaseException):
            return _error_data(error)
        text = str(error)
        name, _, args = text.partition("(")
        message: Any = text
        with contextlib.suppress(ValueError, SyntaxError):
            message = ast.literal_eval(args[:-1]) if args.endswith(")") else text
        if not name.isidentifier():
            name = "Error"
        # (Its type's name is all that is kept: a subclass of the types the API sends the
        # message of gets the internal-error text.)
        if name not in _SHOWN_ERRORS:
            message = _INTERNAL_ERROR_TEXT
        return {"error": name, "message": message if isinstance(message, str) else text}
    return None


def _state_json(state: Any, thread_id: str) -> dict[str, Any]:
    """A ``StateSnapshot`` as the API's ``ThreadState``: a task in a subgraph has the
    subgraph's ``checkpoint`` (its namespace), and its ``state`` when it was read with
    ``subgraphs``."""
    tasks = []
    for task in state.tasks:
        # A subgraph's StateSnapshot (read with subgraphs), or its config (without).
        sub = getattr(task, "state", None)
        snapshot = None if sub is None or isinstance(sub, Mapping) else sub
        tasks.append(
            {
                "id": task.id,
                "name": task.name,
                "error": None if task.error is None else str(task.error),
                "interrupts": _wire_json(task.interrupts),
                "checkpoint": _checkpoint(sub if snapshot is None else snapshot.config, thread_id),
                "state": None if snapshot is None else _state_json(snapshot, thread_id),
                "result": _wire_json(getattr(task, "result", None)),
            }
        )
    return {
        "values": _wire_json(state.values),
        "next": list(state.next),
        "tasks": tasks,
        "checkpoint": _checkpoint(state.config, thread_id),
        "metadata": _wire_json(state.metadata),
        "created_at": state.created_at,
        "parent_checkpoint": _checkpoint(state.parent_config, thread_id),
        "interrupts": _wire_json(getattr(state, "interrupts", ())),
    }
