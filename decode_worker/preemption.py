"""Preemption on a decode worker (kv_cache.allocation: on_demand), vLLM's recompute kind. A mixin
of DecodeScheduler (scheduler.py), which owns the state it reads.

  1. schedule() finds no free block for a running request's next token: the last request by rank
     (priority, then arrival: DecodeRequest.rank) among the READY and RUNNING ones gives its blocks back → PREEMPTED (_preempt), its
     output kept; its KV stays cached until the room is taken; no new reservation is taken while
     any waits
  2. resume(): the first by rank gets its blocks again when they fit (_fits) → RECOMPUTING; what is still
     cached of its KV (engine/prefix_cache.py) is held again, not computed
  3. recompute_chunks() / on_recomputed(): the worker computes the rest of the KV of its prompt and
     output in chunks beside its decode rows → READY, ahead of newer ones; it goes on where it
     stopped (same positions, same seeded draws)
The same path serves a failed hand-off with transport.on_failure: recompute (recompute_write:
WRITING → RECOMPUTING) and a request moved here from a lost decode worker (adopt: → PREEMPTED, with
the tokens it has streamed).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from decode_worker.request import DecodeRequest, DecodeStatus
from engine.prefix_cache import PrefixCache
from engine.types import ReserveResult, SamplingParams


@dataclass(frozen=True)
class Recompute:
    """Tokens [start, start + length) of `request.recompute_ids()`, computed again in one step."""

    request: DecodeRequest
    start: int
    length: int


class Preemption:
    allocator: PrefixCache
    on_demand: bool
    watermark_blocks: int
    requests: dict[str, DecodeRequest]
    ready: deque[str]
    running: list[str]
    preempted: list[str]
    recomputing: list[str]
    preemptions: int
    hold_kv: bool
    held: list[tuple[DecodeRequest, int]]

    def _victim(self) -> DecodeRequest:
        """The last request by rank (the largest priority value, then the newest) among the READY and
        RUNNING ones (whose blocks nobody is writing into) that can be recomputed — never one ranked
        before the running request asking for a block (only such a one asks: the others hold
        prompt + max_tokens)."""
        held = [self.requests[rid] for rid in (*self.ready, *self.running)]
        return max((r for r in held if r.status in (DecodeStatus.READY, DecodeStatus.RUNNING)
                    and r.prompt_ids is not None), key=lambda r: r.rank)

    def _preempt(self, req: DecodeRequest) -> None:
        """Give its blocks back; it keeps its output and resumes (recomputed) when room returns."""
        assert req.prompt_ids is not None, "on_demand reservations carry their prompt ids"
        self._let_go(req, self._kv_tokens(req))
        req.block_table = []
        if req.request_id in self.running:
            self.running.remove(req.request_id)
        if req.request_id in self.ready:
            self.ready.remove(req.request_id)
        self.preemptions += 1
        self._preempt_queue(req)

    def _preempt_queue(self, req: DecodeRequest) -> None:
        req.status = DecodeStatus.PREEMPTED
        self._insert_by_rank(self.preempted, req)

    def adopt(
        self, request_id: str, prompt_ids: list[int], output_ids: list[int], sampling: SamplingParams,
        eos_token_ids: tuple[int, ...], cache_salt: str = "",
    ) -> ReserveResult:
        """A request moved here mid-stream (its decode worker was lost): it joins as if preempted
        here — its KV is recomputed from its prompt and the tokens it has streamed (the last one is
        fed next), ahead of any new reservation — and decodes on from there."""
        if request_id in self.requests:
            return ReserveResult(False, f"request_id {request_id!r} is already in use")
        if not output_ids or len(output_ids) >= sampling.max_tokens:
            return ReserveResult(False, f"output_ids: {len(output_ids)} tokens of max_tokens={sampling.max_tokens}: "
                                        "nothing to go on with")
        if (never := self._never_fits(len(prompt_ids), sampling)) is not None:
            return never
        req = DecodeRequest(request_id, len(prompt_ids), sampling, eos_token_ids, [], list(prompt_ids),
                            output_ids=list(output_ids), cache_salt=cache_salt)
        self.requests[request_id] = req
        self._preempt_queue(req)
        return ReserveResult(True)

    def resume(self) -> list[DecodeRequest]:
        """PREEMPTED → RECOMPUTING, first by rank first, while its blocks (prompt + output) fit (_fits),
        the cached head of its KV held again; the requests resumed."""
        resumed = []
        while self.preempted:
            req = self.requests[self.preempted[0]]
            if not self._fits(self.allocator.blocks_for(self._holds(req))):
                break
            assert req.prompt_ids is not None and req.cache_salt is not None  # only such ones are preempted or adopted
            cached = self.allocator.allocate_prompt(req.request_id, req.recompute_ids(), req.cache_salt, self._holds(req))
            if cached is None:  # its next block is being computed by another request: next step
                break
            req.block_table = list(self.allocator.table(req.request_id))
            self.preempted.pop(0)
            self._start_recompute(req, cached)
            resumed.append(req)
        return resumed

    def recompute_chunks(self, budget: int) -> list[Recompute]:
        """This step's share of the recomputing requests' KV: at most `budget` tokens, first by rank first."""
        chunks = []
        for rid in self.recomputing:
            if budget <= 0:
                break
            req = self.requests[rid]
            n = min(budget, req.num_tokens - 1 - req.recomputed)  # len(recompute_ids()), not built
            chunks.append(Recompute(req, req.recomputed, n))
            budget -= n
        return chunks

    def on_recomputed(self, chunks: list[Recompute]) -> None:
        """The chunks' KV is computed: a request whose KV is whole again is READY, ahead of new ones."""
        for c in chunks:
            req = c.request
            if req.status is not DecodeStatus.RECOMPUTING:  # cancelled meanwhile
                continue
            req.recomputed = c.start + c.length
            self.allocator.commit(req.request_id, req.recomputed, req.recompute_ids())
            if req.recomputed == req.num_tokens - 1:
                self.recomputing.remove(req.request_id)
                req.status = DecodeStatus.READY
                self.ready.appendleft(req.request_id)

    def _start_recompute(self, req: DecodeRequest, cached: int = 0) -> None:
        """cached: tokens of recompute_ids() whose KV is in its blocks already."""
        req.status = DecodeStatus.RECOMPUTING
        req.recomputed = cached
        self._insert_by_rank(self.recomputing, req)

    @staticmethod
    def _kv_tokens(req: DecodeRequest) -> int:
        """Tokens (of prompt + output) whose KV is complete in its blocks right now, between steps."""
        if req.status in (DecodeStatus.READY, DecodeStatus.RUNNING):
            return req.num_tokens - 1  # the last one is fed next
        if req.status is DecodeStatus.PREFILLING and req.output_ids:  # its first token ends it at once
            return req.num_prompt_tokens
        if req.status is DecodeStatus.RECOMPUTING:
            return req.recomputed
        return 0  # RESERVED, WRITING; PREFILLING: the worker commits each computed chunk itself

    def _let_go(self, req: DecodeRequest, kv_tokens: int) -> None:
        """Free its blocks, the whole ones of its first `kv_tokens` tokens cached for reuse — or,
        while `hold_kv` (a step that may still write into them is in flight), once release_held()
        says that step has run."""
        if self.hold_kv:
            self.held.append((req, kv_tokens))
            return
        cacheable = kv_tokens > 0 and req.cache_salt is not None and req.prompt_ids is not None
        self.allocator.release(req.request_id, kv_tokens if cacheable else 0, req.recompute_ids() if cacheable else None)

    def release_held(self) -> None:
        """The step in flight when they ended has run: free the blocks of the requests held."""
        held, self.held = self.held, []
        for req, kv_tokens in held:
            self._let_go(req, kv_tokens)

    def _insert_by_rank(self, ids: list[str], req: DecodeRequest) -> None:
        i = len(ids)
        while i > 0 and self.requests[ids[i - 1]].rank > req.rank:
            i -= 1
        ids.insert(i, req.request_id)

    def _never_fits(self, num_prompt_tokens: int, sampling: SamplingParams) -> ReserveResult | None:
        """A refusal if prompt + max_tokens is more than the whole cache (it could never finish)."""
        n = num_prompt_tokens + sampling.max_tokens
        if self.allocator.blocks_for(n) <= self.allocator.num_blocks:
            return None
        return ReserveResult(False, f"prompt + max_tokens = {n} tokens never fit this worker's KV cache "
                                    f"({self.allocator.num_blocks} blocks of {self.allocator.block_size})")

    def _holds(self, req: DecodeRequest) -> int:
        """Tokens of KV a resumed request holds: what it has (on_demand), or all it may need (upfront)."""
        return req.num_tokens if self.on_demand else req.num_prompt_tokens + req.sampling.max_tokens

    def _fits(self, n_blocks: int) -> bool:
        """n_blocks can be taken and leave the watermark free — or the cache is empty (a request as
        long as the whole cache must not wait for ever)."""
        free = self.allocator.num_free
        return n_blocks <= free and (n_blocks + self.watermark_blocks <= free or self.allocator.num_used == 0)
