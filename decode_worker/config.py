"""The `decode:` and `aggregated:` sections of the YAML."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engine.config import Frozen, WorkerPlacement
from engine.speculative import Lookup


class SpeculativeConfig(Frozen):
    """`speculative:` of a decode or aggregated section: drafts by prompt lookup (engine/speculative.py)."""

    num_tokens: int = Field(
        0, ge=0, le=16, description="Most draft tokens a row feeds in one decode step, taken from what "
        "followed an earlier occurrence of its last tokens in its prompt or output (prompt lookup: vLLM's "
        "`ngram`); the step's forward checks them all and the row keeps those the model agrees with, then the "
        "model's own next token: 1 to num_tokens + 1 tokens a step, the same tokens as decoding one at a time. "
        "A drawn row accepts a draft when its draw there is the draft (a seeded row draws the tokens it draws "
        "without drafts); a grammar's mask and a thinking budget's forced token at each draft come from copies "
        "that followed the drafts before it. Each "
        "draft is a one-token decode row (on CUDA within the decode graphs); a step with drafts is not left in "
        "flight. 0: off."
    )
    prompt_lookup_max: int = Field(4, ge=1, le=32, description="Longest run of a row's last tokens looked up.")
    prompt_lookup_min: int = Field(
        2, ge=1, le=32, description="Shortest run looked up (the longest that occurred before wins).")

    @model_validator(mode="after")
    def _ordered(self) -> "SpeculativeConfig":
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative.prompt_lookup_min ({self.prompt_lookup_min}) is above prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        return self

    @property
    def lookup(self) -> Lookup:
        return Lookup(self.num_tokens, self.prompt_lookup_min, self.prompt_lookup_max)


class BatchConfig(WorkerPlacement):
    """What decode and aggregated workers share (decode_worker/batch_worker.py)."""

    max_batch_size: int = Field(64, ge=1, description="Most requests in one decode step.")
    reserve_timeout_s: float = Field(
        120.0, gt=0, description="A reservation whose KV never arrives is freed after this long."
    )
    max_recompute_tokens: int = Field(
        256, ge=16, description="Most tokens of preempted requests' KV (kv_cache.allocation: on_demand) or of a "
        "failed hand-off (transport.on_failure: recompute) computed again in one step, beside its decode rows; "
        "on a decode worker, prompts computed there (local_prefill_max_tokens) share it."
    )
    cuda_graphs: bool = Field(
        True, description="On cuda with the triton kernels: steps replay CUDA graphs captured at start-up, one "
        "per bucket of rows (1, 2, 4, 8, then every 16, up to the worker's step: max_batch_size + "
        "max_recompute_tokens, or max_batch_tokens where larger); a decode row is a row, and so is each token of a "
        "prompt chunk (aggregated, local prefill, recompute) while the step's rows read no more keys than "
        "max_batch_size rows at max_model_len; a larger step runs eagerly. false: eager."
    )
    overlap_steps: bool = Field(
        True, description="With cuda_graphs: while nothing but the running rows waits, a decode step is queued "
        "behind the one in flight (each row fed its token on the device) before the host reads the first one's "
        "tokens, so scheduling, input copies and bookkeeping overlap the forward; a batch with a row whose draw "
        "needs the tokens before it (penalties, a grammar) is sampled once they are read, its forward already "
        "queued. false: each step completes before the next is scheduled."
    )
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)


class DecodeConfig(BatchConfig):
    """The `decode:` section: workers whose prompts' KV a prefill worker writes."""

    local_prefill_max_tokens: int = Field(
        0, ge=0, description="A prompt whose tokens not cached on the decode worker that reserved for it are at "
        "most this many is computed there, beside its decode rows, instead of on a prefill worker: no prefill "
        "queue, no KV transfer (a chat's next turn, whose history is cached there; a short prompt). Counts "
        "against max_recompute_tokens per step. 0: every prompt goes to a prefill worker."
    )
    local_prefill_queue_tokens: int = Field(
        0, ge=0, description="While every live prefill worker has at least this many prompt tokens in hand "
        "(queued or being computed, counted by the router), a new prompt of any length is computed by the decode "
        "worker that reserved for it instead (Dynamo's conditional disaggregation: under a burst of long "
        "prompts TTFT stops waiting for the prefill backlog; the decode batch's steps carry the prompt's chunks). "
        "0: off."
    )


class AggregatedConfig(BatchConfig):
    """The `aggregated:` section: workers that prefill and decode (mode: aggregated, the baseline)."""

    max_batch_tokens: int = Field(
        256, ge=16, description="Token budget of one step: decode rows (1 token each) + prompt chunks (Sarathi)."
    )
    chunk_tokens: int = Field(128, ge=16, description="Longest prompt chunk in one step.")
    batching: Literal["continuous", "static"] = Field(
        "continuous", description="continuous: requests join and leave every step, prompt chunks share "
        "steps with decodes; static: a batch of up to max_batch_size requests is prefilled, then decoded "
        "to the end before the next batch starts."
    )
