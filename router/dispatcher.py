"""One request's trip through the workers, from the router's side.

  1. reserve KV room on a decode worker (most room first); none has room → wait in a bounded FIFO
     queue until a request finishes somewhere (limits.max_queued_requests, queue_timeout_s), then
     ResourceExhausted (router/admission.py)
  2. prefill on the least-loaded prefill worker, with the reservation's destination
     (router/prefill_routing.py); its answer is the first token (TTFT). Where nothing about the choice needs the reservation (no request
     waits for KV room, `local_prefill_tokens` is off, a first try), the prompt is sent at once,
     beside step 1 (`overlap_reserve`), and the destination follows by the prefill worker's
     destine() as soon as the reservation is made: the prompt computes meanwhile, and TTFT loses
     one round trip (a reservation that fails cancels the prompt). A prefill worker found dead
     is skipped from then on and the request is
     tried once more on another one (the same reservation); a hand-off the decode side failed (its
     worker lost) starts again from 1 on another decode worker (counted as a migration). A prompt
     whose part not cached on that decode worker is at most `local_prefill_tokens` long (the
     reservation says how much is) is computed there instead: no prefill queue, no transfer; so is
     every prompt while every live prefill worker has `local_prefill_queue_tokens` prompt tokens or
     more in hand from this router (Dynamo's conditional disaggregation: a backlog there costs more
     TTFT than the prompt costs the decode batch), and while no prefill worker is alive (slower
     decode steps rather than refusals)
  3. decode events arrive over each decode worker's event stream (engine/event_stream.py; long-
     polled through Ray where it cannot be reached: router/liveness.py), fanned out by the
     request's key (minted by the router; a client id is only a label) into its inbox
     (router/event_inbox.py: what waits is merged into one chunk)
  4. every wait has the request's deadline (and ends early on abort_all, the drain); on any exit
     that is not a clean finish the request is cancelled on both workers so its KV comes back
  5. a decode worker lost mid-stream (its pump found it gone, or the supervisor marked it lost):
     the request moves to a live decode worker — the same one once restarted — which recomputes
     its KV from the prompt and the tokens streamed so far and goes on, at most
     limits.max_migrations times (router/migration.py)
With colocated=True (mode: aggregated) prefills[i] and decodes[i] are the same worker, and step 2
always goes to the worker that reserved; a worker lost before the first token (there, or on a
decode worker computing a prompt itself) starts the request again from 1 on another one (the same
one once restarted), counted as a migration. Workers are Ray actor handles
(`handle.method.remote(...)` returns an awaitable); tests may pass anything with the same shape.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine.types import FinishReason, PrefillRequest, PrefillResult, TokenLogprob
from router.admission import KVAdmission, Turns
from router.config import LimitsConfig
from router.errors import AlreadyExists, DeadlineExceeded, InvalidArgument, ResourceExhausted, WorkerFailure
from router.event_inbox import EventInbox
from router.liveness import WorkerLiveness, WorkerRef, _actor_gone
from router.migration import RequestMigration
from router.policy import LeastLoadedPolicy
from router.prefill_routing import PrefillRouting
from router.prefix_affinity import PrefixAffinity
from router.validation import ValidRequest

__all__ = ["AlreadyExists", "DeadlineExceeded", "Dispatcher", "ResourceExhausted", "TokenChunk", "WorkerFailure",
           "WorkerRef"]

log = logging.getLogger(__name__)
DUPLICATE_GRACE_TURNS = 5  # x 10 ms: how long a request id still in flight is waited for before ALREADY_EXISTS


@dataclass
class TokenChunk:
    """What the router learned about a request since the last chunk."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    timings: dict[str, float] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # the first chunk's, when asked for: prompt tokens 1..


class Dispatcher(KVAdmission, WorkerLiveness, RequestMigration, PrefillRouting):
    def __init__(
        self, prefills: list[WorkerRef], decodes: list[WorkerRef], eos_token_ids: tuple[int, ...], limits: LimitsConfig,
        colocated: bool = False, affinity: PrefixAffinity | None = None, decode_affinity: PrefixAffinity | None = None,
        local_prefill_tokens: int = 0, local_prefill_queue_tokens: int = 0, overlap_reserve: bool = False,
    ) -> None:
        """affinity: send a prompt where its prefix was sent before (prefill workers' prefix caches);
        decode_affinity: the same for decode (or aggregated) workers' reservations;
        local_prefill_tokens: decode.local_prefill_max_tokens, local_prefill_queue_tokens:
        decode.local_prefill_queue_tokens (step 2); overlap_reserve: prefill.overlap_reserve (step 2)."""
        if colocated and len(prefills) != len(decodes):
            raise ValueError("colocated workers: prefills[i] must be decodes[i]")
        self.prefills, self.decodes = prefills, decodes
        self.colocated = colocated
        self.local_prefill_tokens, self.local_prefill_queue_tokens = local_prefill_tokens, local_prefill_queue_tokens
        self.local_prefills = 0  # prompts computed by the decode worker that reserved (step 2)
        self.overlap_reserve = overlap_reserve
        self.eos_token_ids = eos_token_ids
        self.limits = limits
        self.policy = LeastLoadedPolicy(len(prefills), len(decodes), affinity, decode_affinity)
        self.streams: dict[str, EventInbox] = {}  # request key → its decode events
        self.in_flight = 0
        self.turns = Turns()  # the requests waiting for KV room (router/admission.py)
        self._capacity = asyncio.Condition()
        self._capacity_gen = 0  # bumped whenever a request leaves a decode worker
        self._pollers: dict[str, asyncio.Task[None]] = {}  # decode worker id → its event pump
        self.restarts: dict[str, int] = {}  # worker id → times it came back (revive)
        self.revivals: dict[str, int] = {}  # worker id → times revived (restarted or only looked lost)
        self.delivered: dict[str, tuple[str, int]] = {}  # decode worker id → (its event log, last frame delivered)
        self._placed: dict[str, int] = {}  # request key → decode index holding its KV
        self.labels: set[str] = set()  # client request ids in flight (duplicates are refused)
        self._cleanups: set[asyncio.Task[None]] = set()
        self._aborted = asyncio.Event()  # set by abort_all(): every wait ends with WorkerFailure
        self._abort_reason = ""
        self.dead: set[str] = set()  # decode worker ids whose actor is gone
        self.dead_prefills: set[str] = set()  # prefill worker ids whose actor is gone
        self.migrations = 0  # requests moved to another decode worker mid-stream (step 5)
        self._closing = False

    # -- decode event pump --------------------------------------------------------------------
    def start(self) -> None:
        for d in self.decodes:
            self._pollers[d.worker_id] = asyncio.create_task(self._pump(d))

    async def close(self) -> None:
        self._closing = True
        for t in [*self._pollers.values(), *self._cleanups]:
            t.cancel()
        await asyncio.gather(*self._pollers.values(), *self._cleanups, return_exceptions=True)

    def abort_all(self, why: str) -> None:
        """End every request in flight with `why` (UNAVAILABLE), whatever it waits for."""
        self._abort_reason = why
        self._aborted.set()
        for inbox in self.streams.values():
            inbox.fail(why)

    # -- one request ----------------------------------------------------------------------------
    async def run(self, req: ValidRequest) -> AsyncIterator[TokenChunk]:
        if self.in_flight >= self.limits.max_concurrent_requests:
            raise ResourceExhausted(
                f"{self.in_flight} requests in flight (limits.max_concurrent_requests="
                f"{self.limits.max_concurrent_requests}); retry later"
            )
        if not self.serving:
            raise WorkerFailure("no live decode worker")
        for _ in range(DUPLICATE_GRACE_TURNS):  # one cancelled just now may still be leaving
            if req.request_id not in self.labels:
                break
            await asyncio.sleep(0.01)
        else:  # refused before any worker sees it
            raise AlreadyExists(f"request_id {req.request_id!r} is already in flight")
        key = req.key
        t_accept = time.monotonic()
        deadline = t_accept + self.limits.request_timeout_s
        n_prompt = len(req.prompt_ids)
        kv_tokens = n_prompt + req.sampling.max_tokens
        self.in_flight += 1
        inbox = self.streams[key] = EventInbox()
        if self._aborted.is_set():
            inbox.fail(self._abort_reason)
        self.labels.add(req.request_id)
        d_idx: int | None = None
        p_used: int | None = None
        finished = False
        moves = 0  # prefills whose reservation was lost (hand-off failed on decode, aggregated worker gone): again
        failed_on: set[int] = set()  # decode (or aggregated) workers that lost this request's reservation
        try:
            while True:
                early: tuple[int, Any] | None = None  # (prefill worker, its prefill call): sent before the reservation
                if self._prefill_early(moves, n_prompt):
                    p_idx, work = self._pick_prefill(req.prompt_ids, req.cache_salt)
                    p_used = p_idx
                    early = p_idx, asyncio.ensure_future(self._prefill(
                        p_idx, None, PrefillRequest(key, req.prompt_ids, req.sampling, self.eos_token_ids, None,
                                                 req.cache_salt), work, deadline))
                try:
                    d_idx, dest = await self._reserve(req, deadline, failed_on)  # counted in the policy from here on
                except BaseException:
                    if early is not None:  # the prompt needs a destination it will not get
                        early[1].cancel()
                        early[1].add_done_callback(lambda t: t.cancelled() or t.exception())  # seen, not logged
                        self._in_background(self._cancel_prefill(early[0], key))
                    raise
                self._placed[key] = d_idx
                preq = PrefillRequest(key, req.prompt_ids, req.sampling, self.eos_token_ids, dest, req.cache_salt)
                for attempt in (1, 2):  # a prefill worker that dies before the first token: once more elsewhere
                    if early is not None:
                        (p_idx, call), early, here = early, None, False
                        self._in_background(self._destine(p_idx, key, dest))
                    else:
                        here = self.colocated or self._computes_here(dest, n_prompt)  # the decode worker computes it
                        if here:
                            p_idx, work = (d_idx, n_prompt) if self.colocated else (None, 0)
                        else:
                            p_idx, work = self._pick_prefill(req.prompt_ids, req.cache_salt)
                        call = self._prefill(p_idx, d_idx, preq, work, deadline)
                    p_used = p_idx
                    try:
                        res = await call
                        break
                    except WorkerFailure as e:
                        if here and _actor_gone(e):  # its reservation went with it: start again
                            role = "aggregated" if self.colocated else "decode"
                            res = PrefillResult.failed(key, f"{role} worker {self.decodes[d_idx].worker_id} "
                                                            f"is gone: {e}", handoff=True)
                            break
                        if attempt == 2 or here or not _actor_gone(e):
                            raise
                        log.warning("prefill of %s failed (%s); retrying on another prefill worker (or, none "
                                    "left, on its decode worker)", key, e)
                if res.error is None or not res.handoff_failed or moves >= self.limits.max_migrations:
                    break
                # the decode side failed the hand-off (its worker lost, its reservation gone; or the
                # aggregated worker computing the prompt was lost): the request starts again on a
                # worker with room (the prompt's KV is mostly in the prefill worker's prefix cache
                # now); the old reservation is let go
                log.warning("prefill of %s for decode worker %s failed (%s); reserving again", key,
                            self.decodes[d_idx].worker_id, res.error)
                moves += 1
                failed_on.add(d_idx)
                self.policy.remove(self.policy.decode[d_idx], kv_tokens)
                self._in_background(self._cancel_decode(d_idx, key))
                d_idx = None
                inbox.close()
                inbox = self.streams[key] = EventInbox()  # not the lost worker's event
                if self._aborted.is_set():
                    inbox.fail(self._abort_reason)
            if res.error is not None:
                where = f"prefill on {self.decodes[d_idx].worker_id}" if here else "prefill worker"
                if res.refused_field:  # the request itself: no other worker or retry changes it
                    raise InvalidArgument(res.refused_field, f"{where}: {res.error}")
                raise WorkerFailure(f"{where}: {res.error}")
            t_first = time.monotonic()
            timings = {"queue_ms": res.queue_ms, "prefill_ms": res.prefill_ms, "ttft_ms": (t_first - t_accept) * 1000,
                       "cached_tokens": float(res.cached_tokens)}
            if moves:
                timings["migrations"] = moves
            if here and not self.colocated:
                timings["local_prefill"] = 1.0
                self.local_prefills += 1
            first_lp = [res.first_logprob] if res.first_logprob is not None else None
            if res.finished is not None:  # the first token ended it: nothing for decode to do
                finished = True
                await self._cancel_decode(d_idx, key)
                yield TokenChunk([res.first_token], res.finished, _close(timings, t_first, t_accept), first_lp,
                                 res.prompt_logprobs)
                return
            yield TokenChunk([res.first_token], None, timings, first_lp, res.prompt_logprobs)
            out_ids = [res.first_token]  # what the client has: where a moved request goes on from
            while True:
                ev = await inbox.take(deadline)
                if ev.error is not None:
                    if ev.token_ids:  # what it sampled before the error still reaches the client
                        out_ids += ev.token_ids
                        yield TokenChunk(ev.token_ids, logprobs=ev.logprobs)
                    if ev.lost and timings.get("migrations", 0) < self.limits.max_migrations:
                        try:
                            d_idx = await self._migrate(req, d_idx, out_ids, deadline, ev.error)
                        except WorkerFailure:
                            finished = True  # nothing holds it: the lost worker was told to cancel it
                            raise
                        timings["migrations"] = timings.get("migrations", 0) + 1
                        continue
                    finished = True  # the worker already dropped it
                    raise WorkerFailure(f"decode worker: {ev.error}")
                if ev.kv_transfer_ms is not None:
                    timings["kv_transfer_ms"] = ev.kv_transfer_ms
                    timings["kv_transfer_bytes"] = float(ev.kv_bytes or 0)
                if ev.finish_reason is not None:
                    finished = True  # its worker keeps the KV of prompt and answer: credit it there
                    self.policy.placed([*req.prompt_ids, *out_ids, *ev.token_ids], req.cache_salt, d_idx)
                    yield TokenChunk(ev.token_ids, ev.finish_reason, _close(timings, t_first, t_accept), ev.logprobs)
                    return
                if ev.token_ids:
                    out_ids += ev.token_ids
                    yield TokenChunk(ev.token_ids, logprobs=ev.logprobs)
        finally:
            inbox.close()  # the one this request used last
            self.streams.pop(key, None)
            self._placed.pop(key, None)
            self.labels.discard(req.request_id)
            self.in_flight -= 1
            if d_idx is not None:
                self.policy.remove(self.policy.decode[d_idx], kv_tokens)
                if not finished:  # client gone, deadline, stop string, error: free the KV everywhere
                    await self._cancel_everywhere(d_idx, p_used, key)
                await self._capacity_changed()

    @property
    def queued(self) -> int:
        """Requests waiting for KV room."""
        return len(self.turns)

    def _in_background(self, work: Any) -> None:
        """Run a cleanup coroutine without waiting for it (close() cancels what is left)."""
        task = asyncio.ensure_future(work)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _wait(self, awaitable: Any, deadline: float, what: str) -> Any:
        """Every wait of a request: bounded by its deadline, and ended early by abort_all()."""
        task = asyncio.ensure_future(awaitable)
        aborted = asyncio.ensure_future(self._aborted.wait())
        try:
            done, _ = await asyncio.wait(
                {task, aborted}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            aborted.cancel()
        if task not in done:
            task.cancel()
            if aborted in done:
                raise WorkerFailure(self._abort_reason)
            raise DeadlineExceeded(f"{what} did not answer before the request deadline")
        try:
            return task.result()
        except (DeadlineExceeded, ResourceExhausted, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 — Ray raises RayActorError, RayTaskError, ...
            raise WorkerFailure(f"{what} failed: {type(e).__name__}: {e}") from e

    async def _cancel_decode(self, d_idx: int, rid: str) -> None:
        try:
            await asyncio.wait_for(self.decodes[d_idx].handle.cancel.remote(rid), timeout=5)
        except Exception as e:  # noqa: BLE001
            log.warning("cancel %s on decode worker %s failed: %s", rid, self.decodes[d_idx].worker_id, e)

    async def _cancel_everywhere(self, d_idx: int, p_idx: int | None, rid: str) -> None:
        # shielded: this runs while the handler is being cancelled (client went away)
        async def both() -> None:
            await self._cancel_decode(d_idx, rid)
            if p_idx is not None and not self.colocated:  # colocated: the decode cancel ended both
                await self._cancel_prefill(p_idx, rid)

        try:
            await asyncio.shield(asyncio.ensure_future(both()))
        except asyncio.CancelledError:
            pass

def _close(timings: dict[str, float], t_first: float, t_accept: float) -> dict[str, float]:
    now = time.monotonic()
    return {**timings, "decode_ms": (now - t_first) * 1000, "total_ms": (now - t_accept) * 1000}
