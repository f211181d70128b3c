"""The embedded default model (SmolLM2-135M-Instruct) through the cluster equals HF generate. Slow."""
from __future__ import annotations

import concurrent.futures as cf

import pytest
import ray
import torch

from engine.config import ModelConfig
from engine.model_loader import load_model, load_tokenizer
from tests.cpu.harness import RunningServer, tiny_config

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three uses of a GPU:",
    "The quick brown fox",
    "Water boils at",
    "In 1969, the first humans",
    "A haiku about autumn leaves:",
]


@pytest.fixture(scope="module")
def server():
    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-test")
    srv = RunningServer(tiny_config(model={"path": "default"}, kv_cache={"num_blocks": 512}))
    yield srv
    srv.stop()
    ray.shutdown()


def _hf(prompts: list[str], n: int) -> list[list[int]]:
    cfg = ModelConfig(path="default")
    model, tok = load_model(cfg), load_tokenizer(cfg)
    torch.set_num_threads(1)
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"]
            gen = model.generate(ids, max_new_tokens=n, do_sample=False)
            out.append(gen[0, ids.shape[1]:].tolist())
    return out


def test_default_model_greedy_equals_hf_generate_solo_and_concurrent(server: RunningServer) -> None:
    ref = _hf(PROMPTS, 20)
    solo = [list(server.generate(prompt=p, max_tokens=20).token_ids) for p in PROMPTS]
    assert solo == ref
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        conc = list(ex.map(lambda p: list(server.generate(prompt=p, max_tokens=20).token_ids), PROMPTS))
    assert conc == ref


def test_default_model_says_paris(server: RunningServer) -> None:
    assert "Paris" in server.generate(prompt="The capital of France is", max_tokens=8).text
