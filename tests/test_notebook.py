"""``notebooks/colab_inference.ipynb`` runs end to end (nbclient + ipykernel), offline, against a tiny local
diffusers-layout model directory passed through ``LUMINA_MODEL``; caches go to a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import nbformat
import nbclient
import ipykernel  # noqa: F401 -- required (requirements-dev.txt): a missing one fails, not skips
import torch  # noqa: F401 -- required (requirements-dev.txt): a missing one fails, not skips
import diffusers  # noqa: F401 -- required (requirements-dev.txt): a missing one fails, not skips

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_inference.ipynb"


def test_notebook_has_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "LUMINA_MODEL" in tagged[0].source
    nbformat.validate(nb)


def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    from lumina_jax.bench.generate import build_reference_pipeline

    ref, _ = build_reference_pipeline("tiny", seed=3, tokenizer_dir=tmp_path / "tok")
    ref.save_pretrained(tmp_path / "model")
    for k, v in {"LUMINA_MODEL": str(tmp_path / "model"), "LUMINA_NOTEBOOK_SMOKE": "1", "LUMINA_STEPS": "3",
                 "LUMINA_OUT_DIR": str(tmp_path / "out"), "LUMINA_JAX_CACHE": str(tmp_path / "cache"),
                 "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
                 "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the generation and the preset comparison
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "model evaluations" in text and "wrote" in text
    written = list((tmp_path / "out").glob("lumina_*.png"))
    assert len(written) == 1
    assert (tmp_path / "cache" / "converted").is_dir()  # the converted weights were cached as orbax


def test_colab_install_cell_pins_the_supported_versions():
    """The Colab branch (not run offline) installs jax/flax in the ranges requirements.txt supports."""
    import re

    nb = nbformat.read(ROOT / "notebooks" / "colab_inference.ipynb", as_version=4)
    install = next(c.source for c in nb.cells if c.cell_type == "code" and "pip" in c.source)
    reqs = (ROOT / "requirements.txt").read_text()
    for name in ("jax", "flax"):
        want = re.search(rf"^{name}(>=[^\s;#]+)", reqs, flags=re.M).group(1)
        assert re.search(rf"{name}(\[{{JAX_EXTRA}}\])?{re.escape(want)}", install), (name, want)
