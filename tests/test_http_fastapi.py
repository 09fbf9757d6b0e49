"""The FastAPI router: the same endpoints in the app's OpenAPI schema, over real uvicorn."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import httpx
import orjson
from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel

from resumable_stream import StreamProducer, Transport, from_url
from resumable_stream.fastapi import StreamAPIRouter, StreamError, StreamStarted, start_stream
from resumable_stream.starlette import StreamRouter, allow_all
from tests._services import uvicorn_server
from tests.test_http_starlette import (
    SSE_ACCEPT,
    assert_error,
    full_text,
    paced_tokens,
    read_sse,
    text,
)


class ChatIn(BaseModel):
    tokens: int = 20
    delay: float = 0.0
    hold: bool = False
    stream_id: str | None = None


def build_fastapi_app(transport: Transport) -> FastAPI:
    producer = StreamProducer(transport)

    def authorize(request: Request, stream_id: str, action: str) -> bool:
        if request.headers.get("x-user") == "anonymous":
            raise HTTPException(401, "log in first")
        if request.headers.get("x-user") == "expired":  # FastAPI's detail may be any JSON
            raise HTTPException(
                401, {"reason": "token_expired"}, headers={"www-authenticate": "Bearer"}
            )
        return request.headers.get("x-user") != "mallory"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await producer.aclose()
        await transport.aclose()

    app = FastAPI(lifespan=lifespan)
    app.include_router(
        StreamAPIRouter(StreamRouter(transport, authorize=authorize)), prefix="/streams"
    )
    app.mount("/mounted", StreamRouter(transport, authorize=allow_all))

    @app.get("/streams/app/own-route")  # under the prefix, added after the router
    async def own_route() -> dict[str, bool]:
        return {"own": True}

    @app.post(
        "/chat",
        status_code=202,
        response_model=StreamStarted,
        responses={409: {"model": StreamError}},
    )
    async def chat(body: ChatIn, request: Request) -> Response:
        return await start_stream(
            producer,
            paced_tokens(body.tokens, body.delay, hold=body.hold),
            stream_url=lambda stream_id: request.url_for("read_stream", stream_id=stream_id).path,
            stream_id=body.stream_id,
        )

    return app


@contextlib.contextmanager
def serve_fastapi() -> Iterator[str]:
    with uvicorn_server(build_fastapi_app(from_url("memory://")), graceful_timeout=2) as url:
        yield url


def test_openapi_describes_the_stream_endpoints() -> None:
    schema = build_fastapi_app(from_url("memory://")).openapi()
    paths = schema["paths"]

    read = paths["/streams/{stream_id}"]["get"]
    assert {(p["name"], p["in"]) for p in read["parameters"]} == {
        ("stream_id", "path"),
        ("after", "query"),
        ("Last-Event-ID", "header"),
    }
    (stream_id,) = [p for p in read["parameters"] if p["name"] == "stream_id"]
    assert stream_id["schema"]["pattern"] == "^[A-Za-z0-9_.:@~-]{1,200}$"
    assert set(read["responses"]["200"]["content"]) == {"text/event-stream", "application/x-ndjson"}
    assert {"204", "400", "403", "404", "410", "503"} <= set(read["responses"])
    error_ref = {"$ref": "#/components/schemas/StreamError"}
    assert read["responses"]["410"]["content"]["application/json"]["schema"] == error_ref

    status = paths["/streams/{stream_id}/status"]["get"]
    assert status["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/StreamStatus"
    }
    cancel = paths["/streams/{stream_id}/cancel"]["post"]
    assert {"202", "404", "409"} <= set(cancel["responses"])
    started = paths["/chat"]["post"]["responses"]["202"]["content"]["application/json"]
    assert started["schema"] == {"$ref": "#/components/schemas/StreamStarted"}
    assert set(schema["components"]["schemas"]["StreamError"]["properties"]) == {
        "code",
        "message",
    }
    # A mounted router works in FastAPI but stays out of the schema.
    assert not any(path.startswith("/mounted") for path in paths)


async def test_fastapi_app_starts_streams_and_serves_them_live() -> None:
    with serve_fastapi() as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            started = await client.post("/chat", json={"tokens": 60, "delay": 0.002})
            stream_url = started.json()["stream_url"]
            events = await read_sse(client, stream_url, limit=20)
            events += await read_sse(client, stream_url, headers={"last-event-id": events[-1].id})
            status = await client.get(f"{stream_url}/status")
            mounted = await read_sse(client, stream_url.replace("/streams/", "/mounted/"))
            head = await client.head(stream_url, headers={"accept": "text/event-stream"})

    assert started.status_code == 202
    assert started.headers["location"] == stream_url == f"/streams/{started.json()['stream_id']}"
    assert text(events) == text(mounted) == full_text(60)
    assert status.json()["status"] == "completed"
    assert (head.status_code, head.headers["content-type"]) == (200, "text/event-stream")


async def test_fastapi_routes_answer_with_the_router_errors() -> None:
    with serve_fastapi() as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            body = {"tokens": 1, "hold": True, "stream_id": "busy"}
            assert (await client.post("/chat", json=body)).status_code == 202
            assert_error(await client.post("/chat", json=body), 409, "stream_already_running")
            unknown = await client.get("/streams/unknown", headers=SSE_ACCEPT)
            assert_error(await client.get("/streams/unknown"), 404, "stream_not_found")
            assert_error(await client.get("/streams/busy?after=x"), 400, "invalid_offset")
            mallory = {"x-user": "mallory"}
            assert_error(
                await client.post("/streams/busy/cancel", headers=mallory), 403, "forbidden"
            )
            cancel = await client.post("/streams/busy/cancel")
            ndjson = await client.get("/streams/busy", headers={"accept": "application/x-ndjson"})

    assert unknown.status_code == 204
    assert (cancel.status_code, cancel.json()) == (
        202,
        {"stream_id": "busy", "cancel_requested": True},
    )
    assert [orjson.loads(line)["type"] for line in ndjson.text.splitlines()] == [
        "token",
        "cancelled",
    ]


async def test_fastapi_router_answers_404_and_405_with_code_and_message() -> None:
    """Regression (issue 9): FastAPI's ``{"detail": ...}`` bodies, not the router's JSON."""
    with serve_fastapi() as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            wrong_methods = [
                await client.delete("/streams/abc"),
                await client.post("/streams/abc"),
                await client.put("/streams/abc/status"),
                await client.get("/streams/abc/cancel"),
            ]
            unknown_paths = [
                await client.get("/streams/a/b/c"),
                await client.post("/streams/abc/status/more"),
                await client.get("/streams/"),
            ]
            own = await client.get("/streams/app/own-route")

    allowed = [{"GET", "HEAD"}, {"GET", "HEAD"}, {"GET", "HEAD"}, {"POST"}]  # as mounted
    for response, methods in zip(wrong_methods, allowed, strict=True):
        assert_error(response, 405, "method_not_allowed")
        assert set(response.headers["allow"].split(", ")) == methods
    for response in unknown_paths:
        assert_error(response, 404, "not_found")
    # The fallback never shadows a route of the app under the same prefix.
    assert (own.status_code, own.json()) == (200, {"own": True})


async def test_head_of_status_and_a_dict_detail_are_answered_as_the_mounted_router_does() -> None:
    """Regression: HEAD /{id}/status was 405 (the mounted router answers it), and an
    HTTPException from authorize with a dict detail gave a JSON object as `message`."""
    with serve_fastapi() as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            body = {"tokens": 1, "stream_id": "headed"}
            assert (await client.post("/chat", json=body)).status_code == 202
            heads = [
                await client.head(f"{prefix}/headed/status") for prefix in ("/streams", "/mounted")
            ]
            expired = {"x-user": "expired"}
            refusals = [
                await client.get("/streams/headed/status", headers=expired),
                await client.get("/streams/headed", headers=expired),
                await client.post("/streams/headed/cancel", headers=expired),
            ]

    assert [(r.status_code, r.headers["content-type"]) for r in heads] == [
        (200, "application/json")
    ] * 2
    for response in refusals:
        message = assert_error(response, 401, "unauthorized")["message"]
        assert isinstance(message, str) and orjson.loads(message) == {"reason": "token_expired"}
        assert response.headers["www-authenticate"] == "Bearer"
