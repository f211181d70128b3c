"""How the `pdserve` CLI (generate, status, bench) reaches a server: TLS with --ca-file (and, for
mTLS, a client certificate from PDSERVE_CLIENT_CERT / PDSERVE_CLIENT_KEY), and the bearer token
from PDSERVE_TOKEN (never from a flag, so it stays out of shell history and `ps`)."""
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


CLIENT_CERT_ENV, CLIENT_KEY_ENV = "PDSERVE_CLIENT_CERT", "PDSERVE_CLIENT_KEY"  # mTLS: a client certificate


def _read(path: str, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"{what}: {p} does not exist")
    return p.read_bytes()


def _credentials(ca_file: str) -> grpc.ChannelCredentials:
    cert, key = os.environ.get(CLIENT_CERT_ENV), os.environ.get(CLIENT_KEY_ENV)
    pair = (_read(key, CLIENT_KEY_ENV), _read(cert, CLIENT_CERT_ENV)) if cert and key else (None, None)
    return grpc.ssl_channel_credentials(_read(ca_file, "--ca-file"), *pair)


def client_cert() -> tuple[str, str] | None:
    """The (cert, key) files of an mTLS client, from PDSERVE_CLIENT_CERT / PDSERVE_CLIENT_KEY."""
    cert, key = os.environ.get(CLIENT_CERT_ENV), os.environ.get(CLIENT_KEY_ENV)
    return (cert, key) if cert and key else None


def channel(address: str, ca_file: str | None = None) -> grpc.Channel:
    """TLS when ca_file is given (with a client certificate from the environment, if set)."""
    return grpc.secure_channel(address, _credentials(ca_file)) if ca_file else grpc.insecure_channel(address)


def aio_channel(address: str, ca_file: str | None = None) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, _credentials(ca_file)) if ca_file else grpc.aio.insecure_channel(address)
