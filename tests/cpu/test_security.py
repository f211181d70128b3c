"""TLS, mTLS and bearer tokens on both fronts (certificates made here by a throwaway CA)."""
from __future__ import annotations

import hashlib
import logging
import ssl
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import ray
import trustme

from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import generation_pb2_grpc as pbg
from tests.cpu.harness import RunningServer, tiny_config

TOKEN, HASHED_TOKEN = "s3cret-token-for-tests", "another-token-only-hashed"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    srv = ca.issue_cert("localhost", "127.0.0.1")
    srv.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    srv.private_key_pem.write_to_path(str(d / "server.key"))
    out: dict[str, Any] = {"dir": d, "ca": ca}
    for name, issuer in (("client", ca), ("stranger", stranger)):
        c = issuer.issue_cert(f"{name}@pdserve.test")
        c.cert_chain_pems[0].write_to_path(str(d / f"{name}.pem"))
        c.private_key_pem.write_to_path(str(d / f"{name}.key"))
    (d / "tokens.txt").write_text(
        f"# tokens\n{TOKEN}\nsha256:{hashlib.sha256(HASHED_TOKEN.encode()).hexdigest()}\n\n"
    )
    return out


@pytest.fixture(scope="module")
def server(pki: dict[str, Any]):  # type: ignore[no-untyped-def]
    d = pki["dir"]
    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-security")
    srv = RunningServer(tiny_config(server={
        "host": "127.0.0.1", "http_port": 0,
        "tls": {"cert_file": str(d / "server.pem"), "key_file": str(d / "server.key"),
                "client_ca_file": str(d / "ca.pem")},
        "auth": {"tokens_file": str(d / "tokens.txt")},
    }))
    yield srv
    srv.stop()
    ray.shutdown()


def _creds(d: Path, who: str | None) -> grpc.ChannelCredentials:
    ca = (d / "ca.pem").read_bytes()
    if who is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(ca, (d / f"{who}.key").read_bytes(), (d / f"{who}.pem").read_bytes())


def _grpc(server: RunningServer, pki: dict[str, Any], who: str | None = "client", token: str | None = TOKEN,
          plaintext: bool = False) -> pb.GenerateResponse:
    target = f"localhost:{server.server.port}"
    ch = grpc.insecure_channel(target) if plaintext else grpc.secure_channel(target, _creds(pki["dir"], who))
    md = (("authorization", f"Bearer {token}"),) if token else ()
    with ch:
        return pbg.GenerationStub(ch).Generate(pb.GenerateRequest(prompt="hi", max_tokens=3), timeout=20, metadata=md)


def _ssl(pki: dict[str, Any], who: str | None = "client") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["dir"] / "ca.pem"))
    if who is not None:
        ctx.load_cert_chain(str(pki["dir"] / f"{who}.pem"), str(pki["dir"] / f"{who}.key"))
    return ctx


def _http(server: RunningServer, pki: dict[str, Any], token: str | None = TOKEN, who: str | None = "client") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(verify=_ssl(pki, who), timeout=20) as c:
        return c.post(f"https://localhost:{server.server.http_port}/v1/completions", headers=headers,
                      json={"model": "tiny", "prompt": "hi", "max_tokens": 3})


def test_the_right_token_with_a_known_client_cert_is_served_on_both_fronts(server: RunningServer, pki: dict[str, Any]) -> None:
    assert len(_grpc(server, pki).token_ids) == 3
    assert len(_grpc(server, pki, token=HASHED_TOKEN).token_ids) == 3  # stored only as its SHA-256
    r = _http(server, pki)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    client = openai.OpenAI(base_url=f"https://localhost:{server.server.http_port}/v1", api_key=TOKEN,
                           http_client=httpx.Client(verify=_ssl(pki)), max_retries=0)
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens == 3


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", ""])
def test_a_missing_or_wrong_token_is_refused_without_detail(server: RunningServer, pki: dict[str, Any],
                                                            token: str | None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(grpc.RpcError) as e:
        _grpc(server, pki, token=token)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and e.value.details() == "missing or invalid bearer token"
    r = _http(server, pki, token=token)
    assert r.status_code == 401 and r.json()["error"]["message"] == "missing or invalid bearer token"
    assert TOKEN not in caplog.text and HASHED_TOKEN not in caplog.text


def test_plaintext_clients_are_refused(server: RunningServer, pki: dict[str, Any]) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _grpc(server, pki, plaintext=True)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"http://localhost:{server.server.http_port}/v1/completions", timeout=10,
                   json={"model": "tiny", "prompt": "hi"}, headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.mark.parametrize("who", [None, "stranger"])
def test_mtls_refuses_no_client_cert_and_an_unknown_one(server: RunningServer, pki: dict[str, Any], who: str | None) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _grpc(server, pki, who=who)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises((httpx.HTTPError, ssl.SSLError)):
        _http(server, pki, who=who)


def test_health_stays_open_without_a_token(server: RunningServer, pki: dict[str, Any]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.secure_channel(f"localhost:{server.server.port}", _creds(pki["dir"], "client")) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with httpx.Client(verify=_ssl(pki), timeout=10) as c:
        assert c.get(f"https://localhost:{server.server.http_port}/health").status_code == 200
        assert c.get(f"https://localhost:{server.server.http_port}/v1/models").status_code == 401
        assert c.post(f"https://localhost:{server.server.http_port}/tokenize", json={"prompt": "x"}).status_code == 401


def test_the_cli_speaks_tls_with_a_token_and_a_client_cert(server: RunningServer, pki: dict[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from cluster.cli import main as cli_main

    d = pki["dir"]
    address = f"localhost:{server.server.port}"
    monkeypatch.setenv("PDSERVE_CLIENT_CERT", str(d / "client.pem"))
    monkeypatch.setenv("PDSERVE_CLIENT_KEY", str(d / "client.key"))
    monkeypatch.delenv("PDSERVE_TOKEN", raising=False)
    assert cli_main(["status", "--address", address, "--ca-file", str(d / "ca.pem"), "--json"]) == 1  # no token
    monkeypatch.setenv("PDSERVE_TOKEN", TOKEN)
    capsys.readouterr()
    assert cli_main(["status", "--address", address, "--ca-file", str(d / "ca.pem"), "--json"]) == 0
    assert {w["role"] for w in json.loads(capsys.readouterr().out)["workers"]} == {"prefill", "decode"}
    assert cli_main(["generate", "hi", "--raw", "--max-tokens", "3", "--address", address,
                     "--ca-file", str(d / "ca.pem"), "--json"]) == 0
