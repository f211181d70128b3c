"""The model runner: owns the one KV tensor and runs Llama-family forwards over block tables.

It reuses the Hugging Face module weights and numerics (norms, projections, rotary, MLP) and
replaces only attention, which reads and writes the paged KV cache. Callers (the prefill and decode
schedulers) hand it `SeqInput`s: which new tokens to compute per sequence and where every position
of that sequence lives in the cache (its slots). No Ray, no gRPC.

KV layout (one tensor for all layers):
    kv: [num_layers, 2 (k|v), num_slots, kv_heads, head_dim]     slot = block * block_size + offset
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


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
    def __init__(self, model: PreTrainedModel, num_blocks: int, block_size: int) -> None:
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
        num_slots = num_blocks * block_size
        # [L, 2, num_slots, kv_heads, head_dim]
        self.kv = torch.zeros(
            self.num_layers, 2, num_slots, self.num_kv_heads, self.head_dim, dtype=self.dtype, device=self.device
        )
        self.tokens_forwarded = 0

    # -- KV hand-off ---------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.kv.element_size()

    def kv_shape(self, num_tokens: int) -> tuple[int, ...]:
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat cache slots of positions [start, end) of a sequence → [end - start] long."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    def gather_kv(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Copy out positions [0, num_tokens) → contiguous [L, 2, n, kv_heads, head_dim]."""
        return self.kv.index_select(2, self.slots(block_table, 0, num_tokens)).contiguous()

    def scatter_kv(self, block_table: list[int], kv: torch.Tensor) -> None:
        """Write a [L, 2, n, kv_heads, head_dim] tensor into positions [0, n) of a sequence."""
        self.kv.index_copy_(2, self.slots(block_table, 0, kv.shape[2]), kv.to(self.device, self.dtype))

    # -- forward --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, seqs: list[SeqInput]) -> torch.Tensor:
        """Compute the new tokens of every sequence; return the logits of each one's last token [B, V]."""
        dev = self.device
        ids = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.long, device=dev)  # [T]
        pos = torch.tensor(
            [p for s in seqs for p in range(s.start_pos, s.context_len)], dtype=torch.long, device=dev
        )  # [T]
        new_slots = torch.cat([self.slots(s.block_table, s.start_pos, s.context_len) for s in seqs])  # [T]
        T = ids.numel()
        self.tokens_forwarded += T
        lm = self.model.model
        x = lm.embed_tokens(ids).unsqueeze(0)  # [1, T, hidden]
        cos, sin = lm.rotary_emb(x, pos.unsqueeze(0))  # [1, T, head_dim]
        decode_only = all(s.num_new == 1 for s in seqs)
        ctx = self._decode_context(seqs) if decode_only else None
        for li, layer in enumerate(lm.layers[: self.num_layers]):
            residual = x
            h = layer.input_layernorm(x)
            attn = layer.self_attn
            q = attn.q_proj(h).view(1, T, self.num_heads, self.head_dim).transpose(1, 2)  # [1, H, T, D]
            k = attn.k_proj(h).view(1, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [1, KVH, T, D]
            v = attn.v_proj(h).view(1, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.kv[li, 0].index_copy_(0, new_slots, k[0].transpose(0, 1))  # [T, KVH, D] into slots
            self.kv[li, 1].index_copy_(0, new_slots, v[0].transpose(0, 1))
            if ctx is not None:
                o = self._decode_attention(li, q, ctx, attn.scaling)
            else:
                o = self._varlen_attention(li, seqs, q, k, v, attn.scaling)
            x = residual + attn.o_proj(o)  # o: [1, T, H*D]
            residual = x
            x = residual + layer.mlp(layer.post_attention_layernorm(x))
        last = torch.tensor(
            list(_cumsum(s.num_new for s in seqs)), dtype=torch.long, device=dev
        ) - 1  # index of each sequence's last new token in the packed T axis
        h_last = lm.norm(x[0].index_select(0, last))  # [B, hidden]
        return self.model.lm_head(h_last).float()  # [B, V]

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
                ks = self.kv[li, 0].index_select(0, idx).transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
                vs = self.kv[li, 1].index_select(0, idx).transpose(0, 1).unsqueeze(0)
                qpos = torch.arange(s.start_pos, s.context_len, device=self.device)
                mask = torch.arange(s.context_len, device=self.device)[None, :] <= qpos[:, None]  # [n, ctx]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
            outs.append(o)
            off += n
        o = torch.cat(outs, dim=2)  # [1, H, T, D]
        return o.transpose(1, 2).reshape(1, q.shape[2], self.num_heads * self.head_dim)

    def _decode_context(self, seqs: list[SeqInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather index [B, max_ctx] of every sequence's slots (padded with slot 0) and its mask."""
        bs = self.block_size
        max_ctx = max(s.context_len for s in seqs)
        max_blocks = -(-max_ctx // bs)
        table = torch.zeros(len(seqs), max_blocks, dtype=torch.long)  # [B, max_blocks], padded with block 0
        for i, s in enumerate(seqs):
            n = -(-s.context_len // bs)
            table[i, :n] = torch.tensor(s.block_table[:n])
        pos = torch.arange(max_ctx)
        idx = table[:, pos // bs] * bs + pos % bs  # [B, max_ctx] slots; padding reads block 0, masked
        lens = torch.tensor([s.context_len for s in seqs])
        mask = pos[None, :] < lens[:, None]  # [B, max_ctx]
        return idx.to(self.device), mask[:, None, None, :].to(self.device)  # mask [B, 1, 1, max_ctx]

    def _decode_attention(
        self, li: int, q: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor], scale: float
    ) -> torch.Tensor:
        """One new token per sequence: batched attention over padded contexts. q [1,H,B,D] → [1,B,H*D]."""
        idx, mask = ctx
        B, max_ctx = idx.shape
        flat = idx.reshape(-1)
        ks = self.kv[li, 0].index_select(0, flat).view(B, max_ctx, self.num_kv_heads, self.head_dim)
        vs = self.kv[li, 1].index_select(0, flat).view(B, max_ctx, self.num_kv_heads, self.head_dim)
        qb = q[0].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
        if B == 1:  # no padding: same call as a batch-1 Hugging Face decode step
            o = F.scaled_dot_product_attention(
                qb, ks.transpose(1, 2), vs.transpose(1, 2), scale=scale, enable_gqa=True
            )
        else:
            o = F.scaled_dot_product_attention(
                qb, ks.transpose(1, 2), vs.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=True
            )  # [B, H, 1, D]
        return o.reshape(1, B, self.num_heads * self.head_dim)


def _cumsum(xs):  # type: ignore[no-untyped-def]
    total = 0
    for x in xs:
        total += x
        yield total
