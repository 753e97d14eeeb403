"""Qwen2-VL / Qwen2.5-VL captioner vs transformers on tiny random models (CPU, fp32 and bf16).

Tolerances (relative L2 over a row's valid positions, fp32 matmuls at "highest" precision):
- processor: pixel values and token ids bit-exact; M-RoPE ids exact;
- vision features (merger output): <= 1e-5; prompt logits: <= 1e-4 (measured ~1e-6);
- greedy decode: identical token ids for 20 new tokens, batched, different prompt lengths, with and
  without a stop token, plus an inactive padding row;
- bf16 compute (params cast to bf16): logits <= 5e-2 vs the fp32 reference (measured 2.1e-2 - 2.5e-2;
  transformers' own bf16 model is at 2.3e-2 - 2.8e-2 on the same inputs), and top-1 agreement >= 85%.
Negative controls show that the tolerances discriminate: plain 1D positions instead of M-RoPE, and
full attention instead of window attention, each move the outputs far past them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_l2

import torch
import transformers  # noqa: F401 -- required (requirements-dev.txt): a missing one fails, not skips

from lumina_jax.convert.captioner import torch_state_dict_to_params  # noqa: E402
from lumina_jax.models.captioner import testing as T  # noqa: E402
from lumina_jax.models.captioner.decode import GenerationConfig, generate, sample_logits, top_p_mask  # noqa: E402
from lumina_jax.models.captioner.model import (  # noqa: E402
    cast_params, forward_logits, image_features, param_logical_axes)
from lumina_jax.models.captioner.processor import (  # noqa: E402
    ImageProcessorConfig, Tokenizer, UnsupportedImageError, build_batch, chat_prompt, load_image, make_example,
    preprocess_image, smart_resize)
from lumina_jax.models.captioner.vision import merged_slot_index  # noqa: E402

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
SIZES = [(37, 61), (50, 30), (20, 20)]  # different grids -> different prompt lengths; partial windows
INSTRUCTIONS = ["Describe this image.", "Give a short caption with many words please.", "Tags."]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    hf_tok = T.save_tokenizer(d)
    return d, hf_tok


class Case:
    """One family: the transformers model, converted params, our inputs and the reference inputs."""

    def __init__(self, family, tok_dir):
        d, hf_tok = tok_dir
        self.hf_tok = hf_tok
        self.config = T.tiny_model_config(family, hf_tok)
        self.model = T.hf_model(self.config, seed=1)
        self.params = torch_state_dict_to_params(self.model.state_dict(), self.config)
        self.proc = ImageProcessorConfig.for_model(self.config, min_pixels=16 * 16, max_pixels=64 * 64)
        rng = np.random.default_rng(0)
        self.images = [T.random_image(rng, h, w) for h, w in SIZES]
        self.tok = Tokenizer.from_pretrained(d)
        self.examples = [make_example(im, s, self.tok, self.config, self.proc)
                         for im, s in zip(self.images, INSTRUCTIONS)]
        self.hin = T.hf_inputs(hf_tok, [chat_prompt(s) for s in INSTRUCTIONS], self.images, self.proc)
        # P = longest prompt exactly, so our left padding equals the reference's
        self.batch = build_batch(self.examples, self.config, prompt_buckets=1)
        with torch.no_grad():
            self.ref_logits = self.model(**self.hin).logits.numpy()

    def rows(self, ours):
        """(ours, reference) logits of each row over its valid positions."""
        mask = self.hin["attention_mask"].numpy().astype(bool)
        return [(np.asarray(ours[b])[mask[b]], self.ref_logits[b][mask[b]]) for b in range(len(SIZES))]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tok_dir):
    return Case(request.param, tok_dir)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(x) for x in rng.integers(8, 3000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        kw = dict(factor=28, min_pixels=56 * 56, max_pixels=int(rng.integers(56 * 56, 28 * 28 * 2000)))
        assert smart_resize(h, w, **kw) == hf_smart_resize(h, w, **kw), (h, w, kw)


def test_smart_resize_refuses_extreme_aspect_ratios_with_a_named_error():
    with pytest.raises(UnsupportedImageError, match="aspect ratio"):
        smart_resize(2, 500)
    assert isinstance(UnsupportedImageError("x"), ValueError)
    assert smart_resize(3, 600)  # exactly 200 is allowed, as in transformers


def _transparent_images(tmp_path):
    """Images with transparency in every form PIL gives, in memory and as files (loaded by ``load_image``)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (60, 80, 4), dtype=np.uint8)
    a[:20, :, 3] = 0  # fully transparent band
    a[20:40, :, 3] = 255  # opaque band; the rest semi-transparent
    rgba = Image.fromarray(a, "RGBA")
    pal = Image.fromarray(a[..., :3]).convert("P")
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])
    rgb_t = Image.fromarray(a[..., :3])
    rgb_t.info["transparency"] = tuple(int(x) for x in a[0, 0, :3])
    images = {"RGBA": rgba, "LA": rgba.convert("LA"), "PA": rgba.convert("PA"), "RGBa": rgba.convert("RGBa"),
              "P+transparency": pal, "RGB+transparency": rgb_t, "array RGBA": a}
    rgba.save(tmp_path / "rgba.png")
    pal.save(tmp_path / "pal.png", transparency=pal.info["transparency"])
    pal.save(tmp_path / "pal.gif", transparency=pal.info["transparency"])
    for name in ("rgba.png", "pal.png", "pal.gif"):
        images[f"file {name}"] = tmp_path / name
    return images


def test_transparency_is_composited_on_white_like_transformers(tmp_path):
    """transformers' ``convert_to_rgb`` composites alpha / palette transparency over white before resizing;
    a plain ``convert("RGB")`` keeps the hidden colours instead."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = ImageProcessorConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    hf = Qwen2VLImageProcessorPil(min_pixels=proc.min_pixels, max_pixels=proc.max_pixels)
    for name, image in _transparent_images(tmp_path).items():
        if name.startswith("file"):
            ours, grid = preprocess_image(load_image(image), proc)
            with Image.open(image) as im:
                ref = hf(images=[im], return_tensors="np")
        else:
            ours, grid = preprocess_image(image, proc)
            ref = hf(images=[image], return_tensors="np")
        assert grid == tuple(ref["image_grid_thw"][0][1:]), name
        np.testing.assert_array_equal(ours, ref["pixel_values"], err_msg=name)
    # fully transparent pixels are white after compositing
    rgb = np.asarray(load_image(tmp_path / "rgba.png"))
    assert (rgb[:20] == 255).all() and rgb.dtype == np.uint8


def test_processor_matches_transformers(case):
    hin = case.hin
    ours = np.concatenate([e.patches for e in case.examples])
    np.testing.assert_array_equal(ours, hin["pixel_values"].numpy())  # bit-exact pixels
    assert [tuple(e.grid) for e in case.examples] == [tuple(g[1:]) for g in hin["image_grid_thw"].tolist()]
    mask = hin["attention_mask"].numpy().astype(bool)
    for b, e in enumerate(case.examples):
        assert e.ids == hin["input_ids"][b].numpy()[mask[b]].tolist()
    # left padding identical to the tokenizer's
    np.testing.assert_array_equal(case.batch.input_ids[mask], hin["input_ids"].numpy()[mask])


def test_rope_index_matches_transformers(case):
    hin = case.hin
    pos, deltas = case.model.model.get_rope_index(hin["input_ids"], hin["mm_token_type_ids"],
                                                  image_grid_thw=hin["image_grid_thw"],
                                                  attention_mask=hin["attention_mask"])
    np.testing.assert_array_equal(case.batch.positions, pos.numpy())
    lengths = hin["attention_mask"].numpy().sum(1)
    np.testing.assert_array_equal(case.batch.next_position - lengths, deltas.numpy()[:, 0])


def test_vision_features_match(case):
    with torch.no_grad():
        ref = case.model.model.get_image_features(case.hin["pixel_values"], case.hin["image_grid_thw"]).pooler_output
    feats = image_features(case.params, case.batch.vision, case.config)
    for b, e in enumerate(case.examples):
        ours = np.asarray(feats[b])[merged_slot_index(e.grid, case.config.vision)]
        assert rel_l2(ours, ref[b].numpy()) <= 1e-5


def test_logits_match_fp32(case):
    ours = forward_logits(case.params, case.batch, case.config)
    for o, r in case.rows(ours):
        assert rel_l2(o, r) <= 1e-4


def test_logits_bf16_within_tolerance(case):
    ours = forward_logits(cast_params(case.params, jnp.bfloat16), case.batch, case.config, dtype=jnp.bfloat16)
    for o, r in case.rows(ours):
        assert np.isfinite(o).all()
        assert rel_l2(o, r) <= 5e-2
        assert (o.argmax(-1) == r.argmax(-1)).mean() >= 0.85


def test_mrope_positions_matter(case):
    """Negative control: 1D text positions for the image tokens must break parity by far."""
    b = case.batch
    P = b.input_ids.shape[1]
    flat = np.clip(np.arange(P)[None, :] - b.kv_start[:, None], 0, None).astype(np.int32)
    wrong = b._replace(positions=np.broadcast_to(flat[None], (3, *flat.shape)).copy())
    ours = forward_logits(case.params, wrong, case.config)
    assert max(rel_l2(o, r) for o, r in case.rows(ours)) > 1e-2


@pytest.mark.parametrize("with_stop", [False, True])
def test_greedy_decode_matches_transformers(case, with_stop):
    n_new = 20
    hin = case.hin
    gen_kw = dict(max_new_tokens=n_new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = case.model.generate(**hin, eos_token_id=None, **gen_kw)[:, hin["input_ids"].shape[1]:].numpy()
    stop = ()
    if with_stop:  # a token row 0 emits mid-way: that row must stop there, the others go on
        stop = (int(ref[0, 5]),)
        with torch.no_grad():
            ref = case.model.generate(**hin, eos_token_id=list(stop), **gen_kw)[:, hin["input_ids"].shape[1]:]
        ref = ref.numpy()
    # one extra inactive row and a bucketed (longer) prompt: padding must not change anything
    batch = build_batch(case.examples, case.config, prompt_buckets=32, batch_size=4)
    out = generate(case.params, batch, case.config, GenerationConfig(max_new_tokens=n_new, stop_token_ids=stop),
                   active=np.array([True, True, True, False]))
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens[:3, :ref.shape[1]], ref)
    assert (tokens[:3, ref.shape[1]:] == 0).all() and (tokens[3] == 0).all()
    lengths = np.asarray(out.lengths)
    if with_stop:
        first = [int(np.argmax(r == stop[0])) + 1 if (r == stop[0]).any() else n_new for r in ref]
        np.testing.assert_array_equal(lengths[:3], first)
        assert bool(out.finished[0]) and lengths[0] == 6
    else:
        np.testing.assert_array_equal(lengths, [n_new, n_new, n_new, 0])
        assert not np.asarray(out.finished).any()


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_decodes_as_transformers_does_row_by_row(case, penalty):
    """transformers' ``repetition_penalty`` applies to greedy decoding (the released chat models set it in
    generation_config.json): each row of our padded batch decodes as transformers decodes it alone (HF's
    batched run would penalise the left-padding token too)."""
    n_new = 16
    batch = build_batch(case.examples, case.config, prompt_buckets=32, batch_size=4)
    out = generate(case.params, batch, case.config, GenerationConfig(max_new_tokens=n_new, repetition_penalty=penalty),
                   active=np.array([True, True, True, False]))
    plain = generate(case.params, batch, case.config, GenerationConfig(max_new_tokens=n_new))
    assert (np.asarray(out.tokens)[:3] != np.asarray(plain.tokens)[:3]).any()  # the penalty matters here
    for i, (image, text) in enumerate(zip(case.images, INSTRUCTIONS)):
        hin = T.hf_inputs(case.hf_tok, [chat_prompt(text)], [image], case.proc)
        with torch.no_grad():
            ref = case.model.generate(**hin, max_new_tokens=n_new, do_sample=False, pad_token_id=0,
                                      eos_token_id=None, repetition_penalty=penalty)
        np.testing.assert_array_equal(np.asarray(out.tokens[i]), ref[0, hin["input_ids"].shape[1]:].numpy())
    with pytest.raises(ValueError, match="repetition_penalty must be a positive number"):
        GenerationConfig(repetition_penalty=0.0)


@pytest.mark.parametrize("case", ["qwen2_5_vl"], indirect=True)  # Qwen2-VL has no window attention
def test_window_attention_matters(case):
    """Negative control (Qwen2.5-VL): full attention in every block must change the image features."""
    assert case.config.vision.window_size
    v = case.config.vision
    all_full = dataclasses.replace(case.config, vision=dataclasses.replace(v, fullatt_block_indexes=tuple(range(v.depth))))
    enc = lambda cfg: np.asarray(image_features(case.params, case.batch.vision, cfg))  # noqa: E731
    assert rel_l2(enc(all_full), enc(case.config)) > 1e-2


def test_sampling():
    rng = jax.random.PRNGKey(0)
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    greedy = sample_logits(logits, rng, GenerationConfig())
    assert (np.asarray(greedy) == 0).all()
    # top_p small / top_k 1 -> always the argmax, even at high temperature
    assert (np.asarray(sample_logits(logits, rng, GenerationConfig(temperature=5.0, top_p=0.1))) == 0).all()
    assert (np.asarray(sample_logits(logits, rng, GenerationConfig(temperature=5.0, top_k=1))) == 0).all()
    # plain sampling follows the distribution; top_p=0.8 keeps {0, 1} renormalised to (5/8, 3/8)
    freq = np.bincount(np.asarray(sample_logits(logits, rng, GenerationConfig(temperature=1.0))), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    freq = np.bincount(np.asarray(sample_logits(logits, rng, GenerationConfig(temperature=1.0, top_p=0.8))),
                       minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
    with pytest.raises(ValueError):
        GenerationConfig(top_p=0.0)


def test_top_p_keeps_exactly_what_transformers_keeps(monkeypatch):
    """Same kept set as ``TopPLogitsWarper``: the minimal prefix by sorted order, so a tie at the cut-off keeps
    only as many tied tokens as needed (not all of them)."""
    import functools

    from transformers.generation.logits_process import TopPLogitsWarper

    def hf(x, top_p):
        return torch.isfinite(TopPLogitsWarper(top_p)(None, torch.tensor(x.reshape(-1, x.shape[-1])))).numpy()

    masks = jax.jit(top_p_mask, static_argnums=1)

    def ours(x, top_p):
        return np.asarray(masks(jnp.asarray(x), top_p)).reshape(-1, x.shape[-1])

    # the reviewer's case: two tied top tokens, top_p=0.3 needs one; HF keeps id 1 (its sort is stable here)
    x = np.array([[2.0, 2.0, 0.0, 0.0]], np.float32)
    assert hf(x, 0.3).tolist() == [[False, True, False, False]]
    np.testing.assert_array_equal(ours(x, 0.3), hf(x, 0.3))
    draws = sample_logits(jnp.asarray(np.repeat(x, 2000, 0)), jax.random.PRNGKey(0),
                          GenerationConfig(temperature=1.0, top_p=0.3))
    assert (np.asarray(draws) == 1).all()
    rng = np.random.default_rng(0)
    for top_p in (0.05, 0.3, 0.5, 0.9, 0.99):
        # no ties, a vocabulary past torch's small-array sort: identical, leading batch dims too
        x = rng.normal(0, 3, (2, 8, 1000)).astype(np.float32)
        np.testing.assert_array_equal(ours(x, top_p), hf(x, top_p), err_msg=str(top_p))
        # many ties (integer logits), <= 16 tokens: torch's sort is stable there, identical again
        x = rng.integers(-3, 3, (64, 16)).astype(np.float32)
        np.testing.assert_array_equal(ours(x, top_p), hf(x, top_p), err_msg=str(top_p))
        # ties in a larger vocabulary: torch's default sort orders ties arbitrarily, so HF keeps the same
        # number of tokens, and the very same ones when its sort is made stable
        x = rng.integers(-3, 3, (64, 40)).astype(np.float32)
        np.testing.assert_array_equal(ours(x, top_p).sum(-1), hf(x, top_p).sum(-1), err_msg=str(top_p))
        with monkeypatch.context() as m:
            m.setattr(torch, "sort", functools.partial(torch.sort, stable=True))
            np.testing.assert_array_equal(ours(x, top_p), hf(x, top_p), err_msg=str(top_p))


def test_logical_axes_cover_every_param(tok_dir):
    _, hf_tok = tok_dir
    cfg = T.tiny_model_config("qwen2_5_vl", hf_tok)
    specs = jax.tree.leaves(param_logical_axes(cfg), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert specs and all(isinstance(s, jax.sharding.PartitionSpec) for s in specs)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): s for path, s in
            jax.tree_util.tree_flatten_with_path(param_logical_axes(cfg),
                                                 is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}
    assert flat["language_model/layers/self_attn/q_proj/kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "heads", "head_dim")
    assert flat["language_model/embed_tokens/embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    assert flat["visual/blocks/mlp/gate_proj/kernel"] == jax.sharding.PartitionSpec("layers", "embed", "mlp")
