"""Turn a CTranslate2 Whisper model folder (faster-whisper's format) into a Hugging Face Whisper folder, once, and
cache it.

Why convert: everything else in jaxserve reads HF folders (config.json, safetensors, tokenizer files), as with GGUF
(`gguf_convert.py`). Why not the `ctranslate2` package: it is a C++ runtime jaxserve never runs; its `model.bin` is
a simple binary format, parsed here with numpy.

`model.bin`, as CTranslate2's `ModelSpec._serialize` writes it (python/ctranslate2/specs/model_spec.py) and
`models::Model::load` reads it (src/models/model.cc), in the machine's (little-endian) byte order:

* uint32 binary version: 6 for every Whisper model (version 6 predates CTranslate2's Whisper support);
* string spec name (`WhisperSpec`), uint32 spec revision (Whisper's is 3; 1 and 2 differ only in the config and
  the activation enum);
* uint32 variable count; per variable, in name order: string name, uint8 rank, uint32 dims[rank], uint8 dtype id
  (float32, int8, int16, int32, float16, bfloat16), uint32 byte count, the row-major bytes;
* uint32 alias count; per alias: string alias, string target. A variable equal to one earlier in name order is
  stored once and aliased (`decoder/projection/weight` → `decoder/embeddings/weight` for Whisper's tied output
  projection; the layer norms of an untrained model); an alias also stands for its target's `_scale`.

A string is a uint16 length counting a trailing NUL, then the bytes and the NUL. Quantized weights hold
round(w * scale): int8 with one float32 scale per output row in `<name>_scale` (a convolution's [out, in, width]
flattened to rows), int16 with one scalar scale; w = q / scale. Rank-0 variables are settings (head counts, the
activation), not tensors.

Names (whisper_spec.py, transformer_spec.py; the HF side from `WhisperLoader` and `BartLoader` in
converters/transformers.py): `encoder/conv1`, `encoder/conv2`, `{encoder,decoder}/position_encodings/encodings`,
`{encoder,decoder}/layer_norm/{gamma,beta}`, `decoder/embeddings`, `decoder/projection`; in layer i,
`self_attention/linear_0` is Q, K and V fused by rows, `self_attention/linear_1` the output projection, the
decoder's `attention/linear_0` the cross-attention's Q, `attention/linear_1` its K and V fused, `attention/linear_2`
its output projection; `ffn/linear_0`, `ffn/linear_1` are fc1 and fc2. The fused biases carry zeros for K, which
has no bias in Whisper; dropping a K bias is exact in any case, since it shifts every key's score for a query by
the same amount, which softmax ignores.

The vocabulary (`vocabulary.json`, else `vocabulary.txt`, one token a line) numbers the tokens; the folder's
`tokenizer.json` (faster-whisper folders carry it) supplies the BPE merges. Everything is written as float32.

The folder is converted once into the cache (`conversion_cache.py`: keyed by the source files' path, size and
mtime, written aside and renamed into place).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken
from tqdm.auto import tqdm
from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperTokenizer

from .conversion_cache import converted_folder, source_key

logger = logging.getLogger(__name__)

# Bump when the output of a conversion changes, so folders written by older code are not reused.
CONVERTER_VERSION = 1
BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
WHISPER_REVISION = 3
VOCABULARY_FILES = ("vocabulary.json", "vocabulary.txt")  # CTranslate2 reads the first one present

_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, ml_dtypes.bfloat16)  # by dtype id
# CTranslate2's activation enum (revision 3) → HF's name; revisions 1 and 2 numbered GELU 1.
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu", 4: "quick_gelu"}

_GLOBAL_MODULES = {
    "encoder/conv1": "model.encoder.conv1",
    "encoder/conv2": "model.encoder.conv2",
    "encoder/position_encodings": "model.encoder.embed_positions",
    "encoder/layer_norm": "model.encoder.layer_norm",
    "decoder/embeddings": "model.decoder.embed_tokens",
    "decoder/position_encodings": "model.decoder.embed_positions",
    "decoder/layer_norm": "model.decoder.layer_norm",
    "decoder/projection": "proj_out",
}
_LAYER_MODULES = {
    "self_attention/layer_norm": ("self_attn_layer_norm",),
    "self_attention/linear_0": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),  # fused by rows
    "self_attention/linear_1": ("self_attn.out_proj",),
    "attention/layer_norm": ("encoder_attn_layer_norm",),
    "attention/linear_0": ("encoder_attn.q_proj",),
    "attention/linear_1": ("encoder_attn.k_proj", "encoder_attn.v_proj"),  # fused by rows
    "attention/linear_2": ("encoder_attn.out_proj",),
    "ffn/layer_norm": ("final_layer_norm",),
    "ffn/linear_0": ("fc1",),
    "ffn/linear_1": ("fc2",),
}
_PARAMETERS = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias", "encodings": "weight"}
_LAYER_NAME = re.compile(r"(encoder|decoder)/layer_(\d+)/(\w+/\w+)/(\w+)")

# Whisper's vocabulary: text tokens, <|endoftext|>, <|startoftranscript|>, the language tokens, the task and other
# control tokens up to <|notimestamps|>, then the timestamp tokens <|0.00|> ... <|30.00|>.
EOT, SOT, NO_TIMESTAMPS = "<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"
TRANSLATE, TRANSCRIBE, PREV_SOT = "<|translate|>", "<|transcribe|>", "<|startofprev|>"
# The smallest vocabulary of a multilingual Whisper (large-v3 has 51866; the English-only models 51864): OpenAI's
# own test (whisper/model.py, `Whisper.is_multilingual`).
MULTILINGUAL_VOCAB_SIZE = 51865
MAX_INITIAL_TIMESTAMP_INDEX = 50  # OpenAI's decoding default: the first timestamp at most 1 s in


@dataclasses.dataclass(frozen=True)
class Ct2Model:
    """The variables of a `model.bin`, as stored (views into the file), and its aliases."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def names(self) -> list[str]:
        return sorted({*self.variables, *self.aliases})

    def raw(self, name: str) -> np.ndarray:
        return self.variables[self.aliases.get(name, name)]

    def scalar(self, name: str) -> int | float:
        return self.raw(name).item()

    def tensor(self, name: str) -> np.ndarray:
        """`name` as float32: a quantized weight divided by its scale."""
        value = self.raw(name)
        if value.dtype in (np.int8, np.int16):
            scale = self.raw(f"{self.aliases.get(name, name)}_scale").astype(np.float32)
            rows = value.reshape(value.shape[0], -1).astype(np.float32)
            return (rows / (scale if scale.ndim == 0 else scale[:, None])).reshape(value.shape)
        return value.astype(np.float32)


def is_ctranslate2_folder(folder: Path) -> bool:
    """Whether `folder` holds a CTranslate2 model: a `model.bin` that starts with a CTranslate2 header next to a
    config.json that is not an HF one (every HF config names its `model_type`). PyTorch's own `.bin` files start
    with a zip or pickle signature, far above any binary version."""
    folder = Path(folder)
    model_bin, config_file = folder / "model.bin", folder / "config.json"
    if not (model_bin.is_file() and config_file.is_file()):
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        with open(model_bin, "rb") as stream:
            header = stream.read(4)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(config, dict) or "model_type" in config or "architectures" in config or len(header) < 4:
        return False
    return 1 <= struct.unpack("<I", header)[0] <= BINARY_VERSION


def convert_ct2_whisper(folder: Path, cache_root: Path) -> Path:
    """The HF folder converted from the CTranslate2 Whisper model in `folder`, under `cache_root/ct2/`; converts
    only on the first call."""
    folder = Path(folder)
    sources = [folder / name for name in ("model.bin", "config.json", "tokenizer.json", *VOCABULARY_FILES)]
    target = Path(cache_root) / "ct2" / f"{folder.resolve().name}-{source_key(sources, CONVERTER_VERSION)}"
    return converted_folder(target, lambda staging: _write_folder(folder, staging), str(folder))


def _write_folder(source: Path, folder: Path) -> None:
    model = read_model_bin(source / "model.bin")
    if model.spec != WHISPER_SPEC or model.revision > WHISPER_REVISION:
        raise ValueError(
            f"{source} holds a CTranslate2 {model.spec} model (revision {model.revision}); only Whisper models "
            f"({WHISPER_SPEC}, revisions up to {WHISPER_REVISION}) are converted."
        )
    ct2_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    vocabulary = read_vocabulary(source)
    config = hf_config(model, ct2_config, vocabulary)
    tokenizer = build_tokenizer(source / "tokenizer.json", vocabulary, config.max_target_positions)
    tensors = dict(hf_tensors(model, desc=f"Converting {source.name}"))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    generation_config(config, ct2_config, vocabulary).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(folder)


def read_model_bin(path: Path) -> Ct2Model:
    """The variables and aliases of a CTranslate2 `model.bin`, memory-mapped (nothing is copied until used)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    offset = 0

    def take(fmt: str) -> tuple:
        nonlocal offset
        values = struct.unpack_from(f"<{fmt}", data, offset)
        offset += struct.calcsize(f"<{fmt}")
        return values

    def take_bytes(size: int) -> np.ndarray:
        nonlocal offset
        offset += size
        return data[offset - size : offset]

    def take_string() -> str:
        (length,) = take("H")
        return bytes(take_bytes(length)[:-1]).decode("utf-8")

    (version,) = take("I")
    if version != BINARY_VERSION:
        raise ValueError(
            f"{path} is a CTranslate2 model of binary version {version}; this converter reads version "
            f"{BINARY_VERSION}, the version of every CTranslate2 Whisper model."
        )
    spec, (revision,) = take_string(), take("I")
    variables = {}
    for _ in range(take("I")[0]):
        name = take_string()
        shape = take(f"{take('B')[0]}I")
        dtype_id, size = take("BI")
        variables[name] = take_bytes(size).view(_DTYPES[dtype_id]).reshape(shape)
    aliases = {}
    for _ in range(take("I")[0]):
        alias = take_string()
        aliases[alias] = take_string()
    if offset != data.size:
        raise ValueError(f"{path} has {data.size - offset} bytes after its aliases: not a CTranslate2 model.bin.")
    return Ct2Model(spec, revision, variables, aliases)


def read_vocabulary(folder: Path) -> list[str]:
    """The tokens by id, from `vocabulary.json` (a list) or `vocabulary.txt` (one a line, as CTranslate2 reads it:
    a final newline ends the last token; carriage returns end every line or are part of the tokens)."""
    if (folder / "vocabulary.json").is_file():
        return json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
    text_file = folder / "vocabulary.txt"
    if not text_file.is_file():
        raise ValueError(f"{folder} has no vocabulary.json or vocabulary.txt: not a CTranslate2 Whisper folder.")
    lines = text_file.read_bytes().decode("utf-8").split("\n")  # not read_text: it would turn "\r\n" into "\n"
    if lines[-1] == "":
        lines.pop()
    if lines and all(line.endswith("\r") for line in lines):
        lines = [line[:-1] for line in lines]
    return lines


def _tied(model: Ct2Model) -> bool:
    """Whether the output projection is the embeddings: CTranslate2 stores it as an alias then (the later name)."""
    return model.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"


def _activation(model: Ct2Model) -> str:
    value = model.scalar("decoder/activation")
    return "gelu" if model.revision < 3 and value == 1 else _ACTIVATIONS[value]


def _layer_count(names: list[str], stack: str) -> int:
    return len({match[2] for name in names if (match := _LAYER_NAME.fullmatch(name)) and match[1] == stack})


def hf_config(model: Ct2Model, ct2_config: dict[str, Any], vocabulary: list[str]) -> WhisperConfig:
    """The HF `WhisperConfig` of a CTranslate2 Whisper model: sizes from the tensors' shapes, head counts and the
    activation from its settings, token ids from the vocabulary, suppressed tokens from its config.json."""
    names = model.names()
    d_model, num_mel_bins, _ = model.raw("encoder/conv1/weight").shape
    vocab_size = model.raw("decoder/embeddings/weight").shape[0]
    if vocab_size != len(vocabulary):
        raise ValueError(f"The vocabulary has {len(vocabulary)} tokens, but the embeddings {vocab_size} rows.")
    ids = {token: i for i, token in enumerate(vocabulary)}
    return WhisperConfig(
        architectures=["WhisperForConditionalGeneration"],
        vocab_size=vocab_size,
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=_layer_count(names, "encoder"),
        decoder_layers=_layer_count(names, "decoder"),
        encoder_attention_heads=model.scalar("encoder/num_heads"),
        decoder_attention_heads=model.scalar("decoder/num_heads"),
        encoder_ffn_dim=model.raw("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=model.raw("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=model.raw("encoder/position_encodings/encodings").shape[0],
        max_target_positions=model.raw("decoder/position_encodings/encodings").shape[0],
        activation_function=_activation(model),
        scale_embedding=bool(model.scalar("decoder/scale_embeddings")),
        decoder_start_token_id=ids[SOT],
        bos_token_id=ids[SOT],
        eos_token_id=ids[EOT],
        pad_token_id=ids[EOT],
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        tie_word_embeddings=_tied(model),
        dtype="float32",
    )


def generation_config(config: WhisperConfig, ct2_config: dict[str, Any], vocabulary: list[str]) -> GenerationConfig:
    """Whisper's generation config as OpenAI's published checkpoints carry it: the prompt tokens, the suppressed
    tokens, the cross-attention heads that align tokens to time (from the CTranslate2 config), and for a
    multilingual model the language and task tokens (the languages sit between <|startoftranscript|> and
    <|translate|>)."""
    ids = {token: i for i, token in enumerate(vocabulary)}
    multilingual = len(vocabulary) >= MULTILINGUAL_VOCAB_SIZE
    fields: dict[str, Any] = {
        "bos_token_id": config.bos_token_id,
        "decoder_start_token_id": config.decoder_start_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "max_length": config.max_target_positions,
        "suppress_tokens": config.suppress_tokens,
        "begin_suppress_tokens": config.begin_suppress_tokens,
        "no_timestamps_token_id": ids[NO_TIMESTAMPS],
        "prev_sot_token_id": ids[PREV_SOT],
        "max_initial_timestamp_index": MAX_INITIAL_TIMESTAMP_INDEX,
        "return_timestamps": False,
        "is_multilingual": multilingual,
    }
    if ct2_config.get("alignment_heads"):
        fields["alignment_heads"] = [list(pair) for pair in ct2_config["alignment_heads"]]
    if multilingual:
        languages = vocabulary[ids[SOT] + 1 : ids[TRANSLATE]]
        fields["lang_to_id"] = {token: ids[token] for token in languages}
        fields["task_to_id"] = {"transcribe": ids[TRANSCRIBE], "translate": ids[TRANSLATE]}
    return GenerationConfig(**fields)


def hf_tensors(model: Ct2Model, desc: str = "Converting") -> Iterator[tuple[str, np.ndarray]]:
    """The HF tensors of a CTranslate2 Whisper model, float32: fused projections split by rows (K's bias dropped),
    quantized weights divided by their scales, the output projection left out when tied to the embeddings."""
    d_model = model.raw("encoder/conv1/weight").shape[0]
    tied = _tied(model)
    for name in tqdm(model.names(), desc=desc, unit="tensor"):
        if model.raw(name).ndim == 0 or name.endswith("_scale") or (tied and name == "decoder/projection/weight"):
            continue
        scope, _, parameter = name.rpartition("/")
        match = _LAYER_NAME.fullmatch(name)
        if scope in _GLOBAL_MODULES:
            modules = [_GLOBAL_MODULES[scope]]
        elif match is not None and match[3] in _LAYER_MODULES:
            modules = [f"model.{match[1]}.layers.{match[2]}.{module}" for module in _LAYER_MODULES[match[3]]]
        else:
            modules = []
        if not modules or parameter not in _PARAMETERS:
            raise ValueError(f"CTranslate2 variable {name!r} has no Hugging Face Whisper counterpart.")
        tensor = model.tensor(name)
        if len(modules) > 1 and tensor.shape[0] != d_model * len(modules):
            raise ValueError(f"CTranslate2 variable {name!r} has {tensor.shape[0]} rows, not {len(modules)} fused.")
        for module, part in zip(modules, np.split(tensor, len(modules)), strict=True):
            if module.endswith("k_proj") and parameter == "bias":
                continue
            yield f"{module}.{_PARAMETERS[parameter]}", np.ascontiguousarray(part)


def build_tokenizer(tokenizer_file: Path, vocabulary: list[str], max_length: int) -> WhisperTokenizer:
    """HF's Whisper tokenizer for a CTranslate2 folder: the BPE of its `tokenizer.json`, the control tokens from
    <|endoftext|> to <|notimestamps|> as special tokens in vocabulary order (HF's Whisper tokenizer takes the id
    after the last special token as the first timestamp), the timestamp tokens the vocabulary lists after them
    (older tokenizer.json files lack them) as plain added tokens. It must number every token as the vocabulary
    does."""
    if not tokenizer_file.is_file():
        raise ValueError(
            f"{tokenizer_file.parent} has no tokenizer.json (CTranslate2 copies it with `--copy_files "
            "tokenizer.json`; faster-whisper's folders carry it): the BPE merges cannot be rebuilt without it."
        )
    backend = json.loads(tokenizer_file.read_text(encoding="utf-8"))["model"]
    if backend.get("type") != "BPE":
        raise ValueError(f"{tokenizer_file} is not a BPE tokenizer, as Whisper's is.")
    ids = {token: i for i, token in enumerate(vocabulary)}
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in backend["merges"]]
    tokenizer = WhisperTokenizer(
        vocab=backend["vocab"],
        merges=merges,
        unk_token=EOT,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        extra_special_tokens=vocabulary[ids[EOT] + 1 : ids[NO_TIMESTAMPS] + 1],
        model_max_length=max_length,
    )
    timestamps = vocabulary[ids[NO_TIMESTAMPS] + 1 :]
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in timestamps])
    numbered = tokenizer.convert_ids_to_tokens(list(range(len(vocabulary))))
    mismatched = [i for i, (token, expected) in enumerate(zip(numbered, vocabulary, strict=True)) if token != expected]
    if mismatched:
        i = mismatched[0]
        raise ValueError(
            f"{tokenizer_file} numbers {len(mismatched)} tokens unlike the vocabulary, e.g. id {i}: "
            f"{numbered[i]!r} against {vocabulary[i]!r}."
        )
    return tokenizer
