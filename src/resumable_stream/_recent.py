"""A bounded cache of what the hot paths make once per stream or run."""

from __future__ import annotations

import time
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

clock = time.monotonic


class Recent(Generic[K, V]):
    """The values of the keys used lately: every key used in the last ``period`` seconds,
    and at most ``limit`` keys a generation.

    Lookups go to ``recent`` first, a plain dict the hot paths read themselves
    (``cache.recent.get(key) or cache.get(key)``); :meth:`get` looks in the generation
    before, ``older``, and moves a key found there back. A generation ends when a key is
    added ``period`` seconds after it began, or when it holds ``limit`` keys (a burst of
    keys used once, such as status reads of many streams): it becomes ``older``, and the
    one before is dropped. So a key used at least once a period stays, up to ``limit``
    such keys, and one left unused goes within two periods, or two ``limit`` of others.

    A dict emptied whenever it held 4,096 keys, as the caches were before, missed on nearly
    every lookup once more streams than that were in use: with 5,000 streams taking turns,
    the Redis transport made each append's keys and command head again and spent 44 µs of
    CPU per token, against 27 µs at 4,000 (``python -m benchmarks.lockstep --streams``).
    """

    __slots__ = ("ends", "limit", "older", "period", "recent")

    def __init__(self, limit: int, period: float) -> None:
        self.limit = limit
        self.period = period
        self.ends = clock() + period  # when the current generation ends
        self.recent: dict[K, V] = {}
        self.older: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        value = self.recent.get(key)
        if value is None:
            value = self.older.pop(key, None)
            if value is not None:
                self.put(key, value)
        return value

    def put(self, key: K, value: V) -> None:
        recent = self.recent
        if key not in recent:
            now = clock()
            if now >= self.ends or len(recent) >= self.limit:
                self.older = recent
                recent = self.recent = {}
                self.ends = now + self.period
        recent[key] = value
