"""A tiny seeded random Llama and a file-free byte-level tokenizer, for fast tests.

Both are built in-process from code, so every process that builds them (test, prefill actor,
decode actor) gets bit-identical weights and the same vocabulary, with no files and no network.
"""
from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (ApertusConfig, ArceeConfig, AutoModelForCausalLM, Cohere2Config, CohereConfig, CwmConfig,
                          DeepseekV2Config, DeepseekV3Config, Dots1Config, Ernie4_5_MoeConfig, Ernie4_5Config,
                          Exaone4Config, ExaoneMoeConfig, Gemma2Config, Gemma3TextConfig, GemmaConfig, Glm4Config,
                          Glm4MoeConfig, Glm4MoeLiteConfig, GlmConfig, GptOssConfig, GraniteConfig, GraniteMoeConfig,
                          HeliumConfig, HunYuanDenseV1Config, HyperCLOVAXConfig, InternLM3Config, IQuestCoderConfig,
                          Jais2Config, LlamaConfig, MiniMaxM2Config, Ministral3Config, MinistralConfig,
                          MistralConfig, MixtralConfig, NemotronConfig, Olmo2Config, Olmo3Config, OlmoConfig,
                          OlmoeConfig, Phi3Config, PhimoeConfig, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig,
                          SeedOssConfig, SmolLM3Config, SolarOpenConfig, StableLmConfig, Starcoder2Config,
                          VaultGemmaConfig)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_ID = 2  # <|im_end|>
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 3 special tokens then one token per byte (vocab 259)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in _byte_chars():
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    hf.add_special_tokens({"additional_special_tokens": SPECIALS})
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _byte_chars() -> list[str]:
    """The GPT-2 byte-level alphabet in byte order: printable bytes stand for themselves, the
    others are shifted past 255 (the characters `pre_tokenizers.ByteLevel` produces)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def tiny_config(vocab_size: int = 259) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


MOE = dict(num_experts_per_tok=2, router_jitter_noise=0.0)  # 8 experts, each token through 2
WINDOW = {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}  # layer 0 windowed
GEMMA = {"initializer_range": 0.02,  # its embeddings are scaled by sqrt(hidden) = 8
         "query_pre_attn_scalar": 16, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
         "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}
V3_ROUTER = dict(n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)  # 4 groups, 2 taken
MLA = dict(MOE, num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
           head_dim=8, n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1)
FAMILIES: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {  # arch → its config, what differs
    "llama": (LlamaConfig, {}),
    "mistral": (MistralConfig, {"sliding_window": 16}),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, {"head_dim": 32, "tie_word_embeddings": True}),
    "qwen3_moe": (Qwen3MoeConfig, {**MOE, "head_dim": 32, "num_experts": 8, "moe_intermediate_size": 32,
                                   "mlp_only_layers": [0], "norm_topk_prob": True}),
    "mixtral": (MixtralConfig, {**MOE, "num_local_experts": 8, "intermediate_size": 64}),
    "qwen2_moe": (Qwen2MoeConfig, {**MOE, "num_experts": 8, "moe_intermediate_size": 32,
                                   "shared_expert_intermediate_size": 64}),
    "phi3": (Phi3Config, {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0}),
    "gemma2": (Gemma2Config, {**GEMMA, "attn_logit_softcapping": 0.05,  # (Gemma 2 9B's: 50 and 30; these
                              "final_logit_softcapping": 0.5}),  # bite at this size: scores ~0.1, logits ~0.5)
    "gemma3_text": (Gemma3TextConfig, {
        **GEMMA, "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    "glm4": (Glm4Config, {"partial_rotary_factor": 0.5, "attention_bias": True}),  # its defaults
    "granite": (GraniteConfig, {"embedding_multiplier": 4.0, "residual_multiplier": 0.5,  # (Granite 3 8B's: 12,
                                "attention_multiplier": 0.1, "logits_scaling": 2.0}),  # 0.22, 1/128, 16)
    "smollm3": (SmolLM3Config, {"no_rope_layers": [1, 0]}),  # layer 1 without rotary (its every fourth)
    "olmo2": (Olmo2Config, {}),
    # Llama-shaped families whose parts the ones above already have:
    "olmo3": (Olmo3Config, {**WINDOW, "rope_parameters": {  # OLMo 2's layers, windows, a rotary per layer type
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    "exaone4": (Exaone4Config, WINDOW),  # OLMo 2's norms, per-head q/k norms, no rotary in its global layer
    "ministral": (MinistralConfig, WINDOW),
    "seed_oss": (SeedOssConfig, {}),  # q/k/v and o biases
    "internlm3": (InternLM3Config, {}),
    "helium": (HeliumConfig, {}),  # interleaved rotary
    "ernie4_5": (Ernie4_5Config, {}),  # interleaved rotary, tied embeddings
    "glm": (GlmConfig, {}),  # GLM-4-9B-chat: interleaved rotary on half of each head, q/k/v biases
    "cohere": (CohereConfig, {"logit_scale": 2.0}),  # Command R: attention and MLP in parallel, LayerNorm, pairs rotary
    "cohere2": (Cohere2Config, {**WINDOW, "logit_scale": 2.0}),  # Command R7B: the same, no rotary in its global layer
    # StarCoder 2: LayerNorms, biases, an MLP without a gate, a window in every layer
    "starcoder2": (Starcoder2Config, {"sliding_window": 16, "hidden_act": "gelu_pytorch_tanh"}),
    "arcee": (ArceeConfig, {"hidden_act": "relu2"}),  # an MLP without a gate, of relu(x)^2
    "nemotron": (NemotronConfig, {}),  # Minitron: LayerNorm1P, relu^2 without a gate, rotary on half of each head
    "olmoe": (OlmoeConfig, {**MOE, "num_experts": 8, "intermediate_size": 32}),  # OLMo's q/k norms, 8 experts
    "granitemoe": (GraniteMoeConfig, {**MOE, "num_local_experts": 8, "intermediate_size": 32,  # Granite's
                                      "embedding_multiplier": 4.0, "residual_multiplier": 0.5,  # multipliers,
                                      "attention_multiplier": 0.1, "logits_scaling": 2.0}),  # experts
    # gpt-oss: attention sinks, windows, yarn rotary tables of half a head, q/k/v/o biases, experts with
    # biases and a router bias, its clamped GLU of interleaved gate/up (a limit that bites at this size)
    "gpt_oss": (GptOssConfig, {**MOE, **WINDOW, "num_local_experts": 8, "intermediate_size": 32, "attention_bias": True,
                               "swiglu_limit": 0.5, "rope_parameters": {
                                   "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                   "truncate": False, "original_max_position_embeddings": 128, "rope_theta": 150000.0}}),
    # DeepSeek's latent attention (heads of 8 rotary + 16 other dims, values of 16), experts with shared
    # ones beside, the first layer dense. V2 (V2-Lite's: no q compression): softmax top-k scaled, yarn
    # with its attention scale; V3 (Moonlight's, Kimi K2's): q compressed, sigmoid scores with a bias, top groups
    "deepseek_v2": (DeepseekV2Config, {**MLA, "q_lora_rank": None, "topk_method": "greedy", "routed_scaling_factor": 2.0,
                                       "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                                           "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                                                           "original_max_position_embeddings": 1024,
                                                           "rope_theta": 10000.0}}),
    "deepseek_v3": (DeepseekV3Config, {**MLA, "q_lora_rank": 32, "n_group": 4, "topk_group": 2,
                                       "routed_scaling_factor": 2.5}),
    # ERNIE 4.5 MoE (21B-A3B's): ERNIE 4.5's attention, a router choosing by its probabilities plus a bias
    # (its own module), a shared expert, layer 0 dense
    "ernie4_5_moe": (Ernie4_5_MoeConfig, {**MOE, "num_experts": 8, "moe_intermediate_size": 32,
                                          "moe_num_shared_experts": 1, "moe_layer_start_index": 1}),
    # Gemma (1), CodeGemma: Gemma 3's (1 + w) norms, GELU-tanh and scaled embeddings, one norm per sub-layer
    "gemma": (GemmaConfig, {k: GEMMA[k] for k in ("initializer_range", "hidden_act", "tie_word_embeddings")}),
    # StableLM 2 (1.6B's): LayerNorms with biases, q/k/v biases, rotary on a quarter of each head
    # (use_parallel_residual: Command R's layer, attention and MLP of the same input)
    "stablelm": (StableLmConfig, {"partial_rotary_factor": 0.25, "use_qkv_bias": True}),
    "olmo": (OlmoConfig, {}),  # OLMo (1): LayerNorms without weights
    # CWM (Meta's Code World Model): Llama's layers, llama3 rotary, windows in three layers of four
    "cwm": (CwmConfig, {**WINDOW, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6, "factor": 16.0,
                                                      "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                      "original_max_position_embeddings": 32}}),
    # K-EXAONE: EXAONE 4's attention (no rotary in its global layers), DeepSeek V3's router and shared
    # experts, layer 0 dense
    "exaone_moe": (ExaoneMoeConfig, {**WINDOW, **V3_ROUTER, "num_experts": 8, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "num_shared_experts": 1,
                                     "mlp_layer_types": ["dense", "sparse"]}),
    # Solar Open: Llama's attention, GLM-4.5's experts (DeepSeek V3's router, a shared expert) in every layer
    "solar_open": (SolarOpenConfig, {**V3_ROUTER, "n_routed_experts": 8, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "n_shared_experts": 1}),
    # MiniMax-M2: q and k normalized over all heads (OLMo 2's), rotary on half of each head, experts
    # chosen by sigmoid scores plus the block's bias, their weights renormalized
    "minimax_m2": (MiniMaxM2Config, {**MOE, "num_local_experts": 8, "intermediate_size": 32,
                                     "partial_rotary_factor": 0.5}),
    # Hunyuan (dense): q and k normalized per head after the rotary, NTK-alpha rotary (static)
    "hunyuan_v1_dense": (HunYuanDenseV1Config, {"rope_parameters": {"rope_type": "dynamic", "alpha": 1000.0,
                                                                    "factor": 1.0, "rope_theta": 1e4}}),
    # Apertus: its own names for the norms, per-head q/k norms, xIELU (learned) without a gate, llama3 rotary
    "apertus": (ApertusConfig, {"hidden_act": "xielu", "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}),
    # HyperCLOVA X (SEED): Granite's multipliers (its logits_scaling multiplies), norms after each sub-layer
    "hyperclovax": (HyperCLOVAXConfig, {"embedding_multiplier": 4.0, "residual_multiplier": 0.5,
                                        "attention_multiplier": 0.1, "logits_scaling": 2.0}),
    # VaultGemma: Gemma 2 without its norms after each sub-layer
    "vaultgemma": (VaultGemmaConfig, {**GEMMA, "attn_logit_softcapping": 0.05, "final_logit_softcapping": 0.5}),
    # dots.llm1: Qwen 3's attention, DeepSeek V3's router and shared experts, layer 0 dense
    "dots1": (Dots1Config, {**V3_ROUTER, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                            "n_shared_experts": 1, "first_k_dense_replace": 1}),
    # Phi-3.5-MoE: LayerNorms, biases (the LM head's too), experts chosen by its router's sparsemixer,
    # LongRoPE (its short factors and scale: positions within the original length)
    "phimoe": (PhimoeConfig, {**MOE, "num_local_experts": 8, "intermediate_size": 32, "attention_bias": True,
                              "lm_head_bias": True, "rope_parameters": {
                                  "rope_type": "longrope", "rope_theta": 1e4, "short_mscale": 1.2, "long_mscale": 1.3,
                                  "short_factor": [1.0 + i / 8 for i in range(8)], "long_factor": [2.0] * 8,
                                  "original_max_position_embeddings": 4096}}),
    # GLM-4.7-Flash: DeepSeek V3's latent attention (q compressed), GLM-4.5's experts, layer 0 dense
    "glm4_moe_lite": (Glm4MoeLiteConfig, {**MLA, "q_lora_rank": 32, "n_group": 4, "topk_group": 2,
                                          "routed_scaling_factor": 1.8, "mlp_layer_types": ["dense", "sparse"]}),
    "iquestcoder": (IQuestCoderConfig, {}),  # IQuest-Coder: Llama's model under its own config
    # Jais 2: LayerNorms, biases, relu^2 without a gate
    "jais2": (Jais2Config, {"hidden_act": "relu2", "attention_bias": True, "mlp_bias": True}),
    # Ministral 3: queries scaled by position past its original context (Llama 4's temperature; 16 here, 16k real)
    "ministral3": (Ministral3Config, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                          "llama_4_scaling_beta": 0.1,
                                                          "original_max_position_embeddings": 16}}),
    # GLM-4.5 / 4.6 (Air's): rotary on half of each head (not in pairs), q/k/v biases, per-head q/k norms,
    # DeepSeek V3's router (sigmoid scores with a bias, top groups, scaled) and a shared expert, layer 0 dense
    "glm4_moe": (Glm4MoeConfig, {**MOE, "partial_rotary_factor": 0.5, "attention_bias": True, "use_qk_norm": True,
                                 **V3_ROUTER, "n_routed_experts": 8, "moe_intermediate_size": 32,
                                 "n_shared_experts": 1, "first_k_dense_replace": 1}),
}
ARCHS = tuple(FAMILIES)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, arch: str = "llama",
               **overrides: Any) -> PreTrainedModel:
    """Seeded random Llama (~100k parameters). Same seed → same weights in every process.
    arch: the same size as another supported family — mistral (a sliding window of 16 tokens in
    every layer), qwen2 (q/k/v biases), qwen3 (per-head q/k RMSNorm, a head_dim that is not hidden /
    heads, tied embeddings), qwen3_moe (qwen3's attention, experts of 32 in layer 1 and a dense MLP
    in layer 0, top-k weights renormalized), mixtral (experts of 64 in every layer), qwen2_moe
    (qwen2's attention, experts of 32 beside a gated shared expert of 64 in every layer), phi3
    (q|k|v and gate|up fused in the checkpoint), gemma3_text (a window of 16 in layer 0, local and
    global rotary bases, sandwich norms, (1 + w) RMSNorm, GELU, scaled embeddings), gemma2 (Gemma 3's
    layers with one rotary base, attention scores and final logits soft-capped), glm4 (q/k/v biases,
    interleaved rotary on half of each head, sandwich norms, gate|up fused in the checkpoint), granite
    (multipliers of the embeddings, the residual branches and the attention scores, a logits divisor),
    smollm3 (no rotary in layer 1), olmo2 (norms after each sub-layer only, q and k normalized over
    all their heads at once); and the families in FAMILIES below those (gpt-oss: attention sinks).
    overrides: config fields (e.g. a window)."""
    if arch not in FAMILIES:
        raise ValueError(f"arch {arch!r} is not one of {ARCHS}")
    family, differs = FAMILIES[arch]
    cfg = family(**{**tiny_config().to_dict(), "model_type": arch, **differs, **overrides})
    from engine.model_loader import hf_attention  # (it imports this module)

    cfg._attn_implementation = hf_attention(cfg)
    saved = torch.random.get_rng_state()  # build seeded without disturbing the caller's RNG
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # what the family adds (initialized to zeros / ones) made to matter
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "q_norm.weight", "k_norm.weight",
                              "query_layernorm.weight", "key_layernorm.weight")):  # (Hunyuan's q/k norms)
                p.uniform_(0.5, 1.5)
            elif name.endswith("norm.weight") and not p.any():  # Gemma's norms scale by (1 + w), w from 0
                p.uniform_(-0.5, 0.5)
            elif name.endswith("mlp.gate.weight"):  # a router: tokens spread over the experts
                p.normal_(0, 1.0)
            elif name.endswith((".bias", "_bias")) and not p.any():  # other biases (MLP, o_proj, LayerNorm,
                p.uniform_(-0.5, 0.5)  # gpt-oss's experts), from zero
            elif name.endswith("self_attn.sinks"):  # gpt-oss: sinks that take a real share of the softmax
                p.normal_(0, 1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek V3's router bias (a buffer), from zero
                b.uniform_(-0.5, 0.5)
    torch.random.set_rng_state(saved)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()
