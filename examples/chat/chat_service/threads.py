"""Thread metadata (owner, title, archived, times) and the answers asked of each thread.

The conversation itself lives in the LangGraph checkpointer; these two small tables sit next
to it, in the same database (the SQLite file, or PostgreSQL when DATABASE_URL says so):

* ``chat_threads``: one row per thread; ``run_seq`` numbers its answers;
* ``chat_runs``: one row per message to answer: ``queued``, ``started``, ``done``,
  ``dropped`` or ``failed`` (its process died: ``error`` says why). It is the durable job
  record; a run's stream id is derived from its number.

SQLite is used the way it works best under concurrent requests: one connection per process
(aiosqlite runs its statements one at a time, on one thread: a single writer path, shared
with the checkpointer), WAL so other processes can read while it writes, and a busy timeout
for the moments another process holds the write lock.
"""

from __future__ import annotations

import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


class ThreadGone(LookupError):
    """The thread does not exist (any more): deleted as a request was using it."""


RunState = Literal["queued", "started", "done", "dropped", "failed"]
#: What a run does: answer a new message, answer the last one again, or replace the last
#: user message (and its answer) with a new one.
RunKind = Literal["message", "regenerate", "edit"]
#: Largest run number (PostgreSQL INTEGER).
MAX_RUN_SEQ = 2**31 - 1

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
#: Columns added since the first release, for databases created before (name, SQL type).
_ADDED_RUN_COLUMNS = (
    ("kind", "TEXT NOT NULL DEFAULT 'message'"),
    ("error", "TEXT"),
    # Worker mode: the run's stream reservation (resumable_stream.Reservation), so that a
    # stop ends the stream of a run no worker started.
    ("reservation", "TEXT"),
)
_THREAD_COLUMNS = "id, owner, title, archived, created_at, updated_at, run_seq"
_RUN_COLUMNS = "thread_id, seq, message, model, use_cache, human_id, state, created_at, kind, error"


#: A thread id: one the service made (32 hex digits), or one a client chose, such as the
#: 16-character id ``useChat`` generates when the app gives it none (AI SDK ``generateId``).
THREAD_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,64}")
THREAD_ID_RULES = "16 to 64 characters from A-Z, a-z, 0-9, '_' and '-'"


def new_thread_id() -> str:
    return uuid.uuid4().hex


def is_thread_id(value: object) -> bool:
    """True if ``value`` follows the thread id rules (THREAD_ID_RULES)."""
    return isinstance(value, str) and THREAD_ID_PATTERN.fullmatch(value) is not None


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
    kind: RunKind = "message"
    #: Why a ``failed`` run failed: an error code of the chat API.
    error: str | None = None

    @property
    def stream_id(self) -> str:
        return stream_id_for(self.thread_id, self.seq)


def _thread(row: Sequence[Any]) -> Thread:
    return Thread(row[0], row[1], row[2], bool(row[3]), row[4], row[5], row[6])


def _run(row: Sequence[Any]) -> RunRecord:
    return RunRecord(
        row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6], row[7], row[8], row[9]
    )


class ThreadStore(ABC):
    """The two tables, over one database driver. Queries use ``?`` placeholders."""

    @abstractmethod
    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        """Run one statement; return its rows (none for statements without RETURNING)."""

    @abstractmethod
    async def aclose(self) -> None: ...

    @abstractmethod
    async def _add_column(self, table: str, name: str, definition: str) -> None:
        """Add a column to ``table`` unless it has it."""

    async def setup(self) -> None:
        """Create the tables if they do not exist (or add what they lack); once at start."""
        for statement in _SCHEMA:
            await self._fetch(statement)
        for name, definition in _ADDED_RUN_COLUMNS:
            await self._add_column("chat_runs", name, definition)

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

    async def get_or_create_thread(self, thread_id: str, owner: str, title: str) -> Thread:
        """Thread ``thread_id``, created for ``owner`` if it does not exist. The caller checks
        the owner of what it gets: an id another user took first stays theirs."""
        now = time.time()
        # One statement, so two requests creating the same id at once get the same thread.
        await self._fetch(
            f"INSERT INTO chat_threads ({_THREAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO NOTHING",
            (thread_id, owner, title, False, now, now, 0),
        )
        thread = await self.get_thread(thread_id)
        if thread is None:  # deleted in between: the caller's request lost the race
            raise ThreadGone(f"thread {thread_id!r} does not exist")
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
        # The thread first: a run added meanwhile then finds it gone (add_run), or is
        # deleted with the others here.
        await self._fetch("DELETE FROM chat_threads WHERE id = ?", (thread_id,))
        await self._fetch("DELETE FROM chat_runs WHERE thread_id = ?", (thread_id,))

    # -- runs ----------------------------------------------------------------------------

    async def add_run(
        self,
        thread_id: str,
        *,
        message: str | None,
        model: str,
        use_cache: bool,
        human_id: str | None,
        kind: RunKind = "message",
    ) -> RunRecord:
        """Queue a message; its number comes from one atomic UPDATE ... RETURNING, so two
        processes adding runs to one thread at once never get the same number. Raises
        :class:`ThreadGone` if the thread does not exist, or was deleted while the run was
        added (no run of a deleted thread is left behind to be answered)."""
        now = time.time()
        rows = await self._fetch(
            "UPDATE chat_threads SET run_seq = run_seq + 1, updated_at = ? WHERE id = ? "
            "RETURNING run_seq",
            (now, thread_id),
        )
        if not rows:
            raise ThreadGone(f"thread {thread_id!r} does not exist")
        seq = rows[0][0]
        run = RunRecord(thread_id, seq, message, model, use_cache, human_id, "queued", now, kind)
        try:
            await self._fetch(
                f"INSERT INTO chat_runs ({_RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (thread_id, seq, message, model, use_cache, human_id, "queued", now, kind, None),
            )
            if await self.get_thread(thread_id) is None:
                # Deleted between the two statements, maybe after delete_thread removed
                # its runs.
                raise ThreadGone(f"thread {thread_id!r} does not exist")
        except BaseException:
            # Take the run back (if the INSERT got through, even cancelled: its statement
            # may have run anyway): a queued run nobody answers would keep the thread busy.
            await self._fetch(
                "DELETE FROM chat_runs WHERE thread_id = ? AND seq = ?", (thread_id, seq)
            )
            raise
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

    async def settle_run(
        self,
        thread_id: str,
        seq: int,
        state: RunState,
        *,
        error: str | None = None,
        only_from: tuple[RunState, ...] = ("queued", "started"),
    ) -> bool:
        """Move a run to ``state`` (with ``error``) if it is in one of ``only_from``; True
        if it was. For whoever notices a run's end other than the process writing it."""
        marks = ", ".join("?" for _ in only_from)
        rows = await self._fetch(
            f"UPDATE chat_runs SET state = ?, error = ? WHERE thread_id = ? AND seq = ? "
            f"AND state IN ({marks}) RETURNING seq",
            (state, error, thread_id, seq, *only_from),
        )
        return bool(rows)

    async def fail_all(self, error: str, *states: RunState) -> int:
        """Mark every run in ``states`` ``failed`` with ``error`` (after a crash of the only
        process that could have been answering them); returns how many."""
        marks = ", ".join("?" for _ in states)
        rows = await self._fetch(
            f"UPDATE chat_runs SET state = 'failed', error = ? WHERE state IN ({marks}) "
            "RETURNING seq",
            (error, *states),
        )
        return len(rows)

    async def unfinished_runs(self) -> list[RunRecord]:
        """Every run still queued or started, in any thread, oldest first."""
        rows = await self._fetch(
            f"SELECT {_RUN_COLUMNS} FROM chat_runs WHERE state IN ('queued', 'started') "
            "ORDER BY created_at"
        )
        return [_run(row) for row in rows]

    async def streaming_threads(self, owner: str) -> set[str]:
        """The owner's threads with an answer queued or being written."""
        rows = await self._fetch(
            "SELECT DISTINCT r.thread_id FROM chat_runs r JOIN chat_threads t "
            "ON t.id = r.thread_id WHERE t.owner = ? AND r.state IN ('queued', 'started')",
            (owner,),
        )
        return {row[0] for row in rows}

    async def answers_in_flight(self, owner: str, *, besides: str = "") -> int:
        """How many answers of the owner's threads (other than thread ``besides``) are
        queued or being written."""
        rows = await self._fetch(
            "SELECT COUNT(*) FROM chat_runs r JOIN chat_threads t ON t.id = r.thread_id "
            "WHERE t.owner = ? AND r.thread_id <> ? AND r.state IN ('queued', 'started')",
            (owner, besides),
        )
        return int(rows[0][0])

    async def runs_in_flight(self, owner: str, *, besides: str = "") -> list[RunRecord]:
        """The runs :meth:`answers_in_flight` counts, oldest first."""
        rows = await self._fetch(
            f"SELECT {_RUN_COLUMNS} FROM chat_runs WHERE state IN ('queued', 'started') "
            "AND thread_id <> ? AND thread_id IN (SELECT id FROM chat_threads WHERE owner = ?) "
            "ORDER BY created_at",
            (besides, owner),
        )
        return [_run(row) for row in rows]

    async def drop_queued(self, thread_id: str, seq: int | None = None) -> list[RunRecord]:
        """Mark the thread's queued runs (or only run ``seq``, if queued) dropped; return
        them."""
        only = "" if seq is None else " AND seq = ?"
        rows = await self._fetch(
            f"UPDATE chat_runs SET state = 'dropped' WHERE thread_id = ? AND state = 'queued'"
            f"{only} RETURNING {_RUN_COLUMNS}",
            (thread_id,) if seq is None else (thread_id, seq),
        )
        return [_run(row) for row in rows]

    async def set_reservation(self, thread_id: str, seq: int, reservation: str) -> None:
        """(Worker mode) Keep the reservation of a run's stream with the run."""
        await self._fetch(
            "UPDATE chat_runs SET reservation = ? WHERE thread_id = ? AND seq = ?",
            (reservation, thread_id, seq),
        )

    async def reservation(self, thread_id: str, seq: int) -> str | None:
        """(Worker mode) The reservation of a run's stream, if it has one."""
        rows = await self._fetch(
            "SELECT reservation FROM chat_runs WHERE thread_id = ? AND seq = ?", (thread_id, seq)
        )
        return rows[0][0] if rows and rows[0][0] is not None else None

    async def current_run(self, thread_id: str) -> RunRecord | None:
        """The answer a reader of the thread wants: the one being written, else the next
        queued one, else the latest finished (or failed) one."""
        runs = await self.runs(thread_id, "started", "queued")
        started = [r for r in runs if r.state == "started"]
        if started:
            return started[-1]
        if runs:
            return runs[0]
        rows = await self._fetch(
            f"SELECT {_RUN_COLUMNS} FROM chat_runs WHERE thread_id = ? "
            "AND state IN ('done', 'failed') ORDER BY seq DESC LIMIT 1",
            (thread_id,),
        )
        return _run(rows[0]) if rows else None


#: Seconds a statement waits for another process's write lock before failing.
SQLITE_BUSY_TIMEOUT = 30.0


class SqliteThreadStore(ThreadStore):
    """The tables in the SQLite file that also holds the checkpoints.

    :attr:`connection` is the process's one connection to the file: the checkpointer uses it
    too (runtime.py). Two connections of one process writing at once is what made
    concurrent requests fail with ``database is locked``: a connection holding a read
    snapshot cannot take the write lock after another one wrote (SQLITE_BUSY_SNAPSHOT, which
    no busy timeout waits out).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: Any = None

    @property
    def connection(self) -> Any:
        """The open ``aiosqlite.Connection``."""
        if self._conn is None:
            raise RuntimeError("SqliteThreadStore.setup() was not called")
        return self._conn

    async def setup(self) -> None:
        import aiosqlite

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, each statement is its own transaction (the
        # checkpointer's commit() calls are then no-ops).
        self._conn = await aiosqlite.connect(
            self.path, isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT
        )
        # WAL: readers in other processes (workers) do not block the writer, nor it them.
        await self._conn.execute("PRAGMA journal_mode=WAL")
        await self._conn.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT * 1000)}")
        await super().setup()

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        async with self._conn.execute(sql, tuple(params)) as cursor:
            return list(await cursor.fetchall())

    async def _add_column(self, table: str, name: str, definition: str) -> None:
        columns = {row[1] for row in await self._fetch(f"PRAGMA table_info({table})")}
        if name not in columns:
            await self._fetch(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")

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
        from .checkpoint import postgres_setup_lock

        async with postgres_setup_lock(self.url):
            await super().setup()

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(sql.replace("?", "%s"), tuple(params))
            return list(await cursor.fetchall()) if cursor.description else []

    async def _add_column(self, table: str, name: str, definition: str) -> None:
        await self._fetch(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {definition}")

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
