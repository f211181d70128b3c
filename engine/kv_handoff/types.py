"""The hand-off's messages and states. Plain frozen dataclasses: they cross Ray as pickles."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class HandoffStatus(str, enum.Enum):
    """One request's KV on its decode worker (the protocol's per-request state)."""

    RESERVED = "reserved"  # blocks held, nobody writes them yet
    WRITING = "writing"  # a prefill worker was granted the write; the blocks must not be freed
    LANDED = "landed"  # the prompt's KV is in the blocks
    FAILED = "failed"  # the write failed or timed out; the request ends with an error


class Backend(str, enum.Enum):
    IPC = "ipc"  # direct write into the decode worker's cache (CUDA IPC on GPU, shared memory on CPU)
    NCCL = "nccl"  # two-sided, per-pair NCCL communicator (CUDA tensors, across nodes)
    GLOO = "gloo"  # two-sided, per-pair gloo group (CPU tensors, across nodes)


def choose_backend(setting: str, device: str, same_place: bool, cache_shared: bool) -> Backend:
    """`transport.backend` for one prefill-decode pair. auto: a direct write when both are in one
    place (one node on CPU, one GPU on CUDA) and the decode cache is shared, else NCCL for CUDA and
    gloo for CPU."""
    if setting == "auto":
        if same_place and cache_shared:
            return Backend.IPC
        return Backend.NCCL if device == "cuda" else Backend.GLOO
    backend = Backend(setting)
    if backend is Backend.IPC and not same_place:
        raise ValueError("transport.backend: ipc needs each prefill worker on its decode workers' node "
                         "(on cuda: their GPU); use auto")
    if backend is Backend.IPC and not cache_shared:
        raise ValueError("transport.backend: ipc, but the decode worker could not share its KV cache")
    if backend is Backend.NCCL and device != "cuda":
        raise ValueError("transport.backend: nccl needs model.device: cuda")
    if backend is Backend.GLOO and device == "cuda":
        raise ValueError("transport.backend: gloo cannot move CUDA tensors (use auto, ipc or nccl)")
    return backend


@dataclass(frozen=True)
class KVDestination:
    """Step 1's answer: which decode worker reserved, and the blocks the prompt's KV must go to —
    except the first `shared_blocks`, which hold this prompt's prefix there already (cached KV of
    an earlier request, shared: never written) — `shared_tokens` of the prompt."""

    worker_id: str
    block_ids: tuple[int, ...]
    shared_blocks: int = 0
    shared_tokens: int = 0


@dataclass(frozen=True)
class ControlAddress:
    """Where a decode worker answers steps 3 and 5 over a socket (engine/kv_handoff/control.py)."""

    host: str
    port: int
    secret: str  # a connection's first frame must carry it


@dataclass(frozen=True)
class DecodeEndpoint:
    """Published once by each decode worker at start-up (and again after a restart)."""

    worker_id: str
    node: str
    host: str  # where its pair store listens (two-sided backends)
    store_port: int
    block_size: int
    cache: Any = None  # a SharedCache handle when its KV cache can be written directly, else None
    control: ControlAddress | None = None  # steps 3 and 5 over a socket; None: through Ray


@dataclass(frozen=True)
class WriteIntent:
    """Step 3, prefill → decode: may I write `request_id`'s KV now?"""

    request_id: str
    src_worker: str
    num_tokens: int
    first_token: int
    backend: Backend
    epoch: int = 0  # the pair channel's generation (two-sided backends); bumped after a failure
    sent_at: float = 0.0  # time.time() on the prefill worker
    first_block: int = 0  # the prompt's blocks from this one on are written (the destination's shared_blocks)


@dataclass(frozen=True)
class WriteGrant:
    ok: bool
    reason: str = ""
    epoch: int = 0  # two-sided: the channel generation to send on (a new one: re-open first)


@dataclass(frozen=True)
class WriteOutcome:
    """Step 5, prefill → decode: how the write ended (direct writes land with it; a failure of any
    backend is reported with it so the decode side need not wait for its timeout)."""

    request_id: str
    src_worker: str
    ok: bool
    error: str | None = None
    nbytes: int = 0
