"""What carrying a decode worker's events to the router costs, per step: a Ray actor call (the
router's long poll) against the worker's event stream (engine/event_stream.py).

    python bench/ray_poll.py [--events 64] [--steps 2000] [--output bench/results/ray_poll.json]

A stand-in worker (a Ray actor, no model) has `--events` events ready at every step. Ray: the router
awaits `poll.remote()` `--steps` times. Stream: the worker's sender thread writes `--steps` frames of
the same events and the router reads and decodes them. Reported: CPU per step of each process's
threads (the router's event loop is `python`; the worker's step loop would share its GIL with the
thread that serves the call, `ray::…`, or the stream's sender, `event-stream`), and wall time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from engine.event_stream import ACK, ACK_EVERY, HEADER, EventBatch, EventOutbox, decode  # noqa: E402
from engine.types import DecodeEvent  # noqa: E402


def _thread_cpu() -> dict[str, float]:
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for t in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{t}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        f = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(f[11]) + int(f[12])) / tick
    return out


class _Budgeted(EventOutbox):
    """An outbox whose next `budget` frames are the same `events`; then only heartbeats."""

    def __init__(self, events: list[DecodeEvent]) -> None:
        super().__init__()
        self.events, self.budget = events, 0

    def take(self, timeout_s: float) -> tuple[int, list[DecodeEvent]]:
        with self._cv:
            if self.budget <= 0:
                self._cv.wait(timeout_s)
                return self._seq, []
            self.budget -= 1
            self._pending = list(self.events)
            return self._frame_pending()


@ray.remote(num_cpus=0, max_concurrency=4)
class StandIn:
    """Every poll (or stream frame) has the same `n` events; `budget` frames, then the stream idles."""

    def __init__(self, n: int) -> None:
        self.events = [DecodeEvent(f"req-{i:04d}-0123456789ab", [1234 + i]) for i in range(n)]
        self.outbox = _Budgeted(self.events)
        self.cv = self.outbox._cv

    def poll(self, timeout_s: float, log: str = "", acked: int = 0) -> EventBatch:
        return EventBatch(self.outbox.log, acked + 1, list(self.events))

    def open_event_stream(self) -> tuple[str, int, str, str]:
        return self.outbox.open_stream()

    def send(self, frames: int) -> None:
        with self.cv:
            self.outbox.budget = frames
            self.cv.notify_all()

    def cpu(self) -> dict[str, float]:
        return _thread_cpu()


def _per_step(a: dict[str, float], b: dict[str, float], steps: int) -> dict[str, float]:
    return {k: round((b[k] - a.get(k, 0.0)) / steps * 1e6, 1) for k in b if b[k] - a.get(k, 0.0) > 0}


async def _ray_polls(w: Any, steps: int) -> tuple[float, int]:
    t0, n, log, acked = time.perf_counter(), 0, "", 0
    for _ in range(steps):
        batch = await asyncio.wait_for(w.poll.remote(0.25, log, acked), timeout=30)
        log, acked = batch.log, batch.seq
        n += len(batch.events)
    return time.perf_counter() - t0, n


async def _stream_frames(w: Any, steps: int) -> tuple[float, int]:
    host, port, secret, log = await w.open_event_stream.remote()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"{secret} {log} 0\n".encode())
    await asyncio.sleep(0.3)  # connected and idle
    t0, n = time.perf_counter(), 0
    await w.send.remote(steps)
    got = 0
    acked = 0
    while got < steps:
        size, seq = HEADER.unpack(await reader.readexactly(HEADER.size))
        events = decode(await reader.readexactly(size))
        if events:
            got += 1
            n += len(events)
        if seq - acked >= ACK_EVERY or not events:  # as the router acknowledges
            writer.write(ACK.pack(seq))
            acked = seq
    writer.close()
    return time.perf_counter() - t0, n


async def measure(n_events: int, steps: int) -> dict[str, Any]:
    w = StandIn.remote(n_events)
    await w.poll.remote(0)
    out: dict[str, Any] = {"events_per_step": n_events, "steps": steps}
    for name, run in (("ray_poll", _ray_polls), ("event_stream", _stream_frames)):
        a, wa = _thread_cpu(), await w.cpu.remote()
        wall, n = await run(w, steps)
        b, wb = _thread_cpu(), await w.cpu.remote()
        assert n == n_events * steps, (name, n)
        out[name] = {"wall_us_per_step": round(wall / steps * 1e6, 1),
                     "router_cpu_us_per_step": _per_step(a, b, steps),
                     "worker_cpu_us_per_step": _per_step(wa, wb, steps)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=64, help="events per step (the decode batch)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--output", default="")
    a = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        r = asyncio.run(measure(a.events, a.steps))
    finally:
        ray.shutdown()
    r["machine"] = f"{os.cpu_count()} cpus"
    print(json.dumps(r, indent=1))
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
