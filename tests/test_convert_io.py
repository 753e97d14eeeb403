"""Shared checkpoint I/O: the streaming ``.pth`` writer (torch.load reads it bit-exactly; it never holds
two tensors at once), sharded safetensors writing, and which files a directory source reads."""

from __future__ import annotations

import gc
import weakref
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from lumina_jax.convert.errors import CheckpointError
from lumina_jax.convert.torch_io import read_pth_metadata, save_pth_streaming, to_torch


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


def test_metadata_record_round_trip(tmp_path):
    """``metadata`` goes into an extra archive record: torch.load (mmap or not) still reads the file,
    read_pth_metadata gives it back, files without it give {}; a corrupt record is a clear error."""
    arrays = _arrays()
    path = tmp_path / "m.pth"
    save_pth_streaming(path, _specs(arrays), iter(arrays.items()), metadata={"k": "v", "json": '{"a": 1}'})
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
    for mmap in (False, True):
        sd = torch.load(path, weights_only=True, mmap=mmap)
        assert sd["layers.0.w"].numpy().tobytes() == arrays["layers.0.w"].tobytes()
    assert read_pth_metadata(path) == {"k": "v", "json": '{"a": 1}'}
    torch.save({"a": torch.zeros(2)}, tmp_path / "plain.pth")
    assert read_pth_metadata(tmp_path / "plain.pth") == {}
    with zipfile.ZipFile(tmp_path / "plain.pth", "a") as zf:
        prefix = zf.namelist()[0].split("/")[0]
        zf.writestr(f"{prefix}/lumina_jax_metadata.json", "[1, 2]")
    with pytest.raises(CheckpointError, match="not an object of strings"):
        read_pth_metadata(tmp_path / "plain.pth")


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
        save_pth_streaming(tmp_path / "f.pth", _specs(arrays), iter(arrays.items()), metadata={"k": "v"})
    assert read_pth_metadata(tmp_path / "f.pth") == {"k": "v"}
    sd = torch.load(tmp_path / "f.pth", weights_only=True)
    assert sd["layers.0.w"].numpy().tobytes() == arrays["layers.0.w"].tobytes()


@pytest.mark.parametrize("with_specs", [False, True])
def test_sharded_safetensors_hold_at_most_one_shard(tmp_path, with_specs):
    """write_sharded_safetensors streams: with specs one tensor at a time, without them one shard's
    tensors; both split the stream into the same shards and the index names them."""
    import json

    from lumina_jax.convert.common import write_sharded_safetensors
    from lumina_jax.convert.safetensors_io import SafetensorsFile

    arrays = [(f"t{i}", np.full((10, 10), i, np.float32)) for i in range(7)]  # 400 bytes each
    pulled: list[int] = []
    max_alive = 0
    refs: list[weakref.ref] = []

    def stream():
        nonlocal max_alive
        for i, (name, a) in enumerate(arrays):
            gc.collect()
            max_alive = max(max_alive, sum(r() is not None for r in refs))
            a = a.copy()
            refs.append(weakref.ref(a))
            pulled.append(i)
            yield name, a
            del a

    specs = [(k, v.shape, v.dtype) for k, v in arrays] if with_specs else None
    paths = write_sharded_safetensors(stream(), tmp_path, max_shard_bytes=1000, specs=specs)
    assert [p.name for p in paths] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted([p.name for p in paths] + ["model.safetensors.index.json"])
    assert max_alive <= (0 if with_specs else 2)  # 1000-byte shards hold two 400-byte tensors
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {f"t{i}": paths[i // 2].name for i in range(7)}
    assert index["metadata"]["total_size"] == 7 * 400  # the tensors' bytes, as transformers records it
    for i, (name, a) in enumerate(arrays):
        np.testing.assert_array_equal(SafetensorsFile(paths[i // 2]).get(name), a)


def test_directory_with_an_index_reads_only_its_shards(tmp_path):
    """A variant file next to indexed shards (e.g. ``model.fp16.safetensors``) is not read, as in
    transformers; without an index every file is."""
    from lumina_jax.convert.common import TensorSource, write_sharded_safetensors
    from lumina_jax.convert.safetensors_io import save_file

    arrays = [(f"t{i}", np.full((10, 10), i, np.float32)) for i in range(3)]
    write_sharded_safetensors(iter(arrays), tmp_path, max_shard_bytes=500)
    save_file({"t0": np.zeros((10, 10), np.float16)}, tmp_path / "model.fp16.safetensors")
    src = TensorSource(tmp_path)
    assert sorted(src.keys()) == ["t0", "t1", "t2"] and src.get("t0").dtype == np.float32
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"appears in more than one file \(model-00001-of-0000\d.safetensors "
                                              r"and model.fp16.safetensors\)"):  # fmt: skip
        TensorSource(tmp_path)
    # An unsharded directory: the variant of its one file is not read (diffusers' ``variant=`` files).
    single = tmp_path / "single"
    single.mkdir()
    save_file(dict(arrays), single / "diffusion_pytorch_model.safetensors")
    save_file({"t0": np.zeros((10, 10), np.float16)}, single / "diffusion_pytorch_model.fp16.safetensors")
    src = TensorSource(single)
    assert sorted(src.keys()) == ["t0", "t1", "t2"] and src.get("t0").dtype == np.float32


def test_safetensors_bytes_are_little_endian_whatever_the_host(tmp_path, monkeypatch):
    """Files store little-endian; a big-endian host must swap multi-byte values after reading (simulated
    here by telling the reader the host is big-endian: the raw bytes then come back swapped)."""
    from lumina_jax.convert import safetensors_io
    from lumina_jax.convert.safetensors_io import SafetensorsFile, save_file

    a = np.arange(6, dtype=np.float32).reshape(2, 3) + 0.5
    b = np.arange(4, dtype=np.uint8)
    save_file({"a": a, "b": b}, tmp_path / "x.safetensors")
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert np.array_equal(f.get("a"), a) and np.array_equal(f.get("b"), b)
    monkeypatch.setattr(safetensors_io.np, "little_endian", False)
    assert np.array_equal(f.get("a"), a.byteswap()) and np.array_equal(f.get("b"), b)


def test_safetensors_headers_are_checked_like_the_reference_library(tmp_path):
    """Negative or overlapping offsets, a name given twice, fractional shapes and non-string metadata are
    corrupt headers (the safetensors library refuses them too); a tensor of a dtype this reader does not
    know fails only when it is read; fp8 and unsigned tensors are read; big-endian arrays and non-string
    metadata are written as the format wants (little-endian bytes, JSON text)."""
    import json
    import struct

    import ml_dtypes
    import safetensors.numpy

    from lumina_jax.convert.safetensors_io import SafetensorsFile, save_file

    def write(header, data=b"\0" * 8, raw=None):
        blob = raw if raw is not None else json.dumps(header).encode()
        (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data)
        return tmp_path / "h.safetensors"

    f32 = lambda shape, offsets: {"dtype": "F32", "shape": shape, "data_offsets": offsets}  # noqa: E731
    for header, msg in [({"a": f32([1], [-8, 0])}, "entry for tensor 'a'"),
                        ({"a": f32([2], [0, 8]), "b": f32([1], [4, 8])}, "tensors 'a' and 'b' overlap"),
                        ({"a": f32([4], [0, 16]), "e": f32([0], [8, 8]), "c": f32([1], [10, 14])},
                         "tensors 'a' and 'c' overlap"),  # an empty tensor between them hides nothing
                        ({"a": f32([2.0], [0, 8])}, "entry for tensor 'a'"),
                        ({"__metadata__": {"x": {}}, "a": f32([2], [0, 8])}, "__metadata__ must map names to strings")]:  # fmt: skip
        with pytest.raises(CheckpointError, match=msg):
            SafetensorsFile(write(header))
    twice = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    with pytest.raises(CheckpointError, match="the name 'a' appears twice"):
        SafetensorsFile(write(None, raw=twice))
    mixed = SafetensorsFile(write({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]},
                                   "u": {"dtype": "U16", "shape": [1], "data_offsets": [2, 4]},
                                   "q": {"dtype": "Q4", "shape": [2], "data_offsets": [4, 6]}}))  # fmt: skip
    assert mixed.get("w").dtype == ml_dtypes.float8_e4m3fn and mixed.get("u").dtype == np.uint16
    with pytest.raises(CheckpointError, match="tensor 'q' has unsupported dtype 'Q4'"):
        mixed.get("q")
    big = np.arange(6, dtype=">f4").reshape(2, 3)
    save_file({"big": big}, tmp_path / "w.safetensors", metadata={"flag": True, "name": "x"})
    assert np.array_equal(safetensors.numpy.load_file(tmp_path / "w.safetensors")["big"], big)
    assert SafetensorsFile(tmp_path / "w.safetensors").metadata == {"flag": "true", "name": "x"}


def test_pth_that_is_really_safetensors_or_pickles_objects_is_named(tmp_path):
    """A .safetensors renamed .pth, and a training checkpoint pickling its args next to the weights
    (refused by torch.load(weights_only=True)): errors say what the file is and what to do."""
    import argparse

    from safetensors.numpy import save_file

    from lumina_jax.convert.common import TensorSource

    save_file({"w": np.ones((2, 2), np.float32)}, str(tmp_path / "w.pth"))
    with pytest.raises(CheckpointError, match=r"w\.pth: this is a safetensors file with a \.pth name; rename it to w\.safetensors"):
        TensorSource(tmp_path / "w.pth")
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "run.pth")
    with pytest.raises(CheckpointError, match=r"pickles a non-tensor object \(argparse\.Namespace\).*weights_only=False\)\['model'\]"):
        TensorSource(tmp_path / "run.pth")
    (tmp_path / "text.pth").write_text("garbage\n")
    with pytest.raises(CheckpointError, match=r"text\.pth: not a PyTorch checkpoint \(neither"):
        TensorSource(tmp_path / "text.pth")
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "ok.pth")  # a plain wrapped state dict still reads
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(TensorSource(tmp_path / "legacy.pth").get("w"), np.ones(2, np.float32))
    np.testing.assert_array_equal(TensorSource(tmp_path / "ok.pth", pth_key="model").get("w"), np.ones(2, np.float32))


def test_atomic_output_does_not_clobber_a_destination_that_appears_meanwhile(tmp_path):
    """Without overwrite, a destination made by another writer while this one ran is left alone (this output
    is discarded with an error), not moved aside and deleted; with overwrite it is replaced."""
    from lumina_jax.convert.common import atomic_output

    dst = tmp_path / "out.bin"
    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        with atomic_output(dst) as tmp:
            tmp.write_bytes(b"new")
            dst.write_bytes(b"theirs")
    assert dst.read_bytes() == b"theirs" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with atomic_output(dst, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert dst.read_bytes() == b"new"


def test_a_tensor_dtype_numpy_lacks_is_a_checkpoint_error():
    """float8 weights in a .pth: a CheckpointError the CLI prints as one line, not torch's TypeError."""
    from lumina_jax.convert.common import to_numpy
    from lumina_jax.convert.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"unsupported tensor dtype torch.float8_e4m3fn"):
        to_numpy(torch.zeros(2, dtype=torch.float8_e4m3fn))
