"""Engine configuration: the user's knobs (vLLM's names) and the values derived from them and the device."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from .kernels_pallas._lowering import lowering_platform
from .targets import get_target

# (max_num_seqs, max_num_batched_tokens) when not given
ACCELERATOR_LIMITS = (256, 2048)
CPU_LIMITS = (64, 512)
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30

DTYPES = {
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "half": jnp.float16,
    "float32": jnp.float32,
    "float": jnp.float32,
}

# generation_config.json keys that become sampling defaults (vLLM's get_diff_sampling_param)
GENERATION_DEFAULT_KEYS = (
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "max_new_tokens",
    "skip_special_tokens",
)


@dataclasses.dataclass
class EngineConfig:
    model: str
    runner: str = "auto"  # "generate", "pooling", or "auto": pooling for pooling architectures
    dtype: str = "auto"
    load_format: str = "auto"  # "auto" reads the checkpoint; "dummy" uses random weights (benchmarks)
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    page_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes of KV cache; the way to size it on CPU
    num_kv_pages: int | None = None  # exact page count, overriding both of the above
    max_logprobs: int = 20
    generation_config: str = "auto"  # "auto" (the model's), "vllm" (none) or a folder
    override_generation_config: dict[str, Any] | None = None
    chat_template: str | None = None
    hf_overrides: dict[str, Any] | None = None  # merged into config.json, e.g. {"num_labels": 1}
    pooler_config: dict[str, Any] | None = None  # task, pooling_type, use_activation, dimensions
    seed: int = 0
    attention_backend: str = "auto"  # kernels: auto (Pallas on GPU/TPU), pallas, reference, interpret
    compile_cache_dir: str | None = None
    target: str | None = None  # compile only, for this chip (`jaxserve.targets`, `jaxserve compile`); no serving
    strict_compile: bool = True  # compile every bucket before the engine returns; False: the rest in the background
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}.")
        if self.runner not in ("auto", "generate", "pooling"):
            raise ValueError(f"runner must be auto, generate or pooling, got {self.runner!r}.")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}.")
        if self.target is not None:
            get_target(self.target)

    @property
    def platform(self) -> str:
        """ "cpu", "gpu" or "tpu": the target's when compiling for one, else the attached device's."""
        if self.target is not None:
            return get_target(self.target).platform
        return lowering_platform()

    @property
    def on_cpu(self) -> bool:
        return self.platform == "cpu"

    def resolved_dtype(self):
        if self.dtype == "auto":
            return jnp.float32 if self.on_cpu else jnp.bfloat16
        return DTYPES[self.dtype]

    def resolved_limits(self) -> tuple[int, int]:
        """(max_num_seqs, max_num_batched_tokens), checked against each other."""
        seqs_default, tokens_default = CPU_LIMITS if self.on_cpu else ACCELERATOR_LIMITS
        max_num_seqs = self.max_num_seqs or seqs_default
        max_tokens = self.max_num_batched_tokens or max(tokens_default, max_num_seqs)
        if max_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_tokens}) must be greater than or equal to max_num_seqs ({max_num_seqs})."
            )
        return max_num_seqs, max_tokens

    def resolved_max_model_len(self, derived: int, source: str) -> int:
        """`max_model_len` if set (and within what the model allows), else the model's own limit."""
        if self.max_model_len is None:
            return derived
        if self.max_model_len > derived:
            raise ValueError(
                f"User-specified max_model_len ({self.max_model_len}) is greater than the derived "
                f"max_model_len ({source})."
            )
        return self.max_model_len

    def read_generation_config(self, model_folder: Path) -> dict[str, Any]:
        """generation_config.json as `--generation-config` selects it, with the override merged on top."""
        raw: dict[str, Any] = {}
        if self.generation_config != "vllm":
            folder = model_folder if self.generation_config == "auto" else Path(self.generation_config)
            path = folder / "generation_config.json"
            if path.is_file():
                raw = json.loads(path.read_text())
        return {**raw, **(self.override_generation_config or {})}


def sampling_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The SamplingParams fields a model's generation_config sets (`max_new_tokens` becomes `max_tokens`)."""
    defaults = {k: generation_config[k] for k in GENERATION_DEFAULT_KEYS if generation_config.get(k) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    return defaults
