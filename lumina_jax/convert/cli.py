"""``python -m lumina_jax convert SRC DST --to jax|diffusers|original [--dtype fp32|bf16|fp16] [--config NAME] [--overwrite] [--verify]``.

Converts a Next-DiT checkpoint between the project's own format, a diffusers ``transformer/``
directory and the original Alpha-VLLM layout. The source format is detected. Nothing is written at
``DST`` unless the whole conversion succeeds; an ``--overwrite`` that is killed leaves the old ``DST``
(put back by the next run if the kill came between the two renames that replace it). The config goes
with the weights in every format (for ``--to original``, in the file's metadata: the original code
ignores it, a reload here uses it); ``--config`` overrides it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lumina_jax.convert.errors import CheckpointError

# the library's errors name its Python arguments; the CLI names its flags instead
_ARG_TO_FLAG = (("pass overwrite=True", "pass --overwrite"), ("pass config=", "pass --config NAME (or a YAML path)"))


def cli_message(e: BaseException, table: tuple[tuple[str, str], ...] = _ARG_TO_FLAG) -> str:
    """The error's message with the library's argument names (``overwrite=True``, ``config=``) as the CLI
    flags of ``table`` (``(text, replacement)`` pairs, applied in order)."""
    msg = str(e)
    for arg, flag in table:
        msg = msg.replace(arg, flag)
    return msg


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m lumina_jax convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("src", help="checkpoint: project dir, diffusers transformer dir, original .pth/.safetensors "
                    "file, or a folder with consolidated.00-of-01.* (the EMA file consolidated_ema.* is read "
                    "only when passed itself)")  # fmt: skip
    ap.add_argument("dst", help="output path; for --to original a .pth or .safetensors file, or a folder that "
                    "gets consolidated.00-of-01.pth")  # fmt: skip
    ap.add_argument("--to", required=True, choices=["jax", "diffusers", "original"])
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="export dtype (default: keep)")
    ap.add_argument("--config", default=None, help="model config name/YAML for original checkpoints (else inferred)")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    ap.add_argument("--verify", action="store_true", help="read DST back and check every tensor bit for bit "
                    "against the source (and the stored config); one more read of the output")  # fmt: skip
    args = ap.parse_args(argv)

    from lumina_jax.convert.common import recover_replaced
    from lumina_jax.convert.nextdit import (
        detect_format,
        load_transformer,
        original_weights_file,
        save_transformer,
        verify_transformer,
    )
    from lumina_jax.models.nextdit import NextDiTConfig, param_count

    t0 = time.time()
    try:
        dst = Path(args.dst)
        target = dst if args.to != "original" or dst.suffix else dst / "consolidated.00-of-01.pth"
        recover_replaced(target)  # a killed --overwrite run's old DST comes back first
        if target.exists() and not args.overwrite:  # before the (long) load, not after
            raise FileExistsError(f"{target} already exists (pass --overwrite to replace it)")
        src = Path(args.src).resolve()
        if src.is_dir() and src in dst.resolve().parents:
            raise ValueError(f"{args.dst} is inside the checkpoint {args.src}: another weights file there would "
                             f"become part of that checkpoint; write it elsewhere")  # fmt: skip
        fmt = detect_format(args.src)
        config = NextDiTConfig.from_yaml(args.config) if args.config else None
        where = original_weights_file(args.src) if fmt == "original" else args.src
        print(f"reading {where} ({fmt})", flush=True)
        config, params = load_transformer(args.src, config=config, dtype=None)
        print(f"loaded {param_count(config) / 1e6:.1f}M params in {time.time() - t0:.1f}s; writing {args.to}", flush=True)
        out = save_transformer(args.dst, config, params, args.to, dtype=args.dtype, overwrite=args.overwrite)
        if args.verify:
            n = verify_transformer(out, config, params, args.to, dtype=args.dtype)
            print(f"verified {out}: {n} tensors bit-exact", flush=True)
    except (CheckpointError, OSError, ValueError) as e:  # OSError: unwritable destination, full disk, ...
        print(f"error: {cli_message(e)}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.time() - t0:.1f}s")
    return 0
