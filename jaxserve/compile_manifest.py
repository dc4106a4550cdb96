"""What `jaxserve compile` put in a compilation cache folder, and whether it applies to the engine at hand.

JAX's persistent cache is keyed by the program, the compiler and the device, so programs compiled for another
chip, another JAX or other shapes are simply never found, and the engine silently compiles. The manifest,
`jaxserve-manifest.json` beside the cache entries, records per model and target what was compiled: the JAX
and jaxlib versions, the device, the engine's limits (which fix the programs' shapes, the KV page count among
them) and each bucket's compile seconds and memory. An engine started on that cache folder reads it to adopt
the compiled page count and to say, rather than silently recompile, why the cache does not apply.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jaxlib

from .compiled import BucketReport

logger = logging.getLogger(__name__)

MANIFEST_NAME = "jaxserve-manifest.json"


@dataclasses.dataclass
class CompiledModel:
    """One `jaxserve compile` of one model for one target."""

    model: str  # as given to `jaxserve compile`
    model_hash: str  # of the model's config (after overrides), runner and pooler settings
    runner: str  # "generate" or "pooling"
    target: str
    device_kind: str
    jax: str
    jaxlib: str
    limits: dict[str, Any]  # what fixes the programs' shapes and types: dtype, lengths, bucket sizes, KV pages
    buckets: list[BucketReport]
    created: str = ""

    @property
    def versions(self) -> str:
        return f"JAX {self.jax}, jaxlib {self.jaxlib}"

    def describe(self) -> str:
        return f"{self.target} ({self.device_kind}) with {self.versions}"


def model_hash(hf_config: dict[str, Any], runner: str, pooler_config: dict | None) -> str:
    """Which model an entry is for, wherever its folder lies: its config, runner and pooler settings."""
    # the engine sets max_model_len on the config (longrope reads it); the limits carry it
    config = {key: value for key, value in hf_config.items() if key != "max_model_len"}
    text = json.dumps([config, runner, pooler_config or {}], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_manifest(cache_dir: Path) -> list[CompiledModel]:
    """The entries of the folder's manifest; none when there is no manifest or it cannot be read."""
    path = cache_dir / MANIFEST_NAME
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
        return [CompiledModel(**{**e, "buckets": [BucketReport(**b) for b in e["buckets"]]}) for e in raw["compiled"]]
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("Ignoring the unreadable compile manifest %s: %s", path, error)
        return []


def record(cache_dir: Path, entry: CompiledModel) -> Path:
    """Add `entry` to the folder's manifest, replacing an earlier compile of the same model for the same
    target."""
    entry.created = entry.created or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    kept = [
        e
        for e in read_manifest(cache_dir)
        if (e.model_hash, e.runner, e.target) != (entry.model_hash, entry.runner, entry.target)
    ]
    path = cache_dir / MANIFEST_NAME
    body = {"compiled": [dataclasses.asdict(e) for e in [*kept, entry]]}
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path


def current_versions() -> tuple[str, str]:
    return jax.__version__, jaxlib.__version__


def applicable(
    cache_dir: Path, model_hash: str, runner: str, target: str, device_kind: str
) -> tuple[CompiledModel | None, list[CompiledModel]]:
    """(the entry compiled for this model on this device with this JAX, else None; the model's other entries)."""
    entries = [e for e in read_manifest(cache_dir) if (e.model_hash, e.runner) == (model_hash, runner)]
    versions = current_versions()
    for entry in entries:
        if (entry.target, entry.device_kind, (entry.jax, entry.jaxlib)) == (target, device_kind, versions):
            return entry, []
    return None, entries
