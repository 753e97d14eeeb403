"""Pretrain the shapes model's tiny Gemma-2 as a causal LM: ``python -m lumina_jax.shapes train-text-encoder``.

Lumina-Image 2.0 conditions on a *pretrained*, frozen Gemma-2-2B: its hidden states are contextual, so a
token's features already say what it belongs to. A random encoder (the earlier shapes recipes) gives
features that are little more than per-token embeddings, and the DiT then has to learn attribute binding
("red" goes with "circle" goes with "left") by itself. Here the tiny Gemma-2 (``configs/model/
shapes_gemma2_lm.yaml``) is trained on next-token prediction over captions of *training* scenes (held-out
combinations are never shown), with the system prompt the pipeline samples with, using Gemma's tied
output embedding and final logit soft-capping; then it is frozen and saved in transformers' layout.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from lumina_jax.shapes import spec
from lumina_jax.shapes.fit import adamw_cosine, run_steps

TEXT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "model" / "shapes_gemma2_lm.yaml"


@dataclasses.dataclass(frozen=True)
class TextTrainConfig:
    steps: int = 1500
    batch: int = 64
    seq_len: int = 64
    lr: float = 3e-3
    warmup: int = 100
    system_prompt: str = "real"
    seed: int = 0


def caption_batch(rng: np.random.Generator, tokenizer: Any, n: int, seq_len: int, system_prompt: str, *,
                  held_out: bool = False):  # fmt: skip
    """``(ids, mask)`` int32/bool ``(n, seq_len)``: right-padded captions of random training scenes
    (``held_out=True``: scenes with a held-out combination)."""
    from lumina_jax.text_templates import build_prompt

    texts = [build_prompt(spec.caption(spec.random_scene(rng, held_out=held_out), rng=rng), system_prompt)
             for _ in range(n)]  # fmt: skip
    enc = tokenizer(texts, padding="max_length", max_length=seq_len, truncation=True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)


def lm_logits(params: Any, ids: Any, mask: Any, config: Any) -> Any:
    """Gemma-2 LM logits from the encoder's final hidden state and the tied embedding (soft-capped)."""
    import jax.numpy as jnp

    from lumina_jax.models.gemma2 import encode

    h = encode(params, ids, mask, config).last_hidden_state
    logits = h @ params["embed_tokens"]["embedding"].T
    cap = config.final_logit_softcapping
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def train_text_encoder(out_dir: str | Path, tokenizer_dir: str | Path, cfg: TextTrainConfig = TextTrainConfig(), *,
                       config_path: str | Path = TEXT_CONFIG, progress: bool = True,
                       overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Train, save to ``out_dir`` (transformers layout); returns metrics (next-token loss/accuracy).
    An existing ``out_dir`` is a ``FileExistsError`` before training, unless ``overwrite`` (then replaced)."""
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    import jax
    import jax.numpy as jnp
    import optax

    from lumina_jax.convert.gemma2 import save_text_encoder
    from lumina_jax.models.gemma2 import Gemma2Config, init_params
    from lumina_jax.text import load_tokenizer

    gcfg = Gemma2Config.from_yaml(config_path)
    tok = load_tokenizer(tokenizer_dir)
    if len(tok) > gcfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} pieces, more than the encoder's vocab_size {gcfg.vocab_size}")
    params = init_params(gcfg, jax.random.PRNGKey(cfg.seed))
    opt = adamw_cosine(cfg.lr, cfg.warmup, cfg.steps, b2=0.98)
    opt_state = opt.init(params)

    def loss_fn(p, ids, mask):
        logits = lm_logits(p, ids, mask, gcfg)[:, :-1]
        target, valid = ids[:, 1:], mask[:, 1:]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), target)
        acc = (jnp.argmax(logits, -1) == target)
        n = jnp.maximum(valid.sum(), 1)
        return jnp.sum(nll * valid) / n, jnp.sum(acc * valid) / n

    @jax.jit
    def step(p, s, ids, mask):
        (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(p, ids, mask)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss, acc

    rng = np.random.default_rng([cfg.seed, 31])
    t0 = time.perf_counter()
    state = {"params": params, "opt": opt_state}

    def one_step(i: int) -> dict[str, Any]:
        ids, mask = caption_batch(rng, tok, cfg.batch, cfg.seq_len, cfg.system_prompt)
        state["params"], state["opt"], loss, acc = step(state["params"], state["opt"], ids, mask)
        return {"loss": loss, "accuracy": acc}

    hist = run_steps(cfg.steps, one_step, desc="train-text-encoder", every=100, progress=progress)
    params = state["params"]
    # held-out captions: the next-token loss on combinations never trained on
    ho = caption_batch(np.random.default_rng([cfg.seed, 32]), tok, 256, cfg.seq_len, cfg.system_prompt, held_out=True)
    ho_loss, ho_acc = jax.jit(loss_fn)(params, *ho)
    metrics = {"steps": cfg.steps, "seconds": round(time.perf_counter() - t0, 1), "train_loss": hist[-1]["loss"],
               "train_accuracy": hist[-1]["accuracy"], "held_out_loss": float(ho_loss),
               "held_out_accuracy": float(ho_acc), "history": hist, "config": dataclasses.asdict(cfg)}  # fmt: skip
    out_dir = Path(out_dir)
    save_text_encoder(out_dir, gcfg, jax.tree.map(np.asarray, params), overwrite=overwrite)
    (out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics
