"""gpt-oss loaded with its experts kept in MXFP4, as OpenAI released them (on CUDA; elsewhere they
are dequantized as they load: engine/model_loader.py).

Hugging Face's own loading would either need its `kernels` hub packages (not on a machine without a
network) or dequantize every expert to bf16 — ~230 GB for gpt-oss-120b, more than one GPU and than
most hosts' memory. So this reads the checkpoint itself (engine/checkpoint.py): the experts'
`*_blocks` ([E, N, K/32, 16] → [E, N, K/2]) and `*_scales` ([E, N, K/32]) become plain attributes of
their experts module, which engine/moe.py reads as Mxfp4 weights, and the experts' dequantized
parameters are left empty. The runner then multiplies by the MXFP4 weights directly
(engine/triton_mxfp4.py): ~61 GB of experts for gpt-oss-120b, ~12 GB for gpt-oss-20b.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from engine import checkpoint

QUANTIZED = ("_blocks", "_scales")


def load(path: Path, config: Any, dtype: torch.dtype, device: torch.device | str, attention: str) -> PreTrainedModel:
    return checkpoint.load(path, config, dtype, device, attention, _keep, _empty_experts)


def _keep(model: torch.nn.Module, key: str, t: torch.Tensor) -> bool:
    """An expert weight's MXFP4 codes or scales, kept as they are."""
    owner, _, name = key.rpartition(".")
    if not name.endswith(QUANTIZED):
        return False
    if name.endswith("_blocks"):
        t = t.reshape(*t.shape[:-2], -1)  # [E, N, K/32, 16] → [E, N, K/2]
    setattr(model.get_submodule(owner), name, t.contiguous())
    return True


def _empty_experts(model: PreTrainedModel) -> None:
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            experts._parameters[name] = torch.nn.Parameter(torch.empty(0, dtype=model.dtype, device=model.device),
                                                           requires_grad=False)
