"""Classifier-free guidance for Lumina-Image 2.0: CFG-Renorm and CFG-Trunc (spec §7.2, §7.3, §11.1-2).

Two families of semantics exist and both are implemented; the **original** ones are the defaults.

CFG-Renorm (rescale the guided velocity ``v = v_u + w (v_c - v_u)`` by the conditional one):

- ``"clamp"`` (original, ``NextDiT.forward_with_cfg``, ``renorm_cfg = ratio``): one L2 norm per *sample*
  over the whole latent ``(H, W, C)``; ``v`` is scaled down to ``ratio * ||v_c||`` when it is longer, and
  never scaled up. The original compares the norms with a Python ``if`` (batch size 1 only); here the
  scale is ``min(1, ratio ||v_c|| / ||v||)`` per sample, the same rule for any batch.
- ``"rows"`` (diffusers ``Lumina2Pipeline``, ``cfg_normalization=True``): one L2 norm per *row* of the
  last axis of diffusers' NCHW latents, i.e. over the **width** for every (batch, channel, row); applied
  always, so it also scales up. Our latents are channels-last ``(B, H, W, C)``, so the width is axis 2.
- ``"none"``: plain CFG.

CFG-Trunc (run guidance only during part of the sampling, then conditional-only forwards):

- ``"time"`` (original): guidance for a model evaluation iff its model time ``t < cfg_trunc``
  (``t`` = the shifted flow time, 0 = noise). With the default shift 6, ``cfg_trunc = 0.25`` keeps CFG for
  roughly the first two thirds of a uniform step grid.
- ``"steps"`` (diffusers, ``cfg_trunc_ratio``): guidance for step ``i`` (0-based, of ``N``) iff
  ``(i + 1) / N <= ratio``, for every evaluation of that step.

Whether an evaluation is guided is decided on the host from the static schedule, so the compiled loop
holds a guided segment (batch ``2B``) and an unguided segment (batch ``B``) -- the unconditional half is
really not computed after truncation (see :mod:`lumina_jax.sample.loop`).
"""

from __future__ import annotations

from typing import Any, Literal, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

RenormMode = Literal["clamp", "rows", "none"]
TruncMode = Literal["time", "steps"]
RENORM_MODES: tuple[str, ...] = ("clamp", "rows", "none")
TRUNC_MODES: tuple[str, ...] = ("time", "steps")


def combine(v_cond: jax.Array, v_uncond: jax.Array, scale: jax.Array | float) -> jax.Array:
    """Plain CFG: ``v_u + w (v_c - v_u)``."""
    return v_uncond + scale * (v_cond - v_uncond)


def renorm_clamp(v: jax.Array, v_cond: jax.Array, ratio: jax.Array | float = 1.0) -> jax.Array:
    """Original CFG-Renorm: per-sample L2 over all non-batch axes; scale down to ``ratio * ||v_c||``
    when ``||v||`` exceeds it, never up."""
    axes = tuple(range(1, v.ndim))
    max_norm = jnp.sqrt(jnp.sum(jnp.square(v_cond), axis=axes, keepdims=True)) * ratio
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))
    scale = jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
    return v * scale


def renorm_rows(v: jax.Array, v_cond: jax.Array, axis: int = 2) -> jax.Array:
    """diffusers CFG-Renorm: ``v * ||v_c|| / ||v||`` with norms over one axis, always applied.

    ``axis=2`` is the width of channels-last ``(B, H, W, C)`` latents, i.e. diffusers' last NCHW axis.
    A row where ``||v|| == 0`` is left unchanged (diffusers would produce NaN there).
    """
    cond_norm = jnp.sqrt(jnp.sum(jnp.square(v_cond), axis=axis, keepdims=True))
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=axis, keepdims=True))
    return v * jnp.where(norm > 0, cond_norm / jnp.where(norm > 0, norm, 1.0), 1.0)


def guided_velocity(v_cond: jax.Array, v_uncond: jax.Array, scale: jax.Array | float,
                    renorm: RenormMode = "clamp", ratio: jax.Array | float = 1.0) -> jax.Array:
    """CFG followed by the chosen renorm (``ratio`` only matters for ``"clamp"``)."""
    v = combine(v_cond, v_uncond, scale)
    if renorm == "clamp":
        return renorm_clamp(v, v_cond, ratio)
    if renorm == "rows":
        return renorm_rows(v, v_cond)
    if renorm == "none":
        return v
    raise ValueError(f"unknown renorm mode {renorm!r}; choose from {RENORM_MODES}")


def resolve_cfg_normalization(value: Union[bool, float, str, None]) -> tuple[str, float]:
    """Map the pipeline's ``cfg_normalization`` argument to ``(renorm_mode, ratio)``.

    - ``True`` (default) / ``"clamp"`` / ``"original"`` -> ``("clamp", 1.0)`` (original semantics);
    - a float ``r > 0`` -> ``("clamp", r)`` (the original ``renorm_cfg`` ratio); ``0`` / ``False`` /
      ``None`` / ``"none"`` -> ``("none", 0.0)``;
    - ``"rows"`` / ``"diffusers"`` -> ``("rows", 1.0)`` (diffusers semantics).
    """
    if value is None or value is False:
        return "none", 0.0
    if value is True:
        return "clamp", 1.0
    if isinstance(value, str):
        key = value.lower()
        table = {"clamp": ("clamp", 1.0), "original": ("clamp", 1.0), "rows": ("rows", 1.0),
                 "diffusers": ("rows", 1.0), "none": ("none", 0.0), "off": ("none", 0.0)}  # fmt: skip
        if key not in table:
            raise ValueError(f"cfg_normalization={value!r}: use True/False, a ratio > 0, or one of {sorted(table)}")
        return table[key]
    ratio = float(value)
    if ratio < 0 or not np.isfinite(ratio):
        raise ValueError(f"cfg_normalization ratio must be a finite number >= 0, got {value!r}")
    return ("clamp", ratio) if ratio > 0 else ("none", 0.0)


def real_number(name: str, value: Any) -> float:
    """``value`` as a float when it is a real number (NumPy scalars and 0-d arrays too); a string or a bool
    is refused (``float("0.25")`` and ``float(True)`` would run)."""
    if np.ndim(value) == 0 and hasattr(value, "dtype") and not isinstance(value, (np.generic,)):
        value = np.asarray(value)[()]  # a 0-d NumPy or JAX array: its scalar
    if isinstance(value, (bool, np.bool_, str, bytes)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def guidance_flags(eval_times: np.ndarray, *, guidance_scale: float, cfg_trunc_ratio: float,
                   trunc_mode: TruncMode = "time", clamp_ratio: float = 1.0,
                   off_at_or_below_one: bool = False) -> tuple[tuple[bool, ...], ...]:
    """Which model evaluations run with CFG: a static ``(num_steps, evals_per_step)`` tuple of bools.

    ``eval_times`` ``(num_steps, evals_per_step)`` holds the model time (0 = noise) of each evaluation.
    No evaluation is guided when ``guidance_scale == 1`` (the guided velocity is then exactly the
    conditional one; the original would spend the batched forward anyway) -- unless a CFG-Renorm clamp
    ``clamp_ratio < 1`` applies, which scales even that velocity by the ratio inside the guidance window.
    Other scales, below 1 too, are guided as in the original; ``off_at_or_below_one`` is diffusers' rule
    (no CFG for any scale ``<= 1``; ``preset="diffusers"`` sets it).

    ``trunc_mode="time"`` compares the evaluation times, computed in float64, with the ratio; where a time
    equals the ratio exactly in exact arithmetic (e.g. shift 6, ratio 0.25 at the grid point 2/3) the
    original's float32 grid can round it to either side, so it may guide one evaluation more or fewer (with
    shift 6 and ratio 0.25, at every step count that is a multiple of 3: the original guides the evaluation
    at 2/3, which its float32 grid puts at 0.24999998; here exactly 0.25 is not guided).
    """
    eval_times = np.asarray(eval_times, np.float64)
    if eval_times.ndim != 2:
        raise ValueError(f"eval_times must be (num_steps, evals_per_step), got shape {eval_times.shape}")
    n, k = eval_times.shape
    if trunc_mode not in TRUNC_MODES:
        raise ValueError(f"unknown cfg truncation mode {trunc_mode!r}; choose from {TRUNC_MODES}")
    cfg_trunc_ratio = real_number("cfg_trunc_ratio", cfg_trunc_ratio)
    guidance_scale = real_number("guidance_scale", guidance_scale)
    clamp_ratio = real_number("cfg_clamp_ratio", clamp_ratio)
    if not 0.0 <= cfg_trunc_ratio <= 1.0:  # NaN fails too
        raise ValueError(f"cfg_trunc_ratio must be in [0, 1] (1: guidance at every step, 0: none), got "
                         f"{cfg_trunc_ratio!r}")  # fmt: skip
    if not abs(guidance_scale) <= float(np.finfo(np.float32).max):  # the guidance runs in float32; NaN fails too
        raise ValueError(f"guidance_scale must be a finite number (within float32), got {guidance_scale!r}")
    if float(guidance_scale) == 1.0 and not float(clamp_ratio) < 1.0 or off_at_or_below_one and guidance_scale <= 1:
        on = np.zeros((n, k), bool)
    elif trunc_mode == "time":
        on = eval_times < float(cfg_trunc_ratio)
    else:
        # Exact rational comparison of (i+1)/N <= ratio, as diffusers does in float.
        on = np.repeat(((np.arange(n) + 1) / n <= float(cfg_trunc_ratio))[:, None], k, axis=1)
    return tuple(tuple(bool(b) for b in row) for row in on)


def guided_evaluations(flags: Sequence[Sequence[bool]]) -> int:
    """Number of model evaluations that run with CFG."""
    return int(sum(sum(row) for row in flags))
