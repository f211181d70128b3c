"""What drafts cost a decode forward (decode.speculative): one forward of B rows at a context, each
with d drafts (each draft a one-token row of its own), on this machine's CPU or GPU.

    python bench/draft_rows.py --model default --batch 1,4 --drafts 0,1,2,4 --context 300 \
        --output bench/results/draft_rows.json
    (on a GPU: --model /tmp/llama-1.1b --device cuda --dtype bfloat16: through the decode CUDA
    graphs, captured for up to the largest row count, as a decode worker runs them)

Median of --runs forwards after 3 warm-ups (CUDA: each synchronized), with the decode worker's
torch thread count (1).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.config import ModelConfig  # noqa: E402
from engine.model_loader import load_model  # noqa: E402
from engine.model_runner import ModelRunner, SeqInput  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--drafts", default="0,1,2,4")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    batches, drafts = [int(b) for b in a.batch.split(",")], [int(d) for d in a.drafts.split(",")]
    runner = ModelRunner(load_model(ModelConfig(path=a.model, device=a.device, dtype=a.dtype,
                                                 max_model_len=max(2048, a.context + 64))), 64 * max(batches), 16)
    rows_most = max(batches) * (1 + max(drafts))
    if a.device == "cuda":  # as a decode worker: graphs up to its largest batch
        runner.use_decode_graphs(rows_most, a.context + 64)
    per_row = -(-(a.context + max(drafts) + 1) // 16)
    tables = [list(range(i * per_row, (i + 1) * per_row)) for i in range(max(batches))]
    for t in tables:  # the context's KV
        runner.forward([SeqInput([5 + i % (runner.vocab_size - 5) for i in range(a.context)], 0, t)])
    out = []
    for b in batches:
        for d in drafts:
            rows = [SeqInput([7], a.context + j, tables[i]) for i in range(b) for j in range(d + 1)]
            for _ in range(3):
                runner.forward(rows)
            times = []
            for _ in range(a.runs):
                t0 = time.perf_counter()
                runner.forward(rows)
                if a.device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1000
            out.append({"batch": b, "drafts_per_row": d, "rows": len(rows), "forward_ms": round(ms, 2)})
            print(f"batch {b:3d}  drafts/row {d}  rows {len(rows):3d}  forward {ms:7.2f} ms")
    if a.output:
        Path(a.output).write_text(json.dumps({"model": a.model, "device": a.device, "dtype": a.dtype,
                                              "context": a.context, "threads": a.threads,
                                              "graphs": runner.graphs is not None, "results": out}, indent=2))


if __name__ == "__main__":
    main()
