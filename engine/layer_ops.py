"""The small ops between a decoder layer's matmuls — residual add + RMSNorm, act(gate) * up — as
Hugging Face's modules run them (TorchOps: CPU, and any model the fused kernels do not fit) or as one
Triton kernel each (TritonOps, engine/triton_fused.py: CUDA; Llama's, Gemma's and OLMo 2's norms,
SiLU and GELU-tanh). The model runner picks one per model."""
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


GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")  # Gemma's activation


def _norm_kind(module: torch.nn.Module) -> str | None:
    """"llama" (weight × the norm rounded to the dtype: Llama, Qwen, Mistral, Phi 3, GLM 4), "gemma"
    ((1 + weight) × the norm, rounded once), "olmo" (weight × the norm, rounded once: OLMo 2, gpt-oss),
    "none" (no norm where the family has none: OLMo 2 before its sub-layers), or None: not an RMSNorm
    the kernel computes."""
    name = type(module).__name__
    if isinstance(module, torch.nn.Identity):
        return "none"
    if not name.endswith("RMSNorm"):
        return None
    if hasattr(module, "variance_epsilon"):
        return "olmo" if name.startswith(("Olmo2", "GptOss")) else "llama"
    return "gemma" if name.startswith("Gemma") and hasattr(module, "eps") else None


class TritonOps:
    """The same as one Triton kernel each (engine/triton_fused.py): residual add + RMSNorm (Llama's,
    Gemma's or OLMo 2's rounding), SiLU or GELU-tanh * up."""

    def __init__(self, gelu: bool = False) -> None:
        from engine import triton_fused

        self.fused, self.gelu = triton_fused, gelu
        self._kinds: dict[int, str] = {}  # id(norm module) → its _norm_kind, found at its first call

    @classmethod
    def of(cls, model: PreTrainedModel) -> TritonOps | None:
        """The fused ops for `model`, where its norms and activation are what the kernels compute."""
        layer, cfg = model.model.layers[0], model.config
        optional = (getattr(layer, "post_attention_layernorm", None), getattr(layer, "pre_feedforward_layernorm", None),
                    getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None))
        norms = [getattr(layer, "input_layernorm", torch.nn.Identity()), model.model.norm,
                 *(n for n in optional if n is not None)]
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)  # Gemma's: the first
        if act not in ("silu", "swish", *GELU_TANH) or not all(_norm_kind(n) for n in norms):
            return None
        return cls(gelu=act in GELU_TANH)

    def norm(self, module: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        kind = self._kinds.get(id(module))
        if kind is None:  # once per module, not per call: the eager steps' host time
            kind = self._kinds[id(module)] = _norm_kind(module) or "llama"
        if kind == "none":  # the residual add alone
            s = x if residual is None else residual + x
            return s, s
        eps = module.eps if kind == "gemma" else module.variance_epsilon
        return self.fused.add_rms_norm(x, residual, module.weight, eps, kind)

    def act_mul(self, act: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
        return self.fused.act_mul(gate_up, self.gelu)
