"""``python -m lumina_jax train CONFIG [key=value ...]`` and ``python -m lumina_jax train export ...``.

Train::

    python -m lumina_jax train configs/train/tiny_synthetic.yaml run_dir=/tmp/run stages.0.steps=50
    python -m lumina_jax train lumina2_2b run_dir=gs://bucket/run mesh.fsdp=16     # on every host

Options (before the config): ``--print-config`` (resolved config as YAML, then exit), ``--stop-at N``
(stop after global step N with a checkpoint), ``--coordinator HOST:PORT --num-processes N
--process-id I`` (explicit multi-process start; otherwise from ``LUMINA_*``/TPU/SLURM variables, see
:mod:`lumina_jax.parallel.distributed`), ``-v`` (debug logging).

Export the EMA (default, when the run keeps one) or raw weights of a run's latest (or ``--step``) checkpoint::

    python -m lumina_jax train export RUN_DIR OUT [--which auto|ema|params] [--format jax|diffusers|original|lora]
        [--dtype fp32|bf16] [--step N] [--overwrite]

A LoRA run (``lora:`` in its config) exports the base with its adapter merged, or with ``--format lora``
the adapter alone (diffusers' LoRA file, for ``generate --lora`` or diffusers' ``load_lora_weights``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from lumina_jax import log_setup
from lumina_jax.config_utils import int_at_least


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lumina_jax train", description="Train Next-DiT from a YAML config.",
        epilog="Overrides: dotted keys of the YAML, e.g. optimizer.lr=1e-4 stages.0.batch=64. The same command "
        "resumes a run from its run_dir's latest checkpoint; SIGTERM / Ctrl-C stop after the current step with a "
        "checkpoint. Weights of a run: python -m lumina_jax train export RUN_DIR OUT --format jax|diffusers|original|lora",
    )  # fmt: skip
    p.add_argument("config", help="configs/train/<name>.yaml, a bundled name (e.g. tiny_synthetic) or a path")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--stop-at", type=int_at_least(1), default=None, help="stop after this global step (checkpointed)")
    p.add_argument("--coordinator", default=None, help="multi-process coordinator host:port")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks with errors")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lumina_jax train export",
                                description="Write the EMA or raw weights of a run's checkpoint as a model checkpoint "
                                "(readable by generate --transformer, convert and init=).")  # fmt: skip
    p.add_argument("run_dir", help="the run's run_dir (holds checkpoints/)")
    p.add_argument("out", help="output path (a folder; for --format original a .pth/.safetensors file or a folder)")
    p.add_argument("--which", choices=("ema", "params", "auto"), default="auto",
                   help="EMA or the raw weights (default auto: the EMA when the run keeps one)")
    p.add_argument("--format", choices=("jax", "diffusers", "original", "lora"), default="jax",
                   help="default jax; lora: a LoRA run's adapter alone (diffusers LoRA file)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="written dtype (default: fp32, as trained)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def _error(e: BaseException, verbose: bool) -> int:
    from lumina_jax.convert.cli import cli_message

    if verbose:
        raise e
    print(f"error: {cli_message(e)}", file=sys.stderr)
    return 2


def _train_error(e: BaseException, verbose: bool) -> int:
    rc = _error(e, verbose)
    print("(-v shows where it was raised)", file=sys.stderr)
    return rc


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        args = _export_parser().parse_args(argv[1:])
        log_setup.setup(logging.INFO)
        logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices
        from lumina_jax.convert.errors import CheckpointError
        from lumina_jax.train.loop import export_weights

        try:
            out = export_weights(args.run_dir, args.out, which=args.which, format=args.format, dtype=args.dtype,
                                 step=args.step, overwrite=args.overwrite)  # fmt: skip
        except (CheckpointError, OSError, ValueError) as e:
            return _error(e, False)
        print(f"wrote {out}")
        return 0

    parser = _train_parser()
    args = parser.parse_intermixed_args(argv)
    log_setup.setup(logging.DEBUG if args.verbose else logging.INFO)

    from lumina_jax.train.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0

    # Before any JAX computation: join the other processes of a multi-host job.
    from lumina_jax.parallel import distributed

    try:
        mode = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:  # a coordinator without a port, a process id out of range, Open MPI 5, ...
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    import jax

    log = logging.getLogger("lumina_jax.train")
    log.info("distributed: %s; process %d/%d, %d local / %d global devices (%s)", mode, jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)  # fmt: skip

    from lumina_jax.convert.errors import CheckpointError
    from lumina_jax.data.pipeline import NoUsableSampleError
    from lumina_jax.train.loop import NonFiniteLossError, Trainer

    try:
        result = Trainer(cfg, stop_at=args.stop_at).run()
    except (NonFiniteLossError, NoUsableSampleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return distributed.exit_alone(3)
    except (CheckpointError, OSError, ValueError) as e:  # a setting the run cannot use: one line, not a traceback
        return distributed.exit_alone(_train_error(e, args.verbose))
    if result.stopped_by is not None:
        log.info("stopped at step %d by signal %d; checkpointed, the same command resumes", result.step,
                 result.stopped_by)  # fmt: skip
        return 128 + result.stopped_by
    log.info("done at step %d (stage %d/%d %r); %d non-finite steps skipped", result.step, result.stage + 1,
             len(cfg.stages), cfg.stages[result.stage].name, result.nonfinite)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
