"""Build tiny, deterministic, random-weight Hugging Face model folders for tests.

The parity tests compare jaxserve against HF ``transformers`` (float32, CPU) on
small checkpoints that are generated offline by this script instead of being
downloaded. Each folder is a complete HF model directory -- ``config.json``,
``generation_config.json``, safetensors weights and a tokenizer with a ChatML
chat template -- loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``:

* ``tiny-llama``   LlamaForCausalLM, untied embeddings, llama3 RoPE scaling,
                   sampling defaults (temperature / top_p / repetition_penalty)
                   in its generation config.
* ``tiny-mistral`` MistralForCausalLM, untied, ``sliding_window=32`` and
                   sharded safetensors with ``model.safetensors.index.json``.
* ``tiny-qwen2``   Qwen2ForCausalLM, q/k/v biases, tied embeddings and two EOS
                   ids in its generation config.
* ``tiny-qwen3``   Qwen3ForCausalLM, q/k norms, tied embeddings and a
                   ``head_dim`` (32) different from hidden / heads (16).

All four share one byte-level BPE tokenizer trained on a fixed in-script
corpus (with multi-byte UTF-8 text, so characters split across tokens).

Why the weights are scaled: HF's default init (std 0.02) on a model this small
yields almost uniform logits, so greedy decoding is dominated by near-ties and
says nothing about whether two implementations agree. Here every matrix is
drawn with std ``INIT_STD``, norm weights are ``1 + NORM_STD * randn`` and
biases ``BIAS_STD * randn`` (from a per-model seeded ``torch.Generator``), which
gives logits spread over several units, prompt-dependent greedy continuations
and clear top-2 margins; ``--check`` prints these statistics. The embedding and
LM-head rows past the tokenizer's vocabulary (padding up to a multiple of 64, as
in real checkpoints) are zero so that no model ever emits an undecodable id.

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
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

INIT_STD = 0.5
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


def padded_vocab_size(tokenizer_vocab: int) -> int:
    """Round the tokenizer's vocabulary up to a multiple of ``VOCAB_MULTIPLE``."""
    return -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


@dataclass(frozen=True)
class CausalLMBuilder:
    """A tiny decoder-only LM: HF config/model classes plus overrides of the common shape."""

    model_class: str
    config_class: str
    seed: int
    config: dict[str, Any]
    generation: dict[str, Any] = field(default_factory=dict)
    max_shard_size: str | None = None

    def spec(self) -> dict[str, Any]:
        """Everything the built folder depends on (hashed into the stamp)."""
        return {
            "model_class": self.model_class,
            "config_class": self.config_class,
            "seed": self.seed,
            "config": self.config,
            "generation": self.generation,
            "max_shard_size": self.max_shard_size,
            "init": {"std": INIT_STD, "norm_std": NORM_STD, "bias_std": BIAS_STD},
            "tokenizer": {
                "corpus": training_corpus(),
                "vocab_size": TOKENIZER_VOCAB_SIZE,
                "special_tokens": SPECIAL_TOKENS,
                "chat_template": CHATML_TEMPLATE,
            },
        }

    def build(self, folder: Path) -> None:
        """Write config, weights, generation config and tokenizer into ``folder``."""
        import torch
        import transformers

        tokenizer = chatml_tokenizer()
        n_tokens = len(tokenizer)
        vocab_size = padded_vocab_size(n_tokens)
        assert vocab_size > n_tokens, "expected unused vocabulary rows"
        config = getattr(transformers, self.config_class)(
            **{
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "rms_norm_eps": 1e-6,
                "max_position_embeddings": 512,
                "vocab_size": vocab_size,
                "initializer_range": INIT_STD,
                "bos_token_id": None,
                "eos_token_id": IM_END_ID,
                "pad_token_id": ENDOFTEXT_ID,
                "dtype": "float32",
                "architectures": [self.model_class],
                **self.config,
            }
        )
        model = getattr(transformers, self.model_class)(config).to(torch.float32).eval()
        _init_weights(model, self.seed, n_tokens)
        model.save_pretrained(folder, max_shard_size=self.max_shard_size or "50GB")
        transformers.GenerationConfig(
            **{"bos_token_id": None, "eos_token_id": IM_END_ID, "pad_token_id": ENDOFTEXT_ID} | self.generation
        ).save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def _init_weights(model: Any, seed: int, n_tokens: int) -> None:
    """Overwrite every parameter with seeded, scaled noise (see module docstring)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + NORM_STD * noise)
            elif name.endswith(".bias"):
                param.copy_(BIAS_STD * noise)
            else:
                param.copy_(INIT_STD * noise)
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                param[n_tokens:] = 0.0


BUILDERS: dict[str, CausalLMBuilder] = {
    "tiny-llama": CausalLMBuilder(
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
    "tiny-mistral": CausalLMBuilder(
        model_class="MistralForCausalLM",
        config_class="MistralConfig",
        seed=2,
        config={"tie_word_embeddings": False, "sliding_window": 32},
        max_shard_size="200KB",
    ),
    "tiny-qwen2": CausalLMBuilder(
        model_class="Qwen2ForCausalLM",
        config_class="Qwen2Config",
        seed=3,
        config={"tie_word_embeddings": True, "use_sliding_window": False},
        generation={"eos_token_id": [IM_END_ID, ENDOFTEXT_ID]},
    ),
    "tiny-qwen3": CausalLMBuilder(
        model_class="Qwen3ForCausalLM",
        config_class="Qwen3Config",
        seed=4,
        config={"tie_word_embeddings": True, "use_sliding_window": False, "head_dim": 32},
    ),
}


def _stamp(builder: CausalLMBuilder) -> str:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--only", nargs="+", choices=sorted(BUILDERS), metavar="NAME")
    parser.add_argument("--check", action="store_true", help="print HF float32 logit statistics")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers loads
    paths = build_test_models(args.out_dir, args.only)
    for name, folder in paths.items():
        print(f"{name}: {folder}")
        if args.check:
            stats = greedy_stats(folder)
            print(
                f"  logit std >= {stats.min_logit_std:.3f}, top-2 gap min {stats.min_top2_gap:.2e}"
                f" median {stats.median_top2_gap:.3f}, distinct continuations"
                f" {stats.n_distinct_continuations}/{len(CHECK_PROMPTS)}, distinct tokens per"
                f" continuation >= {stats.min_distinct_tokens},"
                f" max |logit| {stats.max_abs_logit:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
