"""The `prefill:` section of the YAML."""
from __future__ import annotations

from pydantic import Field

from engine.config import WorkerPlacement


class PrefillConfig(WorkerPlacement):
    max_batch_tokens: int = Field(
        2048, ge=16, description="Token budget of one prefill forward (prompts are packed up to it)."
    )
    chunk_tokens: int = Field(
        128, ge=16, description="Prompts longer than this are prefilled in chunks of this size (128 gave "
        "short prompts half the TTFT of 512 behind 1024-token documents on a CPU)."
    )
    kv_blocks: int = Field(
        256, ge=1, description="Scratch KV blocks on a prefill worker: the prompts being computed and "
        "handed off; the rest keeps earlier prompts' KV for reuse (prefix_cache)."
    )
    prefix_cache: bool = Field(
        True, description="Keep handed-off prompts' full KV blocks in the scratch blocks and compute only "
        "what a new prompt does not share with them (engine/prefix_cache.py)."
    )
    overlap_reserve: bool = Field(
        False, description="The router sends a prompt here while the decode worker reserves its KV (the "
        "destination follows: router/dispatcher.py, step 2), not after: TTFT should lose a round trip where "
        "the prompt's compute does not share CPUs with the router and Ray (a GPU host). Off by default "
        "until measured on a GPU (on 2 CPU cores it left TTFT unchanged: see the README)."
    )
