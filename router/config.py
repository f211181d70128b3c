"""The `server:` and `limits:` sections of the YAML (owned by the router)."""
from __future__ import annotations

from pydantic import Field

from engine.config import Frozen


class ServerConfig(Frozen):
    host: str = Field("127.0.0.1", description="gRPC listen address.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one).")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port (0 = off).")
    grace_period_s: float = Field(
        5.0, ge=0, description="On SIGTERM/SIGINT: health turns NOT_SERVING and new requests get UNAVAILABLE at "
        "once; requests in flight may finish for this long, then end with UNAVAILABLE."
    )


class LimitsConfig(Frozen):
    max_prompt_tokens: int = Field(1536, ge=1, description="Longest accepted prompt (tokens).")
    max_new_tokens: int = Field(1024, ge=1, description="Largest accepted max_tokens.")
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when the request omits it.")
    max_concurrent_requests: int = Field(
        256, ge=1, description="Requests in flight at once; beyond it RESOURCE_EXHAUSTED."
    )
    max_queued_requests: int = Field(
        64, ge=0, description="Requests waiting for KV room (FIFO); beyond it RESOURCE_EXHAUSTED at once."
    )
    queue_timeout_s: float = Field(
        30.0, ge=0, description="Longest wait for KV room before RESOURCE_EXHAUSTED."
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Deadline of one request inside pdserve.")
    max_stop_strings: int = Field(16, ge=0, description="Most stop strings per request.")
