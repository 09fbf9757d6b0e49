"""The chat UI in headless Chromium, against the real server process.

The offline model streams at 40 tokens per second, so the page can be reloaded and stopped
in the middle of an answer. Screenshots go to tests/artifacts/chat-*.png.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from playwright.sync_api import Page, Route, expect, sync_playwright

from tests._services import REPO_ROOT, launch_chromium
from tests.examples._chat import ChatServer, eventually

ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
TIMEOUT = 20_000  # ms, for expect() and waits
ANSWER = ".msg.assistant"


@pytest.fixture
def paced_server(chat_servers: Callable[..., ChatServer]) -> ChatServer:
    return chat_servers(OFFLINE_TOKENS_PER_SECOND="40")


@pytest.fixture
def page(chromium_path: str) -> Iterator[Page]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, chromium_path)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 760})
            page = context.new_page()
            page.set_default_timeout(TIMEOUT)
            expect.set_options(timeout=TIMEOUT)
            yield page
        finally:
            browser.close()


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def thread_id_of(page: Page) -> str:
    return str(page.evaluate("location.hash")).split("=", 1)[1]


def saved_thread(page: Page, server: ChatServer, thread_id: str) -> dict[str, Any]:
    """The thread as the server has it, asked with the page's own session cookie."""
    response = page.request.get(f"{server.url}/v1/thread?thread_id={thread_id}")
    assert response.ok
    thread: dict[str, Any] = response.json()
    return thread


def test_send_stream_reload_stop_and_switch_threads(page: Page, paced_server: ChatServer) -> None:
    server = paced_server
    page.goto(server.url)
    expect(page.locator("#model")).to_have_value("offline")
    expect(page.locator('#model option[value="openai:gpt-4o-mini"]')).to_be_disabled()

    # Send a message and watch it stream: a tool call, then text arriving.
    send(page, "search for Redis Streams")
    answer = page.locator(ANSWER).last
    expect(answer.locator('.tool[data-name="web_search"]')).to_be_visible()
    expect(answer.locator(".text")).to_contain_text("According to")
    expect(answer).to_have_attribute("data-state", "streaming")
    expect(page.locator("#stop")).to_be_visible()
    page.screenshot(path=ARTIFACTS / "chat-streaming.png")
    seen_before_reload = answer.locator(".text").inner_text()

    # Reload mid-answer: the answer continues live where it was, with nothing repeated.
    page.reload()
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "streaming")
    expect(answer).to_have_attribute("data-state", "done")
    first_thread = thread_id_of(page)
    saved = saved_thread(page, server, first_thread)
    text = answer.locator(".text").inner_text()
    assert text.startswith(seen_before_reload)
    assert text == saved["messages"][-1]["text"]
    assert text.count("According to") == 1
    expect(page.locator(".msg.user")).to_have_count(1)
    expect(page.locator(ANSWER)).to_have_count(1)
    expect(answer.locator('.tool[data-state="done"]')).to_have_count(1)
    page.screenshot(path=ARTIFACTS / "chat-after-reload.png")

    # Stop an answer in flight: what was said stays, marked as stopped.
    send(page, "How should I structure a small side project?")
    answer = page.locator(ANSWER).last
    expect(answer.locator(".text")).to_contain_text("structure")
    page.click("#stop")
    expect(answer).to_have_attribute("data-state", "stopped")
    expect(answer.locator(".stopped-tag")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    page.screenshot(path=ARTIFACTS / "chat-stopped.png")
    stopped_text = answer.locator(".text").inner_text()
    saved = saved_thread(page, server, first_thread)
    assert saved["messages"][-1]["stopped"] is True
    assert saved["messages"][-1]["text"] == stopped_text

    # A second thread, then switch between the two from the list.
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    send(page, "what is 12*7")
    expect(page.locator(ANSWER).last).to_have_attribute("data-state", "done")
    second_thread = thread_id_of(page)
    items = page.locator("#threads .thread")
    expect(items).to_have_count(2)
    expect(items.first).to_have_attribute("data-thread-id", second_thread)  # newest first

    page.locator(f'.thread[data-thread-id="{first_thread}"] .name').click()
    expect(page.locator("#title")).to_have_text("search for Redis Streams")
    expect(page.locator(".msg.user")).to_have_count(2)
    expect(page.locator(ANSWER).last.locator(".stopped-tag")).to_be_visible()
    page.locator(f'.thread[data-thread-id="{second_thread}"] .name').click()
    expect(page.locator(ANSWER).last.locator(".text")).to_contain_text("The answer is 84")
    expect(page.locator(f'.thread[data-thread-id="{second_thread}"]')).to_have_class(
        "thread current"
    )
    page.screenshot(path=ARTIFACTS / "chat-threads.png")

    # Rename, then delete, from the thread list.
    current = page.locator(f'.thread[data-thread-id="{second_thread}"]')
    current.locator(".rename").click()
    page.fill(".rename-input", "Arithmetic")
    page.press(".rename-input", "Enter")
    expect(current.locator(".name")).to_have_text("Arithmetic")
    expect(page.locator("#title")).to_have_text("Arithmetic")
    page.once("dialog", lambda dialog: dialog.accept())
    current.locator(".delete").click()
    expect(items).to_have_count(1)
    expect(page.locator("#title")).to_have_text("New chat")
    gone = page.request.get(f"{server.url}/v1/thread?thread_id={second_thread}")
    assert gone.status == 404


def test_a_dropped_connection_resumes_by_itself(page: Page, paced_server: ChatServer) -> None:
    server = paced_server
    requests: list[str] = []
    delivered: list[str] = []

    def drop_first_stream(route: Route) -> None:
        requests.append(route.request.url)
        if delivered:
            route.continue_()
            return
        # Let the first response through for a few events only, then end it: for the page,
        # the connection dropped there. (fetch() waits for the whole answer; that is fine.)
        blocks = route.fetch().text().split("\n\n")[:8]
        delivered.extend(blocks)
        route.fulfill(
            status=200, content_type="text/event-stream", body="\n\n".join(blocks) + "\n\n"
        )

    page.route("**/v1/chat/stream*", drop_first_stream)
    page.goto(server.url)
    send(page, "search for PostgreSQL")
    answer = page.locator(ANSWER).last
    expect(page.locator("#status")).to_contain_text("reconnecting")
    page.screenshot(path=ARTIFACTS / "chat-reconnecting.png")
    expect(answer).to_have_attribute("data-state", "done")

    saved = saved_thread(page, server, thread_id_of(page))
    text = answer.locator(".text").inner_text()
    # One reconnection, by EventSource itself. It sent Last-Event-ID (Chromium adds the
    # header below Playwright's interception, so it is not visible here), and the server
    # resumed after it: a restart from the first event would repeat what was delivered.
    assert len(requests) == 2
    assert requests[1] == requests[0]
    first_chunks = "".join(
        json.loads(line.removeprefix("data: "))["text"]
        for block in delivered
        if "event: chunk" in block
        for line in block.splitlines()
        if line.startswith("data: ")
    )
    assert first_chunks and text.startswith(first_chunks)
    assert text.count(first_chunks) == 1
    assert text == saved["messages"][-1]["text"]
    expect(answer.locator(".tool")).to_have_count(1)  # the tool call was not shown twice
    expect(page.locator("#status")).to_have_text("")


def test_an_error_offers_retry(page: Page, paced_server: ChatServer) -> None:
    server = paced_server
    failed: list[bool] = []

    def fail_first_stream(route: Route) -> None:
        if failed:
            route.continue_()
            return
        failed.append(True)
        error = '{"type":"error","code":"producer_lost","message":"the model went away"}'
        route.fulfill(
            status=200,
            content_type="text/event-stream",
            body=f"id: 1-1-0\nevent: system\ndata: {error}\n\n",
        )

    page.route("**/v1/chat/stream*", fail_first_stream)
    page.goto(server.url)
    send(page, "what is 12*7")
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "error")
    expect(answer.locator(".error")).to_contain_text("the model went away")
    page.screenshot(path=ARTIFACTS / "chat-error.png")

    # The failure was staged in the browser: the real answer ran on; let it end, as a
    # failed one has, before retrying (the thread rejects a second message while busy).
    thread_id = thread_id_of(page)
    eventually(lambda: saved_thread(page, server, thread_id)["active_run"] is None, what="idle")
    answer.locator(".retry").click()
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer.locator(".text")).to_contain_text("The answer is 84")
    expect(page.locator(ANSWER)).to_have_count(1)  # the failed turn was replaced
    saved = saved_thread(page, server, thread_id_of(page))
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "tool", "assistant"]
