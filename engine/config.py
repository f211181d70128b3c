"""Config sections owned by the engine: which model, on which device, and the KV cache shape.

Validated once at load (pydantic, frozen); cluster/config.py composes them from the YAML.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Frozen(BaseModel):
    """Base for every config section: unknown keys are refused, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Frozen):
    path: str = Field(
        "default",
        description="'default' (embedded SmolLM2-135M-Instruct), 'tiny' (seeded random test model) "
        "or a local Hugging Face checkpoint directory of a supported family (README: model.path); unquantized, "
        "FP8 (fp8, compressed-tensors FP8, fbgemm_fp8: kept FP8 on CUDA) or gpt-oss's MXFP4 experts "
        "(kept so on CUDA); dequantized elsewhere.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights and KV dtype (float32 is fastest on CPU)."
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the tensors live.")
    max_model_len: int = Field(
        2048, gt=0, description="Longest prompt + generation a request may have (tokens); at most the positions "
        "the model was trained for (max_position_embeddings, stretched by a yarn/dynamic/linear rope scaling)."
    )
    seed: int = Field(0, description="Seed for the tiny test model's random weights.")
    lora_adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters served beside the model: name → a local PEFT folder "
        "(adapter_config.json + adapter_model.safetensors) training q/k/v/o and, in dense layers, gate/up/down "
        "projections. A request runs with one by naming it (HTTP: as `model`; gRPC: lora_adapter); rows of "
        "different adapters share a forward (their decode steps run without CUDA graphs).")
    quantization: Literal["none", "fp8"] = Field(
        "none", description="fp8 (cuda only): the decoder's attention projections, dense MLPs, shared experts "
        "and experts quantized to FP8 e4m3 as the model loads, one scale per 128 weights of a row "
        "(engine/fp8.py): half of bf16's memory and bytes read a step; routers, embeddings and the LM head "
        "stay as they are. A dense model is quantized weight by weight as it is read (no bf16 peak). An FP8 "
        "checkpoint needs no setting: its layers are kept FP8 on cuda.")
    kernels: Literal["auto", "torch", "triton"] = Field(
        "auto", description="auto: on CPU, oneDNN pre-packed linear layers and the fused paged decode-"
        "attention kernel (each falls back if unavailable); on CUDA, the Triton paged-attention kernels. "
        "torch: F.linear + gather/SDPA everywhere (the reference). triton: the Triton kernels (on CPU only "
        "under TRITON_INTERPRET=1, for tests)."
    )


    @model_validator(mode="after")
    def _fp8_on_cuda(self) -> "ModelConfig":
        if self.quantization == "fp8" and self.device != "cuda":
            raise ValueError("model.quantization: fp8 needs model.device: cuda (its matmul is a CUDA kernel)")
        return self


class KVCacheConfig(Frozen):
    block_size: int = Field(16, gt=0, le=1024, description="Tokens per KV block.")
    num_blocks: int = Field(
        512, gt=0, description="KV blocks per decode worker (the paged cache size)."
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Instead of num_blocks (cuda only): the fraction of a GPU's memory a "
        "decode worker may use in all (weights, activations, KV), times its num_gpus when that is under 1 "
        "(two workers at 0.5 share one GPU); its KV cache gets the rest, sized at start-up."
    )

    dtype: Literal["auto", "fp8"] = Field(
        "auto", description="auto: the cache in model.dtype. fp8: in FP8 e4m3 (cuda, sm_89 or later: L4, H100), "
        "each K and V value clamped to ±448 and rounded, no scales (vLLM's fp8 without calibrated scales): "
        "half of bf16's bytes a token, so twice the tokens in the same memory and half of decode attention's "
        "reads; the hand-off moves half the bytes. Prefill and decode workers share it (one config)."
    )
    allocation: Literal["on_demand", "upfront"] = Field(
        "on_demand", description="on_demand: a decode worker holds a request's prompt blocks and adds one as "
        "its output grows; when none is free, the newest requests are preempted and their KV computed again "
        "on that worker once room returns (vLLM's recompute preemption). upfront: prompt + max_tokens are "
        "held from admission: never preempts, admits fewer (a request's max_tokens, not its answer, counts)."
    )
    watermark: float = Field(
        0.01, ge=0, lt=1, description="on_demand: a new request is admitted only if this fraction of the "
        "blocks stays free after its prompt's (room for the running requests to grow into)."
    )
    prefix_cache: bool = Field(
        True, description="Keep the KV blocks of finished and preempted requests (prompt and output) until "
        "their room is needed, found by an exact prefix: an aggregated worker computes a prompt from after "
        "its longest cached prefix, a decode worker's reservation holds them (the prefill hands off only the "
        "rest), and a resumed or moved request recomputes only what was evicted. Shared only between "
        "requests of the same cache_salt."
    )

    @model_validator(mode="after")
    def _one_size(self) -> "KVCacheConfig":
        if self.gpu_memory_utilization is not None and "num_blocks" in self.model_fields_set:
            raise ValueError("kv_cache: set num_blocks or gpu_memory_utilization, not both")
        return self


class TransportConfig(Frozen):
    backend: Literal["auto", "ipc", "nccl", "gloo"] = Field(
        "auto", description="KV hand-off backend per prefill-decode pair. ipc: the prefill writes straight "
        "into the decode worker's cache (CUDA IPC on GPU, shared memory on CPU; same node only); nccl / gloo: "
        "a per-pair communicator (CUDA / CPU tensors, any nodes); auto: ipc when the pair shares a node, "
        "else nccl on cuda and gloo on cpu."
    )
    timeout_s: float = Field(
        60.0, gt=0, description="Deadline of one KV write, from its grant: a write that has not landed by "
        "then fails its request (the blocks are freed only then); a direct write must start within half of it."
    )
    on_failure: Literal["fail", "recompute"] = Field(
        "fail", description="A KV write that fails after its grant: fail the request (UNAVAILABLE), or let the "
        "decode worker compute the prompt's KV itself (counted as kv_recomputes) and go on."
    )


class WorkerPlacement(Frozen):
    """Where a role's Ray actors run: how many, and what each asks of the Ray cluster."""

    replicas: int = Field(1, ge=1, le=256, description="Number of workers (actors) of this role.")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs per worker.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per worker (1 per worker with device: cuda).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per worker, e.g. {prefill_node: 1}."
    )
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per worker process.")
