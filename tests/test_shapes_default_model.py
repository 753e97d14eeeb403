"""The bundled default model (lumina_jax/assets/default_model): loads through the default
``Lumina2Pipeline.from_pretrained()`` path and the evaluator's accuracy on a small fixed prompt set stays at
the level measured when it was shipped (see BUILD.md)."""

from __future__ import annotations

import pytest

from lumina_jax.pipeline import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "lumina_jax_pipeline.json").exists(),
                                reason="no bundled default model")

# The shipped weights are an UNDERTRAINED first version (340 steps, see BUILD.md): measured n=40, CFG 4:
# background 70-85 %, colour 7-26 %, shape ~37 %, position 5-23 %. Floors: what it reliably does now;
# raise them to the targets (colour 0.9, shape 0.8, position 0.8) once the full recipe is trained.
MIN_ACCURACY = {"background": 0.5}


def test_bundled_model_is_small():
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 20 * 2**20


def test_bundled_model_evaluator_accuracy():
    from lumina_jax.eval_shapes import evaluate
    from lumina_jax.pipeline import Lumina2Pipeline

    pipe = Lumina2Pipeline.from_pretrained(compilation_cache=False)
    assert pipe.components.source.endswith("default_model")
    res = evaluate(pipe, 8, guidance_scale=4.0, seed=0, batch=8)
    both = {k: (res["seen"][k] + res["held_out"][k]) / 2 for k in ("colour", "shape", "position", "background")}
    for k, v in MIN_ACCURACY.items():
        assert both[k] >= v, (k, both, res)
