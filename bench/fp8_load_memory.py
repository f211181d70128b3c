"""Peak host memory of loading a mixture of experts with model.quantization fp8, two ways, on CPU:
  whole    — Hugging Face's from_pretrained in bf16 (it fuses the experts stored one by one), then
             engine/fp8.py quantize_model: what the loader did for a mixture of experts before;
  streamed — engine/fp8.py load_quantized: each weight, each expert's too, quantized as it is read.
Each load runs in a fresh process; the figure is the peak of its resident anonymous memory (sampled
every millisecond) less what it held before the load. The model is a random Qwen 3 MoE of the shape below written as bf16 safetensors.

    python bench/fp8_load_memory.py --output bench/results/fp8_load_memory.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import threading
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # (before bench/, whose engine.py would shadow the package)
SHAPE = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
             intermediate_size=2048, moe_intermediate_size=512, num_experts=64, num_experts_per_tok=4,
             vocab_size=4096, norm_topk_prob=True)


def _anon_mib() -> float:
    """This process's resident anonymous memory (RssAnon), MiB: what it allocated, not the pages of the
    safetensors files it maps (which the kernel can drop; on CUDA each tensor goes on to the GPU)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise KeyError("RssAnon")


class _Peak(threading.Thread):
    """Samples _anon_mib() every millisecond until stopped; .peak: the largest."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.done = _anon_mib(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, _anon_mib())


def load(folder: str, how: str) -> dict:
    """One load in this process → its peak memory and time."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine import fp8

    before, peak = _anon_mib(), _Peak()
    peak.start()
    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(folder)
    if how == "whole":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True)
        fp8.quantize_model(model)
    else:
        model = fp8.load_quantized(Path(folder), config, torch.bfloat16, "cpu", "eager")
    held = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        t.numel() * t.element_size() for m in model.modules() for n, t in vars(m).items()
        if n.endswith("_scale") and isinstance(t, torch.Tensor))
    peak.done.set()
    peak.join()
    return {"how": how, "peak_mib": round(peak.peak - before, 1), "model_mib": round(held / 2**20, 1),
            "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default="bench/results/fp8_load_memory.json")
    ap.add_argument("--load", nargs=2, metavar=("FOLDER", "HOW"), help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args()
    if a.load:
        print(json.dumps(load(*a.load)))
        return
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**SHAPE)).to(torch.bfloat16)
        bf16_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        model.save_pretrained(folder)
        del model
        rows = []
        for how in ("whole", "streamed"):
            out = subprocess.run([sys.executable, __file__, "--load", folder, how], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1])
    result = {"shape": SHAPE, "bf16_model_mib": round(bf16_mib, 1), "loads": rows}
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"bf16 model {bf16_mib:.0f} MiB; " + "; ".join(f"{r['how']}: peak {r['peak_mib']:.0f} MiB, "
                                                          f"held {r['model_mib']:.0f} MiB" for r in rows))


if __name__ == "__main__":
    main()
