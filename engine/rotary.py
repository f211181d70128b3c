"""The rotary tables of a forward: cos and sin [T, R] at its tokens' positions, from the model's own
rotary module (Hugging Face's frequencies and scalings: yarn, LongRoPE, per layer type), in the
layout the attention backends read — R entries a row, the first and second half of each rotated pair
(i, i + R/2) or, for interleaved rotaries, cos[2i] = cos[2i + 1]. Families whose module gives another
layout are converted here (model_shape.py's *_TABLES)."""
from __future__ import annotations

import torch

from engine import layers
from engine.model_shape import COMPLEX_TABLES, HALF_TABLES, HOST_READ_TABLES, INTERLEAVED_TABLES


class Rotary:
    def __init__(self, model: torch.nn.Module) -> None:
        model_type = model.config.model_type
        self.module = model.model.rotary_emb
        kind = getattr(self.module, "rope_type", None)
        dynamic = isinstance(kind, str) and "dynamic" in kind  # Hugging Face's dynamic NTK: read on the host too
        self.layout = ("interleaved" if model_type in INTERLEAVED_TABLES else "half" if model_type in HALF_TABLES
                       else "complex" if model_type in COMPLEX_TABLES
                       else "here" if model_type in HOST_READ_TABLES or dynamic else "")
        self._inv_freq: torch.Tensor | None = None  # "here": the module's frequencies, on the device

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, rope: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, R] for positions pos [1, T] (x: the embeddings, for their dtype) of the layers
        whose `rope` it is: the model's (Gemma 3: per layer type); layers.NOPE: cos 1, sin 0 — the
        rotary kernels then leave q and k exactly as they are."""
        if self.layout == "here":
            return self._made_here(x, pos)
        if self.layout == "complex":  # DeepSeek V2's: cos + i·sin [1, T, R/2], one per rotated pair
            f = self.module(x, pos)[0]
            return torch.cat([f.real] * 2, dim=-1).to(x.dtype), torch.cat([f.imag] * 2, dim=-1).to(x.dtype)
        cos, sin = (r[0] for r in self.module(x, pos, *(rope,) if rope and rope != layers.NOPE else ()))
        if self.layout == "interleaved":  # Cohere's: to the layout the interleaved kernels read
            cos, sin = (torch.cat([t[:, ::2]] * 2, dim=-1) for t in (cos, sin))
        elif self.layout == "half":  # gpt-oss's: [T, R/2], one entry per rotated pair (i, i + R/2)
            cos, sin = (torch.cat([t, t], dim=-1) for t in (cos, sin))
        return (torch.ones_like(cos), torch.zeros_like(sin)) if rope == layers.NOPE else (cos, sin)

    def _made_here(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables as the module makes them, without its host read of max(position) + 1 (which a
        CUDA graph's capture cannot do): against the original length it picks Phi-3.5-MoE's LongRoPE
        scale (long or short), and dynamic NTK's frequencies (stretched past it). A max_model_len past
        that length is refused at load (model_shape.max_positions), so the short scale and the
        original frequencies, always. Those are copied to the device on the first call (before any
        graph capture)."""
        module = self.module
        if self._inv_freq is None or self._inv_freq.device != x.device:
            self._inv_freq = module.original_inv_freq.to(x.device)  # [R/2]
        rope = module.config.rope_parameters
        mscale = rope["short_mscale"] if "short_mscale" in rope else module.attention_scaling
        freqs = pos[..., None].float() * self._inv_freq  # [1, T, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [1, T, R]
        return (emb.cos() * mscale).to(x.dtype)[0], (emb.sin() * mscale).to(x.dtype)[0]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, n, D] rotated by tables cos, sin [T, R] (rotated pairs (i, i + R/2); R < D: the first R
    dims of each head) as Hugging Face's apply_rotary_pos_emb computes it, rounded in x's dtype: each
    product, then their sum. For the families that normalize q and k after the rotary (Hunyuan)."""
    R = cos.shape[-1]
    c, s, xr = cos[:, None, :], sin[:, None, :], x[..., :R]  # [T, 1, R], [T, 1, R], [T, n, R]
    half = torch.cat((-xr[..., R // 2:], xr[..., : R // 2]), dim=-1)  # rotate_half
    out = xr * c + half * s
    return out if R == x.shape[-1] else torch.cat((out, x[..., R:]), dim=-1)
