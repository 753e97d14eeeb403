"""Next-DiT's attention prologue in one pass: per-head RMSNorm of q (or k), then 3-axis RoPE.

The model computes ``apply_rope(rms_norm(x) * w, cos, sin)`` in fp32 and casts to the compute dtype.
Left to XLA on a GPU that is two memory passes with an fp32 tensor in between (seen on an H200: a
norm fusion writing fp32, then a RoPE fusion reading it back; ~4 ms of a 94 ms 2B forward).
:func:`qk_norm_rope` does it in one Pallas (Triton) kernel: read ``x`` once, write the rotated result
once, in ``x``'s dtype.

Layout as in :mod:`lumina_jax.ops.rope`: ``x`` ``(B, L, H, D)``, RoPE pairs are adjacent channels
``(2m, 2m + 1)``, ``cos``/``sin`` ``(B, L, D/2)`` fp32 per token. Triton tiles are powers of two, so a
head dim like 96 is handled as chunks (64 + 32) read from a 128-wide block whose extra columns
Triton masks (as in :mod:`lumina_jax.ops.flash_attention`); the pair swap is an in-register
``reshape -> unstack -> stack`` (Triton ``split``/``join``).

Gradients: a ``custom_vjp`` whose backward is the VJP of the XLA reference, recomputed from ``x``
(only ``x``, ``w``, ``cos``, ``sin`` are kept), so training can use it too. Inside a sharded ``jit``
the kernel is an opaque custom call XLA cannot partition: use it on one device (the pipeline, the
benchmarks) or under ``shard_map``.

Verified on the CPU: the interpreter against the reference (fp32 and bf16, D 96 and 32) and the
Triton lowering through the MLIR verifier (``tests/test_qk_norm_rope.py``). Not yet compiled or timed
on a GPU.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lumina_jax.ops.flash_attention import next_pow2, pow2_chunks
from lumina_jax.ops.norms import rms_normalize
from lumina_jax.ops.rope import apply_rope

try:
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None

_SQ = getattr(pl, "squeezed", None)


def norm_rope_reference(x, weight, cos, sin, eps: float, out_dtype=None):
    """What the model computes without the kernel: ``apply_rope(rms_norm(x) * w)`` in fp32."""
    y = rms_normalize(x, eps) * weight.astype(jnp.float32)
    return apply_rope(y, cos, sin).astype(out_dtype or x.dtype)


def _kernel(x_ref, w_ref, cos_ref, sin_ref, o_ref, *, chunks, d: int, eps: float, rows: int):
    xs = [x_ref[:, pl.ds(off, n)].astype(jnp.float32) for off, n in chunks]  # (rows, n) each
    sumsq = jnp.sum(xs[0] * xs[0], axis=1)
    for t in xs[1:]:
        sumsq = sumsq + jnp.sum(t * t, axis=1)
    r = jax.lax.rsqrt(sumsq / d + eps)
    for (off, n), t in zip(chunks, xs):
        w = w_ref[pl.ds(off, n)].astype(jnp.float32)
        y = (t * r[:, None]) * w[None, :]
        c = cos_ref[:, pl.ds(off // 2, n // 2)]
        s = sin_ref[:, pl.ds(off // 2, n // 2)]
        y0, y1 = jnp.unstack(y.reshape(rows, n // 2, 2), axis=-1)
        out = jnp.stack([y0 * c - y1 * s, y0 * s + y1 * c], axis=-1).reshape(rows, n)
        o_ref[:, pl.ds(off, n)] = out.astype(o_ref.dtype)


def _kernel_call(x, weight, cos, sin, eps: float, out_dtype, block_l: int, interpret: bool, num_warps: int,
                 heads: tuple[int, int]):
    b, l, _, d = x.shape
    offset, h = heads
    if l % block_l:
        raise ValueError(f"sequence length {l} is not a multiple of block_l {block_l}")
    chunks = pow2_chunks(d, minimum=2)  # d is even: every chunk keeps its RoPE pairs whole
    db, hb = next_pow2(d), next_pow2(d // 2)
    params = None if interpret or pltriton is None else pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    return pl.pallas_call(
        functools.partial(_kernel, chunks=chunks, d=d, eps=float(eps), rows=block_l),
        grid=(l // block_l, h, b),
        in_specs=[
            pl.BlockSpec((_SQ, block_l, _SQ, db), lambda i, j, n: (n, i, j + offset, 0)),
            pl.BlockSpec((db,), lambda i, j, n: (0,)),
            pl.BlockSpec((_SQ, block_l, hb), lambda i, j, n: (n, i, 0)),
            pl.BlockSpec((_SQ, block_l, hb), lambda i, j, n: (n, i, 0)),
        ],
        out_specs=pl.BlockSpec((_SQ, block_l, _SQ, db), lambda i, j, n: (n, i, j, 0)),
        out_shape=jax.ShapeDtypeStruct((b, l, h, d), out_dtype),
        compiler_params=params,
        interpret=interpret,
        name="lumina_qk_norm_rope",
    )(x, weight, cos, sin)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _fused(x, weight, cos, sin, eps, out_dtype, block_l, interpret, num_warps, heads):
    return _kernel_call(x, weight, cos, sin, eps, out_dtype, block_l, interpret, num_warps, heads)


def _fused_fwd(x, weight, cos, sin, eps, out_dtype, block_l, interpret, num_warps, heads):
    out = _kernel_call(x, weight, cos, sin, eps, out_dtype, block_l, interpret, num_warps, heads)
    return out, (x, weight, cos, sin)


def _fused_bwd(eps, out_dtype, block_l, interpret, num_warps, heads, res, g):
    x, weight, cos, sin = res
    offset, h = heads

    def ref(x, weight, cos, sin):
        return norm_rope_reference(jax.lax.slice_in_dim(x, offset, offset + h, axis=2), weight, cos, sin, eps,
                                   out_dtype)  # fmt: skip

    _, vjp = jax.vjp(ref, x, weight, cos, sin)
    return vjp(g)


_fused.defvjp(_fused_fwd, _fused_bwd)


def qk_norm_rope(
    x: jax.Array,
    weight: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    *,
    eps: float,
    out_dtype=None,
    block_l: int = 64,
    interpret: Optional[bool] = None,
    num_warps: int = 4,
    heads: Optional[tuple[int, int]] = None,
) -> jax.Array:
    """``apply_rope(rms_norm(x) * weight, cos, sin)`` in one kernel; differentiable.

    Args:
      x: ``(B, L, H, D)`` (D even); weight: ``(D,)`` norm scale; cos, sin: ``(B, L, D/2)`` fp32.
      heads: ``(offset, count)``: only heads ``[offset, offset + count)`` of ``x``, read in place (the
        model passes its fused ``qkv`` as ``(B, L, Hq + 2 Hkv, D)``: no copy of the q or k slice is made).
      eps: the RMSNorm epsilon; out_dtype: result dtype (default ``x.dtype``).
      block_l: tokens per program (a power of two); L is padded up to a multiple of it.
      interpret: run the Pallas interpreter; default: unless running on a GPU. On a TPU (no Triton) the
        default is the XLA reference instead, so the model option is harmless there.
    """
    b, l, h, d = x.shape
    offset, count = heads if heads is not None else (0, h)
    if not (0 <= offset and 0 < count and offset + count <= h):
        raise ValueError(f"qk_norm_rope: heads {heads} outside the {h} heads of x")
    if d % 2 or weight.shape != (d,) or cos.shape != (b, l, d // 2) or sin.shape != cos.shape:
        raise ValueError(f"qk_norm_rope: x {x.shape} (D even), weight {weight.shape} (D,), cos/sin "
                         f"{cos.shape}/{sin.shape} (B, L, D/2)")  # fmt: skip
    if block_l < 1 or block_l & (block_l - 1):
        raise ValueError(f"block_l must be a power of two, got {block_l}")
    if interpret is None:
        if jax.default_backend() == "tpu":
            xs = jax.lax.slice_in_dim(x, offset, offset + count, axis=2)
            return norm_rope_reference(xs, weight, cos, sin, eps, out_dtype)
        interpret = jax.default_backend() != "gpu"
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    block_l = min(block_l, next_pow2(l))
    pad = -l % block_l
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        cos = jnp.pad(cos, ((0, 0), (0, pad), (0, 0)))
        sin = jnp.pad(sin, ((0, 0), (0, pad), (0, 0)))
    out = _fused(x, weight, cos.astype(jnp.float32), sin.astype(jnp.float32), float(eps), out_dtype, block_l,
                 bool(interpret), num_warps, (offset, count))  # fmt: skip
    return out[:, :l] if pad else out
