"""Test-only: a worker that dies (SIGKILL) right after it claims a reserved answer.

Put this folder first on a worker's PYTHONPATH, with ``CHAT_TEST_DIE_AFTER_CLAIM`` naming a
file: the first process to continue a reservation (``StreamProducer.start(...,
reservation=...)``) creates the file and kills itself, before the chat service marks the run
started. Processes after it (the supervisor's next worker) work as usual.
"""

from __future__ import annotations

import os
import signal
from typing import Any

MARKER = os.environ.get("CHAT_TEST_DIE_AFTER_CLAIM")

if MARKER:
    from resumable_stream import Run, StreamProducer

    _start = StreamProducer.start

    async def _start_then_die(self: StreamProducer, *args: Any, **kwargs: Any) -> Run:
        run = await _start(self, *args, **kwargs)
        if kwargs.get("reservation") is not None:
            try:
                fd = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return run
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        return run

    StreamProducer.start = _start_then_die  # type: ignore[method-assign]
