"""The jitted sampling loop: Next-DiT with batched CFG + a solver + VAE decode, as pure functions.

Data flow of :func:`generate` (one ``jax.jit``)::

    noise (B,h,w,C), caption features (R,L,D) with R = 2B [cond; uncond] or B
      -> solve(model_fn, ...)      one lax.fori_loop per guidance segment (solvers.Schedule.segments)
           guided step:    Next-DiT on [x; x] (2B rows, cond and uncond captions of different lengths
                           padded to one L and masked) -> CFG + renorm
           unguided step:  Next-DiT on x with the conditional captions only (B rows)
      -> unscale latents -> VAE decode -> (img + 1) / 2 clipped to [0, 1]   (B, 8h, 8w, 3)

Because the guidance pattern is static (decided on the host from the schedule), a truncated-CFG run
compiles to a loop over the guided steps followed by a separate loop over the unguided ones: the
unconditional half is not computed (not masked) after truncation. :func:`schedule_flops` counts the
work per segment from XLA's cost analysis of one step (XLA counts a loop body once, whatever its
trip count, so the whole-program number cannot show the saving).

:func:`make_step_fn` / :func:`make_decode_fn` are the same computation split per step, for the
interactive (step-by-step, progress-bar) mode of the CLI; every step there is a cached jitted call.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from lumina_jax.models.nextdit import NextDiT
from lumina_jax.models.vae import AutoencoderKL
from lumina_jax.sample.cfg import RenormMode, guided_velocity
from lumina_jax.sample.solvers import ModelFn, Schedule, solve, step

Params = Any


def make_model_fn(dit: NextDiT, cap_feats: jax.Array, cap_mask: jax.Array, guidance_scale: jax.Array | float,
                  renorm: RenormMode = "clamp", renorm_ratio: jax.Array | float = 1.0) -> ModelFn:
    """``model_fn(params, x, t, guided)`` for :func:`lumina_jax.sample.solvers.solve`.

    ``cap_feats`` ``(R, L, D)`` / ``cap_mask`` ``(R, L)``: the ``B`` conditional rows first, then (when
    any step is guided) the ``B`` unconditional rows; each row keeps its own caption length through the
    mask, so cond and uncond share one forward (the original's ``forward_with_cfg`` batching).
    """

    def model_fn(params: Params, x: jax.Array, t: jax.Array, guided: bool) -> jax.Array:
        b = x.shape[0]
        if guided:
            if cap_feats.shape[0] != 2 * b:
                raise ValueError(f"guided step needs {2 * b} caption rows (cond + uncond), got {cap_feats.shape[0]}")
            v = dit.apply({"params": params}, jnp.concatenate([x, x]), jnp.full((2 * b,), t, jnp.float32),
                          cap_feats, cap_mask)  # fmt: skip
            return guided_velocity(v[:b], v[b:], guidance_scale, renorm, renorm_ratio)
        return dit.apply({"params": params}, x, jnp.full((b,), t, jnp.float32), cap_feats[:b], cap_mask[:b])

    return model_fn


def decode_latents(vae: AutoencoderKL, vae_params: Params, latents: jax.Array,
                   tile: Optional[tuple[int, int]] = None) -> jax.Array:
    """Diffusion latents -> images in [0, 1], ``(B, H, W, 3)`` fp32 (spec §5; as diffusers' postprocess)."""
    z = vae.config.unscale_latents(latents.astype(jnp.float32))
    if tile is None:
        img = vae.apply({"params": vae_params}, z, method=AutoencoderKL.decode)
    else:
        img = vae.apply({"params": vae_params}, z, tile[0], tile[1], method=AutoencoderKL.decode_tiled)
    return jnp.clip(img / 2 + 0.5, 0.0, 1.0)


def generate(dit: NextDiT, vae: Optional[AutoencoderKL], dit_params: Params, vae_params: Params,
             noise: jax.Array, cap_feats: jax.Array, cap_mask: jax.Array, schedule: Schedule,
             guidance_scale: jax.Array, renorm_ratio: jax.Array, *, renorm: RenormMode = "clamp",
             vae_tile: Optional[tuple[int, int]] = None,
             on_step: Optional[Callable[[jax.Array], None]] = None) -> tuple[jax.Array, Optional[jax.Array]]:
    """Noise -> (latents, images or None): the whole run, traceable (jit it; see :func:`make_generate_fn`).

    ``vae=None`` skips decoding (``output_type="latent"``).
    """
    model_fn = make_model_fn(dit, cap_feats, cap_mask, guidance_scale, renorm, renorm_ratio)
    latents = solve(model_fn, dit_params, noise.astype(jnp.float32), schedule, on_step=on_step)
    images = None if vae is None else decode_latents(vae, vae_params, latents, vae_tile)
    return latents, images


def make_generate_fn(dit: NextDiT, vae: Optional[AutoencoderKL], *, renorm: RenormMode = "clamp",
                     vae_tile: Optional[tuple[int, int]] = None,
                     on_step: Optional[Callable[[jax.Array], None]] = None) -> Callable[..., Any]:
    """The jitted :func:`generate` with the static choices bound.

    Signature: ``fn(dit_params, vae_params, noise, cap_feats, cap_mask, schedule, guidance_scale,
    renorm_ratio) -> (latents, images)``. The schedule's structure (solver, steps, guidance pattern) is
    static through its pytree structure; its arrays, the guidance scale and the renorm ratio are traced,
    so changing them does not recompile.
    """
    return jax.jit(functools.partial(generate, dit, vae, renorm=renorm, vae_tile=vae_tile, on_step=on_step))


def make_step_fn(dit: NextDiT, solver: str, guided: tuple[bool, ...], *, renorm: RenormMode = "clamp",
                 out_shardings: Any = None):
    """Jitted single step ``fn(dit_params, x, state, coeffs, cap_feats, cap_mask, guidance_scale,
    renorm_ratio) -> (x, state)`` for one guidance pattern; ``coeffs = schedule.at(i)``.
    ``out_shardings`` (sharded runs): those of ``(x, state)`` as they come in, so that each step's output
    can be fed to the same compiled program."""

    def fn(dit_params, x, state, coeffs, cap_feats, cap_mask, guidance_scale, renorm_ratio):
        model_fn = make_model_fn(dit, cap_feats, cap_mask, guidance_scale, renorm, renorm_ratio)
        return step(model_fn, dit_params, x, state, coeffs, solver, guided)

    return jax.jit(fn, out_shardings=out_shardings)


def make_decode_fn(vae: AutoencoderKL, vae_tile: Optional[tuple[int, int]] = None):
    """Jitted ``fn(vae_params, latents) -> images`` in [0, 1]."""
    return jax.jit(lambda p, z: decode_latents(vae, p, z, vae_tile))


def compiled_flops(compiled: Any) -> float:
    """FLOPs of a compiled executable from XLA's cost analysis (0.0 when the backend gives none)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax returned one dict per device
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", 0.0))


def schedule_flops(schedule: Schedule, step_flops: Callable[[tuple[bool, ...]], float]) -> dict[str, Any]:
    """Total FLOPs of a run = sum over segments of (steps x FLOPs of one step with that guidance).

    ``step_flops(flags)`` gives the cost of one step (e.g. :func:`compiled_flops` of
    :func:`make_step_fn`). Returns ``{"total": ..., "segments": [(start, stop, flags, per_step), ...]}``.
    """
    cache: dict[tuple[bool, ...], float] = {}
    segs, total = [], 0.0
    for start, stop, flags in schedule.segments():
        if flags not in cache:
            cache[flags] = float(step_flops(flags))
        segs.append((start, stop, flags, cache[flags]))
        total += (stop - start) * cache[flags]
    return {"total": total, "segments": segs}


def loop_lengths(jaxpr: Any) -> list[int]:
    """Trip counts of the top-level loops (``scan`` / ``while`` from ``fori_loop``) in a closed jaxpr,
    in program order, searching through ``pjit``/``closed_call`` wrappers. Used to check that a
    truncated schedule really compiles to separate guided and unguided loops."""
    out: list[int] = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "scan":
                out.append(int(eqn.params["length"]))
            elif eqn.primitive.name == "while":
                out.append(-1)  # dynamic trip count
            else:
                for p in eqn.params.values():
                    inner = getattr(p, "jaxpr", None)
                    if inner is not None and hasattr(inner, "eqns"):
                        walk(inner)
                    elif hasattr(p, "eqns"):
                        walk(p)

    walk(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr)
    return out


__all__ = [
    "make_model_fn", "decode_latents", "generate", "make_generate_fn", "make_step_fn", "make_decode_fn",
    "compiled_flops", "schedule_flops", "loop_lengths",
]  # fmt: skip
