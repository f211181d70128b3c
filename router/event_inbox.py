"""One request's decode events, from its decode worker's event pump (router/liveness.py) to the
request's coroutine (router/dispatcher.py).

take() returns every event waiting, merged into one: a router behind a fast decode worker sends
fewer, longer chunks (one detokenize, one message for several tokens) instead of falling further
behind. Waiting costs one future — no tasks, and one deadline timer for the request's whole life
(close() cancels it), not one per wait — because this runs once per message streamed.
"""
from __future__ import annotations

import asyncio
import time

from engine.types import DecodeEvent
from router.errors import DeadlineExceeded, WorkerFailure


class EventInbox:
    def __init__(self) -> None:
        self._events: list[DecodeEvent] = []
        self._waiter: asyncio.Future[None] | None = None
        self._failure: str | None = None
        self._timer: asyncio.TimerHandle | None = None  # wakes take() at its deadline
        self._timer_for: float | None = None  # ... that deadline

    def put(self, event: DecodeEvent) -> None:
        """From the event pump (or a lost worker's error)."""
        self._events.append(event)
        self._wake()

    def fail(self, why: str) -> None:
        """The router stops serving (abort_all): take() raises WorkerFailure(why) from now on."""
        self._failure = why
        self._wake()

    def close(self) -> None:
        """The request is done with this inbox: its deadline timer goes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_for = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def take(self, deadline: float) -> DecodeEvent:
        """The next events, merged: tokens and logprobs in order, up to and with the first that ends
        the request (finish or error). Raises WorkerFailure after fail(), DeadlineExceeded once
        time.monotonic() passes `deadline`."""
        loop = asyncio.get_running_loop()
        while True:
            if self._failure is not None:
                raise WorkerFailure(self._failure)
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("decode did not answer before the request deadline")
            if self._events:
                return self._merge()
            if self._timer_for != deadline:
                self.close()
                self._timer, self._timer_for = loop.call_later(left, self._wake), deadline
            self._waiter = fut = loop.create_future()
            try:
                await fut
            finally:
                self._waiter = None

    def _merge(self) -> DecodeEvent:
        n = next((i + 1 for i, e in enumerate(self._events) if e.finish_reason is not None or e.error is not None),
                 len(self._events))
        events, self._events = self._events[:n], self._events[n:]
        if len(events) == 1:
            return events[0]
        last = events[-1]
        lps = [lp for e in events for lp in e.logprobs or ()]
        return DecodeEvent(
            last.request_id, [t for e in events for t in e.token_ids], last.finish_reason, last.error,
            next((e.kv_transfer_ms for e in events if e.kv_transfer_ms is not None), None),
            next((e.kv_bytes for e in events if e.kv_bytes is not None), None),
            lps if any(e.logprobs is not None for e in events) else None,
        )
