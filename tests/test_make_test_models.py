"""Tests for scripts/make_test_models.py: the tiny HF checkpoints used by parity tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts import make_test_models  # noqa: E402
from scripts.make_test_models import (  # noqa: E402
    BUILDERS,
    CHECK_PROMPTS,
    DECODERS,
    bge_m3_reference,
    build_test_models,
    greedy_stats,
    internlm2_reward_reference,
    pack_wqkv,
    unpack_wqkv,
)

NAMES = sorted(BUILDERS)
ST_MODELS = {  # name -> (pooling mode, embedding dimension, module folders after the Transformer)
    "tiny-bert-mean": ("mean", 32, ["1_Pooling", "2_Normalize"]),
    "tiny-bert-cls-dense": ("cls", 24, ["1_Pooling", "2_Dense", "3_Normalize"]),
    "tiny-bert-matryoshka": ("mean", 64, ["1_Pooling", "2_Normalize"]),
    "tiny-bge-m3": ("cls", 32, ["1_Pooling", "2_Normalize"]),
}
CLASSIFIERS = {  # name -> (architecture, labels)
    "tiny-bert-classifier": ("BertForSequenceClassification", ["negative", "neutral", "positive"]),
    "tiny-qwen2-classifier": ("Qwen2ForSequenceClassification", ["no", "yes"]),
}
QUERY = "what is the price of coffee in Paris?"
# transformers reads the InternLM2 (remote code) config.json as a plain config and warns about `rope_scaling: null`
IGNORE_ROPE_SCALING = pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_test_models(tmp_path_factory.mktemp("test_models"))


def test_builds_every_registered_model(model_dirs: dict[str, Path]) -> None:
    assert sorted(model_dirs) == NAMES
    assert DECODERS == ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3",
                        "tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-phi3", "tiny-llama-yarn",
                        "tiny-gemma", "tiny-gemma3-mm", "tiny-granite", "tiny-olmo2", "tiny-smollm3",
                        "tiny-llama-8h"]  # fmt: skip
    # checked against their references in test_pooling.py / test_pooling_modernbert.py / test_pooling_rewards.py /
    # test_pooling_alibi.py / test_pooling_rope.py / test_pooling_deberta.py / test_tokenizer.py
    others = ["tiny-internlm2", "tiny-internlm2-reward", "tiny-internlm2-reward-published", "tiny-xlmr-cross-encoder",
              "tiny-distilbert-sst2", "tiny-bert-ner", "tiny-modernbert-embed", "tiny-modernbert-reranker",
              "tiny-qwen2-reward", "tiny-qwen2-prm", "tiny-jina-v2", "tiny-gte-new", "tiny-gte-new-reranker",
              "tiny-nomic-bert", "tiny-jina-v3", "tiny-deberta-v3-classifier"]  # fmt: skip
    assert sorted(set(NAMES) - set(DECODERS)) == sorted([*ST_MODELS, *CLASSIFIERS, *others])
    for name, folder in model_dirs.items():
        assert folder.name == name
        assert (folder / make_test_models.STAMP_FILE).is_file()
        # as published, InternLM2's tokenizer is only its SentencePiece model (read by remote code)
        tokenizer_file = "tokenizer.model" if name.endswith("-published") else "tokenizer.json"
        assert (folder / "config.json").is_file() and (folder / tokenizer_file).is_file()
    out_dir = next(iter(model_dirs.values())).parent
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("name", DECODERS)
def test_folder_loads_with_transformers(model_dirs: dict[str, Path], name: str) -> None:
    folder = model_dirs[name]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == BUILDERS[name].model_class == model.config.architectures[0]
    config = model.config.get_text_config()  # a multimodal model's text model has the common shape
    assert model.dtype == torch.float32
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    heads = 8 if name == "tiny-llama-8h" else 4  # eight query heads: tensor parallelism over up to 8 devices
    assert (config.num_attention_heads, config.num_key_value_heads) == (heads, 2)
    assert config.vocab_size % 64 == 0 and config.vocab_size > len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None and config.bos_token_id is None
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id == 0
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert (
        tied
        == config.tie_word_embeddings
        == name.startswith(("tiny-qwen", "tiny-gemma", "tiny-granite", "tiny-smollm3"))
    )
    text = "A naïve café owner 日本語 🎉 paid $12.50."
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_architecture_specifics(model_dirs: dict[str, Path]) -> None:
    configs = {n: transformers.AutoConfig.from_pretrained(model_dirs[n]) for n in DECODERS}
    assert configs["tiny-llama"].rope_parameters["rope_type"] == "llama3"
    assert configs["tiny-llama"].rope_parameters["original_max_position_embeddings"] == 128
    assert configs["tiny-llama"].max_position_embeddings == 512
    assert configs["tiny-mistral"].sliding_window == 32
    assert configs["tiny-qwen2"].use_sliding_window is False
    assert configs["tiny-qwen3"].head_dim == 32 != 64 // 4
    phi3 = configs["tiny-phi3"].rope_parameters
    assert (phi3["rope_type"], phi3["original_max_position_embeddings"], phi3["partial_rotary_factor"]) == (
        "longrope",
        32,
        0.75,
    )
    assert len(phi3["short_factor"]) == len(phi3["long_factor"]) == 6  # 12 rotary dimensions of 16
    assert configs["tiny-phi3"].sliding_window == 48
    yarn = configs["tiny-llama-yarn"].rope_parameters
    assert (yarn["rope_type"], yarn["factor"], yarn["original_max_position_embeddings"]) == ("yarn", 4.0, 128)
    phi3_model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["tiny-phi3"])
    assert phi3_model.model.layers[0].self_attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert phi3_model.model.layers[0].mlp.gate_up_proj.weight.shape == (2 * 128, 64)
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


@IGNORE_ROPE_SCALING
def test_chat_template_and_generation_configs(model_dirs: dict[str, Path]) -> None:
    for name in [*DECODERS, "tiny-qwen2-classifier", "tiny-internlm2-reward"]:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dirs[name])
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        )
        ids = tokenizer(rendered).input_ids
        assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
        assert ids.count(tokenizer.eos_token_id) == 2
        if name not in DECODERS:
            assert not (model_dirs[name] / "generation_config.json").exists()
            continue
        generation = transformers.GenerationConfig.from_pretrained(model_dirs[name])
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
        for builder_class in {type(builder) for builder in BUILDERS.values()}:
            patch.setattr(builder_class, "build", fail)
        assert build_test_models(out_dir) == model_dirs
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("*")} == before

    for name in ["tiny-qwen3", "tiny-bert-cls-dense"]:
        stamp = model_dirs[name] / make_test_models.STAMP_FILE
        expected = stamp.read_text()
        weights = {p.relative_to(model_dirs[name]): p.read_bytes() for p in model_dirs[name].rglob("*.safetensors")}
        stamp.unlink()
        build_test_models(out_dir, [name])
        assert stamp.read_text() == expected
        assert {p.relative_to(model_dirs[name]): p.read_bytes() for p in model_dirs[name].rglob("*.safetensors")} == (
            weights
        )


def test_unknown_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="tiny-nope"):
        build_test_models(tmp_path, ["tiny-nope"])


# Gemma 2's and 3's tiny models settle into repeating one token on one of the eight prompts; test_gemma.py and
# test_decoder_families.py check that their greedy continuations of their own prompts differ
@pytest.mark.parametrize(
    "name", [name for name in DECODERS if name not in ("tiny-gemma2", "tiny-gemma3", "tiny-gemma3-mm")]
)
def test_logits_are_spread_and_greedy_is_prompt_dependent(model_dirs: dict[str, Path], name: str) -> None:
    stats = greedy_stats(model_dirs[name])
    n_tokens = len(transformers.AutoTokenizer.from_pretrained(model_dirs[name]))
    assert stats.min_logit_std > 3.0
    assert stats.min_top2_gap > 1e-3
    assert stats.n_distinct_continuations == len(make_test_models.CHECK_PROMPTS)
    assert stats.min_distinct_tokens >= 8
    assert stats.max_abs_logit < 50.0
    assert max(max(c) for c in stats.continuations) < n_tokens


# --- encoder tokenizers ---------------------------------------------------------------------------------------


def test_bert_tokenizer(model_dirs: dict[str, Path]) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dirs["tiny-bert-classifier"])
    assert type(tokenizer).__name__ == "BertTokenizer"  # transformers 5: BertTokenizerFast is this class
    assert 400 <= len(tokenizer) <= 600
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    assert tokenizer.pad_token_id == 0 and tokenizer.do_lower_case
    assert tokenizer("The CAT").input_ids == tokenizer("the cat").input_ids
    pair = tokenizer("The cat found", "a blue door")
    tokens = tokenizer.convert_ids_to_tokens(pair.input_ids)
    assert tokens == ["[CLS]", "the", "cat", "found", "[SEP]", "a", "blue", "door", "[SEP]"]
    assert pair.token_type_ids == [0] * 5 + [1] * 4
    assert tokenizer.convert_ids_to_tokens(tokenizer("tourists zürich").input_ids)[1:-1] == [
        "tourist", "##s", "zurich"]  # fmt: skip
    assert tokenizer.unk_token_id in tokenizer("ß€ 🎈").input_ids  # characters outside the corpus
    for name in ["tiny-bert-mean", "tiny-bert-cls-dense", "tiny-bert-matryoshka"]:
        other = transformers.AutoTokenizer.from_pretrained(model_dirs[name])
        assert other.get_vocab() == tokenizer.get_vocab() and other.model_max_length == 64  # max_seq_length


def test_xlmr_tokenizer(model_dirs: dict[str, Path]) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dirs["tiny-xlmr-cross-encoder"])
    assert type(tokenizer).__name__ == "XLMRobertaTokenizer"
    assert 400 <= len(tokenizer) <= 600
    assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token_id) == ("<s>", "</s>", 1)
    a, b = tokenizer("The cat found").input_ids, tokenizer("a blue door").input_ids
    assert a[0] == 0 and a[-1] == 2
    pair = tokenizer("The cat found", "a blue door")
    assert pair.input_ids == a + [2] + b[1:]  # <s> a </s></s> b </s>
    assert tokenizer.convert_ids_to_tokens(pair.input_ids) == [
        "<s>", "▁The", "▁cat", "▁found", "</s>", "</s>", "▁a", "▁blue", "▁door", "</s>"]  # fmt: skip
    assert "token_type_ids" not in pair
    assert tokenizer.decode(tokenizer("We drank coffee in Paris.").input_ids, skip_special_tokens=True) == (
        "We drank coffee in Paris."
    )
    bge = transformers.AutoTokenizer.from_pretrained(model_dirs["tiny-bge-m3"])
    assert bge.get_vocab() == tokenizer.get_vocab()
    assert transformers.AutoConfig.from_pretrained(model_dirs["tiny-bge-m3"]).max_position_embeddings == 130


def test_encoder_tokenizers_are_reproducible_across_processes() -> None:
    """The tokenizers trainers are not (hash-map order breaks ties); the counted vocabularies must be."""
    code = """if True:
        import json, sys
        sys.path.insert(0, sys.argv[1])
        from scripts import make_test_models as m
        keys = ("model", "normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens")
        tokenizers = [m.bert_tokenizer(), m.xlmr_tokenizer()]
        print(json.dumps([{k: json.loads(t.backend_tokenizer.to_str())[k] for k in keys} for t in tokenizers]))
    """
    runs = [
        subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, env=env, check=True)
        for env in (os.environ | {"PYTHONHASHSEED": "1"}, os.environ | {"PYTHONHASHSEED": "2"})
    ]
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout) > 10_000


# --- sentence-transformers models -----------------------------------------------------------------------------


def _cosines(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return (unit @ unit.T)[~np.eye(len(embeddings), dtype=bool)]


@pytest.mark.parametrize("name", sorted(ST_MODELS))
def test_sentence_transformer_folder(model_dirs: dict[str, Path], name: str) -> None:
    folder = model_dirs[name]
    pooling, dim, paths = ST_MODELS[name]
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", *paths]
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", *(p.split("_")[1] for p in paths)]
    pooling_config = json.loads((folder / "1_Pooling/config.json").read_text())
    st_config = json.loads((folder / "config_sentence_transformers.json").read_text())
    bert_config = json.loads((folder / "sentence_bert_config.json").read_text())
    if name == "tiny-bge-m3":  # sentence-transformers 2.x files, as BAAI/bge-m3 ships them
        assert all(m["type"].startswith("sentence_transformers.models.") for m in modules)
        assert pooling_config == {
            "word_embedding_dimension": 32,
            "pooling_mode_cls_token": True,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        }
        assert bert_config == {"max_seq_length": 128, "do_lower_case": False}
        assert list(st_config) == ["__version__"]
    else:  # as sentence-transformers 6 saves them
        assert pooling_config["pooling_mode"] == pooling and pooling_config["include_prompt"] is True
        assert (bert_config["max_seq_length"], bert_config["do_lower_case"]) == (64, False)
        assert st_config["default_prompt_name"] is None
        prompts = {"query": "query: ", "passage": "passage: "} if name == "tiny-bert-mean" else {}
        assert st_config["prompts"] == prompts

    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    assert model.max_seq_length == bert_config["max_seq_length"]
    assert model.get_embedding_dimension() == dim
    embeddings = model.encode(list(CHECK_PROMPTS), convert_to_numpy=True)
    assert embeddings.shape == (len(CHECK_PROMPTS), dim) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)
    cosines = _cosines(embeddings)
    assert cosines.max() < 0.92 and cosines.mean() < 0.6, (cosines.max(), cosines.mean())
    # the Transformer module's output, pooled by hand, is the embedding
    features = model.preprocess(list(CHECK_PROMPTS))
    with torch.no_grad():
        tokens = model[0].auto_model(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
        tokens = tokens.last_hidden_state
        mask = features["attention_mask"][..., None].float()
        pooled = tokens[:, 0] if pooling == "cls" else (tokens * mask).sum(1) / mask.sum(1)
        if name == "tiny-bert-cls-dense":
            pooled = torch.tanh(model[2].linear(pooled))
    np.testing.assert_allclose(torch.nn.functional.normalize(pooled, dim=-1).numpy(), embeddings, atol=1e-5)


def test_prompts_change_embeddings(model_dirs: dict[str, Path]) -> None:
    model = sentence_transformers.SentenceTransformer(str(model_dirs["tiny-bert-mean"]), device="cpu")
    plain = model.encode(list(CHECK_PROMPTS))
    query = model.encode(list(CHECK_PROMPTS), prompt_name="query")
    np.testing.assert_allclose(query, model.encode(["query: " + p for p in CHECK_PROMPTS]), atol=1e-6)
    assert np.linalg.norm(query - plain, axis=-1).min() > 0.2


def test_dense_module_files(model_dirs: dict[str, Path]) -> None:
    from safetensors.numpy import load_file

    dense_dir = model_dirs["tiny-bert-cls-dense"] / "2_Dense"
    assert sorted(p.name for p in dense_dir.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((dense_dir / "config.json").read_text())
    assert (config["in_features"], config["out_features"], config["bias"]) == (32, 24, True)
    assert config["activation_function"] == "torch.nn.modules.activation.Tanh"
    weights = load_file(dense_dir / "model.safetensors")
    assert {k: v.shape for k, v in weights.items()} == {"linear.weight": (24, 32), "linear.bias": (24,)}


def test_matryoshka_dimensions(model_dirs: dict[str, Path]) -> None:
    folder = model_dirs["tiny-bert-matryoshka"]
    assert json.loads((folder / "config.json").read_text())["matryoshka_dimensions"] == [16, 32, 64]
    config = transformers.AutoConfig.from_pretrained(folder)
    assert (config.hidden_size, config.matryoshka_dimensions) == (64, [16, 32, 64])
    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu", truncate_dim=16)
    embeddings = model.encode(list(CHECK_PROMPTS))
    assert embeddings.shape == (len(CHECK_PROMPTS), 16)
    assert _cosines(embeddings).max() < 0.9


# --- cross-encoder and classifiers ----------------------------------------------------------------------------


def test_cross_encoder(model_dirs: dict[str, Path]) -> None:
    folder = model_dirs["tiny-xlmr-cross-encoder"]
    config = transformers.AutoConfig.from_pretrained(folder)
    assert config.architectures == ["XLMRobertaForSequenceClassification"] and config.num_labels == 1
    assert config.max_position_embeddings == 128 + config.pad_token_id + 1
    assert not (folder / "modules.json").exists()  # a plain HF folder, like BAAI/bge-reranker-*
    model = sentence_transformers.CrossEncoder(str(folder), device="cpu")
    assert isinstance(model.activation_fn, torch.nn.Sigmoid)
    pairs = [(QUERY, text) for text in CHECK_PROMPTS]
    scores = model.predict(pairs)
    assert scores.shape == (len(pairs),) and ((scores > 0) & (scores < 1)).all()
    # the raw logits are the HF model's on `<s> q </s></s> d </s>` pairs
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = hf(**tokenizer([q for q, _ in pairs], [d for _, d in pairs], padding=True, return_tensors="pt"))
    logits = logits.logits[:, 0].numpy()
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-logits)), atol=1e-5)
    assert logits.max() - logits.min() > 1.0 and scores.max() - scores.min() > 0.2
    assert model.predict([(QUERY, CHECK_PROMPTS[0])])[0] != pytest.approx(model.predict([(CHECK_PROMPTS[0], QUERY)])[0])


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifier(model_dirs: dict[str, Path], name: str) -> None:
    architecture, labels = CLASSIFIERS[name]
    folder = model_dirs[name]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    config = model.config
    assert type(model).__name__ == architecture == config.architectures[0]
    assert config.num_labels == len(labels) and config.id2label == dict(enumerate(labels))
    assert config.label2id == {label: i for i, label in enumerate(labels)}
    if name == "tiny-bert-classifier":
        assert config.problem_type == "single_label_classification"
        assert config.max_position_embeddings == 128 and config.hidden_size == 32
    else:
        assert config.pad_token_id == tokenizer.pad_token_id == 0 and tokenizer.pad_token == "<|endoftext|>"
        assert config.tie_word_embeddings is False and config.vocab_size % 64 == 0
        assert (config.hidden_size, config.num_key_value_heads) == (64, 2)
    with torch.no_grad():
        batch = model(**tokenizer(list(CHECK_PROMPTS), padding=True, return_tensors="pt")).logits.numpy()
        single = np.concatenate([model(**tokenizer(p, return_tensors="pt")).logits.numpy() for p in CHECK_PROMPTS])
    np.testing.assert_allclose(batch, single, atol=1e-4)  # padding (and, for Qwen2, the pad id) is respected
    assert batch.shape == (len(CHECK_PROMPTS), len(labels))
    assert (batch.max(axis=0) - batch.min(axis=0)).min() > 1.0
    assert len(set(batch.argmax(axis=1).tolist())) > 1


# --- InternLM2 reward model -----------------------------------------------------------------------------------


def test_wqkv_round_trip() -> None:
    heads, kv_heads, head_dim, hidden = 4, 2, 3, 5
    rng = np.random.default_rng(0)
    q = rng.normal(size=(heads * head_dim, hidden)).astype(np.float32)
    k = rng.normal(size=(kv_heads * head_dim, hidden)).astype(np.float32)
    v = rng.normal(size=(kv_heads * head_dim, hidden)).astype(np.float32)
    wqkv = pack_wqkv(q, k, v, kv_heads)
    assert wqkv.shape == ((heads + 2 * kv_heads) * head_dim, hidden)
    # per KV group: its 2 query heads, its key head, its value head
    d = head_dim
    np.testing.assert_array_equal(wqkv[0 : 2 * d], q[0 : 2 * d])
    np.testing.assert_array_equal(wqkv[2 * d : 3 * d], k[0:d])
    np.testing.assert_array_equal(wqkv[3 * d : 4 * d], v[0:d])
    np.testing.assert_array_equal(wqkv[4 * d : 6 * d], q[2 * d : 4 * d])
    np.testing.assert_array_equal(wqkv[6 * d : 7 * d], k[d : 2 * d])
    np.testing.assert_array_equal(wqkv[7 * d : 8 * d], v[d : 2 * d])
    for got, want in zip(unpack_wqkv(wqkv, heads, kv_heads), (q, k, v)):
        np.testing.assert_array_equal(got, want)
    q1 = q[: 2 * d]  # one KV head (MQA) and plain multi-head attention (q_per_kv 1)
    for packed, n_heads, n_kv, parts in [
        (pack_wqkv(q1, k[:d], v[:d], 1), 2, 1, (q1, k[:d], v[:d])),
        (pack_wqkv(k, k, v, 2), 2, 2, (k, k, v)),
    ]:
        for got, want in zip(unpack_wqkv(packed, n_heads, n_kv), parts):
            np.testing.assert_array_equal(got, want)


@IGNORE_ROPE_SCALING
def test_internlm2_reward_folder_and_reference(model_dirs: dict[str, Path]) -> None:
    from safetensors.numpy import load_file

    folder = model_dirs["tiny-internlm2-reward"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["InternLM2ForRewardModel"] and config["model_type"] == "internlm2"
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (4, 2, 2)
    assert config["rope_scaling"] is None and config["bias"] is False and config["tie_word_embeddings"] is False
    assert config["max_position_embeddings"] == 512 and config["vocab_size"] % 64 == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert config["vocab_size"] > len(tokenizer) and config["pad_token_id"] == tokenizer.pad_token_id == 0
    assert config["eos_token_id"] == tokenizer.eos_token_id
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    weights = load_file(folder / "model.safetensors")
    expected = {"model.tok_embeddings.weight": (v, h), "model.norm.weight": (h,), "v_head.weight": (1, h)}
    for n in range(2):
        p = f"model.layers.{n}."
        expected |= {
            p + "attention.wqkv.weight": ((4 + 2 * 2) * (h // 4), h),
            p + "attention.wo.weight": (h, h),
            p + "feed_forward.w1.weight": (i, h),
            p + "feed_forward.w3.weight": (i, h),
            p + "feed_forward.w2.weight": (h, i),
            p + "attention_norm.weight": (h,),
            p + "ffn_norm.weight": (h,),
        }
    assert {name: w.shape for name, w in weights.items()} == expected
    assert all(w.dtype == np.float32 for w in weights.values())
    assert not weights["model.tok_embeddings.weight"][len(tokenizer) :].any()

    ids = tokenizer("The cat found the blue door and smiled.").input_ids
    rewards = internlm2_reward_reference(folder, ids)
    assert rewards.shape == (len(ids),) and rewards.dtype == np.float32 and np.isfinite(rewards).all()
    np.testing.assert_allclose(internlm2_reward_reference(folder, ids[:4]), rewards[:4], atol=1e-4)  # causal
    last = [internlm2_reward_reference(folder, tokenizer(p).input_ids)[-1] for p in CHECK_PROMPTS]
    assert max(last) - min(last) > 1.0 and rewards.std() > 1.0


def test_internlm2_reference_uses_the_packed_layout(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The reference reads `wqkv` in InternLM2's layout: repacking the unpacked q / k / v gives the same rewards,
    packing them with k and v swapped does not."""
    from safetensors.numpy import load_file, save_file

    folder = model_dirs["tiny-internlm2-reward"]
    weights = load_file(folder / "model.safetensors")
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    ids = list(range(3, 20))
    want = internlm2_reward_reference(folder, ids)
    name = "model.layers.0.attention.wqkv.weight"
    q, k, v = unpack_wqkv(weights[name], 4, 2)
    swapped_kv = dict(weights) | {name: pack_wqkv(q, v, k, 2)}
    save_file(swapped_kv, tmp_path / "model.safetensors")
    assert np.abs(internlm2_reward_reference(tmp_path, ids) - want).max() > 1e-2
    repacked = dict(weights) | {name: pack_wqkv(q, k, v, 2)}
    save_file(repacked, tmp_path / "model.safetensors")
    np.testing.assert_array_equal(internlm2_reward_reference(tmp_path, ids), want)


# --- BGE-M3 ---------------------------------------------------------------------------------------------------


def test_bge_m3_heads_and_reference(model_dirs: dict[str, Path]) -> None:
    folder = model_dirs["tiny-bge-m3"]
    assert transformers.AutoConfig.from_pretrained(folder).architectures == ["XLMRobertaModel"]
    colbert = torch.load(folder / "colbert_linear.pt", weights_only=True)
    sparse = torch.load(folder / "sparse_linear.pt", weights_only=True)
    assert {k: tuple(t.shape) for k, t in colbert.items()} == {"weight": (32, 32), "bias": (32,)}
    assert {k: tuple(t.shape) for k, t in sparse.items()} == {"weight": (1, 32), "bias": (1,)}
    assert all(t.dtype == torch.float32 for t in [*colbert.values(), *sparse.values()])

    texts = list(CHECK_PROMPTS)
    out = bge_m3_reference(folder, texts)
    st = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    np.testing.assert_allclose(out["dense"], st.encode(texts), atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert out["input_ids"] == [tokenizer(t).input_ids for t in texts]
    for ids, vecs, weights in zip(out["input_ids"], out["colbert"], out["sparse"]):
        assert vecs.shape == (len(ids) - 1, 32) and weights.shape == (len(ids),)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=-1), 1.0, rtol=1e-5)
        assert (weights >= 0).all()
    # padding does not change a text's outputs
    alone = bge_m3_reference(folder, texts[:1])
    np.testing.assert_allclose(alone["colbert"][0], out["colbert"][0], atol=1e-5)
    np.testing.assert_allclose(alone["sparse"][0], out["sparse"][0], atol=1e-5)
    # and the outputs differ clearly between inputs
    sparse_all = np.concatenate(out["sparse"])
    assert 0.2 < (sparse_all > 0).mean() < 0.9 and sparse_all.max() > 1.0
    assert _cosines(np.concatenate(out["colbert"])).mean() < 0.6


# --- command line ---------------------------------------------------------------------------------------------


@IGNORE_ROPE_SCALING
def test_check_prints_statistics(model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = next(iter(model_dirs.values())).parent
    names = ["tiny-qwen3", "tiny-bert-mean", "tiny-bert-classifier", "tiny-internlm2-reward"]
    assert make_test_models.main([str(out_dir), "--only", *names, "--check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines if not line.startswith(" ")] == names
    assert "distinct continuations 8/8" in lines[1]
    assert lines[3].startswith("  max_cos ") and lines[5].startswith("  min_spread ")
    assert lines[7].startswith("  last_min_spread ")
