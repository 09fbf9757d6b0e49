"""Errors at the edge: every error is JSON ``{"code": ..., "message": ...}``; no input
gets a 5xx (text no database stores is 422, bodies too large 413 before parsing)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from resumable_stream import ResumableStreamError
from resumable_stream.starlette import error_response

from ..quota import RETRY_AFTER as QUOTA_RETRY_AFTER
from ..quota import TooManyAnswers


class ApiError(Exception):
    """An error response: ``status`` and ``{"code": ..., "message": ...}``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def storable(text: str, field: str) -> str:
    """``text`` if every database can store it, else a 422 ``invalid_text``.

    PostgreSQL refuses NUL in text, and UTF-8 (SQLite, PostgreSQL, Redis) cannot encode a
    lone surrogate such as ``"\\ud800"``, which JSON's ``\\u`` escapes can produce.
    """
    if "\x00" in text:
        raise ApiError(422, "invalid_text", f"{field} must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            422, "invalid_text", f"{field} contains a lone surrogate: it is not valid Unicode"
        ) from None
    return text


def error_json(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, **extra}, status_code=status)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)  # registered for ApiError only
    response = error_json(exc.status, exc.code, exc.message)
    response.headers.update(exc.headers)
    return response


def too_many_answers(exc: TooManyAnswers) -> ApiError:
    """429 ``too_many_answers``, with Retry-After: nothing was queued."""
    return ApiError(
        429, "too_many_answers", str(exc), headers={"retry-after": str(QUOTA_RETRY_AFTER)}
    )


async def _too_many_answers(request: Request, exc: Exception) -> Response:
    # A LangGraph run (the /langgraph router lets the app's exceptions through).
    assert isinstance(exc, TooManyAnswers)
    return await _api_error(request, too_many_answers(exc))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request", "type": ""}
    where = ".".join(str(part) for part in first["loc"][1:]) or "body"
    # pydantic refuses lone surrogates in constrained strings itself: the same code as ours.
    code = "invalid_text" if first["type"] == "string_unicode" else "invalid_request"
    return error_json(422, code, f"{where}: {first['msg']}", errors=errors)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
    return error_json(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))


class BodyLimit:
    """413 for request bodies over ``limit`` bytes, before anything parses them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_json(
            413,
            "payload_too_large",
            f"request body over {self.limit} bytes; messages are limited to "
            f"{(self.limit - 4096) // 4} characters",
        )
        await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(TooManyAnswers, _too_many_answers)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ResumableStreamError, error_response)
