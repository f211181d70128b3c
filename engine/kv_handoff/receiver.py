"""The decode side of the hand-off: per-request write state, and one receive thread per two-sided pair.

Public methods are thread-safe; `poll()` is called by the decode loop, the one thread that touches
the KV cache's contents on this worker (it copies two-sided payloads into their blocks).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.kv_handoff.channel import PairChannel, TransferError
from engine.kv_handoff.types import Backend, HandoffStatus, WriteGrant, WriteIntent, WriteOutcome

log = logging.getLogger(__name__)


@dataclass
class Handoff:
    """One request's write into this worker's blocks."""

    intent: WriteIntent
    block_ids: tuple[int, ...]
    status: HandoffStatus = HandoffStatus.WRITING
    granted: float = field(default_factory=time.monotonic)
    error: str | None = None
    nbytes: int = 0
    payload: torch.Tensor | None = None  # two-sided: [L, 2, nb, bs, KVH, D] received, not yet placed

    @property
    def request_id(self) -> str:
        return self.intent.request_id


class _PairRecv:
    """Decode side of one two-sided pair: its channel and the thread that posts receives in order."""

    def __init__(self, rx: "HandoffReceiver", src: str, channel: PairChannel) -> None:
        self.rx, self.src, self.channel = rx, src, channel
        self.epoch = channel.epoch  # the generation grants name; the channel follows it on this thread
        self.broken = channel.epoch < 0
        self.work: queue.Queue[tuple[str, int, Handoff | None] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=f"handoff-{src}>{rx.worker_id}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.work.get()) is not None:
            kind, epoch, h = item
            try:
                if kind == "open":
                    self.channel.open(epoch, self.rx.timeout_s)
                    continue
                assert h is not None
                buf = torch.empty(self.rx.payload_shape(len(h.block_ids)), dtype=self.rx.cache.dtype,
                                  device=self.rx.cache.device)
                left = self.rx.timeout_s - (time.monotonic() - h.granted)
                if self.channel.epoch != epoch:
                    raise TransferError(f"pair {self.src} is not open at epoch {epoch}")
                self.channel.recv(buf, max(0.0, left))
                self.rx.received(h, buf)
            except (TransferError, RuntimeError) as e:
                self.broken = True  # the next grant on this pair re-opens it under a new epoch
                if h is not None:
                    self.rx.end(WriteOutcome(h.request_id, self.src, False, str(e)))
                else:
                    log.error("re-opening pair %s>%s failed: %s", self.src, self.rx.worker_id, e)


class HandoffReceiver:
    def __init__(
        self, worker_id: str, cache: torch.Tensor, block_size: int, timeout_s: float,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        """on_change: a write landed or failed (called from the thread that saw it, no lock held):
        the decode loop should poll() now, not at the end of its idle sleep."""
        self.worker_id, self.cache, self.block_size, self.timeout_s = worker_id, cache, block_size, timeout_s
        self.on_change = on_change
        self.peers: dict[str, Backend] = {}
        self._pairs: dict[str, _PairRecv] = {}
        self._writes: dict[str, Handoff] = {}  # request id → its write, WRITING until poll() reports it
        self._lock = threading.Lock()
        self.bytes_received = 0
        self.bytes_placed = 0  # of those, copied into the cache by this worker (two-sided); ipc: 0
        self.writes_failed = 0

    def payload_shape(self, num_blocks: int) -> tuple[int, ...]:
        L, two, _, bs, kvh, d = self.cache.shape
        return (L, two, num_blocks, bs, kvh, d)

    def add_peer(self, src: str, backend: Backend, channel: PairChannel | None = None) -> None:
        """Accept writes from prefill worker `src`; a two-sided pair brings its channel (open, or
        opening on another thread: it is used only after the next grant)."""
        with self._lock:
            old = self._pairs.pop(src, None)
            if src in self.peers:  # a new link from the same worker: its old process writes no more
                for h in self._writes.values():
                    if h.intent.src_worker == src and h.status is HandoffStatus.WRITING:
                        h.status, h.error = HandoffStatus.FAILED, f"prefill worker {src} was re-connected"
            self.peers[src] = backend
            if backend is not Backend.IPC:
                assert channel is not None, f"backend {backend.value} needs a channel"
                self._pairs[src] = _PairRecv(self, src, channel)
        if old is not None:
            old.work.put(None)
            old.channel.close()

    # -- steps 3 and 5, called by the prefill worker ------------------------------------------------
    def begin(self, intent: WriteIntent, block_ids: tuple[int, ...], shared_blocks: int = 0) -> WriteGrant:
        """Grant the write of the prompt's blocks after the first `shared_blocks` of `block_ids`
        (those hold its prefix here already): the request is WRITING from here until it lands,
        fails or times out."""
        with self._lock:
            backend = self.peers.get(intent.src_worker)
            if backend is None:
                return WriteGrant(False, f"prefill worker {intent.src_worker} is not connected to {self.worker_id}")
            if backend is not intent.backend:
                return WriteGrant(False, f"pair {intent.src_worker}>{self.worker_id} uses {backend.value}, "
                                         f"not {intent.backend.value}")
            nb = -(-intent.num_tokens // self.block_size)
            if nb > len(block_ids):
                return WriteGrant(False, f"{intent.num_tokens} tokens do not fit the {len(block_ids)} blocks reserved")
            if intent.first_block != shared_blocks:  # a shared block is never written
                return WriteGrant(False, f"the write starts at block {intent.first_block}, but the first "
                                         f"{shared_blocks} blocks reserved hold the prefix already")
            h = Handoff(intent, block_ids[shared_blocks:nb])
            self._writes[intent.request_id] = h
            pair = self._pairs.get(intent.src_worker)
            if pair is None:
                return WriteGrant(True)
            if pair.broken or intent.epoch != pair.epoch:  # both sides re-open under a new epoch first
                pair.epoch = max(pair.epoch, intent.epoch) + 1
                pair.broken = False
                pair.work.put(("open", pair.epoch, None))
            pair.work.put(("recv", pair.epoch, h))  # posted now: the sender may send as soon as it hears back
            return WriteGrant(True, epoch=pair.epoch)

    def end(self, outcome: WriteOutcome) -> None:
        """A direct write finished, or any write failed (two-sided successes arrive through recv)."""
        with self._lock:
            h = self._writes.get(outcome.request_id)
            if h is None or h.status is not HandoffStatus.WRITING or h.intent.src_worker != outcome.src_worker:
                return
            if outcome.ok:
                h.status, h.nbytes = HandoffStatus.LANDED, outcome.nbytes
                pair = None
            else:
                h.status, h.error = HandoffStatus.FAILED, outcome.error or "write failed"
                pair = self._pairs.get(outcome.src_worker)
        if pair is not None and not pair.broken:
            pair.broken = True
            pair.channel.close()  # aborts a receive still posted for it; the next grant re-opens
        self.on_change()

    def received(self, h: Handoff, payload: torch.Tensor) -> None:
        with self._lock:
            if h.status is not HandoffStatus.WRITING:
                return
            h.payload = payload
            h.nbytes = payload.numel() * payload.element_size()
            h.status = HandoffStatus.LANDED
        self.on_change()

    # -- the decode loop ---------------------------------------------------------------------------
    def poll(self) -> tuple[list[Handoff], list[Handoff]]:
        """(landed, failed) since the last call; two-sided payloads are placed in their blocks here."""
        now = time.monotonic()
        landed, failed, stuck = [], [], []
        with self._lock:
            for rid, h in list(self._writes.items()):
                if h.status is HandoffStatus.WRITING and now - h.granted > self.timeout_s:
                    h.status, h.error = HandoffStatus.FAILED, f"KV write did not land within {self.timeout_s:g}s"
                    pair = self._pairs.get(h.intent.src_worker)
                    if pair is not None and not pair.broken:
                        pair.broken = True
                        stuck.append(pair)
                if h.status is HandoffStatus.LANDED:
                    landed.append(self._writes.pop(rid))
                elif h.status is HandoffStatus.FAILED:
                    failed.append(self._writes.pop(rid))
        for pair in stuck:
            pair.channel.close()
        for h in landed:
            if h.payload is not None:
                idx = torch.tensor(h.block_ids, dtype=torch.long, device=self.cache.device)
                self.cache.index_copy_(2, idx, h.payload)  # [L, 2, nb, bs, KVH, D] into its blocks
                self.bytes_placed += h.nbytes
                h.payload = None
            self.bytes_received += h.nbytes
        self.writes_failed += len(failed)
        return landed, failed

    @property
    def pending(self) -> int:
        """Writes granted and not yet reported by poll()."""
        return len(self._writes)

    def has_news(self) -> bool:
        """Whether poll() has something to report: a write landed, failed or is past its timeout.
        (A write still being written needs nothing of the decode loop until then.)"""
        now = time.monotonic()
        with self._lock:
            return any(h.status is not HandoffStatus.WRITING or now - h.granted > self.timeout_s
                       for h in self._writes.values())

    def close(self) -> None:
        for pair in self._pairs.values():
            pair.work.put(None)
            pair.channel.close()
