"""Prompt -> tokens -> features: tokenizer loading, system prompts, truncation, buckets, parity with the
diffusers-style transformers path (``tokenizer(padding="max_length", truncation=True)`` then
``Gemma2Model(...).hidden_states[-2]``).

No Gemma tokenizer can be downloaded here, so a tiny sentencepiece BPE model is trained in the test and
goes through the same ``load_tokenizer`` path as a real one (bare ``tokenizer.model`` and a
``save_pretrained`` folder).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers
import sentencepiece as spm

from lumina_jax.models.gemma2 import Gemma2Config  # noqa: E402
from lumina_jax.models.gemma2_bench import reference_pair  # noqa: E402
from lumina_jax.text import (  # noqa: E402
    PromptTooLongError,
    TextEncoder,
    bucket_for,
    bucket_lengths,
    load_tokenizer,
)
from lumina_jax.text_templates import SYSTEM_PROMPTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = Gemma2Config.from_yaml(ROOT / "configs/model/gemma2_tiny.yaml")
SHORT = "a photo of a cat"
LONG = "a very long and detailed prompt about a quick brown fox and a lazy dog " * 3


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    """A directory with only a freshly trained sentencepiece ``tokenizer.model`` (Gemma's special ids)."""
    d = tmp_path_factory.mktemp("sp")
    corpus = [SHORT, SYSTEM_PROMPTS["real"] + SHORT, "the quick brown fox jumps over the lazy dog",
              SYSTEM_PROMPTS["base"] + "a red car", "an oil painting of a mountain lake at dawn"] * 40
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(d / "tokenizer"), model_type="bpe", vocab_size=450,
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", minloglevel=2,
    )
    (d / "tokenizer.vocab").unlink()
    return d


@pytest.fixture(scope="module")
def saved_dir(sp_dir, tmp_path_factory) -> Path:
    """The same tokenizer saved by transformers, as in the Lumina repo's ``tokenizer/`` folder."""
    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    transformers.GemmaTokenizer.from_pretrained(sp_dir, add_bos_token=True).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tok(saved_dir):
    return load_tokenizer(saved_dir)


@pytest.fixture(scope="module")
def pair():
    return reference_pair(TINY, seed=1)


@pytest.fixture(scope="module")
def encoder(pair, tok):
    return TextEncoder(pair[1], TINY, tok, dtype="fp32")


def test_load_tokenizer_from_sentencepiece_and_saved_dirs(sp_dir, saved_dir, tok):
    bare = load_tokenizer(sp_dir)
    for t in (bare, tok):
        assert t.padding_side == "right"
        assert t("")["input_ids"] == [2]  # the unconditional prompt is <bos> only
        ids = t(SHORT)["input_ids"]
        assert ids[0] == t.bos_token_id and t.eos_token_id not in ids
        assert len(t) <= TINY.vocab_size
    assert bare(LONG)["input_ids"] == tok(LONG)["input_ids"]
    batch = tok([SHORT, ""], padding=True)
    assert batch["attention_mask"][1][0] == 1 and batch["input_ids"][1][-1] == tok.pad_token_id  # right pad
    # a subfolder like the Lumina pipeline layout
    assert load_tokenizer(saved_dir.parent, subfolder="tokenizer")(SHORT)["input_ids"] == tok(SHORT)["input_ids"]
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(saved_dir.parent)


def test_load_tokenizer_rejects_tokenizer_without_bos(sp_dir, pair):
    bad = transformers.GemmaTokenizer.from_pretrained(sp_dir, add_bos_token=False)
    from lumina_jax.text import _check_tokenizer

    with pytest.raises(ValueError, match=r"exactly \[<bos>\]"):
        _check_tokenizer(bad, "test")
    with pytest.raises(ValueError, match=r"TextEncoder: tokenizer encodes the empty prompt as \[\]"):
        TextEncoder(pair[1], TINY, bad)  # a tokenizer built by the caller is checked too (empty rows otherwise)


def test_buckets():
    assert bucket_lengths(256) == (64, 128, 256)
    assert bucket_lengths(300) == (64, 128, 256, 300)
    assert bucket_lengths(32) == (32,)
    assert [bucket_for(n, 256) for n in (1, 64, 65, 129, 256)] == [64, 64, 128, 256, 256]
    with pytest.raises(ValueError, match="min_bucket must be >= 1"):  # 0 used to loop forever
        bucket_lengths(256, 0)


def test_bad_arguments_are_named(encoder, pair, tok):
    with pytest.raises(ValueError, match="min_bucket must be >= 1, got 0"):
        TextEncoder(pair[1], TINY, tok, min_bucket=0)
    for bad in (0, -1, 256.0, True):
        with pytest.raises(ValueError, match=r"max_length must be an integer >= 1"):
            encoder.tokenize("a cat", max_length=bad)
    for bad in (None, b"a cat", 3):
        with pytest.raises(TypeError, match=r"prompts must be a string or a list of strings"):
            encoder.tokenize(bad)


def test_system_prompt_and_unconditional_prompt(encoder, tok):
    ids, mask = encoder.tokenize([SHORT, ""], system_prompt="real")
    want = tok(SYSTEM_PROMPTS["real"] + SHORT)["input_ids"]
    assert ids[0, : len(want)].tolist() == want and mask[0].sum() == len(want)
    assert ids[1, 0] == tok.bos_token_id and mask[1].sum() == 1  # "" gets no system prompt
    ids_base, mask_base = encoder.tokenize(SHORT, system_prompt="base")
    assert ids_base[0, : mask_base.sum()].tolist() == tok(SYSTEM_PROMPTS["base"] + SHORT)["input_ids"]
    ids_none, m = encoder.tokenize(SHORT, system_prompt="empty")
    assert ids_none[0, : m.sum()].tolist() == tok(SHORT)["input_ids"]
    ids_custom, m = encoder.tokenize(SHORT, system_prompt="Paint it.")  # custom text: diffusers' separator added
    assert ids_custom[0, : m.sum()].tolist() == tok("Paint it. <Prompt Start> " + SHORT)["input_ids"]


def test_encode_matches_diffusers_style_transformers_path(encoder, pair, tok):
    """Same numbers as tokenizer(padding="max_length", max_length=64) -> Gemma2Model -> hidden_states[-2]."""
    model, _ = pair
    prompts = [SHORT, "", "an oil painting of a mountain lake"]
    feats, mask = encoder.encode(prompts, max_length=64)
    texts = [SYSTEM_PROMPTS["real"] + p if p else "" for p in prompts]
    batch = tok(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True).hidden_states[-2].numpy()
    ref_mask = batch["attention_mask"].numpy().astype(bool)
    np.testing.assert_array_equal(np.asarray(mask), ref_mask)
    f = np.asarray(feats)
    err = float(np.linalg.norm(f[ref_mask] - ref[ref_mask]) / np.linalg.norm(ref[ref_mask]))
    print(f"\nTextEncoder.encode vs transformers hidden_states[-2], fp32, rel L2 = {err:.2e}")
    assert err <= 1e-5
    assert not f[~ref_mask].any()  # padded positions are zeroed


def test_truncation_warns_with_counts_or_raises(encoder, tok):
    max_length = 40
    prompts = [SHORT, LONG, LONG + LONG]
    lengths = [len(tok(SYSTEM_PROMPTS["real"] + p)["input_ids"]) for p in prompts]
    expected = {i: n - max_length for i, n in enumerate(lengths) if n > max_length}
    assert set(expected) == {1, 2} and expected[2] > expected[1] > 0
    with pytest.warns(UserWarning, match=r"2 of 3 prompt\(s\) exceed max_length=40") as rec:
        ids, mask = encoder.tokenize(prompts, max_length=max_length)
    assert str(expected) in str(rec[0].message)
    assert ids.shape == (3, 40) and mask.sum(1).tolist() == [lengths[0], 40, 40]
    assert ids[1].tolist() == tok(SYSTEM_PROMPTS["real"] + LONG)["input_ids"][:40]  # keeps the head
    with pytest.raises(PromptTooLongError, match=r"index: count\): \{1: %d, 2: %d\}" % (expected[1], expected[2])):
        encoder.tokenize(prompts, max_length=max_length, on_truncate="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to truncate -> no warning
        encoder.tokenize([SHORT], max_length=max_length, on_truncate="error")
        assert encoder.last_truncated == 0
        quiet, _ = encoder.tokenize(prompts, max_length=max_length, on_truncate="quiet")  # cut, counted, no warning
        assert encoder.last_truncated == 2 and encoder.last_truncated_rows == (1, 2) and np.array_equal(quiet, ids)
    with pytest.raises(ValueError, match="on_truncate"):
        encoder.tokenize([SHORT], on_truncate="ignore")
    with pytest.raises(ValueError, match=r"negative prompt 1 is not valid Unicode \(a lone surrogate at character 2"):
        encoder.tokenize([SHORT, "ab\udcff"], label="negative prompt")  # was the tokenizer's TypeError


def test_token_ids_outside_the_vocabulary_are_an_error(encoder):
    vocab = encoder.config.vocab_size
    mask = np.ones((1, 3), bool)
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=rf"token id {bad} at \[0, 2\] is outside the vocabulary"):
            encoder.encode_tokens(np.array([[2, 5, bad]]), mask)
    with pytest.raises(ValueError, match=r"input_ids \(1, 3\) and mask \(1, 4\) must both be"):
        encoder.encode_tokens(np.array([[2, 5, 6]]), np.ones((1, 4), bool))
    # the module itself: concrete JAX ids are checked like NumPy ones (NaN features otherwise), and the mask shape
    from lumina_jax.models.gemma2 import Gemma2Encoder

    enc = Gemma2Encoder(encoder.config)
    with pytest.raises(ValueError, match="token ids outside the vocabulary"):
        enc.apply({"params": encoder.params}, jnp.asarray([[2, 5, vocab]]), jnp.asarray(mask))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 4\), input_ids \(1, 3\)"):
        enc.apply({"params": encoder.params}, jnp.asarray([[2, 5, 6]]), jnp.ones((1, 4), bool))


def test_short_prompts_compile_a_short_bucket_and_match_longer_buckets(pair, tok):
    enc = TextEncoder(pair[1], TINY, tok, dtype="fp32")
    f64, m64 = enc.encode([SHORT])
    assert f64.shape == (1, 64, TINY.hidden_size) and enc.compiled_shapes == [(1, 64)]
    n = int(m64.sum())
    long_tokens = len(tok(SYSTEM_PROMPTS["real"] + LONG)["input_ids"])
    assert 64 < long_tokens <= 128, long_tokens
    f128, m128 = enc.encode([SHORT, LONG])  # the batch's longest prompt picks the bucket
    assert f128.shape == (2, 128, TINY.hidden_size) and enc.compiled_shapes == [(1, 64), (2, 128)]
    assert int(m128[1].sum()) == long_tokens
    np.testing.assert_allclose(np.asarray(f128)[0, :n], np.asarray(f64)[0, :n], rtol=1e-5, atol=1e-6)
    f256 = enc.encode_tokens(*_pad_to(enc.tokenize([SHORT]), 256))
    np.testing.assert_allclose(np.asarray(f256)[0, :n], np.asarray(f64)[0, :n], rtol=1e-5, atol=1e-6)
    enc.encode([SHORT])  # cached: no new compilation
    assert enc.compiled_shapes == [(1, 64), (1, 256), (2, 128)]


def test_bf16_encoder_runs_and_is_close(encoder, pair, tok):
    prompts = [SHORT, "", "an oil painting of a mountain lake"]  # same shapes as the fp32 parity test
    f32 = encoder.encode(prompts, max_length=64)[0]
    f16, mask = TextEncoder(pair[1], TINY, tok).encode(prompts, max_length=64)  # default compute: bf16
    assert f16.dtype == jnp.bfloat16
    m = np.asarray(mask)
    a, b = np.asarray(f16, np.float32)[m], np.asarray(f32)[m]
    err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    print(f"\nTextEncoder bf16 vs fp32 compute, rel L2 = {err:.2e}")
    assert err <= 2e-2


def _pad_to(tokens: tuple[np.ndarray, np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = tokens
    pad = length - ids.shape[1]
    return np.pad(ids, ((0, 0), (0, pad))), np.pad(mask, ((0, 0), (0, pad)))
