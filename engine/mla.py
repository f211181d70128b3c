"""DeepSeek's multi-head latent attention (V2, V3, Kimi K2, Moonlight), absorbed: the cache holds each
token's latent, not a key and a value per head.

Hugging Face's module computes, per token, a latent c = norm(kv_a(h)[:r]) of r dims (kv_lora_rank,
512) and one rotary key k_pe of R dims (qk_rope_head_dim, 64) that all heads share, then expands c
per head: k_nope = W_UK·c [H, nope], v = W_UV·c [H, vd]. Since q_nope·(W_UK c) = (W_UKᵀ q_nope)·c
and Σ p·(W_UV c) = W_UV (Σ p·c), attention can run on the latent itself:
  1. q = [q_lat | q_pe] [T, H, r + R], q_lat = W_UKᵀ q_nope (`Latent.project`), and the token's
     key kvec = [c | k_pe] [T, r + R]: one "KV head" that every query head attends to;
  2. rotary on q_pe and k_pe; kvec stored at the token's slot (`halves`: see below);
  3. attention with keys kvec and values c (a key's first r dims) → o_lat [T, H, r]
     (the backends' `attend_latent`: the Triton kernels of engine/triton_mla.py on CUDA,
     `attend_torch` — gather + SDPA — elsewhere);
  4. o = W_UV o_lat [T, H, vd] → o_proj (`Latent.output`).
So a token and layer take r + R values of cache (576 in V2/V3), where the expanded form took 2·H·192
(V2-Lite: 6,144; V3: 49,152). The scores are the same sums computed in another order (vLLM and
SGLang decode this way): equal to Hugging Face's in fp32, to rounding in bf16.

Cache layout. The runner's cache keeps its shape [L, 2, num_blocks, block_size, kv_heads, head_dim]
with kv_heads 1 and head_dim (r + R) / 2 (`kv_dims`), so the hand-off, the shared cache and the
budget move and count latents as any cache: the "k" half of a slot holds [c[:r/2] | k_pe[:R/2]],
the "v" half [c[r/2:] | k_pe[R/2:]] — each piece a power of two in DeepSeek's shapes (256 and 32),
which the kernels load as whole tiles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from engine.attention import BatchMeta, TorchAttention


def is_latent(config: Any) -> bool:
    """Whether a model config has DeepSeek's latent attention."""
    return bool(getattr(config, "kv_lora_rank", None))


def cache_dims(config: Any) -> tuple[int, int]:
    """(kv_heads, head_dim) of a latent model's cache: one head of half a latent key each for k and v."""
    r, R = config.kv_lora_rank, config.qk_rope_head_dim
    if r % 2 or R % 2:
        raise ValueError(f"latent attention of kv_lora_rank {r} and qk_rope_head_dim {R}: both must be even")
    return 1, (r + R) // 2


def halves(kvec: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent keys [..., r + R] ([c | k_pe]) → the slot's two halves [..., (r + R) / 2] each."""
    R = kvec.shape[-1] - r
    return (torch.cat([kvec[..., : r // 2], kvec[..., r : r + R // 2]], dim=-1),
            torch.cat([kvec[..., r // 2 : r], kvec[..., r + R // 2 :]], dim=-1))


def whole(k_half: torch.Tensor, v_half: torch.Tensor, r: int) -> torch.Tensor:
    """The inverse of `halves`: [..., (r + R) / 2] twice → [..., r + R]."""
    return torch.cat([k_half[..., : r // 2], v_half[..., : r // 2], k_half[..., r // 2 :], v_half[..., r // 2 :]], dim=-1)


def _weight(linear: torch.nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight [N, K] in dtype (an FP8 one dequantized: engine/fp8.py)."""
    if hasattr(linear, "weight_scale"):
        from engine.triton_fp8 import dequantize

        return dequantize(linear.weight.data, linear.weight_scale, dtype)
    return linear.weight.data.to(dtype)


@dataclass(frozen=True)
class Latent:
    """A DeepSeek attention module's projections, with kv_b_proj split per head into the two matrices
    that absorb it: W_UK into the query, W_UV into the output."""

    attn: torch.nn.Module  # Hugging Face's attention module: its projections and latent norms
    w_uk: torch.Tensor  # [H, nope, r], a view into kv_b_proj's weight
    w_uv: torch.Tensor  # [H, vd, r], the same

    @classmethod
    def of(cls, attn: torch.nn.Module, dtype: torch.dtype) -> Latent:
        H, nope, vd, r = attn.num_heads, attn.qk_nope_head_dim, attn.v_head_dim, attn.kv_lora_rank
        w = _weight(attn.kv_b_proj, dtype).view(H, nope + vd, r)  # kv_b_proj's rows: per head, k_nope then v
        return cls(attn, w[:, :nope], w[:, nope:])  # views (bmm takes their strides as they are): no second copy

    @property
    def rank(self) -> int:
        return int(self.w_uk.shape[-1])

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, hidden] → (q [T, H, r + R] = [q_lat | q_pe], kvec [T, r + R] = [c | k_pe]), not yet rotated."""
        a, T = self.attn, h.shape[0]
        H, nope, R = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim
        q = a.q_proj(h) if a.q_lora_rank is None else a.q_b_proj(a.q_a_layernorm(a.q_a_proj(h)))
        q_nope, q_pe = q.view(T, H, nope + R).split([nope, R], dim=-1)  # [T, H, nope], [T, H, R]
        latent, k_pe = a.kv_a_proj_with_mqa(h).split([self.rank, R], dim=-1)  # [T, r], [T, R]
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [H, T, nope] @ [H, nope, r] → [T, H, r]
        return torch.cat([q_lat, q_pe], dim=-1), torch.cat([a.kv_a_layernorm(latent), k_pe], dim=-1)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o_lat [T, H, r] → each head's value through W_UV, [T, H * vd] (o_proj's input)."""
        T, H, _ = o.shape
        return torch.bmm(o.transpose(0, 1), self.w_uv.transpose(1, 2)).transpose(0, 1).reshape(T, -1)


def attend_torch(attn: TorchAttention, li: int, q: torch.Tensor, kvec: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, meta: BatchMeta, scale: float) -> torch.Tensor:
    """Steps 2 and 3 with torch ops (CPU; CUDA without Triton): q [T, H, r + R], kvec [T, r + R], cos and
    sin [T, R] → o_lat [T, H, r]. Every sequence reads its keys back from the cache."""
    from engine.attention import _rotary

    T, H, width = q.shape
    R = cos.shape[-1]
    r = width - R
    q_pe, k_pe = _rotary(q[None, :, :, r:].transpose(1, 2), kvec[None, None, :, r:], cos[None], sin[None],
                         attn.interleaved)  # [1, H, T, R], [1, 1, T, R]
    q = torch.cat([q[..., :r], q_pe[0].transpose(0, 1)], dim=-1)  # [T, H, r + R]
    k_half, v_half = halves(torch.cat([kvec[:, :r], k_pe[0, 0]], dim=-1), r)  # [T, (r + R) / 2] each
    attn.kv_slots[li, 0].index_copy_(0, meta.slots, k_half[:, None])
    attn.kv_slots[li, 1].index_copy_(0, meta.slots, v_half[:, None])
    nd, outs = meta.num_decode, []
    if nd:  # decode rows: every row's blocks gathered, the padding masked
        assert meta.dec_tables is not None
        flat = meta.dec_tables.reshape(-1)
        keys = whole(*(attn.kv[li, i].index_select(0, flat).view(nd, -1, width // 2) for i in (0, 1)), r)  # [nd, S, r+R]
        o = F.scaled_dot_product_attention(q[:nd, :, None], keys[:, None], keys[:, None, :, :r],
                                           attn_mask=meta.extra["mask"], scale=scale, enable_gqa=True)
        outs.append(o[:, :, 0])  # [nd, H, r]
    off = nd
    for s in meta.prefill:  # prompts and chunks: each over its positions so far, causal
        keys = whole(*(attn.kv_slots[li, i, :, 0].index_select(0, attn._slots(s, s.context_len)) for i in (0, 1)), r)
        qpos = torch.arange(s.start_pos, s.context_len, device=q.device)[:, None]
        mask = torch.arange(s.context_len, device=q.device)[None, :] <= qpos  # [n, ctx]
        o = F.scaled_dot_product_attention(q[None, off : off + s.num_new].transpose(1, 2), keys[None, None],
                                           keys[None, None, :, :r], attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))  # [n, H, r]
        off += s.num_new
    return outs[0] if len(outs) == 1 else torch.cat(outs)
