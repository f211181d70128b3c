"""What one sampler call costs per batch, by kind of request (median of --runs calls, one process).

    python bench/sampler.py --logits default --output bench/results/sampler.json   # CPU, this machine
    python bench/sampler.py --device cuda --vocab 32000,128256 --batch 1,64        # on a GPU

Logits [B, V], every row of one kind: greedy, temperature 0.8, top-p 0.95, top-k 50, seeded; with
--logits default also `structured`: greedy rows each held to a JSON schema, midway through a string
value (the grammar's mask is computed on the host each step, engine/structured.py).
--logits default: real next-token distributions — the embedded model's logits at B positions of
this repository's README (its nucleus at top_p 0.95: median ~50 tokens, some thousands);
gaussian: N(0, 3²) per token (vocabulary sizes from --vocab). On CUDA each call ends with the host
sync sample() has anyway.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.sampler import sample  # noqa: E402
from engine.types import SamplingParams  # noqa: E402

KINDS = {
    "greedy": SamplingParams(),
    "temperature": SamplingParams(temperature=0.8),
    "top_p": SamplingParams(temperature=0.8, top_p=0.95),
    "top_k": SamplingParams(temperature=0.8, top_k=50),
    "seeded": SamplingParams(temperature=0.8, seed=1),
}


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}


def time_call(logits: torch.Tensor, params: SamplingParams, runs: int, guides: list | None = None) -> float:  # type: ignore[type-arg]
    """Median ms of sample() over `runs` calls after one warm-up."""
    rows = [params] * logits.shape[0]
    positions = list(range(logits.shape[0]))
    sample(logits, rows, positions, guides=guides)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sample(logits, rows, positions, guides=guides)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def structured_guides(tokenizer, batch: int, vocab: int) -> list:  # type: ignore[no-untyped-def,type-arg]
    """`batch` Guides of SCHEMA, each having followed `{"name": "Jo` (a mask does not move a Guide)."""
    from engine.structured import Guides, grammar_text

    guides = Guides(lambda: tokenizer, vocab)
    grammar = grammar_text("json_schema", json.dumps(SCHEMA))
    out = [guides.new(grammar) for _ in range(batch)]
    for g in out:
        g.follow(tokenizer('{"name":"Jo')["input_ids"])
        assert not g.complete, g.error
    return out


def readme_logits(batch: int) -> torch.Tensor:
    """The embedded default model's logits at `batch` positions of README.md → [batch, 49152]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.model_loader import default_model_dir

    folder = default_model_dir()
    ids = AutoTokenizer.from_pretrained(folder)(Path(__file__).resolve().parent.parent.joinpath("README.md").read_text(),
                                               return_tensors="pt").input_ids[:, :512]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits[0]  # [T, V]
    return logits[torch.linspace(0, logits.shape[0] - 1, batch).long()]


def default_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from engine.model_loader import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--logits", choices=("default", "gaussian"), default="gaussian")
    ap.add_argument("--vocab", default="49152", help="comma-separated vocabulary sizes")
    ap.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--output", help="write the results as JSON here")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    results = []
    vocabs = [49152] if args.logits == "default" else [int(v) for v in args.vocab.split(",")]
    for vocab in vocabs:
        for batch in (int(b) for b in args.batch.split(",")):
            if args.logits == "default":
                logits = readme_logits(batch).to(args.device)
            else:
                logits = (torch.randn(batch, vocab, generator=g) * 3).to(args.device)
            row = {"vocab": vocab, "batch": batch}
            row.update({f"{kind}_ms": round(time_call(logits, p, args.runs), 3) for kind, p in KINDS.items()})
            if args.logits == "default":
                row["structured_ms"] = round(time_call(logits, KINDS["greedy"], args.runs,
                                                       structured_guides(default_tokenizer(), batch, vocab)), 3)
            print(json.dumps(row), flush=True)
            results.append(row)
    out = {"device": args.device, "logits": args.logits, "torch_threads": torch.get_num_threads(), "runs": args.runs, "results": results}
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
