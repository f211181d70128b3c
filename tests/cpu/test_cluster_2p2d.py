"""2 prefill + 2 decode workers: equality under concurrency, and backpressure when the KV is full."""
from __future__ import annotations

import concurrent.futures as cf
import time

import grpc
import pytest
import ray

from protos.pdserve.v1 import generation_pb2 as pb
from tests.cpu.harness import RunningServer, hf_greedy, prompts, tiny_config, wait_until


@pytest.fixture(scope="module")
def server():
    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-test")
    cfg = tiny_config(
        prefill={"replicas": 2, "chunk_tokens": 2048},  # whole-prompt prefill (1P1D tests chunking)
        decode={"replicas": 2}, kv_cache={"num_blocks": 300, "allocation": "upfront"},  # max_tokens counts
        limits={"max_queued_requests": 4, "queue_timeout_s": 20},
    )
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


def _first(stream):  # type: ignore[no-untyped-def]
    try:
        return next(stream)
    except grpc.RpcError as e:
        return e


def test_full_kv_queues_a_bounded_burst_and_refuses_the_rest(server: RunningServer) -> None:
    # each request needs ceil((~10 + 1000) / 16) = 64 blocks; 2 workers x 300 blocks hold 8 of them
    req = pb.GenerateRequest(prompt="fill the cache", max_tokens=1000, ignore_eos=True)
    streams = [server.stub.GenerateStream(req, timeout=60) for _ in range(14)]
    with cf.ThreadPoolExecutor(len(streams)) as ex:
        futs = [ex.submit(_first, s) for s in streams]
        time.sleep(0.5)
        answered = [f.result() for f in futs if f.done()]
        accepted = [s for s, f in zip(streams, futs) if f.done() and not isinstance(f.result(), grpc.RpcError)]
        refused = [r for r in answered if isinstance(r, grpc.RpcError)]
        assert len(accepted) == 8 and len(refused) == 2
        for e in refused:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "wait queue is full" in e.details() and "max_queued_requests=4" in e.details()
        queued = [(s, f) for s, f in zip(streams, futs) if not f.done()]
        assert len(queued) == 4  # waiting, not dropped
        for s in accepted:
            s.cancel()
        for s, f in queued:  # room came back: the queued requests get their first token
            assert not isinstance(f.result(timeout=20), grpc.RpcError)
            s.cancel()
    assert wait_until(server.all_idle, timeout=20)
    assert server.generate(prompt="after the burst", max_tokens=4).usage.completion_tokens >= 1


def _try(server: RunningServer, p: str):  # type: ignore[no-untyped-def]
    try:
        return list(server.generate(prompt=p, max_tokens=8).token_ids)
    except grpc.RpcError as e:
        return e


def test_a_prompt_goes_to_the_decode_worker_holding_its_prefix_and_only_the_rest_is_handed_off(
    server: RunningServer,
) -> None:
    """kv_cache.prefix_cache: decode-1 keeps the first prompt's blocks; with both decode workers as
    busy (by load alone the tie goes to decode-0), the next prompt sharing that prefix goes to
    decode-1, holds those blocks and is handed off only its last one."""
    busy = pb.GenerateRequest(prompt="keep busy", max_tokens=1000, ignore_eos=True)
    busy0 = server.stub.GenerateStream(busy, timeout=60)
    next(busy0)  # on decode-0 (both idle)
    system = "Shared instructions for every request of this test, long enough for five blocks. "  # 84 bytes
    first = server.generate(prompt=system + "First?", max_tokens=4)  # on decode-1, the idler: 6 blocks sent
    busy1 = server.stub.GenerateStream(busy, timeout=60)
    next(busy1)  # on decode-1: both as busy now
    again = server.generate(prompt=system + "Again?", max_tokens=4)
    busy0.cancel()
    busy1.cancel()
    assert list(again.token_ids) == hf_greedy(system + "Again?", 4)
    assert first.timings.kv_transfer_bytes == 6 * again.timings.kv_transfer_bytes > 0
    assert wait_until(lambda: all(w.kv_blocks_used == 0 for w in server.status()), 10)


def test_a_dead_prefill_worker_costs_no_request_and_is_skipped(server: RunningServer) -> None:
    # kills prefill-1 for good; the dead decode test after it needs only prefill-0
    ray.kill(server.cluster.prefills[1], no_restart=True)
    ps = prompts(4, seed=14)
    for _ in range(4):  # concurrent requests: those that meet the dead worker are retried on prefill-0
        with cf.ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda p: _try(server, p), ps))
        assert got == [hf_greedy(p, 8) for p in ps]
    assert wait_until(lambda: {w.id: w.state for w in server.status()}["prefill-1"] == "lost", 10)
    assert wait_until(lambda: all(w.kv_blocks_used == 0 for w in server.status() if w.role == "decode"), 10)


def test_a_dead_decode_workers_request_moves_to_the_other_and_goes_on(server: RunningServer) -> None:
    # runs last in this module: it kills decode-1
    req = pb.GenerateRequest(prompt="long running", max_tokens=300, ignore_eos=True)
    streams = [server.stub.GenerateStream(req, timeout=60) for _ in range(2)]
    got = [list(next(s).token_ids) for s in streams]  # both running, one per decode worker (least loaded first)
    ray.kill(server.cluster.decodes[1], no_restart=True)
    moves = []
    for toks, s in zip(got, streams):
        for msg in s:
            toks += msg.token_ids
        moves.append(msg.timings.migrations)  # the last message's
    assert got == [hf_greedy("long running", 300, ignore_eos=True)] * 2  # one unbroken answer each
    assert sorted(moves) == [0, 1] and server.server.svc.dispatcher.migrations == 1
    # new requests avoid the dead worker
    for p in prompts(3, seed=12):
        assert list(server.generate(prompt=p, max_tokens=8).token_ids) == hf_greedy(p, 8)
