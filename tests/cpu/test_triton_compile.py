"""Every Triton kernel of the CUDA path compiles for sm_90 (H100) at the launches the runner makes for
the tiny test shape in fp32 (the GPU tests'), the 1.1B and 8B shapes in bf16 and Qwen3-30B-A3B's layer
(its experts' grouped matmul) in fp16 and bf16, Gemma 3 1B's (head_dim 256, windows) and Gemma 2
2B's (the same with soft-capped scores), GLM-4-9B's (interleaved rotary, 16 query heads a KV head) and
OLMo-2-7B's (its norm's rounding) and gpt-oss-20b's (attention sinks, its MXFP4 experts) and DeepSeek-V2-Lite's (its latent attention: engine/triton_mla.py, prompts over expanded heads of 192; with an FP8 cache too) and the 8B's with FP8
linear layers (engine/fp8.py), Qwen3-30B-A3B's with FP8 experts, and the 8B's with its KV cache in FP8 (kv_cache.dtype) in bf16 — checked here, without a GPU, by Triton's own compiler
and ptxas (tests/cpu/sm90_compile.py). The interpreter the other tests use cannot see a kernel that
fails to compile, nor one that spills registers to local memory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"_paged_decode", "_merge_splits", "_paged_prefill", "_add_rms_norm", "_rope_store", "_act_mul",
           "_grouped_matmul", "_grouped_matmul_mxfp4", "_matmul_fp8", "_grouped_matmul_fp8", "_latent_rope_store",
           "_latent_decode"}


def _has_ptxas() -> bool:
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def _compiled(sm: str, runs: str, procs: int = 2) -> list[dict]:
    """tests/cpu/sm90_compile.py's records for GPU targets `sm` and model runs `runs`; every compile ok.
    The runs are split among `procs` processes at once (ptxas and Triton's compiler take one core
    each; the kernel cache on disk is safe to share)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    parts = runs.split(",")
    groups = [",".join(parts[i::procs]) for i in range(min(procs, len(parts)))]
    ps = [subprocess.Popen([sys.executable, "-m", "tests.cpu.sm90_compile", "--sm", sm, "--runs", g],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for g in groups]
    try:
        done = [p.communicate(timeout=600) for p in ps]
    finally:
        for p in ps:
            p.kill()
    recs = [json.loads(line) for out, _ in done for line in out.splitlines() if line.startswith("{")]
    failed = [f"{r['kernel']} sm_{r['sm']} {r['constexprs']}: {r['error']}" for r in recs if not r["ok"]]
    assert not failed, "\n".join(failed)
    for p, (_, err) in zip(ps, done):
        assert p.returncode == 0, err[-3000:]
    return recs


@pytest.mark.skipif(not _has_ptxas(), reason="this Triton build has no NVIDIA backend")
def test_every_kernel_compiles_for_sm90_and_bf16_kernels_do_not_spill() -> None:
    recs = _compiled("90", "test:float32,1.1b:bfloat16,8b:bfloat16,qwen3-a3b-24l:float16,qwen3-a3b-24l:bfloat16,"
                           "gemma3-1b:bfloat16,gemma2-2b:bfloat16,glm4-9b:bfloat16,olmo2-7b:bfloat16,"
                           "gpt-oss-20b:bfloat16,deepseek-v2-lite:bfloat16,deepseek-v2-lite+kv8:bfloat16,8b+fp8:bfloat16,"
                           "8b+kv8:bfloat16,"
                           "qwen3-a3b-24l+fp8:bfloat16")
    assert {r["kernel"] for r in recs} == KERNELS
    assert {r["constexprs"].get("OFF64") for r in recs if r["kernel"] == "_paged_decode"} == {False, True}
    assert {r["constexprs"].get("SPLITS") for r in recs if r["kernel"] == "_paged_decode"} >= {1, 2, 16}
    assert {r["constexprs"].get("PAIRS") for r in recs if r["kernel"] == "_rope_store"} == {False, True}
    assert {r["constexprs"].get("BLOCK_M") for r in recs if r["kernel"] == "_matmul_fp8"} == {16, 64}  # decode, prompt
    assert {r["constexprs"].get("FP8") for r in recs if r["kernel"] == "_rope_store"} == {False, True}  # FP8 KV
    assert {r["sig"]["kc_ptr"] for r in recs if r["kernel"] in ("_paged_decode", "_paged_prefill")} >= {"*fp8e4nv"}
    for kernel in ("_latent_rope_store", "_latent_decode"):  # DeepSeek's, bf16 and FP8 caches
        assert {r["sig"]["kc_ptr"] for r in recs if r["kernel"] == kernel} == {"*bf16", "*fp8e4nv"}
    assert {r["constexprs"].get("GELU") for r in recs if r["kernel"] == "_act_mul"} == {False, True}  # Gemma's fused
    assert {r["constexprs"].get("KIND") for r in recs if r["kernel"] == "_add_rms_norm"} == {"llama", "gemma", "olmo"}
    assert {r["constexprs"].get("CAP") for r in recs if r["kernel"] in ("_paged_decode", "_paged_prefill")} == {
        False, True}
    assert {r["constexprs"].get("SINK") for r in recs if r["kernel"] in ("_paged_decode", "_paged_prefill")} == {
        False, True}
    # bf16 is what a GPU serves; with 32-bit cache offsets no kernel of these shapes spills
    spills = [(r["kernel"], r["constexprs"], r["stack_bytes"]) for r in recs
              if "*bf16" in r["sig"].values() and not r["constexprs"].get("OFF64") and r.get("stack_bytes")]
    assert not spills, spills
    assert all("registers" in r for r in recs), "cuobjdump gave no resource usage"


@pytest.mark.skipif(not _has_ptxas(), reason="this Triton build has no NVIDIA backend")
def test_fp8_weights_compile_for_an_a100_read_as_bytes() -> None:
    """A GPU before sm_89 has no FP8 type: there the FP8 kernels read the codes as bytes and decode
    their bits (engine/triton_fp8.py _e4m3), and every kernel of a dense and an MoE model with FP8
    weights compiles for sm_80 (and the same for sm_90), the FP8 ones without spills (the paged decode
    kernel spills 32-56 bytes on sm_80 at the 1.1B shape, FP8 or not: an A100 is not its target)."""
    recs = _compiled("80,90", "1.1b+fp8bits:bfloat16,qwen3-a3b-24l+fp8bits:bfloat16")
    fp8 = [r for r in recs if r["kernel"] in ("_matmul_fp8", "_grouped_matmul_fp8")]
    assert {(r["kernel"], r["sm"]) for r in fp8} == {(k, sm) for k in ("_matmul_fp8", "_grouped_matmul_fp8")
                                                     for sm in (80, 90)}
    assert all(r["constexprs"]["BITS"] and r["sig"]["w_ptr"] == "*u8" and not r["stack_bytes"] for r in fp8)
