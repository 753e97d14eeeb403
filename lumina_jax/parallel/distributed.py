"""Multi-process start-up: ``jax.distributed.initialize`` from flags or the environment.

Call :func:`initialize` first thing in an entry point, before any JAX computation. Resolution order:

1. explicit arguments (``coordinator``, ``num_processes``, ``process_id``), e.g. from CLI flags;
2. the project's variables ``LUMINA_COORDINATOR`` (``host:port``), ``LUMINA_NUM_PROCESSES``,
   ``LUMINA_PROCESS_ID`` (set by ``launch/local.py`` and usable by any scheduler);
3. xpk GPU workloads (``JAX_COORDINATOR_ADDRESS``, ``JAX_COORDINATOR_PORT``, ``NNODES`` > 1,
   ``NODE_RANK``; one process per node with all its GPUs) -- explicit arguments from those;
4. a cluster JAX detects itself: a multi-host TPU slice / pod (``TPU_WORKER_HOSTNAMES`` with several
   hosts, or ``MEGASCALE_*`` multi-slice variables, as GKE sets them; on Cloud TPU VMs, which keep that
   in instance metadata, ``LUMINA_TPU_POD=1``, exported by ``launch/tpu_pod.sh``: JAX then reads the
   metadata), SLURM with more than one task
   (``SLURM_JOB_ID`` + ``SLURM_NTASKS`` > 1; JAX reads ``SLURM_*`` to find the coordinator), or
   Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1) -- then ``jax.distributed.initialize()`` without arguments,
   except that SLURM with one task per node (``launch/slurm.sbatch``) passes ``local_device_ids`` for
   all the node's GPUs (``SLURM_GPUS_ON_NODE``): JAX would otherwise give each process only GPU
   ``SLURM_LOCALID``, i.e. one GPU per node;
5. otherwise nothing (single process).

On CPU (tests, the local launcher) collectives across processes need gloo, which must be selected
before the backend starts; this module does that when ``JAX_PLATFORMS`` is ``cpu``.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Optional

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR = "LUMINA_COORDINATOR"
ENV_NUM_PROCESSES = "LUMINA_NUM_PROCESSES"
ENV_PROCESS_ID = "LUMINA_PROCESS_ID"
ENV_TPU_POD = "LUMINA_TPU_POD"  # "1": a Cloud TPU VM slice (launch/tpu_pod.sh); JAX finds the rest in its metadata

_initialized = False


def detect_cluster(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Name of an auto-detectable multi-process environment, or None. Detected in the order JAX's own
    cluster detection uses (Open MPI, Slurm, Cloud TPU), so that the name is what JAX will join: Open MPI
    only up to version 4 (``mpirun`` of Open MPI 5, which JAX does not detect, is an error naming the
    ``LUMINA_*`` variables to set instead), also inside a Slurm allocation; Slurm only inside an ``srun``
    step (a batch script or ``salloc`` shell runs one process: warned)."""
    env = os.environ if env is None else env
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        if "OMPI_MCA_orte_hnp_uri" not in env:
            raise ValueError(f"mpirun with {env['OMPI_COMM_WORLD_SIZE']} processes, but JAX only detects Open MPI up "
                             f"to version 4; set {ENV_COORDINATOR}=host:port, {ENV_NUM_PROCESSES} and "
                             f"{ENV_PROCESS_ID} (e.g. from OMPI_COMM_WORLD_RANK) for each process")  # fmt: skip
        return "mpi"
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        if "SLURM_STEP_NODELIST" in env or "SLURM_STEP_ID" in env:
            return "slurm"
        log.warning("a Slurm allocation of %s tasks, but not inside an srun step: running as one process (start "
                    "one per task with srun, as launch/slurm.sbatch does)", env.get("SLURM_NTASKS"))  # fmt: skip
        return None
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env or env.get(ENV_TPU_POD, "") in ("1", "true"):
        return "tpu"
    return None


def resolve(
    coordinator: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    env: Optional[Mapping[str, str]] = None,
) -> tuple[str, dict]:
    """What :func:`initialize` would do: ``("explicit", kwargs)``, ``(cluster, {})`` or ``("none", {})``."""
    env = os.environ if env is None else env
    coordinator = coordinator or env.get(ENV_COORDINATOR)
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = int(env[ENV_PROCESS_ID])
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given):
        if not all(given):
            raise ValueError(
                "multi-process start needs all of coordinator, num_processes and process_id "
                f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got "
                f"coordinator={coordinator!r}, num_processes={num_processes!r}, process_id={process_id!r}"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} not in [0, {num_processes})")
        if not _has_port(coordinator):
            raise ValueError(f"coordinator {coordinator!r} is not host:port (e.g. node0:1234, [fe80::1]:1234); "
                             f"set {ENV_COORDINATOR} to the address and a free port of process 0's host")  # fmt: skip
        return "explicit", dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("NNODES", "1") or 1) > 1 and "NODE_RANK" in env:
        address = env["JAX_COORDINATOR_ADDRESS"]
        if not _has_port(address):
            address = f"{address}:{env.get('JAX_COORDINATOR_PORT', '6002')}"
        return "xpk-gpu", dict(coordinator_address=address, num_processes=int(env["NNODES"]),
                               process_id=int(env["NODE_RANK"]))  # fmt: skip
    cluster = detect_cluster(env)
    if cluster == "slurm" and _slurm_tasks_per_node(env) == 1 and int(env.get("SLURM_GPUS_ON_NODE", "0") or 0) > 1:
        return cluster, dict(local_device_ids=list(range(int(env["SLURM_GPUS_ON_NODE"]))))
    return (cluster, {}) if cluster else ("none", {})


def _has_port(address: str) -> bool:
    """Whether ``address`` is ``host:port`` (``[v6 address]:port`` for IPv6) with a non-empty host."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return False
    return host.startswith("[") == host.endswith("]") and (host.startswith("[") or ":" not in host)


def _slurm_tasks_per_node(env: Mapping[str, str]) -> Optional[int]:
    """Tasks per node of a SLURM step: the step's own ``SLURM_STEP_TASKS_PER_NODE`` (an ``srun -n`` inside
    an ``sbatch --ntasks-per-node`` allocation differs from it), else the job's ``SLURM_NTASKS_PER_NODE`` /
    ``SLURM_TASKS_PER_NODE`` (e.g. ``1`` or ``8(x2)``), else tasks / nodes."""
    per_node = (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
                or env.get("SLURM_TASKS_PER_NODE"))  # fmt: skip
    if per_node:
        return int(per_node.split("(")[0].split(",")[0])
    nodes, tasks = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES"), env.get("SLURM_NTASKS")
    return int(tasks) // int(nodes) if nodes and tasks and int(nodes) > 0 else None


def initialize(
    coordinator: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> str:
    """Initialise JAX's distributed runtime if this is a multi-process job. Returns what was done.

    Idempotent. Must run before the first JAX computation (it fixes the backend's process set).
    """
    global _initialized
    mode, kwargs = resolve(coordinator, num_processes, process_id)
    if mode == "none" or _initialized:
        return mode if not _initialized else "already"
    if kwargs.get("num_processes") == 1:
        return "none"
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("jax.distributed.initialize (%s) %s", mode, kwargs)
    jax.distributed.initialize(**kwargs)
    _initialized = True
    return mode


def is_primary() -> bool:
    return jax.process_index() == 0


def exit_alone(code: int) -> int:
    """``code`` for a process that failed on its own (a setting only it could not use: a missing file on
    its host, ...). In a multi-process job it exits here, at once: returning would run JAX's distributed
    shutdown, which waits (~5 minutes) for the other processes while they block in a collective with
    this one, and launchers (``launch/local.py``, Slurm ``--kill-on-bad-exit``) stop the others only
    when one exits."""
    if code and jax.process_count() > 1:
        import sys

        log.error("process %d failed (exit code %d): exiting now so that the job stops", jax.process_index(), code)
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    return code
