"""Prompt logprobs (SamplingParams.prompt_logprobs; the OpenAI front's `echo` with `logprobs`): each
prompt token's logprob given the tokens before it equals Hugging Face's log-softmax of the full
forward, however the prompt is chunked and on whichever worker it is computed — a prompt that asks
computes every position even when a prefix of it is cached."""
from __future__ import annotations

import random

import pytest
import torch

from decode_worker.aggregated import AggregatedWorker
from decode_worker.config import AggregatedConfig
from decode_worker.scheduler import DecodeScheduler
from engine.config import KVCacheConfig, ModelConfig
from engine.model_runner import ModelRunner, SeqInput
from engine.prefix_cache import PrefixCache
from engine.tiny import tiny_model
from engine.types import PrefillRequest, SamplingParams, TokenLogprob
from tests.cpu.harness import hf_greedy_ids, wait_until
from tests.cpu.test_workers_inprocess import EOS, Events, running_pair

MODEL = tiny_model()
TOP = 3


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 259) for _ in range(n)]


def _hf(ids: list[int]) -> torch.Tensor:
    """[P, V]: log-softmax of HF's logits at every prompt position."""
    with torch.inference_mode():
        return MODEL(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def _check(ids: list[int], got: tuple[TokenLogprob, ...] | list[TokenLogprob] | None, top: int = TOP) -> None:
    """got[j] scores ids[j + 1] at position j, as HF does."""
    assert got is not None and len(got) == len(ids) - 1
    ref = _hf(ids)
    for j, lp in enumerate(got):
        assert lp.token_id == ids[j + 1]
        assert lp.logprob == pytest.approx(float(ref[j, ids[j + 1]]), abs=1e-4)
        likelier = ref[j] - ref[j, ids[j + 1]]  # [V]: > 0 where HF found a token likelier
        assert int((likelier > 1e-4).sum()) + 1 <= lp.rank <= int((likelier > -1e-4).sum())  # type: ignore[operator]
        want = torch.topk(ref[j], top)
        assert [t for t, _ in lp.top] == want.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(want.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("chunk", [1, 7, 300])
def test_the_runner_scores_every_prompt_position_as_hf_however_chunked(chunk: int, kernels: str) -> None:
    ids = _prompt(300, seed=chunk)
    runner = ModelRunner(MODEL, num_blocks=24, block_size=16, kernels=kernels)
    table = list(range(2, 24))[::-1]  # blocks 0 and 1 are the other row's
    got: list[TokenLogprob] = []
    for start in range(0, len(ids), chunk):
        scores: dict[int, list[TokenLogprob]] = {}
        n = min(chunk, len(ids) - start)
        other = SeqInput(_prompt(5, seed=start), 0, [(start // chunk) % 2])  # a row beside it, not scored
        logits = runner.forward([other, SeqInput(ids[start:start + n], start, table,
                                                 tuple(ids[start + 1:start + n + 1]), TOP)], scores=scores)
        assert set(scores) == ({1} if start + 1 < len(ids) else set()) and logits.shape[0] == 2
        got += scores.get(1, [])
    _check(ids, got)


def test_more_positions_than_one_slice_of_the_vocabulary_pass_are_scored_in_slices() -> None:
    ids = _prompt(600, seed=9)  # SCORE_ROWS (256) at a time: three slices
    runner = ModelRunner(MODEL, num_blocks=40, block_size=16)
    scores: dict[int, list[TokenLogprob]] = {}
    runner.forward([SeqInput(ids, 0, list(range(40)), tuple(ids[1:]), 0)], scores=scores)
    _check(ids, scores[0], top=0)


@pytest.mark.parametrize("kind", ["ipc", "fake"])
def test_a_prefill_worker_returns_prompt_logprobs_and_computes_a_cached_prefix_again(kind: str) -> None:
    ids = _prompt(70, seed=1)
    with running_pair(kind, chunked=True) as pair:
        pw, dw, _, events = pair

        def run(rid: str, sp: SamplingParams) -> tuple[object, list[int]]:
            r = dw.reserve(rid, len(ids), sp, EOS, ids)
            assert r.ok and r.dest is not None
            res = pw.prefill(PrefillRequest(rid, ids, sp, EOS, r.dest))
            assert res.error is None, res.error
            return res, [res.first_token] + [t for e in events.take(rid) for t in e.token_ids]

        plain = SamplingParams(max_tokens=6, ignore_eos=True)
        res, out = run("warm", plain)  # its blocks are cached on both workers now
        assert res.prompt_logprobs is None and out == hf_greedy_ids(ids, 6, ignore_eos=True)
        res, out = run("scored", SamplingParams(max_tokens=6, ignore_eos=True, prompt_logprobs=TOP))
        assert res.cached_tokens == 0 and out == hf_greedy_ids(ids, 6, ignore_eos=True)
        _check(ids, res.prompt_logprobs)
        res, _ = run("again", plain)  # what the scored prompt computed is cached as any other's
        assert res.cached_tokens == 64
        assert wait_until(lambda: pw.check_idle() and dw.check_idle(), 5)


def test_an_aggregated_worker_returns_prompt_logprobs_beside_decoding_rows() -> None:
    w = AggregatedWorker("a0", ModelConfig(path="tiny"), KVCacheConfig(num_blocks=256),
                         AggregatedConfig(max_batch_tokens=48, chunk_tokens=32, max_batch_size=8))
    w.start()
    events = Events(w)
    try:
        ids = _prompt(90, seed=2)

        def run(rid: str, sp: SamplingParams) -> tuple[object, list[int]]:
            assert w.reserve(rid, len(ids), sp, EOS, ids).ok
            res = w.prefill(PrefillRequest(rid, ids, sp, EOS, 0), timeout_s=60)
            assert res.error is None, res.error
            return res, [res.first_token] + [t for e in events.take(rid, 60) for t in e.token_ids]

        _, out = run("warm", SamplingParams(max_tokens=8, ignore_eos=True))
        res, out2 = run("scored", SamplingParams(max_tokens=8, ignore_eos=True, prompt_logprobs=1))
        assert out == out2 == hf_greedy_ids(ids, 8, ignore_eos=True) and res.cached_tokens == 0
        _check(ids, res.prompt_logprobs, top=1)
        assert wait_until(w.check_idle, 5)
    finally:
        events.close()
        w.shutdown()


def test_a_reservation_for_a_scored_prompt_shares_no_cached_prefix() -> None:
    """A decode worker's reservation holds the cached prefix it found (share_on_reserve); a prompt
    computed there (decode.local_prefill_max_tokens) starts after it — so a scored one finds none."""
    s = DecodeScheduler(PrefixCache(16, 4), 4, 5.0, share_on_reserve=True)
    ids = list(range(10, 22))
    assert s.reserve("a", 12, SamplingParams(max_tokens=1), EOS, ids).ok
    s.allocator.commit("a", 12)
    plain = s.reserve("b", 12, SamplingParams(max_tokens=1), EOS, ids)
    scored = s.reserve("c", 12, SamplingParams(max_tokens=1, prompt_logprobs=0), EOS, ids)
    assert plain.dest is not None and plain.dest.shared_tokens == 8
    assert scored.dest is not None and scored.dest.shared_tokens == 0
