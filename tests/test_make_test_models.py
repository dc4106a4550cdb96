"""Tests for scripts/make_test_models.py: the tiny HF checkpoints used by parity tests."""

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts import make_test_models  # noqa: E402
from scripts.make_test_models import BUILDERS, build_test_models, greedy_stats  # noqa: E402

NAMES = sorted(BUILDERS)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_test_models(tmp_path_factory.mktemp("test_models"))


def test_builds_every_registered_model(model_dirs: dict[str, Path]) -> None:
    assert sorted(model_dirs) == NAMES == ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"]
    for name, folder in model_dirs.items():
        assert folder.name == name
        assert (folder / make_test_models.STAMP_FILE).is_file()
    out_dir = next(iter(model_dirs.values())).parent
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("name", NAMES)
def test_folder_loads_with_transformers(model_dirs: dict[str, Path], name: str) -> None:
    folder = model_dirs[name]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    config = model.config
    assert type(model).__name__ == BUILDERS[name].model_class == config.architectures[0]
    assert model.dtype == torch.float32
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.vocab_size % 64 == 0 and config.vocab_size > len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None and config.bos_token_id is None
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id == 0
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == config.tie_word_embeddings == name.startswith("tiny-qwen")
    text = "A naïve café owner 日本語 🎉 paid $12.50."
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_architecture_specifics(model_dirs: dict[str, Path]) -> None:
    configs = {n: transformers.AutoConfig.from_pretrained(p) for n, p in model_dirs.items()}
    assert configs["tiny-llama"].rope_parameters["rope_type"] == "llama3"
    assert configs["tiny-llama"].rope_parameters["original_max_position_embeddings"] == 128
    assert configs["tiny-llama"].max_position_embeddings == 512
    assert configs["tiny-mistral"].sliding_window == 32
    assert configs["tiny-qwen2"].use_sliding_window is False
    assert configs["tiny-qwen3"].head_dim == 32 != 64 // 4
    qwen2 = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["tiny-qwen2"])
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    qwen3 = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["tiny-qwen3"])
    assert qwen3.model.layers[0].self_attn.q_norm.weight.shape == (32,)


def test_mistral_is_sharded(model_dirs: dict[str, Path]) -> None:
    folder = model_dirs["tiny-mistral"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1
    assert sorted(set(index["weight_map"].values())) == shards


def test_mistral_sliding_window_changes_long_sequences(model_dirs: dict[str, Path]) -> None:
    folder = model_dirs["tiny-mistral"]
    windowed = transformers.AutoModelForCausalLM.from_pretrained(folder)
    full = transformers.AutoModelForCausalLM.from_pretrained(folder, sliding_window=None)
    ids = torch.arange(80).unsqueeze(0) + 3
    with torch.no_grad():
        a, b = windowed(ids).logits[0], full(ids).logits[0]
    torch.testing.assert_close(a[:32], b[:32])
    assert (a[-1] - b[-1]).abs().max() > 0.1


def test_chat_template_and_generation_configs(model_dirs: dict[str, Path]) -> None:
    for name, folder in model_dirs.items():
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        )
        ids = tokenizer(rendered).input_ids
        assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
        assert ids.count(tokenizer.eos_token_id) == 2
        generation = transformers.GenerationConfig.from_pretrained(folder)
        im_end = tokenizer.eos_token_id
        assert generation.eos_token_id == ([im_end, 0] if name == "tiny-qwen2" else im_end)
    llama = transformers.GenerationConfig.from_pretrained(model_dirs["tiny-llama"])
    assert (llama.temperature, llama.top_p, llama.repetition_penalty) == (0.7, 0.9, 1.1)


def test_second_build_is_noop_and_missing_stamp_rebuilds(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = next(iter(model_dirs.values())).parent
    before = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*")}

    def fail(*args: object) -> None:
        raise AssertionError("complete folder was rebuilt")

    with monkeypatch.context() as patch:
        patch.setattr(make_test_models.CausalLMBuilder, "build", fail)
        assert build_test_models(out_dir) == model_dirs
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("*")} == before

    stamp = model_dirs["tiny-qwen3"] / make_test_models.STAMP_FILE
    expected = stamp.read_text()
    stamp.unlink()
    build_test_models(out_dir, ["tiny-qwen3"])
    assert stamp.read_text() == expected
    transformers.AutoModelForCausalLM.from_pretrained(model_dirs["tiny-qwen3"])


def test_unknown_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="tiny-nope"):
        build_test_models(tmp_path, ["tiny-nope"])


@pytest.mark.parametrize("name", NAMES)
def test_logits_are_spread_and_greedy_is_prompt_dependent(model_dirs: dict[str, Path], name: str) -> None:
    stats = greedy_stats(model_dirs[name])
    n_tokens = len(transformers.AutoTokenizer.from_pretrained(model_dirs[name]))
    assert stats.min_logit_std > 3.0
    assert stats.min_top2_gap > 1e-3
    assert stats.n_distinct_continuations == len(make_test_models.CHECK_PROMPTS)
    assert stats.min_distinct_tokens >= 8
    assert stats.max_abs_logit < 50.0
    assert max(max(c) for c in stats.continuations) < n_tokens
