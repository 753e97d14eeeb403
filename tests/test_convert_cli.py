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
