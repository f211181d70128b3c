"""Paged attention for CUDA as two Triton kernels: no host work per call, no host sync. (New K and
V reach their cache slots with the rotary, engine/triton_fused.py `rope_store`.)

- `paged_decode`: one new token per sequence; reads K/V in place through the block table. One
  program per (sequence, KV head) computes that head's whole GQA group of query heads at once, so
  each K/V element is read once per group. A small batch leaves most SMs idle (batch 1 of a model
  with 4 KV heads: 4 programs), so its keys are split into runs, one program each, merged by their
  log-sum-exp in a second kernel (flash-decoding; `decode_splits` picks how many).
- `paged_prefill`: packed prompts and prompt chunks in one call per layer. One program per
  (tile of BLOCK_M query tokens of one sequence, query head); keys are read from the cache
  (already stored), so a later chunk sees its earlier positions with the same code.

Both attention kernels use an online softmax in fp32; with SINK (gpt-oss's attention sinks: a learned
logit per query head in the denominator, no value behind it) each head's running max and sum start
at (sink, 1) where they would start at (-inf, 0) — in the decode kernel in its first key split only,
so the merge counts it once. In fp32 the dots are exact IEEE (no TF32),
so a float32 model matches torch SDPA to rounding. Layouts (the runner's cache, one layer):
    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim], contiguous
On a machine without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1): slow,
but the same code — that is how the CPU test suite checks them against SDPA.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _wide(x, OFF64: tl.constexpr):
    """Block ids and positions as the type of the cache offsets computed from them: int32 unless one
    layer's cache has 2**31 elements or more. (int64 offsets cost a [N, D] tile of 64-bit addresses
    for K and one for V: 230 registers a thread in the bf16 decode kernel of the 1.1B shape, 128 with
    int32; the 8B shape's spilled — cuobjdump of the sm_90 cubins, tests/cpu/sm90_compile.py.)"""
    if OFF64:
        return x.to(tl.int64)
    else:
        return x.to(tl.int32)


@triton.jit
def _capped(s, cap, CAP: tl.constexpr):
    """Gemma 2's attention logit soft-capping, cap · tanh(s / cap), when CAP (else s as it is).
    tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp overflowing to inf gives 1)."""
    if CAP:
        return cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))
    else:
        return s


@triton.jit
def _paged_decode(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, o_ptr, part_ptr, lse_ptr, sink_ptr,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_btb, scale, window, cap,
    BS: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    IEEE: tl.constexpr, OFF64: tl.constexpr, CAP: tl.constexpr, SINK: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = _wide(tl.load(lens_ptr + b), OFF64)
    first = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)  # a sliding window's first key
    # this program's keys: one of SPLITS equal runs of whole BLOCK_N tiles (flash-decoding)
    per = tl.cdiv(tl.cdiv(ctx - first, SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * per
    hi = tl.minimum(ctx, lo + per)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * G + g
    gd_mask = (g < G)[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gd_mask, other=0.0)  # [G, D]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    if SINK:  # the sink's term, exp(sink - m), in the first split's sum: (m, l) = (sink, 1)
        sink = tl.load(sink_ptr + heads, mask=g < G, other=0.0)  # [G] float32
        m_i = tl.where(split == 0, sink, m_i)
        l_i = tl.where(split == 0, 1.0, l_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)  # positions of this key tile
        live = n < hi
        blk = _wide(tl.load(bt_ptr + b * stride_btb + n // BS, mask=live, other=0), OFF64)
        row = (blk * BS + n % BS) * (KVH * D) + kvh * D  # [N] offset of (slot, kv head)
        kv_mask = live[:, None] & (d < D)[None, :]
        k = tl.load(kc_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # [N, D] (FP8: widened)
        v = tl.load(vc_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        s = _capped(_dot(q, tl.trans(k), IEEE).to(tl.float32) * scale, cap, CAP)  # [G, N]
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE).to(tl.float32)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no key (a padded row, an empty split): 0, not NaN
    if SPLITS == 1:
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=gd_mask)
    else:  # this split's normalized output and log-sum-exp, merged by _merge_splits
        row_h = (b * (KVH * G) + heads) * SPLITS + split  # [G] index into [B, H, SPLITS]
        tl.store(part_ptr + row_h[:, None] * D + d[None, :], out, mask=gd_mask)
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row_h, lse, mask=g < G)


@triton.jit
def _merge_splits(
    part_ptr, lse_ptr, o_ptr, stride_ob, stride_oh, H,
    D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, h] = Σ_s exp(lse_s − lse) · part_s over the splits that saw keys (none: 0)."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + bh * SPLITS + sp, mask=sp < SPLITS, other=float("-inf"))  # [S]
    top = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - tl.where(top > float("-inf"), top, 0.0)), 0.0)  # [S]
    part = tl.load(part_ptr + (bh * SPLITS + sp)[:, None] * D + d[None, :],
                   mask=(sp < SPLITS)[:, None] & (d < D)[None, :], other=0.0)  # [S, D]
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _paged_prefill(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, cu_q_ptr, start_ptr, tile_seq_ptr, tile_m0_ptr, o_ptr, sink_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_btb, scale, window, cap,
    BS: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    OFF64: tl.constexpr, CAP: tl.constexpr, SINK: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    s_idx = tl.load(tile_seq_ptr + tile)
    m0 = _wide(tl.load(tile_m0_ptr + tile), OFF64)  # first query of this tile, counted within its sequence
    q_off = tl.load(cu_q_ptr + s_idx)
    n_new = _wide(tl.load(cu_q_ptr + s_idx + 1) - q_off, OFF64)
    start = _wide(tl.load(start_ptr + s_idx), OFF64)  # position of the sequence's first new token
    ctx = start + n_new
    mi = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q_live = mi < n_new
    qd_mask = q_live[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + (q_off + mi)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=qd_mask, other=0.0)
    qpos = start + mi  # [M]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if SINK:  # the sink's term in the sum: (m, l) = (sink, 1)
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(sink_ptr + h)
        l_i = l_i + 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(ctx, start + m0 + BLOCK_M)  # causal: no key beyond the tile's last query
    # a sliding window: no key at or before (query - window); none before the tile's first query's
    lo = tl.where(window > 0, tl.maximum(start + m0 - window + 1, 0) // BLOCK_N * BLOCK_N, 0)
    for k0 in range(lo, end, BLOCK_N):
        n = k0 + tl.arange(0, BLOCK_N)
        live = n < end
        blk = _wide(tl.load(bt_ptr + s_idx * stride_btb + n // BS, mask=live, other=0), OFF64)
        row = (blk * BS + n % BS) * (KVH * D) + kvh * D
        kv_mask = live[:, None] & (d < D)[None, :]
        k = tl.load(kc_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # [N, D] (FP8: widened)
        v = tl.load(vc_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        s = _capped(_dot(q, tl.trans(k), IEEE).to(tl.float32) * scale, cap, CAP)  # [M, N]
        seen = (n[None, :] <= qpos[:, None]) & ((window == 0) | (n[None, :] > qpos[:, None] - window))
        s = tl.where(seen & live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past the sequence's end see no key
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE).to(tl.float32)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + (q_off + mi)[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty), mask=qd_mask)


def _check_cache(k_cache: torch.Tensor) -> tuple[int, int, int]:
    """(block_size, kv_heads, head_dim) of a [num_blocks, block_size, kv_heads, head_dim] cache."""
    if not k_cache.is_contiguous():
        raise ValueError("the KV cache must be contiguous [num_blocks, block_size, kv_heads, head_dim]")
    _, bs, kvh, d = k_cache.shape
    return bs, kvh, d


def _off64(k_cache: torch.Tensor) -> bool:
    """Whether offsets into one layer's cache need 64 bits."""
    return k_cache.numel() >= 2**31


def _tiles(n: int, d: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(n)), max(16, triton.next_power_of_2(d))


def decode_splits(num_rows: int, kv_heads: int, num_sms: int, max_splits: int = 16) -> int:
    """Key splits per (sequence, KV head) for a decode batch of `num_rows`: enough programs to give
    every SM one (flash-decoding), at most `max_splits`; 1 once the batch alone fills the GPU."""
    programs = max(1, num_rows * kv_heads)
    return max(1, min(max_splits, -(-num_sms // programs)))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, block_n: int | None = None, splits: int = 1,
                 window: int = 0, softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, heads, head_dim]; block_tables [B, W]; context_lens [B] → out [B, heads, head_dim].

    `splits` > 1: each (sequence, KV head) is split into that many runs of keys, one program each,
    then merged by their log-sum-exp (see `decode_splits`). A row with context length 0 (a padded
    row) gives zeros. `window` > 0: only the last `window` keys (a sliding window, the query's own
    included: Hugging Face's key > query - window). `softcap` > 0: each score s (scaled) becomes
    softcap · tanh(s / softcap) before the softmax (Gemma 2). `sinks` [heads] float32: each head's
    attention sink (gpt-oss), a logit in the softmax's denominator only."""
    bs, kvh, d = _check_cache(k_cache)
    # sm_90 spilled a key tile of 64 at head_dim 256 (Gemma), and at 128 from an FP8 cache (its tiles widened in registers)
    block_n = block_n or (16 if d > 128 else 32 if k_cache.dtype == torch.float8_e4m3fn else 64)
    B, H, _ = q.shape
    G = H // kvh
    out = torch.empty(B, H, d, dtype=q.dtype, device=q.device)
    block_g, block_d = _tiles(G, d)
    part = lse = out  # unused when splits == 1
    if splits > 1:
        part = torch.empty(B, H, splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    _paged_decode[(B, kvh, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part, lse, sinks if sinks is not None else out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), scale, window,
        softcap, BS=bs, KVH=kvh, D=d, G=G, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n, SPLITS=splits,
        IEEE=q.dtype == torch.float32, OFF64=_off64(k_cache), CAP=softcap > 0, SINK=sinks is not None,
    )
    if splits > 1:
        _merge_splits[(B * H,)](part, lse, out, out.stride(0), out.stride(1), H, D=d, SPLITS=splits,
                                BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d)
    return out


def prefill_tiles(num_new: list[int], block_m: int) -> tuple[list[int], list[int]]:
    """The (sequence index, first query within it) of every BLOCK_M tile of a packed prefill."""
    seq, m0 = [], []
    for i, n in enumerate(num_new):
        for m in range(0, n, block_m):
            seq.append(i)
            m0.append(m)
    return seq, m0


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  cu_q: torch.Tensor, start_pos: torch.Tensor, tile_seq: torch.Tensor, tile_m0: torch.Tensor,
                  scale: float, block_m: int = 32, block_n: int | None = None, window: int = 0,
                  softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, heads, head_dim] packed; cu_q [B+1] offsets of each sequence's new tokens in T;
    start_pos [B] position of each one's first new token; tile_* from `prefill_tiles(.., block_m)`.
    Causal attention of every new token over its sequence's positions [0, own] (with `window` > 0:
    (own - window, own]; `softcap` and `sinks` as paged_decode's) → [T, heads, head_dim]."""
    bs, kvh, d = _check_cache(k_cache)
    block_n = block_n or (16 if d > 128 or k_cache.dtype == torch.float8_e4m3fn else 32)  # (sm_90 spills: as decode's)
    T, H, _ = q.shape
    out = torch.empty(T, H, d, dtype=q.dtype, device=q.device)
    _, block_d = _tiles(1, d)
    _paged_prefill[(tile_seq.numel(), H)](
        q, k_cache, v_cache, block_tables, cu_q, start_pos, tile_seq, tile_m0, out,
        sinks if sinks is not None else out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), scale, window,
        softcap, BS=bs, KVH=kvh, D=d, G=H // kvh, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, OFF64=_off64(k_cache), CAP=softcap > 0, SINK=sinks is not None,
    )
    return out
