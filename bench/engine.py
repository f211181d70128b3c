"""Engine benchmark: decode tokens/s through the whole serving path vs the bare model forward.

    python bench/engine.py --config deploy/local.yaml --concurrency 1,8,32,64 --output bench/results/engine.json

For each concurrency C it runs C streaming requests at once (fixed prompt length, ignore_eos; the
clients are asyncio streams in a process of their own, as a router's clients would be) and
measures the aggregate decode rate over the window where all C are decoding together (from the
last first-token to the first last-token). In the same run, with the cluster idle, it times the
bare paged forward of the same model at batch C with the same context lengths, in this process with
the decode worker's torch thread count, at the middle of the serving window's context lengths. ratio = serving tok/s / bare tok/s: the share of the hardware's
decode rate the serving loop (scheduling, sampling, Ray, gRPC streaming) delivers. Requests are
greedy unless --temperature / --top-p say otherwise (the bare forward never samples, so the ratio
then also shows what the draw costs). Where the serving rate goes: the router process's CPU per
token by thread, and the decode workers' loop per step (schedule, run, postprocess, idle: their
`loop_s` stats over the run, the clients' start included in idle; `overlapped`: the steps that
followed one in flight, decode.overlap_steps).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

from cluster.background import BackgroundServer  # noqa: E402
from cluster.config import load_config  # noqa: E402
from engine.model_loader import load_model, load_tokenizer  # noqa: E402
from engine.model_runner import ModelRunner, SeqInput  # noqa: E402
from protos.pdserve.v1 import generation_pb2 as pb  # noqa: E402


def _stream_clients(address: str, texts: list[str], max_tokens: int, sampling: dict[str, float],
                    out: "mp.Queue[Any]") -> None:
    """In its own process (the router's must not share a GIL with 64 clients): one asyncio gRPC
    stream per text, all at once; puts (arrival times of every token per stream, t0, error | None,
    messages received)."""
    import grpc

    from protos.pdserve.v1 import generation_pb2_grpc as pbg

    async def run() -> tuple[list[list[float]], float, str | None, int]:
        arrivals: list[list[float]] = [[] for _ in texts]
        messages = [0] * len(texts)
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pbg.GenerationStub(ch)

            async def one(i: int) -> None:
                req = pb.GenerateRequest(prompt=texts[i], max_tokens=max_tokens, ignore_eos=True, **sampling)
                async for msg in stub.GenerateStream(req, timeout=900):
                    now = time.perf_counter()
                    arrivals[i].extend([now] * len(msg.token_ids))
                    messages[i] += 1

            t0 = time.perf_counter()
            res = await asyncio.gather(*(one(i) for i in range(len(texts))), return_exceptions=True)
        errors = [str(r) for r in res if isinstance(r, BaseException)]
        return arrivals, t0, errors[0] if errors else None, sum(messages)

    out.put(asyncio.run(run()))


def serving_rate(srv: BackgroundServer, conc: int, prompt_ids: list[list[int]], tok, max_tokens: int,  # type: ignore[no-untyped-def]
                 sampling: dict[str, float]) -> dict:
    texts = [tok.decode(prompt_ids[i % len(prompt_ids)]) for i in range(conc)]
    cpu0, threads0, loops0, wall0 = _cpu_s(), _thread_cpu(), _decode_loops(srv), time.perf_counter()
    ctx = mp.get_context("spawn")
    out: "mp.Queue[Any]" = ctx.Queue()
    proc = ctx.Process(target=_stream_clients, args=(srv.address, texts, max_tokens, sampling, out), daemon=True)
    proc.start()
    arrivals, t0, error, messages = out.get(timeout=1800)
    router_cpu = _cpu_s() - cpu0
    threads = {k: v - threads0.get(k, 0.0) for k, v in _thread_cpu().items()}
    loops, wall = _decode_loops(srv), time.perf_counter() - wall0
    proc.join(60)
    if error:
        raise RuntimeError(error)
    start = max(a[0] for a in arrivals)  # every request has its first token: batch is full
    end = min(a[-1] for a in arrivals)  # the first request finishes: batch shrinks
    tokens = sum(sum(1 for x in a if start < x <= end) for a in arrivals)
    itl = [b - a for arr in arrivals for a, b in zip(arr[1:], arr[2:])]
    return {
        "concurrency": conc,
        "decode_tokens_per_s": tokens / (end - start) if end > start else float("nan"),
        "window_s": end - start,
        "median_itl_ms": statistics.median(itl) * 1000 if itl else float("nan"),
        "mean_ttft_ms": statistics.mean(a[0] - t0 for a in arrivals) * 1000,
        "wall_s": max(a[-1] for a in arrivals) - t0,
        # CPU time of this process (the router's event loop; its clients run elsewhere) per token streamed
        "router_cpu_us_per_token": router_cpu / sum(len(a) for a in arrivals) * 1e6,
        "tokens_per_message": sum(len(a) for a in arrivals) / messages,  # > 1: the router merged events
        # where that CPU went: the router's event loop, gRPC's poller, Ray's threads (Linux only)
        "router_cpu_us_per_token_by_thread": {k: round(v / sum(len(a) for a in arrivals) * 1e6, 1)
                                              for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v > 0},
        # the decode workers' loop threads, per step on average over the run: where a step's time goes
        "worker_step_ms": _per_step(loops0, loops, wall),
    }


Loops = list[tuple[int, dict[str, float], int]]


def _decode_loops(srv: BackgroundServer) -> Loops:
    """(steps, seconds in each part of the loop, steps that followed one in flight) of every decode
    (or aggregated) worker."""
    import ray

    return [(s.extra["steps"], s.extra["loop_s"], s.extra["steps_overlapped"])
            for s in ray.get([w.stats.remote() for w in srv.cluster.decodes])]


def _per_step(before: Loops, after: Loops, wall: float) -> dict[str, float]:
    steps = sum(a[0] - b[0] for a, b in zip(after, before))
    if steps <= 0:
        return {}
    out = {k: sum(a[1][k] - b[1][k] for a, b in zip(after, before)) / steps * 1000 for k in after[0][1]}
    out["other"] = wall * len(after) / steps * 1000 - sum(out.values())  # between the parts: the lock
    out["steps"] = steps
    out["overlapped"] = sum(a[2] - b[2] for a, b in zip(after, before))  # decode.overlap_steps at work
    return {k: round(v, 3) for k, v in out.items()}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each of this process's threads, by name (threads of one name summed); {} off Linux."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return out
    for t in tasks:
        try:
            stat = Path(f"/proc/self/task/{t}/stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def bare_rate(runner: ModelRunner, batch: int, prompt_len: int, steps: int) -> dict:
    """Median time of `steps` decode forwards at batch `batch`, contexts from prompt_len on."""
    bs = runner.block_size
    per = -(-(prompt_len + steps + 1) // bs)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(batch)]
    rng = random.Random(0)
    # context as in serving: prompt KV present (random values do not change the cost), then decode
    seqs = [SeqInput([rng.randrange(3, min(1000, runner.vocab_size))], prompt_len, t) for t in tables]
    runner.forward(seqs)  # warm-up
    times = []
    for s in range(steps):
        seqs = [SeqInput([rng.randrange(3, min(1000, runner.vocab_size))], prompt_len + s, t) for t in tables]
        t0 = time.perf_counter()
        logits = runner.forward(seqs)
        logits.argmax(-1).tolist()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"batch": batch, "forward_ms": step * 1000, "tokens_per_s": batch / step}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="deploy/local.yaml")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--bare-steps", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0, help="every request's; 0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--output", default="bench/results/engine.json")
    a = ap.parse_args()
    levels = [int(x) for x in a.concurrency.split(",")]
    sampling = {"temperature": a.temperature, "top_p": a.top_p}
    # room for every request at the highest concurrency, so the run measures decode, not admission
    need = max(levels) * -(-(a.prompt_tokens + 16 + a.max_tokens) // 16)
    cfg = load_config(a.config, {"server": {"port": 0}, "kv_cache": {"num_blocks": need},
                                 "limits": {"max_concurrent_requests": max(256, max(levels))}})
    tok = load_tokenizer(cfg.model)
    rng = random.Random(1)
    # ordinary tokens that survive decode → re-encode with the same count; the tiny test model's
    # byte-level vocabulary (259): printable ASCII bytes (ids 35..128)
    lo, hi = (1000, min(20000, len(tok))) if len(tok) > 2000 else (35, 129)
    prompt_ids = [[rng.randrange(lo, hi) for _ in range(a.prompt_tokens)] for _ in range(8)]
    # a decoded-then-retokenized prompt may change length a little; report what was sent
    rows = []
    with BackgroundServer(cfg) as srv:
        srv.generate(prompt="warm up", max_tokens=8)
        for c in levels:
            r = serving_rate(srv, c, prompt_ids, tok, a.max_tokens, sampling)
            threads = ", ".join(f"{k} {v:.0f}" for k, v in list(r["router_cpu_us_per_token_by_thread"].items())[:4])
            print(f"serving  C={c:3d}: {r['decode_tokens_per_s']:7.1f} tok/s  itl {r['median_itl_ms']:.1f} ms"
                  f"  router {r['router_cpu_us_per_token']:.0f} µs CPU/token ({threads}),"
                  f" {r['tokens_per_message']:.2f} tokens/message\n"
                  f"         decode workers' loop per step (ms): {r['worker_step_ms']}", flush=True)
            if not r["window_s"] > 0:
                print(f"         no moment had all {c} decoding (the first finished before the last began): "
                      "raise --max-tokens", flush=True)
            rows.append(r)
    torch.set_num_threads(cfg.decode.torch_threads)
    model = load_model(cfg.model)
    # the serving window sees contexts from ~prompt to prompt + max_tokens: time the bare forward
    # around the middle of that range
    mid = a.prompt_tokens + a.max_tokens // 2
    runner = ModelRunner(
        model, num_blocks=max(levels) * (-(-(mid + a.bare_steps + 2) // 16)), block_size=16, kernels=cfg.model.kernels
    )
    if runner.device.type == "cuda" and cfg.decode.cuda_graphs and runner.attn.name == "triton":
        runner.use_decode_graphs(max(levels), cfg.model.max_model_len)  # as the decode worker does
    for r in rows:
        b = bare_rate(runner, r["concurrency"], mid, a.bare_steps)
        r["bare_forward_ms"] = b["forward_ms"]
        r["bare_tokens_per_s"] = b["tokens_per_s"]
        r["serving_over_bare"] = r["decode_tokens_per_s"] / b["tokens_per_s"]
        print(f"bare     B={r['concurrency']:3d}: {b['tokens_per_s']:7.1f} tok/s  forward {b['forward_ms']:.1f} ms"
              f"  → serving/bare {r['serving_over_bare']:.2f}", flush=True)
    base = rows[0]["decode_tokens_per_s"] if rows and rows[0]["concurrency"] == 1 else None
    for r in rows:
        r["speedup_vs_c1"] = r["decode_tokens_per_s"] / base if base else None
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"git": rev, "config": a.config, "model": cfg.model.path, "prompt_tokens": a.prompt_tokens,
           "max_tokens": a.max_tokens, "sampling": sampling, "machine": f"{os.cpu_count()} cpus", "runs": rows}
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(out, indent=2))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
