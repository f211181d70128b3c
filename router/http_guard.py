"""The HTTP front's gate, before any route runs: the bearer token (where server.auth is set) and the
body size limit (server.max_body_bytes), both as OpenAI-shaped errors."""
from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from router.security import REFUSAL, TokenStore, bearer
from router.service import GenerationService

OPEN_PATHS = ("/health", "/metrics")


def error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
          retry_after: bool = False) -> JSONResponse:
    """OpenAI's error shape, {"error": {"message", "type", "param", "code"}} (429 and 503: Retry-After)."""
    headers = {"Retry-After": "1"} if retry_after else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


class Guard:
    """Pure ASGI: the bearer token (if configured) and the body size limit, before any route runs."""

    def __init__(self, app: ASGIApp, tokens: TokenStore | None, max_body: int, svc: GenerationService) -> None:
        self.app, self.tokens, self.max_body, self.svc = app, tokens, max_body, svc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.tokens is not None and not (self.tokens.open_health and scope["path"] in OPEN_PATHS):
            headers = dict(scope.get("headers") or [])
            token = bearer(headers.get(b"authorization", b"").decode("latin-1"))
            if not self.tokens.check(token):
                self.svc.metrics.errors.labels("UNAUTHENTICATED").inc()
                resp = error(401, REFUSAL, "authentication_error", code="invalid_api_key")
                resp.headers["WWW-Authenticate"] = "Bearer"
                return await resp(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await _too_big(self.max_body)(scope, receive, send)
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_body:
                raise _TooBig()
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooBig:
            await _too_big(self.max_body)(scope, receive, send)


class _TooBig(Exception):
    pass


def _too_big(limit: int) -> JSONResponse:
    return error(413, f"request body exceeds server.max_body_bytes={limit}", "invalid_request_error",
                 code="request_too_large")
