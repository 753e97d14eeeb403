"""``python -m lumina_jax caption`` end to end on a tiny random model saved to disk, plus prompt templates."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import torch  # noqa: F401 -- required (requirements-dev.txt): a missing one fails, not skips
import transformers  # noqa: F401 -- required (requirements-dev.txt): a missing one fails, not skips

from lumina_jax.models.captioner import prompts  # noqa: E402
from lumina_jax.models.captioner import testing as T  # noqa: E402
from lumina_jax.models.captioner.cli import done_set, list_images, main  # noqa: E402

SIZES = [(40, 60), (64, 64), (30, 90), (50, 50), (100, 40), (24, 24)]
# one vision bucket and one prompt length: every run in this file reuses a single compiled program
COMMON = ["--batch-size", "2", "--max-new-tokens", "6", "--dtype", "fp32", "--no-progress", "--workers", "2",
          "--slot-buckets", "512", "--prompt-multiple", "512"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    T.save_tiny_model(d, "qwen2_5_vl", max_pixels=64 * 64)
    return d


def _make_images(root, sizes, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = root / ("sub" if i % 2 else "") / f"img{i}.{'png' if i % 2 else 'jpg'}"
        p.parent.mkdir(parents=True, exist_ok=True)
        T.random_image(rng, h, w).save(p)
        paths.append(p)
    return paths


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _summary(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_caption_folder_end_to_end_and_resume(tmp_path, model_dir, capsys):
    from lumina_jax.data.sources import JsonlSource

    imgs = tmp_path / "imgs"
    _make_images(imgs, SIZES[:5])
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "captions" / "caps.jsonl"
    args = ["--model", str(model_dir), "--images", str(imgs), "--out", str(out), *COMMON]

    assert main(args + ["--limit", "3"]) == 0
    s = _summary(capsys)
    assert s["captioned"] + s["corrupt"] == 3 and s["corrupt"] == 1  # broken.png sorts first
    assert main(args) == 0
    s = _summary(capsys)
    assert (s["captioned"], s["skipped_existing"], s["corrupt"]) == (3, 2, 1)
    rows = _read(out)
    assert len(rows) == 5 and len({r["image_path"] for r in rows}) == 5
    for r in rows:
        assert not os.path.isabs(r["image_path"]) and r["image_path"].startswith("../imgs/")
        assert isinstance(r["prompt"], str) and 1 <= r["num_tokens"] <= 6
        assert r["granularity"] == "detailed" and r["lang"] == "en"

    # the data pipeline reads the output and finds every image
    src = JsonlSource(out)
    assert len(src) == 5 and all(os.path.isfile(src.get(i).image_path) for i in range(5))

    # nothing new: no duplicates; a line cut short by a crash is dropped and its image redone
    assert main(args) == 0
    assert _summary(capsys)["captioned"] == 0 and len(_read(out)) == 5
    text = out.read_text(encoding="utf-8")
    out.write_text(text[: text.rstrip("\n").rfind("\n") + 1] + '{"image_path": "../imgs/im', encoding="utf-8")
    assert main(args) == 0
    assert _summary(capsys)["captioned"] == 1
    rows2 = _read(out)
    assert len(rows2) == 5 and {r["image_path"] for r in rows2} == {r["image_path"] for r in rows}
    # greedy is deterministic: the redone caption is the one written before
    assert {r["image_path"]: r["prompt"] for r in rows2} == {r["image_path"]: r["prompt"] for r in rows}


def test_caption_jsonl_input_and_process_sharding(tmp_path, model_dir, capsys):
    paths = _make_images(tmp_path / "data", SIZES)
    lst = tmp_path / "data" / "list.jsonl"
    lst.write_text("".join(json.dumps({"image_path": os.path.relpath(p, lst.parent)}) + "\n" for p in paths))
    assert list_images(lst) == [p.resolve() for p in paths]
    out = tmp_path / "caps.jsonl"
    base = ["--model", str(model_dir), "--images", str(lst), "--out", str(out), "--granularity", "tag",
            "--lang", "zh", *COMMON]
    for i in range(2):
        assert main(base + ["--process-index", str(i), "--process-count", "2"]) == 0
        assert _summary(capsys)["captioned"] == 3
    parts = sorted(tmp_path.glob("caps.*-of-*.jsonl"))
    assert [p.name for p in parts] == ["caps.00000-of-00002.jsonl", "caps.00001-of-00002.jsonl"]
    got = [r["image_path"] for p in parts for r in _read(p)]
    assert sorted(got) == sorted(os.path.relpath(p, tmp_path) for p in paths)  # disjoint and complete
    assert done_set(out) == set(got)
    # a single-process rerun sees the parts and has nothing to do
    assert main(base) == 0
    assert _summary(capsys)["captioned"] == 0 and not out.exists()


def test_prompt_templates():
    seen = set()
    for g in prompts.GRANULARITIES:
        for p in prompts.PERSPECTIVES:
            for lang in prompts.LANGUAGES:
                text = prompts.instruction(g, p, lang)
                assert text and text not in seen
                seen.add(text)
                if lang == "zh":
                    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)
    assert prompts.instruction("short", custom="Say hi.") == "Say hi."
    with pytest.raises(ValueError, match="granularity"):
        prompts.instruction("long")


def test_cli_dispatch_help(capsys):
    from lumina_jax.__main__ import main as top

    with pytest.raises(SystemExit) as e:
        top(["caption", "--help"])
    assert e.value.code == 0 and "--granularity" in capsys.readouterr().out


def test_resume_is_per_setting_and_each_image_is_captioned_once(tmp_path, model_dir, capsys):
    """One output collects several kinds of caption per image (resume skips only the same request);
    an image listed twice, or reached through a link, is captioned once; a missing listed file is
    counted as missing; one image file is an input too."""
    other = tmp_path / "elsewhere"
    _make_images(other, SIZES[:1], seed=3)
    imgs = tmp_path / "imgs"
    paths = _make_images(imgs, SIZES[:2])
    (imgs / "linked").symlink_to(other, target_is_directory=True)  # a folder link: followed
    (imgs / "loop").symlink_to(imgs, target_is_directory=True)  # a link cycle: each real folder once
    assert len(list_images(imgs)) == 3
    out = tmp_path / "caps.jsonl"
    run = lambda *a: (main(["--model", str(model_dir), "--out", str(out), *COMMON, *a]), _summary(capsys))[1]  # noqa: E731
    assert run("--images", str(imgs), "--granularity", "tag")["captioned"] == 3
    assert run("--images", str(imgs), "--granularity", "short")["captioned"] == 3  # another request: not skipped
    assert run("--images", str(imgs), "--granularity", "tag")["skipped_existing"] == 3
    s = run("--images", str(imgs), "--granularity", "tag", "--instruction", "Name the colours.")
    assert s["captioned"] == 3
    assert run("--images", str(imgs), "--instruction", "Name the colours.")["skipped_existing"] == 3
    rows = _read(out)
    assert len(rows) == 9 and sum(r.get("instruction") == "Name the colours." for r in rows) == 3
    # a list naming one image twice (two spellings) and a file that is not there
    lst = tmp_path / "list.jsonl"
    lst.write_text("".join(json.dumps({"image_path": p}) + "\n" for p in (
        f"imgs/{paths[0].name}", f"./imgs/../imgs/{paths[0].name}", "imgs/gone.png")))  # fmt: skip
    s = run("--images", str(lst), "--lang", "zh", "--granularity", "tag")
    assert (s["captioned"], s["missing"], s["corrupt"]) == (1, 1, 0)
    assert run("--images", str(paths[1]), "--lang", "zh", "--granularity", "tag")["captioned"] == 1  # one image file


@pytest.mark.parametrize("extra,message", [
    (["--instruction", "  "], "--instruction is empty"),
    (["--min-pixels", "5000", "--max-pixels", "4000"], "--min-pixels 5000 is above --max-pixels 4000"),
    (["--attention-backend", "fast"], "--attention-backend 'fast' is not an attention backend"),
])  # fmt: skip
def test_bad_options_stop_before_loading(tmp_path, model_dir, extra, message):
    imgs = tmp_path / "imgs"
    _make_images(imgs, SIZES[:1])
    with pytest.raises(SystemExit, match=message):
        main(["--model", str(model_dir), "--images", str(imgs), "--out", str(tmp_path / "o.jsonl"), *COMMON, *extra])


def test_missing_model_and_tokenizer_are_one_line_errors(tmp_path, model_dir):
    import shutil

    imgs = tmp_path / "imgs"
    _make_images(imgs, SIZES[:1])
    args = ["--images", str(imgs), "--out", str(tmp_path / "o.jsonl"), *COMMON]
    with pytest.raises(SystemExit, match=r"caption: error: .*nowhere"):
        main(["--model", str(tmp_path / "nowhere"), *args])
    partial = tmp_path / "model"
    shutil.copytree(model_dir, partial)
    (partial / "tokenizer.json").unlink()
    with pytest.raises(SystemExit, match=r"caption: error: .*tokenizer"):
        main(["--model", str(partial), *args])


def test_default_buckets_end_at_the_pixel_cap():
    """Photos resized to the pixel cap fill the last vision bucket (they used ~60 % of a doubling)."""
    import dataclasses

    from lumina_jax.models.captioner.cli import DEFAULT_MAX_PIXELS
    from lumina_jax.models.captioner.config import qwen2_vl_7b, qwen2_5_vl_7b
    from lumina_jax.models.captioner.processor import (ImageProcessorConfig, capped_slots, default_slot_buckets,
                                                       round_up, smart_resize)  # fmt: skip
    from lumina_jax.models.captioner.vision import slots_needed

    proc = dataclasses.replace(ImageProcessorConfig(), max_pixels=DEFAULT_MAX_PIXELS)
    for cfg in (qwen2_vl_7b(), qwen2_5_vl_7b()):
        v = cfg.vision
        buckets = default_slot_buckets(v, capped_slots(proc, v))
        assert all(b % v.window_slots == 0 for b in buckets) and all(b / a <= 1.6 for a, b in zip(buckets, buckets[1:]))
        for h, w in ((1080, 1920), (1024, 1024), (3000, 4000), (4000, 1000), (768, 1024)):
            gh, gw = (x // 14 for x in smart_resize(h, w, 28, proc.min_pixels, DEFAULT_MAX_PIXELS))
            need = slots_needed((gh, gw), v)
            assert need <= buckets[-1] and need / round_up(need, buckets) >= 0.75, (h, w, need, buckets)


def test_several_chunks_each_image_once(tmp_path, model_dir, capsys):
    """Images are prepared a chunk (4 x batch) ahead of generation: 3 chunks, every image once, in order."""
    imgs = tmp_path / "imgs"
    _make_images(imgs, SIZES + SIZES[:4])
    out = tmp_path / "caps.jsonl"
    args = ["--model", str(model_dir), "--images", str(imgs), "--out", str(out), *COMMON, "--batch-size", "1"]
    assert main(args) == 0 and _summary(capsys)["captioned"] == 10
    got = [r["image_path"] for r in _read(out)]
    assert sorted(got) == sorted(set(got)) and len(got) == 10


def test_bench_caption_runs_on_cpu_against_transformers(tmp_path, capsys):
    """``python -m lumina_jax.bench caption`` (tiny, CPU): ours and transformers' greedy tokens agree; bad
    sizes are argparse errors (were tracebacks)."""
    from lumina_jax.bench.caption import main as bench

    out = tmp_path / "rows.json"
    assert bench(["--family", "qwen2_vl", "--batch", "1", "--new-tokens", "4", "--iters", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["tokens_match"] is True
    for bad in (["--batch", "0"], ["--image-size", "64"], ["--new-tokens", "-1"]):
        with pytest.raises(SystemExit):
            bench(bad)
    assert "expected HxW" in capsys.readouterr().err


def test_the_models_repetition_penalty_applies_unless_overridden(tmp_path, model_dir, capsys):
    """transformers' generate() applies generation_config.json's ``repetition_penalty`` even when greedy;
    so does caption (with a note), ``--repetition-penalty 1`` turns it off, a malformed value is refused."""
    import shutil

    penalised = tmp_path / "model"
    shutil.copytree(model_dir, penalised)
    gen_file = penalised / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    _make_images(tmp_path / "imgs", SIZES[:2])
    base = ["--images", str(tmp_path / "imgs"), *COMMON]

    def captions(model, name, *extra):
        assert main(["--model", str(model), "--out", str(tmp_path / name), *base, *extra]) == 0
        return [r["prompt"] for r in _read(tmp_path / name)], capsys.readouterr().err

    plain, err = captions(model_dir, "plain.jsonl")
    assert "repetition penalty" not in err
    gen_file.write_text(json.dumps({**gen, "repetition_penalty": 1.5}))
    with_penalty, err = captions(penalised, "penalised.jsonl")
    assert "repetition penalty 1.5 from the model's generation_config.json" in err
    assert with_penalty != plain
    assert captions(penalised, "off.jsonl", "--repetition-penalty", "1")[0] == plain
    gen_file.write_text(json.dumps({**gen, "repetition_penalty": "high"}))
    with pytest.raises(SystemExit, match="repetition_penalty 'high' is not a positive number"):
        main(["--model", str(penalised), "--out", str(tmp_path / "bad.jsonl"), *base])
