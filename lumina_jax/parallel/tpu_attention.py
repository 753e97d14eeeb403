"""TPU attention that partitions: JAX's splash kernel (Mosaic) inside ``shard_map``.

Mosaic kernels cannot be partitioned automatically by GSPMD, so under a multi-device mesh the kernel
must run per shard: ``splash_sharded`` wraps it in ``jax.shard_map`` over the batch and head axes the
logical rules give the activations (and in the context-parallel wrapper when the ``context`` axis is
used). On one device it calls the kernel directly. Registered as attention backends ``splash_sharded``
(the TPU default of ``backend="auto"``) and ``tpu_splash_local``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lumina_jax.ops.attention import register_backend


def _resolve(name: str, rules):
    import flax.linen as nn

    return nn.logical_to_mesh_axes((name,), rules)[0]


def _tpu_splash(q, k, v, *, kv_mask, kv_lengths, scale):
    from lumina_jax.ops.splash_attention import splash_attention

    return splash_attention(q, k, v, kv_mask, kv_lengths=kv_lengths, scale=scale, interpret=False, pad_head_dim=True)


def splash_sharded(q, k, v, *, kv_mask, kv_lengths, scale):
    """Splash (Mosaic, compiled) inside ``shard_map`` over the batch / head axes of the mesh in effect."""
    import flax.linen as nn

    from lumina_jax.parallel.mesh import LOGICAL_RULES

    mesh = jax.sharding.get_abstract_mesh()
    shape = dict(mesh.shape) if mesh is not None and not mesh.empty else {}
    if math.prod(shape.values() or [1]) == 1:
        return _tpu_splash(q, k, v, kv_mask=kv_mask, kv_lengths=kv_lengths, scale=scale)
    if shape.get("context", 1) > 1:
        from lumina_jax.parallel.context import context_parallel_attention

        return context_parallel_attention(q, k, v, kv_mask=kv_mask, kv_lengths=kv_lengths, scale=scale,
                                          inner="tpu_splash_local")  # fmt: skip
    rules = nn.get_logical_axis_rules() or LOGICAL_RULES
    batch_axes = _resolve("activation_batch", rules)
    head_axis = _resolve("activation_heads", rules)

    def size(axes):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        return math.prod(shape.get(a, 1) for a in axes)

    if q.shape[0] % size(batch_axes):
        batch_axes = None
    if k.shape[2] % size(head_axis) or q.shape[2] % size(head_axis):
        head_axis = None
    if isinstance(head_axis, tuple) and len(head_axis) == 1:
        head_axis = head_axis[0]
    qkv = P(batch_axes, None, head_axis, None)
    extra = [x for x in (kv_mask, None if kv_lengths is None else kv_lengths.astype(jnp.int32)) if x is not None]
    specs = [P(batch_axes, None) if x.ndim == 2 else P(batch_axes) for x in extra]

    def local(q, k, v, *rest):
        it = iter(rest)
        m = next(it) if kv_mask is not None else None
        n = next(it) if kv_lengths is not None else None
        return _tpu_splash(q, k, v, kv_mask=m, kv_lengths=n, scale=scale)

    return jax.shard_map(local, in_specs=(qkv, qkv, qkv, *specs), out_specs=qkv, check_vma=False)(q, k, v, *extra)


register_backend("tpu_splash_local")(_tpu_splash)
register_backend("splash_sharded")(splash_sharded)
