"""What a step of decode rows and a prompt chunk costs as rows of the CUDA graphs (engine/cuda_graphs.py:
each prompt token a row of the decode kernel) against the eager forward (the prompt kernel, every
kernel launched from Python), same GPU, same run: an aggregated step (Sarathi), a decode worker's
local prompt or recompute.

    python bench/make_model.py --shape 1.1b --out /tmp/llama-1.1b --device cuda --dtype bfloat16
    python bench/mixed_step.py --model /tmp/llama-1.1b --decode 32 --context 512 --chunk 16,64,128,224 \
        --start 0,512,1536 --output $OUT/mixed-step.json
    python bench/mixed_step.py --model tiny --chunk 8 --start 0,16 --decode 2 --context 16 --runs 2   # no GPU:
        the script's smoke run (uncaptured, under Triton's interpreter; no timing worth reading)

Per (chunk P, start S): --decode rows at --context each, plus one prompt chunk of P tokens at
positions S .. S+P-1, in one forward. `graphs_ms`: through the graphs (captured up to the largest
step, with the bound on keys lifted so every case is timed); `eager_ms`: the same step eagerly;
`fits`: whether the worker's rule (keys read ≤ decode rows × max_model_len, at --max-batch and
--max-model-len) sends the step to the graphs. Medians of --runs forwards, each synchronized.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--model" in sys.argv and sys.argv[sys.argv.index("--model") + 1] == "tiny":
    os.environ["TRITON_INTERPRET"] = "1"  # read when Triton is first imported (through the engine)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.config import ModelConfig  # noqa: E402
from engine.model_loader import load_model  # noqa: E402
from engine.model_runner import ModelRunner, SeqInput  # noqa: E402


def _ms(runner: ModelRunner, seqs: list[SeqInput], runs: int) -> float:
    for _ in range(2):
        runner.forward(seqs)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner.forward(seqs)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--decode", type=int, default=32, help="decode rows in the step")
    ap.add_argument("--context", type=int, default=512, help="each decode row's context")
    ap.add_argument("--chunk", default="16,64,128,224", help="prompt chunk lengths")
    ap.add_argument("--start", default="0,512,1536", help="the chunk's first position")
    ap.add_argument("--max-batch", type=int, default=64, help="decode.max_batch_size of the rule's bound")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    chunks, starts = [int(c) for c in a.chunk.split(",")], [int(s) for s in a.start.split(",")]
    cuda = torch.cuda.is_available() and a.model != "tiny"
    model = load_model(ModelConfig(path=a.model, device="cuda" if cuda else "cpu",
                                   dtype="bfloat16" if cuda else "float32", max_model_len=a.max_model_len,
                                   kernels="triton"))
    bs, most = 16, a.decode + max(chunks)
    per_row = -(-a.max_model_len // bs)
    runner = ModelRunner(model, per_row * (a.decode + 1), bs, kernels="triton")
    runner.use_decode_graphs(a.max_batch, a.max_model_len, capture=cuda, max_rows=most)
    graphs = runner.graphs
    assert graphs is not None
    rule = graphs.max_keys
    tables = [list(range(i * per_row, (i + 1) * per_row)) for i in range(a.decode + 1)]
    decode = [SeqInput([7], a.context - 1, tables[i]) for i in range(a.decode)]
    out = []
    for s in starts:
        for p in chunks:
            step = decode + [SeqInput([5 + i % 200 for i in range(p)], s, tables[-1])]
            graphs.max_keys = rule
            fits = graphs.fits(step)
            graphs.max_keys = 1 << 62  # time the rows either way
            runner.graphs = graphs
            g_ms = _ms(runner, step, a.runs)
            runner.graphs = None
            e_ms = _ms(runner, step, a.runs)
            runner.graphs = graphs
            out.append({"chunk": p, "start": s, "rows": a.decode + p, "graphs_ms": round(g_ms, 3),
                        "eager_ms": round(e_ms, 3), "fits": fits})
            print(f"chunk {p:4d} at {s:5d}  rows {a.decode + p:4d}  graphs {g_ms:8.3f} ms  eager {e_ms:8.3f} ms  "
                  f"rule: {'graphs' if fits else 'eager'}")
    if a.output:
        Path(a.output).write_text(json.dumps({"model": a.model, "device": str(runner.device), "decode": a.decode,
                                              "context": a.context, "max_batch": a.max_batch,
                                              "max_model_len": a.max_model_len, "results": out}, indent=2))


if __name__ == "__main__":
    main()
