"""Engine configuration: the user's knobs (vLLM's names) and the values derived from them and the device."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from .buckets import ACCELERATOR_MIN_RUNG, CPU_MIN_RUNG
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

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'1073741824', '1G', '512MiB' → bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB or 512M)")
    number, unit = match.groups()
    return int(float(number) * 1024 ** "_kmgt".index(unit.lower() or "_"))


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


def flag(default: Any, help: str, **argparse_options: Any) -> Any:
    """A config field that is also a command-line flag (`--field-name`); `jaxserve.cli` builds the flags from
    these, with `help` and any further argparse options (choices, type, metavar)."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options})


def flag_fields() -> list[dataclasses.Field]:
    """The `EngineConfig` fields declared with `flag`, in declaration order."""
    return [field for field in dataclasses.fields(EngineConfig) if "help" in field.metadata]


def flag_type(field: dataclasses.Field) -> Callable[[str], Any] | None:
    """What turns a flag's text into the field's value (`--max-num-seqs 8`, `serve run ... max_num_seqs=8`), or
    None for a switch (a bool, given as presence or as true/false)."""
    hint = typing.get_type_hints(EngineConfig)[field.name]
    base = next(kind for kind in typing.get_args(hint) or (hint,) if kind is not type(None))
    if base is bool:
        return None
    if "type" in field.metadata:  # kv_cache_memory: "2GiB"
        return field.metadata["type"]
    return json.loads if typing.get_origin(base) is dict else base


def parse_flag(name: str, text: str) -> Any:
    """A flag's value given as text, as the `EngineConfig` field `name` takes it: 'none' for a field that may be
    None, true/false for a switch, and otherwise the flag's own type."""
    field = next((field for field in flag_fields() if field.name == name), None)
    if field is None:
        raise ValueError(f"{name!r} is not an engine flag.")
    if text.lower() in ("none", "null") and field.default is None:
        return None
    convert = flag_type(field)
    if convert is not None:
        return convert(text)
    if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ValueError(f"{name} takes true or false, got {text!r}.")
    return text.lower() in ("true", "1", "yes", "on")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What an engine is built from, fixed once made. The fields declared with `flag` are the engine's
    command-line flags, under vLLM's names; the rest are set by the program (the model, a compile target,
    progress bars). The `resolved_*` methods derive what depends on the model and the device; the engine
    takes their values at start-up."""

    model: str
    runner: str = flag(
        "auto",
        "'pooling' serves embeddings, scores and classification; auto picks by the model's architecture",
        choices=["auto", "generate", "pooling"],
    )
    dtype: str = flag(
        "auto",
        "weight and activation dtype; auto is bfloat16 on GPU/TPU and float32 on CPU",
        choices=["auto", *DTYPES],
    )
    load_format: str = flag(
        "auto", "'dummy' skips the checkpoint and uses random weights (for benchmarks)", choices=["auto", "dummy"]
    )
    max_model_len: int | None = flag(None, "context length (default: the model's)")
    max_num_seqs: int | None = flag(None, "sequences per step (default 256 on GPU/TPU, 64 on CPU)")
    max_num_batched_tokens: int | None = flag(
        None, "token budget per step; fixes the compiled bucket sizes (default 2048 on GPU/TPU, 512 on CPU)"
    )
    page_size: int = flag(16, "tokens per KV page (default 16)")
    gpu_memory_utilization: float = flag(
        0.9, "fraction of free device memory given to weights and KV cache (default 0.9)"
    )
    kv_cache_memory: int | None = flag(
        None, "KV cache size, e.g. 2GiB (the way to size it on CPU; default 1GiB there)", type=parse_bytes
    )
    num_kv_pages: int | None = flag(
        None, "exact KV page count, overriding --gpu-memory-utilization and --kv-cache-memory"
    )
    enable_prefix_caching: bool = flag(
        True, "reuse the KV pages of prompt prefixes computed before (automatic prefix caching; default on)"
    )
    scheduling_policy: str = flag(
        "fcfs",
        "fcfs: requests run in arrival order; priority: by the request's `priority` (lower first, then arrival), "
        "preempting the lowest priority first (default fcfs)",
        choices=["fcfs", "priority"],
    )
    async_scheduling: bool = flag(
        True,
        "plan and dispatch each step before the previous step's tokens reach the host, so that the device never "
        "waits for the host (default on; on CPU too, where it measured faster)",
    )
    max_logprobs: int = flag(20, "most logprobs a request may ask for (default 20)")
    generation_config: str = flag(
        "auto", "'auto' reads the model's generation_config.json, 'vllm' ignores it, or a folder"
    )
    override_generation_config: dict[str, Any] | None = flag(
        None, "JSON merged over the generation config, e.g. '{\"temperature\": 0.5}'"
    )
    chat_template: str | None = flag(None, "a chat template file, or the template itself")
    hf_overrides: dict[str, Any] | None = flag(
        None, "JSON merged into the model's config.json, e.g. '{\"matryoshka_dimensions\": [256, 512]}'"
    )
    pooler_config: dict[str, Any] | None = flag(
        None,
        'JSON pooler overrides, e.g. \'{"pooling_type": "MEAN", "use_activation": false, "dimensions": 256}\'',
    )
    structured_outputs_config: dict[str, Any] | None = flag(
        None,
        'JSON options of structured outputs, as vLLM\'s: {"backend": "guidance" (llguidance, the one there is), '
        '"disable_any_whitespace": true, "disable_additional_properties": true} apply to every request',
    )
    reasoning_parser: str | None = flag(
        None,
        "split a reasoning model's <think> part into the chat message's `reasoning`, and hold structured outputs "
        "back until it ends (deepseek_r1: the template opens it; qwen3: the output does)",
        choices=["deepseek_r1", "qwen3"],
    )
    seed: int = flag(0, "seed for requests that bring none (default 0)")
    attention_backend: str = flag(
        "auto",
        "attention and pooling kernels: auto is Pallas on GPU/TPU and the jnp references on CPU; interpret runs "
        "the Pallas kernels in Pallas' interpreter (slow; for checking them on CPU)",
        choices=["auto", "pallas", "reference", "interpret"],
    )
    tensor_parallel_size: int = flag(
        1,
        "devices one engine spans, its weights, KV cache and attention heads split over them (Megatron-style; "
        "the model's attention heads must divide by it; default 1)",
        short="-tp",
    )
    data_parallel_size: int = flag(
        1,
        "replicas of the model the server runs, each on its own tensor_parallel_size devices; a request goes to "
        "the replica with the least outstanding work (default 1)",
        short="-dp",
    )
    min_token_rung: int | None = flag(
        None,
        "the smallest token bucket: a step's tokens are padded up to a bucket and each bucket is a program to "
        "compile, so a larger one compiles fewer programs and pads small steps more (default 1 on CPU, 16 on GPU "
        "and TPU)",
    )
    compile_cache_dir: str | None = flag(
        None, "JAX's persistent compilation cache (default $JAXSERVE_CACHE_DIR/xla, i.e. ~/.cache/jaxserve/xla)"
    )
    target: str | None = None  # compile only, for this chip (`jaxserve.targets`, `jaxserve compile`); no serving
    strict_compile: bool = True  # compile every bucket before the engine returns; False: the rest in the background
    # which of jax.devices() the engine runs on (a data-parallel replica's group); None: the first
    # tensor_parallel_size, and with one device the default device, unsharded
    device_ids: tuple[int, ...] | None = None
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
        if self.min_token_rung is not None and self.min_token_rung < 1:
            raise ValueError(f"min_token_rung must be at least 1, got {self.min_token_rung}.")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}.")
        if self.target is not None:
            get_target(self.target)
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}.")
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be at least 1, got {self.data_parallel_size}.")
        if self.device_ids is not None and len(self.device_ids) != self.tensor_parallel_size:
            raise ValueError(f"device_ids {self.device_ids} must name tensor_parallel_size devices.")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}.")

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

    def resolved_min_token_rung(self) -> int:
        if self.min_token_rung is not None:
            return self.min_token_rung
        return CPU_MIN_RUNG if self.on_cpu else ACCELERATOR_MIN_RUNG

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
