"""Test configuration: CPU, deterministic, full-precision fp32 matmuls, accelerator markers; shared helpers."""

import contextlib
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The project's caches (converted checkpoints, the persistent compilation cache) go to a folder of this test
# run (made by the first process, inherited by pytest-xdist workers and subprocesses; its writes are atomic
# renames), not the user's ~/.cache, and the pipeline leaves JAX's compilation cache off unless a test turns
# it on (it is process-wide: one test's from_pretrained would otherwise have every later test write its
# programs to disk).
TEST_CACHE = None
if "LUMINA_JAX_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    TEST_CACHE = tempfile.mkdtemp(prefix="lumina_jax_test_cache_")
    atexit.register(shutil.rmtree, TEST_CACHE, ignore_errors=True)
    os.environ["LUMINA_JAX_CACHE"] = TEST_CACHE
os.environ.setdefault("LUMINA_JAX_COMPILATION_CACHE", "off")
if os.environ["JAX_PLATFORMS"] == "cpu" and os.environ.get("LUMINA_TEST_XLA_DEFAULTS") != "1":
    # Faster compiles (no fast-math), inherited by the suite's subprocesses: lumina_jax/xla_flags.py.
    from lumina_jax.xla_flags import cpu_fast_compile, set_flags

    os.environ["XLA_FLAGS"] = set_flags(cpu_fast_compile())

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    import signal

    # A shell starts background jobs (`cmd &`, no job control) with SIGINT ignored, and children inherit
    # that: the Ctrl-C tests need Python's own handler here and the default in the processes they start.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "gpu: needs a GPU (skipped elsewhere)")
    config.addinivalue_line("markers", "tpu: needs a TPU (skipped elsewhere)")
    config.addinivalue_line("markers", "slow: slower tests (still run in CI)")


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: pytest without it must not refuse this file
def pytest_xdist_auto_num_workers(config):
    """Workers for ``pytest -n auto`` (pytest-xdist; README's test command, CI): one per CPU core up to one per
    8 GiB of memory (a worker holds JAX, torch and a few compiled models), and none on an accelerator
    (``JAX_PLATFORMS`` other than ``cpu``: processes sharing one device would contend for its memory and
    make its tests' timings meaningless) or with a single core."""
    if os.environ["JAX_PLATFORMS"] != "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gib = 8.0
    workers = min(cores, max(1, int(memory_gib // 8)))
    return workers if workers > 1 else 0


def pytest_collection_modifyitems(config, items):
    backend = jax.default_backend()
    for item in items:
        for marker in ("gpu", "tpu"):
            if marker in item.keywords and backend != marker:
                item.add_marker(pytest.mark.skip(reason=f"needs a {marker.upper()} (running on {backend})"))


@pytest.fixture(autouse=True)
def _close_data_iterators(monkeypatch):
    """Closes the data iterators a test opened when it ends. Left to the garbage collector, an iterator
    is closed whenever (and in whatever thread) its last reference goes -- seen inside its own prefetch
    thread ("cannot join current thread"), or during a later test; closing here stops its prefetch
    threads and worker processes in the main thread, between tests."""
    import sys
    import weakref

    module = sys.modules.get("lumina_jax.data.pipeline")  # not imported: this test opens no pipeline
    if module is None:
        yield
        return
    opened = []
    make = module.DataPipeline.__iter__

    def tracked(self):
        it = make(self)
        opened.append(weakref.ref(it))
        return it

    monkeypatch.setattr(module.DataPipeline, "__iter__", tracked)
    yield
    for ref in opened:
        it = ref()
        if it is not None:
            it.close()


def rel_l2(a, b) -> float:
    """Relative L2 error ||a - b|| / ||b|| in float64."""
    import numpy as np

    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def export_for_cuda(fn, *args, gpu: str = "NVIDIA H100"):
    """``jax.export`` of ``fn`` for CUDA on the CPU, Triton custom calls allowed: runs the Pallas -> Triton
    lowering with no GPU attached. jax >= 0.11 asks the device for its compute capability there (raising
    "No supported GPU devices found" on a CPU), so the target GPU is named through an abstract mesh; jax 0.10
    lowers without asking."""
    from jax import export

    sharding = jax.sharding
    target = contextlib.nullcontext()
    if hasattr(sharding, "AbstractDevice") and hasattr(sharding, "use_abstract_mesh"):
        device = sharding.AbstractDevice(device_kind=gpu, num_cores=None, platform="gpu")
        target = sharding.use_abstract_mesh(sharding.AbstractMesh((1,), ("gpu",), abstract_device=device))
    with target:
        return export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)


def saved_reference_pipeline(root):
    """A tiny random diffusers ``Lumina2Pipeline`` (progress bars off), its in-memory ``Components``, and the
    folder it was saved to with ``save_pretrained`` (``root / "pipe"``)."""
    from lumina_jax.bench.generate import build_reference_pipeline

    ref, comps = build_reference_pipeline("tiny", seed=0, tokenizer_dir=root / "tok")
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(root / "pipe")
    return ref, comps, root / "pipe"
