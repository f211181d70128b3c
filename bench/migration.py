"""Kill a decode worker under load: do its streams go on, with the same tokens, and how long do they stall?

    python bench/migration.py [--config deploy/1p2d.yaml] [--streams 8] [--max-tokens 128]

Starts pdserve from the YAML in-process, then twice sends `--streams` greedy streams at once (corpus
prompts of ~100 tokens, ignore_eos): first undisturbed (the reference tokens), then killing
decode-0 (Ray restarts it) once every stream has `--kill-after` tokens. Reports per run: streams
completed, streams whose tokens equal the reference, how many were on decode-0, and for every
stream that stalled after the kill (a gap over 5x its median: the moved ones, and those whose
worker recomputed the moved ones' KV) its longest gap, its median gap, and when it resumed after
the kill; the router's migration count. Writes --output JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_streams(srv: Any, prompts: list[str], max_tokens: int, kill_after: int | None) -> dict[str, Any]:
    import grpc
    import ray

    from protos.pdserve.v1 import generation_pb2 as pb

    n = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(n)]
    times: list[list[float]] = [[] for _ in range(n)]
    status: list[str] = ["?"] * n

    def one(i: int) -> None:
        req = pb.GenerateRequest(prompt=prompts[i], max_tokens=max_tokens, ignore_eos=True)
        try:
            for msg in srv.stub.GenerateStream(req, timeout=600):
                now = time.monotonic()
                tokens[i] += msg.token_ids
                times[i] += [now] * len(msg.token_ids)
            status[i] = "OK"
        except grpc.RpcError as e:
            status[i] = e.code().name

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    killed_at = None
    if kill_after is not None:
        while min(len(t) for t in tokens) < kill_after and any(t.is_alive() for t in threads):
            time.sleep(0.005)
        placed = dict(srv.server.svc.dispatcher._placed)  # request key -> decode index (for the report)
        killed_at = time.monotonic()
        print(f"killing decode-0 at {time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d}", file=sys.stderr)
        ray.kill(srv.cluster.workers["decode-0"], no_restart=False)
    for t in threads:
        t.join(600)
    out: dict[str, Any] = {"status": status, "tokens": tokens}
    if killed_at is not None:
        moved = [i for i in range(n) if any(t > killed_at for t in times[i])
                 and _stall(times[i]) > 5 * _median_gap(times[i])]  # the moved ones and those sharing their new worker
        out.update(
            placed_on_decode_0=sum(1 for v in placed.values() if v == 0),
            stalled_streams=len(moved),
            stall_s=[round(_stall(times[i]), 3) for i in moved],
            median_gap_ms=[round(_median_gap(times[i]) * 1000, 1) for i in moved],
            resumed_after_kill_s=[round(next(t for t in times[i] if t > killed_at + _stall(times[i]) * 0.5)
                                        - killed_at, 3) for i in moved],
        )
    return out


def _stall(ts: list[float]) -> float:
    return max((b - a for a, b in zip(ts, ts[1:])), default=0.0)


def _median_gap(ts: list[float]) -> float:
    gaps = [b - a for a, b in zip(ts, ts[1:]) if b > a]
    return statistics.median(gaps) if gaps else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deploy/1p2d.yaml")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--kill-after", type=int, default=32, help="kill decode-0 once every stream has this many tokens")
    ap.add_argument("--output", default="bench/results/migration.json")
    args = ap.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s", level=logging.WARNING)  # the router's moves
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from cluster.background import BackgroundServer
    from cluster.bench import workloads
    from cluster.config import load_config
    from engine.model_loader import load_tokenizer

    cfg = load_config(args.config, {"server": {"port": 0, "http_port": None}})
    srv = BackgroundServer(cfg)
    try:
        tok = load_tokenizer(cfg.model)
        prompts = [r.prompt for r in workloads.build("fixed", args.streams, tok, seed=3, input_len=100)]
        ref = run_streams(srv, prompts, args.max_tokens, None)
        hit = run_streams(srv, prompts, args.max_tokens, args.kill_after)
        migrations = srv.server.svc.dispatcher.migrations
    finally:
        srv.stop()
    same = sum(1 for a, b in zip(ref["tokens"], hit["tokens"]) if a == b)
    report = {
        "config": args.config, "streams": args.streams, "max_tokens": args.max_tokens, "kill_after": args.kill_after,
        "reference_ok": ref["status"].count("OK"), "killed_run_ok": hit["status"].count("OK"),
        "killed_run_status": hit["status"], "tokens_equal_reference": same, "migrations": migrations,
        **{k: v for k, v in hit.items() if k not in ("status", "tokens")},
    }
    print(json.dumps(report, indent=1))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    return 0 if report["killed_run_ok"] == args.streams and same == args.streams else 1


if __name__ == "__main__":
    sys.exit(main())
