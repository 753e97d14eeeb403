"""One attention interface for every model in the project, with swappable backends.

All callers (Next-DiT, Gemma-2, VAE mid-block) go through :func:`attention`. Backends register
themselves in a small registry (``xla`` here; Pallas/cuDNN/splash kernels live in their own modules
and register on import). Layout is ``(B, L, H, D)``; GQA is expressed by ``k``/``v`` having fewer heads
than ``q`` (query head ``h`` uses kv head ``h // (Hq // Hkv)``, as in Lumina's ``repeat_interleave``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Protocol

import jax
import jax.numpy as jnp


class AttentionFn(Protocol):
    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        kv_mask: Optional[jax.Array],
        kv_lengths: Optional[jax.Array],
        scale: float,
    ) -> jax.Array: ...


_BACKENDS: dict[str, AttentionFn] = {}
# Modules that register extra backends when imported (kept lazy so importing the model never pulls
# in Pallas or platform-specific code).
_LAZY_BACKENDS: dict[str, str] = {}


def register_backend(name: str) -> Callable[[AttentionFn], AttentionFn]:
    """Decorator: make ``fn`` available as ``attention(..., backend=name)``."""

    def wrap(fn: AttentionFn) -> AttentionFn:
        _BACKENDS[name] = fn
        return fn

    return wrap


def register_lazy_backend(name: str, module: str) -> None:
    """Declare that importing ``module`` registers backend ``name``."""
    _LAZY_BACKENDS[name] = module


def available_backends() -> list[str]:
    return sorted(set(_BACKENDS) | set(_LAZY_BACKENDS) | {"auto"})


def get_backend(name: str) -> AttentionFn:
    if name == "auto":
        name = _auto_backend()
    if name not in _BACKENDS and name in _LAZY_BACKENDS:
        import importlib

        importlib.import_module(_LAZY_BACKENDS[name])
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {available_backends()}")
    return _BACKENDS[name]


# Preferred backend per platform, best first; the first registered one wins, else "xla".
# GPU: cuDNN (fastest measured on Hopper; falls back to XLA itself for fp32), then our Triton kernel.
# TPU: the splash kernel inside shard_map (Mosaic kernels cannot be auto-partitioned). CPU: plain XLA (Pallas kernels would only run in the slow interpreter).
_AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "gpu": ("cudnn", "pallas"),
    "tpu": ("splash_sharded", "splash"),
    "cpu": (),
}


def _auto_backend() -> str:
    known = set(_BACKENDS) | set(_LAZY_BACKENDS)
    for name in _AUTO_PREFERENCE.get(jax.default_backend(), ()):
        if name in known:
            return name
    return "xla"


def resolve_backend(name: str) -> str:
    """The concrete backend ``name`` stands for here (``"auto"`` -> the platform's preferred one)."""
    return _auto_backend() if name == "auto" else name


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_mask: Optional[jax.Array] = None,
    *,
    kv_lengths: Optional[jax.Array] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> jax.Array:
    """Multi-head (grouped-query) attention.

    Args:
      q: ``(B, Lq, Hq, D)``.
      k, v: ``(B, Lk, Hkv, D)`` with ``Hq % Hkv == 0``.
      kv_mask: optional ``(B, Lk)`` boolean, True for keys that may be attended to. Query rows whose
        keys are all masked return zeros (never NaN).
      kv_lengths: optional ``(B,)`` int32, the number of valid keys of each sample when the valid keys
        form a prefix (the packed layout the Next-DiT uses). Kernels use it to skip padded blocks.
        Mutually exclusive with ``kv_mask``.
      scale: softmax scale, default ``1/sqrt(D)``.
      backend: a registered backend name or ``"auto"``.

    Returns:
      ``(B, Lq, Hq, D)`` in ``q.dtype``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (B, L, H, D) inputs, got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    if kv_mask is not None and kv_mask.shape != k.shape[:2]:
        raise ValueError(f"kv_mask shape {kv_mask.shape} != (B, Lk) = {k.shape[:2]}")
    if kv_mask is not None and kv_lengths is not None:
        raise ValueError("pass kv_mask or kv_lengths, not both")
    if kv_lengths is not None and kv_lengths.shape != k.shape[:1]:
        raise ValueError(f"kv_lengths shape {kv_lengths.shape} != (B,) = {k.shape[:1]}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return get_backend(backend)(q, k, v, kv_mask=kv_mask, kv_lengths=kv_lengths, scale=scale)


def lengths_to_mask(kv_lengths: jax.Array, length: int) -> jax.Array:
    """``(B,)`` prefix lengths -> ``(B, length)`` boolean key mask."""
    return jnp.arange(length)[None, :] < kv_lengths[:, None]


@register_backend("xla")
def xla_attention(q, k, v, *, kv_mask, kv_lengths, scale):
    """Reference backend: plain einsums, softmax in fp32, GQA by head grouping (no K/V copies)."""
    if kv_lengths is not None:
        kv_mask = lengths_to_mask(kv_lengths, k.shape[1])
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, lq, hkv, g, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if kv_mask is not None:
        logits = jnp.where(kv_mask[:, None, None, None, :], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, hq, d).astype(q.dtype)


def reference_attention_f64(q, k, v, kv_mask=None, scale=None, kv_lengths=None):
    """NumPy float64 reference (tests only): same contract as :func:`attention`."""
    import numpy as np

    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    if kv_lengths is not None:
        kv_mask = np.arange(k.shape[1])[None, :] < np.asarray(kv_lengths)[:, None]
    b, lq, hq, d = q.shape
    g = hq // k.shape[2]
    k = np.repeat(k, g, axis=2)
    v = np.repeat(v, g, axis=2)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if kv_mask is not None:
        logits = np.where(np.asarray(kv_mask)[:, None, None, :], logits, -np.inf)
    m = logits.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(logits - m)
    s = p.sum(-1, keepdims=True)
    p = p / np.where(s == 0, 1.0, s)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


register_lazy_backend("cudnn", "lumina_jax.ops.cudnn_attention")
register_lazy_backend("pallas", "lumina_jax.ops.flash_attention")
register_lazy_backend("splash", "lumina_jax.ops.splash_attention")
register_lazy_backend("context", "lumina_jax.parallel.context")  # all-gather K/V over the `context` mesh axis
register_lazy_backend("splash_sharded", "lumina_jax.parallel.tpu_attention")
register_lazy_backend("tpu_splash_local", "lumina_jax.parallel.tpu_attention")
register_lazy_backend("pallas_tpu_sharded", "lumina_jax.parallel.tpu_attention")
register_lazy_backend("tpu_pallas_local", "lumina_jax.parallel.tpu_attention")
