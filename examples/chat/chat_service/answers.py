"""Recording an answer: what a run streams, the cache, regenerate/edit and stopped text.

:class:`Answers` turns a run record into the source a ``StreamProducer`` run reads: the
agent's ``astream`` (tokens, tool calls and their results, finished messages), or a cached
answer replayed. It rewinds the thread's LangGraph checkpoints for regenerate and edit
("time travel": a fork from the last checkpoint before the last user message), caches a
first question's answer per user, and keeps what the user saw of a stopped answer.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    ToolMessage,
    messages_from_dict,
    messages_to_dict,
)

from .agent import Agent
from .cache import AnswerCache, cache_key
from .events import RUN_STARTED
from .offline_model import split_tokens
from .settings import Settings
from .threads import RunKind, RunRecord, ThreadStore

logger = logging.getLogger("chat_service.answers")


class NothingToRetry(Exception):
    """A retry was asked on a thread without a question to answer again."""


async def _always() -> bool:
    return True


@dataclass
class Recorder:
    """What a run streamed, for the cache and for saving a stopped answer."""

    events: list[list[Any]] = field(default_factory=list)
    messages: list[BaseMessage] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    cached: bool = False
    #: A replay streamed whole: its messages are being added to the thread.
    replayed: bool = False
    #: Asked when the run is cancelled: True if a user stopped it, False if it was cut by the
    #: server's shutdown or because it lost its stream (runs.py).
    stopped: Callable[[], Awaitable[bool]] = field(default=_always)

    def text(self, text: str) -> None:
        self.partial.append(text)
        if self.events and self.events[-1][0] == "text":
            self.events[-1][1] += text
        else:
            self.events.append(["text", text])


class Answers:
    """What runs stream, for one agent, thread store and cache."""

    def __init__(
        self, settings: Settings, *, store: ThreadStore, agent: Agent, cache: AnswerCache | None
    ) -> None:
        self.settings = settings
        self.store = store
        self.agent = agent
        self.cache = cache
        self.stats: Counter[str] = Counter()

    async def question(
        self, thread_id: str, message: str | None, kind: RunKind
    ) -> tuple[str | None, str, RunKind]:
        """(message, id of its HumanMessage, kind of the run); for a retry, the question to
        answer again (and, if it retries an edit that never took effect, kind ``edit``)."""
        if kind == "edit" and not await self._last_question(thread_id):
            raise NothingToRetry(thread_id)
        if kind == "regenerate":
            latest = await self.store.current_run(thread_id)
            if latest is not None and latest.state == "failed" and latest.message is not None:
                state = await self.agent.aget_state(_config(thread_id))
                if latest.human_id not in [m.id for m in state.values.get("messages", [])]:
                    # It failed before the question reached the conversation (no worker
                    # started it, its server died): ask it again, as it was asked. An edit
                    # still replaces the last question, rather than follow it.
                    again: RunKind = "edit" if latest.kind == "edit" else kind
                    return latest.message, f"human-{uuid.uuid4().hex}", again
        if message is not None:
            return message, f"human-{uuid.uuid4().hex}", kind
        state = await self.agent.aget_state(_config(thread_id))
        messages: list[AnyMessage] = state.values.get("messages", [])
        last = next((m for m in reversed(messages) if isinstance(m, HumanMessage)), None)
        if last is None or last.id is None:
            raise NothingToRetry(thread_id)
        return None, last.id, kind

    async def _last_question(self, thread_id: str) -> HumanMessage | None:
        state = await self.agent.aget_state(_config(thread_id))
        messages: list[AnyMessage] = state.values.get("messages", [])
        return next((m for m in reversed(messages) if isinstance(m, HumanMessage)), None)

    async def _edit_plan(self, job: RunRecord) -> tuple[dict[str, Any], Any]:
        """(inputs, config) of an edit: the new question, on a fork of the thread from the
        last checkpoint before its last question (which the fork then replaces)."""
        config = _config(job.thread_id, job.model)
        inputs = {"messages": [HumanMessage(job.message or "", id=job.human_id)]}
        last = await self._last_question(job.thread_id)
        if last is None:
            return inputs, config  # cleared meanwhile: just ask
        async for snapshot in self.agent.aget_state_history(config):
            if last.id not in [m.id for m in snapshot.values.get("messages", [])]:
                fork = {"configurable": {**snapshot.config["configurable"], "model": job.model}}
                return inputs, fork
        return inputs, config

    async def _retry_plan(self, job: RunRecord) -> tuple[dict[str, Any] | None, Any]:
        """(inputs, config) of a retry. It resumes the work a failed run left pending; if
        there is none (the answer ended, or was stopped), it forks the thread from the last
        checkpoint before the question and asks it again, which replaces the old turn.

        Forking (LangGraph's "time travel") rather than removing messages: after a cancel,
        the state can show messages that are only pending writes, which cannot be removed.
        """
        config = _config(job.thread_id, job.model)
        state = await self.agent.aget_state(config)
        if state.next:
            return None, config
        question = next((m for m in state.values.get("messages", []) if m.id == job.human_id), None)
        if question is None:
            return None, config  # cleared meanwhile: nothing to answer
        async for snapshot in self.agent.aget_state_history(config):
            if job.human_id not in [m.id for m in snapshot.values.get("messages", [])]:
                fork = {"configurable": {**snapshot.config["configurable"], "model": job.model}}
                return {"messages": [HumanMessage(question.content, id=job.human_id)]}, fork
        return None, config

    async def source(self, job: RunRecord, recorder: Recorder) -> AsyncIterator[Any]:
        entry = await self._cache_get(job)
        recorder.cached = entry is not None
        yield {
            "type": "custom",
            "data": {
                "name": RUN_STARTED,
                "data": {
                    "thread_id": job.thread_id,
                    "run": job.seq,
                    "model": job.model,
                    "cached": recorder.cached,
                },
            },
        }
        try:
            if entry is not None:
                self.stats["cache_hits"] += 1
                async for item in self._replay(job, entry, recorder):
                    yield item
            else:
                self.stats["model_runs"] += 1
                async for item in self._model(job, recorder):
                    yield item
        except asyncio.CancelledError:
            # Stopped: keep what the user saw, before the library writes `cancelled`, so a
            # client that reads the thread after the stream's end finds it there. (A replay
            # has written nothing yet: its question is kept even before its first word.)
            # A run cut by the server's shutdown, or because it lost its stream (fenced: Redis
            # lost its data, say), was not stopped: nothing is saved as stopped, and runs.py
            # records the run as failed, as its readers are told.
            if recorder.partial or recorder.cached:
                try:
                    async with asyncio.timeout(5.0):
                        if not await recorder.stopped():
                            logger.info("answer %s was cut, not stopped", job.stream_id)
                        elif recorder.replayed and entry is not None:  # stopped as it saved
                            await self._record(job, self._replayed_messages(job, entry))
                        else:
                            await self._save_stopped(job, "".join(recorder.partial))
                except Exception:
                    logger.exception("answer %s: could not save the stopped text", job.stream_id)
            raise

    async def _model(self, job: RunRecord, recorder: Recorder) -> AsyncIterator[Any]:
        """The agent's answer: its tokens, tool calls and results, finished messages."""
        config = _config(job.thread_id, job.model)
        inputs: dict[str, Any] | None = None
        if job.kind == "edit":
            inputs, config = await self._edit_plan(job)
        elif job.message is not None:
            inputs = {"messages": [HumanMessage(job.message, id=job.human_id)]}
        else:
            inputs, config = await self._retry_plan(job)
        # "messages" streams the agent's tokens (the summarizer's model call is tagged
        # nostream, so its tokens stay out); "updates" gives each node's finished messages.
        # With a list of modes, astream yields (mode, payload) pairs; its annotations
        # cannot say so.
        stream: AsyncIterator[Any] = self.agent.astream(
            cast(Any, inputs), config, stream_mode=["messages", "updates"]
        )
        async for mode, payload in stream:
            if mode == "messages":
                chunk, metadata = payload
                if metadata.get("langgraph_node") == "agent" and (text := chunk.text):
                    recorder.text(text)
                    yield text
                continue
            for node, update in (payload or {}).items():
                if node not in ("agent", "tools") or not update:
                    continue
                for message in update.get("messages", []):
                    recorder.messages.append(message)
                    items = _finished_message(message) if node == "agent" else _tool_result(message)
                    for item in items:
                        recorder.events.append([item["type"], item["data"]])
                        yield item
                    if node == "agent":
                        recorder.partial.clear()

    async def _replay(
        self, job: RunRecord, entry: dict[str, Any], recorder: Recorder
    ) -> AsyncIterator[Any]:
        """A cached answer, paced like the model; its messages join the thread at its end
        (stopped before, the text it streamed is saved instead: source())."""
        pace = self.settings.offline_tokens_per_second
        for kind, data in entry["events"]:
            if kind != "text":
                yield {"type": kind, "data": data}
                continue
            for i, token in enumerate(split_tokens(data)):
                if i and pace:
                    await asyncio.sleep(1 / pace)  # the replay's pace, like the model's
                recorder.partial.append(token)
                yield token
        recorder.replayed = True
        await self._record(job, self._replayed_messages(job, entry))

    @staticmethod
    def _replayed_messages(job: RunRecord, entry: dict[str, Any]) -> list[BaseMessage]:
        """The question and the cached answer's messages (with their ids: adding them again
        replaces them rather than add a copy)."""
        question = HumanMessage(job.message or "", id=job.human_id)
        return [question, *messages_from_dict(entry["messages"])]

    async def _record(self, job: RunRecord, messages: list[BaseMessage]) -> None:
        """Add ``messages`` to the thread as the agent's. A thread without a checkpoint
        gets an empty input checkpoint first, as a run of the graph does: the fork point
        regenerate and edit rewind to (the question is not in it)."""
        config = _config(job.thread_id, job.model)
        if (await self.agent.aget_state(config)).created_at is None:
            await self.agent.aupdate_state(config, {"messages": []}, as_node="__input__")
        await self.agent.aupdate_state(config, {"messages": messages}, as_node="agent")

    # -- cache and stopped answers --------------------------------------------------------

    async def _cache_get(self, job: RunRecord) -> dict[str, Any] | None:
        if self.cache is None or not job.use_cache or job.message is None:
            return None
        state = await self.agent.aget_state(_config(job.thread_id))
        if state.values.get("messages"):
            return None  # not a fresh thread: the answer depends on the conversation
        key = await self._cache_key(job)
        return None if key is None else await self.cache.get(key)

    async def _cache_key(self, job: RunRecord) -> str | None:
        thread = await self.store.get_thread(job.thread_id)
        if thread is None or job.message is None:
            return None
        return cache_key(thread.owner, job.model, job.message)

    async def cache_put(self, job: RunRecord, recorder: Recorder) -> None:
        if self.cache is None or job.message is None or not recorder.messages:
            return
        state = await self.agent.aget_state(_config(job.thread_id))
        if [m.id for m in state.values.get("messages", [])][:1] != [job.human_id]:
            return  # the thread had history (or was summarized): not a first question
        key = await self._cache_key(job)
        if key is not None:
            await self.cache.put(
                key, {"events": recorder.events, "messages": messages_to_dict(recorder.messages)}
            )

    async def _save_stopped(self, job: RunRecord, text: str) -> None:
        """Keep what the user saw of a stopped answer in the conversation."""
        config = _config(job.thread_id, job.model)
        state = await self.agent.aget_state(config)
        ids = {m.id for m in state.values.get("messages", [])}
        messages: list[BaseMessage] = []
        if job.message is not None and job.human_id not in ids:
            messages.append(HumanMessage(job.message, id=job.human_id))
        if text:
            messages.append(
                AIMessage(
                    text, id=f"stopped-{uuid.uuid4().hex}", response_metadata={"stopped": True}
                )
            )
        if messages:
            await self._record(job, messages)


def _config(thread_id: str, model: str | None = None) -> Any:
    configurable: dict[str, Any] = {"thread_id": thread_id}
    if model:
        configurable["model"] = model
    return {"configurable": configurable}


def _tool_result(message: Any) -> list[dict[str, Any]]:
    """The ``tool_end`` event of a tool node's message: the result of the call it answers
    (its ``id``), or its ``error`` (a tool that raised, with ``handle_tool_error``)."""
    if not isinstance(message, ToolMessage):
        return []
    data: dict[str, Any] = {"id": message.tool_call_id, "name": message.name or "tool"}
    if message.status == "error":
        data["error"] = message.text
    else:
        data["output"] = message.content
    return [{"type": "tool_end", "data": data}]


def _finished_message(message: Any) -> list[dict[str, Any]]:
    """The events of a finished AI message: its tool calls, then ``message``."""
    if not isinstance(message, AIMessage):
        return []
    items: list[dict[str, Any]] = [
        {
            "type": "tool_start",
            "data": {"id": call.get("id"), "name": call["name"], "args": call.get("args", {})},
        }
        for call in message.tool_calls
    ]
    items.append(
        {
            "type": "message",
            "data": {"id": message.id, "tool_calls": [c["name"] for c in message.tool_calls]},
        }
    )
    return items
