"""Speculative decoding by prompt lookup (decode.speculative) through the whole serving path: the
same requests with drafts off and on, on the same machine and run.

    python bench/speculative.py --config deploy/local.yaml --num-tokens 4 --concurrency 1,4 \
        --output bench/results/speculative.json

Tasks (chat messages to the configured model, greedy unless --temperature (then seeded),
max_tokens each): `edit` (rewrite a function with one name changed: most of the answer is in the
prompt), `quote` (repeat a paragraph), `free` (an open question: little to look up). For each task
and concurrency C, C copies run at once, --repeats times; per request the time per output token
after the first (TPOT) and the streamed tokens. Reported per task: the median TPOT with drafts off
and on, the speed-up, whether the answers are the same token for token, and the decode workers'
drafts fed / accepted over the task.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from cluster.background import BackgroundServer  # noqa: E402
from cluster.config import PDServeConfig, load_config  # noqa: E402
from decode_worker.config import SpeculativeConfig  # noqa: E402
from protos.pdserve.v1 import generation_pb2 as pb  # noqa: E402

CODE = '''def summarize(orders, tax_rate):
    total = 0.0
    count = 0
    for order in orders:
        if order.cancelled:
            continue
        total += order.price * order.quantity
        count += 1
    total = total * (1 + tax_rate)
    average = total / count if count else 0.0
    return {"total": round(total, 2), "count": count, "average": round(average, 2)}
'''
PARAGRAPH = ("Disaggregated serving runs the prompt (prefill) and the generation (decode) of a language "
             "model on different workers, so that a long prompt does not stall the token stream of "
             "requests already generating. The KV cache of each prompt is handed from the prefill worker "
             "to the decode worker over a fast interconnect, and the decode worker batches every running "
             "request into one step.")
TASKS = {
    "edit": f"Rewrite this Python function with the variable `total` renamed to `subtotal`. Reply with the "
            f"code only.\n\n{CODE}",
    "quote": f"Repeat the following paragraph word for word, then stop.\n\n{PARAGRAPH}",
    "free": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def _with_drafts(cfg: PDServeConfig, n: int) -> PDServeConfig:
    section = "aggregated" if cfg.mode == "aggregated" else "decode"
    spec = SpeculativeConfig(num_tokens=n)
    part = getattr(cfg, section).model_copy(update={"speculative": spec})
    server = cfg.server.model_copy(update={"port": 0, "http_port": None})
    return cfg.model_copy(update={section: part, "server": server})


def _one(srv: BackgroundServer, text: str, max_tokens: int, temperature: float) -> dict[str, Any]:
    req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=text)], max_tokens=max_tokens,
                             temperature=temperature, seed=1)  # (a seeded draw: the same tokens off and on)
    t0, first, ids = time.perf_counter(), None, []
    for msg in srv.stub.GenerateStream(req, timeout=600):
        if msg.token_ids and first is None:
            first = time.perf_counter()
        ids += list(msg.token_ids)
    end = time.perf_counter()
    assert first is not None
    return {"tokens": ids, "ttft_s": first - t0, "tpot_ms": (end - first) / max(1, len(ids) - 1) * 1000}


def _drafts(srv: BackgroundServer) -> tuple[int, int]:
    stats = ray.get([w.stats.remote() for w in srv.cluster.decodes], timeout=60)
    return (sum(s.extra.get("draft_tokens", 0) for s in stats), sum(s.extra.get("accepted_tokens", 0) for s in stats))


def _run(cfg: PDServeConfig, concurrency: list[int], max_tokens: int, repeats: int, temperature: float,
         ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with BackgroundServer(cfg) as srv:
        _one(srv, "warm up", 8, 0.0)
        for task, text in TASKS.items():
            for c in concurrency:
                before, rows = _drafts(srv), []
                for _ in range(repeats):
                    with cf.ThreadPoolExecutor(c) as ex:
                        rows += list(ex.map(lambda _: _one(srv, text, max_tokens, temperature), range(c)))
                after = _drafts(srv)
                tpot = statistics.median(r["tpot_ms"] for r in rows)
                out[f"{task}/c{c}"] = {
                    "tpot_ms": tpot,
                    "completion_tokens": [len(r["tokens"]) for r in rows],
                    "draft_tokens": after[0] - before[0], "accepted_tokens": after[1] - before[1],
                    "tokens": rows[0]["tokens"],
                }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="deploy/local.yaml")
    ap.add_argument("--num-tokens", type=int, default=4)
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each task and concurrency (median TPOT)")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: drawn rows (seeded)")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    cfg = load_config(a.config)
    conc = [int(c) for c in a.concurrency.split(",")]
    ray.init(include_dashboard=False, namespace="pdserve-bench-spec")
    try:
        off = _run(_with_drafts(cfg, 0), conc, a.max_tokens, a.repeats, a.temperature)
        on = _run(_with_drafts(cfg, a.num_tokens), conc, a.max_tokens, a.repeats, a.temperature)
    finally:
        ray.shutdown()
    table = {}
    for key in off:
        o, n = off[key], on[key]
        table[key] = {
            "tpot_ms_off": round(o["tpot_ms"], 2), "tpot_ms_on": round(n["tpot_ms"], 2),
            "speedup": round(o["tpot_ms"] / n["tpot_ms"], 2),
            "completion_tokens": n["completion_tokens"],
            "acceptance": round(n["accepted_tokens"] / n["draft_tokens"], 3) if n["draft_tokens"] else None,
            "same_tokens": o["tokens"] == n["tokens"],
            "draft_tokens": n["draft_tokens"], "accepted_tokens": n["accepted_tokens"],
        }
        print(f"{key:10s} TPOT {o['tpot_ms']:7.2f} → {n['tpot_ms']:7.2f} ms  ×{table[key]['speedup']:.2f}  "
              f"accepted {n['accepted_tokens']}/{n['draft_tokens']}  same tokens: {table[key]['same_tokens']}")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"config": a.config, "mode": cfg.mode, "model": cfg.model.path, "num_tokens": a.num_tokens,
              "max_tokens": a.max_tokens, "repeats": a.repeats, "temperature": a.temperature, "git": rev,
              "results": table}
    if a.output:
        Path(a.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
