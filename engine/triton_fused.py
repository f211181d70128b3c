"""The small ops of a Llama layer fused into one Triton kernel each (the CUDA path's runner).

Between its four matmuls a Hugging Face Llama layer launches ~30 small kernels (RMSNorm alone is
seven: cast, pow, mean, add, rsqrt, mul, mul); at decode batch sizes each is a few microseconds of
a mostly idle GPU, which is most of a decode step above its floor. Here each group is one kernel:
  - `add_rms_norm`: residual add + RMSNorm (the residual stream is written once, the normed rows once);
                   Llama's (weight × the rounded norm), Gemma's ((1 + weight) × the norm, rounded once)
                   or OLMo 2's (weight × the norm, rounded once)
  - `rope_store`:  rotary on q and k (the first dims of each head under partial rotary) + k, v into
                   their cache slots (slot < 0: nothing stored)
  - `act_mul`:     SiLU(gate) * up, or GELU-tanh(gate) * up (Gemma), from the fused gate|up projection
Each rounds where Hugging Face rounds (every torch op on bf16/fp16 computes in fp32 and rounds its
result to the model dtype), so outputs equal the modules' to within a reduction's ordering.
Shapes are in each function's docstring; rows may be strided, the last dimension is contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(
    x_ptr, r_ptr, w_ptr, out_ptr, res_ptr, stride_x, stride_r, N, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0)
    if HAS_RES:  # h = x + residual, rounded as torch's add rounds; it is the new residual stream
        x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + offs, mask=m, other=0.0).to(tl.float32))
        x = x.to(out_ptr.dtype.element_ty)
        tl.store(res_ptr + row * N + offs, x, mask=m)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if KIND == "gemma":  # (norm(x) * (1 + w)).type_as(x): in fp32, one rounding
        tl.store(out_ptr + row * N + offs, (xf * (1.0 / tl.sqrt(var + eps)) * (1.0 + w)).to(out_ptr.dtype.element_ty),
                 mask=m)
    elif KIND == "olmo":  # (w * norm(x)).to(input_dtype): one rounding
        tl.store(out_ptr + row * N + offs, (w * (xf * (1.0 / tl.sqrt(var + eps)))).to(out_ptr.dtype.element_ty),
                 mask=m)
    else:  # w * norm(x).to(input_dtype)
        y = (xf * (1.0 / tl.sqrt(var + eps))).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * N + offs, (w * y.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rounded(v, dtype: tl.constexpr):
    """fp32 v rounded to dtype (to nearest, ties to even) and widened back, as torch rounds an op's
    result. bf16 by integer arithmetic: compiled for an H100, `v.to(bf16).to(fp32)` followed by an add
    was folded into one unrounded fma, and rotary drifted a bf16 ulp from HF in 17 % of elements
    (and Triton's interpreter truncates on that cast).
    (A NaN whose payload sits in the low 16 bits becomes inf; rotary inputs are finite.)"""
    if dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        return u.to(tl.float32, bitcast=True)
    else:
        return v.to(dtype).to(tl.float32)


@triton.jit
def _rotate(x_ptr, stride_h, t, stride_t, c, s, NH, D: tl.constexpr, HALF: tl.constexpr,
            BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAIRS: tl.constexpr):
    """x * cos + rotate_half(x) * sin for the [NH, D] heads of token t, rounded as HF rounds; the
    rotary halves are HALF wide (dims past 2 * HALF have cos 1 and sin 0: x as it is). PAIRS: the
    rotated dims are neighbours (2i, 2i + 1) — GLM's interleaved rotary — not (i, i + HALF)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    m = (h < NH) & (d < D)
    if PAIRS:
        partner = tl.where(d < 2 * HALF, d ^ 1, d - HALF)
        first = d % 2 == 0
    else:
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        first = d < HALF
    base = x_ptr + t * stride_t + h * stride_h
    x = tl.load(base + d, mask=m, other=0.0)
    xp = tl.load(base + partner, mask=m, other=0.0).to(tl.float32)
    rot = tl.where(first, -xp, xp)
    a = _rounded(x.to(tl.float32) * c, x.dtype)
    b = _rounded(rot * s, x.dtype)
    return _rounded(a + b, x.dtype).to(x.dtype), h, d, m  # already representable: the cast is exact


@triton.jit
def _rope_store(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
    H, KVH, D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr,
    BLOCK_D: tl.constexpr, PAIRS: tl.constexpr, FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)[None, :]
    col = dd // 2 if PAIRS else dd  # PAIRS: dims 2i and 2i + 1 take frequency i (the table's first half)
    c = tl.load(cos_ptr + t * stride_ct + col, mask=dd < 2 * HALF, other=1.0).to(tl.float32)  # [1, D]
    s = tl.load(sin_ptr + t * stride_ct + col, mask=dd < 2 * HALF, other=0.0).to(tl.float32)
    q, h, d, m = _rotate(q_ptr, stride_qh, t, stride_qt, c, s, H, D, HALF, BLOCK_H, BLOCK_D, PAIRS)
    tl.store(qo_ptr + t * (H * D) + h * D + d, q, mask=m)
    k, h, d, m = _rotate(k_ptr, stride_kh, t, stride_kt, c, s, KVH, D, HALF, BLOCK_KVH, BLOCK_D, PAIRS)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    m = (h < tl.where(slot >= 0, KVH, 0)) & (d < D)  # a padded row of a CUDA-graph batch stores nothing
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=m, other=0.0)
    tl.store(kc_ptr + slot * (KVH * D) + h * D + d, _cached(k, FP8).to(kc_ptr.dtype.element_ty), mask=m)
    tl.store(vc_ptr + slot * (KVH * D) + h * D + d, _cached(v, FP8).to(vc_ptr.dtype.element_ty), mask=m)


@triton.jit
def _cached(x, FP8: tl.constexpr):
    """x as the cache holds it: for an FP8 cache, the nearest e4m3 value (ties to even) of x clamped to
    ±448 — torch's .to(float8_e4m3fn) of the clamped values, bit for bit. Rounded here in fp32 (ulp
    2^(x's exponent − 3), at least e4m3's subnormal step 2^-9; 1.5·2^23 added and taken away rounds
    |x| / ulp to an integer, ties to even), so the conversion after is exact: Triton's interpreter drops the carry when a
    mantissa rounds up into the next exponent (124.78 → 64, not 128)."""
    if FP8:
        x = tl.clamp(x.to(tl.float32), -448.0, 448.0)
        bits = x.to(tl.int32, bitcast=True)
        ulp = ((tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
        r = ((tl.abs(x) / ulp + 12582912.0) - 12582912.0) * ulp
        return tl.where(bits < 0, -r, r)  # the sign bit: -0.0 stays -0.0, as in torch
    else:
        return x


@triton.jit
def _act_mul(x_ptr, out_ptr, stride_x, N, BLOCK: tl.constexpr, GELU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + N + offs, mask=m, other=0.0).to(tl.float32)
    if GELU:  # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), tanh(z) = 1 - 2 / (exp(2z) + 1)
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = (0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))).to(out_ptr.dtype.element_ty).to(tl.float32)
    else:
        act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (act * u).to(out_ptr.dtype.element_ty), mask=m)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, kind: str = "llama"
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, N] → (RMSNorm(x + residual) * weight, x + residual), both [T, N]; residual None:
    (RMSNorm(x) * weight, x). kind: "llama" (the norm rounded, then × weight), "gemma" (× (1 + weight),
    rounded once), "olmo" (× weight, rounded once)."""
    T, N = x.shape
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    res = torch.empty_like(out) if residual is not None else x
    if T:
        r = residual if residual is not None else x
        _add_rms_norm[(T,)](x, r, weight, out, res, x.stride(0), r.stride(0), N, eps,
                            HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(N), KIND=kind)
    return out, res


def rope_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, interleaved: bool = False,
) -> torch.Tensor:
    """q [T, H, D], k and v [T, KVH, D], cos and sin [T, R] (the model's rotary tables at each token's
    position; R < D: partial rotary, the first R dims of each head rotate; `interleaved`: in pairs of
    neighbouring dims, GLM's) → rotated q [T, H, D];
    rotated k and v go to cache slots [T] of k_cache, v_cache [num_blocks, block_size, KVH, D] (contiguous;
    FP8 e4m3: kv_cache.dtype fp8, the values clamped to ±448 and rounded, no scale)."""
    T, H, D = q.shape
    KVH, R = k.shape[1], cos.shape[-1]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and R % 2 == 0 and R <= D
    q_out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if T:
        _rope_store[(T,)](
            q, k, v, cos, sin, q_out, k_cache, v_cache, slots,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            H, KVH, D=D, HALF=R // 2, BLOCK_H=triton.next_power_of_2(H), BLOCK_KVH=triton.next_power_of_2(KVH),
            BLOCK_D=triton.next_power_of_2(D), PAIRS=interleaved, FP8=k_cache.dtype == torch.float8_e4m3fn,
        )
    return q_out


def act_mul(gate_up: torch.Tensor, gelu: bool = False, block: int = 1024) -> torch.Tensor:
    """gate_up [T, 2 * I] (gate | up) → SiLU(gate) * up [T, I]; gelu: GELU-tanh(gate) * up (Gemma's)."""
    T, two_i = gate_up.shape
    n = two_i // 2
    out = torch.empty(T, n, dtype=gate_up.dtype, device=gate_up.device)
    if T:
        _act_mul[(T, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), n, BLOCK=block, GELU=gelu)
    return out
