"""FP8 checkpoints (quant_method fp8, block scales: Qwen 3's *-FP8): dequantized as they load off CUDA,
kept in FP8 on CUDA (engine/fp8.py) and multiplied by a Triton kernel (engine/triton_fp8.py) — here
under Triton's interpreter, on CPU, the same loader and kernel."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from engine import fp8
from engine.config import ModelConfig
from engine.model_loader import ModelLoadError, load_model
from engine.model_runner import ModelRunner, SeqInput
from engine.tiny import tiny_model, tiny_tokenizer
from engine.triton_fp8 import FP8_MAX, dequantize, matmul_fp8, quantize


def test_every_e4m3_code_reads_as_torch_s_value_natively_and_as_bytes() -> None:
    """The kernels read FP8 codes as float8e4nv (sm_89+) or, where a GPU has no such type (an A100), as
    bytes decoded from their bits: all 254 finite codes, both ways, through x = I."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = torch.where((codes & 0x7F) == 0x7F, 0, codes).view(2, 128).view(torch.float8_e4m3fn)  # [2, 128], no NaN
    eye, ones = torch.eye(128), torch.ones(2, 1)
    for as_bytes in (False, True):
        assert torch.equal(matmul_fp8(eye, codes, ones, None, as_bytes=as_bytes), codes.float().T)


@pytest.mark.parametrize("as_bytes", [False, True])
@pytest.mark.parametrize("M, N, K, bias", [(1, 96, 200, True), (16, 130, 64, False), (20, 64, 256, True),
                                           (70, 40, 300, False)])
def test_fp8_matmul_equals_torch_on_the_dequantized_weights(M: int, N: int, K: int, bias: bool, as_bytes: bool) -> None:
    torch.manual_seed(M)
    w, x = torch.randn(N, K), torch.randn(M, K)
    w[:, -1] = 40.0  # one group's scale unlike the others'
    b = torch.randn(N) if bias else None
    codes, scale = quantize(w)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (N, math.ceil(K / 128))
    assert codes.float().abs().amax(dim=1).eq(FP8_MAX).all()  # each row's largest weight at the top code
    deq = dequantize(codes, scale, torch.float32)
    assert ((deq - w).abs() <= w.abs() / 16 + scale.repeat_interleave(128, 1)[:, :K] / 2**6).all()  # e4m3: 3 mantissa bits
    torch.testing.assert_close(matmul_fp8(x, codes, scale, b, as_bytes=as_bytes), torch.nn.functional.linear(x, deq, b),
                               atol=1e-4, rtol=1e-5)


def _quantized(w: torch.Tensor, fmt: str, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] → (codes, scales as `fmt` stores them, the weight they stand for): block-wise (`fp8`,
    compressed-tensors' `block`: [⌈N/bn⌉, ⌈K/bk⌉]), per channel ([N, 1]) or per tensor ([1]); the
    scales varied so no two blocks or rows share one."""
    (N, K), (bn, bk) = w.shape, block
    if fmt in ("channel", "fbgemm", "tensor"):
        bn, bk = (N, K) if fmt == "tensor" else (1, K)
    blocks = torch.nn.functional.pad(w, (0, -K % bk, 0, -N % bn))
    blocks = blocks.view(blocks.shape[0] // bn, bn, -1, bk)  # [N/bn, bn, K/bk, bk]
    s = blocks.abs().amax(dim=(1, 3)) / FP8_MAX * torch.rand(blocks.shape[0], blocks.shape[2]).add(1)
    codes = (blocks / s[:, None, :, None]).to(torch.float8_e4m3fn)
    deq = (codes.float() * s[:, None, :, None]).view(s.shape[0] * bn, -1)[:N, :K].contiguous()
    return codes.view(s.shape[0] * bn, -1)[:N, :K].contiguous(), s.reshape(-1) if fmt == "tensor" else s, deq


FORMATS = {  # fmt → (quantization_config, the scales' name, tensors a module also holds that the loader drops)
    "fp8": ({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3"}, "weight_scale_inv", ()),
    "channel": ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                 "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
                     "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}}}},
                "weight_scale", ()),
    "tensor": ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                    "num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}}}},
               "weight_scale", ("input_scale",)),
    "block": ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
               "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                   "num_bits": 8, "type": "float", "strategy": "block", "block_structure": [32, 128],
                   "symmetric": True, "dynamic": False}}}}, "weight_scale", ()),
    "fbgemm": ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]},
               "weight_scale", ("input_scale_ub",)),
}


def _fp8_checkpoint(folder: Path, block: tuple[int, int] = (32, 128), arch: str = "qwen3", fmt: str = "fp8") -> torch.nn.Module:
    """A tiny folder whose decoder's linear layers (a mixture of experts': its experts too, stored one by
    one) are FP8 as `fmt` (FORMATS) holds them — `fp8`: as Qwen's *-FP8 releases, weight e4m3 and
    weight_scale_inv per block of `block`; → the model with the weights those codes stand for (what it
    must compute as)."""
    config, scale_name, extras = FORMATS[fmt]
    folder.mkdir(parents=True, exist_ok=True)
    want = tiny_model(seed=3, arch=arch)
    tied = want.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in want.state_dict().items() if not (tied and k == "lm_head.weight")}

    def put(prefix: str, w: torch.Tensor) -> torch.Tensor:
        state[prefix + ".weight"], state[f"{prefix}.{scale_name}"], deq = _quantized(w, fmt, block)
        state.update({f"{prefix}.{x}": torch.tensor([1200.0]) for x in extras})
        return deq

    for name, m in want.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head" and not name.endswith(".gate"):  # (not routers)
            m.weight.data = put(name, m.weight.data)
        if name.endswith(".experts"):  # [E, 2I, hidden], [E, hidden, I] → gate, up, down of each expert
            gate_up, down = state.pop(name + ".gate_up_proj"), state.pop(name + ".down_proj")
            inter = gate_up.shape[1] // 2
            for e in range(gate_up.shape[0]):
                for proj, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, None)), ("down_proj", None)):
                    deq = put(f"{name}.{e}.{proj}", down[e] if rows is None else gate_up[e, rows])
                    (m.down_proj.data[e] if rows is None else m.gate_up_proj.data[e, rows]).copy_(deq)
    save_file(state, folder / "model.safetensors")
    quant = {**config, **({"weight_block_size": list(block)} if fmt == "fp8" else {})}
    (folder / "config.json").write_text(json.dumps({**want.config.to_dict(), "architectures": [type(want).__name__],
                                                    "quantization_config": quant}))
    tiny_tokenizer().save_pretrained(folder)
    return want


def _computes_as(want: torch.nn.Module, model: torch.nn.Module, runner: ModelRunner) -> None:
    """Hugging Face's forward of `model` over a prompt, and the runner's logits of that prompt less its
    last token then of that token as a decode step, are want's."""
    prompt = list(range(3, 40))
    with torch.inference_mode():
        ref = want(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(model(torch.tensor([prompt])).logits[0], ref, atol=5e-5, rtol=1e-4)
    for got, row in zip(_logits(runner, prompt), ref[-2:]):
        torch.testing.assert_close(got, row, atol=5e-5, rtol=1e-4)


def _logits(runner: ModelRunner, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The last logits of a prompt less its last token, then of that token as a decode step."""
    with torch.inference_mode():
        return (runner.forward([SeqInput(prompt[:-1], 0, [0, 1, 2])])[0],
                runner.forward([SeqInput(prompt[-1:], len(prompt) - 1, [0, 1, 2])])[0])


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_an_fp8_checkpoint_loads_dequantized_off_cuda_and_runs_as_hf(tmp_path: Path, arch: str) -> None:
    """Off CUDA an FP8 checkpoint loads as the weights its codes stand for (a mixture of experts' stored
    one by one: Hugging Face fuses them as it loads)."""
    want = _fp8_checkpoint(tmp_path, arch=arch)
    assert fp8.reads(AutoConfig.from_pretrained(tmp_path), "cuda") and not fp8.reads(AutoConfig.from_pretrained(tmp_path), "cpu")
    model = load_model(ModelConfig(path=str(tmp_path)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in want.state_dict().items())
    _computes_as(want, model, ModelRunner(model, num_blocks=8, block_size=16, kernels="auto"))


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "deepseek_v2"])
def test_fp8_weights_kept_run_as_their_dequantized_selves(tmp_path: Path, arch: str) -> None:
    """On CUDA an FP8 checkpoint's linear layers stay FP8 (half of bf16's bytes) with one row of block
    scales per weight row, fused q|k|v and gate|up too, and experts stored one by one go into fused FP8
    weights; the logits of a prompt and a decode step, the runner's and Hugging Face's own forward's,
    are Hugging Face's on the dequantized weights. An expert missing from the checkpoint is refused."""
    from safetensors.torch import load_file

    from engine.mla import Latent
    from engine.moe import Experts, Fp8

    want = _fp8_checkpoint(tmp_path, arch=arch)
    model = fp8.load(tmp_path, AutoConfig.from_pretrained(tmp_path), torch.float32, "cpu", "eager", keep_fp8=True)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (q.out_features, 1)
    if want.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again
    runner = ModelRunner(model, num_blocks=8, block_size=16, kernels="triton")
    for layer in runner.layers:
        latent = isinstance(layer.qkv, Latent)  # DeepSeek's projections, Hugging Face's modules: FP8 ones
        for lin in (*([] if latent else [layer.qkv]), layer.o_proj, *([] if isinstance(layer.mlp, Experts) else
                                                                    [layer.mlp.gate_up, layer.mlp.down_proj])):
            assert lin.weight.dtype == torch.float8_e4m3fn and lin.scale.shape == (lin.out_features, 1)
        assert not latent or isinstance(layer.qkv.attn.kv_a_proj_with_mqa, fp8.Fp8Linear)
    if arch != "qwen3":
        assert isinstance(runner.layers[1].mlp, Experts) and isinstance(runner.layers[1].mlp.down, Fp8)
    _computes_as(want, model, runner)
    if arch != "qwen3":
        tensors = load_file(tmp_path / "model.safetensors")
        up = tensors.pop("model.layers.1.mlp.experts.3.up_proj.weight")
        save_file(tensors, tmp_path / "model.safetensors")
        with pytest.raises(ValueError, match="model.layers.1.mlp.experts: 7 experts' up_proj.weight in the checkpoint, not 8"):
            fp8.load(tmp_path, AutoConfig.from_pretrained(tmp_path), torch.float32, "cpu", "eager", keep_fp8=True)
        tensors["model.layers.1.mlp.experts.3.up_proj.weight"] = up
        for e in range(8):  # every expert's down_proj scales missing: not left as zeros
            del tensors[f"model.layers.1.mlp.experts.{e}.down_proj.weight_scale_inv"]
        save_file(tensors, tmp_path / "model.safetensors")
        with pytest.raises(ValueError, match="experts' down_proj.weight_scale_inv in the checkpoint, not 8"):
            fp8.load(tmp_path, AutoConfig.from_pretrained(tmp_path), torch.float32, "cpu", "eager", keep_fp8=True)


def test_which_fp8_checkpoints_stay_fp8_and_what_is_refused(tmp_path: Path) -> None:
    _fp8_checkpoint(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert fp8.reads(config, "cuda") and not fp8.reads(config, "cpu")
    config.quantization_config["weight_block_size"] = [128, 64]  # scales not per 128 along K: dequantized
    assert not fp8.reads(config, "cuda")
    moe = tiny_model(arch="granitemoe").config
    moe.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    assert not fp8.reads(moe, "cuda")  # experts stored fused (not one by one): dequantized
    state = json.loads((tmp_path / "config.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj: an FP8 weight without its weight_scale_inv"):
        fp8.load(tmp_path, AutoConfig.from_pretrained(tmp_path), torch.float32, "cpu", "eager", keep_fp8=True)
    state["quantization_config"]["quant_method"] = "gptq"
    (tmp_path / "config.json").write_text(json.dumps(state))
    with pytest.raises(ModelLoadError, match="quantized \\(gptq\\)"):
        load_model(ModelConfig(path=str(tmp_path)))


def dequantize_into(want: torch.nn.Module, model: torch.nn.Module) -> None:
    """want (a copy of `model` before fp8.quantize_model) gets the weights model's codes stand for; the
    modules left unquantized are checked to be so."""
    for (name, m), w in zip(model.named_modules(), want.modules()):
        if isinstance(m, fp8.Fp8Linear):
            w.weight.data = dequantize(m.weight, m.weight_scale, w.weight.dtype)
        elif hasattr(m, "gate_up_proj_scale"):
            for p in fp8.EXPERT_WEIGHTS:
                getattr(w, p).data = dequantize(getattr(m, p), getattr(m, p + "_scale"), getattr(w, p).dtype)
        elif isinstance(m, torch.nn.Linear) or name.endswith(".experts"):  # left as they were
            assert all(p.dtype != torch.float8_e4m3fn for p in m.parameters()), name


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "deepseek_v2", "qwen2_moe", "gpt_oss"])
def test_model_quantization_fp8_quantizes_the_layers_the_runner_computes(arch: str) -> None:
    """model.quantization: fp8 (cuda only: refused elsewhere) quantizes as the model loads each layer's
    attention projections (DeepSeek's latent ones too), dense MLP or shared experts, and experts'
    3D weights — not routers, gates, gpt-oss's experts (its own layout), embeddings or the LM head.
    Hugging Face's forward of the quantized model and the runner's logits are the model's with those
    weights dequantized (the loader's path, here on CPU under the interpreter)."""
    import copy

    from pydantic import ValidationError

    from engine.moe import Experts, Fp8

    with pytest.raises(ValidationError, match="model.quantization: fp8 needs model.device: cuda"):
        ModelConfig(quantization="fp8")
    model = load_model(ModelConfig.model_construct(**{**ModelConfig(path="tiny").model_dump(), "quantization": "fp8"}))
    assert isinstance(model.model.layers[0].mlp.down_proj, fp8.Fp8Linear)
    model = tiny_model(seed=5, arch=arch)
    want = copy.deepcopy(model)
    n = fp8.quantize_model(model)
    # linear layers + experts' two weights: attention's 4 per layer (Llama's 7 with the MLP); the tiny
    # MoEs' first layer is dense but for Qwen 2 MoE's (with a shared expert, its gate left alone)
    assert n == {"llama": 14, "qwen3_moe": 8 + 3 + 2, "deepseek_v2": 8 + 3 + 2 + 3, "qwen2_moe": 8 + 2 * (2 + 3),
                 "gpt_oss": 8}[arch]
    assert fp8.quantize_model(model) == 0  # FP8 already
    dequantize_into(want, model)
    runner = ModelRunner(model, num_blocks=8, block_size=16, kernels="triton")
    if arch in ("qwen3_moe", "qwen2_moe", "deepseek_v2"):
        assert any(isinstance(layer.mlp, Experts) and isinstance(layer.mlp.gate_up, Fp8) for layer in runner.layers)
    _computes_as(want, model, runner)


@pytest.mark.parametrize("as_bytes", [False, True])
@pytest.mark.parametrize("S, K, N, E", [(40, 64, 96, 4), (7, 300, 40, 3)])
def test_the_fp8_grouped_matmul_equals_torch_on_the_dequantized_experts(S: int, K: int, N: int, E: int,
                                                                         as_bytes: bool) -> None:
    from engine.moe import grouped_mm
    from engine.triton_fp8 import grouped_matmul_fp8

    g = torch.Generator().manual_seed(S)
    codes, scale = quantize(torch.randn(E, N, K, generator=g))
    rows = torch.randn(S, K, generator=g)
    experts = torch.sort(torch.randint(0, E, (S,), generator=g)).values
    offs = torch.cumsum(torch.bincount(experts, minlength=E), 0).to(torch.int32)
    ref = grouped_mm(rows, dequantize(codes, scale, torch.float32).transpose(1, 2), offs=offs)
    torch.testing.assert_close(grouped_matmul_fp8(rows, codes, scale, offs, as_bytes=as_bytes), ref, atol=1e-4,
                               rtol=1e-5)


@pytest.mark.parametrize("fmt, arch", [("channel", "qwen3"), ("channel", "qwen3_moe"), ("tensor", "qwen3"),
                                       ("block", "qwen3"), ("fbgemm", "qwen3")])
def test_compressed_tensors_and_fbgemm_fp8_checkpoints_load_both_ways(tmp_path: Path, fmt: str, arch: str) -> None:
    """llm-compressor's FP8 (compressed-tensors: per tensor with a static input scale, per channel, per
    block) and Meta's fbgemm FP8 (per channel), which Hugging Face cannot load here: read by
    engine/fp8.py, off CUDA dequantized as read (the weights their codes stand for, exactly), and
    kept FP8 as on CUDA, where the runner's and Hugging Face's own logits are the dequantized model's."""
    want = _fp8_checkpoint(tmp_path, arch=arch, fmt=fmt)
    config = AutoConfig.from_pretrained(tmp_path)
    assert fp8.reads(config, "cuda") and fp8.reads(config, "cpu")
    model = load_model(ModelConfig(path=str(tmp_path)))
    assert not any(isinstance(m, fp8.Fp8Linear) or hasattr(m, "gate_up_proj_scale") for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in want.state_dict().items())
    kept = fp8.load(tmp_path, config, torch.float32, "cpu", "eager", keep_fp8=True)
    assert kept.model.layers[0].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn
    _computes_as(want, kept, ModelRunner(kept, num_blocks=8, block_size=16, kernels="triton"))


def test_fp8_variants_not_read_are_refused_naming_the_field(tmp_path: Path) -> None:
    _fp8_checkpoint(tmp_path, fmt="channel")
    data = json.loads((tmp_path / "config.json").read_text())
    weights = data["quantization_config"]["config_groups"]["group_0"]["weights"]
    for change, match in [({"num_bits": 4, "type": "int"}, r"config_groups\[0\].weights: 4-bit int weights are not read"),
                          ({"strategy": "group"}, r"config_groups\[0\].weights: strategy 'group'")]:
        (tmp_path / "config.json").write_text(json.dumps(
            {**data, "quantization_config": {**data["quantization_config"], "config_groups": {
                "group_0": {"targets": ["Linear"], "weights": {**weights, **change}}}}}))
        with pytest.raises(ModelLoadError, match=f"model.path: quantization_config.{match}"):
            load_model(ModelConfig(path=str(tmp_path)))
    moe = tiny_model(arch="granitemoe")
    moe.config.quantization_config = data["quantization_config"]
    moe.save_pretrained(tmp_path / "granitemoe")
    with pytest.raises(ModelLoadError, match="FP8 experts of granitemoe are stored in a way not read here"):
        load_model(ModelConfig(path=str(tmp_path / "granitemoe")))


def test_fp8_and_plain_projections_fused_together_are_dequantized_first() -> None:
    """A checkpoint that left v_proj unquantized (an `ignore` entry): q|k|v fuse as the dequantized q and
    k beside the plain v; the logits are Hugging Face's."""
    import copy

    model = tiny_model(seed=2)
    want = copy.deepcopy(model)
    for layer, ref in zip(model.model.layers, want.model.layers):
        for name in ("q_proj", "k_proj"):
            m = getattr(layer.self_attn, name)
            fp8.hold(m, *quantize(m.weight.data))
            getattr(ref.self_attn, name).weight.data = dequantize(m.weight, m.weight_scale, torch.float32)
    runner = ModelRunner(model, num_blocks=8, block_size=16, kernels="triton")
    assert runner.layers[0].qkv.scale is None and runner.layers[0].qkv.weight.dtype == torch.float32
    _computes_as(want, model, runner)


# qwen3: tied embeddings, q/k norms; qwen3_moe, deepseek_v2: experts stored one by one (DeepSeek's latent
# projections and shared experts too); mixtral: the same under its own names (block_sparse_moe, w1/w2/w3);
# granitemoe: experts stored fused
@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe", "deepseek_v2", "mixtral", "granitemoe", "glm4_moe",
                                  "ernie4_5_moe"])
def test_quantization_fp8_of_a_checkpoint_quantizes_each_weight_as_it_is_read(
        tmp_path: Path, arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.quantization fp8 over an unquantized safetensors folder reads it with each targeted weight,
    each expert's too, quantized as it arrives (no unquantized copy of the model in memory): the same
    codes and scales as quantizing the loaded model, and Hugging Face's logits on them. An expert
    missing from the checkpoint is refused."""
    import copy

    model = tiny_model(seed=7, arch=arch)
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    whole = copy.deepcopy(model)
    fp8.quantize_model(whole)
    streamed: list[torch.nn.Module] = []
    read = fp8.load_quantized
    monkeypatch.setattr(fp8, "load_quantized", lambda *a: streamed.append(read(*a)) or streamed[-1])
    loaded = load_model(ModelConfig.model_construct(**{**ModelConfig(path=str(tmp_path)).model_dump(),
                                                       "quantization": "fp8"}))
    assert streamed == [loaded]
    pairs = [(n, m, dict(loaded.named_modules())[n]) for n, m in whole.named_modules() if isinstance(m, fp8.Fp8Linear)]
    assert len(pairs) == {"llama": 14, "qwen3": 14, "qwen3_moe": 8 + 3, "deepseek_v2": 8 + 3 + 3, "mixtral": 8,
                          "granitemoe": 8, "glm4_moe": 8 + 3 + 3, "ernie4_5_moe": 8 + 3 + 3}[arch]  # attention (+ a dense MLP, shared experts)
    for name, want, got in pairs:
        assert isinstance(got, fp8.Fp8Linear), name
        assert torch.equal(got.weight.view(torch.uint8), want.weight.view(torch.uint8)), name
        assert torch.equal(got.weight_scale, want.weight_scale), name
    experts = [(n, m, dict(loaded.named_modules())[n]) for n, m in whole.named_modules() if hasattr(m, "gate_up_proj_scale")]
    assert len(experts) == {"llama": 0, "qwen3": 0, "qwen3_moe": 1, "deepseek_v2": 1, "glm4_moe": 1, "ernie4_5_moe": 1}.get(arch, 2)
    for name, want, got in experts:
        for p in fp8.EXPERT_WEIGHTS:
            assert torch.equal(getattr(got, p).view(torch.uint8), getattr(want, p).view(torch.uint8)), name
            assert torch.equal(getattr(got, p + "_scale"), getattr(want, p + "_scale")), name
    dequantize_into(model, whole)
    _computes_as(model, loaded, ModelRunner(loaded, num_blocks=8, block_size=16, kernels="triton"))
    if arch in fp8.PER_EXPERT_FAMILIES:
        from safetensors.torch import load_file

        tensors = load_file(tmp_path / "model.safetensors")
        if arch == "glm4_moe":  # a multi-token prediction layer past the decoder's: not read (Hugging Face skips it too)
            tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
            save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
            fp8.load_quantized(tmp_path, AutoConfig.from_pretrained(tmp_path), torch.float32, "cpu", "eager")
        del tensors[f"model.layers.1.{'block_sparse_moe' if arch == 'mixtral' else 'mlp'}.experts.5."
                    f"{'w1' if arch == 'mixtral' else 'gate_proj'}.weight"]
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match="model.layers.1.mlp.experts: 7 experts' gate_proj.weight in the checkpoint"):
            fp8.load_quantized(tmp_path, AutoConfig.from_pretrained(tmp_path), torch.float32, "cpu", "eager")
