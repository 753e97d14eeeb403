"""``python -m lumina_jax <command> ...``: one entry point, each command implemented in its own module.

Every command module exposes ``main(argv: list[str]) -> int``; this file only dispatches, and imports
the chosen module lazily so ``--help`` and light commands stay fast.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("lumina_jax.sample.cli", "text -> image PNGs with a checkpoint (or the bundled model)"),
    "convert": ("lumina_jax.convert.cli", "convert a Next-DiT, Gemma-2 or FLUX VAE checkpoint between jax / diffusers / original"),
    "train": ("lumina_jax.train.cli", "train from a YAML config with key=value overrides"),
    "preprocess": ("lumina_jax.data.cli", "encode a dataset into a latent/text-feature cache"),
    "caption": ("lumina_jax.models.captioner.cli", "caption images with a Qwen2-VL style captioner"),
    "aot": ("lumina_jax.parallel.aot", "compile a step ahead of time for a TPU topology and report HBM use"),
    "eval-shapes": ("lumina_jax.eval_shapes", "score generated images of the synthetic shapes model"),
}


def usage() -> str:
    lines = ["usage: python -m lumina_jax <command> [args...]", "", "commands:"]
    lines += [f"  {name:12s} {doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", "python -m lumina_jax <command> --help for a command's options"]
    return "\n".join(lines)


_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def quiet_environment(env: dict | None = None) -> dict:
    """Defaults set before JAX and transformers load (only where the user set nothing):

    * ``JAX_PLATFORMS=cpu`` when libtpu is installed (the test requirements' ``jax[tpu]``, for ``aot``) on
      a machine with no TPU chips and no GPU plugin: JAX would otherwise try the TPU backend on every
      command and print libtpu's errors. A TPU VM (``/dev/accel*``, ``/dev/vfio/N`` or a ``TPU_*``
      variable) is left alone;
    * ``TRANSFORMERS_NO_ADVISORY_WARNINGS=1``: transformers' "PyTorch was not found" advice (the
      tokenizers are all this package uses from it when torch is absent).

    Returns what it set."""
    import glob
    import importlib.util
    import os

    env = os.environ if env is None else env
    out = {}
    if "JAX_PLATFORMS" not in env and importlib.util.find_spec("libtpu") is not None:
        tpu_here = (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
                    or any(k.startswith("TPU_") for k in env))  # fmt: skip
        if not tpu_here and not any(importlib.util.find_spec(p) is not None for p in _GPU_PLUGINS):
            out["JAX_PLATFORMS"] = "cpu"
    if "TRANSFORMERS_NO_ADVISORY_WARNINGS" not in env:
        out["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    env.update(out)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    quiet_environment()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"command {name!r} is not available in this version ({module_name} missing)", file=sys.stderr)
            return 2
        raise
    try:
        code = int(module.main(rest) or 0)
    except SystemExit as e:  # argparse errors, setup errors raised as SystemExit("message")
        if not e.code or not _distributed_initialized():
            raise
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 1
    except Exception:
        if not _distributed_initialized():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    if code and _distributed_initialized():  # e.g. caption, preprocess on a pod
        _distributed_module().exit_alone(code)  # a process that failed alone must not wait in JAX's shutdown
    return code


def _distributed_module():
    return sys.modules.get("lumina_jax.parallel.distributed")


def _distributed_initialized() -> bool:
    """Whether this process joined a multi-process JAX job (``parallel.distributed.initialize``)."""
    distributed = _distributed_module()
    return distributed is not None and bool(distributed._initialized)


if __name__ == "__main__":
    sys.exit(main())
