"""End-to-end training on CPU with the tiny Next-DiT and synthetic latents (one compiled program,
shared by every test here through the trainer's step cache).

* the loss goes down;
* overfitting a handful of latents reconstructs them with an Euler ODE sampler (numeric threshold);
* exact resume: N steps straight == N/2, stop, resume -> bit-identical state, the same data order and
  the same metrics.jsonl, with the stop before and after a stage boundary;
* metrics.jsonl / TensorBoard events are written with throughput fields;
* EMA / raw-weight export through ``save_transformer`` loads back.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest

from lumina_jax.train.config import load_config

BASE = [
    "objective.aux_loss_weight=0.0",
    "checkpoint.async_save=true",
    "log.every=1",
    "log.progress=false",
    "stages.0.resolution=64",
    "stages.0.batch=8",
    "stages.1.resolution=64",
    "stages.1.batch=8",
]


def make_cfg(run_dir, *extra):
    return load_config("tiny_synthetic", [f"run_dir={run_dir}", *BASE, *extra])


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def test_loss_decreases(tmp_path):
    from lumina_jax.train.loop import Trainer

    cfg = make_cfg(tmp_path, "stages.0.steps=30", "stages.1.steps=1", "optimizer.lr=2e-3", "checkpoint.every=0",
                   "stages.0.data.num_samples=8")  # fmt: skip
    Trainer(cfg, stop_at=30).run()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (first, last)  # flow matching has an irreducible floor (~1.3 here)
    assert "images_per_s" in rows[-1] and rows[-1]["tflops_per_device"] > 0
    from lumina_jax.train.tensorboard import read_events

    events = read_events(next((tmp_path / "tensorboard").glob("events.out.tfevents.*")))
    assert events[0]["file_version"] == "brain.Event:2"
    assert any("loss" in e["scalars"] for e in events)


def _euler_sample(trainer, params, noise, cap, mask, steps=16):
    import jax.numpy as jnp

    from lumina_jax.train.step import forward_fn

    fwd = jax.jit(forward_fn(trainer.model))
    x = jnp.asarray(noise)
    ts = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
    with jax.set_mesh(trainer.mesh):
        for a, b in zip(ts[:-1], ts[1:]):
            v = fwd(params, x, jnp.full((x.shape[0],), a), cap, mask)
            x = x + (b - a) * v
    return np.asarray(x)


def test_overfit_reconstructs_latents(tmp_path):
    from lumina_jax.train.data import SyntheticLatents
    from lumina_jax.train.loop import Trainer

    # 2 distinct samples, each seen 4 times per batch (same objective as the other tests: one program)
    cfg = make_cfg(tmp_path, "stages.0.steps=250", "stages.1.steps=1", "optimizer.lr=4e-3", "checkpoint.every=0",
                   "stages.0.data.num_samples=2", "log.every=50")  # fmt: skip
    tr = Trainer(cfg, stop_at=250)
    tr.run()
    # the trainer's default data seed for stage 0 is seed * 1000 + 0 = 0
    src = SyntheticLatents(latent_hw=(8, 8), channels=16, cap_len=8, cap_dim=32, num_samples=2, global_batch=8,
                           seed=0)  # fmt: skip
    targets = [src.sample(i) for i in range(2)]
    x1 = np.stack([t["latents"] for t in targets])
    cap = np.stack([t["cap_feats"] for t in targets])
    mask = np.stack([t["cap_mask"] for t in targets])
    noise = np.random.default_rng(123).standard_normal(x1.shape).astype(np.float32)
    out = _euler_sample(tr, tr.state.params, noise, cap, mask)
    norm = lambda a: np.sqrt(np.sum(np.square(a), axis=(1, 2, 3)))  # noqa: E731
    rel = norm(out - x1) / norm(x1)
    base = norm(_euler_sample(tr, jax.tree.map(np.zeros_like, tr.state.params), noise, cap, mask) - x1) / norm(x1)
    assert np.all(base > 1.0), base
    # an untrained model lands at rel ~1.4 (noise + zero velocity); overfitting brings it close
    print("overfit rel", rel, "untrained", base)
    assert np.all(rel < 0.35), rel


@pytest.mark.parametrize("stop", [3, 4, 6])
def test_exact_resume_across_stage_boundary(tmp_path, stop):
    """8 steps in two 4-step stages; stop at ``stop`` (3: inside stage 0, so the resumed run crosses the
    boundary; 4: at the boundary, the checkpoint of stage 0's last step starts stage 1; 6: inside stage 1,
    data iterator restored mid-stage), resume, compare with a straight run."""
    from lumina_jax.train.loop import Trainer

    extra = ["stages.0.steps=4", "stages.1.steps=4", "stages.1.lr=5e-4", "checkpoint.every=2",
             "stages.1.data.num_samples=24"]  # fmt: skip
    seen_a, seen_b = [], []
    hook = lambda seen: (lambda step, b: seen.append((step, tuple(b["ids"]))))  # noqa: E731
    a = Trainer(make_cfg(tmp_path / "a", *extra), batch_hook=hook(seen_a))
    ra = a.run()
    assert ra.step == 8
    b1 = Trainer(make_cfg(tmp_path / "b", *extra), stop_at=stop, batch_hook=hook(seen_b))
    assert b1.run().step == stop
    b2 = Trainer(make_cfg(tmp_path / "b", *extra), batch_hook=hook(seen_b))
    # a kill after the last checkpoint leaves logged steps that the resumed run repeats: they are dropped
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": stop + 1, "loss": -1.0}) + "\n" + '{"step": 9, "lo')  # last line cut short
    assert b2.run().step == 8
    assert seen_a == seen_b
    rows = lambda run: [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / run / "metrics.jsonl").open())]  # noqa: E731
    assert rows("b") == rows("a") and [s for s, _ in rows("a")] == list(range(1, 9))
    for x, y in zip(leaves(a.state), leaves(b2.state)):
        np.testing.assert_array_equal(x, y)
    assert int(b2.state.step) == 8
    assert b2.ckpt.all_steps()[-1] == 8
    # each start is recorded (step, command line, devices, versions); config.yaml is the latest start's
    starts = [json.loads(x) for x in (tmp_path / "b" / "starts.jsonl").read_text().splitlines()]
    assert [x["step"] for x in starts] == [0, stop] and all(x["devices"] >= 1 and x["jax"] for x in starts)
    import yaml

    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text()) == b2.cfg.to_dict()


def test_a_signal_stops_after_the_step_with_a_checkpoint_and_the_resume_is_exact(tmp_path):
    """SIGINT (Ctrl-C) / SIGTERM (preemption) during a step: the step finishes, a checkpoint is written
    at it, the run returns ``stopped_by``; resuming gives the straight run's state bit for bit."""
    import os
    import signal

    from lumina_jax.train.loop import Trainer

    extra = ["stages.0.steps=4", "stages.1.steps=4", "stages.1.lr=5e-4", "checkpoint.every=2",
             "stages.1.data.num_samples=24"]  # fmt: skip (the exact-resume test's program: compiled once)
    a = Trainer(make_cfg(tmp_path / "a", *extra), stop_at=6)
    a.run()

    second_ctrl_c = []

    def hook(step, batch):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            second_ctrl_c.append(signal.getsignal(signal.SIGINT))  # a second Ctrl-C would quit at once

    b = Trainer(make_cfg(tmp_path / "b", *extra), stop_at=6, batch_hook=hook)
    rb = b.run()
    assert rb.stopped_by == signal.SIGINT and rb.step == 3 and b.ckpt.all_steps()[-1] == 3
    assert second_ctrl_c == [signal.default_int_handler]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    # a signal while the checkpoint is restored: no step (and no compilation) before stopping
    early = Trainer(make_cfg(tmp_path / "b", *extra), stop_at=6)
    restore = early.restore

    def restore_then_signal(*a, **k):
        out = restore(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    early.restore = restore_then_signal
    batches = []
    early.batch_hook = lambda step, batch: batches.append(step)
    re = early.run()
    assert (re.stopped_by, re.step, batches, early.ckpt.all_steps()[-1]) == (signal.SIGTERM, 3, [], 3)
    b2 = Trainer(make_cfg(tmp_path / "b", *extra), stop_at=6)
    assert b2.run().stopped_by is None
    for x, y in zip(leaves(a.state), leaves(b2.state)):
        np.testing.assert_array_equal(x, y)


def test_export_ema_and_params(tmp_path):
    from lumina_jax.convert.nextdit import load_transformer
    from lumina_jax.train.loop import Trainer, export_weights

    tr = Trainer(make_cfg(tmp_path / "run", "stages.0.steps=2", "stages.1.steps=1", "checkpoint.every=2"), stop_at=2)
    tr.run()
    for which in ("ema", "params"):
        out = export_weights(tmp_path / "run", tmp_path / f"out_{which}", which=which, format="jax")
        _, params = load_transformer(out)
        want = jax.device_get(tr.state.ema if which == "ema" else tr.state.params)
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # FLOP accounting reads the autoencoder factor off the batch: 64 px as 8x8 latents vs 64x64 pixels
    from lumina_jax.train import metrics

    f8 = metrics.train_flops_per_sample(tr.model_config, 64, 8, aux=False)["train"] * 8
    f1 = metrics.train_flops_per_sample(tr.model_config, 64, 8, aux=False, downsample=1)["train"] * 8
    assert tr.flops(0, 8, (8, 8, 8, 16))[0] == tr.flops(0, 8)[0] == f8 and tr.flops(0, 8, (8, 64, 64, 3))[0] == f1 > 30 * f8


def test_bench_train_runs_on_cpu(capsys):
    """``python -m lumina_jax.bench train`` with the tiny config (same program as the tests above)."""
    from lumina_jax.bench.train import main

    assert main(["--config", "nextdit_tiny", "--res", "64", "--batch", "8", "--steps", "2", "--no-aux",
                 "--dtype", "float32", "--attention", "xla", "--mesh", "data=1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "tflops_per_device" in out and "matmul_bf16_tflops" in out
    for flag in ("--lora", "--cap-len"):  # 0 ran full training / the default length, recorded as 0
        with pytest.raises(SystemExit):
            main(["--config", "nextdit_tiny", flag, "0"])
    with pytest.raises(SystemExit):  # a bad mesh fails in argparse, before any work
        main(["--config", "nextdit_tiny", "--mesh", "fsdp=two"])
    assert "fsdp must be an integer" in capsys.readouterr().err


def test_bench_train_falls_back_to_a_batch_that_fits(tmp_path, monkeypatch, capsys):
    """``--batch 16 8 4``: an out-of-memory failure is recorded and the next size runs; the first that fits
    ends the search; any other error propagates."""
    import json

    from lumina_jax.bench import train as bench_train

    ran = []

    def fake_run(args, batch_size):
        ran.append(batch_size)
        if batch_size == 16:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 118.6GiB.")
        return {"config": args.config, "batch": batch_size, "step_ms": 1.0}

    monkeypatch.setattr(bench_train, "_run", fake_run)
    out = tmp_path / "rows.json"
    assert bench_train.main(["--batch", "16", "8", "4", "--json", str(out)]) == 0
    assert ran == [16, 8]
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [16, 8]
    assert rows[0]["error"] == "out of memory" and "118.6GiB" in rows[0]["detail"]
    assert "batch 16: out of device memory" in capsys.readouterr().out

    ran.clear()
    assert bench_train.main(["--batch", "16"]) == 1  # nothing fits: non-zero exit

    def broken(args, batch_size):
        raise ValueError("unknown remat policy")

    monkeypatch.setattr(bench_train, "_run", broken)
    with pytest.raises(ValueError, match="unknown remat"):
        bench_train.main(["--batch", "8"])


def test_resume_without_the_data_state_restarts_the_stage_data(tmp_path):
    """``checkpoint.resume_data=false``: the train state is restored, the stage's data starts over (the
    escape hatch when a saved data position no longer fits, e.g. changed data)."""
    from lumina_jax.train.loop import Trainer

    extra = ["stages.0.steps=2", "stages.1.steps=4", "checkpoint.every=1", "stages.1.data.num_samples=24"]
    seen_a, seen_b = [], []
    hook = lambda seen: (lambda step, b: seen.append((step, tuple(b["ids"]))))  # noqa: E731
    a = Trainer(make_cfg(tmp_path / "a", *extra), stop_at=4, batch_hook=hook(seen_a))
    assert a.run().step == 4
    b = Trainer(make_cfg(tmp_path / "a", *extra, "checkpoint.resume_data=false"), batch_hook=hook(seen_b))
    assert b.run().step == 6
    stage1 = [ids for step, ids in seen_a if step >= 2]  # the batches stage 1 gave before the stop
    assert [ids for _, ids in seen_b] == stage1  # ... are given again from the start of the stage
    assert int(b.state.step) == 6


def test_a_restart_after_a_crash_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    """metrics.jsonl reads as one run: the rows of an attempt that died before saving anything are dropped."""
    import json

    from lumina_jax.train.loop import Trainer

    extra = ["stages.0.steps=4", "stages.1.steps=4", "checkpoint.every=0"]

    def boom(step, batch):
        if step == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(make_cfg(tmp_path, *extra), batch_hook=boom).run()
    assert [json.loads(x).get("step") for x in open(tmp_path / "metrics.jsonl")][-1] >= 1  # it logged steps
    Trainer(make_cfg(tmp_path, *extra), stop_at=4).run()
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 4, steps


def test_an_abort_on_non_finite_losses_leaves_a_checkpoint_of_the_unchanged_state(tmp_path, caplog):
    """Batches of NaN from step 3 on: steps 3 and 4 are skipped, the run aborts at step 4 (max_nonfinite 2:
    after a non-finite step each step's metrics are read before the next one is dispatched) with a checkpoint
    of step 4 that holds step 2's weights; the same command resumes from it. With max_nonfinite 1 the abort
    is found one step late (the next step was dispatched before the first NaN was seen): the message says
    whether that step was applied, and every step's metrics are logged."""
    import numpy as np

    from lumina_jax.train.loop import NonFiniteLossError, Trainer

    extra = ["stages.0.steps=6", "stages.1.steps=2", "checkpoint.every=0", "max_nonfinite=2"]

    def poison(step, batch):
        if step >= 2:
            batch["latents"][...] = np.nan

    good = Trainer(make_cfg(tmp_path / "ref", *extra), stop_at=2)
    good.run()
    bad = Trainer(make_cfg(tmp_path / "run", *extra), batch_hook=poison)
    with pytest.raises(NonFiniteLossError, match=r"^step 4: 2 consecutive .* A checkpoint of step 4 holds the run as"):
        bad.run()
    assert bad.ckpt.all_steps() == [4]
    resumed = Trainer(make_cfg(tmp_path / "run", *extra), stop_at=4)
    state, _ = resumed.restore(4)
    for x, y in zip(leaves(state.params), leaves(good.state.params)):
        np.testing.assert_array_equal(x, y)  # the skipped steps changed nothing
    resumed.run()  # nothing left to train up to stop_at=4: it resumes and stops

    # resuming from the abort starts a fresh allowance: one more bad step (the first one, 5) is skipped, not a
    # new abort
    def again(step, batch):
        if step == 4:
            batch["latents"][...] = np.nan

    with caplog.at_level(logging.WARNING, logger="lumina_jax.train.loop"):
        done = Trainer(make_cfg(tmp_path / "run", *extra), batch_hook=again).run()
    assert done.step == 8 and done.nonfinite == 3  # the two of the abort and step 5
    assert "is where its run aborted after 2 non-finite steps in a row (max_nonfinite=2 then); the count starts " \
           "again at 0" in caplog.text  # fmt: skip

    def one_bad(step, batch):
        if step == 2:
            batch["latents"][...] = np.nan

    once = Trainer(make_cfg(tmp_path / "once", *extra[:-1], "max_nonfinite=1", "log.every=1"), batch_hook=one_bad)
    with pytest.raises(NonFiniteLossError, match=r"^step 3: 1 consecutive .* Step 4 had already run when this was "
                                                 r"found, and was applied\. A checkpoint of step 4"):
        once.run()
    assert once.ckpt.all_steps() == [4]
    logged = [r["step"] for r in map(json.loads, open(tmp_path / "once" / "metrics.jsonl")) if "loss" in r]
    assert logged == [1, 2, 3, 4], logged

    # across a stage boundary (NaN at steps 4, the end of stage 0, and 5): the abort is at step 5 itself, and
    # the rows of the save at 4 and of the abort are logged although log.every is 100
    def at_the_boundary(step, batch):
        if step in (3, 4):
            batch["latents"][...] = np.nan

    edge = Trainer(make_cfg(tmp_path / "edge", "stages.0.steps=4", "stages.1.steps=2", "checkpoint.every=0",
                            "max_nonfinite=2", "log.every=100"), batch_hook=at_the_boundary)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"^step 5: 2 consecutive .* none of them was applied\. Aborting "
                                                 r"\(max_nonfinite=2\)\. Lower the LR or check the data\. A checkpoint of step 5"):
        edge.run()
    assert edge.ckpt.all_steps()[-1] == 5
    logged = [r["step"] for r in map(json.loads, open(tmp_path / "edge" / "metrics.jsonl")) if "loss" in r]
    assert logged == [4, 5], logged


def test_a_run_of_non_finite_steps_goes_on_counting_across_a_resume(tmp_path):
    """A periodic checkpoint in the middle of a run of non-finite steps (step 3: one so far) resumes counting
    it, with each step's metrics read right after it: the abort after step 4 is at step 4 itself, not found
    a step late (log.every 100), and step 5 never runs."""
    import numpy as np

    from lumina_jax.train.loop import NonFiniteLossError, Trainer

    extra = ["stages.0.steps=4", "stages.1.steps=4", "checkpoint.every=3", "max_nonfinite=2", "log.every=100"]

    def nan_from(first):
        def hook(step, batch):
            if step >= first:
                batch["latents"][...] = np.nan
        return hook

    Trainer(make_cfg(tmp_path, *extra), batch_hook=nan_from(2), stop_at=3).run()
    tr = Trainer(make_cfg(tmp_path, *extra), batch_hook=nan_from(3))
    with pytest.raises(NonFiniteLossError) as e:
        tr.run()
    assert str(e.value).startswith("step 4: 2 consecutive") and "had already run" not in str(e.value), str(e.value)
    assert tr.ckpt.all_steps()[-1] == 4
    # a lowered max_nonfinite does not make the step-3 checkpoint an abort's: no fresh allowance, and the next
    # bad step (4) aborts at once
    Trainer(make_cfg(tmp_path / "low", *extra), batch_hook=nan_from(2), stop_at=3).run()
    lowered = Trainer(make_cfg(tmp_path / "low", *extra[:-2], "max_nonfinite=1", "log.every=100"),
                      batch_hook=nan_from(3))  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"^step 4: 2 consecutive .*\(max_nonfinite=1\)"):
        lowered.run()


def _grey_samples(params, model_config, prompts, seeds, resolution):
    """A ``samples.fn`` for the test below: one flat image per prompt, its shade from the params."""
    shade = int(abs(float(sum(np.asarray(x).sum() for x in jax.tree.leaves(params)))) * 1000) % 256
    return np.full((len(prompts), 8, 8, 3), shade, np.uint8)


def test_sample_grids_every_k_steps_and_at_the_end(tmp_path):
    """``samples.every=3`` over 2 + 2 steps: a grid at step 3 and one of the final model at step 4."""
    from PIL import Image

    from lumina_jax.train.loop import Trainer

    extra = ["stages.0.steps=2", "stages.1.steps=2", "checkpoint.every=0", "samples.every=3",
             f"samples.fn={__name__}:_grey_samples", "samples.prompts=[a, b, c]", "samples.seeds=[0, 1, 2]"]
    Trainer(make_cfg(tmp_path, *extra)).run()
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["step_0000003.png", "step_0000004.png"]
    assert np.asarray(Image.open(tmp_path / "samples" / grids[0])).shape[2] == 3
