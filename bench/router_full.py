"""`python bench/router_path.py --full`: the router process at a GPU's pace, on any machine.

The real RouterServer (gRPC front, dispatcher, Ray event pumps) over Ray actors that stand in for
aggregated workers: each gives every request it holds one token per `step_ms` from a thread of its
own, as a decode worker's step loop would, and answers the router's calls as the real worker does
(reserve, prefill → first token, cancel, the event stream or poll, stats). No model, so what is
measured is the router and Ray: the tokens/s the clients receive against the pace the workers set, and the router
process's CPU per token, by thread.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import subprocess
import threading
import time
from typing import Any

import ray

from bench.engine import _stream_clients, _thread_cpu
from engine.event_stream import EventBatch, EventOutbox
from engine.tiny import tiny_tokenizer
from engine.types import DecodeEvent, FinishReason, PrefillResult, ReserveResult, WorkerStats
from router.config import LimitsConfig, ServerConfig
from router.dispatcher import Dispatcher, WorkerRef
from router.server import RouterServer
from router.service import GenerationService


@ray.remote(num_cpus=0, max_concurrency=64)
class PacedWorker:
    """An aggregated worker without a model: one token per held request every `step_ms`."""

    def __init__(self, name: str, step_ms: float, tokens: int) -> None:
        self.name, self.step_s, self.tokens = name, step_ms / 1000, tokens
        self.cv = threading.Condition()
        self.held: dict[str, int] = {}  # request id → tokens given
        self.outbox = EventOutbox()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.step_s
            time.sleep(max(0.0, next_at - time.monotonic()))
            events = []
            with self.cv:
                for rid in list(self.held):
                    self.held[rid] += 1
                    done = self.held[rid] >= self.tokens
                    events.append(DecodeEvent(rid, [40 + self.held[rid] % 50], FinishReason.LENGTH if done else None))
                    if done:
                        del self.held[rid]
            self.outbox.emit(events)

    def ready(self) -> str:
        return self.name

    def reserve(self, request_id: str, *_: Any, **__: Any) -> ReserveResult:
        return ReserveResult(True)

    def prefill(self, request: Any, timeout_s: float = 300.0) -> PrefillResult:
        with self.cv:
            self.held[request.request_id] = 1
        return PrefillResult(request.request_id, 40, None, 0.0, 1.0, 0)

    def cancel(self, request_id: str) -> bool:
        with self.cv:
            return self.held.pop(request_id, None) is not None

    def open_event_stream(self) -> tuple[str, int, str, str]:
        return self.outbox.open_stream()  # as BatchWorker's: events over a socket (engine/event_stream.py)

    def poll(self, timeout_s: float = 0.5, log: str = "", acked: int = 0) -> EventBatch:
        return self.outbox.poll(timeout_s, log, acked)

    def stats(self) -> WorkerStats:
        with self.cv:
            return WorkerStats("aggregated", self.name, socket.gethostname(), len(self.held), 0, 0, 1, 0, 0)


def run_full(streams: int, tokens: int, workers: int, step_ms: float) -> dict[str, Any]:
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        handles = [PacedWorker.remote(f"aggregated-{i}", step_ms, tokens) for i in range(workers)]
        ray.get([h.ready.remote() for h in handles])
        refs = [WorkerRef(f"aggregated-{i}", h) for i, h in enumerate(handles)]
        limits = LimitsConfig()
        svc = GenerationService(Dispatcher(refs, refs, (2,), limits, colocated=True), tiny_tokenizer(), limits, 4096)
        return asyncio.run(_serve_and_stream(svc, streams, tokens, workers, step_ms))
    finally:
        ray.shutdown()


async def _serve_and_stream(svc: GenerationService, streams: int, tokens: int, workers: int,
                            step_ms: float) -> dict[str, Any]:
    server = RouterServer(svc, ServerConfig(port=0, http_port=None))
    port = await server.start()
    try:
        texts = ["hello there"] * streams
        ctx = mp.get_context("spawn")
        out: "mp.Queue[Any]" = ctx.Queue()
        cpu0, threads0 = time.process_time(), _thread_cpu()
        proc = ctx.Process(target=_stream_clients, args=(f"127.0.0.1:{port}", texts, tokens + 8, {}, out),
                           daemon=True)
        proc.start()
        arrivals, _, error, messages = await asyncio.get_running_loop().run_in_executor(None, out.get, True, 600)
        cpu = time.process_time() - cpu0
        threads = {k: v - threads0.get(k, 0.0) for k, v in _thread_cpu().items()}
        proc.join(30)
    finally:
        await server.stop()
    if error:
        raise RuntimeError(error)
    n = sum(len(a) for a in arrivals)
    start, end = max(a[0] for a in arrivals), min(a[-1] for a in arrivals)  # all streams running
    received = sum(sum(1 for x in a if start < x <= end) for a in arrivals) / (end - start)
    offered = streams * 1000 / step_ms  # every request gets a token each step of its worker
    return {
        "streams": streams, "workers": workers, "step_ms": step_ms, "tokens": tokens,
        "offered_tokens_per_s": offered, "received_tokens_per_s": received,
        "received_over_offered": received / offered,
        "router_cpu_us_per_token": cpu / n * 1e6, "tokens_per_message": n / messages,
        "router_cpu_us_per_token_by_thread": {k: round(v / n * 1e6, 1) for k, v in
                                              sorted(threads.items(), key=lambda kv: -kv[1]) if v > 0},
        "machine": f"{os.cpu_count()} cpus",
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }
