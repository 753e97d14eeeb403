"""Gemma-2 text encoder (google/gemma-2-2b) in Flax Linen: the ``prompt -> text features`` stage.

Lumina-Image 2.0 conditions its DiT on the Gemma-2 hidden state ``hidden_states[-2]`` (spec §4; ORIG
``sample.py`` and diffusers ``Lumina2Pipeline`` both use ``output_hidden_states=True`` and take
``[-2]``). This file is a from-scratch port of ``transformers.models.gemma2.modeling_gemma2.Gemma2Model``
(checked against transformers 5.24) with every Gemma-2 feature:

- token embedding multiplied by ``sqrt(hidden_size)``; the multiplier is cast to the compute dtype first,
  as HF does (``embed_scale.to(dtype)``), so bf16 runs see the same rounded normalizer;
- RMSNorm with a ``(1 + weight)`` scale, computed in fp32 and cast back;
- grouped-query attention (query head ``h`` reads kv head ``h // (heads // kv_heads)``, HF ``repeat_kv``);
- attention scale ``query_pre_attn_scalar ** -0.5`` (not ``head_dim ** -0.5``);
- attention-logit soft-capping ``cap * tanh(logits / cap)`` (fp32, before the mask);
- sliding-window attention on the layers whose ``layer_types`` entry is ``"sliding_attention"`` (HF's
  default: even layer indices 0, 2, 4, ...; key ``j`` is visible from query ``i`` iff
  ``i - window < j <= i``), full causal attention on the others;
- pre- and post- attention norms and pre- and post- feed-forward norms (sandwich norms);
- GeGLU MLP ``down(gelu_tanh(gate(x)) * up(x))``;
- RoPE in HF's half-rotation convention (``rotate_half``: channel ``c`` pairs with ``c + head_dim/2``);
- right-padding masks: causal AND key-is-valid AND (for sliding layers) inside the window. Position ids
  are ``0..L-1`` for every row, like HF with right padding.

Hidden states follow transformers 5.24 exactly (``capture_outputs`` with ``tie_last_hidden_states``):
``hidden_states = (embeddings, out_layer_0, ..., out_layer_{N-2}, final_norm(out_layer_{N-1}))`` -- N + 1
entries; the last one is ``last_hidden_state`` (after the final norm), every other one is *before* any
final norm. So ``hidden_states[-2]`` (the DiT features) is the raw output of decoder layer ``N-2``
(index 24 of 26 for gemma-2-2b). :func:`dit_features` returns exactly that without keeping the other
hidden states: the scan carries ``(h, previous h)``, and after the last layer the previous ``h`` is
``hidden_states[-2]``. (The last layer still runs, ~1/N of the cost, because skipping it would mean
slicing the stacked parameters.)

Attention is written inline rather than through :mod:`lumina_jax.ops.attention`: soft-capping must act
on the logits before the softmax and the mask differs per layer (sliding vs full), neither of which the
project's generic ``(q, k, v, kv_mask, scale)`` interface can express. Logits, soft-capping and softmax
are fp32 (``preferred_element_type``); probabilities are cast to the compute dtype before the value
matmul, like HF's eager attention. Fully masked rows (padding queries whose window holds only padding)
get a uniform softmax instead of NaN.

Parameters are fp32 and stacked over layers with ``nn.scan`` (leading ``layers`` axis). The per-layer
attention window is a scanned *input* (``int32[num_layers]``), so any ``layer_types`` pattern scans with
one body. Names mirror the HF modules so the key mapper (:mod:`lumina_jax.convert.gemma2`) reads like
the table it is. Logical axis names (``nn.with_logical_partitioning``):

=====================================================  =====================  ==============================
param                                                  shape                  logical axes
=====================================================  =====================  ==============================
``embed_tokens/embedding``                             (V, E)                 (vocab, embed)
``layers/self_attn/q_proj/kernel``                     (N, E, H, Dh)          (layers, embed, heads, head_dim)
``layers/self_attn/{k,v}_proj/kernel``                 (N, E, K, Dh)          (layers, embed, kv_heads, head_dim)
``layers/self_attn/o_proj/kernel``                     (N, H, Dh, E)          (layers, heads, head_dim, embed)
``layers/mlp/{gate,up}_proj/kernel``                   (N, E, F)              (layers, embed, mlp)
``layers/mlp/down_proj/kernel``                        (N, F, E)              (layers, mlp, embed)
``layers/{input,post_attention,pre_feedforward,``      (N, E)                 (layers, norm)
``post_feedforward}_layernorm/scale``
``norm/scale``                                         (E,)                   (norm,)
=====================================================  =====================  ==============================
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.ops.norms import rms_normalize

Params = dict[str, Any]

SLIDING = "sliding_attention"
FULL = "full_attention"
_NO_WINDOW = 2**30  # window of a full-attention layer: larger than any sequence
_MASK_VALUE = -1e30  # finite so that fully masked rows give a uniform softmax, not NaN

_ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu_fast": True, "gelu": False}  # -> approximate


# transformers' Gemma2Config defaults for the keys whose absence changes the computation
_HF_GEMMA2_DEFAULTS = {
    "head_dim": 256,
    "num_key_value_heads": 4,
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
}


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    """Architecture of a Gemma-2 decoder used as an encoder (no LM head).

    Field names are ours; :meth:`from_hf_config` / :meth:`to_hf_config` translate to and from a
    transformers ``config.json``. The defaults are google/gemma-2-2b (the Lumina-Image 2.0 text encoder).
    """

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_layers: int = 26
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: Optional[float] = 50.0
    sliding_window: Optional[int] = 4096
    layer_types: Optional[tuple[str, ...]] = None  # None -> HF default: sliding on even layer indices
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    # Only carried through to an exported config.json (they do not affect the encoder).
    final_logit_softcapping: Optional[float] = 30.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2

    def __post_init__(self) -> None:
        for name in ("rms_norm_eps", "rope_theta", "query_pre_attn_scalar"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.layer_types is None:
            object.__setattr__(
                self, "layer_types", tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_layers))
            )
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for num_layers={self.num_layers}")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ValueError(f"unknown layer_types {bad}; expected {SLIDING!r} or {FULL!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.hidden_activation not in _ACTIVATIONS:
            raise ValueError(f"hidden_activation={self.hidden_activation!r}; supported: {sorted(_ACTIVATIONS)}")

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Gemma2Config":
        """Build from our own field names (e.g. a YAML file); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown Gemma2Config keys {unknown}; known keys: {sorted(names)}")
        return cls(**dict(d))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "Gemma2Config":
        """Load ``configs/model/gemma2_*.yaml``; ``overrides`` replace single keys (still checked)."""
        from lumina_jax.config_utils import load_yaml

        d = load_yaml(Path(path).read_text()) or {}
        d.update(overrides)
        return cls.from_dict(d)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "Gemma2Config":
        """From a transformers Gemma-2 ``config.json`` dict (old 4.4x files and 5.x files alike).

        Raises ``ValueError`` for settings this encoder does not implement (another model type,
        attention biases, bidirectional attention, non-default RoPE scaling).
        """
        mt = hf.get("model_type")
        if mt != "gemma2":
            what = f"model_type={mt!r}" if mt is not None else (
                f"a {hf['_class_name']} config" if "_class_name" in hf else "no model_type")  # fmt: skip
            raise ValueError(f"expected a Gemma-2 config (model_type 'gemma2'), got {what}")
        if hf.get("attention_bias", False):
            raise ValueError("attention_bias=True is not supported (Gemma-2 has no attention biases)")
        if hf.get("use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention=True is not supported (Lumina uses causal Gemma-2)")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            raise ValueError(f"only default RoPE is supported, got rope_parameters={rope!r} "
                             f"rope_scaling={hf.get('rope_scaling')!r}")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        # A key missing from config.json takes transformers' Gemma2Config default (what from_pretrained
        # would compute with); an explicit null keeps its meaning (no soft-capping, no window).
        d = _HF_GEMMA2_DEFAULTS
        heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim", d["head_dim"]) or hf["hidden_size"] // heads
        window = hf.get("sliding_window", hf.get("sliding_window_size", d["sliding_window"]))
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"  # transformers' Gemma-2 ignores hidden_act
        layer_types = hf.get("layer_types")
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads", d["num_key_value_heads"]) or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", d["query_pre_attn_scalar"]) or head_dim),
            attn_logit_softcapping=_opt_float(hf.get("attn_logit_softcapping", d["attn_logit_softcapping"])),
            sliding_window=None if window is None else int(window),
            layer_types=None if layer_types is None else tuple(layer_types),
            hidden_activation=act,
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            final_logit_softcapping=_opt_float(hf.get("final_logit_softcapping", d["final_logit_softcapping"])),
            pad_token_id=_int_or(hf.get("pad_token_id"), 0),
            eos_token_id=_int_or(hf.get("eos_token_id"), 1),
            bos_token_id=_int_or(hf.get("bos_token_id"), 2),
        )

    def to_hf_config(self, dtype: str = "float32") -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.Gemma2Model.from_pretrained`` accepts."""
        qpas = self.query_pre_attn_scalar
        return {
            "architectures": ["Gemma2Model"],
            "model_type": "gemma2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_activation": self.hidden_activation,
            "hidden_act": self.hidden_activation,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,  # transformers 4.x
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},  # transformers 5.x
            "query_pre_attn_scalar": int(qpas) if float(qpas).is_integer() else qpas,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "attention_bias": False,
            "attention_dropout": 0.0,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
            "tie_word_embeddings": True,
            "dtype": dtype,
            "torch_dtype": dtype,
        }

    # -- derived ----------------------------------------------------------------------------------

    def layer_windows(self) -> np.ndarray:
        """``int32[num_layers]``: the attention window of each layer (huge for full attention)."""
        w = _NO_WINDOW if self.sliding_window is None else int(self.sliding_window)
        return np.array([w if t == SLIDING else _NO_WINDOW for t in self.layer_types], dtype=np.int32)


def _opt_float(x: Any) -> Optional[float]:
    return None if x is None else float(x)


def _int_or(x: Any, default: int) -> int:
    if isinstance(x, (list, tuple)):
        x = x[0] if x else None
    return default if x is None else int(x)


# ----------------------------------------------------------------------------------------------
# modules


def _rope(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``(L, head_dim)`` in fp32, HF layout ``cat(freqs, freqs)``."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-rotation RoPE on ``x`` (B, L, heads, Dh); computed in fp32, returned in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


class GemmaRMSNorm(nn.Module):
    """``x / rms(x) * (1 + scale)`` in fp32, cast back to the input dtype (HF ``Gemma2RMSNorm``)."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                           (x.shape[-1],), jnp.float32)
        return (rms_normalize(x, self.eps) * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def _dense(features: Sequence[int] | int, axes: tuple[str, ...], name: str, dtype: Any, precision: Any,
           axis: int | tuple[int, ...] = -1) -> nn.DenseGeneral:
    return nn.DenseGeneral(
        features=features, axis=axis, use_bias=False, dtype=dtype, param_dtype=jnp.float32, precision=precision,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes), name=name,
    )


class Gemma2Attention(nn.Module):
    """GQA self-attention with RoPE, ``query_pre_attn_scalar`` scaling, soft-capping and a given mask.

    ``allowed`` (B, Lq, Lk) bool already combines causality, the layer's window and right padding.
    """

    config: Gemma2Config
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        cfg = self.config
        B, L, _ = x.shape
        H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = _dense((H, Dh), ("embed", "heads", "head_dim"), "q_proj", self.dtype, self.precision)(x)
        k = _dense((K, Dh), ("embed", "kv_heads", "head_dim"), "k_proj", self.dtype, self.precision)(x)
        v = _dense((K, Dh), ("embed", "kv_heads", "head_dim"), "v_proj", self.dtype, self.precision)(x)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)  # (B, L, H|K, Dh)

        q = q.reshape(B, L, K, H // K, Dh)  # query head h -> kv head h // (H // K), as HF repeat_kv
        logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, precision=self.precision,
                            preferred_element_type=jnp.float32)
        logits = logits * (cfg.query_pre_attn_scalar ** -0.5)
        if cfg.attn_logit_softcapping is not None:
            cap = cfg.attn_logit_softcapping
            logits = jnp.tanh(logits / cap) * cap
        logits = jnp.where(allowed[:, None, None, :, :], logits, _MASK_VALUE)  # allowed: (B, Lq, Lk)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(self.dtype), precision=self.precision)
        out = out.reshape(B, L, H, Dh)
        return _dense(cfg.hidden_size, ("heads", "head_dim", "embed"), "o_proj", self.dtype, self.precision,
                      axis=(-2, -1))(out)


class Gemma2MLP(nn.Module):
    """GeGLU feed-forward ``down(gelu_tanh(gate(x)) * up(x))`` (HF ``Gemma2MLP``)."""

    config: Gemma2Config
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = _dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj", self.dtype, self.precision)(x)
        up = _dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj", self.dtype, self.precision)(x)
        h = jax.nn.gelu(gate, approximate=_ACTIVATIONS[cfg.hidden_activation]) * up
        return _dense(cfg.hidden_size, ("mlp", "embed"), "down_proj", self.dtype, self.precision)(h)


class Gemma2DecoderLayer(nn.Module):
    """One decoder layer as an ``nn.scan`` body: carry ``(h, h_prev)``, scanned input ``window``."""

    config: Gemma2Config
    dtype: Any = jnp.float32
    precision: Any = None
    collect: bool = False  # also emit this layer's output as the scan's per-layer output

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, jax.Array], window: jax.Array, key_valid: jax.Array,
                 cos: jax.Array, sin: jax.Array):
        cfg = self.config
        h, _ = carry
        L = h.shape[1]
        i = jnp.arange(L)[:, None]
        j = jnp.arange(L)[None, :]
        allowed = (j <= i) & (i - j < window)  # causal + sliding window (window is huge on full layers)
        allowed = allowed[None] & key_valid[:, None, :]  # + right padding: (B, Lq, Lk)

        norm = lambda name: GemmaRMSNorm(cfg.rms_norm_eps, name=name)  # noqa: E731
        a = Gemma2Attention(cfg, self.dtype, self.precision, name="self_attn")(norm("input_layernorm")(h),
                                                                              allowed, cos, sin)
        x = h + norm("post_attention_layernorm")(a)
        m = Gemma2MLP(cfg, self.dtype, self.precision, name="mlp")(norm("pre_feedforward_layernorm")(x))
        out = x + norm("post_feedforward_layernorm")(m)
        return (out, h), (out if self.collect else None)


class _Embed(nn.Module):
    """Token table ``(V, E)``; gathers rows, then casts them to the compute dtype."""

    vocab_size: int
    features: int

    @nn.compact
    def __call__(self, ids: jax.Array, dtype: Any) -> jax.Array:
        table = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("vocab", "embed")),
                           (self.vocab_size, self.features), jnp.float32)
        return jnp.take(table, ids, axis=0).astype(dtype)


class Gemma2Output(NamedTuple):
    last_hidden_state: jax.Array  # (B, L, E): final_norm(out_layer_{N-1}) == hidden_states[-1]
    penultimate_hidden_state: jax.Array  # (B, L, E): hidden_states[-2], Lumina's DiT features
    hidden_states: Optional[tuple[jax.Array, ...]]  # N + 1 entries, HF convention (module docstring)


class Gemma2Encoder(nn.Module):
    """Gemma-2 decoder stack without LM head. ``dtype`` is the compute dtype; params are created fp32,
    and may be passed in bf16 (a bf16 checkpoint, or the pipeline's cast of the matrices and table): norms
    still compute in fp32, matrices in ``dtype``.

    ``__call__(input_ids (B, L) int, attention_mask (B, L) bool/int, output_hidden_states=False)`` with
    right-padded inputs. ``remat=True`` rematerialises each layer in the backward pass.
    """

    config: Gemma2Config
    dtype: Any = jnp.float32
    remat: bool = False
    precision: Any = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None, *,
                 output_hidden_states: bool = False) -> Gemma2Output:
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids have shape {tuple(input_ids.shape)}; want (B, L) token ids (a single "
                             f"sequence as a batch of one: ids[None])")  # fmt: skip
        B, L = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {(B, L)}: want the same")
        key_valid = jnp.ones((B, L), bool) if attention_mask is None else attention_mask.astype(bool)
        if not isinstance(input_ids, jax.core.Tracer) and not isinstance(key_valid, jax.core.Tracer):
            # concrete ids: one outside the table is an error (as in transformers), not NaN features (under
            # jit the caller checks: text.py)
            bad = np.asarray(input_ids)[np.asarray(key_valid)]
            if bad.size and (bad.min() < 0 or bad.max() >= cfg.vocab_size):
                raise ValueError(f"token ids outside the vocabulary (0..{cfg.vocab_size - 1}): min {bad.min()}, "
                                 f"max {bad.max()}; was the tokenizer made for this text encoder?")  # fmt: skip
        # padded positions read token 0: whatever id they hold (a tokenizer's out-of-table pad id) cannot put NaN
        # into the values that the valid tokens' attention multiplies by zero
        input_ids = jnp.where(key_valid, input_ids, 0)

        # HF: embed(ids) * embed_scale.to(dtype); gather first so bf16 runs never cast the whole table.
        h = _Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens")(input_ids, self.dtype)
        h = h * jnp.asarray(math.sqrt(cfg.hidden_size), dtype=self.dtype)

        cos, sin = _rope(jnp.arange(L), cfg.head_dim, cfg.rope_theta)
        body = nn.remat(Gemma2DecoderLayer, prevent_cse=False) if self.remat else Gemma2DecoderLayer
        stack = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.dtype, self.precision, output_hidden_states, name="layers")
        windows = jnp.asarray(cfg.layer_windows())
        (last, penultimate), per_layer = stack((h, h), windows, key_valid, cos, sin)
        last = GemmaRMSNorm(cfg.rms_norm_eps, name="norm")(last)

        hidden = None
        if output_hidden_states:
            hidden = (h, *(per_layer[i] for i in range(cfg.num_layers - 1)), last)
        return Gemma2Output(last, penultimate, hidden)


# ----------------------------------------------------------------------------------------------
# pure functions over parameter pytrees


def init_params(config: Gemma2Config, rng: jax.Array, *, boxed: bool = False) -> Params:
    """Random fp32 params (for tests and shape checks). ``boxed=True`` keeps the logical-axis boxes."""
    model = Gemma2Encoder(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = model.init(rng, ids, jnp.ones((1, 1), bool))["params"]
    return params if boxed else nn.unbox(params)


def param_shapes(config: Gemma2Config) -> dict[str, Any]:
    """The param tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    return nn.unbox(jax.eval_shape(lambda r: init_params(config, r, boxed=True), jax.random.PRNGKey(0)))


def param_logical_axes(config: Gemma2Config) -> dict[str, Any]:
    """The param tree with a ``PartitionSpec`` of *logical* axis names per leaf (see module docstring).

    Map them to mesh axes with ``nn.logical_to_mesh_sharding(specs, mesh, rules)``.
    """
    boxed = jax.eval_shape(lambda r: init_params(config, r, boxed=True), jax.random.PRNGKey(0))
    return nn.get_partition_spec(boxed)


def encode(params: Params, input_ids: jax.Array, attention_mask: Optional[jax.Array], config: Gemma2Config, *,
           dtype: Any = jnp.float32, output_hidden_states: bool = False, precision: Any = None) -> Gemma2Output:
    """Run the encoder on right-padded ``input_ids`` (B, L) with ``attention_mask`` (B, L)."""
    model = Gemma2Encoder(config, dtype=dtype, precision=precision)
    return model.apply({"params": params}, input_ids, attention_mask, output_hidden_states=output_hidden_states)


def dit_features(params: Params, input_ids: jax.Array, attention_mask: Optional[jax.Array],
                 config: Gemma2Config, *, dtype: Any = jnp.float32, precision: Any = None) -> jax.Array:
    """Lumina's caption features: HF ``hidden_states[-2]``, shape (B, L, hidden_size), in ``dtype``.

    Values at padded positions are whatever the network computes there (finite); mask them downstream.
    """
    return encode(params, input_ids, attention_mask, config, dtype=dtype,
                  precision=precision).penultimate_hidden_state

