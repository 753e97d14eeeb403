"""Timing of the attention backends at Lumina's joint-attention shape.

``bench_attention`` times every backend that runs natively on the current platform (forward and
forward+backward) and reports TFLOP/s with the usual analytic count: ``4 * B * Hq * Lq * Lk * D``
for the forward (two matmuls) and 3.5x that for forward+backward (the backward recomputes ``q k^T``
and does four more matmuls: 2.5x the forward). Masked-out keys are still counted, as in
docs/jax_notes.md section 3.1, so numbers are comparable across backends.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.ops import attention as attn

# Backends worth timing per platform. Pallas kernels run on CPU only through the interpreter,
# which says nothing about speed, so they are left out there unless asked for by name.
# "pallas_stock" (bench only, not a model backend): jax's bundled Triton kernel, for comparison.
_NATIVE = {
    "gpu": ("xla", "cudnn", "pallas", "pallas_stock", "auto"),
    "tpu": ("xla", "splash", "pallas", "auto"),
    "cpu": ("xla", "auto"),
}


def stock_pallas_attention(q, k, v, kv_lengths=None, *, scale=None, interpret=None):
    """jax's bundled Pallas GPU (Triton) kernel ``jax.experimental.pallas.ops.gpu.attention.mha``,
    the baseline our kernel must beat. It has no GQA (K/V are repeated to the query heads here) and
    one ``segment_ids`` array for queries and keys: padded keys get segment 0 and valid ones 1, so
    padded *query* rows attend among themselves (their outputs are junk, as in any padded batch).
    Default block sizes; sequence lengths must be multiples of 128."""
    from jax.experimental.pallas.ops.gpu import attention as stock

    b, lq, hq, d = q.shape
    g = hq // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    seg = None
    if kv_lengths is not None:
        seg = (jnp.arange(lq)[None, :] < kv_lengths[:, None]).astype(jnp.int32)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return stock.mha(q, k, v, seg, sm_scale=scale or 1.0 / float(np.sqrt(d)), interpret=interpret)


def _joint_qkv(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype: str, seed: int):
    """Random q ``(B, L, Hq, D)`` and k, v ``(B, L, Hkv, D)`` in ``dtype``."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, seq, h, head_dim)), jnp.dtype(dtype))
                 for h in (heads, kv_heads, kv_heads))  # fmt: skip


def _time(fn, args, iters: int, warmup: int) -> float:
    """Median wall time in ms of ``fn(*args)`` (compiled during warm-up)."""
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_attention(
    batch: int = 2,
    image_tokens: int = 4096,
    caption_tokens: int = 256,
    heads: int = 24,
    kv_heads: int = 8,
    head_dim: int = 96,
    dtype: str = "bfloat16",
    backends: Optional[Sequence[str]] = None,
    valid_caption_tokens: Optional[int] = None,
    iters: int = 20,
    warmup: int = 2,
    seed: int = 0,
    on_rows: Optional[Callable[[list[dict[str, Any]]], None]] = None,
) -> list[dict[str, Any]]:
    """Time attention backends on joint image+caption self-attention.

    Args:
      batch, image_tokens, caption_tokens: sequence ``L = image_tokens + caption_tokens`` (queries
        and keys, as in Next-DiT's joint layers).
      heads, kv_heads, head_dim: GQA shape (Lumina-2: 24, 8, 96).
      dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``.
      backends: names to time; default: the native backends of ``jax.default_backend()``.
      valid_caption_tokens: if given, keys are padded: ``kv_lengths = image + valid`` for the last
        sample (the others are full), exercising the kernels' padding path.
      iters, warmup: timed / untimed calls; the median is reported.

    Returns:
      One dict per (backend, mode): ``backend, mode ("fwd" | "fwd+bwd"), ms, tflops, platform,
      shape, dtype, error`` (``error`` holds the message when a backend failed; ``ms`` is then nan).
    """
    platform = jax.default_backend()
    names = list(backends) if backends is not None else list(_NATIVE.get(platform, ("xla",)))
    q, k, v = _joint_qkv(batch, image_tokens + caption_tokens, heads, kv_heads, head_dim, dtype, seed)
    dt, seq = q.dtype, q.shape[1]
    lengths = None
    if valid_caption_tokens is not None:
        lens = np.full((batch,), seq, np.int32)
        lens[-1] = image_tokens + valid_caption_tokens
        lengths = jnp.asarray(lens)

    fwd_flops = 4.0 * batch * heads * seq * seq * head_dim
    shape = dict(batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    rows = []
    for name in names:
        def fwd(q, k, v, name=name):
            if name == "pallas_stock":
                return stock_pallas_attention(q, k, v, lengths)
            return attn.attention(q, k, v, kv_lengths=lengths, backend=name)

        def fwd_bwd(q, k, v, fwd=fwd):
            loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        def what_ran() -> str:  # auto's pick (known once it traced: it may pass over a backend that fails
            if name == "pallas_stock":  # to build); cudnn's own XLA fallback for fp32
                return name
            runs = attn.resolve_backend(name, dt, head_dim)
            return "xla" if runs == "cudnn" and not attn.attention_uses_kernel(runs, dt, head_dim) else runs

        for mode, fn, flops in (("fwd", fwd, fwd_flops), ("fwd+bwd", fwd_bwd, 3.5 * fwd_flops)):
            row = dict(backend=name, runs=what_ran(), mode=mode, platform=platform, dtype=str(dt), error=None,
                       **shape)  # fmt: skip
            try:
                ms = _time(jax.jit(fn), (q, k, v), iters, warmup)
                row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12, runs=what_ran())
            except Exception as e:  # a backend that cannot run here must not stop the others
                row.update(ms=float("nan"), tflops=float("nan"), error=f"{type(e).__name__}: {e}"[:500])
            rows.append(row)
            if on_rows is not None:  # the rows so far, after each: a run cut by a time limit keeps them
                on_rows(rows)
    return rows


def sweep_pallas_blocks(
    configs: Sequence[dict[str, int]],
    *,
    batch: int = 2,
    image_tokens: int = 4096,
    caption_tokens: int = 256,
    heads: int = 24,
    kv_heads: int = 8,
    head_dim: int = 96,
    dtype: str = "bfloat16",
    iters: int = 10,
    warmup: int = 1,
    modes: Sequence[str] = ("fwd", "fwd+bwd"),
    seed: int = 0,
    on_row=None,
) -> list[dict[str, Any]]:
    """Time our Pallas kernel (:func:`lumina_jax.ops.flash_attention.flash_attention`) with each
    :class:`~lumina_jax.ops.flash_attention.BlockSizes` field set in ``configs`` (one dict of overrides per
    row, e.g. ``{"block_q": 64, "num_warps": 4}``). Same shapes and FLOP counts as :func:`bench_attention`;
    ``on_row(row)`` is called after each row (to print progress)."""
    import dataclasses

    from lumina_jax.ops.flash_attention import BlockSizes, flash_attention

    q, k, v = _joint_qkv(batch, image_tokens + caption_tokens, heads, kv_heads, head_dim, dtype, seed)
    seq = q.shape[1]
    fwd_flops = 4.0 * batch * heads * seq * seq * head_dim
    rows = []
    for overrides in configs:
        overrides = dict(overrides)
        pad = overrides.pop("pad_head_dim", None)  # not a tile size: the old zero-padded head-dim layout
        bs = dataclasses.replace(BlockSizes(), **overrides)

        def fwd(q, k, v, bs=bs, pad=pad):
            return flash_attention(q, k, v, block_sizes=bs, pad_head_dim=pad)

        def fwd_bwd(q, k, v, fwd=fwd):
            return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

        for mode in modes:
            fn, flops = (fwd, fwd_flops) if mode == "fwd" else (fwd_bwd, 3.5 * fwd_flops)
            row = dict(backend="pallas", mode=mode, blocks=dataclasses.asdict(bs), pad_head_dim=pad, error=None, seq=seq)
            try:
                ms = _time(jax.jit(fn), (q, k, v), iters, warmup)
                row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
            except Exception as e:
                row.update(ms=float("nan"), tflops=float("nan"), error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A small fixed-width table of :func:`bench_attention` rows."""
    lines = [f"{'backend':<12} {'runs':<10} {'mode':<8} {'ms':>9} {'TFLOP/s':>8}  note"]
    for r in rows:
        note = r["error"] or ""
        runs = r.get("runs", r["backend"])
        lines.append(f"{r['backend']:<12} {runs:<10} {r['mode']:<8} {r['ms']:>9.3f} {r['tflops']:>8.2f}  {note}")
    return "\n".join(lines)


# Block-size candidates for ``bench attention --sweep`` (GPU, head_dim padded to 128): forward tiles
# first, then backward tiles (timed as fwd+bwd with the default forward).
SWEEP_CONFIGS: tuple[tuple[tuple[str, ...], tuple[dict[str, int], ...]], ...] = (
    (("fwd",), (
        {},  # 128 x 64, 4 warps, 2 stages: the best of the first H200 sweep (then with D padded to 128)
        {"pad_head_dim": True},  # that layout, against the 64 + 32 head-dim chunks of the default
        {"num_warps": 8},
        {"block_q": 128, "block_k": 128},
        {"block_q": 64, "block_k": 64},
        {"num_stages": 3},
        {"block_q": 128, "block_k": 32, "num_stages": 3},
        {"block_q": 256, "block_k": 64, "num_warps": 8},
    )),
    (("fwd+bwd",), (
        {},
        {"pad_head_dim": True},
        {"num_warps_bwd": 4},
        {"block_q_bwd": 32, "block_k_bwd": 64},
        {"block_q_bwd": 64, "block_k_bwd": 128},
        {"block_q_bwd": 128, "block_k_bwd": 64},
        {"block_q_bwd": 32, "block_k_bwd": 32, "num_warps_bwd": 4},
        {"block_q_bwd": 64, "block_k_bwd": 32, "num_warps_bwd": 4},
    )),
)
