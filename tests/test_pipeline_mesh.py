"""Sharded sampling (``Lumina2Pipeline(..., mesh=...)``, ``generate --mesh``) on 8 virtual CPU devices.

As in ``test_parallel_meshes.py`` the work runs in one subprocess (this file executed as a script, with
``XLA_FLAGS`` set before JAX starts) that writes a JSON report checked by the tests below:

* every mesh (``dp``, ``fsdp``, ``fsdp=2,tensor=2,data=2``, ``context`` with the context attention)
  gives the single-device latents and images (fp32, max abs difference <= 1e-4; round-off only), fused
  and stepwise, with a batch the batch axes split (8 images) and one they do not (2 images, dpm);
* weights land where the rule table puts them (a Next-DiT and a Gemma-2 matrix), the VAE replicated;
* the compiled program takes the noise split over ``(data, fsdp)``, and on ``dp`` each device does
  about 1/8 of the single-device FLOPs (the work is divided, not repeated); 2 images on 8 devices enter
  replicated but the activation constraints still split the work (well under the single-device FLOPs);
* ``schedule_flops`` and a sampling call with the same shapes do not share a program compiled for other
  input shardings; a mesh from ``jax.make_mesh`` (Explicit axes) works;
* ``python -m lumina_jax generate --mesh dp`` writes its images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lumina_jax.parallel.mesh import MeshConfig

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-4
MESHES = ("dp", "fsdp", "fsdp=2,tensor=2,data=2", "context")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from test_parallel_meshes import run_worker

    return run_worker(__file__, tmp_path_factory.mktemp("pipeline_mesh") / "report.json")


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_sampling_equals_one_device(report, mesh):
    r = report["meshes"][mesh]
    for run in ("fused", "stepwise", "unsplit_dpm"):
        assert r[run]["latents"] <= TOL, (mesh, run, r[run])
        assert r[run].get("images", 0.0) <= TOL, (mesh, run, r[run])
    assert r["noise_spec"] == [["data", "fsdp"], None, None, None]


def test_weights_follow_the_rule_table(report):
    specs = report["specs"]
    assert specs["dit_w1"] == [None, "fsdp", "tensor"]  # (layers, embed, mlp)
    assert specs["gemma_gate"] == [None, "fsdp", "tensor"]  # (layers, embed, mlp)
    assert specs["vae"] == []


def test_data_parallel_divides_the_work(report):
    assert report["flops_ratio_dp"] < 0.15  # 1/8 + round-off; replicated work would give 1.0
    assert report["flops_ratio_dp_unsplit"] < 0.6  # 2 images: split by the constraints (0.39 measured)


def test_flop_analysis_then_sampling_and_explicit_meshes(report):
    assert report["schedule_flops_ratio"] < 0.6  # per device, for the sharded programs
    assert report["after_schedule_flops"] <= TOL  # and sampling afterwards still runs (and agrees)
    assert report["explicit_mesh"] <= TOL


def test_cli_mesh(report):
    assert report["cli_rc"] == 0, report["cli_err"]
    assert report["cli_files"] == 8


def test_mesh_argument_parsing():
    assert MeshConfig.parse("dp") == MeshConfig(preset="dp")
    assert MeshConfig.parse("fsdp_tensor, tensor=4") == MeshConfig(preset="fsdp_tensor", tensor=4)
    assert MeshConfig.parse("fsdp=2,tensor=2") == MeshConfig(fsdp=2, tensor=2)
    for bad, msg in [("dpp", "unknown mesh preset 'dpp'"), ("gpu=2", "unknown axis 'gpu'"),
                     ("fsdp=two", "fsdp must be an integer"), ("dp,fsdp", "two presets"), (" , ", "empty mesh"),
                     ("fsdp=2,fsdp=4", "fsdp is given twice")]:
        with pytest.raises(ValueError, match=msg):
            MeshConfig.parse(bad)


def test_dcn_sizes_on_one_slice_are_warned(caplog):
    from lumina_jax.parallel.mesh import create_mesh, mesh_shape

    with caplog.at_level("WARNING", logger="lumina_jax.parallel.mesh"):
        mesh = create_mesh(MeshConfig.parse("dcn_fsdp=2,fsdp=-1"), devices=jax.devices()[:1])
    assert mesh_shape(mesh)["fsdp"] == 1 and "mesh dcn_fsdp=2 ignored: the 1 devices form one slice" in caplog.text


def test_mesh_errors(tmp_path, capsys):
    from jax.sharding import Mesh

    from lumina_jax.pipeline import Lumina2Pipeline
    from lumina_jax.sample.cli import main
    from lumina_jax.sample.tiny import random_components

    comps = random_components(0)
    with pytest.raises(ValueError, match=r"lack \['data', 'fsdp', 'context', 'tensor'\]"):
        Lumina2Pipeline(comps, mesh=Mesh(np.asarray(jax.devices()[:1]), ("x",)))
    n = jax.local_device_count() + 1
    with pytest.raises(ValueError, match=f"has {n} devices, but there are {n - 1}"):
        Lumina2Pipeline(comps, mesh=f"data={n}")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        Lumina2Pipeline(comps, attention_backend="flash")
    with pytest.raises(SystemExit) as e:  # argparse rejects it before anything loads
        main(["a cat", "--mesh", "dat=2", "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2 and "unknown axis 'dat'" in capsys.readouterr().err
    rc = main(["a cat", "--mesh", f"tensor={n}", "--out", str(tmp_path / "x.png"), "--compilation-cache", "off"])
    assert rc == 2 and f"has {n} devices, but there are {n - 1}" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# worker (runs in the subprocess)


def _worker(out_path: str) -> None:
    import os
    import subprocess
    import tempfile

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from lumina_jax.pipeline import Lumina2Pipeline
    from lumina_jax.sample import loop
    from lumina_jax.sample.tiny import random_components

    assert jax.device_count() == 8, jax.devices()
    comps = random_components(0)
    prompts = ["a red circle", "two blue squares on the left"]
    base = Lumina2Pipeline(comps, dtype="fp32")

    def run(p, **kw):
        kw = {"num_inference_steps": 3, "seed": 1, "output_type": "np", **kw}
        return p(prompts, **kw)

    def fused_exe(p):
        (exe,) = [v for k, v in p._executables.items() if k[0][0] == "fused"]
        return exe

    ref8 = run(base, num_images_per_prompt=4, mode="fused")
    ref2 = run(base, solver="dpm", mode="stepwise")
    flops_one = loop.compiled_flops(fused_exe(base))
    rep: dict = {"meshes": {}}
    diff = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max())  # noqa: E731
    for m in MESHES:
        p = Lumina2Pipeline(comps, dtype="fp32", mesh=m, attention_backend="context" if m == "context" else "auto")
        r = {}
        for mode in ("fused", "stepwise"):
            out = run(p, num_images_per_prompt=4, mode=mode)
            r[mode] = {"latents": diff(out.latents, ref8.latents), "images": diff(out.images, ref8.images)}
        exe = fused_exe(p)
        r["noise_spec"] = [list(e) if isinstance(e, tuple) else e for e in exe.input_shardings[0][2].spec]
        out = run(p, solver="dpm", mode="stepwise")  # 2 images: no mesh here splits them
        r["unsplit_dpm"] = {"latents": diff(out.latents, ref2.latents), "images": diff(out.images, ref2.images)}
        rep["meshes"][m] = r
        if m == "dp":
            rep["flops_ratio_dp"] = loop.compiled_flops(exe) / flops_one
            one, two = Lumina2Pipeline(comps, dtype="fp32"), Lumina2Pipeline(comps, dtype="fp32", mesh=m)
            assert diff(run(two, mode="fused").latents, run(one, mode="fused").latents) <= TOL  # 2 images
            rep["flops_ratio_dp_unsplit"] = loop.compiled_flops(fused_exe(two)) / loop.compiled_flops(fused_exe(one))
            # a FLOP analysis first, then a sampling call of the same shapes (caption length 64 as above)
            from lumina_jax.sample.solvers import make_schedule

            q = Lumina2Pipeline(comps, dtype="fp32", mesh=m)
            sched = make_schedule("euler", 3, guidance_scale=4.0)
            px = q.default_image_size
            rep["schedule_flops_ratio"] = (q.schedule_flops(sched, 8, px, px)["total"]
                                           / base.schedule_flops(sched, 8, px, px)["total"])  # fmt: skip
            ref_e = base(prompts, num_inference_steps=3, seed=1, output_type="latent", num_images_per_prompt=4,
                         mode="stepwise", solver="euler", guidance_scale=4.0)  # fmt: skip
            out_e = q(prompts, num_inference_steps=3, seed=1, output_type="latent", num_images_per_prompt=4,
                      mode="stepwise", solver="euler", guidance_scale=4.0)  # fmt: skip
            rep["after_schedule_flops"] = diff(out_e.latents, ref_e.latents)
            explicit = jax.make_mesh((2, 2, 1, 2), ("data", "fsdp", "context", "tensor"))
            rep["explicit_mesh"] = diff(run(Lumina2Pipeline(comps, dtype="fp32", mesh=explicit),
                                            num_images_per_prompt=4, mode="fused").latents, ref8.latents)  # fmt: skip
        if m == "fsdp=2,tensor=2,data=2":
            spec = lambda a: [list(e) if isinstance(e, tuple) else e for e in a.sharding.spec]  # noqa: E731
            rep["specs"] = {
                "dit_w1": spec(p.dit_params["layers"]["blocks"]["feed_forward"]["w1"]["kernel"]),
                "gemma_gate": spec(p.text_encoder.params["layers"]["mlp"]["gate_proj"]["kernel"]),
                "vae": spec(jax.tree_util.tree_leaves(p.vae_params)[0]),
            }
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.run([sys.executable, "-m", "lumina_jax", "generate", "a red circle", "--n", "8", "--steps",
                               "2", "--mesh", "dp", "--out", f"{d}/img.png", "--compilation-cache", "off", "-q"],
                              capture_output=True, text=True, env=dict(os.environ), timeout=600)  # fmt: skip
        rep.update(cli_rc=proc.returncode, cli_err=proc.stderr[-3000:], cli_files=len(list(Path(d).glob("*.png"))))
    Path(out_path).write_text(json.dumps(rep))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(sys.argv[1])


def test_slices_go_to_data_or_to_fsdp_and_bad_dcn_sizes_are_refused():
    """``dcn_fsdp=-1`` alone (the default ``dcn_data`` is -1 too) put every slice on fsdp, not "two -1s"."""
    from lumina_jax.parallel.mesh import MeshConfig, dcn_sizes

    assert dcn_sizes(MeshConfig(), 4)["data"] == 4
    assert (dcn_sizes(MeshConfig.parse("fsdp,dcn_fsdp=-1"), 4)["fsdp"], dcn_sizes(MeshConfig.parse("dcn_fsdp=-1"), 4)["data"]) == (4, 1)
    assert dcn_sizes(MeshConfig(dcn_data=2, dcn_fsdp=-1), 4) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 1}
    for bad in (0, -2):
        with pytest.raises(ValueError, match="dcn_data must be -1 .* or >= 1"):
            MeshConfig(dcn_data=bad)
