"""Checkpoint conversion between this project and PyTorch formats (see README: "Convert checkpoints").

Imports are lazy so ``import lumina_jax.convert`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_transformer": "lumina_jax.convert.nextdit",
    "load_transformer_config": "lumina_jax.convert.nextdit",
    "save_transformer": "lumina_jax.convert.nextdit",
    "verify_transformer": "lumina_jax.convert.nextdit",
    "load_text_encoder": "lumina_jax.convert.gemma2",
    "save_text_encoder": "lumina_jax.convert.gemma2",
    "load_vae": "lumina_jax.convert.vae",
    "save_vae": "lumina_jax.convert.vae",
    "load_flux_ae": "lumina_jax.convert.vae",
    "save_flux_ae": "lumina_jax.convert.vae",
    "load_captioner": "lumina_jax.convert.captioner",
    "save_captioner": "lumina_jax.convert.captioner",
    "save_component": "lumina_jax.convert.components",
    "load_components": "lumina_jax.convert.components",
    "save_components": "lumina_jax.convert.components",
    "load_lora": "lumina_jax.convert.lora",
    "merge_lora": "lumina_jax.convert.lora",
    "CheckpointError": "lumina_jax.convert.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lumina_jax.convert' has no attribute {name!r}")
