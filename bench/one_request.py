"""One request at a time against a running pdserve: TTFT, KV handoff time/bytes, decode tokens/s.

    python bench/one_request.py --address 127.0.0.1:50051 --runs 5 --max-tokens 128 --output one.json
    (--prompt-logprobs N: each prompt token's logprob and top-N too, what `echo` costs)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from protos.pdserve.v1 import generation_pb2 as pb  # noqa: E402
from protos.pdserve.v1 import generation_pb2_grpc as pbg  # noqa: E402

PROMPT = (
    "Summarize the following in two sentences. Disaggregated serving runs the prompt (prefill) and "
    "the generation (decode) of a language model on different workers, so that a long prompt does "
    "not stall the token stream of requests already generating, and the KV cache of each prompt is "
    "handed from the prefill worker to the decode worker over a fast interconnect."
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", default="127.0.0.1:50051")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-repeat", type=int, default=1, help="repeat the prompt to lengthen it")
    ap.add_argument("--reuse-prefix", action="store_true",
                    help="let the runs share cached KV (default: each run its own cache_salt, a cold prompt)")
    ap.add_argument("--prompt-logprobs", type=int, default=None, help="ask for prompt logprobs with top-N")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    stub = pbg.GenerationStub(grpc.insecure_channel(a.address))
    req = pb.GenerateRequest(prompt=" ".join([PROMPT] * a.prompt_repeat), max_tokens=a.max_tokens, ignore_eos=True)
    if a.prompt_logprobs is not None:
        req.prompt_logprobs = a.prompt_logprobs
    stub.Generate(pb.GenerateRequest(prompt="warm up", max_tokens=4), timeout=120)  # warm-up excluded
    rows = []
    run = uuid.uuid4().hex[:8]  # a salt seen by no earlier invocation against the same server
    for i in range(a.runs):
        req.cache_salt = "" if a.reuse_prefix else f"one-request-{run}-{i}"  # cold in every invocation too
        t0 = time.perf_counter()
        first = None
        n = 0
        last = None
        for msg in stub.GenerateStream(req, timeout=600):
            if first is None and msg.token_ids:
                first = time.perf_counter()
            n += len(msg.token_ids)
            last = msg
        end = time.perf_counter()
        t = last.timings
        rows.append({
            "client_ttft_ms": (first - t0) * 1000,
            "server_ttft_ms": t.ttft_ms,
            "prefill_ms": t.prefill_ms,
            "kv_transfer_ms": t.kv_transfer_ms,
            "kv_transfer_bytes": t.kv_transfer_bytes,
            "prompt_tokens": last.usage.prompt_tokens,
            "completion_tokens": n,
            "decode_tokens_per_s": (n - 1) / (end - first),
            "e2e_ms": (end - t0) * 1000,
        })
    summary = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"address": a.address, "runs": a.runs, "git": rev, "prompt_logprobs": a.prompt_logprobs,
           "median": summary, "rows": rows}
    print(json.dumps(out["median"], indent=2))
    if a.output:
        Path(a.output).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
