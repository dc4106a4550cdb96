"""Turn a GGUF file (llama.cpp's format) into a Hugging Face model folder, once, and cache it.

Why convert instead of loading GGUF directly: everything else in jaxserve reads HF folders (config.json,
safetensors, tokenizer files), so one conversion step lets a GGUF reuse that whole path unchanged.
Why not `transformers`' own GGUF loading: it dequantizes with torch, and torch is not a jaxserve run-time
dependency. Here tensors are dequantized with `gguf`'s numpy code and the tokenizer is rebuilt with the
torch-free parts of `transformers.integrations.gguf.gguf_tokenizer_mapping`.

Tensors are stored as float32 (the model casts them on load), renamed to HF names, and for the `llama`
architecture the Q/K rows that llama.cpp permutes for its interleaved RoPE are put back into HF's
rotate-half order. The folder is keyed by the file's path, size and mtime, written to a temporary sibling
and renamed into place with a stamp inside, so a later run finds it complete and skips the work, and an
interrupted run never leaves a half-written folder behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

logger = logging.getLogger(__name__)

# Bump when the output of a conversion changes, so folders written by older code are not reused.
CONVERTER_VERSION = 1
STAMP_FILE = ".complete"

# GGUF architecture → (HF architecture class, HF model_type, whether llama.cpp permuted Q/K rows).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "mistral": ("MistralForCausalLM", "mistral", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_LAYER_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

_SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def convert_gguf(gguf_path: Path, cache_root: Path) -> Path:
    """The HF folder converted from `gguf_path`, under `cache_root/gguf/`; converts only on the first call."""
    gguf_path = Path(gguf_path)
    target = Path(cache_root) / "gguf" / f"{gguf_path.stem}-{_cache_key(gguf_path)}"
    if (target / STAMP_FILE).exists():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Converting %s to a Hugging Face folder (once; later runs reuse it).", gguf_path.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache is as readable as any HF folder
    try:
        _write_folder(gguf_path, staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Wrote the conversion of %s to %s.", gguf_path.name, target)
    return target


def _cache_key(gguf_path: Path) -> str:
    stat = gguf_path.stat()
    identity = f"{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{CONVERTER_VERSION}"
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def _publish(staging: Path, target: Path) -> None:
    """Move a finished folder into place, unless a concurrent conversion got there first."""
    if target.exists() and not (target / STAMP_FILE).exists():
        shutil.rmtree(target)  # not written by this module's atomic rename; cannot be trusted
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / STAMP_FILE).exists():
            raise


def _write_folder(gguf_path: Path, folder: Path) -> None:
    reader = GGUFReader(gguf_path)
    metadata = _read_metadata(reader)
    tensor_names = {tensor.name for tensor in reader.tensors}
    config = hf_config(metadata, tensor_names)
    tokenizer = build_tokenizer(metadata)  # before the tensors, so an unsupported file fails fast
    tensors = _convert_tensors(reader, config, desc=f"Converting {gguf_path.name}")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "config.json", config)
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id") if config[key] is not None}
    _write_json(folder / "generation_config.json", generation)
    tokenizer.save_pretrained(folder)
    (folder / STAMP_FILE).write_text(gguf_path.name + "\n")


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata value as a Python value. Float32 scalars keep their shortest spelling (1e-05, not
    9.999999747378752e-06), as HF configs write them."""
    metadata = {}
    for key, field in reader.fields.items():
        value = field.contents()
        if field.types == [GGUFValueType.FLOAT32]:
            value = float(str(np.float32(value)))
        metadata[key] = value
    return metadata


def _architecture(metadata: dict[str, Any]) -> str:
    """The key of `_ARCHITECTURES` this file is; Mistral is stored as `llama` with the name telling."""
    arch = metadata.get("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: llama, mistral, qwen2, qwen3). "
            "Serve the model's Hugging Face folder instead."
        )
    if arch == "llama" and "mistral" in str(metadata.get("general.name", "")).lower():
        return "mistral"
    return arch


def hf_config(metadata: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """An HF `config.json` for the model a GGUF file's metadata describes."""
    arch = _architecture(metadata)
    prefix = metadata["general.architecture"]
    _reject_rope_scaling(metadata, tensor_names, prefix)
    architecture, model_type, _ = _ARCHITECTURES[arch]
    hidden = metadata[f"{prefix}.embedding_length"]
    heads = metadata[f"{prefix}.attention.head_count"]
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
        "head_dim": metadata.get(f"{prefix}.attention.key_length", hidden // heads),
        "hidden_act": "silu",
        "rms_norm_eps": metadata[f"{prefix}.attention.layer_norm_rms_epsilon"],
        "max_position_embeddings": metadata[f"{prefix}.context_length"],
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rope_theta": rope_theta,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if arch == "mistral":
        config["sliding_window"] = None  # llama.cpp runs a `llama` file with full attention
    return config


def _reject_rope_scaling(metadata: dict[str, Any], tensor_names: set[str], prefix: str) -> None:
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            "This GGUF bakes RoPE scaling into a `rope_freqs` tensor (Llama 3.1 and later), which the GGUF "
            "converter does not support yet. Serve the model's Hugging Face folder instead."
        )
    scaling = metadata.get(f"{prefix}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(
            f"This GGUF uses {scaling!r} RoPE scaling, which the GGUF converter does not support yet. "
            "Serve the model's Hugging Face folder instead."
        )


def _convert_tensors(reader: GGUFReader, config: dict[str, Any], desc: str) -> dict[str, np.ndarray]:
    permuted = _ARCHITECTURES[config["model_type"]][2]
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    tensors = {}
    for tensor in tqdm(reader.tensors, desc=desc, unit="tensor"):
        name = hf_tensor_name(tensor.name)
        numpy_shape = tuple(int(dim) for dim in reversed(tensor.shape))  # GGUF lists the fastest dim first
        value = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False).reshape(numpy_shape)
        module = name.split(".")[-2]
        if permuted and module in heads:
            value = unpermute_rope_rows(value, heads[module])
        _check_shape(name, value.shape, config)
        tensors[name] = np.ascontiguousarray(value)
    return tensors


def hf_tensor_name(gguf_name: str) -> str:
    """The HF name of a GGUF tensor: `blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS and kind == "weight":
        return f"{_GLOBAL_TENSORS[base]}.weight"
    match = _LAYER_TENSOR_NAME.fullmatch(gguf_name)
    if match is None or match[2] not in _LAYER_TENSORS:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart this converter knows.")
    return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.{match[3]}"


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of Q/K (interleaved RoPE pairs → HF's rotate-half halves).

    llama.cpp applies `w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape)`.
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_shape(name: str, shape: tuple[int, ...], config: dict[str, Any]) -> None:
    expected = _expected_shape(name, config)
    if shape != expected:
        raise ValueError(f"Converted tensor {name} has shape {shape}, but the config implies {expected}.")


def _expected_shape(name: str, config: dict[str, Any]) -> tuple[int, ...]:
    hidden, vocab, head_dim = config["hidden_size"], config["vocab_size"], config["head_dim"]
    q_rows = config["num_attention_heads"] * head_dim
    kv_rows = config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    shapes = {
        "embed_tokens": (vocab, hidden),
        "lm_head": (vocab, hidden),
        "norm": (hidden,),
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
        "q_proj": (q_rows, hidden),
        "k_proj": (kv_rows, hidden),
        "v_proj": (kv_rows, hidden),
        "o_proj": (hidden, q_rows),
        "q_norm": (head_dim,),
        "k_norm": (head_dim,),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    module, kind = name.split(".")[-2:]
    return shapes[module] if kind == "weight" else shapes[module][:1]


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
