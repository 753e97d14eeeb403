"""``python -m lumina_jax preprocess``: raw images -> latent cache, read back exactly, resumable, per host.

Tiny random models on CPU: a FLUX-shaped VAE (``vae_tiny``, slimmer; 8x, 16 channels) and ``gemma2_tiny`` with the
sentencepiece tokenizer of ``test_text``, saved to disk so the CLI loads them as it would real ones.
The data set has two crop sizes at 64 px (one VAE compilation each) and four unusable records (a
truncated PNG, bytes that are no image, a missing file, an empty caption).

"On the fly" below is what training on raw images computes: the same pipeline settings (so the same
batches), a separately jitted ``scale_latents(encode(x).mode())`` and ``TextEncoder.encode``; the cache
must hold exactly those values rounded to bf16.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax.core import meta

import torch  # noqa: F401 -- required (requirements-dev.txt): a missing one fails, not skips
import sentencepiece  # noqa: F401 -- required (requirements-dev.txt): a missing one fails, not skips

from test_text import sp_dir  # noqa: E402,F401 -- reused fixture: tiny sentencepiece tokenizer

from lumina_jax.convert.gemma2 import save_text_encoder  # noqa: E402
from lumina_jax.convert.vae import save_vae  # noqa: E402
from lumina_jax.data import preprocess as pp  # noqa: E402
from lumina_jax.data.cache import LatentCacheSource, write_latent_cache  # noqa: E402
from lumina_jax.data.cli import main  # noqa: E402
from lumina_jax.data.pipeline import DataPipeline, PipelineConfig  # noqa: E402
from lumina_jax.data.sources import (  # noqa: E402
    ArrayRecordImageSource,
    ConcatSource,
    JsonlSource,
    write_image_records,
)
from lumina_jax.data.testing import SyntheticItem, make_test_dataset  # noqa: E402
from lumina_jax.models.gemma2 import Gemma2Config  # noqa: E402
from lumina_jax.models.gemma2_bench import reference_pair  # noqa: E402
from lumina_jax.models.vae import AutoencoderKL, VAEConfig, scale_latents  # noqa: E402
from lumina_jax.text import TextEncoder, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GEMMA = Gemma2Config.from_yaml(ROOT / "configs/model/gemma2_tiny.yaml")
# vae_tiny with one resnet per level and 8 channels: the same code path (4 levels = 8x, 16 latent
# channels, mid-block attention), ~30 % less compile time (each crop size is one compilation).
VAE = VAEConfig.from_yaml("vae_tiny").replace(block_out_channels=(8, 8, 8, 8), layers_per_block=1)
BF16 = np.dtype(ml_dtypes.bfloat16)
RES, BATCH, SHARD = 64, 4, 2  # 9 usable records -> shards of 2, 2, 2, 2, 1
EXPECTED_SKIPS = {"undecodable": 2, "missing": 1, "empty_caption": 1}


def dataset_items() -> list[SyntheticItem]:
    """9 usable images (32x32 -> 64x64 crops, 40x30 -> 64x48 crops; both JSONL key styles) and 4 bad."""
    modes = ["RGB", "RGBA", "L", "P"]
    good = [
        SyntheticItem(f"img_{i}.png", f"caption number {i}", *((40, 30) if i % 3 == 0 else (32, 32)),
                      mode=modes[i % 4], key_style="path+prompt" if i % 2 else "image_path+super_high_quality_caption")
        for i in range(9)
    ]  # fmt: skip
    bad = [
        SyntheticItem("truncated.png", "a truncated png", 48, 48, expected_skip="undecodable", defect="truncated"),
        SyntheticItem("garbage.jpg", "not an image", expected_skip="undecodable", defect="garbage"),
        SyntheticItem("missing.png", "a missing file", 32, 32, expected_skip="missing", defect="missing"),
        SyntheticItem("empty_caption.png", "", 32, 32, expected_skip="empty_caption"),
    ]
    return [good[0], bad[0], *good[1:4], bad[1], *good[4:7], bad[2], bad[3], *good[7:]]


def random_vae_params(cfg: VAEConfig, seed: int = 0) -> dict:
    """Random VAE weights with O(1) activations (norm affines too), built from shapes only (no compile)."""
    boxed = jax.eval_shape(AutoencoderKL(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        shape = tuple(leaf.shape)
        if len(shape) > 1:
            return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, meta.unbox(boxed))


@pytest.fixture(scope="module")
def models(sp_dir, tmp_path_factory):  # noqa: F811
    """(vae_dir, text_encoder_dir, tokenizer_dir, vae_params, text_params) on disk and in memory."""
    root = tmp_path_factory.mktemp("models")
    vae_params = random_vae_params(VAE)
    _, text_params = reference_pair(GEMMA, seed=1)
    save_vae(root / "vae", VAE, vae_params)
    save_text_encoder(root / "text_encoder", GEMMA, text_params)
    return root / "vae", root / "text_encoder", sp_dir, vae_params, text_params


@pytest.fixture(scope="module")
def encoders(models):
    """In-memory encoders (same weights as on disk): the API runs share their compilations."""
    _, _, tok_dir, vae_params, text_params = models
    text = TextEncoder(text_params, GEMMA, load_tokenizer(tok_dir), dtype="bf16")
    return pp.Encoders(VAE, vae_params, text, dtype="bf16")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    jsonl, _ = make_test_dataset(tmp_path_factory.mktemp("data"), dataset_items())
    return jsonl


def config(out: Path, **kw) -> pp.PreprocessConfig:
    kw = {"resolution": RES, "batch_size": BATCH, "shard_size": SHARD, "progress": False, **kw}
    return pp.PreprocessConfig(out_dir=str(out), **kw)


@pytest.fixture(scope="module")
def on_the_fly(models, data):
    """key -> (latent, cap_feats, prompt, image_size) computed the training way, cast to bf16; and the
    empty prompt's features."""
    _, _, tok_dir, vae_params, text_params = models
    vae = AutoencoderKL(VAE, dtype=jnp.bfloat16)
    encode = jax.jit(lambda p, x: scale_latents(vae.apply({"params": p}, x, method=AutoencoderKL.encode).mode(), VAE))
    text = TextEncoder(text_params, GEMMA, load_tokenizer(tok_dir), dtype="bf16")
    pipe = DataPipeline(JsonlSource(data), PipelineConfig(
        resolution=RES, batch_size=BATCH, shuffle=False, num_epochs=1, caption_dropout=0.0, shard_index=0,
        shard_count=1, drop_shard_remainder=False))  # fmt: skip
    ref = {}
    it = iter(pipe)
    for batch in it:
        latents = np.asarray(encode(vae_params, batch["images"]))
        feats, mask = text.encode(list(batch["prompts"]), system_prompt="empty", max_length=256)
        feats, mask = np.asarray(feats), np.asarray(mask)
        for i in np.flatnonzero(batch["valid"]):
            assert not mask[i, mask[i].sum():].any()  # right padding
            ref[batch["keys"][i]] = (latents[i].astype(BF16), feats[i][mask[i]].astype(BF16), batch["prompts"][i],
                                     tuple(int(s) for s in batch["image_sizes"][i]))  # fmt: skip
    empty_feats, empty_mask = text.encode([""] * BATCH, system_prompt="empty")
    empty = np.asarray(empty_feats)[0][np.asarray(empty_mask)[0]].astype(BF16)
    assert empty.shape[0] == 1  # [<bos>]
    assert it.stats.skipped == {"data": EXPECTED_SKIPS}
    return ref, empty


@pytest.fixture(scope="module")
def cli_cache(models, data, tmp_path_factory):
    """An uninterrupted run of the command line (models loaded from disk): (out_dir, stdout)."""
    vae_dir, text_dir, tok_dir, _, _ = models
    out = tmp_path_factory.mktemp("cli") / "cache"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["--data", str(data), "--vae", str(vae_dir), "--text-encoder", str(text_dir), "--tokenizer",
                   str(tok_dir), "--out", str(out), "--resolution", str(RES), "--batch", str(BATCH),
                   "--shard-size", str(SHARD), "--max-length", "256", "--dtype", "bf16", "--no-progress"])  # fmt: skip
    assert rc == 0, stdout.getvalue()
    return out, stdout.getvalue()


def read_all(cache_dir: Path) -> list[dict]:
    src = LatentCacheSource(cache_dir)
    return [src.get(i) for i in range(len(src))]


def true_sizes(cache_dir: Path) -> np.ndarray:
    """``[H, W, L]`` of every record, read from the records themselves."""
    return np.array([[*r["crop_size"], r["cap_feats"].shape[0]] for r in read_all(cache_dir)], np.int32)


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], np.ndarray):
                assert ra[k].dtype == rb[k].dtype and ra[k].shape == rb[k].shape, k
                np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)
            else:
                assert ra[k] == rb[k], k


# ---------------------------------------------------------------------------------------------------


def test_cli_cache_equals_on_the_fly_values_in_bf16(cli_cache, on_the_fly):
    out, stdout = cli_cache
    ref, empty = on_the_fly
    src = LatentCacheSource(out)
    assert len(src) == len(ref) == 9
    assert [p.name for p in sorted(out.glob("latents-*.array_record"))] == [
        f"latents-0000{i}.array_record" for i in range(5)]  # fmt: skip
    seen = set()
    for i in range(len(src)):
        rec = src.get(i)
        latent, feats, prompt, size = ref[rec["key"]]
        seen.add(rec["key"])
        assert rec["latent"].dtype == BF16 and rec["cap_feats"].dtype == BF16
        np.testing.assert_array_equal(rec["latent"], latent)  # exact: the same bf16 rounding
        np.testing.assert_array_equal(rec["cap_feats"], feats)  # trimmed to the prompt's own tokens
        assert rec["cap_mask"].all() and rec["cap_mask"].shape == (feats.shape[0],)
        assert rec["prompt"] == prompt and tuple(rec["crop_size"]) == size
        assert rec["prompt"].startswith("You are an assistant designed to generate high-quality images")
        assert rec["id"].startswith("data:")
    assert seen == set(ref)
    sizes = src.record_sizes()  # the size index
    np.testing.assert_array_equal(sizes, true_sizes(out))
    assert {tuple(s[:2]) for s in sizes} == {(64, 64), (48, 64)} and len(set(sizes[:, 2])) > 1
    np.testing.assert_array_equal(src.empty_prompt[0], empty)
    assert src.empty_prompt[1].tolist() == [True]

    info = json.loads((out / "cache_info.json").read_text())
    assert info["num_records"] == 9 and len(info["shards"]) == 5
    summary = json.loads((out / pp.SUMMARY_FILE).read_text())
    assert summary["samples_written"] == 9 and summary["samples_skipped"] == 4
    assert summary["skipped"] == {"data": EXPECTED_SKIPS}
    assert "samples written: 9 in 5 shard(s)" in stdout
    assert "skipped in 'data': empty_caption=1, missing=1, undecodable=2" in stdout
    assert "empty_prompt.ljr" in stdout


def test_training_pipeline_reads_the_cache(cli_cache, on_the_fly):
    out, _ = cli_cache
    ref, empty = on_the_fly
    common = dict(resolution=RES, batch_size=3, shuffle=False, num_epochs=1, shard_index=0, shard_count=1,
                  drop_shard_remainder=False)  # fmt: skip
    seen = 0
    for batch in DataPipeline(LatentCacheSource(out), PipelineConfig(caption_dropout=0.0, **common)):
        assert batch["cap_feats"].shape[1] % 8 == 0  # re-padded by the collate
        for i in np.flatnonzero(batch["valid"]):
            latent, feats, prompt, size = ref[batch["keys"][i]]
            n = feats.shape[0]
            np.testing.assert_array_equal(batch["latents"][i], latent)
            np.testing.assert_array_equal(batch["cap_feats"][i, :n], feats)
            assert not batch["cap_feats"][i, n:].astype(np.float32).any()
            assert batch["cap_mask"][i].tolist() == [True] * n + [False] * (batch["cap_mask"].shape[1] - n)
            assert batch["prompts"][i] == prompt and tuple(batch["image_sizes"][i]) == size
            seen += 1
    assert seen == 9
    # the cache records how it was made; a stage at another resolution or a model of another width refuses it
    from types import SimpleNamespace

    from lumina_jax.train.data import check_cache_for_stage

    src = LatentCacheSource(out)
    assert src.made_with["resolution"] == RES and "models" in src.made_with
    model = SimpleNamespace(cap_feat_dim=empty.shape[1])
    check_cache_for_stage(src, SimpleNamespace(name="s", resolution=RES), model)
    with pytest.raises(ValueError, match=rf"trains at {2 * RES} px but the latent cache .* was encoded at {RES} px"):
        check_cache_for_stage(src, SimpleNamespace(name="s", resolution=2 * RES), model)
    with pytest.raises(ValueError, match=rf"holds {empty.shape[1]}-wide caption features; .* cap_feat_dim 7"):
        check_cache_for_stage(src, SimpleNamespace(name="s", resolution=RES), SimpleNamespace(cap_feat_dim=7))
    # Caption dropout on the cache: the stored empty-prompt features replace the caption's.
    for batch in DataPipeline(LatentCacheSource(out), PipelineConfig(caption_dropout=1.0, **common)):
        assert batch["caption_dropped"].all() and batch["prompts"] == [""] * 3
        np.testing.assert_array_equal(batch["cap_feats"][:, :1], np.broadcast_to(empty, (3, 1, empty.shape[1])))
        assert batch["cap_mask"].sum(axis=1).tolist() == [1, 1, 1]


def test_interrupted_runs_resume_to_the_uninterrupted_result(encoders, data, cli_cache, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    source = JsonlSource(data)
    # 1. stop after 2 shards (--max-shards)
    r1 = pp.preprocess(source, encoders, config(out, max_shards=2))
    assert not r1.complete and (r1.num_shards, r1.new_records) == (2, 4)
    assert not (out / "cache_info.json").exists()
    # 2. crash in the middle of the third shard's batch
    calls = {"n": 0}
    real = pp.Encoders.encode_images

    def crash_on_second_call(self, images):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated preemption")
        return real(self, images)

    monkeypatch.setattr(pp.Encoders, "encode_images", crash_on_second_call)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        pp.preprocess(source, encoders, config(out))
    monkeypatch.undo()
    assert not list(out.glob(".*tmp"))  # no partial shard left behind
    done = len(list(out.glob("latents-*.array_record")))
    assert 2 <= done < 5
    # 3. resume: encodes only what is missing, ends with what an uninterrupted run writes
    calls["n"] = 0

    def counting(self, images):
        calls["n"] += 1
        return real(self, images)

    monkeypatch.setattr(pp.Encoders, "encode_images", counting)
    r3 = pp.preprocess(source, encoders, config(out))
    assert r3.complete and r3.num_records == 9 and r3.new_shards == 5 - done
    assert r3.new_records == 9 - 2 * done
    assert calls["n"] < 3  # an uninterrupted run encodes 3 batches
    assert r3.skipped == {"data": EXPECTED_SKIPS} and r3.records_read == 13  # counters restored, not recounted
    assert_same_records(read_all(out), read_all(cli_cache[0]))
    np.testing.assert_array_equal(LatentCacheSource(out).record_sizes(), LatentCacheSource(cli_cache[0]).record_sizes())
    # 4. a complete cache is left alone
    calls["n"] = 0
    r4 = pp.preprocess(source, encoders, config(out))
    assert r4.already_complete and r4.new_records == 0 and calls["n"] == 0
    assert "nothing to do" in pp.format_summary(r4)
    # the same data named from another folder (relative path) is the same source; so is a state written with a
    # relative path by an earlier version
    assert pp.describe_source(JsonlSource(os.path.relpath(data)))["path"] == str(Path(data).resolve())
    state = json.loads((out / pp.STATE_FILE).read_text())
    state["settings"]["source"]["path"] = os.path.relpath(state["settings"]["source"]["path"])
    (out / pp.STATE_FILE).write_text(json.dumps(state))
    assert pp.preprocess(JsonlSource(os.path.relpath(data)), encoders, config(out)).already_complete
    # 5. other settings are refused, naming what changed
    with pytest.raises(pp.PreprocessError, match="batch_size: was 4, now 2"):
        pp.preprocess(source, encoders, pp.PreprocessConfig(out_dir=str(out), resolution=RES, batch_size=2,
                                                            shard_size=SHARD, progress=False))  # fmt: skip
    # 6. without the state file nothing contradicting the shards is accepted: another resolution (the cache
    # would claim it), or a finished run's short last shard (a rerun over more data would lose a record)
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / pp.STATE_FILE).unlink()
    with pytest.raises(pp.PreprocessError, match=rf"made with other settings \(resolution: was {RES}, now {2 * RES}\)"):
        pp.preprocess(source, encoders, config(bare, resolution=2 * RES))
    with pytest.raises(pp.PreprocessError, match=r"5 shard\(s\) hold 9 records, not 5 x 2"):
        pp.preprocess(source, encoders, config(bare))
    # with its state file, a finished cache that lost cache_info.json is repaired by the same command
    (out / "cache_info.json").unlink()
    assert pp.preprocess(source, encoders, config(out)).complete and (out / "cache_info.json").exists()


def test_max_shards_that_reach_the_end_complete_the_cache(encoders, data, cli_cache, tmp_path):
    # 9 usable records in shards of 3: --max-shards 3 writes all of them, and so does a resume whose
    # --max-shards covers exactly the shards left; both runs must end complete (cache_info.json written).
    source = JsonlSource(data)
    whole = tmp_path / "whole"
    r = pp.preprocess(source, encoders, config(whole, shard_size=3, max_shards=3))
    assert r.complete and (r.num_records, r.num_shards) == (9, 3) and (whole / "cache_info.json").exists()
    assert "complete" in pp.format_summary(r).splitlines()[0] and "INCOMPLETE" not in pp.format_summary(r)
    resumed = tmp_path / "resumed"
    r1 = pp.preprocess(source, encoders, config(resumed, shard_size=3, max_shards=1))
    assert not r1.complete and r1.num_shards == 1 and not (resumed / "cache_info.json").exists()
    r2 = pp.preprocess(source, encoders, config(resumed, shard_size=3, max_shards=2))
    assert r2.complete and (r2.num_records, r2.new_shards) == (9, 2) and (resumed / "cache_info.json").exists()
    assert_same_records(read_all(resumed), read_all(whole))
    assert sorted(r["key"] for r in read_all(whole)) == sorted(r["key"] for r in read_all(cli_cache[0]))


def test_cli_max_consecutive_skips_is_the_option_the_error_names(models, data, tmp_path, capsys):
    vae_dir, text_dir, tok_dir, _, _ = models
    images = data.parent / "images"
    lines = [{"path": str(images / f"gone_{i}.png"), "prompt": "missing"} for i in range(5)]
    lines += [{"path": str(images / f"img_{i}.png"), "prompt": f"caption {i}"} for i in (1, 2, 4, 5)]
    jsonl = tmp_path / "missing_first.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["--data", str(jsonl), "--vae", str(vae_dir), "--text-encoder", str(text_dir), "--tokenizer", str(tok_dir),
            "--out", str(tmp_path / "out"), "--resolution", str(RES), "--batch", str(BATCH), "--shard-size",
            str(SHARD), "--no-progress"]  # fmt: skip
    rc = main([*args, "--max-consecutive-skips", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "3 records in a row were unusable (missing=3" in err
    assert "raise the limit (3) with --max-consecutive-skips" in err
    rc = main([*args, "--max-consecutive-skips", "6"])  # following the advice: the same --out resumes
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "samples written: 4" in out and "skipped in 'missing_first': missing=5" in out
    with pytest.raises(ValueError, match="max_consecutive_skips must be >= 1"):
        config(tmp_path, max_consecutive_skips=0)


def test_two_hosts_write_disjoint_shards_covering_every_sample(encoders, data, cli_cache, tmp_path):
    out = tmp_path / "cache"
    source = JsonlSource(data)
    pp.preprocess(source, encoders, config(out, process_index=1, process_count=2, max_shards=1))
    with pytest.raises(pp.PreprocessError, match=r"processes \[0\] of 2 have no directory"):
        pp.merge_parts(out)  # process 0 has not run yet (and process 1 is unfinished)
    results = [pp.preprocess(source, encoders, config(out, process_index=i, process_count=2)) for i in (0, 1)]
    parts = [out / pp.part_dir_name(i, 2) for i in (0, 1)]
    keys = [[r["key"] for r in read_all(p)] for p in parts]
    ids = [{r["id"] for r in read_all(p)} for p in parts]
    assert not set(keys[0]) & set(keys[1])
    assert {int(i.split(":")[1]) % 2 for i in ids[0]} == {0} and {int(i.split(":")[1]) % 2 for i in ids[1]} == {1}
    whole = {r["key"]: r for r in read_all(cli_cache[0])}
    assert sorted(keys[0] + keys[1]) == sorted(whole)
    for p in parts:  # the same values (bf16; batches differ from the single-host run's)
        for r in read_all(p):
            np.testing.assert_allclose(r["latent"].astype(np.float32), whole[r["key"]]["latent"].astype(np.float32),
                                       rtol=1e-2, atol=1e-2)  # fmt: skip
    total = {}
    for r in results:
        for reason, n in r.skipped["data"].items():
            total[reason] = total.get(reason, 0) + n
    assert total == EXPECTED_SKIPS
    assert sum(r.slice_records for r in results) == 13
    for p in parts:  # each process directory is a cache with its own size index
        np.testing.assert_array_equal(LatentCacheSource(p).record_sizes(), true_sizes(p))
    (parts[1] / "latents-00000.sizes.npy").unlink()  # a part without a sidecar: built after the move

    state = json.loads((parts[1] / pp.STATE_FILE).read_text())  # process 1 run with another --max-length
    other = dict(state, settings=dict(state["settings"], max_length=4))
    (parts[1] / pp.STATE_FILE).write_text(json.dumps(other))
    with pytest.raises(pp.PreprocessError, match=r"encoded with different 'max_length' \(\{0: \d+, 1: 4\}\)"):
        pp.merge_parts(out)
    (parts[1] / pp.STATE_FILE).write_text(json.dumps(state))

    merged = pp.merge_parts(out)
    assert (merged.num_records, merged.parts, merged.skipped) == (9, 2, {"data": EXPECTED_SKIPS})
    made = json.loads((out / "cache_info.json").read_text())["made_with"]  # how it was made, for the trainer
    assert made["resolution"] == RES and made["max_length"] == state["settings"]["max_length"]
    assert not any(p.exists() for p in parts)
    src = LatentCacheSource(out)
    assert sorted(src.get(i)["key"] for i in range(len(src))) == sorted(whole)
    assert src.empty_prompt is not None
    assert json.loads((out / "cache_info.json").read_text())["num_records"] == 9
    np.testing.assert_array_equal(np.load(out / "record_sizes.npy"), true_sizes(out))
    shards = sorted(p.name for p in out.glob("latents-*.array_record"))
    assert sorted(p.name for p in out.glob("latents-*.sizes.npy")) == [n.replace(".array_record", ".sizes.npy")
                                                                       for n in shards]  # fmt: skip


def test_cli_errors_name_the_problem(data, tmp_path, capsys):
    base = ["--out", str(tmp_path / "out"), "--resolution", str(RES), "--no-progress"]
    rc = main(["--data", str(data), "--vae", str(tmp_path / "no_vae"), "--text-encoder", str(tmp_path / "no_te"),
               *base])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--vae" in err and "no_vae" in err and "--text-encoder" in err and "no_te" in err
    rc = main(["--data", str(data), "--text-encoder", str(tmp_path), *base])
    assert rc == 2 and "--vae is required" in capsys.readouterr().err
    rc = main(["--data", str(tmp_path / "nope.jsonl"), "--vae", str(tmp_path), "--text-encoder", str(tmp_path), *base])
    assert rc == 2 and "nope.jsonl" in capsys.readouterr().err
    rc = main(["--data", str(data), "--vae", str(tmp_path), "--text-encoder", str(tmp_path), "--out",
               str(tmp_path / "o"), "--resolution", "100"])  # fmt: skip
    assert rc == 2 and "resolution 100" in capsys.readouterr().err
    rc = main(["--merge", "--out", str(tmp_path)])
    assert rc == 2 and "no per-process directories" in capsys.readouterr().err


def test_long_prompts_are_truncated_and_counted(encoders, data, tmp_path):
    r = pp.preprocess(JsonlSource(data), encoders, config(tmp_path / "cache", max_length=16))
    assert r.complete and r.truncated_prompts == 9
    assert "prompts truncated to 16 tokens: 9" in pp.format_summary(r)
    assert {rec["cap_feats"].shape[0] for rec in read_all(tmp_path / "cache")} == {16}


def test_open_source_dispatch(data, tmp_path):
    assert isinstance(pp.open_source(data), JsonlSource)
    meta_yaml = tmp_path / "meta.yaml"
    meta_yaml.write_text(f"META:\n  - path: {data}\n  - path: {data}\n    name: again\n")
    assert isinstance(pp.open_source(meta_yaml), ConcatSource) and len(pp.open_source(meta_yaml)) == 26
    images = sorted((data.parent / "images").glob("img_*.png"))
    write_image_records([{"image_path": str(p), "caption": p.stem} for p in images], tmp_path / "ar", shard_size=4)
    ar = pp.open_source(tmp_path / "ar", system_prompt="real")
    assert isinstance(ar, ArrayRecordImageSource) and len(ar) == 9 and ar.get(0).system_prompt == "real"
    both = pp.open_sources([data, tmp_path / "ar"])
    assert isinstance(both, ConcatSource) and len(both) == 13 + 9
    assert pp.describe_source(both)["parts"][0]["path"] == str(data)
    assert pp.describe_source(both)["parts"][1]["system_prompt"] == "real"  # what records without their own get
    (tmp_path / "empty").mkdir()
    with pytest.raises(pp.PreprocessError, match="neither"):
        pp.open_source(tmp_path / "empty")
    with pytest.raises(pp.PreprocessError, match="no such file"):
        pp.open_source(tmp_path / "nope.jsonl")


def fake_parts(out: Path, counts: Sequence[int]) -> np.ndarray:
    """Finished per-process directories without running the encoders; returns the merged cache's sizes."""
    from test_data_cache import expected_sizes, random_records

    want = []
    for i, n in enumerate(counts):
        recs = random_records(n, seed=i)
        d = out / pp.part_dir_name(i, len(counts))
        write_latent_cache(recs, d, shard_size=SHARD)
        (d / pp.STATE_FILE).write_text(json.dumps({"complete": {"skipped": {"data": {"missing": i}}}}))
        want.append(expected_sizes(recs))
    return np.concatenate(want)


def test_interrupted_merge_moves_every_sidecar_and_cli_merge_index(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cache"
    want = fake_parts(out, [5, 4])
    real = os.replace
    moved = []

    def crash_between_shard_and_sidecar(src, dst):
        if str(src).endswith(".sizes.npy") and "process-" in str(src):
            moved.append(src)
            if len(moved) == 3:
                raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_between_shard_and_sidecar)
    with pytest.raises(OSError, match="simulated crash"):
        pp.merge_parts(out)
    monkeypatch.undo()
    assert (out / pp.MERGE_PLAN_FILE).exists() and (out / "latents-00002.array_record").exists()
    assert not (out / "latents-00002.sizes.npy").exists()
    rc = main(["--merge", "--index", "--out", str(out), "--no-progress"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith(f"merged 2 process directories into {out}: 9 records in 5 shards")
    assert lines[1].startswith(f"size index {out / 'record_sizes.npy'}: 9 records, 3 distinct crop sizes")
    np.testing.assert_array_equal(np.load(out / "record_sizes.npy"), want)
    np.testing.assert_array_equal(LatentCacheSource(out).record_sizes(), true_sizes(out))
    assert len(list(out.glob("latents-*.sizes.npy"))) == 5 and not list(out.glob("process-*"))


def test_cli_index_builds_the_size_index_of_an_older_cache(cli_cache, tmp_path, capsys):
    out = tmp_path / "cache"
    shutil.copytree(cli_cache[0], out)
    want = np.load(out / "record_sizes.npy")
    for p in [out / "record_sizes.npy", *out.glob("latents-*.sizes.npy")]:  # as written before the index
        p.unlink()
    assert LatentCacheSource(out).record_sizes() is None
    rc = main(["--index", "--out", str(out), "--no-progress"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    lo, hi = want[:, 2].min(), want[:, 2].max()
    assert stdout.strip() == (f"size index {out / 'record_sizes.npy'}: 9 records, 2 distinct crop sizes, "
                              f"caption lengths {lo}-{hi}")  # fmt: skip
    np.testing.assert_array_equal(LatentCacheSource(out).record_sizes(), want)
    assert len(list(out.glob("latents-*.sizes.npy"))) == 5
    rc = main(["--index", "--out", str(tmp_path / "empty_dir_nope"), "--no-progress"])
    assert rc == 2 and "no such directory" in capsys.readouterr().err
    (out / "cache_info.json").unlink()
    rc = main(["--index", "--out", str(out), "--no-progress"])
    assert rc == 2 and f"latent cache {out} is incomplete" in capsys.readouterr().err


def test_raw_images_on_two_hosts_encode_to_one_shape(models, data, tmp_path, monkeypatch):
    """Raw-image training on several hosts (``train.data.build_stage_iterator``, each of 2 simulated hosts
    feeding its rows): the global plan over the image size index gives both hosts the same crop size at
    each step, and the frozen encoders pad captions to ``max_text_len``, so both build the same shapes;
    the padding changes no feature (the same rows encoded with the text encoder's own length bucket)."""
    from lumina_jax.data.image_index import index_image_source
    from lumina_jax.data.preprocess import _pipeline_config
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.parallel.mesh import create_mesh
    from lumina_jax.train import data as train_data
    from lumina_jax.train.config import DataConfig, StageConfig

    vae_dir, text_dir, tok_dir, _, _ = models
    jsonl = tmp_path / "data.jsonl"  # a copy: an index next to the shared fixture would change its plan
    jsonl.write_text(data.read_text().replace('"images/', f'"{data.parent}/images/'))
    d = DataConfig(kind="images", paths=(str(jsonl),), vae=str(vae_dir), text_encoder=str(text_dir),
                   tokenizer=str(tok_dir), max_text_len=128, encoder_dtype="float32", caption_dropout=0.0,
                   read_threads=1)  # fmt: skip
    stage = StageConfig(name="raw", resolution=RES, steps=4, batch=4, data=d)
    mesh = create_mesh({"data": 1}, devices=jax.devices()[:1])

    def host_batches(h):
        monkeypatch.setattr(train_data, "process_rows", lambda b, m: (2 * h, 2 * h + 2, h, 2))
        it, _ = train_data.build_stage_iterator(stage, model_config=NextDiTConfig.from_yaml("nextdit_tiny"),
                                                mesh=mesh, seed=0, stage_index=0)  # fmt: skip
        return [next(it) for _ in range(3)]

    with pytest.raises(ValueError, match=r"2 hosts .* global bucket plan.*preprocess --index --data"):
        host_batches(0)
    index_image_source(JsonlSource(jsonl), progress=False)
    # preprocess keeps per-process buckets though the data is indexed now (its saved state must still fit)
    assert DataPipeline(JsonlSource(jsonl), _pipeline_config(config(tmp_path / "c"), 0, 1)).bucket_plan == "host"
    b0s, b1s = host_batches(0), host_batches(1)
    for b0, b1 in zip(b0s, b1s):
        for key in ("latents", "cap_feats", "cap_mask"):
            assert b0[key].shape == b1[key].shape, key
        assert b0["cap_feats"].shape[1] == 128
    free = train_data.FrozenEncoders(str(vae_dir), str(text_dir), str(tok_dir), max_text_len=128, dtype="float32")
    rows = next(iter(DataPipeline(JsonlSource(jsonl), PipelineConfig(
        resolution=RES, batch_size=2, shard_index=0, shard_count=2, caption_dropout=0.0, bucket_plan="global"))))
    assert rows["ids"] == b0s[0]["ids"]
    f0 = free(rows)
    n = f0["cap_feats"].shape[1]
    assert n < 128  # the text encoder's own bucket
    np.testing.assert_array_equal(b0s[0]["cap_feats"][:, :n], f0["cap_feats"])
    np.testing.assert_array_equal(b0s[0]["latents"], f0["latents"])
    assert not b0s[0]["cap_mask"][:, n:].any() and not b0s[0]["cap_feats"][:, n:].any()


def test_cached_and_raw_training_give_records_without_their_own_the_same_system_prompt(encoders, data, tmp_path):
    """ArrayRecord/TFDS records without a system prompt: preprocess (CLI and API) and raw-image training use
    one default (a cache made with another one than the run would train on would silently change the
    conditioning), and a resume with another prompt than the interrupted run's is refused, not mixed."""
    import inspect

    from lumina_jax.data.cli import build_parser
    from lumina_jax.train.config import DataConfig

    default = build_parser().parse_args(["--data", "x", "--out", "y"]).system_prompt
    api = inspect.signature(pp.open_source).parameters["system_prompt"].default
    assert default == api == DataConfig().system_prompt == ArrayRecordImageSource.__init__.__defaults__[1] == "real"
    images = sorted((data.parent / "images").glob("img_*.png"))
    write_image_records([{"image_path": str(p), "caption": p.stem} for p in images], tmp_path / "ar", shard_size=4)
    out = tmp_path / "cache"
    pp.preprocess(pp.open_source(tmp_path / "ar", system_prompt="base"), encoders, config(out, max_shards=1))
    with pytest.raises(pp.PreprocessError, match="other settings .*'system_prompt': 'base'"):
        pp.preprocess(pp.open_source(tmp_path / "ar"), encoders, config(out))
    # a state written before the prompt was recorded: the sources' default then, base
    state = json.loads((out / pp.STATE_FILE).read_text())
    del state["settings"]["source"]["system_prompt"]
    (out / pp.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(pp.PreprocessError, match="other settings"):
        pp.preprocess(pp.open_source(tmp_path / "ar"), encoders, config(out))
    assert pp.preprocess(pp.open_source(tmp_path / "ar", system_prompt="base"), encoders, config(out)).complete
    # custom text meant itself verbatim before it got diffusers' separator: an interrupted run of then (its
    # state has no system_prompt_text) is not continued with the tokens the text means now
    out2 = tmp_path / "cache2"
    pp.preprocess(pp.open_source(tmp_path / "ar", system_prompt="Draw it."), encoders, config(out2, max_shards=1))
    state = json.loads((out2 / pp.STATE_FILE).read_text())
    assert state["settings"]["source"]["system_prompt_text"] == "Draw it. <Prompt Start> "
    del state["settings"]["source"]["system_prompt_text"]
    (out2 / pp.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(pp.PreprocessError, match=r"other settings .*system_prompt_text.*'Draw it\.'"):
        pp.preprocess(pp.open_source(tmp_path / "ar", system_prompt="Draw it."), encoders, config(out2))


class FakeEncoders:
    """Encoders that return zeros of the right shapes, for tests of the bookkeeping (no compilation)."""

    num_devices = 1

    def __init__(self):
        self.image_shapes, self.text_shapes = set(), set()

    def describe(self) -> dict:
        return {"dtype": "bf16", "vae": "/m/vae", "text_encoder": "/m/te", "tokenizer": "/m/tok"}

    def empty_prompt_features(self, batch_size, max_length):
        return np.zeros((1, 8), np.float32), np.ones(1, bool)

    def encode_images(self, images):
        return np.zeros((images.shape[0], images.shape[1] // 8, images.shape[2] // 8, 16), np.float32)

    def encode_prompts(self, prompts, max_length):
        return np.zeros((len(prompts), 4, 8), np.float32), np.ones((len(prompts), 4), bool)

    def count_truncated(self, prompts, max_length):
        return 0


def test_a_process_whose_slice_is_all_skipped_completes_an_empty_part_that_merges(tmp_path):
    """Records 1 and 3 of 5 are corrupt and process 1 of 2 gets exactly those: it completes an empty part
    carrying its skip counts (not NoUsableSampleError, which left --merge refusing forever), and the merge
    holds process 0's records and both processes' skips. Parts that are all empty are an error naming why."""
    good = [SyntheticItem(f"img_{i}.png", f"caption {i}", 32, 32) for i in range(3)]
    bad = [SyntheticItem(f"bad_{i}.jpg", "not an image", expected_skip="undecodable", defect="garbage")
           for i in range(2)]  # fmt: skip
    jsonl, _ = make_test_dataset(tmp_path / "data", [good[0], bad[0], good[1], bad[1], good[2]])
    out = tmp_path / "cache"
    results = [pp.preprocess(JsonlSource(jsonl), FakeEncoders(), config(out, process_index=i, process_count=2))
               for i in range(2)]  # fmt: skip
    assert [(r.complete, r.num_records, r.num_shards) for r in results] == [(True, 3, 2), (True, 0, 0)]
    assert results[1].skipped == {"data": {"undecodable": 2}} and results[1].records_read == 2
    assert pp.preprocess(JsonlSource(jsonl), FakeEncoders(), config(out, process_index=1, process_count=2)
                         ).already_complete  # fmt: skip
    merged = pp.merge_parts(out)
    assert (merged.num_records, merged.parts, merged.skipped) == (3, 2, {"data": {"undecodable": 2}})
    assert sorted(r["prompt"].split("> ")[-1] for r in read_all(out)) == [f"caption {i}" for i in range(3)]
    # one process alone on the data: everything skipped is still an error
    from lumina_jax.data.pipeline import NoUsableSampleError

    only_bad, _ = make_test_dataset(tmp_path / "bad", bad * 20)
    with pytest.raises(NoUsableSampleError):
        pp.preprocess(JsonlSource(only_bad), FakeEncoders(), config(tmp_path / "c1", probe_samples=1))
    # every part empty: the merge names the skip reasons
    for i in range(2):
        d = tmp_path / "empty" / pp.part_dir_name(i, 2)
        write_latent_cache([], d, shard_size=SHARD, empty_prompt_features=(np.zeros((1, 8)), np.ones(1, bool)))
        (d / pp.STATE_FILE).write_text(json.dumps({"complete": {"skipped": {"data": {"missing": 1 + i}}}}))
    with pytest.raises(pp.PreprocessError, match=r"none of the 2 processes wrote a record.*data: missing=3"):
        pp.merge_parts(tmp_path / "empty")


def test_merge_refuses_parts_encoded_from_different_data(tmp_path):
    """The parts' recorded sources must be the same data (name, type, record count, system prompt); their
    paths may differ (each host mounts the data where it likes). The error names both parts' sources."""
    out = tmp_path / "cache"
    settings = {"models": FakeEncoders().describe(), "resolution": 64, "batch_size": 4, "bucket_window": None,
                "max_ratio": 4.0, "shard_size": SHARD, "max_length": 256, "num_workers": 0,
                "process_count": 2}  # fmt: skip
    sources = [{"name": "laion", "type": "JsonlSource", "records": 100, "path": "/mnt/a/laion.jsonl",
                "system_prompt": "base"},
               {"name": "laion", "type": "JsonlSource", "records": 100, "path": "/data/laion.jsonl",
                "system_prompt": "base"}]  # fmt: skip
    for i, (source, n) in enumerate(zip(sources, (3, 2))):
        d = out / pp.part_dir_name(i, 2)
        part = dict(settings, source=source, process_index=i)
        recs = [{"latent": np.zeros((8, 8, 16)), "cap_feats": np.zeros((3, 8)), "cap_mask": np.ones(3, bool),
                 "prompt": f"{i} {k}"} for k in range(n)]  # fmt: skip
        write_latent_cache(recs, d, shard_size=SHARD, made_with=pp.made_with(part))
        (d / pp.STATE_FILE).write_text(json.dumps({"settings": part, "complete": {"skipped": {}}}))
    state_path = out / pp.part_dir_name(1, 2) / pp.STATE_FILE
    state = json.loads(state_path.read_text())
    for change, differ in (({"name": "coyo", "records": 7}, "name, records"),
                           ({"system_prompt": "real"}, "system_prompt")):
        other = dict(state, settings=dict(state["settings"], source=dict(sources[1], **change)))
        state_path.write_text(json.dumps(other))
        with pytest.raises(pp.PreprocessError, match=rf"encoded different data \({differ} differ\): "
                           rf"process-00000-of-00002 from .*'laion'.* process-00001-of-00002 from "):  # fmt: skip
            pp.merge_parts(out)
    state_path.write_text(json.dumps(state))  # the same data at another path: merged
    assert pp.merge_parts(out).num_records == 5
