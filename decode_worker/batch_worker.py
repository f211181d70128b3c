"""What the decode and aggregated workers share: the paged KV cache, the requests that hold it, their
decode rows (continuous batching), and prompts computed here. A StepLoop (engine/step_loop.py): the
subclasses say how requests get their prompt's KV — handed off by a prefill worker (worker.py), or
computed here (aggregated.py always; a decode worker when the router sends it a prompt whose
uncached part is short: decode.local_prefill_max_tokens).

A request here goes:
  1. reserve()   the router asks for room for the prompt (kv_cache.allocation: upfront, prompt +
                 max_tokens) before any prefill work; the answer names the blocks (a KVDestination)
  2. the prompt's KV lands in those blocks — written by a prefill worker (worker.py), or computed
                 here: prefill() queues the prompt and returns once its first token is sampled;
                 its chunks share steps with the decode rows (Sarathi-Serve), after the prompt's
                 longest cached prefix. The request is READY with its first token
  3. every step: its decode row (its last token) joins the forward; the sampled token → DecodeEvent.
                 When the cache runs out, the newest requests are preempted and later resumed: their
                 KV is computed again here in chunks (recompute rows) before they decode on
  4. poll()      the router long-polls events and streams them to clients
  5. cancel()    from any state: the request leaves at the next step, its blocks are freed (while
                 its KV is being written: once the write has ended)
Decode-only steps may run in flight, one queued behind another (decode_worker/steps_in_flight.py).
"""
from __future__ import annotations

import time
import uuid
from collections import deque

import torch

from decode_worker.config import BatchConfig
from decode_worker.decode_rows import DecodeRows
from decode_worker.preemption import Recompute
from decode_worker.request import DecodeRequest
from decode_worker.scheduler import DecodeScheduler
from decode_worker.steps_in_flight import StepsInFlight
from engine import kv_budget
from engine.config import KVCacheConfig, ModelConfig
from engine.event_stream import EventBatch, EventOutbox
from engine.kv_handoff import shared_cache
from engine.model_loader import load_model, load_tokenizer
from engine.model_runner import ModelRunner, SeqInput
from engine.prefill_scheduler import Chunk, PendingPrefill
from engine.prefix_cache import PrefixCache
from engine.prompt_queue import PromptQueue
from engine.sampler import History, sample
from engine.step_loop import Step, StepLoop
from engine.structured import Guides
from engine.think_budget import forced_first
from engine.types import (
    DecodeEvent, FinishReason, PrefillRequest, PrefillResult, ReserveResult, SamplingParams, TokenLogprob, WorkerStats,
    banned_now,
)


class BatchWorker(DecodeRows, StepsInFlight, StepLoop):
    role = "decode"

    def __init__(
        self, worker_id: str, model_cfg: ModelConfig, kv_cfg: KVCacheConfig, cfg: BatchConfig, node: str,
        step_tokens: int, share_cache: bool, prompt_tokens: tuple[int, int], share_on_reserve: bool = False,
    ) -> None:
        """step_tokens: the most tokens one forward here runs (sizes the memory profile);
        share_cache: allocate the KV cache so prefill workers on this node can write into it;
        prompt_tokens: (most prompt tokens in one step, longest chunk) of the prompts computed here;
        share_on_reserve: a reservation holds the blocks of its prompt's cached prefix (scheduler.py)."""
        super().__init__()
        torch.set_num_threads(cfg.torch_threads)
        self.worker_id, self.node = worker_id, node
        self.boot_id = uuid.uuid4().hex[:12]
        self.model_cfg = model_cfg
        model = load_model(model_cfg)
        blocks = kv_budget.num_blocks(kv_cfg, model, cfg.num_gpus, step_tokens, model_cfg.max_model_len,
                                      cfg.max_batch_size)
        self.cache_handle: shared_cache.SharedCache | None = None
        kv, dtype = None, kv_budget.cache_dtype(kv_cfg.dtype, model)
        if share_cache:
            shape = ModelRunner.cache_shape(model.config, blocks, kv_cfg.block_size)
            kv, self.cache_handle = shared_cache.allocate(shape, dtype, model_cfg.device, worker_id)
        self.runner = ModelRunner(model, blocks, kv_cfg.block_size, model_cfg.kernels, kv=kv, kv_dtype=dtype)
        self.runner.load_adapters(model_cfg.lora_adapters)
        if cfg.cuda_graphs and self.runner.device.type == "cuda" and self.runner.attn.name == "triton":
            self.runner.use_decode_graphs(cfg.max_batch_size, model_cfg.max_model_len, max_rows=step_tokens)
        self.allocator = PrefixCache(blocks, kv_cfg.block_size, enabled=kv_cfg.prefix_cache)
        self.scheduler = DecodeScheduler(self.allocator, cfg.max_batch_size, cfg.reserve_timeout_s, worker_id,
                                         kv_cfg.allocation == "on_demand", kv_cfg.watermark, share_on_reserve)
        self.prompt_tokens_computed = 0  # tokens at prompt positions run through the model here (recomputes too)
        self.recomputed_tokens = 0  # KV of preempted requests (and failed hand-offs) computed again here
        self.prompts = PromptQueue(*prompt_tokens)  # prompts computed here (2.)
        self.requests_prefilled = 0  # prompts whose first token was sampled here
        self._inbox: deque[str] = deque()  # request ids to cancel at the next step
        self.outbox = EventOutbox()  # this worker's events to the router (engine/event_stream.py)
        self._follows = 0  # steps in a row that followed one in flight
        self.overlap_steps = cfg.overlap_steps
        self.lookup = cfg.speculative.lookup  # drafts of decode rows (decode_worker/decode_rows.py)
        self.draft_tokens = self.accepted_tokens = 0
        self.guides = Guides(lambda: load_tokenizer(model_cfg), model.config.vocab_size)  # structured outputs

    # -- called by the router -------------------------------------------------------------------
    def ready(self) -> str:
        """This process's boot id: it changes when Ray restarts the worker."""
        return self.boot_id

    def reserve(
        self, request_id: str, num_prompt_tokens: int, sampling: SamplingParams, eos_token_ids: tuple[int, ...],
        prompt_ids: list[int] | None = None, cache_salt: str = "",
    ) -> ReserveResult:
        """1. A grammar (structured output) is compiled here, before its first step needs it."""
        if error := self._unfit(sampling):
            return error
        with self.lock:
            return self.scheduler.reserve(request_id, num_prompt_tokens, sampling, eos_token_ids, prompt_ids, cache_salt)

    def adopt(
        self, request_id: str, prompt_ids: list[int], output_ids: list[int], sampling: SamplingParams,
        eos_token_ids: tuple[int, ...], cache_salt: str = "",
    ) -> ReserveResult:
        """A request whose decode worker was lost goes on here: its KV is recomputed from its prompt
        and the tokens streamed so far (as after a preemption), then it decodes on."""
        if error := self._unfit(sampling):
            return error
        with self.wake:
            r = self.scheduler.adopt(request_id, prompt_ids, output_ids, sampling, eos_token_ids, cache_salt)
            self.nudge()
        return r

    def _unfit(self, sampling: SamplingParams) -> ReserveResult | None:
        """A refusal where this worker cannot run the request: a grammar that does not compile, a LoRA
        adapter it does not hold (the router checks the same config: a mismatch is a deployment's)."""
        if sampling.grammar and (error := self.guides.prepare(sampling.grammar, sampling.grammar_free_opener)):
            return ReserveResult(False, f"structured output: {error}", refused_field="structured")
        if sampling.adapter and sampling.adapter not in self.runner.adapters:
            return ReserveResult(False, f"no LoRA adapter {sampling.adapter!r} here", refused_field="lora_adapter")
        return None

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
        """5."""
        with self.wake:
            self.prompts.cancel(request_id)  # its prompt stops being computed before the loop frees its blocks
            found = request_id in self.scheduler.requests
            self._inbox.append(request_id)
            self.nudge()
        return found

    def poll(self, timeout_s: float = 0.5, log: str = "", acked: int = 0) -> EventBatch:
        """4. Long-poll: the events of every frame after `acked` of `log` (the router's last), waiting
        up to timeout_s for one (engine/event_stream.py, step 5)."""
        return self.outbox.poll(timeout_s, log, acked)

    def open_event_stream(self) -> tuple[str, int, str, str]:
        """4, pushed: (host, port, secret, log) of the socket that carries this worker's events to
        the router instead of poll() (engine/event_stream.py)."""
        return self.outbox.open_stream()

    def stats(self) -> WorkerStats:
        with self.lock:
            s = self.scheduler
            return WorkerStats(
                self.role, self.worker_id, self.node, s.num_running, s.num_waiting,
                self.allocator.num_used, self.allocator.num_blocks, self.prompt_tokens_computed,
                s.tokens_generated, {"steps": self.steps, "loop_s": dict(self.loop_s),
                                     "attention": self.runner.attn.name,
                                     "graph_replays": 0 if self.runner.graphs is None else self.runner.graphs.replays,
                                     "preemptions": s.preemptions, "preempted": len(s.preempted),
                                     "recomputed_tokens": self.recomputed_tokens,
                                     "prefix_hit_tokens": self.allocator.hit_tokens,
                                     "prefix_query_tokens": self.allocator.query_tokens,
                                     "prefix_cached_blocks": self.allocator.num_cached,
                                     "requests_prefilled": self.requests_prefilled,
                                     "waiting_tokens": self.prompts.scheduler.waiting_tokens,
                                     "event_frames": self.outbox.frames_sent,
                                     "steps_overlapped": self.steps_overlapped,
                                     "draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens},
            )

    def check_idle(self) -> bool:
        """True when no request is held and every block is free (integrity-checked)."""
        with self.lock:
            self.allocator.check()
            return (self.scheduler.is_idle() and self.allocator.num_used == 0
                    and not self.prompts.scheduler.has_work())

    def shutdown(self) -> None:
        self.stop()
        self.outbox.close()

    # -- for the loop ---------------------------------------------------------------------------
    def _idle(self) -> bool:
        s = self.scheduler
        return (not s.running and not s.ready and not s.preempted and not s.recomputing and not self._inbox
                and not self.prompts.scheduler.has_work())

    def _emit(self, events: list[DecodeEvent | None]) -> None:
        self.outbox.emit(events)

    def _take_news(self) -> list[DecodeEvent]:
        """Under `lock`, first thing each step: cancels, and reservations whose KV never came. A
        request that ends here takes its prompt along, even one queued after the cancel was (the
        calls race)."""
        self.scheduler.release_held()  # nothing is in flight at a complete turn (even after a step that failed)
        events: list[DecodeEvent] = []
        while self._inbox:
            rid = self._inbox.popleft()
            if self.scheduler.cancel(rid):
                events.append(DecodeEvent(rid, [], FinishReason.CANCELLED))
        events += self.scheduler.expire()
        for ev in events:
            self.prompts.cancel(ev.request_id)
        self.prompts.scheduler.drop_cancelled()  # their blocks are freed by the decode scheduler's cancel
        return events

    def _prompt_chunks(self, budget: int) -> tuple[list[Chunk], list[SeqInput]]:
        """Under `lock`: this step's chunks (at most `budget` tokens) of the prompts computed here,
        with their rows."""
        chunks = self.prompts.scheduler.next_step(self._admit, budget)
        tables = [self.scheduler.requests[c.pending.request.request_id].block_table for c in chunks]
        return chunks, PromptQueue.seqs(chunks, tables)

    def _admit(self, p: PendingPrefill) -> bool:
        """Its prompt starts after the longest cached prefix (held at the head of its blocks); False:
        wait a step for the block another prompt is computing."""
        cached = self.scheduler.share_prefix(p.request.request_id)
        if cached is None:
            return False
        p.computed = p.cached = cached
        return True

    def _recompute_rows(self, budget: int) -> tuple[list[Recompute], list[SeqInput]]:
        """Under `lock`: resume preempted requests that fit now, and this step's chunks (at most
        `budget` tokens) of the KV being computed again, with their rows."""
        self.scheduler.resume()
        chunks = self.scheduler.recompute_chunks(budget)
        return chunks, [SeqInput(c.request.recompute_ids()[c.start : c.start + c.length], c.start,
                                 c.request.block_table, adapter=c.request.sampling.adapter) for c in chunks]

    def _recomputed(self, chunks: list[Recompute]) -> None:
        n = sum(c.length for c in chunks)
        self.prompt_tokens_computed += n
        self.recomputed_tokens += n
        with self.lock:
            self.scheduler.on_recomputed(chunks)

    def _decoded(self, batch: list[DecodeRequest], runs: list[list[int]],
                 lps: list[list[TokenLogprob | None]]) -> None:
        """Each row's new tokens to its request; finished ones leave and free their blocks."""
        with self.lock:
            events = self.scheduler.on_runs(batch, runs, lps)
        self._emit(events)  # type: ignore[arg-type]

    def _postprocess(self, step: Step, logits: torch.Tensor) -> None:
        """logits [decode rows + prompt rows + recompute rows, V]: one sample() for the decode rows
        (a request's drafts included: decode_worker/decode_rows.py) and the prompts that complete
        in this step."""
        self.prompt_tokens_computed += sum(c.length for c in step.prompts)
        self._recomputed(step.recomputes)
        with self.lock:
            for c in step.prompts:  # its computed blocks are findable now: a prompt sharing them waits no more
                self.allocator.commit(c.pending.request.request_id, c.start + c.length)
            done = self.prompts.finish(step.prompts, {i - step.prompt_rows.start: lps for i, lps in step.scores.items()})
        params, positions, histories, banned, guides, forced = self._decode_samples(step)
        for p, _ in done:
            params.append(p.request.sampling)
            positions.append(p.num_tokens)
            histories.append(History(p.request.token_ids, ()))
            banned.append(banned_now(p.request.sampling, 0, p.request.eos_token_ids))
            r = self.scheduler.requests.get(p.request.request_id)
            guides.append(None if r is None else self._guide(r))
            forced.append(forced_first(p.request.sampling))
        n = step.decode_rows
        if not n and not done:  # only chunks that do not end their prompt
            return
        # no prompt ended here: the decode rows are the first n, taken as a view (no gather)
        picked = logits[list(range(n)) + [step.prompt_rows.start + i for _, i in done]] if done else logits[:n]
        tokens, lps = sample(picked, params, positions, histories, banned, guides, forced)
        if step.decode:
            self._decoded(step.decode, *self._accepted(step, tokens[:n], lps[:n]))
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
                prompt_logprobs=p.scored(),
            ))

    def _fail_step(self, step: Step, error: str) -> None:
        with self.lock:
            ids = self.prompts.drop(step.prompts)
            for rid in ids:
                self.prompts.answer(rid, PrefillResult.failed(rid, error))
        self._fail_requests(ids + [r.request_id for r in step.decode] + [c.request.request_id for c in step.recomputes],
                            error)

    def _fail_requests(self, ids: list[str], error: str) -> None:
        with self.lock:
            self._emit([self.scheduler.fail(rid, error) for rid in ids])
