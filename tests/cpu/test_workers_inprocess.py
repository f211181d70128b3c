"""Prefill and decode workers wired in one process (no Ray): the hand-off over each backend.

Backends: ipc (direct write into the decode worker's cache), the fake two-sided channel with NCCL's
semantics (a send waits for its receive), and real gloo pairs over loopback.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from decode_worker.config import DecodeConfig
from decode_worker.worker import DecodeWorker
from engine.config import KVCacheConfig, ModelConfig, TransportConfig
from engine.kv_handoff import Backend, FakeHub, KVDestination, SocketPeer, TransferError
from engine.kv_handoff import sender as sender_mod
from engine.tiny import tiny_tokenizer
from engine.types import FinishReason, PrefillRequest, SamplingParams
from prefill_worker.config import PrefillConfig
from prefill_worker.worker import PrefillWorker
from tests.cpu.harness import hf_greedy, prompts

EOS = (2,)


def wire(pw: PrefillWorker, dw: DecodeWorker, kind: str, hub: FakeHub | None = None) -> None:
    """What the launcher does for one pair, in-process: ipc | fake | gloo. The prefill worker calls
    the decode worker over its control socket, with the worker itself behind it (Ray's place)."""
    ep = dw.endpoint("127.0.0.1")
    assert ep.control is not None
    peer = SocketPeer(ep.control, dw)
    if kind == "ipc":
        dw.accept(pw.worker_id, Backend.IPC)
        pw.connect(ep, peer, Backend.IPC)
    elif kind == "fake":
        assert hub is not None
        pair = f"{pw.worker_id}>{dw.worker_id}"
        dw.accept(pw.worker_id, Backend.GLOO, hub.channel(pair, 1))
        pw.connect(ep, peer, Backend.GLOO, hub.channel(pair, 0))
    else:  # both sides open the gloo pair at once, as the launcher's parallel calls do
        t = threading.Thread(target=dw.accept, args=(pw.worker_id, Backend.GLOO))
        t.start()
        pw.connect(ep, peer, Backend.GLOO)
        t.join(10)


@contextmanager
def running_pair(*args: Any, **kwargs: Any) -> Iterator[tuple[PrefillWorker, DecodeWorker, FakeHub, "Events"]]:
    """make_pair() plus the router's event pump; everything stopped on the way out."""
    pw, dw, hub = make_pair(*args, **kwargs)
    events = Events(dw)
    try:
        yield pw, dw, hub, events
    finally:
        events.close()
        pw.shutdown()
        dw.shutdown()


def make_pair(
    kind: str, chunked: bool = False, timeout_s: float = 10, on_failure: str = "fail", decode: DecodeConfig | None = None,
) -> tuple[PrefillWorker, DecodeWorker, FakeHub]:
    mc, tc, hub = ModelConfig(path="tiny"), TransportConfig(timeout_s=timeout_s, on_failure=on_failure), FakeHub()
    pcfg = PrefillConfig(chunk_tokens=16, max_batch_tokens=48) if chunked else PrefillConfig(chunk_tokens=2048)
    pw = PrefillWorker("p0", mc, pcfg, tc, block_size=16)
    dw = DecodeWorker("d0", mc, KVCacheConfig(num_blocks=512), decode or DecodeConfig(), tc)
    pw.start()
    dw.start()
    wire(pw, dw, kind, hub)
    return pw, dw, hub


@pytest.fixture(scope="module", params=["ipc-whole", "fake-chunked", "gloo-whole"])
def pair(request):  # type: ignore[no-untyped-def]
    kind, shape = request.param.split("-")
    pw, dw, hub = make_pair(kind, chunked=shape == "chunked")
    events = Events(dw)
    yield pw, dw, hub, events
    events.close()
    pw.shutdown()
    dw.shutdown()


class Events:
    """Plays the router's part: one thread long-polls the decode worker and files events by request."""

    def __init__(self, dw: DecodeWorker) -> None:
        self.dw, self.by_id, self.cv, self.stop = dw, defaultdict(list), threading.Condition(), False
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)  # a daemon thread alive at interpreter exit aborts the process

    def _pump(self) -> None:
        log, acked = "", 0
        while not self.stop:
            batch = self.dw.poll(0.05, log, acked)
            log, acked = batch.log, batch.seq
            with self.cv:
                for ev in batch.events:
                    self.by_id[ev.request_id].append(ev)
                self.cv.notify_all()

    def take(self, rid: str, timeout: float = 30) -> list:  # type: ignore[type-arg]
        """Events of `rid` up to and including the one that finishes it."""
        with self.cv:
            assert self.cv.wait_for(lambda: any(e.finish_reason for e in self.by_id[rid]), timeout), rid
            return self.by_id.pop(rid)


def _run(pair: Any, rid: str, ids: list[int], sp: SamplingParams) -> tuple[list[int], str]:
    """The router's part for one request: reserve → prefill (with the destination) → events."""
    pw, dw, _, events = pair
    r = dw.reserve(rid, len(ids), sp, EOS, ids)
    assert r.ok and r.dest is not None and r.dest.worker_id == dw.worker_id
    res = pw.prefill(PrefillRequest(rid, ids, sp, EOS, r.dest))
    if res.error is not None:
        dw.cancel(rid)
        return [], f"error: {res.error}"
    if res.finished is not None:
        dw.cancel(rid)
        return [res.first_token], res.finished.value
    evs = events.take(rid)
    if evs[-1].error:
        return [], f"error: {evs[-1].error}"
    return [res.first_token] + [t for e in evs for t in e.token_ids], evs[-1].finish_reason.value


def _idle(*workers: Any) -> bool:
    end = time.monotonic() + 5
    while time.monotonic() < end:
        if all(w.check_idle() for w in workers):
            return True
        time.sleep(0.02)
    return False


def test_concurrent_requests_equal_hf(pair) -> None:  # type: ignore[no-untyped-def]
    pw, dw, hub, _ = pair
    tok = tiny_tokenizer()
    ps = prompts(12, seed=6)
    sp = SamplingParams(max_tokens=20)
    with cf.ThreadPoolExecutor(12) as ex:
        outs = list(ex.map(lambda ip: _run(pair, f"c{ip[0]}", tok(ip[1])["input_ids"], sp), enumerate(ps)))
    for p, (toks, _) in zip(ps, outs):
        assert toks == hf_greedy(p, 20)
    assert dw.prompt_tokens_computed == 0
    assert dw.receiver.bytes_received > 0 and pw.sender.bytes_sent == dw.receiver.bytes_received
    peer = pw.sender.links["d0"].peer  # every grant was asked for over the control socket
    assert isinstance(peer, SocketPeer) and peer.socket_calls >= 12 and peer.fallback_calls == 0
    assert dw.control is not None and dw.control.calls == peer.socket_calls
    assert _idle(dw, pw)


def test_a_prompt_sharing_a_prefix_with_an_earlier_one_computes_only_the_rest_and_equals_hf(pair) -> None:  # type: ignore[no-untyped-def]
    """The prefill worker's prefix cache: the second prompt's first 5 blocks (80 tokens) are the
    first's; it computes only its own tokens — in one go or in chunks after the cached ones — and
    the tokens are still HF's."""
    pw, dw, hub, _ = pair
    tok = tiny_tokenizer()
    system = "You are a terse assistant. Answer in one line. Context: the river runs past the old mill. "
    first, second = system + "Where is the mill?", system[:80] + "Who built the mill, and when?"
    sp = SamplingParams(max_tokens=12)
    assert _run(pair, "pfx-a", tok(first)["input_ids"], sp)[0] == hf_greedy(first, 12)
    hits, computed = pw.allocator.hit_tokens, pw.prompt_tokens_computed
    received, shared = dw.receiver.bytes_received, dw.allocator.hit_tokens
    ids = tok(second)["input_ids"]
    assert _run(pair, "pfx-b", ids, sp)[0] == hf_greedy(second, 12)
    assert pw.allocator.hit_tokens - hits == 80
    assert pw.prompt_tokens_computed - computed == len(ids) - 80
    # the decode worker kept the first prompt's blocks: the second holds them, only the rest is sent
    assert dw.allocator.hit_tokens - shared == 80
    assert dw.receiver.bytes_received - received == (-(-len(ids) // 16) - 5) * pw.sender.block_bytes
    assert _idle(dw, pw)
    pw.allocator.check()


def test_first_token_can_end_the_request_without_a_handoff(pair) -> None:  # type: ignore[no-untyped-def]
    pw, dw, hub, _ = pair
    before = dw.receiver.bytes_received
    toks, reason = _run(pair, "one", [5, 6, 7], SamplingParams(max_tokens=1))
    assert len(toks) == 1 and reason == FinishReason.LENGTH.value
    assert dw.receiver.bytes_received == before
    assert _idle(dw, pw)


def test_a_prompt_sent_before_its_reservation_is_handed_off_once_its_destination_comes(pair) -> None:  # type: ignore[no-untyped-def]
    """The router reserves while the prompt computes (router/dispatcher.py, step 2): the prompt
    comes with no destination and waits, computed, for destine(); a destination may also come
    before the prompt is computed, or before the prompt itself. Tokens == HF generate."""
    pw, dw, _, events = pair
    tok = tiny_tokenizer()
    sp = SamplingParams(max_tokens=12)
    ps = [tok(p)["input_ids"] for p in prompts(3, seed=11)]
    want = [hf_greedy(p, 12) for p in prompts(3, seed=11)]
    for i, ids in enumerate(ps):
        rid = f"late{i}"
        with cf.ThreadPoolExecutor(1) as ex:
            if i == 2:  # the destination first
                r = dw.reserve(rid, len(ids), sp, EOS, ids)
                pw.destine(rid, r.dest)
            answer = ex.submit(pw.prefill, PrefillRequest(rid, ids, sp, EOS, None))
            if i == 0:  # the prompt computed first
                assert _wait(lambda: rid in pw._parked, 10)
                assert not answer.done() and pw.allocator.num_used > 0  # its scratch KV waits with it
                assert pw.stats().extra["parked"] == 1
            if i < 2:
                r = dw.reserve(rid, len(ids), sp, EOS, ids)
                pw.destine(rid, r.dest)
            res = answer.result(30)
        assert res.error is None, res.error
        evs = events.take(rid)
        assert [res.first_token] + [t for e in evs for t in e.token_ids] == want[i]
    assert _idle(pw, dw) and not pw._parked and not pw._dests


def test_a_prompt_waiting_for_its_destination_is_cancelled_with_its_scratch_blocks(pair) -> None:  # type: ignore[no-untyped-def]
    """The reservation failed (the router cancels the prompt; its cancel may even run before the
    prompt comes), or the caller's deadline passed: the prompt's caller is answered and its scratch
    blocks come back."""
    pw, dw, _, _ = pair
    ids = tiny_tokenizer()(prompts(1, seed=12)[0])["input_ids"]
    sp = SamplingParams(max_tokens=4)
    with cf.ThreadPoolExecutor(1) as ex:
        answer = ex.submit(pw.prefill, PrefillRequest("nodest", ids, sp, EOS, None))
        assert _wait(lambda: "nodest" in pw._parked, 10)
        assert pw.cancel("nodest")
        assert answer.result(10).error == "cancelled"
    assert not pw.cancel("early")  # the router's cancel ran before its prompt (the actor's threads race)
    assert pw.prefill(PrefillRequest("early", ids, sp, EOS, None), timeout_s=30).error == "cancelled"
    prefilled = pw._prefilled

    def cancelled_meanwhile(p: Any, *a: Any) -> None:  # the cancel lands while the first token is sampled
        pw.cancel(p.request.request_id)
        prefilled(p, *a)

    pw._prefilled = cancelled_meanwhile  # type: ignore[method-assign]
    try:
        assert pw.prefill(PrefillRequest("mid", ids, sp, EOS, None), timeout_s=10).error == "cancelled"
    finally:
        del pw._prefilled
    forward = pw.runner.forward

    def cancelled_in_forward(*a: Any, **k: Any) -> Any:  # the cancel lands while its forward runs
        pw.cancel("fwd")
        return forward(*a, **k)

    pw.runner.forward = cancelled_in_forward  # type: ignore[method-assign]
    try:
        assert pw.prefill(PrefillRequest("fwd", ids, sp, EOS, None), timeout_s=10).error == "cancelled"
        assert _wait(lambda: pw.allocator.num_used == 0, 5) and not pw._parked  # not parked for a destination
    finally:
        del pw.runner.forward
    late = pw.prefill(PrefillRequest("slow", ids, sp, EOS, None), timeout_s=0.5)
    assert (late.error or "").startswith("prefill did not finish within")
    pw.destine("slow", KVDestination(dw.worker_id, ()))  # too late: no prompt takes it
    assert _idle(pw, dw) and not pw._parked


@pytest.mark.parametrize("kind", ["ipc", "fake", "gloo"])
def test_a_write_landing_on_an_idle_decode_worker_wakes_its_loop(kind: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An idle decode loop sleeps until something nudges it. A two-sided write used to land without
    a nudge, so its request waited out the sleep (up to 50 ms per hand-off on an idle worker,
    `bench/handoff.py`: 40 ms for a 10-token prompt over gloo). Here the sleep is a minute: the
    request must still finish at once."""
    monkeypatch.setattr(DecodeWorker, "_idle_wait_s", lambda self: 60.0)
    with running_pair(kind) as p:
        pw, dw, _, events = p
        assert _idle(dw, pw)
        time.sleep(0.1)  # the decode loop is asleep now, for a minute
        ids = [5, 6, 7, 8, 9]
        r = dw.reserve("idle", len(ids), SamplingParams(max_tokens=3), EOS, ids)
        assert r.ok and r.dest is not None
        res = pw.prefill(PrefillRequest("idle", ids, SamplingParams(max_tokens=3), EOS, r.dest))
        assert res.error is None
        evs = events.take("idle", timeout=20)
        assert evs[-1].finish_reason is FinishReason.LENGTH, evs[-1]


def test_a_failing_decode_step_ends_its_requests_with_an_error(pair) -> None:  # type: ignore[no-untyped-def]
    pw, dw, hub, events = pair
    real = dw.runner.forward

    def broken(seqs, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated kernel failure")

    dw.runner.forward = broken
    try:
        toks, reason = _run(pair, "boom", [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True))
        assert reason.startswith("error") and "simulated kernel failure" in reason
    finally:
        dw.runner.forward = real
    assert _idle(dw)
    toks, _ = _run(pair, "after-boom", [5, 6, 7], SamplingParams(max_tokens=4))  # the worker lives on
    assert len(toks) == 4 or toks[-1] == 2


def test_a_prompt_waiting_for_scratch_blocks_waits_without_spinning_and_starts_once_they_free() -> None:
    """The prefill loop used to re-schedule in a tight loop while no prompt could be admitted (its
    scratch blocks still being handed off), taking a core from the sender thread that frees them."""
    with running_pair("ipc") as (pw, dw, hub, events):
        with pw.lock:  # every scratch block held, as by hand-offs in flight
            assert pw.allocator.allocate("hog", pw.allocator.num_blocks * pw.allocator.block_size) is not None
        calls = []
        real_next_step = pw.prompts.scheduler.next_step

        def counting(*a: Any, **kw: Any) -> Any:
            calls.append(time.monotonic())
            return real_next_step(*a, **kw)

        pw.prompts.scheduler.next_step = counting  # type: ignore[method-assign]
        ids = tiny_tokenizer()(prompts(1, seed=3)[0])["input_ids"]
        sp = SamplingParams(max_tokens=6)
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(_run, (pw, dw, hub, events), "starved", ids, sp)
            time.sleep(1.0)
            assert not fut.done()
            stalled_calls = len(calls)
            pw._release("hog", 0)  # what the sender does when a hand-off ends
            released = time.monotonic()
            toks, _ = fut.result(timeout=30)
        assert stalled_calls <= 40, f"{stalled_calls} schedules in 1 s while nothing could be admitted"
        assert calls[stalled_calls] - released < 0.02  # the release woke the loop
        assert toks == hf_greedy(prompts(1, seed=3)[0], 6)


@pytest.mark.parametrize("kind", ["fake", "gloo"])
def test_a_failed_send_fails_one_request_and_the_pair_serves_the_next(kind: str) -> None:
    with running_pair(kind, timeout_s=3) as (pw, dw, hub, events):
        link = pw.sender.links["d0"]
        assert link.channel is not None
        real_send = link.channel.send
        calls = []

        def fail_once(t, timeout_s):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) == 1:
                raise TransferError("injected: connection reset")
            return real_send(t, timeout_s)

        link.channel.send = fail_once  # type: ignore[method-assign]
        tok = tiny_tokenizer()
        p = prompts(3, seed=2)[2]
        ids = tok(p)["input_ids"]
        sp = SamplingParams(max_tokens=8)
        t0 = time.monotonic()
        toks, reason = _run((pw, dw, hub, events), "lost", ids, sp)
        assert reason.startswith("error: KV hand-off failed")  # the sender's error, or the peer's view of it
        assert time.monotonic() - t0 < 3  # failed at once, not at the transfer timeout
        before = link.channel.epoch
        toks, reason = _run((pw, dw, hub, events), "next", ids, sp)
        assert toks == hf_greedy(p, 8), reason
        assert link.channel.epoch > before  # the pair was re-opened under a new epoch
        assert _idle(dw, pw)


def test_a_send_that_times_out_fails_its_request_and_the_next_succeeds() -> None:
    with running_pair("fake", timeout_s=1.0) as (pw, dw, hub, events):
        link = pw.sender.links["d0"]
        assert link.channel is not None
        real_send, calls = link.channel.send, []

        def stall_once(t, timeout_s):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) == 1:  # a lost transfer: nothing arrives, the sender gives up late
                time.sleep(timeout_s + 0.3)
                raise TransferError("injected: send timed out")
            return real_send(t, timeout_s)

        link.channel.send = stall_once  # type: ignore[method-assign]
        sp = SamplingParams(max_tokens=6)
        toks, reason = _run((pw, dw, hub, events), "slow", [5, 6, 7, 8], sp)
        assert reason.startswith("error") and ("timed out" in reason or "did not land" in reason)
        toks, reason = _run((pw, dw, hub, events), "fine", [5, 6, 7, 8], sp)
        assert reason in ("length", "stop") and len(toks) >= 1
        assert _idle(dw, pw)


def test_fake_channel_has_nccl_semantics_send_before_announce_fails_not_hangs() -> None:
    """The old order (send, then tell the decode worker) deadlocks under NCCL: the send waits for a
    receive that is posted only after the notice. The fake reproduces it, as a failure within the
    timeout instead of a hang."""
    with running_pair("fake", timeout_s=1.0) as (pw, dw, hub, events):
        try:
            link = pw.sender.links["d0"]

            def old_order(job):  # type: ignore[no-untyped-def]
                import torch
                from engine.kv_handoff import WriteIntent

                idx = torch.tensor(job.src_blocks[: -(-job.num_tokens // 16)])
                link.channel.send(pw.sender.cache.index_select(2, idx), pw.sender.timeout_s)  # 1. send ...
                intent = WriteIntent(job.request_id, "p0", job.num_tokens, job.first_token, Backend.GLOO,
                                     link.channel.epoch)
                job.grant(dw.begin_write(intent))  # 2. ... then announce (never reached)

            link._one = old_order  # type: ignore[method-assign]
            t0 = time.monotonic()
            sp = SamplingParams(max_tokens=4)
            r = dw.reserve("old", 3, sp, EOS, [5, 6, 7])
            res = pw.prefill(PrefillRequest("old", [5, 6, 7], sp, EOS, r.dest), timeout_s=10)
            assert res.error is not None and "never posted its receive" in res.error
            assert time.monotonic() - t0 < 5
        finally:
            dw.cancel("old")


def test_a_cancel_during_a_direct_write_never_frees_the_blocks_under_the_writer(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    writing, release = threading.Event(), threading.Event()
    real_copy = sender_mod.copy_blocks
    written: list[int] = []

    def slow_copy(dst, dst_blocks, src, src_blocks):  # type: ignore[no-untyped-def]
        written.extend(dst_blocks)
        writing.set()
        assert release.wait(10)
        real_copy(dst, dst_blocks, src, src_blocks)

    monkeypatch.setattr(sender_mod, "copy_blocks", slow_copy)
    with running_pair("ipc") as (pw, dw, hub, events):
        try:
            sp = SamplingParams(max_tokens=8)
            r = dw.reserve("w", 40, sp, EOS, list(range(3, 43)))
            res = pw.prefill(PrefillRequest("w", list(range(3, 43)), sp, EOS, r.dest))
            assert res.error is None and writing.wait(10)
            assert dw.cancel("w")  # the client went away while its KV is being written
            time.sleep(0.2)  # the decode loop runs: the cancel must not free the blocks yet
            assert dw.allocator.num_used == len(r.dest.block_ids)
            n = 16 * (dw.allocator.num_free - dw.scheduler.watermark_blocks)  # every block it may take
            other = dw.reserve("x", n, SamplingParams(max_tokens=1), EOS, [9] * n)
            assert other.ok and not set(other.dest.block_ids) & set(written)
            dw.cancel("x")
            release.set()
            assert _idle(dw, pw)  # the write ended: now the blocks are back
            assert events.take("w")[-1].finish_reason is FinishReason.CANCELLED
        finally:
            release.set()  # never leave the writer blocked


def test_a_failed_hand_off_is_recomputed_on_decode_when_configured() -> None:
    with running_pair("fake", timeout_s=3, on_failure="recompute") as (pw, dw, hub, events):
        link = pw.sender.links["d0"]
        assert link.channel is not None

        def broken(t, timeout_s):  # type: ignore[no-untyped-def]
            raise TransferError("injected: the network is down")

        link.channel.send = broken  # type: ignore[method-assign]
        tok = tiny_tokenizer()
        p = prompts(4, seed=8)[3]
        ids = tok(p)["input_ids"]
        toks, reason = _run((pw, dw, hub, events), "re", ids, SamplingParams(max_tokens=10))
        assert toks == hf_greedy(p, 10), reason  # the same tokens: the decode worker computed the prompt itself
        assert dw.kv_recomputes == 1 and dw.prompt_tokens_computed == len(ids)
        assert _idle(dw, pw)


def test_2p2d_over_the_fake_with_nccl_semantics_equals_hf() -> None:
    """Every prefill worker writes to every decode worker over its own pair (4 pairs, fake NCCL)."""
    mc, tc, hub = ModelConfig(path="tiny"), TransportConfig(timeout_s=10), FakeHub()
    pws = [PrefillWorker(f"p{i}", mc, PrefillConfig(chunk_tokens=32, max_batch_tokens=64), tc, block_size=16)
           for i in range(2)]
    dws = [DecodeWorker(f"d{i}", mc, KVCacheConfig(num_blocks=256), DecodeConfig(), tc) for i in range(2)]
    for w in (*pws, *dws):
        w.start()
    for pw in pws:
        for dw in dws:
            wire(pw, dw, "fake", hub)
    pumps = {dw.worker_id: Events(dw) for dw in dws}
    try:
        tok = tiny_tokenizer()
        ps = prompts(12, seed=12)

        def one(i: int) -> list[int]:
            pw, dw = pws[i % 2], dws[(i // 2) % 2]  # all four pairs
            return _run((pw, dw, hub, pumps[dw.worker_id]), f"x{i}", tok(ps[i])["input_ids"],
                        SamplingParams(max_tokens=12))[0]

        with cf.ThreadPoolExecutor(12) as ex:
            outs = list(ex.map(one, range(12)))
        assert outs == [hf_greedy(p, 12) for p in ps]
        assert all(dw.prompt_tokens_computed == 0 for dw in dws)
        assert hub.bytes_moved == sum(dw.receiver.bytes_received for dw in dws) > 0
        assert _idle(*pws, *dws)
    finally:
        for e in pumps.values():
            e.close()
        for w in (*pws, *dws):
            w.shutdown()


def test_disconnecting_a_gone_decode_worker_fails_its_queued_writes_and_ends_the_link() -> None:
    """What the supervisor has a prefill worker do when a decode worker is lost: the write queued
    behind the one in progress fails at once (not at a timeout), the link's thread ends (letting go
    of the decode worker's cache), and new prompts for that worker fail up front."""
    with running_pair("ipc") as (pw, dw, hub, events):
        link = pw.sender.links["d0"]
        gate, entered = threading.Event(), threading.Event()

        class HeldPeer:  # the decode worker, answering the first grant only once the gate opens
            def begin_write(self, intent, timeout_s):  # type: ignore[no-untyped-def]
                entered.set()
                gate.wait(10)
                return dw.begin_write(intent, timeout_s)

            def end_write(self, outcome, timeout_s):  # type: ignore[no-untyped-def]
                return dw.end_write(outcome, timeout_s)

        link.peer = HeldPeer()
        sp = SamplingParams(max_tokens=4, ignore_eos=True)
        with cf.ThreadPoolExecutor(2) as ex:
            futs = {}
            for rid, ids in (("held", [5, 6, 7]), ("queued", [8, 9, 10])):
                r = dw.reserve(rid, len(ids), sp, EOS, ids)
                futs[rid] = ex.submit(pw.prefill, PrefillRequest(rid, ids, sp, EOS, r.dest))
                if rid == "held":
                    assert entered.wait(10)  # the link's thread is busy with "held"
            assert _wait(lambda: link.jobs.qsize() == 1)
            t0 = time.monotonic()
            assert pw.disconnect("d0") and "d0" not in pw.sender.links
            queued = futs["queued"].result(5)
            assert queued.error is not None and "d0 is gone" in queued.error
            assert time.monotonic() - t0 < 1
            gate.set()  # the write in progress ends on its own; then the thread is gone
            assert futs["held"].result(10).error is None
            link.thread.join(5)
            assert not link.thread.is_alive()
        late = pw.prefill(PrefillRequest("late", [5, 6], sp, EOS, r.dest))
        assert late.error is not None and "no hand-off link" in late.error
        for rid in ("held", "queued", "late"):
            dw.cancel(rid)
        assert _idle(dw, pw)


def _wait(cond: Any, timeout: float = 5) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_a_write_submitted_while_its_link_is_dropped_is_answered() -> None:
    """submit() looks its link up, disconnect() takes that link away and ends its thread, then
    submit() queues the job: nothing would ever answer it (the prefill waits out its deadline, its
    scratch blocks stay taken). The lookup and the queueing are one step against disconnect()."""
    from engine.kv_handoff import KVDestination
    from engine.kv_handoff.sender import WriteJob

    with running_pair("ipc") as (pw, dw, hub, events):
        sender = pw.sender

        class RacingLinks(dict):  # type: ignore[type-arg]
            def get(self, key, default=None):  # type: ignore[no-untyped-def]
                link = super().get(key, default)
                t = threading.Thread(target=sender.disconnect, args=(key, "decode worker d0 is gone"))
                t.start()
                t.join(0.3)  # the drop runs between the lookup and the queueing (if nothing orders them)
                return link

        sender.links = RacingLinks(sender.links)
        granted, done = [], threading.Event()
        job = WriteJob("race", KVDestination("d0", (0,)), 4, 5, [0], granted.append, done.set)
        sender.submit(job)
        assert done.wait(3) and len(granted) == 1 and not granted[0].ok, granted
        assert _wait(lambda: sender.in_flight == 0)
