"""Per-stage batch sources for the trainer, and host -> global batch assembly.

Each process builds the iterator of *its* rows of the global batch (:func:`lumina_jax.parallel.sharding.process_rows`)
and the trainer assembles global arrays with ``jax.make_array_from_process_local_data``. Any iterator of
batch dicts works (``latents`` + ``cap_feats`` + ``cap_mask``, optional ``valid``; see
:mod:`lumina_jax.train.step`); if it has ``get_state``/``set_state`` it is checkpointed with the run.

Kinds (:class:`lumina_jax.train.config.DataConfig`):

* ``synthetic``: :class:`SyntheticLatents`, deterministic in-memory samples. Sample ``j`` of the
  global stream is a function of ``(seed, j)`` only, so any number of processes sees the same global
  batches (what the multi-process parity test relies on), and its state is one integer.
* ``latent_cache``: :class:`lumina_jax.data.DataPipeline` over :class:`lumina_jax.data.LatentCacheSource`
  directories (bucketed dense batches by default, or ``batching: mixed`` token batches), sharded per
  host by the pipeline itself. Caption dropout (default 10 %) happens there. On several hosts the
  buckets come from the global plan (:mod:`lumina_jax.data.global_plan`), so every host builds the
  same shapes at every step.
* ``images``: the same pipeline over raw captioned images plus :class:`FrozenEncoders` (VAE encoder and
  Gemma-2, frozen, not part of the train state) that turn each batch into latents and caption features
  before the step.
"""

from __future__ import annotations

import json
import logging

from typing import Any, Iterator, Optional

import jax
import numpy as np

from lumina_jax.parallel.sharding import global_batch, process_rows
from lumina_jax.train.config import DataConfig, StageConfig

logger = logging.getLogger(__name__)


class SyntheticLatents:
    """Endless deterministic batches of random latents and caption features (rows ``[start, stop)``
    of each global batch of ``global_batch`` rows).

    The ``num_samples`` distinct samples are visited in a per-epoch permutation; latents are smooth
    low-frequency fields (learnable by a tiny model), caption features are Gaussian with per-sample
    lengths in ``[cap_len // 2, cap_len]``. State: ``{"position": j}`` (next global sample index).
    """

    def __init__(self, *, latent_hw: tuple[int, int], channels: int, cap_len: int, cap_dim: int,
                 num_samples: int, global_batch: int, rows: tuple[int, int] = (0, 0), seed: int = 0,
                 shuffle: bool = True):  # fmt: skip
        self.h, self.w = latent_hw
        self.channels, self.cap_len, self.cap_dim = channels, cap_len, cap_dim
        self.num_samples, self.global_batch = num_samples, global_batch
        self.start, self.stop = rows if rows != (0, 0) else (0, global_batch)
        self.seed, self.shuffle = seed, shuffle
        self.position = 0

    def sample_index(self, j: int) -> int:
        epoch, k = divmod(j, self.num_samples)
        if not self.shuffle:
            return k
        return int(np.random.default_rng([self.seed, epoch, 7]).permutation(self.num_samples)[k])

    def sample(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i, 11])
        coarse = rng.standard_normal((max(self.h // 4, 1), max(self.w // 4, 1), self.channels)).astype(np.float32)
        lat = np.repeat(np.repeat(coarse, 4, 0), 4, 1)[: self.h, : self.w]
        if lat.shape[:2] != (self.h, self.w):
            lat = np.resize(lat, (self.h, self.w, self.channels))
        n = int(rng.integers(max(self.cap_len // 2, 1), self.cap_len + 1))
        feats = np.zeros((self.cap_len, self.cap_dim), np.float32)
        feats[:n] = rng.standard_normal((n, self.cap_dim)).astype(np.float32)
        mask = np.arange(self.cap_len) < n
        return {"latents": lat, "cap_feats": feats, "cap_mask": mask}

    def __iter__(self) -> "SyntheticLatents":
        return self

    def __next__(self) -> dict:
        base = self.position
        rows = [self.sample(self.sample_index(base + r)) for r in range(self.start, self.stop)]
        self.position += self.global_batch
        out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        out["valid"] = np.ones((len(rows),), bool)
        out["ids"] = [self.sample_index(base + r) for r in range(self.start, self.stop)]
        return out

    def get_state(self) -> dict:
        return {"position": int(self.position)}

    def set_state(self, state: dict) -> None:
        from lumina_jax.data.pipeline import DataStateError

        if not isinstance(state, dict) or set(state) != {"position"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise DataStateError(f"the saved data state {keys} is not synthetic data's ({{'position'}}): the stage's "
                                 f"data changed kind; resume with checkpoint.resume_data=false to start its data "
                                 f"from the beginning")  # fmt: skip
        self.position = int(state["position"])


class FrozenEncoders:
    """Frozen VAE encoder + Gemma-2 text encoder: raw ``images``/``prompts`` batches -> ``latents`` and
    caption features. Not trained, not checkpointed with the run (reloaded from their paths).

    The VAE runs jitted on the process's local rows (replicated params, ~84M); the text encoder is
    :class:`lumina_jax.text.TextEncoder`; both compute in ``dtype`` (``"bfloat16"`` default, as the
    original trains; ``"float32"`` when the model will be sampled with fp32 encoders). Caption features
    are padded to the longest caption's length bucket, or to ``max_text_len`` with ``fixed_text_len``
    (several hosts: every host must build the same shapes; padding changes no output, the model masks
    it). For large runs prefer a latent cache.
    """

    def __init__(self, vae_path: str, text_encoder_path: str, tokenizer_path: Optional[str] = None,
                 max_text_len: int = 256, dtype: str = "bfloat16", fixed_text_len: bool = False):  # fmt: skip
        import jax.numpy as jnp

        from lumina_jax.convert.vae import load_vae
        from lumina_jax.models.vae import AutoencoderKL, scale_latents
        from lumina_jax.text import TextEncoder

        self.vae_config, vae_params = load_vae(vae_path)
        self.vae_params = jax.device_put(vae_params)
        self.text = TextEncoder.from_pretrained(text_encoder_path, tokenizer_path,
                                                dtype="bf16" if dtype == "bfloat16" else "fp32")  # fmt: skip
        self.max_text_len = max_text_len
        self.fixed_text_len = fixed_text_len
        self.truncated = 0  # captions cut to max_text_len so far (this stage, this process)
        self.last_truncated = 0  # ... in the last batch
        model = AutoencoderKL(self.vae_config, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        cfg = self.vae_config

        @jax.jit
        def encode(params, images):
            post = model.apply({"params": params}, images, method=AutoencoderKL.encode)
            return scale_latents(post.mode(), cfg)

        self._encode = encode

    def __call__(self, batch: dict) -> dict:
        if "images" not in batch or "prompts" not in batch:
            raise KeyError("an images batch needs 'images' (B, H, W, 3) and 'prompts'")
        if np.ndim(batch["images"]) != 4:
            raise ValueError("raw-image training needs dense batches (batching: bucket)")
        latents = np.asarray(self._encode(self.vae_params, np.asarray(batch["images"], np.float32)))
        # The pipeline already replaced dropped captions by "" (caption dropout). Captions longer than
        # max_text_len are cut (as the original's tokenizer call does): said once per run, then counted.
        feats, mask = self.text.encode(list(batch["prompts"]), system_prompt="empty", max_length=self.max_text_len,
                                       on_truncate="quiet")  # fmt: skip
        valid = batch.get("valid")  # padding rows (copies of real ones) are not counted
        rows = self.text.last_truncated_rows
        cut = self.last_truncated = sum(1 for r in rows if valid is None or bool(valid[r]))
        if cut:
            if not self.truncated:
                logger.warning("captions longer than max_text_len=%d tokens are truncated (%d in this batch of %d; "
                               "raise the stage's data.max_text_len to keep them whole); said once per stage",
                               self.max_text_len, cut, len(batch["prompts"]))  # fmt: skip
            self.truncated += cut
        feats, mask = np.asarray(feats, np.float32), np.asarray(mask)
        if self.fixed_text_len and feats.shape[1] < self.max_text_len:
            pad = self.max_text_len - feats.shape[1]
            feats = np.pad(feats, ((0, 0), (0, pad), (0, 0)))
            mask = np.pad(mask, ((0, 0), (0, pad)))
        out = {k: v for k, v in batch.items() if k not in ("images",)}
        out.update(latents=latents, cap_feats=feats, cap_mask=mask)
        return out


class EncodedIterator:
    """``FrozenEncoders`` applied to each batch of an inner iterator (state = the inner iterator's; the
    captions cut to ``max_text_len`` are counted in its :attr:`stats`, so they are saved with it)."""

    def __init__(self, inner: Any, encoders: FrozenEncoders):
        self.inner, self.encoders = inner, encoders
        self._closed = False

    @property
    def stats(self) -> Any:
        return getattr(self.inner, "stats", None)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        out = self.encoders(next(self.inner))
        if self.stats is not None:
            self.stats.captions_truncated += self.encoders.last_truncated
        return out

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state) -> None:
        self.inner.set_state(state)

    def close(self) -> None:
        """Closes the inner iterator (its grain worker processes and prefetch threads); idempotent."""
        if self._closed:
            return
        self._closed = True
        if hasattr(self.inner, "close"):
            self.inner.close()


def check_cache_for_stage(cache: Any, stage: Any, model_config: Any) -> None:
    """A latent cache made for another stage is an error naming it: its recorded resolution (``preprocess``
    writes how it was made into ``cache_info.json``; older caches have no record and are not checked) and
    its caption-feature width (from its empty-prompt record) against the model's ``cap_feat_dim``."""
    made = getattr(cache, "made_with", None) or {}
    if made.get("resolution") is not None and int(made["resolution"]) != int(stage.resolution):
        raise ValueError(f"stage {stage.name!r} trains at {stage.resolution} px but the latent cache {cache.cache_dir} "
                         f"was encoded at {made['resolution']} px; give the stage a cache of its resolution")  # fmt: skip
    empty = getattr(cache, "empty_prompt", None)
    if empty is not None and empty[0].shape[-1] != model_config.cap_feat_dim:
        raise ValueError(f"latent cache {cache.cache_dir} holds {empty[0].shape[-1]}-wide caption features; the "
                         f"model expects cap_feat_dim {model_config.cap_feat_dim} (another text encoder?)")  # fmt: skip


# What a latent cache's ``made_with`` records of its encoders: caches that differ in these hold latents or caption
# features of other spaces (another VAE, another text encoder), not to be mixed in one batch.
ENCODER_FIELDS = ("models.vae", "models.text_encoder")


def check_caches_agree(caches: Any, stage: Any) -> list[str]:
    """Warn, naming the caches and fields, when a stage's latent caches were encoded with different VAEs or
    text encoders (their ``made_with`` in ``cache_info.json``, :data:`ENCODER_FIELDS`): one batch would mix
    latents of two latent spaces. A warning, not an error: the encoders are known by the paths they were
    read from, and one model copied to two places is still one model. A field is compared only between
    caches that record it (older caches record fewer, or nothing). Returns the differences."""
    differ = []
    for field in ENCODER_FIELDS:
        values = {}
        for cache in caches:
            value = getattr(cache, "made_with", None) or {}
            for key in field.split("."):
                value = value.get(key) if isinstance(value, dict) else None
            if value is not None:
                values[cache.cache_dir] = value
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            differ.append(f"{field}: " + ", ".join(f"{d} has {v!r}" for d, v in values.items()))
    if differ:
        logger.warning("stage %r mixes latent caches encoded with different encoders (%s): unless these are copies "
                    "of the same models, their latents or caption features are not interchangeable; encode every "
                    "cache of a stage with the same models (`preprocess --vae --text-encoder`), or train on them "
                    "in separate stages", stage.name, "; ".join(differ))
    return differ


def build_stage_iterator(
    stage: StageConfig,
    *,
    model_config: Any,
    mesh: jax.sharding.Mesh,
    seed: int,
    stage_index: int,
) -> tuple[Iterator[dict], Any]:
    """The iterator of this process's rows for ``stage``; returns ``(iterator, checkpointable)`` where
    the second is what to save with the run (the grain iterator itself for pipelines)."""
    d: DataConfig = stage.data
    start, stop, shard_index, shard_count = process_rows(stage.batch, mesh)
    check_same_shapes_on_every_host(stage, shard_count)
    data_seed = d.seed if d.seed is not None else (seed * 1000 + stage_index) % 2**32
    if d.kind == "synthetic":
        lat = stage.resolution // 8
        it = SyntheticLatents(
            latent_hw=(lat, lat), channels=model_config.in_channels, cap_len=d.cap_len,
            cap_dim=model_config.cap_feat_dim, num_samples=d.num_samples, global_batch=stage.batch,
            rows=(start, stop), seed=data_seed, shuffle=d.shuffle,
        )  # fmt: skip
        return it, it

    from lumina_jax.data import LatentCacheSource, PipelineConfig
    from lumina_jax.data.sources import unique_names

    # Several hosts with bucket batches: the buckets must come from the global plan (one shape per step).
    plan = "global" if shard_count > 1 and d.batching == "bucket" and d.bucket_plan == "auto" else d.bucket_plan
    pc = PipelineConfig(
        resolution=stage.resolution, batch_size=stop - start, batching=d.batching, bucket_plan=plan, seed=data_seed,
        shuffle=d.shuffle, caption_dropout=d.caption_dropout, shard_index=shard_index,
        shard_count=shard_count, num_workers=d.num_workers, read_threads=d.read_threads,
        text_len=d.text_len, max_consecutive_skips=d.max_consecutive_skips,
        max_consecutive_skips_option=f"stages.{stage_index}.data.max_consecutive_skips",
    )  # fmt: skip
    if d.kind == "latent_cache":
        caches = unique_names([LatentCacheSource(p) for p in d.paths])
        for c in caches:
            check_cache_for_stage(c, stage, model_config)
        check_caches_agree(caches, stage)
        pipe = _stage_pipeline(stage, caches, pc, shard_count,
                               "(Or use `batching: mixed` with a fixed `text_len`.)")  # fmt: skip
        it = iter(pipe)
        return it, it
    # images (DataConfig has checked that vae and text_encoder are given)
    from lumina_jax.data.image_index import set_index_dir

    sources = []
    for p in d.paths:
        sources.extend(image_sources(p, system_prompt=d.system_prompt, key_feature=d.key_feature))
    unique_names(sources)
    for source in sources:
        set_index_dir(source, d.index_dir)
    pipe = _stage_pipeline(stage, sources, pc, shard_count,
                           "(Or encode offline into a latent cache: python -m lumina_jax preprocess.)")  # fmt: skip
    inner = iter(pipe)
    enc = FrozenEncoders(d.vae, d.text_encoder, d.tokenizer, d.max_text_len, dtype=d.encoder_dtype,
                         fixed_text_len=shard_count > 1)  # fmt: skip
    return EncodedIterator(inner, enc), inner


DATA_COUNTERS = ("samples", "skipped", "padded_rows", "captions_dropped", "captions_truncated")


def local_data_counts(it: Any) -> Optional[np.ndarray]:
    """This process's :data:`DATA_COUNTERS` of a stage iterator (its :class:`lumina_jax.data.stats.DataStats`,
    counted since the stage's data started and restored with the data state), or ``None`` for
    synthetic data. Cheap: taken after each step, so a logged row counts exactly the batches up to it."""
    stats = getattr(it, "stats", None)
    if stats is None:
        return None
    return np.array([stats.samples, stats.total_skipped(), stats.padded_rows, stats.captions_dropped,
                     stats.captions_truncated], np.int64)  # fmt: skip


def data_counters(counts: Optional[np.ndarray], shard_index: int = 0) -> dict[str, int]:
    """``{"data/<name>": n}`` of :func:`local_data_counts` summed over the data shards (``{}`` for ``None``).
    Processes that feed the same rows (``shard_index`` of :func:`process_rows`: a ``tensor`` or
    ``context`` axis spanning hosts) read the same samples, so each shard is counted once. With several
    processes this is a collective: every process calls it at the same step."""
    if counts is None:
        return {}
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        rows = np.asarray(multihost_utils.process_allgather(np.concatenate([[shard_index], counts]).astype(np.int64)))
        rows = rows.reshape(-1, len(DATA_COUNTERS) + 1)
        _, first = np.unique(rows[:, 0], return_index=True)  # one process per shard
        counts = rows[first, 1:].sum(0)
    return {f"data/{k}": int(v) for k, v in zip(DATA_COUNTERS, counts)}


def _stage_pipeline(stage: StageConfig, sources: list, pc: Any, shard_count: int, alternative: str) -> Any:
    """The stage's ``DataPipeline``; a missing size index on several hosts is an error naming the fix.
    With the global plan on several processes, a process that cannot build its pipeline still joins the
    start-up digest exchange (:func:`_check_same_plan_everywhere`), so every process fails instead of
    the others waiting for it in the collective."""
    from lumina_jax.data import DataPipeline
    from lumina_jax.data.pipeline import MissingSizeIndexError

    try:
        pipe = DataPipeline(sources, pc, weights=stage.data.weights)
    except Exception as e:
        if pc.batching == "bucket" and pc.bucket_plan == "global":
            _exchange_plan_digests(None)
        if not isinstance(e, MissingSizeIndexError) or stage.data.bucket_plan == "global":
            raise
        raise ValueError(f"stage {stage.name!r}: {shard_count} hosts read different data, so bucket batches need the "
                         f"global bucket plan, which reads each record's size from its size index: {e}. "
                         f"{alternative}") from e  # fmt: skip
    if pipe.bucket_plan == "global":
        _check_same_plan_everywhere(stage, pipe)
    return pipe


def _exchange_plan_digests(digest: Any) -> np.ndarray:
    """Every process's plan digest (:func:`lumina_jax.data.global_plan.plan_digest`; zeros from a process
    that could not build its pipeline, ``digest`` ``None``), one row per process; one collective."""
    mine = np.zeros(8, np.uint32) if digest is None else np.asarray(digest, np.uint32)
    if jax.process_count() == 1:
        return mine[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(mine))


def _check_same_plan_everywhere(stage: StageConfig, pipe: Any) -> None:
    """With the global plan on several processes: ``ValueError`` on every process unless all read the same
    size indexes (sampled digest, :func:`lumina_jax.data.global_plan.plan_digest`); hosts with their own,
    different copies of the data would otherwise plan different batches and hang in a collective."""
    if jax.process_count() == 1:
        return
    from lumina_jax.data.global_plan import plan_digest

    digests = _exchange_plan_digests(plan_digest(pipe.sources))
    failed = [i for i in range(len(digests)) if not digests[i].any()]
    if failed:
        raise ValueError(f"stage {stage.name!r}: processes {failed} could not build their data pipeline (their logs "
                         f"say why, e.g. a size index missing where they looked)")  # fmt: skip
    differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
    if differ:
        raise ValueError(f"stage {stage.name!r}: processes {differ} read other size indexes than process 0 "
                         f"(sources {[s.name for s in pipe.sources]}): every host must see the same data and "
                         f"index (one shared copy, or identical copies built from the same files)")  # fmt: skip


def check_same_shapes_on_every_host(stage: StageConfig, shard_count: int) -> None:
    """Raise ``ValueError`` when ``shard_count`` > 1 data shards (hosts feeding different rows) would
    build batches of different shapes.

    One SPMD step needs the same global shapes on every host. Bucket batches get them from the global
    bucket plan (:mod:`lumina_jax.data.global_plan`, chosen by :func:`build_stage_iterator`; latent caches
    and raw images with a size index), unless ``bucket_plan: host`` asks for per-host buckets; mixed
    batches need a fixed ``text_len`` (captions would be padded to each host's longest); raw images are
    encoded on the fly with captions padded to ``max_text_len``. Without this check the hosts would trace
    different programs and hang or fail inside a collective.
    """
    d = stage.data
    if shard_count <= 1 or d.kind == "synthetic":
        return
    if d.batching == "bucket" and d.bucket_plan == "host":
        raise ValueError(f"stage {stage.name!r}: {shard_count} hosts read different data, and `bucket_plan: host` "
                         f"picks each host's image size from its own samples; use `bucket_plan: auto` (the global "
                         f"plan) or `batching: mixed` with a fixed `text_len`")  # fmt: skip
    if d.batching == "mixed" and d.text_len is None:
        raise ValueError(f"stage {stage.name!r}: {shard_count} hosts read different data, and without `text_len` "
                         f"captions are padded to each host's longest; mixed batches on several hosts need a fixed "
                         f"`text_len` (e.g. text_len: 256)")  # fmt: skip


def image_sources(path: str, *, system_prompt: str = "real", key_feature: Optional[str] = None) -> list:
    """The image source one ``paths`` entry names (one, so that mixture ``weights`` are per entry): a
    prepared TFDS folder (has ``dataset_info.json``), a folder of ``images-NNNNN.array_record`` shards
    (as ``preprocess --data`` reads), an original-style YAML list (its files concatenated, each after its
    ``ratio``, as the original does; they were mixed 1:1 whatever their sizes), or a JSONL file."""
    import os

    from lumina_jax.data import ConcatSource, JsonlSource, load_yaml_sources
    from lumina_jax.data import records as rec_lib
    from lumina_jax.data.sources import IMAGE_SHARD_PREFIX, ArrayRecordImageSource, TfdsSource

    if os.path.isdir(path):
        if rec_lib.list_shards(path, IMAGE_SHARD_PREFIX):
            return [ArrayRecordImageSource(path, system_prompt=system_prompt)]
        if not os.path.exists(os.path.join(path, "dataset_info.json")):
            raise FileNotFoundError(f"{path} is a folder but neither a prepared TFDS dataset (no dataset_info.json) "
                                    f"nor a folder of {IMAGE_SHARD_PREFIX}-NNNNN{rec_lib.SHARD_SUFFIX} shards")  # fmt: skip
        return [TfdsSource(builder_dir=path, system_prompt=system_prompt, key_key=key_feature)]
    if not os.path.exists(path):
        raise FileNotFoundError(f"image source {path} does not exist")
    if str(path).lower().endswith(rec_lib.SHARD_SUFFIX.lower()):
        raise ValueError(f"{path}: one ArrayRecord shard; give the folder that holds the "
                         f"{IMAGE_SHARD_PREFIX}-NNNNN{rec_lib.SHARD_SUFFIX} shards")  # fmt: skip
    if str(path).lower().endswith((".yaml", ".yml")):
        parts = load_yaml_sources(path)
        return [parts[0] if len(parts) == 1 else ConcatSource(parts, name=os.path.splitext(os.path.basename(path))[0])]
    return [JsonlSource(path)]


def to_global(local: dict, mesh: jax.sharding.Mesh, global_size: int) -> dict:
    """Process-local batch -> global jax arrays (numeric entries only; fp32 latents/features cast to
    the dtype they arrived in, bool masks kept)."""
    return global_batch(local, mesh, global_size)
