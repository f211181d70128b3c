"""The router's own CPU per token streamed: Dispatcher + GenerationService over a fake decode worker
that answers each poll with one token for every request (no Ray, no gRPC, no model).

    python bench/router_path.py [--streams 64] [--tokens 300]
    python bench/router_path.py --full [--workers 2] [--step-ms 4] [--output bench/results/router_path.json]

bench/engine.py measures the whole serving path (its `router_cpu_us_per_token` adds Ray's poll
calls and gRPC's ~50 µs a message); this isolates what pdserve's own router code costs per token.

--full: the router process as a GPU machine runs it, without a GPU: the real RouterServer (gRPC,
Ray event pumps) over Ray actors that stand in for aggregated workers and give every request they
hold one token each `--step-ms` (no model: a 1.1B shape's decode step on an H100 is ~4 ms at batch
64), streams from asyncio gRPC clients in a process of their own. Reports the tokens/s the
clients received against the workers' pace and the router process's CPU per token, by thread.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.event_stream import EventBatch  # noqa: E402
from engine.tiny import tiny_tokenizer  # noqa: E402
from engine.types import DecodeEvent, FinishReason, PrefillResult, ReserveResult, SamplingParams  # noqa: E402
from router.config import LimitsConfig  # noqa: E402
from router.dispatcher import Dispatcher, WorkerRef  # noqa: E402
from router.service import GenerationService  # noqa: E402
from router.validation import ValidRequest  # noqa: E402


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return asyncio.ensure_future(self.fn(*args))


class FakeWorker:
    """Prefill and decode in one: once every stream has its first token, each poll is one step."""

    def __init__(self, streams: int, tokens: int) -> None:
        self.streams, self.tokens, self.step = streams, tokens, 0
        self.started: list[str] = []
        for name in ("reserve", "cancel", "poll", "prefill"):
            setattr(self, name, _Method(getattr(self, "_" + name)))

    async def _reserve(self, rid: str, *_: Any) -> ReserveResult:
        return ReserveResult(True)

    async def _cancel(self, rid: str) -> bool:
        return True

    async def _prefill(self, req: Any, timeout: float) -> PrefillResult:
        self.started.append(req.request_id)
        return PrefillResult(req.request_id, 5, None, 0.0, 1.0, 100)

    async def _poll(self, timeout: float, *_: Any) -> EventBatch:
        await asyncio.sleep(0)
        if len(self.started) < self.streams or self.step >= self.tokens:
            await asyncio.sleep(0.001)
            return EventBatch("paced", self.step, [])
        self.step += 1
        end = FinishReason.LENGTH if self.step == self.tokens else None
        return EventBatch("paced", self.step, [DecodeEvent(rid, [40 + self.step % 50], end) for rid in self.started])


async def run(streams: int, tokens: int) -> float:
    worker = FakeWorker(streams, tokens)
    d = Dispatcher([WorkerRef("w", worker)], [WorkerRef("w", worker)], (2,), LimitsConfig(), colocated=True)
    svc = GenerationService(d, tiny_tokenizer(), LimitsConfig(), 4096)
    d.start()

    async def one(i: int) -> int:
        req = ValidRequest(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=tokens + 1), (), f"r{i}")
        return sum([len(m.token_ids) async for m in svc.stream(req)])

    cpu0 = time.process_time()
    n = sum(await asyncio.gather(*(one(i) for i in range(streams))))
    cpu = time.process_time() - cpu0
    await d.close()
    return cpu / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--full", action="store_true", help="through Ray and gRPC (paced fake workers)")
    ap.add_argument("--workers", type=int, default=2, help="--full: fake aggregated workers")
    ap.add_argument("--step-ms", type=float, default=4.0, help="--full: each worker's step time")
    ap.add_argument("--output", default="", help="--full: write the result as JSON here")
    a = ap.parse_args()
    if not a.full:
        us = asyncio.run(run(a.streams, a.tokens))
        print(f"{a.streams} streams: {us:.1f} µs of router CPU per token (dispatcher + service; no Ray, no gRPC)")
        return
    from bench.router_full import run_full

    r = run_full(a.streams, a.tokens, a.workers, a.step_ms)
    print(f"{a.streams} streams over {a.workers} workers at {a.step_ms:g} ms a step: offered "
          f"{r['offered_tokens_per_s']:.0f} tok/s, received {r['received_tokens_per_s']:.0f} "
          f"({r['received_over_offered']:.0%}), router {r['router_cpu_us_per_token']:.0f} µs CPU/token, "
          f"{r['tokens_per_message']:.2f} tokens/message; by thread {r['router_cpu_us_per_token_by_thread']}")
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
