"""``python -m lumina_jax.shapes`` CLI: output checks before training, dataset size mismatches, assemble
errors without tracebacks, the --help description."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lumina_jax.shapes import build


@pytest.mark.parametrize("cmd,fn,default", [("train-vae", "train_vae", "vae_f8"),
                                            ("train-text-encoder", "train_text_encoder", "text_encoder_lm")])
def test_train_refuses_existing_output_before_training(tmp_path, monkeypatch, capsys, cmd, fn, default):
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(build, fn, lambda *a, **k: calls.append(k) or {"steps": 0})
    out = tmp_path / "encoders" / default
    out.mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        build.main([cmd, "--work", str(tmp_path)])
    assert e.value.code == 2 and not calls  # no training
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert build.main([cmd, "--work", str(tmp_path), "--overwrite"]) == 0
    assert calls and calls[0]["overwrite"] is True


def test_train_functions_check_output_first(tmp_path):
    from lumina_jax.shapes.text_train import train_text_encoder
    from lumina_jax.shapes.vae_train import train_vae

    with pytest.raises(FileExistsError, match="overwrite"):
        train_vae(tmp_path)  # would train 1200 steps without the early check
    with pytest.raises(FileExistsError, match="overwrite"):
        train_text_encoder(tmp_path, tmp_path / "no_tokenizer")


def test_prepare_rejects_other_split_sizes(tmp_path, capsys):
    from lumina_jax.shapes import tfds_builder

    work = str(tmp_path / "w")
    build.main(["prepare", "--work", work, "--num-train", "4", "--num-test", "1"])
    builder_dir = Path(work) / "tfds" / "shapes_world" / "1.0.0"
    with pytest.raises(SystemExit) as e:
        build.main(["prepare", "--work", work, "--num-train", "6", "--num-test", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--num-train 6" in err and "--overwrite" in err and "'train': 4" in err
    assert tfds_builder.prepared_split_sizes(builder_dir)["train"] == 4
    build.main(["prepare", "--work", work, "--num-train", "6", "--num-test", "1", "--overwrite"])
    assert tfds_builder.prepared_split_sizes(builder_dir) == {"train": 6, "test_seen": 1, "test_held_out": 1}
    build.main(["prepare", "--work", work, "--num-train", "6", "--num-test", "1"])  # same sizes: reused


def test_assemble_errors_without_traceback(tmp_path, capsys):
    rc = build.main(["assemble", "--run", str(tmp_path / "no_run"), "--work", str(tmp_path),
                     "--out", str(tmp_path / "out")])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "shapes assemble: error: " in err and "has no checkpoints/ folder" in err and "Traceback" not in err


def test_help_description_is_a_full_sentence(capsys):
    with pytest.raises(SystemExit):
        build.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert build.DESCRIPTION in out and out.count("python -m lumina_jax train configs/train/shapes.yaml") == 1
    assert build.DESCRIPTION.endswith(".") and "``" not in build.DESCRIPTION


@pytest.mark.parametrize("argv", [["prepare", "--num-train", "0"], ["prepare", "--num-test", "-5"],
                                  ["train-vae", "--steps", "0"], ["train-vae", "--batch", "0"],
                                  ["train-text-encoder", "--steps", "0"]])  # fmt: skip
def test_counts_below_one_are_usage_errors(argv, tmp_path, capsys):
    """``prepare --num-train 0`` crashed in TFDS after part of the work; ``train-vae --steps 0`` wrote an
    untrained autoencoder."""
    with pytest.raises(SystemExit) as e:
        build.main([*argv, "--work", str(tmp_path)])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
