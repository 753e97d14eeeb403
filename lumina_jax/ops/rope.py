"""Lumina's 3-axis rotary position embedding (spec §2.3), real-valued and interleaved.

Each token has a position ``(p0, p1, p2)``: caption token ``j`` -> ``(j, 0, 0)``; image token at grid
``(r, c)`` -> ``(L_i, r, c)`` with ``L_i`` the sample's caption length. Axis ``a`` owns ``axes_dims[a]``
channels of the head dimension, i.e. ``axes_dims[a] // 2`` rotation pairs, and pairs are *adjacent*
channels ``(2m, 2m+1)`` (PyTorch's ``view_as_complex`` convention), not the two halves.

The per-axis angle tables are computed once in float64 with NumPy. ``angles="float32"`` (the original's
semantics, the default) rounds each angle to float32 before cos/sin, as ORIG's complex64
``torch.polar`` table does; ``"float64"`` keeps them (diffusers' complex128 table); cos/sin of the two
differ by up to ~1.4e-5 at position 511, ~7.5e-6 at 299. cos/sin are taken in float64 and stored as fp32.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def rope_tables(axes_dims: Sequence[int], axes_lens: Sequence[int], theta: float = 10000.0,
                angles: str = "float32") -> list[np.ndarray]:
    """Per-axis angle tables ``(axes_lens[a], axes_dims[a] // 2)`` in float64, each angle rounded to float32
    first with ``angles="float32"`` (the original's; ``"float64"``: diffusers')."""
    if angles not in ("float32", "float64"):
        raise ValueError(f"angles must be 'float32' or 'float64', got {angles!r}")
    tables = []
    for d, n in zip(axes_dims, axes_lens):
        if d % 2:
            raise ValueError(f"RoPE axis dims must be even, got {list(axes_dims)}")
        omega = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64)[: d // 2] / d)
        tables.append(np.outer(np.arange(n, dtype=np.float64), omega).astype(angles).astype(np.float64))
    return tables


def rope_cos_sin(
    positions: jax.Array, axes_dims: Sequence[int], axes_lens: Sequence[int], theta: float = 10000.0,
    angles: str = "float32",
) -> tuple[jax.Array, jax.Array]:
    """Positions ``(..., 3)`` int -> ``cos, sin`` of shape ``(..., sum(axes_dims) // 2)`` in fp32
    (``angles``: see :func:`rope_tables`).

    Indices are clipped to the table sizes (as a gather would); callers keep valid tokens in range.
    """
    cos_parts, sin_parts = [], []
    for a, table in enumerate(rope_tables(axes_dims, axes_lens, theta, angles)):
        idx = jnp.clip(positions[..., a], 0, table.shape[0] - 1)
        cos_parts.append(jnp.asarray(np.cos(table), jnp.float32)[idx])
        sin_parts.append(jnp.asarray(np.sin(table), jnp.float32)[idx])
    return jnp.concatenate(cos_parts, -1), jnp.concatenate(sin_parts, -1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent channel pairs of ``x`` ``(B, L, H, D)`` by ``cos/sin`` ``(B, L, D/2)``, in fp32."""
    b, l, h, d = x.shape
    x32 = x.astype(jnp.float32).reshape(b, l, h, d // 2, 2)
    x0, x1 = x32[..., 0], x32[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(b, l, h, d).astype(x.dtype)
