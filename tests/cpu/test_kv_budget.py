"""KV cache sized from GPU memory (engine/kv_budget.py): the arithmetic, and the config's rules."""
import pytest
import torch

from cluster.config import ConfigError, parse_config
from engine.kv_budget import GiB, block_bytes, blocks_for_memory, worst_sample
from engine.tiny import tiny_model


def test_a_worker_gets_its_share_minus_what_it_already_uses() -> None:
    mib = 2**20
    # 80 GiB GPU, 0.9 of it, 3 GiB of weights + activations, 2 MiB blocks → (72 - 3) GiB / 2 MiB
    assert blocks_for_memory(80 * GiB, 0.9, 3 * GiB, 79 * GiB, 2 * mib, 16) == 69 * 512
    # two workers on one GPU (num_gpus 0.5 each → share 0.45): each gets half the room
    assert blocks_for_memory(80 * GiB, 0.45, 3 * GiB, 79 * GiB, 2 * mib, 16) == 33 * 512
    # never more than is free now (another process holds the rest)
    assert blocks_for_memory(80 * GiB, 0.9, 3 * GiB, 10 * GiB, 2 * mib, 16) == 10 * 512


def test_too_little_room_is_an_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match="kv_cache.gpu_memory_utilization.*fewer than the 128"):
        blocks_for_memory(80 * GiB, 0.05, 4 * GiB, 79 * GiB, 2**20, 128)


def test_block_bytes_counts_every_layer_k_and_v() -> None:
    cfg = tiny_model().config
    d = cfg.hidden_size // cfg.num_attention_heads
    assert block_bytes(cfg, 16, torch.bfloat16) == cfg.num_hidden_layers * 2 * 16 * cfg.num_key_value_heads * d * 2


def test_config_takes_one_size_and_only_on_cuda() -> None:
    with pytest.raises(ConfigError, match="num_blocks or gpu_memory_utilization"):
        parse_config({"kv_cache": {"num_blocks": 64, "gpu_memory_utilization": 0.5}})
    with pytest.raises(ConfigError, match="gpu_memory_utilization: needs model.device: cuda"):
        parse_config({"kv_cache": {"gpu_memory_utilization": 0.5}})
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        parse_config({"kv_cache": {"gpu_memory_utilization": 1.5}})
    cfg = parse_config({"model": {"device": "cuda"}, "kv_cache": {"gpu_memory_utilization": 0.5},
                        "prefill": {"num_gpus": 0.5}, "decode": {"num_gpus": 0.5}})
    assert cfg.kv_cache.gpu_memory_utilization == 0.5


def test_the_profiles_worst_sampling_runs_on_any_device() -> None:
    """kv_budget's sampler term (its GB-sized measurement is tests/gpu's): the heaviest sampling
    the sampler takes, here on CPU so a change to the sampler's interface breaks it here first."""
    worst_sample(8, 259, torch.device("cpu"))
