"""The experts' grouped matmul as one Triton kernel (engine/moe.py step 3, where torch's is not fit).

torch's `grouped_mm` keeps its groups on the device only in bf16 on sm90/sm100; elsewhere (an A100,
fp16, fp32) it loops over the experts on the host, reading each one's row count, which no CUDA
graph can hold. This kernel reads everything on the device (vLLM's fused_moe scheme, without the
padded copy of the rows):
  1. tiles: the rows (sorted by expert) are cut into tiles of BLOCK_M rows that never span two
     experts; tile t's expert and first row come from the per-expert counts by a cumulative sum and
     a search, on the device. The number of tiles is bounded by cdiv(S, BLOCK_M) + E, fixed for a
     given S, so the launch grid is too; tiles beyond the ones in use do nothing;
  2. each program multiplies its tile's rows [BLOCK_M, K] by a [K, BLOCK_N] slice of its expert's
     weight, accumulating in fp32 (IEEE fp32 products for fp32 models, as torch's matmul), and
     stores [BLOCK_M, BLOCK_N] in the output dtype; rows past the expert's end are masked.
Shapes: rows [S, K] (contiguous rows), weights [E, K, N] (any strides: Hugging Face's [E, N, K]
transposed), offs [E] (int32: expert e's rows end at offs[e], as torch's grouped_mm takes them) → [S, N].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.triton_attention import _dot

BLOCK_M = 16  # rows a program takes (tl.dot's least); a decode step gives an expert a few rows
BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _tile_rows(tile_expert_ptr, tile_first_ptr, ends_ptr, BLOCK_M: tl.constexpr):
    """Step 1's tile of this program: (its expert, whether it is in use, its rows [BM], which of them are
    its expert's). An unused tile (expert -1) has no row."""
    t = tl.program_id(0)
    e = tl.load(tile_expert_ptr + t)  # -1: a tile beyond the ones in use
    used = e >= 0
    e = tl.maximum(e, 0).to(tl.int64)
    rows = tl.load(tile_first_ptr + t).to(tl.int64) + tl.arange(0, BLOCK_M)  # [BM]
    return e, used, rows, rows < tl.where(used, tl.load(ends_ptr + e), 0)


@triton.jit
def _grouped_matmul(
    a_ptr, b_ptr, c_ptr, tile_expert_ptr, tile_first_ptr, ends_ptr, N, K,
    stride_am, stride_be, stride_bk, stride_bn, stride_cm,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e, used, rows, rmask = _tile_rows(tile_expert_ptr, tile_first_ptr, ends_ptr, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cmask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(used, K, 0)  # an unused tile reads nothing
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BK]
        kmask = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + e * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += _dot(a, b, IEEE)  # [BM, BN]
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def tiles(ends: torch.Tensor, num_rows: int, block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """1. → (expert [n], first row [n]) of each of the n = cdiv(num_rows, block_m) + E tiles; expert
    -1 past the tiles in use. ends [E] int32. Device ops only (no host read)."""
    E = ends.shape[0]
    ends = ends.long()
    counts = ends - torch.cat([ends.new_zeros(1), ends[:-1]])  # [E]
    per_expert = (counts + block_m - 1) // block_m  # [E] tiles
    tile_end = torch.cumsum(per_expert, 0)  # [E]
    t = torch.arange(triton.cdiv(num_rows, block_m) + E, device=ends.device)  # [n]
    expert = torch.searchsorted(tile_end, t, right=True)  # [n]: E past the last tile in use
    e = expert.clamp(max=E - 1)
    first = (ends - counts)[e] + (t - (tile_end - per_expert)[e]) * block_m  # [n]
    return torch.where(expert < E, expert, -1).to(torch.int32), first.to(torch.int32)


def grouped_matmul(rows: torch.Tensor, weights: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """rows [S, K] sorted by expert, weights [E, K, N], offs [E] int32 → [S, N]: rows of expert e
    (offs[e-1] ≤ row < offs[e]) times weights[e]; torch's grouped_mm's arguments."""
    S, K = rows.shape
    E, _, N = weights.shape
    out = torch.empty(S, N, dtype=rows.dtype, device=rows.device)
    assert rows.stride(1) == 1, "rows: contiguous"
    expert, first = tiles(offs, S)
    grid = (expert.shape[0], triton.cdiv(N, BLOCK_N))
    _grouped_matmul[grid](
        rows, weights, out, expert, first, offs, N, K,
        rows.stride(0), weights.stride(0), weights.stride(1), weights.stride(2), out.stride(0),
        IEEE=rows.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return out
