"""Ahead-of-time compilation for real TPU topologies, on a machine without a TPU.

    python -m lumina_jax aot --topology v5p:4x4x4 --config lumina2_2b --stage 1 [--mesh fsdp] \\
        [--what train|forward|sample] [--per-device-batch N | --batch N] [key=value ...]

With ``libtpu`` installed (the version ``jax[tpu]`` pins for the installed jax),
``jax.experimental.topologies.get_topology_desc`` returns the devices of a TPU slice (no chip needed).
This command builds the project's ``(data, fsdp, context, tensor)`` mesh over them
(:func:`lumina_jax.parallel.mesh.create_mesh`), the abstract train state / params / batch as
``ShapeDtypeStruct`` carrying their ``NamedSharding`` (the same rule table the trainer uses), and
compiles the real step with XLA:TPU (Pallas kernels through Mosaic). It reports:

* per-device HBM from ``memory_analysis()``: arguments, outputs (minus what aliases donated inputs),
  temporaries, generated code, total, against the chip's HBM (v5e 16 GiB, v5p 95 GiB,
  v6e 32 GiB);
* the compile time;
* XLA's FLOP count (``cost_analysis()``, per device, x devices) against the analytic count
  (:func:`lumina_jax.train.metrics.train_flops_per_sample`). Mosaic kernels (splash attention) are
  opaque custom calls XLA does not count, so the analytic figure is also given without attention;
* parameters left fully replicated by the sharding rules although the mesh has parameter-sharding
  axes (``fsdp``/``context``/``tensor`` > 1), read back from the *compiled* executable's input
  shardings.

Exit status: 0 fits (total <= ``--max-fraction`` of HBM, default 0.9), 1 does not fit (also when
XLA:TPU itself refuses the program with ``RESOURCE_EXHAUSTED``; the numbers it gives are printed),
2 usage / setup error (no libtpu, bad topology, bad config).

Attention on the TPU target: ``attention: auto`` in a config resolves by the *host* platform, which
here is CPU. The command therefore uses the backend ``splash_sharded`` (registered below): JAX's
splash kernel compiled through Mosaic (not interpreted, head_dim padded to 128), wrapped in
``jax.shard_map`` over the batch and head axes of the mesh in effect, and, on meshes with a
``context`` axis, inside the context-parallel wrapper of :mod:`lumina_jax.parallel.context`. A Mosaic
kernel cannot be partitioned by GSPMD, so the plain ``splash`` backend under a sharded ``jit`` would be
fed all-gathered (replicated) activations; ``--attention splash`` shows that, ``--attention xla`` the
plain XLA einsum attention. ``--attention pallas_tpu_sharded`` compiles our own Mosaic kernels
(:mod:`lumina_jax.ops.flash_attention_tpu`, head_dim unpadded) the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

GiB = 1024**3

# HBM per chip (GiB), by the generation prefix of the topology name.
HBM_GIB: dict[str, float] = {"v4": 32.0, "v5e": 16.0, "v5litepod": 16.0, "v5p": 95.0, "v6e": 32.0}
# device_kind substrings -> generation (when only devices are known)
_KIND_TO_GEN: tuple[tuple[str, str], ...] = (("v6 lite", "v6e"), ("v6e", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"),
                                              ("v5p", "v5p"), ("v5", "v5p"), ("v4", "v4"))  # fmt: skip

WHATS = ("train", "forward", "sample")
ATTENTIONS = ("splash_sharded", "pallas_tpu_sharded", "splash", "xla")
MOSAIC_ATTENTIONS = ("splash_sharded", "pallas_tpu_sharded", "splash")

# libtpu releases that match a jax release (what ``jax[tpu]==X`` pins). Tests skip on a mismatch.
LIBTPU_FOR_JAX: dict[str, str] = {"0.10.2": "0.0.42"}


# Params replicated by design (regexes searched in the param path): the timestep embedder's weights are
# ``(freq, cond)``/``(cond, cond)``, and ``cond`` maps to no mesh axis in the rule table (5 MiB in the 2B).
INTENDED_REPLICATED: tuple[str, ...] = (r"(^|/)t_embedder/",)


# ----------------------------------------------------------------------------------------------
# libtpu / topology


def libtpu_status() -> tuple[bool, str]:
    """``(usable, reason)``: whether libtpu is installed and matches the installed jax."""
    import importlib.metadata as md

    try:
        ver = md.version("libtpu")
    except md.PackageNotFoundError:
        try:
            ver = md.version("libtpu-nightly")
        except md.PackageNotFoundError:
            return False, "libtpu is not installed (pip install -r requirements-dev.txt, or jax[tpu])"
    want = None
    try:  # the pin of jax's own "tpu" extra, e.g. 'libtpu==0.0.42.*; extra == "tpu"'
        reqs = md.requires("jax") or []
    except md.PackageNotFoundError:
        reqs = []
    for r in reqs:
        m = re.match(r"libtpu\s*==\s*([0-9.]+?)(\.\*)?\s*;.*extra\s*==\s*\"tpu\"", r)
        if m:
            want = m.group(1)
    want = want or LIBTPU_FOR_JAX.get(jax.__version__)
    if want is not None and not (ver == want or ver.startswith(want + ".")):
        return False, f"libtpu {ver} does not match jax {jax.__version__} (jax[tpu] pins libtpu=={want}.*)"
    return True, f"libtpu {ver}, jax {jax.__version__}"


def topology_devices(name: str) -> list[Any]:
    """Devices of a TPU slice, e.g. ``v5p:4x4x4`` (64 chips) or ``v5e:2x4``, without the hardware."""
    import os

    from jax.experimental import topologies

    # No TPU here: let several processes (pytest-xdist, parallel CI jobs) load libtpu side by side, and
    # skip the GCE metadata queries libtpu makes to find a TPU VM it is not running on.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    if ":" not in name:
        raise ValueError(f"topology {name!r}: expected GENERATION:SHAPE, e.g. v5p:4x4x4, v6e:4x4, v5e:2x4")
    if name.split(":")[0].lower() in ("v2", "v3", "v4"):
        raise ValueError(f"topology {name!r}: {name.split(':')[0]} chips have two TensorCores each (megacore), "
                         f"which these meshes do not model; supported: v5e, v5p, v6e")  # fmt: skip
    topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
    return list(topo.devices)


def generation(topology: Optional[str], devices: Sequence[Any] = ()) -> str:
    if topology:
        return topology.split(":")[0].lower()
    kind = devices[0].device_kind.lower() if devices else ""
    for sub, gen in _KIND_TO_GEN:
        if sub in kind:
            return gen
    return kind


def hbm_bytes(gen: str) -> Optional[int]:
    gib = HBM_GIB.get(gen)
    return int(gib * GiB) if gib is not None else None


# ----------------------------------------------------------------------------------------------
# attention on the TPU target


def register_tpu_backends() -> None:
    """Make ``splash``, ``context_*`` and the sharded TPU backends (``splash_sharded``, ``pallas_tpu_sharded``,
    their ``*_local`` kernels) available."""
    import lumina_jax.ops.splash_attention  # noqa: F401  (registers "splash")
    import lumina_jax.parallel.context  # noqa: F401  (registers "context_*")
    import lumina_jax.parallel.tpu_attention  # noqa: F401  (registers the sharded TPU backends)


# ----------------------------------------------------------------------------------------------
# building the abstract step


@dataclasses.dataclass
class Plan:
    """Everything needed to lower one step (all abstract)."""

    what: str
    fn: Any  # jitted function
    args: tuple  # ShapeDtypeStructs with shardings
    mesh: Any
    model_config: Any
    resolution: int
    global_batch: int
    per_device_batch: float
    cap_len: int
    remat: str
    attention: str
    analytic_flops: float  # global, whole step, attention included
    analytic_attention_flops: float  # global, the part spent in attention
    param_arg_index: Optional[int]  # which positional arg holds the params (for the replication check)
    model_name: str = ""


def _sds(a, sharding, dtype=None):
    return jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=sharding)


def build_plan(
    cfg: Any,
    mesh: Any,
    *,
    what: str = "train",
    stage: int = 0,
    resolution: Optional[int] = None,
    global_batch: Optional[int] = None,
    per_device_batch: Optional[int] = None,
    cap_len: int = 256,
    attention: str = "splash_sharded",
    guidance: bool = True,
) -> Plan:
    """Abstract arguments and the jitted step for ``what`` on ``mesh`` (a :class:`TrainConfig`)."""
    from lumina_jax.models.nextdit import NextDiT, flops_forward
    from lumina_jax.parallel import mesh as mesh_lib
    from lumina_jax.parallel import sharding as shard_lib
    from lumina_jax.train import metrics as metrics_lib
    from lumina_jax.train import objective as obj
    from lumina_jax.train import optim
    from lumina_jax.train.config import load_model_config
    from lumina_jax.train.state import init_state, state_shardings
    from lumina_jax.train.step import StepConfig, compile_train_step, make_train_step

    if what not in WHATS:
        raise ValueError(f"--what must be one of {WHATS}, got {what!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    register_tpu_backends()
    if not 0 <= stage < len(cfg.stages):
        raise ValueError(f"stage {stage} out of range: the config has {len(cfg.stages)} stages")
    st = cfg.stages[stage]
    res = int(resolution if resolution is not None else st.resolution)
    if res < 16 or res % 16:
        raise ValueError(f"resolution {res} is not a positive multiple of 16 (VAE factor 8 x patch 2)")
    div = mesh_lib.batch_divisor(mesh)
    if per_device_batch is not None:
        gb = int(per_device_batch) * div
    else:
        gb = int(global_batch if global_batch is not None else st.batch)
    if what == "train" and gb % (div * cfg.grad_accum):
        raise ValueError(f"global batch {gb} must be a multiple of data x fsdp ({div}) x grad_accum ({cfg.grad_accum})")
    if what != "train" and gb % div:
        raise ValueError(f"batch {gb} must be a multiple of data x fsdp ({div})")
    mc = load_model_config(cfg)
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    model = NextDiT(mc, dtype=dtype, attention_backend=attention, remat=cfg.remat, scan_layers=cfg.scan_layers)
    boxed = shard_lib.model_abstract(mc)
    aparams = shard_lib.unbox(boxed)
    pshard = shard_lib.param_shardings(boxed, mesh)
    lat_hw = res // 8
    if lat_hw % mc.patch_size:
        raise ValueError(f"resolution {res} gives {lat_hw}x{lat_hw} latents, not a multiple of the patch {mc.patch_size}")
    n_img = (lat_hw // mc.patch_size) ** 2
    bs = lambda nd: mesh_lib.batch_sharding(mesh, nd)  # noqa: E731
    rep = NamedSharding(mesh, P())

    if what == "train":
        from lumina_jax.train.lora import training_view

        model, tboxed, patterns = training_view(model, boxed, cfg.trainable, cfg.lora)  # a LoRA run: its view
        taparams = shard_lib.unbox(tboxed)
        trainable = optim.trainable_mask(taparams, patterns)
        tx = optim.make_optimizer(cfg.optimizer, trainable)
        astate = jax.eval_shape(lambda p: init_state(p, tx, cfg.ema_decay is not None), taparams)
        sshard = state_shardings(astate, shard_lib.param_shardings(tboxed, mesh), mesh)
        state = jax.tree.map(_sds, astate, sshard)
        batch = {
            "latents": jax.ShapeDtypeStruct((gb, lat_hw, lat_hw, mc.in_channels), jnp.float32, sharding=bs(4)),
            "cap_feats": jax.ShapeDtypeStruct((gb, cap_len, mc.cap_feat_dim), jnp.float32, sharding=bs(3)),
            "cap_mask": jax.ShapeDtypeStruct((gb, cap_len), jnp.bool_, sharding=bs(2)),
        }
        hp = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=rep), optim.stage_hparams(1e-4, 0, 1))
        mu = obj.shift_mu(obj.seq_len_for_resolution(res)) if cfg.objective.time_shift else None
        sc = StepConfig(seed=cfg.seed, t_sampling=cfg.objective.t_sampling, mu=mu,
                        aux_loss_weight=cfg.objective.aux_loss_weight, aux_pool=cfg.objective.aux_pool,
                        grad_accum=cfg.grad_accum, ema_decay=cfg.ema_decay)  # fmt: skip
        tmask = None if all(jax.tree.leaves(trainable)) else trainable
        step_fn = make_train_step(model, tx, optim.lr_schedule(cfg.optimizer), sc, tmask)
        run = compile_train_step(step_fn, mesh, sshard, batch)
        aux = bool(cfg.objective.aux_loss_weight)
        f = metrics_lib.train_flops_per_sample(mc, res, cap_len, cfg.objective.aux_pool, aux, lora=cfg.lora is not None)
        r = metrics_lib.remat_flops_per_sample(mc, res, cap_len, cfg.remat, cfg.objective.aux_pool, aux)
        att = 3 * metrics_lib.attention_flops(mc, cap_len, n_img)
        if aux:
            side = lat_hw // cfg.objective.aux_pool // mc.patch_size
            att += 3 * metrics_lib.attention_flops(mc, cap_len, side * side)
        return Plan(what, run.jitted, (state, batch, hp), mesh, mc, res, gb, gb / div, cap_len, cfg.remat, attention,
                    (f["train"] + r) * gb, att * gb, 0, cfg.model)  # fmt: skip

    # inference: bf16 params in the same shardings
    from lumina_jax.train.step import forward_fn

    params = jax.tree.map(lambda a, s: _sds(a, s, dtype), aparams, pshard)
    fwd = forward_fn(model)
    nb = 2 * gb if (what == "sample" and guidance) else gb
    x = jax.ShapeDtypeStruct((gb, lat_hw, lat_hw, mc.in_channels), jnp.float32, sharding=bs(4))
    cap = jax.ShapeDtypeStruct((nb, cap_len, mc.cap_feat_dim), dtype, sharding=bs(3))
    cmask = jax.ShapeDtypeStruct((nb, cap_len), jnp.bool_, sharding=bs(2))
    flops_one = float(flops_forward(mc, cap_len, n_img))
    att_one = float(metrics_lib.attention_flops(mc, cap_len, n_img))
    if what == "forward":
        t = jax.ShapeDtypeStruct((gb,), jnp.float32, sharding=bs(1))
        jitted = jax.jit(fwd, in_shardings=(pshard, bs(4), bs(1), bs(3), bs(2)), out_shardings=bs(4))
        args = (params, x, t, cap, cmask)
    else:
        scal = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
        jitted = jax.jit(_make_sample_step(fwd, guidance), in_shardings=(pshard, bs(4), rep, rep, bs(3), bs(2), rep),
                         out_shardings=bs(4), donate_argnums=(1,))  # fmt: skip
        args = (params, x, scal, scal, cap, cmask, scal)
    return Plan(what, jitted, args, mesh, mc, res, gb, gb / div, cap_len, cfg.remat, attention,
                flops_one * nb, att_one * nb, 0, cfg.model)  # fmt: skip


def _make_sample_step(fwd, guidance: bool):
    """One Euler step of the flow ODE with CFG (+ CFG-Renorm): the sampler's per-step program.

    ``cap``/``mask`` hold the conditional rows then the unconditional rows (batch ``2B``) when guided.
    """

    def step(params, x, t, dt, cap, mask, scale):
        b = x.shape[0]
        if guidance:
            xx = jnp.concatenate([x, x])
            tt = jnp.full((2 * b,), t, jnp.float32)
            v = fwd(params, xx, tt, cap, mask).astype(jnp.float32)
            v_c, v_u = v[:b], v[b:]
            try:
                from lumina_jax.sample.cfg import guided_velocity

                v = guided_velocity(v_c, v_u, scale, "clamp", 1.0)
            except ImportError:  # pragma: no cover - sampler module not present
                v = v_u + scale * (v_c - v_u)
        else:
            v = fwd(params, x, jnp.full((b,), t, jnp.float32), cap, mask).astype(jnp.float32)
        return x + dt * v

    return step


# ----------------------------------------------------------------------------------------------
# compile + analyse


@dataclasses.dataclass
class Report:
    topology: str
    generation: str
    devices: int
    mesh: dict
    what: str
    model: str
    resolution: int
    global_batch: int
    per_device_batch: float
    cap_len: int
    remat: str
    attention: str
    fits: bool
    hbm_capacity: Optional[int]
    max_fraction: float
    argument_bytes: Optional[int] = None
    output_bytes: Optional[int] = None
    alias_bytes: Optional[int] = None
    temp_bytes: Optional[int] = None
    code_bytes: Optional[int] = None
    total_bytes: Optional[int] = None
    total_counts: Optional[str] = None  # what XLA's out-of-memory figure counts when it is not everything
    lower_s: float = 0.0
    compile_s: float = 0.0
    xla_flops_per_device: Optional[float] = None
    analytic_flops: float = 0.0
    analytic_attention_flops: float = 0.0
    replicated_params: list = dataclasses.field(default_factory=list)  # [(path, bytes)]
    error: Optional[str] = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, default=str)


def _gib(x: Optional[float]) -> str:
    if x is None:
        return "?"
    return f"{x / GiB:.2f} GiB" if abs(x) >= GiB / 10 else f"{x / 2**20:.1f} MiB"


def parse_oom(msg: str) -> dict:
    """Numbers out of XLA:TPU's "Ran out of memory in memory space hbm" error (best effort)."""
    out = {}
    units = {"B": 1, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}

    def num(s, u):
        return float(s) * units.get((u or "B")[0].upper(), 1)

    m = re.search(r"Used\s+([\d.]+)\s*([KMGT]?i?B?)\s+of\s+([\d.]+)\s*([KMGT]?i?B?)\s+hbm", msg)
    if m:
        out["used"] = num(m.group(1), m.group(2))
        out["capacity"] = num(m.group(3), m.group(4))
    m = re.search(r"memory required for ([\w ]+?)\s*\(([\d.]+)\s*([KMGT]?i?B?)\)\s*exceeds available HBM\s*\(([\d.]+)\s*([KMGT]?i?B?)\)", msg)
    if m:
        out["used"] = num(m.group(2), m.group(3))
        out["capacity"] = num(m.group(4), m.group(5))
        out["counts"] = m.group(1).strip()  # e.g. "HLO temporaries": the arguments come on top
    m = re.search(r"[Ee]xceeded hbm capacity by\s+([\d.]+)\s*([KMGT]?i?B?)", msg)
    if m:
        out["exceeded"] = num(m.group(1), m.group(2))
    return out


def replicated_large_params(compiled_or_shardings: Any, abstract: Any, min_bytes: int, mesh: Any,
                            allow: Sequence[str] = INTENDED_REPLICATED) -> list:  # fmt: skip
    """``[(path, bytes)]`` of arrays of at least ``min_bytes`` that are fully replicated although the
    mesh has a parameter-sharding axis (``fsdp``, ``context`` or ``tensor``) larger than 1; paths
    matching one of the ``allow`` regexes (replicated on purpose) are not reported."""
    from lumina_jax.parallel.mesh import mesh_shape
    from lumina_jax.train.optim import path_str

    sizes = mesh_shape(mesh)
    if all(sizes.get(a, 1) == 1 for a in ("fsdp", "context", "tensor")):
        return []
    is_sh = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    by_path = {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(compiled_or_shardings, is_leaf=is_sh)[0]}
    out = []
    for path, a in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        s = by_path.get(path_str(path))
        if s is None:  # e.g. an argument the compiled program does not use
            continue
        nbytes = int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
        if nbytes < min_bytes or any(re.search(r, path_str(path)) for r in allow):
            continue
        if tuple(s.shard_shape(a.shape)) == tuple(a.shape):
            out.append((path_str(path), nbytes))
    return sorted(out, key=lambda x: -x[1])


def compile_plan(plan: Plan, *, topology: str, max_fraction: float = 0.9, replicated_min_bytes: int = 1 << 20,
                 capacity: Optional[int] = None) -> tuple[Report, Any]:  # fmt: skip
    """Lower and compile ``plan`` for its (topology) devices; never raises for an out-of-memory program."""
    from lumina_jax.parallel.mesh import mesh_shape

    devices = list(plan.mesh.devices.flat)
    gen = generation(topology, devices)
    cap = capacity if capacity is not None else hbm_bytes(gen)
    rep = Report(
        topology=topology, generation=gen, devices=len(devices), mesh=mesh_shape(plan.mesh), what=plan.what,
        model=plan.model_name,
        resolution=plan.resolution, global_batch=plan.global_batch, per_device_batch=plan.per_device_batch,
        cap_len=plan.cap_len, remat=plan.remat, attention=plan.attention, fits=False, hbm_capacity=cap,
        max_fraction=max_fraction, analytic_flops=plan.analytic_flops,
        analytic_attention_flops=plan.analytic_attention_flops,
    )  # fmt: skip
    t0 = time.perf_counter()
    with jax.set_mesh(plan.mesh):
        lowered = plan.fn.lower(*plan.args)
    rep.lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA:TPU refuses programs that do not fit HBM at compile time
        rep.compile_s = time.perf_counter() - t0
        msg = str(e)
        if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower() or "hbm" in msg.lower():
            nums = parse_oom(msg)
            rep.total_bytes = int(nums["used"]) if "used" in nums else None
            rep.total_counts = nums.get("counts")
            if "capacity" in nums:
                rep.hbm_capacity = int(nums["capacity"])
            first = next((ln for ln in msg.splitlines() if "memory" in ln.lower() or "hbm" in ln.lower()), msg[:300])
            rep.error = first.strip()[:600]
            return rep, None
        raise
    rep.compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    if ma is not None:
        rep.argument_bytes = int(ma.argument_size_in_bytes)
        rep.output_bytes = int(ma.output_size_in_bytes)
        rep.alias_bytes = int(ma.alias_size_in_bytes)
        rep.temp_bytes = int(ma.temp_size_in_bytes)
        rep.code_bytes = int(ma.generated_code_size_in_bytes)
        rep.total_bytes = rep.argument_bytes + rep.output_bytes - rep.alias_bytes + rep.temp_bytes + rep.code_bytes
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if ca and "flops" in ca:
        rep.xla_flops_per_device = float(ca["flops"])
    if plan.param_arg_index is not None:
        in_sh = compiled.input_shardings[0][plan.param_arg_index]
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), plan.args[plan.param_arg_index])
        rep.replicated_params = replicated_large_params(in_sh, abstract, replicated_min_bytes, plan.mesh)
    if cap is not None and rep.total_bytes is not None:
        rep.fits = rep.total_bytes <= max_fraction * cap
    else:
        rep.fits = rep.total_bytes is not None
    return rep, compiled


def format_report(rep: Report) -> str:
    mesh = " x ".join(f"{a}={n}" for a, n in rep.mesh.items())
    lines = [
        f"topology  {rep.topology}  ({rep.devices} chips, {rep.generation}, HBM {_gib(rep.hbm_capacity)} per chip)",
        f"mesh      {mesh}",
        f"step      {rep.what}: {rep.model} at {rep.resolution}px, global batch {rep.global_batch} "
        f"({rep.per_device_batch:g} per batch shard), caption {rep.cap_len} tokens, remat {rep.remat}, "
        f"attention {rep.attention}",
        f"compile   lower {rep.lower_s:.1f} s, compile {rep.compile_s:.1f} s",
    ]
    if rep.error is None:
        lines += [
            "HBM per device:",
            f"  arguments     {_gib(rep.argument_bytes)}",
            f"  outputs       {_gib(rep.output_bytes)}  (of which aliased to donated arguments {_gib(rep.alias_bytes)})",
            f"  temporaries   {_gib(rep.temp_bytes)}",
            f"  code          {_gib(rep.code_bytes)}",
            f"  total         {_gib(rep.total_bytes)} of {_gib(rep.hbm_capacity)}"
            + (f"  ({100 * rep.total_bytes / rep.hbm_capacity:.1f}%)" if rep.hbm_capacity and rep.total_bytes else ""),
        ]
    else:
        lines += [f"XLA:TPU   {rep.error}"]
        if rep.total_bytes is not None:
            lines += [f"  needs {_gib(rep.total_bytes)} of {_gib(rep.hbm_capacity)} per device"]
    if rep.xla_flops_per_device is not None:
        xla = rep.xla_flops_per_device * rep.devices
        no_att = rep.analytic_flops - rep.analytic_attention_flops
        lines += [
            f"FLOPs     XLA {xla / 1e12:.4g} TFLOP/step ({rep.xla_flops_per_device / 1e12:.4g} per device); analytic "
            f"{rep.analytic_flops / 1e12:.4g} TFLOP ({no_att / 1e12:.4g} without attention); XLA / analytic "
            f"{xla / rep.analytic_flops:.2f}, XLA / analytic-without-attention {xla / max(no_att, 1):.2f}"
            + ("  [Mosaic attention kernels are not counted by XLA]" if rep.attention in MOSAIC_ATTENTIONS else ""),
            "          (XLA's cost analysis counts a while loop's body once: the scanned layer stack is counted "
            "as one layer)",
        ]
    if rep.replicated_params:
        tot = sum(b for _, b in rep.replicated_params)
        lines += [f"WARNING   {len(rep.replicated_params)} large arrays fully replicated ({_gib(tot)} per device): "
                  + ", ".join(f"{p} ({b / 2**20:.1f} MiB)" for p, b in rep.replicated_params[:5])]  # fmt: skip
    if rep.fits:
        lines += [f"FITS      {_gib(rep.total_bytes)} <= {rep.max_fraction:.0%} of {_gib(rep.hbm_capacity)}"]
    else:
        need = _gib(rep.total_bytes) if rep.total_bytes is not None else "more than the chip has"
        if rep.total_bytes is not None and rep.total_counts:
            need = f"at least {need} ({rep.total_counts} alone)"
        lines += [f"DOES NOT FIT  needs {need} per device; limit {rep.max_fraction:.0%} of {_gib(rep.hbm_capacity)}. "
                  "Try more FSDP (--mesh fsdp), a smaller per-device batch, remat=full, or grad_accum."]  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    from lumina_jax.config_utils import int_at_least

    p = argparse.ArgumentParser(
        prog="python -m lumina_jax aot",
        description="Compile a train/sample/forward step ahead of time for a TPU topology (no TPU needed) "
        "and report per-device HBM use and FLOPs. Exit 0 fits, 1 does not fit, 2 error.",
    )
    p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4 (v5p-128 = 64 chips), v6e:4x4, v5e:2x4 (v5e, v5p, v6e)")
    p.add_argument("--config", required=True, help="train config: a YAML path or a name in configs/train")
    p.add_argument("--mesh", default=None, help="the whole mesh, replacing the config's: a preset (dp, fsdp, "
                   "fsdp_tensor, context), axis sizes (fsdp=2,tensor=2) or both; to change single axes of the "
                   "config's mesh give overrides such as mesh.tensor=4 instead")  # fmt: skip
    p.add_argument("--what", default="train", choices=WHATS)
    p.add_argument("--stage", type=int, default=0, help="stage of the config whose resolution/batch to use, "
                   "counted from 0 (the trainer's log says 'stage 1/N' for stage 0)")
    p.add_argument("--resolution", type=int_at_least(16), default=None, help="pixels (square), a multiple of 16; "
                   "default: the stage's")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--batch", type=int_at_least(1), default=None, help="global batch; default: the stage's")
    g.add_argument("--per-device-batch", type=int_at_least(1), default=None,
                   help="samples per batch shard (data x fsdp)")
    p.add_argument("--cap-len", type=int_at_least(1), default=256, help="caption tokens (Gemma-2 features), default 256")
    p.add_argument("--attention", default="splash_sharded", choices=ATTENTIONS)
    p.add_argument("--no-cfg", action="store_true", help="--what sample: one unguided evaluation")
    p.add_argument("--max-fraction", type=float, default=0.9, help="fits if total <= this fraction of HBM")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the train config")
    return p


def mesh_override(text: str) -> str:
    """The train-config override (``mesh={...}``) of a command-line mesh: a preset name, axis sizes, or
    both, as ``generate --mesh`` takes them (``"fsdp"``, ``"fsdp=2,tensor=2"``); ``ValueError`` naming a
    bad part."""
    from lumina_jax.parallel.mesh import MeshConfig

    fields = MeshConfig.parse_fields(text)  # checks names and sizes
    return f"mesh={{{', '.join(f'{k}: {v}' for k, v in fields.items())}}}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    import os

    if not os.environ.get("JAX_PLATFORMS"):
        # The host only traces; without this, jax would also try to bring up libtpu as a local backend
        # (noisy warnings, and a lock file shared with other processes).
        jax.config.update("jax_platforms", "cpu")
    ok, why = libtpu_status()
    if not ok:
        print(f"aot: {why}", file=sys.stderr)
        return 2
    from lumina_jax.parallel.mesh import create_mesh
    from lumina_jax.train.config import load_config

    overrides = list(args.overrides)
    if args.mesh:
        try:
            overrides.insert(0, mesh_override(args.mesh))
        except ValueError as e:
            print(f"aot: error: --mesh: {e}", file=sys.stderr)
            return 2
    try:
        cfg = load_config(args.config, overrides)
        devices = topology_devices(args.topology)
        mesh = create_mesh(cfg.mesh, devices=devices)
        plan = build_plan(cfg, mesh, what=args.what, stage=args.stage, resolution=args.resolution,
                          global_batch=args.batch, per_device_batch=args.per_device_batch, cap_len=args.cap_len,
                          attention=args.attention, guidance=not args.no_cfg)  # fmt: skip
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"aot: {e}", file=sys.stderr)
        return 2
    print(f"aot: compiling {args.what} of {args.config} for {args.topology} ({why}) ...", flush=True)
    rep, _ = compile_plan(plan, topology=args.topology, max_fraction=args.max_fraction)
    print(format_report(rep))
    if args.json:
        with open(args.json, "w") as f:
            f.write(rep.to_json())
    return 0 if rep.fits else 1


if __name__ == "__main__":
    sys.exit(main())
