"""Speculative decoding by prompt lookup (n-grams): drafts taken from a request's own tokens, checked
by the model in the decode step that would have computed one token.

A decode row that speculates (`speculates`: greedy, no grammar, no thinking budget), each step:
  1. propose()  the longest suffix of its tokens (prompt + output), of prompt_lookup_max down to
                prompt_lookup_min tokens, that occurred before; the up to num_tokens tokens that
                followed its latest earlier occurrence are its drafts (none found: a plain row)
  2. forward    the row feeds [its last token, drafts...] at positions num_tokens - 1 on, like a
                prompt chunk: one forward writes the drafts' KV and gives the logits after each of
                its tokens (ModelRunner.forward's `verified`)
  3. sample     each of those positions as a decode row would be sampled with the drafts before it
                already in its output (`positions`: penalties, min_tokens, bad words, logprobs)
  4. accept()   the drafts up to the first that differs from its position's token, then that
                position's token: 1 to d + 1 tokens for the row, each the token decoding one at a
                time gives
  5. the KV written for drafts that were not accepted lies past the row's new length: the row's
     next step overwrites it before anything reads it (its blocks are kept for the tokens to come)
Drawn rows (temperature > 0) do not speculate: accepting a draft would need rejection sampling, and
a seeded row would no longer draw what it draws alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.types import SamplingParams


@dataclass(frozen=True)
class Lookup:
    """How drafts are proposed (decode.speculative, validated)."""

    num_tokens: int  # most drafts a row feeds in one step (0: off)
    min_n: int  # shortest suffix that is looked up
    max_n: int  # longest


def speculates(sampling: SamplingParams) -> bool:
    """Whether a row may feed drafts: greedy (its token is the argmax, whatever came before is
    known), and no grammar or thinking budget (their state steps with each token sampled)."""
    return sampling.greedy and not sampling.grammar and sampling.thinking_budget is None


def propose(context: Sequence[int], lookup: Lookup, most: int) -> list[int]:
    """Step 1: at most min(most, lookup.num_tokens) tokens that followed the latest earlier
    occurrence of the longest suffix of `context` (lookup.max_n down to lookup.min_n tokens) that
    occurred before; [] if none did."""
    k = min(most, lookup.num_tokens)
    if k <= 0 or len(context) <= lookup.min_n:
        return []
    ctx = np.asarray(context, dtype=np.int64)
    L = len(ctx)
    for n in range(min(lookup.max_n, L - 1), lookup.min_n - 1, -1):
        # windows [L - n, n] starting at 0 .. L - n - 1 (each has a token after it); the suffix excluded
        windows = np.lib.stride_tricks.sliding_window_view(ctx[: L - 1], n)
        hits = np.flatnonzero((windows == ctx[L - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the latest occurrence: what followed it
            return ctx[start : start + k].tolist()
    return []


def accept(drafts: Sequence[int], targets: Sequence[int]) -> list[int]:
    """Step 4: targets[j] is the token sampled after drafts[:j] (len(drafts) + 1 of them) → the
    row's new tokens: the drafts that match their position's token, then the first that does not
    (or the token after all of them)."""
    assert len(targets) == len(drafts) + 1, "one sampled token after each prefix of the drafts"
    a = 0
    while a < len(drafts) and drafts[a] == targets[a]:
        a += 1
    return [*drafts[:a], targets[a]]
