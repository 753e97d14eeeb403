"""``python -m lumina_jax.bench data [--kind raw cache] [--res 256 1024] [--workers 0 1 2] [--n 256] [--plan global host]``

Images/s delivered by the input pipeline (decode + crop + normalise for raw JPEG/PNG; record reads for
the latent cache) on this machine, on images it generates itself. Compare with what one accelerator
consumes (see BENCHMARKS.md for the rates we compare against). ``--plan``: who buckets the records
(``global``: the plan every host agrees on, from the size index -- raw images are indexed first, and
the row reports the header reads/s of that indexing; ``host``: per-host buckets).
``--plan-records N``: the global plan alone over a synthetic index of N records (``--kind cache``: crop
sizes and caption lengths; ``--kind raw``: original image sizes, fitted to the crop list by the plan).
"""

from __future__ import annotations

import argparse

from lumina_jax.bench import write_json


def main(argv: list[str]) -> int:
    from lumina_jax.config_utils import int_at_least

    ap = argparse.ArgumentParser(prog="python -m lumina_jax.bench data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--kind", nargs="+", default=["raw", "cache"], choices=["raw", "cache"])
    ap.add_argument("--res", nargs="+", type=int, default=[256, 1024])
    ap.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--plan", nargs="+", default=["global"], choices=["global", "host"])
    ap.add_argument("--n", type=int_at_least(1), default=256)
    ap.add_argument("--batch", type=int_at_least(1), default=8)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plan-records", type=int, default=0, metavar="N",
                    help="instead: time the global bucket plan alone over a size index of N records "
                         "(global batch --batch, stage --res; e.g. --plan-records 100000000 --batch 1024 --res 1024)")
    a = ap.parse_args(argv)
    bad = [r for r in a.res if r < 16 or r % 16]
    if bad:
        ap.error(f"--res {bad}: resolutions must be positive multiples of 16 px")
    if a.plan_records:
        from lumina_jax.bench import print_table
        from lumina_jax.data.bench import bench_plan

        rows = [bench_plan(records=a.plan_records, global_batch=a.batch, res=r, kind=k) for k in a.kind for r in a.res]
        print_table(rows)
        if a.json:
            write_json(a.json, rows)
        return 0
    from lumina_jax.bench import print_table
    from lumina_jax.data.bench import bench_data

    rows = []
    for kind in a.kind:
        for res in a.res:
            for w in a.workers:
                for plan in a.plan:
                    info: dict = {}
                    ips = bench_data(kind=kind, res=res, workers=w, n=a.n, batch_size=a.batch, bucket_plan=plan,
                                     info=info)  # fmt: skip
                    rows.append(dict(kind=kind, res=res, workers=w, plan=plan, images_per_s=ips,
                                     index_images_per_s=info.get("index_images_per_s")))  # fmt: skip
                    if len(rows) == 1:
                        print_table(rows[-1:])
                    else:
                        print(f"{kind:5s} {res:5d} {w:2d} {plan:6s} {ips:10.1f}", flush=True)
    print()
    print_table(rows)
    if a.json:
        write_json(a.json, rows)
    return 0


if __name__ == "__main__":  # worker processes start with spawn
    import sys

    sys.exit(main(sys.argv[1:]))
