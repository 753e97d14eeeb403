"""Latent-cache preprocessing: raw captioned images -> VAE latents + Gemma-2 features, once, offline.

``python -m lumina_jax preprocess`` (:mod:`lumina_jax.data.cli`) is the command line; this module is the
library behind it::

    encoders = Encoders.load("ckpt/vae", "ckpt/text_encoder", "ckpt/tokenizer", dtype="bf16")
    result = preprocess(open_sources(["data.jsonl"]), encoders,
                        PreprocessConfig(out_dir="cache_256", resolution=256, batch_size=32))
    print(format_summary(result))

What happens (spec §4-§6.5):

1. The raw-image :class:`~lumina_jax.data.pipeline.DataPipeline` runs over the source exactly once,
   in record order (``shuffle=False``, ``num_epochs=1``, **no caption dropout**), with the training
   transforms: decode, RGB conversion, best-fit crop for the stage ``resolution``, [-1, 1]. Samples are
   batched by crop size, so every VAE call sees a dense ``(B, H, W, 3)`` batch; the padding rows of an
   incomplete bucket are encoded and discarded. Unusable records (missing/corrupt images, empty
   captions, ...) are skipped and counted by reason, as in training.
2. The VAE encodes each batch (jitted, compiled once per crop size):
   ``latent = (mode(encode(image)) - shift) * scale`` (spec §5).
3. Gemma-2 encodes the prompts (jitted, compiled once per length bucket 64/128/.../``max_length``):
   ``hidden_states[-2]`` with right padding. The prompt is the pipeline's, i.e. the source's system
   prompt (``"base"``/``"align"`` for the original JSONL keys) followed by the caption; it is encoded as is
   (no second system prompt). Features and mask are stored trimmed to the prompt's own tokens: the
   features of valid tokens do not depend on the padding that follows (causal attention, right
   padding), and the training collate re-pads with zeros and ``cap_mask=False``.
4. Records (``latent``, ``cap_feats``, ``cap_mask`` as bf16/bool, ``crop_size``, ``prompt``, ``key`` = the
   record's own identifier, ``id`` = ``"<source>:<index>"``) are written by
   :func:`lumina_jax.data.cache.write_latent_cache` as ArrayRecord shards of ``shard_size`` records.

Caption dropout is **not** applied here. The cache stores the features of the empty prompt ``""``
(one ``<bos>`` token, no system prompt) once, in ``empty_prompt.ljr``; training with
``caption_dropout=p`` on a :class:`~lumina_jax.data.cache.LatentCacheSource` replaces a sample's
``cap_feats``/``cap_mask`` by those features with probability ``p``
(:class:`~lumina_jax.data.cache.LatentSampleLoader`) -- what the original does to the text.

Several hosts: process ``i`` of ``n`` takes records ``i, i+n, i+2n, ...`` of the source and writes a
complete cache of its own under ``<out>/process-0000i-of-0000n/`` (with one process: ``<out>`` itself).
Either list those directories as the training ``data.paths`` (with ``weights`` proportional to their
``cache_info.json`` record counts), or, once every process has finished,
run :func:`merge_parts` (``preprocess --merge --out DIR``) to move all shards into ``<out>`` as one cache.
A process whose slice has no usable record writes an empty part (no shards, its skip counts): merge it, or
leave it out of ``data.paths``. The merge refuses parts encoded from different data (source name, type,
record count, system prompt; not its path, which may differ between hosts) or with different settings.
Each process encodes on all of its local devices (the batch is split across them; params replicated).

Resuming: shards are written atomically, so a shard that exists is complete. A rerun with the same
settings skips complete shards without encoding their records. To avoid decoding their images again
as well, the run keeps ``preprocess_state.json`` with the pipeline's state (a JSON snapshot,
:meth:`~lumina_jax.data.pipeline.DataIterator.get_state`) at the batch that starts each shard; the rerun
restores the latest snapshot before the first missing shard (about one batch, plus the samples that
were waiting in crop-size buckets, is read again; nothing before it is encoded again). Without it
(deleted), the rerun replays the pipeline from the start and still encodes only missing shards, if
nothing contradicts it: every existing shard must be full (a finished run's short last shard would
swallow the records a rerun over more data puts after it) and a finished cache's recorded settings
(``cache_info.json`` ``made_with``) must be this run's. The settings that decide which record lands
where (source, resolution, batch, bucket window, workers, shard size, models, dtype, host split) are
checked against the state file; a mismatch is an error.
``max_shards`` stops a run after that many new shards (time-boxed or preemptible jobs).

Output files per cache directory: ``latents-NNNNN.array_record``, their size sidecars
``latents-NNNNN.sizes.npy``, ``cache_config.json``, ``empty_prompt.ljr``, ``record_sizes.npy`` (the size
index: ``[H, W, L]`` per record, see :mod:`lumina_jax.data.cache`), ``cache_info.json`` (written last: the
cache is complete), plus ``preprocess_state.json`` and ``preprocess_summary.json`` (samples written, skips
by reason, ...). A merge carries the sidecars along with their shards and writes ``record_sizes.npy``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lumina_jax.data import records as rec_lib
from lumina_jax.data.cache import (
    CACHE_INFO_FILE,
    LATENT_CACHE_SCHEMA,
    LATENT_CHANNELS,
    LATENT_SHARD_PREFIX,
    RECORD_SIZES_FILE,
    SIZES_SUFFIX,
    VAE_DOWNSAMPLE,
    make_latent_record,
    shard_sizes_path,
    write_latent_cache,
    write_size_index,
)
from lumina_jax.data.pipeline import DataPipeline, NoUsableSampleError, PipelineConfig
from lumina_jax.data.stats import DataStats
from lumina_jax.text_templates import DEFAULT_SYSTEM_PROMPT, SYSTEM_PROMPTS, resolve_system_prompt

logger = logging.getLogger("lumina_jax.data.preprocess")

STATE_FILE = "preprocess_state.json"
SUMMARY_FILE = "preprocess_summary.json"
MERGE_PLAN_FILE = "merge_plan.json"
STATE_VERSION = 1
_PART_RE = re.compile(r"^process-(\d{5,})-of-(\d{5,})$")
_CACHE_FILES = ("cache_config.json", "cache_info.json", "empty_prompt.ljr", RECORD_SIZES_FILE, STATE_FILE,
                SUMMARY_FILE)  # fmt: skip
_DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "float32": jnp.float32}
_BF16 = np.dtype(ml_dtypes.bfloat16)


class PreprocessError(RuntimeError):
    """A preprocessing run cannot start or continue (bad settings, incomplete parts, ...)."""


def part_dir_name(process_index: int, process_count: int) -> str:
    """Directory of one process's cache inside ``out_dir`` (``process-00001-of-00004``)."""
    return f"process-{process_index:05d}-of-{process_count:05d}"


# ---------------------------------------------------------------------------------------------------
# Sources


def open_source(
    spec: str | os.PathLike,
    *,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    tfds_split: str = "train",
    tfds_data_dir: Optional[str] = None,
    image_key: str = "image",
    caption_key: str = "caption",
) -> Any:
    """The image source a ``--data`` value names.

    * ``*.jsonl`` / ``*.json``: original-format JSON lines, or a ``.json`` JSON array of records
      (:class:`~lumina_jax.data.sources.JsonlSource`; their keys choose the system prompt);
    * ``*.yaml`` / ``*.yml``: original ``META`` list of JSONL/JSON files, concatenated;
    * a directory of ``images-NNNNN.array_record`` shards or one such file
      (:class:`~lumina_jax.data.sources.ArrayRecordImageSource`);
    * a prepared TFDS dataset directory (with ``dataset_info.json``), or ``tfds:NAME`` / a registered TFDS
      name (``name``, ``name/config:version``) read from ``tfds_data_dir``.

    ``system_prompt`` applies to records without their own (ArrayRecord, TFDS).
    """
    from lumina_jax.data import sources as src_lib

    text = str(spec)
    path = Path(spec)

    def tfds(name: Optional[str] = None, builder_dir: Optional[Path] = None) -> Any:
        try:
            import tensorflow_datasets  # noqa: F401
        except ImportError:
            raise PreprocessError(
                f"--data {text!r}: reading TFDS datasets needs tensorflow_datasets (pip install "
                f"tensorflow-datasets)"
            ) from None
        try:
            return src_lib.TfdsSource(
                name=name, split=tfds_split, data_dir=tfds_data_dir, builder_dir=builder_dir,
                image_key=image_key, caption_key=caption_key, system_prompt=system_prompt,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 -- tfds raises many kinds of "not found"
            what = "cannot read the TFDS dataset" if builder_dir is not None or text.startswith("tfds:") else (
                "not a file or directory, and not a TFDS dataset that can be read")
            first_line = (str(e).strip().splitlines() or [""])[0]  # tfds appends every dataset name
            raise PreprocessError(f"--data {text!r}: {what} ({type(e).__name__}: {first_line})") from None

    if text.startswith("tfds:"):
        return tfds(name=text[len("tfds:"):])
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return src_lib.JsonlSource(path)
        if suffix in (".yaml", ".yml"):
            sources = src_lib.load_yaml_sources(path)
            return sources[0] if len(sources) == 1 else src_lib.ConcatSource(sources, name=path.stem)
        if path.name.endswith(rec_lib.SHARD_SUFFIX):
            return src_lib.ArrayRecordImageSource([path], system_prompt=system_prompt)
        raise PreprocessError(
            f"--data {text!r}: unknown file type (expected .jsonl, .json, .yaml or .array_record)"
        )
    if path.is_dir():
        if rec_lib.list_shards(path, src_lib.IMAGE_SHARD_PREFIX):
            return src_lib.ArrayRecordImageSource(path, system_prompt=system_prompt)
        if (path / "dataset_info.json").is_file():
            return tfds(builder_dir=path)
        raise PreprocessError(
            f"--data {text!r}: the directory holds neither '{src_lib.IMAGE_SHARD_PREFIX}-NNNNN"
            f"{rec_lib.SHARD_SUFFIX}' shards nor a prepared TFDS dataset (dataset_info.json)"
        )
    looks_like_path = (
        path.suffix.lower() in (".jsonl", ".json", ".yaml", ".yml") or text.endswith(rec_lib.SHARD_SUFFIX)
        or text.startswith(("/", ".", "~")) or path.is_absolute()
    )  # fmt: skip
    if looks_like_path:
        raise PreprocessError(f"--data {text!r}: no such file or directory")
    return tfds(name=text)


def open_sources(specs: Sequence[str | os.PathLike], **kwargs: Any) -> Any:
    """One source for several ``--data`` values (concatenated in the given order)."""
    from lumina_jax.data.sources import ConcatSource

    if not specs:
        raise PreprocessError("no --data source given")
    sources = [open_source(s, **kwargs) for s in specs]
    return sources[0] if len(sources) == 1 else ConcatSource(sources, name="data")


def _absolute_paths(desc: dict[str, Any]) -> dict[str, Any]:
    """A :func:`describe_source` dict with its (and its parts') local paths made absolute."""
    out = dict(desc)
    for attr in ("path", "cache_dir"):
        if isinstance(out.get(attr), str) and "://" not in out[attr]:
            out[attr] = os.path.abspath(out[attr])
    if isinstance(out.get("parts"), list):
        out["parts"] = [_absolute_paths(p) if isinstance(p, dict) else p for p in out["parts"]]
    return out


def describe_source(source: Any) -> dict[str, Any]:
    """What identifies a source in the state file (its name, type, size and files when known)."""
    out: dict[str, Any] = {"name": source.name, "type": type(source).__name__, "records": len(source)}
    for attr in ("path", "cache_dir", "system_prompt"):  # system_prompt: of records without their own
        if getattr(source, attr, None) is not None:
            out[attr] = str(getattr(source, attr))
    if isinstance(getattr(source, "system_prompt", None), str):  # the text it means (the rule may change)
        out["system_prompt_text"] = resolve_system_prompt(source.system_prompt)
    inner = getattr(source, "_sources", None)
    if inner:
        out["parts"] = [describe_source(s) for s in inner]
    return _absolute_paths(out)  # a rerun from another folder (or with an absolute path) is the same data


# ---------------------------------------------------------------------------------------------------
# Encoders


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _vae_latents(params: Any, images: jax.Array, *, config: Any, dtype: Any) -> jax.Array:
    from lumina_jax.models.vae import AutoencoderKL, scale_latents

    posterior = AutoencoderKL(config, dtype=dtype).apply({"params": params}, images, method=AutoencoderKL.encode)
    return scale_latents(posterior.mode(), config)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "precision"))
def _text_features(params: Any, ids: jax.Array, mask: jax.Array, *, config: Any, dtype: Any,
                   precision: Any) -> jax.Array:  # fmt: skip
    from lumina_jax.models.gemma2 import dit_features

    feats = dit_features(params, ids, mask, config, dtype=dtype, precision=precision)
    return jnp.where(mask[..., None], feats, jnp.zeros((), feats.dtype))  # as TextEncoder


class Encoders:
    """The frozen VAE encoder and Gemma-2 text encoder, data-parallel over this process's devices.

    Args:
      vae_config, vae_params: the autoencoder (:func:`lumina_jax.convert.vae.load_vae`); must have the
        cache's 8x down-sampling and 16 latent channels.
      text_encoder: a :class:`lumina_jax.text.TextEncoder` (its tokenizer and params are used; prompts
        are encoded as given, without adding a system prompt).
      dtype: compute dtype of both networks (``"bf16"`` default, ``"fp32"``); params keep theirs and
        outputs are stored as bf16 either way.
      devices: devices to split each batch over (default: all local devices); params are replicated.
      description: identifies the models in the state file (paths), so that a resume with other
        models is refused.

    The jitted functions are module-level, so encoders built from the same models share compilations.
    """

    def __init__(self, vae_config: Any, vae_params: Any, text_encoder: Any, *, dtype: str = "bf16",
                 devices: Optional[Sequence[Any]] = None, description: Optional[Mapping[str, Any]] = None):  # fmt: skip
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if vae_config.downsample_factor != VAE_DOWNSAMPLE or vae_config.latent_channels != LATENT_CHANNELS:
            raise ValueError(
                f"the latent cache needs a VAE with {VAE_DOWNSAMPLE}x down-sampling and {LATENT_CHANNELS} "
                f"latent channels (FLUX); this one has {vae_config.downsample_factor}x and "
                f"{vae_config.latent_channels}"
            )
        self.dtype_name = "bf16" if _DTYPES[dtype] == jnp.bfloat16 else "fp32"
        self.dtype = _DTYPES[dtype]
        self.vae_config = vae_config
        self.text = text_encoder
        self.devices = list(devices) if devices is not None else list(jax.local_devices())
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._batch = NamedSharding(self.mesh, PartitionSpec("data"))
        self.vae_params = jax.device_put(vae_params, self._replicated)
        self.text_params = jax.device_put(text_encoder.params, self._replicated)
        self.description = dict(description or {"vae": "<in memory>", "text_encoder": "<in memory>"})
        self.image_shapes: set[tuple[int, ...]] = set()
        self.text_shapes: set[tuple[int, ...]] = set()

    @classmethod
    def load(cls, vae: str | os.PathLike, text_encoder: str | os.PathLike,
             tokenizer: Optional[str | os.PathLike] = None, *, dtype: str = "bf16",
             devices: Optional[Sequence[Any]] = None) -> "Encoders":  # fmt: skip
        """Load a diffusers ``AutoencoderKL`` directory, a transformers Gemma-2 directory and its tokenizer.

        ``tokenizer`` defaults to a ``tokenizer/`` folder next to the text encoder (the Lumina-Image-2.0
        layout), else the text-encoder directory itself. Each missing path is named in the error.
        """
        from lumina_jax.convert.gemma2 import load_text_encoder
        from lumina_jax.convert.vae import load_vae
        from lumina_jax.text import TextEncoder, default_tokenizer_path, load_tokenizer

        check_component_paths(vae, text_encoder, tokenizer)
        if tokenizer is None:
            tokenizer = default_tokenizer_path(text_encoder)
        devices = list(devices) if devices is not None else list(jax.local_devices())
        replicated = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec())
        vae_config, vae_params = load_vae(vae)
        text_config, text_params = load_text_encoder(text_encoder)
        # Place once, replicated: TextEncoder keeps jax arrays where they are (no second copy).
        text_params = jax.device_put(text_params, replicated)
        tok = load_tokenizer(tokenizer)
        text = TextEncoder(text_params, text_config, tok, dtype=dtype)
        description = EncoderSpec(str(vae), str(text_encoder), str(tokenizer), dtype).describe()
        description.pop("dtype")
        return cls(vae_config, vae_params, text, dtype=dtype, devices=devices, description=description)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def describe(self) -> dict[str, Any]:
        return {"dtype": self.dtype_name, **self.description}

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """Images ``(B, H, W, 3)`` in [-1, 1] -> scaled latents ``(B, H/8, W/8, 16)`` float32."""
        images = np.asarray(images, np.float32)
        self.image_shapes.add(images.shape)
        x = jax.device_put(images, self._batch)
        out = _vae_latents(self.vae_params, x, config=self.vae_config, dtype=self.dtype)
        return np.asarray(out)

    def tokenize(self, prompts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ids and mask of the prompts as given (no system prompt added), padded to the
        smallest length bucket; prompts longer than ``max_length`` are truncated (see
        :meth:`count_truncated`)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncation is counted and reported in the summary
            return self.text.tokenize(list(prompts), system_prompt="empty", max_length=max_length)

    def count_truncated(self, prompts: Sequence[str], max_length: int) -> int:
        """How many of ``prompts`` have more than ``max_length`` tokens (``<bos>`` included)."""
        if not prompts:
            return 0
        ids = self.text.tokenizer(list(prompts), add_special_tokens=True, padding=False,
                                  truncation=False)["input_ids"]  # fmt: skip
        return sum(len(x) > max_length for x in ids)

    def encode_prompts(self, prompts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Gemma-2 ``hidden_states[-2]`` ``(B, L, D)`` (compute dtype, zero where padded) and the mask
        ``(B, L)`` bool; ``L`` is the length bucket of the longest prompt."""
        ids, mask = self.tokenize(prompts, max_length)
        self.text_shapes.add(ids.shape)
        feats = _text_features(
            self.text_params, jax.device_put(ids, self._batch), jax.device_put(mask, self._batch),
            config=self.text.config, dtype=self.dtype, precision=self.text.precision,
        )  # fmt: skip
        return np.asarray(feats), mask

    def empty_prompt_features(self, batch_size: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and mask of ``""`` (``[<bos>]``), trimmed to its one token. Encoded in a batch of
        ``batch_size`` so that it reuses the compilation of the data batches."""
        feats, mask = self.encode_prompts([""] * batch_size, max_length)
        n = int(mask[0].sum())
        return feats[0, :n], mask[0, :n]


def check_component_paths(vae: Any, text_encoder: Any, tokenizer: Any = None) -> None:
    """Raise :class:`FileNotFoundError` naming the option of each model path that does not exist."""
    missing = []
    for option, path, what in (
        ("--vae", vae, "a diffusers AutoencoderKL directory (config.json + safetensors) or a pipeline "
                       "directory with vae/"),
        ("--text-encoder", text_encoder, "a transformers Gemma-2 directory (config.json + safetensors), the "
                                         "project's text_encoder/ folder or a pipeline folder holding one"),
        ("--tokenizer", tokenizer, "a tokenizer directory (tokenizer.json/tokenizer_config.json or "
                                   "tokenizer.model)"),
    ):  # fmt: skip
        if option != "--tokenizer" and not path:
            missing.append(f"{option} is required: {what}")
        elif path and not Path(path).exists():
            missing.append(f"{option} {path}: no such file or directory (expected {what})")
    if missing:
        raise FileNotFoundError("; ".join(missing))


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Where the models are: :func:`preprocess` loads them only if there is work to do (a rerun of a
    complete cache, or one with the wrong settings, never pays the load).

    ``tokenizer`` defaults to ``tokenizer/`` next to the text encoder (the Lumina-Image-2.0 layout), else
    the text-encoder directory itself.
    """

    vae: str
    text_encoder: str
    tokenizer: Optional[str] = None
    dtype: str = "bf16"

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        check_component_paths(self.vae, self.text_encoder, self.tokenizer)
        if self.tokenizer is None:
            from lumina_jax.text import default_tokenizer_path

            object.__setattr__(self, "tokenizer", str(default_tokenizer_path(self.text_encoder)))

    @property
    def num_devices(self) -> int:
        return len(jax.local_devices())

    def describe(self) -> dict[str, Any]:
        return {
            "dtype": "bf16" if _DTYPES[self.dtype] == jnp.bfloat16 else "fp32",
            "vae": str(Path(self.vae).resolve()),
            "text_encoder": str(Path(self.text_encoder).resolve()),
            "tokenizer": str(Path(self.tokenizer).resolve()),
        }

    def load(self) -> "Encoders":
        return Encoders.load(self.vae, self.text_encoder, self.tokenizer, dtype=self.dtype)


# ---------------------------------------------------------------------------------------------------
# Configuration and results


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Settings of one preprocessing run (per process).

    Attributes:
      out_dir: cache directory (with several processes, each writes ``out_dir/process-i-of-n``).
      resolution: stage resolution in px (256 or 1024 for the recipe of spec §6.4; any multiple of 16).
      batch_size: images per encoder call; a multiple of the number of local devices.
      shard_size: records per ArrayRecord shard (must match an interrupted run's).
      max_length: Gemma-2 token limit (256 as in the original); longer prompts are truncated and counted.
      bucket_window: longest wait of a sample for its crop-size bucket (default ``16 * batch_size``);
        larger values encode fewer padding rows.
      max_ratio: largest aspect ratio of a crop size.
      process_index, process_count: this process's slice; default ``jax.process_index()/process_count()``.
      num_workers, read_threads: grain worker processes and decode threads of the pipeline.
      max_shards: stop after writing this many new shards (the cache stays resumable).
      probe_samples: records tried before starting (an unusable source fails fast).
      max_consecutive_skips: this many unusable records in a row stop the run with
        :class:`~lumina_jax.data.pipeline.NoUsableSampleError` (``--max-consecutive-skips``); not part of
        the settings a resume checks, so an interrupted run can be resumed with a higher limit.
      progress: show a tqdm progress bar.
    """

    out_dir: str
    resolution: int = 1024
    batch_size: int = 16
    shard_size: int = 1000
    max_length: int = 256
    bucket_window: Optional[int] = None
    max_ratio: float = 4.0
    process_index: Optional[int] = None
    process_count: Optional[int] = None
    num_workers: int = 0
    read_threads: int = 4
    max_shards: Optional[int] = None
    probe_samples: int = 32
    max_consecutive_skips: int = 1000
    progress: bool = True

    def __post_init__(self):
        for name in ("batch_size", "shard_size", "max_length", "read_threads", "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_shards is not None and self.max_shards < 1:
            raise ValueError(f"max_shards must be >= 1, got {self.max_shards}")
        if (self.process_index is None) != (self.process_count is None):
            raise ValueError("give both process_index and process_count, or neither")
        if self.process_count is not None and not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")

    def host_shard(self) -> tuple[int, int]:
        if self.process_index is None:
            return jax.process_index(), jax.process_count()
        return self.process_index, self.process_count

    def cache_dir(self) -> Path:
        """Where this process writes: ``out_dir`` or ``out_dir/process-i-of-n``."""
        index, count = self.host_shard()
        out = Path(self.out_dir)
        return out if count == 1 else out / part_dir_name(index, count)


@dataclasses.dataclass
class PreprocessResult:
    """Outcome of :func:`preprocess` for one process.

    Attributes:
      cache_dir: the directory written.
      complete: every record of this process's slice is in the cache (False after ``max_shards``).
      process_index, process_count: the slice (records ``process_index::process_count`` of the source).
      num_records, num_shards: records and shards in the cache now.
      new_records, new_shards: written by this run.
      records_read: records of this process's slice read so far (encoded + skipped).
      slice_records: records in this process's slice.
      skipped: ``{source: {reason: count}}`` (pipeline counters).
      truncated_prompts: prompts longer than ``max_length`` tokens (truncated).
      padding_rows: padding rows encoded for incomplete crop-size buckets (wasted work).
      compiled: ``{"vae": [...], "text": [...]}``: encoder input shapes first used by this
        :class:`Encoders` in this run (each is one compilation, shared by later runs in the process).
      seconds: wall time of this run.
      max_length: the token limit used.
      already_complete: the cache was complete before this run (nothing was done; the counters are
        those of the run that completed it).
    """

    cache_dir: str
    complete: bool
    process_index: int
    process_count: int
    num_records: int
    num_shards: int
    new_records: int
    new_shards: int
    records_read: int
    slice_records: int
    skipped: dict[str, dict[str, int]]
    truncated_prompts: int
    padding_rows: int
    compiled: dict[str, list]
    seconds: float
    max_length: int = 256
    already_complete: bool = False

    @property
    def total_skipped(self) -> int:
        return sum(n for reasons in self.skipped.values() for n in reasons.values())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessResult":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def format_summary(result: PreprocessResult) -> str:
    """A human-readable report of a run (what the CLI prints at the end)."""
    r = result
    where = f"process {r.process_index} of {r.process_count}"
    status = "complete" if r.complete else "INCOMPLETE (stopped early; rerun the same command to resume)"
    this_run = " (already complete, nothing to do)" if r.already_complete else ""
    lines = [
        f"latent cache {r.cache_dir} ({where}): {status}",
        f"  samples written: {r.num_records} in {r.num_shards} shard(s); this run: {r.new_records} new "
        f"record(s) in {r.new_shards} new shard(s){this_run}",
        f"  records read: {r.records_read} of {r.slice_records} in this process's slice; "
        f"skipped: {r.total_skipped}",
    ]
    for source, reasons in sorted(r.skipped.items()):
        detail = ", ".join(f"{reason}={n}" for reason, n in sorted(reasons.items()))
        lines.append(f"    skipped in {source!r}: {detail}")
    if r.truncated_prompts:
        lines.append(f"  prompts truncated to {r.max_length} tokens: {r.truncated_prompts}")
    if r.padding_rows:
        lines.append(f"  padding rows encoded for incomplete crop-size buckets: {r.padding_rows}")
    if r.compiled.get("vae") or r.compiled.get("text"):
        lines.append(f"  encoder batch shapes (one compilation each): VAE {len(r.compiled.get('vae', []))} "
                     f"(crop sizes), Gemma-2 {len(r.compiled.get('text', []))} (length buckets)")  # fmt: skip
    rate = r.new_records / r.seconds if r.seconds > 0 else 0.0
    lines.append(f"  time: {r.seconds:.1f} s ({rate:.2f} new records/s)")
    lines.append(
        "  caption dropout happens at training time: the empty prompt's features are stored once in "
        "empty_prompt.ljr (LatentCacheSource swaps them in with probability caption_dropout)"
    )
    if r.process_count > 1:
        lines.append(
            f"  {r.process_count} processes each write their own directory; when all are done, merge them "
            f"with: python -m lumina_jax preprocess --merge --out {Path(r.cache_dir).parent}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Resume state


class _MaxShardsReached(Exception):
    pass


def _older_source(old: Any, new: Any) -> Any:
    """An older state's source description with the system prompt it did not record: ``"base"``, the
    sources' default then, and the text it meant then (custom text verbatim, since changed to diffusers'
    rule), so that resuming such a run with another prompt text is refused, not mixed."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return old
    old = dict(old)
    if "system_prompt" in new and "system_prompt" not in old:
        old["system_prompt"] = "base"
    if "system_prompt_text" in new and "system_prompt_text" not in old and isinstance(old.get("system_prompt"), str):
        # written before the text was recorded, when custom text was used verbatim (templates as now)
        old["system_prompt_text"] = SYSTEM_PROMPTS.get(old["system_prompt"], old["system_prompt"])
    if isinstance(old.get("parts"), list) and isinstance(new.get("parts"), list):
        old["parts"] = [_older_source(o, n) for o, n in zip(old["parts"], new["parts"])]
    return old


def _check_shards_without_state(out: Path, done_shards: int, shard_size: int, made: dict[str, Any]) -> None:
    """Shards with no state file to say how they were made are continued only when nothing contradicts
    this run: each full (a finished run's short last shard would swallow the records the rerun puts
    after it), and the cache's recorded settings (when it finished) this run's."""
    info = out / CACHE_INFO_FILE
    old = (json.loads(info.read_text()).get("made_with") if info.exists() else None) or {}
    if "source" in old:
        old = dict(old, source=_older_source(old["source"], made.get("source")))
    diff = sorted(k for k in made if k in old and old[k] != json.loads(json.dumps(made[k])))
    if diff:
        detail = "; ".join(f"{k}: was {old[k]!r}, now {made[k]!r}" for k in diff)
        raise PreprocessError(f"{out} was made with other settings ({detail}) and has no {STATE_FILE}; write to a "
                              f"new --out directory")  # fmt: skip
    names = [rec_lib.shard_name(LATENT_SHARD_PREFIX, i) for i in range(done_shards)]
    held = _count_records(out, names)
    if held != done_shards * shard_size:
        raise PreprocessError(f"{out}: its {done_shards} shard(s) hold {held} records, not {done_shards} x {shard_size}"
                              f" (a finished run's last shard, or another shard size); without {STATE_FILE} they "
                              f"cannot be continued: write to a new --out directory")  # fmt: skip


def _contiguous_shards(directory: Path) -> int:
    """Number of complete shards ``latents-00000 .. latents-(k-1)`` (shards are written in order)."""
    names = {p.name for p in rec_lib.list_shards(directory, LATENT_SHARD_PREFIX)}
    k = 0
    while rec_lib.shard_name(LATENT_SHARD_PREFIX, k) in names:
        k += 1
    return k


class _StateFile:
    """``preprocess_state.json``: the run's settings, pipeline snapshots at shard starts, completion."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path = path
        self.settings = settings
        self.entries: list[dict[str, Any]] = []
        self.complete: Optional[dict[str, Any]] = None
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise PreprocessError(f"{path}: corrupt state file ({e}); delete it to replay from the start") from None
            if data.get("version") != STATE_VERSION:
                raise PreprocessError(f"{path}: state version {data.get('version')} (expected {STATE_VERSION})")
            old = data.get("settings", {})
            if isinstance(old.get("source"), dict):  # states written before paths were made absolute (relative to
                # the folder the run is started from, as they were read then), or before the system prompt was kept
                old = dict(old, source=_older_source(_absolute_paths(old["source"]), settings.get("source")))
            if old != settings:
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                detail = "; ".join(f"{k}: was {old.get(k)!r}, now {settings.get(k)!r}" for k in diff)
                raise PreprocessError(
                    f"{path.parent} was written with other settings ({detail}). Resume with the same "
                    f"settings, or write to a new --out directory."
                )
            self.entries = list(data.get("entries", []))
            self.complete = data.get("complete")

    def save(self) -> None:
        rec_lib.write_json_atomic(self.path, {
            "version": STATE_VERSION, "settings": self.settings, "entries": self.entries, "complete": self.complete,
        })  # fmt: skip

    def best_entry(self, done_records: int) -> Optional[dict[str, Any]]:
        """The latest snapshot taken at or before record ``done_records``."""
        best = None
        for e in self.entries:
            if e["emitted"] <= done_records and (best is None or e["emitted"] >= best["emitted"]):
                best = e
        return best

    def add(self, entry: dict[str, Any], done_records: int) -> None:
        self.entries = [e for e in self.entries if e["emitted"] != entry["emitted"]] + [entry]
        self.entries.sort(key=lambda e: e["emitted"])
        anchor = self.best_entry(done_records)
        if anchor is not None:  # older snapshots can no longer be needed: those shards exist
            self.entries = [e for e in self.entries if e["emitted"] >= anchor["emitted"]]
        self.save()


# ---------------------------------------------------------------------------------------------------
# The run


def _pipeline_config(cfg: PreprocessConfig, index: int, count: int) -> PipelineConfig:
    return PipelineConfig(
        # Per-process buckets whatever the sources' indexes: every process encodes its own records and
        # writes its own shards; a resumable run must not switch plans because an image index appeared.
        resolution=cfg.resolution, batch_size=cfg.batch_size, batching="bucket", bucket_plan="host",
        bucket_window=cfg.bucket_window,
        drop_incomplete=False, seed=0, shuffle=False, num_epochs=1, caption_dropout=0.0,
        random_crop_offset=False, image_dtype="float32", max_ratio=cfg.max_ratio, shard_index=index,
        shard_count=count, drop_shard_remainder=False, num_workers=cfg.num_workers,
        read_threads=cfg.read_threads, probe_samples=cfg.probe_samples,
        max_consecutive_skips=cfg.max_consecutive_skips,
        max_consecutive_skips_option="--max-consecutive-skips (PreprocessConfig.max_consecutive_skips)",
    )  # fmt: skip


def _settings(cfg: PreprocessConfig, source: Any, encoders: "Encoders | EncoderSpec", index: int,
              count: int) -> dict[str, Any]:  # fmt: skip
    return {
        "source": describe_source(source),
        "models": encoders.describe(),
        "resolution": cfg.resolution,
        "batch_size": cfg.batch_size,
        "bucket_window": cfg.bucket_window,
        "max_ratio": cfg.max_ratio,
        "shard_size": cfg.shard_size,
        "max_length": cfg.max_length,
        "num_workers": cfg.num_workers,
        "process_index": index,
        "process_count": count,
    }


# settings that decide what a record holds: the processes of one cache must agree on them (checked by the
# merge), and the cache keeps them (with its source) in cache_info.json for the trainer to check
MERGE_KEYS = ("models", "resolution", "max_ratio", "max_length", "shard_size")


def made_with(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: settings.get(k) for k in ("source", "models", "resolution", "max_ratio", "max_length")}


def _count_records(directory: Path, shard_names: Optional[Sequence[str]] = None) -> int:
    paths = rec_lib.list_shards(directory, LATENT_SHARD_PREFIX)
    if shard_names is not None:
        paths = [p for p in paths if p.name in set(shard_names)]
    return len(rec_lib.ShardedRecordReader(paths)) if paths else 0


def preprocess(source: Any, encoders: "Encoders | EncoderSpec", config: PreprocessConfig) -> PreprocessResult:
    """Encode this process's slice of ``source`` into a latent cache (see the module docstring).

    ``encoders``: loaded :class:`Encoders`, or an :class:`EncoderSpec` loaded only when needed.
    Returns a :class:`PreprocessResult`; ``complete`` is False when ``max_shards`` stopped the run.
    Raises :class:`PreprocessError` for settings that differ from an interrupted run's,
    :class:`lumina_jax.data.pipeline.NoUsableSampleError` for a source without usable samples. With
    several processes, a process whose slice has no usable record (every one skipped) completes an empty
    part that carries its skip counts (:func:`merge_parts` takes it).
    """
    t0 = time.perf_counter()
    cfg = config
    index, count = cfg.host_shard()
    if not 0 <= index < count:
        raise PreprocessError(f"process index {index} not in [0, {count})")
    if cfg.batch_size % encoders.num_devices:
        n = encoders.num_devices
        raise PreprocessError(
            f"batch size {cfg.batch_size} is not a multiple of the {n} local devices the batch is split "
            f"over; use e.g. --batch {n * max(1, round(cfg.batch_size / n))}"
        )
    out = cfg.cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    slice_records = len(range(index, len(source), count))
    state = _StateFile(out / STATE_FILE, _settings(cfg, source, encoders, index, count))
    if state.complete is not None and (out / "cache_info.json").exists():
        result = PreprocessResult.from_dict(state.complete)
        result.new_records = result.new_shards = 0
        result.already_complete = True
        result.compiled = {"vae": [], "text": []}
        result.seconds = time.perf_counter() - t0
        return result

    done_shards = _contiguous_shards(out)
    done_records = done_shards * cfg.shard_size
    if done_shards and not (out / STATE_FILE).exists():  # checked before the (long) encoder load
        _check_shards_without_state(out, done_shards, cfg.shard_size, made_with(state.settings))
        logger.warning("%s: %d complete shard(s) but no %s; replaying the pipeline from the start (their "
                       "records are not encoded again)", out, done_shards, STATE_FILE)  # fmt: skip
    if isinstance(encoders, EncoderSpec):
        encoders = encoders.load()
    stop_at = None if cfg.max_shards is None else (done_shards + cfg.max_shards) * cfg.shard_size
    shards_before = {p.name for p in rec_lib.list_shards(out, LATENT_SHARD_PREFIX)}
    image_shapes0, text_shapes0 = set(encoders.image_shapes), set(encoders.text_shapes)
    empty = encoders.empty_prompt_features(cfg.batch_size, cfg.max_length)

    counters = {"truncated": 0, "padding_rows": 0}
    stats_holder: dict[str, Any] = {"stats": DataStats()}

    def records() -> Iterator[Optional[dict]]:
        """Cache records in order; ``None`` for records of shards that are already complete."""
        if slice_records == 0:
            return
        pipeline = DataPipeline(source, _pipeline_config(cfg, index, count))
        it = iter(pipeline)
        bar = None
        try:
            emitted = 0
            entry = state.best_entry(done_records)
            if entry is not None:
                it.set_state(entry["state"])
                emitted = int(entry["emitted"])
                counters.update(entry["counters"])
            stats_holder["stats"] = it.stats
            bar = _progress(cfg.progress, slice_records, it.stats, out)
            for _ in range(emitted):
                yield None
            while True:
                snapshot = it.get_state()
                snap_counters = dict(counters)
                try:
                    batch = next(it)
                except StopIteration:  # checked before max_shards: a run that wrote the last record is complete
                    break
                except NoUsableSampleError:
                    if count == 1 or it.stats.samples or it.stats.total_skipped() != slice_records:
                        raise
                    # Every record of this process's slice was read and skipped (the others' slices may have
                    # usable ones): an empty, complete part with its skip counts, so that --merge can go on.
                    stats_holder["stats"] = it.stats
                    logger.warning("%s: none of the %d records of process %d's slice is usable (%s); it is an "
                                   "empty part", out, slice_records, index, it.stats.summary())  # fmt: skip
                    break
                if stop_at is not None and emitted >= stop_at:
                    raise _MaxShardsReached()
                stats_holder["stats"] = it.stats
                valid = np.flatnonzero(batch["valid"])
                lo, hi = emitted, emitted + len(valid)
                counters["padding_rows"] += len(batch["valid"]) - len(valid)
                prompts = [batch["prompts"][i] for i in valid]
                counters["truncated"] += encoders.count_truncated(prompts, cfg.max_length)
                _update(bar, it.stats)
                if hi <= done_records:  # every record of this batch is in a complete shard
                    for _ in valid:
                        yield None
                    emitted = hi
                    continue
                # A shard starts in this batch: snapshot the state before it, for a later resume.
                first = max(lo, done_records)
                if (first + cfg.shard_size - 1) // cfg.shard_size * cfg.shard_size < hi:
                    state.add({"emitted": lo, "state": snapshot, "counters": snap_counters},
                              _contiguous_shards(out) * cfg.shard_size)  # fmt: skip
                latents = encoders.encode_images(batch["images"])
                feats, masks = encoders.encode_prompts(batch["prompts"], cfg.max_length)
                for j, i in enumerate(valid):
                    r = lo + j
                    if stop_at is not None and r >= stop_at:
                        raise _MaxShardsReached()
                    if r < done_records:
                        yield None
                        continue
                    yield _make_record(batch, i, latents[i], feats[i], masks[i])
                emitted = hi
        finally:
            if bar is not None:
                bar.close()
            it.close()  # stops worker processes and prefetch threads

    complete = True
    try:
        paths = write_latent_cache(records(), out, cfg.shard_size, empty_prompt_features=empty,
                                   made_with=made_with(state.settings))
    except _MaxShardsReached:
        complete = False
        paths = rec_lib.list_shards(out, LATENT_SHARD_PREFIX)

    stats: DataStats = stats_holder["stats"]
    names_after = [p.name for p in paths]
    new_names = [n for n in names_after if n not in shards_before]
    result = PreprocessResult(
        cache_dir=str(out),
        complete=complete,
        process_index=index,
        process_count=count,
        num_records=_count_records(out, names_after),
        num_shards=len(names_after),
        new_records=_count_records(out, new_names) if new_names else 0,
        new_shards=len(new_names),
        records_read=stats.samples + stats.total_skipped() if slice_records else 0,
        slice_records=slice_records,
        skipped={s: dict(r) for s, r in stats.skipped.items()},
        truncated_prompts=int(counters["truncated"]),
        padding_rows=int(counters["padding_rows"]),
        compiled={"vae": sorted(encoders.image_shapes - image_shapes0),
                  "text": sorted(encoders.text_shapes - text_shapes0)},  # fmt: skip
        seconds=time.perf_counter() - t0,
        max_length=cfg.max_length,
    )
    if complete:
        rec_lib.write_json_atomic(out / SUMMARY_FILE, _summary_json(result))
        state.entries = []
        state.complete = result.to_dict()
        state.save()
    return result


def _make_record(batch: dict, i: int, latent: np.ndarray, feats: np.ndarray, mask: np.ndarray) -> dict:
    key = batch["keys"][i]
    if not (np.all(np.isfinite(latent)) and np.all(np.isfinite(np.asarray(feats, np.float32)))):
        raise FloatingPointError(
            f"non-finite encoder output for {key!r} ({batch['ids'][i]}): check the VAE / text-encoder "
            f"weights, or use --dtype fp32"
        )
    n = int(np.sum(mask))
    record = make_latent_record(
        latent, np.asarray(feats[:n]).astype(_BF16), mask[:n], prompt=batch["prompts"][i],
        crop_size=[int(s) for s in batch["image_sizes"][i]], key=str(key),
    )  # fmt: skip
    record["id"] = str(batch["ids"][i])
    return record


def _summary_json(result: PreprocessResult) -> dict[str, Any]:
    d = result.to_dict()
    d["samples_written"] = result.num_records
    d["samples_skipped"] = result.total_skipped
    return d


def _progress(enabled: bool, total: int, stats: DataStats, out: Path) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="img", desc=f"preprocess {out.name}", dynamic_ncols=True)
    _update(bar, stats)
    return bar


def _update(bar: Any, stats: DataStats) -> None:
    if bar is None:
        return
    read = stats.samples + stats.total_skipped()
    if read > bar.n:
        bar.update(read - bar.n)
    bar.set_postfix(skipped=stats.total_skipped(), refresh=False)


# ---------------------------------------------------------------------------------------------------
# Merging the processes' directories


@dataclasses.dataclass
class MergeResult:
    out_dir: str
    num_records: int
    num_shards: int
    parts: int
    skipped: dict[str, dict[str, int]]


def find_parts(out_dir: str | os.PathLike) -> dict[int, Path]:
    """``{process_index: directory}`` of the per-process caches in ``out_dir``; checks they are all
    there (one process count) and complete."""
    out = Path(out_dir)
    if not out.is_dir():
        raise PreprocessError(f"--out {out}: no such directory")
    found: dict[int, dict[int, Path]] = {}
    for d in out.iterdir():
        m = _PART_RE.match(d.name)
        if m and d.is_dir():
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = d
    if not found:
        raise PreprocessError(f"{out}: no per-process directories (process-IIIII-of-NNNNN) to merge")
    if len(found) > 1:
        raise PreprocessError(f"{out}: directories of several process counts {sorted(found)}; keep one")
    count, parts = next(iter(found.items()))
    missing = sorted(set(range(count)) - set(parts))
    if missing:
        raise PreprocessError(f"{out}: processes {missing} of {count} have no directory yet; run them first")
    unfinished = []
    for i, d in sorted(parts.items()):
        state = d / STATE_FILE
        try:
            complete = json.loads(state.read_text()).get("complete") if state.exists() else None
        except json.JSONDecodeError:
            complete = None
        if not complete or not (d / "cache_info.json").exists():
            unfinished.append(i)
    if unfinished:
        raise PreprocessError(
            f"{out}: processes {unfinished} of {count} have not finished (rerun them with the same "
            f"command and --process-index i --process-count {count}; they resume)"
        )
    return dict(sorted(parts.items()))


def _source_identity(desc: Any) -> Any:
    """A :func:`describe_source` dict without its local paths: hosts may mount the same data at other paths."""
    if not isinstance(desc, dict):
        return desc
    out = {k: v for k, v in desc.items() if k not in ("path", "cache_dir")}
    if isinstance(out.get("parts"), list):
        out["parts"] = [_source_identity(p) for p in out["parts"]]
    return out


def _source_differences(a: Any, b: Any, where: str = "") -> list[str]:
    """The fields of two source identities that differ (only those both record: older states lack some)."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [where or "source"]
    diff = []
    for key in sorted(set(a) & set(b)):
        name = f"{where}.{key}" if where else key
        if key == "parts" and isinstance(a[key], list) and isinstance(b[key], list) and len(a[key]) == len(b[key]):
            for j, (pa, pb) in enumerate(zip(a[key], b[key])):
                diff += _source_differences(pa, pb, f"{name}[{j}]")
        elif a[key] != b[key]:
            diff.append(name)
    return diff


def _check_same_source(out: Path, sources: Mapping[str, Any]) -> None:
    """:class:`PreprocessError` naming two parts (directory names -> their recorded source) that encoded
    different data: another name, type, record count or system prompt (paths are not compared)."""
    known = [(name, _source_identity(desc)) for name, desc in sources.items() if isinstance(desc, dict)]
    for name, ident in known[1:]:
        diff = _source_differences(known[0][1], ident)
        if diff:
            first, first_ident = known[0]
            raise PreprocessError(
                f"{out}: the processes encoded different data ({', '.join(diff)} differ): {first} from "
                f"{first_ident}, {name} from {ident}; every process must run on the same --data (paths may "
                f"differ) before merging"
            )


def merge_parts(out_dir: str | os.PathLike, *, progress: bool = False) -> MergeResult:
    """Moves the shards of every ``process-i-of-n`` directory into ``out_dir`` as one cache.

    Shards are renumbered in process order (no data is copied: files are renamed); each shard's size
    sidecar moves with it (renamed to the new shard's), one a part lacks is built by reading the shard,
    and ``record_sizes.npy`` is written before ``cache_info.json``. Resumable: the plan is written first
    and an interrupted merge continues where it stopped when run again. ``progress``: a bar over the
    records read to build missing sidecars. A part without shards (every record of its slice skipped) adds its
    skip counts only; if every part is empty, :class:`PreprocessError` names the skip reasons. Parts whose
    recorded source (name, type, record count, system prompt; not its path) or settings differ are refused.
    """
    out = Path(out_dir)
    plan_path = out / MERGE_PLAN_FILE
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
    else:
        parts = find_parts(out)
        if rec_lib.list_shards(out, LATENT_SHARD_PREFIX):
            raise PreprocessError(f"{out} already holds latent shards; merge into an empty directory")
        for stray in out.glob(f"{LATENT_SHARD_PREFIX}-*{SIZES_SUFFIX}"):  # sidecars of no shard
            stray.unlink()
        configs = {(d / "cache_config.json").read_text() for d in parts.values()}
        if len(configs) != 1:
            raise PreprocessError(f"{out}: the processes' cache_config.json differ (different shard sizes?)")
        settings = {i: json.loads((d / STATE_FILE).read_text()).get("settings", {}) for i, d in parts.items()}
        for key in MERGE_KEYS:
            values = {i: s.get(key) for i, s in settings.items()}
            if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
                raise PreprocessError(f"{out}: the processes encoded with different {key!r} ({values}); rerun the "
                                      f"differing processes with the others' settings before merging")  # fmt: skip
        _check_same_source(out, {parts[i].name: s.get("source") for i, s in settings.items()})
        moves, skipped = [], {}
        for i, d in parts.items():
            for p in rec_lib.list_shards(d, LATENT_SHARD_PREFIX):
                moves.append([f"{d.name}/{p.name}", rec_lib.shard_name(LATENT_SHARD_PREFIX, len(moves))])
            summary = json.loads((d / STATE_FILE).read_text())["complete"]
            for source, reasons in summary.get("skipped", {}).items():
                for reason, n in reasons.items():
                    skipped.setdefault(source, {})
                    skipped[source][reason] = skipped[source].get(reason, 0) + int(n)
        if not moves:  # every part is empty: no record of the data was usable
            reasons = "; ".join(f"{source}: " + ", ".join(f"{r}={n}" for r, n in sorted(rs.items()))
                                for source, rs in sorted(skipped.items()))  # fmt: skip
            raise PreprocessError(f"{out}: none of the {len(parts)} processes wrote a record: every record was skipped "
                                  f"({reasons or 'no skip counts recorded'}); check the data")  # fmt: skip
        first = next(iter(parts.values()))
        plan = {"parts": [d.name for d in parts.values()], "moves": moves, "skipped": skipped,
                "config_from": first.name, "made_with": made_with(next(iter(settings.values())))}  # fmt: skip
        rec_lib.write_json_atomic(plan_path, plan)
    first = out / plan["config_from"]
    for name in ("cache_config.json", "empty_prompt.ljr"):
        if (first / name).exists():
            tmp = out / f".{name}.tmp"
            shutil.copyfile(first / name, tmp)
            os.replace(tmp, out / name)
    for src, dst in plan["moves"]:
        # The shard moves first, then its sidecar: a rerun after a crash in between moves the sidecar.
        src_sizes, dst_sizes = shard_sizes_path(out / src), shard_sizes_path(out / dst)
        if (out / src).exists():
            dst_sizes.unlink(missing_ok=True)  # not this shard's: its own follows it
            os.replace(out / src, out / dst)
        elif not (out / dst).exists():
            raise PreprocessError(f"{out}: {src} vanished before it was moved to {dst}")
        if src_sizes.exists():
            os.replace(src_sizes, dst_sizes)
    names = [dst for _, dst in plan["moves"]]
    num_records = len(write_size_index(out, [out / n for n in names], progress=progress))
    info = {"schema": LATENT_CACHE_SCHEMA, "num_records": num_records, "shards": names}
    if plan.get("made_with"):
        info["made_with"] = plan["made_with"]
    rec_lib.write_json_atomic(out / "cache_info.json", info)
    rec_lib.write_json_atomic(out / SUMMARY_FILE, {"samples_written": num_records, "skipped": plan["skipped"],
                                                   "merged_from": plan["parts"]})  # fmt: skip
    for part in plan["parts"]:
        d = out / part
        if not d.is_dir():
            continue
        for name in _CACHE_FILES:
            (d / name).unlink(missing_ok=True)
        try:
            d.rmdir()
        except OSError:
            logger.warning("%s: left in place (it holds other files)", d)
    plan_path.unlink()
    return MergeResult(str(out), num_records, len(names), len(plan["parts"]), plan["skipped"])


__all__ = [
    "EncoderSpec",
    "Encoders",
    "MergeResult",
    "PreprocessConfig",
    "PreprocessError",
    "PreprocessResult",
    "check_component_paths",
    "describe_source",
    "find_parts",
    "format_summary",
    "merge_parts",
    "open_source",
    "open_sources",
    "part_dir_name",
    "preprocess",
]
