"""The decode worker: paged KV cache + continuous batching loop. Runs as a Ray actor (cluster/).

A request here goes:
  1. reserve()      the router asks for room for prompt + max_tokens before any prefill work
  2. kv_incoming()  the prefill worker says its KV (and first token) is on the wire
  3. the loop posts the receive, lands the KV in the reserved blocks, adds the request to the batch
  4. every step: one forward over all running requests, sample, emit DecodeEvents
  5. poll()         the router long-polls events and streams them to clients
  6. cancel()       from any state: the request leaves at the next step, its blocks are freed

Public methods are called from Ray's threads; the loop thread alone touches the model and the cache.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import torch

from decode_worker.config import DecodeConfig
from decode_worker.receiver import KVReceiver
from decode_worker.scheduler import DecodeScheduler
from engine.block_allocator import BlockAllocator
from engine.config import KVCacheConfig, ModelConfig, TransportConfig
from engine.model_loader import load_model
from engine.model_runner import ModelRunner, SeqInput
from engine.sampler import History, sample
from engine.transport import KVTransport, make_transport
from engine.types import DecodeEvent, FinishReason, KVArrival, ReserveResult, SamplingParams, WorkerStats

log = logging.getLogger(__name__)


class DecodeWorker:
    role = "decode"

    def __init__(
        self,
        worker_id: str,
        model_cfg: ModelConfig,
        kv_cfg: KVCacheConfig,
        cfg: DecodeConfig,
        transport_cfg: TransportConfig,
        node: str = "local",
    ) -> None:
        torch.set_num_threads(cfg.torch_threads)
        self.worker_id, self.node = worker_id, node
        self.model_cfg, self.transport_cfg = model_cfg, transport_cfg
        self.runner = ModelRunner(load_model(model_cfg), kv_cfg.num_blocks, kv_cfg.block_size, model_cfg.kernels)
        self.allocator = BlockAllocator(kv_cfg.num_blocks, kv_cfg.block_size)
        self.scheduler = DecodeScheduler(self.allocator, cfg.max_batch_size, cfg.reserve_timeout_s)
        self.receiver: KVReceiver | None = None
        self.prompt_tokens_computed = 0  # tokens at prompt positions run through the model: must stay 0
        self.kv_bytes_received = 0
        self.steps = 0
        self._lock = threading.Lock()  # guards scheduler + inbox
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[tuple[str, Any]] = deque()
        self._events: list[DecodeEvent] = []
        self._events_cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- wiring ---------------------------------------------------------------------------------
    def ready(self) -> str:
        return self.worker_id

    def init_transport(self, rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        self.set_transport(
            make_transport(self.transport_cfg, self.model_cfg.device, rank, world_size, master_addr, master_port)
        )

    def set_transport(self, transport: KVTransport) -> None:
        self.transport = transport
        self.receiver = KVReceiver(
            transport, self.runner.kv_shape, self.runner.dtype, str(self.runner.device), self.transport_cfg.timeout_s
        )
        self._thread = threading.Thread(target=self._loop, name=f"{self.worker_id}-loop", daemon=True)
        self._thread.start()

    # -- called by the router and the prefill workers ---------------------------------------------
    def reserve(
        self, request_id: str, num_prompt_tokens: int, sampling: SamplingParams, eos_token_ids: tuple[int, ...],
        prompt_ids: list[int] | None = None,
    ) -> ReserveResult:
        with self._lock:
            return self.scheduler.reserve(request_id, num_prompt_tokens, sampling, eos_token_ids, prompt_ids)

    def kv_incoming(self, arrival: KVArrival) -> None:
        with self._wake:
            self._inbox.append(("arrival", arrival))
            self._wake.notify()

    def cancel(self, request_id: str) -> bool:
        with self._wake:
            found = request_id in self.scheduler.requests
            self._inbox.append(("cancel", request_id))
            self._wake.notify()
        return found

    def poll(self, timeout_s: float = 0.5) -> list[DecodeEvent]:
        """Long-poll: return the events since the last call, waiting up to timeout_s for one."""
        with self._events_cv:
            if not self._events:
                self._events_cv.wait(timeout_s)
            events, self._events = self._events, []
        return events

    def stats(self) -> WorkerStats:
        with self._lock:
            s = self.scheduler
            return WorkerStats(
                self.role, self.worker_id, self.node, s.num_running, s.num_waiting,
                self.allocator.num_used, self.allocator.num_blocks, self.prompt_tokens_computed,
                s.tokens_generated,
                {"steps": self.steps, "kv_bytes_received": self.kv_bytes_received,
                 "transfers_pending": self.receiver.pending() if self.receiver else 0},
            )

    def check_idle(self) -> bool:
        """True when no request is held and every block is free (integrity-checked)."""
        with self._lock:
            self.allocator.check()
            return self.scheduler.is_idle() and self.allocator.num_used == 0

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if getattr(self, "transport", None) is not None:
            self.transport.close()

    # -- the loop -------------------------------------------------------------------------------
    def _emit(self, events: list[DecodeEvent]) -> None:
        if events:
            with self._events_cv:
                self._events.extend(events)
                self._events_cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._stop:
                    return
                if self._idle():
                    # wait for work; poll transfers in flight every millisecond
                    self._wake.wait(0.001 if self.receiver and self.receiver.pending() else 0.05)
                events = self._drain_inbox() + self.scheduler.expire()
            events += self._land_transfers()
            events += self._work()
            self._emit(events)

    def _idle(self) -> bool:
        return not self.scheduler.running and not self.scheduler.ready and not self._inbox

    def _work(self) -> list[DecodeEvent]:
        """One decode step over the running batch (continuous batching)."""
        with self._lock:
            batch = self.scheduler.schedule()
        if not batch:
            return []
        try:
            return self._step(batch)
        except Exception as e:  # noqa: BLE001 — end the batch's requests, keep the worker alive
            log.exception("decode step failed")
            return self._fail(batch, f"decode step failed: {type(e).__name__}: {e}")

    def _fail(self, batch: list, error: str) -> list[DecodeEvent]:
        with self._lock:
            events = [self.scheduler.fail(r.request_id, error) for r in batch]
        return [ev for ev in events if ev is not None]

    def _drain_inbox(self) -> list[DecodeEvent]:
        events: list[DecodeEvent] = []
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "arrival":
                assert self.receiver is not None
                self.scheduler.on_arrival(item)
                self.receiver.announce(item)  # received even if cancelled: keeps the pair in step
            elif kind == "cancel":
                if self.scheduler.cancel(item):
                    events.append(DecodeEvent(item, [], FinishReason.CANCELLED))
        return events

    def _land_transfers(self) -> list[DecodeEvent]:
        if self.receiver is None:
            return []
        done, failed = self.receiver.poll()
        events: list[DecodeEvent] = []
        with self._lock:
            for landed in done:
                a = landed.arrival
                req = self.scheduler.requests.get(a.request_id)
                if req is None:  # cancelled meanwhile: drop the data
                    continue
                self.runner.scatter_kv(req.block_table, landed.transfer.tensor)
                nbytes = landed.transfer.tensor.numel() * landed.transfer.tensor.element_size()
                self.kv_bytes_received += nbytes
                if self.scheduler.on_kv_landed(a.request_id) is not None:
                    ms = max(0.0, (time.time() - a.sent_at) * 1000)
                    events.append(DecodeEvent(a.request_id, [], None, None, ms, nbytes))
            for landed in failed:
                log.error("KV transfer for %s failed: %s", landed.arrival.request_id, landed.transfer.error)
                ev = self.scheduler.fail(landed.arrival.request_id, f"KV transfer failed: {landed.transfer.error}")
                if ev is not None:
                    events.append(ev)
        return events

    def _step(self, batch: list) -> list[DecodeEvent]:
        logits = self.runner.forward(self._decode_inputs(batch))  # [B, V]
        return self._sample_decode(batch, logits)

    def _decode_inputs(self, batch: list) -> list[SeqInput]:
        """One new token per running request: its last one, at position num_tokens - 1."""
        seqs = [SeqInput([r.last_token], r.num_tokens - 1, r.block_table) for r in batch]
        for s, r in zip(seqs, batch):
            if s.start_pos < r.num_prompt_tokens:
                self.prompt_tokens_computed += s.num_new
        return seqs

    def _sample_decode(self, batch: list, logits: torch.Tensor) -> list[DecodeEvent]:
        """logits [B, V], one row per request of `batch` → next tokens → events."""
        histories = [History(r.prompt_ids or (), r.output_ids) if r.sampling.penalized else None for r in batch]
        tokens, logprobs = sample(logits, [r.sampling for r in batch], [r.num_tokens for r in batch], histories)
        self.steps += 1
        with self._lock:
            return self.scheduler.on_tokens(batch, tokens, logprobs)
