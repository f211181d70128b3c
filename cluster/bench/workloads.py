"""Workloads: how long each prompt and answer is, and the prompt text (public-domain corpus).

Prompts are cut from `corpus.txt` (public-domain prose: Austen, Melville, Dickens, Carroll, ...)
at exact token lengths with the served model's tokenizer, so runs are reproducible offline.

| name          | input tokens                           | output tokens                |
|---------------|----------------------------------------|------------------------------|
| fixed         | --input-len                            | --output-len                 |
| chat          | log-normal, median 128 (8..1024)       | log-normal, median 96 (8..512) |
| prefill-heavy | 80%: 64, 20%: 1024 (long documents)    | 80%: 64, 20%: 16             |
| decode-heavy  | 32                                     | 256                          |
| shared-prefix | 1024 shared by all (a system prompt) + 64 of its own | 64              |
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).with_name("corpus.txt")
WORKLOADS = ("fixed", "chat", "prefill-heavy", "decode-heavy", "shared-prefix")
SHARED_PREFIX = 1024  # tokens of the shared-prefix workload's common start


@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    input_len: int
    output_len: int


def lengths(name: str, n: int, seed: int, input_len: int, output_len: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    longs = set(rng.sample(range(n), round(0.2 * n))) if name == "prefill-heavy" else set()
    out = []
    for k in range(n):
        if name == "fixed":
            out.append((input_len, output_len))
        elif name == "chat":
            i = int(min(1024, max(8, rng.lognormvariate(math.log(128), 0.8))))
            o = int(min(512, max(8, rng.lognormvariate(math.log(96), 0.6))))
            out.append((i, o))
        elif name == "prefill-heavy":
            out.append((1024, 16) if k in longs else (64, 64))  # exactly 20% long, at seeded places
        elif name == "decode-heavy":
            out.append((32, 256))
        elif name == "shared-prefix":
            out.append((SHARED_PREFIX + 64, 64))
        else:
            raise ValueError(f"--workload: {name!r} is not one of {', '.join(WORKLOADS)}")
    return out


def build(name: str, n: int, tokenizer: Any, seed: int = 0, input_len: int = 128, output_len: int = 64) -> list[RequestSpec]:
    """n requests; each prompt is `input_len` tokens of corpus text starting at a random offset
    (shared-prefix: the corpus's first SHARED_PREFIX tokens, then its own at a random offset)."""
    ids = tokenizer(CORPUS.read_text())["input_ids"]
    rng = random.Random(seed + 1)
    shared = (ids * (SHARED_PREFIX // len(ids) + 1))[:SHARED_PREFIX] if name == "shared-prefix" else []
    specs = []
    for i_len, o_len in lengths(name, n, seed, input_len, output_len):
        own = i_len - len(shared)
        reps = -(-(own + 1) // len(ids)) + 1
        pool = ids * reps
        start = rng.randrange(0, len(ids))
        piece = shared + pool[start : start + own]
        text = tokenizer.decode(piece)
        real = len(tokenizer(text)["input_ids"])  # decode → encode may merge differently at the edges
        specs.append(RequestSpec(text, real, o_len))
    return specs
