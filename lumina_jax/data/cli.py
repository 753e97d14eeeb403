"""``python -m lumina_jax preprocess``: encode a captioned-image dataset into a latent cache.

Encode (each process of a multi-host job runs the same command)::

    python -m lumina_jax preprocess --data data.jsonl --vae ckpt/vae --text-encoder ckpt/text_encoder \\
        --tokenizer ckpt/tokenizer --out cache_256 --resolution 256 [--batch 32] [--shard-size 1000] \\
        [--max-length 256] [--dtype bf16] [--process-index i --process-count n] [--max-shards K]

Merge the per-process directories of a multi-host run into one cache (after all processes finished)::

    python -m lumina_jax preprocess --merge --out cache_256

Build the size index (``record_sizes.npy``: crop size and caption length of every record) of a cache
written before it existed; preprocessing and ``--merge`` write it themselves::

    python -m lumina_jax preprocess --index --out cache_256

Build the image size index of raw-image data (each image's size from its header, next to the data or in
``--index-dir``: see :mod:`lumina_jax.data.image_index`), so that several hosts can train on it with bucket
batches (the global bucket plan); ``--data`` as in the training config's ``data.paths``, ``--index-dir`` as
its ``data.index_dir`` (for data that cannot be written to)::

    python -m lumina_jax preprocess --index --data data.jsonl [--data meta.yaml ...] [--read-threads 16] \
        [--index-dir DIR]

``--data`` (repeatable; concatenated): an original-format ``.jsonl`` or ``.json``, a ``META`` ``.yaml``, a directory of
``images-NNNNN.array_record`` shards, a prepared TFDS directory or ``tfds:NAME``. Rerunning an interrupted
command resumes it (complete shards are skipped). Train on the result with ``data.kind: latent_cache``,
``data.paths: [cache_256]``; caption dropout is applied then, from the stored empty-prompt features.
See :mod:`lumina_jax.data.preprocess` for the details.

Exit status: 0 done (the summary lists samples written and skipped records by reason), 2 bad arguments or
data (the message names the option or path), 3 stopped by ``--max-shards`` before the end (rerun to
continue).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lumina_jax preprocess",
        description="Encode images (FLUX VAE) and prompts (Gemma-2) once into ArrayRecord shards of bf16 "
        "latents + caption features, for training without the encoders. Rerun an interrupted command to "
        "resume it.",
        epilog="example: python -m lumina_jax preprocess --data data.jsonl --vae ckpt/vae --text-encoder "
        "ckpt/text_encoder --tokenizer ckpt/tokenizer --out cache_256 --resolution 256 --batch 32",
    )
    p.add_argument("--data", action="append", default=[], metavar="SOURCE",
                   help="a .jsonl or .json (original format), a META .yaml, a directory of images-*.array_record "
                        "shards, a prepared TFDS directory or tfds:NAME; repeat to concatenate")  # fmt: skip
    p.add_argument("--vae", metavar="PATH", help="the FLUX VAE (16 latent channels, 8x: the cache's layout): a "
                   "diffusers AutoencoderKL directory, or a pipeline dir with vae/")  # fmt: skip
    p.add_argument("--text-encoder", metavar="PATH", help="transformers Gemma-2 directory, the project's "
                   "text_encoder/ folder, or a pipeline dir (e.g. the bundled lumina_jax/assets/default_model)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer directory (default: tokenizer/ next to --text-encoder, else --text-encoder)")
    p.add_argument("--out", metavar="DIR", help="cache directory (created; rerun to resume); required except "
                   "for --index --data")
    p.add_argument("--resolution", type=int, default=1024, metavar="PX",
                   help="stage resolution in px: 256 or 1024 (any multiple of 16 works; default 1024)")
    p.add_argument("--batch", type=int, default=16, metavar="N",
                   help="images per encoder call, a multiple of the local devices (default 16)")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="records per shard (default 1000)")
    p.add_argument("--max-length", type=int, default=256, metavar="N",
                   help="Gemma-2 token limit; longer prompts are truncated and counted (default 256)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="encoder compute dtype (default bf16; stored values are bf16 either way)")
    p.add_argument("--process-index", type=int, metavar="I", help="this process (default: jax.process_index())")
    p.add_argument("--process-count", type=int, metavar="N",
                   help="number of processes (default: jax.process_count())")
    p.add_argument("--system-prompt", default="real", metavar="NAME_OR_TEXT",
                   help="system prompt of ArrayRecord/TFDS records without their own (default real: the training "
                        "config's data.system_prompt default and the sampling default; JSONL/YAML lines carry "
                        "the original's own, base or align, unless a line has a system_prompt key)")
    p.add_argument("--tfds-split", default="train", metavar="SPLIT", help="TFDS split (default train)")
    p.add_argument("--tfds-data-dir", metavar="DIR", help="TFDS data directory")
    p.add_argument("--image-key", default="image", metavar="KEY", help="TFDS image feature (default image)")
    p.add_argument("--caption-key", default="caption", metavar="KEY", help="TFDS caption feature (default caption)")
    p.add_argument("--bucket-window", type=int, metavar="N",
                   help="max samples a sample waits for its crop-size bucket before it is encoded in a padded "
                        "batch (default 16 x batch)")  # fmt: skip
    p.add_argument("--num-workers", type=int, default=0, metavar="N",
                   help="grain worker processes for decoding (default 0)")
    p.add_argument("--read-threads", type=int, default=4, metavar="N", help="decode threads (default 4)")
    p.add_argument("--max-consecutive-skips", type=int, default=1000, metavar="N",
                   help="stop with an error after N unusable records in a row (missing/corrupt images, bad "
                        "records; default 1000); may be raised when resuming")  # fmt: skip
    p.add_argument("--max-shards", type=int, metavar="K",
                   help="stop after writing K new shards (exit status 3; rerun to continue)")
    p.add_argument("--merge", action="store_true",
                   help="merge the process-*-of-* directories in --out into one cache, then exit")
    p.add_argument("--index", action="store_true",
                   help="build the size index (record_sizes.npy) of the cache in --out, then exit (with "
                        "--merge: after merging); reads the records of shards without a size sidecar, "
                        "--read-threads shards at a time. With --data (and no --out): write the image size "
                        "index of each raw-image source (image headers, --read-threads at a time)")  # fmt: skip
    p.add_argument("--index-dir", metavar="DIR",
                   help="with --index --data: write the image size indexes into DIR (created) instead of next to "
                        "the data, e.g. for read-only data; train with data.index_dir: DIR")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging; errors with tracebacks")
    return p


def _process_slice(args: argparse.Namespace) -> tuple[Optional[int], Optional[int]]:
    if (args.process_index is None) != (args.process_count is None):
        raise ValueError("give both --process-index and --process-count, or neither")
    if args.process_index is None:
        try:  # multi-host jobs: start jax.distributed from the environment (TPU pod, SLURM, LUMINA_*)
            from lumina_jax.parallel import distributed
        except ImportError:
            distributed = None
        if distributed is not None:
            try:
                distributed.initialize()
            except ValueError as e:  # a coordinator without a port, Open MPI 5, ...
                raise SystemExit(f"preprocess: error: {e}") from None
    return args.process_index, args.process_count


def _index_summary(path: Path) -> str:
    """One line about a written ``record_sizes.npy``: records, distinct crop sizes, caption lengths."""
    import numpy as np

    sizes = np.load(path)
    good = sizes[sizes[:, 0] > 0]
    line = f"size index {path}: {len(sizes)} records, {len(np.unique(good[:, :2], axis=0))} distinct crop sizes"
    if len(good):
        line += f", caption lengths {int(good[:, 2].min())}-{int(good[:, 2].max())}"
    if len(good) < len(sizes):
        line += f", {len(sizes) - len(good)} unreadable records (size [0, 0, 0])"
    return line


def _index_images(args: argparse.Namespace) -> int:
    """``--index --data ...``: the image size index of every source the ``--data`` values name."""
    from lumina_jax.data import image_index
    from lumina_jax.data import preprocess as pp

    sources = [pp.open_source(spec, system_prompt=args.system_prompt, tfds_split=args.tfds_split,
                              tfds_data_dir=args.tfds_data_dir, image_key=args.image_key,
                              caption_key=args.caption_key) for spec in args.data]  # fmt: skip
    if args.index_dir is not None:  # created once every --data value opened
        image_index.check_index_dir(args.index_dir)  # a URL would become a local folder named "gs:"
        Path(args.index_dir).mkdir(parents=True, exist_ok=True)
    for source in sources:
        image_index.set_index_dir(source, args.index_dir)
        for path in image_index.index_image_source(source, threads=args.read_threads, progress=not args.no_progress):
            print(image_index.summary(path))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from lumina_jax import log_setup

    log_setup.setup(logging.DEBUG if args.verbose else logging.INFO, "%(levelname)s %(name)s: %(message)s")
    from lumina_jax.data import preprocess as pp
    from lumina_jax.data.pipeline import NoUsableSampleError

    try:
        if args.index and args.data:
            if args.out:
                raise pp.PreprocessError("--index takes --data (index raw images) or --out (index a latent cache), "
                                         "not both")  # fmt: skip
            return _index_images(args)
        if args.index_dir is not None:
            raise pp.PreprocessError("--index-dir goes with --index --data (the image size index of raw images)")
        if not args.out:
            raise pp.PreprocessError("--out is required (except for --index --data)")
        if args.merge:
            m = pp.merge_parts(args.out, progress=not args.no_progress)
            skipped = sum(n for r in m.skipped.values() for n in r.values())
            print(f"merged {m.parts} process directories into {m.out_dir}: {m.num_records} records in "
                  f"{m.num_shards} shards ({skipped} records were skipped while encoding)")  # fmt: skip
        if args.index:
            from lumina_jax.data.cache import index_latent_cache

            path = index_latent_cache(args.out, threads=args.read_threads, progress=not args.no_progress)
            print(_index_summary(path))
        if args.merge or args.index:
            return 0
        if not args.data:
            raise pp.PreprocessError("--data is required (or --merge / --index)")
        models = pp.EncoderSpec(args.vae, args.text_encoder, args.tokenizer, dtype=args.dtype)  # checks paths
        index, count = _process_slice(args)
        config = pp.PreprocessConfig(
            out_dir=args.out, resolution=args.resolution, batch_size=args.batch, shard_size=args.shard_size,
            max_length=args.max_length, bucket_window=args.bucket_window, process_index=index,
            process_count=count, num_workers=args.num_workers, read_threads=args.read_threads,
            max_shards=args.max_shards, max_consecutive_skips=args.max_consecutive_skips,
            progress=not args.no_progress,
        )  # fmt: skip
        # Validate the resolution (crop list) before loading any model.
        from lumina_jax.data.crops import crop_sizes_for_resolution

        crop_sizes_for_resolution(config.resolution, max_ratio=config.max_ratio)
        source = pp.open_sources(
            args.data, system_prompt=args.system_prompt, tfds_split=args.tfds_split,
            tfds_data_dir=args.tfds_data_dir, image_key=args.image_key, caption_key=args.caption_key,
        )  # fmt: skip
        result = pp.preprocess(source, models, config)  # loads the models only if there is work left
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError, FloatingPointError,
            pp.PreprocessError, NoUsableSampleError) as e:  # fmt: skip
        if args.verbose:
            raise
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    print(pp.format_summary(result))
    return 0 if result.complete else 3


if __name__ == "__main__":
    sys.exit(main())
