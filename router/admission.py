"""Step 1 of a request's trip (router/dispatcher.py): KV room on a decode worker before any prefill work.

  1. no request as urgent or more queues ahead (its `priority` value or a lower one): ask the decode
     workers, most room first (router/policy.py: the prefix of the prompt a worker holds counts as
     room there), to reserve; the first that says yes holds it (its answer names the blocks the
     prefill writes into)
  2. none has room, or others queue: wait in one queue (at most limits.max_queued_requests), served
     by priority then arrival (Turns: the head alone tries), woken when a request leaves a decode
     worker, or every 0.5 s (reservations expire on their own), until limits.queue_timeout_s or the
     request's deadline: then ResourceExhausted naming why. A more urgent request that queues
     meanwhile takes the next try
  3. a reserve call the router stopped waiting for (deadline, client gone) may still succeed on the
     worker: when it answers, what it reserved is cancelled
A mixin of the Dispatcher, which owns the state it reads.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from engine.kv_handoff.types import KVDestination
from router.config import LimitsConfig
from router.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, WorkerFailure
from router.liveness import WorkerRef
from router.policy import LeastLoadedPolicy
from router.validation import ValidRequest


Ticket = tuple[int, int]  # (priority, arrival number): lower goes first


class Turns:
    """The requests waiting for KV room, and whose turn it is to try: one at a time, the lowest
    ticket first (an asyncio.Lock whose waiters are served by priority, then arrival, not FIFO)."""

    def __init__(self) -> None:
        self._heap: list[tuple[Ticket, asyncio.Future[None]]] = []  # waiting for the turn
        self._held = False
        self._seq = itertools.count()
        self._queued: Counter[int] = Counter()  # priority → requests in the queue (the turn's holder too)

    def __len__(self) -> int:
        return sum(self._queued.values())

    def ahead(self, priority: int) -> bool:
        """Whether a request as urgent as `priority` or more is queued (a new one goes behind it)."""
        return any(p <= priority for p in self._queued)  # leave() drops a priority none holds

    def enter(self, priority: int) -> Ticket:
        self._queued[priority] += 1
        return priority, next(self._seq)

    def leave(self, ticket: Ticket) -> None:
        self._queued[ticket[0]] -= 1
        if not self._queued[ticket[0]]:
            del self._queued[ticket[0]]

    async def acquire(self, ticket: Ticket) -> None:
        if not self._held:
            self._held = True
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (ticket, fut))  # tickets are unique: futures are never compared
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed the turn just as it was cancelled: pass it on
                self.release()
            else:  # still waiting, or already skipped by a release() that ran first
                self._heap = [e for e in self._heap if e[1] is not fut]
                heapq.heapify(self._heap)
            raise

    def release(self) -> None:
        while self._heap:
            _, fut = heapq.heappop(self._heap)
            if not fut.done():
                fut.set_result(None)  # the turn passes straight to it
                return
        self._held = False

    def contested(self, ticket: Ticket) -> bool:
        """Whether a request ranked before `ticket` waits for the turn (its holder should yield)."""
        return bool(self._heap) and self._heap[0][0] < ticket


class KVAdmission:
    decodes: list[WorkerRef]
    dead: set[str]
    limits: LimitsConfig
    eos_token_ids: tuple[int, ...]
    policy: LeastLoadedPolicy
    turns: Turns
    _capacity: asyncio.Condition
    _capacity_gen: int

    if TYPE_CHECKING:  # the Dispatcher's own
        async def _wait(self, awaitable: Any, deadline: float, what: str) -> Any: ...
        async def _cancel_decode(self, d_idx: int, rid: str) -> None: ...
        def _in_background(self, work: Any) -> None: ...

    async def _reserve(self, req: ValidRequest, deadline: float, avoid: set[int] | None = None
                       ) -> tuple[int, KVDestination]:
        """Reserve at once if nobody as urgent queues ahead; else wait in the queue for room, bounded
        in count and time. avoid: decode workers to pass over while another one is live."""
        priority = req.sampling.priority
        if not self.turns.ahead(priority):
            found, reasons = await self._try_reserve(req, deadline, avoid)
            if found is not None:
                return found
        else:
            reasons = [f"{len(self.turns)} requests already waiting for KV room"]
        lim = self.limits
        if len(self.turns) >= lim.max_queued_requests or lim.queue_timeout_s == 0:
            raise ResourceExhausted(
                f"no decode worker has room and the wait queue is full (limits.max_queued_requests="
                f"{lim.max_queued_requests}): " + "; ".join(reasons)
            )
        ticket = self.turns.enter(priority)
        try:
            give_up = min(deadline, time.monotonic() + lim.queue_timeout_s)
            while True:  # one turn at the head of the queue each pass
                await self.turns.acquire(ticket)
                try:
                    while not self.turns.contested(ticket):  # a more urgent arrival takes the next try
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
                    self.turns.release()
        finally:
            self.turns.leave(ticket)

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
