"""Record format, latent-cache writer/reader, and training batches from a cache."""

import json
import pickle

import ml_dtypes
import numpy as np
import pytest

from lumina_jax.data import batching, cache, records
from lumina_jax.data.pipeline import DataPipeline, PipelineConfig

BF16 = np.dtype(ml_dtypes.bfloat16)
D = 24  # text feature width (2304 for Gemma-2-2B; small here)


def test_record_roundtrip_all_value_kinds():
    rng = np.random.default_rng(0)
    rec = {
        "bf16": rng.standard_normal((3, 5)).astype(BF16),
        "f32": rng.standard_normal((2, 2, 2)).astype(np.float32),
        "i64": np.arange(7, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "scalar": np.float32(2.5),
        "big_endian": np.arange(4, dtype=">i4"),
        "blob": b"\x00\x01binary\xff",
        "text": "héllo",
        "size": [1024, 768],
        "meta": {"a": 1, "b": [None, True]},
    }
    out = records.decode_record(records.encode_record(rec))
    assert out.keys() == rec.keys()
    for k, v in rec.items():
        if isinstance(v, (np.ndarray, np.generic)):
            want = np.asarray(v)
            assert out[k].shape == want.shape
            assert out[k].dtype == (want.dtype.newbyteorder("=") if k == "big_endian" else want.dtype)
            np.testing.assert_array_equal(out[k], want)
        else:
            assert out[k] == v


@pytest.mark.parametrize("data", [b"", b"NOPE", b"LJR1\xff\xff\xff\xff{}", b"LJR1\x02\x00\x00\x00{"])
def test_corrupt_records_raise_format_error(data):
    with pytest.raises(records.RecordFormatError):
        records.decode_record(data)


def test_truncated_payload_raises():
    data = records.encode_record({"x": np.zeros(100, np.float32)})
    with pytest.raises(records.RecordFormatError):
        records.decode_record(data[:-10])


def test_unsupported_values_are_rejected():
    with pytest.raises(TypeError):
        records.encode_record({"x": object()})
    with pytest.raises(TypeError):
        records.encode_record({"x": np.array(["a", "b"])})


SIZES = [(64, 64), (32, 128), (48, 80)]  # (H, W) pixels -> latents (H/8, W/8, 16)


def random_records(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        length = int(rng.integers(3, 20))
        out.append({
            "latent": rng.standard_normal((h // 8, w // 8, 16)).astype(np.float32),
            "cap_feats": rng.standard_normal((length, D)).astype(np.float32),
            "cap_mask": np.arange(length) < length - 1,
            "prompt": f"prompt {i}",
            "key": f"item-{i}",
        })
    return out


class Lazy:
    """A lazy sequence that records which items were computed (stand-in for running encoders)."""

    def __init__(self, items):
        self.items, self.seen = items, []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.seen.append(i)
        return self.items[i]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    empty = (np.full((2, D), 0.5, np.float32), np.array([True, False]))
    cache.write_latent_cache(random_records(23), out, shard_size=5, empty_prompt_features=empty)
    return out


def test_cache_roundtrip_is_exact(cache_dir):
    src = cache.LatentCacheSource(cache_dir)
    recs = random_records(23)
    assert len(src) == 23
    info = json.loads((cache_dir / "cache_info.json").read_text())
    assert info["num_records"] == 23 and len(info["shards"]) == 5
    for i, want in enumerate(recs):
        got = src.get(i)
        assert got["latent"].dtype == BF16 and got["cap_feats"].dtype == BF16
        np.testing.assert_array_equal(got["latent"], want["latent"].astype(BF16))
        np.testing.assert_array_equal(got["cap_feats"], want["cap_feats"].astype(BF16))
        np.testing.assert_array_equal(got["cap_mask"], want["cap_mask"])
        assert got["crop_size"] == [want["latent"].shape[0] * 8, want["latent"].shape[1] * 8]
        assert got["prompt"] == want["prompt"] and got["key"] == want["key"]
    assert not list(cache_dir.glob(".*tmp"))


def test_cache_writer_resumes_and_is_atomic(tmp_path):
    recs = random_records(11, seed=3)
    paths = cache.write_latent_cache(recs, tmp_path, shard_size=4)
    before = [p.read_bytes() for p in paths]
    paths[1].unlink()
    (tmp_path / ".latents-00002.array_record.deadbeef.tmp").write_bytes(b"partial")  # a crashed write
    lazy = Lazy(recs)
    cache.write_latent_cache(lazy, tmp_path, shard_size=4)
    assert lazy.seen == [4, 5, 6, 7]  # only the missing shard was recomputed
    assert [p.read_bytes() for p in paths] == before
    src = cache.LatentCacheSource(tmp_path)
    assert len(src) == 11  # the stray temp file is not a shard
    with pytest.raises(ValueError, match="resume"):
        cache.write_latent_cache(recs, tmp_path, shard_size=5)
    # A generator (no len) also works; the records of finished shards are consumed and discarded.
    gen_dir = tmp_path / "gen"
    cache.write_latent_cache((r for r in recs), gen_dir, shard_size=4)
    assert len(cache.LatentCacheSource(gen_dir)) == 11


def test_make_latent_record_validates_shapes():
    with pytest.raises(ValueError):
        cache.make_latent_record(np.zeros((4, 4, 8)), np.zeros((3, D)), np.ones(3), "p")
    with pytest.raises(ValueError):
        cache.make_latent_record(np.zeros((4, 4, 16)), np.zeros((3, D)), np.ones(4), "p")
    with pytest.raises(ValueError):
        cache.make_latent_record(np.zeros((4, 4, 16)), np.zeros((3, D)), np.ones(3), "p", crop_size=[16, 32])


def config(**kw):
    base = dict(resolution=64, batch_size=4, seed=0, shard_index=0, shard_count=1, num_epochs=1,
                caption_dropout=0.0, read_threads=1)
    base.update(kw)
    return PipelineConfig(**base)


def test_training_batches_from_cache_bucket_mode(cache_dir):
    src = cache.LatentCacheSource(cache_dir)
    it = iter(DataPipeline(src, config()))
    seen = set()
    for b in it:
        assert "images" not in b
        n, h, w, c = b["latents"].shape
        assert c == 16 and b["latents"].dtype == BF16
        assert (b["image_sizes"] == [h * 8, w * 8]).all()
        assert b["cap_feats"].shape[1] % 8 == 0 and b["cap_feats"].shape[2] == D
        assert b["cap_mask"].shape == b["cap_feats"].shape[:2]
        for r, sample_id in enumerate(b["ids"]):
            rec = src.get(int(sample_id.split(":")[1]))
            np.testing.assert_array_equal(b["latents"][r], rec["latent"])
            length = rec["cap_feats"].shape[0]
            np.testing.assert_array_equal(b["cap_feats"][r, :length], rec["cap_feats"])
            assert not b["cap_feats"][r, length:].any() and not b["cap_mask"][r, length:].any()
            np.testing.assert_array_equal(b["cap_mask"][r, :length], rec["cap_mask"])
            if b["valid"][r]:
                seen.add(sample_id)
    assert len(seen) == 23 == it.stats.samples


def test_training_batches_from_cache_mixed_mode_and_dropout(cache_dir):
    src = cache.LatentCacheSource(cache_dir)
    cfg = config(batching="mixed", caption_dropout=0.5, text_len=32)
    budget = (64 // 16) ** 2
    n_dropped = 0
    for b in DataPipeline(src, cfg):
        assert b["latents"].shape == (4, budget, 2 * 2 * 16) and b["cap_feats"].shape == (4, 32, D)
        for r, sample_id in enumerate(b["ids"]):
            rec = src.get(int(sample_id.split(":")[1]))
            h, w = b["image_sizes"][r]
            assert b["token_mask"][r].sum() == (h // 16) * (w // 16)
            latent = batching.unpatchify(b["latents"][r], (h // 8, w // 8), 2, 16)
            np.testing.assert_array_equal(latent, rec["latent"])
            if b["caption_dropped"][r]:
                n_dropped += int(b["valid"][r])
                assert b["prompts"][r] == ""
                np.testing.assert_array_equal(b["cap_feats"][r, :2], np.full((2, D), 0.5, BF16))
                np.testing.assert_array_equal(b["cap_mask"][r, :3], [True, False, False])
            else:
                assert b["prompts"][r] == rec["prompt"]
    assert 0 < n_dropped < 23


def test_dropout_needs_empty_prompt_features(tmp_path):
    cache.write_latent_cache(random_records(3), tmp_path, shard_size=5)
    with pytest.raises(ValueError, match="empty-prompt"):
        DataPipeline(cache.LatentCacheSource(tmp_path), config(caption_dropout=0.1))
    DataPipeline(cache.LatentCacheSource(tmp_path), config(caption_dropout=0.0))


def test_corrupt_cache_records_are_skipped_and_counted(tmp_path):
    good = [records.encode_record(cache.make_latent_record(**{
        k: v for k, v in r.items()})) for r in random_records(6)]
    bad = [b"garbage", records.encode_record({"schema": "something/else"})]
    name = records.shard_name(cache.LATENT_SHARD_PREFIX, 0)
    records.write_shard(tmp_path / name, good[:3] + bad + good[3:])
    records.write_json_atomic(tmp_path / "cache_info.json", {"num_records": 8, "shards": [name]})
    it = iter(DataPipeline(cache.LatentCacheSource(tmp_path, name="c"), config()))
    n = sum(int(b["valid"].sum()) for b in it)
    assert n == 6
    assert it.stats.skipped == {"c": {"bad_record": 2}}


def test_incomplete_cache_is_refused_unless_allowed(tmp_path):
    out = tmp_path / "cache"
    cache.write_latent_cache(random_records(11), out, shard_size=4)
    info = out / "cache_info.json"
    assert len(cache.LatentCacheSource(out)) == 11
    info.unlink()  # as after `preprocess --max-shards` or a crash: the shards so far, no cache_info.json
    with pytest.raises(cache.IncompleteCacheError, match=rf"{out} is incomplete: it has 3 complete shard\(s\) but "
                                                         r"no cache_info\.json .*preprocessing did not finish"):
        cache.LatentCacheSource(out)
    assert len(cache.LatentCacheSource(out, allow_incomplete=True)) == 11
    # Multi-host runs: per-process directories that were not merged; an interrupted merge.
    parts = tmp_path / "parts"
    (parts / "process-00000-of-00002").mkdir(parents=True)
    with pytest.raises(cache.IncompleteCacheError, match=r"per-process directories .*--merge --out"):
        cache.LatentCacheSource(parts)
    (parts / "merge_plan.json").write_text("{}")
    with pytest.raises(cache.IncompleteCacheError, match="merge of its per-process directories was interrupted"):
        cache.LatentCacheSource(parts)
    # cache_info.json names the shards that are read; one that vanished is an error.
    records.write_json_atomic(info, {"num_records": 8, "shards": ["latents-00000.array_record",
                                                                  "latents-00001.array_record"]})
    assert len(cache.LatentCacheSource(out)) == 8
    records.write_json_atomic(info, {"num_records": 12, "shards": ["latents-00000.array_record",
                                                                   "latents-00007.array_record"]})
    with pytest.raises(cache.IncompleteCacheError, match=r"1 are missing \(latents-00007\.array_record\)"):
        cache.LatentCacheSource(out)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        cache.LatentCacheSource(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------------
# Size index (record_sizes.npy, per-shard *.sizes.npy sidecars)


def expected_sizes(recs):
    return np.array([[r["latent"].shape[0] * 8, r["latent"].shape[1] * 8, r["cap_feats"].shape[0]] for r in recs],
                    np.int32)  # fmt: skip


def test_size_index_holds_each_records_crop_size_and_caption_length(cache_dir):
    want = expected_sizes(random_records(23))
    assert len({tuple(r[:2]) for r in want}) == 3 and len(set(want[:, 2])) > 3  # mixed sizes and lengths
    index = np.load(cache_dir / cache.RECORD_SIZES_FILE)
    assert index.dtype == np.int32
    np.testing.assert_array_equal(index, want)
    for k, shard in enumerate(records.list_shards(cache_dir, cache.LATENT_SHARD_PREFIX)):
        sidecar = cache_dir / shard.name.replace(".array_record", ".sizes.npy")
        assert cache.shard_sizes_path(shard) == sidecar
        np.testing.assert_array_equal(np.load(sidecar), want[5 * k: 5 * k + 5])
    src = cache.LatentCacheSource(cache_dir)
    sizes = src.record_sizes()
    np.testing.assert_array_equal(sizes, want)
    assert sizes.dtype == np.int32 and not sizes.flags.writeable and src.record_sizes() is sizes  # loaded once
    for i in (0, 7, 22):  # what the records themselves hold
        rec = src.get(i)
        assert [*rec["crop_size"], rec["cap_feats"].shape[0]] == sizes[i].tolist()
    clone = pickle.loads(pickle.dumps(src))
    assert clone._record_sizes is None  # not shipped to worker processes
    np.testing.assert_array_equal(clone.record_sizes(), want)


def test_size_index_resume_rebuilds_missing_sidecars(tmp_path):
    recs = random_records(11, seed=3)
    paths = cache.write_latent_cache(recs, tmp_path, shard_size=4)
    want = expected_sizes(recs)
    sidecars = [cache.shard_sizes_path(p) for p in paths]
    # A crash between a shard's rename and its sidecar's write (before cache_info.json), and a damaged
    # sidecar of another shard (one row short).
    sidecars[1].unlink()
    np.save(sidecars[2], want[8:10])
    (tmp_path / cache.CACHE_INFO_FILE).unlink()
    (tmp_path / cache.RECORD_SIZES_FILE).unlink()
    lazy = Lazy(recs)
    cache.write_latent_cache(lazy, tmp_path, shard_size=4)
    assert lazy.seen == []  # built from the shards' records, nothing encoded again
    np.testing.assert_array_equal(np.load(sidecars[1]), want[4:8])
    np.testing.assert_array_equal(np.load(sidecars[2]), want[8:])
    np.testing.assert_array_equal(cache.LatentCacheSource(tmp_path).record_sizes(), want)
    # A shard that is written again gets a fresh sidecar.
    paths[0].unlink()
    np.save(sidecars[0], np.zeros((4, 3), np.int32))
    cache.write_latent_cache(recs, tmp_path, shard_size=4)
    np.testing.assert_array_equal(np.load(tmp_path / cache.RECORD_SIZES_FILE), want)
    assert not list(tmp_path.glob(".*tmp"))


def test_record_sizes_without_index_is_none_and_index_latent_cache_restores_it(tmp_path):
    recs = random_records(13, seed=5)
    cache.write_latent_cache(recs, tmp_path, shard_size=4)
    want = np.load(tmp_path / cache.RECORD_SIZES_FILE)
    np.testing.assert_array_equal(want, expected_sizes(recs))
    # Without record_sizes.npy: assembled from the sidecars; without those too: None.
    (tmp_path / cache.RECORD_SIZES_FILE).unlink()
    np.testing.assert_array_equal(cache.LatentCacheSource(tmp_path).record_sizes(), want)
    sidecars = sorted(tmp_path.glob("latents-*.sizes.npy"))
    assert len(sidecars) == 4
    sidecars[3].unlink()
    assert cache.LatentCacheSource(tmp_path).record_sizes() is None
    for p in sidecars[:3]:
        p.unlink()
    assert cache.LatentCacheSource(tmp_path).record_sizes() is None
    path = cache.index_latent_cache(tmp_path, threads=2, progress=False)
    assert path == tmp_path / cache.RECORD_SIZES_FILE
    restored = np.load(path)
    assert restored.dtype == want.dtype and restored.shape == want.shape
    np.testing.assert_array_equal(restored, want)
    np.testing.assert_array_equal(cache.LatentCacheSource(tmp_path).record_sizes(), want)
    # Idempotent: sidecars that match their shards are kept as they are.
    stamps = [p.stat().st_mtime_ns for p in sidecars]
    cache.index_latent_cache(tmp_path, progress=False)
    assert [p.stat().st_mtime_ns for p in sidecars] == stamps
    np.testing.assert_array_equal(np.load(path), want)
    assert not list(tmp_path.glob(".*tmp"))


def test_mismatched_size_index_raises_naming_the_file(tmp_path):
    cache.write_latent_cache(random_records(9), tmp_path, shard_size=4)
    index = tmp_path / cache.RECORD_SIZES_FILE
    want = np.load(index)
    np.save(index, want[:-1])
    with pytest.raises(ValueError, match=rf"{index}: record size index of 8 records, but the cache has 9 "
                                         rf"records; rebuild it with `python -m lumina_jax preprocess --index "
                                         rf"--out {tmp_path}`"):  # fmt: skip
        cache.LatentCacheSource(tmp_path).record_sizes()
    np.save(index, want[:, :2])
    with pytest.raises(ValueError, match=rf"{index}: not a record size index .*\(9, 2\)"):
        cache.LatentCacheSource(tmp_path).record_sizes()
    cache.index_latent_cache(tmp_path, progress=False)  # the fix the message names
    np.testing.assert_array_equal(cache.LatentCacheSource(tmp_path).record_sizes(), want)
    # Assembled from sidecars that do not match the shards.
    index.unlink()
    np.save(tmp_path / "latents-00001.sizes.npy", want[:2])
    with pytest.raises(ValueError, match=r"size sidecars .* of the 3 shard\(s\) .*: record size index of 7 records"):
        cache.LatentCacheSource(tmp_path).record_sizes()


def test_index_of_corrupt_records_is_zero_and_incomplete_caches_are_refused(tmp_path, caplog):
    recs = random_records(6)
    good = [records.encode_record(cache.make_latent_record(**r)) for r in recs]
    bad = [b"garbage", records.encode_record({"schema": "something/else"})]
    name = records.shard_name(cache.LATENT_SHARD_PREFIX, 0)
    records.write_shard(tmp_path / name, good[:3] + bad + good[3:])
    records.write_json_atomic(tmp_path / "cache_info.json", {"num_records": 8, "shards": [name]})
    assert cache.LatentCacheSource(tmp_path).record_sizes() is None
    with caplog.at_level("WARNING", logger="lumina_jax.data.cache"):
        cache.index_latent_cache(tmp_path, progress=False)
    assert "2 of 8 record(s) could not be decoded" in caplog.text
    want = expected_sizes(recs)
    np.testing.assert_array_equal(cache.LatentCacheSource(tmp_path).record_sizes(),
                                  np.concatenate([want[:3], np.zeros((2, 3), np.int32), want[3:]]))  # fmt: skip
    (tmp_path / "cache_info.json").unlink()
    with pytest.raises(cache.IncompleteCacheError, match="is incomplete"):
        cache.index_latent_cache(tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        cache.index_latent_cache(tmp_path / "nope")


def test_per_host_batches_refuse_a_text_len_below_the_longest_cached_caption_at_start_up(tmp_path):
    """``batching: mixed`` with a fixed ``text_len`` (what several hosts need): a longer caption in the cache is
    refused when the pipeline is built, not at the step (on one host) whose batch first holds it."""
    rng = np.random.default_rng(0)
    recs = [{"latent": rng.standard_normal((4, 4, 16)).astype(np.float32),
             "cap_feats": rng.standard_normal((60 if i == 37 else 10, 8)).astype(np.float32),
             "cap_mask": np.ones(60 if i == 37 else 10, bool), "prompt": f"p{i}"} for i in range(40)]  # fmt: skip
    cache.write_latent_cache(recs, str(tmp_path), shard_size=16)
    src = cache.LatentCacheSource(str(tmp_path), name="c")
    kw = dict(resolution=32, batch_size=4, batching="mixed", shard_index=0, shard_count=1, caption_dropout=0.0,
              num_epochs=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"text_len=32 is shorter than the longest caption .* \(60 tokens\)"):
        DataPipeline(src, PipelineConfig(text_len=32, **kw))
    batches = list(DataPipeline(src, PipelineConfig(text_len=64, **kw)))
    assert len(batches) == 10 and {b["cap_feats"].shape[1] for b in batches} == {64}


def test_a_stage_warns_about_latent_caches_made_with_different_encoders(tmp_path, caplog):
    """A stage's caches should hold latents and caption features of the same encoders: caches whose
    ``made_with`` name another VAE or text encoder are warned about, naming the caches and the fields (a
    warning: the models are known by path only). Fields a cache does not record (older caches), the dtype
    and max_length are not compared."""
    import jax

    from lumina_jax.parallel.mesh import create_mesh
    from lumina_jax.train.config import load_config, load_model_config
    from lumina_jax.train.data import build_stage_iterator

    models = {"vae": "/models/flux/vae", "text_encoder": "/models/gemma", "tokenizer": "/models/tok", "dtype": "bf16"}
    made = {"models": models, "resolution": 64, "max_ratio": 4.0, "max_length": 256}
    recs = [{"latent": np.zeros((8, 8, 16)), "cap_feats": np.ones((3, 32)), "cap_mask": np.ones(3, bool),
             "prompt": f"p{i}"} for i in range(4)]  # fmt: skip
    empty = (np.zeros((1, 32)), np.ones(1, bool))
    for name, made_with in [("flux", made), ("flux_again", dict(made, models=dict(models, dtype="fp32"), max_length=128)),
                            ("older", None), ("sd3", dict(made, models=dict(models, vae="/models/sd3/vae")))]:  # fmt: skip
        cache.write_latent_cache(recs, tmp_path / name, shard_size=4, empty_prompt_features=empty, made_with=made_with)
    mesh = create_mesh({"data": 1}, devices=jax.devices()[:1])

    def build(*names):
        paths = "[" + ",".join(str(tmp_path / n) for n in names) + "]"
        cfg = load_config("tiny_synthetic", ["stages.0.data.kind=latent_cache", f"stages.0.data.paths={paths}"])
        return build_stage_iterator(cfg.stages[0], model_config=load_model_config(cfg), mesh=mesh, seed=0,
                                    stage_index=0)[0]  # fmt: skip

    with caplog.at_level("WARNING", logger="lumina_jax"):
        with build("flux", "flux_again", "older") as it:  # same models (another dtype and length), and one recording none
            assert next(it)["latents"].shape[1:] == (8, 8, 16)
        assert "different encoders" not in caplog.text
        with build("flux", "older", "sd3"):
            pass
    assert (f"stage 'low_res' mixes latent caches encoded with different encoders (models.vae: {tmp_path}/flux has "
            f"'/models/flux/vae', {tmp_path}/sd3 has '/models/sd3/vae')") in caplog.text
