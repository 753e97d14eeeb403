"""Timing of the Gemma-2 text encoder: our JAX port vs transformers' ``Gemma2Model``, in one run.

Both sides get the *same* random weights (a torch model is built and converted through the one key
mapper, :mod:`lumina_jax.convert.gemma2`), the same right-padded token batch, and compute the Lumina
features ``hidden_states[-2]``; each row also reports how far the JAX features are from torch's, so a
fast-but-wrong result is visible in the table. Wired into ``python -m lumina_jax.bench text-encoder``.

:func:`reference_pair` (a random torch ``Gemma2Model`` and the matching JAX params) is shared with the
parity tests.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.models.gemma2 import Gemma2Config, dit_features

_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
_JNP = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}


def resolve_config(config: str | Path | Gemma2Config) -> Gemma2Config:
    """A ``Gemma2Config``, a YAML path, or a name under ``configs/model`` (``"gemma2_tiny"``)."""
    if isinstance(config, Gemma2Config):
        return config
    p = Path(config)
    if not p.suffix:
        p = _CONFIG_DIR / f"{config}.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"no Gemma-2 config {config!r} (looked for {p})")
    return Gemma2Config.from_yaml(p)


def reference_pair(config: Gemma2Config, seed: int = 0, *, spread: bool = True, device: str = "cpu") -> tuple[Any, dict]:
    """A random transformers ``Gemma2Model`` (eager attention, fp32, eval mode) and our params for it.

    ``device``: where torch builds (and initialises) the model; ``"cuda"`` makes the 2.6B gemma-2-2b shapes
    take seconds instead of most of a minute on the host. Weights differ between devices for one seed.

    ``spread=True`` draws weights wide enough that every Gemma-2 feature changes the output: norm
    weights away from 0 (so ``1 + w`` matters), unit-variance embeddings, and q/k projections large
    enough that attention logits reach the soft-cap. (transformers' own init has zero norms and tiny
    weights, which would hide bugs.)
    """
    import torch
    from transformers import Gemma2Config as HFConfig, Gemma2Model

    from lumina_jax.convert.gemma2 import torch_state_dict_to_params

    hf_config = HFConfig(**config.to_hf_config("float32"))
    hf_config._attn_implementation = "eager"  # sdpa has no soft-capping; eager is HF's reference path
    torch.manual_seed(seed)
    with torch.device(device):
        model = Gemma2Model(hf_config).eval()
    if spread:
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    std = 0.5
                elif "embed" in name:
                    std = 1.0
                elif "q_proj" in name or "k_proj" in name:
                    std = 0.3
                else:
                    std = 0.1
                p.normal_(0.0, std, generator=gen)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return model, torch_state_dict_to_params(state, config)


def forward_flops(config: Gemma2Config, batch: int, length: int) -> float:
    """Matmul FLOPs of one forward (attention counted over the full L x L square, as computed)."""
    c = config
    t = batch * length
    proj = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)  # q, o, k, v
    mlp = 3 * c.hidden_size * c.intermediate_size
    attn = 2 * batch * c.num_heads * length * length * c.head_dim  # QK^T and PV
    return float(c.num_layers * (2 * t * (proj + mlp) + 2 * attn))


def _time(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_text_encoder(
    config: str | Path | Gemma2Config = "gemma2_tiny",
    *,
    batch_sizes: Sequence[int] = (1, 4),
    seq_len: int = 256,
    valid_len: int | None = None,
    dtype: str = "bf16",
    warmup: int = 2,
    iters: int = 5,
    torch_reference: bool = True,
    seed: int = 0,
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Time ``hidden_states[-2]`` for JAX (jit, compiled once per shape) and, optionally, transformers.

    ``valid_len`` tokens per row are real and the rest right padding (default: all real). ``dtype`` is
    the compute dtype on both sides (torch runs the model cast to it; JAX casts the matmul weights and the
    embedding table to it once, as :class:`~lumina_jax.pipeline.Lumina2Pipeline` does). Returns
    one dict per (implementation, batch size): ``impl, device, batch, seq_len, valid_len, dtype,
    compile_s, ms_mean, ms_min, tokens_per_s, tflop_s, rel_l2_vs_torch`` (the last one for JAX rows,
    measured on valid tokens against torch in the same dtype; NaN without the torch reference).
    """
    cfg = resolve_config(config)
    if dtype not in _JNP:
        raise ValueError(f"dtype must be one of {sorted(_JNP)}, got {dtype!r}")
    valid_len = seq_len if valid_len is None else int(valid_len)
    if not 1 <= valid_len <= seq_len:
        raise ValueError(f"valid_len={valid_len} must be in [1, seq_len={seq_len}]")
    jdt = _JNP[dtype]

    if torch_reference:
        import torch

        tdev = "cuda" if torch.cuda.is_available() else "cpu"
        model, params = reference_pair(cfg, seed, spread=False, device=tdev)
        model = model.to(device=tdev, dtype=torch.float32 if jdt == jnp.float32 else torch.bfloat16)
    else:
        from lumina_jax.models.gemma2 import init_params

        params = init_params(cfg, jax.random.PRNGKey(seed))
    if jdt != jnp.float32:  # as the pipeline holds them: matmul weights and the table cast once, not per call
        from lumina_jax.models.nextdit import cast_matmul_weights

        params = cast_matmul_weights(params, jdt, names=("kernel", "embedding"))
    params = jax.device_put(params)
    fwd = jax.jit(lambda p, i, m: dit_features(p, i, m, cfg, dtype=jdt))
    jax_device = str(jax.devices()[0].device_kind)

    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(seed)
    for b in batch_sizes:
        ids = rng.integers(3, cfg.vocab_size, size=(b, seq_len)).astype(np.int32)
        ids[:, 0] = cfg.bos_token_id
        mask = np.zeros((b, seq_len), bool)
        mask[:, :valid_len] = True
        ids[~mask] = cfg.pad_token_id
        flops = forward_flops(cfg, b, seq_len)
        common = dict(batch=b, seq_len=seq_len, valid_len=valid_len, dtype=dtype)

        t0 = time.perf_counter()
        compiled = fwd.lower(params, ids, mask).compile()
        compile_s = time.perf_counter() - t0
        jids, jmask = jax.device_put(ids), jax.device_put(mask)
        out = compiled(params, jids, jmask).block_until_ready()
        ts = _time(lambda: compiled(params, jids, jmask).block_until_ready(), warmup, iters)
        jax_row = dict(impl="jax", device=jax_device, compile_s=compile_s, **common, **_stats(ts, b * seq_len, flops))

        rel = math.nan
        if torch_reference:
            tids = torch.from_numpy(ids.astype(np.int64)).to(tdev)
            tmask = torch.from_numpy(mask.astype(np.int64)).to(tdev)

            def run_torch():
                with torch.inference_mode():
                    h = model(input_ids=tids, attention_mask=tmask, output_hidden_states=True).hidden_states[-2]
                if tdev == "cuda":
                    torch.cuda.synchronize()
                return h

            ref = run_torch().float().cpu().numpy()
            ts_t = _time(run_torch, warmup, iters)
            got = np.asarray(out.astype(jnp.float32))
            rel = float(np.linalg.norm(got[mask] - ref[mask]) / np.linalg.norm(ref[mask]))
            rows.append(dict(impl="torch", device=tdev, compile_s=0.0, **common, **_stats(ts_t, b * seq_len, flops),
                             rel_l2_vs_torch=0.0))
        rows.append({**jax_row, "rel_l2_vs_torch": rel})
        if on_rows is not None:  # the rows so far, after each batch size: a run cut by a time limit keeps them
            on_rows(rows)
    return rows


def _stats(ts: list[float], tokens: int, flops: float) -> dict[str, float]:
    mean = float(np.mean(ts))
    return dict(ms_mean=1e3 * mean, ms_min=1e3 * float(np.min(ts)), tokens_per_s=tokens / mean,
                tflop_s=flops / mean / 1e12)


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`bench_text_encoder` rows."""
    cols = ["impl", "device", "batch", "seq_len", "valid_len", "dtype", "compile_s", "ms_mean", "ms_min",
            "tokens_per_s", "tflop_s", "rel_l2_vs_torch"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    table = [cols] + [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in table)


__all__ = ["bench_text_encoder", "format_rows", "forward_flops", "reference_pair", "resolve_config"]
