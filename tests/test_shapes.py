"""The synthetic shapes world, its TFDS builder, the autoencoder stages (identity; trained), the LM-pretrained
text encoder, and an end-to-end train -> assemble -> sample run of the shipped model's recipe (a few steps,
shapes only)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lumina_jax.shapes import checker, spec


def test_checker_is_exact_on_rendered_scenes():
    rng = np.random.default_rng(0)
    scenes = [spec.random_scene(rng, held_out=None) for _ in range(400)]
    images = [spec.render(s, 64, rng) for s in scenes]
    m = checker.check_many(images, scenes)
    assert m["colour"] == m["shape"] == m["position"] == m["all"] == 1.0
    # top triangles: the mass centroid sits low enough to read as "center" in ~1 % of jittered renders
    top = spec.Scene("white", (spec.Obj("red", "triangle", "top"),))
    assert checker.check_many([spec.render(top, 64, rng) for _ in range(300)], [top] * 300)["position"] == 1.0


def test_checker_rejects_stretched_shapes_and_off_palette_colours():
    white = np.full((64, 64, 3), 255, np.uint8)
    wide = white.copy()
    wide[20:49, 2:62] = (230, 30, 30)  # a red 60 x 29 rectangle is not a square
    assert checker.components(wide)[1][0].shape == "other"
    grey = white.copy()
    grey[20:40, 20:40] = (128, 128, 128)  # nearest palette colour is some colour, but grey is none of them
    assert checker.components(grey)[1][0].colour == "other"


def test_checker_rejects_wrong_attributes():
    s = spec.example_scene()
    img = spec.render(s)
    wrong = spec.Scene("black", (spec.Obj("green", "triangle", "left"), spec.Obj("blue", "circle", "right")))
    r = checker.check(img, wrong)
    assert not r.background and not r.objects[0]["colour"] and not r.objects[0]["shape"]
    assert r.objects[1]["colour"] and not r.objects[1]["shape"] and r.objects[1]["position"]
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert checker.summarise([checker.check(blank, s)])["colour"] == 0.0


def test_held_out_split():
    assert 8 <= len(spec.HELD_OUT) <= 20
    seen = set(spec.all_triples()) - spec.HELD_OUT
    # every pair of attributes still has training examples
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert {(t[a], t[b]) for t in seen} == {(t[a], t[b]) for t in spec.all_triples()}
    assert not spec.is_held_out(spec.example_scene())
    rng = np.random.default_rng(1)
    assert all(spec.is_held_out(spec.random_scene(rng, held_out=True)) for _ in range(20))
    assert not any(spec.is_held_out(spec.random_scene(rng, held_out=False)) for _ in range(50))
    assert spec.caption(spec.example_scene()) == spec.EXAMPLE_PROMPT


def test_identity_autoencoder_roundtrip():
    import jax.numpy as jnp

    from lumina_jax.models.vae import AutoencoderKL
    from lumina_jax.shapes import components

    cfg, p = components.identity_vae_params()
    assert cfg.downsample_factor == 1
    m = AutoencoderKL(cfg)
    x = jnp.asarray(spec.render(spec.example_scene())[None].astype(np.float32) / 127.5 - 1)
    z = m.apply({"params": p}, x, method=AutoencoderKL.encode).mode()
    y = m.apply({"params": p}, z, method=AutoencoderKL.decode)
    y = getattr(y, "sample", y)
    assert float(jnp.abs(z - x).max()) < 1e-4 and float(jnp.abs(y - x).max()) < 1e-4


def test_tokenizer_covers_vocabulary(tmp_path):
    from lumina_jax.shapes import components
    from lumina_jax.text import load_tokenizer

    tok = load_tokenizer(components.train_tokenizer(tmp_path / "tok"))
    assert len(tok) <= components.text_config().vocab_size
    pieces = tok.convert_ids_to_tokens(tok(spec.EXAMPLE_PROMPT)["input_ids"])
    assert not any(p.startswith("<0x") for p in pieces)  # no byte fallback for dataset words
    assert len(pieces) <= 20


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from lumina_jax.shapes import build

    from lumina_jax.shapes import vae_train

    work = tmp_path_factory.mktemp("shapes")
    info = build.prepare(work, num_train=48, num_test=4)
    cfg = vae_train.VAETrainConfig(steps=2, batch=2, small_every=0, calib_images=16)  # = shapes train-vae
    info["vae_metrics"] = vae_train.train_vae(work / "encoders" / "vae_f8", cfg, progress=False)
    return work, info


def test_tfds_builder_reads_through_grain_source(tiny_world):
    from lumina_jax.data.sources import TfdsSource
    from lumina_jax.shapes import tfds_builder

    _, info = tiny_world
    src = TfdsSource(builder_dir=info["builder_dir"], system_prompt="real", key_key="key")
    assert len(src) == 48
    item = src.get(0)
    assert isinstance(item.image, (bytes, np.ndarray)) and item.caption
    test = tfds_builder.load_scenes(info["builder_dir"], "test_held_out")
    assert len(test) == 4 and all(spec.is_held_out(s) for s, _ in test)
    train = tfds_builder.load_scenes(info["builder_dir"], "train")
    assert not any(spec.is_held_out(s) for s, _ in train)


def test_train_assemble_sample_end_to_end(tiny_world, tmp_path):
    """The shipped model's recipe (configs/train/shapes.yaml: f8 autoencoder, no system prompt) through
    ``python -m lumina_jax train``, ``shapes assemble`` and the pipeline, a few steps per stage."""
    from lumina_jax.pipeline import Lumina2Pipeline
    from lumina_jax.shapes import build
    from lumina_jax.convert.nextdit import load_transformer
    from lumina_jax.train.cli import main as train_main
    from lumina_jax.train.config import load_config

    work, info = tiny_world
    n_stages = len(load_config("configs/train/shapes.yaml").stages)
    ov = [f"run_dir={tmp_path / 'run'}", "log.every=1", "optimizer.warmup_steps=0", "log.progress=false"]
    for s in range(n_stages):  # every stage, 1 step (2 for the first two), batch 4, the tiny world
        ov += [f"stages.{s}.steps={2 if s < 2 else 1}", f"stages.{s}.batch=4"]
        ov += [f"stages.{s}.data.paths=[{info['builder_dir']}]", f"stages.{s}.data.vae={work}/encoders/vae_f8",
               f"stages.{s}.data.text_encoder={work}/encoders/text_encoder",
               f"stages.{s}.data.tokenizer={work}/encoders/tokenizer", f"stages.{s}.data.read_threads=1"]
    assert train_main(["configs/train/shapes.yaml", *ov]) == 0  # = python -m lumina_jax train ...
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 4 + (n_stages - 2) and np.isfinite(metrics[-1]["loss"])
    # raw images: the data counters of each stage (batch 4 per step), captions cut to max_text_len included
    assert [r["data/samples"] + r["data/padded_rows"] for r in metrics[:2]] == [4, 8]
    assert all(r["data/captions_truncated"] == 0 for r in metrics)
    with pytest.raises(ValueError, match="8-channel latents"):  # the identity stage does not fit this DiT
        build.assemble(tmp_path / "run", work, tmp_path / "bad", vae="vae")
    out = build.assemble(tmp_path / "run", work, tmp_path / "model")
    with pytest.raises(FileExistsError):  # the bundled model (the default --out) is not replaced unasked
        build.assemble(tmp_path / "run", work, out)
    stored = load_transformer(out / "transformer", dtype=None)[1]
    assert {str(a.dtype) for a in jax.tree.leaves(stored)} == {"bfloat16"}  # 20 MB repository budget
    pipe = Lumina2Pipeline.from_pretrained(out, compilation_cache=False)
    assert pipe.default_image_size == 64 and pipe.size_multiple == 16
    assert pipe.components.system_prompt == "empty" and pipe.components.time_shift == build.DEFAULT_SHIFT
    assert pipe.components.guidance_scale == build.DEFAULT_GUIDANCE == 2.5
    r = pipe([spec.EXAMPLE_PROMPT, "a green triangle at the top, on a black background"], num_inference_steps=2,
             seed=0, output_type="np")
    assert r.images.shape == (2, 64, 64, 3) and r.latents.shape == (2, 8, 8, 8)
    assert np.isfinite(r.images).all()
    res = checker.check_many((r.images * 255).astype(np.uint8), [spec.example_scene()] * 2)
    assert set(res) >= {"colour", "shape", "position", "all"}


def test_latent_recipe_config_matches_its_encoders():
    """configs/train/shapes_latent.yaml (session-5 experiment) loads, and its DiT reads what the trained
    autoencoder and the LM-pretrained text encoder produce (channels, width, patch -> 64 tokens at 64 px)."""
    from lumina_jax.models.gemma2 import Gemma2Config
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.models.vae import VAEConfig
    from lumina_jax.shapes import text_train, vae_train
    from lumina_jax.train.config import load_config

    cfg = load_config("configs/train/shapes_latent.yaml")
    dit = NextDiTConfig.from_yaml(cfg.model)
    vae, text = VAEConfig.from_yaml(vae_train.VAE_F4_CONFIG), Gemma2Config.from_yaml(text_train.TEXT_CONFIG)
    assert [s.resolution for s in cfg.stages] == [32, 64]
    assert dit.in_channels == vae.latent_channels and dit.cap_feat_dim == text.hidden_size
    assert (64 // (vae.downsample_factor * dit.patch_size)) ** 2 == 64
    assert all(s.data.vae.endswith("vae_f4") and s.data.text_encoder.endswith("text_encoder_lm") for s in cfg.stages)


def test_shipped_recipe_config_matches_its_encoders(tiny_world):
    """configs/train/shapes.yaml (the shipped model's) loads; its DiT reads the f8 autoencoder's latents
    (8 channels, 16 tokens at 64 px, 4 at 32 px) and the random text encoder's width; it trains without a
    system prompt and its text budget holds every caption of the vocabulary corpus (nothing is truncated)."""
    from lumina_jax.models.gemma2 import Gemma2Config
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.models.vae import VAEConfig
    from lumina_jax.shapes import components
    from lumina_jax.text import load_tokenizer
    from lumina_jax.train.config import load_config

    work, _ = tiny_world
    cfg = load_config("configs/train/shapes.yaml")
    dit = NextDiTConfig.from_yaml(cfg.model)
    vae = VAEConfig.from_yaml("configs/model/shapes_vae_f8.yaml")
    assert dit.in_channels == vae.latent_channels and vae.downsample_factor == 8
    assert dit.cap_feat_dim == Gemma2Config.from_yaml(components.TEXT_CONFIG).hidden_size
    tokens = [(s.resolution // (vae.downsample_factor * dit.patch_size)) ** 2 for s in cfg.stages]
    assert tokens == [4, 16, 16]
    assert {s.data.system_prompt for s in cfg.stages} == {"empty"}
    assert all(s.data.vae.endswith("vae_f8") for s in cfg.stages)
    tok = load_tokenizer(work / "encoders" / "tokenizer")
    longest = max(len(ids) for ids in tok(spec.vocabulary_corpus())["input_ids"])
    assert longest <= min(s.data.max_text_len for s in cfg.stages), longest


def test_patch4_experiment_config_reads_the_shipped_encoders(tmp_path):
    """configs/train/shapes_p4.yaml (session-6 experiment) loads; its DiT reads the identity stage and the
    random text encoder (3 channels, width 64) with 256 image tokens at 64 px, and its 64 px stage
    samples ``t`` uniformly (the objective's default stays ``lognorm``)."""
    from lumina_jax.models.gemma2 import Gemma2Config
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.shapes import components
    from lumina_jax.train.config import load_config
    from lumina_jax.train.loop import Trainer

    cfg = load_config("configs/train/shapes_p4.yaml", [f"run_dir={tmp_path}", "log.tensorboard=false"])
    dit = NextDiTConfig.from_yaml(cfg.model)
    assert dit.in_channels == 3 and dit.cap_feat_dim == Gemma2Config.from_yaml(components.TEXT_CONFIG).hidden_size
    assert [s.resolution for s in cfg.stages] == [32, 64] and (64 // dit.patch_size) ** 2 == 256
    tr = Trainer(cfg)
    assert [tr.step_config(i).t_sampling for i in (0, 1)] == ["lognorm", "uniform"]
    assert [tr.step_config(i).mu for i in (0, 1)] == [1.1, 1.1]
    tr.metrics.close()


def test_xpred_experiment_config_differs_only_in_the_head():
    """configs/train/shapes_xpred.yaml (session-3 experiment) loads, and its model is the shipped one
    with an x-prediction head."""
    import dataclasses

    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.train.config import load_config

    from pathlib import Path

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs/train/shapes_xpred.yaml"))
    assert cfg.model == "shapes_nextdit_xpred" and len(cfg.stages) == 4
    x, v = NextDiTConfig.from_yaml("shapes_nextdit_xpred"), NextDiTConfig.from_yaml("shapes_nextdit")
    assert x.prediction == "data" and v.prediction == "velocity"
    assert dataclasses.replace(x, prediction="velocity") == v


def test_train_vae_writes_a_calibrated_autoencoder(tiny_world):
    """``shapes train-vae`` (2 steps, in the fixture): a diffusers-layout VAE whose scaling/shift make the
    latents of fresh training scenes zero-mean, unit-variance, with the 8x down-sampling and channels the
    shipped DiT config expects."""
    import jax.numpy as jnp

    from lumina_jax.convert.vae import load_vae
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.models.vae import AutoencoderKL, scale_latents
    from lumina_jax.shapes import vae_train

    work, info = tiny_world
    m = info["vae_metrics"]
    assert m["steps"] == 2 and np.isfinite(m["history"][-1]["loss"])
    vcfg, params = load_vae(work / "encoders" / "vae_f8")
    dit = NextDiTConfig.from_yaml("shapes_nextdit_f8")
    assert vcfg.downsample_factor == 8 and vcfg.latent_channels == dit.in_channels
    saved = json.loads((work / "encoders" / "vae_f8" / "train_metrics.json").read_text())
    assert saved["steps"] == 2 and vcfg.scaling_factor == round(1 / m["latent_std"], 4) != 1.0
    x = jnp.asarray(vae_train.render_batch(np.random.default_rng(5), 16, 64))
    z = scale_latents(AutoencoderKL(vcfg).apply({"params": params}, x, method=AutoencoderKL.encode).mode(), vcfg)
    assert z.shape == (16, 8, 8, 8)
    assert abs(float(z.mean())) < 0.25 and 0.8 < float(z.std()) < 1.25  # rounded factors, other scenes


def test_train_text_encoder_is_a_gemma2_causal_lm(tmp_path):
    """``shapes train-text-encoder`` (2 steps): the saved encoder loads as transformers'
    ``Gemma2ForCausalLM`` (tied embedding) and its logits equal the trainer's ``lm_logits``; the features the
    DiT reads come from the saved weights and the config the latent DiT expects."""
    import torch
    import transformers

    from lumina_jax.convert.gemma2 import load_text_encoder
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.shapes import components, text_train
    from lumina_jax.text import load_tokenizer

    tok_dir = components.train_tokenizer(tmp_path / "tok")
    cfg = text_train.TextTrainConfig(steps=2, batch=4, warmup=1)
    m = text_train.train_text_encoder(tmp_path / "te", tok_dir, cfg, progress=False)
    assert m["steps"] == 2 and np.isfinite(m["train_loss"]) and 0 <= m["held_out_accuracy"] <= 1
    gcfg, params = load_text_encoder(tmp_path / "te")
    assert gcfg.hidden_size == NextDiTConfig.from_yaml("shapes_nextdit_latent").cap_feat_dim
    ids, mask = text_train.caption_batch(np.random.default_rng(0), load_tokenizer(tok_dir), 3, 64, "real")
    ours = np.asarray(text_train.lm_logits(params, ids, mask, gcfg))
    ref = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path / "te", attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    valid = mask.astype(bool)
    err = np.linalg.norm(ours[valid] - theirs[valid]) / np.linalg.norm(theirs[valid])
    assert err < 1e-4, err
