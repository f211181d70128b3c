"""What a decode worker's loop costs the host per step, piece by piece, at B plain greedy rows: the
scheduler's batch, the decode rows (SeqInputs), sample()'s arguments, the sampled tokens taken as
each row's run, and the scheduler's bookkeeping of them (no forward, no sampling: the host work a
GPU step waits on unless a step is in flight; engine/step_loop.py).

    python bench/host_parts.py --batch 64 --output bench/results/host_parts.json

Best of 5 repeats of N calls each, in µs per call (per step), on this machine's CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode_worker.aggregated import AggregatedWorker  # noqa: E402
from decode_worker.config import AggregatedConfig  # noqa: E402
from engine.config import KVCacheConfig, ModelConfig  # noqa: E402
from engine.step_loop import Step  # noqa: E402
from engine.types import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    w = AggregatedWorker("h", ModelConfig(path="tiny"), KVCacheConfig(num_blocks=64 * a.batch),
                         AggregatedConfig(max_batch_size=a.batch))
    s, sp = w.scheduler, SamplingParams(max_tokens=1800, ignore_eos=True)
    for i in range(a.batch):  # each running, as after its prefill
        assert w.reserve(f"r{i}", 64, sp, (2,), list(range(3, 67))).ok
        assert s.start_prefill(f"r{i}") is not None and s.on_prefilled(f"r{i}", 5) is not None
    batch = s.schedule()
    step = Step(batch, [], w._decode_rows(batch)[0], [], [])
    tokens = [7] * a.batch

    def us(f, n: int = 2000) -> float:  # type: ignore[no-untyped-def]
        return round(min(timeit.repeat(f, number=n, repeat=5)) / n * 1e6, 1)

    out = {"schedule": us(s.schedule), "decode_rows": us(lambda: w._decode_rows(batch)),
           "decode_sampling": us(lambda: w._decode_sampling(batch)),
           "accepted": us(lambda: w._accepted(step, tokens, [None] * a.batch)),
           "on_runs": us(lambda: s.on_runs(batch, [[7]] * a.batch, None), n=200)}  # (each call adds a token a row)
    print(json.dumps({"batch": a.batch, "us_per_step": out}))
    if a.output:
        Path(a.output).write_text(json.dumps({"batch": a.batch, "us_per_step": out}, indent=2))


if __name__ == "__main__":
    main()
