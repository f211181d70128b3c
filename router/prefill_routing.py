"""Step 2 of a request's trip (router/dispatcher.py): where its prompt is computed.

  1. beside the reservation, where nothing about the choice needs it (`_prefill_early`:
     prefill.overlap_reserve, nobody waiting for KV room, no local prefill), the prompt goes at once
     and its destination follows (`_destine`);
  2. else, once reserved: on the decode worker that reserved (`_computes_here`: the part of the
     prompt not cached there is short, every live prefill worker is backed up, or none is left),
     or on the least-loaded live prefill worker (`_pick_prefill`, the prefix affinity's pick);
  3. the call (`_prefill`) counts its prompt tokens in that worker's load while it runs, bounded
     by the request's deadline; a prefill worker found gone is routed around from then on.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from engine.kv_handoff.types import KVDestination
from engine.types import PrefillRequest, PrefillResult
from router.admission import Turns
from router.config import LimitsConfig
from router.errors import WorkerFailure
from router.liveness import WorkerRef, _actor_gone
from router.policy import LeastLoadedPolicy

log = logging.getLogger(__name__)


class PrefillRouting:
    """Mixin of the Dispatcher: the state it reads is set up in Dispatcher.__init__."""

    prefills: list[WorkerRef]
    decodes: list[WorkerRef]
    dead_prefills: set[str]
    colocated: bool
    overlap_reserve: bool
    local_prefill_tokens: int
    local_prefill_queue_tokens: int
    limits: LimitsConfig
    policy: LeastLoadedPolicy
    turns: Turns

    if TYPE_CHECKING:  # the Dispatcher's own (prefill_lost: router/liveness.py's)
        @property
        def prefill_lost(self) -> bool: ...
        async def _wait(self, awaitable: Any, deadline: float, what: str) -> Any: ...

    def _prefill_early(self, moves: int, n_prompt: int) -> bool:
        """Step 2 beside step 1: does nothing about the prefill depend on the reservation, and is
        one likely at once (nobody waits for KV room)?"""
        return (self.overlap_reserve and not self.colocated and moves == 0 and self.local_prefill_tokens <= 0
                and not len(self.turns) and not self._computes_here(None, n_prompt))

    async def _destine(self, p_idx: int, key: str, dest: KVDestination) -> None:
        """Step 2's destination, for a prompt sent before it (its prefill call fails if the worker is gone)."""
        worker = self.prefills[p_idx]
        try:
            await asyncio.wait_for(worker.handle.destine.remote(key, dest), timeout=self.limits.request_timeout_s)
        except Exception as e:  # noqa: BLE001
            log.warning("destination of %s to prefill worker %s failed: %s", key, worker.worker_id, e)

    async def _cancel_prefill(self, p_idx: int, key: str) -> None:
        worker = self.prefills[p_idx]
        try:
            await asyncio.wait_for(worker.handle.cancel.remote(key), timeout=5)
        except Exception as e:  # noqa: BLE001
            log.warning("cancel %s on prefill worker %s failed: %s", key, worker.worker_id, e)

    def _computes_here(self, dest: KVDestination | None, n_prompt: int) -> bool:
        """Step 2: is the prompt's part not cached on the decode worker that reserved short enough
        for that worker to compute it itself, is every prefill worker backed up, or is none left?"""
        if self.prefill_lost:
            return True
        if self.local_prefill_queue_tokens > 0 and min(
                (self.policy.prefill[i].tokens for i, p in enumerate(self.prefills)
                 if p.worker_id not in self.dead_prefills), default=0) >= self.local_prefill_queue_tokens:
            return True
        if self.local_prefill_tokens <= 0:
            return False
        cached = dest.shared_tokens if dest is not None else 0
        return n_prompt - cached <= self.local_prefill_tokens

    async def _prefill(self, p_idx: int | None, d_idx: int | None, preq: PrefillRequest, work: int, deadline: float
                       ) -> PrefillResult:
        """On prefill worker p_idx (None: on decode worker d_idx itself); work: the prompt tokens the
        prefill worker will compute (its load meanwhile)."""
        assert p_idx is not None or d_idx is not None
        worker = self.prefills[p_idx] if p_idx is not None else self.decodes[d_idx]  # type: ignore[index]
        if p_idx is not None:
            self.policy.add(self.policy.prefill[p_idx], work)
        try:
            return await self._wait(worker.handle.prefill.remote(preq, _remaining(deadline)), deadline, "prefill")
        except WorkerFailure as e:
            if _actor_gone(e) and p_idx is not None and not self.colocated:  # later requests go elsewhere
                self.dead_prefills.add(worker.worker_id)
                log.error("prefill worker %s is gone; routing around it", worker.worker_id)
            raise
        finally:
            if p_idx is not None:
                self.policy.remove(self.policy.prefill[p_idx], work)

    def _pick_prefill(self, prompt: list[int], salt: str) -> tuple[int, int]:
        """(prefill worker index, the prompt tokens it will compute)."""
        pick = self.policy.pick_prefill({i for i, p in enumerate(self.prefills) if p.worker_id in self.dead_prefills},
                                        prompt, salt)
        if pick is None:
            raise WorkerFailure(f"all {len(self.prefills)} prefill workers are gone")
        return pick


def _remaining(deadline: float) -> float:
    return max(0.1, deadline - time.monotonic())
