"""The training loop: stages, checkpoints, resume, logging, non-finite guard.

:class:`Trainer` owns the mesh, the compiled step of the current stage and the checkpoint manager::

    cfg = load_config("configs/train/lumina2_2b.yaml", ["run_dir=/tmp/run"])
    Trainer(cfg).run()

Start-up: if ``<run_dir>/checkpoints`` has a step, the state is restored onto the current mesh (any
mesh: the target carries the new shardings) and the run continues in the stage that owns the next
step, with that stage's data iterator restored when the checkpoint was taken inside the same stage
(a checkpoint at a stage boundary starts the next stage's data from its beginning). Otherwise params
come from ``init`` (a checkpoint of any format, streamed into shardings) or a sharded random init.

Per stage: the step is compiled once per distinct batch shape (synthetic and ``mixed`` batches: one;
``bucket`` batches: one per crop size and caption length met), data is drawn for this process's rows, and
a checkpoint is forced at the stage's last step, so a restart never has to replay half a stage. ``stop_at`` ends the run early at a global step (with a
checkpoint), for preemptible jobs and tests.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.ops.attention import attention_uses_kernel
from lumina_jax.models.nextdit import NextDiT
from lumina_jax.parallel import mesh as mesh_lib
from lumina_jax.parallel import sharding as shard_lib
from lumina_jax.train import checkpoint as ckpt_lib
from lumina_jax.train import lora as lora_lib
from lumina_jax.train import metrics as metrics_lib
from lumina_jax.train import objective as obj
from lumina_jax.train import optim
from lumina_jax.train.config import TrainConfig, load_model_config
from lumina_jax.train.data import build_stage_iterator, data_counters, local_data_counts, to_global
from lumina_jax.train.state import TrainState, abstract_with_shardings, init_state, state_shardings
from lumina_jax.train.step import VAE_FACTOR, StepConfig, compile_train_step, make_train_step

log = logging.getLogger("lumina_jax.train")


_STEP_CACHE: dict = {}


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class ResumeMismatchError(ValueError):
    """The run directory's checkpoint was written for another model or training state layout."""


# Settings that do not change the training itself (not reported when they change).
_QUIET_KEYS = ("run_dir", "command", "log", "samples", "checkpoint.keep")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of the leaves (empty mappings and lists have none)."""
    if isinstance(d, dict):
        return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(d, (list, tuple)):
        return {k: v for i, sub in enumerate(d) for k, v in _flat(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: d}


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every setting that differs between two ``TrainConfig.to_dict()``s
    (keys of :data:`_QUIET_KEYS` left out)."""
    a, b = _flat(old), _flat(new)
    out = []
    for k in sorted(a.keys() | b.keys()):
        if any(k == q or k.startswith(q + ".") for q in _QUIET_KEYS):
            continue
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            out.append((k, a.get(k, "<unset>"), b.get(k, "<unset>")))
    return out


def _with_defaults(saved: dict, build: Callable[[dict], Any]) -> dict:
    """A saved config with the fields added to the code since then at their defaults (so that they do
    not read as changes); as saved if it no longer builds."""
    try:
        return build(saved).to_dict()
    except Exception:  # noqa: BLE001 -- e.g. a key removed since: compare what was saved
        return saved


def _saved_stage_at(meta: dict, step: int) -> Optional[tuple[int, str]]:
    """``(index, name)`` of the stage that ``step`` starts in under the saved config (a checkpoint at a
    stage's last step records the stage that ended, not the one the step begins); ``None`` if the saved
    config no longer builds."""
    from lumina_jax.train.config import config_from_dict

    try:
        saved = config_from_dict(meta.get("config") or {})
    except Exception:  # noqa: BLE001 -- a config from another version of the code: nothing to compare
        return None
    if step >= saved.total_steps:
        return None
    i = saved.stage_at(step)
    return i, saved.stages[i].name


def check_resume(meta: dict, cfg: TrainConfig, model_config: Any, run_dir: Any,
                 same_trainable: Optional[Callable[[Any], bool]] = None) -> list[tuple[str, Any, Any]]:  # fmt: skip
    """Compare the config saved with a checkpoint (``meta``) with the one resuming it: another model,
    EMA turned on or off, or another set of trainable params (``same_trainable(saved patterns)`` says
    whether they select the same params; without it the patterns are compared) is a
    :class:`ResumeMismatchError` (the saved state cannot be continued); other changes (LR, EMA decay,
    stage lengths, data, ...) are returned for a warning."""
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.train.config import config_from_dict

    step = meta.get("step")
    saved_cfg = _with_defaults(meta.get("config") or {}, config_from_dict)
    changes = config_changes(saved_cfg, cfg.to_dict())
    saved_model = meta.get("model_config")
    if saved_model is not None:
        saved_model = _with_defaults(saved_model, NextDiTConfig.from_dict)
        if saved_model != model_config.to_dict():
            diff = [f"{k}: {saved_model.get(k)!r} -> {v!r}" for k, v in model_config.to_dict().items()
                    if saved_model.get(k) != v]  # fmt: skip
            raise ResumeMismatchError(f"{run_dir} holds a run of another model (step {step}; {', '.join(diff)}); "
                                      f"use another run_dir, or the model it was trained with")  # fmt: skip
    state = []
    old_ema, new_ema = saved_cfg.get("ema_decay"), cfg.ema_decay
    if (old_ema is None) != (new_ema is None):
        state.append(("ema_decay", old_ema, new_ema))
    old_clip, new_clip = (saved_cfg.get("optimizer") or {}).get("clip_norm"), cfg.optimizer.clip_norm
    if bool(old_clip) != bool(new_clip):  # clipping on/off adds/removes a stage of the optimizer state
        state.append(("optimizer.clip_norm", old_clip, new_clip))
    old_lora, new_lora = saved_cfg.get("lora"), cfg.to_dict().get("lora")
    shape_of = lambda d: None if d is None else (d.get("rank"), list(d.get("targets") or []))  # noqa: E731
    if shape_of(old_lora) != shape_of(new_lora):  # adapters on/off, another rank or other matrices
        state.append(("lora", old_lora, new_lora))
    elif new_lora is not None and saved_cfg.get("init") != cfg.init and (cfg.init is None or "base_fingerprint" not in meta):
        # the frozen base is re-read from init: another path is fine when the checkpoint's fingerprint can tell
        # it holds the same weights (check_base_fingerprint); none, or no fingerprint to check, is not
        state.append(("init", saved_cfg.get("init"), cfg.init))
    old_trainable = saved_cfg.get("trainable")
    if old_trainable is not None and list(old_trainable) != list(cfg.trainable):
        if same_trainable is None or not same_trainable(tuple(old_trainable)):
            state.append(("trainable", old_trainable, list(cfg.trainable)))
    if state:
        raise ResumeMismatchError(
            f"{run_dir}: its checkpoint (step {step}) holds another training state layout than this config makes ("
            + ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in state) + "); use another run_dir, or the saved values")
    return changes


def checkpoints_dir(run_dir: str | Path) -> str | Path:
    """``run_dir/checkpoints``; a remote ``run_dir`` (``gs://bucket/run``) stays a string (``Path`` would
    fold its ``//``)."""
    if "://" in str(run_dir):
        return str(run_dir).rstrip("/") + "/checkpoints"
    return Path(run_dir) / "checkpoints"


@dataclasses.dataclass
class RunResult:
    step: int
    stage: int
    last_metrics: dict
    nonfinite: int
    stopped_by: Optional[int] = None  # the signal (SIGTERM, SIGINT) that ended the run early, checkpointed


class _StopSignals:
    """SIGTERM / SIGINT ask the run to stop after the current step with a checkpoint (preemption, Ctrl-C).

    One process: our handlers record the signal (a second Ctrl-C interrupts at once). Several processes:
    JAX's preemption service (started by ``jax.distributed``) takes SIGTERM and agrees on a step that
    every process reaches (``multihost_utils.reached_preemption_sync_point``); a stop on one host alone
    would leave the others waiting in a collective. A Ctrl-C there is turned into a SIGTERM to this
    process, so it stops the same way (a second Ctrl-C interrupts at once)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: dict[int, Any] = {}
        self._multi = jax.process_count() > 1
        self._warned = False
        self._asked: Optional[int] = None  # SIGINT turned into SIGTERM (several processes)

    def __enter__(self) -> "_StopSignals":
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        if self._multi:  # SIGTERM is the preemption service's
            self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle_multi)
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle_multi(self, signum: int, frame: Any) -> None:
        import os
        import signal

        signal.signal(signal.SIGINT, self._old.get(signal.SIGINT, signal.default_int_handler))
        if self._warned:  # the preemption service is off: nothing would agree on a step
            raise KeyboardInterrupt
        self._asked = signum
        log.warning("SIGINT: asking every process to stop after the same step with a checkpoint (Ctrl-C again to "
                    "quit without one)")  # fmt: skip
        os.kill(os.getpid(), signal.SIGTERM)

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        self.signum = signum
        signal.signal(signal.SIGINT, self._old.get(signal.SIGINT, signal.default_int_handler))
        log.warning("%s: stopping after this step with a checkpoint (Ctrl-C%s to quit without one)",
                    signal.Signals(signum).name, " again" if signum == signal.SIGINT else "")  # fmt: skip

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def stop_at(self, step: int) -> bool:
        if not self._multi:
            return self.signum is not None
        from jax.experimental import multihost_utils

        try:
            if multihost_utils.reached_preemption_sync_point(step):
                import signal

                self.signum = self._asked or int(signal.SIGTERM)
                return True
        except RuntimeError as e:  # the preemption service is off
            if not self._warned:
                self._warned = True
                log.warning("no preemption checkpoints on this multi-process run: %s", e)
        return False


class Trainer:
    """See the module docstring. ``stop_at`` overrides the config's total step count (global step)."""

    def __init__(self, cfg: TrainConfig, *, mesh: Optional[jax.sharding.Mesh] = None, stop_at: Optional[int] = None,
                 batch_hook: Optional[Callable[[int, dict], None]] = None):  # fmt: skip
        # importing registers the context-parallel attention backends ("context", "context_<inner>")
        import lumina_jax.parallel.context  # noqa: F401

        self.cfg = cfg
        self.model_config = load_model_config(cfg)
        self.mesh = mesh or mesh_lib.create_mesh(cfg.mesh)
        mesh_lib.warn_context_attention(mesh_lib.mesh_shape(self.mesh), cfg.attention)
        mesh_lib.warn_tensor_heads(mesh_lib.mesh_shape(self.mesh), self.model_config.n_heads,
                                   self.model_config.n_kv_heads)  # fmt: skip
        self.stop_at = stop_at
        div = mesh_lib.batch_divisor(self.mesh)
        for st in cfg.stages:
            if (st.batch // cfg.grad_accum) % div:
                raise ValueError(
                    f"stage {st.name!r}: micro-batch {st.batch} / grad_accum {cfg.grad_accum} = "
                    f"{st.batch // cfg.grad_accum} is not divisible by the batch axes data x fsdp = {div} of the mesh "
                    f"{mesh_lib.describe(self.mesh)}; every device needs whole samples"
                )
        # a later stage's data is opened when that stage starts, possibly days in: say now what is not there
        missing = [f"{st.name}: {p}" for st in cfg.stages if st.data.kind != "synthetic" for p in st.data.paths
                   if not p.startswith("tfds:") and "://" not in p and not os.path.exists(p)]  # fmt: skip
        if missing:
            log.warning("data paths not found on this host (a stage without its data stops the run when it "
                        "starts): %s", "; ".join(missing))  # fmt: skip
        # data.system_prompt is the template of records without their own; JSONL/YAML lines always have one
        from lumina_jax.text_templates import DEFAULT_SYSTEM_PROMPT

        lines = [f"{st.name}: {p}" for st in cfg.stages if st.data.kind == "images"
                 and st.data.system_prompt != DEFAULT_SYSTEM_PROMPT for p in st.data.paths
                 if p.lower().endswith((".yaml", ".yml", ".json")) or p.lower().endswith(".jsonl") and _first_line_lacks(p)]
        if lines:
            log.warning("data.system_prompt does not apply to JSONL/YAML sources, whose lines pick \"base\" (prompt) or "
                        "\"align\" (super_high_quality_caption) as the original does, unless a line has its own "
                        "\"system_prompt\" key: %s", "; ".join(lines))  # fmt: skip
        self.batch_hook = batch_hook  # called with (global step, process-local batch) before each step
        self.primary = jax.process_index() == 0
        self.model: Any = NextDiT(
            self.model_config,
            dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32,
            attention_backend=cfg.attention,
            remat=cfg.remat,
            scan_layers=cfg.scan_layers,
        )
        # with lora: params {"base": frozen, "lora": adapters}; the step runs the adapters as side paths
        self.model, self.abstract_boxed, trainable = lora_lib.training_view(
            self.model, shard_lib.model_abstract(self.model_config), cfg.trainable, cfg.lora)
        abstract_params = shard_lib.unbox(self.abstract_boxed)
        self.param_shardings = shard_lib.param_shardings(self.abstract_boxed, self.mesh)
        self.trainable = optim.trainable_mask(abstract_params, trainable)
        self.tx = optim.make_optimizer(cfg.optimizer, self.trainable)
        use_ema = cfg.ema_decay is not None
        self.abstract_state = jax.eval_shape(lambda p: init_state(p, self.tx, use_ema), abstract_params)
        self.state_shardings = state_shardings(self.abstract_state, self.param_shardings, self.mesh)
        remote = "://" in cfg.run_dir  # e.g. gs://bucket/run: orbax writes there through etils.epath
        ckpt_dir = checkpoints_dir(cfg.run_dir)
        # metrics.jsonl, TensorBoard events and sample PNGs are written locally by process 0
        self.run_dir = Path(cfg.log.dir or ("logs/" + cfg.run_dir.rstrip("/").split("/")[-1] if remote else cfg.run_dir))
        # before the checkpoint manager (and its threads) exist: a bad samples.fn is a plain config error
        self._sample_fn = _load_sample_fn(cfg.samples.fn) if cfg.samples.fn else None
        if self._sample_fn is not None and not cfg.samples.every:
            log.warning("samples.fn is set but samples.every is 0: no samples will be made")
        self.ckpt = ckpt_lib.RunCheckpoints(
            ckpt_dir, keep=cfg.checkpoint.keep, keep_every=cfg.checkpoint.keep_every,
            async_save=cfg.checkpoint.async_save,
            protect=[end for _, end in cfg.stage_bounds()] if cfg.checkpoint.keep_stage_ends else (),
        )  # fmt: skip
        self.metrics = metrics_lib.MetricLog(self.run_dir, tensorboard=cfg.log.tensorboard, enabled=self.primary)
        self._peak = metrics_lib.peak_tflops(jax.devices()[0].device_kind)
        self._flops_memo: dict[tuple, tuple[float, float]] = {}
        self._timer: Optional[_Throughput] = None
        self._skip_interval = False  # the next metrics interval held a compile, a save or samples: not a step
        self._shard_index = 0  # this process's data shard in the running stage (process_rows)
        self._signals = _StopSignals()
        self._base_fingerprint: Optional[str] = None  # a LoRA run's frozen base, recorded with its checkpoints

    # ------------------------------------------------------------------ state

    def fresh_state(self) -> TrainState:
        """Initial state: params from ``cfg.init`` or random, created in their shardings."""
        cfg = self.cfg
        if cfg.lora is not None and not cfg.init:
            log.warning("LoRA on a randomly initialised base model: set init to the checkpoint to adapt")
        params = initial_params(cfg, self.model_config, self.mesh)
        if cfg.lora is not None:
            boxed = self.abstract_boxed["lora"]
            make_lora = jax.jit(lambda k: lora_lib.init_lora(boxed, k), out_shardings=self.param_shardings["lora"])
            adapters = make_lora(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0x10A))
            self._base_fingerprint = lora_lib.params_fingerprint(params)
            params = {"base": params, "lora": adapters}
            log.info("LoRA rank %d on %d matrices: %.3gM trainable params", cfg.lora.rank,
                     len(lora_lib.flatten_adapters(adapters)), lora_lib.lora_param_count(adapters) / 1e6)  # fmt: skip
        make = jax.jit(lambda p: init_state(p, self.tx, cfg.ema_decay is not None), out_shardings=self.state_shardings)
        with jax.set_mesh(self.mesh):
            return make(params)

    def restore(self, step: int, data_iter: Any = None) -> tuple[TrainState, dict]:
        target = abstract_with_shardings(self.abstract_state, self.state_shardings)
        if self.cfg.lora is None:
            return self.ckpt.restore(step, target, data_iter)
        # LoRA checkpoints hold the adapter state only; the frozen base is read again from init
        saved, meta = self.ckpt.restore(step, _without_base(target), data_iter)
        base = initial_params(self.cfg, self.model_config, self.mesh)
        self._base_fingerprint = check_base_fingerprint(base, meta, self.cfg.init)
        return saved.replace(params={"base": base, "lora": saved.params["lora"]}), meta

    def _to_save(self, state: TrainState) -> TrainState:
        """What a checkpoint holds: the whole state, or a LoRA run's without its frozen base (``init``
        gives it back bit for bit on resume)."""
        return state if self.cfg.lora is None else _without_base(state)

    def _same_trainable(self, patterns: tuple[str, ...]) -> bool:
        """Whether ``patterns`` select the params this run trains (a LoRA run: always its adapters)."""
        if self.cfg.lora is not None:
            return True
        mask = optim.trainable_mask(shard_lib.unbox(self.abstract_boxed), patterns)
        return jax.tree.leaves(mask) == jax.tree.leaves(self.trainable)

    def meta(self, step: int, stage: int, data_stage: Optional[int]) -> dict:
        return {
            "step": int(step), "stage": int(stage), "stage_name": self.cfg.stages[stage].name,
            "data_stage": data_stage, "config": self.cfg.to_dict(), "model_config": self.model_config.to_dict(),
            "mesh": mesh_lib.describe(self.mesh), "versions": ckpt_lib.versions(),
            **({"base_fingerprint": self._base_fingerprint} if self.cfg.lora is not None else {}),
        }  # fmt: skip

    # ------------------------------------------------------------------ per stage

    def step_config(self, stage_index: int) -> StepConfig:
        cfg, stage = self.cfg, self.cfg.stages[stage_index]
        mu = None
        if cfg.objective.time_shift:
            mu = stage.time_shift_mu
            if mu is None:
                mu = obj.shift_mu(obj.seq_len_for_resolution(stage.resolution))
        return StepConfig(
            seed=cfg.seed, t_sampling=stage.t_sampling or cfg.objective.t_sampling, mu=mu,
            aux_loss_weight=self.aux_weight(stage_index), aux_pool=cfg.objective.aux_pool,
            grad_accum=cfg.grad_accum, ema_decay=cfg.ema_decay, mixed=stage.data.batching == "mixed",
        )  # fmt: skip

    def aux_weight(self, stage_index: int) -> float:
        """The stage's auxiliary-loss weight (its own, else the objective's)."""
        w = self.cfg.stages[stage_index].aux_loss_weight
        return float(self.cfg.objective.aux_loss_weight if w is None else w)

    def stage_hparams(self, stage_index: int) -> dict:
        stage = self.cfg.stages[stage_index]
        lr = stage.lr if stage.lr is not None else self.cfg.optimizer.lr
        return optim.stage_hparams(lr, self.cfg.stage_bounds()[stage_index][0], stage.steps)

    def compile_stage(self, stage_index: int, example_batch: dict) -> Callable:
        """The step for a stage, jitted with shardings (compiled on first call; stages of equal shapes
        and objective settings produce the same program, which jax's caches then reuse)."""
        cfg = self.cfg
        lr_fn = optim.lr_schedule(cfg.optimizer)
        sc = self.step_config(stage_index)
        trainable = None if all(jax.tree.leaves(self.trainable)) else self.trainable
        # the peak LR is a run-time argument (stage_hparams), so it is not part of the program
        shapes = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in example_batch.items()))
        key = (self.model, dataclasses.replace(cfg.optimizer, lr=0.0), cfg.trainable, cfg.lora,
               cfg.ema_decay is not None, sc, self.mesh, shapes)  # fmt: skip
        if key not in _STEP_CACHE:  # one jitted function per distinct program, reused by later Trainers
            fn = make_train_step(self.model, self.tx, lr_fn, sc, trainable)
            _STEP_CACHE[key] = compile_train_step(fn, self.mesh, self.state_shardings, example_batch)
        return _STEP_CACHE[key]

    def flops(self, stage_index: int, cap_len: int, latent_shape: Optional[tuple[int, ...]] = None) -> tuple[float, float]:
        """(useful, remat) FLOPs of one step of the stage with ``cap_len`` caption tokens (the batch's
        padded length: the work done). ``latent_shape``: the batch's latents, dense ``(B, H, W, C)`` (an
        aspect bucket, or pixels for models without an autoencoder) or token-packed ``(B, T, D)``
        (:func:`lumina_jax.train.metrics.batch_tokens`); without it, square images of the stage's
        resolution through the 8x VAE."""
        stage = self.cfg.stages[stage_index]
        aux = bool(self.aux_weight(stage_index))
        pool, mc = self.cfg.objective.aux_pool, self.model_config
        if latent_shape is None:
            side = stage.resolution // VAE_FACTOR
            latent_shape = (stage.batch, side, side, mc.in_channels)
        n_img, n_aux = metrics_lib.batch_tokens(mc, latent_shape, pool, aux)
        f = metrics_lib.train_flops_per_sample_tokens(mc, n_img, n_aux, cap_len, lora=self.cfg.lora is not None)
        r = metrics_lib.remat_flops_per_sample_tokens(
            mc, n_img, n_aux, cap_len, self.cfg.remat,
            attention_kernel=attention_uses_kernel(self.cfg.attention, self.cfg.dtype, mc.head_dim))
        return f["train"] * stage.batch, r * stage.batch

    def _batch_flops(self, stage_index: int, batch: dict) -> tuple[float, float]:
        """:meth:`flops` of one global batch, by its shapes (each bucket's, memoised)."""
        key = (stage_index, tuple(batch["latents"].shape), int(batch["cap_feats"].shape[1]))
        if key not in self._flops_memo:
            self._flops_memo[key] = self.flops(stage_index, key[2], key[1])
        return self._flops_memo[key]

    # ------------------------------------------------------------------ run

    def run(self) -> RunResult:
        cfg = self.cfg
        total = cfg.total_steps if self.stop_at is None else min(self.stop_at, cfg.total_steps)
        latest = self.ckpt.latest_step()
        state, meta, step = None, None, 0
        if latest is not None:
            meta = self.ckpt.read_meta(latest)
            step = int(meta["step"])
            changes = check_resume(meta, cfg, self.model_config, cfg.run_dir, self._same_trainable)
            log.info("resuming from %s step %d (stage %s next)", self.ckpt.directory, step,
                     cfg.stages[cfg.stage_at(step)].name)  # fmt: skip
            if changes:
                log.warning("resuming with settings changed since step %d: %s", step,
                            "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes))  # fmt: skip
                was = _saved_stage_at(meta, step)
                if was is not None and cfg.stage_at(step) != was[0] and step < cfg.total_steps:
                    log.warning("with the new stage lengths step %d is in stage %r (was %r)", step,
                                cfg.stages[cfg.stage_at(step)].name, was[1])  # fmt: skip
                if any(k == "init" for k, _, _ in changes) and cfg.lora is not None:
                    log.warning("the LoRA run's frozen base is read from the new init %s; it must hold the weights "
                                "the run trained on (checked against the checkpoint's fingerprint)", cfg.init)
                elif any(k == "init" for k, _, _ in changes):
                    log.warning("init is read only when a run starts: this run goes on from its step %d checkpoint "
                                "in %s (use a new run_dir to start from the new init)", step, cfg.run_dir)  # fmt: skip
            if step >= total:
                log.warning("%s is at step %d, the run's last step is %d: nothing to train (raise the stages' steps "
                            "or --stop-at to go on)", cfg.run_dir, step, total)  # fmt: skip
            if dropped := self.metrics.rewind(step):
                log.info("dropped %d metrics.jsonl rows logged after step %d (repeated by this run)", dropped, step)
        if latest is None and (dropped := self.metrics.rewind(0)):  # an attempt that died before its first checkpoint
            log.info("dropped %d metrics.jsonl rows of an earlier attempt that saved no checkpoint", dropped)
        self.metrics.record_start(step, cfg.to_dict())
        last_metrics: dict = {}
        # after a non-finite step, metrics are fetched right after each step (across stage boundaries too), so
        # that an abort stops at its own step
        self._in_step = False
        self._signals = _StopSignals()
        try:
            self._signals.__enter__()
            while step < total and self._signals.signum is None:
                si = cfg.stage_at(step)
                stage = cfg.stages[si]
                start, end = cfg.stage_bounds()[si]
                it, ckpt_it = build_stage_iterator(stage, model_config=self.model_config, mesh=self.mesh,
                                                   seed=cfg.seed, stage_index=si)  # fmt: skip
                try:
                    state, step, last_metrics = self._stage_from(si, state, step, min(end, total), it, ckpt_it,
                                                                 latest, meta)  # fmt: skip
                finally:  # its worker processes and prefetch threads end with the stage, also on an error
                    if hasattr(it, "close"):
                        it.close()
        finally:
            try:  # the last save finishes while a stop signal is still only recorded
                self.ckpt.wait()
                self.metrics.close()
            finally:
                self._signals.__exit__()
        self.state = state
        nonfinite = int(jax.device_get(state.nonfinite)) if state is not None else 0
        return RunResult(step=step, stage=cfg.stage_at(max(step - 1, 0)), last_metrics=last_metrics, nonfinite=nonfinite,
                         stopped_by=self._signals.signum)  # fmt: skip

    def _stage_from(self, si: int, state, step: int, stop: int, it, ckpt_it, latest, meta):
        """Run stage ``si`` from ``step`` (restoring or creating the state on the run's first stage)."""
        cfg, stage = self.cfg, self.cfg.stages[si]
        if state is None:
            if latest is not None:
                same_stage = meta.get("data_stage") == si and self.ckpt.has_data(latest)
                if (meta.get("data_stage") == si and not same_stage and cfg.checkpoint.resume_data
                        and ckpt_lib.checkpointable(ckpt_it) is not None):
                    raise ckpt_lib.DataStateMismatchError(
                        f"checkpoint step {latest} in {self.ckpt.directory} has no data iterator state "
                        f"({ckpt_lib.DATA}/) for stage {stage.name!r}: its data would start again from the "
                        f"beginning, repeating batches already trained on; resume with "
                        f"checkpoint.resume_data=false to accept that")  # fmt: skip
                if same_stage and not cfg.checkpoint.resume_data:
                    log.warning("checkpoint.resume_data=false: the data of stage %s starts from its beginning, "
                                "not from step %d's position", stage.name, latest)  # fmt: skip
                    same_stage = False
                state, _ = self.restore(latest, ckpt_it if same_stage else None)
                state = self._resume_nonfinite_count(state, latest, meta)
            else:
                state = self.fresh_state()
        return self._run_stage(si, state, step, stop, it, ckpt_it)

    def _resume_nonfinite_count(self, state: TrainState, step: int, meta: dict) -> TrainState:
        """The run of consecutive non-finite steps a restored state carries. A checkpoint whose run had
        reached its own ``max_nonfinite`` (the one in its metadata: it is where that run aborted) starts a
        fresh allowance (the resume is the user's answer: a lower LR, other data); a shorter run goes on
        counting, with each step's metrics read right after it, so that an abort still stops at its own step
        (under a lowered ``max_nonfinite`` that may be the next bad step)."""
        run = int(jax.device_get(state.nonfinite_run))
        limit = (meta.get("config") or {}).get("max_nonfinite", self.cfg.max_nonfinite)
        if run and run >= limit:
            log.warning("step %d's checkpoint is where its run aborted after %d non-finite steps in a row "
                        "(max_nonfinite=%d then); the count starts again at 0", step, run, limit)  # fmt: skip
            return state.replace(nonfinite_run=state.nonfinite_run * 0)
        self._in_step = run > 0
        return state

    def _run_stage(self, si: int, state: TrainState, step: int, stop: int, it, ckpt_it):
        cfg, stage = self.cfg, self.cfg.stages[si]
        self._shard_index = shard_lib.process_rows(stage.batch, self.mesh)[2]  # replicas of a shard count its data once
        end = cfg.stage_bounds()[si][1]
        if self._signals.signum is not None:  # asked to stop before this stage's first step: the latest
            return state, step, {}  # checkpoint is where the run is, and compiling could outlast the grace period
        first = self._next_global(it, stage, step)
        step_fn = self.compile_stage(si, first)
        hp = self.stage_hparams(si)
        n_dev = jax.device_count()
        log.info("stage %d/%d %r: steps %d..%d, %d px, global batch %d, mesh %s", si + 1, len(cfg.stages), stage.name,
                 step, end, stage.resolution, stage.batch, mesh_lib.describe(self.mesh))  # fmt: skip
        bar = None
        if self.primary and cfg.log.progress:
            from tqdm import tqdm

            bar = tqdm(total=stop - step, desc=f"{stage.name}", unit="step", dynamic_ncols=True, leave=False)
        pending = None  # (step, metrics futures, data counts, FLOPs): fetched one step late (asynchronous dispatch)
        self._timer = None  # the first step (compilation) is not timed: _report starts the clock after it
        self._skip_interval = False
        shapes = {_shapes(first)}  # compiled for this stage; a new bucket shape compiles on its first dispatch
        last: dict = {}
        batch = first
        saved = None
        try:
            while step < stop:
                if batch is None:
                    batch = self._next_global(it, stage, step)
                sig = _shapes(batch)
                if sig not in shapes:  # its compile falls in the interval the next report closes
                    shapes.add(sig)
                    self._skip_interval = True
                state, m = step_fn(state, batch, hp)
                flops = self._batch_flops(si, batch)
                batch = None
                step += 1
                previous, pending = pending, (step, m, local_data_counts(it), flops)
                if previous is not None:
                    last = self._report(*previous, n_dev, bar)
                every = cfg.checkpoint.every
                stopping = self._signals.stop_at(step)
                boundary = step == end or step == stop or bool(every and step % every == 0) or stopping
                if self._in_step or boundary:  # this step's metrics now (a save's row is always logged)
                    now, pending = pending, None
                    last = self._report(*now, n_dev, bar, force=boundary)
                if boundary:
                    self.ckpt.save(step, self._to_save(state), self.meta(step, si, si), ckpt_it)
                    self._skip_interval = True  # nor is the save's host work a step
                    saved = step
                if stopping:
                    log.warning("stopped at step %d with a checkpoint; the same command resumes from it", step)
                    break
                if self._sample_fn and cfg.samples.every and (step % cfg.samples.every == 0 or step == cfg.total_steps):
                    self._samples(state, step, stage)
                    self._skip_interval = True
            if pending is not None:
                now, pending = pending, None
                last = self._report(*now, n_dev, bar, force=True)
        except NonFiniteLossError as e:
            # the skipped steps changed no weights: keep this state and data position, so that a resume (lower
            # LR, other data) loses none of the steps since the last periodic checkpoint, nor re-reads bad batches
            after = ""
            if pending is not None:  # found one step late (max_nonfinite=1): the next step ran meanwhile
                late = {k: np.asarray(v).item() for k, v in jax.device_get(pending[1]).items()}
                self.metrics.write(step, late)
                after = (f" Step {step} had already run when this was found, and was "
                         f"{'applied' if late['finite'] else 'skipped too'}.")
            if saved != step:
                self.ckpt.save(step, self._to_save(state), self.meta(step, si, si), ckpt_it)
            raise NonFiniteLossError(f"{e}{after} A checkpoint of step {step} holds the run as it was (no skipped "
                                     f"step changed it); the same command resumes from it.") from None  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
        if getattr(it, "stats", None) is not None:
            log.info("data of stage %r so far (process %d): %s", stage.name, jax.process_index(), it.stats.summary())
        return state, step, last

    def _next_global(self, it, stage, step: int) -> dict:
        local = next(it)
        if self.batch_hook is not None:
            self.batch_hook(step, local)
        local = {k: v for k, v in local.items() if k in ("latents", "cap_feats", "cap_mask", "valid", "token_mask",
                                                          "image_sizes")}  # fmt: skip
        if "token_mask" in local:  # mixed batches: a grid past the RoPE table would silently reuse its last rows
            mc = self.model_config
            px = VAE_FACTOR * mc.patch_size
            sizes = np.asarray(local["image_sizes"])
            if np.any(sizes % px):  # the step's grid is sizes // px: a remainder would drop latent rows silently
                raise ValueError(f"stage {stage.name!r}: crop sizes {sorted({tuple(map(int, s)) for s in sizes if np.any(s % px)})} "
                                 f"are not multiples of {px} px (VAE factor {VAE_FACTOR} x patch {mc.patch_size})")  # fmt: skip
            grid = sizes.max(axis=0) // px
            if grid[0] > mc.axes_lens[1] or grid[1] > mc.axes_lens[2]:
                raise ValueError(f"stage {stage.name!r}: a {int(grid[0])}x{int(grid[1])}-patch crop exceeds the model's "
                                 f"RoPE table ({mc.axes_lens[1]}x{mc.axes_lens[2]} patches); lower the stage's "
                                 f"resolution or raise axes_lens (model_overrides)")  # fmt: skip
        return to_global(local, self.mesh, stage.batch)

    def _report(self, step, m, counts, flops: tuple[float, float], n_dev, bar, force: bool = False) -> dict:
        """Fetch one step's metrics (blocks until that step finished), check the non-finite guard,
        and on logging steps write throughput over the steps since the previous log (``flops``: this
        step's useful and remat FLOPs, summed over those steps)."""
        cfg = self.cfg
        m = {k: np.asarray(v).item() for k, v in jax.device_get(m).items()}
        now = time.perf_counter()
        if self._timer is None:  # the stage's first step: the clock starts after it (a compile before it too)
            self._timer = _Throughput(last=now)
        else:
            self._timer.add(now, flops, counted=not self._skip_interval)
        self._skip_interval = False
        if m["nonfinite_run"] >= cfg.max_nonfinite:
            self.metrics.write(step, m)  # the aborting step's row too
            raise NonFiniteLossError(
                f"step {step}: {int(m['nonfinite_run'])} consecutive steps with a non-finite loss or gradient "
                f"(loss={m['loss']}, grad_norm={m['grad_norm']}); none of them was applied. Aborting (max_nonfinite="
                f"{cfg.max_nonfinite}). Lower the LR or check the data."
            )
        self._in_step = not m["finite"]  # until a finite step: each step's metrics right after it
        if not m["finite"]:
            log.warning("step %d: non-finite loss/gradient (loss=%s, grad_norm=%s): step skipped (%d in a row)",
                        step, m["loss"], m["grad_norm"], int(m["nonfinite_run"]))  # fmt: skip
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", gn=f"{m['grad_norm']:.2f}")
        if not (force or step % cfg.log.every == 0):
            return m
        t = self._timer
        if t.steps > 0:
            step_time = t.elapsed / t.steps
            stage = cfg.stages[cfg.stage_at(step - 1)]
            m["step_time_s"] = step_time
            m["images_per_s"] = stage.batch / step_time
            m["tflops_per_device"] = t.useful / t.elapsed / n_dev / 1e12
            m["remat_tflops_per_device"] = t.remat / t.elapsed / n_dev / 1e12
            if self._peak:
                m["mfu"] = m["tflops_per_device"] / self._peak
        self._timer = _Throughput(last=now)
        m.update(data_counters(counts, self._shard_index))
        self.ckpt.check_for_errors()  # a failed background save stops the run here, not at the next save
        self.metrics.write(step, m)
        if self.primary:
            line = metrics_lib.format_line(step, self.cfg.total_steps, m)
            (bar.write if bar is not None else print)(line)
        return m

    def _samples(self, state: TrainState, step: int, stage) -> None:
        sc = self.cfg.samples
        params = state.ema if state.ema is not None else state.params
        if self.cfg.lora is not None:  # the base with the (EMA) adapter merged
            params = jax.jit(lora_lib.apply_lora, static_argnums=2)(state.params["base"], params["lora"],
                                                                    self.cfg.lora.scale)  # fmt: skip
        images = np.asarray(self._sample_fn(params, self.model_config, list(sc.prompts), list(sc.seeds),
                                            sc.resolution or stage.resolution))  # fmt: skip
        if not self.primary:
            return
        grid = make_grid(images)
        out = self.run_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(grid).save(out / f"step_{step:07d}.png")
        self.metrics.image("samples", grid, step)


def make_grid(images: np.ndarray, cols: Optional[int] = None) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 -> one grid image."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.clip(images * 255.0 + 0.5, 0, 255).astype(np.uint8)
    n, h, w, c = images.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = img
    return grid


def _load_sample_fn(spec: str) -> Callable:
    if ":" not in spec:
        raise ValueError(f"samples.fn must be 'module:function', got {spec!r}")
    mod, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod), name)
    except ImportError as e:
        raise ValueError(f"samples.fn {spec!r}: cannot import {mod!r} ({e})") from None
    except AttributeError:
        raise ValueError(f"samples.fn {spec!r}: module {mod!r} has no {name!r}") from None
    if not callable(fn):
        raise ValueError(f"samples.fn {spec!r} is a {type(fn).__name__}, not a function")
    return fn


def _open_run(run_dir: str | Path, which: str, step: Optional[int]) -> tuple[Any, int, dict, str]:
    """``(RunCheckpoints (read-only), step, meta, which)`` of a run's checkpoint, with clear errors;
    ``which="auto"`` is the EMA when the run keeps one, else the raw params."""
    if which not in ("ema", "params", "auto"):
        raise ValueError(f"which must be 'ema', 'params' or 'auto', got {which!r}")
    if "://" not in str(run_dir) and not (Path(run_dir) / "checkpoints").is_dir():
        raise FileNotFoundError(f"{run_dir} has no checkpoints/ folder: not a training run's run_dir")
    where = checkpoints_dir(run_dir)
    ck = ckpt_lib.RunCheckpoints(where, read_only=True)
    step = ck.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {where}")
    if step not in ck.all_steps():
        raise FileNotFoundError(f"no checkpoint of step {step} in {where}; steps there: {ck.all_steps()}")
    meta = ck.read_meta(step)
    has_ema = meta["config"].get("ema_decay") is not None
    if which == "auto":
        which = "ema" if has_ema else "params"
        log.info("exporting the %s weights of step %d", "EMA" if has_ema else "raw (the run keeps no EMA)", step)
    if which == "ema" and not has_ema:
        raise ValueError(f"run {run_dir} was trained without EMA; export which='params'")
    return ck, step, meta, which


@dataclasses.dataclass
class _Throughput:
    """Steps timed since the last logged row: each interval between two metric fetches is one step's
    time, unless it held something else (a new bucket shape's compile, a checkpoint save, samples)."""

    last: float  # when the last step's metrics were fetched
    steps: int = 0
    elapsed: float = 0.0
    useful: float = 0.0  # FLOPs of the timed steps
    remat: float = 0.0

    def add(self, now: float, flops: tuple[float, float], counted: bool) -> None:
        if counted:
            self.steps += 1
            self.elapsed += now - self.last
            self.useful += flops[0]
            self.remat += flops[1]
        self.last = now


def _shapes(batch: dict) -> tuple:
    return tuple(sorted((k, tuple(np.shape(v))) for k, v in batch.items()))


def initial_params(cfg: TrainConfig, model_config: Any, mesh: Any) -> Any:
    """The run's starting Next-DiT params in their shardings: ``cfg.init``'s, or random from ``cfg.seed``
    (the same bits every time: a LoRA run's frozen base is rebuilt this way on resume and export)."""
    if cfg.init:
        from lumina_jax.convert.nextdit import recorded_config

        ours = model_config.to_dict()
        differ = {k: (v, ours.get(k)) for k, v in recorded_config(cfg.init).items()
                  if v != ours.get(k) and k not in model_config.METADATA_FIELDS}  # fmt: skip
        if differ:  # fields that change no shape (RoPE theta, eps, table sizes) would pass the key/shape check
            raise ValueError(f"init checkpoint {cfg.init} records " + ", ".join(
                f"{k}={a!r} where the run's model config has {b!r}" for k, (a, b) in differ.items())
                + "; set model / model_overrides to the checkpoint's values")  # fmt: skip
        return shard_lib.load_transformer_sharded(cfg.init, mesh, config=model_config)[1]
    return shard_lib.init_params_sharded(model_config, mesh, cfg.seed)


def _first_line_lacks(path: str, key: str = "system_prompt") -> bool:
    """Whether the first record of a local JSONL file lacks ``key`` (False when it cannot be read: the
    data loader says what is wrong with it)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        return isinstance(item := json.loads(first), dict) and key not in item
    except (OSError, ValueError):
        return False


def check_base_fingerprint(base: Any, meta: dict, init: Optional[str]) -> str:
    """The fingerprint of a LoRA run's frozen base as re-read from ``init``; a :class:`ResumeMismatchError`
    when it is not the one the checkpoint recorded (the file behind ``init`` changed since; checkpoints
    written before fingerprints were recorded are not checked)."""
    got = lora_lib.params_fingerprint(base)
    want = meta.get("base_fingerprint")
    if want is not None and want != got:
        raise ResumeMismatchError(
            f"the frozen base read from init={init!r} is not the one the LoRA run trained on (fingerprint {got}, "
            f"the step {meta.get('step')} checkpoint recorded {want}): the checkpoint behind init changed; "
            "put the original back, or start a new run_dir")
    return got


def _without_base(state: Any) -> Any:
    return state.replace(params={"lora": state.params["lora"]})


def restore_lora(run_dir: str | Path, *, which: str = "auto", step: Optional[int] = None,
                 with_base: bool = False) -> tuple[Any, Any, Any, Optional[Any]]:  # fmt: skip
    """``(NextDiTConfig, LoraTrainConfig, adapter, base)`` of a LoRA run's checkpoint: the EMA
    (``which="ema"``; ``"auto"``: it if kept) or raw adapter as host arrays, and the frozen base params (on this host's devices)
    when ``with_base`` (rebuilt from the run's ``init`` / seed: checkpoints do not hold it). A
    ``ValueError`` for a run trained without ``lora``."""
    from lumina_jax.models.nextdit import NextDiTConfig
    from lumina_jax.train.config import config_from_dict

    ck, step, meta, which = _open_run(run_dir, which, step)
    run_cfg = config_from_dict(meta["config"])
    lcfg = run_cfg.lora
    if lcfg is None:
        ck.close()
        raise ValueError(f"run {run_dir} is not a LoRA run (its config has no lora section)")
    model_config = NextDiTConfig.from_dict(meta["model_config"])
    mesh = mesh_lib.create_mesh({"fsdp": -1}, devices=jax.local_devices())
    base_boxed = shard_lib.model_abstract(model_config)
    boxed = {"base": base_boxed, "lora": lora_lib.abstract_lora(base_boxed, lcfg)}
    target = abstract_with_shardings(shard_lib.unbox(boxed), shard_lib.param_shardings(boxed, mesh))
    adapter = ck.restore_subtree(step, which, {"lora": target["lora"]})["lora"]
    ck.close()
    base = None
    if with_base:  # not in the checkpoint
        base = initial_params(run_cfg, model_config, mesh)
        check_base_fingerprint(base, meta, run_cfg.init)
    return model_config, lcfg, shard_lib.gather_to_host(adapter), base


def restore_weights(run_dir: str | Path, *, which: str = "auto", step: Optional[int] = None) -> tuple[Any, Any]:
    """``(NextDiTConfig, host params)`` of the EMA (``which="ema"``) or raw (``"params"``) weights of a
    run's checkpoint (latest ``step`` by default; ``"auto"``: the EMA when the run keeps one); for a LoRA
    run, the base with that adapter merged.

    Only that subtree is restored (partial restore), onto this host's devices, then gathered to host
    memory (one copy of the weights, e.g. 10 GB for the 2B in fp32).
    """
    from lumina_jax.models.nextdit import NextDiTConfig

    ck, step, meta, which = _open_run(run_dir, which, step)
    if (meta["config"] or {}).get("lora") is not None:
        ck.close()
        model_config, lcfg, adapter, base = restore_lora(run_dir, which=which, step=step, with_base=True)
        merged = jax.jit(lora_lib.apply_lora, static_argnums=2)(base, adapter, lcfg.scale)
        return model_config, shard_lib.gather_to_host(merged)
    model_config = NextDiTConfig.from_dict(meta["model_config"])
    mesh = mesh_lib.create_mesh({"fsdp": -1}, devices=jax.local_devices())
    abstract = shard_lib.model_abstract(model_config)
    shardings = shard_lib.param_shardings(abstract, mesh)
    target = abstract_with_shardings(shard_lib.unbox(abstract), shardings)
    params = ck.restore_subtree(step, which, target)
    host = shard_lib.gather_to_host(params)
    ck.close()
    return model_config, host


def export_weights(run_dir: str | Path, out: str | Path, *, which: str = "auto", format: str = "jax",
                   dtype: Any = None, step: Optional[int] = None, overwrite: bool = False) -> Path:  # fmt: skip
    """Write the weights :func:`restore_weights` returns with
    :func:`lumina_jax.convert.nextdit.save_transformer` (``format`` jax / diffusers / original;
    ``dtype="bf16"`` halves the written files). ``format="lora"`` (LoRA runs): the adapter alone, as
    diffusers' ``pytorch_lora_weights.safetensors`` in folder ``out`` (:func:`lumina_jax.train.lora.export_lora`)."""
    from lumina_jax.convert.nextdit import save_transformer

    if format == "lora":
        if dtype is not None:
            raise ValueError("format='lora' writes float32 adapters; leave dtype unset")
        model_config, lcfg, adapter, _ = restore_lora(run_dir, which=which, step=step)
        return lora_lib.export_lora(out, model_config, adapter, lcfg, overwrite=overwrite)
    model_config, host = restore_weights(run_dir, which=which, step=step)
    return save_transformer(out, model_config, host, format=format, dtype=dtype, overwrite=overwrite)
