"""Sources: original JSONL/YAML format, our ArrayRecord shards, TFDS (prepared and read without TF)."""

import json
import sys

import numpy as np
import pytest

from lumina_jax import text_templates
from lumina_jax.data import records, sources, testing
from lumina_jax.data.pipeline import DataPipeline, PipelineConfig


def config(**kw) -> PipelineConfig:
    base = dict(resolution=64, batch_size=4, seed=0, shard_index=0, shard_count=1, num_epochs=1,
                caption_dropout=0.0, read_threads=1)
    base.update(kw)
    return PipelineConfig(**base)


def collect(pipe):
    it = iter(pipe)
    out = {}
    for b in it:
        for r, sample_id in enumerate(b["ids"]):
            if b["valid"][r]:
                out[sample_id] = (b["prompts"][r], b["images"][r])
    return out, it.stats


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return testing.make_test_dataset(tmp_path_factory.mktemp("src"))


def test_parse_original_item_key_mapping():
    # spec §6.5 / finetune.py: super_high_quality_caption -> "align"; prompt -> "base" (Template A).
    assert sources.parse_original_item({"image_path": "a.png", "super_high_quality_caption": "c"}) == (
        "a.png", "c", "align")
    assert sources.parse_original_item({"path": "a.png", "prompt": "c"}) == ("a.png", "c", "base")
    assert sources.parse_original_item({"image_path": "a.png", "prompt": "c"}) == ("a.png", "c", "base")
    for bad in ({"path": "a.png"}, {"prompt": "c"}, {"path": 3, "prompt": "c"}, [1, 2]):
        with pytest.raises(sources.SkipSample):
            sources.parse_original_item(bad)
    # a line's own system_prompt (our extension) replaces the key-based choice; a misspelt one is a bad record
    assert sources.parse_original_item({"path": "a.png", "prompt": "c", "system_prompt": "empty"}) == ("a.png", "c", "empty")
    assert sources.parse_original_item({"image_path": "a.png", "super_high_quality_caption": "c",
                                        "system_prompt": "Paint it."}) == ("a.png", "c", "Paint it.")  # fmt: skip
    assert sources.parse_original_item({"path": "a.png", "prompt": "c", "system_prompt": None}) == ("a.png", "c", "base")
    with pytest.raises(sources.SkipSample, match="'emtpy'"):
        sources.parse_original_item({"path": "a.png", "prompt": "c", "system_prompt": "emtpy"})
    # a JSON "\ud83d" escape without its pair is valid JSON but not text the tokenizer takes
    lone = json.loads('{"path": "a.png", "prompt": "a cat \\ud83d"}')
    with pytest.raises(sources.SkipSample, match="not valid Unicode"):
        sources.parse_original_item(lone)


def test_jsonl_prompts_use_the_system_prompt_of_their_keys(dataset):
    jsonl, items = dataset
    got, _ = collect(DataPipeline(sources.JsonlSource(jsonl), config()))
    for i, item in enumerate(items):
        if item.expected_skip:
            continue
        prompt, _ = got[f"data:{i}"]
        want_prefix = text_templates.SYSTEM_PROMPTS[
            "align" if item.key_style == "image_path+super_high_quality_caption" else "base"]
        assert prompt == want_prefix + item.caption


def test_jsonl_malformed_lines_are_counted(tmp_path, dataset):
    jsonl, items = dataset
    lines = jsonl.read_text().splitlines()
    lines[3] = "{not json"
    lines[4] = json.dumps({"path": "images/x.png"})  # no caption key
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n\n")
    src = sources.JsonlSource(bad, root=jsonl.parent)
    assert len(src) == len(items)
    _, stats = collect(DataPipeline(src, config()))
    assert stats.skipped["bad"]["bad_record"] == 2


def test_json_array_file_gives_one_record_per_element(tmp_path, dataset):
    # The original loader reads a .json file with json.load (one array of records), a .jsonl line by line.
    from lumina_jax.data.preprocess import open_source

    jsonl, items = dataset
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    bad = [3, {"path": "images/x.png"}]  # not an object; no caption key: placeholders, as in JSONL
    array = tmp_path / "data.json"
    array.write_text(json.dumps(lines + bad, indent=2))
    src = sources.JsonlSource(array, root=jsonl.parent)
    ref = sources.JsonlSource(jsonl)
    assert len(src) == len(items) + 2
    for i in range(len(items)):
        assert src.get(i) == ref.get(i)
    n = len(items)
    with pytest.raises(sources.SkipSample, match=rf"data\.json:\d+ \(element {n}\): the record is not a JSON obj"):
        src.get(len(items))
    got, stats = collect(DataPipeline(src, config()))
    want, ref_stats = collect(DataPipeline(ref, config()))
    assert got.keys() == want.keys() and stats.skipped["data"] == {
        **ref_stats.skipped["data"], "bad_record": 2}
    assert isinstance(open_source(array), sources.JsonlSource) and len(open_source(array)) == len(items) + 2
    # In a META YAML too; a .json holding one object per line is still read as JSON lines.
    (tmp_path / "lines.json").write_text(jsonl.read_text())
    (tmp_path / "meta.yaml").write_text(f"META:\n  - path: data.json\n    root: {jsonl.parent}\n"
                                        f"  - path: lines.json\n    root: {jsonl.parent}\n")
    from_yaml = sources.load_yaml_sources(tmp_path / "meta.yaml")
    assert [len(s) for s in from_yaml] == [len(items) + 2, len(items)]
    # Element line numbers; an empty array; a malformed array is an error naming line and column.
    (tmp_path / "two.json").write_text('\ufeff [\n{"path": "a.png", "prompt": "a"},\n\n  [1],\n"x"]\n')
    two = sources.JsonlSource(tmp_path / "two.json")
    assert len(two) == 3 and two.get(0).caption == "a"
    with pytest.raises(sources.SkipSample, match=r"two\.json:4 \(element 1\)"):
        two.get(1)
    (tmp_path / "empty.json").write_text("[ ]")
    assert len(sources.JsonlSource(tmp_path / "empty.json")) == 0
    (tmp_path / "broken.json").write_text('[\n{"path": "a.png", "prompt": "a"},\n{"path": }\n]')
    with pytest.raises(ValueError, match=r"broken\.json:3:10: invalid JSON"):
        sources.JsonlSource(tmp_path / "broken.json")
    (tmp_path / "unclosed.json").write_text('[{"path": "a.png", "prompt": "a"} {"path": "b.png"}]')
    with pytest.raises(ValueError, match=r"unclosed\.json:1:35: .*expected ',' or ']'"):
        sources.JsonlSource(tmp_path / "unclosed.json")


def test_undecodable_bytes_are_counted_bad_records_naming_file_and_line(tmp_path, caplog):
    png = tmp_path / "a.png"
    testing.make_image(16, 16).save(png)
    good = json.dumps({"path": "a.png", "prompt": "fine"}).encode()
    (tmp_path / "latin1.jsonl").write_bytes(good + b"\n" + b'{"path": "a.png", "prompt": "caf\xe9"}\n')
    caplog.set_level("WARNING")
    src = sources.JsonlSource(tmp_path / "latin1.jsonl")
    assert len(src) == 2 and src.get(0).caption == "fine"
    with pytest.raises(sources.SkipSample, match=r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        src.get(1)
    assert "latin1.jsonl:2: not valid UTF-8" in caplog.text  # logged when the file is read
    got, stats = collect(DataPipeline(src, config(resolution=32)))
    assert len(got) == 1 and stats.skipped == {"latin1": {"bad_record": 1}}
    # The same in a JSON array: only the element holding the bad byte is skipped.
    latin1 = b'{"path": "a.png", "prompt": "caf\xe9"}'
    (tmp_path / "arr.json").write_bytes(b"[" + good + b",\n" + latin1 + b", " + good + b"]")
    arr = sources.JsonlSource(tmp_path / "arr.json")
    assert len(arr) == 3 and arr.get(0).caption == arr.get(2).caption == "fine"
    with pytest.raises(sources.SkipSample, match=r"arr\.json:2 \(element 1\): not valid UTF-8"):
        arr.get(1)


def test_yaml_meta_with_ratio(tmp_path, dataset):
    jsonl, items = dataset
    (tmp_path / "cfg").mkdir()
    cfg = tmp_path / "cfg" / "data.yaml"
    cfg.write_text(
        "META:\n"
        f"  - path: {jsonl}\n"
        "    ratio: 0.5\n"
        f"  - path: ../copy.jsonl\n"
        f"    root: {jsonl.parent}\n"
        "    ratio: 2\n"
    )
    (tmp_path / "copy.jsonl").write_text(jsonl.read_text())
    half, double = sources.load_yaml_sources(cfg)
    full = sources.JsonlSource(jsonl)
    assert len(half) == int(len(items) * 0.5) and len(double) == 2 * len(items)
    all_keys = [full.get(i).key for i in range(len(full))]
    half_keys = [half.get(i).key for i in range(len(half))]
    assert len(set(half_keys)) == len(half_keys) and set(half_keys) <= set(all_keys)
    assert half_keys == [sources.load_yaml_sources(cfg)[0].get(i).key for i in range(len(half))]
    assert sorted(double.get(i).key for i in range(len(double))) == sorted(all_keys * 2)
    concat = sources.ConcatSource([half, double])
    assert len(concat) == len(half) + len(double)
    assert concat.get(len(half)).key == double.get(0).key
    (tmp_path / "twice.yaml").write_text(f"- {jsonl}\n- path: {jsonl}\n- path: {jsonl}\n  name: third\n")
    assert [s.name for s in sources.load_yaml_sources(tmp_path / "twice.yaml")] == ["data#0", "data#1", "third"]
    (tmp_path / "bad.yaml").write_text("META:\n  - path: x.jsonl\n    weight: 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        sources.load_yaml_sources(tmp_path / "bad.yaml")


def test_array_record_images_match_the_jsonl_pipeline(tmp_path, dataset):
    jsonl, items = dataset
    folder = jsonl.parent / "images"
    recs = []
    for it in items:
        if it.defect == "missing":
            continue  # nothing to store
        rec = {"image_path": folder / it.file, "caption": it.caption, "system_prompt": it.system_prompt}
        recs.append(rec)
    recs.append({"image": b"\x89PNG but not really", "caption": "corrupt bytes", "key": "corrupt"})
    paths = sources.write_image_records(recs, tmp_path / "shards", shard_size=7)
    assert len(paths) == -(-len(recs) // 7)
    src = sources.ArrayRecordImageSource(tmp_path / "shards", name="ar")
    assert len(src) == len(recs)
    got, stats = collect(DataPipeline(src, config()))
    expected_skips = {"empty_caption": 2, "undecodable": 4}  # truncated, garbage, zero bytes, corrupt
    assert stats.skipped == {"ar": expected_skips}
    ref, _ = collect(DataPipeline(sources.JsonlSource(jsonl), config()))
    ref_by_key = {}
    for i, it in enumerate(items):
        if f"data:{i}" in ref:
            ref_by_key[str(folder / it.file)] = ref[f"data:{i}"]
    by_key = {src.get(int(k.split(":")[1])).key: v for k, v in got.items()}
    assert by_key.keys() == ref_by_key.keys()
    for k, (prompt, image) in by_key.items():
        assert prompt == ref_by_key[k][0]
        np.testing.assert_array_equal(image, ref_by_key[k][1])


def test_image_record_writer_resumes_only_missing_shards(tmp_path):
    png = testing.encode_image(testing.make_image(8, 8))

    class Counting:
        def __init__(self):
            self.seen = []

        def __len__(self):
            return 10

        def __getitem__(self, i):
            if not 0 <= i < 10:
                raise IndexError(i)
            self.seen.append(i)
            return {"image": png, "caption": f"c{i}"}

    first = Counting()
    paths = sources.write_image_records(first, tmp_path, shard_size=4)
    assert [p.name for p in paths] == [records.shard_name("images", i) for i in range(3)]
    assert first.seen == list(range(10))
    paths[1].unlink()
    again = Counting()
    sources.write_image_records(again, tmp_path, shard_size=4)
    assert again.seen == [4, 5, 6, 7]
    assert not list(tmp_path.glob(".*tmp"))
    src = sources.ArrayRecordImageSource(tmp_path)
    assert [src.get(i).caption for i in range(10)] == [f"c{i}" for i in range(10)]


def test_tfds_captioned_folder_without_tensorflow(tmp_path):
    from lumina_jax.data import tfds_folder

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i, (w, h) in enumerate([(40, 30), (30, 90), (64, 64)]):
        testing.make_image(w, h, "RGB", i).save(folder / f"im{i}.png")
        (folder / f"im{i}.txt").write_text(f"sidecar caption {i}\n")
    testing.make_image(20, 20, "RGBA", 7).save(folder / "sub" / "rgba.png")
    (folder / "sub" / "broken.jpg").write_bytes(b"not a jpeg")
    testing.make_image(20, 20, "L", 8).save(folder / "sub" / "nocap.png")
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "sub/rgba.png", "text": "from metadata"}) + "\n"
        + json.dumps({"file_name": "sub/broken.jpg", "caption": "broken file"}) + "\n"
    )
    builder_dir = tfds_folder.prepare_captioned_image_folder(folder, tmp_path / "tfds")
    src = sources.TfdsSource(builder_dir=builder_dir)
    assert len(src) == 6
    got, stats = collect(DataPipeline(src, config()))
    assert stats.skipped == {src.name: {"undecodable": 1, "empty_caption": 1}}
    prompts = sorted(p for p, _ in got.values())
    real = text_templates.SYSTEM_PROMPTS["real"]  # the default of records without their own (as in training)
    assert prompts == sorted([real + "from metadata"] + [real + f"sidecar caption {i}" for i in range(3)])
    by_name = sources.TfdsSource("captioned_image_folder", data_dir=tmp_path / "tfds", key_key="key")
    assert sorted(by_name.get(i).key for i in range(len(by_name))) == sorted(
        ["im0.png", "im1.png", "im2.png", "sub/rgba.png", "sub/broken.jpg", "sub/nocap.png"])
    assert "tensorflow" not in sys.modules

    # a byte-order mark is read; a bad line or a non-UTF-8 caption file is an error naming the file (and line)
    meta = folder / "metadata.jsonl"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())
    assert dict((r, c) for r, c, _ in tfds_folder.iter_captioned_images(folder))["sub/rgba.png"] == "from metadata"
    good = meta.read_text(encoding="utf-8-sig")
    meta.write_text(good + '{"file_name": "gone.png", "text": "its image was deleted"}\n')
    with pytest.warns(UserWarning, match=r"1 caption\(s\) name images that are not in the folder \(gone.png\)"):
        assert len(list(tfds_folder.iter_captioned_images(folder))) == 6
    meta.write_text(good + "{'file_name': 'x.png'}\n")
    with pytest.raises(ValueError, match=rf"{meta}:3: not a JSON object"):
        list(tfds_folder.iter_captioned_images(folder))
    meta.unlink()
    (folder / "im1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{folder / 'im1.txt'}: caption file is not UTF-8"):
        list(tfds_folder.iter_captioned_images(folder))
