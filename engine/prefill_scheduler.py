"""Prefill admission: what goes into the next forward, under a token budget, in chunks.

Each step packs up to `max_batch_tokens` prompt tokens, a priority level at a time (the lowest
`priority` value first; all 0 by default), within each level in this order:
  1. prompts that can finish in this step (remaining ≤ chunk_tokens), shortest first: a short
     prompt arriving behind a long document gets its first token after one short step
  2. one chunk of the oldest prompt that cannot finish in this step (started ones first), so long
     prompts are served one after another rather than all slowed down together; when finishing
     prompts already fill the step, it waits, at most MAX_DEFER steps in a row (no starvation
     within a level; a later level gets only what the earlier ones leave)
A prompt longer than `chunk_tokens` thus goes in chunks (Sarathi-Serve). Pure bookkeeping over
ints; the worker owns the model and the blocks. Shared by the prefill worker and the aggregated
worker (which gives each step the budget its decode rows leave over).

    in_progress:  [ doc A: computed=512 of 1024 ]            → its next chunk, when no short one waits
    waiting:      [ p1 (40) ][ doc B (900) ][ p3 (12) ] ...  → p3, p1 first; doc B after doc A
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.types import PrefillRequest, TokenLogprob


@dataclass(eq=False)  # identity: the same prompt object moves between the queues
class PendingPrefill:
    request: PrefillRequest
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None  # first chunk's forward start
    computed: int = 0  # prompt tokens whose KV is in the scratch cache
    cached: int = 0  # of those, found in the prefix cache at admission (not computed here)
    cancelled: bool = False
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # asked for: of prompt tokens 1..computed

    @property
    def num_tokens(self) -> int:
        return len(self.request.token_ids)

    @property
    def priority(self) -> int:
        return self.request.sampling.priority

    @property
    def remaining(self) -> int:
        return self.num_tokens - self.computed

    def scored(self) -> tuple[TokenLogprob, ...] | None:
        """Its prompt logprobs once every chunk ran (prompt tokens 1..), or None when not asked for."""
        return tuple(self.prompt_logprobs) if self.request.sampling.prompt_logprobs is not None else None


@dataclass(frozen=True)
class Chunk:
    pending: PendingPrefill
    start: int  # first prompt position computed in this step
    length: int

    @property
    def completes(self) -> bool:
        return self.start + self.length == self.pending.num_tokens


MAX_DEFER = 4  # steps in a row a long prompt's chunk may wait for prompts that finish


class PrefillScheduler:
    def __init__(self, max_batch_tokens: int, chunk_tokens: int) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.chunk_tokens = min(chunk_tokens, max_batch_tokens)
        self.deferred = 0  # steps the oldest unfinished prompt has been passed over
        self.waiting: deque[PendingPrefill] = deque()
        self.in_progress: list[PendingPrefill] = []

    def add(self, p: PendingPrefill) -> None:
        self.waiting.append(p)

    @property
    def waiting_tokens(self) -> int:
        return sum(p.remaining for p in self.waiting) + sum(p.remaining for p in self.in_progress)

    def has_work(self) -> bool:
        return bool(self.waiting or self.in_progress)

    def drop_cancelled(self) -> list[PendingPrefill]:
        """Remove cancelled requests from both queues; the caller frees their blocks."""
        gone = [p for p in self.in_progress if p.cancelled] + [p for p in self.waiting if p.cancelled]
        self.in_progress = [p for p in self.in_progress if not p.cancelled]
        self.waiting = deque(p for p in self.waiting if not p.cancelled)
        return gone

    def next_step(self, admit: Callable[[PendingPrefill], bool], budget: int | None = None) -> list[Chunk]:
        """The chunks of the next forward. `admit(p)` reserves p's scratch blocks (False: no room, it
        waits); `budget` caps this step's prompt tokens (default max_batch_tokens)."""
        budget = self.max_batch_tokens if budget is None else min(budget, self.max_batch_tokens)
        chunks: list[Chunk] = []
        for level in sorted({p.priority for p in (*self.in_progress, *self.waiting)}):
            if budget <= 0:
                break
            budget = self._level(level, admit, budget, chunks)
        return chunks

    def _level(self, level: int, admit: Callable[[PendingPrefill], bool], budget: int, chunks: list[Chunk]) -> int:
        """Steps 1 and 2 over the prompts of priority `level`, appending to `chunks`; the budget left."""
        prompts = [p for p in (*self.in_progress, *self.waiting) if p.priority == level]  # started ones first
        for p in sorted(prompts, key=lambda p: (p.remaining, p.enqueued)):
            if p.remaining > min(self.chunk_tokens, budget):
                break  # sorted: no later one finishes in this step either
            if self._start(p, admit):
                chunks.append(Chunk(p, p.computed, p.remaining))
                budget -= p.remaining
        taken = {id(c.pending) for c in chunks}
        head = next((p for p in prompts if id(p) not in taken), None)
        if head is None or budget <= 0:
            return budget
        if chunks and self.deferred < MAX_DEFER:
            self.deferred += 1
            return budget
        if self._start(head, admit):
            n = min(head.remaining, self.chunk_tokens, budget)
            chunks.append(Chunk(head, head.computed, n))
            budget -= n
            self.deferred = 0
        return budget

    def _start(self, p: PendingPrefill, admit: Callable[[PendingPrefill], bool]) -> bool:
        if p in self.in_progress:
            return True
        if not admit(p):
            return False
        self.waiting.remove(p)
        self.in_progress.append(p)
        return True

    def advance(self, chunks: list[Chunk]) -> list[PendingPrefill]:
        """Record that `chunks` were computed; return the prompts now complete (they leave)."""
        done = []
        for c in chunks:
            c.pending.computed = c.start + c.length
            if c.completes:
                done.append(c.pending)
        self.in_progress = [p for p in self.in_progress if p.remaining > 0]
        return done
