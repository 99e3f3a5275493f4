"""The checks every request passes before any route sees it.

- Size: a body over `max_body` bytes is refused with 413, by its Content-Length or, for a
  chunked body, as soon as the bytes read pass the limit.
- Token: with a token configured every request carries it, as `Authorization: Bearer` or in
  the cookie that a `?token=` link sets (HttpOnly, SameSite=Strict) before redirecting to the
  same URL without it.
- Host: without a token only loopback Host headers are served, so a web page cannot reach
  the dashboard through DNS rebinding.
- Origin: a form post from another site is refused (the cookie is SameSite; this covers
  the token-less loopback dashboard too).
- Frames: every response forbids being framed (X-Frame-Options and CSP frame-ancestors), so
  a page on another port or site cannot overlay the dashboard and steer a click to Cancel.
"""

from __future__ import annotations

import hmac
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "evomerge_token"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
NO_FRAMES = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
]


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware applying the checks above, in that order."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body: int) -> None:
        self.app = app
        self.token = token
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _unframeable(send)
        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_body(receive)
        except BodyTooLarge:
            await _too_large(self.max_body)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _refusal(self, scope: Scope, headers: Headers) -> Response | None:
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body:
            return _too_large(self.max_body)
        if self.token is None:
            host = urlsplit(f"//{headers.get('host', '')}").hostname or ""
            if host not in LOOPBACK_HOSTS:
                return PlainTextResponse("this dashboard only answers on loopback", 421)
        elif not self._authorized(headers):
            return self._token_redirect(scope) or PlainTextResponse(
                "token required: send 'Authorization: Bearer TOKEN' or open a ?token= link",
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        if scope["method"] not in SAFE_METHODS and _cross_site(headers):
            return PlainTextResponse("cross-site request refused", 403)
        return None

    def _authorized(self, headers: Headers) -> bool:
        auth = headers.get("authorization", "")
        cookie = SimpleCookie(headers.get("cookie", "")).get(COOKIE)
        bearer = auth[7:] if auth.lower().startswith("bearer ") else ""
        return self._matches(bearer) or (cookie is not None and self._matches(cookie.value))

    def _matches(self, offered: str) -> bool:
        assert self.token is not None
        return bool(offered) and hmac.compare_digest(offered.encode(), self.token.encode())

    def _token_redirect(self, scope: Scope) -> Response | None:
        """For a GET with the right `?token=`: set the cookie, redirect without the token."""
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        offered = [v for k, v in query if k == "token"]
        if scope["method"] != "GET" or not offered or not self._matches(offered[0]):
            return None
        rest = urlencode([(k, v) for k, v in query if k != "token"])
        response = RedirectResponse(scope["path"] + (f"?{rest}" if rest else ""), 303)
        response.set_cookie(COOKIE, offered[0], httponly=True, samesite="strict")
        return response

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _unframeable(send: Send) -> Send:
    """A `send` that adds the no-frames headers to the response's start."""

    async def send_unframeable(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *NO_FRAMES]}
        await send(message)

    return send_unframeable


def _too_large(limit: int) -> Response:
    return PlainTextResponse(f"request body over {limit} bytes", 413)


def _cross_site(headers: Headers) -> bool:
    if headers.get("sec-fetch-site") == "cross-site":
        return True
    origin = headers.get("origin")
    return origin is not None and urlsplit(origin).netloc != headers.get("host")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the already-read body to the app, then listens as before."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
