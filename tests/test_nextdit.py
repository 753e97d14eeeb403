"""Next-DiT forward parity with diffusers' Lumina2Transformer2DModel, batching semantics, configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_l2
from nextdit_helpers import TINY_CONFIGS, diffusers_forward, inputs, make_diffusers_model

from lumina_jax.convert.nextdit import diffusers_rules, jax_shapes, torch_to_jax
from lumina_jax.convert.common import to_numpy, unflatten
from lumina_jax.models.nextdit import (
    NextDiT,
    NextDiTConfig,
    flops_forward,
    init_params,
    pack_latents,
    param_count,
    unpack_tokens,
)


def _from_diffusers(model):
    config = NextDiTConfig.from_diffusers_config(dict(model.config))
    sd = {k: to_numpy(v) for k, v in model.state_dict().items()}
    params = unflatten(torch_to_jax(sd.__getitem__, diffusers_rules(config), jax_shapes(config)))
    return config, params


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def ref(request):
    model = make_diffusers_model(request.param, seed=len(request.param))
    config, params = _from_diffusers(model)
    return model, config, params


@pytest.fixture(scope="module")
def ref_gqa3():
    model = make_diffusers_model("gqa3", seed=4)
    config, params = _from_diffusers(model)
    return model, config, params


def _apply(config, params, x, t, cap, mask, **kw):
    fn = jax.jit(lambda p, *a: NextDiT(config, **kw).apply({"params": p}, *a))
    return np.asarray(fn(params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(cap), jnp.asarray(mask)))


# batch 3, non-square latents, padded captions of different lengths per sample
CASES = [dict(batch=3, h=8, w=12, cap_lens=[5, 9, 2], cap_pad=10), dict(batch=2, h=10, w=6, cap_lens=[7, 7], cap_pad=7)]


@pytest.mark.parametrize("case", CASES, ids=["ragged", "uniform"])
def test_parity_fp32(ref, case):
    model, config, params = ref
    x, t, cap, mask = inputs(config, **case)
    err = rel_l2(_apply(config, params, x, t, cap, mask), diffusers_forward(model, x, t, cap, mask))
    assert err <= 1e-5, err


def test_parity_bf16(ref):
    model, config, params = ref
    x, t, cap, mask = inputs(config, **CASES[0])
    err = rel_l2(_apply(config, params, x, t, cap, mask, dtype=jnp.bfloat16), diffusers_forward(model, x, t, cap, mask))
    assert err <= 2e-2, err


def test_the_original_q_k_norm_eps_against_diffusers_with_its_eps_patched():
    """Default ``qk_norm_eps`` 1e-6 (the original's fallback RMSNorm) against diffusers with its q/k RMSNorm
    eps set to 1e-6. The q/k projections are scaled down (mean square ~1e-4) so that the eps shows: the
    matching eps is at fp32 noise, 1e-5 (diffusers' own) is far off."""
    import torch

    model = make_diffusers_model("gqa3", seed=7)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith((".to_q", ".to_k")):
                module.weight.mul_(0.01)
            if name.endswith((".norm_q", ".norm_k")):
                module.eps = 1e-6
    config, params = _from_diffusers(model)
    x, t, cap, mask = inputs(config, **CASES[0])
    want = diffusers_forward(model, x, t, cap, mask)
    errs = {eps: rel_l2(_apply(config.replace(qk_norm_eps=eps, rope_angles="float64"), params, x, t, cap, mask), want)
            for eps in (1e-6, 1e-5)}  # fmt: skip
    assert errs[1e-6] <= 1e-5 and errs[1e-5] > 30 * errs[1e-6], errs
    assert NextDiTConfig().qk_norm_eps == 1e-6
    # the RoPE angle precision reaches the model (the tables themselves: test_qk_norm_rope.py)
    outs = [_apply(config.replace(qk_norm_eps=1e-6, rope_angles=a), params, x, t, cap, mask) for a in ("float32", "float64")]
    assert 0 < np.abs(outs[0] - outs[1]).max() < 1e-4


def test_batch_equals_single_samples(ref_gqa3):
    """Different caption lengths (and padding amounts) in one batch: each sample gets its solo output."""
    _, config, params = ref_gqa3
    x, t, cap, mask = inputs(config, batch=3, h=8, w=8, cap_lens=[3, 10, 6], cap_pad=12)
    full = _apply(config, params, x, t, cap, mask)
    for i in range(3):
        n = int(mask[i].sum())
        solo = _apply(config, params, x[i : i + 1], t[i : i + 1], cap[i : i + 1, :n], mask[i : i + 1, :n])
        assert rel_l2(full[i : i + 1], solo) <= 1e-5


def test_mixed_size_batch_equals_per_sample(ref_gqa3):
    """Latents of different sizes padded to one token budget give the per-sample outputs."""
    _, config, params = ref_gqa3
    rng = np.random.default_rng(1)
    sizes = [(8, 8), (4, 12), (6, 2)]
    lats = [rng.standard_normal((h, w, config.in_channels)).astype(np.float32) for h, w in sizes]
    t = rng.uniform(0, 1, 3).astype(np.float32)
    _, _, cap, mask = inputs(config, batch=3, h=2, w=2, cap_lens=[4, 8, 6], cap_pad=8)
    tokens, grids = pack_latents(lats, config.patch_size, token_budget=20)
    fwd = jax.jit(lambda p, *a: NextDiT(config).apply({"params": p}, *a, method=NextDiT.forward_tokens))
    out = fwd(params, tokens, grids, jnp.asarray(t), jnp.asarray(cap), jnp.asarray(mask))
    assert out.shape == (3, 20, config.patch_size**2 * config.out_ch)
    outs = unpack_tokens(out, grids, config.patch_size, config.out_ch)
    for i, z in enumerate(lats):
        solo = _apply(config, params, z[None], t[i : i + 1], cap[i : i + 1], mask[i : i + 1])[0]
        assert outs[i].shape == z.shape[:2] + (config.out_ch,)
        assert rel_l2(outs[i], solo) <= 1e-5
    n_valid = np.asarray(grids).prod(1)
    assert np.all(np.asarray(out)[0, n_valid[0] :] == 0)  # padding rows are zeroed
    # shapes, and concrete grid values (outside jit), are checked: garbage or deep JAX errors otherwise
    eager = lambda toks, g: NextDiT(config).apply({"params": params}, toks, g, jnp.asarray(t), jnp.asarray(cap),  # noqa: E731
                                                  jnp.asarray(mask), method=NextDiT.forward_tokens)  # fmt: skip
    with pytest.raises(ValueError, match=r"do not fit the 20-token budget"):
        eager(tokens, np.array([[8, 8], [2, 2], [1, 1]]))
    with pytest.raises(ValueError, match=r"do not fit the 20-token budget"):  # a NumPy constant under jit too
        jax.jit(lambda toks: eager(toks, np.array([[8, 8], [2, 2], [1, 1]])))(tokens)
    with pytest.raises(ValueError, match=r"grid_sizes has shape \(3,\); want \(3, 2\)"):
        eager(tokens, grids[:, 0])
    with pytest.raises(ValueError, match=rf"image tokens have shape .*the model expects \(B, N, {config.patch_features}\)"):
        eager(tokens[..., :8], grids)
    with pytest.raises(ValueError, match="exceed the RoPE table"):
        eager(jnp.zeros((3, 2 * config.axes_lens[2] + 2, config.patch_features)), [[1, config.axes_lens[2] + 1]] * 3)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "low_precision"])
def test_remat_policies_same_values_and_grads(remat):
    """Remat wraps the scanned block stacks; values and gradients must not change."""
    from lumina_jax.models.nextdit import BlockStack

    config = NextDiTConfig.from_yaml("nextdit_tiny")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, config.dim)), jnp.float32)
    temb = jnp.asarray(rng.standard_normal((2, config.t_dim)), jnp.float32)
    cos, sin = (jnp.asarray(rng.uniform(-1, 1, (2, 6, config.head_dim // 2)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([6, 4])

    def make(policy):
        return BlockStack(config, 2, modulation=True, dtype=jnp.float32, backend="xla", remat=policy)

    params = make("none").init(jax.random.PRNGKey(0), x, temb, cos, sin, lengths)
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)

    def loss(p, x, policy):
        return jnp.mean(make(policy).apply(p, x, temb, cos, sin, lengths) ** 2)

    l0, g0 = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, "none"), argnums=(0, 1)))(params, x)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, remat), argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def _block_inputs(config, n_tok):
    """Random ``(x, temb, cos, sin, lengths)`` for a BlockStack over 2 samples of ``n_tok`` tokens (one
    with 10 padded keys)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, n_tok, config.dim)), jnp.float32)
    temb = jnp.asarray(rng.standard_normal((2, config.t_dim)), jnp.float32)
    cos, sin = (jnp.asarray(rng.uniform(-1, 1, (2, n_tok, config.head_dim // 2)), jnp.float32) for _ in range(2))
    return x, temb, cos, sin, jnp.asarray([n_tok, n_tok - 10])


def test_remat_policies_save_what_they_say(capsys):
    """Token-sized residuals the scanned blocks keep for the backward (fp32 compute): ``full`` only each block's input,
    ``dots_no_batch`` fewer than ``dots`` (no batched attention dots), ``dots`` fewer than ``none``."""
    from jax.ad_checkpoint import print_saved_residuals

    from lumina_jax.models.nextdit import BlockStack

    config = NextDiTConfig.from_yaml("nextdit_tiny")
    n_tok = 40
    x, temb, cos, sin, lengths = _block_inputs(config, n_tok)

    def make(policy):
        return BlockStack(config, 2, modulation=True, dtype=jnp.float32, backend="xla", remat=policy)

    params = make("none").init(jax.random.PRNGKey(0), x, temb, cos, sin, lengths)

    def token_residuals(policy):
        capsys.readouterr()
        print_saved_residuals(lambda p, x: jnp.mean(make(policy).apply(p, x, temb, cos, sin, lengths) ** 2), params, x)
        # per-layer residuals leave the scan stacked: (layers, batch, tokens, ...)
        return sum("output of scan" in line and f",{n_tok}" in line for line in capsys.readouterr().out.splitlines())

    n = {policy: token_residuals(policy) for policy in ("none", "full", "dots", "dots_no_batch")}
    assert n["full"] < n["dots_no_batch"] < n["dots"] < n["none"], n


def test_low_precision_remat_saves_no_fp32_activations(capsys):
    """bf16 compute: ``none`` keeps fp32 token-sized residuals (norm statistics inputs, modulation,
    SwiGLU); ``low_precision`` keeps only 16-bit token-sized values (fp32 only for the attention
    logsumexp rows), and its gradients are as close to an fp32 run's as those of ``none`` (the two bf16
    programs round at different places, so they differ from each other by ~1e-2 on small leaves)."""
    from jax.ad_checkpoint import print_saved_residuals

    from lumina_jax.models.nextdit import BlockStack

    config = NextDiTConfig.from_yaml("nextdit_tiny")
    n_tok = 40
    x32, temb, cos, sin, lengths = _block_inputs(config, n_tok)

    def make(policy, dt):
        return BlockStack(config, 2, modulation=True, dtype=dt, backend="pallas", remat=policy)

    params = make("none", jnp.float32).init(jax.random.PRNGKey(0), x32, temb, cos, sin, lengths)
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)

    def loss(p, x, policy, dt=jnp.bfloat16):
        return jnp.mean(make(policy, dt).apply(p, x.astype(dt), temb, cos, sin, lengths).astype(jnp.float32) ** 2)

    def fp32_token_residuals(policy):
        capsys.readouterr()
        print_saved_residuals(lambda p, x: loss(p, x, policy), params, x32)
        lines = capsys.readouterr().out.splitlines()
        # residuals of the scanned blocks (not the loss's own square, not the cos/sin inputs)
        big = [ln for ln in lines if ln.startswith("f32[") and f",{n_tok}," in ln.split(" ")[0] + ","
               and "output of scan" in ln]
        return [ln for ln in big if not ln.startswith(f"f32[2,2,{config.n_heads},{n_tok}]")]  # lse rows

    assert len(fp32_token_residuals("none")) >= 10
    assert fp32_token_residuals("low_precision") == []

    def grads(policy, dt=jnp.bfloat16):
        g = jax.jit(jax.grad(lambda p, x: loss(p, x, policy, dt), argnums=(0, 1)))(params, x32)
        return [np.asarray(a, np.float32) for a in jax.tree_util.tree_leaves(g)]

    ref = grads("none", jnp.float32)
    err_none = [rel_l2(a, r) for a, r in zip(grads("none"), ref)]
    err_low = [rel_l2(a, r) for a, r in zip(grads("low_precision"), ref)]
    assert max(err_none) < 0.05  # bf16 vs fp32 (measured 0.018)
    assert max(err_low) <= 1.25 * max(err_none) and np.median(err_low) <= 1.25 * np.median(err_none)


def test_unrolled_matches_scanned():
    config = NextDiTConfig.from_yaml("nextdit_tiny")
    params = init_params(config, 0)
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    from lumina_jax.models.nextdit import unstack_layers

    x, t, cap, mask = inputs(config, batch=2, h=8, w=8, cap_lens=[3, 6], cap_pad=6)
    a = _apply(config, params, x, t, cap, mask)
    b = _apply(config, unstack_layers(params), x, t, cap, mask, scan_layers=False)
    assert rel_l2(b, a) <= 1e-6


def test_bad_inputs_have_clear_errors():
    config = NextDiTConfig.from_yaml("nextdit_tiny")
    params = init_params(config, 0)
    model = NextDiT(config)
    cap, mask = jnp.zeros((1, 4, config.cap_feat_dim)), jnp.ones((1, 4), bool)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model.apply({"params": params}, jnp.zeros((1, 7, 8, 16)), jnp.zeros(1), cap, mask)
    with pytest.raises(ValueError, match="channels"):
        model.apply({"params": params}, jnp.zeros((1, 8, 8, 4)), jnp.zeros(1), cap, mask)
    with pytest.raises(ValueError, match=r"caption features have shape \(1, 4, 7\), the model expects \(B, L, 32\)"):
        model.apply({"params": params}, jnp.zeros((1, 8, 8, 16)), jnp.zeros(1), jnp.zeros((1, 4, 7)), mask)
    for bad in (jnp.zeros((8, 8, 16)), jnp.zeros((1, 0, 8, 16))):  # no batch axis; an empty image
        with pytest.raises(ValueError, match=r"the model expects a non-empty \(B, H, W, 16\) batch"):
            model.apply({"params": params}, bad, jnp.zeros(1), cap, mask)
    x = jnp.zeros((1, 8, 8, 16))
    for bad_mask in (jnp.ones((1, 5), bool), jnp.ones((1, 3), bool)):  # the original fails on these too
        with pytest.raises(ValueError, match=r"caption features \(1, 4\) and caption mask"):
            model.apply({"params": params}, x, jnp.zeros(1), cap, bad_mask)
    with pytest.raises(ValueError, match=r"inputs disagree: 1 images, t \(2,\)"):
        model.apply({"params": params}, x, jnp.zeros(2), cap, mask)
    small = config.replace(axes_lens=(32, 3, 8))  # 8x8 latents = 4x4 patches: rows beyond the table
    with pytest.raises(ValueError, match=r"latent grid 4x4 patches exceeds the RoPE table \(3x8"):
        NextDiT(small).apply({"params": params}, x, jnp.zeros(1), cap, mask)
    short_table = NextDiT(config.replace(axes_lens=(4, 8, 8)))
    with pytest.raises(ValueError, match=r"the longest caption has 4 tokens, over the model's limit of 3 tokens"):
        short_table.apply({"params": params}, x, jnp.zeros(1), cap, mask)
    # only valid tokens need RoPE rows (as diffusers): padding past the table is fine when the mask is known ...
    capr = jax.random.normal(jax.random.PRNGKey(3), cap.shape)
    three = jnp.asarray([[1, 1, 1, 0]], bool)
    np.testing.assert_allclose(short_table.apply({"params": params}, x, jnp.zeros(1), capr, three),
                               short_table.apply({"params": params}, x, jnp.zeros(1), capr[:, :3], three[:, :3]),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match=r"captions are padded to 4 tokens, over the model's limit of 3"):
        jax.jit(lambda m: short_table.apply({"params": params}, x, jnp.zeros(1), capr, m))(three)  # ... not under jit
    with pytest.raises(ValueError, match="caption features have length 0"):
        model.apply({"params": params}, x, jnp.zeros(1), cap[:, :0], mask[:, :0])
    # left padding (transformers' Gemma tokenizer default) or a hole: the model would attend the pad rows
    x2, cap2 = jnp.zeros((3, 8, 8, 16)), jnp.zeros((3, 4, config.cap_feat_dim))
    for bad in ([[0, 0, 1, 1]], [[1, 0, 1, 0]]):
        m = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1]] + bad, bool)
        with pytest.raises(ValueError, match=r"caption mask rows \[2\] are not right-padded.*padding_side='right'"):
            model.apply({"params": params}, x2, jnp.zeros(3), cap2, m)
    # a 0/1 mask given as other nonzero values (weights, 2s) counts its valid tokens, not their sum
    capr3 = jax.random.normal(jax.random.PRNGKey(4), cap2.shape)
    ones = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], jnp.int32)
    np.testing.assert_array_equal(model.apply({"params": params}, x2, jnp.zeros(3), capr3, ones * 2),
                                  model.apply({"params": params}, x2, jnp.zeros(3), capr3, ones))  # fmt: skip
    ok = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)  # right padding, an empty row: fine
    assert model.apply({"params": params}, x2, jnp.zeros(3), cap2, ok).shape == x2.shape
    jax.jit(lambda m: model.apply({"params": params}, x2, jnp.zeros(3), cap2, m))(ok)  # traced: not checked
    with pytest.raises(ValueError, match="unknown NextDiT config keys"):
        NextDiTConfig.from_dict({"dim": 64, "n_layer": 3})
    with pytest.raises(ValueError, match="head_dim"):
        NextDiTConfig(dim=64, n_heads=4, n_kv_heads=4, axes_dims=(4, 4, 4))
    with pytest.raises(FileNotFoundError, match="bundled configs"):
        NextDiTConfig.from_yaml("nextdit_unknown")


# spec §1.1/§1.2: parameter counts of the released and the other original configs (cap_feat_dim 2304)
SPEC_COUNTS = {"nextdit_2b": 2_609_771_456, "nextdit_3b": 3.735e9, "nextdit_4b": 4.793e9, "nextdit_7b": 8.248e9}


@pytest.mark.parametrize("name", sorted(SPEC_COUNTS))
def test_config_param_counts_match_spec(name):
    config = NextDiTConfig.from_yaml(name)
    n = param_count(config)
    expected = SPEC_COUNTS[name]
    assert (n == expected) if isinstance(expected, int) else abs(n - expected) / expected < 1e-3
    if name == "nextdit_2b":
        assert config.ffn_hidden == 9216 and config.head_dim == 96
        shapes = jax_shapes(config)  # abstract init: nothing is allocated
        assert sum(int(np.prod(s)) for s in shapes.values()) == n


def test_tiny_param_count_matches_tree():
    config = NextDiTConfig.from_yaml("nextdit_tiny")
    params = init_params(config)
    assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == param_count(config)


def test_flops_match_reference_formula():
    # shared/bench/diffusers_anchor.py: one 2B forward at 1024 px with 96 caption tokens is 22.8 TFLOP
    assert round(flops_forward(NextDiTConfig(), 96, 4096) / 1e12, 1) == 22.8


def test_data_prediction_head_returns_velocity(ref_gqa3):
    """``prediction: data``: the same params' raw head output is x^, the module returns (x^ - x_t) / gap.

    The raw output is the diffusers reference's (velocity head) output, so this also pins the raw head."""
    import dataclasses

    model, config, params = ref_gqa3
    data_cfg = dataclasses.replace(config, prediction="data", data_min_gap=0.1)
    x, t, cap, mask = inputs(config, batch=3, h=8, w=8, cap_lens=[3, 6, 1], cap_pad=6)
    t = np.asarray([0.0, 0.5, 0.97], np.float32)  # the last one hits the clipped gap
    raw = _apply(config, params, x, t, cap, mask)
    got = _apply(data_cfg, params, x, t, cap, mask)
    gap = np.maximum(1.0 - t, 0.1)[:, None, None, None]
    np.testing.assert_allclose(got, (raw - x) / gap, rtol=1e-5, atol=1e-5)
    assert rel_l2(raw, diffusers_forward(model, x, t, cap, mask)) <= 1e-5

    # mixed-size token path: the same reparameterisation per valid token, zeros elsewhere
    lat = [np.asarray(x[0]), np.asarray(x[1, :4, :6])]
    tokens, grids = pack_latents(lat, config.patch_size, token_budget=16)
    fwd = jax.jit(lambda p, *a: NextDiT(data_cfg).apply({"params": p}, *a, method=NextDiT.forward_tokens))
    out = unpack_tokens(fwd(params, tokens, grids, jnp.asarray(t[:2]), jnp.asarray(cap[:2]), jnp.asarray(mask[:2])),
                        grids, config.patch_size, config.out_ch)  # fmt: skip
    for i in range(2):
        alone = _apply(data_cfg, params, lat[i][None], t[i : i + 1], cap[i : i + 1], mask[i : i + 1])[0]
        assert rel_l2(np.asarray(out[i]), alone) <= 1e-5


def test_data_prediction_config_and_export_errors(tmp_path):
    from lumina_jax.convert.nextdit import save_transformer

    with pytest.raises(ValueError, match="prediction must be"):
        NextDiTConfig.from_dict({**NextDiTConfig.from_yaml("nextdit_tiny").to_dict(), "prediction": "eps"})
    with pytest.raises(ValueError, match="out_channels == in_channels"):
        NextDiTConfig.from_dict({**NextDiTConfig.from_yaml("nextdit_tiny").to_dict(), "prediction": "data",
                                 "out_channels": 32})  # fmt: skip
    config = NextDiTConfig.from_dict({**NextDiTConfig.from_yaml("nextdit_tiny").to_dict(), "prediction": "data"})
    params = init_params(config, 0)
    for fmt, name in (("diffusers", "d"), ("original", "o.safetensors")):
        with pytest.raises(ValueError, match="x-prediction head"):
            save_transformer(tmp_path / name, config, params, format=fmt)
        assert not (tmp_path / name).exists()
    save_transformer(tmp_path / "j", config, params, format="jax")  # our own format keeps the option
    from lumina_jax.convert.nextdit import load_transformer

    assert load_transformer(tmp_path / "j")[0].prediction == "data"


def test_cast_matmul_weights_is_exact_in_bf16():
    """Pre-casting the matmul weights to bf16 gives the bf16 model's outputs bit for bit; norms stay fp32."""
    from lumina_jax.convert.common import flatten
    from lumina_jax.models.nextdit import cast_matmul_weights

    from nextdit_helpers import perturbed_tiny_case

    config, params, x, t, cap, mask = perturbed_tiny_case(jnp.bfloat16)
    model = NextDiT(config, dtype=jnp.bfloat16)
    cast = cast_matmul_weights(params, jnp.bfloat16)
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply({"params": cast}, x, t, cap, mask), apply({"params": params}, x, t, cap, mask))
    flat = flatten(cast)
    assert {str(v.dtype) for k, v in flat.items() if k.endswith(("kernel", "bias", "attention/q"))} == {"bfloat16"}
    assert {str(v.dtype) for k, v in flat.items() if k.endswith("scale")} == {"float32"}


def test_qkv_init_is_xavier_of_the_fused_weight():
    """The original applies xavier_uniform to the fused qkv weight (dim x (Hq + 2 Hkv) hd); the split
    q/k/v params share that bound (separate xavier draws would be 1.15-1.41x wider for the 2B)."""
    config = NextDiTConfig.from_yaml("nextdit_small")
    attn = init_params(config, 0)["layers"]["blocks"]["attention"]
    c = config
    bound = (6.0 / (c.dim + (c.n_heads + 2 * c.n_kv_heads) * c.head_dim)) ** 0.5
    for name in ("q", "k", "v"):
        w = np.asarray(attn[name])
        assert 0.97 * bound < np.abs(w).max() <= bound, name
        np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.02)


def test_qkv_matmuls_are_separate_when_tensor_splits_the_heads():
    """Under a mesh with tensor > 1 the q/k/v weights are not concatenated (their tensor shards would not
    line up: XLA inserts collective-permutes); one fused matmul otherwise. (Numerics on a real tensor mesh:
    tests/test_parallel_meshes.py, fsdp x tensor.)"""
    from jax.sharding import AbstractMesh

    from lumina_jax.parallel.mesh import MESH_AXES

    c = NextDiTConfig.from_yaml("nextdit_tiny")
    params = jax.eval_shape(lambda: init_params(c, 0))
    x, t = jnp.zeros((1, 8, 8, c.in_channels)), jnp.zeros(1)
    cap, mask = jnp.zeros((1, 4, c.cap_feat_dim)), jnp.ones((1, 4), bool)
    qkv_width = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim

    def fused_qkv_weights(tensor):
        with jax.sharding.use_abstract_mesh(AbstractMesh((1, 1, 1, tensor), MESH_AXES)):
            jaxpr = str(jax.make_jaxpr(lambda p: NextDiT(c).apply({"params": p}, x, t, cap, mask))(params))
        return sum(f"[{c.dim},{qkv_width}]=concatenate" in line.replace(" ", "") for line in jaxpr.splitlines())

    assert fused_qkv_weights(1) == 3  # context refiner, noise refiner and joint stacks
    assert fused_qkv_weights(2) == 0
