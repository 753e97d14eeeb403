"""Throughput accounting (analytic FLOPs, TFLOP/s/device, MFU) and metric sinks.

FLOPs follow maxtext's convention (jax_notes §2): analytic matmul + attention FLOPs of the model
(:func:`lumina_jax.models.nextdit.flops_forward`, 2 FLOPs per MAC, bidirectional attention, no causal
halving), a train step = 3x forward (forward + 2x for the backward) per sample, for the main loss and
the auxiliary pooled-latent loss. Recomputation by remat is *not* useful work: it is reported
separately (``remat_flops``) and never counted in MFU.

Peak dense bf16 TFLOP/s per chip (vendor figures): H100/H200 989, TPU v4 275, v5e 197, v5p 459,
v6e 918. MFU = achieved TFLOP/s/device / peak. Benchmarks also report the ratio to a bf16 matmul rate
measured in the same process, which works on any device (CPU included).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from lumina_jax.models.nextdit import NextDiTConfig, flops_forward

# (substring of device_kind, lower-case) -> peak dense bf16 TFLOP/s per device
# (first match wins: the PCIe / NVL H100s before the SXM default)
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),
    ("h200", 989.0),
    ("v6 lite", 918.0),
    ("v6e", 918.0),
    ("v5 lite", 197.0),
    ("v5e", 197.0),
    ("v5p", 459.0),
    ("tpu v5", 459.0),  # "TPU v5" is v5p's device_kind
    ("v4", 275.0),
    ("a100", 312.0),
)


def peak_tflops(device_kind: str) -> Optional[float]:
    """Peak dense bf16 TFLOP/s of one device of this kind, or None if unknown (e.g. CPU)."""
    k = device_kind.lower()
    for sub, peak in PEAK_TFLOPS:
        if sub in k:
            return peak
    return None


def latent_tokens(model: NextDiTConfig, resolution: int, downsample: int = 8) -> int:
    """Image tokens of a square image of ``resolution`` pixels (autoencoder ``downsample``x, patch p;
    ``downsample`` 1 for models on pixels)."""
    side = resolution // downsample // model.patch_size
    return side * side


def attention_flops(model: NextDiTConfig, cap_len: int, n_img: int) -> int:
    """Attention part of :func:`lumina_jax.models.nextdit.flops_forward` (``4 L^2 H D`` per layer)."""
    hd = model.head_dim

    def stack(n_layers: int, length: int) -> int:
        return n_layers * 4 * length * length * model.n_heads * hd

    return stack(model.n_layers, cap_len + n_img) + stack(model.n_refiner_layers, n_img) + \
        stack(model.n_refiner_layers, cap_len)  # fmt: skip


def batch_tokens(model: NextDiTConfig, latent_shape: tuple[int, ...], aux_pool: int = 4, aux: bool = True) -> tuple[int, int]:
    """``(image tokens, auxiliary-loss tokens)`` per sample of a train batch whose latents have
    ``latent_shape``: dense ``(B, H, W, C)`` (an aspect bucket: ``H x W`` need not be square; pixel models
    too) or token-packed mixed ``(B, T, p*p*C)``, counted at the compiled budget ``T`` (padding is work
    done) with the pooled term's ``T // aux_pool**2`` tokens (:func:`lumina_jax.train.objective.pool_tokens`).
    The dense auxiliary term pools ``H x W`` by ``aux_pool`` and crops to multiples of the patch size
    (:func:`lumina_jax.train.objective.avg_pool`); none when the pooled side is under one patch."""
    p = model.patch_size
    if len(latent_shape) == 3:
        return latent_shape[1], (latent_shape[1] // aux_pool**2 if aux else 0)
    if len(latent_shape) != 4:
        raise ValueError(f"latents of shape {tuple(latent_shape)}: expected (B, H, W, C) or (B, T, D)")
    h, w = latent_shape[1:3]
    ah, aw = h // aux_pool // p, w // aux_pool // p
    return (h // p) * (w // p), (ah * aw if aux and ah >= 1 and aw >= 1 else 0)


def _square_tokens(model: NextDiTConfig, resolution: int, downsample: int, aux_pool: int, aux: bool) -> tuple[int, int]:
    side = resolution // downsample
    return batch_tokens(model, (1, side, side, model.in_channels), aux_pool, aux)


def train_flops_per_sample(
    model: NextDiTConfig, resolution: int, cap_len: int, aux_pool: int = 4, aux: bool = True, downsample: int = 8,
    lora: bool = False,
) -> dict[str, float]:
    """Useful FLOPs per sample of one train step on square ``resolution`` px images:
    :func:`train_flops_per_sample_tokens` with :func:`batch_tokens` of the ``resolution / downsample``
    latent."""
    n_img, n_aux = _square_tokens(model, resolution, downsample, aux_pool, aux)
    return train_flops_per_sample_tokens(model, n_img, n_aux, cap_len, lora)


def train_flops_per_sample_tokens(model: NextDiTConfig, n_img: int, n_aux: int, cap_len: int,
                                  lora: bool = False) -> dict[str, float]:  # fmt: skip
    """Useful FLOPs per sample of one train step with ``n_img`` image tokens, ``n_aux`` tokens in the
    auxiliary pooled-latent term (0: none) and ``cap_len`` caption tokens: ``{"forward", "aux_forward",
    "train"}``. ``train`` is 3x the forward; with ``lora`` (frozen weights, adapters as side paths) the
    weight-gradient matmuls are not done: 2x the forward plus the attention's second backward matmul
    (the adapters' rank-r work is not counted)."""
    fwd, att = flops_forward(model, cap_len, n_img), attention_flops(model, cap_len, n_img)
    aux_fwd = aux_att = 0.0
    if n_aux:
        aux_fwd, aux_att = flops_forward(model, cap_len, n_aux), attention_flops(model, cap_len, n_aux)
    train = 3.0 * (fwd + aux_fwd)
    if lora:
        train -= (fwd - att) + (aux_fwd - aux_att)
    return {"forward": float(fwd), "aux_forward": float(aux_fwd), "train": float(train)}


def remat_flops_per_sample(model: NextDiTConfig, resolution: int, cap_len: int, policy: str, aux_pool: int = 4,
                           aux: bool = True, *, attention_kernel: bool = False, downsample: int = 8) -> float:  # fmt: skip
    """:func:`remat_flops_per_sample_tokens` for square ``resolution`` px images."""
    n_img, n_aux = _square_tokens(model, resolution, downsample, aux_pool, aux)
    return remat_flops_per_sample_tokens(model, n_img, n_aux, cap_len, policy, attention_kernel=attention_kernel)


def remat_flops_per_sample_tokens(model: NextDiTConfig, n_img: int, n_aux: int, cap_len: int, policy: str, *,
                                  attention_kernel: bool = False) -> float:  # fmt: skip
    """Extra (recomputed) matmul/attention FLOPs per sample under a remat policy of the block stacks
    (token counts as :func:`train_flops_per_sample_tokens`).

    ``none``/``low_precision``: matmul and attention outputs are saved, nothing is recomputed (elementwise
    work only); ``dots``: matmul outputs are saved, and so are the attention einsums of the XLA backend,
    but an attention *kernel* (cuDNN, Pallas, splash: ``attention_kernel=True``) is not a dot, so its
    forward is recomputed; ``dots_no_batch``: weight matmuls are saved but attention is recomputed;
    ``full``: the whole forward of the blocks is recomputed once.
    """
    def one(n: int) -> float:
        if policy in ("none", "low_precision") or (policy == "dots" and not attention_kernel):
            return 0.0
        if policy in ("dots", "dots_no_batch"):
            return float(attention_flops(model, cap_len, n))
        if policy == "full":
            return float(flops_forward(model, cap_len, n))
        raise ValueError(f"unknown remat policy {policy!r}")

    return one(n_img) + (one(n_aux) if n_aux else 0.0)


def measure_matmul_tflops(n: int = 4096, dtype: str = "bfloat16", iters: int = 10) -> float:
    """TFLOP/s of an ``n x n`` bf16 matmul on the default device (a same-run reference rate)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = f(a, b)
    out.block_until_ready()
    dt = (time.perf_counter() - t0) / iters
    return 2.0 * n**3 / dt / 1e12


# ----------------------------------------------------------------------------------------------
# sinks


class MetricLog:
    """Metric sinks of process 0: ``metrics.jsonl`` (one JSON per logged step), TensorBoard events
    (:class:`lumina_jax.train.tensorboard.EventWriter`, no TensorFlow needed) and the console."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tb = None
        self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from lumina_jax.train.tensorboard import EventWriter

            self.tb = EventWriter(self.run_dir / "tensorboard")

    def rewind(self, step: int) -> int:
        """Drop ``metrics.jsonl`` rows logged after ``step`` (a run killed after its last checkpoint logged
        steps that the resumed run repeats), so the file reads as one uninterrupted run; a line cut short by
        the kill is dropped too. Rewritten atomically; returns the number of rows dropped. TensorBoard shows
        the repeated steps as usual."""
        if not self.enabled:
            return 0

        def before(line: str) -> bool:
            try:
                return line.endswith("\n") and json.loads(line).get("step", 0) <= step
            except ValueError:
                return False

        path = self.run_dir / "metrics.jsonl"
        self._jsonl.close()
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = [x for x in lines if before(x)]
        if len(keep) != len(lines):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(keep), encoding="utf-8")
            os.replace(tmp, path)
        self._jsonl = open(path, "a", encoding="utf-8")
        return len(lines) - len(keep)

    def record_start(self, step: int, config: Mapping[str, Any]) -> None:
        """At each (re)start: the run's resolved config to ``config.yaml`` (replaced: the settings of the
        latest start; every checkpoint keeps its own) and one line to ``starts.jsonl``: time, step,
        command line, devices and versions, so a run's history says how each part of it was launched."""
        if not self.enabled:
            return
        import sys

        import jax
        import yaml

        from lumina_jax import __version__

        tmp = self.run_dir / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
        os.replace(tmp, self.run_dir / "config.yaml")
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": int(step), "argv": list(sys.argv),
                **host_info(), "jax": jax.__version__, "lumina_jax": __version__}  # fmt: skip
        with open(self.run_dir / "starts.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer, np.bool_)) else v)
                 for k, v in scalars.items()}  # fmt: skip
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float):
                    self.tb.scalar(k, v, step)
            self.tb.flush()

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.image(tag, image, step)
            self.tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def format_line(step: int, total: int, m: Mapping[str, Any]) -> str:
    parts = [f"step {step}/{total}"]
    for k, fmt in (("loss", ".4f"), ("loss_main", ".4f"), ("loss_aux", ".4f"), ("grad_norm", ".3f"),
                   ("lr", ".2e"), ("images_per_s", ".1f"), ("tflops_per_device", ".2f"), ("mfu", ".1%")):  # fmt: skip
        if k in m and m[k] is not None:
            parts.append(f"{k} {format(float(m[k]), fmt)}")
    for k in ("skipped", "captions_truncated"):  # data problems, shown once there are any
        if m.get(f"data/{k}"):
            parts.append(f"{k} {int(m[f'data/{k}'])}")
    return "  ".join(parts)


def host_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"device_kind": d.device_kind, "platform": d.platform, "devices": jax.device_count(),
            "processes": jax.process_count(), "pid": os.getpid()}  # fmt: skip
