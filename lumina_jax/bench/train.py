"""``python -m lumina_jax.bench train``: train-step time, TFLOP/s/device and MFU.

    python -m lumina_jax.bench train --config nextdit_tiny --res 64 --batch 8 --steps 5       # CPU
    python -m lumina_jax.bench train --config nextdit_2b --res 1024 --batch 8 --remat dots    # accelerator

Times the real train step (:mod:`lumina_jax.train.step`: rectified-flow loss + auxiliary pooled loss,
AdamW, EMA) on synthetic latents over all local devices (FSDP mesh by default). Reports:

* step time (median of ``--steps`` after a warm-up step that includes compilation), images/s;
* useful TFLOP/s/device from the analytic count (3x forward FLOPs per sample, main + aux loss;
  :mod:`lumina_jax.train.metrics`), and the extra FLOPs of the remat policy separately;
* MFU against the device's peak dense bf16 rate (H100/H200 989, TPU v4 275, v5e 197, v5p 459,
  v6e 918 TFLOP/s), when the device kind is known;
* the same against a bf16 matmul rate measured in the same run (works on CPU too);
* peak device memory since the process started (GPU/TPU allocator statistics).

``--batch 4 2 1`` tries each global batch in turn until one fits (one H200 fits more than one H100);
out-of-memory attempts are recorded as rows with ``"error": "out of memory"`` and XLA's message.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _mesh_arg(text: str) -> str:
    """``--mesh``: checked here, so a typo fails in argparse naming the option."""
    from lumina_jax.parallel.mesh import MeshConfig

    try:
        MeshConfig.parse_fields(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main(argv: list[str]) -> int:
    from lumina_jax.config_utils import int_at_least

    p = argparse.ArgumentParser(prog="python -m lumina_jax.bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="nextdit_tiny", help="model config name or YAML path")
    p.add_argument("--res", type=int, default=256, help="image resolution in pixels (latent = res/8)")
    p.add_argument("--batch", type=int_at_least(1), nargs="+", default=[8],
                   help="global batch; several: tried in order until one fits in device memory (largest first), "
                        "out-of-memory attempts recorded as rows")
    p.add_argument("--all-batches", action="store_true", help="time every --batch, not only the first that fits")
    p.add_argument("--cap-len", type=int_at_least(1), default=None, help="caption tokens (default 8 for tiny, else 256)")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch", "low_precision"))
    p.add_argument("--steps", type=int_at_least(1), default=5)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--attention", default="auto")
    p.add_argument("--mesh", default="fsdp", type=_mesh_arg,
                   help="mesh: a preset (dp, fsdp, fsdp_tensor, context), axis sizes (fsdp=2,tensor=2) or both")
    p.add_argument("--no-aux", action="store_true", help="disable the auxiliary pooled-latent loss")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lora", type=int_at_least(1), default=None, metavar="RANK",
                   help="LoRA fine-tuning step (frozen base, rank-RANK adapters on attention + SwiGLU) instead of "
                        "full training; FLOPs/MFU count no weight gradients")
    p.add_argument("--matmul-n", type=int, default=None, help="size of the reference bf16 matmul")
    p.add_argument("--json", default=None, help="write the result row here (a list of rows when there are several)")
    p.add_argument("--profile", default=None, metavar="FILE", help="also write an xprof trace of two steps here")
    args = p.parse_args(argv)

    from lumina_jax.bench import write_json

    rows = []

    def dump() -> None:  # after each batch size: a run cut by a time limit keeps the rows so far
        if args.json:  # one row: the object itself (as before); several: a list
            write_json(args.json, rows[0] if len(rows) == 1 else rows)

    for batch in args.batch:
        try:
            rows.append(_run(args, batch))
            dump()
        except Exception as e:  # noqa: BLE001 -- only out-of-memory is caught; anything else re-raises
            if not is_oom(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"batch {batch}: out of device memory ({first[:300]})", flush=True)
            rows.append({"config": args.config, "res": args.res, "batch": batch, "remat": args.remat,
                         "grad_accum": args.grad_accum, "error": "out of memory", "detail": first[:2000]})  # fmt: skip
            dump()
            continue
        args.profile = None  # the trace is of the first batch size that fits
        if not args.all_batches:
            break
    from lumina_jax.bench import print_table

    ok = [r for r in rows if "error" not in r]
    if ok:
        print_table(ok, ["config", "res", "batch", "grad_accum", "remat", "device", "devices", "step_ms",
                         "images_per_s", "tflops_per_device", "remat_tflops_per_device", "mfu", "mfu_valid_tokens",
                         "matmul_bf16_tflops", "vs_matmul", "peak_mem_gib"])  # fmt: skip
    if not ok:
        print(f"every batch in {args.batch} ran out of device memory", file=sys.stderr)
        return 1
    return 0


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is XLA refusing or failing an allocation (compile-time or run-time)."""
    msg = str(e)
    return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()


def _run(args: argparse.Namespace, batch_size: int) -> dict:
    """Build, compile and time the train step at global batch ``batch_size``; one result row."""
    import jax
    import numpy as np

    from lumina_jax.bench import peak_device_memory
    from lumina_jax.train import metrics as M
    from lumina_jax.parallel.mesh import MeshConfig
    from lumina_jax.train.config import config_from_dict
    from lumina_jax.train.loop import Trainer

    cap_len = args.cap_len if args.cap_len is not None else (8 if "tiny" in args.config else 256)
    raw = {
        "model": args.config, "run_dir": "/tmp/lumina_bench_train", "mesh": MeshConfig.parse_fields(args.mesh),
        "dtype": args.dtype, "attention": args.attention, "remat": args.remat, "grad_accum": args.grad_accum,
        "objective": {"aux_loss_weight": 0.0 if args.no_aux else 1.0},
        "log": {"tensorboard": False, "progress": False},
        "stages": [{"name": "bench", "resolution": args.res, "steps": args.steps + 1, "batch": batch_size,
                    "data": {"kind": "synthetic", "num_samples": max(batch_size, 1), "cap_len": cap_len}}],
    }  # fmt: skip
    if args.lora is not None:
        raw["lora"] = {"rank": args.lora}
    cfg = config_from_dict(raw)
    tr = Trainer(cfg)
    try:
        from lumina_jax.train.data import build_stage_iterator

        it, _ = build_stage_iterator(cfg.stages[0], model_config=tr.model_config, mesh=tr.mesh, seed=0, stage_index=0)
        batch = tr._next_global(it, cfg.stages[0], 0)
        state = tr.fresh_state()
        step = tr.compile_stage(0, batch)
        hp = tr.stage_hparams(0)
        t0 = time.perf_counter()
        state, m = step(state, batch, hp)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = step(state, batch, hp)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        if args.profile:
            from lumina_jax.bench import capture_profile

            holder = [state]

            def one_step():
                holder[0], mm = step(holder[0], batch, hp)
                return mm

            capture_profile(one_step, args.profile, iters=2)
    finally:  # also after an out-of-memory error, before the next batch size
        tr.ckpt.close()
        tr.metrics.close()
    step_s = statistics.median(times)
    n_dev = jax.device_count()
    useful, remat = tr.flops(0, cap_len)  # the work done: the padded caption length, as the trainer logs it
    tflops = useful / step_s / n_dev / 1e12
    valid_cap = float(np.asarray(jax.device_get(batch["cap_mask"])).sum(axis=1).mean())
    valid_tflops = tr.flops(0, valid_cap)[0] / step_s / n_dev / 1e12  # caption padding not counted
    kind = jax.devices()[0].device_kind
    peak = M.peak_tflops(kind)
    n = args.matmul_n or (1024 if jax.default_backend() == "cpu" else 8192)
    matmul = M.measure_matmul_tflops(n)
    row = {
        "config": args.config, "res": args.res, "batch": batch_size, "remat": args.remat, "dtype": args.dtype,
        "device": kind, "devices": n_dev, "mesh": args.mesh, "compile_s": round(compile_s, 2),
        "step_ms": round(step_s * 1e3, 2), "images_per_s": round(batch_size / step_s, 2),
        "tflops_per_device": tflops, "remat_tflops_per_device": remat / step_s / n_dev / 1e12,
        "peak_tflops": peak, "mfu": tflops / peak if peak else None,
        "valid_caption_tokens": valid_cap, "tflops_per_device_valid_tokens": valid_tflops,
        "mfu_valid_tokens": valid_tflops / peak if peak else None,
        "matmul_bf16_tflops": matmul, "vs_matmul": tflops / matmul if matmul else None,
        "loss": float(np.asarray(m["loss"])), "train_flops_per_step": useful, "grad_accum": args.grad_accum,
        "lora_rank": args.lora,
        "peak_mem_gib": peak_device_memory(),
    }  # fmt: skip
    return row
