"""Prompt logprobs (a request's `prompt_logprobs`), scored beside a forward's hidden states: for each
sequence with `scored` tokens, at each of its first len(scored) positions, the log-softmax of the next
token (the one scored), its rank, and the `top` best — SCORE_ROWS positions at a time, so the fp32
[n, vocabulary] log-softmax stays bounded (engine/kv_budget.py profiles that much)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from engine.types import TokenLogprob

if TYPE_CHECKING:
    from engine.model_runner import SeqInput

SCORE_ROWS = 256  # prompt positions whose log-softmax over the vocabulary is taken at once (bounds its memory)
Logits = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, residual, rows [n]) → [n, V]


def score(seqs: Sequence[SeqInput], x: torch.Tensor, residual: torch.Tensor,
          logits: Logits) -> dict[int, list[TokenLogprob]]:
    """Sequence index → its scored positions' TokenLogprobs, in order. x, residual [T, hidden] (the
    forward's packed rows) are read, not written; `logits`: the runner's head over chosen rows."""
    out: dict[int, list[TokenLogprob]] = {}
    row = 0  # the sequence's first token row in T
    for i, s in enumerate(seqs):
        lps: list[TokenLogprob] = []
        for a in range(0, len(s.scored), SCORE_ROWS):
            n = min(SCORE_ROWS, len(s.scored) - a)
            idx = torch.arange(row + a, row + a + n, device=x.device)
            lp = torch.log_softmax(logits(x, residual, idx), dim=-1)  # [n, V]
            nxt = s.scored[a : a + n]
            chosen = lp.gather(1, torch.tensor(nxt, device=lp.device)[:, None])  # [n, 1]
            rank = (lp > chosen).sum(1) + 1  # [n]
            top_v, top_i = torch.topk(lp, s.top) if s.top else (lp[:, :0], lp[:, :0].long())  # [n, top]
            lps += [TokenLogprob(t, c, tuple(zip(ti, tv)), r)
                    for t, c, ti, tv, r in zip(nxt, chosen[:, 0].tolist(), top_i.tolist(), top_v.tolist(),
                                               rank.tolist())]
        if s.scored:
            out[i] = lps
        row += s.num_new
    return out
