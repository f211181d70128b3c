"""Shared test machinery: a pdserve cluster + router on a background event loop, HF references."""
from __future__ import annotations

import random
from functools import lru_cache
from typing import Any

import torch

from cluster.background import BackgroundServer
from cluster.config import PDServeConfig, parse_config
from engine.tiny import tiny_model, tiny_tokenizer

WORDS = (
    "the a GPU cache token prefill decode batch router worker block tensor stream fast slow river "
    "mountain cloud seven quiet paper light engine model serve latency throughput memory page"
).split()


def tiny_config(**sections: Any) -> PDServeConfig:
    data: dict[str, Any] = {
        "model": {"path": "tiny", "max_model_len": 2048},
        "server": {"port": 0, "http_port": None},  # HTTP front: on in tests/cpu/test_http_api.py
        "prefill": {"num_cpus": 0.5},
        "decode": {"num_cpus": 0.5},
        "kv_cache": {"num_blocks": 1024, "block_size": 16},
        "limits": {"max_prompt_tokens": 1536, "request_timeout_s": 60},
        "transport": {"timeout_s": 30},
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return parse_config(data)


RunningServer = BackgroundServer


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Any, timeout: float = 15.0, interval: float = 0.05) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def prompts(n: int, seed: int = 0, min_words: int = 1, max_words: int = 70) -> list[str]:
    """Text prompts of 1 to 300+ tokens (the tiny tokenizer is one token per byte)."""
    rng = random.Random(seed)
    out = ["Hi", "a"]
    while len(out) < n:
        k = rng.randint(min_words, max_words)
        out.append(" ".join(rng.choice(WORDS) for _ in range(k)))
    out[-1] = " ".join(WORDS * 2)  # ~370 tokens
    return out


@lru_cache(maxsize=1)
def _tiny() -> tuple[Any, Any]:
    return tiny_model(), tiny_tokenizer()


def hf_greedy(prompt: str, max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """Hugging Face generate(do_sample=False) on the tiny model: the oracle."""
    return hf_greedy_ids(_tiny()[1](prompt)["input_ids"], max_new_tokens, ignore_eos)


def hf_greedy_ids(prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """hf_greedy() of a prompt given as token ids."""
    model, _ = _tiny()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
            eos_token_id=None if ignore_eos else model.generation_config.eos_token_id,
        )
    return out[0, ids.shape[1]:].tolist()
