"""The agent's tools: offline and Tavily search, the calculator, the clock."""

from __future__ import annotations

import json
from functools import partial

import httpx
import pytest
from chat_service.tools import calculator, current_time, evaluate, search_documents, web_search
from langchain_core.messages import ToolMessage


@pytest.mark.parametrize(
    ("query", "title"),
    [
        ("Redis Streams", "Redis Streams"),
        ("how does an EventSource reconnect", "Server-Sent Events (SSE)"),
        ("asyncio task cancellation", "Python asyncio"),
        ("Who created Postgres?", "PostgreSQL"),
        ("HTTP/2 multiplexing", "HTTP/2"),
        ("resume a stream after a disconnect", "The resumable_stream library"),
    ],
)
def test_bm25_ranks_the_matching_document_first(query: str, title: str) -> None:
    assert search_documents(query)[0]["title"] == title


def test_search_snippet_is_the_best_paragraph() -> None:
    [top] = search_documents("consumer groups XACK", max_results=1)
    assert top["snippet"].startswith("Consumer groups")
    assert top["source"].startswith("https://redis.io/")


def test_search_with_no_match_is_empty() -> None:
    assert search_documents("quantum chromodynamics") == []


async def test_web_search_returns_text_for_the_model_and_results_as_artifact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TAVILY_API_KEY", raising=False)
    call = {"type": "tool_call", "id": "1", "name": "web_search", "args": {"query": "Redis"}}
    message = await web_search.ainvoke(call)

    assert isinstance(message, ToolMessage)
    assert message.content.startswith("[1] Redis Streams (https://redis.io/")
    assert message.artifact[0]["title"] == "Redis Streams"


async def test_web_search_uses_tavily_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    requests: list[httpx.Request] = []

    def tavily(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        result = {"title": "Streams", "content": "An append-only log.", "url": "https://x.test/"}
        return httpx.Response(200, json={"results": [result]})

    transport = httpx.MockTransport(tavily)
    monkeypatch.setenv("TAVILY_API_KEY", "tvly-test")
    monkeypatch.setattr(httpx, "AsyncClient", partial(httpx.AsyncClient, transport=transport))
    call = {"type": "tool_call", "id": "1", "name": "web_search", "args": {"query": "streams"}}
    message = await web_search.ainvoke(call)

    assert message.content == "[1] Streams (https://x.test/)\nAn append-only log."
    assert requests[0].headers["Authorization"] == "Bearer tvly-test"
    assert json.loads(requests[0].content) == {"query": "streams", "max_results": 3}


async def test_web_search_reports_tavily_errors_to_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(401))
    monkeypatch.setenv("TAVILY_API_KEY", "bad")
    monkeypatch.setattr(httpx, "AsyncClient", partial(httpx.AsyncClient, transport=transport))
    call = {"type": "tool_call", "id": "1", "name": "web_search", "args": {"query": "streams"}}
    message = await web_search.ainvoke(call)

    assert message.status == "error"
    assert "web search failed" in message.content


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("12*7", 84),
        ("2^10 + sqrt(16)", 1028),
        ("-(3 + 4) * 2", -14),
        ("7 // 2 + 7 % 2", 4),
        ("10 / 4", 2.5),
        ("3 \u00d7 4 \u00f7 6", 2),
        ("round(pi, 2)", 3.14),
        ("2^1000 // 2^999", 2),  # large, but within the bound
    ],
)
def test_evaluate_does_arithmetic(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("__import__('os').system('true')", "unsupported syntax"),
        ("(1).__class__", "unsupported syntax"),
        ("x + 1", "unsupported syntax"),
        ("9**9**9", "too large"),
        # Issue 12: every exponent is small, but the result of the inner power is huge; the
        # size of each step is bounded before computing it.
        ("(999^999)^999", "too large"),
        ("(10^3000) * (10^3000)", "too large"),
        ("(2^9000) * (2^9000) * 3", "too large"),
        ("(10^300)^20.5", "too large"),
        ("1/0", "division by zero"),
        ("2 +", "not an arithmetic expression"),
        ("1" * 300, "too long"),
    ],
)
def test_evaluate_rejects_anything_but_arithmetic(expression: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        evaluate(expression)


async def test_web_search_bounds_its_inputs() -> None:
    too_long = await web_search.ainvoke({"query": "redis " * 200})
    too_many = await web_search.ainvoke({"query": "redis", "max_results": 10_000})
    assert "too long" in too_long
    assert "between 1 and 10" in too_many


def test_calculator_tool_shows_the_expression_and_reports_errors_as_content() -> None:
    assert calculator.invoke({"expression": "12*7"}) == "12*7 = 84"
    # The largest result allowed still prints (str() of an int has a digit limit).
    assert calculator.invoke({"expression": "9^2500"}).startswith("9^2500 = 4038997629")
    assert "too large" in calculator.invoke({"expression": "(999^999)^999"})
    assert calculator.invoke({"expression": "0.1 + 0.2"}) == "0.1 + 0.2 = 0.3"
    assert calculator.invoke({"expression": "1/0"}) == "division by zero"


def test_current_time_in_a_timezone() -> None:
    assert current_time.invoke({"timezone": "Europe/Paris"}).endswith("(Europe/Paris)")
    assert current_time.invoke({"timezone": "Mars/Olympus"}) == "unknown timezone 'Mars/Olympus'"
