"""The bundled default model (lumina_jax/assets/default_model): loads through the default
``Lumina2Pipeline.from_pretrained()`` path and the evaluator's accuracy on a small fixed prompt set stays at
the level measured when it was shipped (see BUILD.md)."""

from __future__ import annotations

import pytest

from lumina_jax.pipeline import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "lumina_jax_pipeline.json").exists(),
                                reason="no bundled default model")

# The shipped weights (2500 steps, BUILD.md) place objects but do not yet get shapes or colour binding:
# eval-shapes n=400, CFG 4: held-out colour 47 %, shape 39 % (chance 33 %), position 99 %, background
# 100 %. On this test's fixed 8 prompts: colour 0.35, shape 0.29, position / background / count 1.0.
# Floors leave ~2 objects of margin; raise them with the targets (colour 0.9, shape 0.8) once met.
MIN_ACCURACY = {"position": 0.75, "background": 0.75, "count": 0.75, "colour": 0.2}


def test_bundled_model_is_small():
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 20 * 2**20


def test_bundled_model_evaluator_accuracy():
    from lumina_jax.eval_shapes import evaluate
    from lumina_jax.pipeline import Lumina2Pipeline

    pipe = Lumina2Pipeline.from_pretrained(compilation_cache=False)
    assert pipe.components.source.endswith("default_model")
    res = evaluate(pipe, 8, guidance_scale=4.0, seed=0, batch=8)
    both = {k: (res["seen"][k] + res["held_out"][k]) / 2 for k in ("colour", "shape", "position", "background", "count")}
    for k, v in MIN_ACCURACY.items():
        assert both[k] >= v, (k, both, res)
