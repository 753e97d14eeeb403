"""Unified Next-DiT, the Lumina-Image 2.0 diffusion transformer (spec §1-2), in Flax Linen.

Data flow for one forward (shapes for the 2B model at 1024 px, ``B`` samples):

    t (B,)            -> TimestepEmbedder            -> temb (B, 1024)
    cap_feats (B,Lc,2304) -> RMSNorm+Linear -> context_refiner x2 (unmodulated)   -> cap (B, Lc, D)
    x (B,128,128,16)  -> patchify (B,4096,64) -> x_embedder -> noise_refiner x2 (adaLN) -> img (B, N, D)
    pack per sample [cap[:L_i] | img[:N_i] | pad] -> layers x26 (adaLN, joint attention) -> final layer
    -> image slice -> unpatchify -> velocity (B,128,128,16)

Conventions (original semantics, spec §2.11): ``t`` in [0, 1] with 0 = pure noise and 1 = data; the
output is the velocity ``data - noise`` (not negated). Latents are channels-last.

Padding: the joint sequence is *packed* exactly as the original does (valid caption tokens, then image
tokens, then padding), built with a per-sample gather, so valid keys always form a prefix and attention
kernels receive prefix lengths (``kv_lengths``) and can skip padded blocks. Captions may have different
lengths per sample, and images different sizes (mixed-size mode, :meth:`NextDiT.forward_tokens`): each
sample gets exactly the output it gets alone.

Parameters are fp32 with logical axis names (``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``,
``norm``, ``cond``, ``freq``, ``patch``, ``cap``, ``layers``) for the sharding rules; compute dtype is
selectable; norms, RoPE and softmax run in fp32.

The q/k/v projections are stored as three kernels (lossless split of the original fused ``qkv``, so
heads shard cleanly over a ``tensor`` axis) and concatenated at run time into one fused matmul (three
matmuls when traced under a mesh whose ``tensor`` axis splits the heads).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.config_utils import YamlConfig
from lumina_jax.ops.attention import attention
from lumina_jax.ops.norms import RMSNorm, layer_norm_no_affine
from lumina_jax.ops.rope import apply_rope, rope_cos_sin


DIFFUSERS_QK_NORM_EPS = 1e-5  # hard-coded in diffusers' Lumina2 attention (and apex's default, which ORIG uses when installed)


@dataclasses.dataclass(frozen=True)
class NextDiTConfig(YamlConfig):
    """Architecture of a Next-DiT (field names follow the original ``NextDiT`` constructor)."""

    _what = "NextDiT"
    _prefix = "nextdit_"

    patch_size: int = 2
    in_channels: int = 16
    out_channels: Optional[int] = None
    dim: int = 2304
    n_layers: int = 26
    n_refiner_layers: int = 2
    n_heads: int = 24
    n_kv_heads: int = 8
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    qk_norm: bool = True
    # ORIG builds the q/k RMSNorm without eps (1e-6 in its fallback RMSNorm, 1e-5 with apex); diffusers
    # uses 1e-5. Default: the original fallback. Checkpoints loaded from a diffusers directory get 1e-5.
    qk_norm_eps: float = 1e-6
    cap_feat_dim: int = 2304
    axes_dims: tuple[int, ...] = (32, 32, 32)
    axes_lens: tuple[int, ...] = (300, 512, 512)
    rope_theta: float = 10000.0
    # ORIG rounds the RoPE angles p * omega to float32 before taking cos/sin (complex64); diffusers keeps
    # them in float64 (complex128); cos/sin differ by up to ~1.4e-5 at position 511. Default: "float32",
    # the original; "float64" is diffusers'. Neither changes the weights, so conversions keep this field
    # only in the project's own and original formats (diffusers' config.json has no place for it).
    rope_angles: str = "float32"
    frequency_embedding_size: int = 256
    # What the final layer predicts. Lumina-Image 2.0 (original and diffusers): ``"velocity"``, the output
    # as is. ``"data"`` (not in Lumina; the x-prediction of Li & He 2025, "Back to Basics: Let Denoising
    # Generative Models Denoise"): the final layer predicts the clean latent x^ and the module returns
    # the velocity (x^ - x_t) / max(1 - t, data_min_gap), so trainer, loss and samplers are unchanged.
    # It suits pixel-space models with high-dimensional patches (the bundled shapes model), where a
    # velocity head must reproduce the noise in every patch feature. Cannot be exported to PyTorch.
    prediction: str = "velocity"
    data_min_gap: float = 0.05
    # diffusers' ``sample_size``: the default generation size in latent pixels (128: 1024 px with the
    # FLUX VAE), and its ``scaling_factor`` (1.0 in every Lumina-Image 2.0 config). Not used by the model
    # (METADATA_FIELDS); kept so that conversions give them back unchanged.
    sample_size: int = 128
    scaling_factor: float = 1.0

    # fields the forward never reads: checks of a checkpoint against a config skip them
    METADATA_FIELDS: ClassVar[tuple[str, ...]] = ("sample_size", "scaling_factor")

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if sum(self.axes_dims) != self.head_dim:
            raise ValueError(f"sum(axes_dims)={sum(self.axes_dims)} must equal head_dim={self.head_dim}")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise ValueError("axes_dims and axes_lens need 3 entries (caption index, row, column)")
        if self.prediction not in ("velocity", "data"):
            raise ValueError(f"prediction must be 'velocity' or 'data', got {self.prediction!r}")
        if self.prediction == "data" and self.out_ch != self.in_channels:
            raise ValueError(f"prediction 'data' needs out_channels == in_channels ({self.out_ch} != {self.in_channels})")
        if self.rope_angles not in ("float32", "float64"):
            raise ValueError(f"rope_angles must be 'float32' (the original's) or 'float64' (diffusers'), got "
                             f"{self.rope_angles!r}")  # fmt: skip
        if not 0.0 < self.data_min_gap <= 1.0:
            raise ValueError(f"data_min_gap must be in (0, 1], got {self.data_min_gap}")
        object.__setattr__(self, "axes_dims", tuple(int(a) for a in self.axes_dims))
        object.__setattr__(self, "axes_lens", tuple(int(a) for a in self.axes_lens))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def out_ch(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def t_dim(self) -> int:
        return min(self.dim, 1024)

    @property
    def ffn_hidden(self) -> int:
        hid = 4 * self.dim
        if self.ffn_dim_multiplier is not None:
            hid = int(self.ffn_dim_multiplier * hid)
        return self.multiple_of * ((hid + self.multiple_of - 1) // self.multiple_of)

    @property
    def patch_features(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["axes_dims"], d["axes_lens"] = list(self.axes_dims), list(self.axes_lens)
        return d

    # diffusers' Lumina2Transformer2DModel config.json <-> ours (spec §3.2)
    _DIFFUSERS_KEYS = {
        "patch_size": "patch_size", "in_channels": "in_channels", "out_channels": "out_channels",
        "hidden_size": "dim", "num_layers": "n_layers", "num_refiner_layers": "n_refiner_layers",
        "num_attention_heads": "n_heads", "num_kv_heads": "n_kv_heads", "multiple_of": "multiple_of",
        "ffn_dim_multiplier": "ffn_dim_multiplier", "norm_eps": "norm_eps", "axes_dim_rope": "axes_dims",
        "axes_lens": "axes_lens", "cap_feat_dim": "cap_feat_dim", "sample_size": "sample_size",
        "scaling_factor": "scaling_factor",
    }  # fmt: skip

    def require_velocity_head(self, target: str) -> None:
        """Raise unless the model's head predicts velocity as Lumina's does (PyTorch exports)."""
        if self.prediction != "velocity":
            raise ValueError(f"this model predicts {self.prediction!r} (x-prediction head): {target} has no such "
                             "option and would read its output as a velocity; keep it in the 'jax' format")

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any]) -> "NextDiTConfig":
        kw = {ours: d[theirs] for theirs, ours in cls._DIFFUSERS_KEYS.items() if theirs in d}
        return cls(qk_norm=True, qk_norm_eps=DIFFUSERS_QK_NORM_EPS, **kw)

    def to_diffusers_config(self) -> dict[str, Any]:
        self.require_velocity_head("diffusers' Lumina2Transformer2DModel")
        if not self.qk_norm:
            raise ValueError("diffusers' Lumina2Transformer2DModel always has q/k norms; qk_norm=False cannot be exported")
        fixed = {"rope_theta": 10000.0, "frequency_embedding_size": 256}  # hard-coded in diffusers' modules
        other = {k: getattr(self, k) for k, v in fixed.items() if getattr(self, k) != v}
        if other:
            raise ValueError(f"diffusers' Lumina2Transformer2DModel fixes {fixed}; this model has {other}, which "
                             f"from_pretrained would not reproduce: export it to the 'original' or 'jax' format")
        d = {theirs: getattr(self, ours) for theirs, ours in self._DIFFUSERS_KEYS.items()}
        d["axes_dim_rope"], d["axes_lens"] = list(self.axes_dims), list(self.axes_lens)
        d["_class_name"] = "Lumina2Transformer2DModel"
        return d


def param_count(config: NextDiTConfig, include_norm_final: bool = True) -> int:
    """Analytic parameter count (spec §1.1: 2,609,771,456 for the 2B model with ``norm_final``)."""
    c, d, hd = config, config.dim, config.head_dim
    attn = d * (c.n_heads + 2 * c.n_kv_heads) * hd + c.n_heads * hd * d + (2 * hd if c.qk_norm else 0)
    block = attn + 3 * d * c.ffn_hidden + 4 * d
    mod = c.t_dim * 4 * d + 4 * d
    total = (c.n_layers + c.n_refiner_layers) * (block + mod) + c.n_refiner_layers * block
    total += c.patch_features * d + d  # x_embedder
    total += c.frequency_embedding_size * c.t_dim + c.t_dim + c.t_dim * c.t_dim + c.t_dim  # t_embedder
    total += c.cap_feat_dim + c.cap_feat_dim * d + d  # cap_embedder
    total += c.t_dim * d + d + d * c.patch_size**2 * c.out_ch + c.patch_size**2 * c.out_ch  # final layer
    return total + (d if include_norm_final else 0)


def flops_forward(config: NextDiTConfig, cap_len: int, n_img: int) -> int:
    """Analytic matmul + attention FLOPs of one forward for one sample (no causal halving).

    Same count as ``shared/bench/diffusers_anchor.py`` (2 FLOPs per MAC; refiners see their own
    sequences), so TFLOP/s figures are comparable with the PyTorch reference.
    """
    c, hd = config, config.head_dim
    per_tok = 2 * (c.dim * (c.n_heads + 2 * c.n_kv_heads) * hd + c.n_heads * hd * c.dim + 3 * c.dim * c.ffn_hidden)

    def stack(n_layers: int, length: int) -> int:
        return n_layers * (per_tok * length + 4 * length * length * c.n_heads * hd)

    return stack(c.n_layers, cap_len + n_img) + stack(c.n_refiner_layers, n_img) + stack(c.n_refiner_layers, cap_len)


# ----------------------------------------------------------------------------------------------
# layers


def _fp32_draw(init: Callable) -> Callable:
    """``init`` drawn in fp32 and rounded to the requested dtype: a bf16 init is the fp32 init rounded
    (the same values whatever ``param_dtype``), and its random bits stay 32-bit, which XLA partitions
    across devices (16-bit draws are generated as packed 32-bit words and reshaped, which it does not)."""

    def draw(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return init(key, shape, jnp.float32).astype(dtype)

    return draw


LORA = "lora"  # variable collection of LoRA adapters: {param name: {"down": (in, r), "up": (r, out)}}


def lora_delta(module: nn.Module, name: str, x: jax.Array, dtype: Any) -> Optional[jax.Array]:
    """``(x @ down) @ up`` for the adapter of ``module``'s param ``name`` in the ``lora`` collection, in
    ``dtype`` (``up`` already carries the scale alpha / r); ``None`` without one. The side path of a LoRA
    (:mod:`lumina_jax.train.lora`), as in PEFT: no merged weight, so the backward forms no full weight
    gradient."""
    if not module.has_variable(LORA, name):
        return None
    ad = module.get_variable(LORA, name)
    h = jnp.einsum("...i,ir->...r", x.astype(dtype), ad["down"].astype(dtype))
    return jnp.einsum("...r,ro->...o", h, ad["up"].astype(dtype))


class _Dense(nn.Dense):
    """``nn.Dense`` plus the LoRA side path of its ``kernel`` when the ``lora`` collection holds one."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs)
        d = lora_delta(self, "kernel", inputs, y.dtype)
        return y if d is None else y + d


def _dense(features: int, axes: tuple[str, str], *, use_bias: bool, dtype: Any, name: Optional[str] = None,
           init: Callable = nn.initializers.xavier_uniform(), param_dtype: Any = jnp.float32) -> nn.Dense:  # fmt: skip
    return _Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(_fp32_draw(init), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        name=name,
    )


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of ``t`` (B,) -> (B, dim), cos first (spec §2.1), fp32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    config: NextDiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        c = self.config
        h = timestep_features(t, c.frequency_embedding_size).astype(self.dtype)
        h = _dense(c.t_dim, ("freq", "cond"), use_bias=True, dtype=self.dtype, name="linear_1",
                   init=nn.initializers.normal(0.02), param_dtype=self.param_dtype)(h)  # fmt: skip
        return _dense(c.t_dim, ("cond", "cond"), use_bias=True, dtype=self.dtype, name="linear_2",
                      init=nn.initializers.normal(0.02), param_dtype=self.param_dtype)(nn.silu(h))  # fmt: skip


class _NormScale(nn.Module):
    """Just the ``scale`` param of an :class:`RMSNorm` (for the fused q/k norm + RoPE path, which must
    keep the unfused path's parameter tree)."""

    axis_name: str = "norm"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: int) -> jax.Array:
        return self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (features,),
                          self.param_dtype)  # fmt: skip


def _mesh_axis_size(name: str) -> int:
    """Size of mesh axis ``name`` in the mesh being traced under (``jax.set_mesh``); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh is None or mesh.empty else dict(mesh.shape).get(name, 1)


class Attention(nn.Module):
    """Fused-qkv GQA self-attention with per-head q/k RMSNorm and 3-axis RoPE (spec §2.8)."""

    config: NextDiTConfig
    dtype: Any = jnp.float32
    backend: str = "auto"
    param_dtype: Any = jnp.float32
    fuse_qk: bool = False  # q/k RMSNorm + RoPE through the fused kernel (lumina_jax.ops.qk_norm_rope)

    @nn.compact
    def __call__(self, x, cos, sin, kv_lengths):
        c = self.config
        b, l, _ = x.shape
        hd, hq, hkv = c.head_dim, c.n_heads, c.n_kv_heads
        # the original initialises the fused qkv weight with xavier_uniform: the bound of the fused
        # (dim, (hq + 2 hkv) hd) matrix applies to each of the three slices
        bound = (6.0 / (c.dim + (hq + 2 * hkv) * hd)) ** 0.5
        init = _fp32_draw(lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound))
        wq = self.param("q", nn.with_logical_partitioning(init, ("embed", "heads")), (c.dim, hq * hd), self.param_dtype)
        wk = self.param("k", nn.with_logical_partitioning(init, ("embed", "kv_heads")), (c.dim, hkv * hd), self.param_dtype)
        wv = self.param("v", nn.with_logical_partitioning(init, ("embed", "kv_heads")), (c.dim, hkv * hd), self.param_dtype)
        fused_kernel = c.qk_norm and self.fuse_qk
        if _mesh_axis_size("tensor") > 1 and not fused_kernel:
            # heads split over `tensor`: a concatenated (q|k|v) weight would not line up with the tensor
            # shards (XLA inserts collective-permutes of weights and activations): three matmuls instead
            xd = x.astype(self.dtype)
            q, k, v = (jnp.einsum("bld,de->ble", xd, w.astype(self.dtype)).reshape(b, l, h, hd)
                       for w, h in ((wq, hq), (wk, hkv), (wv, hkv)))  # fmt: skip
        else:  # one fused matmul (the original's qkv)
            w_qkv = jnp.concatenate([wq, wk, wv], axis=1).astype(self.dtype)
            qkv = jnp.einsum("bld,de->ble", x.astype(self.dtype), w_qkv)
            q = qkv[..., : hq * hd].reshape(b, l, hq, hd)
            k = qkv[..., hq * hd : (hq + hkv) * hd].reshape(b, l, hkv, hd)
            v = qkv[..., (hq + hkv) * hd :].reshape(b, l, hkv, hd)
        deltas = {n: lora_delta(self, n, x, self.dtype) for n in ("q", "k", "v")}
        if any(d is not None for d in deltas.values()):  # LoRA side paths (training with adapters)
            add = lambda t, n, h: t if deltas[n] is None else t + deltas[n].reshape(b, l, h, hd)  # noqa: E731
            q, k, v = add(q, "q", hq), add(k, "k", hkv), add(v, "v", hkv)
            if fused_kernel:  # the kernel reads q and k from qkv
                qkv = jnp.concatenate([q.reshape(b, l, -1), k.reshape(b, l, -1), v.reshape(b, l, -1)], axis=-1)
        # the softmax scale 1/sqrt(hd) goes into q while it is fp32, so that a bf16 q is rounded once (a
        # backend that scales its bf16 input, as splash, would round it a second time); attention's scale is 1
        sm_scale = hd**-0.5
        if fused_kernel:  # same params (q_norm/scale, k_norm/scale), one kernel pass each,
            from lumina_jax.ops.qk_norm_rope import qk_norm_rope  # reading q and k in place from qkv

            qkv_heads = qkv.reshape(b, l, hq + 2 * hkv, hd)
            scale = lambda name: _NormScale("head_dim", self.param_dtype, name=name)(hd)  # noqa: E731
            q_weight = scale("q_norm").astype(jnp.float32) * sm_scale  # RoPE is linear: the kernel's q comes out scaled
            q = qk_norm_rope(qkv_heads, q_weight, cos, sin, eps=c.qk_norm_eps, out_dtype=self.dtype,
                             heads=(0, hq))  # fmt: skip
            k = qk_norm_rope(qkv_heads, scale("k_norm"), cos, sin, eps=c.qk_norm_eps, out_dtype=self.dtype,
                             heads=(hq, hkv))  # fmt: skip
        else:
            if c.qk_norm:
                q = RMSNorm(c.qk_norm_eps, jnp.float32, "head_dim", self.param_dtype, name="q_norm")(q)
                k = RMSNorm(c.qk_norm_eps, jnp.float32, "head_dim", self.param_dtype, name="k_norm")(k)
            q = (apply_rope(q.astype(jnp.float32), cos, sin) * sm_scale).astype(self.dtype)
            k = apply_rope(k, cos, sin).astype(self.dtype)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        out = attention(q, k, v.astype(self.dtype), kv_lengths=kv_lengths, backend=self.backend, scale=1.0)
        out = out.reshape(b, l, hq * hd)
        return _dense(c.dim, ("heads", "embed"), use_bias=False, dtype=self.dtype, name="out", param_dtype=self.param_dtype)(out)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``, bias-free (spec §2.9); the SiLU runs in fp32 like diffusers."""

    config: NextDiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        pd = self.param_dtype
        h1 = _dense(c.ffn_hidden, ("embed", "mlp"), use_bias=False, dtype=self.dtype, name="w1", param_dtype=pd)(x)
        h3 = _dense(c.ffn_hidden, ("embed", "mlp"), use_bias=False, dtype=self.dtype, name="w3", param_dtype=pd)(x)
        h = (nn.silu(h1.astype(jnp.float32)) * h3.astype(jnp.float32)).astype(self.dtype)
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        return _dense(c.dim, ("mlp", "embed"), use_bias=False, dtype=self.dtype, name="w2", param_dtype=pd)(h)


class TransformerBlock(nn.Module):
    """Sandwich-norm block (spec §2.7); ``modulation`` adds tanh-gated adaLN (scale and gate only).

    Call signature fits ``nn.scan``: ``(x, (temb, cos, sin, kv_lengths)) -> (x, None)``.
    """

    config: NextDiTConfig
    modulation: bool = True
    dtype: Any = jnp.float32
    backend: str = "auto"
    param_dtype: Any = jnp.float32
    fuse_qk: bool = False

    @nn.compact
    def __call__(self, x, ctx):
        temb, cos, sin, kv_lengths = ctx
        c = self.config
        norm = lambda name: RMSNorm(c.norm_eps, self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        attn = Attention(c, self.dtype, self.backend, self.param_dtype, self.fuse_qk, name="attention")
        ffn = FeedForward(c, self.dtype, self.param_dtype, name="feed_forward")
        if self.modulation:
            mod = _dense(4 * c.dim, ("modulation", "embed"), use_bias=True, dtype=self.dtype, name="adaLN_modulation",
                         init=nn.initializers.zeros, param_dtype=self.param_dtype)(nn.silu(temb.astype(self.dtype)))  # fmt: skip
            scale_msa, gate_msa, scale_mlp, gate_mlp = (m[:, None, :].astype(jnp.float32) for m in jnp.split(mod, 4, -1))
            h = norm("attention_norm1")(x).astype(jnp.float32) * (1.0 + scale_msa)
            a = norm("attention_norm2")(attn(h.astype(self.dtype), cos, sin, kv_lengths))
            x = x + (jnp.tanh(gate_msa) * a.astype(jnp.float32)).astype(x.dtype)
            h = norm("ffn_norm1")(x).astype(jnp.float32) * (1.0 + scale_mlp)
            f = norm("ffn_norm2")(ffn(h.astype(self.dtype)))
            x = x + (jnp.tanh(gate_mlp) * f.astype(jnp.float32)).astype(x.dtype)
        else:
            x = x + norm("attention_norm2")(attn(norm("attention_norm1")(x), cos, sin, kv_lengths)).astype(x.dtype)
            x = x + norm("ffn_norm2")(ffn(norm("ffn_norm1")(x))).astype(x.dtype)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, None


def save_low_precision(prim: Any, *avals: Any, **params: Any) -> bool:
    """Remat policy ``low_precision``: keep every matmul output and every value already in a 16-bit float
    dtype (bf16 activations, attention outputs and statistics-free kernel results); recompute the fp32
    elementwise work from them in the backward pass (norm statistics, adaLN modulation and gates, SwiGLU,
    RoPE). That fp32 glue is what made ``none`` save 1516 MiB of activations per layer per 1024 px sample
    (12 fp32 ``(L, dim)`` and 5 fp32 ``(L, ffn)`` tensors; ``low_precision``: 518 MiB, ``dots``: 244 MiB but
    the attention kernel's forward is recomputed); recomputing the glue costs memory traffic only.
    """
    if prim is jax.lax.dot_general_p:
        return True
    if prim is jax.lax.convert_element_type_p:
        return jnp.dtype(params["new_dtype"]).itemsize <= 2
    # judged by the floating inputs only (integer lengths/masks ride along with attention kernels, whose
    # outputs -- including the fp32 logsumexp -- must be kept or the backward recomputes the attention)
    floats = [a.dtype for a in avals if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)]
    return bool(floats) and all(jnp.dtype(d).itemsize <= 2 for d in floats)


REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "low_precision": save_low_precision,
}


class BlockStack(nn.Module):
    """``n`` identical blocks, stacked params (leading ``layers`` axis) run with ``nn.scan``."""

    config: NextDiTConfig
    n: int
    modulation: bool
    dtype: Any
    backend: str
    remat: str = "none"
    scan: bool = True
    param_dtype: Any = jnp.float32
    fuse_qk: bool = False

    @nn.compact
    def __call__(self, x, temb, cos, sin, kv_lengths):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose from {sorted(REMAT_POLICIES)}")
        block_cls = TransformerBlock
        if self.remat != "none":
            block_cls = nn.remat(TransformerBlock, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
        ctx = (temb, cos, sin, kv_lengths)
        if self.scan:
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0, LORA: 0},  # LoRA adapters are stacked like their weights
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.n,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(self.config, self.modulation, self.dtype, self.backend, self.param_dtype, self.fuse_qk, name="blocks")
            x, _ = stack(x, ctx)
        else:  # unrolled (debugging / per-layer inspection); same math, params not stacked
            for i in range(self.n):
                x, _ = block_cls(self.config, self.modulation, self.dtype, self.backend, self.param_dtype,
                                 self.fuse_qk, name=f"blocks_{i}")(x, ctx)
        return x


# ----------------------------------------------------------------------------------------------
# patchify


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p*p*C); token order row-major, features (p_h, p_w, c) (spec §2.5)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, h: int, w: int, p: int, c: int) -> jax.Array:
    """Inverse of :func:`patchify` for an (h, w)-token grid: (B, h*w, p*p*c) -> (B, h*p, w*p, c)."""
    b = tokens.shape[0]
    x = tokens[:, : h * w].reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


def pack_latents(latents: Sequence[Any], patch_size: int = 2, token_budget: Optional[int] = None,
                 max_grid: Optional[tuple[int, int]] = None):
    """Different-size latents ``[(H_i, W_i, C)]`` -> padded tokens ``(B, N, p*p*C)`` and grid sizes ``(B, 2)``.

    ``token_budget`` fixes ``N`` (one compiled shape for any mix of sizes); default: the largest sample.
    ``max_grid``: the model's RoPE table in patches (``config.axes_lens[1:]``); a larger grid is an error here,
    as in :meth:`NextDiT.__call__` (:meth:`NextDiT.forward_tokens` cannot check traced sizes).
    """
    grids = []
    for i, z in enumerate(latents):
        h, w = z.shape[0], z.shape[1]
        if h % patch_size or w % patch_size:
            raise ValueError(f"latent {i} has size {h}x{w}, not divisible by patch size {patch_size}")
        grids.append((h // patch_size, w // patch_size))
        if max_grid is not None and (grids[-1][0] > max_grid[0] or grids[-1][1] > max_grid[1]):
            raise ValueError(f"latent {i}: grid {grids[-1][0]}x{grids[-1][1]} patches exceeds the RoPE table "
                             f"({max_grid[0]}x{max_grid[1]} positions)")
    n = max(gh * gw for gh, gw in grids)
    budget = token_budget or n
    if budget < n:
        raise ValueError(f"token_budget {budget} is smaller than the largest sample ({n} tokens)")
    toks = []
    for z in latents:
        t = patchify(jnp.asarray(z)[None], patch_size)[0]
        toks.append(jnp.pad(t, ((0, budget - t.shape[0]), (0, 0))))
    return jnp.stack(toks), jnp.asarray(grids, jnp.int32)


def unpack_tokens(tokens: jax.Array, grid_sizes: Any, patch_size: int, channels: int) -> list[jax.Array]:
    """Inverse of :func:`pack_latents`: a list of ``(H_i, W_i, C)`` arrays."""
    out = []
    for i, (gh, gw) in enumerate(np.asarray(grid_sizes)):
        out.append(unpatchify(tokens[i : i + 1], int(gh), int(gw), patch_size, channels)[0])
    return out


# ----------------------------------------------------------------------------------------------
# the model


class NextDiT(nn.Module):
    """Lumina-Image 2.0's Unified Next-DiT.

    Attributes:
      config: architecture.
      dtype: compute dtype. ``jnp.bfloat16`` for speed.
      param_dtype: dtype params are *created* in by ``init`` (fp32; bf16 lets a sharded init of a large
        model write bf16 straight into each scanned layer, see ``init_params_sharded``). Params of
        any dtype can be passed to ``apply``.
      attention_backend: see :mod:`lumina_jax.ops.attention` (``auto``, ``xla``, ``cudnn``, ...).
      remat: rematerialisation policy for the block stacks (``none``, ``full``, ``dots``, ``dots_no_batch``,
        ``low_precision``; see :data:`REMAT_POLICIES`).
      scan_layers: stack and ``nn.scan`` the blocks (fast compile); False unrolls them.
      fuse_qk_norm_rope: run each attention's q/k RMSNorm + RoPE as one Pallas kernel
        (:mod:`lumina_jax.ops.qk_norm_rope`; same params and maths, one memory pass instead of two).
        For one device: XLA cannot partition the kernel inside a sharded ``jit``.
    """

    config: NextDiTConfig
    dtype: Any = jnp.float32
    attention_backend: str = "auto"
    remat: str = "none"
    scan_layers: bool = True
    param_dtype: Any = jnp.float32
    fuse_qk_norm_rope: bool = False

    def setup(self):
        c, dt, pd = self.config, self.dtype, self.param_dtype
        self.t_embedder = TimestepEmbedder(c, dt, pd)
        self.cap_norm = RMSNorm(c.norm_eps, dtype=dt, axis_name="cap", param_dtype=pd)
        self.cap_linear = _dense(c.dim, ("cap", "embed"), use_bias=True, dtype=dt, init=nn.initializers.normal(0.02),
                                 param_dtype=pd)  # fmt: skip
        self.x_embedder = _dense(c.dim, ("patch", "embed"), use_bias=True, dtype=dt, param_dtype=pd)
        kw = dict(dtype=dt, backend=self.attention_backend, remat=self.remat, scan=self.scan_layers, param_dtype=pd,
                  fuse_qk=self.fuse_qk_norm_rope)  # fmt: skip
        self.context_refiner = BlockStack(c, c.n_refiner_layers, modulation=False, **kw)
        self.noise_refiner = BlockStack(c, c.n_refiner_layers, modulation=True, **kw)
        self.layers = BlockStack(c, c.n_layers, modulation=True, **kw)
        self.final_adaLN = _dense(c.dim, ("modulation", "embed"), use_bias=True, dtype=dt, init=nn.initializers.zeros,
                                  param_dtype=pd)  # fmt: skip
        self.final_linear = _dense(c.patch_size**2 * c.out_ch, ("embed", "patch"), use_bias=True, dtype=dt,
                                   init=nn.initializers.zeros, param_dtype=pd)  # fmt: skip
        # Present in original checkpoints but unused in the forward (spec §2.10); kept so that
        # original -> JAX -> original is lossless.
        self.norm_final = self.param("norm_final", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                                     (c.dim,), pd)  # fmt: skip

    def __call__(self, x: jax.Array, t: jax.Array, cap_feats: jax.Array, cap_mask: jax.Array) -> jax.Array:
        """Velocity for a uniform batch.

        Args:
          x: latents ``(B, H, W, C)``, H and W divisible by the patch size.
          t: ``(B,)`` flow time in [0, 1], 0 = noise.
          cap_feats: ``(B, Lc, cap_feat_dim)`` text features (right padded).
          cap_mask: ``(B, Lc)`` bool/int, valid caption tokens first (right padding).
        Returns:
          ``(B, H, W, out_channels)`` velocity ``data - noise``.
        """
        c = self.config
        if x.ndim != 4 or 0 in x.shape:
            raise ValueError(f"latents have shape {tuple(x.shape)}; the model expects a non-empty (B, H, W, "
                             f"{c.in_channels}) batch (channels last)")  # fmt: skip
        b, h, w, ch = x.shape
        p = c.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")
        if ch != c.in_channels:
            raise ValueError(f"latents have {ch} channels, the model expects {c.in_channels}")
        gh, gw = h // p, w // p
        if gh > c.axes_lens[1] or gw > c.axes_lens[2]:
            raise ValueError(f"latent grid {gh}x{gw} patches exceeds the RoPE table ({c.axes_lens[1]}x{c.axes_lens[2]} "
                             f"positions, i.e. {c.axes_lens[1] * p}x{c.axes_lens[2] * p} latent pixels)")
        grid = jnp.broadcast_to(jnp.asarray([gh, gw], jnp.int32), (b, 2))
        out = self._forward(patchify(x, p), grid, t, cap_feats, cap_mask, uniform=True)
        return unpatchify(out, gh, gw, p, c.out_ch)

    def forward_tokens(self, img_tokens, grid_sizes, t, cap_feats, cap_mask) -> jax.Array:
        """Mixed-size batch: patch tokens ``(B, N, p*p*C)`` padded to a budget, grid sizes ``(B, 2)``.

        Sample ``i`` uses its first ``grid_sizes[i,0] * grid_sizes[i,1]`` tokens (row-major grid). Returns
        output tokens ``(B, N, p*p*out_channels)``; padded token rows are zeros. See :func:`pack_latents`.
        Shapes are checked; grid values only when they are concrete (not traced under ``jit``): a grid over
        the token budget or past the RoPE table (``axes_lens[1:]``) would give garbage or share the last
        positions; :func:`pack_latents` and the data pipeline's crop sizes keep within both.
        """
        c = self.config
        concrete = not isinstance(grid_sizes, jax.core.Tracer)  # before asarray: under jit it makes a tracer
        g = np.asarray(grid_sizes) if concrete else None
        grid_sizes = jnp.asarray(grid_sizes)
        if img_tokens.ndim != 3 or img_tokens.shape[-1] != c.patch_features:
            raise ValueError(f"image tokens have shape {img_tokens.shape}; the model expects (B, N, {c.patch_features})"
                             f" (patch {c.patch_size} x {c.patch_size} x {c.in_channels} channels: pack_latents)")
        if grid_sizes.shape != (img_tokens.shape[0], 2):
            raise ValueError(f"grid_sizes has shape {grid_sizes.shape}; want ({img_tokens.shape[0]}, 2): (rows, "
                             f"columns) of patches per sample")  # fmt: skip
        if g is not None:
            if np.any(g[:, 0] * g[:, 1] > img_tokens.shape[1]) or np.any(g < 0):
                raise ValueError(f"grid sizes {g.tolist()} do not fit the {img_tokens.shape[1]}-token budget")
            if np.any(g[:, 0] > c.axes_lens[1]) or np.any(g[:, 1] > c.axes_lens[2]):
                raise ValueError(f"grid sizes {g.tolist()} exceed the RoPE table ({c.axes_lens[1]}x{c.axes_lens[2]})")
        out = self._forward(img_tokens, grid_sizes.astype(jnp.int32), t, cap_feats, cap_mask, uniform=False)
        n_i = grid_sizes[:, 0] * grid_sizes[:, 1]
        valid = jnp.arange(img_tokens.shape[1])[None, :] < n_i[:, None]
        return jnp.where(valid[..., None], out, 0)

    def _forward(self, img_tokens, grid, t, cap_feats, cap_mask, *, uniform: bool):
        c = self.config
        b, n_max, _ = img_tokens.shape
        lc = cap_feats.shape[1]
        if cap_feats.ndim != 3 or cap_feats.shape[-1] != c.cap_feat_dim:
            raise ValueError(f"caption features have shape {tuple(cap_feats.shape)}, the model expects (B, L, "
                             f"{c.cap_feat_dim})")  # fmt: skip
        if cap_mask.shape != cap_feats.shape[:2] or cap_feats.shape[0] != b or jnp.shape(t) != (b,):
            raise ValueError(f"inputs disagree: {b} images, t {jnp.shape(t)}, caption features "
                             f"{cap_feats.shape[:2]} and caption mask {cap_mask.shape} (want (B,), (B, L), (B, L))")
        if lc == 0:
            raise ValueError("caption features have length 0: every caption needs at least one token (BOS)")
        concrete = not isinstance(cap_mask, jax.core.Tracer)
        # only the valid tokens need RoPE rows (padding is masked; the image tokens sit at position L_i), as in
        # diffusers and the original; under jit the lengths are unknown, so the padded length must fit
        longest = int(np.asarray(cap_mask).astype(bool).sum(1).max()) if concrete else lc
        if longest > c.axes_lens[0] - 1:
            what = "the longest caption has" if concrete else "captions are padded to"
            raise ValueError(f"{what} {longest} tokens, over the model's limit of {c.axes_lens[0] - 1} tokens "
                             f"(RoPE table of {c.axes_lens[0]} positions, one of them the image tokens' caption "
                             f"position); cut (or, under jit, pad) captions to at most {c.axes_lens[0] - 1}")
        if concrete:  # not under jit: a left-padded mask is an error
            m = np.asarray(cap_mask).astype(bool)
            prefix = np.arange(lc)[None, :] < m.sum(1, keepdims=True)
            if np.any(m != prefix):
                rows = np.flatnonzero(np.any(m != prefix, axis=1)).tolist()
                raise ValueError(f"caption mask rows {rows[:8]} are not right-padded: the model takes each caption's "
                                 f"valid tokens to come first (a tokenizer padding on the left, as transformers' "
                                 f"Gemma tokenizer does by default, needs padding_side='right')")  # fmt: skip
        cap_len = jnp.sum(cap_mask.astype(bool).astype(jnp.int32), axis=1)  # (B,) L_i: any nonzero is valid
        n_img = grid[:, 0] * grid[:, 1]  # (B,) N_i

        temb = self.t_embedder(t)
        cap = self.cap_linear(self.cap_norm(cap_feats.astype(self.dtype)))
        img = self.x_embedder(img_tokens.astype(self.dtype))

        # positions: caption j -> (j,0,0); image (r,c) -> (L_i, r, c)
        j = jnp.arange(lc, dtype=jnp.int32)
        cap_pos = jnp.stack([jnp.broadcast_to(j, (b, lc)), jnp.zeros((b, lc), jnp.int32),
                             jnp.zeros((b, lc), jnp.int32)], -1)  # fmt: skip
        nidx = jnp.arange(n_max, dtype=jnp.int32)[None, :]
        gw = jnp.maximum(grid[:, 1:2], 1)
        img_pos = jnp.stack([jnp.broadcast_to(cap_len[:, None], (b, n_max)), nidx // gw, nidx % gw], -1)
        rope = lambda pos: rope_cos_sin(pos, c.axes_dims, c.axes_lens, c.rope_theta, c.rope_angles)  # noqa: E731
        cap_cos, cap_sin = rope(cap_pos)
        img_cos, img_sin = rope(img_pos)

        cap = self.context_refiner(cap, None, cap_cos, cap_sin, cap_len)
        img = self.noise_refiner(img, temb, img_cos, img_sin, None if uniform else n_img)

        # pack [cap[:L_i] | img[:N_i] | pad] per sample with one gather over concat(cap, img)
        total = lc + n_max
        pidx = jnp.arange(total, dtype=jnp.int32)[None, :]
        is_cap = pidx < cap_len[:, None]
        src = jnp.where(is_cap, pidx, lc + jnp.clip(pidx - cap_len[:, None], 0, n_max - 1))
        joint = jnp.take_along_axis(jnp.concatenate([cap, img], 1), src[..., None], axis=1)
        joint_cos = jnp.take_along_axis(jnp.concatenate([cap_cos, img_cos], 1), src[..., None], axis=1)
        joint_sin = jnp.take_along_axis(jnp.concatenate([cap_sin, img_sin], 1), src[..., None], axis=1)
        seq_len = cap_len + n_img

        x = self.layers(joint, temb, joint_cos, joint_sin, seq_len)

        # final layer on the image slice only (token-wise, so slicing first is exact and cheaper)
        img_out = jnp.take_along_axis(x, jnp.clip(cap_len[:, None] + nidx, 0, total - 1)[..., None], axis=1)
        scale = self.final_adaLN(nn.silu(temb.astype(self.dtype))).astype(jnp.float32)
        y = layer_norm_no_affine(img_out, 1e-6) * (1.0 + scale[:, None, :])
        out = self.final_linear(y.astype(self.dtype)).astype(jnp.float32)
        if c.prediction == "data":  # out is x^: velocity = (x^ - x_t) / (1 - t), the gap clipped
            gap = jnp.maximum(1.0 - t.astype(jnp.float32), c.data_min_gap)[:, None, None]
            out = (out - img_tokens.astype(jnp.float32)) / gap
        return out


def init_params(config: NextDiTConfig, rng: jax.Array | int = 0, *, cap_len: int = 8, latent_hw=(8, 8),
                dtype: Any = jnp.float32) -> dict:  # fmt: skip
    """Random params for ``config``: the model's own initialisers (adaLN and final layer zero), created in
    ``dtype`` (fp32 default; any other dtype gives the fp32 values rounded)."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    model = NextDiT(config, param_dtype=dtype)
    x = jnp.zeros((1, *latent_hw, config.in_channels))
    cap = jnp.zeros((1, cap_len, config.cap_feat_dim))
    variables = jax.jit(model.init)(rng, x, jnp.zeros((1,)), cap, jnp.ones((1, cap_len), bool))
    return nn.meta.unbox(variables["params"])


def abstract_params(config: NextDiTConfig) -> Any:
    """Shapes/dtypes (and logical partitioning metadata) of the params, without allocating them."""
    model = NextDiT(config)
    x = jnp.zeros((1, 2 * config.patch_size, 2 * config.patch_size, config.in_channels))
    cap = jnp.zeros((1, 4, config.cap_feat_dim))
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros((1,)), cap, jnp.ones((1, 4), bool))["params"]


_STACKS = ("context_refiner", "noise_refiner", "layers")


def unstack_layers(params: dict) -> dict:
    """Scanned params (``{stack}/blocks`` with a leading layer axis) -> ``{stack}/blocks_{i}`` for
    ``NextDiT(..., scan_layers=False)``."""
    out = dict(params)
    for s in _STACKS:
        blocks = params[s]["blocks"]
        n = jax.tree_util.tree_leaves(blocks)[0].shape[0]
        out[s] = {f"blocks_{i}": jax.tree_util.tree_map(lambda a, i=i: a[i], blocks) for i in range(n)}
    return out


def stack_layers(params: dict) -> dict:
    """Inverse of :func:`unstack_layers`."""
    out = dict(params)
    for s in _STACKS:
        n = len(params[s])
        out[s] = {"blocks": jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[params[s][f"blocks_{i}"] for i in range(n)])}
    return out


def cast_matmul_weights(params: dict, dtype: Any, names: tuple[str, ...] = ("kernel", "bias")) -> dict:
    """Cast the leaves the model casts to its compute dtype anyway -- dense kernels and biases, the
    attention's ``q``/``k``/``v`` matrices -- to ``dtype`` once, ahead of time; norm scales stay as they
    are (the model uses them in fp32). ``apply`` gives bit-identical outputs with the result, which takes
    half the memory in bf16 and spares every call (and every sampler step) the weight casts. ``names``:
    the leaf names cast (Gemma-2: ``("kernel", "embedding")``, its table being cast after the lookup).
    NumPy leaves stay NumPy (cast on the host, before they are placed)."""

    def cast(path, leaf):
        name = getattr(path[-1], "key", None)
        parent = getattr(path[-2], "key", None) if len(path) > 1 else None
        if name in names or (parent == "attention" and name in ("q", "k", "v")):
            return leaf.astype(dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(cast, params)
