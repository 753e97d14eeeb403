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
    (and warns of the change); with keep_stage_ends=false and no keep_every only the newest survives."""
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
    c = Trainer(make_cfg(tmp_path / "s", *base, "checkpoint.keep_stage_ends=false"), stop_at=6)
    c.run()
    assert c.ckpt.all_steps() == [6]
