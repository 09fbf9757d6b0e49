"""Sources whose items become events by a function of the caller (``start(events=...)``)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

from ._events import Event, Item

#: ``events(item)``: the ``(type, data)`` pairs to store for one item of a source.
EventsFunction = Callable[[Any], Iterable[Item]]


async def mapped(source: AsyncIterable[Any], events: EventsFunction) -> AsyncIterator[Any]:
    """``source`` with each item turned into events by ``events``."""
    try:
        async for item in source:
            for kind, data in events(item):
                # An Event passes the producer's normalization unchanged.
                yield Event(kind, data, "")
    finally:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
