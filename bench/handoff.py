"""The KV hand-off of one long prompt, backend by backend, through the whole cluster (same run).

    python bench/handoff.py --backends ipc,gloo --prompt-tokens 1000 --runs 7 --output bench/results/handoff.json
    python bench/handoff.py --config deploy/1gpu.yaml --model-path /tmp/llama-1.1b --backends ipc,nccl   # on a GPU
    python bench/handoff.py ... --prompt-tokens 16 --overlap-reserve   # the prompt sent beside its reservation

For each backend a 1P1D cluster is started with `transport.backend` forced, then one request at a
time (max_tokens=2, so decode only admits it) reports `kv_transfer_ms`: from the prefill's
begin_write to the decode loop seeing the KV landed (the grant round trip, the copy or send, and
for two-sided backends the receive and the decode-side copy into the blocks). The decode worker's
`kv_bytes_placed` says how many bytes it copied into its own cache (0 for a direct write).
NCCL where both workers may share a GPU (one GPU, or fractional num_gpus) runs with an NCCL_HOSTID per
worker (tests/gpu/nccl_one_gpu.py, test-only): NCCL then talks over loopback sockets, so that figure
is a socket figure, marked so in the output.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cluster.background import BackgroundServer  # noqa: E402
from cluster.config import load_config  # noqa: E402
from engine.model_loader import load_tokenizer  # noqa: E402

WORDS = ("the decode worker owns the blocks and the prefill worker writes its prompt into exactly those "
         "blocks over shared memory within a node or a communicator across nodes").split()


def prompt_of(tok: Any, n: int) -> str:
    words: list[str] = []
    while len(tok(" ".join(words))["input_ids"]) < n:
        words += WORDS
    while len(tok(" ".join(words))["input_ids"]) > n:
        words.pop()
    return " ".join(words)


def run_backend(config: str | None, overrides: dict[str, Any], backend: str, text: str, runs: int) -> dict[str, Any]:
    import ray

    cfg = load_config(config, {**overrides, "transport": {"backend": backend}})
    sockets = backend == "nccl" and _may_share_a_gpu(cfg)
    if sockets:
        from tests.gpu.nccl_one_gpu import own_nccl_hosts
    with own_nccl_hosts() if sockets else contextlib.nullcontext(), BackgroundServer(cfg) as srv:
        srv.generate(prompt="warm up", max_tokens=2)
        srv.generate(prompt=text, max_tokens=2, ignore_eos=True)  # first long one: page faults, allocations
        rows = []
        for i in range(runs):  # each its own cache_salt: the whole prompt is computed and handed off each time
            r = srv.generate(prompt=text, max_tokens=2, ignore_eos=True, timeout=300, cache_salt=f"handoff-{i}")
            rows.append({"kv_transfer_ms": r.timings.kv_transfer_ms, "kv_bytes": r.timings.kv_transfer_bytes,
                         "prefill_ms": r.timings.prefill_ms, "ttft_ms": r.timings.ttft_ms,
                         "prompt_tokens": r.usage.prompt_tokens})
        stats = ray.get([d.stats.remote() for d in srv.cluster.decodes])
    ms = [r["kv_transfer_ms"] for r in rows]
    mb = rows[0]["kv_bytes"] / 1e6
    return {
        "backend": backend, "nccl_over_sockets": sockets, "links": stats[0].extra["links"],
        "prompt_tokens": rows[0]["prompt_tokens"],
        "kv_mb": mb, "kv_transfer_ms_median": statistics.median(ms), "kv_transfer_ms_min": min(ms),
        "gb_per_s_median": mb / statistics.median(ms), "decode_kv_bytes_placed": stats[0].extra["kv_bytes_placed"],
        "ttft_ms_median": statistics.median(r["ttft_ms"] for r in rows),
        "ttft_less_prefill_ms_median": statistics.median(r["ttft_ms"] - r["prefill_ms"] for r in rows),
        "overlap_reserve": cfg.prefill.overlap_reserve,
        "decode_prompt_tokens_computed": stats[0].prompt_tokens_computed, "rows": rows,
    }


def _may_share_a_gpu(cfg: Any) -> bool:
    """Whether the pair's two ranks can land on one GPU (NCCL refuses that): one GPU in the machine,
    or fractional num_gpus (e.g. deploy/1gpu.yaml's 0.5 each)."""
    import torch

    if cfg.model.device != "cuda":
        return False
    return torch.cuda.device_count() == 1 or cfg.prefill.num_gpus < 1 or cfg.decode.num_gpus < 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None, help="YAML (default: all defaults, the embedded model, 1P1D)")
    ap.add_argument("--model-path", default=None, help="override model.path (e.g. a bench/make_model.py folder)")
    ap.add_argument("--backends", default="ipc,gloo")
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--overlap-reserve", action="store_true",
                    help="prefill.overlap_reserve: the prompt is sent while its decode worker reserves")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    overrides: dict[str, Any] = {"model": {"path": a.model_path}} if a.model_path else {}
    if a.overlap_reserve:
        overrides["prefill"] = {"overlap_reserve": True}
    cfg = load_config(a.config, overrides)
    text = prompt_of(load_tokenizer(cfg.model), a.prompt_tokens)
    results = [run_backend(a.config, overrides, b, text, a.runs) for b in a.backends.split(",")]
    for r in results:
        print(f"{r['backend']:5s} {r['prompt_tokens']} tokens, {r['kv_mb']:.1f} MB: hand-off median "
              f"{r['kv_transfer_ms_median']:.1f} ms (min {r['kv_transfer_ms_min']:.1f}), "
              f"{r['gb_per_s_median']:.2f} GB/s; decode copied {r['decode_kv_bytes_placed'] / 1e6:.1f} MB itself; "
              f"TTFT median {r['ttft_ms_median']:.1f} ms, less prefill {r['ttft_less_prefill_ms_median']:.1f} ms"
              + (" (prompt sent beside its reservation)" if r["overlap_reserve"] else "")
              + (" (NCCL over loopback sockets: a shared GPU, test-only setting)" if r["nccl_over_sockets"] else ""))
    if len(results) > 1:
        print(f"{results[0]['backend']} / {results[1]['backend']}: "
              f"{results[0]['kv_transfer_ms_median'] / results[1]['kv_transfer_ms_median']:.2f}")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if a.output:
        Path(a.output).write_text(json.dumps({"git": rev, "config": a.config, "results": results}, indent=2))


if __name__ == "__main__":
    main()
