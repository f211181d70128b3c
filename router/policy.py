"""Routing policy: which decode worker reserves the KV, which prefill worker runs the prompt.

Pure over the router's own load counters, so it is testable without workers. Decode: fewest tokens
reserved through this router (ties: fewest requests); prefill: fewest prompt tokens queued.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Load:
    requests: int = 0
    tokens: int = 0


class LeastLoadedPolicy:
    def __init__(self, num_prefill: int, num_decode: int) -> None:
        self.prefill = [Load() for _ in range(num_prefill)]
        self.decode = [Load() for _ in range(num_decode)]

    def decode_order(self) -> list[int]:
        """Decode workers to try, most room first (the first that reserves wins)."""
        return sorted(range(len(self.decode)), key=lambda i: (self.decode[i].tokens, self.decode[i].requests, i))

    def pick_prefill(self, exclude: set[int] | frozenset[int] = frozenset()) -> int | None:
        """The prefill worker with the fewest prompt tokens queued, skipping `exclude`; None if none is left."""
        live = [i for i in range(len(self.prefill)) if i not in exclude]
        return min(live, key=lambda i: (self.prefill[i].tokens, self.prefill[i].requests, i), default=None)

    @staticmethod
    def add(load: Load, tokens: int) -> None:
        load.requests += 1
        load.tokens += tokens

    @staticmethod
    def remove(load: Load, tokens: int) -> None:
        load.requests -= 1
        load.tokens -= tokens
