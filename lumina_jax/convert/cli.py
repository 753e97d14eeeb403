"""``python -m lumina_jax convert SRC DST --to jax|diffusers|original [--dtype fp32|bf16|fp16] [--config NAME] [--overwrite] [--verify]``.

Converts a checkpoint between the project's own format and PyTorch's. What SRC holds and its format
are detected:

- the Next-DiT transformer: the project's folder, a diffusers ``transformer/`` folder, or the original
  Alpha-VLLM layout (``--to original``: a ``.pth``/``.safetensors`` file, or a folder that gets
  ``consolidated.00-of-01.pth``);
- the Gemma-2 text encoder: the project's ``text_encoder/`` folder or a transformers folder (``--to
  diffusers`` and ``--to original`` both write a transformers ``Gemma2Model`` folder, as both pipelines use);
- the FLUX VAE: the project's ``vae/`` folder, a diffusers ``AutoencoderKL`` folder, or BFL's
  ``ae.safetensors`` (``--to original`` writes that file, or ``DST/ae.safetensors`` for a folder);
- a whole model folder: the project's (``lumina_jax_pipeline.json``, e.g. the bundled default model) or a
  diffusers ``Lumina2Pipeline`` folder (``model_index.json``); ``--to diffusers`` writes a folder diffusers'
  ``Lumina2Pipeline.from_pretrained`` loads, ``--to jax`` the project's (loads without torch).

Nothing is written at ``DST`` unless the whole conversion succeeds; an ``--overwrite`` that is killed
leaves the old ``DST`` (put back by the next run if the kill came between the two renames that replace
it). The config goes with the weights in every format (for ``--to original``, in the file's metadata: the
original code ignores it, a reload here uses it). ``--config`` names it for original checkpoints without
one (else inferred from the shapes); where the weights carry a config (``config.json``, our exports'
metadata) it must agree with it (the RoPE table size aside); project checkpoints carry their own.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lumina_jax.convert.errors import CheckpointError

# the library's errors name its Python arguments; the CLI names its flags instead
_ARG_TO_FLAG = (("pass overwrite=True", "pass --overwrite"), ("pass config=", "pass --config NAME (or a YAML path)"),
                ("pass pth_key=", "pass --pth-key NAME"), ("pth_key ", "--pth-key "))


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
                    "when passed itself or when it is the folder's only weights file); a text encoder or VAE; "
                    "or a whole model folder (project or diffusers pipeline)")  # fmt: skip
    ap.add_argument("dst", help="output path; for --to original a .pth or .safetensors file, or a folder that "
                    "gets consolidated.00-of-01.pth")  # fmt: skip
    ap.add_argument("--to", required=True, choices=["jax", "diffusers", "original"])
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="export dtype (default: keep)")
    ap.add_argument("--config", default=None, help="model config name/YAML for original checkpoints (else inferred)")
    ap.add_argument("--pth-key", default=None, metavar="NAME", help="which state dict of an original .pth that "
                    "wraps several to read (e.g. ema of {'model': ..., 'ema': ...}; default: model)")  # fmt: skip
    ap.add_argument("--lora", action="append", default=[], metavar="PATH",
                    help="merge this LoRA adapter into the transformer before writing (repeatable)")
    ap.add_argument("--lora-scale", action="append", type=float, default=[], metavar="W",
                    help="weight of each --lora (one value: all of them; default 1.0)")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    ap.add_argument("--verify", action="store_true", help="read DST back and check every tensor bit for bit "
                    "against the source (and the stored config); one more read of the output")  # fmt: skip
    args = ap.parse_args(argv)

    from lumina_jax.convert.common import recover_replaced
    from lumina_jax.convert.nextdit import (
        WEIGHT_FILE_SUFFIXES,
        detect_format,
        load_transformer,
        original_target,
        original_weights_file,
        save_transformer,
        verify_transformer,
    )
    from lumina_jax.models.nextdit import NextDiTConfig, param_count

    t0 = time.time()
    try:
        from lumina_jax.convert.lora import pair_scales

        loras = pair_scales(args.lora, args.lora_scale)
        kind = component_kind(args.src)
        dst = Path(args.dst)
        original_name = {"transformer": "consolidated.00-of-01.pth", "vae": "ae.safetensors"}.get(kind)
        target = original_target(dst, original_name) if args.to == "original" and original_name else dst
        recover_replaced(target)  # a killed --overwrite run's old DST comes back first
        if target.exists() and not args.overwrite:  # before the (long) load, not after
            raise FileExistsError(f"{target} already exists (pass --overwrite to replace it)")
        src, written = Path(args.src).resolve(), target.resolve()
        if src == written or (src.is_dir() and src in written.parents):
            raise ValueError(f"{target} is the checkpoint {args.src} or inside it: the source would be replaced, or "
                             f"another weights file there would become part of it; write it elsewhere")  # fmt: skip
        if written in src.parents:
            raise ValueError(f"{target} holds the checkpoint {args.src}: writing it would replace the folder, the "
                             f"source with it; write it elsewhere")  # fmt: skip
        if args.to != "original" and target.suffix.lower() in WEIGHT_FILE_SUFFIXES:
            raise ValueError(f"{target}: --to {args.to} writes a folder; give a folder name, not a "
                             f"{target.suffix} file")  # fmt: skip
        if kind == "pipeline":
            out = _convert_pipeline(args, target, loras, t0)
            print(f"wrote {out} in {time.time() - t0:.1f}s")
            return 0
        if kind != "transformer":
            if loras:
                raise ValueError(f"--lora adapts Next-DiT transformers; {args.src} holds a {kind}")
            if args.pth_key is not None:
                raise ValueError(f"--pth-key is for original Next-DiT .pth checkpoints; {args.src} holds a {kind}")
            out = _convert_encoder(kind, args, target, t0)
            print(f"wrote {out} in {time.time() - t0:.1f}s")
            return 0
        fmt = detect_format(args.src)
        config = NextDiTConfig.from_yaml(args.config) if args.config else None
        where = original_weights_file(args.src) if fmt == "original" else args.src
        print(f"reading {where} ({fmt})", flush=True)
        config, params = load_transformer(args.src, config=config, dtype=None, pth_key=args.pth_key)
        print(f"loaded {param_count(config) / 1e6:.1f}M params in {time.time() - t0:.1f}s", flush=True)
        if loras:
            params = _merge_loras(params, config, loras, args.dtype)
        print(f"writing {args.to}", flush=True)
        out = save_transformer(args.dst, config, params, args.to, dtype=args.dtype, overwrite=args.overwrite)
        if args.verify:
            n = verify_transformer(out, config, params, args.to, dtype=args.dtype)
            print(f"verified {out}: {n} tensors bit-exact", flush=True)
    except (CheckpointError, OSError, ValueError) as e:  # OSError: unwritable destination, full disk, ...
        print(f"error: {cli_message(e)}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.time() - t0:.1f}s")
    return 0


def component_kind(path: str | Path) -> str:
    """``"pipeline"``, ``"transformer"``, ``"text_encoder"`` or ``"vae"``: what the checkpoint at ``path``
    holds (a whole model folder: the project's or diffusers' pipeline; else from the project's marker file,
    a config.json's ``model_type`` / ``_class_name``, or a file's tensor names); another model is a
    :class:`CheckpointError` naming it."""
    import json

    from lumina_jax.convert.components import COMPONENT_MARKER, PIPELINE_MARKER

    p = Path(path)
    kinds = {"nextdit": "transformer", "gemma2": "text_encoder", "vae": "vae"}
    if p.is_dir() and ((p / PIPELINE_MARKER).is_file() or (p / "model_index.json").is_file()):
        return "pipeline"
    if p.is_dir() and not (p / "config.json").exists() and (p / "transformer").is_dir():
        return "pipeline"  # a diffusers folder without model_index.json: load_components names what is missing
    try:
        if p.is_dir() and (p / COMPONENT_MARKER).is_file():
            model = json.loads((p / COMPONENT_MARKER).read_text()).get("model", "nextdit")
            if model not in kinds:
                raise CheckpointError(f"{p}: the project's {model!r} folder; convert handles {sorted(kinds)}")
            return kinds[model]
        if p.is_dir() and (p / "config.json").is_file():
            cfg = json.loads((p / "config.json").read_text())
            if cfg.get("model_type") == "gemma2":
                return "text_encoder"
            if cfg.get("_class_name") == "AutoencoderKL":
                return "vae"
            other = cfg.get("model_type") or cfg.get("_class_name")
            if other and other != "Lumina2Transformer2DModel":
                hint = " (captioners: lumina_jax.convert.load_captioner / save_captioner)" if "vl" in str(other) else ""
                raise CheckpointError(f"{p}: a {other!r} model; convert handles Next-DiT, Gemma-2 and AutoencoderKL "
                                      f"checkpoints{hint}")  # fmt: skip
        if p.is_file() and p.suffix.lower() == ".safetensors":
            from lumina_jax.convert.safetensors_io import SafetensorsFile

            names = set(SafetensorsFile(p).keys())
            if {"encoder.conv_in.weight", "decoder.conv_in.weight"} <= names:
                return "vae"  # BFL's ae.safetensors layout
    except CheckpointError:
        raise
    except (OSError, ValueError, AttributeError):
        pass  # unreadable here: the Next-DiT loader names the problem
    return "transformer"


def _convert_encoder(kind: str, args: argparse.Namespace, target: Path, t0: float) -> Path:
    """``convert`` for the text encoder and the VAE (see the module docstring for the formats)."""
    import dataclasses

    import numpy as np

    from lumina_jax.convert.common import cast, flatten, resolve_dtype, same_bits, to_numpy
    from lumina_jax.convert.components import save_component
    from lumina_jax.convert.nextdit import WEIGHT_FILE_SUFFIXES

    src = Path(args.src)
    if kind == "text_encoder" and target.suffix.lower() in WEIGHT_FILE_SUFFIXES:
        raise ValueError(f"{target}: a text encoder is written as a folder; give a folder name, not a "
                         f"{target.suffix} file")  # fmt: skip
    if kind == "vae" and args.to == "original" and target.suffix.lower() != ".safetensors":
        raise ValueError(f"{target}: --to original writes BFL's ae.safetensors; give a .safetensors file or a folder")
    if kind == "text_encoder":
        from lumina_jax.convert.gemma2 import load_text_encoder, save_text_encoder

        if args.config:
            raise ValueError("--config is for Next-DiT and BFL autoencoder checkpoints; a text encoder's config "
                             "comes with it")  # fmt: skip
        load = lambda path: load_text_encoder(path, dtype=None)  # noqa: E731
        config, params = load(src)
        config_dict = dataclasses.asdict(config)
        model = "gemma2"
    else:
        from lumina_jax.convert.vae import load_flux_ae, load_vae, save_flux_ae, save_vae
        from lumina_jax.models.vae import VAEConfig

        override = VAEConfig.from_yaml(args.config) if args.config else None

        def load(path, override=override):
            if Path(path).is_file():
                return load_flux_ae(path, config=override, dtype=None)
            return load_vae(path, dtype=None)

        if override is not None and not src.is_file():
            raise ValueError("--config is for BFL ae.safetensors files; a VAE folder's config comes with it")
        config, params = load(src)
        config_dict = config.to_dict()
        model = "vae"
    n = sum(int(np.prod(np.shape(v))) for v in flatten(params).values())
    print(f"loaded {kind} {src} ({n / 1e6:.1f}M params) in {time.time() - t0:.1f}s; writing {args.to}", flush=True)
    if args.to == "jax":
        out = save_component(target, model, config_dict, params, dtype=args.dtype, overwrite=args.overwrite)
    elif kind == "text_encoder":
        out = save_text_encoder(target, config, params, dtype=args.dtype, overwrite=args.overwrite)
    elif args.to == "diffusers":
        out = save_vae(target, config, params, dtype=args.dtype, overwrite=args.overwrite)
    else:
        out = save_flux_ae(target, config, params, dtype=args.dtype, overwrite=args.overwrite)
    if args.verify:
        config2, params2 = load(out, override=None) if kind == "vae" else load(out)  # as written, not --config
        if config2 != config:
            raise CheckpointError(f"{out}: its config reads back as {config2}, not {config}")
        want, got = flatten(params), flatten(params2)
        dt = resolve_dtype(args.dtype)
        if set(want) != set(got):
            raise CheckpointError(f"{out}: params {sorted(set(want) ^ set(got))} differ in name")
        bad = [k for k in want if not same_bits(cast(to_numpy(want[k]), dt), got[k])]
        if bad:
            raise CheckpointError(f"{out}: {len(bad)} tensors differ after reading back: {bad[:10]}")
        print(f"verified {out}: {len(want)} tensors bit-exact", flush=True)
    return out


def _merge_loras(params: dict, config, loras: list, dtype: str | None) -> dict:
    """``params`` with the ``(path, weight)`` adapters merged: in fp32 and rounded once, to ``dtype`` when given
    (a bf16 source written as fp32 keeps the whole adapter, not its bf16 rounding), else to each param's own."""
    from lumina_jax.convert.common import resolve_dtype
    from lumina_jax.convert.lora import load_lora, merge_lora

    params = merge_lora(params, config, [(load_lora(p, config), w) for p, w in loras], dtype=resolve_dtype(dtype))
    print("merged " + ", ".join(f"{p} (weight {w:g})" for p, w in loras), flush=True)
    return params


def _convert_pipeline(args: argparse.Namespace, target: Path, loras: list, t0: float) -> Path:
    """``convert`` for whole model folders: the project's layout <-> a diffusers ``Lumina2Pipeline`` folder."""
    from lumina_jax.convert.components import load_components, save_components, verify_components

    if args.to == "original":
        raise ValueError(f"{args.src} is a whole model folder; the original code has no such folder: convert its "
                         f"transformer/ (to consolidated.00-of-01.pth) and vae/ (to ae.safetensors) one by one, and "
                         f"use its text_encoder/ as --to diffusers writes it (a transformers Gemma2Model)")  # fmt: skip
    for flag, value in (("--config", args.config), ("--pth-key", args.pth_key)):
        if value is not None:
            raise ValueError(f"{flag} is for single Next-DiT checkpoints; {args.src} is a whole model folder, which "
                             f"carries its configs")  # fmt: skip
    comps = load_components(args.src, dtype=None)
    print(f"loaded the model folder {args.src} ({comps.layout}) in {time.time() - t0:.1f}s", flush=True)
    if loras:
        comps.transformer = _merge_loras(comps.transformer, comps.transformer_config, loras, args.dtype)
    layout = "diffusers" if args.to == "diffusers" else "lumina_jax"
    print(f"writing {layout}", flush=True)
    out = save_components(target, comps, layout=layout, dtype=args.dtype, overwrite=args.overwrite)
    if args.verify:
        n = verify_components(out, comps, dtype=args.dtype)
        print(f"verified {out}: {n} tensors bit-exact, configs and settings equal", flush=True)
    return out
