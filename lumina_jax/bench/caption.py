"""``python -m lumina_jax.bench caption``: captioner images/s and tokens/s, ours vs transformers ``generate``.

Both run in the same process on the same random weights and inputs (one batch of ``--batch`` images at
``--image-size`` with a caption prompt), greedy, exactly ``--new-tokens`` new tokens per image (no stop
token). Ours is the jit-compiled :func:`lumina_jax.models.captioner.decode.generate` (vision tower +
prefill + ``while_loop`` decode in one program; compile time reported separately); the reference is
``Qwen2VLForConditionalGeneration.generate`` / ``Qwen2_5_VL...`` (PyTorch eager, dynamic cache). With fp32
the greedy tokens are compared too (``tokens_match``).

    python -m lumina_jax.bench caption                               # tiny random models, CPU, both families
    python -m lumina_jax.bench caption --size 7b --dtype bf16 --no-reference --batch 8 --new-tokens 128

``--size 7b`` builds Qwen2-VL-7B / Qwen2.5-VL-7B shapes with random weights (~16 GB in bf16; for a GPU/TPU
machine); ``--layers`` / ``--vision-layers`` shorten the stacks to fit a time budget (per-token cost scales
linearly). The reference is skipped for 7b unless torch sees a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any, Optional

import numpy as np

from lumina_jax.bench import json_safe, write_json


def _hxw(text: str) -> str:
    """An argparse ``type``: ``HxW`` with two positive integers (kept as text)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected HxW in pixels (e.g. 448x448), got {text!r}")
    return text.lower()


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    from lumina_jax.config_utils import int_at_least

    p = argparse.ArgumentParser(prog="python -m lumina_jax.bench caption", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=("qwen2_vl", "qwen2_5_vl", "both"), default="both")
    p.add_argument("--size", choices=("tiny", "7b"), default="tiny")
    p.add_argument("--batch", type=int_at_least(1), default=4)
    p.add_argument("--new-tokens", type=int_at_least(1), default=32)
    p.add_argument("--image-size", type=_hxw, default=None, help="HxW pixels (default 64x96 tiny, 448x448 7b)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default fp32 tiny, bf16 7b")
    p.add_argument("--iters", type=int_at_least(1), default=3)
    p.add_argument("--layers", type=int_at_least(1), default=None, help="override LM depth (7b)")
    p.add_argument("--vision-layers", type=int_at_least(1), default=None, help="override vision depth (7b)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers")
    p.add_argument("--attention-backend", default="auto", help="vision tower")
    p.add_argument("--decode-attention-backend", default="xla", help="LM decode steps")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def _config(family: str, size: str, args: argparse.Namespace, tokenizer: Any):
    from lumina_jax.models.captioner import config as C
    from lumina_jax.models.captioner.testing import tiny_model_config

    if size == "tiny":
        return tiny_model_config(family, tokenizer)
    cfg = C.qwen2_vl_7b() if family == "qwen2_vl" else C.qwen2_5_vl_7b()
    if args.layers:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=args.layers))
    if args.vision_layers:
        v = cfg.vision
        full = tuple(i for i in v.fullatt_block_indexes if i < args.vision_layers) or ((args.vision_layers - 1,)
                                                                                      if v.window_size else ())
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(v, depth=args.vision_layers,
                                                                  fullatt_block_indexes=full))
    return cfg


def _time(fn, iters: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return first, float(np.median(ts))


def bench_family(family: str, args: argparse.Namespace, emit: Optional[Any] = None) -> dict:
    import jax
    import jax.numpy as jnp

    from lumina_jax.convert.captioner import torch_state_dict_to_params
    from lumina_jax.models.captioner import testing as T
    from lumina_jax.models.captioner.decode import GenerationConfig, generate
    from lumina_jax.models.captioner.model import cast_params, init_params
    from lumina_jax.models.captioner.processor import (ImageProcessorConfig, Tokenizer, build_batch, chat_prompt,
                                                       make_example)

    size = args.size
    dtype_name = args.dtype or ("fp32" if size == "tiny" else "bf16")
    dtype = jnp.float32 if dtype_name == "fp32" else jnp.bfloat16
    hf_tok_obj = T.build_tokenizer()
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=hf_tok_obj, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     padding_side="left")
    tok = Tokenizer(hf_tok_obj)
    cfg = _config(family, size, args, hf_tok)
    if size != "tiny":  # 7b shapes with the tiny offline tokenizer: use its <|image_pad|> id (inside the vocab)
        cfg = dataclasses.replace(cfg, image_token_id=tok.token_id("<|image_pad|>"))
    h, w = (int(x) for x in (args.image_size or ("64x96" if size == "tiny" else "448x448")).split("x"))
    proc = ImageProcessorConfig.for_model(cfg, min_pixels=16 * 16, max_pixels=max(h * w, 16 * 16))
    rng = np.random.default_rng(0)
    images = [T.random_image(rng, h, w) for _ in range(args.batch)]
    text = "Describe this image in detail."
    exs = [make_example(im, text, tok, cfg, proc) for im in images]
    batch = build_batch(exs, cfg, prompt_buckets=16)
    n_new = args.new_tokens
    gen = GenerationConfig(max_new_tokens=n_new, stop_token_ids=(), pad_token_id=0)

    want_ref = not args.no_reference
    model = None
    if want_ref:
        import torch

        if size != "tiny" and not torch.cuda.is_available():
            print(f"[bench caption] {family}: no CUDA for torch; skipping the transformers reference at 7b")
            want_ref = False
    t0 = time.perf_counter()
    if want_ref:
        import torch

        with torch.device("cpu" if size == "tiny" else "cuda"):  # a 7B host init alone takes minutes
            model = T.hf_model(cfg, attn_implementation="sdpa")
        # the reference runs in the dtype the row reports (on the CPU too, where tiny runs); cast before the
        # weights are copied out, so a 7B crosses to the host in bf16 (16 GB), not fp32 (33 GB)
        model = model.to("cpu" if size == "tiny" else "cuda", torch.bfloat16 if dtype_name == "bf16" else torch.float32)
        params = torch_state_dict_to_params({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg,
                                            dtype=None)  # fmt: skip
    else:
        params = jax.jit(lambda r: cast_params(init_params(cfg, r), dtype))(jax.random.PRNGKey(0))
    params = jax.device_put(cast_params(params, dtype) if dtype_name == "bf16" else params)
    build_s = time.perf_counter() - t0

    out: dict[str, Any] = {}

    def ours():
        out["o"] = jax.block_until_ready(generate(params, batch, cfg, gen, dtype=dtype,
                                                  attention_backend=args.attention_backend,
                                                  decode_attention_backend=args.decode_attention_backend))

    compile_s, ours_s = _time(ours, args.iters)
    row = {"family": family, "size": size, "dtype": dtype_name, "device": jax.devices()[0].device_kind,
           "batch": args.batch, "image": f"{h}x{w}", "prompt_len": int(batch.input_ids.shape[1]),
           "new_tokens": n_new, "build_s": round(build_s, 2), "ours_first_call_s": round(compile_s, 3),
           "ours_s": round(ours_s, 4), "ours_images_per_s": round(args.batch / ours_s, 3),
           "ours_tokens_per_s": round(args.batch * n_new / ours_s, 2)}
    if emit is not None:  # before the reference: a run cut short by a time limit keeps this row
        emit(row)
    if want_ref:
        import torch

        hin = T.hf_inputs(hf_tok, [chat_prompt(text)] * args.batch, images, proc)
        dev = next(model.parameters()).device
        hin = {k: v.to(dev) for k, v in hin.items()}
        if dtype_name == "bf16":
            hin["pixel_values"] = hin["pixel_values"].to(torch.bfloat16)

        def ref():
            with torch.no_grad():
                out["r"] = model.generate(**hin, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        _, ref_s = _time(ref, args.iters)
        row.update(ref_s=round(ref_s, 4), ref_images_per_s=round(args.batch / ref_s, 3),
                   ref_tokens_per_s=round(args.batch * n_new / ref_s, 2), speedup=round(ref_s / ours_s, 2))
        if dtype_name == "fp32":
            ref_tokens = out["r"][:, hin["input_ids"].shape[1]:].cpu().numpy()
            row["tokens_match"] = bool((np.asarray(out["o"].tokens) == ref_tokens).all())
    return row


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    from lumina_jax.bench import print_table

    fams = ("qwen2_vl", "qwen2_5_vl") if args.family == "both" else (args.family,)
    rows: list[dict] = []

    def emit(row: dict) -> None:  # after every phase: a run cut short by a time limit keeps what it measured
        print(json.dumps(json_safe(row)), flush=True)
        if args.json:
            write_json(args.json, rows + [row])

    for fam in fams:
        row = bench_family(fam, args, emit)
        emit(row)
        rows.append(row)
    print_table(rows)
    return 0
