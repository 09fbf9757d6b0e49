"""Optional parts name the extra that brings what they need when it is missing."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests._services import from_package_index

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's wheel, built once per session as pip builds it."""
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out)]
    from_package_index([*command, str(ROOT)], "building the wheel (pip wheel)")
    return next(out.glob("*.whl"))


def test_the_redis_extra_upgrades_a_hiredis_too_old_for_the_transport(
    wheel: Path, redis_url: str, tmp_path: Path
) -> None:
    # An app that already has redis-py 5.0.1 and hiredis 2.1.0 (which redis-py 5 accepts,
    # but which has no pack_command) installs the redis extra: pip must upgrade hiredis.
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    from_package_index([*pip, "redis==5.0.1", "hiredis==2.1.0"], "pip install redis hiredis")
    from_package_index([*pip, f"resumable-llm-stream[redis] @ {wheel.as_uri()}"], "pip install")
    code = (
        "import asyncio, sys\n"
        "from resumable_stream import StreamConsumer, StreamProducer, from_url\n"
        "async def tokens():\n"
        "    yield 'hello '\n"
        "async def main():\n"
        "    transport = from_url(sys.argv[1])\n"
        "    run = await StreamProducer(transport).start(tokens())\n"
        "    async for event in StreamConsumer(transport, run.stream_id):\n"
        "        print(event.type, event.data.get('text'))\n"
        "    await transport.aclose()\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run(
        [python, "-c", code, redis_url], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["token hello ", "end None"], result.stdout
