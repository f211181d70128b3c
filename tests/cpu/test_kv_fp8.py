"""kv_cache.dtype fp8: the KV cache in FP8 e4m3 (no scales), stored and read by the Triton kernels —
here under Triton's interpreter, on CPU. The reference everywhere is the same computation over K
and V rounded to FP8 by torch (clamped to ±448)."""
from __future__ import annotations

import pytest
import torch

from cluster.config import ConfigError, parse_config
from decode_worker.config import DecodeConfig
from decode_worker.worker import DecodeWorker
from engine import triton_attention as ta
from engine import triton_fused as tf
from engine.config import KVCacheConfig, ModelConfig, TransportConfig
from engine.kv_handoff import FakeHub
from engine.model_runner import ModelRunner, SeqInput
from engine.tiny import tiny_model
from engine.types import SamplingParams
from prefill_worker.config import PrefillConfig
from prefill_worker.worker import PrefillWorker
from tests.cpu.test_workers_inprocess import Events, _run, wire

FP8 = torch.float8_e4m3fn


def _rounded(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-448, 448).to(FP8)


def test_rope_store_rounds_into_an_fp8_cache_as_torch_does() -> None:
    """Every e4m3 value, every midpoint between two (ties to even) and just either side of it, beyond
    ±448 (clamped), -0.0: the stored bytes are torch's .to(float8_e4m3fn) of the clamped values; a
    padded row (slot -1) stores nothing."""
    vals = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    vals = vals[~vals.isnan()].sort().values
    mids = (vals[1:] + vals[:-1]) / 2
    x = torch.cat([vals, mids, mids * (1 + 1e-6), mids * (1 - 1e-6), torch.tensor([500.0, -1000.0, 1e-9, -1e-9])])
    x = torch.nn.functional.pad(x, (0, -x.numel() % 32)).view(-1, 1, 32)  # [T, 1 KV head, 32]
    T = x.shape[0]
    kc = torch.zeros(T + 1, 1, 1, 32, dtype=FP8)
    vc = torch.zeros_like(kc)
    slots = torch.cat([torch.arange(T - 1), torch.tensor([-1])])
    tf.rope_store(torch.zeros(T, 1, 32), x, -x, torch.ones(T, 32), torch.zeros(T, 32), kc, vc, slots)
    assert torch.equal(kc.view(-1, 32)[: T - 1].view(torch.uint8), _rounded(x[:-1, 0]).view(torch.uint8))
    assert torch.equal(vc.view(-1, 32)[: T - 1].view(torch.uint8), _rounded(-x[:-1, 0]).view(torch.uint8))
    assert not kc.view(torch.uint8)[T - 1 :].any()  # the padded row's slot untouched


@pytest.mark.parametrize("splits", [1, 3])
def test_attention_over_an_fp8_cache_is_attention_over_its_values(splits: int) -> None:
    """The decode (split or not) and prefill kernels widen each FP8 key and value to the queries'
    dtype: the same output as over a cache holding those values in float32."""
    g = torch.Generator().manual_seed(splits)
    H, KVH, D, bs = 4, 2, 32, 16
    kc = (torch.randn(8, bs, KVH, D, generator=g) * 4).to(FP8)
    vc = torch.randn(8, bs, KVH, D, generator=g).to(FP8)
    tables = torch.tensor([[3, 1, 6, 0], [2, 5, 0, 0]])
    q = torch.randn(2, H, D, generator=g)
    lens = torch.tensor([50, 20])
    torch.testing.assert_close(ta.paged_decode(q, kc, vc, tables, lens, 0.2, splits=splits),
                               ta.paged_decode(q, kc.float(), vc.float(), tables, lens, 0.2, splits=splits))
    qp = torch.randn(30, H, D, generator=g)
    cu_q, start = torch.tensor([0, 20, 30]), torch.tensor([30, 10])
    seq, m0 = (torch.tensor(t) for t in ta.prefill_tiles([20, 10], 16))
    torch.testing.assert_close(ta.paged_prefill(qp, kc, vc, tables, cu_q, start, seq, m0, 0.2, block_m=16),
                               ta.paged_prefill(qp, kc.float(), vc.float(), tables, cu_q, start, seq, m0, 0.2,
                                                block_m=16))


def _rounding_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """rope_store into a float32 cache, then each stored K and V replaced by torch's FP8 rounding of it."""
    store = tf.rope_store

    def rounded(q, k, v, cos, sin, kc, vc, slots, interleaved=False):  # type: ignore[no-untyped-def]
        out = store(q, k, v, cos, sin, kc, vc, slots, interleaved)
        if kc.dtype == torch.float32:
            live = slots[slots >= 0]
            for c in (kc.view(-1, *kc.shape[2:]), vc.view(-1, *vc.shape[2:])):
                c[live] = _rounded(c[live]).float()
        return out

    monkeypatch.setattr(tf, "rope_store", rounded)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_runner_with_an_fp8_cache_computes_as_over_kv_rounded_to_fp8(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt in two chunks and decode steps beside a new prompt: the logits of a runner whose cache is
    FP8 == those of one whose float32 cache has each K and V rounded to FP8 by torch as it is stored;
    and the FP8 cache's bytes are that rounding of the float32 one's. Refused where the Triton
    kernels do not run the cache."""
    model = tiny_model(seed=4, arch=arch)
    fp8 = ModelRunner(model, num_blocks=16, block_size=16, kernels="triton", kv_dtype=FP8)
    assert fp8.kv.dtype == FP8 and fp8.kv_bytes.dtype == torch.uint8 and fp8.kv_bytes.data_ptr() == fp8.kv.data_ptr()
    ref = ModelRunner(model, num_blocks=16, block_size=16, kernels="triton")
    _rounding_store(monkeypatch)
    a, b = list(range(3, 40)), list(range(50, 61))
    steps = [[SeqInput(a[:20], 0, [0, 1, 2])], [SeqInput(a[20:], 20, [0, 1, 2])],
             [SeqInput([7], len(a), [0, 1, 2]), SeqInput(b, 0, [4, 5])], [SeqInput([9], len(a) + 1, [0, 1, 2]),
                                                                         SeqInput([8], len(b), [4, 5])]]
    with torch.inference_mode():
        for seqs in steps:
            torch.testing.assert_close(fp8.forward(seqs), ref.forward(seqs), atol=1e-5, rtol=1e-5)
    assert torch.equal(fp8.kv.float(), ref.kv)
    with pytest.raises(ValueError, match="kv_cache.dtype: fp8 needs the Triton kernels"):
        ModelRunner(model, num_blocks=16, block_size=16, kernels="torch", kv_dtype=FP8)


def test_kv_cache_dtype_fp8_is_refused_where_the_triton_kernels_do_not_run() -> None:
    with pytest.raises(ConfigError, match="kv_cache.dtype: fp8 needs model.device: cuda"):
        parse_config({"kv_cache": {"dtype": "fp8"}})
    assert parse_config({"kv_cache": {"dtype": "fp8"}, "model": {"kernels": "triton"}}).kv_cache.dtype == "fp8"


@pytest.mark.parametrize("kind", ["ipc", "fake"])
def test_an_fp8_cache_is_handed_off_and_decoded_as_by_one_runner(kind: str) -> None:
    """Prefill and decode workers with FP8 caches (the decode worker's shared as bytes: ipc; or sent
    over a two-sided pair with NCCL's semantics): a request's tokens are a lone FP8 runner's greedy ones."""
    mc = ModelConfig(path="tiny", kernels="triton")
    tc = TransportConfig(timeout_s=20)
    pw = PrefillWorker("p0", mc, PrefillConfig(chunk_tokens=2048), tc, block_size=16, kv_dtype="fp8")
    dw = DecodeWorker("d0", mc, KVCacheConfig(num_blocks=64, dtype="fp8"), DecodeConfig(), tc)
    assert pw.runner.kv.dtype == FP8 and dw.runner.kv.dtype == FP8
    hub = FakeHub()
    pw.start()
    dw.start()
    events = Events(dw)
    try:
        wire(pw, dw, kind, hub)
        prompt = list(range(3, 30))
        tokens, finish = _run((pw, dw, hub, events), "r1", prompt, SamplingParams(max_tokens=6, ignore_eos=True))
        assert finish == "length"
    finally:
        events.close()
        pw.shutdown()
        dw.shutdown()
    alone = ModelRunner(tiny_model(), num_blocks=8, block_size=16, kernels="triton", kv_dtype=FP8)
    want, ids = [], prompt
    with torch.inference_mode():
        logits = alone.forward([SeqInput(ids, 0, [0, 1, 2])])
        for _ in range(6):
            want.append(int(logits[0].argmax()))
            logits = alone.forward([SeqInput([want[-1]], len(ids) + len(want) - 1, [0, 1, 2])])
    assert tokens == want


def test_served_1p1d_with_an_fp8_cache_answers_as_a_lone_fp8_runner() -> None:
    """Through the launcher (Ray actors, the router): both workers' caches FP8, the hand-off between
    them, tokens == a lone FP8 runner's greedy ones; a second prompt sharing the first's prefix
    takes it from the decode worker's FP8 prefix cache."""
    import ray

    from tests.cpu.harness import RunningServer, tiny_config

    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-kv-fp8")
    srv = RunningServer(tiny_config(model={"kernels": "triton"}, kv_cache={"dtype": "fp8", "num_blocks": 256}))
    try:
        ids = list(range(3, 60))
        got = [list(srv.generate(prompt_token_ids=p, max_tokens=5, ignore_eos=True).token_ids) for p in (ids, ids + [70])]
        decode = [w for w in srv.status() if w.role == "decode"]
        assert sum(w.prefix_hit_tokens for w in decode) >= 48  # the first prompt's 3 whole blocks
    finally:
        srv.stop()
        ray.shutdown()
    alone = ModelRunner(tiny_model(), num_blocks=16, block_size=16, kernels="triton", kv_dtype=FP8)
    for p, tokens in zip((ids, ids + [70]), got):
        want: list[int] = []
        with torch.inference_mode():
            logits = alone.forward([SeqInput(p, 0, [0, 1, 2, 3, 4])])
            for _ in range(5):
                want.append(int(logits[0].argmax()))
                logits = alone.forward([SeqInput([want[-1]], len(p) + len(want) - 1, [0, 1, 2, 3, 4])])
        assert tokens == want
