"""How the load generator talks to a server: pdserve's gRPC stream or an OpenAI /v1/completions stream.

Both record, per request, when it was sent, when each token arrived, and how it ended, so every
system is measured by the same client code. With `max_tokens` (--max-tokens) a request asks for that
many tokens but its answer is the workload's length: the client closes the stream once it has them,
as a user whose answer ended early (EOS, a stop string) would — the server had to admit it for
max_tokens.
"""
from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Protocol

from cluster.bench.workloads import RequestSpec


@dataclass
class Record:
    input_len: int
    output_len: int  # asked for
    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)  # one entry per output token
    error: str | None = None
    text: str = ""
    n_output: int | None = None  # the server's count, when it reports one (else len(token_times))

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.sent

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


class Backend(Protocol):
    async def send(self, spec: RequestSpec) -> Record: ...
    async def close(self) -> None: ...


class GrpcBackend:
    """pdserve.v1.Generation/GenerateStream."""

    def __init__(self, address: str, timeout_s: float = 600, ca_file: str | None = None,
                 max_tokens: int | None = None) -> None:
        from cluster import client
        from protos.pdserve.v1 import generation_pb2_grpc as pbg

        self.channel = client.aio_channel(address, ca_file)
        self.metadata = client.metadata()
        self.stub = pbg.GenerationStub(self.channel)
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens

    async def send(self, spec: RequestSpec) -> Record:
        import grpc

        from protos.pdserve.v1 import generation_pb2 as pb

        rec = Record(spec.input_len, spec.output_len, sent=time.perf_counter())
        req = pb.GenerateRequest(prompt=spec.prompt, max_tokens=max(spec.output_len, self.max_tokens or 0),
                                 ignore_eos=True)
        call = self.stub.GenerateStream(req, timeout=self.timeout_s, metadata=self.metadata)
        try:
            async for msg in call:
                now = time.perf_counter()
                rec.token_times.extend([now] * len(msg.token_ids))
                rec.text += msg.text
                if len(rec.token_times) >= spec.output_len and self.max_tokens:  # the answer is whole
                    del rec.token_times[spec.output_len:]
                    call.cancel()
                    break
        except grpc.RpcError as e:
            rec.error = f"{e.code().name}: {e.details()}"
        return rec

    async def close(self) -> None:
        await self.channel.close()


class OpenAIBackend:
    """POST {url}/v1/completions with stream=true (vLLM, transformers serve, llama.cpp, ...)."""

    def __init__(self, url: str, model: str, timeout_s: float = 600, extras: bool = True,
                 ca_file: str | None = None, max_tokens: int | None = None) -> None:
        import httpx

        from cluster import client

        self.url = url.rstrip("/") + "/v1/completions"
        self.model = model
        self.extras = extras  # vLLM's ignore_eos / min_tokens / stream_options (strict servers refuse them)
        self.max_tokens = max_tokens
        verify: ssl.SSLContext | bool = True
        if ca_file:
            verify = ssl.create_default_context(cafile=ca_file)
            if client.client_cert():
                verify.load_cert_chain(*client.client_cert())  # type: ignore[misc]
        self.client = httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=1024),
                                        headers=client.headers(), verify=verify)

    async def send(self, spec: RequestSpec) -> Record:
        rec = Record(spec.input_len, spec.output_len, sent=time.perf_counter())
        body: dict[str, object] = {
            "model": self.model, "prompt": spec.prompt, "max_tokens": max(spec.output_len, self.max_tokens or 0),
            "temperature": 0.0,
            "stream": True,
        }
        if self.extras:
            body.update(ignore_eos=True, min_tokens=spec.output_len, stream_options={"include_usage": True})
        try:
            async with self.client.stream("POST", self.url, json=body) as resp:
                if resp.status_code != 200:
                    rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                    return rec
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        rec.n_output = int(chunk["usage"].get("completion_tokens", 0)) or None
                    text = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
                    if text:  # an event with text is what a user sees arrive
                        rec.token_times.append(now)
                        rec.text += text
                        if self.max_tokens and len(rec.token_times) >= spec.output_len:
                            break  # the answer is whole: closing the stream ends the request
        except Exception as e:  # noqa: BLE001 — any transport failure is a failed request
            rec.error = f"{type(e).__name__}: {e}"
        return rec

    async def close(self) -> None:
        await self.client.aclose()
