"""Correctness gate for a peer: its greedy completions must equal HF `generate` on the same weights.

    python bench/peers/gate.py --url http://127.0.0.1:8000 --model smollm2 [--model-dir DIR]

Sends a few raw prompts (temperature 0) to an OpenAI-compatible /v1/completions server and compares
the text with Hugging Face `generate(do_sample=False)` run here on the default model's folder.
Exit status 1 on any difference, so a peer that computes something else is never measured.
"""
from __future__ import annotations

import argparse
import sys

import httpx
import torch

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True, help="model name the server expects")
    ap.add_argument("--model-dir", help="HF folder (default: the embedded model's)")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.model_loader import default_model_dir

    path = args.model_dir or str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bad = 0
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=args.max_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        r = httpx.post(f"{args.url}/v1/completions", timeout=120, json={
            "model": args.model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0})
        r.raise_for_status()
        got = r.json()["choices"][0]["text"]
        same = got == want
        bad += not same
        print(f"{'ok  ' if same else 'DIFF'} {prompt!r}: {got!r}" + ("" if same else f" (HF generate: {want!r})"))
    print(f"gate: {len(PROMPTS) - bad}/{len(PROMPTS)} greedy completions equal HF generate")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
