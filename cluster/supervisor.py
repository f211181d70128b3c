"""Keeps the router's view of the workers true: lost workers fail fast, restarted ones come back.

Every `cluster.health_check_interval_s` the supervisor asks each worker for its boot id:
  1. no answer (dead, or Ray is restarting it): the router marks it lost — a lost decode worker's
     requests end with UNAVAILABLE at once, no new request is sent to a lost worker, and the prefill
     workers drop their links to a lost decode worker (letting go of its KV cache's memory);
  2. a new boot id (Ray restarted it, `cluster.max_restarts`): it reloaded the model; the launcher
     starts its loop and wires its hand-off pairs again (new pair names, so nothing of the old
     process is reused), then the router sends it traffic again and counts the restart;
  3. the same boot id while the router holds it lost (it was only slow, or a late error about its
     old process marked it): it serves again — wired again first if its links were dropped in 1.
     The probe is the judge: whatever marked a worker lost, a worker that answers with its wired
     boot id is taken back within one interval.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from cluster.launcher import Cluster, StartupError
from router.dispatcher import Dispatcher

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, cluster: Cluster, dispatcher: Dispatcher) -> None:
        self.cluster, self.dispatcher = cluster, dispatcher
        self.interval_s = cluster.cfg.cluster.health_check_interval_s
        self.lost: set[str] = set()
        self.forgotten: set[str] = set()  # lost decode workers whose links the prefill workers dropped

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except asyncio.CancelledError:
                if _cancelled_from_outside():
                    raise
                log.warning("a worker check was cancelled from within (a dying worker's call)")
            except Exception:  # noqa: BLE001 — the supervisor must outlive any one check
                log.exception("worker check failed")

    async def check(self) -> None:
        ids = list(self.cluster.workers)
        boots = await asyncio.gather(*(self._probe(self.cluster.workers[w]) for w in ids))
        for wid, boot in zip(ids, boots):
            restarted = False
            if boot is None:  # 1.
                if wid not in self.lost:
                    log.warning("worker %s does not answer: lost", wid)
                    self.lost.add(wid)
                    self.dispatcher.mark_lost(wid, f"worker {wid} is gone (no answer to its health probe)")
                    if await asyncio.to_thread(self.cluster.forget, wid, {w for w in ids if w not in self.lost}):
                        self.forgotten.add(wid)
                continue
            if boot != self.cluster.boots[wid]:  # 2.
                log.warning("worker %s restarted (boot %s): re-wiring", wid, boot)
                self.dispatcher.mark_lost(wid, f"worker {wid} restarted")
                self.lost.add(wid)
                live = {w for w in ids if w not in self.lost}
                try:
                    await asyncio.to_thread(self.cluster.rewire, wid, boot, live)
                except StartupError as e:
                    self.cluster.boots[wid] = ""  # not wired: the next check tries again
                    log.error("re-wiring %s failed (retried at the next check): %s", wid, e)
                    continue
                restarted = True
                self.forgotten.discard(wid)
            elif wid in self.forgotten:  # 3., but the prefill workers dropped their links to it
                try:
                    await asyncio.to_thread(self.cluster.reconnect, wid, {w for w in ids if w not in self.lost})
                except StartupError as e:
                    log.error("re-connecting %s failed (retried at the next check): %s", wid, e)
                    continue
                self.forgotten.discard(wid)
            if wid in self.lost or self.dispatcher.is_lost(wid):  # 2. or 3.
                self.lost.discard(wid)
                self.dispatcher.revive(wid, restarted)
                log.warning("worker %s serves again", wid)

    async def _probe(self, handle: Any) -> str | None:
        try:
            return await asyncio.wait_for(handle.ready.remote(), timeout=max(2.0, 2 * self.interval_s))
        except asyncio.CancelledError:
            if _cancelled_from_outside():
                raise
            return None  # Ray cancels the calls of an actor that died: no answer
        except Exception:  # noqa: BLE001 — any failure to answer is "not serving now"
            return None


def _cancelled_from_outside() -> bool:
    """Whether this task itself is being cancelled (the server stops), not an awaited call."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
