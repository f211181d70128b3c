"""Attention backends of the model runner: rotary, where new K/V go, how new tokens attend over the cache.

The runner computes everything else (embeddings, projections, norms, MLP); a backend does two things:
  1. `prepare(seqs)` → a `BatchMeta`: the forward's token ids, positions, cache slots and block
     tables, moved to the device once (one host→device copy);
  2. `attend(layer, q, k, v, cos, sin, meta, scale)`: rotary on q and k, store k, v at their slots,
     then attention of q over each sequence's cache → o; a layer with a sliding window (`windows`,
     Mistral's, Qwen 2's upper layers) attends to the last `window` positions only (Hugging Face's
     key > query - window), its cache still holding every position; with `softcap` (Gemma 2's
     attn_logit_softcapping) each scaled score s becomes softcap · tanh(s / softcap) before the softmax;
     with `sinks` (gpt-oss: a learned logit per layer and query head) the softmax's denominator has
     one more term, exp(sink), that no value stands behind.
Backends:
  - `TorchAttention` (CPU, and CUDA without Triton): Hugging Face's rotary; index_copy into the slots;
    decode rows through the fused C++ kernel (CPU fp32; not a windowed, soft-capped or sink layer) or a
    gather + SDPA; prompts and chunks through one SDPA per sequence (`_sdpa`: written out when capped
    or with sinks).
  - `TritonAttention` (CUDA): rotary + store in one kernel (engine/triton_fused.py), then
    engine/triton_attention.py — one kernel per step and layer for the decode rows, one for all prompt
    tokens; no host work or sync inside. Its decode-only `BatchMeta` can live in persistent buffers,
    which is what the CUDA graphs replay (engine/cuda_graphs.py).
DeepSeek's latent attention is each backend's `attend_latent` (engine/mla.py).
Shapes: q [T, heads, head_dim], k and v [T, kv_heads, head_dim] (views into the fused projection,
not yet rotated), cos and sin [T, rotary dims] (head_dim, or fewer under partial rotary: Phi 4 mini)
→ o [T, heads * head_dim].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers.models.glm4.modeling_glm4 import apply_rotary_pos_emb as interleaved_rotary
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from engine import mla

if TYPE_CHECKING:
    from engine.mla import Latent
    from engine.model_runner import SeqInput


@dataclass
class BatchMeta:
    """One forward's inputs, on the runner's device. The first `num_decode` sequences have one new token."""

    ids: torch.Tensor  # [T] token ids
    pos: torch.Tensor  # [T] positions
    slots: torch.Tensor  # [T] cache slot of each new token (< 0: a padded row, nothing stored)
    last: torch.Tensor | None  # [B] index of each sequence's last new token in T; None: every token
    num_decode: int
    dec_tables: torch.Tensor | None = None  # [num_decode, W] block tables of the decode rows
    dec_lens: torch.Tensor | None = None  # [num_decode] context lengths (0: a padded row)
    prefill: list[SeqInput] = field(default_factory=list)  # the other sequences, in order
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific tensors


def _upload(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Int64 host tensors → the same on `device`, through one copy."""
    if device.type == "cpu":
        return parts
    flat = torch.cat([p.reshape(-1) for p in parts]).to(device, non_blocking=True)
    out, off = [], 0
    for p in parts:
        out.append(flat[off : off + p.numel()].view(p.shape))
        off += p.numel()
    return out


def _host_meta(seqs: list[SeqInput], block_size: int) -> tuple[int, list[torch.Tensor]]:
    """(num_decode, [ids, pos, slots, last, dec_tables, dec_lens]) built on the host."""
    nd = 0
    while nd < len(seqs) and seqs[nd].num_new == 1:
        nd += 1
    ids = [t for s in seqs for t in s.token_ids]
    pos = [p for s in seqs for p in range(s.start_pos, s.context_len)]
    slots = [s.block_table[p // block_size] * block_size + p % block_size
             for s in seqs for p in range(s.start_pos, s.context_len)]
    last = [n - 1 for n in accumulate(s.num_new for s in seqs)]
    width = max((-(-s.context_len // block_size) for s in seqs[:nd]), default=1)
    tables = [s.block_table[: -(-s.context_len // block_size)] for s in seqs[:nd]]
    dec_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long).view(nd, width)
    dec_lens = torch.tensor([s.context_len for s in seqs[:nd]], dtype=torch.long)
    as_t = [torch.tensor(x, dtype=torch.long) for x in (ids, pos, slots, last)]
    return nd, as_t + [dec_tables, dec_lens]


def _rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's rotary: q [1, H, T, D], k [1, KVH, T, D], cos and sin [1, T, R]. R < D (partial
    rotary, Phi 4 mini): the first R dims of each head rotate, the rest pass as they are (Phi 3's
    apply_rotary_pos_emb). interleaved: neighbouring dims rotate together (GLM 4's)."""
    if interleaved:
        return interleaved_rotary(q, k, cos, sin)
    r = cos.shape[-1]
    if r == q.shape[-1]:
        return apply_rotary_pos_emb(q, k, cos, sin)
    c, s = cos[:, None], sin[:, None]  # [1, 1, T, R]
    q, k = (torch.cat([x[..., :r] * c + rotate_half(x[..., :r]) * s, x[..., r:]], dim=-1) for x in (q, k))
    return q, k


def _gathered(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `slots` [S] of one layer's k or v cache [num_blocks, block_size, kv_heads, D], as [S, kv_heads * D]
    in dtype; an FP8 cache gathered as bytes (indexing and cat of float8 are not everywhere: ModelRunner.kv_bytes)."""
    flat = cache.view(-1, cache.shape[-2] * cache.shape[-1])
    if cache.dtype == torch.float8_e4m3fn:
        return flat.view(torch.uint8)[slots].view(cache.dtype).to(dtype)
    return flat[slots].to(dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
          causal: bool = False, softcap: float = 0.0, sink: torch.Tensor | None = None) -> torch.Tensor:
    """torch SDPA with grouped KV heads, or with `softcap` > 0 or a `sink` [H] the same written out as
    Hugging Face's eager attentions compute it (SDPA can neither cap the scores nor add a sink:
    Gemma 2's, gpt-oss's). q [B, H, n, D], k and v [B, KVH, ctx, D], mask [.., n, ctx] (True:
    attend) → [B, H, n, D]."""
    if not softcap and sink is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # [B, H, ctx, D]
    s = q @ k.transpose(-1, -2) * scale  # [B, H, n, ctx]
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if causal:
        n, ctx = s.shape[-2:]
        mask = torch.ones(n, ctx, dtype=torch.bool, device=s.device).tril(ctx - n)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if sink is None:
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    B, H, n, _ = s.shape
    s = torch.cat([s.float(), sink.float().view(1, H, 1, 1).expand(B, H, n, 1)], dim=-1)  # [B, H, n, ctx + 1]
    return torch.softmax(s, dim=-1)[..., :-1].to(q.dtype) @ v  # the sink's share goes to no value


class TorchAttention:
    def __init__(self, kv: torch.Tensor, num_heads: int, paged: Any = None, windows: list[int] | None = None,
                 softcap: float = 0.0, interleaved: bool = False, sinks: list[torch.Tensor | None] | None = None) -> None:
        self.kv = kv  # [L, 2, num_blocks, block_size, kv_heads, head_dim]
        L, _, nb, bs, kvh, d = kv.shape
        self.windows = windows or [0] * L  # each layer's sliding window (0: the whole context)
        self.softcap = softcap  # attention logit soft-capping (0: none)
        self.sinks = sinks or [None] * L  # each layer's attention sinks [H] float32 (gpt-oss), or None
        self.interleaved = interleaved  # rotary in pairs of neighbouring dims (GLM 4)
        self.kv_slots = kv.view(L, 2, nb * bs, kvh, d)  # [L, 2, num_slots, kv_heads, head_dim]
        self.block_size, self.num_heads, self.num_kv_heads, self.head_dim = bs, num_heads, kvh, d
        self.paged = paged  # the fused C++ decode kernel, or None: gather + SDPA
        self.name = "cpp" if paged is not None else "sdpa"

    def prepare(self, seqs: list[SeqInput]) -> BatchMeta:
        nd, parts = _host_meta(seqs, self.block_size)
        dev = self.kv.device
        ids, pos, slots, last, tables, lens = _upload(parts, dev)
        meta = BatchMeta(ids, pos, slots, last, nd, tables, lens, list(seqs[nd:]))
        if nd:  # padded keys of the gather path: [nd, 1, 1, W * block_size]
            span = torch.arange(tables.shape[1] * self.block_size, device=dev)
            meta.extra["mask"] = (span[None, :] < lens[:, None])[:, None, None, :]
        return meta

    def attend(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, meta: BatchMeta, scale: float) -> torch.Tensor:
        T = q.shape[0]
        q, k = _rotary(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None], self.interleaved)
        v = v.transpose(0, 1)[None]  # q [1, H, T, D]; k, v [1, KVH, T, D]
        self.kv_slots[li, 0].index_copy_(0, meta.slots, k[0].transpose(0, 1))  # [T, KVH, D] into slots
        self.kv_slots[li, 1].index_copy_(0, meta.slots, v[0].transpose(0, 1))
        nd, w = meta.num_decode, self.windows[li]
        if not meta.prefill:
            o = self._decode(li, q, meta, scale, w)
        elif nd == 0:
            o = self._varlen(li, meta.prefill, q, k, v, scale, w)
        else:
            o = torch.cat([  # decode rows [0, nd) + prompt tokens [nd, T)
                self._decode(li, q[:, :, :nd], meta, scale, w),
                self._varlen(li, meta.prefill, q[:, :, nd:], k[:, :, nd:], v[:, :, nd:], scale, w),
            ], dim=1)
        return o.reshape(T, self.num_heads * self.head_dim)  # from [1, T, H*D]

    def attend_latent(self, li: int, latent: Latent, q: torch.Tensor, kvec: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, meta: BatchMeta, scale: float) -> torch.Tensor:
        """DeepSeek's latent attention (engine/mla.py): q [T, H, nope + R], kvec [T, r + R] → [T, H * vd]."""
        return mla.attend_torch(self, li, latent, q, kvec, cos, sin, meta, scale)

    def _slots(self, s: SeqInput, end: int) -> torch.Tensor:
        pos = torch.arange(0, end)
        table = torch.tensor(s.block_table, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.kv.device)

    def _varlen(self, li: int, seqs: list[SeqInput], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float, window: int) -> torch.Tensor:
        """Packed prompts/chunks: one causal attention per sequence. q [1,H,T,D] → out [1,T,H*D]."""
        outs, sink = [], self.sinks[li]
        off = 0
        for s in seqs:
            n = s.num_new
            qs = q[:, :, off : off + n]  # [1, H, n, D]
            if s.start_pos == 0 and not window:  # whole prompt in this forward: keys are the fresh ones
                ks, vs = k[:, :, off : off + n], v[:, :, off : off + n]
                o = _sdpa(qs, ks, vs, scale, causal=n > 1, softcap=self.softcap, sink=sink)
            else:  # a later chunk (or a window): read every position from the cache, masked by position
                idx = self._slots(s, s.context_len)
                ks = self.kv_slots[li, 0].index_select(0, idx).transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
                vs = self.kv_slots[li, 1].index_select(0, idx).transpose(0, 1).unsqueeze(0)
                qpos = torch.arange(s.start_pos, s.context_len, device=q.device)[:, None]
                kpos = torch.arange(s.context_len, device=q.device)[None, :]
                mask = (kpos <= qpos) & (kpos > qpos - window) if window else kpos <= qpos  # [n, ctx]
                o = _sdpa(qs, ks, vs, scale, mask, softcap=self.softcap, sink=sink)
            outs.append(o)
            off += n
        o = torch.cat(outs, dim=2)  # [1, H, T, D]
        return o.transpose(1, 2).reshape(1, q.shape[2], self.num_heads * self.head_dim)

    def _decode(self, li: int, q: torch.Tensor, meta: BatchMeta, scale: float, window: int) -> torch.Tensor:
        """One new token per sequence: attention over each one's blocks. q [1,H,B,D] → [1,B,H*D]."""
        table, lens, mask = meta.dec_tables, meta.dec_lens, meta.extra["mask"]
        assert table is not None and lens is not None
        B, T = mask.shape[0], mask.shape[-1]
        if window:  # and not before the window: key > (len - 1) - window
            span = torch.arange(T, device=mask.device)
            mask = mask & (span[None, :] >= lens[:, None] - window)[:, None, None, :]
        sink = self.sinks[li]
        if self.paged is not None and not window and not self.softcap and sink is None:  # the fused kernel
            qb = q[0].transpose(0, 1).contiguous()  # [B, H, D]
            o = self.paged.paged_decode_attention(qb, self.kv[li, 0], self.kv[li, 1], table, lens, scale)
            return o.reshape(1, B, self.num_heads * self.head_dim)
        flat = table.reshape(-1)
        # [B * max_blocks, bs, KVH, D] → [B, T, KVH, D] → [B, KVH, T, D]
        ks = self.kv[li, 0].index_select(0, flat).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        vs = self.kv[li, 1].index_select(0, flat).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        qb = q[0].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
        if B == 1:  # cut the padding: the same call as a batch-1 Hugging Face decode step
            n = int(lens[0])
            a = max(0, n - window) if window else 0
            o = _sdpa(qb, ks[:, :, a:n], vs[:, :, a:n], scale, softcap=self.softcap, sink=sink)
        else:
            o = _sdpa(qb, ks, vs, scale, mask, softcap=self.softcap, sink=sink)
        return o.reshape(1, B, self.num_heads * self.head_dim)  # from [B, H, 1, D]


class TritonAttention:
    name = "triton"

    def __init__(self, kv: torch.Tensor, num_heads: int, block_m: int | None = None,
                 windows: list[int] | None = None, softcap: float = 0.0, interleaved: bool = False,
                 sinks: list[torch.Tensor | None] | None = None) -> None:
        from engine import triton_attention, triton_fused, triton_mla  # imported only when selected: triton is GPU-side

        self.ops, self.fused, self.mla_ops = triton_attention, triton_fused, triton_mla
        self.kv = kv  # [L, 2, num_blocks, block_size, kv_heads, head_dim]
        self.windows = windows or [0] * kv.shape[0]  # each layer's sliding window (0: the whole context)
        self.softcap = softcap  # attention logit soft-capping (0: none)
        self.sinks = sinks or [None] * kv.shape[0]  # each layer's attention sinks [H] float32 (gpt-oss), or None
        self.interleaved = interleaved  # rotary in pairs of neighbouring dims (GLM 4)
        self.block_size, self.num_heads, self.num_kv_heads, self.head_dim = kv.shape[3], num_heads, kv.shape[4], kv.shape[5]
        self.block_m = block_m or (32 if self.head_dim <= 128 else 16)  # query tiles: head_dim 256 spilled at 32
        # the decode kernel splits a small batch's keys until every SM has a program (decode_splits)
        self.num_sms = torch.cuda.get_device_properties(kv.device).multi_processor_count if kv.is_cuda else 1

    def prepare(self, seqs: list[SeqInput]) -> BatchMeta:
        nd, parts = _host_meta(seqs, self.block_size)
        pre = list(seqs[nd:])
        if pre:  # packed prompt tokens: offsets, first positions, block tables, query tiles
            bs = self.block_size
            width = max(-(-s.context_len // bs) for s in pre)
            tables = [s.block_table[: -(-s.context_len // bs)] for s in pre]
            tile_seq, tile_m0 = self.ops.prefill_tiles([s.num_new for s in pre], self.block_m)
            parts += [torch.tensor(x, dtype=torch.long) for x in (
                [0] + list(accumulate(s.num_new for s in pre)), [s.start_pos for s in pre],
                [t + [0] * (width - len(t)) for t in tables], tile_seq, tile_m0)]
        up = _upload(parts, self.kv.device)
        meta = BatchMeta(*up[:4], nd, up[4], up[5], pre)
        if pre:
            meta.extra.update(zip(("cu_q", "start", "tables", "tile_seq", "tile_m0"), up[6:]))
        return meta

    def attend(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, meta: BatchMeta, scale: float) -> torch.Tensor:
        kc, vc = self.kv[li, 0], self.kv[li, 1]  # [num_blocks, block_size, kv_heads, head_dim] each
        qt = self.fused.rope_store(q, k, v, cos, sin, kc, vc, meta.slots, self.interleaved)  # [T, H, D], rotated
        nd, T = meta.num_decode, qt.shape[0]
        outs = []
        if nd:
            splits = self.ops.decode_splits(nd, self.num_kv_heads, self.num_sms)
            outs.append(self.ops.paged_decode(qt[:nd], kc, vc, meta.dec_tables, meta.dec_lens, scale, splits=splits,
                                              window=self.windows[li], softcap=self.softcap, sinks=self.sinks[li]))
        if meta.prefill:
            x = meta.extra
            outs.append(self.ops.paged_prefill(qt[nd:], kc, vc, x["tables"], x["cu_q"], x["start"],
                                               x["tile_seq"], x["tile_m0"], scale, block_m=self.block_m,
                                               window=self.windows[li], softcap=self.softcap,
                                               sinks=self.sinks[li]))
        o = outs[0] if len(outs) == 1 else torch.cat(outs)  # [T, H, D]
        return o.view(T, self.num_heads * self.head_dim)

    def attend_latent(self, li: int, latent: Latent, q: torch.Tensor, kvec: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, meta: BatchMeta, scale: float) -> torch.Tensor:
        """DeepSeek's latent attention (engine/mla.py): q [T, H, nope + R], kvec [T, r + R] → [T, H * vd].
        Decode rows absorbed (engine/triton_mla.py); prompt rows over their latents expanded into a
        scratch paged cache (laid out once a forward: mla.scratch), with the paged prefill kernel."""
        kc, vc = self.kv[li, 0], self.kv[li, 1]
        nope, r = latent.nope, latent.rank
        self.mla_ops.rope_store(q[..., nope:], kvec, cos, sin, kc, vc, meta.slots, self.interleaved)  # q_pe in place
        nd, rope, outs = meta.num_decode, cos.shape[-1], []
        if nd:
            splits = self.ops.decode_splits(nd, -(-self.num_heads // self.mla_ops.BLOCK_H), self.num_sms)  # head blocks
            o = self.mla_ops.decode(latent.absorbed(q[:nd]), kc, vc, meta.dec_tables, meta.dec_lens, scale, rope, splits)
            outs.append(latent.output(o))  # [nd, H * vd]
        if meta.prefill:
            x = meta.extra
            if "scratch" not in x:  # the first latent layer of this forward lays it out
                x["scratch"], x["scratch_tables"] = _upload(list(mla.scratch(meta.prefill, self.block_size)), kc.device)
            latents = mla.whole(*(_gathered(c, x["scratch"], q.dtype) for c in (kc, vc)), r)  # [S, r + R]
            keys, values = latent.expand(latents)  # [S, H, nope + R], [S, H, vd]
            S, H, D = keys.shape
            values = torch.nn.functional.pad(values, (0, D - values.shape[-1]))  # the kernel's one width
            o = self.ops.paged_prefill(q[nd:], keys.view(-1, self.block_size, H, D), values.view(-1, self.block_size, H, D),
                                       x["scratch_tables"], x["cu_q"], x["start"], x["tile_seq"], x["tile_m0"], scale,
                                       block_m=self.block_m)  # [Tp, H, D]
            outs.append(o[..., : latent.w_kv.shape[1] - nope].reshape(o.shape[0], -1))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
