"""Entry encoding and offsets.

A stream is a sequence of *entries*; each entry holds one or more events (a producer
coalesces the events that arrive while its previous write is in flight). An entry is a
JSON array whose items are ``[type, data]`` pairs, except that a ``token`` whose
``message_id``/``node`` equal those of the previous token in the same entry (both null for
the first token) is written as a bare string: most of a stream is tokens, and this keeps a
4-character token near 7 bytes.

An offset names one event: ``"<epoch>-<seq>-<index>"``, where ``epoch`` identifies the run
that wrote the stream (a new run under the same id gets a new, larger epoch: the time it
started, in microseconds), ``seq`` the
entry (1, 2, 3, ... without gaps) and ``index`` the event inside the entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from ._events import TOKEN, Event, Item
from ._exceptions import InvalidOffset

_DUMPS_OPTIONS = orjson.OPT_NON_STR_KEYS
_TOKEN_KEYS = frozenset({"text", "message_id", "node"})


class Position(NamedTuple):
    """A parsed offset."""

    epoch: int
    seq: int
    event: int


def format_offset(epoch: int, seq: int, index: int) -> str:
    return f"{epoch}-{seq}-{index}"


def parse_offset(offset: str) -> Position:
    """Parse an offset string; raise :class:`InvalidOffset` if it is malformed."""
    parts = offset.split("-")
    if len(parts) != 3 or not all(p.isdigit() and len(p) <= 20 for p in parts):
        raise InvalidOffset(
            f"malformed offset {offset!r}: expected '<epoch>-<seq>-<index>' as given in an "
            "event's offset (SSE id)"
        )
    epoch, seq, index = (int(p) for p in parts)
    if seq < 1:
        raise InvalidOffset(f"malformed offset {offset!r}: entry numbers start at 1")
    return Position(epoch, seq, index)


def _default(obj: Any) -> Any:
    from ._events import to_jsonable

    converted = to_jsonable(obj)
    if converted is obj:  # pragma: no cover - to_jsonable always converts or reprs
        raise TypeError
    return converted


def encode_entry(items: Sequence[Item]) -> bytes:
    """Encode a batch of events as one entry payload."""
    out: list[Any] = []
    # The decoder starts from null message_id/node: a first token without them is bare too.
    last_meta: tuple[Any, Any] = (None, None)
    for kind, data in items:
        if kind == TOKEN and data.keys() == _TOKEN_KEYS and type(data["text"]) is str:
            meta = (data["message_id"], data["node"])
            if meta == last_meta:
                out.append(data["text"])
                continue
            last_meta = meta
        out.append((kind, data))
    return orjson.dumps(out, default=_default, option=_DUMPS_OPTIONS)


def decode_entry(payload: bytes, epoch: int, seq: int) -> list[Event]:
    """Decode an entry payload into events with their offsets."""
    events: list[Event] = []
    prefix = f"{epoch}-{seq}-"
    message_id: Any = None
    node: Any = None
    for index, item in enumerate(orjson.loads(payload)):
        if isinstance(item, str):
            data: dict[str, Any] = {"text": item, "message_id": message_id, "node": node}
            events.append(Event(TOKEN, data, prefix + str(index)))
            continue
        kind, data = item
        if kind == TOKEN and data.keys() == _TOKEN_KEYS:
            message_id, node = data["message_id"], data["node"]
        events.append(Event(kind, data, prefix + str(index)))
    return events
