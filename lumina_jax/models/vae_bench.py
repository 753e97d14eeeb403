"""Timing of the VAE decode: ours (JAX) against diffusers' ``AutoencoderKL`` (PyTorch) in the same run.

Both decoders get the same random weights (diffusers' init, converted through the same key mapper as
real checkpoints) and the same latents, so the rows also report how far apart the outputs are. Wired
into ``python -m lumina_jax.bench vae-decode``; also usable directly::

    from lumina_jax.models.vae_bench import bench_vae_decode
    for row in bench_vae_decode(resolutions=[1024, 2048], dtype="bf16", tile=64): print(row)

Timings drift on shared machines: compare rows of one call only, and say which device produced them.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from lumina_jax.bench import time_fn
from lumina_jax.convert.vae import params_from_state_dict
from lumina_jax.models.vae import AutoencoderKL, VAEConfig

_JAX_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bench_vae_decode(
    config: VAEConfig | str | None = None,
    *,
    resolutions: Sequence[int | tuple[int, int]] = (1024,),
    batch: int = 1,
    dtype: str = "bf16",
    iters: int = 10,
    warmup: int = 2,
    tile: Optional[int] = None,
    overlap: int = 16,
    torch_device: Optional[str] = None,
    torch_compile: bool = False,
    run_diffusers: bool = True,
    attention_backend: str = "xla",
    seed: int = 0,
    on_rows: Optional[Callable[[list[dict[str, Any]]], None]] = None,
) -> list[dict[str, Any]]:
    """Time ``decode`` (and ``decode_tiled`` when ``tile`` is set) against diffusers' decode.

    Args:
      config: a :class:`VAEConfig`, a bundled YAML name (``"vae_flux"``, ``"vae_tiny"``) or None (FLUX).
      resolutions: image sizes in pixels (``int`` for square, or ``(H, W)``); multiples of 8.
      batch: images per decode.
      dtype: ``"fp32" | "bf16" | "fp16"``: our compute dtype and diffusers' weight/activation dtype.
      iters, warmup: timed and untimed repetitions; rows report the median and the minimum.
      tile, overlap: also time ``decode_tiled`` with these latent-pixel sizes.
      torch_device: default ``"cuda"`` if available, else ``"cpu"``.
      torch_compile: also time ``torch.compile(vae.decode)``.
      run_diffusers: set False to time only the JAX side (no torch needed).

    Returns:
      One dict per (implementation, resolution): ``impl`` (``jax``, ``jax_tiled``, ``diffusers``,
      ``diffusers_compile``), ``height``, ``width``, ``batch``, ``dtype``, ``median_ms``, ``min_ms``,
      ``mpix_per_s``, ``device``; JAX rows add ``compile_s`` (lower + compile + first call) and
      ``temp_gib`` (XLA's scratch memory for the compiled decode), and, when diffusers ran,
      ``rel_l2_vs_diffusers`` and ``speedup_vs_diffusers`` (diffusers' eager median / ours); diffusers
      rows on CUDA add ``peak_gib``.
    """
    if isinstance(config, str):
        config = VAEConfig.from_yaml(config)
    cfg = config or VAEConfig()
    if dtype not in _JAX_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_JAX_DTYPES)}, got {dtype!r}")
    rng = np.random.default_rng(seed)

    tvae = None
    if run_diffusers:
        import torch
        from diffusers import AutoencoderKL as TorchAutoencoderKL

        torch_device = torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(seed)
        dcfg = {k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}
        tvae = TorchAutoencoderKL(**dcfg).eval()
        params = params_from_state_dict(cfg, tvae.state_dict())
        tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        tvae = tvae.to(device=torch_device)
        if tdtype != torch.float32:
            tvae = tvae.to(dtype=tdtype)
    else:
        model0 = AutoencoderKL(cfg)
        f = cfg.downsample_factor
        params = jax.jit(model0.init)(jax.random.PRNGKey(seed), jnp.zeros((1, f, f, cfg.in_channels)))["params"]
        params = jax.tree_util.tree_map(np.asarray, meta.unbox(params))

    model = AutoencoderKL(cfg, dtype=_JAX_DTYPES[dtype], attention_backend=attention_backend)
    params = jax.device_put(params)
    jax_device = str(jax.devices()[0])
    rows: list[dict[str, Any]] = []

    def sync_jax(x: Any) -> Any:
        return jax.block_until_ready(x)

    for res in resolutions:
        hh, ww = (res, res) if isinstance(res, int) else tuple(res)
        f = cfg.downsample_factor
        if hh % f or ww % f:
            raise ValueError(f"resolution {hh}x{ww} is not a multiple of {f}")
        z_np = rng.standard_normal((batch, hh // f, ww // f, cfg.latent_channels), dtype=np.float32)
        z = jnp.asarray(z_np)
        base = dict(height=hh, width=ww, batch=batch, dtype=dtype)
        mpix = batch * hh * ww / 1e6

        ref = None
        if tvae is not None:
            import torch

            zt = torch.from_numpy(z_np.transpose(0, 3, 1, 2).copy()).to(device=torch_device, dtype=tdtype)
            is_cuda = torch_device.startswith("cuda")

            def sync_torch(x: Any) -> Any:
                if is_cuda:
                    torch.cuda.synchronize()
                return x

            impls = [("diffusers", tvae.decode)]
            if torch_compile:
                impls.append(("diffusers_compile", torch.compile(tvae.decode)))
            for name, dec in impls:
                with torch.inference_mode():
                    if is_cuda:
                        torch.cuda.reset_peak_memory_stats()
                    out = sync_torch(dec(zt).sample)
                    if name == "diffusers":
                        ref = out.float().cpu().numpy().transpose(0, 2, 3, 1)
                    t = time_fn(lambda: dec(zt).sample, warmup=warmup, iters=iters, sync=sync_torch)
                row = dict(impl=name, **base, median_ms=t["median_ms"], min_ms=t["min_ms"],
                           mpix_per_s=mpix * 1e3 / t["median_ms"], device=torch_device)  # fmt: skip
                if is_cuda:
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                if name == "diffusers":
                    torch_ms = t["median_ms"]
                rows.append(row)
                if on_rows is not None:
                    on_rows(rows)

        variants: list[tuple[str, Callable[..., Any]]] = [
            ("jax", lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))
        ]
        if tile is not None:
            variants.append(
                ("jax_tiled", lambda p, z: model.apply({"params": p}, z, tile=tile, overlap=overlap,
                                                      method=AutoencoderKL.decode_tiled))  # fmt: skip
            )
        for name, fn in variants:
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(params, z).compile()
            out = sync_jax(compiled(params, z))
            compile_s = time.perf_counter() - t0
            t = time_fn(lambda: compiled(params, z), warmup=warmup, iters=iters, sync=sync_jax)
            row = dict(impl=name, **base, median_ms=t["median_ms"], min_ms=t["min_ms"],
                       mpix_per_s=mpix * 1e3 / t["median_ms"], device=jax_device, compile_s=compile_s)  # fmt: skip
            mem = compiled.memory_analysis()
            if mem is not None and getattr(mem, "temp_size_in_bytes", None) is not None:
                row["temp_gib"] = mem.temp_size_in_bytes / 2**30
            if ref is not None:
                row["rel_l2_vs_diffusers"] = _rel_l2(np.asarray(out), ref)
                row["speedup_vs_diffusers"] = torch_ms / t["median_ms"]
            rows.append(row)
            if on_rows is not None:  # the rows so far, after each: a run cut by a time limit keeps them
                on_rows(rows)
    return rows
