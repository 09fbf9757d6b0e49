"""Terminal client: chat with the service, with answers that survive dropped connections.

    python -m chat_service.cli [--url http://127.0.0.1:8000] [--token TOKEN] [--thread ID]

``--url`` (or ``$CHAT_URL``) is the service's ``http://`` or ``https://`` URL.

Type a message to send it. Commands: /new, /threads, /use N, /history, /clear, /delete,
/stop (while an answer streams), /help, /exit. Answers print on stdout as they stream;
notices (reconnecting, errors) go to stderr. With input from a pipe (a script), a command
that fails, or an answer that fails or is lost, does not stop the lines after it, but the
client then exits with code 1; Ctrl-C quits with code 130.
What it prints comes from the server (a model's answer can be anything): control
characters other than newline and tab are dropped, so escape sequences cannot drive the
terminal, and so are bidirectional overrides, so text cannot show in another order than
it is.

The client identifies itself with a bearer token (``--token``, ``$CHAT_TOKEN``, else one made
once and kept in ``~/.config/resumable-chat/token``). When the connection drops, or the server
restarts, it reconnects to the answer's stream with ``Last-Event-ID`` and goes on from the
next event, so nothing is printed twice. A message is sent again only if it cannot have
reached the server (no connection); if the connection breaks after it went out, the client
says so rather than risk sending it twice.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import secrets
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import aconnect_sse

TOKEN_FILE = Path.home() / ".config" / "resumable-chat" / "token"
HELP = """commands:
  /new          start a new thread          /threads   list your threads
  /use N        switch to thread N of /threads
  /history      show this thread            /clear     empty this thread
  /delete       delete this thread          /stop      stop the answer in flight
  /exit         quit (also Ctrl-D)"""


def _token(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("CHAT_TOKEN"):
        return os.environ["CHAT_TOKEN"]
    if TOKEN_FILE.exists():
        return TOKEN_FILE.read_text().strip()
    TOKEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    TOKEN_FILE.write_text(token)
    TOKEN_FILE.chmod(0o600)
    return token


#: Control characters but newline and tab (C0, DEL, C1), and the bidirectional embeddings,
#: overrides and isolates (U+202A-U+202E, U+2066-U+2069). What the client prints comes from
#: the server: a model's answer (which prompt injection can make anything), tool calls,
#: titles, error messages. Printed raw, escape sequences in them would drive the user's
#: terminal: clear or hide text, retitle the window, make links, write the clipboard (OSC 52);
#: and in a terminal that lays out right-to-left text, an override shows characters in
#: another order than they are (a command to copy that is not the one shown). The marks
#: right-to-left text needs (U+200E, U+200F, U+061C) are kept.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` without control characters other than newline and tab, nor bidirectional
    overrides. Each one goes on its own, so a sequence split across chunks is as harmless
    as a whole one."""
    return _CONTROL.sub("", text)


def out(text: str) -> None:
    sys.stdout.write(printable(text))
    sys.stdout.flush()


def note(text: str) -> None:
    sys.stderr.write(printable(text) + "\n")
    sys.stderr.flush()


class ApiError(Exception):
    pass


#: Transport errors raised before a request went out: retrying cannot send it twice.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _error_message(response: httpx.Response) -> str:
    """The message of an error response: the service's JSON ``message``, else the status
    (a proxy's HTML error page, or a --url that is not the service)."""
    try:
        data = response.json()
    except ValueError:
        data = None
    message = data.get("message") if isinstance(data, dict) else None
    return str(message or f"{response.status_code} {response.reason_phrase}")


class ChatClient:
    def __init__(
        self, client: httpx.AsyncClient, *, model: str | None, reconnect_for: float
    ) -> None:
        self.http = client
        self.model = model
        self.reconnect_for = reconnect_for
        self.thread_id: str | None = None
        self.shown_run: str | None = None  # the number of the answer printed last (/stop)
        self.listed: list[str] = []
        self.midline = False  # an answer's text was printed with no newline after it
        self.failed = False  # a command failed, or an answer failed or was lost

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        once: bool = False,
        params: dict[str, str | None] | None = None,
    ) -> Any:
        """One API call, retried while the server is unreachable (it may be restarting).
        ``once``: a call that must not be made twice is retried only while it cannot have
        reached the server (no connection)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_for
        delay = 0.2
        while True:
            try:
                response = await self.http.request(method, path, json=body, params=params)
            except httpx.TransportError as exc:
                if once and not isinstance(exc, NOT_SENT):
                    # Sent, then the connection broke: the server may have taken it.
                    raise ApiError(
                        "the connection broke after the message was sent: it may have "
                        "arrived (/threads, /history)"
                    ) from None
                if loop.time() > deadline:
                    raise ApiError("the server is unreachable") from None
                await asyncio.sleep(delay)  # backoff while the server is down
                delay = min(delay * 2, 2.0)
                continue
            if response.status_code == 204:
                return None
            if response.is_error:
                raise ApiError(_error_message(response))
            try:
                return response.json() if response.content else {}
            except ValueError:
                raise ApiError(f"{path} did not answer JSON: is --url the chat service?") from None

    # -- commands ------------------------------------------------------------------------

    async def send(self, text: str) -> None:
        body: dict[str, Any] = {"message": text}
        if self.thread_id:
            body["thread_id"] = self.thread_id
        if self.model:
            body["model"] = self.model
        started = await self.call("POST", "/v1/chat/message", body, once=True)
        if self.thread_id != started["thread_id"]:
            self.thread_id = started["thread_id"]
            note(f"[thread {self.thread_id}]")
        await self.answer(started["stream_url"])

    async def answer(self, url: str) -> None:
        """Print an answer; one that fails, or is lost, fails the command."""
        if await self.stream(url) in ("error", "lost"):
            self.failed = True

    async def stream(self, url: str) -> str:
        """Print an answer as it streams; resume after ``Last-Event-ID`` when the connection
        drops. Returns how the answer ended: end, stopped, error or lost."""
        loop = asyncio.get_running_loop()
        self.shown_run = httpx.URL(url).params.get("run")
        last_id: str | None = None
        outage_since: float | None = None
        delay = 0.2
        self._write("assistant> ")
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                async with aconnect_sse(self.http, "GET", url, headers=headers) as source:
                    status = source.response.status_code
                    if status == 204:
                        self._end_line()
                        note("[this answer is no longer available]")
                        return "lost"
                    if status >= 500:
                        raise httpx.TransportError(f"server answered {status}")
                    if status >= 400:
                        await source.response.aread()
                        self._end_line()
                        note(f"[error: {_error_message(source.response)}]")
                        return "error"
                    if outage_since is not None:
                        note("[resumed]")
                        outage_since, delay = None, 0.2
                    async for event in source.aiter_sse():
                        if event.id:
                            last_id = event.id
                        ended = self._show(event.event, json.loads(event.data or "{}"))
                        if ended is not None:
                            return ended
            except httpx.TransportError:
                pass
            # Dropped, or the server went away: resume from the last event we printed.
            now = loop.time()
            if outage_since is None:
                outage_since = now
                note("\n[connection lost, resuming...]")
            elif now - outage_since > self.reconnect_for:
                self._end_line()
                note("[gave up: the server did not come back]")
                return "lost"
            await asyncio.sleep(delay)  # backoff between reconnection attempts
            delay = min(delay * 2, 2.0)

    def _show(self, kind: str, data: dict[str, Any]) -> str | None:
        if kind == "chunk":
            self._write(data.get("text", ""))
        elif kind == "tool_call":
            self._write(f"[tool: {data.get('name')} {json.dumps(data.get('args', {}))}]\n")
        elif kind == "system":
            if data.get("type") == "message_ended":
                self._end_line()  # the model's next message (a tool call) starts a line
            if data.get("type") == "end":
                stopped = data.get("reason") == "stopped"
                self._end_line()
                if stopped:
                    out("[stopped]\n")
                return "stopped" if stopped else "end"
            if data.get("type") == "error":
                self._end_line()
                note(f"[error: {data.get('message')}]")
                return "error"
        return None

    def _write(self, text: str) -> None:
        text = printable(text)
        if text:
            out(text)
            self.midline = not text.endswith("\n")

    def _end_line(self) -> None:
        if self.midline:
            out("\n")
            self.midline = False

    async def threads(self) -> None:
        data = await self.call("GET", "/v1/threads")
        self.listed = [t["thread_id"] for t in data["threads"]]
        if not self.listed:
            out("(no threads)\n")
        for i, thread in enumerate(data["threads"], 1):
            mark = "*" if thread["thread_id"] == self.thread_id else " "
            out(f"{mark}{i}. {thread['title']}  [{thread['thread_id']}]\n")

    async def use(self, arg: str) -> None:
        if arg.isdigit() and 0 < int(arg) <= len(self.listed):
            arg = self.listed[int(arg) - 1]
        thread = await self.call("GET", "/v1/thread", params={"thread_id": arg})
        self.thread_id, self.shown_run = thread["thread_id"], None
        out(f"[thread {thread['title']}]\n")
        if thread["active_run"]:
            await self.answer(thread["active_run"]["stream_url"])

    async def history(self) -> None:
        if not self.thread_id:
            out("(new thread: no messages yet)\n")
            return
        thread = await self.call("GET", "/v1/thread", params={"thread_id": self.thread_id})
        if not thread["messages"]:
            out("(no messages)\n")
        for message in thread["messages"]:
            if message["role"] == "user":
                out(f"you: {message['text']}\n")
            elif message["role"] == "assistant":
                for call in message["tool_calls"]:
                    out(f"[tool: {call['name']} {json.dumps(call['args'])}]\n")
                if message["text"]:
                    out(f"assistant: {message['text']}\n")
            elif message["role"] == "summary":
                out(f"(summary) {message['text']}\n")

    async def command(self, line: str) -> bool:
        """Run one input line; False to quit."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            out(HELP + "\n")
        elif name == "/new":
            self.thread_id = self.shown_run = None
            out("[new thread]\n")
        elif name == "/threads":
            await self.threads()
        elif name == "/use":
            await self.use(arg.strip())
        elif name == "/history":
            await self.history()
        elif name in ("/clear", "/delete", "/stop") and not self.thread_id:
            out("(no thread yet)\n")
        elif name == "/clear" and self.thread_id:
            await self.call("PUT", f"/threads/{quote(self.thread_id, safe='')}/clear")
            out("[cleared]\n")
        elif name == "/delete":
            await self.call("DELETE", "/v1/thread", params={"thread_id": self.thread_id})
            self.thread_id = self.shown_run = None
            out("[deleted]\n")
        elif name == "/stop":
            # The answer printed last, by its number: a /stop typed as it ends must not stop
            # one another window started just after (nor one queued behind it).
            params = {"thread_id": self.thread_id}
            if self.shown_run:
                params["run"] = self.shown_run
            stopped = await self.call("POST", "/v1/chat/stop", params=params)
            if not stopped["stopped"]:
                out("(nothing to stop)\n")
        elif name.startswith("/"):
            out(f"unknown command {name}; /help lists them\n")
        else:
            await self.send(line)
        return True


def _read_lines(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None]) -> None:
    """Feed stdin lines to the loop from a thread (stdin may be a pipe or a terminal)."""
    for line in sys.stdin:
        loop.call_soon_threadsafe(lines.put_nowait, line.rstrip("\n"))
    loop.call_soon_threadsafe(lines.put_nowait, None)


async def run(args: argparse.Namespace) -> int:
    """The client's exit code: 1 if a command failed with piped input (a script's), else 0."""
    headers = {"Authorization": f"Bearer {_token(args.token)}"}
    timeout = httpx.Timeout(10.0, read=None)  # an answer may be quiet for a while
    # An idle connection is closed well before servers close theirs (uvicorn after 5 s,
    # as httpx by default; gunicorn after 2): a command sent as the server closed it would
    # fail ("Server disconnected without sending a response").
    limits = httpx.Limits(keepalive_expiry=1.0)
    async with httpx.AsyncClient(
        base_url=args.url, headers=headers, timeout=timeout, limits=limits
    ) as http:
        chat = ChatClient(http, model=args.model, reconnect_for=args.reconnect_for)
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        threading.Thread(target=_read_lines, args=(loop, lines), daemon=True).start()
        if args.thread:
            try:
                await chat.use(args.thread)
            except ApiError as exc:
                # Chatting on would start a new thread the user did not ask for.
                raise SystemExit(f"[error: {exc}]") from None
        if sys.stdin.isatty():
            out(f"Connected to {args.url}. /help for commands.\n")
        try:
            await _loop(chat, lines)
            return 1 if chat.failed and not sys.stdin.isatty() else 0
        except asyncio.CancelledError:
            # Ctrl-C: nothing more is printed, and the shell's prompt starts a line of its own.
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            chat._end_line()
            raise


async def _loop(chat: ChatClient, lines: asyncio.Queue[str | None]) -> None:
    """Run the input lines as commands until /exit or the end of the input."""
    held: list[str | None] = []
    end_of_input = False
    while True:
        line = held.pop(0) if held else await lines.get()
        if line is None:
            return
        line = line.strip()
        if not line:
            continue
        work = asyncio.create_task(_guarded(chat, chat.command(line)))
        # While a command runs (an answer streams), /stop acts at once; other lines
        # (and the end of the input) wait for their turn.
        while not work.done():
            if end_of_input:
                await work
                break
            reader = asyncio.create_task(lines.get())
            await asyncio.wait({work, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                reader.cancel()
                # Not `await reader`: that raises the reader's CancelledError, and one
                # meant for this task (Ctrl-C, just as the command ended) would be taken
                # for it and lost, leaving the client waiting for the next line.
                await asyncio.wait({reader})
                continue
            extra = reader.result()
            end_of_input = extra is None
            if extra is not None and extra.strip() == "/stop":
                await _guarded(chat, chat.command("/stop"))
            else:
                held.append(extra)
        if not work.result():
            return


async def _guarded(chat: ChatClient, command: Any) -> bool:
    try:
        return bool(await command)
    except ApiError as exc:
        note(f"[error: {exc}]")
        chat.failed = True
        return True


def _tolerant_stdio() -> None:
    """A terminal or pipe whose encoding is not UTF-8 must not end the client: a character
    it cannot show prints as ``?``, input bytes it cannot decode arrive as U+FFFD."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chat_service.cli", description=__doc__)
    parser.add_argument("--url", default=os.environ.get("CHAT_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", help="bearer token (default: $CHAT_TOKEN or a saved one)")
    parser.add_argument("--thread", help="continue this thread (and its answer in flight)")
    parser.add_argument("--model", help="model spec for your messages (see GET /info)")
    parser.add_argument(
        "--reconnect-for",
        type=float,
        default=120.0,
        help="seconds to keep trying while the server is unreachable",
    )
    args = parser.parse_args(argv)
    try:
        url = httpx.URL(args.url)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        # httpx would take it and fail each request with an error that blames the network.
        parser.error(f"--url {args.url!r}: give the service's http:// or https:// URL")
    _tolerant_stdio()
    try:
        code = asyncio.run(run(args))
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # 128 + SIGINT, as shells report it
    raise SystemExit(code)


if __name__ == "__main__":
    main()
