"""``python -m lumina_jax.bench forward --config nextdit_2b --res 1024 1024 --batch 2 [--reference diffusers] [--compile]``

Times one Next-DiT forward in JAX and, in the same run, diffusers' ``Lumina2Transformer2DModel`` with the
same weights (eager, and with ``--compile`` also under ``torch.compile``). Reports ms per forward,
TFLOP/s from the analytic count (``flops_forward``, the count of ``shared/bench/diffusers_anchor.py``),
the JAX/reference speed ratio and the relative L2 difference of the outputs (a sanity check that both
sides computed the same thing).

``--res`` is in pixels (latent = res/8). Caption: ``--cap-valid`` valid tokens padded to ``--cap-pad``.
``--attention`` takes several backends (``--attention cudnn pallas xla``): the first is compared with the
reference, the others are extra JAX rows on the same weights and inputs (one process, one weight init).
``--profile FILE`` writes a device trace of three forwards with the first backend (xprof XSpace);
``--hlo-dump FILE`` the optimised HLO of that program (fusion names in a trace map to its ops).
``--unroll`` also times the first backend with unrolled layers (``scan_layers=False``): no per-layer slice
of the stacked weights, at the price of a longer compile. ``--fused-qk`` also times it with the fused q/k
RMSNorm + RoPE kernel (``fuse_qk_norm_rope``), and with ``--unroll`` both together.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from lumina_jax.bench import write_json


def _torch_reference(config, params, dtype_name: str):
    import torch
    from diffusers import Lumina2Transformer2DModel

    from lumina_jax.convert.common import flatten
    from lumina_jax.convert.nextdit import diffusers_rules, jax_to_torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    with torch.device(device):  # (not "meta": the RoPE tables are plain tensors, not buffers)
        model = Lumina2Transformer2DModel(**{k: v for k, v in config.to_diffusers_config().items() if not k.startswith("_")})
    model = model.to(dtype=tdtype).eval()
    with torch.no_grad():
        state = model.state_dict()
        for k, v in jax_to_torch(flatten(params), diffusers_rules(config), "fp32"):
            state[k].copy_(torch.from_numpy(np.asarray(v, np.float32)))
    return model, device, tdtype


def _time_torch(fn, device: str, warmup: int, iters: int) -> float:
    import torch

    with torch.no_grad():
        for _ in range(warmup):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))


def main(argv: list[str]) -> int:
    from lumina_jax.config_utils import int_at_least

    ap = argparse.ArgumentParser(prog="python -m lumina_jax.bench forward", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--config", default="nextdit_tiny")
    ap.add_argument("--res", type=int, nargs=2, default=[64, 64], metavar=("H", "W"), help="image size in pixels")
    ap.add_argument("--batch", type=int_at_least(1), default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--cap-valid", type=int, default=96)
    ap.add_argument("--cap-pad", type=int, default=128)
    ap.add_argument("--attention", nargs="+", default=["auto"],
                    help="attention backend(s) (auto, xla, cudnn, pallas, ...); the first is compared with the reference")
    ap.add_argument("--reference", choices=["none", "diffusers"], default="diffusers")
    ap.add_argument("--compile", action="store_true", help="also time diffusers under torch.compile")
    ap.add_argument("--warmup", type=int_at_least(0), default=3)
    ap.add_argument("--iters", type=int_at_least(1), default=10)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--profile", default=None, metavar="FILE", help="write an xprof trace of the first backend here")
    ap.add_argument("--hlo-dump", default=None, metavar="FILE", help="write the optimised HLO of the first backend here")
    ap.add_argument("--unroll", action="store_true", help="also time the first backend with unrolled layers")
    ap.add_argument("--fused-qk", action="store_true", help="also time the first backend with the fused q/k norm + RoPE")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from lumina_jax.bench import block, capture_profile, print_table, time_fn
    from lumina_jax.models.nextdit import NextDiT, NextDiTConfig, flops_forward, init_params, unstack_layers

    config = NextDiTConfig.from_yaml(args.config)
    h, w = args.res
    if h % 16 or w % 16:
        raise SystemExit(f"--res {h} {w}: sizes must be multiples of 16 px")
    lh, lw = h // 8, w // 8
    n_img = (lh // config.patch_size) * (lw // config.patch_size)
    cap_valid = min(args.cap_valid, args.cap_pad)
    flops = args.batch * flops_forward(config, cap_valid, n_img)
    dt = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[args.dtype]

    # random weights; adaLN/final layer are zero-initialised by the model, so perturb them to make the
    # output comparison meaningful
    params = init_params(config, 0)
    key = jax.random.PRNGKey(1)
    params = jax.tree_util.tree_map(lambda p: p + 0.02 * jax.random.normal(key, p.shape, p.dtype), params)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, lh, lw, config.in_channels)).astype(np.float32)
    t = rng.uniform(0, 1, args.batch).astype(np.float32)
    cap = rng.standard_normal((args.batch, args.cap_pad, config.cap_feat_dim)).astype(np.float32)
    mask = np.zeros((args.batch, args.cap_pad), bool)
    mask[:, :cap_valid] = True

    run_params = jax.device_put(jax.tree_util.tree_map(lambda p: p.astype(dt), params))
    jargs = [jax.device_put(jnp.asarray(a)) for a in (x, t, cap.astype(np.float32), mask)]
    jargs[2] = jargs[2].astype(dt)
    device = str(jax.devices()[0].device_kind)
    rows, out = [], None
    first_backend = args.attention[0]
    extra = [(first_backend, False, False)] if args.unroll else []
    if args.fused_qk:
        extra += [(first_backend, True, True)] + ([(first_backend, False, True)] if args.unroll else [])
    variants = [(args.attention[0], True, False), *extra] + [(b, True, False) for b in args.attention[1:]]

    def dump() -> None:  # after every row, so a time limit keeps what was measured
        if args.json:
            write_json(args.json, dict(args=vars(args), xla_flags=os.environ.get("XLA_FLAGS", ""), rows=rows))

    def run_variant(backend: str, scan: bool, fused: bool) -> None:
        nonlocal out, first
        model = NextDiT(config, dtype=dt, attention_backend=backend, scan_layers=scan, fuse_qk_norm_rope=fused)
        fwd = jax.jit(lambda p, x, t, c, m, model=model: model.apply({"params": p}, x, t, c, m))
        p_run = run_params if scan else unstack_layers(run_params)
        tags = [backend] + ([] if scan else ["unrolled layers"]) + (["fused q/k norm+RoPE"] if fused else [])
        name = f"jax ({', '.join(tags)})"
        t0 = time.perf_counter()
        try:  # one compile serves the timing, the trace and the HLO dump
            fwd = fwd.lower(p_run, *jargs).compile()
            y = block(fwd(p_run, *jargs))
        except Exception as e:  # one backend that cannot run here must not stop the others
            print(f"{name} failed: {type(e).__name__}: {e}"[:2000], flush=True)
            rows.append(dict(impl=name, device=device, error=f"{type(e).__name__}: {e}"[:300]))
            dump()
            return
        compile_s = time.perf_counter() - t0
        r = time_fn(lambda fwd=fwd, p=p_run: fwd(p, *jargs), warmup=args.warmup, iters=args.iters, sync=block)
        row = dict(impl=name, device=device, ms=r["median_ms"], tflops=flops / r["median_ms"] / 1e9,
                   compile_s=compile_s)  # fmt: skip
        if out is None:
            out, first = y, len(rows)
            if args.profile:
                capture_profile(lambda fwd=fwd, p=p_run: fwd(p, *jargs), args.profile)
            if args.hlo_dump:
                with open(args.hlo_dump, "w") as f:
                    f.write(fwd.as_text())
        else:
            row["rel_l2_vs_first"] = float(np.linalg.norm(np.asarray(y, np.float64) - np.asarray(out, np.float64))
                                           / np.linalg.norm(np.asarray(out, np.float64)))  # fmt: skip
        rows.append(row)
        print(row, flush=True)
        dump()

    def run_references() -> None:
        """diffusers eager (and torch.compile) right after the first JAX variant that ran: the headline
        comparison is measured before the other variants, which a time limit may cut."""
        import torch

        jax_ms = rows[first]["ms"]
        ref, tdev, tdtype = _torch_reference(config, params, args.dtype)
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(tdev, tdtype)
        tt = torch.from_numpy(t).to(tdev)
        tc = torch.from_numpy(cap).to(tdev, tdtype)
        tm = torch.from_numpy(mask).to(tdev)
        with torch.no_grad():
            ref_out = ref(tx, tt, tc, tm, return_dict=False)[0].float().cpu().numpy().transpose(0, 2, 3, 1)
        diff = float(np.linalg.norm(np.asarray(out, np.float64) - ref_out) / np.linalg.norm(ref_out))
        rows[first]["rel_l2_vs_ref"] = diff
        tname = torch.cuda.get_device_name(0) if tdev == "cuda" else "cpu"

        def time_ref(name: str, m, **extra) -> None:
            ms = _time_torch(lambda: m(tx, tt, tc, tm, return_dict=False), tdev, args.warmup, args.iters)
            rows.append(dict(impl=name, device=tname, ms=ms, tflops=flops / ms / 1e9, jax_speedup=ms / jax_ms,
                             **extra))  # fmt: skip
            print(rows[-1], flush=True)
            dump()

        time_ref("diffusers eager", ref)
        if args.compile:
            t0 = time.perf_counter()
            cm = torch.compile(ref)
            with torch.no_grad():
                cm(tx, tt, tc, tm, return_dict=False)
            time_ref("diffusers torch.compile", cm, compile_s=time.perf_counter() - t0)

    first = None
    references_done = args.reference != "diffusers"
    for backend, scan, fused in variants:
        run_variant(backend, scan, fused)
        if out is not None and not references_done:
            references_done = True
            run_references()
            import torch

            if torch.cuda.is_available():  # the reference's tensors went with its frame: the JAX variants that
                torch.cuda.empty_cache()  # follow get that device memory back
    if out is None:
        raise SystemExit(f"every JAX backend failed: {rows}")
    jax_rows = [r for r in rows if r.get("impl", "").startswith("jax") and "ms" in r]
    best = min(jax_rows, key=lambda r: r["ms"])
    for r in rows:  # against the fastest JAX variant too (jax_speedup is against the first)
        if "jax_speedup" in r:
            r["best_jax_speedup"], r["best_jax"] = r["ms"] / best["ms"], best["impl"]

    print(f"Next-DiT forward: config={args.config} res={h}x{w} batch={args.batch} dtype={args.dtype} "
          f"tokens={cap_valid}+{n_img} flops={flops / 1e12:.3f} TFLOP")  # fmt: skip
    print_table(rows)
    dump()
    return 0
