"""Sampling for Lumina-Image 2.0: solvers (:mod:`.solvers`), CFG-Renorm / CFG-Trunc (:mod:`.cfg`), the jitted
loop with VAE decode (:mod:`.loop`), the ``generate`` CLI (:mod:`.cli`) and a tiny random model
(:mod:`.tiny`). The user-facing entry point is :class:`lumina_jax.pipeline.Lumina2Pipeline`.
"""

from lumina_jax.sample.cfg import (
    guidance_flags,
    guided_velocity,
    renorm_clamp,
    renorm_rows,
    resolve_cfg_normalization,
)
from lumina_jax.sample.solvers import (
    DEFAULT_SOLVER,
    DEFAULT_TIME_SHIFT,
    PRESETS,
    SOLVERS,
    Schedule,
    dpm,
    euler,
    flow_euler,
    make_schedule,
    midpoint,
    solve,
)

__all__ = [
    "DEFAULT_SOLVER", "DEFAULT_TIME_SHIFT", "PRESETS", "SOLVERS", "Schedule", "dpm", "euler", "flow_euler",
    "make_schedule", "midpoint", "solve", "guidance_flags", "guided_velocity", "renorm_clamp", "renorm_rows",
    "resolve_cfg_normalization",
]  # fmt: skip
