"""A decode (or aggregated) worker's steps in flight (engine/step_loop.py): while the running batch
is all there is to attend to, the next decode step is queued on the device behind the one in
flight, fed the tokens that one draws, before the host has read them.

  1. launch: only a decode-only step through the CUDA graphs (decode.overlap_steps), without drafts
     (decode.speculative); its rows are sampled on the device at once, unless one needs the tokens
     before it (penalties, a grammar): that batch is sampled once the step before is complete;
  2. follow: the same rows, each fed its token at the position it takes, while nothing else waits
     (no cancel, arrival, preempted request or prompt: `_quiet`) and no row could feed drafts
     (decode.speculative: a full batch, or every row waiting after misses), a row whose token starts a
     block given one here, and at most MAX_FOLLOWS steps in a row (a complete turn then runs the
     rest: reservations expire there);
  3. complete: the host waits for a step's tokens and hands them to the scheduler; the blocks of
     rows that ended stay held while the step behind may still write into them.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from decode_worker.request import DecodeRequest, DecodeStatus
from decode_worker.scheduler import DecodeScheduler
from engine.model_runner import ModelRunner, SeqInput
from engine.prefix_cache import PrefixCache
from engine.prompt_queue import PromptQueue
from engine.sampler import needs_history, sample_queued
from engine.speculative import Lookup
from engine.step_loop import InFlight, Step

MAX_FOLLOWS = 64  # steps that follow one in flight before a complete turn


class StepsInFlight:
    """Mixin of BatchWorker: the state it reads is set up in BatchWorker.__init__."""

    runner: ModelRunner
    scheduler: DecodeScheduler
    allocator: PrefixCache
    prompts: PromptQueue
    lock: threading.Lock
    overlap_steps: bool
    lookup: Lookup
    _inbox: deque[str]
    _follows: int

    if TYPE_CHECKING:  # BatchWorker's own
        def _decode_sampling(self, batch: list[DecodeRequest], pending: int = 0) -> tuple[Any, ...]: ...
        def _emit(self, events: list[Any]) -> None: ...

    def _may_launch(self, step: Step) -> bool:
        """A decode-only step through the CUDA graphs."""
        g = self.runner.graphs
        return (self.overlap_steps and g is not None and bool(step.decode) and not step.prompts and not step.recomputes
                and not step.drafts  # (its tokens decide where the next step's rows start)
                and g.fits(step.seqs))

    def _quiet(self) -> bool:
        """Under `lock`: nothing but the running batch to attend to (no cancel, arrival, preempted
        request or prompt); a step may then follow the one in flight."""
        s = self.scheduler
        return (not self._inbox and not s.ready and not s.preempted and not s.recomputing
                and not self.prompts.scheduler.has_work())

    def _follow(self, prev: InFlight) -> Step | None:
        """prev's rows that go on, each fed the token prev draws for it, at the position that token
        takes: while quiet, each has a block for it (a row whose token starts a
        block gets one here; none free: None, and schedule() preempts for it), and for at most
        MAX_FOLLOWS steps in a row (a complete turn then runs the rest: reservations expire there)."""
        step = self._fed(prev) if self._follows < MAX_FOLLOWS else None
        self._follows = self._follows + 1 if step is not None else 0
        return step

    def _fed(self, prev: InFlight) -> Step | None:
        bs, rows, seqs = self.allocator.block_size, [], []
        g = self.runner.graphs
        with self.lock:
            if not self._quiet():
                return None
            if self._may_draft(prev.step.decode):
                return None  # looked up once its tokens are read
            for i, r in enumerate(prev.step.decode):
                if r.status is not DecodeStatus.RUNNING or len(r.output_ids) + 1 >= r.sampling.max_tokens:
                    continue  # ended, or prev's token is its last
                rows.append(r)
                seqs.append(SeqInput([i], r.num_tokens, r.block_table, adapter=r.sampling.adapter))  # prev's token
                # goes at num_tokens (a row with a LoRA adapter: none follows in flight, graphs.fits)
            if not rows or g is None or not g.fits(seqs):
                return None
            for r in rows:  # every ~block_size steps a row's token starts a block: it takes a free one
                if len(r.block_table) * bs <= r.num_tokens:
                    new = self.allocator.grow(r.request_id, r.num_tokens + 1)
                    if new is None:
                        return None
                    r.block_table.extend(new)
            for r in rows:  # a step each waited through (decode.speculative)
                if r.pace is not None:
                    r.pace.tick()
        return Step(rows, [], seqs, [])

    def _may_draft(self, rows: list[DecodeRequest]) -> bool:
        """Under `lock`: whether the step after `rows` could feed drafts (decode.speculative on, room
        in the batch, a row not waiting after misses: its pace); it is then scheduled, not followed."""
        return (self.lookup.num_tokens > 0 and len(rows) < self.scheduler.max_batch_size
                and any(r.pace is None or r.pace.ready for r in rows))

    def _launch(self, step: Step, prev: InFlight | None) -> InFlight:
        """Its rows are sampled now unless one needs its history and prev's tokens are not read yet."""
        logits = self.runner.forward(step.seqs, None if prev is None else prev.sampled.tokens)  # [rows, V]
        f = InFlight(step, logits=logits)
        if prev is None:
            self._sample_behind(f)
        elif not any(needs_history(r.sampling) for r in step.decode):
            f.sampled = sample_queued(logits, *self._decode_sampling(step.decode, pending=1))
            f.logits = None
        return f

    def _sample_behind(self, f: InFlight) -> None:
        """Every token before f's is on the host: histories and grammars are up to date."""
        f.sampled = sample_queued(f.logits, *self._decode_sampling(f.step.decode))
        f.logits = None

    def _complete(self, f: InFlight, behind: bool) -> None:
        tokens, lps = f.sampled.collect()  # waits for f's forward (and so for every step before it)
        with self.lock:
            self.scheduler.release_held()  # their last step has run
            self.scheduler.hold_kv = behind  # the step behind writes into the blocks of f's rows
            try:
                events = self.scheduler.on_tokens(f.step.decode, tokens, lps)
            finally:
                self.scheduler.hold_kv = False
        self._emit(events)  # type: ignore[arg-type]
