"""``launch/local.py``: argument validation and process 0's output streamed to the console."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("launch_local", REPO / "launch" / "local.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("flag", ["-n", "-d"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_counts_must_be_positive(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        _load().main([flag, value, "--dry-run", "--", "cfg.yaml"])
    assert e.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_port_and_separator(monkeypatch, capsys):
    """An explicit ``--port`` wins over ``LAUNCH_PORT``; only the first ``--`` (the separator) is dropped, a
    later one reaches the child."""
    monkeypatch.setenv("LAUNCH_PORT", "5555")
    mod = _load()
    assert mod.main(["-n", "1", "--port", "4242", "--dry-run", "--", "cfg", "a=1", "--", "--flag"]) == 0
    line = capsys.readouterr().out.strip()
    assert "LUMINA_COORDINATOR=127.0.0.1:4242" in line and line.endswith("train cfg a=1 -- --flag")
    assert mod.main(["-n", "1", "--dry-run", "--", "cfg"]) == 0
    assert "LUMINA_COORDINATOR=127.0.0.1:5555" in capsys.readouterr().out


def test_process_0_output_is_streamed(tmp_path):
    # process 0 prints, then hangs past --timeout: its output must already be on the console
    (tmp_path / "hang_after_print.py").write_text("import time\nprint('hello from process', flush=True)\n"
                                                  "time.sleep(60)\n")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    cmd = [sys.executable, str(REPO / "launch/local.py"), "-n", "1", "-d", "1", "--timeout", "3",
           "--module", "hang_after_print", "--command", "", "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 124
    assert "hello from process" in p.stdout


def test_success_prints_process_0_output_once(tmp_path):
    (tmp_path / "say_hi.py").write_text("print('hi there')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    cmd = [sys.executable, str(REPO / "launch/local.py"), "-n", "2", "-d", "1", "--module", "say_hi",
           "--command", "", "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("hi there") == 1


def test_ctrl_c_reaches_processes_without_a_handler_and_ends_with_130(tmp_path):
    """A Ctrl-C that lands before the trainers install their handler (start-up, compilation) kills them
    by SIGINT (exit -2): the launcher ends with 130, without log tails (it reported -2 as a failure)."""
    import signal

    (tmp_path / "sleeper.py").write_text("import time\ntime.sleep(60)\n")  # no SIGINT handler: dies of it
    cmd = [sys.executable, str(REPO / "launch/local.py"), "-n", "2", "-d", "1", "--module", "sleeper", "--command", "",
           "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    rc, out, err = _signal_launcher(cmd, REPO, dict(os.environ, PYTHONPATH=str(tmp_path)), signal.SIGINT, 1.0)
    assert rc == 130, (out, err)
    assert "Ctrl-C: stopping every process" in out and "last lines" not in err


def _signal_launcher(cmd: list, cwd, env: dict, sig: int, after_s: float) -> tuple[int, str, str]:
    """Start the launcher, send it ``sig`` ``after_s`` seconds after it started its processes; ``(rc, out, err)``."""
    import time

    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("started 2 processes")
        time.sleep(after_s)
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, out, err


def test_sigterm_to_the_launcher_stops_the_processes_and_they_run_where_it_was_started(tmp_path):
    """The processes run in their own sessions: a SIGTERM (kill, timeout, a cancelled job) to the launcher must
    stop them as Ctrl-C does, not leave them running; relative paths resolve in the caller's folder."""
    import signal
    import time

    (tmp_path / "sleeper.py").write_text("import os, time\nprint('cwd', os.getcwd(), flush=True)\ntime.sleep(60)\n")
    cmd = [sys.executable, str(REPO / "launch/local.py"), "-n", "2", "-d", "1", "--module", "sleeper", "--command", "",
           "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    dry = subprocess.run(cmd + ["--dry-run"], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert f"PYTHONPATH={REPO}{os.pathsep}{tmp_path}" in dry.stdout, dry.stdout
    rc, out, err = _signal_launcher(cmd, tmp_path, dict(os.environ, PYTHONPATH=str(tmp_path)), signal.SIGTERM, 2.0)
    assert rc == 130, (out, err)
    assert f"cwd {tmp_path}" in out
    time.sleep(0.5)

    def ours(pid: str) -> bool:  # a "python -m sleeper" started in tmp_path, still alive
        try:
            return (b"-m\0sleeper" in Path(f"/proc/{pid}/cmdline").read_bytes()
                    and os.path.realpath(f"/proc/{pid}/cwd") == str(tmp_path.resolve()))
        except OSError:
            return False

    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and ours(pid)]
