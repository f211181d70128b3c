"""A router over a scripted worker: both fronts for real (gRPC and HTTP, validation, admission,
the answer's split), the model replaced by a worker that answers every request with the same token
ids — for answers a tiny random model would never write (gpt-oss's channels, tool calls). No Ray."""
from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc

from engine.event_stream import EventBatch
from engine.tiny import EOS_ID
from engine.types import DecodeEvent, FinishReason, PrefillResult, ReserveResult, TokenLogprob, WorkerStats
from protos.pdserve.v1 import generation_pb2_grpc as pbg
from router.config import LimitsConfig, ServerConfig
from router.dispatcher import Dispatcher, WorkerRef
from router.server import RouterServer
from router.service import GenerationService


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return asyncio.ensure_future(self.fn(*args))


class ScriptedWorker:
    """An aggregated worker without a model: every request's answer is `ids` (the first from its
    prefill, then 4 a poll), its last the EOS — (its ids as the model would draw them). Asked for
    logprobs, token i's is -(i + 1) / 10."""

    def __init__(self, ids: list[int]) -> None:
        self.ids, self.at, self.seq = ids, dict[str, int](), 0
        self.logprobs = set[str]()  # the requests that asked for them
        for name in ("reserve", "cancel", "poll", "prefill", "stats"):
            setattr(self, name, _Method(getattr(self, "_" + name)))

    async def _reserve(self, rid: str, *_: Any) -> ReserveResult:
        return ReserveResult(True)

    async def _cancel(self, rid: str) -> bool:
        self.at.pop(rid, None)
        self.logprobs.discard(rid)
        return True

    async def _prefill(self, req: Any, timeout: float) -> PrefillResult:
        self.at[req.request_id] = 1
        first = None
        if req.sampling.logprobs is not None:
            self.logprobs.add(req.request_id)
            first = self._logprobs(0, 1)[0]
        return PrefillResult(req.request_id, self.ids[0], None, 0.0, 1.0, 0, first_logprob=first)

    async def _poll(self, timeout: float, *_: Any) -> EventBatch:
        await asyncio.sleep(0.002)
        events = []
        for rid, i in list(self.at.items()):
            done = i + 4 >= len(self.ids)
            events.append(DecodeEvent(rid, self.ids[i:i + 4], FinishReason.STOP if done else None,
                                      logprobs=self._logprobs(i, i + 4) if rid in self.logprobs else None))
            self.at[rid] = i + 4
            if done:
                del self.at[rid]
                self.logprobs.discard(rid)
        self.seq += 1
        return EventBatch("scripted", self.seq, events)

    def _logprobs(self, start: int, end: int) -> list[TokenLogprob]:
        return [TokenLogprob(t, -(start + k + 1) / 10) for k, t in enumerate(self.ids[start:end])]

    async def _stats(self) -> WorkerStats:
        return WorkerStats("decode", "scripted", "here", len(self.at), 0, 0, 8, 0, 0)


class ScriptedRouter:
    """`with ScriptedRouter(ids, tokenizer, **server) as r:` r.stub (gRPC), r.http_port: a router whose
    every answer is `ids` then the EOS (`server`: ServerConfig fields, e.g. the parsers)."""

    def __init__(self, ids: list[int], tokenizer: Any, **server: Any) -> None:
        self.worker = ScriptedWorker([*ids, EOS_ID])
        self.tokenizer, self.server_fields = tokenizer, server

    def __enter__(self) -> ScriptedRouter:
        refs = [WorkerRef("scripted", self.worker)]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> RouterServer:
            svc = GenerationService(Dispatcher(refs, refs, (EOS_ID,), LimitsConfig(), colocated=True),
                                    self.tokenizer, LimitsConfig(max_new_tokens=1024), 4096)
            server = RouterServer(svc, ServerConfig(port=0, http_port=0, **self.server_fields), "tiny")
            await server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub, self.http_port = pbg.GenerationStub(self.channel), self.server.http_port
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
