"""``python -m lumina_jax.bench vae-decode [--config vae_flux --res 1024 --batch 1 --dtype bf16 --tile 64]``

FLUX VAE decode in JAX (plain, and tiled with ``--tile``) vs diffusers' ``AutoencoderKL.decode``
(same random weights and latents, same run; ``--compile`` adds torch.compile).
"""

from __future__ import annotations

import argparse

from lumina_jax.bench import write_json


def main(argv: list[str]) -> int:
    from lumina_jax.config_utils import int_at_least

    ap = argparse.ArgumentParser(prog="python -m lumina_jax.bench vae-decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--config", default="vae_tiny")
    ap.add_argument("--res", type=int, nargs="+", default=[256], help="square image sizes in pixels")
    ap.add_argument("--batch", type=int_at_least(1), default=1)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--tile", type=int, default=None, help="also time tiled decode with this latent tile size")
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--iters", type=int_at_least(1), default=10)
    ap.add_argument("--warmup", type=int_at_least(0), default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from lumina_jax.bench import print_table
    from lumina_jax.models.vae_bench import bench_vae_decode

    rows = bench_vae_decode(a.config, resolutions=a.res, batch=a.batch, dtype=a.dtype, iters=a.iters,
                            warmup=a.warmup, tile=a.tile, overlap=a.overlap, torch_compile=a.compile,
                            run_diffusers=not a.no_reference,
                            on_rows=(lambda rows: write_json(a.json, rows)) if a.json else None)  # fmt: skip
    print_table(rows)
    return 0
