"""2 prefill + 2 decode workers: equality under concurrency, and backpressure when the KV is full."""
from __future__ import annotations

import concurrent.futures as cf

import grpc
import pytest
import ray

from protos.pdserve.v1 import generation_pb2 as pb
from tests.cpu.harness import RunningServer, hf_greedy, prompts, tiny_config, wait_until


@pytest.fixture(scope="module")
def server():
    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-test")
    cfg = tiny_config(prefill={"replicas": 2}, decode={"replicas": 2}, kv_cache={"num_blocks": 300})
    srv = RunningServer(cfg)
    yield srv
    srv.stop()
    ray.shutdown()


def test_2p2d_greedy_equals_hf_generate(server: RunningServer) -> None:
    for p in prompts(20, seed=3):
        assert list(server.generate(prompt=p, max_tokens=16).token_ids) == hf_greedy(p, 16), p


def test_2p2d_twenty_concurrent_equal_solo_and_use_every_worker(server: RunningServer) -> None:
    ps = prompts(20, seed=4)
    solo = {p: hf_greedy(p, 32, ignore_eos=True) for p in ps}
    with cf.ThreadPoolExecutor(len(ps)) as ex:
        futs = {p: ex.submit(server.generate, prompt=p, max_tokens=32, ignore_eos=True) for p in ps}
        got = {p: list(f.result().token_ids) for p, f in futs.items()}
    assert got == solo
    status = server.status()
    assert all(w.prompt_tokens_computed > 0 for w in status if w.role == "prefill")
    assert all(w.tokens_generated > 0 for w in status if w.role == "decode")
    assert all(w.prompt_tokens_computed == 0 for w in status if w.role == "decode")


def test_full_kv_is_pushed_back_with_resource_exhausted_then_freed(server: RunningServer) -> None:
    # each request needs ceil((~10 + 1000) / 16) = 64 blocks; 2 workers x 300 blocks hold 8 of them
    req = pb.GenerateRequest(prompt="fill the cache", max_tokens=1000, ignore_eos=True)
    streams = [server.stub.GenerateStream(req, timeout=60) for _ in range(12)]
    accepted, refused = [], []
    for s in streams:
        try:
            next(s)
            accepted.append(s)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
            assert "KV cache full" in e.details()
            refused.append(s)
    assert len(accepted) == 8 and len(refused) == 4
    for s in accepted:
        s.cancel()
    assert wait_until(server.all_idle, timeout=20)
    # room again: a new request goes through
    assert server.generate(prompt="after the burst", max_tokens=4).usage.completion_tokens >= 1
