"""Streaming writer for PyTorch ``.pth`` files (``torch.load`` reads them; torch is imported lazily).

``torch.save`` pickles one dict of tensors, so the whole model must exist as torch tensors while it
writes: a second copy of the model next to the params being exported. Here the file is written in two
passes with torch's own format machinery, never holding more than one tensor:

1. the file's skeleton (the pickled dict and zero-filled storage records, one per tensor) is written by
   ``torch.save`` under ``torch.serialization.skip_data`` from *fake* tensors (shapes and dtypes, no data);
2. the skeleton's pickle is read back (a restricted unpickler that only records which storage record
   holds which tensor), the records are located in the zip, and each array from the stream is written
   into its record with plain file writes (page cache, not process memory), then dropped; its CRC-32 is
   patched into the record's data descriptor and central-directory entry (``skip_data`` leaves 0 there),
   so the archive also passes ``zipfile``'s integrity check.

The result is an ordinary zip-format ``.pth`` (``torch.load`` with or without ``mmap``/``weights_only``).
torch older than 2.6 lacks ``skip_data``; there the writer falls back to one ``torch.save`` call (a
second copy of the model in memory) and says so with a warning.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import ml_dtypes
import numpy as np

from lumina_jax.convert.errors import CheckpointError

TensorSpec = tuple[str, tuple[int, ...], Any]


def _torch():
    try:
        import torch
    except ImportError as e:
        raise CheckpointError("writing a .pth file needs torch; use a .safetensors path instead") from e
    return torch


def to_torch(a: np.ndarray):
    """A CPU torch tensor with ``a``'s bytes (bfloat16 through an int16 view; shares memory when it can)."""
    torch = _torch()
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if not a.flags.writeable:  # torch.from_numpy warns on read-only arrays
        a = a.copy()
    return torch.from_numpy(a)


def _torch_dtype(dtype: Any):
    torch = _torch()
    dtype = np.dtype(dtype)
    if dtype == ml_dtypes.bfloat16:
        return torch.bfloat16
    try:
        return torch.from_numpy(np.empty(0, dtype)).dtype
    except TypeError:
        raise CheckpointError(f"cannot write a tensor of dtype {dtype} to a .pth file") from None


METADATA_RECORD = "lumina_jax_metadata.json"
"""Name of the extra zip record (next to ``data.pkl``) holding a ``.pth`` file's string metadata, the
counterpart of a safetensors ``__metadata__``; ``torch.load`` does not read records it does not know."""


def save_pth_streaming(path: str | os.PathLike, specs: list[TensorSpec], arrays: Iterable[tuple[str, np.ndarray]],
                       metadata: dict[str, str] | None = None) -> None:
    """Write ``{name: tensor}`` to the ``.pth`` file ``path``, one array of ``arrays`` in memory at a time.

    ``specs`` lists ``(name, shape, dtype)`` of every tensor; ``arrays`` yields ``(name, array)`` in the
    same order (a mismatch is a :class:`CheckpointError` naming the tensor). ``metadata`` (strings) goes
    into an extra record that :func:`read_pth_metadata` reads back.
    """
    torch = _torch()
    if not hasattr(torch.serialization, "skip_data"):
        warnings.warn(
            f"torch {torch.__version__} has no torch.serialization.skip_data (torch >= 2.6): writing the .pth "
            "with one torch.save call, which holds a second copy of the model in memory",
            stacklevel=2,
        )
        torch.save({name: to_torch(a) for name, a in arrays}, path)
        _add_metadata(path, metadata)
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        skeleton = {name: torch.empty(tuple(shape), dtype=_torch_dtype(dt)) for name, shape, dt in specs}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(skeleton, path)
    del skeleton

    records = _storage_records(path)
    it = iter(arrays)
    with open(path, "r+b") as f:
        for name, shape, dt in specs:
            got_name, arr = next(it, (None, None))
            arr = None if arr is None else np.asarray(arr)
            if arr is None or got_name != name or tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dt):
                got = "nothing" if arr is None else f"{got_name} {tuple(arr.shape)} {arr.dtype}"
                raise CheckpointError(
                    f"tensor stream out of plan: expected {name} {tuple(shape)} {np.dtype(dt)}, got {got}"
                )
            data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            rec = records[name]
            if data.nbytes != rec.nbytes:
                raise CheckpointError(f"{path}: record for {name!r} holds {rec.nbytes} bytes, tensor has {data.nbytes}")
            f.seek(rec.offset)
            f.write(data)
            crc = struct.pack("<I", zlib.crc32(data))
            for pos in rec.crc_at:
                f.seek(pos)
                f.write(crc)
            del arr, data
    _add_metadata(path, metadata)


def _archive_prefix(zf: zipfile.ZipFile) -> str:
    pkl = next((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), None)
    if pkl is None:
        raise CheckpointError(f"{zf.filename}: not a torch.save archive (no data.pkl)")
    return pkl[: -len("data.pkl")]


def _add_metadata(path: str | os.PathLike, metadata: dict[str, str] | None) -> None:
    """Append the :data:`METADATA_RECORD` to a finished archive (the tensor records do not move)."""
    if not metadata:
        return
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(_archive_prefix(zf) + METADATA_RECORD, json.dumps(metadata, sort_keys=True))


def read_pth_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata :func:`save_pth_streaming` stored in ``path`` (``{}`` for other ``.pth`` files,
    including the legacy non-zip format)."""
    if not zipfile.is_zipfile(path):
        return {}
    with zipfile.ZipFile(path) as zf:
        name = _archive_prefix(zf) + METADATA_RECORD
        if name not in zf.namelist():
            return {}
        try:
            meta = json.loads(zf.read(name))
        except (ValueError, zipfile.BadZipFile, zlib.error) as e:
            raise CheckpointError(f"{path}: its {METADATA_RECORD} record is corrupt ({e})") from None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: its {METADATA_RECORD} record is not an object of strings")
    return meta


@dataclass(frozen=True)
class _Record:
    offset: int  # of the tensor's bytes in the file
    nbytes: int
    crc_at: tuple[int, ...]  # file positions of the record's CRC-32 fields


class _SkeletonUnpickler(pickle.Unpickler):
    """Reads a ``torch.save`` pickle of ``{name: tensor}`` into ``{name: storage key}`` without torch."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda key, offset, *_: key if offset == 0 else None
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a .pth skeleton")

    def persistent_load(self, pid: Any) -> str:
        return pid[2]  # ("storage", storage type, key, location, numel)


def _storage_records(path: str | os.PathLike) -> dict[str, _Record]:
    """Locate every tensor's storage record in a ``torch.save`` zip, with its CRC-32 fields."""
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        infos = zf.infolist()
        pkl = next(i.filename for i in infos if i.filename.rsplit("/", 1)[-1] == "data.pkl")
        prefix = pkl[: -len("data.pkl")]
        keys = _SkeletonUnpickler(io.BytesIO(zf.read(pkl))).load()
        central = {}  # name -> position of the CRC field of its central-directory entry
        pos = zf.start_dir
        for _ in infos:
            f.seek(pos)
            head = f.read(46)
            n, e, c = struct.unpack("<HHH", head[28:34])
            central[f.read(n).decode("utf-8")] = pos + 16
            pos += 46 + n + e + c
        by_name = {i.filename: i for i in infos}
        out = {}
        for tensor, key in keys.items():
            info = by_name.get(f"{prefix}data/{key}") if key is not None else None
            if info is None or info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{path}: no stored record for tensor {tensor!r} in the .pth skeleton")
            f.seek(info.header_offset)
            n, e = struct.unpack("<HH", f.read(30)[26:30])
            offset = info.header_offset + 30 + n + e
            crc_at = [central[info.filename]]
            if info.flag_bits & 0x08:  # a data descriptor follows the data: [signature] crc sizes
                f.seek(offset + info.file_size)
                crc_at.append(offset + info.file_size + (4 if f.read(4) == b"PK\x07\x08" else 0))
            else:
                crc_at.append(info.header_offset + 14)
            out[tensor] = _Record(offset, info.file_size, tuple(crc_at))
    return out
