"""Compile every Triton kernel of the CUDA path for a real GPU target, on a machine without one.

Triton's interpreter (how the CPU suite runs the kernels) checks what they compute, not whether
they compile: shapes `tl.dot` refuses, a type that changes across a loop, registers or shared
memory over the limit only show up in the compiler. Here a one-layer ModelRunner of each model shape
(a mixture of experts' too, whose experts take the Triton grouped matmul here) runs its forwards on CPU with every kernel launch recorded instead of run, and each distinct
recorded signature + constexprs are compiled by Triton to a cubin for sm_90 (H100; `--sm 80` for
A100) — the same compiler and ptxas the GPU uses, no driver needed. Each compile prints one JSON
line with the cubin's registers a thread and its spill stack (cuobjdump, shipped with Triton).

    TRITON_INTERPRET=0 python -m tests.cpu.sm90_compile [--sm 90,80] [--runs test:float32,8b:bfloat16]
Run by tests/cpu/test_triton_compile.py in a subprocess (the interpreter must be off when the kernels
are defined).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from bench.make_model import SHAPES, config

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
         torch.int64: "i64", torch.uint8: "u8", torch.float8_e4m3fn: "fp8e4nv"}
SHAPES_ = {**SHAPES, "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                           num_key_value_heads=3, intermediate_size=1536, vocab_size=49152)}


class _Recorder:
    """Stands in for a JITFunction: `rec[grid](*args, **constexprs)` records the launch, runs nothing."""

    def __init__(self, fn: Any, seen: list[tuple[Any, tuple, dict]]) -> None:
        self.fn, self.seen = fn, seen

    def __getitem__(self, grid: object) -> Any:
        return lambda *args, **kwargs: self.seen.append((self.fn, args, kwargs))


def _signature(fn: Any, args: tuple, kwargs: dict) -> tuple[dict[str, str], dict[tuple[int, ...], Any]]:
    sig: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    free = iter(args)
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs[(i,)] = kwargs[p.name]
            continue
        a = next(free)
        if isinstance(a, torch.Tensor):
            sig[p.name] = "*" + TYPES[a.dtype]
        elif isinstance(a, bool):
            sig[p.name] = "i1"
        elif isinstance(a, int):
            sig[p.name] = "i32" if -(2**31) <= a < 2**31 else "i64"
        else:
            sig[p.name] = "fp32"
    return sig, constexprs


def launches(runs: list[tuple[str, torch.dtype]], num_sms: int = 132) -> list[tuple[Any, tuple, dict]]:
    """The kernel launches a ModelRunner makes on an H100 (`num_sms`) for one layer of each (model
    shape, dtype) of `runs`: a packed prefill with a later chunk, a mixed step, a decode step of every graph bucket up to
    64 (each its own flash-decoding split), and once more with 64-bit cache offsets (a cache of 2**31
    elements or more)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine import triton_attention as ta
    from engine import triton_fp8 as tfp
    from engine import triton_fused as tf
    from engine import triton_mla as tl_mla
    from engine import triton_moe as tm
    from engine import triton_mxfp4 as tmx
    from engine.cuda_graphs import buckets
    from engine.model_runner import ModelRunner, SeqInput

    seen: list[tuple[Any, tuple, dict]] = []
    for mod, name in [(ta, "_paged_decode"), (ta, "_merge_splits"), (ta, "_paged_prefill"),
                      (tf, "_add_rms_norm"), (tf, "_rope_store"), (tf, "_act_mul"), (tm, "_grouped_matmul"),
                      (tmx, "_grouped_matmul_mxfp4"), (tfp, "_matmul_fp8"), (tfp, "_grouped_matmul_fp8"),
                      (tl_mla, "_latent_rope_store"), (tl_mla, "_latent_decode")]:
        setattr(mod, name, _Recorder(getattr(mod, name), seen))
    off64, bits = ta._off64, tfp.bits
    bs = 16
    for run, dt, wide in [(n, dt, False) for n, dt in runs] + [(*runs[-1], True)]:
        # "8b+fp8": its linear layers in FP8 (engine/fp8.py), "+fp8bits" read as bytes; "8b+kv8": its KV cache
        # in FP8 (kv_cache.dtype)
        name, _, quant = run.partition("+")
        ta._off64 = (lambda kc: True) if wide else off64
        # one layer, a small MLP, 8 experts and vocabulary: what the kernels see (head, hidden and expert
        # sizes) is the shape's
        small = {"num_hidden_layers": 1, "intermediate_size": 256, "vocab_size": 512}
        torch.manual_seed(0)
        experts = {k: 8 for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in SHAPES[name]}
        cfg = (config(name, **small, **experts)
               if name in SHAPES else LlamaConfig(**{**SHAPES_[name], **small}))
        model = AutoModelForCausalLM.from_config(cfg).to(dt)
        if name.startswith("gpt-oss"):  # its experts as released and kept on CUDA: MXFP4 (engine/mxfp4.py)
            for layer in model.model.layers:
                for proj in ("gate_up_proj", "down_proj"):
                    E, K, N = getattr(layer.mlp.experts, proj).shape
                    setattr(layer.mlp.experts, proj + "_blocks", torch.zeros(E, N, K // 2, dtype=torch.uint8))
                    setattr(layer.mlp.experts, proj + "_scales", torch.full((E, N, K // 32), 127, dtype=torch.uint8))
        if quant in ("fp8", "fp8bits"):  # fp8bits: the codes read as bytes, as on a GPU before sm_89 (an A100)
            from engine.fp8 import quantize_model

            quantize_model(model)
        tfp.bits = (lambda device: True) if quant == "fp8bits" else bits
        runner = ModelRunner(model, num_blocks=80, block_size=bs, kernels="triton",
                             kv_dtype=torch.float8_e4m3fn if quant == "kv8" else None)
        runner.attn.num_sms = num_sms  # type: ignore[union-attr]
        table = list(range(16))
        runner.forward([SeqInput(list(range(3, 43)), 0, table), SeqInput(list(range(3, 23)), 16, table)])
        runner.forward([SeqInput([5], 30, table), SeqInput(list(range(3, 13)), 0, table)])  # decode + prompt
        runner.use_decode_graphs(max_batch=64, max_model_len=256, capture=False)  # (after: prompts as rows there)
        for b in buckets(64):
            runner.forward([SeqInput([5], 30 + i, table) for i in range(b)])
    ta._off64, tfp.bits = off64, bits
    return seen


def _resources(cubin: bytes) -> dict[str, int]:
    """Registers a thread and spill stack bytes of a cubin's kernel (cuobjdump -res-usage)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2))} if m else {}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sm", default="90", help="compute capabilities, comma-separated")
    ap.add_argument("--runs", default=",".join(f"{n}:{d}" for n in SHAPES_ for d in ("float32", "bfloat16")),
                    help=f"shape:dtype, comma-separated; shapes {sorted(SHAPES_)}")
    a = ap.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    done: set[str] = set()
    failed = 0
    for fn, args, kwargs in launches([(r.split(":")[0], getattr(torch, r.split(":")[1])) for r in a.runs.split(",")]):
        sig, constexprs = _signature(fn, args, kwargs)
        for cc in [int(c) for c in a.sm.split(",")]:
            key = json.dumps([fn.__name__, sig, sorted((k[0], v) for k, v in constexprs.items()), cc], default=str)
            if key in done:
                continue
            done.add(key)
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"kernel": fn.__name__, "sm": cc, "sig": sig,
                                   "constexprs": {fn.params[k[0]].name: v for k, v in constexprs.items()}}
            try:
                k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                   target=GPUTarget("cuda", cc, 32), options={"num_warps": kwargs.get("num_warps", 4)})
                rec.update(ok=True, shared_bytes=k.metadata.shared, num_warps=k.metadata.num_warps,
                           **_resources(k.asm["cubin"]))
            except Exception as e:  # noqa: BLE001 — reported, the test names the failing kernel
                failed += 1
                rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            print(json.dumps(rec, default=str), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: the interpreter replaces the kernels this compiles")
    sys.exit(main())
