"""Train the shapes model's autoencoder stage: ``python -m lumina_jax.shapes train-vae``.

A small FLUX-architecture ``AutoencoderKL`` (default ``configs/model/shapes_vae_f8.yaml``, the shipped
model's: 8x down-sampling, 8 latent channels; ``configs/model/shapes_vae.yaml``: 4x, 4 channels, session 5)
trained on rendered *training* scenes of the shapes world (held-out combinations are never rendered, so
the autoencoder cannot leak them), at 64 px and 32 px (the resolutions of the DiT's progressive stages).
Loss: L1 + MSE reconstruction of a posterior *sample* plus a small KL term, which keeps the latents smooth
and their scale bounded, as for latent-diffusion autoencoders. After training,
``shift_factor`` and ``scaling_factor`` are set from the latents of held-back training scenes
(mean and 1 / std), so the DiT sees roughly unit-variance latents; the result is written in diffusers'
layout (:func:`lumina_jax.convert.vae.save_vae`), the format the trainer and pipeline load.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from lumina_jax.shapes import spec
from lumina_jax.shapes.fit import adamw_cosine, run_steps

VAE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "model" / "shapes_vae_f8.yaml"  # the shipped model's
VAE_F4_CONFIG = VAE_CONFIG.with_name("shapes_vae.yaml")  # the session-5 latent experiment's (4x, 4 channels)


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 1200
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 50
    kl_weight: float = 1e-4
    small_every: int = 4  # every n-th step trains on 32 px renders (0: never)
    calib_images: int = 256  # fresh training scenes that set shift_factor / scaling_factor
    seed: int = 0


def render_batch(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``(n, size, size, 3)`` float32 in [-1, 1]: random *training* scenes (jittered as in the dataset)."""
    imgs = [spec.render(spec.random_scene(rng, held_out=False), size=size, rng=rng) for _ in range(n)]
    return np.stack(imgs).astype(np.float32) / 127.5 - 1.0


def train_vae(out_dir: str | Path, cfg: VAETrainConfig = VAETrainConfig(), *, config_path: str | Path = VAE_CONFIG,
              progress: bool = True, overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Train, calibrate the latent scaling, save to ``out_dir`` (diffusers layout); returns metrics.
    An existing ``out_dir`` is a ``FileExistsError`` before training, unless ``overwrite`` (then replaced)."""
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    import jax
    import jax.numpy as jnp
    import optax

    from lumina_jax.convert.vae import save_vae
    from lumina_jax.models.vae import AutoencoderKL, VAEConfig

    vcfg = VAEConfig.from_yaml(config_path)
    model = AutoencoderKL(vcfg)
    rng = np.random.default_rng([cfg.seed, 77])
    params = model.init(jax.random.PRNGKey(cfg.seed), jnp.zeros((1, 32, 32, 3)))["params"]
    opt = adamw_cosine(cfg.lr, cfg.warmup, cfg.steps, b2=0.99)
    opt_state = opt.init(params)

    def loss_fn(p, x, key):
        post = model.apply({"params": p}, x, method=AutoencoderKL.encode)
        rec = model.apply({"params": p}, post.sample(key), method=AutoencoderKL.decode)
        l1 = jnp.mean(jnp.abs(rec - x))
        mse = jnp.mean((rec - x) ** 2)
        kl = jnp.mean(post.kl()) / (x.shape[1] * x.shape[2])  # per pixel
        return l1 + mse + cfg.kl_weight * kl, (l1, mse, kl)

    @jax.jit
    def step(p, s, x, key):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, key)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss, aux

    key = jax.random.PRNGKey(cfg.seed + 1)
    t0 = time.perf_counter()
    state = {"params": params, "opt": opt_state, "key": key}

    def one_step(i: int) -> dict[str, Any]:
        size = 32 if cfg.small_every and i % cfg.small_every == cfg.small_every - 1 else 64
        state["key"], sub = jax.random.split(state["key"])
        state["params"], state["opt"], loss, (l1, mse, kl) = step(
            state["params"], state["opt"], render_batch(rng, cfg.batch, size), sub)
        return {"loss": loss, "l1": l1, "mse": mse, "kl": kl}

    hist = run_steps(cfg.steps, one_step, desc="train-vae", every=50, progress=progress)
    params = state["params"]

    # calibrate: latents of fresh training scenes -> shift = mean, scaling = 1 / std
    enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode).mode())
    dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))
    x = render_batch(np.random.default_rng([cfg.seed, 78]), cfg.calib_images, 64)
    z = np.asarray(enc(params, x))
    rec = np.clip(np.asarray(dec(params, z)), -1, 1)
    shift, scale = float(z.mean()), float(1.0 / z.std())
    vcfg = dataclasses.replace(vcfg, shift_factor=round(shift, 4), scaling_factor=round(scale, 4))
    metrics = {
        "steps": cfg.steps, "seconds": round(time.perf_counter() - t0, 1),
        "recon_l1_64px": float(np.abs(rec - x).mean()), "recon_psnr_64px": float(10 * np.log10(4.0 / np.mean((rec - x) ** 2))),
        "latent_mean": shift, "latent_std": float(z.std()), "history": hist, "config": dataclasses.asdict(cfg),
    }  # fmt: skip
    out_dir = Path(out_dir)
    save_vae(out_dir, vcfg, jax.tree.map(np.asarray, params), overwrite=overwrite)
    (out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics
