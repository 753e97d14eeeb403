"""Training loop for the shapes model: ``python -m lumina_jax.shapes train configs/train/shapes.yaml``.

Why not ``python -m lumina_jax train`` (yet): the project trainer's ``latent_cache`` path (and
``preprocess``) only accepts a FLUX VAE (8x, 16 channels), and its ``images`` path
(:class:`lumina_jax.train.data.FrozenEncoders`) encodes ``batch["prompts"]`` -- which the data pipeline
already prefixed with the item's system prompt -- with ``TextEncoder.encode``'s default ``"real"`` system
prompt again, so training text would be ``real + base + caption`` while the pipeline samples with
``real + caption``. This loop is the trainer's recipe with those two points done right, and everything
else shared with the project:

* the config is a :class:`lumina_jax.train.config.TrainConfig` YAML (``load_config``, ``key=value``
  overrides), stages with their own resolution / steps / batch / LR;
* data: the ``shapes_world`` TFDS builder directory read by :class:`lumina_jax.data.sources.TfdsSource`
  through the grain :class:`lumina_jax.data.DataPipeline` (best-fit crop to the stage resolution, caption
  dropout 10 %, ``real`` system prompt), then the frozen encoders (identity AutoencoderKL, tiny Gemma-2
  with ``system_prompt="empty"`` since the prompt already carries it);
* loss: :func:`lumina_jax.train.step.make_loss_fn` (rectified flow + optional auxiliary pooled loss, the
  resolution-dependent time shift of :mod:`lumina_jax.train.objective`), optimizer
  :func:`lumina_jax.train.optim.make_optimizer` + :func:`lr_schedule`, EMA :func:`ema_update`.

Output in ``run_dir``: ``transformer/`` and ``transformer_ema/`` (Next-DiT ``"jax"`` format) and
``train_log.jsonl`` (loss per ``log.every`` steps, seconds).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("lumina_jax.shapes.train")


class Encoders:
    """Frozen identity-VAE encoder + Gemma-2 (prompts already carry their system prompt)."""

    def __init__(self, vae_path: str, text_encoder_path: str, tokenizer_path: Optional[str], max_len: int = 128):
        import jax
        import jax.numpy as jnp

        from lumina_jax.convert.vae import load_vae
        from lumina_jax.models.vae import AutoencoderKL
        from lumina_jax.text import TextEncoder

        self.vae_config, params = load_vae(vae_path)
        self.vae_params = jax.device_put(params)
        self.text = TextEncoder.from_pretrained(text_encoder_path, tokenizer_path, dtype="fp32")
        self.max_len = max_len
        model, cfg = AutoencoderKL(self.vae_config), self.vae_config

        @jax.jit
        def encode(p, images):
            return cfg.scale_latents(model.apply({"params": p}, images, method=AutoencoderKL.encode).mode())

        self._encode = encode
        del jnp

    def __call__(self, batch: dict) -> dict:
        lat = np.asarray(self._encode(self.vae_params, np.asarray(batch["images"], np.float32)))
        feats, mask = self.text.encode(list(batch["prompts"]), system_prompt="empty", max_length=self.max_len)
        return {"latents": lat, "cap_feats": np.asarray(feats, np.float32), "cap_mask": np.asarray(mask),
                "valid": np.ones((lat.shape[0],), bool)}  # fmt: skip


def stage_iterator(stage, seed: int, index: int):
    from lumina_jax.data import DataPipeline, PipelineConfig
    from lumina_jax.data.sources import TfdsSource

    d = stage.data
    sources = [TfdsSource(builder_dir=p, system_prompt="real", key_key="key") for p in d.paths]
    pc = PipelineConfig(resolution=stage.resolution, batch_size=stage.batch, seed=(seed * 1000 + index) % 2**32,
                        shuffle=d.shuffle, caption_dropout=d.caption_dropout, shard_index=0, shard_count=1,
                        num_workers=d.num_workers, read_threads=d.read_threads)  # fmt: skip
    return iter(DataPipeline(sources, pc))


def train(config: str, overrides: Sequence[str] = (), *, max_seconds: Optional[float] = None) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from lumina_jax.convert.nextdit import save_transformer
    from lumina_jax.models.nextdit import NextDiT, init_params
    from lumina_jax.train import objective as obj
    from lumina_jax.train.config import load_config, load_model_config
    from lumina_jax.train.optim import ema_update, lr_schedule, make_optimizer, stage_hparams
    from lumina_jax.train.step import StepConfig, make_loss_fn

    cfg = load_config(config, overrides)
    mcfg = load_model_config(cfg)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    d0 = cfg.stages[0].data
    enc = Encoders(d0.vae, d0.text_encoder, d0.tokenizer, d0.max_text_len)
    factor = enc.vae_config.downsample_factor
    model = NextDiT(mcfg, dtype=jnp.float32 if cfg.dtype == "float32" else jnp.bfloat16, attention_backend="xla")
    params = init_params(mcfg, cfg.seed)
    tx = make_optimizer(cfg.optimizer)
    opt_state = tx.init(params)
    ema = jax.tree.map(lambda x: x, params) if cfg.ema_decay is not None else None
    lr_fn = lr_schedule(cfg.optimizer)
    t_start = time.perf_counter()
    logf = open(run / "train_log.jsonl", "w")
    step, history = 0, []
    for si, stage in enumerate(cfg.stages):
        tokens = (stage.resolution // (factor * mcfg.patch_size)) ** 2
        mu = obj.shift_mu(tokens) if cfg.objective.time_shift else None
        scfg = StepConfig(seed=cfg.seed, t_sampling=cfg.objective.t_sampling, mu=mu,
                          aux_loss_weight=cfg.objective.aux_loss_weight, aux_pool=cfg.objective.aux_pool)  # fmt: skip
        loss_fn = make_loss_fn(model, scfg)
        hp = stage_hparams(stage.lr if stage.lr is not None else cfg.optimizer.lr, step, stage.steps)
        decay = cfg.ema_decay

        @jax.jit
        def train_step(params, opt_state, ema, batch, step, hp):
            rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)
            (loss, (main, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
            updates, opt_state = tx.update(grads, opt_state, params)
            lr = lr_fn(step, hp)
            params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
            if ema is not None:
                ema = ema_update(ema, params, decay)
            return params, opt_state, ema, {"loss": loss, "main": main, "aux": aux, "lr": lr,
                                             "grad_norm": optax.global_norm(grads)}  # fmt: skip

        it = stage_iterator(stage, cfg.seed, si)
        log.info("stage %d %r: %d px (%d image tokens), %d steps, batch %d, mu=%s", si, stage.name, stage.resolution,
                 tokens, stage.steps, stage.batch, mu)  # fmt: skip
        acc, t_stage = [], time.perf_counter()
        for k in range(stage.steps):
            batch = enc(next(it))
            params, opt_state, ema, m = train_step(params, opt_state, ema, batch, np.int32(step), hp)
            acc.append(float(m["main"]))
            step += 1
            if step % cfg.log.every == 0 or k == stage.steps - 1:
                rec = {"step": step, "stage": stage.name, "loss": float(np.mean(acc)), "aux": float(m["aux"]),
                       "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                       "seconds": round(time.perf_counter() - t_start, 1)}  # fmt: skip
                if not math.isfinite(rec["loss"]):
                    raise FloatingPointError(f"non-finite loss at step {step}")
                history.append(rec)
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log.info("step %d %s loss %.4f (aux %.4f) lr %.2e gnorm %.2f %.0fs", step, stage.name, rec["loss"],
                         rec["aux"], rec["lr"], rec["grad_norm"], rec["seconds"])  # fmt: skip
                acc = []
            if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
                log.warning("stopping at step %d: max_seconds=%s reached", step, max_seconds)
                break
        log.info("stage %s done in %.0fs", stage.name, time.perf_counter() - t_stage)
    logf.close()
    host = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32), t)  # noqa: E731
    save_transformer(run / "transformer", mcfg, host(params), "jax", overwrite=True)
    if ema is not None:
        save_transformer(run / "transformer_ema", mcfg, host(ema), "jax", overwrite=True)
    summary = {"steps": step, "seconds": round(time.perf_counter() - t_start, 1),
               "final_loss": history[-1]["loss"] if history else None, "run_dir": str(run)}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lumina_jax.shapes train")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--max-seconds", type=float, default=None)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    print(json.dumps(train(args.config, args.overrides, max_seconds=args.max_seconds), indent=2))
    return 0
