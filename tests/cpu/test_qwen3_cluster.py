"""A Qwen 3 checkpoint folder, dense and mixture-of-experts, served 1P1D: its KV (head_dim 32 where
hidden / heads is 16) is handed off and decoded, and every answer, alone or in a crowd (whose rows
each pick their own experts in one step), equals Hugging Face generate. So do a Gemma 2 folder's
(soft-capped scores, a windowed layer; Hugging Face's reference runs its eager attention) and a GLM 4
folder's (interleaved rotary on half of each head, sandwich norms), and a gpt-oss folder's (attention
sinks, a window of 16 in every other layer, experts with biases: Hugging Face's eager attention), a
DeepSeek V2 folder's (latent attention expanded per head: its KV cache of 4 heads of 24 handed off) and
a Hunyuan folder's (q and k normalized after the rotary: the keys handed off are rotated and
normalized before the cache kernels see them)."""
from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import pytest
import ray
import torch

from engine.tiny import tiny_model, tiny_tokenizer
from tests.cpu.harness import RunningServer, prompts, tiny_config

TOK = tiny_tokenizer()


@pytest.fixture(scope="module")
def ray_up():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-qwen3")  # one Ray instance for the seven
    yield
    ray.shutdown()


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe", "gemma2", "glm4", "gpt_oss", "deepseek_v2",
                                              "hunyuan_v1_dense"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           ray_up: None):  # type: ignore[no-untyped-def]
    model = tiny_model(seed=6, arch=request.param)
    folder: Path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    TOK.save_pretrained(folder)
    srv = RunningServer(tiny_config(model={"path": str(folder)}, prefill={"chunk_tokens": 64}))
    yield srv, model
    srv.stop()


def _hf(model: torch.nn.Module, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([TOK(prompt)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def test_qwen3_greedy_equals_hf_alone_and_eight_at_once(served: tuple[RunningServer, torch.nn.Module]) -> None:
    server, model = served
    ps = prompts(8, seed=11)  # the last is ~370 tokens: computed in chunks of 64
    want = [_hf(model, p, 12) for p in ps]
    assert list(server.generate(prompt=ps[-1], max_tokens=12, ignore_eos=True).token_ids) == want[-1]
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: list(server.generate(prompt=p, max_tokens=12, ignore_eos=True).token_ids), ps))
    assert got == want
