"""Write a tiny HF Whisper folder as a CTranslate2 model folder the way CTranslate2's converter does, for the
CTranslate2 converter's round-trip tests. Its conventions, as read in OpenNMT/CTranslate2 (python/ctranslate2/
specs/model_spec.py, whisper_spec.py, transformer_spec.py, attention_spec.py, common_spec.py; converters/
transformers.py's WhisperLoader and BartLoader; converters/utils.py's fuse_linear), restated, not copied:

* variables: the spec's names; self-attention Q, K and V fused by rows into `linear_0` (K's missing bias as zeros),
  cross-attention Q alone in `linear_0` and K, V fused into `linear_1`; the settings the Whisper spec declares as
  rank-0 variables (head counts int16, booleans int8, the GELU activation 3);
* aliases: walking the variables in name order, a tensor equal to an earlier one (dtype, shape and values) becomes
  an alias of the first, before any quantization, so the tied output projection is an alias of the embeddings;
* quantization: weights that have a `_scale` in the spec (linear, convolution and embedding weights) as int8 with
  127 / amax per row (a convolution flattened to rows; an all-zero row gets scale 1), or int16 with 2**10 / amax
  over the whole tensor, values rounded to nearest; the other float tensors cast to the model type's float
  (float16 for `int8_float16`, float32 for `int8` and `int16`);
* files: model.bin (binary version 6), config.json (suppress_ids, suppress_ids_begin, lang_ids, alignment_heads,
  sorted keys), the vocabulary (tokens by id, then the timestamp tokens up to the model's vocabulary size) as
  vocabulary.json or, as older converters wrote it, vocabulary.txt, and the HF folder's tokenizer.json."""

from __future__ import annotations

import itertools
import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file

BINARY_VERSION = 6
DTYPE_IDS = {np.float32: 0, np.int8: 1, np.int16: 2, np.int32: 3, np.float16: 4, ml_dtypes.bfloat16: 5}
FLOAT_TYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int8": np.float32,
    "int8_float16": np.float16,
    "int16": np.float32,
}
NON_LANGUAGE_TOKENS = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)


def write_ct2_from_hf(hf_folder: Path, folder: Path, quantization: str = "float32", vocabulary: str = "json") -> Path:
    """`hf_folder` (a single-file safetensors Whisper checkpoint with tokenizer.json) as a CTranslate2 folder."""
    config = json.loads((hf_folder / "config.json").read_text())
    generation_file = hf_folder / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.exists() else {}
    state = load_file(hf_folder / "model.safetensors")
    variables = dict(sorted(ct2_variables(config, state).items()))
    aliases = _aliases(variables)
    folder.mkdir(parents=True, exist_ok=True)
    _serialize(folder / "model.bin", _quantized(variables, aliases, quantization), aliases)
    tokenizer = json.loads((hf_folder / "tokenizer.json").read_text())
    tokens = _vocabulary(tokenizer, config["vocab_size"])
    if vocabulary == "json":
        (folder / "vocabulary.json").write_text(json.dumps(tokens, indent=2))
    else:
        (folder / "vocabulary.txt").write_text("".join(f"{token}\n" for token in tokens), encoding="utf-8")
    ct2_config = _ct2_config(config, generation, tokenizer)
    (folder / "config.json").write_text(json.dumps(ct2_config, indent=2, sort_keys=True))
    shutil.copy(hf_folder / "tokenizer.json", folder / "tokenizer.json")
    return folder


def ct2_variables(config: dict, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The CTranslate2 variables of an HF Whisper state dict, unquantized and unaliased."""
    variables: dict[str, np.ndarray] = {
        "encoder/num_heads": np.int16(config["encoder_attention_heads"]),
        "decoder/num_heads": np.int16(config["decoder_attention_heads"]),
        "decoder/pre_norm": np.int8(1),
        "decoder/activation": np.int8(3),
        "decoder/alignment_layer": np.int16(-1),
        "decoder/alignment_heads": np.int16(1),
        "decoder/scale_embeddings": np.int8(0),
        "decoder/alibi": np.int8(0),
        "decoder/alibi_use_positive_positions": np.int8(0),
        "decoder/scale_alibi": np.int8(0),
        "decoder/start_from_zero_embedding": np.int8(0),
    }
    for stack in ("encoder", "decoder"):
        hf = f"model.{stack}"
        variables[f"{stack}/position_encodings/encodings"] = state[f"{hf}.embed_positions.weight"]
        _layer_norm(variables, f"{stack}/layer_norm", state, f"{hf}.layer_norm")
        for i in range(config[f"{stack}_layers"]):
            ct2, layer = f"{stack}/layer_{i}", f"{hf}.layers.{i}"
            _layer_norm(variables, f"{ct2}/self_attention/layer_norm", state, f"{layer}.self_attn_layer_norm")
            _fused(variables, f"{ct2}/self_attention/linear_0", state, [f"{layer}.self_attn.{p}_proj" for p in "qkv"])
            _linear(variables, f"{ct2}/self_attention/linear_1", state, f"{layer}.self_attn.out_proj")
            if stack == "decoder":
                _layer_norm(variables, f"{ct2}/attention/layer_norm", state, f"{layer}.encoder_attn_layer_norm")
                _linear(variables, f"{ct2}/attention/linear_0", state, f"{layer}.encoder_attn.q_proj")
                _fused(variables, f"{ct2}/attention/linear_1", state, [f"{layer}.encoder_attn.{p}_proj" for p in "kv"])
                _linear(variables, f"{ct2}/attention/linear_2", state, f"{layer}.encoder_attn.out_proj")
            _layer_norm(variables, f"{ct2}/ffn/layer_norm", state, f"{layer}.final_layer_norm")
            _linear(variables, f"{ct2}/ffn/linear_0", state, f"{layer}.fc1")
            _linear(variables, f"{ct2}/ffn/linear_1", state, f"{layer}.fc2")
    for conv in ("conv1", "conv2"):
        _linear(variables, f"encoder/{conv}", state, f"model.encoder.{conv}")
    embeddings = state["model.decoder.embed_tokens.weight"]
    variables["decoder/embeddings/weight"] = embeddings
    variables["decoder/projection/weight"] = state.get("proj_out.weight", embeddings)
    return variables


def _layer_norm(variables: dict, scope: str, state: dict, module: str) -> None:
    variables[f"{scope}/gamma"] = state[f"{module}.weight"]
    variables[f"{scope}/beta"] = state[f"{module}.bias"]


def _linear(variables: dict, scope: str, state: dict, module: str) -> None:
    variables[f"{scope}/weight"] = state[f"{module}.weight"]
    if f"{module}.bias" in state:
        variables[f"{scope}/bias"] = state[f"{module}.bias"]


def _fused(variables: dict, scope: str, state: dict, modules: list[str]) -> None:
    weights = [state[f"{module}.weight"] for module in modules]
    variables[f"{scope}/weight"] = np.concatenate(weights)
    biases = [
        state.get(f"{module}.bias", np.zeros(len(weight), np.float32)) for module, weight in zip(modules, weights)
    ]
    variables[f"{scope}/bias"] = np.concatenate(biases)


def _aliases(variables: dict[str, np.ndarray]) -> dict[str, str]:
    aliases: dict[str, str] = {}
    for i, (name, value) in enumerate(variables.items()):
        if value.ndim == 0:
            continue
        for other, other_value in itertools.islice(variables.items(), i):
            if (
                value.dtype == other_value.dtype
                and value.shape == other_value.shape
                and np.array_equal(value, other_value)
            ):
                aliases[name] = other
                break
    return aliases


def quantize(value: np.ndarray, quantization: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A quantizable weight as the model type stores it, and its scale (None for a float type)."""
    if quantization in ("int8", "int8_float16"):
        rows = value.reshape(value.shape[0], -1)
        amax = np.abs(rows).max(axis=1)
        amax[amax == 0] = 127.0
        scale = np.float32(127.0) / amax
        return np.rint(rows * scale[:, None]).astype(np.int8).reshape(value.shape), scale
    if quantization == "int16":
        scale = np.float32(2**10 / np.abs(value).max())
        limits = np.iinfo(np.int16)
        return np.clip(np.rint(value * scale), limits.min, limits.max).astype(np.int16), np.asarray(scale)
    return value.astype(FLOAT_TYPES[quantization]), None


def _quantized(variables: dict[str, np.ndarray], aliases: dict[str, str], quantization: str) -> dict[str, np.ndarray]:
    stored = {}
    for name, value in variables.items():
        if name in aliases:
            continue
        if value.ndim == 0:
            stored[name] = value
        elif name.endswith("/weight"):
            stored[name], scale = quantize(value, quantization)
            if scale is not None:
                stored[f"{name}_scale"] = scale
        else:
            stored[name] = value.astype(FLOAT_TYPES[quantization])
    return dict(sorted(stored.items()))


def _serialize(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    def string(text: str) -> bytes:
        return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"

    stored = {name: np.asarray(value) for name, value in variables.items()}
    parts = [struct.pack("<I", BINARY_VERSION), string("WhisperSpec"), struct.pack("<II", 3, len(stored))]
    for name, value in stored.items():
        parts += [string(name), struct.pack(f"<B{value.ndim}I", value.ndim, *value.shape)]
        parts += [struct.pack("<BI", DTYPE_IDS[value.dtype.type], value.nbytes), value.tobytes()]
    parts.append(struct.pack("<I", len(aliases)))
    parts += [string(alias) + string(target) for alias, target in sorted(aliases.items())]
    path.write_bytes(b"".join(parts))


def _vocabulary(tokenizer: dict, vocab_size: int) -> list[str]:
    by_id = {i: token for token, i in tokenizer["model"]["vocab"].items()}
    by_id |= {added["id"]: added["content"] for added in tokenizer["added_tokens"]}
    tokens = [by_id[i] for i in sorted(by_id)][:vocab_size]
    return tokens + ["<|%.2f|>" % (i * 0.02) for i in range(vocab_size - len(tokens))]


def _ct2_config(config: dict, generation: dict, tokenizer: dict) -> dict:
    """WhisperLoader.set_config: from the generation config where there is one; languages else from the tokenizer's
    special tokens; alignment heads else every head of the later half of the decoder layers."""
    layers, heads = config["decoder_layers"], config["decoder_attention_heads"]
    specials = [t for t in tokenizer["added_tokens"] if t["special"] and t["content"] not in NON_LANGUAGE_TOKENS]
    default_heads = [list(pair) for pair in itertools.product(range(layers // 2, layers), range(heads))]
    return {
        "suppress_ids": generation.get("suppress_tokens", config["suppress_tokens"]),
        "suppress_ids_begin": generation.get("begin_suppress_tokens", config["begin_suppress_tokens"]),
        "lang_ids": sorted(generation.get("lang_to_id", {t["content"]: t["id"] for t in specials}).values()),
        "alignment_heads": generation.get("alignment_heads", default_heads),
    }
