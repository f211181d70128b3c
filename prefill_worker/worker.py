"""The prefill worker. Runs as a Ray actor (cluster/), one per GPU (or CPU slot).

A request here goes:
  1. prefill()   the router hands over the tokenized prompt and the destination (decode worker id
                 and the block ids it reserved) — or the prompt alone, the destination following
                 by destine() once the reservation is made (the router reserves while the prompt
                 computes: router/dispatcher.py, step 2); a prompt computed before its destination
                 came waits for it, holding its scratch blocks
  2. schedule: the loop packs waiting prompts into one forward under `max_batch_tokens`; prompts
     longer than `chunk_tokens` go one chunk per step (their scratch KV grows chunk by chunk)
  3. run, postprocess: once a prompt's last chunk is computed, samples its first token
     (schedule → run → postprocess is every worker's step: engine/step_loop.py)
  4. hands a WriteJob to the link of that decode worker (engine/kv_handoff, steps 3-5) and goes on
     with the next step; the link asks for the write, answers the router with the first token
     once it is granted (or with the refusal as the error), writes the scratch blocks into the
     reserved ones and frees the scratch blocks
The router's calls may run in any order (the actor serves them on many threads): a destination
that comes before its prompt waits for it, and so does a cancel (the prompt is then refused when it
comes); either is dropped after transport.timeout_s if no prompt comes.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from engine import kv_budget
from engine.config import ModelConfig, TransportConfig
from engine.kv_handoff import (
    Backend, DecodeEndpoint, DecodePeer, HandoffSender, KVDestination, PairChannel, TorchPairChannel, WriteGrant,
    WriteJob,
)
from engine.model_loader import load_model, load_tokenizer
from engine.model_runner import ModelRunner
from engine.prefill_scheduler import PendingPrefill
from engine.prefix_cache import PrefixCache
from engine.prompt_queue import PromptQueue
from engine.sampler import History, sample
from engine.step_loop import Step, StepLoop
from engine.structured import Guide, Guides
from engine.think_budget import forced_first
from engine.types import (
    FinishReason, PrefillRequest, PrefillResult, TokenLogprob, WorkerStats, banned_now, finish_reason,
)
from prefill_worker.config import PrefillConfig

log = logging.getLogger(__name__)


@dataclass
class _Parked:
    """A prompt computed before its destination came (step 1's destine)."""

    pending: PendingPrefill
    first: int
    result: PrefillResult


class _Recent:
    """Request ids noted with a value, each forgotten `ttl_s` after it was noted (kept in the order
    noted, so forgetting looks only at the oldest)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._d: dict[str, tuple[Any, float]] = {}  # request id → (value, when noted)

    def put(self, request_id: str, value: Any) -> None:
        now = time.monotonic()
        while self._d and now - next(iter(self._d.values()))[1] > self.ttl_s:
            del self._d[next(iter(self._d))]
        self._d.pop(request_id, None)  # noted again: it moves to the end
        self._d[request_id] = (value, now)

    def pop(self, request_id: str) -> Any:
        """Its value (None if not noted), forgotten."""
        v = self._d.pop(request_id, None)
        return None if v is None else v[0]

    def __len__(self) -> int:
        return len(self._d)


class PrefillWorker(StepLoop):
    role = "prefill"

    def __init__(
        self, worker_id: str, model_cfg: ModelConfig, cfg: PrefillConfig, transport_cfg: TransportConfig,
        block_size: int, node: str = "local", kv_dtype: str = "auto",
    ) -> None:
        """block_size, kv_dtype: the decode workers' (kv_cache.block_size, .dtype): blocks are copied whole
        between caches."""
        super().__init__()
        torch.set_num_threads(cfg.torch_threads)
        self.worker_id, self.node = worker_id, node
        self.boot_id = uuid.uuid4().hex[:12]
        self.model_cfg, self.cfg, self.transport_cfg = model_cfg, cfg, transport_cfg
        blocks = max(cfg.kv_blocks, -(-max(cfg.max_batch_tokens, model_cfg.max_model_len) // block_size))
        model = load_model(model_cfg)
        self.runner = ModelRunner(model, blocks, block_size, model_cfg.kernels,
                                  kv_dtype=kv_budget.cache_dtype(kv_dtype, model))
        self.runner.load_adapters(model_cfg.lora_adapters)
        self.guides = Guides(lambda: load_tokenizer(model_cfg), model.config.vocab_size)  # structured outputs
        # scratch blocks: a prompt's are released once handed off, its full ones kept for reuse
        self.allocator = PrefixCache(blocks, block_size, enabled=cfg.prefix_cache)
        self.prompts = PromptQueue(cfg.max_batch_tokens, cfg.chunk_tokens)
        self.sender = HandoffSender(worker_id, self.runner.kv_bytes, block_size, transport_cfg.timeout_s)
        self.prompt_tokens_computed = 0
        self.requests_done = 0
        self._dests = _Recent(transport_cfg.timeout_s)  # request id → its destination, come before its prompt was computed
        self._parked: dict[str, _Parked] = {}  # request id → its prompt, computed, waiting for its destination
        self._cancelled = _Recent(transport_cfg.timeout_s)  # request ids cancelled while their prompt was not here

    # -- wiring ---------------------------------------------------------------------------------
    def ready(self) -> str:
        """This process's boot id: it changes when Ray restarts the worker."""
        return self.boot_id

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

    def disconnect(self, dst: str) -> bool:
        """Decode worker `dst` is gone: stop writing to it and let go of its cache and channel now,
        not when (if ever) it is re-wired. Its prefills still waiting here fail at their hand-off."""
        return self.sender.disconnect(dst, f"decode worker {dst} is gone")

    # -- called by the router ---------------------------------------------------------------------
    def prefill(self, request: PrefillRequest, timeout_s: float = 300.0) -> PrefillResult:
        """1. Block until the first token is sampled (or the deadline passes). A grammar (structured
        output) is compiled here, before the step that samples with it."""
        rid = request.request_id
        sp = request.sampling
        if sp.grammar and (error := self.guides.prepare(sp.grammar, sp.grammar_free_opener)):
            return PrefillResult.failed(rid, f"structured output: {error}", refused_field="structured")
        if sp.adapter and sp.adapter not in self.runner.adapters:  # (the router checks it against the same config)
            return PrefillResult.failed(rid, f"no LoRA adapter {sp.adapter!r} here", refused_field="lora_adapter")
        if request.dest is not None and request.dest.worker_id not in self.sender.links:
            return PrefillResult.failed(rid, f"no hand-off link to decode worker {request.dest.worker_id}", handoff=True)
        with self.lock:
            if self._cancelled.pop(rid):  # its cancel ran first
                return PrefillResult.failed(rid, "cancelled")
            if rid in self._parked:
                return PrefillResult.failed(rid, "request_id already being prefilled")
            waiter = self.prompts.submit(request)
            if waiter is None:
                return PrefillResult.failed(rid, "request_id already being prefilled")
            self.nudge()
        result = self.prompts.wait(waiter, timeout_s)
        if result is None:
            self.cancel(rid)
            with self.lock:
                self.prompts.forget(rid)
            return PrefillResult.failed(rid, f"prefill did not finish within {timeout_s:.0f}s")
        return result

    def destine(self, request_id: str, dest: KVDestination) -> None:
        """1, the destination of a prompt sent without one: its hand-off starts once the prompt is
        computed (at once if it is already)."""
        with self.lock:
            parked = self._parked.pop(request_id, None)
            if parked is None:
                self._dests.put(request_id, dest)
                return
        self._hand_off(parked, dest)

    def cancel(self, request_id: str) -> bool:
        """Stop the prompt (computing, or computed and waiting for its destination) and answer its
        caller 'cancelled'; a prompt not here yet is refused when it comes."""
        with self.lock:
            found = self.prompts.cancel(request_id)
            self._dests.pop(request_id)
            parked = self._parked.pop(request_id, None)
            if parked is not None:
                self.allocator.release(request_id, parked.pending.num_tokens)
                self.prompts.answer(request_id, PrefillResult.failed(request_id, "cancelled"))
            elif not found:  # not here yet, or its first token being sampled right now: refused when it comes
                self._cancelled.put(request_id, True)
            self.nudge()
        return found or parked is not None

    def stats(self) -> WorkerStats:
        with self.lock:
            return WorkerStats(
                self.role, self.worker_id, self.node, self.prompts.num_waiting_callers,
                len(self.prompts.scheduler.waiting), self.allocator.num_used, self.allocator.num_blocks,
                self.prompt_tokens_computed, self.requests_done,
                {"steps": self.steps, "loop_s": dict(self.loop_s), "kv_bytes_sent": self.sender.bytes_sent,
                 "writes_in_flight": self.sender.in_flight, "parked": len(self._parked),
                 "links": {dst: link.backend.value for dst, link in self.sender.links.items()},
                 "waiting_tokens": self.prompts.scheduler.waiting_tokens,
                 "prefix_hit_tokens": self.allocator.hit_tokens, "prefix_query_tokens": self.allocator.query_tokens,
                 "prefix_cached_blocks": self.allocator.num_cached, "requests_prefilled": self.requests_done},
            )

    def check_idle(self) -> bool:
        with self.lock:
            self.allocator.check()
            return not self.prompts.scheduler.has_work() and not self.sender.in_flight and self.allocator.num_used == 0

    def shutdown(self) -> None:
        self.stop()
        self.sender.close()

    # -- the loop -------------------------------------------------------------------------------
    def _idle(self) -> bool:
        return not self.prompts.scheduler.has_work()

    def _schedule(self) -> Step | None:
        """2. Prompts (chunks) under the token budget, each admitted with scratch blocks for all of it."""
        with self.lock:
            for p in self.prompts.scheduler.drop_cancelled():
                self.allocator.release(p.request.request_id, p.computed)
            chunks = self.prompts.scheduler.next_step(self._admit)
            tables = [self.allocator.table(c.pending.request.request_id) for c in chunks]
        return Step(prompts=chunks, seqs=PromptQueue.seqs(chunks, tables)) if chunks else None

    def _admit(self, p: PendingPrefill) -> bool:
        """Hold scratch blocks for the whole prompt (its chunks accumulate there), its longest cached
        prefix among them: computing starts after it (none for a prompt that asked for prompt
        logprobs: each position is computed). An id whose previous KV is still being handed off
        waits for it."""
        try:
            cached = self.allocator.allocate_prompt(p.request.request_id, p.request.token_ids, p.request.cache_salt,
                                                    reuse=p.request.sampling.reuses_prefix)
        except KeyError:
            return False
        if cached is None:
            return False
        p.computed = p.cached = cached
        return True

    def _postprocess(self, step: Step, logits: torch.Tensor) -> None:
        """3. logits [chunks, V] (each chunk's last position): first tokens of the completed prompts."""
        self.prompt_tokens_computed += sum(c.length for c in step.prompts)
        with self.lock:
            for c in step.prompts:  # its computed blocks are findable now: a prompt sharing them waits no more
                self.allocator.commit(c.pending.request.request_id, c.start + c.length)
            done = self.prompts.finish(step.prompts, step.scores)
        if not done:
            return
        guides = [self.guides.new(p.request.sampling.grammar, p.request.sampling.grammar_after,
                                  p.request.sampling.grammar_free_opener)
                  if p.request.sampling.grammar else None
                  for p, _ in done]
        firsts, lps = sample(
            logits[[i for _, i in done]], [p.request.sampling for p, _ in done], [p.num_tokens for p, _ in done],
            [History(p.request.token_ids, ()) for p, _ in done],
            [banned_now(p.request.sampling, 0, p.request.eos_token_ids) for p, _ in done], guides,
            [forced_first(p.request.sampling) for p, _ in done],
        )
        for (p, _), first, lp, guide in zip(done, firsts, lps, guides):
            self._prefilled(p, first, lp, guide)

    def _fail_step(self, step: Step, error: str) -> None:
        with self.lock:
            for rid in self.prompts.drop(step.prompts):
                self.allocator.release(rid)
                self.prompts.answer(rid, PrefillResult.failed(rid, f"prefill {error}"))

    def _prefilled(self, p: PendingPrefill, first: int, lp: TokenLogprob | None, guide: Guide | None = None) -> None:
        """4. The prompt is computed: answer at once if its first token ends it (or its grammar:
        `guide`), else hand its KV off (the router is answered when the write is granted)."""
        req = p.request
        assert p.started is not None
        finished = finish_reason(first, 1, req.sampling, req.eos_token_ids)
        if finished is None and guide is not None:
            guide.follow([first])
            finished = FinishReason.STOP if guide.complete else None
        result = PrefillResult(
            req.request_id, first, finished,
            (p.started - p.enqueued) * 1000, (time.monotonic() - p.started) * 1000, 0, first_logprob=lp,
            cached_tokens=p.cached, prompt_logprobs=p.scored(),
        )
        self.requests_done += 1
        parked = _Parked(p, first, result)
        with self.lock:
            tombstone = bool(self._cancelled.pop(req.request_id))  # cancelled while its first token was sampled
            cancelled = p.cancelled or (tombstone and req.dest is None)  # p.cancelled: while its last chunk ran
            dest = req.dest if req.dest is not None else self._dests.pop(req.request_id)
            if not cancelled and result.finished is None and dest is None:  # destine() hands it off
                self._parked[req.request_id] = parked
                return
        if cancelled or result.finished is not None:
            self._release(req.request_id, p.num_tokens)
            self._answer(req.request_id, PrefillResult.failed(req.request_id, "cancelled") if cancelled else result)
            return
        self._hand_off(parked, dest)

    def _hand_off(self, parked: _Parked, dest: KVDestination) -> None:
        """4, to `dest`; the router is answered when the write is granted (or refused)."""
        p, rid = parked.pending, parked.pending.request.request_id
        nbytes = (self.allocator.blocks_for(p.num_tokens) - dest.shared_blocks) * self.sender.block_bytes

        def granted(grant: WriteGrant) -> None:
            self._answer(rid, dataclasses.replace(parked.result, kv_bytes=nbytes) if grant.ok
                         else PrefillResult.failed(rid, f"KV hand-off refused: {grant.reason}", handoff=True))

        self.sender.submit(WriteJob(rid, dest, p.num_tokens, parked.first, list(self.allocator.table(rid)),
                                    granted, lambda: self._release(rid, p.num_tokens)))

    def _release(self, request_id: str, computed: int) -> None:
        """The scratch blocks are free again (handed off, or not needed; the full ones of its
        `computed` prompt tokens cached): a prompt may be waiting for them."""
        with self.lock:
            self.allocator.release(request_id, computed)
            self.nudge()

    def _answer(self, request_id: str, result: PrefillResult) -> None:
        with self.lock:
            self.prompts.answer(request_id, result)
