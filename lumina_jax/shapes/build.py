"""Build the bundled shapes model end to end: ``python -m lumina_jax.shapes {prepare,assemble}``.

    python -m lumina_jax.shapes prepare --work data/shapes          # dataset (TFDS), encoders
    python -m lumina_jax train configs/train/shapes.yaml             # the project's trainer, 2 stages
    python -m lumina_jax.shapes assemble --run runs/shapes --work data/shapes \\
        --out lumina_jax/assets/default_model                        # EMA weights + encoders -> pipeline dir

``prepare`` writes, under ``--work``: ``tfds/shapes_world/1.0.0`` (array_record, see
:mod:`lumina_jax.shapes.tfds_builder`) and ``encoders/{tokenizer,text_encoder,vae}``. ``assemble``
reads the run's latest checkpoint (:func:`lumina_jax.train.loop.restore_weights`), stores the Next-DiT
in bf16 (7.5M params: 15 MB, under the repository's 20 MB budget) and the encoders in fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_SHIFT = 6.0


def prepare(work: str | Path, *, num_train: int = 16000, num_test: int = 200) -> dict:  # fmt: skip
    from lumina_jax.shapes import components, tfds_builder

    work = Path(work)
    t0 = time.perf_counter()
    builder_dir = tfds_builder.prepare(work / "tfds", num_train=num_train, num_test=num_test)
    t_data = time.perf_counter() - t0
    enc = components.save_encoders(work / "encoders")
    info = {"builder_dir": builder_dir, "encoders": {k: str(v) for k, v in enc.items()},
            "dataset_seconds": round(t_data, 1), "total_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    (work / "prepare.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def assemble(run: str | Path, work: str | Path, out: str | Path, *, shift: float = DEFAULT_SHIFT,
             which: str = "ema", transformer_dtype: str = "bf16", overwrite: bool = True) -> Path:  # fmt: skip
    """EMA (or raw) weights of the training run ``run`` + the encoders of ``work`` -> a lumina_jax
    pipeline directory at ``out``."""
    import jax
    import numpy as np

    from lumina_jax.convert.common import resolve_dtype
    from lumina_jax.convert.components import DEFAULT_SCHEDULER, Components, save_components
    from lumina_jax.convert.gemma2 import load_text_encoder
    from lumina_jax.convert.vae import load_vae
    from lumina_jax.text import load_tokenizer
    from lumina_jax.train.loop import restore_weights

    work = Path(work)
    t_cfg, t_params = restore_weights(run, which=which)
    dt = resolve_dtype(transformer_dtype)
    t_params = jax.tree.map(lambda a: np.asarray(a).astype(dt), t_params)
    g_cfg, g_params = load_text_encoder(work / "encoders" / "text_encoder")
    v_cfg, v_params = load_vae(work / "encoders" / "vae")
    tok = load_tokenizer(work / "encoders" / "tokenizer")
    sched = dict(DEFAULT_SCHEDULER, shift=float(shift))
    comps = Components(t_cfg, t_params, g_cfg, g_params, tok, v_cfg, v_params, sched, 64,
                       "lumina_jax shapes model (python -m lumina_jax.shapes assemble)", "lumina_jax")  # fmt: skip
    comps.check()
    return save_components(out, comps, overwrite=overwrite)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lumina_jax.shapes", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare", help="dataset (TFDS array_record) + frozen encoders")
    a.add_argument("--work", default="data/shapes")
    a.add_argument("--num-train", type=int, default=16000)
    a.add_argument("--num-test", type=int, default=200)
    b = sub.add_parser("assemble", help="run checkpoint + encoders -> pipeline directory")
    b.add_argument("--run", default="runs/shapes")
    b.add_argument("--work", default="data/shapes")
    b.add_argument("--out", default="lumina_jax/assets/default_model")
    b.add_argument("--shift", type=float, default=DEFAULT_SHIFT)
    b.add_argument("--which", choices=("ema", "params"), default="ema")
    b.add_argument("--transformer-dtype", choices=("bf16", "fp32"), default="bf16")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        p.error("training runs through the project's trainer: python -m lumina_jax train configs/train/shapes.yaml")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.cmd == "prepare":
        print(json.dumps(prepare(args.work, num_train=args.num_train, num_test=args.num_test), indent=2))
    else:
        out = assemble(args.run, args.work, args.out, shift=args.shift, which=args.which,
                       transformer_dtype=args.transformer_dtype)  # fmt: skip
        print(f"wrote {out}")
    return 0
