"""Event and entry encoding, and offsets.

A stream is a sequence of *entries*; each entry holds one or more events (a producer
coalesces the events that arrive while its previous write is in flight). An entry is a
JSON array whose items are ``[type, data]`` pairs, except that a ``token`` whose text is a
string and whose ``message_id``/``node`` equal those of the previous such token in the same
entry (both null for the first one) is written as a bare string: most of a stream is
tokens, and this keeps a 4-character token near 7 bytes.

The producer encodes each event when it arrives (:class:`EventEncoder`), so an event that
cannot be stored is found before it is batched with good ones, and joins the encoded
events into an entry when it writes (:func:`join_entry`).

An offset names one event: ``"<epoch>-<seq>-<index>"``, where ``epoch`` identifies the run
that wrote the stream (a new run under the same id gets a new, larger epoch: the time it
started, in microseconds), ``seq`` the entry (1, 2, 3, ... without gaps) and ``index`` the
event inside the entry. The fields are zero-padded to a fixed width (16, 10 and 5 digits),
so offsets of one stream compare as plain strings in stream order; offsets written without
padding (by earlier versions) are still accepted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import orjson

from ._events import TOKEN, Event, Item
from ._exceptions import EventTooLarge, InvalidOffset

_DUMPS_OPTIONS = orjson.OPT_NON_STR_KEYS
_TOKEN_KEYS = frozenset({"text", "message_id", "node"})
_NO_META = (None, None)
# Widths of an offset's fields: string order is stream order while epochs stay below 10**16
# (microsecond clocks until the year 2286), entries below 10**10 and events per entry below
# 10**5 (MAX_ENTRY_EVENTS_LIMIT).
_EPOCH_WIDTH, _SEQ_WIDTH, _INDEX_WIDTH = 16, 10, 5


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Position:
    """A parsed offset: the run (``epoch``), the entry (``seq``) and the ``event`` in it.

    Positions of one stream compare in stream order.
    """

    epoch: int
    seq: int
    event: int


def format_offset(epoch: int, seq: int, index: int) -> str:
    """The offset string of event ``index`` of entry ``seq`` of run ``epoch``."""
    return f"{epoch:0{_EPOCH_WIDTH}d}-{seq:0{_SEQ_WIDTH}d}-{index:0{_INDEX_WIDTH}d}"


def parse_offset(offset: str) -> Position:
    """Parse an offset string; raise :class:`InvalidOffset` if it is malformed."""
    parts = offset.split("-")
    if len(parts) != 3 or not all(p.isdigit() and p.isascii() and len(p) <= 20 for p in parts):
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


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, default=_default, option=_DUMPS_OPTIONS)


class Encoded(NamedTuple):
    """One event encoded for storage, as :meth:`EventEncoder.encode` returns it.

    For a token that may be written bare, ``body`` is the JSON of its text and ``meta`` its
    ``(message_id, node)`` with ``meta_json`` their JSON; otherwise ``body`` is the JSON of
    the ``[type, data]`` pair and ``meta`` is None.
    """

    body: bytes
    meta: tuple[Any, Any] | None
    meta_json: bytes

    @property
    def size(self) -> int:
        return len(self.body) + len(self.meta_json)


class EventEncoder:
    """Encodes events one at a time, checking each against ``max_event_bytes``."""

    def __init__(self, max_event_bytes: int) -> None:
        self.max_event_bytes = max_event_bytes
        self._meta: tuple[Any, Any] = _NO_META
        self._meta_json = b'"message_id":null,"node":null}'

    def encode(self, kind: str, data: dict[str, Any]) -> Encoded:
        """Encode one event; raise :class:`EventTooLarge` if it is too large.

        An event JSON cannot hold (an integer beyond 64 bits...) raises ``TypeError``.
        """
        if kind == TOKEN and type(data.get("text")) is str and data.keys() == _TOKEN_KEYS:
            return self.token(data["text"], data["message_id"], data["node"])
        return self._checked(kind, Encoded(_dumps((kind, data)), None, b""))

    def token(self, text: str, message_id: Any, node: Any) -> Encoded:
        """Encode a ``token`` event with string text (the hot path)."""
        meta = (message_id, node)
        if meta != self._meta:
            # The JSON object of a token without its text, from its second key on:
            # join_entry() writes '{"text":<text>,' before it.
            self._meta_json = _dumps({"message_id": message_id, "node": node})[1:]
            self._meta = meta
        encoded = Encoded(orjson.dumps(text), meta, self._meta_json)
        if len(encoded.body) + len(encoded.meta_json) > self.max_event_bytes:
            return self._checked(TOKEN, encoded)
        return encoded

    def _checked(self, kind: str, encoded: Encoded) -> Encoded:
        if encoded.size > self.max_event_bytes:
            raise EventTooLarge(
                f"a {kind!r} event of {encoded.size} bytes is larger than the limit of "
                f"{self.max_event_bytes} bytes (max_event_bytes)"
            )
        return encoded


def join_entry(events: Sequence[Encoded]) -> bytes:
    """The payload of an entry holding ``events``, in order."""
    parts: list[bytes] = []
    last: tuple[Any, Any] = _NO_META  # the decoder starts from null message_id/node
    for event in events:
        meta = event.meta
        if meta is None or meta == last:
            parts.append(event.body)
        else:
            last = meta
            parts.append(b'["token",{"text":' + event.body + b"," + event.meta_json + b"]")
    return b"[" + b",".join(parts) + b"]"


def encode_entry(items: Sequence[Item]) -> bytes:
    """Encode a batch of events as one entry payload (no size limit)."""
    encoder = EventEncoder(max_event_bytes=2**63)
    return join_entry([encoder.encode(kind, data) for kind, data in items])


def iter_entry(payload: bytes, epoch: int, seq: int) -> Iterator[Event]:
    """Decode an entry payload into events with their offsets, one at a time."""
    prefix = f"{epoch:0{_EPOCH_WIDTH}d}-{seq:0{_SEQ_WIDTH}d}-"
    message_id: Any = None
    node: Any = None
    for index, item in enumerate(orjson.loads(payload)):
        offset = f"{prefix}{index:0{_INDEX_WIDTH}d}"
        if isinstance(item, str):
            data: dict[str, Any] = {"text": item, "message_id": message_id, "node": node}
            yield Event(TOKEN, data, offset)
            continue
        kind, data = item
        # Only a string text sets the metadata bare tokens inherit: that is what the
        # encoder remembers too (issue 9: a non-string token shifted the metadata).
        if kind == TOKEN and type(data.get("text")) is str and data.keys() == _TOKEN_KEYS:
            message_id, node = data["message_id"], data["node"]
        yield Event(kind, data, offset)


def decode_entry(payload: bytes, epoch: int, seq: int) -> list[Event]:
    """Decode an entry payload into events with their offsets."""
    return list(iter_entry(payload, epoch, seq))
