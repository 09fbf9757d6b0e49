"""Test-only: an API process that dies (SIGKILL) right after it starts an answer's stream.

Put this folder first on the PYTHONPATH of a chat service process, with
``CHAT_TEST_DIE_AFTER_START`` naming a file: the first time the process starts the stream of
an answer numbered ``CHAT_TEST_DIE_AFTER_START_RUN`` (default 1) of any thread, it creates
the file and kills itself, before the chat service marks the run started. Once the file
exists, processes work as usual.
"""

from __future__ import annotations

import os
import signal
from typing import Any

MARKER = os.environ.get("CHAT_TEST_DIE_AFTER_START")
RUN = os.environ.get("CHAT_TEST_DIE_AFTER_START_RUN", "1")

if MARKER:
    from resumable_stream import Run, StreamProducer

    _start = StreamProducer.start

    async def _start_then_die(self: StreamProducer, *args: Any, **kwargs: Any) -> Run:
        run = await _start(self, *args, **kwargs)
        if str(kwargs.get("stream_id", "")).endswith(f"-{RUN}"):
            try:
                fd = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return run
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        return run

    StreamProducer.start = _start_then_die  # type: ignore[method-assign]
