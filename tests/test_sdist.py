"""The source distribution holds the repository's tracked files: nothing a test run leaves, nothing
else lying in the work tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from tests._services import from_package_index

ROOT = Path(__file__).resolve().parent.parent


def test_the_sdist_ships_the_tracked_files_and_nothing_else_in_the_tree(tmp_path: Path) -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    tree = tmp_path / "tree"
    files = {name for name in tracked.split("\0") if name}
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    # What a test run with Hypothesis leaves in the working tree (the suite runs before
    # .ci/package builds the sdist from the same tree).
    database = tree / ".hypothesis" / "constants"
    database.mkdir(parents=True)
    (tree / ".hypothesis" / ".gitignore").write_text("*\n")
    (database / "0123456789abcdef").write_bytes(b"cached")
    # Stray files of a developer's tree: ignored by .gitignore (a built site, a virtualenv,
    # benchmark results) or not (notes, a scratch folder).
    for stray in (
        "notes.txt",
        "scratch/try.py",
        "site/index.html",
        ".venv/lib/module.py",
        "benchmarks/results/run.json",
    ):
        (tree / stray).parent.mkdir(parents=True, exist_ok=True)
        (tree / stray).write_text("stray\n")
    build = [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "dist")]
    from_package_index([*build, str(tree)], "building the sdist (python -m build)")
    with tarfile.open(next((tmp_path / "dist").glob("*.tar.gz"))) as archive:
        shipped = {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile()}
    assert shipped - {"PKG-INFO"} == files
