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


def test_other_models_are_named_not_read_as_a_next_dit(tmp_path, capsys):
    """The project's text encoder / VAE folders share the marker file of a Next-DiT folder, and
    transformers / diffusers folders of other models have a config.json: each is named (were read as a
    Next-DiT and failed on its config keys or missing tensors)."""
    assert cli.main([str(TRANSFORMER.parent / "text_encoder"), str(tmp_path / "o"), "--to", "diffusers"]) == 1
    assert "is the project's 'gemma2' component; `convert` converts the Next-DiT" in capsys.readouterr().err
    for name, cfg, want in (("te", '{"model_type": "gemma2"}', "a transformers 'gemma2' model"),
                            ("vae", '{"_class_name": "AutoencoderKL"}', "a diffusers AutoencoderKL")):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(cfg)
        assert cli.main([str(tmp_path / name), str(tmp_path / "o"), "--to", "jax"]) == 1
        err = capsys.readouterr().err
        assert want in err and "load_text_encoder" in err, err
