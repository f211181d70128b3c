"""A decode (or aggregated) worker's decode rows, with drafts where its rows speculate
(decode.speculative; the method: engine/speculative.py).

  1. rows:     each running request feeds its last token; one that speculates (greedy, no grammar
               or thinking budget) and finds drafts by prompt lookup feeds them after it, as many
               as the step's token budget, its max_tokens and its blocks allow (a block more where
               one is free); those rows go after the one-token rows (the decode kernel takes the
               leading one-token rows)
  2. forward:  a row with drafts gets its logits after each of its tokens (Step.verified)
  3. sampling: one sample() over every position: a draft row's j-th position is sampled as if
               its first j drafts were already its output (penalties, min_tokens, bad words)
  4. accept:   the drafts that match, then the token sampled after them: 1 to d + 1 tokens a row,
               handed to the scheduler in order (one that ends the request drops the rest)
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch

from decode_worker.request import DecodeRequest
from decode_worker.scheduler import DecodeScheduler
from engine.model_runner import SeqInput
from engine.prefix_cache import PrefixCache
from engine.sampler import History
from engine.speculative import Lookup, accept, propose, speculates
from engine.step_loop import Step
from engine.types import TokenLogprob, banned_now

Sampling = tuple[list[Any], list[int], list[History | None], list[tuple[int, ...]], list[Any], list[int | None]]


class Speculation:
    """Mixin of BatchWorker: the state it reads is set up in BatchWorker.__init__."""

    scheduler: DecodeScheduler
    allocator: PrefixCache
    lock: threading.Lock
    lookup: Lookup
    draft_tokens: int  # drafts fed (stats)
    accepted_tokens: int  # ... and accepted

    if TYPE_CHECKING:  # BatchWorker's own
        def _decode_sampling(self, batch: list[DecodeRequest], pending: int = 0) -> Sampling: ...

    # -- 1. rows --------------------------------------------------------------------------------
    def _decode_rows(self, batch: list[DecodeRequest], budget: int | None = None,
                     ) -> tuple[list[DecodeRequest], list[SeqInput]]:
        """Under `lock`: the step's decode rows (rows with drafts last, at most `budget` drafts in all;
        None: no limit) and the requests in the same order."""
        drafts = self._drafts(batch, budget) if self.lookup.num_tokens else {}
        batch = sorted(batch, key=lambda r: r.request_id in drafts)  # stable: the rank order otherwise
        return batch, [SeqInput([r.last_token, *drafts.get(r.request_id, ())], r.num_tokens - 1, r.block_table,
                                adapter=r.sampling.adapter, verify=r.request_id in drafts) for r in batch]

    def _drafts(self, batch: list[DecodeRequest], budget: int | None) -> dict[str, list[int]]:
        bs, out = self.allocator.block_size, {}
        left = budget if budget is not None else sum(r.sampling.max_tokens for r in batch)
        for r in batch:
            if left <= 0:
                break
            if not speculates(r.sampling):
                continue
            # each draft is a token more this step: at most max_tokens in all, and (1 + d) in its blocks
            most = min(left, r.sampling.max_tokens - len(r.output_ids) - 1)
            d = propose([*(r.prompt_ids or ()), *r.output_ids], self.lookup, most)
            if not d:
                continue
            room = len(r.block_table) * bs - r.num_tokens  # slots past the fed token's
            if room < len(d) and self.allocator.num_free > len(batch):  # leave the others a block to grow into
                new = self.allocator.grow(r.request_id, r.num_tokens + len(d))
                if new is not None:
                    r.block_table.extend(new)
                    room = len(r.block_table) * bs - r.num_tokens
            if d := d[: max(room, 0)]:
                out[r.request_id] = d
                left -= len(d)
        return out

    # -- 3. sampling ----------------------------------------------------------------------------
    def _decode_samples(self, step: Step, logits: torch.Tensor) -> tuple[torch.Tensor, Sampling]:
        """The decode rows' logits [R, V] to sample and sample()'s arguments for them: one per
        row, each draft row's once per position (its drafts before it as its output)."""
        n = len(step.decode)
        args = self._decode_sampling(step.decode)
        if not step.verified:
            return logits[:n], args
        parts: list[torch.Tensor] = []
        out: Sampling = ([], [], [], [], [], [])
        for i, r in enumerate(step.decode):
            if i not in step.verified:
                parts.append(logits[i : i + 1])
                for col, a in zip(out, args):
                    col.append(a[i])
                continue
            parts.append(step.verified[i])  # [1 + d, V]
            drafts = step.seqs[i].token_ids[1:]
            for j in range(len(drafts) + 1):
                made = [*r.output_ids, *drafts[:j]]
                p = r.sampling
                for col, a in zip(out, (p, r.num_tokens + j,
                                        History(r.prompt_ids or (), made) if p.penalized else None,
                                        banned_now(p, len(made), r.eos_token_ids, made), None, None)):
                    col.append(a)
        return torch.cat(parts), out

    # -- 4. accept ------------------------------------------------------------------------------
    def _accepted(self, step: Step, tokens: list[int], lps: list[TokenLogprob | None],
                  ) -> tuple[list[list[int]], list[list[TokenLogprob | None]]]:
        """The sampled tokens of _decode_samples' rows → each decode row's new tokens (and logprobs)."""
        runs, run_lps, at = [], [], 0
        for i, seq in enumerate(step.seqs[: len(step.decode)]):
            if i not in step.verified:
                runs.append([tokens[at]])
                run_lps.append([lps[at]])
                at += 1
                continue
            drafts = seq.token_ids[1:]
            run = accept(drafts, tokens[at : at + len(drafts) + 1])
            runs.append(run)
            run_lps.append(lps[at : at + len(run)])
            at += len(drafts) + 1
            self.draft_tokens += len(drafts)
            self.accepted_tokens += len(run) - 1
        return runs, run_lps
