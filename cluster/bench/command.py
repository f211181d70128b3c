"""`pdserve bench`: the command line of the load generator.

    pdserve bench --address 127.0.0.1:50051 --rate 0.5,1,2 --num-prompts 40 --workload prefill-heavy \\
        --slo ttft:2000 tpot:200 --output run.json --plot run.png
    pdserve bench --backend openai --url http://127.0.0.1:8000 --model smollm2 ...   # any OpenAI server
    pdserve bench --config deploy/local.yaml ...     # start pdserve from a YAML for the run
    pdserve bench --compare a.json b.json --plot both.png
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cluster.bench.workloads import WORKLOADS


def add_parser(sub: Any) -> None:
    b = sub.add_parser("bench", help="load-test a running server (or one started from --config)")
    b.add_argument("--address", default="127.0.0.1:50051", help="pdserve router HOST:PORT (grpc backend)")
    b.add_argument("--ca-file", help="PEM CA of the server's certificate (TLS, both backends); the token, if "
                   "any, comes from PDSERVE_TOKEN")
    b.add_argument("--backend", choices=("grpc", "openai"), default="grpc")
    b.add_argument("--url", help="base URL of an OpenAI-compatible server (openai backend)")
    b.add_argument("--model", default="smollm2", help="model name sent to an OpenAI server")
    b.add_argument("--no-extras", action="store_true", help="openai backend: do not send vLLM's ignore_eos/"
                   "min_tokens/stream_options (for strict servers; outputs may then stop early at EOS)")
    b.add_argument("--config", help="start pdserve from this YAML for the run (grpc backend)")
    b.add_argument("--tokenizer", default=None, help="model.path whose tokenizer cuts prompts (default: the "
                   "config's model, else 'default')")
    b.add_argument("--workload", choices=WORKLOADS, default="chat")
    b.add_argument("--input-len", type=int, default=128, help="fixed workload: prompt tokens")
    b.add_argument("--output-len", type=int, default=64, help="fixed workload: output tokens")
    b.add_argument("--max-tokens", type=int, default=None, help="ask for this many tokens per request, but stop "
                   "reading (closing the stream) at the workload's output length: answers shorter than the cap")
    b.add_argument("--num-prompts", type=int, default=32, help="requests per rate")
    b.add_argument("--rate", default="inf", help="comma-separated request rates (req/s); inf = all at once")
    b.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    b.add_argument("--max-duration", type=float, default=600.0, help="stop sending after this many seconds per rate")
    b.add_argument("--slo", nargs="*", default=[], help="SLOs like ttft:2000 tpot:200 e2el:10000 (ms)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--label", default=None, help="system name in the JSON and the plot legend")
    b.add_argument("--output", help="write the runs as JSON")
    b.add_argument("--plot", help="write a PNG of p99 TTFT/TPOT/ITL and goodput vs rate")
    b.add_argument("--compare", nargs="+", help="JSON files to overlay (with --plot); no load is sent")
    b.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_slo(items: list[str]) -> dict[str, float]:
    slo = {}
    for item in items:
        key, _, ms = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not ms:
            raise SystemExit(f"--slo: {item!r} is not NAME:MS with NAME in ttft, tpot, e2el")
        slo[key] = float(ms)
    return slo


def run(args: argparse.Namespace) -> int:
    from cluster.bench import report

    if args.compare:
        series = {}
        for f in args.compare:
            data = json.loads(Path(f).read_text())
            series[data.get("label") or Path(f).stem] = data["runs"]
            print(f"== {data.get('label') or f} ({data.get('workload')})\n{report.table(data['runs'])}")
        if args.plot:
            report.plot(series, args.plot, title="; ".join(sorted({json.loads(Path(f).read_text()).get('workload', '')
                                                                  for f in args.compare})))
            print(f"wrote {args.plot}")
        return 0
    rates = [float(x) for x in args.rate.split(",")]
    slo = parse_slo(args.slo)
    server = None
    address = args.address
    model_path = args.tokenizer
    if args.config:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        from cluster.background import BackgroundServer
        from cluster.config import load_config

        cfg = load_config(args.config, {"server": {"port": 0}})
        model_path = model_path or cfg.model.path
        t0 = time.monotonic()
        server = BackgroundServer(cfg)
        print(f"pdserve started from {args.config} in {time.monotonic() - t0:.1f}s (not counted)", file=sys.stderr)
        address = server.address
    try:
        out = asyncio.run(_bench(args, address, rates, slo, model_path or "default"))
        if server is not None:  # what the workers did over the whole run (warm-up included)
            out["workers"] = [{"id": w.id, "role": w.role, "prompt_tokens_computed": w.prompt_tokens_computed,
                               "tokens_generated": w.tokens_generated, "preemptions": w.preemptions,
                               "recomputed_tokens": w.recomputed_tokens} for w in server.status()]
    finally:
        if server is not None:
            server.stop()
    from cluster.bench import report as rep

    print(rep.table(out["runs"]))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.output}")
    if args.plot:
        rep.plot({out["label"]: out["runs"]}, args.plot, title=out["workload"])
        print(f"wrote {args.plot}")
    return 0


async def _bench(args: argparse.Namespace, address: str, rates: list[float], slo: dict[str, float],
                 model_path: str) -> dict[str, Any]:
    from cluster.bench import report, workloads
    from cluster.bench.backends import GrpcBackend, OpenAIBackend
    from cluster.bench.runner import run_rate, warm_up
    from engine.config import ModelConfig
    from engine.model_loader import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=model_path))

    def specs_for(i: int) -> list:  # type: ignore[type-arg]
        # new prompts for every rate: a server's prefix cache must not see a rerun of the last rate
        return workloads.build(args.workload, args.num_prompts, tok, args.seed + 1000 * i, args.input_len,
                               args.output_len)

    if args.backend == "openai":
        if not args.url:
            raise SystemExit("--url is required with --backend openai")
        backend: Any = OpenAIBackend(args.url, args.model, extras=not args.no_extras, ca_file=args.ca_file,
                                     max_tokens=args.max_tokens)
        target = args.url
    else:
        backend = GrpcBackend(address, ca_file=args.ca_file, max_tokens=args.max_tokens)
        target = address
    runs = []
    try:
        await warm_up(backend)  # excluded from the figures
        for i, rate in enumerate(rates):
            records, duration = await run_rate(
                backend, specs_for(i), rate, args.max_concurrency, args.seed, args.max_duration, not args.quiet
            )
            r = report.summarize(records, duration, slo)
            r["request_rate"] = rate if math.isfinite(rate) else "inf"
            runs.append(r)
    finally:
        await backend.close()
    for r in runs:  # JSON has no inf
        if r["request_rate"] == "inf":
            r["request_rate"] = r["request_throughput"]
            r["burst"] = True
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    return {
        "label": args.label or (f"pdserve {args.config}" if args.config else f"{args.backend} {target}"),
        "backend": args.backend, "target": target, "workload": args.workload, "num_prompts": args.num_prompts,
        "max_concurrency": args.max_concurrency, "max_tokens": args.max_tokens, "seed": args.seed, "slo": slo,
        "git": rev,
        "config": args.config, "runs": runs,
    }
