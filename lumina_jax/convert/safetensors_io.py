"""A small, dependency-free safetensors reader/writer on NumPy (bf16 through ``ml_dtypes``).

Why not the ``safetensors`` package: its NumPy frontend cannot hold bfloat16, and going through torch
would make conversion depend on torch. The format is simple (8-byte little-endian header size, a JSON
header mapping names to dtype/shape/byte offsets, then raw little-endian bytes), so we read tensors one
at a time from a memory map (streaming: peak memory is one tensor, not the file) and write them the same
way. Files we write load with ``safetensors.torch.load_file`` and diffusers' ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from lumina_jax.convert.errors import CheckpointError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Random access to the tensors of one ``.safetensors`` file, validated up front.

    ``keys()`` lists names, ``shape(name)`` / ``dtype(name)`` read the header only, and ``get(name)``
    returns a NumPy array copied out of the memory map (so the file can be closed afterwards).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(
                    f"{self.path}: truncated or not a safetensors file (header says {n} bytes, file has {size})"
                )
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        self._header: dict[str, dict] = header
        self._data_start = 8 + n
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if self._data_start + end > size:
            raise CheckpointError(
                f"{self.path}: truncated safetensors file: tensors need {self._data_start + end} bytes, "
                f"file has {size}"
            )
        for name, v in header.items():
            if v.get("dtype") not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {v.get('dtype')!r}")
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._header[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        if name not in self._header:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        v = self._header[name]
        begin, end = (int(o) for o in v["data_offsets"])
        dt = _DTYPES[v["dtype"]]
        buf = self._mmap[self._data_start + begin : self._data_start + end]
        shape = tuple(v["shape"])
        if buf.size != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name!r} has {buf.size} bytes for shape {shape}")
        return np.frombuffer(buf.tobytes(), dtype=dt.newbyteorder("<")).astype(dt, copy=False).reshape(shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self.keys():
            yield k, self.get(k)

    def close(self) -> None:
        self._mmap = None


def save_file(
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name -> array) to ``path`` in safetensors format.

    Arrays are written in their own dtype (use ``.astype`` first to change it). Accepts an iterable of
    pairs so callers can stream, but the header needs all shapes first, so the pairs are materialised.
    """
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    header: dict[str, dict] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name, arr in items:
        arr = np.asarray(arr)
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {arr.dtype} to safetensors")
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes like the reference writer
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


def tensor_nbytes(arr: np.ndarray) -> int:
    return int(arr.size) * arr.dtype.itemsize
