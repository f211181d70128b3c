"""DeepSeek's latent attention kernels on a GPU (engine/triton_mla.py), against the bytes they must read
and against the expanded form they replaced, in well under a minute (no model is built).

For each shape (V2-Lite: 16 heads; V3 / Kimi K2: 128 heads; latents of 512 + 64), batch and context:
  latent    triton_mla.decode over a bf16 latent cache (flash-decoding splits as the runner picks them);
  expanded  engine/triton_attention.py paged_decode over the cache the expanded form kept (a key and a
            zero-padded value of 192 per head: 16 or 128 KV heads), what the runner ran before;
  floor     the latent cache's bytes for the step ÷ the device's memory bandwidth (a device-to-device copy's
            bytes read + written per second, timed here), the least a decode step's attention can take.
Times are medians of CUDA-event timings of 50 launches. (Prompt rows take engine/triton_attention.py's
prefill kernel over expanded keys: `gpu_checks.sh deepseek` times whole steps.)

    python bench/mla_kernels.py --output $OUT/mla-kernels.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # (before bench/, whose engine.py shadows it)

import torch  # noqa: E402

from bench.gpu_step import _median_ms  # noqa: E402
from engine import triton_attention as ta  # noqa: E402
from engine import triton_mla  # noqa: E402

SHAPES = {"v2-lite": 16, "v3": 128}  # query heads; both: latent 512, rotary 64, expanded heads of 128 + 64
RANK, ROPE, NOPE, BS = 512, 64, 128, 16


def _ms(fn, runs: int = 50) -> float:  # type: ignore[no-untyped-def]
    """Median of `runs` CUDA-event timings of fn, after one call (Triton compiles there)."""
    fn()
    return _median_ms(fn, runs)


def _copy_gbs() -> float:
    """Device-to-device copy bandwidth (read + write bytes / s) of 1 GiB."""
    x = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / (_ms(lambda: y.copy_(x), 20) / 1e3) / 1e9


def run(heads: int, batch: int, context: int, num_sms: int, gbs: float) -> dict:
    per = -(-context // BS)
    blocks = batch * per
    tables = torch.randperm(blocks, device="cuda").view(batch, per)
    lens = torch.full((batch,), context, device="cuda")
    scale = (NOPE + ROPE) ** -0.5
    kc, vc = (torch.randn(blocks, BS, 1, (RANK + ROPE) // 2, device="cuda").bfloat16() for _ in range(2))
    q = torch.randn(batch, heads, RANK + ROPE, device="cuda").bfloat16()
    splits = ta.decode_splits(batch, -(-heads // triton_mla.BLOCK_H), num_sms)
    latent = _ms(lambda: triton_mla.decode(q, kc, vc, tables, lens, scale, ROPE, splits))
    D = NOPE + ROPE  # the expanded cache: per head a key and a value padded to 192
    ek, ev = (torch.randn(blocks, BS, heads, D, device="cuda").bfloat16() for _ in range(2))
    eq = torch.randn(batch, heads, D, device="cuda").bfloat16()
    expanded = _ms(lambda: ta.paged_decode(eq, ek, ev, tables, lens, scale, splits=ta.decode_splits(batch, heads, num_sms)))
    floor = batch * context * (RANK + ROPE) * 2 / (gbs * 1e9) * 1e3  # each latent read once, at the copy's rate
    return {"heads": heads, "batch": batch, "context": context, "splits": splits, "latent_ms": round(latent, 4),
            "expanded_ms": round(expanded, 4), "floor_ms": round(floor, 4),
            "latent_x_floor": round(latent / floor, 2), "expanded_x_latent": round(expanded / latent, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--output", default="bench/results/mla_kernels.json")
    a = ap.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    gbs = _copy_gbs()
    rows = []
    for name, heads in SHAPES.items():
        for b in map(int, a.batches.split(",")):
            for c in map(int, a.contexts.split(",")):
                rows.append({"shape": name, **run(heads, b, c, num_sms, gbs)})
                print(rows[-1], flush=True)
    out = {"device": torch.cuda.get_device_name(0), "copy_gbs": round(gbs), "rows": rows}
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
