"""``python -m lumina_jax convert``: library errors are reported with the CLI's flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from lumina_jax.convert import cli

TRANSFORMER = Path(__file__).resolve().parents[1] / "lumina_jax" / "assets" / "default_model" / "transformer"


def test_existing_destination_names_the_overwrite_flag(tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    assert cli.main([str(TRANSFORMER), str(dst), "--to", "jax"]) == 1
    err = capsys.readouterr().err
    assert str(dst) in err and "--overwrite" in err and "overwrite=True" not in err


def test_uninferable_config_names_the_config_flag(tmp_path, capsys, monkeypatch):
    from lumina_jax.convert import nextdit
    from lumina_jax.convert.errors import CheckpointError

    def fail(*a, **k):
        raise CheckpointError("head_dim 7 has no equal 3-axis RoPE split; pass config=")

    monkeypatch.setattr(nextdit, "load_transformer", fail)
    assert cli.main([str(TRANSFORMER), str(tmp_path / "out"), "--to", "jax"]) == 1
    err = capsys.readouterr().err
    assert "pass --config NAME" in err and "config=" not in err


@pytest.mark.parametrize("msg,want", [("x (pass overwrite=True to replace it)", "x (pass --overwrite to replace it)"),
                                      ("no q_norm; pass config=", "no q_norm; pass --config NAME (or a YAML path)")])
def test_cli_message(msg, want):
    assert cli.cli_message(ValueError(msg)) == want


def test_text_encoder_and_vae_convert_both_ways_bit_exact(tmp_path, capsys):
    """convert detects the bundled model's encoders (project folders, which share the Next-DiT folder's
    marker file) and converts them to transformers / diffusers / BFL and back, bit for bit."""
    import jax
    import numpy as np

    from lumina_jax.convert import load_text_encoder, load_vae

    te, vae = TRANSFORMER.parent / "text_encoder", TRANSFORMER.parent / "vae"
    steps = [(te, "te_hf", "diffusers"), ("te_hf", "te_jax", "jax"), (vae, "ae", "original"),
             ("ae/ae.safetensors", "vae_d", "diffusers"), ("vae_d", "vae_j", "jax")]  # fmt: skip
    for src, dst, to in steps:
        assert cli.main([str(tmp_path / src), str(tmp_path / dst), "--to", to, "--verify"]) == 0, capsys.readouterr()
        assert "tensors bit-exact" in capsys.readouterr().out
    assert (tmp_path / "te_hf" / "config.json").exists() and (tmp_path / "ae" / "ae.safetensors").exists()
    for load, a, b in ((load_text_encoder, te, "te_jax"), (load_vae, vae, "vae_j")):
        (ca, pa), (cb, pb) = load(a, dtype=None), load(tmp_path / b, dtype=None)
        assert ca == cb
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y), strict=True), pa, pb)
    # --config overrides the BFL file's stored config; --verify reads the written folder with its own
    assert cli.main([str(tmp_path / "ae" / "ae.safetensors"), str(tmp_path / "vae_c"), "--to", "diffusers",
                     "--config", "shapes_vae_f8", "--verify"]) == 0, capsys.readouterr().err  # fmt: skip
    # bf16 export of the VAE
    assert cli.main([str(vae), str(tmp_path / "vae16"), "--to", "diffusers", "--dtype", "bf16", "--verify"]) == 0
    assert {str(v.dtype) for v in jax.tree.leaves(load_vae(tmp_path / "vae16", dtype=None)[1])} == {"bfloat16"}


def test_other_models_are_named(tmp_path, capsys):
    from lumina_jax.convert import load_transformer
    from lumina_jax.convert.errors import CheckpointError

    (tmp_path / "cap").mkdir()
    (tmp_path / "cap" / "config.json").write_text('{"model_type": "qwen2_vl"}')
    assert cli.main([str(tmp_path / "cap"), str(tmp_path / "o"), "--to", "jax"]) == 1
    err = capsys.readouterr().err
    assert "a 'qwen2_vl' model; convert handles Next-DiT, Gemma-2 and AutoencoderKL" in err and "load_captioner" in err
    # the library's Next-DiT loader names an encoder folder (it was read as a Next-DiT and failed on its keys)
    with pytest.raises(CheckpointError, match="the project's 'gemma2' component, not a Next-DiT checkpoint"):
        load_transformer(TRANSFORMER.parent / "text_encoder")
    assert cli.main([str(TRANSFORMER.parent / "text_encoder"), str(tmp_path / "o"), "--to", "jax", "--config",
                     "nextdit_tiny"]) == 1  # fmt: skip
    assert "--config is for Next-DiT and BFL autoencoder checkpoints" in capsys.readouterr().err
    # destinations of the wrong kind are refused before anything is written
    vae = TRANSFORMER.parent / "vae"
    for src, dst, to, want in ((vae, "ae.pth", "original", "writes BFL's ae.safetensors"),
                               (vae, "v.safetensors", "diffusers", "writes a folder"),
                               (TRANSFORMER.parent / "text_encoder", "te.safetensors", "original", "written as a folder"),
                               (vae, "v", "diffusers", "--config is for BFL ae.safetensors files")):  # fmt: skip
        extra = ["--config", "vae_tiny"] if dst == "v" else []
        assert cli.main([str(src), str(tmp_path / dst), "--to", to, *extra]) == 1
        assert want in capsys.readouterr().err and not (tmp_path / dst).exists()


def test_original_export_into_a_dotted_folder_writes_into_it(tmp_path, capsys):
    """A folder named like a file (``lumina.v2``) receives consolidated.00-of-01.pth; it is never replaced."""
    from lumina_jax.convert.nextdit import load_transformer

    dst = tmp_path / "lumina.v2"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    assert cli.main([str(TRANSFORMER), str(dst), "--to", "original"]) == 0
    assert (dst / "notes.txt").read_text() == "mine" and (dst / "consolidated.00-of-01.pth").is_file()
    assert cli.main([str(TRANSFORMER), str(tmp_path / "new.v3"), "--to", "original"]) == 0  # not there yet: a folder
    assert (tmp_path / "new.v3" / "consolidated.00-of-01.pth").is_file()
    load_transformer(dst)  # reads the folder's consolidated file


def test_destination_that_is_the_source_is_refused(tmp_path, capsys):
    import shutil

    src = tmp_path / "tr"
    shutil.copytree(TRANSFORMER, src)
    before = sorted(p.name for p in src.iterdir())
    for to in ("original", "jax"):
        assert cli.main([str(src), str(src), "--to", to, "--overwrite"]) == 1
        assert "is the checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == before


def test_config_for_a_project_checkpoint_is_refused(tmp_path, capsys):
    assert cli.main([str(TRANSFORMER), str(tmp_path / "out"), "--to", "jax", "--config", "nextdit_tiny"]) == 1
    assert "stores its own config" in capsys.readouterr().err


def test_freshly_initialised_params_can_be_saved(tmp_path):
    import jax
    import numpy as np
    from flax.core import meta

    from lumina_jax.convert.nextdit import load_transformer, save_transformer
    from lumina_jax.models.nextdit import NextDiT, NextDiTConfig

    config = NextDiTConfig.from_yaml("nextdit_tiny")
    x, t = np.zeros((1, 8, 8, config.in_channels), np.float32), np.zeros((1,), np.float32)
    cap, mask = np.zeros((1, 4, config.cap_feat_dim), np.float32), np.ones((1, 4), bool)
    variables = NextDiT(config).init(jax.random.PRNGKey(0), x, t, cap, mask)  # boxed, under "params"
    out = save_transformer(tmp_path / "t", config, variables, "jax")
    _, back = load_transformer(out)
    want = jax.tree.leaves(jax.tree.map(np.asarray, meta.unbox(variables["params"])))
    for a, b in zip(jax.tree.leaves(back), want):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("name", ["lumina_jax_pipeline.json", "scheduler/scheduler_config.json",
                                  "vae/lumina_jax.json", "text_encoder/lumina_jax.json"])
def test_damaged_json_files_are_named(tmp_path, name):
    import shutil

    from lumina_jax.convert.components import load_components
    from lumina_jax.convert.errors import CheckpointError

    d = tmp_path / "model"
    shutil.copytree(TRANSFORMER.parent, d)
    f = d / name
    f.write_text(f.read_text()[:5])
    with pytest.raises(CheckpointError, match=rf"{f}: not valid JSON"):
        load_components(d)


def test_destination_holding_the_source_is_refused(tmp_path, capsys):
    """``--overwrite`` onto the folder that holds the source would replace the folder, the source with it."""
    import shutil

    shutil.copytree(TRANSFORMER, tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "README.txt").write_text("mine")
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "pipe").rglob("*"))
    for to in ("jax", "diffusers"):
        assert cli.main([str(tmp_path / "pipe" / "transformer"), str(tmp_path / "pipe"), "--to", to, "--overwrite"]) == 1
        assert "holds the checkpoint" in capsys.readouterr().err
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "pipe").rglob("*")) == before


@pytest.mark.parametrize("to", ["jax", "diffusers"])
def test_folder_formats_refuse_a_weights_file_name(tmp_path, capsys, to):
    assert cli.main([str(TRANSFORMER), str(tmp_path / "x.safetensors"), "--to", to]) == 1
    assert f"--to {to} writes a folder; give a folder name, not a .safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    assert cli.main([str(TRANSFORMER), str(tmp_path / "lumina.v2"), "--to", "jax"]) == 0  # a dotted folder name is fine


def test_original_export_into_a_folder_with_another_consolidated_file_is_refused(tmp_path, capsys):
    """Reading a folder prefers its .safetensors: a .pth written next to one would never be read back."""
    from lumina_jax.convert.errors import CheckpointError
    from lumina_jax.convert.nextdit import original_target

    rel = tmp_path / "release"
    rel.mkdir()
    (rel / "consolidated.00-of-01.safetensors").write_bytes(b"")
    assert cli.main([str(TRANSFORMER), str(rel), "--to", "original"]) == 1
    assert "already holds ['consolidated.00-of-01.safetensors']" in capsys.readouterr().err
    assert sorted(p.name for p in rel.iterdir()) == ["consolidated.00-of-01.safetensors"]
    # the EMA file of an original folder is not in the way of the main file, nor the main of the EMA
    (rel / "consolidated.00-of-01.safetensors").rename(rel / "consolidated_ema.00-of-01.safetensors")
    assert original_target(rel) == rel / "consolidated.00-of-01.pth"
    with pytest.raises(CheckpointError, match="already holds"):
        original_target(rel, "consolidated_ema.00-of-01.pth")
    assert original_target(rel / "x.pth") == rel / "x.pth"  # a file named by the user: written as asked
    assert original_target(rel / "consolidated.00-of-01.pth") == rel / "consolidated.00-of-01.pth"
    with pytest.raises(CheckpointError, match="already holds .* a name that does not start with 'consolidated'"):
        original_target(rel / "consolidated_ema.00-of-01.pth")  # named as a file: reading the folder would not give it


def test_a_folder_with_one_checkpoint_in_both_formats_says_which_it_reads(tmp_path, caplog):
    from lumina_jax.convert.nextdit import original_weights_file

    for suffix in (".safetensors", ".pth"):
        (tmp_path / f"consolidated.00-of-01{suffix}").write_bytes(b"")
    with caplog.at_level("WARNING", logger="lumina_jax.convert.nextdit"):
        assert original_weights_file(tmp_path).name == "consolidated.00-of-01.safetensors"
    assert "not consolidated.00-of-01.pth (pass that file to read it)" in caplog.text
