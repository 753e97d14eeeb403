"""A small, pickle-free record format for ArrayRecord shards, and an atomic, resumable shard writer.

Record layout (version ``LJR1``)::

    b"LJR1" | uint32 little-endian header length N | N bytes of UTF-8 JSON header | payload bytes

The JSON header is ``{"fields": {...}, "arrays": {...}, "blobs": {...}}``:

* ``fields``: JSON-serialisable values (str, int, float, bool, None, lists, dicts);
* ``blobs``: ``name -> [offset, nbytes]`` for ``bytes`` values (e.g. an encoded PNG/JPEG);
* ``arrays``: ``name -> [dtype, shape, offset, nbytes]`` for numpy arrays, stored C-contiguous,
  little-endian; ``dtype`` is a numpy dtype name, ``"bfloat16"`` included (via ``ml_dtypes``).

Offsets are relative to the start of the payload. The format is self-describing, safe to read from
untrusted files (no pickle), and readable from any language.

Shards are written with :class:`array_record` (``group_size:1`` for cheap random access) to a temporary
name and renamed into place only when complete, so a shard file that exists under its final name is
always whole; :func:`write_sharded` uses that to resume an interrupted job by skipping finished shards.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import struct
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import ml_dtypes
import numpy as np

MAGIC = b"LJR1"
_HEADER_LEN = struct.Struct("<I")
_EXTRA_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16)}

SHARD_SUFFIX = ".array_record"


class RecordFormatError(ValueError):
    """A byte string is not a valid ``LJR1`` record."""


def _dtype_name(dtype: np.dtype) -> str:
    if dtype == _EXTRA_DTYPES["bfloat16"]:
        return "bfloat16"
    if dtype.kind not in "biufc":
        raise TypeError(f"unsupported array dtype {dtype} (numeric and bool only)")
    return dtype.newbyteorder("<").str if dtype.byteorder == ">" else dtype.name


def _dtype_from_name(name: str) -> np.dtype:
    return _EXTRA_DTYPES.get(name) or np.dtype(name)


def encode_record(record: Mapping[str, Any]) -> bytes:
    """Serialises a flat mapping of str keys to JSON values, ``bytes`` or numpy arrays."""
    fields: dict[str, Any] = {}
    arrays: dict[str, list] = {}
    blobs: dict[str, list] = {}
    payload: list[bytes] = []
    offset = 0
    for key, value in record.items():
        if not isinstance(key, str):
            raise TypeError(f"record keys must be str, got {key!r}")
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            blobs[key] = [offset, len(data)]
        elif isinstance(value, np.ndarray) or (
            isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_))
        ):
            arr = np.asarray(value)
            name = _dtype_name(arr.dtype)
            arr = np.asarray(arr, dtype=_dtype_from_name(name), order="C")
            data = arr.tobytes()
            arrays[key] = [name, list(arr.shape), offset, len(data)]
        else:
            try:
                json.dumps(value)
            except TypeError as e:
                raise TypeError(f"field {key!r}: {type(value).__name__} is not JSON-serialisable") from e
            fields[key] = value
            continue
        payload.append(data)
        offset += len(data)
    header = json.dumps(
        {"fields": fields, "arrays": arrays, "blobs": blobs}, separators=(",", ":")
    ).encode("utf-8")
    return b"".join([MAGIC, _HEADER_LEN.pack(len(header)), header, *payload])


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_record`. Arrays are returned as read-only views into ``data``."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[:4]) != MAGIC:
        raise RecordFormatError("not an LJR1 record (bad magic)")
    try:
        (n,) = _HEADER_LEN.unpack_from(data, 4)
        start = 8 + n
        header = json.loads(bytes(data[8:start]).decode("utf-8"))
        out: dict[str, Any] = dict(header["fields"])
        view = memoryview(data)
        for key, (offset, nbytes) in header["blobs"].items():
            if start + offset + nbytes > len(data):
                raise RecordFormatError(f"blob {key!r} runs past the end of the record")
            out[key] = bytes(view[start + offset : start + offset + nbytes])
        for key, (dtype, shape, offset, nbytes) in header["arrays"].items():
            if start + offset + nbytes > len(data):
                raise RecordFormatError(f"array {key!r} runs past the end of the record")
            arr = np.frombuffer(
                view[start + offset : start + offset + nbytes], dtype=_dtype_from_name(dtype)
            )
            out[key] = arr.reshape(shape)
    except RecordFormatError:
        raise
    except Exception as e:  # malformed header / sizes
        raise RecordFormatError(f"corrupt LJR1 record: {e}") from e
    return out


# ---------------------------------------------------------------------------------------------------
# Shards


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}{SHARD_SUFFIX}"


def list_shards(directory: str | os.PathLike, prefix: str) -> list[Path]:
    """Completed shards ``<prefix>-NNNNN.array_record`` in ``directory``, in index order."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{5,}}){re.escape(SHARD_SUFFIX)}$")
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = sorted(
        (int(m.group(1)), p) for p in directory.iterdir() if (m := pattern.match(p.name))
    )
    return [p for _, p in found]


def write_shard(path: str | os.PathLike, records: Iterable[bytes]) -> int:
    """Writes serialised records to ``path`` atomically (temp file + rename). Returns the count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    count = 0
    try:
        for rec in records:
            writer.write(rec)
            count += 1
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        try:
            writer.close()
        except Exception:
            pass
        tmp.unlink(missing_ok=True)
        raise
    return count


def write_sharded(
    records: Iterable[Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    shard_size: int,
    prefix: str,
    encode: Callable[[Mapping[str, Any]], bytes] = encode_record,
    on_shard: Optional[Callable[[Path, int], None]] = None,
) -> list[Path]:
    """Writes ``records`` as shards of ``shard_size`` records, skipping shards that already exist.

    Shard ``i`` holds records ``[i*shard_size, (i+1)*shard_size)``; the last one may be shorter.
    If ``records`` has ``len`` and integer indexing (a list or a lazy sequence) the records of finished shards
    are never touched, so a lazy sequence (e.g. one that runs an encoder in ``__getitem__``) does no
    work for them; a plain iterable is consumed and its finished records discarded.
    The same ``records`` and ``shard_size`` must be used when resuming.
    ``on_shard(path, num_records)`` is called after each newly written shard is renamed into place
    (not for shards that already existed); ``encode`` has then been called once for each of its
    records, in order, and for no record of a later shard.
    Returns the paths of all shards, in order.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {p.name for p in list_shards(out_dir, prefix)}
    paths: list[Path] = []

    if _is_indexable(records):
        n = len(records)
        for shard in range((n + shard_size - 1) // shard_size):
            path = out_dir / shard_name(prefix, shard)
            paths.append(path)
            if path.name in done:
                continue
            lo, hi = shard * shard_size, min(n, (shard + 1) * shard_size)
            count = write_shard(path, (encode(records[i]) for i in range(lo, hi)))
            if on_shard is not None:
                on_shard(path, count)
        return paths

    iterator: Iterator[Mapping[str, Any]] = iter(records)
    for shard in itertools.count():
        chunk = list(itertools.islice(iterator, shard_size))
        if not chunk:
            break
        path = out_dir / shard_name(prefix, shard)
        paths.append(path)
        if path.name not in done:
            count = write_shard(path, (encode(r) for r in chunk))
            if on_shard is not None:
                on_shard(path, count)
        if len(chunk) < shard_size:
            break
    return paths


def _is_indexable(obj: Any) -> bool:
    """``len`` + integer ``__getitem__`` (a list, or any lazy sequence-like object).

    Checked by duck typing, not ``isinstance(obj, Sequence)``: an object with ``__getitem__`` but
    not registered as a ``Sequence`` would otherwise be iterated with the legacy ``__getitem__``
    protocol, which never ends unless ``__getitem__`` raises ``IndexError``.
    """
    return (
        hasattr(obj, "__len__")
        and hasattr(obj, "__getitem__")
        and not isinstance(obj, (Mapping, str, bytes))
    )


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to a hidden temp sibling and renames it to ``path`` (removed if the write fails), so
    readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_int32_npy_atomic(path: str | os.PathLike, array: Any) -> None:
    """``array`` as an int32 ``.npy`` file, written atomically (:func:`write_bytes_atomic`)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.int32), allow_pickle=False)
    write_bytes_atomic(path, buf.getvalue())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode())


class ShardedRecordReader:
    """Random access over the records of several ArrayRecord shards (``__len__``/``__getitem__``).

    Picklable (reopens files lazily in each process), so it can travel to grain worker processes.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self._paths = [str(p) for p in paths]
        if not self._paths:
            raise ValueError("no shard paths given")
        self._source = None

    def _open(self):
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource(self._paths)
        return self._source

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, index: int) -> bytes:
        return self._open()[index]

    def __getstate__(self):
        return {"_paths": self._paths, "_source": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
