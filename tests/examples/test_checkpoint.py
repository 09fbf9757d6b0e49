"""Checkpointers chosen by URL: SQLite (default), memory, PostgreSQL."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from chat_service.checkpoint import open_checkpointer
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver


async def test_none_opens_sqlite_at_the_given_path_creating_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "checkpoints.sqlite"
    async with open_checkpointer(None, sqlite_path=path) as saver:
        assert isinstance(saver, AsyncSqliteSaver)
        await saver.setup()
    assert path.exists()


@pytest.mark.parametrize("prefix", ["sqlite:///", ""])
async def test_sqlite_url_or_bare_path(tmp_path: Path, prefix: str) -> None:
    path = tmp_path / "chat.sqlite"
    async with open_checkpointer(f"{prefix}{path}") as saver:
        assert isinstance(saver, AsyncSqliteSaver)
        await saver.setup()
    assert path.exists()


async def test_memory_url() -> None:
    async with open_checkpointer("memory://") as saver:
        assert isinstance(saver, InMemorySaver)


async def test_unknown_scheme_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"postgresql://\.\.\., sqlite:///path"):
        async with open_checkpointer("mysql://localhost/chat"):
            pass


async def test_postgres_sets_up_tables_and_persists(postgres_dsn: str) -> None:
    config = {"configurable": {"thread_id": f"t-{uuid.uuid4()}", "checkpoint_ns": ""}}
    async with open_checkpointer(postgres_dsn) as saver:
        checkpoint = {
            "v": 1,
            "id": str(uuid.uuid4()),
            "ts": "2024-01-01T00:00:00+00:00",
            "channel_values": {"messages": ["hello"]},
            "channel_versions": {"messages": 1},
            "versions_seen": {},
        }
        await saver.aput(config, checkpoint, {"source": "input", "step": 0}, {"messages": 1})
    async with open_checkpointer(postgres_dsn) as saver:
        saved = await saver.aget_tuple(config)
    assert saved is not None
    assert saved.checkpoint["channel_values"] == {"messages": ["hello"]}


@pytest.mark.parametrize("attempt", range(3))
async def test_processes_starting_together_on_an_empty_database_all_start(
    postgres_dsn: str, attempt: int
) -> None:
    # Regression (a soak that started two API processes at once): the checkpointer's and the
    # thread store's set-up ran their migrations concurrently on an empty database, and one
    # process died at start with UniqueViolation (checkpoint_migrations_pkey, or pg_type for
    # a table created twice at once).
    import asyncio

    import psycopg
    from chat_service.threads import PostgresThreadStore

    database = f"fresh_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as admin:
        await admin.execute(f"CREATE DATABASE {database}")
    url = postgres_dsn.rsplit("/", 1)[0] + "/" + database

    async def start() -> None:  # as open_runtime does, in each process
        store = PostgresThreadStore(url)
        try:
            await store.setup()
            async with open_checkpointer(url):
                pass
        finally:
            await store.aclose()

    await asyncio.gather(*(start() for _ in range(4)))
