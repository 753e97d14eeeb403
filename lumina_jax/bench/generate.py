"""``python -m lumina_jax.bench generate [--shapes tiny|2b] [--size 64x64] [--steps 10] [--cfg 4] ...``

Times one text-to-image generation end to end -- text encode, denoising steps, VAE decode -- with
:class:`lumina_jax.pipeline.Lumina2Pipeline` and, in the same run on the same random weights and the
same initial noise, diffusers' ``Lumina2Pipeline``. JAX compile time is reported separately (the first
call; the persistent compilation cache is not enabled here, so it is a cold compile).

With ``--solver flow_euler`` (default) the JAX side runs the diffusers semantics (FlowMatchEuler,
CFG-Renorm per row, step-fraction CFG-Trunc), so the table's ``rel_l2`` column (relative L2 of the two
images) checks that both computed the same thing. Other solvers run the original semantics and are only
timed.

``--shapes tiny`` (default) builds tiny random models that run on a CPU in seconds; ``--shapes 2b`` the
released architecture (2.6B Next-DiT, Gemma-2-2B, FLUX VAE) with random weights: expect ~25 GB host
memory for the diffusers reference, use a GPU, or pass ``--no-diffusers`` to time only JAX.

:func:`build_reference_pipeline` (a random diffusers pipeline + the matching JAX components) is shared
with the parity tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset"


def _randomize_(module: Any, seed: int, norm_jitter: float = 0.2) -> None:
    """Overwrite every parameter of a torch module with random values that make each part matter:
    norm weights ~1 (+ jitter), norm biases small, other weights ~N(0, 1/fan_in). Drawn on the module's
    device (so values for one seed differ between CPU and GPU)."""
    import torch

    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + norm_jitter * torch.randn(p.shape, generator=gen, device=device))
            elif "norm" in name:
                p.copy_(norm_jitter * torch.randn(p.shape, generator=gen, device=device))
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen, device=device) / np.sqrt(max(fan_in, 1)))


def shape_configs(shapes: str) -> tuple[Any, Any, Any, int]:
    """``(transformer, text encoder, VAE configs, image size)`` of the ``"tiny"`` or ``"2b"`` shapes."""
    from lumina_jax.models.gemma2 import Gemma2Config
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.models.vae import VAEConfig
    from lumina_jax.sample import tiny

    if shapes == "tiny":
        return tiny.TINY_TRANSFORMER, tiny.tiny_text_config(), tiny.tiny_vae_config(), 64
    if shapes == "2b":
        return (NextDiTConfig.from_yaml("nextdit_2b"), Gemma2Config.from_yaml(tiny._CONFIGS / "gemma2_2b.yaml"),
                VAEConfig.from_yaml("vae_flux"), 1024)  # fmt: skip
    raise ValueError(f"shapes must be 'tiny' or '2b', got {shapes!r}")


def build_reference_pipeline(shapes: str = "tiny", seed: int = 0, *, tokenizer_dir: Optional[str | os.PathLike] = None,
                             device: str = "cpu") -> tuple[Any, Any]:
    """A diffusers ``Lumina2Pipeline`` with random weights and the :class:`Components` holding the same
    weights for JAX (converted in memory through the project's key mappers).

    ``shapes``: ``"tiny"`` (64 px default images, every weight random and significant) or ``"2b"``
    (the released architecture). The tokenizer is a small sentencepiece model trained on the spot
    (:func:`lumina_jax.sample.tiny.train_tokenizer`) and written to ``tokenizer_dir`` (a temp dir if None).
    Save the diffusers pipeline with ``save_pretrained`` to get a directory both pipelines load.
    The torch models are built and randomised on ``device`` (``"cuda"`` makes the 2B shapes quick).
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config as HFGemma2Config, Gemma2Model

    from lumina_jax.convert import vae as cv
    from lumina_jax.convert.common import unflatten
    from lumina_jax.convert.components import Components
    from lumina_jax.convert.gemma2 import torch_state_dict_to_params
    from lumina_jax.convert.nextdit import diffusers_rules, jax_shapes, torch_to_jax
    from lumina_jax.models.gemma2_bench import reference_pair
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.sample import tiny
    from lumina_jax.text import load_tokenizer

    t_cfg, g_cfg, v_cfg, size = shape_configs(shapes)

    torch.manual_seed(seed)
    tcfg = {k: v for k, v in t_cfg.to_diffusers_config().items() if not k.startswith("_")}
    tcfg["sample_size"] = size // v_cfg.downsample_factor
    with torch.device(device):
        transformer = Lumina2Transformer2DModel(**tcfg).eval()
    _randomize_(transformer, seed)
    if shapes == "tiny":
        text_encoder, g_params = reference_pair(g_cfg, seed=seed + 1, device=device)
    else:  # spread init on 2.6B parameters is slow; transformers' own init is fine for timing
        hf = HFGemma2Config(**g_cfg.to_hf_config("float32"))
        hf._attn_implementation = "eager"
        with torch.device(device):
            text_encoder = Gemma2Model(hf).eval()
        g_params = torch_state_dict_to_params({k: v.cpu() for k, v in text_encoder.state_dict().items()}, g_cfg)
    vcfg = {k: v for k, v in v_cfg.to_diffusers_config().items() if not k.startswith("_")}
    with torch.device(device):
        vae = AutoencoderKL(**vcfg).eval()
    _randomize_(vae, seed + 2, norm_jitter=0.3)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0)

    tdir = Path(tokenizer_dir) if tokenizer_dir else Path(tempfile.mkdtemp(prefix="lumina_tok_")) / "tokenizer"
    tok = load_tokenizer(tiny.train_tokenizer(tdir))
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                           tokenizer=tok).to(device)  # fmt: skip

    sd = transformer.state_dict()
    t_jax_cfg = NextDiTConfig.from_diffusers_config(tcfg)
    t_params = unflatten(torch_to_jax(lambda k: sd[k].detach().float().cpu().numpy(), diffusers_rules(t_jax_cfg),
                                      jax_shapes(t_jax_cfg)))  # fmt: skip
    v_params = cv.params_from_state_dict(v_cfg, {k: v.cpu() for k, v in vae.state_dict().items()})
    comps = Components(t_jax_cfg, t_params, g_cfg, g_params, tok, v_cfg, v_params, dict(scheduler.config), size,
                       f"random diffusers reference ({shapes}, seed {seed})", "memory")  # fmt: skip
    comps.check()
    return pipe, comps


def random_jax_components(shapes: str = "tiny", seed: int = 0) -> Any:
    """:class:`Components` with random weights for ``shapes`` (``"tiny"`` / ``"2b"``), without torch."""
    from lumina_jax.sample import tiny

    t_cfg, g_cfg, v_cfg, _ = shape_configs(shapes)
    return tiny.random_components(seed, transformer_config=t_cfg, text_config=g_cfg, vae_config=v_cfg)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def main(argv: list[str]) -> int:
    from lumina_jax.config_utils import int_at_least

    ap = argparse.ArgumentParser(prog="python -m lumina_jax.bench generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--shapes", choices=["tiny", "2b"], default="tiny")
    ap.add_argument("--size", default=None, help="WxH pixels (default 64x64 tiny, 1024x1024 2b)")
    ap.add_argument("--steps", type=int_at_least(1), default=10)
    ap.add_argument("--cfg", type=float, default=4.0, help="guidance scale")
    ap.add_argument("--cfg-trunc", type=float, default=1.0, help="cfg_trunc_ratio (diffusers semantics for "
                    "flow_euler, model-time threshold otherwise)")  # fmt: skip
    ap.add_argument("--solver", default="flow_euler", choices=["flow_euler", "euler", "midpoint", "dpm"])
    ap.add_argument("--batch", type=int_at_least(1), default=1, help="images per prompt")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default fp32 on CPU, bf16 on GPU")
    ap.add_argument("--iters", type=int_at_least(1), default=3)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--no-diffusers", action="store_true", help="time only the JAX pipeline")
    ap.add_argument("--unroll", action="store_true", help="JAX pipeline with unrolled Next-DiT layers")
    ap.add_argument("--fused-qk", action="store_true", help="JAX pipeline with the fused q/k norm + RoPE kernel")
    ap.add_argument("--compile", action="store_true", help="also time diffusers with torch.compile on the transformer "
                    "(the warm-up run compiles)")  # fmt: skip
    ap.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads (default: torch's; on a "
                    "busy CPU 1 avoids OpenMP oversubscription)")
    ap.add_argument("--trunc-row", type=float, default=None, metavar="R",
                    help="also time the JAX pipeline with cfg_trunc_ratio=R (shows the cost of skipped CFG)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch
    import jax

    from lumina_jax.bench import json_safe, print_table, write_json
    from lumina_jax.pipeline import Lumina2Pipeline

    size = args.size or ("64x64" if args.shapes == "tiny" else "1024x1024")
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size {size!r}: expected WxH, e.g. 1024x1024") from None
    on_cpu = jax.default_backend() == "cpu"
    dtype = args.dtype or ("fp32" if on_cpu else "bf16")
    diffusers_semantics = args.solver == "flow_euler"
    call_kw = dict(height=height, width=width, num_inference_steps=args.steps, guidance_scale=args.cfg,
                   cfg_trunc_ratio=args.cfg_trunc, num_images_per_prompt=args.batch)  # fmt: skip

    t0 = time.perf_counter()
    if args.no_diffusers:  # JAX only: random weights drawn on the host, no torch needed
        comps = random_jax_components(args.shapes)
        torch_device = "none"
    else:
        import torch

        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        ref, comps = build_reference_pipeline(args.shapes, device=torch_device if args.shapes == "2b" else "cpu")
    build_s = time.perf_counter() - t0
    print(f"built random {args.shapes} models in {build_s:.1f}s; JAX on {jax.devices()[0].device_kind}, "
          f"torch on {torch_device}", flush=True)

    pipe = Lumina2Pipeline(comps, dtype=dtype, scan_layers=not args.unroll, fuse_qk_norm_rope=args.fused_qk)
    jkw = dict(call_kw, solver=args.solver, output_type="np")
    if diffusers_semantics:
        jkw.update(cfg_normalization="rows", cfg_trunc_mode="steps")
    b = args.batch
    noise = pipe.make_noise(list(range(b)), height, width)
    first = pipe(args.prompt, latents=noise, **jkw)
    runs = [pipe(args.prompt, latents=noise, **jkw) for _ in range(args.iters)]
    med = lambda k: _median([r.timings.get(k, 0.0) for r in runs]) * 1e3  # noqa: E731
    device = str(jax.devices()[0].device_kind)
    tags = [dtype] + (["unrolled"] if args.unroll else []) + (["fused q/k"] if args.fused_qk else [])
    rows = [dict(impl=f"jax {args.solver} ({', '.join(tags)})", device=device, compile_s=first.timings["compile"],
                 text_ms=med("text_encode"), steps_decode_ms=med("sample") + med("decode"), total_ms=med("total"),
                 evals=first.settings["num_model_evaluations"], guided=first.settings["num_guided_evaluations"])]  # fmt: skip

    def dump() -> None:  # after every phase: a run cut short by a time limit keeps what it measured
        print(json.dumps(json_safe(rows[-1])), flush=True)
        if args.json:
            write_json(args.json, rows)

    dump()

    if args.trunc_row is not None:
        tkw = dict(jkw, cfg_trunc_ratio=args.trunc_row)
        first_t = pipe(args.prompt, latents=noise, **tkw)
        runs_t = [pipe(args.prompt, latents=noise, **tkw) for _ in range(args.iters)]
        medt = lambda k: _median([r.timings.get(k, 0.0) for r in runs_t]) * 1e3  # noqa: E731
        rows.append(dict(impl=f"jax {args.solver} ({dtype}), cfg_trunc_ratio {args.trunc_row}", device=device,
                         compile_s=first_t.timings["compile"], text_ms=medt("text_encode"),
                         steps_decode_ms=medt("sample") + medt("decode"), total_ms=medt("total"),
                         evals=first_t.settings["num_model_evaluations"],
                         guided=first_t.settings["num_guided_evaluations"]))  # fmt: skip
        dump()

    if not args.no_diffusers:
        tdtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        ref = ref.to(torch_device) if tdtype == torch.float32 else ref.to(torch_device, dtype=tdtype)
        if torch_device == "cpu" and args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        lat = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))).to(torch_device, tdtype)
        dkw = dict(call_kw, output_type="np", cfg_normalization=True)

        def run_ref():
            with torch.no_grad():
                t = time.perf_counter()
                pe = ref.encode_prompt(args.prompt, args.cfg > 1, negative_prompt="", num_images_per_prompt=b,
                                       device=torch_device)  # fmt: skip
                if torch_device == "cuda":
                    torch.cuda.synchronize()
                t_text = time.perf_counter() - t
                pe = dict(zip(("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                               "negative_prompt_attention_mask"), pe))  # fmt: skip
                t = time.perf_counter()
                img = ref(latents=lat.clone(), **pe, **{k: v for k, v in dkw.items() if k != "num_images_per_prompt"},
                          num_images_per_prompt=1).images  # fmt: skip
                if torch_device == "cuda":
                    torch.cuda.synchronize()
                return img, t_text, time.perf_counter() - t

        ref.set_progress_bar_config(disable=True)
        img_ref, _, _ = run_ref()  # warm-up
        rr = [run_ref() for _ in range(args.iters)]
        t_text = _median([r[1] for r in rr]) * 1e3
        t_rest = _median([r[2] for r in rr]) * 1e3
        rel = None  # other solvers do other work: no comparison of images, nor of times
        if diffusers_semantics:
            a, r = np.asarray(first.images, np.float64), np.asarray(img_ref, np.float64)
            rel = float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))
        rows[0]["rel_l2_vs_diffusers"] = rel
        rows.append(dict(impl=f"diffusers Lumina2Pipeline ({dtype})", device=torch_device, compile_s=0.0,
                         text_ms=t_text, steps_decode_ms=t_rest, total_ms=t_text + t_rest,
                         evals=args.steps, guided=None))  # fmt: skip
        eager = rows[-1]
        for r in rows[:-1]:  # the CFG-Trunc row does less work on purpose: its ratio is what truncation saves
            r["speedup_vs_diffusers"] = eager["total_ms"] / r["total_ms"] if diffusers_semantics else None
        if not diffusers_semantics:
            print(f"--solver {args.solver} is not diffusers' flow-match Euler: its times are not compared", flush=True)
        dump()
        if args.compile:
            t0 = time.perf_counter()
            ref.transformer = torch.compile(ref.transformer)
            run_ref()  # compiles (once per caption length the pipeline uses)
            compile_s = time.perf_counter() - t0
            rc = [run_ref() for _ in range(args.iters)]
            tc_text, tc_rest = _median([r[1] for r in rc]) * 1e3, _median([r[2] for r in rc]) * 1e3
            rows.append(dict(impl=f"diffusers Lumina2Pipeline ({dtype}), torch.compile transformer", device=torch_device,
                             compile_s=compile_s, text_ms=tc_text, steps_decode_ms=tc_rest, total_ms=tc_text + tc_rest,
                             evals=args.steps, guided=None))  # fmt: skip
            for r in rows:
                if r["impl"].startswith("jax"):
                    r["speedup_vs_diffusers_compiled"] = (rows[-1]["total_ms"] / r["total_ms"]
                                                          if diffusers_semantics else None)  # fmt: skip
    print(f"{args.shapes} shapes, {width}x{height}, {args.steps} steps, cfg {args.cfg}, trunc {args.cfg_trunc}, "
          f"batch {b}, median of {args.iters}")
    print_table(rows)
    if args.json:
        write_json(args.json, rows)
    return 0
