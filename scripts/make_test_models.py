"""Build tiny, deterministic, random-weight Hugging Face model folders for tests.

The parity tests compare jaxserve against HF ``transformers`` / ``sentence-transformers`` (float32, CPU) on
small checkpoints that are generated offline by this script instead of being downloaded. Each folder is a
complete model directory that the library which would consume it loads as is.

Decoders -- ``config.json``, ``generation_config.json``, safetensors weights and a tokenizer with a ChatML
chat template, loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``:

* ``tiny-llama``   LlamaForCausalLM, untied embeddings, llama3 RoPE scaling,
                   sampling defaults (temperature / top_p / repetition_penalty)
                   in its generation config.
* ``tiny-mistral`` MistralForCausalLM, untied, ``sliding_window=32`` and
                   sharded safetensors with ``model.safetensors.index.json``.
* ``tiny-qwen2``   Qwen2ForCausalLM, q/k/v biases, tied embeddings and two EOS
                   ids in its generation config.
* ``tiny-qwen3``   Qwen3ForCausalLM, q/k norms, tied embeddings and a
                   ``head_dim`` (32) different from hidden / heads (16).

Pooling models (embeddings, scores, classifier logits, rewards):

* ``tiny-bert-mean``          BertModel as a SentenceTransformer: mean pooling, Normalize,
                              ``query: `` / ``passage: `` prompts, max_seq_length 64.
* ``tiny-bert-cls-dense``     BertModel, CLS pooling, a 32 -> 24 Tanh ``2_Dense`` layer, Normalize.
* ``tiny-bert-matryoshka``    like ``tiny-bert-mean`` with hidden 64 and
                              ``matryoshka_dimensions`` [16, 32, 64] in ``config.json``.
* ``tiny-xlmr-cross-encoder`` XLMRobertaForSequenceClassification, one label: a plain HF folder (as
                              BAAI/bge-reranker ships) that ``sentence_transformers.CrossEncoder``
                              loads with its default sigmoid.
* ``tiny-bert-classifier``    BertForSequenceClassification, labels negative / neutral / positive.
* ``tiny-distilbert-sst2``    DistilBertForSequenceClassification (DistilBERT's own tensor names, no token
                              types), labels NEGATIVE / POSITIVE as distilbert-base-uncased-finetuned-sst-2.
* ``tiny-bert-ner``           BertForTokenClassification, a label per token (O, B-PER, I-PER, B-LOC, I-LOC).
* ``tiny-qwen2-classifier``   Qwen2ForSequenceClassification, labels no / yes, the ChatML tokenizer.
* ``tiny-internlm2-reward``   InternLM2ForRewardModel (remote code in the real checkpoints, so written
                              by hand: InternLM2 tensor names, packed ``wqkv``, a ``v_head``);
                              ``internlm2_reward_reference`` runs it through ``transformers.LlamaModel``.
* ``tiny-internlm2-reward-published`` the same architecture laid out as ``internlm/internlm2-1_8b-reward``:
                              ``auto_map`` to remote code, only a SentencePiece ``tokenizer.model``.
* ``tiny-bge-m3``             XLMRobertaModel as a SentenceTransformer (CLS pooling, Normalize) with
                              BGE-M3's ``colbert_linear.pt`` / ``sparse_linear.pt`` heads and its
                              legacy-format ST files; ``bge_m3_reference`` computes dense / ColBERT /
                              sparse outputs.

The four decoders, the Qwen2 classifier and the InternLM2 reward model share one byte-level BPE
tokenizer trained on a fixed in-script corpus (with multi-byte UTF-8 text, so characters split across
tokens). The BERT models share a lowercasing WordPiece tokenizer (``[PAD]`` = 0, ``[UNK]``, ``[CLS]``,
``[SEP]``, ``[MASK]``; pairs are ``[CLS] a [SEP] b [SEP]`` with token types 0 / 1) and the XLM-R models
a Unigram tokenizer with RoBERTa's specials (``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3;
pairs are ``<s> a </s></s> b </s>``). Both vocabularies are counted from the same corpus (every
character, its ``##`` continuation for WordPiece, then the most frequent words): the ``tokenizers``
WordPiece and Unigram trainers are not reproducible across processes (hash-map order breaks ties).

Why the weights are scaled: HF's default init (std 0.02) on a model this small
yields almost uniform logits, so greedy decoding is dominated by near-ties and
says nothing about whether two implementations agree; the same holds for
embeddings (all nearly parallel) and classifier / reward scores (all nearly equal).
Here every matrix is drawn with std ``INIT_STD``, norm weights are ``1 + NORM_STD * randn`` and
biases ``BIAS_STD * randn`` (from a per-model seeded ``torch.Generator``), which
gives logits spread over several units, prompt-dependent greedy continuations
and clear top-2 margins. Encoders get two more tweaks (``_decorrelate_encoder``) so that their embeddings
of different texts point in clearly different directions: position / token-type embeddings at
``POSITION_EMBEDDING_SCALE * INIT_STD`` and zero-mean rows in each FFN down projection. ``--check`` prints
these statistics (greedy decoding for the decoders; pairwise cosines, score and logit spreads for the
pooling models). The embedding and LM-head rows past the ChatML tokenizer's vocabulary (padding up to a
multiple of 64, as in real checkpoints) are zero so that no model ever emits an undecodable id.

Builds are idempotent: a folder is written to a temporary directory, stamped
last with ``.complete`` holding a hash of its spec and of this script, and moved
into place; a folder whose stamp matches is skipped.

Usage::

    python scripts/make_test_models.py OUT_DIR [--only NAME ...] [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

INIT_STD = 0.5
POSITION_EMBEDDING_SCALE = 0.3  # encoders: position / token-type tables at 0.3 * INIT_STD
NORM_STD = 0.1
BIAS_STD = 0.1

STAMP_FILE = ".complete"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
ENDOFTEXT_ID, IM_END_ID = 0, 2  # trainer assigns SPECIAL_TOKENS ids 0, 1, 2
TOKENIZER_VOCAB_SIZE = 500
VOCAB_MULTIPLE = 64
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4
XLMR_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..4, as in XLM-R
ENCODER_VOCAB_SIZE = 500
ENCODER_MAX_LENGTH = 128  # tokens; XLM-R's position table holds pad_token_id + 1 more rows

_SUBJECTS = (
    "The cat",
    "A young engineer",
    "My neighbour",
    "The old train",
    "Every student",
    "The small robot",
    "Our team",
    "The river",
    "A quiet musician",
    "The baker",
    "The committee",
    "Her brother",
    "The café owner",
    "A naïve tourist",
    "The teacher",
    "The server",
    "Grandmother",
    "The red fox",
    "This model",
    "The pilot",
)
_VERBS = (
    "found",
    "painted",
    "counted",
    "carried",
    "built",
    "sold",
    "read",
    "cooked",
    "wrote",
    "repaired",
    "visited",
    "measured",
    "ordered",
    "forgot",
    "shared",
    "opened",
    "cleaned",
    "described",
    "moved",
    "tested",
)
_OBJECTS = (
    "the blue door",
    "three apples",
    "a long letter",
    "the broken clock",
    "twelve chairs",
    "an old map",
    "the garden gate",
    "a cup of coffee",
    "the red book",
    "two tickets",
    "the kitchen table",
    "a paper boat",
    "the new server",
    "a bowl of soup",
    "the window",
    "five candles",
    "a warm croissant",
    "the station",
    "a song",
    "the bill",
)
_ENDINGS = (
    "yesterday.",
    "on Monday morning.",
    "before 9:30 am!",
    "in 2024.",
    "at the café.",
    "for $12.50.",
    "without asking?",
    "(again).",
    "near the station; it rained.",
    "with 3 friends, quickly.",
    "in room 101.",
    "at 7 o'clock.",
    "last week...",
    "and smiled.",
    "for the 2nd time.",
    "in Tokyo (東京).",
    'and said "thanks".',
)
_EXTRA_TEXT = (
    "We drank coffee at a small café in Paris.",
    "His naïve plan was to walk 40 km in one day.",
    "日本語を少し話します。",
    "東京は日本の首都です。",
    "The résumé listed Zürich, Kraków and São Paulo.",
    "Let's celebrate! 🎉 The tests passed. 🙂",
    "Déjà vu: the piñata broke at the fiesta.",
    "Price: €19.99, or £17 — about ¥3000.",
    "Question: what is 17 + 25? Answer: 42.",
    "Lists: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "Email me at test@example.com, or call +1-555-0100.",
    "def add(a, b):\n    return a + b",
    '{"name": "jaxserve", "version": 1}',
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Über straße and naïve coöperation are spelled with diacritics.",
)


def training_corpus() -> list[str]:
    """The fixed tokenizer training corpus: 320 template sentences plus extras."""
    sentences = []
    for i in range(320):
        sentences.append(
            f"{_SUBJECTS[i % len(_SUBJECTS)]} {_VERBS[(i * 7 + i // 20) % len(_VERBS)]} "
            f"{_OBJECTS[(i * 3 + i // 40) % len(_OBJECTS)]} {_ENDINGS[(i * 11) % len(_ENDINGS)]}"
        )
    return sentences + list(_EXTRA_TEXT) * 4


@cache
def chatml_tokenizer() -> Any:
    """Train the shared byte-level BPE tokenizer and wrap it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        model_max_length=512,
    )
    hf_tok.chat_template = CHATML_TEMPLATE
    assert hf_tok.convert_tokens_to_ids([ENDOFTEXT, IM_END]) == [ENDOFTEXT_ID, IM_END_ID]
    return hf_tok


@dataclass(frozen=True)
class CorpusPieces:
    """Vocabulary candidates counted from the corpus, each list most frequent first (ties by text)."""

    chars: list[tuple[str, int]]
    words: list[tuple[str, int]]  # of two or more characters
    subwords: list[tuple[str, int]]  # word prefixes, and suffixes after ``continuation``, of 2+ characters


def _corpus_pieces(words_of: Callable[[str], list[str]], continuation: str) -> CorpusPieces:
    """Count the corpus's characters, words and subwords, the words as ``words_of`` splits each text."""

    def ranked(counts: Counter[str]) -> list[tuple[str, int]]:
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))

    words = Counter(word for text in training_corpus() for word in words_of(text))
    chars: Counter[str] = Counter()
    subwords: Counter[str] = Counter()
    for word, count in words.items():
        for char in word:
            chars[char] += count
        for i in range(1, len(word)):
            if i >= 2:
                subwords[word[:i]] += count
            if len(word) - i >= 2:
                subwords[continuation + word[i:]] += count
    for word in words:
        subwords.pop(word, None)
    long_words = Counter({word: count for word, count in words.items() if len(word) > 1})
    return CorpusPieces(ranked(chars), ranked(long_words), ranked(subwords))


@cache
def bert_tokenizer() -> Any:
    """A lowercasing BERT WordPiece tokenizer whose vocabulary is counted from the corpus: every character
    and its ``##`` continuation, the most frequent words, then frequent word prefixes and ``##`` suffixes."""
    from transformers import BertTokenizerFast

    base = BertTokenizerFast(do_lower_case=True).backend_tokenizer  # BERT's normalizer and pre-tokenizer
    pieces = _corpus_pieces(
        lambda text: [word for word, _ in base.pre_tokenizer.pre_tokenize_str(base.normalizer.normalize_str(text))],
        continuation="##",
    )
    chars = sorted(char for char, _ in pieces.chars)
    tokens = [*BERT_SPECIAL_TOKENS, *chars, *(f"##{char}" for char in chars)]
    tokens += [piece for piece, _ in pieces.words + pieces.subwords][: ENCODER_VOCAB_SIZE - len(tokens)]
    tokenizer = BertTokenizerFast(
        vocab={token: i for i, token in enumerate(tokens)}, do_lower_case=True, model_max_length=ENCODER_MAX_LENGTH
    )
    assert tokenizer.convert_tokens_to_ids(list(BERT_SPECIAL_TOKENS)) == list(range(len(BERT_SPECIAL_TOKENS)))
    return tokenizer


@cache
def xlmr_tokenizer() -> Any:
    """An XLM-R style Unigram tokenizer (``▁`` word starts, RoBERTa's specials) whose pieces are counted from
    the corpus: every character, the most frequent words, then frequent word prefixes and suffixes. Scores are
    log frequencies, lowered by 5 for subwords and by 10 for characters so that known words stay whole."""
    from transformers import XLMRobertaTokenizerFast

    base = XLMRobertaTokenizerFast().backend_tokenizer  # XLM-R's whitespace + metaspace pre-tokenizer
    pieces = _corpus_pieces(lambda text: [word for word, _ in base.pre_tokenizer.pre_tokenize_str(text)], "")
    total = sum(count for _, count in pieces.chars)
    scored = [
        (piece, round(math.log(count / total) - penalty, 6))
        for group, penalty in ((pieces.chars, 10.0), (pieces.words, 0.0), (pieces.subwords, 5.0))
        for piece, count in group
    ]
    n_free = ENCODER_VOCAB_SIZE - len(XLMR_SPECIAL_TOKENS) - len(pieces.chars)
    scored = scored[: len(pieces.chars) + n_free]  # every character, then words, then subwords
    vocab = [(token, 0.0) for token in XLMR_SPECIAL_TOKENS] + sorted(scored, key=lambda p: (-p[1], p[0]))
    tokenizer = XLMRobertaTokenizerFast(vocab=vocab, model_max_length=ENCODER_MAX_LENGTH)
    assert tokenizer.convert_tokens_to_ids(list(XLMR_SPECIAL_TOKENS)) == list(range(len(XLMR_SPECIAL_TOKENS)))
    return tokenizer


TOKENIZERS: dict[str, Callable[[], Any]] = {"chatml": chatml_tokenizer, "bert": bert_tokenizer, "xlmr": xlmr_tokenizer}


def tokenizer_spec(kind: str) -> dict[str, Any]:
    """What a tokenizer depends on (hashed into the stamp)."""
    spec: dict[str, Any] = {"kind": kind, "corpus": training_corpus()}
    if kind == "chatml":
        return spec | {
            "vocab_size": TOKENIZER_VOCAB_SIZE,
            "special_tokens": SPECIAL_TOKENS,
            "template": CHATML_TEMPLATE,
        }
    special = BERT_SPECIAL_TOKENS if kind == "bert" else XLMR_SPECIAL_TOKENS
    return spec | {"vocab_size": ENCODER_VOCAB_SIZE, "special_tokens": special, "max_length": ENCODER_MAX_LENGTH}


def padded_vocab_size(tokenizer_vocab: int) -> int:
    """Round the tokenizer's vocabulary up to a multiple of ``VOCAB_MULTIPLE``."""
    return -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _init_weights(module: Any, seed: int, n_tokens: int | None = None) -> None:
    """Overwrite every parameter with seeded, scaled noise (see module docstring)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            param.copy_(_noise(name, tuple(param.shape), generator))
            if n_tokens is not None and name.endswith(("embed_tokens.weight", "lm_head.weight")):
                param[n_tokens:] = 0.0


def _noise(name: str, shape: tuple[int, ...], generator: Any) -> Any:
    """Seeded noise for one tensor: ``1 + NORM_STD * randn`` for norm weights, ``BIAS_STD * randn`` for biases and
    ``INIT_STD * randn`` for everything else."""
    import torch

    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if name.lower().endswith("norm.weight"):
        return 1.0 + NORM_STD * noise
    if name.endswith(".bias"):
        return BIAS_STD * noise
    return INIT_STD * noise


def _decorrelate_encoder(model: Any) -> None:
    """Keep a random encoder's outputs input-dependent. Position and token-type embeddings are shared by every
    input, so they are scaled down to ``POSITION_EMBEDDING_SCALE``; and each FFN output row is centred, since
    GELU's positive mean otherwise adds one common vector to every token of every input."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("position_embeddings.weight", "token_type_embeddings.weight")):
                param.mul_(POSITION_EMBEDDING_SCALE)
            elif re.search(r"layer\.\d+\.(output\.dense|ffn\.lin2)\.weight$", name):  # the FFN's down projection
                param.sub_(param.mean(dim=1, keepdim=True))


def _label_config(labels: Sequence[str]) -> dict[str, Any]:
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


DECODER_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 512,
    "initializer_range": INIT_STD,
    "bos_token_id": None,
    "eos_token_id": IM_END_ID,
    "pad_token_id": ENDOFTEXT_ID,
    "dtype": "float32",
}


@dataclass(frozen=True)
class DecoderBuilder:
    """A tiny decoder-only transformers model -- a causal LM, or a sequence classifier when ``generation`` is
    None -- on the ChatML tokenizer: HF config/model classes plus overrides of the common shape."""

    model_class: str
    config_class: str
    seed: int
    config: dict[str, Any]
    generation: dict[str, Any] | None = field(default_factory=dict)
    max_shard_size: str | None = None

    @property
    def is_causal_lm(self) -> bool:
        return self.model_class.endswith("ForCausalLM")

    def spec(self) -> dict[str, Any]:
        """Everything the built folder depends on (hashed into the stamp)."""
        return {
            "model_class": self.model_class,
            "config_class": self.config_class,
            "seed": self.seed,
            "config": self.config,
            "defaults": DECODER_DEFAULTS,
            "generation": self.generation,
            "max_shard_size": self.max_shard_size,
            "init": {"std": INIT_STD, "norm_std": NORM_STD, "bias_std": BIAS_STD},
            "tokenizer": tokenizer_spec("chatml"),
        }

    def build(self, folder: Path) -> None:
        """Write config, weights, generation config (causal LMs) and tokenizer into ``folder``."""
        import torch
        import transformers

        tokenizer = chatml_tokenizer()
        n_tokens = len(tokenizer)
        vocab_size = padded_vocab_size(n_tokens)
        assert vocab_size > n_tokens, "expected unused vocabulary rows"
        config = getattr(transformers, self.config_class)(
            **DECODER_DEFAULTS | {"vocab_size": vocab_size, "architectures": [self.model_class]} | self.config
        )
        model = getattr(transformers, self.model_class)(config).to(torch.float32).eval()
        _init_weights(model, self.seed, n_tokens)
        model.save_pretrained(folder, max_shard_size=self.max_shard_size or "50GB")
        if self.generation is not None:
            transformers.GenerationConfig(
                **{"bos_token_id": None, "eos_token_id": IM_END_ID, "pad_token_id": ENDOFTEXT_ID} | self.generation
            ).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    def stats(self, folder: Path) -> dict[str, float]:
        """``--check`` statistics of the built folder."""
        if not self.is_causal_lm:
            return classifier_stats(folder)
        stats = asdict(greedy_stats(folder))
        return {key: float(value) for key, value in stats.items() if key != "continuations"}


ENCODER_DEFAULTS: dict[str, dict[str, Any]] = {
    "bert": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": ENCODER_MAX_LENGTH,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    },
    "xlmr": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": ENCODER_MAX_LENGTH + 2,  # positions start at pad_token_id + 1
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    },
}


@dataclass(frozen=True)
class SentenceTransformerSpec:
    """The sentence-transformers pipeline around an encoder: Transformer -> Pooling -> (Dense) -> Normalize."""

    pooling: str  # "mean" or "cls"
    max_seq_length: int
    dense_out: int | None = None  # a Tanh Dense layer hidden -> dense_out
    prompts: dict[str, str] = field(default_factory=dict)
    legacy_files: bool = False  # Pooling / sentence_bert configs as sentence-transformers 2.x wrote them


@dataclass(frozen=True)
class EncoderBuilder:
    """A tiny BERT / XLM-R encoder (HF model class + config overrides), optionally saved as a
    SentenceTransformer, optionally with BGE-M3's ColBERT and sparse heads."""

    model_class: str
    config_class: str
    tokenizer: str  # "bert" or "xlmr"
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    sentence_transformer: SentenceTransformerSpec | None = None
    bge_m3_heads: bool = False

    def spec(self) -> dict[str, Any]:
        """Everything the built folder depends on (hashed into the stamp)."""
        return {
            "model_class": self.model_class,
            "config_class": self.config_class,
            "seed": self.seed,
            "config": self.config,
            "defaults": ENCODER_DEFAULTS[self.tokenizer],
            "sentence_transformer": repr(self.sentence_transformer),
            "bge_m3_heads": self.bge_m3_heads,
            "init": {"std": INIT_STD, "norm_std": NORM_STD, "bias_std": BIAS_STD, "position": POSITION_EMBEDDING_SCALE},
            "tokenizer": tokenizer_spec(self.tokenizer),
        }

    def build(self, folder: Path) -> None:
        """Write config, weights, tokenizer and (for sentence-transformers models) the ST files into ``folder``."""
        import torch
        import transformers

        tokenizer = TOKENIZERS[self.tokenizer]()
        config = getattr(transformers, self.config_class)(
            **ENCODER_DEFAULTS[self.tokenizer]
            | {
                "vocab_size": len(tokenizer),
                "initializer_range": INIT_STD,
                "dtype": "float32",
                "architectures": [self.model_class],
            }
            | self.config
        )
        model = getattr(transformers, self.model_class)(config).to(torch.float32).eval()
        _init_weights(model, self.seed)
        _decorrelate_encoder(model)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if self.sentence_transformer is not None:
            self._save_sentence_transformer(folder, config.hidden_size)
        if self.bge_m3_heads:
            hidden = config.hidden_size
            heads = {"colbert_linear": torch.nn.Linear(hidden, hidden), "sparse_linear": torch.nn.Linear(hidden, 1)}
            _init_weights(torch.nn.ModuleDict(heads), self.seed + 1000)
            # the encoder's states share a large common component; centre the sparse head on the corpus so that
            # about half the tokens get a nonzero weight instead of almost none
            sparse = heads["sparse_linear"]
            with torch.no_grad():
                batch = tokenizer(training_corpus()[:64], padding=True, return_tensors="pt")
                states = model(**batch).last_hidden_state[batch["attention_mask"].bool()]
                sparse.bias.copy_(-(states @ sparse.weight.T).median().reshape(1))
            for name, head in heads.items():
                torch.save(head.state_dict(), folder / f"{name}.pt")

    def _save_sentence_transformer(self, folder: Path, hidden: int) -> None:
        """Wrap the saved HF folder in sentence-transformers modules and save them over it."""
        import torch
        from sentence_transformers import SentenceTransformer

        try:
            from sentence_transformers.sentence_transformer import modules
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers import models as modules

        st = self.sentence_transformer
        assert st is not None
        pipeline = [
            modules.Transformer(str(folder), max_seq_length=st.max_seq_length),
            modules.Pooling(hidden, pooling_mode=st.pooling),
        ]
        if st.dense_out is not None:
            dense = modules.Dense(hidden, st.dense_out, bias=True, activation_function=torch.nn.Tanh())
            _init_weights(dense, self.seed + 1000)
            pipeline.append(dense)
        pipeline.append(modules.Normalize())
        model = SentenceTransformer(modules=pipeline, prompts=st.prompts, default_prompt_name=None, device="cpu")
        model.save(str(folder), create_model_card=False)
        st_config = _read_json(folder / "config_sentence_transformers.json")
        # sentence-transformers >= 5 keeps max_seq_length in the tokenizer config only; older releases (and the
        # checkpoints on the Hub) read it from sentence_bert_config.json, as do other consumers
        bert_config = {"max_seq_length": st.max_seq_length, "do_lower_case": False}
        if not st.legacy_files:
            # only the prompts asked for (sentence-transformers 6 adds empty "query" / "document" ones)
            _write_json(folder / "config_sentence_transformers.json", st_config | {"prompts": st.prompts})
            _write_json(
                folder / "sentence_bert_config.json", _read_json(folder / "sentence_bert_config.json") | bert_config
            )
            return
        # as sentence-transformers 2.x wrote them (BAAI/bge-m3's files)
        _write_json(folder / "config_sentence_transformers.json", {"__version__": st_config["__version__"]})
        _write_json(folder / "sentence_bert_config.json", bert_config)
        modules_json = _read_json(folder / "modules.json")
        for module in modules_json:
            module["type"] = "sentence_transformers.models." + module["type"].rsplit(".", 1)[-1]
            if module["type"].endswith(".Pooling"):
                flags = {
                    f"pooling_mode_{flag}": flag == _LEGACY_POOLING_FLAGS[st.pooling] for flag in _LEGACY_POOLING_ORDER
                }
                _write_json(folder / module["path"] / "config.json", {"word_embedding_dimension": hidden} | flags)
        _write_json(folder / "modules.json", modules_json)

    def stats(self, folder: Path) -> dict[str, float]:
        """``--check`` statistics of the built folder."""
        if self.sentence_transformer is not None:
            return embedding_stats(folder)
        if self.config.get("num_labels", 2) == 1:
            return cross_encoder_stats(folder)
        return classifier_stats(folder)


# sentence-transformers 2.x Pooling config flags, in the order it wrote them
_LEGACY_POOLING_ORDER = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
_LEGACY_POOLING_FLAGS = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens"}


SPM_VOCAB_SIZE = 400
SPM_USER_SYMBOLS = ["<|im_start|>", "<|im_end|>"]
INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForRewardModel",
}


def _write_internlm2_sentencepiece(folder: Path) -> int:
    """A SentencePiece BPE model (byte fallback, <unk> <s> </s> first, the ChatML markers as user-defined pieces)
    saved as `tokenizer.model`, with a tokenizer_config.json whose tokenizer is remote code; returns its size."""
    import tempfile

    import sentencepiece

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(training_corpus()))
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "m"), vocab_size=SPM_VOCAB_SIZE, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            user_defined_symbols=SPM_USER_SYMBOLS, split_digits=True, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
        )  # fmt: skip
        (folder / "tokenizer.model").write_bytes((Path(tmp) / "m.model").read_bytes())
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    added = {
        str(3 + i): {"content": piece, "special": True, "normalized": False}  # after <unk> <s> </s>
        for i, piece in enumerate(SPM_USER_SYMBOLS)
    }
    _write_json(
        folder / "tokenizer_config.json",
        specials
        | {
            "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
            "tokenizer_class": "InternLM2Tokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": added,
            "chat_template": CHATML_TEMPLATE,
            "model_max_length": 1000000000000000019884624838656,
        },
    )
    return SPM_VOCAB_SIZE


INTERNLM2_CONFIG: dict[str, Any] = {
    "architectures": ["InternLM2ForRewardModel"],
    "model_type": "internlm2",
    **{
        key: DECODER_DEFAULTS[key]
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "max_position_embeddings",
            "initializer_range",
            "eos_token_id",
            "pad_token_id",
        )
    },
    "bos_token_id": ENDOFTEXT_ID,  # as in Qwen's configs: not added by the tokenizer
    "hidden_act": "silu",
    "rope_theta": 10000,
    "rope_scaling": None,
    "bias": False,
    "tie_word_embeddings": False,
    "attn_implementation": "eager",
    "torch_dtype": "float32",
    "use_cache": True,
}


def pack_wqkv(q: Any, k: Any, v: Any, num_kv_heads: int) -> Any:
    """InternLM2's ``wqkv`` from HF-layout q [H*D, h], k and v [KV*D, h] (numpy): for each KV head in turn its
    query heads, then its key head, then its value head."""
    import numpy as np

    hidden, head_dim = q.shape[1], k.shape[0] // num_kv_heads
    groups = [
        q.reshape(num_kv_heads, -1, head_dim, hidden),
        k.reshape(num_kv_heads, 1, head_dim, hidden),
        v.reshape(num_kv_heads, 1, head_dim, hidden),
    ]
    return np.concatenate(groups, axis=1).reshape(-1, hidden)


def unpack_wqkv(wqkv: Any, num_heads: int, num_kv_heads: int) -> tuple[Any, Any, Any]:
    """The inverse of :func:`pack_wqkv`: HF-layout (q, k, v) projection weights."""
    hidden = wqkv.shape[1]
    group = num_heads // num_kv_heads
    head_dim = wqkv.shape[0] // (num_heads + 2 * num_kv_heads)
    w = wqkv.reshape(num_kv_heads, group + 2, head_dim, hidden)
    return (
        w[:, :group].reshape(num_heads * head_dim, hidden),
        w[:, group].reshape(num_kv_heads * head_dim, hidden),
        w[:, group + 1].reshape(num_kv_heads * head_dim, hidden),
    )


@dataclass(frozen=True)
class InternLM2RewardBuilder:
    """A hand-written InternLM2ForRewardModel folder (the architecture is remote code, not in transformers).
    With `published_layout`, laid out as `internlm/internlm2-1_8b-reward` is: `auto_map` entries pointing at remote
    code in config.json and tokenizer_config.json, and only a SentencePiece `tokenizer.model` (BOS added, no EOS),
    which only the remote code's InternLM2Tokenizer reads."""

    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    published_layout: bool = False

    def spec(self) -> dict[str, Any]:
        tokenizer = {"kind": "sentencepiece", "corpus": training_corpus(), "vocab_size": SPM_VOCAB_SIZE}
        return {
            "seed": self.seed,
            "config": INTERNLM2_CONFIG | self.config,
            "init": {"std": INIT_STD, "norm_std": NORM_STD},
            "tokenizer": tokenizer if self.published_layout else tokenizer_spec("chatml"),
            "published_layout": self.published_layout,
        }

    def tensor_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
        head_dim = h // config["num_attention_heads"]
        qkv_rows = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
        shapes = {"model.tok_embeddings.weight": (v, h), "model.norm.weight": (h,), "v_head.weight": (1, h)}
        for n in range(config["num_hidden_layers"]):
            p = f"model.layers.{n}."
            shapes |= {
                p + "attention.wqkv.weight": (qkv_rows, h),
                p + "attention.wo.weight": (h, config["num_attention_heads"] * head_dim),
                p + "feed_forward.w1.weight": (i, h),
                p + "feed_forward.w3.weight": (i, h),
                p + "feed_forward.w2.weight": (h, i),
                p + "attention_norm.weight": (h,),
                p + "ffn_norm.weight": (h,),
            }
        return shapes

    def build(self, folder: Path) -> None:
        import torch
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        if self.published_layout:
            n_tokens = _write_internlm2_sentencepiece(folder)
            config = INTERNLM2_CONFIG | {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
            config |= {"auto_map": INTERNLM2_AUTO_MAP, "vocab_size": padded_vocab_size(n_tokens)} | self.config
        else:
            tokenizer = chatml_tokenizer()
            n_tokens = len(tokenizer)
            config = INTERNLM2_CONFIG | {"vocab_size": padded_vocab_size(n_tokens)} | self.config
            tokenizer.save_pretrained(folder)
        generator = torch.Generator().manual_seed(self.seed)
        tensors = {name: _noise(name, shape, generator) for name, shape in sorted(self.tensor_shapes(config).items())}
        tensors["model.tok_embeddings.weight"][n_tokens:] = 0.0
        _write_json(folder / "config.json", config)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    def stats(self, folder: Path) -> dict[str, float]:
        """``--check`` statistics of the built folder."""
        return reward_stats(folder)


BUILDERS: dict[str, DecoderBuilder | EncoderBuilder | InternLM2RewardBuilder] = {
    "tiny-llama": DecoderBuilder(
        model_class="LlamaForCausalLM",
        config_class="LlamaConfig",
        seed=1,
        config={
            "tie_word_embeddings": False,
            "attention_bias": False,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        },
        generation={"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1},
    ),
    "tiny-mistral": DecoderBuilder(
        model_class="MistralForCausalLM",
        config_class="MistralConfig",
        seed=2,
        config={"tie_word_embeddings": False, "sliding_window": 32},
        max_shard_size="200KB",
    ),
    "tiny-qwen2": DecoderBuilder(
        model_class="Qwen2ForCausalLM",
        config_class="Qwen2Config",
        seed=3,
        config={"tie_word_embeddings": True, "use_sliding_window": False},
        generation={"eos_token_id": [IM_END_ID, ENDOFTEXT_ID]},
    ),
    "tiny-qwen3": DecoderBuilder(
        model_class="Qwen3ForCausalLM",
        config_class="Qwen3Config",
        seed=4,
        config={"tie_word_embeddings": True, "use_sliding_window": False, "head_dim": 32},
    ),
    "tiny-bert-mean": EncoderBuilder(
        model_class="BertModel",
        config_class="BertConfig",
        tokenizer="bert",
        seed=11,
        sentence_transformer=SentenceTransformerSpec(
            pooling="mean", max_seq_length=64, prompts={"query": "query: ", "passage": "passage: "}
        ),
    ),
    "tiny-bert-cls-dense": EncoderBuilder(
        model_class="BertModel",
        config_class="BertConfig",
        tokenizer="bert",
        seed=12,
        sentence_transformer=SentenceTransformerSpec(pooling="cls", max_seq_length=64, dense_out=24),
    ),
    "tiny-bert-matryoshka": EncoderBuilder(
        model_class="BertModel",
        config_class="BertConfig",
        tokenizer="bert",
        seed=13,
        config={"hidden_size": 64, "intermediate_size": 128, "matryoshka_dimensions": [16, 32, 64]},
        sentence_transformer=SentenceTransformerSpec(pooling="mean", max_seq_length=64),
    ),
    "tiny-xlmr-cross-encoder": EncoderBuilder(
        model_class="XLMRobertaForSequenceClassification",
        config_class="XLMRobertaConfig",
        tokenizer="xlmr",
        seed=14,
        config={"num_labels": 1},
    ),
    "tiny-bert-classifier": EncoderBuilder(
        model_class="BertForSequenceClassification",
        config_class="BertConfig",
        tokenizer="bert",
        seed=15,
        config=_label_config(["negative", "neutral", "positive"]) | {"problem_type": "single_label_classification"},
    ),
    "tiny-distilbert-sst2": EncoderBuilder(
        model_class="DistilBertForSequenceClassification",
        config_class="DistilBertConfig",
        tokenizer="bert",
        seed=20,
        config=_label_config(["NEGATIVE", "POSITIVE"]) | {"hidden_dim": 64, "activation": "gelu"},
    ),
    "tiny-bert-ner": EncoderBuilder(
        model_class="BertForTokenClassification",
        config_class="BertConfig",
        tokenizer="bert",
        seed=19,
        config=_label_config(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]),
    ),
    "tiny-qwen2-classifier": DecoderBuilder(
        model_class="Qwen2ForSequenceClassification",
        config_class="Qwen2Config",
        seed=16,
        config=_label_config(["no", "yes"]) | {"tie_word_embeddings": False, "use_sliding_window": False},
        generation=None,
    ),
    "tiny-internlm2-reward": InternLM2RewardBuilder(seed=17),
    "tiny-internlm2-reward-published": InternLM2RewardBuilder(seed=21, published_layout=True),
    "tiny-bge-m3": EncoderBuilder(
        model_class="XLMRobertaModel",
        config_class="XLMRobertaConfig",
        tokenizer="xlmr",
        seed=18,
        sentence_transformer=SentenceTransformerSpec(
            pooling="cls", max_seq_length=ENCODER_MAX_LENGTH, legacy_files=True
        ),
        bge_m3_heads=True,
    ),
}
DECODERS = [name for name, b in BUILDERS.items() if isinstance(b, DecoderBuilder) and b.is_causal_lm]
POOLING_MODELS = [name for name in BUILDERS if name not in DECODERS]


def _stamp(builder: Any) -> str:
    payload = json.dumps(builder.spec(), sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(payload + Path(__file__).read_bytes()).hexdigest()


def _is_complete(folder: Path, stamp: str) -> bool:
    stamp_path = folder / STAMP_FILE
    return stamp_path.is_file() and stamp_path.read_text().strip() == stamp


def build_test_models(out_dir: Path, names: Iterable[str] | None = None) -> dict[str, Path]:
    """Build (or reuse) the named test model folders under ``out_dir``.

    ``names`` defaults to every registered builder. Returns ``{name: folder}``.
    """
    out_dir = Path(out_dir)
    selected = list(BUILDERS) if names is None else list(names)
    unknown = sorted(set(selected) - set(BUILDERS))
    if unknown:
        raise KeyError(f"unknown test models {unknown}; known: {sorted(BUILDERS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in selected:
        builder, folder = BUILDERS[name], out_dir / name
        stamp = _stamp(builder)
        if not _is_complete(folder, stamp):
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
            try:
                os.chmod(tmp, 0o755)  # mkdtemp creates it private
                builder.build(tmp)
                (tmp / STAMP_FILE).write_text(stamp + "\n")
                if not _is_complete(folder, stamp):  # else a concurrent build finished first
                    shutil.rmtree(folder, ignore_errors=True)
                    try:
                        tmp.rename(folder)
                    except OSError:  # lost the race to a concurrent build
                        if not _is_complete(folder, stamp):
                            raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        paths[name] = folder
    return paths


def internlm2_reward_reference(folder: Path, token_ids: list[int]) -> Any:
    """Per-token rewards [n_tokens] (numpy float32) of a ``tiny-internlm2-reward`` style folder: its weights
    unpacked into a float32 ``transformers.LlamaModel`` of the same shape, then ``v_head`` on every position."""
    import numpy as np
    import torch
    import transformers
    from safetensors.numpy import load_file

    config = _read_json(Path(folder) / "config.json")
    weights = load_file(Path(folder) / "model.safetensors")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    llama_config = transformers.LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_act=config["hidden_act"],
        rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": float(config["rope_theta"])},
        attention_bias=config["bias"],
        mlp_bias=False,
        pad_token_id=config["pad_token_id"],
        dtype="float32",
    )
    state = {"embed_tokens.weight": weights["model.tok_embeddings.weight"], "norm.weight": weights["model.norm.weight"]}
    for n in range(config["num_hidden_layers"]):
        src, dst = f"model.layers.{n}.", f"layers.{n}."
        q, k, v = unpack_wqkv(weights[src + "attention.wqkv.weight"], heads, kv_heads)
        state |= {
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": weights[src + "attention.wo.weight"],
            dst + "mlp.gate_proj.weight": weights[src + "feed_forward.w1.weight"],
            dst + "mlp.up_proj.weight": weights[src + "feed_forward.w3.weight"],
            dst + "mlp.down_proj.weight": weights[src + "feed_forward.w2.weight"],
            dst + "input_layernorm.weight": weights[src + "attention_norm.weight"],
            dst + "post_attention_layernorm.weight": weights[src + "ffn_norm.weight"],
        }
    model = transformers.LlamaModel(llama_config).to(torch.float32).eval()
    model.load_state_dict({name: torch.from_numpy(np.ascontiguousarray(w)) for name, w in state.items()}, strict=True)
    with torch.no_grad():
        hidden = model(torch.tensor([list(token_ids)])).last_hidden_state[0]
        rewards = hidden @ torch.from_numpy(weights["v_head.weight"]).T
    return rewards[:, 0].numpy()


def bge_m3_reference(folder: Path, texts: Sequence[str]) -> dict[str, Any]:
    """BGE-M3's three outputs for ``texts`` (numpy float32, torch + transformers, as FlagEmbedding computes them):

    * ``dense``    [n_texts, hidden]: the normalised last hidden state of ``<s>``;
    * ``colbert``  one [n_tokens - 1, hidden] array per text: ``colbert_linear`` of every real token after
                   ``<s>`` (``</s>`` included), normalised;
    * ``sparse``   one [n_tokens] array per text: ``relu(sparse_linear(hidden))`` of every real token;
    * ``input_ids`` the token ids of each text (to map sparse weights to tokens).
    """
    import torch
    import transformers

    folder = Path(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    hidden = model.config.hidden_size
    colbert, sparse = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, 1)
    colbert.load_state_dict(torch.load(folder / "colbert_linear.pt", map_location="cpu", weights_only=True))
    sparse.load_state_dict(torch.load(folder / "sparse_linear.pt", map_location="cpu", weights_only=True))
    tokenizer.padding_side = "right"  # real tokens first in every row
    batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    with torch.no_grad():
        last = model(**batch).last_hidden_state
        dense = torch.nn.functional.normalize(last[:, 0], dim=-1)
        colbert_vecs = torch.nn.functional.normalize(colbert(last[:, 1:]), dim=-1)
        sparse_weights = torch.relu(sparse(last))[..., 0]
    return {
        "dense": dense.numpy(),
        "colbert": [colbert_vecs[i, : n - 1].numpy() for i, n in enumerate(lengths)],
        "sparse": [sparse_weights[i, :n].numpy() for i, n in enumerate(lengths)],
        "input_ids": [batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)],
    }


CHECK_PROMPTS = (
    "The cat found the blue door",
    "Hello, world! How are you today?",
    "日本語を少し話します。",
    "Question: what is 17 + 25?",
    "We drank coffee at a small café in Paris.",
    "def add(a, b):",
    "Let's celebrate! 🎉",
    "Price: €19.99, or £17",
)


@dataclass
class GreedyStats:
    """Float32 HF statistics of one model over ``CHECK_PROMPTS``."""

    min_logit_std: float  # smallest std across the vocab of a prompt's next-token logits
    min_top2_gap: float  # smallest top-1 minus top-2 logit over all greedy steps
    median_top2_gap: float
    min_distinct_tokens: int  # fewest distinct ids among one prompt's greedy tokens
    n_distinct_continuations: int
    max_abs_logit: float  # largest |logit| seen, over the 80-token stress sequence too
    continuations: list[list[int]]


def greedy_stats(folder: Path, max_new_tokens: int = 32) -> GreedyStats:
    """Greedy-decode ``CHECK_PROMPTS`` with HF in float32 and summarise the logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    n_tokens = len(tokenizer)
    logit_stds, gaps, continuations, max_abs = [], [], [], 0.0
    with torch.no_grad():
        for prompt in CHECK_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            new: list[int] = []
            for step in range(max_new_tokens):
                logits = model(ids).logits[0, -1]
                if step == 0:
                    logit_stds.append(logits[:n_tokens].std().item())
                max_abs = max(max_abs, logits.abs().max().item())
                top2 = logits.topk(2).values
                gaps.append((top2[0] - top2[1]).item())
                next_id = int(logits.argmax())
                new.append(next_id)
                ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
            continuations.append(new)
        long_ids = torch.arange(80).remainder(n_tokens - 3).add(3).unsqueeze(0)
        long_logits = model(long_ids).logits
        if not torch.isfinite(long_logits).all():
            raise ValueError(f"{folder}: non-finite logits on an 80-token sequence")
        max_abs = max(max_abs, long_logits.abs().max().item())
    return GreedyStats(
        min_logit_std=min(logit_stds),
        min_top2_gap=min(gaps),
        median_top2_gap=sorted(gaps)[len(gaps) // 2],
        min_distinct_tokens=min(len(set(c)) for c in continuations),
        n_distinct_continuations=len({tuple(c) for c in continuations}),
        max_abs_logit=max_abs,
        continuations=continuations,
    )


def _cosine_stats(embeddings: Any, prefix: str = "") -> dict[str, float]:
    """Largest and mean pairwise cosine similarity of different rows."""
    import numpy as np

    unit = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
    cos = unit @ unit.T
    off_diagonal = cos[~np.eye(len(cos), dtype=bool)]
    return {f"{prefix}max_cos": float(off_diagonal.max()), f"{prefix}mean_cos": float(off_diagonal.mean())}


def _spread_stats(logits: Any, prefix: str = "") -> dict[str, float]:
    """For [n_inputs, n_outputs] scores: the smallest per-output range across inputs and the largest |score|."""
    import numpy as np

    logits = np.asarray(logits).reshape(len(logits), -1)
    return {
        f"{prefix}min_spread": float((logits.max(axis=0) - logits.min(axis=0)).min()),
        f"{prefix}max_abs": float(np.abs(logits).max()),
    }


def embedding_stats(folder: Path) -> dict[str, float]:
    """Pairwise cosines of ``CHECK_PROMPTS`` embedded by sentence-transformers (plus the first Matryoshka cut,
    the ``query`` prompt and BGE-M3's sparse / ColBERT heads where the folder has them)."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    embeddings = model.encode(list(CHECK_PROMPTS), convert_to_numpy=True)
    stats = _cosine_stats(embeddings) | {"dim": float(embeddings.shape[1])}
    dims = getattr(model[0].auto_model.config, "matryoshka_dimensions", None)
    if dims:
        stats |= _cosine_stats(embeddings[:, : min(dims)], prefix=f"dim{min(dims)}_")
    if model.prompts.get("query"):
        queries = model.encode(list(CHECK_PROMPTS), prompt_name="query", convert_to_numpy=True)
        stats["min_query_vs_plain_distance"] = float(np.linalg.norm(queries - embeddings, axis=-1).min())
    if (folder / "sparse_linear.pt").is_file():
        reference = bge_m3_reference(folder, CHECK_PROMPTS)
        assert np.allclose(reference["dense"], embeddings, atol=1e-5), "bge_m3_reference disagrees with ST"
        sparse = np.concatenate(reference["sparse"])
        stats |= {"sparse_max": float(sparse.max()), "sparse_nonzero_frac": float((sparse > 0).mean())}
        stats |= _cosine_stats(np.concatenate(reference["colbert"]), prefix="colbert_")
    return stats


def cross_encoder_stats(folder: Path) -> dict[str, float]:
    """The spread of CrossEncoder scores (sigmoid) and raw logits of one query against ``CHECK_PROMPTS``."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(folder), device="cpu")
    pairs = [("what is the price of coffee in Paris?", text) for text in CHECK_PROMPTS]
    return _spread_stats(model.predict(pairs), prefix="score_") | _spread_stats(
        model.predict(pairs, activation_fn=_identity()), prefix="logit_"
    )


def _identity() -> Any:
    import torch

    return torch.nn.Identity()


def classifier_stats(folder: Path) -> dict[str, float]:
    """The spread of ``AutoModelForSequenceClassification`` logits over ``CHECK_PROMPTS`` and how many labels win."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**tokenizer(list(CHECK_PROMPTS), padding=True, return_tensors="pt")).logits.numpy()
    return _spread_stats(logits) | {"distinct_argmax": float(len(set(logits.argmax(axis=1).tolist())))}


def reward_stats(folder: Path) -> dict[str, float]:
    """The spread of ``internlm2_reward_reference``'s last-token rewards over ``CHECK_PROMPTS``."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rewards = [internlm2_reward_reference(folder, tokenizer(p).input_ids) for p in CHECK_PROMPTS]
    stats = _spread_stats(np.array([r[-1] for r in rewards]), prefix="last_")
    all_rewards = np.concatenate(rewards)
    return stats | {"token_std": float(all_rewards.std()), "token_max_abs": float(np.abs(all_rewards).max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--only", nargs="+", choices=sorted(BUILDERS), metavar="NAME")
    parser.add_argument("--check", action="store_true", help="print HF float32 logit / embedding statistics")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers loads
    paths = build_test_models(args.out_dir, args.only)
    for name, folder in paths.items():
        print(f"{name}: {folder}")
        if not args.check:
            continue
        if name in DECODERS:
            stats = greedy_stats(folder)
            print(
                f"  logit std >= {stats.min_logit_std:.3f}, top-2 gap min {stats.min_top2_gap:.2e}"
                f" median {stats.median_top2_gap:.3f}, distinct continuations"
                f" {stats.n_distinct_continuations}/{len(CHECK_PROMPTS)}, distinct tokens per"
                f" continuation >= {stats.min_distinct_tokens},"
                f" max |logit| {stats.max_abs_logit:.2f}"
            )
        else:
            print("  " + ", ".join(f"{key} {value:.3f}" for key, value in BUILDERS[name].stats(folder).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
