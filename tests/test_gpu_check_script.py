"""``launch/gpu_check.sh`` runs on a lent GPU with minutes of budget: a typo in a bench flag would waste the
lease. Every step it would run must name an existing benchmark and parse with that benchmark's arguments."""

import argparse
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from lumina_jax.bench.__main__ import BENCHES

ROOT = Path(__file__).resolve().parents[1]


class _Parsed(Exception):
    pass


def _steps(part: str, tmp_path) -> list[tuple[str, list[str]]]:
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / part))
    out = subprocess.run(["bash", "launch/gpu_check.sh", part], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    steps = []
    for line in out.splitlines():
        m = re.match(r"=== (\S+) \(limit \d+s, at \d+s\): (.*)$", line)
        if m:
            steps.append((m.group(1), shlex.split(m.group(2))))
    return steps


@pytest.mark.parametrize("part", ["1", "2"])
def test_every_step_parses(part, tmp_path, monkeypatch):
    import importlib

    steps = _steps(part, tmp_path)
    assert len(steps) >= 4
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)  # exits with status 2 on an unknown or malformed flag
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for name, argv in steps:
        if argv[:3] == ["python3", "-m", "pytest"]:
            assert all((ROOT / a).exists() for a in argv if a.startswith("tests/")), name
            continue
        assert argv[:3] == ["python3", "-m", "lumina_jax.bench"], (name, argv)
        assert argv[3] in BENCHES, (name, argv[3])
        module = importlib.import_module(BENCHES[argv[3]][0])
        with pytest.raises(_Parsed):
            module.main(argv[4:])
