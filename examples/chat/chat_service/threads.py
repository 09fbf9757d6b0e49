"""Thread metadata (owner, title, archived, times) and the answers asked of each thread.

The conversation itself lives in the LangGraph checkpointer; these two small tables sit next
to it, in the same database (the SQLite file, or PostgreSQL when DATABASE_URL says so):

* ``chat_threads``: one row per thread; ``run_seq`` numbers its answers;
* ``chat_runs``: one row per message to answer: ``queued``, ``started``, ``done`` or
  ``dropped``. It is the durable job record; a run's stream id is derived from its number.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

RunState = Literal["queued", "started", "done", "dropped"]

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS chat_threads (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        title TEXT NOT NULL,
        archived BOOLEAN NOT NULL DEFAULT FALSE,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        run_seq INTEGER NOT NULL DEFAULT 0
    )
    """,
    "CREATE INDEX IF NOT EXISTS chat_threads_by_owner ON chat_threads (owner, updated_at)",
    """
    CREATE TABLE IF NOT EXISTS chat_runs (
        thread_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        message TEXT,
        model TEXT NOT NULL,
        use_cache BOOLEAN NOT NULL,
        human_id TEXT,
        state TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (thread_id, seq)
    )
    """,
)
_THREAD_COLUMNS = "id, owner, title, archived, created_at, updated_at, run_seq"
_RUN_COLUMNS = "thread_id, seq, message, model, use_cache, human_id, state, created_at"


def new_thread_id() -> str:
    return uuid.uuid4().hex


def stream_id_for(thread_id: str, seq: int) -> str:
    """The stream of answer ``seq`` of a thread."""
    return f"thread-{thread_id}-{seq}"


@dataclass(frozen=True)
class Thread:
    id: str
    owner: str
    title: str
    archived: bool
    created_at: float
    updated_at: float
    run_seq: int


@dataclass(frozen=True)
class RunRecord:
    """One message to answer. ``message`` is None for a retry (resume from the checkpoint)."""

    thread_id: str
    seq: int
    message: str | None
    model: str
    use_cache: bool
    human_id: str | None
    state: RunState
    created_at: float

    @property
    def stream_id(self) -> str:
        return stream_id_for(self.thread_id, self.seq)


def _thread(row: Sequence[Any]) -> Thread:
    return Thread(row[0], row[1], row[2], bool(row[3]), row[4], row[5], row[6])


def _run(row: Sequence[Any]) -> RunRecord:
    return RunRecord(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6], row[7])


class ThreadStore(ABC):
    """The two tables, over one database driver. Queries use ``?`` placeholders."""

    @abstractmethod
    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        """Run one statement; return its rows (none for statements without RETURNING)."""

    @abstractmethod
    async def aclose(self) -> None: ...

    async def setup(self) -> None:
        """Create the tables if they do not exist; called once at start."""
        for statement in _SCHEMA:
            await self._fetch(statement)

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    # -- threads -------------------------------------------------------------------------

    async def create_thread(self, owner: str, title: str) -> Thread:
        now = time.time()
        thread = Thread(new_thread_id(), owner, title, False, now, now, 0)
        await self._fetch(
            f"INSERT INTO chat_threads ({_THREAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (thread.id, owner, title, False, now, now, 0),
        )
        return thread

    async def get_thread(self, thread_id: str) -> Thread | None:
        rows = await self._fetch(
            f"SELECT {_THREAD_COLUMNS} FROM chat_threads WHERE id = ?", (thread_id,)
        )
        return _thread(rows[0]) if rows else None

    async def list_threads(self, owner: str, *, archived: bool = False) -> list[Thread]:
        """The owner's threads, most recently active first."""
        rows = await self._fetch(
            f"SELECT {_THREAD_COLUMNS} FROM chat_threads WHERE owner = ? AND archived = ? "
            "ORDER BY updated_at DESC, created_at DESC",
            (owner, archived),
        )
        return [_thread(row) for row in rows]

    async def update_thread(
        self, thread_id: str, *, title: str | None = None, archived: bool | None = None
    ) -> None:
        sets: list[str] = ["updated_at = ?"]
        params: list[Any] = [time.time()]
        if title is not None:
            sets.append("title = ?")
            params.append(title)
        if archived is not None:
            sets.append("archived = ?")
            params.append(archived)
        await self._fetch(
            f"UPDATE chat_threads SET {', '.join(sets)} WHERE id = ?", (*params, thread_id)
        )

    async def delete_thread(self, thread_id: str) -> None:
        await self._fetch("DELETE FROM chat_runs WHERE thread_id = ?", (thread_id,))
        await self._fetch("DELETE FROM chat_threads WHERE id = ?", (thread_id,))

    # -- runs ----------------------------------------------------------------------------

    async def add_run(
        self,
        thread_id: str,
        *,
        message: str | None,
        model: str,
        use_cache: bool,
        human_id: str | None,
    ) -> RunRecord:
        """Queue a message; its number comes from one atomic UPDATE ... RETURNING, so two
        processes adding runs to one thread at once never get the same number."""
        now = time.time()
        rows = await self._fetch(
            "UPDATE chat_threads SET run_seq = run_seq + 1, updated_at = ? WHERE id = ? "
            "RETURNING run_seq",
            (now, thread_id),
        )
        if not rows:
            raise LookupError(f"thread {thread_id!r} does not exist")
        run = RunRecord(thread_id, rows[0][0], message, model, use_cache, human_id, "queued", now)
        await self._fetch(
            f"INSERT INTO chat_runs ({_RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (thread_id, run.seq, message, model, use_cache, human_id, "queued", now),
        )
        return run

    async def get_run(self, thread_id: str, seq: int) -> RunRecord | None:
        rows = await self._fetch(
            f"SELECT {_RUN_COLUMNS} FROM chat_runs WHERE thread_id = ? AND seq = ?",
            (thread_id, seq),
        )
        return _run(rows[0]) if rows else None

    async def runs(self, thread_id: str, *states: RunState) -> list[RunRecord]:
        """The thread's runs in these states, oldest first."""
        marks = ", ".join("?" for _ in states)
        rows = await self._fetch(
            f"SELECT {_RUN_COLUMNS} FROM chat_runs WHERE thread_id = ? AND state IN ({marks}) "
            "ORDER BY seq",
            (thread_id, *states),
        )
        return [_run(row) for row in rows]

    async def set_run_state(self, thread_id: str, seq: int, state: RunState) -> None:
        await self._fetch(
            "UPDATE chat_runs SET state = ? WHERE thread_id = ? AND seq = ?",
            (state, thread_id, seq),
        )

    async def drop_queued(self, thread_id: str) -> list[RunRecord]:
        """Mark the thread's queued runs dropped; return them."""
        rows = await self._fetch(
            "UPDATE chat_runs SET state = 'dropped' WHERE thread_id = ? AND state = 'queued' "
            f"RETURNING {_RUN_COLUMNS}",
            (thread_id,),
        )
        return [_run(row) for row in rows]

    async def current_run(self, thread_id: str) -> RunRecord | None:
        """The answer a reader of the thread wants: the one being written, else the next
        queued one, else the latest finished one."""
        runs = await self.runs(thread_id, "started", "queued")
        started = [r for r in runs if r.state == "started"]
        if started:
            return started[-1]
        if runs:
            return runs[0]
        rows = await self._fetch(
            f"SELECT {_RUN_COLUMNS} FROM chat_runs WHERE thread_id = ? AND state = 'done' "
            "ORDER BY seq DESC LIMIT 1",
            (thread_id,),
        )
        return _run(rows[0]) if rows else None


class SqliteThreadStore(ThreadStore):
    """The tables in the SQLite file that also holds the checkpoints."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: Any = None

    async def setup(self) -> None:
        import aiosqlite

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, each statement is its own transaction.
        self._conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=10.0)
        # WAL lets the checkpointer's connection (and other processes) read while we write.
        await self._conn.execute("PRAGMA journal_mode=WAL")
        await super().setup()

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        async with self._conn.execute(sql, tuple(params)) as cursor:
            return list(await cursor.fetchall())

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


class PostgresThreadStore(ThreadStore):
    """The tables in the PostgreSQL database of the checkpoints, on a small psycopg pool."""

    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.url = url
        self.pool_size = pool_size
        self._pool: Any = None

    async def setup(self) -> None:
        from psycopg_pool import AsyncConnectionPool

        self._pool = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True},
            open=False,
        )
        await self._pool.open(wait=True)
        await super().setup()

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(sql.replace("?", "%s"), tuple(params))
            return list(await cursor.fetchall()) if cursor.description else []

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def thread_store_for(database_url: str | None, sqlite_path: Path) -> ThreadStore:
    if database_url and database_url.startswith(("postgres://", "postgresql://")):
        return PostgresThreadStore(database_url)
    if database_url and database_url.startswith("sqlite:///"):
        return SqliteThreadStore(Path(database_url.removeprefix("sqlite:///")))
    return SqliteThreadStore(sqlite_path)
