"""Ahead-of-time compilation for real TPU topologies on a CPU machine (``lumina_jax.parallel.aot``).

Needs ``libtpu`` (requirements-dev.txt; the version ``jax[tpu]`` pins for the installed jax). Without
it, or with a mismatched one, the whole module is skipped with the reason. Everything here compiles
with XLA:TPU / Mosaic for ``v5e:2x2`` and ``v5p:2x2x1`` (no interpret mode), tiny shapes only.
"""

from __future__ import annotations

import math
import os

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from lumina_jax.parallel import aot  # noqa: E402

_OK, _WHY = aot.libtpu_status()
if not _OK:
    pytest.skip(f"AOT TPU tests need libtpu: {_WHY}", allow_module_level=True)
try:
    _V5E = aot.topology_devices("v5e:2x2")
    _V5P = aot.topology_devices("v5p:2x2x1")
except Exception as e:  # pragma: no cover - libtpu present but unusable
    pytest.skip(f"AOT TPU tests: get_topology_desc failed ({type(e).__name__}: {e})", allow_module_level=True)

from lumina_jax.parallel.mesh import MeshConfig, create_mesh  # noqa: E402
from lumina_jax.train.config import load_config  # noqa: E402

# tiny Next-DiT (dim 64, 4/2 heads, 2 layers), bf16 compute, remat like the real recipe
TINY = ["dtype=bfloat16", "remat=dots", "attention=xla"]


@pytest.fixture(autouse=True)
def _tpu_matmul_precision():
    """conftest.py makes fp32 matmuls exact on CPU ("highest"); that setting reaches Mosaic as an fp32
    contract precision on bf16 operands, which it rejects ("Bad lhs type"). Compile as training does."""
    with jax.default_matmul_precision("default"):
        yield


def _cfg(mesh: dict, extra=()):
    return load_config("tiny_synthetic", [*TINY, f"mesh={mesh}", *extra])


def _tpu_custom_calls(compiled) -> int:
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')


@pytest.mark.parametrize("attention", ["splash_sharded", "pallas_tpu_sharded"])
def test_train_step_compiles_for_v5p_with_fsdp(attention):
    """The real train step (Adam, EMA, aux loss, splash or our own Mosaic kernels in shard_map) compiles
    for a v5p slice; every param/EMA/Adam array of the compiled executable is sharded over fsdp (none
    left replicated)."""
    cfg = _cfg("{fsdp: -1}")
    mesh = create_mesh(cfg.mesh, devices=_V5P)
    plan = aot.build_plan(cfg, mesh, what="train", per_device_batch=2, cap_len=16, resolution=64,
                          attention=attention)  # fmt: skip
    rep, compiled = aot.compile_plan(plan, topology="v5p:2x2x1", replicated_min_bytes=8 << 10)
    assert compiled is not None and rep.error is None
    assert rep.fits and rep.hbm_capacity == 95 * aot.GiB
    assert rep.argument_bytes > 0 and rep.temp_bytes > 0 and rep.total_bytes < 1 << 30
    assert rep.alias_bytes > 0  # the state is donated
    assert rep.xla_flops_per_device > 0
    assert rep.replicated_params == [], rep.replicated_params
    assert _tpu_custom_calls(compiled) >= 3, "attention should be Mosaic kernels (fwd, dq, dkv), not interpreted"
    # the compiled params really are split 4 ways over fsdp
    state_sh = compiled.input_shardings[0][0]
    leaves = jax.tree.leaves(state_sh.params)
    assert any("fsdp" in str(s.spec) for s in leaves), [s.spec for s in leaves]
    text = aot.format_report(rep)
    assert "FITS" in text and "temporaries" in text


def _argument_bytes_per_device(plan) -> int:
    """Bytes of a plan's arguments on one device, from their shardings (no compile)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(plan.args))


def test_lora_train_step_compiles_and_holds_no_optimizer_state_for_the_base():
    """A LoRA run's step (frozen base, adapters trained) compiles for v5p; its state (params + Adam + EMA)
    is a fraction of a full fine-tune's: Adam and the EMA cover the adapters only. The full step's
    arguments are counted from its plan's shardings (its compile is covered above)."""
    mesh = create_mesh(MeshConfig(fsdp=-1), devices=_V5P)
    plans = {name: aot.build_plan(_cfg("{fsdp: -1}", extra), mesh, what="train", per_device_batch=2, cap_len=16,
                                  resolution=64, attention="xla")
             for name, extra in (("full", ()), ("lora", ("lora.rank=4",)))}  # fmt: skip
    counted = {name: _argument_bytes_per_device(plan) for name, plan in plans.items()}
    rep, compiled = aot.compile_plan(plans["lora"], topology="v5p:2x2x1")
    assert compiled is not None and rep.error is None
    # XLA's figure is the count with small arrays padded to TPU tiles (dim-64 rows fill half a 128-lane
    # tile): 1.22 MB compiled, 0.68 MB counted
    assert counted["lora"] <= rep.argument_bytes < 2 * counted["lora"], (counted, rep.argument_bytes)
    # full: params + EMA + 2 Adam moments = 4 copies (1.60 MB per device counted); LoRA: one copy of the base
    # + the adapter's 4 copies (rank 4 on dim-64 matrices is 1/8 of each matrix here; ~1 % for the 2B)
    assert counted["lora"] < 0.6 * counted["full"], counted


@pytest.mark.parametrize(
    "mesh,what",
    [("{data: -1}", "sample"), ("{fsdp: -1}", "forward"), ("{fsdp: 2, tensor: 2}", "forward")],
    ids=["data-sample", "fsdp-forward", "fsdp_x_tensor-forward"],
)
def test_inference_compiles_for_v5e_meshes(mesh, what):
    cfg = _cfg(mesh)
    m = create_mesh(cfg.mesh, devices=_V5E)
    plan = aot.build_plan(cfg, m, what=what, per_device_batch=1, cap_len=16, resolution=64)
    rep, compiled = aot.compile_plan(plan, topology="v5e:2x2", replicated_min_bytes=8 << 10)
    assert compiled is not None and rep.fits and rep.hbm_capacity == 16 * aot.GiB
    assert rep.replicated_params == [], rep.replicated_params
    assert _tpu_custom_calls(compiled) > 0
    if what == "sample":
        assert plan.args[4].shape[0] == 2 * plan.global_batch  # cond + uncond rows (CFG)


@pytest.mark.parametrize("preset", ["fsdp", "fsdp_tensor"])
@pytest.mark.parametrize("model", ["nextdit_2b", "nextdit_7b"])
def test_rule_table_shards_every_large_param(model, preset):
    """On a 64-chip v5p mesh, no param of 1 MiB or more of the real configs is left replicated."""
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.parallel import sharding as S

    mesh = create_mesh(MeshConfig(preset=preset), devices=aot.topology_devices("v5p:4x4x4"))
    boxed = S.model_abstract(NextDiTConfig.from_yaml(model))
    abstract = S.unbox(boxed)
    sh = S.param_shardings(boxed, mesh)
    bad = aot.replicated_large_params(sh, abstract, 1 << 20, mesh)
    assert bad == [], bad


def test_replication_check_catches_a_bad_rule():
    """A rule table without the fsdp rule leaves the big weights replicated, and the check says so."""
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.parallel import sharding as S
    from lumina_jax.parallel.mesh import LOGICAL_RULES

    rules = tuple((k, None if k == "embed" else v) for k, v in LOGICAL_RULES)
    mesh = create_mesh("fsdp", devices=_V5E)
    boxed = S.model_abstract(NextDiTConfig.from_yaml("nextdit_2b"))
    bad = aot.replicated_large_params(S.param_shardings(boxed, mesh, rules), S.unbox(boxed), 1 << 20, mesh)
    assert len(bad) > 5 and bad[0][1] > 100 << 20


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_splash_compiles_through_mosaic(topology):
    """Splash, Lumina's attention shapes (24 query / 8 kv heads, head_dim 96, ragged keys): forward and
    backward compile for v5p and v6e inside shard_map, as Mosaic kernels."""
    from lumina_jax.ops.splash_attention import shard_over_batch_and_heads, splash_attention

    devices = _V5P if topology.startswith("v5p") else aot.topology_devices(topology)
    mesh = create_mesh("dp", devices=devices)
    batch = ("data", "fsdp")

    def attn(q, k, v, m, n):
        return splash_attention(q, k, v, kv_lengths=n, interpret=False, pad_head_dim=True)

    f = shard_over_batch_and_heads(attn, mesh, batch_axes=batch)

    def loss(q, k, v, n):
        return jnp.sum(f(q, k, v, None, n).astype(jnp.float32) ** 2)

    sh = NamedSharding(mesh, P(batch))
    b, length = 4, 320  # not a multiple of the block size: padded inside
    q = jax.ShapeDtypeStruct((b, length, 24, 96), jnp.bfloat16, sharding=sh)
    kv = jax.ShapeDtypeStruct((b, length, 8, 96), jnp.bfloat16, sharding=sh)
    n = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sh)
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, n).compile()
    assert _tpu_custom_calls(compiled) >= 2  # forward + backward kernels
    assert compiled.memory_analysis().temp_size_in_bytes > 0


@pytest.mark.parametrize("topology, masking", [("v5p:2x2x1", "lengths"), ("v6e:2x2", "mask"), ("v5e:2x2", "lengths")])
def test_our_tpu_kernel_compiles_through_mosaic(topology, masking):
    """Our own Mosaic kernels (``flash_attention(target="tpu")``, ops/flash_attention_tpu.py) at Lumina's
    head shapes (24 / 8 heads, head_dim 96 unpadded, a length that is not a block multiple): forward, dq
    and dk/dv compile for real TPU generations inside shard_map."""
    from lumina_jax.ops.flash_attention import flash_attention
    from lumina_jax.ops.splash_attention import shard_over_batch_and_heads

    devices = _V5P if topology.startswith("v5p") else (_V5E if topology.startswith("v5e") else aot.topology_devices(topology))
    mesh = create_mesh("dp", devices=devices)
    batch = ("data", "fsdp")

    def attn(q, k, v, m, n):
        return flash_attention(q, k, v, m, kv_lengths=n, interpret=False, target="tpu")

    f = shard_over_batch_and_heads(attn, mesh, batch_axes=batch)
    use_mask = masking == "mask"

    def loss(q, k, v, m, n):
        return jnp.sum(f(q, k, v, m if use_mask else None, None if use_mask else n).astype(jnp.float32) ** 2)

    sh = NamedSharding(mesh, P(batch))
    b, length = 4, 320
    q = jax.ShapeDtypeStruct((b, length, 24, 96), jnp.bfloat16, sharding=sh)
    kv = jax.ShapeDtypeStruct((b, length, 8, 96), jnp.bfloat16, sharding=sh)
    m = jax.ShapeDtypeStruct((b, length), jnp.bool_, sharding=sh)
    n = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sh)
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, m, n).compile()
    assert _tpu_custom_calls(compiled) >= 3  # forward, dq, dk/dv
    text = compiled.as_text()
    for name in ("lumina_flash_tpu_fwd", "lumina_flash_tpu_bwd_dq", "lumina_flash_tpu_bwd_dkv"):
        assert name in text, name


def test_oversized_step_is_reported_not_fitting(capsys):
    """Pure data parallel with a large per-device batch and materialised (xla) attention does not fit a
    16 GiB v5e chip: exit status 1 with the numbers, no crash."""
    rc = aot.main([
        "--topology", "v5e:2x2", "--config", "tiny_synthetic", "--mesh", "dp", "--what", "forward",
        "--per-device-batch", "64", "--resolution", "1024", "--cap-len", "16", "--attention", "xla",
        "dtype=bfloat16",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "DOES NOT FIT" in out and "GiB" in out


def test_parse_oom_message():
    msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
           "Used 118.52G of 95.74G hbm. Exceeded hbm capacity by 22.78G.")  # fmt: skip
    got = aot.parse_oom(msg)
    assert got["used"] == pytest.approx(118.52 * aot.GiB)
    assert got["capacity"] == pytest.approx(95.74 * aot.GiB)
    assert got["exceeded"] == pytest.approx(22.78 * aot.GiB)


def test_cli_errors_exit_2(capsys):
    assert aot.main(["--topology", "v5p", "--config", "tiny_synthetic"]) == 2
    assert aot.main(["--topology", "v5e:2x2", "--config", "no_such_config"]) == 2
    assert "aot:" in capsys.readouterr().err
    # v4 lists two TensorCores per chip: refused in one line (was an AssertionError traceback from mesh_utils)
    assert aot.main(["--topology", "v4:2x2x2", "--config", "tiny_synthetic"]) == 2
    assert "megacore" in capsys.readouterr().err


def test_hbm_table():
    assert aot.hbm_bytes("v5p") == 95 * aot.GiB
    assert aot.hbm_bytes("v6e") == aot.hbm_bytes("v4") == 32 * aot.GiB
    assert aot.hbm_bytes("v5e") == 16 * aot.GiB
    assert aot.generation(None, _V5E) == "v5e" and aot.generation(None, _V5P) == "v5p"
    assert np.isfinite(aot.HBM_GIB["v5p"])


def test_parse_oom_temporaries_message():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(395.85G) exceeds available HBM (95.74G).")  # fmt: skip
    got = aot.parse_oom(msg)
    assert got["used"] == pytest.approx(395.85 * aot.GiB) and got["capacity"] == pytest.approx(95.74 * aot.GiB)
    assert got["counts"] == "HLO temporaries"  # the arguments come on top: the report says "at least"
    rep = aot.Report(topology="v5p:2x2x1", generation="v5p", devices=4, mesh={"fsdp": 4}, what="train", model="m",
                     resolution=1024, global_batch=64, per_device_batch=16, cap_len=256, remat="none",
                     attention="auto", fits=False, hbm_capacity=int(got["capacity"]), max_fraction=0.9,
                     total_bytes=int(got["used"]), total_counts=got["counts"])  # fmt: skip
    assert "needs at least 395.85 GiB (HLO temporaries alone) per device" in aot.format_report(rep)


@pytest.mark.parametrize("args, message", [
    (["--per-device-batch", "0"], "--per-device-batch: must be >= 1"),
    (["--batch", "0"], "--batch: must be >= 1"),
    (["--resolution", "8"], "--resolution: must be >= 16"),
])  # fmt: skip
def test_sizes_are_checked_before_compiling(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        aot.main(["--topology", "v5e:2x2", "--config", "tiny_synthetic", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_resolution_off_the_16_pixel_grid_is_refused_not_rounded():
    cfg = load_config("tiny_synthetic", [])
    mesh = create_mesh({"data": 1}, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="resolution 72 is not a positive multiple of 16"):
        aot.build_plan(cfg, mesh, what="forward", resolution=72, global_batch=1)


def test_command_line_mesh_takes_presets_and_axis_sizes():
    """``aot --mesh`` as ``generate --mesh``: a preset, axis sizes, or both (axis sizes were read as a
    preset name and failed as an unknown config key)."""
    from lumina_jax.train.config import load_config

    assert aot.mesh_override("fsdp") == "mesh={preset: fsdp}"
    assert aot.mesh_override("fsdp=2,tensor=2") == "mesh={fsdp: 2, tensor: 2}"
    assert load_config("tiny_synthetic", [aot.mesh_override("fsdp_tensor,tensor=4")]).mesh.tensor == 4
    with pytest.raises(ValueError, match="unknown axis 'foo'"):
        aot.mesh_override("foo=2")
