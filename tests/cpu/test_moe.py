"""engine/moe.py against Hugging Face's own sparse blocks (their loop over experts)."""
import pytest
import torch

from engine.layer_ops import TorchOps
from engine.layers import Dense, dense
from engine.model_runner import ModelRunner
from engine.moe import Experts
from engine.tiny import tiny_model


@pytest.mark.parametrize("arch, renormalize", [("qwen3_moe", True), ("qwen3_moe", False), ("mixtral", True),
                                               ("qwen2_moe", False)])
@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("triton", [False, True])  # torch's grouped_mm; the Triton kernel (interpreted)
def test_experts_equal_the_hugging_face_block(arch: str, renormalize: bool, tokens: int, triton: bool) -> None:
    """One token (most experts get no rows), a few, and more than there are experts; the top-k
    weights renormalized or not (Qwen 3's norm_topk_prob; Mixtral always renormalizes); Qwen 2 MoE's
    gated shared expert."""
    if triton:
        pytest.importorskip("triton")
    model = tiny_model(seed=2, arch=arch)
    block = model.model.layers[1].mlp
    if arch != "mixtral":
        block.gate.norm_topk_prob = renormalize
    experts = Experts.of(block, lambda m: dense(m, "torch"), triton)
    assert experts is not None and experts.renormalize == renormalize and experts.top_k == 2
    assert (experts.shared is not None) == (arch == "qwen2_moe")
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode():
        ref = block(x[None])[0]  # [T, hidden]
        out = experts(x, TorchOps.act_mul)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert out.abs().max() > 0.01  # the experts add something


def test_expert_weights_are_read_in_place_and_dense_layers_stay_dense() -> None:
    """Qwen 3 MoE's mlp_only_layers keep a dense MLP; the experts are views of the checkpoint's tensors."""
    model = tiny_model(seed=2, arch="qwen3_moe")
    runner = ModelRunner(model, num_blocks=8, block_size=16, kernels="torch")
    dense, sparse = (layer.mlp for layer in runner.layers)
    assert isinstance(dense, Dense) and isinstance(sparse, Experts)
    hf = model.model.layers[1].mlp.experts
    assert sparse.gate_up.data_ptr() == hf.gate_up_proj.data_ptr() and sparse.down.data_ptr() == hf.down_proj.data_ptr()
    assert sparse.gate_up.shape == (8, 64, 64) and sparse.down.shape == (8, 32, 64)  # [E, hidden, 2I], [E, I, hidden]
    assert not sparse.triton  # on CPU with torch attention: torch's grouped_mm


def test_the_triton_backend_takes_the_triton_experts_where_torchs_would_read_on_the_host() -> None:
    """With Triton attention (CUDA graphs possible), step 3 is the Triton kernel unless torch's
    grouped_mm keeps its groups on the device (bf16 on sm90/sm100)."""
    pytest.importorskip("triton")
    runner = ModelRunner(tiny_model(seed=2, arch="qwen3_moe"), num_blocks=8, block_size=16, kernels="triton")
    sparse = runner.layers[1].mlp
    assert isinstance(sparse, Experts) and sparse.triton
    assert Experts.triton_for(torch.device("cpu"), torch.bfloat16)
