"""The test services themselves: each real process starts, answers, and stops."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests._services import (
    html_page,
    launch_chromium,
    launch_chromium_async,
    port_accepts,
    run_app_subprocess,
    uvicorn_command,
    uvicorn_server,
)

PAGE = b"""<!doctype html>
<html><head><title>resumable</title></head>
<body><h1 id="greeting">Hello</h1>
<script>document.getElementById("greeting").textContent += " from JS";</script>
</body></html>
"""


async def hello_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A plain ASGI app for the uvicorn helpers; run_app_subprocess imports it by name."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


async def endless_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Sends one chunk, then holds the response open until the client goes, like idle SSE."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass


@pytest.fixture
def page_url() -> Iterator[str]:
    """A stdlib HTTP server on a free loopback port that serves PAGE."""
    with html_page(PAGE) as url:
        yield url


def test_redis_url_answers_ping(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_redis_flush_empties_the_database(redis_url: str, request: pytest.FixtureRequest) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.set("left-over", "1")
        request.getfixturevalue("redis_flush")
        assert client.dbsize() == 0
    finally:
        client.close()


def test_redis_server_factory_can_kill_and_restart(redis_server_factory: Any) -> None:
    import redis

    server = redis_server_factory()
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1)
    try:
        assert client.ping() is True
        server.kill()
        assert server.process.returncode == -signal.SIGKILL
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
        server.restart()
        assert client.ping() is True
    finally:
        client.close()


def test_postgres_dsn_runs_select_1(postgres_dsn: str) -> None:
    import psycopg

    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT current_database()").fetchone() == ("resumable_stream_test",)


def test_chromium_renders_a_page_sync(chromium_path: str, page_url: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, chromium_path)
        try:
            page = browser.new_page()
            page.goto(page_url)
            assert page.text_content("#greeting") == "Hello from JS"
            assert page.title() == "resumable"
        finally:
            browser.close()


async def test_chromium_renders_a_page_async(chromium_path: str, page_url: str) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await launch_chromium_async(playwright, chromium_path)
        try:
            page = await browser.new_page()
            await page.goto(page_url)
            assert await page.text_content("#greeting") == "Hello from JS"
        finally:
            await browser.close()


def test_uvicorn_server_serves_an_app_object() -> None:
    with uvicorn_server(hello_app) as url:
        response = httpx.get(url)
    assert response.status_code == 200
    assert response.text == "hello"
    assert not port_accepts(int(url.rsplit(":", 1)[1]))


def test_uvicorn_server_stops_with_an_endless_stream_open() -> None:
    with httpx.Client() as client:
        with uvicorn_server(endless_app, graceful_timeout=0.2) as url:
            response = client.send(client.build_request("GET", url), stream=True)
            assert next(response.iter_bytes()).startswith(b"tick")
        response.close()


def test_run_app_subprocess_serves_until_killed() -> None:
    with run_app_subprocess(uvicorn_command("tests.test_services:hello_app")) as app:
        assert httpx.get(app.url).text == "hello"
        app.kill()
        assert app.process.returncode == -signal.SIGKILL
        with pytest.raises(httpx.ConnectError):
            httpx.get(app.url)
