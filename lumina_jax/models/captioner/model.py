"""The whole Qwen2(.5)-VL captioner: vision tower + language model, and pure functions over its params.

Data flow (one batch of ``B`` prompts, one image each):

    images -> processor (host, NumPy/PIL) -> VisionInputs (B, S slots)  -> VisionTower -> (B, S/4, E)
    prompt text -> tokens with <|image_pad|> x M -> left-padded input_ids (B, P), M-RoPE positions (3, B, P)
    embed(input_ids), image tokens replaced by their row's merged features (gather ``image_index``)
    -> LM prefill -> logits of the last prompt slot -> decode loop (:mod:`lumina_jax.models.captioner.decode`)

The param tree is ``{"visual": ..., "language_model": ...}`` (fp32, logical axis names; see
:func:`param_logical_axes`). :func:`forward_logits` gives the full-sequence logits for parity tests.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.models.captioner.config import CaptionerConfig
from lumina_jax.models.captioner.language import KVCache, LanguageModel, init_cache
from lumina_jax.models.captioner.vision import VisionInputs, VisionTower

Params = dict[str, Any]


class PromptBatch(NamedTuple):
    """Device inputs of one batch (built on the host by :func:`lumina_jax.models.captioner.processor.build_batch`).

    Row ``b`` of ``vision`` holds the image of prompt ``b`` (one image per prompt, the captioning case; a
    text-only row has no valid slot). ``image_index[b, i]`` is the merged-token slot of that image whose
    feature replaces token ``i`` (``-1``: keep the token embedding), so every gather stays inside its row
    and a batch-sharded run needs no cross-device traffic. ``kv_start[b]`` is the number of left-padding
    tokens of row ``b``; ``next_position[b]`` the M-RoPE id of its first generated token.
    """

    input_ids: Any  # (B, P) int32, left-padded
    positions: Any  # (3, B, P) int32
    kv_start: Any  # (B,) int32
    image_index: Any  # (B, P) int32
    next_position: Any  # (B,) int32
    vision: VisionInputs  # (B, S, ...)


class QwenVL(nn.Module):
    """Vision tower + language model; ``dtype`` is the compute dtype, params stay fp32.

    ``attention_backend`` serves the vision tower (long sequences: kernels pay off);
    ``decode_attention_backend`` the LM's single-query decode steps, where plain XLA is the sensible
    default (a memory-bound matrix-vector product; flash kernels would pad the one query to a tile).
    """

    config: CaptionerConfig
    dtype: Any = jnp.float32
    precision: Any = None
    attention_backend: str = "auto"
    decode_attention_backend: str = "xla"
    remat: bool = False

    def setup(self) -> None:
        c = self.config
        self.visual = VisionTower(c.vision, self.dtype, self.precision, self.attention_backend, self.remat)
        self.language_model = LanguageModel(c.text, self.dtype, self.precision, self.decode_attention_backend,
                                            self.remat)

    def encode_images(self, vision: VisionInputs) -> jax.Array:
        """``(B, S / merge_unit, E)`` merged image features in the compute dtype."""
        return self.visual(vision.patches, vision.valid, vision.pos_hw)

    def embed_prompt(self, input_ids: jax.Array, image_index: jax.Array, image_features: jax.Array) -> jax.Array:
        """Token embeddings (B, P, E) with every image token replaced by its row's merged image feature."""
        h = self.language_model.embed(input_ids)
        idx = jnp.maximum(image_index, 0)[..., None]  # (B, P, 1)
        img = jnp.take_along_axis(image_features.astype(h.dtype), idx, axis=1)
        return jnp.where((image_index >= 0)[..., None], img, h)

    def prefill(self, batch: PromptBatch, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Encode the images, run the prompt, fill cache slots ``[0, P)``; returns hidden states (B, P, E)."""
        feats = self.encode_images(batch.vision)
        h = self.embed_prompt(batch.input_ids, batch.image_index, feats)
        return self.language_model(h, batch.positions, cache, jnp.zeros((), jnp.int32), batch.kv_start)

    def decode_step(self, tokens: jax.Array, position: jax.Array, write_index: jax.Array, kv_start: jax.Array,
                    cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One token per row at (text) M-RoPE id ``position`` (B,), cache slot ``write_index``: fp32 logits (B, V)."""
        h = self.language_model.embed(tokens[:, None])
        pos = jnp.broadcast_to(position[None, :, None], (3, tokens.shape[0], 1))
        h, cache = self.language_model(h, pos, cache, write_index, kv_start)
        return self.language_model.logits(h[:, 0]), cache

    def logits(self, h: jax.Array) -> jax.Array:
        return self.language_model.logits(h)

    def __call__(self, batch: PromptBatch) -> jax.Array:
        """Full-sequence fp32 logits (B, P, V) of the prompts (used for init and parity tests)."""
        B, P = batch.input_ids.shape
        cache = init_cache(self.config.text, B, P, self.dtype)
        h, _ = self.prefill(batch, cache)
        return self.logits(h)


# ----------------------------------------------------------------------------------------------
# pure functions over parameter pytrees


def dummy_batch(config: CaptionerConfig, batch: int = 1, prompt_len: int = 8, slots: Optional[int] = None) -> PromptBatch:
    """Zeros of the right shapes (for init / eval_shape)."""
    v = config.vision
    S = slots or v.window_slots * max(1, 16 // v.window_slots)
    vis = VisionInputs(np.zeros((batch, S, v.patch_dim), np.float32), np.ones((batch, S), bool),
                       np.zeros((batch, S, 2), np.int32))
    return PromptBatch(np.zeros((batch, prompt_len), np.int32), np.zeros((3, batch, prompt_len), np.int32),
                       np.zeros((batch,), np.int32), -np.ones((batch, prompt_len), np.int32),
                       np.full((batch,), prompt_len, np.int32), vis)


def init_params(config: CaptionerConfig, rng: jax.Array, *, boxed: bool = False) -> Params:
    """Random fp32 params (tests, benchmarks, shape checks). ``boxed=True`` keeps the logical-axis boxes.

    Jit-compiled (eager init dispatches op by op and is slow); inside another trace it just traces.
    """
    batch = dummy_batch(config)
    params = jax.jit(lambda r: QwenVL(config).init(r, batch)["params"])(rng)
    return params if boxed else nn.unbox(params)


def param_shapes(config: CaptionerConfig) -> Params:
    """The param tree as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
    return nn.unbox(jax.eval_shape(lambda r: init_params(config, r, boxed=True), jax.random.PRNGKey(0)))


def param_logical_axes(config: CaptionerConfig) -> Params:
    """The param tree with a ``PartitionSpec`` of logical axis names per leaf.

    Map to mesh axes with ``nn.logical_to_mesh_sharding(specs, mesh, rules)``: e.g. ``embed -> fsdp`` and
    ``heads/kv_heads/mlp/vocab -> tensor`` for a tensor-parallel 7B LM, or everything replicated and the
    batch over ``data`` for data parallelism over images.
    """
    boxed = jax.eval_shape(lambda r: init_params(config, r, boxed=True), jax.random.PRNGKey(0))
    return nn.get_partition_spec(boxed)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "precision", "attention_backend"))
def forward_logits(params: Params, batch: PromptBatch, config: CaptionerConfig, *, dtype: Any = jnp.float32,
                   precision: Any = None, attention_backend: str = "auto") -> jax.Array:
    """fp32 logits ``(B, P, V)`` for every prompt position (left-padded rows: padding positions are junk)."""
    model = QwenVL(config, dtype=dtype, precision=precision, attention_backend=attention_backend)
    return model.apply({"params": params}, batch)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "precision", "attention_backend"))
def image_features(params: Params, vision: VisionInputs, config: CaptionerConfig, *, dtype: Any = jnp.float32,
                   precision: Any = None, attention_backend: str = "auto") -> jax.Array:
    """Merged image features ``(B, S / merge_unit, E)`` (slot order; see :func:`.vision.merged_slot_index`)."""
    model = QwenVL(config, dtype=dtype, precision=precision, attention_backend=attention_backend)
    return model.apply({"params": params}, vision, method=QwenVL.encode_images)


def cast_params(params: Params, dtype: Any) -> Params:
    """Cast floating params (e.g. to bf16 to halve memory; the modules compute in their ``dtype``)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
