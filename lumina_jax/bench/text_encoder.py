"""``python -m lumina_jax.bench text-encoder [--config gemma2_2b --batch 2 --seq-len 256 --dtype bf16]``

Gemma-2 ``hidden_states[-2]`` in JAX vs transformers' ``Gemma2Model`` (same random weights, same run).
"""

from __future__ import annotations

import argparse

from lumina_jax.bench import write_json


def main(argv: list[str]) -> int:
    from lumina_jax.config_utils import int_at_least

    ap = argparse.ArgumentParser(prog="python -m lumina_jax.bench text-encoder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--config", default="gemma2_tiny")
    ap.add_argument("--batch", type=int_at_least(1), nargs="+", default=[2])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--valid-len", type=int, default=None)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--iters", type=int_at_least(1), default=5)
    ap.add_argument("--warmup", type=int_at_least(0), default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from lumina_jax.models.gemma2_bench import bench_text_encoder, format_rows

    rows = bench_text_encoder(a.config, batch_sizes=a.batch, seq_len=a.seq_len, valid_len=a.valid_len,
                              dtype=a.dtype, warmup=a.warmup, iters=a.iters, torch_reference=not a.no_reference,
                              on_rows=(lambda rows: write_json(a.json, rows)) if a.json else None)  # fmt: skip
    print(format_rows(rows))
    return 0
