"""A chat model that needs no network, no API key and no weights.

`OfflineChatModel` composes its replies from small templates, the conversation and the results
of the tools it called, then streams them token by token at a human-readable pace. Replies are a
pure function of the input messages, so tests can compare them, and it calls tools the way a
hosted model does (streamed `tool_call_chunks`), so LangGraph's `ToolNode` runs them unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.messages.utils import count_tokens_approximately
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

_TOKEN_RE = re.compile(r"\s*\w+|\s*[^\w\s]+|\s+")


def split_tokens(text: str) -> list[str]:
    """Split text into word-ish tokens that keep their leading space: they join back exactly."""
    return _TOKEN_RE.findall(text)


class OfflineChatModel(BaseChatModel):
    """Deterministic, template-driven chat model for demos and tests.

    It calls `calculator` for arithmetic, `current_time` for the time and `web_search` for
    "search ...", "look up ...", "what is ..." and "who ..." questions, when those tools are bound.
    """

    model_name: str = "offline"
    tokens_per_second: float = Field(default=40.0, ge=0)
    """Streaming pace; 0 streams as fast as possible."""

    @property
    def _llm_type(self) -> str:
        return "offline"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "tokens_per_second": self.tokens_per_second}

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools in OpenAI format; `tool_choice` is accepted and ignored."""
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # Merge the same chunks the stream would send, so invoke() and stream() agree exactly.
        return generate_from_stream(iter(self._chunks(messages, stop, kwargs.get("tools"))))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # Composing is pure CPU work that takes microseconds: no need for the default thread hop.
        return self._generate(messages, stop, **kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for i, chunk in enumerate(self._chunks(messages, stop, kwargs.get("tools"))):
            if i and self.tokens_per_second:
                time.sleep(1 / self.tokens_per_second)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for i, chunk in enumerate(self._chunks(messages, stop, kwargs.get("tools"))):
            if i and self.tokens_per_second:
                await asyncio.sleep(1 / self.tokens_per_second)
            yield chunk

    def _chunks(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        tools: list[dict[str, Any]] | None,
    ) -> list[ChatGenerationChunk]:
        """The whole reply, already cut into the chunks a streaming API would send."""
        tool_names = {t["function"]["name"] for t in tools or []}
        reply = compose_reply(messages, tool_names)
        text = reply.text
        for marker in stop or []:
            text = text.split(marker, 1)[0]
        chunks = [AIMessageChunk(content=token) for token in split_tokens(text)]
        if reply.tool_name:
            # Like OpenAI: the first fragment names the call, later ones carry argument JSON.
            arg_parts = split_tokens(json.dumps(reply.tool_args))
            chunks.append(
                AIMessageChunk(
                    content="",
                    tool_call_chunks=[
                        tool_call_chunk(name=reply.tool_name, args="", id=reply.call_id, index=0)
                    ],
                )
            )
            chunks.extend(
                AIMessageChunk(content="", tool_call_chunks=[tool_call_chunk(args=part, index=0)])
                for part in arg_parts
            )
        input_tokens = count_tokens_approximately(messages)
        output_tokens = len(chunks)
        chunks.append(
            AIMessageChunk(
                content="",
                chunk_position="last",
                response_metadata={
                    "model_name": self.model_name,
                    "finish_reason": "tool_calls" if reply.tool_name else "stop",
                },
                usage_metadata={
                    "input_tokens": input_tokens,
                    "output_tokens": output_tokens,
                    "total_tokens": input_tokens + output_tokens,
                },
            )
        )
        return [ChatGenerationChunk(message=chunk) for chunk in chunks]


# ---------------------------------------------------------------------------- composing replies


@dataclass(frozen=True)
class Reply:
    """What the model decided to say: text, a tool call, or both."""

    text: str = ""
    tool_name: str | None = None
    tool_args: dict[str, Any] = field(default_factory=dict)
    call_id: str = ""


_SUMMARY_REQUEST = re.compile(
    r"\bsummar(?:y|ize|ise)\b.*\b(?:conversation|chat|discussion|so far)\b"
    r"|\b(?:conversation|chat|discussion)\b.*\bsummar",
    re.IGNORECASE | re.DOTALL,
)
_NAME_INTRO = re.compile(r"\bmy name is ([A-Za-z][\w'-]*)", re.IGNORECASE)
_NAME_IN_SUMMARY = re.compile(r"\bthe user's name is ([A-Za-z][\w'-]*)", re.IGNORECASE)
_NAME_QUESTION = re.compile(
    r"\bwhat(?:'s| is) my name\b|\bwho am i\b|\b(?:know|remember) my name\b", re.IGNORECASE
)
_GREETING = re.compile(r"^\W*(?:hi|hello|hey|good (?:morning|afternoon|evening))\b", re.IGNORECASE)
_THANKS = re.compile(r"^\W*(?:thanks|thank you|thx|cheers)\b", re.IGNORECASE)
_TIME_QUESTION = re.compile(
    r"\b(?:what time|current time|time is it|time now|today's date|what day is it)\b",
    re.IGNORECASE,
)
_TIMEZONE = re.compile(r"\b([A-Z][A-Za-z_]+/[A-Z][A-Za-z_]+(?:/[A-Z][A-Za-z_]+)?)\b")
_SEARCH_QUESTION = re.compile(
    r"\b(?:search|look up|lookup|find out|what is|what's|what are|who|tell me about)\b",
    re.IGNORECASE,
)
_WORD_OPERATORS = (
    (re.compile(r"\bmultiplied by\b|\btimes\b", re.IGNORECASE), "*"),
    (re.compile(r"\bdivided by\b", re.IGNORECASE), "/"),
    (re.compile(r"\bplus\b", re.IGNORECASE), "+"),
    (re.compile(r"\bminus\b", re.IGNORECASE), "-"),
    (re.compile(r"\bto the power of\b", re.IGNORECASE), "^"),
)
_ARITHMETIC_RUN = re.compile(r"[\d.+\-*/^%\u00d7\u00f7()\s]+")
_HAS_OPERATION = re.compile(r"\d\s*[+\-*/^%\u00d7\u00f7]\s*[-(]*\s*\d")
_LEADING_FILLER = re.compile(
    r"^(?:(?:hi|hello|hey|ok|okay|so|well|please|now)\b[,!.]?\s*)*"
    r"(?:(?:can|could|would|will) you\s+)?(?:please\s+)?"
    r"(?:(?:tell me|explain|describe|show me|help me(?: with)?|"
    r"search(?: the (?:web|docs|documents))?(?: for)?|look up|lookup|find(?: out)?|"
    r"what(?: is|'s| are)|who(?: is|'s| are)|why (?:do|does|is|are))\s+)?(?:about\s+)?",
    re.IGNORECASE,
)
_HOW_TO = re.compile(r"^how (?:do|does|can|could|should|would) (?:i|we|you|one) ", re.IGNORECASE)
_PRONOUNS = {"i": "you", "my": "your", "me": "you", "mine": "yours", "i'm": "you're"}
_QUESTION_WORDS = frozenset(
    "what which who whom whose when where why how is are was were do does did can could "  # noqa: SIM905
    "should would will".split()
)


def _text(message: BaseMessage) -> str:
    return str(message.text).strip()


def _topic(question: str) -> str:
    """A phrase that reads well after "about": "How should I start?" -> "how to start"."""
    topic = _HOW_TO.sub("how to ", question.strip().rstrip("?.! "))
    topic = _LEADING_FILLER.sub("", topic) or topic
    words = [_PRONOUNS.get(word.lower(), word) for word in topic.split()]
    if words and words[0].lower() in _QUESTION_WORDS:
        words[0] = words[0].lower()
    return " ".join(words).strip(" ,;:") or "that"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sentences(text: str, limit: int) -> str:
    return " ".join(re.split(r"(?<=[.!?])\s+", text.strip())[:limit])


def _user_name(messages: Sequence[BaseMessage]) -> str | None:
    name = None
    for message in messages:
        pattern = _NAME_IN_SUMMARY if isinstance(message, SystemMessage) else _NAME_INTRO
        if isinstance(message, HumanMessage | SystemMessage):
            for match in pattern.finditer(_text(message)):
                name = match.group(1)[0].upper() + match.group(1)[1:]
    return name


def _questions(messages: Sequence[BaseMessage]) -> list[str]:
    """Topics of the user's substantive messages, oldest first."""
    return [
        _topic(_text(m))
        for m in messages
        if isinstance(m, HumanMessage)
        and not (_GREETING.search(_text(m)) or _THANKS.search(_text(m)))
        and not _NAME_INTRO.search(_text(m))
        and not _NAME_QUESTION.search(_text(m))
        and not _SUMMARY_REQUEST.search(_text(m))
    ]


def compose_reply(messages: Sequence[BaseMessage], tool_names: set[str]) -> Reply:
    """Decide the reply to `messages` given the names of the bound tools."""
    digest = hashlib.sha256("\x1e".join(f"{m.type}:{_text(m)}" for m in messages).encode()).digest()
    rng = random.Random(digest)
    if messages and isinstance(messages[-1], ToolMessage):
        return Reply(_answer_from_tools(messages))
    human = [m for m in messages if isinstance(m, HumanMessage)]
    question = _text(human[-1]) if human else ""
    name = _user_name(messages)

    if _SUMMARY_REQUEST.search(question):
        return Reply(_summary(parse_transcript(question) or messages[:-1]))
    if match := _NAME_INTRO.search(question):
        return Reply(
            f"Nice to meet you, {name or match.group(1)}! I'll remember your name for the rest of "
            "this conversation. What would you like to talk about?"
        )
    if _NAME_QUESTION.search(question):
        if name:
            return Reply(f"Your name is {name}; you told me earlier in this conversation.")
        return Reply("You haven't told me your name yet. What should I call you?")
    if _GREETING.search(question) and len(question.split()) <= 4:
        greeting = f"Hello, {name}!" if name else "Hello!"
        return Reply(
            f"{greeting} I'm the offline demo model: I run without an API key, so my answers come "
            "from templates, a few bundled documents and some simple tools. Ask me to search for "
            "something, to do some arithmetic, or what time it is."
        )
    if _THANKS.search(question):
        return Reply("You're welcome! Let me know if there's anything else you'd like to explore.")
    if call := _pick_tool(question, tool_names):
        tool_name, args = call
        return Reply(tool_name=tool_name, tool_args=args, call_id=f"call_{digest.hex()[:24]}")
    return Reply(_general_answer(question, _questions(messages)[:-1], rng))


def _pick_tool(question: str, tool_names: set[str]) -> tuple[str, dict[str, Any]] | None:
    if "calculator" in tool_names and (expression := _find_expression(question)):
        return "calculator", {"expression": expression}
    if "current_time" in tool_names and _TIME_QUESTION.search(question):
        zone = _TIMEZONE.search(question)
        return "current_time", {"timezone": zone[1] if zone else "UTC"}
    if "web_search" in tool_names and _SEARCH_QUESTION.search(question):
        return "web_search", {"query": _topic(question)}
    return None


def _find_expression(question: str) -> str | None:
    for pattern, symbol in _WORD_OPERATORS:
        question = pattern.sub(symbol, question)
    for run in _ARITHMETIC_RUN.finditer(question):
        candidate = run[0].strip(" .")
        # Bare hyphens between digits are dates and ids ("2024-01-05"), not subtraction.
        if _HAS_OPERATION.search(candidate) and not re.fullmatch(r"[\d.]+(?:-[\d.]+)+", candidate):
            return candidate
    return None


_OPENERS = (
    "Good question about {topic}.",
    "Let's dig into {topic}.",
    "Here's how I'd think about {topic}.",
    "Happy to help with {topic}.",
)
_ADVICE = (
    "The first step is to pin down what a good outcome looks like, because that decides which "
    "trade-offs are acceptable.",
    "Start small: one concrete example is worth more than a long list of requirements, and it "
    "shows quickly where the hard parts are.",
    "Most of the difficulty hides in the edge cases, such as what happens when something fails "
    "halfway through, so it pays to think about those early.",
    "Keep a single source of truth for any state involved; problems tend to appear when the same "
    "information lives in two places.",
    "Measure before you optimize, since a quick experiment usually settles a question faster "
    "than a debate does.",
    "Write down the assumptions you are making, because they are the first thing to revisit when "
    "the results surprise you.",
)
_CLOSERS = (
    "Since I'm the offline demo model, this is general advice rather than expert knowledge; ask "
    "me to search for a specific term and I'll look it up in the bundled documents.",
    "I'm running offline, so I can't go much deeper from memory, but if you ask me to look "
    "something up I'll check the bundled documents.",
    "For specifics, ask me to search for a term, or pick a hosted model in the model picker.",
)


def _general_answer(question: str, earlier: list[str], rng: random.Random) -> str:
    parts = [rng.choice(_OPENERS).format(topic=_topic(question))]
    parts += rng.sample(_ADVICE, 2)
    if earlier:
        parts.append(
            f"This also ties back to your earlier question about {earlier[-1]}: the same "
            "principles apply there."
        )
    parts.append(rng.choice(_CLOSERS))
    return " ".join(parts)


_RESULT_BLOCK = re.compile(
    r"\[\d+\] (?P<title>[^\n]+) \((?P<source>[^()\n]+)\)\n(?P<snippet>.+)", re.S
)


def _answer_from_tools(messages: Sequence[BaseMessage]) -> str:
    results: list[ToolMessage] = []
    for message in reversed(messages):
        if not isinstance(message, ToolMessage):
            break
        results.insert(0, message)
    calls = {
        call["id"]: call["args"]
        for message in messages
        if isinstance(message, AIMessage)
        for call in message.tool_calls
    }
    return " ".join(_describe_result(r, calls.get(r.tool_call_id, {})) for r in results)


def _describe_result(result: ToolMessage, args: dict[str, Any]) -> str:
    content = _text(result)
    if result.status == "error" or content.startswith("Error"):
        return f"I tried the {result.name} tool, but it failed: {content.rstrip('.')}."
    if result.name == "calculator":
        expression, _, value = content.rpartition(" = ")
        return (
            f"The answer is {value}. I worked out {expression or args.get('expression')} with the "
            "calculator tool, so you can rely on the arithmetic."
        )
    if result.name == "current_time":
        return f"Right now it is {content}."
    if result.name == "web_search":
        return _describe_search(args.get("query", "your question"), content)
    return f"The {result.name} tool returned: {_sentences(content, 3)}"


def _describe_search(query: str, content: str) -> str:
    hits = [m for block in content.split("\n\n") if (m := _RESULT_BLOCK.match(block))]
    if not hits:
        return (
            f"I searched for “{query}” but found nothing relevant. Try different keywords, or "
            "ask me something else."
        )
    first = hits[0]
    parts = [
        f"Here's what I found about {query}.",
        f"According to “{first['title']}”: {_sentences(first['snippet'], 2)}",
    ]
    if len(hits) > 1:
        parts.append(f"“{hits[1]['title']}” adds: {_sentences(hits[1]['snippet'], 1)}")
    sources = "; ".join(f"[{i}] {hit['source']}" for i, hit in enumerate(hits[:2], 1))
    parts.append(f"Sources: {sources}.")
    return " ".join(parts)


def _summary(messages: Sequence[BaseMessage]) -> str:
    parts: list[str] = []
    for message in messages:
        if isinstance(message, SystemMessage) and (
            match := re.search(r"summary[^:\n]*:\s*(.+)", _text(message), re.I | re.S)
        ):
            parts.append(match.group(1).strip())
    name = _user_name(messages)
    if name and not any(name in part for part in parts):
        parts.append(f"The user's name is {name}.")
    if topics := _questions(messages):
        then = "Then the user" if parts else "The user"
        parts.append(f"{then} asked about {_join(topics[-4:])}.")
    for result in (m for m in messages if isinstance(m, ToolMessage)):
        if result.name == "calculator" and result.status != "error":
            parts.append(f"The calculator gave {_text(result)}.")
        elif result.name == "web_search" and (hit := _RESULT_BLOCK.match(_text(result))):
            parts.append(f"A search found “{hit['title']}” ({hit['source']}).")
    return " ".join(parts) or "Nothing of substance has been discussed yet."


_TRANSCRIPT_MESSAGE = re.compile(r"<message type=([\"'])(\w+)\1>(.*?)</message>", re.S)
_TRANSCRIPT_CONTENT = re.compile(r"<content>(.*?)</content>", re.S)
_TRANSCRIPT_TOOL_CALL = re.compile(
    r"<tool_call id=([\"'])(.*?)\1 name=([\"'])(.*?)\3>(.*?)</tool_call>", re.S
)


def parse_transcript(text: str) -> list[BaseMessage]:
    """Messages back from `get_buffer_string(..., format="xml")`, which the agent summarizes."""
    messages: list[BaseMessage] = []
    pending_calls: list[tuple[str, str]] = []  # (id, name) of calls awaiting their results
    for _, role, body in _TRANSCRIPT_MESSAGE.findall(text):
        if role == "assistant":
            calls = [
                {
                    "id": html.unescape(c[1]),
                    "name": html.unescape(c[3]),
                    "args": json.loads(html.unescape(c[4])),
                }
                for c in _TRANSCRIPT_TOOL_CALL.findall(body)
            ]
            if content := _TRANSCRIPT_CONTENT.search(body):
                body = content.group(1)
            elif calls:
                body = ""
            messages.append(AIMessage(html.unescape(body), tool_calls=calls))
            pending_calls = [(c["id"], c["name"]) for c in calls]
        elif role == "tool":
            call_id, name = pending_calls.pop(0) if pending_calls else ("", "tool")
            messages.append(ToolMessage(html.unescape(body), tool_call_id=call_id, name=name))
        elif role == "system":
            messages.append(SystemMessage(html.unescape(body)))
        else:
            messages.append(HumanMessage(html.unescape(body)))
    return messages
