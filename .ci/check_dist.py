"""Check the built sdist and wheel: metadata (name, version, extras, Python versions) and files.

Built from a git clone, the sdist must hold exactly the files git tracks: nothing else lying
in the work tree.

Usage: python .ci/check_dist.py dist/*.tar.gz dist/*.whl
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The Python versions CI runs: the classifiers must claim these and no other.
CI_PYTHONS = {f"{sys.version_info.major}.{sys.version_info.minor}"}


def main(paths: list[str]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wheel = next(p for p in paths if p.endswith(".whl"))
    sdist = next(p for p in paths if p.endswith(".tar.gz"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(meta_name).decode())
    problems = []
    if metadata["Name"] != project["name"]:
        problems.append(f"Name {metadata['Name']!r} != {project['name']!r}")
    version = re.search(
        r'__version__ = "([^"]+)"', (ROOT / "src/resumable_stream/__init__.py").read_text()
    )
    if version is None or metadata["Version"] != project["version"] != version.group(1):
        problems.append(f"Version {metadata['Version']!r}: pyproject and __version__ disagree")
    if metadata["Requires-Python"] != project["requires-python"]:
        problems.append(f"Requires-Python {metadata['Requires-Python']!r}")
    extras = set(metadata.get_all("Provides-Extra") or [])
    if extras != set(project["optional-dependencies"]):
        problems.append(f"extras {sorted(extras)} != pyproject's")
    claimed = {
        c.rsplit(" :: ", 1)[1]
        for c in metadata.get_all("Classifier") or []
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    if claimed != CI_PYTHONS:
        problems.append(f"classifiers claim Python {sorted(claimed)}, CI runs {sorted(CI_PYTHONS)}")
    if "text/markdown" not in (metadata["Description-Content-Type"] or ""):
        problems.append("the README is not rendered as Markdown")
    for needed in ("resumable_stream/py.typed", "resumable_stream/testing.py"):
        if needed not in names:
            problems.append(f"the wheel lacks {needed}")
    if any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names):
        problems.append("the wheel ships tests, examples or benchmarks")
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers() if "/" in m.name}
        shipped = {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile()}
    for needed in ("pyproject.toml", "README.md", "src/resumable_stream/__init__.py"):
        if needed not in members:
            problems.append(f"the sdist lacks {needed}")
    if (ROOT / ".git").exists():  # built from a clone: exactly the files git tracks
        tracked = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
        files = {name for name in tracked.split("\0") if name}
        shipped.discard("PKG-INFO")
        for name in sorted(shipped - files):
            problems.append(f"the sdist ships {name}, which git does not track")
        for name in sorted(files - shipped):
            problems.append(f"the sdist lacks {name}, which git tracks")
    if problems:
        raise SystemExit("\n".join(["dist check failed:", *problems]))
    print(f"{Path(wheel).name}, {Path(sdist).name}: metadata and contents OK")
    print(f"  extras: {', '.join(sorted(extras))}; Python {', '.join(sorted(claimed))}")


if __name__ == "__main__":
    main(sys.argv[1:])
