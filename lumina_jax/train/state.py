"""The train state pytree and its shardings.

``TrainState`` holds everything that must survive a restart bit for bit: the global step, fp32 master
params, the fp32 EMA, the optimizer state and the non-finite-step counters. Params, EMA and the Adam
moments share one sharding per parameter (from the logical-axis rules); scalars are replicated.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lumina_jax.train.lora import ema_source


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 (): steps taken (including skipped non-finite ones)
    params: Any  # fp32 master params
    ema: Any  # fp32 EMA of params (of the adapter alone in a LoRA run: ema_source), or None
    opt_state: Any
    nonfinite: jax.Array  # int32 (): total steps skipped for a non-finite loss/gradient
    nonfinite_run: jax.Array  # int32 (): consecutive skipped steps up to now


def init_state(params: Any, tx: optax.GradientTransformation, ema: bool) -> TrainState:
    """Fresh state around ``params`` (usable under ``jax.jit`` with ``out_shardings``)."""
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema=jax.tree.map(jnp.copy, ema_source(params)) if ema else None,
        opt_state=tx.init(params),
        nonfinite=jnp.zeros((), jnp.int32),
        nonfinite_run=jnp.zeros((), jnp.int32),
    )


def _dict_path(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(abstract_state: TrainState, param_shardings: Any, mesh: Mesh) -> TrainState:
    """Shardings for every leaf of ``abstract_state``: params, EMA and param-shaped optimizer leaves
    (Adam ``mu``/``nu``, found by their parameter path and shape) follow the params; the rest is
    replicated."""
    rep = NamedSharding(mesh, P())
    by_path = {}
    for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        by_path[_dict_path(path)] = s
    shapes = {}
    for path, a in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]:
        shapes[_dict_path(path)] = tuple(a.shape)

    def opt_leaf(path, a):
        key = _dict_path(path)
        if key in by_path and shapes.get(key) == tuple(a.shape):
            return by_path[key]
        return rep

    return TrainState(
        step=rep,
        params=param_shardings,
        ema=ema_source(param_shardings) if abstract_state.ema is not None else None,
        opt_state=jax.tree_util.tree_map_with_path(opt_leaf, abstract_state.opt_state),
        nonfinite=rep,
        nonfinite_run=rep,
    )


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` leaves carrying their target sharding (restore targets)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def param_count(tree: Optional[Any]) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree)) if tree is not None else 0
