"""The global bucket plan: hosts agree on every batch's crop size without talking to each other."""

import itertools
import json
import re

import numpy as np
import pytest

from lumina_jax.data import cache, records
from lumina_jax.data.pipeline import DataPipeline, NoUsableSampleError, PipelineConfig

D = 8
SIZES = [(64, 64), (32, 128), (128, 32), (48, 80), (80, 48)]


def make_records(n, seed=0, sizes=SIZES):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = sizes[int(rng.integers(len(sizes)))]
        length = int(rng.integers(2, 30))
        out.append({
            "latent": rng.standard_normal((h // 8, w // 8, 16)).astype(np.float32),
            "cap_feats": rng.standard_normal((length, D)).astype(np.float32),
            "cap_mask": np.ones(length, bool),
            "prompt": f"p{i}",
            "key": f"k{i}",
        })
    return out


EMPTY = (np.full((3, D), 0.25, np.float32), np.array([True, True, False]))


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    cache.write_latent_cache(make_records(61, seed=1), a, shard_size=16, empty_prompt_features=EMPTY)
    cache.write_latent_cache(make_records(37, seed=2), b, shard_size=16, empty_prompt_features=EMPTY)
    return a, b


def config(**kw):
    base = dict(resolution=128, batch_size=3, seed=5, shard_index=0, shard_count=1, num_epochs=1,
                caption_dropout=0.0, read_threads=2, bucket_window=24, probe_samples=4)  # fmt: skip
    base.update(kw)
    return PipelineConfig(**base)


def sources(caches):
    return [cache.LatentCacheSource(caches[0], name="a"), cache.LatentCacheSource(caches[1], name="b")]


def host_batches(caches, hosts, **kw):
    """Batches of each of ``hosts`` simulated hosts (lists of equal length)."""
    per_host = []
    for h in range(hosts):
        pipe = DataPipeline(sources(caches), config(shard_index=h, shard_count=hosts, **kw), weights=[2, 1])
        per_host.append(list(pipe))
    return per_host


def test_hosts_build_the_same_shapes_and_the_global_batches_do_not_depend_on_the_host_count(caches):
    two = host_batches(caches, 2, bucket_plan="global")
    assert len(two[0]) == len(two[1]) > 5
    for b0, b1 in zip(*two):
        for key in ("latents", "cap_feats", "cap_mask", "image_sizes", "valid"):
            assert b0[key].shape == b1[key].shape, key
    one = host_batches(caches, 1, batch_size=6, bucket_plan="global")[0]
    assert len(one) == len(two[0])
    for whole, b0, b1 in zip(one, *two):
        assert whole["ids"] == b0["ids"] + b1["ids"]
        np.testing.assert_array_equal(whole["latents"], np.concatenate([b0["latents"], b1["latents"]]))
        np.testing.assert_array_equal(whole["valid"], np.concatenate([b0["valid"], b1["valid"]]))
    # Per-host buckets, the old way, disagree somewhere: what the plan exists to prevent.
    apart = host_batches(caches, 2, bucket_plan="host")
    assert any(b0["latents"].shape != b1["latents"].shape for b0, b1 in zip(*apart))


def test_every_record_once_per_epoch_with_its_own_content(caches):
    srcs = sources(caches)
    per_host = host_batches(caches, 2, bucket_plan="global")
    seen = []
    text_lens = set()
    for batch in itertools.chain(*per_host):
        text_lens.add(batch["cap_feats"].shape[1])
        for r, sample_id in enumerate(batch["ids"]):
            name, index = sample_id.split(":")
            rec = srcs[name == "b"].get(int(index))
            np.testing.assert_array_equal(batch["latents"][r], rec["latent"])
            n = rec["cap_feats"].shape[0]
            np.testing.assert_array_equal(batch["cap_feats"][r, :n], rec["cap_feats"])
            assert not batch["cap_mask"][r, n:].any()
            if batch["valid"][r]:
                seen.append(sample_id)
    # The mixture ends with its first exhausted source (as per-host); nothing is delivered twice.
    assert len(seen) == len(set(seen)) > 40
    longest = max(int(s.record_sizes()[:, 2].max()) for s in srcs)
    assert text_lens == {-(-longest // 8) * 8}  # one caption length for the whole run


def test_resume_continues_exactly(caches):
    cfg = config(bucket_plan="global", shard_index=1, shard_count=2, num_epochs=None)
    it = iter(DataPipeline(sources(caches), cfg, weights=[2, 1]))
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(9)]
    again = iter(DataPipeline(sources(caches), cfg, weights=[2, 1]))
    again.set_state(state)
    got = [next(again) for _ in range(9)]
    for w, g in zip(want, got):
        assert w["ids"] == g["ids"]
        np.testing.assert_array_equal(w["latents"], g["latents"])
    assert state["config"]["bucket_plan"] == "global"
    host = iter(DataPipeline(sources(caches), config(bucket_plan="host", shard_index=1, shard_count=2, num_epochs=None),
                             weights=[2, 1]))  # fmt: skip
    with pytest.raises(ValueError, match=r"bucket_plan: 'global' -> None.*The bucket plan changed.*bucket_plan=host"):
        host.set_state(state)


def test_auto_uses_the_index_and_global_without_one_names_the_command(caches, tmp_path):
    assert DataPipeline(sources(caches), config()).bucket_plan == "global"
    assert DataPipeline(sources(caches), config(batching="mixed", text_len=32)).bucket_plan == "host"
    cache.write_latent_cache(make_records(5), tmp_path, shard_size=4)
    for f in [tmp_path / "record_sizes.npy", *tmp_path.glob("*.sizes.npy")]:
        f.unlink()
    bare = cache.LatentCacheSource(tmp_path, name="bare")
    assert bare.record_sizes() is None
    assert DataPipeline(bare, config()).bucket_plan == "host"
    with pytest.raises(ValueError, match=rf"{tmp_path} has no size index .*preprocess --index --out {tmp_path}"):
        DataPipeline(bare, config(bucket_plan="global"))
    with pytest.raises(ValueError, match="needs batching='bucket'"):
        config(bucket_plan="global", batching="mixed")


def _corrupt_cache(tmp_path, bad_positions, n=12):
    """A one-shard cache whose records at ``bad_positions`` are garbage, with a size index that lists them
    (as if they broke after indexing)."""
    recs = make_records(n, seed=3, sizes=[(64, 64)])
    name = records.shard_name(cache.LATENT_SHARD_PREFIX, 0)
    blobs = [records.encode_record(cache.make_latent_record(**r)) for r in recs]
    for p in bad_positions:
        blobs[p] = b"garbage"
    records.write_shard(tmp_path / name, blobs)
    sizes = np.asarray([[64, 64, r["cap_feats"].shape[0]] for r in recs], np.int32)
    np.save(tmp_path / "record_sizes.npy", sizes)
    records.write_json_atomic(tmp_path / "cache_info.json", {"num_records": n, "shards": [name]})
    return sizes


def test_unreadable_rows_become_padding_and_are_counted_by_their_host(tmp_path):
    _corrupt_cache(tmp_path, bad_positions=[2, 7])
    total_valid, skipped = 0, {}
    for h in range(2):
        it = iter(DataPipeline(cache.LatentCacheSource(tmp_path, name="c"),
                               config(bucket_plan="global", shard_index=h, shard_count=2, shuffle=False)))  # fmt: skip
        for batch in it:
            assert batch["latents"].shape == (3, 8, 8, 16)
            for r, sample_id in enumerate(batch["ids"]):
                if sample_id in ("c:2", "c:7"):
                    assert not batch["valid"][r]
            total_valid += int(batch["valid"].sum())
        for reason, n in it.stats.skipped.get("c", {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert total_valid == 10 and skipped == {"bad_record": 2}


def test_a_batch_with_no_readable_record_is_all_padding_not_an_error(tmp_path, caplog):
    """The size index reads headers only, so a corrupt record is planned; when it is its crop size's
    only record, no row of that global batch reads: every host gets an all-padding batch of the planned
    size (the run went on with the per-host plan, but stopped with the global one)."""
    recs = make_records(7, seed=3, sizes=[(64, 64)]) + make_records(1, seed=4, sizes=[(32, 128)])
    name = records.shard_name(cache.LATENT_SHARD_PREFIX, 0)
    blobs = [records.encode_record(cache.make_latent_record(**r)) for r in recs]
    blobs[7] = b"garbage"  # the only 32 x 128 record
    records.write_shard(tmp_path / name, blobs)
    np.save(tmp_path / "record_sizes.npy",
            np.asarray([[r["latent"].shape[0] * 8, r["latent"].shape[1] * 8, len(r["cap_mask"])] for r in recs], np.int32))
    records.write_json_atomic(tmp_path / "cache_info.json", {"num_records": 8, "shards": [name]})
    per_host = []
    with caplog.at_level("WARNING", logger="lumina_jax.data"):
        for h in range(2):
            it = iter(DataPipeline(cache.LatentCacheSource(tmp_path, name="c"),
                                   config(bucket_plan="global", shard_index=h, shard_count=2, batch_size=2,
                                          drop_incomplete=False, text_len=32)))  # fmt: skip
            per_host.append((list(it), it.stats))
    for batches, stats in per_host:
        blank = [b for b in batches if b["latents"].shape[1:3] == (4, 16)]
        assert len(blank) == 1 and not blank[0]["valid"].any() and not blank[0]["latents"].any()
    assert sum(int(b["valid"].sum()) for bs, _ in per_host for b in bs) == 7
    assert sum(st.total_skipped(reason="bad_record") for _, st in per_host) == 1
    assert "an all-padding batch" in caplog.text


def test_index_rows_of_unreadable_records_are_left_out_and_counted_once(tmp_path):
    sizes = _corrupt_cache(tmp_path, bad_positions=[4])
    sizes[4] = 0  # what index_latent_cache writes for a record it could not read
    np.save(tmp_path / "record_sizes.npy", sizes)
    counts = []
    for h in range(2):
        it = iter(DataPipeline(cache.LatentCacheSource(tmp_path, name="c"),
                               config(bucket_plan="global", shard_index=h, shard_count=2)))  # fmt: skip
        ids = [i for b in it for i, v in zip(b["ids"], b["valid"]) if v]
        assert "c:4" not in ids
        counts.append(it.stats.total_skipped())
    assert counts == [1, 0]  # shard 0 reports the plan's skips, so the hosts' counters sum to the total


def test_a_stale_index_fails_at_start_up_and_mid_run_costs_a_counted_row(tmp_path, caplog):
    sizes = _corrupt_cache(tmp_path, bad_positions=[])
    good = sizes.copy()
    sizes[5, :2] = (32, 128)  # past the probe (4 records): found when read
    np.save(tmp_path / "record_sizes.npy", sizes)
    it = iter(DataPipeline(cache.LatentCacheSource(tmp_path, name="c"), config(bucket_plan="global", shuffle=False)))
    with caplog.at_level("WARNING"):
        batches = list(it)
    # Raising would stop only the host that read it (the others would wait in a collective): a padding row.
    assert it.stats.skipped == {"c": {"stale_index": 1}}
    assert "c:5" not in [i for b in batches for i, v in zip(b["ids"], b["valid"]) if v]
    assert re.search(r"record 5 of latent cache .* is \(64, 64, \d+\) .* but its size index says \(32, 128, \d+\).*"
                     r"preprocess --index.*counted as stale_index", caplog.text)  # fmt: skip
    # Records among the probed ones fail at start-up: a caption length that disagrees...
    sizes = good.copy()
    sizes[1, 2] += 1
    np.save(tmp_path / "record_sizes.npy", sizes)
    with pytest.raises(ValueError, match=r"record 1 of latent cache .* size index says \(64, 64, \d+\): the index is stale"):
        DataPipeline(cache.LatentCacheSource(tmp_path, name="c"), config(bucket_plan="global", shuffle=False))
    # ... and a readable record the index calls unreadable (the plan would never train on it).
    sizes = good.copy()
    sizes[2] = 0
    np.save(tmp_path / "record_sizes.npy", sizes)
    with pytest.raises(ValueError, match=r"record 2 of latent cache .* is readable .* says unusable"):
        DataPipeline(cache.LatentCacheSource(tmp_path, name="c"), config(bucket_plan="global", shuffle=False))


def test_text_len_shorter_than_the_longest_indexed_caption_fails_at_start_up(caches):
    longest = max(int(s.record_sizes()[:, 2].max()) for s in sources(caches))
    with pytest.raises(ValueError, match=rf"text_len={longest - 1} is shorter than the longest caption .*{longest} "
                                         r"tokens.*stages\.N\.data\.text_len"):  # fmt: skip
        DataPipeline(sources(caches), config(bucket_plan="global", text_len=longest - 1))
    batch = next(iter(DataPipeline(sources(caches), config(bucket_plan="global", text_len=longest + 3))))
    assert batch["cap_feats"].shape[1] == longest + 3


def test_the_default_window_counts_global_samples_and_the_fingerprint_says_so(caches):
    pipe = DataPipeline(sources(caches), config(bucket_plan="global", shard_index=1, shard_count=2))
    assert pipe.fingerprint["bucket_window"] == 24
    default = DataPipeline(sources(caches), config(bucket_plan="global", shard_index=1, shard_count=2, bucket_window=None))
    assert default.fingerprint["bucket_window"] == 64 * 3 * 2
    with pytest.raises(ValueError, match=r"bucket_window \(5\) must be >= the global batch \(6 = 3 rows x 2 hosts\)"):
        DataPipeline(sources(caches), config(bucket_plan="global", shard_index=1, shard_count=2, bucket_window=5))


def test_a_run_of_unreadable_records_stops_with_the_limit_named(tmp_path):
    _corrupt_cache(tmp_path, bad_positions=list(range(12)))
    pipe = DataPipeline(cache.LatentCacheSource(tmp_path, name="c"),
                        config(bucket_plan="global", max_consecutive_skips=2, probe_samples=0))  # fmt: skip
    with pytest.raises(NoUsableSampleError, match=r"2 records in a row could not be read.*limit \(2\)"):
        list(pipe)


def test_the_trainer_uses_the_global_plan_on_several_hosts_and_names_the_index_command(caches, tmp_path, monkeypatch):
    import jax

    from lumina_jax.parallel.mesh import create_mesh
    from lumina_jax.train import data as train_data
    from lumina_jax.train.config import DataConfig, StageConfig
    from lumina_jax.train.config import load_model_config, load_config

    # the caches hold 8-wide caption features: a model of that width (the trainer checks it)
    model_config = load_model_config(load_config("tiny_synthetic", [])).replace(cap_feat_dim=EMPTY[0].shape[-1])
    mesh = create_mesh({"data": 1}, devices=jax.devices()[:1])
    monkeypatch.setattr(train_data, "process_rows", lambda batch, mesh: (batch // 2, batch, 1, 2))  # host 1 of 2

    def build(path, dropout=0.0, **kw):
        data = DataConfig(kind="latent_cache", paths=(str(path),), caption_dropout=dropout, **kw)
        stage = StageConfig(name="s", resolution=128, batch=6, data=data)
        return train_data.build_stage_iterator(stage, model_config=model_config, mesh=mesh, seed=0, stage_index=0)

    it, _ = build(caches[0])
    assert it.get_state()["config"]["bucket_plan"] == "global"
    batch = next(it)
    assert batch["latents"].shape[0] == 3
    cache.write_latent_cache(make_records(4), tmp_path, shard_size=4)  # indexed, no empty-prompt features
    with pytest.raises(ValueError, match="empty-prompt") as err:  # other errors are not blamed on the index
        build(tmp_path, dropout=0.1)
    assert "size index" not in str(err.value)
    for f in [tmp_path / "record_sizes.npy", *tmp_path.glob("*.sizes.npy")]:
        f.unlink()
    with pytest.raises(ValueError, match=rf"stage 's': 2 hosts .*global bucket plan.*preprocess --index --out {tmp_path}"):
        build(tmp_path)


def test_plan_benchmark_runs_and_reports_padding(tmp_path, capsys):
    from lumina_jax.bench import data as bench_cli

    assert bench_cli.main(["--plan-records", "20000", "--batch", "64", "--res", "256",
                           "--json", str(tmp_path / "plan.json")]) == 0  # fmt: skip
    row = json.loads((tmp_path / "plan.json").read_text())[0]
    assert row["records"] == 20000 and row["global_batch"] == 64 and 0.9 < row["real_rows"] <= 1.0
    assert row["ms_per_batch"] > 0 and row["restore_s"] >= 0
    assert "real_rows" in capsys.readouterr().out


def test_a_checkpoint_of_two_hosts_resumes_on_one_host_with_the_global_plan(caches, tmp_path):
    """The global plan's state does not depend on the host count: a checkpoint written by 2 processes (one
    data-iterator JSON each) restores into 1 process, which continues with the same global batches as an
    uninterrupted 1-process run. Per-host states are refused with the reason."""
    import jax

    from lumina_jax.train.checkpoint import DataStateMismatchError, RunCheckpoints

    def pipe(hosts, index=0, plan="global"):
        cfg = config(bucket_plan=plan, shard_index=index, shard_count=hosts, batch_size=6 // hosts,
                     num_epochs=None)  # fmt: skip
        return iter(DataPipeline(sources(caches), cfg, weights=[2, 1]))

    two = [pipe(2, h) for h in range(2)]
    for it in two:
        for _ in range(5):
            next(it)
    one = pipe(1)
    for _ in range(5):
        next(one)
    want = [next(one)["ids"] for _ in range(4)]

    ck = RunCheckpoints(tmp_path / "ck", async_save=False)
    target = {"w": np.arange(3, dtype=np.float32)}
    ck.save(5, target, {"step": 5}, two[0])
    folder = tmp_path / "ck" / "5" / "data_iter"
    (folder / "process_0-of-1.json").unlink()
    for h, it in enumerate(two):  # what two processes would have written
        (folder / f"process_{h}-of-2.json").write_text(json.dumps(it.get_state()))
    restored = pipe(1)
    state, meta = ck.restore(5, jax.eval_shape(lambda: target), restored)
    np.testing.assert_array_equal(np.asarray(state["w"]), target["w"])
    # the one process's counters are the sum of the two it replaces
    assert restored.stats.samples == two[0].stats.samples + two[1].stats.samples > 0
    assert [next(restored)["ids"] for _ in range(4)] == want

    host = iter(DataPipeline(sources(caches), config(bucket_plan="host", shard_index=0, shard_count=2,
                                                     num_epochs=None), weights=[2, 1]))  # fmt: skip
    next(host)
    (folder / "process_0-of-2.json").write_text(json.dumps(host.get_state()))
    with pytest.raises(DataStateMismatchError, match=r"another number of processes .*per-host slice.*shard_count: 2 -> 1"):
        ck.restore(5, jax.eval_shape(lambda: target), pipe(1, plan="host"))
    ck.close()


def test_read_ahead_submits_the_next_batches_before_collating_and_keeps_an_exact_state():
    """``ReadAhead``: reads of the next ``depth`` plan batches are in flight while one is collated; its
    state is the position of the oldest batch not yet returned (nothing skipped or repeated on resume)."""
    import grain

    from lumina_jax.data.global_plan import ReadAhead

    events = []

    class Rows:
        def submit(self, plan):
            events.append(("submit", plan))
            return plan, None

        def finish(self, pending):
            events.append(("finish", pending[0]))
            return {"plan": pending[0]}

        def restart_skip_run(self):
            events.append(("restart", None))

    plans = grain.MapDataset.range(7).to_iter_dataset()
    it = iter(ReadAhead(plans, Rows(), depth=2))
    assert next(it)["plan"] == 0
    assert events == [("submit", 0), ("submit", 1), ("submit", 2), ("finish", 0)]  # 1 and 2 read meanwhile
    state = it.get_state()
    rest = [b["plan"] for b in it]
    assert rest == [1, 2, 3, 4, 5, 6]
    again = iter(ReadAhead(plans, Rows(), depth=2))
    again.set_state(state)
    assert [b["plan"] for b in again] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="depth must be >= 1"):
        ReadAhead(plans, Rows(), depth=0)
    end = iter(ReadAhead(plans, Rows(), depth=2))
    assert len(list(end)) == 7
    after_end = iter(ReadAhead(plans, Rows(), depth=2))
    after_end.set_state(end.get_state())
    assert list(after_end) == []

    # An error of the plan comes after the batches before it, as without read-ahead.
    def plan_then_fail(i):
        if i == 3:
            raise NoUsableSampleError("plan failed")
        return i

    failing = iter(ReadAhead(plans.map(plan_then_fail), Rows(), depth=2))
    got = [next(failing)["plan"] for _ in range(3)]
    with pytest.raises(NoUsableSampleError, match="plan failed"):
        next(failing)
    assert got == [0, 1, 2]


def test_host_rows_read_in_the_pool_when_submitted_ahead():
    """Submitted for read-ahead, even one record on one read thread goes to the pool (else the reads of
    the next batches would run before this one is collated, in the same thread)."""
    import concurrent.futures

    from lumina_jax.data.global_plan import HostRows

    rows = HostRows([lambda key: {"key": key}], [None], (0, 1), collate=None, count_plan_skips=False, read_threads=1)
    plan = {"plan_refs": [(0, 0, 5, 3)], "image_size": (64, 64)}
    _, ahead = rows.submit(plan)
    assert [type(f) for f in ahead.loaded] == [concurrent.futures.Future]
    assert ahead.samples() == [{"key": (0, 5)}]
    _, serial = rows.submit(plan, background=False)  # the map over plan batches (worker processes)
    assert serial.loaded == [{"key": (0, 5)}]


def test_moving_the_read_ahead_restarts_the_run_of_skips():
    """set_state puts the iterator where a restarted run would be: its count of unreadable rows in a
    row starts from zero (a resumed run must not stop earlier than a fresh one)."""
    import grain

    from lumina_jax.data.global_plan import HostRows, ReadAhead

    class Rows(HostRows):
        def __init__(self):  # only the skip counter matters here
            self._consecutive = 0

        def submit(self, plan, background=True):
            return plan, None

        def finish(self, pending):
            self._consecutive += 1  # as if every row were unreadable
            return pending[0]

    rows = Rows()
    it = iter(ReadAhead(grain.MapDataset.range(5).to_iter_dataset(), rows))
    assert next(it) == 0 and next(it) == 1 and rows._consecutive == 2
    state = it.get_state()
    assert next(it) == 2
    it.set_state(state)
    assert rows._consecutive == 0 and next(it) == 2 and rows._consecutive == 1
