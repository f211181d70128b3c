"""FP8 checkpoints (`quant_method: fp8`, weight_block_size [*, 128]: Qwen 3's *-FP8 releases) kept in
FP8 on CUDA: a dense model's linear layers hold e4m3 codes and their block scales, half the memory of
bf16 and half the bytes each decode step reads, and the runner multiplies by them directly
(engine/triton_fp8.py). Elsewhere, and for the models whose layers the runner does not compute with
its own linear layers (mixtures of experts, DeepSeek's latent attention), Hugging Face dequantizes
them as they load (engine/model_loader.py).

`model.quantization: fp8` quantizes an unquantized checkpoint's same layers as it loads (quantize_model):
each run of 128 weights along a row scaled apart (finer than the checkpoints' 128 × 128 blocks).

Read by engine/checkpoint.py; a linear layer's FP8 `weight` [N, K] stays its parameter, in FP8, and its
`weight_scale_inv` [⌈N/bn⌉, ⌈K/128⌉] becomes `weight_scale` [N, ⌈K/128⌉] (one row per weight row:
triton_fp8.expand_scales), which engine/linear.py reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from engine import checkpoint
from engine.triton_fp8 import GROUP_K, expand_scales, quantize

FP8 = torch.float8_e4m3fn


def kept(config: Any, device: str) -> bool:
    """Whether this checkpoint's FP8 weights stay FP8: block-quantized, 128 along K (the kernel's
    GROUP_K), on CUDA, in a model whose every linear layer the runner computes itself."""
    quant = getattr(config, "quantization_config", None) or {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    block = quant.get("weight_block_size") or [0, 0]
    experts = any(getattr(config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    return (quant.get("quant_method") == "fp8" and block[1] == GROUP_K and torch.device(device).type == "cuda"
            and not experts and not getattr(config, "kv_lora_rank", None))


def load(path: Path, config: Any, dtype: torch.dtype, device: torch.device | str, attention: str) -> PreTrainedModel:
    quant = config.quantization_config
    block_n = int((quant if isinstance(quant, dict) else quant.to_dict())["weight_block_size"][0])

    def keep(module: torch.nn.Module, name: str, t: torch.Tensor) -> bool:
        if name == "weight" and t.dtype == FP8:
            module._parameters["weight"] = torch.nn.Parameter(t.contiguous(), requires_grad=False)
            return True
        if name == "weight_scale_inv":
            module.weight_scale = expand_scales(t, module.out_features, block_n)  # [N, ⌈K/128⌉]
            return True
        return False

    return checkpoint.load(path, config, dtype, device, attention, keep, _paired)


def _paired(model: PreTrainedModel) -> None:
    """Every FP8 weight has its scales and every scale its FP8 weight."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (weight is not None and weight.dtype == FP8) != hasattr(module, "weight_scale"):
            raise ValueError(f"{name}: an FP8 weight without its weight_scale_inv, or the other way round")


def quantize_model(model: PreTrainedModel) -> int:
    """Quantize, in place, the linear layers the runner computes with its own (engine/layers.py): each
    decoder layer's attention projections and dense MLP — not the experts, the routers, DeepSeek's latent
    attention (Hugging Face's modules), the embeddings or the LM head; → how many. The model is
    loaded in its dtype first: its peak memory is the unquantized model's."""
    count = 0
    for layer in model.model.layers:
        owners = [] if hasattr(layer.self_attn, "kv_a_proj_with_mqa") else [layer.self_attn]
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and not hasattr(mlp, "experts"):
            owners.append(mlp)
        for m in (m for owner in owners for m in owner.children()):
            if isinstance(m, torch.nn.Linear) and m.weight.dtype != FP8:
                codes, m.weight_scale = quantize(m.weight.data)
                m.weight = torch.nn.Parameter(codes, requires_grad=False)
                count += 1
    return count
