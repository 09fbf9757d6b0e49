"""The real npm client libraries, installed once from the committed lock file.

`node_modules` runs `npm ci` (package.json + package-lock.json in this directory) into a
cache directory keyed by the lock file's hash, and reuses it while the lock is unchanged.
Only the npm registry is needed. A missing node or npm skips these tests locally and fails
them under `CI=true`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests._services import unavailable

HERE = Path(__file__).resolve().parent
JS_DIR = HERE / "js"
NODE_TIMEOUT = 90.0


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "resumable-stream-tests"


@pytest.fixture(scope="session")
def node_modules() -> Iterator[Path]:
    """A copy of js/ inside the directory where `npm ci` installed node_modules."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        unavailable("node and npm are needed for the client protocol tests")
    lock = (HERE / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock + (HERE / "package.json").read_bytes()).hexdigest()[:16]
    root = _cache_root() / f"npm-{digest}"
    marker = root / ".installed"
    root.mkdir(parents=True, exist_ok=True)
    # Test sessions running at once (several checkouts) share the cache: one installs.
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            shutil.copy(HERE / "package.json", root / "package.json")
            shutil.copy(HERE / "package-lock.json", root / "package-lock.json")
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline", "--loglevel=error"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if done.returncode != 0:
                unavailable(f"npm ci failed in {root}:\n{done.stdout}\n{done.stderr}")
            marker.write_text(digest)
    # The scripts sit next to node_modules, where their imports resolve; a directory per
    # session, so that sessions at once do not replace each other's scripts.
    scripts = Path(tempfile.mkdtemp(prefix="js-", dir=root))
    shutil.copytree(JS_DIR, scripts, dirs_exist_ok=True)
    try:
        yield scripts
    finally:
        shutil.rmtree(scripts, ignore_errors=True)


def run_node(modules: Path, script: str, *args: str, timeout: float = NODE_TIMEOUT) -> Any:
    """Run js/<script> with node; return the JSON it prints last; fail with its output."""
    command: Sequence[str] = ["node", str(modules / script), *args]
    done = subprocess.run(
        command, cwd=modules, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"{script} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if not lines:
        pytest.fail(f"{script} printed nothing:\n{done.stderr}")
    return json.loads(lines[-1])
