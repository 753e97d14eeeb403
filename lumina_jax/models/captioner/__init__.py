"""Qwen2-VL / Qwen2.5-VL image captioner in JAX (UniCap-style re-captioning, spec §8).

Stages, one module each: :mod:`.config` (architecture, transformers config.json), :mod:`.processor`
(images -> patches, prompts -> tokens and M-RoPE ids, bucketed batches; host side), :mod:`.vision`
(vision tower), :mod:`.language` (Qwen2 LM, M-RoPE, KV cache), :mod:`.model` (both, pure functions),
:mod:`.decode` (jit-compiled batched greedy/sampling decode), :mod:`.prompts` (UniCap instructions),
:mod:`.cli` (``python -m lumina_jax caption``). Checkpoint conversion: :mod:`lumina_jax.convert.captioner`.
"""

from lumina_jax.models.captioner.config import (
    QWEN2_5_VL,
    QWEN2_VL,
    CaptionerConfig,
    TextConfig,
    VisionConfig,
    qwen2_5_vl_7b,
    qwen2_vl_7b,
    tiny_config,
)
from lumina_jax.models.captioner.decode import GenerateOutput, GenerationConfig, generate, sample_logits
from lumina_jax.models.captioner.model import (
    PromptBatch,
    QwenVL,
    cast_params,
    forward_logits,
    image_features,
    init_params,
    param_logical_axes,
    param_shapes,
)

__all__ = [
    "QWEN2_5_VL", "QWEN2_VL", "CaptionerConfig", "TextConfig", "VisionConfig", "qwen2_5_vl_7b", "qwen2_vl_7b",
    "tiny_config", "GenerateOutput", "GenerationConfig", "generate", "sample_logits", "PromptBatch", "QwenVL",
    "cast_params", "forward_logits", "image_features", "init_params", "param_logical_axes", "param_shapes",
]
