"""A decode worker computes a prompt itself when the part of it not cached there is short
(decode.local_prefill_max_tokens): a chat's next turn skips the prefill worker and the transfer.

In-process workers (no Ray) for the worker's side; a 1P1D cluster for the router's choice."""
from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import ray

from decode_worker.config import DecodeConfig
from decode_worker.worker import DecodeWorker
from engine.config import KVCacheConfig, ModelConfig, TransportConfig
from engine.tiny import tiny_tokenizer
from engine.types import PrefillRequest, SamplingParams
from prefill_worker.config import PrefillConfig
from prefill_worker.worker import PrefillWorker
from tests.cpu.harness import RunningServer, hf_greedy_ids, prompts, tiny_config, wait_until
from tests.cpu.test_workers_inprocess import EOS, Events, _idle, wire

BS = 16


@contextmanager
def pair(max_recompute_tokens: int = 256,
         allocation: str = "on_demand") -> Iterator[tuple[PrefillWorker, DecodeWorker, Events]]:
    mc, tc = ModelConfig(path="tiny"), TransportConfig(timeout_s=10)
    pw = PrefillWorker("p0", mc, PrefillConfig(chunk_tokens=2048), tc, block_size=BS)
    dw = DecodeWorker("d0", mc, KVCacheConfig(num_blocks=256, block_size=BS, allocation=allocation),
                      DecodeConfig(max_recompute_tokens=max_recompute_tokens), tc)
    pw.start()
    dw.start()
    wire(pw, dw, "ipc")
    events = Events(dw)
    try:
        yield pw, dw, events
    finally:
        events.close()
        pw.shutdown()
        dw.shutdown()


def _tokens(dw: DecodeWorker, events: Events, rid: str, first: int) -> list[int]:
    out = [first]
    for ev in events.take(rid):
        assert ev.error is None, ev.error
        out += ev.token_ids
    return out


def _handed_off(pw: PrefillWorker, dw: DecodeWorker, events: Events, rid: str, ids: list[int],
                sp: SamplingParams) -> list[int]:
    """The usual way: reserve on decode, prefill on the prefill worker, which writes the KV."""
    r = dw.reserve(rid, len(ids), sp, EOS, ids)
    assert r.ok and r.dest is not None
    res = pw.prefill(PrefillRequest(rid, ids, sp, EOS, r.dest))
    assert res.error is None and res.finished is None
    return _tokens(dw, events, rid, res.first_token)


def _local(dw: DecodeWorker, events: Events, rid: str, ids: list[int], sp: SamplingParams) -> tuple[list[int], int]:
    """Reserve on decode and have the same worker compute the prompt → (tokens, cached prompt tokens)."""
    r = dw.reserve(rid, len(ids), sp, EOS, ids)
    assert r.ok and r.dest is not None
    res = dw.prefill(PrefillRequest(rid, ids, sp, EOS, r.dest), 30)
    assert res.error is None and res.finished is None, res.error
    assert res.cached_tokens == r.dest.shared_tokens
    return _tokens(dw, events, rid, res.first_token), r.dest.shared_tokens


@pytest.mark.parametrize("allocation", ["on_demand", "upfront"])
def test_a_chats_next_turn_is_computed_on_decode_after_its_cached_history_and_equals_hf(allocation: str) -> None:
    """Turn 1 is handed off; the decode worker keeps its prompt's and answer's KV. Turn 2 (turn 1,
    its answer, a new question) finds all of that cached there but the last partial block, and the
    decode worker computes only the rest — in 16-token chunks beside nothing else — with no byte
    received: HF generate's tokens. Whether requests grow (on_demand) or hold max_tokens upfront."""
    tok = tiny_tokenizer()
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    with pair(max_recompute_tokens=16, allocation=allocation) as (pw, dw, events):
        ids1 = tok(prompts(6, seed=3, min_words=20, max_words=30)[3])["input_ids"]
        out1 = _handed_off(pw, dw, events, "turn-1", ids1, sp)
        assert out1 == hf_greedy_ids(ids1, 24, ignore_eos=True)
        ids2 = ids1 + out1 + tok(" And the quiet river?")["input_ids"]
        computed, received, steps = dw.prompt_tokens_computed, dw.receiver.bytes_received, dw.steps
        hits, queried, generated = dw.allocator.hit_tokens, dw.allocator.query_tokens, dw.stats().tokens_generated
        out2, cached = _local(dw, events, "turn-2", ids2, sp)
        assert dw.stats().tokens_generated - generated == 24  # its first token too: it was sampled here
        assert (dw.allocator.hit_tokens - hits, dw.allocator.query_tokens - queried) == (cached, len(ids2))  # once
        assert out2 == hf_greedy_ids(ids2, 24, ignore_eos=True)
        assert cached == (len(ids1) + 24 - 1) // BS * BS  # turn 1's KV: its prompt and all its answer but the last
        assert dw.prompt_tokens_computed - computed == len(ids2) - cached
        assert dw.steps - steps >= -(-(len(ids2) - cached) // 16) + 23  # chunks of 16, then 23 decode steps
        assert dw.receiver.bytes_received == received and dw.requests_prefilled == 1
        assert _idle(dw, pw)


def test_prompts_computed_on_decode_share_steps_with_running_decodes_and_all_equal_hf() -> None:
    """Four requests handed off and decoding; meanwhile four short prompts (nothing cached) are
    computed by the decode worker in chunks beside their rows. Every stream is HF's."""
    tok = tiny_tokenizer()
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    texts = prompts(10, seed=8, min_words=8, max_words=14)[2:]
    with pair(max_recompute_tokens=32) as (pw, dw, events):
        with cf.ThreadPoolExecutor(8) as ex:
            far = [ex.submit(_handed_off, pw, dw, events, f"h{i}", tok(t)["input_ids"], sp)
                   for i, t in enumerate(texts[:4])]
            near = [ex.submit(_local, dw, events, f"l{i}", tok(t)["input_ids"], sp) for i, t in enumerate(texts[4:])]
            got = [f.result(60) for f in far] + [f.result(60)[0] for f in near]
        assert got == [hf_greedy_ids(tok(t)["input_ids"], 40, ignore_eos=True) for t in texts]
        assert dw.requests_prefilled == 4
        assert pw.prompt_tokens_computed == sum(len(tok(t)["input_ids"]) for t in texts[:4])
        assert _idle(dw, pw)


def test_a_seeded_request_draws_the_same_tokens_computed_on_decode_as_handed_off() -> None:
    tok = tiny_tokenizer()
    sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    ids = tok(prompts(5, seed=9)[4])["input_ids"]
    with pair() as (pw, dw, events):
        assert _local(dw, events, "here", ids, sp)[0] == _handed_off(pw, dw, events, "there", ids, sp)
        assert _idle(dw, pw)


def test_a_prompt_cancelled_while_the_decode_worker_computes_it_ends_and_frees_its_blocks() -> None:
    tok = tiny_tokenizer()
    ids = tok(" ".join(prompts(4, seed=2)[-1:] * 2))["input_ids"]  # ~740 tokens: 47 chunks of 16
    sp = SamplingParams(max_tokens=8)
    with pair(max_recompute_tokens=16) as (pw, dw, events):
        r = dw.reserve("gone", len(ids), sp, EOS, ids)
        assert r.ok and r.dest is not None
        answer: list = []
        t = threading.Thread(target=lambda: answer.append(dw.prefill(PrefillRequest("gone", ids, sp, EOS, r.dest))))
        t.start()
        assert _wait(lambda: dw.prompt_tokens_computed >= 32)  # under way
        assert dw.cancel("gone")
        t.join(10)
        assert answer and answer[0].error == "cancelled"
        assert _idle(dw, pw) and dw.prompt_tokens_computed < len(ids)


def _wait(cond, timeout: float = 10) -> bool:  # type: ignore[no-untyped-def]
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return False


# -- through the router ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-local-prefill")
    srv = RunningServer(tiny_config(decode={"local_prefill_max_tokens": 48}))
    yield srv
    srv.stop()
    ray.shutdown()


def test_the_router_sends_a_chats_next_turn_to_its_decode_worker_and_a_new_long_prompt_to_prefill(
    server: RunningServer,
) -> None:
    """local_prefill_max_tokens: 48. A 200-token first turn goes to the prefill worker; its next
    turn adds ~30 tokens to a history cached on the decode worker, which computes them itself. Both
    are HF's tokens; status, timings and the metric say where each prompt was computed."""
    tok = tiny_tokenizer()
    first = prompts(6, seed=4, min_words=36, max_words=40)[4]
    r1 = server.generate(prompt=first, max_tokens=20, ignore_eos=True)
    ids1 = tok(first)["input_ids"]
    assert list(r1.token_ids) == hf_greedy_ids(ids1, 20, ignore_eos=True)
    assert not r1.timings.local_prefill and r1.timings.kv_transfer_bytes > 0
    before = {w.id: w.prompt_tokens_computed for w in server.status()}

    second = first + r1.text + " Where is the mill by the river?"
    r2 = server.generate(prompt=second, max_tokens=20, ignore_eos=True)
    ids2 = tok(second)["input_ids"]
    assert list(r2.token_ids) == hf_greedy_ids(ids2, 20, ignore_eos=True)
    assert r2.timings.local_prefill and r2.timings.kv_transfer_bytes == 0
    assert r2.usage.cached_tokens == (len(ids1) + 19) // 16 * 16
    status = {w.id: w for w in server.status()}
    assert status["prefill-0"].prompt_tokens_computed == before["prefill-0"]
    assert status["decode-0"].prompt_tokens_computed - before["decode-0"] == len(ids2) - r2.usage.cached_tokens
    assert status["decode-0"].requests_prefilled == 1 and status["prefill-0"].requests_prefilled == 1
    assert status["decode-0"].prefix_hit_tokens >= r2.usage.cached_tokens and status["decode-0"].kv_blocks_cached > 0
    assert server.server.svc.dispatcher.local_prefills == 1
    registry = server.server.svc.metrics.registry  # refreshed every 2 s
    assert wait_until(lambda: registry.get_sample_value("pdserve_local_prefills_total") == 1, 5)


def test_with_its_prefill_worker_gone_for_good_the_decode_worker_computes_every_prompt(server: RunningServer) -> None:
    """The last cluster test of this module: prefill-0 is killed for good. Health stays SERVING, and a
    prompt of ~400 new tokens — far above local_prefill_max_tokens — is computed by the decode
    worker: HF's tokens, not UNAVAILABLE."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ray.kill(server.cluster.workers["prefill-0"], no_restart=True)
    assert wait_until(lambda: next(w for w in server.status() if w.id == "prefill-0").state == "lost", 15)
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    text = prompts(6, seed=11, min_words=60, max_words=70)[5][:400]
    r = server.generate(prompt=text, max_tokens=12, ignore_eos=True)
    assert list(r.token_ids) == hf_greedy_ids(tiny_tokenizer()(text)["input_ids"], 12, ignore_eos=True)
    assert r.timings.local_prefill and r.usage.cached_tokens == 0
    decode = server.cluster.workers["decode-0"]
    assert wait_until(lambda: ray.get(decode.check_idle.remote(), timeout=10), 10)


def test_the_generate_summary_says_where_the_prompt_was_computed(capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.cli import _summary
    from protos.pdserve.v1 import generation_pb2 as pb

    _summary("stop", pb.Usage(prompt_tokens=90, completion_tokens=20, cached_tokens=64),
             pb.Timings(ttft_ms=50, total_ms=500, local_prefill=True))
    _summary("stop", pb.Usage(prompt_tokens=90, completion_tokens=20),
             pb.Timings(ttft_ms=50, total_ms=500, kv_transfer_ms=3, kv_transfer_bytes=2_000_000))
    here, there = capsys.readouterr().err.splitlines()
    assert "prompt=90 cached=64" in here and "prefill=on-decode" in here and "kv_transfer" not in here
    assert "kv_transfer=3.0ms/2.00MB" in there and "on-decode" not in there and "cached" not in there
