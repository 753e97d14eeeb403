"""The Qwen2-VL / Qwen2.5-VL vision tower in Flax Linen, on a padded, bucketed patch layout.

Reference: transformers 5.24 ``Qwen2VisionTransformerPretrainedModel`` and
``Qwen2_5_VisionTransformerPretrainedModel``. The reference packs the patches of all images into one
sequence and attends per image (``cu_seqlens``) and, for Qwen2.5-VL, per window after permuting the patches
into window order. Here every image is one batch row of a fixed number of *slots* ``S`` (a compiled bucket),
so shapes are static and images shard over a data axis:

- slot layout (built on the host by :func:`vision_layout`): an image's merged tokens (2x2 patches, kept
  contiguous as the reference's processor emits them) are placed window by window; window ``w`` owns the
  ``window_slots`` slots ``[w * window_slots, (w + 1) * window_slots)``, a merged token at local window
  position ``(r, c)`` sits at ``r * window_merged + c`` inside it, and the slots of partial windows at the
  image border, and every slot past the image, are padding (``valid == False``). Without window attention
  (Qwen2-VL) a "window" is a single merged token, i.e. the raster order of the reference.
- full-attention blocks attend over the whole row with ``kv_mask = valid``; window blocks reshape the row
  to ``(S / window_slots)`` windows and attend inside each (the reference's ``cu_window_seqlens``), both
  through :func:`lumina_jax.ops.attention.attention` so that the kernel backends apply. Which one a block
  uses is a scanned boolean and a ``lax.cond`` (one compiled block body for any ``fullatt_block_indexes``).
- attention is permutation-equivariant given the rotary positions, which are explicit per slot, so this
  layout gives the reference's outputs up to float rounding; the merger output of slot ``s`` is merged
  token ``s`` and the host-side gather index maps it back to the LM's image tokens in raster order.

The temporal patch (Conv3d with stride = kernel over ``(C, T, P, P)``) is one matmul over the flattened
patch. Norms, rotary embeddings and softmax run in fp32; params are fp32 with logical axis names
(``patch``, ``embed``, ``heads``, ``head_dim``, ``mlp``, ``norm``, ``layers``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.models.captioner.config import QWEN2_VL, VisionConfig
from lumina_jax.ops.attention import attention
from lumina_jax.ops.norms import rms_normalize


class VisionInputs(NamedTuple):
    """One batch of images in the padded slot layout (all NumPy on the host, arrays on device)."""

    patches: Any  # (B, S, patch_dim) float: flattened (C, T, P, P) patches, zeros at padding slots
    valid: Any  # (B, S) bool
    pos_hw: Any  # (B, S, 2) int32: patch row / column inside its image (2D rotary positions)


# ----------------------------------------------------------------------------------------------
# host-side layout


def slots_needed(grid_hw: tuple[int, int], config: VisionConfig) -> int:
    """Slots one image of ``grid_hw`` patches occupies in the layout (window padding included)."""
    gh, gw = grid_hw
    m = config.spatial_merge_size
    w = config.window_merged
    if not w:
        return gh * gw
    nwh, nww = -(-(gh // m) // w), -(-(gw // m) // w)
    return nwh * nww * config.window_slots


def merged_slot_index(grid_hw: tuple[int, int], config: VisionConfig) -> np.ndarray:
    """``int[M]``: the merged-token slot of each merged token of an image, merged tokens in raster order."""
    gh, gw = grid_hw
    m = config.spatial_merge_size
    mh, mw = gh // m, gw // m
    r, c = np.meshgrid(np.arange(mh), np.arange(mw), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    w = config.window_merged
    if not w:
        return (r * mw + c).astype(np.int32)
    nww = -(-mw // w)
    window = (r // w) * nww + (c // w)
    return (window * (w * w) + (r % w) * w + (c % w)).astype(np.int32)


def vision_layout(images: Sequence[tuple[np.ndarray, tuple[int, int]]], config: VisionConfig, slots: int,
                  batch_size: int | None = None) -> tuple[VisionInputs, list[np.ndarray]]:
    """Place preprocessed images into the padded slot layout.

    Args:
      images: per image ``(patches, (grid_h, grid_w))`` as returned by
        :func:`lumina_jax.models.captioner.processor.preprocess_image` (patches in the reference's order:
        merged token by merged token, raster order, 2x2 patches inside).
      slots: ``S``, the bucket; must hold every image (see :func:`slots_needed`) and be a multiple of
        ``config.window_slots``.
      batch_size: rows to allocate (>= len(images)); extra rows are all padding.

    Returns:
      ``(inputs, merged_slots)``: the arrays, and per image the ``int[M]`` merged-slot index of its merged
      tokens in raster order (the order of the image's ``<|image_pad|>`` tokens in the prompt).
    """
    B = len(images) if batch_size is None else batch_size
    if B < len(images):
        raise ValueError(f"batch_size={B} < {len(images)} images")
    if slots % config.window_slots:
        raise ValueError(f"slots={slots} must be a multiple of window_slots={config.window_slots}")
    mu = config.merge_unit
    m = config.spatial_merge_size
    patches = np.zeros((B, slots, config.patch_dim), np.float32)
    valid = np.zeros((B, slots), bool)
    pos = np.zeros((B, slots, 2), np.int32)
    merged_slots = []
    for b, (p, (gh, gw)) in enumerate(images):
        need = slots_needed((gh, gw), config)
        if need > slots:
            raise ValueError(f"image {b} with a {gh}x{gw} patch grid needs {need} slots, bucket has {slots}")
        if p.shape != (gh * gw, config.patch_dim):
            raise ValueError(f"image {b}: patches of shape {p.shape}, expected {(gh * gw, config.patch_dim)}")
        ms = merged_slot_index((gh, gw), config)
        slot = (ms[:, None] * mu + np.arange(mu)[None, :]).reshape(-1)  # patch slot, reference patch order
        # 2D positions in the reference's order: merged token (raster), then (row, col) inside it.
        mh, mw = gh // m, gw // m
        r, c, i, j = np.meshgrid(np.arange(mh), np.arange(mw), np.arange(m), np.arange(m), indexing="ij")
        patches[b, slot] = p
        valid[b, slot] = True
        pos[b, slot, 0] = (r * m + i).reshape(-1)
        pos[b, slot, 1] = (c * m + j).reshape(-1)
        merged_slots.append(ms)
    return VisionInputs(patches, valid, pos), merged_slots


# ----------------------------------------------------------------------------------------------
# modules


def _dense(features: Any, axes: tuple[Any, ...], name: str, dtype: Any, precision: Any, *, bias: bool = True,
           bias_axes: tuple[Any, ...] | None = None, axis: Any = -1) -> nn.DenseGeneral:
    kw: dict[str, Any] = {}
    if bias:
        kw["bias_init"] = nn.with_logical_partitioning(nn.initializers.normal(0.02), bias_axes)
    return nn.DenseGeneral(features=features, axis=axis, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                           precision=precision, name=name,
                           kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes), **kw)


def rotate_half(x: jax.Array) -> jax.Array:
    """HF ``rotate_half``: channel ``c`` pairs with ``c + D/2``."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def vision_rope(pos_hw: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2D rotary ``cos, sin`` of shape ``(..., head_dim)`` from ``(..., 2)`` patch (row, col) positions.

    ``head_dim / 4`` frequencies; the first quarter of the channels rotates with the row, the second with
    the column, and the second half repeats the first (HF ``Qwen2VLVisionRotaryEmbedding``).
    """
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    p = pos_hw.astype(jnp.float32)
    f = jnp.concatenate([p[..., 0:1] * inv_freq, p[..., 1:2] * inv_freq], axis=-1)
    emb = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x`` (B, S, H, D) rotated in fp32 with cos/sin (B, S, D); returned in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    return (x32 * cos[:, :, None] + rotate_half(x32) * sin[:, :, None]).astype(x.dtype)


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


_ACTS = {
    "quick_gelu": _quick_gelu,
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class VisionNorm(nn.Module):
    """LayerNorm with bias (Qwen2-VL) or RMSNorm (Qwen2.5-VL), eps 1e-6, statistics in fp32."""

    kind: str  # "layernorm" | "rmsnorm"
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,), jnp.float32)
        if self.kind == "rmsnorm":
            return (rms_normalize(x, self.eps) * scale).astype(x.dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(x.dtype)


class VisionAttention(nn.Module):
    """Multi-head self-attention with biases and 2D RoPE; full (per image) or per window."""

    config: VisionConfig
    dtype: Any = jnp.float32
    precision: Any = None
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, cos: jax.Array, sin: jax.Array,
                 is_full: jax.Array) -> jax.Array:
        cfg = self.config
        B, S, _ = x.shape
        H, Dh = cfg.num_heads, cfg.head_dim
        proj = lambda name: _dense((H, Dh), ("embed", "heads", "head_dim"), name, self.dtype,  # noqa: E731
                                   self.precision, bias_axes=("heads", "head_dim"))
        q, k, v = proj("q_proj")(x), proj("k_proj")(x), proj("v_proj")(x)  # (B, S, H, Dh)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        backend = self.attention_backend

        def full(q, k, v):
            return attention(q, k, v, valid, backend=backend)

        def windowed(q, k, v):
            ws = cfg.window_slots
            nw = S // ws
            w = lambda t: t.reshape(B * nw, ws, H, Dh)  # noqa: E731
            out = attention(w(q), w(k), w(v), valid.reshape(B * nw, ws), backend=backend)
            return out.reshape(B, S, H, Dh)

        layer_kinds = set(cfg.layer_is_full())
        if layer_kinds == {True}:
            out = full(q, k, v)
        elif layer_kinds == {False}:
            out = windowed(q, k, v)
        else:
            out = jax.lax.cond(is_full, full, windowed, q, k, v)
        return _dense(cfg.embed_dim, ("heads", "head_dim", "embed"), "o_proj", self.dtype, self.precision,
                      bias_axes=("embed",), axis=(-2, -1))(out)


class VisionMLP(nn.Module):
    """Qwen2-VL: ``fc2(act(fc1 x))``; Qwen2.5-VL: ``down(act(gate x) * up x)``; all with biases."""

    config: VisionConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        act = _ACTS[cfg.hidden_act]
        up = lambda name: _dense(cfg.mlp_dim, ("embed", "mlp"), name, self.dtype, self.precision,  # noqa: E731
                                 bias_axes=("mlp",))
        down = lambda name: _dense(cfg.embed_dim, ("mlp", "embed"), name, self.dtype, self.precision,  # noqa: E731
                                   bias_axes=("embed",))
        if cfg.family == QWEN2_VL:
            return down("fc2")(act(up("fc1")(x)))
        return down("down_proj")(act(up("gate_proj")(x)) * up("up_proj")(x))


class VisionBlock(nn.Module):
    """Pre-norm ViT block as an ``nn.scan`` body (carry ``h``, scanned ``is_full``)."""

    config: VisionConfig
    dtype: Any = jnp.float32
    precision: Any = None
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, h: jax.Array, is_full: jax.Array, valid: jax.Array, cos: jax.Array, sin: jax.Array):
        cfg = self.config
        kind = "layernorm" if cfg.family == QWEN2_VL else "rmsnorm"
        a = VisionAttention(cfg, self.dtype, self.precision, self.attention_backend, name="attn")(
            VisionNorm(kind, name="norm1")(h), valid, cos, sin, is_full)
        h = h + a
        h = h + VisionMLP(cfg, self.dtype, self.precision, name="mlp")(VisionNorm(kind, name="norm2")(h))
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_embed"))
        return h, None


class PatchMerger(nn.Module):
    """Norm, concatenate each 2x2 merge unit, then ``fc2(gelu(fc1 x))`` into the LM width."""

    config: VisionConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.config
        B, S, E = h.shape
        kind = "layernorm" if cfg.family == QWEN2_VL else "rmsnorm"
        x = VisionNorm(kind, name="ln_q")(h).reshape(B, S // cfg.merge_unit, cfg.merge_unit * E)
        wide = cfg.merge_unit * E
        x = _dense(wide, ("embed", "mlp"), "fc1", self.dtype, self.precision, bias_axes=("mlp",))(x)
        x = jax.nn.gelu(x, approximate=False)
        return _dense(cfg.out_dim, ("mlp", "embed"), "fc2", self.dtype, self.precision, bias_axes=("embed",))(x)


class VisionTower(nn.Module):
    """Patches in the slot layout -> merged image features ``(B, S / merge_unit, out_dim)``.

    Features of padding slots are finite but meaningless; the host-side gather never reads them.
    """

    config: VisionConfig
    dtype: Any = jnp.float32
    precision: Any = None
    attention_backend: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, patches: jax.Array, valid: jax.Array, pos_hw: jax.Array) -> jax.Array:
        cfg = self.config
        if patches.shape[1] % cfg.window_slots:
            raise ValueError(f"{patches.shape[1]} slots is not a multiple of window_slots={cfg.window_slots}")
        h = _dense(cfg.embed_dim, ("patch", "embed"), "patch_embed", self.dtype, self.precision, bias=False)(
            patches.astype(self.dtype))
        cos, sin = vision_rope(pos_hw, cfg.head_dim, cfg.rope_theta)
        body = nn.remat(VisionBlock, prevent_cse=False) if self.remat else VisionBlock
        blocks = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.dtype, self.precision, self.attention_backend, name="blocks")
        h, _ = blocks(h, jnp.asarray(cfg.layer_is_full()), valid.astype(bool), cos, sin)
        return PatchMerger(cfg, self.dtype, self.precision, name="merger")(h)
