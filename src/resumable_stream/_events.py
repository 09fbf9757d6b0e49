"""The event vocabulary and the normalization of sources into it.

Every source (LangGraph ``astream_events(version="v2")``, ``astream`` in any stream mode,
plain strings, dicts) becomes a sequence of ``(type, data)`` pairs with JSON-safe ``data``.
"""

from __future__ import annotations

import base64
import dataclasses
import sys
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from datetime import date, time, timedelta, tzinfo
from decimal import Decimal
from enum import Enum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import PurePath
from re import Pattern
from typing import Any, Final

import orjson

TOKEN: Final = "token"
MESSAGE: Final = "message"
TOOL_START: Final = "tool_start"
TOOL_END: Final = "tool_end"
CUSTOM: Final = "custom"
UPDATE: Final = "update"
END: Final = "end"
ERROR: Final = "error"
CANCELLED: Final = "cancelled"

EVENT_TYPES: Final = frozenset(
    {TOKEN, MESSAGE, TOOL_START, TOOL_END, CUSTOM, UPDATE, END, ERROR, CANCELLED}
)
TERMINAL_TYPES: Final = frozenset({END, ERROR, CANCELLED})

_STREAM_MODES: Final = frozenset(
    {"values", "updates", "messages", "custom", "checkpoints", "tasks", "debug", "events"}
)


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One event read from a stream.

    ``offset`` identifies this event; pass it as ``after=`` (or send it back as SSE
    ``Last-Event-ID``) to resume with the next event.
    """

    type: str
    data: dict[str, Any]
    offset: str

    @property
    def terminal(self) -> bool:
        """True for ``end``, ``error`` and ``cancelled``: nothing follows it."""
        return self.type in TERMINAL_TYPES


Item = tuple[str, dict[str, Any]]


def error_data(exc: BaseException) -> dict[str, Any]:
    """The ``data`` of an ``error`` event describing ``exc`` (whose ``__str__`` may fail)."""
    try:
        message = str(exc) or repr(exc)
    except Exception:
        message = f"{type(exc).__name__} (its message could not be read)"
    return {"error": type(exc).__name__, "message": message}


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping) and block.get("type", "text") == "text":
                text = block.get("text")
                if isinstance(text, str):
                    parts.append(text)
        return "".join(parts)
    return ""


#: The content blocks that hold a model's reasoning, and their text's key: LangChain's
#: standard block (and OpenAI's Responses API, with a ``summary``), Anthropic's thinking,
#: Bedrock Converse's.
_REASONING_BLOCKS: Final = {"reasoning": "reasoning", "thinking": "thinking"}


def reasoning_of(content: Any, extra: Any) -> str:
    """The reasoning a message (or a chunk of one) holds, joined: its reasoning and thinking
    blocks (and reasoning summaries), else what its provider put in ``additional_kwargs``
    (``extra``): ``reasoning_content`` (DeepSeek, Ollama, xAI, Groq, vLLM), or the
    Responses API's ``reasoning`` summary."""
    parts: list[str] = []
    if isinstance(content, list):
        for block in content:
            if isinstance(block, Mapping):
                _reasoning_block(block, parts)
    if not parts and isinstance(extra, Mapping) and extra:
        found = extra.get("reasoning_content")
        if isinstance(found, str):
            parts.append(found)
        elif isinstance(extra.get("reasoning"), Mapping):
            _reasoning_block(extra["reasoning"], parts)
    return "".join(parts)


def _reasoning_block(block: Mapping[str, Any], parts: list[str]) -> None:
    kind = block.get("type", "reasoning")
    key = _REASONING_BLOCKS.get(kind) if isinstance(kind, str) else None
    if key is None:
        if kind == "reasoning_content":  # Bedrock Converse: {"reasoning_content": {"text"}}
            inner = block.get("reasoning_content")
            text = inner.get("text") if isinstance(inner, Mapping) else None
            if isinstance(text, str):
                parts.append(text)
        return
    text = block.get(key)
    if isinstance(text, str):
        parts.append(text)
        return
    summary = block.get("summary")
    for part in summary if isinstance(summary, list) else ():
        text = part.get("text") if isinstance(part, Mapping) else None
        if isinstance(text, str):
            parts.append(text)


#: Where providers' LangChain integrations put why the model stopped (``response_metadata``):
#: OpenAI, Mistral, Gemini; Anthropic; Bedrock Converse; Ollama.
_FINISH_KEYS: Final = ("finish_reason", "stop_reason", "stopReason", "done_reason")
_FINISH_FIELDS: Final = frozenset({*_FINISH_KEYS, "incomplete_details"})


def finish_reason_of(metadata: Any) -> str | None:
    """Why a model stopped, as its provider says it (``"length"``, ``"max_tokens"``,
    ``"tool_calls"``...), from a message's or a chunk's ``response_metadata``; the Responses
    API's ``incomplete_details`` reason (``"max_output_tokens"``) for an incomplete answer."""
    # (Checked for every streamed chunk, most of which say nothing of it: kept cheap.)
    if not metadata or not isinstance(metadata, dict) or _FINISH_FIELDS.isdisjoint(metadata):
        return None
    for key in _FINISH_KEYS:
        reason = metadata.get(key)
        if isinstance(reason, str) and reason:
            return reason
    details = metadata.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, Mapping) else None
    return reason if isinstance(reason, str) and reason else None


def _is_message(obj: Any) -> bool:
    return hasattr(obj, "content") and hasattr(obj, "type") and hasattr(obj, "id")


# A message chunk's type is its class name ("AIMessageChunk"), its message's the role ("ai").
_CHUNK_ROLES = {
    "AIMessageChunk": "ai",
    "HumanMessageChunk": "human",
    "SystemMessageChunk": "system",
    "ToolMessageChunk": "tool",
    "FunctionMessageChunk": "function",
    "ChatMessageChunk": "chat",
}


def message_to_dict(message: Any) -> dict[str, Any]:
    """A compact JSON-safe view of a LangChain message."""
    out: dict[str, Any] = {
        "id": message.id,
        "role": _CHUNK_ROLES.get(message.type, message.type),
        "text": text_of(message.content),
        "content": to_jsonable(message.content),
    }
    reasoning = reasoning_of(message.content, getattr(message, "additional_kwargs", None))
    if reasoning:
        out["reasoning"] = reasoning
    tool_calls = getattr(message, "tool_calls", None)
    if tool_calls:
        out["tool_calls"] = [
            {"id": c.get("id"), "name": c.get("name"), "args": to_jsonable(c.get("args"))}
            for c in tool_calls
        ]
    finish_reason = finish_reason_of(getattr(message, "response_metadata", None))
    if finish_reason:
        out["finish_reason"] = finish_reason
    for attr in ("name", "tool_call_id", "status"):
        value = getattr(message, attr, None)
        if value:
            out[attr] = value
    usage = getattr(message, "usage_metadata", None)
    if usage:
        out["usage"] = to_jsonable(usage)
    # A tool's data for the app beside its text for the model (ToolMessage.artifact).
    artifact = getattr(message, "artifact", None)
    if artifact is not None:
        out["artifact"] = to_jsonable(artifact)
    return out


def to_jsonable(obj: Any) -> Any:
    """Convert LangGraph/LangChain values (messages, models, dataclasses) to JSON types;
    enums become their values and other values what :func:`leaf_json` makes of them, as
    JSON encoders write them, also as dict keys; anything else its ``repr``."""
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    if isinstance(obj, float):  # (a subclass as a float: orjson refuses one, np.float64)
        return obj if type(obj) is float else float(obj)
    if isinstance(obj, Mapping):
        return {k if type(k) is str else key_text(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset | deque):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, type):  # a class (a model's: its model_dump is unbound)
        return safe_repr(obj)
    if _is_message(obj):
        return message_to_dict(obj)
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return to_jsonable(dump())
    if dataclasses.is_dataclass(obj):
        # Field by field, not dataclasses.asdict(): it deep-copies every field, and one
        # that cannot be copied (a lock, a client) raised.
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return to_jsonable(obj.value)
    if is_v1_model(obj):
        return to_jsonable(obj.dict())
    return leaf_json(obj)


#: Values written as their text, as JSON encoders (and the LangGraph API's) write them.
# (An interface, IPv4Interface, is an address.)
_AS_TEXT = (uuid.UUID, PurePath, IPv4Address, IPv6Address, IPv4Network, IPv6Network)


def leaf_json(obj: Any) -> Any:
    """What JSON encoders, pydantic and the LangGraph API write for a value that holds no
    others: dates and times as ISO 8601, a ``Decimal`` as a number (an integer when it has
    no fraction), a ``timedelta`` as its seconds, a time zone as its name, bytes in base64,
    UUIDs, paths and IP addresses as their text, a regex as its pattern, an exception as
    ``{error, message}``, a numpy array or scalar as its values; anything else as its
    ``repr``."""
    if isinstance(obj, date | time):  # (a datetime is a date)
        return obj.isoformat()
    if isinstance(obj, _AS_TEXT):
        return str(obj)
    if isinstance(obj, Decimal):
        exponent = obj.as_tuple().exponent
        return int(obj) if isinstance(exponent, int) and exponent >= 0 else float(obj)
    if isinstance(obj, timedelta):
        return obj.total_seconds()
    if isinstance(obj, tzinfo):  # a ZoneInfo's key ("Europe/Paris"), a fixed one's "UTC+02:00"
        name = getattr(obj, "key", None) or obj.tzname(None)
        return name if isinstance(name, str) else safe_repr(obj)
    if isinstance(obj, bytes | bytearray | memoryview):
        return base64.b64encode(obj).decode()
    if isinstance(obj, Pattern):
        return obj.pattern
    if isinstance(obj, BaseException):
        return {"error": type(obj).__name__, "message": safe_str(obj)}
    tolist = getattr(obj, "tolist", None)
    if callable(tolist) and type(obj).__module__ == "numpy":
        # A numpy array or scalar: its values (as lists of Python numbers), as orjson's
        # OPT_SERIALIZE_NUMPY and the LangGraph API write them.
        return to_jsonable(tolist())
    return safe_repr(obj)


def is_v1_model(obj: Any) -> bool:
    """A pydantic v1 model (``pydantic.v1``, older LangChain objects): ``.dict()``, no
    ``model_dump()``."""
    return hasattr(type(obj), "__fields__") and callable(getattr(obj, "dict", None))


def key_text(key: Any) -> str:
    """A dict key as JSON encoders write it (orjson's ``OPT_NON_STR_KEYS``): ``null``,
    ``true``, numbers, ISO 8601 dates, UUIDs' text, an enum as its value's key; any other
    as its ``str``."""
    if isinstance(key, Enum):
        return key_text(key.value)
    if isinstance(key, str):
        return str.__str__(key)
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return int.__repr__(key)
    if isinstance(key, float):
        return orjson.dumps(key).decode()  # (NaN and infinities as null, as values)
    if isinstance(key, date | time):
        return key.isoformat()
    try:
        return str(key)
    except Exception:
        return safe_repr(key)


def safe_str(obj: Any) -> str:
    """``str(obj)``, or :func:`safe_repr` if it raises."""
    try:
        return str(obj)
    except Exception:
        return safe_repr(obj)


def safe_repr(obj: Any) -> str:
    """``repr(obj)``, or its type's name if its ``repr`` raises."""
    try:
        return repr(obj)
    except Exception as exc:
        return f"<{type(obj).__name__} object (its repr raised {type(exc).__name__})>"


def _token(text: str, message_id: Any, node: Any, ns: list[str] | None) -> Item:
    data: dict[str, Any] = {"text": text, "message_id": message_id, "node": node}
    if ns:
        data["ns"] = ns
    return (TOKEN, data)


def _from_message(message: Any, metadata: Mapping[str, Any], ns: list[str] | None) -> Item | None:
    node = metadata.get("langgraph_node")
    if type(message).__name__.endswith("Chunk"):
        content = message.content
        # (Most chunks hold none: a text chunk pays for one attribute read.)
        calls = getattr(message, "tool_call_chunks", None) and _tool_call_chunks(message)
        # The last chunk of a model's call says why it stopped (the others hold none).
        finish = finish_reason_of(getattr(message, "response_metadata", None))
        # Usage comes on a chunk or two (OpenAI's last, Anthropic's first and last), and
        # no whole message follows a streamed one: kept, the answer's usage adds up.
        usage = getattr(message, "usage_metadata", None)
        if not calls and finish is None and not usage:  # text alone, as most chunks
            if type(content) is str:
                if content:
                    return _token(content, message.id, node, ns)
            elif type(content) is list and len(content) == 1:
                text = text_of(content)
                if text:
                    return _token(text, message.id, node, ns)
        return _chunk_token(message, text_of(content), calls, finish, usage, node, ns)
    data: dict[str, Any] = {"message": message_to_dict(message), "node": node}
    if ns:
        data["ns"] = ns
    return (MESSAGE, data)


def _chunk_token(
    message: Any,
    text: str,
    calls: list[dict[str, Any]] | None,
    finish: str | None,
    usage: Any,
    node: Any,
    ns: list[str] | None,
) -> Item | None:
    """The ``token`` of a message chunk that is not text alone: its tool call fragments, its
    reasoning (a chunk of reasoning has no text; several blocks may hold both), why the
    model stopped (its last chunk, most often without text) and its usage, if any."""
    reasoning = reasoning_of(message.content, getattr(message, "additional_kwargs", None))
    if not (text or calls or reasoning or finish or usage):
        return None
    # LangGraph sends no whole message after a streamed one: a tool call's id, name and
    # arguments come only in these fragments.
    token = _token(text, message.id, node, ns)
    if reasoning:
        token[1]["reasoning"] = reasoning
    if calls:
        token[1]["tool_call_chunks"] = calls
    if finish:
        token[1]["finish_reason"] = finish
    if usage:
        token[1]["usage"] = to_jsonable(usage)
    return token


def _tool_call_chunks(message: Any) -> list[dict[str, Any]]:
    """A message chunk's tool call fragments: ``{id, name, args, index}``, ``args`` a piece
    of the arguments' JSON text."""
    chunks = getattr(message, "tool_call_chunks", None)
    if not isinstance(chunks, list):
        return []
    return [
        {key: to_jsonable(chunk.get(key)) for key in ("id", "name", "args", "index")}
        for chunk in chunks
        if isinstance(chunk, Mapping)
    ]


def chat_model_token(event: Mapping[str, Any]) -> Item | None:
    """The ``token`` of an ``astream_events`` ``on_chat_model_stream`` event, if it has text
    or reasoning."""
    chunk = (event.get("data") or {}).get("chunk")
    content = getattr(chunk, "content", "")
    text = text_of(content)
    reasoning = reasoning_of(content, getattr(chunk, "additional_kwargs", None))
    if not text and not reasoning:
        return None
    node = (event.get("metadata") or {}).get("langgraph_node")
    data = {"text": text, "message_id": getattr(chunk, "id", None), "node": node}
    if reasoning:
        data["reasoning"] = reasoning
    return (TOKEN, data)


def chat_model_text(event: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """``(text, message_id, node)`` of an ``on_chat_model_stream`` event that holds text
    only; None for any other (:func:`chat_model_token` reads it: reasoning, or nothing).

    Most events of a LangGraph stream are these, so the producer calls this directly.
    """
    chunk = (event.get("data") or {}).get("chunk")
    text = getattr(chunk, "content", "")
    if type(text) is not str:
        if isinstance(text, list) and len(text) > 1:
            return None  # blocks of several kinds, reasoning too: not one token's text
        text = text_of(text)
    if not text:
        return None
    node = (event.get("metadata") or {}).get("langgraph_node")
    return (text, getattr(chunk, "id", None), node)


def messages_text(item: tuple[Any, ...] | dict[str, Any], meta: tuple[Any, Any]) -> str | None:
    """The text of an ``astream(stream_mode="messages")`` item that holds text alone, of
    the message and node ``meta`` names (the last token's): ``(chunk, metadata)``, or
    ``("messages", (chunk, metadata))`` among other modes, or the root graph's
    ``((), "messages", (chunk, metadata))`` with ``subgraphs=True``, or the root graph's
    ``{"type": "messages", "ns": (), "data": (chunk, metadata)}`` with ``version="v2"``.
    None for any other item: :func:`normalize` reads it (a new message or node, a tool
    call, why the model stopped, usage, a subgraph's token...).

    Most items of such a stream are these, so the producer calls this directly.
    """
    # (Types first: == of another type's value may raise, as a numpy array's does.)
    pair: Any
    if isinstance(item, dict):
        kind, ns = item.get("type"), item.get("ns")
        if type(kind) is not str or kind != "messages" or type(ns) is not tuple or ns:
            return None
        pair = item.get("data")
    elif len(item) == 2:
        if type(item[0]) is not str:
            pair = item  # the "messages" mode alone
        elif item[0] == "messages":
            pair = item[1]
        else:
            return None
    elif (
        len(item) == 3
        and type(item[0]) is tuple
        and not item[0]
        and type(item[1]) is str
        and item[1] == "messages"
    ):
        pair = item[2]
    else:
        return None
    if type(pair) is not tuple or len(pair) != 2:
        return None
    message, metadata = pair
    text = getattr(message, "content", None)
    try:
        if (
            type(text) is str
            and text
            and type(metadata) is dict
            and type(message).__name__ == "AIMessageChunk"
            # (normalize() reads a bare pair as a message's only if it is one: _is_message)
            and (pair is not item or hasattr(message, "type"))
            # (The same object is equal first, as in the encoder's tuple comparison.)
            and ((message_id := message.id) is meta[0] or message_id == meta[0])
            and ((node := metadata.get("langgraph_node")) is meta[1] or node == meta[1])
            and not message.tool_call_chunks
            and not message.usage_metadata
            # (A provider's name, as langchain-openai puts in every chunk, is no finish
            # reason.)
            and type(response := message.response_metadata) is dict
            and _FINISH_FIELDS.isdisjoint(response)
        ):
            return text
    except AttributeError:  # a chunk of another class, without them: normalize() reads it
        pass
    return None


def _pauses(error: Any) -> bool:
    """True for LangGraph's ``GraphBubbleUp`` (a tool's ``interrupt()``, a ``Command`` to
    the parent graph): what a tool raises to hand over, not a failure. Only LangGraph
    raises it, so its module is loaded then."""
    errors = sys.modules.get("langgraph.errors")
    bubble_up = getattr(errors, "GraphBubbleUp", None)
    return isinstance(bubble_up, type) and isinstance(error, bubble_up)


def _from_langchain_event(event: Mapping[str, Any]) -> Item | None:
    kind = event["event"]
    data = event.get("data") or {}
    node = (event.get("metadata") or {}).get("langgraph_node")
    if kind == "on_chat_model_stream":
        return chat_model_token(event)
    if kind == "on_chat_model_end":
        output = data.get("output")
        if _is_message(output):
            return (MESSAGE, {"message": message_to_dict(output), "node": node})
        return None
    if kind == "on_tool_start":
        return (
            TOOL_START,
            {
                "name": event.get("name"),
                "run_id": str(event.get("run_id")),
                "input": to_jsonable(data.get("input")),
                "node": node,
            },
        )
    if kind == "on_tool_error" and _pauses(data.get("error")):
        return None  # paused, not failed: it runs again on resume, and reports its end then
    if kind in ("on_tool_end", "on_tool_error"):
        out: dict[str, Any] = {
            "name": event.get("name"),
            "run_id": str(event.get("run_id")),
            "node": node,
        }
        if kind == "on_tool_error":
            out["error"] = str(data.get("error"))
        else:
            out["output"] = to_jsonable(data.get("output"))
        return (TOOL_END, out)
    if kind == "on_custom_event":
        return (CUSTOM, {"name": event.get("name"), "data": to_jsonable(data), "node": node})
    if kind == "on_chain_stream" and event.get("parent_ids") == []:
        # The graph's own output (v2: the root run) is what astream would yield; of it,
        # only an interrupt is not shown by the events of the graph's nodes.
        chunk = data.get("chunk")
        if isinstance(chunk, Mapping) and "__interrupt__" in chunk:
            return (UPDATE, _update("updates", "__interrupt__", chunk["__interrupt__"], None))
    return None


def _from_mode(mode: str, payload: Any, ns: list[str] | None) -> Iterator[Item]:
    if mode == "messages":
        message, metadata = payload
        item = _from_message(message, metadata or {}, ns)
        if item is not None:
            yield item
        return
    if mode == "custom":
        data: dict[str, Any] = {"data": to_jsonable(payload)}
        if ns:
            data["ns"] = ns
        yield (CUSTOM, data)
        return
    if mode == "updates" and isinstance(payload, Mapping):
        for node, update in payload.items():
            yield (UPDATE, _update(mode, str(node), update, ns))
        return
    yield (UPDATE, _update(mode, None, payload, ns))


def _update(
    mode: str | None, node: str | None, payload: Any, ns: list[str] | None
) -> dict[str, Any]:
    data: dict[str, Any] = {"mode": mode, "node": node, "data": to_jsonable(payload)}
    if ns:
        data["ns"] = ns
    return data


def normalize(item: Any) -> Iterator[Item]:
    """Turn one item of a source into zero or more ``(type, data)`` pairs.

    Understands every shape LangGraph streams (see docs/events.md) and passes through
    :class:`Event` objects and ``{"type": ..., "data": ...}`` dicts of the vocabulary.
    """
    if isinstance(item, str):
        if item:
            yield _token(item, None, None, None)
        return
    if isinstance(item, Event):
        yield (item.type, item.data)
        return
    if isinstance(item, Mapping):
        kind = item.get("type")
        if isinstance(kind, str) and "ns" in item and "data" in item and kind in _STREAM_MODES:
            payload = item["data"]
            interrupts = item.get("interrupts")
            if interrupts and kind == "values":
                # version="v2" moves a "values" part's interrupts out of its data (a typed
                # state's model or dataclass): put them back where every other shape has them.
                if not isinstance(payload, Mapping):
                    payload = to_jsonable(payload)
                if isinstance(payload, Mapping) and "__interrupt__" not in payload:
                    payload = {**payload, "__interrupt__": interrupts}
            yield from _from_mode(kind, payload, list(item["ns"]) or None)
            return
        if isinstance(kind, str) and kind in EVENT_TYPES and isinstance(item.get("data"), Mapping):
            yield (kind, to_jsonable(item["data"]))
            return
        event = item.get("event")
        if isinstance(event, str) and event.startswith("on_"):
            found = _from_langchain_event(item)
            if found is not None:
                yield found
            return
        yield (UPDATE, _update(None, None, item, None))
        return
    if isinstance(item, tuple):
        if len(item) == 2 and _is_message(item[0]) and isinstance(item[1], Mapping):
            yield from _from_mode("messages", item, None)
            return
        if len(item) == 2 and isinstance(item[0], str) and item[0] in _STREAM_MODES:
            yield from _from_mode(item[0], item[1], None)
            return
        if len(item) == 3 and isinstance(item[0], tuple) and isinstance(item[1], str):
            yield from _from_mode(item[1], item[2], list(item[0]) or None)
            return
        if len(item) == 2 and isinstance(item[0], tuple):
            ns = list(item[0]) or None
            inner = item[1]
            if isinstance(inner, tuple) and len(inner) == 2 and _is_message(inner[0]):
                yield from _from_mode("messages", inner, ns)
            else:
                yield (UPDATE, _update(None, None, inner, ns))
            return
    if _is_message(item):
        found = _from_message(item, {}, None)
        if found is not None:
            yield found
        return
    yield (CUSTOM, {"data": to_jsonable(item)})
