"""Scenario 2b's comparison row: vercel's ``resumable-stream`` (Node) on the same plan.

The versions are pinned in ``benchmarks/node/package-lock.json``; ``npm ci`` installs them
into a temporary folder (kept between runs, keyed by the lock file). Without ``node`` or
``npm``, or when the install fails, the row says why it was skipped, on the table and on
stderr.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ._shape import PlannedStream
from ._support import Figure, RedisServer

NODE_DIR = Path(__file__).resolve().parent / "node"
NAME = "resumable-stream (Node)"


def _install() -> Path:
    """A folder with the pinned packages and the script; raises RuntimeError with a reason."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed")
    lock = (NODE_DIR / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock + (NODE_DIR / "package.json").read_bytes()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"rstream-bench-node-{digest}"
    if not (folder / "node_modules" / "resumable-stream" / "package.json").is_file():
        folder.mkdir(exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(NODE_DIR / name, folder / name)
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"npm ci failed: {done.stderr.strip()[-300:]}")
    # The script imports the packages, so it must sit next to node_modules.
    shutil.copyfile(NODE_DIR / "paced.mjs", folder / "paced.mjs")
    return folder


def paced(server: RedisServer, plan: list[PlannedStream], rate: float) -> dict[str, Any]:
    """Run ``plan`` through resumable-stream; its figures, or ``{"skipped": reason}``."""
    try:
        folder = _install()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc) or type(exc).__name__
        print(f"scenario 2b: skipping the {NAME} row: {reason}", file=sys.stderr, flush=True)
        return {"skipped": reason}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump([p.as_dict() for p in plan], file)
    try:
        seconds = max((p.start + p.count / rate for p in plan), default=0.0)
        done = subprocess.run(
            ["node", "paced.mjs", file.name, server.url, str(rate)],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=seconds + 120,
        )
    finally:
        Path(file.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {NAME} run failed: {done.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def figures(node: dict[str, Any], our_p99: float) -> list[Figure]:
    """The comparison rows, or one row saying why they were skipped."""
    if "skipped" in node:
        return [Figure("2b", NAME, f"skipped: {node['skipped']}", note="skipped")]
    their_p99 = node["p99_ms"]
    return [
        Figure("2b", f"{NAME}, same churn plan: p50", round(node["p50_ms"], 2), "ms", note="info"),
        Figure("2b", f"{NAME}, same churn plan: p99", round(their_p99, 2), "ms", note="info"),
        Figure(
            "2b",
            f"{NAME}: readers missing tokens (finished streams cannot resume)",
            node["short"],
            note="info",
        ),
        Figure("2b", f"{NAME}: reader errors (ack timeouts)", node["errors"], note="info"),
        Figure(
            "2b",
            f"{NAME}: process CPU per token",
            round(node["cpu_s"] / max(node["tokens"], 1) * 1e6, 1),
            "us",
            note="info",
        ),
        Figure(
            "2b",
            f"churn p99 / {NAME} p99",
            round(our_p99 / their_p99, 2) if their_p99 else None,
            "x",
            "<=",
            0.5,
            note="same run, same redis-server",
        ),
    ]
