"""DeepSeek's multi-head latent attention (V2, V3, Kimi K2, Moonlight): the cache holds each token's
latent, not a key and a value per head; decode attends over the latents themselves (absorbed),
prompts over keys and values expanded from them (as vLLM and SGLang split it).

Hugging Face's module computes, per token, a latent c = norm(kv_a(h)[:r]) of r dims (kv_lora_rank,
512) and one rotary key k_pe of R dims (qk_rope_head_dim, 64) that all heads share, then expands c
per head: k_nope = W_UK·c [H, nope], v = W_UV·c [H, vd]. Since q_nope·(W_UK c) = (W_UKᵀ q_nope)·c
and Σ p·(W_UV c) = W_UV (Σ p·c), attention can run on the latent itself:
  1. q = [q_nope | q_pe] [T, H, nope + R] and the token's latent key kvec = [c | k_pe] [T, r + R]
     (`Latent.project`);
  2. rotary on q_pe and k_pe; kvec stored at the token's slot (`halves`: see below);
  3. decode rows: q_lat = W_UKᵀ q_nope (`Latent.absorbed`), attention with keys kvec and values c —
     one "KV head" that every query head reads — → o_lat [B, H, r], then o = W_UV o_lat
     (`Latent.output`): per key and head 576 + 512 multiply-adds over a cache of r + R values;
  4. prompt rows: each sequence's latents read back from the cache and expanded (`Latent.expand`)
     to keys [k_nope | k_pe] and values per head, then causal attention as any model's: per key and
     head 192 + 128 multiply-adds (plus the expansion, once per position and chunk), 3.4× fewer
     than step 3's: V2-Lite's whole 32k-token prompt ~2.2× cheaper than absorbed (by arithmetic);
  5. o [T, H * vd] → o_proj.
The backends' `attend_latent` runs steps 2-4: the Triton kernels of engine/triton_mla.py (decode) and
engine/triton_attention.py's prefill kernel over the expanded keys on CUDA, torch ops elsewhere
(`attend_torch`). A token and layer take r + R values of cache (576 in V2/V3) where the expanded
form took 2·H·192 (V2-Lite: 6,144; V3: 49,152). Equal to Hugging Face's in fp32, to rounding in bf16.

Cache layout. The runner's cache keeps its shape [L, 2, num_blocks, block_size, kv_heads, head_dim]
with kv_heads 1 and head_dim (r + R) / 2 (`cache_dims`), so the hand-off, the shared cache and the
budget move and count latents as any cache: the "k" half of a slot holds [c[:r/2] | k_pe[:R/2]],
the "v" half [c[r/2:] | k_pe[R/2:]] — each piece a power of two in DeepSeek's shapes (256 and 32),
which the decode kernel loads as whole tiles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from engine.attention import BatchMeta, TorchAttention
    from engine.model_runner import SeqInput


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
    """A DeepSeek attention module's projections, with kv_b_proj per head: W_UK and W_UV."""

    attn: torch.nn.Module  # Hugging Face's attention module: its projections and latent norms
    w_kv: torch.Tensor  # [H, nope + vd, r]: kv_b_proj's weight, per head W_UK then W_UV (FP8: dequantized)

    @classmethod
    def of(cls, attn: torch.nn.Module, dtype: torch.dtype) -> Latent:
        H, nope, vd, r = attn.num_heads, attn.qk_nope_head_dim, attn.v_head_dim, attn.kv_lora_rank
        return cls(attn, _weight(attn.kv_b_proj, dtype).view(H, nope + vd, r))

    @property
    def rank(self) -> int:
        return int(self.w_kv.shape[-1])

    @property
    def nope(self) -> int:
        return int(self.attn.qk_nope_head_dim)

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, hidden] → (q [T, H, nope + R] = [q_nope | q_pe], kvec [T, r + R] = [c | k_pe]), not yet rotated."""
        a, T = self.attn, h.shape[0]
        q = a.q_proj(h) if a.q_lora_rank is None else a.q_b_proj(a.q_a_layernorm(a.q_a_proj(h)))
        latent, k_pe = a.kv_a_proj_with_mqa(h).split([self.rank, a.qk_rope_head_dim], dim=-1)  # [T, r], [T, R]
        return q.view(T, a.num_heads, -1), torch.cat([a.kv_a_layernorm(latent), k_pe], dim=-1)

    def absorbed(self, q: torch.Tensor) -> torch.Tensor:
        """Rotated q [B, H, nope + R] → [q_lat | q_pe] [B, H, r + R], q_lat = W_UKᵀ q_nope."""
        w_uk = self.w_kv[:, : self.nope]  # [H, nope, r] (a view: bmm takes its strides as they are)
        q_lat = torch.bmm(q[..., : self.nope].transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, r]
        return torch.cat([q_lat, q[..., self.nope :]], dim=-1)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o_lat [B, H, r] → each head's value through W_UV, [B, H * vd] (o_proj's input)."""
        w_uv = self.w_kv[:, self.nope :]  # [H, vd, r]
        return torch.bmm(o.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1).reshape(o.shape[0], -1)

    def expand(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent keys [S, r + R] (rotated, as cached) → (keys [S, H, nope + R] = [k_nope | k_pe], values
        [S, H, vd]): Hugging Face's kv_b_proj of the latents."""
        S, r = keys.shape[0], self.rank
        kv = torch.nn.functional.linear(keys[:, :r], self.w_kv.reshape(-1, r)).view(S, self.w_kv.shape[0], -1)
        k_pe = keys[:, None, r:].expand(S, kv.shape[1], keys.shape[1] - r)
        return torch.cat([kv[..., : self.nope], k_pe], dim=-1), kv[..., self.nope :]


def attend_torch(attn: TorchAttention, li: int, latent: Latent, q: torch.Tensor, kvec: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, meta: BatchMeta, scale: float) -> torch.Tensor:
    """Steps 2-4 with torch ops (CPU; CUDA without Triton): q [T, H, nope + R], kvec [T, r + R], cos and
    sin [T, R] → o [T, H * vd]. Every sequence reads its keys back from the cache."""
    from engine.attention import _gathered, _rotary

    T, H, _ = q.shape
    R, r, nope = cos.shape[-1], latent.rank, latent.nope
    q_pe, k_pe = _rotary(q[None, :, :, nope:].transpose(1, 2), kvec[None, None, :, r:], cos[None], sin[None],
                         attn.interleaved)  # [1, H, T, R], [1, 1, T, R]
    q = torch.cat([q[..., :nope], q_pe[0].transpose(0, 1)], dim=-1)  # [T, H, nope + R]
    k_half, v_half = halves(torch.cat([kvec[:, :r], k_pe[0, 0]], dim=-1), r)  # [T, (r + R) / 2] each
    attn.kv_slots[li, 0].index_copy_(0, meta.slots, k_half[:, None])
    attn.kv_slots[li, 1].index_copy_(0, meta.slots, v_half[:, None])
    nd, outs = meta.num_decode, []
    if nd:  # decode rows, absorbed: every row's blocks gathered, the padding masked
        assert meta.dec_tables is not None
        flat = meta.dec_tables.reshape(-1)
        keys = whole(*(attn.kv[li, i].index_select(0, flat).view(nd, -1, (r + R) // 2) for i in (0, 1)), r)  # [nd, S, r+R]
        o = F.scaled_dot_product_attention(latent.absorbed(q[:nd])[:, :, None], keys[:, None], keys[:, None, :, :r],
                                           attn_mask=meta.extra["mask"], scale=scale, enable_gqa=True)
        outs.append(latent.output(o[:, :, 0]))  # [nd, H * vd]
    off = nd
    for s in meta.prefill:  # prompts and chunks, expanded: each over its positions so far, causal
        latents = whole(*(_gathered(attn.kv[li, i], attn._slots(s, s.context_len), q.dtype) for i in (0, 1)), r)
        keys, values = latent.expand(latents)  # [ctx, H, nope + R], [ctx, H, vd]
        qpos = torch.arange(s.start_pos, s.context_len, device=q.device)[:, None]
        mask = torch.arange(s.context_len, device=q.device)[None, :] <= qpos  # [n, ctx]
        o = F.scaled_dot_product_attention(q[None, off : off + s.num_new].transpose(1, 2), keys.transpose(0, 1)[None],
                                           values.transpose(0, 1)[None], attn_mask=mask, scale=scale)  # [1, H, n, vd]
        outs.append(o[0].transpose(0, 1).reshape(s.num_new, -1))  # [n, H * vd]
        off += s.num_new
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def scratch(seqs: list[SeqInput], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt rows' latents laid out as a paged cache of their own (host tensors, built once a
    forward): (the cache slot of each of its slots [S], each sequence's block table in it [B, W]) —
    sequence i's positions [0, ctx_i) in consecutive blocks, the last one's tail reading whatever its
    cache block holds there (past ctx_i: never attended)."""
    bs, slots, tables, first = block_size, [], [], 0
    for s in seqs:
        n = -(-s.context_len // bs)
        blocks = torch.tensor(s.block_table[:n], dtype=torch.long)
        slots.append((blocks[:, None] * bs + torch.arange(bs)).reshape(-1))
        tables.append(list(range(first, first + n)))
        first += n
    width = max(len(t) for t in tables)
    return torch.cat(slots), torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
