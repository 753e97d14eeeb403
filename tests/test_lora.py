"""LoRA adapters: read diffusers / PEFT / original / kohya files, merge into the JAX params.

The reference is diffusers' ``Lumina2Transformer2DModel`` with a PEFT LoRA attached (unmerged: PEFT adds
``scale * B A x`` at run time), saved with diffusers' own ``Lumina2Pipeline.save_lora_weights``; the same
adapter rewritten in the original layout (fused ``qkv``, ``lora_down``/``lora_up``, ``.alpha``) and in
kohya's underscore names must give the same merged model.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from nextdit_helpers import diffusers_forward, inputs, make_diffusers_model

from lumina_jax.convert.errors import CheckpointError
from lumina_jax.convert.lora import LoRA, load_lora, merge_lora
from lumina_jax.convert.nextdit import load_transformer
from lumina_jax.convert.safetensors_io import save_file
from lumina_jax.models.nextdit import NextDiT

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "linear_1", "linear_2", "linear_3", "norm1.linear", "x_embedder",
           "caption_embedder.1"]  # fmt: skip
RANK, ALPHA = 4, 6.0


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(base JAX config + params, reference output with the LoRA active, inputs, diffusers LoRA file, peft sd)."""
    from diffusers import Lumina2Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    root = tmp_path_factory.mktemp("lora")
    model = make_diffusers_model("gqa3", seed=5)
    model.save_pretrained(root / "base")
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False,
                     alpha_pattern={"to_out.0": 2.0})  # fmt: skip
    torch.manual_seed(1)
    model.add_adapter(cfg)
    with torch.no_grad():  # PEFT's random init is tiny for B; make the adapter change the output clearly
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    config, params = load_transformer(root / "base")
    x, t, cap, mask = inputs(config, batch=2, h=6, w=8, cap_lens=[4, 7], cap_pad=7)
    ref = diffusers_forward(model, x, t, cap, mask)
    peft_sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    Lumina2Pipeline.save_lora_weights(root / "diffusers", transformer_lora_layers=peft_sd,
                                      transformer_lora_adapter_metadata=cfg.to_dict())  # fmt: skip
    return config, params, ref, (x, t, cap, mask), root, peft_sd


def _out(config, params, x, t, cap, mask):
    fwd = jax.jit(lambda p, *a: NextDiT(config).apply({"params": p}, *a))
    return np.asarray(fwd(params, *(jnp.asarray(a) for a in (x, t, cap, mask))))


def _original_layout(peft_sd: dict, scales: dict) -> dict[str, torch.Tensor]:
    """The diffusers adapter in the original layout: q/k/v fused (A stacked, B block-diagonal: the same
    product), kohya ``lora_down``/``lora_up`` names, per-module ``.alpha`` keeping each module's scale."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in peft_sd.items():
        mod, _, kind = k.rpartition(".lora_")
        groups.setdefault(mod, {})[kind[0]] = v
    names = {"attn.to_out.0": "attention.out", "norm1.linear": "adaLN_modulation.1",
             "feed_forward.linear_1": "feed_forward.w1", "feed_forward.linear_2": "feed_forward.w2",
             "feed_forward.linear_3": "feed_forward.w3", "time_caption_embed.caption_embedder.1": "cap_embedder.1",
             "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "x_embedder": "x_embedder",
             "norm_out.linear_1": "final_layer.adaLN_modulation.1", "norm_out.linear_2": "final_layer.linear"}  # fmt: skip
    out: dict[str, torch.Tensor] = {}

    def put(name, a, b, alpha):
        out[f"diffusion_model.{name}.lora_down.weight"] = a
        out[f"diffusion_model.{name}.lora_up.weight"] = b
        out[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)

    for mod, g in groups.items():
        if mod.endswith("attn.to_q"):
            block = mod[: -len(".attn.to_q")]
            parts = [groups[f"{block}.attn.to_{n}"] for n in "qkv"]
            a = torch.cat([p["A"] for p in parts])
            b = torch.block_diag(*[p["B"] for p in parts])
            put(f"{block}.attention.qkv", a, b, scales["to_q"] * a.shape[0])
        elif mod.endswith(("attn.to_k", "attn.to_v")):
            continue
        else:
            suffix = next(s for s in names if mod.endswith(s))
            name = mod[: -len(suffix)] + names[suffix]
            put(name, g["A"], g["B"], scales["to_out.0" if suffix == "attn.to_out.0" else "other"] * g["A"].shape[0])
    return out


def test_diffusers_lora_matches_peft(case):
    config, params, ref, xs, root, _ = case
    lora = load_lora(root / "diffusers")
    assert lora.layout == "diffusers" and lora.ranks == [RANK]
    assert lora.modules["layers.0.attn.to_q"].scale == ALPHA / RANK
    assert lora.modules["layers.0.attn.to_out.0"].scale == 2.0 / RANK  # alpha_pattern from the metadata
    base = _out(config, params, *xs)
    assert rel_l2(ref, base) > 0.05  # the adapter matters
    merged = merge_lora(params, config, lora)
    assert rel_l2(ref, _out(config, merged, *xs)) <= 1e-5
    # base params untouched; weight 0 gives them back bit for bit
    again = merge_lora(params, config, lora, 0.0)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_original_and_kohya_layouts_merge_the_same(case, tmp_path):
    config, params, ref, xs, root, peft_sd = case
    sd = _original_layout(peft_sd, {"to_q": ALPHA / RANK, "to_out.0": 2.0 / RANK, "other": ALPHA / RANK})
    save_file({k: v.numpy() for k, v in sd.items()}, tmp_path / "orig.safetensors")
    lora = load_lora(tmp_path / "orig.safetensors")
    assert lora.layout == "original" and "layers.1.attention.qkv" in lora.modules
    assert rel_l2(ref, _out(config, merge_lora(params, config, lora), *xs)) <= 1e-5
    kohya = {"lora_unet_" + k[len("diffusion_model."):].rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0].replace(".", "_")
             + k[len(k.rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0]):]: v.numpy() for k, v in sd.items()}  # fmt: skip
    assert "lora_unet_layers_0_attention_qkv.lora_down.weight" in kohya
    save_file(kohya, tmp_path / "kohya.safetensors")
    lora_k = load_lora(tmp_path / "kohya.safetensors")
    assert sorted(lora_k.modules) == sorted(lora.modules)
    assert rel_l2(ref, _out(config, merge_lora(params, config, lora_k), *xs)) <= 1e-5


def test_peft_folder_and_weighted_sum(case, tmp_path):
    config, params, ref, xs, root, peft_sd = case
    d = tmp_path / "peft"
    d.mkdir()
    save_file({f"base_model.model.{k}": v.numpy() for k, v in peft_sd.items()}, d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA, "alpha_pattern": {"to_out.0": 2.0}}))
    lora = load_lora(d)
    assert rel_l2(ref, _out(config, merge_lora(params, config, lora), *xs)) <= 1e-5
    # two half-weight copies = the adapter once
    twice = merge_lora(params, config, [(lora, 0.5), (load_lora(root / "diffusers"), 0.5)])
    assert rel_l2(ref, _out(config, twice, *xs)) <= 1e-5
    # without any alpha: scale 1 (diffusers' assumption)
    (d / "adapter_config.json").unlink()
    assert load_lora(d).modules["layers.0.attn.to_q"].scale == 1.0


def test_lora_errors(case, tmp_path):
    config, params, _, _, root, peft_sd = case
    sd = {k: v.numpy() for k, v in peft_sd.items()}

    def bad(tensors, match, name="x.safetensors", merge=False):
        save_file(tensors, tmp_path / name)
        with pytest.raises(CheckpointError, match=match):
            lora = load_lora(tmp_path / name)
            if merge:
                merge_lora(params, config, lora)

    a = np.zeros((2, 72), np.float32)
    bad({"layers.0.attn.to_q.lora_magnitude_vector": np.ones(72, np.float32)}, "DoRA")
    bad({**sd, "layers.0.attn.to_q.weight": np.ones((72, 72), np.float32)}, r"not plain LoRA matrices, e.g. .*to_q\.weight")
    bad({"layers.0.attn.to_q.lora_A.weight": a}, r"'layers.0.attn.to_q' lacks its up matrix")
    bad({"layers.0.attn.to_qq.lora_A.weight": a, "layers.0.attn.to_qq.lora_B.weight": a.T},
        r"match no Next-DiT linear layer .*to_qq")
    bad({"layers.0.attn.to_q.lora_A.weight": a, "layers.0.attn.to_q.lora_B.weight": np.zeros((72, 3), np.float32)},
        "not a rank-r pair")
    bad({"layers.9.attn.to_q.lora_A.weight": a, "layers.9.attn.to_q.lora_B.weight": a.T},
        r"'layers.9.attn.to_q' is not in this model \(2 layers", merge=True)
    wide = np.zeros((2, 96), np.float32)
    bad({"layers.0.attn.to_q.lora_A.weight": wide, "layers.0.attn.to_q.lora_B.weight": wide.T},
        r"maps 96 -> 96 features, the model's weight 72 -> 72: a LoRA for another model", merge=True)
    bad({"something": a}, "no Next-DiT LoRA weights")
    qa, qb = sd["layers.0.attn.to_q.lora_A.weight"], sd["layers.0.attn.to_q.lora_B.weight"]
    bad({"layers.0.attn.to_q.lora_A.weight": qa, "layers.0.attn.to_q.lora_B.weight": qb,
         "lora_transformer_layers_0_attn_to_q.lora_down.weight": qa, "lora_transformer_layers_0_attn_to_q.lora_up.weight": qb},
        r"1 modules are given twice under different spellings, e.g. 'layers.0.attn.to_q'")  # one used to be dropped
    bad({"layers.0.attn.to_q.lora_A.weight": qa, "layers.0.attn.to_q.lora_B.weight": qb,
         "layers.0.attention.qkv.lora_A.weight": np.zeros((2, 72), np.float32),
         "layers.0.attention.qkv.lora_B.weight": np.zeros((120, 2), np.float32)},
        r"mixes the diffusers and original layouts")
    bad({"layers.0.attn.to_q.lora_A.weight": qa, "layers.0.attn.to_q.lora_B.weight": qb,
         "layers.0.attn.to_q.alpha": np.asarray(np.nan, np.float32)}, r"alpha nan \(not a finite number\)")
    bad({"layers.0.attn.to_q.lora_A.weight": qa, "layers.0.attn.to_q.lora_B.weight": np.full_like(qb, np.inf)},
        r"'layers.0.attn.to_q' holds NaN or infinite values")
    deep = config.replace(n_refiner_layers=12)  # deeper than the template used without a config
    names = {"noise_refiner.9.attn.to_q.lora_A.weight": qa, "noise_refiner.9.attn.to_q.lora_B.weight": qb}
    bad(names, r"checked against a 64-layer template: pass the model config")
    assert list(load_lora(tmp_path / "x.safetensors", deep).modules) == ["noise_refiner.9.attn.to_q"]
    from lumina_jax.convert.lora import pair_scales

    with pytest.raises(ValueError, match=r"--lora-scale must be finite numbers, got \[nan\]"):
        pair_scales(["a.safetensors"], [float("nan")])
    assert isinstance(load_lora(root / "diffusers"), LoRA)


# ----------------------------------------------------------------------------------------------
# pipeline and CLI


def _tiny_lora_file(path, config, seed=0, dim=None):
    """A diffusers-layout LoRA for every attention/FFN matrix of the tiny pipeline transformer."""
    rng = np.random.default_rng(seed)
    d = dim or config.dim
    hd = d // config.n_heads
    outs = {"to_q": config.n_heads * hd, "to_k": config.n_kv_heads * hd, "to_v": config.n_kv_heads * hd,
            "to_out.0": d}  # fmt: skip
    sd = {}
    for i in range(config.n_layers):
        for name, out in outs.items():
            sd[f"transformer.layers.{i}.attn.{name}.lora_A.weight"] = 0.3 * rng.standard_normal((2, d)).astype(np.float32)
            sd[f"transformer.layers.{i}.attn.{name}.lora_B.weight"] = 0.3 * rng.standard_normal((out, 2)).astype(np.float32)
    save_file(sd, path)
    return path


def test_pipeline_load_and_unload_lora(tmp_path, capsys):
    from lumina_jax.pipeline import Lumina2Pipeline
    from lumina_jax.sample.cli import main
    from lumina_jax.sample.tiny import random_components

    comps = random_components(0)
    cfg = comps.transformer_config
    f = _tiny_lora_file(tmp_path / "lora.safetensors", cfg)
    pipe = Lumina2Pipeline(comps, dtype="fp32")
    run = lambda: pipe("a red circle", num_inference_steps=2, seed=3, output_type="latent")  # noqa: E731
    base = run()
    lora = pipe.load_lora(f, 0.7)
    with_lora = run()
    assert np.abs(with_lora.latents - base.latents).max() > 1e-3
    assert with_lora.settings["loras"] == [[str(f), 0.7]]
    assert with_lora.timings["compile"] == 0.0  # same shapes: the compiled program is reused
    # the merged weights are merge_lora's
    want = merge_lora(comps.transformer, cfg, lora, 0.7)
    for a, b in zip(jax.tree_util.tree_leaves(pipe.dit_params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b)
    pipe.unload_lora()
    np.testing.assert_array_equal(run().latents, base.latents)
    # a LoRA for another model is refused and changes nothing
    other = _tiny_lora_file(tmp_path / "other.safetensors", cfg, dim=2 * cfg.dim)
    with pytest.raises(CheckpointError, match="a LoRA for another model"):
        pipe.load_lora(other)
    assert pipe.loras == []
    np.testing.assert_array_equal(run().latents, base.latents)
    # bf16: merged in float32, then cast once
    p16 = Lumina2Pipeline(comps, dtype="bf16")
    p16.load_lora(f)
    q = p16.dit_params["layers"]["blocks"]["attention"]["q"]
    assert q.dtype == jnp.bfloat16
    ref = merge_lora(comps.transformer, cfg, lora)["layers"]["blocks"]["attention"]["q"].astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(ref))

    # the CLI (the bundled model: a LoRA made for its size)
    from lumina_jax.convert.components import load_components
    from lumina_jax.pipeline import DEFAULT_MODEL_DIR

    f = _tiny_lora_file(tmp_path / "bundled.safetensors", load_components(DEFAULT_MODEL_DIR).transformer_config)
    common = ["a red circle", "--steps", "2", "--compilation-cache", "off", "--out", str(tmp_path / "x.png")]
    assert main([*common, "--lora", str(f), "--lora-scale", "0.5", "--lora-scale", "1"]) == 2
    assert "2 --lora-scale values for 1 --lora adapters" in capsys.readouterr().err
    assert main([*common, "--lora", str(other)]) == 2
    assert "a LoRA for another model" in capsys.readouterr().err
    assert main([*common, "--lora", str(f), "--lora-scale", "0.5"]) == 0
    assert "merged LoRA" in capsys.readouterr().err
    from PIL import Image

    meta = json.loads(Image.open(tmp_path / "x.png").text["lumina_jax"])
    assert meta["loras"] == [[str(f), 0.5]]


def test_alpha_sources_and_refused_keys(tmp_path, caplog):
    """alpha: PEFT's pattern matching (an alternation matches either module), rslora, PEFT's default 8
    for a folder config without lora_alpha; a lone file ignores an adapter_config.json beside it.
    Text-encoder tensors are skipped with a warning; norms, DoRA and only-text-encoder files are refused."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 72)).astype(np.float32), rng.standard_normal((72, 2)).astype(np.float32)
    pair = lambda m: {f"transformer.{m}.lora_A.weight": a, f"transformer.{m}.lora_B.weight": b}  # noqa: E731
    sd = {**pair("layers.0.attn.to_q"), **pair("layers.0.attn.to_k"), **pair("layers.0.attn.to_v")}
    meta = {"transformer.r": 2, "transformer.lora_alpha": 4, "transformer.alpha_pattern": {"to_q|to_k": 1.0}}
    save_file(sd, tmp_path / "p.safetensors", metadata={"lora_adapter_metadata": json.dumps(meta)})
    m = load_lora(tmp_path / "p.safetensors").modules
    assert (m["layers.0.attn.to_q"].scale, m["layers.0.attn.to_k"].scale, m["layers.0.attn.to_v"].scale) == (0.5, 0.5, 2.0)
    meta = {"transformer.r": 2, "transformer.lora_alpha": 4, "transformer.use_rslora": True}
    save_file(sd, tmp_path / "rs.safetensors", metadata={"lora_adapter_metadata": json.dumps(meta)})
    assert load_lora(tmp_path / "rs.safetensors").modules["layers.0.attn.to_v"].scale == pytest.approx(4 / np.sqrt(2))
    d = tmp_path / "peft"
    d.mkdir()
    save_file(sd, d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({"r": 2}))
    assert load_lora(d).modules["layers.0.attn.to_q"].scale == 8 / 2  # PEFT's default lora_alpha
    assert load_lora(d / "adapter_model.safetensors").modules["layers.0.attn.to_q"].scale == 1.0
    te = {"text_encoder.layers.0.self_attn.q_proj.lora_A.weight": a, "lora_te_layers_0_mlp.lora_down.weight": a}
    save_file({**sd, **te}, tmp_path / "te.safetensors")
    with caplog.at_level("WARNING"):
        assert len(load_lora(tmp_path / "te.safetensors").modules) == 3
    assert "2 text-encoder LoRA tensors" in caplog.text
    for tensors, msg in [(te, "no Next-DiT LoRA weights"), ({**sd, **pair("layers.0.attn.norm_q")}, r"norm_q"),
                         ({**sd, "layers.0.attn.to_q.dora_scale": np.ones((1, 72), np.float32)}, "DoRA")]:
        save_file(tensors, tmp_path / "bad.safetensors")
        with pytest.raises(CheckpointError, match=msg):
            load_lora(tmp_path / "bad.safetensors")


def test_convert_bakes_loras_into_a_checkpoint(case, tmp_path, capsys):
    from lumina_jax.convert.cli import main

    config, params, ref, xs, root, _ = case
    out = tmp_path / "merged"
    assert main([str(root / "base"), str(out), "--to", "jax", "--lora", str(root / "diffusers"), "--lora-scale",
                 "0.5", "--lora", str(root / "diffusers")]) == 0  # fmt: skip
    assert "merged" in capsys.readouterr().out
    _, got = load_transformer(out)
    want = merge_lora(params, config, [(load_lora(root / "diffusers"), 0.5)] * 2)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert rel_l2(ref, _out(config, got, *xs)) <= 1e-5  # two halves = the adapter once
    assert main([str(root / "base"), str(tmp_path / "x"), "--to", "jax", "--lora-scale", "2"]) == 1
    assert "--lora-scale without --lora" in capsys.readouterr().err
    # a bf16 base written as fp32: the adapter is merged in fp32 and rounded once (not to bf16 first)
    from lumina_jax.convert.nextdit import save_transformer

    b16 = save_transformer(tmp_path / "b16", config, params, "jax", dtype="bf16")
    assert main([str(b16), str(tmp_path / "wide"), "--to", "jax", "--dtype", "fp32", "--lora",
                 str(root / "diffusers")]) == 0  # fmt: skip
    _, base16 = load_transformer(b16, dtype=None)
    _, wide = load_transformer(tmp_path / "wide", dtype=None)
    lora = [(load_lora(root / "diffusers"), 1.0)]
    want = merge_lora(base16, config, lora, dtype=np.float32)
    narrow = merge_lora(base16, config, lora)  # rounded to bf16 on the way
    for a, b in zip(jax.tree.leaves(wide), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b, np.float32))
               for a, b in zip(jax.tree.leaves(wide), jax.tree.leaves(narrow)))  # fmt: skip


def test_convert_bakes_loras_into_a_whole_model_folder(tmp_path, capsys):
    """``convert MODEL_DIR DST --lora F``: the transformer of the written folder is merge_lora's, the encoders
    are untouched, and ``--verify`` checks the merged weights."""
    from pathlib import Path

    from lumina_jax.convert.cli import main
    from lumina_jax.convert.common import flatten
    from lumina_jax.convert.components import load_components

    model = Path(__file__).resolve().parents[1] / "lumina_jax" / "assets" / "default_model"
    src = load_components(model, dtype=None)
    f = _tiny_lora_file(tmp_path / "lora.safetensors", src.transformer_config)
    out = tmp_path / "merged"
    assert main([str(model), str(out), "--to", "diffusers", "--lora", str(f), "--lora-scale", "0.5", "--verify"]) == 0
    assert "merged" in capsys.readouterr().out
    got = load_components(out, dtype=None)
    want = merge_lora(src.transformer, src.transformer_config, [(load_lora(f), 0.5)])
    for k, v in flatten(want).items():
        np.testing.assert_array_equal(flatten(got.transformer)[k], np.asarray(v), err_msg=k)
    assert any(not np.array_equal(flatten(got.transformer)[k], v) for k, v in flatten(src.transformer).items())
    for k, v in flatten(src.vae).items():
        np.testing.assert_array_equal(flatten(got.vae)[k], v, err_msg=k)
