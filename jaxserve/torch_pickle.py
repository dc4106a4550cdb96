"""Read PyTorch `torch.save` state dicts (`.pt`, `.bin`) without PyTorch.

Some models ship small heads this way (bge-m3's `colbert_linear.pt` and `sparse_linear.pt`, older
sentence-transformers `2_Dense/pytorch_model.bin`). A `torch.save` file is a zip archive: `data.pkl` pickles
the dict, each tensor refers to a storage by key, and `data/<key>` holds that storage's raw bytes. The
unpickler below admits only the handful of globals a state dict needs, so a file cannot run code.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
    return data


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a state dict")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        return np.frombuffer(self._archive.read(f"{self._prefix}data/{key}"), dtype=dtype)


def load_torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    """name → numpy array for a zip-format `torch.save` of a dict of tensors."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path} is not a torch.save zip archive (found {len(pickles)} data.pkl files).")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as file:
            state = _StateDictUnpickler(file, archive, prefix).load()
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict.")
    return dict(state)
