"""The chat agent: a ReAct loop over tools, with old turns folded into a rolling summary.

    START ─► [summarize] ─► agent ─► tools ─► [summarize] ─► agent ─► ... ─► END

`summarize` runs only when the history exceeds the token budget. The model comes from
`config["configurable"]["model"]` (a spec such as "openai:gpt-4o-mini"), else `default_model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AnyMessage,
    BaseMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    get_buffer_string,
)
from langchain_core.messages.utils import count_tokens_approximately
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.constants import TAG_NOSTREAM
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from .models import DEFAULT_MODEL, ModelFactory
from .tools import TOOLS

Agent = CompiledStateGraph[MessagesState, None, MessagesState, MessagesState]

SYSTEM_PROMPT = (
    "You are the assistant of a demo chat app built on resumable_stream. Answer concisely. "
    "Use web_search for facts and cite the sources it returns, calculator for arithmetic and "
    "current_time for the date and time."
)
SUMMARY_PROMPT = (
    "Summarize the conversation below in at most five sentences, as a memory for yourself. "
    "Keep the user's name, facts, numbers and decisions; skip greetings. "
    "Reply with the summary only.\n\n{transcript}"
)
SUMMARY_PREFIX = "Summary of the earlier conversation: "
SUMMARY_TAG = "summarize"
"""Tag on the summarizer's model call, to filter it out of `astream_events`."""


def build_agent(
    model_factory: ModelFactory,
    *,
    checkpointer: BaseCheckpointSaver[Any] | None,
    summarize_after_tokens: int | None = 3000,
    tools: Sequence[BaseTool] = TOOLS,
    system_prompt: str = SYSTEM_PROMPT,
    default_model: str = DEFAULT_MODEL,
) -> Agent:
    """Compile the agent graph; its nodes are async, so run it with `ainvoke`/`astream`.

    Args:
        model_factory: turns a model spec into a chat model, e.g. `models.make_chat_model`.
            Each spec is built once and reused.
        checkpointer: where conversations persist, keyed by `configurable.thread_id`.
        summarize_after_tokens: approximate history size that triggers summarization;
            None disables it.
        tools: tools bound to the model and run by the `tools` node.
        system_prompt: instructions prepended to every model call (never stored).
        default_model: the spec of a run whose config names no model.
    """
    models: dict[str, BaseChatModel] = {}

    def model_for(config: RunnableConfig) -> BaseChatModel:
        spec = config.get("configurable", {}).get("model") or default_model
        if spec not in models:
            models[spec] = model_factory(spec)
        return models[spec]

    async def agent(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        model = model_for(config).bind_tools(tools)
        response = await model.ainvoke(_prompt(system_prompt, state["messages"]), config)
        return {"messages": [response]}

    async def summarize(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        old, _ = _split_history(state["messages"])
        # A transcript rather than the raw messages: some providers reject tool calls in the
        # history of a request that binds no tools.
        transcript = get_buffer_string(
            old, human_prefix="User", ai_prefix="Assistant", format="xml"
        )
        model = model_for(config).with_config(tags=[TAG_NOSTREAM, SUMMARY_TAG])
        prompt = HumanMessage(SUMMARY_PROMPT.format(transcript=transcript))
        response = await model.ainvoke([prompt], config)
        # add_messages replaces a message whose id already exists in place, so taking the oldest
        # message's id puts the summary at the head of the history; the rest of `old` is removed.
        summary = SystemMessage(
            SUMMARY_PREFIX + response.text.strip(), name="summary", id=old[0].id
        )
        return {"messages": [summary, *(RemoveMessage(id=m.id) for m in old[1:] if m.id)]}

    def route_before_model(state: MessagesState) -> Literal["summarize", "agent"]:
        messages = state["messages"]
        if summarize_after_tokens is None:
            return "agent"
        old, _ = _split_history(messages)
        if not any(not isinstance(m, SystemMessage) for m in old):
            return "agent"  # nothing left to fold: only the current turn (and a summary) remain
        too_long = count_tokens_approximately(messages) > summarize_after_tokens
        return "summarize" if too_long else "agent"

    graph = StateGraph(MessagesState)
    graph.add_node("summarize", summarize)
    graph.add_node("agent", agent)
    graph.add_node("tools", ToolNode(tools))
    graph.add_conditional_edges(START, route_before_model, ["summarize", "agent"])
    graph.add_edge("summarize", "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_conditional_edges("tools", route_before_model, ["summarize", "agent"])
    return graph.compile(checkpointer=checkpointer)


def _split_history(messages: Sequence[AnyMessage]) -> tuple[list[AnyMessage], list[AnyMessage]]:
    """(older turns, current turn): the current turn starts at the last user message."""
    starts = [i for i, m in enumerate(messages) if isinstance(m, HumanMessage)]
    cut = starts[-1] if starts else 0
    return list(messages[:cut]), list(messages[cut:])


def _prompt(system_prompt: str, messages: Sequence[BaseMessage]) -> list[BaseMessage]:
    """Fold stored system messages (the summary) into one leading system prompt.

    Several providers accept a single system message, and only at the start.
    """
    system = [system_prompt, *(str(m.text) for m in messages if isinstance(m, SystemMessage))]
    rest = [m for m in messages if not isinstance(m, SystemMessage)]
    return [SystemMessage("\n\n".join(system)), *rest]
