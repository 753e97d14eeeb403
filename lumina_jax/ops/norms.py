"""Normalisation layers shared by the models (RMSNorm, non-affine LayerNorm), statistics in fp32."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(mean(x^2) + eps)`` computed in fp32, returned in fp32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale (PyTorch name ``weight``), as in Lumina's ``RMSNorm``.

    Normalises in fp32, multiplies by the fp32 scale and returns ``dtype`` (default: the input dtype).
    """

    eps: float = 1e-5
    dtype: Any = None
    axis_name: str = "norm"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype
        )
        return (rms_normalize(x, self.eps) * scale.astype(jnp.float32)).astype(self.dtype or x.dtype)


def layer_norm_no_affine(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without scale/bias, fp32 statistics, fp32 result."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)
