"""Device mesh and the one table of logical-axis rules (maxtext-style; jax_notes §1.4, §3.2).

Three layers, as in maxtext's sharding guide:

* physical mesh axes ``data, fsdp, context, tensor`` (:data:`MESH_AXES`), sized by :class:`MeshConfig`;
* logical names carried by every parameter (``embed``, ``heads``, ``kv_heads``, ``mlp``, ... set in
  :mod:`lumina_jax.models.nextdit`) and by activation constraints (``activation_batch``,
  ``activation_length``, ...);
* :data:`LOGICAL_RULES`, the single table mapping the second to the first.

The table never changes between parallelism strategies: a *preset* only changes the mesh shape, and
an axis of size 1 shards nothing. So "pure data parallel" is ``data=N``, "FSDP" is ``fsdp=N``,
"FSDP x tensor" is ``fsdp=N/T, tensor=T`` and "context" (sequence-parallel attention) is
``context=C`` with the rest on ``data`` or ``fsdp``.

Decisions:

* ``embed`` maps to ``(fsdp, context)``: weights are ZeRO-3 sharded over the fsdp axis and also over
  the context axis, whose devices would otherwise hold identical copies (they all-gather the same
  weights anyway).
* ``heads``/``kv_heads``/``mlp`` map to ``tensor`` (Megatron split of attention and SwiGLU).
  With ``tensor`` larger than ``n_kv_heads`` (8 for all Lumina configs) the K/V projections are split
  inside a head and the shard_map attention repeats K/V heads (when ``tensor`` is a multiple of them) or
  runs replicated (when it is not, e.g. 24 heads on ``tensor=16``): correct, but it adds communication
  or compute; keep ``tensor <= 8``.
* Parameters are sharded ZeRO-3 style over ``fsdp`` and ``context`` (:data:`ZERO_AXES`): an axis that
  does not divide a parameter's ``embed`` dimension moves to another dimension it divides; a large
  parameter no dimension can take is logged (replicated: every device holds it whole).
* The batch goes over ``(data, fsdp)``; ``context`` shards the token axis of activations; the token
  axis is never sharded over ``tensor`` (no sequence-parallel norms; the model is small enough).
* Axes are ``AxisType.Auto`` (``jax.make_mesh`` defaults to Explicit since jax 0.7, whose
  ``shard_map`` rejects mismatched inputs instead of resharding; jax_notes §3.2).
* Multi-slice TPU (devices with ``slice_index``): ``mesh_utils.create_hybrid_device_mesh`` with ICI
  sizes per slice and DCN sizes across slices; only ``data`` (default) or ``fsdp`` should cross DCN.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "context", "tensor")

# Mesh axes the batch dimension is split over (inputs, activations, per-sample losses).
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

# logical name -> mesh axis / axes / None (replicated). Order matters only for activations, which are
# resolved by flax (first matching rule whose mesh axes are still free wins).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations (nn.with_logical_constraint in the model)
    ("activation_batch", BATCH_AXES),
    ("activation_length", "context"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_embed", None),
    # parameters (nn.with_logical_partitioning in the model)
    ("embed", ("fsdp", "context")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("cond", None),
    # the adaLN projections' input (the timestep embedding): row-parallel over tensor, so these ~10 % of the
    # 2B's params are not copied whole on every tensor rank (an all-reduce of (B, 4 x dim) per layer)
    ("modulation", "tensor"),
    ("freq", None),
    ("patch", None),
    ("cap", None),
    ("layers", None),
)

# Mesh shapes of the presets; -1 = all remaining devices. Override single axes with MeshConfig fields.
PRESETS: dict[str, dict[str, int]] = {
    "dp": {"data": -1},
    "fsdp": {"fsdp": -1},
    "fsdp_tensor": {"fsdp": -1, "tensor": 2},
    "context": {"data": -1, "context": 2},
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh sizes. ``-1`` means "whatever is left" (at most one axis per level).

    Attributes:
      preset: optional name from :data:`PRESETS`; explicit axis sizes given here override it.
      data, fsdp, context, tensor: sizes within a slice (ICI). Devices carry a ``slice_index``: TPU
        slices, and on multi-node GPU jobs each node (XLA numbers nodes as slices), so there these are
        sizes within a node; single-node GPU and CPU: the whole job.
      dcn_data, dcn_fsdp: sizes across slices / GPU nodes (DCN). Only used when devices span several;
        ``dcn_data=-1`` (default) puts all slices on the data axis, unless ``dcn_fsdp=-1`` takes them.
    """

    preset: Optional[str] = None
    data: Optional[int] = None
    fsdp: Optional[int] = None
    context: Optional[int] = None
    tensor: Optional[int] = None
    dcn_data: int = -1
    dcn_fsdp: int = 1

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "MeshConfig":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown mesh keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """A command-line mesh: a preset name (``"fsdp"``), axis sizes (``"fsdp=2,tensor=4"``) or both
        (``"fsdp_tensor,tensor=4"``); ``ValueError`` naming the bad part otherwise."""
        return cls(**cls.parse_fields(text))

    @classmethod
    def parse_fields(cls, text: str) -> dict[str, Any]:
        """The fields a command-line mesh (:meth:`parse`) gives, as a train config's ``mesh`` dict."""
        fields: dict[str, Any] = {}
        sizes = {f.name for f in dataclasses.fields(cls)} - {"preset"}
        for part in (x.strip() for x in str(text).split(",")):
            if not part:
                continue
            if "=" not in part:
                if "preset" in fields:
                    raise ValueError(f"mesh {text!r}: two presets ({fields['preset']!r}, {part!r})")
                fields["preset"] = part
                continue
            key, _, value = (x.strip() for x in part.partition("="))
            if key not in sizes:
                raise ValueError(f"mesh {text!r}: unknown axis {key!r}; known: {sorted(sizes)}")
            if key in fields:
                raise ValueError(f"mesh {text!r}: {key} is given twice")
            try:
                fields[key] = int(value)
            except ValueError:
                raise ValueError(f"mesh {text!r}: {key} must be an integer, got {value!r}") from None
        if not fields:
            raise ValueError("empty mesh: give a preset name or axis sizes like fsdp=2,tensor=2")
        cls(**fields)  # checks the preset name
        return fields

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown mesh preset {self.preset!r}; choose from {sorted(PRESETS)}")
        for name in ("dcn_data", "dcn_fsdp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not (v == -1 or v >= 1):
                raise ValueError(f"mesh {name} must be -1 (the rest of the slices) or >= 1, got {v!r}")

    def ici_sizes(self) -> dict[str, int]:
        """Axis sizes within a slice, before -1 is resolved (preset, then explicit fields)."""
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown mesh preset {self.preset!r}; choose from {sorted(PRESETS)}")
        sizes = {a: 1 for a in MESH_AXES}
        explicit = {a: getattr(self, a) for a in MESH_AXES if getattr(self, a) is not None}
        if self.preset:
            sizes.update(PRESETS[self.preset])
        elif not explicit:
            sizes["data"] = -1  # nothing given: pure data parallel
        sizes.update(explicit)
        return sizes


def _fill(sizes: Mapping[str, int], total: int, what: str) -> dict[str, int]:
    sizes = dict(sizes)
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"{what}: at most one axis may be -1, got {free}")
    for a, s in sizes.items():
        if s != -1 and s < 1:
            raise ValueError(f"{what}: axis {a} has invalid size {s}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if total % fixed:
            raise ValueError(f"{what}: {total} devices are not divisible by the fixed axes {sizes} (product {fixed})")
        sizes[free[0]] = total // fixed
    if math.prod(sizes.values()) != total:
        raise ValueError(f"{what}: mesh {sizes} has {math.prod(sizes.values())} devices, but there are {total}")
    return sizes


def num_slices(devices: Sequence[Any]) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def dcn_sizes(config: "MeshConfig", n_slices: int) -> dict[str, int]:
    """Mesh axis sizes across ``n_slices`` slices / GPU nodes: ``dcn_data`` x ``dcn_fsdp`` (a -1 takes the
    rest; ``dcn_fsdp=-1`` with the default ``dcn_data=-1`` puts every slice on fsdp)."""
    dcn_data = 1 if config.dcn_fsdp == -1 and config.dcn_data == -1 else config.dcn_data
    return _fill({a: 1 for a in MESH_AXES} | {"data": dcn_data, "fsdp": config.dcn_fsdp}, n_slices,
                 f"DCN mesh (across the {n_slices} slices / nodes; sizes count slices)")  # fmt: skip


def create_mesh(config: MeshConfig | Mapping[str, Any] | str | None = None, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """Build the ``(data, fsdp, context, tensor)`` mesh over ``devices`` (default: all global devices).

    ``config`` may be a :class:`MeshConfig`, a dict of its fields, or a preset name.
    On several TPU slices the ICI sizes apply per slice and the DCN sizes across slices.
    """
    if config is None:
        config = MeshConfig()
    elif isinstance(config, str):
        config = MeshConfig(preset=config)
    elif not isinstance(config, MeshConfig):
        config = MeshConfig.from_dict(config)
    devices = list(jax.devices() if devices is None else devices)
    from jax.experimental import mesh_utils

    n_slices = num_slices(devices)
    if n_slices > 1:
        dcn = dcn_sizes(config, n_slices)
        ici = _fill(config.ici_sizes(), len(devices) // n_slices, "ICI mesh (per slice, or per node on GPU)")
        arr = mesh_utils.create_hybrid_device_mesh(
            [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], devices, allow_split_physical_axes=True
        )
    else:
        dcn = {k: v for k, v in (("dcn_data", config.dcn_data), ("dcn_fsdp", config.dcn_fsdp)) if v > 1}
        if dcn:
            log.warning("mesh %s ignored: the %d devices form one slice (one node); the DCN sizes split the mesh "
                        "across slices", ", ".join(f"{k}={v}" for k, v in dcn.items()), len(devices))  # fmt: skip
        sizes = _fill(config.ici_sizes(), len(devices), "mesh")
        shape = [sizes[a] for a in MESH_AXES]
        if devices[0].platform == "tpu":
            arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        else:  # CPU/GPU: device order is the process order (process-major), which keeps data local.
            arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_shape(mesh: Any) -> dict[str, int]:
    """``{axis: size}`` of a ``Mesh`` or ``AbstractMesh``."""
    return {a: int(n) for a, n in dict(mesh.shape).items()}


ZERO_AXES = ("fsdp", "context")  # mesh axes that shard parameters ZeRO-3 style (any dimension will do)


def logical_to_mesh_spec(
    names: Sequence[Optional[str]] | None,
    shape: Optional[Sequence[int]] = None,
    mesh: Optional[Mesh] = None,
    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES,
    fallback_axes: Sequence[str] = (),
) -> P:
    """Resolve one array's logical axis names to a ``PartitionSpec`` through ``rules``.

    Unlike flax's resolver, the same logical name may appear twice (the t-embedder's ``(cond, cond)``)
    and a mesh axis is used at most once (first dimension wins). With ``shape`` and ``mesh``, mesh
    axes that do not divide a dimension (or have size 1) are dropped, so the spec is always valid for
    ``jit``'s ``out_shardings``. Names without a rule are replicated.

    ``fallback_axes`` (parameters: :data:`ZERO_AXES`): such an axis dropped because it does not divide
    its dimension moves to the largest other dimension it divides (``fsdp=512`` does not divide the 2B's
    ``embed`` 2304 but divides its ``mlp`` 6144), instead of leaving the array replicated over it.
    """
    if names is None:
        return P()
    table = {}
    for logical, axes in rules:
        table.setdefault(logical, axes)
    sizes = mesh_shape(mesh) if mesh is not None else {}
    used: set[str] = set()
    out: list[tuple[str, ...]] = []
    dropped: list[str] = []
    for i, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        if axes is None:
            out.append(())
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        keep: list[str] = []
        for a in axes:
            if a in used:
                continue
            if mesh is not None and sizes.get(a, 1) == 1:
                continue
            if shape is not None and mesh is not None:
                denom = math.prod(sizes[x] for x in keep) * sizes[a]
                if shape[i] % denom:
                    dropped.append(a)
                    continue
            keep.append(a)
        used.update(keep)
        out.append(tuple(keep))
    if shape is not None and mesh is not None:
        for a in dropped:
            if a not in fallback_axes or a in used:
                continue
            # not the stacked `layers` axis (the layer scan would slice a sharded axis) or an unnamed one
            fits = [j for j in range(len(out)) if names[j] not in (None, "layers")
                    and shape[j] % (math.prod(sizes[x] for x in out[j]) * sizes[a]) == 0]  # fmt: skip
            if fits:
                j = max(fits, key=lambda j: (shape[j], -j))
                out[j] = out[j] + (a,)
                used.add(a)
    spec = [None if not k else k[0] if len(k) == 1 else k for k in out]
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def batch_spec(ndim: int) -> P:
    """Spec of a batch-major array: leading axis over ``BATCH_AXES``, the rest replicated."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim))


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this (product of the batch axes)."""
    s = mesh_shape(mesh)
    return math.prod(s[a] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# backends that run context-parallel attention themselves when the mesh has context > 1 (the shard_map ones)
CONTEXT_CAPABLE = ("splash_sharded", "pallas_tpu_sharded", "pallas_sharded")


def warn_context_attention(mesh_shape: dict, attention: str) -> bool:
    """Warn (and return True) when a ``context`` mesh axis would not shard the attention: only the
    ``context*`` backends and the kernels in shard_map (:data:`CONTEXT_CAPABLE`, what ``auto`` is on a TPU) run it in
    shard_map over the token axis."""
    name = attention
    if name == "auto":
        from lumina_jax.ops.attention import resolve_backend

        name = resolve_backend("auto")
    if mesh_shape.get("context", 1) > 1 and not (name.startswith("context") or name in CONTEXT_CAPABLE):
        log.warning("the mesh has context=%d but attention=%s runs outside shard_map: XLA partitions it by itself "
                    "(K/V may be gathered whole on every device); use attention (attention_backend, --attention) context",
                    mesh_shape["context"], attention)  # fmt: skip
        return True
    return False


def warn_tensor_heads(mesh_shape: dict, n_heads: int, n_kv_heads: int) -> bool:
    """Warn (and return True) when the ``tensor`` axis does not split the attention heads evenly: ``n_heads``
    must be a multiple of it, and ``n_kv_heads`` a multiple or a divisor of it (K/V heads are repeated then);
    otherwise those weights stay whole on every tensor rank (e.g. tensor=3 with 8 K/V heads: 40 % of the 2B's
    params per device, not 33 %)."""
    t = mesh_shape.get("tensor", 1)
    if t > 1 and (n_heads % t or (n_kv_heads % t and t % n_kv_heads)):
        log.warning("tensor=%d does not split %d query / %d key-value heads evenly: those weights are held whole "
                    "on every tensor rank; pick a tensor size that divides the query heads and divides, or is a "
                    "multiple of, the key-value heads", t, n_heads, n_kv_heads)  # fmt: skip
        return True
    return False


def describe(mesh: Mesh) -> str:
    s = mesh_shape(mesh)
    return " x ".join(f"{a}={n}" for a, n in s.items()) + f" ({mesh.devices.size} devices, {jax.process_count()} processes)"
