"""The FP8 checkpoint formats engine/fp8.py reads, and each one's weight scales as the kernels hold
them: one fp32 scale per GROUP_K (128) weights of a row, [N, ⌈K/128⌉] (engine/triton_fp8.py).

- `fp8` (DeepSeek's, Qwen 3's *-FP8): `weight_scale_inv` [⌈N/bn⌉, ⌈K/bk⌉] per block of
  weight_block_size [bn, bk] (a multiplier, despite its name);
- `compressed-tensors` (llm-compressor's: RedHatAI's and Neural Magic's *-FP8, *-FP8-dynamic): each
  config group's weights 8-bit float, symmetric, `weight_scale` per tensor ([1]), per channel
  ([N, 1]) or per block ([⌈N/bn⌉, ⌈K/bk⌉], block_structure [bn, bk]);
- `fbgemm_fp8` (Meta's Llama 3.1 *-FP8): per channel, `weight_scale` [N, 1].
Weight-only: activations stay in the model's dtype, so a static activation scale (`input_scale`,
`input_scale_ub`) is not needed, nor are a checkpoint's KV-cache scales (`k_scale`, `v_scale`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.triton_fp8 import GROUP_K

# tensors of a module the weight-only path drops (zero points: zeros, the scales being symmetric)
UNUSED = ("input_scale", "input_scale_ub", "input_zero_point", "weight_zero_point", "k_scale", "v_scale")


@dataclass(frozen=True)
class Scheme:
    method: str  # the config's quant_method
    scale_name: str  # a weight's scales in the checkpoint: <module>.<scale_name>
    strategy: str  # "block" | "channel" | "tensor"
    block: tuple[int, int] = (0, 0)  # (bn, bk) of "block"


def scheme(config: Any) -> Scheme | None:
    """The checkpoint's FP8 scheme; None where it is not an FP8 format read here; ValueError naming the
    field where it is one of these formats but a variant this does not read."""
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return None
    q = quant if isinstance(quant, dict) else quant.to_dict()
    method = q.get("quant_method")
    if method == "fp8":
        bn, bk = q.get("weight_block_size") or (0, 0)
        return Scheme(method, "weight_scale_inv", "block", (int(bn), int(bk))) if bk % GROUP_K == 0 and bn else None
    if method == "fbgemm_fp8":
        return Scheme(method, "weight_scale", "channel")
    if method != "compressed-tensors":
        return None
    groups = [g.get("weights") or {} for g in (q.get("config_groups") or {}).values()]
    if not groups:
        raise ValueError("quantization_config.config_groups: none")
    first = groups[0]
    for i, w in enumerate(groups):
        where = f"quantization_config.config_groups[{i}].weights"
        if w.get("num_bits") != 8 or w.get("type") != "float":
            raise ValueError(f"{where}: {w.get('num_bits')}-bit {w.get('type')} weights are not read (FP8 only: "
                             "8-bit float)")
        if not w.get("symmetric", True) or w.get("strategy") not in ("tensor", "channel", "block"):
            raise ValueError(f"{where}: strategy {w.get('strategy')!r}, symmetric {w.get('symmetric')}: only "
                             "symmetric tensor, channel or block scales are read")
        if (w.get("strategy"), w.get("block_structure")) != (first.get("strategy"), first.get("block_structure")):
            raise ValueError(f"{where}: config groups of different strategies are not read")
    block = tuple(first.get("block_structure") or (0, 0))
    if first["strategy"] == "block" and block[1] % GROUP_K:
        raise ValueError(f"quantization_config: block_structure {list(block)}: blocks along K of a multiple of "
                         f"{GROUP_K} only")
    return Scheme(method, "weight_scale", first["strategy"], (int(block[0]), int(block[1])))


def row_scales(s: torch.Tensor, rows: int, cols: int, sc: Scheme) -> torch.Tensor:
    """A weight [rows, cols]'s scales as the checkpoint holds them → [rows, ⌈cols/128⌉] fp32."""
    groups = -(-cols // GROUP_K)
    bn, bk = sc.block
    want = {"tensor": (1,), "channel": (rows, 1), "block": (-(-rows // max(bn, 1)), -(-cols // max(bk, 1)))}[sc.strategy]
    if s.numel() != torch.Size(want).numel():
        raise ValueError(f"{sc.scale_name} of {tuple(s.shape)} for a weight [{rows}, {cols}] with {sc.strategy} "
                         f"scales: {list(want)} expected")
    s = s.float()
    if sc.strategy == "tensor":
        return s.reshape(-1)[:1].expand(rows, groups).contiguous()
    if sc.strategy == "channel":
        return s.reshape(rows, 1).expand(rows, groups).contiguous()
    return s.reshape(want).repeat_interleave(bn, dim=0)[:rows].repeat_interleave(bk // GROUP_K, dim=1)[:, :groups].contiguous()
