"""Mixture-of-experts MLPs (Qwen 3 MoE, Mixtral, Qwen 2 MoE, gpt-oss, DeepSeek): each token runs through k of E experts.

One forward of a sparse layer, for T tokens (rows of the packed batch) and k experts each:
  1. route: the router's logits [T, E] (gpt-oss: plus a bias) → softmax (float32) → the top k
     (weights, experts) [T, k], the weights renormalized to sum to 1 where the family does (Mixtral
     always, Qwen 3 with `norm_topk_prob`; gpt-oss's softmax over its top k logits is the same);
     DeepSeek's router module chooses itself (V2: softmax, greedy or group-limited; V3: sigmoid
     with a score-correction bias, top groups; both scaled by routed_scaling_factor), and so does
     MiniMax-M2's (sigmoid scores plus the block's bias choose, the chosen scores renormalized) and
     Phi-3.5-MoE's (its sparsemixer);
  2. group: the T·k (token, expert) pairs sorted by expert, each pair a row of its token's input
     [T·k, hidden], and each expert's end row (a histogram's cumulative sum, on the device);
  3. experts: two grouped matmuls over all experts at once (gate|up, then down, each expert's rows
     by its own weights; gpt-oss adds each expert's biases) with act(gate) * up between (gpt-oss:
     its own clamped GLU of interleaved gate/up columns, Hugging Face's function): torch's
     `grouped_mm`, or where that one would read its groups on the host (off bf16 on sm90/sm100)
     while the step should be a CUDA graph, a Triton kernel that does not (engine/triton_moe.py);
     over gpt-oss's MXFP4 weights where they are kept so (engine/mxfp4.py), a Triton kernel that
     dequantizes as it multiplies (engine/triton_mxfp4.py), and over FP8 ones (engine/fp8.py) another
     (engine/triton_fp8.py);
  4. combine: each row times its weight, put back in (token, k) order and summed over k → [T, hidden];
  5. a shared expert (Qwen 2 MoE, DeepSeek), where there is one: a dense MLP every token runs,
     scaled by a sigmoid gate of its own (Qwen 2 MoE's), added.
No count is read on the host, so a decode step of sparse layers is captured as a CUDA graph like a
dense one (engine/cuda_graphs.py). The weights are Hugging Face's own 3D tensors, read in place.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

ActMul = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # (act, [S, 2I] gate|up) → [S, I]
MLP = Callable[[torch.Tensor, ActMul], torch.Tensor]  # a dense MLP: ([T, hidden], act_mul) → [T, hidden]
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm  # the public name where this torch has it


@dataclass(frozen=True)
class Mxfp4:
    """An expert weight [E, K, N] in MXFP4, as Hugging Face names it (engine/triton_mxfp4.py)."""

    blocks: torch.Tensor  # [E, N, K/2] uint8
    scales: torch.Tensor  # [E, N, K/32] uint8


@dataclass(frozen=True)
class Fp8:
    """An expert weight in FP8 (engine/fp8.py), in Hugging Face's layout (engine/triton_fp8.py)."""

    weight: torch.Tensor  # [E, N, K] float8_e4m3fn
    scale: torch.Tensor  # [E, N, ⌈K/128⌉] float32


@dataclass(frozen=True)
class Experts:
    router: torch.Tensor  # [E, hidden]
    gate_up: torch.Tensor | Mxfp4 | Fp8  # [E, hidden, 2I]: a transposed view of Hugging Face's [E, 2I, hidden]
    down: torch.Tensor | Mxfp4 | Fp8  # [E, I, hidden]: a view of [E, hidden, I]
    act: torch.nn.Module
    top_k: int
    renormalize: bool
    shared: MLP | None = None  # 5. the shared expert
    shared_gate: torch.Tensor | None = None  # [1, hidden]
    triton: bool = False  # 3. by engine/triton_moe.py, not torch's grouped_mm
    router_bias: torch.Tensor | None = None  # [E] (gpt-oss)
    gate_up_bias: torch.Tensor | None = None  # [E, 2I] (gpt-oss)
    down_bias: torch.Tensor | None = None  # [E, hidden] (gpt-oss)
    glu: Callable[[torch.Tensor], torch.Tensor] | None = None  # [S, 2I] → [S, I] in act_mul's place (gpt-oss)
    route: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None  # DeepSeek's, ERNIE's router: its own choice

    @classmethod
    def of(cls, mlp: torch.nn.Module, dense: Callable[[torch.nn.Module], MLP], triton: bool = False) -> Experts | None:
        """A sparse block's experts (Hugging Face's `gate` router — Granite MoE's `router`, a softmax
        over its top k: the same as renormalized — + `experts`, and a `shared_expert` made a dense
        MLP by `dense`); None: a dense MLP. triton: step 3 by the Triton kernel (triton_for)."""
        experts, gate = getattr(mlp, "experts", None), getattr(mlp, "gate", None) or getattr(mlp, "router", None)
        if experts is None or gate is None:
            return None
        shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)  # (DeepSeek's name)
        if hasattr(experts, "gate_up_proj_bias"):  # gpt-oss: stored [E, hidden, 2I], biases, its own GLU
            quantized = hasattr(experts, "gate_up_proj_blocks")  # kept in MXFP4 (engine/mxfp4.py)
            gate_up, down = ((Mxfp4(experts.gate_up_proj_blocks, experts.gate_up_proj_scales),
                              Mxfp4(experts.down_proj_blocks, experts.down_proj_scales)) if quantized
                             else (experts.gate_up_proj.data, experts.down_proj.data))
            return cls(gate.weight.data, gate_up, down, torch.nn.Identity(),
                       int(gate.top_k), True, triton=triton, router_bias=gate.bias.data,
                       gate_up_bias=experts.gate_up_proj_bias.data, down_bias=experts.down_proj_bias.data,
                       glu=experts._apply_gate)
        shared_gate = getattr(mlp, "shared_expert_gate", None)  # Qwen 2 MoE's; DeepSeek's shared experts have none
        if hasattr(experts, "gate_up_proj_scale"):  # quantized to FP8 (engine/fp8.py)
            gate_up, down = (Fp8(experts.gate_up_proj.data, experts.gate_up_proj_scale),
                             Fp8(experts.down_proj.data, experts.down_proj_scale))
        else:
            gate_up, down = experts.gate_up_proj.data.transpose(1, 2), experts.down_proj.data.transpose(1, 2)
        route = gate if hasattr(gate, "routed_scaling_factor") or hasattr(gate, "moe_statics") \
            or type(gate).__name__ == "PhimoeTopKRouter" else None  # (Phi-3.5-MoE's: its sparsemixer)
        if hasattr(mlp, "e_score_correction_bias"):  # MiniMax-M2: the block holds its router's bias
            route = partial(gate, e_score_correction_bias=mlp.e_score_correction_bias)
        return cls(gate.weight.data, gate_up, down, experts.act_fn, int(gate.top_k),
                   bool(getattr(gate, "norm_topk_prob", True)), dense(shared) if shared is not None else None,
                   shared_gate.weight.data if shared_gate is not None else None, triton, route=route)

    @staticmethod
    def triton_for(device: torch.device, dtype: torch.dtype) -> bool:
        """Whether step 3 takes the Triton kernel where the step should be a CUDA graph: where
        torch's grouped_mm would read its groups on the host."""
        return not (device.type == "cuda" and dtype == torch.bfloat16
                    and torch.cuda.get_device_capability(device)[0] in (9, 10))

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    def __call__(self, x: torch.Tensor, act_mul: ActMul) -> torch.Tensor:
        """x [T, hidden] → [T, hidden]."""
        T, k = x.shape[0], self.top_k
        if self.route is not None:  # 1. Hugging Face's router: DeepSeek's (grouped top-k, a score bias, scaled), ERNIE's
            _, weights, chosen = self.route(x)  # [T, k] each
        else:
            probs = torch.softmax(F.linear(x, self.router, self.router_bias).float(), dim=-1)  # [T, E]
            weights, chosen = torch.topk(probs, k, dim=-1)  # [T, k] each
            if self.renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        by_expert, order = torch.sort(chosen.reshape(-1), stable=True)  # 2. [T*k]: pairs by expert
        rows = x.index_select(0, order // k)  # [T*k, hidden]
        counts = torch.histc(by_expert.float() if x.device.type == "cpu" else by_expert.int(),
                             bins=self.num_experts, min=0, max=self.num_experts - 1)  # [E]
        ends = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E]: expert e's rows end at ends[e]
        if self.triton:
            from engine.triton_moe import grouped_matmul as mm  # imports Triton: only where it runs
        else:
            mm = grouped_mm
        gate_up = _grouped(mm, rows, self.gate_up, ends)  # 3. [T*k, 2I]
        if self.gate_up_bias is not None:
            gate_up = gate_up + self.gate_up_bias.index_select(0, by_expert)
        h = self.glu(gate_up) if self.glu is not None else act_mul(self.act, gate_up)  # [T*k, I]
        y = _grouped(mm, h, self.down, ends)  # [T*k, hidden]
        if self.down_bias is not None:
            y = y + self.down_bias.index_select(0, by_expert)
        y = y * weights.reshape(-1)[order, None].to(y.dtype)  # 4.
        out = torch.empty_like(y).index_copy_(0, order, y)  # [T*k, hidden] in (token, k) order
        routed = out.view(T, k, -1).sum(dim=1)  # [T, hidden]
        if self.shared is None:
            return routed
        if self.shared_gate is None:  # DeepSeek: its shared experts as they are
            return routed + self.shared(x, act_mul)
        return routed + torch.sigmoid(F.linear(x, self.shared_gate)) * self.shared(x, act_mul)  # 5.


def _grouped(mm: Callable[..., torch.Tensor], rows: torch.Tensor, w: torch.Tensor | Mxfp4 | Fp8,
             ends: torch.Tensor) -> torch.Tensor:
    """rows [S, K] (sorted by expert) times each one's expert weight [K, N] → [S, N]."""
    if isinstance(w, Mxfp4):
        from engine.triton_mxfp4 import grouped_matmul_mxfp4  # imports Triton: only where it runs

        return grouped_matmul_mxfp4(rows, w.blocks, w.scales, ends)
    if isinstance(w, Fp8):
        from engine.triton_fp8 import grouped_matmul_fp8

        return grouped_matmul_fp8(rows, w.weight, w.scale, ends)
    return mm(rows, w, offs=ends)
