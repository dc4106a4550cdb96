"""Streaming checkpoints into an NNX model skeleton: safetensors (single file or sharded with an index), or
PyTorch `.bin` files (single or sharded), read without PyTorch (`torch_pickle.py`).

The model is built with `nnx.eval_shape`, so no memory is allocated for random weights; each tensor is read
from its file, cast on the host to the model dtype and placed on the device, one at a time. Module state
paths equal the checkpoint's tensor names (see `models/layers.py`), so there is no name map to keep.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from tqdm.auto import tqdm

from .torch_pickle import load_torch_state_dict

logger = logging.getLogger(__name__)


def tensor_index(folder: Path) -> dict[str, Path]:
    """Tensor name → the file that holds it: safetensors, else PyTorch `.bin` (an index file maps shards)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_file = folder / index_name
        if index_file.exists():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors (or pytorch_model*.bin) weights in {folder}.")
    index: dict[str, Path] = {}
    for file in files:
        with _open(file) as f:
            index.update({name: file for name in f.keys()})
    return index


class _TorchFile:
    """A PyTorch `.bin` checkpoint with safetensors' reader interface (read whole: pickles are not indexed)."""

    def __init__(self, path: Path):
        self._tensors = load_torch_state_dict(path)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get_tensor(self, name: str) -> np.ndarray:
        return self._tensors[name]


@contextlib.contextmanager
def _open(path: Path):
    if path.suffix == ".bin":
        yield _TorchFile(path)
    else:
        with safe_open(path, framework="numpy") as reader:
            yield reader


class _SafetensorsSlice:
    """A tensor of a safetensors file read in parts: indexing reads only the part asked for."""

    def __init__(self, part):
        self._part = part
        self.shape = tuple(part.get_shape())

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self._part[index])


def _tensor(reader, name: str, sharded: bool):
    """The tensor to place: read whole, or (sharded, from safetensors) to be read by the part each device takes."""
    if sharded and hasattr(reader, "get_slice"):
        return _SafetensorsSlice(reader.get_slice(name))
    return reader.get_tensor(name)


def _place(array, host_dtype: np.dtype, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """On the device, cast on the host; with a sharding, each device's part read and cast by itself."""
    if sharding is None:
        return jax.device_put(np.asarray(array).astype(host_dtype, copy=False))

    def part(index) -> np.ndarray:
        return np.asarray(array[index]).astype(host_dtype, copy=False)

    return jax.make_array_from_callback(tuple(array.shape), sharding, part)


def read_tensor(folder: Path, name: str, index: Mapping[str, Path] | None = None) -> np.ndarray:
    """One tensor of the checkpoint in `folder`, as numpy (`index`: its `tensor_index`, if already read)."""
    index = tensor_index(folder) if index is None else index
    if name not in index:
        raise KeyError(f"Checkpoint {folder} has no tensor {name!r}.")
    with _open(index[name]) as reader:
        return np.asarray(reader.get_tensor(name))


def checkpoint_names(
    name: str, aliases: Mapping[str, tuple[str, ...]], renames: Mapping[str, str] | None = None
) -> list[str]:
    """Where a model tensor may sit in a checkpoint: its own name, then each alias of a matching prefix; each of
    these also with `renames` applied (module-name substring → the checkpoint's, in order)."""
    names = [name]
    for prefix, replacements in aliases.items():
        if name.startswith(prefix):
            names += [replacement + name[len(prefix) :] for replacement in replacements]
    if renames:
        for plain in list(names):
            for ours, theirs in renames.items():
                plain = plain.replace(ours, theirs)
            names.append(plain)
    return names


def load_weights(
    skeleton: nnx.Module,
    folder: Path,
    dtype,
    *,
    extra: Mapping[str, np.ndarray] | None = None,
    aliases: Mapping[str, tuple[str, ...]] | None = None,
    renames: Mapping[str, str] | None = None,
    progress: bool = True,
    sharding: Callable[[nnx.Variable], jax.sharding.Sharding] | None = None,
) -> nnx.Module:
    """Fill an abstract model (from `nnx.eval_shape`) with the checkpoint in `folder`, cast to `dtype`.

    `extra` holds tensors from outside the checkpoint files (heads shipped as .pt, sentence-transformers
    Dense layers); `aliases` maps a module path prefix to the prefixes the checkpoint may use instead, and
    `renames` the module's names for parts of a layer to the checkpoint's (`checkpoint_names`). With `sharding`
    (a parameter's sharding over a device mesh), each device receives only its shard, read from the file by itself
    where the format allows (safetensors slices), so no device ever holds a whole tensor it only has a part of."""
    graphdef, state = nnx.split(skeleton)
    params = nnx.to_flat_state(state)
    extra = {} if extra is None else extra  # not copied: a lazy mapping reads each tensor when it is loaded
    index = tensor_index(folder)
    sources = []
    missing = []
    for path, _ in params:
        name = ".".join(str(part) for part in path)
        found = next((n for n in checkpoint_names(name, aliases or {}, renames) if n in extra or n in index), None)
        if found is None:
            missing.append(name)
        sources.append(found)
    if missing:
        raise ValueError(f"Checkpoint {folder} lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}.")

    host_dtype = np.dtype(jnp.dtype(dtype))
    by_file: dict[Path | None, list[int]] = {}
    for i, source in enumerate(sources):
        by_file.setdefault(None if source in extra else index[source], []).append(i)

    loaded: list = [None] * len(params)
    with tqdm(total=len(params), desc=f"Loading {folder.name}", unit="tensor", disable=not progress) as bar:
        for file, positions in by_file.items():
            with contextlib.ExitStack() as stack:
                reader = stack.enter_context(_open(file)) if file else None
                for i in positions:
                    path, var = params[i]
                    array = extra[sources[i]] if file is None else _tensor(reader, sources[i], sharded=bool(sharding))
                    expected = tuple(var.get_value().shape)
                    if tuple(array.shape) != expected:
                        raise ValueError(f"{sources[i]}: checkpoint shape {array.shape}, model expects {expected}.")
                    loaded[i] = (path, var.replace(_place(array, host_dtype, sharding(var) if sharding else None)))
                    bar.update()
    logger.info("Loaded %d tensors from %s as %s", len(params), folder, jnp.dtype(dtype).name)
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))
