"""``python -m lumina_jax eval-shapes``: generate images of the shapes world and score them.

    python -m lumina_jax eval-shapes --n 200                  # bundled model, default sampler, CFG on and off
    python -m lumina_jax eval-shapes --n 200 --checkpoint DIR --cfg on --json out.json --save-dir out/

Half of the ``n`` prompts describe *held-out* scenes (a colour/shape/position triple never seen in training,
:data:`lumina_jax.shapes.spec.HELD_OUT`), half *seen* ones; the scenes are fixed (seeded), the caption
phrasing varies. Images come from :class:`lumina_jax.pipeline.Lumina2Pipeline` with its default settings
(solver, steps; for "on" the model's CFG scale, 2.5 for the bundled model, or ``--guidance``; 1.0 = no CFG
for "off") and are scored by the deterministic checker :mod:`lumina_jax.shapes.checker` (colour by pixel
clustering, shape by geometry, position by bounding-box centre). Prints accuracy per attribute (per object),
background, object count and all-correct (per image) for seen vs held-out (``n/a`` for a split without
images: ``--n 1`` has no held-out one). A held-out scene may also hold a seen object: the ``held_out*``
row scores only the objects whose triple is held out. Exit status 0; 1 when ``--min-heldout`` thresholds
are not met (they apply to CFG on when it is evaluated, else to CFG off); 2 for an error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from lumina_jax.config_utils import int_at_least
from lumina_jax.sample.solvers import SOLVERS

ATTRIBUTES = ("colour", "shape", "position")
ACCURACIES = (*ATTRIBUTES, "background", "count", "all")


def prompts_for(n: int, seed: int = 0) -> list[tuple[str, "object", str]]:
    """``[(split, scene, caption)]``: ``n // 2`` held-out then ``n - n // 2`` seen (deterministic)."""
    from lumina_jax.shapes import spec

    rng = np.random.default_rng([seed, 5])
    out = []
    for split, k in (("held_out", n // 2), ("seen", n - n // 2)):
        for s in spec.fixed_eval_scenes(k, held_out=(split == "held_out"), seed=seed):
            out.append((split, s, spec.caption(s, rng=rng)))
    return out


def evaluate(pipe, n: int = 200, *, guidance_scale: Optional[float] = None, seed: int = 0, batch: int = 25,
             save_dir: Optional[str] = None, **kwargs) -> dict:  # fmt: skip
    """Generate and score; returns ``{"seen": {...}, "held_out": {...}, "seconds": s}``. ``guidance_scale``
    ``None``: the model's default (``pipe.components.guidance_scale``)."""
    from lumina_jax.shapes import checker, spec

    items = prompts_for(n, seed)
    images = []
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        out = pipe([c for _, _, c in chunk], guidance_scale=guidance_scale, seed=seed * 100_000 + i,
                   output_type="np", **kwargs)  # fmt: skip
        images.extend((np.clip(np.asarray(out.images), 0, 1) * 255).round().astype(np.uint8))
    seconds = time.perf_counter() - t0
    checks = [checker.check(image, scene) for image, (_, scene, _) in zip(images, items)]
    res = {}
    for split in ("seen", "held_out"):
        idx = [k for k, it in enumerate(items) if it[0] == split]
        res[split] = checker.summarise(checks[k] for k in idx)
        if not idx:  # no images (n < 2 has no held-out split): no accuracy, not 0 %
            res[split].update({c: None for c in ACCURACIES})
    # held-out scenes may pair a held-out object with a seen one: also score the held-out triples alone
    objs = [r for (split, scene, _), c in zip(items, checks) if split == "held_out"
            for r, o in zip(c.objects, scene.objects) if (o.colour, o.shape, o.position) in spec.HELD_OUT]  # fmt: skip
    res["held_out_triples"] = {a: (float(np.mean([r[a] for r in objs])) if objs else None) for a in ATTRIBUTES}
    res["held_out_triples"]["n_objects"] = len(objs)
    res["seconds"] = round(seconds, 1)
    if save_dir:
        from PIL import Image

        d = Path(save_dir)
        d.mkdir(parents=True, exist_ok=True)
        for k, (split, scene, cap) in enumerate(items):
            ok = checks[k].all_correct
            Image.fromarray(images[k]).save(d / f"{k:04d}_{split}_{'ok' if ok else 'bad'}.png")
        (d / "prompts.json").write_text(json.dumps([{"file": f"{k:04d}", "split": s, "prompt": c}
                                                    for k, (s, _, c) in enumerate(items)], indent=1))  # fmt: skip
    return res


def format_table(results: dict[str, dict]) -> str:
    cols = ACCURACIES
    lines = [f"{'setting':10s} {'split':9s} " + " ".join(f"{c:>10s}" for c in cols) + "    images"]
    for name, r in results.items():
        for split in ("held_out", "held_out_triples", "seen"):
            if split not in r:
                continue
            m = r[split]
            cells = (f"{'n/a':>10s}" if m.get(c) is None else f"{100 * m[c]:9.1f}%" for c in cols)
            label, count = ("held_out*", f"{m['n_objects']} objects") if split == "held_out_triples" else (
                split, str(m["n_images"]))  # fmt: skip
            lines.append(f"{name:10s} {label:9s} " + " ".join(cells) + f"    {count}")
    return "\n".join(lines)


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def min_accuracies(text: str) -> tuple[float, float, float]:
    """argparse type of ``--min-heldout``: ``C,S,P`` (colour, shape, position) or one value for all three."""
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not numbers: {text!r} (e.g. 0.9,0.8,0.8 or 0.9)") from None
    if len(vals) == 1:
        vals *= 3
    if len(vals) != 3 or not all(0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"want one value or three (colour,shape,position) in [0, 1], got {text!r}")
    return vals[0], vals[1], vals[2]


def check_min_heldout(results: dict[str, dict], mins: Sequence[float]) -> Optional[str]:
    """``None`` if the held-out accuracies of CFG on (if evaluated, else CFG off) reach ``mins`` (colour,
    shape, position), else a message saying which did not."""
    name = "cfg_on" if "cfg_on" in results else "cfg_off"
    held = results[name]["held_out"]
    if held["n_images"] == 0:
        raise ValueError("--min-heldout: the held-out split is empty (--n 1): use --n 2 or more")
    got = {a: held[a] for a in ATTRIBUTES}
    low = {a: g for (a, g), m in zip(got.items(), mins) if g < m}
    if low:
        return f"{name} held-out accuracies {got} below --min-heldout {dict(zip(ATTRIBUTES, mins))}: {sorted(low)}"
    return None


def _unwritable(folder: Path) -> Optional[str]:
    """Why files cannot be written under ``folder`` (created if missing), or None."""
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lumina_jax eval-shapes", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int_at_least(1), default=200, help="images per setting (half held-out, half seen)")
    p.add_argument("--checkpoint", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--cfg", choices=("on", "off", "both"), default="both",
                   help="CFG on (the model's guidance scale, or --guidance), off (1.0) or both")
    p.add_argument("--guidance", type=_finite, default=None,
                   help="guidance scale for --cfg on (default: the model's; 2.5 for the bundled model)")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="solver steps (default: the pipeline's)")
    p.add_argument("--solver", default=None, choices=sorted(SOLVERS))
    p.add_argument("--shift", type=_positive, default=None, help="sampler time shift (default: the model's scheduler)")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--batch", type=int_at_least(1), default=25, help="prompts per pipeline call (>= 1)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--save-dir", default=None, help="write the images here")
    p.add_argument("--min-heldout", type=min_accuracies, default=None,
                   help="colour,shape,position minimum held-out accuracies (e.g. 0.9,0.8,0.8; one value: all "
                   "three) of CFG on, or of CFG off with --cfg off; exit status 1 if not met")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.guidance is not None and args.cfg == "off":
        p.error("--guidance sets the scale of --cfg on; with --cfg off (scale 1.0) it would be ignored")
    if args.min_heldout and args.n < 2:
        p.error(f"--min-heldout: --n {args.n} gives no held-out images (half of --n are held-out): use --n 2 or more")

    for flag, where in (("--json", args.json and Path(args.json).parent), ("--save-dir", args.save_dir)):
        problem = where and _unwritable(Path(where))
        if problem:  # found now, not after minutes of evaluation
            p.error(f"{flag}: {problem}")
    from lumina_jax.convert.errors import CheckpointError
    from lumina_jax.pipeline import Lumina2Pipeline

    try:
        pipe = Lumina2Pipeline.from_pretrained(args.checkpoint)
    except (CheckpointError, OSError, ValueError) as e:  # exit 2: an error, not "accuracy below --min-heldout"
        print(f"eval-shapes: error: {e}", file=sys.stderr)
        return 2
    on = pipe.components.guidance_scale if args.guidance is None else args.guidance
    settings = {"on": on, "off": 1.0}
    names = ["on", "off"] if args.cfg == "both" else [args.cfg]
    kw = {k: v for k, v in (("num_inference_steps", args.steps), ("solver", args.solver), ("time_shift", args.shift))
          if v is not None}  # fmt: skip
    results = {}
    for name in names:
        sd = None if args.save_dir is None else str(Path(args.save_dir) / f"cfg_{name}")
        results[f"cfg_{name}"] = evaluate(pipe, args.n, guidance_scale=settings[name], seed=args.seed,
                                          batch=args.batch, save_dir=sd, **kw)  # fmt: skip
        print(f"cfg {name} (guidance {settings[name]}): {results[f'cfg_{name}']['seconds']} s", flush=True)
    print(f"model: {pipe.components.source}; n={args.n} per setting; held-out triples: see lumina_jax.shapes.spec")
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.min_heldout:
        msg = check_min_heldout(results, args.min_heldout)
        if msg:
            print(msg, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
