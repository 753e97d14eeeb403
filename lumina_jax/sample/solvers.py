"""ODE solvers for Lumina-Image 2.0 flow matching: time grids, per-step updates and the compiled loop.

Conventions: latents ``x`` are channels-last; the model is a velocity field ``v(x, t) = data - noise`` in
*model time* ``t`` with 0 = noise and 1 = data (spec §2.11), called as ``model_fn(params, x, t, guided)``
where ``t`` is a scalar and ``guided`` a static bool (run CFG or only the conditional branch).

Solvers (``num_steps`` = number of solver steps; model evaluations = ``num_steps * evals_per_step``):

``euler``  -- original semantics (``sample.py``, torchdiffeq ``euler`` on a fixed grid). Grid
    ``t_i = shift(i / N)``, ``i = 0..N`` (N + 1 points including 0 and 1) with the time shift
    ``shift(t) = t / (t + s - s t)`` (spec §7.1; ``s = 6`` by default). ``x += (t_{i+1} - t_i) v(x, t_i)``;
    evaluates t = 0 exactly, never t = 1. The original's ``--num_sampling_steps N`` counts grid points,
    i.e. ``num_steps = N - 1`` here.
``midpoint`` -- original semantics (torchdiffeq ``midpoint``): on the same grid,
    ``x += dt v(x + dt/2 v(x, t_i), t_i + dt/2)``; two evaluations per step.
``dpm`` -- original semantics (Flow-DPM-Solver: DPM-Solver++ multistep, order 2, data prediction,
    ``lower_order_final``, ``skip_type="time_uniform_flow"``; spec §7.1): noise levels
    ``sigma = flip(shift_sigma(linspace(0, 0.999, N + 1)))`` from ~0.99983 down to exactly 0; one
    evaluation per step at model time ``1 - sigma_i``; data prediction ``x0 = x + sigma v``; the first step
    and the last step are first order (the last lands on ``x0``). Coefficients are computed once on the
    host in float64 from the static grid. (The original ``sample.py`` always runs this solver with
    CFG-Renorm ratio 1 and no truncation; here the CFG options apply as for the other solvers.)
``flow_euler`` -- diffusers semantics (``FlowMatchEulerDiscreteScheduler`` as ``Lumina2Pipeline`` uses it,
    spec §7.3): ``sigma = shift_sigma(linspace(1, 1/N, N))`` in float32, then a final 0; model time
    ``1 - sigma*1000/1000`` (float32, as diffusers computes it); the prediction is negated and stepped
    ``x + (sigma_{i+1} - sigma_i) (-v)``. Bit-for-bit the same arithmetic, for parity with diffusers.

All four keep the update rule and the time grid of their reference; they differ in where they evaluate
the model. At 4-10 steps all are stable (tests run each at 4 and 10 steps); see :data:`PRESETS`.

A :class:`Schedule` holds the per-step coefficient arrays (pytree leaves, so changing the shift does not
recompile) and the static structure (solver, steps, which evaluations are guided). :func:`solve` runs the
steps in ``lax.fori_loop`` *segments*: consecutive steps with the same guidance pattern share one loop,
so a truncated-CFG schedule compiles to a guided loop (batch 2B) followed by a conditional-only loop
(batch B). :func:`step` is the same update for one step, used by the step-by-step (interactive) mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.sample.cfg import TruncMode, guidance_flags, real_number

ModelFn = Callable[[Any, jax.Array, jax.Array, bool], jax.Array]
"""``model_fn(params, x, t, guided) -> v``: velocity (data - noise) at scalar model time ``t``."""

SOLVERS: dict[str, dict[str, Any]] = {
    "euler": {"evals_per_step": 1, "semantics": "original", "default_steps": 30},
    "midpoint": {"evals_per_step": 2, "semantics": "original", "default_steps": 17},
    "dpm": {"evals_per_step": 1, "semantics": "original", "default_steps": 20},
    "flow_euler": {"evals_per_step": 1, "semantics": "diffusers", "default_steps": 30},
}
"""Solver name -> properties. ``default_steps``: midpoint 17 steps = the original ``sample.sh``
(18 grid points, 34 evaluations); dpm 20 (the paper: Flow-DPM converges in 14-20 evaluations);
euler / flow_euler 30 (the diffusers default)."""

DEFAULT_SOLVER = "midpoint"
DEFAULT_TIME_SHIFT = 6.0
DPM_SIGMA_START = 0.999  # 1 - t_0 with the original t_0 = 1/1000

PRESETS: dict[str, dict[str, Any]] = {
    # 17 midpoint steps (34 evaluations), CFG on every evaluation: the original sample.sh setting.
    "quality": {"solver": "midpoint", "num_inference_steps": 17, "cfg_trunc_ratio": 1.0},
    # The same grid, CFG only while t < 0.25 (the original demo's default): ~1/3 of the guided
    # evaluations become conditional-only, the paper's recommended CFG-Renorm + CFG-Trunc setting.
    "balanced": {"solver": "midpoint", "num_inference_steps": 17, "cfg_trunc_ratio": 0.25},
    # Flow-DPM-Solver, 10 evaluations plus CFG-Trunc: ~4x fewer forwards than "quality". The paper
    # notes Flow-DPM is "sometimes unstable"; prefer "balanced" when quality matters.
    "fast": {"solver": "dpm", "num_inference_steps": 10, "cfg_trunc_ratio": 0.25},
    # diffusers' Lumina2Pipeline defaults (Euler, 30 steps, renorm over rows, step-fraction trunc).
    # Negative prompts verbatim (the original gives non-empty ones the system prompt).
    # CFG off for every guidance_scale <= 1 (diffusers' do_classifier_free_guidance).
    "diffusers": {"solver": "flow_euler", "num_inference_steps": 30, "cfg_trunc_ratio": 1.0,
                  "cfg_normalization": "rows", "cfg_trunc_mode": "steps", "negative_system_prompt": False,
                  "cfg_off_at_or_below_one": True},
}  # fmt: skip
"""Named settings (documented in the README of the CLI and the notebook). Speed is in model forwards
per image: ``quality`` 34 guided (= 68 batch rows), ``balanced`` ~23 guided + 11 conditional,
``fast`` ~7 guided + 3 conditional, ``diffusers`` 30 guided."""


def check_solver(name: str) -> str:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose from {sorted(SOLVERS)}")
    return name


# ----------------------------------------------------------------------------------------------
# time grids (host, NumPy)


def shift_time(t: np.ndarray, shift: float) -> np.ndarray:
    """Original time shift on model time (0 = noise): ``t / (t + s - s t)`` (spec §7.1), computed as
    ``t / (t + s (1 - t))``, which does not cancel to 0 at ``t = 1`` for huge ``s``."""
    t = np.asarray(t, np.float64)
    return t / (t + shift * (1.0 - t))


def shift_sigma(sigma: np.ndarray, shift: float) -> np.ndarray:
    """The same shift in noise-level space (SD3 / diffusers): ``s sigma / (1 + (s - 1) sigma)``."""
    sigma = np.asarray(sigma, np.float64)
    return shift * sigma / (1 + (shift - 1) * sigma)


def original_grid(num_steps: int, shift: float = DEFAULT_TIME_SHIFT) -> np.ndarray:
    """``num_steps + 1`` model times from 0 to 1 (float64): ``shift(linspace(0, 1, num_steps + 1))``."""
    return shift_time(np.linspace(0.0, 1.0, num_steps + 1), shift)


def dpm_sigmas(num_steps: int, shift: float = DEFAULT_TIME_SHIFT) -> np.ndarray:
    """Flow-DPM noise levels, ``num_steps + 1`` values from ``shift(0.999)`` down to 0 (float64)."""
    return shift_sigma(np.linspace(0.0, DPM_SIGMA_START, num_steps + 1), shift)[::-1].copy()


def dpm_alphas(num_steps: int, shift: float = DEFAULT_TIME_SHIFT) -> np.ndarray:
    """``1 - dpm_sigmas(num_steps, shift)`` computed as ``(1 - v) / (1 + (s - 1) v)`` (``v`` the unshifted
    level), which keeps its precision where a huge ``s`` rounds the shifted sigma to 1."""
    v = np.linspace(0.0, DPM_SIGMA_START, num_steps + 1)[::-1]
    return (1.0 - v) / (1.0 + (float(shift) - 1.0) * v)


# below this the float32 denominator 1 + (shift - 1) * sigma at sigma = 1 is off by more than ~1 % (shift 1e-7:
# the first step is -0.84 instead of -1; 3e-8: it divides by 0)
FLOW_EULER_MIN_SHIFT = 1e-5


def flow_euler_sigmas(num_steps: int, shift: float = DEFAULT_TIME_SHIFT) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' FlowMatchEulerDiscrete schedule, float32 as diffusers computes it.

    Returns ``(sigmas (N + 1,), model_times (N,))``: ``sigmas`` ends with 0; the model time is
    ``1 - (sigma * 1000) / 1000`` (diffusers divides the integer-scaled timestep back).
    """
    sig = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    sig = (np.float32(shift) * sig / (np.float32(1.0) + np.float32(shift - 1.0) * sig)).astype(np.float32)
    timesteps = (sig * np.float32(1000.0)).astype(np.float32)
    model_t = (np.float32(1.0) - timesteps / np.float32(1000.0)).astype(np.float32)
    return np.concatenate([sig, np.zeros(1, np.float32)]), model_t


def dpm_coefficients(sigmas: np.ndarray, alphas: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Per-step coefficients of DPM-Solver++(2M) in flow parametrisation (alpha = 1 - sigma).

    Step ``i`` from ``s = sigma_i`` to ``u = sigma_{i+1}`` with data predictions ``D_i``:
    ``x <- a_i x + b_i D_i + c_i (D_i - D_{i-1})`` where ``a = u / s``, ``b = -alpha_u expm1(-h)``,
    ``h = lambda_u - lambda_s``, ``lambda = log(alpha / sigma)``, and ``c = b / (2 r)`` with
    ``r = h_{i-1} / h_i`` for second-order steps, 0 for the first and the last (lower-order-final) step.
    ``alphas``: ``1 - sigmas`` when known more precisely (:func:`dpm_alphas`).
    """
    sig = np.asarray(sigmas, np.float64)
    alpha = 1.0 - sig if alphas is None else np.asarray(alphas, np.float64)
    n = len(sig) - 1
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)  # +inf at sigma = 0
    a, b, c = np.zeros(n), np.zeros(n), np.zeros(n)
    h = lam[1:] - lam[:-1]
    for i in range(n):
        s, u = sig[i], sig[i + 1]
        a[i] = u / s
        b[i] = -alpha[i + 1] * np.expm1(-h[i])  # -> 1 when u = 0 (h = inf)
        second_order = 0 < i < n - 1
        if second_order:
            c[i] = 0.5 * b[i] / (h[i - 1] / h[i])
    return {"a": a, "b": b, "c": c}


# ----------------------------------------------------------------------------------------------
# the schedule


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A sampling plan: static structure + per-step arrays.

    Attributes:
      solver: one of :data:`SOLVERS`.
      num_steps: solver steps ``N``.
      guided: ``N`` tuples (one bool per model evaluation of the step): run CFG there?
      arrays: name -> ``(N,)`` float32 array of per-step coefficients; ``t_eval`` ``(N, k)`` holds the
        model time of every evaluation (for inspection and for the CFG-Trunc rule).

    It is a pytree: the arrays are leaves (traced under ``jit``) and everything else is static, so a
    new shift recompiles nothing while a different guidance pattern does.
    """

    solver: str
    num_steps: int
    guided: tuple[tuple[bool, ...], ...]
    arrays: dict[str, Any]

    def tree_flatten(self):
        keys = tuple(sorted(self.arrays))
        return tuple(self.arrays[k] for k in keys), (self.solver, self.num_steps, self.guided, keys)

    @classmethod
    def tree_unflatten(cls, aux, children):
        solver, num_steps, guided, keys = aux
        return cls(solver, num_steps, guided, dict(zip(keys, children)))

    @property
    def evals_per_step(self) -> int:
        return SOLVERS[self.solver]["evals_per_step"]

    @property
    def num_evaluations(self) -> int:
        return self.num_steps * self.evals_per_step

    @property
    def num_guided(self) -> int:
        return int(sum(sum(g) for g in self.guided))

    def segments(self) -> list[tuple[int, int, tuple[bool, ...]]]:
        """Maximal runs ``(start, stop, flags)`` of consecutive steps with the same guidance flags."""
        out: list[tuple[int, int, tuple[bool, ...]]] = []
        for i, flags in enumerate(self.guided):
            if out and out[-1][2] == flags:
                out[-1] = (out[-1][0], i + 1, flags)
            else:
                out.append((i, i + 1, flags))
        return out

    def at(self, i: jax.Array | int) -> dict[str, jax.Array]:
        """Coefficients of step ``i`` (scalars; ``t_eval`` -> ``(k,)``)."""
        return {k: jnp.asarray(v)[i] for k, v in self.arrays.items()}  # jnp: ``i`` may be traced

    def with_guidance(self, guided: tuple[tuple[bool, ...], ...]) -> "Schedule":
        if len(guided) != self.num_steps or any(len(g) != self.evals_per_step for g in guided):
            raise ValueError(f"guidance flags must be {self.num_steps} x {self.evals_per_step}")
        return dataclasses.replace(self, guided=tuple(tuple(bool(b) for b in g) for g in guided))

    def describe(self) -> str:
        k = sum(1 for g in self.guided if all(g))
        return (f"{self.solver}: {self.num_steps} steps, {self.num_evaluations} model evaluations, "
                f"{self.num_guided} with CFG ({k} fully guided steps)")


def make_schedule(
    solver: str = DEFAULT_SOLVER,
    num_steps: Optional[int] = None,
    *,
    shift: float = DEFAULT_TIME_SHIFT,
    guidance_scale: float = 4.0,
    cfg_trunc_ratio: float = 1.0,
    cfg_trunc_mode: TruncMode = "time",
    cfg_clamp_ratio: float = 1.0,
    cfg_off_at_or_below_one: bool = False,
) -> Schedule:
    """Build the :class:`Schedule` of ``solver`` with ``num_steps`` steps (``None``: the solver's default).

    ``shift`` is the time shift ``s`` (original ``--time_shifting_factor`` / diffusers scheduler
    ``shift``). Guidance flags follow :func:`lumina_jax.sample.cfg.guidance_flags` (``cfg_clamp_ratio``:
    the CFG-Renorm clamp ratio when that renorm is on; ``cfg_off_at_or_below_one``: diffusers' rule).
    """
    check_solver(solver)
    if num_steps is None:
        num_steps = SOLVERS[solver]["default_steps"]
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_steps!r}")
    num_steps = int(num_steps)
    shift = real_number("time_shift", shift)
    if not 0 < shift <= float(np.finfo(np.float32).max):  # the schedules are float32 (NaN fails too)
        raise ValueError(f"time_shift must be a finite number > 0 (within float32), got {shift}")
    if solver == "flow_euler" and shift < FLOW_EULER_MIN_SHIFT:
        raise ValueError(f"time_shift {shift:g} is too small for flow_euler's float32 schedule (diffusers' "
                         f"arithmetic: 1 + (shift - 1) * sigma cancels to float32 noise, below ~3e-8 to 0); use "
                         f"a shift of at least {FLOW_EULER_MIN_SHIFT:g}, or another solver")  # fmt: skip
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    if solver in ("euler", "midpoint"):
        grid = original_grid(num_steps, shift)
        t, dt = grid[:-1], np.diff(grid)
        arrays = {"t": f32(t), "dt": f32(dt)}
        if solver == "midpoint":
            arrays["t_mid"] = f32(t + 0.5 * dt)
            t_eval = np.stack([t, t + 0.5 * dt], axis=1)
        else:
            t_eval = t[:, None]
    elif solver == "dpm":
        sig, alpha = dpm_sigmas(num_steps, shift), dpm_alphas(num_steps, shift)
        co = dpm_coefficients(sig, alpha)
        arrays = {"t": f32(alpha[:-1]), "sigma": f32(sig[:-1]), **{k: f32(v) for k, v in co.items()}}
        t_eval = alpha[:-1, None]
    else:  # flow_euler
        sig, model_t = flow_euler_sigmas(num_steps, shift)
        arrays = {"t": model_t, "dsigma": (sig[1:] - sig[:-1]).astype(np.float32)}
        t_eval = model_t.astype(np.float64)[:, None]
    arrays["t_eval"] = f32(t_eval)
    flags = guidance_flags(t_eval, guidance_scale=guidance_scale, cfg_trunc_ratio=cfg_trunc_ratio,
                           trunc_mode=cfg_trunc_mode, clamp_ratio=cfg_clamp_ratio,
                           off_at_or_below_one=cfg_off_at_or_below_one)  # fmt: skip
    return Schedule(solver, num_steps, flags, arrays)


# ----------------------------------------------------------------------------------------------
# updates


def init_state(schedule: Schedule, x: jax.Array) -> jax.Array:
    """Solver state carried between steps: the previous data prediction for ``dpm`` (zeros elsewhere)."""
    return jnp.zeros_like(x) if schedule.solver == "dpm" else jnp.zeros((), x.dtype)


def step(model_fn: ModelFn, params: Any, x: jax.Array, state: jax.Array, coeffs: dict[str, jax.Array],
         solver: str, guided: tuple[bool, ...]) -> tuple[jax.Array, jax.Array]:
    """One solver step from ``x`` with the coefficients ``coeffs = schedule.at(i)`` -> ``(x, state)``."""
    c = coeffs
    if solver == "euler":
        return x + c["dt"] * model_fn(params, x, c["t"], guided[0]), state
    if solver == "midpoint":
        v1 = model_fn(params, x, c["t"], guided[0])
        x_mid = x + (0.5 * c["dt"]) * v1
        return x + c["dt"] * model_fn(params, x_mid, c["t_mid"], guided[1]), state
    if solver == "flow_euler":
        v = model_fn(params, x, c["t"], guided[0])
        return x + c["dsigma"] * (-v), state
    if solver == "dpm":
        d = x + c["sigma"] * model_fn(params, x, c["t"], guided[0])  # data prediction x0
        return c["a"] * x + c["b"] * d + c["c"] * (d - state), d
    raise ValueError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}")


def solve(model_fn: ModelFn, params: Any, x: jax.Array, schedule: Schedule,
          on_step: Optional[Callable[[jax.Array], None]] = None) -> jax.Array:
    """Integrate from noise ``x`` (model time 0) to data with ``schedule``: one ``lax.fori_loop`` per
    segment of equal guidance (:meth:`Schedule.segments`). Traceable; call it inside ``jax.jit``.

    ``on_step(i)`` (optional) is called on the host after each step through ``jax.debug.callback``
    (note: executables with host callbacks are not stored in JAX's persistent compilation cache).
    The state is integrated in float32 whatever ``x``'s dtype (bf16 noise is widened).
    """
    x = jnp.asarray(x, jnp.float32)
    state = init_state(schedule, x)
    for start, stop, flags in schedule.segments():

        def body(i, carry, flags=flags):
            xi, si = step(model_fn, params, carry[0], carry[1], schedule.at(i), schedule.solver, flags)
            if on_step is not None:
                jax.debug.callback(on_step, i)
            return xi, si

        x, state = jax.lax.fori_loop(start, stop, body, (x, state))
    return x


def _solver_fn(name: str) -> Callable[..., jax.Array]:
    def fn(model_fn: ModelFn, params: Any, x: jax.Array, schedule: Schedule) -> jax.Array:
        if schedule.solver != name:
            raise ValueError(f"{name}() got a schedule built for {schedule.solver!r}")
        return solve(model_fn, params, x, schedule)

    fn.__name__ = name
    fn.__doc__ = f"``{name}`` solver (see the module docstring): ``solve`` for a ``{name}`` schedule."
    return fn


euler = _solver_fn("euler")
midpoint = _solver_fn("midpoint")
dpm = _solver_fn("dpm")
flow_euler = _solver_fn("flow_euler")

