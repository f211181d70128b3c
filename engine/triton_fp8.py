"""Linear layers and the experts' grouped matmul over FP8 weights (e4m3), each run of GROUP_K along a
row sharing one scale: half of bf16's memory and of the bytes a decode step reads (engine/fp8.py loads
them; engine/linear.py and engine/moe.py call these). A GPU without an FP8 type reads the codes as
bytes (_e4m3).

FP8 e4m3 ("fn"): sign, 4 exponent bits, 3 mantissa bits, ±448 at most. Checkpoints quantized block-wise
(Qwen 3's and DeepSeek's `quant_method: fp8`, weight_block_size [128, 128]) hold one scale per block
of 128 × 128 weights, `weight_scale_inv` [⌈N/128⌉, ⌈K/128⌉]; here each row has its own copy of its
block's scales ([N, ⌈K/128⌉], ~3 % of the fp8 bytes: engine/fp8_formats.py), so q|k|v and gate|up fuse by
concatenating rows, whatever their blocks, and a weight quantized here (quantize) may scale each row
apart. Weight-only: the rows stay in the activations' dtype. Each program dequantizes a [BLOCK_K,
BLOCK_N] tile of the weight (codes × its rows' scale, in fp32, rounded to the rows' dtype: Hugging
Face's dequantized weight, value for value) and accumulates x · tile in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.triton_attention import _dot
from engine.triton_moe import BLOCK_M, _tile_rows, tiles

GROUP_K = 128  # weights along K sharing a scale
BLOCK_K = 64  # divides GROUP_K: one scale per column and tile
FP8_MAX = 448.0  # e4m3fn's largest finite value


@triton.jit
def _e4m3(w, BITS: tl.constexpr):
    """FP8 e4m3 codes → float32: loaded as float8e4nv (sm_89 and later, the interpreter), or as bytes
    decoded from their bits where the GPU has no such type (BITS: sm_80, an A100) — sign, 4 exponent
    bits (bias 7), 3 mantissa bits; exponent 0: subnormal, m · 2^-9. Exact either way."""
    if BITS:
        b = w.to(tl.int32)
        e = (b >> 3) & 15
        m = b & 7
        normal = (((b & 0x80) << 24) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        sub = m.to(tl.float32) * 0.001953125
        return tl.where(e == 0, tl.where((b & 0x80) != 0, -sub, sub), normal)
    else:
        return w.to(tl.float32)


@triton.jit
def _matmul_fp8(
    x_ptr, w_ptr, s_ptr, b_ptr, c_ptr, M, N, K,
    stride_xm, stride_wn, stride_sn, stride_cm,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, GROUP_K: tl.constexpr, BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rmask, cmask = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        kmask = k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None], mask=kmask[:, None] & cmask[None, :],
                    other=0.0)  # [BK, BN] fp8 (BITS: its bytes)
        s = tl.load(s_ptr + cols * stride_sn + k0 // GROUP_K, mask=cmask, other=0.0)  # [BN] fp32
        acc += _dot(x, (_e4m3(w, BITS) * s[None, :]).to(x.dtype), IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def _blocks(M: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, warps) for M rows: a decode step's few rows in tiles of 16 and narrow columns
    (many programs, each streaming its slice of the weight once), a prompt's in tiles of 64 × 64 —
    for sm_90 (tests/cpu/sm90_compile.py) 130 and 166 registers a thread, no spills, where 64 × 64 on 4
    warps spills and 128 × 128 on 8 does."""
    return (16, 32, 4) if M <= 16 else (64, 64, 8)


def bits(device: torch.device) -> bool:
    """Whether this device's kernels read FP8 codes as bytes (_e4m3's BITS): a GPU before sm_89."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)


def matmul_fp8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               as_bytes: bool | None = None) -> torch.Tensor:
    """x [M, K] · dequantize(w [N, K] fp8, scale [N, ⌈K/GROUP_K⌉] fp32)ᵀ (+ bias [N]) → [M, N] in x's dtype.
    as_bytes: the codes read as bytes (default: bits(device))."""
    M, K = x.shape
    N = w.shape[0]
    assert w.shape[1] == K and scale.shape == (N, triton.cdiv(K, GROUP_K)), "FP8 weights of another shape"
    x = x if x.stride(1) == 1 else x.contiguous()
    assert w.stride(1) == 1 and scale.stride(1) == 1, "contiguous along K"
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bm, bn, warps = _blocks(M)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    as_bytes = bits(x.device) if as_bytes is None else as_bytes
    _matmul_fp8[grid](
        x, w.view(torch.uint8) if as_bytes else w, scale, bias if bias is not None else scale, out, M, N, K,
        x.stride(0), w.stride(0), scale.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, GROUP_K=GROUP_K, BITS=as_bytes,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K, num_warps=warps,
    )
    return out


@triton.jit
def _grouped_matmul_fp8(
    a_ptr, w_ptr, s_ptr, c_ptr, tile_expert_ptr, tile_first_ptr, ends_ptr, N, K,
    stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_cm,
    IEEE: tl.constexpr, GROUP_K: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The experts' grouped matmul (engine/triton_moe.py's tiles) over FP8 weights, each tile of the
    weight dequantized as _matmul_fp8's."""
    e, used, rows, rmask = _tile_rows(tile_expert_ptr, tile_first_ptr, ends_ptr, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cmask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.where(used, K, 0), BLOCK_K):  # an unused tile reads nothing
        k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        kmask = k < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + e * stride_we + cols[None, :] * stride_wn + k[:, None],
                    mask=kmask[:, None] & cmask[None, :], other=0.0)  # [BK, BN] fp8 (BITS: its bytes)
        s = tl.load(s_ptr + e * stride_se + cols * stride_sn + k0 // GROUP_K, mask=cmask, other=0.0)  # [BN]
        acc += _dot(a, (_e4m3(w, BITS) * s[None, :]).to(a.dtype), IEEE)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def grouped_matmul_fp8(rows: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor,
                       as_bytes: bool | None = None) -> torch.Tensor:
    """rows [S, K] sorted by expert, w [E, N, K] fp8 (Hugging Face's layout), scale [E, N, ⌈K/GROUP_K⌉],
    offs [E] int32 (expert e's rows end at offs[e]) → [S, N]: each row times its expert's weight, dequantized.
    as_bytes: as matmul_fp8's."""
    S, K = rows.shape
    E, N, _ = w.shape
    assert w.shape[2] == K and scale.shape == (E, N, triton.cdiv(K, GROUP_K)), "FP8 expert weights of another shape"
    assert rows.stride(1) == 1 and w.stride(2) == 1 and scale.stride(2) == 1, "contiguous along K"
    out = torch.empty(S, N, dtype=rows.dtype, device=rows.device)
    expert, first = tiles(offs, S)
    as_bytes = bits(rows.device) if as_bytes is None else as_bytes
    _grouped_matmul_fp8[(expert.shape[0], triton.cdiv(N, 32))](
        rows, w.view(torch.uint8) if as_bytes else w, scale, out, expert, first, offs, N, K,
        rows.stride(0), w.stride(0), w.stride(1), scale.stride(0), scale.stride(1), out.stride(0),
        IEEE=rows.dtype == torch.float32, GROUP_K=GROUP_K, BITS=as_bytes, BLOCK_M=BLOCK_M, BLOCK_N=32, BLOCK_K=BLOCK_K,
    )
    return out


def dequantize(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w [..., N, K] fp8, scale [..., N, ⌈K/GROUP_K⌉] → the weight [..., N, K] in dtype (the reference:
    tests; Hugging Face's own forward of a quantized model: engine/fp8.py)."""
    K = w.shape[-1]
    return (w.float() * scale.repeat_interleave(GROUP_K, dim=-1)[..., :K]).to(dtype)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] → (codes [..., N, K] fp8 e4m3fn, scale [..., N, ⌈K/GROUP_K⌉] fp32): each run of
    GROUP_K in a row scaled so its largest magnitude is FP8_MAX."""
    *lead, K = w.shape
    groups = triton.cdiv(K, GROUP_K)
    padded = torch.nn.functional.pad(w.float(), (0, groups * GROUP_K - K)).view(*lead, groups, GROUP_K)
    scale = (padded.abs().amax(dim=-1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # [..., N, G]
    codes = (padded / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes.view(*lead, -1)[..., :K].contiguous(), scale
