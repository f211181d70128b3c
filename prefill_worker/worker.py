"""The prefill worker. Runs as a Ray actor (cluster/), one per GPU (or CPU slot).

A request here goes:
  1. prefill()   the router hands over the tokenized prompt and the destination (decode worker id
                 and the block ids it reserved)
  2. the loop packs waiting prompts into one forward under `max_batch_tokens`; prompts longer
     than `chunk_tokens` go one chunk per step (their scratch KV grows chunk by chunk)
  3. once a prompt's last chunk is computed, samples its first token
  4. hands a WriteJob to the link of that decode worker (engine/kv_handoff, steps 3-5) and goes on
     with the next step; the link asks for the write, answers the router with the first token
     once it is granted (or with the refusal as the error), writes the scratch blocks into the
     reserved ones and frees the scratch blocks
"""
from __future__ import annotations

import datetime
import logging
import threading
import uuid
import time
import dataclasses
from dataclasses import dataclass

import torch

from engine.block_allocator import BlockAllocator
from engine.config import ModelConfig, TransportConfig
from engine.kv_handoff import (
    Backend, DecodeEndpoint, DecodePeer, HandoffSender, PairChannel, TorchPairChannel, WriteGrant, WriteJob,
)
from engine.model_loader import load_model
from engine.model_runner import ModelRunner, SeqInput
from engine.prefill_scheduler import Chunk, PendingPrefill, PrefillScheduler
from engine.sampler import History, sample
from engine.types import PrefillRequest, PrefillResult, TokenLogprob, WorkerStats, finish_reason
from prefill_worker.config import PrefillConfig

log = logging.getLogger(__name__)


@dataclass
class _Waiter:
    event: threading.Event
    result: PrefillResult | None = None


class PrefillWorker:
    role = "prefill"

    def __init__(
        self, worker_id: str, model_cfg: ModelConfig, cfg: PrefillConfig, transport_cfg: TransportConfig,
        block_size: int, node: str = "local",
    ) -> None:
        """block_size: the decode workers' (kv_cache.block_size): blocks are copied whole between caches."""
        torch.set_num_threads(cfg.torch_threads)
        self.worker_id, self.node = worker_id, node
        self.boot_id = uuid.uuid4().hex[:12]
        self.model_cfg, self.cfg, self.transport_cfg = model_cfg, cfg, transport_cfg
        blocks = max(cfg.kv_blocks, -(-max(cfg.max_batch_tokens, model_cfg.max_model_len) // block_size))
        self.runner = ModelRunner(load_model(model_cfg), blocks, block_size, model_cfg.kernels)
        self.allocator = BlockAllocator(blocks, block_size)
        self.scheduler = PrefillScheduler(cfg.max_batch_tokens, cfg.chunk_tokens)
        self.sender = HandoffSender(worker_id, self.runner.kv, block_size, transport_cfg.timeout_s)
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.prompt_tokens_computed = 0
        self.requests_done = 0

    # -- wiring ---------------------------------------------------------------------------------
    def ready(self) -> str:
        """This process's boot id: it changes when Ray restarts the worker."""
        return self.boot_id

    def start(self) -> None:
        """Start the step loop."""
        self._thread = threading.Thread(target=self._loop, name=f"{self.worker_id}-loop", daemon=True)
        self._thread.start()

    def connect(
        self, ep: DecodeEndpoint, peer: DecodePeer, backend: Backend, channel: PairChannel | None = None,
        tag: str = "",
    ) -> None:
        """Wire one decode worker (again, after either side restarted). Two-sided: open the pair now
        (blocks until that worker accepts; the launcher calls both at once under the same `tag`)."""
        if backend is not Backend.IPC and channel is None:
            import torch.distributed as dist

            store = dist.TCPStore(ep.host, ep.store_port, is_master=False,
                                  timeout=datetime.timedelta(seconds=self.transport_cfg.timeout_s))
            channel = TorchPairChannel(backend.value, store, f"{self.worker_id}>{ep.worker_id}/{tag}", rank=0)
        if channel is not None and channel.epoch < 0:
            channel.open(0, self.transport_cfg.timeout_s)
        self.sender.connect(ep.worker_id, peer, backend, ep.block_size, ep.cache, channel)

    # -- called by the router ---------------------------------------------------------------------
    def prefill(self, request: PrefillRequest, timeout_s: float = 300.0) -> PrefillResult:
        """Block until the first token is sampled (or the deadline passes)."""
        if request.dest.worker_id not in self.sender.links:
            return PrefillResult.failed(request.request_id, f"no hand-off link to decode worker {request.dest.worker_id}")
        waiter = _Waiter(threading.Event())
        pending = PendingPrefill(request)
        with self._wake:
            if request.request_id in self._waiters:
                return PrefillResult.failed(request.request_id, "request_id already being prefilled")
            self._waiters[request.request_id] = waiter
            self.scheduler.add(pending)
            self._wake.notify()
        if not waiter.event.wait(timeout_s):
            with self._lock:
                pending.cancelled = True
                self._waiters.pop(request.request_id, None)
            return PrefillResult.failed(request.request_id, f"prefill did not finish within {timeout_s:.0f}s")
        assert waiter.result is not None
        return waiter.result

    def cancel(self, request_id: str) -> bool:
        with self._wake:
            for p in [*self.scheduler.waiting, *self.scheduler.in_progress]:
                if p.request.request_id == request_id:
                    p.cancelled = True
                    w = self._waiters.pop(request_id, None)
                    if w is not None:
                        w.result = PrefillResult.failed(p.request.request_id, "cancelled")
                        w.event.set()
                    self._wake.notify()
                    return True
        return False

    def stats(self) -> WorkerStats:
        with self._lock:
            return WorkerStats(
                self.role, self.worker_id, self.node, len(self._waiters), len(self.scheduler.waiting),
                self.allocator.num_used, self.allocator.num_blocks, self.prompt_tokens_computed,
                self.requests_done,
                {"kv_bytes_sent": self.sender.bytes_sent, "writes_in_flight": self.sender.in_flight,
                 "links": {dst: link.backend.value for dst, link in self.sender.links.items()},
                 "waiting_tokens": self.scheduler.waiting_tokens},
            )

    def check_idle(self) -> bool:
        with self._lock:
            self.allocator.check()
            return not self.scheduler.has_work() and not self.sender.in_flight and self.allocator.num_used == 0

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sender.close()

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._stop:
                    return
                if not self.scheduler.has_work():
                    self._wake.wait(0.05)
                for p in self.scheduler.drop_cancelled():
                    self.allocator.free(p.request.request_id)
                chunks = self.scheduler.next_step(self._admit)
            if chunks:
                try:
                    self._run(chunks)
                except Exception as e:  # noqa: BLE001 — never leave a caller waiting
                    log.exception("prefill step failed")
                    with self._lock:
                        failed = {c.pending.request.request_id: c.pending for c in chunks}
                        self.scheduler.in_progress = [
                            p for p in self.scheduler.in_progress if p.request.request_id not in failed
                        ]
                        for rid in failed:
                            self.allocator.free(rid)
                    self._answer_all(list(failed.values()), f"prefill failed: {type(e).__name__}: {e}")

    def _admit(self, p: PendingPrefill) -> bool:
        """Reserve scratch blocks for the whole prompt (its chunks accumulate there); an id whose
        previous KV is still being handed off waits for it."""
        try:
            return self.allocator.allocate(p.request.request_id, p.num_tokens) is not None
        except KeyError:
            return False

    def _run(self, chunks: list[Chunk]) -> None:
        t0 = time.monotonic()
        for c in chunks:
            if c.pending.started is None:
                c.pending.started = t0
        seqs = [
            SeqInput(c.pending.request.token_ids[c.start : c.start + c.length], c.start,
                     self.allocator.table(c.pending.request.request_id))
            for c in chunks
        ]
        logits = self.runner.forward(seqs)  # [B, V]: each chunk's last position
        self.prompt_tokens_computed += sum(c.length for c in chunks)
        with self._lock:
            done = self.scheduler.advance(chunks)
        if not done:
            return
        rows = [i for i, c in enumerate(chunks) if c.completes]
        firsts, lps = sample(
            logits[rows], [p.request.sampling for p in done], [p.num_tokens for p in done],
            [History(p.request.token_ids, ()) for p in done],
        )
        for p, first, lp in zip(done, firsts, lps):
            self._prefilled(p, first, lp)

    def _prefilled(self, p: PendingPrefill, first: int, lp: TokenLogprob | None) -> None:
        """The prompt is computed: answer at once if its first token ends it, else hand its KV off
        (the router is answered when the write is granted)."""
        req = p.request
        assert p.started is not None
        result = PrefillResult(
            req.request_id, first, finish_reason(first, 1, req.sampling, req.eos_token_ids),
            (p.started - p.enqueued) * 1000, (time.monotonic() - p.started) * 1000, 0, first_logprob=lp,
        )
        self.requests_done += 1
        if result.finished is not None:
            self._release(req.request_id)
            self._answer(req.request_id, result)
            return

        nbytes = self.allocator.blocks_for(p.num_tokens) * self.sender.block_bytes

        def granted(grant: WriteGrant) -> None:
            self._answer(req.request_id, dataclasses.replace(result, kv_bytes=nbytes) if grant.ok
                         else PrefillResult.failed(req.request_id, f"KV hand-off refused: {grant.reason}"))

        self.sender.submit(WriteJob(
            req.request_id, req.dest, p.num_tokens, first, list(self.allocator.table(req.request_id)),
            granted, lambda: self._release(req.request_id),
        ))

    def _release(self, request_id: str) -> None:
        with self._lock:
            self.allocator.free(request_id)

    def _answer(self, request_id: str, result: PrefillResult) -> None:
        with self._lock:
            w = self._waiters.pop(request_id, None)
        if w is not None:
            w.result = result
            w.event.set()

    def _answer_all(self, batch: list[PendingPrefill], error: str) -> None:
        for p in batch:
            self._answer(p.request.request_id, PrefillResult.failed(p.request.request_id, error))
