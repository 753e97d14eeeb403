"""Sharded forward + train step on 8 virtual CPU devices equal one device, for every mesh preset.

The work runs in one subprocess (this file executed as a script, ``XLA_FLAGS`` set before JAX starts;
the pytest process already has a 1-device backend from conftest.py) and writes a JSON report that
the tests below check:

* forward and one train step (fp32) under ``dp`` (data=8), ``fsdp`` (fsdp=8), ``fsdp_tensor``
  (fsdp=4 x tensor=2) and ``context`` (data=2 x context=4, attention backend ``context``): relative L2
  error of the output, the loss, the gradient norm and every updated param <= 1e-5;
* each param's actual ``.sharding.spec`` equals the spec derived from the rule table
  (:data:`lumina_jax.parallel.mesh.LOGICAL_RULES`), for params, EMA and Adam moments;
* the context mesh really runs the attention inside ``shard_map`` with an all-gather;
* ``init_params_sharded`` equals the single-device ``init_params`` bit for bit;
* a train state saved from the fsdp mesh restores onto the fsdp x tensor mesh with new shardings;
* diffusers and original checkpoints load straight into their shardings (``load_transformer_sharded``),
  bit for bit, each PyTorch tensor read once per param it feeds, not once per device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lumina_jax.xla_flags import with_cpu_devices

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5
MESHES = {
    "dp": {"preset": "dp"},
    "fsdp": {"preset": "fsdp"},
    "fsdp_tensor": {"fsdp": 4, "tensor": 2},
    "context": {"data": 2, "context": 4},
}


def subprocess_env(devices: int = 8) -> dict:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=with_cpu_devices(devices),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        JAX_COMPILATION_CACHE_DIR=env.get("JAX_COMPILATION_CACHE_DIR", "/tmp/lumina_jax_test_jit_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def run_worker(script: str, out: Path, devices: int = 8) -> dict:
    """Run ``script`` (a test file whose ``__main__`` writes a JSON report to ``out``) on ``devices``
    virtual CPU devices; its report, or an AssertionError with its output."""
    proc = subprocess.run([sys.executable, script, str(out)], env=subprocess_env(devices), cwd=REPO,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_worker(__file__, tmp_path_factory.mktemp("meshes") / "report.json")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_forward_matches_one_device(report, name):
    r = report["meshes"][name]
    assert r["forward_rel"] <= TOL, r


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_train_step_matches_one_device(report, name):
    r = report["meshes"][name]
    assert r["loss_rel"] <= TOL and r["grad_norm_rel"] <= TOL, r
    assert r["params_rel_max"] <= TOL, (r["params_rel_max"], r["params_worst"])
    assert r["ema_rel_max"] <= TOL, r


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_param_specs_follow_rule_table(report, name):
    r = report["meshes"][name]
    assert r["spec_mismatches"] == [], r["spec_mismatches"][:10]
    assert r["n_sharded_params"] > 0 or name == "dp"


@pytest.mark.slow
def test_context_mesh_uses_shard_map_all_gather(report):
    assert report["context_hlo"]["all_gather"] and report["context_hlo"]["shard_map"], report["context_hlo"]


@pytest.mark.slow
def test_sharded_init_equals_single_device_init(report):
    assert report["init_max_abs_diff"] == 0.0
    assert report["init_bf16_dtypes"] == ["bfloat16"]
    assert report["init_bf16_max_abs_diff"] == 0.0
    assert report["init_bf16_vs_fp32_max_abs_diff"] == 0.0  # the fp32 init, rounded


@pytest.mark.slow
@pytest.mark.parametrize("what", ["diffusers/fsdp", "diffusers/fsdp_tensor", "original/fsdp", "original/fsdp_tensor"])
def test_foreign_checkpoint_loads_into_its_shardings_reading_each_tensor_once(report, what):
    """``load_transformer_sharded`` gives the saved params bit for bit, on the rule table's shardings, and
    reads each PyTorch tensor once: not once per device shard (8 devices here), nor once per JAX param it
    feeds (the original's fused qkv feeds q, k and v)."""
    r = report["sharded_load"][what]
    assert r["max_abs_diff"] == 0.0 and r["specs_ok"], r
    assert r["max_reads"] == 1, r
    assert r["n_keys"] > 10, r
    assert r["norm_final_ones"] == what.startswith("diffusers"), r


@pytest.mark.slow
def test_restore_onto_other_mesh(report):
    r = report["restore"]
    assert r["max_abs_diff"] == 0.0 and r["specs_ok"], r


# ----------------------------------------------------------------------------------------------
# worker (runs in the subprocess)


def _expected_spec(names, shape, sizes):
    """The rule table resolved by hand, independently of lumina_jax.parallel.mesh."""
    table = {"embed": ("fsdp", "context"), "heads": ("tensor",), "kv_heads": ("tensor",), "mlp": ("tensor",),
             "modulation": ("tensor",)}
    used, out = set(), []
    for n, dim in zip(names, shape):
        keep = []
        for a in table.get(n, ()):
            if a in used or sizes[a] == 1:
                continue
            prod = 1
            for x in keep + [a]:
                prod *= sizes[x]
            if dim % prod == 0:
                keep.append(a)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    while out and out[-1] is None:
        out.pop()
    return out


def _worker(out_path: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    import lumina_jax.parallel.context  # noqa: F401  (registers the "context" backend)
    from lumina_jax.models.nextdit import NextDiT, NextDiTConfig, init_params
    from lumina_jax.parallel import mesh as M
    from lumina_jax.parallel import sharding as S
    from lumina_jax.train import optim
    from lumina_jax.train.checkpoint import RunCheckpoints
    from lumina_jax.train.state import abstract_with_shardings, init_state, state_shardings
    from lumina_jax.train.step import StepConfig, compile_train_step, forward_fn, make_train_step

    assert jax.device_count() == 8, jax.devices()
    cfg = NextDiTConfig.from_yaml("nextdit_tiny")
    boxed = S.model_abstract(cfg)
    abstract = S.unbox(boxed)
    rng = np.random.default_rng(0)
    # random (non-trivial) params: zero-initialised adaLN/final layers would hide errors
    host = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape) / np.sqrt(a.shape[-1])).astype(np.float32), abstract)
    b = 8
    lat = rng.standard_normal((b, 8, 8, 16)).astype(np.float32)
    t = rng.uniform(size=(b,)).astype(np.float32)
    cap = rng.standard_normal((b, 8, 32)).astype(np.float32)
    mask = np.zeros((b, 8), bool)
    for i, n in enumerate([8, 5, 8, 3, 8, 1, 7, 8]):
        mask[i, :n] = True
    batch = {"latents": lat, "cap_feats": cap, "cap_mask": mask, "valid": np.ones((b,), bool)}
    # lr 1e-3: Adam's first update is ~lr * sign(g), so gradient elements at round-off level may flip
    # sign between reduction orders; a realistic LR keeps that far below the tolerance.
    ocfg = optim.OptimizerConfig(lr=1e-3)
    tx = optim.make_optimizer(ocfg)
    sc = StepConfig(seed=3, mu=0.6, aux_loss_weight=0.0)
    hp = optim.stage_hparams(1e-3, 0, 10)

    def run(mesh, backend):
        model = NextDiT(cfg, attention_backend=backend)
        shardings = S.param_shardings(boxed, mesh)
        params = S.put_params(host, shardings)
        abstract_state = jax.eval_shape(lambda p: init_state(p, tx, True), abstract)
        st_sh = state_shardings(abstract_state, shardings, mesh)
        with jax.set_mesh(mesh):
            state = jax.jit(lambda p: init_state(p, tx, True), out_shardings=st_sh)(params)
            gb = {k: jax.device_put(v, M.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
            fwd = jax.jit(forward_fn(model))
            out = fwd(params, gb["latents"], jax.device_put(t, M.batch_sharding(mesh, 1)), gb["cap_feats"], gb["cap_mask"])
            hlo = fwd.lower(params, gb["latents"], jax.device_put(t, M.batch_sharding(mesh, 1)), gb["cap_feats"],
                            gb["cap_mask"]).as_text()  # fmt: skip
        step = compile_train_step(make_train_step(model, tx, optim.lr_schedule(ocfg), sc), mesh, st_sh, gb, donate=False)
        new_state, metrics = step(state, gb, hp)
        return out, new_state, metrics, hlo, st_sh

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    mesh1 = M.create_mesh({"data": 1}, devices=jax.devices()[:1])
    ref_out, ref_state, ref_m, _, _ = run(mesh1, "xla")
    ref_params = S.gather_to_host(ref_state.params)
    ref_ema = S.gather_to_host(ref_state.ema)
    report = {"meshes": {}}
    keep_states = {}
    for name, mc in MESHES.items():
        mesh = M.create_mesh(mc)
        out, st, m, hlo, st_sh = run(mesh, "context" if name == "context" else "xla")
        sizes = M.mesh_shape(mesh)
        params = S.gather_to_host(st.params)
        errs = jax.tree_util.tree_flatten_with_path(jax.tree.map(rel, params, ref_params))[0]
        worst = max(errs, key=lambda e: e[1])
        names_tree = S.logical_names(boxed)
        mismatches, n_sharded = [], 0
        flat_names = {optim.path_str(p): n for p, n in jax.tree_util.tree_flatten_with_path(
            names_tree, is_leaf=lambda x: x is None or isinstance(x, tuple))[0]}  # fmt: skip
        trees = {"params": st.params, "ema": st.ema}
        for what, tree in trees.items():
            for p, arr in jax.tree_util.tree_flatten_with_path(tree)[0]:
                key = optim.path_str(p)
                want = _expected_spec(flat_names[key], arr.shape, sizes)
                got = list(arr.sharding.spec)
                while got and got[-1] is None:
                    got.pop()
                got = [tuple(g) if isinstance(g, list) else g for g in got]
                if got != want:
                    mismatches.append([what, key, str(got), str(want)])
                n_sharded += any(g is not None for g in got)
        # Adam moments (mu, nu): same sharding as the param at the same path
        param_sh = {tuple(k.key for k in p if hasattr(k, "key")): a.sharding
                    for p, a in jax.tree_util.tree_flatten_with_path(st.params)[0]}  # fmt: skip
        n_moments = 0
        for p, x in jax.tree_util.tree_flatten_with_path(st.opt_state)[0]:
            key = tuple(k.key for k in p if hasattr(k, "key"))
            if x.ndim == 0:
                continue
            n_moments += 1
            if key not in param_sh or not x.sharding.is_equivalent_to(param_sh[key], x.ndim):
                mismatches.append(["opt_state", "/".join(map(str, key)), str(x.sharding.spec), str(param_sh.get(key))])
        assert n_moments == 2 * len(param_sh), (n_moments, len(param_sh))
        report["meshes"][name] = {
            "mesh": M.describe(mesh),
            "forward_rel": rel(out, ref_out),
            "loss_rel": rel(m["loss"], ref_m["loss"]),
            "grad_norm_rel": rel(m["grad_norm"], ref_m["grad_norm"]),
            "params_rel_max": worst[1],
            "params_worst": optim.path_str(worst[0]),
            "ema_rel_max": max(jax.tree.leaves(jax.tree.map(rel, S.gather_to_host(st.ema), ref_ema))),
            "spec_mismatches": mismatches,
            "n_sharded_params": n_sharded,
            "loss": float(m["loss"]),
        }
        if name == "context":
            report["context_hlo"] = {"all_gather": "all-gather" in hlo or "all_gather" in hlo,
                                     # shard_map lowers to Shardy's manual_computation (GSPMD: full-to-shard)
                                     "shard_map": "manual_computation" in hlo or "SPMDFullToShardShape" in hlo}  # fmt: skip
        keep_states[name] = (st, st_sh, mesh)

    # sharded random init == single-device init
    p1 = init_params(cfg, 0)
    p8 = S.init_params_sharded(cfg, M.create_mesh("fsdp"), 0)
    report["init_max_abs_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                      for a, b in zip(jax.tree.leaves(S.gather_to_host(p8)), jax.tree.leaves(p1)))  # fmt: skip
    # ... also when created in bf16 (written layer by layer into bf16 stacks)
    p1b = init_params(cfg, 0, dtype=jnp.bfloat16)
    p8b = S.init_params_sharded(cfg, M.create_mesh("fsdp"), 0, dtype=jnp.bfloat16)
    report["init_bf16_dtypes"] = sorted({str(a.dtype) for a in jax.tree.leaves(p8b)})
    report["init_bf16_max_abs_diff"] = max(
        float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
        for a, b in zip(jax.tree.leaves(S.gather_to_host(p8b)), jax.tree.leaves(p1b)))  # fmt: skip
    report["init_bf16_vs_fp32_max_abs_diff"] = max(
        float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b.astype(jnp.bfloat16), np.float32))))
        for a, b in zip(jax.tree.leaves(p1b), jax.tree.leaves(p1)))  # fmt: skip

    # save on fsdp, restore onto fsdp x tensor
    st, _, _ = keep_states["fsdp"]
    _, sh_tp, mesh_tp = keep_states["fsdp_tensor"]
    ck = RunCheckpoints(Path(out_path).parent / "ckpt", async_save=True)
    ck.save(1, st, {"step": 1})
    ck.wait()
    target = abstract_with_shardings(jax.eval_shape(lambda s: s, st), sh_tp)
    restored, meta = ck.restore(1, target)
    ck.close()
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(S.gather_to_host(restored)),
                                                               jax.tree.leaves(S.gather_to_host(st))))  # fmt: skip
    specs_ok = all(r.sharding == s for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(sh_tp)))
    report["restore"] = {"max_abs_diff": diff, "specs_ok": bool(specs_ok), "meta": meta}

    # a foreign checkpoint loaded straight into its shardings: the same params, each tensor read once
    from lumina_jax.convert import common as conv_common
    from lumina_jax.convert.nextdit import save_transformer

    reads: dict = {}
    plain_get = conv_common.TensorSource.get

    def counting_get(self, key):
        reads[key] = reads.get(key, 0) + 1
        return plain_get(self, key)

    conv_common.TensorSource.get = counting_get
    report["sharded_load"] = {}
    cfg5 = cfg.replace(n_layers=5)  # more layers than the loader's tensor cache holds
    boxed5 = S.model_abstract(cfg5)
    host5 = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), S.unbox(boxed5))
    for fmt, dest in (("diffusers", "dit_diffusers"), ("original", "dit_original.safetensors")):
        saved = save_transformer(Path(out_path).parent / dest, cfg5, host5, fmt)
        for name in ("fsdp", "fsdp_tensor"):
            reads.clear()
            mesh = M.create_mesh(MESHES[name])
            _, loaded = S.load_transformer_sharded(saved, mesh)
            want_sh = S.param_shardings(boxed5, mesh)
            diffs = jax.tree_util.tree_flatten_with_path(
                jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), S.gather_to_host(loaded), host5))[0]
            report["sharded_load"][f"{fmt}/{name}"] = {
                # diffusers has no norm_final (the original's unused final norm): it loads as ones
                "max_abs_diff": max(d for p, d in diffs if fmt == "original" or "norm_final" not in optim.path_str(p)),
                "norm_final_ones": bool(np.all(np.asarray(loaded["norm_final"]) == 1.0)),
                "specs_ok": all(a.sharding == s for a, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(want_sh))),
                "max_reads": max(reads.values()),
                "n_keys": len(reads),
            }  # fmt: skip
    conv_common.TensorSource.get = plain_get
    Path(out_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    _worker(sys.argv[1])
