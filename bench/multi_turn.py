"""Multi-turn chat: each turn sends the whole conversation so far (`messages`, the model's chat
template), so turn n starts with turn n-1's prompt *and answer*. With `kv_cache.prefix_cache` a
worker that kept the KV of that answer computes (aggregated) or is handed (disaggregated) only the
new part.

    python bench/multi_turn.py --config deploy/aggregated.yaml --output bench/results/multi_turn_aggregated.json
    python bench/multi_turn.py --config deploy/local.yaml --local-prefill 64 --output bench/results/multi_turn_1p1d.json

One cluster per setting (both prefix caches on / both off, same run; with --local-prefill N, also
both on with decode.local_prefill_max_tokens: N, where a turn whose part not cached on its decode
worker is at most N tokens is computed there): --conversations at once, each --turns turns one
after another (a closed loop: the next question is asked when the answer is in), greedy answers of
--max-tokens. Reports median TTFT of the first turns and of the later ones, the time per output
token of the turns (median, max), the prompt tokens the workers computed (decode workers'
included), the prompt tokens found cached, the KV handed off and the turns computed on their
decode worker.
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
from protos.pdserve.v1 import generation_pb2 as pb  # noqa: E402

SYSTEM = ("You are the assistant of a team that runs a language-model serving cluster. Answer in plain "
          "sentences, name the component you mean, and say what you would measure to check a claim. ")
QUESTIONS = ["What does the router do with a new request?", "And the prefill worker?",
             "How does the KV cache get to the decode worker?", "What happens when the cache is full?",
             "Which metric tells me that?", "What would you change first?"]


def conversation(srv: BackgroundServer, c: int, turns: int, max_tokens: int) -> list[dict[str, float]]:
    """One conversation, turn after turn; each turn's figures."""
    messages = [pb.ChatMessage(role="system", content=SYSTEM + f"(conversation {c})")]
    rows = []
    for t in range(turns):
        messages.append(pb.ChatMessage(role="user", content=QUESTIONS[(c + t) % len(QUESTIONS)]))
        t0, first, text, last, n = time.perf_counter(), None, "", None, 0
        for msg in srv.stub.GenerateStream(pb.GenerateRequest(messages=messages, max_tokens=max_tokens), timeout=600):
            if first is None and msg.token_ids:
                first = time.perf_counter()
            text += msg.text
            n += len(msg.token_ids)
            last = msg
        t_end = time.perf_counter()
        assert first is not None and last is not None
        messages.append(pb.ChatMessage(role="assistant", content=text))
        rows.append({"turn": t + 1, "ttft_ms": (first - t0) * 1000, "prompt_tokens": last.usage.prompt_tokens,
                     "cached_tokens": last.usage.cached_tokens, "kv_bytes": last.timings.kv_transfer_bytes,
                     "local_prefill": last.timings.local_prefill,
                     "tpot_ms": (t_end - first) * 1000 / max(1, n - 1)})
    return rows


def run(config: str, prefix_cache: bool, conversations: int, turns: int, max_tokens: int,
        local_prefill: int = 0) -> dict[str, Any]:
    over: dict[str, Any] = {"server": {"port": 0, "http_port": None},
                            "prefill": {"prefix_cache": prefix_cache}, "kv_cache": {"prefix_cache": prefix_cache}}
    if local_prefill:
        over["decode"] = {"local_prefill_max_tokens": local_prefill}
    cfg = load_config(config, over)

    def computed(srv: BackgroundServer) -> int:
        return sum(w.prompt_tokens_computed for w in srv.status())

    with BackgroundServer(cfg) as srv:
        srv.generate(prompt="warm up", max_tokens=4)
        before = computed(srv)
        with ThreadPoolExecutor(conversations) as ex:
            rows = [r for conv in ex.map(lambda c: conversation(srv, c, turns, max_tokens), range(conversations))
                    for r in conv]
        done = computed(srv) - before
    later = [r for r in rows if r["turn"] > 1]
    return {
        "prefix_cache": prefix_cache, "local_prefill_max_tokens": local_prefill, "conversations": conversations,
        "turns": turns, "max_tokens": max_tokens,
        "first_turn_median_ttft_ms": statistics.median(r["ttft_ms"] for r in rows if r["turn"] == 1),
        "later_turns_median_ttft_ms": statistics.median(r["ttft_ms"] for r in later),
        "later_turns_max_ttft_ms": max(r["ttft_ms"] for r in later),
        "median_tpot_ms": statistics.median(r["tpot_ms"] for r in rows),
        "max_tpot_ms": max(r["tpot_ms"] for r in rows),
        "prompt_tokens_sent": sum(r["prompt_tokens"] for r in rows),
        "prompt_tokens_computed": done,
        "cached_tokens_reported": sum(r["cached_tokens"] for r in rows),
        "kv_mb_handed_off": sum(r["kv_bytes"] for r in rows) / 1e6,
        "turns_computed_on_decode": sum(bool(r["local_prefill"]) for r in rows),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deploy/aggregated.yaml")
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--local-prefill", type=int, default=0, metavar="N",
                    help="also run with decode.local_prefill_max_tokens: N (disaggregated configs)")
    ap.add_argument("--output")
    a = ap.parse_args()
    runs = []
    settings = [(True, 0)] + ([(True, a.local_prefill)] if a.local_prefill else []) + [(False, 0)]
    for on, local in settings:
        r = run(a.config, on, a.conversations, a.turns, a.max_tokens, local)
        print(json.dumps({k: v for k, v in r.items() if k != "rows"}), flush=True)
        runs.append(r)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if a.output:
        Path(a.output).write_text(json.dumps({"git": rev, "config": a.config, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
