"""Whole model folders converted between the project's layout and diffusers' ``Lumina2Pipeline`` folder:
``save_components(layout="diffusers")`` and ``python -m lumina_jax convert MODEL_DIR DST``.

A tiny random diffusers ``Lumina2Pipeline`` (the reference) is saved with ``save_pretrained``, read, written
in our layout, read again and written as a diffusers folder: every tensor of that folder equals the
reference's own files bit for bit, and diffusers loads it and generates the same image as the reference.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import diffusers  # noqa: F401 -- required (requirements-dev.txt): a missing one fails, not skips
import torch
from conftest import saved_reference_pipeline

from lumina_jax.convert import cli
from lumina_jax.convert.components import load_components, save_components, verify_components
from lumina_jax.convert.errors import CheckpointError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "lumina_jax" / "assets" / "default_model"
COMPONENT_FOLDERS = ("transformer", "text_encoder", "vae")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(diffusers pipeline, its saved folder)."""
    ref, _, folder = saved_reference_pipeline(tmp_path_factory.mktemp("ref"))
    return ref, folder


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a diffusers/transformers component folder (all its safetensors shards), as NumPy."""
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no safetensors in {folder}"
    return out


def _images(pipe, seed: int = 0) -> np.ndarray:
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        return pipe(["a photo of a cat"], num_inference_steps=3, guidance_scale=4.0, output_type="np",
                    generator=g).images  # fmt: skip


def test_diffusers_folder_round_trips_bit_exact_through_our_layout_and_diffusers_loads_it(reference, tmp_path):
    from diffusers import Lumina2Pipeline as DiffusersPipeline

    ref, ref_dir = reference
    ours = save_components(tmp_path / "ours", load_components(ref_dir, dtype=None))
    back = save_components(tmp_path / "back", load_components(ours, dtype=None), layout="diffusers")
    index = json.loads((back / "model_index.json").read_text())
    want = json.loads((ref_dir / "model_index.json").read_text())
    assert {k: v for k, v in index.items() if not k.startswith("_")} == \
           {k: v for k, v in want.items() if not k.startswith("_")}  # fmt: skip
    assert "_lumina_jax" not in index  # the released model's settings: nothing extra to record
    for name in COMPONENT_FOLDERS:
        a, b = _tensors(ref_dir / name), _tensors(back / name)
        assert sorted(a) == sorted(b), name
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (name, k)
            assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), (name, k)
    sched = lambda d: json.loads((d / "scheduler" / "scheduler_config.json").read_text())  # noqa: E731
    assert {k: v for k, v in sched(back).items() if not k.startswith("_")} == \
           {k: v for k, v in sched(ref_dir).items() if not k.startswith("_")}  # fmt: skip
    # diffusers loads it as it loads the reference's own folder. The weights are copied out of the files'
    # memory maps first: CPU matmuls round differently with the data's alignment, which depends on where a
    # writer put each tensor in its file (~6e-6 here), not on the values
    loaded, loaded_ref = (DiffusersPipeline.from_pretrained(d) for d in (back, ref_dir))
    for p in (loaded, loaded_ref):
        p.set_progress_bar_config(disable=True)
        for module in (p.transformer, p.text_encoder, p.vae):
            for w in module.parameters():
                w.data = w.data.clone()
    assert type(loaded.tokenizer) is type(ref.tokenizer)
    got, expected = _images(loaded), _images(loaded_ref)
    assert expected.std() > 0.05  # a real image, not a blank
    np.testing.assert_array_equal(got, expected)  # the same weights run by the same code
    assert np.abs(expected - _images(ref)).max() < 1e-4


def test_project_settings_survive_the_diffusers_layout_and_bad_ones_are_named(reference, tmp_path):
    from diffusers import Lumina2Pipeline as DiffusersPipeline

    comps = load_components(reference[1], dtype=None)
    custom = dataclasses.replace(comps, system_prompt="empty", guidance_scale=2.5, default_image_size=48)
    d = save_components(tmp_path / "d", custom, layout="diffusers", dtype="bf16")
    index = json.loads((d / "model_index.json").read_text())
    # the size goes where diffusers reads it: the transformer's sample_size (latent pixels; VAE factor 8)
    assert index["_lumina_jax"] == {"system_prompt": "empty", "guidance_scale": 2.5}
    assert json.loads((d / "transformer" / "config.json").read_text())["sample_size"] == 6
    back = load_components(d, dtype=None)
    assert (back.system_prompt, back.guidance_scale, back.default_image_size) == ("empty", 2.5, 48)
    odd = save_components(tmp_path / "odd", dataclasses.replace(custom, default_image_size=52), layout="diffusers")
    assert json.loads((odd / "model_index.json").read_text())["_lumina_jax"]["default_image_size"] == 52
    assert load_components(odd).default_image_size == 52
    assert {str(v.dtype) for v in _tensors(d / "transformer").values()} == {"bfloat16"}
    assert verify_components(d, custom, dtype="bf16") > 0
    with pytest.raises(CheckpointError, match="guidance_scale"):
        verify_components(d, dataclasses.replace(custom, guidance_scale=3.0), dtype="bf16")
    DiffusersPipeline.from_pretrained(d)  # diffusers skips the "_" key
    for bad, match in (({"guidance_scale": "high"}, "guidance_scale = 'high' is not a finite number"),
                       ({"steps": 4}, "unknown '_lumina_jax' setting 'steps'"), ([], "must be an object"),
                       ({"default_image_size": 0}, "is not a positive integer"),
                       ({"system_prompt": 3}, "is not a string")):
        index["_lumina_jax"] = bad
        (d / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match=match):
            load_components(d)
    # any finite guidance the pipeline takes (0, negative) round-trips; a non-finite one is refused before writing
    zero = save_components(tmp_path / "zero", dataclasses.replace(comps, guidance_scale=-1.0), layout="diffusers")
    assert load_components(zero).guidance_scale == -1.0
    with pytest.raises(CheckpointError, match="guidance_scale = nan is not a finite number"):
        save_components(tmp_path / "nan", dataclasses.replace(comps, guidance_scale=float("nan")), layout="diffusers")
    assert not (tmp_path / "nan").exists()
    with pytest.raises(ValueError, match="layout='original'"):
        save_components(tmp_path / "x", comps, layout="original")
    assert not (tmp_path / "x").exists()


def test_cli_converts_the_bundled_model_to_diffusers_and_back(tmp_path, capsys):
    from diffusers import Lumina2Pipeline as DiffusersPipeline

    out = tmp_path / "diffusers"
    assert cli.main([str(DEFAULT_MODEL), str(out), "--to", "diffusers", "--verify"]) == 0
    assert "tensors bit-exact" in capsys.readouterr().out
    src = load_components(DEFAULT_MODEL, dtype=None)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "Lumina2Pipeline"
    assert index["_lumina_jax"]["system_prompt"] == src.system_prompt  # the bundled model's own settings
    pipe = DiffusersPipeline.from_pretrained(out)
    assert pipe.transformer.config.num_layers == src.transformer_config.n_layers
    assert pipe.default_sample_size * pipe.vae_scale_factor == src.default_image_size == 64  # diffusers' default too
    back = tmp_path / "jax"
    assert cli.main([str(out), str(back), "--to", "jax", "--verify"]) == 0
    assert (back / "lumina_jax_pipeline.json").is_file()
    assert verify_components(back, src) > 0  # the bundled model whole, through diffusers and back

    # what a whole folder cannot be converted to, or with, is named
    for argv, match in (([str(DEFAULT_MODEL), str(tmp_path / "o"), "--to", "original"], "whole model folder"),
                        ([str(DEFAULT_MODEL), str(tmp_path / "o"), "--to", "jax", "--config", "tiny"], "--config"),
                        ([str(DEFAULT_MODEL), str(back), "--to", "jax"], "--overwrite")):
        assert cli.main(argv) == 1
        assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_verify_takes_an_older_folder_s_sample_size_and_sizes_are_checked(reference, tmp_path):
    """A folder written before the size went into sample_size (sample_size of the model + the size under
    _lumina_jax) verifies against its own load; a size that is not a positive integer is refused before
    anything is written, in either layout, and on reading a project folder."""
    comps = load_components(reference[1], dtype=None)
    d = save_components(tmp_path / "d", dataclasses.replace(comps, default_image_size=48), layout="diffusers")
    cfg = json.loads((d / "transformer" / "config.json").read_text())
    cfg["sample_size"] = comps.transformer_config.sample_size  # as the older writer left it
    (d / "transformer" / "config.json").write_text(json.dumps(cfg))
    index = json.loads((d / "model_index.json").read_text())
    index["_lumina_jax"] = {"default_image_size": 48}
    (d / "model_index.json").write_text(json.dumps(index))
    old = load_components(d, dtype=None)
    assert old.default_image_size == 48 and verify_components(d, old) > 0
    for layout in ("diffusers", "lumina_jax"):
        for bad in (0, -64):
            with pytest.raises(CheckpointError, match=f"default_image_size = {bad} is not a positive integer"):
                save_components(tmp_path / "bad", dataclasses.replace(comps, default_image_size=bad), layout=layout)
            assert not (tmp_path / "bad").exists()
    ours = save_components(tmp_path / "ours", comps)
    meta = json.loads((ours / "lumina_jax_pipeline.json").read_text())
    (ours / "lumina_jax_pipeline.json").write_text(json.dumps(dict(meta, guidance_scale="4")))
    with pytest.raises(CheckpointError, match="guidance_scale = '4' is not a finite number"):
        load_components(ours)
