"""The aggregated worker (mode: aggregated): one worker prefills and decodes, no KV handoff.

The baseline disaggregation is measured against: the same engine, model runner and schedulers, with
prompts computed on the worker that holds the request's KV. The router drives it through the same
calls as a decode + prefill pair (reserve → prefill → poll), pointed at one actor.

A request here goes:
  1. reserve()   blocks for prompt + max_tokens are held (as on a decode worker)
  2. prefill()   the prompt joins the prefill queue; the call returns once its first token is sampled
  3. each step (continuous batching, Sarathi-Serve): every running request decodes one token and
     prompt chunks fill the rest of `max_batch_tokens`; all of it is one forward, decode rows first
  4. a prompt's last chunk samples its first token; the request joins the decode batch next step
With `batching: static`, a batch of up to max_batch_size waiting prompts is prefilled, then decoded
until every member has finished; requests arriving meanwhile wait for the next batch.
"""
from __future__ import annotations

import logging
import threading
import time

from decode_worker.config import AggregatedConfig
from decode_worker.request import DecodeRequest
from decode_worker.worker import DecodeWorker
from engine.config import KVCacheConfig, ModelConfig
from engine.model_runner import SeqInput
from engine.prefill_scheduler import Chunk, PendingPrefill, PrefillScheduler
from engine.sampler import History, sample
from engine.types import DecodeEvent, PrefillRequest, PrefillResult, TokenLogprob, WorkerStats

log = logging.getLogger(__name__)


class AggregatedWorker(DecodeWorker):
    role = "aggregated"

    def __init__(
        self, worker_id: str, model_cfg: ModelConfig, kv_cfg: KVCacheConfig, cfg: AggregatedConfig,
        node: str = "local",
    ) -> None:
        super().__init__(worker_id, model_cfg, kv_cfg, cfg, None, node)  # nothing is handed to it
        self.cfg = cfg
        self.prefills = PrefillScheduler(cfg.max_batch_tokens, cfg.chunk_tokens)
        self._waiters: dict[str, tuple[threading.Event, list[PrefillResult]]] = {}
        self._members: set[str] = set()  # static batching: the batch being served
        self.requests_prefilled = 0

    # -- called by the router ---------------------------------------------------------------------
    def prefill(self, request: PrefillRequest, timeout_s: float = 300.0) -> PrefillResult:
        """Compute the prompt into the blocks reserve() holds; block until its first token."""
        rid = request.request_id
        done = threading.Event()
        box: list[PrefillResult] = []
        pending = PendingPrefill(request)
        with self._wake:
            if rid in self._waiters:
                return PrefillResult.failed(rid, "request_id already being prefilled")
            if self.scheduler.start_prefill(rid) is None:
                return PrefillResult.failed(rid, "no KV reservation for this request on this worker (reserve first)")
            self._waiters[rid] = (done, box)
            self.prefills.add(pending)
            self._wake.notify()
        if not done.wait(timeout_s):
            self.cancel(rid)  # ends it here too: its blocks come back even if the router is gone
            return PrefillResult.failed(rid, f"prefill did not finish within {timeout_s:.0f}s")
        return box[0]

    def cancel(self, request_id: str) -> bool:
        with self._wake:  # the prompt stops being computed before the loop frees its blocks
            for p in [*self.prefills.waiting, *self.prefills.in_progress]:
                if p.request.request_id == request_id:
                    p.cancelled = True
                    self._answer(request_id, PrefillResult.failed(request_id, "cancelled"))
        return super().cancel(request_id)

    def stats(self) -> WorkerStats:
        s = super().stats()  # prompt_tokens_computed: the prompts computed here
        with self._lock:
            s.extra.update(waiting_tokens=self.prefills.waiting_tokens, requests_prefilled=self.requests_prefilled)
        return s

    def check_idle(self) -> bool:
        with self._lock:
            busy = self.prefills.has_work()
        return not busy and super().check_idle()

    # -- the loop ---------------------------------------------------------------------------------
    def _idle(self) -> bool:
        return super()._idle() and not self.prefills.has_work()

    def _work(self) -> list[DecodeEvent]:
        with self._lock:
            self.prefills.drop_cancelled()  # their blocks are freed by the decode scheduler's cancel
            if self.cfg.batching == "static":
                batch, chunks = self._plan_static()
            else:
                batch = self.scheduler.schedule()
                chunks = self.prefills.next_step(lambda p: True, self.cfg.max_batch_tokens - len(batch))
        if not batch and not chunks:  # e.g. a static batch whose last member is being cancelled
            with self._wake:
                self._wake.wait(0.001)
            return []
        try:
            return self._mixed_step(batch, chunks)
        except Exception as e:  # noqa: BLE001 — end what this step held, keep the worker alive
            log.exception("aggregated step failed")
            error = f"step failed: {type(e).__name__}: {e}"
            with self._lock:
                ids = {c.pending.request.request_id for c in chunks}
                self.prefills.in_progress = [p for p in self.prefills.in_progress if p.request.request_id not in ids]
                for rid in ids:
                    self.scheduler.fail(rid, error)
            for rid in ids:
                self._answer(rid, PrefillResult.failed(rid, error))
            return self._fail(batch, error)

    def _plan_static(self) -> tuple[list[DecodeRequest], list[Chunk]]:
        """Static batching: close a batch from the queue head when none runs; prefill all of it, then
        decode all of it; nobody joins until every member has finished."""
        self._members &= set(self.scheduler.requests)  # finished and cancelled members leave
        if not self._members:
            self._members = {p.request.request_id for p in list(self.prefills.waiting)[: self.cfg.max_batch_size]}
        chunks = self.prefills.next_step(lambda p: p.request.request_id in self._members)
        if chunks or any(p.request.request_id in self._members for p in self.prefills.waiting):
            return [], chunks  # the batch's prompts first
        return self.scheduler.schedule(), []

    def _mixed_step(self, batch: list[DecodeRequest], chunks: list[Chunk]) -> list[DecodeEvent]:
        """One forward: decode rows of `batch` first, then the prompt chunks."""
        t0 = time.monotonic()
        with self._lock:
            tables = [self.scheduler.requests[c.pending.request.request_id].block_table for c in chunks]
        seqs = self._decode_inputs(batch) + [
            SeqInput(c.pending.request.token_ids[c.start : c.start + c.length], c.start, table)
            for c, table in zip(chunks, tables)
        ]
        for c in chunks:
            if c.pending.started is None:
                c.pending.started = t0
        logits = self.runner.forward(seqs)  # [len(batch) + len(chunks), V]
        self.prompt_tokens_computed += sum(c.length for c in chunks)
        events = self._sample_decode(batch, logits[: len(batch)]) if batch else []
        with self._lock:
            done = self.prefills.advance(chunks)
        if done:
            rows = [len(batch) + i for i, c in enumerate(chunks) if c.completes]
            firsts, lps = sample(
                logits[rows], [p.request.sampling for p in done], [p.num_tokens for p in done],
                [History(p.request.token_ids, ()) for p in done],
            )
            for p, first, lp in zip(done, firsts, lps):
                self._prefilled(p, first, lp)
        return events

    def _prefilled(self, p: PendingPrefill, first: int, lp: TokenLogprob | None) -> None:
        req = p.request
        with self._lock:
            dreq = self.scheduler.on_prefilled(req.request_id, first)
        if dreq is None:  # cancelled while its last chunk ran
            return
        self.requests_prefilled += 1
        assert p.started is not None
        self._answer(req.request_id, PrefillResult(
            req.request_id, first, dreq.finish_reason, (p.started - p.enqueued) * 1000,
            (time.monotonic() - p.started) * 1000, 0, first_logprob=lp,
        ))

    def _answer(self, request_id: str, result: PrefillResult) -> None:
        w = self._waiters.pop(request_id, None)  # dict.pop is atomic; callers may hold the lock
        if w is not None:
            w[1].append(result)
            w[0].set()
