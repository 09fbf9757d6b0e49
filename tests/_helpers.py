"""Small helpers shared by the core tests: the contract kit's own (resumable_stream.testing),
and one to wait on a condition of this process's state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from resumable_stream.testing import collect, eventually, joined, text_of, tokens

__all__ = ["collect", "eventually", "holds", "joined", "text_of", "tokens"]


def holds(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``condition`` as the async check :func:`eventually` polls."""

    async def check() -> bool:
        return bool(condition())

    return check
