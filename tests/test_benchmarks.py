"""The benchmark script keeps working (its figures are read from its output, not asserted
here: timings belong in the benchmark run, not in tests)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs_and_writes_its_figures(tmp_path: Path) -> None:
    output = tmp_path / "figures.json"
    command = [sys.executable, "-m", "benchmarks", "--quick", "--only", "4", "--only", "5"]
    result = subprocess.run(
        [*command, "--output", str(output)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    assert report
    assert "bytes per 4-char token" in result.stdout


@pytest.mark.timeout(600)
def test_quick_paced_and_fanout_rows_carry_their_targets(tmp_path: Path) -> None:
    """Issue 11's rows exist with a target and a verdict: the bare Starlette SSE baseline
    ratio (at full load and below saturation), the churn rows, the pass-through CPU, the
    floors (a minimal Redis client in 2b, the bare endpoint storing each token in 3), and
    vercel's resumable-stream (or a row saying why it was skipped; under CI=true node is
    required, so it must run)."""
    output = tmp_path / "figures.json"
    command = [sys.executable, "-m", "benchmarks", "--quick", "--only", "2b", "--only", "3"]
    result = subprocess.run(
        [*command, "--output", str(output)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    figures = {f["name"]: f for f in json.loads(output.read_text())["figures"]}

    def judged(name: str, target: str) -> None:
        figure = figures[name]
        assert figure["target"] == target
        assert figure["verdict"] in ("PASS", "FAIL")
        assert isinstance(figure["value"], int | float)
        assert name in result.stdout

    judged("CPU per SSE event, router / bare Starlette SSE", "<= 1.5")
    judged("30 streams (below saturation): CPU per SSE event, router / bare", "<= 1.5")
    judged("30 streams: clients behind or incomplete, router + bare", "== 0")
    judged("30 streams, floor: clients behind or incomplete", "== 0")
    sse_floor = "30 streams, floor: bare endpoint + one XADD per token, CPU per SSE event"
    assert isinstance(figures[sse_floor]["value"], int | float)
    # The server as the docs run it (uvicorn[standard], in the dev extra): information rows.
    standard = "on uvicorn[standard] (uvloop, httptools)"
    judged(f"{standard}: clients behind or incomplete", "== 0")
    ratio = f"{standard}, 30 streams: CPU per SSE event, router / bare"
    assert isinstance(figures[ratio]["value"], int | float)
    assert figures[ratio]["target"] is None and ratio in result.stdout
    judged("library CPU per token (minus pass-through)", "<= 15")
    judged("churn: library CPU per token (minus pass-through)", "<= 15")
    judged("churn: readers missing tokens", "== 0")
    judged("floor: readers missing tokens", "== 0")
    judged("churn with metrics on: readers missing tokens", "== 0")  # an OpenTelemetry SDK
    metrics = "churn with metrics on (OpenTelemetry SDK): library CPU per token"
    assert isinstance(figures[metrics]["value"], int | float)
    floor = "floor: minimal client, one XADD per token, no library (CPU minus pass-through)"
    assert isinstance(figures[floor]["value"], int | float)
    for streams in (20, 50):
        churn = [n for n in figures if n.startswith(f"churn, {streams} streams (")]
        assert len(churn) == 1
        judged(churn[0], "<= 25")
        judged(f"churn, {streams} streams: clients behind or incomplete", "== 0")
    node = "churn p99 / resumable-stream (Node) p99"
    if node in figures:
        judged(node, "<= 0.5")
    else:
        skipped = figures["resumable-stream (Node)"]
        assert str(skipped["value"]).startswith("skipped: ")
        assert "skipping the resumable-stream (Node) row" in result.stderr
        assert os.environ.get("CI") != "true", skipped["value"]


@pytest.mark.timeout(120)
def test_lockstep_prints_cpu_per_token_for_every_backend() -> None:
    """The lock-step tool (benchmarks/lockstep.py) runs each backend to the end: every
    reader gets every tick's token (else the run would not finish), one row per backend."""
    command = [sys.executable, "-m", "benchmarks.lockstep", "--streams", "5", "--ticks", "20"]
    result = subprocess.run(
        [*command, "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=100
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines()]
    assert rows == ["pass", "memory", "redis", "floor"], result.stdout
    assert all("us CPU per token" in line for line in result.stdout.splitlines())


@pytest.mark.timeout(120)
def test_lifecycle_prints_objects_per_live_stream_for_every_backend() -> None:
    """The lifecycle tool (benchmarks/lifecycle.py) runs each backend to the end: every
    reader attaches live and gets its stream's token (else the run would not finish)."""
    command = [sys.executable, "-m", "benchmarks.lifecycle", "--streams", "20"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert [row[0] for row in rows] == ["pass", "memory", "redis"], result.stdout
    assert all(float(row[1]) > 0 and "tracked objects" in " ".join(row) for row in rows)


def test_node_row_says_why_it_is_skipped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import vercel

    monkeypatch.setattr(vercel.shutil, "which", lambda tool: None)
    node = vercel.paced(None, [], 50.0)  # type: ignore[arg-type]  # never reaches Redis
    assert node == {"skipped": "node is not installed"}
    assert "skipping the resumable-stream (Node) row: node is not installed" in (
        capsys.readouterr().err
    )
    [row] = vercel.figures(node, 1.0)
    assert row.value == "skipped: node is not installed"
    assert row.verdict == ""


@pytest.mark.timeout(300)
def test_quick_cluster_rows_carry_their_targets(tmp_path: Path) -> None:
    """Issue 8's cluster figures: 2b's churn plan through redis+cluster:// on a local
    3-master cluster, with the connections per master judged against 2 (or a row saying why
    the cluster could not run; under CI=true a Redis Cluster is required, so it must run)."""
    output = tmp_path / "figures.json"
    command = [sys.executable, "-m", "benchmarks", "--quick", "--only", "2c"]
    result = subprocess.run(
        [*command, "--output", str(output)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    figures = {f["name"]: f for f in report["figures"]}
    assert {f["scenario"] for f in report["figures"]} == {"2c"}
    if "Redis Cluster (3 masters)" in figures:
        skipped = figures["Redis Cluster (3 masters)"]
        assert str(skipped["value"]).startswith("skipped: ")
        assert "skipping the Redis Cluster rows" in result.stderr
        assert os.environ.get("CI") != "true", skipped["value"]
        return
    for name, target in (
        ("cluster churn: readers missing tokens", "== 0"),
        ("cluster: Redis connections per master (peak)", "<= 2"),
    ):
        assert figures[name]["target"] == target
        assert figures[name]["verdict"] in ("PASS", "FAIL")
        assert name in result.stdout
    [p99] = [n for n in figures if n.startswith("cluster churn (") and n.endswith("): p99")]
    for name in (
        p99,
        "cluster churn: p50",
        "cluster churn: producer max lag",
        "cluster: Redis connections, all 3 masters (peak)",
        "cluster: Redis commands per token",
        "cluster: library CPU per token (minus pass-through)",
    ):
        assert isinstance(figures[name]["value"], int | float), name
        assert name in result.stdout
    details = report["details"]["2c"]["churn"]
    assert details["tokens"] > 0
    # Every master was sampled and the library used each of them (streams spread by slot).
    assert len(details["peak_connections_by_port"]) == 3
    assert all(peak >= 1 for peak in details["peak_connections_by_port"].values())


def test_cluster_row_says_why_redis_cli_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import _support, library

    which = _support.shutil.which
    monkeypatch.setattr(
        _support.shutil, "which", lambda tool: None if tool == "redis-cli" else which(tool)
    )
    result = library.cluster_latency(quick=True)
    reason = "redis-cli is not installed (apt-get install redis-tools)"
    assert result.details == {"skipped": reason}
    [row] = result.figures
    assert (row.scenario, row.value, row.verdict) == ("2c", f"skipped: {reason}", "")
    assert f"scenario 2c: skipping the Redis Cluster rows: {reason}" in capsys.readouterr().err


def test_cluster_row_says_why_redis_server_refuses_cluster_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A redis-server that refuses the cluster options (as one built before Redis Cluster
    would): the row carries the server's own complaint, and no node's folder is left."""
    from benchmarks import library

    fake = tmp_path / "redis-server"
    fake.write_text(
        '#!/bin/sh\necho "*** FATAL CONFIG FILE ERROR ***"\n'
        'echo "Bad directive or wrong number of arguments" >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = library.cluster_latency(quick=True)
    [row] = result.figures
    assert row.value == (
        "skipped: redis-server does not start in cluster mode: "
        "Bad directive or wrong number of arguments"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["redis-server"]


def test_the_floor_connects_on_uvloop(redis_url: str) -> None:
    # Regression: scenario 3 with RS_BENCH_LOOP=uvloop stopped at the floor's rows: its
    # connection asserted an asyncio.Transport, which uvloop's transports do not derive from.
    import uvloop

    from benchmarks.floor import Connection

    async def main() -> Any:
        connection, transport = await Connection.open(redis_url)
        replied: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        connection.send(b"*1\r\n$4\r\nPING\r\n", replied.set_result)
        try:
            return await asyncio.wait_for(replied, 10)
        finally:
            transport.close()

    assert uvloop.run(main()) == b"PONG"
