"""A producer in its own process, for tests that SIGKILL or SIGSTOP it.

Usage: python -m tests._producer_process REDIS_URL PREFIX STREAM_ID LEASE
Prints "started" once the run exists, then streams a token every 10 ms for a minute and
prints the run's outcome ("status completed" or "failed LeaseLost").
"""

from __future__ import annotations

import asyncio
import faulthandler
import signal
import sys
from collections.abc import AsyncIterator

from resumable_stream import ResumableStreamError, StreamProducer
from resumable_stream.transports.redis import RedisTransport


async def slow_tokens() -> AsyncIterator[str]:
    for i in range(6000):
        yield f"p{i} "
        await asyncio.sleep(0.01)  # a paced model


def dump_tasks() -> None:
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


async def main(url: str, prefix: str, stream_id: str, lease: float) -> None:
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, dump_tasks)
    async with RedisTransport.from_url(url, prefix=prefix) as transport:
        run = await StreamProducer(transport, lease=lease).start(slow_tokens(), stream_id=stream_id)
        print("started", flush=True)
        try:
            print("status", await run.wait(), flush=True)
        except ResumableStreamError as exc:
            print("failed", type(exc).__name__, flush=True)


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # stack dump for a hung test
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
