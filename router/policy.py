"""Routing policy: which decode worker reserves the KV, which prefill worker runs the prompt.

Pure over the router's own load counters, so it is testable without workers. Decode: fewest tokens
reserved through this router (ties: fewest requests); prefill: least work for this prompt — prompt
tokens queued there plus the prompt's own, less the prefix that worker holds when the router last
sent it there (router/prefix_affinity.py; off when None). Decode workers holding a prompt's prefix
share those blocks (and are handed off only the rest); aggregated ones compute only the rest: given
the prompt, decode_order() counts reserved tokens less the prefix a worker holds (decode_affinity,
its own record: placed() after one reserves, and again with the answer when the request finishes
there — that worker keeps the KV of both, which a conversation's next turn starts with).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.prefix_affinity import PrefixAffinity


@dataclass
class Load:
    requests: int = 0
    tokens: int = 0


class LeastLoadedPolicy:
    def __init__(
        self, num_prefill: int, num_decode: int, affinity: PrefixAffinity | None = None,
        decode_affinity: PrefixAffinity | None = None,
    ) -> None:
        self.prefill = [Load() for _ in range(num_prefill)]
        self.decode = [Load() for _ in range(num_decode)]
        self.affinity, self.decode_affinity = affinity, decode_affinity

    def decode_order(self, prompt: Sequence[int] = (), salt: str = "") -> list[int]:
        """Decode workers to try, most room first (the first that reserves wins); given the prompt,
        less the prefix of it a worker holds."""
        aff = self.decode_affinity
        digests = aff.digests(prompt, salt) if aff is not None and len(self.decode) > 1 else []
        holder, reused = aff.holder(digests) if digests and aff is not None else (None, 0)
        return sorted(range(len(self.decode)), key=lambda i: (
            self.decode[i].tokens - (reused if i == holder else 0), self.decode[i].requests, i))

    def placed(self, tokens: Sequence[int], salt: str, decode: int) -> None:
        """Decode worker `decode` holds the KV of `tokens`' prefix: a prompt it reserved for, or a
        finished request's prompt and answer."""
        if self.decode_affinity is not None and len(self.decode) > 1:
            self.decode_affinity.record(self.decode_affinity.digests(tokens, salt), decode)

    def pick_prefill(self, exclude: set[int] | frozenset[int] = frozenset(),
                     prompt: Sequence[int] = (), salt: str = "") -> tuple[int, int] | None:
        """(the prefill worker with the least work for `prompt`, the prompt tokens it will compute:
        its load while the prompt is there), skipping `exclude`; None if none is left."""
        live = [i for i in range(len(self.prefill)) if i not in exclude]
        if not live:
            return None
        digests = self.affinity.digests(prompt, salt) if self.affinity is not None and len(live) > 1 else []
        holder, reused = self.affinity.holder(digests) if digests and self.affinity is not None else (None, 0)

        def compute(i: int) -> int:
            return len(prompt) - (reused if i == holder else 0)

        pick = min(live, key=lambda i: (self.prefill[i].tokens + compute(i), self.prefill[i].requests, i))
        if digests and self.affinity is not None:
            self.affinity.record(digests, pick)
        return pick, compute(pick)

    @staticmethod
    def add(load: Load, tokens: int) -> None:
        load.requests += 1
        load.tokens += tokens

    @staticmethod
    def remove(load: Load, tokens: int) -> None:
        load.requests -= 1
        load.tokens -= tokens
