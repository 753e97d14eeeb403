"""The FLUX autoencoder (diffusers ``AutoencoderKL``) in Flax Linen, channels-last (spec §5).

Lumina-Image 2.0 uses the FLUX.1 VAE unchanged: 16 latent channels, 8x down-sampling, no quant convs,
``scaling_factor`` 0.3611 and ``shift_factor`` 0.1159. Data flow (FLUX config, image ``(B, H, W, 3)``)::

    encode: conv_in -> 4 down blocks (2 resnets each, stride-2 conv after the first 3) -> mid block
            (resnet, 1-head self-attention, resnet) -> GroupNorm+SiLU -> conv_out
            -> (mean, logvar), each (B, H/8, W/8, 16)
    decode: conv_in -> mid block -> 4 up blocks (3 resnets each, 2x nearest up-sampling + conv after the
            first 3) -> GroupNorm+SiLU -> conv_out -> image (B, H, W, 3)

Training latents are ``scale_latents(mode)`` = ``(mean - shift) * scale``; the sampler decodes
``unscale_latents(z)`` (spec §5). Images are in [-1, 1].

Numerics follow diffusers: GroupNorm (eps 1e-6) statistics and affine in fp32 whatever the compute
dtype, ``logvar`` clamped to [-30, 20], down-sampling convs padded (0, 1) on the bottom/right only
(the asymmetric padding of the original LDM code), attention scale ``1/sqrt(C)`` with one head.
Parameters are fp32; convs/matmuls run in ``dtype``.

Parameter names mirror diffusers' module names (``down_blocks_0/resnets_1/conv1``), so the key mapper in
:mod:`lumina_jax.convert.vae` is a plain rename plus kernel transposes. Logical axis names, for the
sharding rules in ``lumina_jax.parallel``:

- conv kernels ``(conv_height, conv_width, conv_in, conv_out)``, conv biases ``(conv_out,)``;
- the mid-block attention projections (1x1 convs in the original) ``(conv_in, conv_out)``;
- GroupNorm scale/bias ``(norm,)``.

The VAE is small (84M parameters) and activation-bound, so the usual rule maps all of these to
``None`` (replicated) and shards the batch; the names exist so that a rule can shard channels if needed.

Tiled decoding (:meth:`AutoencoderKL.decode_tiled`) bounds memory for large images; see
:func:`tiled_decode` for the blending and the memory bound.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.config_utils import YamlConfig
from lumina_jax.ops.attention import attention


NORM_EPS = 1e-6  # diffusers hard-codes this for every GroupNorm of AutoencoderKL (not in config.json)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
PROJ_AXES = ("conv_in", "conv_out")
BIAS_AXES = ("conv_out",)
NORM_AXES = ("norm",)


# ----------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True)
class VAEConfig(YamlConfig):
    """Architecture and latent scaling of an ``AutoencoderKL`` (defaults: FLUX.1, spec §5).

    Field names follow diffusers' ``AutoencoderKL`` config. ``sample_size``, ``force_upcast``,
    ``latents_mean`` and ``latents_std`` do not change the network; they are kept so that an exported
    ``config.json`` says what the imported one said.
    """

    _what = "VAE"
    _prefix = "vae_"

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    scaling_factor: float = 0.3611
    shift_factor: Optional[float] = 0.1159
    sample_size: int = 1024
    force_upcast: bool = True
    latents_mean: Optional[tuple[float, ...]] = None
    latents_std: Optional[tuple[float, ...]] = None

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(float(x) for x in v))
        if not self.block_out_channels:
            raise ValueError("block_out_channels must not be empty")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {list(self.block_out_channels)}: {bad} not divisible by "
                f"norm_num_groups={self.norm_num_groups}"
            )

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each axis (8 for FLUX)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """VAE latents -> diffusion-model latents: ``(z - shift) * scale`` (spec §5, training encode)."""
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def unscale_latents(self, z: jax.Array) -> jax.Array:
        """Diffusion-model latents -> VAE latents: ``z / scale + shift`` (spec §5, sampler decode)."""
        return z / self.scaling_factor + (self.shift_factor or 0.0)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("block_out_channels", "latents_mean", "latents_std"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    # diffusers AutoencoderKL config.json keys that map one-to-one onto our fields
    _DIFFUSERS_PLAIN = (
        "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
        "norm_num_groups", "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv",
        "scaling_factor", "shift_factor", "sample_size", "force_upcast", "latents_mean", "latents_std",
    )  # fmt: skip

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any]) -> "VAEConfig":
        """Build from a diffusers ``AutoencoderKL`` ``config.json`` dict.

        Keys starting with ``_`` are metadata and ignored; anything this implementation does not cover
        (another activation, other block types, spatial norm) is an error rather than a silent mismatch.
        Missing keys take diffusers' constructor defaults.
        """
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        cls_defaults = {  # diffusers AutoencoderKL.__init__ defaults (0.42)
            "block_out_channels": (64,), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32,
            "sample_size": 32, "scaling_factor": 0.18215, "shift_factor": None, "use_quant_conv": True,
            "use_post_quant_conv": True,
        }  # fmt: skip
        act = d.pop("act_fn", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"AutoencoderKL act_fn={act!r} is not supported (only silu)")
        boc = tuple(d.get("block_out_channels", cls_defaults["block_out_channels"]))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(d.pop(key, [want] * len(boc)))
            if any(t != want for t in types) or len(types) != len(boc):
                raise ValueError(f"{key}={types} not supported: need {len(boc)} x {want!r}")
        unknown = sorted(set(d) - set(cls._DIFFUSERS_PLAIN))
        if unknown:
            raise ValueError(f"unsupported AutoencoderKL config keys {unknown}")
        kw = {**cls_defaults, **d}
        kw["sample_size"] = kw["sample_size"][0] if isinstance(kw["sample_size"], (list, tuple)) else kw["sample_size"]
        return cls(**kw)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The ``config.json`` dict for diffusers' ``AutoencoderKL.from_pretrained``."""
        d = self.to_dict()
        n = len(self.block_out_channels)
        d.update(
            _class_name="AutoencoderKL",
            act_fn="silu",
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
        )
        return dict(sorted(d.items()))


def scale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """``(z - shift_factor) * scaling_factor`` (spec §5)."""
    return config.scale_latents(z)


def unscale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """``z / scaling_factor + shift_factor`` (spec §5)."""
    return config.unscale_latents(z)


# ----------------------------------------------------------------------------------------------
# the latent distribution


class DiagonalGaussian(NamedTuple):
    """Posterior ``N(mean, exp(logvar))`` per latent element; unpacks as ``mean, logvar = ...``."""

    mean: jax.Array  # (B, h, w, latent_channels)
    logvar: jax.Array  # same shape, already clamped to LOGVAR_RANGE

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        """The mean: what Lumina's training encodes (spec §5, no sampling)."""
        return self.mean

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def kl(self) -> jax.Array:
        """KL to the standard normal, summed over (h, w, c): ``(B,)``."""
        kl = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
        return jnp.sum(kl, axis=(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# layers


class GroupNorm(nn.Module):
    """GroupNorm over (H, W, C/G) per group, statistics and affine in fp32, output in ``dtype``."""

    num_groups: int
    eps: float = NORM_EPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (B, ..., C)
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, NORM_AXES), (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, NORM_AXES), (c,), jnp.float32)
        g = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)  # two-pass: no cancellation
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * scale + bias).astype(self.dtype)


def _conv(features: int, kernel: int, *, dtype: Any, precision: Any, name: Optional[str] = None, stride: int = 1,
          padding: Any = None) -> nn.Conv:  # fmt: skip
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        precision=precision,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, BIAS_AXES),
        name=name,
    )


def _proj(features: int, *, dtype: Any, precision: Any, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        precision=precision,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), PROJ_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, BIAS_AXES),
        name=name,
    )


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` without time embedding: ``x + conv2(silu(gn2(conv1(silu(gn1(x))))))``."""

    out_channels: int
    groups: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, precision=self.precision)
        h = nn.silu(GroupNorm(self.groups, dtype=self.dtype, name="norm1")(x))
        h = _conv(self.out_channels, 3, name="conv1", **kw)(h)
        h = nn.silu(GroupNorm(self.groups, dtype=self.dtype, name="norm2")(h))
        h = _conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return x.astype(self.dtype) + h


class MidAttention(nn.Module):
    """Single-head spatial self-attention with a residual (diffusers ``Attention``, 1 head of width C)."""

    groups: int
    dtype: Any = jnp.float32
    precision: Any = None
    backend: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, C)
        b, hh, ww, c = x.shape
        kw = dict(dtype=self.dtype, precision=self.precision)
        h = GroupNorm(self.groups, dtype=self.dtype, name="group_norm")(x).reshape(b, hh * ww, c)
        q, k, v = (_proj(c, name=n, **kw)(h)[:, :, None, :] for n in ("to_q", "to_k", "to_v"))  # (B, L, 1, C)
        o = attention(q, k, v, backend=self.backend).reshape(b, hh * ww, c)
        o = _proj(c, name="to_out", **kw)(o)
        return x.astype(self.dtype) + o.reshape(b, hh, ww, c)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (diffusers ``UNetMidBlock2D``)."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32
    precision: Any = None
    attention_backend: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, precision=self.precision)
        x = ResnetBlock(self.channels, self.groups, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = MidAttention(self.groups, backend=self.attention_backend, name="attention", **kw)(x)
        return ResnetBlock(self.channels, self.groups, name="resnets_1", **kw)(x)


def _upsample_nearest_2x(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


class DownBlock(nn.Module):
    """``layers_per_block`` resnets, then (except at the lowest resolution) a stride-2 conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, precision=self.precision)
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{j}", **kw)(x)
        if self.add_downsample:
            # zero padding on the bottom/right only, then a VALID stride-2 conv (LDM/diffusers asymmetry)
            x = _conv(self.out_channels, 3, stride=2, padding=((0, 1), (0, 1)), name="downsampler", **kw)(x)
        return x


class UpBlock(nn.Module):
    """``layers_per_block + 1`` resnets, then (except at full resolution) 2x nearest up-sampling + conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, precision=self.precision)
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{j}", **kw)(x)
        if self.add_upsample:
            x = _conv(self.out_channels, 3, name="upsampler", **kw)(_upsample_nearest_2x(x))
        return x


class Encoder(nn.Module):
    """Image ``(B, H, W, in)`` -> moments ``(B, H/f, W/f, 2 * latent_channels)`` in ``dtype``."""

    config: VAEConfig
    dtype: Any = jnp.float32
    precision: Any = None
    attention_backend: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, precision=self.precision)
        g, chans = cfg.norm_num_groups, cfg.block_out_channels
        x = _conv(chans[0], 3, name="conv_in", **kw)(x.astype(self.dtype))
        for i, ch in enumerate(chans):
            x = DownBlock(ch, cfg.layers_per_block, g, i < len(chans) - 1, name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(chans[-1], g, cfg.mid_block_add_attention, attention_backend=self.attention_backend,
                     name="mid_block", **kw)(x)  # fmt: skip
        x = nn.silu(GroupNorm(g, dtype=self.dtype, name="conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latents ``(B, h, w, latent_channels)`` -> image ``(B, h*f, w*f, out)`` in ``dtype``."""

    config: VAEConfig
    dtype: Any = jnp.float32
    precision: Any = None
    attention_backend: str = "xla"

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, precision=self.precision)
        g, chans = cfg.norm_num_groups, tuple(reversed(cfg.block_out_channels))
        x = _conv(chans[0], 3, name="conv_in", **kw)(z.astype(self.dtype))
        x = MidBlock(chans[0], g, cfg.mid_block_add_attention, attention_backend=self.attention_backend,
                     name="mid_block", **kw)(x)  # fmt: skip
        for i, ch in enumerate(chans):  # up_blocks_0 is the lowest resolution, as in diffusers
            x = UpBlock(ch, cfg.layers_per_block + 1, g, i < len(chans) - 1, name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(GroupNorm(g, dtype=self.dtype, name="conv_norm_out")(x))
        return _conv(cfg.out_channels, 3, name="conv_out", **kw)(x)


# ----------------------------------------------------------------------------------------------
# the autoencoder


class AutoencoderKL(nn.Module):
    """The KL autoencoder of FLUX / Lumina-Image 2.0 (spec §5), channels-last.

    Attributes:
      config: architecture and latent scaling.
      dtype: compute dtype of convs and matmuls (params stay fp32; GroupNorm always runs in fp32).
        Outputs of :meth:`encode` and :meth:`decode` are fp32.
      precision: ``jax.lax.Precision`` for convs/matmuls (e.g. ``"highest"`` for exact fp32 on TPU,
        whose default runs fp32 matmuls through bf16 passes).
      attention_backend: backend of :func:`lumina_jax.ops.attention.attention` for the mid-block.
        Default ``"xla"``: the single head is ``C = 512`` wide, more than fused GPU kernels accept
        (cuDNN flash attention takes head_dim <= 256). Its logits take ``4 * (h*w)**2`` bytes per image
        (1 GiB at 1024 px); :meth:`decode_tiled` bounds that for larger images.

    Methods (call through ``apply(..., method=...)``): :meth:`encode`, :meth:`decode`,
    :meth:`decode_tiled`; ``__call__`` (encode -> mode or sample -> decode) is what ``init`` uses.
    """

    config: VAEConfig = VAEConfig()
    dtype: Any = jnp.float32
    precision: Any = None
    attention_backend: str = "xla"

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, precision=self.precision)
        self.encoder = Encoder(cfg, attention_backend=self.attention_backend, **kw)
        self.decoder = Decoder(cfg, attention_backend=self.attention_backend, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, 1, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, 1, **kw)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """Images ``(B, H, W, in_channels)`` in [-1, 1] -> posterior over ``(B, H/8, W/8, 16)`` latents.

        ``H`` and ``W`` must be multiples of :attr:`VAEConfig.downsample_factor` (8 for FLUX).
        """
        _check_images(images, self.config)
        moments = self.encoder(images)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)  # diffusers: mean first
        return DiagonalGaussian(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    def decode(self, latents: jax.Array) -> jax.Array:
        """VAE latents ``(B, h, w, latent_channels)`` (unscaled, see :meth:`VAEConfig.unscale_latents`)
        -> images ``(B, 8h, 8w, out_channels)`` in fp32, nominally [-1, 1] (not clipped)."""
        _check_latents(latents, self.config)
        if self.config.use_post_quant_conv:
            latents = self.post_quant_conv(latents.astype(self.dtype))
        return self.decoder(latents).astype(jnp.float32)

    def __call__(self, images: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        posterior = self.encode(images)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return self.decode(z)

    def decode_tiled(self, latents: jax.Array, tile: int | tuple[int, int] = 64, overlap: int = 16) -> jax.Array:
        """:meth:`decode` tile by tile with linearly blended seams, in bounded memory.

        ``tile`` and ``overlap`` are in latent pixels (64/16 -> 512 px tiles overlapping by 128 px). An
        image that fits in one tile is decoded exactly as :meth:`decode` does. See :func:`tiled_decode`
        for the blending, the approximation it makes and the memory bound. Works under ``jax.jit``.
        """
        _check_latents(latents, self.config)
        if self.is_initializing():
            raise ValueError("decode_tiled needs trained parameters; initialise with __call__ or decode")
        params = self.variables["params"]
        # A detached copy applied to explicit params is a pure function, safe inside lax.fori_loop.
        unbound = self.clone(parent=None)

        def decode_fn(z: jax.Array) -> jax.Array:
            return unbound.apply({"params": params}, z, method=AutoencoderKL.decode)

        return tiled_decode(decode_fn, latents, tile=tile, overlap=overlap, upscale=self.config.downsample_factor)


def _check_images(images: jax.Array, config: VAEConfig) -> None:
    f = config.downsample_factor
    if images.ndim != 4 or images.shape[-1] != config.in_channels or 0 in images.shape:
        raise ValueError(
            f"images must be a non-empty (B, H, W, {config.in_channels}) channels-last batch, got shape "
            f"{tuple(images.shape)}"
        )
    h, w = images.shape[1:3]
    if h % f or w % f:
        raise ValueError(
            f"image size {h}x{w} is not a multiple of {f} (the VAE down-samples {f}x); pad or resize to "
            f"{math.ceil(h / f) * f}x{math.ceil(w / f) * f} (Lumina needs multiples of 16 for patch 2)"
        )


def _check_latents(latents: jax.Array, config: VAEConfig) -> None:
    if latents.ndim != 4 or latents.shape[-1] != config.latent_channels or 0 in latents.shape:
        raise ValueError(
            f"latents must be a non-empty (B, h, w, {config.latent_channels}) channels-last batch, got shape "
            f"{tuple(latents.shape)}"
        )


# ----------------------------------------------------------------------------------------------
# tiled decoding


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)``, evenly spaced, so neighbours
    overlap by at least ``overlap`` and every tile has the same shape (one compiled decoder)."""
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    n = math.ceil((size - tile) / (tile - overlap)) + 1
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def blend_weights(starts: Sequence[int], tile: int, size: int) -> np.ndarray:
    """``(n, tile)`` weights along one axis: 1 inside a tile, complementary linear ramps across each
    overlap with a neighbour, normalised so the weights of all tiles sum to exactly 1 at every position."""
    n = len(starts)
    w = np.ones((n, tile), np.float64)
    for i in range(n):
        if i > 0:
            ov = starts[i - 1] + tile - starts[i]
            w[i, :ov] *= (np.arange(ov) + 0.5) / ov
        if i < n - 1:
            ov = starts[i] + tile - starts[i + 1]
            w[i, tile - ov :] *= 1.0 - (np.arange(ov) + 0.5) / ov
    total = np.zeros(size, np.float64)
    for i, s in enumerate(starts):
        total[s : s + tile] += w[i]
    if np.any(total <= 0):
        raise AssertionError("tiles do not cover the image")  # cannot happen with tile_starts
    for i, s in enumerate(starts):
        w[i] /= total[s : s + tile]
    return w.astype(np.float32)


def tiled_decode(
    decode_fn: Callable[[jax.Array], jax.Array],
    latents: jax.Array,
    *,
    tile: int | tuple[int, int],
    overlap: int,
    upscale: int,
) -> jax.Array:
    """Decode ``latents`` ``(B, h, w, c)`` tile by tile with ``decode_fn`` and blend the seams.

    Tiles are ``tile`` latent pixels square (or ``(th, tw)``, clipped to the latent size), evenly
    spaced so neighbours overlap by at least ``overlap`` (:func:`tile_starts`). Each decoded tile is
    weighted by separable linear ramps across its overlaps (:func:`blend_weights`; the weights of all
    tiles sum to one at every pixel) and accumulated into an fp32 output in a ``lax.fori_loop``.

    Approximation: the decoder's GroupNorm statistics and mid-block attention see one tile, not the
    whole image, so a tiled decode is not bit-identical to :meth:`AutoencoderKL.decode` (diffusers'
    ``enable_tiling`` makes the same trade); the blending hides seams. Larger tiles/overlaps -> closer.

    Memory bound: the loop body is one tile decode, so the peak is the fp32 output accumulator
    (``B * H * W * out_channels * 4`` bytes, 48 MiB per 2048x2048 image) plus the latents plus the
    working set of decoding one ``tile x tile`` latent tile, independent of the image size. XLA's own
    accounting (CPU ``memory_analysis``, FLUX decoder, bf16, batch 1) gives 0.93 GiB of scratch for
    ``tile=64, overlap=16`` at 2048x2048, about that of a plain 512x512 decode (0.75 GiB), against
    3.0 GiB for a plain 1024x1024 decode and 32 GiB for a plain 2048x2048 one (the mid-block attention
    over 65,536 tokens dominates). Tiles are decoded sequentially: the price is time, about
    ``n_tiles * (tile + overlap)^2 / tile^2`` of the pixel work.

    Returns ``(B, h*upscale, w*upscale, C_out)`` fp32.
    """
    b, h, w, c = latents.shape
    th, tw = (tile, tile) if isinstance(tile, int) else tuple(tile)
    th, tw = min(th, h), min(tw, w)
    if th == h and tw == w:
        return decode_fn(latents).astype(jnp.float32)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    wy = jnp.asarray(blend_weights([y * upscale for y in ys], th * upscale, h * upscale))
    wx = jnp.asarray(blend_weights([x * upscale for x in xs], tw * upscale, w * upscale))
    out = jax.eval_shape(decode_fn, jax.ShapeDtypeStruct((b, th, tw, c), latents.dtype))
    if out.shape[:3] != (b, th * upscale, tw * upscale):
        raise ValueError(f"decode_fn maps a {(b, th, tw, c)} tile to {out.shape}; expected upscale {upscale}")
    c_out = out.shape[-1]
    iy = np.repeat(np.arange(len(ys)), len(xs))
    ix = np.tile(np.arange(len(xs)), len(ys))
    iy_a, ix_a = jnp.asarray(iy, jnp.int32), jnp.asarray(ix, jnp.int32)
    ys_a, xs_a = jnp.asarray(ys, jnp.int32), jnp.asarray(xs, jnp.int32)
    zero = jnp.zeros((), jnp.int32)

    def body(k: jax.Array, acc: jax.Array) -> jax.Array:
        y0, x0 = ys_a[iy_a[k]], xs_a[ix_a[k]]
        z = jax.lax.dynamic_slice(latents, (zero, y0, x0, zero), (b, th, tw, c))
        img = decode_fn(z).astype(jnp.float32)
        wgt = wy[iy_a[k]][:, None] * wx[ix_a[k]][None, :]
        at = (zero, y0 * upscale, x0 * upscale, zero)
        cur = jax.lax.dynamic_slice(acc, at, (b, th * upscale, tw * upscale, c_out))
        return jax.lax.dynamic_update_slice(acc, cur + img * wgt[None, :, :, None], at)

    acc = jnp.zeros((b, h * upscale, w * upscale, c_out), jnp.float32)
    return jax.lax.fori_loop(0, len(iy), body, acc)
