"""Speculative decoding by prompt lookup (n-grams): drafts taken from a request's own tokens, checked
by the model in the decode step that would have computed one token.

Each decode row, each step:
  1. propose()  the longest suffix of its tokens (prompt + output), of prompt_lookup_max down to
                prompt_lookup_min tokens, that occurred before; the up to num_tokens tokens that
                followed its latest earlier occurrence are its drafts (none found: a plain row)
  2. forward    each draft is a one-token decode row of its own at the next position, in the same
                forward as the row's last token: every layer stores all rows' K/V before any row
                attends, so a draft's row sees the drafts before it (decode_worker/decode_rows.py)
  3. sample     each of those positions as a decode row would be sampled with the drafts before it
                already in its output (`positions`: penalties, min_tokens, bad words, logprobs; a
                grammar's mask and a thinking budget's forced token from copies that followed the
                drafts; a drawn row's key is its seed and the position, as one at a time)
  4. accept()   the drafts up to the first that differs from its position's token, then that
                position's token: 1 to d + 1 tokens for the row, each the token decoding one at a
                time gives
  5. the KV written for drafts that were not accepted lies past the row's new length: the row's
     next step overwrites it before anything reads it (its blocks are kept for the tokens to come)
  6. pace:      a row's draft length follows how its drafts fare (`Pace`): one more after all were
                accepted, as many as were accepted after a miss; a row whose drafts all fail waits
                1, 3, 7 ... steps before it drafts again (free text finds look-alikes that cost a
                forward's worth of tokens and are not accepted)
A drawn row (temperature > 0) speculates too. A draft is accepted when the token drawn at its
position is the draft: with probability p(draft), as speculative sampling's rule for a draft that is
certain (min(1, p / q), q = 1); after a miss the token drawn is one of the others, in proportion to
p: the answer is distributed as drawing one token at a time. A seeded row's draw at a position
depends only on its seed, the position and the logits, so it draws the very tokens it draws
without drafts.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Lookup:
    """How drafts are proposed (decode.speculative, validated)."""

    num_tokens: int  # most drafts a row feeds in one step (0: off)
    min_n: int  # shortest suffix that is looked up
    max_n: int  # longest


MAX_WAIT = 63  # most steps a row whose drafts keep failing waits between tries


@dataclass
class Pace:
    """Step 6: one row's draft length, adapted to its acceptance (HF's assisted-generation
    heuristic, with a back-off where nothing is accepted); and its tokens as the array step 1
    looks up, kept across steps (a row's prompt and output only grow)."""

    length: int  # drafts it may feed next (at most Lookup.num_tokens)
    misses: int = 0  # tries in a row that accepted none
    wait: int = 0  # steps left before it drafts again
    _tokens: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64), repr=False)
    _filled: int = 0  # of _tokens: the row's first tokens, copied so far

    def context(self, prompt: Sequence[int], output: Sequence[int]) -> np.ndarray:
        """prompt + output as an array [len], copying only what was added since the last call."""
        n, p = len(prompt) + len(output), len(prompt)
        if n > len(self._tokens):
            grown = np.empty(max(n, 2 * len(self._tokens)), dtype=np.int64)
            grown[: self._filled] = self._tokens[: self._filled]
            self._tokens = grown
        if self._filled < p:
            self._tokens[self._filled : p] = prompt[self._filled :]
            self._filled = p
        self._tokens[self._filled : n] = output[self._filled - p :]
        self._filled = n
        return self._tokens[:n]

    @property
    def ready(self) -> bool:
        """Whether the row may feed drafts this step (`length` of them at most)."""
        return self.wait == 0

    def tick(self) -> None:
        """A step the row waited through."""
        self.wait = max(0, self.wait - 1)

    def update(self, fed: int, accepted: int, most: int) -> None:
        """After a step that fed `fed` drafts and accepted `accepted` of them (most: num_tokens)."""
        if accepted == fed:
            self.length = min(most, self.length + 1)
        else:
            self.length = max(1, accepted)
        self.misses = self.misses + 1 if accepted == 0 else 0
        self.wait = min(MAX_WAIT, 2**self.misses - 1)


def propose(context: Sequence[int] | np.ndarray, lookup: Lookup, most: int) -> list[int]:
    """Step 1: at most min(most, lookup.num_tokens) tokens that followed the latest earlier
    occurrence of the longest suffix of `context` (lookup.max_n down to lookup.min_n tokens) that
    occurred before; [] if none did. One pass over the context finds where its last token occurred
    before; the candidates' runs are then extended backwards together."""
    k = min(most, lookup.num_tokens)
    ctx = np.asarray(context)
    L = len(ctx)
    if k <= 0 or L <= lookup.min_n:
        return []
    ends = np.flatnonzero(ctx[: L - 1] == ctx[L - 1])  # earlier occurrences of the last token (each has one after it)
    run = np.ones(len(ends), dtype=np.int64)  # how many tokens before each agree with the suffix, itself included
    alive = np.ones(len(ends), dtype=bool)
    for m in range(1, min(lookup.max_n, L - 1)):
        at = ends - m
        alive &= at >= 0
        alive[alive] = ctx[at[alive]] == ctx[L - 1 - m]
        run += alive
        if not alive.any():
            break
    ok = np.flatnonzero(run >= lookup.min_n)
    if not ok.size:
        return []
    best = ok[run[ok] == run[ok].max()][-1]  # the longest run; of those, the latest
    start = int(ends[best]) + 1
    return ctx[start : start + k].tolist()


def accept(drafts: Sequence[int], targets: Sequence[int]) -> list[int]:
    """Step 4: targets[j] is the token sampled after drafts[:j] (len(drafts) + 1 of them) → the
    row's new tokens: the drafts that match their position's token, then the first that does not
    (or the token after all of them)."""
    assert len(targets) == len(drafts) + 1, "one sampled token after each prefix of the drafts"
    a = 0
    while a < len(drafts) and drafts[a] == targets[a]:
        a += 1
    return [*drafts[:a], targets[a]]
