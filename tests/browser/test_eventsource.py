"""A real browser resumes a stream by itself: headless Chromium, EventSource, uvicorn.

The server cuts every stream response after a few events, alternately by ending it cleanly
and by dropping the connection halfway through an event. Chromium's EventSource reconnects
on its own, sending the last complete event's id as ``Last-Event-ID``; the text on the page
must come out whole, with no event twice. The page is the one docs/http.md shows.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests._services import REPO_ROOT, launch_chromium_async
from tests.test_http_starlette import full_text, serve, start

# The page of docs/http.md, "Resume in the browser", as written there.
PAGE = re.search(
    r"## Resume in the browser\n.*?```html\n(.*?)```",
    (REPO_ROOT / "docs/http.md").read_text(),
    re.S,
).group(1)  # type: ignore[union-attr]
# Bookkeeping for the test, around the page's EventSource: offsets received, reconnections.
INSTRUMENT = """
window.seen = { offsets: [], opens: 0, connectionErrors: 0 };
const NativeEventSource = window.EventSource;
window.EventSource = class extends NativeEventSource {
  constructor(url, init) {
    super(url, init);
    this.addEventListener("open", () => { window.seen.opens += 1; });
    for (const type of ["token", "end", "error", "cancelled"]) {
      this.addEventListener(type, (event) => {
        if (event.data === undefined) window.seen.connectionErrors += 1;
        else window.seen.offsets.push(event.lastEventId);
      });
    }
  }
};
"""
TOKENS = 300
CUT_EVERY = 25
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"


class Cutter:
    """ASGI middleware: cuts each stream response after ``every`` events.

    Odd cuts end the response cleanly after an event; even cuts send half of the next
    event and then drop the connection: the app returns with the response incomplete, so
    uvicorn closes the socket (and logs "ASGI callable returned without completing
    response", as expected here). Either way the app sees ``http.disconnect``.
    """

    def __init__(self, app: ASGIApp, every: int) -> None:
        self.app = app
        self.every = every
        self.clean_cuts = 0
        self.dropped_connections = 0
        #: The Last-Event-ID of every stream request, in order (None: a first connection).
        self.last_event_ids: list[str | None] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].endswith(("/status", "/cancel")):
            await self.app(scope, receive, send)
            return
        last_event_id = dict(scope["headers"]).get(b"last-event-id")
        self.last_event_ids.append(None if last_event_id is None else last_event_id.decode())
        cut = asyncio.Event()
        events_sent = 0

        async def cutting_send(message: Message) -> None:
            nonlocal events_sent
            if cut.is_set():
                return  # the connection is gone, as far as the app can tell
            body = message.get("body", b"")
            if message["type"] != "http.response.body" or not body:
                await send(message)
                return
            ends = _event_ends(body)
            if events_sent + len(ends) < self.every:
                events_sent += len(ends)
                await send(message)
                return
            last = ends[self.every - events_sent - 1]
            cut.set()
            if (self.clean_cuts + self.dropped_connections) % 2 == 0:
                self.clean_cuts += 1
                await send({"type": "http.response.body", "body": body[:last], "more_body": False})
            else:
                # Half of the event: its id line arrives, its blank line never does.
                self.dropped_connections += 1
                previous = ends[self.every - events_sent - 2] if last != ends[0] else 0
                half = previous + (last - previous) // 2
                await send({"type": "http.response.body", "body": body[:half], "more_body": True})

        async def cutting_receive() -> Message:
            receiving = asyncio.ensure_future(receive())
            cutting = asyncio.ensure_future(cut.wait())
            try:
                await asyncio.wait({receiving, cutting}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                receiving.cancel()
                cutting.cancel()
            if cut.is_set():
                return {"type": "http.disconnect"}
            return receiving.result()

        await self.app(scope, cutting_receive, cutting_send)


def _event_ends(body: bytes) -> list[int]:
    """Where each complete SSE event in ``body`` ends (just after its blank line)."""
    ends, position = [], body.find(b"\n\n")
    while position != -1:
        ends.append(position + 2)
        position = body.find(b"\n\n", position + 2)
    return ends


@pytest.mark.browser
async def test_browser_event_source_resumes_by_itself_after_cuts(chromium_path: str) -> None:
    from playwright.async_api import async_playwright

    cutters: list[Cutter] = []

    def cut(app: ASGIApp) -> Cutter:
        cutters.append(Cutter(app, CUT_EVERY))
        return cutters[-1]

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    # retry=0.05: the browser waits 50 ms before reconnecting, to keep the test short.
    with serve(wrap=cut, routes=[Route("/page", page)], retry=0.05) as server:
        async with server.client() as client, async_playwright() as playwright:
            browser = await launch_chromium_async(playwright, chromium_path)
            try:
                tab = await browser.new_page()
                console: list[str] = []
                tab.on("console", lambda message: console.append(message.text))
                await tab.add_init_script(INSTRUMENT)
                stream_url = await start(client, tokens=TOKENS, delay=0.003)
                await tab.goto(f"{server.url}/page?stream={stream_url}")
                await tab.wait_for_function(
                    "document.getElementById('status').textContent === 'end'", timeout=30_000
                )
                shown = await tab.text_content("#answer")
                seen: dict[str, Any] = await tab.evaluate("window.seen")
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                await tab.screenshot(path=ARTIFACTS / "eventsource-resume.png", full_page=True)
            finally:
                await browser.close()

    (cutter,) = cutters
    assert shown == full_text(TOKENS), console
    assert len(seen["offsets"]) == TOKENS + 1  # every token and the end event, once each
    assert len(set(seen["offsets"])) == TOKENS + 1
    # It really was cut, both ways, and every reconnection resumed with Last-Event-ID.
    assert cutter.clean_cuts >= 3
    assert cutter.dropped_connections >= 3
    assert cutter.last_event_ids[0] is None
    assert all(cutter.last_event_ids[1:])
    assert len(cutter.last_event_ids) == seen["opens"] >= 7
    assert seen["connectionErrors"] == len(cutter.last_event_ids) - 1


# The CORS settings of docs/http.md, "Proxies, load balancers and HTTP/2", as written there.
CORS = re.search(
    r'```python title="cors"\n(.*?)```', (REPO_ROOT / "docs/http.md").read_text(), re.S
)
# A page of another origin: an EventSource with cookies, and what fetch-based clients (the
# LangGraph JS SDK) do: read Location, resume with a Last-Event-ID header of their own.
CROSS_ORIGIN_PAGE = """<!doctype html><script>
window.probe = async (api) => {
  const started = await fetch(api + "/runs?tokens=5", {method: "POST", credentials: "include"});
  const location = started.headers.get("Location");
  const ndjson = {Accept: "application/x-ndjson"};
  const first = await (await fetch(api + location, {headers: ndjson})).text();
  const offsets = first.trim().split("\\n").map((line) => JSON.parse(line).offset);
  let resumed;
  try {
    const response = await fetch(api + location, {
      headers: {...ndjson, "Last-Event-ID": offsets[1]}, credentials: "include",
    });
    resumed = (await response.text()).trim().split("\\n").map((line) => JSON.parse(line).offset);
  } catch (error) {
    resumed = String(error);  // the preflight refused the header
  }
  const ends = await new Promise((resolve) => {
    const source = new EventSource(api + location, {withCredentials: true});
    const ids = [];
    source.addEventListener("token", (event) => ids.push(event.lastEventId));
    source.addEventListener("end", (event) => { source.close(); resolve(ids.length); });
    source.onerror = () => { if (source.readyState === EventSource.CLOSED) resolve("closed"); };
  });
  return {location, offsets, resumed, ends};
};
</script>"""


@pytest.mark.browser
async def test_a_page_of_another_origin_reads_and_resumes_with_the_documented_cors(
    chromium_path: str,
) -> None:
    from playwright.async_api import async_playwright
    from starlette.applications import Starlette

    from resumable_stream import from_url
    from resumable_stream.starlette import StreamRouter, allow_all
    from tests._services import uvicorn_server
    from tests.test_http_starlette import build_app

    assert CORS is not None, "no cors block in docs/http.md"

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(CROSS_ORIGIN_PAGE)

    with uvicorn_server(Starlette(routes=[Route("/page", page)])) as page_url:
        transport = from_url("memory://")
        app = build_app(transport, StreamRouter(transport, authorize=allow_all))
        namespace: dict[str, Any] = {"app": app}
        exec(CORS.group(1).replace("https://app.example.com", page_url), namespace)
        with uvicorn_server(app, graceful_timeout=2) as api_url:
            async with async_playwright() as playwright:
                browser = await launch_chromium_async(playwright, chromium_path)
                try:
                    tab = await browser.new_page()
                    await tab.goto(f"{page_url}/page")
                    seen: dict[str, Any] = await tab.evaluate("(api) => window.probe(api)", api_url)
                finally:
                    await browser.close()

    assert seen["location"] is not None and seen["location"].startswith("/streams/")
    assert len(seen["offsets"]) == 6  # five tokens and the end
    assert seen["resumed"] == seen["offsets"][2:]
    assert seen["ends"] == 5
