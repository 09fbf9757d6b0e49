"""The terminal client, driven as a subprocess: commands, streaming, stop, and resuming an
answer across a server restart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from chat_service.cli import ChatClient, _loop
from starlette.responses import HTMLResponse

from tests._services import free_port, uvicorn_server
from tests.examples._chat import (
    CHAT_DIR,
    ChatServer,
    cli,
    eventually,
    final_answer,
    post_message,
    read_sse,
    settled,
    terminal,
)
from tests.examples.conftest import redis_postgres_env

TOKEN = "cli-test-token-0123456789"


def test_commands_stream_answers_and_manage_threads(
    chat_servers: Callable[..., ChatServer],
) -> None:
    server = chat_servers(OFFLINE_TOKENS_PER_SECOND="60")
    with cli(server.url, TOKEN) as client:
        client.type("Hi, my name is Ada")
        client.stdout.wait_for(lambda out: "What would you like to talk about?\n" in out)
        client.type("what is 12*7")
        client.stdout.wait_for(lambda out: "The answer is 84" in out and out.endswith("\n"))
        client.type("/threads")
        listed = client.stdout.wait_for(lambda out: "*1. Hi, my name is Ada" in out)
        client.type("/history")
        client.stdout.wait_for(lambda out: "you: what is 12*7" in out)

        # /stop while an answer streams.
        client.type("How should I structure a small side project?")
        client.stdout.wait_for(lambda out: "structure a small side project. " in out)
        client.type("/stop")
        client.stdout.wait_for(lambda out: "[stopped]\n" in out)

        client.type("/new")
        client.type("search for Redis Streams")
        client.stdout.wait_for(lambda out: "Sources:" in out and out.endswith("\n"))
        client.type("/threads")
        client.stdout.wait_for(lambda out: "2. Hi, my name is Ada" in out)
        client.type("/use 2")
        client.type("/history")
        client.stdout.wait_for(lambda out: out.count("you: what is 12*7") == 2)
        client.type("/clear")
        client.type("/history")
        client.stdout.wait_for(lambda out: "[cleared]\n(no messages)\n" in out)
        client.type("/delete")
        client.type("/threads")
        client.stdout.wait_for(lambda out: "[deleted]\n 1. search for Redis Streams" in out)
        client.type("/exit")
        code = client.process.wait(timeout=20)
        output = client.stdout.text()

    assert code == 0
    assert '[tool: calculator {"expression": "12*7"}]' in output
    assert re.search(r"\*1\. Hi, my name is Ada  \[[0-9a-f]{32}\]", listed)
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {TOKEN}"}) as api:
        threads = api.get("/v1/threads").json()["threads"]
    assert [t["title"] for t in threads] == ["search for Redis Streams"]


def test_a_stop_typed_as_its_answer_ends_leaves_the_one_another_window_started(
    chat_servers: Callable[..., ChatServer],
) -> None:
    # Regression: /stop named only the thread, and stopped the answer the same user had
    # started in another window (a browser tab) just after the one the terminal showed.
    server = chat_servers(OFFLINE_TOKENS_PER_SECOND="40")
    headers = {"authorization": f"Bearer {TOKEN}"}
    with (
        cli(server.url, TOKEN) as client,
        httpx.Client(base_url=server.url, headers=headers, timeout=20) as other,
    ):
        client.type("Hi, my name is Ada")
        client.stdout.wait_for(lambda out: "What would you like to talk about?\n" in out)
        noted = client.stderr.wait_for(lambda err: re.search(r"\[thread \w+\]", err) is not None)
        thread_id = re.findall(r"\[thread (\w+)\]", noted)[0]
        started = post_message(
            other, "How should I structure a small side project?", thread_id=thread_id
        )
        _, head = read_sse(other, started["stream_url"], stop_after=lambda events: len(events) > 1)
        client.type("/stop")
        client.stdout.wait_for(lambda out: "(nothing to stop)\n" in out)
        _, rest = read_sse(other, started["stream_url"], last_event_id=head[-1].id)

    assert terminal(rest) == {"type": "end"}


@pytest.mark.redis
@pytest.mark.postgres
def test_an_answer_resumes_across_a_server_restart(
    chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    # The answer is written by a worker, so it goes on while the API server is down.
    env = {**redis_postgres_env(request), "WORKER_MODE": "1", "OFFLINE_TOKENS_PER_SECOND": "25"}
    api = chat_servers(**env)
    chat_servers("worker", **env)
    with cli(api.url, TOKEN, "--reconnect-for", "30") as client:
        client.type("How should I design a reliable queue?")
        client.stdout.wait_for(lambda out: len(out) > len("assistant> ") + 40)
        api.kill()
        client.stderr.wait_for(lambda err: "[connection lost, resuming...]" in err)
        api.start()
        client.stderr.wait_for(lambda err: "[resumed]" in err)
        output = client.stdout.wait_for(lambda out: out.count("\n") >= 1, timeout=30)
        assert client.close() == 0
        thread_id = re.search(r"\[thread ([0-9a-f]{32})\]", client.stderr.text())
    assert thread_id is not None

    with httpx.Client(base_url=api.url, headers={"authorization": f"Bearer {TOKEN}"}) as http:
        thread = eventually(lambda: settled(http, thread_id[1]), what="the answer saved")
    printed = output.removeprefix("assistant> ").rstrip("\n")
    assert printed == final_answer(thread)  # all of it, nothing twice


def test_a_thread_it_cannot_open_ends_the_client_with_a_message(
    chat_servers: Callable[..., ChatServer],
) -> None:
    # Regression: --thread with an unknown thread, or a server down for all of
    # --reconnect-for, ended the client with a traceback.
    server = chat_servers()
    with cli(server.url, TOKEN, "--thread", "nope") as client:
        assert client.process.wait(timeout=20) == 1
        client.stderr.wait_for(lambda err: "[error: no thread 'nope']" in err)
        assert "Traceback" not in client.stderr.text()
    # Regression: the id went into the URL unquoted ("#x" a fragment: thread 'nope' asked).
    with cli(server.url, TOKEN, "--thread", "nope#x") as client:
        assert client.process.wait(timeout=20) == 1
        client.stderr.wait_for(lambda err: "[error: no thread 'nope#x']" in err)

    down = f"http://127.0.0.1:{free_port()}"
    with cli(down, TOKEN, "--thread", "nope", "--reconnect-for", "0.5") as client:
        assert client.process.wait(timeout=20) == 1
        client.stderr.wait_for(lambda err: "[error: the server is unreachable]" in err)
        assert "Traceback" not in client.stderr.text()


def test_ctrl_c_ends_the_answer_line_and_exits_130(
    chat_servers: Callable[..., ChatServer],
) -> None:
    # Regression: Ctrl-C exited with code 0, as if all went well, and left the answer's
    # last line without its newline (the shell prompt came after the half answer).
    server = chat_servers(OFFLINE_TOKENS_PER_SECOND="20")
    # PYTHONFAULTHANDLER: a client that does not exit is sent SIGABRT, and prints where
    # each of its threads was (seen once in CI, under load: the client kept running).
    with cli(server.url, TOKEN, env={"PYTHONFAULTHANDLER": "1"}) as client:
        client.type("How should I structure a small side project?")
        client.stdout.wait_for(lambda out: len(out) > len("assistant> ") + 20)
        client.process.send_signal(signal.SIGINT)
        try:
            code = client.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            client.process.send_signal(signal.SIGABRT)
            client.process.wait(timeout=20)
            client.stderr.join()
            pytest.fail(
                "the client did not exit within 20 s of Ctrl-C\n"
                f"--- stdout ---\n{client.stdout.text()}\n--- stderr ---\n{client.stderr.text()}"
            )
        client.stdout.join()
        client.stderr.join()
        output, errors = client.stdout.text(), client.stderr.text()
    assert code == 130
    assert output.startswith("assistant> ") and output.endswith("\n")
    assert "Traceback" not in errors


async def test_ctrl_c_just_as_an_answer_ends_is_not_lost(
    chat_servers: Callable[..., ChatServer], capsys: pytest.CaptureFixture[str]
) -> None:
    # Regression: a Ctrl-C that came as an answer ended, while the client put away its
    # wait for a line typed meanwhile, was taken for that wait's own cancellation: the
    # client went on waiting for the next line instead of exiting.
    server = chat_servers()

    class Lines(asyncio.Queue[str | None]):
        async def get(self) -> str | None:
            try:
                return await super().get()
            except asyncio.CancelledError:
                # The answer ended: Ctrl-C now, as asyncio.run's SIGINT handler does it.
                looping.cancel()
                raise

    lines = Lines()
    lines.put_nowait("hello")
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
        looping = asyncio.create_task(_loop(ChatClient(http, model=None, reconnect_for=5), lines))
        done, _ = await asyncio.wait({looping}, timeout=10)
        looping.cancel()
    assert done, "Ctrl-C was lost: the client waits for the next line"
    assert looping.cancelled()
    assert capsys.readouterr().out.startswith("assistant> ")


def test_an_error_page_that_is_not_json_is_an_error_line() -> None:
    # Regression: a proxy's HTML 502 (or a --url that is not the service) ended the client
    # with a JSONDecodeError traceback.
    page = HTMLResponse("<html><body><h1>502 Bad Gateway</h1></body></html>", status_code=502)
    with uvicorn_server(page, lifespan="off") as url, cli(url, TOKEN) as client:
        client.type("hello")
        client.stderr.wait_for(lambda err: "[error: 502 Bad Gateway]" in err)
        client.type("/threads")
        client.stderr.wait_for(lambda err: err.count("[error: 502 Bad Gateway]") == 2)
        # Piped input is a script's: it goes on with the next line, and the exit code says
        # that a command failed (it was 0, as if all went well).
        assert client.close() == 1
        assert "Traceback" not in client.stderr.text()


class FakeService:
    """A stand-in for the service, for what the offline model never does (text before a
    tool call) and for a server that dies as it accepts a message."""

    def __init__(
        self,
        *,
        die_after_first_post: bool = False,
        events: list[tuple[str, dict[str, Any]]] | None = None,
        title: str = "a thread",
    ) -> None:
        self.die_after_first_post = die_after_first_post
        self.events = events
        self.title = title
        self.posts = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if scope["method"] == "POST" and scope["path"] == "/v1/chat/message":
            self.posts += 1
            if self.die_after_first_post and self.posts == 1:
                # The message was taken; the server goes away before the response ends.
                headers = [(b"content-type", b"application/json"), (b"content-length", b"200")]
                await send({"type": "http.response.start", "status": 202, "headers": headers})
                await send(
                    {"type": "http.response.body", "body": b'{"thread_id"', "more_body": True}
                )
                raise ConnectionAbortedError("the server died")
            started = {"thread_id": "t" * 32, "run": self.posts, "stream_url": "/stream"}
            await self._send(send, "application/json", json.dumps(started), 202)
        elif scope["path"] == "/v1/threads":
            threads = [{"thread_id": "t" * 32, "title": self.title}]
            await self._send(send, "application/json", json.dumps({"threads": threads}))
        elif scope["path"] == "/stream":
            events = self.events or [
                ("system", {"type": "start", "run": 1, "model": "fake", "cached": False}),
                ("chunk", {"text": "Let me calculate that."}),
                ("system", {"type": "message_ended", "message_id": "ai-1"}),
                (
                    "tool_call",
                    {"id": "call-1", "name": "calculator", "args": {"expression": "12*7"}},
                ),
                ("chunk", {"text": "The answer is 84."}),
                ("system", {"type": "message_ended", "message_id": "ai-2"}),
                ("system", {"type": "end"}),
            ]
            body = "".join(
                f"id: 1-{n}-0\nevent: {name}\ndata: {json.dumps(data)}\n\n"
                for n, (name, data) in enumerate(events, 1)
            )
            await self._send(send, "text/event-stream", body)
        else:
            await self._send(send, "application/json", '{"code": "not_found"}', 404)

    @staticmethod
    async def _send(send: Any, content_type: str, body: str, status: int = 200) -> None:
        headers = [(b"content-type", content_type.encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})


def test_text_before_a_tool_call_ends_its_line() -> None:
    # Regression: the client ignored message_ended, so the text a model writes before it
    # calls a tool ran into the [tool: ...] line.
    with uvicorn_server(FakeService(), lifespan="off") as url, cli(url, TOKEN) as client:
        client.type("what is 12*7")
        output = client.stdout.wait_for(lambda out: "The answer is 84.\n" in out)
        assert client.close() == 0
    assert output == (
        "assistant> Let me calculate that.\n"
        '[tool: calculator {"expression": "12*7"}]\n'
        "The answer is 84.\n"
    )


def test_control_characters_from_the_server_never_reach_the_terminal() -> None:
    # Regression: the client printed what the server sent as it came, escape sequences
    # included: a model's answer (prompt injection can make it write anything), a tool's
    # name, an error message or a thread's title could clear the screen, hide text, retitle
    # the window, make links or write the user's clipboard (OSC 52).
    events = [
        ("system", {"type": "start", "run": 1, "model": "fake", "cached": False}),
        ("chunk", {"text": "Safe\x1b[2J\x1b[H text"}),
        # An escape sequence split across chunks, as a model's tokens split it.
        ("chunk", {"text": " and \x1b]52;c;"}),
        ("chunk", {"text": "cm0gLXJmIH4=\x07 more\r\n"}),
        (
            "chunk",
            {"text": "\x1b]8;;https://evil.example/\x1b\\link\x1b]8;;\x1b\\ \x9b31m\x08\x7f"},
        ),
        ("system", {"type": "message_ended", "message_id": "ai-1"}),
        ("tool_call", {"id": "call-1", "name": "calc\x1b[8m", "args": {"x": "\x1b[8m"}}),
        ("system", {"type": "error", "message": "failed\x1b]0;owned\x07 here"}),
    ]
    service = FakeService(events=events, title="title\x1b[31m\x1b]0;owned\x07 red")
    with uvicorn_server(service, lifespan="off") as url, cli(url, TOKEN) as client:
        client.type("hello")
        client.stderr.wait_for(lambda err: "[error: " in err)
        client.type("/threads")
        client.stdout.wait_for(lambda out: "title" in out)
        assert client.close() == 1  # the answer failed
        output, errors = client.stdout.text(), client.stderr.text()
    for text in (output, errors):
        assert re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", text) is None, repr(text)
    assert output == (
        "assistant> Safe[2J[H text and ]52;c;cm0gLXJmIH4= more\n"
        "]8;;https://evil.example/\\link]8;;\\ 31m\n"
        '[tool: calc[8m {"x": "\\u001b[8m"}]\n'
        "*1. title[31m]0;owned red  [" + "t" * 32 + "]\n"
    )
    assert "[error: failed]0;owned here]" in errors


def test_bidirectional_overrides_from_the_server_never_reach_the_terminal() -> None:
    # Regression: a right-to-left override or isolate (U+202E, U+2067...) reached the
    # terminal, which shows the text after it reversed where it lays out right-to-left
    # text: "rm -rf ~" can read as something else. The marks Arabic and Hebrew text needs
    # (U+200F, U+200E, U+061C) are kept.
    events = [
        ("system", {"type": "start", "run": 1, "model": "fake", "cached": False}),
        ("chunk", {"text": "run \u202e~ fr- mr\u202c now"}),
        ("chunk", {"text": " \u2067isolated\u2069 \u202a\u202b\u202d\u2066\u2068"}),
        ("chunk", {"text": " \u05e9\u05dc\u05d5\u05dd\u200f \u200e\u061c."}),
        ("system", {"type": "message_ended", "message_id": "ai-1"}),
        ("system", {"type": "end"}),
    ]
    service = FakeService(events=events, title="ti\u202etle")
    with uvicorn_server(service, lifespan="off") as url, cli(url, TOKEN) as client:
        client.type("hello")
        client.stdout.wait_for(lambda out: "\u061c.\n" in out)
        client.type("/threads")
        client.stdout.wait_for(lambda out: "t" * 32 in out)  # (the thread's id)
        assert client.close() == 0
        output = client.stdout.text()
    assert re.search("[\u202a-\u202e\u2066-\u2069]", output) is None, repr(output)
    assert output.startswith(
        "assistant> run ~ fr- mr now isolated  \u05e9\u05dc\u05d5\u05dd\u200f \u200e\u061c.\n"
    ), repr(output)
    assert "*1. title  [" in output


def test_a_message_the_server_took_is_not_sent_again() -> None:
    # Regression: the client sent POST /v1/chat/message again after any transport error,
    # even one after the request had gone out: a server that took the message and died
    # before it answered (or a dropped response) got the message twice.
    service = FakeService(die_after_first_post=True)
    with uvicorn_server(service, lifespan="off") as url, cli(url, TOKEN) as client:
        client.type("hello")
        client.stderr.wait_for(lambda err: "[error: " in err or "[thread " in err)
        assert client.close() == 1  # a message that may not have gone fails a script
        error = client.stderr.text()
    assert service.posts == 1
    assert "may have arrived" in error
    assert "Traceback" not in error


def test_a_terminal_that_is_not_utf8_gets_the_answer_and_keeps_going(
    chat_servers: Callable[..., ChatServer],
) -> None:
    # Regression: in a Latin-1 terminal (or a pipe on a legacy code page) the first character
    # of an answer it cannot show (the “ ” the search quotes with) ended the client with a
    # UnicodeEncodeError traceback; a line of bytes the terminal's encoding does not decode
    # ended it with a traceback too (UTF-8 locales other than C.UTF-8 hung: the thread
    # reading stdin died, and the client waited for it for ever).
    server = chat_servers()
    with cli(server.url, TOKEN, env={"PYTHONIOENCODING": "latin-1"}) as client:
        client.type("search for Redis Streams")
        client.stdout.wait_for(lambda out: "Sources:" in out and out.endswith("\n"))
        client.type("/history")
        client.stdout.wait_for(lambda out: "you: search for Redis Streams" in out)
        assert client.close() == 0
        output, errors = client.stdout.text(), client.stderr.text()
    assert "According to ?" in output  # what it cannot show is a ?
    assert "Traceback" not in errors

    for encoding in ("utf-8", "utf-8:strict"):
        with cli(server.url, TOKEN, env={"PYTHONIOENCODING": encoding}) as client:
            assert client.process.stdin is not None
            client.process.stdin.write(b"caf\xe9 au lait\n")  # Latin-1, not UTF-8
            client.process.stdin.flush()
            client.stdout.wait_for(lambda out: out.endswith("\n") and "assistant> " in out)
            client.type("/history")
            client.stdout.wait_for(lambda out: "you: caf\ufffd au lait" in out)
            assert client.close() == 0
            assert "Traceback" not in client.stderr.text()


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost:8000", "ftp://127.0.0.1"])
def test_a_url_that_is_not_http_is_refused_with_a_message(url: str) -> None:
    # Regression: --url without http:// was taken; a message then failed with "the connection
    # broke after the message was sent: it may have arrived", a command after retrying for
    # --reconnect-for with "the server is unreachable".
    with cli(url, TOKEN) as client:
        assert client.close() == 2  # before it reads a line
        client.stderr.join()
        errors = client.stderr.text()
    assert "http://" in errors
    assert "may have arrived" not in errors
    assert "Traceback" not in errors


def test_the_client_starts_without_the_agent_layer() -> None:
    # The client only speaks HTTP: importing LangChain and LangGraph made it take over a
    # second to start, a window in which Ctrl-C printed a traceback.
    probe = (
        "import sys, chat_service.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith(('langchain', 'langgraph'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=CHAT_DIR,
        env={**os.environ, "PYTHONPATH": str(CHAT_DIR)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "[]"
