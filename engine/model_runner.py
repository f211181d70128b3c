"""The model runner: owns the one KV tensor and runs Llama-family forwards over block tables
(what other families add — q/k norms, experts, Gemma's sandwich norms, Gemma 3's per-layer rotary,
sliding windows, Gemma 2's logit soft-capping, Granite's multipliers — are options of a layer, of
the attention backend or of the runner).

It reuses the Hugging Face module weights and numerics (norms, projections, rotary, MLP) and
replaces attention, which reads and writes the paged KV cache. Callers (the prefill and decode
schedulers) hand it `SeqInput`s: which new tokens to compute per sequence and where every position
of that sequence lives in the cache (its slots). No Ray, no gRPC.

KV layout (one tensor for all layers):
    kv:       [num_layers, 2 (k|v), num_blocks, block_size, kv_heads, head_dim]
    kv_slots: the same memory as [num_layers, 2, num_slots, kv_heads, head_dim],
              slot = block * block_size + offset
    (DeepSeek's latent attention: one KV head, each token's latent split across k and v: engine/mla.py)
What differs by device is attention (engine/attention.py) and the small ops between the matmuls
(engine/layer_ops.py): on CPU a fused C++ decode kernel over the block tables (engine/csrc), SDPA
for prompts, and the Hugging Face modules (TorchOps); on CUDA Triton kernels that read K/V in place
with no host work (engine/triton_attention.py) and one kernel each for residual add + RMSNorm,
rotary + KV store and SiLU (or GELU) * up (TritonOps, engine/triton_fused.py: ~10 kernels a layer where the
modules launch ~35), which is what lets the decode step be captured as short CUDA graphs
(engine/cuda_graphs.py). The q/k/v and gate/up projections run as one matmul each (weights
concatenated once, the original modules left as views into them: engine/layers.py). A mixture-of-experts layer
(Qwen 3 MoE, Mixtral, Qwen 2 MoE) runs its experts as grouped matmuls (engine/moe.py) where a
dense one runs its MLP.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from engine import layers, lora, paged_attention, prompt_scores
from engine.attention import BatchMeta, TorchAttention, TritonAttention
from engine.layer_ops import TorchOps, TritonOps
from engine.linear import default_backend, from_module
from engine.mla import Latent
from engine.model_shape import attention_windows, interleaved_rotary, kv_dims, query_scale
from engine.moe import Experts
from engine.rotary import Rotary, rotate
from engine.types import TokenLogprob

if TYPE_CHECKING:
    from engine.cuda_graphs import DecodeGraphs


FP8 = torch.float8_e4m3fn  # kv_cache.dtype fp8's


@dataclass(slots=True)  # read-only by convention: not frozen, as a step builds one a row (2.6 -> 0.45 us here)
class SeqInput:
    token_ids: list[int]  # the new tokens to compute this forward
    start_pos: int  # position of token_ids[0]; positions < start_pos are already in the cache
    block_table: list[int]  # the sequence's KV blocks, in position order
    scored: tuple[int, ...] = ()  # prompt logprobs: the token after each of its first len(scored) new tokens
    top: int = 0  # ... and how many top alternatives each of those positions reports
    adapter: str = ""  # the LoRA adapter its tokens run with (load_adapters); "": the base model

    @property
    def num_new(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


def _has_triton() -> bool:
    return find_spec("triton") is not None


class ModelRunner:
    def __init__(
        self, model: PreTrainedModel, num_blocks: int, block_size: int, kernels: str = "auto",
        kv: torch.Tensor | None = None, kv_dtype: torch.dtype | None = None,
    ) -> None:
        """kv: the cache to use (e.g. a shared one); kv_dtype: its dtype where not the model's
        (torch.float8_e4m3fn: kv_cache.dtype fp8, the Triton kernels only)."""
        cfg = model.config
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = model.model.embed_tokens.weight.dtype  # (not a linear layer's: FP8 kept, engine/fp8.py)
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads, self.head_dim = kv_dims(cfg)
        self.vocab_size = cfg.vocab_size
        self.block_size = block_size
        self.num_blocks = num_blocks
        # [L, 2, num_blocks, block_size, kv_heads, head_dim]; `kv` (e.g. a shared one) must have this shape
        shape = self.cache_shape(cfg, num_blocks, block_size)
        self.kv_dtype = kv_dtype or self.dtype
        if kv is not None and (tuple(kv.shape) != shape or kv.dtype != self.kv_dtype):
            raise ValueError(f"kv cache {tuple(kv.shape)} {kv.dtype} does not match {shape} {self.kv_dtype}")
        self.kv = kv if kv is not None else torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        backend = default_backend(self.device) if kernels != "torch" else "torch"
        self.kernels = backend
        self.attn = self._attention_backend(kernels, backend)
        if self.kv_dtype == FP8:
            self._check_fp8_cache()
        self.ops: TorchOps | TritonOps = (TritonOps.of(model) if self.attn.name == "triton" else None) or TorchOps()
        moe_triton = self.attn.name == "triton" and Experts.triton_for(self.device, self.dtype)  # graph-safe experts
        self.layers = [layers.layer(hf, backend, moe_triton, layers.rope_of(cfg, li, model.model.rotary_emb), self.dtype)
                       for li, hf in enumerate(model.model.layers[: self.num_layers])]
        self.lm_head = from_module(model.lm_head, backend)
        self.final_softcap = float(getattr(cfg, "final_logit_softcapping", None) or 0.0)  # Gemma 2: cap·tanh(l/cap)
        # Granite's multipliers: of the embeddings, of each attention and MLP output before the residual
        # add, and the logits' divisor; Cohere's logits multiplier (1: none)
        self.embed_scale, self.residual_scale, self.logits_divisor, self.logit_scale = (
            float(getattr(cfg, f, None) or 1.0)
            for f in ("embedding_multiplier", "residual_multiplier", "logits_scaling", "logit_scale"))
        if cfg.model_type == "hyperclovax":  # its logits_scaling multiplies the logits (Granite's divides them)
            self.logits_divisor, self.logit_scale = 1.0, self.logits_divisor
        self.query_scale = query_scale(cfg)  # Ministral 3: (beta, length) of its queries' scale by position
        self.rotary = Rotary(model)  # the rotary tables of a forward, as the attention backends read them
        self.tokens_forwarded = 0
        self.graphs: DecodeGraphs | None = None  # set by use_decode_graphs()
        self.adapters: dict[str, lora.Adapter] = {}  # set by load_adapters()

    def load_adapters(self, folders: dict[str, str]) -> None:
        """The LoRA adapters (name → PEFT folder) its rows may run with (engine/lora.py); LoraError
        naming the adapter where it trains what this model's layers do not compute."""
        for name, folder in folders.items():
            if any(isinstance(layer.qkv, Latent) for layer in self.layers):
                raise lora.LoraError(f"model.lora_adapters.{name}: LoRA on DeepSeek's latent attention is not served")
            adapter = lora.load(name, folder, self.num_layers, self.dtype, self.device)
            if any(proj in ("gate_up", "down") and not isinstance(self.layers[li].mlp, layers.Dense)
                   for li, proj in adapter.weights):
                raise lora.LoraError(f"model.lora_adapters.{name}: trains an MLP this model computes otherwise "
                                     "(experts, or no gate): only its attention projections can take LoRA")
            self.adapters[name] = adapter

    def _attention_backend(self, kernels: str, linear_backend: str) -> TorchAttention | TritonAttention:
        """triton: asked for, or auto on CUDA where it imports; else torch (the fused C++ decode kernel on
        CPU fp32 where it builds, gather + SDPA otherwise). Each layer's sliding window, the logit
        soft-capping and the rotary's layout from the config."""
        cfg = self.model.config
        windows, pairs = attention_windows(cfg), interleaved_rotary(cfg)
        cap = float(getattr(cfg, "attn_logit_softcapping", None) or 0.0)
        sinks = self.sinks()
        if kernels == "triton" or (kernels == "auto" and self.device.type == "cuda" and _has_triton()):
            return TritonAttention(self.kv, self.num_heads, windows=windows, softcap=cap, interleaved=pairs, sinks=sinks)
        use_cpp = linear_backend == "onednn" and self.dtype == torch.float32
        return TorchAttention(self.kv, self.num_heads, paged_attention.load() if use_cpp else None, windows, cap,
                              pairs, sinks)

    def sinks(self) -> list[torch.Tensor | None] | None:
        """Each layer's attention sinks [H] in float32 (gpt-oss: `self_attn.sinks`), or None: none."""
        found = [getattr(hf.self_attn, "sinks", None) for hf in self.model.model.layers[: self.num_layers]]
        if all(s is None for s in found):
            return None
        return [s.detach().float().contiguous() if s is not None else None for s in found]

    def _check_fp8_cache(self) -> None:
        """An FP8 cache is stored and read by the Triton kernels, on a GPU with FP8 (or under the interpreter)."""
        old_gpu = self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9)
        if self.attn.name != "triton" or old_gpu:
            raise ValueError("kv_cache.dtype: fp8 needs the Triton kernels on a GPU with FP8 (sm_89 or later: L4, "
                             f"H100), model.device cuda; here {self.device}, attention {self.attn.name}")

    @property
    def kv_bytes(self) -> torch.Tensor:
        """The cache as the KV hand-off moves it (engine/kv_handoff): an FP8 one as bytes (copies,
        index_select and collectives of uint8 are everywhere; of float8 not)."""
        return self.kv.view(torch.uint8) if self.kv_dtype == FP8 else self.kv

    @staticmethod
    def cache_shape(cfg: object, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """[L, 2, num_blocks, block_size, kv_heads, head_dim] for a model config."""
        c: Any = cfg
        kv_heads, head_dim = kv_dims(c)
        return (c.num_hidden_layers, 2, num_blocks, block_size, kv_heads, head_dim)

    # -- forward --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, seqs: list[SeqInput], feed: torch.Tensor | None = None,
                scores: dict[int, list[TokenLogprob]] | None = None) -> torch.Tensor:
        """Compute the new tokens of every sequence; return the logits of each one's last token [B, V].

        Any mix works: decode rows (one new token) and prompt chunks may share a forward (Sarathi);
        the decode rows should come first so they take the paged decode kernel. feed: decode rows
        whose token is a row of this device tensor (DecodeGraphs.run; only through the graphs).
        scores: filled with the prompt logprobs of each sequence i that has `scored` tokens (one per
        scored position, in order; the caller's to keep)."""
        scoring = scores is not None and any(s.scored for s in seqs)
        if self.graphs is not None and not scoring and self.graphs.fits(seqs):
            self.tokens_forwarded += sum(s.num_new for s in seqs)
            return self.graphs.run(seqs, feed)
        if feed is not None:
            raise ValueError("a fed decode step runs only through the decode graphs (graphs.fits)")
        meta = self.attn.prepare(seqs)
        if any(s.adapter for s in seqs):
            meta.extra["lora"] = self._adapter_rows(seqs)
        self.tokens_forwarded += meta.ids.numel()
        x, residual = self.hidden(meta)
        if scoring:
            assert scores is not None
            scores.update(prompt_scores.score(seqs, x, residual, self.logits))
        return self.logits(x, residual, meta.last)

    def use_decode_graphs(self, max_batch: int, max_model_len: int, capture: bool | None = None,
                          max_rows: int = 0) -> None:
        """Run steps through CUDA graphs (engine/cuda_graphs.py): decode steps of up to `max_batch`
        rows, and steps of up to `max_rows` new tokens in all (prompt chunks' tokens as rows; 0:
        max_batch); capture defaults to: on CUDA. Needs the triton attention backend (with it, a
        mixture of experts' grouped matmuls read nothing on the host: Experts.triton_for)."""
        from engine.cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self, max_batch, max_model_len,
                                   self.device.type == "cuda" if capture is None else capture, max_rows)

    def _adapter_rows(self, seqs: list[SeqInput]) -> dict[str, torch.Tensor]:
        """Each adapter's token rows [n] in the forward's packed tokens (sequences in order)."""
        rows: dict[str, list[int]] = {}
        start = 0
        for s in seqs:
            if s.adapter:
                if s.adapter not in self.adapters:
                    raise lora.LoraError(f"no LoRA adapter {s.adapter!r} is loaded")
                rows.setdefault(s.adapter, []).extend(range(start, start + s.num_new))
            start += s.num_new
        return {name: torch.tensor(r, dtype=torch.long).to(self.device) for name, r in rows.items()}

    def describe(self) -> str:
        """One line for a worker's start-up log: the model as computed here and the paths it takes."""
        cfg, mlps = self.model.config, sorted({type(layer.mlp).__name__ for layer in self.layers})
        graphs = f"CUDA graphs for steps of up to {self.graphs.max_rows} tokens" if self.graphs is not None else "no CUDA graphs"
        windows = sorted({w for w in self.attn.windows if w})
        sinks = ", sinks" if any(s is not None for s in self.attn.sinks) else ""
        fp8 = sum(layer.o_proj.scale is not None for layer in self.layers)  # (engine/fp8.py)
        weights = f" (FP8 weights in {fp8} layers)" if fp8 else ""
        kv = " (KV cache fp8)" if self.kv_dtype == FP8 else ""
        heads = (f"{self.num_heads} heads over latents of {cfg.kv_lora_rank} + {cfg.qk_rope_head_dim}"
                 if isinstance(self.layers[0].qkv, Latent) else
                 f"{self.num_heads} heads ({self.num_kv_heads} KV) of {self.head_dim}")
        return (f"{cfg.model_type}: {self.num_layers} layers, {heads}, "
                f"{str(self.dtype).removeprefix('torch.')}{weights}{kv} on {self.device}; "
                f"attention {self.attn.name}"
                f"{f', windows {windows}' if windows else ''}{sinks}, layer ops {type(self.ops).__name__}, MLP "
                f"{'/'.join(mlps)}, linears {self.kernels}; {self.num_blocks} KV blocks of {self.block_size}; {graphs}"
                f"{'; LoRA adapters ' + ', '.join(self.adapters) if self.adapters else ''}")

    def device_ok(self) -> bool:
        """Whether the device still runs work. After a failed step: an out-of-memory leaves the CUDA
        context usable, but a kernel fault (illegal address, ECC error, ...) is sticky — every later
        call on this process fails with it."""
        if self.device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize(self.device)  # a sticky fault surfaces here
            return torch.ones(1, device=self.device).add_(1).item() == 2.0
        except torch.cuda.OutOfMemoryError:  # still short of memory: the device itself works
            return True
        except RuntimeError:  # torch.AcceleratorError is one
            return False

    def run(self, meta: BatchMeta) -> torch.Tensor:
        """The forward on prepared device inputs → logits [B, V] (float32). Pure tensor code: no host
        work or sync with the Triton backend, so a decode-only `meta` in fixed buffers can be captured
        as a CUDA graph (engine/cuda_graphs.py)."""
        return self.logits(*self.hidden(meta), meta.last)

    def hidden(self, meta: BatchMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers → (x, residual) [T, hidden] each: the last sub-layer's output and the
        residual stream it adds to (the final norm is logits()')."""
        lm, ops = self.model.model, self.ops
        x = lm.embed_tokens(meta.ids)  # [T, hidden]
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        pos = meta.pos.unsqueeze(0)  # [1, T]
        rotary = {t: self.rotary(x, pos, t) for t in {layer.rope for layer in self.layers}}  # (cos, sin) [T, R]
        q_scale = None  # Ministral 3: [T, 1], 1 + beta · ln(1 + ⌊pos / length⌋) (Hugging Face's, in fp32)
        if self.query_scale is not None:
            beta, length = self.query_scale
            q_scale = (1 + beta * torch.log1p(torch.floor(meta.pos / length)))[:, None].to(x.dtype)
        residual: torch.Tensor | None = None  # the residual stream; x is the last sub-layer's output
        rows = meta.extra.get("lora")  # LoRA adapters' token rows, where the batch has any
        for li, layer in enumerate(self.layers):
            h, residual = ops.norm(layer.input_norm, x, residual)  # residual += x; h = norm(residual)
            delta = self._lora(li, rows) if rows else None
            if isinstance(layer.qkv, Latent):  # DeepSeek's: attention over the latents (engine/mla.py)
                q, kvec = layer.qkv.project(h)
                out = layer.o_proj(self.attn.attend_latent(li, layer.qkv, q, kvec, *rotary[layer.rope], meta,
                                                           layer.scaling))  # [T, hidden]
            else:
                out = self._attention(li, layer, h, delta, rotary[layer.rope], meta, q_scale)  # [T, hidden]

            def mlp(h: torch.Tensor) -> torch.Tensor:  # (LoRA deltas in a dense MLP's projections only)
                if delta is None or not isinstance(layer.mlp, layers.Dense):
                    return layer.mlp(h, ops.act_mul)
                return layer.mlp(h, ops.act_mul, delta)

            if layer.parallel:  # Cohere, StableLM's parallel residual: residual + attention + MLP, in that order
                residual = residual + out
                x = mlp(h)
            elif layer.pre_mlp_norm is None or layer.post_mlp_norm is None:
                h, residual = ops.norm(layer.post_norm, self._branch(out), residual)
                x = self._branch(mlp(h))  # [T, hidden]
            else:  # Gemma, GLM 4: residual += post_norm(attention); x = post_mlp_norm(mlp(pre_mlp_norm(residual)))
                attn = self._branch(ops.norm(layer.post_norm, out, None)[0])
                h, residual = ops.norm(layer.pre_mlp_norm, attn, residual)
                x = self._branch(ops.norm(layer.post_mlp_norm, mlp(h), None)[0])
        assert residual is not None
        return x, residual

    def _attention(self, li: int, layer: layers.Layer, h: torch.Tensor, delta: layers.Lora | None,
                   rotary: tuple[torch.Tensor, torch.Tensor], meta: BatchMeta,
                   q_scale: torch.Tensor | None) -> torch.Tensor:
        """Layer li's attention, from the q|k|v projection to o_proj: h [T, hidden] → [T, hidden];
        q_scale [T, 1]: the queries' scale by position (Ministral 3), or None."""
        ops, T = self.ops, h.shape[0]
        D, H, KVH = self.head_dim, self.num_heads, self.num_kv_heads
        qkv = layer.qkv(h) if delta is None else delta("qkv", h, layer.qkv(h))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)  # [T, (H|KVH)*D]
        if layer.qk_norm_after_rope:  # Hunyuan: rotated here, then normalized; the kernels rotate by 0
            cos, sin = rotary
            q = ops.norm(layer.q_norm, rotate(q.view(T, H, D), cos, sin).reshape(T * H, D), None)[0]
            k = ops.norm(layer.k_norm, rotate(k.view(T, KVH, D), cos, sin).reshape(T * KVH, D), None)[0]
            rotary = (torch.ones_like(cos), torch.zeros_like(sin))
        elif layer.q_norm is not None and layer.k_norm is not None:
            if layer.qk_norm_whole:  # OLMo 2: over each token's whole q [T, H*D] and k [T, KVH*D]
                q, k = ops.norm(layer.q_norm, q, None)[0], ops.norm(layer.k_norm, k, None)[0]
            else:  # Qwen 3: per head, rows of [T*H, D]
                q = ops.norm(layer.q_norm, q.reshape(T * H, D), None)[0]
                k = ops.norm(layer.k_norm, k.reshape(T * KVH, D), None)[0]
        if q_scale is not None:  # (before the rotary, which is linear: Hugging Face scales after it)
            q = q * q_scale
        o = self.attn.attend(li, q.view(T, H, D), k.view(T, KVH, D), v.view(T, KVH, D), *rotary, meta,
                             layer.scaling)  # [T, H*D]
        return layer.o_proj(o) if delta is None else delta("o", o, layer.o_proj(o))

    def _lora(self, li: int, rows: dict[str, torch.Tensor]) -> layers.Lora:
        """Layer li's LoRA deltas: (projection, its input, its output) → the output with each
        adapter's rows' delta added (engine/lora.py)."""
        sizes = {"qkv": [self.q_size, self.kv_size, self.kv_size], "o": [self.model.config.hidden_size]}
        dense = self.layers[li].mlp
        if isinstance(dense, layers.Dense):
            inter = dense.down_proj.weight.shape[1]
            sizes |= {"gate_up": [inter, inter], "down": [self.model.config.hidden_size]}
        return lambda proj, x, out: lora.add_deltas(out, x, rows, self.adapters, li, proj, sizes[proj])

    def _branch(self, y: torch.Tensor) -> torch.Tensor:
        """A sub-layer's output [T, hidden] as the residual stream adds it (Granite: scaled)."""
        return y * self.residual_scale if self.residual_scale != 1.0 else y

    def logits(self, x: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """x, residual [T, hidden] → the logits [B, V] (float32) of token rows `rows` [B] (None: all)."""
        if rows is not None:  # only each sequence's last token is sampled
            x, residual = x.index_select(0, rows), residual.index_select(0, rows)  # [B, hidden]
        h, _ = self.ops.norm(self.model.model.norm, x, residual)
        logits = self.lm_head(h).float()  # [B, V]
        if self.logits_divisor != 1.0:
            logits = logits / self.logits_divisor
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
