"""Where a decode step's time goes on the worker's host: an aggregated worker in this process (no Ray,
no router), B greedy streams of 64-token prompts decoding together, timers around each part of
the loop. Without a GPU it runs the tiny model on CPU (the parts' costs, not the device's).

    python bench/step_host.py --model-path /tmp/llama-1.1b --batch 64 [--no-overlap] [--temperature 0.8 --top-p 0.95]
                              [--stagger] [--penalized K] [--guided K] [--output F.json] [--profile F.txt]
    python bench/step_host.py --uncaptured --batch 16 --stagger --seconds 20   # no GPU: the graph path's decisions

--stagger: prompt i has 64 + i % block_size tokens, so the rows start blocks at different steps, as
a served batch's rows (joined at different times) do; without it they all start one every
block_size steps. --penalized K: the first K streams have a repetition penalty, so their draw reads
the tokens before them (a step in flight samples its batch once the step before has completed).
--guided K: the first K streams are held to a regex (words " t<k>" of a bench/make_model.py model,
which never ends): their masks are computed on the host every step.
--uncaptured: on CPU, the CUDA-graph path run eagerly under Triton's interpreter
(slow: for the loop's decisions, e.g. how many steps follow one in flight, not for its timings).

Prints one JSON line: step_ms (wall per step while all B decode), the loop's parts per step in µs
(schedule, run, postprocess; `engine/step_loop.py`), the timed pieces inside them (fill: the graph
inputs; replay; sample_wait: the host waiting for a plain draw; on_tokens; emit), and how many
steps followed one in flight (`decode.overlap_steps`). --profile: a torch profile of the measured
window (host and device), its top entries by self CPU time and by device time, to F.txt, and
its Chrome trace beside it (F.json): where a served step's time goes, which the step's parts alone
do not say.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import threading
import time

if "--uncaptured" in sys.argv:  # Triton reads it when first imported (below, through the engine)
    os.environ["TRITON_INTERPRET"] = "1"
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the engine package, not bench/engine.py

from decode_worker.aggregated import AggregatedWorker  # noqa: E402
from decode_worker.config import AggregatedConfig  # noqa: E402
from engine import sampler  # noqa: E402
from engine.config import KVCacheConfig, ModelConfig  # noqa: E402
from engine.structured import grammar_text  # noqa: E402
from engine.types import PrefillRequest, SamplingParams  # noqa: E402

PARTS: collections.Counter[str] = collections.Counter()  # seconds per timed piece


def timed(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    def g(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            PARTS[name] += time.perf_counter() - t
    return g


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=1.0, help="how long to measure, all B decoding")
    ap.add_argument("--no-overlap", action="store_true", help="decode.overlap_steps: false")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: every stream draws (seeded)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--output")
    ap.add_argument("--profile", help="write a torch profile of the measured window here")
    ap.add_argument("--stagger", action="store_true", help="prompt i has 64 + i %% block_size tokens")
    ap.add_argument("--penalized", type=int, default=0, help="the first K streams have repetition_penalty 1.1")
    ap.add_argument("--guided", type=int, default=0, help="the first K streams are held to a regex grammar")
    ap.add_argument("--uncaptured", action="store_true", help="CPU: the graph path, eagerly, under Triton's interpreter")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    w = AggregatedWorker(
        "a0", ModelConfig(path=a.model_path, dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu",
                          kernels="triton" if a.uncaptured else "auto"),
        KVCacheConfig(gpu_memory_utilization=0.5) if cuda else KVCacheConfig(num_blocks=8192),
        AggregatedConfig(num_gpus=1 if cuda else 0, max_batch_size=a.batch, max_batch_tokens=4096, chunk_tokens=2048,
                         overlap_steps=not a.no_overlap))
    if a.uncaptured and not cuda:
        w.runner.use_decode_graphs(a.batch, w.model_cfg.max_model_len, capture=False)
    if w.runner.graphs is not None:
        w.runner.graphs._fill = timed("fill", w.runner.graphs._fill)  # type: ignore[method-assign]
    w.scheduler.on_tokens = timed("on_tokens", w.scheduler.on_tokens)  # type: ignore[method-assign]
    w._emit = timed("emit", w._emit)  # type: ignore[method-assign]
    collect = sampler.Sampled.collect
    sampler.Sampled.collect = timed("sample_wait", collect)  # type: ignore[method-assign]
    prof = LoopProfile(cuda) if a.profile else None
    if prof is not None:  # the profiler records the thread that starts it: the worker's loop starts it
        w._schedule = prof.hooked(w._schedule)  # type: ignore[method-assign]
        w._follow = prof.hooked(w._follow)  # type: ignore[method-assign]
    w.start()
    stop = threading.Event()

    def drain() -> None:  # the router's part: take the events (acknowledged), so the outbox stays small
        log, acked = "", 0
        while not stop.is_set():
            b = w.poll(0.05, log, acked)
            log, acked = b.log, b.seq
    pump = threading.Thread(target=drain, daemon=True)
    pump.start()
    vocab = w.runner.vocab_size
    sp = SamplingParams(max_tokens=1500, ignore_eos=True, temperature=a.temperature, top_p=a.top_p,
                        seed=1 if a.temperature > 0 else None)  # outlasts the measurement
    callers = []
    penalized = dataclasses.replace(sp, repetition_penalty=1.1)
    # EOS banned (min_tokens): the regex accepts after each word, and a grammar's end would end the row
    guided = dataclasses.replace(sp, grammar=grammar_text("regex", "( t[0-9]+)+"), ignore_eos=False,
                                 min_tokens=sp.max_tokens) if a.guided else sp
    for i in range(a.batch):
        ids = [5 + (i * 7 + j) % (vocab - 5) for j in range(64 + (i % w.allocator.block_size if a.stagger else 0))]
        spi = penalized if i < a.penalized else guided if i < a.penalized + a.guided else sp
        assert w.reserve(f"r{i}", len(ids), spi, (2,), ids).ok
        t = threading.Thread(target=w.prefill, args=(PrefillRequest(f"r{i}", ids, spi, (2,), 0), 300))
        t.start()
        callers.append(t)
    for t in callers:
        t.join()
    time.sleep(0.3)
    if prof is not None:
        prof.want("start")
    s0, l0, p0, o0 = w.steps, dict(w.loop_s), dict(PARTS), w.steps_overlapped
    time.sleep(a.seconds)
    s1, l1, p1, o1 = w.steps, dict(w.loop_s), dict(PARTS), w.steps_overlapped
    if prof is not None:
        prof.want("stop")
        _write_profile(prof.result(), Path(a.profile), cuda)
    n = max(1, s1 - s0)
    out = {"batch": a.batch, "stagger": a.stagger, "penalized": a.penalized, "guided": a.guided, "running": w.scheduler.num_running, "steps": s1 - s0,
           "step_ms": a.seconds * 1000 / n, "overlapped": o1 - o0, "device": "cuda" if cuda else "cpu",
           "loop_us": {k: round((l1[k] - l0[k]) / n * 1e6, 1) for k in l1},
           "parts_us": {k: round((p1[k] - p0.get(k, 0.0)) / n * 1e6, 1) for k in p1}}
    print(json.dumps(out))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(out, f, indent=1)
    stop.set()
    pump.join(2)
    w.shutdown()


class LoopProfile:
    """A torch profile started and stopped on the worker's loop thread (at the next turn after
    want()): CPU ops are recorded on the thread that runs the profiler."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self._want, self._prof = cuda, "", None
        self._done = threading.Event()

    def want(self, what: str) -> None:
        self._want = what

    def hooked(self, f: Callable[..., Any]) -> Callable[..., Any]:
        def g(*a: Any, **k: Any) -> Any:
            if self._want == "start" and self._prof is None:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
                self._prof = profile(activities=acts)
                self._prof.start()
            elif self._want == "stop" and self._prof is not None and not self._done.is_set():
                self._prof.stop()
                self._done.set()
            return f(*a, **k)
        return g

    def result(self, timeout_s: float = 30.0) -> Any:
        if not self._done.wait(timeout_s):
            raise TimeoutError("the worker's loop did not turn to stop the profile")
        return self._prof


def _write_profile(prof: Any, path: Path, cuda: bool) -> None:
    avg = prof.key_averages()
    parts = ["by self CPU time:\n" + avg.table(sort_by="self_cpu_time_total", row_limit=40)]
    if cuda:
        parts.append("by device time:\n" + avg.table(sort_by="self_cuda_time_total", row_limit=40))
    path.write_text("\n\n".join(parts))
    prof.export_chrome_trace(str(path.with_suffix(".json")))


if __name__ == "__main__":
    main()
