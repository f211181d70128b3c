"""LoRA adapters served beside their base model (`model.lora_adapters`: name → a PEFT folder): each
request may run with one of them, rows of different adapters (and of none) in the same forward.

A LoRA adapter adds, to a linear layer W of the base, scale · B·A (A [r, in], B [out, r]; scale
lora_alpha / r, or / √r with rslora): y = x·Wᵀ + scale · (x·Aᵀ)·Bᵀ. Here:
  1. load: a PEFT folder's adapter_config.json and adapter_model.safetensors; the targets the runner
     computes (q/k/v/o_proj, gate/up/down_proj of a dense decoder layer) are kept per layer, B scaled
     once; anything else (embeddings, the LM head, experts, DoRA, trained biases, modules_to_save)
     is refused naming the adapter;
  2. apply: after each fused projection (q|k|v, o, gate|up, down) the rows of each adapter in the
     batch get their delta added — the adapter's rows gathered, two small matmuls, added back
     (index_add) — one target's delta in its slice of the fused output, zero where the adapter does
     not train that target. A forward whose rows use no adapter does none of it; one that does runs
     eagerly (not through the decode CUDA graphs, whose rows' adapters are not fixed).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

TARGETS = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
           "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}
# a target module → (the runner's fused projection, its part in that projection's output)


class LoraError(ValueError):
    pass


@dataclass
class Adapter:
    """One adapter's weights: (layer, projection) → per part of the projection's output, (A [r, in],
    scale · B [out, r]) or None where it does not train that part."""

    name: str
    rank: int
    weights: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor] | None]] = field(default_factory=dict)


def load(name: str, folder: str | Path, num_layers: int, dtype: torch.dtype, device: torch.device) -> Adapter:
    """1. A PEFT LoRA folder → its Adapter; LoraError naming `name` where it trains what the runner
    does not compute."""
    from safetensors.torch import load_file

    path = Path(folder).expanduser()
    where = f"model.lora_adapters.{name}"
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoraError(f"{where}: {path} has no readable adapter_config.json ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("bias", "none") != "none" \
            or cfg.get("modules_to_save") or cfg.get("alpha_pattern"):
        raise LoraError(f"{where}: only plain LoRA adapters are served (no DoRA, trained biases, "
                        "modules_to_save or alpha_pattern)")
    files = [path / "adapter_model.safetensors"]
    if not files[0].exists():
        raise LoraError(f"{where}: {path} has no adapter_model.safetensors")
    tensors = load_file(str(files[0]))
    alpha, rslora = float(cfg.get("lora_alpha", cfg.get("r", 8))), bool(cfg.get("use_rslora"))
    adapter = Adapter(name, 0)
    for key, a in tensors.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise LoraError(f"{where}: {key} is not a LoRA weight this server applies")
            continue
        module = key.split(".lora_A.")[0]
        parts = module.split(".")
        target = parts[-1]
        if target not in TARGETS or "layers" not in parts or "experts" in parts:
            raise LoraError(f"{where}: trains {module}; only {', '.join(TARGETS)} of dense decoder layers are served")
        layer = int(parts[parts.index("layers") + 1])
        if layer >= num_layers:
            raise LoraError(f"{where}: trains layer {layer}; the model has {num_layers}")
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None or b.shape[1] != a.shape[0]:
            raise LoraError(f"{where}: {module} has no lora_B of rank {a.shape[0]}")
        r = a.shape[0]
        scale = alpha / (math.sqrt(r) if rslora else r)
        proj, part = TARGETS[target]
        slots = adapter.weights.setdefault((layer, proj), [None] * (3 if proj == "qkv" else 2 if proj == "gate_up" else 1))
        slots[part] = (a.to(device, dtype).contiguous(), (b.float() * scale).to(device, dtype).contiguous())
        adapter.rank = max(adapter.rank, r)
    if not adapter.weights:
        raise LoraError(f"{where}: {path} holds no LoRA weights")
    return adapter


def add_deltas(out: torch.Tensor, x: torch.Tensor, rows: dict[str, torch.Tensor], adapters: dict[str, Adapter],
               layer: int, proj: str, sizes: list[int]) -> torch.Tensor:
    """2. out [T, sum(sizes)] (a fused projection of x [T, in]) plus, for each adapter's rows [n],
    its delta in each part's slice; `sizes`: the parts' widths (q, k, v; gate, up; or one)."""
    for name, idx in rows.items():
        slots = adapters[name].weights.get((layer, proj))
        if slots is None:
            continue
        xs = x.index_select(0, idx)  # [n, in]
        parts = [torch.zeros(idx.shape[0], n, dtype=out.dtype, device=out.device) if w is None
                 else (xs @ w[0].T) @ w[1].T for w, n in zip(slots, sizes)]  # [n, size] each
        out = out.index_add(0, idx, parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))
    return out
