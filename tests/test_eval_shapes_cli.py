"""``python -m lumina_jax eval-shapes``: argument checks, empty splits, --min-heldout (no model is run)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from lumina_jax import eval_shapes


class _FakePipe:
    components = types.SimpleNamespace(guidance_scale=2.5, source="fake")

    def __call__(self, prompts, **kwargs):
        return types.SimpleNamespace(images=np.zeros((len(prompts), 64, 64, 3), np.float32))


def _result(colour: float, n: int = 4) -> dict:
    m = {"colour": colour, "shape": 1.0, "position": 1.0, "background": 1.0, "count": 1.0, "all": 1.0,
         "n_images": n, "n_objects": n}  # fmt: skip
    return {"held_out": dict(m), "seen": dict(m), "seconds": 0.0}


@pytest.fixture
def fake_run(monkeypatch):
    """main() with a fake pipeline and ``evaluate`` returning held-out colour accuracy 0.5 (CFG on: 0.95)."""
    from lumina_jax.pipeline import Lumina2Pipeline

    monkeypatch.setattr(Lumina2Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: _FakePipe()))
    monkeypatch.setattr(eval_shapes, "evaluate",
                        lambda pipe, n, guidance_scale, **k: _result(0.95 if guidance_scale != 1.0 else 0.5))


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--n", "0"], ["--min-heldout", "2"], ["--min-heldout", "0.9,0.8"],
                                  ["--n", "1", "--min-heldout", "0.5"], ["--seed", "-1"], ["--steps", "0"],
                                  ["--shift", "-1"], ["--solver", "bogus"], ["--cfg", "off", "--guidance", "2"],
                                  ["--guidance", "nan"]])  # fmt: skip
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        eval_shapes.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (argv[-2] if argv[-2].startswith("--") else argv[0]) in err


@pytest.mark.parametrize("flag", ["--json", "--save-dir"])
def test_unwritable_outputs_are_usage_errors_before_the_evaluation(tmp_path, capsys, fake_run, flag):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        eval_shapes.main(["--n", "2", flag, str(tmp_path / "file" / "out.json")])
    assert e.value.code == 2 and f"{flag}: {tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


def test_a_missing_checkpoint_is_exit_2_not_a_traceback(tmp_path, capsys):
    assert eval_shapes.main(["--checkpoint", str(tmp_path / "nope"), "--n", "2"]) == 2
    assert "eval-shapes: error:" in capsys.readouterr().err


def test_held_out_triples_are_also_scored_alone():
    """Objects of held-out scenes whose own triple is seen are left out of the ``held_out*`` row."""
    from lumina_jax.shapes import spec

    res = eval_shapes.evaluate(_FakePipe(), 40, batch=20)
    items = [it for it in eval_shapes.prompts_for(40, 0) if it[0] == "held_out"]
    n = sum((o.colour, o.shape, o.position) in spec.HELD_OUT for _, s, _ in items for o in s.objects)
    assert res["held_out_triples"]["n_objects"] == n < res["held_out"]["n_objects"]
    assert res["held_out_triples"]["colour"] == 0.0  # blank images
    assert "held_out*" in eval_shapes.format_table({"cfg_on": res})


def test_empty_held_out_split_is_not_zero_percent():
    res = eval_shapes.evaluate(_FakePipe(), 1, batch=1)
    assert res["held_out"]["n_images"] == 0 and res["held_out"]["colour"] is None
    assert res["seen"]["n_images"] == 1 and res["seen"]["colour"] is not None
    table = eval_shapes.format_table({"cfg_on": res})
    held = next(line for line in table.splitlines() if "held_out" in line)
    assert "n/a" in held and "0.0%" not in held
    with pytest.raises(ValueError, match="empty"):
        eval_shapes.check_min_heldout({"cfg_on": res}, (0.5, 0.5, 0.5))


def test_min_heldout_single_value_applies_to_all_attributes():
    assert eval_shapes.min_accuracies("0.9") == (0.9, 0.9, 0.9)
    r = _result(1.0)
    r["held_out"]["position"] = 0.5  # only position is low
    assert "position" in eval_shapes.check_min_heldout({"cfg_on": r}, eval_shapes.min_accuracies("0.9"))


def test_min_heldout_applies_to_cfg_off_alone(fake_run, capsys):
    assert eval_shapes.main(["--n", "4", "--cfg", "off", "--min-heldout", "0.9"]) == 1
    assert "cfg_off" in capsys.readouterr().err
    assert eval_shapes.main(["--n", "4", "--cfg", "off", "--min-heldout", "0.4"]) == 0
    assert eval_shapes.main(["--n", "4", "--cfg", "both", "--min-heldout", "0.9"]) == 0  # CFG on is checked


def test_docstring_names_the_models_guidance_not_4():
    assert "4.0" not in eval_shapes.__doc__ and "2.5" in eval_shapes.__doc__
