"""The benchmark entry points on the CPU with tiny shapes: rows, error rows, traces, the stock kernel."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from conftest import rel_l2


def test_forward_bench_several_backends_and_profile(tmp_path):
    from lumina_jax.bench import forward

    out, prof, hlo = tmp_path / "forward.json", tmp_path / "forward.xplane.pb", tmp_path / "forward.hlo.txt"
    rc = forward.main(["--config", "nextdit_tiny", "--res", "32", "32", "--batch", "2", "--dtype", "fp32",
                       "--attention", "no_such_backend", "xla", "pallas", "--reference", "none", "--unroll",
                       "--warmup", "1", "--iters", "2", "--profile", str(prof), "--hlo-dump", str(hlo), "--json", str(out)])  # fmt: skip
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    # --unroll adds the first backend with unrolled layers right after it (it fails here like the first)
    assert [r["impl"] for r in rows] == ["jax (no_such_backend)", "jax (no_such_backend, unrolled layers)",
                                         "jax (xla)", "jax (pallas)"]  # fmt: skip
    assert "unknown attention backend" in rows[0]["error"]
    assert rows[2]["ms"] > 0 and "rel_l2_vs_first" not in rows[2]
    assert rows[3]["rel_l2_vs_first"] < 1e-5  # the Pallas kernel (interpreted) computes the same forward
    assert prof.stat().st_size > 1000
    assert "HloModule" in hlo.read_text()


def test_forward_bench_variants_match(tmp_path):
    from lumina_jax.bench import forward

    out = tmp_path / "forward.json"
    forward.main(["--config", "nextdit_tiny", "--res", "32", "32", "--batch", "2", "--dtype", "fp32", "--attention",
                  "xla", "--unroll", "--fused-qk", "--reference", "none", "--warmup", "1", "--iters", "1",
                  "--json", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["jax (xla)", "jax (xla, unrolled layers)", "jax (xla, fused q/k norm+RoPE)",
                                         "jax (xla, unrolled layers, fused q/k norm+RoPE)"]  # fmt: skip
    assert all(r["rel_l2_vs_first"] < 1e-5 for r in rows[1:])


def test_stock_pallas_matches_reference_on_valid_rows():
    from lumina_jax.ops.attention import reference_attention_f64
    from lumina_jax.ops.attention_bench import stock_pallas_attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 128, 4, 32)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 128, 2, 32)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 128, 2, 32)), jnp.float32)
    lengths = jnp.array([128, 77])
    out = np.asarray(stock_pallas_attention(q, k, v, lengths))
    ref = np.asarray(reference_attention_f64(q, k, v, kv_lengths=lengths))
    for b, n in enumerate([128, 77]):  # padded query rows are junk by design
        assert rel_l2(out[b, :n], ref[b, :n]) < 1e-5


def test_block_size_sweep_rows():
    from lumina_jax.ops.attention_bench import sweep_pallas_blocks

    seen = []
    rows = sweep_pallas_blocks([{"pad_head_dim": True}, {"block_q": 16, "block_k": 32}], batch=1, image_tokens=32, caption_tokens=32,
                               heads=2, kv_heads=1, head_dim=16, dtype="float32", iters=1, warmup=1,
                               on_row=seen.append)  # fmt: skip
    assert len(rows) == 4 and seen == rows
    assert all(r["error"] is None and r["ms"] > 0 for r in rows)
    assert rows[2]["blocks"]["block_q"] == 16 and rows[2]["blocks"]["block_k"] == 32


def test_capture_profile_writes_a_trace(tmp_path):
    from lumina_jax.bench import capture_profile

    f = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((64, 64))
    path = capture_profile(lambda: f(x), str(tmp_path / "sub" / "t.xplane.pb"), iters=2)
    assert (tmp_path / "sub" / "t.xplane.pb").stat().st_size > 0 and path.endswith("t.xplane.pb")


def test_trace_summary_and_hlo_names():
    from lumina_jax.bench.trace import category, hlo_op_names, summarize

    def layer(x, w):
        with jax.named_scope("my_block"):
            return jnp.tanh(x @ w).astype(jnp.bfloat16).astype(jnp.float32) * 2.0

    x = jnp.ones((64, 64))
    names = hlo_op_names(jax.jit(layer).lower(x, x).compile().as_text())
    assert names and any("my_block" in op for op in names.values())
    # a kernel name is the HLO instruction name with '.'/'-' as '_'
    some = next(k for k, op in names.items() if "my_block" in op)
    rows = [dict(kernel_name="nvjet_sm90_gemm", occurrences=6, total_duration_us=3000.0),
            dict(kernel_name=some, occurrences=3, total_duration_us=300.0),
            dict(kernel_name="memcpy128", occurrences=9, total_duration_us=90.0)]  # fmt: skip
    s = summarize(rows, iters=3, names=names)
    assert abs(s["total_ms"] - 1.13) < 1e-9
    assert s["by_category"][0] == ("gemm", 1.0, 2.0)
    assert s["top"][1][0] == some and "my_block" in s["top"][1][3]
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert category("memcpy128") == "memcpy/memset"


def test_convert_memory_bench_pth(tmp_path, capsys):
    """The conversion-memory bench runs end to end on a tiny model, exporting a streamed .pth."""
    from lumina_jax.bench import convert_memory

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "notes.txt").write_text("mine")
    assert convert_memory.main(["--config", "nextdit_tiny", "--to", "pth", "--workdir", str(tmp_path / "w")]) == 0
    out = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line and " " in line)
    assert out["export"] == "pth" and float(out["save_peak_rss_gib"]) > 0
    # its own subfolder is cleaned up without --keep; the --workdir folder and what was there stay
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["notes.txt"]


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_bench_json_is_strict_and_written_row_by_row(tmp_path, monkeypatch):
    """Values not measured are null (NaN is not JSON); rows reach the file as they are measured, so a
    run cut by a time limit keeps them."""
    from lumina_jax.bench import text_encoder, write_json

    out = tmp_path / "te.json"
    seen = []
    monkeypatch.setattr(text_encoder, "write_json", lambda p, rows: (seen.append(len(rows)), write_json(p, rows)))
    assert text_encoder.main(["--batch", "1", "2", "--seq-len", "16", "--dtype", "fp32", "--iters", "1",
                              "--warmup", "0", "--no-reference", "--json", str(out)]) == 0  # fmt: skip
    rows = _strict_json(out)
    assert seen == [1, 2] and [r["batch"] for r in rows] == [1, 2] and rows[0]["rel_l2_vs_torch"] is None
    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5]})
    assert _strict_json(tmp_path / "x.json") == {"a": None, "b": [None, 1.5]}
    import numpy as np

    write_json(tmp_path / "np.json", {"a": np.float32("nan"), "b": np.float32(1.5), "c": np.int64(3),
                                      "d": np.bool_(True), "e": np.array([1.0, np.nan])})  # fmt: skip
    assert _strict_json(tmp_path / "np.json") == {"a": None, "b": 1.5, "c": 3, "d": True, "e": [1.0, None]}


def test_data_bench_rows_for_both_plans_and_the_plan_alone(tmp_path):
    """``bench data``: raw and cached data through the global plan (raw images indexed first) and per-host
    buckets; ``--plan-records``: the plan alone over cache-like and raw-image-like indexes."""
    from lumina_jax.bench import data

    out = tmp_path / "data.json"
    assert data.main(["--kind", "raw", "cache", "--res", "64", "--workers", "0", "--plan", "global", "host",
                      "--n", "16", "--batch", "4", "--json", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())
    assert [(r["kind"], r["plan"]) for r in rows] == [("raw", "global"), ("raw", "host"), ("cache", "global"),
                                                      ("cache", "host")]  # fmt: skip
    assert all(r["images_per_s"] > 0 for r in rows)
    assert rows[0]["index_images_per_s"] > 0 and rows[1]["index_images_per_s"] is None
    assert data.main(["--plan-records", "20000", "--batch", "64", "--res", "256", "--kind", "cache", "raw",
                      "--json", str(out)]) == 0  # fmt: skip
    plan = json.loads(out.read_text())
    assert [r["kind"] for r in plan] == ["cache", "raw"]
    for r in plan:
        assert r["ms_per_batch"] > 0 and 0.5 < r["real_rows"] <= 1.0 and r["restore_s"] >= 0


def test_generate_bench_rows_with_and_without_the_reference(tmp_path, monkeypatch):
    """``bench generate`` (tiny, CPU): with diffusers the images agree (flow_euler = diffusers semantics)
    and the speedup column is filled; ``--no-diffusers`` runs without torch at all. Rows are written as
    each phase ends."""
    import json
    import sys

    from lumina_jax.bench.generate import main

    out = tmp_path / "rows.json"
    assert main(["--steps", "2", "--iters", "1", "--json", str(out)]) == 0
    jax_row, ref_row = json.loads(out.read_text())
    assert jax_row["rel_l2_vs_diffusers"] < 1e-4 and jax_row["speedup_vs_diffusers"] > 0
    assert ref_row["impl"].startswith("diffusers") and jax_row["evals"] == jax_row["guided"] == 2
    # another solver does other work than diffusers' flow-match Euler: neither images nor times are compared
    assert main(["--steps", "2", "--iters", "1", "--solver", "euler", "--json", str(out)]) == 0
    jax_row, _ = _strict_json(out)
    assert jax_row["rel_l2_vs_diffusers"] is None and jax_row["speedup_vs_diffusers"] is None
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert main(["--steps", "2", "--iters", "1", "--no-diffusers", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["impl"].startswith("jax flow_euler") and row["total_ms"] > 0
