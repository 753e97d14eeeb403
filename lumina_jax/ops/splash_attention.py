"""Attention backend ``"splash"``: JAX's Pallas TPU splash-attention kernel behind our interface.

Reference: ``jax.experimental.pallas.ops.tpu.splash_attention`` (``make_splash_mha``), and the way
maxdiffusion's ``_tpu_flash_attention`` folds a key-padding mask into segment ids.

* Layout: our ``(B, L, H, D)`` is transposed to splash's per-sample ``(H, L, D)``; the kernel is
  ``jax.vmap``-ed over the batch.
* GQA: splash's MHA kernel accepts ``Hkv`` kv heads with ``Hq % Hkv == 0`` and maps query head ``h``
  to kv head ``h // (Hq // Hkv)`` itself (no K/V copies).
* Key padding: valid keys get kv segment id 1, padded/masked keys 0, all queries 1, so a query only
  sees valid keys. Sequences are padded to a multiple of the block size (padded keys get id 0).
  Splash has no notion of a row without any valid key (its masked logits are a large finite
  negative, so such a row would silently average all values): for samples with zero valid keys we
  mark key 0 as valid and zero their output afterwards, which also makes their gradients exactly zero.
* Scale: splash has no scale argument, so ``q`` is multiplied by ``scale`` first (in ``q.dtype``).
* head_dim: padded with zeros to a multiple of 128 on TPU (``pad_head_dim``; Lumina's 96 -> 128,
  as maxdiffusion does). Zero columns leave ``q k^T`` unchanged and give zero output columns that are
  sliced off.
* Multi-device: a Mosaic kernel cannot be auto-partitioned; under a sharded ``jit`` call the backend
  inside ``jax.shard_map`` (see :func:`shard_over_batch_and_heads`).

Verified (CPU, jax 0.10.2, ``interpret=True``): forward and gradients against a float64 reference
with GQA, ragged kv lengths (incl. 0), general masks, head_dim 96, non-multiple sequence lengths,
fp32/bf16 (``tests/test_attention_kernels.py``). NOT verified: compilation and speed on a real TPU.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from lumina_jax.ops.attention import register_backend

_LANES = 128  # splash block sizes must be multiples of the TPU lane width


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# Not cached across traces on purpose: the kernel holds concrete mask-info arrays, and reusing them
# in a second trace turns them into hoisted constants (this broke a second jax.export). Building it
# costs a few ms of numpy work per trace.
def _make_kernel(
    num_q_heads: int, lq: int, lk: int, block_q: int, block_kv: int, fused_bwd: bool, interpret: bool
):
    mask = splash.MultiHeadMask([splash.FullMask((lq, lk)) for _ in range(num_q_heads)])
    if fused_bwd:
        bwd = dict(block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                   use_fused_bwd_kernel=True)
    else:
        bwd = dict(block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                   block_q_dq=block_q, block_kv_dq=block_kv)
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, **bwd)
    return splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def fit_block(length: int, block: int) -> int:
    """The tile size for a sequence of ``length``: of the multiples of 256 up to ``block`` (whole passes
    of a v6e's 256-wide MXU), the one that pads ``length`` least, the larger on a tie; a sequence or a
    ``block`` under 256 takes one 128-multiple tile. Lumina's 4096 + 256 tokens take 256 (4352, no
    padding) where 512 would pad to 4608 (~12 % more work). Untimed on a TPU."""
    if block < _LANES or block % _LANES:
        raise ValueError(f"splash block sizes must be multiples of {_LANES}, got {block}")
    block = min(block, _round_up(length, _LANES))
    if block < 2 * _LANES:
        return block
    sizes = range(2 * _LANES, block + 1, 2 * _LANES)
    return min(sizes, key=lambda b: (_round_up(length, b), -b))


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_mask: Optional[jax.Array] = None,
    *,
    kv_lengths: Optional[jax.Array] = None,
    scale: Optional[float] = None,
    block_q: int = 512,
    block_kv: int = 512,
    fused_bwd: bool = False,
    interpret: Optional[bool] = None,
    pad_head_dim: Optional[bool] = None,
) -> jax.Array:
    """Splash attention on ``(B, L, H, D)`` inputs with GQA and key padding.

    Args:
      q: ``(B, Lq, Hq, D)``; k, v: ``(B, Lk, Hkv, D)``; same float dtype.
      kv_mask / kv_lengths: as in :func:`lumina_jax.ops.attention.attention`.
      scale: softmax scale, default ``1/sqrt(D)``.
      block_q, block_kv: the largest tile sizes, multiples of 128: each is lowered to the one that pads the
        sequence least (:func:`fit_block`). Untuned.
      fused_bwd: use splash's fused dq/dkv backward kernel.
      interpret: run the Pallas interpreter (CPU); default True unless the default backend is TPU.
      pad_head_dim: pad D to a multiple of 128; default only when compiling for TPU.
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B,Lq,Hq,D) and k, v (B,Lk,Hkv,D); got {q.shape}, {k.shape}, {v.shape}")
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv}")
    if not jnp.issubdtype(q.dtype, jnp.floating) or q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if kv_mask is not None and kv_lengths is not None:
        raise ValueError("pass kv_mask or kv_lengths, not both")
    if block_q % _LANES or block_kv % _LANES:
        raise ValueError(f"splash block sizes must be multiples of {_LANES}, got {block_q}, {block_kv}")
    if interpret is None:
        if jax.default_backend() == "gpu":  # the interpreter there would be orders of magnitude slower, unsaid
            raise ValueError("splash is a TPU (Mosaic) kernel: on GPU use the 'cudnn' or 'pallas' attention "
                             "backend (or pass interpret=True to run it in the Pallas interpreter)")  # fmt: skip
        interpret = jax.default_backend() != "tpu"
    if pad_head_dim is None:
        pad_head_dim = not interpret
    if scale is None:
        scale = 1.0 / math.sqrt(d)

    bq, bkv = fit_block(lq, block_q), fit_block(lk, block_kv)
    lq_pad, lk_pad = _round_up(lq, bq), _round_up(lk, bkv)
    d_pad = _round_up(d, _LANES) if pad_head_dim else d

    if kv_lengths is not None:
        kv_valid = jnp.arange(lk)[None, :] < kv_lengths[:, None]
    elif kv_mask is not None:
        kv_valid = kv_mask.astype(bool)
    else:
        kv_valid = jnp.ones((b, lk), bool)
    has_keys = jnp.any(kv_valid, axis=1)  # (B,)
    # Keep every softmax row well defined; the output of key-less samples is zeroed below.
    kv_valid = kv_valid.at[:, 0].set(kv_valid[:, 0] | ~has_keys)
    kv_ids = jnp.pad(kv_valid.astype(jnp.int32), ((0, 0), (0, lk_pad - lk)))
    q_ids = jnp.ones((b, lq_pad), jnp.int32)

    def to_hld(x, length):  # (B, L, H, D) -> (B, H, L_pad, D_pad)
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - d)))
        return jnp.transpose(x, (0, 2, 1, 3))

    qs = to_hld((q * jnp.asarray(scale, jnp.float32)).astype(q.dtype), lq_pad)
    ks, vs = to_hld(k, lk_pad), to_hld(v, lk_pad)
    kernel = _make_kernel(hq, lq_pad, lk_pad, bq, bkv, fused_bwd, bool(interpret))

    def one(qb, kb, vb, qi, ki):
        return kernel(qb, kb, vb, segment_ids=splash.SegmentIds(q=qi, kv=ki))

    out = jax.vmap(one)(qs, ks, vs, q_ids, kv_ids)  # (B, Hq, Lq_pad, D_pad)
    out = jnp.transpose(out, (0, 2, 1, 3))[:, :lq, :, :d].astype(q.dtype)
    return jnp.where(has_keys[:, None, None, None], out, jnp.zeros((), q.dtype))


@register_backend("splash")
def splash_backend(q, k, v, *, kv_mask, kv_lengths, scale):
    """Backend entry: :func:`splash_attention` with default block sizes."""
    return splash_attention(q, k, v, kv_mask, kv_lengths=kv_lengths, scale=scale)


def shard_over_batch_and_heads(
    fn: Callable[..., jax.Array],
    mesh: jax.sharding.Mesh,
    batch_axes: str | tuple[str, ...] | None = "data",
    head_axis: Optional[str] = None,
) -> Callable[..., jax.Array]:
    """Wrap an attention function ``fn(q, k, v, kv_mask, kv_lengths)`` in ``jax.shard_map``.

    Every device runs the kernel on its own batch slice (and kv-head-group slice when
    ``head_axis`` is given; the kv heads must divide evenly, and query heads are split consistently
    because head ``h`` belongs to group ``h // G``). Needed for Mosaic kernels under a multi-device
    ``jit``. ``kv_mask`` / ``kv_lengths`` may be None.
    """
    from jax.sharding import PartitionSpec as P

    qkv = P(batch_axes, None, head_axis, None)

    def wrapped(q, k, v, kv_mask=None, kv_lengths=None):
        extra = [x for x in (kv_mask, kv_lengths) if x is not None]
        specs = [P(batch_axes, None) if x.ndim == 2 else P(batch_axes) for x in extra]

        def local(q, k, v, *rest):
            it = iter(rest)
            m = next(it) if kv_mask is not None else None
            n = next(it) if kv_lengths is not None else None
            return fn(q, k, v, m, n)

        return jax.shard_map(
            local, mesh=mesh, in_specs=(qkv, qkv, qkv, *specs), out_specs=qkv, check_vma=False
        )(q, k, v, *extra)

    return wrapped
