"""The code users copy from the README and the docs runs as written."""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._services import dies_with_us, free_port, launch_chromium, port_accepts, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_MS = 30_000


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


def code_block(path: str, title: str) -> str:
    found = re.search(rf'```python title="{title}"\n(.*?)```', (ROOT / path).read_text(), re.S)
    assert found, f"no {title} in {path}"
    return found.group(1)


@contextlib.contextmanager
def served_app(tmp_path: Path, code: str, what: str) -> Iterator[int]:
    """``code`` saved as ``app.py`` and served by uvicorn on a free port (yielded) until the
    block ends."""
    (tmp_path / "app.py").write_text(code)
    port = free_port()
    log = tmp_path / "uvicorn.log"
    command = [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port)]
    with log.open("wb") as out:
        server = subprocess.Popen(dies_with_us(command), cwd=tmp_path, stdout=out, stderr=out)
    try:
        wait_until_ready(lambda: port_accepts(port), what=what, process=server, log=log)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_tutorial_app_survives_a_reload_mid_answer(chromium_path: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    app = code_block("docs/tutorial.md", "app.py")
    with served_app(tmp_path, app, "the tutorial app") as port:
        answer = re.search(r'ANSWER = \(\n    "(.*?)"\n    "(.*?)"\n\)', app)
        assert answer is not None
        expected = answer.group(1) + answer.group(2)
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright, chromium_path)
            try:
                page = browser.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(f"http://127.0.0.1:{port}/")
                page.click("button")
                expect(page.locator("#answer")).to_have_text(re.compile(r"\S+ \S+ \S+"))
                stream_url = page.evaluate("sessionStorage.getItem('stream')")
                status = page.request.get(f"http://127.0.0.1:{port}{stream_url}/status").json()
                assert status["status"] == "running"  # the reload below lands mid-answer
                page.reload()
                expect(page.locator("#status")).to_have_text("end", timeout=TIMEOUT_MS)
                assert page.locator("#answer").text_content() == expected  # whole, once
            finally:
                browser.close()


def test_howto_testing_example_passes_under_pytest(tmp_path: Path) -> None:
    # Run as its file name invites: `pytest`, in a project with no pytest settings (an
    # empty pytest.ini stops pytest from reading this repository's). It used to define an
    # async test without a mark and run it with asyncio.run at import: under pytest (with
    # pytest-asyncio in its default strict mode), that test failed.
    (tmp_path / "test_app.py").write_text(code_block("docs/howto/testing.md", "test_app.py"))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_app.py"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def task_queue_block(first_line: str) -> str:
    """The python block of docs/task-queues.md that starts with ``first_line``."""
    text = (ROOT / "docs/task-queues.md").read_text()
    found = re.search(rf"```python\n({re.escape(first_line)}\n.*?)```", text, re.S)
    assert found, f"no block starting {first_line!r} in docs/task-queues.md"
    return found.group(1)


async def test_task_queue_api_sample_ends_a_run_whose_task_was_not_sent() -> None:
    # The API process's sample: a reserved run whose task the broker refused ends
    # `cancelled` at once (its readers waited start_timeout, 60 s, for `not_started`).
    import asyncio
    from collections.abc import AsyncIterator

    from fastapi import FastAPI

    from resumable_stream import (
        Reservation,
        ReservationExpired,
        StreamAlreadyRunning,
        StreamProducer,
    )
    from resumable_stream.testing import collect
    from resumable_stream.transports.memory import MemoryTransport

    sent: list[str] = []
    broker_up = True
    delivered_anyway = False
    loop = asyncio.get_running_loop()
    transport = MemoryTransport()
    worker = StreamProducer(transport)  # a Celery worker's

    async def endless() -> AsyncIterator[str]:
        while True:
            yield "token "
            await asyncio.sleep(0.01)

    class Answer:  # the Celery task
        @staticmethod
        def delay(question: str, reservation: str) -> None:
            sent.append(reservation)
            if delivered_anyway:  # a worker took it, yet publishing reported an error
                started = worker.start(endless(), reservation=Reservation.parse(reservation))
                asyncio.run_coroutine_threadsafe(started, loop).result()
            if not broker_up:
                raise ConnectionError("the broker is down")

    namespace = {
        "app": FastAPI(),
        "producer": StreamProducer(transport),
        "answer": Answer,
        "asyncio": asyncio,
        "AsyncIterator": AsyncIterator,
        "Reservation": Reservation,
        "ReservationExpired": ReservationExpired,
        "StreamAlreadyRunning": StreamAlreadyRunning,
    }
    exec(task_queue_block('@app.post("/ask")'), namespace)
    ask = namespace["ask"]

    queued = await ask("hello?")
    assert queued["stream_id"] == Reservation.parse(sent[-1]).stream_id
    assert (await transport.info(queued["stream_id"])).status == "running"  # type: ignore[union-attr]

    broker_up = False
    with pytest.raises(ConnectionError):
        await ask("hello?")
    unsent = Reservation.parse(sent[-1])
    events = await asyncio.wait_for(collect(transport, unsent.stream_id), 10)
    assert [e.type for e in events] == ["custom", "custom", "cancelled"]
    with pytest.raises(ReservationExpired):  # the task, had it gone out after all
        await StreamProducer(transport).start(namespace["nothing"](), reservation=unsent)

    delivered_anyway = True
    with pytest.raises(ConnectionError):
        await ask("hello?")
    taken = Reservation.parse(sent[-1])
    events = await asyncio.wait_for(collect(transport, taken.stream_id), 10)
    assert [e.type for e in events[:2]] == ["custom", "custom"]
    assert events[-1].type == "cancelled"  # the worker's run, stopped


API_PROCESS = """
import asyncio
import sys
from collections.abc import AsyncIterator

from fastapi import FastAPI

from answers import REDIS_URL, answer
from resumable_stream import (
    Reservation, ReservationExpired, StreamAlreadyRunning, StreamProducer, from_url,
)
from resumable_stream.testing import collect

app = FastAPI()
{api}

async def main() -> None:
    global producer
    transport = from_url(REDIS_URL)
    producer = StreamProducer(transport)
    asked = await ask("Who wrote this?")
    events = await collect(transport, asked["stream_id"])
    print([e.type for e in events])
    print("".join(e.data.get("text", "") for e in events if e.type == "token"))
    await transport.aclose()

asyncio.run(main())
"""


def test_task_queue_celery_sample_answers_on_a_real_worker(redis_url: str, tmp_path: Path) -> None:
    # docs/task-queues.md's Celery worker and API process as written, on the session's
    # Redis (their own Celery keys), with a stand-in for the user's graph.
    import uuid

    worker_code = task_queue_block(
        "# answers.py: celery -A answers worker --pool=threads --concurrency=16"
    )
    assert 'REDIS_URL = "redis://localhost:6379/0"' in worker_code
    worker_code = worker_code.replace("redis://localhost:6379/0", redis_url)
    worker_code += (
        "\n\nclass Graph:  # the test's stand-in for the app's LangGraph graph\n"
        "    async def astream_events(self, inputs, version):\n"
        "        for word in ('Celery ', 'ran ', 'this.'):\n"
        "            yield word\n\n\n"
        "graph = Graph()\n"
        f"app.conf.task_default_queue = 'docs-{uuid.uuid4().hex}'\n"
    )
    (tmp_path / "answers.py").write_text(worker_code)
    (tmp_path / "api.py").write_text(
        API_PROCESS.replace("{api}", task_queue_block('@app.post("/ask")'))
    )
    log = tmp_path / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "answers", "worker", "--pool=threads"]
    command += ["--concurrency=4", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    with log.open("wb") as out:
        worker = subprocess.Popen(dies_with_us(command), cwd=tmp_path, stdout=out, stderr=out)
    try:
        result = subprocess.run(
            [sys.executable, "api.py"], cwd=tmp_path, capture_output=True, text=True, timeout=90
        )
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert result.returncode == 0, result.stderr + log.read_text()
    types, text = result.stdout.splitlines()[-2:]
    assert types == "['custom', 'custom', 'token', 'token', 'token', 'end']", log.read_text()
    assert text == "Celery ran this."


JSON = "application/json"


def http_app(flavour: str) -> str:
    """docs/http.md's complete Starlette app, or its FastAPI variant on the same parts."""
    blocks: list[str] = re.findall(
        r"```python\n(.*?)```", (ROOT / "docs/http.md").read_text(), re.S
    )
    starlette_app, fastapi_app = blocks[0], blocks[1]
    assert starlette_app.startswith("import asyncio") and "app = Starlette(" in starlette_app
    assert "# transport, producer, answer, authorize and lifespan: as above" in fastapi_app
    if flavour == "starlette":
        return starlette_app
    return starlette_app.split("app = Starlette(")[0] + fastapi_app


@pytest.mark.parametrize("flavour", ["starlette", "fastapi"])
def test_http_page_app_serves_a_stream(flavour: str, tmp_path: Path) -> None:
    import httpx

    with (
        served_app(tmp_path, http_app(flavour), "the http.md app") as port,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
    ):
        started = client.post("/chat", json={"question": "why resume?"})
        assert started.status_code == 202, started.text
        body = started.json()
        assert body["stream_url"] == f"/streams/{body['stream_id']}"
        assert started.headers["location"] == body["stream_url"]
        events = client.get(body["stream_url"])
        assert events.headers["content-type"].startswith("text/event-stream")
        assert events.text.startswith("retry: 1000\nid: ")
        texts = re.findall(r'^data: \{"text":"([^"]*)"', events.text, re.M)
        assert "".join(texts) == "You asked: why resume? "
        assert events.text.endswith("event: end\ndata: {}\n\n")
        status = client.get(body["stream_url"] + "/status").json()
        assert status["status"] == "completed"
        cancel = client.post(body["stream_url"] + "/cancel")
        assert cancel.status_code == 409
        assert cancel.json()["code"] == "stream_not_running"
        # A bad body is a 4xx JSON error, not a 500 (Starlette's app read it unguarded).
        for bad in (b"not json", b"\xff", b"", b"[]", b"{}", b'{"question": 5}'):
            refused = client.post("/chat", content=bad, headers={"content-type": JSON})
            assert refused.headers["content-type"] == JSON, (bad, refused.text)
            if flavour == "starlette":
                assert refused.status_code == 400, (bad, refused.text)
                assert set(refused.json()) == {"code", "message"}
                assert refused.json()["code"] == "invalid_request"
            else:  # FastAPI checks the body against the page's Question model
                assert refused.status_code in (400, 422), (bad, refused.text)
                assert "detail" in refused.json()


def test_langgraph_sdk_page_python_client_runs_against_its_backend(tmp_path: Path) -> None:
    # Both blocks as a reader saves them: the backend as app.py, served by uvicorn, and the
    # Python client as a script. The client used to await at top level: run as a script,
    # it failed with "SyntaxError: 'await' outside function".
    text = (ROOT / "docs/langgraph-sdk.md").read_text()
    backend = re.search(r"```python\n(import contextlib\n.*?)```", text, re.S)
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    client = [block for block in blocks if "from langgraph_sdk import get_client" in block]
    assert backend and len(client) == 1, "no backend or Python client in docs/langgraph-sdk.md"
    assert "http://localhost:8000/langgraph" in client[0]
    with served_app(tmp_path, backend.group(1), "the langgraph-sdk.md app") as port:
        script = client[0].replace("localhost:8000", f"127.0.0.1:{port}")
        (tmp_path / "client.py").write_text(script)
        result = subprocess.run(
            [sys.executable, "client.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("metadata ")
    assert "Hello from the graph!" in [line for line in lines if line.startswith("values ")][-1]
    assert lines[-1].startswith("end ")


def installed_with(requirements: list[str]) -> set[str]:
    """The distributions pip installs for ``requirements``: their dependency closure as this
    environment has it (extras included), by canonical name."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(requirement) for requirement in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        found.add(name)
        extras = requirement.extras or {""}
        for line in metadata.requires(name) or []:
            dependency = Requirement(line)
            marker = dependency.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(dependency)
    return found


@pytest.mark.parametrize(
    "path",
    [
        "README.md",
        "docs/index.md",
        "docs/tutorial.md",
        "docs/http.md",
        "docs/ai-sdk.md",
        "docs/langgraph-sdk.md",
    ],
)
def test_install_lines_cover_what_the_page_runs(path: str) -> None:
    # A reader who runs only the page's `pip install` lines can import every module its
    # Python code imports, and run `uvicorn app:app` when the page says to. docs/http.md
    # used to name the `web` extra only, under its FastAPI app (ModuleNotFoundError:
    # fastapi), and three pages said to serve the app with uvicorn without installing it.
    from importlib import metadata

    from packaging.utils import canonicalize_name

    text = (ROOT / path).read_text()
    installs = [
        line.split("#")[0].split()[2:] for line in re.findall(r"^pip install .*$", text, re.M)
    ]
    assert installs, f"no pip install line in {path}"
    installed = installed_with([word.strip("\"'") for words in installs for word in words])
    imports = set()
    for block in re.findall(r"```python[^\n]*\n(.*?)```", text, re.S):
        imports |= set(re.findall(r"^\s*(?:from|import) (\w+)", block, re.M))
    if "uvicorn app:app" in text:
        imports.add("uvicorn")
    providers = metadata.packages_distributions()
    for module in sorted(imports - set(sys.stdlib_module_names) - {"resumable_stream"}):
        assert module in providers, f"{path} imports {module}, which is not installed here"
        dists = {canonicalize_name(dist) for dist in providers[module]}
        assert dists & installed, f"{path}: {module} is not installed by {installs}"


def test_offsets_page_parse_offset_sample_runs() -> None:
    found = re.search(
        r"```python\n(from resumable_stream import parse_offset\n.*?)```",
        (ROOT / "docs/offsets.md").read_text(),
        re.S,
    )
    assert found, "no parse_offset sample in docs/offsets.md"
    exec(found.group(1), {})


async def _events_page_sample(first_line: str) -> list[Any]:
    """Run the docs/events.md sample that starts with ``first_line`` (it awaits at top
    level, as in an async function of the reader's app) and read what its run wrote."""
    from resumable_stream import StreamProducer
    from resumable_stream.testing import collect
    from resumable_stream.transports.memory import MemoryTransport

    found = re.search(
        rf"```python\n({re.escape(first_line)}\n.*?)```",
        (ROOT / "docs/events.md").read_text(),
        re.S,
    )
    assert found, f"no sample starting with {first_line!r} in docs/events.md"
    body = "".join(f"    {line}\n" for line in found.group(1).splitlines())
    transport = MemoryTransport()
    namespace: dict[str, object] = {"transport": transport, "StreamProducer": StreamProducer}
    exec(f"async def sample():\n{body}    return run\n", namespace)
    run = await namespace["sample"]()  # type: ignore[operator]
    return await collect(transport, run.stream_id)


async def test_events_page_event_too_large_sample_runs() -> None:
    events = await _events_page_sample("async def source():")
    assert [(e.type, e.data.get("error")) for e in events] == [
        ("token", None),
        ("error", "EventTooLarge"),
    ]


async def test_events_page_lone_surrogate_sample_runs() -> None:
    events = await _events_page_sample("async def split_pair():")
    assert [(e.type, e.data.get("text")) for e in events] == [
        ("token", "a "),
        ("token", "\U0001f600, lone \ufffd!"),
        ("end", None),
    ]


@pytest.mark.parametrize(
    ("raised", "error"),
    [
        ("RateLimitError", "the model is busy; try again in a minute"),
        ("OSError", "the answer failed"),
    ],
)
async def test_events_page_error_masking_sample_runs(
    raised: str, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    from resumable_stream import StreamProducer
    from resumable_stream.transports.memory import MemoryTransport
    from tests._helpers import collect

    text = (ROOT / "docs/events.md").read_text()
    found = re.search(r"```python\n(import logging\n\nlog = .*?)```", text, re.S)
    assert found, "the error sample is gone from docs/events.md"

    class RateLimitError(Exception):
        pass

    class Graph:  # the sample's graph: a token, then the failure
        async def astream_events(self, inputs: Any, version: str) -> Any:
            yield {"event": "on_custom_event", "name": "step", "data": {}}
            raise RateLimitError("429") if raised == "RateLimitError" else OSError("10.0.0.5")

    namespace: dict[str, Any] = {
        "graph": Graph(),
        "openai": type("openai", (), {"RateLimitError": RateLimitError}),
    }
    exec(found.group(1), namespace)
    transport = MemoryTransport()
    with caplog.at_level(logging.ERROR, logger="my_app"):
        async with StreamProducer(transport) as producer:
            run = await producer.start(namespace["answer"]("hi"))
            assert await run.wait() == "error"
        events = await collect(transport, run.stream_id)
    assert events[-1].data == {"error": "RuntimeError", "message": error}
    logged = [r for r in caplog.records if r.name == "my_app"]
    assert len(logged) == (raised == "OSError")  # what is not told is logged
