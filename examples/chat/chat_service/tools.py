"""Tools the chat agent can call: web search, a calculator and a clock.

`web_search` asks Tavily when `TAVILY_API_KEY` is set and otherwise ranks the Markdown
documents bundled in `data/docs/` with BM25, so the example works with no network at all.
"""

from __future__ import annotations

import ast
import math
import operator
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, TypedDict
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from langchain_core.tools import BaseTool, StructuredTool, ToolException, tool

DOCS_DIR = Path(__file__).parent / "data" / "docs"
TAVILY_URL = "https://api.tavily.com/search"
MAX_RESULTS = 3
#: Largest query web_search accepts, in characters.
MAX_QUERY_CHARS = 500


class SearchResult(TypedDict):
    """One search hit, as returned in the tool's artifact."""

    title: str
    snippet: str
    source: str


# ---------------------------------------------------------------------------- search


_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it its me of on or so that "  # noqa: SIM905
    "the this to was what when where which who why will with you your about tell search look "
    "up find please".split()
)


def _terms(text: str) -> list[str]:
    """Lowercase word tokens without stopwords, with a crude plural strip (streams -> stream)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return [
        w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
        for w in words
        if w not in _STOPWORDS
    ]


@dataclass(frozen=True)
class _Document:
    title: str
    source: str
    paragraphs: list[str]
    terms: Counter[str]


class _Bm25Index:
    """Okapi BM25 over whole documents; title terms count twice (a poor man's BM25F)."""

    k1 = 1.5
    b = 0.75

    def __init__(self, documents: list[_Document]) -> None:
        self.documents = documents
        self.avg_len = sum(d.terms.total() for d in documents) / max(len(documents), 1)
        doc_freq: Counter[str] = Counter()
        for document in documents:
            doc_freq.update(document.terms.keys())
        n = len(documents)
        self.idf = {t: math.log(1 + (n - df + 0.5) / (df + 0.5)) for t, df in doc_freq.items()}

    def score(self, query: list[str], terms: Counter[str]) -> float:
        length_norm = self.k1 * (1 - self.b + self.b * terms.total() / self.avg_len)
        total = 0.0
        for term in query:
            if tf := terms.get(term, 0):
                total += self.idf[term] * tf * (self.k1 + 1) / (tf + length_norm)
        return total

    def search(self, query: str, limit: int) -> list[SearchResult]:
        """Best documents first, each with its best-matching paragraph as the snippet."""
        query_terms = _terms(query)
        scored = [(self.score(query_terms, d.terms), d) for d in self.documents]
        ranked = sorted((pair for pair in scored if pair[0] > 0), key=lambda pair: -pair[0])
        return [
            {"title": d.title, "snippet": self._best_paragraph(query_terms, d), "source": d.source}
            for _, d in ranked[:limit]
        ]

    def _best_paragraph(self, query: list[str], document: _Document) -> str:
        # max() keeps the first of equal scores, so ties go to the document's opening paragraph.
        return max(document.paragraphs, key=lambda p: self.score(query, Counter(_terms(p))))


def _load_documents(directory: Path) -> list[_Document]:
    documents = []
    for path in sorted(directory.glob("*.md")):
        lines = path.read_text(encoding="utf-8").strip().splitlines()
        title = lines[0].lstrip("# ").strip()
        source = f"docs/{path.name}"
        paragraphs: list[str] = []
        for block in "\n".join(lines[1:]).split("\n\n"):
            block = " ".join(block.split())
            if block.startswith("Source: "):
                source = block.removeprefix("Source: ")
            elif block:
                paragraphs.append(block)
        terms = Counter(_terms(" ".join(paragraphs)) + 2 * _terms(title))
        documents.append(_Document(title, source, paragraphs, terms))
    return documents


@cache
def _local_index() -> _Bm25Index:
    return _Bm25Index(_load_documents(DOCS_DIR))


def search_documents(query: str, max_results: int = MAX_RESULTS) -> list[SearchResult]:
    """Rank the bundled documents against `query` (the offline search backend)."""
    return _local_index().search(query, max_results)


def _tavily_request(query: str, max_results: int) -> dict[str, Any]:
    return {
        "url": TAVILY_URL,
        "json": {"query": query, "max_results": max_results},
        "headers": {"Authorization": f"Bearer {os.environ['TAVILY_API_KEY']}"},
        "timeout": 20.0,
    }


def _tavily_results(payload: dict[str, Any]) -> list[SearchResult]:
    return [
        {"title": r.get("title", ""), "snippet": r.get("content", ""), "source": r.get("url", "")}
        for r in payload.get("results", [])
    ]


def format_results(query: str, results: list[SearchResult]) -> str:
    """Render results as the numbered text block the model reads."""
    if not results:
        return f"No results for {query!r}."
    return "\n\n".join(
        f"[{i}] {r['title']} ({r['source']})\n{r['snippet']}" for i, r in enumerate(results, 1)
    )


def _check_query(query: str, max_results: int) -> None:
    if len(query) > MAX_QUERY_CHARS:
        raise ToolException(f"the query is too long (over {MAX_QUERY_CHARS} characters)")
    if not 1 <= max_results <= 10:
        raise ToolException("max_results must be between 1 and 10")


def _search_sync(query: str, max_results: int = MAX_RESULTS) -> tuple[str, list[SearchResult]]:
    _check_query(query, max_results)
    if os.environ.get("TAVILY_API_KEY"):
        import httpx

        try:
            response = httpx.post(**_tavily_request(query, max_results))
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise ToolException(f"web search failed: {exc}") from exc
        results = _tavily_results(response.json())
    else:
        results = search_documents(query, max_results)
    return format_results(query, results), results


async def _search_async(
    query: str, max_results: int = MAX_RESULTS
) -> tuple[str, list[SearchResult]]:
    _check_query(query, max_results)
    if not os.environ.get("TAVILY_API_KEY"):
        return _search_sync(query, max_results)  # CPU-only and fast: no thread needed
    import httpx

    request = _tavily_request(query, max_results)
    try:
        async with httpx.AsyncClient(timeout=request.pop("timeout")) as client:
            response = await client.post(**request)
            response.raise_for_status()
    except httpx.HTTPError as exc:
        raise ToolException(f"web search failed: {exc}") from exc
    results = _tavily_results(response.json())
    return format_results(query, results), results


web_search: BaseTool = StructuredTool.from_function(
    func=_search_sync,
    coroutine=_search_async,
    name="web_search",
    description="Search the web for up-to-date information. Returns numbered results with sources.",
    response_format="content_and_artifact",
    handle_tool_error=True,
)


# ---------------------------------------------------------------------------- calculator


_BINARY_OPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": abs,
    "round": round,
    "sqrt": math.sqrt,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
_MAX_LENGTH = 200
#: Largest integer a step may produce, in bits (about 3,000 digits). Every step's size is
#: bounded *before* it is computed: `(999^999)^999` would otherwise hold the GIL for seconds
#: and stall every stream of the process (issue 12).
_MAX_BITS = 10_000


def _check_size(op: ast.operator, left: int | float, right: int | float) -> None:
    """Refuse an integer operation whose result would exceed ``_MAX_BITS``.

    Float operations need no check: they overflow to an error or to ``inf`` at once.
    """
    if type(left) is not int or type(right) is not int:
        if isinstance(op, ast.Pow) and type(left) is int and left.bit_length() > 1023:
            raise ValueError("the base is too large")  # float(left) would overflow anyway
        return
    if isinstance(op, ast.Pow):
        if right < 0 or abs(left) <= 1:
            return  # a float, or 0, 1 or -1
        if right > _MAX_BITS or left.bit_length() * right > _MAX_BITS:  # an upper bound
            raise ValueError(f"{left}^{right} is too large to compute")
    elif isinstance(op, ast.Mult) and left.bit_length() + right.bit_length() > _MAX_BITS + 1:
        raise ValueError("the product is too large to compute")


def _eval_node(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    # `type(...) is` rather than isinstance: True and False are ints too.
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value  # type: ignore[return-value]
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_eval_node(node.operand))  # type: ignore[no-any-return]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        _check_size(node.op, left, right)
        return _BINARY_OPS[type(node.op)](left, right)  # type: ignore[no-any-return]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
    ):
        args = [_eval_node(arg) for arg in node.args]
        return _FUNCTIONS[node.func.id](*args)  # type: ignore[no-any-return]
    raise ValueError(f"unsupported syntax: {ast.unparse(node)!r}")


def evaluate(expression: str) -> int | float:
    """Evaluate an arithmetic expression safely (no `eval`); `^` means power.

    Raises:
        ValueError: the expression is not plain arithmetic, or cannot be computed.
    """
    if len(expression) > _MAX_LENGTH:
        raise ValueError("expression is too long")
    cleaned = expression.replace("^", "**").replace("\u00d7", "*").replace("\u00f7", "/")
    try:
        result = _eval_node(ast.parse(cleaned.strip(), mode="eval"))
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from exc
    except OverflowError as exc:
        raise ValueError("the result is too large") from exc
    except (ArithmeticError, TypeError) as exc:
        raise ValueError(str(exc)) from exc
    if isinstance(result, float) and result.is_integer() and abs(result) < 1e15:
        return int(result)
    return result


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as "12*7" or "sqrt(2) * (3 + 4)^2"."""
    try:
        result = evaluate(expression)
    except ValueError as exc:
        raise ToolException(str(exc)) from exc
    if isinstance(result, float):
        result = round(result, 10)
    return f"{expression.strip()} = {result}"


calculator.handle_tool_error = True


# ---------------------------------------------------------------------------- clock


@tool
def current_time(timezone: str = "UTC") -> str:
    """Get the current date and time in an IANA timezone such as "Europe/Paris"."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ToolException(f"unknown timezone {timezone!r}") from exc
    return datetime.now(zone).strftime(f"%A %d %B %Y, %H:%M:%S ({timezone})")


current_time.handle_tool_error = True

TOOLS: list[BaseTool] = [web_search, calculator, current_time]
"""The tools the agent binds by default."""
