"""The chat UI in headless Chromium, against the real server process.

The offline model streams at 40 tokens per second, so the page can be reloaded and stopped
in the middle of an answer. Screenshots go to each test's temporary directory (pytest prints
it on failure; `--basetemp` keeps them in one place).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from tests._services import launch_chromium
from tests.examples._chat import ChatServer, eventually
from tests.examples.conftest import redis_postgres_env

TIMEOUT = 20_000  # ms, for expect() and waits
ANSWER = ".msg.assistant"
DESKTOP = {"width": 1200, "height": 760}
PHONE = {"width": 390, "height": 844}

PageFactory = Callable[..., Page]


@pytest.fixture
def paced_server(chat_servers: Callable[..., ChatServer]) -> ChatServer:
    return chat_servers(OFFLINE_TOKENS_PER_SECOND="40")


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, chromium_path)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def new_page(browser: Browser) -> Iterator[PageFactory]:
    """`new_page(viewport=..., color_scheme=...)`: a page in a fresh context (its own
    cookies: a user of its own). Any uncaught script error fails the test."""
    contexts = []
    errors: list[str] = []

    def make(viewport: dict[str, int] = DESKTOP, color_scheme: Any = "light") -> Page:
        context = browser.new_context(viewport=viewport, color_scheme=color_scheme)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT)
        page.on("pageerror", lambda error: errors.append(str(error)))
        return page

    expect.set_options(timeout=TIMEOUT)
    try:
        yield make
    finally:
        for context in contexts:
            context.close()
    assert errors == []


@pytest.fixture
def page(new_page: PageFactory) -> Page:
    return new_page()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    path = tmp_path / "screenshots"
    path.mkdir()
    return path


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


def source_of(answer: Any) -> str:
    """The Markdown source of an answer that has ended (the page keeps it on the element)."""
    return str(answer.locator(".text").get_attribute("data-source"))


def sse(*events: tuple[str, dict[str, Any]]) -> str:
    """An SSE body of `(event, data)` pairs, with ids the way the server writes them."""
    return "".join(
        f"id: 1-{n}-0\nevent: {name}\ndata: {json.dumps(data)}\n\n"
        for n, (name, data) in enumerate(events, 1)
    )


def test_send_stream_reload_stop_and_switch_threads(
    page: Page, paced_server: ChatServer, shots: Path
) -> None:
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
    expect(page.locator(".regenerate, .edit")).to_have_count(0)  # not while streaming
    page.screenshot(path=shots / "streaming.png")
    # What was shown so far, up to where Markdown could still change it (an open `code`).
    seen_before_reload = answer.locator(".text").inner_text().split("`")[0].rsplit(" ", 2)[0]

    # Reload mid-answer: the answer continues live where it was, with nothing repeated.
    page.reload()
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "streaming")
    expect(answer).to_have_attribute("data-state", "done")
    first_thread = thread_id_of(page)
    saved = saved_thread(page, server, first_thread)
    assert source_of(answer) == saved["messages"][-1]["text"]
    text = answer.locator(".text").inner_text()
    assert text.startswith(seen_before_reload)
    assert text.count("According to") == 1
    expect(page.locator(".msg.user")).to_have_count(1)
    expect(page.locator(ANSWER)).to_have_count(1)
    expect(answer.locator('.tool[data-state="done"]')).to_have_count(1)

    # The tool call is collapsed to its name and input; open, it shows what the tool returned.
    tool = answer.locator(".tool")
    expect(tool).not_to_have_attribute("open", "")
    expect(tool.locator("summary")).to_have_text("web_searchquery: Redis Streams")
    expect(tool.locator(".tool-result")).to_be_hidden()
    tool.locator("summary").click()
    expect(tool.locator(".tool-input")).to_have_text('{\n  "query": "Redis Streams"\n}')
    tool_message = next(m for m in saved["messages"] if m["role"] == "tool")
    expect(tool.locator(".tool-result")).to_have_text(tool_message["text"])

    # Stop an answer in flight: what was said stays, marked as stopped.
    send(page, "How should I structure a small side project?")
    answer = page.locator(ANSWER).last
    expect(answer.locator(".text")).to_contain_text("structure")
    with page.expect_request("**/v1/chat/stop?*") as stopping:
        page.click("#stop")
    # The stop names the answer shown (the thread's second): one clicked as it ends does
    # not stop an answer started after it elsewhere.
    assert parse_qs(urlsplit(stopping.value.url).query)["run"] == ["2"]
    expect(answer).to_have_attribute("data-state", "stopped")
    expect(answer.locator(".stopped-tag")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    page.screenshot(path=shots / "stopped.png")
    saved = saved_thread(page, server, first_thread)
    assert saved["messages"][-1]["stopped"] is True
    assert saved["messages"][-1]["text"] == source_of(answer)

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
    expect(answer).to_have_attribute("data-state", "done")

    saved = saved_thread(page, server, thread_id_of(page))
    text = source_of(answer)
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


def test_an_error_offers_retry_and_clears_stale_status(
    page: Page, paced_server: ChatServer, shots: Path
) -> None:
    server = paced_server
    staged: list[str] = []

    def fail_first_stream(route: Route) -> None:
        staged.append(route.request.url)
        if len(staged) == 1:
            # The connection ends before any event: the page says it is reconnecting.
            route.fulfill(status=200, content_type="text/event-stream", body=": hello\n\n")
        elif len(staged) == 2:
            error = {"type": "error", "code": "producer_lost", "message": "the model went away"}
            route.fulfill(
                status=200,
                content_type="text/event-stream",
                body=sse(("chunk", {"text": "Half an"}), ("system", error)),
            )
        else:
            route.continue_()

    page.route("**/v1/chat/stream*", fail_first_stream)
    page.goto(server.url)
    send(page, "what is 12*7")
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "error")
    expect(answer.locator(".error")).to_contain_text("the model went away")
    expect(answer.locator(".text")).to_have_text("Half an")
    assert len(staged) == 2  # the page did reconnect after the first, empty response
    expect(page.locator("#status")).to_have_text("")  # "reconnecting…" is stale now
    expect(answer.locator(".regenerate")).to_have_count(0)  # Retry is the way out
    page.screenshot(path=shots / "error.png")

    # The failure was staged in the browser: the real answer ran on; let it end, as a
    # failed one has, before retrying (the thread rejects a second message while busy).
    thread_id = thread_id_of(page)
    eventually(lambda: saved_thread(page, server, thread_id)["active_run"] is None, what="idle")
    answer.locator(".retry").click()
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer.locator(".text")).to_contain_text("The answer is 84")
    expect(page.locator(ANSWER)).to_have_count(1)  # the failed turn was replaced
    expect(page.locator(".error")).to_have_count(0)
    saved = saved_thread(page, server, thread_id_of(page))
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "tool", "assistant"]


def test_a_server_killed_mid_answer_shows_the_error_with_retry(
    page: Page, paced_server: ChatServer
) -> None:
    server = paced_server
    page.goto(server.url)
    send(page, "How should I structure a small side project?")
    answer = page.locator(ANSWER).last
    expect(answer.locator(".text")).to_contain_text("structure")
    server.kill()
    server.start()

    # EventSource reconnects by itself; the restarted server ends the lost answer with an
    # error event, which the page shows with Retry, and the thread takes messages again.
    expect(answer).to_have_attribute("data-state", "error")
    expect(answer.locator(".error")).to_contain_text("restarted")
    expect(page.locator("#status")).to_have_text("")
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_hidden()

    # After a reload, the saved thread says the same.
    page.reload()
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "error")
    expect(answer.locator(".error")).to_contain_text("restarted while writing this answer")
    answer.locator(".retry").click()
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "done")
    expect(page.locator(ANSWER)).to_have_count(1)
    expect(page.locator(".error")).to_have_count(0)
    saved = saved_thread(page, server, thread_id_of(page))
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][-1]["text"] == source_of(answer)


def test_a_question_saved_without_an_answer_offers_retry(
    page: Page, chat_servers: Callable[..., ChatServer], shots: Path
) -> None:
    # Stopped before its first word (the model is slowly writing a tool call), an answer
    # leaves nothing in the thread but the question.
    server = chat_servers(OFFLINE_TOKENS_PER_SECOND="2")
    started = page.request.post(
        f"{server.url}/v1/chat/message", data={"message": "search for Redis Streams"}
    ).json()
    thread_id = started["thread_id"]
    assert page.request.post(f"{server.url}/v1/chat/stop?thread_id={thread_id}").ok
    eventually(lambda: saved_thread(page, server, thread_id)["active_run"] is None, what="idle")
    assert [m["role"] for m in saved_thread(page, server, thread_id)["messages"]] == ["user"]

    page.goto(f"{server.url}/#thread={thread_id}")
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "unanswered")
    expect(answer.locator(".notice")).to_contain_text("No answer was saved")
    expect(page.locator(".regenerate")).to_have_count(0)
    page.screenshot(path=shots / "unanswered.png")
    answer.locator(".retry").click()  # asks again: the (slow) answer streams
    expect(page.locator(ANSWER)).to_have_count(1)
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "streaming")
    expect(answer.locator('.tool[data-name="web_search"]')).to_be_visible()
    assert saved_thread(page, server, thread_id)["active_run"] is not None


def test_regenerate_and_edit_the_last_message(
    page: Page, chat_servers: Callable[..., ChatServer], shots: Path
) -> None:
    server = chat_servers()
    page.goto(server.url)
    send(page, "How should I structure a small side project?")
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "done")
    thread_id = thread_id_of(page)
    first = source_of(answer)

    # Regenerate: the last answer is replaced by a new one, here and in the saved thread.
    expect(page.locator(".regenerate")).to_have_count(1)
    answer.evaluate("element => { element.dataset.old = 'yes'; }")
    answer.locator(".regenerate").click()
    expect(page.locator(f"{ANSWER}[data-old]")).to_have_count(0)
    expect(page.locator(ANSWER)).to_have_count(1)
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "done")
    saved = saved_thread(page, server, thread_id)
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][-1]["text"] == source_of(answer)
    assert source_of(answer) == first  # the offline model answers the same question alike

    # Edit: the last question is replaced, and answered; Escape would have cancelled.
    page.locator(".msg.user .edit").click()
    editor = page.locator(".msg.user .edit-input")
    expect(editor).to_have_value("How should I structure a small side project?")
    editor.press("Escape")
    expect(page.locator(".msg.user .bubble")).to_have_text(
        "How should I structure a small side project?"
    )
    page.locator(".msg.user .edit").click()
    editor.fill("what is 6*7")
    page.screenshot(path=shots / "editing.png")
    editor.press("Enter")
    expect(page.locator(".msg.user .bubble")).to_have_text("what is 6*7")
    expect(page.locator(ANSWER)).to_have_count(1)
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer.locator(".text")).to_contain_text("The answer is 42")
    saved = saved_thread(page, server, thread_id)
    assert [(m["role"], m["text"]) for m in saved["messages"] if m["role"] == "user"] == [
        ("user", "what is 6*7")
    ]
    assert saved["messages"][-1]["text"] == source_of(answer)
    # Only the last question and the last answer have these.
    expect(page.locator(".edit")).to_have_count(1)
    expect(page.locator(".regenerate")).to_have_count(1)


def test_the_thread_list_marks_streaming_threads(
    new_page: PageFactory, chat_servers: Callable[..., ChatServer]
) -> None:
    # Slow enough for a second tab to open while the answer streams.
    server = chat_servers(OFFLINE_TOKENS_PER_SECOND="10")
    page = new_page()
    page.goto(server.url)
    send(page, "How should I structure a small side project?")
    answer = page.locator(ANSWER).last
    expect(answer.locator(".text")).not_to_be_empty()
    thread_id = thread_id_of(page)
    item = page.locator(f'.thread[data-thread-id="{thread_id}"]')
    expect(item.locator(".live")).to_be_visible()

    # Another tab of the same user, on a new chat, sees the marker too, and sees it go
    # when the answer ends elsewhere.
    other = new_page()
    other.context.add_cookies(page.context.cookies())
    other.goto(server.url)
    other_item = other.locator(f'.thread[data-thread-id="{thread_id}"]')
    expect(other_item.locator(".live")).to_be_visible()
    expect(answer).to_have_attribute("data-state", "done")
    expect(item.locator(".live")).to_have_count(0)
    expect(other_item.locator(".live")).to_have_count(0)
    expect(other_item).to_be_visible()


def test_markdown_from_the_model_is_rendered_and_its_html_stays_text(
    page: Page, chat_servers: Callable[..., ChatServer]
) -> None:
    server = chat_servers()
    page.goto(server.url)

    # A real answer with Markdown in it: the search result has `code` and bare URLs.
    send(page, "search for Redis Streams")
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer.locator(".text code").first).to_have_text("<milliseconds>-<sequence>")
    link = answer.locator(
        '.text a[href="https://redis.io/docs/latest/develop/data-types/streams/"]'
    )
    expect(link).to_have_text("https://redis.io/docs/latest/develop/data-types/streams/")
    expect(link).to_have_attribute("target", "_blank")
    expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
    assert "`" not in answer.locator(".text").inner_text()
    # The stream has the tool call; its result comes from the saved thread once it ends.
    answer.locator(".tool summary").click()
    saved = saved_thread(page, server, thread_id_of(page))
    tool_message = next(m for m in saved["messages"] if m["role"] == "tool")
    expect(answer.locator(".tool-result")).to_have_text(tool_message["text"])

    # The offline model repeats the question's topic: its HTML comes back in the answer,
    # and is shown as the text it is. Nothing runs, nothing loads, no unsafe link survives.
    question = (
        "How should I handle <script>window.pwned = 1</script>, **bold** text, "
        "[a link](javascript:window.pwned=3) and <img src=x onerror=window.pwned=2>?"
    )
    send(page, question)
    expect(page.locator(ANSWER)).to_have_count(2)
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "done")
    text = answer.locator(".text")
    expect(text).to_contain_text("<script>window.pwned = 1</script>")
    expect(text).to_contain_text("<img src=x onerror=window.pwned=2>")
    expect(text.locator("strong")).to_have_text("bold")
    expect(text.locator("script, img, [onerror]")).to_have_count(0)
    expect(text.locator("a")).to_have_text("a link")
    assert text.locator("a").get_attribute("href") is None
    text.locator("a").click()
    assert page.evaluate("window.pwned") is None
    # The question is shown exactly as typed, not as Markdown.
    expect(page.locator(".msg.user .bubble").last).to_have_text(question)


def _html(n: int) -> str:
    """Markup that runs a script (setting `window.__xss`) or loads from another origin, if
    it is ever parsed as HTML."""
    return (
        f'<img src="http://127.0.0.1:9/leak?{n}" onerror="window.__xss={n}">'
        f"<script>window.__xss={n}</script><u>{n}</u>"
    )


def test_text_from_the_server_is_shown_as_text_everywhere(
    page: Page, chat_servers: Callable[..., ChatServer]
) -> None:
    """Whatever the server sends (a model's answer, tool calls and results, titles, model
    names, error messages) shows as text: nothing in it runs or loads."""
    server = chat_servers()
    thread_id = "a" * 32
    stream_url = f"/v1/chat/stream?thread_id={thread_id}&run=1"
    info = {
        "transport": _html(1),
        "database": "sqlite",
        "busy_policy": "reject",
        "worker_mode": False,
        "default_model": "offline",
        "models": [
            {"spec": "offline", "available": True, "reason": None},
            {"spec": _html(2), "available": False, "reason": _html(3)},
        ],
    }
    call = {"id": "call-1", "name": _html(4), "args": {_html(5): _html(6)}}
    answer_text = "Answer " + _html(7) + " [a link](javascript:window.__xss=8)"
    thread = {
        "thread_id": thread_id,
        "title": _html(9),
        "active_run": None,
        "last_error": {"code": _html(10)},
        "messages": [
            {"id": "s", "role": "summary", "text": "Summary: " + _html(11)},
            {"id": "h1", "role": "user", "text": _html(12)},
            {"id": "ai1", "role": "assistant", "text": "", "tool_calls": [call]},
            {
                "id": "t1",
                "role": "tool",
                "tool_call_id": "call-1",
                "status": "ok",
                "text": _html(13),
            },
            {"id": "ai2", "role": "assistant", "text": answer_text, "tool_calls": []},
        ],
    }
    listed = {"threads": [{"thread_id": thread_id, "title": _html(14), "streaming": False}]}
    # The answer's HTML, cut as a model's tokens cut it.
    chunks = [answer_text[i : i + 3] for i in range(0, len(answer_text), 3)]

    def json_route(body: Any, status: int = 200) -> Callable[[Route], None]:
        return lambda route: route.fulfill(status=status, json=body)

    page.route("**/info", json_route(info))
    page.route("**/v1/threads", json_route(listed))
    page.route("**/v1/thread?*", json_route(thread))
    page.route(
        "**/v1/chat/message",
        json_route({"thread_id": thread_id, "run": 1, "stream_url": stream_url}, 202),
    )
    page.route(
        "**/v1/chat/stream*",
        lambda route: route.fulfill(
            status=200,
            content_type="text/event-stream",
            body=sse(
                ("system", {"type": "start", "run": 1, "model": _html(15), "cached": False}),
                ("tool_call", call),
                *(("chunk", {"text": chunk}) for chunk in chunks),
                ("system", {"type": "error", "message": _html(16)}),
            ),
        ),
    )
    elsewhere: list[str] = []
    page.on(
        "request",
        lambda request: (
            None if request.url.startswith(server.url) else elsewhere.append(request.url)
        ),
    )
    page.goto(server.url)
    expect(page.locator("#service-info")).to_contain_text(_html(1))
    expect(page.locator("#model option[disabled]")).to_have_text(_html(2))
    send(page, _html(17))
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "error")
    expect(page.locator("#title")).to_contain_text("<img")
    expect(page.locator(".msg.user .bubble")).to_have_text(_html(17))
    expect(answer.locator(".tool-name")).to_have_text(_html(4))
    expect(answer.locator(".tool-result")).to_have_text(_html(13))  # from the saved thread
    expect(answer.locator(".badge")).to_have_text(_html(15))
    expect(answer.locator(".error")).to_contain_text(_html(16))
    expect(answer.locator(".text")).to_contain_text(_html(7))
    expect(page.locator("#threads .name")).to_have_text(_html(14))

    # The same, as the saved thread shows after a reload; and an error line from the API.
    page.reload()
    expect(page.locator("#title")).to_have_text(_html(9))
    expect(page.locator(".msg.summary")).to_contain_text(_html(11))
    expect(page.locator(".msg.user .bubble")).to_have_text(_html(12))
    expect(page.locator(".tool-result")).to_have_text(_html(13))
    expect(page.locator(".msg.assistant .error")).to_contain_text(_html(10))
    page.unroute("**/v1/chat/message")
    page.route("**/v1/chat/message", json_route({"code": "x", "message": _html(18)}, 400))
    send(page, "again")
    expect(page.locator("#status")).to_have_text(_html(18))

    expect(page.locator("img, script:not([src]), u, [onerror]")).to_have_count(0)
    page.locator(".msg.assistant .text a").click()
    assert page.evaluate("window.__xss") is None
    assert elsewhere == []


UNTRUSTED_MARKDOWN = [
    "<img src=x onerror=window.__xss=1>",
    "<script>window.__xss=2</script>",
    "<iframe src=javascript:window.__xss=3></iframe>",
    "<svg onload=window.__xss=4>",
    '<a href="javascript:window.__xss=5">a</a>',
    "[x](javascript:window.__xss=6)",
    "[x](JaVaScRiPt:window.__xss=7)",
    "[x](&#106;avascript:window.__xss=8)",
    "[x](<javascript:window.__xss=9>)",
    "[x](data:text/html,<script>window.__xss=10</script>)",
    "<javascript:window.__xss=11>",
    "[x][r]\n\n[r]: javascript:window.__xss=12",
    "![x](http://127.0.0.1:9/leak?secret)",
    "![x](javascript:window.__xss=13)",
    '[x](http://a "t\\" onmouseover=window.__xss=14")',
    "```html\n<img src=x onerror=window.__xss=15>\n```",
    "| a |\n|---|\n| <img src=x onerror=window.__xss=16> |",
    "<details open ontoggle=window.__xss=17>",
    "<style>@import 'http://127.0.0.1:9/css'</style>",
    "<math><mtext><table><mglyph><style><img src=x onerror=window.__xss=18>",
    "<!-- <img src=x onerror=window.__xss=19> -->",
    "[<img src=x onerror=window.__xss=20>](http://a)",
    "- [ ] <input autofocus onfocus=window.__xss=21>",
    '<noscript><p title="</noscript><img src=x onerror=window.__xss=22>">',
]


def test_untrusted_markdown_is_safe_at_every_step_of_its_stream(page: Page) -> None:
    """Rendered whole, and live after every character (an answer's tags and links arrive in
    pieces), model Markdown gives only harmless markup: no element that runs or loads, no
    event handler, no link but to http(s), mailto or this page; links open without access
    to the page."""
    page.goto("about:blank")
    page.add_script_tag(path=_static("vendor/marked.umd.js"))
    page.add_script_tag(path=_static("vendor/purify.min.js"))
    page.add_script_tag(path=_static("markdown.js"))
    unsafe = page.evaluate(
        """(payloads) => {
            const tags = new Set(["P", "A", "STRONG", "EM", "CODE", "PRE", "UL", "OL", "LI",
                "H1", "H2", "H3", "BLOCKQUOTE", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD",
                "BR", "HR", "DEL", "INPUT", "SPAN", "DIV", "BUTTON"]);
            const unsafe = [];
            const check = (root, what) => {
                for (const node of root.querySelectorAll("*")) {
                    if (!tags.has(node.tagName)) unsafe.push([what, node.outerHTML]);
                    for (const { name, value } of node.attributes) {
                        if (/^on|^(src|srcset|style|action|formaction|autofocus)$/.test(name))
                            unsafe.push([what, node.outerHTML]);
                        if (name === "href" && !["http:", "https:", "mailto:"].includes(
                                new URL(value, location.href).protocol))
                            unsafe.push([what, node.outerHTML]);
                    }
                    if (node.tagName === "A" && node.rel !== "noopener noreferrer nofollow")
                        if (node.hasAttribute("href")) unsafe.push([what, node.outerHTML]);
                    if (node.tagName === "INPUT" && node.type !== "checkbox")
                        unsafe.push([what, node.outerHTML]);
                }
            };
            for (const payload of payloads) {
                const text = "Before.\\n\\n" + payload + "\\n\\nAfter.";
                const whole = document.createElement("div");
                Markdown.render(whole, text);
                check(whole, text);
                const live = new Markdown.LiveMarkdown(document.createElement("div"));
                for (let end = 1; end <= text.length; end++) {
                    live.update(text.slice(0, end));
                    check(live.target, text.slice(0, end));
                }
            }
            return unsafe.slice(0, 5);
        }""",
        UNTRUSTED_MARKDOWN,
    )
    assert unsafe == []
    assert page.evaluate("window.__xss") is None


def test_the_page_lets_nothing_inline_run_nor_load_from_elsewhere(
    page: Page, chat_servers: Callable[..., ChatServer]
) -> None:
    """The second line of defence, should markup from a model ever get past the renderer:
    the page's Content-Security-Policy runs no inline script and loads nothing from
    another origin (an image URL can carry the conversation away)."""
    server = chat_servers()
    # Requests to another origin, and how each ended: the browser must not even send them.
    elsewhere: list[str] = []
    page.on(
        "requestfinished",
        lambda request: (
            None if request.url.startswith(server.url) else elsewhere.append(request.url)
        ),
    )
    page.on(
        "requestfailed",
        lambda request: (
            None
            if request.url.startswith(server.url)
            else elsewhere.append(f"{request.url} {request.failure}")
        ),
    )
    page.goto(server.url)
    page.evaluate(
        """() => {
            window.__violations = [];
            document.addEventListener("securitypolicyviolation", (event) => {
                window.__violations.push(event.violatedDirective);
            });
            const markup = document.createElement("div");
            markup.innerHTML = '<img src="http://127.0.0.1:9/leak?secret"'
                + ' onerror="window.__xss = 1">';
            document.querySelector("#messages").append(markup);
        }"""
    )
    page.wait_for_function("() => window.__violations.length >= 2")
    assert sorted(page.evaluate("window.__violations")) == ["img-src", "script-src-attr"]
    assert page.evaluate("window.__xss") is None
    assert elsewhere == ["http://127.0.0.1:9/leak?secret csp"]
    # The same page under /static, and the files it loads, come with the same policy.
    for path in ("/", "/static/index.html", "/static/app.js"):
        policy = page.request.get(server.url + path).headers["content-security-policy"]
        assert "default-src 'self'" in policy
    # The UI works under it: the whole answer of a real question, with its tool call.
    send(page, "what is 12*7")
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer.locator(".text")).to_contain_text("The answer is 84")


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_code_blocks_stream_in_pieces_and_copy(
    new_page: PageFactory, chat_servers: Callable[..., ChatServer], shots: Path, scheme: str
) -> None:
    server = chat_servers()
    page = new_page(color_scheme=scheme)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    markdown = (
        "Here is a script:\n\n```python\nprint('<b>hi</b>')\nfor i in range(3):\n"
        "    print(i)\n```\n\n- one\n- two with `code`\n\n<div onclick=x>raw</div>\n\nDone."
    )
    # Chunks that split the fence, the list and the tag, as a model's tokens do.
    chunks = [markdown[i : i + 5] for i in range(0, len(markdown), 5)]

    def staged_answer(route: Route) -> None:
        route.fulfill(
            status=200,
            content_type="text/event-stream",
            body=sse(
                ("system", {"type": "start", "run": 1, "model": "offline", "cached": False}),
                *(("chunk", {"text": chunk}) for chunk in chunks),
                ("system", {"type": "end"}),
            ),
        )

    page.route("**/v1/chat/stream*", staged_answer)
    page.goto(server.url)
    send(page, "a question")
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "done")
    assert source_of(answer) == markdown
    code = answer.locator(".codeblock pre code")
    expect(code).to_have_text("print('<b>hi</b>')\nfor i in range(3):\n    print(i)\n")
    expect(answer.locator(".codeblock .codebar span")).to_have_text("python")
    expect(answer.locator("li")).to_have_text(["one", "two with code"])
    expect(answer.locator(".text")).to_contain_text("<div onclick=x>raw</div>")
    expect(answer.locator(".text div[onclick], .text b")).to_have_count(0)

    copy = answer.locator(".codeblock .copy")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == code.inner_text()
    page.screenshot(path=shots / f"code-{scheme}.png")


# Markdown of every kind the live renderer must get right while the text grows.
LIVE_SAMPLE = """# Title

A paragraph with **bold**, `code` and a [link](https://example.com/).
Setext heading
---

1. first
2. second

   still the second item

3. third

> a quote
> on two lines

| a | b |
|---|---|
| 1 | 2 |

```js
const x = "<i>";

console.log(x);
```

    indented code

- [ ] a task
- [x] done

Last words with trailing spaces.
"""


def test_live_rendering_equals_a_full_render_at_every_step_and_stays_linear(page: Page) -> None:
    # The renderer is plain JavaScript in the page: drive it there, chunk by chunk.
    page.goto("about:blank")
    page.add_script_tag(path=_static("vendor/marked.umd.js"))
    page.add_script_tag(path=_static("vendor/purify.min.js"))
    page.add_script_tag(path=_static("markdown.js"))
    mismatches = page.evaluate(
        """(text) => {
            const live = new Markdown.LiveMarkdown(document.createElement("div"));
            const full = document.createElement("div");
            const bad = [];
            for (let end = 1; end <= text.length; end += 3) {
                const part = text.slice(0, end);
                live.update(part);
                Markdown.render(full, part);
                const shown = live.done.innerHTML + live.live.innerHTML;
                if (shown !== full.innerHTML) bad.push({end, shown, full: full.innerHTML});
            }
            return bad.slice(0, 3);
        }""",
        LIVE_SAMPLE,
    )
    assert mismatches == []

    # A long answer (about 200 KB) in small chunks: the work stays proportional to its
    # length; re-rendering the whole text at every chunk would lex about 10,000 times more.
    lexed, length = page.evaluate(
        """(text) => {
            const live = new Markdown.LiveMarkdown(document.createElement("div"));
            let so_far = "";
            for (let i = 0; i < 200; i++) {
                for (let j = 0; j < text.length; j += 40) {
                    so_far += text.slice(j, j + 40);
                    live.update(so_far);
                }
            }
            return [live.lexed, so_far.length];
        }""",
        LIVE_SAMPLE * 3,
    )
    assert length > 200_000
    assert lexed < 20 * length


def test_scroll_follows_only_at_the_bottom(
    new_page: PageFactory, chat_servers: Callable[..., ChatServer]
) -> None:
    server = chat_servers(OFFLINE_TOKENS_PER_SECOND="12")
    page = new_page(viewport={"width": 900, "height": 420})
    page.goto(server.url)
    messages = page.locator("#messages")
    at_bottom = "m => m.scrollHeight - m.scrollTop - m.clientHeight < 2"

    # While the user stays at the bottom, the view follows the answer as it grows.
    send(page, "search for Redis Streams")
    answer = page.locator(ANSWER).last
    page.wait_for_function(
        "() => { const m = document.querySelector('#messages');"
        " return m.scrollHeight > m.clientHeight + 100; }"
    )
    assert messages.evaluate(at_bottom)
    expect(answer).to_have_attribute("data-state", "done")
    assert messages.evaluate(at_bottom)
    expect(page.locator("#jump")).to_be_hidden()

    # Scrolled up to read, the view stays put while the next answer streams below,
    # and a button offers the way back.
    send(page, "How should I structure a small side project?")
    expect(page.locator(ANSWER)).to_have_count(2)
    answer = page.locator(ANSWER).nth(1)
    expect(answer.locator(".text")).not_to_be_empty()
    messages.evaluate("m => { m.scrollTop = 0; }")
    expect(page.locator("#jump")).to_be_visible()
    length = len(answer.locator(".text").inner_text())
    page.wait_for_function(
        f"() => document.querySelector('.msg.assistant:last-child .text').innerText.length"
        f" > {length}"
    )
    assert messages.evaluate("m => m.scrollTop") == 0
    expect(answer).to_have_attribute("data-state", "streaming")

    # Back at the bottom, the view follows again to the end.
    page.click("#jump")
    expect(page.locator("#jump")).to_be_hidden()
    assert messages.evaluate(at_bottom)
    expect(answer).to_have_attribute("data-state", "done")
    assert messages.evaluate(at_bottom)


def test_enter_twice_while_sending_sends_once_and_keeps_what_was_typed(
    page: Page, chat_servers: Callable[..., ChatServer]
) -> None:
    server = chat_servers()
    held: list[Route] = []
    posts: list[str] = []

    def hold_message_posts(route: Route) -> None:
        posts.append(route.request.post_data or "")
        held.append(route)  # answered below, once the test has pressed Enter again

    page.route("**/v1/chat/message", hold_message_posts)
    page.goto(server.url)
    send(page, "what is 12*7")
    expect(page.locator("#send")).to_be_disabled()
    page.press("#input", "Enter")
    page.click("#send", force=True)
    page.type("#input", "a draft")
    page.press("#input", "Enter")
    expect(page.locator("#input")).to_have_value("a draft")
    assert len(posts) == len(held) == 1

    held[0].continue_()
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "done")
    expect(page.locator("#input")).to_have_value("a draft")
    expect(page.locator(".msg.user")).to_have_count(1)
    assert len(posts) == 1
    threads = page.request.get(f"{server.url}/v1/threads").json()["threads"]
    assert len(threads) == 1

    # A POST that fails gives the message back, in front of what was typed since.
    page.unroute("**/v1/chat/message")
    page.route(
        "**/v1/chat/message",
        lambda route: route.fulfill(
            status=503,
            content_type="application/json",
            body='{"code": "unavailable", "message": "try again later"}',
        ),
    )
    page.fill("#input", "second question")
    page.press("#input", "Enter")
    expect(page.locator("#status")).to_have_text("try again later")
    expect(page.locator("#input")).to_have_value("second question")
    expect(page.locator("#send")).to_be_enabled()


def test_a_message_sent_while_the_page_loads_waits_for_it(
    page: Page, chat_servers: Callable[..., ChatServer]
) -> None:
    """Sent before the page knows its models, a message waits for them: it goes with the model
    chosen on the page, opening the page's thread afterwards does not replace its answer,
    and what is typed meanwhile stays in the input."""
    server = chat_servers()
    held: list[Route] = []
    released = False
    posts: list[Any] = []

    def hold_info(route: Route) -> None:
        if released:
            route.continue_()
        else:
            held.append(route)

    def note_post(request: Any) -> None:
        if request.url.endswith("/v1/chat/message"):
            posts.append(request.post_data_json)

    page.route("**/info", hold_info)
    page.route(
        "**/v1/chat/stream*",
        lambda route: route.fulfill(
            status=200,
            content_type="text/event-stream",
            body=sse(("chunk", {"text": "Staged answer."}), ("system", {"type": "end"})),
        ),
    )
    page.on("request", note_post)
    page.goto(server.url)
    send(page, "a question")
    # The message is taken at once: what is typed while the page starts stays.
    expect(page.locator("#input")).to_have_value("")
    page.type("#input", "a draft")
    released = True
    for route in held:
        route.continue_()

    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "done")
    expect(page.locator("#model")).to_have_value("offline")
    assert posts == [{"message": "a question", "model": "offline"}]
    # The answer on screen stays the one read from its stream, once the page has loaded.
    page.wait_for_function("() => document.querySelector('#threads').children.length > 0")
    expect(page.locator(ANSWER)).to_have_count(1)
    assert source_of(answer) == "Staged answer."
    expect(page.locator("#input")).to_have_value("a draft")


def test_phone_and_desktop_layouts_light_and_dark(
    new_page: PageFactory, paced_server: ChatServer, shots: Path
) -> None:
    server = paced_server
    for scheme in ("light", "dark"):
        desktop = new_page(viewport=DESKTOP, color_scheme=scheme)
        desktop.goto(server.url)
        background = desktop.evaluate("getComputedStyle(document.body).backgroundColor")
        assert _luminance(background) > 0.8 if scheme == "light" else _luminance(background) < 0.1
        expect(desktop.locator("#sidebar")).to_be_visible()
        expect(desktop.locator("#menu")).to_be_hidden()
        send(desktop, "search for Redis Streams")
        expect(desktop.locator(ANSWER).last).to_have_attribute("data-state", "done")
        send(desktop, "How should I handle `async` code with **care**?")
        expect(desktop.locator(ANSWER)).to_have_count(2)
        expect(desktop.locator(ANSWER).last).to_have_attribute("data-state", "done")
        desktop.locator(".tool summary").first.click()
        desktop.screenshot(path=shots / f"desktop-{scheme}.png")
        thread_id = thread_id_of(desktop)

        # The same user on a phone (the session cookie goes with it).
        phone = new_page(viewport=PHONE, color_scheme=scheme)
        phone.context.add_cookies(desktop.context.cookies())
        phone.goto(f"{server.url}/#thread={thread_id}")
        expect(phone.locator(ANSWER)).to_have_count(2)
        expect(phone.locator("#sidebar")).to_be_hidden()
        expect(phone.locator("#menu")).to_be_visible()
        composer = phone.locator("#composer").bounding_box()
        field = phone.locator("#input").bounding_box()
        assert composer is not None and field is not None
        assert composer["width"] == PHONE["width"]
        assert field["width"] > 0.7 * PHONE["width"]
        page_width = phone.evaluate("document.documentElement.scrollWidth")
        assert page_width == PHONE["width"]  # nothing sticks out sideways
        phone.screenshot(path=shots / f"phone-{scheme}.png")

        # The thread list is a drawer: it opens from the menu and closes on a choice.
        phone.click("#menu")
        expect(phone.locator("#sidebar")).to_be_visible()
        expect(phone.locator("#menu")).to_have_attribute("aria-expanded", "true")
        expect(phone.locator(f'.thread[data-thread-id="{thread_id}"]')).to_be_visible()
        phone.wait_for_function(  # the end of the slide-in, for the screenshot
            "() => getComputedStyle(document.querySelector('#sidebar')).transform === 'none'"
        )
        phone.screenshot(path=shots / f"phone-drawer-{scheme}.png")
        phone.click("#backdrop", position={"x": PHONE["width"] - 20, "y": 400})
        expect(phone.locator("#sidebar")).to_be_hidden()
        phone.click("#menu")
        phone.locator("#new-chat").click()
        expect(phone.locator("#sidebar")).to_be_hidden()
        expect(phone.locator("#title")).to_have_text("New chat")
        phone.click("#menu")
        phone.locator(f'.thread[data-thread-id="{thread_id}"] .name').click()
        expect(phone.locator("#sidebar")).to_be_hidden()
        expect(phone.locator(ANSWER)).to_have_count(2)


def _static(name: str) -> str:
    from tests.examples._chat import CHAT_DIR

    return str(CHAT_DIR / "chat_service" / "static" / name)


def _luminance(css_color: str) -> float:
    """0 (black) to 1 (white) for an `rgb(r, g, b)` computed style."""
    red, green, blue = (int(part) for part in css_color[4:-1].split(",")[:3])
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255


def routed(page: Page, held: list[Route]) -> list[Route] | None:
    """`held` once the page's request reached it; for `eventually`.

    The sync API runs route handlers only inside its own calls, so each poll makes one.
    """
    page.evaluate("0")
    return held or None


def test_the_thread_clicked_last_is_shown_when_an_earlier_one_loads_late(
    page: Page, chat_servers: Callable[..., ChatServer]
) -> None:
    server = chat_servers()
    page.goto(server.url)
    send(page, "what is 12*7")
    expect(page.locator(ANSWER).last).to_have_attribute("data-state", "done")
    first = thread_id_of(page)
    page.click("#new-chat")
    send(page, "what is 6*7")
    expect(page.locator(ANSWER).last).to_have_attribute("data-state", "done")
    second = thread_id_of(page)
    page.click("#new-chat")

    # The first thread is slow to load (a slow network, a busy server); before it comes,
    # the user clicks the second one, which loads at once.
    held: list[Route] = []
    page.route(f"**/v1/thread?thread_id={first}", lambda route: held.append(route))
    page.locator(f'.thread[data-thread-id="{first}"] .name').click()
    eventually(lambda: routed(page, held), what="the first thread is asked for")
    page.locator(f'.thread[data-thread-id="{second}"] .name').click()
    expect(page.locator("#title")).to_have_text("what is 6*7")
    with page.expect_response(lambda response: first in response.url):
        held[0].continue_()
    # The page has read that response by the time a request it makes after it returns.
    page.evaluate("() => fetch('/info').then((response) => response.json())")

    # The late answer does not take the page back to the thread clicked first.
    expect(page.locator("#title")).to_have_text("what is 6*7")
    expect(page.locator(".msg.user .bubble")).to_have_text(["what is 6*7"])
    assert page.evaluate("location.hash") == f"#thread={second}"
    expect(page.locator(".thread.current")).to_have_attribute("data-thread-id", second)


def test_an_answer_queued_elsewhere_shows_after_the_one_streaming(
    page: Page, chat_servers: Callable[..., ChatServer]
) -> None:
    # Regression: with BUSY_POLICY=queue, a message queued from another tab or the terminal
    # client (`queued` in GET /v1/thread) only appeared after a reload: the page stopped
    # at the end of the answer it was reading.
    server = chat_servers(OFFLINE_TOKENS_PER_SECOND="20", BUSY_POLICY="queue")
    page.goto(server.url)
    send(page, "How should I structure a small side project?")
    first = page.locator(ANSWER).first
    expect(first.locator(".text")).not_to_be_empty()
    thread_id = thread_id_of(page)
    queued = page.request.post(
        f"{server.url}/v1/chat/message", data={"message": "what is 12*7", "thread_id": thread_id}
    )
    assert queued.status == 202 and queued.json()["status"] == "queued"

    expect(first).to_have_attribute("data-state", "done")
    expect(page.locator(".msg.user .bubble")).to_have_text(
        ["How should I structure a small side project?", "what is 12*7"]
    )
    expect(page.locator(ANSWER)).to_have_count(2)
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer.locator(".text")).to_contain_text("The answer is 84")


@pytest.mark.redis
@pytest.mark.postgres
def test_retry_after_a_failed_edit_and_a_reload_shows_the_edited_question(
    page: Page, chat_servers: Callable[..., ChatServer], request: pytest.FixtureRequest
) -> None:
    # Regression: an edit that failed before it took effect (no worker started it) leaves
    # the old question and its answer in the saved thread; after a reload, Retry (which
    # asks the edited question in its place) left the old question on screen above the new
    # answer, and did not show the edited one, until the next reload.
    env = {**redis_postgres_env(request), "WORKER_MODE": "1", "WORKER_START_TIMEOUT": "1"}
    server = chat_servers(**env)
    worker = chat_servers("worker", **env)
    page.goto(server.url)
    send(page, "what is 12*7")
    expect(page.locator(ANSWER).last).to_have_attribute("data-state", "done")
    thread_id = thread_id_of(page)
    worker.stop()
    page.locator(".msg.user .edit").click()
    page.locator(".msg.user .edit-input").fill("what is 6*7")
    page.locator(".msg.user .edit-input").press("Enter")
    expect(page.locator(ANSWER).last).to_have_attribute("data-state", "error")
    eventually(lambda: saved_thread(page, server, thread_id)["active_run"] is None, what="idle")
    chat_servers("worker", **env)

    page.reload()
    expect(page.locator(".msg.user .bubble")).to_have_text(["what is 12*7"])
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "error")
    answer.locator(".retry").click()
    expect(page.locator(ANSWER).last).to_have_attribute("data-state", "done")
    expect(page.locator(".msg.user .bubble")).to_have_text(["what is 6*7"])
    expect(page.locator(ANSWER)).to_have_count(1)
    expect(page.locator(ANSWER).last.locator(".text")).to_contain_text("The answer is 42")


def test_a_message_sent_while_another_tab_streams_shows_that_answer(
    page: Page, chat_servers: Callable[..., ChatServer]
) -> None:
    # Regression: a second tab on the thread (BUSY_POLICY=reject) got "this thread is still
    # answering; stop it first (POST /v1/chat/stop)", with no Stop button and no sign of the
    # answer, and kept that line after the answer had ended.
    # (8 tokens a second: the second answer, 100 tokens, still streams when the other tab
    # sends, however slow the machine; at 20 it had ended once under load.)
    server = chat_servers(OFFLINE_TOKENS_PER_SECOND="8")
    page.goto(server.url)
    send(page, "what is 12*7")
    expect(page.locator(ANSWER).last).to_have_attribute("data-state", "done")
    other = page.context.new_page()  # the same user, in a second tab
    other.goto(page.url)
    expect(other.locator(ANSWER)).to_have_count(1)
    # The other tab sends before its thread list looks again (that look would show the
    # answer): its looks are held until then.
    held: list[Route] = []
    other.route("**/v1/threads", lambda route: held.append(route))
    eventually(lambda: routed(other, held), what="the other tab looks at its thread list")

    send(page, "How should I structure a small side project?")
    expect(page.locator(ANSWER).last.locator(".text")).not_to_be_empty()
    send(other, "and 13*7?")
    expect(other.locator("#status")).to_contain_text("answering")
    expect(other.locator(".msg.user .bubble")).to_have_text(
        ["what is 12*7", "How should I structure a small side project?"]
    )
    expect(other.locator(ANSWER).last).to_have_attribute("data-state", "streaming")
    expect(other.locator("#stop")).to_be_visible()
    expect(other.locator("#input")).to_have_value("and 13*7?")  # kept, to send again
    other.unroute("**/v1/threads")

    expect(other.locator(ANSWER).last).to_have_attribute("data-state", "done")
    expect(other.locator("#status")).to_have_text("")
    saved = saved_thread(other, server, thread_id_of(other))
    assert source_of(other.locator(ANSWER).last) == saved["messages"][-1]["text"]
    other.press("#input", "Enter")
    expect(other.locator(ANSWER)).to_have_count(3)
    expect(other.locator(ANSWER).last.locator(".text")).to_contain_text("The answer is 91")


def test_an_idle_tab_shows_an_answer_started_in_another_tab(
    page: Page, chat_servers: Callable[..., ChatServer]
) -> None:
    # Regression: a tab left open on the thread did not show an answer another tab started
    # (only a reload did), even once the list it refreshed marked the thread answering.
    server = chat_servers(OFFLINE_TOKENS_PER_SECOND="4")  # streams for all of the test
    page.goto(server.url)
    send(page, "what is 12*7")
    expect(page.locator(ANSWER).last).to_have_attribute("data-state", "done")
    other = page.context.new_page()  # the same user, in a second tab
    other.goto(page.url)
    expect(other.locator(ANSWER)).to_have_count(1)

    send(page, "How should I structure a small side project?")
    expect(page.locator(ANSWER).last.locator(".text")).not_to_be_empty()
    # The user comes back to the other tab.
    other.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    expect(other.locator(".msg.user .bubble")).to_have_text(
        ["what is 12*7", "How should I structure a small side project?"]
    )
    expect(other.locator(ANSWER).last).to_have_attribute("data-state", "streaming")
    expect(other.locator(ANSWER).last.locator(".text")).not_to_be_empty()
    other.locator("#stop").click()
    expect(other.locator(ANSWER).last).to_have_attribute("data-state", "stopped")
    expect(page.locator(ANSWER).last).to_have_attribute("data-state", "stopped")
    expect(other.locator(ANSWER)).to_have_count(2)


def test_an_idle_page_shows_an_answer_started_elsewhere_without_a_tab_switch(
    page: Page, chat_servers: Callable[..., ChatServer]
) -> None:
    # Regression: the thread list looked again only while an answer streamed, so a page left
    # open (and visible) on an idle thread did not show an answer the terminal client or a
    # second window started on it until its tab was hidden and shown again, or reloaded.
    server = chat_servers(OFFLINE_TOKENS_PER_SECOND="10")
    page.goto(server.url)
    send(page, "what is 12*7")
    expect(page.locator(ANSWER).last).to_have_attribute("data-state", "done")
    thread_id = thread_id_of(page)
    expect(page.locator(".thread .live")).to_have_count(0)  # nothing streams: the page idles

    # The terminal client asks on the same thread, with the same session.
    started = page.request.post(
        f"{server.url}/v1/chat/message",
        data={"message": "How should I structure a small side project?", "thread_id": thread_id},
    )
    assert started.status == 202
    expect(page.locator(f'.thread[data-thread-id="{thread_id}"] .live')).to_be_visible()
    expect(page.locator(".msg.user .bubble")).to_have_text(
        ["what is 12*7", "How should I structure a small side project?"]
    )
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-state", "streaming")
    expect(page.locator("#stop")).to_be_visible()
    expect(answer).to_have_attribute("data-state", "done")
    saved = saved_thread(page, server, thread_id)
    assert source_of(answer) == saved["messages"][-1]["text"]
    expect(page.locator(".thread .live")).to_have_count(0)


SET_HIDDEN = """(hidden) => {
  Object.defineProperty(document, "hidden", { configurable: true, get: () => hidden });
  document.dispatchEvent(new Event("visibilitychange"));
}"""


def test_a_hidden_page_does_not_look_at_its_thread_list(
    page: Page, chat_servers: Callable[..., ChatServer]
) -> None:
    # The idle page looks at its thread list every few seconds, at the cost of a 304 while
    # the list is unchanged; hidden, it stops looking until it is shown again.
    server = chat_servers()
    page.clock.install()  # timers run as usual, and `run_for` brings the later ones forward
    page.goto(server.url)
    send(page, "what is 12*7")
    expect(page.locator(ANSWER).last).to_have_attribute("data-state", "done")
    with page.expect_response(lambda r: r.url.endswith("/v1/threads") and r.status == 304):
        page.clock.run_for(3_000)

    looks: list[str] = []
    page.on("request", lambda request: looks.append(request.url))
    page.evaluate(SET_HIDDEN, True)
    page.clock.run_for(600_000)  # ten minutes
    with page.expect_response("**/v1/threads") as look:
        page.evaluate(SET_HIDDEN, False)  # shown again: it looks at once
    assert look.value.status == 304
    assert [url for url in looks if url.endswith("/v1/threads")] == [look.value.url]


def test_a_thread_list_refresh_that_failed_clears_its_status_once_it_works(
    page: Page, chat_servers: Callable[..., ChatServer]
) -> None:
    # Regression: the 3-second refresh of the thread list, offline, put "Failed to fetch" in
    # the status line and stopped; back online, the line stayed until the answer ended.
    server = chat_servers(OFFLINE_TOKENS_PER_SECOND="4")  # streams for all of the test
    page.goto(server.url)
    send(page, "How should I structure a small side project?")
    answer = page.locator(ANSWER).last
    expect(answer.locator(".text")).not_to_be_empty()
    page.route("**/v1/threads", lambda route: route.abort("internetdisconnected"))
    expect(page.locator("#status")).to_have_text("Failed to fetch")
    page.unroute("**/v1/threads")
    expect(page.locator("#status")).to_have_text("", timeout=8_000)
    expect(answer).to_have_attribute("data-state", "streaming")  # cleared by the refresh

    # A status line the refresh did not set is not the refresh's to clear.
    with page.expect_response("**/v1/threads"):
        page.evaluate("setStatus('Connection lost, reconnecting…', 'warn')")
    with page.expect_response("**/v1/threads"):
        pass  # the refresh before it has been handled
    expect(page.locator("#status")).to_have_text("Connection lost, reconnecting…")
    expect(answer).to_have_attribute("data-state", "streaming")
