"""The real npm client libraries, installed once from the committed lock file.

`node_modules` runs `npm ci` (package.json + package-lock.json in this directory) into a
cache directory keyed by the lock file's hash, and reuses it while the lock is unchanged.
Only the npm registry is needed. A missing node or npm skips these tests locally and fails
them under `CI=true`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
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
def node_modules() -> Path:
    """A directory holding node_modules (from `npm ci`) and this directory's js/ scripts."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        unavailable("node and npm are needed for the client protocol tests")
    lock = (HERE / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock + (HERE / "package.json").read_bytes()).hexdigest()[:16]
    root = _cache_root() / f"npm-{digest}"
    marker = root / ".installed"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
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
    # The scripts sit next to node_modules so that their imports resolve there.
    scripts = root / "js"
    if scripts.exists():
        shutil.rmtree(scripts)
    shutil.copytree(JS_DIR, scripts)
    return root


def run_node(modules: Path, script: str, *args: str, timeout: float = NODE_TIMEOUT) -> Any:
    """Run js/<script> with node; return the JSON it prints last; fail with its output."""
    command: Sequence[str] = ["node", str(modules / "js" / script), *args]
    done = subprocess.run(
        command, cwd=modules, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"{script} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if not lines:
        pytest.fail(f"{script} printed nothing:\n{done.stderr}")
    return json.loads(lines[-1])
