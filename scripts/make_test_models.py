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
* ``tiny-gemma``   GemmaForCausalLM (norms scaled by 1 + w, embeddings by sqrt(hidden), GeGLU), ``head_dim`` 32:
                   bge-reranker-v2-gemma's architecture.
* ``tiny-gemma3``  Gemma3ForCausalLM (text): Gemma 2's layout with Q/K norms and no soft caps; layer 0 slides
                   (16 tokens, RoPE base 10k), layer 1 is global (base 1M with linear scaling x2).
* ``tiny-gemma2``  Gemma2ForCausalLM: sandwich norms, GeGLU, a 16-token sliding window on layer 0
                   (layer 1 full), attention and final logits soft-capped (at 20 and 30, low enough to
                   bite), ``query_pre_attn_scalar`` 24.
* ``tiny-mixtral`` MixtralForCausalLM: 8 experts (intermediate 32), top-2 renormalised, untied; saved as
                   transformers writes it, each expert apart (``block_sparse_moe.experts.N.w1/w2/w3``).
* ``tiny-qwen2-moe`` Qwen2MoeForCausalLM: 8 experts (intermediate 32), top-2 not renormalised, a shared expert
                   (intermediate 64) behind its sigmoid gate, layer 1 dense (``mlp_only_layers``), q/k/v biases.
* ``tiny-qwen3-moe`` Qwen3MoeForCausalLM: 8 experts (intermediate 32), top-4 renormalised (``norm_topk_prob``),
                   q/k norms, ``head_dim`` 32.
* ``tiny-phi3``    Phi3ForCausalLM as Phi-3.5-mini / Phi-4-mini lay it out: packed ``qkv_proj`` and
                   ``gate_up_proj``, longrope with short and long factors, ``original_max_position_embeddings`` 32
                   of 256 positions (so prompts reach both regimes), ``partial_rotary_factor`` 0.75 at the top
                   level (12 of 16 dimensions rotate), a 48-token sliding window.
* ``tiny-gemma3-mm`` Gemma3ForConditionalGeneration (a one-layer SigLIP tower) with tiny-gemma3's text model, its
                   tensors under the published names (``language_model.model.*``, ``vision_tower.*``).
* ``tiny-granite`` GraniteForCausalLM with multipliers that bite: embeddings x4, attention scale 0.5, residual
                   branches x0.5, logits divided by 0.5.
* ``tiny-olmo2``   Olmo2ForCausalLM: norms after attention and MLP only, Q/K norms over the whole projection.
* ``tiny-smollm3`` SmolLM3ForCausalLM: layer 1 without RoPE (``no_rope_layers`` [1, 0]), tied.
* ``tiny-internlm2`` InternLM2ForCausalLM written by hand (remote code on the Hub): packed ``wqkv``, an ``output``
                   head, dynamic RoPE scaling; ``internlm2_llama_twin`` writes the same weights as a
                   ``LlamaForCausalLM`` folder, the reference HF runs.
* ``tiny-llama-yarn`` LlamaForCausalLM with yarn RoPE scaling (factor 4 over 128 original positions,
                   ``beta_fast`` 16): yarn's frequencies and attention factor end to end.

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
* ``tiny-jina-v2``            JinaBERT laid out as jinaai/jina-embeddings-v2-base-en (remote code, so written
                              by hand): ``auto_map`` to jina-bert-implementation, ALiBi (6 heads: not a power
                              of two), a GEGLU MLP, the bert tokenizer, sentence-transformers files with mean
                              pooling; ``jina_bert_reference`` runs it in torch as the published code does.
* ``tiny-deberta-v3-classifier`` DebertaV2ForSequenceClassification as the deberta-v3 NLI fine-tunes configure it
                              (relative attention with c2p and p2c, shared keys, a LayerNorm on the relative
                              embeddings, no absolute positions) but with 8 position buckets up to 32 positions,
                              so the test texts reach the log buckets and beyond; token types (2) for pairs,
                              labels entailment / neutral / contradiction, the bert tokenizer.
* ``tiny-bert-ner``           BertForTokenClassification, a label per token (O, B-PER, I-PER, B-LOC, I-LOC).
* ``tiny-modernbert-embed``   ModernBertModel as a SentenceTransformer (CLS pooling, Normalize) as
                              Alibaba-NLP/gte-modernbert-base ships it: config.json in transformers 4.4x's
                              keys (``global_rope_theta``, ``global_attn_every_n_layers``, ...), a tokenizer
                              without token types; 3 layers (global, local, local) with ``local_attention`` 8.
* ``tiny-modernbert-reranker`` ModernBertForSequenceClassification, one label, ``classifier_pooling`` mean,
                              biases on the norms, attention, MLP and head, a SiLU head activation;
                              transformers 5's config keys (``layer_types``, ``rope_parameters``).
* ``tiny-qwen2-classifier``   Qwen2ForSequenceClassification, labels no / yes, the ChatML tokenizer.
* ``tiny-qwen2-reward``       Qwen2ForRewardModel as Qwen/Qwen2.5-Math-RM-72B (remote code, so written by hand:
                              ``auto_map``, a ``transformers.Qwen2Model``'s tensors under ``model.`` and a
                              ``score`` head Linear(h, h) -> ReLU -> Linear(h, 1) with biases);
                              ``qwen2_reward_reference`` computes its per-token scores.
* ``tiny-qwen2-prm``          Qwen2ForProcessRewardModel as Qwen/Qwen2.5-Math-PRM-7B: the same with two labels,
                              and ``<extra_0>`` (its step tag, id ``PRM_STEP_TAG_ID``) added to the tokenizer.
* ``tiny-internlm2-reward``   InternLM2ForRewardModel (remote code in the real checkpoints, so written
                              by hand: InternLM2 tensor names, packed ``wqkv``, a ``v_head``);
                              ``internlm2_reward_reference`` runs it through ``transformers.LlamaModel``.
* ``tiny-internlm2-reward-published`` the same architecture laid out as ``internlm/internlm2-1_8b-reward``:
                              ``auto_map`` to remote code, only a SentencePiece ``tokenizer.model``.
* ``tiny-bge-m3``             XLMRobertaModel as a SentenceTransformer (CLS pooling, Normalize) with
                              BGE-M3's ``colbert_linear.pt`` / ``sparse_linear.pt`` heads and its
                              legacy-format ST files; ``bge_m3_reference`` computes dense / ColBERT /
                              sparse outputs.

Encoders with rotary positions, laid out as their families publish them (``auto_map`` to remote code, the
published config keys and tensor names; ``RopeEncoderBuilder``). Their weights are drawn in transformers' native
port of the family, whose config is kept in ``reference/``; ``rope_encoder_reference`` loads the published tensors
back into it:

* ``tiny-gte-new``            gte's NewModel (``model_type: new``) as Alibaba-NLP/gte-base-en-v1.5: packed
                              ``qkv_proj`` and ``up_gate_proj``, NTK rotary scaling, no token types; CLS pooling.
* ``tiny-gte-new-reranker``   NewForSequenceClassification as gte-multilingual-reranker-base: ``new.`` prefix,
                              pooler + one-label classifier, the XLM-R tokenizer.
* ``tiny-nomic-bert``         NomicBertModel as nomic-embed-text-v1.5: GPT-2 style config names, SwiGLU
                              ``fc11`` / ``fc12``, no biases, ``emb_ln``; mean pooling.
* ``tiny-jina-v3``            jina-embeddings-v3: an XLMRobertaModel config with ``position_embedding_type:
                              rotary``, every weight as ``parametrizations.weight.original`` plus five tasks'
                              LoRA factors; mean pooling.

The decoders, the Qwen2 classifier and the InternLM2 models share one byte-level BPE
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
            elif re.search(r"layers?\.\d+\.(output\.dense|ffn\.lin2|mlp\.Wo)\.weight$", name):  # FFN down projection
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
    None -- on the ChatML tokenizer: HF config/model classes plus overrides of the common shape. A multimodal
    model's ``config`` has a ``text_config``, which takes the common shape; ``published_names`` renames the saved
    tensors' prefixes to how the family's checkpoints name them."""

    model_class: str
    config_class: str
    seed: int
    config: dict[str, Any]
    generation: dict[str, Any] | None = field(default_factory=dict)
    max_shard_size: str | None = None
    published_names: tuple[tuple[str, str], ...] = ()

    @property
    def is_causal_lm(self) -> bool:
        return not self.model_class.endswith("ForSequenceClassification")

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
            "published_names": self.published_names,
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
        overrides = json.loads(json.dumps(self.config))  # a copy: config classes standardize rope_parameters in place
        shape = DECODER_DEFAULTS | {"vocab_size": vocab_size}
        if "text_config" in overrides:
            overrides["text_config"] = shape | overrides["text_config"]
        else:
            overrides = shape | overrides
        config = getattr(transformers, self.config_class)(**{"architectures": [self.model_class]} | overrides)
        model = getattr(transformers, self.model_class)(config).to(torch.float32).eval()
        _init_weights(model, self.seed, n_tokens)
        model.save_pretrained(folder, max_shard_size=self.max_shard_size or "50GB")
        if self.published_names:
            _rename_tensors(folder / "model.safetensors", self.published_names)
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


def _rename_tensors(path: Path, prefixes: tuple[tuple[str, str], ...]) -> None:
    """Rewrite a safetensors file with each tensor name's first matching prefix replaced."""
    from safetensors.numpy import load_file, save_file

    def renamed(name: str) -> str:
        return next((new + name[len(old) :] for old, new in prefixes if name.startswith(old)), name)

    save_file({renamed(name): t for name, t in load_file(path).items()}, path, metadata={"format": "pt"})


# microsoft/deberta-v3-base's attention settings, with position_buckets 256 / max_relative_positions 512 shrunk to
# 8 / 32: distances up to 4 keep their own bucket, 5 ... 31 share log buckets, and farther ones the last
DEBERTA_V3_CONFIG: dict[str, Any] = {
    "relative_attention": True,
    "pos_att_type": ["p2c", "c2p"],
    "position_buckets": 8,
    "max_relative_positions": 32,
    "share_att_key": True,
    "norm_rel_ebd": "layer_norm",
    "position_biased_input": False,
    "layer_norm_eps": 1e-7,
    "pooler_hidden_act": "gelu",
}


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
    tokenizer_inputs: tuple[str, ...] | None = None  # the tokenizer's model_input_names, if not its own
    legacy_config: bool = False  # ModernBERT's config.json as transformers 4.4x wrote it (published checkpoints)

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
            "tokenizer_inputs": self.tokenizer_inputs,
            "legacy_config": self.legacy_config,
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
        if self.tokenizer_inputs is not None:
            tokenizer_config = _read_json(folder / "tokenizer_config.json")
            inputs = {"model_input_names": list(self.tokenizer_inputs)}
            _write_json(folder / "tokenizer_config.json", tokenizer_config | inputs)
        if self.sentence_transformer is not None:
            self._save_sentence_transformer(folder, config.hidden_size)
        if self.legacy_config:
            _write_modernbert_legacy_config(folder)  # last: saving the ST pipeline rewrites config.json
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
class InternLM2Builder:
    """A hand-written InternLM2 folder (the architecture is remote code, not in transformers): an
    InternLM2ForRewardModel (`v_head`), or with `architectures` InternLM2ForCausalLM in `config` a causal LM
    (`output` head, a generation config). With `published_layout`, laid out as `internlm/internlm2-1_8b-reward` is: `auto_map` entries pointing at remote
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
        head = ("output.weight", (v, h)) if _is_internlm2_lm(config) else ("v_head.weight", (1, h))
        shapes = {"model.tok_embeddings.weight": (v, h), "model.norm.weight": (h,), head[0]: head[1]}
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
        if _is_internlm2_lm(config):
            _write_json(folder / "generation_config.json", {"eos_token_id": config["eos_token_id"]})

    def stats(self, folder: Path) -> dict[str, float]:
        """``--check`` statistics of the built folder."""
        if _is_internlm2_lm(_read_json(folder / "config.json")):
            with tempfile.TemporaryDirectory() as tmp:
                stats = asdict(greedy_stats(internlm2_llama_twin(folder, Path(tmp))))
            return {key: float(value) for key, value in stats.items() if key != "continuations"}
        return reward_stats(folder)


def _is_internlm2_lm(config: dict[str, Any]) -> bool:
    return config["architectures"] == ["InternLM2ForCausalLM"]


_JINA_CODE = "jinaai/jina-bert-implementation--"
JINA_BERT_AUTO_MAP = {
    "AutoConfig": f"{_JINA_CODE}configuration_bert.JinaBertConfig",
    "AutoModel": f"{_JINA_CODE}modeling_bert.JinaBertModel",
    "AutoModelForMaskedLM": f"{_JINA_CODE}modeling_bert.JinaBertForMaskedLM",
    "AutoModelForSequenceClassification": f"{_JINA_CODE}modeling_bert.JinaBertForSequenceClassification",
}
# config.json as jinaai/jina-embeddings-v2-base-en publishes it (architecture JinaBertForMaskedLM, 8192 positions),
# at the other encoders' size but with 6 heads of 8, so that ALiBi takes its non-power-of-two slopes
JINA_BERT_CONFIG: dict[str, Any] = {
    "architectures": ["JinaBertForMaskedLM"],
    "auto_map": JINA_BERT_AUTO_MAP,
    "model_type": "bert",
    "model_max_length": 8192,
    "attention_probs_dropout_prob": 0.0,
    "classifier_dropout": None,
    "emb_pooler": "mean",
    "feed_forward_type": "geglu",
    "gradient_checkpointing": False,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 48,
    "initializer_range": INIT_STD,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 8192,
    "num_attention_heads": 6,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "position_embedding_type": "alibi",
    "torch_dtype": "float32",
    "type_vocab_size": 2,
    "use_cache": True,
}


@dataclass(frozen=True)
class JinaBertBuilder:
    """A hand-written JinaBERT folder (remote code in the real checkpoints): config.json with ``auto_map``, the
    published tensor names (no ``bert.`` prefix, a pooler), the bert tokenizer and sentence-transformers files
    (Transformer, then mean Pooling, as jinaai/jina-embeddings-v2-* ship them)."""

    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    max_seq_length: int = ENCODER_MAX_LENGTH

    def spec(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "config": JINA_BERT_CONFIG | self.config,
            "max_seq_length": self.max_seq_length,
            "init": {"std": INIT_STD, "norm_std": NORM_STD, "bias_std": BIAS_STD, "position": POSITION_EMBEDDING_SCALE},
            "tokenizer": tokenizer_spec("bert"),
        }

    def build(self, folder: Path) -> None:
        import torch
        from safetensors.torch import save_file

        tokenizer = bert_tokenizer()
        tokenizer.save_pretrained(folder)
        config = JINA_BERT_CONFIG | {"vocab_size": len(tokenizer)} | self.config
        model = _jina_bert_torch(config)
        _init_weights(model, self.seed)
        _decorrelate_encoder(model)  # the token-type table
        with torch.no_grad():  # and the GLU's down projection, centred as the other encoders' FFN outputs
            for name, param in model.named_parameters():
                if name.endswith("mlp.wo.weight"):
                    param.sub_(param.mean(dim=1, keepdim=True))
        tensors = {name: param.detach().contiguous() for name, param in model.named_parameters()}
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        _write_json(folder / "config.json", config)
        modules = [("Transformer", ""), ("Pooling", "1_Pooling")]
        _write_json(
            folder / "modules.json",
            [
                {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
                for i, (kind, path) in enumerate(modules)
            ],
        )
        flags = {f"pooling_mode_{flag}": flag == "mean_tokens" for flag in _LEGACY_POOLING_ORDER}
        _write_json(folder / "1_Pooling" / "config.json", {"word_embedding_dimension": config["hidden_size"]} | flags)
        bert_config = {"max_seq_length": self.max_seq_length, "do_lower_case": False}
        _write_json(folder / "sentence_bert_config.json", bert_config)

    def stats(self, folder: Path) -> dict[str, float]:
        """``--check`` statistics of the built folder: pairwise cosines of the reference's embeddings."""
        return _cosine_stats(jina_bert_reference(folder, CHECK_PROMPTS))


QWEN2_RM_AUTO_MAP = {"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig"}  # + AutoModel: the architecture
PRM_STEP_TAG = "<extra_0>"
PRM_STEP_TAG_ID = TOKENIZER_VOCAB_SIZE  # the first id after the ChatML tokenizer's


@dataclass(frozen=True)
class Qwen2RewardBuilder:
    """A hand-written Qwen2ForRewardModel / Qwen2ForProcessRewardModel folder (remote code in the published
    checkpoints): config.json (``model_type`` qwen2, ``auto_map`` to ``modeling_qwen2_rm``), a tiny
    ``transformers.Qwen2Model``'s tensors under ``model.`` and the ``score`` head as ``score.0`` (Linear(h, h)) and
    ``score.2`` (Linear(h, num_labels)), both with biases; the ChatML tokenizer plus ``extra_tokens`` (special).
    The head's matrices are drawn at ``2 / sqrt(h)`` of ``INIT_STD`` so that its outputs spread over a unit or two
    (softmax probabilities away from 0 and 1)."""

    architecture: str
    seed: int
    num_labels: int
    extra_tokens: tuple[str, ...] = ()

    def spec(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "seed": self.seed,
            "num_labels": self.num_labels,
            "extra_tokens": self.extra_tokens,
            "defaults": DECODER_DEFAULTS,
            "init": {"std": INIT_STD, "norm_std": NORM_STD, "bias_std": BIAS_STD},
            "tokenizer": tokenizer_spec("chatml"),
        }

    def build(self, folder: Path) -> None:
        import copy

        import torch
        import transformers
        from safetensors.torch import save_file
        from tokenizers import AddedToken

        tokenizer = chatml_tokenizer()
        if self.extra_tokens:
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in self.extra_tokens], True)
        n_tokens = len(tokenizer)
        config = transformers.Qwen2Config(
            **DECODER_DEFAULTS
            | {"vocab_size": padded_vocab_size(n_tokens), "tie_word_embeddings": False, "use_sliding_window": False}
        )
        model = transformers.Qwen2Model(config).to(torch.float32).eval()
        _init_weights(model, self.seed, n_tokens)
        tensors = {f"model.{name}": tensor.contiguous() for name, tensor in model.state_dict().items()}
        h, generator = config.hidden_size, torch.Generator().manual_seed(self.seed)
        head = {"score.0.weight": (h, h), "score.0.bias": (h,), "score.2.weight": (self.num_labels, h)}
        for name, shape in (head | {"score.2.bias": (self.num_labels,)}).items():
            scale = 2 / math.sqrt(h) if name.endswith(".weight") else 1.0
            tensors[name] = _noise(name, shape, generator) * scale
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        config.architectures = [self.architecture]
        config.save_pretrained(folder)
        auto_map = QWEN2_RM_AUTO_MAP | {"AutoModel": f"modeling_qwen2_rm.{self.architecture}"}
        _write_json(folder / "config.json", _read_json(folder / "config.json") | {"auto_map": auto_map})
        tokenizer.save_pretrained(folder)

    def stats(self, folder: Path) -> dict[str, float]:
        """``--check`` statistics: the spread of the head's outputs over ``CHECK_PROMPTS``' tokens."""
        import numpy as np
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        scores = np.concatenate([qwen2_reward_reference(folder, tokenizer(p).input_ids) for p in CHECK_PROMPTS])
        return {"token_std": float(scores.std()), "token_max_abs": float(np.abs(scores).max())}


# ModernBERT on the bert tokenizer: its special ids, three layers (global, local, local) and a local window of 8
# (keys within 4 positions either side), shorter than most test texts
MODERNBERT_CONFIG: dict[str, Any] = {
    "num_hidden_layers": 3,
    "global_attn_every_n_layers": 3,
    "local_attention": 8,
    "pad_token_id": 0,
    "cls_token_id": 2,
    "sep_token_id": 3,
    "bos_token_id": 2,
    "eos_token_id": 3,
}


def _write_modernbert_legacy_config(folder: Path) -> None:
    """Rewrite a ModernBERT config.json saved by transformers 5 (``layer_types``, per-type ``rope_parameters``) in
    the keys transformers 4.4x wrote and the published checkpoints hold: ``global_rope_theta``,
    ``local_rope_theta`` and ``global_attn_every_n_layers``."""
    config = _read_json(folder / "config.json")
    every = config["global_attn_every_n_layers"]
    layer_types = config.pop("layer_types")
    assert layer_types == ["full_attention" if i % every == 0 else "sliding_attention" for i in range(len(layer_types))]
    rope = config.pop("rope_parameters")
    config["global_rope_theta"] = rope["full_attention"]["rope_theta"]
    config["local_rope_theta"] = rope["sliding_attention"]["rope_theta"]
    _write_json(folder / "config.json", config)


ROPE_ENCODER_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
JINA_LORA_TASKS = ["retrieval.query", "retrieval.passage", "separation", "classification", "text-matching"]
JINA_LORA_RANK = 4
JINA_LORA_ALPHA = 1.0
_ROPE_ENCODER_NATIVE = {  # family -> transformers' native port (config, model, classifier)
    "gte": ("GteConfig", "GteModel", "GteForSequenceClassification"),
    "nomic": ("NomicBertConfig", "NomicBertModel", None),
    "jina": ("JinaEmbeddingsV3Config", "JinaEmbeddingsV3Model", None),
}


@dataclass(frozen=True)
class RopeEncoderBuilder:
    """A tiny encoder with rotary positions laid out as its family publishes it (remote code in the real
    checkpoints): gte's ``new`` models, NomicBERT or jina-embeddings-v3 (with its task LoRA adapters). The weights
    are drawn in transformers' native port of the family, which ``rope_encoder_reference`` loads them back into;
    its native config is kept in ``reference/``."""

    family: str  # "gte", "nomic" or "jina"
    seed: int
    published: dict[str, Any]  # the published config.json, less the shape
    native: dict[str, Any]  # the native config's overrides
    pooling: str | None = None  # a sentence-transformers Pooling mode (embedders); None for a classifier
    num_labels: int | None = None  # a NewForSequenceClassification with this many labels

    def spec(self) -> dict[str, Any]:
        """Everything the built folder depends on (hashed into the stamp)."""
        return {
            "family": self.family,
            "seed": self.seed,
            "published": self.published,
            "native": self.native,
            "pooling": self.pooling,
            "num_labels": self.num_labels,
            "shape": ROPE_ENCODER_SHAPE,
            "init": {"std": INIT_STD, "norm_std": NORM_STD, "bias_std": BIAS_STD},
            "tokenizer": tokenizer_spec(self.tokenizer),
        }

    @property
    def tokenizer(self) -> str:
        """jina and gte's multilingual reranker are XLM-R models; gte-*-en and NomicBERT use BERT's WordPiece."""
        return "xlmr" if self.family == "jina" or self.num_labels else "bert"

    def build(self, folder: Path) -> None:
        import torch
        import transformers
        from safetensors.torch import save_file

        tokenizer = TOKENIZERS[self.tokenizer]()
        defaults = ENCODER_DEFAULTS[self.tokenizer]
        native = getattr(transformers, _ROPE_ENCODER_NATIVE[self.family][0])(
            **ROPE_ENCODER_SHAPE
            | {
                "vocab_size": len(tokenizer),
                "layer_norm_eps": defaults["layer_norm_eps"],
                "pad_token_id": defaults["pad_token_id"],
                "max_position_embeddings": ENCODER_MAX_LENGTH,
            }
            | ({"num_labels": self.num_labels} if self.num_labels else {})
            | self.native
        )
        model = _native_rope_encoder(self.family, native, classifier=bool(self.num_labels)).to(torch.float32).eval()
        _init_weights(model, self.seed)
        with torch.no_grad():  # centre each FFN output row (as `_decorrelate_encoder` does)
            for name, param in model.named_parameters():
                if re.search(r"layers\.\d+\.mlp\.(down_proj|fc2)\.weight$", name):
                    param.sub_(param.mean(dim=1, keepdim=True))
        tensors = _rope_encoder_published(self.family, model.state_dict())
        if self.family == "jina":
            tensors = _with_jina_lora(tensors, torch.Generator().manual_seed(self.seed + 1000))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
        native.save_pretrained(folder / "reference")
        shape = {
            "gte": ROPE_ENCODER_SHAPE,
            "jina": ROPE_ENCODER_SHAPE,
            "nomic": {"n_embd": 32, "n_inner": 64, "n_layer": 2, "n_head": 4},
        }[self.family]
        labels = _label_config([f"LABEL_{i}" for i in range(self.num_labels)]) if self.num_labels else {}
        _write_json(
            folder / "config.json",
            self.published
            | shape
            | labels
            | {"vocab_size": len(tokenizer), "pad_token_id": defaults["pad_token_id"], "torch_dtype": "float32"},
        )
        tokenizer.save_pretrained(folder)
        if self.pooling:
            _write_json(
                folder / "modules.json",
                [
                    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
                ],
            )
            _write_json(
                folder / "1_Pooling" / "config.json", {"word_embedding_dimension": 32, "pooling_mode": self.pooling}
            )
            (folder / "2_Normalize").mkdir()
            _write_json(folder / "sentence_bert_config.json", {"max_seq_length": 64, "do_lower_case": False})
            _write_json(folder / "config_sentence_transformers.json", {"prompts": {}, "default_prompt_name": None})

    def stats(self, folder: Path) -> dict[str, float]:
        """``--check`` statistics of the built folder."""
        texts = training_corpus()[:16]
        if self.num_labels:
            return _spread_stats(rope_encoder_reference(folder, [(texts[0], t) for t in texts[1:]]))
        return _cosine_stats(rope_encoder_reference(folder, texts))


_ROPE_LAYER_NAMES = {  # family -> (layer stack, packed qkv, attention out, norm after attention, norm after MLP)
    "gte": ("encoder.layer", "attention.qkv_proj", "attention.o_proj", "attn_ln", "mlp_ln"),
    "nomic": ("encoder.layers", "attn.Wqkv", "attn.out_proj", "norm1", "norm2"),
    "jina": ("encoder.layers", "mixer.Wqkv", "mixer.out_proj", "norm1", "norm2"),
}
_NOMIC_MLP_NAMES = {"mlp.up_proj": "mlp.fc11", "mlp.gate_proj": "mlp.fc12", "mlp.down_proj": "mlp.fc2"}


def _native_rope_encoder(family: str, config: Any, classifier: bool) -> Any:
    import transformers

    _, model_class, classifier_class = _ROPE_ENCODER_NATIVE[family]
    return getattr(transformers, classifier_class if classifier else model_class)(config)


def _rope_encoder_published(family: str, state: dict[str, Any]) -> dict[str, Any]:
    """transformers' native tensors of a rope encoder → the names and packing its family publishes: one packed
    q/k/v, gte's packed [up; gate], NomicBERT's fc11 / fc12 / fc2, the flash implementation's ``emb_ln`` and the
    checkpoint prefix (``new.`` for gte's classifier, ``roberta.`` for jina)."""
    import torch

    classifier = "classifier.weight" in state
    plain = {re.sub(r"^gte\.", "", name): tensor for name, tensor in state.items()}
    stack, qkv, out, attn_ln, mlp_ln = _ROPE_LAYER_NAMES[family]
    prefix = "new." if family == "gte" and classifier else "roberta." if family == "jina" else ""
    published = {}
    for name, tensor in plain.items():
        if name.startswith("classifier."):
            published[name] = tensor
            continue
        match = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", name)
        if not match:
            if family != "gte":
                name = name.replace("embeddings.LayerNorm", "emb_ln")
            published[prefix + name] = tensor
            continue
        layer, part, kind = match.groups()
        if part in ("self_attn.k_proj", "self_attn.v_proj") or (family == "gte" and part == "mlp.gate_proj"):
            continue  # packed with q_proj / up_proj
        if part == "self_attn.q_proj":
            part = qkv
            tensor = torch.cat([plain[f"layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)
        elif family == "gte" and part == "mlp.up_proj":
            part = "mlp.up_gate_proj"
            tensor = torch.cat([tensor, plain[f"layers.{layer}.mlp.gate_proj.{kind}"]], dim=0)
        else:
            part = {
                "self_attn.o_proj": out,
                "post_attention_layernorm": attn_ln,
                "post_mlp_layernorm": mlp_ln,
                **(_NOMIC_MLP_NAMES if family == "nomic" else {}),
            }.get(part, part)
        published[f"{prefix}{stack}.{layer}.{part}.{kind}"] = tensor
    return published


def _rope_encoder_native(family: str, published: dict[str, Any], lora_task: str | None) -> dict[str, Any]:
    """The inverse of ``_rope_encoder_published`` (names as transformers' native base model has them, without a
    classifier's ``gte.`` prefix), jina's LoRA adapter of ``lora_task`` merged as its published code merges it."""

    stack, qkv, out, attn_ln, mlp_ln = _ROPE_LAYER_NAMES[family]
    parts = {out: "self_attn.o_proj", attn_ln: "post_attention_layernorm", mlp_ln: "post_mlp_layernorm"}
    if family == "nomic":
        parts |= {theirs: ours for ours, theirs in _NOMIC_MLP_NAMES.items()}
    tensors = dict(published)
    if family == "jina":
        tensors = _merge_jina_lora(tensors, JINA_LORA_TASKS.index(lora_task or "text-matching"))
    native = {}
    for name, tensor in tensors.items():
        name = re.sub(r"^(new|roberta)\.", "", name).replace("emb_ln", "embeddings.LayerNorm")
        match = re.match(re.escape(stack) + r"\.(\d+)\.(.+)\.(weight|bias)$", name)
        if not match:
            native[name] = tensor
            continue
        layer, part, kind = match.groups()
        if part == qkv:
            for p, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                native[f"layers.{layer}.self_attn.{p}_proj.{kind}"] = chunk
        elif part == "mlp.up_gate_proj":
            up, gate = tensor.chunk(2, dim=0)
            native[f"layers.{layer}.mlp.up_proj.{kind}"] = up
            native[f"layers.{layer}.mlp.gate_proj.{kind}"] = gate
        else:
            native[f"layers.{layer}.{parts.get(part, part)}.{kind}"] = tensor
    return native


def _with_jina_lora(tensors: dict[str, Any], generator: Any) -> dict[str, Any]:
    """jina-embeddings-v3's published form: each linear and embedding weight as ``*.parametrizations.weight.original``
    with per-task LoRA factors ``.0.lora_A`` / ``.0.lora_B`` (embeddings: A [vocab, rank], B [rank, dim]; linears:
    A [rank, in], B [out, rank]), drawn large enough that the tasks' embeddings differ clearly."""
    import torch

    out = {}
    for name, tensor in tensors.items():
        if not name.endswith(".weight") or tensor.dim() != 2 or "LayerNorm" in name or "emb_ln" in name:
            out[name] = tensor
            continue
        stem = name.removesuffix(".weight") + ".parametrizations.weight"
        rows, cols = tensor.shape
        n = len(JINA_LORA_TASKS)
        if ".embeddings." in name:
            a_shape, b_shape = (n, rows, JINA_LORA_RANK), (n, JINA_LORA_RANK, cols)
        else:
            a_shape, b_shape = (n, JINA_LORA_RANK, cols), (n, rows, JINA_LORA_RANK)
        out[stem + ".original"] = tensor
        out[stem + ".0.lora_A"] = INIT_STD * torch.randn(a_shape, generator=generator)
        out[stem + ".0.lora_B"] = INIT_STD * torch.randn(b_shape, generator=generator)
    return out


def _merge_jina_lora(tensors: dict[str, Any], task: int) -> dict[str, Any]:
    """The published code's merge of one task's adapter: W + (lora_alpha / rank) * B @ A (A @ B for embeddings)."""
    merged = {}
    for name, tensor in tensors.items():
        if name.endswith((".0.lora_A", ".0.lora_B")):
            continue
        if name.endswith(".parametrizations.weight.original"):
            stem = name.removesuffix(".original")
            a, b = tensors[stem + ".0.lora_A"][task], tensors[stem + ".0.lora_B"][task]
            delta = a @ b if ".embeddings." in name else b @ a
            tensor = tensor + JINA_LORA_ALPHA / JINA_LORA_RANK * delta
            name = stem.replace(".parametrizations", "")
        merged[name] = tensor
    return merged


def rope_encoder_reference(folder: Path, inputs: Sequence[Any], lora_task: str | None = None) -> Any:
    """Embeddings (or, for a classifier, logits of (query, document) pairs) of a ``RopeEncoderBuilder`` folder:
    its published tensors loaded into transformers' native port (``reference/config.json``), NTK rotary scaling
    applied to its rotary tables as gte's code scales them, then the folder's pooling and normalization."""
    import torch
    import transformers
    from safetensors.torch import load_file

    config = _read_json(folder / "config.json")
    family = {"new": "gte", "nomic_bert": "nomic", "xlm-roberta": "jina"}[config["model_type"]]
    native_config = transformers.AutoConfig.from_pretrained(folder / "reference")
    classifier = config["architectures"][0].endswith("ForSequenceClassification")
    model = _native_rope_encoder(family, native_config, classifier)
    state = _rope_encoder_native(family, load_file(str(folder / "model.safetensors")), lora_task)
    base = model.gte if classifier else model
    base.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")}, strict=False)
    if classifier:
        model.classifier.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("classifier.")}
        )
    scaling = config.get("rope_scaling") or {}
    if scaling.get("type") == "ntk":
        dim = native_config.hidden_size // native_config.num_attention_heads
        factor, theta = scaling["factor"], config["rope_theta"]
        inv_freq = 1.0 / (theta * factor) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim) / factor ** (2 / dim)
        base.rotary_emb.inv_freq.copy_(inv_freq)
        base.rotary_emb.original_inv_freq = inv_freq
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    pooling = (
        _read_json(folder / "1_Pooling" / "config.json")["pooling_mode"] if (folder / "modules.json").exists() else None
    )
    with torch.no_grad():
        if classifier:
            batch = tokenizer([q for q, _ in inputs], [d for _, d in inputs], padding=True, return_tensors="pt")
            return model(**batch).logits.numpy()
        batch = tokenizer(list(inputs), padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


BUILDERS: dict[
    str,
    DecoderBuilder | EncoderBuilder | InternLM2Builder | RopeEncoderBuilder | Qwen2RewardBuilder | JinaBertBuilder,
] = {
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
    "tiny-gemma2": DecoderBuilder(
        model_class="Gemma2ForCausalLM",
        config_class="Gemma2Config",
        seed=5,
        config={
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": 16,
            "attn_logit_softcapping": 20.0,
            "final_logit_softcapping": 30.0,
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
        },
    ),
    "tiny-gemma3": DecoderBuilder(
        model_class="Gemma3ForCausalLM",
        config_class="Gemma3TextConfig",
        seed=9,
        config={
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            },
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
        },
    ),
    "tiny-mixtral": DecoderBuilder(
        model_class="MixtralForCausalLM",
        config_class="MixtralConfig",
        seed=36,
        config={
            "tie_word_embeddings": False,
            "intermediate_size": 32,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
    ),
    "tiny-qwen2-moe": DecoderBuilder(
        model_class="Qwen2MoeForCausalLM",
        config_class="Qwen2MoeConfig",
        seed=33,
        config={
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "norm_topk_prob": False,
            "mlp_only_layers": [1],
        },
    ),
    "tiny-qwen3-moe": DecoderBuilder(
        model_class="Qwen3MoeForCausalLM",
        config_class="Qwen3MoeConfig",
        seed=34,
        config={
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "head_dim": 32,
            "num_experts": 8,
            "num_experts_per_tok": 4,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
        },
    ),
    "tiny-phi3": DecoderBuilder(
        model_class="Phi3ForCausalLM",
        config_class="Phi3Config",
        seed=28,
        config={
            "tie_word_embeddings": False,
            "max_position_embeddings": 256,
            "original_max_position_embeddings": 32,
            "partial_rotary_factor": 0.75,
            "sliding_window": 48,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.05, 1.2, 1.5, 2.0, 2.6],
                "long_factor": [1.0, 1.6, 3.0, 6.0, 11.0, 19.0],
            },
        },
    ),
    "tiny-llama-yarn": DecoderBuilder(
        model_class="LlamaForCausalLM",
        config_class="LlamaConfig",
        seed=8,
        config={
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 16.0,
                "beta_slow": 1.0,
            },
        },
    ),
    "tiny-gemma": DecoderBuilder(
        model_class="GemmaForCausalLM",
        config_class="GemmaConfig",
        seed=6,
        config={"head_dim": 32, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True},
    ),
    "tiny-gemma3-mm": DecoderBuilder(
        model_class="Gemma3ForConditionalGeneration",
        config_class="Gemma3Config",
        seed=10,
        config={
            "text_config": {
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "sliding_window": 16,
                "layer_types": ["sliding_attention", "full_attention"],
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                },
                "hidden_activation": "gelu_pytorch_tanh",
            },
            "vision_config": {
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 28,
                "patch_size": 14,
            },
            "mm_tokens_per_image": 4,
        },
        published_names=(("model.language_model.", "language_model.model."), ("model.", "")),
    ),
    "tiny-granite": DecoderBuilder(
        model_class="GraniteForCausalLM",
        config_class="GraniteConfig",
        seed=40,
        config={
            "tie_word_embeddings": True,
            "embedding_multiplier": 4.0,
            "attention_multiplier": 0.5,
            "residual_multiplier": 0.5,
            "logits_scaling": 0.5,
        },
    ),
    "tiny-olmo2": DecoderBuilder(
        model_class="Olmo2ForCausalLM", config_class="Olmo2Config", seed=38, config={"tie_word_embeddings": False}
    ),
    "tiny-smollm3": DecoderBuilder(
        model_class="SmolLM3ForCausalLM",
        config_class="SmolLM3Config",
        seed=39,
        config={"tie_word_embeddings": True, "no_rope_layers": [1, 0]},
    ),
    # eight query heads over two KV heads: splits over 1, 2, 4 and 8 devices (tensor parallelism's tests), the
    # KV heads repeated where there are more devices than KV heads
    "tiny-llama-8h": DecoderBuilder(
        model_class="LlamaForCausalLM",
        config_class="LlamaConfig",
        seed=41,
        config={"tie_word_embeddings": False, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16},
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
    "tiny-jina-v2": JinaBertBuilder(seed=24),
    "tiny-deberta-v3-classifier": EncoderBuilder(
        model_class="DebertaV2ForSequenceClassification",
        config_class="DebertaV2Config",
        tokenizer="bert",
        seed=43,
        config=_label_config(["entailment", "neutral", "contradiction"]) | DEBERTA_V3_CONFIG,
    ),
    "tiny-bert-ner": EncoderBuilder(
        model_class="BertForTokenClassification",
        config_class="BertConfig",
        tokenizer="bert",
        seed=19,
        config=_label_config(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]),
    ),
    "tiny-modernbert-embed": EncoderBuilder(
        model_class="ModernBertModel",
        config_class="ModernBertConfig",
        tokenizer="bert",
        seed=40,
        config=MODERNBERT_CONFIG,
        sentence_transformer=SentenceTransformerSpec(pooling="cls", max_seq_length=ENCODER_MAX_LENGTH),
        tokenizer_inputs=("input_ids", "attention_mask"),
        legacy_config=True,
    ),
    "tiny-modernbert-reranker": EncoderBuilder(
        model_class="ModernBertForSequenceClassification",
        config_class="ModernBertConfig",
        tokenizer="bert",
        seed=41,
        config=MODERNBERT_CONFIG
        | {
            "num_labels": 1,
            "classifier_pooling": "mean",
            "classifier_activation": "silu",
            "norm_bias": True,
            "attention_bias": True,
            "mlp_bias": True,
            "classifier_bias": True,
        },
        tokenizer_inputs=("input_ids", "attention_mask"),
    ),
    "tiny-qwen2-classifier": DecoderBuilder(
        model_class="Qwen2ForSequenceClassification",
        config_class="Qwen2Config",
        seed=16,
        config=_label_config(["no", "yes"]) | {"tie_word_embeddings": False, "use_sliding_window": False},
        generation=None,
    ),
    "tiny-qwen2-reward": Qwen2RewardBuilder("Qwen2ForRewardModel", seed=30, num_labels=1),
    "tiny-qwen2-prm": Qwen2RewardBuilder(
        "Qwen2ForProcessRewardModel", seed=31, num_labels=2, extra_tokens=(PRM_STEP_TAG,)
    ),
    "tiny-internlm2-reward": InternLM2Builder(seed=17),
    "tiny-internlm2-reward-published": InternLM2Builder(seed=21, published_layout=True),
    "tiny-internlm2": InternLM2Builder(
        seed=23,
        config={"architectures": ["InternLM2ForCausalLM"], "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    ),
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
    "tiny-gte-new": RopeEncoderBuilder(
        family="gte",
        seed=22,
        published={
            "architectures": ["NewModel"],
            "model_type": "new",
            "auto_map": {
                "AutoConfig": "Alibaba-NLP/new-impl--configuration.NewConfig",
                "AutoModel": "Alibaba-NLP/new-impl--modeling.NewModel",
            },
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-12,
            "layer_norm_type": "layer_norm",
            "logn_attention_scale": False,
            "max_position_embeddings": ENCODER_MAX_LENGTH,
            "pack_qkv": True,
            "position_embedding_type": "rope",
            "rope_scaling": {"type": "ntk", "factor": 2.0},
            "rope_theta": 1000.0,
            "type_vocab_size": 0,
            "unpad_inputs": False,
        },
        native={
            "type_vocab_size": 0,
            "hidden_act": "gelu",
            "rope_parameters": {"rope_theta": 1000.0, "rope_type": "default"},
        },
        pooling="cls",
    ),
    "tiny-gte-new-reranker": RopeEncoderBuilder(
        family="gte",
        seed=23,
        published={
            "architectures": ["NewForSequenceClassification"],
            "model_type": "new",
            "auto_map": {
                "AutoConfig": "Alibaba-NLP/new-impl--configuration.NewConfig",
                "AutoModelForSequenceClassification": "Alibaba-NLP/new-impl--modeling.NewForSequenceClassification",
            },
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "max_position_embeddings": ENCODER_MAX_LENGTH,
            "position_embedding_type": "rope",
            "rope_theta": 1000.0,
            "type_vocab_size": 1,
        },
        native={
            "type_vocab_size": 1,
            "hidden_act": "gelu",
            "rope_parameters": {"rope_theta": 1000.0, "rope_type": "default"},
        },
        num_labels=1,
    ),
    "tiny-nomic-bert": RopeEncoderBuilder(
        family="nomic",
        seed=24,
        published={
            "architectures": ["NomicBertModel"],
            "model_type": "nomic_bert",
            "auto_map": {
                "AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
                "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel",
            },
            "activation_function": "swiglu",
            "causal": False,
            "layer_norm_epsilon": 1e-12,
            "max_trained_positions": ENCODER_MAX_LENGTH,
            "n_positions": ENCODER_MAX_LENGTH,
            "mlp_fc1_bias": False,
            "mlp_fc2_bias": False,
            "prenorm": False,
            "qkv_proj_bias": False,
            "rotary_emb_base": 1000,
            "rotary_emb_fraction": 1.0,
            "rotary_emb_interleaved": False,
            "rotary_emb_scale_base": None,
            "rotary_scaling_factor": None,
            "type_vocab_size": 2,
            "use_flash_attn": True,
        },
        native={
            "hidden_act": "silu",
            "type_vocab_size": 2,
            "rope_parameters": {"rope_theta": 1000.0, "rope_type": "default"},
        },
        pooling="mean",
    ),
    "tiny-jina-v3": RopeEncoderBuilder(
        family="jina",
        seed=25,
        published={
            "architectures": ["XLMRobertaModel"],
            "model_type": "xlm-roberta",
            "auto_map": {
                "AutoConfig": "jinaai/xlm-roberta-flash-implementation--configuration_xlm_roberta.XLMRobertaFlashConfig",
                "AutoModel": "jinaai/xlm-roberta-flash-implementation--modeling_lora.XLMRobertaLoRA",
            },
            "bos_token_id": 0,
            "eos_token_id": 2,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "lora_adaptations": JINA_LORA_TASKS,
            "lora_alpha": JINA_LORA_ALPHA,
            "lora_rank": JINA_LORA_RANK,
            "max_position_embeddings": ENCODER_MAX_LENGTH + 2,
            "position_embedding_type": "rotary",
            "rotary_emb_base": 1000.0,
            "task_instructions": {
                "retrieval.query": "Represent the query for retrieving evidence documents: ",
                "retrieval.passage": "Represent the document for retrieval: ",
                "separation": "",
                "classification": "",
                "text-matching": "",
            },
            "type_vocab_size": 1,
            "use_flash_attn": True,
        },
        native={"type_vocab_size": 1, "rope_parameters": {"rope_theta": 1000.0, "rope_type": "default"}},
        pooling="mean",
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


def _internlm2_as_llama(folder: Path) -> tuple[Any, dict[str, Any]]:
    """An InternLM2 folder's shape as a float32 ``transformers.LlamaConfig``, and its backbone's weights (numpy)
    under ``transformers.LlamaModel``'s names, ``wqkv`` unpacked."""
    import transformers
    from safetensors.numpy import load_file

    config = _read_json(Path(folder) / "config.json")
    weights = load_file(Path(folder) / "model.safetensors")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    rope = {"rope_type": "default"} | {
        ("rope_type" if key == "type" else key): value for key, value in (config.get("rope_scaling") or {}).items()
    }
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
        rope_parameters=rope | {"rope_theta": float(config["rope_theta"])},
        attention_bias=config["bias"],
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=config["bos_token_id"],
        eos_token_id=config["eos_token_id"],
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
    return llama_config, state | {name: weights[name] for name in ("output.weight", "v_head.weight") if name in weights}


def internlm2_reward_reference(folder: Path, token_ids: list[int]) -> Any:
    """Per-token rewards [n_tokens] (numpy float32) of a ``tiny-internlm2-reward`` style folder: its weights
    unpacked into a float32 ``transformers.LlamaModel`` of the same shape, then ``v_head`` on every position."""
    import numpy as np
    import torch
    import transformers

    llama_config, state = _internlm2_as_llama(folder)
    v_head = state.pop("v_head.weight")
    model = transformers.LlamaModel(llama_config).to(torch.float32).eval()
    model.load_state_dict({name: torch.from_numpy(np.ascontiguousarray(w)) for name, w in state.items()}, strict=True)
    with torch.no_grad():
        hidden = model(torch.tensor([list(token_ids)])).last_hidden_state[0]
        rewards = hidden @ torch.from_numpy(v_head).T
    return rewards[:, 0].numpy()


def internlm2_llama_twin(folder: Path, out: Path) -> Path:
    """``out``: a ``transformers.LlamaForCausalLM`` folder (config, weights, tokenizer, generation config) computing
    what a ``tiny-internlm2`` style causal LM folder computes: the reference HF runs for InternLM2."""
    import numpy as np
    import torch
    import transformers

    llama_config, state = _internlm2_as_llama(folder)
    state = {"model." + name: w for name, w in state.items() if name != "output.weight"} | {
        "lm_head.weight": state["output.weight"]
    }
    llama_config.architectures = ["LlamaForCausalLM"]
    model = transformers.LlamaForCausalLM(llama_config).to(torch.float32).eval()
    model.load_state_dict({name: torch.from_numpy(np.ascontiguousarray(w)) for name, w in state.items()}, strict=True)
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    shutil.copy(Path(folder) / "generation_config.json", out / "generation_config.json")
    return out


def qwen2_reward_reference(folder: Path, token_ids: list[int]) -> Any:
    """The ``score`` head's outputs [n_tokens, num_labels] (numpy float32, no activation) of a ``tiny-qwen2-reward``
    style folder: ``transformers.Qwen2Model`` loaded from it (leaving the ``score.*`` tensors unread), then the
    head, Linear -> ReLU -> Linear, in torch."""
    import torch
    import transformers
    from safetensors.torch import load_file

    model = transformers.Qwen2Model.from_pretrained(folder, dtype=torch.float32).eval()
    head = {name: w for name, w in load_file(Path(folder) / "model.safetensors").items() if name.startswith("score.")}
    with torch.no_grad():
        hidden = model(torch.tensor([list(token_ids)])).last_hidden_state[0]
        x = torch.relu(hidden @ head["score.0.weight"].T + head["score.0.bias"])
        return (x @ head["score.2.weight"].T + head["score.2.bias"]).numpy()


def _jina_bert_torch(config: dict[str, Any]) -> Any:
    """A float32 torch module tree holding JinaBERT's parameters under the published names (jina-bert-implementation's
    JinaBertModel, pooler included); ``_jina_bert_forward`` runs it."""
    import torch
    from torch import nn

    def node(**children: Any) -> Any:
        module = nn.Module()
        for name, child in children.items():
            module.add_module(name, child)
        return module

    h, i, eps = config["hidden_size"], config["intermediate_size"], config["layer_norm_eps"]

    def layer() -> Any:
        attention = node(
            self=node(query=nn.Linear(h, h), key=nn.Linear(h, h), value=nn.Linear(h, h)),
            output=node(dense=nn.Linear(h, h), LayerNorm=nn.LayerNorm(h, eps=eps)),
        )
        mlp = node(gated_layers=nn.Linear(h, 2 * i, bias=False), wo=nn.Linear(i, h), layernorm=nn.LayerNorm(h, eps=eps))
        return node(attention=attention, mlp=mlp)

    embeddings = node(
        word_embeddings=nn.Embedding(config["vocab_size"], h),
        token_type_embeddings=nn.Embedding(config["type_vocab_size"], h),
        LayerNorm=nn.LayerNorm(h, eps=eps),
    )
    encoder = node(layer=nn.ModuleList([layer() for _ in range(config["num_hidden_layers"])]))
    return node(embeddings=embeddings, encoder=encoder, pooler=node(dense=nn.Linear(h, h))).to(torch.float32)


def _alibi_head_slopes(n: int) -> list[float]:
    """ALiBi's slopes as jina-bert-implementation computes them (Press et al.'s recipe, recursive for a head
    count that is not a power of two)."""
    if math.log2(n).is_integer():
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**k for k in range(n)]
    closest = 2 ** math.floor(math.log2(n))
    return _alibi_head_slopes(closest) + _alibi_head_slopes(2 * closest)[0::2][: n - closest]


def _jina_bert_forward(model: Any, config: dict[str, Any], batch: dict[str, Any]) -> Any:
    """Last hidden states [B, L, H] of a padded batch, as the published JinaBertModel computes them: embeddings
    without positions, then per layer BERT's attention with the symmetric ALiBi bias -slope_h * |i - j| added to
    the scaled scores (and the padding mask), then the GLU MLP (act(first half) * second half, wo, LayerNorm of
    the residual sum)."""
    import torch
    import torch.nn.functional as F

    heads, inter = config["num_attention_heads"], config["intermediate_size"]
    act = {"geglu": F.gelu, "reglu": F.relu}[config["feed_forward_type"]]
    ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    b, n = ids.shape
    emb = model.embeddings
    x = emb.LayerNorm(emb.word_embeddings(ids) + emb.token_type_embeddings(types))
    distance = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).abs()
    alibi = -torch.tensor(_alibi_head_slopes(heads))[:, None, None] * distance  # [heads, L, L]
    padding = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for layer in model.encoder.layer:
        attn = layer.attention
        q, k, v = (
            getattr(attn.self, name)(x).view(b, n, heads, -1).transpose(1, 2) for name in ("query", "key", "value")
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + padding + alibi
        context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        x = attn.output.LayerNorm(attn.output.dense(context) + x)
        gated = layer.mlp.gated_layers(x)
        x = layer.mlp.layernorm(layer.mlp.wo(act(gated[..., :inter]) * gated[..., inter:]) + x)
    return x


def jina_bert_reference(folder: Path, texts: Sequence[str]) -> Any:
    """Embeddings [n_texts, hidden] (numpy float32) of a ``tiny-jina-v2`` style folder, as the published
    JinaBertModel.encode computes them: a padded batch through ``_jina_bert_forward``, the mean of the hidden
    states over the attention mask, then L2-normalised."""
    import torch
    import transformers
    from safetensors.torch import load_file

    folder = Path(folder)
    config = _read_json(folder / "config.json")
    model = _jina_bert_torch(config).eval()
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = _jina_bert_forward(model, config, batch)
        mask = batch["attention_mask"][..., None].float()
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, dim=-1).numpy()


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
