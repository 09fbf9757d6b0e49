"""Stream id generation and validation."""

from __future__ import annotations

import secrets

from ._constants import STREAM_ID_PATTERN, STREAM_ID_RULES
from ._exceptions import InvalidStreamId


def new_stream_id() -> str:
    """An unguessable stream id (128 random bits, URL-safe)."""
    return secrets.token_urlsafe(16)


def check_stream_id(stream_id: str) -> str:
    """Return ``stream_id`` if it is valid, else raise :class:`InvalidStreamId`."""
    if not isinstance(stream_id, str) or STREAM_ID_PATTERN.fullmatch(stream_id) is None:
        raise InvalidStreamId(f"invalid stream id {stream_id!r}: use {STREAM_ID_RULES}")
    return stream_id
