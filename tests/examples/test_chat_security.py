"""The chat service's defences (sessions, other origins), against the real server process."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chat_service.auth import COOKIE_NAME, session_value
from playwright.sync_api import sync_playwright

from tests._services import html_page, launch_chromium
from tests.examples._chat import ChatServer

TRUSTED_ORIGIN = "http://trusted.example"


@pytest.fixture
def server(chat_servers: Callable[..., ChatServer]) -> ChatServer:
    return chat_servers(CORS_ORIGINS=TRUSTED_ORIGIN)


@pytest.fixture
def other_origin() -> Iterator[str]:
    """A page of another origin on the same host as the service: another port of
    127.0.0.1, so the same site (cookies with ``SameSite=Lax`` go with its requests)."""
    with html_page(b"<!doctype html><title>another origin</title>") as url:
        yield url.rstrip("/")


# What a page may send anywhere without a CORS preflight: a text/plain body.
PLANT = """async ([url, chatId]) => {
    const send = (path, body) => fetch(url + path, {
        method: "POST", mode: "no-cors", credentials: "include",
        headers: {"content-type": "text/plain"}, body: JSON.stringify(body),
    });
    await send("/api/chat", {id: chatId, messages: [
        {id: "m1", role: "user", parts: [{type: "text", text: "planted by another origin"}]},
    ]});
    await send("/langgraph/threads", {metadata: {title: "planted by another origin"}});
}"""


def test_a_page_of_another_origin_cannot_act_as_the_user(
    server: ChatServer, other_origin: str, chromium_path: str
) -> None:
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, chromium_path)
        try:
            context = browser.new_context()
            chat = context.new_page()
            chat.goto(server.url + "/")  # the user's session cookie
            other = context.new_page()
            other.goto(other_origin + "/")
            other.evaluate(PLANT, [server.url, "planted0000000001"])
            listed = chat.evaluate("fetch('/v1/threads').then(r => r.json())")
            # The service's own page still acts as the user.
            own = chat.evaluate(
                """() => fetch('/langgraph/threads', {method: 'POST',
                    headers: {'content-type': 'application/json'}, body: '{}'})
                    .then(r => r.status)"""
            )
        finally:
            browser.close()

    assert [t["title"] for t in listed["threads"]] == []
    assert own == 200


def test_unsafe_requests_of_other_origins_are_403_unless_trusted(server: ChatServer) -> None:
    body = {"metadata": {"title": "x"}}
    same_site = {"origin": "http://127.0.0.1:1", "sec-fetch-site": "same-site"}
    with server.client() as user:
        user.get("/v1/threads")  # the session cookie
        refused = {
            "fetch metadata": user.post("/langgraph/threads", json=body, headers=same_site),
            "origin only": user.post(
                "/langgraph/threads", json=body, headers={"origin": "http://127.0.0.1:1"}
            ),
            "no body": user.post(
                "/v1/chat/stop", params={"thread_id": "0" * 32}, headers=same_site
            ),
        }
        allowed = {
            "same origin": user.post(
                "/langgraph/threads", json=body, headers={"sec-fetch-site": "same-origin"}
            ),
            "origin of this host": user.post(
                "/langgraph/threads", json=body, headers={"origin": server.url}
            ),
            "trusted origin": user.post(
                "/langgraph/threads",
                json=body,
                headers={"origin": TRUSTED_ORIGIN, "sec-fetch-site": "cross-site"},
            ),
            "not a browser": user.post("/langgraph/threads", json=body),
            "a read": user.get("/v1/threads", headers=same_site),
        }
        with server.client(headers={"authorization": f"Bearer {'t' * 24}", **same_site}) as api:
            allowed["bearer token"] = api.post("/langgraph/threads", json=body)

    assert {name: r.status_code for name, r in refused.items()} == dict.fromkeys(refused, 403)
    assert refused["fetch metadata"].json()["code"] == "cross_origin"
    assert {name: r.status_code for name, r in allowed.items()} == dict.fromkeys(allowed, 200)


def test_an_empty_secret_key_file_gets_a_key_rather_than_signing_with_none(
    chat_servers: Callable[..., ChatServer], tmp_path: Path
) -> None:
    # What a process that died as it made the key left: an empty DATA_DIR/secret_key.
    data = tmp_path / "keyless"
    data.mkdir()
    (data / "secret_key").write_bytes(b"")
    server = chat_servers(SECRET_KEY="", DATA_DIR=str(data))
    forged = session_value(b"", "u" + "0" * 30)  # signed with the empty key
    with server.client(cookies={COOKIE_NAME: forged}) as client:
        response = client.get("/v1/threads")

    assert response.status_code == 200
    assert COOKIE_NAME in response.cookies  # not trusted: a new identity
    assert response.cookies[COOKIE_NAME] != forged
    assert len((data / "secret_key").read_bytes().strip()) >= 32


@pytest.mark.parametrize("left", ["empty", "missing"])
def test_processes_starting_together_keep_one_secret_key(tmp_path: Path, left: str) -> None:
    # Regression: each process that found the key file empty made its own key and put it
    # in place; the one whose key was replaced went on signing with its own, and cookies
    # one process issued were refused by the other (a new identity: the threads gone).
    from chat_service.settings import Settings

    for attempt in range(40):
        data = tmp_path / f"{left}-{attempt}"
        data.mkdir()
        if left == "empty":
            (data / "secret_key").write_bytes(b"")
        settings = Settings.from_env({"DATA_DIR": str(data), "SECRET_KEY": ""})
        keys = _together(settings.session_secret, 4)
        assert len(set(keys)) == 1, f"attempt {attempt}: {len(set(keys))} keys"
        assert keys[0] == (data / "secret_key").read_bytes().strip()


def _together(call: Callable[[], bytes], threads: int) -> list[bytes]:
    """What ``call`` returns in each of ``threads`` threads, all let go at once."""
    start = threading.Barrier(threads)
    found: list[bytes] = []

    def run() -> None:
        start.wait()
        found.append(call())

    started = [threading.Thread(target=run) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()
    return found
