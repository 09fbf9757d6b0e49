"""The extension point: a user-written transport works with producer and consumer."""

from __future__ import annotations

from resumable_stream import StreamProducer
from resumable_stream.transports import Entry, Status
from resumable_stream.transports.memory import MemoryTransport
from tests._helpers import collect, joined, text_of, tokens


class CountingTransport(MemoryTransport):
    """Counts the writes: the 15-line example of docs/custom-transport.md."""

    appends = 0

    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        self.appends += 1
        await super().append(stream_id, owner, entry, count, final)


async def test_a_subclassed_transport_is_used_for_every_write() -> None:
    transport = CountingTransport()
    run = await StreamProducer(transport).start(tokens(500))
    assert joined(await collect(transport, run.stream_id)) == text_of(500)
    assert 1 <= transport.appends < 500  # events are coalesced into few entries
