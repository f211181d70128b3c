"""KV transport: one small interface, three backends chosen by config.

- `FakeTransport`: in-process mailboxes (tests; no processes, no sockets).
- `TorchDistTransport`: torch.distributed point-to-point — gloo for CPU tensors, NCCL for CUDA
  tensors, the same code. Measured here as the lowest-latency way between two Ray actors.

Every transfer is named by (src rank, dst rank, seq). The sender numbers its transfers per
destination 0, 1, 2, ...; the receiver posts receives per source in that same order. gloo would match
by tag alone, but NCCL matches point-to-point calls in posting order, so the order is the contract.
A transfer is polled, never waited on without a deadline.
"""
from __future__ import annotations

import datetime
import enum
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

import torch

from engine.config import TransportConfig


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class Transfer:
    """Handle of one send or receive; `tensor` is the payload (the receive buffer once DONE)."""

    def __init__(self, tensor: torch.Tensor, work: Any = None) -> None:
        self.tensor = tensor
        self.started = time.monotonic()
        self.error: str | None = None
        self._work = work
        self._state = TransferState.PENDING if work is not None else TransferState.DONE

    @property
    def age(self) -> float:
        return time.monotonic() - self.started

    def poll(self) -> TransferState:
        if self._state is TransferState.PENDING and self._work is not None:
            self._state = self._work.poll(self)
        return self._state

    def fail(self, error: str) -> None:
        self.error = error
        self._state = TransferState.FAILED


class KVTransport(ABC):
    rank: int
    world_size: int

    @abstractmethod
    def send(self, dst: int, seq: int, tensor: torch.Tensor) -> Transfer: ...

    @abstractmethod
    def recv(self, src: int, seq: int, shape: tuple[int, ...], dtype: torch.dtype, device: str) -> Transfer: ...

    def close(self) -> None:
        pass


# -- fake ---------------------------------------------------------------------------------------
class FakeHub:
    """Shared mailboxes of an in-process 'world'."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.boxes: dict[tuple[int, int, int], torch.Tensor] = {}
        self.bytes_moved = 0


class _FakeRecv:
    def __init__(self, hub: FakeHub, key: tuple[int, int, int]) -> None:
        self.hub, self.key = hub, key

    def poll(self, t: Transfer) -> TransferState:
        with self.hub.lock:
            data = self.hub.boxes.pop(self.key, None)
        if data is None:
            return TransferState.PENDING
        if data.shape != t.tensor.shape:
            t.error = f"shape mismatch: sent {tuple(data.shape)}, expected {tuple(t.tensor.shape)}"
            return TransferState.FAILED
        t.tensor.copy_(data)
        return TransferState.DONE


class FakeTransport(KVTransport):
    def __init__(self, hub: FakeHub, rank: int, world_size: int) -> None:
        self.hub, self.rank, self.world_size = hub, rank, world_size

    def send(self, dst: int, seq: int, tensor: torch.Tensor) -> Transfer:
        with self.hub.lock:
            self.hub.boxes[(self.rank, dst, seq)] = tensor.clone()
            self.hub.bytes_moved += tensor.numel() * tensor.element_size()
        return Transfer(tensor)

    def recv(self, src: int, seq: int, shape: tuple[int, ...], dtype: torch.dtype, device: str) -> Transfer:
        buf = torch.empty(shape, dtype=dtype, device=device)
        return Transfer(buf, _FakeRecv(self.hub, (src, self.rank, seq)))


# -- torch.distributed (gloo | nccl) -------------------------------------------------------------
class _DistWork:
    """Completion of a torch.distributed p2p op, seen without blocking the caller.

    gloo's send/recv Work never reports `is_completed()` before `wait()` and has no future, so a
    daemon thread waits (bounded by the process group's timeout) and records the outcome.
    """

    def __init__(self, work: Any) -> None:
        self._state = TransferState.PENDING
        self._error: str | None = None
        threading.Thread(target=self._wait, args=(work,), daemon=True).start()

    def _wait(self, work: Any) -> None:
        try:
            work.wait()
            self._state = TransferState.DONE
        except Exception as e:  # noqa: BLE001 — a failed collective reports any error type
            self._error = f"{type(e).__name__}: {e}"
            self._state = TransferState.FAILED

    def poll(self, t: Transfer) -> TransferState:
        if self._state is TransferState.FAILED:
            t.error = self._error
        return self._state


class TorchDistTransport(KVTransport):
    """torch.distributed world of all prefill and decode workers (ranks given by the launcher)."""

    def __init__(
        self, backend: str, rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float
    ) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.backend, self.rank, self.world_size = backend, rank, world_size
        if backend == "nccl" and not dist.is_nccl_available():
            raise RuntimeError("transport.backend: nccl is not available in this torch build (use gloo on CPU)")
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )

    def send(self, dst: int, seq: int, tensor: torch.Tensor) -> Transfer:
        return Transfer(tensor, _DistWork(self._dist.isend(tensor, dst, tag=seq)))

    def recv(self, src: int, seq: int, shape: tuple[int, ...], dtype: torch.dtype, device: str) -> Transfer:
        buf = torch.empty(shape, dtype=dtype, device=device)
        return Transfer(buf, _DistWork(self._dist.irecv(buf, src, tag=seq)))

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def make_transport(
    cfg: TransportConfig, device: str, rank: int, world_size: int, master_addr: str, master_port: int
) -> KVTransport:
    """The torch.distributed world member for this worker: NCCL for CUDA tensors, gloo for CPU ones."""
    backend = cfg.resolve(device)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"transport.backend: {backend!r} is not one of gloo, nccl")
    return TorchDistTransport(backend, rank, world_size, master_addr, master_port, cfg.timeout_s)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])
