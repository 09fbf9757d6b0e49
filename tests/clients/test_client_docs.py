"""The backend snippets of docs/ai-sdk.md and docs/langgraph-sdk.md run as written,
served by uvicorn and driven by the real clients."""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from typing import Any

from langgraph_sdk import get_client

from tests._services import REPO_ROOT, uvicorn_server
from tests.clients.conftest import run_node


def snippet_app(page: str, tmp_path: Path) -> Any:
    text = (REPO_ROOT / "docs" / page).read_text()
    found = re.search(r"## Backend\n.*?```python\n(.*?)```", text, re.S)
    assert found, f"no backend snippet in docs/{page}"
    module = tmp_path / "app.py"
    module.write_text(found.group(1))
    return runpy.run_path(str(module))["app"]


def test_ai_sdk_page_backend(node_modules: Path, tmp_path: Path) -> None:
    with uvicorn_server(snippet_app("ai-sdk.md", tmp_path)) as url:
        seen = run_node(node_modules, "ai_sdk_docs.mjs", url)
    assert seen == {"text": "You said: hello docs ", "resumed": None}


async def test_langgraph_page_backend(tmp_path: Path) -> None:
    with uvicorn_server(snippet_app("langgraph-sdk.md", tmp_path)) as url:
        async with get_client(url=f"{url}/langgraph") as client:
            thread = await client.threads.create()
            parts = [
                part
                async for part in client.runs.stream(
                    thread["thread_id"],
                    "agent",
                    input={"messages": [{"role": "user", "content": "Hi!"}]},
                    stream_mode=["values", "messages-tuple"],
                )
            ]
    assert parts[0].event == "metadata"
    assert parts[-1].event == "end"
    final = [p.data for p in parts if p.event == "values"][-1]
    assert final["messages"][-1]["content"] == "Hello from the graph!"
    chunks = [p.data[0]["content"] for p in parts if p.event == "messages"]
    assert "".join(chunks) == "Hello from the graph!"
