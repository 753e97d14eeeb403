"""``python -m lumina_jax eval-shapes``: generate images of the shapes world and score them.

    python -m lumina_jax eval-shapes --n 200                  # bundled model, default sampler, CFG on and off
    python -m lumina_jax eval-shapes --n 200 --checkpoint DIR --cfg on --json out.json --save-dir out/

Half of the ``n`` prompts describe *held-out* scenes (a colour/shape/position triple never seen in training,
:data:`lumina_jax.shapes.spec.HELD_OUT`), half *seen* ones; the scenes are fixed (seeded), the caption
phrasing varies. Images come from :class:`lumina_jax.pipeline.Lumina2Pipeline` with its default settings
(solver, steps, CFG scale 4.0 for "on", 1.0 = no CFG for "off") and are scored by the deterministic
checker :mod:`lumina_jax.shapes.checker` (colour by pixel clustering, shape by geometry, position by
centroid). Prints accuracy per attribute (per object), background, object count and all-correct (per
image) for seen vs held-out. Exit status 0 (1 with ``--min-heldout`` thresholds not met).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


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
    from lumina_jax.shapes import checker

    items = prompts_for(n, seed)
    images = []
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        out = pipe([c for _, _, c in chunk], guidance_scale=guidance_scale, seed=seed * 100_000 + i,
                   output_type="np", **kwargs)  # fmt: skip
        images.extend((np.clip(np.asarray(out.images), 0, 1) * 255).round().astype(np.uint8))
    seconds = time.perf_counter() - t0
    res = {}
    for split in ("seen", "held_out"):
        idx = [k for k, it in enumerate(items) if it[0] == split]
        res[split] = checker.check_many([images[k] for k in idx], [items[k][1] for k in idx])
    res["seconds"] = round(seconds, 1)
    if save_dir:
        from PIL import Image

        d = Path(save_dir)
        d.mkdir(parents=True, exist_ok=True)
        for k, (split, scene, cap) in enumerate(items):
            ok = checker.check(images[k], scene).all_correct
            Image.fromarray(images[k]).save(d / f"{k:04d}_{split}_{'ok' if ok else 'bad'}.png")
        (d / "prompts.json").write_text(json.dumps([{"file": f"{k:04d}", "split": s, "prompt": c}
                                                    for k, (s, _, c) in enumerate(items)], indent=1))  # fmt: skip
    return res


def format_table(results: dict[str, dict]) -> str:
    cols = ("colour", "shape", "position", "background", "count", "all")
    lines = [f"{'setting':10s} {'split':9s} " + " ".join(f"{c:>10s}" for c in cols) + "    images"]
    for name, r in results.items():
        for split in ("held_out", "seen"):
            m = r[split]
            lines.append(f"{name:10s} {split:9s} " + " ".join(f"{100 * m[c]:9.1f}%" for c in cols)
                         + f"    {m['n_images']}")  # fmt: skip
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lumina_jax eval-shapes", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200, help="images per setting (half held-out, half seen)")
    p.add_argument("--checkpoint", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--cfg", choices=("on", "off", "both"), default="both",
                   help="CFG on (the model's guidance scale, or --guidance), off (1.0) or both")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale for --cfg on (default: the model's; 2.5 for the bundled model)")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: the pipeline's)")
    p.add_argument("--solver", default=None)
    p.add_argument("--shift", type=float, default=None, help="sampler time shift (default: the model's scheduler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--save-dir", default=None, help="write the images here")
    p.add_argument("--min-heldout", default=None,
                   help="colour,shape,position minimum held-out accuracies with CFG on, e.g. 0.9,0.8,0.8")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))

    from lumina_jax.pipeline import Lumina2Pipeline

    pipe = Lumina2Pipeline.from_pretrained(args.checkpoint)
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
    if args.min_heldout and "cfg_on" in results:
        mins = [float(x) for x in args.min_heldout.split(",")]
        got = [results["cfg_on"]["held_out"][a] for a in ("colour", "shape", "position")]
        if any(g < m for g, m in zip(got, mins)):
            print(f"held-out accuracies {got} below {mins}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
