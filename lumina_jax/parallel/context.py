"""Context (sequence) parallel attention: queries sharded on the ``context`` mesh axis, K/V all-gathered.

Registered as attention backends ``context`` (inner kernel chosen like ``auto``) and
``context_<inner>`` (``context_xla``, ``context_splash``, ``context_cudnn``, ``context_pallas``), so the
model needs no change: ``NextDiT(attention_backend="context")``. Under a mesh (``jax.set_mesh``) whose
``context`` axis is larger than 1, the backend wraps the inner kernel in ``jax.shard_map``:

    q     (B, L, Hq, D)  sharded (batch axes, context, tensor, -)
    k, v  (B, L, Hkv, D) sharded the same, then all-gathered over ``context`` inside the map
    out   (B, L, Hq, D)  sharded like q

Each device attends its ``L / C`` queries to all ``L`` keys: exact (no online-softmax merge needed),
communication = one all-gather of K/V per layer (and a reduce-scatter of their gradients). GQA keeps
the gathered K/V ``Hq/Hkv`` times smaller than Q. For very long sequences a ring (K/V rotated with
``ppermute`` and merged by log-sum-exp) would bound memory to ``L/C`` keys per device; at Lumina's
4-16k tokens the all-gather is simpler and at least as fast (one collective instead of C-1 steps).

The batch and head axes come from the logical-axis rules in effect (``activation_batch``,
``activation_heads``; :data:`lumina_jax.parallel.mesh.LOGICAL_RULES` if none are set). Sequences whose
length does not divide ``C`` (caption refiner, ragged joint sequences) are zero-padded inside the
backend; padded keys are masked through ``kv_lengths``/``kv_mask`` and padded queries sliced off.
Without a mesh or with ``context == 1`` the inner kernel runs as is.
"""

from __future__ import annotations

import logging
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lumina_jax.ops.attention import get_backend, register_backend

log = logging.getLogger(__name__)

CONTEXT_AXIS = "context"
INNER_BACKENDS = ("xla", "splash", "cudnn", "pallas")


def _resolve(name: str):
    rules = nn.get_logical_axis_rules()
    if not rules:
        from lumina_jax.parallel.mesh import LOGICAL_RULES

        rules = LOGICAL_RULES
    return nn.logical_to_mesh_axes((name,), rules)[0]


def _axes_size(mesh_shape: dict, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    n = 1
    for a in axes:
        n *= mesh_shape.get(a, 1)
    return n


_FALLBACKS_LOGGED: set = set()


def shard_layout(mesh_shape: dict, b: int, hq: int, hkv: int, batch_axes, head_axis) -> tuple:
    """``(batch_axes, head_axis, kv_repeat)`` of attention inside ``shard_map``: the batch axes (in order)
    whose product divides the batch ``b`` (a batch of 2 on ``data=2, fsdp=4`` keeps ``data``); the head
    axis when it divides the query heads and the K/V heads -- or, with GQA, divides the query heads and is
    a multiple ``r * hkv`` of the K/V heads: K/V heads are then repeated ``r`` times (``kv_repeat``) so
    each device holds its queries' K/V head (16 / 4 heads on ``tensor=8``). What cannot be split is
    replicated, computed whole on every device of that axis, and logged once."""
    axes = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    keep: list = []
    for a in axes:
        if b % (_axes_size(mesh_shape, tuple(keep)) * mesh_shape.get(a, 1)) == 0:
            keep.append(a)
    head = head_axis[0] if isinstance(head_axis, tuple) and len(head_axis) == 1 else head_axis
    t, repeat = _axes_size(mesh_shape, head), 1
    if t > 1 and (hq % t or (hkv % t and t % hkv)):
        head = None
    elif t > 1 and hkv % t:
        repeat = t // hkv
    dropped = [a for a in axes if a not in keep and mesh_shape.get(a, 1) > 1]
    if head is None and t > 1:
        dropped.append(f"{head_axis} (heads {hq}/{hkv})")
    key = (tuple(dropped), b, hq, hkv)
    if dropped and key not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add(key)
        log.info("attention in shard_map: batch %d, %d/%d heads: replicated over %s (sizes do not divide)", b, hq,
                 hkv, ", ".join(map(str, dropped)))  # fmt: skip
    batch = None if not keep else keep[0] if len(keep) == 1 else tuple(keep)
    return batch, head, repeat


def context_parallel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_mask: Optional[jax.Array],
    kv_lengths: Optional[jax.Array],
    scale: float,
    inner: str = "auto",
) -> jax.Array:
    """See the module docstring. Same contract as :func:`lumina_jax.ops.attention.attention`."""
    inner_fn = get_backend(inner)
    mesh = jax.sharding.get_abstract_mesh()
    shape = dict(mesh.shape) if mesh is not None and not mesh.empty else {}
    c = shape.get(CONTEXT_AXIS, 1)
    if c == 1:
        return inner_fn(q, k, v, kv_mask=kv_mask, kv_lengths=kv_lengths, scale=scale)

    b, length, hq, d = q.shape
    hkv = k.shape[2]
    if k.shape[1] != length:  # the sequence is split once, queries and keys alike: self-attention only
        raise ValueError(f"context-parallel attention is self-attention: {length} queries but {k.shape[1]} keys; "
                         f"use a backend without context_ for cross-attention")
    batch_axes, head_axis, kv_repeat = shard_layout(shape, b, hq, hkv, _resolve("activation_batch"),
                                                    _resolve("activation_heads"))  # fmt: skip
    if kv_repeat > 1:
        k, v = jnp.repeat(k, kv_repeat, axis=2), jnp.repeat(v, kv_repeat, axis=2)

    pad = (-length) % c
    if pad:
        if kv_lengths is None and kv_mask is None:
            kv_lengths = jnp.full((b,), length, jnp.int32)
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths)
        if kv_mask is not None:
            kv_mask = jnp.pad(kv_mask, ((0, 0), (0, pad)))

    qkv_spec = P(batch_axes, CONTEXT_AXIS, head_axis, None)
    extra, extra_specs = [], []
    if kv_mask is not None:
        extra.append(kv_mask)
        extra_specs.append(P(batch_axes, CONTEXT_AXIS))
    if kv_lengths is not None:
        extra.append(kv_lengths.astype(jnp.int32))
        extra_specs.append(P(batch_axes))

    def local(q, k, v, *rest):
        it = iter(rest)
        m = next(it) if kv_mask is not None else None
        n = next(it) if kv_lengths is not None else None
        k = jax.lax.all_gather(k, CONTEXT_AXIS, axis=1, tiled=True)
        v = jax.lax.all_gather(v, CONTEXT_AXIS, axis=1, tiled=True)
        if m is not None:
            m = jax.lax.all_gather(m, CONTEXT_AXIS, axis=1, tiled=True)
        return inner_fn(q, k, v, kv_mask=m, kv_lengths=n, scale=scale)

    out = jax.shard_map(
        local, in_specs=(qkv_spec, qkv_spec, qkv_spec, *extra_specs), out_specs=qkv_spec, check_vma=False
    )(q, k, v, *extra)
    return out[:, :length] if pad else out


def _register() -> None:
    def make(inner: str):
        def backend(q, k, v, *, kv_mask, kv_lengths, scale):
            return context_parallel_attention(q, k, v, kv_mask=kv_mask, kv_lengths=kv_lengths, scale=scale, inner=inner)

        backend.__doc__ = f"Context-parallel attention around the {inner!r} backend (see lumina_jax.parallel.context)."
        return backend

    register_backend("context")(make("auto"))
    for name in INNER_BACKENDS:
        register_backend(f"context_{name}")(make(name))


_register()
