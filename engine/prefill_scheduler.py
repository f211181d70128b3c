"""Prefill admission: what goes into the next forward, under a token budget, in chunks.

Each step packs up to `max_batch_tokens` prompt tokens. A prompt longer than `chunk_tokens` is cut
into chunks (Sarathi-Serve): one chunk per step, so prompts that arrive behind a huge one share the
next step instead of waiting for the whole of it. Prompts already started go first (their scratch
KV blocks are held), then waiting ones in arrival order while the budget and the KV scratch last.
Pure bookkeeping over ints; the worker owns the model and the blocks. Shared by the prefill worker
and the aggregated worker (which gives each step the budget its decode rows leave over).

    in_progress:  [ long prompt: computed=1024 of 3000 ] → next chunk of ≤ chunk_tokens
    waiting:      [ p1 (40) ][ p2 (900) ][ p3 (12) ] ...  → admitted FCFS while they fit
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.types import PrefillRequest


@dataclass
class PendingPrefill:
    request: PrefillRequest
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None  # first chunk's forward start
    computed: int = 0  # prompt tokens whose KV is in the scratch cache
    cancelled: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.request.token_ids)

    @property
    def remaining(self) -> int:
        return self.num_tokens - self.computed


@dataclass(frozen=True)
class Chunk:
    pending: PendingPrefill
    start: int  # first prompt position computed in this step
    length: int

    @property
    def completes(self) -> bool:
        return self.start + self.length == self.pending.num_tokens


class PrefillScheduler:
    def __init__(self, max_batch_tokens: int, chunk_tokens: int) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.chunk_tokens = min(chunk_tokens, max_batch_tokens)
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
        """The chunks of the next forward. `admit(p)` reserves p's scratch blocks (False: no room);
        `budget` caps this step's prompt tokens (default max_batch_tokens)."""
        budget = self.max_batch_tokens if budget is None else min(budget, self.max_batch_tokens)
        chunks: list[Chunk] = []
        for p in self.in_progress:
            if budget <= 0:
                break
            n = min(p.remaining, self.chunk_tokens, budget)
            chunks.append(Chunk(p, p.computed, n))
            budget -= n
        while self.waiting and budget > 0:
            p = self.waiting[0]
            if not admit(p):
                break  # FCFS: no overtaking a prompt that waits for scratch room
            self.waiting.popleft()
            self.in_progress.append(p)
            n = min(p.num_tokens, self.chunk_tokens, budget)
            chunks.append(Chunk(p, 0, n))
            budget -= n
        return chunks

    def advance(self, chunks: list[Chunk]) -> list[PendingPrefill]:
        """Record that `chunks` were computed; return the prompts now complete (they leave)."""
        done = []
        for c in chunks:
            c.pending.computed = c.start + c.length
            if c.completes:
                done.append(c.pending)
        self.in_progress = [p for p in self.in_progress if p.remaining > 0]
        return done
