"""Training: rectified-flow objective, AdamW + EMA, sharded train step, progressive stages, checkpoints.

    python -m lumina_jax train configs/train/lumina2_2b.yaml run_dir=... [key=value ...]

Modules: :mod:`.config` (YAML + overrides, stages), :mod:`.objective` (spec §6.1-6.2), :mod:`.optim`
(AdamW, schedules, EMA, trainable filter), :mod:`.state` (train state and its shardings), :mod:`.step`
(the jitted step), :mod:`.data` (per-stage batch sources), :mod:`.checkpoint` (orbax layout),
:mod:`.metrics` / :mod:`.tensorboard` (FLOPs, MFU, event files), :mod:`.loop` (:class:`Trainer`,
export), :mod:`.cli`.
"""

from lumina_jax.train.config import TrainConfig, load_config
from lumina_jax.train.loop import NonFiniteLossError, Trainer, export_weights

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "export_weights", "load_config"]
