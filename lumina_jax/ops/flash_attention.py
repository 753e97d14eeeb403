"""Our own Pallas flash attention (forward + backward) for Lumina's attention shapes: the GPU (Triton)
kernels, and the public wrapper for both targets.

Registered as attention backend ``"pallas"`` (see :mod:`lumina_jax.ops.attention`).

What it computes: ``softmax(scale * q k^T + mask) v`` per query head, layout ``(B, L, H, D)``, with

* **GQA without copies**: ``k``/``v`` have ``Hkv`` heads, query head ``h`` reads kv head
  ``h // (Hq // Hkv)``. The kv head is chosen in the ``BlockSpec`` index map, so K/V are never
  repeated in memory. In the backward pass the dk/dv kernel runs once per *kv* head and loops over
  the ``G = Hq // Hkv`` query heads of its group, so the GQA reduction of dk/dv happens in
  registers (no per-query-head dk/dv buffer, no atomics).
* **Key padding**: ``kv_lengths`` (``(B,)`` prefix lengths) bounds the kv loop of every kernel, so
  fully padded kv blocks are never loaded or computed; a general boolean ``kv_mask`` is applied
  elementwise and its trailing all-False blocks are skipped the same way (the wrapper turns the mask
  into an "effective length" = last True index + 1). Query rows without any valid key give zeros
  (never NaN) and zero gradients.
* **Online softmax** (flash-attention 2): fp32 running max / sum / accumulator, exp2 with the
  ``log2(e)`` factor folded into the scale; the forward saves only the base-2 logsumexp per row.
* **Backward** (flash-attention 2 style): ``delta = rowsum(dO * O)`` in XLA, then a dq kernel
  (grid over query blocks, loop over kv blocks) and a dk/dv kernel (grid over kv blocks and kv heads,
  loop over the group's query heads and query blocks), both recomputing ``p = exp2(s - lse)``.
* **Shapes the lowering dislikes are padded in the wrapper**: sequence lengths are padded up to a
  multiple of the largest block size (padded keys are masked through the length, padded query rows
  are sliced off). Triton only handles power-of-two tiles, so on GPU a head dim like Lumina's 96 is
  run as power-of-two *chunks* (64 + 32, ``split_head_dim``): the kernels read each chunk from a
  128-wide block (Triton masks the columns past 96), do one matmul per chunk where there was one, and
  store the chunks; nothing is padded or copied. (Until 2026-11-27 the wrapper zero-padded 96 -> 128:
  +33% tensor-core work and an extra copy of q/k/v/o; ``pad_head_dim=True`` still does that, and it is
  the fallback for head dims whose chunks would be under 16.) In interpret mode (CPU) neither is needed.
* dtypes: float32 and bfloat16 (tested), float16 (accepted, untested); matmuls accumulate in fp32;
  ``p`` and ``ds`` are cast to the input dtype before their matmuls (standard flash-attention
  practice), fp32 matmuls are IEEE (not TF32) in the Triton lowering.

Platforms:

* GPU: ``pl.pallas_call`` with ``triton.CompilerParams`` (this explicitly selects the Triton
  lowering; without it jax 0.10 picks Mosaic GPU).
* CPU: ``interpret=True`` (the default there), used by the tests.
* TPU: the same maths as Mosaic kernels in :mod:`lumina_jax.ops.flash_attention_tpu`
  (``target="tpu"``, the default on a TPU backend; compiled for v5e/v5p/v6e on the CPU, not timed).
  ``auto`` still picks splash on TPU (neither is measured there).

Verified (CPU, jax 0.10.2): forward and gradients against a float64 reference in interpret mode
(``tests/test_attention_kernels.py``: GQA, ragged lengths incl. 0, general masks, head_dim 96,
several block sizes, non-multiple sequence lengths; relative L2 error ~3e-7 in fp32 and ~2.5e-3
in bf16 for outputs and gradients), and that the whole fwd+bwd
program lowers to Triton IR for ``platforms=['cuda']`` via ``jax.export`` (this runs the Pallas ->
Triton lowering with its power-of-two and primitive checks on the CPU). NOT verified here (no GPU
on the development machine): Triton -> PTX compilation, run-time numerics on a GPU, and speed;
block sizes / num_warps were untuned defaults until the first H200 lease (2026-11-27), see BlockSizes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton compiler params select the Triton lowering on GPU.
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - very old/odd jax builds
    pltriton = None

from lumina_jax.ops.attention import register_backend

_LOG2E = math.log2(math.e)
# A squeezed (size-1, dropped) block dimension; `None` means the same on older jax.
_SQ = getattr(pl, "squeezed", None)
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two). ``*_bwd`` are used by both backward kernels.

    Forward defaults from a sweep on an H200 (B 2, 4352 tokens, 24/8 heads, D 96 padded to 128, bf16;
    BENCHMARKS.md): 128 x 64 tiles with 4 warps, 2 stages ran 1.38 ms against 1.98 ms with 8 warps. The
    backward tiles and warps are still untuned guesses (the backward had not compiled on the GPU then).
    """

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: Optional[int] = 4  # GPU only, forward kernel; None: 4 for head_dim <= 64, else 8
    num_stages: int = 2  # GPU only
    num_warps_bwd: Optional[int] = None  # GPU only, backward kernels; None: as num_warps=None

    def all_blocks(self) -> tuple[int, int, int, int]:
        return (self.block_q, self.block_k, self.block_q_bwd, self.block_k_bwd)


# TPU (Mosaic) kernels: row blocks are multiples of the 128 lanes; untuned (no TPU measured).
TPU_BLOCK_SIZES = BlockSizes(block_q=256, block_k=256, block_q_bwd=256, block_k_bwd=256)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration of one call (hashable: a ``nondiff_argnums`` argument)."""

    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    groups: int  # query heads per kv head
    has_mask: bool
    interpret: bool
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    # head-dim layout: BlockSpec width (a power of two, may exceed D: Triton masks the excess) and the
    # (offset, size) power-of-two chunks the kernels load, multiply and store separately
    d_block: int = 0
    d_chunks: tuple[tuple[int, int], ...] = ()


def _compiler_params(cfg: _Config, backward: bool = False):
    if cfg.interpret or pltriton is None:
        return None
    return pltriton.CompilerParams(num_warps=cfg.num_warps_bwd if backward else cfg.num_warps,
                                   num_stages=cfg.num_stages)


def _cdiv(a, b: int):
    return lax.div(a + (b - 1), b)


def _key_valid(kv_len, mask_ref, start, block: int):
    """(block,) bool: key index in [start, start + block) is attendable."""
    idx = start + lax.broadcasted_iota(jnp.int32, (block,), 0)
    valid = idx < kv_len
    if mask_ref is not None:
        valid = jnp.logical_and(valid, mask_ref[pl.ds(start, block)] != 0)
    return valid


def _dot_nt(a, b):
    """a @ b.T with fp32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a.T @ b with fp32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _load(ref, rows, cfg: _Config, *lead) -> list:
    """The head-dim chunks of ``ref[*lead, rows, ...]`` (or ``ref[rows, *lead, ...]`` via ``lead``), one tile each."""
    return [ref[(rows, *lead, pl.ds(off, size))] for off, size in cfg.d_chunks]


def _store(ref, tiles: list, cfg: _Config, scale=None) -> None:
    for (off, size), t in zip(cfg.d_chunks, tiles):
        ref[:, pl.ds(off, size)] = (t if scale is None else t * scale).astype(ref.dtype)


def _dot_nt_sum(a: list, b: list):
    """sum_c a_c @ b_c.T: ``a @ b.T`` over the chunked head dim."""
    out = _dot_nt(a[0], b[0])
    for x, y in zip(a[1:], b[1:]):
        out = out + _dot_nt(x, y)
    return out


# ----------------------------------------------------------------------------------------------
# Forward kernel. Grid (q blocks, q heads, batch).
# ----------------------------------------------------------------------------------------------


def _fwd_kernel(len_ref, *refs, cfg: _Config):
    if cfg.has_mask:
        mask_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    else:
        mask_ref = None
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    bq, bk = cfg.block_q, cfg.block_k
    kv_len = len_ref[0]
    q = _load(q_ref, slice(None), cfg)  # [(bq, chunk)]
    qk_scale = cfg.scale * _LOG2E

    def body(j, carry):
        acc, m, l = carry
        start = j * bk
        k = _load(k_ref, pl.ds(start, bk), cfg)  # [(bk, chunk)]
        v = _load(v_ref, pl.ds(start, bk), cfg)
        s = _dot_nt_sum(q, k) * qk_scale  # (bq, bk), base-2 logits
        valid = _key_valid(kv_len, mask_ref, start, bk)
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row whose keys so far are all masked keeps m = -inf; use 0 as the shift so that
        # exp2(-inf - shift) = 0 instead of NaN.
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp2(s - shift[:, None])
        alpha = jnp.exp2(m - shift)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = [alpha[:, None] * a + _dot_nn(p.astype(vc.dtype), vc) for a, vc in zip(acc, v)]
        return acc, m_new, l

    acc = [jnp.zeros(t.shape, jnp.float32) for t in q]
    m = jnp.full((bq,), -jnp.inf, jnp.float32)
    l = jnp.zeros((bq,), jnp.float32)
    acc, m, l = lax.fori_loop(0, _cdiv(kv_len, bk), body, (acc, m, l))
    empty = l == 0.0
    _store(o_ref, [a / jnp.where(empty, 1.0, l)[:, None] for a in acc], cfg)
    # +inf for rows without keys: the backward then computes p = exp2(s - inf) = 0.
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _fwd_call(q, k, v, lengths, mask, cfg: _Config):
    b, lq, hq, d = q.shape
    lk = k.shape[1]
    g, bq = cfg.groups, cfg.block_q
    grid = (lq // bq, hq, b)
    in_specs = [pl.BlockSpec((_SQ, 1), lambda i, h, n: (n, 0))]
    args = [lengths]
    if cfg.has_mask:
        in_specs.append(pl.BlockSpec((_SQ, lk), lambda i, h, n: (n, 0)))
        args.append(mask)
    in_specs += [
        pl.BlockSpec((_SQ, bq, _SQ, cfg.d_block), lambda i, h, n: (n, i, h, 0)),
        pl.BlockSpec((_SQ, lk, _SQ, cfg.d_block), lambda i, h, n: (n, 0, h // g, 0)),
        pl.BlockSpec((_SQ, lk, _SQ, cfg.d_block), lambda i, h, n: (n, 0, h // g, 0)),
    ]
    out_specs = [
        pl.BlockSpec((_SQ, bq, _SQ, cfg.d_block), lambda i, h, n: (n, i, h, 0)),
        pl.BlockSpec((_SQ, _SQ, bq), lambda i, h, n: (n, h, i)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, hq, lq), jnp.float32),  # base-2 logsumexp
    ]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="lumina_flash_fwd",
    )(*args, q, k, v)


# ----------------------------------------------------------------------------------------------
# Backward kernels.
# ----------------------------------------------------------------------------------------------


def _dq_kernel(len_ref, *refs, cfg: _Config):
    """Grid (q blocks, q heads, batch): dq for one query block, looping over kv blocks."""
    if cfg.has_mask:
        mask_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    else:
        mask_ref = None
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    bk = cfg.block_k_bwd
    kv_len = len_ref[0]
    q = _load(q_ref, slice(None), cfg)
    do = _load(do_ref, slice(None), cfg)
    lse = lse_ref[...]
    delta = delta_ref[...]
    qk_scale = cfg.scale * _LOG2E

    def body(j, dq):
        start = j * bk
        k = _load(k_ref, pl.ds(start, bk), cfg)
        v = _load(v_ref, pl.ds(start, bk), cfg)
        s = _dot_nt_sum(q, k) * qk_scale
        valid = _key_valid(kv_len, mask_ref, start, bk)
        s = jnp.where(valid[None, :], s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])
        dp = _dot_nt_sum(do, v)
        ds = p * (dp - delta[:, None])
        return [a + _dot_nn(ds.astype(kc.dtype), kc) for a, kc in zip(dq, k)]

    dq = lax.fori_loop(0, _cdiv(kv_len, bk), body, [jnp.zeros(t.shape, jnp.float32) for t in q])
    _store(dq_ref, dq, cfg, cfg.scale)


def _dkv_kernel(len_ref, *refs, cfg: _Config):
    """Grid (kv blocks, kv heads, batch): dk, dv for one kv block, summed over the group's query
    heads and all query blocks (the GQA reduction)."""
    if cfg.has_mask:
        mask_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    else:
        mask_ref = None
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    kv_len = len_ref[0]
    start_k = pl.program_id(0) * bk
    k = _load(k_ref, slice(None), cfg)  # [(bk, chunk)]
    v = _load(v_ref, slice(None), cfg)
    valid = _key_valid(kv_len, mask_ref, start_k, bk)
    qk_scale = cfg.scale * _LOG2E
    num_q_blocks = q_ref.shape[0] // bq
    # Fully padded kv block: run no iterations (dk = dv = 0 are written).
    # (int32 operands on purpose: with Python ints the Triton lowering typed this select as i1, which
    # failed Triton's verifier as a loop bound -- seen on an H200 with jax 0.11.2)
    q_iters = jnp.where(start_k < kv_len, jnp.int32(num_q_blocks), jnp.int32(0))

    def head_body(g, carry):
        def q_body(i, carry):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q = _load(q_ref, rows, cfg, g)  # [(bq, chunk)]
            do = _load(do_ref, rows, cfg, g)
            lse = lse_ref[g, rows]
            delta = delta_ref[g, rows]
            s = _dot_nt_sum(q, k) * qk_scale
            s = jnp.where(valid[None, :], s, -jnp.inf)
            p = jnp.exp2(s - lse[:, None])  # (bq, bk)
            dv = [a + _dot_tn(p.astype(dc.dtype), dc) for a, dc in zip(dv, do)]
            dp = _dot_nt_sum(do, v)
            ds = p * (dp - delta[:, None])
            dk = [a + _dot_tn(ds.astype(qc.dtype), qc) for a, qc in zip(dk, q)]
            return dk, dv

        return lax.fori_loop(0, q_iters, q_body, carry)

    zeros = [jnp.zeros(t.shape, jnp.float32) for t in k]
    dk, dv = lax.fori_loop(0, cfg.groups, head_body, (zeros, list(zeros)))
    _store(dk_ref, dk, cfg, cfg.scale)
    _store(dv_ref, dv, cfg)


def _bwd_calls(q, k, v, lengths, mask, o, lse, do, cfg: _Config):
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g, bq, bk = cfg.groups, cfg.block_q_bwd, cfg.block_k_bwd
    # (B, Hq, Lq) fp32; cheap elementwise work, left to XLA.
    delta = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))

    len_spec = pl.BlockSpec((_SQ, 1), lambda i, h, n: (n, 0))
    mask_spec = pl.BlockSpec((_SQ, lk), lambda i, h, n: (n, 0))
    head = [lengths] + ([mask] if cfg.has_mask else [])
    head_specs = [len_spec] + ([mask_spec] if cfg.has_mask else [])

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(lq // bq, hq, b),
        in_specs=head_specs
        + [
            pl.BlockSpec((_SQ, bq, _SQ, cfg.d_block), lambda i, h, n: (n, i, h, 0)),  # q
            pl.BlockSpec((_SQ, lk, _SQ, cfg.d_block), lambda i, h, n: (n, 0, h // g, 0)),  # k
            pl.BlockSpec((_SQ, lk, _SQ, cfg.d_block), lambda i, h, n: (n, 0, h // g, 0)),  # v
            pl.BlockSpec((_SQ, bq, _SQ, cfg.d_block), lambda i, h, n: (n, i, h, 0)),  # do
            pl.BlockSpec((_SQ, _SQ, bq), lambda i, h, n: (n, h, i)),  # lse
            pl.BlockSpec((_SQ, _SQ, bq), lambda i, h, n: (n, h, i)),  # delta
        ],
        out_specs=pl.BlockSpec((_SQ, bq, _SQ, cfg.d_block), lambda i, h, n: (n, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg, backward=True),
        interpret=cfg.interpret,
        name="lumina_flash_bwd_dq",
    )(*head, q, k, v, do, lse, delta)

    # The q / do / lse / delta blocks of a dk/dv program hold all G query heads of its kv head:
    # query heads [hk * G, (hk + 1) * G) are block hk of size G along the head axis.
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(lk // bk, hkv, b),
        in_specs=head_specs
        + [
            pl.BlockSpec((_SQ, lq, g, cfg.d_block), lambda j, hk, n: (n, 0, hk, 0)),  # q
            pl.BlockSpec((_SQ, bk, _SQ, cfg.d_block), lambda j, hk, n: (n, j, hk, 0)),  # k
            pl.BlockSpec((_SQ, bk, _SQ, cfg.d_block), lambda j, hk, n: (n, j, hk, 0)),  # v
            pl.BlockSpec((_SQ, lq, g, cfg.d_block), lambda j, hk, n: (n, 0, hk, 0)),  # do
            pl.BlockSpec((_SQ, g, lq), lambda j, hk, n: (n, hk, 0)),  # lse
            pl.BlockSpec((_SQ, g, lq), lambda j, hk, n: (n, hk, 0)),  # delta
        ],
        out_specs=[
            pl.BlockSpec((_SQ, bk, _SQ, cfg.d_block), lambda j, hk, n: (n, j, hk, 0)),
            pl.BlockSpec((_SQ, bk, _SQ, cfg.d_block), lambda j, hk, n: (n, j, hk, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(cfg, backward=True),
        interpret=cfg.interpret,
        name="lumina_flash_bwd_dkv",
    )(*head, q, k, v, do, lse, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# custom_vjp over the padded problem.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, lengths, mask, cfg: _Config):
    return _fwd_call(q, k, v, lengths, mask, cfg)[0]


def _flash_fwd(q, k, v, lengths, mask, cfg: _Config):
    o, lse = _fwd_call(q, k, v, lengths, mask, cfg)
    return o, (q, k, v, lengths, mask, o, lse)


def _flash_bwd(cfg: _Config, res, do):
    q, k, v, lengths, mask, o, lse = res
    dq, dk, dv = _bwd_calls(q, k, v, lengths, mask, o, lse, do, cfg)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Public wrapper.
# ----------------------------------------------------------------------------------------------


def pow2_chunks(d: int, minimum: int = 16) -> Optional[tuple[tuple[int, int], ...]]:
    """``d`` as (offset, size) power-of-two chunks, largest first (96 -> (0, 64), (64, 32)); None when
    a chunk would be smaller than ``minimum`` (Triton's smallest dot)."""
    chunks, off = [], 0
    for bit in reversed(range(d.bit_length())):
        size = 1 << bit
        if d & size:
            if size < minimum:
                return None
            chunks.append((off, size))
            off += size
    return tuple(chunks)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _fit_block(block: int, length: int, minimum: int) -> int:
    """Shrink a block for short sequences (no point in a 128-row tile for 20 tokens)."""
    return max(minimum, min(block, next_pow2(length)))


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_mask: Optional[jax.Array] = None,
    *,
    kv_lengths: Optional[jax.Array] = None,
    scale: Optional[float] = None,
    block_sizes: Optional[BlockSizes] = None,
    interpret: Optional[bool] = None,
    pad_head_dim: Optional[bool] = None,
    target: Optional[str] = None,
    split_head_dim: Optional[bool] = None,
) -> jax.Array:
    """Flash attention with GQA and key padding; differentiable (Pallas backward).

    Args:
      q: ``(B, Lq, Hq, D)``; float32, bfloat16 or float16.
      k, v: ``(B, Lk, Hkv, D)``, same dtype as ``q``, ``Hq % Hkv == 0``.
      kv_mask: optional ``(B, Lk)`` bool, True = key may be attended to.
      kv_lengths: optional ``(B,)`` int, valid keys form the prefix ``[0, kv_lengths[b])``
        (values are clipped to ``[0, Lk]``). Mutually exclusive with ``kv_mask``.
      scale: softmax scale, default ``1/sqrt(D)``.
      block_sizes: tiles, default :class:`BlockSizes()` (GPU) / :data:`TPU_BLOCK_SIZES`. Powers of
        two; at least 16 on GPU, 128 on TPU. Blocks longer than the (next power of two of the)
        sequence are shrunk.
      interpret: run the Pallas interpreter; default: unless the default backend is ``target``.
      pad_head_dim: zero-pad D to the next power of two (>= 16); default: only when compiling for
        GPU and D cannot be split (Triton needs power-of-two tiles). The TPU kernels take any D.
      split_head_dim: run D as power-of-two chunks of at least 16 (96 = 64 + 32: two matmuls each
        where there was one), so no padded columns are multiplied or copied; default: when compiling
        for GPU, D is not a power of two and splits that way. Mutually exclusive with padding.
      target: ``"gpu"`` (Triton kernels, this module) or ``"tpu"`` (Mosaic kernels,
        :mod:`lumina_jax.ops.flash_attention_tpu`); default: ``"tpu"`` on a TPU backend, else ``"gpu"``.

    Returns:
      ``(B, Lq, Hq, D)`` in ``q.dtype``; rows with no valid key are zeros.
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B,Lq,Hq,D) and k, v (B,Lk,Hkv,D); got {q.shape}, {k.shape}, {v.shape}")
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not any(q.dtype == t for t in _SUPPORTED_DTYPES):
        raise TypeError(f"flash_attention supports float32/bfloat16/float16, got {q.dtype}")
    if kv_mask is not None and kv_lengths is not None:
        raise ValueError("pass kv_mask or kv_lengths, not both")
    if kv_mask is not None and kv_mask.shape != (b, lk):
        raise ValueError(f"kv_mask shape {kv_mask.shape} != (B, Lk) = {(b, lk)}")
    if kv_lengths is not None and kv_lengths.shape != (b,):
        raise ValueError(f"kv_lengths shape {kv_lengths.shape} != (B,) = {(b,)}")
    if lq == 0 or lk == 0:
        raise ValueError(f"empty sequence: Lq={lq}, Lk={lk}")

    platform = jax.default_backend()
    if target is None:
        target = "tpu" if platform == "tpu" else "gpu"
    if target not in ("gpu", "tpu"):
        raise ValueError(f"target must be 'gpu' or 'tpu', got {target!r}")
    if interpret is None:
        interpret = platform != target
    if target == "gpu" and not interpret and platform == "tpu":
        raise NotImplementedError("the Triton kernels do not lower on TPU; use target='tpu' there")
    chunks = pow2_chunks(d)
    compiled_gpu = target == "gpu" and not interpret
    if split_head_dim is None:
        split_head_dim = compiled_gpu and not pad_head_dim and chunks is not None and len(chunks) > 1
    if split_head_dim and (pad_head_dim or chunks is None or target != "gpu"):
        raise ValueError(f"split_head_dim: head_dim {d} needs power-of-two chunks >= 16, the GPU kernels and no "
                         f"padding (pad_head_dim={pad_head_dim}, target={target!r})")  # fmt: skip
    if pad_head_dim is None:
        pad_head_dim = compiled_gpu and not split_head_dim and (d & (d - 1) != 0 or d < 16)
    bs = block_sizes or (TPU_BLOCK_SIZES if target == "tpu" else BlockSizes())
    # Triton dots need >= 16 rows/cols; Mosaic row blocks are multiples of the 128 lanes
    min_block = 128 if target == "tpu" else (8 if interpret else 16)
    for blk in bs.all_blocks():
        if blk < min_block or blk & (blk - 1):
            raise ValueError(f"block sizes for target {target!r} must be powers of two >= {min_block}, got {bs}")

    bq, bk = _fit_block(bs.block_q, lq, min_block), _fit_block(bs.block_k, lk, min_block)
    bq_bwd, bk_bwd = _fit_block(bs.block_q_bwd, lq, min_block), _fit_block(bs.block_k_bwd, lk, min_block)
    # Powers of two: padding to the largest block makes every block size divide the length.
    lq_pad = _round_up(lq, max(bq, bq_bwd))
    lk_pad = _round_up(lk, max(bk, bk_bwd))
    d_pad = max(16, next_pow2(d)) if pad_head_dim else d
    # the kernels' head-dim layout: one chunk of the (padded) D, or D's power-of-two chunks read from a
    # power-of-two wide block (Triton masks the columns past D)
    d_block, d_chunks = (next_pow2(d), chunks) if split_head_dim else (d_pad, ((0, d_pad),))
    if d_pad > 256:
        raise ValueError(f"head_dim {d} too large for this kernel (max 256)")

    if scale is None:
        scale = 1.0 / math.sqrt(d)
    # Effective key length: valid keys lie in [0, length); everything at or beyond it is skipped.
    if kv_lengths is not None:
        lengths = jnp.clip(kv_lengths.astype(jnp.int32), 0, lk)
        mask = None
    elif kv_mask is not None:
        idx = jnp.arange(1, lk + 1, dtype=jnp.int32)
        lengths = jnp.max(jnp.where(kv_mask, idx[None, :], 0), axis=1).astype(jnp.int32)
        mask = jnp.pad(kv_mask.astype(jnp.int32), ((0, 0), (0, lk_pad - lk)))
    else:
        lengths = jnp.full((b,), lk, jnp.int32)
        mask = None

    def pad(x, length):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - d)))

    if target == "tpu":
        from lumina_jax.ops.flash_attention_tpu import TpuConfig, flash_tpu

        tcfg = TpuConfig(scale=float(scale), block_q=bq, block_k=bk, block_q_bwd=bq_bwd, block_k_bwd=bk_bwd,
                         groups=hq // hkv, has_mask=mask is not None, interpret=bool(interpret))  # fmt: skip
        out = flash_tpu(pad(q, lq_pad), pad(k, lk_pad), pad(v, lk_pad), lengths, mask, tcfg)
        return out[:, :lq, :, :d]

    cfg = _Config(
        scale=float(scale),
        block_q=bq,
        block_k=bk,
        block_q_bwd=bq_bwd,
        block_k_bwd=bk_bwd,
        groups=hq // hkv,
        has_mask=mask is not None,
        interpret=bool(interpret),
        num_warps=bs.num_warps or (4 if d_pad <= 64 else 8),
        num_stages=bs.num_stages,
        num_warps_bwd=bs.num_warps_bwd or (4 if d_pad <= 64 else 8),
        d_block=d_block,
        d_chunks=d_chunks,
    )

    out = _flash(pad(q, lq_pad), pad(k, lk_pad), pad(v, lk_pad), lengths[:, None], mask, cfg)
    return out[:, :lq, :, :d]


@register_backend("pallas")
def pallas_attention(q, k, v, *, kv_mask, kv_lengths, scale):
    """Backend entry: :func:`flash_attention` with default block sizes."""
    return flash_attention(q, k, v, kv_mask, kv_lengths=kv_lengths, scale=scale)
