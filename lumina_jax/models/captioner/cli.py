"""``python -m lumina_jax caption``: re-caption a folder or JSONL list of images with a Qwen2(.5)-VL model.

    python -m lumina_jax caption --model /ckpt/Qwen2-VL-7B-Instruct --images /data/imgs \\
        --granularity detailed --lang en --out /data/captions.jsonl --dtype bf16 --batch-size 16

Output: one JSON object per line in the data pipeline's format (``lumina_jax.data.sources.JsonlSource``):
``{"image_path": <path relative to the JSONL's folder>, "prompt": <caption>, ...}`` plus bookkeeping keys
(``granularity``, ``perspective``, ``lang``, ``instruction`` when one was given, ``num_tokens``,
``truncated``) that the pipeline ignores. An image listed twice is captioned once.

- Resumable: images already captioned with the same settings (granularity, perspective, language, or the
  same ``--instruction``) in the output (or in any ``<stem>.NNNNN-of-NNNNN.jsonl`` part next to it) are
  skipped, so one file can collect several kinds of caption per image (records written before
  ``instruction`` was recorded count as template captions); a line cut short by a crash is dropped before appending (a complete last record that
  only lost its newline is kept). File names that are not valid UTF-8 are written with ``\\udcXX`` escapes
  (Python's surrogateescape form), which JSON readers and the next run map back to the same file.
- Multi-host: the image list (sorted folder walk, or JSONL order) is split round-robin by
  ``jax.process_index() / jax.process_count()``; the distributed runtime is started from the environment
  (``launch/local.py``'s ``LUMINA_*`` variables, SLURM, a TPU pod; see :mod:`lumina_jax.parallel.distributed`).
  ``--process-index/--process-count`` (both together) override that and start nothing. With more than one
  process each writes ``<stem>.<index>-of-<count>.jsonl``. Each process only uses its own devices (batch
  split over them, params replicated): no cross-host traffic; at the end the processes of a distributed
  run wait for each other (so an early finisher does not hit JAX's shutdown-barrier timeout).
- Unreadable/corrupt images are skipped, counted (``corrupt``) and listed on stderr; so are listed files
  that do not exist (``missing``) and images the Qwen2-VL processor does not take (aspect ratio > 200,
  ``unsupported``). Setup errors (tokenizer and
  model disagree on ``<|image_pad|>``, an instruction containing it, bad options) stop the run before
  any image is processed.
- Shapes are bucketed (vision slots, prompt length), so a run compiles a handful of programs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from lumina_jax.config_utils import int_at_least
from lumina_jax.models.captioner.prompts import GRANULARITIES, LANGUAGES, PERSPECTIVES, instruction

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 28 * 28 * 1280  # Qwen2-VL's processor default: at most 1280 image tokens
DEFAULT_MAX_NEW_TOKENS = {"detailed": 512, "medium": 256, "short": 96, "tag": 128}
# how long the processes of a distributed run wait for the slowest one at the end (JAX's own shutdown
# barrier gives up after 5 minutes and aborts every process)
DONE_BARRIER_TIMEOUT_S = 7 * 24 * 3600


def _float_in(lowest: float, highest: float, *, open_low: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a float in ``[lowest, highest]`` (``(lowest, highest]`` with ``open_low``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > lowest if open_low else value >= lowest) or not value <= highest:
            low = "(" if open_low else "["
            raise argparse.ArgumentTypeError(f"must be in {low}{lowest}, {highest}], got {value}")
        return value

    parse.__name__ = "number"
    return parse


def _slot_buckets(text: str) -> list[int]:
    """An argparse ``type``: comma-separated positive integers, returned sorted."""
    try:
        values = sorted(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if values[0] < 1:
        raise argparse.ArgumentTypeError(f"buckets must be >= 1, got {values[0]}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lumina_jax caption", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="transformers Qwen2-VL / Qwen2.5-VL directory (config.json, "
                   "safetensors, tokenizer.json, preprocessor_config.json)")
    p.add_argument("--images", required=True, help="a folder (walked recursively, following links), a JSONL with "
                   "image_path/path, or one image file")
    p.add_argument("--out", required=True, help="output JSONL (appended to; resumable)")
    p.add_argument("--granularity", choices=GRANULARITIES, default="detailed")
    p.add_argument("--perspective", choices=PERSPECTIVES, default="general")
    p.add_argument("--lang", choices=LANGUAGES, default="en")
    p.add_argument("--instruction", default=None, help="custom instruction text (overrides the templates)")
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt ('' for none)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=None,
                   help="default depends on --granularity: " + ", ".join(f"{k} {v}"
                                                                          for k, v in DEFAULT_MAX_NEW_TOKENS.items()))
    p.add_argument("--temperature", type=_float_in(0.0, float("inf")), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, open_low=True), default=1.0)
    p.add_argument("--top-k", type=int_at_least(0), default=0, help="0 = off")
    p.add_argument("--repetition-penalty", type=_float_in(0.0, float("inf"), open_low=True), default=None,
                   help="transformers' repetition penalty (applies to greedy decoding too); default: the "
                        "model's generation_config.json, else 1 (off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="compute dtype (and KV cache)")
    p.add_argument("--param-dtype", choices=("fp32", "bf16"), default=None, help="default: same as --dtype")
    p.add_argument("--min-pixels", type=int_at_least(1), default=None, help="override preprocessor_config.json")
    p.add_argument("--max-pixels", type=int_at_least(1), default=None,
                   help="override preprocessor_config.json (default: its value, capped at 28*28*1280)")
    p.add_argument("--max-image-pixels", type=int_at_least(1), default=None,
                   help="PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, default ~89.5M): files over twice "
                        "it are skipped as unsupported; images are resized to --max-pixels anyway")
    p.add_argument("--slot-buckets", type=_slot_buckets, default=None,
                   help="comma-separated vision slot buckets (patches); default: from 256 growing 1.5x up to what an image at --max-pixels takes")
    p.add_argument("--prompt-multiple", type=int_at_least(1), default=64,
                   help="prompt lengths round up to this multiple")
    p.add_argument("--attention-backend", default="auto", help="vision tower attention backend")
    p.add_argument("--decode-attention-backend", default="xla", help="LM decode-step attention backend")
    p.add_argument("--tensor-parallel", type=int_at_least(1), default=1,
                   help="split the model's heads, MLP and vocabulary over this many of the local devices (for a "
                   "7B that does not fit one chip); the rest of the devices split the batch (default 1)")
    p.add_argument("--workers", type=int, default=4, help="threads decoding/resizing images")
    p.add_argument("--limit", type=int_at_least(0), default=None,
                   help="process at most this many not-yet-captioned images")
    p.add_argument("--process-index", type=int_at_least(0), default=None,
                   help="with --process-count: this process's share; default: jax.process_index() of the "
                        "distributed runtime started from the environment")
    p.add_argument("--process-count", type=int_at_least(1), default=None,
                   help="with --process-index; default: jax.process_count()")
    p.add_argument("--no-progress", action="store_true")
    return p


# ----------------------------------------------------------------------------------------------
# inputs / outputs


def list_images(spec: str | os.PathLike) -> list[Path]:
    """Absolute image paths, each once: of a folder (recursive, following links to folders, sorted), a list
    of records as the training data reads them (JSONL, or a ``.json`` array; file order, paths relative to
    its folder; lines that are not records are skipped and reported, as the training data does) or one
    image file. Folders are resolved, file names kept: a dataset of links into a blob store (a hub cache,
    git-annex, DVC) is recorded under its own names."""
    from lumina_jax.data.sources import _BadEntry, _read_original_records

    spec = Path(spec)
    if spec.is_dir():
        return sorted(set(_walk_images(spec)))
    if not spec.is_file():
        raise FileNotFoundError(f"--images {spec}: no such folder or file")
    if spec.suffix.lower() in IMAGE_EXTENSIONS:
        return [_absolute(spec)]
    out, bad = [], []
    for where, item in _read_original_records(spec):
        if isinstance(item, _BadEntry):
            if spec.suffix.lower() not in (".jsonl", ".json", ".txt"):
                raise ValueError(f"--images {spec}: not a JSONL list of images ({item.message}), and "
                                 f"{spec.suffix or 'no suffix'} is not an image extension {list(IMAGE_EXTENSIONS)}")
            bad.append(f"{where}: {item.message}")
            continue
        path = item.get("image_path", item.get("path")) if isinstance(item, dict) else None
        if not isinstance(path, str) or not path:
            bad.append(f"{where}: no image_path/path")
            continue
        p = Path(path)
        out.append(_absolute(p if p.is_absolute() else spec.parent / p))
    if bad and not out:
        raise ValueError(f"--images {spec}: no usable record; " + "; ".join(bad[:3]))
    if bad:  # e.g. the last line of an earlier run's output, cut short by a crash
        shown = "; ".join(bad[:3]) + (f"; ... ({len(bad) - 3} more)" if len(bad) > 3 else "")
        print(f"caption: skipped {len(bad)} line(s) of {spec} that are not image records: {shown}", file=sys.stderr)
    return list(dict.fromkeys(out))  # listed twice (or by two spellings): captioned once


def _absolute(path: Path) -> Path:
    """``path`` with its folder resolved (links, ``..``) and its own name kept, link or not: a dataset of links
    into a blob store keeps its names, and the recorded path, relative to the resolved output folder,
    opens the way the data reader opens it (the file system resolves ``..`` after following links)."""
    path = Path(os.path.abspath(path))
    return Path(os.path.realpath(path.parent)) / path.name


def _walk_images(root: Path) -> Iterator[Path]:
    """Image files under ``root``, through links to folders too (each real folder walked once: no loops)."""
    seen: set[str] = set()
    for d, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        for name in files:
            p = Path(d) / name
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                yield _absolute(p)


def output_file(out: Path, index: int, count: int) -> Path:
    return out if count == 1 else out.with_name(f"{out.stem}.{index:05d}-of-{count:05d}{out.suffix}")


def record_path(line: str) -> Optional[str]:
    """``image_path`` of a complete output record (one JSON object with a string ``image_path``), else None."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError:
        return None  # a line cut short by a crash
    path = item.get("image_path") if isinstance(item, dict) else None
    return path if isinstance(path, str) else None


_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates: undecodable file-name bytes (PEP 383)


def json_line(record: dict[str, Any]) -> str:
    """One JSONL line (newline included), UTF-8 encodable even for file names that are not valid UTF-8.

    Non-ASCII text stays readable (``ensure_ascii=False``); a lone surrogate (how Python represents the
    undecodable bytes of a file name, PEP 383) is written as its ``\\udcXX`` escape, which ``json.loads``
    turns back into the same ``str``, so ``open(path)`` and the resume check find the same file again.
    """
    text = json.dumps(record, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


def settings_key(granularity: str, perspective: str, lang: str, custom: Optional[str]) -> tuple:
    """What makes two captions of one image the same request (resume skips it): the instruction when
    one was given, else the template's settings."""
    return ("instruction", custom) if custom is not None else (granularity, perspective, lang)


def _record_key(line: str) -> Optional[tuple]:
    try:
        item = json.loads(line)
    except json.JSONDecodeError:
        return None
    return settings_key(item.get("granularity"), item.get("perspective"), item.get("lang"), item.get("instruction"))


def done_set(out: Path, key: Optional[tuple] = None) -> set[str]:
    """``image_path`` values already written to ``out`` or to any of its per-process parts (with ``key``:
    by a run of those :func:`settings_key` settings)."""
    done: set[str] = set()
    part = re.compile(re.escape(out.stem) + r"\.\d{5}-of-\d{5}" + re.escape(out.suffix))  # this output's own parts
    names = sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() else []
    files = [out] + [out.parent / n for n in names if part.fullmatch(n)]
    for f in files:
        if not f.is_file():
            continue
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                path = record_path(line)
                if path is not None and (key is None or _record_key(line) == key):
                    done.add(os.path.normpath(path))
    return done


def open_for_append(path: Path) -> IO[str]:
    """Open ``path`` for appending after repairing its end from an interrupted run.

    A last line without its newline is dropped if it is cut short (not a complete record); a complete
    record that only lost its newline (counted as done by :func:`done_set`) gets the newline instead.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(size - 1)
            if f.read(1) != b"\n":
                start = _last_line_start(f, size)
                f.seek(start)
                tail = f.read()
                if record_path(tail.decode("utf-8", errors="replace")) is not None:
                    f.write(b"\n")
                else:
                    f.truncate(start)
    return open(path, "a", encoding="utf-8")


def _last_line_start(f: IO[bytes], size: int, block: int = 1 << 16) -> int:
    """Offset just after the last ``\\n`` of the first ``size`` bytes of ``f`` (0 if none), reading backwards."""
    end = size
    while end > 0:
        begin = max(0, end - block)
        f.seek(begin)
        i = f.read(end - begin).rfind(b"\n")
        if i >= 0:
            return begin + i + 1
        end = begin
    return 0


def shard(items: Sequence[Any], index: int, count: int) -> list[Any]:
    if not 0 <= index < count:
        raise ValueError(f"process index {index} out of range for count {count}")
    return list(items[index::count])


# ----------------------------------------------------------------------------------------------
# main


def process_slice(args: argparse.Namespace) -> tuple[int, int, bool]:
    """``(index, count, distributed)``: this process's share of the image list.

    ``--process-index/--process-count`` (both or neither) are taken as given and start nothing. Otherwise
    JAX's distributed runtime is started when the environment describes a multi-process job
    (:func:`lumina_jax.parallel.distributed.initialize`: ``LUMINA_*`` from ``launch/local.py``, SLURM, a
    TPU pod, Open MPI) and the share is ``jax.process_index() / jax.process_count()``; ``distributed``
    says that other processes take part (they wait for each other at the end, see :func:`wait_for_peers`).
    Must run before the first JAX computation.
    """
    if (args.process_index is None) != (args.process_count is None):
        raise SystemExit("caption: error: give both --process-index and --process-count, or neither")
    if args.process_index is not None:
        if args.process_index >= args.process_count:
            raise SystemExit(f"caption: error: --process-index {args.process_index} is not below "
                             f"--process-count {args.process_count}")
        return args.process_index, args.process_count, False
    import jax

    from lumina_jax.parallel import distributed

    try:
        distributed.initialize()
    except ValueError as e:  # a coordinator without a port, Open MPI 5, ...
        raise SystemExit(f"caption: error: {e}") from None
    count = jax.process_count()
    return jax.process_index(), count, count > 1


_barriers = 0


def wait_for_peers(timeout_s: float = DONE_BARRIER_TIMEOUT_S) -> None:
    """Block until every process of the distributed run gets here (a coordination-service barrier).

    Processes finish at different times (uneven shares, resumed runs); without this, one that ends more
    than JAX's shutdown timeout (5 min) before the others makes the shutdown barrier fail and abort them
    all. No device traffic: the barrier goes through the coordinator, so it works with any backend.
    """
    global _barriers
    from jax._src import distributed as jax_distributed  # the public API has no barrier with a timeout

    client = jax_distributed.global_state.client
    if client is None:
        return
    _barriers += 1
    client.wait_at_barrier(f"lumina_caption_done_{_barriers}", int(timeout_s * 1000))


class Skipped(NamedTuple):
    """An image that is not captioned: ``kind`` ``"corrupt"`` (cannot be read/decoded), ``"missing"`` or
    ``"unsupported"``."""

    kind: str
    reason: str


def _chunks(it: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(it), n):
        yield it[i:i + n]


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    index, count, distributed = process_slice(args)
    status = _run(args, index, count)
    if distributed:  # not after an error: that process's exit ends the others through JAX's runtime
        wait_for_peers()
    return status


def _setup_error(message: str) -> SystemExit:
    return SystemExit(f"caption: error: {message}")


def _run(args: argparse.Namespace, index: int, count: int) -> int:
    t_start = time.perf_counter()

    import jax
    import jax.numpy as jnp

    from lumina_jax.convert.captioner import generation_setting, load_captioner, read_config
    from lumina_jax.models.captioner.decode import GenerationConfig, generate
    from lumina_jax.models.captioner.model import cast_params
    from lumina_jax.models.captioner.processor import (
        ENDOFTEXT, IM_END, ImageProcessorConfig, Tokenizer, UnsupportedImageError, build_batch, capped_slots,
        default_slot_buckets, load_image, make_example, prompt_ids, round_up)
    from lumina_jax.models.captioner.vision import slots_needed

    out = Path(args.out)
    my_out = output_file(out, index, count)
    for f in {out, my_out}:  # before the (long) model load, not after
        if f.is_dir():
            raise _setup_error(f"--out {f} is a folder; give a .jsonl file name")
    probe = my_out.parent.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK) or (my_out.exists()
                                                                         and not os.access(my_out, os.W_OK)):
        raise _setup_error(f"--out {my_out}: cannot write there ({probe} is not a writable folder)")

    if args.max_image_pixels is not None:
        Image.MAX_IMAGE_PIXELS = args.max_image_pixels
    if args.instruction is not None and not args.instruction.strip():
        raise _setup_error("--instruction is empty (leave it out to use the templates)")
    if args.min_pixels is not None and args.max_pixels is not None and args.min_pixels > args.max_pixels:
        raise _setup_error(f"--min-pixels {args.min_pixels} is above --max-pixels {args.max_pixels}")
    from lumina_jax.ops.attention import available_backends

    for flag, name in (("--attention-backend", args.attention_backend),
                       ("--decode-attention-backend", args.decode_attention_backend)):  # fmt: skip
        if name not in available_backends():
            raise _setup_error(f"{flag} {name!r} is not an attention backend; available: {available_backends()}")
    try:
        images = shard(list_images(args.images), index, count)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise _setup_error(str(e)) from None
    done = done_set(out, settings_key(args.granularity, args.perspective, args.lang, args.instruction))
    base = out.parent.resolve()  # the images' folders resolved as the output's: relative paths that open
    rel = {p: os.path.normpath(os.path.relpath(p, base)) for p in images}
    todo = [p for p in images if rel[p] not in done]
    skipped_existing = len(images) - len(todo)
    if args.limit is not None:
        todo = todo[:args.limit]
    print(f"[caption] process {index}/{count}: {len(images)} images, {skipped_existing} already captioned, "
          f"{len(todo)} to do -> {my_out}", file=sys.stderr)
    if not todo:
        print(json.dumps({"captioned": 0, "skipped_existing": skipped_existing, "corrupt": 0, "missing": 0,
                          "unsupported": 0, "out": str(my_out)}))
        return 0

    # everything that can be checked without the weights, before loading them
    from lumina_jax.convert.errors import CheckpointError

    try:
        config = read_config(args.model)
        tok = Tokenizer.from_pretrained(args.model)
        proc = ImageProcessorConfig.from_pretrained(args.model, config)
    except (CheckpointError, OSError, ValueError) as e:
        raise _setup_error(str(e)) from None
    overrides = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels))
                 if v is not None}
    if args.max_pixels is None and proc.max_pixels > DEFAULT_MAX_PIXELS:
        # the released preprocessor configs allow 16k tokens per image; captioning does not need that
        overrides["max_pixels"] = DEFAULT_MAX_PIXELS
        print(f"[caption] max_pixels capped at {DEFAULT_MAX_PIXELS} (1280 image tokens); pass --max-pixels "
              f"to change", file=sys.stderr)
    if overrides:
        import dataclasses

        proc = dataclasses.replace(proc, **overrides)
    if proc.min_pixels > proc.max_pixels:  # one of them from the flags, the other from the processor file (or cap)
        raise _setup_error(f"min_pixels {proc.min_pixels} is above max_pixels {proc.max_pixels} (flags over "
                           f"{args.model}/preprocessor_config.json); pass --min-pixels / --max-pixels that agree")
    text = instruction(args.granularity, args.perspective, args.lang, args.instruction)
    system = args.system or None
    try:
        proc.check_model(config)
        ids = prompt_ids(text, tok, config, system)
    except (KeyError, ValueError) as e:
        raise _setup_error(f"{args.model}: {e.args[0] if isinstance(e, KeyError) else e}") from None
    v = config.vision
    if args.slot_buckets:
        buckets = args.slot_buckets
        bad = [b for b in buckets if b % v.window_slots]
        if bad:
            raise _setup_error(f"--slot-buckets {bad} are not multiples of {v.window_slots} (window slots)")
    else:
        buckets = default_slot_buckets(v, capped_slots(proc, v))
    stops = list(config.eos_token_id)
    for t in (IM_END, ENDOFTEXT):
        i = tok.maybe_token_id(t)
        if i is not None and i not in stops:
            stops.append(i)
    pad_id = tok.maybe_token_id(ENDOFTEXT)
    pad_id = config.pad_token_id if pad_id is None else pad_id
    max_new = DEFAULT_MAX_NEW_TOKENS[args.granularity] if args.max_new_tokens is None else args.max_new_tokens
    penalty = args.repetition_penalty
    if penalty is None:  # as transformers' generate(): the model's own default, greedy or not
        try:
            penalty = generation_setting(args.model, "repetition_penalty")
        except CheckpointError as e:
            raise _setup_error(str(e)) from None
        if penalty is not None and (isinstance(penalty, bool) or not isinstance(penalty, (int, float))
                                    or not 0 < penalty < float("inf")):
            raise _setup_error(f"{args.model}/generation_config.json: repetition_penalty {penalty!r} is not a "
                               "positive number")
        if penalty not in (None, 1, 1.0):
            print(f"[caption] repetition penalty {penalty} from the model's generation_config.json "
                  "(--repetition-penalty 1 turns it off)", file=sys.stderr)
    gen = GenerationConfig(max_new_tokens=max_new, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, stop_token_ids=tuple(stops), pad_token_id=int(pad_id or 0),
                           repetition_penalty=float(1.0 if penalty is None else penalty))

    devices = jax.local_devices()
    tp = args.tensor_parallel
    if len(devices) % tp:
        raise _setup_error(f"--tensor-parallel {tp} does not divide the {len(devices)} local devices")
    if tp > 1:
        bad = tensor_parallel_problems(config, tp)
        if bad:
            raise _setup_error(f"--tensor-parallel {tp}: {'; '.join(bad)}")
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    try:
        _, params = load_captioner(args.model, dtype=args.param_dtype or args.dtype)
    except CheckpointError as e:  # no weights, a half-downloaded file, keys of another model
        raise _setup_error(str(e)) from None
    n_dev = len(devices) // tp  # devices along the batch
    B = args.batch_size
    if n_dev > 1 and B % n_dev:
        B = round_up(B, n_dev)
        print(f"[caption] batch size rounded up to {B} to split over {n_dev} local devices", file=sys.stderr)
    params = cast_params(params, jnp.bfloat16 if (args.param_dtype or args.dtype) == "bf16" else jnp.float32)
    put_batch = _device_placer(devices, params, config, tp)
    params = put_batch.params

    skipped: dict[str, list[str]] = {"corrupt": [], "missing": [], "unsupported": []}
    captioned = 0
    rng = jax.random.PRNGKey(args.seed + 1000003 * index)
    from tqdm import tqdm

    bar = tqdm(total=len(todo), disable=args.no_progress or None, desc="caption", unit="img")

    def prepare(path: Path) -> tuple[Path, Any]:
        if not path.exists():
            return path, Skipped("missing", "no such file")
        try:
            image = load_image(path)
        except Image.DecompressionBombError as e:  # valid, but over PIL's pixel limit: not a corrupt file
            return path, Skipped("unsupported", f"{e} (raise the limit with --max-image-pixels)")
        except Exception as e:  # noqa: BLE001 - any error opening/decoding the file: a corrupt image
            return path, Skipped("corrupt", f"{type(e).__name__}: {e}")
        try:
            return path, make_example(image, text, tok, config, proc, system, ids=ids)
        except UnsupportedImageError as e:  # anything else is a bug or a setup error: it stops the run
            return path, Skipped("unsupported", str(e))

    with open_for_append(my_out) as fout, ThreadPoolExecutor(max(1, args.workers)) as pool:
        chunks = list(_chunks(todo, B * 4))
        ahead = pool.map(prepare, chunks[0])  # map submits at once: the next chunk loads during generation
        for ci in range(len(chunks)):
            prepared = list(ahead)
            if ci + 1 < len(chunks):
                ahead = pool.map(prepare, chunks[ci + 1])
            by_bucket: dict[int, list] = {}
            for path, ex in prepared:
                if isinstance(ex, Skipped):
                    skipped[ex.kind].append(str(path))
                    what = {"corrupt": "unreadable", "missing": "missing"}.get(ex.kind, "unsupported")
                    print(f"[caption] skipping {what} image {path}: {ex.reason}", file=sys.stderr)
                    bar.update(1)
                    continue
                need = slots_needed(ex.grid, v)
                # past the largest bucket (window padding of a very thin image): an exact-size program
                b = round_up(need, buckets) if need <= buckets[-1] else round_up(need, v.window_slots)
                by_bucket.setdefault(b, []).append((path, ex))
            for slots, items in sorted(by_bucket.items()):
                for group in _chunks(items, B):
                    exs = [ex for _, ex in group]
                    n_img = slots // v.merge_unit
                    text_len = max(len(e.ids) - e.grid[0] * e.grid[1] // v.merge_unit for e in exs)
                    P = round_up(n_img + text_len, args.prompt_multiple)
                    batch = build_batch(exs, config, batch_size=B, slots=slots, prompt_len=P,
                                        pad_token_id=gen.pad_token_id)
                    active = np.arange(B) < len(exs)
                    rng, sub = jax.random.split(rng)
                    res = generate(params, put_batch(batch), config, gen, sub, active=put_batch.rows(active),
                                   dtype=dtype, attention_backend=args.attention_backend,
                                   decode_attention_backend=args.decode_attention_backend)
                    tokens, lengths, finished = (np.asarray(x) for x in jax.device_get(tuple(res)))
                    for row, (path, _) in enumerate(group):
                        caption = tok.decode(tokens[row, :lengths[row]]).strip()
                        rec = {"image_path": rel[path], "prompt": caption, "granularity": args.granularity,
                               "perspective": args.perspective, "lang": args.lang,
                               **({"instruction": args.instruction} if args.instruction is not None else {}),
                               "num_tokens": int(lengths[row]), "truncated": not bool(finished[row])}
                        fout.write(json_line(rec))
                    fout.flush()
                    captioned += len(group)
                    bar.update(len(group))
    bar.close()
    dt = time.perf_counter() - t_start
    summary = {"captioned": captioned, "skipped_existing": skipped_existing, "corrupt": len(skipped["corrupt"]),
               "missing": len(skipped["missing"]), "unsupported": len(skipped["unsupported"]), "seconds": round(dt, 2),
               "images_per_s": round(captioned / dt, 3) if dt else None, "out": str(my_out)}
    print(json.dumps(summary))
    return 0


# Tensor parallelism (--tensor-parallel): the captioner's logical param axes on the mesh's "tensor" axis
# (Megatron-style: q/k/v and MLP-in split by output, o/MLP-out by input; XLA inserts the reductions).
TENSOR_RULES = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))


def tensor_parallel_problems(config: Any, tp: int) -> list[str]:
    """What keeps ``config`` from splitting ``tp`` ways: every param dimension that :data:`TENSOR_RULES`
    splits must divide evenly (from the param shapes and logical axes; nothing is allocated)."""
    from lumina_jax.convert.common import flatten
    from lumina_jax.models.captioner.model import param_logical_axes, param_shapes

    split = {name for name, _ in TENSOR_RULES}
    shapes = flatten(param_shapes(config))
    specs = flatten(param_logical_axes(config))
    bad: dict[str, str] = {}
    for path, spec in specs.items():
        for size, name in zip(shapes[path].shape, tuple(spec)):
            if name in split and size % tp and name not in bad:
                bad[name] = f"{name} of {path} ({size}) is not a multiple of {tp}"
    return list(bad.values())


def param_shardings(config: Any, mesh: Any) -> Any:
    """A ``NamedSharding`` per param: :data:`TENSOR_RULES` over ``mesh``'s ``tensor`` axis, the rest replicated."""
    import flax.linen as nn

    from lumina_jax.models.captioner.model import param_logical_axes

    return nn.logical_to_mesh_sharding(param_logical_axes(config), mesh, TENSOR_RULES)


class _device_placer:
    """Put a batch on this process's devices: split over them on the batch axis; params replicated, or
    split over ``tensor_parallel`` devices (:data:`TENSOR_RULES`) with the batch over the rest."""

    def __init__(self, devices: list, params: Any, config: Any = None, tensor_parallel: int = 1):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        self.mesh = None
        if len(devices) > 1:
            self.mesh = Mesh(np.asarray(devices).reshape(-1, tensor_parallel), ("data", "tensor"))
        if self.mesh is None:
            self.params = jax.device_put(params, devices[0])
            return
        self._row = NamedSharding(self.mesh, P("data"))
        self._pos = NamedSharding(self.mesh, P(None, "data"))  # positions: (3, B, P)
        shardings = param_shardings(config, self.mesh) if tensor_parallel > 1 else NamedSharding(self.mesh, P())
        self.params = jax.device_put(params, shardings)

    def rows(self, x: Any) -> Any:
        import jax

        return x if self.mesh is None else jax.device_put(x, self._row)

    def __call__(self, batch: Any) -> Any:
        import jax

        if self.mesh is None:
            return batch
        vis = type(batch.vision)(*(jax.device_put(a, self._row) for a in batch.vision))
        return type(batch)(jax.device_put(batch.input_ids, self._row), jax.device_put(batch.positions, self._pos),
                           *(jax.device_put(a, self._row) for a in (batch.kv_start, batch.image_index,
                                                                     batch.next_position)), vis)


if __name__ == "__main__":
    sys.exit(main())
