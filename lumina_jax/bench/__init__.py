"""Benchmarks; see ``python -m lumina_jax.bench --help``. Shared timing helpers live here."""

from __future__ import annotations

import statistics
import time
from typing import Callable


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
