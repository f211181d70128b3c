"""The aggregated worker (mode: aggregated): one worker prefills and decodes, no KV hand-off.

The baseline disaggregation is measured against: a BatchWorker (batch_worker.py) that computes its
requests' prompts itself, into the blocks reserve() holds, with the same engine, schedulers and step
shape (engine/step_loop.py). The router drives it through the same calls as a decode + prefill pair
(reserve → prefill → poll), pointed at one actor.

A request here goes:
  1. reserve()   blocks for the prompt are held (as on a decode worker; it grows, or is preempted
                 and recomputed, as there)
  2. prefill()   the prompt joins the prompt queue; the call returns once its first token is sampled.
                 When its first chunk is admitted, the head of its blocks becomes the longest
                 cached prefix of its prompt (kv_cache.prefix_cache), and computing starts after it
  3. each step (continuous batching, Sarathi-Serve): every running request decodes one token and
     prompt chunks fill the rest of `max_batch_tokens`; all of it is one forward, decode rows first,
     and one sample() over the decode rows and the prompts that complete
  4. a prompt's last chunk samples its first token; the request joins the decode batch next step
With `batching: static`, a batch of up to max_batch_size waiting prompts is prefilled, then decoded
until every member has finished; requests arriving meanwhile wait for the next batch.
"""
from __future__ import annotations

import time

import torch

from decode_worker.batch_worker import BatchWorker
from decode_worker.config import AggregatedConfig
from decode_worker.request import DecodeRequest
from engine.config import KVCacheConfig, ModelConfig
from engine.prefill_scheduler import Chunk, PendingPrefill
from engine.prompt_queue import PromptQueue
from engine.sampler import History, sample
from engine.step_loop import Step
from engine.types import PrefillRequest, PrefillResult, TokenLogprob, WorkerStats


class AggregatedWorker(BatchWorker):
    role = "aggregated"

    def __init__(
        self, worker_id: str, model_cfg: ModelConfig, kv_cfg: KVCacheConfig, cfg: AggregatedConfig,
        node: str = "local",
    ) -> None:
        super().__init__(worker_id, model_cfg, kv_cfg, cfg, node,
                         step_tokens=max(cfg.max_batch_size + cfg.max_recompute_tokens, cfg.max_batch_tokens), share_cache=False)
        self.cfg = cfg
        self.prompts = PromptQueue(cfg.max_batch_tokens, cfg.chunk_tokens)
        self._members: set[str] = set()  # static batching: the batch being served
        self.requests_prefilled = 0

    # -- called by the router ---------------------------------------------------------------------
    def prefill(self, request: PrefillRequest, timeout_s: float = 300.0) -> PrefillResult:
        """2. Compute the prompt into the blocks reserve() holds; block until its first token."""
        rid = request.request_id
        with self.lock:
            if rid in self.prompts:
                return PrefillResult.failed(rid, "request_id already being prefilled")
            if self.scheduler.start_prefill(rid) is None:
                return PrefillResult.failed(rid, "no KV reservation for this request on this worker (reserve first)")
            waiter = self.prompts.submit(request)
            self.nudge()
        assert waiter is not None
        result = self.prompts.wait(waiter, timeout_s)
        if result is None:
            self.cancel(rid)  # ends it here too: its blocks come back even if the router is gone
            return PrefillResult.failed(rid, f"prefill did not finish within {timeout_s:.0f}s")
        return result

    def cancel(self, request_id: str) -> bool:
        with self.lock:  # the prompt stops being computed before the loop frees its blocks
            self.prompts.cancel(request_id)
        return super().cancel(request_id)

    def stats(self) -> WorkerStats:
        s = super().stats()  # prompt_tokens_computed: the prompts computed here
        with self.lock:
            s.extra.update(waiting_tokens=self.prompts.scheduler.waiting_tokens,
                           requests_prefilled=self.requests_prefilled)
        return s

    def check_idle(self) -> bool:
        with self.lock:
            busy = self.prompts.scheduler.has_work()
        return not busy and super().check_idle()

    # -- the loop ---------------------------------------------------------------------------------
    def _idle(self) -> bool:
        return super()._idle() and not self.prompts.scheduler.has_work()

    def _schedule(self) -> Step | None:
        with self.lock:
            news = self._take_news()
            for ev in news:  # a request that ends here (cancel, expiry) takes its prompt along, even one
                self.prompts.cancel(ev.request_id)  # queued after the cancel was (the calls race)
            self._emit(news)
            self.prompts.scheduler.drop_cancelled()  # their blocks are freed by the decode scheduler's cancel
            if self.cfg.batching == "static":
                batch, chunks = self._plan_static()
                recomputes, rows = self._recompute_rows(self.cfg.max_recompute_tokens)
            else:
                batch = self.scheduler.schedule()
                left = self.cfg.max_batch_tokens - len(batch)
                recomputes, rows = self._recompute_rows(min(self.cfg.max_recompute_tokens, left))
                left -= sum(c.length for c in recomputes)
                chunks = self.prompts.scheduler.next_step(self._admit, left)
            tables = [self.scheduler.requests[c.pending.request.request_id].block_table for c in chunks]
        if not batch and not chunks and not recomputes:  # e.g. a static batch whose last member is being cancelled
            return None
        return Step(batch, chunks, self._decode_rows(batch) + PromptQueue.seqs(chunks, tables) + rows, recomputes)

    def _plan_static(self) -> tuple[list[DecodeRequest], list[Chunk]]:
        """Static batching: close a batch from the queue head when none runs; prefill all of it, then
        decode all of it; nobody joins until every member has finished."""
        waiting = self.prompts.scheduler.waiting
        self._members &= set(self.scheduler.requests)  # finished and cancelled members leave
        if not self._members:
            self._members = {p.request.request_id for p in list(waiting)[: self.cfg.max_batch_size]}
        chunks = self.prompts.scheduler.next_step(lambda p: p.request.request_id in self._members and self._admit(p))
        if chunks or any(p.request.request_id in self._members for p in waiting):
            return [], chunks  # the batch's prompts first
        return self.scheduler.schedule(), []

    def _admit(self, p: PendingPrefill) -> bool:
        """Its prompt starts after the longest cached prefix (held at the head of its blocks); False:
        wait a step for the block another prompt is computing."""
        cached = self.scheduler.share_prefix(p.request.request_id)
        if cached is None:
            return False
        p.computed = p.cached = cached
        return True

    def _postprocess(self, step: Step, logits: torch.Tensor) -> None:
        """logits [decode rows + prompt rows + recompute rows, V]: one sample() for the decode rows
        and the prompts that complete in this step."""
        self.prompt_tokens_computed += sum(c.length for c in step.prompts)
        self._recomputed(step.recomputes)
        with self.lock:
            for c in step.prompts:  # its computed blocks are findable now: a prompt sharing them waits no more
                self.allocator.commit(c.pending.request.request_id, c.start + c.length)
            done = self.prompts.finish(step.prompts)
        params, positions, histories = self._decode_sampling(step.decode)
        for p, _ in done:
            params.append(p.request.sampling)
            positions.append(p.num_tokens)
            histories.append(History(p.request.token_ids, ()))
        rows = list(range(len(step.decode))) + [step.prompt_rows.start + i for _, i in done]
        if not rows:  # only chunks that do not end their prompt
            return
        tokens, lps = sample(logits[rows], params, positions, histories)
        n = len(step.decode)
        if step.decode:
            self._decoded(step.decode, tokens[:n], lps[:n])
        for (p, _), first, lp in zip(done, tokens[n:], lps[n:]):
            self._prefilled(p, first, lp)

    def _prefilled(self, p: PendingPrefill, first: int, lp: TokenLogprob | None) -> None:
        req = p.request
        with self.lock:
            dreq = self.scheduler.on_prefilled(req.request_id, first)
            if dreq is None:  # cancelled while its last chunk ran
                return
            self.requests_prefilled += 1
            assert p.started is not None
            self.prompts.answer(req.request_id, PrefillResult(
                req.request_id, first, dreq.finish_reason, (p.started - p.enqueued) * 1000,
                (time.monotonic() - p.started) * 1000, 0, first_logprob=lp, cached_tokens=p.cached,
            ))

    def _fail_step(self, step: Step, error: str) -> None:
        with self.lock:
            ids = self.prompts.drop(step.prompts)
            for rid in ids:
                self.prompts.answer(rid, PrefillResult.failed(rid, error))
        self._fail_requests(ids + [r.request_id for r in step.decode] + [c.request.request_id for c in step.recomputes],
                            error)
