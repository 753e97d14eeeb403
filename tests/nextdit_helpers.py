"""Builders shared by the Next-DiT tests: tiny diffusers references with random (non-trivial) weights."""

from __future__ import annotations

import numpy as np
import torch

from lumina_jax.models.nextdit import NextDiTConfig

# Tiny configs that sweep the architecture: GQA ratios, RoPE splits, FFN rounding, refiner depth.
TINY_CONFIGS = {
    "gqa2": dict(hidden_size=48, num_layers=2, num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2,
                 multiple_of=16, axes_dim_rope=(4, 4, 4), cap_feat_dim=24, in_channels=4),
    "gqa3": dict(hidden_size=72, num_layers=2, num_refiner_layers=2, num_attention_heads=6, num_kv_heads=2,
                 multiple_of=32, axes_dim_rope=(4, 4, 4), cap_feat_dim=40, in_channels=16),
    "mha": dict(hidden_size=24, num_layers=1, num_refiner_layers=1, num_attention_heads=3, num_kv_heads=3,
                multiple_of=2, ffn_dim_multiplier=1.5, axes_dim_rope=(4, 2, 2), cap_feat_dim=32, in_channels=4),
}  # fmt: skip


def make_diffusers_model(name: str, seed: int = 0):
    """A diffusers ``Lumina2Transformer2DModel`` with every weight random (adaLN, norms and final layer too)."""
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    model = Lumina2Transformer2DModel(sample_size=16, patch_size=2, axes_lens=(64, 64, 64), **TINY_CONFIGS[name])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1 and "norm" in n:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.0 / np.sqrt(max(p.shape[-1], 1))))
    return model.eval()


def diffusers_forward(model, x_nhwc: np.ndarray, t: np.ndarray, cap: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Run the reference on channels-last numpy inputs, return channels-last numpy output."""
    with torch.no_grad():
        out = model(
            torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))),
            torch.from_numpy(t),
            torch.from_numpy(cap),
            torch.from_numpy(mask),
            return_dict=False,
        )[0]
    return out.numpy().transpose(0, 2, 3, 1)


def inputs(config: NextDiTConfig, batch: int, h: int, w: int, cap_lens, cap_pad: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, h, w, config.in_channels)).astype(np.float32)
    t = rng.uniform(0, 1, (batch,)).astype(np.float32)
    cap = rng.standard_normal((batch, cap_pad, config.cap_feat_dim)).astype(np.float32)
    mask = np.zeros((batch, cap_pad), bool)
    for i, n in enumerate(cap_lens):
        mask[i, :n] = True
    return x, t, cap, mask


def perturbed_tiny_case(cap_dtype=None):
    """``nextdit_tiny`` with every param nudged off its init (adaLN and final layer are zero-initialised)
    and a 2-sample batch whose second caption is padded: ``(config, params, x, t, cap, cap_mask)``."""
    import jax
    import jax.numpy as jnp

    from lumina_jax.models.nextdit import init_params

    config = NextDiTConfig.from_yaml("nextdit_tiny")
    params = init_params(config, 0)
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, config.in_channels)), jnp.float32)
    t = jnp.array([0.3, 0.7])
    cap = jnp.asarray(rng.standard_normal((2, 8, config.cap_feat_dim)), cap_dtype or jnp.float32)
    mask = jnp.ones((2, 8), bool).at[1, 5:].set(False)
    return config, params, x, t, cap, mask
