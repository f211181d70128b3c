"""What FP8 costs in accuracy: perplexity and greedy agreement with FP8 weights and an FP8 KV cache.

    python bench/fp8_accuracy.py --output bench/results/fp8_accuracy.json            # the default model
    python bench/fp8_accuracy.py --model-path /path/to/hf/folder --tokens 8192

Each configuration computes the same values the CUDA path does, on CPU through the torch backend:
  weights     each decoder linear layer's weight replaced by its FP8 codes × scales, dequantized
              (engine/triton_fp8.py: `row`, one scale per 128 weights of a row, model.quantization
              fp8's; `block`, one per 128 × 128 block, as Qwen's and DeepSeek's FP8 checkpoints)
  kv          every K (after rotary) and V rounded to e4m3 as kv_cache.dtype fp8 stores them
              (clamped to ±448, nearest, ties to even: the kernels' bytes, tests/cpu/test_kv_fp8.py)
Perplexity: the prompt logprobs of the first --tokens tokens of this repository's README (windows of
--window tokens, each scored from its start). Greedy agreement: --prompts README lines, each
continued for --new tokens; the share of tokens equal to the unquantized model's before the first
difference, and of answers equal whole.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import attention  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.model_loader import load_model, load_tokenizer  # noqa: E402
from engine.model_runner import ModelRunner, SeqInput  # noqa: E402
from engine.triton_fp8 import FP8_MAX, GROUP_K, dequantize, quantize  # noqa: E402

CONFIGS = {"unquantized": ("", False), "FP8 weights (row)": ("row", False), "FP8 weights (block)": ("block", False),
           "FP8 KV": ("", True), "FP8 weights (row) + KV": ("row", True)}


def _fp8_kv(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def _block_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] through FP8 with one scale per 128 × 128 block."""
    N, K = w.shape
    b = torch.nn.functional.pad(w, (0, -K % GROUP_K, 0, -N % GROUP_K))
    b = b.view(b.shape[0] // GROUP_K, GROUP_K, -1, GROUP_K)  # [N/128, 128, K/128, 128]
    s = (b.abs().amax(dim=(1, 3), keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return ((b / s).to(torch.float8_e4m3fn).float() * s).view(b.shape[0] * GROUP_K, -1)[:N, :K].to(w.dtype)


def _weights(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """A copy of model whose decoder linear layers hold what FP8 `kind` gives back."""
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        for name, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear) and not name.endswith(("gate", "router")):  # (not a router)
                w = m.weight.data
                m.weight.data = dequantize(*quantize(w), w.dtype) if kind == "row" else _block_roundtrip(w)
    return model


@contextmanager
def _kv_rounded() -> Iterator[None]:
    """TorchAttention with each rotated K and each V rounded to FP8 before it is stored or attended to."""
    rotary, attend = attention._rotary, attention.TorchAttention.attend

    def rounded_rotary(q, k, cos, sin, interleaved=False):  # type: ignore[no-untyped-def]
        q, k = rotary(q, k, cos, sin, interleaved)
        return q, _fp8_kv(k)

    def rounded_attend(self, li, q, k, v, *rest):  # type: ignore[no-untyped-def]
        return attend(self, li, q, k, _fp8_kv(v), *rest)

    attention._rotary, attention.TorchAttention.attend = rounded_rotary, rounded_attend
    try:
        yield
    finally:
        attention._rotary, attention.TorchAttention.attend = rotary, attend


def perplexity(runner: ModelRunner, ids: list[int], window: int) -> float:
    nll, n = 0.0, 0
    for a in range(0, len(ids) - 1, window):
        chunk = ids[a : a + window + 1]
        scores: dict[int, list] = {}
        runner.forward([SeqInput(chunk[:-1], 0, list(range(-(-window // runner.block_size))), tuple(chunk[1:]))],
                       scores=scores)
        nll -= sum(t.logprob for t in scores[0])
        n += len(scores[0])
    return math.exp(nll / n)


def greedy(runner: ModelRunner, prompt: list[int], new: int) -> list[int]:
    table = list(range(-(-(len(prompt) + new) // runner.block_size)))
    out = [int(runner.forward([SeqInput(prompt, 0, table)])[0].argmax())]
    while len(out) < new:
        out.append(int(runner.forward([SeqInput(out[-1:], len(prompt) + len(out) - 1, table)])[0].argmax()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default="default")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--output", default="bench/results/fp8_accuracy.json")
    a = ap.parse_args()
    mcfg = ModelConfig(path=a.model_path, max_model_len=max(a.window + 1, 2048))
    base, tok = load_model(mcfg), load_tokenizer(mcfg)
    text = (ROOT / "README.md").read_text()
    ids = tok(text)["input_ids"][: a.tokens + 1]
    lines = [ln for ln in text.splitlines() if len(ln) > 60][:: 7][: a.prompts]
    prompts = [tok(ln)["input_ids"] for ln in lines]
    blocks = -(-max(a.window + 1, max(map(len, prompts)) + a.new) // 16)
    rows, reference = [], None
    for name, (weights, kv) in CONFIGS.items():
        model = _weights(base, weights) if weights else base
        runner = ModelRunner(model, num_blocks=blocks, block_size=16, kernels="torch")
        with torch.inference_mode(), (_kv_rounded if kv else _nothing)():
            ppl = perplexity(runner, ids, a.window)
            answers = [greedy(runner, p, a.new) for p in prompts]
        reference = reference or answers
        before = [next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), len(want))
                  for got, want in zip(answers, reference)]
        row = {"config": name, "perplexity": round(ppl, 4),
               "greedy_tokens_before_first_difference": round(sum(before) / (len(before) * a.new), 4),
               "greedy_answers_equal": round(sum(g == w for g, w in zip(answers, reference)) / len(answers), 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"model": a.model_path, "dtype": mcfg.dtype, "tokens": len(ids) - 1, "window": a.window,
           "prompts": len(prompts), "new_tokens": a.new, "rows": rows}
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(out, indent=2) + "\n")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


if __name__ == "__main__":
    main()
