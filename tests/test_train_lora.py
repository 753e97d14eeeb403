"""LoRA fine-tuning (``lora:`` in a train config) on the tiny Next-DiT with synthetic latents.

* the base stays bit-identical, only the adapters move; the optimizer and the EMA hold the adapter alone;
* resume is exact (stop half way, resume, compare with a straight run);
* ``train export --format lora`` writes diffusers' LoRA layout: diffusers + PEFT load it onto the
  exported base and compute what our merged export computes; ``generate --lora``'s loader reads it too;
* config errors (rank, targets, lora with trainable) and a resume with another rank are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_l2
from test_train_loop import leaves, make_cfg

from lumina_jax.train.lora import LoraTrainConfig, abstract_lora, apply_lora, init_lora, target_paths

LORA = ["lora.rank=4", "lora.alpha=8", "stages.0.steps=4", "stages.1.steps=1", "checkpoint.every=2",
        "optimizer.lr=5e-3"]  # fmt: skip


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A briefly trained tiny model exported as a checkpoint: the base the LoRA runs adapt."""
    from lumina_jax.train.loop import Trainer, export_weights

    root = tmp_path_factory.mktemp("lora_base")
    Trainer(make_cfg(root / "run", "stages.0.steps=2", "stages.1.steps=1", "checkpoint.every=2"), stop_at=2).run()
    return export_weights(root / "run", root / "base", which="params", format="jax")


def _lora_cfg(run_dir, base, *extra):
    return make_cfg(run_dir, f"init={base}", *LORA, *extra)


def test_lora_run_trains_the_adapter_only_and_resumes_exactly(base_ckpt, tmp_path):
    from lumina_jax.convert.nextdit import load_transformer
    from lumina_jax.train.loop import ResumeMismatchError, Trainer

    a = Trainer(_lora_cfg(tmp_path / "a", base_ckpt), stop_at=4)
    a.run()
    _, base = load_transformer(base_ckpt)
    st = jax.device_get(a.state)
    for x, y in zip(jax.tree.leaves(st.params["base"]), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # frozen
    ups = [np.abs(np.asarray(v)).max() for k, v in jax.tree_util.tree_leaves_with_path(st.params["lora"])
           if jax.tree_util.keystr(k).endswith("'up']")]  # fmt: skip
    assert ups and min(ups) > 0  # every adapter moved off its zero init
    n_lora = sum(x.size for x in jax.tree.leaves(st.params["lora"]))
    assert set(st.ema) == {"lora"}
    # Adam moments (mu, nu) for the adapter only: the frozen base has no optimizer state
    n_opt = sum(x.size for x in jax.tree.leaves(st.opt_state) if np.ndim(x) > 0)
    assert n_opt == 2 * n_lora, (n_opt, n_lora)
    # stop half way and resume: the same state bit for bit
    Trainer(_lora_cfg(tmp_path / "b", base_ckpt), stop_at=2).run()
    b = Trainer(_lora_cfg(tmp_path / "b", base_ckpt), stop_at=4)
    b.run()
    for x, y in zip(leaves(a.state), leaves(b.state)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ResumeMismatchError, match=r"lora: .*'rank': 4.*'rank': 8"):
        Trainer(_lora_cfg(tmp_path / "b", base_ckpt, "lora.rank=8"), stop_at=5).run()
    # the base is re-read from init on resume, so init must be given and the checkpoint behind it unchanged
    with pytest.raises(ResumeMismatchError, match=r"init: .* -> None"):
        Trainer(make_cfg(tmp_path / "b", *LORA), stop_at=5).run()
    import shutil

    from lumina_jax.convert.nextdit import save_transformer
    from lumina_jax.train.loop import restore_lora

    saved = tmp_path / "saved_base"
    shutil.copytree(base_ckpt, saved)
    config, weights = load_transformer(base_ckpt)
    weights["x_embedder"]["kernel"] = np.asarray(weights["x_embedder"]["kernel"]).copy()
    weights["x_embedder"]["kernel"][0, 0] += 1e-6  # one element, one ulp-scale change
    shutil.rmtree(base_ckpt)
    save_transformer(base_ckpt, config, weights, format="jax")
    try:
        with pytest.raises(ResumeMismatchError, match=r"checkpoint behind init changed"):
            Trainer(_lora_cfg(tmp_path / "b", base_ckpt), stop_at=5).run()
        with pytest.raises(ResumeMismatchError, match=r"checkpoint behind init changed"):
            restore_lora(tmp_path / "b", with_base=True)
    finally:
        shutil.rmtree(base_ckpt)
        shutil.copytree(saved, base_ckpt)
    restore_lora(tmp_path / "b", with_base=True)  # the original base: no complaint
    moved = tmp_path / "moved_base"  # the same weights elsewhere: the fingerprint matches, the run goes on
    shutil.copytree(base_ckpt, moved)
    Trainer(_lora_cfg(tmp_path / "b", moved), stop_at=5).run()
    # adapters on a random base (no init, e.g. an experiment): resumes like any run
    Trainer(make_cfg(tmp_path / "c", *LORA), stop_at=1).run()
    assert Trainer(make_cfg(tmp_path / "c", *LORA), stop_at=2).run().step == 2
    # checkpoints hold the adapter state, not the frozen base: the arrays they record (orbax's own metadata, not
    # file sizes, which vary with how OCDBT batched the writes) are the adapter, its EMA and its Adam moments
    saved = _saved_arrays(tmp_path / "b" / "checkpoints" / "4")
    assert not [k for k in saved if "base" in k], [k for k in saved if "base" in k][:3]
    n_saved = sum(saved.values())
    assert 4 * n_lora <= n_saved <= 4 * n_lora + 16, (n_saved, n_lora)  # + step and nonfinite counters
    n_full = sum(_saved_arrays(base_ckpt.parent / "run" / "checkpoints" / "2").values())
    assert n_saved < 0.1 * n_full, (n_saved, n_full)


def _saved_arrays(step_dir):
    """``{path: element count}`` of the arrays an orbax checkpoint step recorded."""
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().metadata(step_dir / "state").item_metadata.tree
    return {jax.tree_util.keystr(k): int(np.prod(m.shape)) for k, m in jax.tree_util.tree_leaves_with_path(tree)}


def test_lora_export_loads_in_diffusers_and_in_the_pipeline(base_ckpt, tmp_path, capsys):
    from diffusers import Lumina2Transformer2DModel
    from nextdit_helpers import diffusers_forward, inputs

    from lumina_jax.convert.lora import load_lora, merge_lora
    from lumina_jax.convert.nextdit import load_transformer, save_transformer
    from lumina_jax.models.nextdit import NextDiT
    from lumina_jax.train.loop import Trainer, export_weights

    # a large LR so that two steps move the adapters far (the raw weights: the EMA trails them)
    Trainer(_lora_cfg(tmp_path / "run", base_ckpt, "optimizer.lr=5e-2", "lora.targets=[attention/(q|k|v|out/kernel)$, "
                      "w2/kernel$, adaLN_modulation/kernel$]"), stop_at=2).run()  # fmt: skip
    lora_dir = export_weights(tmp_path / "run", tmp_path / "lora", which="params", format="lora")
    merged_dir = export_weights(tmp_path / "run", tmp_path / "merged", which="params", format="jax")
    config, merged = load_transformer(merged_dir)
    _, base = load_transformer(base_ckpt)
    # our loader + merge on the base = the trainer's merged export
    lora = load_lora(lora_dir)
    assert lora.layout == "diffusers" and lora.ranks == [4]
    assert {m.scale for m in lora.modules.values()} == {2.0}  # alpha 8 / rank 4, from the metadata
    ours = merge_lora(base, config, lora)
    for (k, x), y in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(merged)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(k))
    # diffusers + PEFT: the exported base with the exported adapter = our merged model
    save_transformer(tmp_path / "base_diffusers", config, base, format="diffusers")
    ref = Lumina2Transformer2DModel.from_pretrained(tmp_path / "base_diffusers").eval()
    # (as Lumina2Pipeline.load_lora_weights(lora_dir) does: safetensors, alpha from the file's metadata)
    ref.load_lora_adapter(str(lora_dir), prefix="transformer", use_safetensors=True)
    x, t, cap, mask = inputs(config, batch=2, h=8, w=8, cap_lens=[5, 8], cap_pad=8)
    want = diffusers_forward(ref, x, t, cap, mask)
    got = NextDiT(config).apply({"params": merged}, *(jnp.asarray(a) for a in (x, t, cap, mask)))
    plain = NextDiT(config).apply({"params": base}, *(jnp.asarray(a) for a in (x, t, cap, mask)))
    assert rel_l2(want, np.asarray(plain)) > 3e-3  # the adapter changes the output (0.7 %) ...
    assert rel_l2(want, np.asarray(got)) <= 1e-5  # ... as diffusers applies it
    # the CLI: the same file; a run without lora has no adapter to export
    from lumina_jax.train.cli import main

    assert main(["export", str(tmp_path / "run"), str(tmp_path / "cli"), "--which", "params", "--format", "lora"]) == 0
    a = (tmp_path / "cli" / "pytorch_lora_weights.safetensors").read_bytes()
    assert a == (lora_dir / "pytorch_lora_weights.safetensors").read_bytes()
    assert main(["export", str(base_ckpt.parent / "run"), str(tmp_path / "none"), "--which", "params",
                 "--format", "lora"]) == 2  # fmt: skip
    assert "is not a LoRA run" in capsys.readouterr().err


def test_lora_units():
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.parallel.sharding import logical_names, model_abstract

    cfg = NextDiTConfig.from_yaml("nextdit_tiny")
    boxed = model_abstract(cfg)
    lc = LoraTrainConfig(rank=3)
    ab = abstract_lora(boxed, lc)
    names = logical_names(ab)
    q = names["layers"]["blocks"]["attention"]["q"]
    assert q["down"] == ("layers", "embed", None) and q["up"][:2] == ("layers", None)
    assert ab["layers"]["blocks"]["attention"]["q"]["down"].value.shape[-1] == 3
    from lumina_jax.parallel.sharding import unbox

    base = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), unbox(boxed))
    fresh = init_lora(ab, jax.random.PRNGKey(0))
    same = apply_lora(base, fresh, lc.scale)  # up starts at zero: the base model
    for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    shapes = {"a/kernel": (4, 4), "b/scale": (4,), "s/blocks/adaLN_modulation/kernel": (2, 4, 8),
              "s/blocks/adaLN_modulation/bias": (2, 8), "s/blocks/attention_norm1/scale": (2, 4),
              "s/blocks/attention/q": (2, 4, 4)}  # fmt: skip
    with pytest.raises(ValueError, match=r"'nothing' matches no weight matrix"):
        target_paths(shapes, LoraTrainConfig(targets=("a/kernel", "nothing")))
    assert target_paths(shapes, LoraTrainConfig(targets=("kernel",))) == ["a/kernel", "s/blocks/adaLN_modulation/kernel"]
    # stacked biases and norm scales are 2-D too, but no matrices
    assert target_paths(shapes, LoraTrainConfig(targets=("adaLN_modulation", "attention/q"))) == [
        "s/blocks/adaLN_modulation/kernel", "s/blocks/attention/q"]  # fmt: skip
    with pytest.raises(ValueError, match=r"'attention_norm1' matches no weight matrix"):
        target_paths(shapes, LoraTrainConfig(targets=("kernel", "attention_norm1")))
    for bad, msg in [(dict(rank=0), "rank must be >= 1"), (dict(alpha=0.0), "alpha must be > 0"),
                     (dict(targets=("(",)), "not a regular expression"), (dict(targets=()), "empty")]:
        with pytest.raises(ValueError, match=msg):
            LoraTrainConfig(**bad)
    from lumina_jax.train.config import load_config

    with pytest.raises(ValueError, match="trainable .* and lora are exclusive"):
        load_config("tiny_synthetic", ["lora.rank=4", "trainable=[layers]"])
    with pytest.raises(ValueError, match=r"unknown config key 'lora.rnak'.*known keys here: \['alpha', 'rank', 'targets'\]"):
        load_config("tiny_synthetic", ["lora.rnak=4"])


def test_bundled_lora_recipe_builds():
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.parallel.sharding import model_abstract
    from lumina_jax.train.config import load_config
    from lumina_jax.train.lora import lora_param_count

    cfg = load_config("lumina2_2b_lora")
    assert cfg.lora == LoraTrainConfig(rank=16, alpha=16.0) and cfg.lora.scale == 1.0
    ab = abstract_lora(model_abstract(NextDiTConfig.from_yaml(cfg.model)), cfg.lora)
    # 3 stacks (26 + 2 + 2 blocks) x 7 matrices x (down, up); ~1 % of the 2.6B params
    leaves_ = jax.tree.leaves(ab)
    assert len(leaves_) == 3 * 7 * 2 and sum(a.shape[0] for a in leaves_) == 30 * 7 * 2
    assert 20e6 < lora_param_count(ab) < 40e6


def test_lora_grad_accum_and_export_of_a_run_without_ema(base_ckpt, tmp_path):
    """grad_accum 2 trains the adapters with the base frozen (the base carries no gradient buffer through
    the micro-batch loop: its accumulator is a scalar); a run without EMA exports its raw adapter by
    default."""
    import json

    from lumina_jax.convert.lora import load_lora
    from lumina_jax.convert.nextdit import load_transformer
    from lumina_jax.train.loop import Trainer, export_weights

    tr = Trainer(_lora_cfg(tmp_path / "acc2", base_ckpt, "grad_accum=2", "ema_decay=null"), stop_at=2)
    tr.run()
    rows = [json.loads(x) for x in (tmp_path / "acc2" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    _, base = load_transformer(base_ckpt)
    for x, y in zip(jax.tree.leaves(jax.device_get(tr.state.params["base"])), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    out = export_weights(tmp_path / "acc2", tmp_path / "lora", format="lora")  # which="auto": the raw adapter
    assert load_lora(out).ranks == [4]


@pytest.mark.parametrize("fuse_qk", [False, True])
def test_side_path_equals_the_merged_weights_without_weight_gradients(fuse_qk):
    """The training forward (adapters as side paths through the ``lora`` collection) = the merged
    weights, forward and adapter gradients (fp32), on every kind of adapted layer (dense kernels, the
    q/k/v matrices, also through the fused q/k norm + RoPE kernel); its gradient program does fewer FLOPs
    (no full weight gradients)."""
    from nextdit_helpers import perturbed_tiny_case

    from lumina_jax.models.nextdit import NextDiT
    from lumina_jax.parallel.sharding import model_abstract, unbox
    from lumina_jax.sample.loop import compiled_flops
    from lumina_jax.train.lora import LoRAModel

    config, params, x, t, cap, mask = perturbed_tiny_case()
    lc = LoraTrainConfig(rank=3, alpha=6.0, targets=(*LoraTrainConfig().targets, "adaLN_modulation", "x_embedder"))
    rng = np.random.default_rng(0)
    lora = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32),
                        unbox(abstract_lora(model_abstract(config), lc)))  # fmt: skip
    model = NextDiT(config, fuse_qk_norm_rope=fuse_qk)
    frozen = jax.lax.stop_gradient(params)

    def side(ad):
        return LoRAModel(model, lc.scale).apply({"params": {"base": frozen, "lora": ad}}, x, t, cap, mask)

    def merged(ad):
        return model.apply({"params": apply_lora(frozen, ad, lc.scale)}, x, t, cap, mask)

    base = model.apply({"params": params}, x, t, cap, mask)
    assert rel_l2(merged(lora), base) > 0.1
    assert rel_l2(side(lora), merged(lora)) <= 1e-5
    loss = lambda f: (lambda ad: jnp.sum(jnp.square(f(ad))))  # noqa: E731
    g_side, g_merged = jax.grad(loss(side))(lora), jax.grad(loss(merged))(lora)
    for a, b in zip(jax.tree.leaves(g_side), jax.tree.leaves(g_merged)):
        assert rel_l2(a, b) <= 1e-4
    if not fuse_qk:
        f_side = compiled_flops(jax.jit(jax.grad(loss(side))).lower(lora).compile())
        f_merged = compiled_flops(jax.jit(jax.grad(loss(merged))).lower(lora).compile())
        assert f_side < 0.8 * f_merged, (f_side, f_merged)


def test_lora_flop_count_and_bench(tmp_path):
    """A LoRA step counts no weight-gradient matmuls (2x forward + the attention's extra backward):
    ~0.7x a full step for the 2B at 1024 px; ``bench train --lora`` runs and reports it."""
    import json

    from lumina_jax.bench.train import main
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.train.metrics import attention_flops, latent_tokens, train_flops_per_sample

    c = NextDiTConfig.from_yaml("nextdit_2b")
    full = train_flops_per_sample(c, 1024, 256, aux=False)
    lora = train_flops_per_sample(c, 1024, 256, aux=False, lora=True)
    att = attention_flops(c, 256, latent_tokens(c, 1024))
    assert lora["train"] == 2 * full["forward"] + att
    assert 0.65 < lora["train"] / full["train"] < 0.8
    rows = {}
    for name, extra in (("full", []), ("lora", ["--lora", "2"])):
        out = tmp_path / f"{name}.json"
        assert main(["--config", "nextdit_tiny", "--res", "64", "--batch", "8", "--steps", "1", "--no-aux",
                     "--dtype", "float32", "--attention", "xla", "--mesh", "dp", "--json", str(out), *extra]) == 0  # fmt: skip
        rows[name] = json.loads(out.read_text())
    assert rows["lora"]["lora_rank"] == 2 and rows["full"]["lora_rank"] is None
    assert rows["lora"]["train_flops_per_step"] < rows["full"]["train_flops_per_step"]
