"""YAML → one frozen, validated PDServeConfig. Each section is defined by the package that reads it.

Errors name the field, the bad value and what is allowed, e.g.
    prefill.replicas: Input should be greater than or equal to 1 (got 0)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from decode_worker.config import AggregatedConfig, DecodeConfig
from engine.config import Frozen, KVCacheConfig, ModelConfig, TransportConfig
from prefill_worker.config import PrefillConfig
from router.config import LimitsConfig, ServerConfig


class ConfigError(ValueError):
    pass


class RayClusterConfig(Frozen):
    address: str | None = Field(
        None, description="null: start a local Ray; 'auto' or ray://host:port: join a running cluster. "
        "RAY_ADDRESS in the environment is used when this is null."
    )
    namespace: str = Field("pdserve", description="Ray namespace of the actors.")
    name: str = Field("pdserve", pattern=r"^[a-z0-9-]{1,40}$", description="Prefix of actor names.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (default: the machine's).")
    startup_timeout_s: float = Field(300.0, gt=0, description="Deadline for all workers to be ready.")
    max_restarts: int = Field(
        3, ge=-1, description="Times Ray restarts a worker process that dies (-1: always); a restarted worker "
        "reloads the model, is wired into the hand-off again and takes traffic. 0: a dead worker stays dead."
    )
    health_check_interval_s: float = Field(
        1.0, gt=0, description="How often the router probes every worker (lost → its requests fail at once; "
        "restarted → re-wired)."
    )


class PDServeConfig(Frozen):
    mode: Literal["disaggregated", "aggregated"] = Field(
        "disaggregated", description="disaggregated: prefill and decode workers, KV handed off between them; "
        "aggregated: the `aggregated:` workers do both (the baseline; prefill:/decode: are then unused)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    prefill: PrefillConfig = Field(default_factory=PrefillConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    aggregated: AggregatedConfig = Field(default_factory=AggregatedConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    cluster: RayClusterConfig = Field(default_factory=RayClusterConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "PDServeConfig":
        m = self.model
        if self.limits.max_prompt_tokens >= m.max_model_len:
            raise ValueError(
                f"limits.max_prompt_tokens ({self.limits.max_prompt_tokens}) must be < model.max_model_len "
                f"({m.max_model_len})"
            )
        kv_tokens = self.kv_cache.num_blocks * self.kv_cache.block_size
        if self.kv_cache.gpu_memory_utilization is not None:  # sized at start-up (engine/kv_budget.py)
            if m.device != "cuda":
                raise ValueError("kv_cache.gpu_memory_utilization: needs model.device: cuda (set kv_cache.num_blocks)")
        elif kv_tokens < m.max_model_len:
            raise ValueError(
                f"kv_cache.num_blocks: {self.kv_cache.num_blocks} blocks x {self.kv_cache.block_size} tokens = "
                f"{kv_tokens} tokens cannot hold one request of model.max_model_len={m.max_model_len}"
            )
        if self.kv_cache.dtype == "fp8" and m.device != "cuda" and m.kernels != "triton":
            raise ValueError("kv_cache.dtype: fp8 needs model.device: cuda (its kernels are Triton's; on cpu only "
                             "model.kernels: triton under TRITON_INTERPRET=1, for tests)")
        if self.transport.backend == "nccl" and m.device != "cuda":
            raise ValueError("transport.backend: nccl needs model.device: cuda (use gloo or auto on cpu)")
        if self.transport.backend == "gloo" and m.device == "cuda":
            raise ValueError("transport.backend: gloo cannot move CUDA tensors (use auto, ipc or nccl on cuda)")
        if m.device == "cuda":
            for role in self.roles:
                if getattr(self, role).num_gpus <= 0:
                    raise ValueError(f"{role}.num_gpus: must be > 0 with model.device: cuda")
        return self

    @property
    def roles(self) -> tuple[str, ...]:
        """The YAML sections whose workers this mode starts."""
        return ("aggregated",) if self.mode == "aggregated" else ("prefill", "decode")


def _format(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        got = f" (got {err['input']!r})" if err["type"] not in ("missing",) and not isinstance(err["input"], dict) else ""
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}{got}" if loc else msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_config(data: dict[str, Any]) -> PDServeConfig:
    try:
        return PDServeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def load_config(path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> PDServeConfig:
    """Read the YAML (None = all defaults), apply CLI overrides {section: {key: value}}, validate once."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    for section, values in (overrides or {}).items():
        sec = dict(data.get(section) or {})
        sec.update({k: v for k, v in values.items() if v is not None})
        data[section] = sec
    return parse_config(data)
