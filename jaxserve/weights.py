"""Streaming safetensors checkpoints (single file or sharded with an index) into an NNX model skeleton.

The model is built with `nnx.eval_shape`, so no memory is allocated for random weights; each tensor is read
from its file, cast on the host to the model dtype and placed on the device, one at a time. Module state
paths equal the checkpoint's tensor names (see `models/layers.py`), so there is no name map to keep.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def tensor_index(folder: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file that holds it."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weights in {folder}.")
    index: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            index.update({name: file for name in f.keys()})
    return index


def load_weights(skeleton: nnx.Module, folder: Path, dtype, *, progress: bool = True) -> nnx.Module:
    """Fill an abstract model (from `nnx.eval_shape`) with the checkpoint in `folder`, cast to `dtype`."""
    graphdef, state = nnx.split(skeleton)
    params = nnx.to_flat_state(state)
    names = [".".join(str(part) for part in path) for path, _ in params]
    index = tensor_index(folder)
    missing = [name for name in names if name not in index]
    if missing:
        raise ValueError(f"Checkpoint {folder} lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}.")

    host_dtype = np.dtype(jnp.dtype(dtype))
    by_file: dict[Path, list[int]] = {}
    for i, name in enumerate(names):
        by_file.setdefault(index[name], []).append(i)

    loaded: list = [None] * len(params)
    with tqdm(total=len(names), desc=f"Loading {folder.name}", unit="tensor", disable=not progress) as bar:
        for file, positions in by_file.items():
            with safe_open(file, framework="numpy") as f:
                for i in positions:
                    path, var = params[i]
                    array = f.get_tensor(names[i])
                    expected = tuple(var.get_value().shape)
                    if array.shape != expected:
                        raise ValueError(f"{names[i]}: checkpoint shape {array.shape}, model expects {expected}.")
                    loaded[i] = (path, var.replace(jax.device_put(array.astype(host_dtype, copy=False))))
                    bar.update()
    logger.info("Loaded %d tensors from %s as %s", len(names), folder, jnp.dtype(dtype).name)
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))
