"""Request bodies, and how threads, messages and runs look in responses."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import BaseModel, Field

from ..runtime import Runtime
from ..threads import RunRecord, Thread

TITLE_CHARS = 60
#: The longest title a user may give a thread (a rename, a LangGraph client's metadata).
MAX_TITLE_CHARS = 200


class ChatMessage(BaseModel):
    message: str | None = Field(default=None, description="The user's message.")
    thread_id: str | None = Field(default=None, description="Omit to start a new thread.")
    model: str | None = Field(default=None, description="A model spec from GET /info.")
    use_cache: bool = Field(default=False, description="Replay a cached answer if any.")
    retry: bool = Field(default=False, description="Answer the last question again.")
    edit_last: bool = Field(
        default=False,
        description="Replace the thread's last message (and its answer) with this one.",
    )


class Regenerate(BaseModel):
    thread_id: str = Field(description="The thread whose last answer to replace.")
    model: str | None = Field(default=None, description="A model spec from GET /info.")


class Rename(BaseModel):
    chat_name: str = Field(min_length=1, max_length=MAX_TITLE_CHARS)


def message_view(message: Any) -> dict[str, Any] | None:
    """A checkpointed message as the API shows it."""
    text = str(message.text)
    if isinstance(message, HumanMessage):
        return {"id": message.id, "role": "user", "text": text}
    if isinstance(message, AIMessage):
        return {
            "id": message.id,
            "role": "assistant",
            "text": text,
            "tool_calls": [
                {"id": c.get("id"), "name": c["name"], "args": c.get("args", {})}
                for c in message.tool_calls
            ],
            "stopped": bool(message.response_metadata.get("stopped")),
        }
    if isinstance(message, ToolMessage):
        return {
            "id": message.id,
            "role": "tool",
            "name": message.name,
            "tool_call_id": message.tool_call_id,
            "status": message.status,
            "text": text[:2000],
        }
    if isinstance(message, SystemMessage):
        return {"id": message.id, "role": "summary", "text": text}
    return None


def thread_view(thread: Thread, *, streaming: bool = False) -> dict[str, Any]:
    return {
        "thread_id": thread.id,
        "title": thread.title,
        "archived": thread.archived,
        "created_at": thread.created_at,
        "updated_at": thread.updated_at,
        # An answer is queued or being written.
        "streaming": streaming,
    }


def stream_url(run: RunRecord) -> str:
    return f"/v1/chat/stream?thread_id={run.thread_id}&run={run.seq}"


def title_for(message: str) -> str:
    line = " ".join(message.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


async def history(runtime: Runtime, thread: Thread) -> dict[str, Any]:
    """The thread's messages and the state of its answers (``GET /v1/thread``)."""
    state = await runtime.agent.aget_state({"configurable": {"thread_id": thread.id}})
    messages = list(state.values.get("messages", []))
    pending = []
    for run in await runtime.store.runs(thread.id, "started", "queued"):
        if run.state == "started":
            info = await runtime.transport.info(run.stream_id)
            if info is None or info.status != "running":
                continue  # its stream has ended: the answer is in the checkpoint
            if await runtime.runs.settle_if_abandoned(run):
                # Its writer died (and never came back): it is recorded as its readers are
                # told, rather than shown running until somebody reads it.
                continue
        pending.append(run)
    active = pending[0] if pending else None
    if active is not None and active.human_id is not None:
        # The answer in flight is read from its stream: cut the history after its question,
        # so that a client replaying the stream shows nothing twice.
        ids = [m.id for m in messages]
        if active.human_id in ids:
            messages = messages[: ids.index(active.human_id) + 1]
        elif active.kind == "edit":
            # An edit not yet in the conversation (queued, or its fork is still to be
            # written) replaces the last question and what follows it: `active_run`'s
            # message takes its place.
            last = max(
                (i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=None
            )
            if last is not None:
                messages = messages[:last]
    views = [v for v in (message_view(m) for m in messages) if v is not None]
    latest = await runtime.store.current_run(thread.id)
    return {
        **thread_view(thread, streaming=active is not None),
        "messages": views,
        # The latest answer failed without a word (its server died): show it, with Retry.
        "last_error": {"run": latest.seq, "code": latest.error}
        if latest is not None and latest.state == "failed" and active is None
        else None,
        "active_run": None
        if active is None
        else {
            "run": active.seq,
            "status": "running" if active.state == "started" else "queued",
            "stream_url": stream_url(active),
            "message": active.message,
            "human_id": active.human_id,
        },
        "queued": [{"run": r.seq, "message": r.message} for r in pending[1:]],
    }
