"""Gemma-2 text encoder: parity with transformers' Gemma2Model, the key mapper, and checkpoint I/O.

The reference is ``transformers.Gemma2Model`` in eager attention on CPU with a tiny random config in
which every Gemma-2 feature changes the output (checked by ``test_every_feature_is_exercised``):
soft-cap 2.0, sliding window 4 < sequence length, GQA 4/2 heads, query_pre_attn_scalar 24 != head_dim 16,
norm weights away from zero, right padding with a different length per row.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers

from lumina_jax.convert import gemma2 as conv  # noqa: E402
from lumina_jax.convert.common import TensorSource, flatten  # noqa: E402
from lumina_jax.convert.errors import CheckpointError  # noqa: E402
from lumina_jax.models.gemma2 import (  # noqa: E402
    FULL,
    SLIDING,
    Gemma2Config,
    Gemma2Encoder,
    dit_features,
    encode,
    param_logical_axes,
    param_shapes,
)
from lumina_jax.models.gemma2_bench import reference_pair  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = Gemma2Config.from_yaml(ROOT / "configs/model/gemma2_tiny.yaml")
LENGTHS = (12, 7, 1)  # right padding, one length per row; 12 > sliding window 4
L = 12
TOL = {"fp32": 1e-5, "bf16": 2e-2}  # relative L2 on valid tokens, every hidden state


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# One compiled program per (config, dtype, shapes): far faster on CPU than op-by-op dispatch.
run = jax.jit(encode, static_argnames=("config", "dtype", "output_hidden_states", "precision"))


@pytest.fixture(scope="module")
def pair():
    return reference_pair(TINY, seed=0)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, TINY.vocab_size, size=(len(LENGTHS), L))
    ids[:, 0] = TINY.bos_token_id
    mask = np.arange(L)[None, :] < np.array(LENGTHS)[:, None]
    ids[~mask] = TINY.pad_token_id
    return ids.astype(np.int32), mask


@pytest.fixture(scope="module")
def reference(pair, batch):
    model, _ = pair
    ids, mask = batch
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy()


# ----------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_hidden_state_matches_transformers(pair, batch, reference, dtype):
    _, params = pair
    ids, mask = batch
    ref, last = reference
    assert len(ref) == TINY.num_layers + 1
    np.testing.assert_array_equal(ref[-1], last)  # transformers' convention: [-1] is after the final norm
    jdt = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
    out = run(params, ids, mask, TINY, dtype=jdt, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref)
    assert out.hidden_states[0].dtype == jdt
    errs = [rel_l2(np.asarray(h, np.float32)[mask], r[mask]) for h, r in zip(out.hidden_states, ref)]
    print(f"\n{dtype}: relative L2 per hidden state on valid tokens: {['%.2e' % e for e in errs]}")
    assert max(errs) <= TOL[dtype], errs
    # last_hidden_state / penultimate are the same arrays as the corresponding hidden states
    np.testing.assert_array_equal(np.asarray(out.last_hidden_state), np.asarray(out.hidden_states[-1]))
    np.testing.assert_array_equal(np.asarray(out.penultimate_hidden_state), np.asarray(out.hidden_states[-2]))


def test_dit_features_are_transformers_hidden_states_minus_2(pair, batch, reference):
    _, params = pair
    ids, mask = batch
    ref, _ = reference
    feats = np.asarray(jax.jit(lambda p, i, m: dit_features(p, i, m, TINY))(params, ids, mask))
    err = rel_l2(feats[mask], ref[-2][mask])
    print(f"\ndit_features vs hidden_states[-2], fp32: relative L2 {err:.2e}")
    assert err <= TOL["fp32"]
    # and it is not the final-normed state or the output of another layer
    assert rel_l2(feats[mask], ref[-1][mask]) > 1e-2
    assert rel_l2(feats[mask], ref[-3][mask]) > 1e-2


@pytest.mark.parametrize("change", [
    {"attn_logit_softcapping": None},
    {"sliding_window": None},
    {"query_pre_attn_scalar": 16.0},
    {"layer_types": (FULL, SLIDING, FULL, SLIDING)},
    {"rms_norm_eps": 1e-1},
])
def test_every_feature_is_exercised(pair, batch, reference, change):
    """Dropping any one Gemma-2 feature must break parity, so the parity test can fail."""
    _, params = pair
    ids, mask = batch
    ref, _ = reference
    out = run(params, ids, mask, dataclasses.replace(TINY, **change)).last_hidden_state
    assert rel_l2(np.asarray(out)[mask], ref[-1][mask]) > 1e-3


def test_padding_does_not_change_valid_tokens(pair, batch):
    _, params = pair
    ids, mask = batch
    short = run(params, ids[1:2, :7], mask[1:2, :7], TINY).penultimate_hidden_state
    padded = run(params, ids[1:2], mask[1:2], TINY).penultimate_hidden_state
    np.testing.assert_allclose(np.asarray(padded)[0, :7], np.asarray(short)[0], rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(padded)).all()  # fully masked padding rows stay finite


def test_out_of_table_ids_are_an_error_or_harmless_padding(pair, batch):
    """An id outside the table at a valid position is an error (host ids); at a padded position (a pad id the
    table lacks) it reads token 0, so no NaN reaches the valid tokens (jnp.take fills NaN)."""
    _, params = pair
    ids, mask = batch
    bad = ids.copy()
    bad[1, 10] = TINY.vocab_size + 3  # padded position of row 1 (length 7)
    got = np.asarray(run(params, bad, mask, TINY).penultimate_hidden_state)
    want = np.asarray(run(params, ids, mask, TINY).penultimate_hidden_state)
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5, atol=1e-5)
    bad[1, 3] = -1  # a valid position
    with pytest.raises(ValueError, match=r"token ids outside the vocabulary \(0\.\.511\): min -1"):
        encode(params, bad, mask, TINY)
    with pytest.raises(ValueError, match=r"input_ids have shape \(\d+,\); want \(B, L\)"):
        encode(params, ids[0], None, TINY)  # one sequence without its batch axis


def test_remat_same_forward_and_gradients(pair, batch):
    _, params = pair
    ids, mask = batch

    def loss(p, remat):
        out = Gemma2Encoder(TINY, remat=remat).apply({"params": p}, ids, mask).penultimate_hidden_state
        return jnp.sum(jnp.where(mask[..., None], out, 0.0) ** 2)

    fwd = jax.jit(loss, static_argnums=1)
    np.testing.assert_allclose(fwd(params, True), fwd(params, False), rtol=1e-6)
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_remat, g_plain = grad(params, True), grad(params, False)
    jaxpr = lambda remat: str(jax.make_jaxpr(loss, static_argnums=1)(params, remat))  # noqa: E731
    assert "remat" in jaxpr(True) and "remat" not in jaxpr(False)  # jax.checkpoint shows as remat2
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):  # fp32 rounds differently: rel L2
        assert np.linalg.norm(np.asarray(a) - np.asarray(b)) <= 1e-5 * np.linalg.norm(np.asarray(b)) + 1e-12
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g_plain))  # (the final norm gets none)


# ----------------------------------------------------------------------------------------------
# config and param layout


def test_config_round_trips_through_transformers():
    hf = transformers.Gemma2Config(**TINY.to_hf_config())
    assert Gemma2Config.from_hf_config(hf.to_dict()) == TINY
    assert hf.layer_types == list(TINY.layer_types)
    # a transformers 4.4x-era config.json (google/gemma-2-2b): rope_theta at top level, no layer_types
    old = {"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
           "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
           "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
           "final_logit_softcapping": 30.0, "sliding_window": 4096, "max_position_embeddings": 8192,
           "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "attention_bias": False}
    assert Gemma2Config.from_hf_config(old) == Gemma2Config.from_yaml(ROOT / "configs/model/gemma2_2b.yaml")
    assert transformers.Gemma2Config(**old).layer_types == list(Gemma2Config().layer_types)
    # keys missing from a config.json take transformers' defaults, as from_pretrained would
    optional = ("head_dim", "num_key_value_heads", "query_pre_attn_scalar", "attn_logit_softcapping",
                "final_logit_softcapping", "sliding_window")  # fmt: skip
    minimal = {k: v for k, v in old.items() if k not in optional}
    ours, theirs = Gemma2Config.from_hf_config(minimal), transformers.Gemma2Config(**minimal)
    assert [getattr(ours, k) for k in ("head_dim", "num_kv_heads", "query_pre_attn_scalar", "attn_logit_softcapping",
                                       "final_logit_softcapping", "sliding_window")] == \
        [getattr(theirs, k) for k in optional]  # fmt: skip
    # an explicit null keeps its meaning
    assert Gemma2Config.from_hf_config({**old, "attn_logit_softcapping": None}).attn_logit_softcapping is None
    with pytest.raises(ValueError, match="model_type"):
        Gemma2Config.from_hf_config({**old, "model_type": "gemma3_text"})
    with pytest.raises(ValueError, match="unknown Gemma2Config keys.*num_hidden_layers"):
        Gemma2Config.from_dict({"num_hidden_layers": 3})


def test_param_tree_matches_mapper_and_logical_axes():
    shapes = {k: tuple(v.shape) for k, v in flatten(param_shapes(TINY)).items()}
    assert shapes == conv.jax_param_shapes(TINY)
    axes = {k: tuple(v) for k, v in flatten(param_logical_axes(TINY)).items()}
    assert axes["layers/self_attn/q_proj/kernel"] == ("layers", "embed", "heads", "head_dim")
    assert axes["layers/self_attn/k_proj/kernel"] == ("layers", "embed", "kv_heads", "head_dim")
    assert axes["layers/self_attn/o_proj/kernel"] == ("layers", "heads", "head_dim", "embed")
    assert axes["layers/mlp/down_proj/kernel"] == ("layers", "mlp", "embed")
    assert axes["embed_tokens/embedding"] == ("vocab", "embed")
    assert axes["norm/scale"] == ("norm",)
    vocab = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "layers"}
    assert all(set(a) <= vocab for a in axes.values())


# ----------------------------------------------------------------------------------------------
# checkpoints


@pytest.fixture(scope="module")
def hf_dir(pair, tmp_path_factory):
    model, _ = pair
    d = tmp_path_factory.mktemp("hf") / "text_encoder"
    model.save_pretrained(d, max_shard_size="20KB")  # several shards + index, like the real 3-shard repo
    assert len(list(d.glob("*.safetensors"))) > 1
    return d


def test_round_trip_is_bit_exact_and_loads_in_transformers(pair, batch, hf_dir, tmp_path):
    model, params = pair
    config, loaded = conv.load_text_encoder(hf_dir)
    assert config == TINY
    for (k, a), b in zip(flatten(loaded).items(), flatten(params).values()):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b, err_msg=k)

    out = conv.save_text_encoder(tmp_path / "export", config, jax.device_put(loaded), max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").exists()
    src, dst = TensorSource(hf_dir), TensorSource(out)
    assert sorted(src.keys()) == sorted(dst.keys())
    for k in src.keys():
        a, b = src.get(k), dst.get(k)
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert a.tobytes() == b.tobytes(), f"{k} differs after the round trip"

    reloaded = transformers.Gemma2Model.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = batch
    kw = dict(input_ids=torch.from_numpy(ids.astype(np.int64)),
              attention_mask=torch.from_numpy(mask.astype(np.int64)), output_hidden_states=True)
    with torch.no_grad():
        want, got = model(**kw).hidden_states, reloaded(**kw).hidden_states
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def test_prefixed_causal_lm_layout_and_bf16(pair, tmp_path):
    _, params = pair
    sd = conv.params_to_torch_state_dict(params, TINY)
    prefixed = {f"model.{k}": v for k, v in sd.items()}
    prefixed["lm_head.weight"] = sd["embed_tokens.weight"]  # ignored
    again = conv.torch_state_dict_to_params(prefixed, TINY)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    # bf16 export loads back as the bf16-rounded fp32 params
    out = conv.save_text_encoder(tmp_path / "bf16", TINY, params, dtype="bf16", prefix="model.")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(k.startswith("model.") for k in TensorSource(out).keys())
    _, p16 = conv.load_text_encoder(out, dtype=None)
    for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(params)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(a, np.asarray(b).astype(jnp.bfloat16))


def test_source_dtypes_kept_per_tensor_and_mixed_layers_refused(pair):
    """``dtype=None`` keeps each tensor's stored dtype (was: the final norm's, for the whole tree)."""
    _, params = pair
    sd = {k: np.asarray(v) for k, v in conv.params_to_torch_state_dict(params, TINY).items()}
    mixed = {k: (v.astype(jnp.bfloat16) if k.endswith("norm.weight") else v) for k, v in sd.items()}
    got = flatten(conv.torch_state_dict_to_params(mixed, TINY, dtype=None))
    assert got["layers/self_attn/q_proj/kernel"].dtype == np.float32 and got["norm/scale"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(got["layers/self_attn/q_proj/kernel"], flatten(params)["layers/self_attn/q_proj/kernel"])
    assert got["embed_tokens/embedding"].dtype == np.float32
    uneven = dict(sd, **{"layers.1.mlp.up_proj.weight": sd["layers.1.mlp.up_proj.weight"].astype(np.float16)})
    with pytest.raises(CheckpointError, match="layers.1.mlp.up_proj.weight is float16 but layers.0"):
        conv.torch_state_dict_to_params(uneven, TINY, dtype=None)
    assert flatten(conv.torch_state_dict_to_params(uneven, TINY))["layers/mlp/up_proj/kernel"].dtype == np.float32


def test_wrong_folders_and_settings_are_named(pair, hf_dir, tmp_path, caplog):
    from lumina_jax.convert.vae import load_vae
    from lumina_jax.text import TextEncoder

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "in_channels": 3}))
    with pytest.raises(CheckpointError, match="expected a Gemma-2 config.*AutoencoderKL config"):
        conv.load_text_encoder(tmp_path / "vae")
    with pytest.raises(CheckpointError, match="a transformers 'gemma2' config, not a diffusers AutoencoderKL"):
        load_vae(hf_dir)
    hf = json.loads((hf_dir / "config.json").read_text())
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if k != "vocab_size"}))
    with pytest.raises(CheckpointError, match="not a Gemma-2 config \\(no 'vocab_size'\\)"):
        conv.load_text_encoder(tmp_path / "partial")
    # transformers' Gemma-2 reads hidden_activation only (default gelu_pytorch_tanh), never hidden_act
    no_act = {k: v for k, v in hf.items() if k != "hidden_activation"}
    no_act["hidden_act"] = "gelu"
    assert Gemma2Config.from_hf_config(no_act).hidden_activation == transformers.Gemma2Config(**no_act).hidden_activation
    # a diffusers pipeline folder: its text_encoder/ is read
    import shutil

    shutil.copytree(hf_dir, tmp_path / "pipe" / "text_encoder")
    assert conv.load_text_encoder(tmp_path / "pipe")[0] == TINY
    # an untied LM head is not read: said
    untied = tmp_path / "untied"
    shutil.copytree(hf_dir, untied)
    (untied / "config.json").write_text(json.dumps(dict(hf, tie_word_embeddings=False)))
    from lumina_jax.convert.safetensors_io import save_file

    save_file({"lm_head.weight": np.zeros((TINY.vocab_size, TINY.hidden_size), np.float32)}, untied / "head.safetensors")
    index = json.loads((untied / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "head.safetensors"
    (untied / "model.safetensors.index.json").write_text(json.dumps(index))
    with caplog.at_level("WARNING", logger="lumina_jax.convert.gemma2"):
        conv.load_text_encoder(untied)
    assert "untied lm_head.weight is not read" in caplog.text
    with pytest.raises(ValueError, match="text encoder dtype must be one of"):
        TextEncoder(pair[1], TINY, object(), dtype="fp16")


def test_missing_unexpected_and_misshaped_keys_are_named(pair):
    _, params = pair
    sd = conv.params_to_torch_state_dict(params, TINY)
    missing = {k: v for k, v in sd.items() if k != "layers.2.mlp.up_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): layers\.2\.mlp\.up_proj\.weight"):
        conv.torch_state_dict_to_params(missing, TINY)
    bad = dict(sd)
    bad["layers.1.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"mis-shaped.*layers\.1\.self_attn\.k_proj\.weight: expected \(32, 64\)"):
        conv.torch_state_dict_to_params(bad, TINY)
    extra = {**sd, "layers.4.mlp.up_proj.weight": sd["layers.0.mlp.up_proj.weight"]}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): layers\.4\.mlp\.up_proj\.weight"):
        conv.torch_state_dict_to_params(extra, TINY)
    dup = {**sd, "model.norm.weight": sd["norm.weight"]}
    with pytest.raises(CheckpointError, match="name the same tensor"):
        conv.torch_state_dict_to_params(dup, TINY)


def test_truncated_shard_and_missing_config_raise(hf_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        conv.load_text_encoder(broken)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        conv.load_text_encoder(broken)


def test_failed_export_leaves_nothing_at_dst(pair, tmp_path, monkeypatch):
    _, params = pair
    dst = tmp_path / "out"
    # wrong shapes: caught before writing
    bad = jax.tree.map(lambda x: x, params)
    bad["layers"]["mlp"]["up_proj"]["kernel"] = np.zeros((4, 64, 95), np.float32)
    with pytest.raises(CheckpointError, match="layers/mlp/up_proj/kernel"):
        conv.save_text_encoder(dst, TINY, bad)
    assert not dst.exists()
    # a failure after some shards were written
    real = conv._to_torch
    calls = {"n": 0}

    def flaky(k, kind):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError("disk full (simulated)")
        return real(k, kind)

    monkeypatch.setattr(conv, "_to_torch", flaky)
    with pytest.raises(OSError, match="simulated"):
        conv.save_text_encoder(dst, TINY, params, max_shard_bytes=10_000)
    assert calls["n"] > 20 and not dst.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary leftovers either
    monkeypatch.setattr(conv, "_to_torch", real)
    conv.save_text_encoder(dst, TINY, params)
    with pytest.raises(FileExistsError):
        conv.save_text_encoder(dst, TINY, params)
