"""Attention kernels (``pallas``, ``splash``, ``cudnn``, ``xla``) against a float64 reference.

On CPU the Pallas kernels run in interpret mode (same kernel code, executed by XLA), so forward and
backward numerics are checked everywhere. Forward references come from ``reference_attention_f64``
(NumPy float64); gradient references from the analytic attention gradient in NumPy float64.

Tolerances (relative L2 error ``||x - ref|| / ||ref||``):
* float32: 1e-5 for outputs and gradients (reached: ~1e-7 .. 1e-6 in interpret mode).
* bfloat16: 1e-2 for outputs and gradients, against the float64 reference evaluated on the
  bf16-rounded inputs (reached: ~2e-3 .. 3.5e-3 for xla, pallas and splash alike; bf16 keeps an
  8-bit mantissa, and p, ds and the outputs are rounded to it).

The GPU tests (marker ``gpu``) compile the Triton kernel and the cuDNN path for real; on CPU they
are skipped. ``test_pallas_lowers_to_triton`` runs the Pallas -> Triton IR lowering on the CPU via
``jax.export(platforms=["cuda"])`` (no PTX compilation, no execution).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import export_for_cuda

from lumina_jax.ops import attention as attn
from lumina_jax.ops.attention import reference_attention_f64

F32_TOL = 1e-5
BF16_FWD_TOL = 1e-2
BF16_GRAD_TOL = 1e-2


def rel_l2(x, ref) -> float:
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def make_inputs(seed, b, lq, lk, hq, hkv, d, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, lq, hq, d))
    k = rng.standard_normal((b, lk, hkv, d))
    v = rng.standard_normal((b, lk, hkv, d))
    ct = rng.standard_normal((b, lq, hq, d))  # output cotangent for the gradient check
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v)) + (np.asarray(ct),)


def ragged_mask(seed, b, lk):
    """General (non-prefix) key mask; sample 1 has no valid key at all."""
    m = np.random.default_rng(seed).random((b, lk)) < 0.6
    m[1] = False
    return jnp.asarray(m)


def reference_grads(q, k, v, ct, kv_mask, kv_lengths, scale):
    """Analytic float64 gradients of ``sum(out * ct)`` (NumPy; independent of every backend).

    With ``P = softmax(S)``, ``S = scale * q k^T`` (masked), ``out = P v``:
    ``dv = P^T ct``, ``dS = P * (ct v^T - rowsum(P * ct v^T))``, ``dq = scale dS k``,
    ``dk = scale dS^T q``; GQA sums dk/dv over the query heads of each kv head.
    """
    q, k, v, ct = (np.asarray(x, np.float64) for x in (q, k, v, ct))
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    if kv_lengths is not None:
        kv_mask = np.arange(lk)[None, :] < np.asarray(kv_lengths)[:, None]
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    if kv_mask is not None:
        s = np.where(np.asarray(kv_mask)[:, None, None, :], s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    den = p.sum(-1, keepdims=True)
    p = p / np.where(den == 0, 1.0, den)
    dp = np.einsum("bqhd,bkhd->bhqk", ct, vr)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dv = np.einsum("bhqk,bqhd->bkhd", p, ct)
    group_sum = lambda x: x.reshape(b, lk, hkv, g, d).sum(axis=3)
    return [dq, group_sum(dk), group_sum(dv)]


def check_fwd_and_grads(fn, q, k, v, ct, *, kv_mask=None, kv_lengths=None, fwd_tol, grad_tol):
    """``fn(q, k, v, kv_mask, kv_lengths)`` vs the float64 references; returns the errors."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    ct_j = jnp.asarray(ct, q.dtype)

    @jax.jit
    def fwd_and_grads(q, k, v, m, n):  # one compilation for output and gradients
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, m, n), q, k, v)
        return out, vjp(ct_j)

    out, grads = fwd_and_grads(q, k, v, kv_mask, kv_lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    ref = reference_attention_f64(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                  kv_mask=kv_mask, kv_lengths=kv_lengths, scale=scale)
    errors = {"out": rel_l2(out, ref)}
    # Rows without any valid key must be exact zeros.
    valid = np.asarray(kv_mask) if kv_mask is not None else (
        np.arange(k.shape[1])[None] < np.asarray(kv_lengths)[:, None] if kv_lengths is not None else None)
    if valid is not None:
        for i in np.flatnonzero(~valid.any(axis=1)):
            assert np.all(out[i] == 0.0), f"sample {i} has no valid key but non-zero output"

    refs = reference_grads(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                           ct_j.astype(jnp.float32), kv_mask, kv_lengths, scale)
    for name, g, r in zip(("dq", "dk", "dv"), grads, refs):
        g = np.asarray(g.astype(jnp.float32))
        assert g.shape == r.shape
        assert np.isfinite(g).all(), name
        errors[name] = rel_l2(g, r)
    assert errors["out"] < fwd_tol, errors
    for name in ("dq", "dk", "dv"):
        assert errors[name] < grad_tol, errors
    return errors


def via_registry(backend):
    if backend == "splash":  # the TPU kernel module may move in future jax releases
        pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")

    def fn(q, k, v, kv_mask, kv_lengths):
        return attn.attention(q, k, v, kv_mask, kv_lengths=kv_lengths, backend=backend)

    return fn


# ---------------------------------------------------------------------------------------------
# Every CPU-runnable backend through the public attention() interface.
# GQA 6 q / 2 kv heads, head_dim 96, sequence lengths that are not block multiples.
# ---------------------------------------------------------------------------------------------

CPU_BACKENDS = ["xla", "pallas", "splash"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_lengths_fp32(backend):
    q, k, v, ct = make_inputs(0, 3, 45, 45, 6, 2, 96)
    lens = jnp.array([45, 0, 17], jnp.int32)
    check_fwd_and_grads(via_registry(backend), q, k, v, ct, kv_lengths=lens, fwd_tol=F32_TOL, grad_tol=F32_TOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_mask_fp32(backend):
    # Cross-attention shape (Lq != Lk) with a general, non-prefix key mask.
    q, k, v, ct = make_inputs(1, 2, 20, 37, 6, 2, 96)
    mask = ragged_mask(1, 2, 37)
    check_fwd_and_grads(via_registry(backend), q, k, v, ct, kv_mask=mask, fwd_tol=F32_TOL, grad_tol=F32_TOL)


@pytest.mark.parametrize("backend", ["pallas", "splash"])
def test_backend_bf16(backend):
    q, k, v, ct = make_inputs(2, 2, 40, 40, 6, 2, 96, jnp.bfloat16)
    lens = jnp.array([40, 23], jnp.int32)
    check_fwd_and_grads(via_registry(backend), q, k, v, ct, kv_lengths=lens,
                        fwd_tol=BF16_FWD_TOL, grad_tol=BF16_GRAD_TOL)


def test_no_mask_equals_full_lengths():
    from lumina_jax.ops.flash_attention import flash_attention

    q, k, v, _ = make_inputs(3, 2, 33, 33, 4, 4, 64)  # plain MHA (G = 1)
    full = flash_attention(q, k, v)
    ref = reference_attention_f64(q, k, v)
    assert rel_l2(full, ref) < F32_TOL
    np.testing.assert_allclose(full, flash_attention(q, k, v, kv_lengths=jnp.array([33, 33])), rtol=0, atol=1e-6)
    np.testing.assert_allclose(full, flash_attention(q, k, v, jnp.ones((2, 33), bool)), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Our Pallas kernel at several block sizes (and the GPU-style head-dim padding) in interpret mode.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "blocks, masking",
    [
        # lengths (incl. an empty sample), blocks smaller than the sequences, D = 96 unpadded
        (dict(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16), "lengths"),
        # general mask, asymmetric fwd/bwd blocks, D padded 96 -> 128 as on GPU
        (dict(block_q=8, block_k=32, block_q_bwd=32, block_k_bwd=8), "mask"),
    ],
    ids=["16-16-16-16-lengths", "8-32-32-8-mask-paddedD"],
)
def test_pallas_block_sizes(blocks, masking):
    from lumina_jax.ops.flash_attention import BlockSizes, flash_attention

    bs = BlockSizes(**blocks)
    q, k, v, ct = make_inputs(4, 3, 50, 70, 6, 2, 96)
    kw = dict(kv_lengths=jnp.array([70, 0, 33], jnp.int32)) if masking == "lengths" else dict(
        kv_mask=ragged_mask(4, 3, 70))

    def fn(q, k, v, kv_mask, kv_lengths):
        return flash_attention(q, k, v, kv_mask, kv_lengths=kv_lengths, block_sizes=bs,
                               pad_head_dim=masking == "mask")

    check_fwd_and_grads(fn, q, k, v, ct, fwd_tol=F32_TOL, grad_tol=F32_TOL, **kw)


@pytest.mark.parametrize("masking", ["lengths", "mask"])
@pytest.mark.parametrize("d", [96, 80])
def test_pallas_split_head_dim(masking, d):
    """The GPU layout of a non-power-of-two head dim (96 = 64 + 32, 80 = 64 + 16 chunks read from a
    power-of-two wide block, one matmul per chunk), run in the interpreter: forward and gradients."""
    from lumina_jax.ops.flash_attention import BlockSizes, pow2_chunks, flash_attention

    assert pow2_chunks(96) == ((0, 64), (64, 32)) and pow2_chunks(72) is None and pow2_chunks(64) == ((0, 64),)
    bs = BlockSizes(block_q=16, block_k=32, block_q_bwd=32, block_k_bwd=16)
    q, k, v, ct = make_inputs(5, 2, 40, 56, 6, 2, d)
    kw = dict(kv_lengths=jnp.array([56, 21], jnp.int32)) if masking == "lengths" else dict(
        kv_mask=ragged_mask(5, 2, 56))

    def fn(q, k, v, kv_mask, kv_lengths):
        return flash_attention(q, k, v, kv_mask, kv_lengths=kv_lengths, block_sizes=bs, split_head_dim=True)

    check_fwd_and_grads(fn, q, k, v, ct, fwd_tol=F32_TOL, grad_tol=F32_TOL, **kw)
    with pytest.raises(ValueError, match="split_head_dim"):
        flash_attention(q, k, v, split_head_dim=True, pad_head_dim=True)


def test_pallas_rejects_bad_inputs():
    from lumina_jax.ops.flash_attention import BlockSizes, flash_attention

    q, k, v, _ = make_inputs(5, 1, 16, 16, 4, 2, 32)
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        flash_attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))
    with pytest.raises(ValueError, match="powers of two"):
        flash_attention(q, k, v, block_sizes=BlockSizes(block_q=24))
    with pytest.raises(ValueError, match="not a multiple"):
        flash_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="target must be"):
        flash_attention(q, k, v, target="cuda")
    with pytest.raises(ValueError, match="powers of two >= 128"):  # Mosaic rows are multiples of 128 lanes
        flash_attention(q, k, v, target="tpu", block_sizes=BlockSizes(64, 128, 128, 128))


@pytest.mark.parametrize(
    "blocks, masking, dtype",
    [
        ((128, 128, 128, 256), "lengths", jnp.float32),  # an empty sample; dq/dkv blocks differ
        ((256, 128, 128, 128), "mask", jnp.float32),  # general mask incl. a sample without keys
        ((128, 256, 256, 128), "lengths", jnp.bfloat16),
    ],
    ids=["128-128-128-256-lengths", "256-128-128-128-mask", "128-256-256-128-lengths-bf16"],
)
def test_tpu_kernels_interpret(blocks, masking, dtype):
    """Our Mosaic (TPU) kernels in the Pallas interpreter: GQA 6/2, head_dim 96 unpadded, lengths that
    are not block multiples (Lq 200, Lk 300), forward and gradients vs float64. (Compilation through
    Mosaic for real TPU generations: tests/test_aot.py.)"""
    from lumina_jax.ops.flash_attention import BlockSizes, flash_attention

    bs = BlockSizes(*blocks)
    q, k, v, ct = make_inputs(7, 3, 200, 300, 6, 2, 96, dtype)
    kw = dict(kv_lengths=jnp.array([300, 0, 140], jnp.int32)) if masking == "lengths" else dict(
        kv_mask=ragged_mask(7, 3, 300))

    def fn(q, k, v, kv_mask, kv_lengths):
        return flash_attention(q, k, v, kv_mask, kv_lengths=kv_lengths, block_sizes=bs, target="tpu")

    tol = F32_TOL if dtype == jnp.float32 else BF16_GRAD_TOL
    check_fwd_and_grads(fn, q, k, v, ct, fwd_tol=tol, grad_tol=tol, **kw)


@pytest.mark.parametrize("masking", ["mask", "lengths"])
def test_pallas_lowers_to_triton(masking, monkeypatch):
    """The fwd+bwd program lowers through Pallas -> Triton IR for CUDA (checked on the CPU), and every
    Triton module passes the MLIR verifier that XLA's GPU compiler runs when it parses the module (a
    mis-typed loop bound once got past the lowering and failed only on the GPU)."""
    pytest.importorskip("jax.experimental.pallas.triton")
    from jax._src.pallas.triton import pallas_call_registration as registration

    from lumina_jax.ops.flash_attention import flash_attention

    lower = registration.lowering.lower_jaxpr_to_triton_module
    verified = []

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        op = result.module.operation
        name = str(op.attributes["sym_name"]).strip('"')
        try:
            op.verify()
        except Exception as e:  # the MLIR error names the failing op; keep it in the assertion
            raise AssertionError(f"Triton module {name} fails verification: {str(e)[:800]}") from None
        verified.append(name)
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)

    b, l, hq, hkv, d = 2, 200, 6, 2, 96
    spec = jax.ShapeDtypeStruct

    def f(q, k, v, mask_or_lengths):
        kw = dict(kv_mask=mask_or_lengths) if masking == "mask" else dict(kv_lengths=mask_or_lengths)
        loss = lambda q, k, v: jnp.sum(flash_attention(q, k, v, interpret=False, **kw).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    extra = spec((b, l), jnp.bool_) if masking == "mask" else spec((b,), jnp.int32)
    args = (spec((b, l, hq, d), jnp.bfloat16), spec((b, l, hkv, d), jnp.bfloat16),
            spec((b, l, hkv, d), jnp.bfloat16), extra)
    exported = export_for_cuda(f, *args)
    text = exported.mlir_module()
    names = ("lumina_flash_fwd", "lumina_flash_bwd_dq", "lumina_flash_bwd_dkv")
    for name in names:
        assert f'name = "{name}"' in text, name
    assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 3
    assert sorted(verified) == sorted(names)


def test_splash_tiles_pad_the_sequence_least():
    """Lumina's 4096 + 256 tokens: 256-token tiles (no padding), not 512 (4608 rows, ~12 % more work)."""
    from lumina_jax.ops.splash_attention import fit_block

    assert [fit_block(n, 512) for n in (4352, 4096, 4192, 2176, 4608, 100)] == [256, 512, 256, 256, 512, 128]
    assert fit_block(4352, 128) == 128  # the largest asked for bounds it
    with pytest.raises(ValueError, match="multiples of 128, got 200"):
        fit_block(4352, 200)


def test_splash_lowers_for_tpu():
    """The splash fwd+bwd program (head_dim 96 padded to 128) lowers to Mosaic for TPU on the CPU."""
    from jax import export

    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    from lumina_jax.ops.splash_attention import splash_attention

    b, l, hq, hkv, d = 2, 300, 6, 2, 96
    spec = jax.ShapeDtypeStruct

    def f(q, k, v, lens):
        loss = lambda q, k, v: jnp.sum(splash_attention(q, k, v, kv_lengths=lens, interpret=False,
                                                        block_q=128, block_kv=128).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    args = (spec((b, l, hq, d), jnp.bfloat16), spec((b, l, hkv, d), jnp.bfloat16),
            spec((b, l, hkv, d), jnp.bfloat16), spec((b,), jnp.int32))
    text = export.export(jax.jit(f), platforms=["tpu"])(*args).mlir_module()
    assert text.count("tpu_custom_call") == 3  # fwd, dq, dkv


# ---------------------------------------------------------------------------------------------
# cuDNN wrapper logic (mask handling, empty rows) through implementation="xla" on any platform.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masking", ["lengths", "mask"])
def test_cudnn_wrapper_logic_with_xla(masking):
    from lumina_jax.ops.cudnn_attention import cudnn_attention

    q, k, v, ct = make_inputs(6, 2, 24, 30, 6, 2, 96)
    kw = dict(kv_lengths=jnp.array([0, 11], jnp.int32)) if masking == "lengths" else dict(
        kv_mask=ragged_mask(6, 2, 30))

    def fn(q, k, v, kv_mask, kv_lengths):
        return cudnn_attention(q, k, v, kv_mask, kv_lengths=kv_lengths, implementation="xla")

    check_fwd_and_grads(fn, q, k, v, ct, fwd_tol=F32_TOL, grad_tol=F32_TOL, **kw)


def test_shard_over_batch_and_heads():
    from jax.sharding import Mesh

    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    from lumina_jax.ops.splash_attention import shard_over_batch_and_heads

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    q, k, v, _ = make_inputs(10, 2, 16, 16, 4, 2, 32)
    lens = jnp.array([16, 5], jnp.int32)
    fn = shard_over_batch_and_heads(
        lambda q, k, v, m, n: attn.attention(q, k, v, m, kv_lengths=n, backend="xla"), mesh)
    out = jax.jit(fn)(q, k, v, None, lens)
    assert rel_l2(out, reference_attention_f64(q, k, v, kv_lengths=lens)) < F32_TOL


def test_auto_backend_per_platform_dtype_and_head_dim(monkeypatch):
    expected = {"gpu": "cudnn", "tpu": "splash_sharded"}.get(jax.default_backend(), "xla")
    assert attn.resolve_backend("auto", jnp.bfloat16, 96) == expected
    assert {"xla", "pallas", "splash", "cudnn", "splash_sharded", "pallas_tpu_sharded", "context",
            "context_xla", "context_pallas"} <= set(attn.available_backends())  # fmt: skip
    assert attn.get_backend("context_xla") is not None  # lazily registered like "context"
    for platform, want in {"gpu": "cudnn", "tpu": "splash_sharded", "cpu": "xla"}.items():
        monkeypatch.setattr(attn.jax, "default_backend", lambda p=platform: p)
        assert attn.resolve_backend("auto") == want
    monkeypatch.setattr(attn.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attn, "_gpu_generation", lambda: 9)  # Hopper
    # the Triton kernel per shard (pallas_sharded: plain pallas on one device)
    assert attn.auto_candidates(jnp.bfloat16, 96) == ("cudnn", "pallas_sharded", "xla")
    assert attn.auto_candidates(jnp.float32, 96) == ("pallas_sharded", "xla")  # cuDNN runs fp16/bf16 only
    assert attn.auto_candidates(jnp.bfloat16, 36) == ("pallas_sharded", "xla")  # not a multiple of 8
    assert attn.auto_candidates(jnp.bfloat16, 512) == ("xla",)
    assert attn.auto_candidates(jnp.float64, 64) == ("xla",)  # the kernel takes fp32/bf16/fp16 only
    assert attn.auto_candidates(jnp.bfloat16, 256) == ("cudnn", "pallas_sharded", "xla")
    monkeypatch.setattr(attn, "_gpu_generation", lambda: 8)  # Ampere: cuDNN up to 128
    assert attn.auto_candidates(jnp.bfloat16, 256) == ("pallas_sharded", "xla")
    monkeypatch.setattr(attn, "_gpu_generation", lambda: 7)  # a T4 (Colab): no cuDNN flash, no Triton bf16 dot
    assert attn.auto_candidates(jnp.bfloat16, 96) == ("xla",)
    assert attn.auto_candidates(jnp.float16, 96) == ("pallas_sharded", "xla")
    assert attn.auto_candidates(jnp.float32, 96) == ("pallas_sharded", "xla")
    for platform in ("gpu", "tpu"):  # a float64 debugging run: the kernels' index arithmetic is int32
        assert attn.auto_candidates(jnp.float64, 96, platform) == ("xla",)
    assert attn.auto_candidates(jnp.float16, 96, "tpu") == ("xla",)  # Mosaic splash: fp32/bf16
    assert attn.auto_candidates(jnp.bfloat16, 96, "tpu") == ("splash_sharded", "splash", "xla")
    jax.config.update("jax_enable_x64", True)
    try:
        assert attn.auto_candidates(jnp.float32, 96, "gpu") == ("xla",)
    finally:
        jax.config.update("jax_enable_x64", False)
    monkeypatch.setattr(attn, "_gpu_generation", lambda: 9)
    # the FLOP count's question: does the named backend run a kernel for these inputs?
    assert attn.attention_uses_kernel("auto", "bfloat16", 96) and attn.attention_uses_kernel("context", "bfloat16", 96)
    assert not attn.attention_uses_kernel("cudnn", "float32", 96)  # falls back to XLA itself
    assert not attn.attention_uses_kernel("context_xla", "bfloat16", 96)
    assert not attn.attention_uses_kernel("auto", "bfloat16", 512)
    q, k, v, _ = make_inputs(3, 1, 8, 8, 2, 2, 32)
    with pytest.raises(ValueError, match=r"splash is a TPU \(Mosaic\) kernel: on GPU use"):  # not the interpreter, unsaid
        attn.attention(q, k, v, backend="splash")


def test_auto_falls_back_past_a_backend_that_cannot_build_and_says_so(monkeypatch, caplog):
    """A candidate that fails while tracing (no cuDNN on this machine, a shape a kernel refuses) is
    passed over for the next one; the choice and the reasons are logged once, and from then on
    ``resolve_backend`` / ``attention_uses_kernel`` (FLOP counts, benchmark labels) report what ran."""
    calls = []

    def no_cudnn(q, k, v, **kw):
        calls.append("cudnn")
        raise RuntimeError("cuDNN is not detected.")

    def no_pallas(q, k, v, **kw):
        calls.append("pallas")
        raise ValueError("block sizes do not fit")

    monkeypatch.setattr(attn.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attn, "_gpu_generation", lambda: 9)
    monkeypatch.setitem(attn._BACKENDS, "cudnn", no_cudnn)
    monkeypatch.setitem(attn._BACKENDS, "pallas_sharded", no_pallas)
    monkeypatch.setattr(attn, "_LOGGED_CHOICES", set())
    monkeypatch.setattr(attn, "_FALLBACKS", {})
    assert attn.resolve_backend("auto", jnp.bfloat16, 32) == "cudnn" and attn.attention_uses_kernel("auto", "bfloat16", 32)
    q, k, v, _ = make_inputs(11, 2, 16, 16, 4, 2, 32, dtype=jnp.bfloat16)
    lens = jnp.array([16, 5], jnp.int32)
    with caplog.at_level("INFO", logger="lumina_jax.ops"):
        out = jax.jit(lambda q, k, v, n: attn.attention(q, k, v, kv_lengths=n))(q, k, v, lens)
        attn.attention(q, k, v, kv_lengths=lens)  # same inputs again: not logged again
    assert calls == ["cudnn", "pallas", "cudnn", "pallas"]  # (the fake is registered as pallas_sharded)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(attn.attention(q, k, v, kv_lengths=lens, backend="xla"), np.float32))
    assert caplog.text.count("attention backend auto -> xla (gpu, bfloat16, head_dim 32)") == 1
    assert "cudnn: RuntimeError: cuDNN is not detected." in caplog.text and "pallas_sharded: ValueError" in caplog.text
    assert attn.resolve_backend("auto", jnp.bfloat16, 32) == "xla" and not attn.attention_uses_kernel("auto", "bfloat16", 32)
    assert attn.resolve_backend("auto", jnp.bfloat16, 64) == "cudnn"  # another head_dim: not traced yet


def test_bench_attention_runs_on_cpu():
    from lumina_jax.ops.attention_bench import bench_attention, format_rows

    rows = bench_attention(batch=1, image_tokens=24, caption_tokens=8, heads=4, kv_heads=2, head_dim=32,
                           dtype="float32", iters=2, warmup=1)
    by_key = {(r["backend"], r["mode"]): r for r in rows}
    assert ("xla", "fwd") in by_key and ("xla", "fwd+bwd") in by_key
    assert by_key[("auto", "fwd")]["runs"] == "xla"  # the default list has auto, with what it picked here
    cudnn = bench_attention(batch=1, image_tokens=24, caption_tokens=8, heads=4, kv_heads=2, head_dim=32,
                            dtype="float32", iters=1, warmup=0, backends=["cudnn"])
    assert cudnn[0]["runs"] == "xla"  # fp32: the cuDNN wrapper's own XLA fallback, not a cuDNN timing
    assert "runs" in format_rows(rows).splitlines()[0]
    for r in rows:
        assert r["error"] is None, r
        assert r["ms"] > 0 and r["tflops"] > 0
    flops = 4 * 1 * 4 * 32 * 32 * 32
    fwd = by_key[("xla", "fwd")]
    assert fwd["tflops"] == pytest.approx(flops / (fwd["ms"] * 1e-3) / 1e12)


# ---------------------------------------------------------------------------------------------
# GPU only: real Triton compilation and cuDNN (skipped on CPU by conftest's marker handling).
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_on_gpu(dtype):
    from lumina_jax.ops.flash_attention import flash_attention

    q, k, v, ct = make_inputs(7, 2, 300, 300, 24, 8, 96, dtype)
    lens = jnp.array([300, 170], jnp.int32)

    def fn(q, k, v, kv_mask, kv_lengths):
        return flash_attention(q, k, v, kv_mask, kv_lengths=kv_lengths, interpret=False)

    tol = (F32_TOL, F32_TOL) if dtype == jnp.float32 else (BF16_FWD_TOL, BF16_GRAD_TOL)
    check_fwd_and_grads(fn, q, k, v, ct, kv_lengths=lens, fwd_tol=tol[0], grad_tol=tol[1])
    check_fwd_and_grads(fn, q, k, v, ct, kv_mask=ragged_mask(7, 2, 300), fwd_tol=tol[0], grad_tol=tol[1])


@pytest.mark.gpu
@pytest.mark.parametrize("masking", ["lengths", "mask"])
def test_cudnn_on_gpu(masking):
    q, k, v, ct = make_inputs(8, 2, 256, 256, 24, 8, 96, jnp.bfloat16)
    kw = dict(kv_lengths=jnp.array([256, 0], jnp.int32)) if masking == "lengths" else dict(
        kv_mask=ragged_mask(8, 2, 256))
    check_fwd_and_grads(via_registry("cudnn"), q, k, v, ct, fwd_tol=BF16_FWD_TOL, grad_tol=BF16_GRAD_TOL, **kw)


@pytest.mark.tpu
def test_splash_on_tpu():
    q, k, v, ct = make_inputs(9, 2, 300, 300, 24, 8, 96, jnp.bfloat16)
    lens = jnp.array([300, 0], jnp.int32)
    check_fwd_and_grads(via_registry("splash"), q, k, v, ct, kv_lengths=lens,
                        fwd_tol=BF16_FWD_TOL, grad_tol=BF16_GRAD_TOL)


@pytest.mark.tpu
@pytest.mark.parametrize("masking", ["lengths", "mask"])
def test_our_kernels_on_tpu(masking):
    """Our Mosaic kernels compiled and run on a TPU, Lumina's head shapes."""
    q, k, v, ct = make_inputs(9, 2, 300, 300, 24, 8, 96, jnp.bfloat16)
    kw = dict(kv_lengths=jnp.array([300, 0], jnp.int32)) if masking == "lengths" else dict(
        kv_mask=ragged_mask(9, 2, 300))
    check_fwd_and_grads(via_registry("pallas"), q, k, v, ct, fwd_tol=BF16_FWD_TOL, grad_tol=BF16_GRAD_TOL, **kw)
