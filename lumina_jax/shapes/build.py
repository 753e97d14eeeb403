"""Build the bundled shapes model end to end: ``python -m lumina_jax.shapes {prepare,train-vae,
train-text-encoder,assemble}``.

The shipped model (trained f8 autoencoder stage, random frozen text encoder, no system prompt)::

    python -m lumina_jax.shapes prepare --work data/shapes          # dataset (TFDS), tokenizer, encoders
    python -m lumina_jax.shapes train-vae --work data/shapes --steps 1500   # encoders/vae_f8 (8x, 8 channels)
    python -m lumina_jax train configs/train/shapes.yaml             # the project's trainer, 3 stages
    python -m lumina_jax.shapes assemble --run runs/shapes --work data/shapes \
        --out lumina_jax/assets/default_model                        # EMA weights + encoders -> pipeline dir

Earlier recipes (experiments, BUILD.md): pixel space (``configs/train/shapes_pixel.yaml``, shipped until
session 7; ``assemble --vae vae --shift 6``) and the session-5 latent recipe with two other trained encoders::

    python -m lumina_jax.shapes train-vae --work data/shapes --config configs/model/shapes_vae.yaml \
        --out data/shapes/encoders/vae_f4                             # 4x, 4 channels
    python -m lumina_jax.shapes train-text-encoder --work data/shapes  # encoders/text_encoder_lm (causal LM)
    python -m lumina_jax train configs/train/shapes_latent.yaml
    python -m lumina_jax.shapes assemble --run runs/shapes_latent --work data/shapes \
        --vae vae_f4 --text-encoder text_encoder_lm --shift 6 --out DIR

``prepare`` writes, under ``--work``: ``tfds/shapes_world/1.0.0`` (array_record, see
:mod:`lumina_jax.shapes.tfds_builder`) and ``encoders/{tokenizer,text_encoder,vae}`` (``vae``: the identity
stage of the pixel recipe); ``train-vae`` and ``train-text-encoder`` add ``encoders/vae_f8``
(:mod:`lumina_jax.shapes.vae_train`) and ``encoders/text_encoder_lm`` (:mod:`lumina_jax.shapes.text_train`).
``assemble`` reads the run's latest checkpoint (:func:`lumina_jax.train.loop.restore_weights`), stores the
Next-DiT in bf16 (under the repository's 20 MB budget) and the encoders in fp32, and records the system
prompt the run trained with and the CFG scale (``--guidance``, 2.5) as the pipeline's defaults.
"""

from __future__ import annotations

import dataclasses

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from lumina_jax.config_utils import int_at_least
from lumina_jax.shapes.text_train import TextTrainConfig, train_text_encoder
from lumina_jax.shapes.vae_train import VAE_CONFIG, VAETrainConfig, train_vae

DEFAULT_SHIFT = 3.0  # the shipped model trains its 64 px stage with e^mu = 3
# the shipped model's best CFG scale (eval-shapes n=400, held-out shape: 90 % at 2.5, 85 % at 4; BENCHMARKS.md)
DEFAULT_GUIDANCE = 2.5


def prepare(work: str | Path, *, num_train: int = 16000, num_test: int = 200, overwrite: bool = False) -> dict:
    """Dataset + frozen encoders under ``work``. A dataset already there with other split sizes is a
    ``ValueError`` unless ``overwrite`` (then it is prepared again)."""
    from lumina_jax.shapes import components, tfds_builder

    work = Path(work)
    t0 = time.perf_counter()
    builder_dir = tfds_builder.prepare(work / "tfds", num_train=num_train, num_test=num_test, overwrite=overwrite)
    t_data = time.perf_counter() - t0
    enc = components.save_encoders(work / "encoders")
    info = {"builder_dir": builder_dir, "encoders": {k: str(v) for k, v in enc.items()},
            "dataset_seconds": round(t_data, 1), "total_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    (work / "prepare.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def trained_system_prompt(run: str | Path) -> str:
    """The system prompt (the stage data's ``system_prompt``) of the stage ``run``'s latest checkpoint was
    written in, which the assembled pipeline then uses by default."""
    from lumina_jax.train import checkpoint as ckpt_lib

    ck = ckpt_lib.RunCheckpoints(Path(run) / "checkpoints", read_only=True)
    try:
        step = ck.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {run}/checkpoints")
        meta = ck.read_meta(step)
    finally:
        ck.close()
    return str(meta["config"]["stages"][int(meta["stage"])]["data"]["system_prompt"])


def assemble(run: str | Path, work: str | Path, out: str | Path, *, shift: float = DEFAULT_SHIFT,
             guidance_scale: float = DEFAULT_GUIDANCE, which: str = "ema", transformer_dtype: str = "bf16",
             vae: str = "vae_f8", text_encoder: str = "text_encoder", overwrite: bool = False) -> Path:  # fmt: skip
    """EMA (or raw) weights of the training run ``run`` + the encoders of ``work`` (the autoencoder from
    ``work/encoders/<vae>``: ``vae_f8`` trained, ``vae`` identity stage, ``vae_f4`` session 5; the text
    encoder from ``work/encoders/<text_encoder>``: ``text_encoder`` random, ``text_encoder_lm`` pretrained)
    -> a pipeline directory at ``out`` (scheduler ``shift``; default CFG scale ``guidance_scale``; default
    system prompt: the one the run trained with). The transformer must read the autoencoder's latents and the
    text encoder's width, else a ``ValueError`` says which does not fit."""
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
    g_cfg, g_params = load_text_encoder(work / "encoders" / text_encoder)
    if t_cfg.cap_feat_dim != g_cfg.hidden_size:
        raise ValueError(f"the run's transformer reads {t_cfg.cap_feat_dim}-wide caption features but "
                         f"{work / 'encoders' / text_encoder} is {g_cfg.hidden_size} wide: pass the text encoder "
                         "it was trained with")
    v_cfg, v_params = load_vae(work / "encoders" / vae)
    if t_cfg.in_channels != v_cfg.latent_channels:
        raise ValueError(f"the run's transformer reads {t_cfg.in_channels}-channel latents but "
                         f"{work / 'encoders' / vae} has {v_cfg.latent_channels}: pass the VAE it was trained on")
    tok = load_tokenizer(work / "encoders" / "tokenizer")
    t_cfg = dataclasses.replace(t_cfg, sample_size=64 // v_cfg.downsample_factor)  # the 64 px default, for diffusers
    sched = dict(DEFAULT_SCHEDULER, shift=float(shift))
    comps = Components(t_cfg, t_params, g_cfg, g_params, tok, v_cfg, v_params, sched, 64,
                       "lumina_jax shapes model (python -m lumina_jax.shapes assemble)", "lumina_jax",
                       system_prompt=trained_system_prompt(run), guidance_scale=float(guidance_scale))  # fmt: skip
    comps.check()
    return save_components(out, comps, overwrite=overwrite)


DESCRIPTION = ("Build the bundled shapes model end to end: prepare (dataset + encoders), train-vae, "
               "train-text-encoder, then train with `python -m lumina_jax train configs/train/shapes.yaml` "
               "and assemble the run into a pipeline directory.")
# what `assemble` raises for a missing/mismatched run, encoder or output (reported without a traceback)
ASSEMBLE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError)


def check_output(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Fail before training when ``out`` exists and is not to be replaced (the save would fail after it)."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: pass --overwrite to replace it after training, "
                              f"or another {flag}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lumina_jax.shapes", description=DESCRIPTION)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare", help="dataset (TFDS array_record) + frozen encoders")
    a.add_argument("--work", default="data/shapes")
    a.add_argument("--num-train", type=int_at_least(1), default=16000)
    a.add_argument("--num-test", type=int_at_least(1), default=200)
    a.add_argument("--overwrite", action="store_true",
                   help="prepare the dataset again if WORK/tfds holds one with other split sizes")
    v = sub.add_parser("train-vae",
                       help="train the autoencoder stage (default: 8x, 8 latent channels) into WORK/encoders/vae_f8")
    v.add_argument("--work", default="data/shapes")
    v.add_argument("--out", default=None, help="output directory (default: WORK/encoders/vae_f8)")
    v.add_argument("--steps", type=int_at_least(1), default=VAETrainConfig.steps)
    v.add_argument("--batch", type=int_at_least(1), default=VAETrainConfig.batch)
    v.add_argument("--lr", type=float, default=VAETrainConfig.lr)
    v.add_argument("--seed", type=int, default=VAETrainConfig.seed)
    v.add_argument("--config", default=str(VAE_CONFIG),
                   help="autoencoder model config (YAML; default: configs/model/shapes_vae_f8.yaml)")
    v.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    t = sub.add_parser("train-text-encoder",
                       help="pretrain the tiny Gemma-2 as a causal LM on captions into WORK/encoders/text_encoder_lm")
    t.add_argument("--work", default="data/shapes")
    t.add_argument("--out", default=None, help="output directory (default: WORK/encoders/text_encoder_lm)")
    t.add_argument("--steps", type=int_at_least(1), default=TextTrainConfig.steps)
    t.add_argument("--seed", type=int, default=TextTrainConfig.seed)
    t.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    b = sub.add_parser("assemble", help="run checkpoint + encoders -> pipeline directory")
    b.add_argument("--run", default="runs/shapes")
    b.add_argument("--work", default="data/shapes")
    b.add_argument("--out", default="lumina_jax/assets/default_model")
    b.add_argument("--shift", type=float, default=DEFAULT_SHIFT)
    b.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="the model's default CFG scale")
    b.add_argument("--which", choices=("ema", "params"), default="ema")
    b.add_argument("--transformer-dtype", choices=("bf16", "fp32"), default="bf16")
    b.add_argument("--vae", default="vae_f8",
                   help="autoencoder folder under WORK/encoders (vae_f8: trained, the shipped model's; vae: identity)")
    b.add_argument("--text-encoder", default="text_encoder",
                   help="text encoder folder under WORK/encoders (text_encoder: random, text_encoder_lm: pretrained)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists (e.g. the bundled model)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        p.error("training runs through the project's trainer: python -m lumina_jax train configs/train/shapes.yaml")
    args = p.parse_args(argv)
    from lumina_jax import log_setup

    log_setup.setup(logging.INFO)
    if args.cmd == "train-vae":
        out = Path(args.out) if args.out else Path(args.work) / "encoders" / "vae_f8"
        try:
            check_output(out, args.overwrite)
        except FileExistsError as e:
            v.error(str(e))
        m = train_vae(out, VAETrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed),
                      config_path=args.config, overwrite=args.overwrite)  # fmt: skip
        print(json.dumps({k: v for k, v in m.items() if k != "history"}, indent=2))
        print(f"wrote {out}")
    elif args.cmd == "train-text-encoder":
        out = Path(args.out) if args.out else Path(args.work) / "encoders" / "text_encoder_lm"
        try:
            check_output(out, args.overwrite)
        except FileExistsError as e:
            t.error(str(e))
        m = train_text_encoder(out, Path(args.work) / "encoders" / "tokenizer",
                               TextTrainConfig(steps=args.steps, seed=args.seed), overwrite=args.overwrite)  # fmt: skip
        print(json.dumps({k: v for k, v in m.items() if k != "history"}, indent=2))
        print(f"wrote {out}")
    elif args.cmd == "prepare":
        try:
            info = prepare(args.work, num_train=args.num_train, num_test=args.num_test, overwrite=args.overwrite)
        except ValueError as e:
            a.error(str(e))
        print(json.dumps(info, indent=2))
    else:
        try:
            out = assemble(args.run, args.work, args.out, shift=args.shift, guidance_scale=args.guidance,
                           which=args.which, transformer_dtype=args.transformer_dtype, vae=args.vae,
                           text_encoder=args.text_encoder, overwrite=args.overwrite)  # fmt: skip
        except ASSEMBLE_ERRORS as e:
            print(f"shapes assemble: error: {str(e).replace('overwrite=True', '--overwrite')}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
    return 0
