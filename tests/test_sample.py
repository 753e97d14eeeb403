"""Solvers and CFG rules (lumina_jax.sample), without the full pipeline.

- Each original-semantics solver (euler, midpoint, dpm) against a float64 NumPy implementation of the
  same update rule written independently (the DPM reference follows the Flow-DPM-Solver code literally:
  logSNR steps, expm1, noise -> data conversion), on an analytic velocity field: the exact flow of a
  Gaussian data distribution, whose ODE solution is known, so convergence is checked too.
- flow_euler against diffusers' own FlowMatchEulerDiscreteScheduler stepping the same field.
- CFG-Renorm (clamp never scales up; per-sample norms; diffusers' per-row rescale on NCHW) and CFG-Trunc
  (the step where guidance switches off, in both semantics) on hand-built velocities and schedules.
- The compiled loop really skips the unconditional half after truncation: separate loops in the jaxpr
  and half the FLOPs per unguided step (XLA cost analysis of one step of a tiny Next-DiT).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumina_jax.sample import cfg as C
from lumina_jax.sample import loop
from lumina_jax.sample import solvers as S

MU, SD = 0.6, 0.4  # data ~ N(MU, SD^2) per element; noise ~ N(0, 1); x_t = t data + (1 - t) noise


def v_np(x, t):
    """Exact velocity E[data - noise | x_t] of the Gaussian flow, float64."""
    var = t * t * SD * SD + (1 - t) ** 2
    return MU + (t * SD * SD - (1 - t)) / var * (x - t * MU)


def v_jax(params, x, t, guided):
    mu, sd = params
    var = t * t * sd * sd + (1 - t) ** 2
    return mu + (t * sd * sd - (1 - t)) / var * (x - t * mu)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def x0():
    return np.random.default_rng(0).standard_normal((2, 4, 6, 3))


# ----------------------------------------------------------------------------------------------
# float64 references, written from the update rules


def ref_grid(n, s):
    t = np.linspace(0.0, 1.0, n + 1)
    return t / (t + s - s * t)


def ref_euler(x, n, s):
    t = ref_grid(n, s)
    for i in range(n):
        x = x + (t[i + 1] - t[i]) * v_np(x, t[i])
    return x


def ref_midpoint(x, n, s):  # torchdiffeq "midpoint"
    t = ref_grid(n, s)
    for i in range(n):
        dt = t[i + 1] - t[i]
        x = x + dt * v_np(x + 0.5 * dt * v_np(x, t[i]), t[i] + 0.5 * dt)
    return x


def ref_dpm(x, n, s):
    """DPM-Solver++ multistep order 2 with lower_order_final, skip_type time_uniform_flow (flow schedule:
    alpha = 1 - sigma, std = sigma), model_type "flow"."""
    betas = np.linspace(1.0, 0.001, n + 1)
    sig = 1.0 - betas
    ts = (s * sig / (1 + (s - 1) * sig))[::-1]

    def lam(sg):
        with np.errstate(divide="ignore"):
            return np.log(1 - sg) - np.log(sg)

    def data_pred(x, sg):
        noise = x - (1 - sg) * v_np(x, 1 - sg)  # model_wrapper("flow"): noise from the velocity
        return (x - sg * noise) / (1 - sg)

    def first(x, s_, t_, m):
        h = lam(t_) - lam(s_)
        return t_ / s_ * x - (1 - t_) * np.expm1(-h) * m

    def second(x, ms, tps, t_):
        h0, h = lam(tps[1]) - lam(tps[0]), lam(t_) - lam(tps[1])
        d1 = (ms[1] - ms[0]) / (h0 / h)
        phi = np.expm1(-h)
        return t_ / tps[1] * x - (1 - t_) * phi * ms[1] - 0.5 * (1 - t_) * phi * d1

    ms, tps = [data_pred(x, ts[0])], [ts[0]]
    x = first(x, ts[0], ts[1], ms[0])
    ms.append(data_pred(x, ts[1]))
    tps.append(ts[1])
    for step in range(2, n + 1):
        order = min(2, n + 1 - step)
        x = first(x, tps[-1], ts[step], ms[-1]) if order == 1 else second(x, ms[-2:], tps[-2:], ts[step])
        tps.append(ts[step])
        if step < n:
            ms.append(data_pred(x, ts[step]))
    return x


REFS = {"euler": ref_euler, "midpoint": ref_midpoint, "dpm": ref_dpm}


def run_jax(solver, x, n, s=6.0):
    sched = S.make_schedule(solver, n, shift=s, guidance_scale=1.0)
    fn = jax.jit(lambda p, x, sc: S.solve(v_jax, p, x, sc))
    return np.asarray(fn((jnp.float32(MU), jnp.float32(SD)), jnp.asarray(x, jnp.float32), sched))


@pytest.mark.parametrize("solver", ["euler", "midpoint", "dpm"])
@pytest.mark.parametrize("n", [4, 10])
def test_original_solvers_match_float64_reference(solver, n, x0):
    ours = run_jax(solver, x0, n)
    ref = REFS[solver](x0.copy(), n, 6.0)
    assert np.all(np.isfinite(ours))
    assert rel(ours, ref) < 2e-6, (solver, n, rel(ours, ref))  # measured ~1e-7 (fp32 vs fp64)


def test_solvers_converge_with_steps(x0):
    """Towards the exact flow map data = MU + SD * noise. (With shift 6 the last interval is long at few
    steps and its final step lands on the posterior mean, so 4-step errors are large for every
    first-order finish; what must hold is convergence and the order ranking.)"""
    exact = MU + SD * x0
    for solver in ("euler", "midpoint", "dpm", "flow_euler"):
        errs = [rel(run_jax(solver, x0, n), exact) for n in (4, 10, 30)]
        assert errs[0] > errs[1] > errs[2], (solver, errs)
    # at equal model evaluations (10), the second-order solvers beat Euler
    e_euler = rel(run_jax("euler", x0, 10), exact)
    assert rel(run_jax("midpoint", x0, 5), exact) < e_euler
    assert rel(run_jax("dpm", x0, 10), exact) < e_euler


def test_time_grids():
    g = S.original_grid(4, 6.0)
    assert g[0] == 0.0 and g[-1] == 1.0 and len(g) == 5
    np.testing.assert_allclose(S.shift_time(np.array([0.5]), 6.0), [0.5 / (0.5 + 6 - 3)])
    # the two shift forms agree: shift_time(t) = 1 - shift_sigma(1 - t)
    t = np.linspace(0, 1, 11)
    np.testing.assert_allclose(S.shift_time(t, 3.0), 1 - S.shift_sigma(1 - t, 3.0), atol=1e-15)
    sig = S.dpm_sigmas(20, 6.0)
    assert sig[-1] == 0.0 and abs(sig[0] - 6 * 0.999 / (1 + 5 * 0.999)) < 1e-12 and np.all(np.diff(sig) < 0)
    sched = S.make_schedule("midpoint", 3)
    assert sched.num_evaluations == 6 and sched.arrays["t_eval"].shape == (3, 2)
    np.testing.assert_allclose(S.dpm_alphas(20, 6.0), 1.0 - sig, rtol=1e-12, atol=1e-15)
    for shift in (1e17, 3e38):  # the shifted sigma rounds to 1: its complement is computed apart (NaN before)
        for solver in S.SOLVERS:
            arrays = S.make_schedule(solver, 4, shift=shift).arrays
            assert all(np.isfinite(v).all() for v in arrays.values()), (solver, shift)


def test_flow_euler_matches_diffusers_scheduler(x0):
    import torch
    import diffusers
    n = 7
    sch = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))  # as Lumina2Pipeline calls it
    ours = S.make_schedule("flow_euler", n)
    model_t = np.array([(1 - t / 1000).item() for t in sch.timesteps], np.float32)
    np.testing.assert_array_equal(ours.arrays["t"], model_t)  # bit-exact model times
    x = torch.from_numpy(x0.astype(np.float32))
    for t in sch.timesteps:
        tt = (1 - t / 1000).to(torch.float64).item()
        v = torch.from_numpy(v_np(x.numpy().astype(np.float64), tt).astype(np.float32))
        x = sch.step(-v, t, x, return_dict=False)[0]
    assert rel(run_jax("flow_euler", x0, n), x.numpy()) < 1e-5


def test_every_solver_is_finite_at_few_steps(x0):
    for solver in S.SOLVERS:
        for n in (1, 2, 4, 10):
            assert np.all(np.isfinite(run_jax(solver, x0, n))), (solver, n)


def test_solve_reports_each_step_through_a_host_callback(x0):
    seen: list[int] = []
    sched = S.make_schedule("midpoint", 6, cfg_trunc_ratio=0.3)  # three loop segments
    assert len(sched.segments()) == 3
    fn = jax.jit(lambda p, x, sc: S.solve(v_jax, p, x, sc, on_step=lambda i: seen.append(int(i))))
    out = fn((jnp.float32(MU), jnp.float32(SD)), jnp.asarray(x0, jnp.float32), sched)
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert sorted(seen) == list(range(6))
    np.testing.assert_allclose(out, run_jax("midpoint", x0, 6), rtol=1e-6)


def test_solve_integrates_in_float32_from_bf16_noise(x0):
    """bf16 noise is widened (the state and the schedule are float32), not a scan carry type error."""
    sched = S.make_schedule("dpm", 3)
    out = S.dpm(v_jax, (jnp.float32(MU), jnp.float32(SD)), jnp.asarray(x0, jnp.bfloat16), sched)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, run_jax("dpm", np.asarray(jnp.asarray(x0, jnp.bfloat16), np.float32), 3), rtol=1e-6)


def test_solvers_run_outside_jit(x0):
    """The public solver functions also run eagerly (the schedule's NumPy arrays indexed by the loop's
    traced step index)."""
    sched = S.make_schedule("dpm", 3)
    x = jnp.asarray(x0, jnp.float32)
    eager = S.dpm(v_jax, (jnp.float32(MU), jnp.float32(SD)), x, sched)
    np.testing.assert_allclose(eager, run_jax("dpm", x0, 3), rtol=1e-6)


@pytest.mark.parametrize("ratio", [float("nan"), -0.5, 1.5])
def test_trunc_ratio_outside_0_1_is_an_error(ratio):
    with pytest.raises(ValueError, match=r"cfg_trunc_ratio must be in \[0, 1\]"):
        S.make_schedule("midpoint", 4, cfg_trunc_ratio=ratio)


@pytest.mark.parametrize("solver", sorted(S.SOLVERS))
def test_result_does_not_depend_on_loop_segmentation(solver, x0):
    """Guidance flags split the loop into segments; the solver state (dpm's previous data prediction)
    must carry across them. The analytic field ignores ``guided``, so any split gives the same result."""
    one = S.make_schedule(solver, 8, guidance_scale=1.0)
    split = S.make_schedule(solver, 8, guidance_scale=4.0, cfg_trunc_ratio=0.3)
    assert len(one.segments()) == 1 and len(split.segments()) >= 2
    fn = jax.jit(lambda p, x, sc: S.solve(v_jax, p, x, sc))
    p, x = (jnp.float32(MU), jnp.float32(SD)), jnp.asarray(x0, jnp.float32)
    np.testing.assert_allclose(fn(p, x, split), fn(p, x, one), rtol=1e-6, atol=1e-6)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown solver 'heun'"):
        S.make_schedule("heun", 4)
    with pytest.raises(ValueError, match="positive integer"):
        S.make_schedule("euler", 0)
    with pytest.raises(ValueError, match="time_shift"):
        S.make_schedule("euler", 4, shift=-1.0)
    with pytest.raises(ValueError, match=r"time_shift must be a finite number > 0 \(within float32\)"):
        S.make_schedule("flow_euler", 4, shift=1e39)  # float32 sigmas would be inf/NaN
    for solver in S.SOLVERS:  # huge but finite: t + s - s t used to cancel to 0 at t = 1 (inf steps)
        sched = S.make_schedule(solver, 4, shift=1e16)
        assert all(np.all(np.isfinite(a)) for a in sched.arrays.values()), solver
    with pytest.raises(ValueError, match="built for 'euler'"):
        S.dpm(v_jax, None, jnp.zeros(3), S.make_schedule("euler", 2))
    # a tiny shift cancels flow_euler's float32 denominator (diffusers' arithmetic): refused, not NaN
    with pytest.raises(ValueError, match="too small for flow_euler's float32 schedule"):
        S.make_schedule("flow_euler", 4, shift=1e-7)
    sched = S.make_schedule("flow_euler", 4, shift=S.FLOW_EULER_MIN_SHIFT)
    assert abs(sched.arrays["dsigma"][0] + 1.0) < 0.01  # the first step still goes almost all the way
    assert np.all(np.isfinite(S.make_schedule("euler", 4, shift=1e-12).arrays["dt"]))  # the others are float64
    # numbers only (float() would take strings and bools); a guidance scale past float32 would be inf
    for kw, name in ((dict(shift="6"), "time_shift"), (dict(cfg_trunc_ratio="0.5"), "cfg_trunc_ratio"),
                     (dict(guidance_scale=True), "guidance_scale"), (dict(cfg_clamp_ratio="1"), "cfg_clamp_ratio")):
        with pytest.raises(ValueError, match=f"{name} must be a number"):
            S.make_schedule("euler", 4, **kw)
    with pytest.raises(ValueError, match=r"guidance_scale must be a finite number \(within float32\)"):
        S.make_schedule("euler", 4, guidance_scale=1e39)
    assert S.make_schedule("euler", 4, guidance_scale=np.float32(4.0), cfg_trunc_ratio=np.asarray(0.5),
                           cfg_trunc_mode="steps").num_guided == 2  # NumPy scalars and 0-d arrays are numbers


# ----------------------------------------------------------------------------------------------
# CFG-Renorm


def test_renorm_clamp_never_scales_up_and_is_per_sample():
    shape = (3, 2, 4, 5)
    v_c = np.ones(shape, np.float32)
    v_u = np.ones(shape, np.float32)
    v_u[0] *= 1.5  # v = 1.5 + 4 (1 - 1.5) = -0.5: shorter than v_c -> untouched
    v_u[1] *= 0.5  # v = 0.5 + 4 * 0.5 = 2.5: longer -> clamped to ||v_c||
    v_u[2] *= 0.9  # v = 0.9 + 0.4 = 1.3: longer than ratio 0.5 * ||v_c|| -> clamped to half of it
    ratio = np.array([1.0, 1.0, 0.5], np.float32)[:, None, None, None]
    out = np.asarray(C.guided_velocity(jnp.asarray(v_c), jnp.asarray(v_u), 4.0, "clamp", jnp.asarray(ratio)))
    plain = v_u + 4.0 * (v_c - v_u)
    norm = lambda a: np.linalg.norm(a.reshape(len(a), -1), axis=1)  # noqa: E731
    np.testing.assert_allclose(out[0], plain[0], rtol=1e-6)
    np.testing.assert_allclose(norm(out)[1:], norm(v_c)[1:] * np.array([1.0, 0.5]), rtol=1e-5)
    np.testing.assert_allclose(out[1] / np.linalg.norm(out[1]), plain[1] / np.linalg.norm(plain[1]), rtol=1e-5)
    # never longer than before, whatever the inputs
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 8, 3, 4, 4)).astype(np.float32)
    o = np.asarray(C.guided_velocity(jnp.asarray(a), jnp.asarray(b), 3.0, "clamp", 1.0))
    p = b + 3.0 * (a - b)
    assert np.all(norm(o) <= norm(p) * (1 + 1e-6)) and np.all(norm(o) <= norm(a) * (1 + 1e-5))


def test_renorm_rows_is_diffusers_per_width_rescale():
    import torch
    rng = np.random.default_rng(2)
    v_c, v_u = rng.standard_normal((2, 2, 3, 5, 4)).astype(np.float32)  # (B, H, W, C)
    ours = np.asarray(C.guided_velocity(jnp.asarray(v_c), jnp.asarray(v_u), 4.0, "rows"))
    # diffusers' code on NCHW tensors
    tc, tu = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (v_c, v_u))
    pred = tu + 4.0 * (tc - tu)
    pred = pred * (torch.norm(tc, dim=-1, keepdim=True) / torch.norm(pred, dim=-1, keepdim=True))
    np.testing.assert_allclose(ours, pred.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)
    # unlike the clamp it can scale up: a guided row shorter than the conditional one grows
    small_u = v_c * 1.2  # v = 1.2 v_c + 4 (-0.2 v_c) = 0.4 v_c
    up = np.asarray(C.guided_velocity(jnp.asarray(v_c), jnp.asarray(small_u), 4.0, "rows"))
    np.testing.assert_allclose(up, v_c, rtol=1e-5, atol=1e-6)
    clamp = np.asarray(C.guided_velocity(jnp.asarray(v_c), jnp.asarray(small_u), 4.0, "clamp"))
    np.testing.assert_allclose(clamp, 0.4 * v_c, rtol=1e-5, atol=1e-6)


def test_resolve_cfg_normalization():
    assert C.resolve_cfg_normalization(True) == ("clamp", 1.0)
    assert C.resolve_cfg_normalization(0.8) == ("clamp", 0.8)
    assert C.resolve_cfg_normalization(False) == ("none", 0.0)
    assert C.resolve_cfg_normalization("diffusers") == ("rows", 1.0)
    with pytest.raises(ValueError, match="cfg_normalization"):
        C.resolve_cfg_normalization("sometimes")


# ----------------------------------------------------------------------------------------------
# CFG-Trunc


def test_trunc_time_switches_at_the_original_threshold():
    n, s, trunc = 10, 6.0, 0.25
    sched = S.make_schedule("euler", n, shift=s, cfg_trunc_ratio=trunc)
    t = ref_grid(n, s)[:-1]
    expected = [bool(ti < trunc) for ti in t]  # ORIG forward_with_cfg: `if t[0] < cfg_trunc`
    assert [g[0] for g in sched.guided] == expected
    k = expected.index(False)
    assert 0 < k < n and t[k - 1] < trunc <= t[k]
    assert sched.segments() == [(0, k, (True,)), (k, n, (False,))]
    # shift 6 keeps CFG for most of a uniform grid (spec §11.1), the step rule for a quarter
    steps = S.make_schedule("euler", n, shift=s, cfg_trunc_ratio=trunc, cfg_trunc_mode="steps")
    assert sum(g[0] for g in steps.guided) < k
    # a grid point exactly at the threshold (30 steps: 2/3 shifted by 6 is 0.25) is not guided: ``t < ratio``
    tie = S.make_schedule("euler", 30, shift=s, cfg_trunc_ratio=trunc)
    assert S.original_grid(30, s)[20] == trunc and [g[0] for g in tie.guided].index(False) == 20


def test_trunc_steps_is_the_diffusers_rule():
    for n, ratio in [(10, 0.25), (30, 1.0), (7, 0.5), (4, 0.0)]:
        sched = S.make_schedule("flow_euler", n, cfg_trunc_ratio=ratio, cfg_trunc_mode="steps")
        diffusers_rule = [not ((i + 1) / n > ratio) for i in range(n)]  # as in Lumina2Pipeline.__call__
        assert [g[0] for g in sched.guided] == diffusers_rule


def test_midpoint_step_can_straddle_the_threshold():
    n, trunc = 10, 0.45  # shift 6: step 8 goes from t = 0.4 to 0.6 with its midpoint at 0.5
    sched = S.make_schedule("midpoint", n, cfg_trunc_ratio=trunc)
    t, tm = sched.arrays["t_eval"][:, 0], sched.arrays["t_eval"][:, 1]
    straddle = [i for i in range(n) if t[i] < trunc <= tm[i]]
    assert len(straddle) == 1
    i = straddle[0]
    assert i == 8 and sched.guided[i] == (True, False)
    assert [seg[2] for seg in sched.segments()] == [(True, True), (True, False), (False, False)]


def test_no_guidance_at_scale_one():
    sched = S.make_schedule("midpoint", 5, guidance_scale=1.0)
    assert sched.num_guided == 0 and sched.segments() == [(0, 5, (False, False))]


def test_scales_below_one_are_guided_unless_the_diffusers_rule_is_asked_for():
    """The original applies ``v_u + w (v_c - v_u)`` for any ``w != 1``; diffusers (and the ``diffusers``
    preset) turn CFG off for every ``w <= 1``."""
    from lumina_jax.pipeline import resolve_settings, schedule_of

    assert S.make_schedule("flow_euler", 4, guidance_scale=0.5).num_guided == 4
    assert S.make_schedule("flow_euler", 4, guidance_scale=0.5, cfg_off_at_or_below_one=True).num_guided == 0
    assert S.make_schedule("flow_euler", 4, guidance_scale=1.5, cfg_off_at_or_below_one=True).num_guided == 4
    kw = dict(solver=None, num_inference_steps=4, cfg_trunc_ratio=None, cfg_normalization=None, cfg_trunc_mode=None,
              time_shift=None, default_shift=6.0)
    for preset, want in (("diffusers", 0), ("quality", 8), (None, 8)):
        assert schedule_of(resolve_settings(preset=preset, **kw), 0.5).num_guided == want, preset


# ----------------------------------------------------------------------------------------------
# the compiled loop really skips the unconditional half


@pytest.fixture(scope="module")
def tiny_dit():
    import flax.linen as nn

    from lumina_jax.models.nextdit import NextDiT, NextDiTConfig, abstract_params
    from lumina_jax.sample.tiny import _random_like

    config = NextDiTConfig(dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=1, multiple_of=16,
                           axes_dims=(8, 4, 4), cap_feat_dim=64, in_channels=16)  # fmt: skip
    shapes = jax.tree_util.tree_map(lambda x: x, nn.meta.unbox(abstract_params(config)))
    return NextDiT(config), jax.device_put(_random_like(shapes, np.random.default_rng(0)))


def test_truncated_cfg_compiles_to_a_guided_and_an_unguided_loop(tiny_dit):
    dit, params = tiny_dit
    b, n = 2, 8
    noise = jnp.zeros((b, 4, 4, 16))
    feats, mask = jnp.zeros((2 * b, 8, 64)), jnp.ones((2 * b, 8), bool)
    full = S.make_schedule("euler", n, cfg_trunc_ratio=1.0)
    trunc = S.make_schedule("euler", n, cfg_trunc_ratio=0.25)
    k = trunc.num_guided
    assert 0 < k < n
    fn = loop.make_generate_fn(dit, None)
    lengths = lambda sc: loop.loop_lengths(jax.make_jaxpr(fn)(params, {}, noise, feats, mask, sc, 4.0, 1.0))  # noqa: E731
    assert lengths(full) == [n]
    assert lengths(trunc) == [k, n - k]

    # FLOPs of one step: the unguided step runs the transformer on B rows instead of 2B
    @functools.lru_cache(maxsize=None)
    def step_flops(flags):
        exe = loop.make_step_fn(dit, "euler", flags).lower(
            params, noise, jnp.zeros(()), trunc.at(0), feats, mask, 4.0, 1.0).compile()
        return loop.compiled_flops(exe)

    f_g, f_u = step_flops((True,)), step_flops((False,))
    assert f_g > 0  # XLA's cost analysis counts FLOPs on every backend this runs on (CPU included)
    assert 1.8 < f_g / f_u < 2.2, (f_g, f_u)
    tot_full = loop.schedule_flops(full, step_flops)["total"]
    tot_trunc = loop.schedule_flops(trunc, step_flops)["total"]
    expected = (k * f_g + (n - k) * f_u) / (n * f_g)
    assert abs(tot_trunc / tot_full - expected) < 1e-9 and tot_trunc / tot_full < 0.9
