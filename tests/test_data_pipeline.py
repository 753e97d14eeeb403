"""Input pipeline: transforms, bad data, bucketing/packing, dropout, resume, hosts, mixtures, workers."""

import collections
import dataclasses
import json
import logging

import numpy as np
import pytest
from PIL import Image

from lumina_jax import text_templates
from lumina_jax.data import batching, testing
from lumina_jax.data.pipeline import DataPipeline, NoUsableSampleError, PipelineConfig
from lumina_jax.data.sources import JsonlSource, ListSource

RES = 64  # crop sizes of (64/16)**2 = 16 patches: 256x16 ... 64x64 ... 16x256 would exceed 4:1


def config(**kw) -> PipelineConfig:
    base = dict(resolution=RES, batch_size=4, seed=0, shard_index=0, shard_count=1, read_threads=1)
    base.update(kw)
    return PipelineConfig(**base)


def original_style_best(w, h, sizes):
    rem = [min(cw / w, ch / h) / max(cw / w, ch / h) for cw, ch in sizes]
    return sorted(zip(rem, sizes), reverse=True)[0][1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    jsonl, items = testing.make_test_dataset(root)
    return jsonl, items


def good_ids(items, name="data"):
    return {f"{name}:{i}" for i, it in enumerate(items) if it.expected_skip is None}


def run(pipe, max_batches=None):
    it = iter(pipe)
    batches = []
    for b in it:
        batches.append(b)
        if max_batches is not None and len(batches) >= max_batches:
            break
    return batches, it


def valid_ids(batches):
    return [i for b in batches for i, v in zip(b["ids"], b["valid"]) if v]


# --------------------------------------------------------------------------------------------------
# Bad data


def test_skip_counts_exact_and_first_paths_logged(dataset, caplog):
    jsonl, items = dataset
    caplog.set_level(logging.WARNING, logger="lumina_jax.data")
    batches, it = run(DataPipeline(JsonlSource(jsonl), config(num_epochs=1)))
    expected = collections.Counter(i.expected_skip for i in items if i.expected_skip)
    assert it.stats.skipped == {"data": dict(expected)}
    assert it.stats.total_skipped() == sum(expected.values()) == 6
    ids = valid_ids(batches)
    assert len(ids) == len(set(ids)) == it.stats.samples
    assert set(ids) == good_ids(items)
    logged = caplog.text
    for item in items:
        if item.expected_skip:
            assert item.file in logged
    # undecodable files say why (PIL's error), not only which
    undecodable = [line for line in logged.splitlines() if "(undecodable)" in line]
    assert undecodable and all("Error:" in line for line in undecodable), undecodable


def test_bad_data_does_not_reorder_the_rest(dataset, tmp_path):
    jsonl, items = dataset
    fixed = [
        testing.SyntheticItem(i.file, f"fixed {n}", 32, 32) if i.expected_skip else i
        for n, i in enumerate(items)
    ]
    clean_jsonl, _ = testing.make_test_dataset(tmp_path, fixed)
    cfg = config(num_epochs=2, batching="mixed", caption_dropout=0.3)
    with_bad = valid_ids(run(DataPipeline(JsonlSource(jsonl), cfg))[0])
    clean = valid_ids(run(DataPipeline(JsonlSource(clean_jsonl), cfg))[0])
    bad = {f"data:{i}" for i, it in enumerate(items) if it.expected_skip}
    assert len(clean) == 2 * len(items)
    assert with_bad == [i for i in clean if i not in bad]


def test_source_with_no_usable_sample_is_an_error_naming_it(tmp_path):
    bad_items = [
        testing.SyntheticItem(f"m{i}.png", "x", expected_skip="missing", defect="missing")
        for i in range(3)
    ]
    jsonl, _ = testing.make_test_dataset(tmp_path / "all_bad", bad_items)
    with pytest.raises(NoUsableSampleError, match="all_bad|data"):
        DataPipeline(JsonlSource(jsonl, name="all_bad"), config())
    with pytest.raises(NoUsableSampleError, match="empty"):
        DataPipeline(ListSource([], name="empty"), config())
    # Larger than the probe: caught at run time by the consecutive-skip guard.
    png = testing.encode_image(testing.make_image(8, 8))
    blank = ListSource([{"image": png, "caption": ""}] * 50, name="blank_captions")
    it = iter(DataPipeline(blank, config(probe_samples=5, max_consecutive_skips=20)))
    with pytest.raises(NoUsableSampleError, match="blank_captions"):
        next(it)
    # Larger than the probe, shorter than the skip limit, one epoch: the end of the data says so (was: no
    # batch and no error; preprocess wrote an empty cache and exited 0)
    it = iter(DataPipeline(blank, config(probe_samples=5, num_epochs=1)))
    with pytest.raises(NoUsableSampleError, match=r"no usable sample in the data: 0 samples .*blank_captions: empty_caption=50"):
        next(it)


def test_consecutive_skip_limit_is_configurable_and_named_in_the_error():
    png = testing.encode_image(testing.make_image(8, 8))
    items = [{"image": png, "caption": ""}] * 6 + [{"image": png, "caption": f"c{i}"} for i in range(4)]
    src = ListSource(items, name="blanks_first")
    cfg = config(resolution=32, num_epochs=1, shuffle=False, probe_samples=0)
    with pytest.raises(NoUsableSampleError, match=r"raise the limit \(5\) with PipelineConfig\.max_consecutive_skips"):
        next(iter(DataPipeline(src, dataclasses.replace(cfg, max_consecutive_skips=5))))
    renamed = dataclasses.replace(cfg, max_consecutive_skips=5, max_consecutive_skips_option="data.max_skips")
    with pytest.raises(NoUsableSampleError, match=r"with data\.max_skips\."):
        next(iter(DataPipeline(src, renamed)))
    _, it = run(DataPipeline(src, dataclasses.replace(cfg, max_consecutive_skips=7)))
    assert it.stats.samples == 4 and it.stats.skipped == {"blanks_first": {"empty_caption": 6}}
    with pytest.raises(ValueError, match="max_consecutive_skips must be >= 1"):
        config(max_consecutive_skips=0)


# --------------------------------------------------------------------------------------------------
# Transforms


def test_colour_modes_and_normalisation():
    transparent = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    half = Image.new("RGBA", (32, 32), (0, 0, 0, 128))
    grey = Image.new("L", (32, 32), 51)
    pal = Image.new("RGB", (32, 32), (0, 0, 255)).convert("P")
    items = [
        {"image": testing.encode_image(im), "caption": name, "key": name}
        for name, im in [("transparent", transparent), ("half", half), ("grey", grey), ("pal", pal)]
    ]
    batches, _ = run(DataPipeline(ListSource(items), config(
        resolution=32, batch_size=1, num_epochs=1, shuffle=False, caption_dropout=0.0)))
    by_key = {b["prompts"][0].split("<Prompt Start> ")[1]: b["images"][0] for b in batches}
    np.testing.assert_allclose(by_key["transparent"], 1.0)  # composited on white
    np.testing.assert_allclose(by_key["half"], (255 - 128) / 127.5 - 1.0, atol=1 / 127.5)
    np.testing.assert_allclose(by_key["grey"], 51 / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_allclose(by_key["pal"][..., 2], 1.0, atol=1e-6)
    np.testing.assert_allclose(by_key["pal"][..., :2], -1.0, atol=1e-6)
    for img in by_key.values():
        assert img.dtype == np.float32 and img.shape == (32, 32, 3)


def test_single_channel_arrays_are_greyscale():
    grey = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    items = [{"image": a, "caption": "x", "key": k} for k, a in [("hw", grey), ("hw1", grey[..., None]), ("rgb", rgb)]]
    batches, it = run(DataPipeline(ListSource(items), config(
        resolution=32, batch_size=1, num_epochs=1, shuffle=False, caption_dropout=0.0)))
    assert it.stats.skipped == {}
    by_key = {b["keys"][0]: b["images"][0] for b in batches}
    np.testing.assert_array_equal(by_key["hw1"], by_key["hw"])
    np.testing.assert_array_equal(by_key["hw1"], by_key["rgb"])


def test_unusable_system_prompt_is_a_counted_bad_record(caplog):
    """Not a string, or one ASCII word that is not a template (a misspelt name in the data): the record
    is skipped and counted, the run goes on; text without spaces in other scripts is text."""
    from lumina_jax.data.image_index import raw_item_size, reason_of
    from lumina_jax.data.sources import RawItem

    caplog.set_level(logging.WARNING, logger="lumina_jax.data")
    png = testing.encode_image(testing.make_image(16, 16))
    items = [{"image": png, "caption": f"a{i}", "system_prompt": "base", "key": f"k{i}"} for i in range(12)]
    items[9]["system_prompt"] = None
    items[10]["system_prompt"] = 3
    items[11]["system_prompt"] = "photo"
    items[8]["system_prompt"] = "你是一个生成高质量图像的助手"
    batches, it = run(DataPipeline(ListSource(items, name="sp"), config(resolution=32, num_epochs=1, shuffle=False)))
    assert it.stats.samples == 9 and it.stats.skipped == {"sp": {"bad_record": 3}}
    assert "k9 (system prompt is a NoneType" in caplog.text and "k10 (system prompt is a int" in caplog.text
    assert "k11 (unknown system prompt template 'photo'" in caplog.text
    assert any(p.startswith("你是") for b in batches for p in b["prompts"])
    # the size index judges them as the loader does
    assert reason_of(raw_item_size(RawItem(key="k", caption="c", system_prompt="photo", image=png))[2]) == "bad_record"
    assert raw_item_size(RawItem(key="k", caption="c", system_prompt="base", image=png)) == (16, 16, 0)


# --------------------------------------------------------------------------------------------------
# Batching


def test_bucket_batches_are_homogeneous_with_best_fit_sizes(dataset):
    jsonl, items = dataset
    sizes = PipelineConfig(resolution=RES).transform_config().crop_sizes
    batches, it = run(DataPipeline(JsonlSource(jsonl), config(num_epochs=1, bucket_window=6)))
    seen = set()
    for b in batches:
        h, w = b["images"].shape[1:3]
        assert (b["image_sizes"] == [h, w]).all()
        assert -1.0 <= b["images"].min() and b["images"].max() <= 1.0
        valid = list(np.flatnonzero(b["valid"]))
        assert valid == list(range(len(valid))) and valid  # padding rows come last
        for row in range(len(b["ids"])):
            sample_id = b["ids"][row]
            item = items[int(sample_id.split(":")[1])]
            assert (w, h) == original_style_best(item.width, item.height, sizes)
            if b["valid"][row]:
                seen.add(sample_id)
            else:  # a padding row repeats a valid row of the same batch
                assert sample_id in [b["ids"][v] for v in valid]
    assert seen == good_ids(items)
    assert it.stats.padded_rows == sum((~b["valid"]).sum() for b in batches)


def test_mixed_batches_pack_tokens_and_unpack_to_the_bucketed_images(dataset):
    jsonl, items = dataset
    bucket = run(DataPipeline(JsonlSource(jsonl), config(num_epochs=1, caption_dropout=0)))[0]
    reference = {i: b["images"][r] for b in bucket for r, i in enumerate(b["ids"]) if b["valid"][r]}
    mixed, _ = run(DataPipeline(JsonlSource(jsonl), config(num_epochs=1, batching="mixed", caption_dropout=0)))
    budget = (RES // 16) ** 2
    unpacked = {}
    for b in mixed:
        assert b["images"].shape == (4, budget, 16 * 16 * 3)
        for r, (h, w) in enumerate(b["image_sizes"]):
            n_tokens = (h // 16) * (w // 16)
            assert b["token_mask"][r].sum() == n_tokens and b["token_mask"][r, :n_tokens].all()
            assert (b["images"][r, n_tokens:] == 0).all()
            if b["valid"][r]:
                unpacked[b["ids"][r]] = batching.unpatchify(b["images"][r], (h, w), 16, 3)
    assert unpacked.keys() == reference.keys()
    for k, img in unpacked.items():
        np.testing.assert_array_equal(img, reference[k])


def test_patchify_roundtrip():
    x = np.random.default_rng(0).standard_normal((48, 32, 3)).astype(np.float32)
    t = batching.patchify(x, 16)
    assert t.shape == (6, 768)
    np.testing.assert_array_equal(t[1].reshape(16, 16, 3), x[:16, 16:32])  # row-major patches
    np.testing.assert_array_equal(batching.unpatchify(t, (48, 32), 16, 3), x)


# --------------------------------------------------------------------------------------------------
# Caption dropout


@pytest.fixture(scope="module")
def many_items():
    png = testing.encode_image(testing.make_image(8, 8))
    return [{"image": png, "caption": f"prompt {i}"} for i in range(1500)]


def dropped_ids(items, **kw):
    cfg = config(resolution=32, batch_size=50, num_epochs=1, batching="mixed", **kw)
    batches, it = run(DataPipeline(ListSource(items, name="many"), cfg))
    out = set()
    for b in batches:
        for i, p, d in zip(b["ids"], b["prompts"], b["caption_dropped"]):
            assert (p == "") == d
            if not d:
                assert p == text_templates.build_prompt(f"prompt {int(i.split(':')[1])}", "base")
            else:
                out.add(i)
    assert it.stats.captions_dropped == len(out)
    return out


def test_caption_dropout_rate_and_determinism(many_items):
    n, p = len(many_items), 0.1
    a = dropped_ids(many_items, seed=1, caption_dropout=p)
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(len(a) - n * p) <= 4 * sd, len(a)
    assert dropped_ids(many_items, seed=1, caption_dropout=p) == a  # same seed, same decisions
    b = dropped_ids(many_items, seed=2, caption_dropout=p)
    assert abs(len(b) - n * p) <= 4 * sd
    # Independent draws: overlap ~ n p^2 = 15, far from |a| ~ 150.
    assert len(a & b) < 0.5 * len(a)
    assert dropped_ids(many_items[:200], seed=1, caption_dropout=0.0) == set()
    assert len(dropped_ids(many_items[:200], seed=1, caption_dropout=1.0)) == 200


def test_random_crop_offsets_vary_per_sample_and_repeat_per_seed():
    """``random_crop_offset``: a 10:1 horizontal ramp (cropped to 4:1) lands at another place for most
    samples (the centre crop is always the same), and the same seed gives the same crops."""
    ramp = np.broadcast_to(np.linspace(0, 255, 320, dtype=np.float32)[None, :, None], (32, 320, 3))
    png = testing.encode_image(Image.fromarray(ramp.astype(np.uint8), "RGB"))
    items = [{"image": png, "caption": f"p{i}"} for i in range(16)]

    def means(**kw):
        cfg = config(resolution=32, batch_size=8, num_epochs=1, batching="bucket", **kw)
        batches, _ = run(DataPipeline(ListSource(items, name="ramp"), cfg))
        return [float(np.mean(im)) for b in batches for im in b["images"]]

    centre, a = means(), means(random_crop_offset=True, seed=3)
    assert len(set(np.round(centre, 4))) == 1 and len(a) == 16
    assert a == means(random_crop_offset=True, seed=3)
    assert sum(abs(x - centre[0]) > 0.05 for x in a) >= 12 and min(a) < centre[0] < max(a)
    assert a != means(random_crop_offset=True, seed=4)


# --------------------------------------------------------------------------------------------------
# Resume, hosts, mixtures


def assert_batches_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(w[k], np.ndarray):
                np.testing.assert_array_equal(g[k], w[k], err_msg=k)
            else:
                assert g[k] == w[k], k


@pytest.mark.parametrize("batching_mode", ["bucket", "mixed"])
def test_resume_matches_uninterrupted_run(dataset, batching_mode):
    jsonl, _ = dataset
    cfg = config(batching=batching_mode, bucket_window=6)  # forever; small window: flushes + replay
    total = 14
    reference, _ = run(DataPipeline(JsonlSource(jsonl), cfg), total)
    for k in (1, 4, 9):
        it = iter(DataPipeline(JsonlSource(jsonl), cfg))
        head = [next(it) for _ in range(k)]
        assert_batches_equal(head, reference[:k])
        state = json.loads(json.dumps(it.get_state()))  # must survive JSON (orbax stores JSON)
        stats_at_k = it.stats.to_dict()
        restored = iter(DataPipeline(JsonlSource(jsonl), cfg))
        restored.set_state(state)
        assert restored.stats.to_dict() == stats_at_k
        tail = [next(restored) for _ in range(total - k)]
        assert_batches_equal(tail, reference[k:])


def test_resume_at_the_end_of_a_finite_run(dataset):
    jsonl, items = dataset
    cfg = config(num_epochs=1, bucket_window=6)
    reference, ref_it = run(DataPipeline(JsonlSource(jsonl), cfg))
    k = len(reference) - 2
    it = iter(DataPipeline(JsonlSource(jsonl), cfg))
    for _ in range(k):
        next(it)
    restored = iter(DataPipeline(JsonlSource(jsonl), cfg))
    restored.set_state(json.loads(json.dumps(it.get_state())))
    assert_batches_equal(list(restored), reference[k:])
    assert restored.stats.to_dict() == ref_it.stats.to_dict()  # exact counts after a resume too


def test_restoring_into_another_configuration_names_each_changed_setting():
    png = testing.encode_image(testing.make_image(16, 16))
    a = ListSource([{"image": png, "caption": f"a{i}"} for i in range(40)], name="A")
    b = ListSource([{"image": png, "caption": f"b{i}"} for i in range(30)], name="B")
    cfg = config(resolution=32)
    it = iter(DataPipeline(a, cfg))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    reference = [next(it) for _ in range(3)]
    changes = [
        (dict(num_workers=2), None, r"num_workers: 0 -> 2"),
        (dict(seed=1, batch_size=2), None, r"batch_size: 4 -> 2; .*seed: 0 -> 1"),
        (dict(shard_index=1, shard_count=2), None, r"shard_count: 1 -> 2; shard_index: 0 -> 1"),
        (dict(batching="mixed"), None, r"batching: 'bucket' -> 'mixed'"),
        ({}, [a, b], r"sources: \['A \(image, 40 records\)'\] -> \['A \(image, 40 records\)', 'B \(image, 30"),
    ]
    for change, srcs, match in changes:
        with iter(DataPipeline(srcs or a, dataclasses.replace(cfg, **change))) as other:
            with pytest.raises(ValueError, match=f"saved by a pipeline with other settings .*{match}"):
                other.set_state(state)
    two = iter(DataPipeline([a, b], cfg, weights=[1, 3]))
    next(two)
    with pytest.raises(ValueError, match=r"weights: \[0\.25, 0\.75\] -> \[0\.5, 0\.5\]"):
        iter(DataPipeline([a, b], cfg)).set_state(json.loads(json.dumps(two.get_state())))
    # Content-only settings may change; a state saved before the fingerprint existed is restored unchecked.
    restored = iter(DataPipeline(a, dataclasses.replace(cfg, caption_dropout=0.5, read_threads=2)))
    restored.set_state(state)
    assert [b["ids"] for b in (next(restored) for _ in range(3))] == [b["ids"] for b in reference]
    old = {k: v for k, v in state.items() if k != "config"}
    restored = iter(DataPipeline(a, cfg))
    restored.set_state(old)
    assert_batches_equal([next(restored) for _ in range(3)], reference)
    with iter(DataPipeline(a, config(resolution=32, num_workers=2))) as other:
        with pytest.raises(ValueError, match="does not fit this pipeline.*num_workers"):
            other.set_state(old)


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_two_simulated_hosts_are_disjoint_and_complete(dataset, drop_remainder):
    jsonl, items = dataset
    per_host = []
    for host in range(2):
        cfg = config(num_epochs=1, shard_index=host, shard_count=2, drop_shard_remainder=drop_remainder)
        batches, it = run(DataPipeline(JsonlSource(jsonl), cfg))
        ids = valid_ids(batches)
        assert len(ids) == len(set(ids))
        per_host.append(set(ids))
        # Resume on this host mid-way.
        k = 2
        it2 = iter(DataPipeline(JsonlSource(jsonl), cfg))
        for _ in range(k):
            next(it2)
        restored = iter(DataPipeline(JsonlSource(jsonl), cfg))
        restored.set_state(json.loads(json.dumps(it2.get_state())))
        assert_batches_equal(list(restored), batches[k:])
    assert not per_host[0] & per_host[1]
    union = per_host[0] | per_host[1]
    if drop_remainder:
        # len(items) is even, so nothing is dropped; each host gets exactly half of the records.
        assert len(items) % 2 == 0
    assert union == good_ids(items)


def test_hosts_do_not_change_per_sample_randomness(many_items):
    items = many_items[:300]
    single = dropped_ids(items, seed=5, caption_dropout=0.2)
    split = set()
    for host in range(3):
        cfg = config(resolution=32, batch_size=50, num_epochs=1, batching="mixed", seed=5,
                     caption_dropout=0.2, shard_index=host, shard_count=3)
        for b in run(DataPipeline(ListSource(items, name="many"), cfg))[0]:
            split |= {i for i, d in zip(b["ids"], b["caption_dropped"]) if d}
    assert split == single


def test_epochs_reshuffle_and_cover(dataset):
    jsonl, items = dataset
    ids = valid_ids(run(DataPipeline(JsonlSource(jsonl), config(num_epochs=2, batching="mixed")))[0])
    n_good = len(good_ids(items))
    first, second = ids[:n_good], ids[n_good:]
    assert set(first) == set(second) == good_ids(items)
    assert first != second  # a new permutation every epoch


def test_mixture_weights_and_resume():
    png = testing.encode_image(testing.make_image(16, 16))
    a = ListSource([{"image": png, "caption": f"a{i}"} for i in range(40)], name="A")
    b = ListSource([{"image": png, "caption": f"b{i}"} for i in range(40)], name="B")
    cfg = config(resolution=32, batch_size=8, batching="mixed")
    pipe = DataPipeline([a, b], cfg, weights=[3, 1])
    reference, _ = run(pipe, 10)
    sources = np.concatenate([bt["source"] for bt in reference])
    share_a = (sources == 0).mean()
    assert abs(share_a - 0.75) <= 0.03, share_a
    it = iter(DataPipeline([a, b], cfg, weights=[3, 1]))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    restored = iter(DataPipeline([a, b], cfg, weights=[3, 1]))
    restored.set_state(state)
    assert_batches_equal([next(restored) for _ in range(7)], reference[3:])
    with pytest.raises(ValueError, match="weights"):
        DataPipeline([a, b], cfg, weights=[1])
    with pytest.raises(ValueError, match="unique"):
        DataPipeline([a, a], cfg)


class ToyTokenizer:
    """Bytes as token ids, right-padded to 16 (stand-in for the Gemma tokenizer)."""

    def __call__(self, prompts):
        ids = np.zeros((len(prompts), 16), np.int32)
        for i, p in enumerate(prompts):
            t = list(p.encode()[:16])
            ids[i, : len(t)] = t
        return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int32)}


def test_tokenize_is_applied_per_batch(dataset):
    jsonl, _ = dataset
    batches, _ = run(DataPipeline(JsonlSource(jsonl), config(num_epochs=1, caption_dropout=0.5),
                                  tokenize=ToyTokenizer()))
    for b in batches:
        assert b["input_ids"].shape == (4, 16) and b["attention_mask"].shape == (4, 16)
        for p, m in zip(b["prompts"], b["attention_mask"]):
            assert m.sum() == min(len(p.encode()), 16)


def test_config_validation():
    with pytest.raises(ValueError):
        PipelineConfig(batching="ragged")
    with pytest.raises(ValueError):
        PipelineConfig(resolution=100)  # not a multiple of 16 (checked via the crop list)
    with pytest.raises(ValueError):
        config(shard_index=2, shard_count=2).host_shard()


# --------------------------------------------------------------------------------------------------
# Worker processes and orbax


def test_worker_processes_cover_resume_and_count(dataset):
    jsonl, items = dataset
    cfg = config(num_epochs=1, num_workers=2, bucket_window=6)
    k = 2
    with iter(DataPipeline(JsonlSource(jsonl), cfg)) as it:
        reference = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(it.get_state()))  # saved mid-run, then keep going
        reference += list(it)
        ref_stats = it.stats.to_dict()
    assert set(valid_ids(reference)) == good_ids(items)
    assert it.stats.total_skipped() == sum(1 for i in items if i.expected_skip)
    with iter(DataPipeline(JsonlSource(jsonl), cfg)) as restored:
        restored.set_state(state)
        tail = list(restored)
    assert_batches_equal(tail, reference[k:])
    assert restored.stats.to_dict() == ref_stats


def test_orbax_saves_iterator_alongside_train_state(dataset, tmp_path):
    import orbax.checkpoint as ocp

    from lumina_jax.data.checkpoint import restore_with_data, save_with_data

    jsonl, _ = dataset
    cfg = config(bucket_window=6)
    reference, _ = run(DataPipeline(JsonlSource(jsonl), cfg), 8)
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    it = iter(DataPipeline(JsonlSource(jsonl), cfg))
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert save_with_data(mngr, 3, it, state=ocp.args.StandardSave(params))
        mngr.wait_until_finished()
    restored_it = iter(DataPipeline(JsonlSource(jsonl), cfg))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        out = restore_with_data(mngr, None, restored_it, state=ocp.args.StandardRestore(params))
    np.testing.assert_array_equal(out["state"]["w"], params["w"])
    assert_batches_equal([next(restored_it) for _ in range(5)], reference[3:])
    assert (tmp_path / "ckpt" / "3" / "data_iter" / "process_0-of-1.json").exists()


# --------------------------------------------------------------------------------------------------
# The batcher on its own


def _toy_stream(spec):
    """'A'/'B' = a sample of that size class, 'x' = a skip marker."""
    out = []
    for i, c in enumerate(spec):
        if c == "x":
            out.append({"_skip": "undecodable", "source": "toy", "key": f"bad{i}"})
        else:
            out.append({"image_size": (16, 16) if c == "A" else (16, 32), "id": f"{c}{i}"})
    return out


def _toy_batches(spec, batch_size, window, drop_incomplete=False):
    import grain

    def collate(samples, n_valid):
        return {"ids": [s["id"] for s in samples], "valid": np.arange(len(samples)) < n_valid}

    ds = batching.BatchIterDataset(
        grain.MapDataset.source(_toy_stream(spec)).to_iter_dataset(),
        batch_size, collate, key_fn=batching.size_key, window=window, drop_incomplete=drop_incomplete)
    return list(ds)


def test_batcher_window_flush_padding_and_skip_tally():
    # Window 3 (in pulled elements): a bucket is flushed once its oldest sample is 3 pulls old.
    # pulls: A0 B1 x2 -> A0 is 3 old: flush [A0 +pad]; A3 -> B1 3 old: flush [B1 +pad];
    # A4 fills [A3 A4]; B5 B6 fill [B5 B6]; A7 is flushed padded at the end of the stream.
    got = _toy_batches("ABxAABBA", batch_size=2, window=3)
    assert [b["ids"] for b in got] == [["A0", "A0"], ["B1", "B1"], ["A3", "A4"], ["B5", "B6"], ["A7", "A7"]]
    assert [b["valid"].tolist() for b in got] == [[True, False], [True, False], [True, True],
                                                    [True, True], [True, False]]
    # The skip is reported with the first batch made after it was pulled.
    assert [b["_skips"]["counts"] for b in got] == [{"toy\tundecodable": 1}, {}, {}, {}, {}]
    assert [b["_skips"]["examples"] for b in got][0] == [["toy", "undecodable", "bad2"]]
    # A large window lets the buckets fill: no padding at all.
    assert [b["ids"] for b in _toy_batches("ABxAABBA", batch_size=2, window=8)] == [
        ["A0", "A3"], ["B1", "B5"], ["A4", "A7"], ["B6", "B6"]]
    dropped = _toy_batches("ABxAABBA", batch_size=2, window=3, drop_incomplete=True)
    assert [b.get("ids") for b in dropped] == [None, None, ["A3", "A4"], ["B5", "B6"], None]
    assert [b["_skips"].get("dropped_incomplete", 0) for b in dropped] == [1, 1, 0, 0, 1]
    # Trailing skips after the last sample still get reported.
    tail = _toy_batches("AAxx", batch_size=2, window=4)
    assert tail[-1]["_stats_only"] and tail[-1]["_skips"]["counts"] == {"toy\tundecodable": 2}


def test_data_workers_ignore_sigint_so_the_trainer_can_stop_with_a_checkpoint(monkeypatch):
    """A terminal's Ctrl-C reaches the worker processes too; they must outlive the trainer's last step."""
    import signal

    import grain

    from lumina_jax.data import pipeline as pl

    seen = {}
    real = grain.IterDataset.mp_prefetch

    def spy(self, options=None, worker_init_fn=None, **kw):
        seen["init"] = worker_init_fn
        return real(self, options, **kw)

    monkeypatch.setattr(grain.IterDataset, "mp_prefetch", spy)
    png = testing.encode_image(testing.make_image(16, 16))
    items = [{"image": png, "caption": f"a{i}", "key": f"k{i}"} for i in range(4)]
    DataPipeline(ListSource(items, name="w"), config(resolution=32, num_epochs=1, num_workers=1))
    assert seen["init"] is pl._workers_ignore_sigint
    old = signal.getsignal(signal.SIGINT)
    try:
        pl._workers_ignore_sigint(0, 1)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


# --------------------------------------------------------------------------------------------------
# Closing


class _PassThrough:
    """Stands in for FrozenEncoders: the batch as it is."""

    last_truncated = 0

    def __call__(self, batch):
        return batch


def test_the_raw_image_stage_iterator_closes_its_pipeline_and_worker_processes(dataset):
    """The trainer closes a stage's iterator after the stage when it has ``close``: the raw-image stage's
    (``train.data.EncodedIterator``) passes it to the pipeline, so its grain worker processes end (twice is
    fine)."""
    import multiprocessing

    from lumina_jax.train.data import EncodedIterator

    jsonl, _ = dataset
    before = set(multiprocessing.active_children())
    it = EncodedIterator(iter(DataPipeline(JsonlSource(jsonl), config(num_workers=1))), _PassThrough())
    next(it)
    assert set(multiprocessing.active_children()) - before  # the worker
    it.close()
    it.close()
    assert not set(multiprocessing.active_children()) - before


EXIT_SCRIPT = """
import sys
from lumina_jax.data.pipeline import DataPipeline, PipelineConfig
from lumina_jax.data.sources import JsonlSource
pipe = DataPipeline([JsonlSource(sys.argv[1])], PipelineConfig(resolution=64, batch_size=4, shard_index=0,
                    shard_count=1, caption_dropout=0.0))
assert pipe.bucket_plan == "global"
it = iter(pipe)
print(next(it)["images"].shape, flush=True)
"""


def test_a_pipeline_left_open_at_exit_does_not_abort_the_interpreter(tmp_path):
    """A script that reads a batch and exits without closing its iterator exits cleanly: the iterator is
    closed at exit while its prefetch threads could still be reading (they made the interpreter abort with
    "terminate called without an active exception", exit code 134)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from lumina_jax.data import image_index

    jsonl, _ = testing.make_test_dataset(tmp_path)
    image_index.index_image_source(JsonlSource(jsonl), threads=1, progress=False)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(jsonl)], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0 and "(4, " in run.stdout, run.stderr[-2000:]
    assert "terminate called" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr[-2000:]
