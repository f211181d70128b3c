"""Test-only: run pdserve's NCCL hand-off between two workers on ONE GPU.

NCCL refuses two ranks on one GPU ("Duplicate GPU detected", a hard rule since NCCL 2.5). Given its
own NCCL_HOSTID, each worker process looks like another host to NCCL, which then connects the pair
over sockets (loopback). That runs the NCCL code path on a one-GPU machine — the tests in
tests/gpu and `bench/handoff.py --backends nccl` use it — but it is not a production setting, and a
figure taken through it is socket bandwidth, not NVLink or InfiniBand.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


def _own_nccl_host(worker: Any) -> int:  # runs inside each worker actor
    os.environ["NCCL_HOSTID"] = f"test-{os.getpid()}"
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return os.getpid()


@contextlib.contextmanager
def own_nccl_hosts() -> Iterator[None]:
    """Clusters started inside this block give every worker its own NCCL host id before any pair
    opens its communicator."""
    import ray

    from cluster import launcher

    real_wire = launcher.Cluster._wire

    def wire(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        ray.get([w.__ray_call__.remote(_own_nccl_host) for w in self.prefills + self.decodes])
        return real_wire(self, *args, **kwargs)

    launcher.Cluster._wire = wire  # type: ignore[method-assign]
    try:
        yield
    finally:
        launcher.Cluster._wire = real_wire  # type: ignore[method-assign]
