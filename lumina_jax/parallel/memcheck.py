"""Host-memory check of sharded initialisation: the model is never materialised whole.

    python -m lumina_jax.parallel.memcheck --config nextdit_7b --dtype bf16 --devices 8 --mesh fsdp

Runs (in a child process with ``--devices`` virtual CPU devices) ``jax.eval_shape`` of the init
(no memory), then :func:`lumina_jax.parallel.sharding.init_params_sharded` (jit with
``out_shardings``: every device computes only its own slice), and reports as JSON:

* ``param_bytes``: the whole model in ``--dtype``; ``max_device_bytes``: the largest per-device share;
* ``rss_base``: process RSS before the init; ``rss_peak``: peak RSS (``ru_maxrss``) after it;
* ``excess_over_shards``: ``rss_peak - rss_base - sum of all shards``.

On CPU all virtual devices live in this one process, so the shards themselves add up to the model
size; what must not appear is a second, unsharded copy: ``excess_over_shards`` stays at compile and
runtime overhead (well below one model copy), and ``max_device_bytes`` ~ ``param_bytes / devices``.
(On a TPU/GPU host only that host's shards are in device memory and nothing model-sized on the host.)

The full 7B in fp32 is 33 GB, more than a 24 GB machine: use ``--dtype bf16`` (16.5 GB) or
``--layers`` to shrink depth (same widths, same per-layer shapes). Measured (BENCHMARKS.md): the full
32-layer 7B in bf16 peaks 1.48 GiB above base + shards, less than one device's share (1.92 GiB); the
excess is the RNG temporaries of one layer's largest weight (threefry counters and bits, ~4x its fp32
size, summed over the devices) plus allocator slack, and does not grow with depth.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(config: str, dtype: str, mesh_preset: str, layers: int | None, refiner_layers: int | None) -> dict:
    import jax
    import jax.numpy as jnp

    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.parallel import mesh as M
    from lumina_jax.parallel import sharding as S

    cfg = NextDiTConfig.from_yaml(config)
    if layers is not None:
        cfg = cfg.replace(n_layers=layers)
    if refiner_layers is not None:
        cfg = cfg.replace(n_refiner_layers=refiner_layers)
    mesh = M.create_mesh(M.MeshConfig.parse(mesh_preset))
    dt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    abstract = S.unbox(S.model_abstract(cfg))
    param_bytes = sum(int(a.size) * jnp.dtype(dt).itemsize for a in jax.tree.leaves(abstract))
    rss_base = rss_bytes()
    t0 = time.perf_counter()
    params = S.init_params_sharded(cfg, mesh, 0, dtype=dt)
    jax.block_until_ready(params)
    dt_s = time.perf_counter() - t0
    per_dev = S.per_device_bytes(params)
    shards = sum(per_dev.values())
    peak = peak_rss_bytes()
    return {
        "config": config, "layers": cfg.n_layers, "refiner_layers": cfg.n_refiner_layers, "dtype": dtype,
        "mesh": M.describe(mesh), "params": sum(int(a.size) for a in jax.tree.leaves(abstract)),
        "param_bytes": param_bytes, "sum_shard_bytes": shards, "max_device_bytes": max(per_dev.values()),
        "min_device_bytes": min(per_dev.values()), "rss_base": rss_base, "rss_after": rss_bytes(), "rss_peak": peak,
        "excess_over_shards": peak - rss_base - shards, "init_seconds": dt_s,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="nextdit_7b")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--mesh", default="fsdp",
                   help="mesh: a preset (dp, fsdp, fsdp_tensor, context), axis sizes (fsdp=2,tensor=2) or both")
    p.add_argument("--layers", type=int, default=None, help="override n_layers (keep widths)")
    p.add_argument("--refiner-layers", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.child:  # re-run with the virtual devices set before JAX starts
        from lumina_jax.xla_flags import with_cpu_devices

        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=with_cpu_devices(args.devices))
        return subprocess.call([sys.executable, "-m", "lumina_jax.parallel.memcheck", "--child", *(argv or sys.argv[1:])],
                               env=env)  # fmt: skip
    r = measure(args.config, args.dtype, args.mesh, args.layers, args.refiner_layers)
    gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(json.dumps(r, indent=1))
    print(f"{r['config']} ({r['params'] / 1e9:.2f}B params, {r['dtype']}): model {gb(r['param_bytes'])}, "
          f"largest device share {gb(r['max_device_bytes'])}, RSS base {gb(r['rss_base'])} -> peak {gb(r['rss_peak'])}; "
          f"peak minus all shards minus base = {gb(r['excess_over_shards'])}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
