"""Turn a GGUF file (llama.cpp's format) into a Hugging Face model folder, once, and cache it.

Why convert instead of loading GGUF directly: everything else in jaxserve reads HF folders (config.json,
safetensors, tokenizer files), so one conversion step lets a GGUF reuse that whole path unchanged.
Why not `transformers`' own GGUF loading: it dequantizes with torch, and torch is not a jaxserve run-time
dependency. Here tensors are dequantized with `gguf`'s numpy code and the tokenizer is rebuilt with the
torch-free parts of `transformers.integrations.gguf.gguf_tokenizer_mapping`.

Families: `llama` (Llama; Mistral, told by the file's name; Mixtral, told by its experts), `qwen2`, `qwen3`,
`qwen2moe`, `qwen3moe`, `gemma`, `gemma2`, `gemma3` (its text model) and `phi3`. Tensors are stored as float32
(the model casts them on load) under HF names, with what llama.cpp's `convert_hf_to_gguf.py` did to them undone:
the Q/K rows it permutes for its interleaved RoPE (`llama`) put back into HF's rotate-half order, Gemma's norm
weights stored as 1 + w back to w, experts stacked per layer split into HF's per-expert tensors. What it baked
into tensors goes back into config.json: Llama 3.1's llama3 RoPE scaling (`rope_freqs`, see `llama3_rope_scaling`)
and Phi-3's longrope factors (`rope_factors_long` / `_short`); linear and yarn scaling come from the
`rope.scaling.*` metadata.
Values llama.cpp derives rather than stores are derived as llama.cpp does (Gemma 2's and 3's attention scale and
sliding layers, Gemma 2's soft-caps, Gemma 3's local RoPE; the MoE routing renormalisation of each family).

The folder is converted once into the cache (`conversion_cache.py`: keyed by the file's path, size and
mtime, written aside and renamed into place).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

from .conversion_cache import converted_folder, source_key

logger = logging.getLogger(__name__)

# Bump when the output of a conversion changes, so folders written by older code are not reused.
CONVERTER_VERSION = 1

# Family (a GGUF architecture, or what a `llama` file turns out to be) → (HF architecture class, HF model_type).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "mixtral": ("MixtralForCausalLM", "mixtral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "gemma": ("GemmaForCausalLM", "gemma"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
}
_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma", "gemma2", "gemma3", "phi3")
_PERMUTED = ("llama", "mistral", "mixtral")  # llama.cpp permuted their Q/K rows for its interleaved RoPE
_NORM_PLUS_ONE = ("gemma", "gemma2", "gemma3")  # llama.cpp stores their norm weights w as 1 + w (Q/K norms too)

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Read into config.json, not written as tensors: llama3 RoPE factors (Llama 3.1+), longrope factors (Phi-3).
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_GEMMA_SANDWICH_NORMS = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_FAMILY_LAYER_TENSORS = {
    "gemma2": _GEMMA_SANDWICH_NORMS,
    "gemma3": _GEMMA_SANDWICH_NORMS,
    "phi3": {"ffn_up": "mlp.gate_up_proj"},  # gate rows, then up rows, as Phi-3 packs them
    "mixtral": {"ffn_gate_inp": "block_sparse_moe.gate"},
}
# Experts stacked per layer ([experts, out, in]) → each expert's HF tensor, as `save_pretrained` writes them.
_EXPERT_TENSORS = {
    "mixtral": {
        "ffn_gate_exps": "block_sparse_moe.experts.{}.w1",
        "ffn_up_exps": "block_sparse_moe.experts.{}.w3",
        "ffn_down_exps": "block_sparse_moe.experts.{}.w2",
    },
    **{
        family: {
            "ffn_gate_exps": "mlp.experts.{}.gate_proj",
            "ffn_up_exps": "mlp.experts.{}.up_proj",
            "ffn_down_exps": "mlp.experts.{}.down_proj",
        }
        for family in ("qwen2moe", "qwen3moe")
    },
}

_LAYER_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Llama 3.1 / 3.2 / 3.3's llama3 RoPE scaling: factor 8 (32 for 3.2 1B and 3B, read from the tensor), these three
# fixed.
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0
LLAMA3_ORIGINAL_CONTEXT = 8192
# How closely inferred llama3 divisors must match a file's: float32 precision, as the float32 base frequencies carry
# it through (torch's and numpy's float32 powers differ by an ulp, which moves a blended divisor by up to 1.3e-6).
_LLAMA3_RTOL = 1e-5

_SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def convert_gguf(gguf_path: Path, cache_root: Path) -> Path:
    """The HF folder converted from `gguf_path`, under `cache_root/gguf/`; converts only on the first call."""
    gguf_path = Path(gguf_path)
    target = Path(cache_root) / "gguf" / f"{gguf_path.stem}-{source_key([gguf_path], CONVERTER_VERSION)}"
    return converted_folder(target, lambda folder: _write_folder(gguf_path, folder), gguf_path.name)


def _write_folder(gguf_path: Path, folder: Path) -> None:
    reader = GGUFReader(gguf_path)
    metadata = _read_metadata(reader)
    tensor_names = {tensor.name for tensor in reader.tensors}
    rope_tensors = {tensor.name: _dequantized(tensor) for tensor in reader.tensors if tensor.name in _ROPE_TENSORS}
    family = _family(metadata, tensor_names)
    config = hf_config(metadata, tensor_names, rope_tensors)
    tokenizer = build_tokenizer(metadata)  # before the tensors, so an unsupported file fails fast
    tensors = _convert_tensors(reader, family, config, desc=f"Converting {gguf_path.name}")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "config.json", config)
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id") if config[key] is not None}
    _write_json(folder / "generation_config.json", generation)
    tokenizer.save_pretrained(folder)


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata value as a Python value. Float32 scalars keep their shortest spelling (1e-05, not
    9.999999747378752e-06), as HF configs write them."""
    metadata = {}
    for key, field in reader.fields.items():
        value = field.contents()
        if field.types == [GGUFValueType.FLOAT32]:
            value = _short_float(value)
        metadata[key] = value
    return metadata


def _short_float(value: float) -> float:
    """A float32 value as the shortest decimal that is that float32 (8.0, 1.05), as HF configs spell them."""
    return float(str(np.float32(value)))


def _dequantized(tensor) -> np.ndarray:
    numpy_shape = tuple(int(dim) for dim in reversed(tensor.shape))  # GGUF lists the fastest dim first
    return dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False).reshape(numpy_shape)


def _family(metadata: dict[str, Any], tensor_names: set[str]) -> str:
    """The key of `_ARCHITECTURES` this file is. Mistral and Mixtral are stored as `llama`: a Mixtral has experts,
    a Mistral's name tells."""
    arch = metadata.get("general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: llama, mistral, mixtral, qwen2, qwen3, "
            "qwen2moe, qwen3moe, gemma, gemma2, gemma3, phi3). Serve the model's Hugging Face folder instead."
        )
    if arch == "llama":
        if metadata.get("llama.expert_count") or "blk.0.ffn_gate_inp.weight" in tensor_names:
            return "mixtral"
        if "mistral" in str(metadata.get("general.name", "")).lower():
            return "mistral"
    return arch


def hf_config(
    metadata: dict[str, Any], tensor_names: set[str], rope_tensors: dict[str, np.ndarray] | None = None
) -> dict[str, Any]:
    """An HF `config.json` for the model a GGUF file's metadata describes; `rope_tensors` holds the file's
    `_ROPE_TENSORS`, whose values are RoPE scaling parameters."""
    family = _family(metadata, tensor_names)
    prefix = metadata["general.architecture"]
    architecture, model_type = _ARCHITECTURES[family]
    hidden = metadata[f"{prefix}.embedding_length"]
    heads = metadata[f"{prefix}.attention.head_count"]
    head_dim = metadata.get(f"{prefix}.attention.key_length", hidden // heads)
    rotary_dim = metadata.get(f"{prefix}.rope.dimension_count", head_dim)
    rope_theta = metadata.get(f"{prefix}.rope.freq_base", 10000.0)
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": metadata.get(f"{prefix}.vocab_size", len(metadata["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": metadata[f"{prefix}.feed_forward_length"],
        "num_hidden_layers": metadata[f"{prefix}.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": metadata.get(f"{prefix}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": metadata[f"{prefix}.attention.layer_norm_rms_epsilon"],
        "max_position_embeddings": metadata[f"{prefix}.context_length"],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta,
            **rope_scaling(metadata, prefix, rope_tensors or {}, rope_theta, rotary_dim),
        },
        "rope_theta": rope_theta,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if rotary_dim != head_dim:
        config["partial_rotary_factor"] = rotary_dim / head_dim
    if "original_max_position_embeddings" in config["rope_parameters"] and family == "phi3":
        # Phi-3 keeps it at the top level
        config["original_max_position_embeddings"] = config["rope_parameters"]["original_max_position_embeddings"]
    config.update(_family_config(family, metadata, prefix, tensor_names, config))
    return config


def _family_config(
    family: str, metadata: dict[str, Any], prefix: str, tensor_names: set[str], config: dict[str, Any]
) -> dict[str, Any]:
    """What a family's HF config adds, from the metadata llama.cpp writes for it, or set as llama.cpp runs it."""

    def key(name: str, default: Any = None) -> Any:
        return metadata.get(f"{prefix}.{name}", default)

    layers = config["num_hidden_layers"]
    if family == "mistral":
        return {"sliding_window": None}  # llama.cpp runs a `llama` file with full attention
    if family in ("gemma", "gemma2", "gemma3"):
        extra = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}
        if family == "gemma":
            return extra
        # llama.cpp's attention scale (HF's query_pre_attn_scalar; the file does not store it): hidden / heads for
        # the 27B models (Gemma 2's 46 layers, Gemma 3's 62), head_dim otherwise
        largest = layers == (46 if family == "gemma2" else 62)
        extra["query_pre_attn_scalar"] = (
            config["hidden_size"] // config["num_attention_heads"] if largest else config["head_dim"]
        )
        if family == "gemma2":
            return extra | {  # llama.cpp's defaults where a key is absent
                "sliding_window": key("attention.sliding_window", 4096),
                "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                "attn_logit_softcapping": key("attn_logit_softcapping", 50.0),
                "final_logit_softcapping": key("final_logit_softcapping", 30.0),
            }
        # Gemma 3 as llama.cpp runs it: every 6th layer global, the others sliding (none without a window); the
        # sliding layers' RoPE unscaled at base 10000 (or the file's rope.freq_base_swa); no attention soft-cap
        window = key("attention.sliding_window") or None
        return extra | {
            "sliding_window": window,
            "layer_types": ["sliding_attention" if window and i % 6 < 5 else "full_attention" for i in range(layers)],
            "rope_parameters": {
                "full_attention": config["rope_parameters"],
                "sliding_attention": {"rope_type": "default", "rope_theta": key("rope.freq_base_swa", 10000.0)},
            },
            "attn_logit_softcapping": None,
            "final_logit_softcapping": key("final_logit_softcapping"),
        }
    if family == "phi3":
        return {"sliding_window": key("attention.sliding_window") or None}  # 0: none (Phi-4-mini)
    if family not in ("mixtral", "qwen2moe", "qwen3moe"):
        return {}
    experts, used = key("expert_count"), key("expert_used_count")
    if not experts or not used:
        raise ValueError(f"This {family} GGUF has experts but no {prefix}.expert_count / expert_used_count.")
    if family == "mixtral":
        return {"num_local_experts": experts, "num_experts_per_tok": used, "sliding_window": None}
    # llama.cpp renormalises the top-k routing weights for qwen3moe, never for qwen2moe; a layer without a router
    # is a dense one (HF's mlp_only_layers)
    extra = {
        "num_experts": experts,
        "num_experts_per_tok": used,
        "moe_intermediate_size": key("expert_feed_forward_length", config["intermediate_size"] // used),
        "norm_topk_prob": family == "qwen3moe",
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names],
        "use_sliding_window": False,
    }
    if family == "qwen2moe":
        has_shared = "blk.0.ffn_up_shexp.weight" in tensor_names
        shared = key("expert_shared_feed_forward_length", config["intermediate_size"]) if has_shared else 0
        extra |= {"shared_expert_intermediate_size": shared, "qkv_bias": config["attention_bias"]}
        extra["attention_bias"] = False  # Qwen2-MoE has q/k/v biases (qkv_bias) and no output bias
    return extra


def rope_scaling(
    metadata: dict[str, Any], prefix: str, rope_tensors: dict[str, np.ndarray], theta: float, rotary_dim: int
) -> dict[str, Any]:
    """HF `rope_parameters` keys (besides `rope_theta`) for the RoPE scaling a GGUF file describes: none; llama3
    from a `rope_freqs` tensor; longrope from `rope_factors_long` / `_short`; linear or yarn from the
    `rope.scaling.*` metadata, mapped back as llama.cpp's convert_hf_to_gguf.py wrote it."""

    def key(name: str, default: Any = None) -> Any:
        return metadata.get(f"{prefix}.rope.{name}", default)

    kind = key("scaling.type", "none")
    if kind == "none" and key("scale_linear", 1.0) != 1.0:  # older files' spelling of linear scaling
        kind = "linear"
    original = key("scaling.original_context_length")
    if "rope_freqs.weight" in rope_tensors:
        if kind != "none":
            raise ValueError(
                f"This GGUF has both a `rope_freqs` tensor and {kind!r} RoPE scaling metadata, which no Hugging Face "
                "config expresses. Serve the model's Hugging Face folder instead."
            )
        return llama3_rope_scaling(rope_tensors["rope_freqs.weight"], theta, rotary_dim, original)
    if "rope_factors_long.weight" in rope_tensors or "rope_factors_short.weight" in rope_tensors:
        return _longrope_scaling(metadata, prefix, rope_tensors, original, rotary_dim)
    if kind == "none":
        return {}
    if kind == "linear":
        factor = key("scaling.factor", key("scale_linear"))
        return {"rope_type": "linear", "factor": factor} if factor not in (None, 1.0) else {}
    if kind == "yarn":
        unsupported = {
            "scaling.yarn_ext_factor": key("scaling.yarn_ext_factor", 1.0) not in (1.0, -1.0),  # -1: llama.cpp's 1
            "scaling.yarn_log_multiplier": key("scaling.yarn_log_multiplier", 0.0) != 0.0,  # DeepSeek's mscale
        }
        if any(unsupported.values()) or key("scaling.factor") is None or original is None:
            raise ValueError(
                "This GGUF's yarn RoPE scaling ("
                + ", ".join(name for name, bad in unsupported.items() if bad)
                + ") has no Hugging Face yarn equivalent here, or lacks its factor / original context length. "
                "Serve the model's Hugging Face folder instead."
            )
        params = {"rope_type": "yarn", "factor": key("scaling.factor"), "original_max_position_embeddings": original}
        optional = {
            "beta_fast": "yarn_beta_fast",
            "beta_slow": "yarn_beta_slow",
            "attention_factor": "yarn_attn_factor",
        }
        return params | {
            hf: key(f"scaling.{gguf}") for hf, gguf in optional.items() if key(f"scaling.{gguf}") is not None
        }
    raise ValueError(
        f"This GGUF uses {kind!r} RoPE scaling, which the GGUF converter does not support. "
        "Serve the model's Hugging Face folder instead."
    )


def _longrope_scaling(
    metadata: dict[str, Any], prefix: str, rope_tensors: dict[str, np.ndarray], original: int | None, rotary_dim: int
) -> dict[str, Any]:
    """Phi-3's longrope: the per-frequency factors llama.cpp stores as tensors, the original context length, and
    the attention factor where it is not HF's default sqrt(1 + ln(scale) / ln(original))."""
    long, short = rope_tensors.get("rope_factors_long.weight"), rope_tensors.get("rope_factors_short.weight")
    sizes = {factors.size for factors in (long, short) if factors is not None}
    if long is None or short is None or original is None or sizes != {rotary_dim // 2}:
        raise ValueError(
            "This GGUF's longrope factors are not both `rope_factors_long` and `rope_factors_short` with one value per "
            "rotary frequency, or it lacks rope.scaling.original_context_length. Serve the model's Hugging Face "
            "folder instead."
        )
    params = {
        "rope_type": "longrope",
        "short_factor": [_short_float(f) for f in short.ravel()],
        "long_factor": [_short_float(f) for f in long.ravel()],
        "original_max_position_embeddings": original,
    }
    scale = metadata[f"{prefix}.context_length"] / original
    default = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    attention = metadata.get(f"{prefix}.rope.scaling.attn_factor")
    if attention is not None and not math.isclose(attention, default, rel_tol=1e-6):
        params["attention_factor"] = attention
    return params


def llama3_factors(
    theta: float, rotary_dim: int, factor: float, low_freq_factor: float, high_freq_factor: float, original: int
) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp's convert_hf_to_gguf.py writes for HF's llama3 RoPE scaling: what each
    frequency is divided by (1 for wavelengths under original / high_freq_factor, `factor` over
    original / low_freq_factor, 1 / ((1 - s) / factor + s) between, s rising linearly in original / wavelength).
    Computed as it does: base frequencies in float32, the rest in float64, stored as float32."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    freqs = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float64)
    wavelength = 2 * math.pi / freqs
    smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = 1 / ((1 - smooth) / factor + smooth)
    long = np.where(wavelength > original / low_freq_factor, factor, blended)
    return np.where(wavelength < original / high_freq_factor, 1.0, long).astype(np.float32)


def llama3_rope_scaling(stored: np.ndarray, theta: float, rotary_dim: int, original: int | None) -> dict[str, Any]:
    """HF's llama3 `rope_parameters` that reproduce a file's `rope_freqs` tensor to float32 precision. The file
    keeps only the per-frequency divisors, so the parameters are inferred: `factor` is the largest divisor;
    low_freq_factor and high_freq_factor are Llama 3.1-3.3's 1 and 4; the original context length is the file's
    rope.scaling.original_context_length, Llama 3's 8192, or the one the blended frequencies imply. Divisors all
    1 are no scaling. Raises when no candidate reproduces the tensor (to `_LLAMA3_RTOL`)."""
    stored = np.asarray(stored, np.float32).ravel()
    if stored.shape != (rotary_dim // 2,):
        raise ValueError(
            f"This GGUF's `rope_freqs` tensor has {stored.size} values, not one per rotary frequency "
            f"({rotary_dim // 2}). Serve the model's Hugging Face folder instead."
        )
    if np.all(stored == 1.0):
        return {}
    factor = _short_float(stored.max())
    low, high = LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR
    candidates = [original, LLAMA3_ORIGINAL_CONTEXT]
    if factor > 1.0:  # from each blended frequency's divisor d: s = (1/d - 1/factor) / (1 - 1/factor)
        exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
        wavelength = 2 * math.pi * np.float32(theta) ** exponents.astype(np.float64)
        blended = (stored > 1.0) & (stored < np.float32(factor))
        smooth = (1 / stored[blended] - 1 / factor) / (1 - 1 / factor)
        candidates += [round(float(w)) for w in wavelength[blended] * (smooth * (high - low) + low)]
    for candidate in dict.fromkeys(c for c in candidates if c):
        expected = llama3_factors(theta, rotary_dim, factor, low, high, int(candidate))
        if np.allclose(expected, stored, rtol=_LLAMA3_RTOL, atol=0):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": int(candidate),
            }
    raise ValueError(
        f"This GGUF's `rope_freqs` tensor (RoPE frequency divisors, up to {factor}) matches no llama3 RoPE scaling "
        f"with factor {factor}, low_freq_factor {low}, high_freq_factor {high} and any original context length "
        f"tried ({', '.join(str(c) for c in dict.fromkeys(c for c in candidates if c))}). "
        "Serve the model's Hugging Face folder instead."
    )


def _convert_tensors(reader: GGUFReader, family: str, config: dict[str, Any], desc: str) -> dict[str, np.ndarray]:
    tensors = {}
    for tensor in tqdm(reader.tensors, desc=desc, unit="tensor"):
        if tensor.name in _ROPE_TENSORS:
            continue
        for name, value in hf_tensors(family, tensor.name, _dequantized(tensor), config):
            tensors[name] = np.ascontiguousarray(_fit_shape(name, value, config))
    return tensors


def hf_tensors(
    family: str, gguf_name: str, value: np.ndarray, config: dict[str, Any]
) -> Iterator[tuple[str, np.ndarray]]:
    """The HF tensors of a GGUF tensor: `blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight` (rows
    un-permuted for the `llama` families), a Gemma norm less 1, stacked experts split one per expert."""
    base, _, kind = gguf_name.rpartition(".")
    match = _LAYER_TENSOR_NAME.fullmatch(gguf_name)
    if base in _GLOBAL_TENSORS and kind == "weight":
        name = f"{_GLOBAL_TENSORS[base]}.weight"
    elif match is not None and match[2] in _EXPERT_TENSORS.get(family, {}):
        pattern = _EXPERT_TENSORS[family][match[2]]
        for expert, expert_value in enumerate(value):
            yield f"model.layers.{match[1]}.{pattern.format(expert)}.{match[3]}", expert_value
        return
    else:
        modules = _LAYER_TENSORS | _FAMILY_LAYER_TENSORS.get(family, {})
        if match is None or match[2] not in modules:
            raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart this converter knows.")
        name = f"model.layers.{match[1]}.{modules[match[2]]}.{match[3]}"
    module = name.split(".")[-2]
    if family in _PERMUTED and module in ("q_proj", "k_proj"):
        heads = config["num_attention_heads"] if module == "q_proj" else config["num_key_value_heads"]
        value = unpermute_rope_rows(value, heads)
    if family in _NORM_PLUS_ONE and name.endswith("norm.weight"):
        value = value - np.float32(1.0)
    yield name, value


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of Q/K (interleaved RoPE pairs → HF's rotate-half halves).

    llama.cpp applies `w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape)`.
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _fit_shape(name: str, value: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """`value` in the shape the config implies for `name`; dimensions of 1 may differ (Qwen2-MoE's shared expert
    gate is [1, hidden] in HF and may be a vector in the file)."""
    expected = _expected_shape(name, config)
    if value.shape != expected and [d for d in value.shape if d != 1] == [d for d in expected if d != 1]:
        value = value.reshape(expected)
    if value.shape != expected:
        raise ValueError(f"Converted tensor {name} has shape {value.shape}, but the config implies {expected}.")
    return value


def _expected_shape(name: str, config: dict[str, Any]) -> tuple[int, ...]:
    hidden, vocab, head_dim = config["hidden_size"], config["vocab_size"], config["head_dim"]
    q_rows = config["num_attention_heads"] * head_dim
    kv_rows = config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    if ".experts." in name:
        inter = config.get("moe_intermediate_size", inter)  # Mixtral's experts are intermediate_size wide
    elif ".shared_expert." in name:
        inter = config["shared_expert_intermediate_size"]
    shapes = {
        "embed_tokens": (vocab, hidden),
        "lm_head": (vocab, hidden),
        "q_proj": (q_rows, hidden),
        "k_proj": (kv_rows, hidden),
        "v_proj": (kv_rows, hidden),
        "qkv_proj": (q_rows + 2 * kv_rows, hidden),
        "o_proj": (hidden, q_rows),
        "q_norm": (head_dim,),
        "k_norm": (head_dim,),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "gate_up_proj": (2 * inter, hidden),
        "down_proj": (hidden, inter),
        "w1": (inter, hidden),
        "w3": (inter, hidden),
        "w2": (hidden, inter),
        "gate": (config.get("num_local_experts") or config.get("num_experts", 0), hidden),
        "shared_expert_gate": (1, hidden),
    }
    module, kind = name.split(".")[-2:]
    shape = (hidden,) if module == "norm" or module.endswith("layernorm") else shapes[module]
    return shape if kind == "weight" else shape[:1]


def build_tokenizer(metadata: dict[str, Any]) -> PreTrainedTokenizerFast:
    """The tokenizer a GGUF file's metadata describes, built the way transformers' `get_gguf_tokenizer` +
    `convert_gguf_tokenizer` build it, minus the torch-importing GGUF reader."""
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tokenizer_dict:
        raise ValueError("This GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens).")
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(key)
        tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None

    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
