"""Step 1 of a request's trip (router/dispatcher.py): KV room on a decode worker before any prefill work.

  1. no request queues ahead: ask the decode workers, most room first (router/policy.py: the prefix
     of the prompt a worker holds counts as room there), to reserve; the first that says yes holds
     it (its answer names the blocks the prefill writes into)
  2. none has room, or others queue: wait in one FIFO queue (at most limits.max_queued_requests),
     woken when a request leaves a decode worker, or every 0.5 s (reservations expire on their own),
     until limits.queue_timeout_s or the request's deadline: then ResourceExhausted naming why
  3. a reserve call the router stopped waiting for (deadline, client gone) may still succeed on the
     worker: when it answers, what it reserved is cancelled
A mixin of the Dispatcher, which owns the state it reads.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from engine.kv_handoff.types import KVDestination
from router.config import LimitsConfig
from router.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, WorkerFailure
from router.liveness import WorkerRef
from router.policy import LeastLoadedPolicy
from router.validation import ValidRequest


class KVAdmission:
    decodes: list[WorkerRef]
    dead: set[str]
    limits: LimitsConfig
    eos_token_ids: tuple[int, ...]
    policy: LeastLoadedPolicy
    queued: int
    _admission: asyncio.Lock
    _capacity: asyncio.Condition
    _capacity_gen: int

    if TYPE_CHECKING:  # the Dispatcher's own
        async def _wait(self, awaitable: Any, deadline: float, what: str) -> Any: ...
        async def _cancel_decode(self, d_idx: int, rid: str) -> None: ...
        def _in_background(self, work: Any) -> None: ...

    async def _reserve(self, req: ValidRequest, deadline: float, avoid: set[int] | None = None
                       ) -> tuple[int, KVDestination]:
        """Reserve at once if nobody queues ahead; else wait FIFO for room, bounded in count and time.
        avoid: decode workers to pass over while another one is live."""
        if self.queued == 0:
            found, reasons = await self._try_reserve(req, deadline, avoid)
            if found is not None:
                return found
        else:
            reasons = [f"{self.queued} requests already waiting for KV room"]
        lim = self.limits
        if self.queued >= lim.max_queued_requests or lim.queue_timeout_s == 0:
            raise ResourceExhausted(
                f"no decode worker has room and the wait queue is full (limits.max_queued_requests="
                f"{lim.max_queued_requests}): " + "; ".join(reasons)
            )
        self.queued += 1
        try:
            give_up = min(deadline, time.monotonic() + lim.queue_timeout_s)
            async with self._admission:
                while True:
                    gen = self._capacity_gen
                    found, reasons = await self._try_reserve(req, deadline, avoid)
                    if found is not None:
                        return found
                    left = give_up - time.monotonic()
                    if left <= 0:
                        raise ResourceExhausted(
                            f"no decode worker had room within limits.queue_timeout_s={lim.queue_timeout_s:g}s: "
                            + "; ".join(reasons)
                        )
                    async with self._capacity:
                        try:  # wake on a finish anywhere, or re-check every 0.5 s (expired reservations)
                            await asyncio.wait_for(
                                self._capacity.wait_for(lambda: self._capacity_gen != gen), timeout=min(0.5, left)
                            )
                        except asyncio.TimeoutError:
                            pass
        finally:
            self.queued -= 1

    async def _try_reserve(
        self, req: ValidRequest, deadline: float, avoid: set[int] | None = None
    ) -> tuple[tuple[int, KVDestination] | None, list[str]]:
        reasons = []
        live = [i for i, d in enumerate(self.decodes) if d.worker_id not in self.dead]
        for i in self.policy.decode_order(req.prompt_ids, req.cache_salt):
            d = self.decodes[i]
            if d.worker_id in self.dead:
                reasons.append(f"decode worker {d.worker_id}: worker is gone")
                continue
            if avoid and i in avoid and set(live) - avoid:
                reasons.append(f"decode worker {d.worker_id}: failed this request's hand-off")
                continue
            load = self.policy.decode[i]
            kv_tokens = len(req.prompt_ids) + req.sampling.max_tokens
            self.policy.add(load, kv_tokens)  # count it now: concurrent arrivals must see it
            call = asyncio.ensure_future(d.handle.reserve.remote(
                req.key, len(req.prompt_ids), req.sampling, self.eos_token_ids,
                req.prompt_ids,  # for a repetition penalty, and to recompute the KV if its hand-off fails
                req.cache_salt,  # its KV blocks are shared only within this salt
            ))
            try:  # shielded: if we stop waiting, the reservation may still be made; then undo it
                r = await self._wait(asyncio.shield(call), min(deadline, time.monotonic() + 10), "reserve")
            except (DeadlineExceeded, WorkerFailure) as e:
                self.policy.remove(load, kv_tokens)
                self._undo_late_reserve(call, i, req.key)
                reasons.append(f"decode worker {d.worker_id}: {e}")
                continue
            except BaseException:
                self.policy.remove(load, kv_tokens)
                self._undo_late_reserve(call, i, req.key)
                raise
            if r.ok:
                self.policy.placed(req.prompt_ids, req.cache_salt, i)  # its prefix will be there
                return (i, r.dest), []
            self.policy.remove(load, kv_tokens)
            if r.refused_field:  # the request itself: waiting for room would not change it
                raise InvalidArgument(r.refused_field, f"decode worker {d.worker_id}: {r.reason}")
            reasons.append(f"decode worker {d.worker_id}: {r.reason}")
        return None, reasons

    def _undo_late_reserve(self, call: "asyncio.Future[Any]", d_idx: int, key: str) -> None:
        """Nobody waits for this reservation any more: when it answers, cancel what it reserved."""
        async def undo() -> None:
            try:
                r = await asyncio.wait_for(call, timeout=60)
            except BaseException:  # noqa: BLE001 — failed or never answered: nothing was reserved
                return
            if getattr(r, "ok", False):
                await self._cancel_decode(d_idx, key)
                await self._capacity_changed()

        self._in_background(undo())

    async def _capacity_changed(self) -> None:
        async with self._capacity:
            self._capacity_gen += 1
            self._capacity.notify_all()
