"""A real 2-process run on localhost (gloo, 4 virtual CPU devices each) through ``launch/local.py``:
train 5 steps, checkpoint, stop; start again and resume to step 6; compare with a single-process
8-device run of the same config (same mesh shape, same global batches). Gradient accumulation (2
micro-batches) and the data iterator checkpoint (one JSON per process) are exercised on the way.
Stage 0 reads synthetic latents; stage 1 reads a latent cache of several crop sizes with bucket batches,
which only works on two hosts because both follow the global bucket plan (each reads its rows of the
same global batch), and gives the same global batches as one process. The 2-process step-5 checkpoint
is also resumed by one process on one device (elastic resume: the plan's state does not depend on the
host count, the train state restores onto any mesh).

No persistent compilation cache here: with gloo CPU collectives an executable loaded from the cache
by one process and compiled by the other deadlocked in our runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lumina_jax.xla_flags import with_cpu_devices
from test_text import sp_dir  # noqa: F401 -- reused fixture: tiny sentencepiece tokenizer

REPO = Path(__file__).resolve().parent.parent
ARGS = ["configs/train/tiny_synthetic.yaml", "mesh.preset=null", "mesh.data=2", "mesh.fsdp=4", "grad_accum=2",
        "stages.0.steps=4", "stages.1.steps=2", "stages.0.batch=16", "stages.1.batch=16", "checkpoint.every=2", "log.every=1",
        "objective.aux_loss_weight=0", "log.progress=false", "stages.1.data.kind=latent_cache"]  # fmt: skip
FINAL_STEP = 6
CROP_SIZES = [(128, 128), (96, 160), (160, 96)]  # pixels; latents (H/8, W/8, 16)


def _write_cache(path: Path) -> str:
    """A latent cache (with its size index) whose 48 records have 3 crop sizes and varied caption lengths."""
    from lumina_jax.data.cache import write_latent_cache

    rng = np.random.default_rng(0)
    recs = []
    for i in range(48):
        h, w = CROP_SIZES[i % 3]
        n = int(rng.integers(3, 13))
        recs.append({"latent": rng.standard_normal((h // 8, w // 8, 16)).astype(np.float32),
                     "cap_feats": rng.standard_normal((n, 32)).astype(np.float32), "cap_mask": np.ones(n, bool),
                     "prompt": f"p{i}", "key": f"k{i}"})  # fmt: skip
    empty = (np.zeros((2, 32), np.float32), np.array([True, False]))
    write_latent_cache(recs, path, shard_size=16, empty_prompt_features=empty)
    return f"stages.1.data.paths=[{path}]"


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _local(run_dir, *extra, timeout=600):
    *overrides, stop, at = extra
    cmd = [sys.executable, str(REPO / "launch/local.py"), "-n", "2", "-d", "4", "--timeout", str(timeout), "--",
           *ARGS, f"run_dir={run_dir}", *overrides, stop, at]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout + 60)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p.stdout


def _errors(tree_a, tree_b) -> list[float]:
    """Sorted relative L2 errors of the leaves of two trees."""
    errs = []
    for x, y in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        errs.append(float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)))
    return sorted(errs)


def _restore(run_dir, step, data):
    from lumina_jax.train.config import load_config
    from lumina_jax.train.loop import Trainer

    cfg = load_config(ARGS[0], [*ARGS[1:], data, f"run_dir={run_dir}", "mesh.data=1", "mesh.fsdp=1"])
    tr = Trainer(cfg)  # a 1-device mesh: the 8-device checkpoints restore onto it
    state, meta = tr.restore(step)
    tr.ckpt.close()
    return jax.device_get(state), meta


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    mp, sp = tmp_path / "mp", tmp_path / "sp"
    data = _write_cache(tmp_path / "cache")
    _local(mp, data, "--stop-at", "5")  # stops inside stage 1: the resume restores the global plan's state
    elastic = tmp_path / "elastic"
    shutil.copytree(mp, elastic)  # the same step-5 checkpoint, to be resumed by ONE process
    out = _local(mp, data, "--stop-at", str(FINAL_STEP))
    assert "resuming" in out or (mp / "checkpoints" / str(FINAL_STEP)).exists()
    env = dict(_env(), JAX_PLATFORMS="cpu", XLA_FLAGS=with_cpu_devices(8))
    p = subprocess.run([sys.executable, "-m", "lumina_jax", "train", *ARGS, data, f"run_dir={sp}", "--stop-at",
                        str(FINAL_STEP)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-6000:]
    # Elastic: one process with ONE device (another process count and mesh) continues the 2-process run.
    p = subprocess.run([sys.executable, "-m", "lumina_jax", "train", *ARGS, data, f"run_dir={elastic}", "mesh.data=1",
                        "mesh.fsdp=1", "--stop-at", str(FINAL_STEP)], cwd=REPO,
                       env=dict(_env(), JAX_PLATFORMS="cpu", XLA_FLAGS=with_cpu_devices(1)),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-6000:]
    assert "data iterator state of 2 processes restored into 1" in p.stderr
    # each process saved its own data-iterator state; stage 1's is the global plan's
    it_dir = mp / "checkpoints" / str(FINAL_STEP) / "data_iter"
    names = sorted(x.name for x in it_dir.iterdir() if x.suffix == ".json")
    assert names == ["process_0-of-2.json", "process_1-of-2.json"], names
    assert '"bucket_plan": "global"' in (it_dir / names[1]).read_text()
    # stage 1's data counters (global batch 16 over two processes; restored with the data state on resume)
    rows = {r["step"]: r for r in map(json.loads, (mp / "metrics.jsonl").read_text().splitlines())}
    assert [rows[s]["data/samples"] + rows[s]["data/padded_rows"] for s in (5, 6)] == [16, 32]
    a, meta_a = _restore(mp, FINAL_STEP, data)
    b, meta_b = _restore(sp, FINAL_STEP, data)
    assert "2 processes" in meta_a["mesh"] and "1 processes" in meta_b["mesh"]
    assert int(a.step) == int(b.step) == FINAL_STEP
    errs = _errors(a.params, b.params)
    print(f"2-process (stop+resume) vs 1-process 8 devices: relative L2 over params: max {errs[-1]:.2e}, "
          f"95th percentile {errs[int(0.95 * len(errs))]:.2e}")
    c, _ = _restore(elastic, FINAL_STEP, data)
    elastic_errs = _errors(c.params, b.params)
    print(f"2 processes to step 5, then 1 process on 1 device (elastic resume) vs 1-process: max {elastic_errs[-1]:.2e}, "
          f"95th percentile {elastic_errs[int(0.95 * len(elastic_errs))]:.2e}")
    assert elastic_errs[int(0.95 * len(elastic_errs))] <= 1e-6 and elastic_errs[-1] <= 1e-4
    # Gloo and in-process collectives sum in different orders (fp32 roundoff). AdamW with eps 1e-15 turns
    # roundoff-sized gradients of the zero-initialised adaLN weights into lr-sized steps of random sign,
    # so one such leaf can differ by ~1e-5 (measured 1.5e-5, noise_refiner adaLN kernel; others <= 6e-7);
    # a different data order or a lost step gives ~1e-1.
    assert errs[int(0.95 * len(errs))] <= 1e-6 and errs[-1] <= 1e-4


@pytest.fixture(scope="module")
def raw_world(tmp_path_factory, sp_dir):  # noqa: F811
    """Captioned PNG files of 2 aspect ratios (indexed), and tiny random encoders on disk whose outputs
    fit ``nextdit_tiny`` (16 latent channels at 1/8, 32-wide caption features)."""
    import dataclasses

    from lumina_jax.convert.gemma2 import save_text_encoder
    from lumina_jax.convert.vae import save_vae
    from lumina_jax.data import testing
    from lumina_jax.data.image_index import index_image_source
    from lumina_jax.data.sources import JsonlSource
    from lumina_jax.models.gemma2 import Gemma2Config
    from lumina_jax.models.gemma2_bench import reference_pair
    from lumina_jax.models.vae import VAEConfig
    from test_preprocess import random_vae_params

    root = tmp_path_factory.mktemp("raw_world")
    sizes = [(64, 64), (96, 48)]  # (W, H): crops 64x64 and 80x48 at 64 px
    items = [testing.SyntheticItem(f"im{i}.png", f"a picture number {i}", *sizes[i % 2]) for i in range(16)]
    jsonl, _ = testing.make_test_dataset(root / "data", items)
    index_image_source(JsonlSource(jsonl), progress=False)
    vae = VAEConfig.from_yaml("vae_tiny")
    save_vae(root / "vae", vae, random_vae_params(vae))
    text = dataclasses.replace(Gemma2Config.from_yaml(REPO / "configs/model/gemma2_tiny.yaml"), hidden_size=32)
    save_text_encoder(root / "text_encoder", text, reference_pair(text, seed=1)[1])
    return jsonl, root / "vae", root / "text_encoder", sp_dir


@pytest.mark.slow
def test_two_processes_train_on_raw_images(raw_world, tmp_path):
    """Raw images encoded on the fly on 2 real processes (1 device each), 3 steps over 2 crop sizes: the
    global bucket plan over the image size index gives both processes the same crop size per step and
    the encoders pad captions to one length, so the SPMD steps neither hang nor fail. (That the rows of
    the hosts make the 1-host batch is tested in test_data_image_index.py; a 1-process run of this
    config reached the same params, max rel. L2 1.7e-6, BENCHMARKS.md.)"""
    import yaml

    jsonl, vae, text, tok = raw_world
    config = yaml.safe_load((REPO / "configs/train/tiny_synthetic.yaml").read_text())
    config["stages"] = config["stages"][:1]  # one stage: one compile per crop size, nothing else
    path = tmp_path / "raw.yaml"
    path.write_text(yaml.safe_dump(config))
    args = [str(path), "mesh.preset=null", "mesh.data=2", "mesh.fsdp=1", "stages.0.steps=3", "stages.0.batch=8",
            "checkpoint.every=3", "log.every=1", "log.progress=false", "objective.aux_loss_weight=0",
            *[f"stages.0.data.{k}={v}" for k, v in (
                ("kind", "images"), ("paths", f"[{jsonl}]"), ("vae", vae), ("text_encoder", text), ("tokenizer", tok),
                ("max_text_len", 64), ("encoder_dtype", "float32"), ("read_threads", 1))]]  # fmt: skip
    run_dir = tmp_path / "mp"
    cmd = [sys.executable, str(REPO / "launch/local.py"), "-n", "2", "-d", "1", "--timeout", "300", "--",
           *args, f"run_dir={run_dir}"]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=360)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    # the data counters are summed over both processes: every step delivered 8 rows
    assert [r["data/samples"] + r["data/padded_rows"] for r in rows] == [8, 16, 24]
    assert all(r["data/skipped"] == r["data/captions_truncated"] == 0 for r in rows)
    assert (run_dir / "checkpoints" / "3").is_dir()
    state = json.loads((run_dir / "checkpoints" / "3" / "data_iter" / "process_1-of-2.json").read_text())
    assert '"bucket_plan": "global"' in json.dumps(state)


@pytest.mark.slow
def test_ctrl_c_stops_two_processes_at_one_step_with_a_checkpoint(tmp_path):
    """Ctrl-C to ``launch/local.py``: passed on to both trainers, which turn it into the preemption
    service's SIGTERM, agree on a step, checkpoint it and exit 130 (was: killed without a checkpoint)."""
    import signal

    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    cmd = [sys.executable, str(REPO / "launch/local.py"), "-n", "2", "-d", "1", "--timeout", "300", "--log-dir",
           str(logs), "--", "configs/train/tiny_synthetic.yaml", f"run_dir={run_dir}", "mesh.preset=null",
           "mesh.data=2", "mesh.fsdp=1", "stages.0.steps=1000", "log.every=1", "log.progress=false",
           "checkpoint.every=5000"]  # fmt: skip
    p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in p.stdout:  # process 0's log, streamed
            if line.startswith("step 3/"):
                break
        p.send_signal(signal.SIGINT)
        out = p.communicate(timeout=240)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGINT, out[-3000:]
    steps = sorted(int(s.name) for s in (run_dir / "checkpoints").iterdir() if s.name.isdigit())
    assert len(steps) == 1 and 3 <= steps[0] < 1000, steps
    for i in range(2):  # both processes stopped at the agreed step
        text = (logs / f"process_{i}.log").read_text()
        assert f"stopped at step {steps[0]} with a checkpoint" in text, text[-2000:]


_GATHER_SCRIPT = r"""
import sys, jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="127.0.0.1:" + sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
from jax.sharding import NamedSharding, PartitionSpec as P
from lumina_jax.parallel import mesh as M, sharding as S
mesh = M.create_mesh({"fsdp": -1})
glob = jax.make_array_from_callback((4, 2), NamedSharding(mesh, P("fsdp")), lambda i: np.arange(8.0).reshape(4, 2)[i])
local = jax.device_put(np.arange(4.0), jax.local_devices()[0])  # params restored onto this host's devices
out = S.gather_to_host({"global": glob, "local": local, "host": np.float32(3)})
assert np.array_equal(out["global"], np.arange(8.0).reshape(4, 2)), out["global"]
assert np.array_equal(out["local"], np.arange(4.0)), out["local"]
assert out["host"] == 3
print("OK", jax.process_index())
"""


def test_gather_to_host_on_two_processes():
    """Global arrays are gathered over processes; a process-local one is copied (was: tiled with the other
    process's copy, so `train export` inside a multi-process job wrote corrupted weights)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, XLA_FLAGS=with_cpu_devices(2), JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", _GATHER_SCRIPT, str(i), port], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=180) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {i}" in out, (out[-1000:], err[-3000:])


_SAVE_ERROR_SCRIPT = r"""
import sys, jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="127.0.0.1:" + sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
from lumina_jax.convert.errors import CheckpointError
from lumina_jax.train.checkpoint import RunCheckpoints
ck = RunCheckpoints(sys.argv[3])
ck.check_for_errors()  # nothing failed: no process raises
def disk_full():
    raise OSError(28, "No space left on device")
if jax.process_index() == 1:  # only this process's background save failed
    ck.manager.check_for_errors = disk_full
try:
    ck.check_for_errors()
except CheckpointError as e:
    print("RAISED", jax.process_index(), e)
"""


def test_a_failed_background_save_on_one_process_stops_every_process(tmp_path):
    """Process 1's save fails; both processes raise at the same check (process 0 naming process 1), instead of
    process 0 running on into collectives that process 1 never joins."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, XLA_FLAGS=with_cpu_devices(1), JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", _SAVE_ERROR_SCRIPT, str(i), port, str(tmp_path / "ckpt")],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=180) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"RAISED {i}" in out, (out[-1000:], err[-3000:])
        assert "failed on process(es) [1]" in out, out
    assert "this process stops too" in outs[0][0] and "No space left on device" in outs[1][0]
