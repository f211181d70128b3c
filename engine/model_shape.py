"""A Hugging Face config's attention as the runner lays it out: the cache's heads and width (DeepSeek's
latents too), which dims the rotary turns together and in what layout a family's tables come, each
layer's sliding window, and the longest context the rotary is computed for. Pure functions of the
config (engine/model_loader.py checks a model against them; engine/model_runner.py and
engine/kv_budget.py size and compute with them)."""
from __future__ import annotations

from typing import Any

from engine import mla

INTERLEAVED_TABLES = ("cohere", "cohere2")  # rotary tables already interleaved (cos[2i] = cos[2i + 1]: Cohere's)
HALF_TABLES = ("gpt_oss",)  # rotary tables of half the rotated dims: one entry per pair (i, i + R/2)
COMPLEX_TABLES = ("deepseek_v2",)  # rotary as complex numbers cos + i·sin, one per rotated pair
HOST_READ_TABLES = ("phimoe",)  # whose rotary module reads max(position) on the host: tables made by rotary.py
#                                 (so does any with Hugging Face's dynamic NTK rope)
WINDOWED_ALWAYS = ("mistral", "mixtral", "phi3", "starcoder2", "ministral3")  # sliding_window in every layer (Qwen's: layer_types)
QUERY_SCALED = ("ministral3",)  # queries scaled by position past the original context (query_scale)
INTERLEAVED_ROTARY = ("glm4", "glm", "helium", "ernie4_5", "ernie4_5_moe", "cohere", "cohere2")  # dims (2i, 2i + 1), not (i, i + R/2)


def interleaved_rotary(config: Any) -> bool:
    """Whether the rotary turns neighbouring dims (2i, 2i + 1) together: GLM's and its kin's, DeepSeek
    V2's (complex numbers), V3's where rope_interleave (its rotation of the de-interleaved dims is the
    same, up to an order of dims that q and k share) and GLM-4.7-Flash's (V3's attention)."""
    if config.model_type in ("deepseek_v3", "glm4_moe_lite"):  # (GLM-4.7-Flash: V3's attention)
        return bool(getattr(config, "rope_interleave", True))
    return config.model_type in INTERLEAVED_ROTARY or config.model_type in COMPLEX_TABLES


def kv_dims(config: Any) -> tuple[int, int]:
    """(KV heads, head dim) of a layer's cache: DeepSeek's latent attention keeps each token's latent
    key, half of it in each of k and v (engine/mla.py)."""
    if mla.is_latent(config):
        return mla.cache_dims(config)
    return config.num_key_value_heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's rotary parameters (rope_parameters, or the older rope_scaling; {}: none)."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def attention_windows(config: Any) -> list[int]:
    """Each layer's sliding window (0: the whole context), as Hugging Face's attention reads the
    config: per layer from `layer_types` where the family has them (Qwen 2 / 3's use_sliding_window
    and max_window_layers), else `sliding_window` in every layer of the families that always apply
    it (Mistral, Mixtral, Phi 3)."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or 0
    if config.model_type == "smollm3" and not config.use_sliding_window:  # its layer types count only with the flag
        window = 0
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else 0 for t in types[:n]]
    return [window if config.model_type in WINDOWED_ALWAYS else 0] * n


def max_positions(config: Any) -> int | None:
    """The longest context a config is computed for here: max_position_embeddings, or for a yarn
    or linear rope scaling its factor times the original length; for LongRoPE (Phi 3.5, Phi 4 mini)
    and dynamic NTK the original length — past it Hugging Face changes every position's frequencies
    mid-sequence, which a cache of keys rotated with the earlier ones cannot follow."""
    n = getattr(config, "max_position_embeddings", None)
    rope = rope_parameters(config)
    kind = rope.get("rope_type", rope.get("type"))
    original = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", n)
    if kind in ("longrope", "dynamic"):
        return original
    if n is None or kind not in ("yarn", "linear"):
        return n
    return int(original * rope.get("factor", 1.0))


def query_scale(config: Any) -> tuple[float, int] | None:
    """(beta, length) where the family scales each query by 1 + beta · ln(1 + ⌊position / length⌋)
    (Llama 4's attention temperature, as Ministral 3 applies it: 1 below `length`), else None."""
    rope = rope_parameters(config)
    beta = rope.get("llama_4_scaling_beta")
    if not beta or config.model_type not in QUERY_SCALED:
        return None
    return float(beta), int(rope["original_max_position_embeddings"])
