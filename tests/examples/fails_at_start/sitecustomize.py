"""Test-only: a server whose first start of an answer's stream fails as with Redis down.

Put this folder first on a server's (or a worker's) PYTHONPATH, with
``CHAT_TEST_FAIL_AT_START`` naming a file: the first process to start an answer's stream
(``StreamProducer.start`` with a ``reservation``, as a worker does, or with an answer's
``stream_id``, as an API process does) creates the file and gets ``TransportError`` instead,
as when Redis refuses the connection; nothing is written. Later starts work as usual.
"""

from __future__ import annotations

import os
import re
from typing import Any

MARKER = os.environ.get("CHAT_TEST_FAIL_AT_START")
#: An answer's stream (chat_service.threads.stream_id_for), not a thread's lock.
ANSWER = re.compile(r"thread-.+-[0-9]+")

if MARKER:
    from resumable_stream import Run, StreamProducer, TransportError

    _start = StreamProducer.start

    async def _fail_first_start(self: StreamProducer, *args: Any, **kwargs: Any) -> Run:
        answer = kwargs.get("reservation") is not None or (
            ANSWER.fullmatch(kwargs.get("stream_id") or "") is not None
        )
        if answer:
            try:
                fd = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return await _start(self, *args, **kwargs)
            os.close(fd)
            raise TransportError("Redis connection failed (test: refused at the start)")
        return await _start(self, *args, **kwargs)

    StreamProducer.start = _fail_first_start  # type: ignore[method-assign]
