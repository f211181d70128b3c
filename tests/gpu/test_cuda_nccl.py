"""The same 1P1D path on CUDA tensors with the KV over NCCL. Skipped without two GPUs."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL p2p)")


def test_cuda_nccl_1p1d_equals_hf_generate() -> None:
    import ray

    from tests.cpu.harness import RunningServer, hf_greedy, prompts, tiny_config

    ray.init(include_dashboard=False, namespace="pdserve-test")
    try:
        cfg = tiny_config(
            model={"device": "cuda"}, prefill={"num_gpus": 1}, decode={"num_gpus": 1}, transport={"backend": "nccl"}
        )
        srv = RunningServer(cfg)
        try:
            for p in prompts(8, seed=7):
                assert list(srv.generate(prompt=p, max_tokens=16).token_ids) == hf_greedy(p, 16)
            assert all(w.prompt_tokens_computed == 0 for w in srv.status() if w.role == "decode")
        finally:
            srv.stop()
    finally:
        ray.shutdown()
