"""The prefill worker. Runs as a Ray actor (cluster/), one per GPU (or CPU slot).

A request here goes:
  1. prefill()   the router hands over the tokenized prompt and the decode rank that reserved room
  2. the loop packs waiting prompts into one forward under `max_batch_tokens`; prompts longer
     than `chunk_tokens` go one chunk per step (their scratch KV grows chunk by chunk)
  3. once a prompt's last chunk is computed, samples its first token
  4. copies the prompt's KV out of its scratch blocks (freed at once), posts the send to the decode
     worker over the transport and tells that worker (kv_incoming) which transfer carries it; then
     answers the router (TTFT includes the ~25 ms copy of a 1024-token prompt, not the transfer,
     and a failure to post the send is the request's error, not a silent hang)
  5. polls the sends to completion; a failed send is logged (the decode side fails the request)
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.block_allocator import BlockAllocator
from engine.config import ModelConfig, TransportConfig
from engine.model_loader import load_model
from engine.model_runner import ModelRunner, SeqInput
from engine.sampler import History, sample
from engine.transport import KVTransport, Transfer, TransferState, make_transport
from engine.types import KVArrival, PrefillRequest, PrefillResult, WorkerStats, finish_reason
from prefill_worker.config import PrefillConfig
from engine.prefill_scheduler import Chunk, PendingPrefill, PrefillScheduler

log = logging.getLogger(__name__)
BLOCK_SIZE = 16


class DecodePeer(Protocol):
    def kv_incoming(self, arrival: KVArrival) -> Any: ...


@dataclass
class _Waiter:
    event: threading.Event
    result: PrefillResult | None = None


class PrefillWorker:
    role = "prefill"

    def __init__(
        self, worker_id: str, model_cfg: ModelConfig, cfg: PrefillConfig, transport_cfg: TransportConfig,
        node: str = "local",
    ) -> None:
        torch.set_num_threads(cfg.torch_threads)
        self.worker_id, self.node = worker_id, node
        self.model_cfg, self.cfg, self.transport_cfg = model_cfg, cfg, transport_cfg
        blocks = max(cfg.kv_blocks, -(-max(cfg.max_batch_tokens, model_cfg.max_model_len) // BLOCK_SIZE))
        self.runner = ModelRunner(load_model(model_cfg), blocks, BLOCK_SIZE, model_cfg.kernels)
        self.allocator = BlockAllocator(blocks, BLOCK_SIZE)
        self.scheduler = PrefillScheduler(cfg.max_batch_tokens, cfg.chunk_tokens)
        self.peers: dict[int, DecodePeer] = {}
        self.transport: KVTransport | None = None
        self._seq: dict[int, int] = {}  # decode rank → next transfer seq
        self._sends: list[tuple[str, Transfer]] = []
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.prompt_tokens_computed = 0
        self.kv_bytes_sent = 0
        self.requests_done = 0

    # -- wiring ---------------------------------------------------------------------------------
    def ready(self) -> str:
        return self.worker_id

    def init_transport(self, rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        self.set_transport(
            make_transport(self.transport_cfg, self.model_cfg.device, rank, world_size, master_addr, master_port)
        )

    def set_transport(self, transport: KVTransport) -> None:
        self.transport = transport
        self._thread = threading.Thread(target=self._loop, name=f"{self.worker_id}-loop", daemon=True)
        self._thread.start()

    def set_peers(self, peers: dict[int, DecodePeer]) -> None:
        self.peers = dict(peers)

    # -- called by the router ---------------------------------------------------------------------
    def prefill(self, request: PrefillRequest, timeout_s: float = 300.0) -> PrefillResult:
        """Block until the first token is sampled (or the deadline passes)."""
        if request.decode_rank not in self.peers:
            return PrefillResult.failed(request.request_id, f"unknown decode rank {request.decode_rank}")
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
                {"kv_bytes_sent": self.kv_bytes_sent, "sends_pending": len(self._sends),
                 "waiting_tokens": self.scheduler.waiting_tokens},
            )

    def check_idle(self) -> bool:
        with self._lock:
            self.allocator.check()
            return not self.scheduler.has_work() and not self._sends and self.allocator.num_used == 0

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.transport is not None:
            self.transport.close()

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._stop:
                    return
                if not self.scheduler.has_work():
                    self._wake.wait(0.001 if self._sends else 0.05)
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
            self._poll_sends()

    def _admit(self, p: PendingPrefill) -> bool:
        """Reserve scratch blocks for the whole prompt (its chunks accumulate there)."""
        return self.allocator.allocate(p.request.request_id, p.num_tokens) is not None

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
            req = p.request
            kv = self.runner.gather_kv(self.allocator.table(req.request_id), p.num_tokens)  # [L, 2, n, KVH, D]
            with self._lock:
                self.allocator.free(req.request_id)
            finished = finish_reason(first, 1, req.sampling, req.eos_token_ids)
            nbytes = self._hand_off(req, first, kv) if finished is None else 0
            assert p.started is not None
            result = PrefillResult(
                req.request_id, first, finished, (p.started - p.enqueued) * 1000,
                (time.monotonic() - p.started) * 1000, nbytes, first_logprob=lp,
            )
            self._answer(req.request_id, result)
            self.requests_done += 1

    def _hand_off(self, req: PrefillRequest, first: int, kv: torch.Tensor) -> int:
        assert self.transport is not None
        dst = req.decode_rank
        seq = self._seq.get(dst, 0)
        self._seq[dst] = seq + 1
        transfer = self.transport.send(dst, seq, kv)
        self.peers[dst].kv_incoming(
            KVArrival(req.request_id, self.transport.rank, seq, len(req.token_ids), first, time.time())
        )
        self._sends.append((req.request_id, transfer))
        nbytes = kv.numel() * kv.element_size()
        self.kv_bytes_sent += nbytes
        return nbytes

    def _poll_sends(self) -> None:
        still = []
        for rid, t in self._sends:
            state = t.poll()
            if state is TransferState.PENDING and t.age > self.transport_cfg.timeout_s:
                t.fail("timed out")
                state = TransferState.FAILED
            if state is TransferState.FAILED:
                log.error("KV send for %s failed: %s", rid, t.error)
            elif state is TransferState.PENDING:
                still.append((rid, t))
        self._sends = still

    def _answer(self, request_id: str, result: PrefillResult) -> None:
        with self._lock:
            w = self._waiters.pop(request_id, None)
        if w is not None:
            w.result = result
            w.event.set()

    def _answer_all(self, batch: list[PendingPrefill], error: str) -> None:
        for p in batch:
            self._answer(p.request.request_id, PrefillResult.failed(p.request.request_id, error))

