"""Serve the Vercel AI SDK's ``useChat`` (with ``resume: true``): the UI message stream protocol.

```python
from resumable_stream.ai_sdk import ChatRequest, ChatRouter

async def answer(chat: ChatRequest):
    return graph.astream_events({"messages": [("user", chat.text)]}, version="v2")

# authorize(request, chat_id, action) -> bool: may this caller use this chat?
chat = ChatRouter(transport, answer, path="/api/chat", authorize=may_use_chat)
app.router.routes.extend(chat.routes)
```

``POST /api/chat`` starts a run keyed by the chat id and answers it as a UI message stream;
``GET /api/chat/{id}/stream`` replays the answer in progress from its start and follows it
(204 when none is); ``POST /api/chat/{id}/stop`` stops it. The encoder,
:class:`UIMessageChunks`, and :class:`UIMessageStreamResponse` work in any route too. Needs
the ``web`` extra; see docs/ai-sdk.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Hashable,
    Mapping,
)
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

try:
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute
    from starlette.types import Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "resumable_stream.ai_sdk needs Starlette: pip install 'resumable-llm-stream[web]'"
    ) from exc

from ._asgi import ConnectionLimit, ServerClosed
from ._codec import parse_offset
from ._constants import DEFAULT_MAX_BODY_BYTES, DEFAULT_PING_INTERVAL, DEFAULT_SEND_TIMEOUT
from ._consumer import StreamConsumer, settled_info
from ._events import (
    CANCELLED,
    CUSTOM,
    END,
    ERROR,
    MESSAGE,
    TOKEN,
    TOOL_END,
    TOOL_START,
    UPDATE,
    Event,
)
from ._exceptions import ConfigurationError, ResumableStreamError, StreamAlreadyRunning
from ._http import (
    EVENT_STREAM_TYPE,
    JSON_TYPE,
    HTTPError,
    WireFormat,
    error_for,
    http_status_error,
    loads_json,
    not_running,
)
from ._ids import check_stream_id
from ._producer import Run, StreamProducer
from ._sse import PING
from .starlette import StreamResponse, _check_body_limit, _JsonRoute, _JsonRouting, _read_json_body
from .transports import Transport

logger = logging.getLogger("resumable_stream.http")

__all__ = [
    "ChatAction",
    "ChatRequest",
    "ChatRouter",
    "ErrorPart",
    "ErrorText",
    "MessageMetadata",
    "MessageMetadataPart",
    "TokenUsage",
    "UIMessageChunks",
    "UIMessageStreamResponse",
    "UI_MESSAGE_STREAM_HEADERS",
    "default_error_text",
    "ui_message_text",
]

#: The header of a UI message stream (ai: ``src/ui-message-stream/ui-message-stream-headers.ts``).
UI_MESSAGE_STREAM_HEADERS: Mapping[str, str] = {"x-vercel-ai-ui-message-stream": "v1"}
# @ai-sdk/provider-utils parseJsonEventStream skips it; AI SDK servers end with it.
_DONE = b"data: [DONE]\n\n"
# ("AIMessage": the role earlier versions stored for a message chunk.)
_AI_ROLES = frozenset({"ai", "AIMessage", "assistant"})
_DATA_NAME = re.compile(r"[^A-Za-z0-9_.:-]+")
#: Names of the ``custom`` events the library writes itself (StreamProducer.reserve).
_LIFECYCLE_PREFIX = "resumable_stream."
#: The ``custom`` event a continuation's run begins with (ChatRouter): ``{"message_id"}``,
#: the assistant message it continues, which the ``start`` of every replay then names.
_MESSAGE_ID_EVENT = "resumable_stream.ui_message_id"
#: The error part of an answer cancelled by its server's shutdown.
_SHUTDOWN_TEXT = (
    "the answer was cut short: the server shut down before it finished; send the message again"
)
#: The error part of a response its server closed (a deploy): its run may go on elsewhere.
_SERVER_CLOSED_TEXT = (
    "the server closed this connection before the answer ended (a restart or a deploy); "
    "resume to read the rest"
)
#: The error part of an answer whose run was stopped in its process, not asked to stop.
_STOPPED_TEXT = (
    "the answer was cut short: its run was stopped before it finished; send the message again"
)

#: The error of a tool call the model was still streaming when the answer failed or stopped.
_UNFINISHED_CALL_TEXT = "the answer ended before this call was complete"
#: The error of a call whose tool the server was running when the answer failed or stopped.
_UNFINISHED_RUN_TEXT = "the answer ended before this tool finished"
#: The error of a tool call the model streamed whose arguments are not JSON.
_INVALID_ARGS_TEXT = "the model's arguments for this call are not valid JSON"


#: The ``finishReason`` of a ``finish`` part (ai: ``FinishReason``) for the reasons
#: providers give (lower-cased): OpenAI, Mistral, Gemini, Anthropic, Bedrock, Ollama, the
#: Responses API. Any other is ``other``, as the AI SDK's own providers map them.
_FINISH_REASONS: Mapping[str, str] = {
    "stop": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "max_tokens": "length",
    "model_length": "length",
    "max_output_tokens": "length",
    "tool_calls": "tool-calls",
    "function_call": "tool-calls",
    "tool_use": "tool-calls",
    "content_filter": "content-filter",
    "content_filtered": "content-filter",
    "guardrail_intervened": "content-filter",
    "refusal": "content-filter",
    "safety": "content-filter",
    "recitation": "content-filter",
    "blocklist": "content-filter",
    "prohibited_content": "content-filter",
    "spii": "content-filter",
    "error": "error",
}


def _finish_reason(raw: Any, called_tools: bool) -> str | None:
    """The ``finishReason`` for a provider's reason; ``stop`` with tool calls (Gemini's)
    is ``tool-calls``, as the AI SDK's own providers take it."""
    if not isinstance(raw, str) or not raw:
        return "tool-calls" if called_tools else None
    reason = _FINISH_REASONS.get(raw.lower(), "other")
    return "tool-calls" if reason == "stop" and called_tools else reason


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


@dataclass(slots=True)
class _ToolCall:
    name: str
    output_sent: bool = False


@dataclass(slots=True)
class _DraftCall:
    """A tool call a model is streaming (``tool_call_chunks``): its id and name once a
    fragment gave them, the text of its arguments so far, how much of it was sent, and
    whether its model said why it stopped (its last chunk: its arguments are all there)."""

    call_id: str | None = None
    name: str | None = None
    args: str = ""
    sent: int = 0
    ended: bool = False

    def whole(self) -> bool:
        """True unless more of its arguments may come: their text is not JSON yet."""
        return self.ended or (bool(self.args.strip()) and _is_json(self.args))


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """The tokens of an answer's chat model calls, summed over its messages' LangChain
    ``usage_metadata`` (``total_tokens``: input and output when a model gives no total)."""

    input_tokens: int
    output_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class MessageMetadataPart:
    """What a ``message_metadata`` hook is given: the part the metadata goes on, ``start``
    or ``finish`` (the AI SDK's ``messageMetadata({ part })``). For ``finish``, the answer's
    ``finish_reason`` and ``usage`` (None when no message of it reported any). Both come from
    the stored events, so a resumed answer gets the same."""

    type: Literal["start", "finish"]
    #: The assistant message's id (the ``messageId`` of ``start``), if known.
    message_id: str | None
    finish_reason: str | None = None
    usage: TokenUsage | None = None


#: A hook giving an answer's message metadata (``message.metadata`` in ``useChat``): a
#: JSON-able dict sent on the part, or None for none.
MessageMetadata = Callable[[MessageMetadataPart], Mapping[str, Any] | None]


@dataclass(frozen=True, slots=True)
class ErrorPart:
    """What an ``error_text`` hook is given: an error the answer is about to show (the AI
    SDK's ``onError``). It comes from the stored events, so a resumed answer gets the same."""

    #: ``error``: the answer failed; ``tool-output-error``: a tool raised.
    type: Literal["error", "tool-output-error"]
    #: The error's name: the exception's class (``"RateLimitError"``), or the library's code
    #: for an error of its own (``"producer_lost"``); None for a tool's exception.
    error: str | None
    #: The message as stored: for an exception, its text, which may hold what only the
    #: server should see (a key, a host name, a query).
    message: str
    #: The tool that raised, for ``tool-output-error``.
    tool_name: str | None = None


#: A hook giving the ``errorText`` the client shows for an error.
ErrorText = Callable[[ErrorPart], str]

#: What ``default_error_text`` shows for an exception: the AI SDK's own default.
_MASKED_ERROR_TEXT = "An error occurred."
#: Errors shown as they are: the library's own (their messages are its own words) and an
#: ``HTTPException`` (raised to answer the client, as ``HTTPException(402, ...)``).
_SHOWN_ERRORS = frozenset({"not_started", "producer_lost", "storage_rollback", "HTTPException"})


def default_error_text(part: ErrorPart) -> str:
    """The ``errorText`` of an error when no ``error_text`` hook is given: as the AI SDK's
    servers do by default, "An error occurred." for an exception of the source or of a
    tool (its message may hold what only the server should see; the stored event keeps
    it, and the producer logs it); an ``HTTPException`` and the library's own errors (a
    lost producer, a storage rollback) keep their message."""
    if part.type == "error" and part.error in _SHOWN_ERRORS:
        return part.message
    return _MASKED_ERROR_TEXT


class UIMessageChunks:
    """Turns one stream's events into AI SDK UI message chunks, in an order the client accepts.

    The client (ai: ``ui/process-ui-message-stream.ts``) rejects a ``text-delta`` without its
    ``text-start`` and a tool output without its call, so this keeps the parts it opened:

    * ``token`` → its ``reasoning`` first, as ``reasoning-start`` (once per LangChain message
      id) and ``reasoning-delta``, ended by the text, a tool call or the message after it;
      ``text-start`` (once per LangChain message id), ``text-delta``; its
      ``tool_call_chunks`` (``messages`` mode) → ``tool-input-start``, ``tool-input-delta``,
      and ``tool-input-available`` once the call is whole (its output, its run or its
      message came, or the answer ended);
    * ``message`` → ``reasoning-end`` and ``text-end`` for its streamed reasoning and text,
      or its whole reasoning and text if they were not streamed; each tool call →
      ``tool-input-start`` and ``tool-input-available``; a tool message →
      ``tool-output-available`` (every tool output with ``providerExecuted``: the server
      ran it, and the client waits for its own tools only);
    * ``tool_start`` / ``tool_end`` → the call (unless the model's message announced it) and
      ``tool-output-available`` or ``tool-output-error``; a call ends the text parts before
      it, so the text after it is a new part;
    * ``custom`` → ``data-<name>`` (``data-custom`` without a name), except the library's
      own ``resumable_stream.*`` markers (a reserved run's, a continuation's), which are
      not sent;
    * ``update`` holding a graph's interrupt (node ``__interrupt__``'s, or a state's
      ``__interrupt__``) → ``data-interrupt`` per Interrupt (its ``id`` the Interrupt's, sent
      once), its ``data`` the Interrupt;
    * ``end`` / ``error`` / ``cancelled`` → ``finish`` (its ``finishReason`` why the model
      last stopped: the ``finish_reason`` of its last message or chunk, ``tool-calls`` for
      a message with tool calls that gives none, else ``stop``) / ``error`` / ``abort``,
      then ``[DONE]``
      (``error`` for a run cancelled by its server's shutdown: cut, not stopped); on
      ``error`` / ``cancelled``, a call still streaming ends with ``tool-input-error`` and a
      call whose tool the server started (``tool_start``) and never ended with
      ``tool-output-error`` (both ``providerExecuted``).

    ``start`` (with ``message_id``) and ``start-step`` come first when ``start`` is true, as a
    replay from the beginning needs: the client resets its message on it. Without
    ``message_id``, a stream whose first event is ``ChatRouter``'s continuation marker
    (``resumable_stream.ui_message_id``) names the message that marker gives. Such a
    continuation sends no ``start-step`` first: it goes on in the continued message's last
    step, where the calls its resumed tools answer are (the client looks a call up in the
    current step, else adds another part), until it sends anything but a server tool's
    part; a tool run that starts there without naming its call (a LangGraph tool resumed
    after ``interrupt()``) is announced when it ends, on the call its ToolMessage names (if
    it fails, on the continued message's call of its tool with its input, which the marker
    lists).
    Model output after a tool's output begins a new step (``finish-step``,
    ``start-step``), and ``end`` finishes the step, as the AI SDK's own servers send them:
    the client's ``lastAssistantMessageIsCompleteWithToolCalls`` looks at the last step
    only, and would otherwise send the answer of a client-side tool back forever. Other
    ``update`` events are not sent, but a tool message they hold answers its call if nothing
    did (a handoff: a tool's ``Command`` to the parent graph, which ``messages`` mode does
    not stream); a ``Command`` without its ToolMessage has its ``goto``, ``update`` and
    ``resume`` that are set as the tool's output.

    ``message_metadata(part)`` (:class:`MessageMetadataPart`), if given, is called for the
    ``start`` and the ``finish`` part; what it returns, unless None, is sent as the part's
    ``messageMetadata`` (``message.metadata`` in ``useChat``). ``usage`` sums the ``usage``
    of the AI messages this encoder read: all of the answer's on a replay from its start.

    ``error_text(part)`` (:class:`ErrorPart`) gives the ``errorText`` of an ``error`` and
    of a tool's exception (the AI SDK's ``onError``); by default
    (:func:`default_error_text`) an exception's message is not shown: "An error occurred.".
    """

    def __init__(
        self,
        message_id: str | None = None,
        *,
        start: bool = True,
        message_metadata: MessageMetadata | None = None,
        error_text: ErrorText | None = None,
    ) -> None:
        self.message_id = message_id
        self._need_start = start
        self._message_metadata = message_metadata
        self._error_text = error_text
        self._usage: tuple[int, int, int] | None = None  # input, output, total tokens
        self._open_text: dict[Any, str] = {}  # LangChain message id (or None) → text part id
        self._streamed: set[Any] = set()  # message ids whose text came as tokens
        # message id → the digest of its tokens' text, until a message claims it
        self._token_text: dict[Any, Any] = {}
        self._open_reasoning: dict[Any, str] = {}  # message id → reasoning part id
        # message id → the digest of its streamed reasoning, until a message claims it
        self._reasoned: dict[Any, Any] = {}
        self._parts = 0
        self._calls: dict[str, _ToolCall] = {}
        # tool name → the model's calls (id, args) that no tool run has claimed yet
        self._announced: dict[str, list[tuple[str, Any]]] = {}
        self._run_calls: dict[str, str] = {}  # tool run id → tool call id
        # tool run id → (tool name, input): the runs a continuation resumed (their call is
        # the continued message's), announced by their output, which names their call
        self._resumed: dict[str, tuple[str, Any]] = {}
        # The continued message's calls the browser answered (id, tool name, input): the
        # calls a resumed run can be, for one whose end does not name its call (an error).
        self._waiting: list[tuple[str, str, Any]] = []
        # In the continued message's last step (a continuation, until it sends anything but
        # the output of a tool its call there waited for): no `start-step` sent yet.
        self._continuing = False
        # (message key, index) → the call its tool_call_chunks stream; index → the latest
        self._drafts: dict[tuple[Hashable, Hashable], _DraftCall] = {}
        self._last_draft: dict[Hashable, _DraftCall] = {}
        self._streaming: dict[str, _DraftCall] = {}  # call id → its input still streaming
        self._tool_output_sent = False  # in this step: what the model says next is a new step
        self._interrupts_sent: set[str] = set()  # the ids of the Interrupts sent
        # Why the model last stopped (its last message's or last chunk's finish reason),
        # the answer's `finishReason` if it ends then; None: "stop".
        self._finish_reason: str | None = None
        self.finished = False

    def chunks(self, event: Event) -> list[dict[str, Any]]:
        """The chunks for ``event`` (none after the terminal one)."""
        if self.finished:
            return []
        out: list[dict[str, Any]] = []
        if self._need_start:
            # ai (src/ui/chat.ts): a resume is a replay (resumeStreamIsReplay); the client
            # resets its message at the first `start` and keeps its id, hence a stable one.
            self._need_start = False
            marked = _marked_message_id(event)
            if self.message_id is None:
                self.message_id = marked
            start: dict[str, Any] = {"type": "start"}
            if self.message_id is not None:
                start["messageId"] = self.message_id
            self._add_metadata(start, MessageMetadataPart("start", self.message_id))
            out.append(start)
            if marked is None:
                out.append({"type": "start-step"})
            else:
                # A continuation goes on in the last step of the message it continues,
                # where the calls a resumed tool answers are (`ai` looks a call up in the
                # current step): its own step begins with what is not such an output.
                self._continuing = True
                self._waiting = _marked_calls(event)
        kind, data = event.type, event.data
        if kind == TOKEN:
            self._token(data, out)
        elif kind == MESSAGE:
            self._message(data.get("message"), out)
        elif kind == TOOL_START:
            self._tool_start(data, out)
        elif kind == TOOL_END:
            self._tool_end(data, out)
        elif kind == UPDATE:
            self._update(data.get("data"), out)
            self._interrupts(data, out)
        elif kind == CUSTOM:
            name = data.get("name")
            if isinstance(name, str) and name.startswith(_LIFECYCLE_PREFIX):
                return out  # the library's own markers (a reserved run's), not app data
            suffix = _DATA_NAME.sub("-", name) if isinstance(name, str) and name else "custom"
            self._own_step(out)
            out.append({"type": f"data-{suffix}", "data": data.get("data")})
        elif kind in (END, ERROR, CANCELLED):
            self.finished = True
            if kind != END:
                # A resumed tool still running ends failed, on its own call: in the
                # continued message's step, where that call is, before this one's own.
                for name, tool_input in self._resumed.values():
                    call_id = self._waiting_call(None, name, tool_input)
                    if isinstance(call_id, str):
                        self._announce(call_id, name, tool_input, out, tool_run=True)
                        self._output(call_id, None, _UNFINISHED_RUN_TEXT, out)
                self._resumed.clear()
            # (A last step that held a browser's tool output would be posted back again.)
            self._own_step(out)
            if kind == END:
                self._settle_drafts(out)  # (a browser's tool runs on this)
            else:
                for call_id in list(self._streaming):
                    self._drop_draft(call_id, _UNFINISHED_CALL_TEXT, out)
                # The server's tools still running (started, not ended) end with the
                # answer: without an output the client would show them running for good
                # (`ai` leaves a stopped call as it was).
                for call_id in self._run_calls.values():
                    self._output(call_id, None, _UNFINISHED_RUN_TEXT, out)
            self._close_text(out)
            if kind == END:
                out.append({"type": "finish-step"})
                reason = self._finish_reason or "stop"
                finish: dict[str, Any] = {"type": "finish", "finishReason": reason}
                usage = None if self._usage is None else TokenUsage(*self._usage)
                part = MessageMetadataPart("finish", self.message_id, reason, usage)
                self._add_metadata(finish, part)
                out.append(finish)
            elif kind == ERROR:
                name = data.get("error")
                message = data.get("message") or name or "the answer failed"
                failed = ErrorPart("error", None if name is None else str(name), str(message))
                out.append({"type": "error", "errorText": self._shown_error(failed)})
            elif data.get("reason") in ("shutdown", "stopped"):
                # Cut by the server, not stopped by a request: `ai` takes an `abort` for the
                # end of a whole answer, and nothing goes on with this one (the run was its
                # process's; "stopped": it stopped there, with no cancel asked nor shutdown).
                text = _SHUTDOWN_TEXT if data["reason"] == "shutdown" else _STOPPED_TEXT
                out.append({"type": "error", "errorText": text})
            else:
                out.append({"type": "abort", "reason": str(data.get("reason") or "cancelled")})
        return out

    def _shown_error(self, part: ErrorPart) -> str:
        """The ``errorText`` for ``part``: the ``error_text`` hook's, else the default."""
        if self._error_text is None:
            return default_error_text(part)
        try:
            text = self._error_text(part)
            if not isinstance(text, str):
                raise TypeError(f"it returned a {type(text).__name__}, not a str")
        except Exception:
            # The app's bug costs the error its text, not the answer its end.
            logger.exception("error_text failed (%s part): the default text is shown", part.type)
            return default_error_text(part)
        return text

    def _add_metadata(self, chunk: dict[str, Any], part: MessageMetadataPart) -> None:
        if self._message_metadata is None:
            return  # none by default: an app's strict messageMetadataSchema would refuse it
        try:
            metadata = self._message_metadata(part)
            if metadata is None:
                return
            if not isinstance(metadata, Mapping):
                raise TypeError(f"it returned a {type(metadata).__name__}, not a dict or None")
            value = dict(metadata)
            orjson.dumps(value)  # (sent as JSON: checked here, not when the part is written)
        except Exception:
            # The app's bug costs the answer its metadata, not the answer.
            logger.exception(
                "message_metadata failed for the %s part of message %s: sent without metadata",
                part.type,
                self.message_id,
            )
            return
        # ai (ui-message-chunks.ts): `start` and `finish` carry an optional messageMetadata,
        # which the client merges into message.metadata.
        chunk["messageMetadata"] = value

    def _add_usage(self, usage: Any) -> None:
        """Count a chat model message's ``usage`` (LangChain's ``usage_metadata``)."""
        if not isinstance(usage, Mapping):
            return
        counts = [usage.get(key) for key in ("input_tokens", "output_tokens", "total_tokens")]
        given = [n if isinstance(n, int) and not isinstance(n, bool) else None for n in counts]
        if all(n is None for n in given):
            return
        input_tokens, output_tokens = given[0] or 0, given[1] or 0
        total = given[2] if given[2] is not None else input_tokens + output_tokens
        before = self._usage or (0, 0, 0)
        self._usage = (before[0] + input_tokens, before[1] + output_tokens, before[2] + total)

    def interrupted(self, reason: str) -> bytes:
        """The SSE bytes that end a stream cut before its terminal event (a read failed):
        its open text parts closed, an ``error`` (the client would otherwise take the cut
        answer for a whole one), ``[DONE]``."""
        if self.finished:
            return b""
        self.finished = True
        out: list[dict[str, Any]] = []
        self._own_step(out)
        for call_id in list(self._streaming):
            self._drop_draft(call_id, _UNFINISHED_CALL_TEXT, out)
        self._close_text(out)
        out.append({"type": "error", "errorText": reason})
        return b"".join(_sse(chunk) for chunk in out) + _DONE

    def encode(self, event: Event) -> bytes:
        """The SSE bytes for ``event``: ``data: <chunk>`` blocks, and ``[DONE]`` at the end."""
        body = b"".join(_sse(chunk) for chunk in self.chunks(event))
        if event.terminal and body:
            body += _DONE
        return body

    # --- text ---------------------------------------------------------------------------

    def _own_step(self, out: list[dict[str, Any]]) -> None:
        """Begin the continuation's own step, if it is still in the continued message's."""
        if self._continuing:
            self._continuing = False
            if self._tool_output_sent:
                out.append({"type": "finish-step"})
            self._tool_output_sent = False
            out.append({"type": "start-step"})

    def _next_step(self, out: list[dict[str, Any]], *, tool_run: bool = False) -> None:
        """Begin a new step if a tool's output was sent in this one: the model speaks again.
        In a continuation, anything but a server tool's part (``tool_run``) begins its own."""
        if self._continuing:
            if not tool_run:
                self._own_step(out)
            return
        if self._tool_output_sent:
            if not all(draft.whole() for draft in self._streaming.values()):
                # A model (a parallel agent's) is half way through a call: it stays in this
                # step, where `ai` puts the rest of it; the step ends once it is whole.
                return
            self._tool_output_sent = False
            self._finish_reason = None  # the model's next call says why it stopped, if it does
            if self._streaming:
                # A tool ran: the calls the model streamed before it are whole, and end in
                # their step (`ai` looks a call up in the current step, else adds another).
                self._settle_drafts(out)
            self._close_text(out)
            out.append({"type": "finish-step"})
            out.append({"type": "start-step"})

    def _open(self, key: Any, out: list[dict[str, Any]]) -> str:
        part = self._open_text.get(key)
        if part is None:
            self._next_step(out)
            if self._open_reasoning:
                self._close_reasoning(out)  # the answer after its reasoning
            self._parts += 1
            part = self._open_text[key] = f"text-{self._parts}"
            out.append({"type": "text-start", "id": part})
        return part

    def _close_text(self, out: list[dict[str, Any]], key: Any = ...) -> None:
        """End the text parts (all, or ``key``'s), and the reasoning parts with them."""
        if self._open_reasoning:
            self._close_reasoning(out, key)
        keys = list(self._open_text) if key is ... else [key]
        for k in keys:
            part = self._open_text.pop(k, None)
            if part is not None:
                out.append({"type": "text-end", "id": part})

    def _close_reasoning(self, out: list[dict[str, Any]], key: Any = ...) -> None:
        keys = list(self._open_reasoning) if key is ... else [key]
        for k in keys:
            part = self._open_reasoning.pop(k, None)
            if part is not None:
                out.append({"type": "reasoning-end", "id": part})

    def _reason(self, key: Any, text: str, out: list[dict[str, Any]]) -> None:
        """A piece of a model's reasoning: a reasoning part per message, before its text
        (which it ends) and its tool calls."""
        part = self._open_reasoning.get(key)
        if part is None:
            self._next_step(out)
            self._close_text(out)  # reasoning after text: a new part, below it
            self._parts += 1
            part = self._open_reasoning[key] = f"reasoning-{self._parts}"
            out.append({"type": "reasoning-start", "id": part})
        digest = self._reasoned.get(key)
        if digest is None:
            digest = self._reasoned[key] = hashlib.blake2b(digest_size=16)
        digest.update(text.encode("utf-8", "surrogatepass"))
        out.append({"type": "reasoning-delta", "id": part, "delta": text})

    def _whole_reasoning(self, key: Any, reasoning: Any, out: list[dict[str, Any]]) -> None:
        """A message's reasoning, unless its tokens streamed it (under its id or another:
        the same text is that message's), whose part it ends."""
        claimed = self._reasoned.pop(key, None)
        if claimed is None and isinstance(reasoning, str) and reasoning:
            digest = _digest(reasoning)
            for streamed, tokens in self._reasoned.items():
                if tokens.digest() == digest:
                    del self._reasoned[streamed]
                    self._close_reasoning(out, streamed)
                    return
            self._reason(key, reasoning, out)
            self._reasoned.pop(key, None)
        self._close_reasoning(out, key)

    def _token(self, data: Mapping[str, Any], out: list[dict[str, Any]]) -> None:
        # Most events of a stream: a text token pays for no more than its text.
        reasoning = data.get("reasoning")  # (before its text: a chunk may hold both)
        if reasoning and isinstance(reasoning, str):
            self._reason(_message_key(data.get("message_id")), reasoning, out)
        text = data.get("text")
        if isinstance(text, str) and text:
            key = _message_key(data.get("message_id"))
            self._streamed.add(key)
            digest = self._token_text.get(key)
            if digest is None:
                digest = self._token_text[key] = hashlib.blake2b(digest_size=16)
            digest.update(text.encode("utf-8", "surrogatepass"))
            out.append({"type": "text-delta", "id": self._open(key, out), "delta": text})
        calls = data.get("tool_call_chunks")  # a model's tool calls, streamed
        if calls and isinstance(calls, list):
            key = _message_key(data.get("message_id"))
            for piece in calls:
                if isinstance(piece, Mapping):
                    self._call_chunk(key, piece, out)
        usage = data.get("usage")  # (`messages` mode: a chunk or two of a model's call)
        if usage:
            self._add_usage(usage)
        finish = data.get("finish_reason")  # (the model's last chunk)
        if finish:
            key = _message_key(data.get("message_id"))
            called = False
            for (message, _), draft in self._drafts.items():
                if message == key:
                    called = draft.ended = True
            self._finish_reason = _finish_reason(finish, called)

    def _message(self, message: Any, out: list[dict[str, Any]]) -> None:
        if not isinstance(message, Mapping):
            return
        role = message.get("role")
        if role in _AI_ROLES:
            self._add_usage(message.get("usage"))
            key = _message_key(message.get("id"))
            text = message.get("text")
            if key not in self._streamed and isinstance(text, str) and text:
                # Its text may have come as tokens of another id: a provider's id on some
                # chunks only (OpenAI's Responses API), the others get LangChain's run id,
                # and the whole message the provider's. The same text is that message.
                key = self._streamed_as(text, key)
            self._token_text.pop(key, None)
            if self._reasoned or message.get("reasoning"):
                self._whole_reasoning(key, message.get("reasoning"), out)
            if key in self._open_text:
                self._close_text(out, key)
            elif key not in self._streamed and isinstance(text, str) and text:
                # A model that does not stream: its text arrives whole.
                self._streamed.add(key)
                part = self._open(key, out)
                out.append({"type": "text-delta", "id": part, "delta": text})
                self._close_text(out, key)
            calls = message.get("tool_calls")
            called = False
            for call in calls if isinstance(calls, list) else ():
                if not isinstance(call, Mapping):
                    continue  # an app's own event may hold anything: only calls are sent
                call_id, name = call.get("id"), call.get("name")
                if isinstance(call_id, str) and isinstance(name, str):
                    called = True
                    if self._announce(call_id, name, call.get("args"), out):
                        self._announced.setdefault(name, []).append((call_id, call.get("args")))
            self._finish_reason = _finish_reason(message.get("finish_reason"), called)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if isinstance(call_id, str):
                self._tool_message(call_id, message, out)

    def _tool_message(
        self, call_id: str, message: Mapping[str, Any], out: list[dict[str, Any]]
    ) -> None:
        self._announce(call_id, str(message.get("name") or "tool"), None, out, tool_run=True)
        if message.get("status") == "error":
            self._output(call_id, None, str(message.get("text")), out)
        else:
            self._output(call_id, message.get("content"), None, out)

    def _update(self, state: Any, out: list[dict[str, Any]]) -> None:
        """The tool messages of a state update (``updates`` or ``values`` mode) that answer
        this answer's calls no event answered: a handoff's (a tool's ``Command`` to the
        parent graph ends its node with an error, so ``messages`` mode never streams it)."""
        found = state.values() if isinstance(state, Mapping) else (state,)
        for messages in found:
            for message in messages if isinstance(messages, list) else ():
                if not isinstance(message, Mapping) or message.get("role") != "tool":
                    continue
                call_id = message.get("tool_call_id")
                if not isinstance(call_id, str):
                    continue
                call = self._calls.get(call_id)
                if call is not None and not call.output_sent:
                    self._tool_message(call_id, message, out)

    def _interrupts(self, update: Mapping[str, Any], out: list[dict[str, Any]]) -> None:
        """A graph's ``interrupt()`` (the update of node ``__interrupt__``, or a state's
        ``__interrupt__``) → a ``data-interrupt`` part per Interrupt, named by its id: once,
        though several modes (or a subgraph and its parent) show it."""
        state = update.get("data")
        if update.get("node") == "__interrupt__":
            found = state
        else:
            found = state.get("__interrupt__") if isinstance(state, Mapping) else None
        for asked in found if isinstance(found, list) else ():
            part: dict[str, Any] = {"type": "data-interrupt", "data": asked}
            interrupt_id = asked.get("id") if isinstance(asked, Mapping) else None
            if isinstance(interrupt_id, str):
                if interrupt_id in self._interrupts_sent:
                    continue
                self._interrupts_sent.add(interrupt_id)
                # ai: a data part with an id replaces the part of that type and id.
                part["id"] = interrupt_id
            self._own_step(out)
            out.append(part)

    def _streamed_as(self, text: str, key: Any) -> Any:
        """The key of the tokens whose text is ``text`` and no message claimed, else ``key``."""
        digest = _digest(text)
        for streamed, tokens in self._token_text.items():
            if tokens.digest() == digest:
                self._streamed.add(key)
                return streamed
        return key

    # --- tools --------------------------------------------------------------------------

    def _announce(
        self,
        call_id: str,
        name: str,
        args: Any,
        out: list[dict[str, Any]],
        *,
        tool_run: bool = False,
    ) -> bool:
        """Send a tool call's input once; true if it is sent now. The input of a call the
        model streamed is its arguments' text, unless ``args`` gives them. ``tool_run``: a
        server tool's run or output announces it, not the model."""
        draft = self._streaming.pop(call_id, None)
        if draft is not None:
            name = self._calls[call_id].name
            if args is None:
                args = _parsed_args(draft.args)
        elif call_id in self._calls:
            return False
        else:
            self._start_call(call_id, name, out, tool_run=tool_run)
        out.append(
            {
                "type": "tool-input-available",
                "toolCallId": call_id,
                "toolName": name,
                "input": {} if args is None else args,
            }
        )
        return True

    def _start_call(
        self, call_id: str, name: str, out: list[dict[str, Any]], *, tool_run: bool = False
    ) -> None:
        self._next_step(out, tool_run=tool_run)
        # Text after a tool call is a new text part, as the AI SDK's own servers send it (a
        # text part per step): tokens without a message id would otherwise add it to the
        # text before the call, and the client would show it above the tool.
        self._close_text(out)
        self._calls[call_id] = _ToolCall(name)
        out.append({"type": "tool-input-start", "toolCallId": call_id, "toolName": name})

    def _call_chunk(
        self, key: Hashable, piece: Mapping[str, Any], out: list[dict[str, Any]]
    ) -> None:
        """A fragment of a tool call the model streams (``{id, name, args, index}``): the
        call starts once its id and name are known, its arguments' text follows as deltas,
        and its input is available once its message, its run or the answer's end says it
        is whole (:meth:`_announce`)."""
        index = _message_key(piece.get("index"))
        call_id = piece.get("id") if isinstance(piece.get("id"), str) and piece["id"] else None
        name = piece.get("name") if isinstance(piece.get("name"), str) and piece["name"] else None
        draft = self._drafts.get((key, index))
        if draft is None and call_id is None:
            draft = self._last_draft.get(index)  # its chunks changed ids (a provider's id)
        if draft is None or (call_id is not None and draft.call_id not in (None, call_id)):
            draft = _DraftCall()
        self._drafts[(key, index)] = self._last_draft[index] = draft
        draft.call_id = draft.call_id or call_id
        draft.name = draft.name or name
        args = piece.get("args")
        if isinstance(args, str):
            draft.args += args
        if draft.call_id is None or draft.name is None:
            return  # not known yet: its text waits for the fragment that names the call
        if draft.call_id not in self._calls:
            self._start_call(draft.call_id, draft.name, out)
            self._streaming[draft.call_id] = draft
        if self._streaming.get(draft.call_id) is draft and len(draft.args) > draft.sent:
            delta = draft.args[draft.sent :]
            draft.sent = len(draft.args)
            out.append(
                {"type": "tool-input-delta", "toolCallId": draft.call_id, "inputTextDelta": delta}
            )

    def _settle_drafts(self, out: list[dict[str, Any]]) -> None:
        """The calls the model streamed are whole: their input is available, unless their
        arguments are not JSON (cut by max_tokens): LangChain's invalid_tool_calls, which
        nothing runs."""
        for call_id, draft in list(self._streaming.items()):
            if _is_json(draft.args):
                self._announce(call_id, "tool", None, out)
            else:
                self._drop_draft(call_id, _INVALID_ARGS_TEXT, out)

    def _drop_draft(self, call_id: str, error: str, out: list[dict[str, Any]]) -> None:
        """End a streamed call that will not run (the answer failed or stopped before it was
        whole, or its arguments are not JSON): the client would show it as being made, or
        run it. ``providerExecuted``: the browser must not run it, and ``ai`` posts back an
        answer whose own tools all failed."""
        draft = self._streaming.pop(call_id)
        out.append(
            {
                "type": "tool-input-error",
                "toolCallId": call_id,
                "toolName": self._calls[call_id].name,
                "input": _parsed_args(draft.args),
                "errorText": error,
                "providerExecuted": True,
            }
        )

    def _output(
        self, call_id: str, output: Any, error: str | None, out: list[dict[str, Any]]
    ) -> None:
        call = self._calls[call_id]
        if call.output_sent:
            return
        call.output_sent = True
        self._tool_output_sent = True
        # The server ran it (a client-side tool's output comes from the browser, never from
        # here): providerExecuted, or lastAssistantMessageIsCompleteWithToolCalls takes an
        # answer that ends with it for one waiting on the browser, and posts it back.
        if error is not None:
            out.append(
                {
                    "type": "tool-output-error",
                    "toolCallId": call_id,
                    "errorText": error,
                    "providerExecuted": True,
                }
            )
        else:
            out.append(
                {
                    "type": "tool-output-available",
                    "toolCallId": call_id,
                    "output": output,
                    "providerExecuted": True,
                }
            )

    def _tool_start(self, data: Mapping[str, Any], out: list[dict[str, Any]]) -> None:
        name = str(data.get("name") or "tool")
        # An app's own events may name the call and its arguments: {id, name, args}.
        call_id: Any = data.get("id")
        run_id = str(data.get("run_id") or call_id)
        tool_input = data.get("input", data.get("args"))
        if isinstance(tool_input, Mapping) and tool_input.get("type") == "tool_call":
            call_id = tool_input.get("id")  # a ToolCall passed whole
            tool_input = tool_input.get("args")
        announced = self._announced.get(name) or []
        # The model's call this tool run executes: the one named, else the first with
        # these arguments (parallel calls of one tool start in any order), else the first.
        match = next((c for c in announced if c[0] == call_id), None)
        if match is None and call_id is None:
            match = next((c for c in announced if c[1] == tool_input), None)
            if match is None and announced:
                match = announced[0]
        if match is not None:
            announced.remove(match)
            call_id = match[0]
        elif self._continuing and not isinstance(call_id, str):
            # A tool the continuation resumed (a LangGraph tool that called interrupt()):
            # its call is the continued message's, which its run does not name and its
            # output (a ToolMessage) does. It is announced then, on that call's own part.
            self._resumed[run_id] = (name, tool_input)
            return
        if not isinstance(call_id, str):
            call_id = run_id
        self._run_calls[run_id] = call_id
        self._announce(call_id, name, tool_input, out, tool_run=True)

    def _waiting_call(self, call_id: Any, name: str, tool_input: Any) -> Any:
        """The continued message's call a resumed run answers: ``call_id`` if its output
        names it, else the first waiting call of its tool with its input, else of its tool."""
        calls = self._waiting
        found = next((c for c in calls if c[0] == call_id), None)
        if found is None and not isinstance(call_id, str):
            found = next((c for c in calls if c[1] == name and c[2] == tool_input), None)
            found = found or next((c for c in calls if c[1] == name), None)
        if found is None:
            return call_id
        calls.remove(found)
        return found[0]

    def _tool_end(self, data: Mapping[str, Any], out: list[dict[str, Any]]) -> None:
        output = data.get("output")
        run_id = str(data.get("run_id") or data.get("id"))
        resumed = self._resumed.pop(run_id, None)
        name, tool_input = resumed or (str(data.get("name") or "tool"), None)
        call_id: Any = self._run_calls.pop(run_id, None) or data.get("id")
        error = data.get("error")
        if error is not None:  # the tool raised: its exception's message
            error = self._shown_error(ErrorPart("tool-output-error", None, str(error), name))
        if isinstance(output, Mapping) and "goto" in output and "update" in output:
            # A Command (a tool that updates the graph's state): its ToolMessage is the
            # output, as the tool message in `messages` mode says.
            output = _command_tool_message(output, call_id) or _command_summary(output)
        if isinstance(output, Mapping) and output.get("role") == "tool":
            # A ToolMessage: its tool_call_id names the call, unless this run had one. A
            # tool that handles its own errors (handle_tool_error) ends with one of status
            # "error", as the tool message in `messages` mode says.
            call_id = call_id or output.get("tool_call_id")
            if error is None and output.get("status") == "error":
                error = output.get("text")
            output = output.get("content")
        if resumed is not None:
            call_id = self._waiting_call(call_id, name, tool_input)
        if not isinstance(call_id, str):
            call_id = run_id
        self._announce(call_id, name, tool_input, out, tool_run=True)
        self._output(call_id, output, None if error is None else str(error), out)


def _command_tool_message(command: Mapping[str, Any], call_id: Any) -> Mapping[str, Any] | None:
    """The ToolMessage of a tool's ``Command`` (as a dict: ``{graph, update, resume, goto}``)
    for ``call_id`` (its only one if the call is not known), if its ``update`` holds it."""
    update = command.get("update")
    if isinstance(update, Mapping):
        messages = update.get("messages")
    elif isinstance(update, list):
        # [(key, value), ...], or the messages themselves: ToolNode's form for a graph
        # whose state is the list of messages
        pairs = (p for p in update if isinstance(p, list) and len(p) == 2)
        messages = next((p[1] for p in pairs if p[0] == "messages"), update)
    else:
        return None
    found = [
        m
        for m in (messages if isinstance(messages, list) else ())
        if isinstance(m, Mapping) and m.get("role") == "tool"
    ]
    if call_id is None and len(found) == 1:
        return found[0]
    return next((m for m in found if m.get("tool_call_id") == call_id), None)


def _command_summary(command: Mapping[str, Any]) -> dict[str, Any]:
    """What a tool's ``Command`` without its ToolMessage does (as its output): its
    ``goto``, ``update`` and ``resume`` that are set (a handoff's: ``{"goto": "agent"}``)."""
    return {
        key: value
        for key in ("goto", "update", "resume")
        if (value := command.get(key)) is not None and value != [] and value != {}
    }


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _parsed_args(text: str) -> Any:
    """The arguments of a streamed tool call: its text's JSON (``{}`` for none, the text
    itself if it is not JSON)."""
    if not text.strip():
        return {}
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _is_json(text: str) -> bool:
    """True if a streamed call's arguments parse (none is ``{}``)."""
    if not text.strip():
        return True
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def _message_key(message_id: Any) -> Hashable:
    """A message id as a key of the text parts: the events an app writes itself may give
    any JSON value (a list, an object), which a dict cannot hold as they are."""
    if message_id is None or isinstance(message_id, str):
        return message_id
    return (type(message_id).__name__, repr(message_id))


def default_message_id(stream_id: str, epoch: int) -> str:
    """The assistant message id of a run: the same for every replay of it."""
    return f"{stream_id}-{epoch}"


def _marked_calls(event: Event) -> list[tuple[str, str, Any]]:
    """The calls in ``ChatRouter``'s continuation marker (see :func:`_waiting_calls`)."""
    marked = event.data.get("data")
    calls = marked.get("calls") if isinstance(marked, Mapping) else None
    return [
        (c[0], c[1], c[2])
        for c in (calls if isinstance(calls, list) else ())
        if isinstance(c, list) and len(c) == 3 and isinstance(c[0], str) and isinstance(c[1], str)
    ]


def _marked_message_id(event: Event) -> str | None:
    """The message id in ``ChatRouter``'s continuation marker, if ``event`` is one."""
    data = event.data
    if event.type != CUSTOM or data.get("name") != _MESSAGE_ID_EVENT:
        return None
    marked = data.get("data")
    message_id = marked.get("message_id") if isinstance(marked, Mapping) else None
    return message_id if isinstance(message_id, str) and message_id else None


class UIMessageStreamResponse(StreamResponse):
    """A :class:`~resumable_stream.starlette.StreamResponse` speaking the UI message stream.

    Replayed from the start (a consumer without ``after``), it begins with ``start`` and
    ``message_id`` (by default the one a continuation's run names in its first event, else
    ``"<stream_id>-<epoch>"``: the same in every replay, so the client replaces its partial
    message instead of adding one). A stream with nothing to send
    answers 204, which ``useChat`` reads as "nothing to resume". ``message_metadata`` and
    ``error_text`` are :class:`UIMessageChunks`'s; ``limit`` is :class:`StreamResponse`'s (a
    :class:`~resumable_stream.starlette.ConnectionLimit`: past it, 503 ``too_many_streams``).
    """

    def __init__(
        self,
        consumer: StreamConsumer,
        request: Request | None = None,
        *,
        message_id: str | None = None,
        message_metadata: MessageMetadata | None = None,
        error_text: ErrorText | None = None,
        ping_interval: float | None = DEFAULT_PING_INTERVAL,
        send_timeout: float | None = DEFAULT_SEND_TIMEOUT,
        on_disconnect: Callable[[], Awaitable[object]] | None = None,
        limit: ConnectionLimit | None = None,
    ) -> None:
        super().__init__(
            consumer,
            request,
            format="sse",
            retry=None,  # not an EventSource: the SDK reconnects through its own GET
            ping_interval=ping_interval,
            send_timeout=send_timeout,
            on_disconnect=on_disconnect,
            limit=limit,
        )
        self.chunker = UIMessageChunks(
            message_id,
            start=consumer.after is None,
            message_metadata=message_metadata,
            error_text=error_text,
        )
        self.wire = WireFormat("sse", EVENT_STREAM_TYPE, self._encode, PING, self._cut)
        self.event_stream_client = True  # nothing to send is 204, which the SDK understands
        self.raw_headers = [
            *self.raw_headers,
            *((k.encode(), v.encode()) for k, v in UI_MESSAGE_STREAM_HEADERS.items()),
        ]

    def _cut(self, error: BaseException) -> bytes:
        # The detail may name the storage's hosts: the client gets what to do, not why.
        if isinstance(error, ServerClosed):
            return self.chunker.interrupted(_SERVER_CLOSED_TEXT)
        return self.chunker.interrupted(
            "the answer was interrupted (its stream could not be read); resume to read the rest"
        )

    def _encode(self, event: Event) -> bytes:
        chunker = self.chunker
        if chunker.message_id is None:
            chunker.message_id = _marked_message_id(event) or default_message_id(
                self.consumer.stream_id, parse_offset(event.offset).epoch
            )
        return chunker.encode(event)


# --- the ready-made router ---------------------------------------------------------------

#: What a request wants to do with a chat, as passed to ``authorize``.
ChatAction = Literal["send", "resume", "stop"]


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A ``useChat`` request: ``POST {api}`` with ``{id, messages, trigger, messageId}``."""

    chat_id: str
    #: The UI messages the client holds, the new user message last (``{id, role, parts}``).
    messages: list[dict[str, Any]]
    #: ``"submit-message"`` or ``"regenerate-message"``.
    trigger: str
    #: The message to replace (an edit or a regeneration), or the assistant message a
    #: continuation answers in (``ai`` 7 sends it then), if any.
    message_id: str | None
    #: The whole JSON body, with the fields the app added through the transport's ``body``.
    body: dict[str, Any]
    request: Request = field(repr=False)

    @property
    def text(self) -> str:
        """The text of the last user message."""
        for message in reversed(self.messages):
            if isinstance(message, Mapping) and message.get("role") == "user":
                return ui_message_text(message)
        return ""


def ui_message_text(message: Mapping[str, Any]) -> str:
    """The text parts of a UI message, joined."""
    parts = message.get("parts")
    if not isinstance(parts, list):
        content = message.get("content")  # the AI SDK 4 shape
        return content if isinstance(content, str) else ""
    return "".join(
        p["text"]
        for p in parts
        if isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
    )


def _waiting_calls(messages: list[Any]) -> list[list[Any]]:
    """The tool calls of the continued message (the last) the browser answered, not the
    server: ``[call id, tool name, input]``, the calls the continuation may resume."""
    last = messages[-1] if messages else None
    parts = last.get("parts") if isinstance(last, Mapping) else None
    calls: list[list[Any]] = []
    for part in parts if isinstance(parts, list) else ():
        if not isinstance(part, Mapping) or part.get("providerExecuted"):
            continue
        kind, call_id = part.get("type"), part.get("toolCallId")
        if not isinstance(kind, str) or not isinstance(call_id, str):
            continue
        name = part.get("toolName") if kind == "dynamic-tool" else kind.removeprefix("tool-")
        if isinstance(name, str) and name and name != kind:
            calls.append([call_id, name, part.get("input")])
    return calls


def _continued(messages: list[Any]) -> str | None:
    """The id of the assistant message a continuation goes on with: the last message, when
    the client posts after a client-side tool's output (``sendAutomaticallyWhen``). The
    client goes on with that message, and takes a ``start`` naming another for a new one,
    which it adds with the earlier parts again."""
    last = messages[-1] if messages else None
    if isinstance(last, Mapping) and last.get("role") == "assistant":
        message_id = last.get("id")
        if isinstance(message_id, str) and message_id:
            return message_id
    return None


async def _answer(
    source: ChatSource,
    chat: ChatRequest,
    continued: str | None,
    called: asyncio.Future[BaseException | None],
) -> AsyncGenerator[Any, None]:
    """The run of a chat's message: calls the app's ``source`` once the run holds the chat
    (so a request refused as busy never calls it), and sets ``called`` to what it raised,
    or None. A continuation's marker comes first, for every replay (``_marked_message_id``)."""
    try:
        items = source(chat)
        if inspect.isawaitable(items):
            items = await items
        if not isinstance(items, AsyncIterable):
            raise TypeError(
                f"the chat source must return an async iterable (e.g. graph.astream_events"
                f"(...)), not {type(items).__name__}"
            )
    except BaseException as exc:
        # A result, not set_exception(): a request gone meanwhile leaves nothing unretrieved.
        if not called.done():
            called.set_result(None if isinstance(exc, asyncio.CancelledError) else exc)
        raise
    called.set_result(None)
    try:
        if continued is not None:
            # Stored first, so that a resume (GET, which has no body) names it too.
            marker = {"message_id": continued, "calls": _waiting_calls(chat.messages)}
            yield Event(CUSTOM, {"name": _MESSAGE_ID_EVENT, "data": marker}, "")
        async for item in items:
            yield item
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


async def _ended(run: Run) -> None:
    with contextlib.suppress(Exception):  # how it ended is the stream's to tell
        await run.wait()


ChatSource = Callable[[ChatRequest], AsyncIterable[Any] | Awaitable[AsyncIterable[Any]]]


def _error(error: HTTPError) -> Response:
    if error.status == 204:
        return Response(status_code=204, headers=error.headers())
    return Response(error.body(), error.status, error.headers(), JSON_TYPE)


def _refused(exc: HTTPException) -> Response:
    """An app's ``HTTPException`` (authorize, stream_id, the source) as JSON, its headers kept."""
    response = _error(http_status_error(exc.status_code, exc.detail))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def _bad_request(message: str) -> Response:
    return _error(HTTPError(400, "invalid_request", message))


class ChatRouter:
    """The endpoints ``useChat`` calls, with runs that outlive their requests.

    * ``POST {path}``: start a run for chat ``id`` with the source ``source(ChatRequest)``
      returns, and answer it as a UI message stream. A client that goes away does not stop
      it: the answer finishes and the next resume or reload shows it. A continuation (the
      last message an assistant's: after a client-side tool's output) is
      answered in that message: its ``start`` and every replay's name its id;
    * ``GET {path}/{chat_id}/stream``: 204 when no answer is in progress, else the answer
      replayed from its start and followed live (``useChat({resume: true})`` calls it on
      mount);
    * ``POST {path}/{chat_id}/stop``: stop the answer (``useChat``'s ``stop()`` only aborts
      the fetch; call this too), in whichever process it runs.

    ``stream_id(chat_id)`` maps a chat to its stream (the chat id by default); each message
    starts a new run of it (a new epoch). A chat with an answer in progress refuses another
    with 409 (without calling ``source``: the run calls it once it holds the chat), a body
    over ``max_body_bytes`` with 413. ``authorize(request, chat_id,
    action)`` may refuse with false (403) or raise Starlette's ``HTTPException``.
    ``message_metadata(part)`` gives the answer's ``message.metadata`` (see
    :class:`MessageMetadataPart`): on a resume too, from the stored events.
    ``error_text(part)`` gives the text the client shows for an error (see
    :class:`ErrorPart`); by default an exception's message stays on the server ("An error
    occurred.", as the AI SDK's servers answer). Add :attr:`routes` to the app, or serve
    the router itself.
    """

    def __init__(
        self,
        transport: Transport,
        source: ChatSource,
        *,
        path: str = "/api/chat",
        producer: StreamProducer | None = None,
        authorize: Callable[[Request, str, ChatAction], bool | Awaitable[bool]] | None = None,
        stream_id: Callable[[str], str] | None = None,
        ping_interval: float | None = DEFAULT_PING_INTERVAL,
        send_timeout: float | None = DEFAULT_SEND_TIMEOUT,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        message_metadata: MessageMetadata | None = None,
        error_text: ErrorText | None = None,
    ) -> None:
        _check_body_limit(max_body_bytes)
        if authorize is None:
            raise ConfigurationError(
                "ChatRouter needs authorize=: a function (request, chat_id, action) that returns "
                "true when the caller may act on the chat. Without one, anyone who knows a chat "
                "id could read, continue and stop it; if that is what you want, pass "
                "authorize=allow_all (from resumable_stream.starlette)."
            )
        self.transport = transport
        self.source = source
        self.producer = StreamProducer(transport) if producer is None else producer
        self.authorize = authorize
        self.stream_id = stream_id or (lambda chat_id: chat_id)
        self.ping_interval = ping_interval
        self.send_timeout = send_timeout
        self.max_body_bytes = max_body_bytes
        self.message_metadata = message_metadata
        self.error_text = error_text
        path = "/" + path.strip("/") if path.strip("/") else ""
        self.routes: list[BaseRoute] = [
            _JsonRoute(path or "/", self.send, methods=["POST"], name="ai_chat_send"),
            _JsonRoute(
                f"{path}/{{chat_id}}/stream", self.resume, methods=["GET"], name="ai_chat_resume"
            ),
            _JsonRoute(
                f"{path}/{{chat_id}}/stop", self.stop, methods=["POST"], name="ai_chat_stop"
            ),
        ]
        self._app = _JsonRouting(self.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    async def _allowed(self, request: Request, chat_id: str, action: ChatAction) -> Response | None:
        try:
            allowed = self.authorize(request, chat_id, action)
            if inspect.isawaitable(allowed):
                allowed = await allowed
        except HTTPException as exc:
            return _refused(exc)
        if not allowed:
            return _error(HTTPError(403, "forbidden", "not allowed to access this chat"))
        return None

    def _response(
        self,
        request: Request,
        stream_id: str,
        epoch: int | None = None,
        message_id: str | None = None,
    ) -> Response:
        return UIMessageStreamResponse(
            StreamConsumer(self.transport, stream_id, epoch=epoch),
            request,
            message_id=message_id,
            message_metadata=self.message_metadata,
            error_text=self.error_text,
            ping_interval=self.ping_interval,
            send_timeout=self.send_timeout,
        )

    async def send(self, request: Request) -> Response:
        """``POST {path}``: answer the chat's new message as a UI message stream."""
        raw = await _read_json_body(request, self.max_body_bytes)
        if isinstance(raw, HTTPError):
            return _error(raw)
        try:
            body = loads_json(raw)
        except orjson.JSONDecodeError:
            return _bad_request(
                "the body must be JSON in UTF-8: {id, messages, trigger, messageId}"
            )
        if not isinstance(body, dict):
            return _bad_request("the body must be a JSON object: {id, messages, ...}")
        chat_id, messages = body.get("id"), body.get("messages")
        if not isinstance(chat_id, str) or not chat_id:
            return _bad_request("'id' (the chat id) must be a non-empty string")
        if not isinstance(messages, list):
            return _bad_request("'messages' must be a list of UI messages")
        trigger = body.get("trigger")
        message_id = body.get("messageId")
        refused = await self._allowed(request, chat_id, "send")
        if refused is not None:
            return refused
        chat = ChatRequest(
            chat_id,
            messages,
            trigger if isinstance(trigger, str) else "submit-message",
            message_id if isinstance(message_id, str) else None,
            body,
            request,
        )
        continued = _continued(messages)
        called: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        answer = _answer(self.source, chat, continued, called)
        try:
            stream_id = check_stream_id(self.stream_id(chat_id))
            # The run first, then the app's source, from inside it: the transport's create
            # is the busy check (across processes), and a request it refuses must not run
            # what source() does before its generator (saving the message, a quota).
            run = await self.producer.start(answer, stream_id=stream_id)
        except HTTPException as exc:  # raised by the app's stream_id()
            await answer.aclose()
            return _refused(exc)
        except StreamAlreadyRunning:
            await answer.aclose()
            return _error(
                HTTPError(409, "answer_in_progress", f"chat {chat_id!r} is answering already")
            )
        except ResumableStreamError as exc:
            await answer.aclose()
            return _error(error_for(exc))
        # Until source() is called (or the run ended without calling it: stopped first):
        # what it raises is this request's answer; the run ends with an `error` event.
        ended = asyncio.ensure_future(_ended(run))
        try:
            await asyncio.wait((called, ended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()  # (not the run: wait() is shielded)
        raised = called.result() if called.done() else None
        if isinstance(raised, HTTPException):
            return _refused(raised)
        if isinstance(raised, ResumableStreamError):
            return _error(error_for(raised))
        if raised is not None:
            raise raised
        # This message's answer, not a later one that replaced it before the first read.
        return self._response(request, stream_id, run.epoch, continued)

    async def resume(self, request: Request) -> Response:
        """``GET {path}/{chat_id}/stream``: the answer in progress from its start, or 204."""
        chat_id = request.path_params["chat_id"]
        refused = await self._allowed(request, chat_id, "resume")
        if refused is not None:
            return refused
        try:
            stream_id = check_stream_id(self.stream_id(chat_id))
            info = await self.transport.info(stream_id)
        except HTTPException as exc:  # raised by the app's stream_id()
            return _refused(exc)
        except ResumableStreamError as exc:
            return _error(error_for(exc))
        if info is None or info.status != "running":
            # ai: ui/http-chat-transport.ts reads 204 as "nothing to resume".
            return Response(status_code=204, headers={"cache-control": "no-store"})
        return self._response(request, stream_id)

    async def stop(self, request: Request) -> Response:
        """``POST {path}/{chat_id}/stop``: stop the answer in progress."""
        chat_id = request.path_params["chat_id"]
        refused = await self._allowed(request, chat_id, "stop")
        if refused is not None:
            return refused
        try:
            stream_id = check_stream_id(self.stream_id(chat_id))
            # Asked first: a run that wrote its end may linger in the producer a moment
            # (and a run whose producer died is ended, not asked to stop).
            info = await settled_info(self.transport, stream_id)
            if info is None or info.status != "running":
                status = "unknown" if info is None else info.status
                return _error(not_running(stream_id, status))
            await self.producer.cancel(stream_id)
        except HTTPException as exc:  # raised by the app's stream_id()
            return _refused(exc)
        except ResumableStreamError as exc:
            return _error(error_for(exc))
        return Response(
            orjson.dumps({"chat_id": chat_id, "cancel_requested": True}),
            202,
            {"cache-control": "no-store"},
            JSON_TYPE,
        )
