"""LoRA adapters (engine/lora.py): rows of different adapters, and of none, in one forward each equal
Hugging Face's model with that adapter merged into its weights; a PEFT folder that trains what the
runner does not compute is refused naming the adapter."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from engine.lora import LoraError
from engine.model_runner import ModelRunner, SeqInput
from engine.tiny import tiny_model

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(folder: Path, model: torch.nn.Module, targets: tuple[str, ...], rank: int, alpha: float,
                 seed: int, rslora: bool = False, extra: dict[str, Any] | None = None) -> torch.nn.Module:
    """A PEFT LoRA folder of random A and B for `targets` of every layer; → `model` with it merged
    (W + scale · B·A), Hugging Face's reference for the adapter."""
    g = torch.Generator().manual_seed(seed)
    merged = copy.deepcopy(model)
    tensors = {}
    scale = alpha / (rank ** 0.5 if rslora else rank)
    for li, layer in enumerate(merged.model.layers):
        for t in targets:
            lin = getattr(layer.self_attn if t in ALL[:4] else layer.mlp, t)
            a = torch.randn(rank, lin.in_features, generator=g) * 0.3
            b = torch.randn(lin.out_features, rank, generator=g) * 0.3
            part = "self_attn" if t in ALL[:4] else "mlp"
            tensors[f"base_model.model.model.layers.{li}.{part}.{t}.lora_A.weight"] = a
            tensors[f"base_model.model.model.layers.{li}.{part}.{t}.lora_B.weight"] = b
            lin.weight.data += scale * b @ a
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets), "bias": "none",
           "use_rslora": rslora, **(extra or {})}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return merged.eval()


@pytest.mark.parametrize("kernels", ["auto", "torch", "triton"])
def test_rows_of_two_adapters_and_none_in_one_forward_equal_the_merged_models(tmp_path: Path, kernels: str) -> None:
    base = tiny_model(seed=2)
    want = {"": base,
            "attn": make_adapter(tmp_path / "attn", base, ALL[:4], rank=4, alpha=8, seed=1),
            "all": make_adapter(tmp_path / "all", base, ALL, rank=8, alpha=4, seed=2, rslora=True)}
    runner = ModelRunner(base, num_blocks=32, block_size=16, kernels=kernels)
    runner.load_adapters({"attn": str(tmp_path / "attn"), "all": str(tmp_path / "all")})
    prompts = {"attn": list(range(5, 45)), "": list(range(7, 30)), "all": list(range(3, 60, 2))}
    tables = {"attn": [0, 1, 2, 3], "": [4, 5, 6, 7], "all": [8, 9, 10, 11]}
    names = ["attn", "", "all"]
    # a prompt each (its last token then decoded alone), in one forward: three adapters' rows packed
    got = runner.forward([SeqInput(prompts[n][:-1], 0, tables[n], adapter=n) for n in names])
    dec = runner.forward([SeqInput(prompts[n][-1:], len(prompts[n]) - 1, tables[n], adapter=n) for n in names])
    with torch.inference_mode():
        for i, n in enumerate(names):
            ref = want[n](torch.tensor([prompts[n]])).logits[0]
            torch.testing.assert_close(got[i], ref[-2], atol=5e-5, rtol=1e-4)
            torch.testing.assert_close(dec[i], ref[-1], atol=5e-5, rtol=1e-4)
            if n:  # the adapter matters
                assert not torch.allclose(dec[i], base(torch.tensor([prompts[n]])).logits[0, -1], atol=1e-3)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gemma3_text"])  # experts beside a dense layer; Gemma's sandwich norms
def test_attention_adapters_on_other_families(tmp_path: Path, arch: str) -> None:
    base = tiny_model(seed=2, arch=arch)
    want = make_adapter(tmp_path / "a", base, ALL[:4] if arch == "qwen3_moe" else ALL, rank=4, alpha=8, seed=3)
    runner = ModelRunner(base, num_blocks=16, block_size=16, kernels="torch")
    runner.load_adapters({"a": str(tmp_path / "a")})
    prompt = list(range(5, 50))
    got = runner.forward([SeqInput(prompt, 0, [0, 1, 2], adapter="a"), SeqInput(prompt, 0, [3, 4, 5])])
    with torch.inference_mode():
        torch.testing.assert_close(got[0], want(torch.tensor([prompt])).logits[0, -1], atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(got[1], base(torch.tensor([prompt])).logits[0, -1], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("targets, extra, arch, match", [
    (("q_proj", "embed_tokens"), {}, "llama", "trains .*embed_tokens"),
    (("q_proj",), {"use_dora": True}, "llama", "only plain LoRA"),
    (("q_proj",), {"modules_to_save": ["lm_head"]}, "llama", "only plain LoRA"),
    (("gate_proj",), {}, "mixtral", "only its attention projections"),
])
def test_an_adapter_the_runner_cannot_apply_is_refused_naming_it(tmp_path: Path, targets: tuple[str, ...],
                                                                  extra: dict[str, Any], arch: str, match: str) -> None:
    base = tiny_model(seed=2, arch=arch)
    folder = tmp_path / "bad"
    if "embed_tokens" in targets:
        make_adapter(folder, base, ("q_proj",), 4, 8, 1)
        save_file({"base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(4, 259),
                   "base_model.model.model.embed_tokens.lora_B.weight": torch.zeros(64, 4)},
                  folder / "adapter_model.safetensors")
    elif arch == "mixtral":  # its MLPs are experts: write a dense gate_proj adapter by hand
        save_file({"base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight": torch.zeros(4, 64),
                   "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight": torch.zeros(128, 4)},
                  folder / "adapter_model.safetensors") if folder.mkdir() is None else None
        (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    else:
        make_adapter(folder, base, targets, 4, 8, 1, extra=extra)
    runner = ModelRunner(base, num_blocks=8, block_size=16, kernels="torch")
    with pytest.raises(LoraError, match=f"model.lora_adapters.bad: .*{match}"):
        runner.load_adapters({"bad": str(folder)})
    with pytest.raises(LoraError, match="no readable adapter_config.json"):
        runner.load_adapters({"gone": str(tmp_path / "nowhere")})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    import ray

    from tests.cpu.harness import RunningServer, tiny_config

    folder = tmp_path_factory.mktemp("lora")
    base = tiny_model(seed=0)  # the workers' model.path tiny, seed 0
    want = {"": base, "attn": make_adapter(folder / "attn", base, ALL[:4], 4, 8, seed=1),
            "all": make_adapter(folder / "all", base, ALL, 8, 16, seed=2)}
    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-lora")
    srv = RunningServer(tiny_config(model={"lora_adapters": {"attn": str(folder / "attn"), "all": str(folder / "all")}},
                                    server={"http_port": 0}))
    yield srv, want
    srv.stop()
    ray.shutdown()


def test_served_requests_of_two_adapters_and_none_at_once_each_equal_their_merged_model(served: Any) -> None:
    """1P1D: the prompt's KV computed with the adapter on the prefill worker, handed off, decoded with
    it; mixed in one batch. The prefix cache shares KV only within an adapter."""
    import concurrent.futures as cf

    import httpx
    import openai

    from protos.pdserve.v1 import generation_pb2 as pb

    server, want = served
    prompt = list(range(3, 70))
    names = ["attn", "", "all"] * 3

    def hf(name: str) -> list[int]:
        with torch.inference_mode():
            out = want[name].generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)
        return out[0, len(prompt):].tolist()

    def ask(name: str) -> pb.GenerateResponse:
        return server.generate(prompt_token_ids=prompt, max_tokens=10, ignore_eos=True, lora_adapter=name)

    with cf.ThreadPoolExecutor(9) as pool:
        got = list(pool.map(ask, names))
    assert [list(r.token_ids) for r in got] == [hf(n) for n in names]
    assert len({tuple(r.token_ids) for r in got}) == 3  # each adapter answers its own way
    again = ask("attn")  # its prefix cached under its own adapter: whole blocks reused
    assert again.usage.cached_tokens == (len(prompt) - 1) // 16 * 16 and list(again.token_ids) == hf("attn")
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="-", max_retries=0)
    r = oai.completions.create(model="all", prompt=prompt, max_tokens=10, extra_body={"ignore_eos": True})
    assert r.choices[0].text == server.stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=10,
                                                                        ignore_eos=True, lora_adapter="all")).text
    assert [m.id for m in oai.models.list().data] == ["tiny", "attn", "all"]
    bad = httpx.post(f"http://127.0.0.1:{server.server.http_port}/v1/completions",
                     json={"model": "nope", "prompt": "hi"}, timeout=30)
    assert bad.status_code == 404 and "attn" in bad.json()["error"]["message"]
    tok = httpx.post(f"http://127.0.0.1:{server.server.http_port}/tokenize", json={"model": "attn", "prompt": "hi"},
                     timeout=30)
    assert tok.status_code == 200 and tok.json()["count"] == 2  # an adapter's tokenizer is its model's
    with pytest.raises(Exception, match="lora_adapter"):
        server.generate(prompt="hi", lora_adapter="nope")
