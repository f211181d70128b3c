"""The aggregated worker (mode: aggregated): one worker prefills and decodes, no KV hand-off.

The baseline disaggregation is measured against: a BatchWorker (batch_worker.py) that computes all
its requests' prompts itself, into the blocks reserve() holds, with the same engine, schedulers and
step shape (engine/step_loop.py). The router drives it through the same calls as a decode + prefill
pair (reserve → prefill → poll), pointed at one actor.

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

from decode_worker.batch_worker import BatchWorker
from decode_worker.config import AggregatedConfig
from decode_worker.request import DecodeRequest
from engine.config import KVCacheConfig, ModelConfig
from engine.model_runner import SeqInput
from engine.prefill_scheduler import Chunk
from engine.prompt_queue import PromptQueue
from engine.step_loop import Step


class AggregatedWorker(BatchWorker):
    role = "aggregated"

    def __init__(
        self, worker_id: str, model_cfg: ModelConfig, kv_cfg: KVCacheConfig, cfg: AggregatedConfig,
        node: str = "local",
    ) -> None:
        super().__init__(worker_id, model_cfg, kv_cfg, cfg, node,
                         step_tokens=max(cfg.max_batch_size + cfg.max_recompute_tokens, cfg.max_batch_tokens),
                         share_cache=False, prompt_tokens=(cfg.max_batch_tokens, cfg.chunk_tokens))
        self.cfg = cfg
        self._members: set[str] = set()  # static batching: the batch being served

    # -- the loop ---------------------------------------------------------------------------------
    def _schedule(self) -> Step | None:
        with self.lock:
            self._emit(self._take_news())
            if self.cfg.batching == "static":
                batch, chunks, prompt_rows = self._plan_static()
                decode_rows, drafts = self._decode_rows(batch, self.cfg.max_batch_tokens - len(batch))
                recomputes, rows = self._recompute_rows(self.cfg.max_recompute_tokens)
            else:
                batch = self.scheduler.schedule()  # drafts (decode.speculative) first, then prompt chunks
                decode_rows, drafts = self._decode_rows(batch, self.cfg.max_batch_tokens - len(batch))
                left = self.cfg.max_batch_tokens - len(decode_rows)
                recomputes, rows = self._recompute_rows(min(self.cfg.max_recompute_tokens, left))
                chunks, prompt_rows = self._prompt_chunks(left - sum(c.length for c in recomputes))
        if not batch and not chunks and not recomputes:  # e.g. a static batch whose last member is being cancelled
            return None
        return Step(batch, chunks, decode_rows + prompt_rows + rows, recomputes, drafts)

    def _plan_static(self) -> tuple[list[DecodeRequest], list[Chunk], list[SeqInput]]:
        """Static batching: close a batch from the queue head when none runs; prefill all of it, then
        decode all of it; nobody joins until every member has finished."""
        waiting = self.prompts.scheduler.waiting
        self._members &= set(self.scheduler.requests)  # finished and cancelled members leave
        if not self._members:
            self._members = {p.request.request_id for p in list(waiting)[: self.cfg.max_batch_size]}
        chunks = self.prompts.scheduler.next_step(lambda p: p.request.request_id in self._members and self._admit(p))
        if chunks or any(p.request.request_id in self._members for p in waiting):
            tables = [self.scheduler.requests[c.pending.request.request_id].block_table for c in chunks]
            return [], chunks, PromptQueue.seqs(chunks, tables)  # the batch's prompts first
        return self.scheduler.schedule(), [], []
