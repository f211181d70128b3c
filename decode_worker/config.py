"""The `decode:` section of the YAML."""
from __future__ import annotations

from pydantic import Field

from engine.config import WorkerPlacement


class DecodeConfig(WorkerPlacement):
    max_batch_size: int = Field(64, ge=1, description="Most requests in one decode step.")
    reserve_timeout_s: float = Field(
        120.0, gt=0, description="A reservation whose KV never arrives is freed after this long."
    )
