"""Unit tests of the training pieces that need no Next-DiT compile: objective, schedules, config and
overrides, the step's non-finite guard and gradient accumulation (with a stub model), checkpoint
tree layout, the TensorBoard writer, FLOP accounting and the CLI's error paths."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from lumina_jax.train import objective as obj
from lumina_jax.train import optim


# ---------------------------------------------------------------------------------------------- objective


def test_shift_mu_matches_spec():
    assert obj.shift_mu(256) == pytest.approx(0.5)
    assert obj.shift_mu(4096) == pytest.approx(1.15)
    assert obj.seq_len_for_resolution(1024) == 4096 and obj.seq_len_for_resolution(256) == 256


def test_time_shift_formula_and_direction():
    t = jnp.linspace(0.0, 1.0, 11)
    mu = 1.15
    sigma = 1 - np.asarray(t, np.float64)
    want = 1 - math.exp(mu) * sigma / (math.exp(mu) * sigma + 1 - sigma)
    np.testing.assert_allclose(obj.time_shift(t, mu), want, rtol=1e-6, atol=1e-7)
    shifted = np.asarray(obj.time_shift(t, mu))
    assert shifted[0] == 0 and shifted[-1] == pytest.approx(1.0)
    assert np.all(shifted[1:-1] < np.asarray(t)[1:-1])  # towards noise (t = 0)


def test_sample_t_ranges():
    u = obj.sample_t(jax.random.PRNGKey(0), 4096, "uniform")
    ln = obj.sample_t(jax.random.PRNGKey(0), 4096, "lognorm")
    assert 0 <= float(u.min()) and float(u.max()) <= 1
    assert abs(float(jnp.median(ln)) - 0.5) < 0.03  # sigmoid(N(0,1)) is symmetric around 0.5
    shifted = obj.sample_t(jax.random.PRNGKey(0), 4096, "lognorm", mu=1.15)
    assert float(jnp.mean(shifted)) < float(jnp.mean(ln))
    with pytest.raises(ValueError, match="unknown t sampling"):
        obj.sample_t(jax.random.PRNGKey(0), 2, "beta")


def test_interpolate_and_pool():
    k1, k0 = jax.random.split(jax.random.PRNGKey(0))
    x1, x0 = jax.random.normal(k1, (3, 8, 8, 4)), jax.random.normal(k0, (3, 8, 8, 4))
    t = jnp.array([0.25, 1.0, 0.0])
    xt, target = obj.interpolate(x1, x0, t)  # x_t = t x1 + (1 - t) x0 (t = 0 is noise), target x1 - x0
    a1, a0 = np.asarray(x1, np.float64), np.asarray(x0, np.float64)
    np.testing.assert_allclose(xt, np.asarray(t)[:, None, None, None] * a1 + (1 - np.asarray(t))[:, None, None, None] * a0,
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(xt[2], a0[2], rtol=1e-6)
    np.testing.assert_allclose(target, a1 - a0, rtol=1e-6, atol=1e-6)
    x = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 8, 1)
    p = obj.avg_pool(x, 4)
    assert p.shape == (2, 2, 2, 1)
    np.testing.assert_allclose(p[0, 0, 0, 0], np.mean(np.asarray(x)[0, :4, :4, 0]))


def test_flow_loss_zero_for_oracle():
    x1 = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 2))
    rng = jax.random.PRNGKey(2)
    k_t, k_n = jax.random.split(rng)
    x0 = jax.random.normal(k_n, x1.shape)
    per = obj.flow_loss(lambda xt, t: x1 - x0, x1, rng, t_sampling="uniform")
    np.testing.assert_allclose(per, 0.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- optim


def test_lr_schedules():
    hp = optim.stage_hparams(1e-3, 100, 50)
    const = optim.lr_schedule(optim.OptimizerConfig())
    assert float(const(120, hp)) == pytest.approx(1e-3)
    warm = optim.lr_schedule(optim.OptimizerConfig(schedule="warmup_constant", warmup_steps=10))
    assert float(warm(100, hp)) == pytest.approx(1e-4) and float(warm(109, hp)) == pytest.approx(1e-3)
    cos = optim.lr_schedule(optim.OptimizerConfig(schedule="cosine", min_lr_ratio=0.1))
    assert float(cos(100, hp)) == pytest.approx(1e-3)
    assert float(cos(149, hp)) == pytest.approx(1e-4, rel=1e-4)  # the stage's last step (was reached one later)
    assert float(cos(124, hp)) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 24 / 49))), rel=1e-4)
    cw = optim.lr_schedule(optim.OptimizerConfig(schedule="cosine", min_lr_ratio=0.1, warmup_steps=10))
    assert float(cw(109, hp)) == pytest.approx(1e-3) and float(cw(110, hp)) < 1e-3  # the peak is held one step
    assert float(cw(149, hp)) == pytest.approx(1e-4, rel=1e-4)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        optim.OptimizerConfig(schedule="cosine", min_lr_ratio=1.5)


def test_trainable_mask_and_optimizer():
    params = {"a": {"kernel": jnp.ones((3, 2))}, "b": {"scale": jnp.ones(2)}}
    mask = optim.trainable_mask(params, ["^a/"])
    assert mask == {"a": {"kernel": True}, "b": {"scale": False}}
    with pytest.raises(ValueError, match="match no parameter"):
        optim.trainable_mask(params, ["nothing"])
    tx = optim.make_optimizer(optim.OptimizerConfig(), mask)
    state = tx.init(params)
    sizes = [x.size for x in jax.tree.leaves(state) if x.ndim > 0]
    assert sorted(sizes) == [6, 6]  # Adam moments only for the trainable kernel


# ---------------------------------------------------------------------------------------------- step (stub model)


class StubDiT(nn.Module):
    """Same call signature as NextDiT, a few parameters, compiles in well under a second."""

    @nn.compact
    def __call__(self, x, t, cap, mask):
        c = jnp.sum(cap * mask[..., None], 1) / jnp.maximum(jnp.sum(mask, 1, keepdims=True), 1)
        h = nn.Dense(x.shape[-1], name="proj")(x) + nn.Dense(x.shape[-1], name="cond")(c)[:, None, None]
        return h * (1.0 + t[:, None, None, None])


def _stub_setup(grad_accum=1, lr=1e-2, trainable=None, batch=None, opt=None):
    from lumina_jax.parallel.mesh import create_mesh
    from lumina_jax.train.state import init_state, state_shardings
    from lumina_jax.train.step import StepConfig, compile_train_step, make_train_step

    model = StubDiT()
    b = 4
    rng = np.random.default_rng(0)
    batch = batch or {
        "latents": rng.standard_normal((b, 8, 8, 4)).astype(np.float32),
        "cap_feats": rng.standard_normal((b, 3, 5)).astype(np.float32),
        "cap_mask": np.ones((b, 3), bool),
        "valid": np.ones((b,), bool),
    }
    b = batch["latents"].shape[0]
    params = model.init(jax.random.PRNGKey(0), batch["latents"], jnp.zeros(b), batch["cap_feats"], batch["cap_mask"])["params"]
    mask = optim.trainable_mask(params, trainable or [".*"])
    tx = optim.make_optimizer(opt or optim.OptimizerConfig(), mask)
    mesh = create_mesh({"data": 1}, devices=jax.devices()[:1])
    state = init_state(params, tx, True)
    sh = state_shardings(jax.eval_shape(lambda s: s, state), jax.tree.map(lambda _: jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()), params), mesh)  # fmt: skip
    sc = StepConfig(seed=0, mu=0.5, aux_loss_weight=1.0, aux_pool=4, grad_accum=grad_accum)
    fn = make_train_step(model, tx, optim.lr_schedule(optim.OptimizerConfig()), sc,
                         None if trainable is None else mask)  # fmt: skip
    step = compile_train_step(fn, mesh, sh, batch, donate=False)
    return step, state, batch, optim.stage_hparams(lr, 0, 10), fn


def test_nonfinite_step_is_not_applied():
    step, state, batch, hp, _ = _stub_setup()
    bad = dict(batch, latents=batch["latents"].copy())
    bad["latents"][1, 2, 3, 0] = np.nan
    s1, m1 = step(state, bad, hp)
    assert not bool(m1["finite"]) and int(m1["nonfinite"]) == 1 and int(m1["nonfinite_run"]) == 1
    for a, b in zip(jax.tree.leaves((state.params, state.ema, state.opt_state)),
                    jax.tree.leaves((s1.params, s1.ema, s1.opt_state))):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(s1.step) == 1
    s2, m2 = step(s1, bad, hp)
    assert int(m2["nonfinite_run"]) == 2
    s3, m3 = step(s2, batch, hp)
    assert bool(m3["finite"]) and int(m3["nonfinite_run"]) == 0 and int(m3["nonfinite"]) == 2
    assert not np.array_equal(np.asarray(s3.params["proj"]["kernel"]), np.asarray(state.params["proj"]["kernel"]))


def test_logged_throughput_sums_each_steps_own_flops(tmp_path, monkeypatch):
    """Steps of different shapes (aspect buckets) between two logs: TFLOP/s is their summed FLOPs over
    the time, each batch's FLOPs from its own latent shape, not the stage's first batch."""
    from lumina_jax.train import loop
    from lumina_jax.train.config import load_config
    from lumina_jax.train.loop import Trainer

    tr = Trainer(load_config("tiny_synthetic", [f"run_dir={tmp_path}", "log.progress=false", "log.every=100"]))
    clock = iter([10.0, 11.0, 13.0, 20.0, 21.0, 30.0, 32.0])
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    m = {"loss": 0.5, "loss_main": 0.5, "loss_aux": 0.0, "grad_norm": 1.0, "lr": 1e-3, "finite": True,
         "nonfinite": 0, "nonfinite_run": 0}  # fmt: skip
    tr._timer = None
    tr._report(1, m, None, (5e12, 0.0), 1, None)  # compiles: starts the clock, not counted
    tr._report(2, m, None, (1e12, 1e11), 1, None)
    out = tr._report(3, m, None, (3e12, 3e11), 1, None, force=True)
    assert out["step_time_s"] == 1.5 and out["tflops_per_device"] == pytest.approx(4.0 / 3.0)
    assert out["remat_tflops_per_device"] == pytest.approx(0.4 / 3.0)
    # an interval that held a new shape's compile (or a save, or samples) is left out: 7 s here
    tr._skip_interval = True
    tr._report(4, m, None, (1e12, 0.0), 1, None)
    out = tr._report(5, m, None, (2e12, 0.0), 1, None, force=True)
    assert out["step_time_s"] == 1.0 and out["tflops_per_device"] == pytest.approx(2.0)
    # a compile before a stage's first fetch is outside the clock already: the next interval still counts
    tr._timer, tr._skip_interval = None, True
    tr._report(6, m, None, (1e12, 0.0), 1, None)
    assert tr._report(7, m, None, (1e12, 0.0), 1, None, force=True)["step_time_s"] == 2.0
    sq = tr.flops(0, 8)
    wide = tr._batch_flops(0, {"latents": np.zeros((tr.cfg.stages[0].batch, 8, 16, 16)), "cap_feats": np.zeros((1, 8, 4))})
    assert wide[0] > 1.5 * sq[0] and tr._batch_flops(0, {"latents": np.zeros((tr.cfg.stages[0].batch, 8, 8, 16)),
                                                          "cap_feats": np.zeros((1, 8, 4))}) == sq  # fmt: skip
    tr.metrics.close()


def test_trainer_aborts_after_consecutive_nonfinite(tmp_path):
    from lumina_jax.train.config import load_config
    from lumina_jax.train.loop import NonFiniteLossError, Trainer

    tr = Trainer(load_config("tiny_synthetic", [f"run_dir={tmp_path}", "max_nonfinite=3", "log.progress=false"]))
    tr._timer = None
    m = {"loss": float("nan"), "loss_main": float("nan"), "loss_aux": 0.0, "grad_norm": float("nan"), "lr": 1e-3,
         "finite": False, "nonfinite": 2, "nonfinite_run": 2}  # fmt: skip
    tr._report(5, m, None, (1.0, 0.0), 1, None)  # 2 in a row: warned, not fatal
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        tr._report(6, dict(m, nonfinite=3, nonfinite_run=3), None, (1.0, 0.0), 1, None)
    tr.metrics.close()


def test_grad_accumulation_equals_mean_of_micro_batches():
    """grad_accum=2 on a batch of 4 == mean of the gradients of its two strided halves (rows 0,2 and
    1,3) with the per-micro-batch RNG folding the step uses (each half's loss is its share of the
    batch mean: its sum over 4 rows)."""
    import optax

    from lumina_jax.train.step import StepConfig, make_loss_fn

    step, state, batch, hp, _ = _stub_setup(grad_accum=2)
    _, m = step(state, batch, hp)
    loss_fn = make_loss_fn(StubDiT(), StepConfig(seed=0, mu=0.5, aux_loss_weight=1.0, aux_pool=4, grad_accum=2))
    rng = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    grads, losses = [], []
    for i in range(2):
        mb = {k: v[i::2] for k, v in batch.items()}
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params, mb, jax.random.fold_in(rng, i), 4.0)
        grads.append(g)
        losses.append(loss)
    g = jax.tree.map(lambda a, b: a + b, *grads)
    np.testing.assert_allclose(float(m["loss"]), float(np.sum(losses)), rtol=1e-5)
    np.testing.assert_allclose(float(m["grad_norm"]), float(optax.global_norm(g)), rtol=1e-5)


def test_optimizer_and_ema_match_a_numpy_reference():
    """Three steps of the compiled train step vs the recipe written out in float64 NumPy: global-norm
    clipping -> Adam (b1 0.9, b2 0.95, eps 1e-15, bias-corrected) -> decoupled weight decay ->
    ``p - lr * u`` -> ``ema = 0.95 ema + 0.05 p``. The gradients come from the project's loss function
    (tested elsewhere); everything after them is checked here (three steps: Adam's first step is ~sign(g)
    whatever the betas)."""
    import optax

    from lumina_jax.train.step import StepConfig, aux_rows, make_loss_fn

    opt = optim.OptimizerConfig(clip_norm=0.05, weight_decay=0.1)  # clipping active: grad norms are ~0.5
    step, state, batch, hp, _ = _stub_setup(lr=1e-2, opt=opt)
    sc = StepConfig(seed=0, mu=0.5, aux_loss_weight=1.0, aux_pool=4)
    loss_fn = make_loss_fn(StubDiT(), sc)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    aux_denom = aux_rows(jb, sc, 1, 4.0)
    f64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)  # noqa: E731
    p, ema = f64(state.params), f64(state.params)
    m, v = jax.tree.map(np.zeros_like, p), jax.tree.map(np.zeros_like, p)
    lr, b1, b2, eps, wd, d = 1e-2, 0.9, 0.95, 1e-15, 0.1, 0.95
    for s in range(3):
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), s), 0)
        grad = jax.grad(lambda q: loss_fn(q, jb, rng, 4.0, aux_denom)[0])(jax.tree.map(jnp.float32, p))
        g = f64(grad)
        norm = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(g)))
        assert norm > 2 * opt.clip_norm, norm
        g = jax.tree.map(lambda x: x * opt.clip_norm / norm, g)
        m = jax.tree.map(lambda a, x: b1 * a + (1 - b1) * x, m, g)
        v = jax.tree.map(lambda a, x: b2 * a + (1 - b2) * x * x, v, g)
        u = jax.tree.map(lambda a, b, q: a / (1 - b1 ** (s + 1)) / (np.sqrt(b / (1 - b2 ** (s + 1))) + eps) + wd * q,
                         m, v, p)  # fmt: skip
        p = jax.tree.map(lambda q, x: q - lr * x, p, u)
        ema = jax.tree.map(lambda e, q: d * e + (1 - d) * q, ema, p)
        state, metrics = step(state, batch, hp)
        np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["lr"]), lr, rtol=1e-6)
    for got, want in ((state.params, p), (state.ema, ema), (optax.tree_utils.tree_get(state.opt_state, "mu"), m),
                      (optax.tree_utils.tree_get(state.opt_state, "nu"), v)):  # fmt: skip
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=2e-5, atol=1e-7)


def test_frozen_params_do_not_move():
    step, state, batch, hp, _ = _stub_setup(trainable=["^proj/"])
    s1, _ = step(state, batch, hp)
    np.testing.assert_array_equal(np.asarray(s1.params["cond"]["kernel"]), np.asarray(state.params["cond"]["kernel"]))
    assert not np.array_equal(np.asarray(s1.params["proj"]["kernel"]), np.asarray(state.params["proj"]["kernel"]))


# ---------------------------------------------------------------------------------------------- config


def test_config_overrides_and_unknown_keys():
    from lumina_jax.train.config import load_config

    cfg = load_config("tiny_synthetic", ["optimizer.lr=1e-4", "stages.1.batch=16", "mesh.fsdp=2", "trainable=[layers]"])
    assert cfg.optimizer.lr == 1e-4 and cfg.stages[1].batch == 16 and cfg.mesh.fsdp == 2
    assert cfg.trainable == ("layers",)
    with pytest.raises(ValueError, match=r"optimizer\.lrr"):
        load_config("tiny_synthetic", ["optimizer.lrr=1"])
    with pytest.raises(ValueError, match="bogus"):
        load_config("tiny_synthetic", ["bogus=1"])
    with pytest.raises(ValueError, match="not an index"):
        load_config("tiny_synthetic", ["stages.5.batch=1"])
    with pytest.raises(ValueError, match="unknown config key"):
        load_config("tiny_synthetic", ["stages.0.data.kindd=x"])
    assert cfg.stage_bounds() == [(0, 10), (10, 20)]
    assert cfg.stage_at(9) == 0 and cfg.stage_at(10) == 1 and cfg.stage_at(99) == 1


@pytest.mark.parametrize("override, message", [
    ("log.every=0", "log.every must be >= 1"),
    ("max_nonfinite=0", "max_nonfinite must be >= 1"),
    ("objective.aux_pool=0", "aux_pool must be >= 1"),
    ("checkpoint.keep=0", "keep >= 1"),
    ("grad_accum=true", "grad_accum: expected int, got bool"),
    ("trainable={a: 1}", "trainable: expected a list, got dict"),
    # a later stage's data settings fail when the config loads, naming the section (not after the first stage)
    ("stages.1.data.batching=buckets", r"stages\.1\.data: batching must be 'bucket' or 'mixed', got 'buckets'"),
    ("stages.1.data.caption_dropout=2", r"stages\.1\.data: caption_dropout must be in \[0, 1\]"),
    ("stages.1.data.kind=images", r"stages\.1\.data: data kind 'images' needs paths|needs 'paths'"),
    ("stages.0.data.batching=mixed", "synthetic batches are uniform"),
    ("trainable=[layers/(]", r"trainable: 'layers/\(' is not a regular expression"),
    ("samples.every=5", r"samples: every=5 needs fn"),
    ("samples.fn=nocolon", "fn must be 'module:function'"),
    ("init=", "init is empty: give a checkpoint to start from"),
    ("objective.aux_loss_weight=-1", r"objective\.aux_loss_weight must be a finite number >= 0, got -1"),
    ("objective.aux_loss_weight=nan", r"objective\.aux_loss_weight must be a finite number >= 0, got nan"),
    ("model_overrides=[1]", "model_overrides: expected a mapping"),
    ("optimizer.min_lr_ratio=0.1", "min_lr_ratio is the floor of the cosine schedule"),
    # values that would train the wrong way, or fail only once the run has started
    ("stages.0.lr=-1", r"stage 'low_res': lr must be finite and >= 0, got -1"),
    ("optimizer.lr=nan", "lr and warmup_steps must be finite"),
    ("optimizer.clip_norm=-1", r"clip_norm must be >= 0 \(0 or null: no clipping\), got -1"),
    ("optimizer.b1=1.5", r"b1 and b2 must be in \[0, 1\)"),
    ("optimizer.eps=0", "eps must be > 0"),
    ("stages.0.resolution=0", "resolution 0 is not a positive multiple of 16"),
    ("stages.0.time_shift_mu=inf", "time_shift_mu must be a finite number"),
    ("stages.0.data.num_samples=0", r"num_samples and cap_len \(synthetic data\) must be >= 1"),
    ("stages.0.data.cap_len=0", r"num_samples and cap_len \(synthetic data\) must be >= 1"),
    ("scan_layers=false", "scan_layers: false is not supported for training"),  # crashed at the first trace
])  # fmt: skip
def test_out_of_range_settings_are_errors_at_load_time(override, message):
    from lumina_jax.train.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config("tiny_synthetic", [override])


def test_config_values_read_as_written(tmp_path, caplog):
    """YAML anchors shared by stages are copied before overrides (an override of one stage changed all
    of them); numbers follow YAML 1.2 in files and overrides (``1e-3`` a float, ``0100`` one hundred, not
    octal 64); a number given for a text field is that text; sample grids need one seed per prompt."""
    from lumina_jax.train.config import load_config

    cfg = load_config("shapes", ["stages.0.data.read_threads=7", "stages.2.data.paths=[/data/tune]"])
    assert [s.data.read_threads for s in cfg.stages][1:] == [cfg.stages[1].data.read_threads] * 2
    assert cfg.stages[0].data.read_threads == 7 and cfg.stages[1].data.read_threads != 7
    assert cfg.stages[2].data.paths == ("/data/tune",) and cfg.stages[0].data.paths != ("/data/tune",)
    text = (Path(__file__).resolve().parent.parent / "configs" / "train" / "tiny_synthetic.yaml").read_text()
    f = tmp_path / "t.yaml"
    assert "  lr: 1.0e-3\n" in text
    f.write_text(text.replace("  lr: 1.0e-3\n", "  lr: 3e-3\n"))  # YAML 1.1: the string '3e-3'
    assert load_config(f).optimizer.lr == 3e-3
    f.write_text(text.replace("  lr: 1.0e-3\n", "  lr: 1.0e-3\n  warmup_steps: 1_0\n").replace("  warmup_steps: 0\n", ""))
    assert load_config(f).optimizer.warmup_steps == 10  # digit separators, as YAML 1.1 reads them
    cfg = load_config("tiny_synthetic", ["checkpoint.every=0100", "run_dir=2024_01_05", "stages.0.lr=2e-4",
                                         "stages.0.name=007", "seed=0x10"])  # fmt: skip
    assert (cfg.checkpoint.every, cfg.run_dir, cfg.stages[0].lr) == (100, "2024_01_05", 2e-4)
    assert (cfg.stages[0].name, cfg.seed) == ("007", 16)  # a text field takes the text as typed
    assert type(cfg.checkpoint.every) is int and "every: 100" in yaml.safe_dump(cfg.to_dict())
    with pytest.raises(ValueError, match="3 prompts but 2 seeds"):
        load_config("tiny_synthetic", ["samples.every=5", "samples.fn=m:f", "samples.prompts=[a, b, c]"])
    with caplog.at_level("WARNING"):
        load_config("tiny_synthetic", ["optimizer.warmup_steps=10"])  # stages of 10 steps: the peak at the last
    assert "warms up again" not in caplog.text
    with caplog.at_level("WARNING"):
        load_config("tiny_synthetic", ["optimizer.warmup_steps=11"])
    assert "warms up again at every stage" in caplog.text
    with pytest.raises(ValueError, match="samples.prompts is empty"):
        load_config("tiny_synthetic", ["samples.every=5", "samples.fn=m:f", "samples.prompts=[]", "samples.seeds=[]"])


def test_an_empty_lora_block_is_refused_not_read_as_no_lora(tmp_path):
    """``lora:`` with its lines commented out reads as null: silently a full fine-tune of every weight."""
    from lumina_jax.train.config import load_config

    text = (Path(__file__).resolve().parents[1] / "configs" / "train" / "lumina2_2b_lora.yaml").read_text()
    empty = tmp_path / "l.yaml"
    empty.write_text(text.replace("  rank: 16", "  # rank: 16").replace("  alpha: 16 ", "  # alpha: 16 "))
    with pytest.raises(ValueError, match=r"'lora:' is empty; write 'lora: \{\}' for a LoRA run with the default"):
        load_config(empty)
    assert load_config(empty, ["lora=null"]).lora is None  # explicitly off
    assert load_config(empty, ["lora={}"]).lora is not None
    assert load_config(tmp_path / "l.yaml", ["lora.rank=4"]).lora.rank == 4
    # an explicit null is "no LoRA", as the configs the project writes say it (--print-config, config.yaml)
    import yaml

    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(load_config("tiny_synthetic", [f"run_dir={tmp_path}"]).to_dict()))
    assert "lora: null" in dumped.read_text() and load_config(dumped).lora is None
    assert load_config("tiny_synthetic", ["optimizer.clip_norm=0"]).optimizer.clip_norm == 0  # 0: no clipping


def test_data_section_checks_quoted_numbers_and_empty_mappings():
    from lumina_jax.train.config import DataConfig, load_config

    with pytest.raises(ValueError, match="needs 'vae' and 'text_encoder'"):
        DataConfig(kind="images", paths=("a.jsonl",))
    with pytest.raises(ValueError, match="bucket_plan 'global' plans bucket batches"):
        DataConfig(kind="latent_cache", paths=("c",), batching="mixed", bucket_plan="global")
    with pytest.raises(ValueError, match="one number > 0 per path: 2 paths"):
        DataConfig(kind="latent_cache", paths=("c", "d"), weights=(1.0,))
    assert load_config("tiny_synthetic", ['run_dir="2024"', "log.every=7"]).run_dir == "2024"  # quoted: a string
    with pytest.raises(ValueError, match="log.every: expected int, got str '7'"):
        load_config("tiny_synthetic", ["log.every='7'"])
    assert load_config("tiny_synthetic", ["model_overrides=null"]).model_overrides == {}  # an empty YAML block


def test_unknown_model_override_is_a_clear_error():
    from lumina_jax.train.config import load_config

    with pytest.raises(ValueError, match=r"unknown model_overrides key\(s\) \['bogus'\]"):
        load_config("tiny_synthetic", ["model_overrides.bogus=1"])  # when the config is read, not at the run


def test_recipe_config_matches_spec():
    from lumina_jax.train.config import load_config

    cfg = load_config("lumina2_2b")
    assert [(s.resolution, s.steps, s.batch, s.lr) for s in cfg.stages] == [
        (256, 144_000, 1024, 2e-4), (1024, 40_000, 512, 2e-4), (1024, 15_000, 512, 2e-4)]  # fmt: skip
    o = cfg.optimizer
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm) == (0.9, 0.95, 1e-15, 0.0, 2.0)
    assert cfg.ema_decay == 0.95 and cfg.objective.t_sampling == "lognorm"
    import types

    from lumina_jax.train.loop import Trainer

    # the auxiliary loss on the 4x-pooled latent: the 256-px equivalent of 1024-px stages only (spec §6.2)
    weights = [Trainer.aux_weight(types.SimpleNamespace(cfg=cfg), i) for i in range(3)]
    assert weights == [0.0, 1.0, 1.0] and cfg.objective.aux_pool == 4


def test_cli_rejects_unknown_key(capsys):
    from lumina_jax.train.cli import main

    assert main(["tiny_synthetic", "optimizer.nope=1"]) == 2
    assert "optimizer.nope" in capsys.readouterr().err
    assert main(["tiny_synthetic", "--print-config", "seed=7"]) == 0
    assert "seed: 7" in capsys.readouterr().out


def test_cli_refuses_names_and_yaml_it_cannot_use_before_the_run(capsys, tmp_path):
    from lumina_jax.train.cli import main

    for override, want in [("attention=flsh", "unknown attention backend 'flsh'"),
                           ("remat=sometimes", "unknown remat policy 'sometimes'"),
                           ("model=nextdit_tyny", "no NextDiT config 'nextdit_tyny'"),
                           ("mesh.preset=ddp", "unknown mesh preset 'ddp'"),
                           ("stages.0.data={kind: images", "is not valid YAML")]:  # fmt: skip
        assert main(["tiny_synthetic", "--print-config", override]) == 2, override
        assert want in capsys.readouterr().err, override
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: nextdit_tiny\nstages: [\n")
    assert main([str(bad)]) == 2 and f"{bad}: not valid YAML" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2 and "is a folder; pass a train config YAML" in capsys.readouterr().err
    assert main(["tiny_synthetic", "--print-config", f"model={bad}"]) == 2  # a model YAML too
    assert f"{bad}: not valid YAML" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tiny_synthetic", "--stop-at", "0"])
    assert "must be >= 1" in capsys.readouterr().err


def test_resume_check_refuses_another_state_and_lists_changes():
    import dataclasses

    from lumina_jax.train.config import load_config, load_model_config
    from lumina_jax.train.loop import ResumeMismatchError, check_resume

    cfg = load_config("tiny_synthetic", ["run_dir=/a"])
    meta = {"step": 5, "config": cfg.to_dict(), "model_config": load_model_config(cfg).to_dict()}

    def check(*overrides):
        new = load_config("tiny_synthetic", ["run_dir=/b", *overrides])
        return check_resume(meta, new, load_model_config(new), "/b")

    assert check() == [] and check("log.every=3", "checkpoint.keep=9") == []  # nothing that changes training
    assert check("optimizer.lr=0.05", "stages.0.steps=5") == [("optimizer.lr", cfg.optimizer.lr, 0.05),
                                                             ("stages.0.steps", cfg.stages[0].steps, 5)]  # fmt: skip
    with pytest.raises(ResumeMismatchError, match=r"another model \(step 5; n_layers: 2 -> 3\)"):
        check("model_overrides={n_layers: 3}")
    assert check("model_overrides={n_layers: 2}") == [("model_overrides.n_layers", "<unset>", 2)]  # the same model
    with pytest.raises(ResumeMismatchError, match=r"ema_decay: 0.95 -> None"):
        check("ema_decay=null")
    assert check("ema_decay=0.99") == [("ema_decay", 0.95, 0.99)]  # another decay: the same state layout
    with pytest.raises(ResumeMismatchError, match=r"trainable"):
        check("trainable=[layers]")
    with pytest.raises(ResumeMismatchError, match=r"optimizer.clip_norm: 2.0 -> None"):
        check("optimizer.clip_norm=null")  # clipping off drops a stage of the optimizer state
    assert check("optimizer.clip_norm=1.0") == [("optimizer.clip_norm", 2.0, 1.0)]  # another norm: same layout
    # patterns that select the same params (as the trainer's mask comparison tells) are no change of state
    new = load_config("tiny_synthetic", ["trainable=['.*', layers]"])
    assert check_resume(meta, new, load_model_config(new), "/b", lambda saved: True) == [
        ("trainable.1", "<unset>", "layers")]  # fmt: skip
    # a checkpoint written before a field existed: the field's default is no change
    old = {"step": 5, "config": {k: v for k, v in cfg.to_dict().items() if k != "scan_layers"},
           "model_config": {k: v for k, v in load_model_config(cfg).to_dict().items() if k != "sample_size"}}
    assert check_resume(old, cfg, load_model_config(cfg), "/a") == []
    assert dataclasses.replace(cfg, run_dir="/c").run_dir == "/c"


def test_a_folder_that_is_not_a_run_is_named(tmp_path, monkeypatch):
    from lumina_jax.convert.errors import CheckpointError
    from lumina_jax.train.checkpoint import RunCheckpoints
    from lumina_jax.train.loop import restore_weights

    (tmp_path / "junk" / "checkpoints" / "5").mkdir(parents=True)
    (tmp_path / "junk" / "checkpoints" / "5" / "readme.txt").write_text("x")
    ck = RunCheckpoints(tmp_path / "junk" / "checkpoints", read_only=True)
    with pytest.raises(CheckpointError, match=r"5 has no meta/: .*junk is not a lumina-jax run directory"):
        ck.read_meta(ck.latest_step())
    with pytest.raises(FileNotFoundError, match="has no checkpoints/ folder"):
        restore_weights(tmp_path)
    from lumina_jax.train import loop

    opened = []

    class Spy:
        def __init__(self, directory, **kwargs):
            opened.append(directory)

        def latest_step(self):
            return None

    with monkeypatch.context() as m:  # a remote run_dir reaches orbax as a URL, not a folded local path
        m.setattr(loop.ckpt_lib, "RunCheckpoints", Spy)
        with pytest.raises(FileNotFoundError, match="no checkpoint in gs://bucket/run/checkpoints"):
            restore_weights("gs://bucket/run/")
    assert opened == ["gs://bucket/run/checkpoints"]
    from lumina_jax.convert.nextdit import detect_format

    with pytest.raises(CheckpointError, match=r"is a training run; .*train export"):
        detect_format(tmp_path / "junk")


# ---------------------------------------------------------------------------------------------- checkpoint layout


def test_nested_roundtrip_and_iterator_adapter():
    from lumina_jax.train.checkpoint import JsonStateIterator, from_nested, to_nested
    from lumina_jax.train.data import SyntheticLatents

    tree = {"a": (jnp.ones(2), {"b": jnp.zeros(3)}), "c": [jnp.ones(1)], "empty": ()}
    nested = to_nested(tree)
    assert set(nested) == {"a", "c"} and set(nested["a"]) == {"0", "1"}
    back = from_nested(nested, tree)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    it = SyntheticLatents(latent_hw=(4, 4), channels=2, cap_len=4, cap_dim=3, num_samples=5, global_batch=2)
    next(it)
    ad = JsonStateIterator(it)
    st = ad.get_state()
    b1 = next(it)
    ad.set_state(st)
    b2 = next(it)
    assert b1["ids"] == b2["ids"]
    np.testing.assert_array_equal(b1["latents"], b2["latents"])


def test_restoring_another_state_layout_names_the_subtrees(tmp_path):
    from lumina_jax.train.checkpoint import RunCheckpoints, StateLayoutError

    ck = RunCheckpoints(tmp_path / "ck", async_save=False)
    ck.save(1, {"params": {"w": jnp.ones(3)}, "opt_state": (jnp.zeros(3),)}, {"step": 1})
    ck.wait()
    target = {"params": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)},
              "opt_state": ((), jax.ShapeDtypeStruct((3,), jnp.float32))}  # fmt: skip
    with pytest.raises(StateLayoutError, match=r"step 1 in .* holds another training state layout .*opt_state\.1"):
        ck.restore(1, target)
    ck.close()


def test_a_context_mesh_without_context_attention_is_warned(caplog):
    from lumina_jax.parallel.mesh import warn_context_attention

    with caplog.at_level("WARNING"):
        assert warn_context_attention({"data": 2, "context": 4}, "auto")
        assert not warn_context_attention({"data": 2, "context": 4}, "context_pallas")
        assert not warn_context_attention({"data": 8, "context": 1}, "auto")
    assert caplog.text.count("use attention (attention_backend, --attention) context") == 1
    assert not warn_context_attention({"data": 2, "context": 4}, "splash_sharded")  # context-parallel on TPU


def test_a_tensor_axis_that_does_not_split_the_heads_is_warned(caplog):
    """The 2B's 24 / 8 heads: tensor 2, 4, 8 and 24 (K/V repeated) split them; 3 and 16 leave weights whole."""
    from lumina_jax.parallel.mesh import warn_tensor_heads

    with caplog.at_level("WARNING"):
        assert [warn_tensor_heads({"tensor": t}, 24, 8) for t in (1, 2, 4, 8, 24, 3, 16)] == [False] * 5 + [True] * 2
    assert caplog.text.count("does not split 24 query / 8 key-value heads evenly") == 2


def test_stage_of_a_step_under_the_saved_config():
    from lumina_jax.train.config import load_config
    from lumina_jax.train.loop import _saved_stage_at

    cfg = load_config("tiny_synthetic", ["stages.0.steps=4", "stages.1.steps=4"])
    meta = {"config": cfg.to_dict(), "stage": 0}  # a checkpoint at step 4 records the stage that ended
    assert _saved_stage_at(meta, 4) == (1, cfg.stages[1].name) and _saved_stage_at(meta, 3) == (0, cfg.stages[0].name)
    assert _saved_stage_at(meta, 8) is None and _saved_stage_at({"config": {"nope": 1}}, 4) is None


def test_synthetic_rows_are_a_partition_of_the_global_batch():
    from lumina_jax.train.data import SyntheticLatents

    kw = dict(latent_hw=(4, 4), channels=2, cap_len=4, cap_dim=3, num_samples=7, global_batch=4)
    full = next(SyntheticLatents(**kw))
    halves = [next(SyntheticLatents(rows=r, **kw)) for r in ((0, 2), (2, 4))]
    np.testing.assert_array_equal(np.concatenate([h["latents"] for h in halves]), full["latents"])


# ---------------------------------------------------------------------------------------------- tensorboard + flops


def test_crc32c_and_event_roundtrip(tmp_path):
    from lumina_jax.train.tensorboard import EventWriter, crc32c, read_events

    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    w = EventWriter(tmp_path)
    w.scalar("loss", 0.5, 3)
    w.image("grid", np.zeros((4, 6, 3), np.uint8), 3)
    w.close()
    ev = read_events(w.path)
    assert ev[0]["file_version"] == "brain.Event:2"
    assert ev[1]["step"] == 3 and ev[1]["scalars"] == {"loss": 0.5}
    assert ev[2]["images"]["grid"][:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_and_peaks():
    from lumina_jax.models.nextdit import NextDiTConfig, flops_forward
    from lumina_jax.train import metrics

    assert metrics.peak_tflops("NVIDIA H100 80GB HBM3") == 989 and metrics.peak_tflops("TPU v6 lite") == 918
    assert metrics.peak_tflops("TPU v5 lite") == 197 and metrics.peak_tflops("TPU v5p") == 459
    assert metrics.peak_tflops("TPU v4") == 275 and metrics.peak_tflops("cpu") is None
    assert metrics.peak_tflops("NVIDIA H100 PCIe") == 756 and metrics.peak_tflops("NVIDIA H100 NVL") == 835
    assert metrics.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    c = NextDiTConfig()
    f = metrics.train_flops_per_sample(c, 1024, 256, aux=True)
    assert f["forward"] == flops_forward(c, 256, 4096) and f["aux_forward"] == flops_forward(c, 256, 256)
    assert f["train"] == 3 * (f["forward"] + f["aux_forward"])
    assert 2.0e13 < f["forward"] < 3.0e13  # jax_notes §7: ~2.4e13 per 1024 px image
    # models on pixels (no autoencoder): 64 px, patch 2 -> 32x32 tokens, pooled aux 8x8
    px = metrics.train_flops_per_sample(c, 64, 16, aux=True, downsample=1)
    assert metrics.latent_tokens(c, 64, downsample=1) == 1024 and px["aux_forward"] == flops_forward(c, 16, 64)
    assert metrics.remat_flops_per_sample(c, 1024, 256, "dots") == 0
    # an aspect bucket counts its own tokens; the pooled term crops to the patch (avg_pool) or is absent
    assert metrics.batch_tokens(c, (2, 64, 160, 16)) == (32 * 80, 8 * 20)
    assert metrics.batch_tokens(c, (2, 62, 16, 16)) == (31 * 8, 7 * 2)  # pooled 15x4 -> 14x4 latents
    assert metrics.batch_tokens(c, (2, 56, 4, 16)) == (28 * 2, 0)  # pooled side 1 < patch: no term
    assert metrics.batch_tokens(c, (2, 64, 64, 16), aux=False) == (1024, 0)
    assert metrics.batch_tokens(c, (2, 4096, 64)) == (4096, 256)  # mixed: the packed budget, T / 16 pooled
    with pytest.raises(ValueError, match=r"latents of shape \(2, 8\)"):
        metrics.batch_tokens(c, (2, 8))
    bucket = metrics.train_flops_per_sample_tokens(c, *metrics.batch_tokens(c, (1, 64, 160, 16)), 256)
    assert bucket["forward"] == flops_forward(c, 256, 2560) and bucket["aux_forward"] == flops_forward(c, 256, 160)
    full = metrics.remat_flops_per_sample(c, 1024, 256, "full", aux=False)
    assert full == f["forward"]
    assert 0 < metrics.remat_flops_per_sample(c, 1024, 256, "dots_no_batch", aux=False) < full
    # an attention kernel is not a dot: under "dots" its forward is recomputed; "low_precision" keeps it
    assert metrics.remat_flops_per_sample(c, 1024, 256, "dots", attention_kernel=True) == \
        metrics.remat_flops_per_sample(c, 1024, 256, "dots_no_batch")
    assert metrics.remat_flops_per_sample(c, 1024, 256, "low_precision", attention_kernel=True) == 0


def test_image_source_paths_and_encoder_dtype(tmp_path):
    """``images`` paths: a TFDS folder needs its dataset_info.json, a missing path is named, and the
    frozen encoders' dtype is checked (the TFDS read itself: tests/test_shapes.py end to end)."""
    from lumina_jax.train.config import DataConfig
    from lumina_jax.train.data import image_sources

    (tmp_path / "not_tfds").mkdir()
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        image_sources(str(tmp_path / "not_tfds"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        image_sources(str(tmp_path / "missing.jsonl"))
    (tmp_path / "images-00000.array_record").write_bytes(b"")
    with pytest.raises(ValueError, match="one ArrayRecord shard; give the folder"):
        image_sources(str(tmp_path / "images-00000.array_record"))
    (tmp_path / "a.jsonl").write_text('{"image_path": "x.png", "prompt": "a cat"}\n')
    (src,) = image_sources(str(tmp_path / "a.jsonl"))
    assert len(src) == 1
    # a YAML list is one source, its files concatenated (as the original; they were mixed 1:1 whatever their size)
    (tmp_path / "b.jsonl").write_text('{"image_path": "y.png", "prompt": "a dog"}\n' * 9)
    (tmp_path / "meta.yaml").write_text("META:\n  - path: a.jsonl\n  - path: b.jsonl\n")
    (src,) = image_sources(str(tmp_path / "meta.yaml"))
    assert len(src) == 10 and src.name == "meta"
    with pytest.raises(ValueError, match="encoder_dtype"):
        DataConfig(kind="images", paths=("a.jsonl",), encoder_dtype="float16")
    assert DataConfig(kind="images", paths=("a.jsonl",), vae="v", text_encoder="t").system_prompt == "real"


def test_stage_time_shift_mu_and_t_sampling_override_the_objective(tmp_path):
    from lumina_jax.train.config import load_config
    from lumina_jax.train.loop import Trainer

    cfg = load_config("tiny_synthetic", [f"run_dir={tmp_path}", "log.progress=false", "log.tensorboard=false",
                                         "stages.1.time_shift_mu=1.79", "stages.1.t_sampling=uniform",
                                         "stages.0.aux_loss_weight=0"])  # fmt: skip
    tr = Trainer(cfg)
    assert tr.step_config(0).mu == pytest.approx(obj.shift_mu(obj.seq_len_for_resolution(cfg.stages[0].resolution)))
    assert tr.step_config(1).mu == 1.79
    assert (tr.step_config(0).t_sampling, tr.step_config(1).t_sampling) == ("lognorm", "uniform")
    # a stage's own auxiliary weight (0: no pooled term there, nor its FLOPs), the objective's elsewhere
    assert (tr.step_config(0).aux_loss_weight, tr.step_config(1).aux_loss_weight) == (0.0, cfg.objective.aux_loss_weight)
    with pytest.raises(ValueError, match="aux_loss_weight must be a finite number >= 0"):
        load_config("tiny_synthetic", ["stages.0.aux_loss_weight=-1"])
    with pytest.raises(ValueError, match="stage 'low_res'.*unknown t_sampling 'beta'"):
        load_config("tiny_synthetic", ["stages.0.t_sampling=beta"])
    tr.metrics.close()
    off = Trainer(load_config("tiny_synthetic", [f"run_dir={tmp_path / 'b'}", "log.progress=false",
                                                 "objective.time_shift=false", "stages.1.time_shift_mu=1.79"]))  # fmt: skip
    assert off.step_config(1).mu is None  # time_shift off wins
    assert tr.flops(0, 16)[0] < off.flops(0, 16)[0]  # stage 0 without its auxiliary term: fewer FLOPs counted
    off.metrics.close()



@pytest.mark.parametrize("a", [1, 2, 4])
def test_grad_accumulation_is_the_exact_batch_mean_with_padding_rows(a):
    """Bucket batches carry padding rows (``valid`` False), unevenly spread over the micro-batches
    (rows j, j+A, ...). The step's loss is still the mean of the per-sample losses over the valid rows
    of the whole batch (spec §6.2), not a mean of per-micro-batch means."""
    from lumina_jax.train import objective as obj

    rng = np.random.default_rng(1)
    scale = np.arange(1, 9, dtype=np.float32)[:, None, None, None] ** 2  # very different per-row losses
    batch = {"latents": rng.standard_normal((8, 8, 8, 4)).astype(np.float32) * scale,
             "cap_feats": rng.standard_normal((8, 3, 5)).astype(np.float32), "cap_mask": np.ones((8, 3), bool),
             "valid": np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)}  # fmt: skip
    step, state, _, hp, _ = _stub_setup(grad_accum=a, batch=batch)
    _, m = step(state, batch, hp)
    # the same draws, reduced by hand: micro-batch i = rows i::a, keys fold_in(fold_in(seed, step), i)
    model, total = StubDiT(), 0.0
    for i in range(a):
        mb = {k: v[i::a] for k, v in batch.items()}
        k_main, k_aux = jax.random.split(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 0), i))
        apply = lambda x, t, mb=mb: model.apply({"params": state.params}, x, t, mb["cap_feats"], mb["cap_mask"])  # noqa: E731
        per = obj.flow_loss(apply, jnp.asarray(mb["latents"]), k_main, t_sampling="lognorm", mu=0.5)
        per = per + obj.flow_loss(apply, obj.avg_pool(jnp.asarray(mb["latents"]), 4), k_aux, t_sampling="lognorm", mu=0.5)
        total += float(np.sum(np.asarray(per) * mb["valid"]))
    np.testing.assert_allclose(float(m["loss"]), total / 5, rtol=1e-5)
    # whatever the padding rows hold (a NaN) reaches neither the loss nor the gradient
    poisoned = {**batch, "latents": batch["latents"].copy(), "cap_feats": batch["cap_feats"].copy()}
    poisoned["latents"][5:] = np.nan
    poisoned["cap_feats"][5:] = np.nan
    _, m2 = step(state, poisoned, hp)
    assert bool(m2["finite"]) and float(m2["grad_norm"]) == float(m["grad_norm"])
    assert float(m2["loss"]) == float(m["loss"])


def test_aux_loss_crops_odd_pooled_sides_to_the_patch_size():
    """A 496x128 px bucket has 62x16 latents, pooled by 4 to 15x4: one pooled row is cropped so the
    patch-2 model can embed it (the original's crop sizes never produce an odd pooled side)."""
    from lumina_jax.train import objective as obj

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 62, 16, 3)), jnp.float32)
    full = obj.avg_pool(x, 4)
    assert full.shape == (2, 15, 4, 3)
    cropped = obj.avg_pool(x, 4, multiple=2)
    assert cropped.shape == (2, 14, 4, 3)
    np.testing.assert_array_equal(cropped, full[:, :14])  # remainder 1: the last pooled row goes
    np.testing.assert_array_equal(obj.avg_pool(x[:, :56], 4, multiple=2), obj.avg_pool(x[:, :56], 4))
    assert obj.avg_pool(jnp.zeros((1, 4 * 7, 4 * 9, 1)), 4, multiple=4).shape == (1, 4, 8, 1)
    with pytest.raises(ValueError, match="smaller than the patch size 2"):
        obj.avg_pool(jnp.zeros((1, 4, 16, 1)), 4, multiple=2)


def test_multi_host_data_must_have_one_shape_on_every_host():
    """Hosts reading different rows must build equal shapes: per-host buckets and free caption padding of
    mixed batches are refused up front (they would trace different programs per host); bucket batches of
    latent caches and raw images (global plan) and mixed + text_len are accepted. Mixed batches of raw
    images are refused on any host count, when the config loads."""
    from lumina_jax.train.config import DataConfig, StageConfig
    from lumina_jax.train.data import check_same_shapes_on_every_host

    def stage(**kw):
        paths = () if kw.get("kind") == "synthetic" else ("/data/x",)
        extra = dict(vae="v", text_encoder="t") if kw.get("kind") == "images" else {}
        return StageConfig(name="s", data=DataConfig(paths=paths, **extra, **kw))

    for one_host in (stage(kind="latent_cache"), stage(kind="images"), stage(kind="latent_cache", bucket_plan="host")):
        check_same_shapes_on_every_host(one_host, 1)
    check_same_shapes_on_every_host(stage(kind="synthetic"), 4)
    check_same_shapes_on_every_host(stage(kind="latent_cache", batching="mixed", text_len=256), 4)
    check_same_shapes_on_every_host(stage(kind="latent_cache"), 4)
    check_same_shapes_on_every_host(stage(kind="latent_cache", bucket_plan="global"), 4)
    check_same_shapes_on_every_host(stage(kind="images"), 4)  # global plan over the image size index
    with pytest.raises(ValueError, match=r"`bucket_plan: host` picks each host's image size"):
        check_same_shapes_on_every_host(stage(kind="images", bucket_plan="host"), 2)
    with pytest.raises(ValueError, match=r"`bucket_plan: host` picks each host's image size.*bucket_plan: auto"):
        check_same_shapes_on_every_host(stage(kind="latent_cache", bucket_plan="host"), 2)
    with pytest.raises(ValueError, match="without `text_len`"):
        check_same_shapes_on_every_host(stage(kind="latent_cache", batching="mixed"), 2)
    with pytest.raises(ValueError, match="raw-image training encodes bucket batches.*encode offline"):
        stage(kind="images", batching="mixed", text_len=256)  # on any number of hosts: refused when loaded
    with pytest.raises(ValueError, match="bucket_plan must be"):
        stage(kind="latent_cache", bucket_plan="everyone")


def test_stage_data_skip_limit_reaches_the_pipeline_under_its_config_key(monkeypatch):
    """``stages.N.data.max_consecutive_skips`` is passed to the data pipeline, whose error names that key."""
    import lumina_jax.data as data_pkg
    from lumina_jax.parallel.mesh import create_mesh
    from lumina_jax.train.config import load_config, load_model_config
    from lumina_jax.train.data import build_stage_iterator

    seen = {}

    class Stop(Exception):
        pass

    def capture(**kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(data_pkg, "PipelineConfig", capture)
    cfg = load_config("tiny_synthetic", ["stages.1.data.kind=latent_cache", "stages.1.data.paths=[/nowhere]",
                                         "stages.1.data.max_consecutive_skips=7"])  # fmt: skip
    mesh = create_mesh({"data": 1}, devices=jax.devices()[:1])
    with pytest.raises(Stop):
        build_stage_iterator(cfg.stages[1], model_config=load_model_config(cfg), mesh=mesh, seed=0, stage_index=1)
    assert seen["max_consecutive_skips"] == 7
    assert seen["max_consecutive_skips_option"] == "stages.1.data.max_consecutive_skips"


POOL_SIZES = [(16, 16), (8, 32), (12, 20), (20, 12), (62, 16), (4, 4), (2, 30)]  # latent sides; last two too small


def test_pool_tokens_is_avg_pool_in_token_space():
    """Token-packed pooling == patchify(avg_pool(latent)) per sample (odd pooled sides centre-cropped as
    avg_pool does), zeros past each pooled grid; samples too small to pool to one patch get grid (0, 0)."""
    from lumina_jax.data.batching import patchify

    p, f, c, t = 2, 4, 3, 256
    rng = np.random.default_rng(0)
    lats = [rng.standard_normal((h, w, c)).astype(np.float32) for h, w in POOL_SIZES]
    tokens = np.zeros((len(lats), t, p * p * c), np.float32)
    for i, lat in enumerate(lats):
        tk = patchify(lat, p)
        tokens[i, : len(tk)] = tk
    grid = np.asarray([[h // p, w // p] for h, w in POOL_SIZES], np.int32)
    pooled, grid2 = jax.jit(obj.pool_tokens, static_argnums=(2, 3))(tokens, grid, f, p)
    pooled, grid2 = np.asarray(pooled), np.asarray(grid2)
    assert pooled.shape == (len(lats), t // 16, p * p * c)
    for i, lat in enumerate(lats):
        if min(lat.shape[:2]) // f < p:
            assert tuple(grid2[i]) == (0, 0) and not pooled[i].any()
            continue
        want = np.asarray(obj.avg_pool(jnp.asarray(lat[None]), f, multiple=p))[0]
        assert tuple(grid2[i]) == (want.shape[0] // p, want.shape[1] // p)
        want_tokens = patchify(want, p)
        np.testing.assert_allclose(pooled[i, : len(want_tokens)], want_tokens, atol=1e-6)
        assert not pooled[i, len(want_tokens):].any()


def _tiny_dit():
    from lumina_jax.models.nextdit import NextDiT, NextDiTConfig

    cfg = NextDiTConfig(patch_size=2, in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=1,
                        multiple_of=16, cap_feat_dim=8, axes_dims=(4, 6, 6), axes_lens=(64, 64, 64))  # fmt: skip
    return NextDiT(cfg)


def test_mixed_batch_loss_equals_the_dense_loss_including_the_aux_term(monkeypatch):
    """A one-size batch as packed tokens (mixed) and as dense latents gives the same main and auxiliary
    losses and gradients when both draw the same noise (served in each layout), with the real Next-DiT:
    the token path, its masks and pool_tokens agree with the dense step. The mixed batch also carries a
    padding row too small to pool (latent 2x16 -> pooled grid (0, 0)): it must add nothing, NaN included."""
    from lumina_jax.data.batching import patchify
    from lumina_jax.train.step import StepConfig, make_loss_fn

    model = _tiny_dit()
    rng = np.random.default_rng(1)
    b, h, w, c = 2, 16, 24, 4  # latents; pooled 4x6, aux tokens 2x3
    n_tok = (h // 2) * (w // 2)
    budget = n_tok + 16  # padding tokens past each sample
    lat = rng.standard_normal((b, h, w, c)).astype(np.float32)
    cap = rng.standard_normal((b + 1, 5, 8)).astype(np.float32)
    cmask = np.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    tokens = rng.standard_normal((b + 1, budget, 2 * 2 * c)).astype(np.float32)  # row 2: a 16x128 px sample
    tokens[:b] = 0
    for i in range(b):
        tokens[i, :n_tok] = patchify(lat[i], 2)
    dense = {"latents": lat, "cap_feats": cap[:b], "cap_mask": cmask[:b], "valid": np.ones(b, bool)}
    sizes = np.asarray([[h * 8, w * 8]] * b + [[16, 128]], np.int32)
    mixed = {"latents": tokens, "cap_feats": cap, "cap_mask": cmask, "valid": np.asarray([True, True, False]),
             "token_mask": np.arange(budget)[None] < np.asarray([[n_tok], [n_tok], [8]]), "image_sizes": sizes}  # fmt: skip
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(lat), jnp.zeros(b), cap[:b], cmask[:b])["params"]

    noise = {}
    for side_h, side_w, t in ((h, w, budget), (h // 4, w // 4, budget // 16)):
        z = rng.standard_normal((b, side_h, side_w, c)).astype(np.float32)
        noise[(b, side_h, side_w, c)] = z
        zt = rng.standard_normal((b + 1, t, 2 * 2 * c)).astype(np.float32)
        zt[:b, : (side_h // 2) * (side_w // 2)] = np.stack([patchify(z[i], 2) for i in range(b)])
        noise[(b + 1, t, 2 * 2 * c)] = zt
    real_normal = jax.random.normal

    def normal(key, shape=(), dtype=jnp.float32):
        shape = tuple(shape)
        if shape == (b + 1,):  # the mixed batch's t draw: the dense batch's values plus one for the extra row
            return jnp.concatenate([real_normal(key, (b,), dtype), jnp.zeros((1,), dtype)])
        return jnp.asarray(noise[shape], dtype) if shape in noise else real_normal(key, shape, dtype)

    monkeypatch.setattr(jax.random, "normal", normal)
    out = {}
    for name, batch, is_mixed in (("dense", dense, False), ("mixed", mixed, True)):
        loss_fn = make_loss_fn(model, StepConfig(seed=0, mu=0.5, aux_loss_weight=1.0, aux_pool=4, mixed=is_mixed))
        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        (loss, (main, aux)), g = grad_fn(params, batch, jax.random.PRNGKey(3), 2.0)
        out[name] = (float(main), float(aux), g)
    assert out["dense"][1] > 0
    np.testing.assert_allclose(out["mixed"][:2], out["dense"][:2], rtol=2e-5)
    for x, y in zip(jax.tree.leaves(out["mixed"][2]), jax.tree.leaves(out["dense"][2])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-6)


def test_samples_too_small_to_pool_have_no_aux_term_and_are_not_counted():
    """Crop sides under 64 px pool (factor 4, patch 2) to less than a token: a dense batch of them has an
    auxiliary loss of 0 (its avg_pool raised while tracing: a run died when such a bucket came up), and
    in a mixed batch a valid one is left out of the auxiliary mean's denominator (it diluted it)."""
    from lumina_jax.train.step import StepConfig, aux_rows, make_loss_fn

    model = _tiny_dit()
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, 4, 16, 4)).astype(np.float32)  # 32 x 128 px crops
    cap = rng.standard_normal((2, 5, 8)).astype(np.float32)
    cmask = np.ones((2, 5), bool)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(lat), jnp.zeros(2), cap, cmask)["params"]
    loss_fn = make_loss_fn(model, StepConfig(seed=0, mu=0.5, aux_loss_weight=1.0, aux_pool=4))
    loss, (main, aux) = jax.jit(loss_fn)(params, {"latents": lat, "cap_feats": cap, "cap_mask": cmask}, jax.random.PRNGKey(1), 2.0)
    assert float(aux) == 0.0 and float(loss) == float(main) > 0
    cfg = StepConfig(seed=0, aux_loss_weight=1.0, aux_pool=4, mixed=True)
    sizes = np.asarray([[64, 64], [32, 128], [128, 64], [64, 64]], np.int32)  # row 1 too small, row 3 padding
    batch = {"image_sizes": sizes, "valid": np.asarray([True, True, True, False])}
    assert float(aux_rows(batch, cfg, 2, 3.0)) == 2.0
    assert aux_rows(batch, StepConfig(seed=0, aux_loss_weight=1.0), 2, 3.0) == 3.0  # dense: all or none


def test_cli_logging_shows_info_lines_once_after_a_library_configured_the_root_logger(capsys):
    import logging

    from lumina_jax import log_setup

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    bare = logging.StreamHandler(sys.stderr)  # what a library's basicConfig() leaves (the trainer's imports do)
    root.addHandler(bare)
    try:
        log_setup.setup(logging.INFO)
        log_setup.setup(logging.INFO)  # again (a second in-process CLI call): still one line per record
        logging.getLogger("lumina_jax.train").info("resuming from here")
        err = capsys.readouterr().err
        assert err.count("resuming from here") == 1 and "INFO lumina_jax.train: resuming from here" in err
        kept = [h for h in saved[0] if type(h).__name__ != "_StderrHandler"]  # pytest's own
        assert bare not in root.handlers and all(h in root.handlers for h in kept)
    finally:
        for h in list(root.handlers):
            if h not in saved[0]:
                root.removeHandler(h)
        root.setLevel(saved[1])


def test_raw_image_training_says_once_that_captions_are_cut_and_counts_them(caplog):
    from lumina_jax.train.data import FrozenEncoders

    class Text:  # cuts captions 0 and 2 of each call, as TextEncoder.encode(on_truncate="quiet") reports
        last_truncated, last_truncated_rows = 0, ()

        def encode(self, prompts, system_prompt, max_length, on_truncate):
            assert on_truncate == "quiet"
            self.last_truncated, self.last_truncated_rows = 2, (0, 2)
            return np.zeros((len(prompts), max_length, 4), np.float32), np.ones((len(prompts), max_length), bool)

    enc = object.__new__(FrozenEncoders)
    enc.text, enc.vae_params, enc.max_text_len, enc.fixed_text_len, enc.truncated = Text(), None, 8, False, 0
    enc._encode = lambda params, images: np.zeros((len(images), 2, 2, 16), np.float32)
    batch = {"images": np.zeros((3, 16, 16, 3), np.float32), "prompts": ["a", "b", "c"]}
    with caplog.at_level("WARNING", logger="lumina_jax.train.data"):
        for _ in range(3):
            out = enc(dict(batch))
    assert out["cap_feats"].shape == (3, 8, 4) and enc.truncated == 6
    assert caplog.text.count("captions longer than max_text_len=8 tokens are truncated") == 1
    enc(dict(batch, valid=np.array([True, True, False])))  # row 2 is padding (a copy): not counted
    assert enc.last_truncated == 1 and enc.truncated == 7


def test_data_counters_count_each_shard_once(monkeypatch):
    """Processes feeding the same rows (a tensor axis across hosts: 4 processes, 2 shards) read the same
    samples: the logged counters sum one process per shard, not every copy."""
    from jax.experimental import multihost_utils

    from lumina_jax.train.data import DATA_COUNTERS, data_counters

    shards = [0, 0, 1, 1]
    per_process = [np.array([10, 1, 0, 2, 0]), np.array([10, 1, 0, 2, 0]), np.array([7, 0, 1, 0, 3]),
                   np.array([7, 0, 1, 0, 3])]  # fmt: skip
    others = np.stack([np.concatenate([[s], c]) for s, c in zip(shards[1:], per_process[1:])])
    monkeypatch.setattr(jax, "process_count", lambda: 4)  # this is process 0; the others' rows are fixed
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.concatenate([np.asarray(x)[None], others]))
    assert len(DATA_COUNTERS) == 5
    assert data_counters(per_process[0], shards[0]) == {"data/samples": 17, "data/skipped": 1, "data/padded_rows": 1,
                                                         "data/captions_dropped": 2, "data/captions_truncated": 3}
    assert data_counters(per_process[0], 7)["data/samples"] == 27  # a shard of its own: counted on its own


def test_data_counters_count_truncated_captions_in_the_saved_data_state():
    """The encoders' cuts land in the pipeline iterator's DataStats (saved with the data state), and
    the training metrics report them with the other data counters."""
    from lumina_jax.data.stats import DataStats
    from lumina_jax.train.data import EncodedIterator, data_counters, local_data_counts

    class Inner:  # a pipeline iterator: batches and DataStats
        stats = DataStats(samples=5, padded_rows=1, captions_dropped=2, skipped={"a": {"undecodable": 3}})

        def __next__(self):
            return {"prompts": ["x"]}

    class Encoders:
        last_truncated = 2

        def __call__(self, batch):
            return batch

    it = EncodedIterator(Inner(), Encoders())
    next(it), next(it)
    assert it.stats.captions_truncated == 4
    assert DataStats.from_dict(it.stats.to_dict()).captions_truncated == 4  # restored with the data state
    assert DataStats.from_dict({"samples": 1}).captions_truncated == 0  # a state saved before the field
    assert data_counters(local_data_counts(it)) == {
        "data/samples": 5, "data/skipped": 3, "data/padded_rows": 1, "data/captions_dropped": 2,
        "data/captions_truncated": 4}  # fmt: skip
    assert local_data_counts(iter([])) is None and data_counters(None) == {}  # synthetic data: no counters
    from lumina_jax.train.metrics import format_line

    line = format_line(3, 10, {"loss": 0.5, "data/skipped": 3, "data/captions_truncated": 0})
    assert "skipped 3" in line and "captions_truncated" not in line


def test_init_checkpoint_fields_that_change_no_shape_are_checked_against_the_run(tmp_path):
    """A diffusers init whose norm_eps / RoPE table differ from the run's model config passes every key and shape
    check; the fields the checkpoint records are compared instead (the original's eps is not among them)."""
    import jax

    from lumina_jax.convert.nextdit import save_transformer
    from lumina_jax.models.nextdit import init_params
    from lumina_jax.parallel.mesh import create_mesh
    from lumina_jax.train.config import load_config, load_model_config
    from lumina_jax.train.loop import initial_params

    cfg = load_config("tiny_synthetic", [])
    mc = load_model_config(cfg)
    mesh = create_mesh({"data": 1}, devices=jax.devices()[:1])
    params = init_params(mc, 0)
    save_transformer(tmp_path / "same", mc, params, "diffusers")
    save_transformer(tmp_path / "other", mc.replace(norm_eps=1e-3), params, "diffusers")
    run = lambda p: initial_params(load_config("tiny_synthetic", [f"init={p}"]), mc, mesh)  # noqa: E731
    got = run(tmp_path / "same")
    np.testing.assert_array_equal(np.asarray(got["x_embedder"]["kernel"]), np.asarray(params["x_embedder"]["kernel"]))
    with pytest.raises(ValueError, match=r"records norm_eps=0\.001 where the run's model config has 1e-0?5"):
        run(tmp_path / "other")
    # ... but not the fields the model never reads (diffusers' default size and scaling factor)
    save_transformer(tmp_path / "meta", mc.replace(sample_size=16, scaling_factor=0.5), params, "diffusers")
    np.testing.assert_array_equal(np.asarray(run(tmp_path / "meta")["x_embedder"]["kernel"]),
                                  np.asarray(params["x_embedder"]["kernel"]))  # fmt: skip


def test_a_mixed_batch_crop_past_the_rope_table_is_an_error_not_a_clamp(tmp_path):
    """forward_tokens cannot check traced grid sizes (positions past the table would reuse its last rows):
    the trainer checks each mixed batch's sizes on the host; pack_latents checks when given the table."""
    from test_train_loop import make_cfg

    from lumina_jax.models.nextdit import pack_latents
    from lumina_jax.train.loop import Trainer

    tr = Trainer(make_cfg(tmp_path))
    mc = tr.model_config
    too_wide = np.array([[16, 16 * (mc.axes_lens[2] + 1)]], np.int32)  # px: 16 px per patch (VAE 8 x patch 2)
    with pytest.raises(ValueError, match=r"crop exceeds the model's RoPE table"):
        tr._next_global(iter([{"image_sizes": too_wide, "token_mask": np.ones((1, 4), bool)}]), tr.cfg.stages[0], 0)
    with pytest.raises(ValueError, match=r"crop sizes \[\(24, 16\)\] are not multiples of 16 px"):
        tr._next_global(iter([{"image_sizes": np.array([[16, 16], [24, 16]], np.int32),
                                "token_mask": np.ones((2, 4), bool)}]), tr.cfg.stages[0], 0)
    with pytest.raises(ValueError, match="exceeds the RoPE table"):
        pack_latents([np.zeros((2, 2 * (mc.axes_lens[2] + 1), 4))], 2, max_grid=tuple(mc.axes_lens[1:]))


def test_a_new_bucket_shape_mid_stage_is_left_out_of_the_throughput(tmp_path, monkeypatch):
    """A bucket shape first seen mid-stage compiles when it is dispatched: the metrics interval holding
    that compile is not a step's time (images/s and MFU would drop for it), nor the checkpoint save."""
    from lumina_jax.train import loop
    from lumina_jax.train.config import load_config
    from lumina_jax.train.loop import Trainer

    plain = loop.build_stage_iterator

    def two_shapes(stage, **kw):
        it, ck = plain(stage, **kw)

        def gen():
            for i, b in enumerate(it):  # steps 3 and 4: twice as wide
                yield dict(b, latents=np.concatenate([b["latents"]] * 2, axis=2)) if i >= 2 else b

        return gen(), ck

    monkeypatch.setattr(loop, "build_stage_iterator", two_shapes)
    skipped = []
    report = Trainer._report

    def spy(self, step, *a, **k):
        skipped.append((step, self._skip_interval))
        return report(self, step, *a, **k)

    monkeypatch.setattr(Trainer, "_report", spy)
    cfg = load_config("tiny_synthetic", [f"run_dir={tmp_path}", "log.progress=false", "stages.0.steps=4",
                                         "stages.1.steps=1", "checkpoint.every=0"])  # fmt: skip
    Trainer(cfg, stop_at=4).run()
    # step 3's compile happens while step 2's metrics are awaited: that interval is the one left out
    assert skipped[:4] == [(1, False), (2, True), (3, False), (4, False)], skipped


def test_a_later_stages_missing_data_is_named_when_the_run_starts(tmp_path, caplog):
    """Stage data opens when its stage starts (possibly days into a run): a path that is not there is
    said at the start."""
    from lumina_jax.train.config import load_config
    from lumina_jax.train.loop import Trainer

    cfg = load_config("tiny_synthetic", [f"run_dir={tmp_path}", "log.progress=false", "stages.1.data.kind=latent_cache",
                                         "stages.1.data.paths=[/nowhere/cache_128]"])  # fmt: skip
    with caplog.at_level("WARNING", logger="lumina_jax.train"):
        Trainer(cfg).metrics.close()
    assert f"data paths not found on this host (a stage without its data stops the run when it starts): " \
           f"{cfg.stages[1].name}: /nowhere/cache_128" in caplog.text  # fmt: skip


def test_bundled_model_fine_tune_config_and_the_jsonl_system_prompt_warning(tmp_path, caplog):
    """``configs/train/shapes_finetune.yaml`` fits the bundled model (its transformer config, its encoders);
    a JSONL file whose lines carry no ``system_prompt`` while the stage sets one is warned about (its lines
    would get the original's "base" template and be cut by max_text_len), one whose lines do is not."""
    import json

    from lumina_jax.convert.nextdit import load_transformer_config
    from lumina_jax.train.config import load_config, load_model_config
    from lumina_jax.train.loop import Trainer

    root = Path(__file__).resolve().parents[1]
    cfg = load_config("shapes_finetune")
    assert load_model_config(cfg) == load_transformer_config(root / cfg.init)
    data = cfg.stages[0].data
    assert data.system_prompt == "empty" and (root / data.vae).is_dir() and data.tokenizer is None
    for with_key, warned in ((False, True), (True, False)):
        jsonl = tmp_path / f"d{with_key}.jsonl"
        line = {"path": "a.png", "prompt": "a red circle", **({"system_prompt": "empty"} if with_key else {})}
        jsonl.write_text(json.dumps(line) + "\n")
        run = load_config("tiny_synthetic", [f"run_dir={tmp_path}/r{with_key}", "log.progress=false",
                                             "stages.1.data={kind: images, paths: [" + str(jsonl) + "], vae: v, "
                                             "text_encoder: t, system_prompt: empty}"])  # fmt: skip
        caplog.clear()
        with caplog.at_level("WARNING", logger="lumina_jax.train"):
            Trainer(run).metrics.close()
        assert ("data.system_prompt does not apply to JSONL/YAML sources" in caplog.text) == warned, caplog.text
