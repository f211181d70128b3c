"""Drive a backend with a workload at a list of request rates; collect records per rate."""
from __future__ import annotations

import asyncio
import math
import random
import time

from tqdm import tqdm

from cluster.bench.backends import Backend, Record
from cluster.bench.workloads import RequestSpec


async def run_rate(
    backend: Backend, specs: list[RequestSpec], rate: float, max_concurrency: int | None, seed: int,
    max_duration_s: float, progress: bool = True,
) -> tuple[list[Record], float]:
    """Send `specs` with Poisson arrivals at `rate` req/s (inf: all at once), at most
    `max_concurrency` in flight; stop sending after `max_duration_s`. Returns records and duration."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(specs), desc=f"rate {rate:g}", disable=not progress, leave=False)

    async def one(spec: RequestSpec) -> Record:
        if sem is None:
            rec = await backend.send(spec)
        else:
            async with sem:
                rec = await backend.send(spec)
        bar.update(1)
        return rec

    t0 = time.perf_counter()
    tasks = []
    for spec in specs:
        if time.perf_counter() - t0 > max_duration_s:
            break
        tasks.append(asyncio.create_task(one(spec)))
        if math.isfinite(rate) and rate > 0:
            await asyncio.sleep(rng.expovariate(rate))
    records = list(await asyncio.gather(*tasks))
    bar.close()
    return records, time.perf_counter() - t0


async def warm_up(backend: Backend) -> None:
    """One short request outside the measured runs (its prompt is not in any workload)."""
    rec = await backend.send(RequestSpec("Warm-up request: say hello.", 8, 4))
    if rec.error:
        raise RuntimeError(f"warm-up request failed: {rec.error}")
