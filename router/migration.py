"""Step 5 of a request's trip (router/dispatcher.py): its decode worker was lost mid-stream.

  1. the lost worker is told to cancel it (it may only have looked lost: a probe timed out), and
     its late events are dropped by the pump (liveness.py delivers a request's events only from the
     worker it is placed on: from now on the worker being asked, else none)
  2. the live decode workers, most room first, are asked to `adopt` it: prompt ids, the tokens the
     client has (the prefill's first one included), sampling; the one that takes it recomputes the
     KV as after a preemption (decode_worker/scheduler.py) and decodes on from the last token
  3. none takes it: try again every 0.25 s — a restarted worker comes back, room frees up — until
     limits.queue_timeout_s or the request's deadline, then WorkerFailure
The request's load moves with it; the dispatcher counts the moves (`migrations`, a metric).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from router.config import LimitsConfig
from router.errors import DeadlineExceeded, InvalidArgument, WorkerFailure
from router.liveness import WorkerRef
from router.policy import LeastLoadedPolicy
from router.validation import ValidRequest

log = logging.getLogger(__name__)
NOWHERE = -1  # placement of a request between workers: events from any worker are dropped


class RequestMigration:
    """Mixin of the Dispatcher: the state it reads is set up in Dispatcher.__init__."""

    decodes: list[WorkerRef]
    dead: set[str]
    limits: LimitsConfig
    eos_token_ids: tuple[int, ...]
    policy: LeastLoadedPolicy
    migrations: int
    _placed: dict[str, int]
    _aborted: asyncio.Event

    if TYPE_CHECKING:  # the Dispatcher's own
        async def _wait(self, awaitable: Any, deadline: float, what: str) -> Any: ...
        def _undo_late_reserve(self, call: "asyncio.Future[Any]", d_idx: int, key: str) -> None: ...
        async def _cancel_decode(self, d_idx: int, rid: str) -> None: ...
        def _in_background(self, work: Any) -> None: ...

    async def _migrate(self, req: ValidRequest, old: int, out_ids: list[int], deadline: float, why: str) -> int:
        """The index of the decode worker that adopted the request (steps 1-3 above)."""
        key, kv_tokens = req.key, len(req.prompt_ids) + req.sampling.max_tokens
        self._in_background(self._cancel_decode(old, key))  # it may only have looked lost
        self._placed[key] = NOWHERE
        give_up = min(deadline, time.monotonic() + self.limits.queue_timeout_s)
        log.warning("%s: %s; moving it on with its %d tokens", key, why, len(out_ids))
        while True:
            reasons = []
            for i in self.policy.decode_order():
                d = self.decodes[i]
                if d.worker_id in self.dead:
                    continue
                self._placed[key] = i  # before asking: it may send tokens before its answer is read
                call = asyncio.ensure_future(d.handle.adopt.remote(
                    key, req.prompt_ids, out_ids, req.sampling, self.eos_token_ids, req.cache_salt))
                try:
                    r = await self._wait(asyncio.shield(call), min(deadline, time.monotonic() + 10), "adopt")
                except (DeadlineExceeded, WorkerFailure) as e:
                    self._placed[key] = NOWHERE
                    self._undo_late_reserve(call, i, key)
                    reasons.append(f"decode worker {d.worker_id}: {e}")
                    continue
                except BaseException:
                    self._placed[key] = NOWHERE
                    self._undo_late_reserve(call, i, key)
                    raise
                if r.ok:
                    self.policy.remove(self.policy.decode[old], kv_tokens)
                    self.policy.add(self.policy.decode[i], kv_tokens)
                    self.migrations += 1
                    return i
                self._placed[key] = NOWHERE
                if r.refused_field:  # the request itself: no other worker or wait changes it
                    raise InvalidArgument(r.refused_field, f"decode worker {d.worker_id}: {r.reason}")
                reasons.append(f"decode worker {d.worker_id}: {r.reason}")
            if time.monotonic() >= give_up or self._aborted.is_set():
                raise WorkerFailure(f"decode worker: {why}; no decode worker took the request on within "
                                    f"limits.queue_timeout_s={self.limits.queue_timeout_s:g}s: "
                                    + ("; ".join(reasons) or "none is live"))
            await asyncio.sleep(0.25)  # a restarted worker comes back; room frees up
