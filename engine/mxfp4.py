"""gpt-oss loaded with its experts kept in MXFP4, as OpenAI released them (on CUDA; elsewhere they
are dequantized as they load: engine/model_loader.py).

Hugging Face's own loading would either need its `kernels` hub packages (not on a machine without a
network) or dequantize every expert to bf16 — ~230 GB for gpt-oss-120b, more than one GPU and than
most hosts' memory. So this reads the checkpoint itself:
  1. the model is built on the meta device (no memory), its quantization_config dropped;
  2. each safetensors tensor goes where its name says, on the device: the experts' `*_blocks`
     ([E, N, K/32, 16] → [E, N, K/2]) and `*_scales` ([E, N, K/32]) as plain attributes of their
     experts module, which engine/moe.py reads as Mxfp4 weights; every other tensor as the parameter
     it names, in the model's dtype;
  3. the experts' dequantized parameters are left empty, the rotary tables made again (buffers the
     checkpoint does not hold), and a parameter still on meta (one the checkpoint lacks) refused.
The runner then multiplies by the MXFP4 weights directly (engine/triton_mxfp4.py): ~61 GB of
experts for gpt-oss-120b, ~12 GB for gpt-oss-20b.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

QUANTIZED = ("_blocks", "_scales")


def load(path: Path, config: Any, dtype: torch.dtype, device: torch.device | str, attention: str) -> PreTrainedModel:
    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):  # 1.
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attention)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    for f in files:  # 2.
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for key in st.keys():
                _place(model, key, st.get_tensor(key), dtype, device)
    for layer in model.model.layers:  # 3.
        experts = layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            experts._parameters[name] = torch.nn.Parameter(torch.empty(0, dtype=dtype, device=device),
                                                           requires_grad=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg).to(device)
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def _place(model: torch.nn.Module, key: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> None:
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner)
    if name.endswith(QUANTIZED):  # an expert weight's MXFP4 codes or scales, kept as they are
        if name.endswith("_blocks"):
            t = t.reshape(*t.shape[:-2], -1)  # [E, N, K/32, 16] → [E, N, K/2]
        setattr(module, name, t.to(device).contiguous())
        return
    t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = t
    else:
        raise ValueError(f"the checkpoint's {key} names nothing in {type(model).__name__}")
