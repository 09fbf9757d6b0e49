"""Sources whose items become events by a function of the caller (``start(events=...)``)."""

from __future__ import annotations

from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from typing import Any, Self

from ._events import Event, Item

#: ``events(item)``: the ``(type, data)`` pairs to store for one item of a source.
EventsFunction = Callable[[Any], Iterable[Item]]


async def _events_of(
    source: AsyncIterable[Any], events: EventsFunction
) -> AsyncGenerator[Any, None]:
    async for item in source:
        for kind, data in events(item):
            # An Event passes the producer's normalization unchanged.
            yield Event(kind, data, "")


class _Mapped:
    """``source`` with each item turned into events by ``events``. Closing it closes
    ``source``, also when it was never read (a run stopped before its first item): a
    generator's own ``finally`` does not run then."""

    def __init__(self, source: AsyncIterable[Any], events: EventsFunction) -> None:
        self._source = source
        self._events = _events_of(source, events)
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    def __anext__(self) -> Awaitable[Any]:  # the generator's own: no coroutine around it
        return self._events.__anext__()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._events.aclose()
        finally:
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                await aclose()


def mapped(source: AsyncIterable[Any], events: EventsFunction) -> AsyncIterator[Any]:
    """``source`` with each item turned into events by ``events``."""
    return _Mapped(source, events)
