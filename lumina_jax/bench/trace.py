"""``python -m lumina_jax.bench trace FILE.xplane.pb[.gz] [--iters N] [--hlo HLO.txt] [--top 30]``

Where the device time of a traced program goes: reads an xprof trace (``--profile`` of ``bench forward`` /
``bench train``) and prints per-kernel device time per iteration, grouped into GEMMs, attention,
memory copies and XLA fusions. With ``--hlo`` (the ``--hlo-dump`` of the same program) every fusion is
named by the JAX operation it came from (its ``op_name`` metadata, e.g.
``.../layers/.../attention/q_norm/...``), since XLA runs the kernels inside CUDA graphs and the trace
itself only knows fusion names.

Needs ``pip install xprof`` to read the trace (not a project dependency); the HLO parsing and the
grouping are plain Python (:func:`hlo_op_names`, :func:`summarize`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from typing import Any, Optional

from lumina_jax.bench import write_json

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = .*?(?:calls=%([\w.\-]+))?(?:, |$)")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) .*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _norm(name: str) -> str:
    """HLO instruction names use '.' and '-', kernel names '_': ``loop_convert_fusion.4`` -> ``loop_convert_fusion_4``."""
    return re.sub(r"[.\-]", "_", name)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Normalised instruction name -> JAX ``op_name`` from an optimised HLO dump. A fusion without its
    own metadata takes its called computation's ROOT instruction's."""
    comp_root: dict[str, str] = {}
    instr: dict[str, tuple[Optional[str], Optional[str]]] = {}
    current = None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("{")[0]:
            current = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        op = _OP_NAME.search(line)
        instr[m.group(1)] = (op.group(1) if op else None, m.group(2))
        if current is not None and line.lstrip().startswith("ROOT") and op:
            comp_root[current] = op.group(1)
    out = {}
    for name, (op, calls) in instr.items():
        op = op or (comp_root.get(calls) if calls else None)
        if op:
            out[_norm(name)] = op
    return out


def category(kernel: str) -> str:
    if kernel.startswith(("nvjet", "sm90_xmma", "cutlass")) or "gemm" in kernel:
        return "gemm"
    if "sdpa" in kernel or "flash" in kernel or "lumina_flash" in kernel:
        return "attention"
    if kernel.startswith("memcpy") or kernel.startswith("memset"):
        return "memcpy/memset"
    if kernel.startswith("triton_softmax"):
        return "norm (triton softmax fusion)"
    if "reduce" in kernel:
        return "reduction fusion"
    if "concatenate" in kernel:
        return "concatenate fusion"
    if "convert" in kernel:
        return "convert fusion"
    return "other fusion"


def summarize(rows: list[dict[str, Any]], iters: int, names: Optional[dict[str, str]] = None, top: int = 30) -> dict:
    """``rows``: kernel_stats rows (``kernel_name``, ``occurrences``, ``total_duration_us``). Returns
    ``{"total_ms", "by_category": [(cat, ms, calls)], "top": [(kernel, ms, calls, op_name)]}`` per iteration."""
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        k = r["kernel_name"]
        per_kernel[k][0] += r["total_duration_us"] / 1e3 / iters
        per_kernel[k][1] += r["occurrences"] / iters
    by_cat: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for k, (ms, calls) in per_kernel.items():
        by_cat[category(k)][0] += ms
        by_cat[category(k)][1] += calls
    names = names or {}
    top_rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "total_ms": sum(ms for ms, _ in per_kernel.values()),
        "by_category": sorted(((c, ms, n) for c, (ms, n) in by_cat.items()), key=lambda t: -t[1]),
        "top": [(k, ms, n, names.get(_norm(k), "")) for k, (ms, n) in top_rows],
    }


def kernel_rows(xplane_path: str) -> list[dict[str, Any]]:
    """xprof's ``kernel_stats`` of a trace (``.xplane.pb`` or ``.xplane.pb.gz``)."""
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError:
        raise SystemExit("reading a trace needs xprof: pip install xprof") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.xplane.pb")
        opener = gzip.open if xplane_path.endswith(".gz") else open
        with opener(xplane_path, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        data = raw_to_tool_data.xspace_to_tool_data([path], "kernel_stats", {})[0]
    table = json.loads(data)
    cols = [c["id"] for c in table["cols"]]
    return [dict(zip(cols, [c.get("v") for c in row["c"]])) for row in table["rows"]]


def main(argv: list[str]) -> int:
    from lumina_jax.config_utils import int_at_least

    ap = argparse.ArgumentParser(prog="python -m lumina_jax.bench trace", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("trace", help="an .xplane.pb (or .xplane.pb.gz) written by --profile")
    ap.add_argument("--iters", type=int_at_least(1), default=3, help="iterations the trace holds (bench forward: 3, train: 2)")
    ap.add_argument("--hlo", default=None, help="the --hlo-dump of the same program, to name the fusions")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    names = hlo_op_names(open(a.hlo).read()) if a.hlo else None
    s = summarize(kernel_rows(a.trace), a.iters, names, a.top)
    print(f"device time per iteration: {s['total_ms']:.2f} ms")
    for c, ms, n in s["by_category"]:
        print(f"  {ms:8.2f} ms  {n:6.0f} calls  {c}")
    print("top kernels:")
    for k, ms, n, op in s["top"]:
        print(f"  {ms:8.2f} ms  {n:6.0f} calls  {k[:60]:60s} {op[-90:]}")
    if a.json:
        write_json(a.json, s)
    return 0
