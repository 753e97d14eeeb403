"""Streaming ``.pth`` writer: torch.load reads it bit-exactly, and it never holds two tensors at once."""

from __future__ import annotations

import gc
import weakref
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from lumina_jax.convert.errors import CheckpointError
from lumina_jax.convert.torch_io import save_pth_streaming, to_torch


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "layers.0.w": rng.standard_normal((6, 5)).astype(np.float32),
        "layers.0.b": rng.standard_normal((5,)).astype(ml_dtypes.bfloat16),
        "norm.weight": rng.standard_normal((3, 2, 4)).astype(np.float16),
        "count": np.arange(7, dtype=np.int64),
    }


def _specs(arrays):
    return [(k, v.shape, v.dtype) for k, v in arrays.items()]


@pytest.mark.parametrize("mmap", [False, True])
def test_bit_exact_through_torch_load(tmp_path, mmap):
    arrays = _arrays()
    path = tmp_path / "m.pth"
    save_pth_streaming(path, _specs(arrays), iter(arrays.items()))
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every record's CRC-32 matches its bytes
    sd = torch.load(path, weights_only=True, mmap=mmap)
    assert list(sd) == list(arrays)  # order kept
    for k, a in arrays.items():
        t = sd[k]
        assert t.device.type == "cpu" and tuple(t.shape) == a.shape and t.dtype == to_torch(a).dtype, k
        got = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert got.tobytes() == a.tobytes(), k


def test_one_tensor_in_memory_at_a_time(tmp_path):
    """When the writer asks for the next array, it has let go of the previous one (a dict-then-torch.save
    writer holds them all and fails this)."""
    shapes = [(f"t{i}", (64, 32)) for i in range(6)]
    refs: list[weakref.ref] = []

    def stream():
        for name, shape in shapes:
            gc.collect()
            alive = sum(r() is not None for r in refs)
            assert alive == 0, f"{alive} earlier arrays still alive when {name} was requested"
            a = np.full(shape, len(refs), np.float32)
            refs.append(weakref.ref(a))
            yield name, a
            del a  # the generator's own reference

    path = tmp_path / "s.pth"
    save_pth_streaming(path, [(n, s, np.float32) for n, s in shapes], stream())
    sd = torch.load(path, weights_only=True)
    assert [float(sd[n][0, 0]) for n, _ in shapes] == list(range(6))


def test_stream_out_of_plan_is_a_clear_error(tmp_path):
    arrays = _arrays()
    items = list(arrays.items())
    with pytest.raises(CheckpointError, match="expected layers.0.b"):
        save_pth_streaming(tmp_path / "a.pth", _specs(arrays), iter([items[0], items[2]]))
    with pytest.raises(CheckpointError, match=r"expected count \(7,\) int64, got nothing"):
        save_pth_streaming(tmp_path / "b.pth", _specs(arrays), iter(items[:3]))
    bad = [(k, v.astype(np.float64)) if k == "layers.0.w" else (k, v) for k, v in items]
    with pytest.raises(CheckpointError, match="layers.0.w"):
        save_pth_streaming(tmp_path / "c.pth", _specs(arrays), iter(bad))


def test_without_skip_data_falls_back_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.delattr(torch.serialization, "skip_data")
    arrays = _arrays()
    with pytest.warns(UserWarning, match="second copy"):
        save_pth_streaming(tmp_path / "f.pth", _specs(arrays), iter(arrays.items()))
    sd = torch.load(tmp_path / "f.pth", weights_only=True)
    assert sd["layers.0.w"].numpy().tobytes() == arrays["layers.0.w"].tobytes()
