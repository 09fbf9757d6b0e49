"""LangGraph graphs the tests share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode


def tool_loop(
    model: BaseChatModel, tools: Sequence[Any], checkpointer: Any = None, **tool_node: Any
) -> Any:
    """The usual agent: ``agent`` asks ``model``, ``tools`` runs the calls it made, until
    the model answers without calling any (compiled, with ``checkpointer``; ``tool_node``:
    the ``ToolNode``'s options)."""

    async def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    def route(state: MessagesState) -> str:
        last = state["messages"][-1]
        return "tools" if isinstance(last, AIMessage) and last.tool_calls else END

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode(list(tools), **tool_node))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route, ["tools", END])
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=checkpointer)


class BookingModel(BaseChatModel):
    """Calls `book`, then says what it returned."""

    @property
    def _llm_type(self) -> str:
        return "booking-test-model"

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        if isinstance(messages[-1], ToolMessage):
            message = AIMessage(content=f"done: {messages[-1].content}")
        else:
            call = {"id": "call_book", "name": "book", "args": {"q": "x"}}
            message = AIMessage(content="", tool_calls=[call])
        return ChatResult(generations=[ChatGeneration(message=message)])
