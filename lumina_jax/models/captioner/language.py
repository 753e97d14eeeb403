"""The Qwen2 language model of Qwen2(.5)-VL in Flax Linen: M-RoPE, GQA, a preallocated KV cache.

Reference: transformers 5.24 ``Qwen2VLTextModel`` (identical in Qwen2.5-VL) and the ``lm_head`` of
``Qwen2VLForConditionalGeneration``:

- decoder layer: ``h + o(attn(rms(h)))`` then ``h + down(silu(gate(x)) * up(x))`` on ``rms(h)``; q/k/v
  projections have biases, ``o_proj`` and the MLP do not; RMSNorm ``weight * normalize(x)`` in fp32;
- grouped-query attention: query head ``h`` reads kv head ``h // (H / K)`` (HF ``repeat_kv``),
  scale ``head_dim ** -0.5``;
- M-RoPE: positions are ``(3, B, L)`` (temporal, height, width). Frequency ``j`` of the ``head_dim / 2``
  rotary frequencies takes its angle from axis 0, 1 or 2 according to ``mrope_section`` (e.g. 16/24/24):
  the first 16 frequencies follow the temporal id, the next 24 the row, the last 24 the column; text
  tokens carry the same id on all three axes, i.e. plain 1D RoPE. HF's half-rotation layout.

KV cache: ``k, v`` of shape ``(layers, B, C, kv_heads, head_dim)`` in the compute dtype, preallocated for
prompt + new tokens and carried through the layer scan, each layer writing its slice in place
(``dynamic_update_slice``). Prompts are *left*-padded so that every row writes decode step ``t`` into the
same slot ``P + t`` (one slice update, no per-row scatter); ``kv_start[b]`` is the first real slot of row
``b``, and a key slot ``j`` is visible from a query at slot ``i`` iff ``kv_start[b] <= j <= i``.

Attention: the prefill (many queries) needs a causal mask, which the project's generic
:func:`lumina_jax.ops.attention.attention` (``kv_mask`` per key only) cannot express, so it is written
inline here (fp32 logits and softmax, probabilities cast to the compute dtype before the value matmul like
HF's eager attention); it materialises ``(B, heads, P, P)`` fp32 logits per layer, which bounds the
prefill batch at long prompts (a causal flash kernel behind the generic interface would remove that). A
decode step has a single query per row, so its mask *is* a key mask and it goes through the generic
interface with the backend the caller picks (``QwenVL.decode_attention_backend``, XLA by default).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.models.captioner.config import TextConfig
from lumina_jax.ops.attention import attention
from lumina_jax.ops.norms import rms_normalize

_MASK_VALUE = -1e30  # finite: padding query rows (no visible key) get a uniform softmax, not NaN


class KVCache(NamedTuple):
    """Preallocated keys and values, ``(layers, B, capacity, kv_heads, head_dim)`` each."""

    k: jax.Array
    v: jax.Array


def init_cache(config: TextConfig, batch: int, capacity: int, dtype: Any = jnp.float32) -> KVCache:
    shape = (config.num_layers, batch, capacity, config.num_kv_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def mrope_axis_of_frequency(config: TextConfig) -> np.ndarray:
    """``int[head_dim / 2]``: which position axis (0 = t, 1 = h, 2 = w) drives each rotary frequency."""
    return np.repeat(np.arange(3), config.mrope_section).astype(np.int32)


def mrope_cos_sin(positions: jax.Array, config: TextConfig) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``(B, L, head_dim)`` in fp32 from M-RoPE ``positions`` ``(3, B, L)``."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    axis = jnp.asarray(mrope_axis_of_frequency(config))
    pos = jnp.moveaxis(positions, 0, -1).astype(jnp.float32)  # (B, L, 3)
    freqs = jnp.take(pos, axis, axis=-1) * inv_freq  # (B, L, d/2): frequency j uses axis[j]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-rotation RoPE on ``x`` (B, L, heads, D) in fp32, returned in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rot * sin[:, :, None]).astype(x.dtype)


def _dense(features: Any, axes: tuple[Any, ...], name: str, dtype: Any, precision: Any, *,
           bias_axes: Optional[tuple[Any, ...]] = None, axis: Any = -1) -> nn.DenseGeneral:
    kw: dict[str, Any] = {}
    if bias_axes is not None:
        kw["bias_init"] = nn.with_logical_partitioning(nn.initializers.normal(0.02), bias_axes)
    return nn.DenseGeneral(features=features, axis=axis, use_bias=bias_axes is not None, dtype=dtype,
                           param_dtype=jnp.float32, precision=precision, name=name,
                           kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes), **kw)


class RMSNorm(nn.Module):
    """HF ``Qwen2RMSNorm``: normalise in fp32, cast to the input dtype, multiply by ``scale``."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), jnp.float32)
        return rms_normalize(x, self.eps).astype(x.dtype) * scale.astype(x.dtype)


class SelfAttention(nn.Module):
    """GQA self-attention with q/k/v biases and M-RoPE; writes its keys/values into the stacked cache."""

    config: TextConfig
    dtype: Any = jnp.float32
    precision: Any = None
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: jax.Array, cos: jax.Array,
                 sin: jax.Array, write_index: jax.Array, kv_start: jax.Array):
        cfg = self.config
        H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = _dense((H, Dh), ("embed", "heads", "head_dim"), "q_proj", self.dtype, self.precision,
                   bias_axes=("heads", "head_dim"))(x)
        k = _dense((K, Dh), ("embed", "kv_heads", "head_dim"), "k_proj", self.dtype, self.precision,
                   bias_axes=("kv_heads", "head_dim"))(x)
        v = _dense((K, Dh), ("embed", "kv_heads", "head_dim"), "v_proj", self.dtype, self.precision,
                   bias_axes=("kv_heads", "head_dim"))(x)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)

        zero = jnp.zeros((), jnp.int32)
        idx = (layer.astype(jnp.int32), zero, write_index.astype(jnp.int32), zero, zero)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype)[None], idx)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype)[None], idx)

        if x.shape[1] == 1:  # decode: one query per row, its mask is a key mask -> generic attention interface
            keys = cache_k[layer].astype(self.dtype)  # (B, C, K, Dh)
            vals = cache_v[layer].astype(self.dtype)
            j = jnp.arange(keys.shape[1])[None, :]
            kv_mask = (j >= kv_start[:, None]) & (j <= write_index)
            out = attention(q, keys, vals, kv_mask, backend=self.attention_backend)
        else:  # prefill of a fresh prompt: causal over these L tokens only, inline (see module docstring)
            out = _causal_attention(q, k, v, write_index, kv_start, self.dtype, self.precision)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
        out = _dense(cfg.hidden_size, ("heads", "head_dim", "embed"), "o_proj", self.dtype, self.precision,
                     axis=(-2, -1))(out)
        return out, cache_k, cache_v


class MLP(nn.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))`` without biases (HF ``Qwen2MLP``)."""

    config: TextConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = _dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj", self.dtype, self.precision)(x)
        up = _dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj", self.dtype, self.precision)(x)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("activation_batch", "activation_length",
                                                                 "activation_mlp"))
        return _dense(cfg.hidden_size, ("mlp", "embed"), "down_proj", self.dtype, self.precision)(h)


class DecoderLayer(nn.Module):
    """One Qwen2 decoder layer as an ``nn.scan`` body.

    Carry: ``(h (B, L, E), cache_k, cache_v)`` with the *whole* stacked cache; scanned input: the layer
    index, used to write and read this layer's cache slice in place.
    """

    config: TextConfig
    dtype: Any = jnp.float32
    precision: Any = None
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, carry, layer: jax.Array, cos: jax.Array, sin: jax.Array, write_index: jax.Array,
                 kv_start: jax.Array):
        cfg = self.config
        h, cache_k, cache_v = carry
        a, cache_k, cache_v = SelfAttention(cfg, self.dtype, self.precision, self.attention_backend,
                                            name="self_attn")(RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(h),
                                                              cache_k, cache_v, layer, cos, sin, write_index, kv_start)
        h = h + a
        m = MLP(cfg, self.dtype, self.precision, name="mlp")(RMSNorm(cfg.rms_norm_eps,
                                                                     name="post_attention_layernorm")(h))
        h = nn.with_logical_constraint(h + m, ("activation_batch", "activation_length", "activation_embed"))
        return (h, cache_k, cache_v), None


def _causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, write_index: jax.Array, kv_start: jax.Array,
                      dtype: Any, precision: Any) -> jax.Array:
    """GQA attention of a left-padded prompt over itself: key ``j`` visible iff ``start <= j <= i``."""
    B, L, H, Dh = q.shape
    K = k.shape[2]
    qg = q.reshape(B, L, K, H // K, Dh)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, precision=precision, preferred_element_type=jnp.float32)
    logits = logits * (Dh ** -0.5)
    i = jnp.arange(L)[:, None]
    j = jnp.arange(L)[None, :]
    slot_j = write_index + j  # absolute slot of key j
    allowed = (j <= i)[None] & (slot_j >= kv_start[:, None, None])  # (B, Lq, Lk)
    logits = jnp.where(allowed[:, None, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(dtype), precision=precision)
    return out.reshape(B, L, H, Dh)


class Embed(nn.Module):
    """Token table ``(V, E)``: gathers rows, then casts them to the compute dtype."""

    vocab_size: int
    features: int

    def setup(self) -> None:
        self.embedding = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                              ("vocab", "embed")),
                                    (self.vocab_size, self.features), jnp.float32)

    def __call__(self, ids: jax.Array, dtype: Any) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0).astype(dtype)

    def attend(self, h: jax.Array, precision: Any = None) -> jax.Array:
        """Tied LM head: ``h @ table.T``, fp32 logits."""
        return jnp.einsum("...e,ve->...v", h, self.embedding.astype(h.dtype), precision=precision,
                          preferred_element_type=jnp.float32)


class LMHead(nn.Module):
    """Untied LM head, kernel ``(E, V)``: compute-dtype matmul with fp32 accumulation, fp32 logits."""

    features: int
    vocab_size: int

    @nn.compact
    def __call__(self, h: jax.Array, precision: Any = None) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                            (self.features, self.vocab_size), jnp.float32)
        return jnp.einsum("...e,ev->...v", h, kernel.astype(h.dtype), precision=precision,
                          preferred_element_type=jnp.float32)


class LanguageModel(nn.Module):
    """Qwen2 decoder stack + final norm + LM head (or the tied embedding).

    Methods (call with ``apply(..., method=...)``): :meth:`embed`, :meth:`__call__` (hidden states and the
    updated cache), :meth:`logits`.
    """

    config: TextConfig
    dtype: Any = jnp.float32
    precision: Any = None
    attention_backend: str = "auto"
    remat: bool = False

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size)
        body = nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer
        self.layers = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.dtype, self.precision, self.attention_backend)
        self.norm = RMSNorm(cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size)

    def embed(self, ids: jax.Array) -> jax.Array:
        return self.embed_tokens(ids, self.dtype)

    def __call__(self, h: jax.Array, positions: jax.Array, cache: KVCache, write_index: jax.Array,
                 kv_start: jax.Array) -> tuple[jax.Array, KVCache]:
        """Run ``h`` (B, L, E) at M-RoPE ``positions`` (3, B, L) written to cache slots ``write_index + [0, L)``.

        Returns the final-normed hidden states (B, L, E) and the updated cache.
        """
        cos, sin = mrope_cos_sin(positions, self.config)
        layer_ids = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        write_index = jnp.asarray(write_index, jnp.int32)
        (h, k, v), _ = self.layers((h, cache.k, cache.v), layer_ids, cos, sin, write_index,
                                   kv_start.astype(jnp.int32))
        return self.norm(h), KVCache(k, v)

    def logits(self, h: jax.Array) -> jax.Array:
        """LM head in the compute dtype with fp32 accumulation: fp32 logits ``(..., V)``."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(h, self.precision)
        return self.lm_head(h, self.precision)
