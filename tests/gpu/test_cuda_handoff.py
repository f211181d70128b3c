"""The hand-off and the engine on one CUDA GPU: aggregated, 1P1D by direct write (CUDA IPC), 2P2D,
and 1P1D forced to NCCL, each sending every prompt twice, so the second time the prefill prefix
cache supplies its whole blocks (== HF generate either way); and 1P1D with short prompts computed
on decode. Skipped without CUDA.

NCCL refuses two ranks on one GPU ("Duplicate GPU detected"). For the NCCL test only, each worker
process gets its own NCCL_HOSTID (tests/gpu/nccl_one_gpu.py), so NCCL takes them for two hosts and
talks over sockets: a way to run the NCCL code path on one GPU, not a production setting.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cfg(**sections: Any) -> Any:
    from tests.cpu.harness import tiny_config

    base: dict[str, Any] = {
        "model": {"device": "cuda"},
        "prefill": {"num_gpus": 0.25, "num_cpus": 1},
        "decode": {"num_gpus": 0.25, "num_cpus": 1},
        "aggregated": {"num_gpus": 0.5, "num_cpus": 1},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return tiny_config(**base)


@pytest.fixture(scope="module")
def ray_up():  # type: ignore[no-untyped-def]
    import ray

    ray.init(include_dashboard=False, namespace="pdserve-gpu-test")
    yield
    ray.shutdown()


def _check(cfg: Any, n: int = 16, nccl_hosts: bool = False) -> dict[str, Any]:
    import ray

    from tests.cpu.harness import RunningServer, prompts, wait_until
    from tests.gpu.nccl_one_gpu import own_nccl_hosts

    with own_nccl_hosts() if nccl_hosts else contextlib.nullcontext():
        srv = RunningServer(cfg)
    try:
        ps = prompts(n, seed=7)
        solo = [list(srv.generate(prompt=p, max_tokens=16).token_ids) for p in ps]
        with cf.ThreadPoolExecutor(n) as ex:
            crowd = list(ex.map(lambda p: list(srv.generate(prompt=p, max_tokens=16).token_ids), ps))
        ref = [hf_greedy_cuda(p, 16) for p in ps]
        assert solo == ref and crowd == ref
        status = srv.status()
        if cfg.mode == "disaggregated":
            assert all(w.prompt_tokens_computed == 0 for w in status if w.role == "decode")
        assert wait_until(srv.all_idle, 10)
        stats = ray.get([w.stats.remote() for w in srv.cluster.prefills + srv.cluster.decodes])
        if cfg.mode == "disaggregated":  # the crowd's prompts were the solo ones: their prefixes reused
            assert sum(s.extra["prefix_hit_tokens"] for s in stats if s.role == "prefill") > 0
        return {s.id: s.extra for s in stats}
    finally:
        srv.stop()


def hf_greedy_cuda(prompt: str, max_new_tokens: int) -> list[int]:
    """HF generate on the same GPU (fp32): the oracle."""
    from tests.cpu.harness import _tiny

    model, tok = _tiny()
    m = model.to("cuda")
    ids = tok(prompt, return_tensors="pt")["input_ids"].to("cuda")
    with torch.inference_mode():
        out = m.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_aggregated_on_one_gpu(ray_up: None) -> None:
    _check(_cfg(mode="aggregated"))


def test_1p1d_direct_write_on_one_gpu(ray_up: None) -> None:
    extra = _check(_cfg())
    assert extra["prefill-0"]["links"] == {"decode-0": "ipc"}
    assert extra["decode-0"]["kv_bytes_placed"] == 0 and extra["decode-0"]["kv_bytes_received"] > 0


def test_1p1d_with_drafts_on_one_gpu(ray_up: None) -> None:
    """decode.speculative on CUDA: draft rows through the decode graphs, the tokens HF's."""
    extra = _check(_cfg(decode={"speculative": {"num_tokens": 3, "prompt_lookup_min": 1}}))
    assert extra["decode-0"]["accepted_tokens"] > 0 and extra["decode-0"]["graph_replays"] > 0


def test_2p2d_on_one_gpu(ray_up: None) -> None:
    extra = _check(_cfg(prefill={"replicas": 2}, decode={"replicas": 2}))
    assert all(set(extra[f"prefill-{i}"]["links"].values()) == {"ipc"} for i in range(2))


def test_1p1d_forced_to_nccl_on_one_gpu(ray_up: None) -> None:
    extra = _check(_cfg(transport={"backend": "nccl"}), nccl_hosts=True)
    assert extra["prefill-0"]["links"] == {"decode-0": "nccl"}
    assert extra["decode-0"]["kv_bytes_placed"] > 0


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9), reason="FP8: sm_89+")
@pytest.mark.parametrize("backend", ["ipc", "nccl"])
def test_1p1d_with_an_fp8_kv_cache_on_one_gpu(ray_up: None, backend: str) -> None:
    """kv_cache.dtype fp8 on CUDA: the caches handed off as bytes, by direct write (CUDA IPC of the
    decode worker's uint8-shared cache) and over NCCL; 8 streams at once, each == a lone runner's
    greedy tokens with an FP8 cache on the same GPU."""
    from engine.model_runner import ModelRunner, SeqInput
    from tests.cpu.harness import RunningServer, _tiny, prompts, wait_until
    from tests.gpu.nccl_one_gpu import own_nccl_hosts

    cfg = _cfg(kv_cache={"dtype": "fp8"}, **({"transport": {"backend": "nccl"}} if backend == "nccl" else {}))
    with own_nccl_hosts() if backend == "nccl" else contextlib.nullcontext():
        srv = RunningServer(cfg)
    try:
        ps = prompts(8, seed=5)
        with cf.ThreadPoolExecutor(8) as ex:
            got = list(ex.map(lambda p: list(srv.generate(prompt=p, max_tokens=12, ignore_eos=True).token_ids), ps))
        assert wait_until(srv.all_idle, 10)
    finally:
        srv.stop()
    model, tok = _tiny()
    lone = ModelRunner(model.to("cuda"), num_blocks=64, block_size=16, kv_dtype=torch.float8_e4m3fn)
    for p, tokens in zip(ps, got):
        ids, out = tok(p)["input_ids"], []
        logits = lone.forward([SeqInput(ids, 0, list(range(32)))])
        for _ in range(12):
            out.append(int(logits[0].argmax()))
            logits = lone.forward([SeqInput([out[-1]], len(ids) + len(out) - 1, list(range(32)))])
        assert tokens == out


def test_1p1d_with_short_prompts_computed_on_decode_on_one_gpu(ray_up: None) -> None:
    """decode.local_prefill_max_tokens on CUDA: prompts of at most 48 tokens are computed by the
    decode worker (prompt chunks in its eager mixed steps), longer ones handed off; 16 at once,
    every stream == HF generate on the GPU."""
    from tests.cpu.harness import RunningServer, prompts, wait_until

    srv = RunningServer(_cfg(decode={"local_prefill_max_tokens": 48}))
    try:
        ps = prompts(16, seed=7)
        with cf.ThreadPoolExecutor(16) as ex:
            rs = list(ex.map(lambda p: srv.generate(prompt=p, max_tokens=16), ps))
        assert [list(r.token_ids) for r in rs] == [hf_greedy_cuda(p, 16) for p in ps]
        local = [r.timings.local_prefill for r in rs]
        assert any(local) and not all(local), local
        assert wait_until(srv.all_idle, 10)
    finally:
        srv.stop()


def test_preemption_and_a_killed_decode_worker_keep_the_tokens_on_cuda(ray_up: None) -> None:
    """On-demand KV on CUDA (graph steps, then mixed eager steps with recompute rows): two streams
    that outgrow a 64-block cache together — the newer is preempted and recomputed — and then the
    decode worker killed under them (Ray restarts it; it adopts both and recomputes their KV). Each
    time the tokens are the ones each prompt gets alone."""
    import threading

    import ray

    from protos.pdserve.v1 import generation_pb2 as pb
    from tests.cpu.harness import RunningServer, prompts, wait_until

    cfg = _cfg(model={"max_model_len": 1024}, kv_cache={"num_blocks": 64},
               limits={"max_prompt_tokens": 512}, cluster={"max_restarts": 2, "health_check_interval_s": 0.5})
    srv = RunningServer(cfg)
    try:
        ps = [p[:400] for p in prompts(6, seed=5, min_words=80, max_words=90)[2:4]]
        gen = lambda p: list(srv.generate(prompt=p, max_tokens=300, ignore_eos=True, timeout=120).token_ids)  # noqa: E731
        alone = [gen(p) for p in ps]
        with cf.ThreadPoolExecutor(2) as ex:
            assert list(ex.map(gen, ps)) == alone  # 2 x 700 tokens > 1024: a preemption
        assert sum(w.preemptions for w in srv.status() if w.role == "decode") > 0

        got: list[list[int]] = [[], []]

        def stream(i: int) -> None:
            for msg in srv.stub.GenerateStream(pb.GenerateRequest(prompt=ps[i], max_tokens=300, ignore_eos=True),
                                               timeout=120):
                got[i] += msg.token_ids

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        assert wait_until(lambda: min(len(g) for g in got) >= 50, 60)
        ray.kill(srv.cluster.workers["decode-0"], no_restart=False)
        for t in threads:
            t.join(120)
        assert got == alone and srv.server.svc.dispatcher.migrations >= 2
    finally:
        srv.stop()
