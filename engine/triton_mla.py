"""DeepSeek's latent attention on CUDA (engine/mla.py says what it computes): two Triton kernels, no
host work or sync, so a decode step with them is captured as CUDA graphs as any other. (Prompt rows
attend over keys expanded from the latents, with engine/triton_attention.py's prefill kernel.)

- `rope_store`: rotary on each query head's q_pe (in place) and on the token's k_pe; the latent key
  [c | k_pe] into its slot's two halves (engine/mla.py `halves`).
- `decode`: one new token per sequence, absorbed. One program per (sequence, BLOCK_H query heads,
  key split): every head attends to the same latent keys, so a block of heads is the rows of one
  tile product and each key is read once per block; a small batch's keys are split into runs
  merged by their log-sum-exp (flash-decoding, as engine/triton_attention.py's decode; its merge
  kernel).
A latent key is read as four tiles — c's halves [N, r/2] and k_pe's [N, R/2] from the slot's two
halves — and the scores are their four products with the matching quarters of q: q_lat·c + q_pe·k_pe.
Values are c's halves, so the output o_lat [B, H, r] comes out as two [rows, r/2] accumulators.
Shapes: q [B, H, r + R]; k_cache, v_cache [num_blocks, block_size, 1, (r + R) / 2] contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine import triton_attention as paged
from engine.triton_attention import _dot, _wide  # (shared with the paged kernels)
from engine.triton_fused import _cached, _rotate

__all__ = ["BLOCK_H", "decode", "rope_store"]
BLOCK_H = 16  # query heads a decode program computes (its tile's rows; tl.dot's least)


@triton.jit
def _latent_rope_store(
    q_ptr, kv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, stride_qt, stride_qh, stride_kt, stride_ct, H,
    RANK: tl.constexpr, HALF: tl.constexpr, DH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr, PAIRS: tl.constexpr, FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    dd = tl.arange(0, BLOCK_P)[None, :]
    col = dd // 2 if PAIRS else dd  # PAIRS: dims 2i and 2i + 1 take frequency i
    c = tl.load(cos_ptr + t * stride_ct + col, mask=dd < 2 * HALF, other=1.0).to(tl.float32)  # [1, P]
    s = tl.load(sin_ptr + t * stride_ct + col, mask=dd < 2 * HALF, other=0.0).to(tl.float32)
    q, h, d, m = _rotate(q_ptr, stride_qh, t, stride_qt, c, s, H, 2 * HALF, HALF, BLOCK_H, BLOCK_P, PAIRS)
    tl.store(q_ptr + t * stride_qt + h * stride_qh + d, q, mask=m)  # q_pe rotated in place
    k, _, d, m = _rotate(kv_ptr + RANK, 0, t, stride_kt, c, s, 1, 2 * HALF, HALF, 1, BLOCK_P, PAIRS)  # [1, P]
    slot = tl.load(slot_ptr + t).to(tl.int64)
    stored = tl.where(slot >= 0, 1, 0)  # a padded row of a CUDA-graph batch stores nothing
    k = _cached(k, FP8).to(kc_ptr.dtype.element_ty)
    tl.store(kc_ptr + slot * DH + RANK // 2 + d, k, mask=m & (d < HALF * stored))  # k_pe's first half
    tl.store(vc_ptr + slot * DH + RANK // 2 + d - HALF, k, mask=m & (d >= HALF) & (d < 2 * HALF * stored))
    dc = tl.arange(0, BLOCK_C)
    cm = dc < (RANK // 2) * stored
    for i in tl.static_range(2):  # c's halves
        x = tl.load(kv_ptr + t * stride_kt + i * (RANK // 2) + dc, mask=cm, other=0.0)
        x = _cached(x, FP8).to(kc_ptr.dtype.element_ty)
        if i == 0:
            tl.store(kc_ptr + slot * DH + dc, x, mask=cm)
        else:
            tl.store(vc_ptr + slot * DH + dc, x, mask=cm)


@triton.jit
def _keys(kc_ptr, vc_ptr, row, live, like, HR: tl.constexpr, HP: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_P: tl.constexpr):
    """The latent keys at slot offsets `row` [N]: c's halves [N, R_] and k_pe's [N, P], as `like`'s dtype
    (FP8: widened)."""
    dr = tl.arange(0, BLOCK_R)[None, :]
    dp = tl.arange(0, BLOCK_P)[None, :]
    mr = live[:, None] & (dr < HR)
    mp = live[:, None] & (dp < HP)
    c0 = tl.load(kc_ptr + row[:, None] + dr, mask=mr, other=0.0).to(like.dtype)
    c1 = tl.load(vc_ptr + row[:, None] + dr, mask=mr, other=0.0).to(like.dtype)
    e0 = tl.load(kc_ptr + row[:, None] + HR + dp, mask=mp, other=0.0).to(like.dtype)
    e1 = tl.load(vc_ptr + row[:, None] + HR + dp, mask=mp, other=0.0).to(like.dtype)
    return c0, c1, e0, e1


@triton.jit
def _queries(base, live, HR: tl.constexpr, HP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """Query rows at `base` [ROWS] (pointers to each row's q): q_lat's halves [ROWS, R_], q_pe's [ROWS, P]."""
    dr = tl.arange(0, BLOCK_R)[None, :]
    dp = tl.arange(0, BLOCK_P)[None, :]
    mr = live[:, None] & (dr < HR)
    mp = live[:, None] & (dp < HP)
    q0 = tl.load(base[:, None] + dr, mask=mr, other=0.0)
    q1 = tl.load(base[:, None] + HR + dr, mask=mr, other=0.0)
    p0 = tl.load(base[:, None] + 2 * HR + dp, mask=mp, other=0.0)
    p1 = tl.load(base[:, None] + 2 * HR + HP + dp, mask=mp, other=0.0)
    return q0, q1, p0, p1


@triton.jit
def _step(q0, q1, p0, p1, c0, c1, e0, e1, seen, m_i, l_i, acc0, acc1, scale, IEEE: tl.constexpr):
    """One key tile of the online softmax: scores q_lat·c + q_pe·k_pe [ROWS, N] where `seen`, values c."""
    s = (_dot(q0, tl.trans(c0), IEEE) + _dot(q1, tl.trans(c1), IEEE) + _dot(p0, tl.trans(e0), IEEE)
         + _dot(p1, tl.trans(e1), IEEE)).to(tl.float32) * scale
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc0 = acc0 * alpha[:, None] + _dot(p.to(c0.dtype), c0, IEEE).to(tl.float32)
    acc1 = acc1 * alpha[:, None] + _dot(p.to(c1.dtype), c1, IEEE).to(tl.float32)
    return m_new, l_i, acc0, acc1


@triton.jit
def _latent_decode(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, o_ptr, part_ptr, lse_ptr,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_btb, scale, H,
    BS: tl.constexpr, DH: tl.constexpr, HR: tl.constexpr, HP: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    IEEE: tl.constexpr, OFF64: tl.constexpr,
):
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    ctx = _wide(tl.load(lens_ptr + b), OFF64)
    per = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N  # this program's run of keys
    lo = split * per
    hi = tl.minimum(ctx, lo + per)
    hm = heads < H
    q0, q1, p0, p1 = _queries(q_ptr + b * stride_qb + heads * stride_qh, hm, HR, HP, BLOCK_R, BLOCK_P)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    acc1 = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        live = n < hi
        blk = _wide(tl.load(bt_ptr + b * stride_btb + n // BS, mask=live, other=0), OFF64)
        c0, c1, e0, e1 = _keys(kc_ptr, vc_ptr, (blk * BS + n % BS) * DH, live, q0, HR, HP, BLOCK_R, BLOCK_P)
        m_i, l_i, acc0, acc1 = _step(q0, q1, p0, p1, c0, c1, e0, e1, live[None, :], m_i, l_i, acc0, acc1, scale, IEEE)
    norm = tl.where(l_i > 0, l_i, 1.0)[:, None]  # no key (a padded row, an empty split): 0
    dr = tl.arange(0, BLOCK_R)[None, :]
    om = hm[:, None] & (dr < HR)
    if SPLITS == 1:
        base = o_ptr + b * stride_ob + heads[:, None] * stride_oh + dr
        tl.store(base, (acc0 / norm).to(o_ptr.dtype.element_ty), mask=om)
        tl.store(base + HR, (acc1 / norm).to(o_ptr.dtype.element_ty), mask=om)
    else:  # this split's normalized output and log-sum-exp, merged by paged._merge_splits
        row_h = (b * H + heads) * SPLITS + split  # [BLOCK_H] into [B, H, SPLITS]
        tl.store(part_ptr + row_h[:, None] * (2 * HR) + dr, acc0 / norm, mask=om)
        tl.store(part_ptr + row_h[:, None] * (2 * HR) + HR + dr, acc1 / norm, mask=om)
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row_h, lse, mask=hm)


def _dims(q: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, int]:
    """(block_size, half width DH) of a [num_blocks, block_size, 1, DH] cache that q [T, H, 2 * DH] reads."""
    if not k_cache.is_contiguous() or k_cache.shape[2] != 1:
        raise ValueError("a latent cache must be contiguous [num_blocks, block_size, 1, (r + R) / 2]")
    _, bs, _, dh = k_cache.shape
    if q.shape[-1] != 2 * dh:
        raise ValueError(f"latent queries of {q.shape[-1]} dims over a cache of halves of {dh}")
    return bs, dh


def _tiles(half_rank: int, half_rope: int) -> tuple[int, int]:
    """Tile widths of c's and k_pe's halves: powers of two, at least 16 (tl.dot's least)."""
    return max(16, triton.next_power_of_2(half_rank)), max(16, triton.next_power_of_2(half_rope))


def rope_store(q_pe: torch.Tensor, kvec: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, slots: torch.Tensor, interleaved: bool = False) -> None:
    """q_pe [T, H, R] (rows may be strided: a view of the q projection's) rotated in place; kvec [T, r + R]
    ([c | k_pe]) rotated and stored at slots [T] (< 0: nothing); cos and sin [T, R]; `interleaved`:
    rotary on neighbouring dims (DeepSeek's)."""
    T, H, R = q_pe.shape
    width = kvec.shape[1]
    assert q_pe.stride(-1) == 1 and kvec.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    if T:
        _latent_rope_store[(T,)](
            q_pe, kvec, cos, sin, k_cache, v_cache, slots, q_pe.stride(0), q_pe.stride(1), kvec.stride(0),
            cos.stride(0), H, RANK=width - R, HALF=R // 2, DH=width // 2, BLOCK_H=triton.next_power_of_2(H),
            BLOCK_P=triton.next_power_of_2(R), BLOCK_C=triton.next_power_of_2((width - R) // 2), PAIRS=interleaved,
            FP8=k_cache.dtype == torch.float8_e4m3fn,
        )


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           context_lens: torch.Tensor, scale: float, rope: int, splits: int = 1, block_h: int = BLOCK_H,
           block_n: int | None = None) -> torch.Tensor:
    """q [B, H, r + R] (rotated) over each row's latent keys; block_tables [B, W]; context_lens [B] (0: a
    padded row, zeros) → o_lat [B, H, r]. splits > 1: flash-decoding's key runs, merged."""
    bs, dh = _dims(q, k_cache)
    block_n = block_n or (16 if k_cache.dtype == torch.float8_e4m3fn else 32)  # sm_90: FP8 tiles of 32 spilled 248 B
    B, H, width = q.shape
    r = width - rope
    out = torch.empty(B, H, r, dtype=q.dtype, device=q.device)
    part = lse = out  # unused when splits == 1
    if splits > 1:
        part = torch.empty(B, H, splits, r, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    block_r, block_p = _tiles(r // 2, rope // 2)
    _latent_decode[(B, triton.cdiv(H, block_h), splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part, lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), scale, H,
        BS=bs, DH=dh, HR=r // 2, HP=rope // 2, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_N=block_n,
        SPLITS=splits, IEEE=q.dtype == torch.float32, OFF64=paged._off64(k_cache),
    )
    if splits > 1:
        paged._merge_splits[(B * H,)](part, lse, out, out.stride(0), out.stride(1), H, D=r, SPLITS=splits,
                                BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=triton.next_power_of_2(r))
    return out
