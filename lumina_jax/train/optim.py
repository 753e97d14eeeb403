"""Optimizer, learning-rate schedules, EMA and the trainable-parameter filter (spec §6.3).

AdamW as the original: betas (0.9, 0.95), eps 1e-15, weight decay 0 by default, global-norm gradient
clipping at 2.0, constant LR (warm-up and cosine available). The optax chain stops *before* the
learning rate (``clip -> scale_by_adam -> add_decayed_weights``): the train step multiplies by the
stage's ``lr(step)`` itself, so stages with different LRs or schedules share one optimizer state
(the Adam moments carry over a stage boundary, as they do in the original's restarts) and the LR is
a pure function of the global step (exact resume without storing the schedule).

EMA: ``ema <- decay * ema + (1 - decay) * params`` after every applied step, in fp32, sharded like the
params ([ORIG] ``update_ema`` with its hard-coded 0.95).

Trainable filter: regular expressions matched (``re.search``) against ``/``-joined param paths
(``layers/blocks/attention/q``); frozen params get no gradient (``stop_gradient``), no Adam state
and no update.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "warmup_constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + clipping + schedule. ``lr`` is the peak LR (a stage may override it)."""

    lr: float = 2e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-15
    weight_decay: float = 0.0
    clip_norm: Optional[float] = 2.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown LR schedule {self.schedule!r}; choose from {SCHEDULES}")
        if not (math.isfinite(self.lr) and self.lr >= 0) or self.warmup_steps < 0:
            raise ValueError(f"lr and warmup_steps must be finite and >= 0, got {self.lr}, {self.warmup_steps}")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError(f"b1 and b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if not self.eps > 0 or not self.weight_decay >= 0:
            raise ValueError(f"eps must be > 0 and weight_decay >= 0, got {self.eps}, {self.weight_decay}")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            # clip_by_global_norm with a negative bound flips every gradient: the run would climb the loss
            raise ValueError(f"clip_norm must be >= 0 (0 or null: no clipping), got {self.clip_norm}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.min_lr_ratio and self.schedule != "cosine":
            raise ValueError(f"min_lr_ratio is the floor of the cosine schedule; schedule {self.schedule!r} does not "
                             f"use it (set schedule: cosine, or leave min_lr_ratio at 0)")  # fmt: skip


def lr_schedule(cfg: OptimizerConfig) -> Callable[[jax.Array, dict], jax.Array]:
    """``lr(step, hp)``: the LR at global ``step`` for a stage described by ``hp`` =
    ``{"lr": peak, "start": first global step, "steps": stage length}`` (traced values, so stages of equal
    shapes share one compiled step).

    ``constant``: ``lr`` (after an optional linear warm-up when ``warmup_steps > 0``);
    ``warmup_constant``: linear warm-up from 0 over ``warmup_steps``, then ``lr``;
    ``cosine``: warm-up then cosine decay from ``lr`` at the warm-up's last step (or the stage's first)
    to ``min_lr_ratio * lr`` at the stage's last step.
    The warm-up restarts at every stage start (the original restarts each stage from a checkpoint).
    """
    warm = cfg.warmup_steps

    def fn(step, hp):
        lr = jnp.asarray(hp["lr"], jnp.float32)
        s = jnp.asarray(step, jnp.float32) - jnp.asarray(hp["start"], jnp.float32)
        out = lr
        if cfg.schedule == "cosine":  # peak at the warm-up's last step, min_lr_ratio * lr at the stage's last
            d0 = max(warm - 1, 0)
            span = jnp.maximum(jnp.asarray(hp["steps"], jnp.float32) - 1.0 - d0, 1.0)
            frac = jnp.clip((s - d0) / span, 0.0, 1.0)
            out = lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + jnp.cos(math.pi * frac)))
        if warm > 0:
            out = out * jnp.minimum(1.0, (s + 1.0) / warm)
        return out

    return fn


def stage_hparams(lr: float, start: int, steps: int) -> dict:
    """The traced per-stage values read by :func:`lr_schedule`."""
    import numpy as np

    return {"lr": np.float32(lr), "start": np.int32(start), "steps": np.int32(steps)}


def path_str(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def trainable_mask(params: Any, patterns: Sequence[str] = (".*",)) -> Any:
    """Tree of bools: True where the param path matches one of ``patterns``. Errors if none match."""
    regs = [re.compile(p) for p in patterns]
    mask = jax.tree_util.tree_map_with_path(lambda p, _: any(r.search(path_str(p)) for r in regs), params)
    if not any(jax.tree.leaves(mask)):
        paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]][:8]
        raise ValueError(f"trainable patterns {list(patterns)} match no parameter (paths look like {paths} ...)")
    return mask


def make_optimizer(cfg: OptimizerConfig, mask: Any = None) -> optax.GradientTransformation:
    """``clip -> Adam -> decoupled weight decay`` without the LR (see module docstring).

    ``mask`` (from :func:`trainable_mask`) restricts Adam state and updates to trainable params.
    """
    inner = [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)]
    if cfg.weight_decay:
        inner.append(optax.add_decayed_weights(cfg.weight_decay))
    tx = optax.chain(*inner)
    if mask is not None and not all(jax.tree.leaves(mask)):
        tx = optax.masked(tx, mask)
    if cfg.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """``decay * ema + (1 - decay) * params`` in fp32."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype), ema, params)
