"""Shell launchers (dry runs): xpk's default workload name, slurm's quoted checkout path."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
XPK_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, **env), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("user", ["John.Doe", "ADMIN_user@Corp.example.com-with-a-very-long-name", "__", "a-"])
def test_xpk_default_workload_is_a_valid_name(user):
    env = {"DRY_RUN": "1", "CLUSTER": "c", "IMAGE": "img", "TPU_TYPE": "v6e-8", "WORKLOAD": "", "USER": user}
    p = _run(["bash", "launch/xpk.sh", "cfg"], env)
    assert p.returncode == 0, p.stderr
    words = shlex.split(p.stdout)
    name = words[words.index("--workload") + 1]
    assert XPK_NAME.fullmatch(name) and len(name) <= 40, name
    assert name.startswith("lumina-") and re.search(r"-\d{4}-\d{4}$", name)


def test_slurm_cd_quotes_the_checkout(tmp_path):
    repo = tmp_path / "my checkout"
    p = _run(["bash", "launch/slurm.sbatch", "cfg"], {"DRY_RUN": "1", "REPO_DIR": str(repo), "VENV": ""})
    assert p.returncode == 0, p.stderr
    words = shlex.split(p.stdout.splitlines()[-1])
    inner = words[words.index("-c") + 1]
    assert shlex.split(inner)[:2] == ["cd", str(repo)]
    # a venv path with a space is quoted too; srun repeats sbatch's --cpus-per-task (not inherited since 22.05)
    venv = tmp_path / "my venv"
    p = _run(["bash", "launch/slurm.sbatch", "cfg"], {"DRY_RUN": "1", "REPO_DIR": str(repo), "VENV": str(venv),
                                                      "SLURM_CPUS_PER_TASK": "64"})  # fmt: skip
    words = shlex.split(p.stdout.splitlines()[-1])
    inner = shlex.split(words[words.index("-c") + 1])
    assert "--cpus-per-task=64" in words[:words.index("-c")]
    assert inner[inner.index("source") + 1] == str(venv / "bin" / "activate")


def test_tpu_pod_and_xpk_quote_their_remote_folders():
    """A checkout path with a space broke the remote ``cd``; a leading ``~/`` still expands remotely."""
    p = _run(["bash", "launch/tpu_pod.sh", "cfg"], {"DRY_RUN": "1", "TPU_NAME": "t", "ZONE": "z",
                                                    "REPO_DIR": "~/my repo", "VENV": "~/my venv"})  # fmt: skip
    assert p.returncode == 0, p.stderr
    words = shlex.split(p.stdout.strip())
    remote = next(w for w in words if w.startswith("--command="))[len("--command="):]
    assert "cd ~/my\\ repo;" in remote and "source ~/my\\ venv/bin/activate;" in remote, remote
    p = _run(["bash", "launch/xpk.sh", "cfg"], {"DRY_RUN": "1", "CLUSTER": "c", "IMAGE": "i",
                                                "DEVICE_TYPE": "h100-80gb-8", "WORKDIR": "/my app"})  # fmt: skip
    words = shlex.split(p.stdout.strip())
    assert shlex.split(words[words.index("--command") + 1])[:2] == ["cd", "/my app"]


def test_the_trainer_is_execd_so_that_sigterm_reaches_it():
    """A shell left in between (PID 1 in a container) neither receives nor forwards SIGTERM, and the
    trainer's preemption checkpoint would never be written."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "launch"
    for name in ("xpk.sh", "slurm.sbatch", "tpu_pod.sh"):
        assert "exec python -m lumina_jax train" in (root / name).read_text(), name
    # on Cloud TPU VMs the trainer learns it is one host of a slice from this variable (then JAX's metadata)
    assert "export LUMINA_TPU_POD=1; exec python -m lumina_jax train" in (root / "tpu_pod.sh").read_text()
