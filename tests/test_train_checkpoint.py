"""A process killed (SIGKILL) during an asynchronous checkpoint save never leaves a checkpoint that
the manager lists or restores as valid but incomplete; the previous checkpoint still restores.

The writer runs in a subprocess (this file as a script): it saves step 1 (state + data iterator +
meta) and waits, then starts an async save of step 2 with ~256 MB of state and kills itself after
``delay`` seconds (0 = right after ``save()`` returned, while the background write is running).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
BIG = 4 * 2**24  # float32 elements per big array (64 MB)


def _state(step: int, big: bool):
    import jax.numpy as jnp

    n = BIG if big else 1024
    return {"params": {f"w{i}": jnp.full((n,), float(step * 10 + i), jnp.float32) for i in range(4)},
            "step": jnp.asarray(step, jnp.int32)}  # fmt: skip


def _worker(directory: str, delay: float) -> None:
    from lumina_jax.train.checkpoint import RunCheckpoints
    from lumina_jax.train.data import SyntheticLatents

    it = SyntheticLatents(latent_hw=(4, 4), channels=2, cap_len=4, cap_dim=3, num_samples=5, global_batch=2)
    ck = RunCheckpoints(directory, async_save=True)
    next(it)
    ck.save(1, _state(1, big=False), {"step": 1}, it)
    ck.wait()
    next(it)
    state = _state(2, big=True)
    if delay > 0:
        threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    ck.save(2, state, {"step": 2}, it)
    if delay == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)  # killed by the timer before this ends
    ck.wait()


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_kill_during_async_save(tmp_path, delay):
    import jax

    from lumina_jax.train.checkpoint import RunCheckpoints
    from lumina_jax.train.data import SyntheticLatents

    d = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, __file__, str(d), str(delay)], env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-3000:])
    ck = RunCheckpoints(d)  # a fresh manager, as a restarted job would create
    steps = ck.all_steps()
    assert steps in ([1], [1, 2]), steps
    for step in steps:  # whatever is listed must restore completely and correctly
        big = step == 2
        target = jax.eval_shape(lambda: _state(step, big))
        it = SyntheticLatents(latent_hw=(4, 4), channels=2, cap_len=4, cap_dim=3, num_samples=5, global_batch=2)
        state, meta = ck.restore(step, target, it)
        assert meta["step"] == step and int(state["step"]) == step
        for i in range(4):
            np.testing.assert_array_equal(np.asarray(state["params"][f"w{i}"]), step * 10 + i)
        assert it.get_state() == {"position": 2 * step}
    leftovers = [x.name for x in d.iterdir() if "tmp" in x.name]
    print(f"delay {delay}: listed steps {steps}, temporary dirs left {leftovers}")
    ck.close()


if __name__ == "__main__":
    _worker(sys.argv[1], float(sys.argv[2]))


def test_retention_keeps_milestones_across_a_changed_keep_every_and_the_stage_ends(tmp_path, caplog):
    """keep=1 + keep_every=2: steps 2, 4 (also stage 0's end) and 6 stay; resuming without keep_every keeps them
    (and warns of the change), and so does a second resume without it; other stage lengths keep the old stage
    end; with keep_stage_ends=false and no keep_every only the newest survives."""
    from test_train_loop import make_cfg

    from lumina_jax.train.loop import Trainer

    base = ["stages.0.steps=3", "stages.1.steps=5", "checkpoint.every=1", "checkpoint.keep=1",
            "checkpoint.async_save=false"]  # fmt: skip
    a = Trainer(make_cfg(tmp_path / "r", *base, "checkpoint.keep_every=2"), stop_at=6)
    a.run()
    assert a.ckpt.all_steps() == [2, 3, 4, 6]  # 3: the end of stage 0
    with caplog.at_level("WARNING", logger="lumina_jax.train"):
        b = Trainer(make_cfg(tmp_path / "r", *base), stop_at=8)
        b.run()
    assert b.ckpt.all_steps() == [2, 3, 4, 6, 8] and "checkpoint.keep_every: 2 -> 0" in caplog.text
    c = Trainer(make_cfg(tmp_path / "r", *base[:1], "stages.1.steps=6", *base[2:], "stages.0.steps=4"), stop_at=9)
    c.run()  # a second resume without keep_every, stages now 4 + 6 steps: 2, 3 and 8 (stage ends of then), 4, 6 stay
    assert c.ckpt.all_steps() == [2, 3, 4, 6, 8, 9]
    c = Trainer(make_cfg(tmp_path / "s", *base, "checkpoint.keep_stage_ends=false"), stop_at=6)
    c.run()
    assert c.ckpt.all_steps() == [6]


def test_a_damaged_latest_checkpoint_is_named_with_the_step_to_fall_back_to(tmp_path, monkeypatch):
    """Truncated state metadata or garbage in the data state: a ``CheckpointError`` naming the step's folder
    and the checkpoint a resume falls back to once it is moved away (not a bare JSONDecodeError); moved away,
    the run resumes from that one."""
    import shutil

    from test_train_loop import make_cfg

    from lumina_jax.convert.errors import CheckpointError
    from lumina_jax.train.loop import Trainer

    base = ["checkpoint.every=2", "checkpoint.async_save=false"]
    Trainer(make_cfg(tmp_path / "r", *base), stop_at=4).run()
    ckpt = tmp_path / "r" / "checkpoints"
    for damage in ("state/_METADATA", "data_iter/process_0-of-1.json"):
        shutil.copytree(ckpt / "4", tmp_path / "saved4", dirs_exist_ok=True)
        target = ckpt / "4" / damage
        target.write_text(target.read_text()[: target.stat().st_size // 2])
        with pytest.raises(CheckpointError, match=r"checkpoints/4 could not be read .*move it away to resume from the "
                                                  r"one before \(step 2\)"):  # fmt: skip
            Trainer(make_cfg(tmp_path / "r", *base), stop_at=6).run()
        shutil.rmtree(ckpt / "4")
        shutil.copytree(tmp_path / "saved4", ckpt / "4")
    # a failure that is not the files' (out of memory, ...) keeps its own error, with no advice to move anything
    import orbax.checkpoint as ocp

    def oom(self, *a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.0GiB")

    with monkeypatch.context() as m:
        m.setattr(ocp.CheckpointManager, "restore", oom)
        with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED") as e:
            Trainer(make_cfg(tmp_path / "r", *base), stop_at=6).run()
    assert not isinstance(e.value, CheckpointError)
    shutil.move(ckpt / "4", tmp_path / "moved4")
    assert Trainer(make_cfg(tmp_path / "r", *base), stop_at=6).run().step == 6


def test_a_checkpoint_without_its_data_state_is_refused_mid_stage(tmp_path):
    """Resuming mid-stage from a checkpoint whose ``data_iter/`` is missing would replay the stage's data
    from its start: refused, naming ``checkpoint.resume_data=false``, which then accepts it."""
    import shutil

    from test_train_loop import make_cfg

    from lumina_jax.train.checkpoint import DataStateMismatchError
    from lumina_jax.train.loop import Trainer

    base = ["checkpoint.every=2", "checkpoint.async_save=false"]
    Trainer(make_cfg(tmp_path / "r", *base), stop_at=2).run()
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "2" / "data_iter")
    with pytest.raises(DataStateMismatchError, match=r"no data iterator state .*checkpoint.resume_data=false"):
        Trainer(make_cfg(tmp_path / "r", *base), stop_at=3).run()
    assert Trainer(make_cfg(tmp_path / "r", *base, "checkpoint.resume_data=false"), stop_at=3).run().step == 3


def test_a_failed_background_save_stops_the_run_at_the_next_log_row(tmp_path, monkeypatch):
    """A background write that fails (a full disk, simulated) is raised at the next logged step as a
    ``CheckpointError`` naming the newest complete checkpoint, not at the next save many steps later."""
    import time

    import orbax.checkpoint as ocp
    from test_train_loop import make_cfg

    from lumina_jax.convert.errors import CheckpointError
    from lumina_jax.train.loop import Trainer

    plain = ocp.StandardCheckpointHandler.async_save
    calls = []

    class DiskFull:
        def result(self, timeout=None):
            raise OSError(28, "No space left on device (simulated)")

    async def failing_first_save(self, directory, *a, **k):
        futures = await plain(self, directory, *a, **k)
        calls.append(str(directory))
        return list(futures or []) + ([DiskFull()] if len(calls) == 1 else [])

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing_first_save)
    seen = []

    def hook(step, batch):  # give the save of step 4 time to fail in the background
        seen.append(step)
        time.sleep(1.0 if step == 5 else 0.0)

    # saves at the stage ends only: step 4 (fails in the background) and step 12
    cfg = make_cfg(tmp_path / "r", "stages.0.steps=4", "stages.1.steps=8", "checkpoint.every=0", "log.every=1",
                   "checkpoint.async_save=true")  # fmt: skip
    with pytest.raises(CheckpointError, match=r"background checkpoint save .* failed \(OSError: .*No space left on "
                                              r"device.*newest complete checkpoint: none"):  # fmt: skip
        Trainer(cfg, batch_hook=hook).run()
    assert max(seen) < 7  # raised by step 6's log row, not at the step 12 save


def test_synthetic_data_refuses_another_kind_of_saved_state():
    from lumina_jax.data.pipeline import DataStateError
    from lumina_jax.train.data import SyntheticLatents

    it = SyntheticLatents(latent_hw=(4, 4), channels=2, cap_len=4, cap_dim=3, num_samples=5, global_batch=2)
    for bad in ({"epoch": 0, "cursor": 3}, {"position": 1, "epoch": 0}, [1]):
        with pytest.raises(DataStateError, match="checkpoint.resume_data=false"):
            it.set_state(bad)
    it.set_state({"position": 4})
    assert it.get_state() == {"position": 4}
