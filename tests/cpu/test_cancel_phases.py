"""A cancel or deadline at any phase of a request — queued for KV room, reserved, waiting for the
prefill worker, prefilling, handing off, decoding — leaves no block used, within a second, on any
worker."""
from __future__ import annotations

import concurrent.futures as cf
import random
import time

import grpc
import pytest
import ray

from protos.pdserve.v1 import generation_pb2 as pb
from tests.cpu.harness import RunningServer, tiny_config, wait_until


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-cancel")
    srv = RunningServer(tiny_config(
        kv_cache={"num_blocks": 160},  # 2560 tokens: a few requests fill it, later ones queue
        prefill={"chunk_tokens": 16, "max_batch_tokens": 32},  # long prompts prefill for a while
        limits={"max_prompt_tokens": 1024, "queue_timeout_s": 30, "max_queued_requests": 64},
    ))
    yield srv
    srv.stop()
    ray.shutdown()


def _one(srv: RunningServer, rng: random.Random, i: int) -> str:
    n_prompt, n_out = rng.choice([3, 40, 300, 1000]), rng.choice([1, 5, 200, 900])
    req = pb.GenerateRequest(prompt="c" * n_prompt, max_tokens=n_out, ignore_eos=True)
    if rng.random() < 0.5:  # a deadline somewhere in its life
        try:
            srv.generate(timeout=rng.uniform(0.02, 1.5), **{f.name: v for f, v in req.ListFields()})
            return "ok"
        except grpc.RpcError as e:
            return e.code().name
    stream = srv.stub.GenerateStream(req, timeout=60)  # a client that goes away
    time.sleep(rng.uniform(0.0, 1.5))
    stream.cancel()
    try:
        for _ in stream:
            pass
        return "ok"
    except grpc.RpcError as e:
        return e.code().name


def test_cancels_and_deadlines_at_random_moments_leave_nothing_behind(server: RunningServer) -> None:
    rng = random.Random(11)
    with cf.ThreadPoolExecutor(12) as ex:
        codes = list(ex.map(lambda i: _one(server, random.Random(rng.random()), i), range(80)))
    t_last = time.monotonic()
    assert set(codes) <= {"ok", "CANCELLED", "DEADLINE_EXCEEDED"}, codes
    assert wait_until(server.all_idle, timeout=1.0, interval=0.02), [
        (w.id, w.kv_blocks_used, w.running, w.waiting) for w in server.status()
    ]
    assert time.monotonic() - t_last < 1.5


def test_a_request_cancelled_while_queued_for_kv_room_leaves_nothing(server: RunningServer) -> None:
    bigs = [server.stub.GenerateStream(pb.GenerateRequest(prompt=c * 1000, max_tokens=1000, ignore_eos=True),
                                       timeout=60) for c in "bc"]
    for big in bigs:
        next(big)  # each holds its prompt's 63 blocks (and grows) of 160
    waiting = server.stub.GenerateStream(pb.GenerateRequest(prompt="w" * 800, max_tokens=800, ignore_eos=True),
                                         timeout=60)
    assert wait_until(lambda: server.server.svc.dispatcher.queued == 1, 5)  # queued for KV room
    waiting.cancel()
    assert wait_until(lambda: server.server.svc.dispatcher.queued == 0, 1)
    for big in bigs:
        big.cancel()
    assert wait_until(server.all_idle, timeout=1.0, interval=0.02)


def test_requests_beyond_the_cache_are_preempted_recomputed_and_equal_hf_generate(server: RunningServer) -> None:
    """2 prompts of 700 tokens growing by 900 need 2 x 101 blocks of the 160: even a second request
    600 tokens behind the first (its prefill slower than the first's decode steps) needs the first's
    last blocks. The newer gives way and is recomputed; both answers are still HF generate's, and
    status/metrics say what happened."""
    from router.metrics import RouterMetrics
    from tests.cpu.harness import hf_greedy, prompts

    texts = [p[:700] for p in prompts(8, seed=5, min_words=150, max_words=160)[2:4]]
    before = {w.id: (w.preemptions, w.recomputed_tokens) for w in server.status()}
    with cf.ThreadPoolExecutor(len(texts)) as ex:
        got = list(ex.map(lambda p: list(server.generate(prompt=p, max_tokens=900, ignore_eos=True,
                                                         timeout=120).token_ids), texts))
    status = {w.id: w for w in server.status()}
    assert status["decode-0"].preemptions > before["decode-0"][0]
    assert status["decode-0"].recomputed_tokens > before["decode-0"][1]
    assert got == [hf_greedy(p, 900, ignore_eos=True) for p in texts]
    assert wait_until(server.all_idle, timeout=5)
    m = RouterMetrics()  # the gauges a scrape shows, from the worker's stats
    m.set_workers([ray.get(server.cluster.decodes[0].stats.remote(), timeout=30)])
    lab = {"role": "decode", "worker": "decode-0"}
    assert m.registry.get_sample_value("pdserve_worker_preemptions", lab) == status["decode-0"].preemptions
    assert m.registry.get_sample_value("pdserve_worker_recomputed_tokens", lab) == status["decode-0"].recomputed_tokens
