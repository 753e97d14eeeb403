"""The training input pipeline: sources -> host shard -> shuffle -> decode/crop -> mix -> batch.

Built on grain's dataset API (jax_notes §5)::

    for each source (weight w_i):
        range(epochs * per_host_epoch)
          .map(EpochShardIndex)     # local step -> (epoch, record): per-epoch global shuffle, host slice
          .map(loader)              # read + decode + crop + prompt, or a skip marker (never raises)
          .to_iter_dataset(threads) # ordered thread prefetch
        -> SkipGuard                # absorbs skip markers into the next sample, detects dead sources
    IterDataset.mix(components, weights)   # deterministic interleave, per-component state
    -> BatchIterDataset                    # crop-size buckets (default) or token-budget packing
    -> optional tokenize(prompts)          # per batch
    -> mp_prefetch(num_workers)            # worker processes
    -> DataIterator                        # strips/accumulates counters, get_state/set_state

Sharding across hosts: every epoch, the records of a source are permuted with a seed derived from
``(seed, source, epoch)``, and host ``h`` of ``n`` takes positions ``h, h+n, ...`` of that permutation
(``drop_shard_remainder`` keeps the hosts' counts equal). Hosts are disjoint within an epoch and
cover the whole source (minus the remainder), and a record gets the same per-sample randomness on
any number of hosts.

Determinism: the same seed, sources, config, host count and ``num_workers`` give the same batches.
Worker processes each batch their own slice of the stream, so changing ``num_workers`` changes the
batches (not the per-sample content); restoring a saved state requires the same ``num_workers``.
The saved state records the settings that decide the order (:func:`state_fingerprint`), and
``set_state`` raises ``ValueError`` naming each one that differs in the restoring pipeline.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import sys
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import grain
import numpy as np

from lumina_jax.data import batching
from lumina_jax.data.stats import DataStats
from lumina_jax.data.transforms import ImageSampleLoader, ImageTransformConfig, is_skip

logger = logging.getLogger("lumina_jax.data")

Tokenize = Callable[[list[str]], Mapping[str, np.ndarray]]


GLOBAL_WINDOW = 64  # default bucket window of the global plan, in global batches


class NoUsableSampleError(RuntimeError):
    """A source yields no usable sample."""


class DataStateError(ValueError):
    """A saved data iterator state that does not fit this pipeline (other settings or layout)."""


class MissingSizeIndexError(ValueError):
    """The global bucket plan was asked for, but a source has no size index (or cannot have one)."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Settings of :class:`DataPipeline` (per host).

    Attributes:
      resolution: stage resolution (crop sizes and token budget follow from it).
      batch_size: rows per batch on this host.
      batching: ``"bucket"`` (default: one crop size per batch, dense arrays) or ``"mixed"``
        (any sizes per batch, patch tokens padded to the token budget); see
        :mod:`lumina_jax.data.batching`.
      bucket_plan: who decides the buckets of ``bucket`` batching. ``"host"``: each host buckets its own
        samples (hosts may pick different sizes at one step). ``"global"``: every host computes the
        same plan of global batches from the sources' size indexes (latent caches' ``record_sizes.npy``,
        raw images' :mod:`lumina_jax.data.image_index`) and reads its rows of each
        (:mod:`lumina_jax.data.global_plan`); needed to train on several hosts with buckets. ``"auto"``
        (default): ``"global"`` when every source has a size index, else ``"host"``.
      bucket_window: longest wait of a sample in a bucket, in samples read after it (default
        ``16 * batch_size``: decoded samples wait there; with the global plan it counts global samples,
        default ``64 * global batch``: only references wait, and at a global batch of 1024 with a
        photo-like mix of aspect ratios 16x leaves 15 % padding rows, 64x 0.5 %, BENCHMARKS.md); a
        bucket still incomplete then is emitted padded.
      drop_incomplete: drop (and count) buckets that do not fill, instead of padding them.
      seed: seeds shuffling and per-sample randomness.
      shuffle: shuffle each epoch (False: records in order; still sharded by host).
      num_epochs: passes over each source; ``None`` = forever. With several sources the mixture ends
        when the first source ends.
      caption_dropout, random_crop_offset, image_dtype, max_ratio: see
        :class:`lumina_jax.data.transforms.ImageTransformConfig`.
      shard_index, shard_count: this host's slice; default ``jax.process_index()/process_count()``.
      drop_shard_remainder: give every host ``len // shard_count`` records per epoch.
      num_workers: grain worker processes (0: everything in this process).
      worker_buffer_size: batches buffered per worker.
      read_threads: threads reading/decoding samples of each source (per process).
      read_buffer_size: samples read ahead per source (default ``2 * batch_size``).
      max_consecutive_skips: a source that skips this many records in a row is an error
        (:class:`NoUsableSampleError`).
      max_consecutive_skips_option: how the user sets ``max_consecutive_skips`` (a config key or
        command-line flag); named by that error's advice. Callers that build this config from their
        own settings set it to their option's name.
      probe_samples: records of each source tried at construction; if all fail (and that is the
        whole source) it is an error naming the source.
      text_len, text_pad_multiple: padding of cached text features (latent sources).
    """

    resolution: int = 1024
    batch_size: int = 16
    batching: str = "bucket"
    bucket_plan: str = "auto"
    bucket_window: Optional[int] = None
    drop_incomplete: bool = False
    seed: int = 0
    shuffle: bool = True
    num_epochs: Optional[int] = None
    caption_dropout: float = 0.1
    random_crop_offset: bool = False
    image_dtype: str = "float32"
    max_ratio: float = 4.0
    shard_index: Optional[int] = None
    shard_count: Optional[int] = None
    drop_shard_remainder: bool = True
    num_workers: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    read_buffer_size: Optional[int] = None
    max_consecutive_skips: int = 1000
    max_consecutive_skips_option: str = "PipelineConfig.max_consecutive_skips"
    probe_samples: int = 32
    text_len: Optional[int] = None
    text_pad_multiple: int = 8

    def __post_init__(self):
        if self.batching not in ("bucket", "mixed"):
            raise ValueError(f"batching must be 'bucket' or 'mixed', got {self.batching!r}")
        if self.bucket_plan not in ("auto", "global", "host"):
            raise ValueError(f"bucket_plan must be 'auto', 'global' or 'host', got {self.bucket_plan!r}")
        if self.bucket_plan == "global" and self.batching != "bucket":
            raise ValueError("bucket_plan='global' plans crop-size buckets; it needs batching='bucket'")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.max_consecutive_skips < 1:
            raise ValueError(
                f"{self.max_consecutive_skips_option} must be >= 1, got {self.max_consecutive_skips}"
            )
        self.transform_config()  # validates resolution, caption_dropout, max_ratio, image_dtype

    @property
    def token_budget(self) -> int:
        return (self.resolution // batching.IMAGE_PATCH) ** 2

    def transform_config(self) -> ImageTransformConfig:
        return ImageTransformConfig(
            resolution=self.resolution,
            caption_dropout=self.caption_dropout,
            random_crop_offset=self.random_crop_offset,
            max_ratio=self.max_ratio,
            image_dtype=self.image_dtype,
        )

    def host_shard(self) -> tuple[int, int]:
        if self.shard_index is None and self.shard_count is None:
            import jax

            return jax.process_index(), jax.process_count()
        if self.shard_index is None or self.shard_count is None:
            raise ValueError("give both shard_index and shard_count, or neither")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index {self.shard_index} not in [0, {self.shard_count})")
        return self.shard_index, self.shard_count


class EpochShardIndex:
    """Local step ``k`` of one host -> ``(epoch, record_index)`` of a source of ``n`` records."""

    def __init__(
        self,
        n: int,
        seed: int,
        source_id: int,
        shard_index: int,
        shard_count: int,
        drop_remainder: bool = True,
        shuffle: bool = True,
    ):
        self.n, self.seed, self.source_id = n, seed, source_id
        self.shard_index, self.shard_count = shard_index, shard_count
        self.shuffle = shuffle
        if drop_remainder:
            self.per_epoch = n // shard_count
        else:
            self.per_epoch = len(range(shard_index, n, shard_count))
        self._epoch_seed_cache: tuple[int, int] = (-1, 0)

    def _epoch_seed(self, epoch: int) -> int:
        cached = self._epoch_seed_cache  # read once: several reader threads call this
        if cached[0] == epoch:
            return cached[1]
        ss = np.random.SeedSequence([self.seed, self.source_id, epoch, 0x5A4D])
        seed = int(ss.generate_state(1)[0])
        self._epoch_seed_cache = (epoch, seed)
        return seed

    def __call__(self, k: int) -> tuple[int, int]:
        epoch, j = divmod(int(k), self.per_epoch)
        position = j * self.shard_count + self.shard_index
        if not self.shuffle or self.n == 1:
            return epoch, position
        record = grain.experimental.index_shuffle(
            position, max_index=self.n - 1, seed=self._epoch_seed(epoch), rounds=4
        )
        return epoch, int(record)


class SkipGuardIterDataset(grain.IterDataset):
    """Absorbs skip markers of one source into the next sample (``_skips_before``), so that mixture
    weights apply to usable samples; raises :class:`NoUsableSampleError` after
    ``max_consecutive_skips`` skips in a row (its message names ``option``, the setting that raises
    the limit). Skips after the last sample of a finite source are passed on in one ``_stats_only``
    element."""

    def __init__(
        self,
        parent: grain.IterDataset,
        source_name: str,
        max_consecutive_skips: int,
        option: str = "max_consecutive_skips",
    ):
        super().__init__(parent)
        self._source_name = source_name
        self._max = max_consecutive_skips
        self._option = option

    def __iter__(self):
        return _SkipGuardIterator(self._parent.__iter__(), self._source_name, self._max, self._option)


class _SkipGuardIterator(grain.DatasetIterator):
    def __init__(self, parent, source_name: str, max_consecutive_skips: int, option: str):
        super().__init__(parent)
        self._source_name = source_name
        self._max = max_consecutive_skips
        self._option = option

    def __next__(self) -> dict:
        tally = batching.SkipTally()
        consecutive = 0
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                if tally:
                    return {"_stats_only": True, "_skips": tally.take()}
                raise
            if not is_skip(element):
                if tally:
                    element["_skips_before"] = tally.take()
                return element
            tally.add_marker(element)
            consecutive += 1
            if consecutive >= self._max:
                reasons = ", ".join(f"{k.split(chr(9))[1]}={v}" for k, v in tally.counts.items())
                raise NoUsableSampleError(
                    f"source {self._source_name!r}: {consecutive} records in a row were unusable "
                    f"({reasons}; e.g. {tally.examples[:3]}). Check the data, or raise the limit "
                    f"({self._max}) with {self._option}."
                )

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)


class BatchTokenize:
    """Applies ``tokenize(prompts)`` to each batch and adds its arrays (``input_ids``,
    ``attention_mask``). ``tokenize`` must be picklable when ``num_workers > 0``."""

    def __init__(self, tokenize: Tokenize):
        self.tokenize = tokenize

    def __call__(self, batch: dict) -> dict:
        if batch.get("_stats_only"):
            return batch
        out = self.tokenize(list(batch["prompts"]))
        for k, v in out.items():
            if k in batch:
                raise KeyError(f"tokenize returned {k!r}, which the batch already has")
            batch[k] = np.asarray(v)
        return batch


def _workers_ignore_sigint(worker_index: int, worker_count: int) -> None:
    """Data workers ignore SIGINT: a Ctrl-C in the terminal reaches the whole process group, and the
    trainer stops after its step with a checkpoint, which needs the workers alive until then (they end
    with the trainer)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _mark_absl_flags_parsed() -> None:
    """grain <= 0.2.18 reads an absl flag in ``mp_prefetch`` once jax is imported and raises
    ``UnparsedFlagAccessError`` outside ``absl.app`` (google/grain#1355, fixed by #1362); the
    documented workaround is to mark the flags as parsed (their defaults are then used)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _make_loader(source: Any, source_id: int, config: PipelineConfig):
    kind = getattr(source, "kind", "image")
    if kind == "image":
        return ImageSampleLoader(source, source_id, config.transform_config(), config.seed)
    if kind == "latent":
        from lumina_jax.data.cache import LatentSampleLoader

        return LatentSampleLoader(source, source_id, config.caption_dropout, config.seed)
    raise ValueError(f"source {source.name!r} has unknown kind {kind!r}")


def probe_source(source: Any, loader: Callable, max_probe: int) -> None:
    """Raises :class:`NoUsableSampleError` if the first ``max_probe`` records all fail and that is the
    whole source (or the source is empty); only warns if a larger source starts with failures."""
    n = len(source)
    if n == 0:
        raise NoUsableSampleError(f"source {source.name!r} is empty")
    reasons: dict[str, int] = {}
    for i in range(min(n, max_probe)):
        element = loader((0, i))
        if not is_skip(element):
            return
        reasons[element["_skip"]] = reasons.get(element["_skip"], 0) + 1
    detail = ", ".join(f"{r}={c}" for r, c in sorted(reasons.items()))
    if n <= max_probe:
        raise NoUsableSampleError(
            f"source {source.name!r} has no usable sample: all {n} records failed ({detail})"
        )
    logger.warning(
        "source %r: the first %d of %d records are all unusable (%s)", source.name, max_probe, n, detail
    )


class DataPipeline:
    """Batches from one or more weighted sources (see the module docstring).

    Args:
      sources: one source or a sequence (all image sources, or all latent-cache sources).
      config: :class:`PipelineConfig`.
      weights: mixture weights (default equal); applied to usable samples.
      tokenize: optional ``list[str] -> {"input_ids", "attention_mask"}`` applied per batch.

    Iterate with ``iter(pipeline)`` -> :class:`DataIterator` (``get_state``/``set_state``, ``stats``).
    """

    def __init__(
        self,
        sources: Union[Any, Sequence[Any]],
        config: PipelineConfig = PipelineConfig(),
        weights: Optional[Sequence[float]] = None,
        tokenize: Optional[Tokenize] = None,
    ):
        sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        if not sources:
            raise ValueError("no sources given")
        kinds = {getattr(s, "kind", "image") for s in sources}
        if len(kinds) > 1:
            raise ValueError(f"cannot mix source kinds {sorted(kinds)} in one pipeline")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(
                f"source names must be unique (they key the counters): {names}; pass name=... "
                f"when building the sources"
            )
        if weights is not None:
            if len(weights) != len(sources):
                raise ValueError(f"{len(weights)} weights for {len(sources)} sources")
            if any(w <= 0 for w in weights):
                raise ValueError(f"weights must be positive, got {list(weights)}")
        self.config = config
        self.sources = sources
        self.weights = list(weights) if weights is not None else None
        self.kind = kinds.pop()
        shard_index, shard_count = config.host_shard()

        self.bucket_plan = resolve_bucket_plan(sources, config)
        self.plan_dataset: Optional[grain.IterDataset] = None
        loaders = []
        for source_id, source in enumerate(sources):
            loader = _make_loader(source, source_id, config)
            if config.probe_samples > 0:
                probe_source(source, loader, config.probe_samples)
            loaders.append(loader)
        if self.bucket_plan == "global":
            ds = self._global_plan(loaders, shard_index, shard_count)
        else:
            ds = self._host_batches(loaders, shard_index, shard_count)
        if tokenize is not None:
            ds = ds.map(BatchTokenize(tokenize))
        if config.num_workers > 0:
            _mark_absl_flags_parsed()
            options = grain.MultiprocessingOptions(
                num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size
            )
            if "worker_init_fn" in inspect.signature(ds.mp_prefetch).parameters:
                ds = ds.mp_prefetch(options, worker_init_fn=_workers_ignore_sigint)
            else:  # older grain: a Ctrl-C in the terminal also stops the workers
                ds = ds.mp_prefetch(options)
        self.dataset: grain.IterDataset = ds
        self.fingerprint = state_fingerprint(sources, config, self.weights, self.bucket_plan)

    def _components(self, loaders: Sequence[Callable], shard_index: int, shard_count: int,
                    read_threads: int, read_buffer: int) -> grain.IterDataset:  # fmt: skip
        """Each source's epoch-shuffled ``(epoch, record)`` stream of host slice ``shard_index`` through its
        loader, skip-guarded, then mixed by the weights."""
        config = self.config
        components = []
        for source_id, (source, loader) in enumerate(zip(self.sources, loaders)):
            index = EpochShardIndex(
                len(source), config.seed, source_id, shard_index, shard_count,
                config.drop_shard_remainder, config.shuffle,
            )  # fmt: skip
            if index.per_epoch == 0:
                raise ValueError(
                    f"source {source.name!r} has {len(source)} records, fewer than the "
                    f"{shard_count} hosts sharing it"
                )
            total = index.per_epoch * config.num_epochs if config.num_epochs else sys.maxsize
            ds = grain.MapDataset.range(total).map(index).map(loader)
            it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer))
            components.append(SkipGuardIterDataset(
                it, source.name, config.max_consecutive_skips, config.max_consecutive_skips_option
            ))  # fmt: skip
        return components[0] if len(components) == 1 else grain.IterDataset.mix(components, self.weights)

    def _host_batches(self, loaders: Sequence[Callable], shard_index: int, shard_count: int) -> grain.IterDataset:
        """Batches of this host's own samples (per-host buckets, or mixed)."""
        config = self.config
        if config.text_len is not None and self.kind == "latent" and all(
                getattr(s, "record_sizes", lambda: None)() is not None for s in self.sources):  # fmt: skip
            from lumina_jax.data import global_plan  # a caption longer than text_len: refused now, not at a step

            global_plan.check_text_len(self.sources, config.text_len, config.caption_dropout, config.text_pad_multiple)
        read_buffer = config.read_buffer_size or 2 * config.batch_size
        ds = self._components(loaders, shard_index, shard_count, config.read_threads, read_buffer)
        collate = batching.Collate(
            self.kind, config.batching, config.token_budget, config.text_len, config.text_pad_multiple
        )
        return batching.BatchIterDataset(
            ds,
            config.batch_size,
            collate,
            key_fn=batching.size_key if config.batching == "bucket" else None,
            window=config.bucket_window,
            drop_incomplete=config.drop_incomplete,
        )

    def _global_plan(self, loaders: Sequence[Callable], shard_index: int, shard_count: int) -> grain.IterDataset:
        """Buckets planned over the global stream from the size indexes; this host reads its rows
        (:mod:`lumina_jax.data.global_plan`)."""
        from lumina_jax.data import global_plan

        config = self.config
        crop_sizes = config.transform_config().crop_sizes if self.kind == "image" else None
        refs = [global_plan.SizeRefLoader(s, i, crop_sizes) for i, s in enumerate(self.sources)]
        if config.probe_samples > 0:
            for source, loader, ref in zip(self.sources, loaders, refs):
                global_plan.check_probe(source, loader, ref, config.probe_samples)
        global_batch = config.batch_size * shard_count
        window = config.bucket_window if config.bucket_window is not None else GLOBAL_WINDOW * global_batch
        if window < global_batch:
            raise ValueError(f"bucket_window ({window}) must be >= the global batch ({global_batch} = {config.batch_size} "
                             f"rows x {shard_count} hosts): with the global bucket plan it counts global samples")  # fmt: skip
        # Index lookups take microseconds: no prefetch threads (grain's prefetch buffer bookkeeping would cost
        # O(buffer) per element, O(global_batch^2) per batch).
        ds = self._components(refs, 0, 1, read_threads=0, read_buffer=0)
        ds = batching.BatchIterDataset(
            ds, global_batch, global_plan.plan_collate, key_fn=batching.size_key,
            window=window, drop_incomplete=config.drop_incomplete,
        )  # fmt: skip
        self.plan_dataset = ds  # the plan alone (references, no record read): for benchmarks and inspection
        text_len = global_plan.check_text_len(self.sources, config.text_len, config.caption_dropout,
                                              config.text_pad_multiple)  # fmt: skip
        collate = batching.Collate(self.kind, "bucket", config.token_budget, text_len, config.text_pad_multiple)
        start = shard_index * config.batch_size
        rows = global_plan.HostRows(
            loaders, self.sources, (start, start + config.batch_size), collate,
            count_plan_skips=shard_index == 0, read_threads=config.read_threads,
            max_consecutive_skips=config.max_consecutive_skips, option=config.max_consecutive_skips_option,
        )  # fmt: skip
        if config.num_workers > 0:
            return ds.map(rows)  # each worker process reads and collates whole batches
        # In-process: the reads of the next batch run while one is collated (global_plan.ReadAhead; depth 2
        # measured the same as 1 and holds one more decoded batch, BENCHMARKS.md), and
        # one prefetch thread prepares the next batch while this one trains.
        ds = global_plan.ReadAhead(ds, rows, depth=1)
        return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)

    def __iter__(self) -> "DataIterator":
        return DataIterator(iter(self.dataset), self.fingerprint)


def _record_sizes(source: Any) -> Optional[np.ndarray]:
    """A source's size index (``None`` without one, or for sources that cannot have one)."""
    sizes = getattr(source, "record_sizes", None)
    return sizes() if callable(sizes) else None


def resolve_bucket_plan(sources: Sequence[Any], config: PipelineConfig) -> str:
    """``"global"`` or ``"host"``: what ``config.bucket_plan`` means for these sources (see
    :class:`PipelineConfig`). Raises :class:`MissingSizeIndexError` for ``"global"`` with sources lacking a
    size index (latent caches: ``record_sizes.npy``; raw images: :mod:`lumina_jax.data.image_index`)."""
    if config.batching != "bucket" or config.bucket_plan == "host":
        return "host"
    missing = [s for s in sources if _record_sizes(s) is None]
    if not missing:
        return "global"
    if config.bucket_plan == "auto":
        return "host"
    from lumina_jax.data.global_plan import INDEX_COMMAND
    from lumina_jax.data.image_index import index_command, missing_index_files

    why = []
    for s in missing:
        if getattr(s, "kind", "image") == "latent":
            why.append(f"latent cache {s.cache_dir} has no size index (build it: `{INDEX_COMMAND.format(dir=s.cache_dir)}`)")
        elif _indexable(s):
            why.append(f"image source {s.name!r} has no size index (looked for {', '.join(missing_index_files(s))}; "
                       f"build it: `{index_command(s)}`)")  # fmt: skip
        else:
            why.append(f"image source {s.name!r} ({type(s).__name__}) cannot have a size index (JSONL/JSON files, "
                       f"prepared TFDS datasets and ArrayRecord shard folders can)")  # fmt: skip
    raise MissingSizeIndexError("bucket_plan='global' needs the crop size of every record without reading it: "
                                + "; ".join(why))


def _indexable(source: Any) -> bool:
    parts = getattr(source, "_sources", None)
    if parts is not None:
        return all(_indexable(p) for p in parts)
    return getattr(source, "index_data_path", None) is not None


def state_fingerprint(
    sources: Sequence[Any],
    config: PipelineConfig,
    weights: Optional[Sequence[float]] = None,
    bucket_plan: str = "host",
) -> dict[str, Any]:
    """The settings a saved iterator state depends on, as JSON values (stored in the state).

    A state restored into a pipeline that differs in any of them would fail inside grain (other
    ``num_workers``, sources or batching change the state's layout) or continue silently in another
    order (seed, shuffling, host slice, crop sizes). Sources are identified by name, kind and record
    count; mixture weights are normalised. Settings that only change a sample's content
    (``caption_dropout``, ``image_dtype``, ...), ``num_epochs`` and the reading parallelism
    (``read_threads``, buffers) are not included: they may change between a save and a restore.
    ``bucket_plan`` is the resolved plan (:func:`resolve_bucket_plan`); a global plan's state records the
    global batch instead of the host slice, since its order does not depend on the number of hosts.
    """
    shard_index, shard_count = config.host_shard()
    if len(sources) > 1:
        raw = list(weights) if weights is not None else [1.0] * len(sources)
        total = float(sum(raw))
        mix: Optional[list[float]] = [round(float(w) / total, 12) for w in raw]
    else:
        mix = None
    fingerprint = {
        "sources": [f"{s.name} ({getattr(s, 'kind', 'image')}, {len(s)} records)" for s in sources],
        "weights": mix,
        "seed": config.seed,
        "shuffle": config.shuffle,
        "shard_index": shard_index,
        "shard_count": shard_count,
        "drop_shard_remainder": config.drop_shard_remainder,
        "num_workers": config.num_workers,
        "batching": config.batching,
        "batch_size": config.batch_size,
        "bucket_window": config.bucket_window if config.bucket_window is not None else 16 * config.batch_size,
        "drop_incomplete": config.drop_incomplete,
        "resolution": config.resolution,
        "max_ratio": config.max_ratio,
    }
    if bucket_plan == "global":  # absent for per-host plans, so states saved before the global plan still match
        # The plan depends on the global batch, not on how it is split over hosts: the state can move to
        # another number of hosts (lumina_jax.train.checkpoint).
        for key in ("shard_index", "shard_count", "batch_size"):
            del fingerprint[key]
        fingerprint.update(bucket_plan="global", global_batch=config.batch_size * shard_count)
        if config.bucket_window is None:  # the plan's default window counts global samples
            fingerprint["bucket_window"] = GLOBAL_WINDOW * config.batch_size * shard_count
    return json.loads(json.dumps(fingerprint))  # the form it has after a JSON round trip


_CLOSE_TIMEOUT_S = 20.0


def _close_iterator(inner: grain.DatasetIterator, owner: "weakref.ref[DataIterator]") -> None:
    """Closes a :class:`DataIterator`'s pipeline: when the iterator is collected, or at interpreter exit
    while it is still alive (a script that never closed it). At exit its prefetch thread would otherwise
    still be reading when the interpreter finalizes ("terminate called without an active exception", exit
    code 134), and the pipeline's iterators would be closed again by their ``__del__`` once the modules they
    use are torn down; so the pipeline is closed and let go of here, while everything is still loaded."""
    import threading

    iterator = owner()
    close = inner.close if iterator is None else iterator.close  # idempotent; the whole pipeline
    # bounded: closing joins the prefetch thread, and a read stuck on a hung network file system must not
    # keep the process from exiting
    t = threading.Thread(target=close, daemon=True, name="lumina-data-close")
    t.start()
    t.join(timeout=_CLOSE_TIMEOUT_S)
    if t.is_alive():
        logger.warning("the data pipeline did not close within %.0f s (a read still running?); leaving it",
                       _CLOSE_TIMEOUT_S)
    elif iterator is not None:
        iterator._parents = ()  # the closed pipeline is collected now, not during interpreter teardown


class DataIterator(grain.DatasetIterator):
    """Iterator over batches with exact counters (:attr:`stats`) and a JSON-serialisable state.

    ``get_state()`` / ``set_state()`` cover the whole pipeline (all sources, buckets, workers) and the
    counters; use :func:`lumina_jax.data.checkpoint.save_with_data` or pass the iterator to
    ``grain.checkpoint.CheckpointSave`` to store it with orbax. The state also holds the pipeline's
    :func:`state_fingerprint` (``"config"``); ``set_state`` refuses a state saved by a pipeline whose
    fingerprint differs, naming each setting (states saved without one are restored unchecked).
    """

    def __init__(self, inner: grain.DatasetIterator, fingerprint: Optional[dict[str, Any]] = None):
        super().__init__(inner)
        self.stats = DataStats()
        self._fingerprint = fingerprint
        # Closed when collected, and at interpreter exit if still open (see _close_iterator).
        weakref.finalize(self, _close_iterator, inner, weakref.ref(self))

    def __next__(self) -> dict:
        while True:
            try:
                batch = next(self._parent)
            except StopIteration:
                if self.stats.samples == 0 and self.stats.total_skipped():  # every record was unusable
                    raise NoUsableSampleError(f"no usable sample in the data: {self.stats.summary()}") from None
                raise
            self.stats.add_skips(batch.pop("_skips", {}) or {})
            if batch.get("_stats_only"):
                continue
            valid = batch["valid"]
            n_valid = int(np.sum(valid))
            self.stats.batches += 1
            self.stats.samples += n_valid
            self.stats.padded_rows += len(valid) - n_valid
            self.stats.captions_dropped += int(np.sum(batch["caption_dropped"] & valid))
            return batch

    def get_state(self) -> dict:
        state = {"pipeline": self._parent.get_state(), "stats": self.stats.to_dict()}
        if self._fingerprint is not None:
            state["config"] = self._fingerprint
        return state

    def set_state(self, state: dict) -> None:
        """Restores ``state`` (from :meth:`get_state`); ``ValueError`` if it does not fit this pipeline."""
        saved = state.get("config")
        if saved is not None and self._fingerprint is not None:
            now = self._fingerprint
            changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
            if changed:
                detail = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
                hint = ""
                if "bucket_plan" in changed:
                    hint = (" The bucket plan changed: the data was indexed (a latent cache's or raw images' size "
                            "index appeared, or was removed) since the save; set bucket_plan='host' (training "
                            "config: stages.N.data.bucket_plan=host) to continue with per-host buckets, or "
                            "'global' to keep the global plan.")
                raise DataStateError(
                    f"cannot restore the data iterator: its state was saved by a pipeline with other settings "
                    f"(saved -> now: {detail}). Restore it into a pipeline configured as when it was saved, or "
                    f"start without the saved data state (training config: checkpoint.resume_data=false).{hint}"
                )
        try:
            self._parent.set_state(state["pipeline"])
        except (KeyError, IndexError, TypeError) as e:  # a state of another layout (no fingerprint to check)
            raise DataStateError(
                f"cannot restore the data iterator: the saved state does not fit this pipeline "
                f"({type(e).__name__}: {e}); was it saved with other num_workers, sources or batching?"
            ) from e
        self.stats = DataStats.from_dict(state["stats"])

    def __enter__(self) -> "DataIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # stops worker processes and prefetch threads

    def __str__(self) -> str:
        return "DataIterator"
