"""Prefill and decode workers wired in one process over the fake transport (no Ray, no sockets)."""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections import defaultdict

import pytest
import torch

from decode_worker.config import DecodeConfig
from decode_worker.receiver import KVReceiver
from decode_worker.worker import DecodeWorker
from engine.config import KVCacheConfig, ModelConfig, TransportConfig
from engine.transport import FakeHub, FakeTransport
from engine.types import FinishReason, KVArrival, PrefillRequest, SamplingParams
from prefill_worker.config import PrefillConfig
from prefill_worker.worker import PrefillWorker
from engine.tiny import tiny_tokenizer
from tests.cpu.harness import hf_greedy, prompts

EOS = (2,)


@pytest.fixture(scope="module", params=["whole", "chunked"])
def pair(request):  # type: ignore[no-untyped-def]
    mc, tc, hub = ModelConfig(path="tiny"), TransportConfig(timeout_s=10), FakeHub()
    pcfg = (PrefillConfig(chunk_tokens=2048) if request.param == "whole"
            else PrefillConfig(chunk_tokens=16, max_batch_tokens=48))
    pw = PrefillWorker("p0", mc, pcfg, tc)
    dw = DecodeWorker("d0", mc, KVCacheConfig(num_blocks=512), DecodeConfig(), tc)
    pw.set_transport(FakeTransport(hub, 0, 2))
    dw.set_transport(FakeTransport(hub, 1, 2))
    pw.set_peers({1: dw})
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
        while not self.stop:
            evs = self.dw.poll(0.05)
            with self.cv:
                for ev in evs:
                    self.by_id[ev.request_id].append(ev)
                self.cv.notify_all()

    def take(self, rid: str, timeout: float = 30) -> list:  # type: ignore[type-arg]
        """Events of `rid` up to and including the one that finishes it."""
        with self.cv:
            assert self.cv.wait_for(lambda: any(e.finish_reason for e in self.by_id[rid]), timeout), rid
            return self.by_id.pop(rid)


def _run(pair, rid: str, ids: list[int], sp: SamplingParams) -> tuple[list[int], str]:  # type: ignore[no-untyped-def]
    pw, dw, hub, events = pair
    assert dw.reserve(rid, len(ids), sp, EOS).ok
    res = pw.prefill(PrefillRequest(rid, ids, sp, EOS, 1))
    assert res.error is None
    if res.finished is not None:
        dw.cancel(rid)
        return [res.first_token], res.finished.value
    evs = events.take(rid)
    return [res.first_token] + [t for e in evs for t in e.token_ids], evs[-1].finish_reason.value


def test_concurrent_requests_equal_hf(pair) -> None:  # type: ignore[no-untyped-def]
    pw, dw, hub, _ = pair
    tok = tiny_tokenizer()
    ps = prompts(12, seed=6)
    sp = SamplingParams(max_tokens=20)
    with cf.ThreadPoolExecutor(12) as ex:
        outs = list(ex.map(lambda ip: _run(pair, f"c{ip[0]}", tok(ip[1])["input_ids"], sp), enumerate(ps)))
    for p, (toks, _) in zip(ps, outs):
        assert toks == hf_greedy(p, 20)
    assert dw.prompt_tokens_computed == 0 and hub.bytes_moved > 0
    time.sleep(0.1)
    assert dw.check_idle() and pw.check_idle()


def test_first_token_can_end_the_request_without_a_handoff(pair) -> None:  # type: ignore[no-untyped-def]
    pw, dw, hub, _ = pair
    before = hub.bytes_moved
    toks, reason = _run(pair, "one", [5, 6, 7], SamplingParams(max_tokens=1))
    assert len(toks) == 1 and reason == FinishReason.LENGTH.value
    assert hub.bytes_moved == before
    time.sleep(0.1)
    assert dw.check_idle()


def test_receiver_posts_in_sender_order_whatever_the_notice_order() -> None:
    hub = FakeHub()
    tx, rx = FakeTransport(hub, 0, 2), FakeTransport(hub, 1, 2)
    posted: list[int] = []
    real_recv = rx.recv

    def spy(src, seq, shape, dtype, device):  # type: ignore[no-untyped-def]
        posted.append(seq)
        return real_recv(src, seq, shape, dtype, device)

    rx.recv = spy  # type: ignore[method-assign]
    r = KVReceiver(rx, lambda n: (n, 2), torch.float32, "cpu", timeout_s=5)
    for seq in range(3):
        tx.send(1, seq, torch.full((seq + 1, 2), float(seq)))
    r.announce(KVArrival("c", 0, 2, 3, 0, 0.0))
    r.announce(KVArrival("a", 0, 0, 1, 0, 0.0))
    done, _ = r.poll()
    assert posted == [0] and [d.arrival.request_id for d in done] == ["a"]  # seq 2 waits for seq 1
    r.announce(KVArrival("b", 0, 1, 2, 0, 0.0))
    done, failed = r.poll()
    assert posted == [0, 1, 2] and not failed
    assert sorted(d.arrival.request_id for d in done) == ["b", "c"]
    assert all(float(d.transfer.tensor[0, 0]) == d.arrival.seq for d in done)


def test_receiver_times_out_a_transfer_that_never_comes() -> None:
    r = KVReceiver(FakeTransport(FakeHub(), 1, 2), lambda n: (n,), torch.float32, "cpu", timeout_s=0.05)
    r.announce(KVArrival("lost", 0, 0, 4, 0, 0.0))
    assert r.poll() == ([], [])
    time.sleep(0.1)
    done, failed = r.poll()
    assert not done and [f.arrival.request_id for f in failed] == ["lost"]
    assert "timed out" in (failed[0].transfer.error or "")


def test_a_failing_decode_step_ends_its_requests_with_an_error(pair) -> None:  # type: ignore[no-untyped-def]
    pw, dw, hub, events = pair
    real = dw.runner.forward

    def broken(seqs):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated kernel failure")

    dw.runner.forward = broken
    try:
        sp = SamplingParams(max_tokens=8, ignore_eos=True)
        assert dw.reserve("boom", 3, sp, EOS).ok
        assert pw.prefill(PrefillRequest("boom", [5, 6, 7], sp, EOS, 1)).error is None
        evs = events.take("boom")
        assert evs[-1].finish_reason is FinishReason.ERROR and "simulated kernel failure" in (evs[-1].error or "")
    finally:
        dw.runner.forward = real
    time.sleep(0.1)
    assert dw.check_idle()
    toks, _ = _run(pair, "after-boom", [5, 6, 7], SamplingParams(max_tokens=4))  # the worker lives on
    assert len(toks) == 4 or toks[-1] == 2
