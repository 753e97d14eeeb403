"""``python -m lumina_jax.bench <what> ...``: benchmarks that time the project and the PyTorch reference
in the same run and report ratios (shared machines are noisy; never compare across runs).

Each benchmark module in this package exposes ``main(argv: list[str]) -> int``.
"""

from __future__ import annotations

import importlib
import sys

BENCHES: dict[str, tuple[str, str]] = {
    "forward": ("lumina_jax.bench.forward", "Next-DiT forward vs diffusers (eager / torch.compile)"),
    "attention": ("lumina_jax.bench.attention", "every attention backend at Lumina shapes"),
    "text-encoder": ("lumina_jax.bench.text_encoder", "Gemma-2 encoder vs transformers"),
    "vae-decode": ("lumina_jax.bench.vae_decode", "FLUX VAE decode vs diffusers"),
    "data": ("lumina_jax.bench.data", "input pipeline images/s"),
    "generate": ("lumina_jax.bench.generate", "one image end to end vs diffusers' Lumina2Pipeline"),
    "train": ("lumina_jax.bench.train", "train step time, TFLOP/s/device and MFU"),
    "caption": ("lumina_jax.bench.caption", "captioner images/s and tokens/s vs transformers"),
    "convert-memory": ("lumina_jax.bench.convert_memory", "peak host memory of a streaming conversion"),
    "trace": ("lumina_jax.bench.trace", "where the device time of a --profile trace goes (needs xprof)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m lumina_jax.bench <what> [args...]\n")
        for k, (_, doc) in BENCHES.items():
            print(f"  {k:15s} {doc}")
        return 0
    if argv[0] not in BENCHES:
        print(f"unknown benchmark {argv[0]!r}; choose from {sorted(BENCHES)}", file=sys.stderr)
        return 2
    module_name = BENCHES[argv[0]][0]
    from lumina_jax.__main__ import quiet_environment

    quiet_environment()  # as `python -m lumina_jax`: no libtpu errors on a dev install without a TPU
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"benchmark {argv[0]!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
