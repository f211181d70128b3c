"""TLS and bearer-token auth for both fronts, from the `server.tls` / `server.auth` YAML sections.

Tokens are kept as SHA-256 digests only and compared in constant time (every stored digest is
compared, whatever matched); nothing here logs a token. A refusal never says which tokens exist.
"""
from __future__ import annotations

import hashlib
import hmac
import ssl
from pathlib import Path
from typing import Any

import grpc

from router.config import AuthConfig, TLSConfig

# gRPC methods that answer without a token when auth.open_health is true
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
REFUSAL = "missing or invalid bearer token"


class TokenStore:
    def __init__(self, cfg: AuthConfig) -> None:
        self.open_health = cfg.open_health
        path = Path(cfg.tokens_file)
        if not path.is_file():
            raise ValueError(f"server.auth.tokens_file: {path} does not exist")
        self._digests: list[bytes] = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("sha256:"):
                try:
                    digest = bytes.fromhex(line[7:])
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise ValueError(f"server.auth.tokens_file: line {n} is not 'sha256:' + 64 hex digits")
                self._digests.append(digest)
            else:
                self._digests.append(hashlib.sha256(line.encode()).digest())
        if not self._digests:
            raise ValueError(f"server.auth.tokens_file: {path} holds no token")

    def check(self, token: str | None) -> bool:
        presented = hashlib.sha256((token or "").encode()).digest()
        ok = False
        for d in self._digests:  # no early exit: the time does not depend on which one matched
            ok |= hmac.compare_digest(presented, d)
        return ok and bool(token)


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a valid `authorization: Bearer …` metadata (UNAUTHENTICATED)."""

    def __init__(self, tokens: TokenStore, on_refusal: Any) -> None:
        self.tokens, self.on_refusal = tokens, on_refusal

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if self.tokens.open_health and details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        md = {k: v for k, v in (details.invocation_metadata or ())}
        if self.tokens.check(bearer(md.get("authorization"))):
            return await continuation(details)
        self.on_refusal()
        handler = await continuation(details)
        if handler is None:
            return None

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
            yield  # pragma: no cover — makes this an async generator, as a streaming handler must be

        kind = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
        return kind(refuse_stream if handler.response_streaming else refuse,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def grpc_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    cert, key = _read(tls.cert_file, "cert_file"), _read(tls.key_file, "key_file")
    ca = _read(tls.client_ca_file, "client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def uvicorn_ssl(tls: TLSConfig | None) -> dict[str, Any]:
    if tls is None:
        return {}
    kw: dict[str, Any] = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
    if tls.client_ca_file:
        kw.update(ssl_ca_certs=tls.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return kw


def _read(path: str | None, name: str) -> bytes:
    p = Path(path or "")
    if not p.is_file():
        raise ValueError(f"server.tls.{name}: {p} does not exist")
    return p.read_bytes()
