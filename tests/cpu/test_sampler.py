import torch

from engine.sampler import sample
from engine.types import SamplingParams


def _logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 100, generator=g)


def test_greedy_is_argmax() -> None:
    x = _logits()
    assert sample(x, [SamplingParams()] * 4, [0, 1, 2, 3]) == x.argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    x = _logits()
    k1 = SamplingParams(temperature=1.0, top_k=1)
    p0 = SamplingParams(temperature=1.0, top_p=1e-6)
    assert sample(x, [k1] * 4, [0] * 4) == x.argmax(-1).tolist()
    assert sample(x, [p0] * 4, [0] * 4) == x.argmax(-1).tolist()


def test_seed_reproducible_and_independent_of_batch() -> None:
    x = _logits()
    p = SamplingParams(temperature=1.5, seed=42)
    alone = sample(x[2:3], [p], [17])
    in_batch = sample(x, [SamplingParams(temperature=1.0), SamplingParams(), p, SamplingParams(temperature=2.0)],
                      [3, 4, 17, 5])
    assert in_batch[2] == alone[0]
    draws = {tuple(sample(x, [SamplingParams(temperature=5.0, seed=s)] * 4, [1, 2, 3, 4])) for s in range(20)}
    assert len(draws) > 1  # different seeds really sample


def test_top_k_restricts_support() -> None:
    x = _logits()[0:1]
    top3 = set(torch.topk(x[0], 3).indices.tolist())
    got = {sample(x, [SamplingParams(temperature=10.0, top_k=3, seed=s)], [0])[0] for s in range(200)}
    assert got <= top3 and len(got) > 1
