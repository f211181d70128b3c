"""The prompts a worker computes (prefill worker, aggregated worker): the PrefillScheduler's queues
plus the callers blocked in `prefill()` until their prompt's first token.

  1. submit()    the caller's prompt joins the queue; the caller then waits in wait()
  2. each step:  the worker's schedule() takes chunks from `scheduler` (engine/prefill_scheduler.py)
  3. finish()    after the forward: record the chunks computed (and the logprobs of their
                 positions, for a prompt that asked: SamplingParams.prompt_logprobs), return the
                 prompts now complete with the logits rows to sample their first tokens from
  4. answer()    the first token (or the error) goes back to the waiting caller
Every method but wait() is called under the worker's lock.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from engine.model_runner import SeqInput
from engine.prefill_scheduler import Chunk, PendingPrefill, PrefillScheduler
from engine.types import PrefillRequest, PrefillResult, TokenLogprob


@dataclass
class _Waiter:
    event: threading.Event
    result: PrefillResult | None = None


class PromptQueue:
    def __init__(self, max_batch_tokens: int, chunk_tokens: int) -> None:
        self.scheduler = PrefillScheduler(max_batch_tokens, chunk_tokens)
        self._waiters: dict[str, _Waiter] = {}

    @property
    def num_waiting_callers(self) -> int:
        return len(self._waiters)

    def submit(self, request: PrefillRequest) -> _Waiter | None:
        """1. Queue the prompt; None when its request id is queued already."""
        if request.request_id in self._waiters:
            return None
        waiter = _Waiter(threading.Event())
        self._waiters[request.request_id] = waiter
        self.scheduler.add(PendingPrefill(request))
        return waiter

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiters

    @staticmethod
    def wait(waiter: _Waiter, timeout_s: float) -> PrefillResult | None:
        """Without the lock: the answer, or None when the deadline passed first."""
        if not waiter.event.wait(timeout_s):
            return None
        assert waiter.result is not None
        return waiter.result

    def forget(self, request_id: str) -> None:
        """The caller stopped waiting (deadline): a late answer goes nowhere."""
        self._waiters.pop(request_id, None)

    def cancel(self, request_id: str) -> bool:
        """Stop computing the prompt (the next schedule drops it) and answer its caller 'cancelled'."""
        found = False
        for p in [*self.scheduler.waiting, *self.scheduler.in_progress]:
            if p.request.request_id == request_id:
                p.cancelled, found = True, True
        if found:
            self.answer(request_id, PrefillResult.failed(request_id, "cancelled"))
        return found

    @staticmethod
    def seqs(chunks: list[Chunk], tables: list[list[int]]) -> list[SeqInput]:
        """2. One SeqInput per chunk: its prompt tokens, from its start, over its block table (a
        prompt's first chunk starts its prefill clock). A prompt that asked for prompt logprobs has
        the token after each of its positions scored (the last position's is the first generated one:
        not a prompt token)."""
        now = time.monotonic()
        for c in chunks:
            if c.pending.started is None:
                c.pending.started = now
        out = []
        for c, table in zip(chunks, tables):
            ids, top = c.pending.request.token_ids, c.pending.request.sampling.prompt_logprobs
            scored = tuple(ids[c.start + 1 : c.start + c.length + 1]) if top is not None else ()
            out.append(SeqInput(ids[c.start : c.start + c.length], c.start, table, scored, top or 0,
                                c.pending.request.sampling.adapter))
        return out

    def finish(self, chunks: list[Chunk], scores: dict[int, list[TokenLogprob]] | None = None,
               ) -> list[tuple[PendingPrefill, int]]:
        """3. The chunks were computed (scores: the prompt logprobs of chunk i's positions, from
        ModelRunner.forward): (prompt, index of its chunk in `chunks`) for each prompt whose last
        chunk this was (they leave the queue)."""
        for i, lps in (scores or {}).items():
            chunks[i].pending.prompt_logprobs += lps
        rows = {id(c.pending): i for i, c in enumerate(chunks) if c.completes}
        return [(p, rows[id(p)]) for p in self.scheduler.advance(chunks)]

    def drop(self, chunks: list[Chunk]) -> list[str]:
        """The step holding `chunks` failed: those prompts leave the queue; their ids."""
        ids = {c.pending.request.request_id for c in chunks}
        self.scheduler.in_progress = [p for p in self.scheduler.in_progress if p.request.request_id not in ids]
        return sorted(ids)

    def answer(self, request_id: str, result: PrefillResult) -> None:
        """4. Wake the caller of prefill(request_id) with `result` (no caller: nothing happens)."""
        w = self._waiters.pop(request_id, None)
        if w is not None:
            w.result = result
            w.event.set()
