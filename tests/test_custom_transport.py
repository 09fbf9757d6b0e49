"""The extension point: a transport written from scratch passes the shipped contract suite.

`DictTransport` implements every abstract method of `Transport` over plain dicts (no code
from `MemoryTransport`). Its streams live in a `Store` that several transport objects can
share, like processes sharing one Redis, so the kit's cross-instance tests (a cancel or a
delete from "another process") run for real.
"""

from __future__ import annotations

import ast
import asyncio
import collections
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resumable_stream import (
    LeaseLost,
    StorageRollback,
    StreamAlreadyRunning,
    StreamProducer,
    Transport,
    TransportClosed,
    testing,
)
from resumable_stream.testing import TransportContract
from resumable_stream.transports import Entry, QueueSubscription, Status, StreamInfo, Subscription
from tests._helpers import collect, joined, text_of, tokens


@dataclass(eq=False)
class _Run:
    epoch: int
    owner: str
    lease_ms: int
    created_at: float
    lease_until: float = 0.0
    data_until: float = 0.0  # monotonic deadlines, checked on access
    meta_until: float = 0.0
    status: Status = "running"
    last_seq: int = 0
    last_count: int = 0
    updated_at: float = 0.0
    payloads: collections.deque[bytes] = field(default_factory=collections.deque)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    readers: set[QueueSubscription] = field(default_factory=set)

    def entries_after(self, after: int) -> list[Entry]:
        first = self.last_seq - len(self.payloads) + 1
        skip = max(after + 1 - first, 0)
        return [
            Entry(self.epoch, first + i, payload)
            for i, payload in enumerate(self.payloads)
            if i >= skip
        ]

    def wake(self, entries: list[Entry]) -> None:
        for reader in tuple(self.readers):
            reader.push(entries)


@dataclass
class Store:
    """What the transports of one "deployment" share."""

    runs: dict[str, _Run] = field(default_factory=dict)
    last_epoch: int = 0


class DictTransport(Transport):
    def __init__(self, store: Store, **options: Any) -> None:
        settings = {"retention": 60.0, "tombstone": 60.0, "running_ttl": 60.0}
        super().__init__(**{**settings, "max_entries": 10_000, **options})
        self.store = store
        self.closed = False
        self.closing = asyncio.Event()  # (the store is shared: its runs' events are not ours)

    def _run(self, stream_id: str) -> _Run | None:
        if self.closed:
            raise TransportClosed("closed")
        run = self.store.runs.get(stream_id)
        clock = time.monotonic()
        if run is not None and clock >= run.meta_until:
            del self.store.runs[stream_id]
            return None
        if run is not None and clock >= run.data_until:
            run.payloads.clear()
        return run

    def _owned(self, stream_id: str, owner: str, epoch: int | None = None) -> _Run:
        run = self._run(stream_id)
        if run is None or run.owner != owner or epoch not in (None, run.epoch):
            raise LeaseLost(stream_id)
        return run

    def _expire_in(self, run: _Run, seconds: float) -> None:
        run.data_until = time.monotonic() + seconds
        run.meta_until = run.data_until + self.tombstone

    async def create(self, stream_id: str, owner: str, lease_ms: int) -> StreamInfo:
        old = self._run(stream_id)
        if old is not None and old.status == "running" and time.monotonic() < old.lease_until:
            raise StreamAlreadyRunning(stream_id)
        epoch = max(time.time_ns() // 1000, self.store.last_epoch + 1)
        self.store.last_epoch = epoch
        run = _Run(epoch, owner, lease_ms, created_at=time.time(), updated_at=time.time())
        run.lease_until = time.monotonic() + lease_ms / 1000
        self._expire_in(run, self._running_for(lease_ms))
        self.store.runs[stream_id] = run
        if old is not None:
            old.owner = ""
            old.wake([])
        return _info(stream_id, run)

    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        run = self._owned(stream_id, owner, entry.epoch)
        if entry.seq <= run.last_seq:
            return  # a retried write
        if run.status != "running":
            raise LeaseLost(stream_id)
        if entry.seq != run.last_seq + 1:
            raise StorageRollback(stream_id, run.last_seq)
        self._store(run, entry.payload, count)
        if final is not None:
            run.status = final
            self._expire_in(run, self.retention)

    def _store(self, run: _Run, payload: bytes, count: int) -> None:
        run.payloads.append(payload)
        while len(run.payloads) > self.max_entries:
            run.payloads.popleft()
        run.last_seq += 1
        run.last_count = count
        run.updated_at = time.time()
        run.wake([Entry(run.epoch, run.last_seq, payload)])

    async def renew(self, stream_id: str, owner: str, lease_ms: int) -> bool:
        run = self._owned(stream_id, owner)
        if run.status != "running":
            raise LeaseLost(stream_id)
        run.lease_until = time.monotonic() + lease_ms / 1000
        self._expire_in(run, self._running_for(lease_ms))
        return run.cancelled.is_set()

    def _running_for(self, lease_ms: int) -> float:
        # running_ttl, but never shorter than the lease: the data must outlive it.
        return max(self.running_ttl, lease_ms / 1000)

    async def request_cancel(self, stream_id: str) -> bool:
        run = self._run(stream_id)
        if run is None or run.status != "running":
            return False
        run.cancelled.set()
        return True

    async def wait_cancel(self, stream_id: str, epoch: int) -> None:
        run = self._run(stream_id)
        told = asyncio.Event() if run is None or run.epoch != epoch else run.cancelled
        # (A replaced run: no cancel will come.) A watch ends when this transport closes.
        waits = [asyncio.ensure_future(told.wait()), asyncio.ensure_future(self.closing.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self.closed:
            raise TransportClosed("closed")

    async def info(self, stream_id: str) -> StreamInfo | None:
        run = self._run(stream_id)
        return None if run is None else _info(stream_id, run)

    async def read(self, stream_id: str, epoch: int, after: int, limit: int) -> list[Entry]:
        run = self._run(stream_id)
        if run is None or run.epoch != epoch:
            return []
        return run.entries_after(after)[:limit]

    def subscribe(self, stream_id: str, epoch: int, after: int) -> Subscription:
        run = self._run(stream_id)
        readers = run.readers if run is not None and run.epoch == epoch else set()
        subscription = QueueSubscription(readers.discard)
        readers.add(subscription)
        if run is None or run.epoch != epoch:
            subscription.push([])  # deleted or replaced: the reader looks at the stream
        else:
            subscription.push(run.entries_after(after))
        return subscription

    async def delete(self, stream_id: str) -> bool:
        run = self._run(stream_id)
        if run is None:
            return False
        del self.store.runs[stream_id]
        run.owner = ""
        run.cancelled.set()
        run.wake([])
        return True

    async def reap(self, stream_id: str, epoch: int, payload: bytes) -> bool:
        run = self._run(stream_id)
        if run is None or run.epoch != epoch or run.status != "running":
            return False
        if time.monotonic() < run.lease_until:
            return False
        run.owner = ""
        self._store(run, payload, 1)
        run.status = "error"
        self._expire_in(run, self.retention)
        return True

    async def aclose(self) -> None:
        self.closed = True
        self.closing.set()


def _info(stream_id: str, run: _Run) -> StreamInfo:
    return StreamInfo(
        stream_id=stream_id,
        epoch=run.epoch,
        status=run.status,
        created_at=run.created_at,
        updated_at=run.updated_at,
        last_seq=run.last_seq,
        last_count=run.last_count,
        lease_ms=run.lease_ms,
    )


STORES: dict[str, Store] = {}


class TestDictTransport(TransportContract):
    def make_transport(self, namespace: str, **options: Any) -> Transport:
        return DictTransport(STORES.setdefault(namespace, Store()), **options)


class AcceptsAGap(DictTransport):
    """Broken: an append past the end is stored, leaving a gap in the offsets (the rollback
    a failover to a lagging replica causes goes unreported)."""

    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        run = self._owned(stream_id, owner, entry.epoch)
        if entry.seq > run.last_seq + 1 and run.status == "running":
            run.payloads.clear()
            run.last_seq = entry.seq - 1
        await super().append(stream_id, owner, entry, count, final)


class ReapsALiveRun(DictTransport):
    """Broken: reap() ends a run whose producer still holds its lease (a quiet model)."""

    async def reap(self, stream_id: str, epoch: int, payload: bytes) -> bool:
        run = self._run(stream_id)
        if run is not None:
            run.lease_until = 0.0
        return await super().reap(stream_id, epoch, payload)


class WritesAfterTheEnd(DictTransport):
    """Broken: an ended (or reaped) run still takes appends and renewals."""

    async def append(
        self, stream_id: str, owner: str, entry: Entry, count: int, final: Status | None = None
    ) -> None:
        run = self._run(stream_id)
        if run is not None and run.status != "running" and entry.seq == run.last_seq + 1:
            self._store(run, entry.payload, count)
        else:
            await super().append(stream_id, owner, entry, count, final)

    async def renew(self, stream_id: str, owner: str, lease_ms: int) -> bool:
        run = self._run(stream_id)
        if run is not None and run.status != "running":
            return False
        return await super().renew(stream_id, owner, lease_ms)


class ExpiresBeforeItsLease(DictTransport):
    """Broken: a running stream's data expires after running_ttl even while its lease,
    longer, holds."""

    def _running_for(self, lease_ms: int) -> float:
        return self.running_ttl


BROKEN = [AcceptsAGap, ReapsALiveRun, WritesAfterTheEnd, ExpiresBeforeItsLease]


async def test_a_custom_transport_is_used_for_every_write() -> None:
    transport = DictTransport(Store())
    run = await StreamProducer(transport).start(tokens(500))
    assert joined(await collect(transport, run.stream_id)) == text_of(500)
    assert await run.wait() == "completed"
    stored = transport.store.runs[run.stream_id]
    assert 1 <= stored.last_seq < 500  # events are coalesced into few entries


def test_the_kit_runs_in_a_project_of_its_own(tmp_path: Path) -> None:
    # A user's project: pytest-asyncio in its default strict mode, none of this repository's
    # configuration or fixtures.
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    (tmp_path / "test_theirs.py").write_text(
        "from typing import Any\n"
        "from resumable_stream import Transport\n"
        "from resumable_stream.testing import TransportContract\n"
        "from resumable_stream.transports.memory import MemoryTransport\n"
        "class TestTheirs(TransportContract):\n"
        "    shared_storage = False\n"
        "    def make_transport(self, namespace: str, **options: Any) -> Transport:\n"
        "        return MemoryTransport(**options)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    # Every test of the kit ran (some are parametrized) and passed: none skipped.
    contract = [name for name in dir(TransportContract) if name.startswith("test_")]
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.match(r"(\d+) passed in ", summary)
    assert passed and int(passed[1]) >= len(contract), summary


def test_the_kit_reads_no_private_attribute() -> None:
    # Issue 13: a kit for third-party transports observes them through the public API only.
    # It used to read StreamConsumer._subscription, and QueueSubscription._waiter on any
    # transport's subscription (getattr with a default, which a transport of its own
    # Subscription class satisfied at once, turning a wait into a race).
    tree = ast.parse(Path(testing.__file__).read_text())
    private = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id == "self")
        )
        or (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "setattr", "hasattr"}
            and any(
                isinstance(arg, ast.Constant) and str(arg.value).startswith("_")
                for arg in node.args[1:2]
            )
        )
    ]
    assert private == []


def test_the_kit_fails_transports_that_break_the_contract(tmp_path: Path) -> None:
    # A suite that passes a broken transport is a bug of the suite: each of these passed it.
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    lines = [
        "from typing import Any",
        "from resumable_stream import Transport",
        "from resumable_stream.testing import TransportContract",
        "from tests import test_custom_transport as custom",
    ]
    for broken in BROKEN:
        lines += [
            f"class Test{broken.__name__}(TransportContract):",
            "    def make_transport(self, namespace: str, **options: Any) -> Transport:",
            "        store = custom.STORES.setdefault(namespace, custom.Store())",
            f"        return custom.{broken.__name__}(store, **options)",
        ]
    (tmp_path / "test_broken.py").write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    failed = set(re.findall(r"^FAILED test_broken\.py::Test(\w+)::", result.stdout, re.M))
    assert failed == {broken.__name__ for broken in BROKEN}, result.stdout[-3000:]
