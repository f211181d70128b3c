"""The CUDA engine: Triton attention and fused layer ops, decode CUDA graphs, the device sampler, KV sized from memory,
the device probe after a kernel fault.
Greedy == HF generate on CUDA (tiny model, fp32; FP8 linear layers too), solo and 32 at once, through the graphs and through
the eager fallback; graphs == eager exactly in bf16; seeded sampling batch-independent; every way of the draw
== a whole sort. Skipped without CUDA."""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(dtype: torch.dtype = torch.float32, arch: str = "llama"):  # type: ignore[no-untyped-def]
    from engine.tiny import tiny_model

    if arch == "llama-dynamic-rope":  # Hugging Face's module would read max(position) on the host: made by rotary.py
        return tiny_model(arch="llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                         "rope_theta": 1e4}).to("cuda", dtype)
    return tiny_model(arch=arch).to("cuda", dtype)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 259) for _ in range(rng.randint(1, 200))] for _ in range(n)]


def _decode(runner, prompts: list[list[int]], n: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    from engine.model_runner import SeqInput

    per = -(-(max(map(len, prompts)) + n) // runner.block_size)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(len(prompts))]
    out = [[int(r.argmax())] for r in runner.forward([SeqInput(p, 0, t) for p, t in zip(prompts, tables)])]
    for _ in range(n - 1):
        logits = runner.forward([SeqInput([o[-1]], len(p) + len(o) - 1, t) for p, o, t in zip(prompts, out, tables)])
        for o, tok in zip(out, logits.argmax(-1).tolist()):
            o.append(tok)
    return out


def _hf(model, p: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    out = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(p):].tolist()


# qwen3: per-head q/k norms (fused kernel), head_dim 32; mistral: a sliding window of 16 in every layer;
# gemma3_text: sandwich norms, (1 + w) norms and GELU by the fused kernels, two rotary bases; gemma2: soft-capping;
# glm4: interleaved rotary on half of each head (the fused kernel's PAIRS), sandwich norms by the fused norm;
# granite: its multipliers inside the graphs; smollm3: a layer without rotary (cos 1, sin 0 through rope_store);
# olmo2: no norm before the sub-layers, its norm's rounding, q/k norms over all heads; hunyuan_v1_dense: q and k
# rotated and normalized in torch, then rope_store's tables of 0; hyperclovax: Granite's multipliers with a
# sandwich; llama-dynamic-rope: the tables rotary.py makes in the graphs
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma3_text", "gemma2", "glm4", "granite", "smollm3",
                                  "olmo2", "hunyuan_v1_dense", "hyperclovax", "llama-dynamic-rope"])
@pytest.mark.parametrize("max_graph_batch", [64, 8])  # 64: every step replays a graph; 8: 32 rows run eagerly
def test_greedy_equals_hf_through_graphs_and_eager_fallback(max_graph_batch: int, arch: str) -> None:
    from engine.layer_ops import TritonOps
    from engine.model_runner import ModelRunner

    model = _model(arch=arch)
    runner = ModelRunner(model, num_blocks=32 * 16, block_size=16)
    assert runner.attn.name == "triton" and isinstance(runner.ops, TritonOps)
    runner.use_decode_graphs(max_graph_batch, max_model_len=256)
    prompts = _prompts(32, seed=max_graph_batch)
    together = _decode(runner, prompts, 12)
    solo = [_decode(runner, [p], 12)[0] for p in prompts[:4]]
    assert together == [_hf(model, p, 12) for p in prompts]
    assert solo == together[:4]
    assert runner.graphs is not None and runner.graphs.replays > 0


# mistral: a sliding window of 16 across a chunk's rows; deepseek_v2: latent attention; qwen3_moe: experts at 64 rows
@pytest.mark.parametrize("arch", ["llama", "mistral", "deepseek_v2", "qwen3_moe"])
def test_prompt_chunks_as_rows_of_the_captured_graphs_equal_hf(arch: str) -> None:
    """Sarathi's steps through the captured graphs: each step, every started prompt decodes a token
    and the next prompt's next chunk fills the step to 48 rows, a row per token (engine/cuda_graphs.py)."""
    from engine.model_runner import ModelRunner, SeqInput

    model = _model(arch=arch)
    runner = ModelRunner(model, num_blocks=16 * 16, block_size=16)
    runner.use_decode_graphs(64, max_model_len=256, max_rows=48)
    graphs = runner.graphs
    assert graphs is not None
    prompts, n = _prompts(8, seed=11), 10
    tables = [list(range(i * 16, (i + 1) * 16)) for i in range(8)]
    out: list[list[int]] = [[] for _ in prompts]
    done = [0] * 8  # prompt tokens computed
    mixed = 0  # steps with prompt rows replayed
    while any(len(o) < n for o in out):
        live = [i for i in range(8) if done[i] == len(prompts[i]) and len(out[i]) < n]
        seqs = [SeqInput([out[i][-1]], len(prompts[i]) + len(out[i]) - 1, tables[i]) for i in live]
        nxt = next((i for i in range(8) if done[i] < len(prompts[i])), None)
        if nxt is not None:
            take = min(len(prompts[nxt]) - done[nxt], 48 - len(seqs))
            seqs.append(SeqInput(prompts[nxt][done[nxt]: done[nxt] + take], done[nxt], tables[nxt]))
        before = graphs.replays
        logits = runner.forward(seqs)
        mixed += nxt is not None and graphs.replays > before
        for i, tok in zip(live, logits.argmax(-1).tolist()):
            out[i].append(tok)
        if nxt is not None:
            done[nxt] += take
            if done[nxt] == len(prompts[nxt]):
                out[nxt].append(int(logits[-1].argmax()))
    assert out == [_hf(model, p, n) for p in prompts]
    assert mixed > 8


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss", "deepseek_v2", "deepseek_v3", "glm4_moe",
                                  "minimax_m2", "phimoe", "exaone_moe", "dots1", "glm4_moe_lite"])
def test_mixtures_of_experts_in_fp32_equal_hf_through_graphs(arch: str) -> None:
    """fp32 experts take the Triton grouped matmul (torch's would loop on the host), so their steps
    are captured too. gpt-oss: its attention sinks in both Triton kernels, its experts' biases and GLU
    inside the graphs. DeepSeek: latent attention, its routers (torch ops) and shared experts in the graphs.
    MiniMax-M2's and Phi-3.5-MoE's routers (Hugging Face's modules) and Phi-3.5-MoE's LongRoPE tables
    (made by rotary.py) in the graphs; K-EXAONE's layer without rotary; dots.llm1's Qwen 3 attention;
    GLM-4.7-Flash's latent attention."""
    from engine.model_runner import ModelRunner
    from engine.moe import Experts

    model = _model(arch=arch)
    runner = ModelRunner(model, num_blocks=32 * 16, block_size=16)
    assert all(layer.mlp.triton for layer in runner.layers if isinstance(layer.mlp, Experts))
    runner.use_decode_graphs(64, max_model_len=256)
    prompts = _prompts(32, seed=5)
    assert _decode(runner, prompts, 12) == [_hf(model, p, 12) for p in prompts]
    assert runner.graphs is not None and runner.graphs.replays > 0


def test_the_triton_grouped_matmul_in_bf16_equals_torchs() -> None:
    """bf16, where the interpreter cannot check it: the Triton kernel against torch's grouped_mm
    (cutlass on sm90) for a decode step's rows of Qwen3-30B-A3B's expert shape."""
    from engine.moe import grouped_mm
    from engine.triton_moe import grouped_matmul

    g = torch.Generator(device="cuda").manual_seed(0)
    S, K, N, E = 512, 2048, 1536, 128  # 64 tokens x 8 experts each
    rows = torch.randn(S, K, device="cuda", generator=g).bfloat16()
    weights = (0.02 * torch.randn(E, N, K, device="cuda", generator=g)).bfloat16().transpose(1, 2)
    experts = torch.sort(torch.randint(0, E, (S,), device="cuda", generator=g)).values
    offs = torch.cumsum(torch.bincount(experts, minlength=E), 0).to(torch.int32)
    ref = grouped_mm(rows, weights, offs=offs)
    torch.testing.assert_close(grouped_matmul(rows, weights, offs), ref, atol=2e-2, rtol=2e-2)


def test_the_mxfp4_grouped_matmul_in_bf16_equals_torchs_on_the_dequantized_weights() -> None:
    """gpt-oss's experts kept in MXFP4, bf16 rows of gpt-oss-20b's gate|up shape (64 tokens x 4
    experts of 32): the Triton kernel against torch's grouped_mm over the dequantized weights."""
    from engine.moe import grouped_mm
    from engine.triton_mxfp4 import dequantize, grouped_matmul_mxfp4

    g = torch.Generator(device="cuda").manual_seed(0)
    S, K, N, E = 256, 2880, 5760, 32
    blocks = torch.randint(0, 256, (E, N, K // 2), device="cuda", generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 122, (E, N, K // 32), device="cuda", generator=g, dtype=torch.uint8)
    rows = torch.randn(S, K, device="cuda", generator=g).bfloat16()
    experts = torch.sort(torch.randint(0, E, (S,), device="cuda", generator=g)).values
    offs = torch.cumsum(torch.bincount(experts, minlength=E), 0).to(torch.int32)
    ref = grouped_mm(rows, dequantize(blocks, scales, torch.bfloat16).transpose(1, 2), offs=offs)
    torch.testing.assert_close(grouped_matmul_mxfp4(rows, blocks, scales, offs), ref, atol=2e-2, rtol=2e-2)


def test_gpt_oss_kept_in_mxfp4_equals_hf_dequantized_through_graphs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A tiny gpt-oss folder with MXFP4 experts loads on CUDA with them kept (engine/mxfp4.py) and
    decodes through the graphs as Hugging Face does on the weights they stand for."""
    from engine.config import ModelConfig
    from engine.model_loader import load_model
    from engine.model_runner import ModelRunner
    from engine.moe import Mxfp4
    from tests.cpu.test_model_loader import _mxfp4_checkpoint

    want = _mxfp4_checkpoint(tmp_path).to("cuda")
    model = load_model(ModelConfig(path=str(tmp_path), device="cuda", dtype="float32"))
    runner = ModelRunner(model, num_blocks=32 * 16, block_size=16)
    assert isinstance(runner.layers[0].mlp.gate_up, Mxfp4)
    runner.use_decode_graphs(64, max_model_len=256)
    prompts = _prompts(16, seed=7)
    assert _decode(runner, prompts, 12) == [_hf(want, p, 12) for p in prompts]
    assert runner.graphs is not None and runner.graphs.replays > 0


@pytest.mark.parametrize("M", [1, 16, 64, 300])  # a decode step's rows (both tile shapes) and a prompt's
def test_the_fp8_matmul_in_bf16_equals_torch_on_the_dequantized_weights(M: int) -> None:
    """An 8B layer's gate|up (28672 x 4096) in FP8 with a scale per 128 of a row, bf16 rows."""
    from engine.triton_fp8 import dequantize, matmul_fp8, quantize

    g = torch.Generator(device="cuda").manual_seed(M)
    codes, scale = quantize(torch.randn(28672, 4096, device="cuda", generator=g) * 0.02)
    x = torch.randn(M, 4096, device="cuda", generator=g).bfloat16()
    ref = torch.nn.functional.linear(x, dequantize(codes, scale, torch.bfloat16))
    torch.testing.assert_close(matmul_fp8(x, codes, scale, None), ref, atol=2e-2, rtol=2e-2)


def test_fp8_kept_and_quantized_on_load_equal_hf_dequantized_through_graphs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Tiny block-quantized FP8 Qwen 3 and Qwen 3 MoE folders load on CUDA with their linear layers and
    experts kept FP8 (engine/fp8.py), and the tiny Llama with model.quantization: fp8; each decodes
    through the graphs as Hugging Face does on the weights the codes stand for."""
    import copy

    from engine.config import ModelConfig
    from engine.model_loader import load_model
    from engine.model_runner import ModelRunner
    from engine.triton_fp8 import dequantize
    from tests.cpu.test_fp8 import _fp8_checkpoint

    want = _fp8_checkpoint(tmp_path / "dense").to("cuda")
    want_moe = _fp8_checkpoint(tmp_path / "moe", arch="qwen3_moe").to("cuda")  # experts stored one by one
    quantized = load_model(ModelConfig(path="tiny", device="cuda", quantization="fp8"))
    want_q = copy.deepcopy(quantized)
    for m in want_q.modules():
        if hasattr(m, "weight_scale"):
            m.weight = torch.nn.Parameter(dequantize(m.weight, m.weight_scale, torch.float32), requires_grad=False)
    for model, ref in [(load_model(ModelConfig(path=str(tmp_path / "dense"), device="cuda")), want),
                       (load_model(ModelConfig(path=str(tmp_path / "moe"), device="cuda")), want_moe), (quantized, want_q)]:
        runner = ModelRunner(model, num_blocks=32 * 16, block_size=16)
        assert runner.layers[0].qkv.weight.dtype == torch.float8_e4m3fn and runner.layers[0].qkv.scale is not None
        runner.use_decode_graphs(64, max_model_len=256)
        prompts = _prompts(16, seed=7)
        assert _decode(runner, prompts, 12) == [_hf(ref, p, 12) for p in prompts]
        assert runner.graphs is not None and runner.graphs.replays > 0


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2"])
def test_fp8_experts_and_latent_attention_through_graphs_equal_hf_dequantized(arch: str) -> None:
    """model.quantization fp8 on a mixture of experts (FP8 grouped matmuls) and DeepSeek's latent
    attention (Hugging Face's modules, made Fp8Linear): greedy through the graphs == HF on the
    dequantized weights; HF's own forward of the quantized model runs (the KV budget's profile)."""
    import copy

    from engine import fp8
    from engine.kv_budget import profile_peak
    from engine.model_runner import ModelRunner
    from tests.cpu.test_fp8 import dequantize_into

    model = _model(arch=arch)
    want = copy.deepcopy(model)
    fp8.quantize_model(model)
    dequantize_into(want, model)
    runner = ModelRunner(model, num_blocks=32 * 16, block_size=16)
    runner.use_decode_graphs(64, max_model_len=256)
    prompts = _prompts(16, seed=7)
    assert _decode(runner, prompts, 12) == [_hf(want, p, 12) for p in prompts]
    assert runner.graphs is not None and runner.graphs.replays > 0
    assert profile_peak(model, 256) > 0


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9), reason="FP8: sm_89+")
def test_an_fp8_kv_cache_through_graphs_computes_as_kv_rounded_to_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    """kv_cache.dtype fp8 on CUDA: 16 prompts, then decode steps through the graphs; each step's logits
    are those of an eager runner whose float32 cache has each K and V rounded to FP8 by torch."""
    from engine.model_runner import ModelRunner, SeqInput
    from tests.cpu.test_kv_fp8 import _rounding_store

    model = _model()
    fp8 = ModelRunner(model, num_blocks=32 * 16, block_size=16, kv_dtype=torch.float8_e4m3fn)
    fp8.use_decode_graphs(64, max_model_len=256)
    ref = ModelRunner(model, num_blocks=32 * 16, block_size=16)
    _rounding_store(monkeypatch)
    prompts = _prompts(16, seed=3)
    tables = [list(range(i * 16, (i + 1) * 16)) for i in range(len(prompts))]
    seqs = [SeqInput(p, 0, t) for p, t in zip(prompts, tables)]
    out = [list(p) for p in prompts]
    for _ in range(8):
        got, want = fp8.forward(seqs), ref.forward(seqs)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        for o, tok in zip(out, got.argmax(-1).tolist()):
            o.append(tok)
        seqs = [SeqInput([o[-1]], len(o) - 1, t) for o, t in zip(out, tables)]
    assert fp8.graphs is not None and fp8.graphs.replays > 0


def test_an_fp8_latent_cache_on_cuda_computes_as_latents_rounded_to_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSeek with kv_cache.dtype fp8 on CUDA: packed prompts and a later chunk (their latents gathered
    from the FP8 cache as bytes, then expanded), a mixed step and a decode step through the graphs —
    each step's logits those of an eager runner whose float32 cache holds the latents rounded to FP8 by torch."""
    from engine.model_runner import ModelRunner
    from tests.cpu.test_mla import _steps, rounding_latent_store

    model = _model(arch="deepseek_v2")
    fp8 = ModelRunner(model, num_blocks=8, block_size=16, kv_dtype=torch.float8_e4m3fn)
    fp8.use_decode_graphs(4, max_model_len=128)
    ref = ModelRunner(model, num_blocks=8, block_size=16)
    rounding_latent_store(monkeypatch)
    for seqs in _steps(model.config.vocab_size):
        torch.testing.assert_close(fp8.forward(seqs), ref.forward(seqs), atol=1e-4, rtol=1e-4)
    assert fp8.graphs is not None and fp8.graphs.replays > 0


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "deepseek_v2"])  # qwen3_moe: the experts' grouped matmuls
def test_bf16_graphs_equal_bf16_eager(arch: str) -> None:  # in the graphs; deepseek_v2: the latent kernels
    from engine.model_runner import ModelRunner

    model = _model(torch.bfloat16, arch)
    prompts = _prompts(16, seed=3)
    eager = ModelRunner(model, num_blocks=16 * 16, block_size=16)
    eager_out = _decode(eager, prompts, 10)
    graphs = ModelRunner(model, num_blocks=16 * 16, block_size=16)
    graphs.use_decode_graphs(16, max_model_len=256)
    assert _decode(graphs, prompts, 10) == eager_out
    assert graphs.graphs is not None and graphs.graphs.replays > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_the_latent_decode_kernel_at_deepseeks_shape_equals_attention_written_out(dtype: torch.dtype) -> None:
    """DeepSeek-V2-Lite's latent attention (16 heads over latents of 512 + 64), bf16 queries over a bf16
    or FP8 cache, where the interpreter cannot check the kernel's tensor-core dots: decode (split in 4
    and not) == SDPA in fp32 over the same values."""
    from engine import mla, triton_mla
    from tests.cpu.test_mla import _reference

    g = torch.Generator(device="cuda").manual_seed(0)
    H, r, R, bs = 16, 512, 64, 16
    kc, vc = ((torch.randn(64, bs, 1, (r + R) // 2, device="cuda", generator=g)).to(dtype) for _ in range(2))
    tables = torch.randperm(64, device="cuda", generator=g)[:60].view(2, 30)
    lens = torch.tensor([470, 33], device="cuda")
    keys = [mla.whole(kc.float()[t].view(-1, (r + R) // 2), vc.float()[t].view(-1, (r + R) // 2), r) for t in tables]
    q = torch.randn(2, H, r + R, device="cuda", generator=g).bfloat16()
    for splits in (1, 4):
        got = triton_mla.decode(q, kc, vc, tables, lens, 0.07, R, splits=splits)
        for i in range(2):
            want = _reference(q[i : i + 1].float(), keys[i][: lens[i]], lens[i : i + 1] - 1, r, 0.07)
            torch.testing.assert_close(got[i : i + 1].float(), want, atol=2e-2, rtol=2e-2)


def test_seeded_sampling_on_cuda_is_batch_independent() -> None:
    from engine.sampler import sample
    from engine.types import SamplingParams

    x = torch.randn(8, 32000, device="cuda")
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7)
    alone = sample(x[3:4], [p], [11])[0]
    crowd = sample(x, [SamplingParams(temperature=1.0)] * 3 + [p] + [SamplingParams()] * 4, [11] * 8)[0]
    assert crowd[3] == alone[0]
    cpu = sample(x[3:4].cpu(), [p], [11])[0]
    assert cpu == alone  # the same draw on CPU and GPU: the noise is a hash, not a device RNG


def test_a_grammars_mask_on_cuda_draws_what_it_draws_on_cpu() -> None:
    """Structured outputs: the same rows (guided and not, greedy and seeded) give the same tokens on
    CUDA as on CPU, and a guided row only what its grammar allows."""
    import json

    from engine.sampler import sample
    from engine.structured import Guides, grammar_text
    from engine.tiny import tiny_tokenizer
    from engine.types import SamplingParams

    tok = tiny_tokenizer()
    guides = Guides(tiny_tokenizer, 259)
    grammar = grammar_text("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "string"}}}))
    gs = [guides.new(grammar) if i % 2 else None for i in range(8)]
    for g in gs:
        if g is not None:
            g.follow(tok('{"a":"x')["input_ids"])
    params = [SamplingParams(temperature=0.0 if i % 4 < 2 else 1.0, seed=i) for i in range(8)]
    x = torch.randn(8, 259, generator=torch.Generator().manual_seed(2)) * 3
    on_cpu = sample(x, params, list(range(8)), guides=gs)[0]
    assert sample(x.cuda(), params, list(range(8)), guides=gs)[0] == on_cpu
    assert all(g.matcher.validate_tokens([t]) == 1 for t, g in zip(on_cpu, gs) if g is not None)


def test_every_way_of_the_draw_on_cuda_draws_what_a_sort_draws_and_what_cpu_draws(monkeypatch) -> None:
    """engine/race.py's three ways (top-k candidates, the nucleus race walk, the whole sort) on CUDA:
    the same tokens as sorting every row on CUDA, and as the same batch on CPU."""
    from engine import race
    from engine.sampler import _row_keys, sample
    from tests.cpu.test_sampler import _mixed_batch

    monkeypatch.setattr(race, "CANDIDATES", 64)
    monkeypatch.setattr(race, "RACERS", 2)
    n, vocab = 336, 3000
    logits, params = _mixed_batch(n, vocab)
    gpu = logits.cuda()
    keys = torch.tensor(_row_keys(params, list(range(n))), device="cuda")
    want, _ = race._race(race._filter_sorted(race._scaled(gpu, params), params), keys, vocab)
    got, _ = sample(gpu, params, list(range(n)))
    assert got == want.tolist()
    assert got == sample(logits, params, list(range(n)))[0]


def test_a_step_in_flights_draw_never_waits_for_the_device_and_draws_what_sample_draws() -> None:
    """sample_queued() (engine/sampler.py), what a step in flight samples with, for greedy and drawn
    rows, logprobs, penalties, a logit_bias, allowed_token_ids, banned tokens and a grammar's mask:
    no synchronizing call at all (torch's sync debug mode raises on one), so a forward queued before
    it is not waited for; the same tokens and logprobs as sample()."""
    from engine.sampler import History, sample, sample_queued
    from engine.structured import Guides, grammar_text
    from engine.tiny import tiny_tokenizer
    from engine.types import SamplingParams
    from tests.cpu.test_sampler import _mixed_batch

    logits, params = _mixed_batch(64, 32000)
    params[::4] = [SamplingParams(logprobs=2)] * len(params[::4])  # greedy rows among them
    params[1] = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, temperature=0.8, seed=1)
    params[2] = SamplingParams(logit_bias=((7, 50.0), (8, -3.0)), temperature=1.0, seed=2)
    params[3] = SamplingParams(allowed_token_ids=(11, 12, 13), logprobs=1)
    params[5] = SamplingParams(temperature=0.9, seed=5, min_tokens=3)
    guide = Guides(tiny_tokenizer, 32000).new(grammar_text("regex", r"(ab|cd)+!"))
    histories = [History([1, 2, 3], [4, 5]) if i == 1 else None for i in range(64)]
    banned = [(2, 9) if i == 5 else () for i in range(64)]
    guides = [guide if i == 6 else None for i in range(64)]
    args = (params, list(range(64)), histories, banned, guides)
    gpu = logits.cuda()
    sample_queued(gpu, *args).collect()  # warm-up: the token hashes, the pinned pool, the bit table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        queued = sample_queued(gpu, *args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert queued.collect() == sample(gpu, *args)


def test_kv_sized_from_memory_fits_its_share() -> None:
    from engine import kv_budget
    from engine.config import KVCacheConfig

    model = _model(torch.bfloat16)
    total = torch.cuda.mem_get_info()[1]
    n = kv_budget.num_blocks(KVCacheConfig(gpu_memory_utilization=0.1), model, 0.5, 256, 2048)
    per = kv_budget.block_bytes(model.config, 16, torch.bfloat16)
    assert 2048 // 16 <= n and n * per <= 0.05 * total


def test_the_memory_profile_counts_what_prompt_logprobs_take() -> None:
    """A request with prompt logprobs takes the log-softmax of 256 positions over the vocabulary in
    fp32 beside its logits: with a large vocabulary that is most of a step's peak, and the KV budget
    must leave room for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine import kv_budget
    from engine.prompt_scores import SCORE_ROWS

    cfg = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    weights = torch.cuda.memory_allocated()
    peak = kv_budget.profile_peak(model, 512)
    assert peak - weights >= 2 * SCORE_ROWS * cfg.vocab_size * 4, (peak - weights) / 2**20


def test_the_memory_profile_counts_the_sampler_at_the_largest_batch() -> None:
    """At 512 rows of a 128k vocabulary the sampler's temporaries (a sort's values and indices,
    penalty counts, logprobs) take GBs: the profile counts them, and a real batch of mixed rows
    sampled either way (a complete turn's, a step in flight's) stays under the profiled peak."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine import kv_budget
    from engine.sampler import History, sample, sample_queued
    from tests.cpu.test_sampler import _mixed_batch

    cfg = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    weights = torch.cuda.memory_allocated()
    peak = kv_budget.profile_peak(model, 16, sample_rows=512)
    assert peak - weights >= 512 * cfg.vocab_size * (4 + 8), (peak - weights) / 2**20  # a full sort, at least
    logits, params = _mixed_batch(512, cfg.vocab_size)
    params[::5] = [type(params[0])(repetition_penalty=1.2, logprobs=5)] * len(params[::5])
    histories = [History([1, 2, 3], [4] * 100) for _ in params]
    for how in (sample, lambda *a: sample_queued(*a).collect()):
        torch.cuda.empty_cache()  # as num_blocks does after profiling: the step allocates afresh
        gpu = logits.cuda()
        torch.cuda.reset_peak_memory_stats()
        how(gpu, params, list(range(512)), histories)
        assert torch.cuda.max_memory_reserved() <= peak, (torch.cuda.max_memory_reserved() / 2**20, peak / 2**20)
        del gpu


def test_fused_layer_ops_in_bf16_equal_the_hf_modules() -> None:
    """engine/triton_fused.py compiled for this GPU, in bf16 (the interpreter cannot run bf16 dots, so
    the CPU suite checks fp32/fp16 only): RMSNorm with the residual add, rotary + store, SiLU * up."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from engine import triton_fused as fused

    g = torch.Generator(device="cuda").manual_seed(0)
    bf = torch.bfloat16
    x, r = (torch.randn(64, 2048, device="cuda", generator=g).to(bf) for _ in range(2))
    norm = LlamaRMSNorm(2048).to("cuda", bf)
    norm.weight.data = (1 + 0.2 * torch.randn(2048, device="cuda", generator=g)).to(bf)
    out, res = fused.add_rms_norm(x, r, norm.weight, norm.variance_epsilon)
    assert torch.equal(res, r + x)
    torch.testing.assert_close(out, norm(r + x), atol=2e-2, rtol=2e-2)

    T, H, KVH, D = 64, 32, 4, 64
    qkv = torch.randn(T, (H + 2 * KVH) * D, device="cuda", generator=g).to(bf)
    q, k, v = qkv[:, : H * D].view(T, H, D), qkv[:, H * D : (H + KVH) * D].view(T, KVH, D), qkv[:, (H + KVH) * D :].view(T, KVH, D)
    ang = torch.arange(T, device="cuda")[:, None] * (10000 ** (-torch.arange(0, D, 2, device="cuda") / D))[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos().to(bf), emb.sin().to(bf)
    kc, vc = torch.zeros(8, 16, KVH, D, device="cuda", dtype=bf), torch.zeros(8, 16, KVH, D, device="cuda", dtype=bf)
    slots = torch.arange(T, device="cuda")
    q_out = fused.rope_store(q, k, v, cos, sin, kc, vc, slots)
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.equal(q_out, q_ref[0].transpose(0, 1))  # the same rounding steps, elementwise: exact
    assert torch.equal(kc.view(-1, KVH, D)[:T], k_ref[0].transpose(0, 1)) and torch.equal(vc.view(-1, KVH, D)[:T], v)

    gate_up = torch.randn(T, 2 * 5632, device="cuda", generator=g).to(bf)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.act_mul(gate_up), torch.nn.functional.silu(gate) * up, atol=1e-2, rtol=1e-2)


_STICKY_FAULT = """
import torch, triton, triton.language as tl
from engine.model_runner import ModelRunner

@triton.jit
def _poke(p):
    tl.store(p + (1 << 40), 1.0)  # far outside any allocation: an illegal address

class Runner:
    device = torch.device("cuda")

before = ModelRunner.device_ok(Runner())
try:
    _poke[(1,)](torch.zeros(1, device="cuda"))
    torch.cuda.synchronize()
except Exception as e:
    print("fault:", type(e).__name__, str(e).splitlines()[0])
print("device_ok", before, ModelRunner.device_ok(Runner()))
"""


def test_device_ok_tells_a_sticky_kernel_fault(tmp_path) -> None:
    """What makes a worker exit for a restart (engine/step_loop.py): after an illegal memory access
    every CUDA call of the process fails, and device_ok() says so (in a subprocess: the fault
    would poison this one's context; from a file, since Triton reads a kernel's source)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "sticky_fault.py"
    script.write_text(_STICKY_FAULT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert p.stdout.strip().splitlines()[-1:] == ["device_ok True False"], p.stdout + p.stderr[-2000:]
