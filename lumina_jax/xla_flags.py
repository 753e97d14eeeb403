"""``XLA_FLAGS`` editing for launchers and tests (no JAX import: the flags must be set before JAX starts).

``XLA_FLAGS`` is one string of ``--name=value`` flags read once, when the first backend starts; a flag
given twice is ambiguous, so these helpers replace a flag by name instead of appending a second copy,
and keep every other flag the user set.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Iterable, Optional

DEVICE_COUNT = "--xla_force_host_platform_device_count"



def cpu_fast_compile() -> tuple[str, ...]:
    """Compile-time settings of the test suite on CPU (tests/conftest.py): LLVM at -O0 and, on jaxlib
    0.10 (0.11 removed the flag; an unknown flag aborts the process), the loop-emitter fusions instead
    of the MLIR fusion emitters. The tiny test models spend most of their time in compilation: a 2-stage
    sharded train step on 8 CPU devices compiles in 3.3 s instead of 12.5 s on jaxlib 0.10 (7.5 s with
    -O0 alone; BENCHMARKS.md, "Test suite"). No fast-math; the code runs slower, which the suite's small
    shapes do not notice. Not for real runs."""
    flags = ["--xla_backend_optimization_level=0"]
    try:
        major, minor = (int(v) for v in importlib.metadata.version("jaxlib").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        major, minor = 0, 11  # unknown: only the flag every version has
    if (major, minor) < (0, 11):
        flags.append("--xla_cpu_use_fusion_emitters=false")
    return tuple(flags)


def _name(flag: str) -> str:
    return flag.split("=", 1)[0]


def set_flags(extra: Iterable[str], flags: Optional[str] = None) -> str:
    """``flags`` (default: the environment's ``XLA_FLAGS``) with each flag of ``extra`` set: one of the
    same name is replaced, others are kept in order."""
    extra = list(extra)
    names = {_name(f) for f in extra}
    base = (os.environ.get("XLA_FLAGS", "") if flags is None else flags).split()
    return " ".join([f for f in base if _name(f) not in names] + extra)


def with_cpu_devices(count: int, flags: Optional[str] = None) -> str:
    """``flags`` (default: the environment's ``XLA_FLAGS``) making the CPU backend show ``count`` devices."""
    if count < 1:
        raise ValueError(f"a CPU device count must be >= 1, got {count}")
    return set_flags([f"{DEVICE_COUNT}={count}"], flags)
