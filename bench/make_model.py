"""A random-weight model of a named shape, saved as a local Hugging Face folder (no download).

    python bench/make_model.py --shape 1.1b --out /tmp/llama-1.1b --device cuda --dtype bfloat16
    python bench/make_model.py --shape 8b   --out /tmp/llama-8b   --device cuda --dtype bfloat16

Every GPU figure in the README comes from such a folder, so it can be reproduced on any CUDA machine
without a model hub: point `model.path` at it. Shapes: 1.1b (TinyLlama: hidden 2048, 22 layers, 32
heads, 4 KV heads, MLP 5632), 8b (Llama-3-8B: 4096, 32, 32, 8, 14336), test (a few MB, for tests);
qwen3-0.6b, qwen3-8b and qwen3-test the same for Qwen 3 (per-head q/k norms, head_dim 128);
qwen3-a3b-24l is Qwen3-30B-A3B's layer (128 experts of 768, 8 per token) in 24 of its 48 layers
(~15B parameters, 30 GB in bf16: the whole model would not fit a 64 GB disk), qwen3-moe-test a
few MB of the same kind; gemma3-1b is Gemma 3 1B's shape (head_dim 256, windows of 512), gemma2-2b
Gemma 2 2B's (head_dim 256, windows of 4096 in every other layer, soft-capped scores and logits),
glm4-9b GLM-4-9B-0414's (interleaved rotary on half of each head, sandwich norms, q/k/v biases),
olmo2-7b OLMo-2-1124-7B's (norms after the sub-layers only, q/k norms over all heads).
The tokenizer is byte-level BPE: ids 0-2 are the specials, 3-258 the 256 bytes (so any text
encodes, and llguidance can hold a grammar over it), and the rest words " t0", " t1", ... (one token
each, leading space included), so prompts of any length are easy to make (" t5 t17 t9 ...", or decode
ids ≥ 260), with a chat template.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
    "test": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
    # Qwen 3 (per-head q/k RMSNorm, head_dim 128 whatever hidden / heads is)
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, vocab_size=151936),
    "qwen3-test": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, intermediate_size=128, vocab_size=512),
    # Qwen 3 MoE: every layer sparse, the top-k weights renormalized
    "qwen3-a3b-24l": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936),
    # Gemma 3 1B: a window of 512 in 5 layers of 6, head_dim 256, tied embeddings
    "gemma3-1b": dict(hidden_size=1152, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                      head_dim=256, intermediate_size=6912, vocab_size=262144, sliding_window=512,
                      query_pre_attn_scalar=256, tie_word_embeddings=True),
    # Gemma 2 2B: a window of 4096 in every other layer, scores capped at 50 and logits at 30
    "gemma2-2b": dict(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=256, intermediate_size=9216, vocab_size=256000, sliding_window=4096,
                      query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      tie_word_embeddings=True),
    # GLM-4-9B-0414: rotary on pairs of neighbouring dims in the first half of each head, 2 KV heads
    "glm4-9b": dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
                    head_dim=128, intermediate_size=13696, vocab_size=151552, partial_rotary_factor=0.5,
                    attention_bias=True),
    # OLMo-2-1124-7B: no norm before a sub-layer, one after each; q and k normalized over all heads
    "olmo2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=11008, vocab_size=100352, rope_theta=500000.0),
    # gpt-oss-20b: attention sinks, a window of 128 in every other layer, 32 experts (top 4) with biases
    "gpt-oss-20b": dict(hidden_size=2880, num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8,
                        head_dim=64, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
                        vocab_size=201088, sliding_window=128),
    "gpt-oss-test": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                         vocab_size=512, sliding_window=16),
    # DeepSeek-V2-Lite: latent attention (16 heads over latents of 512 + 64: engine/mla.py), 64
    # experts (top 6) + 2 shared, the first layer dense
    "deepseek-v2-lite": dict(hidden_size=2048, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                             q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                             v_head_dim=128, head_dim=64, intermediate_size=10944, moe_intermediate_size=1408,
                             n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
                             topk_method="greedy", vocab_size=102400),
    "qwen3-moe-test": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=32, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                           num_experts_per_tok=2, norm_topk_prob=True, vocab_size=512),
}
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: eos is 2, as in the tiny model
FIRST_WORD = len(SPECIALS) + 256 + 1  # the id of " t0" (after the bytes and the merge prefix " t")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def config(shape: str, max_position: int = 8192, **overrides: Any) -> Any:
    """The Hugging Face config of a named shape (`overrides` replace its dimensions)."""
    from transformers import (DeepseekV2Config, Gemma2Config, Gemma3TextConfig, Glm4Config, GptOssConfig, LlamaConfig,
                              Olmo2Config, Qwen3Config, Qwen3MoeConfig)

    dims = {"tie_word_embeddings": False, **SHAPES[shape], **overrides}
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if shape.startswith("gemma3"):  # its own rotary bases (local 1e4, global 1e6) and windows
        return Gemma3TextConfig(**dims, max_position_embeddings=max_position, **ids)
    if shape.startswith("gemma2"):
        return Gemma2Config(**dims, max_position_embeddings=max_position, **ids)
    if shape.startswith("glm4"):
        return Glm4Config(**dims, max_position_embeddings=max_position, **ids)
    if shape.startswith("olmo2"):
        return Olmo2Config(**dims, max_position_embeddings=max_position, **ids)
    if shape.startswith("deepseek-v2"):
        return DeepseekV2Config(**dims, max_position_embeddings=max_position, **ids)
    if shape.startswith("gpt-oss"):  # its yarn rotary (x32 of 4096 positions) and alternating windows
        return GptOssConfig(**dims, max_position_embeddings=131072, **ids)  # (its own: 4096 x 32)
    family = (Qwen3MoeConfig if "num_experts" in dims else Qwen3Config) if shape.startswith("qwen3") else LlamaConfig
    return family(**dims, max_position_embeddings=max_position, rope_theta=10000.0 if family is LlamaConfig else 1e6,
                  **ids)


def build(shape: str, out: Path, device: str = "cpu", dtype: str = "bfloat16", seed: int = 0,
          max_position: int = 8192) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    cfg = config(shape, max_position)
    torch.manual_seed(seed)
    with torch.device(device):  # made in its dtype (a 15B float32 copy would not fit an 80 GB GPU)
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    if shape.startswith("gpt-oss"):  # its experts as OpenAI released them: MXFP4
        _save_mxfp4(model, out, seed)
    else:
        model.save_pretrained(out)
    hf = PreTrainedTokenizerFast(tokenizer_object=_tokenizer(cfg.vocab_size), unk_token="<unk>",
                                 bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<unk>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)
    return out


def _save_mxfp4(model: Any, out: Path, seed: int) -> None:
    """gpt-oss's folder as released: each expert weight as MXFP4 codes (`*_blocks` [E, N, K/32, 16],
    drawn at random among ±0..1.5) under one scale, 2^-7 (`*_scales`: weights ~0.01, as trained
    ones), the rest as made; `quantization_config` says so. One safetensors file."""
    import json

    import torch
    from safetensors.torch import save_file

    state = {}
    for key, w in model.state_dict().items():
        if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            state[key] = w.contiguous().cpu()
            continue
        E, K, N = w.shape  # [E, in, out]
        g = torch.Generator(device=w.device).manual_seed(seed)
        codes = torch.randint(0, 4, (E, N, K), generator=g, device=w.device, dtype=torch.uint8)
        codes |= torch.randint(0, 2, (E, N, K), generator=g, device=w.device, dtype=torch.uint8) << 3  # sign
        state[key + "_blocks"] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).view(E, N, K // 32, 16).cpu()
        state[key + "_scales"] = torch.full((E, N, K // 32), 127 - 7, dtype=torch.uint8).cpu()
        del codes
    save_file(state, out / "model.safetensors")
    cfg = {**json.loads(model.config.to_json_string()), "architectures": ["GptOssForCausalLM"],
           "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
               "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    model.generation_config.save_pretrained(out)


def _tokenizer(vocab_size: int) -> Any:
    """Byte-level BPE whose merges build each word " t<k>" digit by digit (" t", " t1", " t12", ...):
    the words are prefix-closed, so every intermediate of a merge is itself a token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    glyph = _byte_glyphs()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({glyph[b]: len(SPECIALS) + b for b in range(256)})
    prefix = glyph[ord(" ")] + "t"
    vocab[prefix] = len(vocab)
    merges = [(glyph[ord(" ")], "t")]
    k = 0
    while len(vocab) < vocab_size:
        vocab[f"{prefix}{k}"] = len(vocab)
        merges.append((f"{prefix}{k // 10}" if k >= 10 else prefix, str(k % 10)))
        k += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    # a word is its own piece (else byte-level's regex would split " t" from the digits)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" t[0-9]+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def _byte_glyphs() -> dict[int, str]:
    """GPT-2's byte → printable character map, which byte-level pre-tokenizers and decoders use."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is much faster)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.monotonic()
    path = build(a.shape, Path(a.out), a.device, a.dtype, a.seed)
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**30
    print(f"{a.shape}: {path} ({size:.2f} GiB) in {time.monotonic() - t0:.0f}s")


if __name__ == "__main__":
    main()
