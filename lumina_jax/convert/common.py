"""Shared plumbing for checkpoint conversion: streaming readers/writers, pytree paths, atomic output.

Every foreign format gets one *key mapper* (a module next to this one) used by the loader, the
exporter and the parity tests alike; this file holds only what those mappers share.

Conventions:
- JAX params are nested dicts; a param is addressed by a ``/``-joined path (``"layers/blocks/attention/q/kernel"``).
- Tensors move as host NumPy arrays (bf16 via ``ml_dtypes``), never through torch unless the file is a
  pickled ``.pth`` (then torch is imported lazily, and tensors are memory-mapped).
- Output goes to a temporary sibling and is renamed into place only when the whole conversion
  succeeded, so a failed or interrupted conversion never leaves a half-written checkpoint at ``dst``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import ml_dtypes
import numpy as np

from lumina_jax.convert.errors import CheckpointError
from lumina_jax.convert.safetensors_io import SafetensorsFile

log = logging.getLogger(__name__)

Params = dict[str, Any]

SAFETENSORS_INDEX = "model.safetensors.index.json"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


# ----------------------------------------------------------------------------------------------
# pytree paths


def plain_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """``params`` without flax's logical-partitioning boxes and without a lone ``{"params": ...}`` wrapper,
    so that what ``Module.init`` returns can be saved as it is."""
    from flax.core import meta

    params = meta.unbox(params)
    if isinstance(params, Mapping) and len(params) == 1 and "params" in params:
        params = params["params"]
    return params


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> Params:
    """``{"a/b/c": leaf}`` -> nested dict."""
    tree: Params = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def shapes_of(flat: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in flat.items()}


# ----------------------------------------------------------------------------------------------
# dtypes

_DTYPE_NAMES = {"fp32": np.float32, "float32": np.float32, "bf16": ml_dtypes.bfloat16, "bfloat16": ml_dtypes.bfloat16,
                "fp16": np.float16, "float16": np.float16}


def resolve_dtype(dtype: Any) -> np.dtype | None:
    """``"fp32" | "bf16" | "fp16" | np.dtype | None`` -> NumPy dtype (None keeps the source dtype)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPE_NAMES)}")
        return np.dtype(_DTYPE_NAMES[dtype])
    return np.dtype(dtype)


def to_numpy(x: Any) -> np.ndarray:
    """JAX/NumPy/torch array -> host NumPy, bit-exact (bf16 kept as ``ml_dtypes.bfloat16``)."""
    if type(x).__module__.startswith("torch"):
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        try:
            return x.numpy()
        except TypeError as e:  # float8 / complex32 / quantized tensors NumPy has no dtype for
            raise CheckpointError(f"unsupported tensor dtype {x.dtype} ({e}); convert the checkpoint to "
                                  f"float32 / bfloat16 / float16 first") from None
    return np.asarray(x)


# ----------------------------------------------------------------------------------------------
# reading state dicts, one tensor at a time


def _is_torch_tensor(v: Any) -> bool:
    return type(v).__module__.startswith("torch") and hasattr(v, "shape") and hasattr(v, "dtype")


def state_dict_of(obj: Any, f: Path, pth_key: Optional[str] = None, _depth: int = 0) -> dict[str, Any]:
    """The tensors of a loaded ``.pth`` object ``obj``: a state dict, or one wrapped in a dict of state
    dicts (``{"model": sd}``, ``{"ema": sd}``, ``{"model": sd, "ema": sd_ema, "step": 10}``, nested up to
    two levels). ``pth_key`` picks the wrapped one to read; without it a file holding several reads
    ``"model"`` (logged, naming the others) and is an error when there is no ``"model"``. Non-tensor
    entries beside tensors (``"step": 100``) are dropped with a warning."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{f}: expected a state dict, found {type(obj).__name__}")
    nested = {k: v for k, v in obj.items() if isinstance(v, dict) and any(
        _is_torch_tensor(x) or isinstance(x, dict) for x in v.values())}  # fmt: skip
    if pth_key is not None:
        if pth_key not in nested:
            raise CheckpointError(f"{f}: no state dict under pth_key {pth_key!r} (state dicts there: "
                                  f"{sorted(map(str, nested)) or 'none, the file is one state dict'})")  # fmt: skip
        return state_dict_of(nested[pth_key], f, None, _depth + 1)
    tensors = {k: v for k, v in obj.items() if _is_torch_tensor(v)}
    if nested and all(v.ndim == 0 for v in tensors.values()):  # {"model": sd, "step": tensor(100)}: a wrapper
        tensors = {}
    if tensors:
        dropped = sorted(str(k) for k in obj if k not in tensors)
        if dropped:
            log.warning("%s: ignoring %d entries that are not tensors: %s", f, len(dropped),
                        ", ".join(dropped[:10]) + (", ..." if len(dropped) > 10 else ""))  # fmt: skip
        return tensors
    if not nested or _depth >= 2:
        raise CheckpointError(f"{f}: holds no tensors (top-level keys: {sorted(map(str, obj))[:10]})")
    if len(nested) == 1:
        key = next(iter(nested))
    elif "model" in nested:
        key = "model"
        log.info("%s: reading the state dict under 'model'; the file also has %s (pass pth_key= to read one)",
                 f, ", ".join(repr(k) for k in nested if k != "model"))  # fmt: skip
    else:
        raise CheckpointError(f"{f}: several state dicts ({sorted(map(str, nested))}); pass pth_key= to pick one")
    return state_dict_of(nested[key], f, None, _depth + 1)


class TensorSource:
    """Read-only, lazily loaded mapping ``name -> np.ndarray`` over one or many files.

    Accepts a ``.safetensors`` file, a directory with one or more ``*.safetensors`` (with an index json
    only the shards it names are read, else every file), or a pickled PyTorch file (``.pth``/``.pt``/``.bin``; needs torch). Tensors are read on
    ``get`` so that a converter can stream.
    """

    def __init__(self, path: str | os.PathLike, *, pth_key: Optional[str] = None):
        self.path = Path(path)
        self.pth_key = pth_key  # which state dict of a wrapped .pth ({'model': ..., 'ema': ...}) to read
        self._where: dict[str, Any] = {}
        self._file_of: dict[str, Path] = {}
        self._torch_sd: dict[str, Any] | None = None
        self.metadata: dict[str, str] = {}  # the files' ``__metadata__`` (safetensors) or metadata record (.pth), merged
        self.metadata_error: Optional[str] = None  # why a .pth metadata record could not be read
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        files: list[Path]
        if self.path.is_dir():
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                pth = sorted(self.path.glob("*.pth")) + sorted(self.path.glob("*.bin"))
                if not pth:
                    raise CheckpointError(f"{self.path}: no .safetensors/.pth/.bin files in directory")
                files = pth
            for idx_name in (SAFETENSORS_INDEX, DIFFUSERS_INDEX):
                idx = self.path / idx_name
                if idx.exists():
                    weight_map = read_json(idx, key="weight_map")["weight_map"]
                    if not isinstance(weight_map, dict):
                        raise CheckpointError(f"{idx}: 'weight_map' is not an object")
                    wanted = set(weight_map.values())
                    missing = sorted(w for w in wanted if not (self.path / w).exists())
                    if missing:
                        raise CheckpointError(f"{self.path}: index {idx_name} names missing shards {missing}")
                    # like transformers/diffusers: the index decides which files hold the weights (a
                    # variant such as model.fp16.safetensors next to the shards is not read)
                    files = sorted(self.path / w for w in wanted)
                    break
            else:  # no index: a variant (model.fp16.safetensors) next to its main file is not read either
                stems = {f.stem for f in files}
                files = [f for f in files if f.stem.rpartition(".")[0] not in stems]
        else:
            files = [self.path]
        for f in files:
            if f.suffix.lower() == ".safetensors":
                st = SafetensorsFile(f)
                self.metadata.update(st.metadata)
                for k in st.keys():
                    self._add(k, st, f)
            else:
                for k, v in self._load_torch(f, self.pth_key).items():
                    self._add(k, v, f)
                from lumina_jax.convert.torch_io import read_pth_metadata

                try:
                    self.metadata.update(read_pth_metadata(f))
                except CheckpointError as e:  # the weights may still be read, with a config given
                    self.metadata_error = str(e)

    def _add(self, key: str, where: Any, f: Path) -> None:
        if key in self._where:
            raise CheckpointError(f"{self.path}: tensor {key!r} appears in more than one file "
                                  f"({self._file_of[key].name} and {f.name})")  # fmt: skip
        self._where[key] = where
        self._file_of[key] = f

    @staticmethod
    def _load_torch(f: Path, pth_key: Optional[str] = None) -> dict[str, Any]:
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise CheckpointError(f"{f}: reading a pickled PyTorch checkpoint needs torch installed") from e
        with open(f, "rb") as fh:
            head = fh.read(9)
        if _looks_like_safetensors(head, f.stat().st_size):
            raise CheckpointError(f"{f}: this is a safetensors file with a {f.suffix} name; rename it to "
                                  f"{f.with_suffix('.safetensors').name}")  # fmt: skip
        if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save: a zip, or (before 1.6) a pickle
            raise CheckpointError(f"{f}: not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle)")
        try:  # torch memory-maps only the zip format; legacy (pre-1.6) files are read whole
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
        except Exception as e:  # torch raises many types for corrupt/truncated zips
            unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if unsupported:  # a training checkpoint that pickles its args or other objects with the weights
                raise CheckpointError(
                    f"{f}: the checkpoint pickles a non-tensor object ({unsupported.group(1)}), which loading without running its "
                    f"code (torch.load(weights_only=True)) refuses. If you trust the file, save its state dict "
                    f"alone: python -c \"import torch; torch.save(torch.load('{f}', weights_only=False)['model'], "
                    f"'model.pth')\" (with the key that holds the weights) and convert that") from None  # fmt: skip
            raise CheckpointError(f"{f}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
        return state_dict_of(sd, f, pth_key)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        w = self._where[key]
        return w.shape(key) if isinstance(w, SafetensorsFile) else tuple(w.shape)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self._where}

    def get(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}")
        w = self._where[key]
        return w.get(key) if isinstance(w, SafetensorsFile) else to_numpy(w)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether a file of ``size`` bytes starting with ``head`` (9 bytes) is a safetensors file whatever its
    name: a little-endian u64 header size, then a JSON object."""
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8


def read_config_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """``path/config.json`` as a dict; a missing or malformed file is a :class:`CheckpointError`."""
    path = Path(path)
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json (expected {what})")
    return read_json(f, "object")


def read_json(f: str | os.PathLike, kind: str = "object", key: Optional[str] = None) -> Any:
    """The JSON document in ``f`` (an ``"object"``, holding ``key`` when given); anything else -- not
    JSON, another type, the key missing -- is a :class:`CheckpointError` naming the file."""
    f = Path(f)
    try:
        doc = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if kind == "object" and not isinstance(doc, dict):
        raise CheckpointError(f"{f}: expected a JSON object, found {type(doc).__name__}")
    if key is not None and key not in doc:
        raise CheckpointError(f"{f}: no {key!r} entry")
    return doc


# ----------------------------------------------------------------------------------------------
# writing, atomically


def same_bits(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of two arrays: the same dtype and shape and the same bytes (NaN payloads and
    -0.0 included), compared in place (no copies of contiguous arrays)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = lambda x: np.ascontiguousarray(x).reshape(-1).view(np.uint8)  # noqa: E731
    return bool(np.array_equal(as_bytes(a), as_bytes(b)))


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``dst``; move it to ``dst`` only if the block succeeds.

    Works for files and directories. With ``overwrite`` an existing ``dst`` is replaced (after the new
    one is complete); without it an existing ``dst`` is an error before any work is done. Folders made
    for ``dst`` are removed again if the block fails; temporaries left by a killed run on this host
    (``.<name>.tmp-<host>-<pid>-*`` of a process that is gone) are removed when the next run starts, and
    an old ``dst`` that a killed run had moved aside is put back (:func:`recover_replaced`).
    """
    dst = Path(dst)
    recover_replaced(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
    made = [p for p in [dst.parent, *dst.parent.parents] if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = f".{dst.name}.tmp-{socket.gethostname()}-"
    _remove_stale_temporaries(dst.parent, tag)
    tmp_root = Path(tempfile.mkdtemp(prefix=f"{tag}{os.getpid()}-", dir=dst.parent))
    tmp = tmp_root / dst.name
    done = False
    try:
        yield tmp
        if not tmp.exists():
            raise CheckpointError(f"nothing was written for {dst}")
        if dst.exists() and not overwrite:  # made by someone else while this ran: theirs stays
            raise FileExistsError(f"{dst} appeared while it was being written (another run?); left as it is, "
                                  f"this output discarded (pass overwrite=True to replace it)")  # fmt: skip
        if dst.exists():
            old = dst.with_name(f"{_old_tag(dst)}{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            _remove(old)
        else:
            os.replace(tmp, dst)
        done = True
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
        if not done:
            for folder in made:  # innermost first; only if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _old_tag(dst: Path) -> str:
    return f".{dst.name}.old-{socket.gethostname()}-"


def _left_by_dead_process(folder: Path, tag: str) -> Iterator[Path]:
    """``folder/<tag><pid>[-*]`` entries whose process (on this host) no longer runs."""
    for p in folder.glob(f"{glob.escape(tag)}*"):
        pid = p.name[len(tag):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            yield p
        except PermissionError:  # alive, another user's
            pass


def _remove_stale_temporaries(folder: Path, tag: str) -> None:
    """Removes ``folder/<tag><pid>-*`` temporaries whose process (on this host) no longer runs."""
    for p in _left_by_dead_process(folder, tag):
        log.info("removing %s, left by a run that was killed", p)
        shutil.rmtree(p, ignore_errors=True)


def recover_replaced(dst: str | os.PathLike) -> None:
    """Undo what a killed overwrite left: :func:`atomic_output` replaces ``dst`` with two renames (old
    ``dst`` -> ``.<name>.old-<host>-<pid>``, new -> ``dst``) and then deletes the old one. Killed between
    the renames, ``dst`` is missing and its old version is put back here; killed after them, the old
    version is deleted. Only entries of processes that no longer run on this host are touched."""
    dst = Path(dst)
    if not dst.parent.is_dir():
        return
    for old in sorted(_left_by_dead_process(dst.parent, _old_tag(dst))):
        if dst.exists() or dst.is_symlink():
            log.info("removing %s, the previous %s that a killed run had replaced", old, dst.name)
            with contextlib.suppress(FileNotFoundError):  # another run got there first
                _remove(old)
        else:
            log.warning("putting back %s: a run replacing it was killed before the new one was in place", dst)
            with contextlib.suppress(FileNotFoundError):
                os.replace(old, dst)


def _remove(p: Path) -> None:
    """Deletes a file, a link (not what it points to) or a folder tree."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def write_sharded_safetensors(
    tensors: Iterable[tuple[str, np.ndarray]],
    out_dir: Path,
    *,
    weights_name: str = "model.safetensors",
    index_name: str = SAFETENSORS_INDEX,
    max_shard_bytes: int = 2 * 1024**3,
    metadata: Mapping[str, str] | None = None,
    specs: list[tuple[str, tuple[int, ...], Any]] | None = None,
) -> list[Path]:
    """Write ``(name, array)`` pairs into safetensors shards of at most ``max_shard_bytes``.

    One shard -> ``weights_name``; several -> ``{stem}-0000i-of-0000n.safetensors`` plus an index json,
    the names transformers/diffusers expect. With ``specs`` (name, shape, dtype of every tensor, in
    stream order) the shards are planned up front and each tensor is written as it arrives, so only
    one tensor is in memory; without, one shard's tensors (plus the next tensor) are held at a time: each
    shard is written under a temporary name as soon as it is full and renamed once the count is known.
    Both ways split the stream into the same shards.
    """
    from lumina_jax.convert.safetensors_io import save_file, save_file_streaming

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = weights_name[: -len(".safetensors")]

    def nbytes(shape, dtype) -> int:
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize

    plan: list[list[tuple[str, tuple[int, ...], Any]]] = [[]]
    if specs is None:  # group as the stream arrives, writing each full shard at once
        held: list[tuple[str, np.ndarray]] = []
        written: list[Path] = []

        def flush() -> None:
            written.append(out_dir / f".{stem}.part{len(written):05d}.safetensors")
            save_file(held, written[-1], metadata=metadata)
            held.clear()

        size = 0
        for name, arr in tensors:
            arr = np.asarray(arr)
            if held and size + arr.nbytes > max_shard_bytes:
                flush()
                plan.append([])
                size = 0
            held.append((name, arr))
            plan[-1].append((name, arr.shape, arr.dtype))
            size += arr.nbytes
        flush()
    else:
        size = 0
        for name, shape, dtype in specs:
            nb = nbytes(shape, dtype)
            if plan[-1] and size + nb > max_shard_bytes:
                plan.append([])
                size = 0
            plan[-1].append((name, tuple(shape), np.dtype(dtype)))
            size += nb
    n = len(plan)
    names = [out_dir / weights_name] if n == 1 else [
        out_dir / f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
    ]  # fmt: skip
    if specs is None:
        for tmp, path in zip(written, names):
            os.replace(tmp, path)
    else:
        it = iter(tensors)
        for path, shard in zip(names, plan):
            save_file_streaming(path, shard, (next(it) for _ in shard), metadata=metadata)
    if n > 1:
        weight_map = {name: path.name for path, shard in zip(names, plan) for name, _, _ in shard}
        # the tensors' bytes, as transformers/diffusers record it (not the files' sizes with their headers)
        total = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for shard in plan
                    for _, shape, dtype in shard)  # fmt: skip
        (out_dir / index_name).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
        )
    return names


def cast(arr: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """Cast floating arrays to ``dtype`` (None keeps them); integer arrays are never cast."""
    if dtype is None or not np.issubdtype(arr.dtype, np.floating) and arr.dtype != ml_dtypes.bfloat16:
        return arr
    return arr.astype(dtype)
