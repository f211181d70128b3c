"""Posts KV receives in the order each prefill worker sent them, and reports which landed.

The order matters: NCCL matches point-to-point calls by posting order, so a receive for transfer
`seq` from `src` is posted only after `seq - 1` from the same source. Transfers of requests that were
cancelled meanwhile are still received (into a scratch buffer) and dropped, which keeps every pair
of workers in step.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.transport import KVTransport, Transfer, TransferState
from engine.types import KVArrival


@dataclass
class Landed:
    arrival: KVArrival
    transfer: Transfer


class KVReceiver:
    def __init__(
        self,
        transport: KVTransport,
        kv_shape: Callable[[int], tuple[int, ...]],
        dtype: torch.dtype,
        device: str,
        timeout_s: float,
    ) -> None:
        self.transport = transport
        self.kv_shape, self.dtype, self.device, self.timeout_s = kv_shape, dtype, device, timeout_s
        self._next_seq: dict[int, int] = {}  # src rank → next seq to post
        self._queued: dict[tuple[int, int], KVArrival] = {}  # (src, seq) → announced, not yet posted
        self._posted: list[Landed] = []

    def announce(self, arrival: KVArrival) -> None:
        self._queued[(arrival.src_rank, arrival.seq)] = arrival

    def pending(self) -> int:
        return len(self._queued) + len(self._posted)

    def poll(self) -> tuple[list[Landed], list[Landed]]:
        """Post what is in order, then return (done, failed) transfers."""
        for (src, seq) in sorted(self._queued):
            if seq == self._next_seq.get(src, 0):
                a = self._queued.pop((src, seq))
                t = self.transport.recv(src, seq, self.kv_shape(a.num_tokens), self.dtype, self.device)
                self._posted.append(Landed(a, t))
                self._next_seq[src] = seq + 1
        done, failed, still = [], [], []
        for landed in self._posted:
            state = landed.transfer.poll()
            if state is TransferState.PENDING and landed.transfer.age > self.timeout_s:
                landed.transfer.fail(f"KV transfer from rank {landed.arrival.src_rank} timed out")
                state = TransferState.FAILED
            if state is TransferState.DONE:
                done.append(landed)
            elif state is TransferState.FAILED:
                failed.append(landed)
            else:
                still.append(landed)
        self._posted = still
        return done, failed
