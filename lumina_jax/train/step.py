"""The train step: ``(state, batch) -> (state, metrics)``, one function for every mesh.

The same Python function runs on one device or on a pod; :func:`compile_train_step` jits it with
``in_shardings``/``out_shardings`` from the rule table and traces it under the logical-axis rules so
the model's activation constraints resolve to the mesh. Per step:

1. ``rng = fold_in(PRNGKey(seed), step)`` (no RNG in the state: exact resume needs only the step);
2. the global batch is split into ``grad_accum`` micro-batches *strided* over the batch axis
   (``reshape(B/A, A)``), so every micro-batch stays spread over all devices without communication;
   gradients are summed in fp32 over a ``lax.scan``;
3. loss = rectified-flow MSE (+ the auxiliary 4x-pooled loss), params cast to the compute dtype inside
   the model (fp32 master params, bf16 matmuls), frozen params behind ``stop_gradient``;
4. global-norm clipping + Adam + decoupled weight decay (optax), ``params -= lr(step) * update``;
5. EMA update; if the loss or the gradient norm is not finite, *nothing* is applied (params, EMA and
   optimizer state are kept) and the counters ``nonfinite``/``nonfinite_run`` go up.

Batch formats (NumPy or jax arrays, batch-major):
  dense:  ``latents`` (B, h, w, C), ``cap_feats`` (B, L, D), ``cap_mask`` (B, L), optional ``valid`` (B,)
  mixed:  ``latents`` (B, T, p*p*C) patch tokens + ``token_mask`` (B, T) + ``image_sizes`` (B, 2) pixels
          (:mod:`lumina_jax.data.batching` "mixed" mode); the auxiliary loss pools each sample in
          token space (:func:`lumina_jax.train.objective.pool_tokens`, the same values as the dense
          :func:`~lumina_jax.train.objective.avg_pool`), into ``T / aux_pool**2`` tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lumina_jax.data.cache import VAE_DOWNSAMPLE
from lumina_jax.parallel.mesh import BATCH_AXES, LOGICAL_RULES, batch_sharding
from lumina_jax.train import objective as obj
from lumina_jax.train.lora import ema_source
from lumina_jax.train.optim import ema_update
from lumina_jax.train.state import TrainState

DENSE_KEYS = ("latents", "cap_feats", "cap_mask", "valid")
MIXED_KEYS = ("latents", "cap_feats", "cap_mask", "valid", "token_mask", "image_sizes")
VAE_FACTOR = VAE_DOWNSAMPLE  # mixed batches come only from latent caches (the config refuses raw images)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of one compiled step (one per stage)."""

    seed: int = 0
    t_sampling: str = "lognorm"
    mu: Optional[float] = None  # time-shift mu; None = no shift
    aux_loss_weight: float = 1.0
    aux_pool: int = 4
    grad_accum: int = 1
    ema_decay: Optional[float] = 0.95
    mixed: bool = False


def _split_micro(x: jax.Array, a: int) -> jax.Array:
    """``(B, ...) -> (A, B/A, ...)``; micro-batch ``j`` = rows ``j, j+A, ...`` (device-local)."""
    if a == 1:
        return x[None]
    b = x.shape[0]
    x = x.reshape(b // a, a, *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return jax.lax.with_sharding_constraint(x, P(None, BATCH_AXES))


def make_loss_fn(model: nn.Module, cfg: StepConfig) -> Callable:
    """``loss_fn(params, micro_batch, rng, denom, aux_denom=denom) -> (loss, (main, aux))`` (fp32 scalars).

    Each term is ``sum(per-sample loss over the micro-batch's valid rows) / denom``, ``denom`` being the
    number of valid rows of the whole batch (spec §6.2), so the terms of the micro-batches of one step
    add up to the exact batch mean however the padding rows of a bucket fall into them. The auxiliary
    term divides by ``aux_denom``, the valid rows large enough to pool (:func:`aux_rows`): samples with a
    crop side under 64 px have no pooled term (a dense batch of them: an auxiliary loss of 0).
    """

    patch = getattr(getattr(model, "config", None), "patch_size", 1)  # the aux latent must patchify

    def token_flow_loss(params, tokens, grid, rng, cap, cmask):
        """Per-sample flow MSE over each sample's own tokens (mixed batches); 0 for an empty grid."""
        k_t, k_n = jax.random.split(rng)
        x1 = tokens.astype(jnp.float32)
        t = obj.sample_t(k_t, x1.shape[0], cfg.t_sampling, cfg.mu)
        x0 = jax.random.normal(k_n, x1.shape, jnp.float32)
        xt, target = obj.interpolate(x1, x0, t)
        pred = model.apply({"params": params}, xt, grid, t, cap, cmask, method=model.forward_tokens)
        n = grid[:, 0] * grid[:, 1]
        w = (jnp.arange(x1.shape[1])[None, :] < n[:, None]).astype(jnp.float32)[..., None]
        per = jnp.sum(jnp.square(pred.astype(jnp.float32) - target) * w, axis=(1, 2))
        return per / jnp.maximum(jnp.sum(w, axis=(1, 2)) * x1.shape[-1], 1.0)

    def loss_fn(params, mb, rng, denom, aux_denom=None):
        k_main, k_aux = jax.random.split(rng)
        cap, cmask = mb["cap_feats"], mb["cap_mask"]
        valid = mb.get("valid")
        aux_denom = denom if aux_denom is None else aux_denom
        if valid is not None:  # padding rows read as zeros: whatever they hold (a NaN) reaches no gradient
            keep = lambda x: jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))  # noqa: E731
            mb = {**mb, "latents": keep(mb["latents"]), "cap_feats": keep(mb["cap_feats"])}
            cap = mb["cap_feats"]

        def share(per, d=denom):
            w = jnp.ones_like(per) if valid is None else valid.astype(jnp.float32)
            return jnp.sum(jnp.where(w > 0, per, 0.0)) / d  # padding rows' losses stay out of the mean
        if cfg.mixed:
            grid = mb["image_sizes"].astype(jnp.int32) // (VAE_FACTOR * model.config.patch_size)
            main = share(token_flow_loss(params, mb["latents"], grid, k_main, cap, cmask))
            aux = jnp.zeros((), jnp.float32)
            if cfg.aux_loss_weight:
                pooled, grid2 = obj.pool_tokens(mb["latents"], grid, cfg.aux_pool, model.config.patch_size)
                aux = share(token_flow_loss(params, pooled, grid2, k_aux, cap, cmask), aux_denom)
            return main + cfg.aux_loss_weight * aux, (main, aux)

        def apply(xt, t):
            return model.apply({"params": params}, xt, t, cap, cmask)

        main = share(obj.flow_loss(apply, mb["latents"], k_main, t_sampling=cfg.t_sampling, mu=cfg.mu))
        aux = jnp.zeros((), jnp.float32)
        h, w = mb["latents"].shape[1:3]
        if cfg.aux_loss_weight and min(h, w) // cfg.aux_pool >= patch:  # else too small to pool (avg_pool's check)
            pooled = obj.avg_pool(mb["latents"].astype(jnp.float32), cfg.aux_pool, multiple=patch)
            aux = share(obj.flow_loss(apply, pooled, k_aux, t_sampling=cfg.t_sampling, mu=cfg.mu), aux_denom)
        return main + cfg.aux_loss_weight * aux, (main, aux)

    return loss_fn


def aux_rows(batch: dict, cfg: StepConfig, patch: int, denom: Any) -> Any:
    """The auxiliary term's denominator: valid rows of the whole batch that pool to at least one token
    (mixed batches: per sample from ``image_sizes``; dense ones: all rows or none). ``denom`` when no
    row is too small (or there is no auxiliary term)."""
    if not cfg.aux_loss_weight or not cfg.mixed:
        return denom
    grid = batch["image_sizes"].astype(jnp.int32) // (VAE_FACTOR * patch)
    ok = obj.poolable(grid, cfg.aux_pool, patch)
    if "valid" in batch:
        ok = ok & batch["valid"].astype(bool)
    return jnp.maximum(jnp.sum(ok.astype(jnp.float32)), 1.0)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    lr_fn: Callable[[jax.Array, dict], jax.Array],
    cfg: StepConfig,
    trainable: Any = None,
    rules=LOGICAL_RULES,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The un-jitted ``step_fn(state, batch, hp)``; ``hp`` holds the stage's LR schedule values
    (:func:`lumina_jax.train.optim.stage_hparams`), passed at run time so stages of equal shapes share
    one executable."""
    loss_fn = make_loss_fn(model, cfg)
    a = cfg.grad_accum

    def step_fn(state: TrainState, batch: dict, hp: dict) -> tuple[TrainState, dict]:
        with nn.logical_axis_rules(rules):
            rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), state.step)
            keys = MIXED_KEYS if cfg.mixed else DENSE_KEYS
            batch = {k: v for k, v in batch.items() if k in keys}
            micro = {k: _split_micro(v, a) for k, v in batch.items()}
            rows = batch["latents"].shape[0]
            denom = jnp.maximum(jnp.sum(batch["valid"].astype(jnp.float32)), 1.0) if "valid" in batch else rows
            aux_denom = aux_rows(batch, cfg, getattr(getattr(model, "config", None), "patch_size", 1), denom)

            def params_for_grad(p):
                if trainable is None:
                    return p
                return jax.tree.map(lambda x, m: x if m else jax.lax.stop_gradient(x), p, trainable)

            def grad_one(i, mb):
                def f(p):
                    return loss_fn(params_for_grad(p), mb, jax.random.fold_in(rng, i), denom, aux_denom)

                (loss, (main, aux)), g = jax.value_and_grad(f, has_aux=True)(state.params)
                return loss, main, aux, g

            if a == 1:
                loss, main, aux, grads = grad_one(0, {k: v[0] for k, v in micro.items()})
            else:
                # frozen params (trainable False) accumulate nothing: a scalar stands in for their gradient,
                # so a LoRA run does not carry a base-sized buffer through the micro-batch loop
                live = trainable if trainable is not None else jax.tree.map(lambda _: True, state.params)
                zeros = jax.tree.map(lambda p, m: jnp.zeros_like(p) if m else jnp.zeros((), p.dtype), state.params, live)

                def body(carry, xs):
                    i, mb = xs
                    loss, main, aux, g = grad_one(i, mb)
                    acc_l, acc_m, acc_a, acc_g = carry
                    acc_g = jax.tree.map(lambda acc, x, m: acc + x if m else acc, acc_g, g, live)
                    return (acc_l + loss, acc_m + main, acc_a + aux, acc_g), None

                init = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), zeros)
                # each micro-batch's terms are already its share of the batch mean: sum them
                (loss, main, aux, grads), _ = jax.lax.scan(body, init, (jnp.arange(a), micro))

            if trainable is not None:
                grads = jax.tree.map(lambda g, p, m: g if m else jnp.zeros_like(p), grads, state.params, trainable)
            grad_norm = optax.global_norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            lr = lr_fn(state.step, hp)
            updates, new_opt = tx.update(grads, state.opt_state, state.params)
            if trainable is not None:
                updates = jax.tree.map(lambda u, m: u if m else jnp.zeros_like(u), updates, trainable)
            if trainable is None:
                new_params = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), state.params, updates)
            else:  # frozen params pass through untouched (no pass over them)
                new_params = jax.tree.map(lambda p, u, m: p - lr * u.astype(p.dtype) if m else p, state.params,
                                          updates, trainable)  # fmt: skip
            new_ema = state.ema
            if state.ema is not None and cfg.ema_decay is not None:
                new_ema = ema_update(state.ema, ema_source(new_params), cfg.ema_decay)

            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            new_state = TrainState(
                step=state.step + 1,
                params=keep(new_params, state.params),
                ema=keep(new_ema, state.ema) if state.ema is not None else None,
                opt_state=keep(new_opt, state.opt_state),
                nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
                nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
            )
            metrics = {
                "loss": loss, "loss_main": main, "loss_aux": aux, "grad_norm": grad_norm, "lr": lr,
                "finite": finite, "nonfinite": new_state.nonfinite, "nonfinite_run": new_state.nonfinite_run,
            }  # fmt: skip
            return new_state, metrics

    return step_fn


def batch_shardings(mesh: Mesh, batch: dict) -> dict:
    return {k: batch_sharding(mesh, v.ndim) for k, v in batch.items()}


def compile_train_step(
    step_fn: Callable,
    mesh: Mesh,
    state_shardings: TrainState,
    example_batch: dict,
    donate: bool = True,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``jax.jit`` with explicit shardings, traced under ``jax.set_mesh(mesh)``. Returns a callable
    ``run(state, batch, hp)`` that enters the mesh context for every call (``example_batch``: arrays or
    ShapeDtypeStructs)."""
    rep = NamedSharding(mesh, P())
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings(mesh, example_batch), rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,) if donate else (),
    )

    def run(state, batch, hp):
        with jax.set_mesh(mesh):
            return jitted(state, batch, hp)

    def lower(state, batch, hp):
        with jax.set_mesh(mesh):
            return jitted.lower(state, batch, hp)

    run.jitted = jitted  # type: ignore[attr-defined]
    run.lower = lower  # type: ignore[attr-defined]
    return run


def forward_fn(model: nn.Module, rules=LOGICAL_RULES) -> Callable:
    """``(params, x, t, cap_feats, cap_mask) -> velocity`` traced under the rules (for sharded sampling)."""

    def fwd(params, x, t, cap, mask):
        with nn.logical_axis_rules(rules):
            return model.apply({"params": params}, x, t, cap, mask)

    return fwd
