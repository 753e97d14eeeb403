"""Attention kernels that partition: Pallas kernels inside ``shard_map``.

Mosaic (TPU) and Triton (GPU) kernels cannot be partitioned automatically by GSPMD (XLA would gather
q, k and v onto every device and run the whole kernel there), so under a multi-device mesh the kernel
must run per shard: the ``*_sharded`` backends wrap it in ``jax.shard_map`` over the batch and head axes
the logical rules give the activations (and in the context-parallel wrapper when the ``context`` axis is
used). On one device they call the kernel directly. Registered attention backends:

* ``splash_sharded`` (the TPU default of ``backend="auto"``) / ``tpu_splash_local``: JAX's splash kernel;
* ``pallas_tpu_sharded`` / ``tpu_pallas_local``: our own kernels (:mod:`lumina_jax.ops.flash_attention_tpu`);
* ``pallas_sharded`` (``auto``'s GPU choice after cuDNN) around ``pallas``: our Triton kernels
  (:mod:`lumina_jax.ops.flash_attention`; in the Pallas interpreter off GPU, as the tests run it).
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


def _tpu_pallas(q, k, v, *, kv_mask, kv_lengths, scale):
    from lumina_jax.ops.flash_attention import flash_attention

    return flash_attention(q, k, v, kv_mask, kv_lengths=kv_lengths, scale=scale, interpret=False, target="tpu")


def _sharded(local_kernel, local_name: str):
    """``local_kernel`` (registered as ``local_name``) inside ``shard_map`` over the batch / head axes of
    the mesh in effect."""

    def sharded(q, k, v, *, kv_mask, kv_lengths, scale):
        return _run_sharded(local_kernel, local_name, q, k, v, kv_mask, kv_lengths, scale)

    return sharded


def _run_sharded(local_kernel, local_name, q, k, v, kv_mask, kv_lengths, scale):
    import flax.linen as nn

    from lumina_jax.parallel.context import shard_layout
    from lumina_jax.parallel.mesh import LOGICAL_RULES

    mesh = jax.sharding.get_abstract_mesh()
    shape = dict(mesh.shape) if mesh is not None and not mesh.empty else {}
    # one device, or already inside a shard_map (e.g. the context-parallel wrapper's, whose inner "auto"
    # picks this backend): the arrays here are per-device blocks
    if math.prod(shape.values() or [1]) == 1 or getattr(mesh, "manual_axes", ()):
        return local_kernel(q, k, v, kv_mask=kv_mask, kv_lengths=kv_lengths, scale=scale)
    if shape.get("context", 1) > 1:
        from lumina_jax.parallel.context import context_parallel_attention

        return context_parallel_attention(q, k, v, kv_mask=kv_mask, kv_lengths=kv_lengths, scale=scale,
                                          inner=local_name)  # fmt: skip
    rules = nn.get_logical_axis_rules() or LOGICAL_RULES
    batch_axes = _resolve("activation_batch", rules)
    head_axis = _resolve("activation_heads", rules)

    batch_axes, head_axis, kv_repeat = shard_layout(shape, q.shape[0], q.shape[2], k.shape[2], batch_axes, head_axis)
    if kv_repeat > 1:
        k, v = jnp.repeat(k, kv_repeat, axis=2), jnp.repeat(v, kv_repeat, axis=2)
    qkv = P(batch_axes, None, head_axis, None)
    extra = [x for x in (kv_mask, None if kv_lengths is None else kv_lengths.astype(jnp.int32)) if x is not None]
    specs = [P(batch_axes, None) if x.ndim == 2 else P(batch_axes) for x in extra]

    def local(q, k, v, *rest):
        it = iter(rest)
        m = next(it) if kv_mask is not None else None
        n = next(it) if kv_lengths is not None else None
        return local_kernel(q, k, v, kv_mask=m, kv_lengths=n, scale=scale)

    return jax.shard_map(local, in_specs=(qkv, qkv, qkv, *specs), out_specs=qkv, check_vma=False)(q, k, v, *extra)


def _gpu_pallas(q, k, v, *, kv_mask, kv_lengths, scale):
    from lumina_jax.ops.flash_attention import flash_attention

    return flash_attention(q, k, v, kv_mask, kv_lengths=kv_lengths, scale=scale, target="gpu")


splash_sharded = _sharded(_tpu_splash, "tpu_splash_local")
pallas_tpu_sharded = _sharded(_tpu_pallas, "tpu_pallas_local")
register_backend("tpu_splash_local")(_tpu_splash)
register_backend("splash_sharded")(splash_sharded)
register_backend("tpu_pallas_local")(_tpu_pallas)
register_backend("pallas_tpu_sharded")(pallas_tpu_sharded)
register_backend("pallas_sharded")(_sharded(_gpu_pallas, "pallas"))
