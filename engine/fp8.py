"""FP8 weights (e4m3, one scale per 128 weights of a row): half the memory of bf16 and half the bytes
each decode step reads; the runner multiplies by them directly (engine/triton_fp8.py).

- FP8 checkpoints (engine/fp8_formats.py: `quant_method: fp8` — Qwen 3's *-FP8, dense and MoE —,
  compressed-tensors' FP8 — RedHatAI's — and fbgemm's — Meta's) are read by engine/checkpoint.py: a
  linear layer's FP8 `weight` [N, K] stays its parameter and its scales become `weight_scale`
  [N, ⌈K/128⌉] (one row per weight row); experts stored one by one (gate, up, down of each) go into
  the fused [E, N, K] weights Hugging Face computes with, scales beside them. On CUDA they stay FP8;
  elsewhere they are dequantized once read (`quant_method: fp8` by Hugging Face's own loading).
- `model.quantization: fp8` quantizes an unquantized model as it loads (quantize_model): each decoder
  layer's attention projections, its dense MLP or shared experts, and its experts' 3D weights (`*_scale`
  beside them); not the routers, embeddings or LM head. Each run of 128 weights of a row scaled apart.
A quantized module still computes as Hugging Face's would on the dequantized weights (Fp8Linear, and
the experts' forward), so the model runs whole too: the KV budget's memory profile, tests.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from engine import checkpoint, fp8_formats
from engine.triton_fp8 import GROUP_K, dequantize, matmul_fp8, quantize

FP8 = torch.float8_e4m3fn
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # Hugging Face's fused experts: [E, 2I, hidden], [E, hidden, I]


class Fp8Linear(torch.nn.Linear):
    """A linear layer whose weight [N, K] is FP8 with `weight_scale` [N, ⌈K/128⌉] (its class swapped in
    place: hold())."""

    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = matmul_fp8(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale, self.bias)
        return out.view(*x.shape[:-1], -1)


def hold(m: torch.nn.Linear, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """m's weight becomes `codes` [N, K] fp8 with `scale` [N, ⌈K/128⌉]."""
    m.weight = torch.nn.Parameter(codes, requires_grad=False)
    m.weight_scale = scale
    m.__class__ = Fp8Linear


_EXPERT_CLASSES: dict[type, type] = {}


def _experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Hugging Face's forward of the experts over their weights dequantized for the call (a layer's
    experts in the model dtype at once, then let go)."""
    kept = {n: self._parameters[n] for n in EXPERT_WEIGHTS}
    try:
        for n, p in kept.items():
            self._parameters[n] = torch.nn.Parameter(
                dequantize(p, getattr(self, n + "_scale"), hidden_states.dtype), requires_grad=False)
        return self._unquantized.forward(self, hidden_states, *args, **kwargs)
    finally:
        self._parameters.update(kept)


def _hold_experts(experts: torch.nn.Module) -> None:
    """Quantize an experts module's 3D weights in place ([E, N, K] → codes + `<name>_scale` [E, N, ⌈K/128⌉])."""
    for n in EXPERT_WEIGHTS:
        codes, scale = quantize(getattr(experts, n).data)
        experts._parameters[n] = torch.nn.Parameter(codes, requires_grad=False)
        setattr(experts, n + "_scale", scale)
    experts.__class__ = _fp8_class(type(experts))


def _fp8_class(cls: type) -> type:
    """cls with _experts_forward: Hugging Face's experts over their FP8 weights (made once per class)."""
    if cls in _EXPERT_CLASSES.values():
        return cls
    if cls not in _EXPERT_CLASSES:
        _EXPERT_CLASSES[cls] = type(f"Fp8{cls.__name__}", (cls,), {"forward": _experts_forward, "_unquantized": cls})
    return _EXPERT_CLASSES[cls]


def reads(config: Any, device: str) -> bool:
    """Whether load() reads this checkpoint (engine/fp8_formats.py's formats): on CUDA, kept FP8; elsewhere
    dequantized as it loads — but for `quant_method: fp8` off CUDA, which Hugging Face dequantizes
    itself. A mixture of experts only where its experts are stored one by one (PER_EXPERT_FAMILIES)."""
    sc = fp8_formats.scheme(config)
    if sc is None or (sc.method == "fp8" and torch.device(device).type != "cuda"):
        return False
    return not has_experts(config) or config.model_type in PER_EXPERT_FAMILIES


def streams(config: Any) -> bool:
    """Whether load_quantized reads this model: dense, or its experts stored as it reads them."""
    return not has_experts(config) or config.model_type in PER_EXPERT_FAMILIES + FUSED_EXPERT_FAMILIES


def has_experts(config: Any) -> bool:
    """Whether the model is a mixture of experts (any family's name for their number)."""
    return any(getattr(config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts"))


PER_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.(\w+)$")
MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
# experts stored one by one as PER_EXPERT names them (Hugging Face fuses them into [E, N, K] weights as it loads)
PER_EXPERT_FAMILIES = ("qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "olmoe", "mixtral", "glm4_moe",
                       "ernie4_5_moe")
FUSED_EXPERT_FAMILIES = ("granitemoe",)  # experts stored fused already ([E, N, K]: Granite MoE's input_linear)


class _ExpertParts:
    """Experts read one by one into fused FP8 weights: which (experts, projection, tensor) came in how
    many times, so a checkpoint missing some is refused instead of leaving zeros."""

    def __init__(self) -> None:
        self.filled: dict[tuple[str, str, str], int] = {}

    def put(self, model: torch.nn.Module, key: str, name: str, t: torch.Tensor, sc: fp8_formats.Scheme | None) -> None:
        """Tensor `name` (the weight, or its scales: the checkpoint's `sc`, or row scales for sc None) of
        the expert PER_EXPERT finds in `key`."""
        m = PER_EXPERT.match(key)
        assert m is not None
        path, e, proj, _ = m.groups()
        proj = MIXTRAL_NAMES.get(proj, proj)
        _expert_part(model.get_submodule(path), int(e), proj, name, t, sc)
        self.filled[path, proj, name] = self.filled.get((path, proj, name), 0) + 1

    def check(self, model: torch.nn.Module, names: tuple[str, str]) -> None:
        """Every expert's gate, up and down weights and scales (`names`) were read."""
        for path in {p for p, _, _ in self.filled}:
            E = model.get_submodule(path).gate_up_proj.shape[0]
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for name in names:
                    if (n := self.filled.get((path, proj, name), 0)) != E:
                        raise ValueError(f"{path}: {n} experts' {proj}.{name} in the checkpoint, not {E}")


def load(path: Path, config: Any, dtype: torch.dtype, device: torch.device | str, attention: str,
         keep_fp8: bool | None = None) -> PreTrainedModel:
    """The checkpoint's FP8 weights kept FP8 (keep_fp8; default: on CUDA), or dequantized to `dtype` once
    read (elsewhere)."""
    sc = fp8_formats.scheme(config)
    assert sc is not None
    experts = _ExpertParts()

    def keep(model: torch.nn.Module, key: str, t: torch.Tensor) -> bool:
        owner, _, name = key.rpartition(".")
        if name in fp8_formats.UNUSED:
            return True
        if PER_EXPERT.match(key) is not None and (name == "weight" and t.dtype == FP8 or name == sc.scale_name):
            experts.put(model, key, name, t, sc)
            return True
        if name == "weight" and t.dtype == FP8:
            model.get_submodule(owner)._parameters["weight"] = torch.nn.Parameter(t.contiguous(), requires_grad=False)
            return True
        if name == sc.scale_name:
            module = model.get_submodule(owner)
            module.weight_scale = fp8_formats.row_scales(t, module.out_features, module.in_features, sc)
            return True
        return False

    def after(model: PreTrainedModel) -> None:
        _paired(model)
        experts.check(model, ("weight", sc.scale_name))

    model = checkpoint.load(path, config, dtype, device, attention, keep, after)
    if not (torch.device(device).type == "cuda" if keep_fp8 is None else keep_fp8):
        dequantize_model(model, dtype)
    return model


def _expert_part(experts: torch.nn.Module, e: int, proj: str, name: str, t: torch.Tensor,
                 sc: fp8_formats.Scheme | None) -> None:
    """Expert e's gate, up or down weight (or its scales: the checkpoint's scheme `sc`, or row scales
    already for sc None) into the fused FP8 [E, N, K] weight and its [E, N, ⌈K/128⌉] scales,
    allocated on the first one (the meta parameter's shape)."""
    fused = "down_proj" if proj == "down_proj" else "gate_up_proj"
    w = experts._parameters[fused]
    E, N, K = w.shape
    if w.is_meta:
        experts._parameters[fused] = torch.nn.Parameter(torch.zeros(E, N, K, dtype=FP8, device=t.device),
                                                        requires_grad=False)
        setattr(experts, fused + "_scale", torch.zeros(E, N, -(-K // GROUP_K), device=t.device))
        experts.__class__ = _fp8_class(type(experts))
    rows = slice(None) if proj == "down_proj" else slice(0, N // 2) if proj == "gate_proj" else slice(N // 2, N)
    if name == "weight":
        experts._parameters[fused].data[e, rows] = t
    else:
        getattr(experts, fused + "_scale")[e, rows] = t if sc is None else fp8_formats.row_scales(
            t, N if proj == "down_proj" else N // 2, K, sc)


def dequantize_model(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every FP8 weight (and experts' weights) of `model` (or of one module) back to `dtype`, the modules
    back to Hugging Face's own."""
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.weight = torch.nn.Parameter(dequantize(module.weight, module.weight_scale, dtype), requires_grad=False)
            del module.weight_scale
            module.__class__ = torch.nn.Linear
        elif type(module) in _EXPERT_CLASSES.values():
            for n in EXPERT_WEIGHTS:
                module._parameters[n] = torch.nn.Parameter(
                    dequantize(module._parameters[n], getattr(module, n + "_scale"), dtype), requires_grad=False)
                delattr(module, n + "_scale")
            module.__class__ = module._unquantized


def _paired(model: PreTrainedModel) -> None:
    """Every FP8 weight has its scales and every scale its FP8 weight; each such layer an Fp8Linear."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (weight is not None and weight.dtype == FP8) != hasattr(module, "weight_scale"):
            raise ValueError(f"{name}: an FP8 weight without its weight_scale_inv, or the other way round")
        if hasattr(module, "weight_scale"):
            module.__class__ = Fp8Linear


def _targets(model: torch.nn.Module) -> tuple[dict[str, torch.nn.Linear], list[torch.nn.Module]]:
    """What model.quantization fp8 quantizes: each decoder layer's attention projections, dense MLP or
    shared experts (name → linear layer), and experts modules with Hugging Face's fused 3D weights
    (not gpt-oss's, kept MXFP4 or in its own layout) — not routers, embeddings or the LM head."""
    linears: dict[str, torch.nn.Linear] = {}
    experts_modules: list[torch.nn.Module] = []
    for i, layer in enumerate(model.model.layers):
        mlp_name = "mlp" if getattr(layer, "mlp", None) is not None else "block_sparse_moe"  # (Granite MoE's)
        mlp = getattr(layer, mlp_name, None)
        owners = {"self_attn": layer.self_attn}
        experts = getattr(mlp, "experts", None)
        if experts is None:
            owners[mlp_name] = mlp
        else:
            for name in ("shared_expert", "shared_experts"):
                if getattr(mlp, name, None) is not None:
                    owners[f"{mlp_name}.{name}"] = getattr(mlp, name)
            weights = [getattr(experts, n, None) for n in EXPERT_WEIGHTS]
            if (all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights)
                    and not hasattr(experts, "gate_up_proj_bias")):
                experts_modules.append(experts)
        for path, owner in owners.items():
            for name, m in (owner.named_children() if owner is not None else ()):
                if isinstance(m, torch.nn.Linear):
                    linears[f"model.layers.{i}.{path}.{name}"] = m
    return linears, experts_modules


def quantize_model(model: PreTrainedModel) -> int:
    """Quantize, in place, what _targets names that is not FP8 yet; → how many weights. The model is in
    its dtype first: its peak memory is the unquantized model's (load_quantized avoids that)."""
    linears, experts_modules = _targets(model)
    count = 0
    for m in linears.values():
        if m.weight.dtype != FP8:
            hold(m, *quantize(m.weight.data))
            count += 1
    for experts in experts_modules:
        if experts.gate_up_proj.dtype != FP8:
            _hold_experts(experts)
            count += 2
    return count


def load_quantized(path: Path, config: Any, dtype: torch.dtype, device: torch.device | str,
                   attention: str) -> PreTrainedModel:
    """model.quantization fp8 over an unquantized safetensors checkpoint: each targeted linear weight,
    and each expert's (a mixture of experts of PER_EXPERT_FAMILIES: stored one by one; of
    FUSED_EXPERT_FAMILIES: a layer's at once), quantized as it is read (engine/checkpoint.py) — the
    same codes and scales as quantize_model gives the loaded model, its scales being per row —, so
    the peak memory is the FP8 model's and one tensor's (bench/fp8_load_memory.py; by arithmetic, a
    70B model's ~70 GB of FP8 for one 141 GB GPU, which its bf16 would overfill; Qwen3-30B-A3B's
    ~31 GB for a 48 GB one, where its bf16 takes 61)."""
    targets: dict[str, torch.nn.Linear] = {}
    fused: dict[str, torch.nn.Module] = {}  # experts modules with [E, N, K] weights: quantized once both are read
    experts = _ExpertParts()

    def keep(model: torch.nn.Module, key: str, t: torch.Tensor) -> bool:
        if not targets:
            linears, modules = _targets(model)
            targets.update(linears)
            fused.update((n, m) for n, m in model.named_modules() if any(m is x for x in modules))
        owner, _, name = key.rpartition(".")
        if owner in fused and name in EXPERT_WEIGHTS and t.dim() == 3:  # stored fused (Granite MoE)
            module = fused[owner]
            module._parameters[name] = torch.nn.Parameter(t.to(dtype), requires_grad=False)
            if not any(module._parameters[n].is_meta for n in EXPERT_WEIGHTS):
                _hold_experts(module)
            return True
        if name != "weight" or not t.is_floating_point():
            return False
        if PER_EXPERT.match(key) is not None:
            codes, scale = quantize(t.to(dtype))  # (the values quantize_model would see)
            experts.put(model, key, "weight", codes, None)
            experts.put(model, key, "scale", scale, None)
            return True
        if owner not in targets:
            return False
        hold(targets[owner], *quantize(t.to(dtype)))
        return True

    return checkpoint.load(path, config, dtype, device, attention, keep, lambda m: experts.check(m, ("weight", "scale")))
