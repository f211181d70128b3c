"""Two-sided transport between one prefill worker and one decode worker (the cross-node backends).

A channel is one side of one pair. It has its own communicator (a 2-rank process group made from
the decode worker's store: prefill is rank 0, decode rank 1), so a pair can be re-opened alone after
a failure; `epoch` counts the re-openings and names the store prefix both sides meet under. Every
call blocks and is made only from that pair's transfer thread, never from a worker's step loop.
Sends and receives match in posting order (NCCL's rule; gloo matches by tag, and the same order
keeps both honest). The fake has NCCL's semantics: a send blocks until the peer has posted its
receive.
"""
from __future__ import annotations

import datetime
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from typing import Any

import torch


class TransferError(RuntimeError):
    pass


class PairChannel(ABC):
    epoch: int = -1  # -1: not open

    @abstractmethod
    def open(self, epoch: int, timeout_s: float) -> None:
        """(Re)create the pair's communicator for `epoch`; blocks until the peer joins the same epoch."""

    @abstractmethod
    def send(self, tensor: torch.Tensor, timeout_s: float) -> None:
        """Prefill side: returns when the data has left (device work finished), else TransferError."""

    @abstractmethod
    def recv(self, tensor: torch.Tensor, timeout_s: float) -> None:
        """Decode side: fills `tensor` or raises TransferError."""

    def close(self) -> None:
        pass


# -- torch.distributed: one gloo or NCCL group per pair --------------------------------------------
class TorchPairChannel(PairChannel):
    def __init__(self, backend: str, store: Any, pair: str, rank: int) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"transport backend {backend!r} is not gloo or nccl")
        self.backend, self.store, self.pair, self.rank = backend, store, pair, rank
        self._pg: Any = None

    def open(self, epoch: int, timeout_s: float) -> None:
        import torch.distributed as dist

        self.close()
        store = dist.PrefixStore(f"{self.pair}/{epoch}", self.store)
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            if self.backend == "gloo":
                self._pg = dist.ProcessGroupGloo(store, self.rank, 2, timeout)
            else:
                if not dist.is_nccl_available():
                    raise TransferError("NCCL is not available in this torch build")
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timeout
                self._pg = dist.ProcessGroupNCCL(store, self.rank, 2, opts)
            # make the communicator now, not on a request's first transfer (NCCL creates it lazily
            # and blocks the first p2p call until the peer's matching call)
            probe = torch.zeros(1, device="cuda" if self.backend == "nccl" else "cpu")
            if self.rank == 0:
                self.send(probe, timeout_s)
            else:
                self.recv(probe, timeout_s)
        except TransferError:
            raise
        except Exception as e:  # noqa: BLE001 — c10d raises DistBackendError, RuntimeError, ...
            raise TransferError(f"opening pair {self.pair} epoch {epoch}: {type(e).__name__}: {e}") from e
        self.epoch = epoch

    def send(self, tensor: torch.Tensor, timeout_s: float) -> None:
        self._finish(lambda: self._pg.send([tensor], 1 - self.rank, 0), timeout_s, "send")

    def recv(self, tensor: torch.Tensor, timeout_s: float) -> None:
        self._finish(lambda: self._pg.recv([tensor], 1 - self.rank, 0), timeout_s, "receive")

    def _finish(self, post: Any, timeout_s: float, what: str) -> None:
        if self._pg is None:
            raise TransferError(f"pair {self.pair} is not open")
        try:
            work = post()
            if self.backend == "gloo":
                work.wait(datetime.timedelta(seconds=timeout_s))
                return
            # NCCL: wait() only orders the current stream; completion is an event on it
            work.wait()
            done = torch.cuda.Event()
            done.record()
            end = time.monotonic() + timeout_s
            while not done.query():
                if time.monotonic() > end:
                    raise TransferError(f"{what} on pair {self.pair} did not finish within {timeout_s:g}s")
                time.sleep(50e-6)
        except TransferError:
            raise
        except Exception as e:  # noqa: BLE001
            raise TransferError(f"{what} on pair {self.pair} failed: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        pg, self._pg, self.epoch = self._pg, None, -1
        if pg is not None and hasattr(pg, "abort"):
            try:
                pg.abort()
            except Exception:  # noqa: BLE001 — best effort on a broken communicator
                pass


# -- fake: in-process, NCCL's semantics ------------------------------------------------------------
class _Posted:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.done, self.error = tensor, threading.Event(), ""


class FakeHub:
    """The in-process 'network': per (pair, epoch), the receives posted and not yet matched."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.posted: dict[tuple[str, int], deque[_Posted]] = {}
        self.bytes_moved = 0

    def channel(self, pair: str, rank: int) -> "FakeChannel":
        return FakeChannel(self, pair, rank)


class FakeChannel(PairChannel):
    def __init__(self, hub: FakeHub, pair: str, rank: int) -> None:
        self.hub, self.pair, self.rank = hub, pair, rank

    def open(self, epoch: int, timeout_s: float) -> None:
        self.close()
        with self.hub.cv:
            self.hub.posted.setdefault((self.pair, epoch), deque())
        self.epoch = epoch

    def close(self) -> None:
        """Like aborting a communicator: receives still posted on this epoch fail at once."""
        with self.hub.cv:
            for p in self.hub.posted.pop((self.pair, self.epoch), deque()) if self.rank == 1 else ():
                p.error = f"pair {self.pair} closed"
                p.done.set()
            self.hub.cv.notify_all()
        self.epoch = -1

    def recv(self, tensor: torch.Tensor, timeout_s: float) -> None:
        p = _Posted(tensor)
        with self.hub.cv:
            self.hub.posted.setdefault((self.pair, self.epoch), deque()).append(p)
            self.hub.cv.notify_all()
        if not p.done.wait(timeout_s):
            with self.hub.cv:
                q = self.hub.posted.get((self.pair, self.epoch))
                if q is not None and p in q:
                    q.remove(p)
            if not p.done.is_set():
                raise TransferError(f"receive on pair {self.pair} timed out after {timeout_s:g}s")
        if p.error:
            raise TransferError(p.error)

    def send(self, tensor: torch.Tensor, timeout_s: float) -> None:
        key = (self.pair, self.epoch)
        with self.hub.cv:  # like NCCL: nothing moves until the peer has posted the matching receive
            if not self.hub.cv.wait_for(lambda: bool(self.hub.posted.get(key)), timeout_s):
                raise TransferError(f"send on pair {self.pair} timed out: the peer never posted its receive")
            p = self.hub.posted[key].popleft()
        if p.tensor.shape != tensor.shape:
            p.error = f"shape mismatch: sent {tuple(tensor.shape)}, expected {tuple(p.tensor.shape)}"
            p.done.set()
            raise TransferError(p.error)
        p.tensor.copy_(tensor)
        with self.hub.cv:
            self.hub.bytes_moved += tensor.numel() * tensor.element_size()
        p.done.set()
