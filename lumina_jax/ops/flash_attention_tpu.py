"""Our flash attention kernels for TPU (Pallas -> Mosaic), forward and backward.

The TPU counterpart of :mod:`lumina_jax.ops.flash_attention` (the Triton-targeted kernels): same maths,
same interface (:func:`lumina_jax.ops.flash_attention.flash_attention` dispatches here with
``target="tpu"``, the default on a TPU backend), written for Mosaic's execution model:

* **Sequential grid with VMEM accumulators.** A TPU core walks the grid in order, so the kv loop is
  the innermost grid axis (``"arbitrary"``), and the online-softmax state (running max, sum and the
  ``(bq, D)`` accumulator) lives in VMEM scratch across its steps: initialised at the first kv
  block, normalised and written at the last. The pipeline double-buffers the K/V block DMAs.
* **Key padding without wasted DMAs.** ``kv_lengths`` is a scalar-prefetch operand (SMEM). The K/V
  index maps clamp the block index to the last block holding a valid key, so blocks past the length
  repeat the previous block index (the pipeline skips the copy) and ``pl.when`` skips their compute.
  A general ``kv_mask`` is applied elementwise on top (the wrapper turns it into an effective length).
* **GQA without copies.** Query head ``h`` reads kv head ``h // G`` through the index map. The dk/dv
  kernel's grid is (batch, kv head, kv block, group head, q block): the group's ``G`` query heads and all
  query blocks accumulate into one kv block's dk/dv scratch, so the GQA reduction never leaves VMEM.
* **Layout and tiles.** Kernels see ``(B, H, L, D)`` (the wrapper transposes from the model's
  ``(B, L, H, D)``), so a block's last two dims are ``(rows, D)``: ``D`` is the full head dim (96 needs no
  padding: a block dim equal to the array dim is legal), row blocks are multiples of 128. Row
  statistics use the lane-replicated ``(bq, 128)`` idiom of JAX's splash kernel; the logsumexp and
  ``delta = rowsum(dO * O)`` travel between kernels as ``(B, H, 1, L)`` rows. The backward computes
  ``s^T = k q^T`` so those rows broadcast without transposes; the dq kernel reads them as columns.
* Masked logits are a large finite negative (not ``-inf``: no ``inf - inf`` on the VPU); a row whose
  keys are all masked gets zeros and logsumexp ``+inf`` (so its backward ``p`` is 0), as on GPU.

Verified on CPU (jax 0.10.2): the kernels run in the Pallas interpreter against a float64 reference
(``tests/test_attention_kernels.py``: GQA, ragged and zero lengths, general masks, head_dim 96,
non-multiple lengths, fp32 and bf16, forward and gradients) and compile through Mosaic for v5e/v5p/v6e
topologies with no TPU attached (``tests/test_aot.py``). NOT measured: speed on a TPU (no TPU was
available); the default 256-row blocks are untuned.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_SQ = getattr(pl, "squeezed", None)
_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Static configuration of one call (hashable: a ``nondiff_argnums`` argument)."""

    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    groups: int
    has_mask: bool
    interpret: bool


def _params(cfg: TpuConfig, semantics: tuple[str, ...]):
    return None if cfg.interpret else _CompilerParams(dimension_semantics=semantics)


def _last_block(len_ref, b, block: int):
    """Index of the last block holding a valid key of sample ``b`` (0 when there is none). ``block`` is
    a power of two: a shift, as integer division lowers through ``sign`` (not on the scalar core)."""
    return lax.shift_right_logical(jnp.maximum(len_ref[b] - 1, 0), block.bit_length() - 1)


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _lanes(x, width: int):
    """Lane-replicated ``(rows, 128)`` statistics -> ``(rows, width)`` (``width`` a multiple of 128, or
    less than 128: a slice)."""
    if width <= LANES:
        return x[:, :width]
    return jnp.tile(x, (1, -(-width // LANES)))[:, :width]


# ----------------------------------------------------------------------------------------------
# forward: grid (batch, q head, q block, kv block)


def _fwd_kernel(len_ref, *refs, cfg: TpuConfig, num_k: int):
    if cfg.has_mask:
        mask_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    else:
        mask_ref = None
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    b, j = pl.program_id(0), pl.program_id(3)
    bq, bk = cfg.block_q, cfg.block_k
    kv_len = len_ref[b]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, _MASK, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(j * bk < kv_len)
    def _step():
        s = _dot(q_ref[...], k_ref[...], _NT) * cfg.scale  # (bq, bk)
        key = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        valid = key < kv_len
        if mask_ref is not None:
            valid = jnp.logical_and(valid, mask_ref[...] != 0)  # (1, bk) row broadcast
        s = jnp.where(valid, s, _MASK)
        m_prev = m_scr[...]  # (bq, 128)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - _lanes(m_next, bk))
        alpha = jnp.exp(m_prev - m_next)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_next
        d = acc_scr.shape[1]
        acc_scr[...] = _lanes(alpha, d) * acc_scr[...] + _dot(p.astype(v_ref.dtype), v_ref[...], _NN)

    @pl.when(j == num_k - 1)
    def _finish():
        l = l_scr[...]
        empty = l == 0.0
        inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
        o_ref[...] = (acc_scr[...] * _lanes(inv, acc_scr.shape[1])).astype(o_ref.dtype)
        lse = jnp.where(empty, jnp.inf, m_scr[...] + jnp.log(jnp.where(empty, 1.0, l)))  # (bq, 128)
        lse_ref[...] = jnp.transpose(lse)[0:1, :]  # (1, bq) row


def _fwd_call(q, k, v, lengths, mask, cfg: TpuConfig):
    """``q`` ``(B, Hq, Lq, D)``, ``k``/``v`` ``(B, Hkv, Lk, D)`` (padded) -> out, logsumexp ``(B, Hq, 1, Lq)``."""
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    g, bq, bk = cfg.groups, cfg.block_q, cfg.block_k
    num_k = lk // bk

    def kv_map(n, h, i, j, lens):
        return (n, lax.div(h, g), jnp.minimum(j, _last_block(lens, n, bk)), 0)

    in_specs, args = [], []
    if cfg.has_mask:
        in_specs.append(pl.BlockSpec((_SQ, 1, bk), lambda n, h, i, j, lens: (n, 0, jnp.minimum(j, _last_block(lens, n, bk)))))
        args.append(mask[:, None, :])
    in_specs += [
        pl.BlockSpec((_SQ, _SQ, bq, d), lambda n, h, i, j, lens: (n, h, i, 0)),
        pl.BlockSpec((_SQ, _SQ, bk, d), kv_map),
        pl.BlockSpec((_SQ, _SQ, bk, d), kv_map),
    ]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, hq, lq // bq, num_k),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((_SQ, _SQ, bq, d), lambda n, h, i, j, lens: (n, h, i, 0)),
            pl.BlockSpec((_SQ, _SQ, 1, bq), lambda n, h, i, j, lens: (n, h, 0, i)),
        ],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],  # fmt: skip
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, num_k=num_k),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, 1, lq), jnp.float32)],
        compiler_params=_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="lumina_flash_tpu_fwd",
    )(lengths, *args, q, k, v)


# ----------------------------------------------------------------------------------------------
# backward: dq (grid batch, q head, q block, kv block) and dk/dv (grid batch, kv head, kv block,
# group head, q block)


def _dq_kernel(len_ref, *refs, cfg: TpuConfig, num_k: int):
    if cfg.has_mask:
        mask_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr = refs
    else:
        mask_ref = None
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr = refs
    b, j = pl.program_id(0), pl.program_id(3)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    kv_len = len_ref[b]

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(j * bk < kv_len)
    def _step():
        k, v = k_ref[...], v_ref[...]
        s = _dot(q_ref[...], k, _NT) * cfg.scale  # (bq, bk)
        key = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        valid = key < kv_len
        if mask_ref is not None:
            valid = jnp.logical_and(valid, mask_ref[...] != 0)
        lse = lse_ref[0][:, None]  # (bq, 1) column
        p = jnp.where(valid, jnp.exp(s - lse), 0.0)
        dp = _dot(do_ref[...], v, _NT)
        ds = p * (dp - delta_ref[0][:, None])
        dq_scr[...] += _dot(ds.astype(k.dtype), k, _NN)

    @pl.when(j == num_k - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(len_ref, *refs, cfg: TpuConfig, num_q: int):
    if cfg.has_mask:
        mask_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
    else:
        mask_ref = None
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
    b, j, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    kv_len = len_ref[b]
    first = jnp.logical_and(gi == 0, i == 0)
    last = jnp.logical_and(gi == cfg.groups - 1, i == num_q - 1)

    @pl.when(first)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(j * bk < kv_len)
    def _step():
        q, do = q_ref[...], do_ref[...]
        st = _dot(k_ref[...], q, _NT) * cfg.scale  # (bk, bq) = s^T
        key = j * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
        valid = key < kv_len
        if mask_ref is not None:
            valid = jnp.logical_and(valid, mask_ref[...] != 0)  # (bk, 1) column broadcast
        pt = jnp.where(valid, jnp.exp(st - lse_ref[...]), 0.0)  # lse row (1, bq)
        dv_scr[...] += _dot(pt.astype(do.dtype), do, _NN)
        dpt = _dot(v_ref[...], do, _NT)  # (bk, bq)
        dst = pt * (dpt - delta_ref[...])
        dk_scr[...] += _dot(dst.astype(q.dtype), q, _NN)

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _bwd_calls(q, k, v, lengths, mask, o, lse, do, cfg: TpuConfig):
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, bq, bk = cfg.groups, cfg.block_q_bwd, cfg.block_k_bwd
    num_q, num_k = lq // bq, lk // bk
    delta = jnp.einsum("bhld,bhld->bhl", o.astype(jnp.float32), do.astype(jnp.float32))[:, :, None, :]

    # dq: like the forward, kv blocks past the length are neither copied nor computed
    def kv_map(n, h, i, j, lens):
        return (n, lax.div(h, g), jnp.minimum(j, _last_block(lens, n, bk)), 0)

    def q_map(n, h, i, j, lens):
        return (n, h, i, 0)

    def row_map(n, h, i, j, lens):
        return (n, h, 0, i)

    specs, args = [], []
    if cfg.has_mask:
        specs.append(pl.BlockSpec((_SQ, 1, bk), lambda n, h, i, j, lens: (n, 0, jnp.minimum(j, _last_block(lens, n, bk)))))
        args.append(mask[:, None, :])
    row = pl.BlockSpec((_SQ, _SQ, 1, bq), row_map)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, num_k=num_k),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, hq, num_q, num_k),
            in_specs=specs + [pl.BlockSpec((_SQ, _SQ, bq, d), q_map), pl.BlockSpec((_SQ, _SQ, bk, d), kv_map),
                              pl.BlockSpec((_SQ, _SQ, bk, d), kv_map), pl.BlockSpec((_SQ, _SQ, bq, d), q_map),
                              row, row],  # fmt: skip
            out_specs=pl.BlockSpec((_SQ, _SQ, bq, d), q_map),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="lumina_flash_tpu_bwd_dq",
    )(lengths, *args, q, k, v, do, lse, delta)

    # dk/dv: for a kv block past the length every (group head, q block) step maps to the same q/dO
    # block, so nothing is copied for it and its dk/dv are written as zeros
    def live(n, j, lens):
        return j * bk < lens[n]

    def qh_map(n, hk, j, gi, i, lens):
        on = live(n, j, lens)
        return (n, hk * g + jnp.where(on, gi, 0), jnp.where(on, i, 0), 0)

    def qrow_map(n, hk, j, gi, i, lens):
        on = live(n, j, lens)
        return (n, hk * g + jnp.where(on, gi, 0), 0, jnp.where(on, i, 0))

    def k_map(n, hk, j, gi, i, lens):
        return (n, hk, j, 0)

    specs, args = [], []
    if cfg.has_mask:
        specs.append(pl.BlockSpec((_SQ, bk, 1), lambda n, hk, j, gi, i, lens: (n, j, 0)))
        args.append(mask[:, :, None])
    qrow = pl.BlockSpec((_SQ, _SQ, 1, bq), qrow_map)
    kspec = pl.BlockSpec((_SQ, _SQ, bk, d), k_map)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, num_q=num_q),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, hkv, num_k, g, num_q),
            in_specs=specs + [pl.BlockSpec((_SQ, _SQ, bq, d), qh_map), kspec, kspec,
                              pl.BlockSpec((_SQ, _SQ, bq, d), qh_map), qrow, qrow],  # fmt: skip
            out_specs=[kspec, kspec],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(cfg, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=cfg.interpret,
        name="lumina_flash_tpu_bwd_dkv",
    )(lengths, *args, q, k, v, do, lse, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# custom_vjp over the padded problem, in the model's (B, L, H, D) layout


def _to_heads(x):
    return jnp.swapaxes(x, 1, 2)  # (B, L, H, D) <-> (B, H, L, D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def flash_tpu(q, k, v, lengths, mask, cfg: TpuConfig):
    """Padded inputs ``(B, L, H, D)`` (lengths multiples of the blocks), ``lengths`` ``(B,)`` int32,
    ``mask`` ``(B, Lk)`` int32 or None -> ``(B, Lq, Hq, D)``."""
    return _flash_fwd(q, k, v, lengths, mask, cfg)[0]


def _flash_fwd(q, k, v, lengths, mask, cfg: TpuConfig):
    qh, kh, vh = _to_heads(q), _to_heads(k), _to_heads(v)
    o, lse = _fwd_call(qh, kh, vh, lengths, mask, cfg)
    return _to_heads(o), (qh, kh, vh, lengths, mask, o, lse)


def _flash_bwd(cfg: TpuConfig, res, do):
    qh, kh, vh, lengths, mask, o, lse = res
    dq, dk, dv = _bwd_calls(qh, kh, vh, lengths, mask, o, lse, _to_heads(do), cfg)
    return _to_heads(dq), _to_heads(dk), _to_heads(dv), None, None


flash_tpu.defvjp(_flash_fwd, _flash_bwd)
