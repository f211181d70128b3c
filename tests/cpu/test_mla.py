"""DeepSeek's latent attention (engine/mla.py, engine/triton_mla.py): the cache holds r + R values a
token and layer; the torch path and the Triton kernels (under Triton's interpreter) store the same
bytes and compute Hugging Face's logits — decode absorbed, prompts over expanded keys; the kernels
equal attention written out in torch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.make_model import config as shape_config
from engine import mla
from engine.kv_budget import block_bytes
from engine.model_shape import kv_dims
from engine.model_runner import ModelRunner, SeqInput
from engine.tiny import tiny_model

triton = pytest.importorskip("triton")
from engine import triton_mla  # noqa: E402

FP8 = torch.float8_e4m3fn


def test_a_latent_cache_holds_rank_plus_rope_values_a_token_and_layer() -> None:
    """DeepSeek-V2-Lite (27 layers, 16 heads, latent 512 + rotary 64): 576 values a token and layer,
    as DeepSeek's own cache — the expanded form took 2 × 16 × 192 = 6,144."""
    cfg = shape_config("deepseek-v2-lite")
    assert kv_dims(cfg) == (1, 288)
    assert block_bytes(cfg, 16, torch.bfloat16) == 27 * 16 * 576 * 2
    tiny = tiny_model(4, arch="deepseek_v3")
    runner = ModelRunner(tiny, num_blocks=8, block_size=16, kernels="torch")
    c = tiny.config
    assert runner.kv.shape == (c.num_hidden_layers, 2, 8, 16, 1, (c.kv_lora_rank + c.qk_rope_head_dim) // 2)
    assert runner.describe().startswith("deepseek_v3: 2 layers, 4 heads over latents of 32 + 8, float32 on cpu")


def test_the_halves_of_a_slot_hold_the_latent_and_rotary_key_split_in_two() -> None:
    x = torch.arange(2 * 40.0).view(2, 40)  # r 32, R 8
    k, v = mla.halves(x, 32)
    assert k[0].tolist() == [*range(16), *range(32, 36)] and v[0].tolist() == [*range(16, 32), *range(36, 40)]
    assert torch.equal(mla.whole(k, v, 32), x)


def _prompt(vocab: int, seed: int, n: int) -> list[int]:
    return [(7 * i + seed) % (vocab - 3) + 3 for i in range(n)]


def _steps(vocab: int) -> list[list[SeqInput]]:
    """Two prompts (one in two chunks), a decode row beside a new prompt, then three decode rows — the
    first continuing _prompt(vocab, 1, 45) with token 4."""
    a, b, c = _prompt(vocab, 1, 45), _prompt(vocab, 2, 11), _prompt(vocab, 5, 20)
    return [[SeqInput(a[:24], 0, [5, 1]), SeqInput(b, 0, [2])], [SeqInput(a[24:], 24, [5, 1, 7])],
            [SeqInput([9], 11, [2]), SeqInput(c, 0, [0, 3])],
            [SeqInput([4], 45, [5, 1, 7]), SeqInput([6], 12, [2]), SeqInput([8], 20, [0, 3])]]


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_the_torch_path_and_the_triton_kernels_store_the_same_cache_and_compute_the_same_logits(arch: str) -> None:
    """Packed prompts, a later chunk, a mixed step and a decode batch: the two backends' logits agree
    step by step and their caches are equal (so a worker of one can decode what the other prefilled);
    the last step's first row is Hugging Face's."""
    model = tiny_model(4, arch=arch)
    vocab = model.config.vocab_size
    runners = [ModelRunner(model, num_blocks=8, block_size=16, kernels=k) for k in ("torch", "triton")]
    assert [r.attn.name for r in runners] == ["sdpa", "triton"]
    for seqs in _steps(vocab):
        got = [r.forward(seqs) for r in runners]
        torch.testing.assert_close(got[1], got[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(runners[1].kv, runners[0].kv, atol=1e-5, rtol=1e-5)  # (layer 1: after layer 0 rounds)
    with torch.inference_mode():
        want = model(torch.tensor([_prompt(vocab, 1, 45) + [4]])).logits[0, -1]
    torch.testing.assert_close(got[0][0], want, atol=5e-5, rtol=1e-4)


def _reference(q: torch.Tensor, keys: torch.Tensor, qpos: torch.Tensor, r: int, scale: float) -> torch.Tensor:
    """q [n, H, r + R] over keys [ctx, r + R] (values: their first r dims), query i seeing keys <= qpos[i]."""
    mask = torch.arange(keys.shape[0], device=keys.device)[None, :] <= qpos[:, None]  # [n, ctx]
    return F.scaled_dot_product_attention(q.transpose(0, 1), keys[None], keys[None, :, :r], attn_mask=mask,
                                          scale=scale).transpose(0, 1)  # [n, H, r]


@pytest.mark.parametrize("dtype", [torch.float32, FP8])
@pytest.mark.parametrize("splits", [1, 3])
def test_the_latent_decode_kernel_equals_attention_written_out(splits: int, dtype: torch.dtype) -> None:
    """Decode (split or not; a padded row of context 0 gives zeros; 20 heads: two blocks of 16, the
    second partly empty) over blocks out of order == SDPA over the whole keys; an FP8 cache == a
    float32 one holding its values."""
    g = torch.Generator().manual_seed(splits)
    H, r, R, bs = 20, 32, 8, 16
    kc = (torch.randn(8, bs, 1, (r + R) // 2, generator=g) * 2).to(dtype)
    vc = (torch.randn(8, bs, 1, (r + R) // 2, generator=g) * 2).to(dtype)
    tables = torch.tensor([[3, 1, 6, 0], [2, 5, 0, 0], [0, 0, 0, 0]])
    lens = torch.tensor([50, 20, 0])
    keys = [mla.whole(kc.float()[t].view(-1, (r + R) // 2), vc.float()[t].view(-1, (r + R) // 2), r) for t in tables]
    q = torch.randn(3, H, r + R, generator=g)
    got = triton_mla.decode(q, kc, vc, tables, lens, 0.3, R, splits=splits)
    for i in range(2):
        want = _reference(q[i : i + 1], keys[i][: lens[i]], lens[i : i + 1] - 1, r, 0.3)
        torch.testing.assert_close(got[i : i + 1], want, atol=1e-5, rtol=1e-5)
    assert not got[2].any()


def test_prompt_rows_read_their_latents_through_a_scratch_table_of_their_own() -> None:
    """mla.scratch: sequence i's positions [0, ctx_i) at consecutive scratch slots from its first
    scratch block, each the cache slot its block table gives."""
    seqs = [SeqInput(list(range(5)), 20, [7, 2]), SeqInput([1, 2, 3], 0, [4])]  # contexts 25 and 3, blocks of 16
    slots, tables = mla.scratch(seqs, 16)
    assert tables.tolist() == [[0, 1], [2, 0]]
    assert slots.tolist() == [*range(7 * 16, 8 * 16), *range(2 * 16, 3 * 16), *range(4 * 16, 5 * 16)]


def test_rope_store_puts_the_rotated_latent_key_in_the_slot_halves_and_a_padded_row_nowhere() -> None:
    """q_pe, a strided view of the q projection, rotates in place (q_nope untouched); the key's rotary
    dims are rotated as q's are, its latent copied; FP8: each value rounded as torch rounds it; slot -1
    stores nothing."""
    g = torch.Generator().manual_seed(0)
    T, H, nope, r, R = 3, 4, 16, 32, 8
    angle = torch.rand(T, R // 2, generator=g) * 6
    cos, sin = torch.cat([angle.cos()] * 2, dim=-1), torch.cat([angle.sin()] * 2, dim=-1)  # [T, R]
    q, kvec = torch.randn(T, H, nope + R, generator=g), torch.randn(T, r + R, generator=g) * 100
    slots = torch.tensor([5, -1, 17])
    c, s = angle.cos(), angle.sin()

    def rotated(x: torch.Tensor) -> torch.Tensor:  # [..., T, R/2, 2] pairs of neighbouring dims → [..., R]
        return torch.stack([x[..., 0] * c - x[..., 1] * s, x[..., 1] * c + x[..., 0] * s], -1).flatten(-2)

    for dtype in (torch.float32, FP8):
        kc, vc = (torch.zeros(2, 16, 1, (r + R) // 2, dtype=dtype) for _ in range(2))
        got = q.clone()
        triton_mla.rope_store(got[..., nope:], kvec, cos, sin, kc, vc, slots, interleaved=True)
        want_q = rotated(q[..., nope:].reshape(T, H, R // 2, 2).transpose(0, 1)).transpose(0, 1)  # [T, H, R]
        torch.testing.assert_close(got, torch.cat([q[..., :nope], want_q], dim=-1))
        k = torch.cat([kvec[:, :r], rotated(kvec[:, r:].view(T, R // 2, 2))], dim=-1)
        want_k, want_v = mla.halves(k, r)
        if dtype == FP8:
            want_k, want_v = (w.clamp(-448, 448).to(FP8).float() for w in (want_k, want_v))
        flat_k, flat_v = kc.float().view(-1, (r + R) // 2), vc.float().view(-1, (r + R) // 2)
        torch.testing.assert_close(flat_k[[5, 17]], want_k[[0, 2]], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(flat_v[[5, 17]], want_v[[0, 2]], atol=1e-4, rtol=1e-5)
        assert flat_k.count_nonzero(dim=1).nonzero().view(-1).tolist() == [5, 17]


def test_a_latent_runner_with_an_fp8_cache_computes_as_over_latents_rounded_to_fp8(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kv_cache.dtype fp8 on DeepSeek: the logits equal those of a float32 cache whose stored latents
    torch rounds to FP8, and its bytes are that rounding."""
    model = tiny_model(4, arch="deepseek_v2")
    fp8 = ModelRunner(model, num_blocks=8, block_size=16, kernels="triton", kv_dtype=FP8)
    ref = ModelRunner(model, num_blocks=8, block_size=16, kernels="triton")
    rounding_latent_store(monkeypatch)
    for seqs in _steps(model.config.vocab_size):
        torch.testing.assert_close(fp8.forward(seqs), ref.forward(seqs), atol=1e-5, rtol=1e-5)
    assert torch.equal(fp8.kv.float(), ref.kv)


def rounding_latent_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """triton_mla.rope_store into a float32 cache, then each stored latent replaced by torch's FP8 rounding of it."""
    store = triton_mla.rope_store

    def rounded(q_pe, kvec, cos, sin, kc, vc, slots, interleaved=False):  # type: ignore[no-untyped-def]
        store(q_pe, kvec, cos, sin, kc, vc, slots, interleaved)
        if kc.dtype == torch.float32:
            live = slots[slots >= 0]
            for c in (kc.view(-1, kc.shape[-1]), vc.view(-1, vc.shape[-1])):
                c[live] = c[live].clamp(-448, 448).to(FP8).float()

    monkeypatch.setattr(triton_mla, "rope_store", rounded)
