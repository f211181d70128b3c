"""Soak + fuzz (loopback only, bounded): hostile and unlucky clients against one pdserve.

    python bench/soak.py --requests 5000 --cancels 500 --output bench/results/soak.json

Starts the tiny model 1P1D (or --mode aggregated, two workers; --local-prefill N: 1P1D whose decode
worker computes prompts with at most N uncached tokens itself) in-process (or targets --address),
then sends, from 16 threads: fuzzed requests (random bytes, bit-flipped valid requests, valid shapes
with extreme or wrong values, duplicate request ids), normal requests, and requests that are
cancelled or run out of time at random moments; half the valid prompts start with one shared
preamble (under one of two cache salts), so cached KV blocks are shared all the while. At the end
it checks the promises: every answer is OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ALREADY_EXISTS,
CANCELLED or DEADLINE_EXCEEDED; health is SERVING; no KV block is used and no request is running on
any worker; in-process, every worker's block accounting passes its integrity check. Exit status 1
if a promise is broken.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from protos.pdserve.v1 import generation_pb2 as pb  # noqa: E402
from protos.pdserve.v1 import generation_pb2_grpc as pbg  # noqa: E402

ALLOWED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "ALREADY_EXISTS", "CANCELLED", "DEADLINE_EXCEEDED"}
WORDS = "the a cache token prefill decode batch river cloud seven quiet paper light".split()
SHARED = " ".join(WORDS * 4)  # ~250 tokens: whole blocks many prompts start with
EXTREME = [0.0, -1.0, 1e-40, 1e-6, 0.5, 1.0, 2.0, 1e30, 3.4e38, float("inf"), float("nan")]


def fuzzed(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.15:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    base = valid(rng).SerializeToString()
    if kind < 0.4 and base:
        b = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    req = valid(rng)
    f = rng.randrange(15)
    if f == 0:
        req.temperature = rng.choice(EXTREME)
    elif f == 1:
        req.top_p = rng.choice(EXTREME)
    elif f == 2:
        req.top_k = rng.choice([-5, 0, 1, 3, 10**6])
    elif f == 3:
        req.min_p = rng.choice(EXTREME)
    elif f == 4:
        req.repetition_penalty = rng.choice(EXTREME + [9.9])
    elif f == 5:
        req.presence_penalty = rng.choice([-2.0, 2.0, -3.0, 1e9])
        req.frequency_penalty = rng.choice([-2.0, 2.0, 5.0])
    elif f == 6:
        req.max_tokens = rng.choice([-1, 0, 1, 10**6])
    elif f == 7:
        req.prompt = "x" * rng.choice([0, 5000])
    elif f == 8:
        req.stop.extend(rng.choice([[""], ["a"] * 50, ["the"]]))
    elif f == 9:
        req.logprobs = rng.choice([-1, 0, 5, 21, 100])
    elif f == 10:
        req.ClearField("prompt")
        req.messages.add(role=rng.choice(["user", "system", "robot", ""]), content="hi")
    elif f == 11:
        req.stop_token_ids.extend([rng.choice([0, 2, 10**9])])
    elif f == 12:
        req.min_tokens = rng.choice([-1, 0, 1, req.max_tokens, req.max_tokens + 1, 10**6])
    elif f == 13:  # structured outputs, broken and odd
        s = req.structured
        rng.choice([lambda: setattr(s, "regex", rng.choice(["(a", "", "[z-a]", "a{99999}", ".*"])),
                    lambda: setattr(s, "json_schema", rng.choice(["", "[1", "{\"type\": 5}", "{" * 3000,
                                                                  '{"$ref": "#/nope"}', '{"type": "string"}'])),
                    lambda: setattr(s, "grammar", rng.choice(["start: x", "start: start", 'start: "a"+'])),
                    lambda: s.choice.choices.extend(rng.choice([[""], ["a"] * 300, ["\u0000", "é"]])),
                    lambda: setattr(s, "json_object", rng.random() < 0.5)])()
        if rng.random() < 0.3:
            req.allowed_token_ids.append(rng.randrange(256))
    else:
        for _ in range(rng.choice([1, 3, 400])):
            req.logit_bias[rng.choice([0, 2, 7, 255, 10**9])] = rng.choice(EXTREME + [-100.0, -1e9])
    return req.SerializeToString()


def valid(rng: random.Random) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt=" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 60))),
                             max_tokens=rng.randrange(1, 48))
    if rng.random() < 0.5:
        req.prompt, req.cache_salt = SHARED + " " + req.prompt, rng.choice(["", "tenant-b"])
    if rng.random() < 0.5:
        req.temperature, req.seed = rng.uniform(0.1, 1.5), rng.randrange(1000)
    if rng.random() < 0.1:  # a banned and a favoured token, sharing steps with requests without
        req.logit_bias[rng.randrange(256)] = -100.0
        req.logit_bias[rng.randrange(256)] = rng.uniform(-5, 5)
    if rng.random() < 0.1:  # EOS, stop ids and stop strings held off for a while
        req.min_tokens = rng.randrange(req.max_tokens + 1)
        req.stop.append(rng.choice(WORDS))
    if rng.random() < 0.1:  # held to a grammar, sharing steps with free rows
        rng.choice([lambda: setattr(req.structured, "regex", "[a-z ]{1,30}\\."),
                    lambda: req.structured.choice.choices.extend(["yes", "no", "not sure"]),
                    lambda: setattr(req.structured, "json_schema", '{"type": "object", "properties": '
                                    '{"w": {"enum": ["the", "cat"]}, "n": {"type": "integer"}}}')])()
    if rng.random() < 0.2:
        req.request_id = f"dup-{rng.randrange(5)}"  # clashes with another in flight now and then
    return req


def one(stub: Any, raw_call: Any, rng: random.Random, kind: str) -> str:
    try:
        if kind == "fuzz":
            raw_call(fuzzed(rng), timeout=60)
        elif kind == "normal":
            stub.Generate(valid(rng), timeout=60)
        elif kind == "deadline":
            stub.Generate(valid(rng), timeout=rng.uniform(0.005, 0.5))
        else:  # cancel
            req = valid(rng)
            req.max_tokens, req.ignore_eos = rng.randrange(50, 400), True
            it = stub.GenerateStream(req, timeout=60)
            time.sleep(rng.uniform(0, 0.5))
            it.cancel()
            for _ in it:
                pass
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def prefix_hits(srv: Any) -> dict[str, int] | None:
    """Prompt tokens each in-process worker found in its prefix cache (not computed / not handed off)."""
    if srv is None:
        return None
    import ray

    stats = ray.get([w.stats.remote() for w in srv.cluster.prefills + srv.cluster.decodes], timeout=30)
    return {s.id: s.extra.get("prefix_hit_tokens", 0) for s in stats}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", default=None, help="a running pdserve; default: start the tiny model here")
    ap.add_argument("--requests", type=int, default=5000, help="fuzzed requests")
    ap.add_argument("--normal", type=int, default=1000)
    ap.add_argument("--cancels", type=int, default=500, help="cancellations + deadlines")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-blocks", type=int, default=1024, help="decode KV blocks of 16 tokens (128: the fewest "
                    "for the tiny model's 2048-token context; requests then grow into each other: preemptions)")
    ap.add_argument("--mode", choices=["disaggregated", "aggregated"], default="disaggregated")
    ap.add_argument("--local-prefill", type=int, default=0, metavar="N",
                    help="decode.local_prefill_max_tokens: prompts with at most N tokens not cached on their decode "
                    "worker are computed there (disaggregated)")
    ap.add_argument("--overlap-reserve", action="store_true", help="prefill.overlap_reserve: the prompt is sent "
                    "while its decode worker reserves")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    srv = None
    if a.address is None:
        from cluster.background import BackgroundServer
        from cluster.config import parse_config

        workers: dict[str, Any] = ({"aggregated": {"replicas": 2, "num_cpus": 0.5}} if a.mode == "aggregated"
                                   else {"prefill": {"num_cpus": 0.5, "overlap_reserve": a.overlap_reserve},
                                         "decode": {"num_cpus": 0.5, "local_prefill_max_tokens": a.local_prefill}})
        srv = BackgroundServer(parse_config({
            "model": {"path": "tiny"}, "mode": a.mode, "server": {"port": 0}, "kv_cache": {"num_blocks": a.kv_blocks},
            "limits": {"max_prompt_tokens": 1024}, **workers,
        }))
        address = srv.address
    else:
        address = a.address
    channel = grpc.insecure_channel(address)
    stub = pbg.GenerationStub(channel)
    raw_call = channel.unary_unary("/pdserve.v1.Generation/Generate")
    rng = random.Random(a.seed)
    kinds = (["fuzz"] * a.requests + ["normal"] * a.normal + ["deadline"] * (a.cancels // 2)
             + ["cancel"] * (a.cancels - a.cancels // 2))
    rng.shuffle(kinds)
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(a.threads) as ex:
        codes = list(ex.map(lambda k: (k, one(stub, raw_call, random.Random(rng.random()), k)), kinds))
    wall = time.monotonic() - t0
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for k, c in codes:
        by_kind[k][c] += 1
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    time.sleep(1.0)
    healthy = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    workers = list(stub.Status(pb.StatusRequest(), timeout=30).workers)
    blocks = {w.id: w.kv_blocks_used for w in workers}
    busy = {w.id: w.running + w.waiting for w in workers}
    preemptions = {w.id: w.preemptions for w in workers if w.role != "prefill"}
    prefilled = {w.id: w.requests_prefilled for w in workers}
    unexpected = {k: {c: n for c, n in cnt.items() if c not in ALLOWED} for k, cnt in by_kind.items()}
    unexpected = {k: v for k, v in unexpected.items() if v}
    accounted = srv.all_idle() if srv is not None else None  # every allocator's integrity check
    ok = healthy and not unexpected and not any(blocks.values()) and not any(busy.values()) and accounted is not False
    report = {"address": address, "mode": a.mode, "wall_s": round(wall, 1), "sent": len(kinds),
              "codes": {k: dict(v) for k, v in by_kind.items()}, "unexpected": unexpected, "healthy": healthy,
              "kv_blocks_used": blocks, "requests_busy": busy, "preemptions": preemptions,
              "requests_prefilled": prefilled, "local_prefill_max_tokens": a.local_prefill,
              "overlap_reserve": a.overlap_reserve,
              "prefix_hit_tokens": prefix_hits(srv), "blocks_accounted": accounted, "promises_kept": ok}
    print(json.dumps(report, indent=2))
    if a.output:
        Path(a.output).write_text(json.dumps(report, indent=2))
    channel.close()
    if srv is not None:
        srv.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
