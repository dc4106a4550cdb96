"""What a sentence-transformers model folder says about its pipeline.

`modules.json` lists the modules in order: Transformer → Pooling → (Dense ...) → (Normalize). The Pooling
module's `config.json` picks the pooling mode and whether prompt tokens count; each Dense folder holds one
linear layer and its activation; `config_sentence_transformers.json` holds named prompts; and
`sentence_bert_config.json` the maximum sequence length. Cross-encoders keep their activation in
`config.json` (`sentence_transformers.activation_fn`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from .torch_pickle import load_torch_state_dict

# `1_Pooling/config.json` mode → segment_pool mode; older folders set one `pooling_mode_<name>` flag instead
_POOLING_MODES = {
    "cls": "cls",
    "mean": "mean",
    "max": "max",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "lasttoken": "last",
}
_LEGACY_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

# torch.nn module class name → activation name understood by models.layers.activation / the poolers
_TORCH_ACTIVATIONS = {"Identity": "identity", "Tanh": "tanh", "Sigmoid": "sigmoid", "ReLU": "relu", "GELU": "gelu"}


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    folder: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str

    def weights(self, index: int) -> dict[str, np.ndarray]:
        """The layer's tensors, named `st_dense.{index}.weight` / `.bias` for the pooling model."""
        safetensors = self.folder / "model.safetensors"
        state = (
            load_file(safetensors) if safetensors.exists() else load_torch_state_dict(self.folder / "pytorch_model.bin")
        )
        return {
            f"st_dense.{index}.{name}": state[f"linear.{name}"]
            for name in ("weight", "bias")
            if f"linear.{name}" in state
        }


@dataclasses.dataclass(frozen=True)
class SentenceTransformersConfig:
    pooling_mode: str | None
    include_prompt: bool
    dense: tuple[DenseLayer, ...]
    normalize: bool
    prompts: dict[str, str]
    default_prompt_name: str | None
    max_seq_length: int | None


def torch_activation_name(qualified: str) -> str:
    """'torch.nn.modules.activation.Sigmoid' → 'sigmoid'."""
    name = qualified.rsplit(".", 1)[-1]
    if name not in _TORCH_ACTIVATIONS:
        raise ValueError(f"Activation {qualified!r} is not supported (supported: {', '.join(_TORCH_ACTIVATIONS)}).")
    return _TORCH_ACTIVATIONS[name]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _pooling_mode(config: dict[str, Any], path: Path) -> str:
    """The segment_pool mode a Pooling module's config names (`pooling_mode`, or one legacy flag)."""
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for flag, mode in _LEGACY_POOLING_FLAGS.items() if config.get(flag)]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in _POOLING_MODES:
        raise ValueError(
            f"{path}: pooling mode {modes} is not supported; one of {', '.join(_POOLING_MODES)} must be set."
        )
    return _POOLING_MODES[modes[0]]


def read_st_config(folder: Path) -> SentenceTransformersConfig | None:
    """The pipeline of a sentence-transformers folder, or None for a plain HF folder."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    pooling_mode, include_prompt, dense, normalize = None, True, [], False
    for module in sorted(json.loads(modules_file.read_text()), key=lambda m: m["idx"]):
        kind = module["type"].rsplit(".", 1)[-1]
        path = folder / module["path"]
        if kind == "Pooling":
            config = _read_json(path / "config.json")
            pooling_mode, include_prompt = _pooling_mode(config, path), config.get("include_prompt", True)
        elif kind == "Dense":
            config = _read_json(path / "config.json")
            dense.append(
                DenseLayer(
                    path,
                    config["in_features"],
                    config["out_features"],
                    config.get("bias", True),
                    torch_activation_name(config.get("activation_function", "torch.nn.modules.activation.Tanh")),
                )
            )
        elif kind == "Normalize":
            normalize = True
    prompts_config = _read_json(folder / "config_sentence_transformers.json")
    return SentenceTransformersConfig(
        pooling_mode=pooling_mode,
        include_prompt=include_prompt,
        dense=tuple(dense),
        normalize=normalize,
        prompts=dict(prompts_config.get("prompts") or {}),
        default_prompt_name=prompts_config.get("default_prompt_name"),
        max_seq_length=_read_json(folder / "sentence_bert_config.json").get("max_seq_length"),
    )


def cross_encoder_activation(hf_config) -> str | None:
    """The activation a sentence-transformers CrossEncoder config names, if any."""
    st = getattr(hf_config, "sentence_transformers", None) or {}
    name = st.get("activation_fn") or getattr(hf_config, "sbert_ce_default_activation_function", None)
    return torch_activation_name(name) if name else None
