"""Write a tiny HF decoder folder as a GGUF file the way llama.cpp's convert_hf_to_gguf.py does, for the GGUF
converter's round-trip tests. Its conventions, as read in ggml-org/llama.cpp (conversion/llama.py, gemma.py,
phi.py, qwen.py, base.py), restated, not copied:

* metadata: block count, context / embedding / feed-forward lengths, head counts, key length (when the config has a
  `head_dim`), RMS epsilon, RoPE base and dimension count; linear and yarn RoPE scaling as `rope.scaling.*` keys;
  expert counts and widths for the MoE families; Gemma 2's soft-caps and sliding window (no RoPE base, no query
  scale); Gemma 3's sliding window, final soft-cap (when it has one) and RoPE per layer type: the global layers'
  base and scaling as any family's, the sliding layers' base as `rope.freq_base_swa` (no layer pattern, no query
  scale); Phi-3's original context length, rotary dimensions int(partial_rotary_factor * hidden) // heads, sliding
  window (0 for none) and longrope attention factor;
* tensors: names from gguf's own HF → GGUF table; Q/K rows (and biases) of `llama` files permuted for llama.cpp's
  interleaved RoPE (K with the KV head count); Gemma's norm weights (Gemma 3's Q/K norms too) stored as 1 + w and
  its lm_head dropped; experts stacked per layer ([experts, out, in]); llama3 RoPE scaling as a `rope_freqs` tensor
  of per-frequency divisors; Phi-3's longrope factors as `rope_factors_long` / `rope_factors_short`;
* tokenizer: the byte-level BPE vocabulary padded to vocab_size with `[PAD<i>]` tokens, special tokens CONTROL.

Matrices are stored as `qtype` (F32 by default) when their rows split into whole blocks; vectors stay F32."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize
from safetensors.numpy import load_file

F32 = gguf.GGMLQuantizationType.F32

GEMMA = ("gemma", "gemma2", "gemma3")
GGUF_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}
# stacked experts: the per-expert HF tensor of each projection, and the stacked name gguf's table maps
EXPERTS = {
    "llama": (
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.{projection}",
        "layers.{layer}.feed_forward.experts.{projection}",
    ),
    "qwen": ("model.layers.{layer}.mlp.experts.{expert}.{projection}", "model.layers.{layer}.mlp.experts.{projection}"),
}


def stored_type(value: np.ndarray, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if value.ndim >= 2 and value.shape[-1] % block == 0 else F32


def write_gguf_from_hf(folder: Path, path: Path, qtype: gguf.GGMLQuantizationType = F32) -> Path:
    """`folder` (a single-file safetensors checkpoint) as a GGUF at `path`."""
    config = json.loads((folder / "config.json").read_text())
    arch = GGUF_ARCH[config["architectures"][0]]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(folder.name)
    _write_metadata(writer, arch, config)
    _write_tokenizer(writer, folder, config)
    names = gguf.get_tensor_name_map(_arch_enum(arch), config["num_hidden_layers"])
    for name, value in _gguf_tensors(arch, config, load_file(folder / "model.safetensors"), names):
        stored = stored_type(value, qtype)
        writer.add_tensor(name, value if stored == F32 else quantize(value, stored), raw_dtype=stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _arch_enum(arch: str) -> gguf.MODEL_ARCH:
    return {name: enum for enum, name in gguf.MODEL_ARCH_NAMES.items()}[arch]


def rope_params(config: dict) -> dict:
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _write_metadata(writer: gguf.GGUFWriter, arch: str, config: dict) -> None:
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = rope_params(config)
    local = rope.get("sliding_attention")  # Gemma 3's parameters per layer type
    rope = rope.get("full_attention", rope)
    if arch == "phi3":
        rotary = int(config.get("partial_rotary_factor", 1.0) * hidden) // heads
        original = config["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_dimension_count(rotary)
        writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
        writer.add_sliding_window(config.get("sliding_window") or 0)
        if rope.get("rope_type") == "longrope":
            scale = config["max_position_embeddings"] / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        return
    if config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch in ("gemma", "gemma2"):
        if arch == "gemma2":
            writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
            writer.add_sliding_window(config["sliding_window"])
        return
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
        writer.add_rope_freq_base_swa(local["rope_theta"])
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if rope.get("beta_fast") is not None:
            writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        if rope.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
    if config.get("moe_intermediate_size"):
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])


def _write_tokenizer(writer: gguf.GGUFWriter, folder: Path, config: dict) -> None:
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"] | {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    special = {t["content"] for t in tokenizer["added_tokens"] if t["special"]}
    by_id = {i: token for token, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(config["vocab_size"])]
    types = [
        gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
        for i, t in enumerate(tokens)
    ]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    for key, add in (("eos_token_id", writer.add_eos_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if config.get(key) is not None:
            add(config[key])
    writer.add_add_bos_token(False)
    template = folder / "chat_template.jinja"
    if template.exists():
        writer.add_chat_template(template.read_text())


def _gguf_tensors(arch: str, config: dict, state: dict, names: gguf.TensorNameMap):
    """(GGUF name, value) in llama.cpp's layout."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    rope = rope_params(config)
    if rope.get("rope_type") == "llama3":
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        yield "rope_freqs.weight", llama3_rope_freqs(rope, head_dim)
    if arch == "phi3" and rope.get("rope_type") == "longrope":
        yield "rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32)
        yield "rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32)
    per_expert, stacked_name = EXPERTS["llama" if arch == "llama" else "qwen"]
    count = config.get("num_local_experts") or config.get("num_experts") or 0
    dense_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config["num_hidden_layers"])
    for name, value in state.items():
        if arch in GEMMA and name == "lm_head.weight":
            continue
        if ".experts." in name:
            if ".experts.0." not in name:
                continue  # stacked with expert 0
            layer, projection = name.split(".")[2], name.split(".")[-2]
            parts = [per_expert.format(layer=layer, expert=e, projection=projection) + ".weight" for e in range(count)]
            merged = names.get_name(stacked_name.format(layer=layer, projection=projection))
            yield f"{merged}.weight", np.stack([state[part] for part in parts])
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            n_head = heads if ".q_proj." in name else kv_heads
            rows = value.shape[0] // n_head // 2
            value = value.reshape(n_head, 2, rows, *value.shape[1:]).swapaxes(1, 2).reshape(value.shape)
        if arch in GEMMA and name.endswith("norm.weight"):
            value = value + np.float32(1.0)
        base, _, suffix = name.rpartition(".")
        # tiny-qwen2-moe's dense layer (mlp_only_layers), which llama.cpp's qwen2moe cannot hold: named as the dense
        # MLP of its other architectures
        mapped = names.get_name(base) or dense_names.get_name(base)
        assert mapped is not None, name
        yield f"{mapped}.{suffix}", value


def llama3_rope_freqs(rope: dict, head_dim: int, freqs: np.ndarray | None = None) -> np.ndarray:
    """The divisor of each RoPE frequency under HF's llama3 scaling, as llama.cpp computes it: base frequencies in
    float32 (`freqs`, or numpy's), then per frequency 1 (short wavelengths), `factor` (long ones) or a blend, stored
    as float32."""
    if freqs is None:
        exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        freqs = np.float32(1.0) / np.float32(rope["rope_theta"]) ** exponents
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    divisors = []
    for freq in freqs.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors, np.float32)
