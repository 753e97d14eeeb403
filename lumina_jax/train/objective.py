"""Rectified-flow training objective of Lumina-Image 2.0 (spec §6.1-6.2; [ORIG] ``transport/``).

Conventions (as the model, spec §2.11): ``t`` in [0, 1], 0 = noise, 1 = data.

    x0 ~ N(0, I) (noise), x1 = data latent
    x_t = t * x1 + (1 - t) * x0
    target = x1 - x0                          (velocity)
    loss_i = mean over the sample's elements of (v_theta(x_t, t) - target)^2   (no weighting)

``t`` is drawn ``uniform`` or ``lognorm`` (``sigmoid(N(0, 1))``), then shifted towards noise with the
resolution-dependent shift (``do_shift``, on by default in [ORIG]):

    mu = lin(seq_len), lin(256) = 0.5, lin(4096) = 1.15, seq_len = (resolution // 16)^2
    sigma = 1 - t ; sigma' = e^mu * sigma / (e^mu * sigma + 1 - sigma) ; t' = 1 - sigma'

The auxiliary loss (spec §6.2) runs the whole model again on the 4x average-pooled latent with an
independent ``t`` and noise, the same captions and the same shift (``mu`` of the main resolution), and is
added with weight 1.

Caption dropout (10 % of captions replaced by the empty prompt, for classifier-free guidance) is the
data pipeline's job (:class:`lumina_jax.data.PipelineConfig` ``caption_dropout``), not the loss's.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

T_SAMPLINGS = ("uniform", "lognorm")

# lin(seq_len) through (256, 0.5) and (4096, 1.15) ([ORIG] transport ``get_lin_function``)
_X1, _Y1, _X2, _Y2 = 256, 0.5, 4096, 1.15


def shift_mu(seq_len: int | float) -> float:
    """``mu`` of the resolution-dependent shift for ``seq_len`` image tokens."""
    m = (_Y2 - _Y1) / (_X2 - _X1)
    return m * seq_len + (_Y1 - m * _X1)


def seq_len_for_resolution(resolution: int, pixels_per_token: int = 16) -> int:
    """Image tokens of a square ``resolution`` image: ``(resolution // 16)^2`` (4096 at 1024 px)."""
    return (resolution // pixels_per_token) ** 2


def time_shift(t: jax.Array, mu: float) -> jax.Array:
    """Shift ``t`` towards noise: sigma' = e^mu sigma / (e^mu sigma + 1 - sigma), t' = 1 - sigma'.

    Evaluated as the equivalent ``t' = t / (e^mu (1 - t) + t)``, exact at both ends in floating point.
    """
    s = math.exp(mu)
    return t / (s * (1.0 - t) + t)


def sample_t(rng: jax.Array, batch: int, kind: str = "lognorm", mu: Optional[float] = None) -> jax.Array:
    """``(batch,)`` fp32 flow times: ``uniform`` U[0, 1] or ``lognorm`` sigmoid(N(0, 1)), then shifted
    by ``mu`` unless it is None."""
    if kind == "uniform":
        t = jax.random.uniform(rng, (batch,), jnp.float32)
    elif kind == "lognorm":
        t = jax.nn.sigmoid(jax.random.normal(rng, (batch,), jnp.float32))
    else:
        raise ValueError(f"unknown t sampling {kind!r}; choose from {T_SAMPLINGS}")
    return time_shift(t, mu) if mu is not None else t


def interpolate(x1: jax.Array, x0: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x_t = t x1 + (1 - t) x0`` and the velocity target ``x1 - x0`` (t broadcast over non-batch axes)."""
    tb = t.reshape((-1,) + (1,) * (x1.ndim - 1))
    return tb * x1 + (1.0 - tb) * x0, x1 - x0


def avg_pool(latents: jax.Array, factor: int = 4, multiple: int = 1) -> jax.Array:
    """``(B, H, W, C)`` -> ``(B, H/f, W/f, C)`` average pooling (``nn.AvgPool2d(f)``; floor like PyTorch),
    then centre-cropped to sides that are multiples of ``multiple`` (the model's patch size).

    The crop is a deviation the original never needs: its crop sizes (spec §6.5: ``side // 32`` even)
    pool to even latent sides, while the staircase rule we follow (:mod:`lumina_jax.data.crops`) also
    yields sizes such as 496x128 px (latent 62x16 -> pooled 15x4), whose odd side the patch-2 model
    cannot embed; there one pooled row/column (a 4-latent, 32 px strip of the image) is left out of the
    auxiliary loss.
    """
    b, h, w, c = latents.shape
    h2, w2 = h // factor, w // factor
    if h2 < multiple or w2 < multiple:
        raise ValueError(f"latents {h}x{w} pool by {factor} to {h2}x{w2}, smaller than the patch size {multiple}")
    x = latents[:, : h2 * factor, : w2 * factor].reshape(b, h2, factor, w2, factor, c).mean(axis=(2, 4))
    dh, dw = h2 % multiple, w2 % multiple
    return x[:, dh // 2 : h2 - (dh - dh // 2), dw // 2 : w2 - (dw - dw // 2)]


def poolable(grid: Any, factor: int, patch: int) -> Any:
    """Whether samples of token grid ``grid`` (``(..., 2)`` = ``(gh, gw)``, traced or not) pool by
    ``factor`` to at least one ``patch`` x ``patch`` token (what :func:`avg_pool` / :func:`pool_tokens`
    need): samples below it have no auxiliary term (crop sides under 64 px at factor 4, patch 2)."""
    side = (patch * grid) // factor // patch
    return (side[..., 0] >= 1) & (side[..., 1] >= 1)


def pool_tokens(tokens: jax.Array, grid: jax.Array, factor: int, patch: int) -> tuple[jax.Array, jax.Array]:
    """:func:`avg_pool` for token-packed mixed-size batches.

    ``tokens`` ``(B, T, p*p*C)``: sample ``i``'s latent ``(p*gh_i, p*gw_i, C)`` as row-major ``p x p``
    patches (:func:`lumina_jax.data.batching.patchify`), ``grid`` ``(B, 2)`` = ``(gh_i, gw_i)`` (traced).
    Returns ``(pooled, pooled_grid)``: each sample's latent pooled by ``factor``, centre-cropped to
    multiples of ``patch`` exactly as :func:`avg_pool`, re-patchified and packed into ``T // factor**2``
    tokens (zeros past each sample's grid), and the pooled grids. A sample too small to pool to one
    patch gets the grid ``(0, 0)`` (no tokens), so callers weight it out.

    One gather of ``factor**2`` latent values per pooled value (the same number of elements as
    ``tokens``), so shapes stay static whatever the sizes in the batch.
    """
    b, t, d = tokens.shape
    p, f = patch, factor
    c = d // (p * p)
    if c * p * p != d:
        raise ValueError(f"token width {d} is not patch {p} x {p} x channels")
    t2 = t // (f * f)
    if t2 < 1:
        raise ValueError(f"{t} tokens per sample pool by {f} to less than one token")
    grid = grid.astype(jnp.int32)
    pooled_side = (p * grid) // f  # (B, 2) pooled latent sides, floor like nn.AvgPool2d
    crop = pooled_side % p
    grid2 = (pooled_side - crop) // p  # (B, 2) pooled token grid after the centre crop
    grid2 = jnp.where(jnp.all(grid2 >= 1, axis=1, keepdims=True), grid2, 0)
    off = crop // 2  # (B, 2) pooled pixels cropped at the top / left

    n2 = jnp.arange(t2, dtype=jnp.int32)
    gw2 = jnp.maximum(grid2[:, 1:2], 1)
    a, bb = n2[None] // gw2, n2[None] % gw2  # (B, T2) pooled token row / column
    u = jnp.arange(p, dtype=jnp.int32)
    r = jnp.arange(f, dtype=jnp.int32)
    # latent row of (pooled token a, sub-row u, pooling offset r): ((off + a*p + u) * f + r)
    y = ((off[:, 0, None, None, None] + a[:, :, None, None] * p + u[None, None, :, None]) * f
         + r[None, None, None, :])  # (B, T2, p, f)  # fmt: skip
    x = ((off[:, 1, None, None, None] + bb[:, :, None, None] * p + u[None, None, :, None]) * f
         + r[None, None, None, :])  # (B, T2, p, f)  # fmt: skip
    gw = grid[:, 1, None, None, None, None, None]
    y6, x6 = y[:, :, :, :, None, None], x[:, :, None, None, :, :]  # (B, T2, p_u, f_r, p_v, f_s)
    token = (y6 // p) * gw + (x6 // p)
    within = (y6 % p) * p + (x6 % p)
    flat = (token * (p * p) + within).reshape(b, -1)  # index into (T * p * p) latent values
    live = (n2[None] < grid2[:, 0:1] * grid2[:, 1:2])  # (B, T2)
    flat = jnp.where(jnp.repeat(live, p * p * f * f, axis=1), flat, 0)
    values = tokens.reshape(b, t * p * p, c)
    g = jnp.take_along_axis(values, flat[..., None], axis=1)  # (B, T2*p*f*p*f, C)
    g = g.reshape(b, t2, p, f, p, f, c).astype(jnp.float32).mean(axis=(3, 5))  # (B, T2, p_u, p_v, C)
    pooled = g.reshape(b, t2, p * p * c) * live[..., None]
    return pooled, grid2


def flow_loss(
    apply_fn: Callable[[jax.Array, jax.Array], jax.Array],
    latents: jax.Array,
    rng: jax.Array,
    *,
    t_sampling: str = "lognorm",
    mu: Optional[float] = None,
) -> jax.Array:
    """Per-sample rectified-flow MSE ``(B,)`` (fp32) of ``apply_fn(x_t, t) -> velocity``."""
    k_t, k_n = jax.random.split(rng)
    x1 = latents.astype(jnp.float32)
    t = sample_t(k_t, x1.shape[0], t_sampling, mu)
    x0 = jax.random.normal(k_n, x1.shape, jnp.float32)
    xt, target = interpolate(x1, x0, t)
    pred = apply_fn(xt, t).astype(jnp.float32)
    return jnp.mean(jnp.square(pred - target), axis=tuple(range(1, x1.ndim)))
