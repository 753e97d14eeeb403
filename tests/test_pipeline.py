"""The JAX Lumina2Pipeline end to end: parity with diffusers' Lumina2Pipeline, the component loader
(diffusers layout, project layout, converted-weights cache, transformer override), argument errors,
and the ``generate`` CLI (PNG metadata, per-step progress, persistent compilation cache across processes).

A tiny diffusers pipeline with random weights everywhere (Next-DiT, Gemma-2, VAE, a sentencepiece
tokenizer trained on the spot) is built once with :func:`lumina_jax.bench.generate.build_reference_pipeline`
and saved with ``save_pretrained``; our pipeline loads that directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import torch
import diffusers  # noqa: F401 -- required (requirements-dev.txt): a missing one fails, not skips
import sentencepiece  # noqa: F401 -- required (requirements-dev.txt): a missing one fails, not skips
from conftest import saved_reference_pipeline

from lumina_jax.convert.components import (  # noqa: E402
    Components,
    detect_layout,
    load_components,
    save_components,
)
from lumina_jax.convert.common import flatten  # noqa: E402
from lumina_jax.convert.errors import CheckpointError  # noqa: E402
from lumina_jax.pipeline import Lumina2Pipeline, check_image_size, resolve_system_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a lighthouse on a cliff in a storm at night, oil painting"]
PARITY_TOL = 1e-4  # fp32 relative L2 of the images; measured ~1e-6


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(diffusers pipeline, in-memory Components, saved pipeline directory)."""
    return saved_reference_pipeline(tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def pipe(reference):
    return Lumina2Pipeline.from_pretrained(reference[2], compilation_cache=False)


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).standard_normal((2, 8, 8, 16)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# parity with diffusers


def test_parity_with_diffusers_lumina2pipeline(reference, pipe, noise):
    ref = reference[0]
    kw = dict(num_inference_steps=6, guidance_scale=4.0, cfg_trunc_ratio=0.5)
    with torch.no_grad():
        lat = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
        expected = ref(PROMPTS, latents=lat, output_type="np", cfg_normalization=True, **kw).images
        expected_latents = ref(PROMPTS, latents=lat, output_type="latent", **kw).images.numpy().transpose(0, 2, 3, 1)
    assert expected.shape == (2, 64, 64, 3) and expected.std() > 0.05  # a non-trivial image
    outs = {}
    for mode in ("fused", "stepwise"):
        out = pipe(PROMPTS, latents=noise, solver="flow_euler", cfg_normalization="rows", cfg_trunc_mode="steps",
                   output_type="np", mode=mode, **kw)  # fmt: skip
        outs[mode] = out.images
        assert out.settings["num_guided_evaluations"] == 3 < out.settings["num_model_evaluations"] == 6
        assert rel_l2(out.images, expected) <= PARITY_TOL, (mode, rel_l2(out.images, expected))
        assert rel_l2(out.latents, expected_latents) <= PARITY_TOL
    assert np.abs(outs["fused"] - outs["stepwise"]).max() < 1e-5
    # FLOPs of the run from the (already compiled) step programs: truncation saves the unguided halves
    from lumina_jax.sample.solvers import make_schedule

    sched = lambda r: make_schedule("flow_euler", 6, cfg_trunc_ratio=r, cfg_trunc_mode="steps")  # noqa: E731
    full, trunc = (pipe.schedule_flops(sched(r), 2, 64, 64, renorm="rows")["total"] for r in (1.0, 0.5))
    assert full > 0  # XLA's cost analysis counts FLOPs on every backend this runs on (CPU included)
    assert 0.7 < trunc / full < 0.8  # (3 x 2 + 3 x 1) / (6 x 2) = 0.75 of the transformer work
    # the preset names the same semantics
    assert pipe.resolve_settings(solver=None, num_inference_steps=None, cfg_trunc_ratio=None, cfg_normalization=None,
                                 cfg_trunc_mode=None, time_shift=None, preset="diffusers")["cfg_renorm"] == "rows"
    # diffusers turns CFG off for guidance_scale <= 1; so does the preset (the original would guide at 0.5)
    with torch.no_grad():
        low = ref(PROMPTS, latents=lat, output_type="latent", num_inference_steps=3, guidance_scale=0.5).images
    out = pipe(PROMPTS, latents=noise, preset="diffusers", num_inference_steps=3, guidance_scale=0.5,
               output_type="latent")  # fmt: skip
    assert out.settings["num_guided_evaluations"] == 0
    assert rel_l2(out.latents, low.numpy().transpose(0, 2, 3, 1)) <= PARITY_TOL


def _original_sampler(ref, noise, shift, solver, n, w, trunc, renorm):
    """The original code's sampling loop, written here in torch over diffusers' transformer (the same
    weights): ``odeint`` euler/midpoint on ``shift(linspace(0, 1, n + 1))`` and ``forward_with_cfg``
    (guidance while the model time ``t < trunc``, CFG-Renorm clamping the guided velocity's L2 norm per
    sample to ``renorm`` times the conditional one's, never scaling up; spec 7.1-7.2). float64 state."""
    with torch.no_grad():
        pe, pm, ne, nm = ref.encode_prompt(PROMPTS, True, negative_prompt=None)
        x = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()).double()
        grid = np.linspace(0.0, 1.0, n + 1)
        grid = grid / (grid + shift - shift * grid)

        def velocity(x, t):
            tt = torch.full((x.shape[0],), float(t), dtype=torch.float32)
            v_c = ref.transformer(x.float(), tt, pe, pm, return_dict=False)[0].double()
            if not t < trunc:
                return v_c
            v_u = ref.transformer(x.float(), tt, ne, nm, return_dict=False)[0].double()
            v = v_u + w * (v_c - v_u)
            if renorm > 0:
                max_norm, norm = v_c.flatten(1).norm(dim=1) * renorm, v.flatten(1).norm(dim=1)
                v = v * torch.where(norm >= max_norm, max_norm / norm, torch.ones_like(norm))[:, None, None, None]
            return v

        for i in range(n):
            t, dt = grid[i], grid[i + 1] - grid[i]
            if solver == "euler":
                x = x + dt * velocity(x, t)
            else:
                x = x + dt * velocity(x + 0.5 * dt * velocity(x, t), t + 0.5 * dt)
    return x.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("solver, n, w, trunc, renorm", [
    ("midpoint", 3, 4.0, 0.5, 1.0),   # truncation inside a step (the midpoint evaluation unguided)
    ("euler", 4, 4.0, 0.3, 0.7),      # a clamp ratio < 1
    ("midpoint", 2, 0.5, 1.0, 1.0),   # a scale below 1 is guided (diffusers would turn CFG off)
])  # fmt: skip
def test_parity_with_the_original_sampler(reference, pipe, noise, solver, n, w, trunc, renorm):
    """The defaults follow the original code (midpoint/euler on the shifted grid, clamp renorm, model-time
    truncation): our latents equal a torch transcription of its loop on the same transformer; and they
    are a different sampler from diffusers' (far from its output, so the parity test above can fail)."""
    expected = _original_sampler(reference[0], noise, pipe.components.time_shift, solver, n, w, trunc, renorm)
    out = pipe(PROMPTS, latents=noise, solver=solver, num_inference_steps=n, guidance_scale=w, cfg_trunc_ratio=trunc,
               cfg_normalization=renorm, output_type="latent")  # fmt: skip
    assert out.settings["cfg_renorm"] == "clamp" and out.settings["num_guided_evaluations"] > 0
    assert rel_l2(out.latents, expected) <= PARITY_TOL, rel_l2(out.latents, expected)  # measured ~1.5e-6
    if solver == "midpoint" and w == 4.0:
        with torch.no_grad():
            diffusers_latents = reference[0](PROMPTS, latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()),
                                             output_type="latent", num_inference_steps=6, cfg_trunc_ratio=trunc).images
        assert rel_l2(out.latents, diffusers_latents.numpy().transpose(0, 2, 3, 1)) > 1e-2


def test_latent_output_without_cfg(pipe):
    out = pipe("a cat", guidance_scale=1.0, solver="euler", num_inference_steps=2, height=32, width=48, seed=1,
               output_type="latent")  # fmt: skip
    assert out.images.shape == (1, 4, 6, 16) and np.all(np.isfinite(out.images))
    assert out.settings["num_guided_evaluations"] == 0 and out.settings["negative_prompt"] is None
    assert out.seeds == [1] and np.array_equal(out.images, out.latents)


def test_negative_prompts_are_checked_and_an_unused_one_is_named_without_cfg(pipe, caplog):
    kw = dict(guidance_scale=1.0, solver="euler", num_inference_steps=1, height=32, width=32, output_type="latent")
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        pipe(["a", "b"], negative_prompt=["x", "y", "z"], **kw)
    with caplog.at_level("WARNING", logger="lumina_jax.pipeline"):
        out = pipe("a cat", negative_prompt="blurry", seed=1, **kw)
    assert "the negative prompt is not used: no step is guided (guidance_scale 1" in caplog.text
    assert out.settings["negative_prompt"] is None
    caplog.clear()
    with caplog.at_level("WARNING", logger="lumina_jax.pipeline"):
        pipe("a cat", seed=1, **kw)  # no negative prompt given: nothing to say
    assert "negative prompt" not in caplog.text


def test_fused_progress_callback_reports_each_runs_step_count(pipe):
    """One callback reused across runs of different lengths reports each run's own total."""
    seen: list[tuple[int, int]] = []
    for steps in (2, 3):
        pipe("a cat", guidance_scale=1.0, solver="euler", num_inference_steps=steps, height=32, width=32, seed=1,
             output_type="latent", mode="fused", callback=lambda i, n: seen.append((i, n)))  # fmt: skip
    jax.effects_barrier()
    assert sorted(seen) == [(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_a_new_callback_reuses_the_compiled_program(pipe):
    """Each call's own callback runs, through one compiled program (a callback per call, e.g. a new
    progress bar, recompiled the run and kept every program)."""
    kw = dict(guidance_scale=1.0, solver="euler", num_inference_steps=2, height=32, width=32, seed=1,
              output_type="latent", mode="fused")  # fmt: skip
    first, second = [], []
    pipe("a cat", callback=lambda i, n: first.append(i), **kw)
    programs = len(pipe._executables)
    out = pipe("a cat", callback=lambda i, n: second.append(i), **kw)
    jax.effects_barrier()
    assert out.timings["compile"] == 0.0 and len(pipe._executables) == programs
    assert sorted(first) == sorted(second) == [0, 1]


def test_prompt_negative_prompt_and_guidance_semantics(pipe):
    """Original semantics by default: a non-empty negative prompt gets the system prompt (diffusers:
    verbatim, also under its preset), an empty positive prompt gets it too (both codes), and a
    guidance scale below 1 is applied (diffusers: CFG off)."""
    te = pipe.text_encoder
    real = resolve_system_prompt("real")
    _, mask = pipe.encode_prompts(["", "a cat"], ["blurry", ""], "real", 64)
    assert mask[0].sum() > 1  # "" with the system prompt, not the bare unconditional prompt
    ids_neg_orig, _ = te.tokenize(["blurry"], real, 64)
    ids_neg_verbatim, _ = te.tokenize(["blurry"], "empty", 64)
    assert int(mask[2].sum()) == int((ids_neg_orig[0] != te.tokenizer.pad_token_id).sum()) > int(
        (ids_neg_verbatim[0] != te.tokenizer.pad_token_id).sum())
    assert int(mask[3].sum()) == 1  # "" stays the unconditional prompt (<bos> only)
    _, mask_d = pipe.encode_prompts(["a cat"], ["blurry"], "real", 64, negative_system_prompt=False)
    assert int(mask_d[1].sum()) == int((ids_neg_verbatim[0] != te.tokenizer.pad_token_id).sum())
    # " " is a text for diffusers (encoded as written: <bos> and a space token), "" for the original
    ids_space = te.tokenizer(" ")["input_ids"]
    _, mask_s = pipe.encode_prompts(["a cat", "a cat"], [" ", ""], "real", 64, negative_system_prompt=False)
    assert int(mask_s[2].sum()) == len(ids_space) > 1 and int(mask_s[3].sum()) == 1
    _, mask_o = pipe.encode_prompts(["a cat"], [" "], "real", 64)
    assert int(mask_o[1].sum()) == 1
    settings = lambda **kw: pipe.resolve_settings(**{**dict(  # noqa: E731
        solver=None, num_inference_steps=None, cfg_trunc_ratio=None, cfg_normalization=None, cfg_trunc_mode=None,
        time_shift=None, preset=None), **kw})  # fmt: skip
    assert settings()["negative_system_prompt"] and not settings(preset="diffusers")["negative_system_prompt"]
    assert settings(preset="diffusers", negative_system_prompt=True)["negative_system_prompt"]
    # diffusers' cfg_normalization=True is its per-row rescale: under its preset True keeps that meaning
    assert settings(preset="diffusers", cfg_normalization=True)["cfg_renorm"] == "rows"
    assert settings(cfg_normalization=True)["cfg_renorm"] == "clamp"
    # guidance below 1 runs CFG (0: the unconditional velocity); exactly 1 skips the unconditional rows
    kw = dict(solver="euler", num_inference_steps=2, height=32, width=32, seed=3, output_type="latent",
              cfg_normalization=False)  # fmt: skip
    zero, one = pipe("a cat", guidance_scale=0.0, **kw), pipe("a cat", guidance_scale=1.0, **kw)
    assert zero.settings["num_guided_evaluations"] == 2 and one.settings["num_guided_evaluations"] == 0
    assert not np.allclose(zero.latents, one.latents)
    with pytest.raises(TypeError):
        pipe("a cat", "blurry")  # every argument after the prompt is a keyword (diffusers' order differs)


def test_negative_prompt_truncation_warning_names_it_and_points_at_the_caller(pipe):
    long = "a very long and detailed description of a cat " * 20
    with pytest.warns(UserWarning, match=r"1 of 1 negative prompt\(s\) exceed max_length=64") as rec:
        pipe("a cat", negative_prompt=long, max_sequence_length=64, num_inference_steps=1, solver="euler",
             height=32, width=32, seed=0, output_type="latent")  # fmt: skip
    assert [w.filename for w in rec if "negative prompt" in str(w.message)] == [__file__]


def test_unrolled_layers_and_bf16_weight_cast(reference):
    """``scan_layers=False`` gives the scanned pipeline's latents; in bf16 the matmul weights are stored in
    bf16 (cast once) while norm scales keep their fp32 values (that the cast leaves the bf16 model's
    outputs bit-identical is ``test_nextdit.py::test_cast_matmul_weights_is_exact_in_bf16``)."""
    comps = reference[1]
    kw = dict(guidance_scale=4.0, solver="euler", num_inference_steps=2, height=32, width=32, seed=3,
              output_type="latent")  # fmt: skip
    scanned = Lumina2Pipeline(comps, dtype="fp32")("a cat", **kw).images
    unrolled = Lumina2Pipeline(comps, dtype="fp32", scan_layers=False)("a cat", **kw).images
    np.testing.assert_allclose(unrolled, scanned, rtol=1e-5, atol=1e-6)

    bf = Lumina2Pipeline(comps, dtype="bf16")
    flat = flatten(bf.dit_params)
    assert all(str(v.dtype) == "bfloat16" for k, v in flat.items() if k.endswith(("kernel", "bias")))
    assert all(str(v.dtype) == "float32" for k, v in flat.items() if k.endswith("scale"))


# ----------------------------------------------------------------------------------------------
# components


def _same_tree(a, b):
    fa, fb = flatten(a), flatten(b)
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_components_layouts_cache_and_transformer_override(reference, tmp_path, caplog, monkeypatch):
    _, mem, d = reference
    assert detect_layout(d) == "diffusers"
    comps = load_components(d)
    assert comps.time_shift == 6.0 and comps.default_image_size == 64
    for name in ("transformer", "text_encoder", "vae"):
        _same_tree(getattr(comps, name), getattr(mem, name))

    # project layout round trip
    lj = save_components(tmp_path / "lj", comps)
    assert detect_layout(lj) == "lumina_jax"
    back = load_components(lj)
    for name in ("transformer", "text_encoder", "vae"):
        _same_tree(getattr(back, name), getattr(comps, name))
    assert back.transformer_config == comps.transformer_config and back.vae_config == comps.vae_config
    assert back.text_encoder_config == comps.text_encoder_config and back.scheduler == comps.scheduler
    ids = lambda c: c.tokenizer(PROMPTS)["input_ids"]  # noqa: E731
    assert ids(back) == ids(comps)

    # converted-weights cache: the second load reads orbax, not the diffusers files
    cache = tmp_path / "cache"
    first = load_components(d, cache=cache)
    assert first.layout == "diffusers" and len(list(cache.iterdir())) == 1
    second = load_components(d, cache=cache)
    assert second.layout == "diffusers (cached)"
    _same_tree(second.transformer, comps.transformer)
    # a changed source file (here: touched) makes a new entry and removes the stale one (a whole model each)
    f = d / "scheduler" / "scheduler_config.json"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    with caplog.at_level("INFO", logger="lumina_jax.convert.components"):
        assert load_components(d, cache=cache).layout == "diffusers"
    assert len(list(cache.iterdir())) == 1 and "removed the stale cache entry" in caplog.text
    assert load_components(d, cache=cache).layout == "diffusers (cached)"
    # a cache that cannot be written (here: its root is a file) costs the cache, not the load
    (tmp_path / "not_a_dir").write_text("x")
    with caplog.at_level("WARNING", logger="lumina_jax.convert.components"):
        third = load_components(d, cache=tmp_path / "not_a_dir")
    assert third.layout == "diffusers" and "could not cache the converted weights" in caplog.text
    _same_tree(third.transformer, comps.transformer)
    # ... nor does orbax's full-disk error (a ValueError)
    import lumina_jax.convert.components as components_lib

    def disk_full(*a, **k):
        raise ValueError("RESOURCE_EXHAUSTED: No space left on device")

    with monkeypatch.context() as m, caplog.at_level("WARNING", logger="lumina_jax.convert.components"):
        m.setattr(components_lib, "save_components", disk_full)
        assert load_components(d, cache=tmp_path / "full").layout == "diffusers"
    assert "No space left on device" in caplog.text
    # files the load never reads (a README, .git/) do not invalidate the entry
    (d / "README.md").write_text("# notes")
    (d / ".git").mkdir()
    (d / ".git" / "index").write_text("x")
    assert load_components(d, cache=cache).layout == "diffusers (cached)"
    # a damaged entry (or one of another version) is dropped with a warning and the source converted again
    entry = next(p for p in cache.iterdir() if p.is_dir())
    marker = entry / "vae" / "lumina_jax.json"
    marker.write_text(marker.read_text().replace('"config": {', '"config": {"new_field": 1, ', 1))
    caplog.clear()
    with caplog.at_level("WARNING", logger="lumina_jax.convert.components"):
        again = load_components(d, cache=cache)
    assert again.layout == "diffusers" and "cannot be read" in caplog.text
    _same_tree(again.transformer, comps.transformer)
    assert load_components(d, cache=cache).layout == "diffusers (cached)"
    # ... but an I/O hiccup while reading a good entry is an error, and the entry stays
    entries = sorted(cache.iterdir())

    def hiccup(*a, **k):
        raise OSError(116, "Stale file handle")

    with monkeypatch.context() as m:
        m.setattr(components_lib, "_load_lumina_jax", hiccup)
        with pytest.raises(OSError, match="Stale file handle"):
            load_components(d, cache=cache)
    assert sorted(cache.iterdir()) == entries
    # a linked component folder (a fine-tune's transformer/) is followed: its change is seen
    import shutil

    linked = tmp_path / "linked"
    linked.mkdir()
    shutil.copytree(d / "transformer", tmp_path / "ft")
    for item in d.iterdir():
        if not item.name.startswith("."):
            (linked / item.name).symlink_to(tmp_path / "ft" if item.name == "transformer" else item)
    assert load_components(linked, cache=cache).layout == "diffusers"
    assert load_components(linked, cache=cache).layout == "diffusers (cached)"
    weights = next(f for f in (tmp_path / "ft").iterdir() if f.suffix == ".safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert load_components(linked, cache=cache).layout == "diffusers"

    # an original-format transformer replaces the directory's one
    from lumina_jax.convert.nextdit import save_transformer

    params2 = {k: v for k, v in comps.transformer.items()}
    params2["x_embedder"] = {"kernel": comps.transformer["x_embedder"]["kernel"] * 2,
                             "bias": comps.transformer["x_embedder"]["bias"]}  # fmt: skip
    orig = save_transformer(tmp_path / "orig.safetensors", comps.transformer_config, params2, "original")
    from lumina_jax.convert import nextdit as nd

    loads = []
    plain = nd.load_transformer
    monkeypatch.setattr(nd, "load_transformer", lambda p, **k: (loads.append(Path(p)), plain(p, **k))[1])
    over = load_components(d, transformer=orig)
    np.testing.assert_array_equal(over.transformer["x_embedder"]["kernel"], params2["x_embedder"]["kernel"])
    # ... without loading the directory's own transformer weights (only its config, the fallback): from the
    # diffusers folder or from the cache entry of it
    assert loads == [orig]
    loads.clear()
    with caplog.at_level("INFO", logger="lumina_jax.convert.components"):
        over_cached = load_components(d, transformer=orig, cache=cache)  # the cache entry gives the encoders
    assert over_cached.layout == "diffusers (cached)" and loads == [orig]
    np.testing.assert_array_equal(over_cached.transformer["x_embedder"]["kernel"], params2["x_embedder"]["kernel"])
    # no cache entry yet: the override's load converts the encoders and says it writes no entry
    loads.clear()
    with caplog.at_level("INFO", logger="lumina_jax.convert.components"):
        load_components(d, transformer=orig, cache=tmp_path / "fresh_cache")
    assert loads == [orig] and not (tmp_path / "fresh_cache").exists()
    assert "no cache entry is written when the transformer is replaced" in caplog.text


def test_missing_component_is_named(reference, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(reference[2], d)
    shutil.rmtree(d / "vae")
    with pytest.raises(CheckpointError, match=r"missing component\(s\) \['vae'\]"):
        load_components(d)
    with pytest.raises(CheckpointError, match="missing component"):
        Lumina2Pipeline.from_pretrained(d, compilation_cache=False)
    with pytest.raises(CheckpointError, match="not a Lumina-Image 2.0 model directory"):
        load_components(tmp_path)
    shutil.rmtree(d / "transformer")
    (d / "transformer").mkdir()
    with pytest.raises(CheckpointError):
        load_components(d)


def test_cross_component_check(reference):
    comps = load_components(reference[2])
    bad = Components(**{**comps.__dict__, "text_encoder_config": comps.text_encoder_config.__class__(
        **{**comps.text_encoder_config.__dict__, "hidden_size": 32})})  # fmt: skip
    with pytest.raises(CheckpointError, match="cap_feat_dim=64 but the text encoder's hidden size is 32"):
        bad.check()


# ----------------------------------------------------------------------------------------------
# argument errors (raised before anything is compiled)


def test_argument_errors(pipe, noise):
    with pytest.raises(ValueError, match=r"height=1000 \(nearest valid: 992 or 1008\): not a positive multiple of 16"):
        pipe("a cat", height=1000, width=64)
    with pytest.raises(ValueError, match=r"^width=8 \(nearest valid: 16\)"):
        pipe("a cat", height=64, width=8)
    with pytest.raises(ValueError, match=r"^height=100 \(nearest valid: 96 or 112\) and width=100 \(nearest valid"):
        pipe("a cat", height=100, width=100)  # both sides named
    with pytest.raises(ValueError, match="prompt list is empty"):
        pipe([])
    with pytest.raises(TypeError, match="must be a string"):
        pipe(["a cat", 3])
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        pipe("a cat", solver="rk4")
    with pytest.raises(ValueError, match="unknown preset"):
        pipe("a cat", preset="ultra")
    with pytest.raises(ValueError, match="output_type"):
        pipe("a cat", output_type="tensor")
    with pytest.raises(ValueError, match=r"channels-last"):
        pipe(PROMPTS, latents=noise.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        pipe(["a", "b", "c"], negative_prompt=["x", "y"])
    with pytest.raises(ValueError, match="max_sequence_length"):
        pipe("a cat", max_sequence_length=100000)
    with pytest.raises(ValueError, match="3 seeds for 2 images"):
        pipe(PROMPTS, seed=[1, 2, 3])
    with pytest.raises(ValueError, match="cfg_trunc_mode"):
        pipe("a cat", cfg_trunc_mode="sometimes")
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer, got -1"):
        pipe("a cat", seed=-1)
    for bad in (float("nan"), -0.5, 1.5):
        with pytest.raises(ValueError, match=r"cfg_trunc_ratio must be in \[0, 1\]"):
            pipe("a cat", cfg_trunc_ratio=bad)
    for kw in ({"seed": 1.5}, {"seed": [0, 2.5]}, {"num_images_per_prompt": 1.7}, {"max_sequence_length": 10.5},
               {"seed": np.array(True)}):  # fmt: skip
        name = next(iter(kw))
        with pytest.raises(ValueError, match=rf"{name} must be an integer, got"):
            pipe(["a cat", "a dog"] if name == "seed" and isinstance(kw[name], list) else "a cat", **kw)
    for bad in ("4", True):  # float("4") would have run
        with pytest.raises(ValueError, match=r"guidance_scale must be a finite number, got"):
            pipe("a cat", guidance_scale=bad)
        for name in ("cfg_trunc_ratio", "time_shift"):
            with pytest.raises(ValueError, match=rf"{name} must be a number, got"):
                pipe("a cat", **{name: bad})
    kw = dict(num_inference_steps=1, height=32, width=32, output_type="latent")
    np.testing.assert_array_equal(pipe("a cat", seed=np.array(3), **kw).images, pipe("a cat", seed=3, **kw).images)
    np.testing.assert_array_equal(pipe("a cat", seed=3, time_shift=np.array(3.0), cfg_trunc_ratio=np.float32(1), **kw).images,
                                  pipe("a cat", seed=3, time_shift=3.0, **kw).images)  # 0-d arrays are numbers
    for bad in (-5, 0, -16):
        with pytest.raises(ValueError, match=rf"^height={bad} \(nearest valid: 16\): not a positive multiple"):
            check_image_size(bad, 64)
    check_image_size(1024, 768)
    with pytest.raises(ValueError, match="RoPE table"):
        check_image_size(16 * 600, 64, max_tokens_side=512)


def test_sizes_far_above_the_model_s_are_warned(pipe, caplog):
    with caplog.at_level("WARNING"):
        pipe("a cat", height=64, width=128, num_inference_steps=1, output_type="np")  # 2x the area: fine
        assert "the area of the model's" not in caplog.text
        pipe("a cat", height=160, width=160, num_inference_steps=1, output_type="np")
    assert "160x160 px is 6x the area of the model's 64 px images" in caplog.text


def test_system_prompt_and_noise_rules(pipe):
    from lumina_jax.text_templates import SYSTEM_PROMPTS

    sentence = "You are an assistant designed to generate superior images with the superior degree of " \
               "image-text alignment based on textual prompts or user prompts."  # diffusers' default
    assert resolve_system_prompt(None) == resolve_system_prompt(sentence) == SYSTEM_PROMPTS["real"]
    assert resolve_system_prompt("base") == SYSTEM_PROMPTS["base"]
    assert resolve_system_prompt("X <Prompt Start> ") == "X <Prompt Start> "
    # seed s + k for image k: an image can be regenerated alone
    a = pipe.make_noise([5, 6], 64, 32)
    assert a.shape == (2, 8, 4, 16)
    np.testing.assert_array_equal(a[1], pipe.make_noise([6], 64, 32)[0])
    assert not np.allclose(a[0], a[1])


def test_model_directory_sets_the_default_system_prompt_and_guidance(reference, tmp_path):
    """A model trained with another prefix, or sampled best at another CFG scale, records it
    (``Components.system_prompt`` / ``guidance_scale``, in ``lumina_jax_pipeline.json``); calls without
    ``system_prompt`` / ``guidance_scale`` then use it, explicit ones still win."""
    import dataclasses

    comps = load_components(reference[2])
    assert comps.system_prompt == "real" and comps.guidance_scale == 4.0  # diffusers dirs: the released model's
    d = save_components(tmp_path / "own", dataclasses.replace(comps, system_prompt="empty", guidance_scale=2.5))
    meta = json.loads((d / "lumina_jax_pipeline.json").read_text())
    assert meta["system_prompt"] == "empty" and meta["guidance_scale"] == 2.5
    back = load_components(d)
    assert back.system_prompt == "empty" and back.guidance_scale == 2.5
    real = json.loads((save_components(tmp_path / "real", comps) / "lumina_jax_pipeline.json").read_text())
    assert "system_prompt" not in real and "guidance_scale" not in real
    p = Lumina2Pipeline(back)

    def run(**kw):
        return np.asarray(p(PROMPTS[:1], num_inference_steps=2, seed=0, output_type="latent", **kw).images)

    default = run()
    np.testing.assert_array_equal(default, run(system_prompt="empty", guidance_scale=2.5))
    assert not np.allclose(default, run(system_prompt="real", guidance_scale=2.5))
    assert not np.allclose(default, run(system_prompt="empty", guidance_scale=4.0))
    # the texts the tokenizer sees: the prompt alone under "empty" (as the model was trained), never a
    # separator added by resolving the prefix twice
    seen = []
    tok = p.components.tokenizer
    plain_call = type(tok).__call__

    def spy(self, texts, *a, **k):
        seen.extend([texts] if isinstance(texts, str) else list(texts))
        return plain_call(self, texts, *a, **k)

    type(tok).__call__ = spy
    try:
        run()
        run(system_prompt="Paint it.")
    finally:
        type(tok).__call__ = plain_call
    assert PROMPTS[0] in seen and "Paint it. <Prompt Start> " + PROMPTS[0] in seen, seen
    assert not [t for t in seen if t.count("<Prompt Start>") > 1 or t.startswith(" <Prompt Start>")], seen


def test_default_model_is_tiny_random_with_a_notice(monkeypatch, caplog, tmp_path):
    import lumina_jax.pipeline as P

    monkeypatch.setattr(P, "DEFAULT_MODEL_DIR", tmp_path / "nothing_here")
    with caplog.at_level(logging.WARNING):
        p = P.Lumina2Pipeline.from_pretrained(compilation_cache=False)
    assert "RANDOMLY INITIALISED" in caplog.text
    assert p.components.transformer_config.dim == 64 and p.default_image_size == 64


def test_words_the_bundled_model_never_saw_are_warned_before_loading(caplog):
    """``generate`` without ``--checkpoint`` names prompt words outside the shapes world's captions (its image
    would not follow them: a blank one is possible); the README's prompt, a capitalised first word and
    punctuation pass; capitalised words are lowercased (with a notice); with a checkpoint nothing is said."""
    from lumina_jax.sample.cli import build_parser, check_before_loading
    from lumina_jax.shapes.spec import EXAMPLE_PROMPT

    def said(*argv):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lumina_jax.generate"):
            check_before_loading(build_parser().parse_args(list(argv)))
        return caplog.text

    assert said(EXAMPLE_PROMPT) == ""
    assert "never seen" not in said("A blue square at the top, on a black background.")  # lowercased (below)
    text = said("a photo of a cat", "--negative", "Blurry")
    assert "never seen ['photo', 'cat']" in text and "never seen ['Blurry']" in text
    assert said("a photo of a cat", "--checkpoint", "somewhere") == ""
    # capitalised words it knows in lowercase are lowercased, with a notice (the image would be noise)
    args = build_parser().parse_args(["A Red Circle on the left", "--negative", "Red Blue"])
    with caplog.at_level(logging.WARNING, logger="lumina_jax.generate"):
        caplog.clear()
        check_before_loading(args)
    assert args.prompt == ["a red circle on the left"] and args.negative == "red blue"
    assert "knows lowercase words only: using the prompt 'a red circle on the left'" in caplog.text
    assert "using the negative prompt 'red blue'" in caplog.text and "never seen" not in caplog.text
    # a capitalised first word too ("A" and "a" are other tokens); an unknown word does not stop the rest
    args = build_parser().parse_args(["A blue square", "A Red Circle, big"])
    with caplog.at_level(logging.WARNING, logger="lumina_jax.generate"):
        caplog.clear()
        check_before_loading(args)
    assert args.prompt == ["a blue square", "a red circle, big"]
    assert "never seen ['big']" in caplog.text


def test_enable_compilation_cache(tmp_path, monkeypatch, caplog):
    import jax

    from lumina_jax.pipeline import enable_compilation_cache

    old = jax.config.jax_compilation_cache_dir
    old_t = jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert enable_compilation_cache(False) is None and jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("LUMINA_JAX_COMPILATION_CACHE", "off")
        assert enable_compilation_cache() is None
        monkeypatch.setenv("LUMINA_JAX_COMPILATION_CACHE", str(tmp_path / "env"))
        assert enable_compilation_cache() == tmp_path / "env"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
        assert enable_compilation_cache(tmp_path / "explicit") == tmp_path / "explicit"
        (tmp_path / "a_file").write_text("")  # a read-only home, a file in the way: a warning, no crash
        with caplog.at_level("WARNING"):
            assert enable_compilation_cache(tmp_path / "a_file" / "xla") is None
        assert "cannot be used" in caplog.text and jax.config.jax_compilation_cache_dir == str(tmp_path / "explicit")
    finally:
        jax.config.update("jax_compilation_cache_dir", old)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old_t)
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()


# ----------------------------------------------------------------------------------------------
# CLI


def _cli(args, env):
    return subprocess.run([sys.executable, "-m", "lumina_jax", "generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_cli_writes_pngs_with_metadata_and_reuses_compiled_programs(reference, tmp_path):
    from PIL import Image

    env = dict(os.environ, JAX_PLATFORMS="cpu", LUMINA_JAX_COMPILATION_CACHE=str(tmp_path / "xla"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))  # fmt: skip
    args = ["a photo of a cat", "--checkpoint", str(reference[2]), "--steps", "3", "--size", "64x48", "--seed", "3",
            "--n", "2", "--renorm", "0.9"]  # fmt: skip
    runs = []
    for k in range(2):  # two processes, each with its own output directory
        runs.append(_cli([*args, "--out", str(tmp_path / f"out{k}" / "img.png")], env))
        assert runs[-1].returncode == 0, runs[-1].stderr[-3000:]
    first, second = runs
    assert "compiling" in first.stderr and "sampling" in first.stderr and "3/3" in first.stderr
    paths = [tmp_path / "out0" / f"img_{i:03d}.png" for i in range(2)]
    assert first.stdout.split() == [w for p in paths for w in ("wrote", str(p))]
    for i, p in enumerate(paths):
        im = Image.open(p)
        assert im.size == (64, 48)
        meta = json.loads(im.text["lumina_jax"])
        assert im.text["prompt"] == "a photo of a cat" and im.text["seed"] == str(3 + i)
        assert meta["solver"] == "midpoint" and meta["num_inference_steps"] == 3 and meta["seed"] == 3 + i
        assert meta["cfg_renorm_ratio"] == 0.9 and meta["guidance_scale"] == 4.0 and meta["cfg_trunc_ratio"] == 1.0
        # same seed in another process -> the same image
        assert np.array_equal(np.asarray(im), np.asarray(Image.open(tmp_path / "out1" / p.name)))
    assert not np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(paths[1])))
    # the second process compiled nothing: every program came from the persistent cache
    tail = second.stderr.strip().splitlines()[-1]
    hits, misses = (int(x) for x in tail.split("XLA cache ")[1].replace(" hits,", "").replace(" misses", "").split())
    assert hits > 0 and misses == 0, tail


def test_cli_out_of_memory_is_one_line_with_what_to_try(reference, tmp_path, capsys, monkeypatch):
    from lumina_jax.sample.cli import main

    def oom(self, *a, **k):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 275845956520 "
                                         "bytes.\nBufferAssignment OOM Debugging.")  # fmt: skip

    monkeypatch.setattr(Lumina2Pipeline, "__call__", oom)
    rc = main(["a cat", "--checkpoint", str(reference[2]), "--compilation-cache", "off", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: out of device memory (RESOURCE_EXHAUSTED: Out of memory" in err and "--size" in err
    assert "Traceback" not in err and "Debugging" not in err

    def other(self, *a, **k):
        raise RuntimeError("something else")

    monkeypatch.setattr(Lumina2Pipeline, "__call__", other)
    with pytest.raises(RuntimeError, match="something else"):
        main(["a cat", "--checkpoint", str(reference[2]), "--compilation-cache", "off", "--out", str(tmp_path / "x.png")])


def test_cli_errors(reference, tmp_path, capsys):
    from lumina_jax.sample.cli import main, output_paths

    rc = main(["a cat", "--checkpoint", str(reference[2]), "--size", "1000x64", "--compilation-cache", "off",
               "--out", str(tmp_path / "x.png")])  # fmt: skip
    assert rc == 2 and "992 or 1008" in capsys.readouterr().err
    rc = main(["a cat", "--checkpoint", str(tmp_path / "missing"), "--compilation-cache", "off"])
    assert rc == 2 and "no such directory" in capsys.readouterr().err
    rc = main(["a cat", "--checkpoint", str(reference[2]), "--cfg-trunc", "2", "--compilation-cache", "off",
               "--out", str(tmp_path / "x.png")])  # fmt: skip
    assert rc == 2 and "error: --cfg-trunc must be in [0, 1]" in capsys.readouterr().err  # the flag, not the argument
    with pytest.raises(SystemExit):
        main(["a cat", "--solver", "heun"])
    # what needs no weights fails before they load (a typo must not cost a 2B model's load)
    for flags, want in ((["--size", "100x64"], "nearest valid: 96 or 112"), (["--cfg", "nan"], "--cfg must be a finite"),
                        (["--size", "64x16000"], "height=16000 exceeds the model's RoPE table"),
                        (["--seed", "-1"], "leave out --seed"), (["--system-prompt", "reall"], "did you mean 'real'"),
                        (["--steps", "0"], "--steps must be a positive integer"), (["--shift", "0"], "--shift must be"),
                        (["--max-length", "0"], "--max-length must be >= 1"), (["--renorm", "-1"], "--renorm ratio")):  # fmt: skip
        rc = main(["a cat", "--checkpoint", str(reference[2]), "--out", str(tmp_path / "x.png"), *flags])
        err = capsys.readouterr().err
        assert rc == 2 and want in err and "loading model" not in err, (flags, err)
    # an unwritable --out is refused before the model loads; an existing image is replaced, with a notice
    (tmp_path / "file").write_text("")
    rc = main(["a cat", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "file" / "x.png")])
    assert rc == 2 and "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "old.png").write_bytes(b"")
    rc = main(["a cat", "--checkpoint", str(reference[2]), "--size", "64x64", "--steps", "2", "--compilation-cache",
               "off", "--no-progress", "--out", str(tmp_path / "old.png")])  # fmt: skip
    assert rc == 0 and f"replacing {tmp_path / 'old.png'}" in capsys.readouterr().err
    assert (tmp_path / "old.png").stat().st_size > 0
    assert output_paths(str(tmp_path) + "/", [7, 8]) == [tmp_path / "lumina_7.png", tmp_path / "lumina_8.png"]
    assert output_paths("a.png", [1]) == [Path("a.png")]
    # a prompt over the token limit is an error naming the flags (the PNG would record text the model never saw)
    rc = main(["a cat " * 40, "--checkpoint", str(reference[2]), "--size", "64x64", "--steps", "1", "--max-length",
               "32", "--compilation-cache", "off", "--no-progress", "--out", str(tmp_path / "long.png")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "exceed --max-length 32 tokens" in err and "--long-prompt warn" in err, err
    assert not (tmp_path / "long.png").exists()
    with pytest.warns(UserWarning, match="they were truncated"):
        rc = main(["a cat " * 40, "--checkpoint", str(reference[2]), "--size", "64x64", "--steps", "1",
                   "--max-length", "32", "--long-prompt", "warn", "--compilation-cache", "off", "--no-progress",
                   "--out", str(tmp_path / "long.png")])  # fmt: skip
    assert rc == 0 and (tmp_path / "long.png").exists()


def test_saved_images_record_their_own_negative_prompt_mode_and_version(pipe, tmp_path):
    from PIL import Image

    import lumina_jax
    from lumina_jax.sample.cli import save_images

    out = pipe(["a cat", "a dog"], negative_prompt=["blurry", "dark"], num_inference_steps=2, height=32, width=32,
               seed=1, num_images_per_prompt=2, mode="fused")  # fmt: skip
    assert out.negative_prompts == ["blurry", "blurry", "dark", "dark"]
    paths = [tmp_path / f"{i}.png" for i in range(3)] + [tmp_path / "3.jpg"]
    save_images(out, paths)
    for i, p in enumerate(paths[:3]):
        im = Image.open(p)
        meta = json.loads(im.text["lumina_jax"])
        assert im.text["negative_prompt"] == meta["negative_prompt"] == out.negative_prompts[i]
        assert im.text["prompt"] == meta["prompt"] == out.prompts[i] and meta["seed"] == 1 + i
        assert meta["mode"] == "fused" and meta["lumina_jax_version"] == lumina_jax.__version__
    jpg = Image.open(paths[3])
    assert jpg.format == "JPEG" and jpg.size == (32, 32)
    # the batch's truncated-text indices become each image's own flags (2 images per prompt here)
    cut = dataclasses.replace(out, settings=dict(out.settings, truncated_prompts={"prompt": [1], "negative_prompt": [0]}))
    save_images(cut, [tmp_path / f"cut{i}.png" for i in range(4)])
    flags = [json.loads(Image.open(tmp_path / f"cut{i}.png").text["lumina_jax"])["truncated_prompts"] for i in range(4)]
    assert flags == [{"prompt": False, "negative_prompt": True}] * 2 + [{"prompt": True, "negative_prompt": False}] * 2
    meta = json.loads(jpg.getexif()[0x010E])
    assert meta["prompt"] == "a dog" and meta["negative_prompt"] == "dark" and meta["seed"] == 4
    # a prompt too long for JPEG's 64 KiB EXIF segment keeps its start there (PNG keeps it whole)
    from lumina_jax.sample.cli import save_image

    long = "a cat " * 20000
    save_image(out.images[0], tmp_path / "long.jpg", long, None, 1, out.settings)
    meta = json.loads(Image.open(tmp_path / "long.jpg").getexif()[0x010E])
    assert meta["prompt_truncated"] and long.startswith(meta["prompt"]) and len(meta["prompt"]) == 2000
    save_image(out.images[0], tmp_path / "long.png", long, None, 1, out.settings)
    assert Image.open(tmp_path / "long.png").text["prompt"] == long
    # ... and so does a long custom system prompt (it is in the settings)
    save_image(out.images[0], tmp_path / "sys.jpg", "a cat", None, 1, dict(out.settings, system_prompt=long))
    meta = json.loads(Image.open(tmp_path / "sys.jpg").getexif()[0x010E])
    assert meta["prompt"] == "a cat" and long.startswith(meta["system_prompt"]) and meta["prompt_truncated"]
    # one path per image, PIL images only
    with pytest.raises(ValueError, match="1 paths for 4 images"):
        save_images(out, [tmp_path / "one.png"])
    with pytest.raises(ValueError, match="output_type='pil'"):
        save_images(dataclasses.replace(out, images=np.zeros((4, 32, 32, 3))), paths)
    # no CFG: no negative prompt was used, none is recorded
    out = pipe("a cat", guidance_scale=1.0, num_inference_steps=2, height=32, width=32, seed=1)
    assert out.negative_prompts == [None]
    save_images(out, [tmp_path / "u.png"])
    im = Image.open(tmp_path / "u.png")
    assert im.text["negative_prompt"] == "" and json.loads(im.text["lumina_jax"])["negative_prompt"] is None


def test_cli_output_names_quiet_and_template_names(reference, tmp_path, capsys):
    from PIL import Image

    from lumina_jax.sample.cli import main, output_paths

    assert output_paths("a.jpg", [1]) == [Path("a.jpg")] and output_paths("a.WEBP", [1]) == [Path("a.WEBP")]
    assert output_paths("run.v2", [1]) == [Path("run.v2.png")] and output_paths("pic", [1]) == [Path("pic.png")]
    assert output_paths("a.jpg", [1, 2]) == [Path("a_000.jpg"), Path("a_001.jpg")]
    # a folder: lumina_<seed>.png, never replacing what is there (runs with one seed and other prompts)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "lumina_3.png").write_bytes(b"earlier run")
    assert output_paths(f"{tmp_path}/imgs/", [3, 3, 4]) == [tmp_path / "imgs" / n for n in (
        "lumina_3_1.png", "lumina_3_2.png", "lumina_4.png")]  # fmt: skip
    with pytest.raises(ValueError, match=r"cannot write \.gif images"):
        output_paths("a.gif", [1])
    common = ["--checkpoint", str(reference[2]), "--compilation-cache", "off", "--size", "32x32", "--steps", "2"]
    # a refused suffix is reported before the model loads
    assert main(["a cat", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "a.bmp")]) == 2
    assert "cannot write .bmp images" in capsys.readouterr().err
    # a misspelt template name is an error, not the system prompt's text
    assert main(["a cat", *common, "--system-prompt", "realistic", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown system prompt template 'realistic' (did you mean 'real'?)" in capsys.readouterr().err
    # --quiet: only the written paths
    assert main(["a cat", *common, "--quiet", "--out", str(tmp_path / "q.jpg")]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out == f"wrote {tmp_path / 'q.jpg'}\n"
    assert Image.open(tmp_path / "q.jpg").format == "JPEG"


def test_review_fixes_sizes_renorm_at_scale_one_vae_tile_text_compile_time_long_prompts(pipe, noise):
    from lumina_jax.sample.cli import build_parser
    from lumina_jax.text import PromptTooLongError

    # the suggested size is one the model accepts (RoPE table: 2 x the tiny model's grid limit)
    side = min(pipe.components.transformer_config.axes_lens[1:]) * pipe.size_multiple
    with pytest.raises(ValueError, match=rf"height={side + 6} \(nearest valid: {side}\): not a positive multiple"):
        pipe("a cat", height=side + 6, width=64)
    # an explicit --renorm clamp is kept under --preset diffusers (whose rows it would otherwise take)
    args = build_parser().parse_args(["a cat", "--renorm", "clamp", "--preset", "diffusers"])
    s = pipe.resolve_settings(solver=None, num_inference_steps=None, cfg_trunc_ratio=None, cfg_trunc_mode=None,
                              cfg_normalization=args.renorm, time_shift=None, preset=args.preset)  # fmt: skip
    assert s["cfg_renorm"] == "clamp"
    # guidance 1 with a clamp ratio < 1: the original scales v_c by the ratio, so the steps stay guided
    kw = dict(latents=noise[:1], num_inference_steps=3, solver="euler", output_type="latent")
    halved = pipe("a cat", guidance_scale=1.0, cfg_normalization=0.5, **kw)
    plain = pipe("a cat", guidance_scale=1.0, cfg_normalization=True, **kw)
    assert halved.settings["num_guided_evaluations"] == 3 and plain.settings["num_guided_evaluations"] == 0
    assert np.abs(halved.images - plain.images).max() > 1e-3
    # vae_tile as a list (hashable once normalised) and recorded with the settings
    out = pipe("a cat", latents=noise[:1], num_inference_steps=2, output_type="np", vae_tile=[4, 2])
    assert out.settings["vae_tile"] == [4, 2]
    with pytest.raises(ValueError, match=r"overlap must be in \[0, tile\)"):
        pipe("a cat", latents=noise[:1], num_inference_steps=2, vae_tile=(4, 4))
    # a prompt shape the text encoder has not compiled: its compile time counts as compile, in its own phase
    phases: list[str] = []
    before = pipe.text_encoder.compile_seconds
    out = pipe(["a"] * 7, num_inference_steps=1, output_type="latent", on_phase=phases.append, seed=0)
    spent = pipe.text_encoder.compile_seconds - before
    assert spent > 0 and out.timings["compile"] >= spent
    assert phases[:3] == ["encode", "compile", "encode"]
    # over-long prompts: cut with a warning and recorded, or an error naming the limit
    kw = dict(latents=noise[:1], num_inference_steps=1, output_type="latent", max_sequence_length=16)
    with pytest.warns(UserWarning, match="truncated"):
        out = pipe("a cat " * 20, negative_prompt="blurry " * 20, **kw)
    assert out.settings["truncated_prompts"] == {"prompt": [0], "negative_prompt": [0]}
    short = pipe("a cat", **dict(kw, max_sequence_length=256))
    assert short.settings["truncated_prompts"] == {"prompt": [], "negative_prompt": []}
    with pytest.raises(PromptTooLongError, match=r"exceed max_length=16 tokens.*raise max_sequence_length \(up to"):
        pipe("a cat " * 20, on_long_prompt="error", **kw)
    with pytest.raises(ValueError, match="on_long_prompt must be"):
        pipe("a cat", on_long_prompt="cut", **kw)


def test_bf16_keeps_a_bf16_checkpoint_narrow_and_casts_the_encoder_weights(reference, tmp_path):
    """Computing in bf16, ``weights_dtype="auto"`` reads a bf16 checkpoint as bf16 (no fp32 host copy),
    and Gemma-2's matmul weights and table are bf16 on the device (half its memory), norm scales as
    loaded; the images are bit-identical to reading it widened to fp32. In fp32 everything is fp32."""
    from lumina_jax.pipeline import load_dtype

    bf = save_components(tmp_path / "bf16", load_components(reference[2]), dtype="bf16")
    kw = dict(height=64, width=64, num_inference_steps=2, guidance_scale=4.0, seed=3, output_type="np")
    narrow = Lumina2Pipeline.from_pretrained(bf, dtype="bf16", compilation_cache=False)
    wide = Lumina2Pipeline.from_pretrained(bf, dtype="bf16", weights_dtype="fp32", compilation_cache=False)
    dtypes = lambda tree: {str(x.dtype) for x in jax.tree.leaves(tree)}  # noqa: E731
    assert dtypes(narrow.components.transformer) == dtypes(narrow.components.text_encoder) == {"bfloat16"}
    assert dtypes(wide.components.transformer) == {"float32"}
    te = wide.text_encoder.params
    assert dtypes(te["embed_tokens"]) == dtypes(te["layers"]["mlp"]["gate_proj"]) == {"bfloat16"}
    assert dtypes(te["norm"]) == {"float32"}
    np.testing.assert_array_equal(narrow("a red circle", **kw).images, wide("a red circle", **kw).images)
    fp32 = Lumina2Pipeline.from_pretrained(bf, dtype="fp32", compilation_cache=False)
    assert dtypes(fp32.components.transformer) == dtypes(fp32.text_encoder.params) == {"float32"}
    assert load_dtype("keep", "fp32") is None and load_dtype("bf16", "fp32") == "bf16"
    with pytest.raises(ValueError, match="weights_dtype must be 'auto', 'keep', 'fp32' or 'bf16', got 'fp8'"):
        load_dtype("fp8", "bf16")
