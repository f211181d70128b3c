"""One step shape for every worker: schedule → run → postprocess, on the worker's one loop thread.

The prefill, decode and aggregated workers differ only in what they schedule and what they do with
the logits. Each turn of the loop:
  1. wait        while there is nothing to schedule (or the last turn found nothing runnable) and
                 no news since: a caller that adds work calls nudge()
  2. schedule()  take cancels and arrivals in, pick this step's rows: decode rows first (one token
                 per running request, continuous batching), then prompt rows (chunks, Sarathi-Serve),
                 then chunks of preempted requests' KV being computed again
  3. run         one forward over all rows (ModelRunner.forward: CUDA graphs when the step's rows fit
                 a bucket, a prompt chunk's tokens a row each) → logits [rows, V], one row per SeqInput
  4. postprocess(step, logits)  sample; decode rows → tokens to their requests; completed prompts →
                 first token (handed off by a prefill worker, decoded next step by an aggregated one)
A step in flight (a worker that says a step may be, _launch): its forward and sampling are queued
on the device and the loop goes on before the host has its tokens. The next turn asks the worker
for a step that follows it (_follow: the same rows, each fed its token on the device); if there is
one, it is queued behind, and only then does the host wait for the first one's tokens and
postprocess them (_complete) — so the host's schedule, input copy and bookkeeping overlap the
device's forward instead of leaving it idle (vLLM's async scheduling, SGLang's overlap scheduler).
A row whose token depends on the tokens before it (penalties, a grammar: sampler.needs_history) is
sampled only once the step before is complete (_sample_behind): its forward is queued first, so the
host's history and grammar-mask work overlap it too. Anything else (news, a prompt) completes the
step in flight first.
A step that raises fails the requests it held (fail_step) and the loop goes on: one bad step never
leaves a caller waiting or stops the worker — unless the device itself is broken (a CUDA kernel
fault is sticky: every later step would fail too), or schedule() raised (the worker's bookkeeping
is in a state nothing planned for: a bug). Then the process exits at once, failing nothing
itself: Ray restarts it (cluster.max_restarts) and the router, finding the worker gone, moves its
decoding requests to a live decode worker (limits.max_migrations) or fails them, instead of a loop
thread that died silently and callers that wait for ever.

Public methods of a worker run on Ray's threads and take `self.lock` for bookkeeping; only the loop
thread touches the model and the KV cache.
"""
from __future__ import annotations

import abc
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.model_runner import ModelRunner, SeqInput

log = logging.getLogger(__name__)
DEVICE_LOST_EXIT = 70  # the worker process's exit status when its device is broken (EX_SOFTWARE)
LOOP_BROKEN_EXIT = 71  # ... when its schedule() raised (EX_OSERR: the worker's own state is unusable)


@dataclass
class InFlight:
    """A launched step whose tokens the host has not read yet; `sampled`: the worker's handle to its
    draw, None while that waits for the step before to complete (`logits`: what it will sample)."""

    step: Step
    sampled: Any = None
    logits: Any = None


@dataclass
class Step:
    """What one forward computes. Rows are `seqs`: the `decode` requests' rows first — one each,
    and one more for each of its `drafts` after it (speculative decoding: each draft is a one-token
    row at the next position, decode_worker/decode_rows.py) —, then the `prompts`' rows (prompt
    chunks), then the `recomputes`' rows (KV computed again on a decode or aggregated worker; their
    logits are not used), one each."""

    decode: list[Any] = field(default_factory=list)
    prompts: list[Any] = field(default_factory=list)
    seqs: list[SeqInput] = field(default_factory=list)
    recomputes: list[Any] = field(default_factory=list)
    drafts: list[list[int]] = field(default_factory=list)  # per decode request (none: no drafts in this step)
    scores: dict[int, list[Any]] = field(default_factory=dict)  # filled by the forward: row → its prompt logprobs

    def __post_init__(self) -> None:
        assert not self.drafts or len(self.drafts) == len(self.decode), "drafts: one list per decode request"
        assert len(self.seqs) == self.decode_rows + len(self.prompts) + len(self.recomputes), "one SeqInput per row"

    @property
    def decode_rows(self) -> int:
        return len(self.decode) + sum(len(d) for d in self.drafts)

    @property
    def prompt_rows(self) -> slice:
        return slice(self.decode_rows, self.decode_rows + len(self.prompts))


class StepLoop(abc.ABC):
    worker_id: str
    runner: ModelRunner

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards the worker's bookkeeping (schedulers, queues, waiters)
        self.wake = threading.Condition(self.lock)
        self._news = False  # set by nudge(): something may be schedulable now
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # forwards run
        # seconds the loop thread spent in each part of its turns (stats: where a step's time goes;
        # on CUDA "run" is mostly launching, and the wait for the device lands in postprocess's sampling)
        self.loop_s = {"idle": 0.0, "schedule": 0.0, "run": 0.0, "postprocess": 0.0}
        self._inflight: InFlight | None = None  # only the loop thread touches it
        self.steps_overlapped = 0  # steps launched behind one still in flight

    # -- each worker's part ---------------------------------------------------------------------
    @abc.abstractmethod
    def _idle(self) -> bool:
        """Called under `lock`: True when nothing can be scheduled until something changes."""

    def _idle_wait_s(self) -> float:
        """Longest idle wait; work that arrives through a method calls nudge() and ends it sooner."""
        return 0.05

    @abc.abstractmethod
    def _schedule(self) -> Step | None:
        """Step 2 (takes `lock` itself as needed): this step's rows, or None when none can run yet."""

    @abc.abstractmethod
    def _postprocess(self, step: Step, logits: torch.Tensor) -> None:
        """Step 4: logits [len(step.seqs), V] → tokens, events, answers."""

    @abc.abstractmethod
    def _fail_step(self, step: Step, error: str) -> None:
        """The step raised: end (with `error`) every request it held."""

    # -- steps in flight (a worker that overlaps host and device overrides these) ------------------
    def _may_launch(self, step: Step) -> bool:
        """Whether `step` (just scheduled, nothing in flight) may be launched and left in flight."""
        return False

    def _follow(self, prev: InFlight) -> Step | None:
        """Under no lock held: the step that follows `prev` while it is in flight (its rows fed from
        prev's tokens on the device), or None: complete prev first, then schedule as usual."""
        return None

    def _launch(self, step: Step, prev: InFlight | None) -> InFlight:
        """Queue step's forward (fed from prev when step follows it) and, unless it must wait for
        prev's tokens (then `sampled` is None), its sampling on the device."""
        raise NotImplementedError

    def _sample_behind(self, f: InFlight) -> None:
        """Queue f's sampling (f.sampled), now that the step before it has completed."""
        raise NotImplementedError

    def _complete(self, f: InFlight, behind: bool) -> None:
        """Wait for f's tokens and postprocess them (step 4 of a step that was in flight). behind:
        the step after f is in flight, and may still write into the blocks of f's rows."""
        raise NotImplementedError

    # -- the loop -------------------------------------------------------------------------------
    def nudge(self) -> None:
        """Caller holds `lock`: new work or a cancel; the loop looks at once."""
        self._news = True
        self.wake.notify()

    def start(self) -> None:
        """Start the step loop."""
        self._thread = threading.Thread(target=self._loop, name=f"{self.worker_id}-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.wake:
            self._stop = True
            self.wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        stalled = False  # the last turn found nothing runnable
        while True:
            with self.wake:  # 1. wait
                if self._stop:
                    return
                if self._inflight is None and not self._news and (stalled or self._idle()):
                    t = time.perf_counter()
                    self.wake.wait(self._idle_wait_s())
                    self.loop_s["idle"] += time.perf_counter() - t
                self._news = False
            t0 = time.perf_counter()
            prev, step = self._inflight, None
            try:
                if prev is not None:
                    step = self._follow(prev)
                if step is None:
                    self._drain()
                    t0 = time.perf_counter()
                    step = self._schedule()  # 2
            except Exception as e:  # noqa: BLE001 — nothing to fail it on: the state itself is wrong
                log.exception("%s: schedule failed", self.worker_id)
                self._exit(LOOP_BROKEN_EXIT, f"its schedule() raised {type(e).__name__}: {e}")
                return
            stalled = step is None
            t1 = time.perf_counter()
            self.loop_s["schedule"] += t1 - t0
            if step is None:
                continue
            try:
                if self._inflight is not None or self._may_launch(step):  # 3, left in flight
                    f = self._launch(step, self._inflight)
                    self.steps += 1
                    self.steps_overlapped += self._inflight is not None
                    self.loop_s["run"] += time.perf_counter() - t1
                    self._drain(behind=True)  # 4 of the step before, while this one runs
                    if f.sampled is None:  # its draw needs the tokens just read
                        t = time.perf_counter()
                        self._sample_behind(f)
                        self.loop_s["postprocess"] += time.perf_counter() - t
                    self._inflight = f
                    continue
                logits = self.runner.forward(step.seqs, scores=step.scores)  # 3. [rows, V]
                self.steps += 1
                t2 = time.perf_counter()
                self.loop_s["run"] += t2 - t1
                self._postprocess(step, logits)  # 4
                self.loop_s["postprocess"] += time.perf_counter() - t2
            except Exception as e:  # noqa: BLE001 — end what this step held, keep the worker alive
                self._drain()
                self._step_failed(step, e)

    def _drain(self, behind: bool = False) -> None:
        """Complete the step in flight, if any (4); a failure ends its requests only. behind: a
        later step was launched after it and is in flight now."""
        f, self._inflight = self._inflight, None
        if f is None:
            return
        t = time.perf_counter()
        try:
            self._complete(f, behind)
        except Exception as e:  # noqa: BLE001
            self._step_failed(f.step, e)
        self.loop_s["postprocess"] += time.perf_counter() - t

    def _step_failed(self, step: Step, e: Exception) -> None:
        log.exception("%s: step failed", self.worker_id, exc_info=e)
        if not self.runner.device_ok():  # not the step's fault: its requests may go on elsewhere
            self._device_lost(f"{type(e).__name__}: {e}")
        self._fail_step(step, f"step failed: {type(e).__name__}: {e}")

    def _device_lost(self, error: str) -> None:
        """The device no longer runs work: end this process (Ray restarts it with a fresh context)."""
        self._exit(DEVICE_LOST_EXIT, f"the device is broken after a failed step ({error})")

    def _exit(self, status: int, why: str) -> None:
        log.critical("%s: %s; exiting so the worker restarts", self.worker_id, why)
        logging.shutdown()
        os._exit(status)
