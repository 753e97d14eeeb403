"""``python -m lumina_jax.bench attention [--batch 2 --image-tokens 4096 --caption-tokens 256 ...]``

Every attention backend available on this platform at Lumina's shapes (24 q / 8 kv heads, head_dim 96),
forward and forward+backward, in one run. For the whole model with each backend use
``python -m lumina_jax.bench forward --attention BACKEND``.
"""

from __future__ import annotations

import argparse

from lumina_jax.bench import write_json


def main(argv: list[str]) -> int:
    from lumina_jax.config_utils import int_at_least

    ap = argparse.ArgumentParser(prog="python -m lumina_jax.bench attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--batch", type=int_at_least(1), default=2)
    ap.add_argument("--image-tokens", type=int, default=4096)
    ap.add_argument("--caption-tokens", type=int, default=256)
    ap.add_argument("--valid-caption-tokens", type=int, default=None)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=96)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--backends", nargs="*", default=None, help="default: all that run on this platform")
    ap.add_argument("--iters", type=int_at_least(1), default=20)
    ap.add_argument("--warmup", type=int_at_least(0), default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="instead: time our Pallas kernel at several block sizes")
    a = ap.parse_args(argv)
    from lumina_jax.ops.attention_bench import SWEEP_CONFIGS, bench_attention, format_rows, sweep_pallas_blocks

    if a.sweep:
        shape = dict(batch=a.batch, image_tokens=a.image_tokens, caption_tokens=a.caption_tokens, heads=a.heads,
                     kv_heads=a.kv_heads, head_dim=a.head_dim, dtype=a.dtype)  # fmt: skip
        rows = []
        for modes, configs in SWEEP_CONFIGS:
            rows += sweep_pallas_blocks(configs, modes=modes, iters=a.iters, warmup=a.warmup, **shape,
                                        on_row=lambda r: print(r["mode"], r["blocks"], "padded D" if r["pad_head_dim"] else "",
                                                               f"{r['ms']:.3f} ms",
                                                               r["error"] or "", flush=True))  # fmt: skip
            if a.json:  # after each group, so a time limit keeps what was measured
                write_json(a.json, rows)
        return 0

    def on_rows(rows: list[dict]) -> None:
        r = rows[-1]
        print(r["backend"], r["mode"], f"{r['ms']:.3f} ms", r["error"] or "", flush=True)
        if a.json:
            write_json(a.json, rows)

    rows = bench_attention(batch=a.batch, image_tokens=a.image_tokens, caption_tokens=a.caption_tokens,
                           heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, dtype=a.dtype,
                           backends=a.backends, valid_caption_tokens=a.valid_caption_tokens,
                           iters=a.iters, warmup=a.warmup, on_rows=on_rows)  # fmt: skip
    print(format_rows(rows))
    return 0
