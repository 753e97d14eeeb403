"""Qwen2-VL / Qwen2.5-VL checkpoint conversion: both directions, both key layouts, bit-exact round trips."""

from __future__ import annotations

import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest

import torch
import transformers  # noqa: F401 -- required (requirements-dev.txt): a missing one fails, not skips

from lumina_jax.convert.captioner import (  # noqa: E402
    canonical_key, load_captioner, params_to_torch_state_dict, read_config, save_captioner,
    torch_key_shapes, torch_state_dict_to_params)
from lumina_jax.convert.common import TensorSource, flatten, to_numpy  # noqa: E402
from lumina_jax.convert.errors import CheckpointError  # noqa: E402
from lumina_jax.models.captioner import testing as T  # noqa: E402
from lumina_jax.models.captioner.config import CaptionerConfig, qwen2_5_vl_7b, qwen2_vl_7b  # noqa: E402


def _hf_class(family):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration


def _sd(model) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family,tied", [("qwen2_vl", False), ("qwen2_5_vl", False), ("qwen2_vl", True)])
def test_directory_round_trip_bit_exact(tmp_path, family, tied):
    src = tmp_path / "hf"
    config, model = T.save_tiny_model(src, family, tie_word_embeddings=tied)
    ref = _sd(model)

    loaded_config, params = load_captioner(src, dtype=None)
    assert loaded_config.text == config.text and loaded_config.vision == config.vision
    assert ("lm_head" in params["language_model"]) == (not tied)

    out = save_captioner(tmp_path / "export", loaded_config, params, processor_dir=src)
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()
    text = json.loads((out / "config.json").read_text())["text_config"]  # transformers 4.x reads rope_scaling
    assert text["rope_scaling"] == {"type": "mrope", "mrope_section": list(loaded_config.text.mrope_section)}
    written = TensorSource(out)
    expected = {k: v for k, v in ref.items() if not (tied and k == "lm_head.weight")}
    assert sorted(written.keys()) == sorted(expected)
    for k, v in expected.items():
        w = written.get(k)
        assert w.dtype == v.dtype and w.shape == v.shape, k
        assert np.array_equal(w, v), k

    # transformers itself loads the export, with identical weights (tied head included)
    again = _hf_class(family).from_pretrained(str(out))
    for k, v in _sd(again).items():
        assert np.array_equal(v, ref[k]), k


def test_bf16_round_trip_and_released_layout(tmp_path):
    config, model = T.save_tiny_model(tmp_path / "hf", "qwen2_5_vl")
    params = torch_state_dict_to_params(model.state_dict(), config, dtype="bf16")
    assert flatten(params)["visual/patch_embed/kernel"].dtype == ml_dtypes.bfloat16
    save_captioner(tmp_path / "bf16", config, params)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    _, back = load_captioner(tmp_path / "bf16", dtype=None)
    for k, v in flatten(params).items():
        assert flatten(back)[k].dtype == v.dtype and np.array_equal(flatten(back)[k], v), k

    # the released checkpoints' (transformers 4.4x) names: visual.* and model.* -- same params
    old = params_to_torch_state_dict(params, config, prefix_layout="4.x")
    assert "visual.blocks.0.attn.qkv.weight" in old and "model.layers.0.self_attn.q_proj.weight" in old
    assert all(not k.startswith("model.visual") for k in old)
    from_old = torch_state_dict_to_params(old, config, dtype=None)
    for k, v in flatten(params).items():
        assert np.array_equal(flatten(from_old)[k], v), k


def test_mixed_dtype_checkpoint_keeps_each_tensors_dtype(tmp_path):
    """A bf16 checkpoint whose vision merger is stored in fp32: ``dtype=None`` keeps every tensor's own dtype
    (not the final norm's for all), so the export is bit-exact, dtypes included; a layer stack stored in two
    dtypes takes the wider one, losslessly."""
    from lumina_jax.convert.safetensors_io import save_file

    config, model = T.save_tiny_model(tmp_path / "hf", "qwen2_5_vl")
    sd = {k: v.astype(np.float32 if ".merger." in k else ml_dtypes.bfloat16) for k, v in _sd(model).items()}
    sd["model.language_model.layers.1.mlp.up_proj.weight"] = sd["model.language_model.layers.1.mlp.up_proj.weight"].astype(np.float32)
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file(sd, src / "model.safetensors")
    _, params = load_captioner(src, dtype=None)
    flat = flatten(params)
    assert flat["visual/merger/fc1/kernel"].dtype == np.float32
    assert flat["visual/patch_embed/kernel"].dtype == ml_dtypes.bfloat16
    assert flat["language_model/layers/mlp/up_proj/kernel"].dtype == np.float32  # widened stack
    save_captioner(tmp_path / "export", config, params)
    written = TensorSource(tmp_path / "export")
    for k, v in sd.items():
        w = written.get(k)
        if k.startswith("model.language_model.layers.") and ".mlp.up_proj." in k:
            assert w.dtype == np.float32 and np.array_equal(w, v.astype(np.float32)), k
        else:
            assert w.dtype == v.dtype and np.array_equal(w, v), k


def test_key_errors_name_the_keys(tmp_path):
    config, model = T.save_tiny_model(tmp_path / "hf", "qwen2_vl")
    sd = _sd(model)
    broken = dict(sd)
    del broken["model.visual.blocks.1.attn.qkv.bias"]
    broken["model.language_model.layers.0.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    broken["model.visual.extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointError) as e:
        torch_state_dict_to_params(broken, config)
    msg = str(e.value)
    assert "visual.blocks.1.attn.qkv.bias" in msg and "layers.0.mlp.up_proj.weight" in msg
    assert "visual.extra.weight" in msg
    dup = dict(sd)
    dup["visual.merger.mlp.0.bias"] = sd["model.visual.merger.mlp.0.bias"]
    with pytest.raises(CheckpointError, match="same tensor"):
        torch_state_dict_to_params(dup, config)

    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["text_config"]["use_sliding_window"] = True
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        read_config(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="no config.json"):
        read_config(tmp_path)


# The config.json of Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct (flat, transformers 4.4x).
QWEN2_VL_7B_JSON = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}
QWEN2_5_VL_7B_JSON = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}


def test_released_configs_and_config_round_trip():
    c2 = CaptionerConfig.from_hf_config(QWEN2_VL_7B_JSON)
    assert c2 == qwen2_vl_7b()
    c25 = CaptionerConfig.from_hf_config(QWEN2_5_VL_7B_JSON)
    assert c25.text == dataclasses.replace(qwen2_5_vl_7b().text, max_position_embeddings=128000)
    assert c25.vision == dataclasses.replace(qwen2_5_vl_7b().vision, tokens_per_second=2)
    for c in (c2, c25):
        assert CaptionerConfig.from_hf_config(c.to_hf_config()) == c
    # the 7B key table: 730 (Qwen2-VL) tensors, shapes as in the released safetensors index
    shapes = torch_key_shapes(c2)
    assert shapes["visual.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert shapes["visual.blocks.0.attn.qkv.weight"] == (3840, 1280)
    assert shapes["visual.merger.mlp.0.weight"] == (5120, 5120)
    assert shapes["language_model.layers.0.self_attn.k_proj.weight"] == (512, 3584)
    assert shapes["lm_head.weight"] == (152064, 3584)
    assert len(shapes) == 730
    assert canonical_key("model.layers.3.mlp.up_proj.weight") == "language_model.layers.3.mlp.up_proj.weight"
    assert canonical_key("model.visual.blocks.0.norm1.weight") == "visual.blocks.0.norm1.weight"
