"""The GPU decode step against its floor and against HF generate, same GPU, same run.

    python bench/make_model.py --shape 1.1b --out /tmp/llama-1.1b --device cuda --dtype bfloat16
    python bench/gpu_step.py --model-path /tmp/llama-1.1b --batches 1,16,64 --output $OUT/step-1.1b.json

Per batch size B, contexts of --context tokens:
  floor     the shape's linear layers + LM head on [B, hidden], replayed as one CUDA graph: the weights
            read once per step (what no decode step can beat); a mixture of experts' layers as
            their routed grouped matmuls (each expert the batch picks read once); with
            --quantization fp8, FP8 linear layers by their own kernel (engine/triton_fp8.py)
  graphs    pdserve's decode step: ModelRunner (Triton attention) through its CUDA graph + the sampler
            (graphs_unsplit: the same with the decode kernel's keys not split, where they are split)
  eager     the same step without graphs
  other experts  a mixture of experts' step through graphs with its other grouped matmul (torch's
            grouped_mm ↔ the Triton kernel, engine/triton_moe.py): which one to keep, by measurement
  hf        HF generate, per new token (time of 33 new tokens minus time of 1, over 32)
Medians over --steps steps, timed with CUDA events after a warm-up. --profile writes a torch
profile of one eager and one graph step per batch (top kernels by CUDA time) next to the JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine import triton_attention as tat  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.model_loader import load_model  # noqa: E402
from engine.layer_ops import TorchOps  # noqa: E402
from engine.linear import Linear  # noqa: E402
from engine.mla import Latent  # noqa: E402
from engine.model_runner import ModelRunner, SeqInput  # noqa: E402
from engine.moe import Experts  # noqa: E402
from engine.sampler import sample  # noqa: E402
from engine.types import SamplingParams  # noqa: E402


def _median_ms(fn, steps: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _mm(lin: Linear, h: torch.Tensor) -> torch.Tensor:
    """h · Wᵀ: cuBLAS on a plain weight; an FP8 one (engine/fp8.py) by its own kernel, which is then
    the floor's (its speed, not the hardware's)."""
    return F.linear(h, lin.weight) if lin.scale is None else lin(h)


def _mlp_floor(mlp: object, h: torch.Tensor) -> torch.Tensor:
    """A dense MLP's two matmuls (act * up skipped); a mixture of experts' routed grouped matmuls
    (engine/moe.py: each expert the batch touches read once)."""
    if isinstance(mlp, Experts):
        return mlp(h, TorchOps.act_mul)
    inter = mlp.down_proj.weight.shape[1]  # type: ignore[attr-defined]
    gu = _mm(mlp.gate_up, h)  # type: ignore[attr-defined]
    return _mm(mlp.down_proj, gu[:, :inter].contiguous())  # type: ignore[attr-defined]


def floor_ms(runner: ModelRunner, batch: int, steps: int) -> float:
    hidden = runner.model.config.hidden_size
    x = torch.randn(batch, hidden, dtype=runner.dtype, device=runner.device)
    o_in = runner.layers[0].o_proj.weight.shape[1]
    attn = torch.randn(batch, o_in, dtype=runner.dtype, device=runner.device)  # [B, H*D]: o_proj's input
    o_lat = (torch.randn(batch, runner.num_heads, runner.layers[0].qkv.rank, dtype=runner.dtype, device=runner.device)
             if isinstance(runner.layers[0].qkv, Latent) else attn)  # DeepSeek: o_lat (engine/mla.py)

    def linears() -> torch.Tensor:
        h = x
        for layer in runner.layers:
            if isinstance(layer.qkv, Latent):
                layer.qkv.project(h)
                a = layer.qkv.output(o_lat)
            else:
                _mm(layer.qkv, h)
                a = attn
            h = _mlp_floor(layer.mlp, _mm(layer.o_proj, a))
        return F.linear(h, runner.lm_head.weight)

    linears()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        linears()
    graph.replay()
    return _median_ms(graph.replay, steps)


def step_ms(runner: ModelRunner, batch: int, context: int, steps: int, profile: Path | None) -> float:
    bs = runner.block_size
    per = -(-(context + steps + 8) // bs)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(batch)]
    params = [SamplingParams()] * batch
    pos = [context]

    def one() -> None:
        seqs = [SeqInput([100 + i], pos[0], t) for i, t in enumerate(tables)]
        sample(runner.forward(seqs), params, [pos[0] + 1] * batch)
        pos[0] += 1

    for _ in range(3):
        one()
    if profile is not None:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            one()
            torch.cuda.synchronize()
        profile.write_text(p.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    pos[0] = context
    return _median_ms(one, steps)


def hf_ms(model: torch.nn.Module, batch: int, context: int) -> float:
    ids = torch.randint(100, 1000, (batch, context), device="cuda")

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(2)
    return (gen(33) - gen(1)) / 32 * 1000


def _swap_experts(runner: ModelRunner) -> bool:
    """Each mixture-of-experts layer's grouped matmul swapped (torch's ↔ engine/triton_moe.py);
    → whether the runner had the Triton one before."""
    before = False
    for i, layer in enumerate(runner.layers):
        if isinstance(layer.mlp, Experts):
            before = layer.mlp.triton
            runner.layers[i] = replace(layer, mlp=replace(layer.mlp, triton=not before))
    return before


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--quantization", default="none", choices=("none", "fp8"),
                    help="model.quantization: fp8 — the linear layers in FP8, the floor then by the FP8 kernel")
    ap.add_argument("--kv-dtype", default="auto", choices=("auto", "fp8"), help="kv_cache.dtype")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--output", default="bench/results/gpu_step.json")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    mcfg = ModelConfig(path=a.model_path, dtype=a.dtype, device="cuda", max_model_len=a.context + a.steps + 64,
                       quantization=a.quantization)
    model = load_model(mcfg)
    bs = 16
    blocks = max(batches) * -(-(a.context + a.steps + 8) // bs)
    runner = ModelRunner(model, blocks, bs, "auto", kv_dtype=torch.float8_e4m3fn if a.kv_dtype == "fp8" else None)
    assert runner.attn.name == "triton", runner.attn.name
    out_dir = Path(a.output).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for b in batches:
        tag = Path(a.output).stem
        row = {"batch": b, "floor_ms": floor_ms(runner, b, a.steps)}
        runner.graphs = None
        row["eager_ms"] = step_ms(runner, b, a.context, a.steps, out_dir / f"{tag}-eager-b{b}.txt" if a.profile else None)
        t0 = time.perf_counter()
        runner.use_decode_graphs(b, mcfg.max_model_len)
        row["capture_s"] = time.perf_counter() - t0
        row["graphs_ms"] = step_ms(runner, b, a.context, a.steps, out_dir / f"{tag}-graphs-b{b}.txt" if a.profile else None)
        row["graphs_tok_s"] = b / row["graphs_ms"] * 1000
        row["graphs_over_floor"] = row["graphs_ms"] / row["floor_ms"]
        row["decode_splits"] = tat.decode_splits(b, runner.attn.num_kv_heads, runner.attn.num_sms)
        if row["decode_splits"] > 1:  # the same graphs without splitting the keys: does splitting pay?
            sms, runner.attn.num_sms = runner.attn.num_sms, 1
            runner.use_decode_graphs(b, mcfg.max_model_len)
            row["graphs_unsplit_ms"] = step_ms(runner, b, a.context, a.steps, None)
            runner.attn.num_sms = sms
        if any(isinstance(layer.mlp, Experts) for layer in runner.layers):  # the other grouped matmul, same graphs
            row["experts"] = "triton" if _swap_experts(runner) else "torch grouped_mm"
            runner.use_decode_graphs(b, mcfg.max_model_len)
            row["graphs_other_experts_ms"] = step_ms(runner, b, a.context, a.steps, None)
            _swap_experts(runner)
        if not a.no_hf:
            row["hf_ms"] = hf_ms(model, b, a.context)
        rows.append(row)
        print(json.dumps(row), flush=True)
        runner.graphs = None
    out = {"model": a.model_path, "dtype": a.dtype, "quantization": a.quantization, "kv_dtype": a.kv_dtype, "context": a.context, "steps": a.steps,
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    Path(a.output).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
