"""Fast checks of the mesh, the rule table, multi-process start-up resolution, the context-parallel
backend's single-device fallback, the launch scripts' dry runs and the host-memory check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from lumina_jax.parallel import distributed
from lumina_jax.parallel import mesh as M

REPO = Path(__file__).resolve().parent.parent


def abstract_mesh(**sizes):
    shape = tuple(sizes.get(a, 1) for a in M.MESH_AXES)
    return AbstractMesh(shape, M.MESH_AXES)


def test_mesh_config_presets_and_fill():
    assert M.MeshConfig().ici_sizes() == {"data": -1, "fsdp": 1, "context": 1, "tensor": 1}
    assert M.MeshConfig(preset="fsdp_tensor", tensor=4).ici_sizes()["tensor"] == 4
    assert M._fill({"data": -1, "fsdp": 2, "context": 1, "tensor": 2}, 16, "m") == {
        "data": 4, "fsdp": 2, "context": 1, "tensor": 2}  # fmt: skip
    with pytest.raises(ValueError, match="at most one axis"):
        M._fill({"data": -1, "fsdp": -1, "context": 1, "tensor": 1}, 8, "m")
    with pytest.raises(ValueError, match="not divisible"):
        M._fill({"data": -1, "fsdp": 3, "context": 1, "tensor": 1}, 8, "m")
    with pytest.raises(ValueError, match="unknown mesh preset"):
        M.MeshConfig(preset="zero3").ici_sizes()
    with pytest.raises(ValueError, match="unknown mesh keys"):
        M.MeshConfig.from_dict({"fsdpp": 2})
    mesh = M.create_mesh("dp")
    assert mesh.axis_names == M.MESH_AXES and M.mesh_shape(mesh)["data"] == jax.device_count()
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_rule_table_resolution():
    m = abstract_mesh(fsdp=4, tensor=2)
    spec = lambda names, shape: M.logical_to_mesh_spec(names, shape, m)  # noqa: E731
    assert spec(("layers", "embed", "mlp"), (26, 2304, 9216)) == P(None, "fsdp", "tensor")
    assert spec(("layers", "heads", "embed"), (26, 2304, 2304)) == P(None, "tensor", "fsdp")
    assert spec(("cond", "cond"), (1024, 1024)) == P()  # duplicate logical names are fine
    assert spec(("norm",), (2304,)) == P()
    assert spec(("embed", "patch"), (6, 64)) == P()  # 6 is not divisible by fsdp=4: replicated
    # ... unless the ZeRO axes may move: fsdp goes to the largest other dimension it divides
    zero = lambda names, shape: M.logical_to_mesh_spec(names, shape, m, fallback_axes=M.ZERO_AXES)  # noqa: E731
    assert zero(("embed", "patch"), (6, 64)) == P(None, "fsdp")
    assert zero(("layers", "embed", "mlp"), (26, 2306, 9216)) == P(None, None, ("tensor", "fsdp"))
    assert zero(("layers", "embed", "mlp"), (26, 2304, 9216)) == P(None, "fsdp", "tensor")  # no change when it fits
    assert zero(("embed", "patch"), (6, 6)) == P()  # nowhere to go
    assert zero(("layers", "embed"), (8, 6)) == P()  # never the stacked layers axis the scan slices
    mc = abstract_mesh(fsdp=2, context=4)
    assert M.logical_to_mesh_spec(("cap", "embed"), (2304, 2304), mc) == P(None, ("fsdp", "context"))
    assert M.logical_to_mesh_spec(("cap", "embed"), (2304, 2306), mc) == P(None, "fsdp")
    # without a mesh: the raw table
    assert M.logical_to_mesh_spec(("embed", "kv_heads")) == P(("fsdp", "context"), "tensor")


def test_param_specs_of_the_2b_model():
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.parallel import sharding as S

    boxed = S.model_abstract(NextDiTConfig.from_yaml("nextdit_2b"))
    specs = S.param_specs(boxed, abstract_mesh(fsdp=16, tensor=4))
    attn = specs["layers"]["blocks"]["attention"]
    assert attn["q"] == P(None, "fsdp", "tensor") and attn["k"] == P(None, "fsdp", "tensor")
    assert attn["out"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["blocks"]["feed_forward"]["w2"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["t_embedder"]["linear_2"]["kernel"] == P()


def test_no_large_param_is_replicated_when_fsdp_does_not_divide_the_width(caplog, monkeypatch):
    """fsdp=512 (v5p-1024) does not divide the 2B's width 2304: the FFN and embedder weights shard over
    another dimension (was: 90 % of the 2.6B values replicated on every chip, silently); what no dimension
    can take (attention weights: 2304 and 768 wide, 26 layers) is a warning."""
    import numpy as np

    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.parallel import sharding as S

    monkeypatch.setattr(S, "_WARNED", set())  # (logged once per mesh and process)
    boxed = S.model_abstract(NextDiTConfig.from_yaml("nextdit_2b"))
    shapes = jax.tree.leaves(S.unbox(boxed))
    total = sum(int(np.prod(s.shape)) for s in shapes)

    def replicated(fsdp):
        specs = jax.tree.leaves(S.param_specs(boxed, abstract_mesh(fsdp=fsdp)), is_leaf=lambda x: isinstance(x, P))
        return sum(int(np.prod(s.shape)) for s, p in zip(shapes, specs) if "fsdp" not in str(p)) / total

    with caplog.at_level("WARNING"):
        assert replicated(256) < 0.01
        assert "not sharded" not in caplog.text
        assert replicated(512) < 0.2
    assert "large params (16.5% of 2.61B values) are not sharded over fsdp" in caplog.text


def test_distributed_resolution_from_env():
    assert distributed.resolve(env={}) == ("none", {})
    mode, kw = distributed.resolve(env={"LUMINA_COORDINATOR": "h:1", "LUMINA_NUM_PROCESSES": "4", "LUMINA_PROCESS_ID": "3"})
    assert mode == "explicit" and kw == {"coordinator_address": "h:1", "num_processes": 4, "process_id": 3}
    assert distributed.resolve("h:2", 2, 0, env={})[1]["coordinator_address"] == "h:2"
    with pytest.raises(ValueError, match="needs all of"):
        distributed.resolve(env={"LUMINA_COORDINATOR": "h:1"})
    with pytest.raises(ValueError, match="not in"):
        distributed.resolve("h:1", 2, 2, env={})
    assert distributed.resolve(env={"TPU_WORKER_HOSTNAMES": "a,b,c,d"})[0] == "tpu"
    assert distributed.resolve(env={"TPU_WORKER_HOSTNAMES": "localhost"})[0] == "none"
    # a Cloud TPU VM keeps the slice in its metadata, not in variables: launch/tpu_pod.sh says so
    assert distributed.resolve(env={"HOSTNAME": "t1v-n-abc-w-0"})[0] == "none"
    assert distributed.resolve(env={"LUMINA_TPU_POD": "1"})[0] == "tpu"
    step = {"SLURM_STEP_NODELIST": "n[1-8]"}  # srun's: what JAX's Slurm detection reads
    assert distributed.resolve(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", **step})[0] == "slurm"
    assert distributed.resolve(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", **step})[0] == "none"
    assert distributed.resolve(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"})[0] == "none"  # a batch script: no srun
    assert distributed.resolve(env={"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_orte_hnp_uri": "x"})[0] == "mpi"
    with pytest.raises(ValueError, match="only detects Open MPI up to version 4; set LUMINA_COORDINATOR"):
        distributed.resolve(env={"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})
    # launch/slurm.sbatch: one task per node with 8 GPUs -> all 8 local devices (JAX alone would give
    # each process only GPU SLURM_LOCALID); one task per GPU -> JAX's default
    node = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8", **step}
    assert distributed.resolve(env=node) == ("slurm", {"local_device_ids": list(range(8))})
    assert distributed.resolve(env={**node, "SLURM_NTASKS_PER_NODE": "1(x2)"})[1] == {"local_device_ids": list(range(8))}
    assert distributed.resolve(env={**node, "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8"}) == ("slurm", {})
    # xpk GPU workloads: coordinator, node count and rank from xpk's variables
    xpk = {"JAX_COORDINATOR_ADDRESS": "wl-slice-job-0-0.wl", "JAX_COORDINATOR_PORT": "6002", "NNODES": "2",
           "NODE_RANK": "1"}  # fmt: skip
    assert distributed.resolve(env=xpk) == ("xpk-gpu", {"coordinator_address": "wl-slice-job-0-0.wl:6002",
                                                        "num_processes": 2, "process_id": 1})  # fmt: skip
    assert distributed.resolve(env={**xpk, "NNODES": "1"}) == ("none", {})
    v6 = distributed.resolve(env={**xpk, "JAX_COORDINATOR_ADDRESS": "[fe80::1]"})[1]["coordinator_address"]
    assert v6 == "[fe80::1]:6002"
    # mpirun inside a Slurm allocation (salloc): Open MPI, as JAX detects it first (not one process each)
    ompi = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_orte_hnp_uri": "x", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}
    assert distributed.resolve(env=ompi)[0] == "mpi"
    assert distributed.resolve(env={**node, "TPU_WORKER_HOSTNAMES": "a,b"})[0] == "slurm"  # JAX's order too
    # srun -n16 in an sbatch --ntasks-per-node=1 allocation: the step's 8 tasks per node share the GPUs
    step16 = {**node, "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}
    assert distributed.resolve(env=step16) == ("slurm", {})
    for bad in ("localhost", "", "node0:", ":1234", "fe80::1:1234", "[fe80::1"):
        with pytest.raises(ValueError, match="is not host:port|needs all of"):
            distributed.resolve(env={"LUMINA_COORDINATOR": bad, "LUMINA_NUM_PROCESSES": "2", "LUMINA_PROCESS_ID": "0"})
    assert distributed.resolve("[fe80::1]:1234", 2, 0, env={})[0] == "explicit"


def test_process_rows_single_process():
    from lumina_jax.parallel.sharding import process_rows

    assert process_rows(8, M.create_mesh("dp")) == (0, 8, 0, 1)


def test_process_rows_refuses_overlapping_row_sets(monkeypatch):
    """Processes whose devices hold partly the same rows (data=4 x tensor=2 over 4 processes laid out
    badly) would feed a row twice with different data: an error naming them, not 12 rows of a batch of 8."""
    from lumina_jax.parallel import sharding as S

    sets = {0: ((0, 2), (2, 4)), 1: ((0, 2), (4, 6)), 2: ((2, 4), (6, 8)), 3: ((4, 6), (6, 8))}
    monkeypatch.setattr(S, "process_row_sets", lambda batch, mesh: sets)
    with pytest.raises(ValueError, match=r"processes 0 and 1 hold overlapping, unequal sets of batch rows"):
        S.process_rows(8, None, process=3)
    ok = {0: ((0, 4),), 1: ((0, 4),), 2: ((4, 8),), 3: ((4, 8),)}  # replicas over tensor: the same rows
    monkeypatch.setattr(S, "process_row_sets", lambda batch, mesh: ok)
    assert S.process_rows(8, None, process=3) == (4, 8, 1, 2)


def test_context_backend_without_context_axis_is_the_inner_kernel():
    import lumina_jax.parallel.context  # noqa: F401
    from lumina_jax.ops.attention import attention

    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 6, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 6, 2, 8)).astype(np.float32)
    lens = np.array([6, 3], np.int32)
    a = attention(q, k, k, kv_lengths=lens, backend="context")
    b = attention(q, k, k, kv_lengths=lens, backend="xla")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- launch


def _run(cmd, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=60)


def test_local_launcher_dry_run():
    p = _run([sys.executable, "launch/local.py", "-n", "3", "-d", "2", "--port", "4242", "--dry-run", "--",
              "configs/train/tiny_synthetic.yaml", "run_dir=/tmp/x"],
             {"XLA_FLAGS": "--xla_force_host_platform_device_count=7 --xla_cpu_enable_fast_math=false"})  # fmt: skip
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert f"LUMINA_PROCESS_ID={i}" in line and "LUMINA_NUM_PROCESSES=3" in line
        assert "LUMINA_COORDINATOR=127.0.0.1:4242" in line
        # the user's other XLA flags are kept, the device count replaced (not given twice)
        assert "XLA_FLAGS='--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2'" in line
        assert line.endswith("-m lumina_jax train configs/train/tiny_synthetic.yaml run_dir=/tmp/x")


def test_xla_flags_are_set_by_name():
    from lumina_jax.xla_flags import set_flags, with_cpu_devices

    assert set_flags(["--a=1", "--c"], "--a=0 --b=2 --c") == "--b=2 --a=1 --c"
    assert set_flags([], "") == ""
    assert with_cpu_devices(4, "--xla_force_host_platform_device_count=8 --x=1") == \
        "--x=1 --xla_force_host_platform_device_count=4"  # fmt: skip
    with pytest.raises(ValueError, match="device count must be >= 1"):
        with_cpu_devices(0, "")


@pytest.mark.parametrize("jaxlib, expected", [("0.10.2", 2), ("0.11.2", 1), ("1.0.0", 1)])
def test_fast_compile_flags_follow_the_jaxlib_version(monkeypatch, jaxlib, expected):
    """jaxlib 0.11 removed --xla_cpu_use_fusion_emitters: XLA aborts on an unknown flag."""
    import importlib.metadata

    from lumina_jax import xla_flags

    monkeypatch.setattr(importlib.metadata, "version", lambda name: jaxlib)
    flags = xla_flags.cpu_fast_compile()
    assert flags[0] == "--xla_backend_optimization_level=0" and len(flags) == expected


def test_tpu_pod_dry_run():
    p = _run(["bash", "launch/tpu_pod.sh", "configs/train/lumina2_2b.yaml", "run_dir=gs://b/r"],
             {"DRY_RUN": "1", "TPU_NAME": "v5p-64", "ZONE": "us-east5-a", "PROJECT": "p"})  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "gcloud compute tpus tpu-vm ssh v5p-64" in p.stdout and "--worker=all" in p.stdout
    assert "python -m lumina_jax train configs/train/lumina2_2b.yaml run_dir=gs://b/r" in p.stdout.replace("\\", "")
    p = _run(["bash", "launch/tpu_pod.sh", "cfg"], {"DRY_RUN": "1", "TPU_NAME": "", "ZONE": "z"})
    assert p.returncode != 0 and "TPU_NAME" in p.stderr


def test_xpk_dry_run():
    env = {"DRY_RUN": "1", "CLUSTER": "c", "IMAGE": "gcr.io/p/img", "TPU_TYPE": "v6e-256", "NUM_SLICES": "2",
           "WORKLOAD": "w"}  # fmt: skip
    p = _run(["bash", "launch/xpk.sh", "configs/train/lumina2_2b.yaml", "mesh.fsdp=-1"], env)
    assert p.returncode == 0, p.stderr
    out = p.stdout.replace("\\", "")
    assert "xpk workload create --cluster c --workload w" in out and "--tpu-type v6e-256 --num-slices 2" in out
    assert "python -m lumina_jax train configs/train/lumina2_2b.yaml mesh.fsdp=-1" in out
    gpu = dict(env, TPU_TYPE="", DEVICE_TYPE="h100-80gb-8", NUM_NODES="4")
    p = _run(["bash", "launch/xpk.sh", "cfg"], gpu)
    assert p.returncode == 0 and "--device-type h100-80gb-8 --num-nodes 4" in p.stdout


def test_slurm_dry_run():
    p = _run(["bash", "launch/slurm.sbatch", "configs/train/lumina2_2b.yaml", "run_dir=/shared/r"],
             {"DRY_RUN": "1", "REPO_DIR": "/repo", "VENV": "", "XLA_FLAGS": ""})  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = p.stdout.replace("\\", "")
    assert "srun --ntasks-per-node=1" in out and "cd /repo" in out
    assert "python -m lumina_jax train configs/train/lumina2_2b.yaml run_dir=/shared/r" in out
    assert "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in out  # its defaults, none set


# ---------------------------------------------------------------------------------------------- memory


def _memcheck(tmp_path, config: str, layers: int, dtype: str) -> dict:
    out = tmp_path / f"mem_{config}_{layers}_{dtype}.json"
    # default XLA flags: the suite's fast-compile ones slow the random init of these real widths 3x
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    p = subprocess.run([sys.executable, "-m", "lumina_jax.parallel.memcheck", "--config", config, "--layers",
                        str(layers), "--refiner-layers", "1", "--dtype", dtype, "--devices", "8", "--json", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-4000:]
    print(p.stdout.strip().splitlines()[-1])
    return json.loads(out.read_text())


@pytest.mark.slow
def test_sharded_init_host_memory(tmp_path):
    """2B widths (dim 2304, FFN 6144) at depth 2 and 16, bf16, 8 virtual devices: each device holds 1/8
    of the params; peak RSS exceeds base + all shards only by the RNG temporaries of one layer's
    largest weight, *whatever the depth*: stacked params are written layer by layer into their bf16
    buffers (no fp32 copy of a stack, let alone of the model). Casting after the scan instead added
    0.34 GiB from 2 to 16 layers here (fp32 stacks); the full 7B is in BENCHMARKS.md."""
    r2, r16 = _memcheck(tmp_path, "nextdit_2b", 2, "bf16"), _memcheck(tmp_path, "nextdit_2b", 16, "bf16")
    largest = 2304 * 6144 * 4  # one FFN kernel of one layer, drawn in fp32
    for r in (r2, r16):
        # replicated small params (norms, biases, t-embedder) are counted once per device
        assert r["param_bytes"] <= r["sum_shard_bytes"] < 1.05 * r["param_bytes"]
        assert r["max_device_bytes"] < 1.15 * r["param_bytes"] / 8
        assert r["excess_over_shards"] < 6 * largest + (640 << 20), r
    # 14 more stacked layers: +2.3 GiB of bf16 shards and nothing else
    assert r16["excess_over_shards"] - r2["excess_over_shards"] < 160 << 20, (r2, r16)


@pytest.mark.parametrize("topology,mesh", [("v5p:4x4x4", {"fsdp": -1}), ("v5p:4x4x4", "dp"),
                                           ("v6e:4x4", {"fsdp": -1}), ("v5p:4x4x4", "fsdp_tensor")])  # fmt: skip
def test_process_rows_on_a_tpu_slice_in_physical_order(topology, mesh):
    """A slice's mesh follows the chips' physical order, so a host's chips hold non-adjacent rows: every
    process still gets an equal block in shard order (was: 'non-contiguous batch rows; reorder the mesh',
    so training could not start on most multi-host slices); the devices' rows stay disjoint and complete."""
    pytest.importorskip("libtpu")
    from lumina_jax.parallel.aot import topology_devices
    from lumina_jax.parallel.sharding import process_row_sets, process_rows

    devices = topology_devices(topology)
    m = M.create_mesh(mesh, devices)
    batch = 2 * len(devices)
    sets = process_row_sets(batch, m)
    assert len(sets) == len({d.process_index for d in devices}) > 1
    blocks = {p: process_rows(batch, m, process=p) for p in sets}
    shard_count = {b[3] for b in blocks.values()}
    assert len(shard_count) == 1
    count = shard_count.pop()
    per_shard = {b[2]: b[:2] for b in blocks.values()}
    assert sorted(per_shard) == list(range(count))  # every shard fed, blocks tile the batch in shard order
    assert sorted(per_shard.values()) == [(i * batch // count, (i + 1) * batch // count) for i in range(count)]
    # processes with the same shard hold the same rows; different shards hold disjoint rows
    rows = {b[2]: {r for a, z in sets[p] for r in range(a, z)} for p, b in blocks.items()}
    assert sorted(r for rs in rows.values() for r in rs) == list(range(batch))
    if mesh == {"fsdp": -1}:
        assert any(len(rs) > 1 for rs in sets.values())  # the case that used to fail


def test_attention_shard_layout_keeps_what_divides():
    from lumina_jax.parallel.context import shard_layout

    sizes = {"data": 2, "fsdp": 4, "context": 1, "tensor": 8}
    # a batch of 2 keeps data, drops fsdp; 16 / 4 heads on tensor 8: K/V heads repeated twice
    assert shard_layout(sizes, 2, 16, 4, ("data", "fsdp"), "tensor") == ("data", "tensor", 2)
    assert shard_layout(sizes, 8, 16, 8, ("data", "fsdp"), ("tensor",)) == (("data", "fsdp"), "tensor", 1)
    assert shard_layout(sizes, 1, 24, 8, ("data", "fsdp"), "tensor") == (None, "tensor", 1)
    assert shard_layout(sizes, 8, 12, 4, ("data", "fsdp"), "tensor") == (("data", "fsdp"), None, 1)  # 12 % 8
    assert shard_layout(dict(sizes, tensor=16), 8, 48, 6, "data", "tensor") == ("data", None, 1)  # 16 % 6


_GQA_CONTEXT_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType
from lumina_jax.ops.attention import attention
from lumina_jax.parallel.mesh import LOGICAL_RULES
import flax.linen as nn
rng = np.random.default_rng(0)
b, l, hq, hkv, d = 2, 13, 8, 2, 16
q = jnp.asarray(rng.standard_normal((b, l, hq, d)), jnp.float32)
k, v = (jnp.asarray(rng.standard_normal((b, l, hkv, d)), jnp.float32) for _ in range(2))
n = jnp.asarray([13, 6])
ref = attention(q, k, v, kv_lengths=n, backend="xla")
mesh = jax.make_mesh((1, 1, 2, 4), ("data", "fsdp", "context", "tensor"), axis_types=(AxisType.Auto,) * 4)
with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    out = jax.jit(lambda q, k, v, n: attention(q, k, v, kv_lengths=n, backend="context_xla"))(q, k, v, n)
err = float(jnp.max(jnp.abs(out - ref)))
loss = lambda backend: lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, kv_lengths=n, backend=backend)))
g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    g = jax.jit(jax.grad(loss("context_xla"), argnums=(0, 1, 2)))(q, k, v)
gerr = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(g, g_ref))
print("ERR", err, gerr)
assert err < 1e-5 and gerr < 1e-5, (err, gerr)
with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):  # cross-attention: refused by name
    try:
        jax.jit(lambda q, k, v: attention(q, k, v, backend="context_xla"))(q, k[:, :5], v[:, :5])
        raise SystemExit("no error for 13 queries and 5 keys")
    except ValueError as e:
        assert "context-parallel attention is self-attention: 13 queries but 5 keys" in str(e), e
"""


def test_context_attention_with_more_tensor_devices_than_kv_heads(tmp_path):
    """8 / 2 heads on tensor=4 (x context=2): K/V heads repeated so heads stay split; outputs and gradients
    (through the repeat) equal one device's; queries and keys of different lengths are refused by name."""
    import subprocess
    import sys

    from test_parallel_meshes import subprocess_env

    r = subprocess.run([sys.executable, "-c", _GQA_CONTEXT_SCRIPT], env=subprocess_env(8), cwd=REPO,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0 and "ERR" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


_GPU_KERNEL_SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType
import lumina_jax.ops.attention as attn
from lumina_jax.ops.attention import attention
from lumina_jax.parallel.mesh import LOGICAL_RULES
import flax.linen as nn
rng = np.random.default_rng(0)
b, l, hq, hkv, d = 4, 19, 8, 2, 16
q = jnp.asarray(rng.standard_normal((b, l, hq, d)), jnp.float32)
k, v = (jnp.asarray(rng.standard_normal((b, l, hkv, d)), jnp.float32) for _ in range(2))
n = jnp.asarray([19, 6, 1, 12])
loss = lambda backend: lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, kv_lengths=n, backend=backend)))
ref, g_ref = attention(q, k, v, kv_lengths=n, backend="xla"), jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
# "auto" as on a GPU without cuDNN: the Triton kernel (interpreted here) per shard
attn._AUTO_PREFERENCE["cpu"] = ("pallas_sharded",)
for shape, backend in (((2, 1, 1, 4), "pallas_sharded"), ((1, 2, 1, 4), "auto"), ((2, 1, 2, 2), "context")):
    mesh = jax.make_mesh(shape, ("data", "fsdp", "context", "tensor"), axis_types=(AxisType.Auto,) * 4)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        fwd = jax.jit(lambda q, k, v: attention(q, k, v, kv_lengths=n, backend=backend))
        out, hlo = fwd(q, k, v), fwd.lower(q, k, v).as_text()
        g = jax.jit(jax.grad(loss(backend), argnums=(0, 1, 2)))(q, k, v)
    err = float(jnp.max(jnp.abs(out - ref)))
    gerr = max(float(jnp.max(jnp.abs(a - c)) / jnp.max(jnp.abs(c))) for a, c in zip(g, g_ref))  # |dv| ~ 76
    mapped = "manual_computation" in hlo or "SPMDFullToShardShape" in hlo
    print("ERR", shape, backend, err, gerr, mapped)
    assert err < 1e-5 and gerr < 1e-5 and mapped, (shape, backend, err, gerr, mapped)
"""


def test_gpu_kernel_runs_per_shard_under_a_mesh(tmp_path):
    """``pallas_sharded`` (``auto`` on GPU after cuDNN) runs the Triton kernel (interpreted here) inside
    ``shard_map`` over the batch / head axes, and ``context`` (inner ``auto``) runs it inside its own
    map without nesting another: outputs and gradients equal XLA on one device (GQA 8/2 on tensor=4, ragged
    lengths, 8 devices)."""
    from test_parallel_meshes import subprocess_env

    r = subprocess.run([sys.executable, "-c", _GPU_KERNEL_SHARDED_SCRIPT], env=subprocess_env(8), cwd=REPO,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0 and r.stdout.count("ERR") == 3, r.stdout[-2000:] + r.stderr[-4000:]


def test_cli_environment_defaults(monkeypatch):
    """With libtpu installed and no TPU here, commands default to the CPU backend (no libtpu errors on
    every command); a TPU VM or the user's own JAX_PLATFORMS is left alone; transformers' torch advice off."""
    import importlib.util

    from lumina_jax import __main__ as entry

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "libtpu" else
                        (None if name in entry._GPU_PLUGINS else found(name)))  # fmt: skip
    monkeypatch.setattr("glob.glob", lambda pattern: [])
    assert entry.quiet_environment({}) == {"JAX_PLATFORMS": "cpu", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    assert entry.quiet_environment({"TPU_NAME": "v5p-128"}) == {"TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    assert entry.quiet_environment({"JAX_PLATFORMS": "", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "0"}) == {}
    monkeypatch.setattr("glob.glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    assert "JAX_PLATFORMS" not in entry.quiet_environment({})


def _fake_os_exit(monkeypatch, distributed) -> tuple[list, type]:
    """``distributed.os._exit`` recording its code and raising the returned exception type instead."""
    exits = []

    class Exited(Exception):
        pass

    def fake_exit(code):
        exits.append(code)
        raise Exited

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    return exits, Exited


def test_a_process_that_fails_alone_exits_at_once_in_a_multi_process_job(monkeypatch, tmp_path):
    """Returning an error code would run JAX's distributed shutdown, which waits ~5 minutes for the other
    processes (blocked in a collective with this one); the launcher stops them only once one exits."""
    import jax

    from lumina_jax.parallel import distributed
    from lumina_jax.train import cli
    from lumina_jax.train.loop import Trainer

    exits, Exited = _fake_os_exit(monkeypatch, distributed)
    assert distributed.exit_alone(3) == 3 and exits == []  # one process: an ordinary return
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert distributed.exit_alone(0) == 0 and exits == []
    with pytest.raises(Exited):
        distributed.exit_alone(2)

    def fail(self):
        raise ValueError("latent cache /nowhere: no such directory")

    monkeypatch.setattr(Trainer, "run", fail)
    with pytest.raises(Exited):
        cli.main(["tiny_synthetic", f"run_dir={tmp_path}", "log.progress=false"])
    assert exits == [2, 2]


@pytest.mark.parametrize("failure", [SystemExit("caption: error: --out is a folder"), SystemExit(2), ValueError("x")])
def test_a_command_that_raises_in_a_multi_process_job_exits_at_once(monkeypatch, capsys, failure):
    """Commands report setup errors as ``SystemExit`` (argparse, ``caption``) or raise: on a pod that
    process must exit at once too, not sit in JAX's shutdown barrier while its peers wait for it."""
    import types

    import jax

    import lumina_jax.__main__ as entry
    from lumina_jax.parallel import distributed

    def fail(argv):
        raise failure

    monkeypatch.setitem(sys.modules, "fake_command", types.SimpleNamespace(main=fail))
    monkeypatch.setitem(entry.COMMANDS, "fake", ("fake_command", "fails"))
    with pytest.raises(type(failure)):  # one process: the error propagates as before
        entry.main(["fake"])
    monkeypatch.setattr(distributed, "_initialized", True)
    exits, Exited = _fake_os_exit(monkeypatch, distributed)
    monkeypatch.setattr(distributed.logging, "shutdown", lambda: None)  # would close capsys' handlers
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(Exited):
        entry.main(["fake"])
    assert exits == [2 if failure.args == (2,) else 1]
    err = capsys.readouterr().err
    if isinstance(failure, ValueError):
        assert "Traceback" in err and "ValueError: x" in err
    elif failure.args != (2,):
        assert "--out is a folder" in err


def test_a_bad_coordinator_is_a_usage_error_of_the_commands(monkeypatch, capsys, tmp_path):
    """``LUMINA_COORDINATOR=localhost`` (no port) was an IndexError from inside JAX: now each command says it."""
    from lumina_jax.train import cli

    for k, v in {"LUMINA_COORDINATOR": "localhost", "LUMINA_NUM_PROCESSES": "2", "LUMINA_PROCESS_ID": "0"}.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["tiny_synthetic", f"run_dir={tmp_path}"]) == 2
    assert "train: error: coordinator 'localhost' is not host:port" in capsys.readouterr().err
