"""Latent cache: precomputed VAE latents and text features in ArrayRecord shards.

Training on a cache skips the VAE encoder and Gemma at every step. The encoders are not part of this
module: whatever produces the records (a one-off job running the VAE + text encoder over the raw
pipeline with ``shuffle=False, num_epochs=1, caption_dropout=0``) hands them to
:func:`write_latent_cache`, and :class:`LatentCacheSource` plugs into
:class:`lumina_jax.data.pipeline.DataPipeline` like an image source. Batches then carry ``latents``,
``cap_feats`` and ``cap_mask`` instead of ``images``.

Record schema ``lumina_latent_cache/v1`` (``LJR1`` container, :mod:`lumina_jax.data.records`)::

    latent     bfloat16 (H/8, W/8, 16)  VAE latent, already shifted and scaled:
                                         (mode(z) - 0.1159) * 0.3611 (spec §5)
    cap_feats  bfloat16 (L, D)           Gemma-2 hidden_states[-2] of `prompt` (D = 2304 for 2B)
    cap_mask   bool     (L,)             attention mask of those tokens (right padding)
    crop_size  [H, W]                    pixel size of the crop that was encoded (= 8 * latent H, W)
    prompt     str                       the exact encoded text (system prompt + caption)
    key        str                       optional: id of the raw item

Directory layout::

    <out_dir>/latents-00000.array_record ...   shards, renamed into place when complete
    <out_dir>/latents-00000.sizes.npy ...      per-shard size sidecar, written right after its shard
    <out_dir>/cache_config.json                 {"schema", "shard_size"}, written first
    <out_dir>/empty_prompt.ljr                  optional: features of "" (needed for caption dropout)
    <out_dir>/record_sizes.npy                  size index of the whole cache, written just before ...
    <out_dir>/cache_info.json                   {"schema", "num_records", "shards"}, written last

:class:`LatentCacheSource` reads the shards ``cache_info.json`` lists and refuses a directory without it
(an unfinished cache) unless ``allow_incomplete=True``.

Size index: ``int32 (n, 3)`` arrays of ``[H px, W px, L]`` per record (``crop_size`` and
``cap_feats.shape[0]``), so that the crop-size buckets of a whole cache can be planned from metadata
alone, without reading the records (:meth:`LatentCacheSource.record_sizes`). Each shard's sidecar
``<prefix>-NNNNN.sizes.npy`` has one row per record of that shard; ``record_sizes.npy`` is the
concatenation of the sidecars of the shards ``cache_info.json`` lists, in that order. A record that
cannot be decoded has the row ``[0, 0, 0]``. :func:`write_latent_cache` writes both (and builds the
sidecars a resumed cache lacks by reading their shards); :func:`index_latent_cache` (``python -m
lumina_jax preprocess --index --out DIR``) adds them to a cache written before they existed. Both files
are written atomically (temp file + rename).

Caption dropout on a cache replaces a sample's ``cap_feats``/``cap_mask`` with the stored features
of the empty prompt (no system prompt), as the original does with the text.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import ml_dtypes
import numpy as np

from lumina_jax.data import records as rec_lib
from lumina_jax.data.sources import SkipSample
from lumina_jax.data.transforms import sample_rng, skip_marker

LATENT_CACHE_SCHEMA = "lumina_latent_cache/v1"
LATENT_SHARD_PREFIX = "latents"
VAE_DOWNSAMPLE = 8
LATENT_CHANNELS = 16
_EMPTY_PROMPT_FILE = "empty_prompt.ljr"
CACHE_INFO_FILE = "cache_info.json"
RECORD_SIZES_FILE = "record_sizes.npy"
SIZES_SUFFIX = ".sizes.npy"
_PART_DIR_RE = re.compile(r"^process-\d{5,}-of-\d{5,}$")

logger = logging.getLogger(__name__)
_BF16 = np.dtype(ml_dtypes.bfloat16)


def make_latent_record(
    latent: np.ndarray,
    cap_feats: np.ndarray,
    cap_mask: np.ndarray,
    prompt: str,
    crop_size: Optional[Sequence[int]] = None,
    key: Optional[str] = None,
) -> dict[str, Any]:
    """A validated cache record (arrays cast to the schema dtypes)."""
    latent = np.asarray(latent)
    cap_feats = np.asarray(cap_feats)
    cap_mask = np.asarray(cap_mask)
    if latent.ndim != 3 or latent.shape[-1] != LATENT_CHANNELS:
        raise ValueError(f"latent must be (H/8, W/8, {LATENT_CHANNELS}), got {latent.shape}")
    if cap_feats.ndim != 2:
        raise ValueError(f"cap_feats must be (L, D), got {cap_feats.shape}")
    if cap_mask.shape != cap_feats.shape[:1]:
        raise ValueError(f"cap_mask shape {cap_mask.shape} does not match cap_feats {cap_feats.shape}")
    expected = [latent.shape[0] * VAE_DOWNSAMPLE, latent.shape[1] * VAE_DOWNSAMPLE]
    if crop_size is not None and list(crop_size) != expected:
        raise ValueError(f"crop_size {list(crop_size)} does not match the latent ({expected})")
    record = {
        "schema": LATENT_CACHE_SCHEMA,
        "latent": latent.astype(_BF16),
        "cap_feats": cap_feats.astype(_BF16),
        "cap_mask": cap_mask.astype(bool),
        "crop_size": expected,
        "prompt": prompt,
    }
    if key is not None:
        record["key"] = key
    return record


def _normalise(record: Mapping[str, Any]) -> Mapping[str, Any]:
    if record.get("schema") != LATENT_CACHE_SCHEMA:
        record = make_latent_record(
            record["latent"], record["cap_feats"], record["cap_mask"], record.get("prompt", ""),
            record.get("crop_size"), record.get("key"),
        )
    return record


def _encode(record: Mapping[str, Any]) -> bytes:
    return rec_lib.encode_record(_normalise(record))


def write_latent_cache(
    records: Iterable[Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    empty_prompt_features: Optional[tuple[np.ndarray, np.ndarray]] = None,
    made_with: Optional[Mapping[str, Any]] = None,
) -> list[Path]:
    """Writes cache records (dicts with ``latent``, ``cap_feats``, ``cap_mask``, ``prompt`` and
    optionally ``crop_size``, ``key``) as ArrayRecord shards.

    ``made_with``: how the records were made (encoders, resolution, max caption length; ``preprocess``
    passes them), stored in ``cache_info.json`` for the trainer to check against a stage.

    Resumable: shards that already exist are complete (each is written to a temp file and renamed)
    and are skipped; pass a ``Sequence`` (e.g. a lazy one that runs the encoders in ``__getitem__``)
    to avoid recomputing their records. ``shard_size`` must match the interrupted run.
    ``empty_prompt_features``: ``(cap_feats, cap_mask)`` of ``""``, needed to train with caption dropout.
    Returns the shard paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "cache_config.json"
    config = {"schema": LATENT_CACHE_SCHEMA, "shard_size": int(shard_size)}
    if config_path.exists():
        existing = json.loads(config_path.read_text())
        if existing != config:
            raise ValueError(
                f"{out_dir} holds a cache written with {existing}; cannot resume it with {config}"
            )
    else:
        rec_lib.write_json_atomic(config_path, config)
    if empty_prompt_features is not None:
        feats, mask = empty_prompt_features
        empty = make_latent_record(np.zeros((1, 1, LATENT_CHANNELS)), feats, mask, prompt="")
        data = rec_lib.encode_record({k: empty[k] for k in ("schema", "cap_feats", "cap_mask", "prompt")})
        rec_lib.write_bytes_atomic(out_dir / _EMPTY_PROMPT_FILE, data)
    pending: list[tuple[int, int, int]] = []  # size rows of the shard being written

    def encode(record: Mapping[str, Any]) -> bytes:
        record = _normalise(record)
        row = _size_row(record)
        data = rec_lib.encode_record(record)
        pending.append(row)
        return data

    def on_shard(path: Path, count: int) -> None:
        rows = np.asarray(pending, dtype=np.int32).reshape(-1, 3)
        pending.clear()
        if rows.shape[0] != count:  # write_sharded encodes each record of a shard once, in order
            raise RuntimeError(f"{path}: {count} records written but {rows.shape[0]} sizes collected")
        rec_lib.write_int32_npy_atomic(shard_sizes_path(path), rows)

    paths = rec_lib.write_sharded(
        records, out_dir, shard_size, LATENT_SHARD_PREFIX, encode=encode, on_shard=on_shard
    )
    # Shards of an earlier run may lack their sidecar (a crash right after the shard's rename, or a
    # writer older than the size index): write_size_index reads those shards' records.
    index = write_size_index(out_dir, paths, progress=False)
    rec_lib.write_json_atomic(
        out_dir / CACHE_INFO_FILE,
        {
            "schema": LATENT_CACHE_SCHEMA,
            "num_records": int(index.shape[0]),
            "shards": [p.name for p in paths],
            **({"made_with": dict(made_with)} if made_with else {}),
        },
    )
    return paths


# ---------------------------------------------------------------------------------------------------
# Size index


def shard_sizes_path(shard: str | os.PathLike) -> Path:
    """The size sidecar of a shard: ``latents-00000.array_record`` -> ``latents-00000.sizes.npy``."""
    shard = Path(shard)
    if not shard.name.endswith(rec_lib.SHARD_SUFFIX):
        raise ValueError(f"{shard}: not a shard file (*{rec_lib.SHARD_SUFFIX})")
    return shard.with_name(shard.name[: -len(rec_lib.SHARD_SUFFIX)] + SIZES_SUFFIX)


def _size_row(record: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(H px, W px, L)`` of a cache record (``crop_size`` and ``cap_feats.shape[0]``)."""
    h, w = (int(s) for s in record["crop_size"])
    return h, w, int(np.shape(record["cap_feats"])[0])


def _load_sizes(path: Path, mmap: bool = False) -> np.ndarray:
    """An ``(n, 3)`` size array from ``path`` as int32 (memory-mapped read-only if ``mmap``, so that
    processes share the page cache instead of each holding a copy); ``ValueError`` naming the file if it
    is not one."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a record size index ({type(e).__name__}: {e})") from None
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != 3 or array.dtype.kind not in "iu":
        raise ValueError(
            f"{path}: not a record size index (expected an integer array of shape (num_records, 3), found "
            f"{getattr(array, 'dtype', type(array).__name__)} {getattr(array, 'shape', '')})"
        )
    return array.astype(np.int32, copy=False)


def _concat_sizes(sizes: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(sizes).astype(np.int32) if sizes else np.zeros((0, 3), np.int32)


def _shard_len(shard: Path) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(shard))
    try:
        return int(reader.num_records())
    finally:
        reader.close()


def _read_shard_sizes(shard: Path, on_records: Optional[Callable[[int], None]] = None,
                      chunk: int = 64) -> tuple[np.ndarray, int]:  # fmt: skip
    """Size rows of every record of ``shard``, by decoding them, and how many could not be decoded
    (their rows are ``[0, 0, 0]``)."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(shard))
    try:
        n = int(reader.num_records())
        rows = np.zeros((n, 3), np.int32)
        bad = 0
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            for j, data in enumerate(reader.read(lo, hi)):
                try:
                    record = rec_lib.decode_record(data)
                    if record.get("schema") != LATENT_CACHE_SCHEMA:
                        raise ValueError(f"schema {record.get('schema')!r}")
                    rows[lo + j] = _size_row(record)
                except (rec_lib.RecordFormatError, KeyError, TypeError, ValueError, IndexError):
                    bad += 1
                    rows[lo + j] = 0
            if on_records is not None:
                on_records(hi - lo)
    finally:
        reader.close()
    return rows, bad


def shard_index_sizes(shards: Sequence[str | os.PathLike], *, threads: int = 4,
                      progress: bool = True) -> list[np.ndarray]:  # fmt: skip
    """The size sidecar of each shard, in order; a missing sidecar, or one that is unreadable or does not
    have one row per record of its shard, is built (and written) by reading the shard's records.

    ``threads``: shards checked / read at once. ``progress``: a tqdm bar over the records read (if any
    are, and tqdm is installed). Records that cannot be decoded get ``[0, 0, 0]`` and are counted in a
    warning.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    shards = [Path(p) for p in shards]
    if not shards:
        return []

    def check(shard: Path) -> tuple[int, Optional[np.ndarray]]:
        n = _shard_len(shard)
        side = shard_sizes_path(shard)
        if not side.exists():
            return n, None
        try:
            sizes = _load_sizes(side)
        except ValueError as e:
            logger.warning("%s; rebuilding it from %s", e, shard.name)
            return n, None
        if sizes.shape[0] != n:
            logger.warning("%s: %d rows for the %d records of %s; rebuilding it", side, sizes.shape[0], n, shard.name)
            return n, None
        return n, sizes

    with ThreadPoolExecutor(max_workers=min(threads, len(shards))) as pool:
        checked = list(pool.map(check, shards))
    out: list[Optional[np.ndarray]] = [sizes for _, sizes in checked]
    todo = [i for i, sizes in enumerate(out) if sizes is None]
    if not todo:
        return out  # type: ignore[return-value]

    logger.info("%s: building the size sidecars of %d shard(s) from their records", shards[0].parent, len(todo))
    bar = _progress_bar(progress, sum(checked[i][0] for i in todo), f"index {shards[0].parent.name}")
    lock = threading.Lock()

    def advance(n: int) -> None:
        if bar is not None:
            with lock:
                bar.update(n)

    def build(i: int) -> int:
        sizes, bad = _read_shard_sizes(shards[i], advance)
        rec_lib.write_int32_npy_atomic(shard_sizes_path(shards[i]), sizes)
        out[i] = sizes
        if bad:
            logger.warning("%s: %d of %d record(s) could not be decoded; their size rows are [0, 0, 0]",
                           shards[i], bad, sizes.shape[0])  # fmt: skip
        return bad

    try:
        with ThreadPoolExecutor(max_workers=min(threads, len(todo))) as pool:
            bad = sum(pool.map(build, todo))
    finally:
        if bar is not None:
            bar.close()
    if bad:
        logger.warning("%s: %d unreadable record(s) in total (size rows [0, 0, 0]; training skips them)",
                       shards[0].parent, bad)  # fmt: skip
    return out  # type: ignore[return-value]


def _progress_bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled or total <= 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="rec", desc=desc, dynamic_ncols=True)


def index_latent_cache(cache_dir: str | os.PathLike, *, threads: int = 4, progress: bool = True) -> Path:
    """Writes the size index of a complete latent cache: the sidecars its shards lack, then
    ``record_sizes.npy``. Returns the path of ``record_sizes.npy``.

    For caches written before the index existed (:func:`write_latent_cache` writes it now), or to
    rebuild a damaged one (sidecars that do not match their shard are rebuilt; ``record_sizes.npy`` is
    always rewritten from the sidecars). Idempotent. The shards read are those ``cache_info.json``
    lists; a directory without it raises :class:`IncompleteCacheError`. ``threads``: shards read at
    once; ``progress``: a tqdm bar over the records read.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise FileNotFoundError(f"latent cache {cache_dir}: no such directory")
    info_path = cache_dir / CACHE_INFO_FILE
    if not info_path.exists():
        num_shards = len(rec_lib.list_shards(cache_dir, LATENT_SHARD_PREFIX))
        raise IncompleteCacheError(_incomplete_message(cache_dir, num_shards))
    write_size_index(cache_dir, _listed_shards(cache_dir, info_path), threads=threads, progress=progress)
    return cache_dir / RECORD_SIZES_FILE


def write_size_index(cache_dir: str | os.PathLike, shards: Sequence[str | os.PathLike], *, threads: int = 4,
                     progress: bool = True) -> np.ndarray:  # fmt: skip
    """Writes ``<cache_dir>/record_sizes.npy``: the sidecars of ``shards`` (the shards ``cache_info.json``
    lists or will list, in order) concatenated; missing ones are built first (:func:`shard_index_sizes`).
    Call it before writing ``cache_info.json``. Returns the index."""
    index = _concat_sizes(shard_index_sizes(shards, threads=threads, progress=progress))
    rec_lib.write_int32_npy_atomic(Path(cache_dir) / RECORD_SIZES_FILE, index)
    return index


class IncompleteCacheError(FileNotFoundError):
    """A latent cache directory without ``cache_info.json`` (its writer did not finish), or whose
    ``cache_info.json`` lists shards that are missing."""


class LatentCacheSource:
    """Random access over a latent cache directory (``kind = "latent"``).

    ``get(index)`` returns the decoded record (arrays are read-only views). Picklable.

    The cache must be complete: ``cache_info.json`` is written last, when the writer (``python -m
    lumina_jax preprocess`` or :func:`write_latent_cache`) finished, and the shards it lists are read.
    A directory without it raises :class:`IncompleteCacheError` naming the directory and what to run.

    Args:
      cache_dir: the cache directory.
      name: source name for logs/stats (default: the directory name).
      allow_incomplete: read whatever complete shards an unfinished cache holds (a warning names how
        many), instead of raising; e.g. to inspect a cache while it is being written.
    """

    kind = "latent"

    def __init__(self, cache_dir: str | os.PathLike, name: Optional[str] = None, allow_incomplete: bool = False):
        cache_dir = Path(cache_dir)
        if not cache_dir.is_dir():
            raise FileNotFoundError(f"latent cache {cache_dir}: no such directory")
        info_path = cache_dir / CACHE_INFO_FILE
        if info_path.exists():
            shards = _listed_shards(cache_dir, info_path)
        else:
            shards = rec_lib.list_shards(cache_dir, LATENT_SHARD_PREFIX)
            if not allow_incomplete:
                raise IncompleteCacheError(_incomplete_message(cache_dir, len(shards)))
            if shards:
                logger.warning(
                    "%s: incomplete latent cache (no %s); reading its %d complete shard(s) "
                    "(allow_incomplete=True)", cache_dir, CACHE_INFO_FILE, len(shards),
                )
        if not shards:
            raise FileNotFoundError(f"no '{LATENT_SHARD_PREFIX}-*.array_record' shards in {cache_dir}")
        self.name = name or cache_dir.name
        self.cache_dir = str(cache_dir)
        self._reader = rec_lib.ShardedRecordReader(shards)
        self._complete = info_path.exists()
        self._record_sizes: Optional[np.ndarray] = None
        # how the records were made (``preprocess`` records it; None for caches written without it)
        self.made_with: Optional[dict[str, Any]] = (
            json.loads(info_path.read_text()).get("made_with") if info_path.exists() else None)  # fmt: skip
        self.empty_prompt: Optional[tuple[np.ndarray, np.ndarray]] = None
        empty_path = cache_dir / _EMPTY_PROMPT_FILE
        if empty_path.exists():
            rec = rec_lib.decode_record(empty_path.read_bytes())
            self.empty_prompt = (np.array(rec["cap_feats"]), np.array(rec["cap_mask"]))

    def __len__(self) -> int:
        return len(self._reader)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_record_sizes"] = None  # reloaded on demand: not shipped to every worker process
        return state

    def record_sizes(self) -> Optional[np.ndarray]:
        """``int32 (len(self), 3)``: ``[H px, W px, L]`` of each record (crop size and caption-feature
        length), read-only, without reading the records; ``[0, 0, 0]`` for a record that cannot be decoded.

        Read from ``record_sizes.npy`` (memory-mapped), else assembled from the shards' ``*.sizes.npy`` sidecars if every
        shard has one, else ``None`` (a cache written before the index existed: build it with
        ``python -m lumina_jax preprocess --index --out DIR``). Loaded once and kept (not pickled).
        Raises ``ValueError`` naming the file if the index does not have one row per record.
        """
        if self._record_sizes is None:
            self._record_sizes = self._load_record_sizes()
        return self._record_sizes

    def _load_record_sizes(self) -> Optional[np.ndarray]:
        cache_dir = Path(self.cache_dir)
        if self._complete:
            fix = f"rebuild it with `python -m lumina_jax preprocess --index --out {cache_dir}`"
        else:
            fix = "rerun the `python -m lumina_jax preprocess` command that writes this cache to finish it"
        path = cache_dir / RECORD_SIZES_FILE
        try:
            if self._complete and path.is_file():  # only a complete cache's index matches its shards
                what = str(path)
                sizes = _load_sizes(path, mmap=True)  # 12 bytes a record: 1.2 GB for 100M records
            else:
                sidecars = [shard_sizes_path(p) for p in self._reader.paths]
                if not all(s.is_file() for s in sidecars):
                    return None
                what = (f"the size sidecars ({LATENT_SHARD_PREFIX}-*{SIZES_SUFFIX}) of the {len(sidecars)} "
                        f"shard(s) in {cache_dir}")  # fmt: skip
                sizes = _concat_sizes([_load_sizes(s) for s in sidecars])
        except ValueError as e:
            raise ValueError(f"{e}; {fix}") from None
        if sizes.shape[0] != len(self):
            raise ValueError(
                f"{what}: record size index of {sizes.shape[0]} records, but the cache has {len(self)} "
                f"records; {fix}"
            )
        if sizes.flags.writeable:
            sizes.flags.writeable = False
        return sizes

    def get(self, index: int) -> dict[str, Any]:
        try:
            record = rec_lib.decode_record(self._reader[index])
        except rec_lib.RecordFormatError as e:
            raise SkipSample("bad_record", str(e)) from e
        if record.get("schema") != LATENT_CACHE_SCHEMA:
            raise SkipSample("bad_record", f"schema {record.get('schema')!r}")
        return record


def _listed_shards(cache_dir: Path, info_path: Path) -> list[Path]:
    """The shard files ``cache_info.json`` lists; raises if it is unreadable or a listed shard is missing."""
    try:
        info = json.loads(info_path.read_text())
        names = [str(n) for n in info["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{info_path}: not a latent cache info file ({type(e).__name__}: {e})") from None
    missing = [n for n in names if not (cache_dir / n).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise IncompleteCacheError(
            f"latent cache {cache_dir}: {CACHE_INFO_FILE} lists {len(names)} shard(s) but {len(missing)} are "
            f"missing ({shown}); the cache was moved or modified after it was written"
        )
    return [cache_dir / n for n in names]


def _incomplete_message(cache_dir: Path, num_shards: int) -> str:
    """Why ``cache_dir`` (a directory without ``cache_info.json``) is not a usable cache, and what to run."""
    merge = f"`python -m lumina_jax preprocess --merge --out {cache_dir}`"
    if (cache_dir / "merge_plan.json").exists():
        return (f"latent cache {cache_dir} is incomplete: a merge of its per-process directories was interrupted "
                f"(no {CACHE_INFO_FILE} yet, which is written last); rerun {merge}")  # fmt: skip
    parts = sorted(p.name for p in cache_dir.iterdir() if p.is_dir() and _PART_DIR_RE.match(p.name))
    if parts and not num_shards:
        return (f"{cache_dir} holds the per-process directories of a multi-host preprocessing run ({parts[0]}, "
                f"...), not one cache (no {CACHE_INFO_FILE}): when every process has finished, merge them with "
                f"{merge}, or train on the process directories themselves")  # fmt: skip
    if not num_shards:
        return (f"{cache_dir} is not a latent cache: it has no {CACHE_INFO_FILE} and no "
                f"'{LATENT_SHARD_PREFIX}-*.array_record' shards")  # fmt: skip
    return (f"latent cache {cache_dir} is incomplete: it has {num_shards} complete shard(s) but no {CACHE_INFO_FILE} "
            f"(written last, when the cache is complete), so preprocessing did not finish (stopped by --max-shards, "
            f"or interrupted). Rerun the same `python -m lumina_jax preprocess` command to finish it (it resumes), "
            f"or pass allow_incomplete=True to read the complete shards anyway")  # fmt: skip


class LatentSampleLoader:
    """``(epoch, record_index) -> sample`` for a :class:`LatentCacheSource` (or a skip marker).

    Sample: ``latent`` (h, w, 16) bf16, ``cap_feats`` (L, D) bf16, ``cap_mask`` (L,), ``image_size``
    (H, W) px, ``prompt``, ``caption_dropped``, ``id``, ``key``, ``source``, ``epoch``. Caption dropout
    swaps in the cache's empty-prompt features, with the same per-sample RNG as image sources.
    """

    def __init__(self, source: LatentCacheSource, source_id: int, caption_dropout: float, seed: int):
        if caption_dropout > 0 and source.empty_prompt is None:
            raise ValueError(
                f"latent cache {source.name!r} has no empty-prompt features ({_EMPTY_PROMPT_FILE}); "
                f"write it with write_latent_cache(..., empty_prompt_features=...) or set "
                f"caption_dropout=0"
            )
        self.source = source
        self.source_id = source_id
        self.caption_dropout = caption_dropout
        self.seed = seed

    def __call__(self, item: tuple[int, int]) -> dict:
        epoch, index = int(item[0]), int(item[1])
        name = self.source.name
        default_key = f"{name}:{index}"
        try:
            record = self.source.get(index)
        except SkipSample as e:
            return skip_marker(e.reason, name, f"{default_key} ({e.detail})")
        except Exception as e:  # noqa: BLE001
            return skip_marker("unreadable", name, f"{default_key} ({type(e).__name__}: {e})")
        try:
            latent, feats, mask = record["latent"], record["cap_feats"], record["cap_mask"]
            h, w = (int(s) for s in record["crop_size"])
        except (KeyError, TypeError, ValueError) as e:
            return skip_marker("bad_record", name, f"{default_key} ({e})")
        rng = sample_rng(self.seed, self.source_id, epoch, index)
        dropped = bool(rng.random() < self.caption_dropout)
        prompt = record.get("prompt", "")
        if dropped:
            feats, mask = self.source.empty_prompt
            prompt = ""
        return {
            "latent": latent,
            "cap_feats": feats,
            "cap_mask": mask,
            "image_size": (h, w),
            "prompt": prompt,
            "caption_dropped": dropped,
            "id": default_key,
            "key": record.get("key", default_key),
            "source": self.source_id,
            "epoch": epoch,
        }
