"""The dispatcher with fake worker handles: admission queue, deadlines, cancellation (no Ray)."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.event_stream import EventBatch
from engine.kv_handoff.types import KVDestination
from engine.types import DecodeEvent, FinishReason, PrefillResult, ReserveResult, SamplingParams, TokenLogprob
from router.config import LimitsConfig
from router.dispatcher import AlreadyExists, DeadlineExceeded, WorkerRef, Dispatcher, ResourceExhausted, WorkerFailure
from router.validation import ValidRequest


class _Method:
    """Like a Ray actor method: the call runs to its end whether or not the caller still waits."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *a: Any) -> Any:
        return asyncio.shield(asyncio.ensure_future(self.fn(*a)))


class FakeDecode:
    def __init__(self, room: int) -> None:
        self.room, self.held, self.cancelled = room, set(), []
        self.events: asyncio.Queue[DecodeEvent] = asyncio.Queue()
        self.reserve, self.cancel, self.poll = _Method(self._reserve), _Method(self._cancel), _Method(self._poll)
        self.adopt, self.adopted = _Method(self._adopt), []

    async def _adopt(self, rid: str, prompt_ids: list[int], output_ids: list[int], *_: Any) -> ReserveResult:
        if rid in self.held:
            return ReserveResult(False, "already in use")
        self.held.add(rid)
        self.adopted.append((rid, list(output_ids)))
        return ReserveResult(True)

    async def _reserve(self, rid: str, *_: Any) -> ReserveResult:
        if len(self.held) >= self.room:
            return ReserveResult(False, "KV cache full")
        self.held.add(rid)
        return ReserveResult(True, dest=KVDestination("decode", ()))

    async def _cancel(self, rid: str) -> bool:
        self.cancelled.append(rid)
        self.held.discard(rid)
        return True

    async def _poll(self, timeout: float, *_: Any) -> EventBatch:
        try:
            return EventBatch("fake", 0, [await asyncio.wait_for(self.events.get(), timeout)])
        except asyncio.TimeoutError:
            return EventBatch("fake", 0, [])


class FakePrefill:
    """Answers after `delay`, and only once the prompt has a destination (sent with it, or by destine)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.prefill, self.cancel, self.destine = _Method(self._prefill), _Method(self._cancel), _Method(self._destine)
        self.dests: dict[str, asyncio.Future[Any]] = {}
        self.sent_without: list[str] = []  # prompts sent before their reservation
        self.cancelled: list[str] = []

    def _dest(self, rid: str) -> asyncio.Future[Any]:
        """rid's destination, pending or come (a request tried again gets a fresh one)."""
        f = self.dests.get(rid)
        if f is None or f.done():
            f = self.dests[rid] = asyncio.get_running_loop().create_future()
        return f

    async def _prefill(self, req: Any, timeout: float) -> PrefillResult:
        if req.dest is None:
            self.sent_without.append(req.request_id)
            dest = self.dests[req.request_id] = self.dests.get(req.request_id) or self._dest(req.request_id)
        else:
            dest = self._dest(req.request_id)
            dest.set_result(req.dest)
        await asyncio.sleep(self.delay)
        await asyncio.wait_for(asyncio.shield(dest), timeout)
        return PrefillResult(req.request_id, 5, None, 0.0, 1.0, 100)

    async def _destine(self, rid: str, dest: Any) -> None:
        self._dest(rid).set_result(dest)

    async def _cancel(self, rid: str) -> bool:
        self.cancelled.append(rid)
        return True


def _req(rid: str, key: str | None = None) -> ValidRequest:
    """The router mints `key` (what workers see); tests pick it: by default the client id itself."""
    return ValidRequest(rid, [1, 2, 3], SamplingParams(max_tokens=4), (), key or rid)


async def _collect(d: Dispatcher, rid: str, key: str | None = None) -> list[int]:
    return [t async for c in d.run(_req(rid, key)) for t in c.token_ids]


def _finish(dec: FakeDecode, rid: str) -> None:
    dec.held.discard(rid)
    dec.events.put_nowait(DecodeEvent(rid, [6, 7, 8], FinishReason.LENGTH))


def test_queued_request_runs_when_room_frees_and_times_out_otherwise() -> None:
    async def main() -> None:
        dec = FakeDecode(room=1)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill())], [WorkerRef("decode-1", dec)], (2,),
                       LimitsConfig(max_queued_requests=1, queue_timeout_s=0.3))
        d.start()
        first = asyncio.create_task(_collect(d, "a"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(_collect(d, "b"))  # queued behind a
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="wait queue is full"):
            await _collect(d, "c")  # the queue (1) is full
        _finish(dec, "a")
        assert await first == [5, 6, 7, 8]
        await asyncio.sleep(0.05)
        _finish(dec, "b")
        assert await second == [5, 6, 7, 8]
        dec.held.add("blocker")
        with pytest.raises(ResourceExhausted, match="queue_timeout_s=0.3"):
            await _collect(d, "d")
        await d.close()

    asyncio.run(main())


def test_deadline_cancels_on_the_decode_worker() -> None:
    async def main() -> None:
        dec = FakeDecode(room=4)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill())], [WorkerRef("decode-1", dec)], (2,), LimitsConfig(request_timeout_s=0.2))
        d.start()
        with pytest.raises(DeadlineExceeded):
            await _collect(d, "slow")  # decode never answers
        assert dec.cancelled == ["slow"] and not dec.held and d.in_flight == 0
        await d.close()

    asyncio.run(main())


def test_client_going_away_mid_prefill_cancels_everywhere() -> None:
    async def main() -> None:
        dec = FakeDecode(room=4)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill(delay=1.0))], [WorkerRef("decode-1", dec)], (2,), LimitsConfig())
        d.start()
        task = asyncio.create_task(_collect(d, "gone"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert dec.cancelled == ["gone"] and not dec.held and d.in_flight == 0 and not d.streams
        await d.close()

    asyncio.run(main())


class ActorDiedError(RuntimeError):  # stands in for ray.exceptions.ActorDiedError (matched by name)
    pass


def test_dead_decode_worker_fails_its_requests_and_is_skipped() -> None:
    async def main() -> None:
        dead, alive = FakeDecode(room=4), FakeDecode(room=4)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill())], [WorkerRef("decode-1", dead), WorkerRef("decode-2", alive)], (2,),
                       LimitsConfig(request_timeout_s=30, max_migrations=0))  # moving on: the tests below
        d.start()
        a = asyncio.create_task(_collect(d, "a"))
        b = asyncio.create_task(_collect(d, "b"))  # concurrent arrivals spread over both workers
        await asyncio.sleep(0.05)
        assert dead.held == {"a"} and alive.held == {"b"}

        async def died(*_: Any) -> EventBatch:
            raise ActorDiedError("The actor died unexpectedly")

        dead.poll = _Method(died)
        with pytest.raises(WorkerFailure, match="is gone"):
            await asyncio.wait_for(a, 2)
        _finish(alive, "b")
        assert await b == [5, 6, 7, 8]
        c = asyncio.create_task(_collect(d, "c"))
        await asyncio.sleep(0.05)
        assert "c" in alive.held and "c" not in dead.held
        _finish(alive, "c")
        await c
        await d.close()

    asyncio.run(main())


def test_a_duplicate_in_flight_id_is_refused_at_once_and_never_reaches_a_worker() -> None:
    async def main() -> None:
        dec = FakeDecode(room=4)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill(delay=0.3))], [WorkerRef("decode-1", dec)], (2,),
                       LimitsConfig())
        d.start()
        first = asyncio.create_task(_collect(d, "dup", key="k1"))
        await asyncio.sleep(0.05)
        with pytest.raises(AlreadyExists, match="dup"):
            await asyncio.wait_for(_collect(d, "dup", key="k2"), 0.1)  # at once, not after a queue wait
        assert dec.held == {"k1"}  # the second never reserved anything
        await asyncio.sleep(0.3)
        _finish(dec, "k1")
        assert await first == [5, 6, 7, 8]
        third = asyncio.create_task(_collect(d, "dup", key="k3"))  # the id is free again once the first ended
        await asyncio.sleep(0.05)
        assert dec.held == {"k3"}
        await asyncio.sleep(0.3)
        _finish(dec, "k3")
        assert await third == [5, 6, 7, 8]
        await d.close()

    asyncio.run(main())


def test_a_reserve_that_answers_after_the_request_is_gone_is_cancelled() -> None:
    """A client that leaves while its reservation is in flight must not leak the reservation."""
    async def main() -> None:
        dec = FakeDecode(room=4)
        slow = dec._reserve

        async def late_reserve(rid: str, *a: Any) -> ReserveResult:
            await asyncio.sleep(0.2)
            return await slow(rid, *a)

        dec.reserve = _Method(late_reserve)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill())], [WorkerRef("decode-1", dec)], (2,), LimitsConfig())
        d.start()
        task = asyncio.create_task(_collect(d, "gone"))
        await asyncio.sleep(0.05)
        task.cancel()  # mid-reserve
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.4)
        assert "gone" in dec.cancelled and not dec.held and d.in_flight == 0
        await d.close()

    asyncio.run(main())


def test_a_prefill_worker_dying_before_the_first_token_is_retried_once_elsewhere() -> None:
    """... on the other prefill worker; with none left, on the decode worker that reserved."""
    async def main() -> None:
        dec, dying, alive = FakeAggregated(room=4), FakePrefill(), FakePrefill()

        async def died(req: Any, timeout: float) -> PrefillResult:
            raise ActorDiedError("The actor died unexpectedly")

        dying.prefill = _Method(died)
        d = Dispatcher([WorkerRef("prefill-0", dying), WorkerRef("prefill-1", alive)], [WorkerRef("decode-1", dec)],
                       (2,), LimitsConfig())
        d.start()
        task = asyncio.create_task(_collect(d, "r"))
        await asyncio.sleep(0.05)
        _finish(dec, "r")
        assert await task == [5, 6, 7, 8]  # served through prefill-1, same reservation
        assert d.dead_prefills == {"prefill-0"} and dec.prefilled == []
        alive.prefill = _Method(died)  # prefill-1 dies too: the decode worker computes the prompt
        task = asyncio.create_task(_collect(d, "s"))
        await asyncio.sleep(0.05)
        _finish(dec, "s")
        assert await task == [5, 6, 7, 8] and dec.prefilled == ["s"] and d.local_prefills == 1
        assert d.dead_prefills == {"prefill-0", "prefill-1"} and d.serving
        d.mark_lost("decode-1", "gone")  # without a decode worker nothing is served
        assert not d.serving
        with pytest.raises(WorkerFailure, match="no live decode worker"):
            await _collect(d, "t")
        await d.close()

    asyncio.run(main())


class FakeDecodeBatch(FakeDecode):
    """poll() answers with every event waiting, as a decode worker's poll does."""

    async def _poll(self, timeout: float, *_: Any) -> EventBatch:
        first = await super()._poll(timeout)
        rest = []
        while not self.events.empty():
            rest.append(self.events.get_nowait())
        return EventBatch("fake", 0, first.events + rest)


def test_decode_events_waiting_for_a_request_reach_it_as_one_chunk_in_order() -> None:
    """A router behind its decode worker merges what is queued: one chunk (one detokenize, one message)
    with the tokens and logprobs in order and the last event's finish."""
    async def main() -> None:
        dec = FakeDecodeBatch(room=4)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill(delay=0.2))], [WorkerRef("decode-1", dec)], (2,), LimitsConfig())
        d.start()
        lp = lambda t: TokenLogprob(t, -0.5)  # noqa: E731
        for ids in ([6], [7, 8], [9]):  # all sent while the prompt is still prefilling
            dec.events.put_nowait(DecodeEvent("a", ids, logprobs=[lp(t) for t in ids]))
        dec.events.put_nowait(DecodeEvent("a", [10], FinishReason.LENGTH, logprobs=[lp(10)]))
        chunks = [c async for c in d.run(_req("a"))]
        assert [c.token_ids for c in chunks] == [[5], [6, 7, 8, 9, 10]]
        assert chunks[1].finish_reason is FinishReason.LENGTH
        assert [x.token_id for x in chunks[1].logprobs or []] == [6, 7, 8, 9, 10]
        await d.close()

    asyncio.run(main())


def test_tokens_merged_ahead_of_a_decode_error_are_streamed_before_the_failure() -> None:
    async def main() -> None:
        dec = FakeDecodeBatch(room=4)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill(delay=0.2))], [WorkerRef("decode-1", dec)], (2,), LimitsConfig())
        d.start()
        dec.events.put_nowait(DecodeEvent("b", [6, 7]))
        dec.events.put_nowait(DecodeEvent("b", [], error="step failed: boom"))
        got: list[list[int]] = []
        with pytest.raises(WorkerFailure, match="boom"):
            async for c in d.run(_req("b")):
                got.append(c.token_ids)
        assert got == [[5], [6, 7]] and "b" not in dec.cancelled  # the worker already dropped it
        await d.close()

    asyncio.run(main())


def test_abort_all_ends_a_request_waiting_for_decode_events_and_frees_its_kv() -> None:
    async def main() -> None:
        dec = FakeDecode(room=4)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill())], [WorkerRef("decode-1", dec)], (2,), LimitsConfig())
        d.start()
        task = asyncio.create_task(_collect(d, "waiting"))
        await asyncio.sleep(0.1)  # past its first token, waiting for the decode worker
        d.abort_all("server is shutting down")
        with pytest.raises(WorkerFailure, match="shutting down"):
            await task
        with pytest.raises(WorkerFailure, match="shutting down"):  # and so does one that starts later
            await _collect(d, "late")
        assert dec.cancelled == ["waiting", "late"] and not dec.held and d.in_flight == 0 and not d.streams
        await d.close()

    asyncio.run(main())


def test_a_request_whose_decode_worker_is_lost_moves_on_with_the_tokens_it_streamed() -> None:
    async def main() -> None:
        lost, other = FakeDecode(room=4), FakeDecode(room=4)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill())], [WorkerRef("decode-1", lost), WorkerRef("decode-2", other)],
                       (2,), LimitsConfig(request_timeout_s=30))
        d.start()
        a = asyncio.create_task(_collect(d, "a"))
        await asyncio.sleep(0.05)
        assert lost.held == {"a"}
        lost.events.put_nowait(DecodeEvent("a", [6]))  # streamed before the worker was lost
        await asyncio.sleep(0.1)
        d.mark_lost("decode-1", "decode worker decode-1 stopped answering")  # it may still be alive
        await asyncio.sleep(0.2)
        assert other.adopted == [("a", [5, 6])]  # the first token (prefill's) and the streamed one
        assert "a" in lost.cancelled  # told to stop, in case it lives on
        lost.events.put_nowait(DecodeEvent("a", [99]))  # a late event of the old worker: dropped
        await asyncio.sleep(0.1)
        other.events.put_nowait(DecodeEvent("a", [7, 8], FinishReason.LENGTH))
        assert await asyncio.wait_for(a, 2) == [5, 6, 7, 8]
        assert d.migrations == 1
        await d.close()

    asyncio.run(main())


def test_a_request_moves_at_most_max_migrations_times_and_waits_bounded_for_a_worker() -> None:
    async def main() -> None:
        one, two = FakeDecode(room=4), FakeDecode(room=4)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill())], [WorkerRef("decode-1", one), WorkerRef("decode-2", two)],
                       (2,), LimitsConfig(request_timeout_s=30, queue_timeout_s=0.5))
        d.start()
        a = asyncio.create_task(_collect(d, "a"))
        await asyncio.sleep(0.05)
        d.mark_lost("decode-1", "decode-1 lost")
        await asyncio.sleep(0.2)
        assert two.adopted == [("a", [5])]
        d.mark_lost("decode-2", "decode-2 lost")  # a second loss: max_migrations=1 is spent
        with pytest.raises(WorkerFailure, match="decode-2 lost"):
            await asyncio.wait_for(a, 2)
        d.revive("decode-1", restarted=True)
        b = asyncio.create_task(_collect(d, "b"))
        await asyncio.sleep(0.05)
        d.mark_lost("decode-1", "decode-1 lost again")  # and no live worker to move to
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(WorkerFailure, match="no decode worker took the request on within"):
            await asyncio.wait_for(b, 3)
        assert asyncio.get_running_loop().time() - t0 < 1.5  # queue_timeout_s bounds the wait
        await d.close()

    asyncio.run(main())


class ActorUnavailableError(RuntimeError):  # ray.exceptions.ActorUnavailableError, matched by name
    pass


def test_a_stats_answer_from_before_a_revive_does_not_mark_the_worker_lost_again() -> None:
    """Found by the device-fault test: a stats call made while decode-0 restarted answered 'the
    actor is restarting' just after the supervisor had revived it — and marked the new process
    lost, failing the requests that had just moved onto it."""
    async def main() -> None:
        dec, pre = FakeDecode(room=4), FakePrefill()
        gate = asyncio.Event()

        async def stale_stats() -> Any:
            await gate.wait()
            raise ActorUnavailableError("The actor is temporarily unavailable: The actor is restarting.")

        async def fine_stats() -> Any:
            from engine.types import WorkerStats
            return WorkerStats("prefill", "prefill-0", "n", 0, 0, 0, 1, 0, 0)

        dec.stats, pre.stats = _Method(stale_stats), _Method(fine_stats)  # type: ignore[attr-defined]
        d = Dispatcher([WorkerRef("prefill-0", pre)], [WorkerRef("decode-1", dec)], (2,), LimitsConfig())
        d.mark_lost("decode-1", "decode-1 lost")
        pending = asyncio.create_task(d.stats())  # asked while it restarts
        await asyncio.sleep(0.01)
        d.revive("decode-1", restarted=True)  # back before that call answers
        gate.set()
        await pending
        assert not d.is_lost("decode-1")
        await d.close()

    asyncio.run(main())


def test_a_hand_off_the_decode_side_failed_is_reserved_and_prefilled_again_elsewhere() -> None:
    """The decode worker holding a request's reservation is lost before the KV lands: the prefill
    says so (handoff_failed), and the request starts again on another decode worker — once per
    limits.max_migrations; any other prefill error fails it."""
    async def main() -> None:
        for handoff, max_migrations, ends in ((True, 1, "tokens"), (False, 1, "error"), (True, 0, "error")):
            lost, other = FakeDecode(room=4), FakeDecode(room=4)
            pre = FakePrefill()
            answers = [PrefillResult.failed("a", "KV hand-off refused: decode-1 is gone", handoff=handoff)]
            real = pre._prefill

            async def prefill(req: Any, timeout: float) -> PrefillResult:
                return answers.pop(0) if answers else await real(req, timeout)

            pre.prefill = _Method(prefill)
            d = Dispatcher([WorkerRef("prefill-0", pre)], [WorkerRef("decode-1", lost), WorkerRef("decode-2", other)],
                           (2,), LimitsConfig(request_timeout_s=30, max_migrations=max_migrations))
            d.start()
            a = asyncio.create_task(_collect(d, "a"))
            await asyncio.sleep(0.1)
            if ends == "tokens":
                assert "a" in lost.cancelled and "a" in other.held  # let go there, reserved here
                _finish(other, "a")
                assert await asyncio.wait_for(a, 2) == [5, 6, 7, 8]
            else:
                with pytest.raises(WorkerFailure, match="hand-off refused"):
                    await asyncio.wait_for(a, 2)
                assert not other.held
            assert d.policy.decode[0].tokens == 0 and d.policy.decode[1].tokens == 0  # loads not leaked
            await d.close()

    asyncio.run(main())


class FakeAggregated(FakeDecode):
    """Reserves, computes the prompt (prefill) and decodes: one worker."""

    def __init__(self, room: int, dies_in_prefill: bool = False) -> None:
        super().__init__(room)
        self.dies_in_prefill, self.prefilled = dies_in_prefill, []
        self.prefill = _Method(self._prefill)

    async def _prefill(self, req: Any, timeout: float) -> PrefillResult:
        if self.dies_in_prefill:
            raise ActorDiedError("The actor died unexpectedly")
        self.prefilled.append(req.request_id)
        return PrefillResult(req.request_id, 5, None, 0.0, 1.0, 0)


def test_an_aggregated_worker_lost_while_computing_the_prompt_costs_no_request() -> None:
    """mode: aggregated — the worker that reserved dies before the first token: the request starts
    again on the other worker (once per limits.max_migrations; 0: the old UNAVAILABLE)."""
    async def main() -> None:
        for max_migrations in (1, 0):
            lost, other = FakeAggregated(room=4, dies_in_prefill=True), FakeAggregated(room=4)
            workers = [WorkerRef("aggregated-0", lost), WorkerRef("aggregated-1", other)]
            d = Dispatcher(workers, workers, (2,), LimitsConfig(request_timeout_s=30, max_migrations=max_migrations),
                           colocated=True)
            d.start()
            run = d.run(_req("a"))
            if max_migrations == 0:
                with pytest.raises(WorkerFailure, match="aggregated-0 is gone"):
                    await asyncio.wait_for(run.__anext__(), 2)
            else:
                first = await asyncio.wait_for(run.__anext__(), 2)
                assert first.token_ids == [5] and first.timings["migrations"] == 1
                assert other.prefilled == ["a"] and "a" in lost.cancelled
                _finish(other, "a")
                assert [t async for c in run for t in c.token_ids] == [6, 7, 8]
            assert d.policy.decode[0].tokens == 0 and d.policy.decode[1].tokens == 0  # loads not leaked
            await d.close()

    asyncio.run(main())


class CountingPrefill(FakePrefill):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def _prefill(self, req: Any, timeout: float) -> PrefillResult:
        self.calls.append(req.request_id)
        return await super()._prefill(req, timeout)


class CachingDecode(FakeAggregated):
    """A decode worker whose reservations find `cached` prompt tokens in its prefix cache."""

    def __init__(self, room: int, cached: int, dies_in_prefill: bool = False) -> None:
        super().__init__(room, dies_in_prefill)
        self.cached = cached

    async def _reserve(self, rid: str, *_: Any) -> ReserveResult:
        r = await super()._reserve(rid)
        dest = KVDestination("decode", (), self.cached // 16, self.cached) if r.ok else None
        return ReserveResult(r.ok, r.reason, dest)


def _long_req(rid: str, n: int) -> ValidRequest:
    return ValidRequest(rid, list(range(3, 3 + n)), SamplingParams(max_tokens=4), (), rid)


def test_a_prompt_whose_uncached_part_is_short_is_computed_by_the_decode_worker_that_reserved() -> None:
    """local_prefill_tokens=32: 100 prompt tokens with 80 cached on the decode worker → 20 to
    compute, there; with 64 cached → 36, on the prefill worker; 0 (off) → always the prefill worker."""
    async def main() -> None:
        for limit, cached, here in ((32, 80, True), (32, 64, False), (0, 96, False)):
            pre, dec = CountingPrefill(), CachingDecode(room=4, cached=cached)
            d = Dispatcher([WorkerRef("prefill-0", pre)], [WorkerRef("decode-0", dec)], (2,), LimitsConfig(),
                           local_prefill_tokens=limit)
            d.start()
            run = d.run(_long_req("a", 100))
            first = await asyncio.wait_for(run.__anext__(), 2)
            assert first.token_ids == [5]
            assert (dec.prefilled, pre.calls) == ((["a"], []) if here else ([], ["a"]))
            assert first.timings.get("local_prefill", 0.0) == float(here) and d.local_prefills == int(here)
            _finish(dec, "a")
            assert [t async for c in run for t in c.token_ids] == [6, 7, 8]
            assert d.policy.decode[0].tokens == 0 and d.policy.prefill[0].tokens == 0
            await d.close()

    asyncio.run(main())


def test_while_every_prefill_worker_is_backed_up_prompts_of_any_length_are_computed_on_decode() -> None:
    """local_prefill_queue_tokens=150: two 100-token prompts in hand at the prefill worker (200 ≥ 150)
    → the third is computed by its decode worker; when one is done (100 < 150) prompts go to the
    prefill worker again. With the rule off (0), the third waits in the prefill queue."""
    class SlowPrefill(CountingPrefill):
        def __init__(self) -> None:
            super().__init__()
            self.go = asyncio.Event()

        async def _prefill(self, req: Any, timeout: float) -> PrefillResult:
            self.calls.append(req.request_id)
            await self.go.wait()
            return PrefillResult(req.request_id, 5, None, 0.0, 1.0, 100)

    async def main() -> None:
        for backlog, third_here in ((150, True), (0, False)):
            pre, dec = SlowPrefill(), CachingDecode(room=8, cached=0)
            d = Dispatcher([WorkerRef("prefill-0", pre)], [WorkerRef("decode-0", dec)], (2,), LimitsConfig(),
                           local_prefill_queue_tokens=backlog)
            d.start()
            runs = {rid: d.run(_long_req(rid, 100)) for rid in "abcd"}
            firsts = {rid: asyncio.ensure_future(runs[rid].__anext__()) for rid in "ab"}
            await asyncio.sleep(0.1)
            assert pre.calls == ["a", "b"] and d.policy.prefill[0].tokens == 200
            firsts["c"] = asyncio.ensure_future(runs["c"].__anext__())
            await asyncio.sleep(0.1)
            assert (dec.prefilled, pre.calls) == ((["c"], ["a", "b"]) if third_here else ([], ["a", "b", "c"]))
            pre.go.set()
            for rid in "abc":
                first = await asyncio.wait_for(firsts[rid], 2)
                assert first.timings.get("local_prefill", 0.0) == float(third_here and rid == "c")
            first = await asyncio.wait_for(runs["d"].__anext__(), 2)  # nothing in hand there now
            assert "d" in pre.calls and "d" not in dec.prefilled
            for rid in "abcd":
                _finish(dec, rid)
                assert [t async for c in runs[rid] for t in c.token_ids] == [6, 7, 8]
            assert d.policy.prefill[0].tokens == 0 and d.local_prefills == int(third_here)
            await d.close()

    asyncio.run(main())


def test_a_decode_worker_lost_while_computing_a_prompt_itself_costs_no_request() -> None:
    async def main() -> None:
        lost, other = CachingDecode(room=4, cached=96, dies_in_prefill=True), CachingDecode(room=4, cached=96)
        pre = CountingPrefill()
        d = Dispatcher([WorkerRef("prefill-0", pre)], [WorkerRef("decode-0", lost), WorkerRef("decode-1", other)],
                       (2,), LimitsConfig(request_timeout_s=30), local_prefill_tokens=16)
        d.start()
        run = d.run(_long_req("a", 100))
        first = await asyncio.wait_for(run.__anext__(), 2)
        assert first.token_ids == [5] and first.timings["migrations"] == 1
        assert other.prefilled == ["a"] and "a" in lost.cancelled and pre.calls == []
        _finish(other, "a")
        assert [t async for c in run for t in c.token_ids] == [6, 7, 8]
        assert d.policy.decode[0].tokens == 0 and d.policy.decode[1].tokens == 0
        await d.close()

    asyncio.run(main())


def test_a_finished_answer_is_credited_to_its_decode_worker_for_the_next_turn() -> None:
    """A decode worker keeps a finished request's prompt *and* answer KV (kv_cache.prefix_cache):
    the router's record of where prefixes are covers the answer too, so the next turn (prompt,
    answer, question) counts all of it as room there (and can be computed there)."""
    from router.prefix_affinity import PrefixAffinity

    async def main() -> None:
        dec0, dec1 = FakeDecode(room=4), FakeDecode(room=4)
        decodes = [WorkerRef("decode-0", dec0), WorkerRef("decode-1", dec1)]
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill())], decodes, (2,), LimitsConfig(),
                       decode_affinity=PrefixAffinity(16))
        d.start()
        prompt, answer = list(range(3, 43)), list(range(100, 140))  # 40 + 40 tokens
        run = d.run(ValidRequest("a", prompt, SamplingParams(max_tokens=41), (), "a"))
        assert (await asyncio.wait_for(run.__anext__(), 2)).token_ids == [5]
        held = "decode-0" if "a" in dec0.held else "decode-1"
        where = dec0 if held == "decode-0" else dec1
        where.held.discard("a")
        where.events.put_nowait(DecodeEvent("a", answer, FinishReason.LENGTH))
        assert [t async for c in run for t in c.token_ids] == answer
        aff = d.policy.decode_affinity
        assert aff is not None
        nxt = [*prompt, 5, *answer, 7, 8, 9]  # the first token, the answer, a question
        holder, reused = aff.holder(aff.digests(nxt))
        assert (d.decodes[holder].worker_id, reused) == (held, 80)  # 5 blocks: prompt, first token, answer
        await d.close()

    asyncio.run(main())


def test_an_id_reused_while_its_cancelled_request_is_still_leaving_is_served() -> None:
    """A client cancels and at once sends the same id again: the new call can reach the router
    before the old one's cancellation does (seen in the 1P1D cluster test). It waits a moment for
    the id instead of being refused."""
    async def main() -> None:
        dec = FakeDecode(room=4)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill())], [WorkerRef("decode-1", dec)], (2,), LimitsConfig())
        d.start()
        first = asyncio.create_task(_collect(d, "id", key="k1"))
        await asyncio.sleep(0.05)  # decoding
        second = asyncio.create_task(_collect(d, "id", key="k2"))  # the same id, before the cancel lands
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.sleep(0.1)
        assert "k2" in dec.held and "k1" not in dec.held
        _finish(dec, "k2")
        assert await asyncio.wait_for(second, 2) == [5, 6, 7, 8]
        await d.close()

    asyncio.run(main())


def test_tokens_the_adopting_worker_sends_before_its_adopt_answer_arrives_reach_the_client() -> None:
    """Found in a full-suite run: the adopting worker recomputed and sent its first token before the
    router had read its answer to `adopt`; the pump dropped that token as one from a worker the
    request is not placed on, and the client's answer lacked one token."""
    async def main() -> None:
        lost, other = FakeDecode(room=4), FakeDecode(room=4)
        real_adopt = other._adopt

        async def slow_adopt(rid: str, *a: Any) -> ReserveResult:
            r = await real_adopt(rid, *a)
            other.events.put_nowait(DecodeEvent(rid, [6]))  # decoding already
            await asyncio.sleep(0.3)  # the answer is slow to come back
            return r

        other.adopt = _Method(slow_adopt)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill())], [WorkerRef("decode-1", lost), WorkerRef("decode-2", other)],
                       (2,), LimitsConfig(request_timeout_s=30))
        d.start()
        a = asyncio.create_task(_collect(d, "a"))
        await asyncio.sleep(0.05)
        d.mark_lost("decode-1", "decode-1 lost")
        await asyncio.sleep(0.5)
        other.events.put_nowait(DecodeEvent("a", [7, 8], FinishReason.LENGTH))
        assert await asyncio.wait_for(a, 2) == [5, 6, 7, 8]
        await d.close()

    asyncio.run(main())


class SlowDecode(FakeDecode):
    """Reservations take `delay` to answer; `order` records when each call began and ended."""

    def __init__(self, room: int, delay: float, order: list[str]) -> None:
        super().__init__(room)
        self.delay, self.order = delay, order

    async def _reserve(self, rid: str, *_: Any) -> ReserveResult:
        self.order.append("reserve")
        await asyncio.sleep(self.delay)
        r = await super()._reserve(rid)
        self.order.append("reserved")
        return r


def test_the_prompt_is_sent_while_its_reservation_is_made_and_gets_its_destination_after() -> None:
    """Step 2 beside step 1: the prompt is on the prefill worker before the reservation answers,
    its destination follows by destine(), and the first token comes after max(reserve, prefill),
    not their sum. While a request waits for KV room, a new prompt waits for its reservation."""
    async def main() -> None:
        order: list[str] = []
        dec, pre = SlowDecode(room=1, delay=0.3, order=order), FakePrefill(delay=0.3)
        prefill = pre._prefill

        async def recorded(req: Any, timeout: float) -> PrefillResult:
            order.append("prefill")
            return await prefill(req, timeout)

        pre.prefill = _Method(recorded)
        d = Dispatcher([WorkerRef("prefill-0", pre)], [WorkerRef("decode-1", dec)], (2,), LimitsConfig(),
                       overlap_reserve=True)
        d.start()
        t0 = asyncio.get_running_loop().time()
        it = d.run(_req("a"))
        first = await it.__anext__()
        ttft = asyncio.get_running_loop().time() - t0
        assert first.token_ids == [5] and pre.sent_without == ["a"]
        assert order == ["reserve", "prefill", "reserved"] and ttft < 0.5  # serial: 0.6 s
        assert pre.dests["a"].result() == KVDestination("decode", ())
        queued = asyncio.create_task(_collect(d, "b"))  # no room until a finishes: it queues
        await asyncio.sleep(0.35)
        assert d.queued == 1
        third = asyncio.create_task(_collect(d, "c"))  # someone waits for room: c is not sent early
        await asyncio.sleep(0.05)
        _finish(dec, "a")
        assert [t async for c in it for t in c.token_ids] == [6, 7, 8]
        await asyncio.sleep(0.4)
        _finish(dec, "b")
        assert await queued == [5, 6, 7, 8]
        await asyncio.sleep(0.4)
        _finish(dec, "c")
        assert await third == [5, 6, 7, 8]
        assert pre.sent_without == ["a", "b"]  # b was sent early (nobody queued yet), c was not
        await d.close()

    asyncio.run(main())


def test_a_reservation_that_fails_cancels_the_prompt_sent_beside_it() -> None:
    async def main() -> None:
        dec, pre = FakeDecode(room=0), FakePrefill(delay=5)
        d = Dispatcher([WorkerRef("prefill-0", pre)], [WorkerRef("decode-1", dec)], (2,),
                       LimitsConfig(max_queued_requests=0), overlap_reserve=True)
        d.start()
        with pytest.raises(ResourceExhausted):
            await _collect(d, "full")
        await asyncio.sleep(0.05)
        assert pre.sent_without == ["full"] and pre.cancelled == ["full"]
        assert d.in_flight == 0 and d.policy.prefill[0].tokens == 0
        await d.close()

    asyncio.run(main())


@pytest.mark.parametrize("why", ["local_prefill_tokens", "overlap_reserve off"])
def test_the_prompt_waits_for_its_reservation_when_its_placement_needs_it_or_when_told(why: str) -> None:
    """local_prefill_tokens > 0: where the prompt goes depends on what the reservation found cached."""
    async def main() -> None:
        dec, pre = FakeDecode(room=4), FakePrefill()
        kw: dict[str, Any] = ({"local_prefill_tokens": 1, "overlap_reserve": True} if why == "local_prefill_tokens"
                              else {"overlap_reserve": False})
        d = Dispatcher([WorkerRef("prefill-0", pre)], [WorkerRef("decode-1", dec)], (2,), LimitsConfig(), **kw)
        d.start()
        task = asyncio.create_task(_collect(d, "r"))
        await asyncio.sleep(0.05)
        _finish(dec, "r")
        assert await task == [5, 6, 7, 8] and pre.sent_without == []
        await d.close()

    asyncio.run(main())


def test_a_reservation_refused_for_the_request_itself_fails_it_at_once() -> None:
    """A decode worker that cannot take the request whatever room frees (its grammar does not
    compile there) fails it with INVALID_ARGUMENT naming the field, not after limits.queue_timeout_s."""
    from router.errors import InvalidArgument

    async def main() -> None:
        dec = FakeDecode(room=4)

        async def refuse(rid: str, *_: Any) -> ReserveResult:
            return ReserveResult(False, "structured output: cannot compile it: bad", refused_field="structured")

        dec.reserve = _Method(refuse)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill())], [WorkerRef("decode-1", dec)], (2,),
                       LimitsConfig(queue_timeout_s=30))
        d.start()
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(InvalidArgument, match="decode worker decode-1: structured output") as e:
            await _collect(d, "a")
        assert e.value.field == "structured" and asyncio.get_running_loop().time() - t0 < 5
        await d.close()

    asyncio.run(main())


def test_a_prompt_a_prefill_worker_refuses_for_the_request_itself_fails_with_invalid_argument() -> None:
    """A prefill worker whose tokenizer cannot compile the request's grammar answers a refusal of the
    request itself: INVALID_ARGUMENT naming the field (not UNAVAILABLE, as a worker's failure), and
    the decode worker's reservation is let go."""
    from router.errors import InvalidArgument

    async def main() -> None:
        dec, pre = FakeDecode(room=4), FakePrefill()

        async def refuse(req: Any, timeout: float) -> PrefillResult:
            return PrefillResult.failed(req.request_id, "structured output: cannot compile it: bad",
                                        refused_field="structured")

        pre.prefill = _Method(refuse)
        d = Dispatcher([WorkerRef("prefill-0", pre)], [WorkerRef("decode-1", dec)], (2,), LimitsConfig())
        d.start()
        with pytest.raises(InvalidArgument, match="prefill worker: structured output") as e:
            await _collect(d, "a")
        assert e.value.field == "structured"
        for _ in range(200):  # the reservation is let go in the background
            if "a" in dec.cancelled:
                break
            await asyncio.sleep(0.01)
        assert "a" in dec.cancelled
        await d.close()

    asyncio.run(main())


def test_requests_waiting_for_kv_room_are_served_by_priority_then_arrival() -> None:
    """The decode worker has room for one request at a time. b (priority 5), c (5), d (0) and e (-1)
    queue in that order while a runs; each time room frees, the most urgent waiting one takes it:
    e, d, then b and c in arrival order. A new request of priority 5 does not try ahead of the
    queue; one more urgent than everyone queued does (it reserves at once when there is room)."""
    async def main() -> None:
        dec = FakeDecode(room=1)
        d = Dispatcher([WorkerRef("prefill-0", FakePrefill())], [WorkerRef("decode-1", dec)], (2,),
                       LimitsConfig(queue_timeout_s=30))
        d.start()
        reserved: list[str] = []
        reserve = dec._reserve

        async def recorded(rid: str, *a: Any) -> ReserveResult:
            r = await reserve(rid, *a)
            if r.ok:
                reserved.append(rid)
            return r

        dec.reserve = _Method(recorded)

        def run(rid: str, priority: int) -> asyncio.Task[list[int]]:
            req = ValidRequest(rid, [1, 2, 3], SamplingParams(max_tokens=4, priority=priority), (), rid)
            return asyncio.create_task(_tokens(d.run(req)))

        tasks = {"a": run("a", 0)}
        await asyncio.sleep(0.05)
        for rid, prio in (("b", 5), ("c", 5), ("d", 0), ("e", -1)):
            tasks[rid] = run(rid, prio)
            await asyncio.sleep(0.05)
        assert d.queued == 4 and reserved == ["a"]
        assert d.turns.ahead(5) and d.turns.ahead(-1) and not d.turns.ahead(-2)
        for running in ("a", "e", "d", "b", "c"):
            _finish(dec, running)
            assert await asyncio.wait_for(tasks[running], 5) == [5, 6, 7, 8]
            await asyncio.sleep(0.05)
        assert reserved == ["a", "e", "d", "b", "c"] and d.queued == 0
        await d.close()

    asyncio.run(main())


async def _tokens(chunks: Any) -> list[int]:
    return [t async for c in chunks for t in c.token_ids]


def test_turns_pass_by_ticket_and_a_cancelled_waiter_passes_its_turn_on() -> None:
    from router.admission import Turns

    async def main() -> None:
        turns, order = Turns(), []
        first = turns.enter(3)
        await turns.acquire(first)

        async def wait(t: tuple[int, int]) -> None:
            await turns.acquire(t)
            order.append(t)
            await asyncio.sleep(0.01)
            turns.release()

        tickets = [turns.enter(p) for p in (7, 3, 1, 3)]
        tasks = [asyncio.create_task(wait(t)) for t in tickets]
        await asyncio.sleep(0.01)
        assert turns.contested(first) and not turns.contested(turns.enter(0))  # (1, n) waits ahead of (3, 0)
        tasks[2].cancel()  # (1, …) gives up before its turn
        await asyncio.sleep(0.01)
        turns.release()
        await asyncio.gather(*[t for i, t in enumerate(tasks) if i != 2])
        assert order == [tickets[1], tickets[3], tickets[0]]  # 3 then 3 (arrival), then 7
        await turns.acquire(turns.enter(9))  # free again: taken at once

    asyncio.run(main())


def test_a_waiter_cancelled_while_the_turn_passes_ends_cancelled_and_leaves_the_turn_free() -> None:
    """The turn is released in the same tick a waiter is cancelled (its future is cancelled at once,
    before its task runs again): release skips it, and the waiter still ends with CancelledError,
    not an error from removing an entry already gone; the turn is free for the next."""
    from router.admission import Turns

    async def main() -> None:
        turns = Turns()
        await turns.acquire(turns.enter(0))
        waiter = asyncio.create_task(turns.acquire(turns.enter(1)))
        await asyncio.sleep(0.01)
        waiter.cancel()
        turns.release()  # before the waiter's task has run: its future is the one skipped
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.wait_for(turns.acquire(turns.enter(2)), 1)

    asyncio.run(main())
