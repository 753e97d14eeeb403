"""``python -m lumina_jax generate "a prompt" [more prompts] --out out.png [--checkpoint PATH] [options]``

Writes one image per prompt and seed and prints where they went. PNG (the default) keeps the prompt,
negative prompt, seed and every setting in its text metadata (keys ``prompt``, ``negative_prompt``,
``seed`` and ``lumina_jax`` = JSON of the settings, the mode and the package version); ``--out x.jpg``
or ``x.webp`` writes that format with the same JSON in the EXIF image description. ``--out out.png``
with several images writes ``out_000.png``, ``out_001.png``, ...; an ``--out`` that is a directory (or
ends with ``/``) gets ``lumina_<seed>.png`` files (``lumina_<seed>_1.png``, ... where the name is taken:
images there are never replaced); a name with another suffix gets ``.png`` appended
(other image suffixes, ``.gif``, ``.bmp``, ..., are refused). JPEG keeps at most 2000 characters of a
very long prompt in its metadata (``prompt_truncated``).

Without ``--checkpoint`` the bundled default model is used (``lumina_jax/assets/default_model``: a small
model of a synthetic shapes world; if that folder is missing, a tiny random model with a notice). ``--checkpoint`` takes a diffusers pipeline directory
(e.g. a download of Alpha-VLLM/Lumina-Image-2.0), a directory written by
``lumina_jax.convert.components.save_components``, or a hub id.

Progress: ``--mode stepwise`` (default) runs each solver step as its own compiled call, so the progress
bar advances per step and compilation shows as its own phase; every compiled program goes to the
persistent compilation cache (``~/.cache/lumina_jax/xla``; ``--compilation-cache DIR|off``), so a second
run does not recompile. ``--mode fused`` runs all steps and the decode as one program (a little faster
per image, no per-step progress).

Presets (``--preset``; explicit options override): ``quality`` (midpoint, 17 steps = the original
sample.sh), ``balanced`` (the same with CFG-Trunc at t < 0.25, the paper's setting), ``fast``
(Flow-DPM-Solver, 10 steps, CFG-Trunc), ``diffusers`` (diffusers' Lumina2Pipeline semantics). The
original's ``--num_sampling_steps N`` is ``--steps N-1`` here for euler/midpoint (it counts grid points)
and ``--steps N`` for dpm (it counts steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

PROG = "python -m lumina_jax generate"

# --out suffix -> PIL format; other image suffixes are refused rather than given a second suffix
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".webp": "WEBP"}
_OTHER_IMAGE_SUFFIXES = (".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k",
                         ".ppm", ".pgm", ".tga", ".ico", ".svg", ".pdf", ".eps", ".psd", ".exr", ".hdr")  # fmt: skip
_EXIF_MAX = 60_000  # JPEG keeps EXIF in one 64 KiB segment
_PRESET_FLAGS = {"solver": "--solver", "num_inference_steps": "--steps", "cfg_trunc_ratio": "--cfg-trunc",
                 "cfg_normalization": "--renorm", "cfg_trunc_mode": "--cfg-trunc-mode",
                 "negative_system_prompt": "--negative-system-prompt"}  # fmt: skip


def _preset_flag(key: str, value: Any) -> str:
    if key == "cfg_off_at_or_below_one":  # no flag of its own: diffusers' rule, described
        return "(CFG off for --cfg <= 1)" if value else "(CFG applied below 1)"
    flag = _PRESET_FLAGS.get(key, key)
    if isinstance(value, bool):
        return flag if value else flag.replace("--", "--no-", 1)
    return f"{flag} {value}"


def _size(s: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in s.lower().replace("*", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
    return w, h


def _renorm(s: str) -> Any:
    low = s.lower()
    if low in ("clamp", "original"):
        return "clamp"  # explicit: a preset's rows does not replace it (True under --preset diffusers would)
    if low in ("true", "on"):
        return True
    if low in ("false", "off", "none", "0"):
        return False
    if low in ("rows", "diffusers"):
        return "rows"
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: use clamp (original), rows (diffusers), off, or a ratio") from None


def _mesh(s: str) -> Any:
    from lumina_jax.parallel.mesh import MeshConfig

    try:
        return MeshConfig.parse(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from lumina_jax.sample.solvers import PRESETS, SOLVERS

    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="+", help="one or more prompts")
    ap.add_argument("--out", default="lumina.png",
                    help="output image (.png, default lumina.png; or .jpg/.webp) or directory")
    ap.add_argument("--checkpoint", default=None, help="model directory or hub id (default: bundled model)")
    ap.add_argument("--transformer", default=None, help="replace the transformer with this checkpoint (any format)")
    ap.add_argument("--lora", action="append", default=[], metavar="PATH",
                    help="merge a LoRA adapter (diffusers/PEFT or original/kohya file or folder); repeatable")
    ap.add_argument("--lora-scale", action="append", type=float, default=[], metavar="W",
                    help="weight of each --lora (one value: all of them; default 1.0)")
    ap.add_argument("--negative", default=None, help='negative prompt (default "")')
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="; ".join(
        f"{name}: " + " ".join(_preset_flag(k, v) for k, v in opts.items())
        for name, opts in PRESETS.items()) + " (explicit options override a preset's)")  # fmt: skip
    ap.add_argument("--solver", choices=sorted(SOLVERS), default=None, help="default midpoint")
    ap.add_argument("--steps", type=int, default=None, help="solver steps (default per solver: midpoint 17, "
                    "dpm 20, euler/flow_euler 30)")  # fmt: skip
    ap.add_argument("--cfg", type=float, default=None,
                    help="guidance scale (1 turns CFG off, 0 gives the unconditional image); default: the model's "
                    "(4.0 for Lumina-Image 2.0, 2.5 for the bundled model)")
    ap.add_argument("--negative-system-prompt", action=argparse.BooleanOptionalAction, default=None,
                    help="give a non-empty --negative the system prompt (default, as the original; diffusers and "
                    "--preset diffusers use it verbatim)")
    ap.add_argument("--cfg-trunc", type=float, default=None, help="CFG-Trunc threshold in [0, 1]: guidance while t < it (default 1.0: guidance at every step, 0: none)")
    ap.add_argument("--cfg-trunc-mode", choices=["time", "steps"], default=None,
                    help="time: CFG while t < threshold (original, default); steps: (i+1)/N <= ratio (diffusers)")
    ap.add_argument("--renorm", type=_renorm, default=None,
                    help="CFG-Renorm: clamp (original, default), rows (diffusers), off, or a clamp ratio")
    ap.add_argument("--shift", type=float, default=None,
                    help="time shift (default: the model's scheduler shift; 3.0 for the bundled model, 6.0 for "
                    "Lumina-Image 2.0)")
    ap.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 16 (default: model's)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the first image; image k uses seed+k")
    ap.add_argument("--n", type=int, default=1, help="images per prompt")
    ap.add_argument("--system-prompt", default=None, help="template name (real, base, align, aesthetics, 4grid, "
                    "empty; default: the model's) or a text (with spaces: one word is taken for a misspelt name)")
    ap.add_argument("--max-length", type=int, default=256, help="max text tokens incl. system prompt (default 256)")
    ap.add_argument("--long-prompt", choices=["error", "warn"], default="error",
                    help="a prompt over --max-length: error (default) or warn (cut it to the limit, as diffusers)")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="compute dtype (auto: bf16 on accelerators, fp32 on CPU)")
    ap.add_argument("--weights-dtype", choices=["auto", "keep", "fp32", "bf16"], default="auto",
                    help="dtype the weights are read in (auto: the checkpoint's own when computing in bf16, so a "
                         "bf16 release is not widened to fp32 on the host; fp32 otherwise)")
    ap.add_argument("--mode", choices=["stepwise", "fused"], default="stepwise",
                    help="stepwise (default): one compiled step called per step, with a progress bar; fused: the "
                         "whole sampling loop as one program")  # fmt: skip
    ap.add_argument("--attention", default="auto", metavar="BACKEND",
                    help="Next-DiT attention backend (default auto; 'context' for a --mesh with context > 1)")
    ap.add_argument("--mesh", type=_mesh, default=None,
                    help="shard over this host's devices: a mesh preset (dp, fsdp, fsdp_tensor, context) and/or "
                         "axis sizes, e.g. 'dp' (one image per device), 'fsdp=4,tensor=2' (split the weights)")
    ap.add_argument("--compilation-cache", default=None, help="persistent XLA cache directory, or 'off'")
    ap.add_argument("--cache-weights", action="store_true",
                    help="cache converted diffusers weights as orbax (faster later loads)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (the phase messages stay)")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the written paths, warnings, "
                    "errors and notices of replaced files (no progress bar, phases or timings)")  # fmt: skip
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


# Pipeline argument names in error messages -> this command's flags.
_ARG_TO_FLAG = (
    ("pass seed=None for a random one", "leave out --seed for a random one"),
    ("pass it as transformer=", "pass it with --transformer"), ("num_inference_steps", "--steps"),
    ("guidance_scale", "--cfg"), ("cfg_trunc_ratio", "--cfg-trunc"), ("max_sequence_length", "--max-length"),
    ("exceed max_length=", "exceed --max-length "), ("on_long_prompt='warn'", "--long-prompt warn"),
    ("cfg_normalization", "--renorm"), ("num_images_per_prompt", "--n"), ("time_shift", "--shift"),
)  # fmt: skip


def output_paths(out: str, seeds: list[Optional[int]]) -> list[Path]:
    """Where each image goes (see the module docstring); ``ValueError`` for an image suffix that is
    not written (``.gif``, ``.bmp``, ...)."""
    p = Path(out)
    if out.endswith(("/", "\\")) or p.is_dir():  # never replaces: a name taken gets _1, _2, ...
        paths: list[Path] = []
        for i, s in enumerate(seeds):
            stem, k = f"lumina_{s if s is not None else i}", 0
            while (q := p / (f"{stem}_{k}.png" if k else f"{stem}.png")).exists() or q in paths:
                k += 1
            paths.append(q)
        return paths
    suffix = p.suffix.lower()
    if suffix in _OTHER_IMAGE_SUFFIXES:
        raise ValueError(f"--out {out}: cannot write {suffix} images; use .png (with metadata), .jpg or .webp")
    if suffix not in FORMATS:
        p = p.with_name(p.name + ".png")
    if len(seeds) == 1:
        return [p]
    return [p.with_name(f"{p.stem}_{i:03d}{p.suffix}") for i in range(len(seeds))]


def check_output_location(out: str) -> None:
    """``ValueError`` unless the images of ``--out`` can be written: a suffix that is written, and the
    nearest existing folder on the way must be a folder we can write to (missing folders are made when
    saving)."""
    output_paths(out, [0])
    p = Path(out)
    folder = p if out.endswith(("/", "\\")) or p.is_dir() else p.parent
    existing = next((q for q in [folder, *folder.parents] if q.exists()), Path("."))
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"--out {out}: cannot write to {existing}")


def image_metadata(prompt: str, negative_prompt: Optional[str], seed: Optional[int],
                   settings: dict[str, Any]) -> dict[str, Any]:
    """What :func:`save_image` records: the settings with this image's prompt, negative prompt (``None``
    without CFG) and seed, and the package version."""
    from lumina_jax import __version__

    meta = {k: v for k, v in settings.items() if k != "negative_prompt"}
    return dict(meta, prompt=prompt, negative_prompt=negative_prompt, seed=seed, lumina_jax_version=__version__)


def save_image(image: Any, path: Path, prompt: str, negative_prompt: Optional[str], seed: Optional[int],
               settings: dict[str, Any]) -> None:
    """Write ``image`` (PIL) to ``path`` in the format of its suffix (PNG unless ``.jpg``/``.jpeg``/
    ``.webp``), with :func:`image_metadata` as PNG text chunks (``prompt``, ``negative_prompt``, ``seed``,
    ``lumina_jax`` = the JSON) or, for JPEG/WebP, as JSON in the EXIF image description."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = json.dumps(image_metadata(prompt, negative_prompt, seed, settings), default=str)
    fmt = FORMATS.get(path.suffix.lower(), "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "PNG":
        info = PngInfo()
        info.add_itxt("prompt", prompt)
        info.add_itxt("negative_prompt", negative_prompt or "")
        info.add_text("seed", "" if seed is None else str(seed))
        info.add_itxt("lumina_jax", meta)
        info.add_text("Software", "lumina-jax")
        image.save(path, format=fmt, pnginfo=info)
        return
    if len(meta) > _EXIF_MAX:  # long texts (prompts, a custom system prompt): keep their starts, say so
        full = json.loads(meta)
        for keep in (2000, 200, 20):
            meta = json.dumps(dict(_cut_strings(full, keep), prompt_truncated=True))
            if len(meta) <= _EXIF_MAX:
                break
    exif = Image.Exif()
    exif[0x010E] = meta  # ImageDescription
    exif[0x0131] = "lumina-jax"  # Software
    image.save(path, format=fmt, exif=exif, quality=95)


def _cut_strings(value: Any, keep: int) -> Any:
    """``value`` (JSON data) with every string longer than ``keep`` cut to its first ``keep`` characters."""
    if isinstance(value, str):
        return value[:keep]
    if isinstance(value, dict):
        return {k: _cut_strings(v, keep) for k, v in value.items()}
    if isinstance(value, list):
        return [_cut_strings(v, keep) for v in value]
    return value


def save_images(out: Any, paths: list[Path], on_replace: Optional[Any] = None) -> None:
    """Write every image of a :class:`~lumina_jax.pipeline.Lumina2Output` (``output_type="pil"``) to
    ``paths`` (one per image) with :func:`save_image`; ``on_replace(path)`` is called before an existing
    file is replaced."""
    from PIL import Image

    if len(paths) != len(out.images):
        raise ValueError(f"{len(paths)} paths for {len(out.images)} images: pass one path per image")
    if not all(isinstance(img, Image.Image) for img in out.images):
        raise ValueError("save_images writes PIL images: generate with output_type='pil' (the default)")
    negatives = out.negative_prompts or [None] * len(out.images)
    n = int(out.settings.get("num_images_per_prompt") or 1)
    cut = out.settings.get("truncated_prompts")
    for j, (img, path, prompt, neg, seed) in enumerate(zip(out.images, paths, out.prompts, negatives, out.seeds)):
        if on_replace is not None and path.exists():
            on_replace(path)
        settings = out.settings
        if isinstance(cut, dict):  # the batch's prompt indices -> whether this image's own texts were cut
            settings = dict(settings, truncated_prompts={k: j // n in rows for k, rows in cut.items()})
        save_image(img, path, prompt, neg, seed, settings)


class _CacheStats:
    """Counts JAX persistent-cache hits and misses (``jax.monitoring`` events)."""

    def __init__(self):
        import jax

        self.hits = self.misses = 0

        def listen(event: str, **kw: Any) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                self.hits += 1
            elif event == "/jax/compilation_cache/cache_misses":
                self.misses += 1

        jax.monitoring.register_event_listener(listen)


def check_before_loading(args: argparse.Namespace) -> None:
    """What can be checked without the weights, so that a typo fails in a second, not after minutes of
    loading: the sampler settings (as the pipeline resolves them), the system prompt's template name,
    the seed, the text length, and the image size against the model's configs (when they are local)."""
    from lumina_jax.convert.components import peek_size_limits
    from lumina_jax.pipeline import DEFAULT_MODEL_DIR, check_image_size, resolve_settings, schedule_of
    from lumina_jax.text_templates import resolve_system_prompt

    if args.cfg is not None and not math.isfinite(args.cfg):
        raise ValueError(f"guidance_scale must be a finite number, got {args.cfg!r}")
    settings = resolve_settings(solver=args.solver, num_inference_steps=args.steps, cfg_trunc_ratio=args.cfg_trunc,
                                cfg_normalization=args.renorm, cfg_trunc_mode=args.cfg_trunc_mode,
                                time_shift=args.shift, preset=args.preset, default_shift=1.0)  # fmt: skip
    schedule_of(settings, 4.0 if args.cfg is None else args.cfg)
    if args.system_prompt is not None:
        resolve_system_prompt(args.system_prompt)
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {args.seed!r} (pass seed=None for a random one)")
    if args.max_length < 1:
        raise ValueError(f"max_sequence_length must be >= 1, got {args.max_length}")
    if args.checkpoint is None and args.transformer is None:  # the bundled model knows its world's words only
        from lumina_jax.shapes.spec import unknown_words

        log = logging.getLogger("lumina_jax.generate")
        def lowercase(text: str, what: str) -> str:  # "A Red Circle": its words as the model knows them (its
            # captions are all lowercase; "A" and "a" are different tokens), unless that adds unknown words
            low, still = text.lower(), set(unknown_words(text.lower()))
            changed = {w.lower() for w in re.findall(r"[^\s,.;:!?]+", text) if w != w.lower()}
            if changed - still and still <= {w.lower() for w in unknown_words(text)}:  # it helps, and adds nothing
                log.warning("the bundled default model knows lowercase words only: using the %s %r", what, low)
                return low
            return text

        args.prompt = [lowercase(p, "prompt") for p in args.prompt]
        if args.negative:
            args.negative = lowercase(args.negative, "negative prompt")
        for prompt in [*args.prompt, *([args.negative] if args.negative else [])]:
            if unknown := unknown_words(prompt):
                log.warning("the bundled default model has never seen %s (in %r): its image will not follow them; "
                            "it knows colours, shapes and positions of its shapes world, lowercase (README)",
                            unknown[:6], prompt)  # fmt: skip
    if args.size:
        limits = peek_size_limits(args.checkpoint or DEFAULT_MODEL_DIR, args.transformer)
        if limits is not None:
            multiple, max_tokens_side = limits
            check_image_size(args.size[1], args.size[0], multiple, max_tokens_side=max_tokens_side, patch_px=multiple)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from lumina_jax import log_setup

    log_setup.setup(logging.INFO if args.verbose else logging.WARNING, "%(levelname)s %(message)s")
    if args.n < 1:
        print(f"{PROG}: error: --n must be >= 1", file=sys.stderr)
        return 2
    from lumina_jax.convert.lora import pair_scales

    try:
        loras = pair_scales(args.lora, args.lora_scale)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from lumina_jax.convert.errors import CheckpointError
    from lumina_jax.pipeline import Lumina2Pipeline

    err = sys.stderr

    def say(msg: str) -> None:  # progress and timings; --quiet leaves only the paths and errors
        if not args.quiet:
            print(msg, file=err, flush=True)

    cc: Any = True
    if args.compilation_cache is not None:
        cc = False if args.compilation_cache.lower() in ("off", "none", "0", "false") else args.compilation_cache
    stats = _CacheStats()
    t0 = time.perf_counter()
    try:
        check_output_location(args.out)  # before the model loads and the images are made, not after
        check_before_loading(args)
        say("loading model ...")
        pipe = Lumina2Pipeline.from_pretrained(args.checkpoint, transformer=args.transformer, dtype=args.dtype,
                                               weights_dtype=args.weights_dtype, cache=args.cache_weights,
                                               compilation_cache=cc, attention_backend=args.attention,
                                               mesh=args.mesh)  # fmt: skip
        say(f"loaded {pipe.components.source} in {time.perf_counter() - t0:.1f}s")
        for path, w in loras:
            lora = pipe.load_lora(path, w)
            say(f"merged LoRA {path} ({len(lora.modules)} modules, rank {'/'.join(map(str, lora.ranks))}, weight {w:g})")
        bar: dict[str, Any] = {}
        marks: dict[str, float] = {}

        said: set[str] = set()

        def on_phase(name: str) -> None:
            now = time.perf_counter()
            for prev in list(marks):
                if prev == "compile":  # the text encoder's program (encoding goes on after it), or the sampler's
                    what = "the text encoder" if name == "encode" else "the sampler and decoder"
                    say(f"compiled {what} in {now - marks.pop(prev):.1f}s (cache: {stats.hits} hits, "
                        f"{stats.misses} misses)")  # fmt: skip
                else:
                    marks.pop(prev)
            marks[name] = now
            if name == "compile":
                say("compiling (or loading from the compilation cache) ...")
            elif name == "encode" and "encode" not in said:  # not again after the text encoder's compile
                said.add("encode")
                say("encoding prompts ...")
            elif name == "decode":
                say("decoding ...")

        def on_step(i: int, n: int) -> None:
            if "bar" not in bar:
                bar["bar"] = tqdm(total=n, desc="sampling", unit="step", file=err,
                                  disable=args.no_progress or args.quiet)
            bar["bar"].update(1)
            if i + 1 == n:
                bar["bar"].close()

        width, height = args.size if args.size else (None, None)
        out = pipe(
            args.prompt, negative_prompt=args.negative, height=height, width=width, num_inference_steps=args.steps,
            guidance_scale=args.cfg, cfg_trunc_ratio=args.cfg_trunc, cfg_normalization=args.renorm,
            max_sequence_length=args.max_length, system_prompt=args.system_prompt, num_images_per_prompt=args.n,
            solver=args.solver, time_shift=args.shift, seed=args.seed, cfg_trunc_mode=args.cfg_trunc_mode,
            preset=args.preset, mode=args.mode, callback=None if args.mode == "fused" else on_step,
            negative_system_prompt=args.negative_system_prompt,
            on_phase=on_phase, output_type="pil", on_long_prompt=args.long_prompt,
        )  # fmt: skip
        on_phase("done")
    except (ValueError, TypeError, CheckpointError, FileNotFoundError) as e:
        from lumina_jax.convert.cli import cli_message

        print(f"{PROG}: error: {cli_message(e, _ARG_TO_FLAG)}", file=err)
        return 2
    except RuntimeError as e:  # jax.errors.JaxRuntimeError; only running out of memory is explained here
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        first = str(e).strip().splitlines()[0][:300]
        print(f"{PROG}: error: out of device memory ({first}). Try a smaller --size or --n, --dtype bf16, "
              f"--mode stepwise, or a --mesh over several devices", file=err)  # fmt: skip
        return 2
    paths = output_paths(args.out, out.seeds)
    try:
        save_images(out, paths, on_replace=lambda path: print(f"replacing {path}", file=err))
    except (OSError, ValueError) as e:  # ValueError: what PIL refuses to encode
        print(f"{PROG}: error: cannot write the image: {e}", file=err)
        return 2
    t = out.timings
    say(f"{out.settings['solver']}, {out.settings['num_inference_steps']} steps "
        f"({out.settings['num_model_evaluations']} evaluations, {out.settings['num_guided_evaluations']} with CFG); "
        f"text {t['text_encode']:.2f}s, compile {t['compile']:.2f}s, sampling {t['sample']:.2f}s"
        + (f", decode {t['decode']:.2f}s" if "decode" in t else "")
        + f"; XLA cache {stats.hits} hits, {stats.misses} misses")  # fmt: skip
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
