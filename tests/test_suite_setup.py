"""The test suite's own set-up (tests/conftest.py): worker count for ``pytest -n auto``, caches kept out of
the user's home."""

import os
from pathlib import Path

import conftest


def test_auto_workers_one_per_core_capped_by_memory_and_none_on_an_accelerator(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 24 * gib // 4096}[name])
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert conftest.pytest_xdist_auto_num_workers(None) == 3  # 16 cores, 24 GiB: one worker per 8 GiB
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert conftest.pytest_xdist_auto_num_workers(None) == 2  # the 2-core CI VM
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert conftest.pytest_xdist_auto_num_workers(None) == 0  # one core: run in this process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert conftest.pytest_xdist_auto_num_workers(None) == 0  # one accelerator: no sharing


def test_project_caches_go_to_a_folder_of_the_test_run():
    from lumina_jax.convert.components import cache_home

    root = Path(os.environ["LUMINA_JAX_CACHE"])
    assert cache_home() == root
    if conftest.TEST_CACHE is not None:  # not chosen by whoever runs the suite
        assert root == Path(conftest.TEST_CACHE) and root.is_dir() and Path.home() not in root.parents
