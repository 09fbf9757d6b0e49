"""Test-only: a worker whose first claim of a reserved answer fails as with Redis down.

Put this folder first on a worker's PYTHONPATH, with ``CHAT_TEST_FAIL_AT_CLAIM`` naming a
file: the first process to continue a reservation (``StreamProducer.start(...,
reservation=...)``) creates the file and gets ``TransportError`` instead, as when Redis
refuses the connection; the claim is not made. Later starts work as usual.
"""

from __future__ import annotations

import os
from typing import Any

MARKER = os.environ.get("CHAT_TEST_FAIL_AT_CLAIM")

if MARKER:
    from resumable_stream import Run, StreamProducer, TransportError

    _start = StreamProducer.start

    async def _fail_first_claim(self: StreamProducer, *args: Any, **kwargs: Any) -> Run:
        if kwargs.get("reservation") is not None:
            try:
                fd = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return await _start(self, *args, **kwargs)
            os.close(fd)
            raise TransportError("Redis connection failed (test: refused at the claim)")
        return await _start(self, *args, **kwargs)

    StreamProducer.start = _fail_first_claim  # type: ignore[method-assign]
