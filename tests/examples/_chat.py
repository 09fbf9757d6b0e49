"""Drive the chat service as its users do: a real server process, HTTP, SSE, subprocesses.

`ChatServer` runs `python -m chat_service` (or its worker) in its own process group on a
loopback port it keeps across restarts. Waiting is on events where there are some (the SSE
stream itself, a process's output); state that only a server holds is polled with a deadline
(`eventually`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from httpx_sse import connect_sse

from tests._services import REPO_ROOT, free_port, port_accepts, wait_until_ready

CHAT_DIR = REPO_ROOT / "examples" / "chat"
#: A folder whose sitecustomize makes a process's first start of an answer's stream fail with
#: TransportError, as when Redis refuses the connection at that moment (on its PYTHONPATH,
#: with CHAT_TEST_FAIL_AT_START naming a marker file).
FAILS_AT_START = Path(__file__).parent / "fails_at_start"
T = TypeVar("T")

#: What every test server gets unless the test says otherwise: no inherited service URLs,
#: a fixed secret (several processes share sessions), the offline model as fast as it goes.
BASE_ENV = {
    "REDIS_URL": "",
    "DATABASE_URL": "",
    "WORKER_MODE": "",
    "CHAT_MODEL": "offline",
    "SECRET_KEY": "test-secret-key",
    "OFFLINE_TOKENS_PER_SECOND": "0",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": str(CHAT_DIR),
}


def eventually(check: Callable[[], T | None], *, timeout: float = 10.0, what: str = "") -> T:
    """Poll `check()` until it returns something truthy; fail at the deadline.

    For state held by another process, which sends no event when it changes.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what or check}")
        time.sleep(0.05)


@dataclass
class ChatServer:
    """`python -m chat_service [worker]` in a subprocess; `url` stays valid across restarts."""

    env: Mapping[str, str]
    log: Path
    command: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_worker(self) -> bool:
        return self.command == ("worker",)

    def start(self) -> ChatServer:
        offset = self.log.stat().st_size if self.log.exists() else 0
        env = {**os.environ, **BASE_ENV, **self.env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "chat_service", *self.command],
                cwd=CHAT_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if self.is_worker:
            ready: Callable[[], bool] = lambda: "ready" in self._output(offset)  # noqa: E731
        else:
            ready = lambda: port_accepts(self.port)  # noqa: E731
        wait_until_ready(
            ready, what=f"chat_service {self.command}", process=self.process, log=self.log
        )
        return self

    def _output(self, offset: int = 0) -> str:
        with self.log.open("rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")

    def output(self) -> str:
        return self._output()

    def kill(self) -> None:
        """SIGKILL the process group: a crash, with no chance to clean up."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def client(self, **kwargs: Any) -> httpx.Client:
        """A client with its own cookie jar: a user of its own."""
        return httpx.Client(base_url=self.url, timeout=httpx.Timeout(20.0), **kwargs)


@dataclass
class Sse:
    id: str
    event: str
    data: dict[str, Any]


def read_sse(
    client: httpx.Client,
    url: str,
    *,
    last_event_id: str | None = None,
    stop_after: Callable[[list[Sse]], bool] | None = None,
) -> tuple[int, list[Sse]]:
    """(status, events) of one SSE request; reads to the end of the response, or until
    `stop_after(events)` is true (then the connection is dropped, like a lost network)."""
    headers = {"accept": "text/event-stream"}
    if last_event_id is not None:
        headers["last-event-id"] = last_event_id
    events: list[Sse] = []
    with connect_sse(client, "GET", url, headers=headers) as source:
        status = source.response.status_code
        if status != 200:
            source.response.read()
            return status, events
        for sse in source.iter_sse():
            events.append(Sse(sse.id, sse.event, json.loads(sse.data)))
            if stop_after is not None and stop_after(events):
                break
    return status, events


def answer_text(events: list[Sse]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "chunk")


def terminal(events: list[Sse]) -> dict[str, Any] | None:
    for event in reversed(events):
        if event.event == "system" and event.data["type"] in ("end", "error"):
            return event.data
    return None


def post_message(client: httpx.Client, message: str, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/message", json={"message": message, **fields})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def ask(client: httpx.Client, message: str, **fields: Any) -> tuple[dict[str, Any], list[Sse]]:
    """Send a message and read its whole answer."""
    started = post_message(client, message, **fields)
    status, events = read_sse(client, started["stream_url"])
    assert status == 200
    assert terminal(events) == {"type": "end"}, events[-3:]
    return started, events


def history(client: httpx.Client, thread_id: str) -> dict[str, Any]:
    response = client.get("/v1/thread", params={"thread_id": thread_id})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def final_answer(thread: dict[str, Any]) -> str:
    return str(thread["messages"][-1]["text"])


def idle(client: httpx.Client, thread_id: str) -> bool:
    """True once the thread has no answer in flight."""
    return history(client, thread_id)["active_run"] is None


def failed_then_retried(
    client: httpx.Client,
) -> tuple[dict[str, Any], list[Sse], dict[str, Any], list[Sse]]:
    """Ask a question whose answer is to fail (a test hook), read it, wait until its thread
    settles, and Retry: the accepted message, its events, the settled thread, and the
    retry's events."""
    first = post_message(client, "what is 12*7")
    _, events = read_sse(client, first["stream_url"])
    thread = eventually(lambda: settled(client, first["thread_id"]), what="the thread settles")
    retried = client.post("/v1/chat/regenerate", json={"thread_id": first["thread_id"]})
    assert retried.status_code == 202, retried.text
    _, answer = read_sse(client, retried.json()["stream_url"])
    return first, events, thread, answer


def settled(client: httpx.Client, thread_id: str) -> dict[str, Any] | None:
    """The thread once it has no answer in flight, else None (for `eventually`)."""
    thread = history(client, thread_id)
    return thread if thread["active_run"] is None else None


class OutputReader:
    """Everything a subprocess writes to a pipe, read by a thread as it comes (answers are
    printed without a newline until they end), waited for with a deadline."""

    def __init__(self, pipe: Any) -> None:
        self._text = ""
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for the end of the output (the process exited)."""
        self._thread.join(timeout=10)

    def _pump(self, pipe: Any) -> None:
        while chunk := os.read(pipe.fileno(), 4096):
            with self._changed:
                self._text += chunk.decode(errors="replace")
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def text(self) -> str:
        with self._changed:
            return self._text

    def wait_for(self, check: Callable[[str], bool], *, timeout: float = 20.0) -> str:
        """Wait until `check(everything written so far)`; return that text."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not check(self._text):
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    why = "the pipe closed" if self._closed else f"{timeout}s passed"
                    raise AssertionError(f"{why}; output so far:\n{self._text[-2000:]}")
                self._changed.wait(remaining)
            return self._text


@dataclass
class Cli:
    """`python -m chat_service.cli` with a pipe for stdin and readers for its output."""

    process: subprocess.Popen[bytes]
    stdout: OutputReader
    stderr: OutputReader

    def type(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def close(self) -> int:
        """End the input (like Ctrl-D); return the exit code."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.process.wait(timeout=20)


@contextlib.contextmanager
def cli(url: str, token: str, *extra: str, env: Mapping[str, str] = {}) -> Iterator[Cli]:
    process = subprocess.Popen(
        [sys.executable, "-m", "chat_service.cli", "--url", url, "--token", token, *extra],
        cwd=CHAT_DIR,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(CHAT_DIR), **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    readers = (OutputReader(process.stdout), OutputReader(process.stderr))
    try:
        yield Cli(process, *readers)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for reader in readers:
            reader.join()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def servers(log_dir: Path) -> Iterator[Callable[..., ChatServer]]:
    """Start chat servers (and workers); every one is stopped at the end."""
    started: list[ChatServer] = []

    def make(*command: str, **env: str) -> ChatServer:
        name = f"{'-'.join(command) or 'api'}-{len(started)}.log"
        server = ChatServer(env=env, log=log_dir / name, command=command)
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in reversed(started):
            server.stop()
