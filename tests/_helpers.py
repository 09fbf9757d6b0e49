"""Small helpers shared by the core tests: the contract kit's own (resumable_stream.testing),
and one to wait on a condition of this process's state."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request

from resumable_stream import StreamProducer
from resumable_stream.testing import collect, eventually, joined, text_of, tokens
from resumable_stream.transports import Transport
from resumable_stream.transports.memory import MemoryTransport

__all__ = [
    "Later",
    "collect",
    "dead_run",
    "ended",
    "eventually",
    "holds",
    "joined",
    "stored_from",
    "text_of",
    "tokens",
]


def holds(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``condition`` as the async check :func:`eventually` polls."""

    async def check() -> bool:
        return bool(condition())

    return check


async def stored_from(items: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    """The events a run of a source yielding ``items`` stores (memory transport), as
    ``(type, data)``."""

    async def source() -> Any:
        for one in items:
            yield one

    transport = MemoryTransport()
    run = await StreamProducer(transport).start(source())
    assert await run.wait() == "completed"
    return [(e.type, e.data) for e in await collect(transport, run.stream_id)]


async def ended(transport: Transport, stream_id: str) -> bool:
    """Whether stream ``stream_id`` holds a run that ended (the async check)."""
    info = await transport.info(stream_id)
    return info is not None and info.status != "running"


async def dead_run(transport: Transport, stream_id: str) -> int:
    """What a process killed mid-run leaves: a running run of ``stream_id`` with one token
    stored, whose lease lapsed, and no reader yet to end it. Returns its epoch."""
    import time

    from resumable_stream._codec import encode_entry
    from resumable_stream.transports import Entry

    token = encode_entry([("token", {"text": "a", "message_id": None, "node": None})])
    info = await transport.create(stream_id, owner="killed", lease_ms=50)
    await transport.append(stream_id, "killed", Entry(info.epoch, 1, token), 1)
    lapsed_at = time.monotonic() + 0.05
    await eventually(holds(lambda: time.monotonic() > lapsed_at))  # the lease is a clock
    return info.epoch


class Later:
    """A request whose handler and response run apart: call the handler with
    :meth:`request`, do what may happen before a response is first read (another run
    replaces the stream, say), then :meth:`serve` the response it returned."""

    def __init__(
        self,
        path: str,
        body: bytes = b"",
        path_params: dict[str, str] | None = None,
        *,
        method: str = "POST",
        headers: dict[str, str] | None = None,
    ) -> None:
        fields = {"content-type": "application/json", **(headers or {})}
        self.scope: dict[str, Any] = {
            "type": "http",
            "method": method,
            "path": path,
            "headers": [(k.encode(), v.encode()) for k, v in fields.items()],
            "query_string": b"",
            "path_params": path_params or {},
        }
        self.body: bytes | None = body
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()

    def request(self) -> Request:
        return Request(self.scope, self.receive)

    async def receive(self) -> dict[str, Any]:
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def serve(self, response: Any) -> tuple[int, bytes]:
        """Run the ASGI ``response`` to its end: its status and body."""

        async def send(message: dict[str, Any]) -> None:
            self.sent.append(message)

        await response(self.scope, self.receive, send)
        self.gone.set()
        status = next(m["status"] for m in self.sent if m["type"] == "http.response.start")
        return status, b"".join(m.get("body", b"") for m in self.sent)
