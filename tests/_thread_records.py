"""An app's own thread records for ``LangGraphRouter``'s hooks, kept in a dict."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from resumable_stream.langgraph_api import ThreadInfo


class ThreadRecords(dict[str, ThreadInfo]):
    """The threads an app keeps: ``create_thread``, ``thread_info`` and ``update_thread``."""

    def hooks(self) -> dict[str, Any]:
        """The router's keyword arguments for these records."""
        return {
            "create_thread": self.create_thread,
            "thread_info": self.thread_info,
            "update_thread": self.update_thread,
        }

    async def create_thread(self, request: Any, thread_id: str | None, metadata: Any) -> str:
        thread_id = thread_id or f"t{len(self) + 1}"
        now = datetime.now(UTC)
        self[thread_id] = ThreadInfo(now, now, dict(metadata))
        return thread_id

    async def thread_info(self, request: Any, thread_id: str) -> ThreadInfo | None:
        return self.get(thread_id)

    async def update_thread(self, request: Any, thread_id: str, metadata: dict[str, Any]) -> None:
        record = self[thread_id]
        merged = {**record.metadata, **metadata}
        self[thread_id] = ThreadInfo(record.created_at, datetime.now(UTC), merged)
