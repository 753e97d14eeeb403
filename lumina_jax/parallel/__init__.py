"""Scaling: device mesh, logical-axis rules, sharded init/load, context-parallel attention, multi-host.

Modules: :mod:`.mesh` (``data, fsdp, context, tensor`` mesh, presets, the rule table),
:mod:`.sharding` (param shardings, sharded init, streaming checkpoint loads, process-local batches),
:mod:`.context` (attention backends ``context`` / ``context_<inner>``: queries sharded over the
``context`` axis, K/V all-gathered in ``jax.shard_map``), :mod:`.distributed` (``jax.distributed``
start-up from flags / environment), :mod:`.memcheck` (host-memory check of sharded init).
"""

from lumina_jax.parallel.mesh import (
    BATCH_AXES,
    LOGICAL_RULES,
    MESH_AXES,
    PRESETS,
    MeshConfig,
    batch_sharding,
    create_mesh,
    describe,
    logical_to_mesh_spec,
    mesh_shape,
)
from lumina_jax.parallel.sharding import (
    gather_to_host,
    global_batch,
    init_params_sharded,
    load_transformer_sharded,
    param_shardings,
    param_specs,
    process_rows,
    put_params,
)

__all__ = [
    "BATCH_AXES",
    "LOGICAL_RULES",
    "MESH_AXES",
    "PRESETS",
    "MeshConfig",
    "batch_sharding",
    "create_mesh",
    "describe",
    "gather_to_host",
    "global_batch",
    "init_params_sharded",
    "load_transformer_sharded",
    "logical_to_mesh_spec",
    "mesh_shape",
    "param_shardings",
    "param_specs",
    "process_rows",
    "put_params",
]
