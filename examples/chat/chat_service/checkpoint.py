"""Where conversations persist: PostgreSQL, SQLite or memory, chosen by URL.

postgresql://user:pass@host/db   AsyncPostgresSaver on a psycopg connection pool
sqlite:///relative/file.sqlite   AsyncSqliteSaver; sqlite:////absolute/path, or a bare path
memory://                        InMemorySaver, lost on exit
None                             SQLite at examples/chat/data/checkpoints.sqlite
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver

DEFAULT_SQLITE_PATH = Path(__file__).resolve().parent.parent / "data" / "checkpoints.sqlite"
_POSTGRES_SCHEMES = ("postgres://", "postgresql://")
#: The key of the advisory lock the service's processes take to set up a PostgreSQL database.
_SETUP_LOCK = 0x63686174_73657475  # "chatsetu"


@asynccontextmanager
async def open_checkpointer(
    database_url: str | None = None,
    *,
    sqlite_path: str | Path = DEFAULT_SQLITE_PATH,
    pool_size: int = 10,
) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    """Open the checkpointer named by `database_url` (see the module docstring) and close it after.

    Postgres tables are created (`setup()`) on entry; SQLite creates its own on first use.
    `sqlite_path` is used when `database_url` is None; `pool_size` caps Postgres connections.

    Raises:
        ValueError: `database_url` has a scheme other than the ones above.
    """
    if database_url and database_url.startswith(_POSTGRES_SCHEMES):
        async with _postgres(database_url, pool_size) as saver:
            yield saver
    elif database_url == "memory://":
        yield InMemorySaver()
    elif database_url is None or database_url.startswith("sqlite:///") or "://" not in database_url:
        path = Path(database_url.removeprefix("sqlite:///") if database_url else sqlite_path)
        async with _sqlite(path) as saver:
            yield saver
    else:
        raise ValueError(
            f"unsupported database URL {database_url!r}; use postgresql://..., "
            "sqlite:///path, a file path or memory://"
        )


@asynccontextmanager
async def _postgres(url: str, pool_size: int) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    try:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        from psycopg import AsyncConnection
        from psycopg.rows import DictRow, dict_row
        from psycopg_pool import AsyncConnectionPool
    except ImportError as exc:
        raise ImportError(
            "PostgreSQL checkpoints need: pip install 'resumable-chat-example[postgres]'"
        ) from exc
    # The connection settings AsyncPostgresSaver documents: it commits per statement itself and
    # reads rows as dicts.
    connection_kwargs = {"autocommit": True, "row_factory": dict_row, "prepare_threshold": 0}
    pool: AsyncConnectionPool[AsyncConnection[DictRow]] = AsyncConnectionPool(
        url, min_size=1, max_size=pool_size, kwargs=connection_kwargs, open=False
    )
    async with pool:
        saver = AsyncPostgresSaver(pool)
        async with postgres_setup_lock(url):
            await saver.setup()
        yield saver


@asynccontextmanager
async def postgres_setup_lock(url: str) -> AsyncIterator[None]:
    """Hold the database's set-up lock (a session advisory lock, on a connection of its
    own): processes starting together on an empty database create its tables one after
    the other. Concurrent ``CREATE TABLE IF NOT EXISTS`` and migrations fail with
    ``UniqueViolation`` in all but one of them.

    Tried, not waited for in a statement: a session blocked in ``pg_advisory_lock`` holds a
    snapshot, which the holder's ``CREATE INDEX CONCURRENTLY`` (a checkpoint migration)
    waits out: a deadlock PostgreSQL does not detect."""
    from psycopg import AsyncConnection

    async with await AsyncConnection.connect(url, autocommit=True) as connection:
        delay = 0.02
        while True:
            cursor = await connection.execute("SELECT pg_try_advisory_lock(%s)", (_SETUP_LOCK,))
            row = await cursor.fetchone()
            if row is not None and row[0]:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        try:
            yield
        finally:
            await connection.execute("SELECT pg_advisory_unlock(%s)", (_SETUP_LOCK,))


@asynccontextmanager
async def _sqlite(path: Path) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        yield saver
