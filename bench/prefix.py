"""TTFT of prompts that share a long prefix (a system prompt), with the prefix caches on and off.

    python bench/prefix.py --config deploy/local.yaml --output bench/results/prefix.json

One cluster per setting (`prefill.prefix_cache` and `kv_cache.prefix_cache` both true / both false,
same run): every request is the same ~1000-token system prompt (this repository's README, cut) + a
question of its own, max_tokens 8, one at a time (TTFT without queueing), then --concurrency at
once. Reports median client TTFT and the server's prefill time, the prompt tokens computed (prefill
or aggregated workers) and the KV bytes handed off to decode workers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cluster.background import BackgroundServer  # noqa: E402
from cluster.config import load_config  # noqa: E402
from engine.model_loader import load_tokenizer  # noqa: E402
from protos.pdserve.v1 import generation_pb2 as pb  # noqa: E402

QUESTIONS = [f"Question {i}: in one sentence, what does component number {i} of this system do?" for i in range(64)]


def system_prompt(tok: Any, tokens: int) -> str:
    """The first `tokens` tokens of README.md, as text."""
    text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    return str(tok.decode(tok(text)["input_ids"][:tokens]))


def one(srv: BackgroundServer, prompt: str) -> dict[str, float]:
    t0 = time.perf_counter()
    first, last = None, None
    for msg in srv.stub.GenerateStream(pb.GenerateRequest(prompt=prompt, max_tokens=8, ignore_eos=True), timeout=600):
        if first is None and msg.token_ids:
            first = time.perf_counter()
        last = msg
    assert first is not None and last is not None
    return {"ttft_ms": (first - t0) * 1000, "prefill_ms": last.timings.prefill_ms,
            "prompt_tokens": last.usage.prompt_tokens, "kv_bytes": last.timings.kv_transfer_bytes}


def run(config: str, prefix_cache: bool, system: str, n: int, concurrency: int) -> dict[str, Any]:
    cfg = load_config(config, {"server": {"port": 0, "http_port": None},
                               "prefill": {"prefix_cache": prefix_cache}, "kv_cache": {"prefix_cache": prefix_cache}})

    def computed_so_far(srv: BackgroundServer) -> int:
        return sum(w.prompt_tokens_computed for w in srv.status() if w.role in ("prefill", "aggregated"))

    with BackgroundServer(cfg) as srv:
        srv.generate(prompt="warm up", max_tokens=4)
        computed0 = computed_so_far(srv)
        solo = [one(srv, system + QUESTIONS[i]) for i in range(n)]
        with ThreadPoolExecutor(concurrency) as ex:
            crowd = list(ex.map(lambda q: one(srv, system + q), QUESTIONS[n:n + concurrency]))
        computed = computed_so_far(srv) - computed0
    return {
        "prefix_cache": prefix_cache,
        "prompt_tokens": solo[0]["prompt_tokens"],
        "solo_median_ttft_ms": statistics.median(r["ttft_ms"] for r in solo),
        "solo_median_prefill_ms": statistics.median(r["prefill_ms"] for r in solo),
        "first_request_ttft_ms": solo[0]["ttft_ms"],
        f"c{concurrency}_median_ttft_ms": statistics.median(r["ttft_ms"] for r in crowd),
        f"c{concurrency}_max_ttft_ms": max(r["ttft_ms"] for r in crowd),
        "prefill_tokens_computed": computed,
        "prompt_tokens_sent": sum(r["prompt_tokens"] for r in solo + crowd),
        "kv_mb_handed_off": sum(r["kv_bytes"] for r in solo + crowd) / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deploy/local.yaml")
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=8, help="one at a time")
    ap.add_argument("--concurrency", type=int, default=8, help="then this many at once")
    ap.add_argument("--output")
    a = ap.parse_args()
    tok = load_tokenizer(load_config(a.config).model)
    system = system_prompt(tok, a.system_tokens)
    rows = []
    for on in (True, False):
        r = run(a.config, on, system, a.requests, a.concurrency)
        print(json.dumps(r), flush=True)
        rows.append(r)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if a.output:
        Path(a.output).write_text(json.dumps({"git": rev, "config": a.config, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
