"""The Server-Sent Events wire format (WHATWG HTML, "Server-sent events", section 9.2).

An event is a block of ``field: value`` lines ended by a blank line. Only CR, LF and CRLF
end a line, so ``id`` and ``event`` must not contain them and ``data`` is split on them.
A line starting with ``:`` is a comment: clients ignore it, proxies see traffic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from ._events import Event

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FORBIDDEN = str.maketrans("", "", "\r\n\0")
# `event:` lines, encoded once per type: most of a stream is one type ("token").
_TYPE_LINES: dict[str, bytes] = {}
_TYPE_LINES_MAX = 256


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One SSE block; :meth:`encode` returns its bytes.

    ``retry`` is the client's reconnection delay in milliseconds. A block with only a
    ``comment`` ends without a blank line, so that no client dispatches an empty event.
    """

    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None

    @classmethod
    def from_event(cls, event: Event) -> ServerSentEvent:
        """``id:`` is the event's offset, ``event:`` its type, ``data:`` its data as JSON
        (U+0085, U+2028 and U+2029 escaped, see :func:`escape_line_breaks`)."""
        data = escape_line_breaks(orjson.dumps(event.data)).decode()
        return cls(data=data, event=event.type.translate(_FORBIDDEN), id=event.offset or None)

    def encode(self) -> bytes:
        lines: list[str] = []
        if self.comment is not None:
            lines.extend(": " + line for line in _LINE_BREAK.split(self.comment))
        if self.id is not None:
            # A NUL makes browsers ignore the id; a line break would end the field.
            lines.append("id: " + _single_line("id", self.id, "\r\n\0"))
        if self.event is not None:
            lines.append("event: " + _single_line("event", self.event, "\r\n"))
        if self.retry is not None:
            if self.retry < 0:
                raise ValueError("retry must be a non-negative number of milliseconds")
            lines.append(f"retry: {self.retry}")
        if self.data is not None:
            lines.extend("data: " + line for line in _LINE_BREAK.split(self.data))
        dispatch = self.data is not None or self.event is not None or self.id is not None
        ending = "\n\n" if dispatch or self.retry is not None else "\n"
        return ("\n".join(lines) + ending).encode()


def _single_line(field: str, value: str, forbidden: str) -> str:
    if any(char in value for char in forbidden):
        raise ValueError(f"an SSE {field} must not contain {forbidden!r}: {value!r}")
    return value


# Line breaks to Unicode (and so to str.splitlines(), httpx's iter_lines() and httpx-sse
# before 0.4.2) that JSON strings may hold unescaped, in UTF-8: NEL, LINE SEPARATOR,
# PARAGRAPH SEPARATOR.
_UNICODE_BREAKS = (
    (b"\xc2\x85", b"\\u0085"),
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
)


def escape_line_breaks(data: bytes) -> bytes:
    """``data`` (JSON) with U+0085, U+2028 and U+2029 as ``\\u`` escapes: the same JSON,
    which readers that split lines as Unicode does cannot cut in two."""
    for raw, escaped in _UNICODE_BREAKS:
        if raw in data:  # rare: the usual event is not copied
            data = data.replace(raw, escaped)
    return data


def encode_event(event: Event) -> bytes:
    """``ServerSentEvent.from_event(event).encode()``, at a fraction of the cost.

    JSON from orjson never holds a raw line break, so ``data`` is always one line. An event
    without an offset (made up by the app, not stored) gets no ``id:``: an empty one would
    reset the browser's ``Last-Event-ID``.
    """
    type_line = _TYPE_LINES.get(event.type)
    if type_line is None:
        type_line = _type_line(event.type)
    data = orjson.dumps(event.data)
    if not data.isascii():
        data = escape_line_breaks(data)
    if not event.offset:
        return b"".join((type_line[1:], data, b"\n\n"))
    return b"".join((b"id: ", event.offset.encode(), type_line, data, b"\n\n"))


def _type_line(kind: str) -> bytes:
    # Types outside the vocabulary come from user code; drop what would break the framing
    # rather than fail a stream that every reconnect would fail again.
    line = ("\nevent: " + kind.translate(_FORBIDDEN) + "\ndata: ").encode()
    if len(_TYPE_LINES) < _TYPE_LINES_MAX:
        _TYPE_LINES[kind] = line
    return line


def retry_field(milliseconds: int) -> bytes:
    """A ``retry:`` line, to put in front of an event's lines (it joins that block)."""
    return b"retry: %d\n" % milliseconds


#: Sent on an idle stream; a comment line alone, so that no client sees an event.
PING = ServerSentEvent(comment="ping").encode()
