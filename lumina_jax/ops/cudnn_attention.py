"""Attention backend ``"cudnn"``: cuDNN flash attention through ``jax.nn.dot_product_attention``.

The fastest option measured on Hopper for Lumina's shape (docs/jax_notes.md section 3.1: 0.70 ms fwd,
2.85 ms fwd+bwd on an H200 for B=2, L=4352, 24/8 heads, D=96, bf16). ``jax.nn.dot_product_attention``
takes our ``(B, L, H, D)`` layout (its ``BTNH``) and GQA (kv heads dividing query heads) natively.

* ``kv_lengths`` -> ``key_value_seq_lengths`` (cuDNN's padding mask; padded kv blocks are skipped).
* ``kv_mask`` (general boolean) -> ``mask`` broadcast to ``(B, 1, Lq, Lk)``: cuDNN only accepts a
  bias/mask with the full ``(Lq, Lk)`` extent, so JAX materialises it as an additive bias of
  ``B * Lq * Lk`` elements. Prefer ``kv_lengths`` whenever the valid keys are a prefix.
* Rows without any valid key: cuDNN's behaviour there is not something to rely on (and a mask
  turned into a finite bias would average all values), so samples without valid keys get key 0
  marked valid and that key's value zeroed: their output is exactly zero and so are their gradients.
  (Zeroing one value row costs nothing; zeroing the output afterwards was a full extra pass over it,
  ~0.6 ms per 2B forward on an H200.)
* cuDNN runs fp16/bf16 only (head_dim a multiple of 8, <= 256 on Hopper, 96 is fine; with a mask in
  training, even ``Lq``/``Lk``). float32 inputs fall back to ``implementation="xla"`` instead of
  failing, so an fp32 debugging run on GPU still works.

Verified on CPU only through ``implementation="xla"`` (same wrapper logic, tests in
``tests/test_attention_kernels.py``); the cuDNN path itself needs a GPU (test marked ``gpu``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from lumina_jax.ops.attention import register_backend

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_mask: Optional[jax.Array] = None,
    *,
    kv_lengths: Optional[jax.Array] = None,
    scale: Optional[float] = None,
    implementation: Optional[str] = "cudnn",
) -> jax.Array:
    """``jax.nn.dot_product_attention`` with our masking contract.

    ``implementation``: ``"cudnn"`` (default; float32 inputs use ``"xla"``), ``"xla"`` or None
    (JAX picks). Returns ``(B, Lq, Hq, D)`` in ``q.dtype``; rows without valid keys are zeros.
    """
    if kv_mask is not None and kv_lengths is not None:
        raise ValueError("pass kv_mask or kv_lengths, not both")
    b, lq = q.shape[:2]
    lk = k.shape[1]
    if implementation == "cudnn" and not any(q.dtype == t for t in _CUDNN_DTYPES):
        implementation = "xla"

    lengths = mask = None
    if kv_lengths is not None:
        lengths = jnp.clip(kv_lengths.astype(jnp.int32), 0, lk)
        has_keys = lengths > 0
        lengths = jnp.maximum(lengths, 1)
    elif kv_mask is not None:
        kv_mask = kv_mask.astype(bool)
        has_keys = jnp.any(kv_mask, axis=1)
        kv_mask = kv_mask.at[:, 0].set(kv_mask[:, 0] | ~has_keys)
        mask = jnp.broadcast_to(kv_mask[:, None, None, :], (b, 1, lq, lk))
    else:
        has_keys = None

    if has_keys is not None:  # key 0 of an empty sample is attended alone: give it a zero value
        v = v.at[:, 0].multiply(has_keys[:, None, None].astype(v.dtype))
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        scale=scale,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    return out.astype(q.dtype)


@register_backend("cudnn")
def cudnn_backend(q, k, v, *, kv_mask, kv_lengths, scale):
    """Backend entry: :func:`cudnn_attention` with ``implementation="cudnn"``."""
    return cudnn_attention(q, k, v, kv_mask, kv_lengths=kv_lengths, scale=scale)
