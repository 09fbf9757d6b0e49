"""The code users copy from the README and the docs runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quickstart(path: str) -> str:
    text = (ROOT / path).read_text()
    found = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S)
    assert found, f"no quickstart in {path}"
    return found.group(1)


@pytest.mark.parametrize("path", ["README.md", "docs/index.md"])
def test_quickstart_runs(path: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", quickstart(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert (
        "".join(
            re.search(r"'text': '([^']*)'", line).group(1)  # type: ignore[union-attr]
            for line in lines
            if " token " in line
        )
        == "Streams outlive the request that started them. "
    )
    assert lines[-1].split(" ", 2)[1] == "end"


def test_custom_transport_example_matches_the_tested_one() -> None:
    page = (ROOT / "docs/custom-transport.md").read_text()
    tested = (ROOT / "tests/test_custom_transport.py").read_text()
    example = re.search(r"```python\n(from typing import Any.*?)```", page, re.S)
    assert example is not None
    body = [line.strip() for line in example.group(1).splitlines() if line.strip()]
    assert len(body) < 15
    for line in body:
        if not line.startswith(("from ", "import ")):  # the test module imports more names
            assert line in tested, line
