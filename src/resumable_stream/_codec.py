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

Text UTF-8 cannot hold (a lone UTF-16 surrogate: half of a pair a provider's ``\\ud83d``
escape or a cut string left) is written as U+FFFD, as a browser's ``TextDecoder`` or any
UTF-8 pipeline does, rather than ending the run. A token whose text (or ``reasoning``)
ends with the first half of a pair keeps that half back: the next token of the same
message (``message_id``, ``node`` and ``ns``) whose text (or reasoning) starts with the
second half gets the character whole; anything else gets U+FFFD for it.

An offset names one event: ``"<epoch>-<seq>-<index>"``, where ``epoch`` identifies the run
that wrote the stream (a new run under the same id gets a new, larger epoch: the time it
started, in microseconds), ``seq`` the entry (1, 2, 3, ... without gaps) and ``index`` the
event inside the entry. The fields are zero-padded to a fixed width (16, 10 and 5 digits),
so offsets of one stream compare as plain strings in stream order; offsets written without
padding (by earlier versions) are still accepted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NoReturn

import orjson

from ._events import TOKEN, Event, Item
from ._exceptions import EventTooLarge, InvalidOffset
from ._recent import Recent

# (numpy arrays and scalars as orjson writes them, as the LangGraph API does: a reranker's
# np.float64 score in a tool's output ended the run, orjson refusing the float subclass.)
_DUMPS_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
_TOKEN_KEYS = frozenset({"text", "message_id", "node"})
# The keys of a token that may hold nothing but where it belongs (message_id, node, ns).
_BARE_KEYS = frozenset({"text", "message_id", "node", "ns", "reasoning"})
# A token's text fields a half pair may end, and its next one continue.
_TEXT_FIELDS = ("text", "reasoning")
_NO_META = (None, None)
_NO_META_SIZE = len(b'{"message_id":null,"node":null}')
# A token's [type, data] JSON is its text's JSON, its metadata's JSON (whose "{" it shares)
# and these bytes: ["token",{"text":<text>,<metadata but its "{">]
_TOKEN_FRAME = len(b'["token",{"text":,]') - 1
# Widths of an offset's fields: string order is stream order while epochs stay below 10**16
# (microsecond clocks until the year 2286), entries below 10**10 and events per entry below
# 10**5 (MAX_ENTRY_EVENTS_LIMIT).
_EPOCH_WIDTH, _SEQ_WIDTH, _INDEX_WIDTH = 16, 10, 5
# The largest number of an offset's field: Redis entry ids are two unsigned 64-bit numbers,
# and a larger entry number reached Redis as it was (which refused it: a 503, not a 400).
_FIELD_MAX = 2**64 - 1
_EPOCH_PREFIX = f"%0{_EPOCH_WIDTH}d-"  # an offset's run part
_SEQ_PREFIX = f"%0{_SEQ_WIDTH}d-"  # its entry part
_INDEX = f"%0{_INDEX_WIDTH}d"
_INDEX_TEXT = tuple(_INDEX % index for index in range(1024))  # an entry's usual indexes
_FIRST_EVENT = _SEQ_PREFIX + _INDEX_TEXT[0]  # an offset's entry part and first index
# The run part of the offsets of the runs read lately, made once per run rather than per
# entry (a 16-digit field costs about as much as the rest of a lone token's decoding).
_EPOCH_TEXT: Recent[int, str] = Recent(16_384, 60.0)  # the runs read in the last minute

# An entry's lone token is built with the fields' slot setters: Event is frozen, and its
# __init__ sets each field through object.__setattr__ (a Python call and three lookups,
# about twice the cost; measured with timeit). The hot path of live reads.
_new_event = object.__new__
_set_type = vars(Event)["type"].__set__
_set_data = vars(Event)["data"].__set__
_set_offset = vars(Event)["offset"].__set__


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
    if not isinstance(offset, str):
        raise InvalidOffset(f"an offset is a string such as an event's offset, not {offset!r}")
    parts = offset.split("-")
    if len(parts) != 3 or not all(p.isdigit() and p.isascii() and len(p) <= 20 for p in parts):
        shown = repr(offset) if len(offset) <= 100 else f"{offset[:100]!r}... ({len(offset)} chars)"
        raise InvalidOffset(
            f"malformed offset {shown}: expected '<epoch>-<seq>-<index>' as given in an "
            "event's offset (SSE id)"
        )
    epoch, seq, index = (int(p) for p in parts)
    if max(epoch, seq, index) > _FIELD_MAX:
        raise InvalidOffset(
            f"malformed offset {offset!r}: its numbers are at most {_FIELD_MAX} (no run "
            "issues larger ones)"
        )
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


def valid_text(text: str) -> str:
    """``text`` with its lone surrogates replaced by U+FFFD (and a pair written as two
    code points joined), as a UTF-16 decoder does: text UTF-8 can hold."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _valid(obj: Any) -> Any:
    """``obj`` (JSON values, as ``to_jsonable`` returns) with :func:`valid_text` applied to
    every string in it, keys too."""
    if isinstance(obj, str):
        return valid_text(obj)
    if isinstance(obj, dict):
        return {valid_text(key): _valid(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_valid(value) for value in obj]
    return obj


def _high_surrogate(char: str) -> bool:
    return "\ud800" <= char <= "\udbff"


def _converted(kind: str, data: dict[str, Any], exc: TypeError) -> bytes:
    """The JSON of an event orjson refused: converted first, as sources' values are, if
    that is what it lacked (a dict key it does not take: a tuple, an integer beyond 64
    bits; a lone surrogate, written as U+FFFD); else ``exc``, naming the event."""
    return _dumps((kind, _convertible(kind, data, exc)))


def _convertible(kind: str, data: dict[str, Any], exc: TypeError) -> dict[str, Any]:
    """``data`` converted as :func:`_converted` does, checked: JSON orjson writes."""
    from ._events import to_jsonable

    try:
        converted: dict[str, Any] = _valid(to_jsonable(data))
        _dumps(converted)
        return converted
    except Exception:
        pass
    raise TypeError(f"a {kind!r} event cannot be written as JSON: {exc}") from exc


def _holds_nothing(token: dict[str, Any]) -> bool:
    """True for a token holding only where it belongs (no text, no reasoning): one that
    held only a half pair writes nothing until the half is continued."""
    return not token.keys() - _BARE_KEYS and all(
        type(token.get(field, "")) is str and not token.get(field) for field in _TEXT_FIELDS
    )


def _place(data: dict[str, Any]) -> tuple[Any, ...]:
    """Where a token belongs: its ``(message_id, node)``, and its ``ns`` if it has one."""
    ns = data.get("ns")
    meta = (data.get("message_id"), data.get("node"))
    return meta if ns is None else (*meta, ns)


#: One event checked and prepared for storage, as :class:`EventEncoder` returns it: a token
#: without ``message_id``/``node`` (most of a plain-text stream) as its text; another token
#: as ``(text, (message_id, node))``; any other event as the JSON of its ``[type, data]``
#: pair (bytes). Tokens are checked (valid text, metadata JSON can hold,
#: size) but written by :func:`join_entry` with one ``orjson.dumps`` per entry: the hot path.
Encoded = str | tuple[str, tuple[Any, Any]] | bytes


class EventEncoder:
    """Checks and encodes events one at a time, each against ``max_event_bytes``.

    What it returns can always be written: an event that cannot be stored raises here,
    when it arrives, not when its entry is written. Lone surrogates are replaced with
    U+FFFD (the module's docstring), so the encoder keeps one piece of state across
    events: the first half of a pair that ended a token, until the next event.
    """

    def __init__(self, max_event_bytes: int) -> None:
        self.max_event_bytes = max_event_bytes
        #: ``(message_id, node)`` of the last token with metadata, checked.
        self.meta: tuple[Any, Any] = _NO_META
        self._meta_size = _NO_META_SIZE
        #: Texts of tokens with ``meta`` (resp. without metadata) up to this many
        #: characters fit in max_event_bytes whatever they hold (6 bytes per escaped char).
        self._limit = self._text_limit(_NO_META_SIZE)
        self._plain_limit = self._limit
        #: The same limits for the producer's fast paths (an ASCII token within them needs
        #: no check): -1 while a half pair is held, so that every token comes here.
        self.text_limit = self.plain_text_limit = self._limit
        #: The first half of a pair that ended the last token's text (or reasoning: the
        #: field), and where that token belongs (:func:`_place`).
        self._held: tuple[str, tuple[Any, ...], str] | None = None
        #: A held half that the event just encoded does not continue, as a token of
        #: U+FFFD: it is written *before* that event (the caller takes it).
        self.released: Encoded | None = None

    def _text_limit(self, meta_size: int) -> int:
        return max((self.max_event_bytes - _TOKEN_FRAME - meta_size - 2) // 6, 0)

    def encode(self, kind: str, data: dict[str, Any]) -> Encoded | None:
        """Check and encode one event; raise :class:`EventTooLarge` if it is too large.

        An event JSON cannot hold (an integer beyond 64 bits...) raises ``TypeError``. None
        for a token that holds nothing to write yet (the first half of a pair alone).
        """
        if kind == TOKEN and type(data.get("text")) is str:
            if data.keys() == _TOKEN_KEYS:
                return self.token(data["text"], data["message_id"], data["node"])
            return self._token_with_keys(data)
        return self.event(kind, data)

    def event(self, kind: str, data: dict[str, Any]) -> bytes:
        """:meth:`encode` for an event that is not a token of text alone."""
        if self._held is not None:
            self.released = self.flush()
        try:
            body = _dumps((kind, data))
        except TypeError as exc:
            # A lone surrogate somewhere (keys too), a key orjson does not take, or a value
            # JSON cannot hold, which raises again: the walk is paid for only here.
            body = _converted(kind, data, exc)
        if len(body) > self.max_event_bytes:
            self.too_large(kind, len(body))
        return body

    def token(self, text: str, message_id: Any, node: Any) -> Encoded | None:
        """Check a ``token`` event with string text (None: nothing to write yet)."""
        if message_id is None and node is None:
            if self._held is not None:
                text = self._resume(self._held, text, _NO_META)
            return self.check_text(text, _NO_META_SIZE, self._plain_limit)
        meta = (message_id, node)
        if meta != self.meta:
            meta = self._new_meta(meta)
        if self._held is not None:
            text = self._resume(self._held, text, meta)
        checked = self.check_text(text, self._meta_size, self._limit, meta)
        return None if checked is None else (checked, meta)

    def _new_meta(self, meta: tuple[Any, Any]) -> tuple[Any, Any]:
        """Take a token's new ``(message_id, node)`` as :attr:`meta`, as it is written: with
        its lone surrogates as U+FFFD (a raw one of the tokens after it differs from it,
        and comes here again: rare). Raises if it cannot be JSON otherwise."""
        data = {"message_id": meta[0], "node": meta[1]}
        try:
            self._meta_size = len(_dumps(data))
        except TypeError as exc:
            data = _convertible(TOKEN, data, exc)
            meta = (data["message_id"], data["node"])
            self._meta_size = len(_dumps(data))
        self._limit = self.text_limit = self._text_limit(self._meta_size)
        self.meta = meta
        return meta

    def _token_with_keys(self, data: dict[str, Any]) -> bytes | None:
        """:meth:`encode` for a token of string text with more keys than its metadata
        (``ns``, ``reasoning``, ``usage``...): its half pairs are kept back as a plain
        token's are, in its text and its reasoning."""
        if self._held is not None:
            data = self._resume_with_keys(self._held, data)
        try:
            body = _dumps((TOKEN, data))
        except TypeError as exc:
            return self._repaired_with_keys(data, exc)
        if len(body) > self.max_event_bytes:
            self.too_large(TOKEN, len(body))
        return body

    def _repaired_with_keys(self, data: dict[str, Any], exc: TypeError) -> bytes | None:
        held = None
        for field in _TEXT_FIELDS:
            value = data.get(field)
            if type(value) is str and value and _high_surrogate(value[-1]):
                data = {**data, field: value[:-1]}
                held = (value[-1], _place(data), field)
                break
        converted = _convertible(TOKEN, data, exc)
        body = None
        if held is None or not _holds_nothing(data):
            body = _dumps((TOKEN, converted))
            if len(body) > self.max_event_bytes:
                self.too_large(TOKEN, len(body))
        if held is not None:  # (once the rest fits)
            self._held = held
            self.text_limit = self.plain_text_limit = -1
        return body

    def _resume_with_keys(
        self, held: tuple[str, tuple[Any, ...], str], data: dict[str, Any]
    ) -> dict[str, Any]:
        """``data`` after the half pair ``held``: joined to its field if of one message."""
        half, place, field = held
        self._held = None
        self.text_limit, self.plain_text_limit = self._limit, self._plain_limit
        value = data.get(field)
        if type(value) is str and _place(data) == place:
            return {**data, field: half + value}
        self.released = _released(held)
        return data

    def check_text(
        self, text: str, meta_size: int, limit: int, meta: tuple[Any, Any] = _NO_META
    ) -> str | None:
        """The text to store for a token's ``text``: ``text`` itself unless it holds a lone
        surrogate; raise if it is too large (the cheap checks first)."""
        try:
            if len(text) > limit or not limit:  # (no limit left: metadata near max_event_bytes)
                size = len(orjson.dumps(text)) + meta_size + _TOKEN_FRAME
                if size > self.max_event_bytes:
                    self.too_large(TOKEN, size)
            elif not text.isascii():
                orjson.dumps(text)  # raises for a lone surrogate, which UTF-8 cannot hold
        except TypeError:
            return self._repaired(text, meta_size, limit, meta)
        return text

    def _repaired(self, text: str, meta_size: int, limit: int, meta: tuple[Any, Any]) -> str | None:
        half = text[-1] if _high_surrogate(text[-1]) else ""
        text = valid_text(text[:-1] if half else text)
        checked = self.check_text(text, meta_size, limit) if text else None
        if half:  # its second half may start the next token: held (once the rest fits)
            self._held = (half, meta, "text")
            self.text_limit = self.plain_text_limit = -1
        return checked

    def _resume(
        self, held: tuple[str, tuple[Any, ...], str], text: str, meta: tuple[Any, Any]
    ) -> str:
        """``text`` after the half pair ``held``: joined to it if they are of one message."""
        half, place, field = held
        self._held = None
        self.text_limit, self.plain_text_limit = self._limit, self._plain_limit
        if meta == place and field == "text":
            return half + text  # a character if text starts with the second half
        self.released = _released(held)
        return text

    def flush(self) -> Encoded | None:
        """The half pair held, as a token of U+FFFD, or None: the run ends, or the next
        event is not a token that could continue it."""
        held = self._held
        if held is None:
            return None
        self._held = None
        self.text_limit, self.plain_text_limit = self._limit, self._plain_limit
        return _released(held)

    def too_large(self, kind: str, size: int) -> NoReturn:
        raise EventTooLarge(
            f"a {kind!r} event of {size} bytes is larger than the limit of "
            f"{self.max_event_bytes} bytes (max_event_bytes)"
        )


def _released(held: tuple[str, tuple[Any, ...], str]) -> Encoded:
    """A token of U+FFFD, in place of a half pair nothing continued (where it was held)."""
    _, place, field = held
    data = {"text": "", "message_id": place[0], "node": place[1]}
    if field == "text" and len(place) == 2:
        # A token of text alone: never as bytes (join_entry() keeps track of the metadata
        # of those it writes, for the bare ones after them), with its metadata as written.
        if place == _NO_META:
            return "\ufffd"
        try:
            _dumps(data)
        except TypeError as exc:  # (a lone surrogate: held by a token with more keys)
            data = _convertible(TOKEN, data, exc)
        return ("\ufffd", (data["message_id"], data["node"]))
    if len(place) == 3:
        data["ns"] = place[2]
    data[field] = "\ufffd"
    try:
        return _dumps((TOKEN, data))
    except TypeError as exc:  # (a lone surrogate in its ns, say)
        return _converted(TOKEN, data, exc)


def size_of(event: Encoded) -> int:
    """About the bytes ``event`` adds to an entry (token metadata not counted)."""
    if isinstance(event, str):
        return len(event) + 3
    if isinstance(event, tuple):
        return len(event[0]) + 3
    return len(event) + 1


def _fitted(payload: bytes) -> bytes:
    """``payload`` in memory of its own size. orjson returns its whole output buffer (at
    least 1 KiB; 4 KiB from orjson 3.12), and entries are kept (a run's rollback window, the
    memory transport for the retention): a one-token entry held 4 KiB. The copy costs
    about 0.1 µs an entry."""
    return b"".join((payload, b""))


def join_entry(events: Sequence[Encoded]) -> bytes:
    """The payload of an entry holding ``events``, in order."""
    if len(events) == 1 and type(events[0]) is str:  # hot path: one paced token
        return b"".join((orjson.dumps(events), b""))  # (_fitted(), inlined)
    out: list[Any] = []
    append = out.append
    bare = True  # the decoder starts from null message_id/node
    last: tuple[Any, Any] | None = None
    for event in events:
        if isinstance(event, str):  # a token without message_id/node
            if bare:
                append(event)
            else:
                bare, last = True, None
                append((TOKEN, {"text": event, "message_id": None, "node": None}))
        elif isinstance(event, tuple):
            text, meta = event
            if not bare and meta == last:
                append(text)
            else:
                bare, last = False, meta
                append((TOKEN, {"text": text, "message_id": meta[0], "node": meta[1]}))
        else:
            append(orjson.Fragment(event))
    return _fitted(_dumps(out))


def encode_entry(items: Sequence[Item]) -> bytes:
    """Encode a batch of events as one entry payload (no size limit)."""
    encoder = EventEncoder(max_event_bytes=2**63)
    events: list[Encoded] = []
    for kind, data in items:
        encoded = encoder.encode(kind, data)
        if encoder.released is not None:
            events.append(encoder.released)
            encoder.released = None
        if encoded is not None:
            events.append(encoded)
    held = encoder.flush()
    if held is not None:
        events.append(held)
    return join_entry(events)


def decode_entry(payload: bytes, epoch: int, seq: int) -> list[Event]:
    """Decode an entry payload into events with their offsets."""
    items = orjson.loads(payload)
    run = _EPOCH_TEXT.recent.get(epoch) or _EPOCH_TEXT.get(epoch)
    if run is None:
        run = _EPOCH_PREFIX % epoch
        _EPOCH_TEXT.put(epoch, run)
    if len(items) == 1 and type(items[0]) is str:  # hot path: one paced token
        event = _new_event(Event)
        _set_type(event, TOKEN)
        _set_data(event, {"text": items[0], "message_id": None, "node": None})
        _set_offset(event, run + _FIRST_EVENT % seq)
        return [event]
    prefix = run + _SEQ_PREFIX % seq
    events = []
    message_id: Any = None
    node: Any = None
    for index, item in enumerate(items):
        offset = prefix + (_INDEX_TEXT[index] if index < len(_INDEX_TEXT) else _INDEX % index)
        if isinstance(item, str):
            data: dict[str, Any] = {"text": item, "message_id": message_id, "node": node}
            events.append(Event(TOKEN, data, offset))
            continue
        kind, data = item
        # Only a string text sets the metadata bare tokens inherit: that is what the
        # encoder remembers too (issue 9: a non-string token shifted the metadata).
        if kind == TOKEN and type(data.get("text")) is str and data.keys() == _TOKEN_KEYS:
            message_id, node = data["message_id"], data["node"]
        events.append(Event(kind, data, offset))
    return events
