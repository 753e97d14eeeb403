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
) -> float:
    """Images (valid samples) per second delivered by the pipeline on this machine.

    Args:
      kind: ``"raw"`` (decode JPEGs) or ``"cache"`` (read latent records).
      res: stage resolution (256 or 1024 in the paper's stages; any multiple of 16 works).
      workers: grain worker processes (0 = in-process).
      n: timed samples; ``min(n, 64)`` distinct items are generated and repeated.
      bucket_plan: ``PipelineConfig.bucket_plan`` (the cache is indexed, so ``auto`` = ``global``).
    """
    from lumina_jax.data import cache, pipeline, sources

    if kind not in ("raw", "cache"):
        raise ValueError(f"kind must be 'raw' or 'cache', got {kind!r}")
    n_items = max(batch_size, min(n, 64))
    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        tmp = Path(tmp)
        if kind == "raw":
            from lumina_jax.data import testing

            source = sources.JsonlSource(testing.write_bench_images(tmp / "raw", n_items, res, seed))
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
