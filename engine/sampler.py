"""Token sampling: penalties, greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Order per row: penalties on the raw logits → (greedy: argmax) → temperature → top-k → top-p →
min-p → draw. Logprobs are the log-softmax of the raw logits, before any of that.
No row can fail the batch: NaN logits never win, a temperature under GREEDY_BELOW is greedy, the
draw runs in float64, and a row whose distribution still comes out non-finite takes its best token.
A seeded request draws position `p`'s token from a generator seeded by (seed, p), so its output
does not depend on which worker sampled it or what else was in the batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.types import SamplingParams, TokenLogprob

_MIX = 1_000_003


@dataclass(frozen=True)
class History:
    """What penalties look at: the prompt and the tokens generated so far."""

    prompt: Sequence[int]
    output: Sequence[int]


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    positions: list[int],
    histories: list[History | None] | None = None,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] (float32); positions[i] = the position the sampled token will occupy."""
    logits = logits.nan_to_num(nan=float("-inf"))  # a NaN never wins (argmax would pick it)
    want_lp = [p.logprobs is not None for p in params]
    logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None  # [B, V], raw distribution
    if any(p.penalized for p in params):
        logits = logits.clone()
        for i, p in enumerate(params):
            h = histories[i] if histories else None
            if p.penalized and h is not None:
                _penalize(logits[i], p, h)
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = _sample_row(logits[i], p, positions[i])
    lps: list[TokenLogprob | None] = [None] * len(params)
    if logprobs is not None:
        for i, p in enumerate(params):
            if p.logprobs is not None:
                row = logprobs[i]
                top = torch.topk(row, p.logprobs) if p.logprobs > 0 else None
                alts = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
                lps[i] = TokenLogprob(out[i], float(row[out[i]]), alts)
    return out, lps


def _penalize(row: torch.Tensor, p: SamplingParams, h: History) -> None:
    """In place on one row [V]."""
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(h.prompt) | set(h.output)), dtype=torch.long, device=row.device)
        if seen.numel():
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if h.output and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.unique(torch.tensor(list(h.output), dtype=torch.long), return_counts=True)
        ids = ids.to(row.device)
        row[ids] -= p.frequency_penalty * counts.to(row.device, row.dtype) + p.presence_penalty


def _sample_row(logits: torch.Tensor, p: SamplingParams, position: int) -> int:
    try:
        return _draw(logits, p, position)
    except RuntimeError:  # e.g. multinomial on an all-zero row: this row only, never the batch
        return int(logits.argmax())


def _draw(logits: torch.Tensor, p: SamplingParams, position: int) -> int:
    x = logits.double() / p.temperature  # [V]; float64: no overflow for any temperature >= GREEDY_BELOW
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
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(logits.argmax())
    gen = None
    if p.seed is not None:
        gen = torch.Generator(device=probs.device)
        gen.manual_seed((p.seed * _MIX + position) % (2**63))
    return int(torch.multinomial(probs, 1, generator=gen).item())
