"""Next-DiT checkpoint conversion: bit-exact round trips, loadability by diffusers, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import rel_l2
from nextdit_helpers import diffusers_forward, inputs, make_diffusers_model

from lumina_jax.convert.common import TensorSource, flatten
from lumina_jax.convert.errors import CheckpointError
from lumina_jax.convert.nextdit import (
    ORIG_PREFIX,
    detect_format,
    infer_original_config,
    load_transformer,
    save_transformer,
)
from lumina_jax.convert.safetensors_io import save_file
from lumina_jax.models.nextdit import NextDiT


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    model = make_diffusers_model("gqa3", seed=3)
    d = tmp_path_factory.mktemp("ckpt") / "transformer"
    model.save_pretrained(d)
    return model, d


def _tensors(path) -> dict[str, np.ndarray]:
    src = TensorSource(path)
    return {k: src.get(k) for k in src.keys()}


def _assert_bit_exact(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def _jax_out(config, params, x, t, cap, mask):
    fwd = jax.jit(lambda p, *a: NextDiT(config).apply({"params": p}, *a))  # compiled: ~4x faster than op by op
    return np.asarray(fwd(params, *(jnp.asarray(a) for a in (x, t, cap, mask))))


def test_diffusers_round_trip_bit_exact_and_loadable(diffusers_dir, tmp_path):
    model, d = diffusers_dir
    config, params = load_transformer(d)
    assert detect_format(d) == "diffusers"
    out_dir = save_transformer(tmp_path / "re", config, params, "diffusers")
    _assert_bit_exact(_tensors(d), _tensors(out_dir))
    # diffusers loads the export and computes what the JAX model computes
    from diffusers import Lumina2Transformer2DModel

    reloaded = Lumina2Transformer2DModel.from_pretrained(out_dir).eval()
    x, t, cap, mask = inputs(config, batch=2, h=6, w=8, cap_lens=[4, 7], cap_pad=7)
    ours = _jax_out(config, params, x, t, cap, mask)
    assert rel_l2(diffusers_forward(reloaded, x, t, cap, mask), ours) <= 1e-5
    # the config comes back too, including what the model does not use (the default size)
    theirs = json.loads((d / "config.json").read_text())
    again = json.loads((out_dir / "config.json").read_text())
    assert {k: v for k, v in theirs.items() if not k.startswith("_")} == \
        {k: v for k, v in again.items() if not k.startswith("_")}  # fmt: skip
    small = tmp_path / "small"
    small.mkdir()
    for f in d.iterdir():
        (small / f.name).symlink_to(f)
    (small / "config.json").unlink()
    (small / "config.json").write_text(json.dumps(dict(theirs, sample_size=16, scaling_factor=0.5)))
    via_jax = save_transformer(tmp_path / "small_jax", *load_transformer(small), "jax")
    out = save_transformer(tmp_path / "small_out", *load_transformer(via_jax), "diffusers")
    assert {k: json.loads((out / "config.json").read_text())[k] for k in ("sample_size", "scaling_factor")} == \
        {"sample_size": 16, "scaling_factor": 0.5}  # fmt: skip


@pytest.mark.parametrize("field,value", [("rope_theta", 500.0)])
def test_diffusers_export_refuses_what_diffusers_hard_codes(diffusers_dir, tmp_path, field, value):
    """diffusers' modules fix RoPE theta 10000 (and a 256-wide timestep embedding, whose other widths the
    shape check already refuses): another theta would load and compute something else, so the export
    names it instead."""
    import dataclasses

    config, params = load_transformer(diffusers_dir[1])
    with pytest.raises(ValueError, match=rf"fixes .*; this model has \{{'{field}': {value}\}}"):
        save_transformer(tmp_path / "x", dataclasses.replace(config, **{field: value}), params, "diffusers")
    assert not (tmp_path / "x").exists()


def test_diffusers_export_warns_that_its_q_k_norm_eps_is_fixed(diffusers_dir, tmp_path, caplog):
    """The original's q/k eps 1e-6 has no place in diffusers' config.json (its modules use 1e-5): exported with a
    warning saying what diffusers will run; 1e-5 (what a diffusers folder loads as) exports silently."""
    import dataclasses
    import logging

    config, params = load_transformer(diffusers_dir[1])
    with caplog.at_level(logging.WARNING, logger="lumina_jax.convert.nextdit"):
        save_transformer(tmp_path / "same", config, params, "diffusers")
        assert "q/k RMSNorm eps" not in caplog.text
        save_transformer(tmp_path / "orig", dataclasses.replace(config, qk_norm_eps=1e-6), params, "diffusers")
    assert "fixes the q/k RMSNorm eps at 1e-05; this model uses 1e-06" in caplog.text
    assert load_transformer(tmp_path / "orig")[0].qk_norm_eps == 1e-5


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_original_round_trip_bit_exact(diffusers_dir, tmp_path, suffix):
    _, d = diffusers_dir
    config, params = load_transformer(d)
    orig = save_transformer(tmp_path / f"consolidated.00-of-01{suffix}", config, params, "original")
    assert detect_format(orig) == "original"
    sd = _tensors(orig)
    assert "norm_final.weight" in sd and sd["layers.0.attention.qkv.weight"].shape == (
        (config.n_heads + 2 * config.n_kv_heads) * config.head_dim,
        config.dim,
    )
    config2, params2 = load_transformer(orig, config=config)
    again = save_transformer(tmp_path / f"again{suffix}", config2, params2, "original")
    _assert_bit_exact(sd, _tensors(again))
    # params identical too (original -> JAX is the exact inverse)
    for (k, a), (_, b) in zip(sorted(flatten(params).items()), sorted(flatten(params2).items())):
        assert np.array_equal(a, b), k


def test_original_prefix_and_inferred_config(diffusers_dir, tmp_path):
    _, d = diffusers_dir
    config, params = load_transformer(d)
    orig = save_transformer(tmp_path / "o.safetensors", config, params, "original")
    sd = _tensors(orig)
    # a ComfyUI all-in-one file: the transformer under the prefix, other models beside it (ignored)
    extra = {"vae.decoder.conv_in.weight": np.ones((4, 4), np.float32), "text_encoders.x": np.ones(3, np.float32)}
    save_file({**{ORIG_PREFIX + k: v for k, v in sd.items()}, **extra}, tmp_path / "comfy.safetensors")
    config2, params2 = load_transformer(tmp_path / "comfy.safetensors")  # config inferred from shapes
    inferred = infer_original_config({k: v.shape for k, v in sd.items()})
    for field in ("dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads", "cap_feat_dim", "in_channels"):
        assert getattr(config2, field) == getattr(config, field) == getattr(inferred, field), field
    assert config2.ffn_hidden == config.ffn_hidden


def test_wrapped_and_legacy_pth_files(diffusers_dir, tmp_path, caplog):
    """Training checkpoints wrap state dicts ({"model": sd, "ema": sd_ema, "step": n}); ``pth_key`` picks
    one (default "model"); non-tensor entries beside tensors are dropped; pre-1.6 (non-zip) files load."""
    _, d = diffusers_dir
    config, params = load_transformer(d)
    sd = {k: torch.from_numpy(v) for k, v in _tensors(save_transformer(tmp_path / "o.safetensors", config, params,
                                                                        "original")).items()}  # fmt: skip
    ema = {k: v + 1 for k, v in sd.items()}
    key, path = "x_embedder.weight", "x_embedder/kernel"
    torch.save({"model": sd, "ema": ema, "step": 3}, tmp_path / "both.pth")
    with caplog.at_level("INFO"):
        _, p_model = load_transformer(tmp_path / "both.pth")
    assert "also has 'ema'" in caplog.text
    _, p_ema = load_transformer(tmp_path / "both.pth", pth_key="ema")
    np.testing.assert_array_equal(flatten(p_model)[path].T, sd[key].numpy())
    np.testing.assert_array_equal(flatten(p_ema)[path].T, ema[key].numpy())
    torch.save({"model": sd, "ema": ema, "step": torch.tensor(100)}, tmp_path / "step.pth")  # a tensor step: still a wrapper
    np.testing.assert_array_equal(flatten(load_transformer(tmp_path / "step.pth", pth_key="ema")[1])[path].T,
                                  ema[key].numpy())  # fmt: skip
    np.testing.assert_array_equal(flatten(load_transformer(tmp_path / "step.pth")[1])[path].T, sd[key].numpy())
    with pytest.raises(CheckpointError, match=r"pth_key 'ema' picks a state dict of a .pth file; this one is .safetensors"):
        load_transformer(tmp_path / "o.safetensors", pth_key="ema")
    torch.save({"ema": {"module": ema}}, tmp_path / "ema_only.pth")  # nested two levels
    np.testing.assert_array_equal(flatten(load_transformer(tmp_path / "ema_only.pth")[1])[path].T, ema[key].numpy())
    torch.save({**sd, "step": 100}, tmp_path / "extra.pth")
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(flatten(load_transformer(tmp_path / "extra.pth")[1])[path].T, sd[key].numpy())
    assert "ignoring 1 entries that are not tensors: step" in caplog.text
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(flatten(load_transformer(tmp_path / "legacy.pth")[1])[path].T, sd[key].numpy())
    torch.save({"a": sd, "b": ema}, tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match=r"several state dicts \(\['a', 'b'\]\); pass pth_key="):
        load_transformer(tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match=r"no state dict under pth_key 'ema' \(state dicts there: \['a', 'b'\]"):
        load_transformer(tmp_path / "two.pth", pth_key="ema")
    torch.save({"step": 1, "lr": 0.1}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_transformer(tmp_path / "none.pth", config=config)
    with pytest.raises(ValueError, match="pth_key is for original .pth checkpoints"):
        load_transformer(d, pth_key="ema")
    from lumina_jax.convert.cli import main as convert_main

    assert convert_main([str(tmp_path / "both.pth"), str(tmp_path / "e"), "--to", "jax", "--pth-key", "ema"]) == 0
    np.testing.assert_array_equal(flatten(load_transformer(tmp_path / "e")[1])[path].T, ema[key].numpy())


def test_config_inference_errors_and_ffn_multiplier(diffusers_dir, tmp_path):
    from lumina_jax.convert.nextdit import jax_shapes, original_rules, torch_shapes
    from lumina_jax.models.nextdit import NextDiTConfig

    # ffn_dim_multiplier 1.1 at dim 720: width 3328; a multiplier read back as 3328/2880 must not give 3327
    c = NextDiTConfig.from_yaml("nextdit_tiny").replace(dim=720, n_heads=15, n_kv_heads=5, axes_dims=(16, 16, 16),
                                                       multiple_of=256, ffn_dim_multiplier=1.1)  # fmt: skip
    inferred = infer_original_config(torch_shapes(original_rules(c), jax_shapes(c)))
    assert c.ffn_hidden == 3328 and inferred.ffn_hidden == 3328
    _, d = diffusers_dir
    with pytest.raises(CheckpointError, match="diffusers Lumina2Transformer2DModel weights file.*pass its folder"):
        load_transformer(d / "diffusion_pytorch_model.safetensors")
    sd = _tensors(save_transformer(tmp_path / "o.safetensors", *load_transformer(d), "original"))
    save_file({k: v for k, v in sd.items() if "q_norm" not in k and "k_norm" not in k}, tmp_path / "noqk.safetensors")
    with pytest.raises(CheckpointError, match="^checkpoint has no q_norm weights: cannot infer head_dim; pass config="):
        infer_original_config({k: v.shape for k, v in _tensors(tmp_path / "noqk.safetensors").items()})
    with pytest.raises(CheckpointError, match="no layers.N"):
        infer_original_config({k: v.shape for k, v in sd.items() if not k.startswith("layers.")})
    with pytest.raises(CheckpointError, match="cannot infer its config: no tensor 'cap_embedder.1.weight'"):
        infer_original_config({k: v.shape for k, v in sd.items() if not k.startswith("cap_embedder")})
    # a stray key or a lone odd shape is named, not the tensors that are right
    shapes = {k: v.shape for k, v in sd.items()}
    with pytest.raises(CheckpointError, match=r"layers.N blocks 0..5 do not all hold the same tensors \(layers.2: no "
                                              r"tensors.*layers.5: lacks"):  # fmt: skip
        infer_original_config({**shapes, "layers.5.attention.out.weight": shapes["layers.0.attention.out.weight"]})
    with pytest.raises(CheckpointError, match=r"layers.1: lacks attention.out.weight"):
        infer_original_config({k: v for k, v in shapes.items() if k != "layers.1.attention.out.weight"})
    odd = {**shapes, "layers.0.attention.q_norm.weight": (6,)}
    save_file({**sd, "layers.0.attention.q_norm.weight": np.ones(6, np.float32)}, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match=r"mis-shaped keys \(1\): layers.0.attention.q_norm.weight: expected"):
        load_transformer(tmp_path / "odd.safetensors")
    assert infer_original_config(odd).head_dim == infer_original_config(shapes).head_dim  # the common width


def test_layers_stored_in_different_dtypes_keep_their_values(diffusers_dir, tmp_path, caplog):
    """A keep-dtype load stacks the layers of a weight in one array: a file whose layers differ in dtype
    (here layer 0 in bf16, layer 1 in fp32) is stacked in fp32, so no layer loses precision."""
    _, d = diffusers_dir
    sd = _tensors(save_transformer(tmp_path / "o.safetensors", *load_transformer(d), "original"))
    key0, key1 = "layers.0.feed_forward.w1.weight", "layers.1.feed_forward.w1.weight"
    sd[key0] = sd[key0].astype(ml_dtypes.bfloat16)
    save_file(sd, tmp_path / "mixed.safetensors")
    with caplog.at_level("WARNING", logger="lumina_jax.convert"):
        config, params = load_transformer(tmp_path / "mixed.safetensors", dtype=None)
    out = _tensors(save_transformer(tmp_path / "again.safetensors", config, params, "original"))
    assert out[key1].dtype == np.float32 and out[key1].tobytes() == sd[key1].tobytes()
    np.testing.assert_array_equal(out[key0], sd[key0].astype(np.float32))
    assert caplog.text.count("layers stored in different dtypes: 1 params") == 1
    caplog.clear()  # the wider layer first: said too
    sd[key0], sd[key1] = sd[key0].astype(np.float32), sd[key1].astype(ml_dtypes.bfloat16)
    save_file(sd, tmp_path / "mixed2.safetensors")
    with caplog.at_level("WARNING", logger="lumina_jax.convert"):
        load_transformer(tmp_path / "mixed2.safetensors", dtype=None)
    assert caplog.text.count("layers stored in different dtypes: 1 params") == 1


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_our_original_export_reloads_with_its_config(tmp_path, suffix):
    """What the shapes do not tell (patch size, RoPE split, eps, table sizes) comes back from the config
    our export stores (safetensors metadata / a record in the .pth archive); ``config=`` overrides;
    a file without it is inferred."""
    import dataclasses

    from lumina_jax.models.nextdit import NextDiTConfig

    config = dataclasses.replace(NextDiTConfig.from_yaml("nextdit_tiny"), patch_size=4, in_channels=4,
                                 axes_dims=(2, 6, 8), qk_norm_eps=1e-5, axes_lens=(64, 96, 96))  # fmt: skip
    from lumina_jax.models.nextdit import init_params

    params = init_params(config, 0)
    path = save_transformer(tmp_path / f"o{suffix}", config, params, "original")
    loaded, params2 = load_transformer(path)
    assert loaded == config
    _assert_bit_exact(flatten(params2), {k: np.asarray(v) for k, v in flatten(params).items()})
    other = dataclasses.replace(config, axes_lens=(64, 64, 64))  # another RoPE table size: the same outputs
    assert load_transformer(path, config=other)[0] == other
    for field, value in (("qk_norm_eps", 1e-6), ("axes_dims", (4, 4, 8)), ("rope_theta", 500.0)):
        with pytest.raises(CheckpointError, match=rf"config stored with the weights disagrees .*{field}"):
            load_transformer(path, config=dataclasses.replace(config, **{field: value}))
    bare = tmp_path / f"bare{suffix}"  # the same tensors, no stored config: inferred (patch 2, equal split)
    if suffix == ".pth":
        torch.save({k: torch.from_numpy(v.copy()) for k, v in _tensors(path).items()}, bare)
    else:
        save_file(_tensors(path), bare)
    with pytest.raises(CheckpointError, match="RoPE split|patch"):
        load_transformer(bare)
    if suffix == ".pth":  # a damaged metadata record: an error naming it, unless config= is given
        import zipfile

        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        record = next(n for n in names if n.endswith("lumina_jax_metadata.json"))
        damaged = tmp_path / "damaged.pth"
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(damaged, "w") as out:
            for n in names:
                out.writestr(src.getinfo(n), b"not json" if n == record else src.read(n))
        with pytest.raises(CheckpointError, match="lumina_jax_metadata.json record is corrupt.*pass config="):
            load_transformer(damaged)
        assert load_transformer(damaged, config=config)[0] == config
        return
    bad = tmp_path / "bad.safetensors"
    save_file(_tensors(path), bad, metadata={"lumina_jax_config": json.dumps({"dim": 7, "n_heads": 2})})
    with pytest.raises(CheckpointError, match="stored lumina_jax_config is not a valid config"):
        load_transformer(bad)


def test_bf16_export_and_keep_dtype(diffusers_dir, tmp_path):
    _, d = diffusers_dir
    config, params = load_transformer(d)
    out = save_transformer(tmp_path / "bf16", config, params, "diffusers", dtype="bf16")
    t = _tensors(out)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in t.values())
    _, p16 = load_transformer(out, dtype=None)  # keep bf16
    assert all(v.dtype == ml_dtypes.bfloat16 for v in jax.tree_util.tree_leaves(p16))
    again = save_transformer(tmp_path / "bf16b", config, p16, "diffusers")
    _assert_bit_exact(t, _tensors(again))


@pytest.mark.slow
def test_original_export_loads_with_from_single_file(tmp_path):
    """diffusers' own original->diffusers converter hard-codes the 2B qkv split [2304, 768, 768], so
    this check uses a 2B-width model (1 layer, small FFN) with the released head layout."""
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    kw = dict(hidden_size=2304, num_layers=1, num_refiner_layers=1, num_attention_heads=24, num_kv_heads=8,
              multiple_of=16, ffn_dim_multiplier=1 / 64, axes_dim_rope=(32, 32, 32), cap_feat_dim=32, in_channels=4)  # fmt: skip
    ref = Lumina2Transformer2DModel(sample_size=8, axes_lens=(64, 64, 64), **kw).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm1.linear" in n or "norm_out" in n:
                p.normal_(0, 0.02)
    cfg_dir = tmp_path / "cfg" / "transformer"
    ref.save_pretrained(cfg_dir)
    config, params = load_transformer(cfg_dir)
    orig = save_transformer(tmp_path / "consolidated.00-of-01.safetensors", config, params, "original")
    single = Lumina2Transformer2DModel.from_single_file(str(orig), config=str(cfg_dir.parent), subfolder="transformer")
    x, t, cap, mask = inputs(config, batch=2, h=4, w=6, cap_lens=[3, 5], cap_pad=5)
    ours = _jax_out(config, params, x, t, cap, mask)
    assert rel_l2(diffusers_forward(single.eval(), x, t, cap, mask), ours) <= 1e-5


def test_project_format_round_trip(diffusers_dir, tmp_path):
    _, d = diffusers_dir
    config, params = load_transformer(d)
    out = save_transformer(tmp_path / "jaxckpt", config, params, "jax")
    assert detect_format(out) == "jax"
    config2, params2 = load_transformer(out)
    assert config2 == config
    for (k, a), (_, b) in zip(sorted(flatten(params).items()), sorted(flatten(params2).items())):
        assert a.dtype == b.dtype and np.array_equal(a, b), k


# ----------------------------------------------------------------------------------------------
# errors


def _copy_with(d: Path, dst: Path, edit) -> Path:
    sd = _tensors(d)
    edit(sd)
    dst.mkdir()
    (dst / "config.json").write_text((d / "config.json").read_text())
    save_file(sd, dst / "diffusion_pytorch_model.safetensors")
    return dst


def test_malformed_metadata_is_an_error_naming_its_file(diffusers_dir, tmp_path):
    _, d = diffusers_dir
    bad = _copy_with(d, tmp_path / "bad", lambda sd: None)
    cfg = json.loads((d / "config.json").read_text())
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{bad / 'config.json'}: not valid JSON"):
        load_transformer(bad)
    (bad / "config.json").write_text(json.dumps(dict(cfg, axes_dim_rope=[2, 2, 2])))
    with pytest.raises(CheckpointError, match=rf"{bad / 'config.json'}: not a valid Next-DiT config .*axes_dims"):
        load_transformer(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"index.json: no 'weight_map' entry"):
        load_transformer(bad)
    jax_dir = save_transformer(tmp_path / "j", *load_transformer(d), "jax")
    (jax_dir / "lumina_jax.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"lumina_jax.json: no 'config' entry"):
        load_transformer(jax_dir)
    # safetensors headers: a JSON list, or an entry whose offsets are not two integers
    for header in (b"[]", json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}).encode()):
        f = tmp_path / "h.safetensors"
        f.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
        with pytest.raises(CheckpointError, match=r"h.safetensors: corrupt safetensors header"):
            TensorSource(f)


def test_missing_unexpected_misshaped_keys_are_named(diffusers_dir, tmp_path):
    _, d = diffusers_dir

    def edit(sd):
        del sd["layers.1.attn.to_k.weight"]
        sd["layers.0.attn.bogus.weight"] = np.zeros(3, np.float32)
        sd["x_embedder.bias"] = np.zeros(5, np.float32)

    bad = _copy_with(d, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as e:
        load_transformer(bad)
    msg = str(e.value)
    assert "layers.1.attn.to_k.weight" in msg and "missing" in msg
    assert "layers.0.attn.bogus.weight" in msg and "unexpected" in msg
    assert "x_embedder.bias" in msg and "mis-shaped" in msg


def test_truncated_file_is_a_clear_error(diffusers_dir, tmp_path):
    _, d = diffusers_dir
    bad = tmp_path / "trunc"
    bad.mkdir()
    (bad / "config.json").write_text((d / "config.json").read_text())
    data = (d / "diffusion_pytorch_model.safetensors").read_bytes()
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_transformer(bad)
    pth = tmp_path / "trunc.pth"
    torch.save({"a": torch.zeros(1000)}, tmp_path / "ok.pth")
    pth.write_bytes((tmp_path / "ok.pth").read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cannot read PyTorch checkpoint"):
        load_transformer(pth)


def test_nothing_written_on_failure(diffusers_dir, tmp_path):
    _, d = diffusers_dir
    config, params = load_transformer(d)
    broken = dict(params)
    broken["x_embedder"] = {"kernel": np.zeros((3, 3), np.float32), "bias": params["x_embedder"]["bias"]}
    for fmt in ("diffusers", "original", "jax"):
        dst = tmp_path / f"out_{fmt}"
        with pytest.raises(CheckpointError, match="x_embedder/kernel"):
            save_transformer(dst, config, broken, fmt)
        assert not dst.exists()
    # a failure in the middle of writing (after some shards) leaves nothing either
    import lumina_jax.convert.nextdit as nd

    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        raise OSError("disk full")

    orig = nd.write_sharded_safetensors
    nd.write_sharded_safetensors = failing
    try:
        with pytest.raises(OSError):
            save_transformer(tmp_path / "mid", config, params, "diffusers")
    finally:
        nd.write_sharded_safetensors = orig
    assert calls["n"] == 1 and not (tmp_path / "mid").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mid")]
    # folders made for the output go again; a killed run's temporary goes when the next run starts
    import socket

    with pytest.raises(CheckpointError):
        save_transformer(tmp_path / "new" / "deeper" / "o", config, broken, "original")  # -> o/consolidated...pth
    assert not (tmp_path / "new").exists()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs
    stale = tmp_path / f".again.safetensors.tmp-{socket.gethostname()}-{gone.pid}-x7"
    (stale / "again.safetensors").mkdir(parents=True)
    alive = tmp_path / f".again.safetensors.tmp-{socket.gethostname()}-{os.getppid()}-y8"  # running
    alive.mkdir()
    save_transformer(tmp_path / "again.safetensors", config, params, "original")
    assert not stale.exists() and alive.exists()


def test_killed_overwrite_is_recovered(diffusers_dir, tmp_path, capsys, monkeypatch):
    """An --overwrite killed between its two renames left DST missing and the old one aside: the next
    run puts it back (and then refuses to replace it without --overwrite); killed after the renames,
    the old one is deleted. Entries of a running process are left alone."""
    import socket

    from lumina_jax.convert.cli import main

    _, d = diffusers_dir
    config, params = load_transformer(d)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    dst = tmp_path / "o.safetensors"
    first = save_transformer(dst, config, params, "original")
    aside = tmp_path / f".o.safetensors.old-{host}-{gone.pid}"
    os.replace(first, aside)  # what a kill between the renames leaves
    rc = main([str(d), str(dst), "--to", "original"])
    assert rc == 1 and "already exists (pass --overwrite" in capsys.readouterr().err
    assert dst.exists() and not aside.exists()
    _assert_bit_exact(_tensors(dst), _tensors(save_transformer(tmp_path / "ref.safetensors", config, params,
                                                               "original")))  # fmt: skip
    aside.write_bytes(b"old")  # killed after both renames: the old one is only deleted
    running = tmp_path / f".o.safetensors.old-{host}-{os.getppid()}"
    running.write_bytes(b"theirs")
    save_transformer(dst, config, params, "original", overwrite=True)
    assert not aside.exists() and running.read_bytes() == b"theirs"
    # the refusal comes before the (long) load
    import lumina_jax.convert.nextdit as nd

    os.replace(dst, aside)
    loads = []
    monkeypatch.setattr(nd, "load_transformer", lambda *a, **k: loads.append(a))
    assert main([str(d), str(dst), "--to", "original"]) == 1 and loads == []
    assert dst.exists() and not aside.exists()
    monkeypatch.undo()
    # a DST that is a link to a folder is replaced by the new output; the link goes, not its target
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    (tmp_path / "link").symlink_to(target)
    save_transformer(tmp_path / "link", config, params, "diffusers", overwrite=True)
    assert (tmp_path / "link").is_dir() and not (tmp_path / "link").is_symlink() and (target / "keep").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".link")]
    # a directory output (diffusers) comes back the same way
    out = save_transformer(tmp_path / "dir", config, params, "diffusers")
    os.replace(out, tmp_path / f".dir.old-{host}-{gone.pid}")
    with pytest.raises(FileExistsError):
        save_transformer(tmp_path / "dir", config, params, "diffusers")
    _assert_bit_exact(_tensors(tmp_path / "dir"), _tensors(d))


@pytest.mark.parametrize("fmt", ["jax", "diffusers", "original"])
def test_verify_reads_the_output_back_and_names_what_differs(diffusers_dir, tmp_path, fmt):
    from lumina_jax.convert.nextdit import verify_transformer

    _, d = diffusers_dir
    config, params = load_transformer(d, dtype=None)
    dst = tmp_path / ("o.pth" if fmt == "original" else "o")
    out = save_transformer(dst, config, params, fmt, dtype="bf16")
    n = verify_transformer(out, config, params, fmt, dtype="bf16")
    assert n == len(_tensors(out) if fmt != "jax" else flatten(params))
    with pytest.raises(CheckpointError, match="tensors differ"):  # not what was asked for
        verify_transformer(out, config, params, fmt, dtype=None)
    flat = flatten(params)
    key = "x_embedder/bias"
    changed = dict(flat, **{key: np.asarray(flat[key]).copy()})
    changed[key][3] += 1e-3  # one value
    from lumina_jax.convert.common import unflatten

    torch_key = "x_embedder.bias"
    with pytest.raises(CheckpointError, match=rf"1 tensors differ .*{torch_key if fmt != 'jax' else key}.*other values"):
        verify_transformer(out, config, unflatten(changed), fmt, dtype="bf16")
    import dataclasses

    other = dataclasses.replace(config, axes_lens=(99, 99, 99))
    with pytest.raises(CheckpointError, match="axes_lens" if fmt != "diffusers" else "config.json"):
        verify_transformer(out, other, params, fmt, dtype="bf16")


def test_cli_verify(diffusers_dir, tmp_path, capsys):
    from lumina_jax.convert.cli import main

    _, d = diffusers_dir
    assert main([str(d), str(tmp_path / "o.safetensors"), "--to", "original", "--verify"]) == 0
    assert f"verified {tmp_path / 'o.safetensors'}: " in capsys.readouterr().out


def test_original_folder_picks_its_weights_file(diffusers_dir, tmp_path, capsys):
    from lumina_jax.convert.cli import main
    from lumina_jax.convert.nextdit import original_weights_file

    _, d = diffusers_dir
    config, params = load_transformer(d)
    folder = tmp_path / "orig"
    save_transformer(folder, config, params, "original")  # -> folder/consolidated.00-of-01.pth
    ema = {k: v * 0 for k, v in flatten(params).items()}
    from lumina_jax.convert.common import unflatten

    save_transformer(folder / "consolidated_ema.00-of-01.pth", config, unflatten(ema), "original")
    assert original_weights_file(folder) == folder / "consolidated.00-of-01.pth"  # not the EMA weights
    _assert_bit_exact(flatten(load_transformer(folder)[1]), {k: np.asarray(v) for k, v in flatten(params).items()})
    assert main([str(folder), str(tmp_path / "j"), "--to", "jax"]) == 0
    assert f"reading {folder / 'consolidated.00-of-01.pth'} (original)" in capsys.readouterr().out
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        (shards / f"consolidated.{i:02d}-of-02.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model-parallel shards \['consolidated.00-of-02.pth', "
                                              r"'consolidated.01-of-02.pth'\] are not supported"):
        load_transformer(shards)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("consolidated.00-of-01.pth", "consolidated.pth"):
        (two / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match="several weights files"):
        load_transformer(two)

    def folder_of(*names):
        f = tmp_path / "-".join(names)
        f.mkdir()
        for name in names:
            (f / name).write_bytes(b"")
        return f

    # the EMA file is not read although its suffix sorts first; a folder of EMA weights alone is
    f = folder_of("consolidated.00-of-01.pth", "consolidated_ema.00-of-01.safetensors")
    assert original_weights_file(f) == f / "consolidated.00-of-01.pth"
    f = folder_of("consolidated.00-of-01.pth", "consolidated.00-of-01.safetensors")
    assert original_weights_file(f) == f / "consolidated.00-of-01.safetensors"
    f = folder_of("consolidated_ema.00-of-01.pth")
    assert original_weights_file(f) == f / "consolidated_ema.00-of-01.pth"
    # shards are refused whichever file names them, EMA or passed directly
    with pytest.raises(CheckpointError, match="model-parallel shards"):
        original_weights_file(folder_of("consolidated_ema.00-of-02.pth", "consolidated_ema.01-of-02.pth"))
    with pytest.raises(CheckpointError, match="model-parallel shards"):
        load_transformer(shards / "consolidated.00-of-02.pth")


def test_unknown_format_and_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_transformer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="cannot tell the checkpoint format"):
        load_transformer(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="unknown checkpoint file type"):
        load_transformer(tmp_path / "x.txt")


def test_sharded_export(diffusers_dir, tmp_path):
    _, d = diffusers_dir
    config, params = load_transformer(d)
    out = save_transformer(tmp_path / "sh", config, params, "diffusers", max_shard_bytes=200_000)
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_bit_exact(_tensors(d), _tensors(out))


def test_cli_convert(diffusers_dir, tmp_path, monkeypatch, capsys):
    _, d = diffusers_dir
    dst = tmp_path / "cli.safetensors"
    r = subprocess.run([sys.executable, "-m", "lumina_jax", "convert", str(d), str(dst), "--to", "original"],
                       capture_output=True, text=True, cwd=Path(__file__).parent.parent)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert dst.exists() and "wrote" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lumina_jax", "convert", str(tmp_path / "missing"), str(tmp_path / "y"),
                        "--to", "jax"], capture_output=True, text=True, cwd=Path(__file__).parent.parent)  # fmt: skip
    assert r.returncode != 0 and "no such file" in r.stderr
    # An existing destination is refused before the source is read; an unwritable one is an error line.
    from lumina_jax.convert.cli import main as convert_main

    assert convert_main([str(tmp_path / "missing"), str(dst), "--to", "original"]) == 1
    assert convert_main([str(d), str(d / "x.safetensors"), "--to", "original"]) == 1
    assert "or inside it" in capsys.readouterr().err and not (d / "x.safetensors").exists()
    from lumina_jax.convert import nextdit as convert_nextdit

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / "ro"))

    monkeypatch.setattr(convert_nextdit, "save_transformer", read_only)
    assert convert_main([str(d), str(tmp_path / "ro" / "x.safetensors"), "--to", "original"]) == 1
    assert "error: [Errno 30] Read-only file system" in capsys.readouterr().err


def test_a_config_given_for_a_diffusers_folder_may_not_contradict_its_config_json(diffusers_dir):
    """``config=`` (``--config``) for a diffusers folder may add what config.json cannot hold (the original's
    q/k-norm eps), not change what it holds (a silently different model otherwise)."""
    _, d = diffusers_dir
    config, _ = load_transformer(d)
    with pytest.raises(CheckpointError, match=r"config.json disagrees with the config given for it: axes_lens .* there"):
        load_transformer(d, config=config.replace(axes_lens=(10, 10, 10)))
    other_eps = config.replace(qk_norm_eps=1e-6)
    assert load_transformer(d, config=other_eps)[0] == other_eps
    # the same model said differently (out_channels None = in_channels; the default image size is metadata)
    same = config.replace(out_channels=config.in_channels, sample_size=config.sample_size * 2)
    assert load_transformer(d, config=same)[0] == same
    # a folder whose config.json is missing: the given config is what describes the weights
    import shutil

    bare = Path(d).parent / "no_config_json"
    shutil.copytree(d, bare)
    (bare / "config.json").unlink()
    assert load_transformer(bare, config=config)[0] == config


def test_weight_file_suffixes_are_case_insensitive(diffusers_dir, tmp_path):
    """``Model.SafeTensors`` is a safetensors file (not a folder holding a .pth), and reads back bit-exact."""
    _, d = diffusers_dir
    config, params = load_transformer(d, dtype=None)
    out = save_transformer(tmp_path / "Model.SafeTensors", config, params, "original")
    assert out == tmp_path / "Model.SafeTensors" and out.is_file() and out.read_bytes()[8:9] == b"{"  # safetensors header
    again = save_transformer(tmp_path / "a.safetensors", *load_transformer(out, dtype=None), "original")
    folder = tmp_path / "folder"  # a folder holding such a file reads it as its weights
    save_transformer(folder / "consolidated.00-of-01.SAFETENSORS", config, params, "original")
    assert load_transformer(folder, dtype=None)[0] == config
    _assert_bit_exact(_tensors(again), _tensors(save_transformer(tmp_path / "b.safetensors", config, params, "original")))


def test_a_model_without_refiners_is_refused_by_the_jax_format_by_name(tmp_path):
    """orbax cannot save empty arrays: ``n_refiner_layers: 0`` is named before anything is written."""
    import dataclasses

    from lumina_jax.models.nextdit import NextDiTConfig, init_params

    config = dataclasses.replace(NextDiTConfig.from_yaml("nextdit_tiny"), n_refiner_layers=0)
    with pytest.raises(ValueError, match=r"empty params .*n_refiner_layers=0.*'diffusers' or 'original'"):
        save_transformer(tmp_path / "r0", config, init_params(config, 0), "jax")
    assert not (tmp_path / "r0").exists()
