"""A decode worker's KV cache that prefill workers on its node can write into directly.

- CPU: the cache lives in an anonymous memory file (memfd) mapped shared (`torch.from_file`); a
  peer on the node maps the same file through /proc/<owner pid>/fd/<fd>. It goes away with the
  owner process (nothing is left in /dev/shm, whatever way the worker ends). Both mappings are
  populated when made (`populate`): a page first written by a copy costs a fault (its allocation
  and zeroing, then its mapping in each process), which made a 46 MB write take ~150 ms instead of
  ~10 (`bench/handoff.py`, 2026-11-24); populating costs ~0.55 s per GiB in the owner (what
  torch.zeros costs) and ~0.2 s per GiB in each peer, once.
- CUDA: the cache is an ordinary CUDA tensor; its CUDA IPC handle (torch's tensor sharing, the same
  as `torch.multiprocessing` uses) is exported once and opened once by each peer, on the same GPU
  or a peer GPU of the node.
Either way the handle is exported once at start-up and every write afterwards is a device copy into
block ids: no staging buffer on the decode side, no scatter, no collective.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)
_KEEP: list[int] = []  # memfds of this process's shared caches: open for the life of the process
MADV_POPULATE_WRITE = 23  # <sys/mman.h>, Linux 5.14


@dataclass(frozen=True)
class SharedCache:
    """Picklable handle of a shared cache tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    path: str | None = None  # cpu: /proc/<pid>/fd/<memfd> of the owner
    cuda_ipc: tuple[Any, ...] | None = None  # cuda: (rebuild function, its args) from reduce_tensor


def allocate(shape: tuple[int, ...], dtype: torch.dtype, device: str, tag: str) -> tuple[torch.Tensor, SharedCache | None]:
    """A zeroed cache tensor, shared when possible; (tensor, None) when it cannot be shared here. An
    FP8 cache (kv_cache.dtype fp8) is shared as bytes — the handle's dtype uint8, what peers copy
    blocks of (ModelRunner.kv_bytes) — and returned viewed as FP8, what the kernels read."""
    if dtype == torch.float8_e4m3fn:
        t, handle = allocate(shape, torch.uint8, device, tag)
        return t.view(dtype), handle
    numel = 1
    for n in shape:
        numel *= n
    if device == "cuda":
        t = torch.zeros(shape, dtype=dtype, device=device)
        from torch.multiprocessing.reductions import reduce_tensor

        return t, SharedCache(tuple(shape), dtype, device, cuda_ipc=reduce_tensor(t))
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    try:
        fd = os.memfd_create(f"pdserve-kv-{tag}")
        os.ftruncate(fd, nbytes)  # reads as zeros
        path = f"/proc/{os.getpid()}/fd/{fd}"
        flat = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    except (OSError, RuntimeError, AttributeError) as e:
        log.warning("cannot share the KV cache (%s): direct writes are off for this worker", e)
        return torch.zeros(shape, dtype=dtype), None
    _KEEP.append(fd)
    populate(flat)
    return flat.view(shape), SharedCache(tuple(shape), dtype, device, path=path)


def populate(t: torch.Tensor) -> bool:
    """Fault in every page of a CPU tensor's memory, writable, without changing it
    (madvise(MADV_POPULATE_WRITE), Linux 5.14+); False where that is not offered (then the pages
    fault in as they are first touched)."""
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        start = t.data_ptr() // page * page
        length = t.data_ptr() + t.numel() * t.element_size() - start
        return int(libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), MADV_POPULATE_WRITE)) == 0
    except (OSError, AttributeError, ValueError) as e:
        log.debug("cannot populate the shared KV cache: %s", e)
        return False


def open_cache(handle: SharedCache) -> torch.Tensor:
    """The peer's view of a shared cache: writes to it land in the owner's tensor."""
    if handle.cuda_ipc is not None:
        rebuild, args = handle.cuda_ipc
        return rebuild(*args)
    assert handle.path is not None
    numel = 1
    for n in handle.shape:
        numel *= n
    flat = torch.from_file(handle.path, shared=True, size=numel, dtype=handle.dtype)
    populate(flat)
    return flat.view(handle.shape)


def copy_blocks(dst: torch.Tensor, dst_blocks: list[int], src: torch.Tensor, src_blocks: list[int]) -> None:
    """dst[:, :, dst_blocks[i]] = src[:, :, src_blocks[i]] for every i, as few copies as the runs allow.

    Both caches are [L, 2, num_blocks, block_size, kv_heads, head_dim]; a run of consecutive block ids
    on both sides is one strided copy (the allocators hand out low ids first, so runs are common)."""
    i, n = 0, len(dst_blocks)
    while i < n:
        j = i + 1
        while j < n and dst_blocks[j] == dst_blocks[j - 1] + 1 and src_blocks[j] == src_blocks[j - 1] + 1:
            j += 1
        d0, s0 = dst_blocks[i], src_blocks[i]
        dst[:, :, d0 : d0 + (j - i)].copy_(src[:, :, s0 : s0 + (j - i)], non_blocking=dst.is_cuda)
        i = j
