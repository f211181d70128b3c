"""The decode worker: paged KV cache + continuous batching loop. Runs as a Ray actor (cluster/).

A request here goes (the hand-off's side of it is engine/kv_handoff, steps 1-6):
  1. reserve()      the router asks for room for prompt + max_tokens before any prefill work; the
                    answer names the blocks (a KVDestination)
  2. begin_write()  a prefill worker asks to write the prompt's KV: granted if still reserved
  3. end_write() or the pair's receive: the KV has landed in those blocks (or the write failed);
                    the loop adds the request to the batch with its first token
  4. every step: one forward over all running requests, sample, emit DecodeEvents
  5. poll()         the router long-polls events and streams them to clients
  6. cancel()       from any state: the request leaves at the next step, its blocks are freed
                    (while its KV is being written: once the write has ended)

Public methods are called from Ray's threads; the loop thread alone touches the model and the cache.
"""
from __future__ import annotations

import logging
import threading
import uuid
import time
from collections import deque
from typing import Any

import torch

from decode_worker.config import DecodeConfig
from decode_worker.request import DecodeRequest
from decode_worker.scheduler import DecodeScheduler
from engine import kv_budget
from engine.block_allocator import BlockAllocator
from engine.config import KVCacheConfig, ModelConfig, TransportConfig
from engine.kv_handoff import (
    Backend, DecodeEndpoint, HandoffReceiver, PairChannel, TorchPairChannel, WriteGrant, WriteIntent, WriteOutcome,
)
from engine.kv_handoff import shared_cache
from engine.model_loader import load_model
from engine.model_runner import ModelRunner, SeqInput
from engine.sampler import History, sample
from engine.types import DecodeEvent, FinishReason, ReserveResult, SamplingParams, WorkerStats

log = logging.getLogger(__name__)


class DecodeWorker:
    role = "decode"

    def __init__(
        self,
        worker_id: str,
        model_cfg: ModelConfig,
        kv_cfg: KVCacheConfig,
        cfg: DecodeConfig,
        transport_cfg: TransportConfig | None,
        node: str = "local",
    ) -> None:
        """transport_cfg None: nothing is ever handed to this worker (the aggregated worker)."""
        torch.set_num_threads(cfg.torch_threads)
        self.worker_id, self.node = worker_id, node
        self.boot_id = uuid.uuid4().hex[:12]
        self.model_cfg, self.transport_cfg = model_cfg, transport_cfg
        model = load_model(model_cfg)
        step_tokens = max(cfg.max_batch_size, getattr(cfg, "max_batch_tokens", 0))  # the largest forward here
        blocks = kv_budget.num_blocks(kv_cfg, model, cfg.num_gpus, step_tokens, model_cfg.max_model_len)
        self.cache_handle: shared_cache.SharedCache | None = None
        kv = None
        if transport_cfg is not None and transport_cfg.backend in ("auto", "ipc"):  # prefill workers may write it
            shape = ModelRunner.cache_shape(model.config, blocks, kv_cfg.block_size)
            kv, self.cache_handle = shared_cache.allocate(shape, model.dtype, model_cfg.device, worker_id)
        self.runner = ModelRunner(model, blocks, kv_cfg.block_size, model_cfg.kernels, kv=kv)
        if cfg.cuda_graphs and self.runner.device.type == "cuda" and self.runner.attn.name == "triton":
            self.runner.use_decode_graphs(cfg.max_batch_size, model_cfg.max_model_len)
        self.allocator = BlockAllocator(blocks, kv_cfg.block_size)
        self.scheduler = DecodeScheduler(self.allocator, cfg.max_batch_size, cfg.reserve_timeout_s, worker_id)
        self.receiver = HandoffReceiver(
            worker_id, self.runner.kv, kv_cfg.block_size, (transport_cfg or TransportConfig()).timeout_s
        )
        self._store: object = None  # the TCPStore two-sided pairs rendezvous on (made on first use)
        self.prompt_tokens_computed = 0  # tokens at prompt positions run through the model: 0 unless recomputed
        self.kv_recomputes = 0  # prompts whose failed hand-off was recomputed here (transport.on_failure)
        self._recompute: deque[tuple[str, int]] = deque()  # (request key, first token) to recompute
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
        """This process's boot id: it changes when Ray restarts the worker."""
        return self.boot_id

    def start(self) -> None:
        """Start the step loop."""
        self._thread = threading.Thread(target=self._loop, name=f"{self.worker_id}-loop", daemon=True)
        self._thread.start()

    def endpoint(self, host: str) -> DecodeEndpoint:
        """What prefill workers need to write here: the shared cache (ipc) and the pair store (nccl/gloo)."""
        import torch.distributed as dist

        if self._store is None:
            self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        port = int(self._store.port)  # type: ignore[attr-defined]
        return DecodeEndpoint(self.worker_id, self.node, host, port, self.runner.block_size, self.cache_handle)

    def accept(self, src: str, backend: Backend, channel: PairChannel | None = None, tag: str = "") -> None:
        """Take writes from prefill worker `src` (again, after either side restarted: writes still
        open from its previous process fail). Two-sided: open the pair now (blocks until the prefill
        worker opens its side; the launcher calls both at once under the same `tag`)."""
        if backend is not Backend.IPC and channel is None:
            assert self._store is not None, "endpoint() first"
            channel = TorchPairChannel(backend.value, self._store, f"{src}>{self.worker_id}/{tag}", rank=1)
        if channel is not None and channel.epoch < 0:
            channel.open(0, self.receiver.timeout_s)
        self.receiver.add_peer(src, backend, channel)

    # -- called by the router and the prefill workers ---------------------------------------------
    def reserve(
        self, request_id: str, num_prompt_tokens: int, sampling: SamplingParams, eos_token_ids: tuple[int, ...],
        prompt_ids: list[int] | None = None,
    ) -> ReserveResult:
        with self._lock:
            return self.scheduler.reserve(request_id, num_prompt_tokens, sampling, eos_token_ids, prompt_ids)

    def begin_write(self, intent: WriteIntent, timeout_s: float = 0.0) -> WriteGrant:
        """kv_handoff step 3: may `intent.src_worker` write this request's KV now? (timeout_s: the
        caller's; a local call answers at once)"""
        with self._wake:
            req = self.scheduler.start_write(intent.request_id, intent.num_tokens)
            if req is None:
                return WriteGrant(False, f"request {intent.request_id!r} holds no reservation on {self.worker_id} "
                                         "(cancelled, expired or already written)")
            grant = self.receiver.begin(intent, tuple(req.block_table))
            ev = None if grant.ok else self.scheduler.write_failed(intent.request_id, grant.reason)
        if ev is not None:
            self._emit([ev])
        return grant

    def end_write(self, outcome: WriteOutcome, timeout_s: float = 0.0) -> None:
        """kv_handoff step 5: a direct write finished, or a write failed."""
        self.receiver.end(outcome)
        with self._wake:
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
                {"steps": self.steps, "kv_bytes_received": self.receiver.bytes_received,
                 "kv_recomputes": self.kv_recomputes,
                 "kv_bytes_placed": self.receiver.bytes_placed,
                 "links": {src: b.value for src, b in self.receiver.peers.items()},
                 "writes_pending": self.receiver.pending, "writes_failed": self.receiver.writes_failed,
                 "attention": self.runner.attn.name,
                 "graph_replays": self.runner.graphs.replays if self.runner.graphs is not None else 0},
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
        self.receiver.close()

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
                    self._wake.wait(0.001 if self.receiver.pending else 0.05)
                events = self._drain_inbox() + self.scheduler.expire()
            events += self._land_transfers()
            events += self._work()
            self._emit(events)

    def _idle(self) -> bool:
        return not self.scheduler.running and not self.scheduler.ready and not self._inbox and not self._recompute

    def _recomputable(self, req: DecodeRequest | None) -> bool:
        return (self.transport_cfg is not None and self.transport_cfg.on_failure == "recompute" and req is not None
                and not req.cancelled and req.prompt_ids is not None)

    def _recompute_prompts(self) -> list[DecodeEvent]:
        """transport.on_failure: recompute — the prompt's KV computed here, into its own blocks."""
        events: list[DecodeEvent] = []
        while self._recompute:
            rid, first = self._recompute.popleft()
            with self._lock:
                req = self.scheduler.requests.get(rid)
            if req is None or req.prompt_ids is None:
                continue
            try:
                self.runner.forward([SeqInput(list(req.prompt_ids), 0, req.block_table)])  # KV only
            except Exception as e:  # noqa: BLE001 — this request only
                log.exception("recomputing %s failed", rid)
                with self._lock:
                    ev = self.scheduler.write_failed(rid, f"KV hand-off failed, and so did recomputing: {e}")
                events += [ev] if ev is not None else []
                continue
            self.prompt_tokens_computed += len(req.prompt_ids)
            self.kv_recomputes += 1
            with self._lock:
                self.scheduler.on_kv_landed(rid, first)  # cancelled meanwhile: ends here, blocks back
        return events

    def _work(self) -> list[DecodeEvent]:
        """One decode step over the running batch (continuous batching)."""
        events = self._recompute_prompts() if self._recompute else []
        with self._lock:
            batch = self.scheduler.schedule()
        if not batch:
            return events
        try:
            return events + self._step(batch)
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
            if kind == "cancel":
                if self.scheduler.cancel(item):
                    events.append(DecodeEvent(item, [], FinishReason.CANCELLED))
        return events

    def _land_transfers(self) -> list[DecodeEvent]:
        """kv_handoff step 6: writes that landed join the batch; failed ones end their requests."""
        if not self.receiver.pending:
            return []
        landed, failed = self.receiver.poll()
        events: list[DecodeEvent] = []
        with self._lock:
            for h in landed:
                if self.scheduler.on_kv_landed(h.request_id, h.intent.first_token) is not None:
                    ms = max(0.0, (time.time() - h.intent.sent_at) * 1000)
                    events.append(DecodeEvent(h.request_id, [], None, None, ms, h.nbytes))
            for h in failed:
                log.error("KV write of %s from %s failed: %s", h.request_id, h.intent.src_worker, h.error)
                req = self.scheduler.requests.get(h.request_id)
                if self._recomputable(req):
                    self._recompute.append((h.request_id, h.intent.first_token))
                    continue
                ev = self.scheduler.write_failed(h.request_id, f"KV hand-off failed: {h.error}")
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
