"""How many KV blocks a worker gets: a fixed `kv_cache.num_blocks`, or what fits in its share of the GPU.

With `kv_cache.gpu_memory_utilization: u`, a worker holding `g` of a GPU (its `num_gpus`, at most 1)
may use `u * g` of that GPU's memory for everything of its own:
  1. load the weights; run one forward of the largest step it will run (decode rows or prompt tokens)
     to find its peak activations, then what prompt logprobs take beside that step's hidden states
     (the LM head and log-softmax of SCORE_ROWS positions in fp32: [256, vocab] twice, 256 MB at a
     128k vocabulary), then the sampler at its largest batch, every row in its heaviest way (a
     penalty, a full sort, 20 logprobs: several [rows, vocab] tensors, ~1.5 GB at 256 rows and a
     128k vocabulary) → `used` = torch's peak reserved bytes in this process (`profile_peak`);
  2. KV gets `u * g * total - used`, never more than is free on the GPU right now;
  3. blocks = that // bytes per block (all layers, K and V); too few for one request is an error
     naming the field.
Two workers on one GPU with num_gpus 0.5 each thus take half each. What the budget leaves out: the
CUDA context and the CUDA-graph pool of each process (tens to hundreds of MB): keep u below ~0.9.
"""
from __future__ import annotations

from typing import Any

import torch

from engine.config import KVCacheConfig
from engine.model_shape import kv_dims
from engine.prompt_scores import SCORE_ROWS
from engine.sampler import History, sample_queued
from engine.types import SamplingParams

GiB = 2**30


def cache_dtype(kind: str, model: Any) -> torch.dtype:
    """The KV cache's dtype for kv_cache.dtype `kind`: FP8 e4m3 (fp8), else the model's (its embeddings':
    a linear layer's may be FP8, engine/fp8.py)."""
    return torch.float8_e4m3fn if kind == "fp8" else model.model.embed_tokens.weight.dtype


def block_bytes(model_cfg: Any, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block: K and V of block_size tokens in every layer."""
    kv_heads, head_dim = kv_dims(model_cfg)
    elem = torch.empty((), dtype=dtype).element_size()
    return model_cfg.num_hidden_layers * 2 * block_size * kv_heads * head_dim * elem


def blocks_for_memory(total: int, share: float, used: int, free: int, per_block: int, min_blocks: int) -> int:
    """Blocks that fit in `share * total` bytes after `used`, and in `free`; at least `min_blocks`."""
    budget = min(int(total * share) - used, free)
    n = max(budget, 0) // per_block
    if n < min_blocks:
        raise ValueError(
            f"kv_cache.gpu_memory_utilization: {share:.3f} of {total / GiB:.1f} GiB ({free / GiB:.1f} GiB free) "
            f"leaves {max(budget, 0) / GiB:.2f} GiB for KV after {used / GiB:.2f} GiB of weights and activations: "
            f"{n} blocks of {per_block / 2**20:.2f} MiB, fewer than the {min_blocks} one request of "
            "model.max_model_len needs; raise it, or lower max_model_len / max_batch_size"
        )
    return n


@torch.inference_mode()
def num_blocks(kv_cfg: KVCacheConfig, model: Any, gpu_share: float, profile_tokens: int, max_model_len: int,
               sample_rows: int = 1) -> int:
    """kv_cfg.num_blocks, or (with gpu_memory_utilization) what fits in this worker's share of its GPU;
    sample_rows: the most rows one step samples (its largest decode batch)."""
    if kv_cfg.gpu_memory_utilization is None:
        return kv_cfg.num_blocks
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError("kv_cache.gpu_memory_utilization: needs model.device: cuda (set kv_cache.num_blocks)")
    used = profile_peak(model, profile_tokens, sample_rows)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    per_block = block_bytes(model.config, kv_cfg.block_size, cache_dtype(kv_cfg.dtype, model))
    share = kv_cfg.gpu_memory_utilization * min(gpu_share, 1.0)
    return blocks_for_memory(total, share, used, free, per_block, -(-max_model_len // kv_cfg.block_size))


@torch.inference_mode()
def profile_peak(model: Any, profile_tokens: int, sample_rows: int = 1) -> int:
    """Step 1 on a CUDA model: torch's peak reserved bytes over a forward of `profile_tokens`, the
    scoring of prompt logprobs beside that step's hidden states (engine/prompt_scores.py's shapes) and
    the sampling of `sample_rows` rows (worst_sample)."""
    device = next(model.parameters()).device
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.zeros(1, profile_tokens, dtype=torch.long, device=device)
    model(input_ids=ids, logits_to_keep=1)  # the peak of a step this size (HF's activations >= the runner's)
    hidden = torch.zeros(2, profile_tokens, model.config.hidden_size, dtype=model.dtype, device=device)  # x, residual
    rows = hidden[0, : min(SCORE_ROWS, profile_tokens)]  # [n, hidden]
    lp = torch.log_softmax(model.lm_head(rows).float(), dim=-1)  # [n, V] fp32, beside its fp32 logits
    torch.topk(lp, min(20, lp.shape[-1]))
    del hidden, rows, lp
    worst_sample(sample_rows, model.config.vocab_size, device)
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_reserved(device))


def worst_sample(rows: int, vocab: int, device: torch.device) -> None:
    """One sampling of `rows` rows of fp32 logits in the sampler's heaviest way for its memory: each
    row penalized over a history, drawn by a sort of its whole vocabulary (race.draw_sorted, a step
    in flight's draw) with top-p and min-p, and asking for 20 logprobs."""
    logits = torch.randn(rows, vocab, device=device)  # [rows, V]
    sp = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.01, repetition_penalty=1.1, logprobs=20, seed=0)
    history = History(list(range(64)), list(range(64)))
    sample_queued(logits, [sp] * rows, list(range(rows)), [history] * rows).collect()
