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
