"""The prefill side of the hand-off: one transfer thread per decode worker it writes to.

The prefill step loop only submits a `WriteJob` and goes on; the link's thread runs the protocol's
steps 3-5 for it (see engine/kv_handoff/__init__.py), so no step ever waits on a peer.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.kv_handoff.channel import PairChannel, TransferError
from engine.kv_handoff.shared_cache import SharedCache, copy_blocks, open_cache
from engine.kv_handoff.types import Backend, KVDestination, WriteGrant, WriteIntent, WriteOutcome

log = logging.getLogger(__name__)


class DecodePeer(Protocol):
    """How a prefill worker calls a decode worker (control.py's SocketPeer, a Ray actor proxy, or the
    worker itself in tests). Each call returns the decode worker's answer or raises within `timeout_s`."""

    def begin_write(self, intent: WriteIntent, timeout_s: float) -> WriteGrant: ...

    def end_write(self, outcome: WriteOutcome, timeout_s: float) -> None: ...


@dataclass
class WriteJob:
    request_id: str
    dest: KVDestination
    num_tokens: int
    first_token: int
    src_blocks: list[int]  # the prefill's scratch blocks holding positions [0, num_tokens)
    on_granted: Callable[[WriteGrant], None]  # step 3 answered: the router gets its first token (or error)
    on_done: Callable[[], None]  # the source blocks may be freed
    _answered: bool = False
    _done: bool = False

    def grant(self, g: WriteGrant) -> None:
        """Answer step 3 once (a crash after the answer must not answer again)."""
        if not self._answered:
            self._answered = True
            self.on_granted(g)

    def done(self) -> None:
        if not self._done:
            self._done = True
            self.on_done()


class _Link:
    """This prefill worker → one decode worker."""

    def __init__(
        self, sender: "HandoffSender", dst: str, peer: DecodePeer, backend: Backend,
        cache: torch.Tensor | None, channel: PairChannel | None,
    ) -> None:
        self.sender, self.dst, self.peer, self.backend = sender, dst, peer, backend
        self.cache, self.channel = cache, channel  # [L, 2, NB, bs, KVH, D] of the decode worker (ipc)
        self.jobs: queue.Queue[WriteJob | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=f"handoff-{sender.worker_id}>{dst}", daemon=True)
        self.thread.start()

    def stop(self, why: str) -> None:
        """No more writes on this link: the queued ones fail now with `why`, the one in progress (if
        any) ends on its own (its channel closed under it, a two-sided one fails at once), then the
        thread ends and lets go of the peer's cache."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.grant(WriteGrant(False, why))
                job.done()
                self.sender.finished(job)
        self.jobs.put(None)
        if self.channel is not None:
            self.channel.close()  # aborts: safe from this thread, and with a dead peer

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                self._one(job)
            except Exception as e:  # noqa: BLE001 — the link must outlive any one request
                log.exception("hand-off of %s to %s crashed", job.request_id, self.dst)
                job.grant(WriteGrant(False, f"hand-off crashed: {type(e).__name__}: {e}"))
            finally:
                job.done()
                self.sender.finished(job)
        close = getattr(self.peer, "close", None)  # a SocketPeer's connection (control.py)
        if close is not None:
            close()

    def _one(self, job: WriteJob) -> None:
        s = self.sender
        t0 = time.monotonic()
        epoch = self.channel.epoch if self.channel is not None else 0
        intent = WriteIntent(job.request_id, s.worker_id, job.num_tokens, job.first_token, self.backend, epoch,
                             time.time(), job.dest.shared_blocks)
        # 3. ask to write: the decode worker moves the request RESERVED → WRITING (or says why not)
        try:
            grant = self.peer.begin_write(intent, s.timeout_s)
        except Exception as e:  # noqa: BLE001 — Ray raises its own error types
            grant = WriteGrant(False, f"decode worker {self.dst} did not grant the write: {type(e).__name__}: {e}")
        job.grant(grant)
        if not grant.ok:
            return
        # 4. write into exactly the granted blocks
        try:
            nbytes = self._write(job, grant, t0)
            outcome = WriteOutcome(job.request_id, s.worker_id, True, nbytes=nbytes)
        except (TransferError, RuntimeError) as e:
            log.error("KV write of %s to %s failed: %s", job.request_id, self.dst, e)
            if self.channel is not None:
                self.channel.close()  # the next grant re-opens the pair under a new epoch
            outcome = WriteOutcome(job.request_id, s.worker_id, False, str(e))
        finally:
            job.done()
        s.bytes_sent += outcome.nbytes
        # 5. report: a direct write lands with this; a failure ends the request now, not at its timeout
        if self.backend is Backend.IPC or not outcome.ok:
            try:
                self.peer.end_write(outcome, s.timeout_s)
            except Exception as e:  # noqa: BLE001 — the decode side then times the write out
                log.error("end_write of %s to %s failed: %s", job.request_id, self.dst, e)

    def _write(self, job: WriteJob, grant: WriteGrant, t0: float) -> int:
        s = self.sender
        nb, first = -(-job.num_tokens // s.block_size), job.dest.shared_blocks  # the blocks before `first` are there
        if len(job.dest.block_ids) < nb:
            raise TransferError(f"{len(job.dest.block_ids)} destination blocks for {job.num_tokens} tokens")
        dst_blocks, src_blocks = list(job.dest.block_ids[first:nb]), job.src_blocks[first:nb]
        if self.backend is Backend.IPC:
            assert self.cache is not None
            # the decode worker frees a WRITING request's blocks timeout_s after granting: start well before
            if time.monotonic() - t0 > s.timeout_s / 2:
                raise TransferError(f"the write could not start within {s.timeout_s / 2:g}s of its grant")
            copy_blocks(self.cache, dst_blocks, s.cache, src_blocks)
            if self.cache.is_cuda:
                torch.cuda.current_stream().synchronize()  # landed means readable by the decode worker
            return len(dst_blocks) * s.block_bytes
        assert self.channel is not None
        if self.channel.epoch != grant.epoch:  # first write after a failure: re-open the pair
            self.channel.open(grant.epoch, s.timeout_s)
        idx = torch.tensor(src_blocks, dtype=torch.long, device=s.cache.device)
        payload = s.cache.index_select(2, idx)  # [L, 2, nb, bs, KVH, D], contiguous
        self.channel.send(payload, max(0.0, s.timeout_s - (time.monotonic() - t0)))
        return payload.numel() * payload.element_size()


class HandoffSender:
    def __init__(self, worker_id: str, cache: torch.Tensor, block_size: int, timeout_s: float) -> None:
        self.worker_id, self.cache, self.block_size, self.timeout_s = worker_id, cache, block_size, timeout_s
        self.block_bytes = cache[:, :, 0].numel() * cache.element_size()  # one block, all layers, K and V
        self.links: dict[str, _Link] = {}
        self.bytes_sent = 0
        self._in_flight = 0
        self._lock = threading.Lock()

    def connect(
        self, dst: str, peer: DecodePeer, backend: Backend, block_size: int,
        cache: SharedCache | None = None, channel: PairChannel | None = None,
    ) -> None:
        """Wire one decode worker: open its shared cache (ipc) or its pair channel (already open)."""
        if block_size != self.block_size:
            raise ValueError(f"decode worker {dst} has block_size {block_size}, this prefill worker {self.block_size}")
        if backend is Backend.IPC and cache is None:
            raise ValueError(f"decode worker {dst} shares no KV cache to write into")
        if backend is not Backend.IPC and channel is None:
            raise ValueError(f"backend {backend.value} to {dst} needs a pair channel")
        self.disconnect(dst, f"decode worker {dst} was re-connected")  # its previous process's link
        opened = open_cache(cache) if backend is Backend.IPC and cache is not None else None
        if opened is not None and opened.dtype != self.cache.dtype:  # a copy would convert, not move, the values
            raise ValueError(f"decode worker {dst}'s KV cache holds {opened.dtype}, this prefill worker's "
                             f"{self.cache.dtype} (kv_cache.dtype)")
        link = _Link(self, dst, peer, backend, opened, channel)
        with self._lock:
            self.links[dst] = link

    def disconnect(self, dst: str, why: str) -> bool:
        """Drop the link to decode worker `dst` (it is gone, or being re-wired): writes queued on it
        fail with `why`, its channel is closed, and this process lets go of that worker's cache (a
        whole KV cache of memory, on a GPU too) once the write in progress ends. False: no link."""
        with self._lock:
            link = self.links.pop(dst, None)
        if link is None:
            return False
        link.stop(why)
        return True

    def submit(self, job: WriteJob) -> None:
        with self._lock:  # never onto a link that disconnect() has taken away (its thread may be gone)
            link = self.links.get(job.dest.worker_id)
            if link is not None:
                self._in_flight += 1
                link.jobs.put(job)
        if link is None:
            job.grant(WriteGrant(False, f"no hand-off link to decode worker {job.dest.worker_id}"))
            job.done()

    def finished(self, job: WriteJob) -> None:
        with self._lock:
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def close(self) -> None:
        for link in self.links.values():
            link.jobs.put(None)
        for link in self.links.values():
            link.thread.join(timeout=5)
            if link.channel is not None:
                link.channel.close()
