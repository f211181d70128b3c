"""The paged-KV runner equals Hugging Face generate on the tiny model, however the work is cut."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from engine.model_runner import ModelRunner, SeqInput
from engine.moe import Experts
from engine.tiny import tiny_model

MODEL = tiny_model()


def _hf(prompt: list[int], n: int) -> list[int]:
    out = MODEL.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 259) for _ in range(rng.randint(1, 320))] for _ in range(n)]


def _tables(num: int, per: int, shuffle_seed: int) -> list[list[int]]:
    blocks = list(range(num * per))
    random.Random(shuffle_seed).shuffle(blocks)  # scattered, non-contiguous blocks
    return [blocks[i * per : (i + 1) * per] for i in range(num)]


# fused C++ paged attention | gather + SDPA | the CUDA Triton kernels (here run by Triton's interpreter)
@pytest.mark.parametrize("kernels", ["auto", "torch", "triton"])
def test_batched_prefill_then_batched_decode_equals_hf(kernels: str) -> None:
    n, steps = (5, 7) if kernels == "triton" else (10, 15)  # Triton's interpreter runs a program at a time
    prompts = [p[:96] if kernels == "triton" else p for p in _prompts(n, seed=0)]
    runner = ModelRunner(MODEL, num_blocks=10 * 24, block_size=16, kernels=kernels)
    tables = _tables(n, 24, 1)
    seqs = [list(p) for p in prompts]
    logits = runner.forward([SeqInput(p, 0, t) for p, t in zip(prompts, tables)])  # one packed forward
    for s, row in zip(seqs, logits):
        s.append(int(row.argmax()))
    for _ in range(steps):  # every step: one token per sequence, different context lengths
        logits = runner.forward([SeqInput([s[-1]], len(s) - 1, t) for s, t in zip(seqs, tables)])
        for s, row in zip(seqs, logits):
            s.append(int(row.argmax()))
    for p, s in zip(prompts, seqs):
        assert s[len(p):] == _hf(p, steps + 1)


@pytest.mark.parametrize("kernels", ["auto", "triton"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_hf(chunk: int, kernels: str) -> None:
    p = _prompts(1, seed=chunk)[0][: 100 if kernels == "triton" else None]
    runner = ModelRunner(MODEL, num_blocks=32, block_size=16, kernels=kernels)
    table = _tables(1, 32, chunk)[0]
    for start in range(0, len(p), chunk):
        logits = runner.forward([SeqInput(p[start : start + chunk], start, table)])
    assert int(logits[0].argmax()) == _hf(p, 1)[0]


@pytest.mark.parametrize("kernels", ["auto", "torch", "triton"])
def test_mixed_steps_decode_rows_plus_prompt_chunks_equal_hf(kernels: str) -> None:
    """Sarathi steps: running sequences decode while another prompt is computed in chunks, all in one
    forward per step (what the aggregated worker does); every sequence still equals generate."""
    prompts = _prompts(4, seed=21)
    runner = ModelRunner(MODEL, num_blocks=4 * 24, block_size=16, kernels=kernels)
    tables = _tables(4, 24, 2)
    out: list[list[int]] = [[int(runner.forward([SeqInput(prompts[i], 0, tables[i])])[0].argmax())] for i in range(3)]
    late, computed, chunk = prompts[3], 0, 24
    while any(len(o) < 12 for o in out) or computed < len(late):
        running = [i for i, o in enumerate(out) if len(o) < 12]
        rows = [SeqInput([out[i][-1]], len(prompts[i]) + len(out[i]) - 1, tables[i]) for i in running]
        piece = late[computed : computed + chunk]
        chunks = [SeqInput(piece, computed, tables[3])] if piece else []
        logits = runner.forward(rows + chunks)  # decode rows first, then the prompt chunk
        for i, row in zip(running, logits):
            out[i].append(int(row.argmax()))
        computed += len(piece)
        if piece and computed == len(late):
            out.append([int(logits[-1].argmax())])  # the late prompt joins the decode rows next step
    assert [o[:12] for o in out] == [_hf(p, 12) for p in prompts]


def test_block_copy_between_caches_continues_decoding() -> None:
    """The direct write: block runs of one cache copied into other block ids of another."""
    from engine.kv_handoff.shared_cache import copy_blocks

    p = _prompts(1, seed=9)[0]
    a = ModelRunner(MODEL, num_blocks=32, block_size=16)
    b = ModelRunner(MODEL, num_blocks=64, block_size=16)
    ta, tb = list(range(32))[::-1], list(range(64))[5:20] + list(range(40, 57))  # reversed; two runs
    first = int(a.forward([SeqInput(p, 0, ta)])[0].argmax())
    nb = -(-len(p) // 16)
    copy_blocks(b.kv, tb[:nb], a.kv, ta[:nb])
    toks = [first]
    for _ in range(10):
        toks.append(int(b.forward([SeqInput([toks[-1]], len(p) + len(toks) - 1, tb)])[0].argmax()))
    assert toks == _hf(p, 11)
    assert b.tokens_forwarded == 10  # the receiver never ran the prompt


def test_fused_kernel_is_built_here_and_matches_sdpa() -> None:
    from engine import paged_attention

    assert paged_attention.load() is not None  # g++ and ninja are on this machine and in CI
    fused = ModelRunner(MODEL, num_blocks=64, block_size=16, kernels="auto")
    plain = ModelRunner(MODEL, num_blocks=64, block_size=16, kernels="torch")
    assert fused.attn.name == "cpp" and plain.attn.name == "sdpa"
    prompts = _prompts(4, seed=11)
    tables = _tables(4, 16, 3)
    for r in (fused, plain):
        r.forward([SeqInput(p, 0, t) for p, t in zip(prompts, tables)])
    step = [SeqInput([7], len(p), t) for p, t in zip(prompts, tables)]
    assert torch.allclose(fused.forward(step), plain.forward(step), atol=1e-4, rtol=1e-4)


WINDOWED = dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)  # Qwen 2: layer 1 only
PARTIAL = dict(partial_rotary_factor=0.5)  # Phi 4 mini's rotary on part of each head (its 0.75 of 128 dims)


@pytest.mark.parametrize("arch, overrides", [("qwen2", {}), ("qwen3", {}), ("qwen3_moe", {}), ("mixtral", {}),
                                             ("qwen2_moe", {}), ("phi3", {}), ("mistral", {}), ("qwen2", WINDOWED),
                                             ("gemma3_text", {}), ("gemma2", {}), ("phi3", PARTIAL),
                                             ("glm4", {}), ("granite", {}), ("smollm3", {}), ("olmo2", {})],
                         ids=["qwen2", "qwen3", "qwen3_moe", "mixtral", "qwen2_moe", "phi3", "mistral", "qwen2-window",
                              "gemma3", "gemma2", "phi4-mini", "glm4", "granite", "smollm3", "olmo2"])
@pytest.mark.parametrize("kernels", ["auto", "torch", "triton"])
def test_other_families_equal_hf_prefilled_in_chunks_then_decoded(arch: str, overrides: dict, kernels: str) -> None:
    """Qwen 2 (q/k/v biases), Qwen 3 (per-head q/k RMSNorm, head_dim 32 where hidden / heads is
    16, tied embeddings) and the mixtures of experts (Qwen 3 MoE: a dense layer and a sparse one;
    Mixtral; Qwen 2 MoE: a gated shared expert), Phi 3 (q|k|v and gate|up fused in the checkpoint)
    sliding windows of 16 (Mistral's in every layer, Qwen 2's in its upper layer), Gemma 3
    (sandwich norms, a local and a global rotary base, a windowed layer), Gemma 2 (soft-capped
    attention scores and logits), Phi 4 mini's rotary on half of each head and GLM 4 (interleaved
    rotary on half of each head, sandwich norms, q/k/v biases), Granite (its multipliers), SmolLM3
    (a layer without rotary), OLMo 2 (norms after the sub-layers only, q/k norms over all heads): a
    batch of prompts, one computed in chunks, then decoded, equals generate."""
    model = tiny_model(seed=4, arch=arch, **overrides)
    interpreted = kernels == "triton"  # Triton's interpreter runs a program at a time: fewer rows
    prompts = [p[:24] if interpreted else p for p in _prompts(4, seed=5)]
    chunk = 16 if interpreted else 24
    runner = ModelRunner(model, num_blocks=4 * 24, block_size=16, kernels=kernels)
    tables = _tables(4, 24, 3)
    seqs = [list(p) for p in prompts]
    logits = runner.forward([SeqInput(p, 0, t) for p, t in zip(prompts[:3], tables)])
    for start in range(0, len(prompts[3]), chunk):
        last = runner.forward([SeqInput(prompts[3][start:start + chunk], start, tables[3])])
    for s, row in zip(seqs, [*logits, last[0]]):
        s.append(int(row.argmax()))
    for _ in range(3 if interpreted else 9):
        logits = runner.forward([SeqInput([s[-1]], len(s) - 1, t) for s, t in zip(seqs, tables)])
        for s, row in zip(seqs, logits):
            s.append(int(row.argmax()))
    for p, s in zip(prompts, seqs):
        hf = model.generate(torch.tensor([p]), max_new_tokens=len(s) - len(p), do_sample=False, eos_token_id=None,
                            pad_token_id=0)
        assert s[len(p):] == hf[0, len(p):].tolist()


@pytest.mark.parametrize("kernels", ["auto", "torch", "triton"])
@pytest.mark.parametrize("arch", ["qwen2-window", "gemma3", "gemma2-attention", "gemma2-final", "granite", "smollm3"])
def test_per_layer_attention_matches_hf_logits_prefilled_in_chunks_and_decoded(arch: str, kernels: str) -> None:
    """What differs by layer: Qwen 2 with a window of 16 in layer 1 only; Gemma 3's local and global
    rotary bases (and its window in layer 0); Gemma 2's soft-capping of attention scores and of the
    final logits (which never changes a greedy token); Granite's residual multiplier; SmolLM3's layer
    without rotary. Greedy tokens of a tiny model barely feel
    these, so the logits are compared — and without the feature they differ."""
    model = (tiny_model(seed=4, arch="qwen2", **WINDOWED) if arch == "qwen2-window"
             else tiny_model(4, arch={"gemma3": "gemma3_text"}.get(arch, arch.split("-")[0])))
    prompt = _prompts(1, seed=9)[0][:70]
    with torch.inference_mode():
        want = model(torch.tensor([prompt])).logits[0]  # [n, V]
    runner = ModelRunner(model, num_blocks=24, block_size=16, kernels=kernels)
    assert runner.attn.windows == ([0, 16] if arch == "qwen2-window" else [16, 0] if "gemma" in arch else [0, 0])
    assert (type(runner.ops).__name__ == "TritonOps") == (kernels == "triton")  # Gemma's (1 + w) norms and GELU too
    table = _tables(1, 24, 3)[0]
    got = [runner.forward([SeqInput(prompt[a:a + 24], a, table)])[0] for a in range(0, 48, 24)]  # chunks
    end = 56 if kernels == "triton" else len(prompt)  # Triton's interpreter: 8 decode steps, not 22
    got += [runner.forward([SeqInput([t], p, table)])[0] for p, t in enumerate(prompt[48:end], 48)]  # one by one
    torch.testing.assert_close(torch.stack(got), want[[23, 47, *range(48, end)]], atol=5e-5, rtol=1e-4)
    if arch == "qwen2-window":
        runner.attn.windows = [0, 0]
    elif arch == "gemma2-attention":
        runner.attn.softcap = 0.0
    elif arch == "gemma2-final":
        runner.final_softcap = 0.0
    elif arch == "granite":
        runner.residual_scale = 1.0
    elif arch == "smollm3":  # rotary in every layer
        runner.layers = [replace(layer, rope=None) for layer in runner.layers]
    else:  # every layer on the local base
        runner.layers = [replace(layer, rope="sliding_attention") for layer in runner.layers]
    assert not torch.allclose(runner.forward([SeqInput([prompt[end - 1]], end - 1, table)])[0], want[end - 1],
                              atol=1e-3)


MORE = ["olmo3", "exaone4", "ministral", "seed_oss", "internlm3", "helium", "ernie4_5", "glm", "cohere", "cohere2",
        "starcoder2", "arcee", "nemotron", "olmoe", "granitemoe", "llama-mlp-bias", "gpt_oss", "deepseek_v2",
        "deepseek_v3", "glm4_moe", "ministral3", "ernie4_5_moe", "gemma", "stablelm", "stablelm-parallel", "olmo", "cwm",
        "exaone_moe", "solar_open", "jais2", "minimax_m2", "hunyuan_v1_dense", "apertus", "hyperclovax",
        "vaultgemma", "dots1", "phimoe", "llama-dynamic-rope", "glm4_moe_lite",
        "iquestcoder"]
# families whose Triton kernels' inputs other families' interpreted variants already give (Gemma's norms,
# torch-op LayerNorms, windows, NOPE layers, routers, sandwiches): their interpreted run (~7 s each) adds
# no evidence, so they run on the C++ kernels only
SAME_TRITON_INPUTS = ("gemma", "stablelm-parallel", "olmo", "cwm", "exaone_moe", "solar_open", "jais2", "apertus",
                      "hyperclovax", "vaultgemma", "dots1", "llama-dynamic-rope", "glm4_moe_lite",
                      "iquestcoder")


@pytest.mark.parametrize("arch,kernels", [pytest.param(a, k, id=f"{a}-{k}") for a in MORE for k in ("auto", "triton")
                                          if k == "auto" or a not in SAME_TRITON_INPUTS])
def test_families_made_of_known_parts_match_hf_logits(arch: str, kernels: str) -> None:
    """Families built from parts the others have (engine/tiny.py): OLMo 3 (OLMo 2's layers, windows,
    a rotary per layer type), EXAONE 4 (no rotary in its global layers), Ministral (windows per
    layer type), Seed-OSS (biases), InternLM 3, Helium and ERNIE 4.5 (interleaved rotary), GLM-4-9B
    (interleaved on half of each head), Command R and R7B (attention and MLP in parallel, LayerNorm,
    interleaved rotary tables, a logit scale; R7B's global layer without rotary), StarCoder 2 and
    Arcee (MLPs without a gate; StarCoder 2's LayerNorms and biases, its window in every layer),
    Nemotron / Minitron (LayerNorm1P, relu^2 without a gate, rotary on half of each head), OLMoE (OLMo's
    q/k norms, experts), Granite MoE (Granite's multipliers, experts), Llama's mlp_bias, gpt-oss
    (attention sinks, windows, yarn tables of half a head, experts with biases and a clamped GLU),
    DeepSeek V2 and V3 (latent attention: decode absorbed, prompts expanded; rotary on neighbouring
    dims of k_pe; their routers, shared experts, yarn's attention scale), GLM-4.5 (rotary on half of
    each head, q/k/v biases, per-head q/k norms, V3's router, a shared expert): the logits of a prompt
    in chunks, then decoded, == HF's; ERNIE 4.5 MoE (its router's own choice: probabilities plus a
    bias); Ministral 3 (queries scaled by position past its original context:
    16 positions here); Gemma 1 ((1 + w) norms, GELU-tanh, scaled embeddings), StableLM 2 (LayerNorms,
    rotary on a quarter of each head; with and without its parallel residual), OLMo 1 (LayerNorms
    without weights), CWM (llama3 rotary, windows), K-EXAONE (EXAONE 4's attention, V3's router and
    shared experts), Solar Open (GLM-4.5's experts under Llama's attention), Jais 2 (LayerNorms,
    biases, relu^2), MiniMax-M2 (q/k norms over all heads, rotary on half of each head, experts by
    sigmoid scores plus the block's bias), Hunyuan (q/k norms per head after the rotary), Apertus (its
    norms' own names, xIELU without a gate), HyperCLOVA X (Granite's multipliers, but the logits'
    multiplied; norms after each sub-layer), VaultGemma (Gemma 2's soft-capping and windows, no norms
    after the sub-layers), dots.llm1 (Qwen 3's attention, DeepSeek V3's router and shared experts),
    Phi-3.5-MoE (its router's sparsemixer; LongRoPE's tables made without its module's host read), and
    Llama with dynamic NTK rotary (its tables made so too), GLM-4.7-Flash (V3's latent attention, its
    rotary on neighbouring dims of k_pe, GLM-4.5's experts), IQuest-Coder (Llama's model)."""
    model = (tiny_model(4, arch="llama", mlp_bias=True) if arch == "llama-mlp-bias"
             else tiny_model(4, arch="llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
             if arch == "llama-dynamic-rope"
             else tiny_model(4, arch="stablelm", use_parallel_residual=True) if arch == "stablelm-parallel"
             else tiny_model(4, arch=arch))
    prompt = _prompts(1, seed=9)[0][:70]
    with torch.inference_mode():
        want = model(torch.tensor([prompt])).logits[0]  # [n, V]
    runner = ModelRunner(model, num_blocks=24, block_size=16, kernels=kernels)
    table = _tables(1, 24, 3)[0]
    got = [runner.forward([SeqInput(prompt[a:a + 24], a, table)])[0] for a in range(0, 48, 24)]
    end = 56 if kernels == "triton" else len(prompt)  # Triton's interpreter: 8 decode steps, not 22
    got += [runner.forward([SeqInput([t], p, table)])[0] for p, t in enumerate(prompt[48:end], 48)]  # one by one
    torch.testing.assert_close(torch.stack(got), want[[23, 47, *range(48, end)]], atol=5e-5, rtol=1e-4)
    if arch in ("exaone4", "exaone_moe", "cohere2"):  # with rotary in its global layer too, it differs
        runner.layers = [replace(layer, rope=None) for layer in runner.layers]
        assert not torch.allclose(runner.forward([SeqInput([prompt[end - 1]], end - 1, table)])[0], want[end - 1],
                                  atol=1e-3)
    if arch == "ministral3":  # without its queries' scale, it differs
        runner.query_scale = None
        assert not torch.allclose(runner.forward([SeqInput([prompt[end - 1]], end - 1, table)])[0], want[end - 1],
                                  atol=1e-3)
    if arch in ("phimoe", "llama-dynamic-rope"):  # tables made here (engine/rotary.py), equal to its module's
        assert runner.rotary.layout == "here"
        pos = torch.arange(70)[None]
        assert all(torch.equal(a, b[0]) for a, b in zip(runner.rotary(want[:1], pos, None),
                                                          model.model.rotary_emb(want[:1], pos)))
    if arch in ("minimax_m2", "phimoe"):  # routed as a softmax over the router's logits, it differs
        runner.layers = [replace(layer, mlp=replace(layer.mlp, route=None)) for layer in runner.layers]
        assert all(isinstance(layer.mlp, Experts) for layer in runner.layers)
        assert not torch.allclose(runner.forward([SeqInput([prompt[end - 1]], end - 1, table)])[0], want[end - 1],
                                  atol=1e-3)
    if arch == "hyperclovax":  # its logits divided by logits_scaling, as Granite's are, differ
        runner.logits_divisor, runner.logit_scale = runner.logit_scale, 1.0
        assert not torch.allclose(runner.forward([SeqInput([prompt[end - 1]], end - 1, table)])[0], want[end - 1],
                                  atol=1e-3)
    if arch == "hunyuan_v1_dense":  # normalized before the rotary, as Qwen 3, it differs
        runner.layers = [replace(layer, qk_norm_after_rope=False) for layer in runner.layers]
        assert not torch.allclose(runner.forward([SeqInput([prompt[end - 1]], end - 1, table)])[0], want[end - 1],
                                  atol=1e-3)
    if arch == "gpt_oss":  # without its sinks, it differs (most where few keys share the softmax with them)
        runner.attn.sinks = [None] * len(runner.layers)
        assert not torch.allclose(runner.forward([SeqInput(prompt[:6], 0, table)])[0], want[5], atol=1e-3)


def test_a_runner_describes_the_model_and_the_paths_it_takes() -> None:
    """The line each worker's start-up log carries (cluster/launcher.py)."""
    line = ModelRunner(tiny_model(4, arch="gemma3_text"), num_blocks=8, block_size=16, kernels="auto").describe()
    assert line.startswith("gemma3_text: 2 layers, 4 heads (2 KV) of 16, float32 on cpu; attention cpp, windows [16]")
    assert "layer ops TorchOps, MLP Dense, linears onednn; 8 KV blocks of 16; no CUDA graphs" in line
    moe = ModelRunner(tiny_model(4, arch="qwen3_moe"), num_blocks=8, block_size=16, kernels="torch").describe()
    assert "attention sdpa, layer ops TorchOps, MLP Dense/Experts, linears torch" in moe
    from engine import fp8

    quantized = tiny_model(4)
    fp8.quantize_model(quantized)
    line = ModelRunner(quantized, 8, 16, kernels="triton", kv_dtype=torch.float8_e4m3fn).describe()
    assert line.startswith("llama: 2 layers, 4 heads (2 KV) of 16, float32 (FP8 weights in 2 layers) (KV cache fp8) on cpu")
