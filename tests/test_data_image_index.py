"""Image size indexes: the global bucket plan over raw images (several hosts train on JSONL/TFDS data)."""

import json

import numpy as np
import pytest

from lumina_jax.data import image_index, testing
from lumina_jax.data.cli import main as preprocess_main
from lumina_jax.data.pipeline import DataPipeline, MissingSizeIndexError, PipelineConfig
from lumina_jax.data.sources import ConcatSource, JsonlSource, ListSource, TfdsSource, load_yaml_sources


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """30 items (24 usable of 9 sizes, 6 broken in known ways) and the JSONL naming them, indexed."""
    jsonl, items = testing.make_test_dataset(tmp_path_factory.mktemp("images"), seed=3)
    image_index.index_image_source(JsonlSource(jsonl), threads=2, progress=False)
    return jsonl, items


def config(**kw):
    base = dict(resolution=64, batch_size=3, seed=5, shard_index=0, shard_count=1, num_epochs=1,
                caption_dropout=0.0, read_threads=2, bucket_window=24, probe_samples=4, bucket_plan="global")  # fmt: skip
    base.update(kw)
    return PipelineConfig(**base)


def run(jsonl, **kw):
    it = iter(DataPipeline([JsonlSource(jsonl)], config(**kw)))
    return list(it), it.stats


def test_index_rows_are_the_header_sizes_and_the_loaders_skip_reasons(dataset):
    jsonl, items = dataset
    sizes = JsonlSource(jsonl).record_sizes()
    assert sizes.dtype == np.int32 and sizes.shape == (len(items), 3)
    assert isinstance(sizes, np.memmap)  # mapped, not loaded per process
    for item, (h, w, code) in zip(items, sizes):
        if item.expected_skip is None or item.defect == "truncated":  # a truncated file's header is intact
            assert (h, w, code) == (item.height, item.width, 0), item.file
        else:
            assert (h, w) == (0, 0) and image_index.reason_of(int(code)) == item.expected_skip, item.file


def test_two_hosts_rows_make_the_one_host_batch_and_skips_add_up(dataset, caplog):
    jsonl, items = dataset
    with caplog.at_level("WARNING", logger="lumina_jax.data"):
        one, stats_one = run(jsonl, batch_size=6)
    # records the size index marks unusable are named by their file, not only "data:<n>"
    planned_skips = [line for line in caplog.text.splitlines() if "(size index)" in line]
    assert planned_skips and all(".png" in line or ".jpg" in line for line in planned_skips), planned_skips
    two = [run(jsonl, shard_index=h, shard_count=2) for h in range(2)]
    (b0s, s0), (b1s, s1) = two
    assert len(one) == len(b0s) == len(b1s) > 3
    for whole, b0, b1 in zip(one, b0s, b1s):
        assert b0["images"].shape == b1["images"].shape  # one program on every host
        assert whole["ids"] == b0["ids"] + b1["ids"]
        np.testing.assert_array_equal(whole["images"], np.concatenate([b0["images"], b1["images"]]))
        np.testing.assert_array_equal(whole["valid"], np.concatenate([b0["valid"], b1["valid"]]))
    assert len({b["images"].shape for b in one}) > 3  # several crop sizes
    # Every usable record once, and the skips counted as the per-host pipeline counts them.
    ids = [i for b in one for i, v in zip(b["ids"], b["valid"]) if v]
    assert len(ids) == len(set(ids)) == sum(it.expected_skip is None for it in items)
    expected = {}
    for it in items:
        if it.expected_skip:
            expected[it.expected_skip] = expected.get(it.expected_skip, 0) + 1
    _, host_stats = run(jsonl, batch_size=6, bucket_plan="host")
    assert stats_one.skipped == host_stats.skipped == {"data": expected}
    merged = {k: s0.skipped["data"].get(k, 0) + s1.skipped["data"].get(k, 0) for k in expected}
    assert merged == expected  # the plan's skips on shard 0, read failures where they were read
    # The crop size each row was planned with is the one the loader made from the decoded image.
    for b in one:
        assert {tuple(s) for s in b["image_sizes"]} == {b["images"].shape[1:3]}



def test_records_the_index_marks_unusable_are_read_only_to_name_the_logged_skips(dataset, caplog):
    """Every host walks the whole global plan, skips included; naming a skipped record reads it, which only
    the skips that are logged need (shard 0 logs the plan's skips, the first few): host 1 reads none of them."""
    jsonl, _ = dataset

    class Counting(JsonlSource):
        def __init__(self, path):
            super().__init__(path)
            self.reads = []

        def get(self, index):
            self.reads.append(index)
            return super().get(index)

    sizes = np.asarray(JsonlSource(jsonl).record_sizes())
    unusable = set(np.flatnonzero((sizes[:, 2] > 0) | (sizes[:, 0] <= 0)).tolist())
    assert len(unusable) >= 4
    for host in (1, 0):
        source = Counting(jsonl)
        with caplog.at_level("WARNING", logger="lumina_jax.data"):
            caplog.clear()
            batches = list(DataPipeline([source], config(shard_index=host, shard_count=2, probe_samples=0)))
        assert batches and not unusable & {i for b in batches for i in (int(x.split(":")[1]) for x in b["ids"])}
        named = [line for line in caplog.text.splitlines() if "(size index)" in line]
        read = [i for i in source.reads if i in unusable]
        if host == 1:
            assert read == [] and named == []
        else:  # the logged ones, each once
            assert len(read) == len(named) == len(set(read)) > 0

def test_resume_is_exact(dataset):
    jsonl, _ = dataset
    pipe = DataPipeline([JsonlSource(jsonl)], config(batch_size=4, num_epochs=None))
    it = iter(pipe)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    again = iter(DataPipeline([JsonlSource(jsonl)], config(batch_size=4, num_epochs=None)))
    again.set_state(json.loads(json.dumps(state)))
    for a, b in zip(want, [next(again) for _ in range(4)]):
        assert a["ids"] == b["ids"]
        np.testing.assert_array_equal(a["images"], b["images"])


def test_ratio_and_yaml_sources_use_the_files_index(dataset, tmp_path):
    jsonl, _ = dataset
    full = np.asarray(JsonlSource(jsonl).record_sizes())
    every = JsonlSource(jsonl)
    for ratio, n in ((1.5, 45), (0.3, 9)):
        part = JsonlSource(jsonl, ratio=ratio)
        assert len(part) == n and [part.get(i).key for i in range(n)] == [every.get(r).key for r in part._rows]
        np.testing.assert_array_equal(part.record_sizes(), full[part._rows])
    meta = tmp_path / "meta.yaml"
    meta.write_text(f"META:\n  - path: {jsonl}\n    ratio: 0.5\n  - path: {jsonl}\n    name: again\n")
    both = ConcatSource(load_yaml_sources(meta))
    sizes = both.record_sizes()
    assert sizes.shape == (15 + 30, 3)
    np.testing.assert_array_equal(sizes[15:], full)
    assert DataPipeline(load_yaml_sources(meta), config()).bucket_plan == "global"


def test_a_yaml_root_gets_its_own_index_and_the_messages_name_the_yaml(dataset, tmp_path, capsys):
    """The same file under another ``root`` names other images: its index is its own, built through the YAML."""
    jsonl, _ = dataset
    moved = tmp_path / "lists" / "data.jsonl"  # relative paths now resolve only against the YAML's root
    moved.parent.mkdir()
    moved.write_text(jsonl.read_text())
    meta = tmp_path / "meta.yaml"
    meta.write_text(f"META:\n  - path: lists/data.jsonl\n    root: {jsonl.parent}\n")
    with pytest.raises(MissingSizeIndexError, match=rf"preprocess --index --data {meta}`"):
        DataPipeline(load_yaml_sources(meta), config())
    both = ConcatSource(load_yaml_sources(meta) + [JsonlSource(moved)], name="both")
    with pytest.raises(MissingSizeIndexError, match=rf"'both' has no size index .*--data {meta} --data {moved}`"):
        DataPipeline(both, config())
    assert preprocess_main(["--index", "--data", str(meta), "--no-progress"]) == 0
    (written,) = [line.split()[3].rstrip(":") for line in capsys.readouterr().out.splitlines()]
    assert written.startswith(f"{moved}.root-") and written.endswith(".image_sizes.npy")
    np.testing.assert_array_equal(load_yaml_sources(meta)[0].record_sizes(), JsonlSource(jsonl).record_sizes())
    assert JsonlSource(moved).record_sizes() is None  # the file under its own folder is another source
    with pytest.raises(MissingSizeIndexError, match=rf"--data {meta} --data {moved}`"):
        DataPipeline(both, config())
    # In an index folder the root's own index stays apart from the file's.
    ix = tmp_path / "ix"
    assert preprocess_main(["--index", "--data", str(meta), "--data", str(moved), "--index-dir", str(ix),
                            "--no-progress"]) == 0  # fmt: skip
    names = sorted(p.name for p in ix.iterdir())
    assert len(names) == 2 and names[0].startswith("data.jsonl.") and names[1].startswith("data.jsonl.root-"), names
    from_yaml = load_yaml_sources(meta)[0]
    image_index.set_index_dir(from_yaml, ix)
    np.testing.assert_array_equal(from_yaml.record_sizes(), JsonlSource(jsonl).record_sizes())


def test_the_probe_refuses_an_index_that_leaves_readable_images_out(dataset, tmp_path):
    """Images missing when the index was built and back now would never be trained on: an error at start-up."""
    jsonl, items = dataset
    copy = tmp_path / "copy.jsonl"
    copy.write_text(jsonl.read_text().replace('"images/', f'"{jsonl.parent}/images/'))
    sizes = np.asarray(JsonlSource(jsonl).record_sizes()).copy()
    first = int(np.flatnonzero(sizes[:, 2] == 0)[0])
    sizes[first] = (0, 0, 1 + image_index.SKIP_REASONS.index("missing"))
    image_index.save_index(str(copy) + image_index.IMAGE_SIZES_SUFFIX, sizes)
    with pytest.raises(ValueError, match=rf"record {first} of 'copy' is readable but its size index says unusable "
                                         r"\(missing\).*preprocess --index --data"):  # fmt: skip
        DataPipeline([JsonlSource(copy)], config())


def test_an_image_changed_after_indexing_is_a_counted_padding_row(dataset, tmp_path, caplog):
    jsonl, items = dataset
    folder = tmp_path / "images"
    folder.mkdir()
    for it in items:
        if (jsonl.parent / "images" / it.file).exists():
            (folder / it.file).write_bytes((jsonl.parent / "images" / it.file).read_bytes())
    copy = tmp_path / "data.jsonl"
    copy.write_text(jsonl.read_text())
    image_index.index_image_source(JsonlSource(copy), progress=False)
    sizes = JsonlSource(copy).record_sizes()
    late = int(np.flatnonzero(sizes[:, 2] == 0)[-1])  # past the probe
    assert late >= 4
    h, w = int(sizes[late, 0]), int(sizes[late, 1])
    testing.make_image(4 * h, w, "RGB").save(folder / items[late].file)  # another aspect ratio, same name
    with caplog.at_level("WARNING"):
        it = iter(DataPipeline([JsonlSource(copy)], config(batch_size=6)))
        batches = list(it)
    assert it.stats.skipped["data"]["stale_index"] == 1 and "counted as stale_index" in caplog.text
    assert f"data:{late}" not in [i for b in batches for i, v in zip(b["ids"], b["valid"]) if v]


def test_decoded_arrays_are_judged_as_the_loader_judges_them():
    from lumina_jax.data.sources import RawItem

    def row(array):
        return image_index.raw_item_size(RawItem(key="k", caption="c", system_prompt="base", image=array))

    assert row(np.zeros((5, 7, 3), np.uint8)) == (5, 7, 0)
    assert row(np.zeros((5, 7, 1), np.uint8)) == (5, 7, 0)
    assert row(np.zeros((5, 7), bool)) == (5, 7, 0)  # mode "1", which the loader converts
    assert image_index.reason_of(row(np.zeros((5, 7, 5), np.uint8))[2]) == "undecodable"
    assert image_index.reason_of(row(np.zeros((5, 7), np.float64))[2]) == "unsupported_mode"


def test_missing_and_stale_indexes_are_refused_with_the_fix(dataset, tmp_path):
    jsonl, _ = dataset
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text(jsonl.read_text().replace("images/", f"{jsonl.parent}/images/"))
    with pytest.raises(MissingSizeIndexError, match=rf"has no size index .*preprocess --index --data {fresh}"):
        DataPipeline([JsonlSource(fresh)], config())
    assert DataPipeline([JsonlSource(fresh)], config(bucket_plan="auto")).bucket_plan == "host"
    with pytest.raises(MissingSizeIndexError, match="ListSource.*cannot have a size index"):
        DataPipeline([ListSource([{"image": b"", "caption": "c"}])], config())
    with pytest.raises(ValueError, match="cannot have a size index"):
        image_index.index_image_source(ListSource([{"image": b"", "caption": "c"}]), progress=False)
    # An index of another record count: named with its file and the command.
    sizes = np.asarray(JsonlSource(jsonl).record_sizes())
    image_index.save_index(str(fresh) + image_index.IMAGE_SIZES_SUFFIX, sizes[:-1])
    with pytest.raises(ValueError, match=r"29 rows but .*30 records.*stale.*preprocess --index --data"):
        DataPipeline([JsonlSource(fresh)], config())
    # Right count, wrong sizes (the data changed): the start-up probe decodes the first records.
    first = int(np.flatnonzero((sizes[:, 2] == 0) & (sizes[:, 0] != sizes[:, 1]))[0])
    assert first < 4  # inside the probe
    wrong = sizes.copy()
    wrong[first, :2] = wrong[first, 1::-1]  # H and W swapped: another crop size
    image_index.save_index(str(fresh) + image_index.IMAGE_SIZES_SUFFIX, wrong)
    with pytest.raises(ValueError, match=rf"record {first} of 'fresh' crops to .* size index says .*stale"):
        DataPipeline([JsonlSource(fresh)], config())


def test_cli_indexes_data_paths(dataset, tmp_path, capsys):
    jsonl, items = dataset
    copy = tmp_path / "copy.jsonl"
    copy.write_text(jsonl.read_text().replace("images/", f"{jsonl.parent}/images/"))
    assert preprocess_main(["--index", "--data", str(copy), "--no-progress", "--read-threads", "3"]) == 0
    out = capsys.readouterr().out
    assert f"image size index {copy}.image_sizes.npy: 30 records" in out and "5 unusable records" in out
    np.testing.assert_array_equal(JsonlSource(copy).record_sizes(), JsonlSource(jsonl).record_sizes())
    assert preprocess_main(["--data", str(copy), "--no-progress"]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert preprocess_main(["--index", "--data", str(copy), "--out", str(tmp_path)]) == 2
    assert "--data (index raw images) or --out (index a latent cache), not both" in capsys.readouterr().err
    with pytest.raises(PermissionError, match=r"cannot write the image size index .*nowhere"):
        image_index.check_writable(tmp_path / "nowhere" / "x.image_sizes.npy")


def test_tfds_source_index(tmp_path):
    from lumina_jax.data import tfds_folder

    folder = tmp_path / "folder"
    folder.mkdir()
    for i, (w, h) in enumerate([(40, 30), (30, 90), (64, 64), (90, 30)]):
        testing.make_image(w, h, "RGB", i).save(folder / f"im{i}.png")
        (folder / f"im{i}.txt").write_text(f"caption {i}\n")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "broken.txt").write_text("broken\n")
    builder_dir = tfds_folder.prepare_captioned_image_folder(folder, tmp_path / "tfds")
    src = TfdsSource(builder_dir=builder_dir, key_key="key")
    assert src.record_sizes() is None
    (path,) = image_index.index_image_source(src, threads=1, progress=False)
    assert path.name == "train.image_sizes.npy" and str(path.parent) == str(builder_dir)
    sizes = TfdsSource(builder_dir=builder_dir, key_key="key").record_sizes()
    by_key = {src.get(i).key: tuple(int(v) for v in sizes[i]) for i in range(len(src))}
    assert by_key["im1.png"] == (90, 30, 0) and by_key["im3.png"] == (30, 90, 0)
    assert image_index.reason_of(by_key["broken.jpg"][2]) == "undecodable"
    batches = list(DataPipeline(TfdsSource(builder_dir=builder_dir), config(batch_size=2)))
    assert sum(int(b["valid"].sum()) for b in batches) == 4
    # In an index folder: named after the split, the same rows.
    moved = TfdsSource(builder_dir=builder_dir, key_key="key")
    image_index.set_index_dir(moved, tmp_path / "ix")
    (tmp_path / "ix").mkdir()
    (path,) = image_index.index_image_source(moved, threads=1, progress=False)
    assert path.parent == tmp_path / "ix" and path.name.startswith("train.") and path.name.endswith(".image_sizes.npy")
    np.testing.assert_array_equal(moved.record_sizes(), sizes)


def test_array_record_folder_index(dataset, tmp_path):
    from lumina_jax.data.sources import ArrayRecordImageSource, write_image_records

    jsonl, items = dataset
    usable = [it for it in items if it.expected_skip is None][:6]
    write_image_records([{"image_path": str(jsonl.parent / "images" / it.file), "caption": it.caption}
                         for it in usable], tmp_path / "ar", shard_size=4)  # fmt: skip
    src = ArrayRecordImageSource(tmp_path / "ar")
    (path,) = image_index.index_image_source(src, threads=2, progress=False)
    assert path == tmp_path / "ar" / "image_sizes.npy"
    np.testing.assert_array_equal(src.record_sizes(), [(it.height, it.width, 0) for it in usable])
    shards = sorted((tmp_path / "ar").glob("*.array_record"))
    assert ArrayRecordImageSource(shards).record_sizes() is None  # a list of files has no index
    # training's data paths take such a folder too (as preprocess --data does)
    from lumina_jax.train.data import image_sources

    (train_src,) = image_sources(str(tmp_path / "ar"))
    assert isinstance(train_src, ArrayRecordImageSource) and len(train_src) == len(usable)


def test_plan_digest_tells_indexes_apart(dataset, tmp_path):
    """What the trainer compares across processes before planning (a differing copy would hang them)."""
    from lumina_jax.data.global_plan import plan_digest

    jsonl, _ = dataset
    copy = tmp_path / "data.jsonl"
    copy.write_text(jsonl.read_text().replace('"images/', f'"{jsonl.parent}/images/'))
    sizes = np.asarray(JsonlSource(jsonl).record_sizes()).copy()
    image_index.save_index(str(copy) + image_index.IMAGE_SIZES_SUFFIX, sizes)
    a = plan_digest([JsonlSource(jsonl)])
    assert a.dtype == np.uint32 and a.shape == (8,)
    np.testing.assert_array_equal(plan_digest([JsonlSource(jsonl)]), a)
    np.testing.assert_array_equal(plan_digest([JsonlSource(copy, name="data")]), a)  # same data elsewhere
    sizes[7, :2] += 16
    image_index.save_index(str(copy) + image_index.IMAGE_SIZES_SUFFIX, sizes)
    assert not np.array_equal(plan_digest([JsonlSource(copy, name="data")]), a)


def test_an_index_dir_holds_the_indexes_of_data_that_is_not_written_to(dataset, tmp_path, capsys, monkeypatch):
    """``--index-dir`` / ``data.index_dir``: indexes for read-only data (nothing is written next to it);
    each source gets its own file there, named after the file it would have next to the data."""
    from lumina_jax.data.sources import ArrayRecordImageSource, write_image_records

    jsonl, items = dataset
    data = tmp_path / "data"
    data.mkdir()
    copy = data / "copy.jsonl"
    copy.write_text(jsonl.read_text().replace("images/", f"{jsonl.parent}/images/"))
    usable = [it for it in items if it.expected_skip is None][:4]
    write_image_records([{"image_path": str(jsonl.parent / "images" / it.file), "caption": it.caption}
                         for it in usable], data / "ar", shard_size=4)  # fmt: skip
    before = sorted(p.name for p in data.rglob("*"))
    index_dir = tmp_path / "indexes" / "new"  # created by the command
    assert preprocess_main(["--index", "--data", str(copy), "--data", str(data / "ar"), "--index-dir",
                            str(index_dir), "--no-progress"]) == 0  # fmt: skip
    assert sorted(p.name for p in data.rglob("*")) == before  # the data folder is untouched
    written = sorted(p.name for p in index_dir.iterdir())
    assert len(written) == 2 and written[0].startswith("ar.") and written[1].startswith("copy.jsonl."), written
    assert str(index_dir) in capsys.readouterr().out
    # A source finds it only when told where (training: data.index_dir).
    src = JsonlSource(copy)
    assert src.record_sizes() is None
    image_index.set_index_dir(src, index_dir)
    np.testing.assert_array_equal(src.record_sizes(), JsonlSource(jsonl).record_sizes())
    ar = ArrayRecordImageSource(data / "ar")
    image_index.set_index_dir(ar, index_dir)
    np.testing.assert_array_equal(ar.record_sizes(), [(it.height, it.width, 0) for it in usable])
    # Same file name elsewhere: another index file (the hash is of the full path).
    other = tmp_path / "other" / "copy.jsonl"
    other.parent.mkdir()
    other.write_text(copy.read_text())
    assert image_index.relocated(str(other) + image_index.IMAGE_SIZES_SUFFIX, index_dir) != \
        image_index.relocated(str(copy) + image_index.IMAGE_SIZES_SUFFIX, index_dir)  # fmt: skip
    assert image_index.relocated("x/y.image_sizes.npy", None) == "x/y.image_sizes.npy"
    # A missing index in the folder: the error names the file looked for and the command with the folder.
    lost = JsonlSource(other)
    image_index.set_index_dir(lost, index_dir)
    looked_for = image_index.relocated(str(other) + image_index.IMAGE_SIZES_SUFFIX, index_dir)
    with pytest.raises(MissingSizeIndexError,
                       match=rf"looked for {looked_for}; .*--index --data {other} --index-dir {index_dir}`"):  # fmt: skip
        DataPipeline([lost], config())
    from lumina_jax.data.global_plan import _stale

    assert f"--index-dir {index_dir}`" in _stale(src, 0, (64, 64), (32, 32))
    # The hash is of the absolute path: a relative --data from the data folder names the same index.
    monkeypatch.chdir(data)
    rel = tmp_path / "rel_ix"
    assert preprocess_main(["--index", "--data", "copy.jsonl", "--index-dir", str(rel), "--no-progress"]) == 0
    image_index.set_index_dir(src, rel)
    np.testing.assert_array_equal(src.record_sizes(), JsonlSource(jsonl).record_sizes())
    # Sources travel to grain worker processes pickled, their index folder with them.
    import pickle

    np.testing.assert_array_equal(pickle.loads(pickle.dumps(src)).record_sizes(), src.record_sizes())
    # A URL is refused (indexes are memory-mapped), as is an unwritable folder, by name.
    assert preprocess_main(["--index", "--data", "copy.jsonl", "--index-dir", "gs://bucket/ix"]) == 2
    assert "is a URL" in capsys.readouterr().err and not (data / "gs:").exists()
    with pytest.raises(PermissionError, match=r"nowhere.*the index folder must be writable"):
        image_index.check_writable(tmp_path / "nowhere" / "x.image_sizes.npy", index_dir=True)
    concat = ConcatSource([JsonlSource(copy), ArrayRecordImageSource(data / "ar")])
    image_index.set_index_dir(concat, index_dir)
    pipe = DataPipeline([concat], config())
    assert pipe.bucket_plan == "global"
    assert sum(int(b["valid"].sum()) for b in pipe) == 24 + 4
    # --index-dir belongs to --index --data.
    assert preprocess_main(["--index", "--out", str(tmp_path / "cache"), "--index-dir", str(index_dir)]) == 2
    assert "--index-dir goes with --index --data" in capsys.readouterr().err


def test_data_index_dir_reaches_the_training_sources(dataset, tmp_path, monkeypatch):
    import jax

    from lumina_jax.parallel.mesh import create_mesh
    from lumina_jax.train import data as train_data
    from lumina_jax.train.config import DataConfig, StageConfig, load_config, load_model_config

    with pytest.raises(ValueError, match="index_dir is where raw images' size indexes live"):
        DataConfig(kind="latent_cache", paths=("c",), index_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'gs://b/ix' is a URL"):
        DataConfig(kind="images", paths=("c",), index_dir="gs://b/ix")
    jsonl, _ = dataset
    copy = tmp_path / "copy.jsonl"
    copy.write_text(jsonl.read_text().replace("images/", f"{jsonl.parent}/images/"))
    index_dir = tmp_path / "ix"
    stage = StageConfig(resolution=64, batch=3, data=DataConfig(kind="images", paths=(str(copy),), vae="v",
                        text_encoder="t", bucket_plan="global", index_dir=str(index_dir)))  # fmt: skip
    kw = dict(model_config=load_model_config(load_config("tiny_synthetic", [])), seed=0, stage_index=0,
              mesh=create_mesh({"data": 1}, devices=jax.devices()[:1]))  # fmt: skip
    with pytest.raises(MissingSizeIndexError, match=f"--index-dir {index_dir}`"):
        train_data.build_stage_iterator(stage, **kw)
    assert preprocess_main(["--index", "--data", str(copy), "--index-dir", str(index_dir), "--no-progress"]) == 0
    monkeypatch.setattr(train_data, "FrozenEncoders", lambda *a, **k: None)  # no encoders needed to plan
    _, inner = train_data.build_stage_iterator(stage, **kw)
    assert inner.get_state()["config"]["bucket_plan"] == "global"


def test_every_host_fails_when_one_cannot_plan(dataset, tmp_path, monkeypatch):
    """Several processes compare plan digests at start-up; a process whose pipeline fails (here: no index
    where it looked) still joins that exchange, so the others fail with it instead of waiting forever."""
    import jax
    from jax.experimental import multihost_utils

    from lumina_jax.parallel.mesh import create_mesh
    from lumina_jax.train import data as train_data
    from lumina_jax.train.config import DataConfig, StageConfig, load_config, load_model_config

    jsonl, _ = dataset
    copy = tmp_path / "copy.jsonl"
    copy.write_text(jsonl.read_text().replace("images/", f"{jsonl.parent}/images/"))
    sent, others = [], {}

    def allgather(mine):  # process 0 is this one; process 1 sends others["digest"]
        sent.append(np.asarray(mine))
        return np.stack([mine, others.get("digest", mine)])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    monkeypatch.setattr(train_data, "process_rows", lambda batch, mesh: (0, batch // 2, 0, 2))
    monkeypatch.setattr(train_data, "FrozenEncoders", lambda *a, **k: None)
    stage = StageConfig(resolution=64, batch=4, data=DataConfig(kind="images", paths=(str(copy),), vae="v",
                        text_encoder="t", index_dir=str(tmp_path / "ix")))  # fmt: skip
    kw = dict(model_config=load_model_config(load_config("tiny_synthetic", [])), seed=0, stage_index=0,
              mesh=create_mesh({"data": 1}, devices=jax.devices()[:1]))  # fmt: skip
    with pytest.raises(ValueError, match="has no size index"):  # this host: no index, yet it joined the exchange
        train_data.build_stage_iterator(stage, **kw)
    assert len(sent) == 1 and not sent[0].any()
    assert preprocess_main(["--index", "--data", str(copy), "--index-dir", str(tmp_path / "ix"), "--no-progress"]) == 0
    train_data.build_stage_iterator(stage, **kw)  # both hosts agree
    assert len(sent) == 2 and sent[1].any()
    others["digest"] = np.zeros(8, np.uint32)  # the other host failed
    with pytest.raises(ValueError, match=r"processes \[1\] could not build their data pipeline"):
        train_data.build_stage_iterator(stage, **kw)
    others["digest"] = sent[1] + 1  # the other host read another index
    with pytest.raises(ValueError, match=r"processes \[1\] read other size indexes than process 0"):
        train_data.build_stage_iterator(stage, **kw)


def test_exif_rotated_photos_and_keyed_transparency_load_as_viewers_show_them(tmp_path):
    """A phone JPEG stored landscape with Orientation 6 is portrait (loader, size index and captioner agree);
    a palette PNG whose transparency is a tRNS entry is composited on white, like an RGBA one."""
    from PIL import Image

    from lumina_jax.data.transforms import decode_image, to_rgb
    from lumina_jax.models.captioner.processor import load_image

    stored = np.zeros((32, 96, 3), np.uint8)
    stored[:, :48] = (255, 0, 0)  # left half red: after the 90-degree turn it is the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    (tmp_path / "data.jsonl").write_text(json.dumps({"path": "photo.jpg", "prompt": "a tall photo"}) + "\n")
    src = JsonlSource(str(tmp_path / "data.jsonl"))
    assert image_index.raw_item_size(src.get(0)) == (96, 32, 0)  # H, W as shown
    pipe = DataPipeline(src, PipelineConfig(resolution=64, batch_size=1, shard_index=0, shard_count=1,
                                            caption_dropout=0.0, num_epochs=1))  # fmt: skip
    h, w = next(iter(pipe))["image_sizes"][0]
    assert h > w  # a portrait crop bucket
    shown = np.asarray(decode_image((tmp_path / "photo.jpg").read_bytes()))
    assert shown.shape == (96, 32, 3) and shown[:40, :, 0].mean() > 200 and shown[56:, :, 0].mean() < 60
    assert np.asarray(load_image(tmp_path / "photo.jpg")).shape == (96, 32, 3)

    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    pal.paste(1, (2, 2, 6, 6))
    pal.info["transparency"] = 0  # palette entry 0 (black) is transparent
    pal.save(tmp_path / "logo.png", transparency=0)
    with Image.open(tmp_path / "logo.png") as im:
        im.load()
        rgb = np.asarray(to_rgb(im))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[3, 3].tolist() == [200, 30, 30]


def test_training_sources_with_the_same_name_are_told_apart(dataset, tmp_path, monkeypatch):
    """``part1/data.jsonl`` + ``part2/data.jsonl`` (or two ``cache_256`` folders): the stage builds, each
    source named ``<name>#<position>`` (a config cannot pass names)."""
    import jax

    from lumina_jax.data.sources import unique_names
    from lumina_jax.parallel.mesh import create_mesh
    from lumina_jax.train import data as train_data
    from lumina_jax.train.config import DataConfig, StageConfig, load_config, load_model_config

    jsonl, _ = dataset
    paths = []
    for part in ("part1", "part2"):
        (tmp_path / part).mkdir()
        paths.append(tmp_path / part / "data.jsonl")
        paths[-1].write_text(jsonl.read_text().replace("images/", f"{jsonl.parent}/images/"))
    stage = StageConfig(resolution=64, batch=3, data=DataConfig(kind="images", paths=tuple(map(str, paths)), vae="v",
                        text_encoder="t", bucket_plan="host"))  # fmt: skip
    kw = dict(model_config=load_model_config(load_config("tiny_synthetic", [])), seed=0, stage_index=0,
              mesh=create_mesh({"data": 1}, devices=jax.devices()[:1]))  # fmt: skip
    monkeypatch.setattr(train_data, "FrozenEncoders", lambda *a, **k: None)
    _, inner = train_data.build_stage_iterator(stage, **kw)
    assert [s.split(" ")[0] for s in inner.get_state()["config"]["sources"]] == ["data#0", "data#1"]
    named = [JsonlSource(str(paths[0]), name="mine"), JsonlSource(str(paths[1])), JsonlSource(str(paths[1]))]
    assert [s.name for s in unique_names(named)] == ["mine", "data#1", "data#2"]


def test_relocated_index_of_a_folder_with_an_undecodable_name():
    """A folder name that is not valid UTF-8 (surrogate-escaped by Python) still gets its index path; valid
    names keep the same hash as before (os.fsencode is UTF-8 for them)."""
    import hashlib

    odd = "/data/d\udce9r/image_sizes.npy"
    got = image_index.relocated(odd, "/idx")
    assert got.startswith("/idx/d\udce9r.") and got == image_index.relocated(odd, "/idx")
    plain = "/data/caps/image_sizes.npy"
    assert image_index.relocated(plain, "/idx") == f"/idx/caps.{hashlib.sha1(plain.encode()).hexdigest()[:10]}.image_sizes.npy"
