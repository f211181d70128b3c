"""Decode-side bookkeeping: reservations, KV arrival, the running batch. No model, no tensors.

Lifecycle of a request on this worker (the router's id is the only key):
  1. reserve()      RESERVED   its prompt's blocks are held (upfront: prompt + max_tokens), or the
                               worker says no
  2. start_write()  WRITING    a prefill worker was granted the write of its KV into those blocks
  3. on_kv_landed() READY      its KV sits in its blocks; first token known
  4. schedule()     RUNNING    joins the batch at the next step (continuous batching); each step
                               first gives every running request the slot of the token it feeds
  5. on_runs()      FINISHED   EOS / stop id / max_tokens; leaves the batch, blocks freed (a step's
                               tokens: one a row, or several where drafts were accepted)
  cancel() or expire() end it from any state and free its blocks at once, except WRITING: a
  cancelled request keeps its blocks until its write lands or fails (a freed block is never
  written into), then write_ended() frees them. Blocks let go of whose KV is complete stay cached
  for reuse (engine/prefix_cache.py: prompt and output, under the request's cache salt).
When the worker computes the prompt itself (decode_worker/aggregated.py; a decode worker's local
prefill) steps 2-3 are local: start_prefill() RESERVED → PREFILLING while this worker computes the
prompt into the reserved blocks — after the longest cached prefix, which share_prefix() puts at the
head of its table (or reserve() did: share_on_reserve) —, on_prefilled() → READY. A request that
asks for prompt logprobs shares no cached prefix: each of its prompt positions is computed.
Preemption, resume and recompute: decode_worker/preemption.py.
"""
from __future__ import annotations

import math
import time
from collections import deque

from decode_worker.preemption import Preemption
from decode_worker.request import DecodeRequest, DecodeStatus
from engine.kv_handoff.types import KVDestination
from engine.prefix_cache import PrefixCache
from engine.types import DecodeEvent, FinishReason, ReserveResult, SamplingParams, TokenLogprob


class DecodeScheduler(Preemption):
    def __init__(
        self, allocator: PrefixCache, max_batch_size: int, reserve_timeout_s: float, worker_id: str = "decode",
        on_demand: bool = False, watermark: float = 0.0, share_on_reserve: bool = False,
    ) -> None:
        """on_demand: hold a request's prompt blocks only and add blocks as it grows (preempting when
        the cache runs out); else hold prompt + max_tokens from the start. watermark: on_demand, the
        fraction of all blocks a new reservation must leave free (room for running requests to grow).
        share_on_reserve (a decode worker): a reservation holds the blocks of its prompt's longest
        cached prefix (they are not written); else prompts share at their admission (share_prefix)."""
        self.worker_id = worker_id
        self.allocator = allocator
        self.max_batch_size = max_batch_size
        self.reserve_timeout_s = reserve_timeout_s
        self.on_demand = on_demand
        self.share_on_reserve = share_on_reserve
        self.watermark_blocks = math.ceil(watermark * allocator.num_blocks) if on_demand else 0
        self.requests: dict[str, DecodeRequest] = {}
        self.ready: deque[str] = deque()
        self.running: list[str] = []  # by rank (priority, then arrival): the last is preempted first
        self.preempted: list[str] = []  # by rank: the first resumes first
        self.recomputing: list[str] = []
        self.tokens_generated = 0
        self.preemptions = 0
        self.hold_kv = False  # set by the worker while a step that may write a finishing request's blocks is in flight
        self.held: list[tuple[DecodeRequest, int]] = []  # (request, kv tokens) ended while hold_kv: freed by release_held()

    # -- 1. reserve ---------------------------------------------------------------------------
    def reserve(
        self, request_id: str, num_prompt_tokens: int, sampling: SamplingParams, eos_token_ids: tuple[int, ...],
        prompt_ids: list[int] | None = None, cache_salt: str = "",
    ) -> ReserveResult:
        if request_id in self.requests:
            return ReserveResult(False, f"request_id {request_id!r} is already in use")
        if prompt_ids is not None and len(prompt_ids) != num_prompt_tokens:
            return ReserveResult(False, f"prompt_ids: {len(prompt_ids)} ids for {num_prompt_tokens} prompt tokens")
        if (never := self._never_fits(num_prompt_tokens, sampling)) is not None:
            return never
        if self.preempted:  # preempted here, or moved here from a lost worker: they go first
            return ReserveResult(False, f"KV cache full: {len(self.preempted)} preempted requests wait for room first")
        # on demand, a request whose KV can be recomputed (its prompt ids are known) grows; others hold it all
        need = num_prompt_tokens + (0 if self.on_demand and prompt_ids is not None else sampling.max_tokens)
        fits = self._fits(self.allocator.blocks_for(need))
        shared = self._hold(request_id, need, prompt_ids, cache_salt, sampling.reuses_prefix) if fits else None
        if shared is None:
            return ReserveResult(
                False,
                f"KV cache full: needs {self.allocator.blocks_for(need)} blocks"
                + (f" (+{self.watermark_blocks} kept free to grow into)" if self.watermark_blocks else "")
                + f", {self.allocator.num_free} of {self.allocator.num_blocks} free",
            )
        req = self.requests[request_id] = DecodeRequest(
            request_id, num_prompt_tokens, sampling, eos_token_ids, list(self.allocator.table(request_id)), prompt_ids,
            cache_salt=None if prompt_ids is None else cache_salt, shared_tokens=shared,
        )
        return ReserveResult(True, dest=KVDestination(self.worker_id, tuple(req.block_table),
                                                      shared // self.allocator.block_size, shared))

    def _hold(self, request_id: str, need: int, prompt_ids: list[int] | None, cache_salt: str, reuse: bool,
              ) -> int | None:
        """Blocks for `need` tokens (share_on_reserve and reuse: the prompt's longest cached prefix
        first); → the prompt tokens whose KV they hold already, or None: no room."""
        if prompt_ids is not None and self.share_on_reserve:
            return self.allocator.allocate_prompt(request_id, prompt_ids, cache_salt, need, wait=False, reuse=reuse)
        if self.allocator.allocate(request_id, need) is None:
            return None
        if prompt_ids is not None:  # its blocks may be cached once computed
            self.allocator.track(request_id, prompt_ids, cache_salt)
        return 0

    # -- 2. write granted ---------------------------------------------------------------------
    def start_write(self, request_id: str, num_tokens: int) -> DecodeRequest | None:
        """RESERVED → WRITING: its blocks are now being written; None if it cannot be written."""
        req = self.requests.get(request_id)
        if req is None or req.status is not DecodeStatus.RESERVED or num_tokens != req.num_prompt_tokens:
            return None
        req.status = DecodeStatus.WRITING
        return req

    # -- 3. landed (or failed) ----------------------------------------------------------------
    def on_kv_landed(self, request_id: str, first_token: int) -> DecodeRequest | None:
        """The KV is in the request's blocks: append the prefill's first token, queue for the batch.
        None if it was cancelled while being written (it ends now, its blocks come back)."""
        req = self._write_ended(request_id)
        if req is None:
            return None
        req.output_ids.append(first_token)
        req.status = DecodeStatus.READY
        self.ready.append(request_id)
        self.allocator.commit(request_id, req.num_prompt_tokens)  # its prompt's blocks may be shared from now on
        return req

    def recompute_write(self, request_id: str, first_token: int) -> DecodeRequest | None:
        """The write failed, and this worker will compute the prompt's KV itself into the same
        blocks (transport.on_failure: recompute): WRITING → RECOMPUTING. None if it cannot be (gone,
        cancelled meanwhile — it ends here —, or no prompt ids)."""
        req = self._write_ended(request_id)
        if req is None:
            return None
        if req.prompt_ids is None:
            return None
        req.output_ids.append(first_token)
        self._start_recompute(req, req.shared_tokens)  # the shared blocks hold their KV (and are never written)
        return req

    def write_failed(self, request_id: str, error: str) -> DecodeEvent | None:
        """The write failed or timed out: the request ends (an error event unless it was cancelled)."""
        return self.fail(request_id, error) if self._write_ended(request_id) is not None else None

    def _write_ended(self, request_id: str) -> DecodeRequest | None:
        """The request whose write just ended, if it goes on; one cancelled meanwhile ends here."""
        req = self.requests.get(request_id)
        if req is None or req.status is not DecodeStatus.WRITING:
            return None
        if req.cancelled:
            self._finish(req, FinishReason.CANCELLED)
            return None
        return req

    # -- 2-3 computed here (aggregated; a decode worker's local prefill) -----------------------
    def start_prefill(self, request_id: str) -> DecodeRequest | None:
        """This worker computes the prompt itself; None unless the request is RESERVED here."""
        req = self.requests.get(request_id)
        if req is None or req.status is not DecodeStatus.RESERVED:
            return None
        req.status = DecodeStatus.PREFILLING
        return req

    def share_prefix(self, request_id: str) -> int | None:
        """PREFILLING, its prompt admitted to a step: the head of its table becomes the longest cached
        prefix of its prompt. → prompt tokens whose KV is there already (computing starts after
        them), or None: wait a step (another prompt is computing the block that comes next)."""
        req = self.requests.get(request_id)
        if req is None or req.cache_salt is None or req.prompt_ids is None:
            return 0
        if self.share_on_reserve:  # its reservation holds them already
            return req.shared_tokens
        cached = self.allocator.share_prefix(request_id, req.prompt_ids, req.cache_salt,
                                             reuse=req.sampling.reuses_prefix)
        if cached:
            req.block_table[: self.allocator.blocks_for(cached)] = self.allocator.table(request_id)[: self.allocator.blocks_for(cached)]
        return cached

    def on_prefilled(self, request_id: str, first_token: int) -> DecodeRequest | None:
        """The prompt's KV is in the blocks and its first token sampled: queue it for the batch, or
        finish it at once if that token ends it (its finish_reason is then set). None if gone."""
        req = self.requests.get(request_id)
        if req is None or req.status is not DecodeStatus.PREFILLING:
            return None
        req.output_ids.append(first_token)
        self.tokens_generated += 1  # sampled here (a handed-off request's first token counts on its prefill worker)
        reason = req.check_finished()
        if reason is not None:
            self._finish(req, reason)
        else:
            req.status = DecodeStatus.READY
            self.ready.append(request_id)
        return req

    # -- 4. schedule --------------------------------------------------------------------------
    def schedule(self) -> list[DecodeRequest]:
        """The batch of this step: everything running, topped up from READY — the lowest priority
        value first, then in READY's order (arrival; a resumed request ahead); each has a slot for
        the token it feeds (on_demand: a block more when it needs one, preempting the last requests
        by rank while none is free)."""
        while self.ready and len(self.running) < self.max_batch_size:
            rid = min(self.ready, key=self._priority)  # the first of the most urgent
            self.ready.remove(rid)
            req = self.requests.get(rid)
            if req is not None and req.status is DecodeStatus.READY:
                req.status = DecodeStatus.RUNNING
                self._insert_by_rank(self.running, req)
        bs = self.allocator.block_size
        for rid in list(self.running):  # first by rank first: it may take the blocks of later ones
            req = self.requests[rid]
            while req.status is DecodeStatus.RUNNING and len(req.block_table) * bs < req.num_tokens:
                new = self.allocator.grow(rid, req.num_tokens)
                if new is not None:
                    req.block_table.extend(new)
                    break
                self._preempt(self._victim())
        return [self.requests[rid] for rid in self.running]

    def _priority(self, request_id: str) -> int:
        req = self.requests.get(request_id)
        return 0 if req is None else req.sampling.priority

    # -- 5. tokens ----------------------------------------------------------------------------
    def on_tokens(
        self, batch: list[DecodeRequest], tokens: list[int], logprobs: list[TokenLogprob | None] | None = None
    ) -> list[DecodeEvent]:
        return self.on_runs(batch, [[t] for t in tokens], [[lp] for lp in logprobs] if logprobs else None)

    def on_runs(
        self, batch: list[DecodeRequest], runs: list[list[int]],
        logprobs: list[list[TokenLogprob | None]] | None = None,
    ) -> list[DecodeEvent]:
        """Each request's new tokens of this step, in order (several where drafts were accepted:
        decode_worker/decode_rows.py); the token that ends a request drops those after it."""
        events, made = [], 0
        for i, (req, run) in enumerate(zip(batch, runs)):
            if req.status is not DecodeStatus.RUNNING:  # cancelled while the forward ran
                continue
            reason, taken = None, 0
            while reason is None and taken < len(run):
                req.output_ids.append(run[taken])
                taken += 1
                reason = req.check_finished()
            made += taken
            lps = [lp for lp in logprobs[i][:taken] if lp is not None] if logprobs else None
            events.append(DecodeEvent(req.request_id, run if taken == len(run) else run[:taken], reason,
                                      logprobs=lps or None))
            if reason is not None:
                self._finish(req, reason)
        self.tokens_generated += made
        return events

    # -- ending -------------------------------------------------------------------------------
    def cancel(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None or req.cancelled:
            return False
        if req.status is DecodeStatus.WRITING:  # its blocks are being written: keep them until that ends
            req.cancelled = True
            return True
        self._finish(req, FinishReason.CANCELLED)
        return True

    def expire(self, now: float | None = None) -> list[DecodeEvent]:
        """End reservations whose prefill never reported back (router gone, prefill failed)."""
        now = time.monotonic() if now is None else now
        events = []
        for req in list(self.requests.values()):
            if req.status is DecodeStatus.RESERVED and now - req.created > self.reserve_timeout_s:
                events.append(DecodeEvent(req.request_id, [], FinishReason.ERROR, "KV reservation expired"))
                self._finish(req, FinishReason.ERROR)
        return events

    def fail(self, request_id: str, error: str) -> DecodeEvent | None:
        """End it with an error; none of its KV is kept (its step may have failed half-way)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, FinishReason.ERROR, keep_kv=False)
        return DecodeEvent(request_id, [], FinishReason.ERROR, error)

    def _finish(self, req: DecodeRequest, reason: FinishReason, keep_kv: bool = True) -> None:
        self._let_go(req, self._kv_tokens(req) if keep_kv else 0)
        req.status = DecodeStatus.FINISHED
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)
        for queue in (self.running, self.ready, self.preempted, self.recomputing):
            if req.request_id in queue:
                queue.remove(req.request_id)

    # -- introspection ------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return sum(1 for r in self.requests.values() if not r.cancelled) - len(self.running)

    def is_idle(self) -> bool:
        return not self.requests and not self.running and not self.ready and not self.preempted and not self.recomputing
