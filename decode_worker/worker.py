"""The decode worker: a BatchWorker (batch_worker.py) whose requests' prompt KV is written by
prefill workers. Runs as a Ray actor (cluster/).

The hand-off's side of a request here (engine/kv_handoff, steps 1-6):
  1. reserve()      the answer names the reserved blocks (batch_worker.py); the first of them may
                    be this worker's cached KV of the prompt's prefix (kv_cache.prefix_cache), shared
                    with other requests and not written
  2. begin_write()  a prefill worker asks to write the prompt's KV: granted if still reserved
  3. end_write() or the pair's receive: the KV has landed in those blocks (or the write failed)
     (both calls come over this worker's control socket, engine/kv_handoff/control.py; through Ray
     where the prefill worker cannot reach it)
  4. schedule, first thing each step: landed writes join the batch with their first token; failed
     ones end their request (or, with transport.on_failure: recompute, the prompt's KV is computed
     here, in chunks beside the decode rows, as for a preempted request)
Then it decodes as every BatchWorker does: schedule → run → postprocess (engine/step_loop.py).
A prompt whose part not cached here is at most decode.local_prefill_max_tokens long skips steps 2-3:
the router calls prefill() here instead of on a prefill worker, and this worker computes it in
chunks beside its decode rows (batch_worker.py), sharing max_recompute_tokens with recomputes —
no prefill queue, no transfer: a multi-turn chat's next turn, whose history is cached here. So does
every prompt while no prefill worker is alive (router/dispatcher.py, step 2).
"""
from __future__ import annotations

import logging
import time

from decode_worker.batch_worker import BatchWorker
from decode_worker.config import DecodeConfig
from engine.config import KVCacheConfig, ModelConfig, TransportConfig
from engine.kv_handoff import (
    Backend, ControlServer, DecodeEndpoint, HandoffReceiver, PairChannel, TorchPairChannel, WriteGrant, WriteIntent,
    WriteOutcome,
)
from engine.step_loop import Step
from engine.types import DecodeEvent, WorkerStats

log = logging.getLogger(__name__)


class DecodeWorker(BatchWorker):
    role = "decode"

    def __init__(
        self, worker_id: str, model_cfg: ModelConfig, kv_cfg: KVCacheConfig, cfg: DecodeConfig,
        transport_cfg: TransportConfig, node: str = "local",
    ) -> None:
        super().__init__(worker_id, model_cfg, kv_cfg, cfg, node, step_tokens=cfg.max_batch_size + cfg.max_recompute_tokens,
                         share_cache=transport_cfg.backend in ("auto", "ipc"),  # prefill workers may write it
                         prompt_tokens=(cfg.max_recompute_tokens, cfg.max_recompute_tokens), share_on_reserve=True)
        self.cfg = cfg
        self.transport_cfg = transport_cfg
        self.receiver = HandoffReceiver(worker_id, self.runner.kv_bytes, kv_cfg.block_size, transport_cfg.timeout_s,
                                        on_change=self._write_ended)
        self._store: object = None  # the TCPStore two-sided pairs rendezvous on (made on first use)
        self.control: ControlServer | None = None  # steps 2 and 3 over a socket (made on first use)
        self.kv_recomputes = 0  # prompts whose failed hand-off was recomputed here (transport.on_failure)

    # -- wiring ---------------------------------------------------------------------------------
    def endpoint(self, host: str) -> DecodeEndpoint:
        """What prefill workers need to write here: the shared cache (ipc), the pair store (nccl/gloo),
        and where to ask (the control socket)."""
        import torch.distributed as dist

        if self._store is None:
            self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        if self.control is None:
            self.control = ControlServer(self, host)
        port = int(self._store.port)  # type: ignore[attr-defined]
        return DecodeEndpoint(self.worker_id, self.node, host, port, self.runner.block_size, self.cache_handle,
                              self.control.address)

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

    # -- called by the prefill workers ------------------------------------------------------------
    def begin_write(self, intent: WriteIntent, timeout_s: float = 0.0) -> WriteGrant:
        """Step 2: may `intent.src_worker` write this request's KV now? (timeout_s: the caller's; a
        local call answers at once)"""
        with self.lock:
            req = self.scheduler.start_write(intent.request_id, intent.num_tokens)
            if req is None:
                return WriteGrant(False, f"request {intent.request_id!r} holds no reservation on {self.worker_id} "
                                         "(cancelled, expired or already written)")
            grant = self.receiver.begin(intent, tuple(req.block_table), req.shared_tokens // self.allocator.block_size)
            ev = None if grant.ok else self.scheduler.write_failed(intent.request_id, grant.reason)
        self._emit([ev])
        return grant

    def end_write(self, outcome: WriteOutcome, timeout_s: float = 0.0) -> None:
        """Step 3: a direct write finished, or a write failed."""
        self.receiver.end(outcome)  # → _write_ended

    def _write_ended(self) -> None:
        """A write landed or failed (a call, or a pair's receive thread): step 4 at once."""
        with self.lock:
            self.nudge()

    def stats(self) -> WorkerStats:
        s = super().stats()
        s.extra.update(
            kv_bytes_received=self.receiver.bytes_received, kv_recomputes=self.kv_recomputes,
            kv_bytes_placed=self.receiver.bytes_placed,
            links={src: b.value for src, b in self.receiver.peers.items()},
            writes_pending=self.receiver.pending, writes_failed=self.receiver.writes_failed,
            handoff_socket_calls=0 if self.control is None else self.control.calls,
        )
        return s

    def shutdown(self) -> None:
        super().shutdown()
        self.receiver.close()
        if self.control is not None:
            self.control.close()

    # -- the loop -------------------------------------------------------------------------------
    def _quiet(self) -> bool:
        return super()._quiet() and not self.receiver.has_news()  # a landed write joins at a complete turn

    def _schedule(self) -> Step | None:
        with self.lock:
            events = self._take_news()
        events += self._land_writes()
        self._emit(events)
        with self.lock:
            batch = self.scheduler.schedule()
            budget = self.cfg.max_recompute_tokens  # prompt tokens computed here in one step
            recomputes, rows = self._recompute_rows(budget)
            chunks, prompt_rows = self._prompt_chunks(budget - sum(c.length for c in recomputes))
            decode_rows, drafts = self._decode_rows(batch)
        if not batch and not chunks and not recomputes:
            return None
        return Step(batch, chunks, decode_rows + prompt_rows + rows, recomputes, drafts)

    def _fail_step(self, step: Step, error: str) -> None:
        super()._fail_step(step, f"decode {error}")

    def _land_writes(self) -> list[DecodeEvent]:
        """Step 4: writes that landed join the batch; failed ones end their requests (or recompute)."""
        if not self.receiver.pending:
            return []
        landed, failed = self.receiver.poll()
        events: list[DecodeEvent] = []
        with self.lock:
            for h in landed:
                if self.scheduler.on_kv_landed(h.request_id, h.intent.first_token) is not None:
                    ms = max(0.0, (time.time() - h.intent.sent_at) * 1000)
                    events.append(DecodeEvent(h.request_id, [], None, None, ms, h.nbytes))
            for h in failed:
                log.error("KV write of %s from %s failed: %s", h.request_id, h.intent.src_worker, h.error)
                if (self.transport_cfg.on_failure == "recompute"
                        and self.scheduler.recompute_write(h.request_id, h.intent.first_token) is not None):
                    self.kv_recomputes += 1
                    continue
                ev = self.scheduler.write_failed(h.request_id, f"KV hand-off failed: {h.error}")
                if ev is not None:
                    events.append(ev)
        return events
