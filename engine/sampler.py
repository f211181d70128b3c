"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeds.

A seeded request draws position `p`'s token from a generator seeded by (seed, p), so its output
does not depend on which worker sampled it or what else was in the batch.
"""
from __future__ import annotations

import torch

from engine.types import SamplingParams

_MIX = 1_000_003


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """logits [B, V] (float32); positions[i] = the position the sampled token will occupy."""
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        out[i] = _sample_row(logits[i], p, positions[i])
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, position: int) -> int:
    x = logits / p.temperature  # [V]
    if 0 < p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        drop = probs.cumsum(-1) - probs >= p.top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
    probs = torch.softmax(x, dim=-1)
    gen = None
    if p.seed is not None:
        gen = torch.Generator(device=probs.device)
        gen.manual_seed((p.seed * _MIX + position) % (2**63))
    return int(torch.multinomial(probs, 1, generator=gen).item())
