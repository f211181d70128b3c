"""The experts' Triton grouped matmul (engine/triton_moe.py) under Triton's interpreter, against
torch's grouped_mm: experts with no rows, one row, more rows than a tile; dimensions that are not
multiples of the tiles; Hugging Face's transposed weight views. (bf16 is left to the GPU tests:
the interpreter's bf16 tl.dot is wrong even for a bare 16×16 product.)"""
import pytest
import torch

moe_kernel = pytest.importorskip("engine.triton_moe")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("S, K, N, E", [(1, 32, 64, 8), (5, 64, 96, 4), (40, 80, 72, 8), (70, 64, 128, 3)])
def test_equals_torch_grouped_mm(dtype: torch.dtype, tol: float, S: int, K: int, N: int, E: int) -> None:
    g = torch.Generator().manual_seed(S)
    rows = torch.randn(S, K, generator=g).to(dtype)
    weights = torch.randn(E, N, K, generator=g).to(dtype).transpose(1, 2)  # [E, K, N], as moe.Experts holds them
    experts = torch.sort(torch.randint(0, E, (S,), generator=g)).values
    ends = torch.cumsum(torch.bincount(experts, minlength=E), 0).to(torch.int32)
    out = moe_kernel.grouped_matmul(rows, weights, ends)
    ref = torch.nn.functional.grouped_mm(rows, weights, offs=ends)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_tiles_never_span_two_experts_and_unused_ones_say_so() -> None:
    """Experts with 3, 0 and 17 rows, tiles of 16: expert 0's one tile, expert 2's two (at rows 3 and 19)."""
    expert, first = moe_kernel.tiles(torch.tensor([3, 3, 20], dtype=torch.int32), 20, block_m=16)
    assert expert.tolist() == [0, 2, 2, -1, -1] and first.tolist()[:3] == [0, 3, 19]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("S, K, N, E", [(1, 32, 64, 8), (25, 96, 80, 4), (70, 64, 130, 3)])
def test_mxfp4_matmul_equals_the_dequantized_weights(dtype: torch.dtype, tol: float, S: int, K: int, N: int,
                                                     E: int) -> None:
    """gpt-oss's experts kept in MXFP4 (engine/triton_mxfp4.py): every code and scale a byte may hold,
    against torch's grouped_mm over the weights they stand for — which are Hugging Face's own
    dequantization of the same bytes."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    mx = pytest.importorskip("engine.triton_mxfp4")
    g = torch.Generator().manual_seed(S + K)
    blocks = torch.randint(0, 256, (E, N, K // 2), generator=g, dtype=torch.uint8)
    scales = torch.randint(122, 130, (E, N, K // 32), generator=g, dtype=torch.uint8)
    weights = mx.dequantize(blocks, scales, torch.float32)  # [E, N, K]
    hf = convert_moe_packed_tensors(blocks.view(E, N, K // 32, 16), scales, dtype=torch.float32)  # [E, K, N]
    assert torch.equal(hf, weights.transpose(1, 2))
    rows = torch.randn(S, K, generator=g).to(dtype)
    experts = torch.sort(torch.randint(0, E, (S,), generator=g)).values
    ends = torch.cumsum(torch.bincount(experts, minlength=E), 0).to(torch.int32)
    out = mx.grouped_matmul_mxfp4(rows, blocks, scales, ends)
    ref = torch.nn.functional.grouped_mm(rows.float(), weights.transpose(1, 2), offs=ends)
    torch.testing.assert_close(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
