"""One attention interface with swappable backends.

The Next-DiT and the VAE mid-block go through :func:`attention` (Gemma-2 and the captioner's prefill
write theirs inline: logit soft-capping, sliding windows and decoding caches do not fit it). Backends register
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
    """The backend function of ``name`` (``"auto"``: :func:`auto_attention`, which picks per call)."""
    if name == "auto":
        return auto_attention
    if name not in _BACKENDS and name in _LAZY_BACKENDS:
        import importlib

        importlib.import_module(_LAZY_BACKENDS[name])
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {available_backends()}")
    return _BACKENDS[name]


# TPU: the splash kernel inside shard_map (Mosaic kernels cannot be auto-partitioned). CPU: plain XLA
# (Pallas kernels would only run in the slow interpreter). GPU: see auto_candidates.
_AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {"tpu": ("splash_sharded", "splash"), "cpu": ()}
_CUDNN_DTYPES = ("bfloat16", "float16")
_PALLAS_DTYPES = ("float32", "bfloat16", "float16")
# (platform, dtype, head_dim) -> the backend "auto" ran after passing over failing ones: what
# resolve_backend reports from then on
_FALLBACKS: dict[tuple[str, str, int], str] = {}
_LOGGED_CHOICES: set = set()


def _gpu_generation() -> int:
    """Major CUDA compute capability of the first device (9 on Hopper); 0 when it cannot be read."""
    try:
        return int(str(jax.devices()[0].compute_capability).split(".")[0])
    except (AttributeError, ValueError, IndexError, RuntimeError):
        return 0


def auto_candidates(dtype: Optional[object] = None, head_dim: Optional[int] = None,
                    platform: Optional[str] = None) -> tuple[str, ...]:  # fmt: skip
    """The backends ``"auto"`` tries for inputs of ``dtype`` / ``head_dim`` on ``platform`` (default:
    JAX's default backend), best first, ending with ``"xla"``.

    GPU: cuDNN (the fastest measured on Hopper) for bf16/fp16 with ``head_dim`` a multiple of 8 and at
    most 256 (128 before Hopper), on Ampere or newer; then our Triton kernel inside ``shard_map``
    (``pallas_sharded``, which is the plain ``pallas`` kernel on one device) for fp32/bf16/fp16 with
    ``head_dim`` <= 256 (before Ampere, e.g. a T4: fp32/fp16 only, Triton's bf16 dot needs sm80). TPU: the
    splash kernel (sharded, then local) for fp32/bf16. CPU: XLA. With ``jax_enable_x64`` on (a float64
    debugging run) only XLA: the kernels' index arithmetic is int32. ``None`` for dtype / head_dim means
    unknown (then the shape conditions are not applied); an unreadable GPU generation is taken as recent.
    """
    platform = platform or jax.default_backend()
    dt = None if dtype is None else jnp.dtype(dtype).name
    if jax.config.jax_enable_x64 or (dt is not None and dt not in _PALLAS_DTYPES):
        return ("xla",)
    if platform != "gpu":
        tpu_ok = platform != "tpu" or dt in (None, "float32", "bfloat16")  # Mosaic: no fp16 splash
        return (*(_AUTO_PREFERENCE.get(platform, ()) if tpu_ok else ()), "xla")
    names = []
    generation = _gpu_generation()
    pre_ampere = 0 < generation < 8
    d_ok = head_dim is None or head_dim % 8 == 0 and head_dim <= (256 if generation >= 9 else 128)
    if (dt is None or dt in _CUDNN_DTYPES) and d_ok and not pre_ampere:
        names.append("cudnn")
    if (dt is None or dt in _PALLAS_DTYPES) and (head_dim is None or head_dim <= 256) and \
            not (pre_ampere and dt == "bfloat16"):  # fmt: skip
        names.append("pallas_sharded")
    return (*names, "xla")


def resolve_backend(name: str, dtype: Optional[object] = None, head_dim: Optional[int] = None) -> str:
    """The backend ``name`` stands for here: ``"auto"`` -> the first of :func:`auto_candidates`, or,
    once ``auto`` has passed over candidates that failed to build for this dtype / head_dim (e.g. no
    cuDNN), the one it ran."""
    if name != "auto":
        return name
    if dtype is not None and head_dim is not None:
        ran = _FALLBACKS.get((jax.default_backend(), jnp.dtype(dtype).name, int(head_dim)))
        if ran is not None:
            return ran
    return auto_candidates(dtype, head_dim)[0]


def attention_uses_kernel(name: str, dtype: object, head_dim: int) -> bool:
    """Whether backend ``name`` runs a fused kernel (not XLA's einsums) for ``dtype`` / ``head_dim``
    here: what a FLOP count of rematerialisation needs (a kernel's saved softmax statistics mean its
    backward does not recompute the forward's attention). ``context_<inner>`` is its inner backend;
    ``cudnn`` with fp32 inputs runs XLA."""
    name = resolve_backend(name, dtype, head_dim)
    if name.startswith("context"):
        name = resolve_backend(name[len("context_"):] or "auto", dtype, head_dim)
    if name == "cudnn" and jnp.dtype(dtype).name not in _CUDNN_DTYPES:
        return False
    return name != "xla"


# What a backend raises while tracing when it cannot run these inputs here (no cuDNN, a shape the
# kernel does not take, a module that fails to import); "auto" then tries the next candidate.
_UNAVAILABLE = (RuntimeError, NotImplementedError, ValueError, ImportError, TypeError)


def auto_attention(q, k, v, *, kv_mask, kv_lengths, scale):
    """Backend ``"auto"``: the first of :func:`auto_candidates` for these inputs that builds. The choice
    (and why the ones before it were passed over) is logged once per platform / dtype / head_dim."""
    import logging

    failed = []
    for name in auto_candidates(q.dtype, q.shape[-1]):
        try:
            out = get_backend(name)(q, k, v, kv_mask=kv_mask, kv_lengths=kv_lengths, scale=scale)
        except _UNAVAILABLE as e:
            if name == "xla" or isinstance(e, jax.errors.JAXTypeError):  # a tracing bug is not "unavailable"
                raise
            failed.append(f"{name}: {type(e).__name__}: {e}")
            continue
        key = (jax.default_backend(), jnp.dtype(q.dtype).name, q.shape[-1], name)
        if failed:
            _FALLBACKS[key[:3]] = name
        if key not in _LOGGED_CHOICES:
            _LOGGED_CHOICES.add(key)
            log = logging.getLogger("lumina_jax.ops")
            level = logging.WARNING if failed else logging.INFO
            log.log(level, "attention backend auto -> %s (%s, %s, head_dim %d)%s", name, key[0], key[1], key[2],
                    "; passed over: " + "; ".join(failed) if failed else "")  # fmt: skip
        return out
    raise AssertionError("unreachable: xla is always a candidate")


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
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths)  # a list or NumPy array too
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
for _inner in ("xla", "splash", "cudnn", "pallas"):  # = lumina_jax.parallel.context.INNER_BACKENDS
    register_lazy_backend(f"context_{_inner}", "lumina_jax.parallel.context")
register_lazy_backend("splash_sharded", "lumina_jax.parallel.tpu_attention")
register_lazy_backend("tpu_splash_local", "lumina_jax.parallel.tpu_attention")
register_lazy_backend("pallas_tpu_sharded", "lumina_jax.parallel.tpu_attention")
register_lazy_backend("tpu_pallas_local", "lumina_jax.parallel.tpu_attention")
register_lazy_backend("pallas_sharded", "lumina_jax.parallel.tpu_attention")
