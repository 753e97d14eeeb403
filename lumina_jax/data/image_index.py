"""Size index of raw-image sources: each record's pixel size, read from image headers, without decoding.

The global bucket plan (:mod:`lumina_jax.data.global_plan`) needs every record's crop size before any
host reads the record. For a latent cache that is stored at encoding time; for raw images the crop size
is a function of the image's size and the stage's crop list (:func:`lumina_jax.data.crops.best_crop_size`),
and the size is in the image's header. This module writes, once per source, an ``int32 (N, 3)`` array
``[H px, W px, skip]`` next to the data, or in an index folder of your choice (below):

* :class:`~lumina_jax.data.sources.JsonlSource`: ``<file>.image_sizes.npy`` (rows of the file, before
  any ``ratio`` subsampling, so one index serves every ratio; a YAML entry with its own ``root`` gets
  ``<file>.root-<hash>.image_sizes.npy``, since the same file then names other images);
* :class:`~lumina_jax.data.sources.TfdsSource`: ``<dataset version dir>/<split>.image_sizes.npy``;
* :class:`~lumina_jax.data.sources.ArrayRecordImageSource` opened from a folder: ``<folder>/image_sizes.npy``;
* :class:`~lumina_jax.data.sources.ConcatSource`: its parts' indexes, concatenated.

Data that cannot be written to (a read-only mount) gets its index in a local or mounted folder given
with ``--index-dir DIR`` (training: ``data.index_dir``): the file keeps the name it would have next to the
data, with a hash of that absolute path inserted (:func:`relocated`), so one folder holds the indexes of
many sources. The hash is of the path as written (not symlinks resolved): every host must name the data
by the same path, and a missing index's error names the file that was looked for.

``skip`` is 0 for a usable record, else ``1 + SKIP_REASONS.index(reason)`` for a record the loader would
skip (missing file, empty caption, undecodable header, unsupported mode, ...), so the plan leaves it out
and counts it under the same reason. Build it with ``python -m lumina_jax preprocess --index --data PATH``
(PATH as in the training config's ``data.paths``); rebuild it when the data changes. A stale index (other
record count) is refused when it is loaded; the start-up probe of the global plan also decodes the
first records and compares them with the index (crop size, and whether they are usable). A record that
changed later (another crop size at training time) becomes a padding row counted as ``stale_index``
with a warning naming the rebuild command, so one edited image cannot stop a run or hang its hosts.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import logging
import os
import re
import shlex
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from lumina_jax.data import records as rec_lib
from lumina_jax.data.sources import RawItem, SkipSample
from lumina_jax.data.transforms import _TO_RGB_DIRECT, _WITH_ALPHA, SKIP_REASONS, exif_orientation, image_from_array
from lumina_jax.text_templates import system_prompt_problem

logger = logging.getLogger(__name__)

IMAGE_SIZES_SUFFIX = ".image_sizes.npy"
INDEX_COMMAND = "python -m lumina_jax preprocess --index --data {path}"


def relocated(path: str, index_dir: Optional[str | os.PathLike]) -> str:
    """Where the index that would be ``path`` (next to the data) lives when indexes go to ``index_dir``:
    ``<index_dir>/<name>.<hash>.image_sizes.npy``, ``name`` from ``path``'s file name (its folder's
    name for ``<folder>/image_sizes.npy``) and ``hash`` of the absolute ``path`` (as written for URLs),
    so indexes of different sources never collide. ``path`` itself when ``index_dir`` is ``None``."""
    if index_dir is None:
        return path
    text = str(path)
    full = text if "://" in text else os.path.abspath(text)
    name = os.path.basename(full)
    stem = name[: -len(IMAGE_SIZES_SUFFIX)] if name.endswith(IMAGE_SIZES_SUFFIX) else ""
    stem = stem or os.path.basename(os.path.dirname(full)) or "data"
    digest = hashlib.sha1(os.fsencode(full)).hexdigest()[:10]  # fsencode: undecodable (non-UTF-8) names too
    return os.path.join(os.fspath(index_dir), f"{stem}.{digest}{IMAGE_SIZES_SUFFIX}")


def index_command(source: Any) -> str:
    """The command that (re)builds ``source``'s index, with its ``--index-dir`` if it has one."""
    paths = source.index_data_path.split(" --data ")  # a ConcatSource's parts
    command = INDEX_COMMAND.format(path=" --data ".join(shlex.quote(p) for p in paths))
    index_dir = getattr(source, "index_dir", None)
    return command if index_dir is None else f"{command} --index-dir {shlex.quote(index_dir)}"


def index_target(source: Any) -> Optional[tuple[str, int, Any]]:
    """``(index file, records, row -> RawItem)`` of a source that can have an index (not a
    :class:`~lumina_jax.data.sources.ConcatSource`), in its ``index_dir`` if it has one; else ``None``."""
    spec = getattr(source, "size_index_spec", None)
    target = spec() if callable(spec) else None
    if target is None:
        return None
    path, count, get = target
    return relocated(path, getattr(source, "index_dir", None)), count, get


def missing_index_files(source: Any) -> list[str]:
    """The index files ``source`` (its parts) looked for and did not find."""
    parts = getattr(source, "_sources", None)
    if parts is not None:
        return [f for part in parts for f in missing_index_files(part)]
    target = index_target(source)
    return [] if target is None or os.path.isfile(target[0]) else [target[0]]


def check_index_dir(index_dir: str | os.PathLike) -> None:
    """``ValueError`` for a URL: indexes are memory-mapped, so the folder must be local or mounted."""
    if "://" in os.fspath(index_dir):
        raise ValueError(f"index folder {os.fspath(index_dir)!r} is a URL; image size indexes are memory-mapped "
                         f"files, give a local or mounted folder")  # fmt: skip


def set_index_dir(source: Any, index_dir: Optional[str | os.PathLike]) -> None:
    """Makes ``source`` (each part of a :class:`~lumina_jax.data.sources.ConcatSource`) keep its index in
    ``index_dir`` (``None``: next to the data); indexes already mapped are dropped. ``ValueError`` for a
    URL (:func:`check_index_dir`)."""
    if index_dir is not None:
        check_index_dir(index_dir)
    for part in getattr(source, "_sources", ()):
        set_index_dir(part, index_dir)
    if hasattr(source, "size_index_spec"):
        source.index_dir = None if index_dir is None else os.fspath(index_dir)
        source.__dict__.pop("_record_sizes", None)


def split_file_name(split: str) -> str:
    """A split spec (``"train"``, ``"train[:10%]"``) as a file-name stem."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", split)


def _reason_code(reason: str) -> int:
    return 1 + SKIP_REASONS.index(reason)


def reason_of(code: int) -> str:
    """The skip reason an index row's third column encodes (``code`` > 0)."""
    return SKIP_REASONS[code - 1] if 0 < code <= len(SKIP_REASONS) else "unreadable"


def raw_item_size(item: RawItem) -> tuple[int, int, int]:
    """``(H, W, 0)`` of an item's image from its header (not decoded), or ``(0, 0, code)`` with the
    reason the training loader would skip it for (:class:`lumina_jax.data.transforms.ImageSampleLoader`)."""
    if system_prompt_problem(item.system_prompt) is not None:
        return 0, 0, _reason_code("bad_record")
    if item.caption is None or item.caption.strip() == "":
        return 0, 0, _reason_code("empty_caption")
    data = item.image
    try:
        if isinstance(data, np.ndarray):
            image = image_from_array(data)  # as the loader: a PIL view of the array, no decoding
        elif data is None:
            if item.image_path is None:
                return 0, 0, _reason_code("bad_record")
            image = Image.open(item.image_path)
        else:
            image = Image.open(io.BytesIO(data))
    except FileNotFoundError:
        return 0, 0, _reason_code("missing")
    except OSError as e:
        if data is None and not isinstance(e, Image.UnidentifiedImageError):
            return 0, 0, _reason_code("unreadable")
        return 0, 0, _reason_code("undecodable")
    except Exception:  # noqa: BLE001 -- not an image
        return 0, 0, _reason_code("undecodable")
    with image:
        if image.mode not in _TO_RGB_DIRECT and image.mode not in _WITH_ALPHA:
            return 0, 0, _reason_code("unsupported_mode")
        w, h = image.size
        if exif_orientation(image) >= 5:  # the loader turns it (exif_oriented): width and height swap
            w, h = h, w
    if w <= 0 or h <= 0:
        return 0, 0, _reason_code("undecodable")
    return int(h), int(w), 0


def _row(get: Any, index: int) -> tuple[int, int, int]:
    try:
        item = get(index)
    except SkipSample as e:
        return 0, 0, _reason_code(e.reason if e.reason in SKIP_REASONS else "bad_record")
    except FileNotFoundError:
        return 0, 0, _reason_code("missing")
    except Exception:  # noqa: BLE001 -- as the loader: an unreadable record is a skip, not an error
        return 0, 0, _reason_code("unreadable")
    return raw_item_size(item)


def compute_image_sizes(get: Any, count: int, *, threads: int = 8, progress: bool = True,
                        desc: str = "image sizes") -> np.ndarray:  # fmt: skip
    """``int32 (count, 3)`` rows :func:`raw_item_size` of ``get(0) ... get(count - 1)``, read by ``threads``
    threads (header reads are I/O bound), with a tqdm bar if ``progress``."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    out = np.zeros((count, 3), np.int32)
    bar = None
    if progress and count:
        try:
            from tqdm import tqdm

            bar = tqdm(total=count, desc=desc, unit="img")
        except ImportError:
            pass
    chunk = 256
    starts = range(0, count, chunk)

    def work(start: int) -> int:
        stop = min(start + chunk, count)
        for i in range(start, stop):
            out[i] = _row(get, i)
        return stop - start

    try:
        if threads == 1:
            done = map(work, starts)
        else:
            pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="image_sizes")
            done = pool.map(work, starts)
        for n in done:
            if bar is not None:
                bar.update(n)
    finally:
        if threads > 1:
            pool.shutdown()
        if bar is not None:
            bar.close()
    return out


def save_index(path: str | os.PathLike, sizes: np.ndarray) -> None:
    """Writes an image size index atomically (int32 ``.npy``)."""
    rec_lib.write_int32_npy_atomic(path, sizes)


def load_index(path: str | os.PathLike, count: int, command: str) -> Optional[np.ndarray]:
    """The index at ``path`` (memory-mapped, read-only), ``None`` if there is none; ``ValueError`` naming
    the file and ``command`` (which rebuilds it) if it is not ``int32 (count, 3)`` (a stale index)."""
    path = Path(path)
    if not path.is_file():
        return None
    fix = f"rebuild it with `{command}`"
    try:
        sizes = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"image size index {path} is unreadable ({e}); {fix}") from e
    if sizes.ndim != 2 or sizes.shape[1] != 3 or sizes.dtype != np.int32:
        raise ValueError(f"image size index {path} is {sizes.dtype} {sizes.shape}, not int32 (N, 3); {fix}")
    if sizes.shape[0] != count:
        raise ValueError(f"image size index {path} has {sizes.shape[0]} rows but its data has {count} records: "
                         f"the index is stale (the data changed after it was indexed); {fix}")  # fmt: skip
    return sizes


def check_writable(path: str | os.PathLike, index_dir: bool = False) -> None:
    """``PermissionError`` naming ``path`` if its folder does not take a new file (tried, then removed);
    ``index_dir``: the folder is an ``--index-dir`` (the message suggests one otherwise)."""
    folder = Path(path).parent
    probe = folder / f".{Path(path).name}.{os.getpid()}.write_test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        fix = ("the index folder must be writable" if index_dir else "give a writable folder for the index with "
               "--index-dir DIR (and train with data.index_dir set to it)")  # fmt: skip
        raise PermissionError(f"cannot write the image size index {path}: {e.strerror or e}; {fix}") from e


def index_image_source(source: Any, *, threads: int = 8, progress: bool = True) -> list[Path]:
    """Writes the size index of ``source`` (of each part of a :class:`ConcatSource`); returns the files
    written. Raises ``ValueError`` for a source that cannot have one (in-memory lists, ArrayRecord
    shards given as a list of files)."""
    parts = getattr(source, "_sources", None)
    if parts is not None:
        written = [p for part in parts for p in index_image_source(part, threads=threads, progress=progress)]
        source.__dict__.pop("_record_sizes", None)  # concatenated again on next use
        return written
    target = index_target(source)
    if target is None:
        raise ValueError(f"image source {source.name!r} ({type(source).__name__}) cannot have a size index: "
                         f"only JSONL/JSON files, prepared TFDS datasets and ArrayRecord shard folders have one")  # fmt: skip
    path, count, get = target
    check_writable(path, index_dir=getattr(source, "index_dir", None) is not None)  # before reading every header, not after
    sizes = compute_image_sizes(get, count, threads=threads, progress=progress, desc=f"indexing {source.name}")
    save_index(path, sizes)
    bad = int((sizes[:, 2] > 0).sum())
    if bad:
        reasons: dict[str, int] = {}
        for code, n in zip(*np.unique(sizes[sizes[:, 2] > 0, 2], return_counts=True)):
            reasons[reason_of(int(code))] = int(n)
        logger.warning("%s: %d of %d records are unusable and stay out of the plan (%s)", source.name, bad,
                       count, ", ".join(f"{r}={n}" for r, n in sorted(reasons.items())))  # fmt: skip
    source.__dict__.pop("_record_sizes", None)  # the new index is mapped on next use
    return [Path(path)]


def summary(path: str | os.PathLike) -> str:
    """One line about a written image size index."""
    sizes = np.load(path)
    good = sizes[sizes[:, 2] == 0]
    line = f"image size index {path}: {len(sizes)} records, {len(np.unique(good[:, :2], axis=0))} distinct sizes"
    if len(good) < len(sizes):
        line += f", {len(sizes) - len(good)} unusable records"
    return line
