#!/usr/bin/env python3
"""Run a multi-process JAX job on this machine (CPU devices): what the multi-host tests use.

    python launch/local.py --num-processes 2 --devices-per-process 4 -- \\
        configs/train/tiny_synthetic.yaml run_dir=/tmp/run mesh.fsdp=8

Starts ``--num-processes`` copies of ``python -m lumina_jax train CONFIG key=value...`` (or any
``--module``), each with

    LUMINA_COORDINATOR=127.0.0.1:<port>  LUMINA_NUM_PROCESSES=<n>  LUMINA_PROCESS_ID=<i>
    JAX_PLATFORMS=cpu  XLA_FLAGS="<your XLA_FLAGS> --xla_force_host_platform_device_count=<devices-per-process>"

(:mod:`lumina_jax.parallel.distributed` reads these and selects gloo CPU collectives). Output of
process ``i`` goes to ``<log-dir>/process_<i>.log``; process 0's is also streamed to the console as it is
written. If one process fails (or ``--timeout`` passes: exit code 124) the others are stopped, the last
lines of every process's log go to stderr, and the exit code is the first non-zero one. Ctrl-C is
passed on to the processes (a training run stops after a step all agree on, with a checkpoint: the
same command resumes it); a second Ctrl-C kills them. SIGTERM and SIGHUP to the launcher count as Ctrl-C
(the processes run in their own sessions, so a killed launcher would otherwise leave them running). The
processes run in the current folder with the checkout on ``PYTHONPATH`` (the ``--dry-run`` output shows
the ``PYTHONPATH``).

Variables: ``LAUNCH_PORT`` (default: a free port), ``DRY_RUN=1`` (same as ``--dry-run``: print the
environment and commands, run nothing), ``PYTHON`` (interpreter, default: this one).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lumina_jax.config_utils import int_at_least  # noqa: E402 -- no JAX import
from lumina_jax.xla_flags import with_cpu_devices  # noqa: E402 -- no JAX import


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo_new(path: Path, pos: int) -> int:
    """Write what was appended to ``path`` since byte ``pos`` to stdout; returns the new position."""
    with open(path, "rb") as f:
        f.seek(pos)
        chunk = f.read()
    if chunk:
        sys.stdout.write(chunk.decode("utf-8", errors="replace"))
        sys.stdout.flush()
    return pos + len(chunk)


def build(args: argparse.Namespace) -> list[tuple[dict, list[str]]]:
    port = int(args.port or os.environ.get("LAUNCH_PORT") or free_port())  # an explicit --port wins
    python = os.environ.get("PYTHON", sys.executable)
    cmd_tail = args.rest[1:] if args.rest[:1] == ["--"] else list(args.rest)  # the separator only
    jobs = []
    for i in range(args.num_processes):
        env = {
            "LUMINA_COORDINATOR": f"127.0.0.1:{port}",
            "LUMINA_NUM_PROCESSES": str(args.num_processes),
            "LUMINA_PROCESS_ID": str(i),
            "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": with_cpu_devices(args.devices_per_process),
            # the checkout on the path (the package is used in place), the caller's folder as the cwd, so
            # relative config / run_dir / data paths mean what they meant where the command was typed
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        }
        jobs.append((env, [python, "-m", args.module, *([args.command] if args.command else []), *cmd_tail]))
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-processes", "-n", type=int_at_least(1), default=2, help="processes to start (>= 1)")
    p.add_argument("--devices-per-process", "-d", type=int_at_least(1), default=4,
                   help="virtual CPU devices per process (>= 1)")
    p.add_argument("--module", default="lumina_jax", help="python -m MODULE (default lumina_jax)")
    p.add_argument("--command", default="train", help="first argument to the module ('' for none)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--log-dir", default=None, help="per-process logs (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before all processes are killed")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- CONFIG key=value ...")
    args = p.parse_args(argv)
    jobs = build(args)
    if args.dry_run or os.environ.get("DRY_RUN") == "1":
        for env, cmd in jobs:
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + " ".join(map(shlex.quote, cmd)))
        return 0
    import tempfile

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="lumina_local_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []

    def as_interrupt(signum, frame):  # SIGTERM (kill, timeout, a cancelled job), SIGHUP (the ssh session went)
        raise KeyboardInterrupt  # the children run in their own sessions: stop them the way Ctrl-C does

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, as_interrupt)
    for i, (env, cmd) in enumerate(jobs):
        log = open(log_dir / f"process_{i}.log", "w")
        procs.append((subprocess.Popen(cmd, env=dict(os.environ, **env), cwd=os.getcwd(), stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), log))  # fmt: skip
    print(f"started {len(procs)} processes; logs in {log_dir}", flush=True)
    start = time.time()
    rc = 0
    log0, pos0 = log_dir / "process_0.log", 0
    interrupted = False
    stopped = (0, 128 + signal.SIGINT, -signal.SIGINT)  # -2: a trainer stopped by the signal before its handler
    try:
        while True:
            try:
                time.sleep(0.2)
                pos0 = echo_new(log0, pos0)
                codes = [pr.poll() for pr, _ in procs]
                bad = [c for c in codes if c not in (None, 0)]
                # stopping as asked: the others finish their checkpoint (not when one died of the signal before
                # its handler was in place, -2: the rest would wait for it in a collective)
                stopping = interrupted and None in codes and all(c in (None, 0, 128 + signal.SIGINT) for c in codes)
                if bad and not stopping:
                    rc = bad[0]
                    break
                if all(c == 0 for c in codes):
                    break
                if args.timeout and time.time() - start > args.timeout:
                    rc = 124
                    break
            except KeyboardInterrupt:
                if interrupted:
                    raise  # the second Ctrl-C: the processes are killed below
                interrupted = True
                print("Ctrl-C: stopping every process after an agreed step (Ctrl-C again to kill them)", flush=True)
                for pr, _ in procs:
                    if pr.poll() is None:
                        pr.send_signal(signal.SIGINT)  # the trainer only, not its data workers
    except KeyboardInterrupt:
        rc = 130
    finally:
        for pr, log in procs:
            if pr.poll() is None:
                os.killpg(pr.pid, signal.SIGKILL)  # our own children, by process group id
                pr.wait()
            log.close()
        echo_new(log0, pos0)  # what process 0 wrote last
    if interrupted and rc in stopped:
        return 128 + signal.SIGINT if rc else 0  # stopped as asked (with a checkpoint where the job writes one)
    if rc:
        for i in range(len(procs)):
            tail = (log_dir / f"process_{i}.log").read_text()[-3000:]
            print(f"--- process {i} (last lines) ---\n{tail}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
