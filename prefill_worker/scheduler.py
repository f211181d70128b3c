"""Prefill admission: which waiting prompts go into the next forward, under a token budget."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.types import PrefillRequest


@dataclass
class PendingPrefill:
    request: PrefillRequest
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.request.token_ids)


class PrefillScheduler:
    def __init__(self, max_batch_tokens: int) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[PendingPrefill] = deque()

    def add(self, p: PendingPrefill) -> None:
        self.waiting.append(p)

    @property
    def waiting_tokens(self) -> int:
        return sum(p.num_tokens for p in self.waiting)

    def next_batch(self, can_fit: "callable[[int], bool]") -> list[PendingPrefill]:  # type: ignore[valid-type]
        """FCFS prompts while they fit the token budget and the KV scratch (always at least one)."""
        batch: list[PendingPrefill] = []
        budget = self.max_batch_tokens
        used = 0
        while self.waiting:
            p = self.waiting[0]
            if p.cancelled:
                self.waiting.popleft()
                continue
            if batch and (used + p.num_tokens > budget or not can_fit(used + p.num_tokens)):
                break
            if not batch and not can_fit(p.num_tokens):
                break
            batch.append(self.waiting.popleft())
            used += p.num_tokens
        return batch
