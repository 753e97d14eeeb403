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
    "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
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
                header = json.loads(f.read(n), object_pairs_hook=_unique_keys)
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(x, str) for x in self.metadata.values()):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (__metadata__ must map names to "
                                  f"strings, got {str(self.metadata)[:200]})")  # fmt: skip
        natural = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0  # noqa: E731
        for name, v in header.items():
            offsets = v.get("data_offsets") if isinstance(v, dict) else None
            shape = v.get("shape") if isinstance(v, dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(natural(o) for o in offsets)
                    and offsets[0] <= offsets[1] and isinstance(shape, list) and all(natural(d) for d in shape)):  # fmt: skip
                raise CheckpointError(f"{self.path}: corrupt safetensors header entry for tensor {name!r}: {v!r}")
        reach, owner = 0, None  # the furthest byte the tensors so far take, and whose it is
        for begin, end, name in sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items()):
            if begin == end:  # an empty tensor takes no bytes
                continue
            if begin < reach:
                raise CheckpointError(f"{self.path}: corrupt safetensors header: tensors {owner!r} and {name!r} overlap")
            reach, owner = end, name
        self._header: dict[str, dict] = header
        self._data_start = 8 + n
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if self._data_start + end > size:
            raise CheckpointError(
                f"{self.path}: truncated safetensors file: tensors need {self._data_start + end} bytes, "
                f"file has {size}"
            )
        # a dtype this reader does not know is an error only when that tensor is read: a file may carry
        # tensors nobody here reads (e.g. fp8 text-encoder weights in an all-in-one checkpoint)

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._header[name].get("dtype")
        if code not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {code!r}; known: "
                                  f"{sorted(_DTYPES)}")  # fmt: skip
        return _DTYPES[code]

    def get(self, name: str) -> np.ndarray:
        """Read one tensor with a positioned read into a fresh array.

        (A memory map would be simpler, but every page it touches stays counted in the process's
        resident memory while the map is open, doubling the apparent peak of a streaming conversion.)
        """
        if name not in self._header:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        v = self._header[name]
        begin, end = (int(o) for o in v["data_offsets"])
        dt = self.dtype(name)
        shape = tuple(v["shape"])
        n = int(np.prod(shape, dtype=np.int64))
        if end - begin != n * dt.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
        out = np.empty(shape, dtype=dt)
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + begin)
            got = 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
                got += k
        # safetensors stores little-endian; the buffer was filled with those bytes under a native dtype
        return out if np.little_endian or dt.itemsize == 1 else out.byteswap()

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self.keys():
            yield k, self.get(k)

    def close(self) -> None:  # nothing is held open between reads
        pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict; a name given twice is an error (not the last one silently)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the name {k!r} appears twice")
        out[k] = v
    return out


TensorSpec = tuple[str, tuple[int, ...], np.dtype]


def save_file_streaming(
    path: str | os.PathLike,
    specs: list[TensorSpec],
    arrays: Iterable[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors one at a time: the header comes from ``specs`` (name, shape, dtype), then each
    array from ``arrays`` (same names, same order) is written and dropped, so only one is in memory."""
    header: dict[str, dict] = {}
    if metadata:  # strings, as the format wants: other values as JSON (True -> "true", not Python's "True")
        header["__metadata__"] = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    offset = 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype).newbyteorder("=")  # a big-endian array is written as little-endian
        if dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {dtype} to safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes like the reference writer
    it = iter(arrays)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            got_name, arr = next(it)
            arr = np.asarray(arr)
            if got_name != name or tuple(arr.shape) != tuple(shape) or \
                    arr.dtype.newbyteorder("=") != np.dtype(dtype).newbyteorder("="):  # fmt: skip
                raise CheckpointError(
                    f"tensor stream out of plan: expected {name} {tuple(shape)} {np.dtype(dtype)}, "
                    f"got {got_name} {tuple(arr.shape)} {arr.dtype}"
                )
            f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
            del arr  # before the stream makes the next one


def save_file(
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name -> array, in their own dtypes) to ``path`` in safetensors format.

    Holds all of them; use :func:`save_file_streaming` when the shapes are known up front.
    """
    items = [(k, np.asarray(v)) for k, v in (tensors.items() if isinstance(tensors, Mapping) else tensors)]
    save_file_streaming(path, [(k, v.shape, v.dtype) for k, v in items], items, metadata)


def tensor_nbytes(arr: np.ndarray) -> int:
    return int(arr.size) * arr.dtype.itemsize
