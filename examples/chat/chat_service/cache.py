"""Answer cache: the same first question to the same model, within a TTL, is replayed.

Only a thread's first question is cached: later answers depend on the conversation. The key
is a hash of the user, the model spec and the normalized question (case, spacing and trailing
punctuation ignored): an answer is only ever replayed to the user it was made for, since a
question, and the fact that somebody asked it, can be private (issue 12). An entry holds
what the run streamed (to replay it) and the messages it added to the thread (to write them
into the new thread's checkpoint).
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from abc import ABC, abstractmethod
from typing import Any

import orjson

_SPACES = re.compile(r"\s+")


def cache_key(user: str, model: str, question: str) -> str:
    normalized = _SPACES.sub(" ", question).strip().rstrip("?!. ").casefold()
    return hashlib.sha256(f"{user}\x00{model}\x00{normalized}".encode()).hexdigest()


class AnswerCache(ABC):
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl

    @abstractmethod
    async def get(self, key: str) -> dict[str, Any] | None: ...

    @abstractmethod
    async def put(self, key: str, value: dict[str, Any]) -> None: ...


class MemoryCache(AnswerCache):
    """Entries in this process, expired lazily (embedded mode)."""

    def __init__(self, ttl: float, max_entries: int = 1000) -> None:
        super().__init__(ttl)
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, bytes]] = {}

    async def get(self, key: str) -> dict[str, Any] | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, value = found
        if time.monotonic() >= expires:
            del self._entries[key]
            return None
        return dict(orjson.loads(value))

    async def put(self, key: str, value: dict[str, Any]) -> None:
        if len(self._entries) >= self.max_entries:
            # Dicts keep insertion order: drop the oldest entry.
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (time.monotonic() + self.ttl, orjson.dumps(value))


class RedisCache(AnswerCache):
    """Entries in Redis with an expiry, shared by every API process and worker."""

    def __init__(self, client: Any, prefix: str, ttl: float) -> None:
        super().__init__(ttl)
        self.client = client
        self.prefix = prefix

    async def get(self, key: str) -> dict[str, Any] | None:
        value = await self.client.get(f"{self.prefix}:cache:{key}")
        return None if value is None else dict(orjson.loads(value))

    async def put(self, key: str, value: dict[str, Any]) -> None:
        # Rounded up: a TTL under 1 ms made px=0, which Redis refuses.
        px = max(1, math.ceil(self.ttl * 1000))
        await self.client.set(f"{self.prefix}:cache:{key}", orjson.dumps(value), px=px)
