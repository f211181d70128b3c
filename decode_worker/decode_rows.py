"""A decode (or aggregated) worker's decode rows: what each running request feeds — its last token,
and drafts where it speculates (decode.speculative; the method: engine/speculative.py) — and how
each row is sampled.

  1. rows:     each running request feeds its last token; one that finds drafts by prompt lookup
               (and is not waiting: its pace) feeds each draft too, as a
               one-token row of its own at the next position — as many as its pace
               (engine/speculative.py, step 6), the batch's free rows (max_batch_size), the step's
               token budget, its max_tokens and its blocks allow (a block more where one is free)
  2. forward:  every layer stores all rows' K/V before any row attends, so a draft row, reading
               its context up to its own position, sees the drafts before it: one decode forward
               (the paged decode kernel; on CUDA the decode graphs)
               gives the logits after each draft as after an accepted token
  3. sampling: one sample() over every row: a request's j-th row is sampled as if its first j
               drafts were already its output (penalties, min_tokens, bad words, logprobs; its
               grammar and thinking budget: copies that followed those drafts)
  4. accept:   the drafts that match, then the token sampled after them: 1 to d + 1 tokens a
               request, handed to the scheduler in order (one that ends the request drops the
               rest); the request's pace follows
"""
from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Iterator, Sequence
from typing import overload

from decode_worker.request import DecodeRequest, DecodeStatus
from decode_worker.scheduler import DecodeScheduler
from engine.model_runner import SeqInput
from engine.prefix_cache import PrefixCache
from engine.sampler import History, needs_history
from engine.speculative import Lookup, Pace, accept, propose
from engine.step_loop import Step
from engine.structured import Guide, Guides
from engine.think_budget import ThinkBudget, forced_now
from engine.types import SamplingParams, TokenLogprob, banned_now

# sample()'s arguments: params, positions, histories, banned tokens, guides, forced tokens (engine/sampler.py)
Sampling = tuple[list[SamplingParams], list[int], list[History | None], list[tuple[int, ...]], list[Guide | None],
                 list[int | None]]


class Then(Sequence[int]):
    """A row's output followed by some of its drafts, as the sampling rules read it, without a copy
    of the output (long, and read at a few places: its length, its tail, what a grammar follows)."""

    def __init__(self, head: Sequence[int], tail: Sequence[int]) -> None:
        self.head, self.tail = head, tail

    def __len__(self) -> int:
        return len(self.head) + len(self.tail)

    def __iter__(self) -> Iterator[int]:
        return itertools.chain(self.head, self.tail)

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...

    def __getitem__(self, i: int | slice) -> int | list[int]:
        n = len(self.head)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            assert step == 1, "contiguous slices only"
            return [*self.head[start:min(stop, n)], *self.tail[max(start - n, 0):max(stop - n, 0)]]
        i = i + len(self) if i < 0 else i
        return self.head[i] if i < n else self.tail[i - n]


class DecodeRows:
    """Mixin of BatchWorker: the state it reads is set up in BatchWorker.__init__."""

    scheduler: DecodeScheduler
    allocator: PrefixCache
    lock: threading.Lock
    guides: Guides
    lookup: Lookup
    draft_tokens: int  # drafts fed (stats)
    accepted_tokens: int  # ... and accepted

    # -- 1. rows --------------------------------------------------------------------------------
    def _decode_rows(self, batch: list[DecodeRequest], budget: int | None = None,
                     ) -> tuple[list[SeqInput], list[list[int]]]:
        """Under `lock`: the step's decode rows and each request's drafts (at most `budget` in all,
        and at most max_batch_size rows: on CUDA the step stays within the decode graphs)."""
        drafts = self._drafts(batch, budget) if self.lookup.num_tokens else []
        if not drafts:  # a row each (the common case: built in one pass)
            # (last_token and num_tokens spelt out: their property calls cost ~9 us a step at 64 rows)
            return [SeqInput([r.output_ids[-1]], r.num_prompt_tokens + len(r.output_ids) - 1, r.block_table,
                             adapter=r.sampling.adapter) for r in batch], drafts
        seqs = []
        for i, r in enumerate(batch):
            fed = [r.last_token, *drafts[i]]
            seqs += [SeqInput([t], r.num_tokens - 1 + j, r.block_table, adapter=r.sampling.adapter)
                     for j, t in enumerate(fed)]
        return seqs, drafts

    def _drafts(self, batch: list[DecodeRequest], budget: int | None) -> list[list[int]]:
        bs, out = self.allocator.block_size, []
        left = self.scheduler.max_batch_size - len(batch)  # a step's rows, drafts included: at most max_batch_size
        if budget is not None:
            left = min(left, budget)
        for r in batch:
            out.append([])
            r.pace = r.pace or Pace(self.lookup.num_tokens)
            if not r.pace.ready:
                r.pace.tick()
                continue
            # each draft is a token more this step: at most max_tokens in all, and (1 + d) in its blocks
            most = min(left, r.pace.length, r.sampling.max_tokens - len(r.output_ids) - 1)
            if most <= 0:
                continue
            d = propose(r.pace.context(r.prompt_ids or (), r.output_ids), self.lookup, most)
            if not d:
                continue
            room = len(r.block_table) * bs - r.num_tokens  # slots past the fed token's
            if room < len(d) and self.allocator.num_free > len(batch):  # leave the others a block to grow into
                new = self.allocator.grow(r.request_id, r.num_tokens + len(d))
                if new is not None:
                    r.block_table.extend(new)
                    room = len(r.block_table) * bs - r.num_tokens
            out[-1] = d[: max(room, 0)]
            left -= len(out[-1])
        return out if any(out) else []

    # -- 3. sampling ----------------------------------------------------------------------------
    def _decode_sampling(self, batch: list[DecodeRequest], pending: int = 0) -> Sampling:
        """sample()'s arguments for the decode rows: params, the positions being sampled, histories,
        banned tokens, guides, forced tokens. pending: tokens each row has drawn that the host has not read yet
        (1 under a step in flight: then no row may need its history). A row that has ended (while a
        step followed its last) is sampled unconstrained: its token is dropped."""
        assert not pending or not any(needs_history(r.sampling) for r in batch)
        out: Sampling = ([], [], [], [], [], [])
        params, positions, histories, banned, guides, forced = out
        for r in batch:  # one pass; what a plain row lacks (a penalty, a ban, a grammar, a budget) costs it nothing
            p, made = r.sampling, len(r.output_ids) + pending
            params.append(p)
            positions.append(r.num_prompt_tokens + made)
            ok = r.status is DecodeStatus.RUNNING
            histories.append(History(r.prompt_ids or (), r.output_ids) if ok and p.penalized else None)
            banned.append(banned_now(p, made, r.eos_token_ids, r.output_ids)
                          if ok and (p.bad_words or made < p.min_tokens) else ())
            guides.append(self._guide(r) if ok and (p.grammar or r.guide is not None) else None)
            forced.append(self._forced(r) if ok and (p.thinking_budget is not None or r.think is not None) else None)
        return out

    def _guide(self, r: DecodeRequest) -> Guide | None:
        """A structured output's Guide, made at its first sampling here, having followed its output."""
        if r.sampling.grammar and r.guide is None:
            r.guide = self.guides.new(r.sampling.grammar, r.sampling.grammar_after,  # compiled at reserve: a copy
                                      r.sampling.grammar_free_opener)
        if r.guide is not None:
            r.guide.follow(r.output_ids)
        return r.guide

    @staticmethod
    def _forced(r: DecodeRequest) -> int | None:
        """The token a thinking budget forces next, its count made at its first sampling here."""
        if r.sampling.thinking_budget is not None and r.think is None:
            r.think = ThinkBudget.of(r.sampling)
        return forced_now(r.think, r.output_ids)

    def _decode_samples(self, step: Step) -> Sampling:
        """sample()'s arguments for the step's decode rows: a request's j-th row as if its first
        j drafts were its output (its first row: as without drafts)."""
        args = self._decode_sampling(step.decode)
        if not step.drafts:
            return args
        out: Sampling = ([], [], [], [], [], [])
        for i, (r, drafts) in enumerate(zip(step.decode, step.drafts)):
            for col, a in zip(out, args):
                col.append(a[i])
            p, guide = r.sampling, args[4][i]
            for j in range(1, len(drafts) + 1):
                made = Then(r.output_ids, drafts[:j])
                if guide is not None:  # its grammar after the drafts; past one it refuses (where the row
                    follows = guide.fork()  # stops), a copy of the last state: each row's matcher its own
                    follows.follow(made)
                    guide = guide.fork() if follows.matcher.is_error() else follows
                for col, a in zip(out, (p, r.num_tokens + j, History(r.prompt_ids or (), made) if p.penalized else None,
                                        banned_now(p, len(made), r.eos_token_ids, made), guide,
                                        forced_now(copy.copy(r.think), made))):
                    col.append(a)
        return out

    # -- 4. accept ------------------------------------------------------------------------------
    def _accepted(self, step: Step, tokens: list[int], lps: list[TokenLogprob | None],
                  ) -> tuple[list[list[int]], list[list[TokenLogprob | None]]]:
        """The decode rows' sampled tokens → each decode request's new tokens (and logprobs)."""
        if not step.drafts:  # a token each
            return [[t] for t in tokens], [[lp] for lp in lps]
        runs, run_lps, at = [], [], 0
        for i, r in enumerate(step.decode):
            drafts = step.drafts[i]
            run = accept(drafts, tokens[at : at + len(drafts) + 1])
            runs.append(run)
            run_lps.append(lps[at : at + len(run)])
            at += len(drafts) + 1
            if drafts:
                self.draft_tokens += len(drafts)
                self.accepted_tokens += len(run) - 1
                if r.pace is not None:
                    r.pace.update(len(drafts), len(run) - 1, self.lookup.num_tokens)
        return runs, run_lps
