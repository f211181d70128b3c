"""A safetensors checkpoint read into a model built on the meta device, its quantized tensors kept as
they are released (engine/mxfp4.py: gpt-oss's MXFP4 experts; engine/fp8.py: FP8 linear layers) where
Hugging Face's loading would dequantize them or need kernels fetched from its hub:
  1. the model is built on the meta device (no memory), its quantization_config dropped;
  2. each tensor (but a layer's past the decoder's: multi-token prediction) goes where its name says
     — renamed as Hugging Face renames the family's keys when it loads (`renames`: Mixtral's
     block_sparse_moe is its mlp) —, on the device: a quantized one as the caller's `keep` places it,
     every other as the parameter or buffer it names, in the model's dtype;
  3. the caller's `after` runs (mxfp4: the experts' dequantized parameters left empty), tied weights
     are tied again and the rotary tables made again (buffers no checkpoint holds); a parameter or
     buffer still on meta (one the checkpoint lacks) is refused; the generation config is read.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

Keep = Callable[[torch.nn.Module, str, torch.Tensor], bool]  # (model, tensor's key, tensor on the device) → placed it


def load(path: Path, config: Any, dtype: torch.dtype, device: torch.device | str, attention: str, keep: Keep,
         after: Callable[[PreTrainedModel], None] | None = None) -> PreTrainedModel:
    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):  # 1.
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attention)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    rename = renames(cfg.model_type)
    for f in files:  # 2.
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for stored in st.keys():
                if _beyond(stored, cfg.num_hidden_layers):
                    continue
                t, key = st.get_tensor(stored).to(device), rename(stored)
                if not keep(model, key, t):
                    owner, _, name = key.rpartition(".")
                    _place(model.get_submodule(owner), name, t.to(dtype) if t.is_floating_point() else t, key)
    if after is not None:  # 3.
        after(model)
    model.tie_weights()
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and any(b.is_meta for b in module.buffers()):
            model.set_submodule(name, type(module)(cfg).to(device))
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _beyond(key: str, num_layers: int) -> bool:
    """A tensor of a layer past the decoder's: DeepSeek V3's and GLM-4.5's multi-token prediction layer,
    which Hugging Face's loading skips too (the model computes no such layer)."""
    m = LAYER.match(key)
    return m is not None and int(m.group(1)) >= num_layers


def renames(model_type: str) -> Callable[[str], str]:
    """A checkpoint key → the model's name for it: the renamings (regular expressions) of transformers'
    conversion mapping for this family, applied in order as its loading applies them. (Its other
    conversions — experts stored one by one, fused into one weight — are the callers' `keep`.)"""
    from transformers.conversion_mapping import WeightRenaming, get_checkpoint_conversion_mapping

    rules = [(re.compile(src), dst) for r in get_checkpoint_conversion_mapping(model_type) or []
             if isinstance(r, WeightRenaming) for src, dst in zip(r.source_patterns, r.target_patterns)]

    def rename(key: str) -> str:
        for pattern, replacement in rules:
            key = pattern.sub(replacement, key)
        return key

    return rename


def _place(module: torch.nn.Module, name: str, t: torch.Tensor, key: str) -> None:
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = t
    else:
        raise ValueError(f"the checkpoint's {key} names nothing in {type(module).__name__}")
