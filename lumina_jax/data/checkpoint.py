"""Saving the data iterator with orbax, next to the train state (jax_notes §5-6).

The iterator (:class:`lumina_jax.data.pipeline.DataIterator`) is a ``grain.DatasetIterator``; orbax
stores it through ``grain.checkpoint.CheckpointSave`` as one JSON file per process
(``<item>/process_<i>-of-<n>.json``)::

    mngr = ocp.CheckpointManager(dir)
    save_with_data(mngr, step, data_iter, state=ocp.args.StandardSave(train_state))
    ...
    restored = restore_with_data(mngr, step, data_iter, state=ocp.args.StandardRestore(abstract))
    train_state = restored["state"]          # data_iter now continues where it was saved

The saved state contains the pipeline position (all sources, buckets and workers), the counters and the
settings it depends on; restore it into an iterator of an identically configured pipeline (same sources,
seed, host slice, batching and ``num_workers``): a restore into another configuration raises
``ValueError`` naming each setting that differs (see
:func:`lumina_jax.data.pipeline.state_fingerprint`).
"""

from __future__ import annotations

from typing import Any, Optional

import grain
import orbax.checkpoint as ocp

DATA_ITEM = "data_iter"


def data_save_args(iterator: grain.DatasetIterator, item_name: str = DATA_ITEM, **items: Any) -> ocp.args.Composite:
    """``Composite`` args saving ``iterator`` under ``item_name`` together with ``items``."""
    if item_name in items:
        raise ValueError(f"item name {item_name!r} is used by both the iterator and another item")
    return ocp.args.Composite(**{item_name: grain.checkpoint.CheckpointSave(iterator)}, **items)


def data_restore_args(
    iterator: grain.DatasetIterator, item_name: str = DATA_ITEM, **items: Any
) -> ocp.args.Composite:
    """``Composite`` args restoring into ``iterator`` (in place) and restoring ``items``."""
    if item_name in items:
        raise ValueError(f"item name {item_name!r} is used by both the iterator and another item")
    return ocp.args.Composite(**{item_name: grain.checkpoint.CheckpointRestore(iterator)}, **items)


def save_with_data(
    manager: ocp.CheckpointManager,
    step: int,
    iterator: grain.DatasetIterator,
    item_name: str = DATA_ITEM,
    force: bool = False,
    **items: Any,
) -> bool:
    """``manager.save`` of the iterator state and ``items`` at ``step``. Returns whether it saved."""
    return manager.save(step, args=data_save_args(iterator, item_name, **items), force=force)


def restore_with_data(
    manager: ocp.CheckpointManager,
    step: Optional[int],
    iterator: grain.DatasetIterator,
    item_name: str = DATA_ITEM,
    **items: Any,
) -> Any:
    """Restores ``iterator`` in place and returns the restored composite (``result[name]`` per item).

    ``step=None`` restores the latest step.
    """
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    return manager.restore(step, args=data_restore_args(iterator, item_name, **items))
