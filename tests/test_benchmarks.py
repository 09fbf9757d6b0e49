"""The benchmark script keeps working (its figures are read from its output, not asserted
here: timings belong in the benchmark run, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
