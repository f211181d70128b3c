"""How the `pdserve` CLI (generate, status, bench) reaches a server: TLS with --ca-file, and the
bearer token from PDSERVE_TOKEN (never from a flag, so it stays out of shell history and `ps`)."""
from __future__ import annotations

import os
from pathlib import Path

import grpc

TOKEN_ENV = "PDSERVE_TOKEN"


def token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def metadata() -> tuple[tuple[str, str], ...]:
    """gRPC call metadata carrying the token, if one is set."""
    t = token()
    return (("authorization", f"Bearer {t}"),) if t else ()


def headers() -> dict[str, str]:
    t = token()
    return {"Authorization": f"Bearer {t}"} if t else {}


def _credentials(ca_file: str) -> grpc.ChannelCredentials:
    p = Path(ca_file)
    if not p.is_file():
        raise SystemExit(f"--ca-file: {p} does not exist")
    return grpc.ssl_channel_credentials(root_certificates=p.read_bytes())


def channel(address: str, ca_file: str | None = None) -> grpc.Channel:
    return grpc.secure_channel(address, _credentials(ca_file)) if ca_file else grpc.insecure_channel(address)


def aio_channel(address: str, ca_file: str | None = None) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, _credentials(ca_file)) if ca_file else grpc.aio.insecure_channel(address)
