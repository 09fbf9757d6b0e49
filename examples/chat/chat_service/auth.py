"""Who is calling: an anonymous user id from a signed session cookie or a bearer token.

* Browsers get a ``chat_session`` cookie on their first request: a random user id and its
  HMAC-SHA256 signature (``HttpOnly``, ``SameSite=Lax``). A cookie with a bad signature is
  replaced by a new identity, never trusted.
* API clients send ``Authorization: Bearer <token>`` with a token of their own (at least 16
  characters, e.g. ``python -m chat_service.cli`` makes one); the user id is a hash of it, so
  the token is the credential and the server stores nothing.
* A browser's ``POST``, ``PUT``, ``PATCH`` or ``DELETE`` from another origin answers 403
  ``cross_origin``, unless ``CORS_ORIGINS`` lists that origin: the cookie goes with requests
  from every page of the same site (another port of the same host, a sibling subdomain), and
  ``/api/chat`` and ``/langgraph`` read a ``text/plain`` body as JSON, which a page may send
  anywhere without asking (cross-site requests carry no cookie: ``SameSite=Lax``).

Both identities are anonymous: put a real login in front for anything public. This is a
pure ASGI middleware (not ``BaseHTTPMiddleware``), so streaming responses go through as they
are written.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Collection
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE_NAME = "chat_session"
COOKIE_MAX_AGE = 365 * 24 * 3600
MIN_TOKEN_LENGTH = 16
#: Methods that change nothing: a page of any origin may send them (CORS hides the answer).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _sign(secret: bytes, user_id: str) -> str:
    digest = hmac.new(secret, user_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def session_value(secret: bytes, user_id: str) -> str:
    return f"{user_id}.{_sign(secret, user_id)}"


def user_from_session(secret: bytes, value: str) -> str | None:
    user_id, _, signature = value.partition(".")
    if user_id and signature and hmac.compare_digest(signature, _sign(secret, user_id)):
        return user_id
    return None


def user_from_token(token: str) -> str | None:
    if len(token) < MIN_TOKEN_LENGTH:
        return None
    return "t" + hashlib.sha256(token.encode()).hexdigest()[:31]


def cross_origin(conn: HTTPConnection, trusted: Collection[str] = ()) -> bool:
    """Whether a browser sent this request from a page of another origin than the service's
    (and not of one in ``trusted``). Browsers say so in ``Sec-Fetch-Site``, and older ones
    by an ``Origin`` that is not this host; other clients send neither header."""
    origin = conn.headers.get("origin")
    if origin is not None and origin in trusted:
        return False
    site = conn.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")  # none: typed in, a bookmark
    if origin is None:
        return False
    return urlsplit(origin).netloc != conn.headers.get("host")


def current_user(conn: HTTPConnection) -> str:
    """The caller's user id, as set by :class:`SessionMiddleware`."""
    return str(conn.scope["state"]["user_id"])


class SessionMiddleware:
    """Put the caller's user id in ``scope["state"]["user_id"]``; issue cookies as needed.

    A malformed bearer token answers 401 (an API client should learn at once that its
    credentials are wrong rather than see an empty thread list). A request that would act
    with the cookie's identity from a page of another origin answers 403, unless the origin
    is one of ``trusted_origins`` (``CORS_ORIGINS``).
    """

    def __init__(
        self, app: ASGIApp, *, secret: bytes, trusted_origins: Collection[str] = ()
    ) -> None:
        self.app = app
        self.secret = secret
        self.trusted_origins = frozenset(trusted_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        new_cookie: str | None = None
        authorization = conn.headers.get("authorization", "")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            user_id = user_from_token(token.strip()) if scheme.lower() == "bearer" else None
            if user_id is None:
                await _unauthorized(send)
                return
        else:
            if scope["method"] not in SAFE_METHODS and cross_origin(conn, self.trusted_origins):
                await _cross_origin(send)
                return
            user_id = user_from_session(self.secret, conn.cookies.get(COOKIE_NAME, ""))
            if user_id is None:
                user_id = "u" + secrets.token_hex(15)
                new_cookie = session_value(self.secret, user_id)
        scope.setdefault("state", {})["user_id"] = user_id
        if new_cookie is None:
            await self.app(scope, receive, send)
            return
        # Secure over HTTPS (behind a proxy, run uvicorn with --proxy-headers).
        cookie = _cookie(new_cookie, secure=scope.get("scheme") == "https")

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), cookie]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _cookie(value: str, *, secure: bool) -> tuple[bytes, bytes]:
    cookie: SimpleCookie = SimpleCookie()
    cookie[COOKIE_NAME] = value
    morsel = cookie[COOKIE_NAME]
    morsel["path"] = "/"
    morsel["max-age"] = COOKIE_MAX_AGE
    morsel["httponly"] = True
    morsel["samesite"] = "Lax"
    if secure:
        morsel["secure"] = True
    return (b"set-cookie", morsel.OutputString().encode())


async def _unauthorized(send: Send) -> None:
    body = (
        b'{"code":"invalid_token","message":"Authorization must be '
        b'\\"Bearer <token>\\" with a token of at least 16 characters"}'
    )
    await _error(send, 401, body, [(b"www-authenticate", b"Bearer")])


async def _cross_origin(send: Send) -> None:
    body = (
        b'{"code":"cross_origin","message":"a page of another origin may not act as this '
        b"session's user: call from the service's own page, list the origin in "
        b'CORS_ORIGINS, or send Authorization: Bearer <token>"}'
    )
    await _error(send, 403, body)


async def _error(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
