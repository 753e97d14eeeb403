"""Training data: sources, transforms, batching, latent cache (grain, TPU-first; spec §6.5).

Quick start::

    from lumina_jax.data import DataPipeline, PipelineConfig, JsonlSource

    pipe = DataPipeline([JsonlSource("a.jsonl"), JsonlSource("b.jsonl")], PipelineConfig(
        resolution=1024, batch_size=16, num_workers=8), weights=[3, 1])
    it = iter(pipe)
    batch = next(it)        # images (B, H, W, 3) in [-1, 1], prompts, image_sizes, valid, ...
    it.stats                # skipped records per source and reason, samples, padding
    state = it.get_state()  # JSON; it.set_state(state) resumes exactly

Modules: :mod:`.sources` (JSONL/YAML, ArrayRecord, TFDS, in-memory), :mod:`.tfds_folder` (TFDS builder
for captioned image folders), :mod:`.crops` (crop-size list, best-fit crop), :mod:`.transforms`,
:mod:`.batching`, :mod:`.pipeline`, :mod:`.global_plan` (crop-size buckets every host agrees on),
:mod:`.image_index` (raw images' sizes from their headers, for that plan),
:mod:`.cache` (latent cache and its size index), :mod:`.checkpoint` (orbax),
:mod:`.records` (record format), :mod:`.bench`, :mod:`.testing` (synthetic data).
"""

from lumina_jax.data.batching import patchify, unpatchify
from lumina_jax.data.cache import LatentCacheSource, make_latent_record, write_latent_cache
from lumina_jax.data.checkpoint import restore_with_data, save_with_data
from lumina_jax.data.crops import best_crop_size, crop_sizes_for_resolution, generate_crop_size_list
from lumina_jax.data.pipeline import (
    DataIterator,
    DataPipeline,
    NoUsableSampleError,
    PipelineConfig,
)
from lumina_jax.data.sources import (
    ArrayRecordImageSource,
    ConcatSource,
    JsonlSource,
    ListSource,
    TfdsSource,
    load_yaml_sources,
    write_image_records,
)
from lumina_jax.data.stats import DataStats


__all__ = [
    "ArrayRecordImageSource",
    "ConcatSource",
    "DataIterator",
    "DataPipeline",
    "DataStats",
    "JsonlSource",
    "LatentCacheSource",
    "ListSource",
    "NoUsableSampleError",
    "PipelineConfig",
    "TfdsSource",
    "best_crop_size",
    "crop_sizes_for_resolution",
    "generate_crop_size_list",
    "load_yaml_sources",
    "make_latent_record",
    "patchify",
    "restore_with_data",
    "save_with_data",
    "unpatchify",
    "write_image_records",
    "write_latent_cache",
]
