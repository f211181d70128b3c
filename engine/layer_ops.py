"""The small ops between a decoder layer's matmuls — residual add + RMSNorm, act(gate) * up — as
Hugging Face's modules run them (TorchOps: CPU, and any model the fused kernels do not fit) or as one
Triton kernel each (TritonOps, engine/triton_fused.py: CUDA). The model runner picks one per model."""
from __future__ import annotations

import torch
from transformers import PreTrainedModel


class TorchOps:
    """The small ops of a layer as Hugging Face runs them (CPU; and any model the fused ones do not fit)."""

    @staticmethod
    def norm(module: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(module(residual + x), residual + x); residual None: (module(x), x)."""
        if residual is not None:
            x = residual + x
        return module(x), x

    @staticmethod
    def act_mul(act: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate | up) → act(gate) * up [T, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return act(gate) * up


class TritonOps:
    """The same as one Triton kernel each (engine/triton_fused.py): residual add + RMSNorm, SiLU * up."""

    def __init__(self) -> None:
        from engine import triton_fused

        self.fused = triton_fused

    @staticmethod
    def fits(model: PreTrainedModel) -> bool:
        """RMSNorm layers (weight, variance_epsilon) and a SiLU MLP: what the kernels compute."""
        layer = model.model.layers[0]
        norms = [layer.input_layernorm, layer.post_attention_layernorm, model.model.norm,
                 *(n for n in (getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None))
                   if n is not None)]
        return (getattr(model.config, "hidden_act", None) in ("silu", "swish")
                and all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms))

    def norm(self, module: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fused.add_rms_norm(x, residual, module.weight, module.variance_epsilon)

    def act_mul(self, act: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
        return self.fused.silu_mul(gate_up)
