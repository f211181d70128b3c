"""The model runner: owns the one KV tensor and runs Llama-family forwards over block tables.

It reuses the Hugging Face module weights and numerics (norms, projections, rotary, MLP) and
replaces only attention, which reads and writes the paged KV cache. Callers (the prefill and decode
schedulers) hand it `SeqInput`s: which new tokens to compute per sequence and where every position
of that sequence lives in the cache (its slots). No Ray, no gRPC.

KV layout (one tensor for all layers):
    kv:       [num_layers, 2 (k|v), num_blocks, block_size, kv_heads, head_dim]
    kv_slots: the same memory as [num_layers, 2, num_slots, kv_heads, head_dim],
              slot = block * block_size + offset
Decode attention runs a fused C++ kernel over the block tables on CPU (engine/csrc), reading each
sequence's K/V in place (2.4x faster than gathering whole blocks into a padded copy for SDPA, which
remains the path on CUDA and wherever the kernel cannot be built). The q/k/v and gate/up projections run as one matmul each (weights concatenated
once, the original modules left as views into them).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine import paged_attention
from engine.linear import Linear, default_backend, from_module


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's weights, with q|k|v and gate|up fused into single matmuls."""

    input_norm: torch.nn.Module
    post_norm: torch.nn.Module
    qkv: Linear  # weight [(H + 2*KVH) * D, hidden]
    o_proj: Linear
    gate_up: Linear  # weight [2 * intermediate, hidden]
    down_proj: Linear
    act: torch.nn.Module
    scaling: float


def _fuse(mods: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of `mods`; leave each module's weight as a view into it."""
    w = torch.cat([m.weight.data for m in mods], dim=0)
    has_bias = all(m.bias is not None for m in mods)
    b = torch.cat([m.bias.data for m in mods], dim=0) if has_bias else None
    off = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight.data = w[off : off + n]
        if b is not None:
            m.bias.data = b[off : off + n]
        off += n
    return w, b


@dataclass(frozen=True)
class SeqInput:
    token_ids: list[int]  # the new tokens to compute this forward
    start_pos: int  # position of token_ids[0]; positions < start_pos are already in the cache
    block_table: list[int]  # the sequence's KV blocks, in position order

    @property
    def num_new(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


class ModelRunner:
    def __init__(
        self, model: PreTrainedModel, num_blocks: int, block_size: int, kernels: str = "auto",
        kv: torch.Tensor | None = None,
    ) -> None:
        cfg = model.config
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size = cfg.vocab_size
        self.block_size = block_size
        self.num_blocks = num_blocks
        # [L, 2, num_blocks, block_size, kv_heads, head_dim]; `kv` (e.g. a shared one) must have this shape
        shape = self.cache_shape(cfg, num_blocks, block_size)
        if kv is not None and (tuple(kv.shape) != shape or kv.dtype != self.dtype):
            raise ValueError(f"kv cache {tuple(kv.shape)} {kv.dtype} does not match {shape} {self.dtype}")
        self.kv = kv if kv is not None else torch.zeros(shape, dtype=self.dtype, device=self.device)
        # [L, 2, num_slots, kv_heads, head_dim] (a view)
        self.kv_slots = self.kv.view(self.num_layers, 2, num_blocks * block_size, self.num_kv_heads, self.head_dim)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        backend = default_backend(self.device) if kernels == "auto" else "torch"
        self.kernels = backend
        # fused decode attention over the block tables (CPU fp32); None → gather + SDPA
        self._paged = paged_attention.load() if backend == "onednn" and self.dtype == torch.float32 else None
        self.layers = []
        for layer in model.model.layers[: self.num_layers]:
            a, mlp = layer.self_attn, layer.mlp
            w_qkv, b_qkv = _fuse([a.q_proj, a.k_proj, a.v_proj])
            w_gu, b_gu = _fuse([mlp.gate_proj, mlp.up_proj])
            if b_gu is not None:
                raise NotImplementedError("MLP biases are not supported")
            self.layers.append(
                _Layer(layer.input_layernorm, layer.post_attention_layernorm, Linear(w_qkv, b_qkv, backend),
                       from_module(a.o_proj, backend), Linear(w_gu, None, backend),
                       from_module(mlp.down_proj, backend), mlp.act_fn, a.scaling)
            )
        self.lm_head = from_module(model.lm_head, backend)
        self.tokens_forwarded = 0

    @staticmethod
    def cache_shape(cfg: object, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """[L, 2, num_blocks, block_size, kv_heads, head_dim] for a model config."""
        c: Any = cfg
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return (c.num_hidden_layers, 2, num_blocks, block_size, c.num_key_value_heads, head_dim)

    # -- slots ----------------------------------------------------------------------------------
    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat cache slots of positions [start, end) of a sequence → [end - start] long."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    # -- forward --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, seqs: list[SeqInput]) -> torch.Tensor:
        """Compute the new tokens of every sequence; return the logits of each one's last token [B, V].

        Any mix works: decode rows (one new token) and prompt chunks may share a forward (Sarathi);
        the decode rows should come first so they take the paged kernel."""
        dev = self.device
        ids = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.long, device=dev)  # [T]
        pos = torch.tensor(
            [p for s in seqs for p in range(s.start_pos, s.context_len)], dtype=torch.long, device=dev
        )  # [T]
        # The leading run of one-token sequences (decode rows) goes through the paged decode path;
        # the rest (prompts, chunks) through varlen attention. Mixed batches put decodes first.
        nd = 0
        while nd < len(seqs) and seqs[nd].num_new == 1:
            nd += 1
        ctx = self._decode_context(seqs[:nd]) if nd else None
        slot_parts = []
        if ctx is not None:  # one new token each, at position lens - 1: its slot from the block table
            bs = self.block_size
            slot_parts.append(ctx[0].gather(1, (pos[:nd] // bs)[:, None]).squeeze(1) * bs + pos[:nd] % bs)  # [nd]
        slot_parts += [self.slots(s.block_table, s.start_pos, s.context_len) for s in seqs[nd:]]
        new_slots = torch.cat(slot_parts) if len(slot_parts) > 1 else slot_parts[0]  # [T]
        T = ids.numel()
        self.tokens_forwarded += T
        lm = self.model.model
        x = lm.embed_tokens(ids).unsqueeze(0)  # [1, T, hidden]
        cos, sin = lm.rotary_emb(x, pos.unsqueeze(0))  # [1, T, head_dim]
        D, H, KVH = self.head_dim, self.num_heads, self.num_kv_heads
        for li, layer in enumerate(self.layers):
            residual = x
            qkv = layer.qkv(layer.input_norm(x))  # [1, T, (H + 2*KVH) * D]
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(1, T, H, D).transpose(1, 2)  # [1, H, T, D]
            k = k.view(1, T, KVH, D).transpose(1, 2)  # [1, KVH, T, D]
            v = v.view(1, T, KVH, D).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.kv_slots[li, 0].index_copy_(0, new_slots, k[0].transpose(0, 1))  # [T, KVH, D] into slots
            self.kv_slots[li, 1].index_copy_(0, new_slots, v[0].transpose(0, 1))
            if nd == len(seqs):
                o = self._decode_attention(li, q, ctx, layer.scaling)  # [1, T, H*D]
            elif nd == 0:
                o = self._varlen_attention(li, seqs, q, k, v, layer.scaling)
            else:  # decode rows [0, nd) + prompt tokens [nd, T)
                o = torch.cat([
                    self._decode_attention(li, q[:, :, :nd], ctx, layer.scaling),
                    self._varlen_attention(li, seqs[nd:], q[:, :, nd:], k[:, :, nd:], v[:, :, nd:], layer.scaling),
                ], dim=1)
            x = residual + layer.o_proj(o)  # o: [1, T, H*D]
            residual = x
            gate, up = layer.gate_up(layer.post_norm(x)).chunk(2, dim=-1)  # [1, T, I] each
            x = residual + layer.down_proj(layer.act(gate) * up)
        last = torch.tensor(
            list(accumulate(s.num_new for s in seqs)), dtype=torch.long, device=dev
        ) - 1  # index of each sequence's last new token in the packed T axis
        h_last = lm.norm(x[0].index_select(0, last))  # [B, hidden]
        return self.lm_head(h_last).float()  # [B, V]

    def _varlen_attention(
        self, li: int, seqs: list[SeqInput], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Packed prompts/chunks: one causal attention per sequence. q [1,H,T,D] → out [1,T,H*D]."""
        outs = []
        off = 0
        for s in seqs:
            n = s.num_new
            qs = q[:, :, off : off + n]  # [1, H, n, D]
            if s.start_pos == 0:  # whole prompt in this forward: keys are the fresh ones
                ks, vs = k[:, :, off : off + n], v[:, :, off : off + n]
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=n > 1, scale=scale, enable_gqa=True)
            else:  # a later chunk: read the earlier positions from the cache
                idx = self.slots(s.block_table, 0, s.context_len)
                ks = self.kv_slots[li, 0].index_select(0, idx).transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
                vs = self.kv_slots[li, 1].index_select(0, idx).transpose(0, 1).unsqueeze(0)
                qpos = torch.arange(s.start_pos, s.context_len, device=self.device)
                mask = torch.arange(s.context_len, device=self.device)[None, :] <= qpos[:, None]  # [n, ctx]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
            outs.append(o)
            off += n
        o = torch.cat(outs, dim=2)  # [1, H, T, D]
        return o.transpose(1, 2).reshape(1, q.shape[2], self.num_heads * self.head_dim)

    def _decode_context(self, seqs: list[SeqInput]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block tables [B, max_blocks] (padded with block 0), context lengths [B], mask [B, 1, 1, T]."""
        bs = self.block_size
        max_ctx = max(s.context_len for s in seqs)
        max_blocks = -(-max_ctx // bs)
        table = torch.zeros(len(seqs), max_blocks, dtype=torch.long)  # [B, max_blocks]
        for i, s in enumerate(seqs):
            n = -(-s.context_len // bs)
            table[i, :n] = torch.tensor(s.block_table[:n])
        lens = torch.tensor([s.context_len for s in seqs], dtype=torch.long)
        mask = torch.arange(max_blocks * bs)[None, :] < lens[:, None]  # [B, max_blocks * bs]
        return table.to(self.device), lens.to(self.device), mask[:, None, None, :].to(self.device)

    def _decode_attention(
        self, li: int, q: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor, torch.Tensor], scale: float
    ) -> torch.Tensor:
        """One new token per sequence: attention over each one's blocks. q [1,H,B,D] → [1,B,H*D]."""
        table, lens, mask = ctx
        B, T = mask.shape[0], mask.shape[-1]
        if self._paged is not None:  # fused kernel: reads K/V in place through the block table
            qb = q[0].transpose(0, 1).contiguous()  # [B, H, D]
            o = self._paged.paged_decode_attention(qb, self.kv[li, 0], self.kv[li, 1], table, lens, scale)
            return o.reshape(1, B, self.num_heads * self.head_dim)
        flat = table.view(-1)
        # [B * max_blocks, bs, KVH, D] → [B, T, KVH, D] → [B, KVH, T, D]
        ks = self.kv[li, 0].index_select(0, flat).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        vs = self.kv[li, 1].index_select(0, flat).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        qb = q[0].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
        if B == 1:  # cut the padding: the same call as a batch-1 Hugging Face decode step
            n = int(lens[0])
            o = F.scaled_dot_product_attention(qb, ks[:, :, :n], vs[:, :, :n], scale=scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qb, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.reshape(1, B, self.num_heads * self.head_dim)  # from [B, H, 1, D]

