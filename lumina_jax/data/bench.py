"""Input-pipeline throughput: ``bench_data(kind, res, workers, n)`` -> images per second.

``kind="raw"``: JPEGs of random aspect ratio (about ``res**2`` to ``1.6 * res**2`` pixels) read from
disk, decoded, cropped and normalised by :class:`lumina_jax.data.pipeline.DataPipeline`.
``kind="cache"``: latent-cache records (bf16 latents of the stage's crop sizes and 128x2304 bf16 text
features, like Gemma-2-2B's) read and batched. The data is generated in a temporary folder (not
timed). The first batch (worker start-up, first reads) is not timed either; then batches are pulled
until ``n`` valid samples have been delivered.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from lumina_jax.data.crops import best_crop_size

logger = logging.getLogger("lumina_jax.data")

_TEXT_LEN, _TEXT_DIM = 128, 2304


def _make_cache(folder: Path, n: int, res: int, seed: int) -> Path:
    from lumina_jax.data import cache, crops

    rng = np.random.default_rng(seed)
    sizes = crops.crop_sizes_for_resolution(res)
    # A few common aspect ratios, like real data (square, 4:3, 3:4, 16:9-ish).
    picks = [crops.best_crop_size(w, h, sizes) for w, h in [(1, 1), (4, 3), (3, 4), (16, 9)]]

    class Records:
        def __len__(self):
            return n

        def __getitem__(self, i):
            if not 0 <= i < n:
                raise IndexError(i)
            w, h = picks[i % len(picks)]
            return {
                "latent": rng.standard_normal((h // 8, w // 8, 16), np.float32),
                "cap_feats": rng.standard_normal((_TEXT_LEN, _TEXT_DIM), np.float32),
                "cap_mask": np.arange(_TEXT_LEN) < 100,
                "prompt": f"benchmark record {i}",
            }

    empty = (rng.standard_normal((8, _TEXT_DIM), np.float32), np.ones(8, bool))
    out = folder / "cache"
    cache.write_latent_cache(Records(), out, shard_size=256, empty_prompt_features=empty)
    return out


REPEAT_RECORDS = 10_000  # records the raw benchmark source lists (its few images, repeated)


def bench_data(
    kind: str = "raw",
    res: int = 256,
    workers: int = 0,
    n: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    read_threads: int = 2,
    tmp_dir: Optional[str] = None,
    bucket_plan: str = "auto",
    info: Optional[dict] = None,
) -> float:
    """Images (valid samples) per second delivered by the pipeline on this machine.

    Args:
      kind: ``"raw"`` (decode JPEGs) or ``"cache"`` (read latent records).
      res: stage resolution (256 or 1024 in the paper's stages; any multiple of 16 works).
      workers: grain worker processes (0 = in-process).
      n: timed samples; ``min(n, 64)`` distinct items are generated and repeated.
      bucket_plan: ``PipelineConfig.bucket_plan`` (the cache is indexed, so ``auto`` = ``global``; raw
        images are indexed first for ``global``: :mod:`lumina_jax.data.image_index`).
      info: if given, gets ``index_images_per_s`` (raw images with the global plan: header reads/s).
    """
    from lumina_jax.data import cache, pipeline, sources

    if kind not in ("raw", "cache"):
        raise ValueError(f"kind must be 'raw' or 'cache', got {kind!r}")
    n_items = max(batch_size, min(n, 64))
    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        tmp = Path(tmp)
        if kind == "raw":
            from lumina_jax.data import testing

            # The file's few images listed ~10k times (JSONL ``ratio``): shuffling a tiny source costs
            # grain's index_shuffle ~0.4 ms per record (n = 64; ~3 us from n = 1e5), which real datasets
            # never pay and which would dominate the plan here.
            source = sources.JsonlSource(testing.write_bench_images(tmp / "raw", n_items, res, seed),
                                         ratio=REPEAT_RECORDS / n_items)  # fmt: skip
            if bucket_plan == "global":
                from lumina_jax.data.image_index import index_image_source

                start = time.perf_counter()
                index_image_source(source, threads=read_threads, progress=False)
                if info is not None:  # the file's rows (its images), not the repeated records
                    info["index_images_per_s"] = source.size_index_spec()[1] / (time.perf_counter() - start)
        else:
            source = cache.LatentCacheSource(_make_cache(tmp, n_items, res, seed))
        config = pipeline.PipelineConfig(
            resolution=res,
            batch_size=batch_size,
            seed=seed,
            num_workers=workers,
            read_threads=read_threads,
            shard_index=0,
            shard_count=1,
            bucket_plan=bucket_plan,
        )
        it = iter(pipeline.DataPipeline(source, config))
        try:
            next(it)  # start-up
            start = time.perf_counter()
            delivered = it.stats.samples
            while it.stats.samples - delivered < n:
                next(it)
            elapsed = time.perf_counter() - start
            count = it.stats.samples - delivered
        finally:
            it.close()
    rate = count / elapsed
    logger.info(
        "bench_data kind=%s res=%d workers=%d batch=%d plan=%s: %d samples in %.2fs = %.1f images/s",
        kind, res, workers, batch_size, bucket_plan, count, elapsed, rate,
    )
    return rate


# (width / height, share): a photo-like mix of aspect ratios for :func:`bench_plan`.
PLAN_ASPECTS = ((1.0, 0.30), (4 / 3, 0.15), (3 / 4, 0.15), (3 / 2, 0.10), (2 / 3, 0.10), (16 / 9, 0.08),
                (9 / 16, 0.04), (2.0, 0.03), (0.5, 0.02), (5 / 4, 0.02), (4 / 5, 0.01))  # fmt: skip


def best_hw(ratio: float, crop_list) -> tuple[int, int]:
    """``(H, W)`` of the best crop size for an image of aspect ``ratio`` = width / height."""
    w, h = best_crop_size(round(1000 * ratio), 1000, crop_list)
    return h, w


class _IndexOnlySource:
    """A source that has only a size index (records are never read): for :func:`bench_plan`."""

    empty_prompt = None

    def __init__(self, index_path: Path, name: str, kind: str = "latent"):
        self.index_path, self.name, self.cache_dir = index_path, name, str(index_path.parent)
        self.kind = kind
        self._sizes: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.record_sizes())

    def record_sizes(self) -> np.ndarray:
        if self._sizes is None:
            self._sizes = np.load(self.index_path, mmap_mode="r")
        return self._sizes

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _sizes=None)


def bench_plan(records: int = 10_000_000, global_batch: int = 1024, batches: int = 50, res: int = 1024,
               seed: int = 0, tmp_dir: Optional[str] = None, kind: str = "cache") -> dict:  # fmt: skip
    """Cost of the global bucket plan alone (:mod:`lumina_jax.data.global_plan`) over a memory-mapped size
    index of ``records`` rows: seconds to the first global batch, milliseconds per later batch, the share
    of real (non-padding) rows, and the restore (replay) time of a state saved after them.

    ``kind="cache"``: a latent cache's index; crop sizes follow a photo-like mix of aspect ratios
    (:data:`PLAN_ASPECTS`, each mapped to its best crop size at ``res``), caption lengths are uniform in
    [20, 256]. ``kind="raw"``: a raw-image index (:mod:`lumina_jax.data.image_index`) of original image
    sizes with the same aspect mix, scaled by 1-2x and each side jittered by up to 1 % (many distinct
    sizes), so the plan also fits every image to the crop list.
    """
    import json

    from lumina_jax.data import crops, pipeline

    crop_list = crops.crop_sizes_for_resolution(res)
    ratios = np.asarray([r for r, _ in PLAN_ASPECTS], np.float64)
    weights = np.asarray([w for _, w in PLAN_ASPECTS], np.float64)
    sizes = np.asarray([best_hw(r, crop_list) for r in ratios], np.int32)
    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        path = Path(tmp) / "record_sizes.npy"
        index = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(records, 3))
        rng = np.random.default_rng(seed)
        for lo in range(0, records, 10_000_000):
            hi = min(records, lo + 10_000_000)
            pick = sizes[rng.choice(len(sizes), size=hi - lo, p=weights / weights.sum())]
            if kind == "raw":  # original images: 1-2x the crop, each side jittered by up to 1 %
                scale = rng.uniform(1.0, 2.0, size=(hi - lo, 1)) * rng.uniform(0.99, 1.01, size=(hi - lo, 2))
                index[lo:hi, :2] = np.round(pick * scale).astype(np.int32)
                index[lo:hi, 2] = 0
            else:
                index[lo:hi, :2] = pick
                index[lo:hi, 2] = rng.integers(20, 257, size=hi - lo)
        index.flush()
        del index
        config = pipeline.PipelineConfig(resolution=res, batch_size=global_batch, shard_index=0, shard_count=1,
                                         seed=seed, caption_dropout=0.0, probe_samples=0, bucket_plan="global")  # fmt: skip
        source = _IndexOnlySource(path, "index", kind="image" if kind == "raw" else "latent")
        pipe = pipeline.DataPipeline(source, config)
        it = iter(pipe.plan_dataset)
        start = time.perf_counter()
        next(it)
        first = time.perf_counter() - start
        start = time.perf_counter()
        real = 0
        for _ in range(batches):
            real += len(next(it)["plan_refs"])
        per_batch = (time.perf_counter() - start) / batches
        state = json.loads(json.dumps(it.get_state()))
        again = iter(pipe.plan_dataset)
        start = time.perf_counter()
        again.set_state(state)
        restore = time.perf_counter() - start
    out = dict(kind=kind, records=records, global_batch=global_batch, res=res, first_batch_s=first,
               ms_per_batch=per_batch * 1e3,
               real_rows=real / (batches * global_batch), restore_s=restore)  # fmt: skip
    logger.info("bench_plan %s", out)
    return out

