"""Where conversations persist: PostgreSQL, SQLite or memory, chosen by URL.

postgresql://user:pass@host/db   AsyncPostgresSaver on a psycopg connection pool
sqlite:///relative/file.sqlite   AsyncSqliteSaver; sqlite:////absolute/path, or a bare path
memory://                        InMemorySaver, lost on exit
None                             SQLite at examples/chat/data/checkpoints.sqlite
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver

DEFAULT_SQLITE_PATH = Path(__file__).resolve().parent.parent / "data" / "checkpoints.sqlite"
_POSTGRES_SCHEMES = ("postgres://", "postgresql://")


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
        await saver.setup()
        yield saver


@asynccontextmanager
async def _sqlite(path: Path) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        yield saver
