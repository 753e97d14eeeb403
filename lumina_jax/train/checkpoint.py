"""Checkpoints of a training run (orbax ``CheckpointManager``; jax_notes §6).

Layout (``<run_dir>/checkpoints/<step>/``), one directory per saved step, written atomically:

    state/      params, ema, opt_state, step, nonfinite counters (StandardSave; sharded arrays, each
                process writes its own shards; tensorstore/OCDBT)
    data_iter/  the data iterator of the stage that produced the step, one JSON per process
                (``grain.checkpoint``; ``process_<i>-of-<n>.json``); restorable into another number
                of processes when it does not depend on the host count (:meth:`RunCheckpoints.restore`)
    meta/       JSON: step, stage index/name, the full train config, the model config, mesh, versions

The state is stored as nested dicts keyed by the pytree path (``state/params/layers/blocks/...``,
``state/opt_state/1/0/mu/...``), not as the Python objects, so restores do not depend on optax's or
flax's classes and a target for any mesh is just ``ShapeDtypeStruct``s with new shardings.

Saves are asynchronous (device->host copy synchronous, file writes in a background thread) and atomic:
orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and renames the directory only after every item and
every process finished. A process killed mid-save leaves only the temporary directory, which the manager
neither lists nor restores (and removes on the next start), so the latest *listed* step is always
complete (``tests/test_train_checkpoint.py`` kills a writer mid-save).

Retention: the newest ``keep`` checkpoints, plus every step divisible by ``keep_every``, plus the
``protect``ed steps (the trainer passes its stages' last steps: each stage's final model stays), plus the
steps on disk that were milestones or stage ends under the config they were written with (read from
each step's meta when the manager opens: resuming with another ``keep_every`` or none, or with other
stage lengths, any number of times, never deletes what was kept so far).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from lumina_jax.convert.errors import CheckpointError
from lumina_jax.data.pipeline import DataStateError

log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data_iter", "meta"


class JsonStateIterator:
    """Adapter so that any iterator with JSON-able ``get_state``/``set_state`` can be saved per
    process by grain's orbax handler (which takes bytes from non-grain iterators)."""

    def __init__(self, it: Any):
        self.it = it

    def get_state(self) -> bytes:
        return json.dumps(self.it.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.it.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:  # grain's restore calls it
        pass


def checkpointable(it: Any) -> Optional[Any]:
    """The object to hand to ``grain.checkpoint.CheckpointSave``, or None if ``it`` has no state."""
    if it is None:
        return None
    if isinstance(it, grain.DatasetIterator):
        return it
    if hasattr(it, "get_state") and hasattr(it, "set_state"):
        return JsonStateIterator(it)
    return None


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def to_nested(tree: Any) -> dict:
    """Pytree -> nested dict keyed by path components (empty subtrees disappear)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        keys = [_key(k) for k in path]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1] if keys else "value"] = leaf
    return out


def from_nested(nested: dict, like: Any) -> Any:
    """Inverse of :func:`to_nested` given a tree ``like`` with the target structure."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node = nested
        keys = [_key(k) for k in path] or ["value"]
        for k in keys:
            node = node[k]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class StateLayoutError(ValueError):
    """A checkpoint's training state has another tree structure than the one restoring it."""


class DataStateMismatchError(ValueError):
    """A checkpoint's data iterator state cannot be restored into this run's processes."""


def _host_count_free(state: Any) -> bool:
    """Whether a saved data iterator state means the same on any number of processes: the global bucket
    plan's (:mod:`lumina_jax.data.global_plan`) or the synthetic stream's (a global sample position)."""
    if not isinstance(state, dict):
        return False
    if set(state) == {"position"}:  # SyntheticLatents
        return True
    return (state.get("config") or {}).get("bucket_plan") == "global"


class RunCheckpoints:
    """Thin wrapper of ``ocp.CheckpointManager`` for a run directory (see the module docstring)."""

    def __init__(self, directory: str | Path, *, keep: int = 3, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False, protect: Sequence[int] = ()):  # fmt: skip
        from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

        self.directory = Path(directory).absolute() if "://" not in str(directory) else str(directory)
        policies: list[Any] = [pp.LatestN(keep) if keep and keep > 0 else pp.PreserveAll()]
        if keep_every and keep_every > 0:
            policies.append(pp.EveryNSteps(keep_every))
        self.protected = sorted(set(int(s) for s in protect) | set(_steps_kept_so_far(self.directory)))
        if self.protected:
            policies.append(pp.CustomSteps(self.protected))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        handlers = {
            STATE: ocp.StandardCheckpointHandler(),
            DATA: grain.checkpoint.CheckpointHandler(),
            META: ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # -- queries

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def has_data(self, step: int) -> bool:
        return (Path(str(self.directory)) / str(step) / DATA).exists() if "://" not in str(self.directory) else True

    # -- save / restore

    def save(self, step: int, state: Any, meta: dict, data_iter: Any = None, force: bool = True) -> bool:
        """Start saving ``state`` (+ iterator + meta) at ``step``; returns immediately when async."""
        items = {STATE: ocp.args.StandardSave(to_nested(state)), META: ocp.args.JsonSave(meta)}
        item = checkpointable(data_iter)
        if item is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(item)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def read_meta(self, step: int) -> dict:
        if "://" not in str(self.directory) and not (Path(self.directory) / str(step) / META).exists():
            raise CheckpointError(f"{self.directory}/{step} has no {META}/: {Path(self.directory).parent} is not a "
                                  f"lumina-jax run directory, or that checkpoint is damaged (move it away to resume "
                                  f"from the one before); checkpoints there: {self.all_steps()}")  # fmt: skip
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        except Exception as e:
            if _is_read_failure(e):
                raise self._unreadable(step, e) from e
            raise

    def _unreadable(self, step: int, e: BaseException) -> CheckpointError:
        """The error for a checkpoint step whose files cannot be read back (damaged, truncated, written by
        something else): names it and the step a resume would fall back to once it is moved away."""
        before = [s for s in self.all_steps() if s < step]
        fallback = f"the one before (step {before[-1]})" if before else "the start (no earlier checkpoint)"
        detail = " ".join(f"{type(e).__name__}: {e}".split())
        return CheckpointError(f"{self.directory}/{step} could not be read ({detail[:2000]}); if it is damaged, move "
                               f"it away to resume from {fallback}")  # fmt: skip

    def restore(self, step: int, target: Any, data_iter: Any = None) -> tuple[Any, dict]:
        """Restore ``step`` into ``target`` (a tree of ``ShapeDtypeStruct`` with shardings, any mesh);
        restores ``data_iter`` in place when given. Returns ``(state, meta)``.

        The data iterator state is per process. If the checkpoint was written by another number of
        processes, a state that does not depend on the host count (the global bucket plan's, or the
        synthetic stream's global position) is restored from the file of process ``i mod n_saved``; any
        other state is refused with :class:`DataStateMismatchError` unless its fingerprint shows it fits
        this process's slice (e.g. processes that fed the same rows). Counters of the saved processes are summed into the new ones
        (process ``i`` takes ``i, i + count, ...``) or restart at zero on processes past ``n_saved``."""
        items = {STATE: ocp.args.StandardRestore(to_nested(target)), META: ocp.args.JsonRestore()}
        item = checkpointable(data_iter)
        elastic = None
        try:
            if item is not None:
                elastic = self._other_process_count_state(step)
                if elastic is None:
                    items[DATA] = grain.checkpoint.CheckpointRestore(item)
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (DataStateMismatchError, CheckpointError, DataStateError):  # already say what to do
            raise
        except Exception as e:
            msg = str(e)
            if _is_read_failure(e):
                raise self._unreadable(step, e) from e
            if not isinstance(e, ValueError) or "tree structures do not match" not in msg and "Structure mismatch" not in msg:
                raise  # e.g. out of memory, a sharding that does not fit: not the checkpoint's fault
            # orbax prints both whole trees (megabytes for a 2B model); name the subtrees that differ
            where = re.findall(r"^(\S+):\n\s+- Source", msg, flags=re.M) + [
                ".".join(re.findall(r"'([^']*)'", p)) for p in re.findall(r"Target path \(([^)]*)\)", msg)]
            raise StateLayoutError(
                f"checkpoint step {step} in {self.directory} holds another training state layout than this run "
                f"builds (differing: {', '.join(where[:8]) or 'see the log'}): the optimizer (e.g. clip_norm on/off), "
                f"EMA or trainable params changed; use another run_dir, or the settings it was trained with"
            ) from None
        if elastic is not None:
            text, stats = elastic
            try:
                item.set_state(json.loads(text) if isinstance(item, grain.DatasetIterator) else text.encode())
            except ValueError as e:  # the fingerprint check of a per-host state (other host slice)
                raise DataStateMismatchError(
                    f"checkpoint step {step} was written by another number of processes and its data iterator state "
                    f"is a per-host slice of the data that does not fit this process: {e}"
                ) from e
            if stats is not None and hasattr(data_iter, "stats"):
                data_iter.stats = stats
            if hasattr(item, "start_prefetch"):
                item.start_prefetch()
        return from_nested(out[STATE], target), out[META]

    def _other_process_count_state(self, step: int) -> Optional[tuple[str, Any]]:
        """``None`` if ``step``'s data iterator was saved by as many processes as this run has; else the
        JSON text to restore this process from and its counters (:class:`lumina_jax.data.stats.DataStats`:
        the sum over the saved processes ``j = i mod count``; ``None`` for states without counters)."""
        from etils import epath

        index, count = jax.process_index(), jax.process_count()
        folder = epath.Path(str(self.directory)) / str(step) / DATA
        if (folder / f"process_{index}-of-{count}.json").exists():
            return None
        saved = sorted(p.name for p in folder.glob("process_*-of-*.json")) if folder.exists() else []
        counts = {int(n.rsplit("-of-", 1)[1].split(".")[0]) for n in saved}
        if len(counts) != 1 or count in counts:
            raise DataStateMismatchError(
                f"checkpoint step {step}: no data iterator state for process {index} of {count} in {folder} "
                f"(found {saved or 'none'}); resume without it with checkpoint.resume_data=false"
            )
        n_saved = counts.pop()
        texts = {j: (folder / f"process_{j}-of-{n_saved}.json").read_text() for j in range(index % n_saved, n_saved, count)}
        text = texts[index % n_saved]
        state = json.loads(text)
        checkable = isinstance(state, dict) and isinstance(state.get("config"), dict)  # carries a fingerprint
        if not _host_count_free(state) and not checkable:
            raise DataStateMismatchError(
                f"checkpoint step {step} was written by {n_saved} processes and this run has {count}, and its data "
                f"iterator state cannot be checked against this process's slice of the data. Resume with {n_saved} "
                f"processes, or without the data state (checkpoint.resume_data=false)."
            )
        stats = None
        if isinstance(state, dict) and "stats" in state:
            from lumina_jax.data.stats import DataStats

            stats = DataStats()
            if index < n_saved:  # process i adds up the counters of saved processes i, i + count, ...
                for t in texts.values():
                    stats.merge(DataStats.from_dict(json.loads(t)["stats"]))
        log.warning("checkpoint step %d: data iterator state of %d processes restored into %d (process %d takes "
                    "process %d's position%s)", step, n_saved, count, index, index % n_saved,
                    "" if stats is None or index < n_saved else "; its counters restart")  # fmt: skip
        return text, stats

    def restore_subtree(self, step: int, name: str, target: Any) -> Any:
        """Restore only ``state/<name>`` (e.g. ``"ema"`` or ``"params"``) into ``target`` (partial restore:
        the other parts of the state are never read)."""
        nested = {name: to_nested(target)}
        reader = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
            item_handlers={STATE: ocp.PyTreeCheckpointHandler()},
        )  # fmt: skip
        args = ocp.args.PyTreeRestore(item=nested, restore_args=ocp.checkpoint_utils.construct_restore_args(nested),
                                      partial_restore=True)  # fmt: skip
        out = reader.restore(step, args=ocp.args.Composite(**{STATE: args}))
        reader.close()
        return from_nested(out[STATE][name], target)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def check_for_errors(self) -> None:
        """Raise :class:`CheckpointError` if a finished background save failed (e.g. a full disk), rather than
        at the next save, possibly many steps later. With several processes every one of them calls this at
        the same step (a collective): all raise when any one's save failed, instead of the others running on
        into collectives the failed one never joins."""
        error: Optional[BaseException] = None
        try:
            # orbax 0.12 finishes an async save in the manager's own finalize thread, whose error only its join
            # (wait_until_finished) raises: join it once it is done (no wait), then the checkpointer's check
            # (private: a thread, or orbax's OptionalRef of one; anything else is left to the next save)
            finalize = getattr(self.manager, "_finalize_thread", None)
            finalize = finalize.get() if hasattr(finalize, "get") else finalize
            if finalize is not None and hasattr(finalize, "is_alive") and not finalize.is_alive():
                self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            error = e
        failed = [jax.process_index()] if error is not None else []
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
            failed = np.flatnonzero(flags.reshape(-1)).tolist()
        if not failed:
            return
        if "://" in str(self.directory):
            newest = f"step {self.latest_step()}"
        else:  # the manager's own list may already name the failed step; the folders on disk do not
            steps = sorted(int(d.name) for d in Path(self.directory).iterdir() if d.name.isdigit())
            newest = f"step {steps[-1]}" if steps else "none"
        if error is None:
            raise CheckpointError(f"a background checkpoint save in {self.directory} failed on process(es) {failed} "
                                  f"(their logs say why); this process stops too. The newest complete checkpoint: "
                                  f"{newest}")  # fmt: skip
        detail = " ".join(f"{type(error).__name__}: {error}".split())[:500]
        where = f" on process(es) {failed}" if jax.process_count() > 1 else ""
        raise CheckpointError(f"a background checkpoint save in {self.directory} failed{where} ({detail}); the "
                              f"newest complete checkpoint: {newest}") from error  # fmt: skip

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _is_read_failure(e: BaseException) -> bool:
    """Whether a restore failed reading the checkpoint's files (missing, truncated, garbled: the
    checkpoint's fault) rather than for another reason (memory, shardings, a state that does not fit:
    their own errors say so)."""
    # tensorstore reports unreadable chunks as a bare Exception
    return isinstance(e, (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError)) or type(e) is Exception


def versions() -> dict:
    import flax
    import optax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax": getattr(ocp, "__version__", "?"), "numpy": np.__version__}  # fmt: skip


def _steps_kept_so_far(directory: str | Path) -> list[int]:
    """Steps on disk that their own run's retention settings kept for good: a milestone of the
    ``checkpoint.keep_every`` in effect when the step was written, or a stage's last step (with
    ``keep_stage_ends``) under the stage lengths of then. Each step's meta holds the config it was written
    with, so later runs with other settings (or several resumes without ``keep_every``) never delete
    them. Steps whose meta cannot be read (a foreign or older layout, a damaged one) are not protected."""
    from etils import epath

    root = epath.Path(str(directory))
    try:
        steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []
    except OSError:
        return []
    kept = []
    for step in steps:
        try:  # orbax's JsonCheckpointHandler file of the meta item
            config = json.loads((root / str(step) / META / "metadata").read_text()).get("config") or {}
            every = int((config.get("checkpoint") or {}).get("keep_every") or 0)
            ends = np.cumsum([int(st.get("steps", 0)) for st in config.get("stages") or []]).tolist()
            stage_ends = bool((config.get("checkpoint") or {}).get("keep_stage_ends", True))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        if every > 0 and step % every == 0 or stage_ends and step in ends:
            kept.append(step)
    return kept
