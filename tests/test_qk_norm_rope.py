"""The fused q/k RMSNorm + RoPE kernel: interpreter vs the XLA reference, gradients, Triton lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import export_for_cuda, rel_l2

from lumina_jax.ops.qk_norm_rope import norm_rope_reference, qk_norm_rope


def _inputs(seed, b, l, h, d, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, l, h, d)) * 3.0, dtype)
    w = jnp.asarray(1.0 + 0.3 * rng.standard_normal(d), jnp.float32)
    ang = rng.uniform(0, 6.3, (b, l, d // 2))
    return x, w, jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)


@pytest.mark.parametrize("d, l, block_l", [(96, 40, 16), (32, 33, 8)])  # 96 = 64 + 32 chunks; L padded
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference_and_gradients(d, l, block_l, dtype):
    """The kernel's output equals the XLA reference. Its backward is, by design, the reference's VJP
    recomputed in XLA (no Pallas backward), so the gradient check covers the custom_vjp wiring (residuals,
    length padding, dtype); that the reference is the model's unfused norm + RoPE, values and gradients,
    is checked in ``test_nextdit_with_the_fused_prologue``."""
    x, w, cos, sin = _inputs(0, 2, l, 3, d, dtype)
    out = qk_norm_rope(x, w, cos, sin, eps=1e-6, block_l=block_l)
    ref = norm_rope_reference(x, w, cos, sin, 1e-6)
    assert out.dtype == x.dtype and out.shape == x.shape
    tol = 1e-6 if dtype == jnp.float32 else 8e-3
    assert rel_l2(np.asarray(out, np.float32), np.asarray(ref, np.float32)) < tol

    ct = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), dtype)
    grads = jax.grad(lambda *a: jnp.sum(qk_norm_rope(*a, eps=1e-6, block_l=block_l).astype(jnp.float32) * ct),
                     argnums=(0, 1))(x, w, cos, sin)  # fmt: skip
    grads_ref = jax.grad(lambda *a: jnp.sum(norm_rope_reference(*a, 1e-6).astype(jnp.float32) * ct),
                         argnums=(0, 1))(x, w, cos, sin)  # fmt: skip
    for g, r in zip(grads, grads_ref):
        assert rel_l2(np.asarray(g, np.float32), np.asarray(r, np.float32)) < 1e-5


def test_head_range_reads_in_place():
    """``heads=(offset, count)`` of a fused qkv tensor = the kernel on that slice; gradients land in the slice."""
    x, w, cos, sin = _inputs(2, 2, 16, 7, 32, jnp.float32)
    out = qk_norm_rope(x, w, cos, sin, eps=1e-6, block_l=8, heads=(4, 2))
    ref = norm_rope_reference(x[:, :, 4:6], w, cos, sin, 1e-6)
    assert out.shape == (2, 16, 2, 32) and rel_l2(out, ref) < 1e-6
    g = jax.grad(lambda x: jnp.sum(qk_norm_rope(x, w, cos, sin, eps=1e-6, block_l=8, heads=(4, 2)) ** 2))(x)
    g_ref = jax.grad(lambda x: jnp.sum(norm_rope_reference(x[:, :, 4:6], w, cos, sin, 1e-6) ** 2))(x)
    assert rel_l2(g, g_ref) < 1e-6 and float(jnp.abs(g[:, :, :4]).max()) == 0.0
    with pytest.raises(ValueError, match="heads"):
        qk_norm_rope(x, w, cos, sin, eps=1e-6, heads=(6, 2))


def test_bad_shapes_are_named():
    x, w, cos, sin = _inputs(0, 1, 8, 2, 32, jnp.float32)
    with pytest.raises(ValueError, match="weight"):
        qk_norm_rope(x, w[:16], cos, sin, eps=1e-6)
    with pytest.raises(ValueError, match="power of two"):
        qk_norm_rope(x, w, cos, sin, eps=1e-6, block_l=12)


def test_lowers_to_triton_and_verifies(monkeypatch):
    """The kernel goes through Pallas -> Triton for CUDA on the CPU and passes the MLIR verifier."""
    pytest.importorskip("jax.experimental.pallas.triton")
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower = registration.lowering.lower_jaxpr_to_triton_module
    seen = []

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()
        seen.append(str(result.module.operation.attributes["sym_name"]))
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    spec = jax.ShapeDtypeStruct
    args = (spec((2, 4352, 40, 96), jnp.bfloat16), spec((96,), jnp.float32), spec((2, 4352, 48), jnp.float32),
            spec((2, 4352, 48), jnp.float32))  # the 2B's qkv: 24 q + 8 k + 8 v heads
    f = lambda x, w, c, s: qk_norm_rope(x, w, c, s, eps=1e-6, interpret=False, heads=(24, 8))  # noqa: E731
    exported = export_for_cuda(f, *args)
    assert "lumina_qk_norm_rope" in exported.mlir_module() and seen == ['"lumina_qk_norm_rope"']


def test_nextdit_with_the_fused_prologue():
    """``fuse_qk_norm_rope=True``: the same parameter tree, the same outputs and gradients (interpreter)."""
    from nextdit_helpers import perturbed_tiny_case

    from lumina_jax.models.nextdit import NextDiT

    config, params, x, t, cap, mask = perturbed_tiny_case()
    plain, fused = NextDiT(config), NextDiT(config, fuse_qk_norm_rope=True)
    shapes = lambda m: jax.tree_util.tree_map(  # noqa: E731
        lambda a: a.shape, jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x, t, cap, mask)))
    assert shapes(fused) == shapes(plain)

    def loss(model, p):
        return jnp.mean(model.apply({"params": p}, x, t, cap, mask) ** 2)

    out_p, out_f = (jax.jit(m.apply)({"params": params}, x, t, cap, mask) for m in (plain, fused))
    assert rel_l2(out_f, out_p) < 1e-5
    g_p, g_f = (jax.jit(jax.grad(lambda p, m=m: loss(m, p)))(params) for m in (plain, fused))
    for a, b in zip(jax.tree_util.tree_leaves(g_f), jax.tree_util.tree_leaves(g_p)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_tpu_uses_the_xla_reference(monkeypatch):
    """No Triton on a TPU: the default there is the XLA computation (no pallas_call in the program)."""
    x, w, cos, sin = _inputs(3, 1, 16, 4, 32, jnp.float32)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    jaxpr = str(jax.make_jaxpr(lambda x: qk_norm_rope(x, w, cos, sin, eps=1e-6, heads=(1, 2)))(x))
    assert "pallas_call" not in jaxpr
    out = qk_norm_rope(x, w, cos, sin, eps=1e-6, heads=(1, 2))
    assert rel_l2(out, norm_rope_reference(x[:, :, 1:3], w, cos, sin, 1e-6)) < 1e-7


def test_rope_angles_follow_the_original_by_default_and_diffusers_as_an_option():
    """ORIG's ``precompute_freqs_cis`` rounds the angles to float32 before ``torch.polar`` (complex64); diffusers
    keeps float64 (complex128). Both transcribed in torch here; each of our modes matches its own to an ulp,
    and the two modes differ (by ~1e-5 at position 511), so a mode that were ignored would fail."""
    torch = pytest.importorskip("torch")
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.ops.rope import rope_cos_sin

    dims, lens = (32, 32, 32), (300, 512, 512)
    n = np.arange(512)
    pos = np.stack([n % 300, n, n[::-1]], -1)[None].astype(np.int32)

    def torch_table(angles):
        parts = []
        for a, (d, e) in enumerate(zip(dims, lens)):
            freqs = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64)[: d // 2] / d))
            ang = torch.outer(torch.arange(e, dtype=torch.float64), freqs)
            if angles == "float32":
                ang = ang.float()
            parts.append(torch.polar(torch.ones_like(ang), ang)[torch.from_numpy(pos[0, :, a]).long()])
        cis = torch.cat(parts, -1)
        return cis.real.float().numpy(), cis.imag.float().numpy()

    ours = {}
    for angles in ("float32", "float64"):
        cos, sin = (np.asarray(x[0]) for x in rope_cos_sin(jnp.asarray(pos), dims, lens, angles=angles))
        want_cos, want_sin = torch_table(angles)
        assert np.abs(cos - want_cos).max() <= 2e-7 and np.abs(sin - want_sin).max() <= 2e-7, angles
        ours[angles] = cos
    assert np.abs(ours["float32"] - ours["float64"]).max() > 5e-6
    assert NextDiTConfig().rope_angles == "float32"  # the original's by default
    with pytest.raises(ValueError, match="rope_angles must be 'float32'"):
        NextDiTConfig(rope_angles="complex64")
