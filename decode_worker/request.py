"""Per-request state on a decode worker: one object, one explicit status."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.speculative import Pace
from engine.structured import Guide
from engine.think_budget import ThinkBudget
from engine.types import FinishReason, SamplingParams, finish_reason


class DecodeStatus(enum.Enum):
    RESERVED = "reserved"  # blocks held, prefill not done yet
    PREFILLING = "prefilling"  # aggregated mode: this worker computes the prompt into its blocks
    WRITING = "writing"  # a prefill worker is writing its KV into the blocks (kv_handoff step 3-5)
    READY = "ready"  # KV landed in the blocks, waiting for a batch slot
    RUNNING = "running"  # in the decode batch
    PREEMPTED = "preempted"  # its blocks were taken back (the cache ran out); output kept, waits for room
    RECOMPUTING = "recomputing"  # blocks again; this worker computes its KV (prompt + output) anew
    FINISHED = "finished"


@dataclass
class DecodeRequest:
    request_id: str
    num_prompt_tokens: int
    sampling: SamplingParams
    eos_token_ids: tuple[int, ...]
    block_table: list[int]
    prompt_ids: list[int] | None = None  # for a repetition penalty, and to recompute its KV (preemption)
    status: DecodeStatus = DecodeStatus.RESERVED
    output_ids: list[int] = field(default_factory=list)  # generated tokens, the prefill's first included
    finish_reason: FinishReason | None = None
    cancelled: bool = False  # cancelled while WRITING: ends (and frees its blocks) once the write does
    created: float = field(default_factory=time.monotonic)
    recomputed: int = 0  # RECOMPUTING: tokens of recompute_ids() whose KV is computed again so far
    cache_salt: str | None = None  # its KV blocks are shared only under this salt; None: never shared
    shared_tokens: int = 0  # of its prompt, the tokens whose KV it found cached here at reserve (never written)
    guide: Guide | None = None  # structured output: its place in its grammar (made at its first sampling here)
    think: ThinkBudget | None = None  # a thinking budget: its count (made at its first sampling here)
    pace: Pace | None = None  # speculative decoding: its draft length (made at its first lookup here)

    @property
    def rank(self) -> tuple[int, float]:
        """Its place in every queue here: priority (lower first), then arrival."""
        return self.sampling.priority, self.created

    def recompute_ids(self) -> list[int]:
        """The tokens whose KV it holds when it runs: the prompt and every output but the last (that
        one is fed by its next decode step)."""
        assert self.prompt_ids is not None, "a request without its prompt ids cannot be recomputed"
        return [*self.prompt_ids, *self.output_ids[:-1]]

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def check_finished(self) -> FinishReason | None:
        """Decide after appending a token whether the request is done (structured output: also once
        its grammar takes nothing more)."""
        reason = finish_reason(self.output_ids[-1], len(self.output_ids), self.sampling, self.eos_token_ids)
        if reason is None and self.guide is not None:
            self.guide.follow(self.output_ids)
            if self.guide.complete:
                return FinishReason.STOP
        return reason
