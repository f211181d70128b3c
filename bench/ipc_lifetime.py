"""Does a dead decode worker's KV cache keep its GPU memory while a prefill worker still maps it?

    python3 bench/ipc_lifetime.py --gib 4 --output $OUT/ipc-lifetime.json     # on a CUDA machine

A process allocates a cache the way a decode worker does (engine/kv_handoff/shared_cache.py:
allocate → CUDA IPC handle) and hands the handle to this process, which opens it as a prefill
worker does (open_cache). Then the owner is killed. The device's free memory (cudaMemGetInfo) is
read with the owner alive, after it died while this process still maps the cache, and after this
process let go of it. If the memory comes back only at the last reading, a restarted decode worker
that sizes its cache from free memory before the prefill workers have dropped their links sees
less than it should (README, limitations).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _owner(gib: float, conn: "mp.connection.Connection") -> None:  # type: ignore[name-defined]
    import torch

    from engine.kv_handoff import shared_cache

    n = int(gib * (1 << 30)) // 2
    _, handle = shared_cache.allocate((n,), torch.bfloat16, "cuda", "ipc-lifetime")
    conn.send(handle)
    time.sleep(3600)  # until killed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--output")
    args = ap.parse_args()
    import torch

    from engine.kv_handoff import shared_cache

    def free_gib() -> float:
        torch.cuda.synchronize()
        return round(torch.cuda.mem_get_info()[0] / (1 << 30), 3)

    torch.cuda.init()
    before = free_gib()
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    owner = ctx.Process(target=_owner, args=(args.gib, theirs), daemon=True)
    owner.start()
    view = shared_cache.open_cache(mine.recv())
    view[:16].fill_(1)  # mapped and writable
    alive = free_gib()
    os.kill(owner.pid, signal.SIGKILL)  # type: ignore[arg-type]
    owner.join(30)
    time.sleep(2)
    dead_but_mapped = free_gib()
    del view
    torch.cuda.ipc_collect()
    torch.cuda.empty_cache()
    time.sleep(2)
    released = free_gib()
    out = {"gib": args.gib, "free_gib_before": before, "free_gib_owner_alive": alive,
           "free_gib_owner_dead_still_mapped": dead_but_mapped, "free_gib_released": released,
           "memory_held_after_owner_death": dead_but_mapped < released - args.gib / 2}
    print(json.dumps(out))
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
