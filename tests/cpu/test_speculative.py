"""Speculative decoding by prompt lookup (decode.speculative): drafts from a row's own tokens, checked
in one forward, give the tokens decoding one at a time gives.

The tiny model's greedy answers repeat themselves, so drafts are found, and some are rejected."""
from __future__ import annotations

import concurrent.futures as cf
from dataclasses import replace

import pytest
import ray
import torch
from pydantic import ValidationError

from decode_worker.aggregated import AggregatedWorker
from decode_worker.config import AggregatedConfig, DecodeConfig, SpeculativeConfig
from decode_worker.decode_rows import Then
from decode_worker.request import DecodeRequest, DecodeStatus
from decode_worker.scheduler import DecodeScheduler
from engine.config import KVCacheConfig, ModelConfig
from engine.model_loader import load_model
from engine.model_runner import ModelRunner, SeqInput
from engine.prefix_cache import PrefixCache
from engine.sampler import sample
from engine.speculative import MAX_WAIT, Lookup, Pace, accept, propose
from engine.structured import grammar_text
from engine.step_loop import Step
from engine.tiny import tiny_model, tiny_tokenizer
from engine.types import FinishReason, PrefillRequest, SamplingParams, TokenLogprob
from router.metrics import RouterMetrics
from tests.cpu.harness import RunningServer, hf_greedy, hf_greedy_ids, prompts, tiny_config, wait_until
from tests.cpu.test_workers_inprocess import Events, _idle, _run, running_pair

EOS = (2,)
LOOKUP = Lookup(num_tokens=4, min_n=1, max_n=3)


# -- the method ------------------------------------------------------------------------------------
def test_propose_takes_what_followed_the_latest_occurrence_of_the_longest_suffix() -> None:
    #          0  1  2  3  4  5  6  7  8  9
    context = [5, 6, 7, 8, 9, 1, 6, 7, 3, 6, 7]
    # suffix [6, 7] occurred at 1 and 6 (3 tokens [x, 6, 7] never did): the latest, at 6, was followed by 3, 6, 7
    assert propose(context, LOOKUP, 8) == [3, 6, 7]
    assert propose([1, 2, 3, 9, 2, 3, 4, 0, 2, 3], LOOKUP, 8) == [4, 0, 2, 3]  # 3 tokens [9, 2, 3]: no; [2, 3] at 4
    assert propose([1, 2, 3, 9, 2, 3], LOOKUP, 8) == [9, 2, 3]  # only at 1
    assert propose(context, LOOKUP, 2) == [3, 6]  # at most `most`
    assert propose(context, LOOKUP, 0) == []
    assert propose([1, 2, 3, 4], LOOKUP, 8) == []  # 4 never occurred before
    assert propose([1, 2, 3, 4, 5, 1], Lookup(4, 2, 3), 8) == []  # [5, 1] never occurred; [1] alone is below min_n
    assert propose([1, 2, 3, 4, 5, 1], LOOKUP, 8) == [2, 3, 4, 5]
    assert propose([7, 7, 7], LOOKUP, 8) == [7]  # the latest occurrence of [7, 7] ends one before the last


def _propose_by_hand(ctx: list[int], lookup: Lookup, most: int) -> list[int]:
    """The definition, spelled out: for n from max_n down to min_n, the latest i < len - n where
    ctx[i:i+n] is the last n tokens; what follows it."""
    for n in range(min(lookup.max_n, len(ctx) - 1), lookup.min_n - 1, -1):
        for i in range(len(ctx) - n - 1, -1, -1):
            if ctx[i : i + n] == ctx[len(ctx) - n :]:
                return ctx[i + n : i + n + min(most, lookup.num_tokens)]
    return []


def test_propose_equals_the_definition_on_random_contexts() -> None:
    import random

    rng = random.Random(3)
    for _ in range(400):
        ctx = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]  # 4 symbols: many repeats
        lookup = Lookup(rng.randrange(1, 6), *sorted((rng.randrange(1, 5), rng.randrange(1, 5))))
        assert propose(ctx, lookup, 8) == _propose_by_hand(ctx, lookup, 8), (ctx, lookup)


def test_longest_suffix_wins_over_a_later_shorter_one() -> None:
    context = [1, 2, 3, 4, 9, 3, 5, 2, 3]  # [2, 3] at 1 (then 4); [3] alone later at 5 (then 5)
    assert propose(context, LOOKUP, 2) == [4, 9]
    assert propose(context, Lookup(4, 1, 1), 2) == [5, 2]


def test_accept_keeps_matching_drafts_then_the_models_token() -> None:
    assert accept([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]  # all, and the token after them
    assert accept([4, 5, 6], [4, 9, 6, 7]) == [4, 9]  # the first mismatch is replaced by the model's
    assert accept([4, 5, 6], [1, 5, 6, 7]) == [1]
    assert accept([], [3]) == [3]


def test_a_rows_pace_follows_its_acceptance_and_backs_off_after_misses() -> None:
    p = Pace(4)
    assert p.ready and p.length == 4
    p.update(4, 4, most=4)
    assert p.length == 4  # all accepted: at most num_tokens
    p.update(4, 2, most=4)
    assert p.length == 2  # as many as were accepted
    p.update(2, 2, most=4)
    assert p.length == 3  # one more
    waits = []
    for _ in range(8):  # misses: it waits 1, 3, 7, ... steps (at most MAX_WAIT), then tries one draft
        p.update(p.length, 0, most=4)
        n = 0
        while not p.ready:
            p.tick()
            n += 1
        waits.append(n)
        assert p.length == 1
    assert waits == [1, 3, 7, 15, 31, MAX_WAIT, MAX_WAIT, MAX_WAIT]
    p.update(1, 1, most=4)  # an accepted draft ends the back-off
    assert (p.length, p.misses, p.ready) == (2, 0, True)


def test_a_rows_tokens_are_kept_as_an_array_that_grows_with_its_output() -> None:
    p, prompt, out = Pace(4), list(range(10, 15)), [1]
    for step in range(40):
        got = p.context(prompt, out)
        assert got.tolist() == prompt + out, step
        out += [step, step + 1][: 1 + step % 2]  # one or two tokens a step (accepted drafts)
    assert propose(p.context(prompt, [*out, 3, 4]), LOOKUP, 4) == propose(prompt + out + [3, 4], LOOKUP, 4) != []


def test_config_is_validated() -> None:
    assert SpeculativeConfig().num_tokens == 0  # off by default
    with pytest.raises(ValidationError, match="prompt_lookup_min"):
        SpeculativeConfig(num_tokens=3, prompt_lookup_min=4, prompt_lookup_max=2)
    with pytest.raises(ValidationError):
        SpeculativeConfig(num_tokens=17)


# -- the scheduler and the sampling of a draft row ---------------------------------------------------
def test_a_run_of_tokens_ends_at_the_token_that_ends_the_request() -> None:
    s = DecodeScheduler(PrefixCache(32, 4), 4, reserve_timeout_s=10)
    for rid, sp in (("stop", SamplingParams(max_tokens=20, stop_token_ids=(9,))), ("len", SamplingParams(max_tokens=4)),
                    ("on", SamplingParams(max_tokens=20))):
        assert s.reserve(rid, 5, sp, EOS).ok and s.start_write(rid, 5) is not None
        assert s.on_kv_landed(rid, 7) is not None
    batch = s.schedule()
    lp = [TokenLogprob(t, -0.5) for t in (5, 9, 6, 4)]
    ev = s.on_runs(batch, [[5, 9, 6, 4], [5, 6, 7, 8], [5, 6, 7]], [lp, [None] * 4, [None] * 3])
    assert [(e.token_ids, e.finish_reason) for e in ev] == [
        ([5, 9], FinishReason.STOP), ([5, 6, 7], FinishReason.LENGTH), ([5, 6, 7], None)]
    assert ev[0].logprobs == lp[:2] and ev[1].logprobs is None
    assert list(s.requests) == ["on"] and s.requests["on"].output_ids == [7, 5, 6, 7]
    assert s.tokens_generated == 2 + 3 + 3


def test_drafts_fill_only_the_batchs_free_rows(spec: Worker) -> None:
    """A step has at most max_batch_size rows (8 here): on CUDA it stays within the decode graphs."""
    def running(i: int) -> DecodeRequest:
        return DecodeRequest(f"r{i}", 8, SamplingParams(max_tokens=50), EOS, [60 + 4 * i + b for b in range(4)],
                             prompt_ids=[1, 2, 3, 4, 1, 2, 3, 4], status=DecodeStatus.RUNNING, output_ids=[1, 2])

    for n, most in ((1, 4), (3, 5), (6, 2), (8, 0)):
        seqs, drafts = spec.w._decode_rows([running(i) for i in range(n)])
        assert len(seqs) == n + sum(map(len, drafts)) <= 8 and sum(map(len, drafts)) == most, n
        assert all(d == [3, 4, 1, 2][: len(d)] for d in drafts)  # (after [1, 2]: what followed it before)


def test_each_draft_position_is_sampled_with_the_drafts_before_it_as_output(spec: Worker) -> None:
    """Penalties and min_tokens at draft position j see the output plus the first j drafts."""
    sp = SamplingParams(max_tokens=10, frequency_penalty=0.6, min_tokens=3, stop_token_ids=(9,))
    r = DecodeRequest("x", 3, sp, EOS, [0], prompt_ids=[1, 2, 3], status=DecodeStatus.RUNNING, output_ids=[4])
    step = Step([r], [], [SeqInput([t], 3 + j, [0]) for j, t in enumerate([4, 5, 5, 9])], [], [[5, 5, 9]])
    logits = torch.zeros(4, spec.w.runner.vocab_size)  # [1 + 3 drafts, V]
    logits[:, 5], logits[:, 9] = 1.0, 0.8
    args = spec.w._decode_samples(step)
    assert args[1] == [4, 5, 6, 7] and [list(h.output) for h in args[2]] == [[4], [4, 5], [4, 5, 5], [4, 5, 5, 9]]
    # 5 wins until it was drawn twice (1 - 2 * 0.6 < 0.8); 9 is banned until 3 tokens are out
    tokens, lps = sample(logits, *args)
    assert tokens[:3] == [5, 5, 9]
    assert spec.w._accepted(step, tokens, lps)[0] == [[5, 5, 9, tokens[3]]]


def test_a_draft_position_past_the_thinking_budget_is_forced_to_close_it(spec: Worker) -> None:
    sp = SamplingParams(max_tokens=10, thinking_budget=2, think_end_id=9)
    r = DecodeRequest("t", 3, sp, EOS, [0], prompt_ids=[1, 2, 3], status=DecodeStatus.RUNNING, output_ids=[4])
    step = Step([r], [], [SeqInput([t], 3 + j, [0]) for j, t in enumerate([4, 5, 5, 6])], [], [[5, 5, 6]])
    logits = torch.zeros(4, spec.w.runner.vocab_size)
    logits[:, 5] = 1.0
    args = spec.w._decode_samples(step)
    assert args[5] == [None, 9, 9, 9]  # 1 thought token, then 2: spent
    tokens, lps = sample(logits, *args)
    assert spec.w._accepted(step, tokens, lps)[0] == [[5, 9]]
    assert r.think is not None and r.think.followed == 1  # the row's own budget: its output only


def test_a_step_follows_one_in_flight_only_where_no_row_could_draft(spec: Worker, plain: Worker) -> None:
    """decode.overlap_steps with drafts: a step is queued behind the one in flight only where its
    rows could feed none (a full batch, or every row waiting after misses)."""
    def rows(n: int, wait: int | None) -> list[DecodeRequest]:
        out = [DecodeRequest(f"w{i}", 3, SamplingParams(), EOS, [0], status=DecodeStatus.RUNNING) for i in range(n)]
        for r in out:
            r.pace = None if wait is None else Pace(2, misses=1, wait=wait)
        return out

    assert spec.w._may_draft(rows(3, None)) and spec.w._may_draft(rows(3, 0))
    assert not spec.w._may_draft(rows(3, 2))  # all waiting
    assert not spec.w._may_draft(rows(8, None))  # a full batch (max_batch_size 8)
    assert not plain.w._may_draft(rows(3, None))  # drafts off


def test_an_output_then_drafts_reads_as_the_joined_list() -> None:
    head, tail = list(range(10)), [100, 101, 102]
    x, full = Then(head, tail), head + tail
    assert len(x) == 13 and list(x) == full and tuple(x[11:]) == (101, 102)
    for a in range(-15, 16):
        for b in range(-15, 16):
            assert x[a:b] == full[a:b], (a, b)
    assert [x[i] for i in range(-13, 13)] == [full[i] for i in range(-13, 13)]


# -- the forward -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "kernels"), [
    ("llama", "auto"), ("llama", "torch"), ("llama", "triton"), ("llama", "triton-graphs"),
    ("deepseek_v2", "auto"), ("deepseek_v2", "triton-graphs"),  # latent attention
    ("gemma3_text", "auto"), ("gemma3_text", "triton"),  # sliding windows
])
def test_draft_rows_attend_to_the_drafts_before_them_in_the_same_forward(arch: str, kernels: str) -> None:
    """A decode row and a sequence's last token with 4 drafts (one-token rows at consecutive
    positions) in one forward, beside a prompt chunk (or through the decode graphs' buffers): the
    draft rows' logits are Hugging Face's at those positions (each layer stores every row's K/V
    before any row attends)."""
    model = load_model(ModelConfig(path="tiny")) if arch == "llama" else tiny_model(arch=arch)
    runner = ModelRunner(model, 64, 16, kernels.removesuffix("-graphs"))
    if kernels.endswith("graphs"):
        runner.use_decode_graphs(max_batch=8, max_model_len=128, capture=False)
    a, b = list(range(3, 40)), list(range(50, 71))  # b's last 5 tokens: its fed token and 4 drafts
    runner.forward([SeqInput(a[:-1], 0, [0, 1, 2]), SeqInput(b[:-5], 0, [3, 4])])
    rows = [SeqInput(a[-1:], len(a) - 1, [0, 1, 2])] + [SeqInput([t], len(b) - 5 + j, [3, 4])
                                                         for j, t in enumerate(b[-5:])]
    prompt = [] if runner.graphs is not None else [SeqInput(list(range(80, 100)), 0, [5, 6])]
    out = runner.forward(rows + prompt)  # [6 (+1), V]
    assert runner.graphs is None or runner.graphs.replays == 1
    with torch.inference_mode():
        want = model(torch.tensor([b])).logits[0, -5:].float()  # [5, V]
        want_a = model(torch.tensor([a])).logits[0, -1].float()
    torch.testing.assert_close(out[1:6], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[0], want_a, rtol=1e-4, atol=1e-4)


# -- a worker --------------------------------------------------------------------------------------
class Worker:
    def __init__(self, speculative: int, num_blocks: int = 512, allocation: str = "on_demand", **cfg: int) -> None:
        sections = {"max_batch_tokens": 64, "chunk_tokens": 32, "max_batch_size": 8} | cfg
        self.w = AggregatedWorker(
            "a0", ModelConfig(path="tiny"), KVCacheConfig(num_blocks=num_blocks, allocation=allocation),
            AggregatedConfig(**sections, speculative=SpeculativeConfig(  # type: ignore[arg-type]
                num_tokens=speculative, prompt_lookup_min=1, prompt_lookup_max=3)))
        self.w.start()
        self.events = Events(self.w)
        self.tok = tiny_tokenizer()

    def close(self) -> None:
        self.events.close()
        self.w.shutdown()

    def run(self, rid: str, prompt: str | list[int], sp: SamplingParams) -> tuple[list[int], list[TokenLogprob]]:
        ids = self.tok(prompt)["input_ids"] if isinstance(prompt, str) else prompt
        assert self.w.reserve(rid, len(ids), sp, EOS, list(ids)).ok
        res = self.w.prefill(PrefillRequest(rid, ids, sp, EOS, None), timeout_s=60)
        assert res.error is None, res.error
        out, lps = [res.first_token], [res.first_logprob] if res.first_logprob else []
        if res.finished is None:
            for e in self.events.take(rid, 60):
                out += e.token_ids
                lps += e.logprobs or []
        return out, lps

    @property
    def drafts(self) -> tuple[int, int]:
        x = self.w.stats().extra
        return x["draft_tokens"], x["accepted_tokens"]


@pytest.fixture(scope="module")
def spec() -> Worker:  # type: ignore[misc]
    w = Worker(4)
    yield w  # type: ignore[misc]
    w.close()


@pytest.fixture(scope="module")
def plain() -> Worker:  # type: ignore[misc]
    w = Worker(0)
    yield w  # type: ignore[misc]
    w.close()


def _crowd(w: Worker, runs: dict[str, tuple[str, SamplingParams]]) -> dict[str, tuple[list[int], list[TokenLogprob]]]:
    with cf.ThreadPoolExecutor(len(runs)) as ex:
        futs = {k: ex.submit(w.run, k, p, sp) for k, (p, sp) in runs.items()}
        return {k: f.result() for k, f in futs.items()}


def test_greedy_with_drafts_equals_hf_generate_solo_and_in_a_crowd(spec: Worker) -> None:
    ps = prompts(10, seed=21)
    before = spec.drafts
    for i, p in enumerate(ps[:3]):
        assert spec.run(f"solo{i}", p, SamplingParams(max_tokens=40, ignore_eos=True))[0] == hf_greedy(p, 40, True)
    lengths = [40, 7, 33, 1, 2, 64, 17, 40, 5, 29]  # max_tokens reached inside an accepted run too
    got = _crowd(spec, {f"c{i}": (p, SamplingParams(max_tokens=n, ignore_eos=True))
                        for i, (p, n) in enumerate(zip(ps, lengths))})
    for i, (p, n) in enumerate(zip(ps, lengths)):
        assert got[f"c{i}"][0] == hf_greedy(p, n, ignore_eos=True), p
    drafted, accepted = (a - b for a, b in zip(spec.drafts, before))
    assert 0 < accepted < drafted  # drafts were fed, most accepted, some not
    assert wait_until(spec.w.check_idle, 5)


def test_a_stop_token_inside_accepted_drafts_ends_the_answer_there(spec: Worker) -> None:
    p = prompts(6, seed=5)[4]
    full = hf_greedy(p, 48, ignore_eos=True)
    stop = full[30]  # a token the answer reaches late (after repeats that feed drafts)
    want = full[: full.index(stop) + 1]
    got, _ = spec.run("stop", p, SamplingParams(max_tokens=48, stop_token_ids=(stop,)))
    assert got == want
    assert wait_until(spec.w.check_idle, 5)


def test_penalties_min_tokens_bias_and_logprobs_as_without_drafts(spec: Worker, plain: Worker) -> None:
    """A row's constraints at each draft position are those of its output so far: the same tokens
    (and logprobs) as decoding one at a time; a drawn, seeded row beside them draws the same."""
    ps = prompts(6, seed=33)
    params = [SamplingParams(max_tokens=30, repetition_penalty=1.15, ignore_eos=True),
              SamplingParams(max_tokens=30, frequency_penalty=0.4, presence_penalty=0.2, ignore_eos=True),
              SamplingParams(max_tokens=24, min_tokens=20, logit_bias=((7, 2.0),)),
              SamplingParams(max_tokens=24, logprobs=3, ignore_eos=True),
              SamplingParams(max_tokens=24, bad_words=((5, 6),), ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0.8, seed=7, ignore_eos=True)]
    runs = {f"k{i}": (p, sp) for i, (p, sp) in enumerate(zip(ps, params))}
    before = spec.drafts
    got, want = _crowd(spec, runs), _crowd(plain, {k: (p, replace(sp)) for k, (p, sp) in runs.items()})
    assert spec.drafts[0] > before[0]  # drafts were fed
    for k in runs:
        assert got[k][0] == want[k][0], k
        assert [lp.token_id for lp in got[k][1]] == [lp.token_id for lp in want[k][1]]
        for a, b in zip(got[k][1], want[k][1]):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_a_seeded_drawn_row_draws_the_tokens_it_draws_without_drafts(spec: Worker, plain: Worker) -> None:
    """A drawn row accepts a draft where its draw is the draft; a seeded draw depends on its seed,
    position and logits only: the same tokens with drafts as without, for every way of drawing."""
    ps = prompts(8, seed=40)
    params = [SamplingParams(max_tokens=40, temperature=0.3, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.6, seed=2, top_p=0.9, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.5, seed=3, top_k=5, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.4, seed=4, min_p=0.1, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.3, seed=6, repetition_penalty=1.1, ignore_eos=True)]
    runs = {f"s{i}": (p, sp) for i, (p, sp) in enumerate(zip(ps, params))}
    before = spec.drafts
    got, want = _crowd(spec, runs), _crowd(plain, runs)
    assert spec.drafts[1] > before[1]  # drawn rows accepted drafts
    for k in runs:
        assert got[k][0] == want[k][0], k
        assert [lp.token_id for lp in got[k][1]] == [lp.token_id for lp in want[k][1]]


def test_grammars_and_thinking_budgets_as_without_drafts(spec: Worker, plain: Worker) -> None:
    """A draft position's mask comes from a copy of the row's grammar that followed the drafts
    before it, its forced token from a copy of its thinking budget: the same tokens as without
    drafts, the row's own grammar and budget stepping only with the tokens it keeps."""
    ps = prompts(6, seed=50)
    close = 10  # "</think>" of this test: one token of the tiny vocabulary
    params = [SamplingParams(max_tokens=48, grammar=grammar_text("regex", r"(ab|abc|ca)+!")),
              SamplingParams(max_tokens=48, temperature=0.5, seed=9, grammar=grammar_text("regex", r"(xy|xyz)+\.")),
              SamplingParams(max_tokens=48, grammar=grammar_text("choice", ["yes yes yes yes", "no no no no no"])),
              SamplingParams(max_tokens=30, thinking_budget=12, think_end_id=close, ignore_eos=True),
              SamplingParams(max_tokens=30, thinking_budget=3, think_end_id=close, temperature=0.4, seed=2,
                             ignore_eos=True)]
    runs = {f"g{i}": (p, sp) for i, (p, sp) in enumerate(zip(ps, params))}
    before = spec.drafts
    got, want = _crowd(spec, runs), _crowd(plain, runs)
    assert spec.drafts[1] > before[1]
    for k in runs:
        assert got[k][0] == want[k][0], k
    think = got["g3"][0]
    assert close in think and think.index(close) <= 12  # the budget forced "</think>" by its 13th token


def test_drafts_across_blocks_and_under_preemption_leak_nothing() -> None:
    """A small on-demand cache: drafts take a block more where one is free, rows are preempted
    and recomputed; the answers are Hugging Face's, and every block comes back."""
    w = Worker(4, num_blocks=20, max_batch_tokens=96)
    try:
        ps = [p[:40] for p in prompts(10, seed=9, min_words=8)[2:8]]  # 6 × (40 + 48 tokens): 36 blocks at the end
        got = _crowd(w, {f"b{i}": (p, SamplingParams(max_tokens=48, ignore_eos=True)) for i, p in enumerate(ps)})
        for i, p in enumerate(ps):
            assert got[f"b{i}"][0] == hf_greedy(p, 48, ignore_eos=True), p
        assert w.drafts[1] > 0
        assert w.w.stats().extra["preemptions"] > 0
        assert wait_until(w.w.check_idle, 5)
    finally:
        w.close()


def test_upfront_blocks_hold_every_draft() -> None:
    w = Worker(6, allocation="upfront")
    try:
        ids = [40, 41, 42, 43] * 6  # a prompt that repeats: drafts at once
        got, _ = w.run("u", ids, SamplingParams(max_tokens=30, ignore_eos=True))
        assert got == hf_greedy_ids(ids, 30, ignore_eos=True)
        assert w.drafts[1] > 0 and wait_until(w.w.check_idle, 5)
    finally:
        w.close()


def test_a_decode_worker_fed_by_a_prefill_worker_speculates_too() -> None:
    """1P1D (CUDA IPC's CPU stand-in): the decode worker's rows feed drafts over the handed-off KV."""
    tok = tiny_tokenizer()
    decode = DecodeConfig(speculative=SpeculativeConfig(num_tokens=4, prompt_lookup_min=1))
    with running_pair("ipc", decode=decode) as pair:
        _, dw, _, _ = pair
        ps = prompts(8, seed=14)
        with cf.ThreadPoolExecutor(len(ps)) as ex:
            outs = list(ex.map(lambda ip: _run(pair, f"d{ip[0]}", tok(ip[1])["input_ids"],
                                               SamplingParams(max_tokens=32, ignore_eos=True)), enumerate(ps)))
        for p, (toks, _) in zip(ps, outs):
            assert toks == hf_greedy(p, 32, ignore_eos=True)
        assert dw.accepted_tokens > 0
        assert _idle(*pair[:2])


@pytest.mark.parametrize("mode", ["disaggregated", "aggregated"])
def test_the_yaml_turns_it_on_through_the_router(mode: str) -> None:
    """decode.speculative (aggregated.speculative) from the YAML to the workers: the router's answers
    are Hugging Face's, and a scrape shows the drafts fed and accepted."""
    section = "decode" if mode == "disaggregated" else "aggregated"
    ray.init(num_cpus=4, include_dashboard=False, namespace=f"pdserve-spec-{mode}")
    try:
        with RunningServer(tiny_config(mode=mode, **{section: {"num_cpus": 0.5, "speculative": {
                "num_tokens": 3, "prompt_lookup_min": 1}}})) as server:
            ps = prompts(4, seed=8)[1:]
            with cf.ThreadPoolExecutor(len(ps)) as ex:
                got = list(ex.map(lambda p: list(server.generate(prompt=p, max_tokens=30, ignore_eos=True,
                                                                 timeout=120).token_ids), ps))
            assert got == [hf_greedy(p, 30, ignore_eos=True) for p in ps]
            worker = server.cluster.decodes[0]  # (the aggregated workers too)
            m = RouterMetrics()
            m.set_workers([ray.get(worker.stats.remote(), timeout=30)])
            lab = {"role": "decode" if mode == "disaggregated" else "aggregated", "worker": f"{section}-0"}
            drafted = m.registry.get_sample_value("pdserve_worker_draft_tokens", lab)
            accepted = m.registry.get_sample_value("pdserve_worker_accepted_tokens", lab)
            assert drafted is not None and accepted is not None and 0 < accepted <= drafted
            assert wait_until(server.all_idle, timeout=5)
    finally:
        ray.shutdown()
