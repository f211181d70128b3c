"""The experts' grouped matmul over MXFP4 weights, as gpt-oss's checkpoints hold them (engine/moe.py
step 3 where the experts stay quantized: a quarter of bf16's memory — gpt-oss-120b's experts ~61 GB,
not ~230).

MXFP4 (OCP microscaling): each weight is a 4-bit float E2M1 — sign, 2 exponent bits, 1 mantissa bit:
0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives — and each run of 32 along the reduction dim shares a
power-of-two scale, an E8M0 byte (2^(byte − 127)). Layouts (Hugging Face's, `*_blocks` / `*_scales`):
    blocks [E, N, K / 2] uint8: two codes a byte, the even k in the low nibble
    scales [E, N, K / 32] uint8
for rows [S, K] → out [S, N] (rows sorted by expert, offs [E]: engine/triton_moe.py's tiles). Each
program dequantizes a [K, BLOCK_N] slice of its expert's weight tile by tile — even and odd k as two
halves, each multiplied by the rows' even and odd columns, so no interleave — into the rows' dtype
(exact: a code times a power of two is a bf16) and accumulates in fp32, as triton_moe's kernel does.
The same values as Hugging Face's dequantization, so a model's logits match its dequantized self.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.triton_attention import _dot
from engine.triton_moe import BLOCK_M, _tile_rows, tiles

BLOCK_N = 64
BLOCK_K = 64  # a multiple of 32: whole scale groups per tile


@triton.jit
def _fp4(code, scale):
    """E2M1 codes [..] (int32) × their scales' powers of two → float32."""
    mag = code & 7
    e = mag >> 1
    m = (mag & 1).to(tl.float32)
    val = tl.where(e == 0, m * 0.5, (1.0 + m * 0.5) * tl.exp2((e - 1).to(tl.float32)))
    val = tl.where((code & 8) != 0, -val, val)
    return val * tl.exp2((scale - 127).to(tl.float32))


@triton.jit
def _grouped_matmul_mxfp4(
    a_ptr, q_ptr, s_ptr, c_ptr, tile_expert_ptr, tile_first_ptr, ends_ptr, N, K,
    stride_am, stride_qe, stride_qn, stride_se, stride_sn, stride_cm,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e, used, rows, rmask = _tile_rows(tile_expert_ptr, tile_first_ptr, ends_ptr, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cmask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(used, K, 0)
    HALF: tl.constexpr = BLOCK_K // 2
    for k0 in range(0, k_end, BLOCK_K):
        j = k0 // 2 + tl.arange(0, HALF)  # [BK/2] bytes: k = 2j (low nibble) and 2j + 1 (high)
        jmask = 2 * j < K
        byte = tl.load(q_ptr + e * stride_qe + cols[None, :] * stride_qn + j[:, None],
                       mask=jmask[:, None] & cmask[None, :], other=0).to(tl.int32)  # [BK/2, BN]
        scale = tl.load(s_ptr + e * stride_se + cols[None, :] * stride_sn + (2 * j // 32)[:, None],
                        mask=jmask[:, None] & cmask[None, :], other=127).to(tl.int32)
        amask = rmask[:, None] & jmask[None, :]
        a_even = tl.load(a_ptr + rows[:, None] * stride_am + (2 * j)[None, :], mask=amask, other=0.0)  # [BM, BK/2]
        a_odd = tl.load(a_ptr + rows[:, None] * stride_am + (2 * j + 1)[None, :], mask=amask, other=0.0)
        w_even = _fp4(byte & 15, scale).to(a_even.dtype)  # [BK/2, BN]
        w_odd = _fp4(byte >> 4, scale).to(a_odd.dtype)
        acc += _dot(a_even, w_even, IEEE) + _dot(a_odd, w_odd, IEEE)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def grouped_matmul_mxfp4(rows: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                         offs: torch.Tensor) -> torch.Tensor:
    """rows [S, K] sorted by expert, blocks [E, N, K/2] uint8, scales [E, N, K/32] uint8, offs [E]
    int32 → [S, N] in the rows' dtype: rows of expert e times its dequantized weight, transposed."""
    S, K = rows.shape
    E, N, half = blocks.shape
    assert half * 2 == K and scales.shape == (E, N, K // 32) and K % 32 == 0, "MXFP4 weights of another shape"
    assert rows.stride(1) == 1 and blocks.stride(2) == 1 and scales.stride(2) == 1, "contiguous along K"
    out = torch.empty(S, N, dtype=rows.dtype, device=rows.device)
    expert, first = tiles(offs, S)
    grid = (expert.shape[0], triton.cdiv(N, BLOCK_N))
    _grouped_matmul_mxfp4[grid](
        rows, blocks, scales, out, expert, first, offs, N, K,
        rows.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1), out.stride(0),
        IEEE=rows.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return out


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [E, N, K/2], scales [E, N, K/32] → the weights [E, N, K] (a reference: tests, and the
    CPU path)."""
    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                       device=blocks.device)
    codes = torch.stack([blocks & 15, blocks >> 4], dim=-1).flatten(-2).long()  # [E, N, K]
    power = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)  # [E, N, K]
    return (lut[codes] * power).to(dtype)
