"""The fused layer ops of the CUDA path (engine/triton_fused.py), run by Triton's interpreter on CPU,
against the Hugging Face modules they replace: RMSNorm (Llama's, Gemma's and OLMo 2's roundings, with and
without the residual add), rotary
on q and k (whole heads, part of each: Phi 4 mini, neighbouring pairs: GLM 4) with the cache store,
SiLU(gate) * up and GELU-tanh(gate) * up (Gemma). fp32 and fp16 (whose rounding steps the kernels
reproduce); strided rows as the runner passes them (views into the fused qkv / gate|up outputs)."""
import pytest
import torch
from transformers.activations import GELUTanh
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
from transformers.models.phi3.configuration_phi3 import Phi3Config
from transformers.models.glm4.configuration_glm4 import Glm4Config
from transformers.models.glm4.modeling_glm4 import Glm4RotaryEmbedding
from transformers.models.glm4.modeling_glm4 import apply_rotary_pos_emb as glm_rotary  # pairs of neighbouring dims
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding, apply_rotary_pos_emb  # (whole or part of a head)

fused = pytest.importorskip("engine.triton_fused")
from engine.layer_ops import TritonOps, _norm_kind  # noqa: E402 (needs triton)

DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3)]


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("kind", ["llama", "gemma", "olmo"])
def test_add_rms_norm_equals_residual_add_then_the_models_rms_norm(dtype: torch.dtype, tol: float, with_residual: bool,
                                                                 kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    N = 96  # not a power of two: the tile is masked
    norm = {"llama": LlamaRMSNorm, "gemma": Gemma3RMSNorm, "olmo": Olmo2RMSNorm}[kind](N, eps=1e-5).to(dtype)
    norm.weight.data = ((0 if kind == "gemma" else 1) + 0.3 * torch.randn(N, generator=g)).to(dtype)
    wide = (3 * torch.randn(7, 2 * N, generator=g)).to(dtype)
    x = wide[:, :N]  # strided rows
    residual = torch.randn(7, N, generator=g).to(dtype) if with_residual else None
    ops = TritonOps()
    assert _norm_kind(norm) == kind
    out, res = ops.norm(norm, x, residual)
    h = x + residual if residual is not None else x
    torch.testing.assert_close(res, h, atol=0, rtol=0)  # the residual stream: exactly torch's add
    torch.testing.assert_close(out, norm(h), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", DTYPES + [(torch.bfloat16, 0.0)])  # bf16: each product rounded, exact
@pytest.mark.parametrize("H,KVH,D,partial,pairs", [(4, 2, 32, 1.0, False), (6, 1, 80, 1.0, False),
                                                   (4, 2, 32, 0.75, False), (4, 2, 32, 0.5, True)])
def test_rope_store_equals_hf_rotary_and_stores_k_v_at_their_slots(
    dtype: torch.dtype, tol: float, H: int, KVH: int, D: int, partial: float, pairs: bool
) -> None:
    """Rotary over halves (Llama), over part of each head (Phi 4 mini), over neighbouring pairs in
    half of each head (GLM 4)."""
    g = torch.Generator().manual_seed(H * D)
    T, nb, bs = 5, 6, 4
    cfg = (Glm4Config if pairs else Phi3Config)(
        hidden_size=H * D, num_attention_heads=H, num_key_value_heads=KVH, head_dim=D, max_position_embeddings=256,
        rope_theta=10000.0, partial_rotary_factor=partial)
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g).to(dtype)  # as the fused projection returns it
    q = qkv[:, : H * D].view(T, H, D)
    k = qkv[:, H * D : (H + KVH) * D].view(T, KVH, D)
    v = qkv[:, (H + KVH) * D :].view(T, KVH, D)
    pos = torch.tensor([0, 3, 17, 100, 200])
    cos, sin = (Glm4RotaryEmbedding if pairs else Phi3RotaryEmbedding)(cfg)(qkv.unsqueeze(0), pos.unsqueeze(0))  # [1, T, D * partial] in dtype
    assert cos.shape[-1] == int(D * partial)
    slots = torch.tensor([5, -1, 0, 23, 9])  # a padded row (-1) stores nothing
    kc = torch.zeros(nb, bs, KVH, D, dtype=dtype)
    vc = torch.zeros_like(kc)
    q_out = fused.rope_store(q, k, v, cos[0], sin[0], kc, vc, slots, interleaved=pairs)

    q_ref, k_ref = (glm_rotary if pairs else apply_rotary_pos_emb)(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(q_out, q_ref[0].transpose(0, 1), atol=tol, rtol=tol)
    k_ref = k_ref[0].transpose(0, 1)  # [T, KVH, D]
    flat_k, flat_v = kc.view(nb * bs, KVH, D), vc.view(nb * bs, KVH, D)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            torch.testing.assert_close(flat_k[slot], k_ref[t], atol=tol, rtol=tol)
            torch.testing.assert_close(flat_v[slot], v[t], atol=0, rtol=0)
    untouched = sorted(set(range(nb * bs)) - {s for s in slots.tolist() if s >= 0})
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("gelu", [False, True])
def test_act_mul_equals_act_of_gate_times_up(dtype: torch.dtype, tol: float, gelu: bool) -> None:
    g = torch.Generator().manual_seed(3)
    n = 1500  # more than one block of 1024, not a multiple of it
    wide = (2 * torch.randn(3, 2 * n + 8, generator=g)).to(dtype)
    gate_up = wide[:, : 2 * n]  # strided rows
    gate, up = gate_up.chunk(2, dim=-1)
    act = GELUTanh() if gelu else torch.nn.SiLU()  # Gemma's (its hidden_activation), Llama's
    torch.testing.assert_close(fused.act_mul(gate_up, gelu), act(gate) * up, atol=tol, rtol=tol)
