import torch

from engine import race, sampler
from engine.sampler import History, sample
from engine.types import SamplingParams


def _logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 100, generator=g)


def test_greedy_is_argmax() -> None:
    x = _logits()
    assert sample(x, [SamplingParams()] * 4, [0, 1, 2, 3])[0] == x.argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    x = _logits()
    k1 = SamplingParams(temperature=1.0, top_k=1)
    p0 = SamplingParams(temperature=1.0, top_p=1e-6)
    assert sample(x, [k1] * 4, [0] * 4)[0] == x.argmax(-1).tolist()
    assert sample(x, [p0] * 4, [0] * 4)[0] == x.argmax(-1).tolist()


def test_seed_reproducible_and_independent_of_batch() -> None:
    x = _logits()
    p = SamplingParams(temperature=1.5, seed=42)
    alone = sample(x[2:3], [p], [17])[0]
    in_batch = sample(x, [SamplingParams(temperature=1.0), SamplingParams(), p, SamplingParams(temperature=2.0)],
                      [3, 4, 17, 5])[0]
    assert in_batch[2] == alone[0]
    draws = {tuple(sample(x, [SamplingParams(temperature=5.0, seed=s)] * 4, [1, 2, 3, 4])[0]) for s in range(20)}
    assert len(draws) > 1  # different seeds really sample


def test_top_k_restricts_support() -> None:
    x = _logits()[0:1]
    top3 = set(torch.topk(x[0], 3).indices.tolist())
    got = {sample(x, [SamplingParams(temperature=10.0, top_k=3, seed=s)], [0])[0][0] for s in range(200)}
    assert got <= top3 and len(got) > 1


def test_logprobs_are_the_raw_distribution() -> None:
    x = _logits()
    toks, lps = sample(x, [SamplingParams(logprobs=3)] * 4, [0] * 4)
    ref = torch.log_softmax(x, -1)
    for i, lp in enumerate(lps):
        assert lp is not None and lp.token_id == toks[i]
        assert abs(lp.logprob - float(ref[i, toks[i]])) < 1e-6
        assert [t for t, _ in lp.top] == torch.topk(ref[i], 3).indices.tolist()
    _, none = sample(x, [SamplingParams()] * 4, [0] * 4)
    assert none == [None] * 4


def test_penalties_follow_hf_and_openai_semantics() -> None:
    row = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    h = History(prompt=[0], output=[1, 3, 3])
    # repetition 2: seen {0, 1, 3}: positive / 2, negative * 2 → [1, -4, 1, 0.25] → argmax ties → 0
    t, _ = sample(row, [SamplingParams(repetition_penalty=2.0)], [0], [h])
    assert t == [0]
    # frequency 1: token 3 seen twice → 0.5 - 2; presence 1.5: tokens 1 and 3 minus 1.5 → 2 wins
    t, _ = sample(row, [SamplingParams(presence_penalty=1.5, frequency_penalty=1.0)], [0], [h])
    assert t == [0]
    t, _ = sample(torch.tensor([[1.0, 1.2, 1.1]]), [SamplingParams(presence_penalty=0.5)], [0],
                  [History([], [1])])
    assert t == [2]


def test_min_p_removes_the_tail() -> None:
    x = torch.tensor([[5.0, 4.9, 0.0, -1.0]])
    got = {sample(x, [SamplingParams(temperature=1.0, min_p=0.5, seed=s)], [0])[0][0] for s in range(100)}
    assert got == {0, 1}


def test_values_that_overflow_sampling_do_not_fail_the_other_rows() -> None:
    """A temperature of 1e-40 turns logits into ±inf (softmax NaN); others in the batch must not care."""
    x = _logits()
    normal = SamplingParams(temperature=0.8, seed=3)
    alone = sample(x[1:2], [normal], [9])[0]
    extreme = [SamplingParams(temperature=1e-40), SamplingParams(temperature=1e-40, top_p=0.5, seed=1),
               SamplingParams(temperature=3e38, top_k=5)]
    for bad in extreme:
        toks = sample(x[:2], [bad, normal], [9, 9])[0]
        assert toks[1] == alone[0]
        assert 0 <= toks[0] < x.shape[1]
    assert sample(x[:1], [extreme[0]], [0])[0] == [int(x[0].argmax())]  # below 1e-5: greedy (documented)


def test_non_finite_logits_fall_back_to_the_best_finite_token() -> None:
    x = _logits()[:1].clone()
    x[0, 7] = float("nan")
    x[0, 3] = 50.0
    assert sample(x, [SamplingParams(temperature=1.0, seed=0)], [0])[0] == [3]


def test_the_draw_follows_the_filtered_distribution() -> None:
    """20,000 seeded rows of one distribution, in one vectorized call: frequencies match softmax(x / T),
    restricted by top-k / top-p / min-p exactly as documented."""
    x = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20_000
    rows = x.expand(n, -1)

    def freqs(p: SamplingParams) -> torch.Tensor:
        ps = [SamplingParams(**{**p.__dict__, "seed": s}) for s in range(n)]
        toks = sample(rows, ps, [7] * n)[0]
        return torch.bincount(torch.tensor(toks), minlength=6).float() / n

    for temp in (0.7, 1.0, 2.0):
        want = torch.softmax(x / temp, -1)
        assert (freqs(SamplingParams(temperature=temp)) - want).abs().max() < 0.015, temp
    want = torch.softmax(x[:3], -1)
    got = freqs(SamplingParams(temperature=1.0, top_k=3))
    assert got[3:].sum() == 0 and (got[:3] - want).abs().max() < 0.015
    p = torch.softmax(x, -1)  # top_p 0.8: the smallest prefix reaching 0.8 is tokens {0, 1, 2}
    assert p[:2].sum() < 0.8 <= p[:3].sum()
    got = freqs(SamplingParams(temperature=1.0, top_p=0.8))
    assert got[3:].sum() == 0 and (got[:3] - p[:3] / p[:3].sum()).abs().max() < 0.015


def test_noise_for_given_token_ids_is_the_full_rows_noise() -> None:
    """Way 1 relies on it: a token's noise depends on (row key, token id) only."""
    keys = torch.tensor([0, 7, 2**32 - 1])
    full = race.exponentials(keys, 1000)  # [3, 1000]
    ids = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(1))
    assert torch.equal(race.exponentials(keys, 1000, ids), full.gather(1, ids))
    assert bool((full > 0).all()) and abs(float(full.mean()) - 1.0) < 0.05  # Exp(1)


def _mixed_batch(n: int, vocab: int) -> tuple[torch.Tensor, list[SamplingParams]]:
    """Peaked and flat rows under every kind of truncation; some keep more than the candidates."""
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([[5.0], [0.05], [1.0], [2.0]]).repeat(n // 4, 1)
    logits = torch.randn(n, vocab, generator=g) * scale
    params = [SamplingParams(temperature=(0.5, 1.0, 2.0)[i % 3], top_k=(0, 5, 64, 100, 0, 0)[i % 6],
                             top_p=(1.0, 0.5, 0.9, 0.99, 0.9, 1.0, 0.3)[i % 7], min_p=(0.0, 0.05)[i % 2],
                             seed=i) for i in range(n)]
    return logits, params


def test_every_way_draws_what_a_sort_of_the_whole_vocabulary_draws(monkeypatch) -> None:
    monkeypatch.setattr(race, "CANDIDATES", 64)
    monkeypatch.setattr(race, "RACERS", 2)
    n, vocab = 336, 3000
    logits, params = _mixed_batch(n, vocab)
    keys = torch.tensor(sampler._row_keys(params, list(range(n))))
    x = race._scaled(logits, params)
    racing = [i for i, p in enumerate(params) if p.top_k == 0]
    _, _, found = race._nucleus(x[racing], [params[i] for i in racing], keys[racing])
    assert 0 < int(found.sum()) < len(racing)  # way 2 and its fall-back to a sort both run
    assert any(0 < p.top_k <= 64 for p in params) and any(p.top_k > 64 for p in params)  # way 1, way 3
    want, _ = race.draw_sorted(logits, params, keys)  # every row sorted whole (a step in flight's draw)
    got, _ = sample(logits, params, list(range(n)))
    assert got == want.tolist()
    assert sampler.sample_queued(logits, params, list(range(n))).collect()[0] == got
    alone = [sample(logits[i:i + 1], [params[i]], [i])[0][0] for i in range(0, n, 5)]
    assert alone == got[::5]  # and alone a row draws what it draws in the crowd


def test_top_k_keeps_the_ties_of_its_kth_token_beyond_the_candidates(monkeypatch) -> None:
    monkeypatch.setattr(race, "CANDIDATES", 16)
    x = torch.full((1, 200), -5.0)
    x[0, 100:120] = 3.0  # 20 tokens tie for best; top_k 5 keeps all of them
    got = {sample(x, [SamplingParams(temperature=1.0, top_k=5, seed=s)], [0])[0][0] for s in range(400)}
    assert got == set(range(100, 120))


def test_logit_bias_bans_and_forces_tokens_of_its_own_row_only() -> None:
    x = _logits()
    best = x.argmax(-1).tolist()
    ban = SamplingParams(logit_bias=((best[0], -100.0),))  # greedy: the runner-up instead
    force = SamplingParams(temperature=1.0, seed=3, logit_bias=((7, 100.0), (8, -5.0)))
    hot = SamplingParams(temperature=2.0, seed=4, logit_bias=((best[3], -100.0), (1000, 100.0)))  # 1000: past V
    toks, lps = sample(x, [ban, force, SamplingParams(logprobs=1), hot], [0, 1, 2, 3])
    assert toks[0] == x[0].clone().index_fill_(0, torch.tensor([best[0]]), float("-inf")).argmax().item()
    assert toks[1] == 7 and toks[2] == best[2] and toks[3] != best[3]
    alone = sample(x[2:3], [SamplingParams(logprobs=1)], [2])[1][0]
    assert lps[2] == alone  # another row's bias changes nothing of this one
    draws = {sample(x[3:4], [SamplingParams(temperature=2.0, seed=s, logit_bias=((best[3], -100.0),))], [0])[0][0]
             for s in range(100)}
    assert best[3] not in draws and len(draws) > 5  # banned, and the rest still drawn from


def test_allowed_token_ids_are_the_only_ones_a_row_takes_and_only_in_its_row() -> None:
    x = _logits()
    best = x.argmax(-1).tolist()
    few = (3, 50, 99, 1000)  # 1000: past V, skipped
    params = [SamplingParams(allowed_token_ids=few), SamplingParams(), SamplingParams(logprobs=1),
              SamplingParams(temperature=3.0, seed=1, allowed_token_ids=few)]
    toks, lps = sample(x, params, [0, 1, 2, 3])
    assert toks[0] == max(few[:3], key=lambda t: x[0, t].item()) and toks[1:3] == best[1:3]
    assert lps[2] == sample(x[2:3], [SamplingParams(logprobs=1)], [2])[1][0]  # the raw distribution, as alone
    draws = {sample(x[3:4], [SamplingParams(temperature=3.0, seed=s, allowed_token_ids=few)], [0])[0][0]
             for s in range(100)}
    assert draws == set(few[:3])  # each allowed one is drawn, nothing else
    assert sampler.sample_queued(x, params, [0, 1, 2, 3]).collect() == (toks, lps)  # queued: the same


def test_banned_tokens_are_never_taken_and_only_in_their_row() -> None:
    x = _logits()
    best = x.argmax(-1).tolist()
    top2 = torch.topk(x[1], 2).indices.tolist()
    banned = [(best[0],), top2, (), (best[3], 1000)]  # 1000: past V, skipped
    params = [SamplingParams(), SamplingParams(), SamplingParams(), SamplingParams(temperature=3.0, seed=1)]
    toks, _ = sample(x, params, [0, 1, 2, 3], banned=banned)
    assert toks[0] != best[0] and toks[1] not in top2 and toks[2] == best[2]
    draws = {sample(x[3:4], [SamplingParams(temperature=3.0, seed=s)], [0], banned=[(best[3],)])[0][0]
             for s in range(100)}
    assert best[3] not in draws and len(draws) > 5


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    from engine.types import banned_now

    s = SamplingParams(max_tokens=10, min_tokens=3, stop_token_ids=(7,))
    assert [banned_now(s, n, (2,)) for n in (0, 2, 3)] == [(7, 2), (7, 2), ()]
    assert banned_now(SamplingParams(min_tokens=3, ignore_eos=True), 0, (2,)) == ()
    assert banned_now(SamplingParams(), 0, (2,)) == ()


def test_a_bad_word_bans_its_last_token_where_the_output_ends_with_the_rest() -> None:
    from engine.sampler import needs_history
    from engine.types import banned_now

    s = SamplingParams(bad_words=((9,), (4, 5, 6)), min_tokens=2)
    assert banned_now(s, 0, (2,), ()) == (2, 9)  # a one-token word always; EOS before min_tokens
    assert banned_now(s, 3, (2,), (1, 4)) == (9,)
    assert banned_now(s, 3, (2,), (4, 5)) == (9, 6)
    assert banned_now(s, 3, (2,), (3, 4, 5)) == (9, 6)
    assert banned_now(s, 1, (2,), (5,)) == (2, 9)  # shorter than the word's head
    assert needs_history(s) and not needs_history(SamplingParams(bad_words=((9,),)))
