"""Benchmarks; see ``python -m lumina_jax.bench --help``. Shared timing helpers live here."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable


def time_fn(fn: Callable[[], object], *, warmup: int = 2, iters: int = 10, sync: Callable[[object], object] | None = None) -> dict:
    """Median/min wall time in ms of ``fn()`` after ``warmup`` calls; ``sync`` blocks on the result."""
    sync = sync or (lambda r: r)
    for _ in range(warmup):
        sync(fn())
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(fn())
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "iters": iters}


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats (a value not measured: NaN) as ``None``: strict JSON has no NaN;
    NumPy scalars and arrays as Python numbers and lists."""
    if hasattr(obj, "dtype") and hasattr(obj, "tolist"):  # np.float32(1.5) -> 1.5, arrays -> lists
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (:func:`json_safe`; other objects as ``str``) to ``path`` atomically:
    benchmarks rewrite their file after every row, so a run cut by a time limit leaves what it measured
    and never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=1, default=str, allow_nan=False))
    os.replace(tmp, path)


def block(x):
    """Block until every JAX array in ``x`` is ready."""
    import jax

    return jax.block_until_ready(x)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    if not rows:
        print("(no rows)")
        return
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in columns))


def peak_device_memory() -> float | None:
    """Peak bytes in use on the first local device since the process started, in GiB (``None`` where the
    backend keeps no allocator statistics, e.g. the CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return round(peak / 2**30, 2) if peak else None


def capture_profile(fn: Callable[[], object], path: str, *, iters: int = 3) -> str:
    """Run ``fn()`` ``iters`` times under ``jax.profiler.trace`` and copy the device trace (XSpace
    protobuf) to ``path`` (a single file, e.g. ``forward.xplane.pb``).

    Read it with xprof (``pip install xprof``): ``xprof.convert.raw_to_tool_data.xspace_to_tool_data(
    [path], "hlo_stats", {})`` gives per-HLO-op device time; ``tensorboard --logdir`` works on the
    folder it came from. Returns ``path``.
    """
    import glob
    import os
    import shutil
    import tempfile

    import jax

    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0  # device kernels and XLA's host events only: keeps the file small
    opts.host_tracer_level = 1
    with tempfile.TemporaryDirectory(prefix="lumina_prof_") as tmp:
        with jax.profiler.trace(tmp, profiler_options=opts):
            for _ in range(iters):
                jax.block_until_ready(fn())
        found = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not found:
            raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {tmp}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        shutil.copyfile(found[0], path)
    return path
