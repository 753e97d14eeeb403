"""``python -m lumina_jax.bench convert-memory [--config nextdit_2b] [--dtype fp32] [--to safetensors|pth]``

Measures the peak host memory (max RSS) of a streaming conversion at the real model shape with
random weights: writes a diffusers-format checkpoint, then in a fresh process loads it into JAX params
(``load_transformer``) and exports it to the original format (``save_transformer``; ``--to`` picks
``consolidated.00-of-01.safetensors`` or ``.pth``), reporting the peak RSS of each phase against the
model's size. The target is "about one copy of the model".
Needs ~2x the model size of free disk in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
from lumina_jax.convert.nextdit import load_transformer, save_transformer
def rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
src, dst = sys.argv[1], sys.argv[2]
if dst.endswith(".pth"):
    import torch  # noqa: F401 -- the .pth writer's import is not the model's memory
base = rss_gib()
t0 = time.time()
config, params = load_transformer(src, dtype=None)
load_s, after_load = time.time() - t0, rss_gib()
t0 = time.time()
save_transformer(dst, config, params, "original")
print(json.dumps(dict(baseline_rss_gib=base, load_peak_rss_gib=after_load, load_s=load_s,
                      save_peak_rss_gib=rss_gib(), save_s=time.time() - t0)))
"""


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m lumina_jax.bench convert-memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--config", default="nextdit_2b")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--to", default="safetensors", choices=["safetensors", "pth"], help="export file type")
    ap.add_argument("--workdir", default=None, help="where the checkpoints are written (in a new subfolder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    a = ap.parse_args(argv)

    import ml_dtypes
    import numpy as np

    from lumina_jax.convert.common import DIFFUSERS_INDEX, write_sharded_safetensors
    from lumina_jax.convert.nextdit import diffusers_rules, jax_shapes, torch_shapes
    from lumina_jax.models.nextdit import NextDiTConfig, param_count

    config = NextDiTConfig.from_yaml(a.config)
    dt = np.float32 if a.dtype == "fp32" else ml_dtypes.bfloat16
    model_gib = param_count(config, include_norm_final=False) * np.dtype(dt).itemsize / 2**30
    if a.workdir is not None:
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
    # a fresh folder of its own, inside --workdir if given: only it is removed afterwards, never the user's folder
    work = Path(tempfile.mkdtemp(prefix="lumina_convert_mem_", dir=a.workdir))
    src = work / "transformer"
    try:
        t0 = time.time()
        src.mkdir(parents=True, exist_ok=True)
        (src / "config.json").write_text(json.dumps(config.to_diffusers_config()))
        rng = np.random.default_rng(0)
        shapes = torch_shapes(diffusers_rules(config), jax_shapes(config))
        tensors = ((k, (rng.random(s, dtype=np.float32) - 0.5).astype(dt)) for k, s in shapes.items())
        write_sharded_safetensors(tensors, src, weights_name="diffusion_pytorch_model.safetensors",
                                  index_name=DIFFUSERS_INDEX, max_shard_bytes=2 * 1024**3,
                                  specs=[(k, s, np.dtype(dt)) for k, s in shapes.items()])  # fmt: skip
        print(f"wrote random {a.config} ({model_gib:.2f} GiB {a.dtype}) in {time.time() - t0:.0f}s", flush=True)
        r = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(work / f"consolidated.00-of-01.{a.to}")],
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            if r.returncode < 0:  # e.g. SIGKILL from the kernel's OOM killer leaves no traceback
                print(f"conversion process killed by signal {-r.returncode} (9: likely out of memory)", file=sys.stderr)
            return 1
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res.update(model_gib=model_gib, config=a.config, dtype=a.dtype, export=a.to)
        res["load_peak_over_model"] = (res["load_peak_rss_gib"] - res["baseline_rss_gib"]) / model_gib
        res["save_peak_over_model"] = (res["save_peak_rss_gib"] - res["baseline_rss_gib"]) / model_gib
        for k, v in res.items():
            print(f"{k:24s} {v:.3f}" if isinstance(v, float) else f"{k:24s} {v}")
    finally:
        if a.keep:
            print(f"kept the checkpoints in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0
