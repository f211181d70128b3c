"""Which workers the router may use: the decode event pumps, lost and revived workers, their stats.

The dispatcher (router/dispatcher.py) is built on this. A decode worker's pump that finds the actor
gone fails that worker's requests at once; the supervisor in cluster/ calls mark_lost() and revive();
stats() reports every worker, the unreachable ones as `lost`. Workers are known by stable ids.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from engine.event_stream import ACK, ACK_EVERY, HEADER
from engine.event_stream import decode as decode_events
from engine.types import DecodeEvent, FinishReason, WorkerStats
from router.event_inbox import EventInbox

log = logging.getLogger(__name__)


@dataclass
class WorkerRef:
    worker_id: str  # stable: the worker's name everywhere (hand-off, status, logs), not a position
    handle: Any


class WorkerLiveness:
    """Mixin of the Dispatcher: the state it reads is set up in Dispatcher.__init__."""

    prefills: list[WorkerRef]
    decodes: list[WorkerRef]
    colocated: bool
    streams: dict[str, EventInbox]
    _placed: dict[str, int]
    _pollers: dict[str, "asyncio.Task[None]"]
    dead: set[str]
    dead_prefills: set[str]
    restarts: dict[str, int]
    revivals: dict[str, int]  # worker id → times revived: an answer from before a revival is stale
    delivered: dict[str, tuple[str, int]]  # decode worker id → (its event log, last frame delivered)
    _closing: bool

    async def _pump(self, d: WorkerRef) -> None:
        """A decode worker's events to its requests' inboxes: pushed over the worker's event stream
        (engine/event_stream.py, steps 1-5) where it has one, else long-polled through Ray."""
        idx = self.decodes.index(d)
        if getattr(d.handle, "open_event_stream", None) is None:  # a stand-in without one (tests)
            return await self._poll(d)
        failures = unreachable = 0
        while not self._closing:
            asked = self.revivals.get(d.worker_id, 0)
            writer = None
            framed = False  # this attempt got a frame (a heartbeat comes within HEARTBEAT_S)
            try:
                host, port, secret, log_ = await asyncio.wait_for(d.handle.open_event_stream.remote(),  # 1
                                                                  timeout=30)
                if self.delivered.get(d.worker_id, ("",))[0] != log_:  # a log new to this router: none of it seen
                    self.delivered[d.worker_id] = (log_, 0)
                last = acked = self.delivered[d.worker_id][1]
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=10)
                writer.write(f"{secret} {log_} {last}\n".encode())  # 2
                while True:
                    async with asyncio.timeout(30):  # heartbeats come every HEARTBEAT_S
                        n, seq = HEADER.unpack(await reader.readexactly(HEADER.size))
                        body = await reader.readexactly(n)
                    framed, failures, unreachable = True, 0, 0
                    if seq > last:  # 3. not one delivered before the connection broke
                        self._deliver(idx, decode_events(body))
                        last = seq
                        self.delivered[d.worker_id] = (log_, seq)
                    if seq > acked and (seq - acked >= ACK_EVERY or body == b"[]"):  # 4 (on a heartbeat)
                        writer.write(ACK.pack(seq))
                        acked = seq
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — a dead worker must not kill the pump
                failures += 1
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if not _actor_gone(e):  # 5. the connection ended: is the worker still there?
                    try:
                        await asyncio.wait_for(d.handle.ready.remote(), timeout=10)
                    except asyncio.CancelledError:
                        raise
                    except Exception as e2:  # noqa: BLE001
                        e, why = e2, f"{type(e2).__name__}: {e2}"
                if _actor_gone(e) and self.revivals.get(d.worker_id, 0) == asked:  # not about a revived one
                    self._decode_lost(idx, f"decode worker {d.worker_id} is gone: {type(e).__name__}")
                    return
                unreachable += not framed
                if unreachable >= 3:  # no socket it can open, a firewall between the nodes, ...: Ray works
                    log.warning("decode worker %s: no event stream from it (%s); polling it through Ray instead",
                                d.worker_id, why)
                    return await self._poll(d)
                log.warning("event stream of decode worker %s ended (%d): %s; reconnecting", d.worker_id,
                            failures, why)
                await asyncio.sleep(min(1.0, 0.05 * failures))
            finally:
                if writer is not None:
                    writer.close()

    def _deliver(self, idx: int, events: list[DecodeEvent]) -> None:
        for ev in events:
            inbox = self.streams.get(ev.request_id)
            if inbox is not None and self._placed.get(ev.request_id) == idx:  # not one moved away
                inbox.put(ev)

    async def _poll(self, d: WorkerRef) -> None:
        idx = self.decodes.index(d)
        failures = 0
        while not self._closing:
            asked = self.revivals.get(d.worker_id, 0)
            try:
                log_, last = self.delivered.get(d.worker_id, ("", 0))
                batch = await asyncio.wait_for(d.handle.poll.remote(0.25, log_, last), timeout=30)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — a dead worker must not kill the pump
                failures += 1
                log.error("polling decode worker %s failed (%d): %s", d.worker_id, failures, e)
                if _actor_gone(e) and self.revivals.get(d.worker_id, 0) == asked:  # not about a revived one
                    self._decode_lost(idx, f"decode worker {d.worker_id} is gone: {type(e).__name__}")
                    return
                await asyncio.sleep(min(1.0, 0.05 * failures))
                continue
            self._deliver(idx, batch.events)  # every frame after `last`, of the log it names
            self.delivered[d.worker_id] = (batch.log, batch.seq)

    def _decode_lost(self, idx: int, why: str) -> None:
        self.dead.add(self.decodes[idx].worker_id)
        for rid, where in list(self._placed.items()):
            inbox = self.streams.get(rid)
            if where == idx and inbox is not None:
                inbox.put(DecodeEvent(rid, [], FinishReason.ERROR, why, lost=True))

    # -- worker liveness (the supervisor in cluster/ calls these) ------------------------------
    def mark_lost(self, worker_id: str, why: str) -> None:
        """A worker is gone: its requests fail now (decode) and no new one is sent to it."""
        for i, d in enumerate(self.decodes):
            if d.worker_id == worker_id and worker_id not in self.dead:
                log.error("%s", why)
                self._decode_lost(i, why)
        if not self.colocated and any(p.worker_id == worker_id for p in self.prefills):
            self.dead_prefills.add(worker_id)

    def revive(self, worker_id: str, restarted: bool) -> None:
        """A lost worker is back (restarted and re-wired, or it was only unreachable): it takes traffic."""
        if restarted:
            self.restarts[worker_id] = self.restarts.get(worker_id, 0) + 1
        self.revivals[worker_id] = self.revivals.get(worker_id, 0) + 1
        self.dead.discard(worker_id)
        self.dead_prefills.discard(worker_id)
        for d in self.decodes:
            t = self._pollers.get(d.worker_id)
            if d.worker_id == worker_id and not self._closing and (t is None or t.done()):
                self._pollers[worker_id] = asyncio.create_task(self._pump(d))

    def is_lost(self, worker_id: str) -> bool:
        return worker_id in self.dead or worker_id in self.dead_prefills

    @property
    def serving(self) -> bool:
        """At least one decode worker is alive (with no live prefill worker, decode workers compute
        the prompts themselves: router/dispatcher.py, step 2)."""
        return any(d.worker_id not in self.dead for d in self.decodes)

    @property
    def prefill_lost(self) -> bool:
        """Disaggregated, and every prefill worker is gone."""
        return not self.colocated and all(p.worker_id in self.dead_prefills for p in self.prefills)

    async def stats(self) -> list[WorkerStats]:
        """Every worker, the unreachable ones too (state 'lost'); a worker found gone is marked lost."""
        refs = ([] if self.colocated else [("prefill", p) for p in self.prefills]) + [("decode", d) for d in self.decodes]
        asked = {w.worker_id: self.revivals.get(w.worker_id, 0) for _, w in refs}
        results = await asyncio.gather(
            *(asyncio.wait_for(w.handle.stats.remote(), timeout=10) for _, w in refs), return_exceptions=True
        )
        out = []
        for (role, w), r in zip(refs, results):
            lost = w.worker_id in self.dead or w.worker_id in self.dead_prefills
            if isinstance(r, BaseException):
                if _actor_gone(r) and self.revivals.get(w.worker_id, 0) == asked[w.worker_id]:  # not stale
                    self.mark_lost(w.worker_id, f"{role} worker {w.worker_id} is gone: {type(r).__name__}")
                log.warning("stats of %s failed: %s", w.worker_id, r)
                r = WorkerStats(role if not self.colocated else "aggregated", w.worker_id, "", 0, 0, 0, 0, 0, 0)
                lost = True
            out.append(dataclasses.replace(r, state="lost" if lost else "serving",
                                           restarts=self.restarts.get(w.worker_id, 0)))
        return out



def _actor_gone(e: BaseException) -> bool:
    """Ray's errors for a dead actor, matched by name (the router does not import Ray)."""
    return any(type(x).__name__ in ("ActorDiedError", "RayActorError", "ActorUnavailableError")
               for x in (e, e.__cause__) if x is not None)
