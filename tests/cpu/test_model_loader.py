import json
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.model_loader import ModelLoadError, check_supported, eos_token_ids, load_model, load_tokenizer
from engine.model_shape import attention_windows
from transformers import AutoModelForCausalLM, MistralConfig

from engine.tiny import tiny_config, tiny_model, tiny_tokenizer


def test_local_hf_checkpoint_folder_loads_offline(tmp_path: Path) -> None:
    tiny_model(seed=3).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    cfg = ModelConfig(path=str(tmp_path))
    model, tok = load_model(cfg), load_tokenizer(cfg)
    ref = tiny_model(seed=3)
    ids = torch.tensor([tok("hello")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert eos_token_ids(cfg, tok) == (2,)


def test_missing_folder_names_model_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.path"):
        load_model(ModelConfig(path=str(tmp_path / "nope")))


def test_tiny_is_deterministic_and_not_degenerate() -> None:
    a, b = tiny_model(seed=0), tiny_model(seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    out = a.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert len(set(out[0, 3:].tolist())) > 3  # greedy output is not one repeated token


def test_a_qwen3_folder_loads_with_its_windows_and_other_families_are_refused(tmp_path: Path) -> None:
    model = tiny_model(seed=3, arch="qwen3")
    model.save_pretrained(tmp_path / "q3")
    tiny_tokenizer().save_pretrained(tmp_path / "q3")
    loaded = load_model(ModelConfig(path=str(tmp_path / "q3")))
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    model.config.use_sliding_window, model.config.max_window_layers, model.config.sliding_window = True, 1, 8
    model.config.layer_types = ["full_attention", "sliding_attention"]
    model.save_pretrained(tmp_path / "windowed")
    assert attention_windows(load_model(ModelConfig(path=str(tmp_path / "windowed"))).config) == [0, 8]
    model.config.model_type = "falcon_mamba"
    with pytest.raises(ModelLoadError, match="model.path: architecture 'falcon_mamba' is not supported"):
        check_supported(model.config)


def test_a_mistral_window_applies_in_every_layer_and_other_attention_kinds_are_refused(tmp_path: Path) -> None:
    """Mistral 7B v0.1 attends over a 4096-token window in every layer (no layer_types): each layer
    gets it, whatever model.max_model_len; a layer kind the engine does not compute is refused."""
    cfg = MistralConfig(**{**tiny_config().to_dict(), "model_type": "mistral", "sliding_window": 64})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    assert attention_windows(load_model(ModelConfig(path=str(tmp_path))).config) == [64, 64]
    cfg = tiny_model(arch="qwen3").config
    cfg.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ModelLoadError, match="model.path: qwen3 has layers of attention kinds \\['chunked_attention'\\]"):
        check_supported(cfg, 1024)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_a_mixture_of_experts_folder_loads(tmp_path: Path, arch: str) -> None:
    model = tiny_model(seed=3, arch=arch)
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(path=str(tmp_path)))
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_max_model_len_beyond_the_trained_positions_is_refused_unless_rope_scaling_stretches_them(
        tmp_path: Path) -> None:
    """vLLM's rule: a context longer than max_position_embeddings (times a yarn or linear rope
    scaling's factor) names model.max_model_len instead of computing positions the model never saw."""
    model = tiny_model(seed=3)  # max_position_embeddings 4096
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ModelLoadError, match=r"model.max_model_len: 8192 exceeds the 4096 positions"):
        load_model(ModelConfig(path=str(tmp_path / "plain"), max_model_len=8192))
    assert load_model(ModelConfig(path=str(tmp_path / "plain"), max_model_len=4096)) is not None
    model.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                                    "rope_theta": 10000.0}
    model.save_pretrained(tmp_path / "yarn")
    assert load_model(ModelConfig(path=str(tmp_path / "yarn"), max_model_len=16384)) is not None
    with pytest.raises(ModelLoadError, match=r"exceeds the 16384 positions"):
        load_model(ModelConfig(path=str(tmp_path / "yarn"), max_model_len=16385))


def test_a_quantized_checkpoint_is_refused_naming_its_method(tmp_path: Path) -> None:
    """The runner multiplies by each layer's `weight` as it is: an AWQ/GPTQ checkpoint's would be
    garbage, so it is refused before Hugging Face tries to load it (FP8: tests/cpu/test_fp8.py)."""
    tiny_model(seed=3).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="model.path: .* is quantized \\(awq\\)"):
        load_model(ModelConfig(path=str(tmp_path)))


def test_phi3_loads_and_its_long_rope_and_partial_rotary_are_held_to_what_is_computed(tmp_path: Path) -> None:
    """Phi 3 / Phi 4: q|k|v and gate|up fused in the checkpoint. LongRoPE (Phi 3.5 mini) changes every
    position's frequencies once a sequence passes the original length, so max_model_len stays within
    it; rotary on part of each head (Phi 4 mini) loads, in another family it is refused (Hugging Face's
    own code would not compute it); Phi 3 mini's 2047-token window in every layer."""
    model = tiny_model(seed=3, arch="phi3")
    model.save_pretrained(tmp_path / "phi3")
    loaded = load_model(ModelConfig(path=str(tmp_path / "phi3")))
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    cfg = model.config
    cfg.rope_parameters = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                           "original_max_position_embeddings": 1024, "rope_theta": 10000.0}
    with pytest.raises(ModelLoadError, match="model.max_model_len: 2048 exceeds the 1024 positions"):
        check_supported(cfg, 2048)
    check_supported(cfg, 1024)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
    check_supported(cfg, 1024)
    llama = tiny_config()
    llama.rope_parameters = {**llama.rope_parameters, "partial_rotary_factor": 0.5}
    with pytest.raises(ModelLoadError, match="model.path: llama with rotary on part of each head"):
        check_supported(llama, 1024)
    cfg.rope_parameters, cfg.sliding_window = {"rope_type": "default", "rope_theta": 10000.0}, 2047
    check_supported(cfg, 2048)
    assert attention_windows(cfg) == [2047, 2047]


@pytest.mark.parametrize("arch", ["gemma3_text", "gemma2", "glm4", "granite", "smollm3", "gemma", "stablelm", "olmo",
                                  "cwm", "exaone_moe", "solar_open", "jais2", "minimax_m2", "hunyuan_v1_dense",
                                  "apertus", "hyperclovax", "vaultgemma", "dots1", "phimoe",
                                  "glm4_moe_lite", "iquestcoder"])
def test_gemma_glm_granite_and_smollm3_folders_load_as_saved(arch: str, tmp_path: Path) -> None:
    """Gemma 3, Gemma 2 (soft-capped: Hugging Face's own modules run eager attention, as SDPA
    cannot cap scores), GLM 4 (rotary on half of each head), Granite (its multipliers), SmolLM3
    (a layer without rotary; its sliding layers only with use_sliding_window), Gemma 1, StableLM 2
    (rotary on a quarter of each head), OLMo 1, CWM, K-EXAONE, Solar Open, Jais 2, MiniMax-M2,
    Hunyuan, Apertus, HyperCLOVA X, VaultGemma, dots.llm1, Phi-3.5-MoE, GLM-4.7-Flash and IQuest-Coder
    load from a folder and compute what was saved."""
    model = tiny_model(seed=3, arch=arch)
    model.save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(path=str(tmp_path)))
    windowed = ("gemma3_text", "gemma2", "cwm", "exaone_moe", "vaultgemma")
    assert attention_windows(loaded.config) == ([16, 0] if arch in windowed else [0, 0])
    assert loaded.config._attn_implementation == ("eager" if arch in ("gemma2", "vaultgemma") else "sdpa")
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    if arch == "smollm3":
        loaded.config.layer_types, loaded.config.sliding_window = ["full_attention", "sliding_attention"], 8
        assert attention_windows(loaded.config) == [0, 0]
        loaded.config.use_sliding_window = True
        assert attention_windows(loaded.config) == [0, 8]


def test_command_r_plus_qk_layer_norms_and_clipped_qkv_are_refused_naming_the_field() -> None:
    """Command R+ and StableLM 2 12B normalize q and k with a LayerNorm per head, OLMo clamps q, k and
    v: neither is computed here."""
    config = tiny_model(seed=3, arch="cohere").config
    check_supported(config, 1024)
    config.use_qk_norm = True
    with pytest.raises(ModelLoadError, match="model.path: cohere with use_qk_norm is not supported"):
        check_supported(config, 1024)
    stablelm = tiny_model(seed=3, arch="stablelm").config
    check_supported(stablelm, 1024)
    stablelm.qk_layernorm = True
    with pytest.raises(ModelLoadError, match="model.path: stablelm with qk_layernorm is not supported"):
        check_supported(stablelm, 1024)
    for arch in ("olmoe", "olmo"):
        olmo = tiny_model(seed=3, arch=arch).config
        check_supported(olmo, 1024)
        olmo.clip_qkv = 8.0  # q, k and v clamped: not computed here
        with pytest.raises(ModelLoadError, match=f"model.path: {arch} with clip_qkv is not supported"):
            check_supported(olmo, 1024)


def _multimodal(arch: str):  # type: ignore[no-untyped-def]
    """A tiny image + text checkpoint: Gemma 3 4B-27B's kind (a Gemma 3 text model and a SigLIP
    tower), Mistral Small 3.x's (a Mistral and a Pixtral tower), Qwen 2.5-VL's or Qwen3-VL's (M-RoPE,
    whose three position rows are equal for text)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, Gemma3Config, Mistral3Config

    text = {**tiny_config().to_dict(), "vocab_size": 300, "sliding_window": 16}
    for k in ("model_type", "architectures"):
        text.pop(k, None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, head_dim=16)
    if arch == "gemma3":
        text.update(query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"],
                    model_type="gemma3_text")
        cfg = Gemma3Config(text_config=text, vision_config={**vision, "model_type": "siglip_vision_model"},
                           mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    elif arch in ("mistral3", "ministral3"):  # ministral3: Ministral 3's, its queries scaled past position 16
        scaled = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "llama_4_scaling_beta": 0.1,
                                      "original_max_position_embeddings": 16}} if arch == "ministral3" else {}
        cfg = Mistral3Config(text_config={**text, "model_type": "mistral" if arch == "mistral3" else "ministral3",
                                          **scaled},
                             vision_config={**vision, "model_type": "pixtral"}, image_token_index=299)
    else:
        text.update(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3],
                                     "mrope_interleaved": arch != "qwen2_5_vl"}, sliding_window=None)
        if arch == "qwen3_vl_moe":  # Qwen3-VL-30B-A3B's kind: experts in every layer
            text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1)
        vision = dict(hidden_size=32, intermediate_size=64, depth=1, num_heads=2, out_hidden_size=64, patch_size=14,
                      **({"fullatt_block_indexes": [0]} if arch == "qwen2_5_vl" else {"deepstack_visual_indexes": [0]}))
        cfg = AutoConfig.for_model(arch, text_config=text, vision_config=vision, image_token_id=299,
                                   video_token_id=298, vision_start_token_id=297)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg).eval()
    with torch.no_grad():  # what the family adds, made to matter (Gemma's norms scale by (1 + w), w from 0)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and not p.any():
                p.uniform_(-0.5, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight", "q_proj.bias", "k_proj.bias")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):  # a router: tokens spread over the experts
                p.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("arch", ["gemma3", "mistral3", "ministral3", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_a_multimodal_checkpoint_is_served_for_its_text(arch: str, tmp_path: Path) -> None:
    """Gemma 3 4B-27B, Mistral Small 3.x, Ministral 3, Qwen 2.5-VL and Qwen3-VL (dense, and its experts:
    30B-A3B) are image + text checkpoints:
    their language model loads as a causal LM of its text config (the vision tower let go; Qwen-VL's,
    which has no such class, in a TextOnly), and the runner's logits of a text prompt, in chunks then
    decoded, == the whole checkpoint's."""
    from engine.model_runner import ModelRunner, SeqInput

    full = _multimodal(arch)
    full.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(path=str(tmp_path)))
    assert loaded.config.model_type == {"gemma3": "gemma3_text", "mistral3": "mistral",
                                        "ministral3": "ministral3"}.get(arch, f"{arch}_text")
    assert not any("visual" in n or "vision" in n for n, _ in loaded.named_parameters())
    assert attention_windows(loaded.config) == {"gemma3": [16, 0], "mistral3": [16, 16],
                                                "ministral3": [16, 16]}.get(arch, [0, 0])
    prompt = list(range(5, 45))
    with torch.inference_mode():
        want = full(input_ids=torch.tensor([prompt])).logits[0]  # [n, V]
    runner = ModelRunner(loaded, num_blocks=8, block_size=16, kernels="torch")
    got = [runner.forward([SeqInput(prompt[:24], 0, [0, 1, 2])])[0]]
    got += [runner.forward([SeqInput([t], p, [0, 1, 2])])[0] for p, t in enumerate(prompt[24:], 24)]
    torch.testing.assert_close(torch.stack(got), want[[23, *range(24, len(prompt))]], atol=5e-5, rtol=1e-4)


FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [E, out, in] → MXFP4 as OpenAI stores it: blocks [E, out, in/32, 16] uint8 (two 4-bit codes a
    byte, the even element low), scales [E, out, in/32] uint8 (a power of two + 127) — and the
    weights they stand for, [E, out, in]."""
    E, N, K = w.shape
    groups = w.float().reshape(E, N, K // 32, 32)
    exp = torch.ceil(torch.log2(groups.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 6.0))  # |x| / 2^exp <= 6
    code = (groups[..., None] / torch.exp2(exp)[..., None] - FP4).abs().argmin(-1)  # [E, N, K/32, 32]
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exp[..., 0] + 127).to(torch.uint8), (FP4[code] * torch.exp2(exp)).reshape(E, N, K)


def _mxfp4_checkpoint(folder: Path) -> torch.nn.Module:
    """A tiny gpt-oss folder with its experts in MXFP4, as OpenAI's checkpoints hold them; → the
    model with the weights those codes stand for (what it must load as)."""
    from safetensors.torch import save_file

    want = tiny_model(seed=3, arch="gpt_oss")
    state = {k: v.contiguous() for k, v in want.state_dict().items()}
    for li, layer in enumerate(want.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{li}.mlp.experts.{proj}"
            blocks, scales, w = _mxfp4(state.pop(key).transpose(1, 2))  # stored [E, in, out]
            state[key + "_blocks"], state[key + "_scales"] = blocks, scales
            getattr(layer.mlp.experts, proj).data = w.transpose(1, 2).contiguous()
    save_file(state, folder / "model.safetensors")
    config = {**want.config.to_dict(), "architectures": ["GptOssForCausalLM"], "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]}}
    (folder / "config.json").write_text(json.dumps(config))
    return want


def test_gpt_oss_as_released_mxfp4_experts_loads_dequantized_and_runs_as_hf(tmp_path: Path) -> None:
    """gpt-oss's checkpoints hold their experts in MXFP4 (*_blocks, *_scales): off CUDA they load as
    the plain weights those codes stand for (other quantized checkpoints stay refused), and the
    runner's logits are Hugging Face's."""
    from engine.model_runner import ModelRunner, SeqInput

    want = _mxfp4_checkpoint(tmp_path)
    model = load_model(ModelConfig(path=str(tmp_path)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in want.state_dict().items())
    prompt = list(range(3, 40))
    runner = ModelRunner(model, num_blocks=8, block_size=16, kernels="auto")
    with torch.inference_mode():
        torch.testing.assert_close(runner.forward([SeqInput(prompt, 0, [0, 1, 2])])[0],
                                   want(torch.tensor([prompt])).logits[0, -1], atol=5e-5, rtol=1e-4)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "awq"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="quantized \\(awq\\)"):
        load_model(ModelConfig(path=str(tmp_path)))


def test_gpt_oss_experts_kept_in_mxfp4_run_as_their_dequantized_selves(tmp_path: Path) -> None:
    """On CUDA the experts stay MXFP4 (engine/mxfp4.py: a quarter of bf16's memory) and the runner
    multiplies by them directly (engine/triton_mxfp4.py); here on CPU, the same loader and the same
    kernel under Triton's interpreter: the logits of a prompt and a decode step are Hugging Face's
    on the dequantized weights."""
    from engine import mxfp4
    from engine.model_runner import ModelRunner, SeqInput
    from engine.moe import Experts, Mxfp4
    from transformers import AutoConfig

    want = _mxfp4_checkpoint(tmp_path)
    model = mxfp4.load(tmp_path, AutoConfig.from_pretrained(tmp_path), torch.float32, "cpu", "eager")
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.numel() == 0 and experts.gate_up_proj_blocks.dtype == torch.uint8
    assert experts.gate_up_proj_blocks.shape == (8, 64, 32) and experts.down_proj_scales.shape == (8, 64, 1)
    runner = ModelRunner(model, num_blocks=8, block_size=16, kernels="triton")
    assert all(isinstance(layer.mlp, Experts) and isinstance(layer.mlp.gate_up, Mxfp4) for layer in runner.layers)
    prompt = list(range(3, 40))
    with torch.inference_mode():
        ref = want(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(runner.forward([SeqInput(prompt[:-1], 0, [0, 1, 2])])[0], ref[-2],
                                   atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(runner.forward([SeqInput(prompt[-1:], len(prompt) - 1, [0, 1, 2])])[0], ref[-1],
                                   atol=5e-5, rtol=1e-4)
    (tmp_path / "model.safetensors").rename(tmp_path / "other.bin")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        mxfp4.load(tmp_path, AutoConfig.from_pretrained(tmp_path), torch.float32, "cpu", "eager")
