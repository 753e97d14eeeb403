"""``launch/gpu_check.sh`` runs on a lent GPU with minutes of budget: a typo in a flag would waste the lease.
Every step it would run must name an existing benchmark or command and parse with its arguments (and a
training step's overrides must name keys of its config)."""

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


def _command_module(argv: list[str]):
    """``(module, its argv)`` for a ``python3 -m lumina_jax.bench|lumina_jax|lumina_jax.shapes ...`` step."""
    import importlib

    from lumina_jax.__main__ import COMMANDS

    assert argv[:2] == ["python3", "-m"], argv
    if argv[2] == "lumina_jax.bench":
        assert argv[3] in BENCHES, argv[3]
        return importlib.import_module(BENCHES[argv[3]][0]), argv[4:]
    if argv[2] == "lumina_jax":
        assert argv[3] in COMMANDS, argv[3]
        return importlib.import_module(COMMANDS[argv[3]][0]), argv[4:]
    assert argv[2] == "lumina_jax.shapes", argv
    return importlib.import_module("lumina_jax.shapes.build"), argv[3:]


@pytest.mark.parametrize("part", ["1", "2", "3", "shapes"])
def test_every_step_parses(part, tmp_path, monkeypatch, capsys):
    steps = _steps(part, tmp_path)
    assert len(steps) >= 2
    # a training step resolves its config and overrides (unknown keys fail) and stops there
    for name, argv in steps:
        if argv[2:4] == ["lumina_jax", "train"]:
            module, args = _command_module(argv)
            assert module.main(["--print-config", *args]) == 0, name
    original = {m: getattr(argparse.ArgumentParser, m) for m in ("parse_args", "parse_intermixed_args")}

    def stop_after(method):
        def parse_then_stop(self, args=None, namespace=None):
            original[method](self, args, namespace)  # exits with status 2 on an unknown or malformed flag
            raise _Parsed

        return parse_then_stop

    for m in original:  # nothing past argument parsing runs (no benchmark, no training)
        monkeypatch.setattr(argparse.ArgumentParser, m, stop_after(m))
    for name, argv in steps:
        if argv[:3] == ["python3", "-m", "pytest"]:
            assert all((ROOT / a).exists() for a in argv if a.startswith("tests/")), name
            continue
        module, args = _command_module(argv)
        with pytest.raises(_Parsed):
            module.main(args)
