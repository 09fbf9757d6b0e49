"""Optional parts name the extra that brings what they need when it is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "missing", "extra"),
    [
        ("resumable_stream.starlette", "starlette", "web"),
        ("resumable_stream.fastapi", "fastapi", "fastapi"),
        ("resumable_stream.testing", "pytest", "testing"),
        ("resumable_stream.testing", "pytest_asyncio", "testing"),
        ("resumable_stream.ai_sdk", "starlette", "web"),
        ("resumable_stream.langgraph_api", "starlette", "web,langgraph"),
        ("resumable_stream.transports.redis", "redis", "redis"),
        ("resumable_stream.transports.redis", "hiredis", "redis"),
    ],
)
def test_a_missing_dependency_names_its_extra(module: str, missing: str, extra: str) -> None:
    code = (
        "import sys, importlib\n"
        f"sys.modules[{missing!r}] = None  # as if it were not installed\n"
        "try:\n"
        f"    importlib.import_module({module!r})\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"pip install 'resumable-llm-stream[{extra}]'" in result.stdout, result.stdout
