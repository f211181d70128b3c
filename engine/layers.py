"""A decoder layer's weights as the model runner computes with them: q|k|v and gate|up fused into
one matmul each (the Hugging Face modules left as views into the fused weights), and what other
families add as options (q/k norms, a sandwich of norms, per-layer rotary or none, experts, an MLP
without a gate, attention and MLP in parallel, DeepSeek's latent attention: engine/mla.py)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.linear import Linear, from_module
from engine.mla import Latent
from engine.moe import ActMul, Experts


@dataclass(frozen=True)
class Dense:
    """A gated MLP: down(act(gate) * up), gate|up as one matmul."""

    gate_up: Linear  # weight [2 * intermediate, hidden]
    down_proj: Linear
    act: torch.nn.Module

    def __call__(self, h: torch.Tensor, act_mul: ActMul, lora: Lora | None = None) -> torch.Tensor:
        """lora: adds the LoRA deltas of a projection's output (ModelRunner: engine/lora.py)."""
        if lora is None:
            return self.down_proj(act_mul(self.act, self.gate_up(h)))  # [T, hidden]
        a = act_mul(self.act, lora("gate_up", h, self.gate_up(h)))  # [T, I]
        return lora("down", a, self.down_proj(a))


Lora = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]  # (projection, its input, its output) → output


@dataclass(frozen=True)
class Plain:
    """An MLP without a gate: down(act(up)) (StarCoder 2, Arcee)."""

    up: Linear  # weight [intermediate, hidden]
    down_proj: Linear
    act: torch.nn.Module

    def __call__(self, h: torch.Tensor, act_mul: ActMul) -> torch.Tensor:
        return self.down_proj(self.act(self.up(h)))  # [T, hidden]


@dataclass(frozen=True)
class Layer:
    """One decoder layer's weights, with q|k|v and gate|up fused into single matmuls."""

    input_norm: torch.nn.Module
    post_norm: torch.nn.Module
    qkv: Linear | Latent  # weight [(H + 2*KVH) * D, hidden]; or DeepSeek's latent attention (engine/mla.py)
    o_proj: Linear
    mlp: Dense | Plain | Experts  # a dense MLP (gated or not), or a mixture of experts (engine/moe.py)
    scaling: float
    q_norm: torch.nn.Module | None = None  # Qwen 3: RMSNorm over each head's D of q and k, before rotary
    k_norm: torch.nn.Module | None = None
    pre_mlp_norm: torch.nn.Module | None = None  # Gemma's and GLM 4's sandwich: post_norm normalizes the
    post_mlp_norm: torch.nn.Module | None = None  # attention's output alone, these the MLP's input and output
    qk_norm_whole: bool = False  # OLMo 2: q_norm and k_norm over all heads of a token at once
    rope: str | None = None  # its rotary (rope_of): the model's, a layer type's (Gemma 3), or NOPE
    qk_norm_after_rope: bool = False  # Hunyuan: q_norm and k_norm per head of the rotated q and k

    @property
    def parallel(self) -> bool:
        """Cohere, StableLM's parallel residual: attention and MLP both of input_norm's output, added
        to the residual (no norm after the attention: sandwich())."""
        return self.post_norm is IDENTITY


def fuse(mods: list[torch.nn.Linear], backend: str) -> Linear:
    """One Linear of the weights (biases, FP8 scales) of `mods` concatenated; each module's weight left
    as a view into it. FP8 weights fuse with FP8 ones; beside a plain one (a checkpoint that left some
    projection unquantized) they are dequantized first."""
    fp8 = [hasattr(m, "weight_scale") for m in mods]  # kept in FP8 (engine/fp8.py): [N, ⌈K/128⌉] each
    if any(fp8) and not all(fp8):
        from engine.fp8 import dequantize_model

        plain = next(m.weight.dtype for m, q in zip(mods, fp8) if not q)
        for m in (m for m, q in zip(mods, fp8) if q):
            dequantize_model(m, plain)
    w = torch.cat([m.weight.data for m in mods], dim=0)
    has_bias = all(m.bias is not None for m in mods)
    b = torch.cat([m.bias.data for m in mods], dim=0) if has_bias else None
    fp8 = [hasattr(m, "weight_scale") for m in mods]
    off = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight.data = w[off : off + n]
        if b is not None:
            m.bias.data = b[off : off + n]
        off += n
    return Linear(w, b, backend, torch.cat([m.weight_scale for m in mods], dim=0) if all(fp8) else None)


def sandwich(layer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None, torch.nn.Module | None]:
    """A layer's norms after its attention: (of the attention's output, or of the MLP's input where
    there are no others; of the MLP's input; of the MLP's output). Gemma's and GLM 4's names differ;
    OLMo 2 normalizes only the sub-layers' outputs (no norm before the MLP: IDENTITY); Cohere's
    parallel layer has none after its attention (IDENTITY: Layer.parallel), nor has StableLM's with
    use_parallel_residual (its attribute is None). Apertus names its norm before the MLP
    feedforward_layernorm, VaultGemma pre_feedforward_layernorm. HyperCLOVA X's norms after each
    sub-layer (post_norm1, post_norm2; Identity without use_post_norm) make Gemma's sandwich."""
    if hasattr(layer, "feedforward_layernorm"):  # Apertus
        return layer.feedforward_layernorm, None, None
    if not hasattr(layer, "post_attention_layernorm") and hasattr(layer, "pre_feedforward_layernorm"):  # VaultGemma
        return layer.pre_feedforward_layernorm, None, None  # (Gemma 2's layer without its norms after each sub-layer)
    if hasattr(layer, "post_norm1") and not isinstance(layer.post_norm1, torch.nn.Identity):  # HyperCLOVA X
        return layer.post_norm1, layer.post_attention_layernorm, layer.post_norm2
    if getattr(layer, "post_attention_layernorm", None) is None:  # attention and MLP of the same input
        return IDENTITY, None, None
    if not hasattr(layer, "input_layernorm"):  # OLMo 2
        return layer.post_attention_layernorm, IDENTITY, layer.post_feedforward_layernorm
    if hasattr(layer, "post_self_attn_layernorm"):  # GLM 4
        return layer.post_self_attn_layernorm, layer.post_attention_layernorm, layer.post_mlp_layernorm
    return (layer.post_attention_layernorm, getattr(layer, "pre_feedforward_layernorm", None),
            getattr(layer, "post_feedforward_layernorm", None))


def dense(mlp: torch.nn.Module, backend: str) -> Dense | Plain:
    """A dense MLP's weights (gate|up fused, as stored by Phi 3 and GLM 4, or here; or no gate)."""
    if hasattr(mlp, "c_fc"):  # StarCoder 2
        return Plain(from_module(mlp.c_fc, backend), from_module(mlp.c_proj, backend), mlp.act)
    if not hasattr(mlp, "gate_proj") and not hasattr(mlp, "gate_up_proj"):  # Arcee
        return Plain(from_module(mlp.up_proj, backend), from_module(mlp.down_proj, backend), mlp.act_fn)
    if isinstance(getattr(mlp, "gate_up_proj", None), torch.nn.Linear):  # Phi 3: fused in the checkpoint
        return Dense(from_module(mlp.gate_up_proj, backend), from_module(mlp.down_proj, backend), mlp.activation_fn)
    return Dense(fuse([mlp.gate_proj, mlp.up_proj], backend), from_module(mlp.down_proj, backend),
                 mlp.act_fn)  # (biases too: Llama's mlp_bias)


NOPE = "nope"  # a layer without rotary (SmolLM3's every fourth)
IDENTITY = torch.nn.Identity()  # no norm where the family has none (OLMo 2 before each sub-layer)


def rope_of(cfg: Any, li: int, rotary_emb: torch.nn.Module) -> str | None:
    """Layer li's rotary: None (the model's one), a layer type (Gemma 3: one per type), or NOPE."""
    nope = getattr(cfg, "no_rope_layers", None)  # SmolLM3: 0 = no rotary in that layer
    if nope is not None and not nope[li]:
        return NOPE
    if cfg.model_type in ("exaone4", "exaone_moe", "cohere2") and cfg.sliding_window \
            and cfg.layer_types[li] != "sliding_attention":
        return NOPE  # EXAONE 4, K-EXAONE, Command R7B: their global layers have no rotary where they have local ones
    return cfg.layer_types[li] if hasattr(rotary_emb, "layer_types") else None


def layer(hf: torch.nn.Module, backend: str, moe_triton: bool, rope: str | None, dtype: torch.dtype) -> Layer:
    """A Hugging Face decoder layer's weights (`backend`: engine/linear.py's); moe_triton: its experts
    (if any) by the Triton grouped matmul; rope: its rotary (rope_of); dtype: the model's."""
    a, mlp = hf.self_attn, getattr(hf, "mlp", None) or hf.block_sparse_moe  # (Granite MoE's name)
    mla = hasattr(a, "kv_a_proj_with_mqa")  # DeepSeek's latent attention
    qkv = (Latent.of(a, dtype) if mla else from_module(a.qkv_proj, backend) if hasattr(a, "qkv_proj")  # Phi 3: fused in the checkpoint
           else fuse([a.q_proj, a.k_proj, a.v_proj], backend))
    post, pre_mlp, post_mlp = sandwich(hf)
    after_rope = hasattr(a, "query_layernorm")  # Hunyuan's names, and its norms after the rotary
    q_norm = getattr(a, "query_layernorm" if after_rope else "q_norm", None)
    pre = getattr(hf, "input_layernorm", None) or getattr(hf, "attention_layernorm", IDENTITY)  # (Apertus's name)
    return Layer(pre, post, qkv, from_module(a.o_proj, backend),
                 Experts.of(mlp, lambda m: dense(m, backend), moe_triton) or dense(mlp, backend), a.scaling,
                 q_norm, getattr(a, "key_layernorm" if after_rope else "k_norm", None), pre_mlp, post_mlp,
                 q_norm is not None and q_norm.weight.numel() != a.head_dim, rope,  # q/k norms: OLMo 2's whole
                 after_rope)
